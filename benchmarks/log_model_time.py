"""CPU and wall seconds of logging one trained model (tracking.log_keras_model), three times in one process,
on the tests' tiny configuration (32-px network at 1/8 width, 128 synthetic images), into a fresh SQLite
store in a temporary folder. Prints one line per log; benchmarks/results/log-model-time.txt keeps them.
    python benchmarks/log_model_time.py LABEL
"""

import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(label: str) -> None:
    import mlflow

    from alexnet_keras import tracking
    from alexnet_keras.training import train
    from alexnet_keras.config import load_config
    from alexnet_keras.model.inference import model_metadata

    folder = tempfile.mkdtemp(prefix="log-model-time-")
    os.chdir(folder)
    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
    config = load_config(overrides={"variant": "cifar", "width": 0.125, "dataset": "synthetic",
                                    "synthetic_samples": 128, "synthetic_classes": 4, "batch_size": 32,
                                    "epochs": 1, "init": "keras"})
    data, model = train.prepare(config)
    example = next(iter(data.val.take(1)))[0].numpy()[:4]
    with mlflow.start_run():
        for i in range(3):
            cpu, wall = time.process_time(), time.perf_counter()
            tracking.log_keras_model(model, example, metadata=model_metadata(data))
            print(f"{label} log {i}: {time.process_time() - cpu:.2f} CPU-s, {time.perf_counter() - wall:.2f} s wall",
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
