"""Data parallelism (alexnet_keras/training/distribute.py) on two logical CPU devices, one tiny run per engine.

The TensorFlow engines run in a fresh Python: the device count and the Keras backend are fixed when a process
first uses TensorFlow (two logical CPUs from `tf.config.set_logical_device_configuration`). JAX's
(`XLA_FLAGS=--xla_force_host_platform_device_count=2`) runs in test_backends' JAX process, which starts anyway.
"""

import math

import pytest
from conftest import run_script

from alexnet_keras.config import ConfigError, TrainConfig, load_config

# Multi_worker then mirrored (argv), each one epoch of the training path; their results by engine.
SCRIPT = r"""
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]   # two logical CPUs, before TensorFlow starts its devices
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from alexnet_keras.config import load_config
from alexnet_keras.training.train import fit, prepare

results = {}
for kind in sys.argv[1:]:
    config = load_config(overrides=dict(
        variant="cifar", width=0.125, dataset="synthetic", synthetic_samples=32, synthetic_classes=4,
        val_fraction=0.25, batch_size=8, epochs=1, init="keras", schedule="constant", distribute=kind))
    # The training path itself: prepare() builds the engine, data and model; fit() is train.py's loop
    # (one epoch of 3 even steps here, so one trace per function; the metrics callback logs nothing without
    # an active run).
    data, model = prepare(config)
    history, _, _ = fit(model, data, config)
    test = model.evaluate(data.test, return_dict=True, verbose=0)
    results[kind] = {"loss": history["loss"][-1], "test_accuracy": test["accuracy"],
                     "backend": keras.backend.backend(), "strategy": type(model.distribute_strategy).__name__,
                     "replicas": model.distribute_strategy.num_replicas_in_sync}
print("RESULT " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def tensorflow_engines():
    """Both TensorFlow engines in one fresh Python: multi_worker first, as a launch starts it (before any
    TensorFlow op), then mirrored over the two logical CPUs set up at the start. TF_CONFIG: None, since a
    cluster from the caller's environment would change the test."""
    return run_script(SCRIPT, "multi_worker", "mirrored",
                      env={"KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3", "TF_CONFIG": None})


def test_tf_mirrored_on_two_logical_cpus(tensorflow_engines):
    result = tensorflow_engines["mirrored"]
    assert result["backend"] == "tensorflow"
    assert result["strategy"] == "MirroredStrategy" and result["replicas"] == 2
    assert math.isfinite(result["loss"]) and 0.0 <= result["test_accuracy"] <= 1.0


def test_tf_multi_worker_without_tf_config_is_one_local_worker(tensorflow_engines):
    # No TF_CONFIG: a one-worker cluster on this machine (the code path of a multi-node launch).
    result = tensorflow_engines["multi_worker"]
    # tf.distribute.MultiWorkerMirroredStrategy is CollectiveAllReduceStrategy under the hood.
    assert result["strategy"] in ("MultiWorkerMirroredStrategy", "CollectiveAllReduceStrategy")
    assert result["replicas"] == 1
    assert math.isfinite(result["loss"])


def test_distribute_is_a_validated_choice():
    assert load_config(overrides={"distribute": "mirrored"}).train.distribute == "mirrored"
    with pytest.raises(ConfigError, match="train.distribute must be one of 'none', 'mirrored'"):
        TrainConfig(distribute="horovod")


def test_engine_on_the_wrong_backend_is_a_clear_error():
    import keras

    from alexnet_keras.training import distribute

    wrong = "data_parallel" if keras.backend.backend() != "jax" else "mirrored"
    with pytest.raises(ConfigError, match="KERAS_BACKEND"):
        distribute.setup(TrainConfig(distribute=wrong))


def test_none_is_one_replica_and_keeps_data():
    from alexnet_keras.training import distribute

    dist = distribute.setup(TrainConfig())
    assert dist.replicas == 1 and dist.kind == "none"
    with dist.scope():
        pass
    sentinel = object()
    assert distribute.adapt_data(sentinel, dist) is sentinel


def test_even_batches_drops_only_the_uneven_batch():
    import numpy as np
    import tensorflow as tf

    from alexnet_keras.training.distribute import even_batches

    ds = tf.data.Dataset.from_tensor_slices((np.zeros((7, 2), "float32"), np.arange(7))).batch(2)
    sizes = [int(y.shape[0]) for _, y in even_batches(ds, 2)]
    assert sizes == [2, 2, 2]
