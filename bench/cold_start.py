"""Cold-start benchmark: trivial python and JavaScript programs, every peer,
one run.

Peers run round-robin within each iteration so machine noise hits them all
alike. Every run's exit status is checked; a failing run aborts the benchmark.
"""
import argparse, os, platform, shutil, statistics, subprocess, sys, time

PY = "/usr/bin/python3"
NODE = shutil.which("node")


def bwrap_cmd(prog):
    if not shutil.which("bwrap"):
        return None
    cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
           "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/lib", "/lib64", "/sbin"):
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--cap-drop", "ALL", *prog]
    return cmd


def runsc_cmd(prog):
    if not shutil.which("runsc"):
        return None, "not installed"
    for cmd in (["runsc", "--rootless", "--network=none", "do", *prog],
                ["runsc", "--network=none", "do", *prog]):
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        if p.returncode == 0:
            return cmd, None
        err = (p.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
    return None, err


# Every peer runs with the same minimal environment a sandbox gets: a host's
# variables (e.g. NODE_EXTRA_CA_CERTS costs node ~70 ms) must not skew the
# baselines.
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


def time_once(cmd, env=None):
    env = CLEAN_ENV if env is None else env
    t = time.perf_counter()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       env=env)
    dt = (time.perf_counter() - t) * 1000
    if p.returncode != 0:
        sys.exit(f"run failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr.decode(errors='replace')}")
    return dt


def report(out, markdown_out):
    """Prints a result and appends it to the markdown file when one is named."""
    print(out)
    if markdown_out:
        with open(markdown_out, "a") as f:
            f.write(out)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def machine():
    cpu = "unknown cpu"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, {time.strftime('%Y-%m-%d')}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--airlock", required=True)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--markdown-out")
    a = ap.parse_args()

    out = ""
    langs = [("python", "bare python3", [PY, "-c", "pass"], ["--lang", "python", "-c", "pass"])]
    if NODE:
        langs.append(("javascript", "bare node", [NODE, "-e", "0"], ["--lang", "javascript", "-c", "0"]))
    for lang, bare_name, prog, run_args in langs:
        peers = [(bare_name, prog)]
        skipped = []
        b = bwrap_cmd(prog)
        peers.append(("bwrap", b)) if b else skipped.append(("bwrap", "not installed"))
        r, why = runsc_cmd(prog)
        peers.append(("runsc (gVisor, ptrace)", r)) if r else skipped.append(("runsc", why))
        peers.append(("airlock run (cold)", [a.airlock, "run", *run_args]))
        # The same run as an unprivileged user: no cgroup (rlimits instead),
        # which isolates the cost of creating and joining a cgroup.
        if lang == "python" and os.geteuid() == 0 and shutil.which("setpriv"):
            peers.append(("airlock run (unprivileged: rlimits, no cgroup)",
                          ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                           a.airlock, "run", *run_args]))
        n = a.iterations if lang == "python" else max(20, a.iterations // 4)
        times = {name: [] for name, _ in peers}
        for i in range(a.warmup + n):
            for name, cmd in peers:
                dt = time_once(cmd)
                if i >= a.warmup:
                    times[name].append(dt)

        base = statistics.median(times[bare_name])
        lines = [f"| {lang}: peer | median ms | p99 ms | runs/s (1/mean) | median vs bare | overhead over bare |",
                 "|---|---:|---:|---:|---:|---:|"]
        for name, _ in peers:
            xs = times[name]
            med = statistics.median(xs)
            lines.append(f"| {name} | {med:.2f} | {pct(xs, 99):.2f} | {1000 / statistics.mean(xs):.1f} | "
                         f"{med / base:.2f}x | {med - base:+.2f} ms |")
        for name, why in skipped:
            lines.append(f"| {name} | skipped: {why} | | | | |")
        out += "\n".join(lines) + f"\n\n{n} iterations per peer (+{a.warmup} warm-up), " \
            f"interleaved, sequential; machine: {machine()}\n\n"
    report(out, a.markdown_out)


if __name__ == "__main__":
    main()
