"""Figures people would rather look at than read: learning curves and confusion matrices."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers, in CI and under `mlflow run`
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# (title, train key, validation key) of each learning-curve panel.
CURVE_PANELS = (
    ("loss", "loss", "val_loss"),
    ("top-1 accuracy", "accuracy", "val_accuracy"),
    ("top-5 accuracy", "top5_accuracy", "val_top5_accuracy"),
)


def learning_curves(history: Mapping[str, Sequence[float]], title: str = ""):
    """Train vs validation loss, top-1 and top-5 per epoch (plus the learning rate if it was logged)."""
    panels = [p for p in CURVE_PANELS if p[1] in history]
    with_lr = "learning_rate" in history
    fig, axes = plt.subplots(1, len(panels) + with_lr, figsize=(4.2 * (len(panels) + with_lr), 3.4),
                             squeeze=False)
    for ax, (name, train_key, val_key) in zip(axes[0], panels):
        epochs = np.arange(1, len(history[train_key]) + 1)
        ax.plot(epochs, history[train_key], marker="o", label="train")
        if val_key in history:
            ax.plot(epochs, history[val_key], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    if with_lr:
        ax = axes[0][-1]
        ax.plot(np.arange(1, len(history["learning_rate"]) + 1), history["learning_rate"], marker="o")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title("learning rate")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str],
                     title: str = ""):
    """Row-normalised confusion matrix (recall on the diagonal) from scikit-learn."""
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(5.0, 0.45 * len(class_names) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(
        labels, predictions, labels=np.arange(len(class_names)), display_labels=list(class_names),
        normalize="true", values_format=".2f", xticks_rotation=45, colorbar=False, ax=ax,
        include_values=len(class_names) <= 20,
    )
    ax.set_title(title or "confusion matrix (rows: true class, normalised)")
    fig.tight_layout()
    return fig
