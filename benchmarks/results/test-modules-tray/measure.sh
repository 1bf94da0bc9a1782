#!/bin/bash
# measure.sh TREE MODULE -> time line, pytest summary, ray daemon cpu
TREE=$1; MOD=$2; TAG=$3
cd $TREE
export TRAY_MARK=$TAG-$MOD-$$
( /usr/bin/time -f "%e s wall %U user %S sys" env PYTHONPATH=$TREE /work/main/.venv/bin/python -m pytest -n 0 -q -p no:cacheprovider --durations=0 tests/$MOD.py > /tmp/work/tray/$TAG-$MOD.log 2>&1 ) &
sleep 1
PID=$(pgrep -f "TRAY_MARK" -n 2>/dev/null)
PYPID=$(ps -eo pid,args | grep "pytest -n 0 -q -p no:cacheprovider --durations=0 tests/$MOD.py" | grep -v -e grep -e time -e "env PYTHON" | awk '{print $1}' | head -1)
/work/main/.venv/bin/python /tmp/work/tray/raycpu.py $TRAY_MARK $PYPID > /tmp/work/tray/$TAG-$MOD.raycpu 2>&1
wait
echo "== $TAG $MOD $(date -u +%T)"; tail -1 /tmp/work/tray/$TAG-$MOD.log; grep -E "passed|failed" /tmp/work/tray/$TAG-$MOD.log | tail -1; cat /tmp/work/tray/$TAG-$MOD.raycpu
