"""The smoke study (experiments/smoke.yaml, 6 children) sequential vs on a two-node Ray cluster, same machine,
same sitting, both logging to the same MLflow tracking server.

    RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))') \\
        python benchmarks/ray_study.py [--repeats 2] [--out benchmarks/results/ray-study.csv]

The cluster is the tests' (tests/ray_fixtures.py): `ray start` head + a second node, 1 CPU each, and an
`mlflow server`, all on 127.0.0.1. Each repeat runs the study twice, the order alternating:

    sequential   alexnet-keras ablate STUDY --tracking-uri SERVER
    ray          alexnet-keras ablate STUDY --tracking-uri SERVER --ray HEAD:PORT

(each time in an experiment of its own, so nothing is skipped). Measured per run, from the command's
wall clock and the runs' own start and end times in MLflow:

    wall_s        the command, start to exit (Python and TensorFlow start-up, connecting, the report)
    first_child_s command start -> the first child's MLflow run starts
    children_s    the sum of the children's run durations (MLflow start -> end)
    gap_s         mean time between one child's run ending and the next one starting on the same
                  process (sequential) or node (Ray): what each further child costs besides its own
                  run; Ray's per-child overhead is the difference between the two modes
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine  # benchmarks/machine.py

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from ray_fixtures import LoopbackCluster  # noqa: E402  (the tests' two-node cluster)

FIELDS = ["date", "machine", "python", "ray", "loadavg_before", "mode", "repeat", "wall_s", "first_child_s",
          "children", "children_s", "gap_s"]



def run_study(mode: str, repeat: int, lab: LoopbackCluster, folder: Path) -> dict:
    from mlflow.tracking import MlflowClient

    experiment = f"bench-{mode}-{repeat}-{time.time_ns()}"
    study = yaml.safe_load((ROOT / "experiments" / "smoke.yaml").read_text())
    study["experiment"] = experiment
    path = folder / f"{experiment}.yaml"
    path.write_text(yaml.safe_dump(study))
    argv = [sys.executable, "-m", "alexnet_keras", "ablate", str(path), "--tracking-uri", lab.mlflow_uri]
    if mode == "ray":
        argv += ["--ray", lab.address]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "KERASTUNER_"))}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    log = folder / f"{experiment}.log"
    started_ms = time.time() * 1000
    start = time.perf_counter()
    with open(log, "wb") as out:
        rc = subprocess.run(argv, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"{mode} run {repeat} exited {rc}:\n{log.read_text()[-3000:]}")

    client = MlflowClient(lab.mlflow_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    children = [r for r in client.search_runs([experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    by_worker: dict[str, list] = {}
    for run in children:   # the process (sequential) or node (Ray) that trained it
        by_worker.setdefault(run.data.tags.get("alexnet_keras.ray_node_id") or run.data.tags["alexnet_keras.pid"],
                             []).append(run)
    gaps = []
    for runs in by_worker.values():
        runs.sort(key=lambda r: r.info.start_time)
        gaps += [(b.info.start_time - a.info.end_time) / 1000 for a, b in zip(runs, runs[1:])]
    return {"loadavg_before": load, "mode": mode, "repeat": repeat, "wall_s": round(wall, 2),
            "first_child_s": round((min(r.info.start_time for r in children) - started_ms) / 1000, 2),
            "children": len(children),
            "children_s": round(sum(r.info.end_time - r.info.start_time for r in children) / 1000, 2),
            "gap_s": round(statistics.mean(gaps), 3) if gaps else ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ray-study.csv"))
    args = parser.parse_args(argv)
    if os.environ.get("RAY_AUTH_MODE") != "token" or not os.environ.get("RAY_AUTH_TOKEN"):
        raise SystemExit("set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (see the docstring)")

    import ray

    common = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), "machine": machine(),
              "python": platform.python_version(), "ray": ray.__version__}
    rows = []
    with tempfile.TemporaryDirectory(prefix="ray-study-") as tmp, \
            LoopbackCluster(token=os.environ["RAY_AUTH_TOKEN"]) as lab:
        lab.start_mlflow_server()
        lab.start_head()
        lab.add_node("second")
        lab.wait_for_mlflow_server()
        for repeat in range(args.repeats):
            for mode in (("sequential", "ray") if repeat % 2 == 0 else ("ray", "sequential")):
                row = {**common, **run_study(mode, repeat, lab, Path(tmp))}
                print({k: row[k] for k in FIELDS[5:]}, flush=True)
                rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{common['date']}, {common['machine']}, Python {common['python']}, Ray {common['ray']}; raw: {out}")
    print("| mode | runs | wall (s) | first child starts (s) | sum of child runs (s) | gap between children (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in ("sequential", "ray"):
        mine = [r for r in rows if r["mode"] == mode]
        cell = lambda key: " / ".join(f"{r[key]}" for r in mine)
        print(f"| {mode} | {len(mine)} | {cell('wall_s')} | {cell('first_child_s')} | {cell('children_s')} | "
              f"{cell('gap_s')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
