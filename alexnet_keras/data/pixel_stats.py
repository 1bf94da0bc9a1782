"""A training split's colour statistics (mean, std, RGB covariance and its PCA, mean image) from cached sums."""

import contextlib
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
               "pca_eigenvalues": self.eigenvalues.tolist(), "pca_eigenvectors_columns": self.eigenvectors.tolist()}
        if self.residual_std is not None:
            out["std_rgb_after_mean_image"] = self.residual_std.tolist()
        return out


def moments(batches, pixel_mean: bool) -> dict[str, np.ndarray]:
    """The float64 sums of uint8 (B,H,W,3) `batches` that every statistic comes from (what the cache keeps)."""
    counts, total, products, pixel_total = np.zeros(2, np.int64), np.zeros(3), np.zeros((3, 3)), None
    for batch in batches:
        flat = np.asarray(batch).reshape(-1, 3)
        for start in range(0, len(flat), 1 << 20):   # 24 MB of float64 at a time
            chunk = flat[start:start + (1 << 20)].astype(np.float64)
            total += chunk.sum(axis=0)
            products += chunk.T @ chunk
        counts += (len(batch), len(flat))
        if pixel_mean:
            summed = np.sum(batch, axis=0, dtype=np.float64)
            pixel_total = summed if pixel_total is None else pixel_total + summed
    sums = {"counts": counts, "total": total, "products": products}
    return sums if pixel_total is None else {**sums, "pixel_total": pixel_total}


def from_moments(counts, total, products, pixel_total=None) -> RGBStats:
    images, pixels = (int(c) for c in counts)
    if not pixels:
        raise DataError("no training images to compute the colour statistics on.")
    mean = total / pixels
    covariance = products / pixels - np.outer(mean, mean)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance / 255.0 ** 2)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = np.maximum(eigenvalues[order], 0.0), eigenvectors[:, order]
    eigenvectors = eigenvectors * np.where(eigenvectors.sum(axis=0) < 0, -1.0, 1.0)
    stats = RGBStats(images, pixels, mean, np.sqrt(np.maximum(np.diag(covariance), 0.0)), covariance, eigenvalues,
                     eigenvectors)
    if pixel_total is not None:
        stats.mean_image = pixel_total / images
        # sum over pixels of (x - mu_p)^2 = sum x^2 - images * sum_p mu_p^2, per channel
        second = np.diag(products) / pixels - np.mean(np.square(stats.mean_image), axis=(0, 1))
        stats.residual_std = np.sqrt(np.maximum(second, 0.0))
    return stats


def statistics(images: Images, key: str, pixel_mean: bool, verbose: bool) -> RGBStats:
    """RGBStats of `images`, kept in the cache under `key` (a streamed ImageNet pass takes minutes)."""
    cache_file = cache_root() / "stats" / f"{key}.npz"
    with contextlib.suppress(TypeError, ValueError):   # missing or damaged: computed again
        return from_moments(**load_npz(cache_file))
    start = time.perf_counter()
    sums = moments((x for x, _ in images.batch_keys(256).map(images.fetch).as_numpy_iterator()), pixel_mean)
    if verbose and len(images) >= PROGRESS_MIN_FILES:
        print(f"Colour statistics of {len(images)} training images in {time.perf_counter() - start:.1f} s "
              "(cached afterwards).", flush=True)
    save_npz(cache_file, sums)
    return from_moments(**sums)
