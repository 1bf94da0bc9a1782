"""AlexNet (Krizhevsky, Sutskever & Hinton, 2012) in Keras 3, every design choice a toggle:
`AlexNet(num_classes=10, variant="cifar", lrn=False)`. Training, ablations and sweeps are logged to MLflow:
see `alexnet-keras --help` and the README."""

from .config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, load_config

__version__ = "0.1.0"
__all__ = ["AlexNet", "LocalResponseNormalization", "build_alexnet", "Config", "ModelConfig", "DataConfig",
           "TrainConfig", "ConfigError", "load_config", "__version__"]


def __getattr__(name: str):
    """The network's names load Keras (seconds) on first use (PEP 562): `--help` and `report` start without it."""
    if name not in ("AlexNet", "build_alexnet", "LocalResponseNormalization"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import model

    globals()[name] = getattr(model, name)
    return globals()[name]
