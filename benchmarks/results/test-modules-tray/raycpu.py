"""Sample CPU of every process whose environment has TRAY_MARK=<mark> (Ray daemons, workers, servers),
except the pytest process given. Prints the sum of the last-seen cpu_times (user+sys) per pid at the end
(when the pytest pid has exited)."""
import sys, time, psutil
mark, pytest_pid = sys.argv[1], int(sys.argv[2])
seen = {}   # pid -> (name, cpu)
def marked(p):
    try:
        return p.environ().get("TRAY_MARK") == mark
    except psutil.Error:
        return False
known = set()
while psutil.pid_exists(pytest_pid) or any(psutil.pid_exists(p) for p in list(seen)[:0]):
    for p in psutil.process_iter(["name"]):
        if p.pid == pytest_pid:
            continue
        if p.pid not in known and not marked(p):
            continue
        known.add(p.pid)
        try:
            t = p.cpu_times()
            seen[(p.pid, p.create_time())] = (p.info["name"], " ".join(p.cmdline())[:80], t.user + t.system)
        except psutil.Error:
            pass
    time.sleep(0.5)
by = {}
for (pid, _), (name, cmd, cpu) in seen.items():
    key = "alexnet_keras cmd" if "alexnet_keras" in cmd and "-m" in cmd else name
    by[key] = by.get(key, 0) + cpu
tot = sum(by.values())
print(f"non-pytest marked processes: {tot:.1f} s CPU; " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:10]))
