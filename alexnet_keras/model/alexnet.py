"""AlexNet (Krizhevsky, Sutskever & Hinton, 2012) as a serializable Keras 3 functional model, in `keras`
and `keras.ops` only: `config.ModelConfig` turned into layers."""

import dataclasses
import math
from typing import Any, Sequence

import keras
import numpy as np

from alexnet_keras.config import (CONV_KERNELS, GROUPED_CONVS, LOCAL_CONVS, LRN_CONVS, POOL_SIZES, POOLED_CONVS,
                                  ConfigError, ModelConfig)
from alexnet_keras.model.layers import LocallyConnected2D, LocalResponseNormalization

MODEL_OPTIONS = tuple(f.name for f in dataclasses.fields(ModelConfig))

# "We initialized the neuron biases in the second, fourth, and fifth convolutional layers, as well
# as in the fully-connected hidden layers, with the constant 1." (section 5)
_BIAS_ONE = {"conv2", "conv4", "conv5", "fc6", "fc7"}


@keras.saving.register_keras_serializable(package="alexnet_keras")
class AlexNet(keras.Model):
    """AlexNet: 5 convolutional + 3 fully-connected layers, every design choice a toggle (the fields of
    ModelConfig as keyword `options`). Raw pixels (0..255) in, float32 probabilities out; the first layer,
    "preprocess", standardizes or centres them, so a saved model is self-contained. Layers: conv{i} ->
    *bn{i} -> act{i} -> *lrn{i} (i = 1, 2) -> pool{i} (i = 1, 2, 5), flatten -> *dropout6 -> fc6 -> act6
    -> *dropout7 -> fc7 -> act7 -> fc8 -> predictions (* optional). Variant cifar_convnet4: conv1, conv2,
    local3, local4 (locally connected), flatten -> *dropout -> fc8 -> predictions."""

    def __init__(self, num_classes: int = 1000, input_mean: Sequence[float] | None = None,
                 input_std: Sequence[float] | None = None, name: str = "alexnet", **options: Any):
        trainable = options.pop("trainable", True)   # every Keras layer's, not a ModelConfig field
        config = ModelConfig(**options)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"AlexNet num_classes must be a positive integer; got {num_classes!r}.")
        mean, std = _normalization_stats(input_mean, input_std)

        inputs, outputs = _build_graph(config, num_classes, mean, std)
        super().__init__(inputs=inputs, outputs=outputs, name=name, trainable=trainable)

        # Set after super().__init__(), as Keras requires for attributes of a Model.
        self.config, self.num_classes, self.input_mean, self.input_std = config, num_classes, mean, std

    def get_config(self) -> dict[str, Any]:
        # Plain lists of floats, so the config is JSON (the .keras file's config.json).
        stats = {k: None if v is None else [float(x) for x in v] for k, v in
                 (("input_mean", self.input_mean), ("input_std", self.input_std))}
        return {"name": self.name, "trainable": self.trainable, "num_classes": self.num_classes, **stats,
                **dataclasses.asdict(self.config)}

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects=None) -> "AlexNet":
        return cls(**config)


def build_alexnet(config: ModelConfig, num_classes: int, input_mean: Sequence[float] | None = None,
                  input_std: Sequence[float] | None = None) -> AlexNet:
    return AlexNet(num_classes=num_classes, input_mean=input_mean, input_std=input_std,
                   **dataclasses.asdict(config))


def summary_text(model: keras.Model, **summary_kwargs: Any) -> str:
    """`model.summary()` as a string (its own `Total params: N (size)` line included)."""
    chunks: list[str] = []
    model.summary(print_fn=lambda text, *args, **kwargs: chunks.append(text), **summary_kwargs)
    return "\n".join(chunk.rstrip("\n") for chunk in chunks)


def lrn_diagnostics(model: keras.Model, images: Any, batch_size: int = 32) -> dict[str, dict[str, float]]:
    """How much each LRN layer of `model` normalises on `images`, measured with the layer's own code: {layer:
    {ratio_mean, ratio_p95 (of alpha * sum(a^2) / k; ~0: nothing), scale_mean/min/max (of the factor),
    constant_scale (k ** -beta), relative_scale_mean/min (scale / constant_scale)}}; {} without LRN."""
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


def _normalization_stats(mean, std) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise ConfigError("AlexNet input_mean and input_std must be given together (per-channel values in "
                          f"0..255 units) or both left unset; got input_mean={mean!r}, input_std={std!r}.")
    out = []
    for name, values in (("input_mean", mean), ("input_std", std)):
        try:
            floats = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            floats = ()
        if len(floats) != 3 or not all(map(math.isfinite, floats)):
            raise ConfigError(f"AlexNet {name} must be 3 finite numbers (one per RGB channel, in 0..255 units); "
                              f"got {values!r}.")
        out.append(floats)
    if any(v <= 0 for v in out[1]):
        raise ConfigError(f"AlexNet input_std must be > 0 for every channel; got {list(out[1])}.")
    return out[0], out[1]


def _weights(config: ModelConfig, name: str) -> dict[str, Any]:
    """The initializers and weight decay of the conv or dense layer `name` (fresh instances per layer: Keras
    warns when one unseeded initializer is reused). The paper's update v <- 0.9 v - 0.0005 lr w - lr dL/dw
    decays by the gradient of (wd / 2) ||w||^2, Keras' L2(l) adds l ||w||^2: l = wd / 2, on kernels only."""
    paper = config.init == "paper"
    return {"kernel_initializer": keras.initializers.RandomNormal(stddev=0.01) if paper else "glorot_uniform",
            "bias_initializer": "ones" if paper and name in _BIAS_ONE else "zeros",
            "kernel_regularizer": keras.regularizers.L2(config.weight_decay / 2) if config.weight_decay > 0 else None}


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

    paper, local = config.variant == "paper", LOCAL_CONVS.get(config.variant, ())
    pool_size = POOL_SIZES[config.pool]
    for i, (filters, kernel) in enumerate(zip(config.conv_filters, CONV_KERNELS[config.variant]), start=1):
        name = f"local{i}" if i in local else f"conv{i}"
        first_paper_conv = paper and i == 1
        # No conv bias before BN: BN's beta does its job.
        if i in local:
            x = LocallyConnected2D(filters, kernel, use_bias=not config.batchnorm, name=name,
                                   **_weights(config, name))(x)
        else:
            x = keras.layers.Conv2D(filters, kernel, strides=4 if first_paper_conv else 1,
                                    padding="valid" if first_paper_conv else "same",
                                    groups=config.groups if i in GROUPED_CONVS else 1, use_bias=not config.batchnorm,
                                    name=name, **_weights(config, name))(x)
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
    if local and config.dropout > 0:
        x = keras.layers.Dropout(config.dropout, name="dropout")(x)
    for i in () if local else (6, 7):
        if config.dropout > 0:
            x = keras.layers.Dropout(config.dropout, name=f"dropout{i}")(x)
        x = keras.layers.Dense(config.hidden_units, name=f"fc{i}", **_weights(config, f"fc{i}"))(x)
        x = keras.layers.Activation(config.activation, name=f"act{i}")(x)
    x = keras.layers.Dense(num_classes, name="fc8", **_weights(config, "fc8"))(x)
    # float32 whatever the global policy, so mixed precision still yields float32 probabilities.
    outputs = keras.layers.Activation("softmax", dtype="float32", name="predictions")(x)
    return inputs, outputs
