//! `airlock serve` and `airlock admin`: argument structs and their bodies.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use airlock_server::ServerConfig;
use airlock_store::{Actor, Store};
use clap::Subcommand;

/// Flags shared by `serve` and `admin`: where the configuration and the
/// data live. Precedence: flag, then environment, then config file, then
/// the built-in default.
#[derive(clap::Args, Debug)]
pub struct Common {
    /// Config file (TOML; see docs/server.md).
    #[arg(long, env = "AIRLOCK_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Data directory (database, master key, pid file). Default:
    /// /var/lib/airlock as root, else $XDG_DATA_HOME/airlock.
    #[arg(long, env = "AIRLOCK_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// PostgreSQL database (postgres://...) shared by several servers, in
    /// place of the data directory's SQLite database (`[store] url`).
    /// Else DATABASE_URL when set.
    #[arg(
        long,
        env = "AIRLOCK_DATABASE_URL",
        hide_env_values = true,
        global = true
    )]
    database_url: Option<String>,
}

/// `airlock serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    common: Common,
    /// Listen address (default 127.0.0.1:7070).
    #[arg(long, env = "AIRLOCK_LISTEN")]
    listen: Option<SocketAddr>,
    /// Executions running at once.
    #[arg(long, env = "AIRLOCK_MAX_CONCURRENT")]
    max_concurrent: Option<usize>,
    /// Executions waiting beyond that; more get 429.
    #[arg(long, env = "AIRLOCK_QUEUE_SIZE")]
    queue_size: Option<usize>,
    /// On SIGTERM, ms running executions may continue before being killed.
    #[arg(long, env = "AIRLOCK_SHUTDOWN_GRACE_MS")]
    shutdown_grace_ms: Option<u64>,
    /// Write the URL the server serves on to this file (atomically) once it
    /// accepts connections, for scripts that must not race its start.
    #[arg(long, env = "AIRLOCK_READY_FILE", value_name = "FILE")]
    ready_file: Option<PathBuf>,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key;
    /// reloaded on SIGHUP).
    #[arg(
        long,
        env = "AIRLOCK_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// The certificate's PEM private key.
    #[arg(
        long,
        env = "AIRLOCK_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// This node's name among several on one database (`[node] name`;
    /// default the host name).
    #[arg(long, env = "AIRLOCK_NODE_NAME")]
    node_name: Option<String>,
    /// Where the other nodes reach this one (`[node] url`), e.g.
    /// http://10.0.0.5:7070.
    #[arg(long, env = "AIRLOCK_NODE_URL")]
    node_url: Option<String>,
}

/// `airlock admin`.
#[derive(clap::Args, Debug)]
pub struct AdminArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Create the data directory (database, and a master key unless one is
    /// given); every other command needs an existing one.
    Init,
    /// Tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The nodes (servers) on this database: id, name, state (active,
    /// stopped, lost), seconds since the last heartbeat, URL.
    Nodes,
}

#[derive(Subcommand, Debug)]
enum TenantCommand {
    /// Create a tenant.
    Create {
        /// Unique name: [a-z0-9][a-z0-9_-]{0,62}.
        name: String,
    },
    /// List tenants.
    List,
    /// Delete a tenant: its keys are revoked, its secrets' data key is
    /// destroyed (sealed values can never be read again), its secrets and
    /// memory are removed, and its execution records and logs too unless
    /// --keep-records. Audited; the audit chain keeps its records.
    Delete {
        /// Tenant name.
        name: String,
        /// Keep its execution records and logs (for later review).
        #[arg(long)]
        keep_records: bool,
        /// Confirm: deletion cannot be undone.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Create an API key for a tenant; the key is printed once, on stdout.
    Create {
        /// Tenant name.
        #[arg(long)]
        tenant: String,
        /// Expire the key after this long: 90s, 15m, 12h, 30d. Default:
        /// never (until revoked).
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
    },
    /// Replace a key: a new key is printed once, and the old one stops
    /// working after --grace (default at once).
    Rotate {
        /// Key id (the 16 hex digits after `alk_`).
        id: String,
        /// How long the old key keeps working: 90s, 15m, 12h, 30d.
        #[arg(long, value_name = "DURATION")]
        grace: Option<String>,
        /// How long the new key works (default: as long as the old one was
        /// issued for; never expiring if it never did).
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
    },
    /// Revoke a key by id.
    Revoke {
        /// Key id (the 16 hex digits after `alk_`).
        id: String,
    },
    /// List a tenant's keys (ids only).
    List {
        /// Tenant name.
        #[arg(long)]
        tenant: String,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Verify the whole hash chain; exit 1 and name the first broken record.
    Verify,
}

/// Failure of a command: `Usage` exits 2, `Failed` exits 1.
pub enum Fail {
    /// Bad input; nothing changed.
    Usage(String),
    /// The operation failed.
    Failed(String),
}

impl Fail {
    fn exit(self) -> ExitCode {
        match self {
            Fail::Usage(m) => {
                eprintln!("airlock: {m}");
                ExitCode::from(2)
            }
            Fail::Failed(m) => {
                eprintln!("airlock: {m}");
                ExitCode::from(1)
            }
        }
    }
}

fn load_config(common: &Common) -> Result<ServerConfig, Fail> {
    let mut cfg = match &common.config {
        Some(p) => ServerConfig::from_file(p).map_err(|e| Fail::Usage(e.to_string()))?,
        None => ServerConfig::default(),
    };
    if let Some(d) = &common.data_dir {
        cfg.data_dir = d.clone();
    }
    // The flag or AIRLOCK_DATABASE_URL, then the generic DATABASE_URL.
    let url = common
        .database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .filter(|u| !u.is_empty());
    if url.is_some() {
        cfg.store.url = url;
    }
    cfg.validate().map_err(|e| Fail::Usage(e.to_string()))?;
    Ok(cfg)
}

fn runtime(multi: bool) -> Result<tokio::runtime::Runtime, Fail> {
    let mut b = if multi {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    b.enable_all()
        .build()
        .map_err(|e| Fail::Failed(format!("cannot start the async runtime: {e}")))
}

/// `airlock serve`.
pub fn serve(args: ServeArgs, mut engine: airlock_sandbox::EngineConfig) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AIRLOCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let r = (|| {
        let mut cfg = load_config(&args.common)?;
        if let Some(v) = args.listen {
            cfg.listen = v;
        }
        if let Some(v) = args.max_concurrent {
            cfg.max_concurrent = v;
        }
        if let Some(v) = args.queue_size {
            cfg.queue_size = v;
        }
        if let Some(v) = args.shutdown_grace_ms {
            cfg.shutdown_grace_ms = v;
        }
        if let Some(v) = args.ready_file {
            cfg.ready_file = Some(v);
        }
        if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
            cfg.tls = Some(airlock_server::tls::TlsConfig { cert, key });
        }
        if let Some(v) = args.node_name {
            cfg.node.name = Some(v);
        }
        if let Some(v) = args.node_url {
            cfg.node.url = Some(v);
        }
        cfg.validate().map_err(|e| Fail::Usage(e.to_string()))?;
        let ca = cfg
            .ca_bundle
            .clone()
            .or_else(|| std::env::var_os("AIRLOCK_CA_BUNDLE").map(PathBuf::from));
        if let Some(p) = ca {
            engine.extra_ca =
                Some(airlock_sandbox::rootfs::load_extra_ca(&p).map_err(Fail::Usage)?);
        }
        runtime(true)?
            .block_on(airlock_server::serve(cfg, engine))
            .map_err(|e| match e {
                // A certificate that does not load is bad input (refused
                // before anything is touched): exit 2.
                airlock_server::ServeError::Tls(e) => Fail::Usage(e.to_string()),
                airlock_server::ServeError::Config(e) => Fail::Usage(e.to_string()),
                e => Fail::Failed(e.to_string()),
            })
    })();
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.exit(),
    }
}

/// `90s`, `15m`, `12h`, `30d` in ms (at least a second, at most ten years).
fn parse_duration(text: &str) -> Result<i64, Fail> {
    let bad = || {
        Fail::Usage(format!(
            "{text:?} is not a duration like 90s, 15m, 12h or 30d"
        ))
    };
    let split = text.len().checked_sub(1).ok_or_else(bad)?;
    let (num, unit) = text.split_at(split);
    let n: i64 = num.parse().map_err(|_| bad())?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    let ms = n.checked_mul(unit_ms).ok_or_else(bad)?;
    if !(1_000..=10 * 365 * 86_400_000).contains(&ms) {
        return Err(bad());
    }
    Ok(ms)
}

/// `airlock admin ...`.
pub fn admin(args: AdminArgs) -> ExitCode {
    let r = (|| {
        let cfg = load_config(&args.common)?;
        runtime(false)?.block_on(async move {
            let init = matches!(args.command, AdminCommand::Init);
            let store = if init {
                airlock_server::open_store(&cfg.data_dir, &cfg.store).await
            } else {
                airlock_server::open_existing_store(&cfg.data_dir, &cfg.store).await
            }
            .map_err(|e| match e {
                // A path that holds no data directory is the caller's input.
                airlock_server::ServeError::Setup(m) => Fail::Usage(m),
                e => Fail::Failed(e.to_string()),
            })?;
            let r = admin_body(store.as_ref(), &cfg.data_dir, args.command).await;
            store.close().await;
            r
        })
    })();
    match r {
        Ok(code) => code,
        Err(f) => f.exit(),
    }
}

async fn admin_body(
    store: &dyn Store,
    data_dir: &std::path::Path,
    cmd: AdminCommand,
) -> Result<ExitCode, Fail> {
    let actor = Actor {
        actor: "admin".into(),
        request_id: None,
    };
    let db = |e: airlock_store::StoreError| Fail::Failed(e.to_string());
    let tenant = |name: String| async move {
        store
            .tenant_by_name(&name)
            .await
            .map_err(db)?
            .ok_or_else(|| Fail::Usage(format!("no tenant named {name:?}")))
    };
    match cmd {
        AdminCommand::Init => {
            println!("airlock data directory ready");
        }
        AdminCommand::Tenant(TenantCommand::Create { name }) => {
            if !airlock_server::config::valid_tenant_name(&name) {
                return Err(Fail::Usage(
                    "tenant names match [a-z0-9][a-z0-9_-]{0,62}".into(),
                ));
            }
            let t = store
                .create_tenant(&name, &actor)
                .await
                .map_err(|e| match e {
                    airlock_store::StoreError::Conflict(_) => {
                        Fail::Usage(format!("tenant {name:?} already exists"))
                    }
                    e => db(e),
                })?;
            println!("{}\t{}", t.id, t.name);
        }
        AdminCommand::Nodes => {
            let now = airlock_store::now_ms();
            for n in store.list_nodes().await.map_err(db)? {
                println!(
                    "{}\t{}\t{}\t{:.1}\t{}",
                    n.id,
                    n.name,
                    n.state,
                    (now - n.heartbeat_at_ms).max(0) as f64 / 1000.0,
                    n.url.as_deref().unwrap_or("-")
                );
            }
        }
        AdminCommand::Tenant(TenantCommand::List) => {
            for t in store.list_tenants().await.map_err(db)? {
                println!("{}\t{}", t.id, t.name);
            }
        }
        AdminCommand::Tenant(TenantCommand::Delete {
            name,
            keep_records,
            yes,
        }) => {
            let t = tenant(name).await?;
            if !yes {
                return Err(Fail::Usage(format!(
                    "deleting tenant {:?} cannot be undone: add --yes",
                    t.name
                )));
            }
            let d = store
                .delete_tenant(&t.id, keep_records, &actor)
                .await
                .map_err(|e| match e {
                    airlock_store::StoreError::Conflict(_) => Fail::Usage(format!(
                        "tenant {:?} has queued or running executions; retry when they have finished",
                        t.name
                    )),
                    e => db(e),
                })?;
            // Its snapshots' contents go too (records kept or not): they
            // are its data. The store refuses a tenant with open sessions,
            // so no snapshot of it is being taken.
            let blobs = airlock_server::snapshots::Blobs::new(data_dir)
                .remove_tenant(&t.id)
                .map_err(|e| {
                    Fail::Failed(format!(
                        "tenant {:?} was deleted, but its snapshot files were not removed: {e}",
                        t.name
                    ))
                })?;
            println!(
                "deleted tenant {}: {} keys revoked, {} secrets, {} memory entries, {} executions, {} log records, {} snapshot files removed",
                t.name, d.keys_revoked, d.secrets, d.memory, d.executions, d.logs, blobs
            );
        }
        AdminCommand::Key(KeyCommand::Create {
            tenant: name,
            expires,
        }) => {
            let t = tenant(name).await?;
            let expires_at = expires
                .map(|d| parse_duration(&d).map(|ms| airlock_store::now_ms() + ms))
                .transpose()?;
            let (info, key) = store
                .create_api_key(&t.id, expires_at, &actor)
                .await
                .map_err(db)?;
            println!("{}", &*key.key);
            eprintln!(
                "airlock: created key {} for tenant {}; it is shown only this once",
                info.id, t.name
            );
        }
        AdminCommand::Key(KeyCommand::Rotate { id, grace, expires }) => {
            if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Fail::Usage("key ids are 16 hex digits".into()));
            }
            let grace_ms = grace.map(|g| parse_duration(&g)).transpose()?.unwrap_or(0);
            let lifetime_ms = expires.map(|e| parse_duration(&e)).transpose()?;
            let Some((info, key)) = store
                .rotate_api_key(&id, grace_ms, lifetime_ms, &actor)
                .await
                .map_err(db)?
            else {
                return Err(Fail::Usage(format!(
                    "no active key with id {id} (unknown, revoked or expired)"
                )));
            };
            println!("{}", &*key.key);
            eprintln!(
                "airlock: key {id} replaced by {}; the old key {}",
                info.id,
                if grace_ms > 0 {
                    format!("works for {} s more", grace_ms / 1000)
                } else {
                    "no longer works".into()
                }
            );
        }
        AdminCommand::Key(KeyCommand::Revoke { id }) => {
            if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Fail::Usage("key ids are 16 hex digits".into()));
            }
            if !store.revoke_api_key(&id, &actor).await.map_err(db)? {
                return Err(Fail::Usage(format!(
                    "no active key with id {id} (unknown or already revoked)"
                )));
            }
            println!("revoked {id}");
        }
        AdminCommand::Key(KeyCommand::List { tenant: name }) => {
            let t = tenant(name).await?;
            let now = airlock_store::now_ms();
            for k in store.list_api_keys(&t.id).await.map_err(db)? {
                let state = match (k.revoked_at_ms, k.expires_at_ms) {
                    (Some(_), _) => "revoked".to_string(),
                    (None, Some(e)) if e <= now => "expired".to_string(),
                    (None, Some(e)) => format!("active, expires in {} s", (e - now) / 1000),
                    (None, None) => "active".to_string(),
                };
                println!("{}\t{state}", k.id);
            }
        }
        AdminCommand::Audit(AuditCommand::Verify) => {
            let r = store.verify_audit().await.map_err(db)?;
            if let Some((seq, why)) = r.first_broken {
                eprintln!("airlock: audit log broken at record {seq}: {why}");
                return Ok(ExitCode::from(1));
            }
            match r.head {
                Some((seq, hash)) => {
                    println!("audit log intact: {} records, head {seq} {hash}", r.records)
                }
                None => println!("audit log intact: empty"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
