//! The audit chain against someone with write access to the SQLite file:
//! edit, delete and reorder rows directly, and `airlock admin audit verify`
//! must name the first broken record.

use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::{Server, admin};

/// Runs SQL on the database with python's sqlite3 (an attacker's tool,
/// not ours). Returns (success, stderr).
fn sql(db: &Path, script: &str) -> (bool, String) {
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\nc.executescript(sys.argv[2])\nc.commit()",
        )
        .arg(db)
        .arg(script)
        .output()
        .expect("python3");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn verify(data: &Path) -> (i32, String, String) {
    let out = admin(data, &["audit", "verify"]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A data directory with a stopped server and a dozen audit records.
fn populated() -> Server {
    let mut s = Server::start_with(&[]);
    let key = s.tenant("acme");
    s.run(&key, "shell", "echo hi");
    for i in 0..3 {
        let r = s.req(
            "PUT",
            &format!("/v1/secrets/s{i}"),
            Some(&key),
            Some(&json!({"value": "v"})),
        );
        assert_eq!(r.status, 200);
    }
    let (st, _) = s.terminate();
    assert!(st.success());
    s
}

fn copy_data(s: &Server) -> (tempfile::TempDir, std::path::PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("data");
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    for e in std::fs::read_dir(s.data()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
    }
    (t, d)
}

#[test]
fn audit_chain_detects_edit_delete_and_reorder() {
    let s = populated();
    let (code, out, err) = verify(&s.data());
    assert_eq!(code, 0, "intact chain must verify: {err}");
    assert!(out.starts_with("audit log intact:"), "{out}");
    let records: i64 = out.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(records >= 10, "{out}");

    // The database refuses edits while its triggers stand.
    let (ok, e) = sql(
        &s.data().join("airlock.db"),
        "UPDATE audit SET actor='x' WHERE seq=3;",
    );
    assert!(!ok && e.contains("append-only"), "{e}");
    let (ok, e) = sql(
        &s.data().join("airlock.db"),
        "DELETE FROM audit WHERE seq=3;",
    );
    assert!(!ok && e.contains("append-only"), "{e}");

    let drop_triggers = "DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;";
    // Edit one field of record 5.
    let (_t, d) = copy_data(&s);
    let (ok, e) = sql(
        &d.join("airlock.db"),
        &format!("{drop_triggers} UPDATE audit SET subject='forged' WHERE seq=5;"),
    );
    assert!(ok, "{e}");
    let (code, _, err) = verify(&d);
    assert_eq!(code, 1);
    assert!(
        err.contains("broken at record 5") && err.contains("edited"),
        "{err}"
    );

    // Delete record 4.
    let (_t, d) = copy_data(&s);
    let (ok, e) = sql(
        &d.join("airlock.db"),
        &format!("{drop_triggers} DELETE FROM audit WHERE seq=4;"),
    );
    assert!(ok, "{e}");
    let (code, _, err) = verify(&d);
    assert_eq!(code, 1);
    assert!(
        err.contains("broken at record 5") && err.contains("deleted"),
        "{err}"
    );

    // Reorder records 6 and 7 (swap their contents, keep the numbering).
    let (_t, d) = copy_data(&s);
    let cols = "ts, tenant_id, kind, actor, subject, request_id, detail, prev_hash, hash";
    let (ok, e) = sql(
        &d.join("airlock.db"),
        &format!(
            "{drop_triggers}
             CREATE TEMP TABLE a6 AS SELECT {cols} FROM audit WHERE seq=6;
             CREATE TEMP TABLE a7 AS SELECT {cols} FROM audit WHERE seq=7;
             DELETE FROM audit WHERE seq IN (6, 7);
             INSERT INTO audit (seq, {cols}) SELECT 6, {cols} FROM a7;
             INSERT INTO audit (seq, {cols}) SELECT 7, {cols} FROM a6;"
        ),
    );
    assert!(ok, "{e}");
    let (code, _, err) = verify(&d);
    assert_eq!(code, 1);
    assert!(err.contains("broken at record 6"), "{err}");

    // A link not computed with the audit key (here arbitrary bytes, all
    // that anyone without the master key can produce) is caught.
    let (_t, d) = copy_data(&s);
    let (ok, e) = sql(
        &d.join("airlock.db"),
        &format!("{drop_triggers} UPDATE audit SET hash=randomblob(32) WHERE seq=2;"),
    );
    assert!(ok, "{e}");
    let (code, _, err) = verify(&d);
    assert_eq!(code, 1);
    assert!(err.contains("broken at record 2"), "{err}");

    // The original is still intact (the copies were attacked, not it).
    assert_eq!(verify(&s.data()).0, 0);
}

#[test]
fn policy_denials_and_auth_failures_are_audited() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let spare = s.key("acme");
    assert!(
        admin(&s.data(), &["key", "revoke", &spare[4..20]])
            .status
            .success()
    );
    // A revoked key is a failure attributed to its tenant.
    s.get("/v1/secrets", &spare).problem(401, "unauthorized");
    // Asking for more than the ceiling is a denial, not a silent clamp.
    let r = s.post(
        "/v1/executions",
        &key,
        json!({"language": "python", "code": "pass", "limits": {"memory_mib": 1_000_000}}),
    );
    let p = r.problem(422, "policy_denied");
    assert!(p["detail"].as_str().unwrap().contains("limits.memory_mib"));
    // A seccomp kill (the i386 syscall ABI via int 0x80) is audited as a
    // violation.
    let v = s.run(
        &key,
        "python",
        "import ctypes, mmap\n\
         m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n\
         m.write(bytes([0xb8, 20, 0, 0, 0, 0xcd, 0x80, 0xc3]))\n\
         f = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(m)))\n\
         print(f())\n",
    );
    let audit = s.get("/v1/audit?limit=500", &key).json();
    let events = audit["events"].as_array().unwrap();
    let has = |kind: &str| events.iter().any(|e| e["kind"] == kind);
    assert!(has("api_key.revoke"));
    let fail = events
        .iter()
        .find(|e| e["kind"] == "auth.failure")
        .expect("auth.failure");
    assert_eq!(fail["detail"]["reason"], "revoked");
    assert_eq!(fail["subject"], &spare[4..20]);
    let denied = events
        .iter()
        .find(|e| e["kind"] == "policy.denied")
        .expect("policy.denied");
    assert!(
        denied["detail"]["reason"]
            .as_str()
            .unwrap()
            .contains("memory_mib")
    );
    assert_eq!(v["reason"], "policy_violation", "{v}");
    assert_eq!(v["result"]["signal"], 31, "SIGSYS");
    assert!(has("policy.violation"), "{events:?}");
}
