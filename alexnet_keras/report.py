"""The report of an ablation study, rebuilt from the MLflow store alone.

`build_report(parent_run_id)` is what a study runs at its end and what `alexnet-keras report ID`
runs: it reads the study's spec (study/study.json on the parent) and the FINISHED children, and logs
on the parent
  * reports/ablation.md and reports/ablation.csv: per variant, test accuracy / top-5 / final train
    accuracy / train time as mean ± std over seeds, the difference in test accuracy to the baseline
    with a 95% Welch confidence interval and the Welch t-test p-value, and the parameter count;
  * reports/ablation_runs.csv: one row per child run used;
  * figures/ablation_test_accuracy.png: bars with error bars, and the differences with their CIs;
  * figures/ablation_val_accuracy.png: validation accuracy per epoch, mean over seeds per variant;
and puts the Markdown table in the parent's description (the MLflow UI shows it on the run page).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

# (metric key, short column title, digits) in table order; the first is the one compared to baseline.
METRICS = (
    ("test_accuracy", "test acc", 4),
    ("test_top5_accuracy", "top-5", 4),
    ("final_train_accuracy", "train acc", 4),
    ("train_time_s", "train time (s)", 1),
)
PRIMARY = "test_accuracy"
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Welch:
    """`a` minus `b`: difference of means, its confidence interval, Welch's t, df and two-sided p."""

    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    t: float
    df: float


def welch(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Welch:
    """Welch's unequal-variance t-test and CI for mean(a) - mean(b). NaN where undefined (n < 2 in a
    group, or no variance at all)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    nan = float("nan")
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else nan
    if len(a) < 2 or len(b) < 2:
        return Welch(diff, nan, nan, nan, nan, nan)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Welch(diff, nan, nan, nan, nan, nan)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t = diff / se
    p = float(2.0 * stats.t.sf(abs(t), df))
    q = float(stats.t.ppf(0.5 + confidence / 2.0, df))
    return Welch(diff, diff - q * se, diff + q * se, p, float(t), float(df))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for a single value)."""
    x = np.asarray(values, dtype=float)
    if not len(x):
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else float("nan")


@dataclass
class VariantSummary:
    name: str
    factors: dict[str, str]
    is_baseline: bool
    seeds: list[int] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)   # metric -> one value per seed
    failed: int = 0                   # seeds with no FINISHED child but a FAILED / KILLED one
    missing: int = 0                  # seeds never run
    num_params: float = float("nan")
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    vs_baseline: Welch | None = None


@dataclass
class Report:
    parent_run_id: str
    spec: dict[str, Any]
    variants: list[VariantSummary]
    markdown: str
    csv: str
    runs_csv: str
    curves: dict[str, tuple[list[int], list[float], list[float]]]


def summarize(spec: dict[str, Any], children: Sequence[Any]) -> list[VariantSummary]:
    """Group the children by (variant, seed) through their config digest; the latest FINISHED wins."""
    by_digest = {d: (v["name"], int(seed)) for v in spec["variants"] for seed, d in v["config_digests"].items()}
    finished: dict[tuple[str, int], Any] = {}
    broken: set[tuple[str, int]] = set()
    for run in children:
        key = by_digest.get(run.data.tags.get("alexnet_keras.config_digest"))
        if key is None:
            continue
        if run.info.status == "FINISHED":
            if key not in finished or (run.info.end_time or 0) > (finished[key].info.end_time or 0):
                finished[key] = run
        elif run.info.status in ("FAILED", "KILLED"):
            broken.add(key)
    out = []
    for v in spec["variants"]:
        summary = VariantSummary(v["name"], dict(v["factors"]), bool(v["is_baseline"]),
                                 values={m: [] for m, _, _ in METRICS})
        for seed in sorted(int(s) for s in v["config_digests"]):
            run = finished.get((v["name"], seed))
            if run is None:
                summary.failed += (v["name"], seed) in broken
                summary.missing += (v["name"], seed) not in broken
                continue
            summary.seeds.append(seed)
            summary.run_ids.append(run.info.run_id)
            for metric, _, _ in METRICS:
                summary.values[metric].append(float(run.data.metrics.get(metric, float("nan"))))
            summary.num_params = float(run.data.metrics.get("num_params", summary.num_params))
        summary.stats = {m: mean_std(summary.values[m]) for m, _, _ in METRICS}
        out.append(summary)
    baseline = next((s for s in out if s.is_baseline), None)
    if baseline is not None:
        for s in out:
            if not s.is_baseline:
                s.vs_baseline = welch(s.values[PRIMARY], baseline.values[PRIMARY])
    return out


def _fmt(x: float, digits: int) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _pm(stat: tuple[float, float], digits: int) -> str:
    mean, std = stat
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {_fmt(std, digits)}" if math.isfinite(std) else f"{mean:.{digits}f}"


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def csv_rows(variants: Sequence[VariantSummary]) -> list[dict[str, Any]]:
    rows = []
    for s in variants:
        row: dict[str, Any] = {"variant": s.name, "is_baseline": s.is_baseline,
                               **{f"factor.{k}": v for k, v in s.factors.items()},
                               "n_seeds": len(s.seeds), "n_failed": s.failed, "n_missing": s.missing,
                               "num_params": "" if math.isnan(s.num_params) else int(s.num_params)}
        for metric, _, _ in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = s.stats[metric]
        w = s.vs_baseline
        row.update({f"delta_{PRIMARY}": w.diff if w else "", "delta_ci_low": w.ci_low if w else "",
                    "delta_ci_high": w.ci_high if w else "", "p_value": w.p_value if w else "",
                    "welch_df": w.df if w else ""})
        rows.append(row)
    return rows


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    names = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def to_markdown(spec: dict[str, Any], variants: Sequence[VariantSummary]) -> str:
    n_expected = sum(len(v["config_digests"]) for v in spec["variants"])
    n_done = sum(len(s.seeds) for s in variants)
    n_failed = sum(s.failed for s in variants)
    roles = spec.get("hyperparameters", {})
    axes = ", ".join(f"{a} (baseline {d['baseline']})" for a, d in spec["axes"].items())
    lines = [f"## Ablation study `{spec['name']}`", ""]
    if spec.get("description"):
        lines += [spec["description"], ""]
    lines += [
        f"**{n_done}/{n_expected} runs finished**" + (f", {n_failed} failed" if n_failed else "")
        + f" · design: {spec['design']} · seeds: {', '.join(map(str, spec['seeds']))} "
        f"· study digest `{spec['digest']}`",
        "",
        f"Scientific (the axes): {axes}. Nuisance: {', '.join(roles.get('nuisance', ['seed']))}. "
        f"Fixed: every other option, at the base config's value (study/study.json).",
        "",
        "| variant | n | test acc | Δ test acc vs baseline [95% CI] | p | top-5 | final train acc "
        "| train time (s) | params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    digits = {m: d for m, _, d in METRICS}
    for s in variants:
        n = str(len(s.seeds)) + (f" ({s.failed} failed)" if s.failed else "") + \
            (f" ({s.missing} not run)" if s.missing else "")
        w = s.vs_baseline
        if s.is_baseline:
            delta, p = "(baseline)", ""
        elif w is None or not math.isfinite(w.diff):
            delta, p = "n/a", "n/a"
        else:
            ci = f" [{w.ci_low:+.4f}, {w.ci_high:+.4f}]" if math.isfinite(w.ci_low) else ""
            delta, p = f"{w.diff:+.4f}{ci}", _p(w.p_value)
        name = f"**{s.name}**" if s.is_baseline else s.name
        params = "n/a" if math.isnan(s.num_params) else f"{int(s.num_params):,}"
        lines.append(f"| {name} | {n} | {_pm(s.stats['test_accuracy'], digits['test_accuracy'])} | {delta} "
                     f"| {p} | {_pm(s.stats['test_top5_accuracy'], 4)} "
                     f"| {_pm(s.stats['final_train_accuracy'], 4)} | {_pm(s.stats['train_time_s'], 1)} "
                     f"| {params} |")
    lines += ["", f"Mean ± sample std (ddof=1) over seeds. Δ = variant − baseline mean test accuracy with a "
              f"{int(CONFIDENCE * 100)}% Welch confidence interval; p = two-sided Welch t-test (n/a with fewer "
              f"than 2 seeds per group or no variance). Figures: figures/ablation_test_accuracy.png, "
              f"figures/ablation_val_accuracy.png; raw numbers: reports/ablation.csv, reports/ablation_runs.csv."]
    return "\n".join(lines) + "\n"


def runs_csv(variants: Sequence[VariantSummary]) -> str:
    rows = []
    for s in variants:
        for i, seed in enumerate(s.seeds):
            rows.append({"variant": s.name, "seed": seed, "run_id": s.run_ids[i],
                         **{m: s.values[m][i] for m, _, _ in METRICS}})
    return to_csv(rows) if rows else "variant,seed,run_id\n"


# --- figures --------------------------------------------------------------------------------------

def bar_chart(variants: Sequence[VariantSummary], title: str = ""):
    from . import figures  # noqa: F401  (selects the headless Agg backend)
    import matplotlib.pyplot as plt

    n = len(variants)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.5 * n + 1.8), sharey=True)
    y = np.arange(n)[::-1]
    colors = ["tab:orange" if s.is_baseline else "tab:blue" for s in variants]
    means = [s.stats[PRIMARY][0] for s in variants]
    stds = [0.0 if not math.isfinite(s.stats[PRIMARY][1]) else s.stats[PRIMARY][1] for s in variants]
    left.barh(y, np.nan_to_num(means), xerr=stds, color=colors, alpha=0.8, capsize=4)
    for yi, s in zip(y, variants):
        left.scatter(s.values[PRIMARY], [yi] * len(s.values[PRIMARY]), color="black", s=12, zorder=3)
    left.set_yticks(y, [s.name for s in variants])
    left.set_xlabel("test accuracy (mean ± std over seeds; dots: seeds)")
    left.grid(axis="x", alpha=0.3)
    for yi, s in zip(y, variants):
        w = s.vs_baseline
        if s.is_baseline:
            right.scatter([0.0], [yi], color="tab:orange", marker="D")
        elif w is not None and math.isfinite(w.diff):
            if math.isfinite(w.ci_low):
                right.errorbar([w.diff], [yi], xerr=[[w.diff - w.ci_low], [w.ci_high - w.diff]], fmt="o",
                               color="tab:blue", capsize=4)
            else:
                right.scatter([w.diff], [yi], color="tab:blue")
    right.axvline(0.0, color="gray", linestyle="--", linewidth=1)
    right.set_xlabel(f"Δ test accuracy vs baseline ({int(CONFIDENCE * 100)}% Welch CI)")
    right.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def curves_figure(curves: dict[str, tuple[list[int], list[float], list[float]]], baseline: str | None,
                  title: str = ""):
    from . import figures  # noqa: F401
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, (epochs, mean, std) in curves.items():
        if not epochs:
            continue
        style = {"color": "black", "linewidth": 2.5} if name == baseline else {"linewidth": 1.5}
        line, = ax.plot(epochs, mean, marker="o", markersize=3, label=name, **style)
        lo, hi = np.asarray(mean) - np.nan_to_num(std), np.asarray(mean) + np.nan_to_num(std)
        ax.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.12)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (mean over seeds, band ± std)")
    ax.grid(alpha=0.3)
    if any(epochs for epochs, _, _ in curves.values()):
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def _mean_curve(histories: Sequence[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float]]:
    """Mean and std per epoch over the seeds that reached that epoch (step = epoch index)."""
    per_step: dict[int, list[float]] = {}
    for history in histories:
        for step, value in dict(history).items():
            per_step.setdefault(step, []).append(value)
    steps = sorted(per_step)
    stats = [mean_std(per_step[s]) for s in steps]
    return [s + 1 for s in steps], [m for m, _ in stats], [sd for _, sd in stats]


# --- from the store to the parent run ---------------------------------------------------------------

def load_spec(parent_run_id: str) -> dict[str, Any]:
    from . import tracking
    from .ablate import ROLE_TAG, SPEC_ARTIFACT

    run = tracking.get_run(parent_run_id)
    if run.data.tags.get(ROLE_TAG) != "parent":
        raise tracking.TrackingError(f"run {parent_run_id} is not the parent run of an ablation study (no "
                                     f"{ROLE_TAG}=parent tag); pass the id of the study's parent run.")
    try:
        path = tracking.download_artifact(parent_run_id, SPEC_ARTIFACT)
    except Exception as err:
        raise tracking.TrackingError(f"run {parent_run_id} has no {SPEC_ARTIFACT} artifact: {err}") from None
    return json.loads(path.read_text())


def build_report(parent_run_id: str) -> Report:
    """Rebuild the study's tables and figures from the store and log them on the parent run."""
    from mlflow.tracking import MlflowClient

    from . import tracking

    spec = load_spec(parent_run_id)
    children = tracking.child_runs(parent_run_id)
    variants = summarize(spec, children)
    curves = {s.name: _mean_curve([tracking.metric_history(r, "val_accuracy") for r in s.run_ids])
              for s in variants}
    markdown = to_markdown(spec, variants)
    table = to_csv(csv_rows(variants))
    per_run = runs_csv(variants)

    client = MlflowClient()
    client.log_text(parent_run_id, markdown, "reports/ablation.md")
    client.log_text(parent_run_id, table, "reports/ablation.csv")
    client.log_text(parent_run_id, per_run, "reports/ablation_runs.csv")
    import matplotlib.pyplot as plt

    for fig, name in ((bar_chart(variants, title=f"{spec['name']}: test accuracy"),
                       "figures/ablation_test_accuracy.png"),
                      (curves_figure(curves, spec.get("baseline"), title=f"{spec['name']}: validation accuracy"),
                       "figures/ablation_val_accuracy.png")):
        client.log_figure(parent_run_id, fig, name)
        plt.close(fig)
    client.set_tag(parent_run_id, "mlflow.note.content", markdown)   # the run page's description
    return Report(parent_run_id, spec, variants, markdown, table, per_run, curves)
