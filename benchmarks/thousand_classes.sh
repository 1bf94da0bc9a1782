#!/usr/bin/env bash
# Issue 23 item 1: every command at CLASSES classes (default 10 and 1,000), as a user runs it, with a tiny
# model (the 32-px network at 1/8 width) and few images: its wall time and peak resident memory
# (/usr/bin/time), and the largest artifacts it leaves. Synthetic data for train/ablate/report/tune; a
# generated folder of CLASSES class folders of 3 small JPEGs for prepare, train on the shards (paper
# recipe, 10-crop test), predict on every image, and the logged model's answer in a fresh Python without
# PYTHONPATH (as `mlflow models serve` loads it: the package comes from the model's own code/ folder).
#   benchmarks/thousand_classes.sh [RAW_OUTPUT]     (default: benchmarks/results/thousand-classes-commands.txt)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${VENV:-$ROOT/.venv}/bin/python
OUT=${1:-$ROOT/benchmarks/results/thousand-classes-commands.txt}
WORK=$(mktemp -d /tmp/thousand-classes.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export TF_CPP_MIN_LOG_LEVEL=2
mkdir -p "$(dirname "$OUT")"
exec > >(tee "$OUT") 2>&1
echo "# benchmarks/thousand_classes.sh, $(date -u '+%F %H:%M UTC'), tree $(git -C "$ROOT" rev-parse --short HEAD)," \
  "$(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
TINY="--variant cifar --width 0.125 --init keras"

measure() {   # measure NAME COMMAND...: one line of wall time, peak memory and exit status
  local name=$1
  shift
  /usr/bin/time -o time.txt -f "%e %M %x" "$@" > "$name.log" 2>&1 || { tail -30 "$name.log"; cat time.txt; exit 1; }
  read -r wall kb status < time.txt
  printf "%-12s %5s classes  %6.1f s  peak %5d MB  exit %s\n" "$name" "$CLASSES" "$wall" $((kb / 1024)) "$status"
}

for CLASSES in ${CLASSES_LIST:-10 1000}; do
  dir=$WORK/c$CLASSES
  mkdir -p "$dir" && cd "$dir"
  export MLFLOW_TRACKING_URI=sqlite:///$dir/mlflow.db ALEXNET_KERAS_CACHE=$dir/cache PYTHONPATH=$ROOT
  synthetic="dataset: synthetic, synthetic_samples: 16, synthetic_classes: $CLASSES"
  cat > study.yaml <<EOF
name: classes-$CLASSES
experiment: classes-$CLASSES
base:
  model: {variant: cifar, width: 0.125, init: keras}
  data: {$synthetic}
  train: {epochs: 1, batch_size: 8, schedule: constant}
design: one_factor_at_a_time
seeds: [0]
axes:
  dropout: [0.5, 0.0]
nuisance: [seed]
EOF
  cat > sweep.yaml <<EOF
name: sweep-$CLASSES
experiment: classes-$CLASSES
tuner: random
objective: {name: val_accuracy, direction: max}
budget: {max_trials: 2, epochs: 1}
seed: 0
base:
  model: {variant: cifar, width: 0.125, init: keras}
  data: {$synthetic}
  train: {batch_size: 8, schedule: constant}
search_space:
  lrn: {type: boolean}
EOF
  PYTHONPATH=$ROOT/benchmarks $PY -c "import sys; from jpeg_folder import make_jpeg_folder
make_jpeg_folder(sys.argv[1], int(sys.argv[2]), 3, (40, 56))" images "$CLASSES"

  measure train $PY -m alexnet_keras train $TINY --epochs 1 --batch-size 8 --dataset synthetic \
    --synthetic-classes "$CLASSES" --synthetic-samples 16 --experiment "classes-$CLASSES"
  measure ablate $PY -m alexnet_keras ablate study.yaml
  parent=$(grep -oE "^parent run: [0-9a-f]{32}" ablate.log | cut -d' ' -f3)
  measure report $PY -m alexnet_keras report "$parent"
  measure tune $PY -m alexnet_keras tune sweep.yaml --tuner-dir tuner
  measure prepare $PY -m alexnet_keras prepare images shards --stored-size 36
  measure train-shards $PY -m alexnet_keras train $TINY --epochs 1 --batch-size 64 --dataset folder \
    --data-dir shards --recipe paper --stored-size 36 --experiment "classes-$CLASSES"
  run=$(grep -oE "^run [0-9a-f]{32}" train-shards.log | cut -d' ' -f2)
  measure predict $PY -m alexnet_keras predict --json --crops ten --model "$run" images
  files=$(find images -type f | wc -l)
  echo "         predict --json on $files images: $(wc -c < predict.log) bytes of output"
  uri=$($PY -c "import sys, mlflow; from alexnet_keras.serving import logged_model_uri
print(logged_model_uri(mlflow.get_run(sys.argv[1])))" "$run" 2>/dev/null)
  first=$(find images -name 0000.jpg | sort | tail -1)
  PYTHONPATH= measure served $PY -c "import sys, mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
print('the model code imported from', sys.modules['alexnet_keras'].__file__)
answer = model.predict(pd.DataFrame({'image': [open(sys.argv[2], 'rb').read()]}), params={'top_k': 5})
print(answer.to_json(orient='records'))" "$uri" "$first"
  grep "the model code" served.log | sed 's/^/         /'
  echo "         served answer for $first: $(tail -1 served.log | cut -c1-300)"
  echo "         largest artifacts (bytes):"
  find mlruns -type f -printf "%s %P\n" | grep -v "/code/" | sort -rn | sed -n 's/^/           /; 1,12p'
  echo "           $(stat -c %s shards/manifest.json) shards/manifest.json"
done
