#!/usr/bin/env python3
"""The microVM backend, in one run: a cold boot to the result (`airlock run
--backend microvm`), a VM restored from the golden snapshot on demand (the
pool just emptied) to the result, and a warm VM from a server's pool
(restored ahead, its runner waiting for the code), for the trivial python
program, beside bare python, with the accelerator named."""

import argparse, http.client, json, os, shutil, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(__file__))
from cold_start import CLEAN_ENV, PY, machine, pct, time_once, report
from http_api import start_server


def accelerator(airlock):
    p = subprocess.run([airlock, "run", "--backend", "microvm", "--json", "--lang", "python", "-c", "pass"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, env=CLEAN_ENV)
    if p.returncode != 0:
        sys.exit(f"microvm run failed: {p.stderr}")
    return json.loads(p.stdout)["enforced"]["accelerator"]


def pool_size(host, port):
    mc = http.client.HTTPConnection(host, port, timeout=10)
    mc.request("GET", "/metrics")
    text = mc.getresponse().read().decode()
    label = 'airlock_pool_size{backend="microvm",language="python"}'
    return float(next((l.rsplit(" ", 1)[1] for l in text.splitlines() if l.startswith(label)), "0"))


def execute(conn, key):
    """One trivial execution on the microvm backend: (ms, restored)."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = json.dumps({"language": "python", "code": "pass", "isolation": "microvm"})
    for attempt in (0, 1):
        t = time.perf_counter()
        try:
            conn.request("POST", "/v1/executions", body, headers)
            resp = conn.getresponse()
            data = resp.read()
            break
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # The server closed the idle keep-alive connection while the
            # pool refilled (or the golden snapshot was made): a new one,
            # and the time measured from its request.
            conn.close()
            if attempt:
                raise
    dt = (time.perf_counter() - t) * 1000
    rec = json.loads(data)
    if resp.status != 200 or rec["reason"] != "exited" \
            or rec["result"]["enforced"]["backend"] != "microvm":
        sys.exit(f"microvm execution failed: {data[:500]!r}")
    return dt, bool(rec["result"]["enforced"].get("snapshot"))


def wait_pool(host, port, pool):
    end = time.time() + 300
    while pool_size(host, port) < pool:
        if time.time() > end:
            sys.exit("the microvm pool did not refill")
        time.sleep(0.2)


def warm_and_restored(host, port, key, n):
    """Once the golden snapshot exists: a request taking the pool's
    restored VM (warm), then at once another finding the pool empty, whose
    VM is restored on demand (restore to result)."""
    conn = http.client.HTTPConnection(host, port, timeout=300)
    end = time.time() + 600
    while True:
        wait_pool(host, port, 1)
        if execute(conn, key)[1]:
            break
        if time.time() > end:
            sys.exit("no VM was restored from a snapshot")
    hot, restored = [], []
    for _ in range(n):
        wait_pool(host, port, 1)
        dt, snap = execute(conn, key)
        if not snap:
            sys.exit("a warm VM was not restored from the snapshot")
        hot.append(dt)
        dt, snap = execute(conn, key)
        if not snap:
            sys.exit("an on-demand VM was not restored from the snapshot")
        restored.append(dt)
    return hot, restored


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--airlock", required=True)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--markdown-out")
    a, _ = ap.parse_known_args()
    if os.geteuid() != 0 or not shutil.which("qemu-system-x86_64"):
        print("microvm benchmark: skipped (needs root and qemu-system-x86)")
        return
    # A boot under software emulation takes seconds: few runs.
    n = max(3, a.iterations // 40)
    accel = accelerator(a.airlock)
    bare, cold = [], []
    for _ in range(n):
        bare.append(time_once([PY, "-c", "pass"]))
        cold.append(time_once([a.airlock, "run", "--backend", "microvm", "--lang", "python", "-c", "pass"]))
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        srv, host, port, key = start_server(
            a.airlock, data, 0,
            '[backends]\noffer = ["process", "microvm"]\npools = ["microvm"]\n'
            + ('[backends.microvm]\naccel = "tcg"\n' if accel == "tcg" else "")
            + "[pool]\npython = 1\njavascript = 0\n")
        try:
            hot, restored = warm_and_restored(host, port, key, n)
        finally:
            srv.terminate()
            srv.wait(timeout=120)
    base = statistics.median(bare)
    cell = lambda xs: f"{statistics.median(xs):.1f} / {pct(xs, 99):.1f}"
    lines = [f"| python `pass` in a microVM ({accel}), p50 / p99 ms | time | vs bare python |",
             "|---|---:|---:|",
             f"| bare python3 -c pass | {cell(bare)} | 1.0x |",
             f"| cold boot to result (`airlock run --backend microvm`) | {cell(cold)} | "
             f"{statistics.median(cold) / base:.0f}x |",
             f"| snapshot restore to result, through the HTTP API (pool empty) | {cell(restored)} | "
             f"{statistics.median(restored) / base:.1f}x |",
             f"| warm pooled VM through the HTTP API | {cell(hot)} | {statistics.median(hot) / base:.1f}x |"]
    ratio = statistics.median(cold) / statistics.median(restored)
    out = "\n".join(lines) + (
        f"\n\nRestore to result is {ratio:.1f}x faster than a cold boot (target: 10x). "
        f"{n} runs per path; the warm row waits for the pool to hold a restored VM before each "
        f"request, the restore row follows it at once (the pool is empty); "
        f"accelerator {accel}; machine: {machine()}\n")
    report(out, a.markdown_out)


if __name__ == "__main__":
    main()
