# Minimal image: the package on TensorFlow's GPU base. (Docker cannot build on the development
# machines; issue 8 adds linting, pinning by digest and an MLproject docker_env.)
FROM tensorflow/tensorflow:2.21.0-gpu

RUN useradd --create-home --uid 1000 alexnet
WORKDIR /home/alexnet/app
COPY --chown=alexnet:alexnet pyproject.toml README.md ./
COPY --chown=alexnet:alexnet alexnet_keras ./alexnet_keras
RUN pip install --no-cache-dir .
COPY --chown=alexnet:alexnet experiments ./experiments
USER alexnet
ENTRYPOINT ["alexnet-keras"]
CMD ["train", "--help"]
