//! The API contract, checked by tools nobody here wrote, against a real
//! server: schemathesis generates requests from `/openapi.json` (valid and
//! invalid ones) and checks every response against the document (statuses,
//! media types, schemas, that valid requests are accepted and invalid ones
//! refused, authentication); promtool checks `/metrics`. `.ci/run`
//! installs both (schemathesis from PyPI into /opt/airlock-ci, promtool
//! from Debian's prometheus package).

use std::process::Command;

use serde_json::json;

use crate::Server;

fn tool(env: &str, candidates: &[&str]) -> String {
    if let Ok(p) = std::env::var(env) {
        return p;
    }
    candidates
        .iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|c| c.to_string())
        .unwrap_or_else(|| {
            panic!(
                "{} is not installed: .ci/run installs it (or set {env})",
                candidates[0]
            )
        })
}

#[test]
fn the_openapi_document_holds_against_schemathesis() {
    let st = tool(
        "AIRLOCK_SCHEMATHESIS",
        &["schemathesis", "/opt/airlock-ci/bin/schemathesis"],
    );
    // Negative authentication tests would otherwise trip the failed-auth
    // throttle, whose 429 is documented but hides what is tested.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("airlock.toml");
    std::fs::write(&cfg, "auth_failure_limit = 1000000\n").unwrap();
    let s = Server::start_with(&["--config", cfg.to_str().unwrap()]);
    let key = s.tenant("acme");
    // Something to find: a secret and a memory entry.
    let r = s.req(
        "PUT",
        "/v1/secrets/TOKEN",
        Some(&key),
        Some(&json!({"value": "t0ken-value"})),
    );
    assert_eq!(r.status, 200);
    let r = s.req(
        "PUT",
        "/v1/memory/default/k",
        Some(&key),
        Some(&json!({"value": 1})),
    );
    assert_eq!(r.status, 200);
    let out = Command::new(&st)
        .args(["run", &format!("http://{}/openapi.json", s.addr)])
        .args(["-H", &format!("Authorization: Bearer {key}")])
        .args(["--checks", "all", "--max-examples", "40"])
        // Deterministic: a CI run is repeatable. One worker: hypothesis
        // compiles code from several threads otherwise, which python 3.11
        // does not survive ("AST constructor recursion depth mismatch").
        .args(["--generation-deterministic", "--workers", "1"])
        .env("NO_COLOR", "1")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found contract failures:\n{}\n{}",
        &text[text.len().saturating_sub(6000)..],
        String::from_utf8_lossy(&out.stderr)
    );
    // Positive control: it did test every operation.
    assert!(text.contains("Selected: 17/17"), "{text}");
    assert!(text.contains("Tested: 17"), "{text}");
}

#[test]
fn metrics_pass_promtool_and_openmetrics_is_served_when_asked() {
    let promtool = tool("AIRLOCK_PROMTOOL", &["promtool"]);
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    // Labelled families get samples: executions by reason, pools, tenants.
    s.run(&key, "python", "print(1)");
    s.run(&key, "shell", "exit 3");
    let plain = s.req("GET", "/metrics", None, None);
    assert_eq!(
        plain.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &plain.body).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = plain.text();
    assert!(
        text.contains("airlock_executions_total{reason=\"exited\",backend=\"process\"} 2"),
        "{text}"
    );
    assert!(!text.contains("# EOF"));
    // Positive control: the OpenMetrics form, which promtool's text check
    // does not take, is what a scraper asking for it gets.
    let om = crate::raw(
        s.addr,
        "GET",
        "/metrics",
        &[("Accept", "application/openmetrics-text; version=1.0.0")],
        None,
    );
    assert_eq!(
        om.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(om.text().trim_end().ends_with("# EOF"));
}
