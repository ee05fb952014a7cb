"""HTTP API benchmark: a trivial python program (`pass`) through
`airlock serve`, sequentially and with concurrent clients, in one run with
its baselines (bare `python3 -c pass` and `airlock run` cold).

Each request is POST /v1/executions with wait=true on a kept-alive
connection; every response is checked (200, finished, exited, exit 0) and a
failing one aborts the benchmark. Latency is client-side, end to end.
"""
import argparse, http.client, json, os, shutil, statistics, subprocess, sys, tempfile, threading, time

from cold_start import CLEAN_ENV, PY, machine, pct, time_once, report


def start_server(airlock, data, workers, config=None):
    def admin(*args):
        p = subprocess.run([airlock, "admin", "--data-dir", data, *args], capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"airlock admin {' '.join(args)} failed: {p.stderr}")
        return p.stdout.strip()

    admin("init")
    admin("tenant", "create", "bench")
    key = admin("key", "create", "--tenant", "bench")
    log = open(os.path.join(data, "..", "server.log"), "w")
    cmd = [airlock, "serve", "--listen", "127.0.0.1:0", "--data-dir", data]
    if config:
        path = os.path.join(data, "..", "airlock.toml")
        with open(path, "w") as f:
            f.write(config)
        cmd += ["--config", path]
    if workers:
        cmd += ["--max-concurrent", str(workers)]
    srv = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                           env={**os.environ, "AIRLOCK_LOG": "warn"})
    line = srv.stdout.readline().strip()
    prefix = "airlock: listening on http://"
    if not line.startswith(prefix):
        srv.kill()
        sys.exit(f"server did not start: {line!r}")
    host, port = line[len(prefix):].rsplit(":", 1)
    return srv, host, int(port), key


class Client:
    def __init__(self, host, port, key, language="python", code="pass", handler=False):
        self.conn = http.client.HTTPConnection(host, port, timeout=60)
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        body = {"language": language, "code": code}
        if handler:
            body.update(handler=True, input={"n": 1})
        self.body = json.dumps(body)

    def run(self):
        t = time.perf_counter()
        self.conn.request("POST", "/v1/executions", self.body, self.headers)
        resp = self.conn.getresponse()
        data = resp.read()
        dt = (time.perf_counter() - t) * 1000
        if resp.status != 200:
            sys.exit(f"HTTP {resp.status}: {data[:300]!r}")
        rec = json.loads(data)
        if rec["status"] != "finished" or rec["reason"] != "exited" or rec["result"]["exit_code"] != 0:
            sys.exit(f"execution failed: {json.dumps(rec)[:500]}")
        return dt


def concurrent(host, port, key, clients, per_client):
    lat, errors = [], []
    lock = threading.Lock()

    def worker():
        c = Client(host, port, key)
        mine = []
        try:
            for _ in range(per_client):
                mine.append(c.run())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    if errors:
        sys.exit(f"concurrent run failed: {errors[0]}")
    return lat, wall


def idle_sandbox_pss_kib(server_pid):
    """PSS of each idle warm python sandbox of the server (all its processes:
    stage 1, pid 1 and the runner, from /proc/<pid>/smaps_rollup), and of the
    python zygote they were forked from (shared by all of them)."""
    procs = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = open(f"/proc/{name}/stat").read()
            cmd = open(f"/proc/{name}/cmdline", "rb").read()
        except OSError:
            continue
        procs[int(name)] = (int(stat[stat.rfind(")") + 2:].split()[1]), cmd)

    def pss(pid):
        """(PSS, USS) in KiB: USS = private pages, PSS adds a share of
        pages shared with the zygote and the other sandboxes."""
        p = u = 0
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    p = int(line.split()[1])
                elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                    u += int(line.split()[1])
        except OSError:
            pass
        return p, u

    def total(pids):
        got = [pss(x) for x in pids]
        return sum(g[0] for g in got), sum(g[1] for g in got)

    def subtree(root):
        out, todo = [], [root]
        while todo:
            p = todo.pop()
            out.append(p)
            todo.extend(c for c, (pp, _) in procs.items() if pp == p)
        return out

    zygotes = [p for p, (pp, cmd) in procs.items() if pp == server_pid and b"__airlock-zygote" in cmd]
    sandboxes, zygote_kib = [], total(zygotes)[0]
    for z in zygotes:
        for stage1 in (c for c, (pp, _) in procs.items() if pp == z):
            sandboxes.append(total(subtree(stage1)))
    # Warm sandboxes started without a zygote: the runner's init chain.
    for pid, (pp, cmd) in procs.items():
        if b"/opt/airlock/python/runner.py" not in cmd:
            continue
        chain, p = [pid], pp
        while p not in (0, 1, server_pid) and len(chain) < 4:
            chain.append(p)
            p = procs.get(p, (0, b""))[0]
        if p == server_pid:
            sandboxes.append(total(chain))
    return sandboxes, zygote_kib


def pool_memory(airlock, size):
    """PSS/USS per idle warm python sandbox with a pool of `size`."""
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        srv, host, port, key = start_server(airlock, data, 0, f"[pool]\npython = {size}\njavascript = 0\n")
        try:
            deadline = time.time() + 60
            while time.time() < deadline:
                sb, z = idle_sandbox_pss_kib(srv.pid)
                if len(sb) >= size:
                    time.sleep(0.5)
                    return idle_sandbox_pss_kib(srv.pid)
                time.sleep(0.2)
            sys.exit(f"the pool of {size} did not fill")
        finally:
            srv.terminate()
            srv.wait(timeout=60)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--airlock", required=True)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=0, help="--max-concurrent (default: the server's)")
    ap.add_argument("--markdown-out")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        srv, host, port, key = start_server(a.airlock, data, a.workers)
        try:
            bare = [time_once([PY, "-c", "pass"]) for _ in range(a.iterations // 2)]
            cold = [time_once([a.airlock, "run", "--lang", "python", "-c", "pass"])
                    for _ in range(a.iterations // 2)]
            c = Client(host, port, key)
            for _ in range(a.warmup):
                c.run()
            t = time.perf_counter()
            seq = [c.run() for _ in range(a.iterations)]
            seq_wall = time.perf_counter() - t
            # Paced (python: 30 ms, JavaScript: 80 ms between requests): time for
            # the warm pool to refill
            # (what an interactive client sees).
            paced = []
            for _ in range(max(20, a.iterations // 2)):
                time.sleep(0.03)
                paced.append(c.run())
            hc = Client(host, port, key, "python", "def handler(ax, input):\n    return input", True)
            paced_handler = []
            for _ in range(max(20, a.iterations // 2)):
                time.sleep(0.03)
                paced_handler.append(hc.run())
            # The CLI through the server: a new `airlock run --server`
            # process per execution (the client's own start-up included).
            cli_env = {**CLEAN_ENV, "AIRLOCK_API_KEY": key}
            cli = []
            for _ in range(max(20, a.iterations // 2)):
                time.sleep(0.03)
                cli.append(time_once([a.airlock, "run", "--server", f"http://{host}:{port}",
                                      "--lang", "python", "-c", "pass"], env=cli_env))
            node = shutil.which("node")
            bare_js, paced_js, paced_js_handler = [], [], []
            if node:
                bare_js = [time_once([node, "-e", "0"]) for _ in range(max(10, a.iterations // 5))]
                jc = Client(host, port, key, "javascript", "0")
                jh = Client(host, port, key, "javascript",
                            "exports.handler = (ax, input) => input;", True)
                for _ in range(max(10, a.iterations // 5)):
                    time.sleep(0.08)
                    paced_js.append(jc.run())
                    time.sleep(0.08)
                    paced_js_handler.append(jh.run())
            per = max(1, a.iterations // a.clients)
            conc, conc_wall = concurrent(host, port, key, a.clients, per)
            time.sleep(1.0)  # let the pool refill, then measure it idle
            pss, zygote_kib = idle_sandbox_pss_kib(srv.pid)
            mc = http.client.HTTPConnection(host, port, timeout=10)
            mc.request("GET", "/metrics")
            metrics = mc.getresponse().read().decode()
            pool = {l.split("{")[0].replace("airlock_pool_", ""): l.rsplit(" ", 1)[1]
                    for l in metrics.splitlines()
                    if l.startswith(("airlock_pool_hits_total{backend=\"process\",language=\"python\"}",
                                     "airlock_pool_misses_total{backend=\"process\",language=\"python\"}"))}
        finally:
            srv.terminate()
            srv.wait(timeout=60)

    base = statistics.median(bare)
    rows = [
        ("bare python3 -c pass (sequential)", bare, None),
        ("airlock run, cold (CLI, sequential)", cold, None),
        ("HTTP API, 1 client (sequential, back to back)", seq, len(seq) / seq_wall),
        ("HTTP API, 1 client (paced, pool warm)", paced, "paced"),
        ("HTTP API, python handler, 1 client (paced, pool warm)", paced_handler, "paced"),
        ("airlock run --server (CLI process per run, paced, pool warm)", cli, "paced"),
        *([("bare node -e 0 (sequential)", bare_js, None),
           ("HTTP API, JavaScript, 1 client (paced, pool warm)", paced_js, "paced"),
           ("HTTP API, JavaScript handler, 1 client (paced, pool warm)", paced_js_handler, "paced")]
          if bare_js else []),
        (f"HTTP API, {a.clients} concurrent clients", conc, len(conc) / conc_wall),
    ]
    lines = ["| path | p50 ms | p99 ms | executions/s | p50 vs bare python |",
             "|---|---:|---:|---:|---:|"]
    for name, xs, rate in rows:
        if rate == "paced":
            r = "n/a (paced)"
        else:
            r = f"{rate:.1f}" if rate else f"{1000 / statistics.mean(xs):.1f} (1/mean)"
        lines.append(f"| {name} | {statistics.median(xs):.2f} | {pct(xs, 99):.2f} | {r} | "
                     f"{statistics.median(xs) / base:.2f}x |")
    workers = a.workers or f"default ({2 * os.cpu_count()})"
    out = "\n".join(lines) + (
        f"\n\nTrivial python program through `airlock serve` (wait=true, kept-alive connections, "
        f"SQLite store, audit chain on), max_concurrent={workers}; {a.iterations} sequential "
        f"requests (+{a.warmup} warm-up), {a.clients}x{per} concurrent; warm pool (python): "
        f"{pool.get('hits_total', '0')} hits, {pool.get('misses_total', '0')} misses; "
        f"machine: {machine()}\n")
    mem = ["", "| idle warm python sandboxes (stage 1, pid 1, program) | PSS per sandbox | USS (private) per sandbox | zygote PSS |",
           "|---|---:|---:|---:|"]
    for size, (sbs, zk) in [(2, (pss, zygote_kib)), *[(n, pool_memory(a.airlock, n)) for n in (8, 32)]]:
        if sbs:
            mem.append(f"| pool of {size} | {statistics.median(x[0] for x in sbs) / 1024:.2f} MiB | "
                       f"{statistics.median(x[1] for x in sbs) / 1024:.2f} MiB | {zk / 1024:.1f} MiB |")
    out += "\n".join(mem) + "\n"
    report(out, a.markdown_out)


if __name__ == "__main__":
    main()
