//! Sessions through the API: a workspace that outlives its executions,
//! its files, its limits and its end (asked for, timed out, the server
//! stopping or crashing), and what another tenant or a hostile path can
//! reach of it (nothing).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{Resp, Server, raw};

/// Whether a session's workspace is mounted on the host.
fn mounted(id: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.contains(" airlock-session ") && l.contains(&format!("-{id} ")))
}

fn create(s: &Server, key: &str, body: Value) -> Value {
    let r = s.post("/v1/sessions", key, body);
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    assert_eq!(
        r.header("location"),
        Some(format!("/v1/sessions/{}", v["id"].as_str().unwrap()).as_str())
    );
    v
}

fn exec(s: &Server, key: &str, id: &str, body: Value) -> Value {
    let r = s.post(&format!("/v1/sessions/{id}/exec"), key, body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn put(s: &Server, key: &str, path: &str, bytes: &[u8]) -> Resp {
    let auth = format!("Bearer {key}");
    raw(
        s.addr,
        "PUT",
        path,
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/octet-stream"),
        ],
        Some(bytes),
    )
}

fn delete(s: &Server, key: &str, path: &str) -> Resp {
    s.req("DELETE", path, Some(key), None)
}

/// Polls a session until it ended; returns its view.
fn wait_ended(s: &Server, key: &str, id: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let v = s.get(&format!("/v1/sessions/{id}"), key).json();
        if v["status"] == "ended" {
            return v;
        }
        assert!(Instant::now() < deadline, "the session did not end: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_session_keeps_its_workspace_across_fresh_sandboxes_and_its_files_api_sees_them() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let v = create(&s, &key, json!({"workspace_mib": 8}));
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["status"], "open", "{v}");
    assert_eq!(v["backend"], "process");
    assert_eq!(v["language"], "shell");
    assert_eq!(v["workspace"]["quota_mib"], 8);
    assert_eq!(v["running"], 0);
    assert!(mounted(&id), "the workspace is a file system of its own");

    // Code writes; the next sandbox (a fresh one: another pid namespace,
    // its /tmp empty) reads, starting in /workspace.
    let a = exec(
        &s,
        &key,
        &id,
        json!({"code": "echo one > notes.txt; echo $$ > /tmp/mine; pwd"}),
    );
    assert_eq!(a["result"]["exit_code"], 0, "{a}");
    assert_eq!(a["result"]["stdout"], "/workspace\n");
    assert_eq!(a["session_id"], id.as_str());
    let b = exec(
        &s,
        &key,
        &id,
        json!({"argv": ["sh", "-c", "cat notes.txt; ls /tmp"]}),
    );
    // /tmp is the new sandbox's own: its code file, nothing of the last.
    assert_eq!(b["result"]["stdout"], "one\nmain.sh\n", "{b}");

    // argv is one command: no word of it is parsed by a shell.
    let c = exec(
        &s,
        &key,
        &id,
        json!({"argv": ["echo", "$(id)", "a;b", "it's"], "env": {"GREETING": "hi"}}),
    );
    assert_eq!(c["result"]["stdout"], "$(id) a;b it's\n", "{c}");
    let d = exec(
        &s,
        &key,
        &id,
        json!({"language": "python", "code": "import os; print(os.environ['GREETING'], open('notes.txt').read().strip())", "env": {"GREETING": "hi"}}),
    );
    assert_eq!(d["result"]["stdout"], "hi one\n", "{d}");
    // An injection variable is refused before anything runs.
    let r = s.post(
        &format!("/v1/sessions/{id}/exec"),
        &key,
        json!({"code": "true", "env": {"LD_PRELOAD": "/workspace/x.so"}}),
    );
    let p = r.problem(400, "invalid_request");
    assert!(p["detail"].as_str().unwrap().contains("LD_PRELOAD"), "{p}");
    let r = s.post(
        &format!("/v1/sessions/{id}/exec"),
        &key,
        json!({"code": "true", "argv": ["true"]}),
    );
    r.problem(400, "invalid_request");

    // Files: what the code wrote, the API reads; what the API writes, the
    // code reads.
    let f = s.get(&format!("/v1/sessions/{id}/files/notes.txt"), &key);
    assert_eq!((f.status, f.body.as_slice()), (200, b"one\n".as_slice()));
    assert_eq!(f.header("content-type"), Some("application/octet-stream"));
    let up = put(
        &s,
        &key,
        &format!("/v1/sessions/{id}/files/src/app.py?mode=755"),
        b"print('uploaded')\n",
    );
    assert_eq!(up.status, 200, "{}", up.text());
    assert_eq!(up.json()["type"], "file");
    assert_eq!(up.json()["mode"], 0o755);
    assert_eq!(up.json()["size"], 18);
    let e = exec(
        &s,
        &key,
        &id,
        json!({"language": "python", "code": "exec(open('src/app.py').read())"}),
    );
    assert_eq!(e["result"]["stdout"], "uploaded\n", "{e}");
    let list = s.get(&format!("/v1/sessions/{id}/files"), &key).json();
    let names: Vec<&str> = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["notes.txt", "src"], "{list}");
    assert_eq!(list["truncated"], false);
    let st = s
        .get(&format!("/v1/sessions/{id}/stat?path=src"), &key)
        .json();
    assert_eq!(st["type"], "directory", "{st}");
    delete(&s, &key, &format!("/v1/sessions/{id}/files/src")).problem(409, "directory_not_empty");
    assert_eq!(
        delete(&s, &key, &format!("/v1/sessions/{id}/files/src/app.py")).status,
        204
    );
    s.get(&format!("/v1/sessions/{id}/files/src/app.py"), &key)
        .problem(404, "file_not_found");
    s.get(&format!("/v1/sessions/{id}/files/src"), &key)
        .problem(409, "wrong_type");

    // Streaming: an execution of the session, followed over SSE.
    let r = s.post(
        &format!("/v1/sessions/{id}/exec"),
        &key,
        json!({"code": "echo streamed; cat notes.txt", "wait": false}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let ex = r.json()["id"].as_str().unwrap().to_string();
    let events = crate::follow_sse(s.addr, &format!("/v1/executions/{ex}/events"), &key);
    let fin = &events.last().unwrap().2;
    assert_eq!(fin["result"]["stdout"], "streamed\none\n", "{fin}");
    assert_eq!(fin["session_id"], id.as_str());
    let runs = s.get(&format!("/v1/sessions/{id}/executions"), &key).json();
    assert_eq!(runs["executions"].as_array().unwrap().len(), 6, "{runs}");
    let usage = s.get(&format!("/v1/sessions/{id}"), &key).json();
    assert!(usage["workspace"]["used_bytes"].as_u64().unwrap() > 0);

    // The end: the workspace goes, the record stays.
    assert_eq!(delete(&s, &key, &format!("/v1/sessions/{id}")).status, 204);
    assert!(!mounted(&id), "the workspace went with the session");
    let v = s.get(&format!("/v1/sessions/{id}"), &key).json();
    assert_eq!(
        (v["status"].as_str(), v["end_reason"].as_str()),
        (Some("ended"), Some("deleted")),
        "{v}"
    );
    assert!(v["workspace"]["used_bytes"].is_null());
    s.post(
        &format!("/v1/sessions/{id}/exec"),
        &key,
        json!({"code": "true"}),
    )
    .problem(409, "session_ended");
    s.get(&format!("/v1/sessions/{id}/files/notes.txt"), &key)
        .problem(409, "session_ended");
    delete(&s, &key, &format!("/v1/sessions/{id}")).problem(409, "session_ended");
    let audit = s.get("/v1/audit?limit=500", &key).json();
    let kinds: Vec<&str> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["subject"] == id.as_str())
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "session.create",
            "session.file_write",
            "session.file_delete",
            "session.end"
        ],
        "{audit}"
    );
}

#[test]
fn another_tenants_session_is_not_found_on_every_route() {
    let s = Server::start_with(&[]);
    let a = s.tenant("a");
    let b = s.tenant("b");
    let id = create(&s, &a, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = put(&s, &a, &format!("/v1/sessions/{id}/files/f"), b"a's");
    assert_eq!(r.status, 200);
    let routes: Vec<(&str, String, Option<Value>)> = vec![
        ("GET", format!("/v1/sessions/{id}"), None),
        (
            "POST",
            format!("/v1/sessions/{id}/exec"),
            Some(json!({"code": "cat f"})),
        ),
        ("GET", format!("/v1/sessions/{id}/executions"), None),
        ("GET", format!("/v1/sessions/{id}/files"), None),
        ("GET", format!("/v1/sessions/{id}/files/f"), None),
        ("GET", format!("/v1/sessions/{id}/stat?path=f"), None),
        ("DELETE", format!("/v1/sessions/{id}/files/f"), None),
        ("DELETE", format!("/v1/sessions/{id}"), None),
    ];
    for (method, path, body) in &routes {
        let r = s.req(method, path, Some(&b), body.as_ref());
        r.problem(404, "not_found");
    }
    let r = put(&s, &b, &format!("/v1/sessions/{id}/files/f"), b"b's");
    r.problem(404, "not_found");
    // Ended, it is still not found for b (never 409: that would say it
    // exists).
    let ended = create(&s, &a, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(delete(&s, &a, &format!("/v1/sessions/{ended}")).status, 204);
    s.post(
        &format!("/v1/sessions/{ended}/exec"),
        &a,
        json!({"code": "true"}),
    )
    .problem(409, "session_ended");
    s.post(
        &format!("/v1/sessions/{ended}/exec"),
        &b,
        json!({"code": "true"}),
    )
    .problem(404, "not_found");
    s.get(&format!("/v1/sessions/{ended}"), &b)
        .problem(404, "not_found");
    assert!(
        s.get("/v1/sessions", &b).json()["sessions"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // Positive control: the owner reaches all of it, unchanged by b.
    for (method, path, body) in &routes {
        let r = s.req(method, path, Some(&a), body.as_ref());
        assert!(
            (200..300).contains(&r.status),
            "{method} {path}: {}",
            r.text()
        );
        if path.ends_with("/exec") {
            assert_eq!(r.json()["result"]["stdout"], "a's");
        }
        if path.ends_with("/files/f") && *method == "GET" {
            assert_eq!(r.body, b"a's");
        }
    }
}

#[test]
fn paths_symlinks_and_fifos_planted_by_the_code_never_lead_out_of_the_workspace() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let id = create(&s, &key, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let planted = exec(
        &s,
        &key,
        &id,
        json!({"code": "ln -s /etc etc-link; ln -s /etc/passwd passwd-link; ln -s ../../../../etc/hostname up-link; mkfifo pipe; echo ok > real"}),
    );
    assert_eq!(planted["result"]["exit_code"], 0, "{planted}");
    // Positive control: a plain path reads.
    assert_eq!(
        s.get(&format!("/v1/sessions/{id}/files/real"), &key).body,
        b"ok\n"
    );
    // Symlinks resolve inside the workspace: /etc there does not exist.
    for p in ["etc-link/passwd", "passwd-link", "up-link"] {
        s.get(&format!("/v1/sessions/{id}/files/{p}"), &key)
            .problem(404, "file_not_found");
    }
    // `..` and NUL are refused outright, encoded or not.
    for p in [
        "../../../etc/passwd",
        "%2e%2e/%2e%2e/etc/passwd",
        "a/%2E%2E/%2E%2E/x",
        "real%00.txt",
    ] {
        s.get(&format!("/v1/sessions/{id}/files/{p}"), &key)
            .problem(400, "invalid_path");
    }
    // A FIFO is never opened (the read would hang the server).
    let t = Instant::now();
    s.get(&format!("/v1/sessions/{id}/files/pipe"), &key)
        .problem(409, "wrong_type");
    assert!(t.elapsed() < Duration::from_secs(5));
    // A write through the planted link: while the link's target (taken
    // inside the workspace) does not exist there, refused; once it does,
    // the file lands inside the workspace. Never in the host's /etc.
    let marker = format!("airlock-session-test-{}", std::process::id());
    let through = format!("/v1/sessions/{id}/files/etc-link/{marker}");
    put(&s, &key, &through, b"x").problem(409, "wrong_type");
    assert!(!std::path::Path::new("/etc").join(&marker).exists());
    exec(&s, &key, &id, json!({"code": "mkdir /workspace/etc"}));
    let r = put(&s, &key, &through, b"x");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!std::path::Path::new("/etc").join(&marker).exists());
    let seen = exec(&s, &key, &id, json!({"code": format!("ls /workspace/etc")}));
    assert_eq!(seen["result"]["stdout"], format!("{marker}\n"), "{seen}");
    // Writing over the link replaces the link, not its target.
    let r = put(
        &s,
        &key,
        &format!("/v1/sessions/{id}/files/passwd-link"),
        b"mine",
    );
    assert_eq!(r.status, 200);
    assert!(
        !std::fs::read_to_string("/etc/passwd")
            .unwrap()
            .starts_with("mine")
    );
    let st = s
        .get(&format!("/v1/sessions/{id}/stat?path=passwd-link"), &key)
        .json();
    assert_eq!(st["type"], "file", "{st}");
    // A socket is not a file either, and `..` is refused in queries too.
    exec(
        &s,
        &key,
        &id,
        json!({"language": "python", "code": "import socket; socket.socket(socket.AF_UNIX).bind('sock')"}),
    );
    s.get(&format!("/v1/sessions/{id}/files/sock"), &key)
        .problem(409, "wrong_type");
    s.get(&format!("/v1/sessions/{id}/stat?path=../.."), &key)
        .problem(400, "invalid_path");
    s.get(&format!("/v1/sessions/{id}/files?path=a/../../b"), &key)
        .problem(400, "invalid_path");
    // A file the code made read-only stays so for the API too.
    exec(
        &s,
        &key,
        &id,
        json!({"code": "mkdir locked && echo x > locked/f && chmod 555 locked"}),
    );
    put(&s, &key, &format!("/v1/sessions/{id}/files/locked/g"), b"y")
        .problem(403, "permission_denied");
}

#[test]
fn quotas_limits_and_caps_refuse_with_their_own_codes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("airlock.toml");
    std::fs::write(
        &cfg,
        "[sessions]\nmax_per_tenant = 2\nmax_file_bytes = 65536\nworkspace_mib = 16\nmax_workspace_mib = 64\nmax_snapshots = 2\n",
    )
    .unwrap();
    let s = Server::start_with(&["--config", cfg.to_str().unwrap()]);
    let key = s.tenant("acme");
    s.post("/v1/sessions", &key, json!({"workspace_mib": 65}))
        .problem(400, "invalid_request");
    s.post("/v1/sessions", &key, json!({"backend": "gvisor"}))
        .problem(422, "isolation_unavailable");
    s.post("/v1/sessions", &key, json!({"nope": 1}))
        .problem(400, "invalid_request");
    let small = create(&s, &key, json!({"workspace_mib": 1, "workspace_files": 16}));
    let id = small["id"].as_str().unwrap().to_string();
    let other = create(&s, &key, json!({}));
    s.post("/v1/sessions", &key, json!({}))
        .problem(429, "too_many_sessions");
    // The byte quota: the kernel's, for uploads and code alike; a full
    // workspace keeps what it had.
    let half = vec![b'a'; 60_000];
    assert_eq!(
        put(&s, &key, &format!("/v1/sessions/{id}/files/a"), &half).status,
        200
    );
    let fill = exec(
        &s,
        &key,
        &id,
        json!({"code": "head -c 2000000 /dev/zero > big; echo status=$?; rm -f big"}),
    );
    assert!(
        fill["result"]["stderr"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{fill}"
    );
    for i in 0..20 {
        let r = put(&s, &key, &format!("/v1/sessions/{id}/files/d/{i}"), &half);
        if r.status != 200 {
            r.problem(507, "workspace_full");
            break;
        }
        assert!(i < 19, "twenty 60 kB files fit a 1 MiB workspace");
    }
    // Replacing a file with one that does not fit leaves the old one whole.
    put(
        &s,
        &key,
        &format!("/v1/sessions/{id}/files/a"),
        &vec![b'b'; 60_000],
    )
    .problem(507, "workspace_full");
    assert_eq!(
        s.get(&format!("/v1/sessions/{id}/files/a"), &key).body,
        half,
        "the old file is whole"
    );
    // Uploads and downloads are capped per request.
    put(
        &s,
        &key,
        &format!("/v1/sessions/{id}/files/huge"),
        &vec![0u8; 65_537],
    )
    .problem(413, "payload_too_large");
    let other_id = other["id"].as_str().unwrap();
    exec(
        &s,
        &key,
        other_id,
        json!({"code": "head -c 70000 /dev/zero > big"}),
    );
    s.get(&format!("/v1/sessions/{other_id}/files/big"), &key)
        .problem(422, "file_too_large");
    // Ending one makes room for another.
    assert_eq!(delete(&s, &key, &format!("/v1/sessions/{id}")).status, 204);
    let third = create(&s, &key, json!({"snapshot_after_exec": true}));
    // Snapshots per session: one after an execution, one requested
    // (positive controls), then refused whichever way they come.
    let tid = third["id"].as_str().unwrap();
    let snaps = format!("/v1/sessions/{tid}/snapshots");
    exec(&s, &key, tid, json!({"code": "echo 1 > a"}));
    assert_eq!(s.req("POST", &snaps, Some(&key), None).status, 201);
    s.req("POST", &snaps, Some(&key), None)
        .problem(409, "too_many_snapshots");
    let last = exec(&s, &key, tid, json!({"code": "echo 2 > a"}));
    let listed = s.get(&snaps, &key).json();
    let reasons: Vec<&str> = listed["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["after_exec", "requested"], "{listed}");
    // The execution without its snapshot says why, in the audit trail.
    let audit = s.get("/v1/audit?limit=500", &key).json();
    let refused: Vec<&Value> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "session.snapshot_refused")
        .collect();
    assert_eq!(refused.len(), 1, "{audit}");
    assert_eq!(refused[0]["subject"], tid);
    assert_eq!(refused[0]["detail"]["execution_id"], last["id"]);
    assert_eq!(refused[0]["detail"]["reason"], "too_many_snapshots");
}

#[test]
fn idle_timeout_and_lifetime_end_sessions_and_kill_what_runs() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let idle = create(&s, &key, json!({"idle_timeout_secs": 1}));
    let idle_id = idle["id"].as_str().unwrap().to_string();
    let life = create(
        &s,
        &key,
        json!({"lifetime_secs": 2, "idle_timeout_secs": 600}),
    );
    let life_id = life["id"].as_str().unwrap().to_string();
    let control = create(&s, &key, json!({}));
    let control_id = control["id"].as_str().unwrap().to_string();
    // Something runs in the short-lived one past its lifetime.
    let r = s.post(
        &format!("/v1/sessions/{life_id}/exec"),
        &key,
        json!({"code": "sleep 30", "wait": false, "limits": {"wall_time_ms": 40000}}),
    );
    assert_eq!(r.status, 202);
    let running = r.json()["id"].as_str().unwrap().to_string();
    s.wait_status(&key, &running, &["running"]);
    let v = wait_ended(&s, &key, &idle_id, Duration::from_secs(10));
    assert_eq!(v["end_reason"], "idle_timeout", "{v}");
    let v = wait_ended(&s, &key, &life_id, Duration::from_secs(10));
    assert_eq!(v["end_reason"], "lifetime", "{v}");
    let ex = s.wait_status(&key, &running, &["finished", "failed"]);
    assert_eq!(ex["reason"], "cancelled", "{ex}");
    assert!(!mounted(&idle_id) && !mounted(&life_id));
    // A running execution holds the idle clock: a run three times longer
    // than the idle timeout ends normally and the session is still open.
    let busy = create(&s, &key, json!({"idle_timeout_secs": 1}));
    let busy_id = busy["id"].as_str().unwrap().to_string();
    let long = exec(&s, &key, &busy_id, json!({"code": "sleep 3; echo done"}));
    assert_eq!(
        (long["reason"].as_str(), long["result"]["stdout"].as_str()),
        (Some("exited"), Some("done\n")),
        "{long}"
    );
    let v = s.get(&format!("/v1/sessions/{busy_id}"), &key).json();
    assert_eq!(v["status"], "open", "{v}");
    let v = wait_ended(&s, &key, &busy_id, Duration::from_secs(10));
    assert_eq!(v["end_reason"], "idle_timeout");
    // Control: a session with the default timeouts is still open.
    let c = s.get(&format!("/v1/sessions/{control_id}"), &key).json();
    assert_eq!(c["status"], "open", "{c}");
    assert!(mounted(&control_id));
}

#[test]
fn a_crash_ends_open_sessions_on_restart_and_a_stop_ends_them_at_once() {
    let mut s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let id = create(&s, &key, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        put(&s, &key, &format!("/v1/sessions/{id}/files/f"), b"x").status,
        200
    );
    assert!(mounted(&id));
    s.crash();
    // The crash leaves the workspace mounted: the restart reaps it.
    assert!(mounted(&id), "positive control: a crash leaves the mount");
    s.start();
    assert!(!mounted(&id), "the restarted server reaped the workspace");
    let v = s.get(&format!("/v1/sessions/{id}"), &key).json();
    assert_eq!(
        (v["status"].as_str(), v["end_reason"].as_str()),
        (Some("ended"), Some("server_restart")),
        "{v}"
    );
    s.post(
        &format!("/v1/sessions/{id}/exec"),
        &key,
        json!({"code": "true"}),
    )
    .problem(409, "session_ended");
    // A clean stop ends the sessions it holds.
    let id2 = create(&s, &key, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (st, _) = s.terminate();
    assert!(st.success());
    assert!(!mounted(&id2));
    let rows = crate::query(
        &s.data().join("airlock.db"),
        &format!("SELECT end_reason FROM sessions WHERE id = '{id2}'"),
    );
    assert_eq!(rows, json!([["server_shutdown"]]));
    assert_eq!(
        crate::admin(&s.data(), &["audit", "verify"]).status.code(),
        Some(0)
    );
}

#[test]
fn a_rootless_server_says_sessions_are_unavailable() {
    let s = Server::start_unprivileged(&[]);
    let key = s.tenant("acme");
    let p = s
        .post("/v1/sessions", &key, json!({}))
        .problem(501, "sessions_unavailable");
    assert!(!p["detail"].as_str().unwrap().contains('/'), "{p}");
    // Positive control: it runs executions.
    assert_eq!(s.run(&key, "shell", "echo ok")["result"]["stdout"], "ok\n");
}

#[test]
fn an_ended_workspace_still_held_by_a_queued_execution_counts_until_it_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("airlock.toml");
    std::fs::write(
        &cfg,
        "max_concurrent = 1\n[sessions]\nmax_per_tenant = 1\n[tenants]\nmax_queued = 4\n",
    )
    .unwrap();
    let s = Server::start_with(&["--config", cfg.to_str().unwrap()]);
    let key = s.tenant("acme");
    // The only worker is busy.
    let r = s.post(
        "/v1/executions",
        &key,
        json!({"language": "shell", "code": "sleep 30", "wait": false, "limits": {"wall_time_ms": 40000}}),
    );
    let blocker = r.json()["id"].as_str().unwrap().to_string();
    s.wait_status(&key, &blocker, &["running"]);
    let id = create(&s, &key, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = s.post(
        &format!("/v1/sessions/{id}/exec"),
        &key,
        json!({"code": "echo never", "wait": false}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let queued = r.json()["id"].as_str().unwrap().to_string();
    assert_eq!(delete(&s, &key, &format!("/v1/sessions/{id}")).status, 204);
    // The queued execution still holds the workspace: it counts.
    assert!(mounted(&id), "positive control: still held");
    s.post("/v1/sessions", &key, json!({}))
        .problem(429, "too_many_sessions");
    // Once the worker frees, the queued one only records its end, and the
    // workspace goes.
    assert_eq!(
        s.post(&format!("/v1/executions/{blocker}/cancel"), &key, json!({}))
            .status,
        202
    );
    let q = s.wait_status(&key, &queued, &["failed", "finished"]);
    assert_eq!(q["reason"], "cancelled", "{q}");
    assert!(q["result"].is_null(), "it never ran: {q}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while mounted(&id) {
        assert!(Instant::now() < deadline, "the workspace stayed mounted");
        std::thread::sleep(Duration::from_millis(50));
    }
    create(&s, &key, json!({}));
}

/// BLAKE3 is not in python's standard library: hashes of snapshot
/// contents are checked by the server's own reads; SHA-256 digests of
/// evidence by python here.
pub(crate) fn python(script: &str, input: &[u8]) -> String {
    use std::io::Write;
    let mut c = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(input).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn snapshots_keep_what_changed_diff_download_and_restore_into_a_new_session() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let other = s.tenant("other");
    let id = create(&s, &key, json!({"snapshot_after_exec": true}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let first = exec(
        &s,
        &key,
        &id,
        json!({"code": "echo one > a.txt; mkdir d; printf 'bb' > d/b.bin; ln -s a.txt link; echo same > keep"}),
    );
    let list = s.get(&format!("/v1/sessions/{id}/snapshots"), &key).json();
    let snaps = list["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 1, "{list}");
    assert_eq!(snaps[0]["reason"], "after_exec");
    assert_eq!(snaps[0]["execution_id"], first["id"]);
    let s1 = snaps[0]["id"].as_str().unwrap().to_string();
    let m = s.get(&format!("/v1/snapshots/{s1}"), &key).json();
    let entries: Vec<(String, String)> = m["manifest"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap().into(),
                e["type"].as_str().unwrap().into(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("a.txt", "file"),
        ("d", "directory"),
        ("d/b.bin", "file"),
        ("keep", "file"),
        ("link", "symlink"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(entries, want, "{m}");

    exec(
        &s,
        &key,
        &id,
        json!({"code": "echo two >> a.txt; rm d/b.bin; echo new > c.txt"}),
    );
    let s2 = s.get(&format!("/v1/sessions/{id}/snapshots"), &key).json()["snapshots"][1]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let d = s
        .get(&format!("/v1/snapshots/{s2}/diff?against={s1}"), &key)
        .json();
    let paths = |k: &str| -> Vec<String> {
        d[k].as_array()
            .unwrap()
            .iter()
            .map(|e| e["path"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(paths("added"), ["c.txt"], "{d}");
    assert_eq!(paths("removed"), ["d/b.bin"], "{d}");
    assert_eq!(paths("changed"), ["a.txt"], "{d}");
    assert_eq!(d["changed"][0]["before"]["size"], 4);
    assert_eq!(d["changed"][0]["after"]["size"], 8);
    assert_ne!(
        d["changed"][0]["before"]["hash"],
        d["changed"][0]["after"]["hash"]
    );

    // Content-addressed: a snapshot of an unchanged workspace stores no
    // new blob.
    let blobs = s.data().join("blobs");
    let count = || walk_files(&blobs);
    let before = count();
    let r = s.post(&format!("/v1/sessions/{id}/snapshots"), &key, json!({}));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["reason"], "requested");
    let s3 = r.json()["id"].as_str().unwrap().to_string();
    assert_eq!(count(), before, "nothing new to store");
    let same = s
        .get(&format!("/v1/snapshots/{s3}/diff?against={s2}"), &key)
        .json();
    assert_eq!(
        (
            same["added"].as_array().unwrap().len(),
            same["removed"].as_array().unwrap().len(),
            same["changed"].as_array().unwrap().len()
        ),
        (0, 0, 0),
        "{same}"
    );

    // The archive, read by python's tarfile.
    let tar = s.get(&format!("/v1/snapshots/{s1}/tar"), &key);
    assert_eq!(tar.status, 200);
    assert_eq!(tar.header("content-type"), Some("application/x-tar"));
    let listing = python(
        "import io,sys,tarfile\nt=tarfile.open(fileobj=io.BytesIO(sys.stdin.buffer.read()))\n\
         for m in t.getmembers():\n  x=t.extractfile(m).read().decode() if m.isfile() else (m.linkname if m.issym() else '')\n  print(m.name, m.type.decode(), repr(x))",
        &tar.body,
    );
    assert_eq!(
        listing, "a.txt 0 'one\\n'\nd 5 ''\nd/b.bin 0 'bb'\nkeep 0 'same\\n'\nlink 2 'a.txt'\n",
        "{listing}"
    );

    // Restored into a new session: the first snapshot's workspace.
    let restored = create(&s, &key, json!({"from_snapshot": s1}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = exec(
        &s,
        &key,
        &restored,
        json!({"code": "cat a.txt d/b.bin; echo; readlink link; ls"}),
    );
    assert_eq!(
        r["result"]["stdout"], "one\nbb\na.txt\na.txt\nd\nkeep\nlink\n",
        "{r}"
    );

    // Another tenant reaches none of it.
    s.get(&format!("/v1/snapshots/{s1}"), &other)
        .problem(404, "not_found");
    s.get(&format!("/v1/snapshots/{s1}/tar"), &other)
        .problem(404, "not_found");
    s.post("/v1/sessions", &other, json!({"from_snapshot": s1}))
        .problem(404, "not_found");
    s.get(&format!("/v1/sessions/{id}/snapshots"), &other)
        .problem(404, "not_found");

    // A blob changed on disk is refused when read: the restore fails and
    // leaves no session behind.
    let a_hash = m["manifest"][0]["hash"].as_str().unwrap().to_string();
    let tenant_dir = std::fs::read_dir(&blobs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let blob = tenant_dir.join(&a_hash[..2]).join(&a_hash);
    std::fs::write(&blob, b"forged\n").unwrap();
    let open_before = s.get("/v1/sessions", &key).json()["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["status"] == "open")
        .count();
    s.post("/v1/sessions", &key, json!({"from_snapshot": s1}))
        .problem(500, "internal");
    let open_after = s.get("/v1/sessions", &key).json()["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["status"] == "open")
        .count();
    assert_eq!(open_before, open_after);
    assert!(s.log().contains("holds bytes of hash"));
}

fn walk_files(dir: &std::path::Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            if e.file_type().unwrap().is_dir() {
                walk_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

#[test]
fn evidence_bundles_are_anchored_in_the_audit_chain_and_checkable_outside_airlock() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let id = create(&s, &key, json!({"snapshot_after_exec": true}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    exec(&s, &key, &id, json!({"code": "echo start > log.txt"}));
    let run = exec(
        &s,
        &key,
        &id,
        json!({"code": "echo more >> log.txt; echo result > out.txt; exit 3", "limits": {"wall_time_ms": 5000}}),
    );
    let ex = run["id"].as_str().unwrap();
    let r = s.get(&format!("/v1/executions/{ex}/evidence"), &key);
    assert_eq!(r.status, 200, "{}", r.text());
    let ev = r.json();
    let body = &ev["body"];
    assert_eq!(body["kind"], "execution");
    assert_eq!(body["execution"]["id"], ex);
    assert_eq!(body["execution"]["result"]["exit_code"], 3);
    assert_eq!(
        body["execution"]["result"]["enforced"]["backend"],
        "process"
    );
    assert_eq!(body["policy"]["limits"]["wall_time_ms"], 5000, "{body}");
    let kinds: Vec<&str> = body["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["execution.accept", "execution.start", "execution.finish"],
        "{body}"
    );
    let diff = &body["workspace_diff"];
    assert_eq!(diff["added"][0]["path"], "out.txt", "{diff}");
    assert_eq!(diff["changed"][0]["path"], "log.txt", "{diff}");
    // The digest, recomputed by python from the body alone.
    let check = "import hashlib,json,sys\nb=json.load(sys.stdin)['body']\n\
                 print(hashlib.sha256(json.dumps(b,sort_keys=True,separators=(',',':'),ensure_ascii=False).encode()).hexdigest())";
    let digest = python(check, &r.body);
    assert_eq!(digest.trim(), ev["digest"].as_str().unwrap());
    // The anchor is in the chain, naming that digest.
    let audit = s.get("/v1/audit?limit=500", &key).json();
    let anchor = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["hash"] == ev["anchor"]["hash"])
        .expect("the anchor is an audit record");
    assert_eq!(anchor["kind"], "evidence.issue");
    assert_eq!(anchor["subject"], ex);
    assert_eq!(anchor["detail"]["digest"], ev["digest"]);
    // A bundle edited afterwards no longer matches.
    let mut forged = ev.clone();
    forged["body"]["execution"]["result"]["exit_code"] = json!(0);
    let forged_digest = python(check, forged.to_string().as_bytes());
    assert_ne!(forged_digest.trim(), ev["digest"].as_str().unwrap());

    let r = s.get(&format!("/v1/sessions/{id}/evidence"), &key);
    assert_eq!(r.status, 200, "{}", r.text());
    let sev = r.json();
    assert_eq!(sev["body"]["kind"], "session");
    assert_eq!(sev["body"]["executions"].as_array().unwrap().len(), 2);
    assert_eq!(sev["body"]["executions"][1]["exit_code"], 3);
    assert_eq!(sev["body"]["snapshots"].as_array().unwrap().len(), 2);
    assert_eq!(
        python(check, &r.body).trim(),
        sev["digest"].as_str().unwrap()
    );
    let other = s.tenant("other");
    s.get(&format!("/v1/executions/{ex}/evidence"), &other)
        .problem(404, "not_found");
    s.get(&format!("/v1/sessions/{id}/evidence"), &other)
        .problem(404, "not_found");
    drop(s.get("/v1/audit", &key));
    assert_eq!(
        crate::admin(&s.data(), &["audit", "verify"]).status.code(),
        Some(0)
    );
}

#[test]
fn sessions_on_the_oci_and_gvisor_backends_keep_their_workspace_behind_their_walls() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("airlock.toml");
    std::fs::write(
        &cfg,
        "[backends]\noffer = [\"process\", \"oci\", \"gvisor\"]\n[pool]\npython = 0\njavascript = 0\n",
    )
    .unwrap();
    let s = Server::start_with(&["--config", cfg.to_str().unwrap()]);
    let key = s.tenant("acme");
    // The cheapest backend holding sessions is still the default; a
    // minimum isolation picks the one that meets it.
    let plain = create(&s, &key, json!({}));
    assert_eq!(plain["backend"], "process", "{plain}");
    let strong = create(&s, &key, json!({"isolation": "gvisor"}));
    assert_eq!(strong["backend"], "gvisor", "{strong}");
    let v = s
        .post("/v1/sessions", &key, json!({"isolation": "microvm"}))
        .problem(422, "isolation_unavailable");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("sessions run on process, oci, gvisor here"),
        "{v}"
    );
    for backend in ["oci", "gvisor"] {
        let ses = create(
            &s,
            &key,
            json!({"backend": backend, "language": "python", "workspace_mib": 1}),
        );
        assert_eq!(ses["backend"], backend);
        let id = ses["id"].as_str().unwrap();
        let base = format!("/v1/sessions/{id}");
        assert_eq!(
            put(&s, &key, &format!("{base}/files/in.txt"), b"hello").status,
            200
        );
        // The sandbox reads the upload, starts in /workspace, writes a
        // file the next sandbox and the files API find, as its user.
        let r = exec(
            &s,
            &key,
            id,
            json!({"argv": ["sh", "-c", "cat in.txt; pwd; id -u; echo out > out.txt; stat -c %u out.txt"]}),
        );
        assert_eq!(r["result"]["enforced"]["backend"], backend, "{r}");
        assert_eq!(
            r["result"]["stdout"], "hello/workspace\n1000\n1000\n",
            "{backend}: {r}"
        );
        let r = exec(
            &s,
            &key,
            id,
            json!({"code": "import os\nprint(open('out.txt').read().strip(), sorted(os.listdir('.')))"}),
        );
        assert_eq!(
            r["result"]["stdout"], "out ['in.txt', 'out.txt']\n",
            "{backend}: {r}"
        );
        assert_eq!(
            s.get(&format!("{base}/files/out.txt"), &key).text(),
            "out\n"
        );
        // Nothing of the host's paths shows in the sandbox's mount table.
        let r = exec(
            &s,
            &key,
            id,
            json!({"argv": ["sh", "-c", "grep ' /workspace ' /proc/self/mountinfo"]}),
        );
        let line = r["result"]["stdout"].as_str().unwrap().to_string();
        assert!(line.contains(" / /workspace rw"), "{backend}: {line}");
        if backend == "oci" {
            assert!(line.contains(" /workspace rw,nosuid,nodev"), "{line}");
            assert!(line.contains(" - tmpfs airlock-session "), "{line}");
        }
        let data = s.data().to_string_lossy().to_string();
        assert!(
            !line.contains("/run/") && !line.contains(&data),
            "{backend}: {line}"
        );
        // Its quota holds inside (ENOSPC), and the old file stays whole.
        let r = exec(
            &s,
            &key,
            id,
            json!({"argv": ["sh", "-c", "head -c 2000000 /dev/zero > big; echo rc=$?"]}),
        );
        assert!(
            r["result"]["stdout"].as_str().unwrap().contains("rc=1"),
            "{backend}: {r}"
        );
        assert!(
            r["result"]["stderr"]
                .as_str()
                .unwrap()
                .contains("No space left on device"),
            "{backend}: {r}"
        );
        assert_eq!(s.get(&format!("{base}/files/in.txt"), &key).text(), "hello");
        // A symlink the sandbox plants leads nowhere out of the workspace
        // (it resolves inside it, where there is no /etc/passwd).
        exec(
            &s,
            &key,
            id,
            json!({"argv": ["ln", "-s", "/etc/passwd", "leak"]}),
        );
        s.get(&format!("{base}/files/leak"), &key)
            .problem(404, "file_not_found");
        // Its end unmounts the workspace.
        assert!(mounted(id));
        assert_eq!(delete(&s, &key, &base).status, 204);
        assert!(!mounted(id));
    }
}

/// The virtiofsd serving a session's workspace (a child of the server's
/// monitor): the one running as the session's uid.
fn virtiofsd_of(uid: u32) -> Option<u32> {
    std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let owner = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))?
            .split_whitespace()
            .next()?
            .parse::<u32>()
            .ok()?;
        (String::from_utf8_lossy(&cmd).contains("virtiofsd") && owner == uid).then_some(pid)
    })
}

#[test]
fn microvm_sessions_share_their_workspace_with_each_vm_through_a_confined_virtiofsd() {
    if !crate::backends::microvm_here() {
        panic!("the microvm backend needs root, qemu-system-x86 and erofs-utils");
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("airlock.toml");
    std::fs::write(
        &cfg,
        "[backends]\noffer = [\"process\", \"microvm\"]\npools = []\n\
         [backends.microvm]\naccel = \"tcg\"\n[pool]\npython = 0\njavascript = 0\n",
    )
    .unwrap();
    let s = Server::start_with(&["--config", cfg.to_str().unwrap()]);
    let key = s.tenant("acme");
    // The strongest backend holding sessions is chosen by the minimum.
    let ses = create(
        &s,
        &key,
        json!({"isolation": "microvm", "workspace_mib": 1, "workspace_files": 64}),
    );
    assert_eq!(ses["backend"], "microvm", "{ses}");
    let id = ses["id"].as_str().unwrap();
    let base = format!("/v1/sessions/{id}");
    assert_eq!(
        put(&s, &key, &format!("{base}/files/in.txt"), b"hello").status,
        200
    );
    // The VM reads the upload as its user's (and may append to it),
    // starts in /workspace, and writes a file the next VM and the files
    // API find.
    let r = exec(
        &s,
        &key,
        id,
        json!({"argv": ["sh", "-c",
            "cat in.txt; echo; pwd; id -u; stat -c %u in.txt; echo ' more' >> in.txt; \
             echo out > out.txt; stat -c %u out.txt"]}),
    );
    assert_eq!(
        r["result"]["enforced"]["backend"],
        "microvm",
        "{r}\n{}",
        s.log()
    );
    assert_eq!(
        r["result"]["stdout"], "hello\n/workspace\n1000\n1000\n1000\n",
        "{r}"
    );
    assert_eq!(
        s.get(&format!("{base}/files/in.txt"), &key).text(),
        "hello more\n"
    );
    assert_eq!(
        s.get(&format!("{base}/files/out.txt"), &key).text(),
        "out\n"
    );
    // On the host, what the guest wrote belongs to the session's own uid
    // (a QEMU uid no VM's QEMU runs as while the session lives), never to
    // root or the process sandbox's user.
    let mount = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.contains(" airlock-session ") && l.contains(&format!("-{id} ")))
        .map(|l| l.split(' ').nth(4).unwrap().to_string())
        .unwrap();
    use std::os::unix::fs::MetadataExt;
    let root_uid = std::fs::metadata(&mount).unwrap().uid();
    assert!((0x7000_0000..0x7001_0000).contains(&root_uid), "{root_uid}");
    let out = std::fs::metadata(format!("{mount}/out.txt")).unwrap();
    assert_eq!((out.uid(), out.gid()), (root_uid, root_uid));
    // In the next VM: the file is there; a program copied into the
    // workspace runs from it (mapped from the file server); the mount
    // table names no host path, nothing set-uid, no devices; the quota is
    // the host file system's (ENOSPC in the guest, the old file stays
    // whole); a symlink to a guest path is planted.
    let r = exec(
        &s,
        &key,
        id,
        json!({"argv": ["sh", "-c",
            "cat out.txt; cp /bin/echo ./e && ./e mapped; \
             grep ' /workspace ' /proc/self/mountinfo; \
             head -c 2000000 /dev/zero > big; echo rc=$?; rm -f big e; \
             ln -s /etc/passwd leak"]}),
    );
    let text = r["result"]["stdout"].as_str().unwrap().to_string();
    assert!(text.starts_with("out\nmapped\n"), "{r}");
    assert!(text.contains(" /workspace rw,nosuid,nodev"), "{text}");
    assert!(text.contains(" - virtiofs workspace "), "{text}");
    let data = s.data().to_string_lossy().to_string();
    assert!(!text.contains("/run/") && !text.contains(&data), "{text}");
    assert!(text.contains("rc=1"), "{r}");
    assert!(
        r["result"]["stderr"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{r}"
    );
    assert_eq!(
        s.get(&format!("{base}/files/in.txt"), &key).text(),
        "hello more\n"
    );
    // The planted symlink leads nowhere out of the workspace on the host
    // side either.
    s.get(&format!("{base}/files/leak"), &key)
        .problem(404, "file_not_found");
    // While a VM runs, its file server holds no capability, runs as the
    // session's uid with no_new_privs under its seccomp filter, in a
    // network namespace of its own (positive control: the server's own
    // process has the host's).
    let r = s.post(
        &format!("{base}/exec"),
        &key,
        json!({"argv": ["sleep", "60"], "wait": false}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let exec_id = r.json()["id"].as_str().unwrap().to_string();
    let end = Instant::now() + Duration::from_secs(180);
    let pid = loop {
        if let Some(p) = virtiofsd_of(root_uid) {
            break p;
        }
        assert!(Instant::now() < end, "no virtiofsd: {}", s.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        field("Uid"),
        format!("{root_uid} {root_uid} {root_uid} {root_uid}")
    );
    assert_eq!(field("Groups"), "");
    assert_eq!(field("CapEff"), "0000000000000000");
    assert_eq!(field("CapPrm"), "0000000000000000");
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("Seccomp"), "2");
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).unwrap();
    assert_ne!(ns(&pid.to_string()), ns("self"));
    // Its root is its own: the libraries, its binary (under /usr), the
    // loader's cache, its /proc and the workspace; nothing else of the
    // host's tree (positive control: the server's root has /run).
    let mut root: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    root.sort();
    assert_eq!(
        root,
        ["etc", "lib", "lib64", "proc", "usr", "ws"],
        "{root:?}"
    );
    assert!(std::path::Path::new("/proc/self/root/run").exists());
    // Its end kills what runs, unmounts the workspace, and no file server
    // outlives it.
    assert!(mounted(id));
    assert_eq!(delete(&s, &key, &base).status, 204);
    let ex = s.wait_status(&key, &exec_id, &["finished", "failed"]);
    assert_eq!(ex["reason"], "cancelled", "{ex}");
    // The workspace goes when the killed execution lets it go: after its
    // record is written (the VM's teardown may still be under way then).
    let end = Instant::now() + Duration::from_secs(30);
    while mounted(id) {
        assert!(Instant::now() < end, "the workspace stayed mounted");
        std::thread::sleep(Duration::from_millis(100));
    }
    while virtiofsd_of(root_uid).is_some() {
        assert!(Instant::now() < end, "virtiofsd outlived its session");
        std::thread::sleep(Duration::from_millis(100));
    }
}
