//! The API contract, checked by tools nobody here wrote, against a real
//! server: schemathesis generates requests from `/openapi.json` (valid and
//! invalid ones) and checks every response against the document (statuses,
//! media types, schemas, that valid requests are accepted and invalid ones
//! refused, authentication); promtool checks `/metrics`. `.ci/run`
//! installs both (schemathesis from PyPI into /opt/airlock-ci, promtool
//! from Debian's prometheus package).

use std::process::Command;

use serde_json::{Value, json};

use crate::Server;

pub(crate) fn tool(env: &str, candidates: &[&str]) -> String {
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
    assert!(text.contains("Selected: 35/35"), "{text}");
    assert!(text.contains("Tested: 35"), "{text}");
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
    // q-values are weighed: the format the scraper prefers, not merely
    // one it names.
    for (accept, want) in [
        (
            "text/plain;q=1, application/openmetrics-text;q=0.1",
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        (
            "application/openmetrics-text;q=0.9, text/plain;q=0.5",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        ("text/plain", "text/plain; version=0.0.4; charset=utf-8"),
    ] {
        let r = crate::raw(s.addr, "GET", "/metrics", &[("Accept", accept)], None);
        assert_eq!(r.status, 200, "{accept}");
        assert_eq!(r.header("content-type"), Some(want), "Accept: {accept}");
        assert_eq!(r.header("vary"), Some("accept"), "Accept: {accept}");
        let eof = r.text().trim_end().ends_with("# EOF");
        assert_eq!(eof, want.starts_with("application/"), "Accept: {accept}");
    }
}

/// The resolved schema of `schema` (through `$ref`).
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => resolve(doc, doc.pointer(r.trim_start_matches('#')).unwrap()),
        None => schema,
    }
}

/// Whether an object meets a schema's top level: its required fields are
/// there, and a closed schema has nothing else (`anyOf`: one option does).
fn meets(doc: &Value, schema: &Value, v: &Value) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if let Some(options) = schema.get("anyOf").and_then(Value::as_array) {
        let errors: Vec<String> = options
            .iter()
            .filter_map(|o| meets(doc, o, v).err())
            .collect();
        return if errors.len() < options.len() {
            Ok(())
        } else {
            Err(errors.join("; "))
        };
    }
    let obj = v
        .as_object()
        .ok_or_else(|| format!("{v} is not an object"))?;
    for key in schema["required"].as_array().into_iter().flatten() {
        if !obj.contains_key(key.as_str().unwrap()) {
            return Err(format!("{v} lacks {key}"));
        }
    }
    if schema["additionalProperties"] == false {
        for key in obj.keys() {
            if schema["properties"].get(key).is_none() {
                return Err(format!("{key} is not documented"));
            }
        }
    }
    Ok(())
}

/// A client that follows `/openapi.json` understands every event a real
/// stream sends, live and replayed: each event's name is one the document
/// names, and its data has the documented shape.
#[test]
fn every_event_a_stream_sends_is_in_the_openapi_document() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let doc = s.req("GET", "/openapi.json", None, None).json();
    let mapping = &doc["components"]["schemas"]["ExecutionEvent"]["discriminator"]["mapping"];
    // A handler that makes every kind of event, and is still running
    // when the stream is followed (so it is followed live).
    let code = "import sys, time\ndef handler(ax, input):\n    ax.log.info('hi', n=1)\n    \
                print('out', flush=True)\n    print('err', file=sys.stderr, flush=True)\n    \
                time.sleep(1)\n    return 1\n";
    let r = s.post(
        "/v1/executions",
        &key,
        json!({"language": "python", "handler": true, "code": code, "wait": false}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let path = format!("/v1/executions/{id}/events");
    let live = crate::follow_sse(s.addr, &path, &key);
    let replay = crate::follow_sse(s.addr, &path, &key);
    for (how, events) in [("live", live), ("replayed", replay)] {
        let kinds: std::collections::BTreeSet<&str> =
            events.iter().map(|(_, k, _)| k.as_str()).collect();
        // Positive control: every kind was sent.
        assert_eq!(
            kinds.into_iter().collect::<Vec<_>>(),
            ["finished", "log", "started", "stderr", "stdout"],
            "{how}"
        );
        for (_, kind, data) in &events {
            let component = mapping[kind.as_str()]
                .as_str()
                .unwrap_or_else(|| panic!("{how} event {kind:?} is not in the document"));
            let component = doc.pointer(component.trim_start_matches('#')).unwrap();
            assert_eq!(component["properties"]["event"]["const"], *kind);
            let schema = &component["properties"]["data"]["contentSchema"];
            meets(&doc, schema, data).unwrap_or_else(|e| panic!("{how} {kind} {data}: {e}"));
        }
    }
}
