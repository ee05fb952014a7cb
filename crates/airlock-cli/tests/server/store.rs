//! Which database the server tests run on: the embedded SQLite file
//! (default) or PostgreSQL (`AIRLOCK_TEST_STORE=postgres`, the suite's
//! second round): then every test server gets a fresh database of its own
//! on the test PostgreSQL server (`AIRLOCK_TEST_POSTGRES`, else the local
//! one's socket as root, the role `.ci/run` makes), dropped with it.

use std::path::Path;

use serde_json::Value;
use sqlx::{Column, Connection, Row, TypeInfo, ValueRef};

/// True in the PostgreSQL round.
pub fn on_postgres() -> bool {
    std::env::var("AIRLOCK_TEST_STORE").is_ok_and(|v| v == "postgres")
}

/// The test server's maintenance database URL (its path is `/postgres`).
fn server_url() -> String {
    std::env::var("AIRLOCK_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres:///postgres?host=/var/run/postgresql&user=root".into())
}

/// `server_url()` with database `name` in place of `postgres`.
fn url_of(name: &str) -> String {
    let u = server_url();
    match u.split_once('?') {
        Some((base, q)) => format!("{}/{name}?{q}", base.trim_end_matches("/postgres")),
        None => format!("{}/{name}", u.trim_end_matches("/postgres")),
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Creates a fresh database and returns its URL.
pub fn new_database() -> String {
    let name = format!(
        "airlock_test_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    block_on(async {
        let mut c = sqlx::PgConnection::connect(&server_url())
            .await
            .unwrap_or_else(|e| panic!("the test PostgreSQL server: {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut c)
            .await
            .unwrap();
    });
    url_of(&name)
}

/// Drops the database at `url` (made by `new_database`), connections and
/// all.
pub fn drop_database(url: &str) {
    let Some(name) = url
        .split('?')
        .next()
        .and_then(|b| b.rsplit('/').next())
        .filter(|n| n.starts_with("airlock_test_"))
    else {
        return;
    };
    block_on(async {
        if let Ok(mut c) = sqlx::PgConnection::connect(&server_url()).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut c)
            .await;
        }
    });
}

/// The database URL of the test server whose data directory is `data`
/// (written beside it), when it has one.
pub fn url_for(data: &Path) -> Option<String> {
    let f = data.parent()?.join("database_url");
    std::fs::read_to_string(f).ok()
}

/// Runs `sql` on PostgreSQL with sqlx (not airlock's code) and returns the
/// rows as `query` does for SQLite: arrays of values, integers as numbers,
/// booleans as 0/1 (SQLite has none), bytea as hex.
pub fn pg_query(url: &str, sql: &str) -> Value {
    block_on(async {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_all(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let mut out = Vec::new();
        for r in &rows {
            let mut vals = Vec::new();
            for (i, col) in r.columns().iter().enumerate() {
                let raw = r.try_get_raw(i).unwrap();
                if raw.is_null() {
                    vals.push(Value::Null);
                    continue;
                }
                let v = match col.type_info().name() {
                    "INT8" => Value::from(r.get::<i64, _>(i)),
                    "INT4" => Value::from(r.get::<i32, _>(i)),
                    "INT2" => Value::from(r.get::<i16, _>(i)),
                    "BOOL" => Value::from(i64::from(r.get::<bool, _>(i))),
                    "BYTEA" => Value::from(
                        r.get::<Vec<u8>, _>(i)
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<String>(),
                    ),
                    _ => Value::from(r.get::<String, _>(i)),
                };
                vals.push(v);
            }
            out.push(Value::Array(vals));
        }
        Value::Array(out)
    })
}
