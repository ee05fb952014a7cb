//! Warm pools: pre-isolated sandboxes with the runtime loaded, bound to
//! exactly one execution each.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::Server;

fn metric(s: &Server, name: &str) -> f64 {
    let m = s.req("GET", "/metrics", None, None).text();
    m.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn wait_metric(s: &Server, name: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
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

fn run(s: &Server, key: &str, body: Value) -> Value {
    let r = s.post("/v1/executions", key, body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[test]
fn warm_sandboxes_are_as_isolated_as_cold_ones_and_never_reused() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    wait_metric(&s, "airlock_pool_size{language=\"python\"}", 2.0);
    let warm1 = run(&s, &key, json!({"language": "python", "code": PROBE}));
    let warm2 = run(&s, &key, json!({"language": "python", "code": PROBE}));
    // Positive control for "warm": both came from the pool.
    assert_eq!(
        metric(&s, "airlock_pool_hits_total{language=\"python\"}"),
        2.0
    );
    // A request with its own limits does not fit the pool: cold.
    let cold = run(
        &s,
        &key,
        json!({"language": "python", "code": PROBE, "limits": {"memory_mib": 200}}),
    );
    assert_eq!(
        metric(&s, "airlock_pool_misses_total{language=\"python\"}"),
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
    wait_metric(&s, "airlock_pool_size{language=\"python\"}", 2.0);
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
    let victims: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c).contains("/opt/airlock/python/runner.py")
            })
        })
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
    let v = run(
        &s,
        &key,
        json!({"language": "python", "code": "print('alive')"}),
    );
    assert_eq!(v["result"]["stdout"], "alive\n", "{v}");
    assert!(metric(&s, "airlock_pool_discarded_total{language=\"python\"}") >= 1.0);
    // A burst empties the pool; it refills to its target afterwards.
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
    wait_metric(&s, "airlock_pool_size{language=\"python\"}", 2.0);
    assert!(metric(&s, "airlock_pool_hits_total{language=\"python\"}") >= 2.0);
}

#[test]
fn warm_handlers_and_javascript() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    wait_metric(&s, "airlock_pool_size{language=\"javascript\"}", 1.0);
    wait_metric(&s, "airlock_pool_size{language=\"python\"}", 2.0);
    let v = run(
        &s,
        &key,
        json!({"language": "javascript", "handler": true, "input": {"n": 4},
               "code": "exports.handler = (ax, input) => ({ sq: input.n * input.n, id: ax.execution_id });"}),
    );
    assert_eq!(v["output"]["sq"], 16, "{v}");
    assert_eq!(v["output"]["id"], v["id"]);
    let v = run(
        &s,
        &key,
        json!({"language": "python", "handler": true, "input": 3, "stdin": "from stdin",
               "code": "import sys\ndef handler(ax, n):\n    return [n, sys.stdin.read()]"}),
    );
    assert_eq!(v["output"], json!([3, "from stdin"]), "{v}");
    assert_eq!(
        metric(&s, "airlock_pool_hits_total{language=\"javascript\"}"),
        1.0
    );
    assert_eq!(
        metric(&s, "airlock_pool_hits_total{language=\"python\"}"),
        1.0
    );
}

#[test]
fn warm_runner_keeps_python_exit_semantics() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    wait_metric(&s, "airlock_pool_size{language=\"python\"}", 2.0);
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
        let v = run(&s, &key, json!({"language": "python", "code": code}));
        assert_eq!(v["result"]["exit_code"], exit, "{v}");
        assert_eq!(v["result"]["stdout"], out, "{v}");
        assert!(v["result"]["stderr"].as_str().unwrap().contains(err), "{v}");
    }
    // Back to back, the pool may be empty for one of them (a cold start):
    // every execution was either warm or counted as a miss.
    let hits = metric(&s, "airlock_pool_hits_total{language=\"python\"}");
    let misses = metric(&s, "airlock_pool_misses_total{language=\"python\"}");
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
    wait_metric(&s, "airlock_pool_size{language=\"python\"}", 2.0);
    // Non-daemon threads finish before a warm runner exits.
    let v = run(
        &s,
        &key,
        json!({"language": "python", "code": "import threading, time\ndef late():\n    time.sleep(0.2)\n    print('thread done')\nthreading.Thread(target=late).start()"}),
    );
    assert_eq!(v["result"]["stdout"], "thread done\n", "{v}");
    // A program that never asks for a granted secret reads none of it.
    let before = s
        .get("/v1/audit?limit=500", &key)
        .text()
        .matches("secret.read")
        .count();
    let v = run(
        &s,
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
    let v = run(
        &s,
        &key,
        json!({"language": "python", "secrets": ["S"],
               "code": "import airlock\nax = airlock.connect()\nprint(len(ax.variables['secrets']['S']))"}),
    );
    assert_eq!(v["result"]["stdout"], "17\n", "{v}");
    // Code too big for the warm handshake runs cold, correctly.
    let big = format!("x = '{}'\nprint(len(x))", "a".repeat(900_000));
    let v = run(&s, &key, json!({"language": "python", "code": big}));
    assert_eq!(v["result"]["stdout"], "900000\n", "{v}");
    assert!(v["broker_error"].is_null());
    // The runner's start-up CPU is not billed to a warm execution.
    wait_metric(&s, "airlock_pool_size{language=\"python\"}", 2.0);
    let hits = metric(&s, "airlock_pool_hits_total{language=\"python\"}");
    let v = run(&s, &key, json!({"language": "python", "code": "pass"}));
    assert_eq!(
        metric(&s, "airlock_pool_hits_total{language=\"python\"}"),
        hits + 1.0
    );
    let cpu =
        v["result"]["cpu_user_ms"].as_f64().unwrap() + v["result"]["cpu_sys_ms"].as_f64().unwrap();
    assert!(cpu < 15.0, "warm `pass` billed {cpu} ms of CPU");
}

#[test]
fn doctor_reports_the_pools_of_a_running_server() {
    let s = Server::start_with(&[]);
    wait_metric(&s, "airlock_pool_size{language=\"python\"}", 2.0);
    let out = std::process::Command::new(crate::BIN)
        .args(["doctor", "--server"])
        .arg(format!("http://{}", s.addr))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("warm_pools"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.starts_with("ok"), "{line}");
    assert!(line.contains("size{language=\"python\"} 2"), "{line}");
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
