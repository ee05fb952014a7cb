"""Egress proxy benchmark: latency added per HTTP request and bulk
throughput through the proxy, on loopback, in one run.

The same client code runs twice against the same upstream on 127.0.0.1:
directly on the host, and inside `airlock run` with a proxy policy (through
the forwarder on 127.0.0.1:3128 in the sandbox and the host-side proxy).
Each HTTP request uses a fresh connection (the proxy forwards one request
per connection). Bulk: a CONNECT tunnel (direct: a plain connection)
receiving --bulk-mib MiB.
"""
import argparse, json, os, socket, statistics, subprocess, sys, tempfile, threading, time

from cold_start import PY, machine, pct, report

CLIENT = r'''
import json, socket, sys, time
port, n, bulk, via = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def connect():
    if via == "proxy":
        return socket.create_connection(("127.0.0.1", 3128))
    return socket.create_connection(("127.0.0.1", port))
def request():
    s = connect()
    target = ("http://127.0.0.1:%d/" % port) if via == "proxy" else "/"
    s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target).encode())
    out = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
    s.close()
    if not out.endswith(b"ok"):
        raise SystemExit("bad response %r" % out[:100])
lat = []
for _ in range(n):
    t = time.perf_counter()
    request()
    lat.append((time.perf_counter() - t) * 1000)
s = connect()
if via == "proxy":
    s.sendall(("CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n" % port).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    if b" 200 " not in head.split(b"\r\n")[0]:
        raise SystemExit("tunnel refused: %r" % head)
t = time.perf_counter()
s.sendall(b"bulk %d\n" % (bulk << 20))  # not HTTP-shaped: the proxy refuses HTTP in tunnels
got, buf = 0, bytearray(1 << 20)
while got < bulk << 20:
    k = s.recv_into(buf)
    if not k:
        break
    got += k
secs = time.perf_counter() - t
if got < bulk << 20:
    raise SystemExit("bulk transfer cut short: %d of %d bytes" % (got, bulk << 20))
print(json.dumps({"lat": lat, "bytes": got, "secs": secs}))
'''


def upstream():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(256)
    chunk = b"x" * (1 << 20)

    def serve(c):
        with c:
            data = c.recv(4096)
            if data.startswith(b"bulk"):
                left = int(data.split()[1])
                while left > 0:
                    c.sendall(chunk[:min(left, len(chunk))])
                    left -= len(chunk)
            else:
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    def loop():
        while True:
            c, _ = srv.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return srv.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--airlock", required=True)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--bulk-mib", type=int, default=1024)
    ap.add_argument("--markdown-out")
    a = ap.parse_args()
    port = upstream()
    with tempfile.TemporaryDirectory() as tmp:
        client = os.path.join(tmp, "client.py")
        open(client, "w").write(CLIENT)
        policy = os.path.join(tmp, "policy.toml")
        open(policy, "w").write(
            '[limits]\nwall_time_ms = 120000\ncpu_time_ms = 120000\n'
            f'[network]\nmode = "proxy"\nallow_private = ["127.0.0.1:{port}"]\n')
        args = [str(port), str(a.iterations), str(a.bulk_mib)]
        direct = subprocess.run([PY, client, *args, "direct"], capture_output=True, text=True)
        if direct.returncode != 0:
            sys.exit(f"direct client failed: {direct.stderr}")
        proxied = subprocess.run(
            [a.airlock, "run", "--json", "--policy", policy, "--lang", "python", "-c",
             CLIENT.replace("sys.argv[1]", repr(args[0])).replace("sys.argv[2]", repr(args[1]))
             .replace("sys.argv[3]", repr(args[2])).replace("sys.argv[4]", repr("proxy"))],
            capture_output=True, text=True)
        if proxied.returncode != 0:
            sys.exit(f"airlock run failed: {proxied.stderr}")
        res = json.loads(proxied.stdout)
        if res["reason"] != "exited" or res["exit_code"] != 0:
            sys.exit(f"sandboxed client failed: {res['stderr'][:500]}")
    d = json.loads(direct.stdout)
    p = json.loads(res["stdout"])
    dl, pl = d["lat"], p["lat"]
    gbit = lambda r: r["bytes"] * 8 / r["secs"] / 1e9
    added = statistics.median(pl) - statistics.median(dl)
    out = "\n".join([
        "| path | request p50 ms | request p99 ms | bulk Gbit/s |",
        "|---|---:|---:|---:|",
        f"| direct on the host (no proxy) | {statistics.median(dl):.3f} | {pct(dl, 99):.3f} | {gbit(d):.2f} |",
        f"| sandbox -> forwarder -> egress proxy | {statistics.median(pl):.3f} | {pct(pl, 99):.3f} | {gbit(p):.2f} |",
    ]) + (f"\n\nAdded per request (p50): {added:.3f} ms; bulk through the proxy: "
          f"{gbit(p) / gbit(d):.2f}x of direct. {a.iterations} requests, each on a new connection, "
          f"{a.bulk_mib} MiB bulk; upstream on 127.0.0.1; machine: {machine()}\n")
    report(out, a.markdown_out)


if __name__ == "__main__":
    main()
