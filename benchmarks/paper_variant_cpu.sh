#!/usr/bin/env bash
# Issue 23 item 4, the whole path a GPU user takes, on this CPU: a generated folder of 1,000 classes of
# JPEGs (500x333 / 333x500), a few steps of `train --variant paper --groups 2` (full width, 227 px, the paper
# recipe: 60,965,224 parameters), its peak memory (/usr/bin/time -v), then the logged model served by
# `mlflow models serve` from a folder outside the checkout with no PYTHONPATH (the model's own code), and
# asked for the top 5 of one image, with class names.
#   benchmarks/paper_variant_cpu.sh [RAW_OUTPUT]     (default: benchmarks/results/paper-variant-cpu.txt)
# Sizes: PER_CLASS=3 images per class, TRAIN_LIMIT=256 training images, BATCH=64, EPOCHS=2 (the second
# epoch's step time has no tracing in it), TEST_LIMIT=64 test images (and their ten crops).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
OUT=${1:-$ROOT/benchmarks/results/paper-variant-cpu.txt}
PER_CLASS=${PER_CLASS:-3} TRAIN_LIMIT=${TRAIN_LIMIT:-256} BATCH=${BATCH:-64} EPOCHS=${EPOCHS:-2}
TEST_LIMIT=${TEST_LIMIT:-64}
WORK=$(mktemp -d /tmp/paper-variant-cpu.XXXXXX)
SERVER=
# `mlflow models serve` runs uvicorn from PATH; the server gets a session of its own, ended with it.
export PATH=$VENV/bin:$PATH MLFLOW_TRACKING_URI=sqlite:///$WORK/mlflow.db ALEXNET_KERAS_CACHE=$WORK/cache \
  TF_CPP_MIN_LOG_LEVEL=2
trap '[ -n "$SERVER" ] && kill -- -"$SERVER" 2>/dev/null; rm -rf "$WORK"' EXIT
mkdir -p "$(dirname "$OUT")"
exec > >(tee "$OUT") 2>&1

echo "# benchmarks/paper_variant_cpu.sh, $(date -u '+%F %H:%M UTC'), tree $(git -C "$ROOT" rev-parse --short HEAD)," \
  "$(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GB, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# PER_CLASS=$PER_CLASS TRAIN_LIMIT=$TRAIN_LIMIT BATCH=$BATCH EPOCHS=$EPOCHS TEST_LIMIT=$TEST_LIMIT"
start=$(date +%s)
PYTHONPATH=$ROOT/benchmarks python -c "import sys; from jpeg_folder import make_jpeg_folder
print(make_jpeg_folder(sys.argv[1], 1000, int(sys.argv[2]), (333, 500)), 'JPEGs in 1,000 class folders')" \
  "$WORK/images" "$PER_CLASS"
echo "generated in $(( $(date +%s) - start )) s, $(du -sm "$WORK/images" | cut -f1) MB"

cd "$WORK"
echo "## alexnet-keras train (under /usr/bin/time -v)"
PYTHONPATH=$ROOT /usr/bin/time -v python -m alexnet_keras train --variant paper --groups 2 --recipe paper \
  --dataset folder --data-dir "$WORK/images" --train-limit "$TRAIN_LIMIT" --test-limit "$TEST_LIMIT" \
  --epochs "$EPOCHS" --batch-size "$BATCH" --experiment paper-variant-cpu > train.log 2>&1 \
  || { tail -40 train.log; exit 1; }
grep -E "Total params|/step|^run [0-9a-f]{32}|Elapsed \(wall|Maximum resident|Exit status" train.log
RUN=$(grep -oE "^run [0-9a-f]{32}" train.log | cut -d' ' -f2)
python - "$RUN" <<'EOF'
import sys, mlflow
run = mlflow.MlflowClient().get_run(sys.argv[1])
print("status", run.info.status, "num_params", int(run.data.metrics["num_params"]),
      {k: round(v, 4) for k, v in sorted(run.data.metrics.items()) if k.startswith(("test_", "epoch_time"))})
EOF
echo "## artifacts (bytes)"
find mlruns -type f \( -path "*/$RUN/artifacts/*" -o -path "*/models/*/artifacts/MLmodel" -o -name model.keras \) \
  -printf "%s %P\n" | sed -E "s#^([0-9]+) [^ ]*/($RUN/artifacts|models/m-[0-9a-f]+/artifacts)/#\1 #" | sort -k2

echo "## mlflow models serve -m runs:/$RUN/alexnet (no PYTHONPATH, from $WORK)"
PORT=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
start=$(date +%s.%N)
env -u PYTHONPATH setsid mlflow models serve -m "runs:/$RUN/alexnet" --env-manager local --host 127.0.0.1 \
  --port "$PORT" --workers 1 > serve.log 2>&1 &
SERVER=$!
until python -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=5)" \
    "http://127.0.0.1:$PORT/ping" 2>/dev/null; do
  kill -0 "$SERVER" 2>/dev/null || { tail -40 serve.log; exit 1; }
  sleep 1
done
echo "answering /ping after $(python -c "print(round($(date +%s.%N) - $start, 1))") s"
python - "$PORT" "$WORK/images/n00999/0000.jpg" <<'EOF'
import base64, json, sys, time, urllib.request
image = base64.b64encode(open(sys.argv[2], "rb").read()).decode()
body = {"dataframe_split": {"columns": ["image"], "data": [[image]]}, "params": {"top_k": 5}}
for attempt in ("first", "second"):
    start = time.perf_counter()
    request = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.loads(response.read())
    print(f"{attempt} request ({sys.argv[2].split('/images/')[1]}): {time.perf_counter() - start:.2f} s")
print(json.dumps(answer, indent=1))
EOF
echo "server processes' peak resident memory (VmHWM):"
for pid in $(ps -s "$SERVER" -o pid=); do
  echo "  $(grep VmHWM /proc/"$pid"/status | awk '{print $2, $3}')  $(ps -o args= -p "$pid" | cut -c1-100)"
done
