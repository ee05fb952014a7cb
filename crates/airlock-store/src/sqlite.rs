//! The embedded SQLite store (WAL, foreign keys on, `BEGIN IMMEDIATE` for
//! every read-then-write transaction so the audit chain cannot fork when
//! the server and an admin command write at the same time). Its queries are
//! the shared ones of `sql.rs`; this file holds what only SQLite does.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};

use crate::StoreError;
use crate::crypto::Keyring;

// The shared queries, compiled against this driver's types (and again in
// postgres.rs against its own): one text, two typed, statically dispatched
// instances, on purpose.
#[allow(clippy::duplicate_mod)]
#[path = "sql.rs"]
mod sql;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// SQLite-backed [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    keys: Arc<Keyring>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

type Db = sqlx::Sqlite;
type Conn = SqliteConnection;
type DbRow = SqliteRow;
type This = SqliteStore;
/// An audit row's storage position: the chain's `seq` is SQLite's rowid
/// (`INTEGER PRIMARY KEY`), so a renumbered row moves in storage too and
/// shows up as a gap.
const AUDIT_ORDER: &str = "rowid";

/// The database's clock in Unix ms (node heartbeats are compared on one
/// clock, not each host's).
const DB_NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";

impl SqliteStore {
    /// Opens (creating if missing) the database at `path` and applies
    /// pending migrations.
    pub async fn open(path: &Path, keys: Keyring) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|e| StoreError::Open(e.to_string()))?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            // Deleted rows (a deleted tenant's wrapped key and memory,
            // swept records, revoked secrets) are overwritten with zeros,
            // not left in free pages for anyone who copies the file.
            .pragma("secure_delete", "ON")
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
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
        Ok(SqliteStore {
            pool,
            keys: Arc::new(keys),
        })
    }

    /// Runs `f` inside `BEGIN IMMEDIATE` ... `COMMIT` (rolled back on error).
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

    /// A write transaction; with `durable = false` its commit is not
    /// fsync'd by itself (WAL, `synchronous = NORMAL` for this commit only):
    /// it is ordered before, and made durable by, the next durable commit.
    /// A crash of the process loses nothing either way; a power loss may
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
        // A relaxed connection must never go back to the pool: unless
        // `synchronous = FULL` was restored, the guard closes it (also when
        // this future is dropped half-way).
        struct Relaxed(Option<sqlx::pool::PoolConnection<sqlx::Sqlite>>, bool);
        impl Drop for Relaxed {
            fn drop(&mut self) {
                if let Some(c) = self.0.take()
                    && self.1
                {
                    drop(c.detach());
                }
            }
        }
        let mut guard = Relaxed(Some(self.pool.acquire().await?), !durable);
        let Some(conn) = guard.0.as_mut() else {
            return Err(StoreError::Db("no connection".into()));
        };
        if !durable {
            sqlx::query("PRAGMA synchronous = NORMAL")
                .execute(&mut **conn)
                .await?;
        }
        let out = async {
            let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
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
        .await;
        if !durable
            && sqlx::query("PRAGMA synchronous = FULL")
                .execute(&mut **conn)
                .await
                .is_ok()
        {
            // Restored: back to the pool as it came.
            guard.1 = false;
        }
        drop(guard);
        out
    }

    /// Before the pool closes: nothing of SQLite's own.
    async fn before_close(&self) {}

    /// After a tenant's deletion: earlier versions of the deleted pages
    /// (the wrapped data key, the secrets and memory) still sit in the
    /// write-ahead log: copy the zeroed ones into the database and empty the
    /// log. Best effort: a reader holding an old snapshot keeps its frames
    /// until the next checkpoint.
    async fn after_tenant_delete(&self) {
        let busy: Result<(i64, i64, i64), _> = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&self.pool)
            .await;
        match busy {
            Ok((0, _, _)) => {}
            Ok(_) => tracing::warn!("tenant deleted; the write-ahead log could not be emptied yet"),
            Err(e) => tracing::warn!(error = %e, "tenant deleted; checkpoint failed"),
        }
    }
}

/// A fresh database for a test: a file in a directory of its own.
#[cfg(test)]
struct TestDb {
    dir: tempfile::TempDir,
}

#[cfg(test)]
impl TestDb {
    async fn new() -> Self {
        TestDb {
            dir: tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}")),
        }
    }

    async fn open(&self, keys: Keyring) -> Result<SqliteStore, StoreError> {
        SqliteStore::open(&self.dir.path().join("a.db"), keys).await
    }

    /// secure_delete and the checkpoint: while the store is open (as a
    /// running server keeps it), neither the database nor its log holds any
    /// of `markers`.
    fn assert_scrubbed(&self, markers: &[&[u8]]) {
        let db = self.dir.path().join("a.db");
        for f in [db.clone(), db.with_extension("db-wal")] {
            let bytes = std::fs::read(&f).unwrap_or_default();
            for marker in markers {
                assert!(
                    !bytes.windows(marker.len()).any(|w| w == *marker),
                    "{} holds {:?}",
                    f.display(),
                    String::from_utf8_lossy(marker)
                );
            }
        }
    }

    /// What only the database's owner can do: drop the audit table's
    /// triggers.
    async fn without_audit_triggers(&self, s: &SqliteStore) {
        for t in ["audit_no_update", "audit_no_delete"] {
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP TRIGGER {t}")))
                .execute(&s.pool)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    async fn remove(self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MasterKey;

    fn keys() -> Keyring {
        Keyring::new(&MasterKey::from_hex(&"11".repeat(32)).unwrap())
    }

    #[tokio::test]
    async fn a_relaxed_commit_never_leaves_a_relaxed_connection_in_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("a.db"), keys())
            .await
            .unwrap();
        let level = |s: &SqliteStore| {
            let pool = s.pool.clone();
            async move {
                // Every connection the pool can hand out, held at once.
                let mut held = Vec::new();
                let mut levels = Vec::new();
                for _ in 0..8 {
                    let mut c = pool.acquire().await.unwrap();
                    let v: i64 = sqlx::query_scalar("PRAGMA synchronous")
                        .fetch_one(&mut *c)
                        .await
                        .unwrap();
                    levels.push(v);
                    held.push(c);
                }
                levels
            }
        };
        // Positive control: a relaxed transaction does run relaxed.
        let inside: i64 = s
            .write_tx_with(false, |c, _| {
                Box::pin(async move {
                    Ok(sqlx::query_scalar("PRAGMA synchronous")
                        .fetch_one(&mut *c)
                        .await?)
                })
            })
            .await
            .unwrap();
        assert_eq!(inside, 1, "NORMAL inside");
        assert!(level(&s).await.iter().all(|v| *v == 2), "FULL after");
        // A failing relaxed transaction, and one dropped half-way.
        let r: Result<(), _> = s
            .write_tx_with(false, |_, _| {
                Box::pin(async move { Err(StoreError::Db("boom".into())) })
            })
            .await;
        assert!(r.is_err());
        let dropped = s.write_tx_with(false, |_, _| {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(())
            })
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(100), dropped)
                .await
                .is_err()
        );
        assert!(level(&s).await.iter().all(|v| *v == 2), "FULL after");
    }
}
