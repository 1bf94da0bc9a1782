"""The Figure-1 studies' raw data from their MLflow store, as CSVs beside this file (docs/ablations.md, "Figure 1").

    python docs/data/figure1-cpu/export.py sqlite:////work/fig1/mlflow.db

history.csv: every child's per-epoch metrics (epoch from 1). runs.csv: one row per child: its study, arm, learning
rate, seed, the rate the study chose for the arm (figure1_cpu.yaml: the best final val_accuracy of seed 0's
tuning runs, the study's rule), and the first epoch whose train_eval_accuracy (inference mode, fixed
un-augmented training images) is >= 0.75, i.e. 25 % training error; censored where no epoch of the run reached
it (the bound is the epochs trained).
"""

import csv
import sys
from pathlib import Path

from mlflow import MlflowClient

KEYS = ("loss", "accuracy", "train_eval_loss", "train_eval_accuracy", "val_loss", "val_accuracy")
THRESHOLD = 0.75

client = MlflowClient(sys.argv[1])
experiment = client.get_experiment_by_name(sys.argv[2] if len(sys.argv) > 2 else "figure1-cpu")
children = client.search_runs([experiment.experiment_id], "tags.`alexnet_keras.study_role` = 'child'")
rows, history = [], []
for run in children:
    p, study, run_id = run.data.params, run.data.tags["alexnet_keras.study"], run.info.run_id
    curves = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in KEYS}
    epochs = sorted(curves["loss"])
    arm = {"study": study, "run_id": run_id, "activation": p["activation"], "learning_rate": p["learning_rate"],
           "seed": p["seed"]}
    history += [{**arm, "epoch": step + 1, **{k: curves[k].get(step) for k in KEYS}} for step in epochs]
    reached = [step + 1 for step in epochs if curves["train_eval_accuracy"].get(step, 0) >= THRESHOLD]
    last = len(epochs) - 1
    rows.append({**arm, "status": run.info.status, "epochs_trained": len(epochs),
                 "epochs_to_25pct_train_error": reached[0] if reached else "", "censored": not reached,
                 "final_train_eval_accuracy": curves["train_eval_accuracy"].get(last),
                 "final_val_accuracy": curves["val_accuracy"].get(last),
                 "epoch_time_s": run.data.metrics.get("epoch_time_s")})
for key in {(r["study"], r["activation"]) for r in rows}:   # seed 0's runs tune the rate: the best final val wins
    tuning = [r for r in rows if (r["study"], r["activation"]) == key and r["seed"] == "0"
              and r["status"] == "FINISHED"]
    best = max(tuning, key=lambda r: r["final_val_accuracy"] or 0.0, default=None)
    for r in rows:
        if (r["study"], r["activation"]) == key:
            r["chosen_rate"] = best["learning_rate"] if best else ""


def order(r):
    return r["study"], r["activation"], int(r["seed"]), float(r["learning_rate"]), r.get("epoch", 0)


here = Path(__file__).parent
for name, table in (("runs.csv", sorted(rows, key=order)), ("history.csv", sorted(history, key=order))):
    with open(here / name, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    print(f"{here / name}: {len(table)} rows")
