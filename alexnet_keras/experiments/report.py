"""The report of an ablation study, rebuilt from the MLflow store alone, and its verdict on the paper.

`build_report(parent_run_id)` is what a study runs at its end and what `alexnet-keras report ID`
runs: it reads the study's spec (study/study.json on the parent) and the FINISHED children (through
tracking.py; no MLflow here), and logs on the parent
  * reports/ablation.md (also the parent's description, shown on the MLflow run page) and
    reports/ablation.csv (every number at full precision; also the MLflow table
    reports/ablation_table.json, shown in the UI's artifact view): per variant, test accuracy / top-5 /
    final train accuracy / train time as mean ± std over seeds; the difference in test accuracy to the
    baseline with its 95 % Welch interval, the Welch p, the Holm-adjusted p that decides "significant",
    Dunnett's p beside it, the minimum detectable effect (MDE) and the reading of the difference
    (significant / no effect ≥ MDE / below resolution); the validation-accuracy plateau (change over
    the last fifth of training); the parameter count. The rules are in stats.py's docstring.
  * reports/claims.md (also at the end of ablation.md), reports/claims.csv (and the MLflow table
    reports/claims_table.json): the verdict on each claim of Krizhevsky et al. (2012) (`CLAIMS`: the
    claims as data, measured as `CLAIM_METRICS` says; verdict rules in stats.py). Claims the study's
    variants cannot measure are listed as "not in this study" (kept, so that what was not tested shows).
  * reports/ablation_runs.csv: one row per child run used; reports/tuning.csv with a nuisance grid;
  * figures/ablation_test_accuracy.png: bars with error bars, and the differences with their CIs;
  * figures/ablation_val_accuracy.png: validation accuracy per epoch, mean over seeds per variant.

Nuisance tuning per arm (study files with `nuisance_grid`, e.g. `{learning_rate: [0.01, 0.02, 0.05]}`,
copied to the spec's top level as `nuisance_grid`). The spec then holds, per variant,
`grid_digests: {label: {seed: config digest}}` for every grid value x seed, in the grid's order (label:
the value as text, e.g. "0.01"; with several keys "k1=v1,k2=v2"). The runs at the first seed are the
tuning runs: the report recomputes the arm's value from the store
as the label whose FINISHED tuning run has the highest final `val_accuracy` (never test; the first
label listed on ties), and uses only that label's children (the tuning run included) for every
statistic (`choose_grid_value`, which `ablate` uses too). The study table then has a column with
each arm's value, and a table per arm gives the validation accuracy of each grid value. A spec
without `grid_digests` (studies logged before, or without a grid) uses `config_digests` as always.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import stats
from .stats import ALPHA, CONFIDENCE, POWER, Welch
from ..tables import cell, csv_text, markdown_table

# (metric key, short column title, digits) in table order; the first is the one compared to baseline.
METRICS = (
    ("test_accuracy", "test acc", 4),
    ("test_top5_accuracy", "top-5", 4),
    ("final_train_accuracy", "train acc", 4),
    ("train_time_s", "train time (s)", 1),
)
PRIMARY = "test_accuracy"
# Per-epoch series the report reads: validation accuracy (curves, plateau, convergence), training
# accuracy (epochs to 25 % training error).
VAL_ACCURACY = "val_accuracy"
TRAIN_ACCURACY = "accuracy"

# history(run_id, metric key) -> [(step, value)], step = epoch index (tracking.metric_history).
History = Callable[[str, str], Sequence[tuple[int, float]]]


# --- the paper's claims, as data ------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    """One claim of Krizhevsky et al. (2012), measured as the paper states it: arm `a` minus arm `b`
    (each arm: the options its variant has, all else equal between the two) in `metric` (`CLAIM_METRICS`).
    `paper` is the paper's figure as that signed difference (a ratio a/b for ratio metrics), None when
    the paper gives only a direction; `direction` is the paper's sign of a - b (of log(a/b) for ratios).
    `requires`: options both arms must have for the comparison to mean what the paper means."""

    claim: str
    a: Mapping[str, Any]
    b: Mapping[str, Any]
    metric: str
    paper: float | None
    direction: int
    paper_text: str
    requires: Mapping[str, Any] = field(default_factory=dict)


LRN_ON, LRN_OFF = {"lrn": True, "batchnorm": False}, {"lrn": False, "batchnorm": False}
CLAIMS = (
    Claim("LRN lowers top-1 error (ImageNet)", LRN_ON, LRN_OFF, "top1_error", -1.4, -1, "-1.4 points"),
    Claim("LRN lowers top-5 error (ImageNet)", LRN_ON, LRN_OFF, "top5_error", -1.2, -1, "-1.2 points"),
    Claim("LRN lowers the CIFAR-10 four-layer net's test error", LRN_ON, LRN_OFF, "top1_error", -2.0, -1,
          "13 % -> 11 % (-2 points)"),
    Claim("Overlapping pooling lowers top-1 error", {"pool": "overlapping"}, {"pool": "non_overlapping"},
          "top1_error", -0.4, -1, "-0.4 points"),
    Claim("Overlapping pooling lowers top-5 error", {"pool": "overlapping"}, {"pool": "non_overlapping"},
          "top5_error", -0.3, -1, "-0.3 points"),
    # pca_color acts only in the paper's input recipe with augmentation on.
    Claim("PCA colour augmentation lowers top-1 error by over 1 point", {"pca_color": True},
          {"pca_color": False}, "top1_error", -1.0, -1, "< -1 point",
          requires={"recipe": "paper", "augment": True}),
    Claim("Dropout reduces the train-test gap (overfitting)", {"dropout": 0.5}, {"dropout": 0.0},
          "train_test_gap", None, -1, "smaller gap (no figure)"),
    Claim("Dropout roughly doubles the epochs needed to converge", {"dropout": 0.5}, {"dropout": 0.0},
          "epochs_to_converge", 2.0, 1, "about 2x"),
    Claim("ReLU reaches 25 % training error about 6x sooner than tanh", {"activation": "tanh"},
          {"activation": "relu"}, "epochs_to_25pct_train_error", 6.0, 1, "6x (tanh / ReLU)"),
)

# metric -> (what it is, unit, ratio?). Errors and gaps are in percentage points; the epochs-to-
# threshold metrics are compared as ratios (Welch on log epochs: the CI is one of the ratio of
# geometric means).
CONVERGED_WITHIN = 0.01          # "converged": validation accuracy within 1 point of the run's best
TRAIN_ERROR_TARGET = 0.25        # the paper's Figure 1: epochs to 25 % training error
CLAIM_METRICS = {
    "top1_error": ("test top-1 error, 100 (1 - test_accuracy)", "points", False),
    "top5_error": ("test top-5 error, 100 (1 - test_top5_accuracy)", "points", False),
    "train_test_gap": ("100 (final_train_accuracy - test_accuracy)", "points", False),
    "epochs_to_converge": ("epochs until val_accuracy first comes within 1 point of the run's best "
                           "(interpolated), counted only when that is before the last fifth of training "
                           "and val_accuracy stays there (else the run has not converged: censored)", "x", True),
    "epochs_to_25pct_train_error": ("epochs until the per-epoch training accuracy first reaches 75 % "
                                    "(interpolated)", "x", True),
}


# --- summaries -------------------------------------------------------------------------------------

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
    options: dict[str, Any] = field(default_factory=dict)           # every option of the variant
    val_histories: list[list[float]] = field(default_factory=list)  # val_accuracy per epoch, per seed
    plateau: tuple[float, float] = (float("nan"), float("nan"))     # mean, std over seeds
    mde: float = float("nan")
    p_holm: float = float("nan")
    p_dunnett: float = float("nan")
    reading: str = ""
    tuning: dict[str, float] = field(default_factory=dict)   # grid label -> final val_accuracy (first seed)
    tuning_runs: dict[str, str] = field(default_factory=dict)   # grid label -> run id or status
    chosen: str | None = None                                # the grid label used for the statistics

    @property
    def significant(self) -> bool:
        return math.isfinite(self.p_holm) and self.p_holm < ALPHA


@dataclass
class ClaimResult:
    claim: Claim
    a: str | None = None              # variant names of the two arms; None: not in this study
    b: str | None = None
    n_a: int = 0
    n_b: int = 0
    welch: Welch | None = None        # a - b in the claim's units (log units for ratio metrics)
    mde: float = float("nan")
    p_holm: float = float("nan")
    verdict: str = stats.NOT_IN_STUDY
    lower_bound: bool = False         # the slower arm's epochs were cut at the epochs trained
    note: str = ""

    @property
    def ratio(self) -> bool:
        return CLAIM_METRICS[self.claim.metric][2]

    @property
    def paper_in_interval(self) -> bool | None:
        w, paper = self.welch, self.claim.paper
        if paper is None or w is None or not math.isfinite(w.ci_low):
            return None
        paper = math.log(paper) if self.ratio else paper
        return bool(w.ci_low <= paper <= w.ci_high)


@dataclass
class Report:
    parent_run_id: str
    spec: dict[str, Any]
    variants: list[VariantSummary]
    markdown: str
    csv: str
    runs_csv: str
    curves: dict[str, tuple[list[int], list[float], list[float]]]
    claims: list[ClaimResult] = field(default_factory=list)
    claims_markdown: str = ""
    claims_csv: str = ""
    tuning_csv: str = ""


def _series(history: History | None, run_id: str, key: str) -> list[float]:
    """A run's per-epoch values in step order (the last value logged for a step wins)."""
    if history is None:
        return []
    by_step = dict(history(run_id, key))
    return [by_step[step] for step in sorted(by_step)]


def variant_options(spec: Mapping[str, Any], variant: Mapping[str, Any]) -> dict[str, Any]:
    """Every option of a variant: the base config's leaves (flattened) under the variant's overrides.
    Specs without `base_config` give the overrides alone."""
    options: dict[str, Any] = {}
    for key, value in (spec.get("base_config") or {}).items():
        if isinstance(value, Mapping):
            options.update(value)
        else:
            options[key] = value
    options.update(variant.get("overrides") or {})
    return options


def _digest_of(run: Any) -> str | None:
    from ..tracking import CONFIG_DIGEST_TAG

    return run.data.tags.get(CONFIG_DIGEST_TAG)


def _index(children: Sequence[Any]) -> tuple[dict[str, Any], set[str]]:
    """{config digest: the latest FINISHED child}, and the digests with only FAILED / KILLED children."""
    finished: dict[str, Any] = {}
    broken: set[str] = set()
    for run in children:
        digest = _digest_of(run)
        if digest is None:
            continue
        if run.info.status == "FINISHED":
            if digest not in finished or (run.info.end_time or 0) > (finished[digest].info.end_time or 0):
                finished[digest] = run
        elif run.info.status in ("FAILED", "KILLED"):
            broken.add(digest)
    return finished, broken - set(finished)


def _tune(spec: Mapping[str, Any], variant: Mapping[str, Any], summary: VariantSummary,
          finished: Mapping[str, Any], broken: set[str]) -> dict[int, str | None]:
    """The (seed -> digest) plan of a variant: its `config_digests`, or, with a nuisance grid, the
    digests of the grid label whose first-seed run has the best final validation accuracy."""
    grid = variant.get("grid_digests")
    if not grid:
        return {int(seed): digest for seed, digest in variant["config_digests"].items()}
    first = str(spec["seeds"][0])
    runs = {label: finished.get(digests.get(first)) for label, digests in grid.items()}
    summary.chosen, summary.tuning = choose_grid_value(runs)
    for label, digests in grid.items():
        run = runs[label]
        summary.tuning_runs[label] = (run.info.run_id if run is not None
                                      else "failed" if digests.get(first) in broken else "not run")
    if summary.chosen is None:
        return {int(seed): None for seed in spec["seeds"]}
    return {int(seed): digest for seed, digest in grid[summary.chosen].items()}


def choose_grid_value(tuning_runs: Mapping[str, Any]) -> tuple[str | None, dict[str, float]]:
    """An arm's nuisance value, chosen on validation: `tuning_runs` maps each grid label (in the grid's
    order) to its FINISHED tuning run or None. Returns the label whose run has the highest final
    `val_accuracy` (the first listed on ties; None when no run has one) and each label's value (NaN
    without one). Test metrics play no part. `ablate` runs the arm's other seeds at the label this gives."""
    scores = {label: float(run.data.metrics.get(VAL_ACCURACY, float("nan"))) if run is not None else float("nan")
              for label, run in tuning_runs.items()}
    scored = [(label, value) for label, value in scores.items() if math.isfinite(value)]
    if not scored:
        return None, scores
    best = max(value for _, value in scored)
    return next(label for label, value in scored if value == best), scores


def summarize(spec: dict[str, Any], children: Sequence[Any], history: History | None = None) -> list[VariantSummary]:
    """Per variant: its children (through their config digest; the latest FINISHED wins), metrics and
    statistics against the baseline. `history` reads per-epoch metrics (None: no curves or plateau)."""
    finished, broken = _index(children)
    out = []
    for v in spec["variants"]:
        summary = VariantSummary(v["name"], dict(v["factors"]), bool(v["is_baseline"]),
                                 values={m: [] for m, _, _ in METRICS}, options=variant_options(spec, v))
        plan = _tune(spec, v, summary, finished, broken)
        for seed in sorted(plan):
            run = finished.get(plan[seed]) if plan[seed] is not None else None
            if run is None:
                summary.failed += plan[seed] in broken
                summary.missing += plan[seed] not in broken
                continue
            summary.seeds.append(seed)
            summary.run_ids.append(run.info.run_id)
            for metric, _, _ in METRICS:
                summary.values[metric].append(float(run.data.metrics.get(metric, float("nan"))))
            summary.num_params = float(run.data.metrics.get("num_params", summary.num_params))
            summary.val_histories.append(_series(history, run.info.run_id, VAL_ACCURACY))
        summary.stats = {m: stats.mean_std(summary.values[m]) for m, _, _ in METRICS}
        summary.plateau = stats.mean_std([stats.plateau(h) for h in summary.val_histories if len(h) > 1])
        out.append(summary)
    _compare(out)
    return out


def _compare(variants: Sequence[VariantSummary]) -> None:
    """Welch, Holm, Dunnett, MDE and reading of each variant against the baseline (in place)."""
    baseline = next((s for s in variants if s.is_baseline), None)
    if baseline is None:
        return
    others = [s for s in variants if not s.is_baseline]
    base_values = baseline.values[PRIMARY]
    base_sd = baseline.stats[PRIMARY][1]
    for s in others:
        s.vs_baseline = stats.welch(s.values[PRIMARY], base_values)
        s.mde = stats.minimum_detectable_effect(base_sd, len(s.values[PRIMARY]), len(base_values))
    for s, p in zip(others, stats.holm([s.vs_baseline.p_value for s in others])):
        s.p_holm = p
    ran = [s for s in others if s.values[PRIMARY]]
    dunnett = stats.dunnett({s.name: s.values[PRIMARY] for s in ran}, base_values)
    for s in ran:
        s.p_dunnett = dunnett[s.name]
    for s in others:
        s.reading = stats.reading(s.vs_baseline, s.p_holm, s.mde)


# --- claims ----------------------------------------------------------------------------------------

def _same(x: Any, y: Any) -> bool:
    if isinstance(x, bool) or isinstance(y, bool):
        return isinstance(x, bool) and isinstance(y, bool) and x == y
    if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        return float(x) == float(y)
    return x == y


def _has(options: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    return all(key in options and _same(options[key], value) for key, value in wanted.items())


def _arms(claim: Claim, variants: Sequence[VariantSummary]) -> tuple[VariantSummary, VariantSummary] | None:
    """The two variants that differ only in the claim's options, preferring a pair with the baseline,
    then the pair closest to it (fewest factors away); None if the study has no such pair."""
    keys = set(claim.a) | set(claim.b)
    pairs = []
    for a in variants:
        if not (_has(a.options, claim.a) and _has(a.options, claim.requires)):
            continue
        for b in variants:
            if b is a or not (_has(b.options, claim.b) and _has(b.options, claim.requires)):
                continue
            rest = (set(a.options) | set(b.options)) - keys
            if all(_same(a.options.get(k), b.options.get(k)) for k in rest):
                pairs.append((a, b))
    if not pairs:
        return None
    baseline = next((s.factors for s in variants if s.is_baseline), {})

    def distance(pair) -> tuple[int, int]:
        away = sum(pair[i].factors.get(axis) != value for i in (0, 1) for axis, value in baseline.items())
        return (0 if any(s.is_baseline for s in pair) else 1, away)

    return min(pairs, key=distance)


def _claim_values(claim: Claim, arm: VariantSummary, history: History | None) -> list[float]:
    """The claim's metric for each run of an arm (epochs metrics: inf where the threshold is never met)."""
    metric = claim.metric
    if metric == "top1_error":
        return [100.0 * (1.0 - x) for x in arm.values["test_accuracy"]]
    if metric == "top5_error":
        return [100.0 * (1.0 - x) for x in arm.values["test_top5_accuracy"]]
    if metric == "train_test_gap":
        return [100.0 * (t - x) for t, x in zip(arm.values["final_train_accuracy"], arm.values["test_accuracy"])]
    if metric == "epochs_to_converge":
        return [stats.epochs_to_converge(h, CONVERGED_WITHIN) for h in arm.val_histories]
    if metric == "epochs_to_25pct_train_error":
        series = [_series(history, run_id, TRAIN_ACCURACY) for run_id in arm.run_ids]
        return [stats.epochs_to(h, 1.0 - TRAIN_ERROR_TARGET) if h else float("nan") for h in series]
    raise ValueError(f"unknown claim metric {metric!r}; known: {', '.join(CLAIM_METRICS)}")


def _censored_at(arm: VariantSummary, history: History | None, claim: Claim) -> list[float]:
    """Per run, the epochs a censored run is known to need at least: the epochs trained for a threshold
    never reached; the epochs before the last fifth for a run that has not converged."""
    if claim.metric == "epochs_to_converge":
        return [float(len(h) - stats.tail_length(len(h))) if len(h) > 1 else float("nan")
                for h in arm.val_histories]
    return [float(len(_series(history, run_id, TRAIN_ACCURACY))) for run_id in arm.run_ids]


def judge_claims(variants: Sequence[VariantSummary], history: History | None = None,
                 claims: Sequence[Claim] = CLAIMS) -> list[ClaimResult]:
    """A verdict per claim (stats.verdict): arms found by their options, Welch on the claim's metric
    (log values for ratios), the MDE from the spread of the arm that is the study's baseline (else the
    pooled spread of the two), Holm over the claims this study measures."""
    results = []
    for claim in claims:
        result = ClaimResult(claim)
        results.append(result)
        pair = _arms(claim, variants)
        if pair is None:
            continue
        arm_a, arm_b = pair
        result.a, result.b = arm_a.name, arm_b.name
        values_a, values_b = _claim_values(claim, arm_a, history), _claim_values(claim, arm_b, history)
        result.n_a, result.n_b = len(values_a), len(values_b)
        if CLAIM_METRICS[claim.metric][2]:   # epochs to a threshold: ratio of geometric means
            slower, faster = (values_a, values_b) if claim.direction > 0 else (values_b, values_a)
            if any(math.isinf(x) for x in faster):
                result.note = "a run of the faster arm never reached the threshold"
                result.verdict = stats.NOT_MEASURABLE
                continue
            if any(math.isinf(x) for x in slower):
                result.lower_bound = True
                result.note = ("some runs of the slower arm never reached the threshold: the epochs they "
                               "are known to need at least stand in, so the ratio is a lower bound")
                cut = _censored_at(arm_a if slower is values_a else arm_b, history, claim)
                slower[:] = [c if math.isinf(x) else x for x, c in zip(slower, cut)]
            values_a, values_b = _logs(values_a), _logs(values_b)
        if not (np.all(np.isfinite(values_a)) and np.all(np.isfinite(values_b))):
            result.verdict = stats.NOT_MEASURABLE
            result.note = result.note or "a run lacks the metric"
            continue
        result.welch = stats.welch(values_a, values_b)
        spread = values_a if arm_a.is_baseline else values_b if arm_b.is_baseline else None
        sd = (stats.mean_std(spread)[1] if spread is not None
              else _pooled_sd(values_a, values_b))
        result.mde = stats.minimum_detectable_effect(sd, len(values_a), len(values_b))
    measured = [r for r in results if r.welch is not None]
    for result, p in zip(measured, stats.holm([r.welch.p_value for r in measured])):
        result.p_holm = p
    for result in measured:
        paper = result.claim.paper
        if paper is not None and result.ratio:
            paper = math.log(paper)
        result.verdict = stats.verdict(result.welch, result.p_holm, result.mde, paper, result.claim.direction,
                                       lower_bound=result.lower_bound)
    return results


def _logs(values: Sequence[float]) -> list[float]:
    return [math.log(x) if x > 0 else float("nan") for x in values]


def _pooled_sd(a: Sequence[float], b: Sequence[float]) -> float:
    dof = len(a) + len(b) - 2
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    return math.sqrt(((len(a) - 1) * np.var(a, ddof=1) + (len(b) - 1) * np.var(b, ddof=1)) / dof)


# --- tables ----------------------------------------------------------------------------------------

def _pm(stat: tuple[float, float], digits: int) -> str:
    mean, std = stat
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {cell(std, digits)}" if math.isfinite(std) else f"{mean:.{digits}f}"


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _signed(x: float, digits: int) -> str:
    return f"{x:+.{digits}f}" if math.isfinite(x) else "n/a"


def csv_rows(variants: Sequence[VariantSummary]) -> list[dict[str, Any]]:
    """The study table at full precision, one row per variant (None where a cell does not apply)."""
    rows = []
    grid = any(s.tuning for s in variants)
    for s in variants:
        row: dict[str, Any] = {"variant": s.name, "is_baseline": s.is_baseline,
                               **{f"factor.{k}": v for k, v in s.factors.items()},
                               "n_seeds": len(s.seeds), "n_failed": s.failed, "n_missing": s.missing,
                               "num_params": None if math.isnan(s.num_params) else int(s.num_params)}
        if grid:
            row["nuisance_value"] = s.chosen
        for metric, _, _ in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = s.stats[metric]
        w = s.vs_baseline
        row.update({f"delta_{PRIMARY}": w.diff if w else None, "delta_ci_low": w.ci_low if w else None,
                    "delta_ci_high": w.ci_high if w else None, "p_value": w.p_value if w else None,
                    "welch_df": w.df if w else None,
                    "p_holm": None if s.is_baseline else s.p_holm,
                    "significant_holm": None if s.is_baseline else s.significant,
                    "p_dunnett": None if s.is_baseline else s.p_dunnett,
                    "mde": None if s.is_baseline else s.mde,
                    "reading": None if s.is_baseline else s.reading,
                    "val_plateau_mean": s.plateau[0], "val_plateau_std": s.plateau[1]})
        rows.append(row)
    return rows


def _mde_text(variants: Sequence[VariantSummary]) -> str:
    baseline = next((s for s in variants if s.is_baseline), None)
    others = [s for s in variants if not s.is_baseline and math.isfinite(s.mde)]
    if baseline is None or not others:
        return ("Minimum detectable effect: n/a (it needs >= 2 seeds per group and a baseline whose seeds "
                "spread).")
    mdes = sorted({round(s.mde, 6) for s in others})
    value = cell(mdes[0], 4) if len(mdes) == 1 else f"{cell(mdes[0], 4)}–{cell(mdes[-1], 4)}"
    counts = sorted({len(s.seeds) for s in others})
    return (f"Minimum detectable effect (MDE) of a difference in test accuracy: **{value}** (two-sided "
            f"t-test, α = {ALPHA}, power {int(POWER * 100)} %, baseline seed std "
            f"{cell(baseline.stats[PRIMARY][1], 4)}, n = {len(baseline.seeds)} baseline vs "
            f"{'/'.join(map(str, counts))} variant seeds).")


def _reading_text(variants: Sequence[VariantSummary]) -> str:
    groups: dict[str, list[str]] = {}
    for s in variants:
        if not s.is_baseline:
            label = s.reading
            if s.reading == stats.NO_EFFECT:
                label = f"no effect at resolution {cell(s.mde, 4)}"
            groups.setdefault(label, []).append(f"`{s.name}`")
    order = [stats.SIGNIFICANT] + sorted(k for k in groups if k.startswith("no effect")) + \
        [stats.BELOW_RESOLUTION, stats.NOT_AVAILABLE]
    words = {stats.SIGNIFICANT: "Significant after Holm", stats.BELOW_RESOLUTION:
             "Below resolution (the interval still reaches ±MDE: too small to see with these seeds)",
             stats.NOT_AVAILABLE: "Not testable (< 2 seeds in a group, or no spread)"}
    parts = []
    for key in order:
        if key in groups:
            title = words.get(key, key[0].upper() + key[1:] + " (the interval lies inside ±MDE)")
            parts.append(f"{title}: {', '.join(groups[key])}.")
    return " ".join(parts) if parts else "No variant to compare with the baseline."


def study_table(spec: dict[str, Any], variants: Sequence[VariantSummary]) -> str:
    digits = {m: d for m, _, d in METRICS}
    rows = []
    for s in variants:
        n = str(len(s.seeds)) + (f" ({s.failed} failed)" if s.failed else "") + \
            (f" ({s.missing} not run)" if s.missing else "")
        w = s.vs_baseline
        row = {"variant": f"**{s.name}**" if s.is_baseline else s.name, "n": n,
               "test": _pm(s.stats[PRIMARY], digits[PRIMARY]),
               "top5": _pm(s.stats["test_top5_accuracy"], 4), "train": _pm(s.stats["final_train_accuracy"], 4),
               "time": _pm(s.stats["train_time_s"], 1),
               "plateau": _pm(s.plateau, 4),
               "params": "n/a" if math.isnan(s.num_params) else f"{int(s.num_params):,}"}
        if s.is_baseline:
            row.update(delta="(baseline)", p="", holm="", sig="", dunnett="", mde="", reading="")
        elif w is None or not math.isfinite(w.diff):
            row.update(delta="n/a", p="n/a", holm="n/a", sig="n/a", dunnett="n/a", mde="n/a", reading="n/a")
        else:
            ci = f" [{w.ci_low:+.4f}, {w.ci_high:+.4f}]" if math.isfinite(w.ci_low) else ""
            reading = s.reading
            if reading == stats.SIGNIFICANT:
                reading += ", higher" if w.diff > 0 else ", lower"
            row.update(delta=f"{w.diff:+.4f}{ci}", p=_p(w.p_value), holm=_p(s.p_holm),
                       sig=("yes" if s.significant else "no") if math.isfinite(s.p_holm) else "n/a",
                       dunnett=_p(s.p_dunnett), mde=cell(s.mde, 4), reading=reading)
        rows.append(row)
    columns = ["variant", "n", "test", "delta", "p", "holm", "sig", "dunnett", "mde", "reading", "plateau",
               "top5", "train", "time", "params"]
    headers = {"test": "test acc", "delta": f"Δ test acc vs baseline [{int(CONFIDENCE * 100)}% CI]",
               "holm": "p (Holm)", "sig": "significant (Holm)", "dunnett": "p (Dunnett)", "mde": "MDE",
               "plateau": "val acc change, last fifth", "top5": "top-5", "train": "final train acc",
               "time": "train time (s)"}
    if any(s.tuning for s in variants):   # each arm's nuisance value, chosen on validation
        for row, s in zip(rows, variants):
            row["chosen"] = s.chosen or "n/a"
        columns.insert(2, "chosen")
        headers["chosen"] = ", ".join(spec.get("nuisance_grid") or {}) or "nuisance value"
    right = ["n", "test", "delta", "p", "holm", "dunnett", "mde", "plateau", "top5", "train", "time", "params"]
    return markdown_table(rows, columns, headers=headers, right=right)


def tuning_rows(variants: Sequence[VariantSummary]) -> list[dict[str, Any]]:
    return [{"variant": s.name, "value": label, "val_accuracy": value, "chosen": label == s.chosen,
             "run": s.tuning_runs.get(label)} for s in variants for label, value in s.tuning.items()]


def tuning_table(spec: dict[str, Any], variants: Sequence[VariantSummary]) -> str:
    labels = list(dict.fromkeys(label for s in variants for label in s.tuning))
    rows = []
    for s in variants:
        row = {"variant": s.name, "chosen": s.chosen or "n/a (no tuning run finished)"}
        for label in labels:
            value = s.tuning.get(label, float("nan"))
            text = cell(value, 4) if math.isfinite(value) else s.tuning_runs.get(label, "n/a")
            row[label] = f"**{text}**" if label == s.chosen else text
        rows.append(row)
    return markdown_table(rows, ["variant", "chosen", *labels], right=labels)


def _claim_cells(r: ClaimResult) -> dict[str, str]:
    unit = CLAIM_METRICS[r.claim.metric][1]
    w = r.welch
    if w is None or not math.isfinite(w.diff):
        ours = "n/a"
    elif r.ratio:
        bound = "≥ " if r.lower_bound else ""
        ci = f" [{math.exp(w.ci_low):.2f}, {math.exp(w.ci_high):.2f}]" if math.isfinite(w.ci_low) else ""
        ours = f"{bound}{math.exp(w.diff):.2f}x{ci}"
    else:
        ci = f" [{w.ci_low:+.2f}, {w.ci_high:+.2f}]" if math.isfinite(w.ci_low) else ""
        ours = f"{w.diff:+.2f}{ci} {unit}"
    if not math.isfinite(r.mde):
        mde = "n/a" if w is not None else ""
    else:
        mde = f"x{math.exp(r.mde):.2f}" if r.ratio else f"{r.mde:.2f} {unit}"
    arms = f"{r.a} (n={r.n_a}) vs {r.b} (n={r.n_b})" if r.a is not None else ""
    verdict = r.verdict + (f" ({r.note})" if r.note else "")
    return {"claim": r.claim.claim, "paper": r.claim.paper_text, "arms": arms, "ours": ours, "mde": mde,
            "p_holm": _p(r.p_holm) if r.welch is not None else "", "verdict": verdict}


def claims_table(results: Sequence[ClaimResult]) -> str:
    headers = {"paper": "the paper", "arms": "compared (a vs b)", "mde": "MDE", "p_holm": "p (Holm)",
               "ours": f"ours, a − b [{int(CONFIDENCE * 100)}% CI]"}
    table = markdown_table([_claim_cells(r) for r in results],
                           ["claim", "paper", "arms", "ours", "mde", "p_holm", "verdict"], headers=headers,
                           right=["ours", "mde", "p_holm"])
    metrics = "; ".join(f"{name}: {what}" for name, (what, _, _) in CLAIM_METRICS.items())
    footnote = (
        f"Each claim of Krizhevsky et al. (2012) compares two variants of this study that differ only in the "
        f"claim's options (a pair with the baseline preferred); claims whose options no pair of variants "
        f"differs in are listed as \"{stats.NOT_IN_STUDY}\". Metrics — {metrics}. Ratio claims are tested on "
        f"log epochs (Welch), shown as the ratio of geometric means a/b with its interval; their MDE is a "
        f"factor. MDE: {int(POWER * 100)} % power, α = {ALPHA}, two-sided, from the seed spread of the arm "
        f"that is the study's baseline, n as run. p (Holm): Holm over the claims measured here. Verdicts: "
        f"**{stats.REPRODUCES}** = Holm-adjusted p < {ALPHA} with the paper's sign; **{stats.CONTRADICTS}** "
        f"= Holm-adjusted p < {ALPHA} with the opposite sign, or the whole {int(CONFIDENCE * 100)}% "
        f"interval falls short of the paper's figure while the MDE is at most its size; "
        f"**{stats.BELOW_RESOLUTION}** = neither (not significant, and the MDE exceeds the paper's figure or "
        f"the interval still contains it; a claim without a figure that is not significant); "
        f"**{stats.NOT_MEASURABLE}** = no interval (an arm with < 2 runs or no spread, or a run of the "
        f"faster arm never reaching the threshold / converging). When runs of the slower arm did not, the "
        f"epochs they are known to need at least stand in (the epochs trained; for convergence those before "
        f"the last fifth): the ratio is a lower bound (\"≥\"), and only {stats.REPRODUCES} or "
        f"{stats.BELOW_RESOLUTION} can follow. The paper's figures are ImageNet's (CIFAR-10's for the "
        f"four-layer net): the sign is the claim; sizes need not carry over.")
    return f"### The paper's claims (Krizhevsky et al. 2012)\n\n{table}\n{footnote}\n"


def claim_rows(results: Sequence[ClaimResult]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        w = r.welch
        rows.append({"claim": r.claim.claim, "metric": r.claim.metric,
                     "scale": "log_ratio" if r.ratio else "difference", "paper": r.claim.paper,
                     "paper_direction": r.claim.direction, "paper_text": r.claim.paper_text,
                     "arm_a": r.a, "arm_b": r.b, "n_a": r.n_a, "n_b": r.n_b,
                     "diff": w.diff if w else None, "ci_low": w.ci_low if w else None,
                     "ci_high": w.ci_high if w else None, "p_value": w.p_value if w else None,
                     "p_holm": r.p_holm if w else None, "mde": r.mde if w else None,
                     "paper_in_interval": r.paper_in_interval, "lower_bound": r.lower_bound,
                     "verdict": r.verdict, "note": r.note})
    return rows


def to_markdown(spec: dict[str, Any], variants: Sequence[VariantSummary],
                claims: Sequence[ClaimResult] = ()) -> str:
    n_expected = sum(len(s.seeds) + s.failed + s.missing for s in variants)
    n_done = sum(len(s.seeds) for s in variants)
    n_failed = sum(s.failed for s in variants)
    roles = spec.get("hyperparameters", {})
    axes = ", ".join(f"{a} (baseline {d['baseline']})" for a, d in spec["axes"].items())
    grid = spec.get("nuisance_grid") or {}
    nuisance = ", ".join(roles.get("nuisance", ["seed"]))
    if grid:
        nuisance += "; tuned per arm on validation: " + ", ".join(
            f"{k} in {{{', '.join(map(str, v))}}}" for k, v in grid.items())
    lines = [f"## Ablation study `{spec['name']}`", ""]
    if spec.get("description"):
        lines += [spec["description"], ""]
    lines += [
        f"**{n_done}/{n_expected} runs finished**" + (f", {n_failed} failed" if n_failed else "")
        + f" · design: {spec['design']} · seeds: {', '.join(map(str, spec['seeds']))} "
        f"· study digest `{spec['digest']}`",
        "",
        f"Scientific (the axes): {axes}. Nuisance: {nuisance}. "
        f"Fixed: every other option, at the base config's value (study/study.json).",
        "",
        study_table(spec, variants).rstrip("\n"),
        "",
        f"Mean ± sample std (ddof=1) over seeds. Δ = variant − baseline mean test accuracy with a "
        f"{int(CONFIDENCE * 100)}% Welch confidence interval; p = two-sided Welch t-test; p (Holm) = Holm's "
        f"adjustment over the {sum(not s.is_baseline for s in variants)} variants sharing the baseline, which "
        f"alone decides \"significant\" (α = {ALPHA}); p (Dunnett) = scipy's many-to-one test (pooled "
        f"variance), shown beside it. MDE = the smallest true difference a two-sided t-test at α = {ALPHA} "
        f"finds with {int(POWER * 100)} % power (noncentral t, the baseline's seed spread in both groups, n "
        f"as run); Welch's test and Holm's adjustment see less, so it is the study's best-case resolution. "
        f"Reading: \"no effect ≥ MDE\" when the interval lies inside ±MDE, \"below resolution\" when it "
        f"still reaches ±MDE. n/a with fewer than 2 seeds per group or no variance. Val acc change, last "
        f"fifth = validation accuracy at the last epoch minus ⌈epochs/5⌉ epochs earlier (plateaued when "
        f"small).",
        "",
        _mde_text(variants) + " " + _reading_text(variants),
    ]
    if any(s.tuning for s in variants):
        key = ", ".join(grid) or "nuisance value"
        lines += ["", f"### Nuisance tuning per arm ({key})", "",
                  f"Final validation accuracy of each arm's tuning run (seed {spec['seeds'][0]}) per grid value; "
                  f"the best (bold) is the arm's value, and only its runs enter the statistics above. "
                  f"Test accuracy plays no part in the choice.", "", tuning_table(spec, variants).rstrip("\n")]
    if claims:
        lines += ["", claims_table(claims).rstrip("\n")]
    lines += ["", "Figures: figures/ablation_test_accuracy.png, figures/ablation_val_accuracy.png; raw numbers: "
              "reports/ablation.csv, reports/claims.csv, reports/ablation_runs.csv"
              + (", reports/tuning.csv" if any(s.tuning for s in variants) else "") + "."]
    return "\n".join(lines) + "\n"


def runs_csv(variants: Sequence[VariantSummary]) -> str:
    rows = []
    for s in variants:
        for i, seed in enumerate(s.seeds):
            history = s.val_histories[i] if i < len(s.val_histories) else []
            rows.append({"variant": s.name, "seed": seed, "run_id": s.run_ids[i],
                         **{m: s.values[m][i] for m, _, _ in METRICS},
                         "val_plateau": stats.plateau(history)})
    return csv_text(rows) if rows else "variant,seed,run_id\n"


def table_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Rows as the column dict `mlflow.log_table` takes (NaN and missing cells as None)."""
    names = list(dict.fromkeys(k for row in rows for k in row))

    def clean(value: Any) -> Any:
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return {name: [clean(row.get(name)) for row in rows] for name in names}


# --- figures --------------------------------------------------------------------------------------

def bar_chart(variants: Sequence[VariantSummary], title: str = ""):
    from .. import figures  # noqa: F401  (selects the headless Agg backend)
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
            # Filled: significant after Holm; open: not.
            face = "tab:blue" if s.significant else "white"
            if math.isfinite(w.ci_low):
                right.errorbar([w.diff], [yi], xerr=[[w.diff - w.ci_low], [w.ci_high - w.diff]], fmt="o",
                               color="tab:blue", markerfacecolor=face, capsize=4)
            else:
                right.scatter([w.diff], [yi], color="tab:blue", facecolors=face)
            if math.isfinite(s.mde):
                right.plot([-s.mde, s.mde], [yi, yi], color="gray", alpha=0.35, linewidth=6,
                           solid_capstyle="butt", zorder=0)
    right.axvline(0.0, color="gray", linestyle="--", linewidth=1)
    right.set_xlabel(f"Δ test accuracy vs baseline ({int(CONFIDENCE * 100)}% Welch CI)\n"
                     f"filled: significant after Holm · grey band: ±MDE")
    right.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def curves_figure(curves: dict[str, tuple[list[int], list[float], list[float]]], baseline: str | None,
                  title: str = ""):
    from .. import figures  # noqa: F401
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


def mean_curve(histories: Sequence[Sequence[float]]) -> tuple[list[int], list[float], list[float]]:
    """Mean and std per epoch over the seeds that reached that epoch (epochs numbered from 1)."""
    per_epoch: dict[int, list[float]] = {}
    for history in histories:
        for epoch, value in enumerate(history, 1):
            per_epoch.setdefault(epoch, []).append(value)
    epochs = sorted(per_epoch)
    moments = [stats.mean_std(per_epoch[e]) for e in epochs]
    return epochs, [m for m, _ in moments], [sd for _, sd in moments]


# --- from the store to the parent run ---------------------------------------------------------------

def make_report(parent_run_id: str, spec: dict[str, Any], children: Sequence[Any],
                history: History | None = None) -> Report:
    """Every table of the report from a spec and the children (run-like objects: .info.run_id, .status,
    .end_time; .data.tags, .data.metrics); `history` reads per-epoch metrics. Logs nothing."""
    if history is not None:
        history = functools.lru_cache(maxsize=None)(history)   # a claim may read a series twice
    variants = summarize(spec, children, history)
    claims = judge_claims(variants, history)
    curves = {s.name: mean_curve(s.val_histories) for s in variants}
    has_grid = any(s.tuning for s in variants)
    return Report(parent_run_id, spec, variants, to_markdown(spec, variants, claims), csv_text(csv_rows(variants)),
                  runs_csv(variants), curves, claims, claims_table(claims), csv_text(claim_rows(claims)),
                  csv_text(tuning_rows(variants)) if has_grid else "")


def load_spec(parent_run_id: str) -> dict[str, Any]:
    from .. import tracking
    from ..tracking import ROLE_TAG, SPEC_ARTIFACT

    run = tracking.get_run(parent_run_id)
    if run.data.tags.get(ROLE_TAG) != "parent":
        raise tracking.TrackingError(f"run {parent_run_id} is not the parent run of an ablation study (no "
                                     f"{ROLE_TAG}=parent tag); pass the id of the study's parent run.")
    try:
        path = tracking.download_artifact(parent_run_id, SPEC_ARTIFACT)
    except Exception as err:
        if not tracking.store_answers():   # a store gone away (e.g. mid-study) is not a missing artifact
            raise tracking.TrackingError(
                f"could not read {SPEC_ARTIFACT} of run {parent_run_id}: the MLflow store {tracking.tracking_uri()} "
                f"does not answer. What was logged is kept; once the store answers again, run the same command."
            ) from None
        raise tracking.TrackingError(f"run {parent_run_id} has no {SPEC_ARTIFACT} artifact: {err}") from None
    return json.loads(path.read_text())


def build_report(parent_run_id: str) -> Report:
    """Rebuild the study's tables and figures from the store and log them on the parent run."""
    from .. import tracking

    spec = load_spec(parent_run_id)
    def history(run_id: str, key: str) -> list[tuple[int, float]]:
        return list(enumerate(tracking.epoch_history(run_id, [key]).get(key, [])))

    report = make_report(parent_run_id, spec, tracking.child_runs(parent_run_id), history)
    on_parent = {"run_id": parent_run_id}
    tracking.log_text(report.markdown, "reports/ablation.md", **on_parent)
    tracking.log_text(report.csv, "reports/ablation.csv", **on_parent)
    tracking.log_text(report.runs_csv, "reports/ablation_runs.csv", **on_parent)
    tracking.log_text(report.claims_markdown, "reports/claims.md", **on_parent)
    tracking.log_text(report.claims_csv, "reports/claims.csv", **on_parent)
    if report.tuning_csv:
        tracking.log_text(report.tuning_csv, "reports/tuning.csv", **on_parent)
    tracking.log_table(table_columns(csv_rows(report.variants)), "reports/ablation_table.json", **on_parent)
    tracking.log_table(table_columns(claim_rows(report.claims)), "reports/claims_table.json", **on_parent)
    tracking.log_figure(bar_chart(report.variants, title=f"{spec['name']}: test accuracy"),
                        "figures/ablation_test_accuracy.png", **on_parent)
    tracking.log_figure(curves_figure(report.curves, spec.get("baseline"),
                                      title=f"{spec['name']}: validation accuracy"),
                        "figures/ablation_val_accuracy.png", **on_parent)
    tracking.set_tags({tracking.NOTE_TAG: report.markdown}, **on_parent)   # the run page's description
    return report
