"""Data parallelism (`train.distribute`) through tf.distribute on TensorFlow, keras.distribution on JAX; `batch_size`
is the global batch, the learning rate is not scaled (benchmarks/README.md)."""

import contextlib
import dataclasses
import os
from typing import Callable, ContextManager

from ..config import ConfigError, TrainConfig

ENGINE_BACKEND = {"mirrored": "tensorflow", "multi_worker": "tensorflow", "data_parallel": "jax"}


@dataclasses.dataclass
class Distribution:
    kind: str
    replicas: int                      # devices that share each global batch
    scope: Callable[[], ContextManager]  # build and compile the model inside `with dist.scope():`


def setup(train: TrainConfig) -> Distribution:
    """The engine `train.distribute` names, created before any TensorFlow op (MultiWorkerMirroredStrategy needs it)."""
    import keras

    kind = train.distribute
    if kind == "none":
        return Distribution("none", 1, contextlib.nullcontext)
    backend = keras.backend.backend()
    wanted = ENGINE_BACKEND[kind]
    if backend != wanted:
        other = {"tensorflow": "mirrored or multi_worker", "jax": "data_parallel"}.get(backend)
        hint = f"use --distribute {other}" if other else "no engine for this backend; use --distribute none"
        raise ConfigError(f"train.distribute {kind!r} runs on the {wanted} backend, but KERAS_BACKEND is "
                          f"{backend!r}: set KERAS_BACKEND={wanted} or {hint}.")
    if kind in ("mirrored", "multi_worker"):
        import tensorflow as tf

        if kind == "multi_worker":
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        else:
            # MirroredStrategy() alone takes every GPU, or a single CPU: name every logical device instead.
            devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
            strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
        replicas = strategy.num_replicas_in_sync
        if train.batch_size < replicas:
            raise ConfigError(f"train.batch_size {train.batch_size} is smaller than the {replicas} replicas of "
                              f"--distribute {kind}: every replica needs at least one image per step.")
        return Distribution(kind, replicas, strategy.scope)

    if os.environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES") or os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES"):
        keras.distribution.initialize()   # multi-process: reads the KERAS_DISTRIBUTION_* variables
    devices = keras.distribution.list_devices()
    replicas = len(devices)
    if train.batch_size % replicas:   # JAX shards every global batch evenly over the devices
        raise ConfigError(f"train.batch_size {train.batch_size} must be a multiple of the {replicas} devices "
                          f"for --distribute data_parallel (each device gets batch_size / {replicas}).")
    distribution = keras.distribution.DataParallel(devices=devices)
    keras.distribution.set_distribution(distribution)   # global: fit/evaluate/predict shard their inputs
    return Distribution(kind, replicas, distribution.scope)


def adapt_data(data, dist: Distribution):
    """Check (and for JAX adjust) `data` for `dist` before any run exists: JAX shards must be equal (uneven last
    batches dropped, the test split must divide); Keras 3 traces TensorFlow's on a first batch that must split."""
    if dist.replicas <= 1:
        return data
    if dist.kind == "data_parallel":
        if data.counts["test"] % dist.replicas:
            raise ConfigError(f"--distribute data_parallel over {dist.replicas} devices needs a test split "
                              f"whose size is a multiple of {dist.replicas}; it has {data.counts['test']} "
                              f"images. Use a device count that divides it, or --distribute none.")
        data.train = even_batches(data.train, dist.replicas)
        data.val = even_batches(data.val, dist.replicas)
        return data
    for split in ("train", "val", "test"):
        first = min(data.counts[split], data.batch_size)
        if first % dist.replicas:
            raise ConfigError(f"--distribute {dist.kind}: the {split} split has {data.counts[split]} images, "
                              f"less than one batch, and {first} does not split evenly over "
                              f"{dist.replicas} replicas (Keras 3 cannot trace such a first batch, "
                              f"keras-team/keras#19246). Use more images or --distribute none.")
    return data


def even_batches(dataset, replicas: int):
    """Drop a batch that does not split evenly over `replicas` (JAX shards must be equal)."""
    import tensorflow as tf

    return dataset.filter(lambda images, labels: tf.equal(tf.shape(labels)[0] % replicas, 0))
