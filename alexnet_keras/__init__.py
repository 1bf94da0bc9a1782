"""AlexNet (Krizhevsky, Sutskever & Hinton, 2012) in Keras 3, every design choice a toggle.

    from alexnet_keras import AlexNet
    model = AlexNet(num_classes=10, variant="cifar", lrn=False, batchnorm=True)

Training, ablations and sweeps are logged to MLflow: see `alexnet-keras --help` and the README.
"""

from .config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, load_config

__version__ = "0.1.0"

# The network's names import Keras (and its backend), which takes seconds: they are loaded on first use
# (PEP 562), so that `alexnet-keras --help`, `--version` and `report` start without them.
_KERAS_EXPORTS = {"AlexNet": "model", "build_alexnet": "model", "LocalResponseNormalization": "model"}


def __getattr__(name: str):
    if name not in _KERAS_EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_KERAS_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_KERAS_EXPORTS})


__all__ = ["AlexNet", "LocalResponseNormalization", "build_alexnet", "Config", "ModelConfig", "DataConfig",
           "TrainConfig", "ConfigError", "load_config", "__version__"]
