"""The first thing to run when a GPU is lent: one call that measures what the GPU issues ask, on one machine.

Sections (each a row of `device-check.csv` / `.md` / `.json` in --out):
  resident   the paper variant's whole training step (`train_on_batch`) on one batch that stays on the
             device: what the network alone runs at, no input pipeline (`alexnet-keras benchmark`'s timing).
  memory     `train.fit` fed by the project's tf.data pipeline from decoded images in memory (random crop
             + flip on the CPU), and that pipeline alone (`alexnet-keras benchmark`'s throughput).
  jpeg       `train.fit` on a generated folder of JPEGs in 1,000 class folders at ImageNet-like sizes, with
             the paper recipe (decode, shorter side to --stored-size, random 227 crop, flip, PCA colour) and
             the files streamed (`max_memory_mb=0`): the full input cost; and that pipeline alone.
             resident - jpeg is what the pipeline costs the GPU.
  cifar10    `alexnet-keras train --config experiments/cifar10_fast.yaml` on the CIFAR-10 copy: epoch time and
             test accuracy (the GPU speed recipe's targets: epoch <= 0.5 s, >= 90 % in <= 60 s).
  torch      benchmarks/torchvision_reference.py (torch.compile, bf16) at the same batch, both networks,
             in a subprocess of the same call: the reference the Keras-JAX numbers are read against.

On the GPU machine (../shared/device/README.md: wheels and CIFAR-10 first), one call, under 8 minutes:
    KERAS_BACKEND=jax PYTHONPATH=.:/tmp/site python benchmarks/device_check.py --cifar10 /tmp/cifar10 --out $OUT
On a CPU, at toy sizes (what tests/test_device_check.py runs; numbers meaningless, the path is the point):
    python benchmarks/device_check.py --tiny --out /tmp/device-check
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from jpeg_folder import make_jpeg_folder  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Sizes:
    batch_size: int = 256
    precision: str = "mixed_bfloat16"
    xla: bool = True
    width: float = 1.0
    image_size: int | None = None    # the paper variant's own 227
    stored_size: int = 256
    steps: int = 40
    burn_in: int = 8
    classes: int = 1000              # the generated JPEG folder
    per_class: int = 24              # 24,000 files: enough steps at batch 256 after the burn-in
    jpeg_sides: tuple[int, int] = (333, 500)   # ImageNet's typical 500x333 / 375x500
    cifar_overrides: dict = dataclasses.field(default_factory=dict)


TINY = Sizes(batch_size=8, precision="float32", xla=False, width=0.0625, image_size=67, stored_size=72, steps=2,
             burn_in=1, classes=3, per_class=6, jpeg_sides=(80, 96),
             cifar_overrides={"dataset": "synthetic", "synthetic_samples": 64, "epochs": 1, "batch_size": 16,
                              "width": 0.125, "precision": "float32", "jit_compile": "false"})


def fit_rate(config, steps: int, burn_in: int) -> dict[str, float]:
    """Images/s of the training path's `fit` on `config`'s pipeline (timed after `burn_in` steps, to the end of
    the epoch's last step), and of the pipeline alone."""
    import keras

    from alexnet_keras.training.benchmark import images_per_second, time_steps
    from alexnet_keras.training.train import fit, prepare

    start = time.perf_counter()
    data, model = prepare(config)
    prepare_s = time.perf_counter() - start
    batches = iter(pipeline := data.train.repeat())
    pipeline_s = sum(time_steps(lambda: next(batches), steps, burn_in)) / steps

    class Clock(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == burn_in:
                self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            float(logs["loss"])   # waits for the last queued step
            self.seconds = time.perf_counter() - self.start

    fit(model, dataclasses.replace(data, train=pipeline, val=None), config, callbacks=[clock := Clock()],
        steps_per_epoch=burn_in + steps, verbose=0, track=False)
    b = config.train.batch_size
    return {"img_s": images_per_second(b, clock.seconds / steps),
            "pipeline_img_s": images_per_second(b, pipeline_s), "prepare_s": prepare_s}


def section_resident_and_memory(s: Sizes, out: Path) -> list[dict]:
    from alexnet_keras.training.benchmark import BenchmarkOptions, benchmark_and_log

    options = BenchmarkOptions(batch_size=s.batch_size, image_size=s.image_size or 227, steps=s.steps,
                               burn_in=s.burn_in, parts=("full",), precisions=(s.precision,), xla=(s.xla,),
                               width=s.width, throughput_variants=("paper",), throughput_batch_sizes=(s.batch_size,),
                               throughput_steps=s.steps, throughput_burn_in=s.burn_in)
    run_id, files = benchmark_and_log(options, experiment="device-check", run_name="device-check",
                                      output_dir=str(out / "benchmark"))
    rows = json.loads(files["results.json"])["rows"]
    timing = next(r for r in rows if r["section"] == "timing")
    through = next(r for r in rows if r["section"] == "throughput")
    return [{"section": "resident", "img_s": timing["fwdbwd_img_s"], "step_ms": timing["fwdbwd_ms"],
             "run_id": run_id},
            {"section": "memory", "img_s": through["fit_img_s"], "pipeline_img_s": through["pipeline_img_s"],
             "run_id": run_id}]


def section_jpeg(s: Sizes, out: Path, work: Path) -> list[dict]:
    from alexnet_keras.config import Config, DataConfig, ModelConfig, TrainConfig

    folder = work / "jpeg-folder"
    start = time.perf_counter()
    files = make_jpeg_folder(folder, s.classes, s.per_class, s.jpeg_sides)
    made_s = time.perf_counter() - start
    megabytes = sum(f.stat().st_size for f in folder.rglob("*.jpg")) / 2 ** 20
    config = Config(model=ModelConfig(variant="paper", width=s.width, image_size=s.image_size),
                    data=DataConfig(dataset="folder", data_dir=str(folder), recipe="paper", stored_size=s.stored_size,
                                    max_memory_mb=0, ten_crop=False, val_fraction=0.05),
                    train=TrainConfig(epochs=1, batch_size=s.batch_size, precision=s.precision, schedule="constant",
                                      jit_compile="true" if s.xla else "false"))
    rate = fit_rate(config, s.steps, s.burn_in)
    return [{"section": "jpeg", **rate, "files": files, "folder_mb": round(megabytes, 1),
             "generate_s": round(made_s, 1), "cores": os.cpu_count()}]


def section_cifar10(s: Sizes, cifar10: str | None, work: Path) -> list[dict]:
    from alexnet_keras.config import load_config
    from alexnet_keras.training.train import train_and_evaluate

    overrides = {"experiment": "device-check", "checkpoint_dir": str(work / "checkpoints"), **s.cifar_overrides}
    if cifar10:
        overrides["data_dir"] = cifar10
    config = load_config(ROOT / "experiments" / "cifar10_fast.yaml", overrides)
    start = time.perf_counter()
    result = train_and_evaluate(config)
    m = result.metrics
    return [{"section": "cifar10", "run_id": result.run_id, "wall_s": time.perf_counter() - start,
             "train_s": m.get("train_time_s"), "epoch_s": m.get("epoch_time_s"), "epochs": config.train.epochs,
             "test_accuracy": m.get("test_accuracy")}]


def section_torch(s: Sizes) -> list[dict]:
    rows = []
    for arch in ("paper", "torchvision"):
        command = [sys.executable, str(ROOT / "benchmarks" / "torchvision_reference.py"), "--arch", arch,
                   "--batch-size", str(s.batch_size), "--precision", "bf16" if "bfloat16" in s.precision else "fp32",
                   "--compile", "--json"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=240)
        if done.returncode:
            rows.append({"section": f"torch_{arch}", "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
        rows.append({"section": f"torch_{arch}", "img_s": result.get("train_img_s"), **result})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out", required=True, help="folder for device-check.csv/.md/.json and the MLflow store")
    parser.add_argument("--cifar10", help="the CIFAR-10 copy (a folder or .tar.gz); none: that section is skipped")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, for a CPU (the test)")
    parser.add_argument("--sections", default="resident,jpeg,cifar10,torch",
                        help="comma-separated subset of resident (with memory), jpeg, cifar10, torch")
    args = parser.parse_args(argv)
    sizes, out = (TINY if args.tiny else Sizes()), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(out / 'mlflow.db').resolve()}")
    wanted = set(args.sections.split(","))
    work = out / "work"
    import keras   # after the environment: KERAS_BACKEND decides

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "backend": keras.backend.backend(), "cores": os.cpu_count(),
            "device": device_name(), "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "sizes": dataclasses.asdict(sizes)}
    print(json.dumps(info), flush=True)
    rows: list[dict] = []
    sections = [("resident", lambda: section_resident_and_memory(sizes, out)),
                ("jpeg", lambda: section_jpeg(sizes, out, work)),
                ("cifar10", lambda: section_cifar10(sizes, args.cifar10, work) if args.cifar10 or args.tiny else []),
                ("torch", lambda: section_torch(sizes))]
    try:
        for name, run in sections:
            if name not in wanted:
                continue
            start = time.perf_counter()
            try:
                new = run()
            except Exception as err:   # one section's failure must not cost the others' numbers
                new = [{"section": name, "error": f"{type(err).__name__}: {err}"}]
            for row in new:
                row.setdefault("seconds", round(time.perf_counter() - start, 1))
                print(json.dumps(row, default=str), flush=True)
            rows += new
            write(out, info, rows)   # after every section: a call cut short keeps what it measured
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any("error" in r for r in rows if not r["section"].startswith("torch")) else 0


def device_name() -> str:
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return platform.processor() or platform.machine()


def write(out: Path, info: dict, rows: list[dict]) -> None:
    (out / "device-check.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1, default=str))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "device-check.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Device check, {info['date']}: {info['device']} ({info['backend']}, {info['cores']} cores)", "",
             f"`{info['command']}`", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    (out / "device-check.md").write_text("\n".join(lines) + "\n")


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
