"""A big image folder through the data path, stage by stage: seconds and peak memory (issue 23, item 2).

Generates (once, nice'd, kept for reruns) folders of small JPEGs (48x64 and 64x48, ~4 KB) in `--classes`
class folders under `--root` (in /tmp, never in the repository), with one unreadable file in every 100th
class, and runs each stage of what `train` does with an image folder (`data.load_data`) through the
package's own functions, each in a fresh child process: the stage's prerequisites first, then the
process's peak-memory mark reset (`/proc/self/clear_refs`), then the stage, timed. `peak_mb` is the
child's VmHWM after the stage (its peak resident memory during it), `start_mb` its resident memory when
the stage began. Stages, in order (each one's caches are left for the next):

    walk           files.folder_layout: the split and class folders walked, every file listed (lstat only)
    split          split.carve_test + split.train_val_indices on the listing's labels (stratified)
    check          decode.decode_cached(keep=False) with an empty cache: the corrupt-file pass, every file
                   decoded once; what a streamed folder does before its first run
    check_cached   the same with its result in the cache: a second run's cost
    source         sources.image_folder, streamed, the check cached: walk + check + class checks + test split
    stats          pixel_stats.statistics with an empty cache: the colour statistics, one streamed pass
    stream_epoch   one epoch of `load_data(max_memory_mb=0).train` (streamed: decoded from the files)
    memory_load    load_data with the folder held in memory, its decoded cache empty: decode, keep, save .npz
    memory_cached  the same with the .npz in the cache: a second run's cost
    memory_epoch   one epoch of the in-memory `load_data(...).train` (its images copied into TensorFlow once)

    python benchmarks/big_folder.py --per-class 10,100 --out benchmarks/results/big-folder.csv
    python benchmarks/big_folder.py --classes 3 --per-class 4 --out /tmp/big.csv          # a test of the path
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jpeg_folder import make_jpeg_folder  # noqa: E402
from machine import write_rows  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("walk", "split", "check", "check_cached", "source", "stats", "stream_epoch", "memory_load",
          "memory_cached", "memory_epoch")
COLUMNS = ("date", "host", "files", "classes", "side", "stage", "seconds", "start_mb", "peak_mb", "items",
           "decoded_mb", "load")
SIDES = (48, 64)


def big_folder(root: Path, classes: int, per_class: int) -> Path:
    """The generated folder of `classes` x `per_class` JPEGs (+ one unreadable file per 100 classes), made
    once: a `.complete` marker (hidden: not a data file) says it is whole."""
    folder = root / f"{classes}x{per_class}-{SIDES[0]}x{SIDES[1]}"
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        os.nice(10)   # the CPU is shared: generation can wait
        make_jpeg_folder(folder, classes, per_class, SIDES)
        for c in range(0, classes, 100):
            (folder / f"n{c:05d}" / "unreadable.jpg").write_bytes(b"not an image")
        (folder / ".complete").write_text(f"{classes} x {per_class}\n")
    return folder


def peak_mb() -> float:
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024


def rss_mb() -> float:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


def run_stage(stage: str, folder: Path, side: int) -> dict:
    """One stage in this process (a fresh child): prerequisites, then the stage timed, its peak memory."""
    from alexnet_keras.config import DataConfig
    from alexnet_keras.data import files, split   # no TensorFlow: the walk and split stages go without

    hint = files.LAYOUT_HINT
    stream_cfg = DataConfig(dataset="folder", data_dir=str(folder), max_memory_mb=0)
    memory_cfg = DataConfig(dataset="folder", data_dir=str(folder), max_memory_mb=2 ** 16)
    if stage not in ("walk", "split"):
        from alexnet_keras.data import decode, pixel_stats, sources
        from alexnet_keras.data.pipeline import load_data

    def epoch(data):
        return sum(len(y) for _, y in data.train.as_numpy_iterator())

    def train_split():
        source = sources.image_folder(folder, side, False, hint, 0, max_bytes=0)
        train_idx, _ = split.train_val_indices(source.train.labels, stream_cfg.val_fraction, None, 0, own_val=False)
        return source.train[train_idx]

    if stage == "walk":
        prepared, work = None, lambda _: len(files.folder_layout(folder, hint).files)
    elif stage == "split":
        import numpy as np

        def work(labels):
            kept, test = split.carve_test(labels, 0)
            train, val = split.train_val_indices(labels[kept], 0.1, None, 0, own_val=False)
            return len(train) + len(val) + len(test)
        prepared = np.asarray(files.folder_layout(folder, hint).labels)
    elif stage in ("check", "check_cached"):
        listing = files.folder_layout(folder, hint)
        prepared = listing.files
        work = lambda names: len(decode.decode_cached(folder, names, side, False, keep=False)[1])  # noqa: E731
    elif stage == "source":
        prepared, work = None, lambda _: len(sources.image_folder(folder, side, False, hint, 0, max_bytes=0).train)
    elif stage == "stats":
        prepared = train_split()
        work = lambda train: pixel_stats.statistics(train, "big-folder", False, False).images  # noqa: E731
    elif stage in ("stream_epoch", "memory_epoch"):
        prepared = load_data(stream_cfg if stage == "stream_epoch" else memory_cfg, side, 256, verbose=False)
        work = epoch
    else:   # memory_load, memory_cached
        prepared, work = None, lambda _: load_data(memory_cfg, side, 256, verbose=False).counts["train"]
    start_mb = rss_mb()
    Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM to the current resident memory
    start = time.perf_counter()
    items = work(prepared)
    return {"stage": stage, "seconds": round(time.perf_counter() - start, 3), "start_mb": round(start_mb, 1),
            "peak_mb": round(peak_mb(), 1), "items": items}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out", help="CSV to append rows to")
    parser.add_argument("--root", default="/tmp/big-folder", help="where the generated folders are kept")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", default="10,100", help="JPEGs per class folder, one folder each")
    parser.add_argument("--side", type=int, default=32, help="the model's input side (--variant cifar: 32)")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--stage", help=argparse.SUPPRESS)    # the child's own: one stage, JSON on stdout
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        print(json.dumps(run_stage(args.stage, Path(args.folder), args.side)))
        return 0
    rows = []
    for per_class in map(int, args.per_class.split(",")):
        folder = big_folder(Path(args.root), args.classes, per_class)
        cache = Path(tempfile.mkdtemp(prefix="cache-", dir=args.root))   # empty: the cold stages are cold
        env = {**os.environ, "ALEXNET_KERAS_CACHE": str(cache), "TF_CPP_MIN_LOG_LEVEL": "2",
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        try:
            for stage in args.stages.split(","):
                load = " ".join(f"{v:.1f}" for v in os.getloadavg())
                done = subprocess.run([sys.executable, __file__, "--stage", stage, "--folder", str(folder),
                                       "--side", str(args.side)], env=env, capture_output=True, text=True)
                if done.returncode:
                    sys.stderr.write(done.stderr[-3000:])
                    return done.returncode
                row = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "host": platform.node(), "files": args.classes * per_class, "classes": args.classes,
                       "side": args.side, **json.loads(done.stdout.strip().splitlines()[-1]),
                       "decoded_mb": round(args.classes * per_class * args.side ** 2 * 3 / 2 ** 20, 1),
                       "load": load}
                rows.append(row)
                print(", ".join(f"{k} {row[k]}" for k in ("files", "stage", "seconds", "start_mb", "peak_mb",
                                                          "items")), flush=True)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    if args.out:
        write_rows(Path(args.out), [{k: row[k] for k in COLUMNS} for row in rows], append=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
