"""CPU seconds per test (this process and the children it waited for), appended as JSON lines:
    CPU_PLUGIN_OUT=out.jsonl PYTHONPATH=.:benchmarks python -m pytest -n 0 -p test_cpu_plugin tests/test_x.py
results/test-cpu-per-test.jsonl: test_resume, test_ablate and part of test_train, 2026-12-06 09:10-09:30 UTC,
nice'd on the 2-core machine while seven engineers worked (wall inflated; CPU seconds much less so; daemons
that were not waited for, e.g. Ray's workers, not counted)."""
import resource, time, json, os
import pytest
OUT = os.environ.get("CPU_PLUGIN_OUT", "test-cpu.jsonl")

def _cpu():
    s = resource.getrusage(resource.RUSAGE_SELF); c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    s0, c0 = _cpu(); t0 = time.monotonic()
    yield
    s1, c1 = _cpu()
    with open(OUT, "a") as f:
        f.write(json.dumps({"test": item.nodeid, "wall": time.monotonic() - t0, "self": s1 - s0, "children": c1 - c0}) + "\n")
