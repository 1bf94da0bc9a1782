"""The LRN diagnostics that training logged (`lrn/lrn1_ratio_mean` ... at step 0 and at the last step;
alexnet_keras.training.train.fit) for every finished child of the given study parents, as one CSV: how much
each LRN layer normalised at the start and at the end of training, per run. docs/ablations.md ("LRN in the paper's input regime") reads it.

    python benchmarks/lrn_diagnostics_of_runs.py PARENT_RUN_ID [PARENT_RUN_ID ...] \
        --out docs/data/lrn-regimes/lrn_diagnostics.csv

The store is $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (as for the CLI).
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

from mlflow.tracking import MlflowClient

STATISTICS = ("ratio_mean", "ratio_p95", "scale_mean", "scale_min", "relative_scale_mean", "relative_scale_min")
OPTIONS = ("input_norm", "init", "lrn", "activation", "dropout", "learning_rate", "seed", "epochs", "width")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parents", nargs="+", metavar="PARENT_RUN_ID")
    parser.add_argument("--out", required=True, help="CSV file to write")
    args = parser.parse_args()
    client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    rows = []
    for parent_id in args.parents:
        parent = client.get_run(parent_id)
        children = client.search_runs([parent.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'FINISHED'",
                                      max_results=1000)
        for child in sorted(children, key=lambda r: r.info.start_time):
            metrics, params = child.data.metrics, child.data.params
            # lrn/<layer>_<statistic>: step 0 before training, the last step after it
            layers = sorted({k[4:].split("_", 1)[0] for k in metrics if k.startswith("lrn/")})
            for layer in layers:
                row = {"parent": parent_id, "study": parent.info.run_name, "run_id": child.info.run_id,
                       "run_name": child.info.run_name, **{o: params.get(o, "") for o in OPTIONS},
                       "val_accuracy": metrics.get("val_accuracy"), "test_accuracy": metrics.get("test_accuracy"),
                       "layer": layer}
                for stat in STATISTICS:
                    history = sorted((m.step, m.value) for m in
                                     client.get_metric_history(child.info.run_id, f"lrn/{layer}_{stat}"))
                    row[f"{stat}_start"], row[f"{stat}_end"] = history[0][1], history[-1][1]
                rows.append(row)
    if not rows:
        raise SystemExit("no finished child of these parents logged LRN diagnostics")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} rows ({len({r['run_id'] for r in rows})} runs) -> {out}")


if __name__ == "__main__":
    main()
