"""Colour statistics of a training split in one pass of float64 sums (`Moments`): per-channel mean and
std, the RGB covariance and its principal components ("fancy PCA"), the per-pixel mean image; cached.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from .cache import cache_root, load_npz, save_npz
from .decode import PROGRESS_MIN_FILES
from .files import DataError
from .images import Images


@dataclasses.dataclass
class RGBStats:
    """Statistics of the training pixels (0..255 units unless said otherwise)."""

    images: int
    pixels: int
    mean: np.ndarray            # (3,) per-channel mean
    std: np.ndarray             # (3,) per-channel population std
    covariance: np.ndarray      # (3, 3) population covariance of the RGB values
    eigenvalues: np.ndarray     # (3,) of covariance / 255**2 (RGB in [0, 1]), largest first
    eigenvectors: np.ndarray    # (3, 3) unit columns p_i matching `eigenvalues`, sign: sum(p_i) >= 0
    mean_image: np.ndarray | None = None    # (H, W, 3) per-pixel mean, when asked for
    residual_std: np.ndarray | None = None  # (3,) per-channel std after subtracting mean_image

    def to_json(self) -> dict:
        out = {"images": self.images, "pixels": self.pixels, "mean_rgb": self.mean.tolist(),
               "std_rgb": self.std.tolist(), "covariance_rgb": self.covariance.tolist(),
               "pca_eigenvalues": self.eigenvalues.tolist(),
               "pca_eigenvectors_columns": self.eigenvectors.tolist()}
        if self.residual_std is not None:
            out["std_rgb_after_mean_image"] = self.residual_std.tolist()
        return out


class Moments:
    """Running float64 sums over batches of uint8 RGB images: one pass gives every statistic."""

    def __init__(self, pixel_mean: bool = False, counts=(0, 0), total=None, products=None, pixel_total=None):
        self.images, self.pixels = (int(c) for c in counts)
        self.total = np.zeros(3) if total is None else total
        self.products = np.zeros((3, 3)) if products is None else products
        self.pixel_mean = pixel_mean or pixel_total is not None
        self.pixel_total = pixel_total

    @classmethod
    def of(cls, batches, pixel_mean: bool) -> "Moments":
        moments = cls(pixel_mean)
        for batch in batches:
            moments.add(np.asarray(batch))
        return moments

    def add(self, batch: np.ndarray) -> None:
        flat = batch.reshape(-1, 3)
        for start in range(0, len(flat), 1 << 20):   # 24 MB of float64 at a time
            chunk = flat[start:start + (1 << 20)].astype(np.float64)
            self.total += chunk.sum(axis=0)
            self.products += chunk.T @ chunk
        self.images += len(batch)
        self.pixels += len(flat)
        if self.pixel_mean:
            summed = batch.sum(axis=0, dtype=np.float64)
            self.pixel_total = summed if self.pixel_total is None else self.pixel_total + summed

    def arrays(self) -> dict:
        """The sums as the cache keeps them; `Moments(**arrays)` reads them back."""
        out = {"counts": np.array([self.images, self.pixels], np.int64), "total": self.total,
               "products": self.products}
        return out if self.pixel_total is None else {**out, "pixel_total": self.pixel_total}

    def stats(self) -> RGBStats:
        if not self.pixels:
            raise DataError("no training images to compute the colour statistics on.")
        mean = self.total / self.pixels
        covariance = self.products / self.pixels - np.outer(mean, mean)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance / 255.0 ** 2)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues, eigenvectors = np.maximum(eigenvalues[order], 0.0), eigenvectors[:, order]
        eigenvectors = eigenvectors * np.where(eigenvectors.sum(axis=0) < 0, -1.0, 1.0)
        stats = RGBStats(self.images, self.pixels, mean, np.sqrt(np.maximum(np.diag(covariance), 0.0)),
                         covariance, eigenvalues, eigenvectors)
        if self.pixel_total is not None:
            stats.mean_image = self.pixel_total / self.images
            # sum over pixels of (x - mu_p)^2 = sum x^2 - images * sum_p mu_p^2, per channel
            second = np.diag(self.products) / self.pixels - np.mean(np.square(stats.mean_image), axis=(0, 1))
            stats.residual_std = np.sqrt(np.maximum(second, 0.0))
        return stats


def rgb_statistics(batches, *, pixel_mean: bool = False) -> RGBStats:
    """RGBStats of an iterable of uint8 (B,H,W,3) batches (float64 sums, one pass)."""
    return Moments.of(batches, pixel_mean).stats()


def statistics(images: Images, key: str, pixel_mean: bool, verbose: bool) -> RGBStats:
    """RGBStats of `images`, computed once and kept in the cache under `key` (a streamed ImageNet pass
    takes minutes)."""
    cache_file = cache_root() / "stats" / f"{key}.npz"
    cached = load_npz(cache_file)
    if cached is not None:
        try:
            return Moments(**cached).stats()
        except (TypeError, ValueError):   # a damaged cache is only a reason to compute again
            pass
    start = time.perf_counter()
    moments = Moments.of(images.numpy_batches(), pixel_mean)
    if verbose and len(images) >= PROGRESS_MIN_FILES:
        print(f"Colour statistics of {len(images)} training images in {time.perf_counter() - start:.1f} s "
              "(cached afterwards).", flush=True)
    save_npz(cache_file, moments.arrays())
    return moments.stats()
