"""`alexnet-keras benchmark`: forward/backward timing and train.fit throughput in one MLflow run (benchmarks/)."""

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Sequence, get_origin

import pydantic
from pydantic import Field, NonNegativeInt, PositiveInt

from ..config import PRECISIONS, VARIANTS, Config, DataConfig, ModelConfig, Options, TrainConfig, none_text, validated
from ..tables import cell, csv_text, markdown_table, value_text

DEFAULT_EXPERIMENT, PARTS = "alexnet-keras-benchmark", ("conv", "full")
# CPU-sized settings (`--quick`): short runs that still exercise every section.
QUICK = {"steps": 10, "burn_in": 2, "throughput_batch_sizes": (32,), "throughput_steps": 5, "throughput_burn_in": 2}


class BenchmarkOptions(Options):
    """What to measure; the field names are the MLflow params, the flags their aliases."""

    model_config = pydantic.ConfigDict(alias_generator=lambda n: "--" + n.replace("_", "-"), validate_by_name=True)

    batch_size: PositiveInt = 32          # timing section (the seeds' file used 128)
    image_size: Annotated[int, pydantic.AfterValidator(  # timing section, `paper` variant at this side
        lambda side: ModelConfig(variant="paper", image_size=side).image_size)] = 224   # ConfigError if too small
    steps: PositiveInt = 100
    burn_in: NonNegativeInt = 10
    parts: tuple[Literal["conv", "full"], ...] = Field(PARTS, description="conv (conv1..pool5), full; none: skip")
    precisions: tuple[Literal[PRECISIONS], ...] = Field(("float32",), min_length=1, description=", ".join(PRECISIONS))
    xla: tuple[bool, ...] = Field((True,), min_length=1, description="true, false: Keras' jit_compile")
    width: float = Field(1.0, gt=0, le=16)
    num_classes: PositiveInt = 1000       # timing section (ImageNet); throughput uses 10 classes
    throughput_variants: tuple[Literal[VARIANTS], ...] = Field(("paper", "cifar"), description=", ".join(VARIANTS)
                                                               + "; none: skip")
    throughput_batch_sizes: tuple[PositiveInt, ...] = (32, 128, 256, 512)
    throughput_steps: PositiveInt = 100
    throughput_burn_in: NonNegativeInt = 10
    seed: NonNegativeInt = 0

    def params(self) -> dict[str, str]:   # MLflow's: lists comma-separated, booleans true/false
        return {name: ",".join(map(value_text, v)) if isinstance(v, tuple) else value_text(v)
                for name, v in self.model_dump().items()}


def mean_sd(durations: Sequence[float]) -> tuple[float, float]:
    """Mean and population sd, the seeds' sqrt(E[t^2] - E[t]^2) (pstdev, without the cancellation)."""
    return statistics.fmean(durations), statistics.pstdev(durations)


def images_per_second(batch_size: int, seconds_per_batch: float) -> float:
    return batch_size / seconds_per_batch if seconds_per_batch > 0 else float("inf")


def time_steps(step: Callable[[], Any], steps: int, burn_in: int, clock: Callable[[], float] = time.perf_counter):
    """Seconds of each of the last `steps` of burn_in + steps calls of `step` (which must block)."""
    durations = []
    for _ in range(burn_in + steps):
        start = clock()
        step()
        durations.append(clock() - start)
    return durations[burn_in:]


@contextlib.contextmanager
def dtype_policy(precision: str):
    """Build under `precision`, then restore the previous global policy."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def build_model(part: str, *, variant: str = "paper", image_size: int | None = 224, width: float = 1.0,
                num_classes: int = 1000, precision: str = "float32", xla: bool = True):
    """The AlexNet compiled as train.py does, or (part "conv") its conv stack up to pool5 with an L2 objective."""
    import keras

    from ..model.alexnet import build_alexnet
    from .train import build_optimizer, compile_model

    # No weight decay in the conv stack: the seeds' objective there is l2_loss(pool5) = sum(pool5 ** 2) / 2 alone.
    config = Config(model=ModelConfig(variant=variant, image_size=image_size, width=width,
                                      weight_decay=0.0 if part == "conv" else ModelConfig.weight_decay),
                    train=TrainConfig(precision=precision, schedule="constant", jit_compile=value_text(xla)))
    with dtype_policy(precision):
        model = build_alexnet(config.model, num_classes=num_classes)
        if part == "full":
            return compile_model(model, config, steps_per_epoch=1)
        conv = keras.Model(model.inputs, model.get_layer("pool5").output, name="alexnet_conv")
        l2_loss = lambda _, pool5: 0.5 * keras.ops.sum(keras.ops.square(keras.ops.cast(pool5, "float32")))  # noqa: E731
        conv.compile(optimizer=build_optimizer(config.train, steps_per_epoch=1), loss=l2_loss, jit_compile=xla)
        return conv


def forward_flops(model) -> int:
    """FLOPs (2 per multiply-add) of one image's forward pass through the layers with a kernel."""
    return sum(2 * math.prod(layer.kernel.shape[:-1]) * math.prod(layer.output.shape[1:]) for layer in model.layers
               if hasattr(layer, "kernel"))


def timing_row(part: str, precision: str, xla: bool, o: BenchmarkOptions) -> dict[str, Any]:
    """The seeds' measurement of one part and setting: forward and forward+backward."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(o.seed)
    model = build_model(part, image_size=o.image_size, width=o.width, num_classes=o.num_classes,
                        precision=precision, xla=xla)
    x = keras.ops.convert_to_tensor(np.random.default_rng(o.seed).uniform(  # random 0..255 images, on the device
        0, 255, (o.batch_size, o.image_size, o.image_size, 3)).astype("float32"))
    y = keras.ops.convert_to_tensor(np.arange(o.batch_size) % o.num_classes)
    # Both return NumPy (which waits for the device). Forward+backward is `train_on_batch`, a whole training step:
    # forward, gradients, SGD-momentum update (and the full net's metrics); the seeds timed the gradients alone.
    fwd_mean, fwd_sd = mean_sd(time_steps(lambda: model.predict_on_batch(x), o.steps, o.burn_in))
    bwd_mean, bwd_sd = mean_sd(time_steps(lambda: model.train_on_batch(x, y), o.steps, o.burn_in))
    flops = forward_flops(model) * o.batch_size
    return {"section": "timing", "part": part, "precision": precision, "xla": xla, "batch_size": o.batch_size,
            "image_size": o.image_size, "steps": o.steps, "forward_ms": 1e3 * fwd_mean, "forward_sd_ms": 1e3 * fwd_sd,
            "fwdbwd_ms": 1e3 * bwd_mean, "fwdbwd_sd_ms": 1e3 * bwd_sd,
            "forward_img_s": images_per_second(o.batch_size, fwd_mean),
            "fwdbwd_img_s": images_per_second(o.batch_size, bwd_mean), "gflop": flops / 1e9,   # forward, per batch
            # A conv/dense layer's backward costs about twice its forward: 3x for forward+backward.
            "forward_gflop_s": flops / fwd_mean / 1e9, "fwdbwd_gflop_s": 3 * flops / bwd_mean / 1e9}


def throughput_row(variant: str, batch_size: int, precision: str, xla: bool, o: BenchmarkOptions) -> dict[str, Any]:
    """Training images/s of train.fit on the project's tf.data pipeline (synthetic images), and of it alone."""
    import keras

    from .train import fit, prepare

    # Two batches of training images, reshuffled and augmented each pass (train_limit: after the validation split).
    steps, burn_in, n = o.throughput_steps, o.throughput_burn_in, 2 * batch_size
    config = Config(model=ModelConfig(variant=variant, width=o.width),
                    data=DataConfig(dataset="synthetic", synthetic_samples=math.ceil(n / 0.85) + 16, train_limit=n),
                    train=TrainConfig(epochs=1, batch_size=batch_size, precision=precision, schedule="constant",
                                      jit_compile=value_text(xla), seed=o.seed))
    # "not stratified": irrelevant here. prepare() sets the global dtype policy, restored once the model is built.
    with warnings.catch_warnings(action="ignore", category=UserWarning), dtype_policy(precision):
        data, model = prepare(config)
    batches = iter(pipeline := data.train.repeat())
    pipeline_s = statistics.fmean(time_steps(lambda: next(batches), steps, max(1, burn_in)))

    class FitClock(keras.callbacks.Callback):   # from the start of step burn_in to the end of the epoch
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter() if batch == burn_in else getattr(self, "start", None)

        def on_epoch_end(self, epoch, logs=None):
            float(logs["loss"])   # the last step's loss: waits for every queued step
            self.seconds = time.perf_counter() - self.start

    fit(model, dataclasses.replace(data, train=pipeline, val=None), config, callbacks=[clock := FitClock()],
        steps_per_epoch=burn_in + steps, verbose=0, track=False)
    return {"section": "throughput", "variant": variant, "image_size": config.model.input_size,
            "batch_size": batch_size, "precision": precision, "xla": xla, "steps": steps,
            "pipeline_img_s": images_per_second(batch_size, pipeline_s),
            "fit_img_s": images_per_second(batch_size, clock.seconds / steps)}


TIMING_COLUMNS = ("part", "precision", "xla", "batch_size", "image_size", "forward_ms", "forward_sd_ms",
                  "fwdbwd_ms", "fwdbwd_sd_ms", "fwdbwd_img_s", "forward_gflop_s", "fwdbwd_gflop_s")
THROUGHPUT_COLUMNS = ("variant", "image_size", "batch_size", "precision", "xla", "pipeline_img_s", "fit_img_s")
SECTIONS = {  # each section's table title, its columns, and the columns logged as metrics
    "timing": ("Timing (ms per batch, mean ± sd after a burn-in; forward = predict_on_batch, fwdbwd = "
               "train_on_batch; random images on the device):", TIMING_COLUMNS, TIMING_COLUMNS[5:10]),
    "throughput": ("Training throughput (images/s; fit = train.fit on the project's tf.data pipeline, pipeline = "
                   "that pipeline alone):", THROUGHPUT_COLUMNS, THROUGHPUT_COLUMNS[5:])}


def benchmark_and_log(options: BenchmarkOptions, *, experiment: str = DEFAULT_EXPERIMENT,
                      run_name: str | None = None, output_dir: str | None = None) -> tuple[str, dict[str, str]]:
    """Every section measured in one MLflow run (benchmark/results.{md,csv,json}, also in `output_dir`)."""
    from .. import tracking

    o, start, load = options, time.perf_counter(), lambda: " ".join(f"{v:.1f}" for v in os.getloadavg())
    tags = {**tracking.environment_tags(), tracking.JOB_TAG: "benchmark"}
    env = {**{k.removeprefix(tracking.TAG_PREFIX): v for k, v in tags.items()},
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_before": load()}
    jobs = [(timing_row, (part, precision, xla)) for part in o.parts for precision in o.precisions for xla in o.xla]
    jobs += [(throughput_row, (variant, batch, precision, xla)) for variant in o.throughput_variants
             for batch in o.throughput_batch_sizes for precision in o.precisions for xla in o.xla]
    logging.getLogger("tensorflow").setLevel(logging.ERROR)   # a model per row: TF's retracing warnings are expected
    rows = []
    with tracking.run(experiment, run_name=run_name or "benchmark", params=o.params(), tags=tags) as active:
        for measure, args in jobs:
            rows.append(row := measure(*args, o))
            tracking.stderr(", ".join(f"{c} {cell(row[c])}" for c in ("section", *SECTIONS[row["section"]][1])))
        seconds, env["load_after"] = time.perf_counter() - start, load()
        text = [f"AlexNet benchmark: Keras {env['keras_version']} on {env['keras_backend']} ({env['device']}), "
                f"{env['date']}, {seconds:.0f} s; load average {env['load_before']} before, {env['load_after']} after"]
        for section, (title, columns, _) in SECTIONS.items():
            if any(r["section"] == section for r in rows):
                text += ["", title, "", markdown_table([r for r in rows if r["section"] == section], columns)]
        files = {"results.md": "\n".join(text) + "\n", "results.csv": csv_text(rows), "results.json": json.dumps(
            {"options": o.params(), "environment": env, "rows": rows, "seconds": seconds}, indent=2, default=str)}
        metrics = {"benchmark_seconds": seconds}   # timing.<part>.<precision>.<xla|noxla>.<column>, throughput...
        for r in rows:
            where = r["part"] if r["section"] == "timing" else f"{r['variant']}.b{r['batch_size']}"
            key = f"{r['section']}.{where}.{r['precision']}.{'xla' if r['xla'] else 'noxla'}"
            metrics.update({f"{key}.{name}": float(r[name]) for name in SECTIONS[r["section"]][2]})
        tracking.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
        for name, content in files.items():
            tracking.log_text(content, f"benchmark/{name}")
    for name, content in files.items() if output_dir else ():
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / name).write_text(content)
    return active.info.run_id, files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag per option (lists comma-separated, `none` for an empty one), validated by BenchmarkOptions."""
    parser.add_argument("--quick", action="store_true", help=f"CPU-sized settings: {QUICK} (flags given win)")
    for name, field in BenchmarkOptions.model_fields.items():
        default = BenchmarkOptions().params()[name]
        parser.add_argument(field.alias, dest=name, help=f"{field.description or ''} (default {default})".strip())
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment")
    parser.add_argument("--run-name")
    parser.add_argument("--output-dir", help="also write results.md/.csv/.json here")


def options_from_args(args: argparse.Namespace) -> BenchmarkOptions:
    """The options the flags give (over `--quick`'s), keyed by flag so that every error names its flag."""
    data: dict[str, Any] = {}
    for name, field in BenchmarkOptions.model_fields.items():
        value = getattr(args, name) if getattr(args, name) is not None else (QUICK if args.quick else {}).get(name)
        if isinstance(value, str) and get_origin(field.annotation) is tuple:
            value = [] if none_text(value) is None else [v.strip() for v in value.split(",")]
        data.update({field.alias: value} if value is not None else {})
    return validated(BenchmarkOptions, data, "command line")
