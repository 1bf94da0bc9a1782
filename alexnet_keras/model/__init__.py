"""The network: `AlexNet` (Keras layers and `keras.ops` only, so any backend), its
`LocalResponseNormalization` layer, and `inference` (a trained network with its preprocessing)."""

from .alexnet import AlexNet, build_alexnet
from .layers import LocalResponseNormalization

__all__ = ["AlexNet", "LocalResponseNormalization", "build_alexnet"]
