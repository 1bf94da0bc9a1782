"""Augmentation and evaluation views as TF image ops on batches: crops, flips, the paper's ten views,
"fancy PCA", and `model_views`. Every random op is stateless in an explicit seed and draws per image
with one gather for the whole batch (4-5x faster than per-image crops).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# The order of the paper's ten test views in `ten_crops` (and in predict's output).
TEN_CROP_VIEWS = ("top_left", "top_right", "bottom_left", "bottom_right", "center",
                  "top_left_flipped", "top_right_flipped", "bottom_left_flipped", "bottom_right_flipped",
                  "center_flipped")


def random_crop_flip(images: tf.Tensor, seed: tf.Tensor, pad: int | None = None, *, crop: bool = True,
                     flip: bool = True) -> tf.Tensor:
    """Random translation by up to `pad` pixels each way (as a random crop of the image padded by
    reflection) and random horizontal flip, drawn independently for every image of `images`
    (B,H,W,C, any dtype; H, W static). `crop=False` / `flip=False` leave that part out.

    Stateless: the same `seed` (two integers) gives the same result, eagerly or inside
    `tf.data.Dataset.map`. `pad` defaults to H // 8: 4 px for CIFAR's 32.
    """
    images = tf.convert_to_tensor(images)
    seed = tf.cast(seed, tf.int64)
    batch = tf.shape(images)[0]
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    if pad is None:
        pad = height // 8
    pad = min(pad, height - 1, width - 1)   # reflection cannot reach further than the image
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    offsets = tf.random.stateless_uniform([batch, 2], crop_seed, minval=-pad, maxval=pad + 1,
                                          dtype=tf.int32)
    if not crop:
        offsets = tf.zeros_like(offsets)
    flip = tf.logical_and(tf.random.stateless_uniform([batch], flip_seed) < 0.5, flip)

    def reflect(i, n):   # tf.pad's REFLECT: -1 -> 1, n -> n - 2
        i = tf.abs(i)
        return tf.where(i >= n, 2 * (n - 1) - i, i)

    # The source pixel of every output pixel, then one gather for the whole batch: 4-5x faster than
    # tf.pad + per-image crops + tf.reverse, which made augmentation the bottleneck of the pipeline.
    cols = tf.range(width)[None, :]
    cols = reflect(tf.where(flip[:, None], width - 1 - cols, cols) + offsets[:, 1:], width)
    rows = reflect(tf.range(height)[None, :] + offsets[:, :1], height)
    flat = tf.range(batch)[:, None, None] * (height * width) + rows[:, :, None] * width + cols[:, None, :]
    return tf.gather(tf.reshape(images, [-1, channels]), flat)


def center_crop(images: tf.Tensor, size: int) -> tf.Tensor:
    """The central size x size window of every image of a batch (B,H,W,C; H, W static)."""
    images = tf.convert_to_tensor(images)
    top, left = (images.shape[1] - size) // 2, (images.shape[2] - size) // 2
    return images[:, top:top + size, left:left + size]


def random_crops(images: tf.Tensor, size: int, seed: tf.Tensor, *, crop: bool = True,
                 flip: bool = True) -> tf.Tensor:
    """A size x size window of every image of a batch (B,H,W,C; H, W static), at a position drawn
    uniformly over all (H-size+1)*(W-size+1) positions (`crop=False`: the centre), reflected
    horizontally with probability 1/2 (`flip`), independently per image. Stateless in `seed`.

    The paper's training crops: "extracting random 224x224 patches (and their horizontal
    reflections) from the 256x256 images".
    """
    images = tf.convert_to_tensor(images)
    seed = tf.cast(seed, tf.int64)
    batch = tf.shape(images)[0]
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if crop:
        u = tf.random.stateless_uniform([batch, 2], crop_seed)
        top = tf.minimum(tf.cast(u[:, 0] * (height - size + 1), tf.int32), height - size)
        left = tf.minimum(tf.cast(u[:, 1] * (width - size + 1), tf.int32), width - size)
    else:
        top = tf.fill([batch], (height - size) // 2)
        left = tf.fill([batch], (width - size) // 2)
    mirrored = tf.logical_and(tf.random.stateless_uniform([batch], flip_seed) < 0.5, flip)
    steps = tf.range(size)
    rows = top[:, None] + steps[None, :]
    cols = left[:, None] + tf.where(mirrored[:, None], size - 1 - steps[None, :], steps[None, :])
    # One gather for the whole batch, as in random_crop_flip.
    flat = tf.range(batch)[:, None, None] * (height * width) + rows[:, :, None] * width + cols[:, None, :]
    return tf.gather(tf.reshape(images, [-1, channels]), flat)


def ten_crops(images: tf.Tensor, size: int) -> tf.Tensor:
    """The paper's ten test views of every image of a batch: (B,H,W,C) -> (B,10,size,size,C).

    "the four corner patches and the center patch as well as their horizontal reflections", in the
    order of TEN_CROP_VIEWS: top-left, top-right, bottom-left, bottom-right, centre, then the same five
    mirrored (each patch reflected left-right).
    """
    images = tf.convert_to_tensor(images)
    height, width = images.shape[1], images.shape[2]
    corners = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size),
               ((height - size) // 2, (width - size) // 2)]
    views = [images[:, top:top + size, left:left + size] for top, left in corners]
    views += [tf.reverse(view, axis=[2]) for view in views]
    return tf.stack(views, axis=1)


def pca_color_shift(images: tf.Tensor, seed: tf.Tensor, eigenvalues, eigenvectors,
                    std: float = 0.1) -> tf.Tensor:
    """The paper's "fancy PCA" colour augmentation on a batch of float images in 0..255 units.

    Every pixel of image b gets the same offset 255 * sum_i alpha_bi * lambda_i * p_i, with
    alpha_bi ~ N(0, std) drawn once per image and (p_i, lambda_i) the eigenvectors (columns of
    `eigenvectors`) and eigenvalues of the 3x3 covariance of the training set's RGB values in [0, 1]
    units (RGBStats.eigenvalues). Stateless in `seed`.
    """
    images = tf.convert_to_tensor(images)
    alpha = tf.random.stateless_normal([tf.shape(images)[0], 3], tf.cast(seed, tf.int64), stddev=std)
    weights = alpha * tf.constant(np.asarray(eigenvalues, np.float32))[None, :]
    shift = 255.0 * tf.matmul(weights, tf.constant(np.asarray(eigenvectors, np.float32)), transpose_b=True)
    return images + tf.cast(shift, images.dtype)[:, None, None, :]


def model_views(images: tf.Tensor, *, image_size: int, stored_size: int, mean_image=None,
                crops: str = "center") -> tf.Tensor:
    """What the model sees at evaluation, from a batch of stored images (B,H,W,3), any dtype.

    The images are resized to stored_size if they have another size (CIFAR's 32 px), the mean image is
    subtracted (paper recipe with pixel_mean), then `crops` "center" gives (B,S,S,3) and "ten" gives
    (B*10,S,S,3): the ten views of image 0, then those of image 1, ... (S = image_size). float32.
    """
    x = to_stored(images, stored_size, mean_image)
    if crops == "center":
        return center_crop(x, image_size)
    if crops != "ten":
        raise ValueError(f"crops must be 'center' or 'ten'; got {crops!r}")
    return tf.reshape(ten_crops(x, image_size), [-1, image_size, image_size, x.shape[-1]])


def to_stored(images: tf.Tensor, stored_size: int, mean_image=None) -> tf.Tensor:
    """A batch of images (B,H,W,3), any dtype, as float32 at stored_size x stored_size (resized when
    H differs: CIFAR's 32 px), less the per-pixel mean image when one is given."""
    x = tf.cast(images, tf.float32)
    side = x.shape[1]
    if side != stored_size:
        # Antialiasing only matters when shrinking, and its kernel is several times slower.
        x = tf.image.resize(x, [stored_size, stored_size], antialias=stored_size < side)
    if mean_image is not None:
        x = x - tf.constant(np.asarray(mean_image, np.float32))
    return x
