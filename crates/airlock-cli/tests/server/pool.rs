//! Warm pools: pre-isolated sandboxes with the runtime loaded, bound to
//! exactly one execution each.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::Server;

pub(crate) fn metric(s: &Server, name: &str) -> f64 {
    let m = s.req("GET", "/metrics", None, None).text();
    m.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub(crate) fn wait_metric(s: &Server, name: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(s, name) != want {
        assert!(
            Instant::now() < deadline,
            "{name} stayed {}",
            metric(s, name)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const PROBE: &str = r#"
import json, os
def status(field):
    for l in open("/proc/self/status"):
        if l.startswith(field + ":"):
            return l.split()[1]
try:
    open("/etc/shadow").read()
    shadow = "readable"
except OSError as e:
    shadow = e.errno
print(json.dumps({
    "uid": os.getuid(), "root": sorted(os.listdir("/")), "tmp": sorted(os.listdir("/tmp")),
    "workspace": sorted(os.listdir("/workspace")), "seccomp": status("Seccomp"),
    "nnp": status("NoNewPrivs"), "capeff": status("CapEff"), "shadow": shadow,
    "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
}))
open("/tmp/residue", "w").write("secret of the previous tenant")
open("/workspace/residue", "w").write("x")
"#;

/// Host pids of the warm python programs under `server`: runners exec'd
/// cold, or forked by the zygote (then they carry the zygote's command line
/// and are the only zygote descendants that are not pid 1 of a sandbox).
fn warm_python_programs(server: u32) -> Vec<u32> {
    let _ = server;
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).into_owned())
                .unwrap_or_default();
            let nspid = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .lines()
                .find(|l| l.starts_with("NSpid:"))
                .map(|l| {
                    l.split_whitespace()
                        .skip(1)
                        .map(String::from)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            let in_sandbox = nspid.len() == 2 && nspid[1] != "1";
            in_sandbox
                && (cmd.contains("/opt/airlock/python/runner.py")
                    || cmd.contains("__airlock-zygote"))
        })
        .collect()
}

/// Host pid of `server`'s python zygote.
fn zygote_of(server: u32) -> Option<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .find(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rfind(')')
                .and_then(|i| stat[i + 2..].split(' ').nth(1).map(String::from));
            String::from_utf8_lossy(&cmd).contains("__airlock-zygote")
                && ppid == Some(server.to_string())
        })
}

#[test]
fn warm_sandboxes_are_as_isolated_as_cold_ones_and_never_reused() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    wait_metric(
        &s,
        "airlock_pool_size{backend=\"process\",language=\"python\"}",
        2.0,
    );
    let warm1 = s.exec(&key, json!({"language": "python", "code": PROBE}));
    let warm2 = s.exec(&key, json!({"language": "python", "code": PROBE}));
    // Positive control for "warm": both came from the pool, forked by the
    // zygote.
    assert_eq!(
        metric(
            &s,
            "airlock_pool_hits_total{backend=\"process\",language=\"python\"}"
        ),
        2.0
    );
    assert!(
        metric(
            &s,
            "airlock_pool_zygote_forks{backend=\"process\",language=\"python\"}"
        ) >= 2.0
    );
    // A request with looser limits than the pool's policy: cold.
    let cold = s.exec(
        &key,
        json!({"language": "python", "code": PROBE, "limits": {"memory_mib": 300}}),
    );
    assert_eq!(
        metric(
            &s,
            "airlock_pool_misses_total{backend=\"process\",language=\"python\"}"
        ),
        1.0
    );
    let p = |v: &Value| -> Value {
        serde_json::from_str(
            v["result"]["stdout"]
                .as_str()
                .unwrap()
                .lines()
                .next()
                .unwrap(),
        )
        .unwrap()
    };
    let (w1, w2, c) = (p(&warm1), p(&warm2), p(&cold));
    for w in [&w1, &w2] {
        for k in ["uid", "root", "seccomp", "nnp", "capeff", "shadow", "pids"] {
            assert_eq!(w[k], c[k], "{k} differs between warm and cold");
        }
        // Nothing of another execution: no residue in scratch, only the
        // execution's own code in /workspace.
        assert_eq!(w["tmp"], json!([]), "{w}");
        assert_eq!(w["workspace"], json!(["main.py"]), "{w}");
    }
    assert_eq!(c["seccomp"], "2");
    assert_eq!(c["capeff"], "0000000000000000");
    assert_eq!(warm1["result"]["enforced"], cold["result"]["enforced"]);
    // Two executions, two sandboxes: distinct cgroups were recorded.
    assert_ne!(warm1["id"], warm2["id"]);
}

#[test]
fn pools_refill_after_bursts_and_drop_sandboxes_that_died_idle() {
    let s = Server::start_with(&["--max-concurrent", "4"]);
    let key = s.tenant("acme");
    wait_metric(
        &s,
        "airlock_pool_size{backend=\"process\",language=\"python\"}",
        2.0,
    );
    // Kill the idle warm runners of this server (its descendants only:
    // other tests' servers run beside it).
    let server = s.pid();
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after = &stat[stat.rfind(')')? + 2..];
        after.split(' ').nth(1)?.parse().ok()
    };
    let descends = |mut pid: u32| {
        for _ in 0..16 {
            match parent(pid) {
                Some(p) if p == server => return true,
                Some(p) if p > 1 => pid = p,
                _ => return false,
            }
        }
        false
    };
    let victims: Vec<u32> = warm_python_programs(server)
        .into_iter()
        .filter(|pid| descends(*pid))
        .collect();
    let chain = |mut pid: u32| {
        let mut v = vec![pid];
        for _ in 0..8 {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                break;
            };
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            pid = after.split(' ').nth(1).unwrap().parse().unwrap();
            v.push(pid);
        }
        v
    };
    let show: Vec<Vec<u32>> = victims.iter().map(|p| chain(*p)).collect();
    assert_eq!(victims.len(), 2, "server {server}: {show:?}");
    for pid in &victims {
        // SAFETY: these are processes of the server this test started; kill
        // has no memory effects.
        assert_eq!(unsafe { libc::kill(*pid as i32, libc::SIGKILL) }, 0);
    }
    std::thread::sleep(Duration::from_millis(200));
    // The next execution does not get a dead sandbox: it is discarded and
    // the execution still runs (from a fresh warm one or cold).
    let v = s.exec(
        &key,
        json!({"language": "python", "code": "print('alive')"}),
    );
    assert_eq!(v["result"]["stdout"], "alive\n", "{v}");
    assert!(
        metric(
            &s,
            "airlock_pool_discarded_total{backend=\"process\",language=\"python\"}"
        ) >= 1.0
    );
    // A burst empties the pool; it refills to its target afterwards. (The
    // pool first recovers from the deaths above, after its back-off.)
    wait_metric(
        &s,
        "airlock_pool_size{backend=\"process\",language=\"python\"}",
        2.0,
    );
    let ids: Vec<String> = (0..6)
        .map(|_| {
            s.post(
                "/v1/executions",
                &key,
                json!({"language": "python", "code": "print(1)", "wait": false}),
            )
            .json()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for id in &ids {
        let v = s.wait_status(&key, id, &["finished"]);
        assert_eq!(v["result"]["stdout"], "1\n", "{v}");
    }
    wait_metric(
        &s,
        "airlock_pool_size{backend=\"process\",language=\"python\"}",
        2.0,
    );
    assert!(
        metric(
            &s,
            "airlock_pool_hits_total{backend=\"process\",language=\"python\"}"
        ) >= 2.0
    );
    // Misses that fit the pool are forked from the zygote on demand
    // (whether the burst empties the pool depends on timing, so only the
    // bound is checked here).
    let misses = metric(
        &s,
        "airlock_pool_misses_total{backend=\"process\",language=\"python\"}",
    );
    assert!(metric(&s, "airlock_pool_zygote_on_demand_total") <= misses);
}

#[test]
fn warm_handlers_and_javascript() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    wait_metric(
        &s,
        "airlock_pool_size{backend=\"process\",language=\"javascript\"}",
        1.0,
    );
    wait_metric(
        &s,
        "airlock_pool_size{backend=\"process\",language=\"python\"}",
        2.0,
    );
    let v = s.exec(&key,
        json!({"language": "javascript", "handler": true, "input": {"n": 4},
               "code": "exports.handler = (ax, input) => ({ sq: input.n * input.n, id: ax.execution_id });"}),
    );
    assert_eq!(v["output"]["sq"], 16, "{v}");
    assert_eq!(v["output"]["id"], v["id"]);
    let v = s.exec(
        &key,
        json!({"language": "python", "handler": true, "input": 3, "stdin": "from stdin",
               "code": "import sys\ndef handler(ax, n):\n    return [n, sys.stdin.read()]"}),
    );
    assert_eq!(v["output"], json!([3, "from stdin"]), "{v}");
    assert_eq!(
        metric(
            &s,
            "airlock_pool_hits_total{backend=\"process\",language=\"javascript\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &s,
            "airlock_pool_hits_total{backend=\"process\",language=\"python\"}"
        ),
        1.0
    );
}

#[test]
fn warm_runner_keeps_python_exit_semantics() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    wait_metric(
        &s,
        "airlock_pool_size{backend=\"process\",language=\"python\"}",
        2.0,
    );
    let cases = [
        (
            "import atexit, sys\natexit.register(lambda: print('bye'))\nprint('hi', end='')\nsys.exit(3)",
            3,
            "hibye\n",
            "",
        ),
        (
            "import sys\nsys.exit('fatal: no input')",
            1,
            "",
            "fatal: no input\n",
        ),
        ("raise ValueError('boom')", 1, "", "ValueError: boom"),
        (
            "import sys\nsys.stdout.write('unflushed')",
            0,
            "unflushed",
            "",
        ),
    ];
    for (code, exit, out, err) in cases {
        let v = s.exec(&key, json!({"language": "python", "code": code}));
        assert_eq!(v["result"]["exit_code"], exit, "{v}");
        assert_eq!(v["result"]["stdout"], out, "{v}");
        assert!(v["result"]["stderr"].as_str().unwrap().contains(err), "{v}");
    }
    // Back to back, the pool may be empty for one of them (a cold start):
    // every execution was either warm or counted as a miss.
    let hits = metric(
        &s,
        "airlock_pool_hits_total{backend=\"process\",language=\"python\"}",
    );
    let misses = metric(
        &s,
        "airlock_pool_misses_total{backend=\"process\",language=\"python\"}",
    );
    assert!(
        hits >= 2.0 && hits + misses == 4.0,
        "{hits} hits, {misses} misses"
    );
}

#[test]
fn warm_and_cold_agree_on_threads_big_code_secrets_and_cpu() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let r = s.req(
        "PUT",
        "/v1/secrets/S",
        Some(&key),
        Some(&json!({"value": "warm-secret-value"})),
    );
    assert_eq!(r.status, 200);
    wait_metric(
        &s,
        "airlock_pool_size{backend=\"process\",language=\"python\"}",
        2.0,
    );
    // Non-daemon threads finish before a warm runner exits.
    let v = s.exec(&key,
        json!({"language": "python", "code": "import threading, time\ndef late():\n    time.sleep(0.2)\n    print('thread done')\nthreading.Thread(target=late).start()"}),
    );
    assert_eq!(v["result"]["stdout"], "thread done\n", "{v}");
    // A program that never asks for a granted secret reads none of it.
    let before = s
        .get("/v1/audit?limit=500", &key)
        .text()
        .matches("secret.read")
        .count();
    let v = s.exec(
        &key,
        json!({"language": "python", "code": "print('no sdk here')", "secrets": ["S"]}),
    );
    assert_eq!(v["result"]["stdout"], "no sdk here\n");
    let after = s
        .get("/v1/audit?limit=500", &key)
        .text()
        .matches("secret.read")
        .count();
    assert_eq!(before, after, "a warm handshake read secrets");
    // ... and one that does gets them (variables are fetched on use).
    let v = s.exec(&key,
        json!({"language": "python", "secrets": ["S"],
               "code": "import airlock\nax = airlock.connect()\nprint(len(ax.variables['secrets']['S']))"}),
    );
    assert_eq!(v["result"]["stdout"], "17\n", "{v}");
    // Code too big for the warm handshake runs cold, correctly.
    let big = format!("x = '{}'\nprint(len(x))", "a".repeat(900_000));
    let v = s.exec(&key, json!({"language": "python", "code": big}));
    assert_eq!(v["result"]["stdout"], "900000\n", "{v}");
    assert!(v["broker_error"].is_null());
    // The runner's start-up CPU is not billed to a warm execution.
    wait_metric(
        &s,
        "airlock_pool_size{backend=\"process\",language=\"python\"}",
        2.0,
    );
    let hits = metric(
        &s,
        "airlock_pool_hits_total{backend=\"process\",language=\"python\"}",
    );
    let v = s.exec(&key, json!({"language": "python", "code": "pass"}));
    assert_eq!(
        metric(
            &s,
            "airlock_pool_hits_total{backend=\"process\",language=\"python\"}"
        ),
        hits + 1.0
    );
    let cpu =
        v["result"]["cpu_user_ms"].as_f64().unwrap() + v["result"]["cpu_sys_ms"].as_f64().unwrap();
    assert!(cpu < 15.0, "warm `pass` billed {cpu} ms of CPU");
}

#[test]
fn doctor_reports_the_pools_of_a_running_server() {
    let s = Server::start_with(&[]);
    wait_metric(
        &s,
        "airlock_pool_size{backend=\"process\",language=\"python\"}",
        2.0,
    );
    let line = crate::doctor_pools_line(&format!("http://{}", s.addr), &[]);
    assert!(line.starts_with("ok"), "{line}");
    assert!(
        line.contains("size{backend=\"process\",language=\"python\"} 2"),
        "{line}"
    );
    // Positive control for the negative: nothing listening there.
    let out = std::process::Command::new(crate::BIN)
        .args(["doctor", "--server", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("MISS") && l.contains("warm_pools")),
        "{text}"
    );
}

/// What a python program can observe about its own process and interpreter.
const STATE: &str = r#"
import json, os, sys, socket, errno
def status():
    keep = ("Uid", "Gid", "Groups", "NoNewPrivs", "Seccomp", "Seccomp_filters", "SigBlk", "SigIgn",
            "SigCgt", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NSpid")
    return {l.split(":")[0]: l.split(":", 1)[1].strip() for l in open("/proc/self/status")
            if l.split(":")[0] in keep}
def exe():
    try:
        open("/proc/self/exe", "rb").read(4)
        return "readable"
    except OSError as e:
        return errno.errorcode[e.errno]
env = dict(os.environ)
env.pop("AIRLOCK_MODE")
print(json.dumps({
    "status": status(), "limits": open("/proc/self/limits").read(),
    "fds": sorted(os.listdir("/proc/self/fd")), "cwd": os.getcwd(), "env": env,
    "executable": sys.executable, "argv": sys.argv, "orig_argv": sys.orig_argv,
    "path": sys.path, "flags": str(sys.flags), "prefix": [sys.prefix, sys.base_prefix, sys.exec_prefix],
    "mounts": sorted(l.split()[4] for l in open("/proc/self/mountinfo")),
    "hostname": socket.gethostname(), "umask": os.umask(0o22), "sid": os.getsid(0) == os.getpid(),
    "exe": exe(), "random": __import__("random").random(),
    "dumpable": __import__("ctypes").CDLL(None).prctl(3, 0, 0, 0, 0),
    "proc_owner": os.stat("/proc/self/status").st_uid,
}))
"#;

#[test]
fn zygote_forked_sandboxes_match_cold_ones_and_share_nothing() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    wait_metric(
        &s,
        "airlock_pool_size{backend=\"process\",language=\"python\"}",
        2.0,
    );
    let forks = metric(
        &s,
        "airlock_pool_zygote_forks{backend=\"process\",language=\"python\"}",
    );
    assert!(forks >= 1.0, "no zygote: {}", s.log());
    let out = |v: &Value| -> Value {
        serde_json::from_str(
            v["result"]["stdout"]
                .as_str()
                .unwrap_or_else(|| panic!("{v}")),
        )
        .unwrap_or_else(|e| panic!("{e}: {v}"))
    };
    let w1 = out(&s.exec(&key, json!({"language": "python", "code": STATE})));
    let w2 = out(&s.exec(&key, json!({"language": "python", "code": STATE})));
    let cold = out(&s.exec(
        &key,
        json!({"language": "python", "code": STATE, "limits": {"wall_time_ms": 11_000}}),
    ));
    assert_eq!(
        metric(
            &s,
            "airlock_pool_hits_total{backend=\"process\",language=\"python\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &s,
            "airlock_pool_misses_total{backend=\"process\",language=\"python\"}"
        ),
        1.0
    );
    for k in [
        "status",
        "limits",
        "fds",
        "cwd",
        "env",
        "executable",
        "argv",
        "orig_argv",
        "path",
        "flags",
        "prefix",
        "mounts",
        "hostname",
        "umask",
        "dumpable",
        "proc_owner",
        "sid",
    ] {
        assert_eq!(
            w1[k], cold[k],
            "{k} differs between a zygote-forked and a cold sandbox"
        );
    }
    assert_eq!(cold["status"]["CapEff"], "0000000000000000");
    assert_eq!(cold["status"]["Seccomp"], "2");
    // Each fork gets its own random state (python reseeds at fork).
    assert_ne!(w1["random"], w2["random"]);
    // The program's /proc/self/exe is the airlock binary the zygote runs:
    // Landlock keeps it unreadable (positive control: the host reads it).
    assert!(std::fs::read(crate::BIN).is_ok());
    assert_eq!(w1["exe"], "EACCES", "{w1}");
    assert_eq!(cold["exe"], "readable", "{cold}");
}

#[test]
fn a_dead_zygote_is_replaced_and_no_execution_is_lost() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    wait_metric(
        &s,
        "airlock_pool_size{backend=\"process\",language=\"python\"}",
        2.0,
    );
    let z = zygote_of(s.pid()).unwrap_or_else(|| panic!("no zygote: {}", s.log()));
    // SAFETY: the zygote is a child of the server this test started.
    assert_eq!(unsafe { libc::kill(z as i32, libc::SIGKILL) }, 0);
    std::thread::sleep(Duration::from_millis(300));
    // Its idle sandboxes died with it; executions still run (discarded
    // sandboxes are replaced, cold if need be) ...
    for i in 0..3 {
        let v = s.exec(
            &key,
            json!({"language": "python", "code": format!("print({i})")}),
        );
        assert_eq!(v["result"]["stdout"], format!("{i}\n"), "{v}");
    }
    // ... and a new zygote takes over.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match zygote_of(s.pid()) {
            Some(n) if n != z => break,
            _ => assert!(Instant::now() < deadline, "no new zygote: {}", s.log()),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_metric(
        &s,
        "airlock_pool_size{backend=\"process\",language=\"python\"}",
        2.0,
    );
    let v = s.exec(
        &key,
        json!({"language": "python", "code": "print('warm again')"}),
    );
    assert_eq!(v["result"]["stdout"], "warm again\n");
    assert!(
        metric(
            &s,
            "airlock_pool_discarded_total{backend=\"process\",language=\"python\"}"
        ) >= 1.0
    );
}

#[test]
fn deny_execve_holds_in_zygote_forked_sandboxes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("airlock.toml");
    std::fs::write(&cfg, "[policy.syscalls]\ndeny_execve = true\n").unwrap();
    let code = "import os, errno\ntry:\n    os.execv('/usr/bin/python3', ['python3', '-c', 'print(1)'])\nexcept OSError as e:\n    print(errno.errorcode[e.errno])";
    let s = Server::start_with(&["--config", cfg.to_str().unwrap()]);
    let key = s.tenant("acme");
    wait_metric(
        &s,
        "airlock_pool_size{backend=\"process\",language=\"python\"}",
        2.0,
    );
    assert!(
        metric(
            &s,
            "airlock_pool_zygote_forks{backend=\"process\",language=\"python\"}"
        ) >= 1.0
    );
    let v = s.exec(&key, json!({"language": "python", "code": code}));
    assert_eq!(v["result"]["stdout"], "EPERM\n", "{v}");
    assert_eq!(
        metric(
            &s,
            "airlock_pool_hits_total{backend=\"process\",language=\"python\"}"
        ),
        1.0
    );
    // Positive control: the same exec succeeds where the policy allows it.
    let s2 = Server::start_with(&[]);
    let key2 = s2.tenant("acme");
    wait_metric(
        &s2,
        "airlock_pool_size{backend=\"process\",language=\"python\"}",
        2.0,
    );
    let v = s2.exec(&key2, json!({"language": "python", "code": code}));
    assert_eq!(v["result"]["stdout"], "1\n", "{v}");
    assert_eq!(
        metric(
            &s2,
            "airlock_pool_hits_total{backend=\"process\",language=\"python\"}"
        ),
        1.0
    );
}

#[test]
fn the_cli_runs_warm_through_a_server() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    wait_metric(
        &s,
        "airlock_pool_size{backend=\"process\",language=\"python\"}",
        2.0,
    );
    let url = format!("http://{}", s.addr);
    let cli = |key: Option<&str>, args: &[&str], stdin: &str| {
        let mut c = std::process::Command::new(crate::BIN);
        c.args(["run", "--server", &url])
            .args(args)
            .env_remove("AIRLOCK_API_KEY")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(k) = key {
            c.env("AIRLOCK_API_KEY", k);
        }
        let mut child = c.spawn().unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = cli(
        Some(&key),
        &[
            "--lang",
            "python",
            "-c",
            "import sys\nprint('got', sys.stdin.read())\nsys.exit(4)",
        ],
        "payload",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got payload\n");
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        metric(
            &s,
            "airlock_pool_hits_total{backend=\"process\",language=\"python\"}"
        ),
        1.0
    );
    // The tenant's own record of it exists on the server.
    let list = s.get("/v1/executions?limit=5", &key).json();
    assert_eq!(
        list["executions"].as_array().map(Vec::len),
        Some(1),
        "{list}"
    );
    // A limit ends it the same way as locally: one line, 128+9.
    let out = cli(
        Some(&key),
        &[
            "--lang",
            "python",
            "--timeout",
            "0.3",
            "-c",
            "while True: pass",
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(137));
    assert!(String::from_utf8_lossy(&out.stderr).contains("timeout"));
    // No key, a wrong key, --policy: exit 2 with one line, nothing runs.
    for (k, args) in [
        (None, vec!["--lang", "python", "-c", "print(1)"]),
        (
            Some("alk_nope_nope"),
            vec!["--lang", "python", "-c", "print(1)"],
        ),
        (
            Some(key.as_str()),
            vec![
                "--policy",
                "/dev/null",
                "--lang",
                "python",
                "-c",
                "print(1)",
            ],
        ),
    ] {
        let out = cli(k, &args, "");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(out.stdout.is_empty());
    }
    let list = s.get("/v1/executions?limit=5", &key).json();
    assert_eq!(
        list["executions"].as_array().map(Vec::len),
        Some(2),
        "{list}"
    );
}

#[test]
fn processes_left_behind_are_gone_after_the_record_is_final() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let find = || -> Vec<u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c == b"sleep\x0086417\x00")
            })
            .collect()
    };
    assert!(find().is_empty());
    let id = s
        .post(
            "/v1/executions",
            &key,
            json!({"language": "shell", "code": "sleep 86417 &\nsleep 0.5", "wait": false}),
        )
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Positive control: the background process exists while it runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    while find().is_empty() {
        assert!(Instant::now() < deadline, "the background sleep never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    let v = s.wait_status(&key, &id, &["finished"]);
    assert_eq!(v["result"]["exit_code"], 0, "{v}");
    // Teardown runs after the record is final, off the request path; it
    // still kills everything, promptly.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !find().is_empty() {
        assert!(Instant::now() < deadline, "left behind: {:?}", find());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_policy_change_replaces_the_pool_and_its_zygote() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("airlock.toml");
    std::fs::write(&cfg, "[policy.limits]\nwall_time_ms = 7000\n").unwrap();
    let mut s = Server::new(&["--config", cfg.to_str().unwrap()]);
    s.start();
    let key = s.tenant("acme");
    let code = "import os, errno\ntry:\n    os.execv('/usr/bin/python3', ['python3', '-c', 'print(\"exec ok\")'])\nexcept OSError as e:\n    print(errno.errorcode[e.errno])";
    wait_metric(
        &s,
        "airlock_pool_size{backend=\"process\",language=\"python\"}",
        2.0,
    );
    let old_zygote = zygote_of(s.pid()).expect("zygote");
    let v = s.exec(&key, json!({"language": "python", "code": code}));
    assert_eq!(v["result"]["stdout"], "exec ok\n", "{v}");
    assert_eq!(
        metric(
            &s,
            "airlock_pool_hits_total{backend=\"process\",language=\"python\"}"
        ),
        1.0
    );
    // The operator changes the base policy; the restarted server's pool and
    // zygote are built for the new one, and nothing of the old pool is used.
    let (st, _) = s.terminate();
    assert!(st.success());
    // The old zygote dies with its server (its parent-death signal).
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(format!("/proc/{old_zygote}/stat"))
        .is_ok_and(|st| !st.contains(") Z "))
    {
        assert!(
            Instant::now() < deadline,
            "the old zygote outlived its server"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::write(
        &cfg,
        "[policy.limits]\nwall_time_ms = 7000\n[policy.syscalls]\ndeny_execve = true\n",
    )
    .unwrap();
    s.start();
    wait_metric(
        &s,
        "airlock_pool_size{backend=\"process\",language=\"python\"}",
        2.0,
    );
    let v = s.exec(&key, json!({"language": "python", "code": code}));
    assert_eq!(v["result"]["stdout"], "EPERM\n", "{v}");
    assert_eq!(
        metric(
            &s,
            "airlock_pool_hits_total{backend=\"process\",language=\"python\"}"
        ),
        1.0
    );
    assert!(
        metric(
            &s,
            "airlock_pool_zygote_forks{backend=\"process\",language=\"python\"}"
        ) >= 1.0
    );
}

/// Everything a program can read about itself that could name a host path:
/// its executable, command line, environment, mappings, mount table and
/// cgroup, and its own memory (every anonymous or writable mapping: the
/// heap, the stack, what a zygote left behind), searched for the needles
/// on stdin. They arrive shifted (every byte + 1, hex) and the search runs
/// in the shifted space, so the needles themselves are never in the
/// program's memory. `marker` is put into the heap first (the scan's
/// positive control).
const HOST_PATHS_PROBE: &str = r#"
import json, os, sys
shift = bytes((i + 1) % 256 for i in range(256))
needles = [bytes.fromhex(n) for n in json.loads(sys.stdin.read())]
marker = ("/tmp/" + "positive-control-") * 2
needles.append(marker.encode().translate(shift))
def rd(p):
    try:
        return open(p, "rb").read()
    except OSError as e:
        return ("error %d" % e.errno).encode()
found = {}
views = {
    "exe": os.readlink("/proc/self/exe").encode(),
    "cmdline": rd("/proc/self/cmdline"), "environ": rd("/proc/self/environ"),
    "maps": rd("/proc/self/maps"), "mountinfo": rd("/proc/self/mountinfo"),
    "cgroup": rd("/proc/self/cgroup"),
}
unshift = bytes((i - 1) % 256 for i in range(256))
def show(n):
    return n.translate(unshift).decode()
for name, text in views.items():
    text = text.translate(shift)
    for n in needles:
        if n in text:
            found.setdefault(name, []).append(show(n))
scanned = 0
mem = open("/proc/self/mem", "rb", buffering=0)
for line in views["maps"].decode().splitlines():
    f = line.split()
    anonymous = len(f) < 6 or f[5].startswith("[")
    if "r" not in f[1] or not (anonymous or "w" in f[1]) or f[-1] in ("[vvar]", "[vvar_vclock]", "[vsyscall]"):
        continue
    a, b = (int(x, 16) for x in f[0].split("-"))
    for at in range(a, b, 1 << 22):
        try:
            mem.seek(at)
            chunk = mem.read(min(b, at + (1 << 22) + 4096) - at)
        except OSError:
            continue
        scanned += len(chunk)
        chunk = chunk.translate(shift)
        for n in needles:
            if n in chunk:
                found.setdefault("memory", []).append(show(n))
        del chunk
print(json.dumps({"found": {k: sorted(set(v)) for k, v in found.items()}, "scanned": scanned,
                  "exe": views["exe"].decode()}))
"#;

#[test]
fn no_host_path_is_visible_in_warm_or_cold_sandboxes() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    wait_metric(
        &s,
        "airlock_pool_size{backend=\"process\",language=\"python\"}",
        2.0,
    );
    let server = s.pid();
    let bin = std::fs::canonicalize(crate::BIN).unwrap();
    let needles: Vec<String> = [
        s.data().display().to_string(),
        bin.display().to_string(),
        bin.parent().unwrap().display().to_string(),
        "airlock-guest-".to_string(),
        // This server's cgroup directories are named <server pid>-<n>.
        format!("/{server}-"),
        format!("__airlock-zygote\u{0}{server}"),
    ]
    .iter()
    .map(|n| {
        n.bytes()
            .map(|b| format!("{:02x}", b.wrapping_add(1)))
            .collect()
    })
    .collect();
    let needles = json!(needles);
    let probe = |limits: Value| {
        s.exec(
            &key,
            json!({"language": "python", "code": HOST_PATHS_PROBE, "stdin": needles.to_string(),
                   "limits": limits}),
        )
    };
    assert!(zygote_of(server).is_some(), "the pool has a zygote");
    let hits = metric(
        &s,
        "airlock_pool_hits_total{backend=\"process\",language=\"python\"}",
    );
    // Warm (forked from the zygote, which has the server's memory layout
    // and its own configuration in memory) and cold (its own limits).
    let warm = probe(json!({}));
    // A looser limit than the pool's policy: never warm.
    let cold = probe(json!({"wall_time_ms": 10_001}));
    for (what, v) in [("warm", &warm), ("cold", &cold)] {
        assert_eq!(v["result"]["exit_code"], 0, "{what}: {v}");
        let out: Value = serde_json::from_str(v["result"]["stdout"].as_str().unwrap()).unwrap();
        // Positive control: the scan reads memory and finds what is there.
        assert_eq!(
            out["found"],
            json!({"memory": ["/tmp/positive-control-/tmp/positive-control-"]}),
            "{what}: a host path is visible: {out}"
        );
        assert!(out["scanned"].as_u64().unwrap() > 1 << 20, "{what}: {out}");
    }
    // The warm probe did run in a zygote-forked sandbox, the cold one not.
    let exe = |v: &Value| -> Value {
        serde_json::from_str::<Value>(v["result"]["stdout"].as_str().unwrap()).unwrap()["exe"]
            .clone()
    };
    assert_eq!(
        metric(
            &s,
            "airlock_pool_hits_total{backend=\"process\",language=\"python\"}"
        ),
        hits + 1.0
    );
    assert_eq!(exe(&warm), "/memfd:airlock (deleted)");
    assert!(
        exe(&cold).as_str().unwrap().starts_with("/usr/bin/python3"),
        "{cold}"
    );
    // And the host really has what was searched for.
    assert!(s.data().is_dir() && bin.is_file());
}

#[test]
fn a_rootless_server_forks_warm_python_from_its_zygote() {
    if !crate::is_root() {
        return; // dropping privileges needs them first
    }
    let s = Server::start_unprivileged(&[]);
    let key = s.tenant("acme");
    wait_metric(
        &s,
        "airlock_pool_size{backend=\"process\",language=\"python\"}",
        2.0,
    );
    let code = "import os\nprint(os.readlink('/proc/self/exe'), os.getuid())";
    for _ in 0..3 {
        let v = s.exec(&key, json!({"language": "python", "code": code}));
        assert_eq!(v["status"], "finished", "{v}");
        assert_eq!(
            v["result"]["stdout"], "/memfd:airlock (deleted) 1000\n",
            "{v}"
        );
        assert_eq!(v["result"]["enforced"]["host_uid"], 65534, "{v}");
    }
    // Positive control: these were warm, forked by the zygote (from the
    // pool, or on demand when a refill had not caught up yet).
    assert_eq!(
        metric(
            &s,
            "airlock_pool_hits_total{backend=\"process\",language=\"python\"}"
        ) + metric(&s, "airlock_pool_zygote_on_demand_total"),
        3.0
    );
}

#[test]
fn a_request_that_only_tightens_limits_is_served_warm_and_held_to_them() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let label = "{backend=\"process\",language=\"python\"}";
    wait_metric(&s, &format!("airlock_pool_size{label}"), 2.0);
    let hits = || metric(&s, &format!("airlock_pool_hits_total{label}"));
    let misses = || metric(&s, &format!("airlock_pool_misses_total{label}"));
    let alloc = "b = bytearray(100 << 20)\nb[::4096] = b'x' * len(b[::4096])\nprint('held')";
    // Positive control: the base policy (256 MiB) lets 100 MiB through, warm.
    let (h, m) = (hits(), misses());
    let v = s.exec(&key, json!({"language": "python", "code": alloc}));
    assert_eq!(v["result"]["stdout"], "held\n", "{v}");
    assert_eq!((hits(), misses()), (h + 1.0, m));
    // Tighter memory, pids, wall time and CPU: still warm, and the tighter
    // memory limit kills the same allocation.
    wait_metric(&s, &format!("airlock_pool_size{label}"), 2.0);
    let tight = json!({"memory_mib": 64, "pids": 16, "wall_time_ms": 5000, "cpus": 0.5});
    let v = s.exec(
        &key,
        json!({"language": "python", "code": alloc, "limits": tight}),
    );
    assert_eq!(v["reason"], "memory_limit", "{v}");
    assert_eq!((hits(), misses()), (h + 2.0, m), "not served warm");
    // The pids limit too: a fork bomb stops at 16.
    wait_metric(&s, &format!("airlock_pool_size{label}"), 2.0);
    let bomb = "import os, time\nkids = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(60)\n            os._exit(0)\n        kids += 1\nexcept OSError as e:\n    print(kids, e.errno)\n    raise SystemExit(1)\n";
    let v = s.exec(
        &key,
        json!({"language": "python", "code": bomb, "limits": tight}),
    );
    assert_eq!(v["reason"], "pids_limit", "{v}");
    let kids: u64 = v["result"]["stdout"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(kids < 16, "{v}");
    assert_eq!((hits(), misses()), (h + 3.0, m), "not served warm");
    // And the wall clock: tightened to 1 s, a sleeper is cut at 1 s.
    wait_metric(&s, &format!("airlock_pool_size{label}"), 2.0);
    let v = s.exec(
        &key,
        json!({"language": "python", "code": "import time\ntime.sleep(5)",
               "limits": {"wall_time_ms": 1000}}),
    );
    assert_eq!(v["reason"], "timeout", "{v}");
    assert!(
        v["result"]["wall_time_ms"].as_f64().unwrap() < 2000.0,
        "{v}"
    );
    assert_eq!((hits(), misses()), (h + 4.0, m), "not served warm");
    // Looser than the pool's policy (more memory, up to the ceiling): cold.
    let v = s.exec(
        &key,
        json!({"language": "python", "code": "print(1)", "limits": {"memory_mib": 512}}),
    );
    assert_eq!(v["result"]["stdout"], "1\n", "{v}");
    assert_eq!(misses(), m + 1.0, "a looser policy was served warm");
}
