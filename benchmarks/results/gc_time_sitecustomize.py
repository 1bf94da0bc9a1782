import gc, time, atexit, sys, os
if os.environ.get("GCT"):
    t = {"start": 0.0, "total": 0.0, "n2": 0, "t2": 0.0}
    def cb(phase, info):
        if phase == "start":
            t["start"] = time.process_time()
        else:
            d = time.process_time() - t["start"]
            t["total"] += d
            if info["generation"] == 2:
                t["n2"] += 1; t["t2"] += d
    gc.callbacks.append(cb)
    atexit.register(lambda: sys.stderr.write(f"GCT total={t['total']:.2f}s gen2 n={t['n2']} t={t['t2']:.2f}s cpu={time.process_time():.1f}\n"))
