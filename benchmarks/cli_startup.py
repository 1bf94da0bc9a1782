"""Wall time of `alexnet-keras --help`, `--version` and `report --help`: how fast the CLI starts.

Each command runs `--repeat` times (default 10) in a fresh process for each `--cli LABEL=EXECUTABLE`
(e.g. the code before and after a change), the executables taking turns run by run so that a change of
load on a shared machine hits each alike. The rows (one per run) are appended to a CSV with the date,
the machine and its load before and after; the median per label and command is printed. Results:
docs/results.md, "CLI start-up"; raw file: benchmarks/results/cli-startup.csv.

    # the committed code (unpacked with `git archive HEAD alexnet_keras | tar -x -C /tmp/head`) vs the tree:
    printf '#!/bin/sh\nPYTHONPATH=/tmp/head exec .venv/bin/alexnet-keras "$@"\n' > /tmp/head-cli
    python benchmarks/cli_startup.py --cli before=/tmp/head-cli --cli after=.venv/bin/alexnet-keras \
        --out benchmarks/results/cli-startup.csv
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import machine, write_rows  # benchmarks/machine.py

COMMANDS = {"--help": ["--help"], "--version": ["--version"], "report --help": ["report", "--help"]}



def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cli", action="append", required=True, metavar="LABEL=EXECUTABLE",
                        help="an alexnet-keras executable and what it is (before, after ...); repeatable")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True, help="CSV to append the rows to")
    args = parser.parse_args()
    clis = dict(item.split("=", 1) for item in args.cli)
    date = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    before = load()
    rows = []
    for name, argv in COMMANDS.items():
        for i in range(args.repeat):
            for label, executable in clis.items():   # in turn: the same load for each
                start = time.perf_counter()
                proc = subprocess.run([executable, *argv], capture_output=True, text=True)
                seconds = time.perf_counter() - start
                rows.append({"label": label, "command": f"alexnet-keras {name}", "repeat": i,
                             "exit_status": proc.returncode, "seconds": f"{seconds:.4f}"})
    after = load()
    write_rows(args.out, rows, {"date": date, "machine": machine(), "python": platform.python_version(),
                                "load_before": before, "load_after": after}, append=True)
    for name in COMMANDS:
        for label in clis:
            mine = [r for r in rows if r["command"] == f"alexnet-keras {name}" and r["label"] == label]
            times = [float(r["seconds"]) for r in mine]
            codes = sorted({r["exit_status"] for r in mine})
            print(f"{label:>8}  alexnet-keras {name:<14} median {statistics.median(times):.3f} s  "
                  f"(min {min(times):.3f}, max {max(times):.3f}, exit {codes})")
    print(f"load {before} -> {after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
