"""The LRN layer's power term in four forms, timed alone at lrn1's shape (forward+backward).

Backs "The LRN change" in benchmarks/README.md: the layer used to compute
`x * ops.power(k + alpha * sum, -beta)`; it now computes `x * ops.exp(-beta * ops.log(...))`.
Each form below shares the layer's own window sum (`LocalResponseNormalization.squared_sum`, a 0/1
band matmul) and differs only in how the power is taken:

    power     x * power(t, -beta)                 (the layer before the change)
    exp/log   the layer as shipped                (x * exp(-beta * log(t)))
    rsqrt     x * rsqrt(t) * sqrt(rsqrt(t))       (beta = 0.75 only)
    tf.nn     tf.nn.local_response_normalization  (TensorFlow's fused kernel, TensorFlow only)

with t = k + alpha * sum. Each step is a tf.function of the gradient of l2_loss(y) w.r.t. x,
TensorFlow backend, float32, no XLA; every form runs one step in turn, `--rounds` times (so a change
of load hits all alike), after one untimed warm-up step each. One CSV row per timed step:

    nice -n 10 python benchmarks/lrn_forms.py --rounds 10 --out benchmarks/results/lrn-forms.csv
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import ops  # noqa: E402

from alexnet_keras.model.layers import LocalResponseNormalization  # noqa: E402
from machine import write_rows  # noqa: E402  benchmarks/machine.py


def forms(layer: LocalResponseNormalization) -> dict:
    k, alpha, beta = layer.k, layer.alpha, layer.beta

    def power(x):
        return x * ops.power(k + alpha * layer.squared_sum(x), -beta)

    def rsqrt(x):
        inverse_root = ops.rsqrt(k + alpha * layer.squared_sum(x))
        return x * inverse_root * ops.sqrt(inverse_root)

    def tf_nn(x):
        return tf.nn.local_response_normalization(x, layer.size // 2, k, alpha, beta)

    return {"power": power, "exp/log": layer, "rsqrt": rsqrt, "tf.nn": tf_nn}


def gradient_step(forward):
    @tf.function(jit_compile=False)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.nn.l2_loss(forward(x))
        return tape.gradient(loss, x)
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--shape", default="32,54,54,96", help="input shape (lrn1 at 224 px, batch 32)")
    parser.add_argument("--out", default="benchmarks/results/lrn-forms.csv")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    layer = LocalResponseNormalization()   # the paper's n=5, k=2, alpha=1e-4, beta=0.75
    x = tf.abs(tf.random.normal(shape, stddev=3.0, seed=0))   # ReLU outputs are >= 0
    steps = {name: gradient_step(form) for name, form in forms(layer).items()}
    reference = steps["tf.nn"](x)
    for name, step in steps.items():   # trace, warm up, and check every form computes the same gradient
        error = float(tf.reduce_max(tf.abs(step(x) - reference)))
        if error > 1e-4:
            raise SystemExit(f"lrn_forms: form {name!r} differs from tf.nn by {error:g}")
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step(x).numpy()
            times[name].append(time.perf_counter() - start)
    load_after = " ".join(f"{v:.2f}" for v in os.getloadavg())
    context = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
               "machine": f"{platform.machine()} x{os.cpu_count()}", "tensorflow": tf.__version__,
               "keras": keras.__version__, "shape": "x".join(map(str, shape)),
               "load_before": load_before, "load_after": load_after}
    path = Path(args.out)
    write_rows(path, [{"form": name, "round": i, "seconds": f"{seconds:.6f}"}
                      for name, values in times.items() for i, seconds in enumerate(values)], context)
    print(f"{context['date']}, load average before/after: {load_before} / {load_after}")
    print("| form | median ms | min ms | median / exp-log median |\n|---|---|---|---|")
    base = statistics.median(times["exp/log"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {1000 * median:.1f} | {1000 * min(values):.1f} | {median / base:.2f} |")
    print(f"rows: {path}")


if __name__ == "__main__":
    main()
