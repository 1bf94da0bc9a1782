"""AlexNet: exact paper sizes, every toggle, serialization and a real training step."""

import dataclasses
import math

import keras
import numpy as np
import pytest

from alexnet_keras.config import ACTIVATIONS, POOLS, ConfigError, ModelConfig
from alexnet_keras.model.layers import LocalResponseNormalization
from alexnet_keras.model.alexnet import MODEL_OPTIONS, AlexNet, build_alexnet, summary_text

CONVS = [f"conv{i}" for i in range(1, 6)]
DENSES = ["fc6", "fc7", "fc8"]


def small(**options):
    """A cheap model for toggle tests: the cifar variant at a quarter of the width."""
    options = {"variant": "cifar", "width": 0.25, **options}
    return AlexNet(num_classes=options.pop("num_classes", 10), **options)


def names(model):
    return [layer.name for layer in model.layers]


def images(n, size=32, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, size=(n, size, size, 3)).astype("float32")


# Parameters (kernel h*w*in/groups*out + bias out), paper variant, 1000 classes:
#   conv1 11*11*3*96    + 96   =     34,944
#   conv2  5*5*96*256   + 256  =    614,656   (groups=2: 5*5*48*256   + 256 =   307,456)
#   conv3  3*3*256*384  + 384  =    885,120
#   conv4  3*3*384*384  + 384  =  1,327,488   (groups=2: 3*3*192*384  + 384 =   663,936)
#   conv5  3*3*384*256  + 256  =    884,992   (groups=2: 3*3*192*256  + 256 =   442,624)
#   fc6   6*6*256*4096  + 4096 = 37,752,832
#   fc7   4096*4096     + 4096 = 16,781,312
#   fc8   4096*1000     + 1000 =  4,097,000
#   total 62,378,344; groups=2 saves 307,200 + 663,552 + 442,368 = 1,413,120 -> 60,965,224.
# LRN, pooling, dropout, activations and the preprocessing layer have no weights.
@pytest.mark.parametrize("groups, expected", [(1, 62_378_344), (2, 60_965_224)])
def test_paper_parameter_count(groups, expected):
    model = AlexNet(num_classes=1000, groups=groups, lrn=True, batchnorm=False, dropout=0.5)
    assert model.count_params() == expected
    assert tuple(model.input_shape) == (None, 227, 227, 3)
    assert tuple(model.output_shape) == (None, 1000)
    text = summary_text(model)
    assert text.count("Total params") == 1 and f"Total params: {expected:,} (" in text
    for name in CONVS + DENSES + ["lrn1", "lrn2", "pool5", "predictions"]:
        assert name in text


def test_layer_order_with_everything_on():
    model = small(lrn=True, batchnorm=True, dropout=0.5)
    block = lambda i: [f"conv{i}", f"bn{i}", f"act{i}"]  # noqa: E731
    expected = (["image", "preprocess"] + block(1) + ["lrn1", "pool1"] + block(2) + ["lrn2", "pool2"]
                + block(3) + block(4) + block(5) + ["pool5", "flatten", "dropout6", "fc6", "act6",
                                                    "dropout7", "fc7", "act7", "fc8", "predictions"])
    assert names(model) == expected


@pytest.mark.parametrize("lrn", [True, False])
def test_lrn_toggle(lrn):
    model = small(lrn=lrn, lrn_size=3, lrn_alpha=2e-4, lrn_beta=0.5, lrn_k=1.0)
    lrn_layers = [layer for layer in model.layers if isinstance(layer, LocalResponseNormalization)]
    if lrn:
        assert [layer.name for layer in lrn_layers] == ["lrn1", "lrn2"]
        assert all((l.size, l.alpha, l.beta, l.k) == (3, 2e-4, 0.5, 1.0) for l in lrn_layers)
        # After the activation, before the pooling.
        assert model.get_layer("lrn1").input is model.get_layer("act1").output
        assert model.get_layer("pool1").input is model.get_layer("lrn1").output
    else:
        assert lrn_layers == [] and "lrn1" not in names(model)


@pytest.mark.parametrize("batchnorm", [True, False])
def test_batchnorm_toggle(batchnorm):
    model = small(batchnorm=batchnorm)
    bns = [layer.name for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns == ([f"bn{i}" for i in range(1, 6)] if batchnorm else [])
    for i in range(1, 6):
        conv = model.get_layer(f"conv{i}")
        assert conv.use_bias is (not batchnorm)
        assert (conv.bias is None) is batchnorm
        if batchnorm:
            assert model.get_layer(f"bn{i}").input is conv.output
            assert model.get_layer(f"act{i}").input is model.get_layer(f"bn{i}").output
    assert all(model.get_layer(name).use_bias for name in DENSES)


@pytest.mark.parametrize("dropout", [0.0, 0.3, 0.5])
def test_dropout_toggle(dropout):
    model = small(dropout=dropout)
    drops = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    if dropout == 0:
        assert drops == []
    else:
        assert [d.name for d in drops] == ["dropout6", "dropout7"]
        assert all(d.rate == dropout for d in drops)
        assert model.get_layer("fc6").input is model.get_layer("dropout6").output
        assert model.get_layer("fc7").input is model.get_layer("dropout7").output


@pytest.mark.parametrize("pool", POOLS)
def test_pool_kinds_paper_sizes(pool):
    model = AlexNet(variant="paper", pool=pool, width=0.05, num_classes=10)
    expected_size = {"overlapping": 3, "non_overlapping": 2}[pool]
    for name, side in (("conv1", 55), ("pool1", 27), ("pool2", 13), ("pool5", 6)):
        assert model.get_layer(name).output.shape[1:3] == (side, side), name
    for name in ("pool1", "pool2", "pool5"):
        layer = model.get_layer(name)
        assert isinstance(layer, keras.layers.MaxPooling2D)
        assert tuple(layer.pool_size) == (expected_size, expected_size)
        assert tuple(layer.strides) == (2, 2)


@pytest.mark.parametrize("pool", POOLS)
def test_pool_kinds_cifar_sizes(pool):
    model = small(pool=pool)
    for name, side in (("conv1", 32), ("pool1", 16), ("pool2", 8), ("pool5", 4)):
        assert model.get_layer(name).output.shape[1:3] == (side, side), name
    # FC6 sees the same input size for both pool kinds.
    assert model.get_layer("fc6").kernel.shape == (4 * 4 * 64, 1024)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation(activation):
    model = small(activation=activation)
    acts = [layer for layer in model.layers if isinstance(layer, keras.layers.Activation)]
    assert [a.name for a in acts] == [f"act{i}" for i in range(1, 8)] + ["predictions"]
    assert all(a.activation.__name__ == activation for a in acts[:-1])
    assert acts[-1].activation.__name__ == "softmax"


def test_paper_init():
    keras.utils.set_random_seed(0)
    model = small(init="paper", width=0.5)
    for name in CONVS + DENSES:
        layer = model.get_layer(name)
        bias = keras.ops.convert_to_numpy(layer.bias)
        expected = 1.0 if name in {"conv2", "conv4", "conv5", "fc6", "fc7"} else 0.0
        assert np.all(bias == expected), name
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        if kernel.size >= 10_000:  # enough samples for a tight estimate
            assert abs(kernel.mean()) < 1e-3, name
            assert kernel.std() == pytest.approx(0.01, rel=0.05), name


def test_keras_init():
    model = small(init="keras")
    for name in CONVS + DENSES:
        layer = model.get_layer(name)
        assert isinstance(layer.kernel_initializer, keras.initializers.GlorotUniform)
        assert np.all(keras.ops.convert_to_numpy(layer.bias) == 0.0)


def test_weight_decay():
    wd = 5e-4
    model = small(weight_decay=wd)
    kernels = [model.get_layer(name) for name in CONVS + DENSES]
    assert len(model.losses) == len(kernels) == 8
    # Keras' L2(wd / 2): the penalty's gradient is wd * w, the paper's decay term.
    expected = sum(wd / 2 * np.sum(keras.ops.convert_to_numpy(l.kernel) ** 2) for l in kernels)
    total = sum(float(keras.ops.convert_to_numpy(loss)) for loss in model.losses)
    assert total == pytest.approx(expected, rel=1e-4)
    assert small(weight_decay=0.0).losses == []


def test_groups():
    model = small(groups=2)
    for i in range(1, 6):
        assert model.get_layer(f"conv{i}").groups == (2 if i in (2, 4, 5) else 1)
    plain = small(groups=1)
    # Grouping halves the input channels each kernel sees.
    for i in (2, 4, 5):
        assert model.get_layer(f"conv{i}").kernel.shape[2] * 2 == \
            plain.get_layer(f"conv{i}").kernel.shape[2]


@pytest.mark.parametrize("width, groups, filters, hidden", [
    (1.0, 1, [96, 256, 384, 384, 256], 4096),
    (0.5, 1, [48, 128, 192, 192, 128], 2048),
    (0.05, 1, [5, 13, 19, 19, 13], 205),
    (0.05, 2, [4, 12, 20, 20, 12], 205),  # rounded to a multiple of 2 for the two groups
])
def test_width(width, groups, filters, hidden):
    config = ModelConfig(variant="cifar", width=width, groups=groups, image_size=8)
    model = build_alexnet(config, num_classes=3)
    assert [model.get_layer(c).filters for c in CONVS] == filters
    assert model.get_layer("fc6").units == model.get_layer("fc7").units == hidden
    assert model.get_layer("fc8").units == 3


def test_input_preprocessing():
    plain = small()
    layer = plain.get_layer("preprocess")
    assert isinstance(layer, keras.layers.Rescaling)
    assert layer.scale == pytest.approx(1 / 255)

    mean, std = [125.3, 123.0, 113.9], [63.0, 62.1, 66.7]
    model = small(input_mean=mean, input_std=std)
    assert isinstance(model.get_layer("preprocess"), keras.layers.Normalization)
    config = model.get_config()
    assert config["input_mean"] == mean and config["input_std"] == std
    assert type(config["input_mean"]) is list
    x = images(2)
    head = keras.Model(model.input, model.get_layer("preprocess").output)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(head(x)),
                               (x - np.array(mean)) / np.array(std), rtol=1e-4, atol=1e-4)


def test_cifar_forward():
    model = small(num_classes=7)
    assert tuple(model.input_shape) == (None, 32, 32, 3)
    probs = keras.ops.convert_to_numpy(model(images(3), training=False))
    assert probs.shape == (3, 7) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_mixed_precision_outputs_float32():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = small(width=0.125, batchnorm=True)
        assert model.get_layer("conv1").compute_dtype == "float16"
        probs = model(images(2), training=False)
        assert keras.backend.standardize_dtype(probs.dtype) == "float32"
        np.testing.assert_allclose(keras.ops.convert_to_numpy(probs).sum(axis=1), 1.0, rtol=1e-3)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_fit_step():
    keras.utils.set_random_seed(0)
    model = small(width=0.25, num_classes=4, batchnorm=True)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = images(8), np.arange(8) % 4
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert math.isfinite(history.history["loss"][-1])


def test_save_and_load(tmp_path):
    keras.utils.set_random_seed(0)
    model = small(width=0.125, batchnorm=True, groups=2, pool="non_overlapping",
                  input_mean=[120.0, 115.0, 100.0], input_std=[60.0, 61.0, 62.0], num_classes=5)
    path = tmp_path / "alexnet.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, AlexNet)
    assert loaded.config == model.config
    assert loaded.get_config() == model.get_config()
    x = images(2)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded.predict(x, verbose=0)),
                                  keras.ops.convert_to_numpy(model.predict(x, verbose=0)))


def test_from_config_rebuilds_every_option():
    model = small(lrn=False, dropout=0.2, activation="tanh", init="keras", weight_decay=0.0,
                  lrn_size=3, image_size=40)
    config = model.get_config()
    assert set(MODEL_OPTIONS) <= set(config)
    clone = AlexNet.from_config(config)
    assert clone.config == model.config and clone.get_config() == config
    assert names(clone) == names(model) and clone.count_params() == model.count_params()


def test_build_alexnet_uses_config():
    config = ModelConfig(variant="cifar", width=0.125, lrn=False)
    model = build_alexnet(config, num_classes=3)
    assert model.config == config and model.num_classes == 3
    assert dataclasses.asdict(config).items() <= model.get_config().items()


@pytest.mark.parametrize("options, match", [
    (dict(dropout=1.5), r"dropout must be in \[0.0, 1.0\); got 1.5"),
    (dict(pool="foo"), "'overlapping', 'non_overlapping'; got 'foo'"),
    (dict(activation="gelu"), "'relu', 'tanh', 'sigmoid'; got 'gelu'"),
    (dict(variant="vgg"), "'paper', 'cifar', 'cifar_convnet4'; got 'vgg'"),
])
def test_config_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**options)
    with pytest.raises(ConfigError, match=match):
        AlexNet(**options)


def test_unknown_option():
    with pytest.raises(ConfigError, match="unknown_option.*Known keys.*lrn_size"):
        AlexNet(unknown_option=1)
    with pytest.raises(ConfigError, match="Did you mean batchnorm"):
        AlexNet(batchnrom=True)


def test_bad_combinations():
    # 63 px: 3x3/2 'valid' pools would shrink conv1's 14 px to 6, 2 and then 0.
    with pytest.raises(ConfigError, match="image_size must be an integer >= 67"):
        AlexNet(image_size=63, width=0.05)
    # 2x2/2 pools still fit: 14 -> 7 -> 3 -> 1.
    assert AlexNet(image_size=63, pool="non_overlapping", width=0.05).get_layer(
        "pool5").output.shape[1:3] == (1, 1)
    with pytest.raises(ConfigError, match="num_classes"):
        small(num_classes=0)
    with pytest.raises(ConfigError, match="together"):
        small(input_mean=[1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="3 finite numbers"):
        small(input_mean=[1.0, 2.0], input_std=[1.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="> 0"):
        small(input_mean=[1.0, 2.0, 3.0], input_std=[1.0, 0.0, 1.0])


# --- the geometry config.py checks a config against is the model's -------------------------------

@pytest.mark.parametrize("options, num_classes", [
    (dict(variant="paper", width=0.25), 1000),
    (dict(variant="paper", width=0.1, groups=2, pool="non_overlapping", image_size=131), 17),
    (dict(variant="cifar", width=0.25, batchnorm=True, dropout=0.0), 10),
    (dict(variant="cifar", width=0.05, groups=2, lrn=False, image_size=40), 3),
    (dict(variant="cifar", width=0.125, lrn=True, batchnorm=True, image_size=9), 2),
    (dict(variant="cifar_convnet4", width=0.5, batchnorm=True, groups=2), 7),
    (dict(variant="cifar_convnet4", lrn=False, dropout=0.0, image_size=30), 3),
])
def test_parameter_and_activation_counts_match_the_built_model(options, num_classes):
    config = ModelConfig(**options)
    model = build_alexnet(config, num_classes=num_classes)
    assert config.parameter_count(num_classes) == model.count_params()
    outputs = sum(math.prod(layer.output.shape[1:]) for layer in model.layers[1:])   # every layer after the input
    assert config.activation_count(num_classes) == outputs
    sides = config.feature_sides()
    pools = ("pool1", "pool2") if config.variant == "cifar_convnet4" else ("pool1", "pool2", "pool5")
    assert set(sides) == {"conv1", *pools}
    for name in sides:
        assert model.get_layer(name).output.shape[1] == sides[name], name


def test_paper_parameter_count_from_the_config_alone():
    # The numbers of test_paper_parameter_count, without building 62 million weights.
    assert ModelConfig().parameter_count(1000) == 62_378_344
    assert ModelConfig(groups=2).parameter_count(1000) == 60_965_224


# --- input_norm: the paper's regime (mean-subtracted 0..255 pixels) -----------------------------

def test_input_norm_center_only_subtracts_the_mean():
    mean, std = [125.3, 123.0, 113.9], [63.0, 62.1, 66.7]
    x = images(2)
    model = small(input_norm="center", input_mean=mean, input_std=std)
    head = keras.Model(model.input, model.get_layer("preprocess").output)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(head(x)), x - np.array(mean), rtol=1e-5, atol=1e-3)
    # Without statistics, the middle of the scale.
    plain = small(input_norm="center")
    head = keras.Model(plain.input, plain.get_layer("preprocess").output)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(head(x)), x - 127.5, rtol=1e-5, atol=1e-3)
    # The default is unchanged: standardised.
    assert small().config.input_norm == "standardize"
    with pytest.raises(ConfigError, match="input_norm must be one of 'standardize', 'center'"):
        small(input_norm="whiten")


def test_input_norm_survives_get_config_and_saving(tmp_path):
    model = small(width=0.125, input_norm="center", input_mean=[120.0, 115.0, 100.0], input_std=[60.0, 61.0, 62.0])
    assert model.get_config()["input_norm"] == "center"
    clone = AlexNet.from_config(model.get_config())
    assert clone.config.input_norm == "center" and clone.get_config() == model.get_config()
    path = tmp_path / "center.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.config.input_norm == "center"
    x = images(2)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded.predict(x, verbose=0)),
                               keras.ops.convert_to_numpy(model.predict(x, verbose=0)), rtol=1e-6)
    # A model saved before the option existed (no input_norm in its config) loads as standardised.
    old = small(width=0.125).get_config()
    del old["input_norm"]
    assert AlexNet.from_config(old).config.input_norm == "standardize"


# --- lrn_diagnostics: how much each LRN layer normalises -----------------------------------------

def test_lrn_diagnostics_equal_a_direct_numpy_computation():
    from alexnet_keras.model.alexnet import lrn_diagnostics

    alpha, beta, k, n = 0.3, 0.6, 1.3, 3
    inputs = keras.Input((3, 3, 7))
    first = LocalResponseNormalization(size=n, alpha=alpha, beta=beta, k=k, name="lrn1")(inputs)
    second = LocalResponseNormalization(size=5, alpha=1e-4, beta=0.75, k=2.0, name="lrn2")(first * 10.0)
    model = keras.Model(inputs, second)
    x = np.random.default_rng(7).normal(0.0, 2.0, size=(5, 3, 3, 7)).astype("float32")

    def expected(a, n, alpha, beta, k):
        a = np.asarray(a, np.float64)
        window = np.stack([np.sum(a[..., max(0, i - n // 2):i + n // 2 + 1] ** 2, axis=-1)
                           for i in range(a.shape[-1])], axis=-1)
        ratio, scale = alpha * window / k, (k + alpha * window) ** -beta
        return {"ratio_mean": ratio.mean(), "ratio_p95": np.percentile(ratio, 95), "scale_mean": scale.mean(),
                "scale_min": scale.min(), "scale_max": scale.max(), "constant_scale": k ** -beta,
                "relative_scale_mean": scale.mean() / k ** -beta, "relative_scale_min": scale.min() / k ** -beta}

    lrn1_out = keras.ops.convert_to_numpy(model.get_layer("lrn1")(x))
    for batch_size in (2, 32):   # batching must not change the statistics
        got = lrn_diagnostics(model, x, batch_size=batch_size)
        assert set(got) == {"lrn1", "lrn2"}
        for name, want in (("lrn1", expected(x, n, alpha, beta, k)),
                           ("lrn2", expected(lrn1_out * 10.0, 5, 1e-4, 0.75, 2.0))):
            assert set(got[name]) == set(want)
            for stat, value in want.items():
                assert got[name][stat] == pytest.approx(value, rel=1e-5), (name, stat)
    assert lrn_diagnostics(small(lrn=False, width=0.125), images(2)) == {}


def test_lrn_normalises_in_the_papers_regime_and_not_when_standardised():
    """Issue 16: with standardised inputs and Keras' init, alpha * sum(a^2) is tiny against k and LRN is
    the constant factor k^-beta; with the paper's regime (mean-subtracted 0..255 pixels, N(0, 0.01)
    init) it is at least ten times larger and the factor departs from the constant, on the same images."""
    from alexnet_keras.model.alexnet import lrn_diagnostics

    x = images(16, seed=3)
    mean = x.reshape(-1, 3).mean(axis=0).tolist()
    std = x.reshape(-1, 3).std(axis=0).tolist()
    results = {}
    for input_norm, init in (("standardize", "keras"), ("center", "paper")):
        keras.utils.set_random_seed(0)
        model = small(input_norm=input_norm, init=init, input_mean=mean, input_std=std)
        results[input_norm] = lrn_diagnostics(model, x)
    standardised, paper = results["standardize"], results["center"]
    constant = 2.0 ** -0.75
    for name in ("lrn1", "lrn2"):
        assert paper[name]["ratio_mean"] >= 10 * standardised[name]["ratio_mean"], name
        assert paper[name]["ratio_p95"] >= 10 * standardised[name]["ratio_p95"], name
        assert standardised[name]["constant_scale"] == pytest.approx(constant)
    # Standardised: the factor is k^-beta everywhere to 4 digits; the paper's regime damps the largest
    # responses of lrn1 by more than 1 %.
    assert standardised["lrn1"]["relative_scale_min"] > 0.999
    assert paper["lrn1"]["relative_scale_min"] < 0.99
    assert paper["lrn1"]["scale_min"] < 0.99 * constant


# --- cifar_convnet4: the paper's four-layer CIFAR-10 network ----------------------------------------

# cuda-convnet's example-layers/layers-conv-local-11pct.cfg (13pct: the same without rnorm1 and rnorm2), 24 px
# inputs, 10 classes; 'same' pools 3x3/2 give 24 -> 12 -> 6, as cuda-convnet's ceil((24 - 3) / 2) + 1 = 12:
#   conv1   5*5*3*64  + 64           =     4,864
#   conv2   5*5*64*64 + 64           =   102,464
#   local3  6*6 * (3*3*64*32 + 32)   =   664,704   (a kernel and a bias per position of the 6x6 map)
#   local4  6*6 * (3*3*32*32 + 32)   =   332,928
#   fc8     6*6*32*10 + 10           =    11,530
#   total                              1,116,490
@pytest.mark.parametrize("lrn", [True, False])
def test_cifar_convnet4_is_cuda_convnets_network(lrn):
    from alexnet_keras.model.layers import LocallyConnected2D

    model = AlexNet(num_classes=10, variant="cifar_convnet4", lrn=lrn, dropout=0.0)
    assert model.count_params() == ModelConfig(variant="cifar_convnet4").parameter_count(10) == 1_116_490
    norm = lambda i: [f"lrn{i}"] if lrn else []  # noqa: E731
    assert names(model) == ["image", "preprocess", "conv1", "act1", *norm(1), "pool1", "conv2", "act2", *norm(2),
                            "pool2", "local3", "act3", "local4", "act4", "flatten", "fc8", "predictions"]
    assert tuple(model.input_shape) == (None, 24, 24, 3)
    for name, kernel, filters, side in (("conv1", 5, 64, 24), ("conv2", 5, 64, 12), ("local3", 3, 32, 6),
                                        ("local4", 3, 32, 6)):
        layer = model.get_layer(name)
        assert isinstance(layer, LocallyConnected2D) == name.startswith("local")
        assert (np.ravel(layer.kernel_size)[0], layer.filters, layer.output.shape[1]) == (kernel, filters, side)
    regularised = small(variant="cifar_convnet4", dropout=0.5, weight_decay=5e-4)
    assert names(regularised)[-4:] == ["flatten", "dropout", "fc8", "predictions"]
    assert len(regularised.losses) == 5   # weight decay on conv1, conv2, local3, local4, fc8


def test_cifar_convnet4_trains_logs_train_eval_and_its_mlflow_model(mlflow_store):
    """A tiny run: the variant logs as an MLflow model like the others (saved, loaded), and --train-eval-images adds
    each epoch's train_eval_* (inference mode, fixed un-augmented training images): the loaded model scores the
    same there."""
    import mlflow
    from conftest import TINY, all_runs, cli_flags

    from alexnet_keras import cli
    from alexnet_keras.config import load_config
    from alexnet_keras.data import load_data

    options = {**TINY, "variant": "cifar_convnet4", "train_eval_images": 48, "dropout": 0.5}
    assert cli.main(["train", *cli_flags(options), "--system-metrics", "false"]) == 0
    run, = all_runs(mlflow_store)
    client = mlflow.MlflowClient(mlflow_store)
    history = {key: client.get_metric_history(run.info.run_id, f"train_eval_{key}") for key in ("accuracy", "loss")}
    assert all([m.step for m in values] == [0, 1] for values in history.values())
    model = mlflow.keras.load_model(f"runs:/{run.info.run_id}/alexnet")
    assert model.config.variant == "cifar_convnet4" and tuple(model.input_shape) == (None, 24, 24, 3)
    config = load_config(overrides=options)
    data = load_data(config.data, image_size=24, batch_size=32, seed=config.train.seed, verbose=False)
    scores = model.evaluate(data.train_eval, return_dict=True, verbose=0)   # no dropout: the same every time
    assert sum(len(y) for _, y in data.train_eval) == 48
    assert history["accuracy"][-1].value == pytest.approx(scores["accuracy"], abs=1e-6)
    assert history["loss"][-1].value == pytest.approx(scores["loss"], rel=1e-4)
