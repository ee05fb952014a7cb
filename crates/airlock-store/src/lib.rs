//! airlock-store: everything airlock keeps across restarts.
//!
//! Owns: the [`Store`] trait (the one interface callers use), its SQLite
//! (embedded, the default) and PostgreSQL (several nodes) implementations
//! with their migrations, envelope encryption of secrets,
//! API-key hashing, and the hash-chained audit log with its verifier.
//!
//! Must never: write a secret's plaintext or an API key's plaintext to the
//! database, log either, or let an audit record be appended outside the
//! chain. Every mutation that needs evidence writes its audit record in the
//! same transaction as the change itself.

pub mod audit;
pub mod crypto;
mod postgres;
mod sqlite;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub use audit::{AuditEvent, NewAudit, VerifyReport};
pub use crypto::{Keyring, MasterKey, NewApiKey};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Store errors. `Display` is for operators' logs; the server maps each
/// variant to a tenant-safe problem without echoing internals.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Opening the database failed.
    #[error("open database: {0}")]
    Open(String),
    /// Applying migrations failed.
    #[error("migrate database: {0}")]
    Migrate(String),
    /// A query failed.
    #[error("database: {0}")]
    Db(String),
    /// Key handling failed.
    #[error(transparent)]
    Crypto(#[from] crypto::CryptoError),
    /// A unique name is taken.
    #[error("{0} already exists")]
    Conflict(&'static str),
    /// A referenced row does not exist.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A per-owner count limit would be exceeded (nothing was written).
    #[error("the {0} limit is reached")]
    LimitReached(&'static str),
    /// The tenant was deleted (a request authenticated just before its
    /// deletion must not write anything for it).
    #[error("the tenant was deleted")]
    TenantDeleted,
    /// The master key is not the one the database was created with.
    #[error(
        "the master key does not match the one this database was created with (every server and admin command on one database needs the same one)"
    )]
    WrongMasterKey,
    /// A stored row is not what this version wrote.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Db(e.to_string())
    }
}

/// A tenant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tenant {
    /// Opaque id (`tn_...`).
    pub id: String,
    /// Unique human name.
    pub name: String,
    /// Creation time, Unix ms.
    pub created_at_ms: i64,
}

/// An API key as stored (never its plaintext).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiKeyInfo {
    /// Public key id.
    pub id: String,
    /// Owning tenant.
    pub tenant_id: String,
    /// Creation time, Unix ms.
    pub created_at_ms: i64,
    /// Revocation time, Unix ms.
    pub revoked_at_ms: Option<i64>,
    /// Expiry, Unix ms (none: until revoked).
    pub expires_at_ms: Option<i64>,
}

/// A key row with its hash, for authentication only.
#[derive(Debug, Clone)]
pub struct ApiKeyAuth {
    /// The key's metadata.
    pub info: ApiKeyInfo,
    /// Keyed hash of the whole key.
    pub hash: Vec<u8>,
}

/// Secret metadata (never the value).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SecretMeta {
    /// Name.
    pub name: String,
    /// Version, starting at 1, bumped on every write.
    pub version: i64,
    /// First write, Unix ms.
    pub created_at_ms: i64,
    /// Last write, Unix ms.
    pub updated_at_ms: i64,
}

/// Lifecycle of an execution record.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExecStatus {
    /// Accepted, waiting for a worker.
    Queued,
    /// A sandbox is being built or runs the code.
    Running,
    /// The engine returned a result (see `reason`).
    Finished,
    /// No result: the sandbox could not run or the server stopped first.
    Failed,
}

impl ExecStatus {
    /// snake_case name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecStatus::Queued => "queued",
            ExecStatus::Running => "running",
            ExecStatus::Finished => "finished",
            ExecStatus::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "queued" => ExecStatus::Queued,
            "running" => ExecStatus::Running,
            "finished" => ExecStatus::Finished,
            "failed" => ExecStatus::Failed,
            other => return Err(StoreError::Corrupt(format!("status {other:?}"))),
        })
    }

    /// Whether the record is final.
    pub fn is_terminal(self) -> bool {
        matches!(self, ExecStatus::Finished | ExecStatus::Failed)
    }
}

/// One execution as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExecutionRecord {
    /// Opaque id (`ex_...`).
    pub id: String,
    /// Owning tenant.
    pub tenant_id: String,
    /// Status.
    pub status: ExecStatus,
    /// Language name.
    pub language: String,
    /// Request id of the creating request.
    pub request_id: String,
    /// W3C trace id (32 hex).
    pub trace_id: String,
    /// Accepted, Unix ms.
    pub created_at_ms: i64,
    /// Sandbox start, Unix ms.
    pub started_at_ms: Option<i64>,
    /// End, Unix ms.
    pub finished_at_ms: Option<i64>,
    /// Termination reason (`exited`, `timeout`, ..., `cancelled`,
    /// `server_shutdown`, `server_restart`).
    pub reason: Option<String>,
    /// The engine's result document, when there is one.
    pub result: Option<serde_json::Value>,
    /// Tenant-safe error message for failed executions.
    pub error: Option<String>,
    /// Flow the execution belongs to (memory scope).
    pub flow_id: String,
    /// Handler output (JSON).
    pub output: Option<serde_json::Value>,
    /// Structured handler error (type, message, traceback).
    pub handler_error: Option<serde_json::Value>,
    /// Why the broker channel was closed early, if it was.
    pub broker_error: Option<String>,
    /// Egress decisions (allowed/denied, host, port, bytes).
    pub egress: Option<serde_json::Value>,
    /// Host-side resources the execution holds while it runs (cgroup
    /// names), for reaping after a crash. Never shown to tenants.
    pub host_state: Option<String>,
    /// The session it ran in, if any.
    pub session_id: Option<String>,
    /// The resolved policy it ran under (limits, network, isolation).
    pub policy: Option<serde_json::Value>,
    /// The node that admitted and runs it (`nd_...`); None for records
    /// from before nodes. Never shown to tenants.
    #[serde(default)]
    pub node_id: Option<String>,
}

/// A session: a tenant's workspace in which many executions run, each in
/// a fresh sandbox of the session's backend and policy.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    /// `ss_...`.
    pub id: String,
    /// Owner.
    pub tenant_id: String,
    /// The language code runs in unless an execution names another.
    pub language: String,
    /// The backend every execution of it runs on.
    pub backend: String,
    /// The resolved policy its executions start from (they may only
    /// tighten it).
    pub policy: serde_json::Value,
    /// Workspace size cap, MiB.
    pub workspace_mib: u64,
    /// Workspace file (inode) cap.
    pub workspace_files: u64,
    /// Ended after this long without an execution running, ms.
    pub idle_timeout_ms: i64,
    /// Created, Unix ms.
    pub created_at_ms: i64,
    /// Ended at this time at the latest (its maximum lifetime), Unix ms.
    pub expires_at_ms: i64,
    /// Ended, Unix ms.
    pub ended_at_ms: Option<i64>,
    /// Why it ended: `deleted`, `idle_timeout`, `lifetime`,
    /// `server_restart`, `server_shutdown`.
    pub end_reason: Option<String>,
    /// A snapshot of the workspace is taken after each execution.
    pub snapshot_after_exec: bool,
    /// The node whose host holds its workspace; None for records from
    /// before nodes.
    pub node_id: Option<String>,
}

/// One `airlock serve` process using the database, and its liveness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// `nd_...`, kept in the node's data directory across restarts.
    pub id: String,
    /// Operator's name for it (the host name by default).
    pub name: String,
    /// Where the other nodes reach its API (for work it runs), if anywhere.
    pub url: Option<String>,
    /// Its process id on its host.
    pub pid: u32,
    /// Started, Unix ms.
    pub started_at_ms: i64,
    /// Last heartbeat, Unix ms.
    pub heartbeat_at_ms: i64,
    /// Its lease: the others declare it lost once its last heartbeat is
    /// older than this (it fences itself before then).
    pub lost_after_ms: i64,
    /// `active`, `stopped` (a clean stop) or `lost` (its heartbeat
    /// stopped; another node failed its work).
    pub state: String,
}

/// What declaring one node lost did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostNode {
    /// The node.
    pub id: String,
    /// Its last heartbeat, Unix ms.
    pub heartbeat_at_ms: i64,
    /// Its executions failed with `node_lost`.
    pub executions: Vec<String>,
    /// Its sessions ended with `node_lost`.
    pub sessions: Vec<String>,
}

/// A snapshot of a session's workspace: its manifest (paths, types,
/// sizes, modes, content hashes) and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRecord {
    /// `sn_...`.
    pub id: String,
    /// Owner.
    pub tenant_id: String,
    /// The session whose workspace it holds.
    pub session_id: String,
    /// The execution after which it was taken, if any.
    pub execution_id: Option<String>,
    /// `requested` or `after_exec`.
    pub reason: String,
    /// BLAKE3 of the manifest (hex): what the audit record names.
    pub digest: String,
    /// Entries in the manifest.
    pub entries: u64,
    /// Bytes of the files in it.
    pub bytes: u64,
    /// A walk limit stopped it before it saw everything.
    pub truncated: bool,
    /// The manifest (JSON array of entries).
    pub manifest: serde_json::Value,
    /// Unix ms.
    pub created_at_ms: i64,
}

impl ExecutionRecord {
    /// A newly accepted execution: queued, nothing known about its end.
    pub fn queued(
        id: String,
        tenant_id: String,
        language: &str,
        request_id: String,
        trace_id: String,
        flow_id: String,
        created_at_ms: i64,
    ) -> Self {
        ExecutionRecord {
            id,
            tenant_id,
            status: ExecStatus::Queued,
            language: language.into(),
            request_id,
            trace_id,
            created_at_ms,
            started_at_ms: None,
            finished_at_ms: None,
            reason: None,
            result: None,
            error: None,
            flow_id,
            output: None,
            handler_error: None,
            broker_error: None,
            egress: None,
            host_state: None,
            session_id: None,
            policy: None,
            node_id: None,
        }
    }
}

/// One page of a listing.
#[derive(Debug, Clone)]
pub struct Page<T> {
    /// Items, newest first.
    pub items: Vec<T>,
    /// Cursor for the next (older) page.
    pub next: Option<i64>,
}

/// The outcome of checking a presented API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    /// A live key of this tenant.
    Valid {
        /// Tenant.
        tenant_id: String,
        /// Key id.
        key_id: String,
    },
    /// Not the shape airlock issues.
    Malformed,
    /// Well-formed, but no such key or the secret part does not match.
    Unknown,
    /// A revoked key.
    Revoked {
        /// Tenant.
        tenant_id: String,
        /// Key id.
        key_id: String,
    },
    /// A key past its expiry.
    Expired {
        /// Tenant.
        tenant_id: String,
        /// Key id.
        key_id: String,
    },
}

/// What deleting a tenant removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TenantDeletion {
    /// Keys revoked.
    pub keys_revoked: u64,
    /// Secrets removed (their data key is destroyed either way).
    pub secrets: u64,
    /// Memory entries removed.
    pub memory: u64,
    /// Execution records removed (0 when kept).
    pub executions: u64,
    /// Log records removed (0 when kept).
    pub logs: u64,
}

/// Who did something, for audit records.
#[derive(Debug, Clone)]
pub struct Actor {
    /// `key:<id>`, `admin`, `server`, `client:<addr>`.
    pub actor: String,
    /// Request id, when there is one.
    pub request_id: Option<String>,
}

/// The final state of an execution.
#[derive(Debug, Clone)]
pub struct Finish<'a> {
    /// `Finished` or `Failed`.
    pub status: ExecStatus,
    /// Termination reason.
    pub reason: &'a str,
    /// The engine's result document.
    pub result: Option<&'a serde_json::Value>,
    /// Tenant-safe error message.
    pub error: Option<&'a str>,
    /// End time, Unix ms.
    pub at_ms: i64,
    /// Handler output.
    pub output: Option<&'a serde_json::Value>,
    /// Handler error.
    pub handler_error: Option<&'a serde_json::Value>,
    /// Broker channel error.
    pub broker_error: Option<&'a str>,
    /// Egress log.
    pub egress: Option<&'a serde_json::Value>,
}

impl<'a> Finish<'a> {
    /// A final state without handler or broker details.
    pub fn new(status: ExecStatus, reason: &'a str, at_ms: i64) -> Self {
        Finish {
            status,
            reason,
            result: None,
            error: None,
            at_ms,
            output: None,
            handler_error: None,
            broker_error: None,
            egress: None,
        }
    }
}

/// One log record of an execution.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogRecord {
    /// Order within the execution, from 1.
    pub seq: i64,
    /// Time, Unix ms.
    pub ts_ms: i64,
    /// `debug`, `info`, `warn`, `error`.
    pub level: String,
    /// Message.
    pub message: String,
    /// Structured fields (JSON object).
    pub fields: serde_json::Value,
}

/// One agent-memory entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MemoryEntry {
    /// Key.
    pub key: String,
    /// Value (JSON).
    pub value: serde_json::Value,
    /// Version, from 1, bumped on every write.
    pub version: i64,
    /// Last write, Unix ms.
    pub updated_at_ms: i64,
}

/// Outcome of a memory write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryWrite {
    /// Written; the new version.
    Written(i64),
    /// Compare-and-set lost: the current version (0 = absent).
    Conflict(i64),
    /// The scope already holds the maximum number of keys.
    QuotaExceeded,
}

/// The storage interface. Every implementation keeps the same guarantees:
/// secrets sealed before they are written, audit records chained inside the
/// transaction that made the change, tenant scoping in every query.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Creates a tenant with a fresh data key.
    async fn create_tenant(&self, name: &str, actor: &Actor) -> Result<Tenant, StoreError>;
    /// Looks a tenant up by name.
    async fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>, StoreError>;
    /// Lists tenants.
    async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError>;

    /// Stores a new key's hash for a tenant; it expires at `expires_at_ms`
    /// when given.
    async fn create_api_key(
        &self,
        tenant_id: &str,
        expires_at_ms: Option<i64>,
        actor: &Actor,
    ) -> Result<(ApiKeyInfo, NewApiKey), StoreError>;
    /// Replaces an active key: a new key for the same tenant, and the old
    /// one expiring `grace_ms` from now (0: revoked now). The new key lives
    /// `lifetime_ms` when given, else as long as the old one was issued for
    /// (a key issued for 30 days is replaced by one for 30 days; one that
    /// never expired, by one that never expires). `None` when there is no
    /// such active key.
    async fn rotate_api_key(
        &self,
        id: &str,
        grace_ms: i64,
        lifetime_ms: Option<i64>,
        actor: &Actor,
    ) -> Result<Option<(ApiKeyInfo, NewApiKey)>, StoreError>;
    /// Deletes a tenant: every key revoked, its data key destroyed (its
    /// sealed secrets can never be read again) and its secrets and memory
    /// removed; its execution records and logs removed unless
    /// `keep_records`. The row stays (renamed) for the audit records that
    /// name it. Refused (`Conflict`) while it has unfinished executions.
    async fn delete_tenant(
        &self,
        tenant_id: &str,
        keep_records: bool,
        actor: &Actor,
    ) -> Result<TenantDeletion, StoreError>;
    /// Removes finished execution records (and their logs) that ended
    /// before `before_ms`; audited when it removed anything. Returns
    /// (executions, logs).
    async fn sweep_executions(
        &self,
        before_ms: i64,
        actor: &Actor,
    ) -> Result<(u64, u64), StoreError>;
    /// Fetches a key row for authentication.
    async fn api_key(&self, id: &str) -> Result<Option<ApiKeyAuth>, StoreError>;
    /// Checks a presented key: shape, keyed hash compared in constant time,
    /// revocation.
    async fn authenticate(&self, presented: &str) -> Result<AuthOutcome, StoreError>;
    /// Revokes a key; false when it does not exist or was revoked already.
    async fn revoke_api_key(&self, id: &str, actor: &Actor) -> Result<bool, StoreError>;
    /// Lists a tenant's keys.
    async fn list_api_keys(&self, tenant_id: &str) -> Result<Vec<ApiKeyInfo>, StoreError>;

    /// Creates or replaces a secret (version bumped), sealed at rest.
    async fn put_secret(
        &self,
        tenant_id: &str,
        name: &str,
        value: &[u8],
        actor: &Actor,
    ) -> Result<SecretMeta, StoreError>;
    /// Reads and opens a secret; the read is audited by name.
    async fn get_secret(
        &self,
        tenant_id: &str,
        name: &str,
        actor: &Actor,
    ) -> Result<Option<(SecretMeta, Zeroizing<Vec<u8>>)>, StoreError>;
    /// Lists a tenant's secrets (metadata only).
    async fn list_secrets(&self, tenant_id: &str) -> Result<Vec<SecretMeta>, StoreError>;
    /// Deletes a secret; false when absent.
    async fn delete_secret(
        &self,
        tenant_id: &str,
        name: &str,
        actor: &Actor,
    ) -> Result<bool, StoreError>;

    /// Inserts a new (queued) execution and audits its acceptance.
    async fn insert_execution(
        &self,
        rec: &ExecutionRecord,
        actor: &Actor,
    ) -> Result<(), StoreError>;
    /// Marks an execution running; `host_state` names what to reap after a
    /// crash. Audits `execution.started`. May become durable only with the
    /// execution's finish (a process crash loses nothing; a power loss
    /// before the finish may lose this mark, never the acceptance).
    async fn mark_running(&self, id: &str, at_ms: i64, host_state: &str) -> Result<(), StoreError>;
    /// Stores the final state and audits `execution.finish`.
    async fn finish_execution(&self, id: &str, fin: &Finish<'_>) -> Result<(), StoreError>;
    /// One execution of one tenant.
    async fn execution(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<Option<ExecutionRecord>, StoreError>;
    /// A tenant's executions, newest first; `before` is a cursor.
    async fn list_executions(
        &self,
        tenant_id: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Page<ExecutionRecord>, StoreError>;
    /// The storage position of one of a tenant's executions (for cursors;
    /// never shown to tenants, it counts every tenant's executions).
    async fn execution_seq(&self, tenant_id: &str, id: &str) -> Result<Option<i64>, StoreError>;
    /// The chain position of one of a tenant's audit records, by its hash.
    async fn audit_seq(&self, tenant_id: &str, hash: &[u8]) -> Result<Option<i64>, StoreError>;
    /// What node `node_id` may have left on its host (after its crash):
    /// its executions not in a terminal state, and those another node
    /// failed (`node_lost`) whose host state is still named. Records from
    /// before nodes count as every node's.
    async fn leftover_executions(&self, node_id: &str) -> Result<Vec<ExecutionRecord>, StoreError>;
    /// Forgets the host state of a final execution once it was reaped.
    async fn clear_host_state(&self, id: &str) -> Result<(), StoreError>;
    /// A tenant's executions in one session, newest first.
    async fn session_executions(
        &self,
        tenant_id: &str,
        session_id: &str,
        limit: u32,
    ) -> Result<Vec<ExecutionRecord>, StoreError>;

    /// Stores a new session and audits `session.create`.
    async fn insert_session(&self, rec: &SessionRecord, actor: &Actor) -> Result<(), StoreError>;
    /// One session of one tenant.
    async fn session(&self, tenant_id: &str, id: &str)
    -> Result<Option<SessionRecord>, StoreError>;
    /// A tenant's sessions, newest first (at most `limit`).
    async fn list_sessions(
        &self,
        tenant_id: &str,
        limit: u32,
    ) -> Result<Vec<SessionRecord>, StoreError>;
    /// Ends an open session and audits `session.end` with its reason;
    /// false when it had already ended.
    async fn end_session(
        &self,
        id: &str,
        reason: &str,
        at_ms: i64,
        actor: &Actor,
    ) -> Result<bool, StoreError>;
    /// Every session of node `node_id` not ended (after its crash; records
    /// from before nodes count as every node's).
    async fn open_sessions(&self, node_id: &str) -> Result<Vec<SessionRecord>, StoreError>;

    /// Registers a node starting (active, heartbeat now) and audits
    /// `node.start`; returns what the database held of it before.
    async fn register_node(&self, node: &NodeRecord) -> Result<Option<NodeRecord>, StoreError>;
    /// Renews an active node's heartbeat, stamped by the database's clock
    /// (nodes' clocks may disagree; the one that compares heartbeats is
    /// the one that stamps them); false when the node is no longer active
    /// (another node declared it lost): it must stop its work.
    async fn node_heartbeat(&self, id: &str) -> Result<bool, StoreError>;
    /// Marks a node stopped after a clean stop and audits `node.stop`.
    async fn stop_node(&self, id: &str) -> Result<(), StoreError>;
    /// One node.
    async fn node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError>;
    /// Every node the database knows, oldest first.
    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// Declares every active node other than `by` whose last heartbeat is
    /// older than its own lease (`lost_after_ms` of its row) by the
    /// database's clock lost, in one
    /// transaction with what follows (`at_ms` stamps the records' ends):
    /// its unfinished executions fail with `node_lost` (host state kept,
    /// for the node to reap when it returns), its open sessions end with
    /// `node_lost`, each audited, and `node.lost` itself. A node declared
    /// lost by one node is never declared again by another.
    async fn fail_lost_nodes(&self, by: &str, at_ms: i64) -> Result<Vec<LostNode>, StoreError>;

    /// Stores a snapshot and audits `session.snapshot` with its digest,
    /// unless its session holds `max_per_session` already
    /// ([`StoreError::LimitReached`]; checked in the same transaction, so
    /// concurrent snapshots cannot pass it together).
    async fn insert_snapshot(
        &self,
        rec: &SnapshotRecord,
        actor: &Actor,
        max_per_session: u64,
    ) -> Result<(), StoreError>;
    /// How many snapshots a session holds.
    async fn count_snapshots(&self, tenant_id: &str, session_id: &str) -> Result<u64, StoreError>;
    /// One snapshot of one tenant.
    async fn snapshot(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<Option<SnapshotRecord>, StoreError>;
    /// A session's snapshots, oldest first (at most `limit`), without
    /// their manifests (`manifest` is null: one can be 100 000 entries;
    /// [`Store::snapshot`] has it).
    async fn list_snapshots(
        &self,
        tenant_id: &str,
        session_id: &str,
        limit: u32,
    ) -> Result<Vec<SnapshotRecord>, StoreError>;

    /// Appends a log record to an execution (seq assigned here).
    async fn append_log(
        &self,
        execution_id: &str,
        level: &str,
        message: &str,
        fields: &serde_json::Value,
    ) -> Result<i64, StoreError>;
    /// An execution's logs after `after` (seq), oldest first.
    async fn list_logs(
        &self,
        execution_id: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<LogRecord>, StoreError>;

    /// Reads one memory entry of (tenant, flow).
    async fn memory_get(
        &self,
        tenant_id: &str,
        flow_id: &str,
        key: &str,
    ) -> Result<Option<MemoryEntry>, StoreError>;
    /// Writes one entry. `expected`: `None` writes unconditionally;
    /// `Some(v)` only when the current version is `v` (0 = absent).
    /// `limits` bounds the keys in the scope and the tenant's total bytes.
    async fn memory_put(
        &self,
        tenant_id: &str,
        flow_id: &str,
        key: &str,
        value: &serde_json::Value,
        expected: Option<i64>,
        limits: MemoryLimits,
    ) -> Result<MemoryWrite, StoreError>;
    /// Deletes one entry; false when absent.
    async fn memory_delete(
        &self,
        tenant_id: &str,
        flow_id: &str,
        key: &str,
    ) -> Result<bool, StoreError>;
    /// Keys with `prefix`, in order, after `after`, at most `limit`.
    /// Values are not loaded (`value` is null): listings stay cheap.
    async fn memory_list(
        &self,
        tenant_id: &str,
        flow_id: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<MemoryEntry>, StoreError>;

    /// Appends an audit record to the chain.
    async fn append_audit(&self, ev: NewAudit) -> Result<AuditEvent, StoreError>;
    /// A tenant's audit records after `after` (seq), oldest first.
    async fn list_audit(
        &self,
        tenant_id: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError>;
    /// A tenant's audit records about one subject (an execution, a
    /// session), oldest first (at most `limit`).
    async fn audit_for_subject(
        &self,
        tenant_id: &str,
        subject: &str,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError>;
    /// Walks the whole chain and reports the first broken record.
    async fn verify_audit(&self) -> Result<VerifyReport, StoreError>;

    /// Flushes and closes (after this, every call fails).
    async fn close(&self);
}

/// Bounds on agent memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLimits {
    /// Keys per (tenant, flow).
    pub keys: i64,
    /// Bytes (keys + values) per tenant over all its flows.
    pub tenant_bytes: i64,
}

impl Default for MemoryLimits {
    /// 10,000 keys per flow, 256 MiB per tenant.
    fn default() -> Self {
        MemoryLimits {
            keys: 10_000,
            tenant_bytes: 256 << 20,
        }
    }
}

/// Current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A fresh opaque id with a type prefix: UUIDv7 (time-ordered) in hex.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}
