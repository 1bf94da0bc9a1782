"""Where the CPU gap to the seeds' TF1 graph comes from: the conv stack with each LRN implementation.

The conv stack (batch 32, 224 px, float32, forward+backward of l2_loss(pool5) w.r.t. every weight,
TensorFlow backend, no XLA) is timed with the LRN layer's `call` swapped in turn for
  * `package`       - alexnet_keras.model.layers as shipped (band matmul, exp/log, differentiated op by op);
  * `written grad`  - the same forward with alpha folded into the band and the gradient written out
                      with keras.ops.custom_gradient (fewer passes over the activations; tried, not kept);
  * `tf.nn`         - TensorFlow's fused LRN kernel (what the TF1 graph uses; not portable to JAX/PyTorch);
and against the same stack written directly in tf.nn ops in one tf.function (TF1's layers, eager
TF2). Every contender runs one step in turn, `--rounds` times; medians, printed, and one CSV row per
timed step (with the date and the load average before/after) in `--out`. Results: benchmarks/README.md.

    nice -n 10 python benchmarks/lrn_in_context.py --rounds 25 --out benchmarks/results/lrn-in-context.csv
"""

import argparse
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import tensorflow as tf
from keras import ops

from alexnet_keras.model import layers
from alexnet_keras.training.benchmark import build_model
from machine import write_rows  # benchmarks/machine.py

FILTERS, KERNELS = [96, 256, 384, 384, 256], [11, 5, 3, 3, 3]


def tf_stack():
    """The project's conv stack in plain tf.nn ops (benchmarks/tf1_reference.py's layers, --shapes project)."""
    weights, biases, channels = [], [], 3
    for out, k in zip(FILTERS, KERNELS):
        weights.append(tf.Variable(tf.random.truncated_normal([k, k, channels, out], stddev=0.1)))
        biases.append(tf.Variable(tf.zeros([out])))
        channels = out

    def stack(x):
        x = x * (1 / 255)
        for i in range(5):
            x = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, weights[i], 4 if i == 0 else 1,
                                                       "VALID" if i == 0 else "SAME"), biases[i]))
            if i in (0, 1):
                x = tf.nn.local_response_normalization(x, 2, 2.0, 1e-4, 0.75)
            if i in (0, 1, 4):
                x = tf.nn.max_pool2d(x, 3, 2, "VALID")
        return x

    return stack, weights + biases


def written_gradient_call(self, x):
    """y = x * t^-beta, t = k + A(x^2), A = alpha * band (symmetric):
    dL/dx = g * t^-beta - 2 * beta * x * A(g * y / t)."""
    index = np.arange(x.shape[-1])
    band = (self.alpha * (np.abs(index[:, None] - index[None, :]) <= self.size // 2)).astype("float32")
    beta, k = self.beta, self.k

    @ops.custom_gradient
    def lrn(x):
        t = k + ops.matmul(ops.square(x), band)
        scale = ops.exp(-beta * ops.log(t))
        y = x * scale

        def grad(*args, upstream=None):
            g = args[0] if upstream is None else upstream
            return g * scale - (2.0 * beta) * x * ops.matmul(g * y / t, band)

        return y, grad

    return lrn(x)


def tf_nn_call(self, x):
    return tf.nn.local_response_normalization(x, self.size // 2, self.k, self.alpha, self.beta)


def gradient_step(forward, variables):
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.nn.l2_loss(forward(x))
        return tape.gradient(loss, variables)
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/lrn-in-context.csv",
                        help="CSV of every timed step")
    args = parser.parse_args()
    images = tf.random.uniform((args.batch_size, 224, 224, 3), 0, 255, seed=0)
    steps = {}
    shipped = layers.LocalResponseNormalization.call
    for name, call in (("package", shipped), ("written grad", written_gradient_call), ("tf.nn", tf_nn_call)):
        layers.LocalResponseNormalization.call = call
        model = build_model("conv")
        steps[f"keras, LRN {name}"] = gradient_step(lambda x, m=model: m(x, training=True),
                                                    model.trainable_variables)
    layers.LocalResponseNormalization.call = shipped
    stack, variables = tf_stack()
    steps["tf.nn ops in one tf.function"] = gradient_step(stack, variables)
    times = {name: [] for name in steps}
    for step in steps.values():
        step(images)   # trace and warm up
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step(images)[0].numpy()
            times[name].append(time.perf_counter() - start)
    load_after = " ".join(f"{v:.2f}" for v in os.getloadavg())
    context = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
               "machine": f"{os.uname().machine} x{os.cpu_count()}", "tensorflow": tf.__version__,
               "batch_size": args.batch_size, "load_before": load_before, "load_after": load_after}
    path = Path(args.out)
    write_rows(path, [{"contender": name, "round": i, "seconds": f"{seconds:.6f}"}
                      for name, values in times.items() for i, seconds in enumerate(values)], context)
    print(f"{context['date']}, load average before/after: {load_before} / {load_after}; rows: {path}")
    print("| conv stack, forward+backward | median ms | min ms |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {1000 * np.median(values):.1f} | {1000 * min(values):.1f} |")


if __name__ == "__main__":
    main()
