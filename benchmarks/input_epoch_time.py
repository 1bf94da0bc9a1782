"""One epoch of the input pipeline alone (training split, then validation split; no model), in seconds.

Measures what issue 13 item 6 is about: a validation split carved from TFRecord training shards
(`alexnet-keras prepare` output without val/) used to read every training record each epoch; it is
now copied once into shards of its own (alexnet_keras/data/tfrecord.py). Each call loads the data once
(`load_s`: decoding scans, colour statistics and that one-time copy, into a fresh cache unless
`--cache` names one) and then
times `--epochs` passes over `data.train` and `data.val`, appending one CSV row per pass (wall seconds,
and CPU seconds of the process's threads, which other jobs on a shared machine disturb far less):

    python benchmarks/input_epoch_time.py --data-dir RECORDS --label after --csv OUT.csv [--nondeterministic]

Run it with PYTHONPATH pointing at another checkout of the package to measure that code ("before").
Results: docs/results.md, "Validation from TFRecord shards".
"""

from __future__ import annotations

import argparse
import csv
import datetime
import inspect
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--label", required=True, help="name of the code measured (before / after)")
    parser.add_argument("--csv", required=True)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cache", help="cache folder to use (default: a fresh one)")
    parser.add_argument("--nondeterministic", action="store_true",
                        help="load_data(deterministic=False), as training without --deterministic")
    args = parser.parse_args()

    os.environ["ALEXNET_KERAS_CACHE"] = args.cache or tempfile.mkdtemp(prefix="input-epoch-cache-")
    from alexnet_keras.config import DataConfig
    from alexnet_keras.data import load_data

    extra = {}
    if "deterministic" in inspect.signature(load_data).parameters:
        extra["deterministic"] = not args.nondeterministic
    elif args.nondeterministic:
        raise SystemExit("this load_data has no deterministic option")
    cfg = DataConfig(dataset="folder", data_dir=args.data_dir)
    start = time.perf_counter()
    data = load_data(cfg, args.image_size, args.batch_size, verbose=False, **extra)
    load_s = time.perf_counter() - start

    rows = []
    for epoch in range(1, args.epochs + 1):
        for split in ("train", "val"):
            start, cpu_start = time.perf_counter(), time.process_time()
            images = sum(int(y.shape[0]) for _, y in getattr(data, split))
            cpu_s = time.process_time() - cpu_start
            rows.append({"date": datetime.date.today().isoformat(), "machine": platform.node(),
                         "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                         "label": args.label, "deterministic": extra.get("deterministic", True),
                         "epoch": epoch, "split": split, "images": images,
                         "seconds": round(time.perf_counter() - start, 3), "cpu_s": round(cpu_s, 3),
                         "load_s": round(load_s, 2),
                         "train_records": data.counts["train"], "val_records": data.counts["val"]})
            print(rows[-1], flush=True)
    path = Path(args.csv)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
