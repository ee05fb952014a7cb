//! The tenant flow end to end, tenant isolation, secrets at rest, auth.

use std::time::Duration;

use serde_json::json;

use crate::{Server, admin, follow_sse, raw};

#[test]
fn full_tenant_flow() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");

    // Run and wait, with a trace context and a request id of our own.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let body = json!({"language": "python", "code": "import sys\nprint(6*7)\nprint(sys.stdin.read(), file=sys.stderr)", "stdin": "from stdin"});
    let r = raw(
        s.addr,
        "POST",
        "/v1/executions",
        &[
            ("Authorization", &format!("Bearer {key}")),
            ("Content-Type", "application/json; charset=utf-8"),
            ("traceparent", tp),
            ("X-Request-Id", "client-req-1"),
        ],
        Some(body.to_string().as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-request-id"), Some("client-req-1"));
    let v = r.json();
    assert_eq!(v["status"], "finished");
    assert_eq!(v["reason"], "exited");
    assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(v["request_id"], "client-req-1");
    assert_eq!(v["result"]["exit_code"], 0);
    assert_eq!(v["result"]["stdout"], "42\n");
    assert_eq!(v["result"]["stderr"], "from stdin\n");
    assert_eq!(v["result"]["enforced"]["pivot_root"], true);
    for k in ["created_at", "started_at", "finished_at"] {
        assert!(v[k].as_str().unwrap().ends_with('Z'), "{k}: {}", v[k]);
    }
    let first = v["id"].as_str().unwrap().to_string();

    // wait: false -> 202 with Location; then poll to the end.
    let r = s.post(
        "/v1/executions",
        &key,
        json!({"language": "shell", "code": "echo async", "wait": false}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    assert_eq!(r.header("location"), Some(&*format!("/v1/executions/{id}")));
    assert!(["queued", "running", "finished"].contains(&r.json()["status"].as_str().unwrap()));
    let done = s.wait_status(&key, &id, &["finished"]);
    assert_eq!(done["result"]["stdout"], "async\n");

    // Pagination: newest first, cursor walks to the end.
    let third = s.run(&key, "shell", "true")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let p1 = s.get("/v1/executions?limit=2", &key).json();
    let ids: Vec<&str> = p1["executions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [third.as_str(), id.as_str()]);
    let cursor = p1["next_cursor"].as_str().expect("a next page");
    let p2 = s
        .get(&format!("/v1/executions?limit=2&cursor={cursor}"), &key)
        .json();
    assert_eq!(p2["executions"][0]["id"], first.as_str());
    assert!(p2["next_cursor"].is_null());

    // Secrets: write twice (version 2), list shows no value, delete.
    let secret = "plaintext-canary-5f0c1d";
    let r = s.req(
        "PUT",
        "/v1/secrets/DB_PASSWORD",
        Some(&key),
        Some(&json!({"value": secret})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.req(
        "PUT",
        "/v1/secrets/DB_PASSWORD",
        Some(&key),
        Some(&json!({"value": secret})),
    );
    assert_eq!(r.json()["version"], 2);
    let list = s.get("/v1/secrets", &key);
    assert_eq!(list.json()["secrets"][0]["name"], "DB_PASSWORD");
    assert!(!list.text().contains(secret));
    assert_eq!(
        s.req("DELETE", "/v1/secrets/DB_PASSWORD", Some(&key), None)
            .status,
        204
    );
    s.req("DELETE", "/v1/secrets/DB_PASSWORD", Some(&key), None)
        .problem(404, "not_found");

    // Audit: the tenant's own trail, in order.
    let audit = s.get("/v1/audit?limit=500", &key).json();
    let kinds: Vec<&str> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for k in [
        "tenant.create",
        "api_key.create",
        "execution.accept",
        "execution.start",
        "execution.finish",
        "secret.write",
        "secret.delete",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    let fin = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "execution.finish" && e["subject"] == first.as_str())
        .unwrap();
    assert_eq!(fin["detail"]["reason"], "exited");
    assert_eq!(fin["request_id"], "client-req-1");
    assert!(!audit.to_string().contains(secret));

    // Audit pages: the cursor is a record's hash, never a global position.
    let p1 = s.get("/v1/audit?limit=2", &key).json();
    assert!(p1["events"][0].get("seq").is_none());
    let after = p1["next_after"].as_str().expect("more pages");
    assert_eq!(after, p1["events"][1]["hash"].as_str().unwrap());
    let p2 = s
        .get(&format!("/v1/audit?limit=2&after={after}"), &key)
        .json();
    assert_ne!(p2["events"][0]["hash"], p1["events"][1]["hash"]);
    assert_eq!(p2["events"][0]["kind"], kinds[2]);

    // Health, metrics, OpenAPI.
    assert_eq!(s.req("GET", "/healthz", None, None).status, 200);
    assert_eq!(s.req("GET", "/readyz", None, None).status, 200);
    let m = s.req("GET", "/metrics", None, None).text();
    assert!(
        m.contains("airlock_executions_total{reason=\"exited\",backend=\"process\"} 3"),
        "{m}"
    );
    assert!(m.contains("airlock_execution_duration_seconds_bucket"));
    assert!(m.contains("airlock_queue_depth 0"));
    let doc = s.req("GET", "/openapi.json", None, None).json();
    for p in [
        "/v1/executions",
        "/v1/executions/{id}",
        "/v1/executions/{id}/cancel",
        "/v1/executions/{id}/events",
        "/v1/secrets/{name}",
        "/v1/audit",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} missing from OpenAPI");
    }
    assert!(doc["components"]["schemas"]["CreateExecution"].is_object());
}

#[test]
fn events_stream_live_and_replay() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let r = s.post(
        "/v1/executions",
        &key,
        json!({"language": "python", "wait": false,
               "code": "import time,sys\nprint('first', flush=True)\ntime.sleep(1)\nprint('oops', file=sys.stderr, flush=True)\nprint('second')"}),
    );
    let id = r.json()["id"].as_str().unwrap().to_string();
    let events = follow_sse(s.addr, &format!("/v1/executions/{id}/events"), &key);
    let kinds: Vec<&str> = events.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"started"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"finished"), "{kinds:?}");
    let out: String = events
        .iter()
        .filter(|(_, k, _)| k == "stdout")
        .map(|(_, _, d)| d["data"].as_str().unwrap())
        .collect();
    assert_eq!(out, "first\nsecond\n");
    assert!(kinds.contains(&"stderr"));
    // Live: "first" arrived while the program still slept.
    let first_at = events
        .iter()
        .find(|(_, k, d)| k == "stdout" && d["data"].as_str().unwrap().contains("first"))
        .unwrap()
        .0;
    let fin_at = events.last().unwrap().0;
    assert!(
        fin_at.duration_since(first_at) >= Duration::from_millis(700),
        "stdout was not streamed live"
    );
    assert_eq!(events.last().unwrap().2["reason"], "exited");

    // After the end: the same story replayed from the record.
    let replay = follow_sse(s.addr, &format!("/v1/executions/{id}/events"), &key);
    let kinds: Vec<&str> = replay.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["started", "stdout", "stderr", "finished"]);
    assert_eq!(replay[1].2["data"], "first\nsecond\n");
}

#[test]
fn cancel_kills_a_running_execution() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let r = s.post(
        "/v1/executions",
        &key,
        json!({"language": "shell", "code": "echo up; sleep 50", "wait": false, "limits": {"wall_time_ms": 60000}}),
    );
    let id = r.json()["id"].as_str().unwrap().to_string();
    s.wait_status(&key, &id, &["running"]);
    std::thread::sleep(Duration::from_millis(200));
    let c = s.post(&format!("/v1/executions/{id}/cancel"), &key, json!({}));
    assert_eq!(c.status, 202, "{}", c.text());
    let v = s.wait_status(&key, &id, &["finished", "failed"]);
    assert_eq!(v["reason"], "cancelled", "{v}");
    assert_eq!(v["result"]["signal"], 9);
    let wall = v["result"]["wall_time_ms"].as_f64().unwrap();
    assert!(wall < 10_000.0, "cancel took effect after {wall} ms");
    s.post(&format!("/v1/executions/{id}/cancel"), &key, json!({}))
        .problem(409, "not_cancellable");
    let audit = s.get("/v1/audit?limit=500", &key).text();
    assert!(audit.contains("execution.cancel"));
}

#[test]
fn tenants_cannot_see_each_other() {
    let s = Server::start_with(&[]);
    let a = s.tenant("alpha");
    let b = s.tenant("beta");
    let r = s.post(
        "/v1/executions",
        &a,
        json!({"language": "shell", "code": "sleep 3", "wait": false}),
    );
    let id = r.json()["id"].as_str().unwrap().to_string();
    let put = s.req(
        "PUT",
        "/v1/secrets/alpha_only",
        Some(&a),
        Some(&json!({"value": "x"})),
    );
    assert_eq!(put.status, 200);

    // Positive control: alpha sees its own things.
    assert_eq!(s.get(&format!("/v1/executions/{id}"), &a).status, 200);
    // beta gets 404 (not 403) for every one of them, while it runs...
    s.get(&format!("/v1/executions/{id}"), &b)
        .problem(404, "not_found");
    s.get(&format!("/v1/executions/{id}/events"), &b)
        .problem(404, "not_found");
    s.post(&format!("/v1/executions/{id}/cancel"), &b, json!({}))
        .problem(404, "not_found");
    s.req("DELETE", "/v1/secrets/alpha_only", Some(&b), None)
        .problem(404, "not_found");
    assert_eq!(s.get("/v1/secrets", &b).json()["secrets"], json!([]));
    assert_eq!(s.get("/v1/executions", &b).json()["executions"], json!([]));
    // Another tenant's id is no cursor: nothing about it leaks through paging.
    s.get(&format!("/v1/executions?cursor={id}"), &b)
        .problem(404, "not_found");
    let a_hash = s.get("/v1/audit?limit=1", &a).json()["events"][0]["hash"]
        .as_str()
        .unwrap()
        .to_string();
    s.get(&format!("/v1/audit?after={a_hash}"), &b)
        .problem(404, "not_found");
    // ... and the execution was not cancelled by beta's attempt.
    let v = s.wait_status(&a, &id, &["finished"]);
    assert_eq!(v["reason"], "exited");
    // Audit: beta sees none of alpha's records.
    let audit_b = s.get("/v1/audit?limit=500", &b).text();
    assert!(!audit_b.contains(&id) && !audit_b.contains("alpha_only"));
    assert!(
        s.get("/v1/audit?limit=500", &a)
            .text()
            .contains("alpha_only")
    );
    // The secret survived beta's delete attempt.
    assert_eq!(
        s.get("/v1/secrets", &a).json()["secrets"][0]["name"],
        "alpha_only"
    );
}

#[test]
fn secret_plaintext_never_reaches_disk_or_logs() {
    let mut s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let canary = "zq9-canary-plaintext-7d1e4b2a";
    for name in ["one", "name_visible_at_rest"] {
        let r = s.req(
            "PUT",
            &format!("/v1/secrets/{name}"),
            Some(&key),
            Some(&json!({ "value": canary })),
        );
        assert_eq!(r.status, 200);
        assert!(!r.text().contains(canary));
    }
    let (st, _) = s.terminate();
    assert!(st.success());
    // Every file the server wrote: database, WAL, key file, logs.
    let mut checked = 0;
    for e in std::fs::read_dir(s.data())
        .unwrap()
        .chain(std::fs::read_dir(s.dir.path()).unwrap())
    {
        let p = e.unwrap().path();
        if p.is_file() {
            let bytes = std::fs::read(&p).unwrap();
            assert!(
                !bytes.windows(canary.len()).any(|w| w == canary.as_bytes()),
                "plaintext found in {}",
                p.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} files checked");
    // Positive control: the names are stored in clear, so the scan does
    // see what the server wrote.
    let db = std::fs::read(s.data().join("airlock.db")).unwrap();
    let name = b"name_visible_at_rest";
    assert!(db.windows(name.len()).any(|w| w == name));
}

#[test]
fn bad_keys_get_one_identical_401_then_429() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("airlock.toml");
    std::fs::write(
        &cfg,
        "auth_failure_limit = 6\nauth_failure_window_secs = 60\n",
    )
    .unwrap();
    let s = Server::start_with(&["--config", cfg.to_str().unwrap()]);
    let key = s.tenant("acme");
    let second = s.key("acme");
    let key_id = &second[4..20];
    let out = admin(&s.data(), &["key", "revoke", key_id]);
    assert!(out.status.success());

    // Positive control: the valid key works.
    assert_eq!(s.get("/v1/secrets", &key).status, 200);
    let mut forged = key.clone();
    forged.pop();
    forged.push(if key.ends_with('0') { '1' } else { '0' });
    let cases: Vec<Vec<(&str, String)>> = vec![
        vec![],
        vec![("Authorization", "Bearer".into())],
        vec![("Authorization", "Basic dXNlcjpwYXNz".into())],
        vec![("Authorization", format!("Bearer {forged}"))],
        vec![("Authorization", format!("Bearer {second}"))],
    ];
    let mut bodies = Vec::new();
    for h in &cases {
        let hv: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = raw(s.addr, "GET", "/v1/secrets", &hv, None);
        r.problem(401, "unauthorized");
        bodies.push(r.body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "401 bodies differ");
    // The sixth failure crosses the limit; from then on bad keys from this
    // client address get 429 (without a database write each) ...
    let r = raw(
        s.addr,
        "GET",
        "/v1/secrets",
        &[("Authorization", "Bearer alk_x")],
        None,
    );
    r.problem(401, "unauthorized");
    let bad = format!("Bearer {forged}");
    let r = raw(
        s.addr,
        "GET",
        "/v1/secrets",
        &[("Authorization", bad.as_str())],
        None,
    );
    r.problem(429, "auth_throttled");
    assert!(r.header("retry-after").is_some());
    // ... while a valid key from the same address (a NAT, a proxy) still works.
    assert_eq!(s.get("/v1/secrets", &key).status, 200);
    let m = s.req("GET", "/metrics", None, None).text();
    assert!(m.contains("airlock_auth_failures_total 7"), "{m}");
    // The revoked key's failure is in its tenant's audit trail with the
    // reason; the throttled attempt added no record.
    let audit = s.get("/v1/audit?limit=500", &key).json();
    let fails: Vec<_> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "auth.failure")
        .collect();
    assert_eq!(fails.len(), 1, "{fails:?}");
    assert_eq!(fails[0]["detail"]["reason"], "revoked");
    drop(s);
}
