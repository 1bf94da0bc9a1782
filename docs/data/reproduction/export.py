"""The reproduction's raw data from its MLflow store, beside this file (docs/results.md, "A BatchNorm AlexNet at
1/4 width, 3 seeds").

    python docs/data/reproduction/export.py sqlite:////work/repro/mlflow.db alexnet-keras-reproduction

Writes runs.csv (one row per FINISHED run: seed, run id, config digest, test metrics, final training and
validation accuracy), history.csv (every run's per-epoch metrics, epoch from 1), summary.csv
(mean, sample std and the 95 % t interval of the mean over seeds, scipy), references.csv (the mean test top-1
against each published figure: difference, its interval, one-sample t p, Holm over the figures, and the smallest
difference 3 seeds find with 80 % power) and curves.png.
"""

import csv
import statistics
import sys
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from scipy import optimize, stats

from alexnet_keras.experiments.stats import holm

KEYS = ("loss", "accuracy", "top5_accuracy", "val_loss", "val_accuracy", "val_top5_accuracy")
FINAL = ("test_accuracy", "test_top5_accuracy")
# Published CIFAR-10 test top-1 figures (docs/results.md names their recipes): taken as exact, none gives a spread.
REFERENCES = {"cuda-convnet layers-18pct (Snoek et al. 2012)": 0.82, "TensorFlow CIFAR-10 tutorial": 0.86}

uri, experiment = sys.argv[1:3]
client = MlflowClient(uri)
runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], "attributes.status = 'FINISHED'")
out = Path(__file__).parent
rows, history = [], []
for run in sorted(runs, key=lambda r: int(r.data.params["seed"])):
    curves = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)} for key in KEYS}
    epochs = sorted(curves["loss"])
    seed = int(run.data.params["seed"])
    rows.append({"seed": seed, "run_id": run.info.run_id, "config_digest": run.data.tags["alexnet_keras.config_digest"],
                 **{k: run.data.metrics.get(k) for k in FINAL}, "epochs": len(epochs),
                 "final_train_accuracy": curves["accuracy"][epochs[-1]], "final_val_accuracy": curves["val_accuracy"][epochs[-1]]})
    history += [{"seed": seed, "run_id": run.info.run_id, "epoch": step + 1, **{k: curves[k].get(step) for k in KEYS}}
                for step in epochs]


def write(name: str, table: list[dict]) -> None:
    with open(out / name, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)


summary = []
for key in ("test_accuracy", "test_top5_accuracy", "final_train_accuracy", "final_val_accuracy"):
    values = [r[key] for r in rows]
    mean = statistics.mean(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    summary.append({"metric": key, "n": len(values), "mean": mean, "std": statistics.stdev(values), "ci95_low": low,
                    "ci95_high": high, "min": min(values), "max": max(values)})
test = np.array([r["test_accuracy"] for r in rows])
n, sd = len(test), test.std(ddof=1)
critical = stats.t.ppf(0.975, n - 1)


def power(difference: float) -> float:
    """A two-sided one-sample t-test's power at α 0.05 (noncentral t); the wrong-sign tail is NaN where it is 0."""
    nc = difference * n ** 0.5 / sd
    return stats.nct.sf(critical, n - 1, nc) + np.nan_to_num(stats.nct.cdf(-critical, n - 1, nc))


mde = optimize.brentq(lambda d: power(d) - 0.8, 0.0, 100 * sd)
tests = {name: stats.ttest_1samp(test, figure) for name, figure in REFERENCES.items()}
adjusted = dict(zip(tests, holm([t.pvalue for t in tests.values()])))
references = [{"reference": name, "figure": figure, "difference": test.mean() - figure,
               "ci95_low": tests[name].confidence_interval().low - figure,
               "ci95_high": tests[name].confidence_interval().high - figure, "p": tests[name].pvalue,
               "p_holm": adjusted[name], "mde_80pct_power": mde} for name, figure in REFERENCES.items()]
write("references.csv", references)
write("runs.csv", rows)
write("history.csv", history)
write("summary.csv", summary)
for r in summary:
    print(f"{r['metric']}: {r['mean']:.4f} ± {r['std']:.4f} (n={r['n']}), 95% CI [{r['ci95_low']:.4f}, {r['ci95_high']:.4f}]")
for r in references:
    print(f"vs {r['reference']}: {r['difference']:+.4f} [{r['ci95_low']:+.4f}, {r['ci95_high']:+.4f}], "
          f"p {r['p']:.4f}, Holm {r['p_holm']:.4f}, MDE {r['mde_80pct_power']:.4f}")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(7, 4.2))
for colour, row in zip(("tab:blue", "tab:orange", "tab:green", "tab:red"), rows):
    arm = [h for h in history if h["run_id"] == row["run_id"]]
    ax.plot([h["epoch"] for h in arm], [h["accuracy"] for h in arm], "--", color=colour,
            label=f"seed {row['seed']}: training (augmented, dropout on)")
    ax.plot([h["epoch"] for h in arm], [h["val_accuracy"] for h in arm], "-", color=colour,
            label=f"seed {row['seed']}: validation, test {row['test_accuracy']:.4f}")
ax.set(xlabel="epoch", ylabel="accuracy", title=f"{experiment}: {len(rows)} seeds")
ax.grid(alpha=0.3)
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(out / "curves.png", dpi=110)
print(out / "curves.png")
