"""Augmentation and evaluation views as TF ops on batches; every random op is stateless and draws per image."""

import numpy as np
import tensorflow as tf

# The order of the paper's ten test views in `ten_crops` (and in predict's output).
TEN_CROP_VIEWS = tuple(corner + flipped for flipped in ("", "_flipped")
                       for corner in ("top_left", "top_right", "bottom_left", "bottom_right", "center"))


def random_crop_flip(images: tf.Tensor, seed: tf.Tensor, pad: int | None = None, *, crop: bool = True,
                     flip: bool = True) -> tf.Tensor:
    """Random shifts by up to `pad` px (default H // 8) as crops of the reflect-padded batch (B,H,H,C), and flips."""
    images = tf.convert_to_tensor(images)
    side = images.shape[1]
    pad = min(side // 8 if pad is None else pad, side - 1)   # reflection reaches no further
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    return random_crops(padded, side, seed, crop=crop, flip=flip)


def random_crops(images: tf.Tensor, size: int, seed: tf.Tensor, *, crop: bool = True,
                 flip: bool = True) -> tf.Tensor:
    """The paper's training crops: a uniformly placed (`crop=False`: central) size x size window of each image of a
    batch (B,H,W,C), mirrored with probability 1/2 (`flip`), in one gather (4-5x faster than per-image crops)."""
    images = tf.convert_to_tensor(images)
    batch, (height, width, channels) = tf.shape(images)[0], images.shape[1:]
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2))
    if crop:
        u = tf.random.stateless_uniform([batch, 2], crop_seed)
        top = tf.minimum(tf.cast(u[:, 0] * (height - size + 1), tf.int32), height - size)
        left = tf.minimum(tf.cast(u[:, 1] * (width - size + 1), tf.int32), width - size)
    else:
        top, left = tf.fill([batch], (height - size) // 2), tf.fill([batch], (width - size) // 2)
    mirrored = tf.logical_and(tf.random.stateless_uniform([batch], flip_seed) < 0.5, flip)
    steps = tf.range(size)
    rows = top[:, None] + steps[None, :]
    cols = left[:, None] + tf.where(mirrored[:, None], size - 1 - steps[None, :], steps[None, :])
    flat = tf.range(batch)[:, None, None] * (height * width) + rows[:, :, None] * width + cols[:, None, :]
    return tf.gather(tf.reshape(images, [-1, channels]), flat)


def center_crop(images: tf.Tensor, size: int) -> tf.Tensor:
    """The central size x size window of every image of a batch (B,H,W,C; H, W static)."""
    images = tf.convert_to_tensor(images)
    top, left = (images.shape[1] - size) // 2, (images.shape[2] - size) // 2
    return images[:, top:top + size, left:left + size]


def ten_crops(images: tf.Tensor, size: int) -> tf.Tensor:
    """The paper's ten test views (in the order of TEN_CROP_VIEWS): (B,H,W,C) -> (B,10,size,size,C)."""
    images = tf.convert_to_tensor(images)
    height, width = images.shape[1], images.shape[2]
    corners = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size),
               ((height - size) // 2, (width - size) // 2)]
    views = [images[:, top:top + size, left:left + size] for top, left in corners]
    views += [tf.reverse(view, axis=[2]) for view in views]
    return tf.stack(views, axis=1)


def pca_color_shift(images: tf.Tensor, seed: tf.Tensor, eigenvalues, eigenvectors,
                    std: float = 0.1) -> tf.Tensor:
    """The paper's "fancy PCA" on float images in 0..255: image b's pixels get 255 * sum_i alpha_bi * lambda_i * p_i,
    alpha_bi ~ N(0, std), (p_i, lambda_i) the RGB covariance's eigenvectors and eigenvalues in [0, 1] units."""
    images = tf.convert_to_tensor(images)
    alpha = tf.random.stateless_normal([tf.shape(images)[0], 3], tf.cast(seed, tf.int64), stddev=std)
    weights = alpha * tf.constant(np.asarray(eigenvalues, np.float32))[None, :]
    shift = 255.0 * tf.matmul(weights, tf.constant(np.asarray(eigenvectors, np.float32)), transpose_b=True)
    return images + tf.cast(shift, images.dtype)[:, None, None, :]


def model_views(images: tf.Tensor, *, image_size: int, stored_size: int, mean_image=None,
                crops: str = "center") -> tf.Tensor:
    """What the model sees at evaluation, from a batch of stored images (B,H,W,3), any dtype: `to_stored`,
    then "center" gives (B,S,S,3) and "ten" (B*10,S,S,3), image 0's ten views first. float32."""
    x = to_stored(images, stored_size, mean_image)
    if crops == "center":
        return center_crop(x, image_size)
    if crops != "ten":
        raise ValueError(f"crops must be 'center' or 'ten'; got {crops!r}")
    return tf.reshape(ten_crops(x, image_size), [-1, image_size, image_size, x.shape[-1]])


def to_stored(images: tf.Tensor, stored_size: int, mean_image=None) -> tf.Tensor:
    """A batch (B,H,W,3) as float32 at stored_size (CIFAR's 32 px resized), less `mean_image` if given."""
    x = tf.cast(images, tf.float32)
    side = x.shape[1]
    if side != stored_size:
        # Antialiasing only matters when shrinking, and its kernel is several times slower.
        x = tf.image.resize(x, [stored_size, stored_size], antialias=stored_size < side)
    if mean_image is not None:
        x = x - tf.constant(np.asarray(mean_image, np.float32))
    return x
