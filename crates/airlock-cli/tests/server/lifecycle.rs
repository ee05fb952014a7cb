//! Crash recovery and graceful shutdown, with leftovers checked on the host.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::{Server, admin, is_root};

/// Host pids whose command line is exactly `argv`.
fn pids_with_cmdline(argv: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want) {
            out.push(pid);
        }
    }
    out
}

/// Sandbox cgroup directories of the engine with pid `owner`: every
/// `airlock/<owner>-<n>` under the owner's own cgroup in each hierarchy.
pub(crate) fn sandbox_cgroups(owner: u32, own_cgroup_of: u32) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{own_cgroup_of}/cgroup")).unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctrls, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or("/"));
        let mounts: Vec<PathBuf> = if ctrls.is_empty() {
            vec!["/sys/fs/cgroup/unified".into(), "/sys/fs/cgroup".into()]
        } else {
            vec![format!("/sys/fs/cgroup/{ctrls}").into()]
        };
        for m in mounts {
            for base in [
                m.join(path.trim_start_matches('/')).join("airlock"),
                m.join("airlock"),
            ] {
                if let Ok(rd) = std::fs::read_dir(&base) {
                    for e in rd.flatten() {
                        if e.file_name()
                            .to_string_lossy()
                            .starts_with(&format!("{owner}-"))
                        {
                            out.push(e.path());
                        }
                    }
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn restart_after_kill_9_fails_running_executions_and_reaps_leftovers() {
    let mut s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let marker = ["sleep", "987654"];
    assert!(
        pids_with_cmdline(&marker).is_empty(),
        "stale marker process"
    );
    let r = s.post(
        "/v1/executions",
        &key,
        json!({"language": "shell", "code": "sleep 987654", "wait": false, "limits": {"wall_time_ms": 60000}}),
    );
    let id = r.json()["id"].as_str().unwrap().to_string();
    s.wait_status(&key, &id, &["running"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pids_with_cmdline(&marker).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "sandboxed program never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let server_pid = s.pid();
    // Positive control: the sandbox's process and cgroups exist on the host.
    let cgroups = sandbox_cgroups(server_pid, server_pid);
    if is_root() {
        assert!(
            !cgroups.is_empty(),
            "no sandbox cgroup found for the running execution"
        );
    }
    let mounts_before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();

    s.crash();
    // The crash itself leaves the cgroups behind (this is what restart must
    // clean up); the processes die with their supervisor (PDEATHSIG).
    for c in &cgroups {
        assert!(c.exists(), "{} vanished before restart", c.display());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !pids_with_cmdline(&marker).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "sandbox outlived its server"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    s.start();
    let v = s.wait_status(&key, &id, &["failed"]);
    assert_eq!(v["reason"], "server_restart", "{v}");
    assert!(v["finished_at"].is_string());
    for c in &cgroups {
        assert!(
            !c.exists(),
            "leftover cgroup {} was not reaped",
            c.display()
        );
    }
    assert!(sandbox_cgroups(server_pid, s.pid()).is_empty());
    assert!(pids_with_cmdline(&marker).is_empty());
    // No mount of the sandbox ever appeared in the host's namespace.
    // (Session workspaces of servers other tests run come and go: not
    // counted.)
    let mounts_after = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let count = |m: &str| {
        m.lines()
            .filter(|l| !l.contains(" airlock-session "))
            .count()
    };
    assert_eq!(count(&mounts_before), count(&mounts_after));
    assert!(s.log().contains("recovered from an unclean stop"));
    let audit = s.get("/v1/audit?limit=500", &key).json();
    let fin = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "execution.finish" && e["subject"] == id.as_str())
        .expect("finish audited");
    assert_eq!(fin["detail"]["reason"], "server_restart");
    // And the restarted server works.
    assert_eq!(s.run(&key, "shell", "echo ok")["result"]["stdout"], "ok\n");
    let (st, _) = s.terminate();
    assert!(st.success());
    assert_eq!(
        admin(&s.data(), &["audit", "verify"]).status.code(),
        Some(0)
    );
}

#[test]
fn sigterm_drains_then_kills_with_server_shutdown() {
    let mut s = Server::start_with(&["--max-concurrent", "1", "--shutdown-grace-ms", "500"]);
    let key = s.tenant("acme");
    let long = s.post(
        "/v1/executions",
        &key,
        json!({"language": "shell", "code": "sleep 50", "wait": false, "limits": {"wall_time_ms": 60000}}),
    );
    let long_id = long.json()["id"].as_str().unwrap().to_string();
    s.wait_status(&key, &long_id, &["running"]);
    let queued = s.post(
        "/v1/executions",
        &key,
        json!({"language": "shell", "code": "echo never", "wait": false}),
    );
    let queued_id = queued.json()["id"].as_str().unwrap().to_string();
    let (st, took) = s.terminate();
    assert!(st.success(), "exit status {st:?}: {}", s.log());
    assert!(took < Duration::from_secs(10), "drain took {took:?}");
    assert!(s.log().contains("grace period over"));

    s.start();
    assert!(
        !s.log().contains("recovered from an unclean stop"),
        "drain left work unfinished"
    );
    let v = s.get(&format!("/v1/executions/{long_id}"), &key).json();
    assert_eq!(
        (v["status"].as_str(), v["reason"].as_str()),
        (Some("finished"), Some("server_shutdown")),
        "{v}"
    );
    assert_eq!(v["result"]["signal"], 9);
    let v = s.get(&format!("/v1/executions/{queued_id}"), &key).json();
    assert_eq!(
        (v["status"].as_str(), v["reason"].as_str()),
        (Some("failed"), Some("server_shutdown")),
        "{v}"
    );
    assert!(
        v["started_at"].is_null(),
        "the queued one must never have started"
    );
    // Every step is in the audit log, and the chain is intact.
    let audit = s.get("/v1/audit?limit=500", &key).text();
    assert_eq!(audit.matches("\"execution.finish\"").count(), 2, "{audit}");
    let (st, _) = s.terminate();
    assert!(st.success());
    let out = admin(&s.data(), &["audit", "verify"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sigterm_lets_running_executions_finish_within_grace() {
    let mut s = Server::start_with(&["--shutdown-grace-ms", "10000"]);
    let key = s.tenant("acme");
    let r = s.post(
        "/v1/executions",
        &key,
        json!({"language": "shell", "code": "sleep 1; echo finished-in-grace", "wait": false}),
    );
    let id = r.json()["id"].as_str().unwrap().to_string();
    s.wait_status(&key, &id, &["running"]);
    let (st, took) = s.terminate();
    assert!(st.success());
    assert!(took < Duration::from_secs(8), "{took:?}");
    s.start();
    let v = s.get(&format!("/v1/executions/{id}"), &key).json();
    assert_eq!(v["reason"], "exited", "{v}");
    assert_eq!(v["result"]["stdout"], "finished-in-grace\n");
}

#[test]
fn one_server_per_data_directory_and_wrong_master_key_refused() {
    let s = Server::start_with(&[]);
    let _key = s.tenant("acme");
    let out = std::process::Command::new(crate::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(s.data())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("another airlock server"));
    // Admin commands with another master key fail closed.
    let out = std::process::Command::new(crate::BIN)
        .args(["admin", "--data-dir"])
        .arg(s.data())
        .args(["tenant", "list"])
        .env("AIRLOCK_MASTER_KEY", "ab".repeat(32))
        .envs(crate::store::url_for(&s.data()).map(|u| ("AIRLOCK_DATABASE_URL", u)))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("master key does not match"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn half_sent_requests_neither_block_shutdown_nor_slip_in_during_drain() {
    use std::io::{Read, Write};
    let mut s = Server::start_with(&["--shutdown-grace-ms", "1000"]);
    let key = s.tenant("acme");
    // A request head that never ends (slowloris) ...
    let mut stalled = std::net::TcpStream::connect(s.addr).unwrap();
    stalled
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // ... and an execution whose body is still arriving when SIGTERM comes.
    let body =
        json!({"language": "shell", "code": "echo should-not-run", "wait": false}).to_string();
    let mut late = std::net::TcpStream::connect(s.addr).unwrap();
    late.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        late,
        "POST /v1/executions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        body.len(),
        &body[..10]
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let pid = libc::pid_t::try_from(s.pid()).unwrap();
    // SAFETY: our own child, not yet waited for; kill has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    std::thread::sleep(Duration::from_millis(500));
    late.write_all(&body.as_bytes()[10..]).unwrap();
    let mut resp = Vec::new();
    let _ = late.read_to_end(&mut resp);
    let r = crate::parse_response(&resp);
    r.problem(503, "shutting_down");
    let t = std::time::Instant::now();
    let st = s.child.as_mut().unwrap().wait().unwrap();
    s.child = None;
    assert!(st.success(), "{st:?}");
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "the stalled client held the server"
    );
    drop(stalled);
    // Nothing ran.
    s.start();
    assert_eq!(
        s.get("/v1/executions", &key).json()["executions"],
        json!([])
    );
}

#[test]
fn admin_commands_refuse_a_mistyped_data_directory_instead_of_creating_one() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("airlok-data");
    for args in [
        &["tenant", "list"][..],
        &["key", "list", "--tenant", "acme"],
        &["audit", "verify"],
        &["tenant", "create", "acme"],
        &["key", "revoke", "0123456789abcdef"],
    ] {
        let out = crate::admin(&typo, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!("no airlock data directory at {}", typo.display())),
            "{err}"
        );
        assert!(!typo.exists(), "{args:?} created {}", typo.display());
    }
    // An existing directory without a database is refused the same way,
    // and gets no master key.
    std::fs::create_dir(&typo).unwrap();
    std::fs::set_permissions(&typo, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let out = crate::admin(&typo, &["tenant", "list"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(std::fs::read_dir(&typo).unwrap().count(), 0);
    // Positive control: `init` creates it, then the same commands work.
    let out = crate::admin(&typo, &["init"]);
    assert!(out.status.success(), "{out:?}");
    assert!(typo.join("airlock.db").is_file() && typo.join("master.key").is_file());
    let out = crate::admin(&typo, &["tenant", "create", "acme"]);
    assert!(out.status.success(), "{out:?}");
    let out = crate::admin(&typo, &["tenant", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("\tacme\n"));
}

#[test]
fn a_mistyped_config_key_is_named_with_where_it_is_and_the_nearest_valid_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("airlock.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\n\n[pool]\npyton = 3\n").unwrap();
    let out = std::process::Command::new(crate::BIN)
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env("AIRLOCK_DATA_DIR", dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!(
            "invalid config file {}: unknown field `pyton` in [pool] at line 4, column 1; did you mean `python`?",
            cfg.display()
        )),
        "{err}"
    );
    assert!(!dir.path().join("data").exists(), "nothing was created");
}

/// `airlock serve` on a loopback port with systemd's notification socket
/// at `sock` (its own master key and config, output discarded).
fn serve_notifying(
    data: &std::path::Path,
    sock: &std::path::Path,
    extra: &[&std::ffi::OsStr],
) -> std::process::Child {
    std::process::Command::new(crate::BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env("AIRLOCK_DATA_DIR", data)
        .env("NOTIFY_SOCKET", sock)
        .env_remove("AIRLOCK_MASTER_KEY")
        .env_remove("AIRLOCK_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn ready_file_and_systemd_notification_say_when_the_server_accepts() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let sock_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&sock_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut child = serve_notifying(
        &dir.path().join("data"),
        &sock_path,
        &["--ready-file".as_ref(), ready.as_os_str()],
    );
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).unwrap();
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.starts_with("READY=1\n"), "{msg}");
    // Written before READY was sent, and whole.
    let url = std::fs::read_to_string(&ready).unwrap();
    let addr = url.trim().strip_prefix("http://").unwrap().to_string();
    assert!(msg.contains(&addr), "{msg} vs {url}");
    let r = crate::raw(addr.parse().unwrap(), "GET", "/healthz", &[], None);
    assert_eq!(r.status, 200, "accepting once ready");
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: `pid` is our own child, not yet waited for; kill has no
    // memory effects.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let n = notify
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no STOPPING=1 ({e}): the server {:?}", child.wait()));
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(child.wait().unwrap().success());
    assert!(!ready.exists(), "removed when the server stops");
}

/// A stop that arrives at once after READY (systemd stopping a unit it
/// just started) drains: the handlers are in place before READY is sent,
/// so SIGTERM never takes its default action. CI once saw a server end by
/// the signal itself, its STOPPING=1 never sent.
#[test]
fn a_sigterm_right_after_ready_drains_and_never_kills() {
    use std::os::unix::net::UnixDatagram;
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&sock_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let data = dir.path().join("data");
    let mut buf = [0u8; 256];
    for round in 0..5 {
        let mut child = serve_notifying(&data, &sock_path, &[]);
        let n = notify.recv(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"READY=1\n"), "round {round}");
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        // SAFETY: `pid` is our own child, not yet waited for; kill has no
        // memory effects.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), None, "round {round}: {status:?}");
        assert_eq!(status.code(), Some(0), "round {round}: {status:?}");
        let n = notify.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1", "round {round}");
    }
}
