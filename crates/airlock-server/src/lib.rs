//! airlock-server: the multi-tenant HTTP API (`airlock serve`).
//!
//! Owns: authentication at the edge (API key → tenant before anything
//! else), request hygiene (size, content type, nesting, unknown fields),
//! the execution lifecycle (admission, queue, workers, cancel, drain),
//! crash recovery, metrics and the OpenAPI document.
//!
//! Must never: show one tenant anything of another (every lookup is scoped
//! by the authenticated tenant and a miss is 404, never 403), return a host
//! path or internal error text, log a request body, or run a sandbox from a
//! short-lived thread (see `exec`).

pub mod api;
pub mod body;
pub mod config;
pub mod conn;
pub mod evidence;
pub mod guest;
mod inproc;
pub mod mcp;
pub mod metrics;
pub mod node;
pub mod openapi;
mod peer;
mod piston;
pub mod problem;
pub mod sessions;
pub mod snapshots;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use airlock_backend::{Backends, TerminationReason};
use airlock_runtime::Executor;
use airlock_store::{Keyring, NewAudit, PgStore, SqliteStore, Store, now_ms};

pub use config::ServerConfig;

/// Shared state of all handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Configuration.
    pub cfg: Arc<ServerConfig>,
    /// Storage.
    pub store: Arc<dyn Store>,
    /// Admission, workers, pools and the offered backends.
    pub exec: Arc<Executor>,
    /// Metrics.
    pub metrics: Arc<metrics::Metrics>,
    /// Failed-auth throttle.
    pub limiter: Arc<api::AuthLimiter>,
    /// Requests in flight per tenant.
    pub tenant_requests: Arc<api::TenantRequests>,
    /// `/openapi.json`, made once from the handlers and the configuration.
    pub openapi: Arc<String>,
    /// Set once SIGTERM arrives.
    pub draining: Arc<AtomicBool>,
    /// Open sessions' workspaces (None: this server cannot mount them).
    pub sessions: Option<Arc<airlock_runtime::session::Sessions>>,
    /// Snapshots' contents.
    pub blobs: Arc<snapshots::Blobs>,
    /// This server as a node.
    pub node: Arc<node::Node>,
    /// TLS for reaching other nodes' `https://` URLs.
    pub peer_tls: Option<Arc<rustls::ClientConfig>>,
    /// The other active nodes' addresses (connection limits).
    pub peers: Arc<conn::Peers>,
    /// Signs and checks the requests nodes pass each other.
    pub(crate) node_key: NodeKey,
    /// The signed requests already answered (each is taken once).
    pub(crate) forwards_seen: Arc<peer::Seen>,
}

/// Why the server could not start or stop cleanly. One line each.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Data directory or master key problem.
    #[error("{0}")]
    Setup(String),
    /// Another server holds the data directory.
    #[error("another airlock server is using the data directory {0}")]
    Locked(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] airlock_store::StoreError),
    /// The TLS certificate or key could not be used.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Binding or serving failed.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// Raises the soft open-file limit to the hard one (at most 65536): every
/// sandbox, connection and egress flow holds descriptors.
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let want = lim.maximum.map_or(65_536, |m| m.min(65_536));
    if lim.current.is_some_and(|c| c < want) {
        let mut new = lim;
        new.current = Some(want);
        if let Err(e) = setrlimit(Resource::Nofile, new) {
            tracing::warn!(error = %e, "could not raise the open-file limit");
        }
    }
}

/// Database file inside the data directory.
pub fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join("airlock.db")
}

/// Opens the server's store, creating what does not exist yet: the data
/// directory and (when none is given) the master key, and the embedded
/// SQLite database in it, or the schema in the PostgreSQL database
/// `store` names: for `airlock serve` and `airlock admin init` only.
pub async fn open_store(
    data_dir: &Path,
    store: &config::StoreConfig,
) -> Result<Arc<dyn Store>, ServeError> {
    Ok(open(data_dir, store, true, None).await?.0)
}

/// [`open_store`] for `airlock serve` as node `node_id`: on PostgreSQL it
/// also takes that node's lock (one process per node; see
/// `PgStore::lock_node`), as the data directory's lock file does on one
/// host.
pub async fn open_server_store(
    data_dir: &Path,
    store: &config::StoreConfig,
    node_id: &str,
) -> Result<(Arc<dyn Store>, NodeKey), ServeError> {
    open(data_dir, store, true, Some(node_id)).await
}

/// Opens an existing store (every admin command but `init`): a mistyped
/// data directory is an error naming it, never a new database and master
/// key (with PostgreSQL, the master key must exist: it is never made here).
pub async fn open_existing_store(
    data_dir: &Path,
    store: &config::StoreConfig,
) -> Result<Arc<dyn Store>, ServeError> {
    // With PostgreSQL the directory must exist still: it holds the lock
    // and pid files, snapshot contents, perhaps the master key.
    let here = match store.postgres_url() {
        None => db_path(data_dir).is_file(),
        Some(_) => data_dir.is_dir(),
    };
    if !here {
        return Err(ServeError::Setup(format!(
            "no airlock data directory at {} (create one with `airlock admin init` or `airlock serve`)",
            data_dir.display()
        )));
    }
    Ok(open(data_dir, store, false, None).await?.0)
}

async fn open(
    data_dir: &Path,
    store: &config::StoreConfig,
    create: bool,
    node_id: Option<&str>,
) -> Result<(Arc<dyn Store>, NodeKey), ServeError> {
    config::prepare_data_dir(data_dir).map_err(ServeError::Setup)?;
    let (key, source) = config::master_key(data_dir, create).map_err(ServeError::Setup)?;
    if let config::MasterKeySource::Generated(p) = &source {
        tracing::warn!(
            path = %p.display(),
            "no AIRLOCK_MASTER_KEY or AIRLOCK_MASTER_KEY_FILE given: generated a master key \
             in the data directory (mode 0600); keep it apart from backups of the database"
        );
        eprintln!(
            "airlock: warning: generated a new master key at {} (set AIRLOCK_MASTER_KEY_FILE to keep keys apart from data)",
            p.display()
        );
    }
    let keys = Keyring::new(&key);
    let node_key = Arc::new(Keyring::node_request_key(&key));
    let opened: Arc<dyn Store> = match store.postgres_url() {
        None => Arc::new(SqliteStore::open(&db_path(data_dir), keys).await?),
        Some(url) => {
            let pg = PgStore::open(url, keys, store.connections()).await?;
            if let Some(id) = node_id
                && !pg.lock_node(id).await?
            {
                pg.close().await;
                return Err(ServeError::Setup(format!(
                    "another airlock server runs as this node ({id}, from {}) on this PostgreSQL \
                     database: every node needs a data directory of its own, not a copy of \
                     another's",
                    data_dir.join("node_id").display()
                )));
            }
            Arc::new(pg)
        }
    };
    Ok((opened, node_key))
}

/// The key this server signs and checks node-to-node requests with.
pub(crate) type NodeKey = Arc<zeroize::Zeroizing<[u8; 32]>>;

/// The backends `[backends]` offers, each installed and proven to run a
/// sandbox here (a trivial one, end to end) before the server serves:
/// a backend the operator offers that cannot run is a configuration error.
fn offered_backends(
    cfg: &ServerConfig,
    engine_cfg: airlock_sandbox::EngineConfig,
) -> Result<Backends, ServeError> {
    let engine = Arc::new(airlock_sandbox::Engine::new(engine_cfg));
    let run_dir = cfg
        .backends
        .run_dir
        .clone()
        .unwrap_or_else(airlock_backend::default_run_dir);
    let wanted = &cfg.backends.offer;
    let (all, failed) = if wanted.iter().all(|n| n == "process") {
        (
            vec![
                Arc::new(airlock_backend::process::ProcessBackend::new(engine))
                    as Arc<dyn airlock_backend::Backend>,
            ],
            Vec::new(),
        )
    } else {
        let store = airlock_backend::image::Store::new(
            cfg.backends
                .image_store
                .clone()
                .unwrap_or_else(airlock_backend::image::default_store),
        );
        let mut images = std::collections::BTreeMap::new();
        for (name, reference) in &cfg.backends.images {
            let root = store.root(reference).map_err(|e| {
                config::ConfigError::Invalid(format!("backends.images.{name}: {e}"))
            })?;
            images.insert(name.clone(), root);
        }
        let (mut all, mut failed) = airlock_backend::on_this_host(
            engine.clone(),
            &run_dir,
            &images,
            &airlock_backend::oci::Choice {
                oci_runtime: cfg.backends.oci.runtime.clone(),
                runsc: cfg.backends.gvisor.runsc.clone(),
                gvisor_platform: cfg.backends.gvisor.platform.clone(),
            },
        );
        if wanted.iter().any(|n| n == "microvm") {
            match microvm_backend(&cfg.backends.microvm, engine, &run_dir) {
                Ok(b) => all.push(b),
                Err(why) => failed.push(airlock_backend::NotHere {
                    name: "microvm",
                    why,
                }),
            }
        }
        (all, failed)
    };
    let mut offered = Vec::new();
    for name in wanted {
        if let Some(f) = failed.iter().find(|f| f.name == name) {
            return Err(config::ConfigError::Invalid(format!(
                "backends.offer: {name} cannot start here: {}",
                f.why
            ))
            .into());
        }
        let Some(b) = all.iter().find(|b| b.name() == name) else {
            return Err(config::ConfigError::Invalid(format!(
                "backends.offer: {name} is not installed here (see `airlock doctor`)"
            ))
            .into());
        };
        if name != "process" {
            let probe = b.probe();
            if !probe.works {
                return Err(config::ConfigError::Invalid(format!(
                    "backends.offer: {name} does not run a sandbox here: {}",
                    probe.fix.unwrap_or_default()
                ))
                .into());
            }
        }
        offered.push(b.clone());
    }
    Ok(Backends::new(offered))
}

/// The microvm backend as `[backends.microvm]` configures it: KVM unless
/// the operator chose software emulation (`accel = "tcg"`), which a
/// server never falls back to by itself.
fn microvm_backend(
    cfg: &config::MicrovmConfig,
    engine: Arc<airlock_sandbox::Engine>,
    run_dir: &std::path::Path,
) -> Result<Arc<dyn airlock_backend::Backend>, String> {
    use airlock_backend::microvm::{self, Accel, Settings};
    let settings = Settings {
        qemu: cfg.qemu.clone(),
        kernel: cfg.kernel.clone(),
        accel: match cfg.accel.as_deref() {
            Some("tcg") => Some(Accel::Tcg),
            Some("kvm") => Some(Accel::Kvm),
            _ => None,
        },
        allow_tcg: false,
        store: cfg.store.clone(),
    };
    let b: Arc<dyn airlock_backend::Backend> = microvm::backend(engine, &settings, run_dir)
        .map_err(|e| {
            if e.starts_with("KVM") {
                format!("{e}: [backends.microvm] accel = \"tcg\"")
            } else {
                e
            }
        })?;
    Ok(b)
}

/// Runs the server until SIGTERM or SIGINT, then drains.
pub async fn serve(
    cfg: ServerConfig,
    engine_cfg: airlock_sandbox::EngineConfig,
) -> Result<(), ServeError> {
    cfg.validate()?;
    // First: from here on a SIGHUP (a reload sent early by a unit's
    // ExecReload) must not take the default action and kill the server.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    // SIGTERM and SIGINT too: a stop that arrives before the accept loop
    // first polls its drain (systemd stopping a unit right after READY)
    // must drain, not take the default action and end the server with
    // executions in flight.
    let stop =
        StopSignals::install().map_err(|e| ServeError::Setup(format!("signal handlers: {e}")))?;
    // Before anything is touched: a bad certificate is a configuration
    // error.
    let tls = match &cfg.tls {
        Some(t) => Some(Arc::new(tls::Tls::new(t.clone())?)),
        None => None,
    };
    config::prepare_data_dir(&cfg.data_dir).map_err(ServeError::Setup)?;
    // One server per data directory: a second one would mark the first
    // one's running executions as crashed.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cfg.data_dir.join("server.lock"))
        .map_err(|e| ServeError::Setup(format!("lock file: {e}")))?;
    lock.try_lock()
        .map_err(|_| ServeError::Locked(cfg.data_dir.display().to_string()))?;

    raise_fd_limit();
    let sandbox_ids = engine_cfg.root_host_ids;
    let backends = offered_backends(&cfg, engine_cfg)?;
    let node_id = node::load_or_create_id(&cfg.data_dir)?;
    let (store, node_key) = open_server_store(&cfg.data_dir, &cfg.store, &node_id).await?;

    let pid_file = cfg.data_dir.join("server.pid");
    let previous_pid = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|p| *p != std::process::id());
    let (recovered, reaped) =
        airlock_runtime::recover(store.as_ref(), &backends, &node_id, previous_pid).await?;
    if recovered > 0 || reaped > 0 {
        tracing::warn!(
            executions = recovered,
            cgroups = reaped,
            "recovered from an unclean stop"
        );
    }
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))
        .map_err(|e| ServeError::Setup(format!("pid file: {e}")))?;
    let sessions = open_sessions(&cfg, store.as_ref(), &node_id, sandbox_ids).await?;
    let peer_tls = match cfg.store.postgres_url() {
        Some(_) => Some(peer::tls_client(cfg.node.ca_file.as_deref()).map_err(ServeError::Setup)?),
        None => None,
    };

    let dns = match cfg.egress.dns {
        Some(a) => airlock_egress::Dns::Nameserver(a),
        None => airlock_egress::Dns::System,
    };
    let resolver = match airlock_egress::resolver(&dns) {
        Ok(r) => Some(Arc::new(r)),
        Err(e) => {
            tracing::warn!(error = %e, "no DNS resolver: egress requests will be refused");
            None
        }
    };
    let metrics = Arc::new(metrics::Metrics::new());
    let shares = cfg.tenant_shares();
    let exec = Executor::start(
        cfg.max_concurrent,
        cfg.queue_size,
        airlock_runtime::Deps {
            store: store.clone(),
            backends,
            metrics: metrics.runtime.clone(),
            render: Box::new(api::render_record),
            guest: guest::files(),
            resolver,
            pool: Some(airlock_runtime::PoolSpec {
                policy: cfg.policy.clone(),
                targets: vec![
                    (airlock_policy::Language::Python, cfg.pool.python),
                    (airlock_policy::Language::Javascript, cfg.pool.javascript),
                ],
                backends: cfg.backends.pools.clone(),
            }),
            shares,
        },
    )
    .map_err(|e| ServeError::Setup(format!("worker threads: {e}")))?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| ServeError::Listen {
        addr: cfg.listen,
        source,
    })?;
    let cfg = Arc::new(cfg);
    let state = AppState {
        cfg: cfg.clone(),
        store: store.clone(),
        exec: exec.clone(),
        metrics,
        limiter: Arc::new(api::AuthLimiter::default()),
        tenant_requests: Arc::new(api::TenantRequests::default()),
        openapi: Arc::new(
            openapi::document(
                &cfg,
                &exec
                    .backends()
                    .all()
                    .iter()
                    .map(|b| (b.name(), b.level(), b.sessions()))
                    .collect::<Vec<_>>(),
            )
            .to_string(),
        ),
        draining: Arc::new(AtomicBool::new(false)),
        sessions,
        blobs: Arc::new(snapshots::Blobs::new(&cfg.data_dir)),
        node: Arc::new(node::Node {
            url: node::advertised_url(cfg.node.url.as_deref(), local, tls.is_some()),
            name: cfg.node.name.clone().unwrap_or_else(node::host_name),
            id: node_id,
            lost_after_ms: i64::try_from(cfg.node.lost_after_ms).unwrap_or(i64::MAX),
        }),
        peer_tls,
        peers: Arc::default(),
        node_key,
        forwards_seen: Arc::default(),
    };
    // Before it serves: the other nodes see it alive, and where it is.
    store.register_node(&node::record(&state.node)).await?;
    store
        .append_audit(
            NewAudit::new(None, "server.start", "server", "", None)
                .with_detail(serde_json::json!({ "pid": std::process::id() })),
        )
        .await?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(addr = %local, data_dir = %cfg.data_dir.display(), tls = tls.is_some(), "airlock serving");
    if tls.is_none() && !local.ip().is_loopback() {
        tracing::warn!(
            addr = %local,
            "serving plain HTTP beyond loopback: API keys and secrets cross the network in clear; \
             configure [tls] (or --tls-cert/--tls-key) or put a TLS proxy in front"
        );
    }
    let reloader = spawn_reloader(hup, tls.clone(), store.clone());
    // The socket listens (connections queue from here on): a line for
    // scripts (and tests) that start the server on port 0, the ready file,
    // and systemd's readiness notification.
    println!("airlock: listening on {scheme}://{local}");
    if let Some(p) = &cfg.ready_file {
        write_ready_file(p, &format!("{scheme}://{local}\n"))
            .map_err(|e| ServeError::Setup(format!("ready file {}: {e}", p.display())))?;
    }
    notify_systemd(&format!("READY=1\nSTATUS=listening on {scheme}://{local}"));

    let mut background: Vec<tokio::task::JoinHandle<()>> = reloader.into_iter().collect();
    background.push(tokio::spawn(sessions::reaper(state.clone())));
    if cfg.store.postgres_url().is_some() {
        background.push(tokio::spawn(node::run(state.clone())));
    }
    {
        let st = state.clone();
        background.push(tokio::spawn(async move {
            loop {
                match snapshots::sweep_deleted_tenants(&st).await {
                    Ok(0) => {}
                    Ok(files) => tracing::info!(files, "removed deleted tenants' snapshot files"),
                    Err(e) => tracing::error!(error = %e, "sweeping deleted tenants' snapshot files failed"),
                }
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        }));
    }
    if let Some(days) = cfg.retention.executions_days {
        // Old records go at start and every hour after; each sweep that
        // removed something is audited.
        let store = store.clone();
        background.push(tokio::spawn(async move {
            let actor = airlock_store::Actor {
                actor: "server".into(),
                request_id: None,
            };
            loop {
                let before = now_ms() - i64::try_from(days).unwrap_or(36_500) * 86_400_000;
                match store.sweep_executions(before, &actor).await {
                    Ok((0, 0)) => {}
                    Ok((executions, logs)) => {
                        tracing::info!(executions, logs, days, "retention: removed old records")
                    }
                    Err(e) => tracing::error!(error = %e, "retention sweep failed"),
                }
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        }));
    }

    let app = api::router(state.clone());
    accept_loop(listener, app, state.clone(), tls, stop).await;
    // Drained: nothing runs in a session any more. Sessions end with the
    // server (their workspaces are memory).
    sessions::end_all(&state).await;
    // Nothing runs against the store once it closes (also when the server
    // is embedded in a longer-lived runtime).
    for task in background {
        task.abort();
        let _ = task.await;
    }
    if let Some(p) = &cfg.ready_file {
        let _ = std::fs::remove_file(p);
    }

    exec.stop();
    store.stop_node(&state.node.id).await?;
    store
        .append_audit(NewAudit::new(None, "server.stop", "server", "", None))
        .await?;
    store.close().await;
    let _ = std::fs::remove_file(&pid_file);
    tracing::info!("airlock stopped");
    Ok(())
}

/// The sessions a previous run left open end with `server_restart` (their
/// workspaces went with it, or are reaped now); then the workspaces this
/// server will hold, when it can mount them (root).
async fn open_sessions(
    cfg: &ServerConfig,
    store: &dyn Store,
    node_id: &str,
    sandbox_ids: (u32, u32),
) -> Result<Option<Arc<airlock_runtime::session::Sessions>>, ServeError> {
    use airlock_runtime::session::{SessionError, Sessions};
    let actor = airlock_store::Actor {
        actor: "server".into(),
        request_id: None,
    };
    let stale = store.open_sessions(node_id).await?;
    for s in &stale {
        store
            .end_session(&s.id, "server_restart", now_ms(), &actor)
            .await?;
    }
    let run_dir = cfg
        .backends
        .run_dir
        .clone()
        .unwrap_or_else(airlock_backend::default_run_dir);
    let c = &cfg.sessions;
    // The token of this data directory (one server at a time holds it):
    // the mount points of an earlier run of this server carry it.
    let dir = std::fs::canonicalize(&cfg.data_dir).unwrap_or_else(|_| cfg.data_dir.clone());
    let token = blake3::hash(dir.as_os_str().as_encoded_bytes()).to_hex();
    match Sessions::new(&run_dir, sandbox_ids) {
        Ok(s) => {
            let s = s.with_instance(&token[..16]);
            let reaped = s.reap_stale();
            if !stale.is_empty() || reaped > 0 {
                tracing::warn!(
                    sessions = stale.len(),
                    workspaces = reaped,
                    "ended the sessions of an unclean stop"
                );
            }
            Ok(Some(Arc::new(s.with_limits(
                c.max_per_tenant,
                c.max_total,
                c.total_mib(),
            ))))
        }
        Err(SessionError::Unavailable) => {
            tracing::info!("not running as root: sessions are unavailable");
            Ok(None)
        }
        Err(SessionError::Host(m)) => Err(ServeError::Setup(format!("sessions: {m}"))),
        Err(e) => Err(ServeError::Setup(format!("sessions: {e}"))),
    }
}

/// SIGHUP reloads the TLS certificate and key (systemd's `ExecReload=kill
/// -HUP $MAINPID`, a renewal hook). Without TLS it is logged and ignored, so
/// a stray SIGHUP never stops the server. Each reload is audited.
fn spawn_reloader(
    hup: std::io::Result<tokio::signal::unix::Signal>,
    tls: Option<Arc<tls::Tls>>,
    store: Arc<dyn Store>,
) -> Option<tokio::task::JoinHandle<()>> {
    let mut hup = match hup {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP: certificates reload only on restart");
            return None;
        }
    };
    Some(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let Some(tls) = &tls else {
                tracing::info!("SIGHUP: nothing to reload (no TLS configured)");
                continue;
            };
            let detail = match tls.reload() {
                Ok(()) => {
                    tracing::info!("SIGHUP: TLS certificate and key reloaded");
                    serde_json::json!({ "ok": true })
                }
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: TLS reload failed; the previous certificate stays in use");
                    serde_json::json!({ "ok": false, "error": e.to_string() })
                }
            };
            let audit =
                NewAudit::new(None, "server.tls_reload", "server", "", None).with_detail(detail);
            if let Err(e) = store.append_audit(audit).await {
                tracing::error!(error = %e, "audit of the TLS reload failed");
            }
        }
    }))
}

/// Writes `text` to `path` through a temporary file and a rename, so a
/// reader sees either nothing or all of it.
fn write_ready_file(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("ready"),
        std::process::id()
    ));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// `sd_notify`: one datagram to `$NOTIFY_SOCKET` (a path, or `@` for the
/// abstract namespace) when systemd started the server with `Type=notify`.
fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str());
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name),
        None => std::os::unix::net::SocketAddr::from_pathname(Path::new(&target)),
    };
    let sent = std::os::unix::net::UnixDatagram::unbound()
        .and_then(|s| addr.and_then(|a| s.send_to_addr(state.as_bytes(), &a)));
    if let Err(e) = sent {
        tracing::warn!(error = %e, "systemd notification failed");
    }
}

/// A client must send its request head within this time (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS client must complete its handshake within this time.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections until the drain completes, then gives open
/// connections a bounded time to finish.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    st: AppState,
    tls: Option<Arc<tls::Tls>>,
    stop_signals: StopSignals,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let limits = conn::ConnLimits::new(
        st.cfg.max_connections,
        st.cfg.max_connections_per_client,
        st.peers.clone(),
    );
    let mut drained = std::pin::pin!(drain(st, stop_signals));
    // Every connection's task: reaped as they end, aborted if they outlive
    // the drain's bound (so none runs once the store is closed).
    let mut conns = tokio::task::JoinSet::new();
    // Handshakes still in progress when the drain ends are abandoned.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut drained => break,
            _ = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let permit = match limits.admit(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                if tls.is_none() {
                    // Answered, not reset: the client learns why and when
                    // to come back. Nothing of the request is read.
                    let answer = match why {
                        conn::Refused::ServerFull => conn::problem_response(
                            503,
                            "Service Unavailable",
                            "server_busy",
                            "Server busy",
                            "the server holds as many connections as it serves; retry later",
                            Some(1),
                        ),
                        conn::Refused::ClientFull => conn::problem_response(
                            429,
                            "Too Many Requests",
                            "too_many_connections",
                            "Too many connections",
                            "this client holds as many connections as it may; close some or retry later",
                            Some(1),
                        ),
                    };
                    // One non-blocking write (a fresh connection's buffer
                    // holds it) and close: a refused connection costs no
                    // task and holds no descriptor.
                    let _ = stream.try_write(&answer);
                }
                // Over TLS an answer would cost a handshake, the very work
                // the limit spares: the connection is closed unanswered.
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let svc = app
            .clone()
            .layer(axum::Extension(axum::extract::ConnectInfo(peer)));
        // Subscribed now, so a connection whose handshake ends after the
        // drain began is still shut down gracefully (and waited for).
        let watcher = graceful.watcher();
        match &tls {
            None => {
                conns.spawn(serve_conn(stream, svc, watcher, permit));
            }
            Some(tls) => {
                let acceptor = tls.acceptor();
                let mut stopped = stopped.clone();
                conns.spawn(async move {
                    let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                    tokio::select! {
                        r = handshake => match r {
                            Ok(Ok(s)) => serve_conn(s, svc, watcher, permit).await,
                            // Scanners and plain-HTTP clients: nothing to
                            // tell an operator at the default level.
                            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        },
                        _ = stopped.changed() => {}
                    }
                });
            }
        }
    }
    drop(listener);
    let _ = stop.send(true);
    // Drained: every execution is final. Open connections (a slow reader,
    // a client that never finishes its request) get a bounded time.
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open 5 s after the drain; closing them");
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

/// Serves HTTP/1.1 on one accepted connection (plain or TLS) until it
/// closes; the connection's slot is released at the end.
async fn serve_conn<IO>(
    io: IO,
    svc: axum::Router,
    watcher: hyper_util::server::graceful::Watcher,
    permit: conn::ConnSlot,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(
            TokioIo::new(conn::Guarded::new(io)),
            TowerToHyperService::new(svc),
        );
    let _ = watcher.watch(conn).await;
    drop(permit);
}

/// The handlers for the signals that stop the server, installed before
/// anything starts.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

/// Waits for SIGTERM/SIGINT, then: refuse new executions, stop queued
/// ones, give running ones the grace period, kill the rest with
/// `server_shutdown`, and wait until every record is final.
async fn drain(st: AppState, mut stop: StopSignals) {
    tokio::select! {
        _ = stop.term.recv() => {}
        _ = stop.int.recv() => {}
    }
    // systemd's meaning: the service begins its shutdown (the unit shows
    // "deactivating" for as long as the drain takes).
    notify_systemd("STOPPING=1");
    st.draining.store(true, Ordering::SeqCst);
    st.exec.close_intake();
    let in_flight = st.exec.in_flight();
    tracing::info!(in_flight, "draining");
    st.exec.cancel_queued(TerminationReason::ServerShutdown);
    let grace = Duration::from_millis(st.cfg.shutdown_grace_ms);
    if !st.exec.wait_idle(grace).await {
        tracing::warn!("grace period over: killing running executions");
        st.exec.cancel_all(TerminationReason::ServerShutdown);
        if !st.exec.wait_idle(Duration::from_secs(30)).await {
            tracing::error!("executions did not stop within 30 s of being killed");
        }
    }
}
