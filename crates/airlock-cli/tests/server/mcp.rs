//! The MCP server: `/mcp` over Streamable HTTP and `airlock mcp` over
//! stdio, driven by the official python `mcp` client (`mcp_client.py`), and
//! the HTTP endpoint's gate tested with hostile raw requests.

use std::process::Command;

use serde_json::{Value, json};

use crate::{BIN, Server, raw};

const ACCEPT: (&str, &str) = ("Accept", "application/json, text/event-stream");
const JSON: (&str, &str) = ("Content-Type", "application/json");

fn initialize() -> Vec<u8> {
    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"}}})
    .to_string()
    .into_bytes()
}

fn tool_call(id: u64, name: &str, args: Value) -> Vec<u8> {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": name, "arguments": args}})
    .to_string()
    .into_bytes()
}

/// POSTs one JSON-RPC message to `/mcp` with `key` and extra headers.
fn mcp(s: &Server, key: Option<&str>, extra: &[(&str, &str)], body: &[u8]) -> crate::Resp {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut h = vec![ACCEPT, JSON, ("MCP-Protocol-Version", "2025-06-18")];
    if let Some(a) = &auth {
        h.push(("Authorization", a));
    }
    h.extend_from_slice(extra);
    raw(s.addr, "POST", "/mcp", &h, Some(body))
}

/// `key` with its last digit changed: the right key id, a wrong secret.
fn wrong_key(key: &str) -> String {
    let last = if key.ends_with('0') { '1' } else { '0' };
    format!("{}{last}", &key[..key.len() - 1])
}

/// POSTs `body` to `/mcp` with `host` as the only Host header.
fn with_host(s: &Server, host: &str, key: &str, body: &[u8]) -> crate::Resp {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let head = format!(
        "POST /mcp HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nAuthorization: Bearer {key}\r\n\
         Accept: application/json, text/event-stream\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(body).unwrap();
    let mut buf = Vec::new();
    let _ = c.read_to_end(&mut buf);
    crate::parse_response(&buf)
}

fn python_client(s: &Server, transport: &str, key: &str, other: &str) {
    let python = crate::contract::tool("AIRLOCK_CI_PYTHON", &["/opt/airlock-ci/bin/python"]);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/server/mcp_client.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg("-v")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("MCP_TRANSPORT", transport)
        .env("AIRLOCK_URL", format!("http://{}", s.addr))
        .env("AIRLOCK_API_KEY", key)
        .env("AIRLOCK_OTHER_KEY", other)
        .env("AIRLOCK_BIN", BIN)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{transport}: {text}\n{}", s.log());
    // Positive control: every test ran, none was skipped.
    assert!(text.contains("Ran 3 tests"), "{transport}: {text}");
    assert!(text.trim_end().ends_with("OK"), "{transport}: {text}");
}

#[test]
fn python_mcp_client_uses_every_tool_over_http_and_stdio() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let other = s.tenant("other");
    python_client(&s, "http", &key, &other);
    python_client(&s, "stdio", &key, &other);
    // With the default configuration no browser origin may call /mcp
    // (DNS rebinding against a server on loopback), not even the server's
    // own; a client that is not a browser sends none (positive control).
    let own = format!("http://{}", s.addr);
    for origin in ["http://evil.example", own.as_str()] {
        let r = mcp(&s, Some(&key), &[("Origin", origin)], &initialize());
        assert_eq!(r.status, 403, "{origin}: {}", r.text());
    }
    assert_eq!(mcp(&s, Some(&key), &[], &initialize()).status, 200);
    // Each tool call was an API request of the tenant's, audited as such:
    // the sessions the clients opened are acme's, none is other's.
    let mine = s.get("/v1/sessions", &key).json();
    assert_eq!(mine["sessions"].as_array().unwrap().len(), 4, "{mine}");
    let theirs = s.get("/v1/sessions", &other).json();
    assert_eq!(theirs["sessions"], json!([]), "{theirs}");
}

#[test]
fn mcp_endpoint_authenticates_bounds_and_checks_origin() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("airlock.toml");
    std::fs::write(
        &cfg,
        "body_limit_bytes = 65536\n[mcp]\nallowed_origins = [\"https://app.example:8443\"]\n",
    )
    .unwrap();
    let s = Server::start_with(&["--config", cfg.to_str().unwrap()]);
    let key = s.tenant("acme");
    // Positive control: the key initializes, and answers come as JSON.
    let r = mcp(&s, Some(&key), &[], &initialize());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json()["result"]["serverInfo"]["name"], "airlock");
    // No key, a wrong key, two keys: refused before MCP reads anything
    // (not even the tool list), with the API's own problem documents.
    let r = mcp(&s, None, &[], &initialize());
    r.problem(401, "unauthorized");
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"airlock\"")
    );
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}).to_string();
    mcp(&s, None, &[], list.as_bytes()).problem(401, "unauthorized");
    let wrong = wrong_key(&key);
    mcp(&s, Some(&wrong), &[], &initialize()).problem(401, "unauthorized");
    let second = format!("Bearer {key}");
    mcp(&s, Some(&key), &[("Authorization", &second)], &initialize())
        .problem(400, "invalid_request");
    // A browser page of another origin cannot drive it (DNS rebinding);
    // the allowed origin can.
    let r = mcp(
        &s,
        Some(&key),
        &[("Origin", "http://evil.example")],
        &initialize(),
    );
    assert_eq!(r.status, 403, "{}", r.text());
    let r = mcp(
        &s,
        Some(&key),
        &[("Origin", "https://app.example:8443")],
        &initialize(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // Any Host is served (the one Host header a proxy in front sends):
    // the key, not the name, is the boundary.
    let r = with_host(&s, "airlock.internal:443", &key, &initialize());
    assert_eq!(r.status, 200, "{}", r.text());
    // Bodies within the API's cap and depth, like every request.
    let big = tool_call(
        3,
        "sandbox_run",
        json!({"language": "shell", "code": "x".repeat(70_000)}),
    );
    mcp(&s, Some(&key), &[], &big).problem(413, "payload_too_large");
    let deep = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":4,\"method\":\"tools/call\",\"params\":{{\"name\":\"sandbox_run\",\"arguments\":{{\"x\":{}1{}}}}}}}",
        "[".repeat(100),
        "]".repeat(100)
    );
    mcp(&s, Some(&key), &[], deep.as_bytes()).problem(400, "json_too_deep");
    // A tool call is an API request of the caller's: its execution
    // carries the MCP request's id, so the audit trail joins them.
    let r = mcp(
        &s,
        Some(&key),
        &[("X-Request-Id", "mcp-call-1")],
        &tool_call(
            5,
            "sandbox_run",
            json!({"language": "python", "code": "print(1)"}),
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-request-id"), Some("mcp-call-1"));
    let res = &r.json()["result"];
    assert_eq!(res["isError"], false, "{res}");
    let id = res["structuredContent"]["execution_id"].as_str().unwrap();
    let rec = s.get(&format!("/v1/executions/{id}"), &key).json();
    assert_eq!(rec["request_id"], "mcp-call-1", "{rec}");
    // An unknown tool is a protocol error, not a crash.
    let r = mcp(&s, Some(&key), &[], &tool_call(6, "rm_rf", json!({})));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], -32602, "{}", r.text());
}

#[test]
fn mcp_endpoint_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("airlock.toml");
    std::fs::write(&cfg, "[mcp]\nenabled = false\n").unwrap();
    let s = Server::start_with(&["--config", cfg.to_str().unwrap()]);
    let key = s.tenant("acme");
    mcp(&s, Some(&key), &[], &initialize()).problem(404, "not_found");
    // Positive control: the API itself is there.
    assert_eq!(s.get("/v1/sessions", &key).status, 200);
    // Origins the config cannot hold: refused with the config's error
    // (no scheme; no port, which would match every port; `null`).
    for bad in [
        "evil.example",
        "http://localhost",
        "null",
        "https://a.example:99999",
    ] {
        std::fs::write(&cfg, format!("[mcp]\nallowed_origins = [\"{bad}\"]\n")).unwrap();
        let out = Command::new(BIN)
            .args(["serve", "--config", cfg.to_str().unwrap(), "--data-dir"])
            .arg(dir.path().join("d"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("mcp.allowed_origins: \"{bad}\"")),
            "{err}"
        );
    }
}

#[test]
fn adapters_work_for_a_tenant_allowed_one_request_at_a_time() {
    // Each MCP or Piston request and each API call it makes holds the
    // tenant's request slot in turn, never two at once: a tenant limited
    // to one request in flight can use both.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("airlock.toml");
    std::fs::write(&cfg, "max_requests_per_tenant = 1\n").unwrap();
    let s = Server::start_with(&["--config", cfg.to_str().unwrap()]);
    let key = s.tenant("acme");
    let call = |id: u64, name: &str, args: Value| {
        let r = mcp(&s, Some(&key), &[], &tool_call(id, name, args));
        assert_eq!(r.status, 200, "{}", r.text());
        let res = r.json()["result"].clone();
        assert_eq!(res["isError"], false, "{res}");
        res["structuredContent"].clone()
    };
    let out = call(
        1,
        "sandbox_run",
        json!({"language": "python", "code": "print(2)"}),
    );
    assert_eq!(out["stdout"], "2\n");
    // A session through MCP: create, exec, kill, one call after another.
    let sid = call(2, "sandbox_create", json!({}))["session_id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = call(
        3,
        "sandbox_exec",
        json!({"session_id": sid, "command": "echo ok"}),
    );
    assert_eq!(out["stdout"], "ok\n");
    call(4, "sandbox_kill", json!({"session_id": sid}));
    // Piston with two files: a session made, used and ended, all with one
    // slot.
    let body = json!({"language": "python", "version": "*", "args": ["a"],
        "files": [{"name": "m.py", "content": "import sys, h; print(h.x, sys.argv[1])"},
                  {"name": "h.py", "content": "x = 7"}]})
    .to_string();
    let r = raw(
        s.addr,
        "POST",
        "/api/v2/execute",
        &[("Authorization", &key), JSON],
        Some(body.as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["run"]["stdout"], "7 a\n");
    let sessions = s.get("/v1/sessions", &key).json();
    let all = sessions["sessions"].as_array().unwrap();
    assert_eq!(all.len(), 2, "{sessions}");
    assert!(
        all.iter().all(|x| x["end_reason"] == "deleted"),
        "{sessions}"
    );
}

#[test]
fn airlock_mcp_refuses_a_missing_or_wrong_key_and_an_unreachable_server() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let url = format!("http://{}", s.addr);
    let run = |url: &str, key: Option<&str>| {
        let mut c = Command::new(BIN);
        c.args(["mcp", "--server", url])
            .env_remove("AIRLOCK_API_KEY")
            .stdin(std::process::Stdio::null());
        if let Some(k) = key {
            c.env("AIRLOCK_API_KEY", k);
        }
        let out = c.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            out.stdout,
        )
    };
    let (code, err, out) = run(&url, None);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(
        err,
        "airlock: airlock mcp needs the API key in AIRLOCK_API_KEY\n"
    );
    assert!(out.is_empty());
    let wrong = wrong_key(&key);
    let (code, err, _) = run(&url, Some(&wrong));
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(
        err,
        format!("airlock: {url}: the server refused AIRLOCK_API_KEY\n")
    );
    let (code, err, _) = run("ftp://x", Some(&key));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.starts_with("airlock: --server ftp://x: expected"),
        "{err}"
    );
    // Nothing listens on port 1.
    let (code, err, _) = run("http://127.0.0.1:1", Some(&key));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.starts_with("airlock: cannot reach the airlock server at http://127.0.0.1:1:"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // Positive control: the right key serves (stdin at its end: the
    // client went away, and the server stops cleanly).
    let (code, err, _) = run(&url, Some(&key));
    assert_eq!(code, Some(0), "{err}");
}

/// A tool call whose client goes away (or cancels it) cancels the
/// execution it started: it does not run on to its own limits.
#[test]
fn a_tool_call_given_up_by_its_client_cancels_its_execution() {
    use std::io::Write;
    use std::time::{Duration, Instant};
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    // Positive control: an answered call leaves its execution finished.
    let r = mcp(
        &s,
        Some(&key),
        &[],
        &tool_call(
            2,
            "sandbox_run",
            json!({"language": "shell", "code": "echo done"}),
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("done"), "{}", r.text());
    let body = tool_call(
        3,
        "sandbox_run",
        json!({"language": "shell", "code": "sleep 30", "timeout_ms": 60000}),
    );
    let mut c = std::net::TcpStream::connect(s.addr).unwrap();
    let head = format!(
        "POST /mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Accept: application/json, text/event-stream\r\nContent-Type: application/json\r\n\
         MCP-Protocol-Version: 2025-06-18\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(&body).unwrap();
    // Once it runs, the client hangs up.
    let end = Instant::now() + Duration::from_secs(30);
    let id = loop {
        let list = s.get("/v1/executions?limit=10", &key).json();
        let running = list["executions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["status"] == "running")
            .map(|e| e["id"].as_str().unwrap().to_string());
        if let Some(id) = running {
            break id;
        }
        assert!(Instant::now() < end, "never ran: {list}");
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(c);
    let t = Instant::now();
    let v = s.wait_status(&key, &id, &["finished", "failed"]);
    assert_eq!(v["reason"], "cancelled", "{v}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}
