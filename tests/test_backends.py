"""The model and the LRN layer on every Keras backend installed (a backend is fixed per process), and
test_distribute's JAX engine (data_parallel on two CPU devices) in the JAX process.

TensorFlow runs the checks in this process (and the rest of the suite); JAX, in a fresh Python, is part of the test extra; PyTorch runs where it is
installed (its CPU wheel is large, so it is not a test dependency) and is skipped elsewhere.
"""

import functools
import importlib.util
import math
import os

import pytest
from conftest import run_script


def measure(backend: str) -> dict:
    """The checks below on the Keras backend of this process (which must be `backend`)."""
    import tempfile

    import keras
    import numpy as np

    from alexnet_keras import AlexNet, LocalResponseNormalization

    assert keras.backend.backend() == backend, keras.backend.backend()
    keras.utils.set_random_seed(0)
    out = {}

    # LRN against the formula, computed in NumPy (alpha times the plain window sum).
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 7)).astype("float32") * 3
    window = np.stack([np.sum(x[..., max(0, i - 2):i + 3] ** 2, -1) for i in range(7)], -1)
    expected = x / (2.0 + 1e-2 * window) ** 0.75
    got = keras.ops.convert_to_numpy(LocalResponseNormalization(alpha=1e-2)(x))
    out["lrn_max_error"] = float(np.abs(got - expected).max())

    # Its gradient (written out in layers.py) against the formula's, by central differences in float64.
    weights = np.random.default_rng(2).normal(size=x.shape)
    def formula(v):
        win = np.stack([np.sum(v[..., max(0, i - 2):i + 3] ** 2, -1) for i in range(7)], -1)
        return np.sum(v / (2.0 + 1e-2 * win) ** 0.75 * weights)
    numeric = np.empty(x.shape)
    for index in np.ndindex(x.shape):
        up, down = x.astype(np.float64), x.astype(np.float64)
        up[index] += 1e-6
        down[index] -= 1e-6
        numeric[index] = (formula(up) - formula(down)) / 2e-6
    layer = LocalResponseNormalization(alpha=1e-2)
    if backend == "jax":
        import jax
        grad = jax.grad(lambda v: (layer(v) * weights.astype("float32")).sum())(x)
    elif backend == "torch":
        import torch
        v = torch.tensor(x, requires_grad=True)
        (layer(v) * torch.tensor(weights, dtype=torch.float32)).sum().backward()
        grad = v.grad
    else:
        import tensorflow as tf
        v = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(v)
            total = tf.reduce_sum(layer(v) * weights.astype("float32"))
        grad = tape.gradient(total, v)
    grad = keras.ops.convert_to_numpy(grad)
    out["lrn_grad_max_rel_error"] = float(np.abs(grad - numeric).max() / np.abs(numeric).max())

    # The LRN diagnostic (model.lrn_diagnostics, the layer's own squared_sum and scale) against the formula.
    from alexnet_keras.model.alexnet import lrn_diagnostics
    probe_input = keras.Input((5, 5, 7))
    probe_model = keras.Model(probe_input, LocalResponseNormalization(alpha=1e-2, name="lrn1")(probe_input))
    diag = lrn_diagnostics(probe_model, x, batch_size=1)["lrn1"]
    ratio, factor = 1e-2 * window.astype(np.float64) / 2.0, (2.0 + 1e-2 * window.astype(np.float64)) ** -0.75
    wanted = {"ratio_mean": ratio.mean(), "ratio_p95": np.percentile(ratio, 95), "scale_mean": factor.mean(),
              "scale_min": factor.min(), "scale_max": factor.max()}
    out["diag_max_rel_error"] = float(max(abs(diag[k] - v) / abs(v) for k, v in wanted.items()))

    # LocallyConnected2D with fixed weights: the same outputs on every backend (test_layers checks TF's).
    from alexnet_keras.model.layers import LocallyConnected2D
    rng = np.random.default_rng(4)
    local = LocallyConnected2D(2, 3)
    local.build((2, 4, 5, 3))
    local.set_weights([rng.normal(size=w.shape).astype("float32") for w in local.weights])
    out["local"] = keras.ops.convert_to_numpy(local(rng.normal(size=(2, 4, 5, 3)).astype("float32"))).tolist()

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        half = LocalResponseNormalization(alpha=1e-2)
        out["lrn_mixed_dtype"] = str(keras.ops.convert_to_numpy(half(keras.ops.cast(x, "bfloat16"))).dtype)
    finally:
        keras.mixed_precision.set_global_policy("float32")

    model = AlexNet(num_classes=4, variant="cifar", width=0.125, lrn=True, batchnorm=True, init="keras")
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    images = np.random.default_rng(1).uniform(0, 255, size=(16, 32, 32, 3)).astype("float32")
    labels = np.arange(16) % 4
    history = model.fit(images, labels, batch_size=8, epochs=1, verbose=0)
    out["loss"] = float(history.history["loss"][-1])
    out["params"] = int(model.count_params())
    path = os.path.join(tempfile.mkdtemp(), "m.keras")
    model.save(path)
    again = keras.saving.load_model(path)
    out["reload_max_diff"] = float(np.abs(model.predict(images, verbose=0) - again.predict(images, verbose=0)).max())
    trained = lrn_diagnostics(model, images[:4])
    out["trained_diag_finite"] = bool(sorted(trained) == ["lrn1", "lrn2"] and all(
        np.isfinite(v) for stats in trained.values() for v in stats.values()))
    return out


def data_parallel() -> dict:
    """One epoch of the training path (prepare() builds the engine, data and model; fit() is train.py's loop)
    with --distribute data_parallel over this process's JAX devices (test_distribute's other engines)."""
    import jax
    import keras

    from alexnet_keras.config import load_config
    from alexnet_keras.training.train import fit, prepare

    config = load_config(overrides=dict(
        variant="cifar", width=0.125, dataset="synthetic", synthetic_samples=32, synthetic_classes=4,
        val_fraction=0.25, batch_size=8, epochs=1, init="keras", schedule="constant", distribute="data_parallel"))
    data, model = prepare(config)
    history, _, _ = fit(model, data, config)   # the metrics callback logs nothing without an active run
    test = model.evaluate(data.test, return_dict=True, verbose=0)
    return {"loss": history["loss"][-1], "test_accuracy": test["accuracy"], "backend": keras.backend.backend(),
            "devices": jax.device_count(),
            "kernel_devices": len(model.get_layer("conv1").kernel.value.sharding.device_set),
            "distribution": type(keras.distribution.distribution()).__name__}


# A backend other than this process's runs this module's `measure` in a fresh Python; JAX's, with two CPU
# devices, then data_parallel (last: the distribution it sets is global).
SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[2])
from test_backends import data_parallel, measure
out = measure(sys.argv[1])
if sys.argv[1] == "jax":
    out["data_parallel"] = data_parallel()
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def fresh():
    """backend -> the results of SCRIPT in a fresh Python on that backend, run once per module."""
    @functools.cache
    def run(backend):
        return run_script(SCRIPT, backend, os.path.dirname(__file__),
                          env={"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu",
                               "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "TF_CONFIG": None},
                          timeout=600)   # two checks' work in one process
    return run


@pytest.fixture(scope="module")
def tensorflow_result():
    """The same checks on TensorFlow, this process's backend (no second TensorFlow to start)."""
    import keras

    assert keras.backend.backend() == "tensorflow"
    result = measure("tensorflow")
    assert result["lrn_grad_max_rel_error"] < 1e-4
    return result


@pytest.mark.parametrize("backend, module", [("jax", "jax"), ("torch", "torch")])
def test_model_and_lrn_on_backend(backend, module, tensorflow_result, fresh):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    result = fresh(backend)
    assert result["lrn_max_error"] < 1e-5
    assert result["lrn_grad_max_rel_error"] < 1e-4
    assert result["lrn_mixed_dtype"] == "bfloat16"
    assert result["params"] == tensorflow_result["params"]     # same layers, same weights everywhere
    assert result["loss"] == result["loss"] and result["loss"] < 10   # finite after one real step
    assert result["reload_max_diff"] < 1e-5
    assert result["diag_max_rel_error"] < 1e-5 and tensorflow_result["diag_max_rel_error"] < 1e-5
    assert result["trained_diag_finite"] and tensorflow_result["trained_diag_finite"]
    import numpy as np
    np.testing.assert_allclose(result["local"], tensorflow_result["local"], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_jax_data_parallel_on_two_cpu_devices(fresh):
    result = fresh("jax")["data_parallel"]
    assert result["backend"] == "jax" and result["devices"] == 2
    # Weights replicated on both devices, batches sharded over them.
    assert result["distribution"] == "DataParallel" and result["kernel_devices"] == 2
    assert math.isfinite(result["loss"]) and 0.0 <= result["test_accuracy"] <= 1.0
