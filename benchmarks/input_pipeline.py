"""Feeding the GPU: the paper recipe's training input pipeline alone (no model), in images/s per CPU core.

For each stored format — the JPEG folder at its original sizes (streamed), and `prepare`d TFRecord shards
at stored sizes 256 and 160, JPEG- and PNG-encoded — with and without the PCA colour shift, the training
pipeline that `train` builds (`data.load_data`: decode, shorter side to the stored size, random crop,
flip, PCA colour, batching) is iterated for `--batches` batches after a burn-in, on a tf.data thread pool
of `--threads` threads (`tf.data.Options.threading.private_threadpool_size`, with autotune's CPU budget
set to the same). The last column turns the rate into cores needed to feed `--target` images/s (an
H100's ~38,000 img/s on this network), assuming per-core rates add up.

    python benchmarks/input_pipeline.py --out benchmarks/results/input-pipeline.csv            # 10,000 files
    python benchmarks/input_pipeline.py --tiny --out /tmp/input-pipeline.csv                   # the test's size

The generated images are smooth random JPEGs of ImageNet's typical 500x333 / 333x500 (photo-like file
sizes, ~50-70 KB at quality 90); the crops are 227 px from 256 and 144 px from 160.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jpeg_folder import make_jpeg_folder  # noqa: E402
from machine import write_rows  # noqa: E402

COLUMNS = ("date", "host", "format", "stored_size", "crop", "pca_color", "threads", "batch_size", "batches",
           "seconds", "img_s", "img_s_per_thread", "cores_for_target", "files", "stored_mb", "load")


def pipeline_rate(data_dir: str, stored: int, crop: int, pca: bool, threads: int, batch_size: int, batches: int,
                  burn_in: int) -> tuple[float, float]:
    """Seconds for `batches` training batches after `burn_in`, and images/s."""
    import tensorflow as tf

    from alexnet_keras.config import DataConfig
    from alexnet_keras.data import load_data

    cfg = DataConfig(dataset="folder", data_dir=data_dir, recipe="paper", stored_size=stored, pca_color=pca,
                     max_memory_mb=0, ten_crop=False, val_fraction=0.05)
    data = load_data(cfg, image_size=crop, batch_size=batch_size, seed=0, verbose=False, deterministic=False)
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.autotune.cpu_budget = threads
    batches_iter = iter(data.train.repeat().with_options(options))
    for _ in range(burn_in):
        next(batches_iter)
    start = time.perf_counter()
    for _ in range(batches):
        next(batches_iter)
    seconds = time.perf_counter() - start
    return seconds, batches * batch_size / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out", required=True, help="CSV to append rows to")
    parser.add_argument("--files", type=int, default=10_000, help="JPEGs to generate, in --classes folders")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--threads", default="1,2", help="tf.data thread pool sizes to measure")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--burn-in", type=int, default=3)
    parser.add_argument("--target", type=float, default=38_000.0, help="images/s to feed")
    parser.add_argument("--formats", default="folder,jpeg256,jpeg160,png256",
                        help="folder (original files, streamed), jpeg256, jpeg160, png256, png160")
    parser.add_argument("--tiny", action="store_true", help="24 files, 3 classes, 64 px crops: a test of the path")
    args = parser.parse_args(argv)
    if args.tiny:
        args.files, args.classes, args.batch_size, args.batches, args.burn_in = 24, 3, 4, 2, 1
    from alexnet_keras.data.tfrecord import prepare

    work = Path(tempfile.mkdtemp(prefix="input-pipeline-"))
    try:
        folder = work / "folder"
        sides = (80, 120) if args.tiny else (333, 500)
        files = make_jpeg_folder(folder, args.classes, max(2, args.files // args.classes), sides)
        load = " ".join(f"{v:.1f}" for v in os.getloadavg())
        rows = []
        for name in args.formats.split(","):
            stored = 160 if name.endswith("160") else 256
            crop = 227 if stored == 256 else 144
            if args.tiny:
                stored, crop = (72, 64) if stored == 256 else (48, 40)
            source = folder
            if name != "folder":
                source = work / name
                prepare(folder, source, stored_size=stored, encoding=name[:-3] if name[-3:].isdigit() else name,
                        verbose=False)
            stored_mb = sum(f.stat().st_size for f in source.rglob("*") if f.is_file()) / 2 ** 20
            for pca in (True, False):
                for threads in map(int, args.threads.split(",")):
                    seconds, rate = pipeline_rate(str(source), stored, crop, pca, threads, args.batch_size,
                                                  args.batches, args.burn_in)
                    rows.append({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                 "host": platform.node(), "format": name, "stored_size": stored, "crop": crop,
                                 "pca_color": pca, "threads": threads, "batch_size": args.batch_size,
                                 "batches": args.batches, "seconds": round(seconds, 3), "img_s": round(rate, 1),
                                 "img_s_per_thread": round(rate / threads, 1),
                                 "cores_for_target": round(args.target / (rate / threads), 1), "files": files,
                                 "stored_mb": round(stored_mb, 1), "load": load})
                    print(", ".join(f"{k} {rows[-1][k]}" for k in ("format", "pca_color", "threads", "img_s",
                                                                   "cores_for_target")), flush=True)
        write_rows(Path(args.out), [{k: row[k] for k in COLUMNS} for row in rows], append=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
