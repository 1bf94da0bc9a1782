"""The Keras conv stack against the seeds' TF1 graph (tf1_reference.py), timed step by step in turn.

Round i times one step of every contender (Keras with each XLA setting, TF1 with each layer-shape set)
before round i + 1 starts, so that a load change on a shared machine hits all of them alike; the
speedups use the medians (> 1: Keras is faster), and per FLOP too, because the seeds' layers
(64/192/384/256/256 filters) do less work than this model's (`--shapes project` does the same work).
float32, TensorFlow backend. Both sides time what the seeds timed: forward, and the gradients of
l2_loss(pool5) w.r.t. every weight (no optimizer update: a `tf.GradientTape` in a `tf.function`).
`--profile` adds TensorFlow's profiler around 3 forward+backward steps of the full network, summarized
by op type and by layer.

    python benchmarks/tf1_comparison.py --batch-size 32 --steps 20 --burn-in 3 --xla false,true --out out.csv
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from alexnet_keras.tables import csv_text, markdown_table  # noqa: E402
from alexnet_keras.training.benchmark import build_model, forward_flops, mean_sd  # noqa: E402
from machine import machine  # noqa: E402  (benchmarks/machine.py)
from tf1_reference import Reference  # noqa: E402


def keras_steps(model, part: str, xla: bool):
    """(forward, forward+backward) of `model` as the seeds measured them: each call blocks on its result."""
    @tf.function(jit_compile=xla)
    def forward(x):
        return model(x, training=False)

    @tf.function(jit_compile=xla)
    def gradients(x, y):
        with tf.GradientTape() as tape:
            outputs = model(x, training=True)
            if part == "conv":
                loss = tf.nn.l2_loss(tf.cast(outputs, tf.float32))
            else:
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, outputs)) + sum(model.losses)
        return tape.gradient(loss, model.trainable_variables)

    def fetch(result):   # one element: the host copy waits for the whole function
        return tf.reshape(tf.nest.flatten(result)[-1], [-1])[:1].numpy()

    return lambda x, y: fetch(forward(x)), lambda x, y: fetch(gradients(x, y))


def compare(batch_size, image_size, width, steps, burn_in, xla_settings, shapes=("seeds", "project"),
            clock=time.perf_counter):
    """One row per contender (medians, means and sds in ms) and one per (TF1 shapes, Keras XLA) speedup."""
    x = tf.random.uniform((batch_size, image_size, image_size, 3), 0, 255)
    y = tf.zeros((batch_size,), tf.int32)
    contenders = {}
    for xla in xla_settings:
        model = build_model("conv", image_size=image_size, width=width)
        forward, fwdbwd = keras_steps(model, "conv", xla)
        contenders[f"keras {'xla' if xla else 'noxla'}"] = {
            "impl": "keras", "shapes": "project", "xla": xla, "gflop": forward_flops(model) * batch_size / 1e9,
            "forward": lambda f=forward: f(x, y), "fwdbwd": lambda f=fwdbwd: f(x, y)}
    references = [Reference(s, batch_size, image_size, width) for s in shapes]
    for ref in references:
        contenders[f"tf1 {ref.shapes}"] = {"impl": "tf1", "shapes": ref.shapes, "xla": "", "gflop": ref.gflop,
                                          "forward": lambda r=ref: r.session.run(r.forward),
                                          "fwdbwd": lambda r=ref: r.session.run(r.backward)}
    times = {name: {"forward": [], "fwdbwd": []} for name in contenders}
    try:
        for kind in ("forward", "fwdbwd"):
            for i in range(burn_in + steps):
                for name, contender in contenders.items():
                    start = clock()
                    contender[kind]()
                    if i >= burn_in:
                        times[name][kind].append(clock() - start)
    finally:
        for ref in references:
            ref.close()
    rows = []
    for name, c in contenders.items():
        row = {"section": "tf1", "impl": c["impl"], "shapes": c["shapes"], "xla": c["xla"], "batch_size": batch_size,
               "image_size": image_size, "steps": steps, "gflop": c["gflop"]}
        for kind in ("forward", "fwdbwd"):
            mean, sd = mean_sd(times[name][kind])
            row.update({f"{kind}_ms": 1e3 * mean, f"{kind}_sd_ms": 1e3 * sd,
                        f"{kind}_median_ms": 1e3 * statistics.median(times[name][kind])})
        rows.append(row)
    return rows, speedups(rows)


def speedups(rows):
    """TF1 median time / Keras median time for each pair (> 1: Keras faster), and per FLOP."""
    out = []
    for ref in (r for r in rows if r["impl"] == "tf1"):
        for row in (r for r in rows if r["impl"] == "keras"):
            fwdbwd = ref["fwdbwd_median_ms"] / row["fwdbwd_median_ms"]
            out.append({"section": "tf1_speedup", "shapes": ref["shapes"], "xla": row["xla"],
                        "forward_speedup": ref["forward_median_ms"] / row["forward_median_ms"],
                        "fwdbwd_speedup": fwdbwd, "fwdbwd_speedup_per_flop": fwdbwd * row["gflop"] / ref["gflop"]})
    return out


LAYER = re.compile(r"\b(conv\d|bn\d|act\d|lrn\d|pool\d|fc\d|dropout\d|preprocess|predictions|flatten)")


def profile(batch_size, image_size, width, steps=3, top=12):
    """Self-time per op type and per layer of the full network's forward+backward (XLA off: with XLA the
    step is one fused op). The trace is the one `keras.callbacks.TensorBoard(profile_batch=...)` writes,
    summarized with the profiler's own converter (a private TensorFlow module: this script's only)."""
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as converter

    model = build_model("full", image_size=image_size, width=width)
    x = tf.random.uniform((batch_size, image_size, image_size, 3), 0, 255)
    _, fwdbwd = keras_steps(model, "full", False)
    y = tf.zeros((batch_size,), tf.int32)
    for _ in range(2):
        fwdbwd(x, y)
    logdir = tempfile.mkdtemp(prefix="alexnet-keras-profile-")
    tf.profiler.experimental.start(logdir)
    try:
        for _ in range(steps):
            fwdbwd(x, y)
    finally:
        tf.profiler.experimental.stop()
    paths = [str(p) for p in Path(logdir).rglob("*.xplane.pb")]
    data, ok = converter.xspace_to_tools_data(paths, "framework_op_stats", {"use_saved_result": False})
    if not ok:
        raise RuntimeError("TensorFlow's profiler could not convert its trace")
    table = json.loads(data)[0]
    columns = [c["id"] for c in table["cols"]]
    totals = {"op_type": {}, "layer": {}}
    for row in table["rows"]:
        values = dict(zip(columns, (c.get("v") for c in row["c"])))
        if values["type"] != "IDLE":
            match = LAYER.search(values["operation"])
            for kind, name in (("op_type", values["type"]), ("layer", match.group(1) if match else "other")):
                totals[kind][name] = totals[kind].get(name, 0.0) + float(values["total_self_time"])
    total = sum(totals["op_type"].values()) or 1.0
    print(f"trace in {logdir}")
    return [{"section": f"profile_{kind}", kind: name, "self_ms_per_step": us / 1e3 / steps, "share": us / total}
            for kind, values in totals.items() for name, us in sorted(values.items(), key=lambda kv: -kv[1])[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--burn-in", type=int, default=10)
    parser.add_argument("--xla", default="true", help="comma-separated true/false")
    parser.add_argument("--shapes", default="seeds,project")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path, help="CSV of every row")
    args = parser.parse_args()
    xla = [v.strip().lower() == "true" for v in args.xla.split(",")]
    rows, ratios = compare(args.batch_size, args.image_size, args.width, args.steps, args.burn_in, xla,
                           args.shapes.split(","))
    print(markdown_table(rows, ("impl", "shapes", "xla", "gflop", "forward_median_ms", "fwdbwd_median_ms")))
    print(markdown_table(ratios, ("shapes", "xla", "forward_speedup", "fwdbwd_speedup", "fwdbwd_speedup_per_flop")))
    profiled = profile(args.batch_size, args.image_size, args.width) if args.profile else []
    for kind in ("op_type", "layer") if profiled else ():
        print(markdown_table([r for r in profiled if kind in r], (kind, "self_ms_per_step", "share")))
    if args.out:
        args.out.write_text(csv_text([{"machine": machine(), **row} for row in rows + ratios + profiled]))


if __name__ == "__main__":
    main()
