# alexnet-keras on TensorFlow's GPU image: `docker build -t alexnet-keras:0.1.0 .` (the tag is the package
# version; deploy/docker/MLproject runs that image), then `docker run --gpus all alexnet-keras:0.1.0 train ...`.
# Pinned base (a release tag; pin by digest where your registry mirror allows). Docker cannot build on
# the development machines: tests/test_packaging.py lints this file with hadolint instead.
FROM tensorflow/tensorflow:2.21.0-gpu

# An unprivileged user owns the app and the MLflow store it writes (./mlflow.db, ./mlruns).
RUN useradd --create-home --uid 1000 alexnet
WORKDIR /home/alexnet/app
COPY --chown=1000:1000 pyproject.toml README.md ./
COPY --chown=1000:1000 alexnet_keras ./alexnet_keras
RUN pip install --no-cache-dir . && chown 1000:1000 /home/alexnet/app
COPY --chown=1000:1000 experiments ./experiments
COPY --chown=1000:1000 MLproject python_env.yaml ./
USER 1000:1000
ENTRYPOINT ["alexnet-keras"]
CMD ["train", "--help"]
