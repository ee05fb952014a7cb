//! The same hostile probes on every backend this machine has (the process
//! sandbox always; `oci` and `gvisor` when runc/crun and runsc are
//! installed, as `.ci/run` does), each asserting the exact outcome expected
//! of that backend: an errno can differ between the host kernel and
//! gVisor's sentry, so each row names all three. Positive controls run the
//! same probe outside first.

use super::*;

/// The backends installed here, cheapest first.
pub fn backends() -> Vec<&'static str> {
    let has = |names: &[&str]| {
        names.iter().any(|n| {
            ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"]
                .iter()
                .any(|d| std::path::Path::new(d).join(n).is_file())
        })
    };
    let mut v = vec!["process"];
    if is_root() && has(&["crun", "runc"]) {
        v.push("oci");
    }
    if is_root() && has(&["runsc"]) {
        v.push("gvisor");
    }
    v
}

/// Which column of a row applies.
fn col(backend: &str) -> usize {
    match backend {
        "process" => 0,
        "oci" => 1,
        _ => 2,
    }
}

fn probe_on(backend: &str, probe: &str) -> Value {
    let (r, v) = inside(probe, &["--backend", backend]);
    assert_eq!(r["reason"], "exited", "{backend}: {probe}: {r}");
    assert_eq!(r["enforced"]["backend"], backend, "{r}");
    assert!(!v.is_null(), "{backend}: {probe} printed nothing: {r}");
    v
}

#[test]
fn host_files_devices_proc_and_the_agent_are_out_of_reach_on_every_backend() {
    let dir = tempfile::Builder::new()
        .prefix("airlock-host-secret")
        .tempdir_in("/var/tmp")
        .unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "top secret").unwrap();
    let secret = secret.display().to_string();
    // Positive controls: each probe works (or reaches the kernel) outside.
    assert_eq!(outside(&format!("read {secret}"))["errno"], 0);
    assert_eq!(outside(&format!("symlink_read {secret}"))["errno"], 0);
    if is_root() {
        assert_eq!(outside("read /etc/shadow")["errno"], 0);
    }
    let (eacces, enoent, erofs, eperm, exdev, enxio) = (
        libc::EACCES as i64,
        ENOENT,
        libc::EROFS as i64,
        EPERM,
        libc::EXDEV as i64,
        libc::ENXIO as i64,
    );
    // (probe, field, [process, oci, gvisor])
    let rows: Vec<(String, &str, [i64; 3])> = vec![
        (format!("read {secret}"), "errno", [enoent; 3]),
        (format!("symlink_read {secret}"), "errno", [enoent; 3]),
        ("read /etc/shadow".into(), "errno", [enoent; 3]),
        // The read-only root: the host kernel says EROFS, gVisor EACCES.
        (
            "write /usr/lib/airlock-probe-write".into(),
            "errno",
            [erofs, erofs, eacces],
        ),
        (
            "write /airlock-probe-write".into(),
            "errno",
            [erofs, erofs, eacces],
        ),
        (
            "write /proc/sys/kernel/core_pattern".into(),
            "errno",
            [erofs, erofs, eacces],
        ),
        ("write /tmp/ok".into(), "errno", [0; 3]),
        ("write /workspace/ok".into(), "errno", [0; 3]),
        ("hardlink /usr/bin/python3.11".into(), "errno", [exdev; 3]),
        ("mknod".into(), "errno", [eperm; 3]),
        ("clone_newuser".into(), "errno", [eperm; 3]),
        ("socket vsock".into(), "errno", [eperm; 3]),
        ("ptrace_child".into(), "ptrace_errno", [eperm; 3]),
        ("caps_raise".into(), "capset_errno", [eperm; 3]),
        // The agent's (or init's) memory and its control channel: init is
        // invisible; the agent's /proc entries are closed (the host
        // kernel), or its socket cannot be reopened (gVisor).
        ("read /proc/1/mem".into(), "errno", [enoent, eacces, eacces]),
        ("read /proc/1/fd/3".into(), "errno", [enoent, eacces, enxio]),
    ];
    for b in backends() {
        for (probe, field, want) in &rows {
            let v = probe_on(b, probe);
            assert_eq!(v[*field], want[col(b)], "{b}: {probe}: {v}");
        }
        let st = probe_on(b, "status");
        assert_eq!(st["Uid"], "1000\t1000\t1000\t1000", "{b}: {st}");
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd"] {
            assert_eq!(st[set], "0000000000000000", "{b}: {set}: {st}");
        }
        assert_eq!(st["Seccomp"], "2", "{b}: {st}");
        assert_eq!(probe_on(b, "fds")["fds"], serde_json::json!([0, 1, 2, 3]));
    }
}

#[test]
fn host_loopback_and_abstract_sockets_are_unreachable_on_every_backend() {
    use std::os::linux::net::SocketAddrExt;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let name = format!("airlock-backends-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let _l = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    assert_eq!(outside(&format!("connect_tcp {port}"))["errno"], 0);
    assert_eq!(outside(&format!("connect_abstract {name}"))["errno"], 0);
    for b in backends() {
        assert_eq!(
            probe_on(b, "netdev")["ifaces"],
            serde_json::json!(["lo"]),
            "{b}"
        );
        for probe in [
            format!("connect_tcp {port}"),
            format!("connect_abstract {name}"),
        ] {
            assert_eq!(
                probe_on(b, &probe)["errno"],
                libc::ECONNREFUSED as i64,
                "{b}: {probe}"
            );
        }
    }
}

#[test]
fn every_denied_syscall_is_eperm_on_every_backend() {
    for b in backends() {
        let inn = probe_on(b, "syscall_all");
        let map = inn.as_object().expect("map");
        assert!(map.len() >= 50, "{b}: {inn}");
        for (name, errno) in map {
            let want = if name == "clone3" {
                libc::ENOSYS as i64
            } else {
                EPERM
            };
            assert_eq!(errno.as_i64(), Some(want), "{b}: {name}: {inn}");
        }
    }
}

#[test]
fn limits_hold_and_nothing_is_left_behind_on_every_backend() {
    let bundles = std::path::Path::new("/run/airlock/bundles");
    let mine = |d: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(d)
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    for b in backends() {
        let before = mine(bundles);
        // Positive control, then a bomb: the memory limit holds (gVisor's
        // sentry shares the host cgroup: the limit there is the policy's
        // plus its overhead, so the bomb is bigger than both).
        let ok = run_json(
            "python",
            "b = bytearray(8 << 20); print(len(b))",
            "",
            &["--backend", b, "--memory", "64"],
        );
        assert_eq!(ok["reason"], "exited", "{b}: {ok}");
        let bomb = run_json(
            "python",
            "b = bytearray(2 << 30)\nb[::4096] = b'x' * len(b[::4096])\nprint('survived')",
            "",
            &["--backend", b, "--memory", "64"],
        );
        assert_eq!(bomb["reason"], "memory_limit", "{b}: {bomb}");
        assert!(!bomb["stdout"].as_str().unwrap().contains("survived"));
        // A fork bomb stops at the pids limit with EAGAIN: the host
        // cgroup's on the host kernel, RLIMIT_NPROC inside gVisor (where
        // the program then ends by itself).
        let bomb = run_json(
            "python",
            "import os, time\nkids = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(60)\n            os._exit(0)\n        kids += 1\nexcept OSError as e:\n    print(kids, e.errno)\n    raise SystemExit(1)\n",
            "",
            &["--backend", b, "--pids", "16"],
        );
        let want = ["pids_limit", "pids_limit", "exited"][col(b)];
        assert_eq!(bomb["reason"], want, "{b}: {bomb}");
        let out = bomb["stdout"].as_str().unwrap();
        assert!(
            out.trim().ends_with(&libc::EAGAIN.to_string()),
            "{b}: {out}"
        );
        let kids: u64 = out.split_whitespace().next().unwrap().parse().unwrap();
        assert!(kids < 16, "{b}: {kids}");
        // Filling scratch ends with ENOSPC and disk_limit.
        let fill = run_json(
            "python",
            "open('/tmp/fill', 'wb').write(b'x' * (80 << 20))",
            "",
            &["--backend", b],
        );
        assert_eq!(fill["reason"], "disk_limit", "{b}: {fill}");
        assert!(
            fill["stderr"].as_str().unwrap().contains("Errno 28"),
            "{b}: {fill}"
        );
        // The wall clock ends a program that ignores SIGTERM.
        let spin = run_json(
            "python",
            "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: pass",
            "",
            &["--backend", b, "--timeout", "1"],
        );
        assert_eq!(spin["reason"], "timeout", "{b}: {spin}");
        // A double-forked, detached orphan dies with the sandbox.
        let marker = format!("airlock-orphan-{b}-{}", std::process::id());
        let orphan = run_json(
            "python",
            &format!(
                "import glob, os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        os.execv('/usr/bin/python3', ['python3', '-c', 'import time; time.sleep(300)', '{marker}'])\n    os._exit(0)\ndef seen():\n    for p in glob.glob('/proc/[0-9]*/cmdline'):\n        try:\n            if b'{marker}' in open(p, 'rb').read():\n                return True\n        except OSError:\n            pass\n    return False\nfor _ in range(100):\n    if seen():\n        break\n    time.sleep(0.05)\nprint('orphan running' if seen() else 'no orphan')"
            ),
            "",
            &["--backend", b],
        );
        assert_eq!(orphan["reason"], "exited", "{b}: {orphan}");
        // Positive control: the orphan ran (seen inside) when its
        // sandbox's program ended.
        assert_eq!(orphan["stdout"], "orphan running\n", "{b}: {orphan}");
        std::thread::sleep(std::time::Duration::from_millis(200));
        let left: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&marker))
            .collect();
        assert!(left.is_empty(), "{b}: left running: {left:?}");
        // No bundle (and so no runtime state) outlives its sandbox: every
        // bundle there belongs to a live airlock (other tests run at the
        // same time), none to one of these runs, which have all ended.
        let stale: Vec<String> = mine(bundles)
            .into_iter()
            .filter(|n| !before.contains(n))
            .filter(|n| {
                let pid = n.split('-').next().unwrap_or("");
                !std::path::Path::new("/proc").join(pid).exists()
            })
            .collect();
        assert!(stale.is_empty(), "{b}: bundles left: {stale:?}");
    }
}

/// Tasks listed in cgroups whose directory name starts with `prefix`
/// (and in the cgroups nested in them), below `dir`.
fn cgroup_tasks(dir: &std::path::Path, prefix: &str, depth: usize) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) || depth > 6 {
            continue;
        }
        let path = e.path();
        if e.file_name().to_string_lossy().starts_with(prefix) {
            for f in ["tasks", "cgroup.threads"] {
                n += std::fs::read_to_string(path.join(f))
                    .map(|t| t.lines().count())
                    .unwrap_or(0);
            }
        }
        n += cgroup_tasks(&path, prefix, depth + 1);
    }
    n
}

/// Host processes whose command line contains `needle`.
fn host_processes_with(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(needle)
                .then(|| format!("{}: {cmd}", e.file_name().to_string_lossy()))
        })
        .collect()
}

#[test]
fn the_runtime_and_the_sandbox_die_with_a_killed_engine_and_the_next_run_reaps_the_rest() {
    for b in backends().into_iter().filter(|b| *b != "process") {
        // A sleep only this test runs (under gVisor it is not a host
        // process at all: the runtime's processes are what must go).
        let marker = format!(
            "{}.{}",
            3000 + std::process::id() % 1000,
            std::process::id()
        );
        let mut child = airlock()
            .args([
                "run",
                "--backend",
                b,
                "--timeout",
                "60",
                "--lang",
                "shell",
                "-c",
            ])
            .arg(format!("trap '' TERM; echo up; sleep {marker}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The runtime's processes carry the sandbox's name, `<engine pid>-…`.
        let name = format!("{}-", child.id());
        let runtime = || {
            host_processes_with(&name)
                .into_iter()
                .filter(|p| p.contains("runc") || p.contains("runsc"))
                .count()
        };
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "up\n", "{b}: the sandbox did not start");
        // Positive control: the runtime runs while the engine does.
        assert!(runtime() > 0, "{b}: no runtime process found");
        child.kill().unwrap(); // SIGKILL: the engine cannot clean up
        child.wait().unwrap();
        let engine = format!("{}:", child.id());
        let program = || {
            host_processes_with(&marker)
                .into_iter()
                .filter(|p| !p.starts_with(&engine))
                .count()
        };
        // Every task (thread) left in the sandbox's cgroups, in any
        // hierarchy (gVisor's sentry threads die after its leader).
        let in_cgroup = || cgroup_tasks(std::path::Path::new("/sys/fs/cgroup"), &name, 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while (runtime() > 0 || program() > 0 || in_cgroup() > 0)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(
            host_processes_with(&name)
                .into_iter()
                .filter(|p| p.contains("runc") || p.contains("runsc"))
                .collect::<Vec<_>>(),
            Vec::<String>::new(),
            "{b}: the runtime outlived its engine"
        );
        assert_eq!(program(), 0, "{b}: the program outlived its engine");
        assert_eq!(in_cgroup(), 0, "{b}: processes left in its cgroup");
        // Its bundle is left (nothing ran the teardown) until the next run
        // sees that no live engine owns it.
        let bundles = std::path::Path::new("/run/airlock/bundles");
        let left = || {
            std::fs::read_dir(bundles)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&name))
                .count()
        };
        // (Another test's run may reap it first: it is no live engine's.)
        assert!(left() <= 1, "{b}: the killed run's bundle");
        run_json("shell", "true", "", &["--backend", b]);
        assert_eq!(left(), 0, "{b}: the next run did not reap it");
    }
}

#[test]
fn the_code_cannot_kill_or_stop_the_sandboxs_pid_1_on_any_backend() {
    // The host kernel drops signals to a namespace's init that has no
    // handler (kill returns 0); gVisor delivers them, so there a filter
    // refuses them (EPERM). Either way the agent survives and reports.
    let code = "import os, signal, time\n\
        errs = []\n\
        for s in (signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP, signal.SIGINT):\n\
        \x20   try:\n\
        \x20       os.kill(1, s)\n\
        \x20       errs.append(0)\n\
        \x20   except OSError as e:\n\
        \x20       errs.append(e.errno)\n\
        try:\n\
        \x20   os.pidfd_open(1)\n\
        \x20   errs.append(0)\n\
        except OSError as e:\n\
        \x20   errs.append(e.errno)\n\
        import fcntl, socket\n\
        a, b = socket.socketpair()\n\
        fcntl.fcntl(a.fileno(), fcntl.F_SETOWN, 1)\n\
        fcntl.fcntl(a.fileno(), fcntl.F_SETFL, fcntl.fcntl(a.fileno(), fcntl.F_GETFL) | os.O_ASYNC)\n\
        try:\n\
        \x20   fcntl.fcntl(a.fileno(), 10, signal.SIGKILL)\n\
        \x20   errs.append(0)\n\
        except OSError as e:\n\
        \x20   errs.append(e.errno)\n\
        b.send(b'x')\n\
        time.sleep(0.3)\n\
        print(errs, 'alive')";
    for b in backends() {
        let r = run_json("python", code, "", &["--backend", b]);
        assert_eq!(r["reason"], "exited", "{b}: {r}");
        assert_eq!(r["exit_code"], 0, "{b}: {r}");
        let e = libc::EPERM;
        // Then SIGIO from a socket whose owner is pid 1 (F_SETSIG asking
        // for SIGKILL instead: refused under gVisor, spared init on Linux).
        let want = match b {
            "gvisor" => format!("[{e}, {e}, {e}, {e}, {e}, {e}] alive\n"),
            // A pidfd of init signals no more than kill does.
            _ => "[0, 0, 0, 0, 0, 0] alive\n".to_string(),
        };
        assert_eq!(r["stdout"], want, "{b}: {r}");
    }
}

#[test]
fn oci_and_gvisor_run_rootless_when_airlock_is_not_root() {
    let rootless: Vec<&str> = backends().into_iter().filter(|b| *b != "process").collect();
    if rootless.is_empty() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("airlock-rootless")
        .tempdir_in("/tmp")
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("airlock");
    std::fs::copy(env!("CARGO_BIN_EXE_airlock"), &bin).unwrap();
    let run_dir = dir.path().join("xdg");
    std::fs::create_dir(&run_dir).unwrap();
    std::os::unix::fs::chown(&run_dir, Some(65534), Some(65534)).unwrap();
    // gVisor without a host cgroup cannot bound memory: refused by
    // default, run only when the policy accepts the danger (and named).
    let dangerous = dir.path().join("dangerous.toml");
    std::fs::write(
        &dangerous,
        "[isolation]\nmissing_layers = \"record_dangerous\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&dangerous, std::fs::Permissions::from_mode(0o644)).unwrap();
    let unprivileged = |extra: &[&str]| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg("env")
            .arg("-i")
            .arg("PATH=/usr/bin:/bin")
            .arg(format!("XDG_RUNTIME_DIR={}", run_dir.display()))
            .arg(&bin)
            .arg("run")
            .args(extra)
            .stdin(Stdio::null());
        c
    };
    if rootless.contains(&"gvisor") {
        let out = unprivileged(&["--backend", "gvisor", "--lang", "shell", "-c", "true"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "airlock: the gvisor backend cannot enforce limits.memory_mib (no cgroup: gVisor's memory is unbounded)\n"
        );
    }
    for b in rootless {
        let policy = if b == "gvisor" {
            vec!["--policy", dangerous.to_str().unwrap()]
        } else {
            vec![]
        };
        let out = unprivileged(&policy)
            .args(["--json", "--backend", b, "--lang", "python", "-c"])
            .arg("import os\ncaps = [l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', 'CapBnd'))]\nprint(os.getuid(), *caps)\nopen('/etc/x', 'w')")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{b}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["enforced"]["backend"], b, "{r}");
        // Root inside its own user namespace (one id to map), without a
        // single capability, on the host the unprivileged user it is.
        assert_eq!(r["enforced"]["host_uid"], 65534, "{r}");
        let z = "0000000000000000";
        assert_eq!(r["stdout"], format!("0 {z} {z} {z}\n"), "{b}: {r}");
        assert!(
            r["stderr"].as_str().unwrap().contains("Errno 30")
                || r["stderr"].as_str().unwrap().contains("Errno 13"),
            "{b}: the root is writable: {r}"
        );
        assert!(r["enforced"]["cgroup"].is_null(), "{r}");
        let missing = if b == "gvisor" {
            serde_json::json!(["limits.memory_mib (no cgroup: gVisor's memory is unbounded)"])
        } else {
            serde_json::json!([])
        };
        assert_eq!(r["enforced"]["missing_layers"], missing, "{r}");
    }
}

#[test]
fn a_running_sibling_sandbox_is_invisible_on_every_backend() {
    use std::io::BufRead;
    // On each backend a first sandbox writes a marker into its scratch
    // (/tmp, /workspace, /dev/shm) and keeps a process whose command line
    // carries it running; while it runs, a second sandbox on the same
    // backend runs the same search. The search uses a pattern that matches
    // the marker without containing it, so the searching processes' own
    // command lines never match.
    let look = |marker: &str| {
        let (head, last) = marker.split_at(marker.len() - 1);
        let pattern = format!("'{head}[{last}]'");
        format!(
            "grep -rls {pattern} /tmp /workspace /dev/shm /run /var/tmp 2>/dev/null | wc -l\n\
             cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' ' | grep -c {pattern}\n\
             ls -d /proc/[0-9]* | wc -l\n"
        )
    };
    let counts = |text: &str| -> Vec<usize> {
        text.lines()
            .take(3)
            .map(|l| l.trim().parse().unwrap())
            .collect()
    };
    let mut running = Vec::new();
    for b in backends() {
        let marker = format!("airlock-sibling-{b}-{}", std::process::id());
        let mut cmd = airlock();
        cmd.args([
            "run",
            "--lang",
            "shell",
            "--backend",
            b,
            "--timeout",
            "8",
            "-c",
        ])
        .arg(format!(
            "for d in /tmp /workspace /dev/shm; do echo {marker} > $d/{marker}; done\n\
                 python3 -c 'import time; time.sleep(30)' {marker} &\n\
                 sleep 1\n{}wait\n",
            look(&marker)
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut own = String::new();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap());
        for _ in 0..3 {
            lines.read_line(&mut own).unwrap();
        }
        // Positive control: in the sibling the search finds its three
        // files and its process.
        let own = counts(&own);
        assert!(own[0] >= 3 && own[1] >= 1, "{b}: {own:?}");
        running.push((b, marker, child));
    }
    for (b, marker, _) in &running {
        let r = run_json("shell", &look(marker), "", &["--backend", b]);
        assert_eq!(r["reason"], "exited", "{b}: {r}");
        assert_eq!(r["enforced"]["backend"], *b, "{r}");
        // No file of the sibling's, no process of it; only the second
        // sandbox's own few processes are there at all.
        let seen = counts(r["stdout"].as_str().unwrap());
        assert_eq!(seen[..2], [0, 0], "{b}: {r}");
        assert!(seen[2] <= 6, "{b}: {} processes visible: {r}", seen[2]);
    }
    for (b, _, child) in running {
        // The sibling ran all along and ended at its wall clock.
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(137), "{b}: {out:?}");
    }
}

#[test]
fn airlock_run_picks_the_cheapest_backend_meeting_the_isolation_a_flag_or_policy_file_requires() {
    let bs = backends();
    let bad = |args: &[&str], envs: &[(&str, &str)]| {
        let mut cmd = airlock();
        cmd.args(["run", "--lang", "shell"])
            .args(args)
            .args(["-c", "echo ran"])
            .envs(envs.iter().copied());
        let out = output_with_stdin(cmd, b"");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{args:?}: it ran: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        err
    };
    // Positive control: asking for nothing, or for the lowest level, runs
    // the process sandbox.
    for extra in [&[][..], &["--isolation", "container"][..]] {
        let r = run_json("shell", "echo ran", "", extra);
        assert_eq!(r["stdout"], "ran\n", "{r}");
        assert_eq!(r["enforced"]["backend"], "process", "{r}");
        assert_eq!(r["enforced"]["isolation"], "container", "{r}");
    }
    assert!(
        bad(&["--isolation", "strong"], &[])
            .contains("unknown isolation level \"strong\" (expected container, gvisor or microvm)")
    );
    // microVM wanted, QEMU missing: refused naming why, nothing weaker run.
    let err = bad(
        &["--isolation", "microvm"],
        &[("AIRLOCK_QEMU", "/nonexistent/qemu")],
    );
    assert!(
        err.contains("isolation microvm is not offered here"),
        "{err}"
    );
    assert!(err.contains("microvm cannot start here"), "{err}");
    assert!(
        !bs.contains(&"gvisor") || err.contains("gvisor (gvisor)"),
        "{err}"
    );
    if !bs.contains(&"gvisor") {
        return;
    }
    // gvisor wanted by the flag or by the policy file: gVisor runs it.
    let (_d, policy) = policy_file("[isolation]\nminimum = \"gvisor\"\n");
    for extra in [&["--isolation", "gvisor"][..], &["--policy", &policy][..]] {
        let r = run_json("shell", "echo ran", "", extra);
        assert_eq!(r["stdout"], "ran\n", "{extra:?}: {r}");
        assert_eq!(r["enforced"]["backend"], "gvisor", "{r}");
        assert_eq!(r["enforced"]["isolation"], "gvisor", "{r}");
    }
    // A named backend below the minimum is refused, from the flag and from
    // the file alike.
    for extra in [
        &["--isolation", "gvisor", "--backend", "process"][..],
        &["--policy", &policy, "--backend", "process"][..],
    ] {
        let err = bad(extra, &[]);
        assert!(
            err.contains("backend process (container) at isolation gvisor is not offered here"),
            "{err}"
        );
    }
}
