"""AlexNet (Krizhevsky, Sutskever & Hinton, 2012) in Keras 3, every design choice a toggle.

    from alexnet_keras import AlexNet
    model = AlexNet(num_classes=10, variant="cifar", lrn=False, batchnorm=True)

Training, ablations and sweeps are logged to MLflow: see `alexnet-keras --help` and the README.
"""

from .config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, load_config
from .layers import LocalResponseNormalization
from .model import AlexNet, build_alexnet

__version__ = "0.1.0"

__all__ = ["AlexNet", "LocalResponseNormalization", "build_alexnet", "Config", "ModelConfig", "DataConfig",
           "TrainConfig", "ConfigError", "load_config", "__version__"]
