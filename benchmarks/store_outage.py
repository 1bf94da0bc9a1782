"""Issue 25's case by hand: another process holds the SQLite store's write lock (BEGIN EXCLUSIVE) for
`--lock-s` seconds from the start of epoch `--lock-epoch` of a real `alexnet-keras train`; prints what the
run logged (each epoch's steps and how often), its status, the training's warnings and how long it waited.

    python benchmarks/store_outage.py --folder /tmp/outage --lock-s 30 --lock-epoch 3 \
        | tee benchmarks/results/store-outage.txt

Results in docs/reliability.md ("Faults during a run", the store locked for longer than MLflow waits).
"""

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

TRAIN = ["--variant", "cifar", "--width", "0.25", "--dataset", "synthetic", "--synthetic-samples", "2048",
         "--synthetic-classes", "10", "--batch-size", "64", "--epochs", "6", "--init", "keras"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, required=True, help="a scratch folder (emptied first)")
    parser.add_argument("--lock-s", type=float, default=30.0)
    parser.add_argument("--lock-epoch", type=int, default=3, help="1-based, as Keras prints epochs")
    args = parser.parse_args()
    shutil.rmtree(args.folder, ignore_errors=True)
    args.folder.mkdir(parents=True)
    store = args.folder / "mlflow.db"
    command = [sys.executable, "-m", "alexnet_keras", "train", *TRAIN, "--tracking-uri", f"sqlite:///{store}"]
    print("command:", " ".join(command[1:]), flush=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    started = time.monotonic()
    print(f"date {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average {os.getloadavg()}", flush=True)
    train = subprocess.Popen(command, cwd=args.folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**env, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"})
    lines, epoch_began = [], threading.Event()

    def read() -> None:   # every line of the training, with its time
        for line in train.stdout:
            lines.append(f"{time.monotonic() - started:6.1f} s | {line.rstrip()}")
            if line.startswith(f"Epoch {args.lock_epoch}/"):   # Keras prints it as the epoch begins
                epoch_began.set()

    reader = threading.Thread(target=read)
    reader.start()
    while not epoch_began.wait(1):
        if train.poll() is not None:
            reader.join()
            sys.exit("\n".join(lines) + f"\nthe training ended before epoch {args.lock_epoch}")
    locker = sqlite3.connect(store, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    locked_at = time.monotonic()
    lines.append(f"{locked_at - started:6.1f} s * another process locked the store (BEGIN EXCLUSIVE)")
    while time.monotonic() - locked_at < args.lock_s:
        time.sleep(0.2)
    locker.execute("ROLLBACK")
    locker.close()
    lines.append(f"{time.monotonic() - started:6.1f} s * released it after {time.monotonic() - locked_at:.1f} s")
    train.wait()
    reader.join()
    print("\n".join(lines))
    print(f"exit status {train.returncode} after {time.monotonic() - started:.1f} s", flush=True)
    db = sqlite3.connect(store)
    (run_id, status), = db.execute("select run_uuid, status from runs")
    steps = db.execute("select step, count(*) from metrics where run_uuid = ? and key = 'loss' group by step "
                       "order by step", (run_id,)).fetchall()
    print("RESULT " + json.dumps({"run": run_id, "status": status, "loss steps (step, times logged)": steps,
                                  "checkpoints left": sorted(str(p) for p in (args.folder / "checkpoints").glob("*"))}))


if __name__ == "__main__":
    main()
