//! Namespaces, descriptors, environment, network, residue.

use super::*;

#[test]
fn leaked_fds_are_closed() {
    // The caller holds fd 7 open (no CLOEXEC) when it starts airlock.
    let probe = std::env::temp_dir().join(format!("airlock-probe-{}.py", std::process::id()));
    std::fs::write(&probe, PROBE).unwrap();
    let bin = env!("CARGO_BIN_EXE_airlock");
    let script = format!(
        "exec 7</etc/hostname; echo fds | {PYTHON} {p}; echo fds | {bin} run --json {p}",
        p = probe.display()
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    std::fs::remove_file(&probe).ok();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let outside: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert!(
        outside["fds"].as_array().unwrap().contains(&Value::from(7)),
        "{outside}"
    );
    let r: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    let inside: Value = serde_json::from_str(r["stdout"].as_str().unwrap().trim()).unwrap();
    // 0, 1, 2 and the descriptor listdir itself uses.
    let fds: Vec<i64> = inside["fds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(&fds[..3], &[0, 1, 2], "{inside}");
    assert!(fds.len() <= 4 && !fds.contains(&7), "{inside}");
}

#[test]
fn host_environment_does_not_leak() {
    let mut cmd = airlock();
    cmd.env("AIRLOCK_TEST_SECRET", "hunter2")
        .args(["run", "--json", "--lang", "python", "-c", PROBE]);
    let out = output_with_stdin(cmd, b"env\n");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let v: Value = serde_json::from_str(r["stdout"].as_str().unwrap().trim()).unwrap();
    let env = v["env"].as_object().unwrap();
    assert!(!env.contains_key("AIRLOCK_TEST_SECRET"), "{v}");
    let allowed = [
        "PATH",
        "HOME",
        "LANG",
        "LC_ALL",
        "TMPDIR",
        "USER",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
        "LC_CTYPE",
        // Where the CA bundle is (set by the engine when there is one).
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "PIP_CERT",
        "CURL_CA_BUNDLE",
    ];
    for k in env.keys() {
        assert!(allowed.contains(&k.as_str()), "unexpected variable {k}");
    }
    // init's environment is not readable either (invisible to the program).
    assert_eq!(v["proc1_environ_errno"], ENOENT, "{v}");
    // Positive control: the same variable is visible to a process outside.
    let mut cmd = Command::new(PYTHON);
    cmd.env("AIRLOCK_TEST_SECRET", "hunter2")
        .args(["-c", PROBE]);
    let o = output_with_stdin(cmd, b"env\n");
    assert!(String::from_utf8_lossy(&o.stdout).contains("hunter2"));
}

#[test]
fn pid_and_uts_namespaces_hide_the_host() {
    let out = outside("ids");
    assert!(out["pids"].as_array().unwrap().len() > 5);
    let inn = inside_ok("ids");
    assert_eq!(inn["hostname"], "airlock");
    assert!(inn["pid"].as_i64().unwrap() < 10, "{inn}");
    // Only the program's own processes are visible; init (pid 1) is hidden.
    let pids = inn["pids"].as_array().unwrap();
    assert!(pids.len() <= 2 && !pids.contains(&Value::from(1)), "{inn}");
}

#[test]
fn ipc_namespace_hides_host_sysv_segments() {
    // Create a SysV shared memory segment on the host.
    let key = 0x5a17_0000 + (std::process::id() as i32 & 0xffff);
    // SAFETY: plain syscall with integer arguments.
    let id = unsafe { libc::shmget(key, 4096, libc::IPC_CREAT | 0o666) };
    assert!(id >= 0);
    let out = outside(&format!("shm_lookup {key}"));
    let inn = inside_ok(&format!("shm_lookup {key}"));
    // SAFETY: removing the segment we created.
    unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
    assert_eq!(out["errno"], 0, "{out}");
    assert_eq!(inn["errno"], ENOENT, "{inn}");
}

#[test]
fn network_has_only_loopback_and_host_loopback_is_unreachable() {
    assert_eq!(inside_ok("netdev")["ifaces"], serde_json::json!(["lo"]));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    assert_eq!(outside(&format!("connect_tcp {port}"))["errno"], 0);
    assert_eq!(
        inside_ok(&format!("connect_tcp {port}"))["errno"],
        libc::ECONNREFUSED
    );
}

#[test]
fn host_abstract_unix_socket_is_unreachable() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("airlock-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let _l = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    assert_eq!(outside(&format!("connect_abstract {name}"))["errno"], 0);
    assert_eq!(
        inside_ok(&format!("connect_abstract {name}"))["errno"],
        libc::ECONNREFUSED
    );
}

#[test]
fn no_residue_between_two_consecutive_sandboxes() {
    let first = run_json(
        "shell",
        "echo one > /tmp/marker && echo one > /dev/shm/marker && echo one > /workspace/marker && ls /tmp /dev/shm",
        "",
        &[],
    );
    assert!(
        first["stdout"].as_str().unwrap().contains("marker"),
        "{first}"
    );
    let second = run_json("shell", "ls -A /tmp /dev/shm; ls -A /workspace", "", &[]);
    let text = second["stdout"].as_str().unwrap();
    assert!(!text.contains("marker"), "{text}");
}

#[test]
fn stdin_reaches_the_program() {
    let r = run_json(
        "python",
        "import sys; print(sys.stdin.read().upper())",
        "hello",
        &[],
    );
    assert_eq!(r["stdout"], "HELLO\n");
}

#[test]
fn the_program_starts_with_default_signal_dispositions() {
    // The engine ignores SIGPIPE (Rust runtime); ignored signals survive
    // execve, so without a reset `yes` would print EPIPE errors forever.
    let r = run_json(
        "shell",
        "yes | head -n 1; grep -E 'SigIgn|SigBlk' /proc/self/status",
        "",
        &[],
    );
    assert_eq!(r["stderr"], "", "{r}");
    let out = r["stdout"].as_str().unwrap();
    assert!(out.starts_with("y\n"), "{out}");
    assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
}

#[test]
fn core_dumps_are_disabled_and_no_terminal_is_reachable() {
    let r = run_json(
        "shell",
        "ulimit -c; echo --; ls /dev; echo --; test -e /dev/tty && echo tty; test -e /dev/console && echo console; true",
        "",
        &[],
    );
    let out = r["stdout"].as_str().unwrap();
    let parts: Vec<&str> = out.split("--\n").collect();
    assert_eq!(parts[0], "0\n", "{out}");
    let devs: Vec<&str> = parts[1].lines().collect();
    assert_eq!(
        devs,
        [
            "fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout", "urandom", "zero"
        ],
        "{out}"
    );
    assert_eq!(parts[2], "", "{out}");
}

#[test]
fn policy_env_vars_reach_the_program_even_when_large() {
    let big = "v".repeat(30 * 1024);
    let (_dir, policy) = policy_file(&format!(
        "[env.vars]\nGREETING = \"hello\"\nBIG1 = \"{big}\"\nBIG2 = \"{big}\"\nBIG3 = \"{big}\"\n"
    ));
    let r = run_json(
        "python",
        "import os; print(os.environ['GREETING'], len(os.environ['BIG1']) + len(os.environ['BIG3']))",
        "",
        &["--policy", &policy],
    );
    assert_eq!(r["stdout"], format!("hello {}\n", 2 * big.len()), "{r}");
}
