"""What Ray adds to a study's children: starting a local cluster, and running one no-op job.

    python benchmarks/ray_overhead.py [--starts 3] [--jobs 30] [--batch 200] [--cpus 2] [--out FILE.csv]

Measured through alexnet_keras.experiments.cluster (what `ablate --ray` will use) and, for comparison, with bare Ray:

    start            connect() of a local cluster (ray.init on 127.0.0.1), until it answers
    stop             disconnect() (ray.shutdown of that cluster)
    first_job        the first no-op job of a fresh cluster: includes starting a worker process
    job              one no-op job through run_jobs, one after another (latency: submit, schedule, run,
                     fetch the result, one progress line)
    bare_task        one no-op task with ray.remote + ray.get (Ray alone, no run_jobs)
    batch_per_job    run_jobs of `--batch` no-ops at once, wall time / batch (throughput cost per job)

Each row of the CSV is one measurement; the printed table gives median, min and max per measure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from machine import machine, write_rows  # benchmarks/machine.py


def _noop_factory():
    def noop():
        return None   # built in a function so Ray ships it by value (no import of this script)
    return noop



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=3, help="local cluster starts to time")
    parser.add_argument("--jobs", type=int, default=30, help="sequential no-op jobs per start")
    parser.add_argument("--batch", type=int, default=200, help="no-op jobs submitted at once")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local cluster")
    parser.add_argument("--out", default="benchmarks/results/ray-overhead.csv")
    args = parser.parse_args(argv)

    from alexnet_keras.experiments import cluster

    noop = _noop_factory()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    rows: list[dict] = []
    load_before = os.getloadavg()

    def record(measure: str, repeat: int, seconds: float) -> None:
        rows.append({"measure": measure, "repeat": repeat, "seconds": round(seconds, 6)})

    for start in range(args.starts):
        t = time.perf_counter()
        cluster.connect(num_cpus=args.cpus, log_to_driver=False)
        record("start", start, time.perf_counter() - t)
        import ray

        t = time.perf_counter()
        cluster.run_jobs([cluster.Job("first", noop)], verbose=False)
        record("first_job", start, time.perf_counter() - t)
        for i in range(args.jobs):
            t = time.perf_counter()
            cluster.run_jobs([cluster.Job(f"job{i}", noop)], verbose=False)
            record("job", start, time.perf_counter() - t)
        bare = ray.remote(num_cpus=1)(noop)
        ray.get(bare.remote())   # its worker is started outside the clock
        for i in range(args.jobs):
            t = time.perf_counter()
            ray.get(bare.remote())
            record("bare_task", start, time.perf_counter() - t)
        t = time.perf_counter()
        outcomes = cluster.run_jobs([cluster.Job(f"b{i}", noop) for i in range(args.batch)], verbose=False)
        record("batch_per_job", start, (time.perf_counter() - t) / args.batch)
        assert all(o.ok for o in outcomes)
        t = time.perf_counter()
        cluster.disconnect()
        record("stop", start, time.perf_counter() - t)

    import ray

    load_after = os.getloadavg()
    context = {"date": date, "machine": machine(), "python": platform.python_version(), "ray": ray.__version__,
               "cluster_cpus": args.cpus,
               "load_before": " ".join(f"{x:.1f}" for x in load_before),
               "load_after": " ".join(f"{x:.1f}" for x in load_after)}
    out = Path(args.out)
    write_rows(out, rows, context)

    print(f"Ray overhead: {context['machine']}, Python {context['python']}, Ray {context['ray']}, {date}; "
          f"load average before/after: {context['load_before']} / {context['load_after']}")
    print("| measure | n | median ms | min ms | max ms |\n|---|---|---|---|---|")
    for measure in ("start", "stop", "first_job", "job", "bare_task", "batch_per_job"):
        values = [r["seconds"] * 1000 for r in rows if r["measure"] == measure]
        print(f"| {measure} | {len(values)} | {statistics.median(values):,.1f} | {min(values):,.1f} | "
              f"{max(values):,.1f} |")
    print(f"raw: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
