"""LocalResponseNormalization against the paper's formula, TensorFlow's op, Keras machinery."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from alexnet_keras.model.layers import LocallyConnected2D, LocalResponseNormalization


def reference_lrn(x, n, alpha, beta, k):
    """The paper's formula, literally: a loop over channels with the window clipped at the edges."""
    x = np.asarray(x, dtype=np.float64)
    channels = x.shape[-1]
    out = np.empty_like(x)
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        window = np.sum(x[..., lo:hi + 1] ** 2, axis=-1)
        out[..., i] = x[..., i] / (k + alpha * window) ** beta
    return out


SHAPES = [(2, 3, 3, 1), (2, 4, 4, 3), (1, 5, 5, 7), (2, 2, 2, 96)]
SIZES = [1, 3, 5]
# The paper's values, then ones large enough that the window visibly matters.
PARAMS = [dict(alpha=1e-4, beta=0.75, k=2.0), dict(alpha=0.3, beta=0.6, k=1.3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("params", PARAMS)
def test_matches_numpy_reference(shape, n, params):
    x = np.random.default_rng(0).normal(0.0, 3.0, size=shape).astype("float32")
    out = LocalResponseNormalization(size=n, **params)(x)
    np.testing.assert_allclose(np.asarray(out), reference_lrn(x, n, **params), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("params", PARAMS)
def test_matches_tf_nn_lrn(shape, n, params):
    x = np.random.default_rng(1).normal(0.0, 3.0, size=shape).astype("float32")
    out = LocalResponseNormalization(size=n, **params)(x)
    expected = tf.nn.local_response_normalization(
        x, depth_radius=n // 2, bias=params["k"], alpha=params["alpha"], beta=params["beta"])
    np.testing.assert_allclose(np.asarray(out), expected.numpy(), rtol=1e-5, atol=1e-6)


def numeric_gradient(x, weights, n, alpha, beta, k, eps=1e-6):
    """d sum(reference_lrn(x) * weights) / dx by central differences, in float64."""
    x = np.asarray(x, np.float64)
    grad = np.empty_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += eps
        down[index] -= eps
        grad[index] = np.sum((reference_lrn(up, n, alpha, beta, k) - reference_lrn(down, n, alpha, beta, k))
                             * weights) / (2 * eps)
    return grad


@pytest.mark.parametrize("shape", [(2, 3, 3, 7), (1, 2, 2, 96)])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("params", PARAMS)
def test_gradient_matches_tf_nn_lrn_and_central_differences(shape, n, params):
    # The channels-last path has its gradient written out (layers.py): it must be the formula's.
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(0.0, 3.0, size=shape).astype("float32"))
    weights = rng.normal(size=shape).astype("float32")   # an upstream gradient that is not all ones
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours = tf.reduce_sum(LocalResponseNormalization(size=n, **params)(x) * weights)
        theirs = tf.reduce_sum(tf.nn.local_response_normalization(
            x, depth_radius=n // 2, bias=params["k"], alpha=params["alpha"], beta=params["beta"]) * weights)
    got, expected = tape.gradient(ours, x).numpy(), tape.gradient(theirs, x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    if shape[-1] <= 7:   # central differences cost a forward pass per element
        np.testing.assert_allclose(got, numeric_gradient(x.numpy(), weights, n, **params), rtol=1e-4, atol=1e-6)


def test_edge_channels_use_a_clipped_window():
    # All ones, alpha=1, beta=1, k=0: b_i = 1 / (number of channels in i's window).
    # With N=7, n=5 the windows hold 3, 4, 5, 5, 5, 4, 3 channels.
    x = np.ones((1, 1, 1, 7), "float32")
    out = np.asarray(LocalResponseNormalization(size=5, alpha=1.0, beta=1.0, k=0.0)(x))
    np.testing.assert_allclose(out[0, 0, 0], 1.0 / np.array([3, 4, 5, 5, 5, 4, 3]), rtol=1e-6)
    # A window wider than the channel count covers all of them.
    x3 = np.ones((1, 1, 1, 3), "float32")
    out3 = np.asarray(LocalResponseNormalization(size=9, alpha=1.0, beta=1.0, k=0.0)(x3))
    np.testing.assert_allclose(out3[0, 0, 0], [1 / 3] * 3, rtol=1e-6)


def test_alpha_is_not_divided_by_n():
    # Paper/TF convention: k + alpha * sum. PyTorch/Caffe use alpha / n; they would give 1/(1+1/5).
    x = np.ones((1, 1, 1, 1), "float32")
    out = LocalResponseNormalization(size=5, alpha=1.0, beta=1.0, k=1.0)(x)
    assert float(np.asarray(out)[0, 0, 0, 0]) == pytest.approx(0.5)


def test_channels_first_axis():
    x = np.random.default_rng(2).normal(size=(2, 7, 3, 4)).astype("float32")
    out = LocalResponseNormalization(size=3, alpha=0.2, axis=1)(x)
    expected = reference_lrn(np.moveaxis(x, 1, -1), 3, 0.2, 0.75, 2.0)
    np.testing.assert_allclose(np.asarray(out), np.moveaxis(expected, -1, 1), rtol=1e-5, atol=1e-6)


def run_layer_test(cls, init_kwargs, input_data, expected_output_shape, expected_num_weights=0):
    """After keras-hub's `TestCase.run_layer_test`: a layer's get_config -> from_config round trip (also
    through its registered name), weight count, symbolic and eager output shapes, one `fit` step inside
    a model, and its mixed-precision policies (outputs in the compute dtype, variables in the variable dtype)."""
    layer = cls(**init_kwargs)
    config = layer.get_config()
    assert config.items() >= init_kwargs.items()
    assert cls.from_config(config).get_config() == config
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is cls and revived.get_config() == config
    assert keras.saving.get_registered_name(cls) == f"alexnet_keras>{cls.__name__}"

    symbolic = cls(**init_kwargs)(keras.Input(input_data.shape[1:]))
    assert isinstance(symbolic, keras.KerasTensor)
    assert tuple(symbolic.shape) == (None, *expected_output_shape[1:])
    output = layer(input_data)
    assert tuple(output.shape) == expected_output_shape
    assert keras.backend.standardize_dtype(output.dtype) == layer.dtype
    assert tuple(layer.compute_output_shape(input_data.shape)) == expected_output_shape
    assert len(layer.weights) == expected_num_weights

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(input_data.shape[1:]), cls(**init_kwargs), keras.layers.Flatten(),
                              keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    history = model.fit(input_data, np.arange(len(input_data)) % 2, batch_size=2, epochs=1, verbose=0)
    assert math.isfinite(history.history["loss"][-1])

    for name in ("mixed_float16", "mixed_bfloat16", "bfloat16"):
        policy = keras.mixed_precision.Policy(name)
        mixed = cls(**init_kwargs, dtype=policy)
        for output in (mixed(input_data), mixed.compute_output_spec(keras.KerasTensor(input_data.shape))):
            assert keras.backend.standardize_dtype(output.dtype) == policy.compute_dtype
        assert all(keras.backend.standardize_dtype(w.dtype) == policy.variable_dtype for w in mixed.weights)
    assert keras.mixed_precision.global_policy().name == "float32"


@pytest.mark.parametrize("init_kwargs, shape", [
    ({}, (4, 5, 6, 7)),
    (dict(size=3, alpha=0.01, beta=0.5, k=1.0, axis=1, name="lrn_x"), (4, 7, 3, 4)),
    (dict(size=1), (4, 2, 2, 96)),
])
def test_layer_harness(init_kwargs, shape):
    x = np.random.default_rng(3).normal(0.0, 3.0, size=shape).astype("float32")
    run_layer_test(LocalResponseNormalization, init_kwargs, x, shape)
    # Unknown spatial and channel sizes are fine: the window sum never needs N.
    unknown = LocalResponseNormalization(**init_kwargs)(keras.Input((None,) * (len(shape) - 1)))
    assert tuple(unknown.shape) == (None,) * len(shape)


def test_mixed_precision_keeps_the_formula():
    """float16 under the policy, but computed in float32: no overflow, the formula's values."""
    x = np.random.default_rng(3).normal(0.0, 3.0, size=(2, 4, 4, 7)).astype("float32")
    layer = LocalResponseNormalization(alpha=0.3, dtype="mixed_float16")
    out = layer(x)
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    np.testing.assert_allclose(np.asarray(out, "float32"), reference_lrn(x, 5, 0.3, 0.75, 2.0),
                               rtol=2e-3, atol=2e-3)
    # Activations of 200: the sum of 5 squares (200000) overflows float16, not the float32 path.
    big = np.full((1, 1, 1, 5), 200.0, "float32")
    out_big = np.asarray(layer(big), "float32")
    assert np.all(np.isfinite(out_big))
    np.testing.assert_allclose(out_big, reference_lrn(big, 5, 0.3, 0.75, 2.0), rtol=2e-3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(size=0), "positive odd integer.*size=0"),
    (dict(size=4), "positive odd integer.*size=4"),
    (dict(size=-3), "positive odd integer.*size=-3"),
    (dict(size=5.0), "positive odd integer.*size=5.0"),
    (dict(size=True), "positive odd integer.*size=True"),
    (dict(alpha=-1e-4), ">= 0.*alpha=-0.0001"),
    (dict(alpha=float("nan")), ">= 0.*alpha=nan"),
    (dict(beta=-0.5), ">= 0.*beta=-0.5"),
    (dict(k="2"), ">= 0.*k='2'"),
    (dict(axis=None), "integer.*axis=None"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalResponseNormalization(**kwargs)


def test_axis_out_of_range():
    with pytest.raises(ValueError, match="axis"):
        LocalResponseNormalization(axis=4)(np.zeros((1, 2, 2, 3), "float32"))


@pytest.mark.parametrize("axis, n", [(-1, 5), (1, 3), (-1, 1)])   # channels last, channels first, n=1
def test_squared_sum_and_scale_are_the_formulas_parts(axis, n):
    """The public parts that call() is made of (and lrn_diagnostics measures with)."""
    x = np.random.default_rng(5).normal(0.0, 3.0, size=(2, 7, 3, 7)).astype("float32")
    layer = LocalResponseNormalization(size=n, alpha=0.3, beta=0.6, k=1.3, axis=axis)
    last = np.moveaxis(x, axis, -1).astype(np.float64)
    window = np.stack([np.sum(last[..., max(0, i - n // 2):i + n // 2 + 1] ** 2, axis=-1)
                       for i in range(last.shape[-1])], axis=-1)
    got_sum = np.moveaxis(keras.ops.convert_to_numpy(layer.squared_sum(x)), axis, -1)
    np.testing.assert_allclose(got_sum, window, rtol=1e-5)
    got_scale = np.moveaxis(keras.ops.convert_to_numpy(layer.scale(x)), axis, -1)
    np.testing.assert_allclose(got_scale, (1.3 + 0.3 * window) ** -0.6, rtol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)),
                               x * keras.ops.convert_to_numpy(layer.scale(x)), rtol=1e-6)
    with pytest.raises(ValueError, match="axis"):
        LocalResponseNormalization(axis=4).squared_sum(x)


# --- LocallyConnected2D: cuda-convnet's `local` layer ---------------------------------------------

def reference_local(x, kernel, bias, k):
    """A 'same'-padded, stride-1 locally connected layer, literally: at each position its own kernel, over the
    k x k patch in (row, column, channel) order."""
    x, r = np.asarray(x, np.float64), k // 2
    padded = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
    out = np.empty(x.shape[:3] + (kernel.shape[-1],))
    for i, j in np.ndindex(x.shape[1:3]):
        patch = padded[:, i:i + k, j:j + k, :].reshape(len(x), -1)
        out[:, i, j] = patch @ kernel[i, j] + bias[i, j]
    return out


@pytest.mark.parametrize("shape, k, filters", [((2, 5, 4, 3), 3, 4), ((1, 6, 6, 2), 5, 3), ((2, 3, 3, 1), 1, 2)])
def test_locally_connected_matches_numpy_reference(shape, k, filters):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype("float32")
    layer = LocallyConnected2D(filters, k)
    layer.build(shape)
    kernel, bias = rng.normal(size=layer.kernel.shape), rng.normal(size=layer.bias.shape)
    layer.set_weights([kernel.astype("float32"), bias.astype("float32")])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), reference_local(x, kernel, bias, k),
                               rtol=1e-4, atol=1e-4)
    # Unshared: the kernel is (height, width, k * k * channels, filters), the bias (height, width, filters).
    assert layer.kernel.shape == (*shape[1:3], k * k * shape[3], filters) and layer.bias.shape == (*shape[1:3], filters)


@pytest.mark.parametrize("init_kwargs, expected_num_weights", [
    (dict(filters=4, kernel_size=3), 2),
    (dict(filters=2, kernel_size=3, use_bias=False, name="local_x"), 1),
])
def test_locally_connected_layer_harness(init_kwargs, expected_num_weights):
    x = np.random.default_rng(3).normal(size=(4, 5, 6, 3)).astype("float32")
    run_layer_test(LocallyConnected2D, init_kwargs, x, (4, 5, 6, init_kwargs["filters"]), expected_num_weights)


def test_locally_connected_initializers_and_weight_decay_survive_its_config():
    layer = LocallyConnected2D(2, 3, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
                               bias_initializer="ones", kernel_regularizer=keras.regularizers.L2(0.25))
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    x = np.ones((1, 3, 3, 2), "float32")
    clone(x)
    assert clone.kernel_initializer.stddev == 0.01 and np.all(keras.ops.convert_to_numpy(clone.bias) == 1.0)
    # Weight decay reaches the kernel: L2(l) adds l * sum(w^2).
    kernel = keras.ops.convert_to_numpy(clone.kernel)
    assert float(keras.ops.convert_to_numpy(clone.losses[0])) == pytest.approx(0.25 * np.sum(kernel ** 2), rel=1e-5)
