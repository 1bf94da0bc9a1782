"""Rebuild the reports under docs/data/ from their raw CSVs with the package's own functions.

The development store the studies ran in is not on this machine, so `alexnet-keras report PARENT` cannot
rerun them; this feeds `report.summarize`, `report.judge_claims` and `report.to_markdown` the same numbers
as run-like objects instead: each child's metrics from `ablation_runs.csv`, each tuning run's validation
accuracy from `tuning.csv`, the spec from the study file under experiments/. What the CSVs do not hold:
per-epoch series, so the epochs and gap claims read "not measurable (... a run without the metric)"; the
plateau column is the mean ± std of `ablation_runs.csv`'s `val_plateau`, the parameter counts the previous
`ablation.csv`'s; the study digest is the file's today. lrn-regimes/tuning.csv was copied by hand from its
first report's tuning table (the store is gone): the run ids of the rates not chosen were not recorded.

    python docs/data/rebuild_reports.py        # from the repository root; rewrites ablation.md/.csv, claims.md/.csv
"""

import csv
import json
import sys
from pathlib import Path
from types import SimpleNamespace

from alexnet_keras.experiments import report, stats
from alexnet_keras.experiments.study import load_study
from alexnet_keras.tables import csv_text
from alexnet_keras.tracking import CONFIG_DIGEST_TAG

HERE = Path(__file__).resolve().parent
STUDIES = {"plateau-cpu": "ablation_plateau_cpu", "powered-cpu": "ablation_powered_cpu",
           "activation-cpu": "ablation_activation_cpu", "pilot-cpu": "pilot_cpu",
           "sweep-best-vs-default-cpu": "sweep_best_vs_default_cpu", "lrn-regimes": "lrn_paper_regime_cpu"}


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open())) if path.is_file() else []


def _run(run_id: str, digest: str, metrics: dict) -> SimpleNamespace:
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, status="FINISHED", end_time=1),
                           data=SimpleNamespace(tags={CONFIG_DIGEST_TAG: digest}, metrics=metrics))


def rebuild(folder: Path, study_file: Path) -> report.Report:
    spec = json.loads(json.dumps(load_study(study_file).spec()))
    variants, first = {v["name"]: v for v in spec["variants"]}, str(spec["seeds"][0])
    tuning = _rows(folder / "tuning.csv")
    chosen = {r["variant"]: r["value"] for r in tuning if r["chosen"] == "true"}
    val = {(r["variant"], r["value"]): float(r["val_accuracy"]) for r in tuning}
    children, plateaus = [], {}
    for r in _rows(folder / "ablation_runs.csv"):
        v = variants[r["variant"]]
        digests = v["grid_digests"][chosen[v["name"]]] if "grid_digests" in v else v["config_digests"]
        metrics = {m: float(r[m]) for m, _, _ in report.METRICS}
        if r["seed"] == first and v["name"] in chosen:
            metrics["val_accuracy"] = val[v["name"], chosen[v["name"]]]
        children.append(_run(r["run_id"], digests[r["seed"]], metrics))
        plateaus.setdefault(v["name"], []).append(float(r["val_plateau"]))
    children += [_run(r["run"], variants[r["variant"]]["grid_digests"][r["value"]][first],
                      {"val_accuracy": float(r["val_accuracy"])}) for r in tuning if r["chosen"] != "true"]
    params = {r["variant"]: float(r["num_params"] or "nan") for r in _rows(folder / "ablation.csv")}
    summaries = report.summarize(spec, children)
    for s in summaries:
        s.plateau, s.num_params = stats.mean_std(plateaus.get(s.name, [])), params.get(s.name, s.num_params)
    claims = report.judge_claims(summaries)
    files = {"ablation.md": report.to_markdown(spec, summaries, claims),
             "ablation.csv": csv_text(report.csv_rows(summaries)),
             "claims.md": report.claims_table(claims), "claims.csv": csv_text(report.claim_rows(claims))}
    for name, text in files.items():
        (folder / name).write_text(text)
    return report.Report("", spec, summaries, claims, files["ablation.md"], files["ablation.csv"],
                         files["claims.csv"], "")


if __name__ == "__main__":
    root = HERE.parent.parent
    for name in sys.argv[1:] or STUDIES:
        rebuild(HERE / name, root / "experiments" / f"{STUDIES[name]}.yaml")
        print(f"rebuilt docs/data/{name}/")
