//! The command line: languages, exit codes, bad input, unprivileged use.

use super::*;

fn bad(args: &[&str]) -> String {
    let out = airlock().args(args).stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    err
}

#[test]
fn bad_input_exits_2_with_one_line_and_starts_nothing() {
    assert!(bad(&["run", "/nonexistent/prog.py"]).contains("cannot read /nonexistent/prog.py"));
    assert!(bad(&["run", "--lang", "cobol", "-c", "x"]).contains("unknown language"));
    assert!(
        bad(&["run", "--memory", "1", "-c", "pass", "--lang", "python"])
            .contains("limits.memory_mib")
    );
    assert!(
        bad(&["run", "--timeout", "-1", "-c", "pass", "--lang", "python"]).contains("--timeout")
    );
    assert!(bad(&["run", "--pids", "0", "-c", "pass", "--lang", "python"]).contains("limits.pids"));
    assert!(bad(&["run", "-c", "pass"]).contains("--lang"));
    assert!(bad(&["run", "--bogus"]).contains("--bogus"));
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.py");
    std::fs::write(&big, vec![b'#'; (1 << 20) + 1]).unwrap();
    assert!(bad(&["run", big.to_str().unwrap()]).contains("code limit"));
    let policy = dir.path().join("p.toml");
    std::fs::write(&policy, "[limits]\nwall_time_ms = 10\nbogus = 1\n").unwrap();
    let err = bad(&[
        "run",
        "--policy",
        policy.to_str().unwrap(),
        "-c",
        "pass",
        "--lang",
        "python",
    ]);
    assert!(err.contains("bogus") && err.contains("line 3"), "{err}");
    std::fs::write(&policy, "[syscalls]\ndeny = [\"not_a_syscall\"]\n").unwrap();
    assert!(
        bad(&[
            "run",
            "--policy",
            policy.to_str().unwrap(),
            "-c",
            "pass",
            "--lang",
            "python"
        ])
        .contains("not_a_syscall")
    );
}

/// Limits that pass the policy's ranges but that no sandbox of the language
/// can start with are bad input (exit 2, one line), never a sandbox
/// failure (125).
#[test]
fn limits_too_small_to_start_are_bad_input_not_sandbox_failures() {
    let cases: [(&str, &[&str], &str); 4] = [
        ("python", &["--pids", "1"], "limits.pids = 1 is below 3"),
        ("python", &["--pids", "2"], "limits.pids = 2 is below 3"),
        ("shell", &["--pids", "2"], "limits.pids = 2 is below 3"),
        ("javascript", &["--pids", "8"], "limits.pids = 8 is below 9"),
    ];
    for (lang, extra, want) in cases {
        let mut args = vec!["run", "--lang", lang];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-c", "true"]);
        assert!(bad(&args).contains(want), "{lang} {extra:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.toml");
    std::fs::write(&policy, "[limits]\nopen_files = 16\n").unwrap();
    let p = policy.to_str().unwrap();
    assert!(
        bad(&["run", "--lang", "javascript", "--policy", p, "-c", "1"])
            .contains("limits.open_files = 16 is below 20")
    );
    // Positive controls: the smallest accepted values do start and run.
    for (lang, pids, code) in [
        ("python", "3", "print(1)"),
        ("shell", "3", "echo 1"),
        ("javascript", "9", "console.log(1)"),
    ] {
        let r = run_json(lang, code, "", &["--pids", pids]);
        assert_eq!(
            (r["reason"].as_str(), r["stdout"].as_str()),
            (Some("exited"), Some("1\n")),
            "{r}"
        );
    }
    let r = run_json("python", "print(1)", "", &["--policy", p]);
    assert_eq!(r["stdout"], "1\n", "{r}");
}

/// One task more with egress (the forwarder): the smallest pids without
/// it is bad input with it, and one more runs.
#[test]
fn limits_count_the_egress_forwarder_as_a_task() {
    let (_dir, p) = policy_file("[network]\nmode = \"proxy\"\nallow = [\"127.0.0.1:9\"]\n");
    for (lang, pids, want) in [
        (
            "python",
            "3",
            "limits.pids = 3 is below 4, the fewest tasks a python sandbox with egress",
        ),
        (
            "shell",
            "3",
            "limits.pids = 3 is below 4, the fewest tasks a shell sandbox with egress",
        ),
        (
            "javascript",
            "9",
            "limits.pids = 9 is below 10, the fewest tasks a javascript sandbox with egress",
        ),
    ] {
        let err = bad(&[
            "run", "--lang", lang, "--policy", &p, "--pids", pids, "-c", "true",
        ]);
        assert!(err.contains(want), "{lang}: {err}");
    }
    // Positive controls: one more task starts the sandbox and its
    // forwarder, and the program runs.
    for (lang, pids, code) in [
        ("python", "4", "print(1)"),
        ("shell", "4", "echo 1"),
        ("javascript", "10", "console.log(1)"),
    ] {
        let r = run_json(lang, code, "", &["--policy", &p, "--pids", pids]);
        assert_eq!(
            (r["reason"].as_str(), r["stdout"].as_str()),
            (Some("exited"), Some("1\n")),
            "{lang}: {r}"
        );
    }
}

/// The code is written into /workspace, a scratch tmpfs charged to the
/// sandbox's memory, before the program starts: a policy whose largest
/// accepted code fits in neither is bad input (exit 2, one line), never a
/// sandbox failure (125, `write_code` or a killed init) once such a code
/// arrives. At the boundary, the largest code does start.
#[test]
fn limits_the_largest_code_does_not_fit_are_bad_input_not_sandbox_failures() {
    let mib: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    // A python program of exactly `n` bytes: print(1) and a comment.
    let program = |name: &str, n: usize| {
        let path = dir.path().join(name);
        let mut code = b"print(1)\n".to_vec();
        while code.len() < n {
            let line = (n - code.len()).min(1000);
            code.extend(std::iter::repeat_n(b'#', line - 1));
            code.push(b'\n');
        }
        std::fs::write(&path, &code).unwrap();
        path.to_str().unwrap().to_string()
    };
    // Scratch: 1 MiB holds 1 MiB of code, not a byte more.
    let (_d1, over) = policy_file(&format!(
        "[limits]\ncode_bytes = {}\n[filesystem]\nscratch_mib = 1\n",
        mib + 1
    ));
    let big = program("big.py", mib + 1);
    let err = bad(&["run", "--policy", &over, &big]);
    assert!(
        err.contains("limits.code_bytes = 1048577 does not fit in filesystem.scratch_mib = 1"),
        "{err}"
    );
    let (_d2, fits) = policy_file(&format!(
        "[limits]\ncode_bytes = {mib}\n[filesystem]\nscratch_mib = 1\n"
    ));
    let exact = program("exact.py", mib);
    let out = airlock()
        .args(["run", "--json", "--policy", &fits, &exact])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (r["reason"].as_str(), r["stdout"].as_str()),
        (Some("exited"), Some("1\n")),
        "{r}"
    );
    // Memory: 7 MiB of code and 1 MiB for the sandbox's own processes.
    let (_d3, code7) = policy_file(&format!("[limits]\ncode_bytes = {}\n", 7 * mib + 1));
    let err = bad(&[
        "run", "--policy", &code7, "--memory", "8", "--lang", "python", "-c", "1",
    ]);
    assert!(err.contains("limits.memory_mib = 8 is below 9"), "{err}");
    let (_d4, code7) = policy_file(&format!("[limits]\ncode_bytes = {}\n", 7 * mib));
    // The largest code accepted starts (a program that big may well need
    // more memory than is left: that is its own limit, not a failure).
    let largest = program("largest.py", 7 * mib);
    let out = airlock()
        .args([
            "run", "--json", "--memory", "8", "--policy", &code7, &largest,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        matches!(r["reason"].as_str(), Some("exited" | "memory_limit")),
        "the largest accepted code did not start: {r}"
    );
    let r = run_json(
        "python",
        "print(1)",
        "",
        &["--memory", "8", "--policy", &code7],
    );
    assert_eq!(
        (r["reason"].as_str(), r["stdout"].as_str()),
        (Some("exited"), Some("1\n")),
        "{r}"
    );
}

#[test]
fn missing_runtime_is_a_clear_error() {
    let out = airlock()
        .env("AIRLOCK_NODE", "/nonexistent/node")
        .args(["run", "--lang", "js", "-c", "1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "airlock: the javascript runtime is not installed on this host"
    );
}

#[test]
fn all_three_languages_run() {
    let py = run_json("python", "print(6 * 7)", "", &[]);
    assert_eq!(py["stdout"], "42\n", "{py}");
    let js = run_json("javascript", "console.log(6 * 7)", "", &[]);
    assert_eq!(js["stdout"], "42\n", "{js}");
    let sh = run_json("shell", "echo $((6 * 7))", "", &[]);
    assert_eq!(sh["stdout"], "42\n", "{sh}");
    for r in [&py, &js, &sh] {
        assert_eq!(r["enforced"]["landlock"]["fully_enforced"], true, "{r}");
        assert_eq!(r["enforced"]["landlock"]["abi"], 5);
        assert_eq!(r["enforced"]["seccomp"]["filters"], 3);
        assert_eq!(r["enforced"]["namespaces"].as_array().unwrap().len(), 7);
    }
}

#[test]
fn pass_through_mode_mirrors_exit_codes_and_names_the_limit() {
    let out = airlock()
        .args([
            "run",
            "--lang",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    let out = airlock()
        .args(["run", "--timeout", "0.5", "--lang", "sh", "-c", "sleep 5"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(128 + libc::SIGKILL));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "airlock: timeout: wall-clock limit of 500 ms reached"
    );
    let out = airlock()
        .args(["run", "--lang", "sh", "-c", "kill -TERM $$"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM));
}

#[test]
fn json_mode_prints_only_the_result() {
    let out = airlock()
        .args([
            "run",
            "--json",
            "--lang",
            "sh",
            "-c",
            "echo hi; echo oops >&2; exit 4",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stderr.is_empty());
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["exit_code"], 4);
    assert_eq!(r["stdout"], "hi\n");
    assert_eq!(r["stderr"], "oops\n");
    for key in [
        "signal",
        "reason",
        "wall_time_ms",
        "cpu_user_ms",
        "cpu_sys_ms",
        "peak_memory_bytes",
        "stdout_truncated",
        "stderr_truncated",
        "enforced",
    ] {
        assert!(r.get(key).is_some(), "missing {key}");
    }
}

#[test]
fn works_as_an_unprivileged_user_with_rlimits_instead_of_cgroups() {
    if !is_root() {
        return;
    }
    // Copy the binary somewhere the unprivileged user can execute it.
    let dir = tempfile::Builder::new()
        .prefix("airlock-unpriv")
        .tempdir_in("/tmp")
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("airlock");
    std::fs::copy(env!("CARGO_BIN_EXE_airlock"), &bin).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .args([
            "run",
            "--json",
            "--lang",
            "python",
            "-c",
            "import os; print(os.getuid())",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["stdout"], "1000\n", "{r}");
    assert!(r["enforced"]["cgroup"].is_null(), "{r}");
    let unavailable = r["enforced"]["unavailable_limits"].to_string();
    assert!(
        unavailable.contains("RLIMIT_NPROC") && unavailable.contains("RLIMIT_DATA"),
        "{unavailable}"
    );
    assert_eq!(r["enforced"]["landlock"]["fully_enforced"], true);
    assert_eq!(r["enforced"]["host_uid"], 65534);
}

#[test]
fn doctor_reports_every_layer_and_runs_a_real_sandbox() {
    let out = airlock()
        .args(["doctor", "--json"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let checks: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let get = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing"))
            .clone()
    };
    for name in [
        "user_namespaces",
        "landlock",
        "seccomp",
        "cgroups",
        "backend_oci",
        "backend_gvisor",
        "qemu_system_x86_64",
        "backend_microvm",
        "kvm",
        "runtime_python",
    ] {
        let c = get(name);
        assert!(c["detail"].as_str().is_some_and(|d| !d.is_empty()), "{c}");
        if c["ok"] == false {
            assert!(
                c["fix"].as_str().is_some_and(|f| !f.is_empty()),
                "no fix for {c}"
            );
        }
    }
    assert_eq!(get("sandbox_end_to_end")["ok"], true);
    // Where the runtime is installed (.ci/run installs it), the backend
    // must really have run a sandbox, not only have been found.
    for (name, bins) in [
        ("backend_oci", &["crun", "runc"][..]),
        ("backend_gvisor", &["runsc"][..]),
    ] {
        let installed = bins
            .iter()
            .any(|b| std::path::Path::new("/usr/bin").join(b).is_file())
            || bins
                .iter()
                .any(|b| std::path::Path::new("/usr/sbin").join(b).is_file());
        if installed && is_root() {
            let c = get(name);
            assert_eq!(c["ok"], true, "{c}");
            assert!(
                c["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("ran a sandbox end to end")),
                "{c}"
            );
        }
    }
    // The microVM backend is ready (QEMU, kernel, accelerator, artifacts)
    // without booting a guest; the microvm tests boot them.
    if std::path::Path::new("/usr/bin/qemu-system-x86_64").is_file() && is_root() {
        let c = get("backend_microvm");
        assert_eq!(c["ok"], true, "{c}");
        assert!(
            c["detail"]
                .as_str()
                .is_some_and(|d| d.contains("root image sha256:")
                    && (d.contains("accelerator kvm") || d.contains("accelerator tcg"))),
            "{c}"
        );
    }
    for (name, role) in [
        ("landlock", "required"),
        ("seccomp", "required"),
        ("cgroups", "recommended"),
        ("backend_oci", "optional"),
        ("backend_gvisor", "optional"),
        ("backend_microvm", "optional"),
    ] {
        assert_eq!(get(name)["role"], role, "{name}");
        assert!(
            get(name)["needed_for"]
                .as_str()
                .is_some_and(|n| !n.is_empty())
        );
    }
    assert_eq!(out.status.code(), Some(0));
}

/// A required layer that does not work makes doctor exit 1 and name it;
/// missing optional ones do not (positive control: the same host with the
/// shell present exits 0 above).
#[test]
fn doctor_exits_1_naming_a_missing_required_layer() {
    let out = airlock()
        .arg("doctor")
        .env("AIRLOCK_SH", "/nonexistent/sh")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("the process sandbox cannot run: missing sandbox_end_to_end"),
        "{text}"
    );
    assert!(text.contains("required: the process sandbox"), "{text}");
}

#[test]
fn landlock_mode_is_recorded_in_the_result() {
    let strict = run_json("shell", "true", "", &[]);
    assert_eq!(strict["enforced"]["landlock"]["mode"], "strict");
    let (_dir, policy) = policy_file("[isolation]\nlandlock = \"best_effort_dangerous\"\n");
    let r = run_json("shell", "true", "", &["--policy", &policy]);
    assert_eq!(
        r["enforced"]["landlock"]["mode"], "best_effort_dangerous",
        "{r}"
    );
    // This kernel supports the pinned ABI, so best effort still enforces it fully.
    assert_eq!(r["enforced"]["landlock"]["fully_enforced"], true, "{r}");
}

#[test]
fn time_zone_data_is_available() {
    let r = run_json(
        "python",
        "import zoneinfo, datetime\nprint(datetime.datetime(2026, 7, 1, tzinfo=zoneinfo.ZoneInfo('Europe/Paris')).utcoffset())",
        "",
        &[],
    );
    assert_eq!(r["stdout"], "2:00:00\n", "{r}");
}

#[test]
fn completions_man_page_and_json_output_ending_in_a_newline() {
    let run = |args: &[&str]| {
        let out = airlock().args(args).stdin(Stdio::null()).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let bash = run(&["completions", "bash"]);
    assert!(bash.starts_with("_airlock() {"), "{}", &bash[..100]);
    for sub in ["run", "serve", "admin", "doctor", "completions"] {
        assert!(bash.contains(sub), "{sub}");
    }
    assert!(run(&["completions", "zsh"]).starts_with("#compdef airlock"));
    assert!(run(&["completions", "fish"]).contains("complete -c airlock"));
    let man = run(&["man"]);
    assert!(man.contains(".TH airlock 1"), "{}", &man[..200]);
    assert!(man.contains("serve") && man.contains("doctor"));
    // An unknown shell is bad input.
    assert!(bad(&["completions", "tcsh"]).contains("tcsh"));
    // Every --json output is one document followed by a newline.
    let out = run(&["run", "--json", "--lang", "shell", "-c", "true"]);
    assert!(
        out.ends_with("}\n") && out.matches('\n').count() == 1,
        "{out:?}"
    );
    let out = run(&["doctor", "--json"]);
    assert!(out.ends_with("]\n"), "{out:?}");
}

/// `airlock run --handler`: the handler runs with a local broker; stdout
/// carries its output alone, logs and the program's own output go to
/// stderr (redacted), memory persists between runs in the local data
/// directory, and secrets never come from the command line itself.
#[test]
fn run_handler_locally_with_logs_memory_and_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let token = dir.path().join("token");
    std::fs::write(&token, "tok-8f2e9a71\n").unwrap();
    let code = dir.path().join("h.py");
    std::fs::write(
        &code,
        "def handler(ax, input):\n    tok, found = ax.secrets.get('TOKEN')\n    env, _ = ax.secrets.get('FROM_ENV')\n    ax.log.info('seen', user=input['user'], tok=tok)\n    print('program says', tok)\n    n = ax.agent.memory.get('runs', 0) + 1\n    ax.agent.memory.put('runs', n)\n    return {'hi': input['user'], 'runs': n, 'found': found, 'env': env, 'leak': tok}\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        airlock()
            .arg("run")
            .args(args)
            .env("AIRLOCK_LOCAL_DIR", &local)
            .env("FROM_ENV", "env-value-1234")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let secret = format!("TOKEN=@{}", token.display());
    let args = [
        "--handler",
        "--input",
        r#"{"user": "ada"}"#,
        "--secret",
        &secret,
        "--secret",
        "FROM_ENV",
        code.to_str().unwrap(),
    ];
    for runs in [1, 2] {
        let out = run(&args);
        assert!(out.status.success(), "{out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"hi": "ada", "runs": runs, "found": true, "env": "[REDACTED:FROM_ENV]",
                   "leak": "[REDACTED:TOKEN]"})
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("airlock: log info seen"), "{err}");
        assert!(err.contains("program says [REDACTED:TOKEN]"), "{err}");
        assert!(
            !err.contains("tok-8f2e9a71") && !err.contains("env-value-1234"),
            "{err}"
        );
    }
    // The value never reaches the local database.
    for f in std::fs::read_dir(&local).unwrap().flatten() {
        let bytes = std::fs::read(f.path()).unwrap();
        assert!(
            !bytes.windows(12).any(|w| w == b"tok-8f2e9a71"),
            "{}",
            f.path().display()
        );
    }
    // A handler's exception: exit 1, the error on stderr.
    std::fs::write(
        &code,
        "def handler(ax, input):\n    raise ValueError('nope')\n",
    )
    .unwrap();
    let out = run(&["--handler", code.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("handler failed: ValueError: nope"));
    assert!(out.stdout.is_empty());
    // JavaScript handlers too.
    let js = dir.path().join("h.js");
    std::fs::write(
        &js,
        "exports.handler = async (ax, input) => ({sum: input.a + input.b});\n",
    )
    .unwrap();
    let out = run(&[
        "--handler",
        "--input",
        r#"{"a": 2, "b": 3}"#,
        js.to_str().unwrap(),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "{\"sum\":5}\n",
        "{out:?}"
    );
    // Bad input: a value on the command line, shell handlers, bad JSON.
    assert!(
        bad(&[
            "run",
            "--handler",
            "--secret",
            "TOKEN=plain",
            "-c",
            "1",
            "--lang",
            "python"
        ])
        .contains("never on the command line")
    );
    assert!(
        bad(&["run", "--handler", "--lang", "shell", "-c", "true"])
            .contains("python or javascript")
    );
    assert!(
        bad(&[
            "run",
            "--handler",
            "--input",
            "{nope",
            "--lang",
            "python",
            "-c",
            "1"
        ])
        .contains("--input is not JSON")
    );
}
