"""AlexNet (Krizhevsky, Sutskever & Hinton, 2012) as a serializable Keras 3 functional model, in `keras`
and `keras.ops` only (any backend). Every default lives in `config.ModelConfig`; this module only
turns a config into layers."""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Sequence

import keras
import numpy as np

from alexnet_keras.config import (CONV_KERNELS, GROUPED_CONVS, LRN_CONVS, POOL_SIZES, POOLED_CONVS, ConfigError,
                                  ModelConfig)
from alexnet_keras.model.layers import LocalResponseNormalization

# The option names `AlexNet(**options)` accepts: exactly the fields of ModelConfig.
MODEL_OPTIONS = tuple(f.name for f in dataclasses.fields(ModelConfig))

# The network's geometry (filters, kernels, which convs are grouped, pooled or followed by LRN, the
# feature-map sides) lives in config.py, which checks a config against it before anything is built.
# "We initialized the neuron biases in the second, fourth, and fifth convolutional layers, as well
# as in the fully-connected hidden layers, with the constant 1." (section 5)
_BIAS_ONE = {"conv2", "conv4", "conv5", "fc6", "fc7"}


@keras.saving.register_keras_serializable(package="alexnet_keras")
class AlexNet(keras.Model):
    """AlexNet: 5 convolutional + 3 fully-connected layers, every design choice a toggle (the fields of
    ModelConfig, passed as keyword `options`; config.py documents each and holds the geometry).

    Float images (S, S, 3) with raw pixels in 0..255 in, float32 class probabilities out (the softmax
    stays float32 under mixed precision). The first layer, "preprocess", scales the pixels so that a
    saved model is self-contained: "standardize" gives (x - input_mean) / input_std (else x / 255),
    "center" gives x - input_mean in 0..255 units, the paper's regime (else x - 127.5).

    Layers: conv{i} -> *bn{i} -> act{i} -> *lrn{i} (i = 1, 2) -> pool{i} (i = 1, 2, 5), then flatten ->
    *dropout6 -> fc6 -> act6 -> *dropout7 -> fc7 -> act7 -> fc8 -> predictions (* optional). The
    "cifar" variant is the same topology for 32-px images: conv1 3x3 stride 1, conv2 3x3, 'same'
    padding throughout, so both pool kinds give 32 -> 16 -> 8 -> 4 and FC6's input stays the same.
    `get_config()` returns every constructor argument, so saved models rebuild the same network.
    """

    def __init__(self, num_classes: int = 1000, input_mean: Sequence[float] | None = None,
                 input_std: Sequence[float] | None = None, name: str = "alexnet", **options: Any):
        # `trainable` is part of every Keras layer's base config; keep it out of the ModelConfig.
        trainable = options.pop("trainable", True)
        config = _model_config(options)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"AlexNet num_classes must be a positive integer; got {num_classes!r}.")
        mean, std = _normalization_stats(input_mean, input_std)

        inputs, outputs = _build_graph(config, num_classes, mean, std)
        super().__init__(inputs=inputs, outputs=outputs, name=name, trainable=trainable)

        # Set after super().__init__(), as Keras requires for attributes of a Model.
        self.config = config
        self.num_classes = num_classes
        self.input_mean = mean
        self.input_std = std

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "num_classes": self.num_classes,
            # Plain lists of floats, so the config is JSON (the .keras file's config.json).
            "input_mean": None if self.input_mean is None else [float(v) for v in self.input_mean],
            "input_std": None if self.input_std is None else [float(v) for v in self.input_std],
            **dataclasses.asdict(self.config),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects=None) -> "AlexNet":
        return cls(**config)


def build_alexnet(config: ModelConfig, num_classes: int, input_mean: Sequence[float] | None = None,
                  input_std: Sequence[float] | None = None) -> AlexNet:
    """The AlexNet described by `config` with `num_classes` outputs (see `AlexNet`)."""
    return AlexNet(num_classes=num_classes, input_mean=input_mean, input_std=input_std,
                   **dataclasses.asdict(config))


def summary_text(model: keras.Model, **summary_kwargs: Any) -> str:
    """`model.summary()` as a string, ending with `Total params: N` for logs to be grepped."""
    chunks: list[str] = []
    model.summary(print_fn=lambda text, *args, **kwargs: chunks.append(text), **summary_kwargs)
    text = "\n".join(chunk.rstrip("\n") for chunk in chunks)
    return f"{text}\nTotal params: {model.count_params():,}"


def lrn_diagnostics(model: keras.Model, images: Any, batch_size: int = 32) -> dict[str, dict[str, float]]:
    """How much each LocalResponseNormalization layer of `model` normalises on `images` (model inputs).

    Each LRN layer's input activations are measured (inference mode) with the layer's own
    `squared_sum` and `scale`: {layer name: {ratio_mean, ratio_p95 (of alpha * sum(a^2) / k: ~0 means
    the layer normalises nothing), scale_mean/min/max (of the factor), constant_scale (k ** -beta),
    relative_scale_mean/min (scale / constant_scale: 1 = a constant factor)}}; {} without LRN.
    """
    layers = [layer for layer in model.layers if isinstance(layer, LocalResponseNormalization)]
    if not layers:
        return {}
    probe = keras.Model(model.input, [layer.input for layer in layers])
    measured = {layer.name: ([], []) for layer in layers}   # ratios, scales
    images = keras.ops.convert_to_numpy(images)
    for start in range(0, len(images), batch_size):
        activations = probe(images[start:start + batch_size], training=False)
        for layer, a in zip(layers, activations if len(layers) > 1 else [activations]):
            measured[layer.name][0].append(keras.ops.convert_to_numpy(layer.alpha * layer.squared_sum(a) / layer.k))
            measured[layer.name][1].append(keras.ops.convert_to_numpy(layer.scale(a)))
    out = {}
    for layer in layers:
        ratio, scale = (np.concatenate([p.ravel() for p in parts]).astype(np.float64) for parts in measured[layer.name])
        constant = layer.k ** -layer.beta
        out[layer.name] = {
            "ratio_mean": float(ratio.mean()), "ratio_p95": float(np.percentile(ratio, 95)),
            "scale_mean": float(scale.mean()), "scale_min": float(scale.min()), "scale_max": float(scale.max()),
            "constant_scale": float(constant), "relative_scale_mean": float(scale.mean() / constant),
            "relative_scale_min": float(scale.min() / constant),
        }
    return out


# --- helpers ---------------------------------------------------------------------------------

def _model_config(options: dict[str, Any]) -> ModelConfig:
    unknown = sorted(set(options) - set(MODEL_OPTIONS))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, MODEL_OPTIONS, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"AlexNet got unknown option(s) {', '.join(hints)}. Valid options are "
                          f"num_classes, input_mean, input_std, name and the ModelConfig fields: "
                          f"{', '.join(MODEL_OPTIONS)}.")
    try:
        return ModelConfig(**options)
    except TypeError as err:  # e.g. a field given twice; keep the message but name the fields
        raise ConfigError(f"AlexNet options are invalid ({err}). Valid options: "
                          f"{', '.join(MODEL_OPTIONS)}.") from None


def _normalization_stats(mean, std) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise ConfigError("AlexNet input_mean and input_std must be given together (per-channel "
                          f"values in 0..255 units) or both left unset; got input_mean={mean!r}, "
                          f"input_std={std!r}.")
    out = []
    for name, values in (("input_mean", mean), ("input_std", std)):
        try:
            values = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            values = ()
        if len(values) != 3 or not all(math.isfinite(v) for v in values):
            raise ConfigError(f"AlexNet {name} must be 3 finite numbers (one per RGB channel, in "
                              f"0..255 units); got {mean if name == 'input_mean' else std!r}.")
        out.append(values)
    if any(v <= 0 for v in out[1]):
        raise ConfigError(f"AlexNet input_std must be > 0 for every channel; got {list(out[1])}.")
    return out[0], out[1]


def _kernel_initializer(config: ModelConfig):
    # A fresh instance per layer: Keras warns when one unseeded initializer is reused.
    if config.init == "paper":
        return keras.initializers.RandomNormal(mean=0.0, stddev=0.01)
    return keras.initializers.GlorotUniform()


def _bias_initializer(config: ModelConfig, layer_name: str):
    if config.init == "paper" and layer_name in _BIAS_ONE:
        return keras.initializers.Constant(1.0)
    return keras.initializers.Zeros()


def _regularizer(config: ModelConfig):
    # The paper's update rule is  v <- 0.9 v - 0.0005 lr w - lr dL/dw,  i.e. the decay term
    # lr * wd * w is the gradient of (wd / 2) * ||w||^2. Keras' L2(l) adds l * ||w||^2 (gradient
    # 2 l w), so l = wd / 2 reproduces the paper exactly. Applied to kernels only, as the paper
    # does not say it decays biases; BN parameters are not decayed either.
    if config.weight_decay > 0:
        return keras.regularizers.L2(config.weight_decay / 2)
    return None


def _build_graph(config: ModelConfig, num_classes: int, mean, std):
    size = config.input_size
    inputs = keras.Input(shape=(size, size, 3), name="image")
    center = config.input_norm == "center"
    if mean is not None:
        # "center": variance 1, so the layer only subtracts the mean (0..255 units, as in the paper).
        x = keras.layers.Normalization(mean=list(mean), variance=[1.0] * 3 if center else [s * s for s in std],
                                       name="preprocess")(inputs)
    elif center:   # no statistics: the middle of the 0..255 scale stands in for the mean
        x = keras.layers.Rescaling(1.0, offset=-127.5, name="preprocess")(inputs)
    else:
        x = keras.layers.Rescaling(1.0 / 255.0, name="preprocess")(inputs)

    paper = config.variant == "paper"
    pool_size = POOL_SIZES[config.pool]
    for i, (filters, kernel) in enumerate(zip(config.conv_filters, CONV_KERNELS[config.variant]), start=1):
        name = f"conv{i}"
        first_paper_conv = paper and i == 1
        x = keras.layers.Conv2D(
            filters=filters,
            kernel_size=kernel,
            strides=4 if first_paper_conv else 1,
            padding="valid" if first_paper_conv else "same",
            groups=config.groups if i in GROUPED_CONVS else 1,
            # BN's beta does the bias' job, so a conv bias before BN would be a wasted weight.
            use_bias=not config.batchnorm,
            kernel_initializer=_kernel_initializer(config),
            bias_initializer=_bias_initializer(config, name),
            kernel_regularizer=_regularizer(config),
            name=name,
        )(x)
        if config.batchnorm:
            x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.Activation(config.activation, name=f"act{i}")(x)
        if config.lrn and i in LRN_CONVS:
            x = LocalResponseNormalization(size=config.lrn_size, alpha=config.lrn_alpha,
                                           beta=config.lrn_beta, k=config.lrn_k, name=f"lrn{i}")(x)
        if i in POOLED_CONVS:
            # 'valid' in the paper variant gives 55 -> 27 -> 13 -> 6 for 3x3/2 and 2x2/2 alike;
            # 'same' in the cifar variant gives 32 -> 16 -> 8 -> 4 for both.
            x = keras.layers.MaxPooling2D(pool_size=pool_size, strides=2,
                                          padding="valid" if paper else "same", name=f"pool{i}")(x)

    x = keras.layers.Flatten(name="flatten")(x)
    hidden = config.hidden_units
    for i in (6, 7):
        if config.dropout > 0:
            x = keras.layers.Dropout(config.dropout, name=f"dropout{i}")(x)
        x = keras.layers.Dense(hidden, kernel_initializer=_kernel_initializer(config),
                               bias_initializer=_bias_initializer(config, f"fc{i}"),
                               kernel_regularizer=_regularizer(config), name=f"fc{i}")(x)
        x = keras.layers.Activation(config.activation, name=f"act{i}")(x)
    x = keras.layers.Dense(num_classes, kernel_initializer=_kernel_initializer(config),
                           bias_initializer=_bias_initializer(config, "fc8"),
                           kernel_regularizer=_regularizer(config), name="fc8")(x)
    # float32 whatever the global policy, so mixed precision still yields float32 probabilities.
    outputs = keras.layers.Activation("softmax", dtype="float32", name="predictions")(x)
    return inputs, outputs
