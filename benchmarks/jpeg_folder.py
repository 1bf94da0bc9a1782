"""A generated image folder at ImageNet's shape for the benchmarks: class folders of smooth random JPEGs
(photo-like file sizes, unlike pure noise), written by a process pool."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path


def make_jpeg_folder(folder: Path, classes: int, per_class: int, sides: tuple[int, int], seed: int = 0) -> int:
    """`classes` folders (`n00000` ...) of `per_class` JPEGs, alternately `sides` and transposed; the count."""
    jobs = [(Path(folder) / f"n{c:05d}", per_class, sides, seed * 1_000_003 + c) for c in range(classes)]
    with concurrent.futures.ProcessPoolExecutor() as pool:
        return sum(pool.map(write_class, jobs, chunksize=max(1, classes // 64)))


def write_class(job: tuple[Path, int, tuple[int, int], int]) -> int:
    import numpy as np
    from PIL import Image

    path, count, (short, long), seed = job
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = (long, short) if i % 2 else (short, long)
        coarse = rng.uniform(0, 255, (h // 16 + 1, w // 16 + 1, 3)).astype("uint8")
        image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype="float32")
        image += rng.normal(0, 12, image.shape)
        Image.fromarray(image.clip(0, 255).astype("uint8")).save(path / f"{i:04d}.jpg", quality=90)
    return count
