//! Server configuration: defaults, the TOML file, and the master key.
//!
//! Precedence (highest first): command-line flag, environment variable,
//! config file, built-in default. The CLI resolves flags and environment;
//! this module owns the file format and the defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use airlock_policy::Policy;
use airlock_store::MasterKey;
use serde::Deserialize;

/// Ceilings on what a tenant request may ask for in `limits` (the
/// policy crate owns the type and the narrowing).
pub use airlock_policy::LimitCeilings;

/// What tenants may ask for in a request's `network` (nothing by default:
/// egress is the operator's grant) and where names are resolved.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// Rules (same syntax as the policy's) that requests' `allow` entries
    /// must fall within: an exact host, or a host under a `*.suffix`, on
    /// the same port.
    pub allow: Vec<String>,
    /// The same for `allow_private` (names that may resolve to private
    /// addresses).
    pub allow_private: Vec<String>,
    /// A nameserver (`ip:port`) instead of the host's resolv.conf.
    pub dns: Option<SocketAddr>,
}

/// Warm pools: sandboxes fully isolated ahead of time, with the runtime
/// and guest SDK loaded, for executions that use the server's base policy
/// without egress. Each runs exactly one execution.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Idle python sandboxes kept ready. Default 2.
    pub python: usize,
    /// Idle JavaScript sandboxes kept ready. Default 1.
    pub javascript: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            python: 2,
            javascript: 1,
        }
    }
}

/// The isolation backends this node offers (`[backends]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendsConfig {
    /// Backends offered, by name: `process` (the process sandbox), `oci`
    /// (crun or runc), `gvisor` (runsc), `microvm` (QEMU). Default
    /// `["process"]`. Each one
    /// must be installed and run a sandbox end to end when the server
    /// starts, or the server does not start.
    pub offer: Vec<String>,
    /// Backends that keep warm pools (default: every offered one).
    pub pools: Option<Vec<String>>,
    /// Where OCI bundles and runtime state live (default: /run/airlock as
    /// root, else `$XDG_RUNTIME_DIR/airlock`). Must be traversable (o+x)
    /// down to it.
    pub run_dir: Option<PathBuf>,
    /// An imported image (`airlock image import`: a name or `sha256:` id)
    /// whose read-only root replaces the host's runtime, by backend:
    /// `images = { oci = "python:3.12-slim" }`. Only `oci` and `gvisor`
    /// take one; the process sandbox always runs the host's runtime.
    pub images: std::collections::BTreeMap<String, String>,
    /// Where imported images are (default: /var/lib/airlock/images as
    /// root, else `$XDG_DATA_HOME/airlock/images`).
    pub image_store: Option<PathBuf>,
    /// The OCI backend's settings (`[backends.oci]`).
    pub oci: OciConfig,
    /// The gVisor backend's settings (`[backends.gvisor]`).
    pub gvisor: GvisorConfig,
    /// The microvm backend's settings (`[backends.microvm]`).
    pub microvm: MicrovmConfig,
}

/// `[backends.oci]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OciConfig {
    /// The OCI runtime: `"crun"`, `"runc"` or a path to either (default:
    /// crun, or runc where crun refuses the host's cgroup layout).
    pub runtime: Option<PathBuf>,
}

/// `[backends.gvisor]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GvisorConfig {
    /// runsc (a path; default `runsc` in the usual directories).
    pub runsc: Option<PathBuf>,
    /// gVisor's platform: `"systrap"`, `"ptrace"` or `"kvm"` (default:
    /// runsc's own, systrap in current releases).
    pub platform: Option<String>,
}

/// `[backends.microvm]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MicrovmConfig {
    /// QEMU (default `qemu-system-x86_64` on PATH).
    pub qemu: Option<PathBuf>,
    /// The guest kernel (default: the newest `/boot/vmlinuz-*`, a cloud
    /// kernel preferred).
    pub kernel: Option<PathBuf>,
    /// `"kvm"` (default: hardware virtualisation, refused to start where
    /// KVM cannot run a guest kernel) or `"tcg"` (QEMU's software
    /// emulation: slow, for development and tests; results say so).
    pub accel: Option<String>,
    /// Where the guest's artifacts are cached (default /var/lib/airlock/vm
    /// as root).
    pub store: Option<PathBuf>,
}

impl Default for BackendsConfig {
    fn default() -> Self {
        BackendsConfig {
            offer: vec!["process".into()],
            pools: None,
            run_dir: None,
            images: std::collections::BTreeMap::new(),
            image_store: None,
            oci: OciConfig::default(),
            gvisor: GvisorConfig::default(),
            microvm: MicrovmConfig::default(),
        }
    }
}

/// The backend names `[backends]` knows.
pub const BACKEND_NAMES: [&str; 4] = ["process", "oci", "gvisor", "microvm"];

/// One tenant's share of the node: executions it may run at once and have
/// waiting. Unset fields take the `[tenants]` defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShareConfig {
    /// Executions running at once.
    pub max_running: Option<usize>,
    /// Executions waiting for a worker.
    pub max_queued: Option<usize>,
}

/// Fair sharing between tenants (`[tenants]`, and `[tenants.limits.NAME]`
/// for one tenant by name).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantsConfig {
    /// Executions one tenant may run at once. Default: `max_concurrent`
    /// (a tenant alone may use every worker; when several wait, workers go
    /// to the one running the fewest).
    pub max_running: Option<usize>,
    /// Executions one tenant may have waiting. Default: a quarter of
    /// `queue_size` (at least 1), so no tenant can fill the queue alone.
    pub max_queued: Option<usize>,
    /// Shares of single tenants, by tenant name.
    pub limits: std::collections::BTreeMap<String, ShareConfig>,
}

/// How long execution records and their logs are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Days after an execution ends that its record and logs are removed
    /// (checked at start and every hour; each removal audited as
    /// `retention.sweep`). Default: kept for ever.
    pub executions_days: Option<u64>,
}

/// Sessions (`[sessions]`): long-lived workspaces in which a tenant runs
/// many executions. A request may ask for any value up to the `max_*`
/// ones; unset, it gets the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// Open sessions one tenant may hold. Default 8.
    pub max_per_tenant: usize,
    /// Open sessions this server holds in all. Default 64.
    pub max_total: usize,
    /// A workspace's size when the request names none, MiB. Default 256.
    pub workspace_mib: u64,
    /// The largest workspace a request may ask for, MiB. Default 2048.
    /// Workspaces are memory (tmpfs): `max_total` of them may hold this
    /// much each.
    pub max_workspace_mib: u64,
    /// Files (inodes) in a workspace when the request names none.
    /// Default 10000.
    pub workspace_files: u64,
    /// The most files a request may ask for. Default 100000 (each inode
    /// is kernel memory the byte quota does not count).
    pub max_workspace_files: u64,
    /// What the quotas of all mounted workspaces may add up to, MiB.
    /// Default: a quarter of the host's memory. Beyond it, 503
    /// `sessions_full`.
    pub max_total_workspace_mib: Option<u64>,
    /// A session ends after this long with no execution running, when
    /// the request names no `idle_timeout_secs`. Default 300.
    pub idle_timeout_secs: u64,
    /// The longest idle timeout a request may ask for. Default 86400.
    pub max_idle_timeout_secs: u64,
    /// A session ends this long after it began at the latest, when the
    /// request names no `lifetime_secs`. Default 3600.
    pub lifetime_secs: u64,
    /// The longest lifetime a request may ask for. Default 86400.
    pub max_lifetime_secs: u64,
    /// The largest file uploaded or downloaded in one request, bytes.
    /// Default 16777216.
    pub max_file_bytes: u64,
    /// Snapshots one session may hold (requested and after each
    /// execution). Default 1000.
    pub max_snapshots: u64,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            max_per_tenant: 8,
            max_total: 64,
            workspace_mib: 256,
            max_workspace_mib: 2048,
            workspace_files: 10_000,
            max_workspace_files: 100_000,
            max_total_workspace_mib: None,
            idle_timeout_secs: 300,
            max_idle_timeout_secs: 86_400,
            lifetime_secs: 3600,
            max_lifetime_secs: 86_400,
            max_file_bytes: 16 << 20,
            max_snapshots: 1000,
        }
    }
}

impl SessionsConfig {
    /// `max_total_workspace_mib`, or a quarter of the host's memory.
    pub fn total_mib(&self) -> u64 {
        self.max_total_workspace_mib.unwrap_or_else(|| {
            let kib = std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|m| {
                    m.lines()
                        .find_map(|l| l.strip_prefix("MemTotal:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                })
                .unwrap_or(4 << 20);
            (kib / 1024 / 4).max(self.workspace_mib)
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(format!("sessions.{m}")));
        if !(1..=10_000).contains(&self.max_total) || self.max_per_tenant == 0 {
            return bad("max_total must be in 1..=10000 and max_per_tenant at least 1");
        }
        if !(1..=(1 << 20)).contains(&self.max_workspace_mib)
            || !(1..=self.max_workspace_mib).contains(&self.workspace_mib)
        {
            return bad(
                "workspace_mib must be in 1..=max_workspace_mib, and max_workspace_mib in 1..=1048576",
            );
        }
        if !(16..=100_000_000).contains(&self.max_workspace_files)
            || !(16..=self.max_workspace_files).contains(&self.workspace_files)
        {
            return bad(
                "workspace_files must be in 16..=max_workspace_files, and max_workspace_files in 16..=100000000",
            );
        }
        if !(1..=31_536_000).contains(&self.max_idle_timeout_secs)
            || !(1..=self.max_idle_timeout_secs).contains(&self.idle_timeout_secs)
            || !(1..=31_536_000).contains(&self.max_lifetime_secs)
            || !(1..=self.max_lifetime_secs).contains(&self.lifetime_secs)
        {
            return bad(
                "idle_timeout_secs and lifetime_secs must be in 1..= their max_* (at most 31536000)",
            );
        }
        if self
            .max_total_workspace_mib
            .is_some_and(|m| m < self.workspace_mib)
        {
            return bad(
                "max_total_workspace_mib must hold at least one workspace of workspace_mib",
            );
        }
        if !(1..=(1 << 30)).contains(&self.max_file_bytes) {
            return bad("max_file_bytes must be in 1..=1073741824");
        }
        if !(1..=100_000).contains(&self.max_snapshots) {
            return bad("max_snapshots must be in 1..=100000");
        }
        Ok(())
    }
}

/// The MCP server at `/mcp` (`[mcp]`): the sandbox tools for agents over
/// Streamable HTTP, each call made through this API as the caller.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct McpConfig {
    /// Serve `/mcp`. Default true.
    pub enabled: bool,
    /// Browser origins with their port (`https://app.example.com:443`,
    /// `http://localhost:*`) whose pages may call `/mcp`. A request carrying any other `Origin`
    /// is refused with 403, so a web page cannot drive a server on
    /// loopback (DNS rebinding). Default: none; clients that are not
    /// browsers send no `Origin`.
    pub allowed_origins: Vec<String>,
}

impl Default for McpConfig {
    fn default() -> Self {
        McpConfig {
            enabled: true,
            allowed_origins: Vec::new(),
        }
    }
}

impl McpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for o in &self.allowed_origins {
            // scheme://host:port or scheme://host:*: an origin without a
            // port would match every port of the host. `null` (sandboxed
            // frames, file:// pages of any site) is never accepted.
            let rest = o
                .strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"));
            let ok = rest.is_some_and(|r| {
                o.len() <= 256
                    && !r.contains(|c: char| c.is_whitespace() || "/?#@".contains(c))
                    && r.rsplit_once(':').is_some_and(|(host, port)| {
                        !host.is_empty()
                            && (port == "*" || port.parse::<u16>().is_ok_and(|p| p > 0))
                    })
            });
            if !ok {
                return Err(ConfigError::Invalid(format!(
                    "mcp.allowed_origins: {:?} is not an origin with its port (scheme://host:port or scheme://host:*)",
                    o.chars().take(80).collect::<String>()
                )));
            }
        }
        Ok(())
    }
}

/// Where the server's state lives (`[store]`): the embedded SQLite database
/// in the data directory (the default, for one machine), or a PostgreSQL
/// database several servers share.
#[derive(Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `postgres://user:password@host:port/database` (or
    /// `postgres:///database?host=/run/postgresql` for a local socket).
    /// Default: none, SQLite. `AIRLOCK_DATABASE_URL` or `DATABASE_URL`
    /// override it. Every server on one database needs the same master key.
    pub url: Option<String>,
    /// Connections to PostgreSQL this server holds at most. Default 16.
    pub max_connections: Option<u32>,
}

impl std::fmt::Debug for StoreConfig {
    // The URL may hold a password: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &self.url.as_ref().map(|_| "<set>"))
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

impl StoreConfig {
    /// The PostgreSQL URL, when the store is PostgreSQL.
    pub fn postgres_url(&self) -> Option<&str> {
        self.url.as_deref()
    }

    /// Connections to hold (16 unless set).
    pub fn connections(&self) -> u32 {
        self.max_connections.unwrap_or(16)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(u) = &self.url
            && !(u.starts_with("postgres://") || u.starts_with("postgresql://"))
        {
            // Not echoed: it may be a password pasted in the wrong place.
            return Err(ConfigError::Invalid(
                "store.url must be a postgres:// URL (leave it out for the embedded SQLite store)"
                    .into(),
            ));
        }
        if self
            .max_connections
            .is_some_and(|n| !(2..=1000).contains(&n))
        {
            return Err(ConfigError::Invalid(
                "store.max_connections must be in 2..=1000".into(),
            ));
        }
        Ok(())
    }
}

/// This server as one node of several on a shared PostgreSQL (`[node]`).
/// On the embedded SQLite store there is one node and none of it matters
/// but the name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Its name in `airlock admin nodes` and the audit log. Default: the
    /// host name.
    pub name: Option<String>,
    /// Where the other nodes reach this one's API, for requests about work
    /// it runs (event streams, cancel, sessions): `http://10.0.0.5:7070`.
    /// Default: the listen address when it is a specific one; none when it
    /// is 0.0.0.0 or [::] (other nodes then answer such requests 503
    /// `node_unreachable`).
    pub url: Option<String>,
    /// CA certificates (PEM) trusted for other nodes' `https://` URLs, in
    /// addition to the host's. Default: the host's only.
    pub ca_file: Option<PathBuf>,
    /// Heartbeat interval, ms. Default 2000.
    pub heartbeat_ms: u64,
    /// A node whose last heartbeat is older than this is lost: another node
    /// fails its executions and ends its sessions with `node_lost`, and the
    /// node itself stops its work before then, two heartbeats before the
    /// lease ends with none reaching the database (it may be cut off from
    /// it). Each node's own value
    /// is in its record, and the others wait for that one. At least five
    /// heartbeats. Default 15 000.
    pub lost_after_ms: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: None,
            url: None,
            ca_file: None,
            heartbeat_ms: 2_000,
            lost_after_ms: 15_000,
        }
    }
}

impl NodeConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(n) = &self.name
            && (n.is_empty()
                || n.len() > 64
                || !n
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
        {
            return Err(ConfigError::Invalid(
                "node.name: 1 to 64 of A-Z a-z 0-9 . _ -".into(),
            ));
        }
        if let Some(u) = &self.url {
            let ok = (u.starts_with("http://") || u.starts_with("https://"))
                && u.len() <= 512
                && u.parse::<hyper::Uri>().is_ok_and(|v| {
                    v.host().is_some() && v.path_and_query().is_none_or(|p| p.as_str() == "/")
                });
            if !ok {
                return Err(ConfigError::Invalid(
                    "node.url must be http:// or https:// with a host and no path (at most 512 bytes)"
                        .into(),
                ));
            }
        }
        if !(100..=60_000).contains(&self.heartbeat_ms) {
            return Err(ConfigError::Invalid(
                "node.heartbeat_ms must be in 100..=60000".into(),
            ));
        }
        // Five: a node fences itself two heartbeats before its lease ends
        // (one to notice, one for a heartbeat to time out), so a shorter
        // lease would stop it after one slow heartbeat.
        if self.lost_after_ms < 5 * self.heartbeat_ms || self.lost_after_ms > 3_600_000 {
            return Err(ConfigError::Invalid(
                "node.lost_after_ms must be at least five heartbeats and at most 3600000".into(),
            ));
        }
        Ok(())
    }
}

/// Everything `airlock serve` needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Listen address. Default 127.0.0.1:7070 (loopback: exposing the API
    /// is a deliberate choice).
    pub listen: SocketAddr,
    /// Data directory (database, master key file, pid file).
    pub data_dir: PathBuf,
    /// Executions running at once. Default: twice the CPU count, at least 2.
    pub max_concurrent: usize,
    /// Accepted executions waiting for a slot; beyond it, 429. Default 64.
    pub queue_size: usize,
    /// Largest request body in bytes. Default 2 MiB (code is capped at 1 MiB).
    pub body_limit_bytes: usize,
    /// A request body must arrive completely within this time, else 408.
    /// Default 30 000 ms (a 2 MiB body at 70 KB/s).
    pub body_timeout_ms: u64,
    /// Connections served at once; beyond it new connections are answered
    /// 503 and closed. Default 4096.
    pub max_connections: usize,
    /// Connections one client address (IPv6: one /64) may hold; beyond it,
    /// 429 and closed. Default 256 (raise it behind a reverse proxy, where
    /// every connection comes from the proxy's address).
    pub max_connections_per_client: usize,
    /// Requests one tenant may have in flight at once (an event stream
    /// counts while it is open); beyond it, 429 `too_many_requests`.
    /// Default 256.
    pub max_requests_per_tenant: usize,
    /// On SIGTERM, how long running executions may continue before they
    /// are killed with `server_shutdown`. Default 10 000 ms.
    pub shutdown_grace_ms: u64,
    /// Failed authentications per client address within the window before
    /// that address gets 429. Default 20.
    pub auth_failure_limit: u32,
    /// The window, seconds. Default 60.
    pub auth_failure_window_secs: u64,
    /// The base policy every execution starts from (same schema as
    /// `airlock run --policy`).
    pub policy: Policy,
    /// What requests may raise limits to.
    pub ceilings: LimitCeilings,
    /// What requests may ask for in `network`.
    pub egress: EgressConfig,
    /// Warm pools.
    pub pool: PoolConfig,
    /// Isolation backends offered.
    pub backends: BackendsConfig,
    /// Per-tenant shares of running and queued executions.
    pub tenants: TenantsConfig,
    /// A PEM file of CA certificates added to the host's bundle in every
    /// sandbox (a private CA of the operator's). Default: none
    /// (`AIRLOCK_CA_BUNDLE` when set).
    pub ca_bundle: Option<PathBuf>,
    /// A file the server writes its URL to (atomically, mode 0644) once it
    /// accepts connections, and removes when it stops. Default: none.
    pub ready_file: Option<PathBuf>,
    /// How long execution records are kept.
    pub retention: RetentionConfig,
    /// Sessions and their workspaces.
    pub sessions: SessionsConfig,
    /// The MCP server at `/mcp`.
    pub mcp: McpConfig,
    /// Serve HTTPS with this certificate and key (`[tls]`, both required).
    /// Default: plain HTTP, meant for loopback.
    pub tls: Option<crate::tls::TlsConfig>,
    /// The database: SQLite in the data directory, or PostgreSQL.
    pub store: StoreConfig,
    /// This server as a node of several.
    pub node: NodeConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            data_dir: default_data_dir(),
            max_concurrent: (cores * 2).max(2),
            queue_size: 64,
            body_limit_bytes: 2 << 20,
            body_timeout_ms: 30_000,
            max_connections: 4096,
            max_connections_per_client: 256,
            max_requests_per_tenant: 256,
            shutdown_grace_ms: 10_000,
            auth_failure_limit: 20,
            auth_failure_window_secs: 60,
            policy: Policy::default(),
            ceilings: LimitCeilings::default(),
            egress: EgressConfig::default(),
            pool: PoolConfig::default(),
            backends: BackendsConfig::default(),
            tenants: TenantsConfig::default(),
            ca_bundle: None,
            ready_file: None,
            retention: RetentionConfig::default(),
            sessions: SessionsConfig::default(),
            mcp: McpConfig::default(),
            tls: None,
            store: StoreConfig::default(),
            node: NodeConfig::default(),
        }
    }
}

/// Errors loading configuration. One line each.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// Path given by the operator.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The file did not parse or had unknown fields.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// Path given by the operator.
        path: String,
        /// One-line reason with location.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// `/var/lib/airlock` for root, else `$XDG_DATA_HOME/airlock` or
/// `~/.local/share/airlock`.
pub fn default_data_dir() -> PathBuf {
    // /proc/self is owned by the effective uid.
    let is_root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if is_root {
        return PathBuf::from("/var/lib/airlock");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("airlock");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(h) => PathBuf::from(h).join(".local/share/airlock"),
        None => PathBuf::from("airlock-data"),
    }
}

impl ServerConfig {
    /// The share of a tenant configured under `name` (or of any other).
    pub fn tenant_share(&self, name: Option<&str>) -> airlock_runtime::TenantShare {
        let t = &self.tenants;
        let own = name.and_then(|n| t.limits.get(n));
        // Clamped to the node's own limits, so one config fits hosts of
        // any size.
        airlock_runtime::TenantShare {
            max_running: own
                .and_then(|o| o.max_running)
                .or(t.max_running)
                .unwrap_or(self.max_concurrent)
                .min(self.max_concurrent),
            // Every execution waits a moment for its worker: at least 1.
            max_queued: own
                .and_then(|o| o.max_queued)
                .or(t.max_queued)
                .unwrap_or(self.queue_size / 4)
                .min(self.queue_size)
                .max(1),
        }
    }

    /// The default share and the configured tenants' own.
    pub fn tenant_shares(
        &self,
    ) -> (
        airlock_runtime::TenantShare,
        std::collections::HashMap<String, airlock_runtime::TenantShare>,
    ) {
        (
            self.tenant_share(None),
            self.tenants
                .limits
                .keys()
                .map(|n| (n.clone(), self.tenant_share(Some(n))))
                .collect(),
        )
    }

    /// How long a request body may take to arrive.
    pub fn body_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.body_timeout_ms)
    }

    /// Loads a TOML config file (unknown keys rejected).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let cfg: ServerConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: airlock_policy::describe_toml_error(&text, &e),
        })?;
        Ok(cfg)
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_concurrent == 0 || self.max_concurrent > 1024 {
            return Err(ConfigError::Invalid(
                "max_concurrent must be in 1..=1024".into(),
            ));
        }
        let b = &self.backends;
        for name in b.offer.iter().chain(b.pools.iter().flatten()) {
            if !BACKEND_NAMES.contains(&name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "backends: unknown backend {:?} (expected {})",
                    name.chars().take(32).collect::<String>(),
                    BACKEND_NAMES.join(", ")
                )));
            }
        }
        if let Some(a) = &b.microvm.accel
            && !matches!(a.as_str(), "kvm" | "tcg")
        {
            return Err(ConfigError::Invalid(format!(
                "backends.microvm.accel: {:?} (expected \"kvm\" or \"tcg\")",
                a.chars().take(32).collect::<String>()
            )));
        }
        if b.offer.is_empty() {
            return Err(ConfigError::Invalid(
                "backends.offer must name at least one backend".into(),
            ));
        }
        if let Some(p) = &b.gvisor.platform
            && !airlock_backend::oci::GVISOR_PLATFORMS.contains(&p.as_str())
        {
            return Err(ConfigError::Invalid(format!(
                "backends.gvisor.platform: {:?} (expected {})",
                p.chars().take(32).collect::<String>(),
                airlock_backend::oci::GVISOR_PLATFORMS.join(", ")
            )));
        }
        for name in b.images.keys() {
            if !matches!(name.as_str(), "oci" | "gvisor") {
                return Err(ConfigError::Invalid(format!(
                    "backends.images: {:?} takes no image (only oci and gvisor do)",
                    name.chars().take(32).collect::<String>()
                )));
            }
            if !b.offer.contains(name) {
                return Err(ConfigError::Invalid(format!(
                    "backends.images names {name}, which backends.offer does not offer"
                )));
            }
        }
        if let Some(p) = b.pools.iter().flatten().find(|p| !b.offer.contains(p)) {
            return Err(ConfigError::Invalid(format!(
                "backends.pools names {p}, which backends.offer does not offer"
            )));
        }
        if self.pool.python > 64 || self.pool.javascript > 64 {
            return Err(ConfigError::Invalid("pool sizes must be at most 64".into()));
        }
        if self.queue_size > 100_000 {
            return Err(ConfigError::Invalid(
                "queue_size must be at most 100000".into(),
            ));
        }
        if self.body_limit_bytes < 1024 || self.body_limit_bytes > (256 << 20) {
            return Err(ConfigError::Invalid(
                "body_limit_bytes must be in 1024..=268435456".into(),
            ));
        }
        if self.body_timeout_ms < 100 || self.body_timeout_ms > 3_600_000 {
            return Err(ConfigError::Invalid(
                "body_timeout_ms must be in 100..=3600000".into(),
            ));
        }
        if self.max_connections == 0 || self.max_connections > 1_000_000 {
            return Err(ConfigError::Invalid(
                "max_connections must be in 1..=1000000".into(),
            ));
        }
        if self.max_connections_per_client == 0 || self.max_requests_per_tenant == 0 {
            return Err(ConfigError::Invalid(
                "max_connections_per_client and max_requests_per_tenant must be at least 1".into(),
            ));
        }
        if self
            .retention
            .executions_days
            .is_some_and(|d| !(1..=36_500).contains(&d))
        {
            return Err(ConfigError::Invalid(
                "retention.executions_days must be in 1..=36500".into(),
            ));
        }
        self.sessions.validate()?;
        self.mcp.validate()?;
        self.store.validate()?;
        self.node.validate()?;
        let t = &self.tenants;
        let own = t.limits.values().map(|o| o.max_running);
        if std::iter::once(t.max_running)
            .chain(own)
            .any(|r| r == Some(0))
        {
            return Err(ConfigError::Invalid(
                "tenants: max_running must be at least 1".into(),
            ));
        }
        if let Some(bad) = t.limits.keys().find(|n| !valid_tenant_name(n)) {
            return Err(ConfigError::Invalid(format!(
                "tenants.limits: {:?} is not a tenant name",
                bad.chars().take(64).collect::<String>()
            )));
        }
        if !self.policy.filesystem.read_only_paths.is_empty() {
            // Grants are an operator's choice per run, not a server-wide
            // hole every tenant inherits.
            return Err(ConfigError::Invalid(
                "policy.filesystem.read_only_paths is not allowed in the server policy".into(),
            ));
        }
        for (list, private) in [
            (&self.egress.allow, false),
            (&self.egress.allow_private, true),
        ] {
            for r in list {
                airlock_policy::egress::parse_rule(r, private)
                    .map_err(|e| ConfigError::Invalid(format!("egress: {e}")))?;
            }
        }
        self.policy
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        // Limits no sandbox of some language could start with would turn
        // every such execution into an internal error.
        for lang in airlock_policy::Language::ALL {
            airlock_sandbox::engine::check_runnable(&self.policy, lang)
                .map_err(|e| ConfigError::Invalid(format!("policy: {}", e.public_message())))?;
        }
        Ok(())
    }
}

/// Tenant names: `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn valid_tenant_name(n: &str) -> bool {
    let b = n.as_bytes();
    (1..=63).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

/// Where the master key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterKeySource {
    /// `AIRLOCK_MASTER_KEY`.
    Env,
    /// `AIRLOCK_MASTER_KEY_FILE`.
    File(PathBuf),
    /// `<data dir>/master.key`, existing.
    DataDir(PathBuf),
    /// `<data dir>/master.key`, just generated.
    Generated(PathBuf),
}

/// Resolves the master key: `AIRLOCK_MASTER_KEY` (64 hex), else
/// `AIRLOCK_MASTER_KEY_FILE`, else `<data dir>/master.key`, generated
/// (mode 0600) when missing and `create` is set.
pub fn master_key(data_dir: &Path, create: bool) -> Result<(MasterKey, MasterKeySource), String> {
    if let Ok(v) = std::env::var("AIRLOCK_MASTER_KEY") {
        return MasterKey::from_hex(&v)
            .map(|k| (k, MasterKeySource::Env))
            .map_err(|e| format!("AIRLOCK_MASTER_KEY: {e}"));
    }
    if let Some(p) = std::env::var_os("AIRLOCK_MASTER_KEY_FILE") {
        let p = PathBuf::from(p);
        return MasterKey::from_file(&p)
            .map(|k| (k, MasterKeySource::File(p.clone())))
            .map_err(|e| format!("AIRLOCK_MASTER_KEY_FILE {}: {e}", p.display()));
    }
    let p = data_dir.join("master.key");
    if p.exists() {
        return MasterKey::from_file(&p)
            .map(|k| (k, MasterKeySource::DataDir(p.clone())))
            .map_err(|e| format!("{}: {e}", p.display()));
    }
    if !create {
        return Err(format!(
            "no master key: {} does not exist and neither AIRLOCK_MASTER_KEY nor AIRLOCK_MASTER_KEY_FILE is set",
            p.display()
        ));
    }
    MasterKey::generate_into(&p)
        .map(|k| (k, MasterKeySource::Generated(p.clone())))
        .map_err(|e| format!("{}: {e}", p.display()))
}

/// Creates the data directory (mode 0700) if needed and refuses one that
/// other users can enter.
pub fn prepare_data_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if !dir.exists() {
        // (Only reached by `open_store`: an existing store's directory exists.)
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create data directory {}: {e}", dir.display()))?;
    }
    let meta =
        std::fs::metadata(dir).map_err(|e| format!("data directory {}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!(
            "data directory {} is not a directory",
            dir.display()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "data directory {} is accessible to group or others (chmod 700)",
            dir.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_leaves_room_to_fence_before_it_ends() {
        let node = |heartbeat_ms, lost_after_ms| NodeConfig {
            heartbeat_ms,
            lost_after_ms,
            ..NodeConfig::default()
        };
        assert!(NodeConfig::default().validate().is_ok());
        assert!(node(2000, 10_000).validate().is_ok());
        let e = node(2000, 9999).validate().unwrap_err().to_string();
        assert!(e.contains("at least five heartbeats"), "{e}");
        assert!(node(99, 1000).validate().is_err());
        assert!(node(60_000, 3_600_001).validate().is_err());
    }
}
