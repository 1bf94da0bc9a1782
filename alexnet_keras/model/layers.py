"""The LocalResponseNormalization layer, in `keras.ops` only (any backend)."""

import math

import keras
import numpy as np
from keras import ops


def _is_number(value) -> bool:   # bool is an int subclass; `alpha=True` is a mistake, not 1.0
    return not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)


@keras.saving.register_keras_serializable(package="alexnet_keras")
class LocalResponseNormalization(keras.layers.Layer):
    """Local response normalization across channels (Krizhevsky et al. 2012, section 3.3):

        b_i = a_i / (k + alpha * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a_j^2) ** beta

    n = `size` (odd), the window clipped at the edge channels; the paper's n=5, k=2, alpha=1e-4, beta=0.75
    are the defaults. `alpha` multiplies the plain sum (PyTorch and Caffe divide it by n). Computed in
    float32 under any policy: the sum of squares overflows float16 once activations reach ~115.
    """

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0,
                 axis: int = -1, **kwargs):
        super().__init__(**kwargs)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
            raise ValueError("LocalResponseNormalization: `size` must be a positive odd integer "
                             f"(1, 3, 5, ...; the paper uses 5); received size={size!r}.")
        for arg, value in (("alpha", alpha), ("beta", beta), ("k", k)):
            if not _is_number(value) or value < 0:
                raise ValueError(f"LocalResponseNormalization: `{arg}` must be a number >= 0; "
                                 f"received {arg}={value!r}.")
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError("LocalResponseNormalization: `axis` must be an integer (the channel "
                             f"axis, e.g. -1); received axis={axis!r}.")
        self.size, self.alpha, self.beta, self.k, self.axis = size, float(alpha), float(beta), float(k), axis
        self.supports_masking = True   # element-wise along every axis but the channel one

    def _channel_axis(self, rank: int) -> int:
        if not -rank <= self.axis < rank:
            raise ValueError(f"LocalResponseNormalization: `axis` must be in [-{rank}, {rank}) for "
                             f"inputs of rank {rank}; received axis={self.axis}.")
        return self.axis % rank

    def squared_sum(self, inputs):
        """sum_j a_j^2 over each channel's window, in float32, shaped as `inputs`."""
        x = ops.cast(inputs, "float32")
        axis = self._channel_axis(len(x.shape))
        # The window sum is one matmul with a 0/1 band matrix (which clips the window at the edge channels).
        # Measured on 2 CPU cores (TF, forward+backward, 128x32x32x48): 131 ms against 655 ms for a sum of
        # shifted slices, whose strided slices are slow to differentiate.
        index = np.arange(x.shape[axis])
        band = (np.abs(index[:, None] - index[None, :]) <= self.size // 2).astype("float32")
        return ops.moveaxis(ops.matmul(ops.moveaxis(ops.square(x), axis, -1), band), -1, axis)

    def scale(self, inputs):
        """(k + alpha * squared_sum(inputs)) ** -beta in float32: the factor each activation is multiplied by."""
        # exp(-beta * log(.)) rather than power(., -beta): the same value (the base is > 0 for k > 0),
        # but 2.7x faster on TensorFlow's CPU kernels, where power made LRN a quarter of the step
        # (benchmarks/README.md).
        return ops.exp(-self.beta * ops.log(self.k + self.alpha * self.squared_sum(inputs)))

    def call(self, inputs):
        x = ops.cast(inputs, "float32")   # see squared_sum
        return ops.cast(x * self.scale(x), inputs.dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "size": self.size, "alpha": self.alpha, "beta": self.beta, "k": self.k,
                "axis": self.axis}


@keras.saving.register_keras_serializable(package="alexnet_keras")
class LocallyConnected2D(keras.layers.Layer):
    """cuda-convnet's `local` layer (Keras 3 has none): a stride-1, zero-padded ('same') convolution whose
    kernel and bias differ at every output position. Channels last; the input's height and width must be known.
    The kernel is (height, width, k * k * channels, filters), a patch's values in (row, column, channel) order."""

    def __init__(self, filters: int, kernel_size: int, kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, use_bias: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel_size, self.use_bias = filters, kernel_size, use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)

    def build(self, input_shape):
        height, width, channels = input_shape[1:]
        self.kernel = self.add_weight(shape=(height, width, self.kernel_size ** 2 * channels, self.filters),
                                      initializer=self.kernel_initializer, regularizer=self.kernel_regularizer,
                                      name="kernel")
        self.bias = self.add_weight(shape=(height, width, self.filters), initializer=self.bias_initializer,
                                    name="bias") if self.use_bias else None

    def call(self, inputs):
        patches = ops.image.extract_patches(inputs, self.kernel_size, strides=1, padding="same")
        outputs = ops.einsum("bhwp,hwpf->bhwf", patches, self.kernel)
        return outputs + self.bias if self.use_bias else outputs

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "use_bias": self.use_bias, **{name: keras.saving.serialize_keras_object(getattr(self, name)) for name
                                              in ("kernel_initializer", "bias_initializer", "kernel_regularizer")}}
