"""The benchmark (alexnet_keras/training/benchmark.py): its arithmetic, every option at a tiny size, and the
CLI end to end into a temporary MLflow store, all in this process."""

import contextlib
import csv
import io
import math
import re
from pathlib import Path

import numpy as np
import pytest

from alexnet_keras.training import benchmark
from alexnet_keras.training.benchmark import BenchmarkOptions, images_per_second, mean_sd, time_steps
from alexnet_keras.config import PRECISIONS, ConfigError, validated

from conftest import all_runs


# --- arithmetic ------------------------------------------------------------------------------

def test_mean_sd_is_the_seeds_population_formula():
    durations = [0.1, 0.2, 0.3, 0.4]
    mean, sd = mean_sd(durations)
    assert mean == pytest.approx(0.25)
    # The seeds: sqrt(sum(t^2)/n - mean^2).
    assert sd == pytest.approx(math.sqrt(sum(d * d for d in durations) / 4 - 0.25 ** 2))
    assert sd == pytest.approx(np.std(durations))
    assert mean_sd([0.5]) == (0.5, 0.0)
    assert mean_sd([0.3] * 1000)[1] == pytest.approx(0.0, abs=1e-12)   # no negative variance
    with pytest.raises(ValueError):
        mean_sd([])


def test_images_per_second_from_known_timings():
    assert images_per_second(256, 0.01) == pytest.approx(25_600)
    assert images_per_second(32, 0.0007) == pytest.approx(45_714.2857, rel=1e-6)
    assert images_per_second(32, 0.0) == float("inf")


class FakeClock:
    """perf_counter stand-in: every step advances it by the next of `costs`."""

    def __init__(self, costs):
        self.now, self.costs, self.calls = 0.0, list(costs), 0

    def __call__(self):
        return self.now

    def step(self):
        self.now += self.costs[self.calls]
        self.calls += 1
        return self.calls


def test_time_steps_drops_the_burn_in():
    clock = FakeClock([5.0, 4.0, 0.1, 0.2, 0.3])   # two slow warm-up steps (compilation)
    durations = time_steps(clock.step, steps=3, burn_in=2, clock=clock)
    assert durations == pytest.approx([0.1, 0.2, 0.3]) and clock.calls == 5


BENCHMARKS = str(Path(__file__).resolve().parent.parent / "benchmarks")


def test_speedups_over_tf1(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)   # as `python benchmarks/tf1_comparison.py` runs it
    from tf1_comparison import speedups

    rows = [{"impl": "keras", "shapes": "project", "xla": False, "forward_median_ms": 10.0,
             "fwdbwd_median_ms": 30.0, "gflop": 2.0},
            {"impl": "keras", "shapes": "project", "xla": True, "forward_median_ms": 5.0,
             "fwdbwd_median_ms": 15.0, "gflop": 2.0},
            {"impl": "tf1", "shapes": "project", "xla": "", "forward_median_ms": 12.0,
             "fwdbwd_median_ms": 33.0, "gflop": 2.0},
            {"impl": "tf1", "shapes": "seeds", "xla": "", "forward_median_ms": 6.0,
             "fwdbwd_median_ms": 15.0, "gflop": 1.0}]
    ratios = {(r["shapes"], r["xla"]): r for r in speedups(rows)}
    assert len(ratios) == 4
    project = ratios["project", False]
    assert project["forward_speedup"] == pytest.approx(1.2) and project["fwdbwd_speedup"] == pytest.approx(1.1)
    assert project["fwdbwd_speedup_per_flop"] == pytest.approx(1.1)
    assert ratios["project", True]["fwdbwd_speedup"] == pytest.approx(2.2)
    seeds = ratios["seeds", False]
    assert seeds["fwdbwd_speedup"] == pytest.approx(0.5)
    assert seeds["fwdbwd_speedup_per_flop"] == pytest.approx(1.0)   # twice the work in twice the time


def test_tf1_comparison_runs_keras_and_the_tf1_graph_with_the_same_arithmetic(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    from tf1_comparison import compare

    ticks = iter(range(10_000))   # every clock read advances one "second": each step lasts 1 s
    rows, _ = compare(batch_size=2, image_size=67, width=0.0625, steps=3, burn_in=1, xla_settings=(False,),
                      shapes=("project",), clock=lambda: float(next(ticks)))
    assert [(r["impl"], r["shapes"]) for r in rows] == [("keras", "project"), ("tf1", "project")]
    keras_row, tf1_row = rows
    assert keras_row["gflop"] == pytest.approx(tf1_row["gflop"])   # same layers, same FLOPs
    for row in rows:
        assert row["steps"] == 3 and row["fwdbwd_median_ms"] == row["forward_ms"] == 1000.0
        assert row["fwdbwd_sd_ms"] == 0.0


def test_tables():
    from alexnet_keras.tables import csv_text, markdown_table

    rows = [{"section": "x", "a": 1, "b": 0.012345, "c": True}, {"section": "y", "a": 25600.4, "d": "z"}]
    table = markdown_table(rows, ("a", "b", "c"))
    assert table.splitlines()[0] == "| a | b | c |"
    assert "| 1 | 0.0123 | true |" in table and "| 25,600 |" in table
    parsed = list(csv.DictReader(io.StringIO(csv_text(rows))))
    assert parsed[0]["c"] == "true" and parsed[1]["d"] == "z" and parsed[1]["b"] == ""
    assert float(parsed[0]["b"]) == 0.012345 and list(parsed[0]) == ["section", "a", "b", "c", "d"]


def test_forward_flops_of_the_conv_stack():
    model = benchmark.build_model("conv", image_size=224)
    # conv1 54x54x96 from 11x11x3, conv2 26x26x256 from 5x5x96, conv3..5 at 12x12.
    expected = 2 * (54 * 54 * 96 * 11 * 11 * 3 + 26 * 26 * 256 * 5 * 5 * 96 + 12 * 12 * 384 * 3 * 3 * 256
                    + 12 * 12 * 384 * 3 * 3 * 384 + 12 * 12 * 256 * 3 * 3 * 384)
    assert benchmark.forward_flops(model) == expected
    assert model.output_shape == (None, 5, 5, 256) and model.layers[-1].name == "pool5"


# --- options ---------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, fragment", [
    ({"precisions": ("float64",)}, "`precisions.0` must be one of 'float32', 'mixed_float16', 'mixed_bfloat16'; got 'float64'"),
    ({"parts": ("convs",)}, "`parts.0` must be one of 'conv', 'full'; got 'convs'"),
    ({"steps": 0}, "`steps` must be > 0; got 0"),
    ({"burn_in": -1}, "`burn_in` must be >= 0; got -1"),
    ({"image_size": 40}, "image_size must be an integer >= 67"),
    ({"throughput_batch_sizes": (0,)}, "`throughput_batch_sizes.0` must be > 0; got 0"),
])
def test_bad_options_are_clear_errors(overrides, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        validated(BenchmarkOptions, overrides, "benchmark")


def test_quick_is_cpu_sized_and_flags_win():
    from alexnet_keras import cli

    quick = benchmark.options_from_args(cli.build_parser().parse_args(["benchmark", "--quick", "--steps", "3"]))
    assert quick.steps == 3 and quick.burn_in == benchmark.QUICK["burn_in"]
    assert quick.throughput_batch_sizes == (32,)
    assert BenchmarkOptions().throughput_batch_sizes == (32, 128, 256, 512)
    assert BenchmarkOptions().params()["xla"] == "true"


# --- every option builds and runs one step through Keras' compiled functions -----------------

# XLA compiles (seconds each on a CPU) once per part; `jit_compile` reaches every model (asserted below).
@pytest.mark.parametrize("part", ["conv", "full"])
@pytest.mark.parametrize("xla, precision", [(False, p) for p in PRECISIONS] + [(True, "float32")])
def test_every_option_runs_one_step(part, xla, precision):
    import keras

    model = benchmark.build_model(part, variant="cifar", image_size=16, width=1 / 16, num_classes=4,
                                  precision=precision, xla=xla)
    assert keras.mixed_precision.global_policy().name == "float32"   # restored after the build
    assert model.layers[-1].dtype_policy.name == ("float32" if part == "full" else precision)
    assert model.jit_compile == xla
    x, y = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype("float32"), np.arange(4)
    outputs = model.predict_on_batch(x)
    assert outputs.shape == ((4, 4) if part == "full" else (4, 2, 2, 16))
    before = keras.ops.convert_to_numpy(model.get_layer("fc8").kernel) if part == "full" else None
    losses = [float(np.ravel(model.train_on_batch(x, y))[0]) for _ in range(2)]
    assert all(np.isfinite(losses))
    if part == "full":   # train_on_batch is a whole training step: the weights moved
        assert not np.allclose(before, keras.ops.convert_to_numpy(model.get_layer("fc8").kernel))
    else:   # the seeds' objective, l2_loss(pool5)
        assert losses[0] == pytest.approx(0.5 * np.sum(np.square(outputs.astype("float64"))), rel=1e-2)


# --- the command, end to end ------------------------------------------------------------------

TINY_CLI = ["benchmark", "--quick", "--image-size", "67", "--width", "0.0625", "--num-classes", "4",
            "--steps", "2", "--burn-in", "1", "--xla", "false", "--throughput-variants", "cifar",
            "--throughput-batch-sizes", "8", "--throughput-steps", "2", "--throughput-burn-in", "1"]


def test_benchmark_cli_logs_one_run_with_its_table(mlflow_store, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from alexnet_keras import cli

    out_dir = tmp_path / "results"
    assert cli.main(TINY_CLI + ["--output-dir", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "| part | precision | xla |" in printed and "| variant | image_size |" in printed

    runs = all_runs(mlflow_store)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["steps"] == "2" and run.data.params["xla"] == "false"
    assert run.data.tags["alexnet_keras.job"] == "benchmark"
    metrics = run.data.metrics
    for key in ("timing.conv.float32.noxla.fwdbwd_ms", "timing.full.float32.noxla.forward_ms",
                "throughput.cifar.b8.float32.noxla.fit_img_s", "throughput.cifar.b8.float32.noxla.pipeline_img_s"):
        assert key in metrics and metrics[key] > 0, key
    client = MlflowClient(mlflow_store)
    names = {a.path for a in client.list_artifacts(run.info.run_id, "benchmark")}
    assert names == {"benchmark/results.md", "benchmark/results.csv", "benchmark/results.json"}
    table = (out_dir / "results.csv").read_text()
    assert table.startswith("section,") and "timing" in table and "throughput" in table


@pytest.mark.parametrize("flags, fragment", [
    (["--xla", "true,maybe"], "`--xla.1` must be true or false; got 'maybe'"),
    (["--throughput-batch-sizes", "32,lots"], "`--throughput-batch-sizes.1` must be an integer; got 'lots'"),
    (["--steps", "0"], "`--steps` must be > 0; got 0"),
    (["--precisions", "float64"], "`--precisions.0` must be one of 'float32'"),
    (["--image-size", "40"], "`--image-size`: model.image_size must be an integer >= 67"),
    (["--stepz", "3"], "unrecognized arguments: --stepz"),
])
def test_bad_flags_are_refused_before_the_store_is_opened(untouched_store, capsys, flags, fragment):
    from alexnet_keras import cli

    with pytest.raises(SystemExit) if flags[0] == "--stepz" else contextlib.nullcontext():   # argparse's own error
        assert cli.main(["benchmark", "--quick", *flags]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not untouched_store.exists()


def test_mlproject_benchmark_entry_point_matches_the_options():
    import shlex
    from pathlib import Path

    import yaml

    from alexnet_keras import cli

    root = Path(__file__).resolve().parent.parent
    entry = yaml.safe_load((root / "MLproject").read_text())["entry_points"]["benchmark"]
    defaults = BenchmarkOptions().params()
    params = {name: str(spec["default"]) for name, spec in entry["parameters"].items()}
    for name, value in params.items():
        assert name in defaults, f"MLproject parameter {name!r} is not a benchmark option"
        assert value == defaults[name], name
    argv = shlex.split(entry["command"].format(**params))[3:]   # after `python -m alexnet_keras`
    args = cli.build_parser().parse_args(argv)
    assert args.command == "benchmark"
    assert benchmark.options_from_args(args) == BenchmarkOptions()
