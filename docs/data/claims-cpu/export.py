"""A finished study's raw data from its MLflow store, beside this file (docs/ablations.md, "The paper's CIFAR-10
claims in their own setting").

    python docs/data/claims-cpu/export.py sqlite:////work/claims/mlflow.db PARENT_RUN_ID FOLDER_NAME

Writes FOLDER_NAME/: the parent's reports (ablation.md/.csv, ablation_runs.csv, claims.md/.csv, as `ablate` logged
them), its figures, and history.csv: every child's per-epoch metrics (epoch from 1), with its arm and seed, including
train_eval_accuracy (fixed un-augmented training images scored in inference mode after each epoch).
"""

import csv
import shutil
import sys
import tempfile
from pathlib import Path

from mlflow import MlflowClient

KEYS = ("loss", "accuracy", "train_eval_loss", "train_eval_accuracy", "val_loss", "val_accuracy")

uri, parent_id, name = sys.argv[1:4]
client = MlflowClient(uri)
parent = client.get_run(parent_id)
out = Path(__file__).parent / name
out.mkdir(exist_ok=True)
with tempfile.TemporaryDirectory() as tmp:
    for folder in ("reports", "figures", "study"):
        local = Path(client.download_artifacts(parent_id, folder, tmp))
        for file in local.iterdir():
            if file.suffix in (".md", ".csv", ".png", ".yaml"):
                shutil.copy(file, out / file.name)
study = parent.data.tags["alexnet_keras.study"]
children = client.search_runs([parent.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1000)
history = []
for run in children:
    curves = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)} for key in KEYS}
    arm = {"study": study, "run_id": run.info.run_id, **{k: run.data.params.get(k) for k in ("lrn", "dropout", "learning_rate", "seed")}}
    history += [{**arm, "epoch": step + 1, **{k: curves[k].get(step) for k in KEYS}} for step in sorted(curves["loss"])]
history.sort(key=lambda r: (r["lrn"] or "", r["dropout"] or "", int(r["seed"]), r["epoch"]))
with open(out / "history.csv", "w", newline="") as file:
    writer = csv.DictWriter(file, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
print(f"{out}: {sorted(p.name for p in out.iterdir())}, history.csv {len(history)} rows")

# The gap at a glance: each arm's mean over seeds of training accuracy (inference mode) and validation accuracy.
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

axis = next(k for k in ("dropout", "lrn") if len({r[k] for r in history}) > 1)
fig, ax = plt.subplots(figsize=(7, 4.2))
for colour, value in zip(("tab:blue", "tab:orange"), sorted({r[axis] for r in history}, reverse=True)):
    arm = [r for r in history if r[axis] == value]
    epochs = sorted({r["epoch"] for r in arm})
    for key, style in (("train_eval_accuracy", "-"), ("val_accuracy", "--")):
        mean = [sum(r[key] for r in arm if r["epoch"] == e) / sum(r["epoch"] == e for r in arm) for e in epochs]
        ax.plot(epochs, mean, style, color=colour, label=f"{axis}={value}: {key.replace('_', ' ')}")
ax.set(xlabel="epoch", ylabel="accuracy", title=f"{study}: mean of {len({r['seed'] for r in history})} seeds")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out / "curves.png", dpi=110)
print(out / "curves.png")
