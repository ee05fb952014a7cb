"""Nodes benchmark: executions per second and latency with 1, 2 and 3
`airlock serve` nodes on one PostgreSQL, and one node on SQLite beside one
on PostgreSQL, in one run.

Each node is its own process with its own data directory and port; the
nodes share a fresh database (made for the run, dropped after) and one
master key. Clients are spread over the nodes round robin, as a load
balancer would: each sends POST /v1/executions (a trivial python program,
wait=true) on a kept-alive connection, and every response is checked (200,
finished, exited, exit 0); a failing one aborts the benchmark. Latency is
client-side, end to end. After each PostgreSQL run the audit chain is
verified (`airlock admin audit verify`) and the executions per node are
counted, so the table also shows that the work was spread and the chain
kept whole.

All nodes run on this one machine: they share its cores, so more nodes add
coordination (one database, one audit chain) without adding CPUs. The
numbers show what the shared database costs, not how far more machines
scale.
"""
import argparse, os, secrets, subprocess, sys, tempfile, threading, time

from cold_start import machine, pct, report
from http_api import Client

PG_HOST = os.environ.get("AIRLOCK_BENCH_PGHOST", "/var/run/postgresql")
PG_USER = os.environ.get("AIRLOCK_BENCH_PGUSER", "root")


def psql(sql, db="postgres"):
    p = subprocess.run(["psql", "-h", PG_HOST, "-U", PG_USER, "-d", db, "-qAtc", sql],
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"psql failed ({sql}): {p.stderr.strip()}")
    return p.stdout.strip()


def admin(airlock, data, env, *args):
    p = subprocess.run([airlock, "admin", "--data-dir", data, *args], capture_output=True,
                       text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"airlock admin {' '.join(args)} failed: {p.stderr.strip()}")
    return p.stdout.strip()


def serve(airlock, data, env, log):
    srv = subprocess.Popen([airlock, "serve", "--listen", "127.0.0.1:0", "--data-dir", data],
                           stdout=subprocess.PIPE, stderr=log, text=True,
                           env={**env, "AIRLOCK_LOG": "warn"})
    line = srv.stdout.readline().strip()
    prefix = "airlock: listening on http://"
    if not line.startswith(prefix):
        srv.kill()
        sys.exit(f"a node did not start: {line!r} (log: {log.name})")
    host, port = line[len(prefix):].rsplit(":", 1)
    return srv, (host, int(port))


def load(addrs, key, clients, per_client, warmup):
    """`clients` clients, client i on node i mod n, each `per_client`
    executions after `warmup` of its own: (latencies ms, wall s)."""
    lat, errors = [], []
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)

    def worker(i):
        c = Client(*addrs[i % len(addrs)], key)
        mine = []
        try:
            for _ in range(warmup):
                c.run()
            ready.wait()
            for _ in range(per_client):
                mine.append(c.run())
        except SystemExit as e:
            errors.append(str(e))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))
        finally:
            with lock:
                lat.extend(mine)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    try:
        ready.wait(timeout=300)
    except threading.BrokenBarrierError:
        pass
    t = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    if errors:
        sys.exit(f"a client failed: {errors[0]}")
    return lat, wall


def run_setup(airlock, store, nodes, clients, per_client, warmup):
    """One configuration: (latencies, wall, executions per node, chain ok)."""
    master = secrets.token_hex(32)
    db = f"airlock_bench_{secrets.token_hex(6)}" if store == "postgres" else None
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("AIRLOCK_") and k != "DATABASE_URL"}
        env["AIRLOCK_MASTER_KEY"] = master
        if db:
            psql(f'CREATE DATABASE "{db}"')
            env["AIRLOCK_DATABASE_URL"] = f"postgres:///{db}?host={PG_HOST}&user={PG_USER}"
        procs = []
        try:
            dirs = [os.path.join(tmp, f"node{i}") for i in range(nodes)]
            admin(airlock, dirs[0], env, "init")
            admin(airlock, dirs[0], env, "tenant", "create", "bench")
            key = admin(airlock, dirs[0], env, "key", "create", "--tenant", "bench")
            addrs = []
            for i, d in enumerate(dirs):
                log = open(os.path.join(tmp, f"node{i}.log"), "w")
                srv, addr = serve(airlock, d, env, log)
                procs.append(srv)
                addrs.append(addr)
            lat, wall = load(addrs, key, clients, per_client, warmup)
            spread, chain = [], "n/a"
            if db:
                rows = psql("SELECT n.name, count(e.id) FROM nodes n LEFT JOIN executions e "
                            "ON e.node_id = n.id GROUP BY n.id, n.name ORDER BY n.started_at", db)
                spread = [int(r.split("|")[1]) for r in rows.splitlines() if r]
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if procs:
                v = subprocess.run([airlock, "admin", "--data-dir", dirs[0], "audit", "verify"],
                                   capture_output=True, text=True, env=env)
                chain = "verified" if v.returncode == 0 else f"BROKEN: {v.stdout}{v.stderr}"
            if db:
                psql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    if not chain.startswith("verified"):
        sys.exit(f"{store} x{nodes}: audit chain {chain}")
    return lat, wall, spread, chain


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--airlock", required=True)
    ap.add_argument("--iterations", type=int, default=200,
                    help="executions per configuration (split over the clients)")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3, help="per client")
    ap.add_argument("--markdown-out")
    a = ap.parse_args()
    per = max(1, a.iterations // a.clients)
    setups = [("sqlite", 1), ("postgres", 1), ("postgres", 2), ("postgres", 3)]
    results = []
    for store, n in setups:
        results.append((store, n, *run_setup(a.airlock, store, n, a.clients, per, a.warmup)))
    base = next(len(r[2]) / r[3] for r in results if r[0] == "sqlite")
    lines = ["| store | nodes | p50 ms | p99 ms | executions/s | vs SQLite, 1 node | executions per node |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for store, n, lat, wall, spread, _ in results:
        rate = len(lat) / wall
        lines.append(f"| {store} | {n} | {pct(lat, 50):.2f} | {pct(lat, 99):.2f} | {rate:.1f} | "
                     f"{rate / base:.2f}x | {' / '.join(map(str, spread)) if spread else 'n/a'} |")
    pg = psql("SHOW server_version")
    out = "\n".join(lines) + (
        f"\n\nA trivial python program (wait=true, kept-alive connections), {a.clients} clients "
        f"spread round robin over the nodes, {a.clients}x{per} executions per configuration "
        f"(+{a.warmup} warm-up each, counted per node); every node at its defaults "
        f"(max_concurrent {2 * os.cpu_count()}, warm pools) on this one machine, PostgreSQL {pg} "
        f"on its Unix socket; audit chain verified after every run. All nodes share these "
        f"cores: more nodes here measure the shared database's cost, not more machines' "
        f"capacity. machine: {machine()}\n")
    report(out, a.markdown_out)


if __name__ == "__main__":
    main()
