"""Stratified splits by index, seeded by `split_seed` alone (every run of a study sees the same split)."""

import math
import warnings

import numpy as np
from sklearn.model_selection import train_test_split

from .files import DataError

# Share of a folder without its own test/ that is held out as the test split.
FOLDER_TEST_FRACTION = 0.2


def held_out_size(labels: np.ndarray, fraction: float) -> int:
    """Images to hold out: `fraction` of them, rounded up, and at least one per class where the other side
    can spare it (sklearn refuses to stratify otherwise)."""
    n, n_classes = len(labels), len(np.unique(labels))
    return max(math.ceil(fraction * n), min(n_classes, n - n_classes))


def stratified(indices: np.ndarray, labels: np.ndarray, n_out: int, seed: int, what: str):
    """(kept, held out), `n_out` held out, stratified by label where the class counts allow it."""
    if n_out < 1 or n_out >= len(indices):
        raise DataError(f"too few images ({len(indices)}) to hold out a {what} split of {n_out}: "
                        "add images, or change val_fraction / train_limit.")
    n_classes = len(np.unique(labels))
    stratify = labels
    if np.unique(labels, return_counts=True)[1].min() < 2 or min(n_out, len(indices) - n_out) < n_classes:
        warnings.warn(f"the {what} split is not stratified: a class has fewer than 2 images, or a "
                      f"side of the split ({n_out} of {len(indices)}) has fewer images than the "
                      f"{n_classes} classes.", stacklevel=3)
        stratify = None
    return train_test_split(indices, test_size=n_out, stratify=stratify, random_state=seed)


def carve_test(labels: np.ndarray, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, test) positions, each sorted: the test split of a folder without test/."""
    keep, out = stratified(np.arange(len(labels)), labels, held_out_size(labels, FOLDER_TEST_FRACTION),
                           split_seed, "test")
    return np.sort(keep), np.sort(out)


def train_val_indices(labels: np.ndarray, val_fraction: float, train_limit: int | None, split_seed: int,
                      *, own_val: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(train, val) positions into the training images, each sorted; val is None when the source has
    its own validation split (`own_val`). `train_limit` keeps a stratified subset of train."""
    indices = np.arange(len(labels))
    if own_val:
        train_idx, val_idx = indices, None
    else:
        train_idx, val_idx = stratified(indices, labels, held_out_size(labels, val_fraction), split_seed,
                                        "validation")
    if train_limit is not None and train_limit < len(train_idx):
        train_idx, _ = stratified(train_idx, labels[train_idx], len(train_idx) - train_limit, split_seed,
                                  "train_limit")
    return np.sort(train_idx), None if val_idx is None else np.sort(val_idx)


def limit_test(labels: np.ndarray, test_limit: int | None, split_seed: int) -> np.ndarray | None:
    """Sorted positions of a stratified subset of `test_limit` test images, or None to keep them all."""
    if test_limit is None or test_limit >= len(labels):
        return None
    keep, _ = stratified(np.arange(len(labels)), labels, len(labels) - test_limit, split_seed, "test_limit")
    return np.sort(keep)
