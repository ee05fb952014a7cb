//! Tenants over time: deletion (keys revoked, data key destroyed, data
//! removed or kept, the audit chain still verifiable), keys that expire and
//! rotate, and retention of execution records.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::{Server, admin, query};

fn tenant_id(s: &Server, name: &str) -> String {
    let out = admin(&s.data(), &["tenant", "list"]);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find(|l| l.ends_with(&format!("\t{name}")))
        .unwrap_or_else(|| panic!("no tenant {name}"))
        .split('\t')
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn deleting_a_tenant_revokes_its_keys_destroys_its_data_key_and_keeps_the_chain() {
    let s = Server::start_with(&[]);
    let a = s.tenant("alpha");
    let b = s.tenant("beta");
    let alpha = tenant_id(&s, "alpha");
    for key in [&a, &b] {
        let r = s.req(
            "PUT",
            "/v1/secrets/DB",
            Some(key),
            Some(&json!({"value": "pw-4d2c"})),
        );
        assert_eq!(r.status, 200);
        let r = s.req(
            "PUT",
            "/v1/memory/f/k",
            Some(key),
            Some(&json!({"value": 1})),
        );
        assert_eq!(r.status, 200);
        s.run(
            key,
            "python",
            "import airlock\nairlock.connect().log.info('x')\nprint(1)",
        );
        // A snapshot of a session's file: its contents are stored per
        // tenant, and the session is ended (a tenant with an open one
        // cannot be deleted).
        let ses = s.post("/v1/sessions", key, json!({})).json();
        let sid = ses["id"].as_str().unwrap();
        let r = s.post(
            &format!("/v1/sessions/{sid}/exec"),
            key,
            json!({"code": "echo private > f"}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let r = s.req(
            "POST",
            &format!("/v1/sessions/{sid}/snapshots"),
            Some(key),
            None,
        );
        assert_eq!(r.status, 201, "{}", r.text());
        assert_eq!(
            s.req("DELETE", &format!("/v1/sessions/{sid}"), Some(key), None)
                .status,
            204
        );
    }
    let blobs = s.data().join("blobs");
    let count_files = |dir: &Path| -> usize {
        std::fs::read_dir(dir)
            .map(|r| {
                r.flatten()
                    .map(|e| std::fs::read_dir(e.path()).map_or(1, |d| d.count()))
                    .sum()
            })
            .unwrap_or(0)
    };
    assert_eq!(count_files(&blobs.join(&alpha)), 1);
    let db = s.data().join("airlock.db");
    // Refused without confirmation, and while an execution is unfinished.
    let out = admin(&s.data(), &["tenant", "delete", "alpha"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    let r = s.post(
        "/v1/executions",
        &a,
        json!({"language": "shell", "code": "sleep 2", "wait": false}),
    );
    let running = r.json()["id"].as_str().unwrap().to_string();
    let out = admin(&s.data(), &["tenant", "delete", "alpha", "--yes"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("queued or running"));
    s.wait_status(&a, &running, &["finished"]);
    // Deleted, while the server runs.
    let out = admin(&s.data(), &["tenant", "delete", "alpha", "--yes"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "1 keys revoked, 1 secrets, 1 memory entries, 3 executions, 1 log records, 1 snapshot files removed"
        ),
        "{text}"
    );
    // Its snapshots' contents are gone; beta's are not.
    assert!(!blobs.join(&alpha).exists());
    // Its key is refused like any unknown one; beta is untouched.
    s.get("/v1/secrets", &a).problem(401, "unauthorized");
    assert_eq!(s.get("/v1/secrets", &b).json()["secrets"][0]["name"], "DB");
    assert_eq!(s.get("/v1/memory/f/k", &b).json()["value"], 1);
    // Its data key is gone and nothing of its data is left.
    let row = query(
        &db,
        &format!(
            "SELECT length(wrapped_dek), name, deleted_at IS NOT NULL FROM tenants WHERE id = '{alpha}'"
        ),
    );
    assert_eq!(row, json!([[0, format!("deleted:{alpha}"), 1]]));
    for table in ["secrets", "memory", "executions"] {
        let n = query(
            &db,
            &format!("SELECT COUNT(*) FROM {table} WHERE tenant_id = '{alpha}'"),
        );
        assert_eq!(n, json!([[0]]), "{table}");
    }
    // Its logs went with its records (beta's stay), its keys are revoked.
    let logs = query(
        &db,
        "SELECT COUNT(*) FROM execution_logs WHERE execution_id NOT IN (SELECT id FROM executions)",
    );
    assert_eq!(logs, json!([[0]]));
    let beta_logs = query(&db, "SELECT COUNT(*) FROM execution_logs");
    assert_eq!(beta_logs, json!([[1]]));
    let keys = query(
        &db,
        &format!("SELECT COUNT(*), COUNT(revoked_at) FROM api_keys WHERE tenant_id = '{alpha}'"),
    );
    assert_eq!(keys, json!([[1, 1]]));
    // The deletion is audited, the chain verifies, the name is free again.
    let kinds = query(
        &db,
        &format!(
            "SELECT COUNT(*) FROM audit WHERE tenant_id = '{alpha}' AND kind = 'tenant.delete'"
        ),
    );
    assert_eq!(kinds, json!([[1]]));
    let out = admin(&s.data(), &["audit", "verify"]);
    assert!(out.status.success(), "{out:?}");
    let a2 = s.tenant("alpha");
    assert_eq!(s.get("/v1/secrets", &a2).json()["secrets"], json!([]));
    // With --keep-records, the records stay for review.
    let beta = tenant_id(&s, "beta");
    assert_eq!(count_files(&blobs.join(&beta)), 1);
    let out = admin(
        &s.data(),
        &["tenant", "delete", "beta", "--yes", "--keep-records"],
    );
    assert!(out.status.success(), "{out:?}");
    let n = query(
        &db,
        &format!("SELECT COUNT(*) FROM executions WHERE tenant_id = '{beta}'"),
    );
    assert_eq!(n, json!([[2]]));
    // Records kept, contents not: they are the tenant's data.
    let snaps = query(
        &db,
        &format!("SELECT COUNT(*) FROM snapshots WHERE tenant_id = '{beta}'"),
    );
    assert_eq!(snaps, json!([[1]]));
    assert!(!blobs.join(&beta).exists());
    s.get("/v1/secrets", &b).problem(401, "unauthorized");
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// (created_at, expires_at, revoked_at) of key `id`.
fn key_times(db: &Path, id: &str) -> (i64, Option<i64>, Option<i64>) {
    let r = query(
        db,
        &format!("SELECT created_at, expires_at, revoked_at FROM api_keys WHERE id = '{id}'"),
    );
    (
        r[0][0].as_i64().unwrap(),
        r[0][1].as_i64(),
        r[0][2].as_i64(),
    )
}

/// Moves key `id`'s expiry into the past, as the clock would.
fn expire(db: &Path, id: &str) {
    query(
        db,
        &format!(
            "UPDATE api_keys SET expires_at = {} WHERE id = '{id}'",
            now_ms() - 1
        ),
    );
}

#[test]
fn keys_expire_and_rotate_and_an_expired_key_is_refused_like_any_other() {
    let s = Server::start_with(&[]);
    let db = s.data().join("airlock.db");
    let forever = s.tenant("acme");
    let make = |args: &[&str]| {
        let out = admin(&s.data(), args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let id = |key: &str| key[4..20].to_string();
    let short = make(&["key", "create", "--tenant", "acme", "--expires", "1h"]);
    let (created, expires, _) = key_times(&db, &id(&short));
    assert!(
        (expires.unwrap() - created - 3_600_000).abs() < 1000,
        "--expires 1h"
    );
    assert_eq!(
        s.get("/v1/secrets", &short).status,
        200,
        "works before it expires"
    );
    expire(&db, &id(&short));
    let expired = s.get("/v1/secrets", &short);
    let unknown = s.get(
        "/v1/secrets",
        "alk_0123456789abcdef_0000000000000000000000000000000000000000000000000000000000000000",
    );
    expired.problem(401, "unauthorized");
    assert_eq!(expired.body, unknown.body, "one identical 401 body");

    // Rotation with a grace period: both work, then only the new one.
    let old = make(&["key", "create", "--tenant", "acme", "--expires", "30d"]);
    let new = make(&["key", "rotate", &id(&old), "--grace", "1h"]);
    assert_eq!(s.get("/v1/secrets", &old).status, 200);
    assert_eq!(s.get("/v1/secrets", &new).status, 200);
    let (_, old_until, _) = key_times(&db, &id(&old));
    let left = old_until.unwrap() - now_ms();
    assert!(
        (3_500_000..=3_600_000).contains(&left),
        "grace 1h: {left} ms left"
    );
    // The new key is issued for as long as the old one was (30 days).
    let (c, e, _) = key_times(&db, &id(&new));
    assert!((e.unwrap() - c - 30 * 86_400_000).abs() < 1000, "{c} {e:?}");
    expire(&db, &id(&old));
    s.get("/v1/secrets", &old).problem(401, "unauthorized");
    assert_eq!(s.get("/v1/secrets", &new).status, 200);
    // Without a grace period the old key stops at once; --expires sets
    // the new one's lifetime.
    let newer = make(&["key", "rotate", &id(&new), "--expires", "12h"]);
    s.get("/v1/secrets", &new).problem(401, "unauthorized");
    let (c, e, _) = key_times(&db, &id(&newer));
    assert!((e.unwrap() - c - 12 * 3_600_000).abs() < 1000, "{c} {e:?}");
    // A key that never expired is replaced by one that never expires.
    let plain = make(&["key", "create", "--tenant", "acme"]);
    let plain2 = make(&["key", "rotate", &id(&plain)]);
    assert_eq!(key_times(&db, &id(&plain2)).1, None);
    // An expired key cannot be rotated.
    let out = admin(&s.data(), &["key", "rotate", &id(&short)]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // Positive controls: keys without expiry keep working.
    assert_eq!(s.get("/v1/secrets", &newer).status, 200);
    assert_eq!(s.get("/v1/secrets", &plain2).status, 200);
    assert_eq!(s.get("/v1/secrets", &forever).status, 200);
    let list = make(&["key", "list", "--tenant", "acme"]);
    assert_eq!(list.matches("\texpired").count(), 2, "{list}");
    assert_eq!(list.matches("\trevoked").count(), 2, "{list}");
    let audit = s.get("/v1/audit?limit=500", &forever).json();
    let reasons: Vec<&str> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "auth.failure")
        .filter_map(|e| e["detail"]["reason"].as_str())
        .collect();
    assert!(reasons.contains(&"expired"), "{reasons:?}");
    assert!(audit.to_string().contains("api_key.rotate"));
    // Bad durations are bad input.
    for d in ["0s", "12x", "-1h", "99999d"] {
        let out = admin(
            &s.data(),
            &["key", "create", "--tenant", "acme", "--expires", d],
        );
        assert_eq!(out.status.code(), Some(2), "{d}");
    }
}

/// A request that authenticated before `tenant delete` and sends its body
/// after it writes nothing for the deleted tenant.
#[test]
fn a_request_in_flight_across_a_tenant_delete_writes_nothing() {
    use std::io::{Read, Write};
    let s = Server::start_with(&[]);
    let key = s.tenant("alpha");
    let alpha = tenant_id(&s, "alpha");
    let db = s.data().join("airlock.db");
    let body = json!({"language": "shell", "code": "echo hi"}).to_string();
    let open = |path: &str, method: &str, body: &str| {
        let mut c = std::net::TcpStream::connect(s.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        // Everything but the last byte of the body.
        write!(
            c,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            body.len(),
            &body[..body.len() - 1]
        )
        .unwrap();
        c
    };
    let finish = |mut c: std::net::TcpStream, body: &str| {
        c.write_all(&body.as_bytes()[body.len() - 1..]).unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).unwrap();
        crate::parse_response(&out)
    };
    let memory = json!({"value": "after-delete"}).to_string();
    // Positive control: the same slow requests succeed for a live tenant.
    let c = open("/v1/executions", "POST", &body);
    assert_eq!(finish(c, &body).status, 200);
    let c = open("/v1/memory/f/k", "PUT", &memory);
    assert_eq!(finish(c, &memory).status, 200);
    let exec = open("/v1/executions", "POST", &body);
    let mem = open("/v1/memory/f/k2", "PUT", &memory);
    let secret_body = json!({"value": "pw"}).to_string();
    let secret = open("/v1/secrets/S", "PUT", &secret_body);
    // The requests are past authentication (their heads are read) when
    // the tenant goes.
    std::thread::sleep(Duration::from_millis(300));
    let out = admin(&s.data(), &["tenant", "delete", "alpha", "--yes"]);
    assert!(out.status.success(), "{out:?}");
    finish(exec, &body).problem(401, "unauthorized");
    finish(mem, &memory).problem(401, "unauthorized");
    finish(secret, &secret_body).problem(401, "unauthorized");
    for table in ["executions", "memory", "secrets"] {
        let n = query(
            &db,
            &format!("SELECT COUNT(*) FROM {table} WHERE tenant_id = '{alpha}'"),
        );
        assert_eq!(n, json!([[0]]), "{table}");
    }
}

#[test]
fn retention_removes_old_execution_records_at_start_and_audits_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("airlock.toml");
    std::fs::write(&cfg, "[retention]\nexecutions_days = 1\n").unwrap();
    let mut s = Server::start_with(&["--config", cfg.to_str().unwrap()]);
    let key = s.tenant("acme");
    let old = s.run(
        &key,
        "python",
        "import airlock\nairlock.connect().log.info('old')",
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    let recent = s.run(
        &key,
        "python",
        "import airlock\nairlock.connect().log.info('recent')",
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    s.terminate();
    let db = s.data().join("airlock.db");
    // One record ended two days ago.
    query(
        &db,
        &format!(
            "UPDATE executions SET finished_at = finished_at - 2 * 86400000 WHERE id = '{old}'"
        ),
    );
    s.start();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.get(&format!("/v1/executions/{old}"), &key).status != 404 {
        assert!(std::time::Instant::now() < deadline, "old record kept");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Positive control: the recent one stays, with its logs.
    assert_eq!(s.get(&format!("/v1/executions/{recent}"), &key).status, 200);
    let kept = query(
        &db,
        &format!("SELECT COUNT(*) FROM execution_logs WHERE execution_id = '{recent}'"),
    );
    assert_eq!(kept, json!([[1]]));
    let logs = query(
        &db,
        &format!("SELECT COUNT(*) FROM execution_logs WHERE execution_id = '{old}'"),
    );
    assert_eq!(logs, json!([[0]]));
    let sweep = query(
        &db,
        "SELECT detail FROM audit WHERE kind = 'retention.sweep'",
    );
    let detail: Value = serde_json::from_str(sweep[0][0].as_str().unwrap()).unwrap();
    assert_eq!(
        (detail["executions"].as_u64(), detail["logs"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(admin(&s.data(), &["audit", "verify"]).status.success());
}
