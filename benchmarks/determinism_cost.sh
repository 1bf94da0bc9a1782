#!/bin/bash
# Cost of --deterministic: same command twice without and twice with the flag, TF CPU backend.
# Run from the repository root; store in $STORE_DIR (default /tmp/detcost). Results: docs/reliability.md.
mkdir -p "${STORE_DIR:-/tmp/detcost}"
export MLFLOW_TRACKING_URI=sqlite:///${STORE_DIR:-/tmp/detcost}/mlflow.db TF_CPP_MIN_LOG_LEVEL=2
PY=${PYTHON:-.venv/bin/python}
$PY -c "import mlflow; mlflow.set_tracking_uri('sqlite:///${STORE_DIR:-/tmp/detcost}/mlflow.db'); mlflow.set_experiment('detcost')" 2>/dev/null
FLAGS="--config experiments/cifar10.yaml --data-dir ../shared/datasets/cifar10-jpeg.tar.gz --width 0.5 --train-limit 5000 --test-limit 1000 --epochs 2 --experiment detcost"
for name in default_1 deterministic_1 default_2 deterministic_2; do
  extra=""; [[ $name == deterministic* ]] && extra="--deterministic"
  /usr/bin/time -f "$name wall %e s" $PY -m alexnet_keras train $FLAGS $extra --run-name $name 2>&1 | grep -E "^run |wall"
done
