//! Hostile requests: each gets a problem+json with a stable code, nothing
//! about the host leaks, and the server keeps serving.

use serde_json::json;

use crate::{Server, raw};

#[test]
fn malformed_requests_table() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let auth = format!("Bearer {key}");
    let data_dir = s.data().display().to_string();
    let json_ct = ("Content-Type", "application/json");
    let a = ("Authorization", auth.as_str());

    let deep = format!(
        r#"{{"language":"python","code":"pass","limits":{}{}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let huge = format!(
        r#"{{"language":"python","code":"{}"}}"#,
        "x".repeat(3 << 20)
    );
    let mut invalid_utf8 = br#"{"language":"python","code":"print(1) # "#.to_vec();
    invalid_utf8.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    invalid_utf8.extend_from_slice(br#""}"#);

    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, &str, &str, Vec<(&str, &str)>, Vec<u8>, u16, &str)> = vec![
        (
            "oversized body",
            "POST",
            "/v1/executions",
            vec![a, json_ct],
            huge.into_bytes(),
            413,
            "payload_too_large",
        ),
        (
            "deep nesting",
            "POST",
            "/v1/executions",
            vec![a, json_ct],
            deep.into_bytes(),
            400,
            "json_too_deep",
        ),
        (
            "wrong type",
            "POST",
            "/v1/executions",
            vec![a, json_ct],
            br#"{"language":"python","code":42}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "wrong type in limits",
            "POST",
            "/v1/executions",
            vec![a, json_ct],
            br#"{"language":"python","code":"","limits":{"memory_mib":"lots"}}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "negative limit",
            "POST",
            "/v1/executions",
            vec![a, json_ct],
            br#"{"language":"python","code":"","limits":{"pids":-1}}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "unknown field",
            "POST",
            "/v1/executions",
            vec![a, json_ct],
            br#"{"language":"python","code":"","tenant_id":"someone-else"}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "unknown limit",
            "POST",
            "/v1/executions",
            vec![a, json_ct],
            br#"{"language":"python","code":"","limits":{"read_only_paths":["/etc"]}}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "missing field",
            "POST",
            "/v1/executions",
            vec![a, json_ct],
            br#"{"language":"python"}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "invalid utf-8",
            "POST",
            "/v1/executions",
            vec![a, json_ct],
            invalid_utf8,
            400,
            "invalid_json",
        ),
        (
            "truncated json",
            "POST",
            "/v1/executions",
            vec![a, json_ct],
            br#"{"language":"pyth"#.to_vec(),
            400,
            "invalid_json",
        ),
        (
            "empty body",
            "POST",
            "/v1/executions",
            vec![a, json_ct],
            Vec::new(),
            400,
            "invalid_json",
        ),
        (
            "wrong content type",
            "POST",
            "/v1/executions",
            vec![a, ("Content-Type", "text/plain")],
            br#"{"language":"python","code":""}"#.to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            "form content type",
            "POST",
            "/v1/executions",
            vec![a, ("Content-Type", "application/x-www-form-urlencoded")],
            b"language=python".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            "no content type",
            "POST",
            "/v1/executions",
            vec![a],
            br#"{"language":"python","code":""}"#.to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            "unknown language",
            "POST",
            "/v1/executions",
            vec![a, json_ct],
            br#"{"language":"cobol","code":""}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "limit above ceiling",
            "POST",
            "/v1/executions",
            vec![a, json_ct],
            br#"{"language":"python","code":"","limits":{"wall_time_ms":86400000}}"#.to_vec(),
            422,
            "policy_denied",
        ),
        (
            "limit below minimum",
            "POST",
            "/v1/executions",
            vec![a, json_ct],
            br#"{"language":"python","code":"","limits":{"memory_mib":0}}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "code over limit",
            "POST",
            "/v1/executions",
            vec![a, json_ct],
            format!(
                r#"{{"language":"python","code":"{}"}}"#,
                "#".repeat((1 << 20) + 1)
            )
            .into_bytes(),
            400,
            "invalid_request",
        ),
        (
            "bad secret name",
            "PUT",
            "/v1/secrets/..%2f..%2fetc",
            vec![a, json_ct],
            br#"{"value":"x"}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "secret value too large",
            "PUT",
            "/v1/secrets/big",
            vec![a, json_ct],
            format!(r#"{{"value":"{}"}}"#, "v".repeat(65 << 10)).into_bytes(),
            400,
            "invalid_request",
        ),
        (
            "unknown query parameter",
            "GET",
            "/v1/executions?tenant=other",
            vec![a],
            Vec::new(),
            400,
            "invalid_request",
        ),
        (
            "bad cursor",
            "GET",
            "/v1/executions?cursor=abc",
            vec![a],
            Vec::new(),
            400,
            "invalid_request",
        ),
        (
            "limit out of range",
            "GET",
            "/v1/executions?limit=100000",
            vec![a],
            Vec::new(),
            400,
            "invalid_request",
        ),
        (
            "unknown execution",
            "GET",
            "/v1/executions/ex_doesnotexist",
            vec![a],
            Vec::new(),
            404,
            "not_found",
        ),
        (
            "path traversal id",
            "GET",
            "/v1/executions/..%2f..%2fetc%2fpasswd",
            vec![a],
            Vec::new(),
            404,
            "not_found",
        ),
        (
            "path not UTF-8",
            "GET",
            "/v1/executions/%ff%fe",
            vec![a],
            Vec::new(),
            400,
            "invalid_request",
        ),
        (
            "unknown route",
            "GET",
            "/v1/nothing",
            vec![a],
            Vec::new(),
            404,
            "not_found",
        ),
        (
            "wrong method",
            "DELETE",
            "/v1/executions",
            vec![a],
            Vec::new(),
            405,
            "method_not_allowed",
        ),
    ];
    for (name, method, path, headers, body, status, code) in cases {
        let r = raw(s.addr, method, path, &headers, Some(&body));
        assert_eq!(r.status, status, "{name}: {}", r.text());
        let p = r.problem(status, code);
        let detail = p["detail"].as_str().unwrap();
        assert!(
            !detail.contains(&data_dir) && !detail.contains("/tmp") && !detail.contains("/proc"),
            "{name}: detail leaks a host path: {detail}"
        );
        assert!(detail.len() < 400, "{name}: detail too long");
    }
    // Nothing was lost and the server still works.
    let v = s.run(&key, "shell", "echo still-up");
    assert_eq!(v["result"]["stdout"], "still-up\n");
    let list = s.get("/v1/executions", &key).json();
    assert_eq!(list["executions"].as_array().unwrap().len(), 1);
}

#[test]
fn queue_full_gets_429() {
    let s = Server::start_with(&["--max-concurrent", "1", "--queue-size", "1"]);
    let key = s.tenant("acme");
    let slow = json!({"language": "shell", "code": "sleep 2", "wait": false});
    let a = s.post("/v1/executions", &key, slow.clone());
    let b = s.post("/v1/executions", &key, slow.clone());
    assert_eq!(
        (a.status, b.status),
        (202, 202),
        "{} {}",
        a.text(),
        b.text()
    );
    let c = s.post("/v1/executions", &key, slow.clone());
    c.problem(429, "queue_full");
    assert!(c.header("retry-after").is_some());
    let first = a.json()["id"].as_str().unwrap().to_string();
    s.wait_status(&key, &first, &["running"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let m = loop {
        let m = s.req("GET", "/metrics", None, None).text();
        if m.contains("airlock_running_executions 1") || std::time::Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert!(m.contains("airlock_queue_depth 1"), "{m}");
    assert!(m.contains("airlock_running_executions 1"), "{m}");
    assert!(m.contains("airlock_queue_rejections_total 1"), "{m}");
    // Both accepted ones finish, in order.
    for r in [a, b] {
        let id = r.json()["id"].as_str().unwrap().to_string();
        assert_eq!(s.wait_status(&key, &id, &["finished"])["reason"], "exited");
    }
    // Capacity is back.
    assert_eq!(s.post("/v1/executions", &key, slow).status, 202);
}

#[test]
fn limits_no_sandbox_can_start_with_are_the_tenants_error_not_an_internal_one() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    for (lang, limits, want) in [
        ("python", json!({"pids": 1}), "limits.pids = 1 is below 3"),
        (
            "javascript",
            json!({"pids": 8}),
            "limits.pids = 8 is below 9",
        ),
        (
            "javascript",
            json!({"open_files": 16}),
            "limits.open_files = 16 is below 20",
        ),
    ] {
        let r = s.post(
            "/v1/executions",
            &key,
            json!({"language": lang, "code": "1", "limits": limits}),
        );
        let p = r.problem(400, "invalid_request");
        assert!(p["detail"].as_str().unwrap().contains(want), "{p}");
    }
    // Nothing was recorded as an execution (refused before admission).
    let list = s.get("/v1/executions", &key).json();
    assert_eq!(list["executions"].as_array().unwrap().len(), 0);
    // Positive control: the smallest accepted value runs.
    let r = s.post(
        "/v1/executions",
        &key,
        json!({"language": "python", "code": "print(1)", "limits": {"pids": 3}}),
    );
    assert_eq!(r.json()["result"]["stdout"], "1\n", "{}", r.text());
    // A server whose own base policy no sandbox could start with refuses
    // to start, with one line.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("airlock.toml");
    std::fs::write(&cfg, "[policy.limits]\npids = 2\n").unwrap();
    let out = std::process::Command::new(crate::BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            cfg.to_str().unwrap(),
        ])
        .env("AIRLOCK_DATA_DIR", dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("limits.pids = 2 is below 3"), "{err}");
}

/// A request's `memory_mib` must hold the largest code this server
/// accepts (it is written into scratch, charged to the sandbox's memory):
/// below that it is the tenant's error, 400 before anything is admitted
/// (as the OpenAPI document's minimum says), never an internal error once
/// a big code arrives. Egress costs a task (the forwarder). A base policy
/// whose largest code fits in neither its scratch nor its memory stops
/// the server at start, with one line.
#[test]
fn limits_the_largest_code_or_egress_needs_are_the_tenants_error_not_an_internal_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("airlock.toml");
    std::fs::write(
        &cfg,
        "[policy.limits]\ncode_bytes = 16777216\n[egress]\nallow = [\"127.0.0.1:9\"]\ndns = \"127.0.0.1:53\"\n",
    )
    .unwrap();
    let s = Server::start_with(&["--config", cfg.to_str().unwrap()]);
    let key = s.tenant("acme");
    let egress = json!({"allow": ["127.0.0.1:9"]});
    for (body, want) in [
        (
            json!({"language": "python", "code": "print(1)", "limits": {"memory_mib": 16}}),
            "limits.memory_mib = 16 is below 17, the least that holds limits.code_bytes = 16777216",
        ),
        (
            json!({"language": "python", "code": "print(1)", "network": egress, "limits": {"pids": 3}}),
            "limits.pids = 3 is below 4, the fewest tasks a python sandbox with egress starts with",
        ),
        (
            json!({"language": "javascript", "code": "1", "network": egress, "limits": {"pids": 9}}),
            "limits.pids = 9 is below 10, the fewest tasks a javascript sandbox with egress starts with",
        ),
    ] {
        let r = s.post("/v1/executions", &key, body);
        let p = r.problem(400, "invalid_request");
        assert!(p["detail"].as_str().unwrap().contains(want), "{p}");
    }
    let list = s.get("/v1/executions", &key).json();
    assert_eq!(list["executions"].as_array().unwrap().len(), 0, "{list}");
    // The document says so.
    let doc = s.req("GET", "/openapi.json", None, None).json();
    assert_eq!(
        doc["components"]["schemas"]["LimitsRequest"]["properties"]["memory_mib"]["minimum"],
        17
    );
    // Positive controls: the smallest accepted values run.
    for body in [
        json!({"language": "python", "code": "print(1)", "limits": {"memory_mib": 17}}),
        json!({"language": "python", "code": "print(1)", "network": egress, "limits": {"pids": 4}}),
        json!({"language": "javascript", "code": "console.log(1)", "network": egress, "limits": {"pids": 10}}),
    ] {
        let v = s.exec(&key, body.clone());
        assert_eq!(
            (
                v["result"]["reason"].as_str(),
                v["result"]["stdout"].as_str()
            ),
            (Some("exited"), Some("1\n")),
            "{body}: {v}"
        );
    }
    // Base policies no code of their largest size could start with.
    for (config, want) in [
        (
            "[policy.filesystem]\nscratch_mib = 1\n[policy.limits]\ncode_bytes = 1048577\n",
            "limits.code_bytes = 1048577 does not fit in filesystem.scratch_mib = 1",
        ),
        (
            "[policy.limits]\nmemory_mib = 8\ncode_bytes = 8388608\n",
            "limits.memory_mib = 8 is below 9",
        ),
    ] {
        std::fs::write(&cfg, config).unwrap();
        let out = std::process::Command::new(crate::BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&cfg)
            .env("AIRLOCK_DATA_DIR", dir.path().join("data"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{config}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(want), "{err}");
    }
}
