"""The statistics of ablation reports on plain numbers (numpy/scipy); the rules, and why: docs/methodology.md."""

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import optimize, stats as scipy_stats

CONFIDENCE, ALPHA, POWER = 0.95, 0.05, 0.8
NAN = float("nan")
# The readings of a difference, and the verdicts on a claim of the paper.
SIGNIFICANT, NO_EFFECT, BELOW_RESOLUTION, NOT_AVAILABLE = "significant", "no effect ≥ MDE", "below resolution", "n/a"
UNADJUSTED = "raw p < 0.05, not after Holm"
REPRODUCES, CONTRADICTS, NOT_DECIDED = "reproduces", "contradicts", "not decided"
NOT_MEASURABLE, NOT_IN_STUDY = "not measurable", "not in this study"


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
    """Welch's t-test and interval for mean(a) - mean(b); NaN with n < 2 in a group or no spread at all."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else NAN
    if len(a) < 2 or len(b) < 2 or (a.var(ddof=1) == 0.0 and b.var(ddof=1) == 0.0):
        return Welch(diff, NAN, NAN, NAN, NAN, NAN)
    with warnings.catch_warnings():   # one group without spread is fine for Welch; scipy warns anyway
        warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
        result = scipy_stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(confidence)
    return Welch(diff, float(ci.low), float(ci.high), float(result.pvalue), float(result.statistic), float(result.df))


def pooled_sd(a: Sequence[float], b: Sequence[float]) -> float:
    """The pooled standard deviation of two groups (NaN unless both have >= 2 values)."""
    if len(a) < 2 or len(b) < 2:
        return NAN
    return math.sqrt(((len(a) - 1) * np.var(a, ddof=1) + (len(b) - 1) * np.var(b, ddof=1)) / (len(a) + len(b) - 2))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for a single value, both NaN for none)."""
    x = np.asarray(values, dtype=float)
    return (float(x.mean()) if len(x) else NAN), (float(x.std(ddof=1)) if len(x) > 1 else NAN)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's adjusted p-values in the order given (R's `p.adjust(p, "holm")`); NaN stays NaN, uncounted."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, NAN)
    tested = np.flatnonzero(np.isfinite(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    stepped = (len(order) - np.arange(len(order))) * p[order]     # (m - i) p_(i), i = 0 .. m-1
    out[order] = np.minimum(1.0, np.maximum.accumulate(stepped))
    return [float(x) for x in out]


def dunnett(groups: Mapping[str, Sequence[float]], control: Sequence[float], seed: int = 0) -> dict[str, float]:
    """scipy.stats.dunnett's p-value of each group against `control`; NaN without 2 values each and spread."""
    names = list(groups)
    samples = [np.asarray(x, dtype=float) for x in (control, *groups.values())]
    if (not names or any(len(x) < 2 or not np.isfinite(x).all() for x in samples)
            or sum(float(np.var(x, ddof=1)) for x in samples) == 0.0):
        return dict.fromkeys(names, NAN)
    result = scipy_stats.dunnett(*samples[1:], control=samples[0], rng=seed)
    return {n: float(p) for n, p in zip(names, result.pvalue)}


def power(effect: float, sd: float, n_a: float, n_b: float, alpha: float = ALPHA) -> float:
    """The power of a two-sided two-sample t-test at `alpha` for a true difference `effect` (noncentral t)."""
    if not (math.isfinite(sd) and sd > 0 and n_a >= 2 and n_b >= 2 and math.isfinite(effect)):
        return NAN
    nc, df = abs(effect) / (sd * math.sqrt(1.0 / n_a + 1.0 / n_b)), n_a + n_b - 2
    t_crit = scipy_stats.t.ppf(1.0 - alpha / 2.0, df)
    lower = scipy_stats.nct.cdf(-t_crit, df, nc)   # the wrong-sign tail; NaN far out where it is 0
    return float(scipy_stats.nct.sf(t_crit, df, nc) + (lower if math.isfinite(lower) else 0.0))


def minimum_detectable_effect(sd: float, n_a: float, n_b: float, alpha: float = ALPHA,
                              target_power: float = POWER) -> float:
    """The true difference a two-sided t-test at `alpha` finds with `target_power` (sought below 10,000 sd)."""
    if not (math.isfinite(sd) and sd > 0 and n_a >= 2 and n_b >= 2):
        return NAN
    return float(sd * optimize.brentq(lambda d: power(d, 1.0, n_a, n_b, alpha) - target_power, 0.0, 1e4, xtol=1e-12))


def reading(w: Welch | None, p_adjusted: float, mde: float, alpha: float = ALPHA) -> str:
    """How the report reads one difference: significant / no effect >= MDE / below resolution / n/a."""
    if w is None or not (math.isfinite(w.ci_low) and math.isfinite(p_adjusted)):
        return NOT_AVAILABLE
    if p_adjusted < alpha:
        return SIGNIFICANT
    if math.isfinite(mde) and -mde < w.ci_low and w.ci_high < mde:
        return NO_EFFECT
    return UNADJUSTED if w.ci_low > 0 or w.ci_high < 0 else BELOW_RESOLUTION


def size_test(a: Sequence[float], b: Sequence[float], paper: float, margin: float, direction: int) -> tuple[float, str]:
    """TOST (a - b within paper ± margin) or inferiority (short of it): the smaller p, its verdict (methodology.md)."""
    def p(shift: float, alternative: str) -> float:   # Welch's one-sided p of mean(a) - mean(b) >, < shift
        return float(scipy_stats.ttest_ind(np.subtract(a, shift), b, equal_var=False, alternative=alternative).pvalue)

    equivalent = max(p(paper - margin, "greater"), p(paper + margin, "less"))
    short = p(paper - direction * margin, "greater" if direction < 0 else "less")
    return (equivalent, REPRODUCES) if equivalent <= short else (short, CONTRADICTS)


def censored(a: Sequence[float], b: Sequence[float], bound_a: Sequence[float], bound_b: Sequence[float]) -> Welch:
    """Logrank of epochs to a threshold (inf: censored at the bound); diff: log geometric-mean ratio; t > 0: a later."""
    runs = [(np.asarray(x, dtype=float), np.asarray(bound, dtype=float)) for x, bound in ((a, bound_a), (b, bound_b))]
    diff = float(np.subtract(*[np.log(np.where(np.isinf(x), bound, x)).mean() for x, bound in runs]))
    if np.isinf(np.concatenate([a, b])).all():
        return Welch(diff, NAN, NAN, NAN, NAN, NAN)
    result = scipy_stats.logrank(*[scipy_stats.CensoredData(x[np.isfinite(x)], right=bound[np.isinf(x)])
                                   for x, bound in runs])
    return Welch(diff, NAN, NAN, float(result.pvalue), -float(result.statistic), NAN)


def verdict(w: Welch | None, p_adjusted: float, direction: int, size: str | None = None, alpha: float = ALPHA) -> str:
    """A claim's verdict from its adjusted test: size_test's (`size`), or the sign of a - b against `direction`."""
    if w is None or not (math.isfinite(w.diff) and math.isfinite(p_adjusted)):
        return NOT_MEASURABLE
    if p_adjusted >= alpha:
        return NOT_DECIDED
    return size or (REPRODUCES if (w.t if math.isfinite(w.t) else w.diff) * direction > 0 else CONTRADICTS)


def seeds_needed(effect: float, sd: float, alpha: float = ALPHA, target_power: float = POWER, most: int = 200) -> float:
    """Seeds per arm for a two-sided t-test at `alpha` to find a true `effect` at spread `sd` with `target_power`."""
    if not (math.isfinite(sd) and sd > 0 and math.isfinite(effect) and effect != 0):
        return NAN
    return float(next((n for n in range(2, most + 1) if power(effect, sd, n, n, alpha) >= target_power), math.inf))


def tail_length(epochs: int, fraction: float = 0.2) -> int:
    """ceil(fraction * epochs), at least 1 and at most epochs - 1: the epochs of "the last fifth"."""
    return min(epochs - 1, max(1, math.ceil(fraction * epochs - 1e-9)))


def plateau(values: Sequence[float], fraction: float = 0.2) -> float:
    """The change of a per-epoch series over its last `fraction` of epochs (tail_length); NaN below 2 epochs."""
    return float(values[-1]) - float(values[-1 - tail_length(len(values), fraction)]) if len(values) > 1 else NAN


def epochs_to_converge(values: Sequence[float], within: float, fraction: float = 0.2) -> float:
    """Epochs until a series comes within `within` of its best, to stay there before its last `fraction`; else inf."""
    x = [float(v) for v in values]
    if len(x) < 2:
        return NAN
    k, target = tail_length(len(x), fraction), max(x) - within
    reached = epochs_to(x, target)
    return math.inf if reached > len(x) - k or min(x[-k:]) < target else reached


def epochs_to(values: Sequence[float], threshold: float) -> float:
    """Epochs until a per-epoch series first reaches `threshold` (linear between epoch ends, from 0); inf if never."""
    previous = 0.0
    for epoch, value in enumerate(values, 1):
        value = float(value)
        if value >= threshold:
            if value == previous:
                return float(epoch)
            return epoch - 1 + max(0.0, min(1.0, (threshold - previous) / (value - previous)))
        previous = value
    return math.inf


def adastop(arms: Mapping[str, Mapping[int, float]], n: int, max_rounds: int, alpha: float = ALPHA) -> dict:
    """AdaStop of each arm vs the first ({seed: value}; round k: seeds kn ... kn+n-1), replayed over complete rounds."""
    from adastop import MultipleAgentsComparator

    names, k = list(arms), 0
    comparator = MultipleAgentsComparator(n, max_rounds, comparisons=np.array([(i, 0) for i in range(1, len(names))]),
                                          alpha=alpha, seed=0)   # seeded permutations: a replay decides the same
    rows = [{"variant": name, "decision": NOT_DECIDED, "rounds": 0, "seeds": 0} for name in names[1:]]
    while k < max_rounds and not comparator.is_finished:
        z = [np.array([arms[name].get(s, NAN) for s in range((k + 1) * n)]) for name in names]
        open_ = [r["decision"] == NOT_DECIDED for r in rows]
        if not all(np.isfinite(x).all() for x, needed in zip(z, [True, *open_]) if needed):
            break   # an open arm's round is not complete (not run yet, or failed)
        comparator.partial_compare(dict(enumerate(z)), verbose=False)
        k += 1
        for row, decision in zip(rows, comparator.decisions.values()):
            if row["decision"] == NOT_DECIDED:   # AdaStop keeps a decided comparison's decision
                row.update(decision=NOT_DECIDED if decision == "continue" else decision, rounds=k, seeds=k * n)
    undecided = sum(r["decision"] in ("equal", NOT_DECIDED) for r in rows)
    why = (f"all comparisons decided at round {k}" if not undecided else
           f"max_rounds {k} reached with {undecided} undecided (AdaStop: equal)" if k == max_rounds
           else f"not finished: {k} of {max_rounds} rounds complete, {undecided} comparisons open")
    return {"rounds_done": k, "stopped": why, "comparisons": rows}
