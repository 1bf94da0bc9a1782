"""A study's report, rebuilt from the MLflow store alone and logged on its parent run (docs/methodology.md)."""

import functools
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from . import stats
from .. import figures, tracking
from .stats import ALPHA, CONFIDENCE, NAN, Welch
from ..tables import cell, columns_of, csv_text, markdown_table

METHODS = "docs/methodology.md"
# (metric key, column title, digits) in table order; the first is the one compared to the baseline.
METRICS = (("test_accuracy", "test acc", 4), ("test_top5_accuracy", "top-5", 4),
           ("final_train_accuracy", "final train acc", 4), ("train_time_s", "train time (s)", 1))
PRIMARY = "test_accuracy"
VAL_ACCURACY = "val_accuracy"     # per epoch: curves, plateau, convergence; final: the nuisance choice
TRAIN_EVAL = "train_eval_accuracy"  # inference-mode accuracy on fixed training images: the gap, epochs to 25 %
CI = f"{int(CONFIDENCE * 100)}% CI"

# history(run_id, metric key) -> its value per epoch, in epoch order (build_report: tracking.epoch_history).
History = Callable[[str, str], list[float]]

IMAGENET = {"variant": "paper", "dataset": "folder", "recipe": "paper"}   # the paper's net on its ImageNet recipe
CIFAR4 = {"variant": "cifar_convnet4", "dataset": "cifar10", "train_limit": None}   # its CIFAR-10 net, all images


@dataclass(frozen=True)
class Claim:
    """Arm `a` minus arm `b` in `metric`: the paper's figure (a/b for ratio metrics; None: a sign), methodology.md."""
    claim: str
    a: Mapping[str, Any]
    b: Mapping[str, Any]
    metric: str
    paper: float | None
    direction: int
    paper_text: str
    requires: Mapping[str, Any] = field(default_factory=dict)
    setting: Mapping[str, Any] = field(default_factory=lambda: IMAGENET)


LRN_ON, LRN_OFF = {"lrn": True, "batchnorm": False}, {"lrn": False, "batchnorm": False}
POOLS = {"pool": "overlapping"}, {"pool": "non_overlapping"}
DROPOUT = {"dropout": 0.5}, {"dropout": 0.0}
CLAIMS = (
    Claim("LRN lowers top-1 error (ImageNet)", LRN_ON, LRN_OFF, "top1_error", -1.4, -1, "-1.4 points"),
    Claim("LRN lowers top-5 error (ImageNet)", LRN_ON, LRN_OFF, "top5_error", -1.2, -1, "-1.2 points"),
    Claim("LRN lowers the CIFAR-10 four-layer net's test error", LRN_ON, LRN_OFF, "top1_error", -2.0, -1,
          "13 % -> 11 % (-2 points)", setting=CIFAR4),
    Claim("Overlapping pooling lowers top-1 error", *POOLS, "top1_error", -0.4, -1, "-0.4 points"),
    Claim("Overlapping pooling lowers top-5 error", *POOLS, "top5_error", -0.3, -1, "-0.3 points"),
    # pca_color acts only in the paper's input recipe with augmentation on.
    Claim("PCA colour augmentation lowers top-1 error", {"pca_color": True}, {"pca_color": False}, "top1_error", None,
          -1, "by over 1 point (a bound: its sign is tested)", requires={"recipe": "paper", "augment": True}),
    Claim("Dropout reduces the train-test gap (overfitting)", *DROPOUT, "train_test_gap", None, -1,
          "smaller gap (no figure)"),
    Claim("Dropout roughly doubles the epochs needed to converge", *DROPOUT, "epochs_to_converge", 2.0, 1, "about 2x"),
    # Figure 1: no regularisation of any kind.
    Claim("ReLU reaches 25 % training error about 6x sooner than tanh", {"activation": "tanh"},
          {"activation": "relu"}, "epochs_to_25pct_train_error", 6.0, 1, "6x (tanh / ReLU)",
          setting={**CIFAR4, "weight_decay": 0.0, "augment": False}),
)
# metric -> (unit, ratio?): errors and gaps in percentage points; epochs to a threshold as ratios.
CLAIM_METRICS = {"top1_error": ("points", False), "top5_error": ("points", False), "train_test_gap": ("points", False),
                 "epochs_to_converge": ("x", True), "epochs_to_25pct_train_error": ("x", True)}
CONVERGED_WITHIN = 0.01          # "converged": validation accuracy within 1 point of the run's best
TRAIN_ERROR_TARGET = 0.25        # the paper's Figure 1: epochs to 25 % training error


@dataclass
class VariantSummary:
    name: str
    factors: dict[str, str]
    is_baseline: bool
    options: dict[str, Any]                                          # every option of the variant
    seeds: list[int] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m, _, _ in METRICS})  # per seed
    failed: int = 0                   # seeds with no FINISHED child but a FAILED / KILLED one
    missing: int = 0                  # seeds never run
    num_params: float = NAN
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)   # metric -> (mean, std)
    vs_baseline: Welch | None = None
    val_histories: list[list[float]] = field(default_factory=list)  # val_accuracy per epoch, per seed
    plateau: tuple[float, float] = (NAN, NAN)                        # mean, std over seeds
    mde: float = NAN
    p_holm: float = NAN
    p_dunnett: float = NAN
    seeds_needed: float = NAN         # seeds per arm to find the observed difference at Holm's α / m
    reading: str = ""
    tuning: dict[str, float] = field(default_factory=dict)      # grid label -> final val_accuracy (first seed)
    tuning_runs: dict[str, str] = field(default_factory=dict)   # grid label -> run id or status
    chosen: str | None = None                                   # the grid label used for the statistics
    significant = property(lambda self: math.isfinite(self.p_holm) and self.p_holm < ALPHA)   # after Holm


@dataclass
class ClaimResult:
    claim: Claim
    a: str | None = None              # variant names of the two arms; None: not in this study
    b: str | None = None
    n_a: int = 0
    n_b: int = 0
    welch: Welch | None = None        # a - b in the claim's units (log units for ratio metrics)
    mde: float = NAN
    p_holm: float = NAN
    p: float = NAN                    # the raw p of its test: Welch, the size route's, or logrank's
    size: str | None = None           # on the size route: the verdict its test would give
    bound: str = ""                   # censored epochs: "≥ ", "≤ " or "≈ " before the ratio shown
    seeds: float = NAN                # seeds per arm to find the observed difference, Holm's α / m
    verdict: str = stats.NOT_IN_STUDY
    note: str = ""
    # Claims on the same arms, metric and route share one test and one p.
    test = property(lambda self: (self.a, self.b, self.claim.metric, self.size and self.claim.paper))
    ratio = property(lambda self: CLAIM_METRICS[self.claim.metric][1])


@dataclass
class Report:
    parent_run_id: str
    spec: dict[str, Any]
    variants: list[VariantSummary]
    claims: list[ClaimResult]
    markdown: str                     # reports/ablation.md (claims.md is its claims section)
    csv: str                          # reports/ablation.csv, claims.csv, tuning.csv ("" without a nuisance grid)
    claims_csv: str
    tuning_csv: str
    adastop: dict[str, Any] | None = None   # reports/adastop.json: a study in `rounds`, its decisions


def _index(children: Sequence[Any]) -> tuple[dict[str, Any], set[str]]:
    """{config digest: the latest FINISHED child}, and the digests with only FAILED / KILLED children."""
    finished, broken = {}, set()
    for run in sorted(children, key=lambda r: r.info.end_time or 0, reverse=True):   # the latest first
        digest = run.data.tags.get(tracking.CONFIG_DIGEST_TAG)
        if digest is not None and run.info.status == "FINISHED":
            finished.setdefault(digest, run)
        elif digest is not None and run.info.status in ("FAILED", "KILLED"):
            broken.add(digest)
    return finished, broken - set(finished)


def _plan(spec: Mapping[str, Any], variant: Mapping[str, Any], summary: VariantSummary,
          finished: Mapping[str, Any], broken: set[str]) -> dict[int, str | None]:
    """{seed: config digest} of a variant: with a nuisance grid, of the label its tuning runs chose."""
    grid = variant.get("grid_digests")
    if not grid:
        return {int(seed): digest for seed, digest in variant["config_digests"].items()}
    first = str(spec["seeds"][0])
    runs = {label: finished.get(digests.get(first)) for label, digests in grid.items()}
    summary.chosen, summary.tuning = choose_grid_value(runs)
    for label, digests in grid.items():
        summary.tuning_runs[label] = (runs[label].info.run_id if runs[label] is not None
                                      else "failed" if digests.get(first) in broken else "not run")
    chosen = grid.get(summary.chosen, {})
    return {int(seed): chosen.get(str(seed)) for seed in spec["seeds"]}


def choose_grid_value(tuning_runs: Mapping[str, Any]) -> tuple[str | None, dict[str, float]]:
    """The grid label ({label: FINISHED tuning run or None}) of the best final `val_accuracy` (first), each value."""
    scores = {label: float(run.data.metrics.get(VAL_ACCURACY, NAN)) if run is not None else NAN
              for label, run in tuning_runs.items()}
    scored = {label: value for label, value in scores.items() if math.isfinite(value)}
    best = max(scored.values(), default=None)
    return next((label for label, value in scored.items() if value == best), None), scores


def summarize(spec: dict[str, Any], children: Sequence[Any], history: History | None = None) -> list[VariantSummary]:
    """Per variant: its children (by config digest; the latest FINISHED wins), metrics and statistics."""
    finished, broken = _index(children)
    base: dict[str, Any] = {}   # the base config's leaves, flattened: what each variant's overrides change
    for key, value in spec["base_config"].items():
        base.update(value if isinstance(value, Mapping) else {key: value})
    out = []
    for v in spec["variants"]:
        summary = VariantSummary(v["name"], dict(v["factors"]), bool(v["is_baseline"]), {**base, **v["overrides"]})
        plan = _plan(spec, v, summary, finished, broken)
        for seed in sorted(plan):
            run = finished.get(plan[seed])
            if run is None:
                summary.failed += plan[seed] in broken
                summary.missing += plan[seed] not in broken
                continue
            summary.seeds.append(seed)
            summary.run_ids.append(run.info.run_id)
            for metric, _, _ in METRICS:
                summary.values[metric].append(float(run.data.metrics.get(metric, NAN)))
            summary.num_params = float(run.data.metrics.get("num_params", summary.num_params))
            summary.val_histories.append(history(run.info.run_id, VAL_ACCURACY) if history else [])
        summary.stats = {m: stats.mean_std(summary.values[m]) for m, _, _ in METRICS}
        summary.plateau = stats.mean_std([stats.plateau(h) for h in summary.val_histories if len(h) > 1])
        out.append(summary)
    _compare(out)
    return out


def _compare(variants: Sequence[VariantSummary]) -> None:
    """Welch, Holm, Dunnett, MDE and reading of each variant against the baseline (in place)."""
    baseline = next(s for s in variants if s.is_baseline)
    others = [s for s in variants if not s.is_baseline]
    base = baseline.values[PRIMARY]
    for s in others:
        s.vs_baseline = stats.welch(s.values[PRIMARY], base)
        s.mde = stats.minimum_detectable_effect(baseline.stats[PRIMARY][1], len(s.values[PRIMARY]), len(base))
    dunnett = stats.dunnett({s.name: s.values[PRIMARY] for s in others if s.values[PRIMARY]}, base)
    for s, p in zip(others, stats.holm([s.vs_baseline.p_value for s in others])):
        s.p_holm, s.p_dunnett = p, dunnett.get(s.name, NAN)
        s.reading = stats.reading(s.vs_baseline, s.p_holm, s.mde)
        s.seeds_needed = stats.seeds_needed(s.vs_baseline.diff, baseline.stats[PRIMARY][1], ALPHA / len(others))


def _same(x: Any, y: Any) -> bool:
    """Equal option values, where true is not 1 (but 1 is 1.0)."""
    return x == y and isinstance(x, bool) == isinstance(y, bool)


def _has(options: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    return all(key in options and _same(options[key], value) for key, value in wanted.items())


def _arms(claim: Claim, variants: Sequence[VariantSummary]) -> tuple[VariantSummary, VariantSummary] | None:
    """The two variants that differ only in the claim's options, the pair with or nearest the baseline."""
    keys = set(claim.a) | set(claim.b)
    pairs = [(a, b) for a in variants if _has(a.options, {**claim.a, **claim.requires})
             for b in variants if b is not a and _has(b.options, {**claim.b, **claim.requires})
             and all(_same(a.options.get(k), b.options.get(k)) for k in (set(a.options) | set(b.options)) - keys)]
    baseline = next(s.factors for s in variants if s.is_baseline)

    def distance(pair) -> tuple[int, int]:
        away = sum(pair[i].factors.get(axis) != value for i in (0, 1) for axis, value in baseline.items())
        return (0 if any(s.is_baseline for s in pair) else 1, away)

    return min(pairs, key=distance, default=None)


def _claim_values(claim: Claim, arm: VariantSummary, history: History | None) -> tuple[list[float], list[float]]:
    """The claim's metric per run of an arm (NaN: lacking), and for epochs metrics (inf: never met) each run's bound."""
    if claim.metric == "top1_error":
        return [100.0 * (1.0 - x) for x in arm.values[PRIMARY]], []
    if claim.metric == "top5_error":
        return [100.0 * (1.0 - x) for x in arm.values["test_top5_accuracy"]], []
    if claim.metric == "epochs_to_converge":
        return ([stats.epochs_to_converge(h, CONVERGED_WITHIN) for h in arm.val_histories],
                [float(len(h) - stats.tail_length(len(h))) if len(h) > 1 else NAN for h in arm.val_histories])
    series = [history(run_id, TRAIN_EVAL) if history else [] for run_id in arm.run_ids]
    if claim.metric == "train_test_gap":
        return [100.0 * (h[-1] - x) if h else NAN for h, x in zip(series, arm.values[PRIMARY])], []
    return [stats.epochs_to(h, 1.0 - TRAIN_ERROR_TARGET) if h else NAN for h in series], [float(len(h)) for h in series]


def judge_claims(variants: Sequence[VariantSummary], history: History | None = None) -> list[ClaimResult]:
    """A verdict per claim from one Holm family over the study's distinct tests (docs/methodology.md)."""
    results, spread = [ClaimResult(claim) for claim in CLAIMS], {}
    for result in results:
        claim, pair = result.claim, _arms(result.claim, variants)
        if pair is None:
            continue
        arm_a, arm_b = pair
        result.a, result.b = arm_a.name, arm_b.name
        (values_a, cut_a), (values_b, cut_b) = (_claim_values(claim, arm, history) for arm in pair)
        result.n_a, result.n_b = len(values_a), len(values_b)
        censored = [any(map(math.isinf, v)) for v in (values_a, values_b)]
        if any(math.isnan(x) for x in values_a + values_b) or not (values_a and values_b):
            result.verdict, result.note = stats.NOT_MEASURABLE, "an arm without runs, or a run without the metric"
        elif any(censored):   # epochs never reached within the budget: logrank, the budget as the bound
            result.welch = stats.censored(values_a, values_b, cut_a, cut_b)
            result.bound = "≈ " if all(censored) else "≥ " if censored[0] else "≤ "
            result.p = result.welch.p_value
            result.note = "censored: logrank" if math.isfinite(result.p) else "no run of either arm reached it"
        else:   # ratios: Welch on log epochs, the ratio of geometric means
            values_a, values_b = ([math.log(x) for x in v] if result.ratio else v for v in (values_a, values_b))
            result.welch = stats.welch(values_a, values_b)
            result.p = result.welch.p_value
            spread[claim.claim] = stats.pooled_sd(values_a, values_b)
            result.mde = stats.minimum_detectable_effect(spread[claim.claim], len(values_a), len(values_b))
            if claim.paper is not None and _has(arm_a.options, claim.setting) and math.isfinite(result.p):
                paper = math.log(claim.paper) if result.ratio else claim.paper   # on the test's scale
                result.p, result.size = stats.size_test(values_a, values_b, paper, abs(paper) / 2, claim.direction)
    tests = {r.test: r.p for r in results if math.isfinite(r.p)}
    adjusted = dict(zip(tests, stats.holm(list(tests.values()))))
    for r in results:
        if r.welch is not None:
            r.p_holm = adjusted.get(r.test, NAN)
            r.verdict = stats.verdict(r.welch, r.p_holm, r.claim.direction, r.size)
            r.seeds = stats.seeds_needed(r.welch.diff, spread.get(r.claim.claim, NAN), ALPHA / max(1, len(tests)))
    return results


def _pm(stat: tuple[float, float], digits: int) -> str:
    plus = f" ± {cell(stat[1], digits)}" if math.isfinite(stat[1]) else ""
    return f"{stat[0]:.{digits}f}{plus}" if math.isfinite(stat[0]) else "n/a"


def _p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else "< 0.001" if p < 0.001 else f"{p:.3f}"


def _seeds(n: float) -> str:
    return "n/a" if math.isnan(n) else "> 200" if math.isinf(n) else str(int(n))


def csv_rows(variants: Sequence[VariantSummary]) -> list[dict[str, Any]]:
    """The study table at full precision, one row per variant (None where a cell does not apply)."""
    rows = []
    for s in variants:
        w = s.vs_baseline
        versus = {"p_holm": s.p_holm, "significant_holm": s.significant, "p_dunnett": s.p_dunnett, "mde": s.mde,
                  "seeds_needed": s.seeds_needed, "reading": s.reading}
        rows.append({"variant": s.name, "is_baseline": s.is_baseline,
                     **{f"factor.{k}": v for k, v in s.factors.items()},
                     "n_seeds": len(s.seeds), "n_failed": s.failed, "n_missing": s.missing,
                     "num_params": None if math.isnan(s.num_params) else int(s.num_params),
                     **({"nuisance_value": s.chosen} if any(v.tuning for v in variants) else {}),
                     **{f"{m}_{k}": x for m, _, _ in METRICS for k, x in zip(("mean", "std"), s.stats[m])},
                     f"delta_{PRIMARY}": w and w.diff, "delta_ci_low": w and w.ci_low, "delta_ci_high": w and w.ci_high,
                     "p_value": w and w.p_value, "welch_df": w and w.df,
                     **{k: None if s.is_baseline else x for k, x in versus.items()},
                     "val_plateau_mean": s.plateau[0], "val_plateau_std": s.plateau[1]})
    return rows


def _summary_text(variants: Sequence[VariantSummary]) -> str:
    """The study's resolution (MDE) and which variants read how, in words."""
    baseline = next(s for s in variants if s.is_baseline)
    mdes = sorted({round(s.mde, 6) for s in variants if not s.is_baseline and math.isfinite(s.mde)})
    value = "n/a" if not mdes else cell(mdes[0], 4) if len(mdes) == 1 else f"{cell(mdes[0], 4)}–{cell(mdes[-1], 4)}"
    return (f"Holm over the {len(variants) - 1} variants sharing the baseline; each column: {METHODS}. Minimum "
            f"detectable effect (MDE) of a difference in test accuracy: **{value}** (baseline seed std "
            f"{cell(baseline.stats[PRIMARY][1], 4)}, n = {len(baseline.seeds)}). {_readings(variants)}")


def _readings(variants: Sequence[VariantSummary]) -> str:
    """Which variants read how (stats.reading), in words (each reading defined in docs/methodology.md)."""
    groups: dict[str, list[str]] = {}
    for s in variants:
        if not s.is_baseline:
            label = f"no effect at resolution {cell(s.mde, 4)}" if s.reading == stats.NO_EFFECT else s.reading
            groups.setdefault(label, []).append(f"`{s.name}`")
    return " ".join(f"{label[0].upper()}{label[1:]}: {', '.join(names)}." for label, names in groups.items()) \
        or "No variant to compare with the baseline."


def study_table(spec: dict[str, Any], variants: Sequence[VariantSummary]) -> str:
    rows = []
    for s in variants:
        w = s.vs_baseline
        row = {"variant": f"**{s.name}**" if s.is_baseline else s.name, "chosen": s.chosen or "n/a",
               "n": str(len(s.seeds)) + (f" ({s.failed} failed)" if s.failed else "")
               + (f" ({s.missing} not run)" if s.missing else ""),
               **{metric: _pm(s.stats[metric], digits) for metric, _, digits in METRICS},
               "plateau": _pm(s.plateau, 4), "params": "n/a" if math.isnan(s.num_params) else f"{int(s.num_params):,}"}
        if s.is_baseline or w is None or not math.isfinite(w.diff):
            row.update(dict.fromkeys(("p", "holm", "sig", "dunnett", "mde", "seeds", "reading"),
                                     "" if s.is_baseline else "n/a"),
                       delta="(baseline)" if s.is_baseline else "n/a")
        else:
            ci = f" [{w.ci_low:+.4f}, {w.ci_high:+.4f}]" if math.isfinite(w.ci_low) else ""
            sign = (", higher" if w.diff > 0 else ", lower") if s.reading == stats.SIGNIFICANT else ""
            row.update(delta=f"{w.diff:+.4f}{ci}", p=_p(w.p_value), holm=_p(s.p_holm),
                       sig=("yes" if s.significant else "no") if math.isfinite(s.p_holm) else "n/a",
                       dunnett=_p(s.p_dunnett), mde=cell(s.mde, 4), seeds=_seeds(s.seeds_needed),
                       reading=s.reading + sign)
        rows.append(row)
    metrics = [metric for metric, _, _ in METRICS]
    columns = ["variant", "n", *(["chosen"] if any(s.tuning for s in variants) else []), PRIMARY, "delta", "p",
               "holm", "sig", "dunnett", "mde", "seeds", "reading", "plateau", *metrics[1:], "params"]
    headers = {**{metric: title for metric, title, _ in METRICS}, "chosen": ", ".join(spec.get("nuisance_grid", {})),
               "delta": f"Δ test acc vs baseline [{CI}]", "holm": "p (Holm)", "sig": "significant (Holm)",
               "dunnett": "p (Dunnett)", "mde": "MDE", "plateau": "val acc change, last fifth",
               "seeds": "seeds/arm for Δ"}
    return markdown_table(rows, columns, headers=headers,
                          right=[c for c in columns[1:] if c not in ("chosen", "sig", "reading")])


def tuning_table(variants: Sequence[VariantSummary]) -> str:
    labels = list(dict.fromkeys(label for s in variants for label in s.tuning))
    rows = []
    for s in variants:
        row = {"variant": s.name, "chosen": s.chosen or "n/a (no tuning run finished)"}
        for label in labels:
            value = s.tuning.get(label, NAN)
            text = cell(value, 4) if math.isfinite(value) else s.tuning_runs.get(label, "n/a")
            row[label] = f"**{text}**" if label == s.chosen else text
        rows.append(row)
    return markdown_table(rows, ["variant", "chosen", *labels], right=labels)


def claims_table(results: Sequence[ClaimResult]) -> str:
    rows = []
    for r in results:
        unit, w = CLAIM_METRICS[r.claim.metric][0], r.welch
        if w is None or not math.isfinite(w.diff):
            ours = "n/a"
        elif r.ratio:
            ci = f" [{math.exp(w.ci_low):.2f}, {math.exp(w.ci_high):.2f}]" if math.isfinite(w.ci_low) else ""
            ours = f"{r.bound}{math.exp(w.diff):.2f}x{ci}"
        else:
            ci = f" [{w.ci_low:+.2f}, {w.ci_high:+.2f}]" if math.isfinite(w.ci_low) else ""
            ours = f"{w.diff:+.2f}{ci} {unit}"
        mde = ("n/a" if w is not None else "") if not math.isfinite(r.mde) else \
            f"x{math.exp(r.mde):.2f}" if r.ratio else f"{r.mde:.2f} {unit}"
        test = "" if w is None else "logrank" if r.bound else "size (TOST)" if r.size else "sign (Welch)"
        rows.append({"claim": r.claim.claim, "paper": r.claim.paper_text, "ours": ours, "mde": mde, "test": test,
                     "arms": f"{r.a} (n={r.n_a}) vs {r.b} (n={r.n_b})" if r.a is not None else "",
                     "p_holm": _p(r.p_holm) if w is not None else "", "seeds": _seeds(r.seeds) if w else "",
                     "verdict": r.verdict + (f" ({r.note})" if r.note else "")})
    headers = {"paper": "the paper", "arms": "compared (a vs b)", "mde": "MDE", "p_holm": "p (Holm)",
               "ours": f"ours, a − b [{CI}]", "seeds": "seeds/arm for it"}
    columns = ["claim", "paper", "arms", "ours", "mde", "test", "p_holm", "seeds", "verdict"]
    table = markdown_table(rows, columns, headers=headers, right=["ours", "mde", "p_holm", "seeds"])
    return f"### The paper's claims (Krizhevsky et al. 2012)\n\n{table}\nMetrics, arms and verdict rules: {METHODS}.\n"


def claim_rows(results: Sequence[ClaimResult]) -> list[dict[str, Any]]:
    return [{"claim": r.claim.claim, "metric": r.claim.metric, "scale": "log_ratio" if r.ratio else "difference",
             "paper": r.claim.paper, "paper_direction": r.claim.direction, "paper_text": r.claim.paper_text,
             "arm_a": r.a, "arm_b": r.b, "n_a": r.n_a, "n_b": r.n_b, "diff": r.welch and r.welch.diff,
             "ci_low": r.welch and r.welch.ci_low, "ci_high": r.welch and r.welch.ci_high,
             "p_value": r.welch and r.welch.p_value, "p_holm": r.welch and r.p_holm, "mde": r.welch and r.mde,
             "route": "size" if r.size else "sign", "p_test": r.p, "seeds_needed": r.seeds, "censored": bool(r.bound),
             "verdict": r.verdict, "note": r.note} for r in results]


def adastop_decisions(spec: Mapping[str, Any], variants: Sequence[VariantSummary]) -> dict[str, Any]:
    """stats.adastop on the finished children, as `ablate` runs it, with the study's `rounds`."""
    rounds, arms = spec["rounds"], sorted(variants, key=lambda s: not s.is_baseline)   # the baseline first
    return {**rounds, **stats.adastop({s.name: dict(zip(s.seeds, s.values[rounds["metric"]])) for s in arms},
                                      rounds["seeds_per_round"], rounds["max_rounds"], rounds["alpha"])}


def _runs_finished(variants: Sequence[VariantSummary]) -> str:
    n_done, n_failed = sum(len(s.seeds) for s in variants), sum(s.failed for s in variants)
    n_expected = n_done + n_failed + sum(s.missing for s in variants)
    return f"{n_done}/{n_expected} runs finished" + (f", {n_failed} failed" if n_failed else "")


def to_markdown(spec: dict[str, Any], variants: Sequence[VariantSummary], claims: Sequence[ClaimResult] = (),
                stop: Mapping[str, Any] | None = None) -> str:
    """ablation.md; `stop`: adastop_decisions' for a study in `rounds`."""
    axes = ", ".join(f"{a} (baseline {d['baseline']})" for a, d in spec["axes"].items())
    grid = spec.get("nuisance_grid", {})
    nuisance = ", ".join(spec["hyperparameters"]["nuisance"]) + ("; tuned per arm on validation: " + ", ".join(
        f"{k} in {{{', '.join(map(str, v))}}}" for k, v in grid.items()) if grid else "")
    lines = [f"## Ablation study `{spec['name']}`", "", *([spec["description"], ""] if spec["description"] else []),
             f"**{_runs_finished(variants)}** · design: {spec['design']} · seeds: {', '.join(map(str, spec['seeds']))} "
             f"· study digest `{spec['digest']}`",
             "", f"Scientific (the axes): {axes}. Nuisance: {nuisance}. Fixed: the rest (study/study.json).", "",
             study_table(spec, variants).rstrip("\n"), "", _summary_text(variants)]
    if any(s.tuning for s in variants):
        lines += ["", f"### Nuisance tuning per arm ({', '.join(grid)})", "", f"Seed {spec['seeds'][0]}'s final "
                  f"val acc per value; bold: chosen.", "", tuning_table(variants).rstrip("\n")]
    if stop:   # each variant vs the baseline: the rounds and seeds per arm used
        lines += ["", f"### Seeds in rounds (AdaStop, α = {stop['alpha']}, {stop['metric']})", "",
                  f"{stop['seeds_per_round']} seeds per round, at most {stop['max_rounds']} rounds: stopped with "
                  f"**{stop['stopped']}**.", "", markdown_table(stop["comparisons"], list(stop["comparisons"][0]),
                                                                right=["rounds", "seeds"]).rstrip("\n")]
    if claims:
        lines += ["", claims_table(claims).rstrip("\n")]
    return "\n".join(lines + ["", "Figures: figures/; raw numbers: reports/ablation.csv, claims.csv, ablation_runs.csv,"
                              f" tuning.csv with a grid ({METHODS})."]) + "\n"


def description(report: Report) -> str:
    """The parent run's description (a narrow column in MLflow): the outcome, and where the full report is."""
    verdicts = Counter(r.verdict for r in report.claims if r.verdict != stats.NOT_IN_STUDY)
    claims = ", ".join(f"{verdict} {n}" for verdict, n in verdicts.items()) or "none measured by this study"
    return (f"Ablation study `{report.spec['name']}`: {_runs_finished(report.variants)}. "
            f"{_readings(report.variants)} Paper's claims: {claims}.\n\nFull report: Artifacts → reports/ablation.md; "
            f"figures: Artifacts → figures/.")


def table_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Rows as the column dict `mlflow.log_table` takes (NaN and missing cells as None)."""
    return {name: [None if isinstance(v := row.get(name), float) and not math.isfinite(v) else v for row in rows]
            for name in columns_of(rows)}


def make_report(parent_run_id: str, spec: dict[str, Any], children: Sequence[Any],
                history: History | None = None) -> Report:
    """Every table of the report from a spec and the children (run-like objects); logs nothing."""
    if history is not None:
        history = functools.lru_cache(maxsize=None)(history)   # a claim may read a series twice
    variants = summarize(spec, children, history)
    claims = judge_claims(variants, history)
    tuning = [{"variant": s.name, "value": label, "val_accuracy": value, "chosen": label == s.chosen,
               "run": s.tuning_runs.get(label)} for s in variants for label, value in s.tuning.items()]
    stop = adastop_decisions(spec, variants) if "rounds" in spec else None   # replayed once, for both files
    return Report(parent_run_id, spec, variants, claims, to_markdown(spec, variants, claims, stop),
                  csv_text(csv_rows(variants)), csv_text(claim_rows(claims)), csv_text(tuning) if tuning else "", stop)


def load_spec(parent_run_id: str) -> dict[str, Any]:
    ROLE_TAG, SPEC_ARTIFACT, uri = tracking.ROLE_TAG, tracking.SPEC_ARTIFACT, tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).expanduser().is_file():
        # MLflow would create an empty store there and then not find the run in it.
        raise tracking.TrackingError(f"no MLflow store at {uri}: pass --tracking-uri (or set MLFLOW_TRACKING_URI) to "
                                     f"the store that holds the study, e.g. sqlite:///PATH/mlflow.db.")
    if tracking.get_run(parent_run_id).data.tags.get(ROLE_TAG) != "parent":
        raise tracking.TrackingError(f"run {parent_run_id} is not the parent run of an ablation study (no "
                                     f"{ROLE_TAG}=parent tag); pass the id of the study's parent run.")
    try:
        return tracking.load_dict(f"runs:/{parent_run_id}/{SPEC_ARTIFACT}")
    except Exception as err:
        if not tracking.store_answers():   # a store gone away (e.g. mid-study) is not a missing artifact
            raise tracking.TrackingError(
                f"could not read {SPEC_ARTIFACT} of run {parent_run_id}: the MLflow store {tracking.tracking_uri()} "
                f"does not answer. What was logged is kept; once the store answers again, run the same command."
            ) from None
        raise tracking.TrackingError(f"run {parent_run_id} has no {SPEC_ARTIFACT} artifact: {err}") from None


def build_report(parent_run_id: str) -> Report:
    """Rebuild the study's tables and figures from the store and log them on the parent run."""
    spec = load_spec(parent_run_id)

    def history(run_id: str, key: str) -> list[float]:
        return tracking.epoch_history(run_id, [key]).get(key, [])

    report = make_report(parent_run_id, spec, tracking.child_runs(parent_run_id), history)
    on_parent = {"run_id": parent_run_id}
    metrics = [m for m, _, _ in METRICS]
    runs = [{"variant": s.name, "seed": seed, "run_id": run_id, **{m: s.values[m][i] for m in metrics},
             "val_plateau": stats.plateau(val)}
            for s in report.variants for i, (seed, run_id, val) in enumerate(zip(s.seeds, s.run_ids, s.val_histories))]
    files = {"ablation.md": report.markdown, "ablation.csv": report.csv,
             "ablation_runs.csv": csv_text(runs, ["variant", "seed", "run_id", *metrics, "val_plateau"]),
             "claims.md": claims_table(report.claims), "claims.csv": report.claims_csv, "tuning.csv": report.tuning_csv}
    for name, text in files.items():
        if text:
            tracking.log_text(text, f"reports/{name}", **on_parent)
    if report.adastop:   # the section "Seeds in rounds" of ablation.md
        tracking.log_dict(report.adastop, "reports/adastop.json", **on_parent)
    tracking.log_table(table_columns(csv_rows(report.variants)), "reports/ablation_table.json", **on_parent)
    tracking.log_table(table_columns(claim_rows(report.claims)), "reports/claims_table.json", **on_parent)
    bars = figures.study_bars(report.variants, PRIMARY, CONFIDENCE, title=f"{spec['name']}: test accuracy")
    tracking.log_figure(bars, "figures/ablation_test_accuracy.png", **on_parent)
    curves = figures.study_curves({s.name: s.val_histories for s in report.variants}, spec["baseline"],
                                  title=f"{spec['name']}: validation accuracy")
    tracking.log_figure(curves, "figures/ablation_val_accuracy.png", **on_parent)
    tracking.set_tags({tracking.NOTE_TAG: description(report)}, **on_parent)
    return report
