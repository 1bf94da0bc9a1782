"""`load_data`: a `DataConfig` in, a `Data` out (batched tf.data pipelines and what a run logs about them)."""

import dataclasses
import hashlib
import math

import numpy as np
import tensorflow as tf

from .augment import model_views, pca_color_shift, random_crop_flip, random_crops, to_stored
from .cache import hash_json
from .files import DataError
from .images import Images
from .pixel_stats import statistics
from .sources import read_source
from .split import limit_test, train_val_indices


@dataclasses.dataclass
class Data:
    """Everything a training run needs to know about its data."""

    train: tf.data.Dataset    # (float32 (B,S,S,3) in 0..255, int32 (B,)), reshuffled each epoch, augmented
    val: tf.data.Dataset      # in a fixed order, never augmented
    test: tf.data.Dataset     # in a fixed order, never augmented; for the final evaluation only
    test_labels: np.ndarray   # int32 labels of `test` in dataset order
    class_names: list[str]
    image_size: int
    batch_size: int
    counts: dict              # {"train", "val", "test", "skipped"}: images per split, files not used
    mean: list[float]         # per-channel mean of the train split's pixels, 0..255 units
    std: list[float]          # per-channel (population) std of the train split's pixels
    source: str               # where the images came from, for logs and MLflow
    digest: str               # 16 hex digits identifying the images, labels and split
    # What predict does to a file (inference.Predictor); `native_size`: images held smaller (CIFAR's 32 px).
    preprocessing: dict = dataclasses.field(default_factory=dict)
    recipe_stats: dict | None = None      # paper recipe: RGB mean/std/covariance, PCA, for logging
    mean_image: np.ndarray | None = None  # paper recipe with pixel_mean: (stored, stored, 3) float32
    test_ten_crop: tf.data.Dataset | None = None  # ten_crop: 10 views per test image, images only
    train_eval: tf.data.Dataset | None = None     # train_eval_images, spread over train, fixed, never augmented
    num_classes = property(lambda self: len(self.class_names))
    steps_per_epoch = property(lambda self: max(1, math.ceil(self.counts["train"] / self.batch_size)))


def enable_op_determinism() -> None:
    tf.config.experimental.enable_op_determinism()


def load_data(cfg, image_size: int, batch_size: int, seed: int = 0, *, verbose: bool = True,
              deterministic: bool = True) -> Data:
    """The dataset `cfg` (a DataConfig) names at `image_size` px, shuffled and augmented by `seed`; batches in a
    free order unless `deterministic`."""
    paper = cfg.recipe == "paper"
    if paper and cfg.stored_size < image_size:
        raise DataError(f"the paper recipe crops {image_size}x{image_size} inputs from images stored at "
                        f"{cfg.stored_size}x{cfg.stored_size}: pass --stored-size {max(256, image_size)} "
                        f"(or at least {image_size}), or a smaller --image-size.")
    stored = cfg.stored_size if paper else image_size
    source = read_source(cfg, stored, "shorter_side_crop" if paper else "squash", verbose)

    train_idx, val_idx = train_val_indices(source.train.labels, cfg.val_fraction, cfg.train_limit,
                                           cfg.split_seed, own_val=source.val is not None)
    train = source.train[train_idx]
    val = source.val if val_idx is None else source.train[val_idx]
    kept = limit_test(source.test.labels, cfg.test_limit, cfg.split_seed)
    test = source.test if kept is None else source.test[kept]

    pixel_mean = paper and cfg.pixel_mean
    stats = statistics(train, hash_json({
        "data": source.identity, "train": hashlib.sha256(np.asarray(train_idx, np.int64).tobytes()).hexdigest(),
        "side": train.side, "pixel_mean": pixel_mean}), pixel_mean, verbose)
    mean, std, mean_image = stats.mean, stats.std, None
    if pixel_mean:
        mean_image = stats.mean_image.astype(np.float32)
        if mean_image.shape[0] != stored:   # CIFAR: the mean of the resized images is the resized mean
            mean_image = to_stored(mean_image[None], stored).numpy()[0]
        # The model's first layer then only scales: the mean is already gone.
        mean, std = np.zeros(3), stats.residual_std
    views = dict(image_size=image_size, stored_size=stored, mean_image=mean_image)

    def evaluation(x, y):
        return model_views(x, **views), y

    def augmented(x, y, batch_seed):
        if not paper:   # shifted and flipped at the stored resolution, then resized
            return to_stored(random_crop_flip(x, batch_seed, crop=cfg.random_crop, flip=cfg.random_flip),
                             stored), y
        crop_seed, color_seed = tf.unstack(tf.random.experimental.stateless_split(
            tf.cast(batch_seed, tf.int64), 2))
        x = random_crops(to_stored(x, stored, mean_image), image_size, crop_seed,
                         crop=cfg.random_crop, flip=cfg.random_flip)
        if cfg.pca_color:
            x = pca_color_shift(x, color_seed, stats.eigenvalues, stats.eigenvectors, cfg.pca_std)
        return x, y

    augment = cfg.augment and (cfg.random_crop or cfg.random_flip or (paper and cfg.pca_color))
    train_ds = mapped(train, batch_size, augmented if augment else evaluation, shuffle=True, seed=seed,
                      deterministic=deterministic, seeded=augment)
    test_ten_crop = None
    if paper and cfg.ten_crop:
        # ~batch_size crops per batch: 10 views of batch_size // 10 images.
        test_ten_crop = mapped(test, max(1, batch_size // 10), lambda x, y: model_views(x, crops="ten", **views))

    recipe_stats = None
    if paper:
        augmentation = {k: getattr(cfg, k) for k in ("augment", "random_crop", "random_flip", "pca_color", "pca_std")}
        recipe_stats = {   # computed_at_side < stored_size: on the native pixels (CIFAR's 32 px)
            "recipe": "paper", "stored_size": stored, "image_size": image_size, "computed_at_side": train.side,
            "streamed": train.streamed, **stats.to_json(), "pixel_mean": pixel_mean, "augmentation": augmentation,
            "pca_shift": "255 * sum_i alpha_i * pca_eigenvalues[i] * pca_eigenvectors_columns[:, i], "
                         "alpha_i ~ N(0, pca_std) per image; eigen-decomposition of covariance_rgb / 255^2",
            "ten_crop": cfg.ten_crop}
    split = {k: getattr(cfg, k) for k in ("val_fraction", "split_seed", "train_limit", "test_limit", "recipe")}
    digest = hash_json({"data": source.identity, "image_size": image_size, "stored_size": stored,
                        "pixel_mean": pixel_mean, **split})
    return Data(
        train=train_ds, val=mapped(val, batch_size, evaluation), test=mapped(test, batch_size, evaluation),
        test_labels=test.labels.astype(np.int32), class_names=list(source.class_names), image_size=image_size,
        batch_size=batch_size,
        counts={"train": len(train), "val": len(val), "test": len(test), "skipped": source.skipped},
        mean=[float(v) for v in mean], std=[float(v) if v > 0 else 1.0 for v in std], source=source.source,
        digest=digest, recipe_stats=recipe_stats, mean_image=mean_image, test_ten_crop=test_ten_crop,
        train_eval=mapped(train[np.linspace(0, len(train) - 1, min(cfg.train_eval_images, len(train)), dtype=int)],
                          batch_size, evaluation) if cfg.train_eval_images else None,
        preprocessing={"recipe": cfg.recipe, "resize": "shorter_side_crop" if paper else "squash",
                       "stored_size": stored, "image_size": image_size, "pixel_mean": pixel_mean,
                       **({"native_size": train.side} if train.side != stored else {})})


def mapped(images: Images, batch_size: int, transform, *, shuffle: bool = False, seed: int = 0,
           deterministic: bool = True, seeded: bool = False) -> tf.data.Dataset:
    """`images` in batches, each fetched and turned into `transform(x, y)` (`seeded`: `transform(x, y, batch_seed)`,
    new seeds each epoch) in one parallel map, prefetched."""
    keys = images.batch_keys(batch_size, shuffle=shuffle, seed=seed, deterministic=deterministic)
    if seeded:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((keys, seeds)).map(lambda k, s: transform(*images.fetch(k), s),
                                                   num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    else:
        ds = keys.map(lambda k: transform(*images.fetch(k)), num_parallel_calls=tf.data.AUTOTUNE,
                      deterministic=deterministic)
    return ds.prefetch(tf.data.AUTOTUNE)
