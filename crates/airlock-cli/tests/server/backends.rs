//! Choosing a backend: the cheapest offered one that meets a request's
//! minimum isolation, a level or backend nobody offers refused with 422
//! `isolation_unavailable` (audited, nothing started), and the result
//! naming what ran.

use serde_json::json;

use crate::{Server, query};

#[test]
fn the_cheapest_offered_backend_meeting_the_minimum_runs_and_the_result_names_it() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    // Positive control: no minimum, and a minimum the process backend meets.
    for body in [
        json!({"language": "shell", "code": "echo ok"}),
        json!({"language": "shell", "code": "echo ok", "isolation": "container"}),
        json!({"language": "shell", "code": "echo ok", "backend": "process"}),
    ] {
        let v = s.exec(&key, body);
        assert_eq!(v["status"], "finished", "{v}");
        assert_eq!(v["result"]["stdout"], "ok\n");
        assert_eq!(v["result"]["enforced"]["backend"], "process");
        assert_eq!(v["result"]["enforced"]["isolation"], "container");
        assert_eq!(v["result"]["enforced"]["missing_layers"], json!([]));
        // The audit chain names it too.
        let detail = query(
            &s.data().join("airlock.db"),
            &format!(
                "SELECT detail FROM audit WHERE kind = 'execution.start' AND subject = '{}'",
                v["id"].as_str().unwrap()
            ),
        );
        let d: serde_json::Value = serde_json::from_str(detail[0][0].as_str().unwrap()).unwrap();
        assert_eq!(d, json!({"backend": "process", "isolation": "container"}));
    }
}

#[test]
fn a_level_or_backend_not_offered_is_refused_with_422_audited_and_nothing_starts() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let before = query(
        &s.data().join("airlock.db"),
        "SELECT count(*) FROM executions",
    )[0][0]
        .as_i64()
        .unwrap();
    for (body, wanted) in [
        (
            json!({"language": "shell", "code": "echo no", "isolation": "gvisor"}),
            "isolation gvisor",
        ),
        (
            json!({"language": "shell", "code": "echo no", "isolation": "microvm"}),
            "isolation microvm",
        ),
        (
            json!({"language": "shell", "code": "echo no", "backend": "oci"}),
            "backend \"oci\"",
        ),
        (
            json!({"language": "shell", "code": "echo no", "backend": "process", "isolation": "gvisor"}),
            "backend process (container) at isolation gvisor",
        ),
    ] {
        let r = s.post("/v1/executions", &key, body.clone());
        assert_eq!(r.status, 422, "{body}: {}", r.text());
        let p = r.json();
        assert_eq!(p["code"], "isolation_unavailable", "{p}");
        assert_eq!(
            p["detail"],
            format!("{wanted} is not offered here (offered: process (container))"),
            "{p}"
        );
    }
    // An unknown level is not a level at all: bad input.
    let r = s.post(
        "/v1/executions",
        &key,
        json!({"language": "shell", "code": "echo no", "isolation": "hypervisor"}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let db = s.data().join("airlock.db");
    let after = query(&db, "SELECT count(*) FROM executions")[0][0]
        .as_i64()
        .unwrap();
    assert_eq!(after, before, "nothing was recorded as started");
    let audited = query(
        &db,
        "SELECT count(*) FROM audit WHERE kind = 'isolation.unavailable'",
    )[0][0]
        .as_i64()
        .unwrap();
    assert_eq!(audited, 4);
}

/// The non-process backends installed here (as `.ci/run` installs them).
fn container_backends() -> Vec<&'static str> {
    let has = |n: &str| {
        ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|d| std::path::Path::new(d).join(n).is_file())
    };
    let mut v = Vec::new();
    if crate::is_root() && (has("crun") || has("runc")) {
        v.push("oci");
    }
    if crate::is_root() && has("runsc") {
        v.push("gvisor");
    }
    v
}

#[test]
fn the_server_serves_every_offered_backend_warm_with_the_broker() {
    let extra = container_backends();
    if extra.is_empty() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("airlock.toml");
    let offer: Vec<String> = std::iter::once("process")
        .chain(extra.iter().copied())
        .map(|n| format!("{n:?}"))
        .collect();
    std::fs::write(
        &cfg,
        format!(
            "[backends]\noffer = [{}]\n[pool]\npython = 1\njavascript = 0\n",
            offer.join(", ")
        ),
    )
    .unwrap();
    let s = Server::start_with(&["--config", cfg.to_str().unwrap()]);
    let key = s.tenant("acme");
    s.put_secret(&key, "TOKEN", "tok-5e1f-canary");
    // The cheapest still runs what asks for nothing.
    let v = s.exec(&key, json!({"language": "shell", "code": "echo ok"}));
    assert_eq!(v["result"]["enforced"]["backend"], "process", "{v}");
    let code = r#"
def handler(ax, input):
    value, found = ax.secrets.get("TOKEN")
    ax.log.info("got " + str(value))
    n = ax.agent.memory.get("runs", 0) + 1
    ax.agent.memory.put("runs", n)
    return {"found": found, "leak": value, "runs": n, "twice": input["x"] * 2}
"#;
    let other = s.tenant("beta");
    // Reads acme's counter without writing it back, so each backend's
    // run above sees its predecessors' writes and nothing of this one.
    let js = r#"
exports.handler = function (ax, input) {
  const { value, found } = ax.secrets.get("TOKEN");
  const runs = ax.agent.memory.get("runs", 0);
  return { found, leak: value, runs, twice: input.x * 2 };
};
"#;
    for (i, b) in extra.iter().enumerate() {
        let label = format!("{{backend=\"{b}\",language=\"python\"}}");
        crate::pool::wait_metric(&s, &format!("airlock_pool_size{label}"), 1.0);
        let hits = crate::pool::metric(&s, &format!("airlock_pool_hits_total{label}"));
        let level = if *b == "gvisor" {
            "gvisor"
        } else {
            "container"
        };
        let body = json!({"language": "python", "handler": true, "code": code, "backend": b,
                          "input": {"x": 21}, "secrets": ["TOKEN"]});
        let v = s.exec(&key, body);
        assert_eq!(v["status"], "finished", "{b}: {v}");
        assert_eq!(v["result"]["enforced"]["backend"], *b, "{v}");
        assert_eq!(v["result"]["enforced"]["isolation"], level, "{v}");
        // The broker: secrets (redacted on the way out), memory, input.
        assert_eq!(v["output"]["found"], true, "{b}: {v}");
        assert_eq!(v["output"]["leak"], "[REDACTED:TOKEN]", "{b}: {v}");
        assert_eq!(v["output"]["runs"], i + 1, "{b}: {v}");
        assert_eq!(v["output"]["twice"], 42, "{b}: {v}");
        assert_eq!(
            crate::pool::metric(&s, &format!("airlock_pool_hits_total{label}")),
            hits + 1.0,
            "{b} was not served warm"
        );
        // Logs: recorded with the execution, redacted.
        let id = v["id"].as_str().unwrap();
        let logs = s.get(&format!("/v1/executions/{id}/logs"), &key).json();
        assert_eq!(
            logs["logs"][0]["message"], "got [REDACTED:TOKEN]",
            "{b}: {logs}"
        );
        assert_eq!(logs["logs"][0]["execution_id"], id, "{b}: {logs}");
        // Another tenant on the same backend: acme's secret (named, but
        // not its own) is simply not found and acme's memory is not there
        // (positive controls: acme found both above).
        let v = s.exec(
            &other,
            json!({"language": "python", "handler": true, "code": code,
                                      "backend": b, "input": {"x": 1}, "secrets": ["TOKEN"]}),
        );
        assert_eq!(v["status"], "finished", "{b}: {v}");
        assert_eq!(v["result"]["enforced"]["backend"], *b, "{v}");
        assert_eq!(v["output"]["found"], false, "{b}: {v}");
        assert_eq!(v["output"]["runs"], i + 1, "{b}: {v}");
        assert!(!v.to_string().contains("tok-5e1f-canary"), "{b}: {v}");
        // JavaScript handlers use the same broker on this backend.
        let v = s.exec(
            &key,
            json!({"language": "javascript", "handler": true, "code": js,
                                    "backend": b, "input": {"x": 4}, "secrets": ["TOKEN"]}),
        );
        assert_eq!(v["status"], "finished", "{b}: {v}");
        assert_eq!(v["result"]["enforced"]["backend"], *b, "{v}");
        assert_eq!(v["output"]["found"], true, "{b}: {v}");
        assert_eq!(v["output"]["leak"], "[REDACTED:TOKEN]", "{b}: {v}");
        assert_eq!(v["output"]["runs"], i + 1, "{b}: {v}");
        assert_eq!(v["output"]["twice"], 8, "{b}: {v}");
    }
    if extra.contains(&"gvisor") {
        // A minimum of gvisor is met by gVisor, not the cheaper backends.
        let v = s.exec(
            &key,
            json!({"language": "python", "code": "print(1)", "isolation": "gvisor"}),
        );
        assert_eq!(v["result"]["enforced"]["backend"], "gvisor", "{v}");
    }
}

#[test]
fn the_operator_chooses_the_oci_runtime_and_the_gvisor_platform() {
    let extra = container_backends();
    if extra.len() < 2 || !std::path::Path::new("/usr/sbin/runc").is_file() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("airlock.toml");
    // Runtime processes of one server, by the bundle directory it names.
    let runtimes = |pid: u32| -> Vec<String> {
        let bundle = format!("/bundles/{pid}-");
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&bundle))
            .collect()
    };
    let seen_while_running = |toml: &str| -> Vec<String> {
        std::fs::write(&cfg, toml).unwrap();
        let s = Server::start_with(&["--config", cfg.to_str().unwrap()]);
        let key = s.tenant("acme");
        let mut ids = Vec::new();
        for b in ["oci", "gvisor"] {
            let body = json!({"language": "shell", "code": "sleep 3", "backend": b, "wait": false});
            let r = s.post("/v1/executions", &key, body);
            assert_eq!(r.status, 202, "{}", r.text());
            ids.push(r.json()["id"].as_str().unwrap().to_string());
        }
        for id in &ids {
            s.wait_status(&key, id, &["running"]);
        }
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut seen = runtimes(s.pid());
        while !(seen.iter().any(|c| c.contains("runsc-sandbox"))
            && seen.iter().any(|c| c.contains(" run --keep ")))
            && std::time::Instant::now() < end
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
            seen = runtimes(s.pid());
        }
        for id in &ids {
            let v = s.wait_status(&key, id, &["finished"]);
            assert_eq!(v["result"]["exit_code"], 0, "{v}");
        }
        seen
    };
    let pools = "[pool]\npython = 0\njavascript = 0\n";
    let chosen = seen_while_running(&format!(
        "[backends]\noffer = [\"process\", \"oci\", \"gvisor\"]\n\
         [backends.oci]\nruntime = \"/usr/sbin/runc\"\n\
         [backends.gvisor]\nplatform = \"ptrace\"\n{pools}"
    ));
    assert!(
        chosen
            .iter()
            .any(|c| c.starts_with("/usr/sbin/runc ") && c.contains(" run --keep ")),
        "{chosen:#?}"
    );
    let sentry: Vec<_> = chosen
        .iter()
        .filter(|c| c.contains("runsc-sandbox"))
        .collect();
    assert!(
        !sentry.is_empty() && sentry.iter().all(|c| c.contains("--platform=ptrace")),
        "{chosen:#?}"
    );
    // Positive control: without the setting runsc runs on its default
    // platform (no --platform given).
    let default = seen_while_running(&format!(
        "[backends]\noffer = [\"process\", \"oci\", \"gvisor\"]\n{pools}"
    ));
    let sentry: Vec<_> = default
        .iter()
        .filter(|c| c.contains("runsc-sandbox"))
        .collect();
    assert!(
        !sentry.is_empty() && sentry.iter().all(|c| !c.contains("--platform=")),
        "{default:#?}"
    );
}

#[test]
fn a_backend_offered_but_unknown_or_not_runnable_stops_the_server_before_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let serve = |toml: &str| {
        let cfg = dir.path().join("airlock.toml");
        std::fs::write(&cfg, toml).unwrap();
        std::process::Command::new(crate::BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .arg("--config")
            .arg(&cfg)
            .env_remove("AIRLOCK_CONFIG")
            .output()
            .unwrap()
    };
    let refused = |out: std::process::Output, want: &str| {
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(want), "{err}");
        assert!(out.stdout.is_empty(), "it listened: {out:?}");
    };
    refused(
        serve("[backends]\noffer = [\"process\", \"firecracker\"]\n"),
        "unknown backend \"firecracker\" (expected process, oci, gvisor, microvm)",
    );
    refused(
        serve("[backends]\noffer = []\n"),
        "backends.offer must name at least one backend",
    );
    refused(
        serve("[backends]\noffer = [\"process\"]\npools = [\"gvisor\"]\n"),
        "backends.pools names gvisor, which backends.offer does not offer",
    );
    refused(
        serve("[backends]\noffer = [\"process\"]\n[backends.gvisor]\nplatform = \"fast\"\n"),
        "backends.gvisor.platform: \"fast\" (expected systrap, ptrace, kvm)",
    );
    // A runtime the operator names must be there and be what it is named
    // as: nothing falls back to another one.
    refused(
        serve(
            "[backends]\noffer = [\"process\", \"oci\"]\n[backends.oci]\nruntime = \"/nonexistent/crun\"\n",
        ),
        "backends.offer: oci cannot start here: the OCI runtime /nonexistent/crun is not installed",
    );
    refused(
        serve(
            "[backends]\noffer = [\"process\", \"oci\"]\n[backends.oci]\nruntime = \"/usr/bin/true\"\n",
        ),
        "backends.offer: oci cannot start here: /usr/bin/true is neither crun nor runc",
    );
    refused(
        serve(
            "[backends]\noffer = [\"process\", \"gvisor\"]\n[backends.gvisor]\nrunsc = \"/nonexistent/runsc\"\n",
        ),
        "backends.offer: gvisor cannot start here: runsc (/nonexistent/runsc) is not installed",
    );
    // Installed but unable to run here: bundles under a directory the
    // sandbox's mapped users cannot traverse.
    if container_backends().contains(&"oci") {
        let closed = dir.path().join("closed");
        std::fs::create_dir(&closed).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        refused(
            serve(&format!(
                "[backends]\noffer = [\"process\", \"oci\"]\nrun_dir = \"{}\"\n",
                closed.join("run").display()
            )),
            "backends.offer: oci cannot start here",
        );
    }
}

/// An image (mkimage.py's host python, imported with `airlock image
/// import`) in a store the sandboxes' mapped users can traverse.
fn python_image(dir: &std::path::Path) -> (std::path::PathBuf, String) {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = dir.join("python.tar");
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", include_str!("../sandbox/mkimage.py")])
        .arg(&file)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            json!({"format": "docker", "layers": [[{"type": "preset", "name": "host-python"}]]})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let store = dir.join("images");
    let out = std::process::Command::new(crate::BIN)
        .args(["image", "import", "--name", "python:test"])
        .arg(&file)
        .env("AIRLOCK_IMAGE_STORE", &store)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    (store, id)
}

#[test]
fn an_imported_image_is_served_warm_with_the_broker_and_a_missing_one_stops_the_server() {
    let extra = container_backends();
    if !extra.contains(&"oci") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (store, id) = python_image(dir.path());
    let cfg = dir.path().join("airlock.toml");
    let toml = |image: &str| {
        format!(
            "[backends]\noffer = [\"process\", \"oci\"]\nimage_store = {:?}\n\
             [backends.images]\noci = {image:?}\n[pool]\npython = 1\njavascript = 1\n",
            store.display().to_string()
        )
    };
    // A name the store does not have: the server does not start.
    std::fs::write(&cfg, toml("python:nope")).unwrap();
    let out = std::process::Command::new(crate::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data0"))
        .arg("--config")
        .arg(&cfg)
        .env_remove("AIRLOCK_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("backends.images.oci: no image \"python:nope\""),
        "{err}"
    );
    std::fs::write(&cfg, toml("python:test")).unwrap();
    let s = Server::start_with(&["--config", cfg.to_str().unwrap()]);
    let key = s.tenant("acme");
    s.put_secret(&key, "TOKEN", "tok-9c3a-canary");
    let label = "{backend=\"oci\",language=\"python\"}";
    crate::pool::wait_metric(&s, &format!("airlock_pool_size{label}"), 1.0);
    let hits = crate::pool::metric(&s, &format!("airlock_pool_hits_total{label}"));
    let code = r#"
import sys
def handler(ax, input):
    value, found = ax.secrets.get("TOKEN")
    return {"found": found, "leak": value, "exe": sys.executable,
            "os": open("/etc/os-release").read()}
"#;
    let v = s.exec(
        &key,
        json!({"language": "python", "handler": true, "code": code, "backend": "oci",
               "input": {}, "secrets": ["TOKEN"]}),
    );
    assert_eq!(v["status"], "finished", "{v}");
    assert_eq!(v["result"]["enforced"]["image"], id.as_str(), "{v}");
    assert_eq!(
        v["output"],
        json!({"found": true, "leak": "[REDACTED:TOKEN]", "exe": "/usr/bin/python3",
               "os": "NAME=airlock-python-image\n"}),
        "{v}"
    );
    assert_eq!(
        crate::pool::metric(&s, &format!("airlock_pool_hits_total{label}")),
        hits + 1.0,
        "not served warm"
    );
    // The image has no node: no javascript pool on oci, and a javascript
    // request there is refused before anything starts.
    assert_eq!(
        crate::pool::metric(
            &s,
            "airlock_pool_size{backend=\"oci\",language=\"javascript\"}"
        ),
        0.0
    );
    let r = s.post(
        "/v1/executions",
        &key,
        json!({"language": "javascript", "code": "1", "backend": "oci"}),
    );
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.text().contains("the javascript runtime is not installed"),
        "{}",
        r.text()
    );
    // The process backend still runs the host's runtime.
    let v = s.exec(&key, json!({"language": "python", "code": "print(1)"}));
    assert_eq!(v["result"]["enforced"]["backend"], "process");
    assert!(v["result"]["enforced"].get("image").is_none(), "{v}");
    // A session on the image: the session's workspace is bound over the
    // image's /workspace; its programs and files are the image's,
    // the workspace's contents are the session's, across sandboxes.
    let r = s.post(
        "/v1/sessions",
        &key,
        json!({"backend": "oci", "language": "python", "workspace_mib": 1}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let sid = r.json()["id"].as_str().unwrap().to_string();
    let base = format!("/v1/sessions/{sid}");
    let auth = format!("Bearer {key}");
    let up = crate::raw(
        s.addr,
        "PUT",
        &format!("{base}/files/in.txt"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/octet-stream"),
        ],
        Some(b"uploaded"),
    );
    assert_eq!(up.status, 200, "{}", up.text());
    let code = "import os, sys\n\
                print(sys.executable, open('/etc/os-release').read().strip(), os.getcwd(), os.getuid())\n\
                print(open('in.txt').read())\n\
                open('out.txt', 'w').write('from the image')\n";
    let r = s.post(&format!("{base}/exec"), &key, json!({"code": code}));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["result"]["enforced"]["image"], id.as_str(), "{v}");
    assert_eq!(
        v["result"]["stdout"],
        "/usr/bin/python3 NAME=airlock-python-image /workspace 1000\nuploaded\n",
        "{v}"
    );
    let r = s.post(
        &format!("{base}/exec"),
        &key,
        json!({"code": "import os\nprint(sorted(os.listdir('.')))"}),
    );
    assert_eq!(
        r.json()["result"]["stdout"],
        "['in.txt', 'out.txt']\n",
        "{}",
        r.text()
    );
    let got = s.get(&format!("{base}/files/out.txt"), &key);
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "from the image");
    assert_eq!(s.req("DELETE", &base, Some(&key), None).status, 204);
}

/// QEMU, a guest kernel and erofs-utils are here (`.ci/run` installs them).
pub(crate) fn microvm_here() -> bool {
    let has = |p: &str| std::path::Path::new(p).exists();
    crate::is_root() && has("/usr/bin/qemu-system-x86_64") && has("/usr/bin/mkfs.erofs")
}

#[test]
fn a_server_offers_microvm_when_configured_and_serves_it_warm_with_the_broker() {
    if !microvm_here() {
        panic!("the microvm backend needs root, qemu-system-x86 and erofs-utils");
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("airlock.toml");
    // Without KVM that runs a guest kernel, a server never falls back to
    // software emulation by itself: it refuses to start and says how to
    // allow it (where KVM works, it starts and says kvm).
    std::fs::write(
        &cfg,
        "[backends]\noffer = [\"process\", \"microvm\"]\npools = []\n",
    )
    .unwrap();
    let out = std::process::Command::new(crate::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("strict"))
        .arg("--config")
        .arg(&cfg)
        .arg("--ready-file")
        .arg(dir.path().join("ready"))
        .env_remove("AIRLOCK_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = {
        let mut child = out;
        let end = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            if dir.path().join("ready").exists() {
                let _ = child.kill();
                let _ = child.wait();
                break true;
            }
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                assert_eq!(status.code(), Some(2), "{err}");
                assert!(
                    err.contains(
                        "backends.offer: microvm cannot start here: KVM does not run a guest here"
                    ) && err.contains("[backends.microvm] accel = \"tcg\""),
                    "{err}"
                );
                break false;
            }
            assert!(
                std::time::Instant::now() < end,
                "neither started nor refused"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    std::fs::write(
        &cfg,
        format!(
            "[backends]\noffer = [\"process\", \"microvm\"]\npools = [\"microvm\"]\n\
             [backends.microvm]\n{}\n[pool]\npython = 1\njavascript = 0\n",
            if started { "" } else { "accel = \"tcg\"" }
        ),
    )
    .unwrap();
    let s = Server::start_with(&["--config", cfg.to_str().unwrap()]);
    let key = s.tenant("acme");
    s.put_secret(&key, "TOKEN", "tok-7a2c-canary");
    let label = "{backend=\"microvm\",language=\"python\"}";
    crate::pool::wait_metric(&s, &format!("airlock_pool_size{label}"), 1.0);
    let hits = crate::pool::metric(&s, &format!("airlock_pool_hits_total{label}"));
    // A request requiring microvm gets it, from the pool of booted VMs,
    // and the broker works across the guest's channel.
    let code = r#"
import os
def handler(ax, input):
    value, found = ax.secrets.get("TOKEN")
    ax.log.info("got " + str(value))
    ax.agent.memory.put("seen", input["x"])
    return {"found": found, "leak": value, "twice": input["x"] * 2,
            "kernel": os.uname().release, "memory": ax.agent.memory.get("seen", 0)}
"#;
    let v = s.exec(
        &key,
        json!({"language": "python", "handler": true, "code": code, "isolation": "microvm",
               "input": {"x": 21}, "secrets": ["TOKEN"]}),
    );
    assert_eq!(v["status"], "finished", "{v}");
    assert_eq!(v["result"]["enforced"]["backend"], "microvm", "{v}");
    assert_eq!(v["result"]["enforced"]["isolation"], "microvm", "{v}");
    let accel = if started { "kvm" } else { "tcg" };
    assert_eq!(v["result"]["enforced"]["accelerator"], accel, "{v}");
    assert_eq!(v["output"]["found"], true, "{v}");
    assert_eq!(v["output"]["leak"], "[REDACTED:TOKEN]", "{v}");
    assert_eq!(v["output"]["twice"], 42, "{v}");
    assert_eq!(v["output"]["memory"], 21, "{v}");
    assert!(
        v["output"]["kernel"]
            .as_str()
            .unwrap_or("")
            .contains("cloud"),
        "{v}"
    );
    assert_eq!(
        crate::pool::metric(&s, &format!("airlock_pool_hits_total{label}")),
        hits + 1.0,
        "the microVM was not served warm"
    );
    let logs = s.get(
        &format!("/v1/executions/{}/logs", v["id"].as_str().unwrap()),
        &key,
    );
    assert!(
        logs.text().contains("got [REDACTED:TOKEN]"),
        "{}",
        logs.text()
    );
    // The cheaper backend still runs what asks for nothing.
    let v = s.exec(&key, json!({"language": "shell", "code": "echo ok"}));
    assert_eq!(v["result"]["enforced"]["backend"], "process", "{v}");
}

/// A server offering microvm (TCG) with a python pool of one VM; keep the
/// returned directory (its configuration) while it runs.
fn microvm_pool_server() -> (tempfile::TempDir, Server) {
    let (dir, mut s) = microvm_pool_server_unstarted();
    s.start();
    (dir, s)
}

/// The same server, not started yet (its environment can be set).
fn microvm_pool_server_unstarted() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("airlock.toml");
    std::fs::write(
        &cfg,
        "[backends]\noffer = [\"process\", \"microvm\"]\npools = [\"microvm\"]\n\
         [backends.microvm]\naccel = \"tcg\"\n[pool]\npython = 1\njavascript = 0\n",
    )
    .unwrap();
    let s = Server::new(&["--config", cfg.to_str().unwrap()]);
    (dir, s)
}

/// Runs `code` on the microvm backend until `n` results came from VMs
/// restored from a snapshot (the pool's first VMs may boot while the golden
/// one is made); returns those results.
fn restored_runs(s: &Server, key: &str, code: &str, n: usize) -> Vec<serde_json::Value> {
    let mut got = Vec::new();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(600);
    while got.len() < n {
        assert!(
            std::time::Instant::now() < end,
            "never restored: {}",
            s.log()
        );
        let v = s.exec(
            key,
            json!({"language": "python", "code": code, "isolation": "microvm"}),
        );
        assert_eq!(v["status"], "finished", "{v}");
        assert_eq!(v["result"]["enforced"]["backend"], "microvm", "{v}");
        if v["result"]["enforced"]["snapshot"].is_string() {
            got.push(v);
        }
    }
    got
}

#[test]
fn microvm_pools_restore_a_golden_snapshot_with_fresh_entropy_and_remake_a_tampered_one() {
    if !microvm_here() {
        panic!("the microvm backend needs root, qemu-system-x86 and erofs-utils");
    }
    let (_cfg, s) = microvm_pool_server();
    let key = s.tenant("acme");
    let code = "import os, random, time\n\
                print(os.urandom(16).hex(), random.random(),\n\
                      open('/proc/sys/kernel/random/boot_id').read().strip(), time.time())";
    let runs = restored_runs(&s, &key, code, 2);
    let fields: Vec<Vec<String>> = runs
        .iter()
        .map(|v| {
            v["result"]["stdout"]
                .as_str()
                .unwrap()
                .split_whitespace()
                .map(String::from)
                .collect()
        })
        .collect();
    // Positive control: both VMs are restores of the one golden VM.
    let id = runs[0]["result"]["enforced"]["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(runs[1]["result"]["enforced"]["snapshot"], id.as_str());
    assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");
    // Yet nothing random is shared: the kernel's generator, python's
    // `random`, the boot id; and the clock is the host's, not the
    // snapshot's.
    for (i, what) in ["urandom", "random", "boot_id"].iter().enumerate() {
        assert_ne!(fields[0][i], fields[1][i], "{what}: {fields:?}");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for f in &fields {
        let t: f64 = f[3].parse().unwrap();
        assert!((now - t).abs() < 10.0, "guest clock {t}, host {now}");
    }
    // Another tenant's restore of the same snapshot finds nothing the
    // first tenant's left (positive control: the writer sees its files).
    let other = s.tenant("beta");
    let wrote = restored_runs(
        &s,
        &key,
        "open('/tmp/acme-left', 'w').write('x'); open('/workspace/acme-left', 'w').write('x')\n\
         import os; print(sorted(os.listdir('/tmp')), sorted(os.listdir('/workspace')))",
        1,
    );
    assert!(
        wrote[0]["result"]["stdout"]
            .as_str()
            .unwrap()
            .matches("acme-left")
            .count()
            == 2,
        "{}",
        wrote[0]
    );
    let seen = restored_runs(
        &s,
        &other,
        "import os; print(sorted(os.listdir('/tmp')), sorted(os.listdir('/workspace')))",
        1,
    );
    assert_eq!(seen[0]["result"]["enforced"]["snapshot"], id.as_str());
    assert!(
        !seen[0]["result"]["stdout"]
            .as_str()
            .unwrap()
            .contains("acme-left"),
        "{}",
        seen[0]
    );
    // The snapshot's files: read-only for everyone, QEMU's group may read
    // the memory and the devices.
    // (`python-<host part>-<id>`.)
    let snap = std::fs::read_dir("/var/lib/airlock/vm/snap")
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("python-") && name.ends_with(&format!("-{}", &id["sha256:".len()..]))
        })
        .unwrap_or_else(|| panic!("no snapshot directory for {id}"));
    use std::os::unix::fs::MetadataExt;
    for f in ["mem", "state"] {
        let m = std::fs::metadata(snap.join(f)).unwrap();
        assert_eq!(m.mode() & 0o777, 0o440, "{f}");
        assert_eq!(m.uid(), 0, "{f}");
    }
    assert_eq!(
        std::fs::metadata(snap.join("meta.json")).unwrap().mode() & 0o777,
        0o600
    );
    // The scratch disk the golden guest has mounted: read by monitors
    // only, each restore writing to a copy of its own.
    let m = std::fs::metadata(snap.join("scratch")).unwrap();
    assert_eq!((m.mode() & 0o777, m.uid()), (0o400, 0));
    // One byte of the saved devices changed: refused before any restore,
    // made again, and what is restored next comes from the new one.
    let state = snap.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&state, &bytes).unwrap();
    let refused = |why: &str| {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(300);
        loop {
            let log = s.log();
            if log.contains("snapshot refused") && log.contains(why) {
                break;
            }
            assert!(
                std::time::Instant::now() < end,
                "not refused ({why}): {log}"
            );
            // The idle VM restored before the change is used up, so the
            // pool restores again.
            let v = s.exec(
                &key,
                json!({"language": "python", "code": "print(1)", "isolation": "microvm"}),
            );
            assert_eq!(v["status"], "finished", "{v}");
        }
    };
    refused("state: digest mismatch");
    let again = restored_runs(&s, &key, code, 1);
    assert_eq!(again[0]["result"]["enforced"]["snapshot"], id.as_str());
    assert_ne!(
        std::fs::read(&state).unwrap(),
        bytes,
        "the changed state was kept"
    );
    // Metadata that names a device or a mount of its own is not followed:
    // the snapshot is refused (only the policy it was made under counts).
    let meta = snap.join("meta.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    m["devices"] = json!(["-device virtio-net-device"]);
    m["mounts"] = json!([{"host": "/", "target": "/host"}]);
    std::fs::write(&meta, serde_json::to_vec(&m).unwrap()).unwrap();
    refused("unknown field `devices`");
    let v = &restored_runs(&s, &key, "print(open('/proc/mounts').read())", 1)[0];
    let mounts = v["result"]["stdout"].as_str().unwrap();
    assert!(!mounts.contains("/host"), "{mounts}");
    assert!(
        !String::from_utf8_lossy(&std::fs::read(&meta).unwrap()).contains("devices"),
        "the tampered metadata was kept"
    );
}

#[test]
fn microvm_a_changed_root_image_makes_a_new_snapshot_that_restores_use() {
    if !microvm_here() {
        panic!("the microvm backend needs root, qemu-system-x86 and erofs-utils");
    }
    // A shell outside /usr brings its whole prefix into the guest's root
    // image (not under /tmp: that is scratch in the guest): a file
    // changed there is a changed image.
    let prefix = tempfile::Builder::new()
        .prefix("airlock-sh-")
        .tempdir_in("/var/tmp")
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(prefix.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(prefix.path().join("bin")).unwrap();
    std::fs::create_dir_all(prefix.path().join("share")).unwrap();
    let sh = prefix.path().join("bin/sh");
    std::fs::copy(std::fs::canonicalize("/bin/sh").unwrap(), &sh).unwrap();
    let marker = prefix.path().join("share/marker");
    std::fs::write(&marker, "one\n").unwrap();
    std::fs::set_permissions(&marker, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (_cfg, mut s) = microvm_pool_server_unstarted();
    s.env
        .push(("AIRLOCK_SH".into(), sh.to_str().unwrap().into()));
    s.start();
    let key = s.tenant("acme");
    let id = |s: &Server| -> String {
        restored_runs(s, &key, "print(1)", 1)[0]["result"]["enforced"]["snapshot"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let first = id(&s);
    // Positive control: a restart with the image unchanged restores the
    // same snapshot (its key is stable, nothing is made again).
    s.terminate();
    s.start();
    assert_eq!(id(&s), first, "{}", s.log());
    // The image changed: a new snapshot, and restores come from it.
    s.terminate();
    std::fs::write(&marker, "two\n").unwrap();
    s.start();
    let second = id(&s);
    assert_ne!(second, first, "{}", s.log());
    assert!(second.starts_with("sha256:"), "{second}");
    assert_eq!(id(&s), second);
}

/// The VM monitors a server started (by the state directory each names),
/// and their children (QEMU, in its own pid namespace).
fn vm_processes(server: u32) -> Vec<u32> {
    let needle = format!("/run/airlock/vm/{server}-");
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(&needle) {
            found.push(pid);
            for t in std::fs::read_dir(e.path().join("task"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                found.extend(
                    kids.split_whitespace()
                        .filter_map(|k| k.parse::<u32>().ok()),
                );
            }
        }
    }
    found
}

#[test]
fn microvm_after_kill_9_of_the_server_a_restart_leaves_no_qemu_state_or_cgroup() {
    if !microvm_here() {
        panic!("the microvm backend needs root, qemu-system-x86 and erofs-utils");
    }
    let (_cfg, mut s) = microvm_pool_server();
    let key = s.tenant("acme");
    let r = s.post(
        "/v1/executions",
        &key,
        json!({"language": "python", "code": "import time\ntime.sleep(600)", "isolation": "microvm",
               "wait": false, "limits": {"wall_time_ms": 60000}}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    s.wait_status(&key, &id, &["running"]);
    let server = s.pid();
    let states = || -> Vec<String> {
        std::fs::read_dir("/run/airlock/vm")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("{server}-")))
            .collect()
    };
    // Positive controls: the running VM (and the pool's) have monitors,
    // QEMU processes, state directories and cgroups on the host.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let procs = loop {
        let p = vm_processes(server);
        if p.len() >= 2 {
            break p;
        }
        assert!(
            std::time::Instant::now() < end,
            "no VM monitor and QEMU seen: {p:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(!states().is_empty());
    let cgroups = crate::lifecycle::sandbox_cgroups(server, server);
    assert!(!cgroups.is_empty(), "no sandbox cgroup");
    s.crash();
    // Monitors and QEMU die with the server (parent-death signals).
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while procs
        .iter()
        .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
    {
        assert!(
            std::time::Instant::now() < end,
            "VM processes outlived their server: {procs:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    s.start();
    let v = s.wait_status(&key, &id, &["failed"]);
    assert_eq!(v["reason"], "server_restart", "{v}");
    // The restart reaped what the killed server left: no state directory
    // (its vm.json, sockets), no half-made snapshot, no cgroup.
    assert_eq!(states(), Vec::<String>::new());
    let half_made: Vec<_> = std::fs::read_dir("/var/lib/airlock/vm/tmp")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("snap-{server}-")))
        .collect();
    assert_eq!(half_made, Vec::<String>::new());
    for c in &cgroups {
        assert!(!c.exists(), "leftover cgroup {}", c.display());
    }
}

/// Resident memory of `pid`, KiB (0 once it is gone).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn microvm_a_guest_flooding_its_channel_leaves_the_host_bounded_and_another_vm_unaffected() {
    if !microvm_here() {
        panic!("the microvm backend needs root, qemu-system-x86 and erofs-utils");
    }
    let (_cfg, s) = microvm_pool_server();
    let key = s.tenant("acme");
    // Ready: a restored VM answers (the golden snapshot exists).
    restored_runs(&s, &key, "print(1)", 1);
    // Everything the code reaches crosses the VM's channel: here the
    // broker, fed valid requests for six seconds as fast as the channel
    // takes them, none of the answers read (they back up toward the
    // guest), and stdout just under its cap.
    let flood = r#"
import json, os, struct, time
FD = int(os.environ["AIRLOCK_BROKER_FD"])
os.set_blocking(FD, False)
def frame(obj):
    b = json.dumps(obj).encode()
    return struct.pack('<I', len(b)) + b
os.write(1, b'x' * (900 << 10))
sent, pending = 0, b''
end = time.time() + 6
while time.time() < end:
    if not pending:
        sent += 1
        pending = frame({'v': 1, 'id': sent, 'op': 'memory.get', 'args': {'key': 'k'}})
    try:
        pending = pending[os.write(FD, pending):]
    except BlockingIOError:
        time.sleep(0.001)
print('\nsent', sent)
"#;
    let server = s.pid();
    std::thread::scope(|scope| {
        // Its CPU limit at the ceiling: the test is about memory, and on a
        // busy host the six-second flood once ended by SIGXCPU (cpu_limit)
        // under the default limit, its emulated CPU time running ahead.
        let flooder = scope.spawn(|| {
            s.exec(
                &key,
                json!({"language": "python", "code": flood, "isolation": "microvm",
                       "limits": {"cpu_time_ms": 60000}}),
            )
        });
        // While it floods: the server's and every monitor's memory, and
        // another tenant's VM.
        let start = std::time::Instant::now();
        let base = rss_kib(server);
        let mut peak_server = base;
        let mut peak_monitor = 0;
        let other = s.tenant("beta");
        std::thread::sleep(std::time::Duration::from_secs(2));
        let sampler = scope.spawn(move || {
            let mut peaks = (0u64, 0u64);
            while start.elapsed() < std::time::Duration::from_secs(8) {
                peaks.0 = peaks.0.max(rss_kib(server));
                for pid in vm_processes(server) {
                    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    if String::from_utf8_lossy(&cmd).contains("__airlock-vmm") {
                        peaks.1 = peaks.1.max(rss_kib(pid));
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            peaks
        });
        let calm = s.exec(
            &other,
            json!({"language": "python", "code": "print('ok')", "isolation": "microvm"}),
        );
        assert_eq!(calm["status"], "finished", "{calm}");
        assert_eq!(calm["result"]["reason"], "exited", "{calm}");
        assert_eq!(calm["result"]["stdout"], "ok\n", "{calm}");
        assert_eq!(calm["result"]["enforced"]["backend"], "microvm", "{calm}");
        let v = flooder.join().unwrap();
        let (ps, pm) = sampler.join().unwrap();
        peak_server = peak_server.max(ps);
        peak_monitor = peak_monitor.max(pm);
        // The flooder ran its whole flood (positive control: thousands
        // of requests crossed; ~4800 in six seconds here under TCG).
        assert_eq!(v["status"], "finished", "{v}");
        let r = &v["result"];
        assert_eq!(r["reason"], "exited", "{v}");
        let out = r["stdout"].as_str().unwrap();
        let tail: Vec<&str> = out
            .lines()
            .last()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        assert_eq!(tail.first(), Some(&"sent"), "{v}");
        assert!(tail[1].parse::<u64>().unwrap() >= 1000, "{v}");
        // Bounded: the server grew by less than 64 MiB and a monitor
        // never held more than 64 MiB while gigabytes were offered.
        assert!(peak_monitor > 0, "no monitor sampled");
        assert!(
            peak_server.saturating_sub(base) < 64 << 10,
            "server {base} -> {peak_server} KiB"
        );
        assert!(peak_monitor < 64 << 10, "monitor {peak_monitor} KiB");
    });
    // Frames the broker refuses, from inside a VM: a zero-length one and
    // one claiming 1 GiB each close that channel with their reason.
    for (bytes, want) in [
        ("struct.pack('<I', 0)", "malformed frame: not JSON"),
        ("struct.pack('<I', 1 << 30) + b'x' * 65536", "exceeds"),
    ] {
        let code = format!(
            "import os, struct\nFD = int(os.environ['AIRLOCK_BROKER_FD'])\n\
             os.write(FD, {bytes})\nprint('closed' if os.read(FD, 4) == b'' else 'open')\n"
        );
        let v = restored_runs(&s, &key, &code, 1).remove(0);
        assert_eq!(v["result"]["stdout"], "closed\n", "{v}");
        let err = v["broker_error"].as_str().unwrap_or("");
        assert!(err.contains(want), "{want}: {err:?}: {v}");
    }
}
