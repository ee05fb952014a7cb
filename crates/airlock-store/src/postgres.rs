//! The PostgreSQL store, for more than one machine: any number of servers
//! share one database. Its queries are the shared ones of `sql.rs`; this
//! file holds what only PostgreSQL does: connecting, its migrations, and
//! how a write transaction is serialised.
//!
//! Every write transaction first takes one transaction-scoped advisory
//! lock, so writers on every node run one at a time, as SQLite's
//! `BEGIN IMMEDIATE` makes them on one: the audit chain's head is read and
//! extended by one writer at a time (one chain, no fork, whatever node
//! writes), and the read-then-write checks (quotas, compare-and-set, a
//! deleted tenant) see every earlier commit. Reads take no lock.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};

use crate::StoreError;
use crate::crypto::Keyring;

// The shared queries, compiled against this driver's types (and again in
// sqlite.rs against its own): one text, two typed, statically dispatched
// instances, on purpose.
#[allow(clippy::duplicate_mod)]
#[path = "sql.rs"]
mod sql;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The advisory lock every write transaction holds ("airlock\0" as an
/// integer: a key no other application on the database is likely to use).
const WRITE_LOCK: i64 = 0x6169_726c_6f63_6b00;

/// The class of the session-level advisory lock a serving node holds on
/// its node id ("arl\x01"; the two-key lock space is apart from the one
/// [`WRITE_LOCK`] is in).
const NODE_LOCK_CLASS: i32 = 0x6172_6c01;

/// PostgreSQL-backed [`Store`](crate::Store).
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    keys: Arc<Keyring>,
    /// The connection holding the node lock, once taken.
    server_lock: Arc<std::sync::Mutex<Option<PgConnection>>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

type Db = sqlx::Postgres;
type Conn = PgConnection;
type DbRow = PgRow;
type This = PgStore;
/// An audit row's storage position: an identity column filled in append
/// order (appends are serialised), apart from the chain's own `seq`.
const AUDIT_ORDER: &str = "pos";

/// The database's clock in Unix ms (node heartbeats are compared on one
/// clock, not each host's).
const DB_NOW_MS: &str = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:password@host/db`,
    /// or a socket directory as `?host=/run/postgresql`) with at most
    /// `max_connections`, and applies pending migrations (sqlx holds a
    /// migration lock: nodes starting together migrate once).
    pub async fn open(url: &str, keys: Keyring, max_connections: u32) -> Result<Self, StoreError> {
        // The URL may carry a password: errors never repeat it.
        let opts = PgConnectOptions::from_str(url).map_err(|_| {
            StoreError::Open("the database URL is not a valid postgres:// URL".into())
        })?;
        Self::open_with(opts.application_name("airlock"), keys, max_connections).await
    }

    /// [`PgStore::open`] with options already made.
    pub async fn open_with(
        opts: PgConnectOptions,
        keys: Keyring,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(|e| StoreError::Open(e.to_string()))?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| StoreError::Migrate(e.to_string()))?;
        if let Err(e) = sql::check_master_key(&pool, &keys).await {
            pool.close().await;
            return Err(e);
        }
        Ok(PgStore {
            pool,
            keys: Arc::new(keys),
            server_lock: Arc::default(),
        })
    }

    /// Takes the lock of node `node_id` for as long as this store is open
    /// (a connection of its own holds it; PostgreSQL releases it when that
    /// connection ends, a crashed server's too). False when another process
    /// holds it: two servers started from copies of one data directory
    /// would be one node twice, each recovering the other's work as its
    /// own crash. Admin commands do not take it.
    pub async fn lock_node(&self, node_id: &str) -> Result<bool, StoreError> {
        let h = blake3::hash(node_id.as_bytes());
        let mut first = [0u8; 4];
        first.copy_from_slice(&h.as_bytes()[..4]);
        let key = i32::from_le_bytes(first);
        let mut c = self.pool.acquire().await?.detach();
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
            .bind(NODE_LOCK_CLASS)
            .bind(key)
            .fetch_one(&mut c)
            .await?;
        if got && let Ok(mut held) = self.server_lock.lock() {
            *held = Some(c);
        }
        Ok(got)
    }

    /// Before the pool closes: the server lock's connection ends too.
    async fn before_close(&self) {
        let held = self.server_lock.lock().ok().and_then(|mut h| h.take());
        if let Some(c) = held {
            use sqlx::Connection;
            let _ = c.close().await;
        }
    }

    /// Runs `f` inside a transaction holding the write lock (rolled back on
    /// error).
    async fn write_tx<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: for<'c> FnOnce(
                &'c mut Conn,
                &'c Keyring,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send + 'c>,
            > + Send,
        T: Send,
    {
        self.write_tx_with(true, f).await
    }

    /// A write transaction; with `durable = false` its commit does not wait
    /// for its WAL flush (`synchronous_commit = off` for this transaction
    /// only: it ends with it, nothing stays on the connection). A crash of
    /// airlock loses nothing either way; a crash of PostgreSQL's host may
    /// lose a non-durable commit that no durable one followed yet.
    async fn write_tx_with<T, F>(&self, durable: bool, f: F) -> Result<T, StoreError>
    where
        F: for<'c> FnOnce(
                &'c mut Conn,
                &'c Keyring,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send + 'c>,
            > + Send,
        T: Send,
    {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(WRITE_LOCK)
            .execute(&mut *tx)
            .await?;
        if !durable {
            sqlx::query("SET LOCAL synchronous_commit = off")
                .execute(&mut *tx)
                .await?;
        }
        match f(&mut tx, &self.keys).await {
            Ok(v) => {
                tx.commit().await?;
                Ok(v)
            }
            Err(e) => {
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }

    /// After a tenant's deletion. PostgreSQL keeps deleted row versions
    /// until vacuum reuses their space and its WAL until checkpoints
    /// recycle it, and offers no way to overwrite them: what protects a
    /// deleted tenant's secrets there is the destroyed data key (its sealed
    /// values can never be opened); its memory's plaintext may stay in
    /// those pages until PostgreSQL reuses them (docs/server.md says so).
    async fn after_tenant_delete(&self) {}
}

/// A fresh database for a test, on the PostgreSQL server the tests use
/// (`AIRLOCK_TEST_POSTGRES`, else the local server's socket as root, the
/// user the suite runs as, whose role `.ci/run` makes), dropped by
/// `remove`.
#[cfg(test)]
struct TestDb {
    admin: String,
    name: String,
}

#[cfg(test)]
impl TestDb {
    fn server() -> String {
        std::env::var("AIRLOCK_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres:///postgres?host=/var/run/postgresql&user=root".into())
    }

    async fn new() -> Self {
        use sqlx::Connection;
        let admin = Self::server();
        let name = format!("airlock_test_{}", uuid::Uuid::new_v4().simple());
        let mut c = PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("the test PostgreSQL server at {admin}: {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut c)
            .await
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        TestDb { admin, name }
    }

    async fn open(&self, keys: Keyring) -> Result<PgStore, StoreError> {
        let opts = PgConnectOptions::from_str(&self.admin)
            .unwrap_or_else(|e| panic!("{e}"))
            .database(&self.name);
        PgStore::open_with(opts, keys, 8).await
    }

    /// PostgreSQL gives no guarantee here (see `after_tenant_delete`): the
    /// emptied data key, checked by the shared test, is what holds.
    fn assert_scrubbed(&self, _markers: &[&[u8]]) {}

    /// What only the database's owner can do: switch the audit table's
    /// triggers off.
    async fn without_audit_triggers(&self, s: &PgStore) {
        sqlx::query("ALTER TABLE audit DISABLE TRIGGER USER")
            .execute(&s.pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    async fn remove(self) {
        use sqlx::Connection;
        if let Ok(mut c) = PgConnection::connect(&self.admin).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut c)
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MasterKey, Store};

    fn keys() -> Keyring {
        Keyring::new(&MasterKey::from_hex(&"11".repeat(32)).unwrap())
    }

    /// A relaxed transaction runs with `synchronous_commit = off` and
    /// leaves nothing of it on its connection: every connection the pool
    /// hands out afterwards is back to `on` (positive control: inside, it
    /// is off).
    #[tokio::test]
    async fn a_relaxed_commit_leaves_no_relaxed_connection() {
        let db = TestDb::new().await;
        let s = db.open(keys()).await.unwrap();
        let inside: String = s
            .write_tx_with(false, |c, _| {
                Box::pin(async move {
                    Ok(sqlx::query_scalar("SHOW synchronous_commit")
                        .fetch_one(&mut *c)
                        .await?)
                })
            })
            .await
            .unwrap();
        assert_eq!(inside, "off");
        let mut held = Vec::new();
        for _ in 0..8 {
            let mut c = s.pool.acquire().await.unwrap();
            let v: String = sqlx::query_scalar("SHOW synchronous_commit")
                .fetch_one(&mut *c)
                .await
                .unwrap();
            assert_eq!(v, "on");
            held.push(c);
        }
        drop(held);
        s.close().await;
        db.remove().await;
    }

    /// One process per node id: a second store cannot take a node's lock
    /// while the first holds it (another node's it can), and a third can
    /// once the first is closed (or its connection gone).
    #[tokio::test]
    async fn one_process_holds_a_node_at_a_time() {
        let db = TestDb::new().await;
        let (a, b) = (
            db.open(keys()).await.unwrap(),
            db.open(keys()).await.unwrap(),
        );
        assert!(a.lock_node("nd_a").await.unwrap());
        assert!(!b.lock_node("nd_a").await.unwrap());
        // Another node's lock is another lock.
        assert!(b.lock_node("nd_b").await.unwrap());
        // Admin work beside the server still goes through.
        b.create_tenant(
            "t",
            &crate::Actor {
                actor: "admin".into(),
                request_id: None,
            },
        )
        .await
        .unwrap();
        a.close().await;
        let c = db.open(keys()).await.unwrap();
        assert!(c.lock_node("nd_a").await.unwrap());
        c.close().await;
        b.close().await;
        db.remove().await;
    }

    /// A URL with a password that does not parse or connect never echoes
    /// the password in the error.
    #[tokio::test]
    async fn a_bad_database_url_never_shows_its_password() {
        for url in [
            "postgres://u:hunter2-secret@[::1/db",
            "postgres://u:hunter2-secret@127.0.0.1:1/db",
        ] {
            let e = PgStore::open(url, keys(), 2).await.unwrap_err().to_string();
            assert!(!e.contains("hunter2"), "{e}");
        }
    }
}
