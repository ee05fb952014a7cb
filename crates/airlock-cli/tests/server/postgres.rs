//! A server on PostgreSQL, whatever the round: what is PostgreSQL's own
//! (the master key shared through the database's key check, the URL's
//! password never shown). Several nodes: nodes.rs.

use std::process::Command;

use crate::{BIN, Server, store};

/// `airlock serve` on `data` and `url` with `key`, expected to fail:
/// (exit code, stderr).
fn serve_fails(data: &std::path::Path, url: &str, key: &str) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env("AIRLOCK_DATABASE_URL", url)
        .env("AIRLOCK_MASTER_KEY", key)
        .env_remove("AIRLOCK_MASTER_KEY_FILE")
        .env_remove("DATABASE_URL")
        .env_remove("AIRLOCK_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A server with another master key is refused before it touches the
/// database of a running one; admin commands work beside the server from
/// another data directory; once the first stops, another server starts
/// there (positive control) and finds its tenants. (A second node beside
/// the first: nodes.rs.)
#[test]
fn servers_on_one_postgresql_database_need_its_master_key() {
    let key = "5a".repeat(32);
    let url = store::new_database();
    let mut a = Server::new_on_sqlite(&[]);
    std::fs::write(a.dir.path().join("database_url"), &url).unwrap();
    a.env.push(("AIRLOCK_MASTER_KEY".into(), key.clone()));
    a.start();
    let admin = |data: &std::path::Path, k: &str, args: &[&str]| {
        Command::new(BIN)
            .arg("admin")
            .arg("--data-dir")
            .arg(data)
            .args(args)
            .env("AIRLOCK_DATABASE_URL", &url)
            .env("AIRLOCK_MASTER_KEY", k)
            .env_remove("AIRLOCK_MASTER_KEY_FILE")
            .output()
            .unwrap()
    };
    let out = admin(&a.data(), &key, &["tenant", "create", "acme"]);
    assert!(out.status.success(), "{out:?}");

    let other = tempfile::tempdir().unwrap();
    let data = other.path().join("data");
    let (code, err) = serve_fails(&data, &url, &"a5".repeat(32));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("master key does not match"), "{err}");
    // Beside the running server, from another data directory: the same
    // tenants.
    let out = admin(&data, &key, &["tenant", "list"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("\tacme\n"));
    let out = admin(&data, &"a5".repeat(32), &["tenant", "list"]);
    assert_eq!(out.status.code(), Some(1));

    let (st, _) = a.terminate();
    assert!(st.success());
    let mut b = Server::new_on_sqlite(&[]);
    std::fs::write(b.dir.path().join("database_url"), &url).unwrap();
    b.env.push(("AIRLOCK_MASTER_KEY".into(), key.clone()));
    b.start();
    let out = admin(&b.data(), &key, &["key", "create", "--tenant", "acme"]);
    assert!(out.status.success(), "{out:?}");
    let k = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(b.get("/v1/secrets", &k).status, 200);
    drop(b);
    drop(a);
}

/// A database URL that does not parse or does not connect is refused with
/// one line that never repeats the URL's password.
#[test]
fn a_bad_database_url_is_refused_without_its_password() {
    let dir = tempfile::tempdir().unwrap();
    for (url, code) in [
        ("mysql://u:hunter2-pw@127.0.0.1/db", 2),
        ("postgres://u:hunter2-pw@[::1/db", 1),
        ("postgres://u:hunter2-pw@127.0.0.1:1/db", 1),
    ] {
        let (got, err) = serve_fails(&dir.path().join("data"), url, &"5a".repeat(32));
        assert_eq!(got, Some(code), "{url}: {err}");
        assert!(!err.contains("hunter2"), "{url}: {err}");
        let last = err.trim().lines().last().unwrap_or_default();
        assert!(last.starts_with("airlock: "), "{url}: {err}");
    }
}
