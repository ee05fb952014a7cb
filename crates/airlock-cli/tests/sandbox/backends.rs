//! The same hostile probes on every backend this machine has (the process
//! sandbox always; `oci` and `gvisor` when runc/crun and runsc are
//! installed, as `.ci/run` does), each asserting the exact outcome expected
//! of that backend: an errno can differ between the host kernel and
//! gVisor's sentry, so each row names all three. Positive controls run the
//! same probe outside first.

use super::*;

/// The backends installed here, cheapest first.
fn backends() -> Vec<&'static str> {
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
                "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        os.execvp('sleep', ['sleep', '300', '{marker}'])\n    os._exit(0)\ntime.sleep(0.2)\nprint('parent done')"
            ),
            "",
            &["--backend", b],
        );
        assert_eq!(orphan["reason"], "exited", "{b}: {orphan}");
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
