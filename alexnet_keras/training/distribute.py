"""Multi-device data parallelism through the frameworks' own engines, chosen by `train.distribute`.

    none           one device (whatever Keras' backend picks).
    mirrored       TensorFlow backend: `tf.distribute.MirroredStrategy` over every local GPU (else
                   every logical CPU device): one machine, several devices, all-reduce of gradients.
    multi_worker   TensorFlow backend: `tf.distribute.MultiWorkerMirroredStrategy`; the cluster comes
                   from $TF_CONFIG (one process per machine; without TF_CONFIG it is one local worker).
    data_parallel  JAX backend: `keras.distribution.DataParallel` over `keras.distribution.list_devices()`;
                   with $KERAS_DISTRIBUTION_JOB_ADDRESSES / _NUM_PROCESSES / _PROCESS_ID set, it first
                   calls `keras.distribution.initialize()` (multi-process, one process per host).

Batch and learning rate: `train.batch_size` is the GLOBAL batch. Each of N replicas sees
batch_size / N images per step (the engines split every batch of the tf.data pipeline), the gradients
are averaged across replicas, so one step is the same update as on one device with the same batch:
the learning rate is therefore kept as given, not scaled. To use more devices at a constant
per-device batch, raise --batch-size N-fold and scale --learning-rate linearly yourself
(Goyal et al. 2017, "Accurate, Large Minibatch SGD"), ideally with a warm-up.

Limits: BatchNormalization statistics are per replica (not synchronized) under `mirrored` /
`multi_worker`, and per global batch under `data_parallel` (JAX computes them on the sharded global
array). See benchmarks/README.md for multi-node launch commands.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, ContextManager

from ..config import ConfigError, TrainConfig

# Which Keras backend each engine runs on.
ENGINE_BACKEND = {"mirrored": "tensorflow", "multi_worker": "tensorflow", "data_parallel": "jax"}
_JAX_ENV = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES")


@dataclasses.dataclass
class Distribution:
    kind: str
    replicas: int                      # devices that share each global batch
    scope: Callable[[], ContextManager]  # build and compile the model inside `with dist.scope():`
    engine: Any = None                 # the tf.distribute strategy or keras DataParallel, if any

    def per_replica_batch(self, global_batch: int) -> float:
        return global_batch / self.replicas


def setup(train: TrainConfig) -> Distribution:
    """Create the engine `train.distribute` names. Call it before any TensorFlow op runs
    (MultiWorkerMirroredStrategy refuses to start later) and before the model is built."""
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
            # MirroredStrategy() alone takes every GPU, or a single CPU; on a CPU-only machine use
            # every logical CPU device (tf.config.set_logical_device_configuration makes several).
            devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
            strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
        replicas = strategy.num_replicas_in_sync
        _check_batch(train.batch_size, replicas, kind)
        return Distribution(kind, replicas, strategy.scope, strategy)

    # data_parallel (JAX)
    if any(os.environ.get(name) for name in _JAX_ENV):
        keras.distribution.initialize()   # reads the KERAS_DISTRIBUTION_* variables
    devices = keras.distribution.list_devices()
    replicas = len(devices)
    # Every global batch is split evenly over the devices (a jax.Array sharded on the batch axis).
    if train.batch_size % replicas:
        raise ConfigError(f"train.batch_size {train.batch_size} must be a multiple of the {replicas} devices "
                          f"for --distribute data_parallel (each device gets batch_size / {replicas}).")
    distribution = keras.distribution.DataParallel(devices=devices)
    # Global: Keras shards every input batch of fit/evaluate/predict by the current distribution.
    keras.distribution.set_distribution(distribution)
    return Distribution(kind, replicas, distribution.scope, distribution)


def _check_batch(batch_size: int, replicas: int, kind: str) -> None:
    if batch_size < replicas:
        raise ConfigError(f"train.batch_size {batch_size} is smaller than the {replicas} replicas of "
                          f"--distribute {kind}: every replica needs at least one image per step.")


def adapt_data(data, dist: Distribution):
    """Check (and for JAX adjust) `data` (a data.Data) for `dist`, before any run exists.

    * `mirrored` / `multi_worker`: TensorFlow splits uneven batches itself, but Keras 3 traces each
      split's functions on its FIRST batch reduced across replicas, which fails with "Inputs to
      operation AddN ... must have the same size" when that batch does not split evenly
      (keras-team/keras#19246): only possible when a split is smaller than one batch.
    * `data_parallel`: JAX splits each batch into equal shards, so every batch must hold a multiple of
      the device count. Training and validation drop the one final batch that does not (at most
      replicas - 1 images per epoch; training reshuffles, so a different few each epoch); the test
      split must divide evenly, because every test image counts.
    """
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
    if replicas <= 1:
        return dataset
    import tensorflow as tf

    return dataset.filter(lambda images, labels: tf.equal(tf.shape(labels)[0] % replicas, 0))
