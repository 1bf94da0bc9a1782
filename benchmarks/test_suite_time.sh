#!/usr/bin/env bash
# The test suite's time, before and after a change, in one sitting: README "Tests" reads its rows.
#   bash benchmarks/test_suite_time.sh BEFORE_COMMIT "what runs beside it"   (BEFORE_COMMIT "-": this tree only)
# Runs BEFORE_COMMIT's suite (a git worktree, its own pytest options, PYTHONPATH on it so its package
# is the one imported, also by the subprocesses its tests start), then this working tree's tests of the
# modules BEFORE_COMMIT had (like for like: the tests added to them since count too; the modules added
# since, for later features, do not), then this working tree's whole suite, each as
# `/usr/bin/time -v python -m pytest -q` with this checkout's .venv, and appends one row per suite to
# benchmarks/results/test-suite-time.csv, and each test's time to a JUnit XML beside the log.
# Logs: benchmarks/results/logs/suite-*.log and .xml (not in git).
set -euo pipefail
cd "$(dirname "$0")/.."
before=${1:?usage: test_suite_time.sh BEFORE_COMMIT [BACKGROUND]}
background=${2:-nothing (an idle machine)}
python=$PWD/.venv/bin/python
csv=$PWD/benchmarks/results/test-suite-time.csv
logs=$PWD/benchmarks/results/logs
mkdir -p "$logs"
[ -f "$csv" ] || echo "date,tree,started_utc,tests_passed,tests_failed,skipped,wall_s,pytest_s,user_cpu_s,system_cpu_s,log,background" > "$csv"

if [ "$before" != - ]; then
    tree=$(mktemp -d /tmp/suite-before-XXXX)
    git worktree add --detach "$tree" "$before" >/dev/null
    trap 'git worktree remove --force "$tree"' EXIT
fi

run_suite() {   # label folder pythonpath [test files]
    local label=$1 folder=$2 pythonpath=$3 log
    shift 3
    log=$logs/suite-$(date -u +%H%M%S).log
    local started
    started=$(date -u +%T)
    (cd "$folder" && PYTHONPATH=$pythonpath /usr/bin/time -v "$python" -m pytest -q -p no:cacheprovider \
        --junitxml="${log%.log}.xml" "$@") > "$log" 2>&1 || true
    "$python" - "$log" "$label" "$started" "$background" >> "$csv" <<'EOF'
import csv, re, sys, datetime
log, label, started, background = sys.argv[1:]
text = open(log, errors="replace").read()
summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed)", line) and " in " in line][-1]
def count(word):
    m = re.search(rf"(\d+) {word}", summary)
    return int(m.group(1)) if m else 0
wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", text)
h, m, s = (float(x) if x else 0.0 for x in wall.groups())
pytest_s = re.findall(r" in ([\d.]+)s", summary)
user = re.search(r"User time \(seconds\): ([\d.]+)", text).group(1)
system = re.search(r"System time \(seconds\): ([\d.]+)", text).group(1)
csv.writer(sys.stdout, lineterminator="\n").writerow([
    datetime.date.today().isoformat(), label, started, count("passed"), count("failed"), count("skipped"),
    f"{3600 * h + 60 * m + s:.1f}", pytest_s[-1] if pytest_s else "", user, system,
    log.rsplit("/", 1)[-1].removesuffix(".log"), background])
EOF
    tail -n 1 "$csv"
}

if [ "$before" != - ]; then
    run_suite "$(git rev-parse --short "$before") (before)" "$tree" "$tree"
    same_modules=()
    for file in tests/test_*.py; do
        if [ -f "$tree/$file" ]; then same_modules+=("$file"); fi
    done
    all_modules=(tests/test_*.py)
    # Like for like only when this tree has modules the before tree lacked; else it is the whole suite.
    if [ "${#same_modules[@]}" -lt "${#all_modules[@]}" ]; then
        run_suite "$(git rev-parse --short HEAD) working tree (after), the ${#same_modules[@]} test modules $(git rev-parse --short "$before") had" \
            "$PWD" "$PWD" "${same_modules[@]}"
    fi
fi
run_suite "$(git rev-parse --short HEAD) working tree (after)" "$PWD" "$PWD"
