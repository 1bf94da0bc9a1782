"""The seeds' TF1-style graph benchmark of AlexNet's conv stack, kept as the speed reference.

A port of `tutorials/image/alexnet/alexnet_benchmark.py` from the tensorflow/models repository
(Apache-2.0, "Timing benchmark for AlexNet inference") to TensorFlow 2's `tf.compat.v1`: the same
graph (conv1 -> LRN -> pool1 -> conv2 -> LRN -> pool2 -> conv3 -> conv4 -> conv5 -> pool5, weights
truncated_normal(0.1), images a random Variable), the same session loop (10 burn-in steps, then
`num_batches` timed `session.run` calls; mean and sd of the seconds per batch as
sqrt(E[t^2] - E[t]^2)), first of `pool5` (forward), then of `tf.gradients(l2_loss(pool5), params)`
(forward-backward). Run in graph mode inside `tf.Graph().as_default()`, as in TF1.

--shapes seeds    the file's own layers: 64, 192, 384, 256, 256 filters, conv1 'SAME' (224 -> 56),
                  LRN depth_radius=5 (an 11-channel window).
--shapes project  the arithmetic of this project's conv stack (`alexnet-keras benchmark`, part conv):
                  a /255 rescale, 96, 256, 384, 384, 256 filters (times --width, rounded as
                  model.py does), conv1 'VALID' (224 -> 54), LRN depth_radius=2 (the paper's n=5),
                  bias 2, alpha 1e-4, beta 0.75. Same FLOPs, so times compare directly.

    python benchmarks/tf1_reference.py --batch_size 32 --num_batches 100            # the seeds
    python benchmarks/tf1_reference.py --shapes seeds,project --batch_size 32 --json  # + RESULT lines

benchmarks/tf1_comparison.py imports this file and times both shape sets step by step in turn with
the Keras conv stack (`Reference` below), so that all of them see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from datetime import datetime

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

v1 = tf.compat.v1
FLAGS = None

SHAPES = {
    # filters of conv1..conv5, conv1 padding, LRN depth_radius, rescale the input by 1/255
    "seeds": {"filters": (64, 192, 384, 256, 256), "conv1_padding": "SAME", "depth_radius": 5,
              "rescale": False},
    "project": {"filters": (96, 256, 384, 384, 256), "conv1_padding": "VALID", "depth_radius": 2,
                "rescale": True},
}
KERNELS = (11, 5, 3, 3, 3)


def _scaled(units, width):
    # model.py's rounding: half up, at least 1.
    return max(1, int(math.floor(units * width + 0.5)))


def print_activations(t):
    if FLAGS is not None and not FLAGS.json:   # silent when imported (tf1_comparison.py)
        print(t.op.name, " ", t.get_shape().as_list())


def inference(images, shapes, width=1.0):
    """The conv stack; returns pool5, the list of weights and biases, and forward FLOPs per image."""
    spec = SHAPES[shapes]
    filters = [_scaled(f, width) if shapes == "project" else f for f in spec["filters"]]
    parameters = []
    flops = 0
    x = images * (1.0 / 255.0) if spec["rescale"] else images
    channels = 3
    for i, (out, k) in enumerate(zip(filters, KERNELS), start=1):
        with tf.name_scope(f"conv{i}") as scope:
            kernel = v1.Variable(v1.truncated_normal([k, k, channels, out], dtype=tf.float32, stddev=1e-1),
                                 name="weights")
            stride = 4 if i == 1 else 1
            padding = spec["conv1_padding"] if i == 1 else "SAME"
            conv = tf.nn.conv2d(x, kernel, [1, stride, stride, 1], padding=padding)
            biases = v1.Variable(tf.constant(0.0, shape=[out], dtype=tf.float32), trainable=True,
                                 name="biases")
            x = tf.nn.relu(tf.nn.bias_add(conv, biases), name=scope)
            parameters += [kernel, biases]
            h, w = x.get_shape().as_list()[1:3]
            flops += 2 * h * w * out * k * k * channels
            print_activations(x)
        channels = out
        if i in (1, 2):
            with tf.name_scope(f"lrn{i}"):
                x = tf.nn.local_response_normalization(x, alpha=1e-4, beta=0.75,
                                                       depth_radius=spec["depth_radius"], bias=2.0)
        if i in (1, 2, 5):
            x = tf.nn.max_pool2d(x, ksize=[1, 3, 3, 1], strides=[1, 2, 2, 1], padding="VALID",
                                 name=f"pool{i}")
            print_activations(x)
    return x, parameters, flops


def time_tensorflow_run(session, target, info_string):
    """Run `target` burn_in + num_batches times; (mean, sd) seconds per batch of the timed runs."""
    total_duration = 0.0
    total_duration_squared = 0.0
    for i in range(FLAGS.num_batches + FLAGS.burn_in):
        start_time = time.time()
        _ = session.run(target)
        duration = time.time() - start_time
        if i >= FLAGS.burn_in:
            if not i % 10 and not FLAGS.json:
                print("%s: step %d, duration = %.3f" % (datetime.now(), i - FLAGS.burn_in, duration))
            total_duration += duration
            total_duration_squared += duration * duration
    mn = total_duration / FLAGS.num_batches
    vr = total_duration_squared / FLAGS.num_batches - mn * mn
    sd = math.sqrt(max(vr, 0.0))
    print("%s: %s across %d steps, %.3f +/- %.3f sec / batch"
          % (datetime.now(), info_string, FLAGS.num_batches, mn, sd))
    return mn, sd


class Reference:
    """The graph and an open session: `session.run(forward)` / `session.run(backward)` is one step."""

    def __init__(self, shapes="seeds", batch_size=32, image_size=224, width=1.0):
        self.graph = tf.Graph()
        with self.graph.as_default():
            images = v1.Variable(v1.random_normal([batch_size, image_size, image_size, 3],
                                                  dtype=tf.float32, stddev=1e-1))
            if shapes == "project":
                images = images * 255.0   # pixel-valued input, as the Keras model's /255 expects
            self.forward, parameters, flops = inference(images, shapes, width)
            # Add a simple objective so we can calculate the backward pass.
            objective = tf.nn.l2_loss(self.forward)
            # Compute the gradient with respect to all the parameters.
            self.backward = tf.gradients(objective, parameters)
            init = v1.global_variables_initializer()
            config = v1.ConfigProto()
            config.gpu_options.allocator_type = "BFC"
            self.session = v1.Session(graph=self.graph, config=config)
            self.session.run(init)
        self.shapes = shapes
        self.gflop = flops * batch_size / 1e9   # forward, per batch

    def close(self):
        self.session.close()


def run_benchmark(shapes):
    ref = Reference(shapes, FLAGS.batch_size, FLAGS.image_size, FLAGS.width)
    try:
        forward = time_tensorflow_run(ref.session, ref.forward, "Forward")
        backward = time_tensorflow_run(ref.session, ref.backward, "Forward-backward")
    finally:
        ref.close()
    return {"forward": forward, "forward_backward": backward, "shapes": shapes,
            "batch_size": FLAGS.batch_size, "image_size": FLAGS.image_size,
            "gflop": ref.gflop, "tensorflow": tf.__version__}


def main(argv=None):
    global FLAGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=32, help="Batch size (the file used 128).")
    parser.add_argument("--num_batches", type=int, default=100, help="Number of timed batches.")
    parser.add_argument("--burn_in", type=int, default=10, help="Untimed batches first.")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--shapes", default="seeds", help="seeds, project, or both comma-separated "
                        "(one graph and session after the other, in one process)")
    parser.add_argument("--width", type=float, default=1.0, help="filter multiplier (--shapes project)")
    parser.add_argument("--json", action="store_true", help="print a 'RESULT {json}' line at the end")
    FLAGS = parser.parse_args(argv)
    results = []
    for shapes in FLAGS.shapes.split(","):
        if shapes not in SHAPES:
            parser.error(f"--shapes: {shapes!r} is not one of {', '.join(SHAPES)}")
        result = run_benchmark(shapes)
        if FLAGS.json:
            print("RESULT " + json.dumps(result))
        results.append(result)
    return results


if __name__ == "__main__":
    main()
