"""Backends benchmark: the trivial python program (`pass`) on every
isolation backend installed here, cold (`airlock run --backend B`) and warm
(through `airlock serve` offering all of them, from each backend's pool),
beside bare python, `runsc do`, and the OCI runtime airlock drives running a
minimal bundle of the same program, in one run.

Warm requests are paced so each backend's pool can refill between them
(what an interactive client sees); every response is checked.
"""
import argparse, http.client, json, os, shutil, statistics, subprocess, sys, tempfile, time

from cold_start import PY, machine, pct, time_once, report
from http_api import start_server

PACE = {"process": 0.03, "oci": 0.3, "gvisor": 0.5}


def oci_runtime():
    """The runtime airlock's `oci` backend picks here (runc where crun
    refuses a hybrid cgroup layout)."""
    hybrid = False
    try:
        hybrid = bool(open("/sys/fs/cgroup/unified/cgroup.controllers").read().strip())
    except OSError:
        pass
    for name in (["runc", "crun"] if hybrid else ["crun", "runc"]):
        if shutil.which(name):
            return name
    return None


def minimal_bundle(tmp):
    """A bundle of `python3 -c pass`: read-only binds of the runtime, new
    namespaces, no capabilities (what a plain OCI user would run)."""
    b = os.path.join(tmp, "bundle")
    root = os.path.join(b, "rootfs")
    os.makedirs(root)
    mounts = [{"destination": "/proc", "type": "proc", "source": "proc"},
              {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
              {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}]
    for top in ("/usr", "/bin", "/lib", "/lib64", "/sbin"):
        if os.path.islink(top):
            os.symlink(os.readlink(top), root + top)
        elif os.path.isdir(top):
            os.makedirs(root + top)
            mounts.append({"destination": top, "type": "bind", "source": top,
                           "options": ["rbind", "ro", "nosuid", "nodev"]})
    for d in ("proc", "dev", "tmp"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    ns = [{"type": t} for t in ("pid", "mount", "ipc", "uts", "network")]
    cfg = {"ociVersion": "1.0.2", "root": {"path": "rootfs", "readonly": True}, "hostname": "bench",
           "mounts": mounts,
           "process": {"terminal": False, "user": {"uid": 65534, "gid": 65534}, "args": [PY, "-c", "pass"],
                       "env": ["PATH=/usr/bin:/bin"], "cwd": "/", "noNewPrivileges": True,
                       "capabilities": {k: [] for k in ("bounding", "effective", "permitted", "inheritable", "ambient")}},
           "linux": {"namespaces": ns, "resources": {}}}
    with open(os.path.join(b, "config.json"), "w") as f:
        json.dump(cfg, f)
    return b


def warm(host, port, key, backend, n):
    conn = http.client.HTTPConnection(host, port, timeout=60)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = json.dumps({"language": "python", "code": "pass", "backend": backend})
    out = []
    for i in range(n + 3):
        time.sleep(PACE[backend])
        t = time.perf_counter()
        conn.request("POST", "/v1/executions", body, headers)
        resp = conn.getresponse()
        data = resp.read()
        dt = (time.perf_counter() - t) * 1000
        if resp.status != 200:
            sys.exit(f"{backend}: HTTP {resp.status}: {data[:300]!r}")
        rec = json.loads(data)
        if rec["reason"] != "exited" or rec["result"]["exit_code"] != 0 \
                or rec["result"]["enforced"]["backend"] != backend:
            sys.exit(f"{backend}: execution failed: {json.dumps(rec)[:500]}")
        if i >= 3:
            out.append(dt)
    return out


def pool_counts(host, port, backend):
    mc = http.client.HTTPConnection(host, port, timeout=10)
    mc.request("GET", "/metrics")
    text = mc.getresponse().read().decode()
    get = lambda m: next((l.rsplit(" ", 1)[1] for l in text.splitlines()
                          if l.startswith(f'airlock_pool_{m}_total{{backend="{backend}",language="python"}}')), "0")
    return get("hits"), get("misses")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--airlock", required=True)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--markdown-out")
    a, _ = ap.parse_known_args()
    if os.geteuid() != 0:
        print("backends benchmark: skipped (the oci and gvisor backends need root here)")
        return
    backends = ["process"]
    oci = oci_runtime()
    if oci:
        backends.append("oci")
    if shutil.which("runsc"):
        backends.append("gvisor")
    n = max(20, a.iterations // 5)
    cold = {b: [] for b in backends}
    peers = {"bare python3 -c pass": [PY, "-c", "pass"]}
    if shutil.which("runsc"):
        peers["runsc do (gVisor)"] = ["runsc", "--network=none", "do", PY, "-c", "pass"]
    with tempfile.TemporaryDirectory() as tmp:
        if oci:
            bundle = minimal_bundle(tmp)
            state = os.path.join(tmp, "state")
            # A fresh container id per run (`run` deletes it after).
            peers[f"{oci} run (minimal bundle)"] = None
        peer_times = {p: [] for p in peers}
        seq = 0
        for i in range(3 + n):
            for name, cmd in peers.items():
                if cmd is None:
                    seq += 1
                    cmd = [oci, "--root", state, "run", "--bundle", bundle, f"bench{seq}"]
                dt = time_once(cmd)
                if i >= 3:
                    peer_times[name].append(dt)
            for b in backends:
                dt = time_once([a.airlock, "run", "--backend", b, "--lang", "python", "-c", "pass"])
                if i >= 3:
                    cold[b].append(dt)
        data = os.path.join(tmp, "data")
        offer = ", ".join(f'"{b}"' for b in backends)
        srv, host, port, key = start_server(
            a.airlock, data, 0, f"[backends]\noffer = [{offer}]\n[pool]\npython = 2\njavascript = 0\n")
        try:
            time.sleep(2.0)  # every pool fills
            hot = {b: warm(host, port, key, b, n) for b in backends}
            counts = {b: pool_counts(host, port, b) for b in backends}
        finally:
            srv.terminate()
            srv.wait(timeout=60)
    base = statistics.median(peer_times["bare python3 -c pass"])
    cell = lambda xs: f"{statistics.median(xs):.1f} / {pct(xs, 99):.1f}"
    head = "| python `pass`, p50 / p99 ms | " + " | ".join(backends) + " |"
    lines = [head, "|---|" + "---:|" * len(backends),
             "| airlock run --backend B (cold, CLI) | " + " | ".join(cell(cold[b]) for b in backends) + " |",
             "| cold, vs bare python | " + " | ".join(f"{statistics.median(cold[b]) / base:.1f}x" for b in backends) + " |",
             "| HTTP API, warm from the backend's pool (paced) | " + " | ".join(cell(hot[b]) for b in backends) + " |",
             "| warm, vs bare python | " + " | ".join(f"{statistics.median(hot[b]) / base:.2f}x" for b in backends) + " |",
             "| warm pool hits / misses | " + " | ".join(f"{h} / {m}" for h, m in (counts[b] for b in backends)) + " |",
             "", "| peer (same run), p50 / p99 ms | time | vs bare python |", "|---|---:|---:|"]
    for name, xs in peer_times.items():
        lines.append(f"| {name} | {cell(xs)} | {statistics.median(xs) / base:.1f}x |")
    out = "\n".join(lines) + (
        f"\n\n{n} runs per path (+3 warm-up), cold runs interleaved with the peers; warm requests "
        f"paced ({', '.join(f'{b} {PACE[b] * 1000:.0f} ms' for b in backends)}) so each pool refills; "
        f"oci = {oci or 'none'}; machine: {machine()}\n")
    report(out, a.markdown_out)


if __name__ == "__main__":
    main()
