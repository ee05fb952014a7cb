# Hostile probes, run both outside the sandbox (positive control) and inside.
# Reads "NAME [ARG...]" from stdin and prints one JSON object on stdout.
# Every probe reports what the kernel answered (errno, data, signal-free
# return values) so the Rust tests can assert exact outcomes.
import ctypes, errno, json, os, socket, struct, sys

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.syscall.argtypes = [ctypes.c_long] + [ctypes.c_ulong] * 6

NR = dict(
    ptrace=101, process_vm_readv=310, process_vm_writev=311, kexec_load=246, kexec_file_load=320,
    init_module=175, finit_module=313, delete_module=176, mount=165, umount2=166, pivot_root=155,
    chroot=161, fsopen=430, fsconfig=431, fsmount=432, fspick=433, open_tree=428, move_mount=429,
    mount_setattr=442, unshare=272, setns=308, setuid=105, setgid=106, setreuid=113, setregid=114,
    setresuid=117, setresgid=119, setfsuid=122, setfsgid=123, setgroups=116, capset=126, bpf=321,
    userfaultfd=323, perf_event_open=298, keyctl=250, add_key=248, request_key=249,
    io_uring_setup=425, io_uring_enter=426, io_uring_register=427, name_to_handle_at=303,
    open_by_handle_at=304, reboot=169, swapon=167, swapoff=168, acct=163, syslog=103,
    settimeofday=164, clock_settime=227, clock_adjtime=305, adjtimex=159, quotactl=179,
    clone3=435, getpid=39, ioctl=16, clone=56,
)
NOPE = b"/nonexistent-airlock-probe\0"

def raw(nr, *args):
    buf = []
    conv = []
    for a in args:
        if isinstance(a, bytes):
            b = ctypes.create_string_buffer(a)
            buf.append(b)
            conv.append(ctypes.addressof(b))
        else:
            conv.append(a & 0xFFFFFFFFFFFFFFFF)
    conv += [0] * (6 - len(conv))
    ctypes.set_errno(0)
    r = libc.syscall(nr, *conv)
    return {"ret": r, "errno": ctypes.get_errno() if r == -1 else 0}

# Harmless or invalid arguments: outside (as root) each call reaches the
# kernel and fails for an argument reason or succeeds without side effects.
SYSCALL_ARGS = {
    "ptrace": (16, 999999),                  # PTRACE_ATTACH to a pid that does not exist
    "process_vm_readv": (os.getpid(), 0, 0, 0, 0, 0),
    "process_vm_writev": (os.getpid(), 0, 0, 0, 0, 0),
    "kexec_load": (0, 9999, 0, 0),            # too many segments
    "kexec_file_load": (-1, -1, 0, 0, 0),
    "init_module": (0, 0, b""),
    "finit_module": (-1, b"", 0),
    "delete_module": (b"airlock_no_such_module", 0o4000),
    "mount": (b"none", NOPE, b"tmpfs", 0, 0),
    "umount2": (NOPE, 0),
    "pivot_root": (NOPE, NOPE),
    "chroot": (NOPE,),
    "fsopen": (b"airlock_no_such_fs", 0),
    "fsconfig": (-1, 0, 0, 0, 0),
    "fsmount": (-1, 0, 0),
    "fspick": (-1, NOPE, 0),
    "open_tree": (-100, NOPE, 0),
    "move_mount": (-1, b"", -1, b"", 0),
    "mount_setattr": (-1, b"", 0, 0, 0),
    "unshare": (0,),
    "setns": (-1, 0),
    "setuid": (os.getuid(),),
    "setgid": (os.getgid(),),
    "setreuid": (-1, -1),
    "setregid": (-1, -1),
    "setresuid": (-1, -1, -1),
    "setresgid": (-1, -1, -1),
    "setgroups": (0, 0) if os.getuid() == 0 else (99999999, 0),
    "capset": (0, 0),
    "bpf": (9999, 0, 0),
    "userfaultfd": (0o2000000,),
    "perf_event_open": (0, 0, -1, -1, 0),
    "keyctl": (9999, 0, 0, 0, 0),
    "add_key": (0, 0, 0, 0, 0),
    "request_key": (0, 0, 0, 0),
    "io_uring_setup": (0, 0),
    "io_uring_enter": (-1, 0, 0, 0, 0, 0),
    "io_uring_register": (-1, 0, 0, 0),
    "name_to_handle_at": (-100, NOPE, 0, 0, 0),
    "open_by_handle_at": (-1, 0, 0),
    "reboot": (0, 0, 0, 0),                  # wrong magic: EINVAL outside
    "swapon": (NOPE, 0),
    "swapoff": (NOPE,),
    "acct": (NOPE,),
    "syslog": (10, 0, 0),                    # SYSLOG_ACTION_SIZE_BUFFER: read-only query
    "settimeofday": (0, 0),                  # NULL, NULL: no change
    "clock_settime": (9999, 0),
    "clock_adjtime": (9999, 0),
    "adjtimex": (0,),
    "quotactl": (0, 0, 0, 0),
    "clone3": (0, 0),
}

def p_syscall(name):
    return raw(NR[name], *SYSCALL_ARGS[name])

def p_syscall_all(_=None):
    return {name: raw(NR[name], *args)["errno"] for name, args in SYSCALL_ARGS.items()}

def p_x32_getpid(_=None):
    return raw(0x40000000 | NR["getpid"])

def p_clone_newuser(_=None):
    # clone(CLONE_NEWUSER|SIGCHLD): if it were allowed the child would return 0.
    r = raw(NR["clone"], 0x10000000 | 17, 0, 0, 0, 0)
    if r["ret"] == 0:
        os._exit(0)
    if r["ret"] > 0:
        os.waitpid(r["ret"], 0)
    return r

def p_tiocsti(arg):
    req = {"plain": 0x5412, "high": 0x5412 | (1 << 32), "linux": 0x541C}[arg]
    c = ctypes.c_char(b"x")
    return raw(NR["ioctl"], 0, req, ctypes.addressof(c))

def p_int80(_=None):
    import mmap
    code = bytes([0xb8, 20, 0, 0, 0, 0xcd, 0x80, 0xc3])   # mov eax,20 (i386 getpid); int 0x80; ret
    m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    m.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    f = ctypes.CFUNCTYPE(ctypes.c_long)(addr)
    return {"ret": f(), "survived": True}

def p_socket(arg):
    fam, typ = {"vsock": (40, 1), "packet": (17, 3), "alg": (38, 5), "raw": (2, 3), "netlink": (16, 3),
                "inet": (2, 1), "unix": (1, 1)}[arg]
    try:
        s = socket.socket(fam, typ, 1 if arg == "raw" else 0)
        s.close()
        return {"errno": 0}
    except OSError as e:
        return {"errno": e.errno}

def p_read(path):
    try:
        with open(path, "rb") as f:
            data = f.read(4096)
        return {"errno": 0, "len": len(data)}
    except OSError as e:
        return {"errno": e.errno}

def p_write(path):
    try:
        with open(path, "wb") as f:
            f.write(b"x")
        os.unlink(path)
        return {"errno": 0}
    except OSError as e:
        return {"errno": e.errno}

def p_write_same(path):
    # Writes a file's current content back: no change outside, denied inside.
    try:
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data)
        return {"errno": 0}
    except OSError as e:
        return {"errno": e.errno}

def p_stat(path):
    try:
        st = os.stat(path)
        return {"errno": 0, "rdev": st.st_rdev, "mode": st.st_mode}
    except OSError as e:
        return {"errno": e.errno}

def p_symlink_read(target):
    d = os.environ.get("TMPDIR", "/tmp")
    link = os.path.join(d, "airlock-probe-link-%d" % os.getpid())
    os.symlink(target, link)
    try:
        return p_read(link)
    finally:
        os.unlink(link)

def p_hardlink(target):
    d = os.environ.get("TMPDIR", "/tmp")
    link = os.path.join(d, "airlock-probe-hl-%d" % os.getpid())
    try:
        os.link(target, link)
        os.unlink(link)
        return {"errno": 0}
    except OSError as e:
        return {"errno": e.errno}

def p_mknod(_=None):
    d = os.environ.get("TMPDIR", "/tmp")
    path = os.path.join(d, "airlock-probe-null-%d" % os.getpid())
    try:
        os.mknod(path, 0o20666, os.makedev(1, 3))
        os.unlink(path)
        return {"errno": 0}
    except OSError as e:
        return {"errno": e.errno}

def p_uname(_=None):
    return {"release": os.uname().release}

def p_status(_=None):
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh", "NoNewPrivs", "Seccomp", "Uid"):
            out[k] = v.strip()
    return out

def p_ptrace_child(_=None):
    pid = os.fork()
    if pid == 0:
        import time
        time.sleep(5)
        os._exit(0)
    r = raw(NR["ptrace"], 16, pid)   # PTRACE_ATTACH
    buf = ctypes.create_string_buffer(8)
    iov_l = struct.pack("QQ", ctypes.addressof(buf), 8)
    src = ctypes.create_string_buffer(8)
    iov_r = struct.pack("QQ", ctypes.addressof(src), 8)
    bl = ctypes.create_string_buffer(iov_l); br = ctypes.create_string_buffer(iov_r)
    v = raw(NR["process_vm_readv"], pid, ctypes.addressof(bl), 1, ctypes.addressof(br), 1, 0)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return {"ptrace_errno": r["errno"], "vm_readv_errno": v["errno"], "vm_readv_ret": v["ret"]}

def p_caps_raise(_=None):
    hdr = struct.pack("Ii", 0x20080522, 0)
    data = struct.pack("IIIIII", 1 << 21, 1 << 21, 0, 0, 0, 0)   # CAP_SYS_ADMIN
    h = ctypes.create_string_buffer(hdr); d = ctypes.create_string_buffer(data)
    r = raw(NR["capset"], ctypes.addressof(h), ctypes.addressof(d))
    amb = libc.prctl(47, 2, 21, 0, 0)   # PR_CAP_AMBIENT_RAISE CAP_SYS_ADMIN
    return {"capset_errno": r["errno"], "ambient_ret": amb, "ambient_errno": ctypes.get_errno()}

def p_fds(_=None):
    return {"fds": sorted(int(x) for x in os.listdir("/proc/self/fd"))}

def p_env(_=None):
    init_env = p_read("/proc/1/environ")
    return {"env": dict(os.environ), "proc1_environ_errno": init_env.get("errno")}

def p_ids(_=None):
    return {"pid": os.getpid(), "hostname": socket.gethostname(),
            "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}

def p_shm_lookup(key):
    libc.shmget.restype = ctypes.c_int
    ctypes.set_errno(0)
    r = libc.shmget(int(key), 0, 0)
    return {"ret": r, "errno": ctypes.get_errno() if r == -1 else 0}

def p_netdev(_=None):
    names = [l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:]]
    return {"ifaces": names}

def p_connect_tcp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", int(port)))
        return {"errno": 0}
    except OSError as e:
        return {"errno": e.errno}
    finally:
        s.close()

def p_connect_abstract(name):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect("\0" + name)
        return {"errno": 0}
    except OSError as e:
        return {"errno": e.errno}
    finally:
        s.close()

def p_mountinfo(_=None):
    return {"mountinfo": open("/proc/self/mountinfo").read()}

def p_exec(_=None):
    try:
        pid = os.fork()
        if pid == 0:
            try:
                os.execv("/usr/bin/python3", ["python3", "-c", "raise SystemExit(7)"])
            except OSError as e:
                os._exit(100 + e.errno)
        _, st = os.waitpid(pid, 0)
        return {"status": os.waitstatus_to_exitcode(st)}
    except OSError as e:
        return {"errno": e.errno}

PROBES = {k[2:]: v for k, v in globals().items() if k.startswith("p_")}

def main():
    # One probe per line, one JSON line each (a backend whose sandboxes are
    # slow to start runs a batch in one).
    for line in sys.stdin.read().splitlines():
        words = line.split()
        if not words:
            continue
        name, args = words[0], words[1:]
        res = PROBES[name](*args)
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()

main()
