"""`alexnet-keras benchmark`: how fast this project's AlexNet runs, measured the way the seeds did.

Sections of one benchmark run (each row logged to one MLflow run, plus CSV/Markdown artifacts):

* timing (the seeds' `alexnet_benchmark.py`): a batch of `batch_size` random 224x224 images that
  stays on the device; `burn_in` untimed steps, then `steps` timed ones; seconds per batch, mean and
  sd, for the forward pass and for forward+backward, of the conv stack alone (conv1..pool5, as in the
  seeds) and of the full network (to the softmax). Every precision x XLA setting asked for.
* throughput: images/s of training the `paper` (227 px) and `cifar` (32 px) variants at each batch
  size: the training path itself (train.prepare + train.fit, i.e. train.py's optimizer, compile and
  fit, on the project's own tf.data pipeline: data.load_data on synthetic images: shuffle, gather,
  random crop + flip, prefetch; the benchmark is just a config of it) against a hand-written train
  step on one batch that stays on the device, and the pipeline alone (how many images/s it can deliver).
* tf1 (optional): the seeds' TF1 graph code (benchmarks/tf1_reference.py, graph mode + session.run),
  with the seeds' own layer shapes and with this model's, against the Keras conv stack (float32,
  each XLA setting), all timed step by step in turn in this process so that they share the machine's
  load; the speedup of Keras over TF1 from the medians (> 1: Keras is faster).
* profile (optional, TensorFlow backend): TensorFlow's profiler around a few forward+backward steps,
  self-time per op type and per layer (what limits the number).

How each number is taken (for asynchronous devices the clock stops only once the result exists):
  forward          a compiled inference call (`jax.jit` of `model.stateless_call` on JAX,
                   `tf.function` on TensorFlow, eager on PyTorch) then block on the output
                   (`jax.block_until_ready`; on TensorFlow fetch one element of it, which waits for
                   the whole function; `torch.cuda.synchronize`).
  forward+backward the gradients w.r.t. every weight of a loss, as in the seeds (`tf.gradients` of
                   `l2_loss(pool5)` for the conv stack; mean cross-entropy + weight decay for the full
                   net), no optimizer update: `jax.grad` of a stateless function, `tf.GradientTape` in
                   a `tf.function`, `torch.autograd.grad`; then block on all gradients.
  train step       (throughput) gradients + SGD-momentum update, stateless on JAX
                   (`stateless_call` + `optimizer.stateless_apply`, jitted, buffers donated);
                   `tf.function` + `optimizer.apply` on TensorFlow (train.py's optimizer). Timed over
                   all steps, one block at the end.
  fit              one train.fit epoch of burn_in + steps steps; the clock starts when step burn_in begins and
                   stops at the end of the epoch after the epoch's loss has been read (which waits
                   for the last step).
XLA on/off: TensorFlow `tf.function(jit_compile=...)` and `compile(jit_compile=...)`; on JAX "off" means
no `jax.jit` (op-by-op dispatch), so JAX numbers are meant with XLA on. PyTorch: XLA must be off
(torch.compile is benchmarks/torchvision_reference.py's business).
Channels: the model is channels_last only (see `BenchmarkOptions`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..config import NATIVE_IMAGE_SIZE, PRECISIONS, VARIANTS, ConfigError, parse_value
from ..tables import csv_text, markdown_table, value_text

PARTS = ("conv", "full")
CHANNELS = ("last", "first")
ROOT = Path(__file__).resolve().parents[2]
TF1_SCRIPT = ROOT / "benchmarks" / "tf1_reference.py"
DEFAULT_EXPERIMENT = "alexnet-keras-benchmark"
# CPU-sized settings (`--quick`): short runs that still exercise every section.
QUICK = {"steps": 10, "burn_in": 2, "throughput_batch_sizes": (32,), "throughput_steps": 5,
         "throughput_burn_in": 2}
# Training images the throughput pipeline cycles through, in batches (shuffled, augmented each pass).
PIPELINE_BATCHES = 2
CHANNELS_FIRST_MESSAGE = (
    "channels_first is not supported: the model (alexnet_keras/model.py) takes channels_last images "
    "(S, S, 3) and its LRN layer normalizes over the last axis. On GPU the compiler picks the "
    "physical layout of each convolution itself (XLA's layout assignment on JAX, grappler's layout "
    "optimizer on TensorFlow) and inserts the transposes it needs, so the logical format is not "
    "what the kernels see. Use --channels last.")


@dataclasses.dataclass(frozen=True)
class BenchmarkOptions:
    """What to measure. Defaults are the issue's full settings; `quick()` gives CPU-sized ones."""

    batch_size: int = 32                  # timing section (the seeds used 128 in the file, 32 in the issue)
    image_size: int = 224                 # timing section, `paper` variant at this side
    steps: int = 100
    burn_in: int = 10
    parts: tuple[str, ...] = PARTS        # "conv": conv1..pool5; "full": the whole network
    precisions: tuple[str, ...] = ("float32",)
    xla: tuple[bool, ...] = (True,)
    channels: str = "last"
    width: float = 1.0
    num_classes: int = 1000               # timing section (ImageNet); throughput uses 10 classes
    throughput_variants: tuple[str, ...] = VARIANTS
    throughput_batch_sizes: tuple[int, ...] = (32, 128, 256, 512)
    throughput_steps: int = 100
    throughput_burn_in: int = 10
    tf1_reference: bool = False
    profile: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "image_size", "steps", "throughput_steps", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"benchmark {name} must be a positive integer; got {value!r}.")
        for name in ("burn_in", "throughput_burn_in"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"benchmark {name} must be an integer >= 0; got {value!r}.")
        if self.channels not in CHANNELS:
            raise ConfigError(f"benchmark channels must be one of 'last', 'first'; got {self.channels!r}.")
        if self.channels == "first":
            raise ConfigError(CHANNELS_FIRST_MESSAGE)
        _subset("parts", self.parts, PARTS, allow_empty=True)
        _subset("precisions", self.precisions, PRECISIONS)
        _subset("throughput_variants", self.throughput_variants, VARIANTS, allow_empty=True)
        if not self.xla or any(not isinstance(v, bool) for v in self.xla):
            raise ConfigError(f"benchmark xla must be a non-empty list of true/false; got {self.xla!r}.")
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.throughput_batch_sizes):
            raise ConfigError(f"benchmark throughput_batch_sizes must be positive integers; "
                              f"got {self.throughput_batch_sizes!r}.")
        if not 0 < self.width <= 16:
            raise ConfigError(f"benchmark width must be in (0, 16]; got {self.width!r}.")
        from ..config import ModelConfig

        ModelConfig(variant="paper", image_size=self.image_size, width=self.width)  # size check

    @classmethod
    def quick(cls, **overrides: Any) -> "BenchmarkOptions":
        return cls(**{**QUICK, **overrides})

    def params(self) -> dict[str, str]:
        """Flat string params for MLflow."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = ",".join(value_text(v) for v in value)
            out[f.name] = value_text(value)
        return out


def _subset(name: str, values: tuple, allowed: tuple, *, allow_empty: bool = False) -> None:
    bad = [v for v in values if v not in allowed]
    if bad or (not values and not allow_empty):
        raise ConfigError(f"benchmark {name} must be a comma-separated list of {', '.join(allowed)}; "
                          f"got {','.join(map(str, values)) or 'nothing'}.")


# ---------------------------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------------------------

def mean_sd(durations: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation of `durations`, as the seeds report them: the population sd,
    sqrt(E[t^2] - E[t]^2) (statistics.pstdev computes it without the cancellation). StatisticsError (a
    ValueError) for no durations."""
    values = [float(d) for d in durations]
    return statistics.fmean(values), statistics.pstdev(values)


def images_per_second(batch_size: int, seconds_per_batch: float) -> float:
    return batch_size / seconds_per_batch if seconds_per_batch > 0 else float("inf")


def time_steps(step: Callable[[], Any], steps: int, burn_in: int,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Run `step` (which must block until its result exists) burn_in + steps times; the seconds of
    each of the last `steps` calls."""
    durations = []
    for i in range(burn_in + steps):
        start = clock()
        step()
        duration = clock() - start
        if i >= burn_in:
            durations.append(duration)
    return durations


def time_loop(step: Callable[[], Any], block: Callable[[Any], Any], steps: int, burn_in: int,
              clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per step of `steps` back-to-back calls of `step`, blocking only on the last result
    (the device runs ahead as in training); `burn_in` calls first, blocked, untimed."""
    result = None
    for _ in range(burn_in):
        result = step()
    if result is not None:
        block(result)
    start = clock()
    for _ in range(steps):
        result = step()
    block(result)
    return (clock() - start) / steps


# ---------------------------------------------------------------------------------------------
# Models and compiled steps, per backend
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def dtype_policy(precision: str):
    """Build layers under `precision`, then restore the previous global policy."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def build_model(part: str, *, variant: str = "paper", image_size: int | None = 224, width: float = 1.0,
                num_classes: int = 1000, precision: str = "float32"):
    """The project's AlexNet (model.build_alexnet, paper defaults: LRN, overlapping pools, dropout),
    or for part "conv" its conv stack alone: input -> preprocess -> conv1 .. pool5."""
    import keras

    from ..config import ModelConfig
    from ..model.alexnet import build_alexnet

    # The seeds' objective for the conv stack is l2_loss(pool5) alone: no weight decay there.
    config = ModelConfig(variant=variant, image_size=image_size, width=width,
                         weight_decay=0.0 if part == "conv" else ModelConfig.weight_decay)
    with dtype_policy(precision):
        model = build_alexnet(config, num_classes=num_classes)
        if part == "conv":
            model = keras.Model(model.inputs, model.get_layer("pool5").output, name="alexnet_conv")
    return model


def forward_flops(model) -> int:
    """Multiply-add FLOPs (2 per MAC) of one image's forward pass through the conv and dense layers."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, channels = layer.output.shape
            kh, kw, cin_per_group, _ = layer.kernel.shape
            total += 2 * height * width * channels * kh * kw * cin_per_group
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return int(total)


def _loss(part: str, outputs, labels, extra_losses=()):
    from keras import ops

    if part == "conv":
        # The seeds' objective: tf.nn.l2_loss(pool5) = sum(pool5 ** 2) / 2.
        return 0.5 * ops.sum(ops.square(ops.cast(outputs, "float32")))
    loss = ops.mean(ops.sparse_categorical_crossentropy(labels, outputs))
    for extra in extra_losses:
        loss = loss + ops.cast(extra, "float32")
    return loss


def _backend() -> str:
    import keras

    return keras.backend.backend()


def block(result) -> None:
    """Wait until `result` (a tensor or a nest of them) has been computed on the device."""
    backend = _backend()
    if backend == "jax":
        import jax

        jax.block_until_ready(result)
    elif backend == "tensorflow":
        import tensorflow as tf

        last = tf.nest.flatten(result)[-1]
        # Fetch one element: a host copy waits for every kernel queued before it (all of the
        # compiled function), without copying whole tensors to the host.
        tf.reshape(last, [-1])[:1].numpy()
    else:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def _check_xla(xla: bool) -> None:
    if xla and _backend() == "torch":
        raise ConfigError("benchmark xla=true is not available on the torch backend (torch.compile is "
                          "measured by benchmarks/torchvision_reference.py); pass --xla false.")


def make_forward(model, xla: bool) -> Callable[[Any], Any]:
    """fn(x) -> outputs: one compiled inference pass (not blocked)."""
    _check_xla(xla)
    backend = _backend()
    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def forward(tv, ntv, x):
            return model.stateless_call(tv, ntv, x, training=False)[0]

        forward = jax.jit(forward) if xla else forward
        return lambda x: forward(trainable, non_trainable, x)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda x: model(x, training=False), jit_compile=xla)
    import torch

    def forward_torch(x):
        with torch.no_grad():
            return model(x, training=False)

    return forward_torch


def make_gradients(model, part: str, xla: bool) -> Callable[[Any, Any], Any]:
    """fn(x, y) -> gradients of the part's loss w.r.t. every trainable weight (not blocked)."""
    _check_xla(xla)
    backend = _backend()
    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss_fn(tv, ntv, x, y):
            outputs, _, losses = model.stateless_call(tv, ntv, x, training=True, return_losses=True)
            return _loss(part, outputs, y, losses)

        grad_fn = jax.grad(loss_fn)
        grad_fn = jax.jit(grad_fn) if xla else grad_fn
        return lambda x, y: grad_fn(trainable, non_trainable, x, y)
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=xla)
        def gradients(x, y):
            with tf.GradientTape() as tape:
                outputs = model(x, training=True)
                loss = _loss(part, outputs, y, model.losses)
            return tape.gradient(loss, model.trainable_variables)

        return gradients
    import torch

    params = [v.value for v in model.trainable_variables]

    def gradients_torch(x, y):
        outputs = model(x, training=True)
        return torch.autograd.grad(_loss(part, outputs, y, model.losses), params)

    return gradients_torch


def make_optimizer(precision: str):
    """train.py's optimizer (SGD, momentum 0.9, the default learning rate, constant), loss-scaled under
    mixed_float16 as `compile` does it for `fit`."""
    import keras

    from ..config import TrainConfig
    from .train import build_optimizer

    optimizer = build_optimizer(TrainConfig(precision=precision, schedule="constant"), steps_per_epoch=1)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def make_train_step(model, xla: bool, precision: str) -> Callable[[Any, Any], Any]:
    """fn(x, y) -> loss: one full training step (gradients + SGD-momentum update), not blocked.

    On JAX the hand-written stateless step: `stateless_call` + `jax.value_and_grad` +
    `optimizer.stateless_apply`, jitted with the weights and optimizer state donated; the state
    lives in this closure (the model's own variables are left as they were)."""
    _check_xla(xla)
    optimizer = make_optimizer(precision)
    optimizer.build(model.trainable_variables)
    backend = _backend()
    if backend == "jax":
        import jax

        state = [[v.value for v in model.trainable_variables],
                 [v.value for v in model.non_trainable_variables],
                 [v.value for v in optimizer.variables]]

        def loss_fn(tv, ntv, x, y):
            outputs, ntv, losses = model.stateless_call(tv, ntv, x, training=True, return_losses=True)
            loss = _loss("full", outputs, y, losses)
            return optimizer.scale_loss(loss), (loss, ntv)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def step(tv, ntv, ov, x, y):
            (_, (loss, ntv)), grads = grad_fn(tv, ntv, x, y)
            tv, ov = optimizer.stateless_apply(ov, grads, tv)
            return loss, tv, ntv, ov

        if xla:
            # Fresh copies, so that donating them does not invalidate the model's own arrays.
            state = jax.tree_util.tree_map(lambda a: a.copy(), state)
            step = jax.jit(step, donate_argnums=(0, 1, 2))

        def run(x, y):
            loss, *state[:] = step(*state, x, y)
            return loss

        return run
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=xla)
        def train_step(x, y):
            with tf.GradientTape() as tape:
                outputs = model(x, training=True)
                loss = _loss("full", outputs, y, model.losses)
                scaled = optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
            return loss

        return train_step
    import torch

    def train_step_torch(x, y):
        outputs = model(x, training=True)
        loss = _loss("full", outputs, y, model.losses)
        grads = torch.autograd.grad(optimizer.scale_loss(loss), [v.value for v in model.trainable_variables])
        optimizer.apply(list(grads), model.trainable_variables)
        return loss

    return train_step_torch


def random_batch(batch_size: int, image_size: int, num_classes: int, seed: int = 0):
    """A batch of random 0..255 images and labels, on the backend's default device."""
    import numpy as np
    from keras import ops

    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, size=(batch_size, image_size, image_size, 3)).astype("float32")
    labels = (np.arange(batch_size) % num_classes).astype("int32")
    return ops.convert_to_tensor(images), ops.convert_to_tensor(labels)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

def timing_row(part: str, precision: str, xla: bool, options: BenchmarkOptions) -> dict[str, Any]:
    """The seeds' measurement for one model part and setting: forward and forward+backward."""
    import keras

    keras.utils.set_random_seed(options.seed)
    model = build_model(part, image_size=options.image_size, width=options.width,
                        num_classes=options.num_classes, precision=precision)
    x, y = random_batch(options.batch_size, options.image_size, options.num_classes, options.seed)
    forward = make_forward(model, xla)
    gradients = make_gradients(model, part, xla)
    fwd = time_steps(lambda: block(forward(x)), options.steps, options.burn_in)
    bwd = time_steps(lambda: block(gradients(x, y)), options.steps, options.burn_in)
    (fwd_mean, fwd_sd), (bwd_mean, bwd_sd) = mean_sd(fwd), mean_sd(bwd)
    flops = forward_flops(model) * options.batch_size
    return {
        "section": "timing", "part": part, "precision": precision, "xla": xla,
        "batch_size": options.batch_size, "image_size": options.image_size, "steps": options.steps,
        "forward_ms": 1e3 * fwd_mean, "forward_sd_ms": 1e3 * fwd_sd,
        "fwdbwd_ms": 1e3 * bwd_mean, "fwdbwd_sd_ms": 1e3 * bwd_sd,
        "forward_img_s": images_per_second(options.batch_size, fwd_mean),
        "fwdbwd_img_s": images_per_second(options.batch_size, bwd_mean),
        # Backward of a conv/dense layer costs about twice its forward, hence 3x for forward+backward.
        "gflop": flops / 1e9,   # forward, per batch
        "forward_gflop_s": flops / fwd_mean / 1e9, "fwdbwd_gflop_s": 3 * flops / bwd_mean / 1e9,
    }


def fit_clock(burn_in: int):
    """A Keras callback timing `fit` from the start of step `burn_in` (0-based) to the end of the
    epoch; `.start` / `.stop` are perf_counter readings."""
    import keras

    class FitClock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.start = self.stop = None

        def on_train_batch_begin(self, batch, logs=None):
            if batch == burn_in:
                self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            float(logs["loss"])   # the last step's loss: waits for every queued step
            self.stop = time.perf_counter()

    return FitClock()


def throughput_row(variant: str, batch_size: int, precision: str, xla: bool,
                   options: BenchmarkOptions) -> dict[str, Any]:
    """Training images/s: train.fit on the project's tf.data pipeline (the training path itself: the
    benchmark is a config of it), the pipeline alone, and a hand-written train step on one
    device-resident batch."""
    import keras
    import numpy as np

    from ..config import Config, DataConfig, ModelConfig, TrainConfig
    from .train import fit, prepare

    _check_xla(xla)
    image_size = NATIVE_IMAGE_SIZE[variant]
    steps, burn_in = options.throughput_steps, options.throughput_burn_in
    n_train = PIPELINE_BATCHES * batch_size
    # Enough synthetic images for n_train after the validation split; train_limit keeps exactly
    # n_train, so every batch of the pipeline is a full one.
    config = Config(
        model=ModelConfig(variant=variant, width=options.width),
        data=DataConfig(dataset="synthetic", synthetic_samples=math.ceil(n_train / 0.85) + 16,
                        synthetic_classes=10, train_limit=n_train, augment=True),
        train=TrainConfig(epochs=1, batch_size=batch_size, precision=precision, schedule="constant",
                          jit_compile="true" if xla else "false", seed=options.seed))
    with warnings.catch_warnings(), dtype_policy(precision):   # "not stratified": irrelevant for timing
        warnings.simplefilter("ignore", UserWarning)
        data, model = prepare(config)
    pipeline = data.train.repeat()

    # The pipeline alone.
    iterator = iter(pipeline)
    for _ in range(max(1, burn_in)):
        next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    pipeline_s = (time.perf_counter() - start) / steps

    # train.fit: one epoch of burn_in + steps steps over the repeated pipeline, no validation, nothing
    # logged (the benchmark's own run gets the numbers).
    clock = fit_clock(burn_in)
    fit(model, dataclasses.replace(data, train=pipeline, val=None), config, callbacks=[clock],
        steps_per_epoch=burn_in + steps, verbose=0, track=False)
    fit_s = (clock.stop - clock.start) / steps

    images, labels = next(iter(data.train))
    x = keras.ops.convert_to_tensor(np.asarray(images))
    y = keras.ops.convert_to_tensor(np.asarray(labels))
    train_step = make_train_step(model, xla, precision)
    step_s = time_loop(lambda: train_step(x, y), block, steps, max(1, burn_in))

    return {
        "section": "throughput", "variant": variant, "image_size": image_size, "batch_size": batch_size,
        "precision": precision, "xla": xla, "steps": steps,
        "pipeline_img_s": images_per_second(batch_size, pipeline_s),
        "fit_img_s": images_per_second(batch_size, fit_s),
        "step_img_s": images_per_second(batch_size, step_s),
        "fit_vs_step": step_s / fit_s,
    }


def _tf1_module():
    """benchmarks/tf1_reference.py, imported from the checkout."""
    import importlib.util

    if not TF1_SCRIPT.is_file():
        raise ConfigError(f"--tf1-reference needs {TF1_SCRIPT} (run from a checkout of the project).")
    spec = importlib.util.spec_from_file_location("alexnet_keras_tf1_reference", TF1_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tf1_comparison(options: BenchmarkOptions, shapes: Sequence[str] = ("seeds", "project"),
                   clock: Callable[[], float] = time.perf_counter) -> list[dict[str, Any]]:
    """The seeds' TF1 graph (benchmarks/tf1_reference.py: graph mode, `session.run`) against the
    Keras conv stack in float32 at the timing settings, measured step by step in turn.

    Round i times one step of every contender (Keras with each XLA setting, TF1 with each layer-shape
    set) before round i + 1 starts, so a load change on a shared machine hits all of them alike; the
    speedups use the medians. One row per contender (section "tf1")."""
    tf1 = _tf1_module()
    import keras

    contenders: dict[str, dict[str, Any]] = {}
    x, y = random_batch(options.batch_size, options.image_size, options.num_classes, options.seed)
    for xla in options.xla:
        keras.utils.set_random_seed(options.seed)
        model = build_model("conv", image_size=options.image_size, width=options.width)
        forward, gradients = make_forward(model, xla), make_gradients(model, "conv", xla)
        contenders[f"keras {'xla' if xla else 'noxla'}"] = {
            "impl": "keras", "shapes": "project", "xla": xla,
            "gflop": forward_flops(model) * options.batch_size / 1e9,
            "forward": lambda f=forward: block(f(x)), "fwdbwd": lambda g=gradients: block(g(x, y))}
    references = [tf1.Reference(s, options.batch_size, options.image_size, options.width) for s in shapes]
    for ref in references:
        contenders[f"tf1 {ref.shapes}"] = {
            "impl": "tf1", "shapes": ref.shapes, "xla": "", "gflop": ref.gflop,
            "forward": lambda r=ref: r.session.run(r.forward),
            "fwdbwd": lambda r=ref: r.session.run(r.backward)}
    times: dict[str, dict[str, list[float]]] = {name: {"forward": [], "fwdbwd": []} for name in contenders}
    try:
        for kind in ("forward", "fwdbwd"):
            for i in range(options.burn_in + options.steps):
                for name, contender in contenders.items():
                    start = clock()
                    contender[kind]()
                    if i >= options.burn_in:
                        times[name][kind].append(clock() - start)
    finally:
        for ref in references:
            ref.close()
    rows = []
    for name, contender in contenders.items():
        row = {"section": "tf1", "impl": contender["impl"], "shapes": contender["shapes"],
               "xla": contender["xla"], "batch_size": options.batch_size, "image_size": options.image_size,
               "steps": options.steps, "gflop": contender["gflop"]}
        for kind in ("forward", "fwdbwd"):
            mean, sd = mean_sd(times[name][kind])
            row.update({f"{kind}_ms": 1e3 * mean, f"{kind}_sd_ms": 1e3 * sd,
                        f"{kind}_median_ms": 1e3 * statistics.median(times[name][kind])})
        rows.append(row)
    return rows


def tf1_speedups(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Speedup of each Keras contender over each TF1 one: TF1 median time / Keras median time
    (> 1: Keras is faster); per FLOP too, because the seeds' layers (64/192/384/256/256 filters)
    do less work than this model's (with shapes "project" both do the same)."""
    rows = list(rows)
    out = []
    for ref in (r for r in rows if r["impl"] == "tf1"):
        for row in (r for r in rows if r["impl"] == "keras"):
            flop_ratio = row["gflop"] / ref["gflop"]
            fwdbwd = ref["fwdbwd_median_ms"] / row["fwdbwd_median_ms"]
            out.append({"section": "tf1_speedup", "shapes": ref["shapes"], "xla": row["xla"],
                        "forward_speedup": ref["forward_median_ms"] / row["forward_median_ms"],
                        "fwdbwd_speedup": fwdbwd, "fwdbwd_speedup_per_flop": fwdbwd * flop_ratio})
    return out


_LAYER = re.compile(r"\b(conv\d|bn\d|act\d|lrn\d|pool\d|fc\d|dropout\d|preprocess|predictions|flatten)")


def profile_ops(options: BenchmarkOptions, part: str = "full", steps: int = 3, top: int = 12) -> dict[str, Any]:
    """TensorFlow's profiler around `steps` forward+backward steps: self-time by op type and by layer.

    The same trace `keras.callbacks.TensorBoard(profile_batch=...)` writes; it is summarized here
    with the profiler's own converter (framework_op_stats), so TensorBoard's profile plugin is not
    needed. Taken without XLA (TensorFlow's graph kernels, oneDNN on CPU)."""
    if _backend() != "tensorflow":
        raise ConfigError("--profile needs KERAS_BACKEND=tensorflow (it reads TensorFlow's profiler trace).")
    import tensorflow as tf
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as converter

    xla = False   # with XLA the whole step is one fused op: nothing to break down
    model = build_model(part, image_size=options.image_size, width=options.width,
                        num_classes=options.num_classes, precision=options.precisions[0])
    x, y = random_batch(options.batch_size, options.image_size, options.num_classes, options.seed)
    gradients = make_gradients(model, part, xla)
    for _ in range(2):
        block(gradients(x, y))
    logdir = tempfile.mkdtemp(prefix="alexnet-keras-profile-")
    tf.profiler.experimental.start(logdir)
    try:
        for _ in range(steps):
            block(gradients(x, y))
    finally:
        tf.profiler.experimental.stop()
    paths = [str(p) for p in Path(logdir).rglob("*.xplane.pb")]
    data, ok = converter.xspace_to_tools_data(paths, "framework_op_stats", {"use_saved_result": False})
    if not ok:
        raise RuntimeError("TensorFlow's profiler could not convert its trace")
    table = json.loads(data)[0]
    columns = [c["id"] for c in table["cols"]]
    by_type: dict[str, float] = {}
    by_layer: dict[str, float] = {}
    for row in table["rows"]:
        values = dict(zip(columns, (c.get("v") for c in row["c"])))
        if values["type"] == "IDLE":
            continue
        self_us = float(values["total_self_time"])
        by_type[values["type"]] = by_type.get(values["type"], 0.0) + self_us
        match = _LAYER.search(values["operation"])
        layer = match.group(1) if match else "other"
        by_layer[layer] = by_layer.get(layer, 0.0) + self_us
    total = sum(by_type.values()) or 1.0

    def ranked(values: dict[str, float], kind: str) -> list[dict[str, Any]]:
        return [{"section": f"profile_{kind}", kind: name, "self_ms_per_step": us / 1e3 / steps,
                 "share": us / total}
                for name, us in sorted(values.items(), key=lambda kv: -kv[1])[:top]]

    return {"part": part, "xla": xla, "precision": options.precisions[0], "logdir": logdir,
            "by_type": ranked(by_type, "op_type"), "by_layer": ranked(by_layer, "layer")}


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

TIMING_COLUMNS = ("part", "precision", "xla", "batch_size", "image_size", "forward_ms", "forward_sd_ms",
                  "fwdbwd_ms", "fwdbwd_sd_ms", "fwdbwd_img_s", "forward_gflop_s", "fwdbwd_gflop_s")
THROUGHPUT_COLUMNS = ("variant", "image_size", "batch_size", "precision", "xla", "pipeline_img_s",
                      "fit_img_s", "step_img_s", "fit_vs_step")
TF1_COLUMNS = ("impl", "shapes", "xla", "batch_size", "image_size", "gflop", "forward_ms", "forward_sd_ms",
               "forward_median_ms", "fwdbwd_ms", "fwdbwd_sd_ms", "fwdbwd_median_ms")
SPEEDUP_COLUMNS = ("shapes", "xla", "forward_speedup", "fwdbwd_speedup", "fwdbwd_speedup_per_flop")


@dataclasses.dataclass
class BenchmarkResult:
    options: BenchmarkOptions
    environment: dict[str, str]
    timing: list[dict[str, Any]]
    throughput: list[dict[str, Any]]
    tf1: list[dict[str, Any]]
    speedups: list[dict[str, Any]]
    profile: dict[str, Any] | None
    seconds: float
    run_id: str | None = None

    @property
    def rows(self) -> list[dict[str, Any]]:
        extra = (self.profile["by_type"] + self.profile["by_layer"]) if self.profile else []
        return self.timing + self.throughput + self.tf1 + self.speedups + extra

    def markdown(self) -> str:
        env = self.environment
        parts = [f"AlexNet benchmark: Keras {env['keras']} on {env['backend']} ({env['device']}), "
                 f"{env['date']}, {self.seconds:.0f} s; load average before/after: "
                 f"{env['load_before']} / {env['load_after']}"]
        if self.timing:
            parts += ["", f"Timing (seconds per batch as ms, mean ± sd over {self.options.steps} steps "
                      f"after {self.options.burn_in} burn-in; random {self.options.image_size}px "
                      f"images on the device):", "", markdown_table(self.timing, TIMING_COLUMNS)]
        if self.throughput:
            parts += ["", "Training throughput (images/s; fit = model.fit on the project's tf.data "
                      "pipeline, step = hand-written train step on a device-resident batch, "
                      "pipeline = tf.data alone; fit_vs_step = fit / step speed):", "",
                      markdown_table(self.throughput, THROUGHPUT_COLUMNS)]
        if self.tf1:
            parts += ["", "Keras conv stack against the seeds' TF1 graph (benchmarks/tf1_reference.py), "
                      "float32, timed in turn step by step (ms per batch):", "",
                      markdown_table(self.tf1, TF1_COLUMNS), "",
                      "Speedup of Keras over TF1 (TF1 median / Keras median; > 1 = Keras faster):",
                      "", markdown_table(self.speedups, SPEEDUP_COLUMNS)]
        if self.profile:
            p = self.profile
            parts += ["", f"Profile ({p['part']} network, forward+backward, {p['precision']}, "
                      f"XLA {'on' if p['xla'] else 'off'}; trace in {p['logdir']}): self-time by op type, "
                      f"then by layer:", "",
                      markdown_table(p["by_type"], ("op_type", "self_ms_per_step", "share")), "",
                      markdown_table(p["by_layer"], ("layer", "self_ms_per_step", "share"))]
        return "\n".join(parts) + "\n"

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}

        def on(value: bool) -> str:
            return "xla" if value else "noxla"

        for r in self.timing:
            key = f"timing.{r['part']}.{r['precision']}.{on(r['xla'])}"
            for name in ("forward_ms", "forward_sd_ms", "fwdbwd_ms", "fwdbwd_sd_ms", "fwdbwd_img_s"):
                out[f"{key}.{name}"] = r[name]
        for r in self.throughput:
            key = f"throughput.{r['variant']}.b{r['batch_size']}.{r['precision']}.{on(r['xla'])}"
            for name in ("pipeline_img_s", "fit_img_s", "step_img_s", "fit_vs_step"):
                out[f"{key}.{name}"] = r[name]
        for r in self.tf1:
            name = r["shapes"] if r["impl"] == "tf1" else f"keras.{on(r['xla'])}"
            for kind in ("forward_median_ms", "fwdbwd_median_ms"):
                out[f"tf1.{name}.{kind}"] = r[kind]
        for r in self.speedups:
            for name in ("forward_speedup", "fwdbwd_speedup", "fwdbwd_speedup_per_flop"):
                out[f"tf1.{r['shapes']}.{on(r['xla'])}.{name}"] = r[name]
        out["benchmark_seconds"] = self.seconds
        return {k: float(v) for k, v in out.items() if math.isfinite(float(v))}


def environment() -> dict[str, str]:
    import keras

    from ..tracking import describe_device

    env = {"backend": keras.backend.backend(), "keras": keras.__version__, "device": describe_device(),
           "python": platform.python_version(), "platform": platform.platform(),
           "cpu_count": str(os.cpu_count()), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    for module in ("tensorflow", "jax", "torch"):
        if module in sys.modules:
            env[module] = getattr(sys.modules[module], "__version__", "?")
    env["load_before"] = _load()
    return env


def _load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def run_benchmark(options: BenchmarkOptions, *, log: Callable[[str], None] = print) -> BenchmarkResult:
    """Measure every section `options` asks for (no MLflow here; see `benchmark_and_log`)."""
    start = time.perf_counter()
    env = environment()
    for xla in options.xla:
        _check_xla(xla)
    # Every row builds a new model, so TensorFlow's "triggered tf.function retracing" warnings are
    # expected here; they are silenced for the run and the level restored after.
    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        return _run_sections(options, env, start, log)
    finally:
        tf_logger.setLevel(level)


def _run_sections(options: BenchmarkOptions, env: dict[str, str], start: float,
                  log: Callable[[str], None]) -> BenchmarkResult:
    timing: list[dict[str, Any]] = []
    for part in options.parts:
        for precision in options.precisions:
            for xla in options.xla:
                row = timing_row(part, precision, xla, options)
                log(f"timing {part} {precision} xla={xla}: forward {row['forward_ms']:.2f} ± "
                    f"{row['forward_sd_ms']:.2f} ms, forward+backward {row['fwdbwd_ms']:.2f} ± "
                    f"{row['fwdbwd_sd_ms']:.2f} ms")
                timing.append(row)
    tf1_rows: list[dict[str, Any]] = []
    if options.tf1_reference:
        tf1_rows = tf1_comparison(options)
        for row in tf1_rows:
            log(f"tf1 comparison {row['impl']} {row['shapes']} xla={row['xla']}: forward median "
                f"{row['forward_median_ms']:.2f} ms, forward+backward median {row['fwdbwd_median_ms']:.2f} ms")
    throughput: list[dict[str, Any]] = []
    for variant in options.throughput_variants:
        for batch_size in options.throughput_batch_sizes:
            for precision in options.precisions:
                for xla in options.xla:
                    row = throughput_row(variant, batch_size, precision, xla, options)
                    log(f"throughput {variant} batch {batch_size} {precision} xla={xla}: fit "
                        f"{row['fit_img_s']:.1f} img/s, step {row['step_img_s']:.1f} img/s, pipeline "
                        f"{row['pipeline_img_s']:.1f} img/s")
                    throughput.append(row)
    profile = profile_ops(options) if options.profile else None
    env["load_after"] = _load()
    return BenchmarkResult(options, env, timing, throughput, tf1_rows, tf1_speedups(tf1_rows),
                           profile, time.perf_counter() - start)


def benchmark_and_log(options: BenchmarkOptions, *, experiment: str = DEFAULT_EXPERIMENT,
                      run_name: str | None = None, output_dir: str | None = None,
                      log: Callable[[str], None] = print) -> BenchmarkResult:
    """Run the benchmark inside one MLflow run: params, environment tags, one metric per number,
    and results.md / results.csv / results.json artifacts (also written to `output_dir` if given)."""
    from .. import tracking

    tags = {**tracking.environment_tags(), tracking.JOB_TAG: "benchmark"}
    with tracking.run(experiment, run_name=run_name or "benchmark", params=options.params(),
                      tags=tags) as active:
        result = run_benchmark(options, log=log)
        result.run_id = active.info.run_id
        tracking.log_metrics(result.metrics())
        files = _artifacts(result)
        for name, text in files.items():
            tracking.log_text(text, f"benchmark/{name}")
    if output_dir:
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text)
    return result


def _artifacts(result: BenchmarkResult) -> dict[str, str]:
    payload = {"options": result.options.params(), "environment": result.environment, "rows": result.rows,
               "seconds": result.seconds}
    return {"results.md": result.markdown(), "results.csv": csv_text(result.rows),
            "results.json": json.dumps(payload, indent=2, default=str)}


# ---------------------------------------------------------------------------------------------
# Command line (wired into `alexnet-keras benchmark` by cli.py)
# ---------------------------------------------------------------------------------------------

def _items(text: str) -> list[str]:
    """The entries of a comma-separated flag; none for "" or "none"."""
    if text is None or str(text).strip().lower() in ("", "none"):
        return []
    return [part.strip() for part in str(text).split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchmarkOptions()
    parser.add_argument("--quick", action="store_true", help=f"CPU-sized settings: {QUICK} "
                        "(flags given explicitly still win)")
    parser.add_argument("--batch-size", type=int, help=f"timing batch (default {d.batch_size})")
    parser.add_argument("--image-size", type=int, help=f"timing image side (default {d.image_size})")
    parser.add_argument("--steps", type=int, help=f"timed steps (default {d.steps})")
    parser.add_argument("--burn-in", type=int, help=f"untimed steps first (default {d.burn_in})")
    parser.add_argument("--parts", help="conv,full (default both): conv1..pool5 and/or the whole net; "
                        "'none' skips the timing section")
    parser.add_argument("--precision", dest="precisions", help="comma-separated: float32, mixed_bfloat16, "
                        "mixed_float16 (default float32)")
    parser.add_argument("--xla", help="comma-separated true/false (default true)")
    parser.add_argument("--channels", choices=CHANNELS, help="image layout; only 'last' is supported "
                        "by the model (default last)")
    parser.add_argument("--channels-last", dest="channels", action="store_const", const="last")
    parser.add_argument("--channels-first", dest="channels", action="store_const", const="first")
    parser.add_argument("--width", type=float, help="model width multiplier (default 1.0)")
    parser.add_argument("--num-classes", type=int, help=f"timing section classes (default {d.num_classes})")
    parser.add_argument("--throughput-variants", help="paper,cifar (default both; 'none' skips the section)")
    parser.add_argument("--throughput-batch-sizes", help="default 32,128,256,512")
    parser.add_argument("--throughput-steps", type=int, help=f"default {d.throughput_steps}")
    parser.add_argument("--throughput-burn-in", type=int, help=f"default {d.throughput_burn_in}")
    parser.add_argument("--tf1-reference", nargs="?", const="true", default=None, metavar="BOOL",
                        help="also time benchmarks/tf1_reference.py (TF1 graph mode, TensorFlow's "
                             "own device: meant for CPU) in turn with the Keras conv stack at the "
                             "timing settings and report the speedup (default false)")
    parser.add_argument("--profile", nargs="?", const="true", default=None, metavar="BOOL",
                        help="TensorFlow profiler summary of the full net's forward+backward")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment")
    parser.add_argument("--run-name")
    parser.add_argument("--output-dir", help="also write results.md/.csv/.json here")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else "
                        "sqlite:///mlflow.db)")


def options_from_args(args: argparse.Namespace) -> BenchmarkOptions:
    """The options the flags give, each value parsed as config options are (config.parse_value)."""
    values: dict[str, Any] = {}
    for name in ("batch_size", "image_size", "steps", "burn_in", "width", "num_classes", "throughput_steps",
                 "throughput_burn_in", "seed", "channels"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    for name, kind in (("parts", str), ("precisions", str), ("xla", bool), ("throughput_variants", str),
                       ("throughput_batch_sizes", int)):
        if getattr(args, name) is not None:
            values[name] = tuple(parse_value(f"benchmark {name}", item, kind) for item in _items(getattr(args, name)))
    for name in ("tf1_reference", "profile"):
        if getattr(args, name) is not None:
            values[name] = parse_value(f"benchmark {name}", getattr(args, name), bool)
    return BenchmarkOptions.quick(**values) if args.quick else BenchmarkOptions(**values)


def cmd_benchmark(args: argparse.Namespace) -> int:
    options = options_from_args(args)   # validated before anything is measured or logged
    from .. import tracking

    tracking.configure(args.tracking_uri)
    result = benchmark_and_log(options, experiment=args.experiment, run_name=args.run_name,
                               output_dir=args.output_dir, log=tracking.stderr)
    print(result.markdown())
    print(f"MLflow run {result.run_id} (experiment {args.experiment!r}): metrics and benchmark/results.*")
    return 0
