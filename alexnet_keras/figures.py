"""Every figure the package logs: a training run's learning curves and confusion matrix, an ablation
study's accuracy bars and validation curves, a sweep's objective per trial (headless: Agg)."""

import math
from typing import Any, Mapping, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator, NullFormatter

from .tables import cell, confusion_rows

matplotlib.use("Agg")   # no display needed: every figure is saved, never shown

# (title, train key, validation key) of each learning-curve panel.
CURVE_PANELS = (("loss", "loss", "val_loss"), ("top-1 accuracy", "accuracy", "val_accuracy"),
                ("top-5 accuracy", "top5_accuracy", "val_top5_accuracy"), ("learning rate", "learning_rate", None))
FULL_MATRIX_CLASSES = 30   # up to this many classes the confusion figure is the whole matrix, still readable


def _finish(fig, title: str = ""):
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def learning_curves(history: Mapping[str, Sequence[float]], title: str = ""):
    """Train vs validation loss, top-1 and top-5 per epoch (plus the learning rate if it was logged)."""
    panels = [p for p in CURVE_PANELS if p[1] in history]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, train_key, val_key) in zip(axes[0], panels):
        epochs = np.arange(1, len(history[train_key]) + 1)
        ax.plot(epochs, history[train_key], marker="o", label="train")
        if val_key in history:
            ax.plot(epochs, history[val_key], marker="o", label="validation")
            ax.legend()
        ax.set(title=name, xlabel="epoch", yscale="log" if name == "learning rate" else "linear")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return _finish(fig, title)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str], title: str = ""):
    """Row-normalised confusion matrix (recall on the diagonal) up to FULL_MATRIX_CLASSES classes. Above,
    on a canvas of fixed size whatever the class count: the most-confused pairs and the spread of the
    per-class recall (the whole matrix is tables.confusion_rows, a file)."""
    n = len(class_names)
    if n <= FULL_MATRIX_CLASSES:
        from sklearn.metrics import ConfusionMatrixDisplay

        fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * n + 2.5),) * 2)
        ConfusionMatrixDisplay.from_predictions(
            labels, predictions, labels=np.arange(n), display_labels=list(class_names), normalize="true",
            values_format=".2f", xticks_rotation=45, colorbar=False, ax=ax, include_values=n <= 20)
        ax.set_title("confusion matrix (rows: true class, normalised)")
        return _finish(fig, title)
    pairs = sorted((r for r in confusion_rows(labels, predictions, class_names) if r["true"] != r["predicted"]),
                   key=lambda r: (-r["fraction_of_true"], -r["count"]))[:20]
    support = np.bincount(labels, minlength=n)
    recall = np.bincount(labels[labels == predictions], minlength=n)[support > 0] / support[support > 0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 6))
    left.barh(np.arange(len(pairs))[::-1], [r["fraction_of_true"] for r in pairs])
    left.set_yticks(np.arange(len(pairs))[::-1], [f"{r['true'][:24]} → {r['predicted'][:24]}" for r in pairs])
    left.set(xlabel="share of the true class's test images",
             title=f"the {len(pairs)} most-confused pairs (true → predicted)" if pairs else "no confusions")
    right.hist(recall, bins=np.linspace(0.0, 1.0, 21))
    right.set(xlabel="recall (top-1)", ylabel="classes",
              title=f"recall of the {len(recall)} (of {n}) classes\nwith test images: mean {recall.mean():.3f}")
    return _finish(fig, title)


def study_bars(variants: Sequence[Any], metric: str, confidence: float, title: str = ""):
    """An ablation study's `metric` per variant (report.VariantSummary: mean ± std, a dot per seed), and
    each variant's difference to the baseline with its interval and ±MDE band."""
    n = len(variants)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.5 * n + 1.8), sharey=True)
    y = np.arange(n)[::-1]
    means, stds = zip(*(s.stats[metric] for s in variants))
    left.barh(y, np.nan_to_num(means), xerr=np.nan_to_num(stds), alpha=0.8, capsize=4,
              color=["tab:orange" if s.is_baseline else "tab:blue" for s in variants])
    for yi, s in zip(y, variants):
        left.scatter(s.values[metric], [yi] * len(s.values[metric]), color="black", s=12, zorder=3)
        w = s.vs_baseline
        if s.is_baseline:
            right.scatter([0.0], [yi], color="tab:orange", marker="D")
        elif w is not None and math.isfinite(w.diff):
            face = "tab:blue" if s.significant else "white"
            xerr = [[w.diff - w.ci_low], [w.ci_high - w.diff]] if math.isfinite(w.ci_low) else None
            right.errorbar([w.diff], [yi], xerr=xerr, fmt="o", color="tab:blue", markerfacecolor=face, capsize=4)
            if math.isfinite(s.mde):
                right.plot([-s.mde, s.mde], [yi, yi], color="gray", alpha=0.35, linewidth=6,
                           solid_capstyle="butt", zorder=0)
    left.set_yticks(y, [s.name for s in variants])
    label = metric.replace("_", " ")
    left.set_xlabel(f"{label} (mean ± std over seeds; dots: seeds)")
    right.axvline(0.0, color="gray", linestyle="--", linewidth=1)
    right.set_xlabel(f"Δ {label} vs baseline ({int(confidence * 100)}% Welch CI)\n"
                     f"filled: significant after Holm · grey band: ±MDE")
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    return _finish(fig, title)


def study_curves(histories: Mapping[str, Sequence[Sequence[float]]], baseline: str, title: str = ""):
    """Validation accuracy per epoch of each variant ({name: one series per seed}): the mean over the seeds
    that reached the epoch, in a band of ± their std."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, runs in histories.items():
        per_epoch = [[h[e] for h in runs if len(h) > e] for e in range(max(map(len, runs), default=0))]
        if per_epoch:
            mean = np.array([np.mean(v) for v in per_epoch])
            std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in per_epoch])
            style = {"color": "black", "linewidth": 2.5} if name == baseline else {"linewidth": 1.5}
            epochs = np.arange(1, len(mean) + 1)
            line, = ax.plot(epochs, mean, marker="o", markersize=3, label=name, **style)
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.12)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="validation accuracy (mean over seeds, band ± std)", title=title)
    ax.grid(alpha=0.3)
    if any(h for runs in histories.values() for h in runs):
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes)
    return _finish(fig)


def sweep_figure(rows: Sequence[Mapping[str, Any]], sweep: Any, weights: Mapping[str, float], top: int = 3):
    """A sweep's objective per trial (with the best so far), then against its `top` most important
    hyperparameters (`sweep`: a sweep.Sweep; `rows`: its trials, as tune.trial_rows gives them)."""
    objective = sweep.objective
    names = sorted(sweep.names, key=lambda n: (-weights.get(n, 0.0), sweep.names.index(n)))[:top]
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(4.2 * (1 + len(names)), 3.6), squeeze=False)
    ordered = sorted(rows, key=lambda r: r["trial"])
    done = [r for r in ordered if r[objective] is not None]
    ax = axes[0][0]
    if done:
        ax.plot([r["trial"] for r in done], [r[objective] for r in done], "o", label="trial")
        best_so_far = (np.maximum if sweep.direction == "max" else np.minimum).accumulate([r[objective] for r in done])
        ax.step([r["trial"] for r in done], best_so_far, where="post", color="C1", label="best so far")
    failed = [r["trial"] for r in ordered if r[objective] is None]
    if failed:
        ax.plot(failed, [min((r[objective] for r in done), default=0.0)] * len(failed), "x", color="C3",
                label="failed")
    ax.set(xlabel="trial", ylabel=objective, title=f"{objective} per trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    rng = np.random.default_rng(0)   # the jitter of categorical values, the same on every redraw
    for ax, name in zip(axes[0][1:], names):
        param = sweep.param(name)
        values, scores = [r[name] for r in done], [r[objective] for r in done]
        if param.numeric:
            ax.plot(values, scores, "o")
            if param.sampling == "log":
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            labels = [cell(v) for v in (param.values if param.type == "choice" else (False, True))]
            position = {label: i for i, label in enumerate(labels)}
            ax.plot([position[cell(v)] + rng.uniform(-0.08, 0.08) for v in values], scores, "o")
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set(xlabel=name, title=f"{name} (importance {weights.get(name, 0.0):.2f})")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    return _finish(fig, f"sweep {sweep.name}: {objective} ({sweep.direction})")
