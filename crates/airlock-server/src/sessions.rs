//! Sessions: a tenant's long-lived workspace, the executions that run in
//! it (each in a fresh sandbox of the session's backend and policy) and
//! its files.
//!
//! Must never: let one tenant reach another's session (every lookup names
//! the authenticated tenant; a miss is 404), run anything in a session
//! that ended, or touch a path outside the workspace (the runtime's
//! `Workspace` resolves every path inside it; see
//! `airlock_runtime::session`). File operations run on blocking threads
//! under the sandbox user's file-system ids.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use airlock_policy::{IsolationLevel, Language, Policy};
use airlock_runtime::session::{FileInfo, FsError, SessionError, Sessions, Workspace};
use airlock_store::{NewAudit, SessionRecord, new_id, now_ms};
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AppState;
use crate::api::{
    CreateExecution, ExecutionList, ExecutionView, InSession, LimitsRequest, NetworkRequest,
    OutputEncoding, Peer, Principal, ReqCtx, audit_denial, authenticate, parse_num, query_params,
    rfc3339, start_execution,
};
use crate::body;
use crate::problem::{ApiError, Problem};

/// Session ids.
pub const SESSION_ID: &str = "^ss_[0-9a-f]{32}$";

fn valid_session_id(id: &str) -> bool {
    crate::api::valid_id(id, "ss")
}

// ---------------------------------------------------------------- types

/// `POST /v1/sessions`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    /// The language of its executions unless one names another
    /// (`python`, `javascript` or `shell`; default `shell`).
    #[serde(default)]
    pub language: Option<String>,
    /// Limits every execution in it starts from (each within the server's
    /// ceilings); an execution may set its own, as a one-shot one may.
    #[serde(default)]
    pub limits: Option<LimitsRequest>,
    /// The weakest isolation its executions may run behind; the server
    /// picks the cheapest offered backend that meets it and holds
    /// sessions, or answers 422 `isolation_unavailable`.
    #[serde(default)]
    pub isolation: Option<IsolationLevel>,
    /// One backend by name, which must be offered and hold sessions.
    #[serde(default)]
    #[schema(max_length = 32)]
    pub backend: Option<String>,
    /// The workspace's size, MiB (default and maximum: `[sessions]`).
    #[serde(default, deserialize_with = "body::opt_u64")]
    pub workspace_mib: Option<u64>,
    /// The workspace's file (inode) quota.
    #[serde(default, deserialize_with = "body::opt_u64")]
    pub workspace_files: Option<u64>,
    /// Ends after this long with no execution running, seconds.
    #[serde(default, deserialize_with = "body::opt_u64")]
    pub idle_timeout_secs: Option<u64>,
    /// Ends this long after it began at the latest, seconds.
    #[serde(default, deserialize_with = "body::opt_u64")]
    pub lifetime_secs: Option<u64>,
    /// Start from a snapshot's workspace (any of this tenant's; it must
    /// fit this session's quota).
    #[serde(default)]
    pub from_snapshot: Option<String>,
    /// Take a snapshot of the workspace after each execution (reason
    /// `after_exec`, naming the execution).
    #[serde(default)]
    pub snapshot_after_exec: bool,
}

/// A workspace's quota and, while the session is open, its use.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkspaceView {
    /// Size quota, MiB.
    pub quota_mib: u64,
    /// File quota.
    pub quota_files: u64,
    /// Bytes in use (open sessions only).
    pub used_bytes: Option<u64>,
    /// Files in use (open sessions only).
    pub used_files: Option<u64>,
}

/// A session as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionView {
    /// Session id.
    pub id: String,
    /// Owning tenant.
    pub tenant_id: String,
    /// `open` or `ended`.
    #[schema(pattern = "^(open|ended)$")]
    pub status: String,
    /// The language of its executions unless one names another.
    pub language: String,
    /// The backend every execution in it runs on.
    pub backend: String,
    /// That backend's isolation level.
    pub isolation: Option<IsolationLevel>,
    /// Its workspace.
    pub workspace: WorkspaceView,
    /// Executions running in it now (open sessions only).
    pub running: Option<usize>,
    /// Seconds without a running execution after which it ends.
    pub idle_timeout_secs: u64,
    /// RFC 3339.
    pub created_at: String,
    /// When it ends at the latest (its lifetime), RFC 3339.
    pub expires_at: String,
    /// RFC 3339, once ended.
    pub ended_at: Option<String>,
    /// Why it ended: `deleted`, `idle_timeout`, `lifetime`,
    /// `server_restart`, `server_shutdown` or `node_lost`.
    #[schema(
        pattern = "^(deleted|idle_timeout|lifetime|server_restart|server_shutdown|node_lost)$"
    )]
    pub end_reason: Option<String>,
    /// A snapshot is taken after each execution.
    pub snapshot_after_exec: bool,
}

/// A page of sessions.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionList {
    /// Newest first.
    pub sessions: Vec<SessionView>,
}

/// `POST /v1/sessions/{id}/exec`: code, or a command line, run in a fresh
/// sandbox whose /workspace is the session's (and its working directory).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionExec {
    /// `python`, `javascript` or `shell` (default: the session's).
    #[serde(default)]
    pub language: Option<String>,
    /// Source code (exactly one of `code` and `argv`).
    #[serde(default)]
    pub code: Option<String>,
    /// A command and its arguments, run as is (no shell parses them).
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// Bytes for the program's stdin.
    #[serde(default)]
    pub stdin: String,
    /// Environment variables added to the program's (as for executions).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Limits for this execution (within the server's ceilings).
    #[serde(default)]
    pub limits: Option<LimitsRequest>,
    /// Wait for the result (default) or return 202 at once and follow
    /// `/v1/executions/{id}/events`.
    #[serde(default = "yes")]
    pub wait: bool,
    /// Flow id scoping agent memory (default `default`).
    #[serde(default)]
    pub flow: Option<String>,
    /// Run `handler(ax, input)` from the code (python and javascript,
    /// named in `language`).
    #[serde(default)]
    pub handler: bool,
    /// The handler's input: any JSON.
    #[serde(default)]
    #[schema(value_type = Option<serde_json::Value>)]
    pub input: Option<serde_json::Value>,
    /// Secret names this execution may read through the broker.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Egress through the host-side proxy (as for executions).
    #[serde(default)]
    pub network: Option<NetworkRequest>,
    /// Config values delivered to the code at start (`ax.variables`).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub variables: serde_json::Map<String, serde_json::Value>,
    /// `base64`: the result carries the exact bytes of stdout and stderr too.
    #[serde(default)]
    pub output_encoding: OutputEncoding,
}

fn yes() -> bool {
    true
}

/// A file, directory or symlink of a workspace.
#[derive(Debug, Serialize, ToSchema)]
pub struct FileView {
    /// Its name (`""` for the workspace itself).
    pub name: String,
    /// `file`, `directory`, `symlink` or `other`.
    #[serde(rename = "type")]
    #[schema(pattern = "^(file|directory|symlink|other)$")]
    pub kind: String,
    /// Bytes.
    pub size: u64,
    /// Permission bits (e.g. 420 for 0644).
    pub mode: u32,
    /// RFC 3339.
    pub modified_at: String,
}

impl From<FileInfo> for FileView {
    fn from(f: FileInfo) -> Self {
        FileView {
            name: f.name,
            kind: f.kind.into(),
            size: f.size,
            mode: f.mode,
            modified_at: rfc3339(f.modified_ms),
        }
    }
}

/// A directory's entries.
#[derive(Debug, Serialize, ToSchema)]
pub struct FileList {
    /// By name.
    pub entries: Vec<FileView>,
    /// True when the directory holds more than the listing shows (10000).
    pub truncated: bool,
}

// ---------------------------------------------------------------- helpers

fn unavailable() -> ApiError {
    ApiError::SessionsUnavailable(
        "this server cannot hold sessions: each workspace is a file system of its own, \
         which needs the server to run as root"
            .into(),
    )
}

fn available(st: &AppState) -> Result<&Arc<Sessions>, ApiError> {
    st.sessions.as_ref().ok_or_else(unavailable)
}

pub(crate) fn session_view(
    st: &AppState,
    rec: &SessionRecord,
    live: Option<&Workspace>,
) -> SessionView {
    let usage = live.and_then(|w| w.usage().ok());
    SessionView {
        id: rec.id.clone(),
        tenant_id: rec.tenant_id.clone(),
        status: if rec.ended_at_ms.is_some() {
            "ended"
        } else {
            "open"
        }
        .into(),
        language: rec.language.clone(),
        backend: rec.backend.clone(),
        isolation: st.exec.backends().by_name(&rec.backend).map(|b| b.level()),
        workspace: WorkspaceView {
            quota_mib: rec.workspace_mib,
            quota_files: rec.workspace_files,
            used_bytes: usage.map(|u| u.0),
            used_files: usage.map(|u| u.1),
        },
        running: live.map(Workspace::running),
        idle_timeout_secs: u64::try_from(rec.idle_timeout_ms / 1000).unwrap_or(0),
        created_at: rfc3339(rec.created_at_ms),
        expires_at: rfc3339(rec.expires_at_ms),
        ended_at: rec.ended_at_ms.map(rfc3339),
        end_reason: rec.end_reason.clone(),
        snapshot_after_exec: rec.snapshot_after_exec,
    }
}

/// The tenant's session record, or 404 (malformed ids too: nothing of
/// anyone's could have it).
pub(crate) async fn record(
    st: &AppState,
    who: &Principal,
    id: &str,
) -> Result<SessionRecord, ApiError> {
    if !valid_session_id(id) {
        return Err(ApiError::NotFound);
    }
    st.store
        .session(&who.tenant_id, id)
        .await?
        .ok_or(ApiError::NotFound)
}

/// The tenant's open session's workspace: 404 when it has none of that
/// id, 409 `session_ended` when it ended.
pub(crate) async fn open_workspace(
    st: &AppState,
    who: &Principal,
    id: &str,
) -> Result<Arc<Workspace>, ApiError> {
    let rec = record(st, who, id).await?;
    if let Some(why) = rec.end_reason {
        return Err(ApiError::SessionEnded(why));
    }
    match st.sessions.as_ref().and_then(|s| s.get(&who.tenant_id, id)) {
        Some(ws) if !ws.is_ended() => Ok(ws),
        // Ending right now (the record not yet written).
        _ => Err(ApiError::SessionEnded("ending".into())),
    }
}

pub(crate) fn fs_error(e: FsError) -> ApiError {
    match e {
        FsError::InvalidPath(m) => ApiError::InvalidPath(format!("invalid path: {m}")),
        FsError::NotFound => ApiError::FileNotFound,
        FsError::WrongType(m) => ApiError::WrongType(m.into()),
        e @ FsError::Full { .. } => ApiError::WorkspaceFull(e.to_string()),
        FsError::TooLarge(n) => ApiError::FileTooLarge(n),
        FsError::Denied => ApiError::PermissionDenied,
        FsError::NotEmpty => ApiError::DirectoryNotEmpty,
        FsError::Busy => ApiError::FileBusy,
        FsError::Internal(m) => {
            tracing::error!(error = %m, "workspace operation failed");
            ApiError::Internal
        }
    }
}

/// Runs a workspace operation on a blocking thread (refused once the
/// session ended, also after the request looked it up).
async fn on_workspace<T: Send + 'static>(
    ws: Arc<Workspace>,
    op: impl FnOnce(&Workspace) -> Result<T, FsError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(move || {
        if ws.is_ended() {
            return Err(ApiError::SessionEnded("ended meanwhile".into()));
        }
        op(&ws).map_err(fs_error)
    })
    .await
    .map_err(|_| ApiError::Internal)?
}

type Chunk = Result<axum::body::Bytes, std::io::Error>;

/// A blocking reader of chunks an async task sends (an upload's body on
/// its way to the workspace).
struct ChunkReader {
    rx: tokio::sync::mpsc::Receiver<Chunk>,
    cur: axum::body::Bytes,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

/// A value of the request, or the configured default; above the maximum
/// it is refused (never clamped).
fn within(
    field: &str,
    asked: Option<u64>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ApiError> {
    let v = asked.unwrap_or(default);
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(ApiError::InvalidRequest(format!(
            "{field} must be in {min}..={max} on this server"
        )))
    }
}

/// Ends a session: no execution starts in it any more, the running ones
/// are killed, its workspace goes; the record says why. False when it
/// had already ended.
pub(crate) async fn end(
    st: &AppState,
    id: &str,
    reason: &str,
    actor: &airlock_store::Actor,
) -> Result<bool, airlock_store::StoreError> {
    if let Some(s) = &st.sessions {
        drop(s.end(id));
    }
    st.store.end_session(id, reason, now_ms(), actor).await
}

fn server_actor() -> airlock_store::Actor {
    airlock_store::Actor {
        actor: "server".into(),
        request_id: None,
    }
}

/// Ends the sessions whose idle timeout or lifetime is over, every
/// second, for as long as the server runs.
pub(crate) async fn reaper(st: AppState) {
    let Some(sessions) = st.sessions.clone() else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (id, _) in sessions.due() {
            // Decided again under the session's lock: an execution
            // admitted since keeps it open.
            let Some(why) = sessions.end_if_due(&id) else {
                continue;
            };
            match st
                .store
                .end_session(&id, why, now_ms(), &server_actor())
                .await
            {
                Ok(_) => tracing::info!(session = %id, reason = why, "session ended"),
                Err(e) => tracing::error!(session = %id, error = %e, "ending a session failed"),
            }
        }
    }
}

/// Ends every open session with `server_shutdown` (after the drain).
pub(crate) async fn end_all(st: &AppState) {
    let Some(sessions) = &st.sessions else {
        return;
    };
    for id in sessions.ids() {
        if let Err(e) = end(st, &id, "server_shutdown", &server_actor()).await {
            tracing::error!(session = %id, error = %e, "ending a session failed");
        }
    }
}

// ---------------------------------------------------------------- handlers

/// Creates a session: a private workspace under a quota in which the
/// tenant runs many executions, each in a fresh sandbox.
#[utoipa::path(post, path = "/v1/sessions", request_body = CreateSession,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "created", body = SessionView),
        (status = 400, body = Problem), (status = 422, description = "denied by policy, or no backend that holds sessions meets the isolation asked for, or the language's runtime is missing (policy_denied, isolation_unavailable, runtime_unavailable)", body = Problem),
        (status = 404, description = "from_snapshot names no snapshot of this tenant (not_found)", body = Problem),
        (status = 429, description = "the tenant holds its maximum of open sessions (too_many_sessions)", body = Problem),
        (status = 507, description = "the snapshot does not fit the workspace's quota (workspace_full)", body = Problem),
        (status = 501, description = "this server cannot hold sessions (sessions_unavailable)", body = Problem),
        (status = 503, description = "shutting down, or the server holds its maximum of sessions (shutting_down, sessions_full)", body = Problem)))]
pub(crate) async fn create_session(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let sessions = available(&st)?.clone();
    if st.draining.load(Ordering::SeqCst) {
        return Err(ApiError::ShuttingDown);
    }
    let req: CreateSession = body::json(
        &headers,
        body,
        st.cfg.body_limit_bytes,
        st.cfg.body_deadline(),
    )
    .await?;
    if st.draining.load(Ordering::SeqCst) {
        return Err(ApiError::ShuttingDown);
    }
    let c = &st.cfg.sessions;
    let language = match &req.language {
        None => Language::Shell,
        Some(l) => Language::parse(l).map_err(|e| ApiError::InvalidRequest(e.to_string()))?,
    };
    let mib = within(
        "workspace_mib",
        req.workspace_mib,
        c.workspace_mib,
        1,
        c.max_workspace_mib,
    )?;
    let files = within(
        "workspace_files",
        req.workspace_files,
        c.workspace_files,
        16,
        c.max_workspace_files,
    )?;
    let idle = within(
        "idle_timeout_secs",
        req.idle_timeout_secs,
        c.idle_timeout_secs,
        1,
        c.max_idle_timeout_secs,
    )?;
    let lifetime = within(
        "lifetime_secs",
        req.lifetime_secs,
        c.lifetime_secs,
        1,
        c.max_lifetime_secs,
    )?;
    let mut policy = match crate::api::resolve_policy_from(&st, &st.cfg.policy, req.limits.as_ref())
    {
        Ok(p) => p,
        Err(ApiError::PolicyDenied(why)) => {
            return Err(crate::api::deny(&st, &who, &ctx, why).await);
        }
        Err(e) => return Err(e),
    };
    policy.isolation.require(req.isolation);
    let backend = match session_backend(&st, &policy, req.backend.as_deref()) {
        Ok(b) => b,
        Err(why) => {
            audit_denial(&st, &who, &ctx, "isolation.unavailable", &why).await?;
            return Err(ApiError::IsolationUnavailable(why));
        }
    };
    // What its executions start from must be able to run its language on
    // its backend (the runtime installed, limits a sandbox starts with).
    if let Some(b) = st.exec.backends().by_name(&backend) {
        b.validate(&airlock_sandbox::Request {
            language,
            code: b"",
            file_name: None,
            stdin: b"",
            policy: &policy,
        })
        .map_err(crate::api::validation_error)?;
    }
    let from = match &req.from_snapshot {
        None => None,
        Some(sid) => Some(
            st.store
                .snapshot(&who.tenant_id, sid)
                .await?
                .ok_or(ApiError::NotFound)?,
        ),
    };
    let id = new_id("ss");
    let now = now_ms();
    let rec = SessionRecord {
        id: id.clone(),
        tenant_id: who.tenant_id.clone(),
        language: language.as_str().into(),
        backend: backend.clone(),
        policy: serde_json::to_value(&policy).map_err(|_| ApiError::Internal)?,
        workspace_mib: mib,
        workspace_files: files,
        idle_timeout_ms: i64::try_from(idle * 1000).unwrap_or(i64::MAX),
        created_at_ms: now,
        expires_at_ms: now.saturating_add(i64::try_from(lifetime * 1000).unwrap_or(i64::MAX)),
        ended_at_ms: None,
        end_reason: None,
        snapshot_after_exec: req.snapshot_after_exec,
        node_id: Some(st.node.id.clone()),
    };
    // Made, filled and recorded in a task of its own: a client that
    // disconnects meanwhile must not leave a workspace no record knows
    // of. Every failure after the mount ends it.
    let (store, actor, rec2, blobs) = (
        st.store.clone(),
        who.actor(&ctx),
        rec.clone(),
        st.blobs.clone(),
    );
    let chosen = st
        .exec
        .backends()
        .by_name(&backend)
        .cloned()
        .ok_or(ApiError::Internal)?;
    let ws = tokio::spawn(async move {
        let (s, id, tenant) = (sessions.clone(), rec2.id.clone(), rec2.tenant_id.clone());
        let made = tokio::task::spawn_blocking(move || {
            // The ids the backend wants the workspace to be owned by (the
            // microVM's: a uid of the session's own), reserved until it
            // is gone.
            let owner = chosen
                .session_owner()
                .map_err(|e| SessionError::Host(e.to_string()))?;
            s.create(
                &id,
                &tenant,
                (mib, files),
                Duration::from_secs(idle),
                Duration::from_secs(lifetime),
                owner,
            )
        })
        .await
        .map_err(|_| ApiError::Internal)?;
        let ws = match made {
            Ok(ws) => ws,
            Err(e @ SessionError::TenantFull(_)) => {
                return Err(ApiError::TooManySessions(e.to_string()));
            }
            Err(e @ SessionError::ServerFull) => return Err(ApiError::SessionsFull(e.to_string())),
            Err(SessionError::Unavailable) => return Err(unavailable()),
            Err(SessionError::Host(m)) => {
                tracing::error!(error = %m, "a session's workspace could not be made");
                return Err(ApiError::Internal);
            }
        };
        let filled = match from {
            None => Ok(()),
            Some(snap) => {
                let w = ws.clone();
                tokio::task::spawn_blocking(move || crate::snapshots::restore(&w, &blobs, &snap))
                    .await
                    .map_err(|_| ApiError::Internal)
                    .and_then(|r| r.map_err(fs_error))
            }
        };
        let stored = match filled {
            Ok(()) => store
                .insert_session(&rec2, &actor)
                .await
                .map_err(ApiError::from),
            Err(e) => Err(e),
        };
        match stored {
            Ok(()) => Ok(ws),
            Err(e) => {
                drop(sessions.end(&rec2.id));
                Err(e)
            }
        }
    })
    .await
    .map_err(|_| ApiError::Internal)??;
    let mut resp = (
        StatusCode::CREATED,
        Json(session_view(&st, &rec, Some(&ws))),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/sessions/{id}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// The backend a session runs on: the one named, or the cheapest offered
/// one meeting the minimum; either must hold sessions. Err: why not
/// (tenant-safe).
fn session_backend(st: &AppState, policy: &Policy, named: Option<&str>) -> Result<String, String> {
    let backends = st.exec.backends();
    let holders: Vec<&str> = backends
        .all()
        .iter()
        .filter(|b| b.sessions())
        .map(|b| b.name())
        .collect();
    let refuse = |what: String| {
        format!(
            "{what}: sessions run on {} here",
            if holders.is_empty() {
                "no backend".to_string()
            } else {
                holders.join(", ")
            }
        )
    };
    let minimum = policy.isolation.minimum;
    let chosen = backends.select(airlock_backend::Want {
        minimum,
        backend: named,
    });
    match (named, chosen) {
        (Some(_), Err(e)) => Err(e.public_message()),
        (Some(n), Ok(b)) if !b.sessions() => Err(refuse(format!("backend {n} holds no sessions"))),
        (Some(_), Ok(b)) => Ok(b.name().to_string()),
        (None, _) => backends
            .all()
            .iter()
            .find(|b| b.sessions() && minimum.is_none_or(|m| b.level() >= m))
            .map(|b| b.name().to_string())
            .ok_or_else(|| {
                refuse(format!(
                    "no backend holding sessions meets isolation {}",
                    minimum.map_or("(any)", IsolationLevel::as_str)
                ))
            }),
    }
}

/// One session (open or ended).
#[utoipa::path(get, path = "/v1/sessions/{id}", security(("bearer" = [])),
    params(("id" = String, Path, description = "session id")),
    responses((status = 200, body = SessionView), (status = 404, body = Problem)))]
pub(crate) async fn get_session(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let rec = record(&st, &who, &id).await?;
    let live = st
        .sessions
        .as_ref()
        .and_then(|s| s.get(&who.tenant_id, &id))
        .filter(|_| rec.ended_at_ms.is_none());
    Ok(Json(session_view(&st, &rec, live.as_deref())))
}

/// The tenant's sessions, newest first.
#[utoipa::path(get, path = "/v1/sessions", security(("bearer" = [])),
    params(("limit" = Option<u32>, Query, description = "1..=100, default 20")),
    responses((status = 200, body = SessionList), (status = 400, body = Problem)))]
pub(crate) async fn list_sessions(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<SessionList>, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let q = query_params(raw.as_deref(), &["limit"])?;
    let limit = parse_num(&q, "limit", 1, 100)?.unwrap_or(20) as u32;
    let recs = st.store.list_sessions(&who.tenant_id, limit).await?;
    Ok(Json(SessionList {
        sessions: recs
            .iter()
            .map(|r| {
                let live = st
                    .sessions
                    .as_ref()
                    .and_then(|s| s.get(&who.tenant_id, &r.id))
                    .filter(|_| r.ended_at_ms.is_none());
                session_view(&st, r, live.as_deref())
            })
            .collect(),
    }))
}

/// Ends a session: what runs in it is killed, its workspace and files are
/// gone; its record and its executions' stay.
#[utoipa::path(delete, path = "/v1/sessions/{id}", security(("bearer" = [])),
    params(("id" = String, Path, description = "session id")),
    responses((status = 204, description = "ended"), (status = 404, body = Problem),
              (status = 409, description = "it had already ended (session_ended)", body = Problem)))]
pub(crate) async fn delete_session(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let rec = record(&st, &who, &id).await?;
    if let Some(why) = rec.end_reason {
        return Err(ApiError::SessionEnded(why));
    }
    let (st2, actor) = (st.clone(), who.actor(&ctx));
    let ended = tokio::spawn(async move { end(&st2, &id, "deleted", &actor).await })
        .await
        .map_err(|_| ApiError::Internal)??;
    if ended {
        Ok(StatusCode::NO_CONTENT)
    } else {
        // Ended by its timeout between the read and now.
        Err(ApiError::SessionEnded("ended meanwhile".into()))
    }
}

/// Runs code or a command in the session: a fresh sandbox of the
/// session's backend, its /workspace the session's (and the working
/// directory). The record is an execution's (`GET /v1/executions/{id}`,
/// its events and logs), with `session_id` set.
#[utoipa::path(post, path = "/v1/sessions/{id}/exec", request_body = SessionExec,
    security(("bearer" = [])),
    params(("id" = String, Path, description = "session id")),
    responses(
        (status = 200, description = "finished (wait: true)", body = ExecutionView),
        (status = 202, description = "accepted (wait: false)", body = ExecutionView),
        (status = 400, body = Problem), (status = 404, body = Problem),
        (status = 409, description = "the session ended (session_ended)", body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem)))]
pub(crate) async fn session_exec(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    if st.draining.load(Ordering::SeqCst) {
        return Err(ApiError::ShuttingDown);
    }
    let rec = record(&st, &who, &id).await?;
    let req: SessionExec = body::json(
        &headers,
        body,
        st.cfg.body_limit_bytes,
        st.cfg.body_deadline(),
    )
    .await?;
    if st.draining.load(Ordering::SeqCst) {
        return Err(ApiError::ShuttingDown);
    }
    let workspace = open_workspace(&st, &who, &id).await?;
    let policy: Policy = serde_json::from_value(rec.policy.clone()).map_err(|e| {
        tracing::error!(session = %id, error = %e, "a session's stored policy does not parse");
        ApiError::Internal
    })?;
    if req.handler && req.language.is_none() {
        return Err(ApiError::InvalidRequest(
            "a handler names its language (python or javascript)".into(),
        ));
    }
    let (language, code) = match (req.code, req.argv) {
        (Some(code), None) => (req.language.unwrap_or(rec.language.clone()), code),
        (None, Some(argv)) => {
            if req.language.as_deref().is_some_and(|l| l != "shell") || req.handler {
                return Err(ApiError::InvalidRequest(
                    "argv runs a command: no language (or \"shell\") and no handler".into(),
                ));
            }
            ("shell".to_string(), command_line(&argv)?)
        }
        _ => {
            return Err(ApiError::InvalidRequest(
                "exactly one of code and argv is required".into(),
            ));
        }
    };
    let exec = CreateExecution {
        language,
        code,
        stdin: req.stdin,
        env: req.env,
        limits: req.limits,
        wait: req.wait,
        flow: req.flow,
        handler: req.handler,
        input: req.input,
        secrets: req.secrets,
        network: req.network,
        variables: req.variables,
        output_encoding: req.output_encoding,
        isolation: None,
        backend: None,
    };
    start_execution(
        st,
        who,
        ctx,
        exec,
        Some(InSession {
            workspace,
            policy,
            backend: rec.backend,
            snapshot_after: rec.snapshot_after_exec,
        }),
    )
    .await
}

/// A shell script that runs `argv` as one command, every word quoted (no
/// expansion, no second command): `exec 'a' 'b' …`.
fn command_line(argv: &[String]) -> Result<String, ApiError> {
    if argv.is_empty() || argv.len() > 4096 || argv.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::InvalidRequest(
            "argv holds 1..=4096 words without NUL".into(),
        ));
    }
    if argv[0].is_empty() {
        return Err(ApiError::InvalidRequest("argv[0] names the command".into()));
    }
    let mut out = String::from("exec");
    for a in argv {
        out.push_str(" '");
        out.push_str(&a.replace('\'', r"'\''"));
        out.push('\'');
    }
    out.push('\n');
    Ok(out)
}

/// The tenant's executions in one session, newest first (summaries).
#[utoipa::path(get, path = "/v1/sessions/{id}/executions", security(("bearer" = [])),
    params(("id" = String, Path, description = "session id"),
           ("limit" = Option<u32>, Query, description = "1..=100, default 20")),
    responses((status = 200, body = ExecutionList), (status = 404, body = Problem)))]
pub(crate) async fn session_executions(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<ExecutionList>, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let q = query_params(raw.as_deref(), &["limit"])?;
    let limit = parse_num(&q, "limit", 1, 100)?.unwrap_or(20) as u32;
    let rec = record(&st, &who, &id).await?;
    let items = st
        .store
        .session_executions(&who.tenant_id, &rec.id, limit)
        .await?;
    Ok(Json(ExecutionList {
        executions: items
            .iter()
            .map(|r| ExecutionView {
                result: None,
                output: None,
                ..ExecutionView::from(r)
            })
            .collect(),
        next_cursor: None,
    }))
}

/// Decoded query parameters (`application/x-www-form-urlencoded`), only
/// those allowed.
fn decoded_query(raw: Option<&str>, allowed: &[&str]) -> Result<HashMap<String, String>, ApiError> {
    let mut out = HashMap::new();
    for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        if !allowed.contains(&k.as_ref()) {
            return Err(ApiError::InvalidRequest(format!(
                "unknown query parameter {:?}",
                k.chars().take(32).collect::<String>()
            )));
        }
        out.insert(k.into_owned(), v.into_owned());
    }
    Ok(out)
}

/// Writes a file (parent directories made as needed), replacing what was
/// there whole: the code sees the old contents or the new.
#[utoipa::path(put, path = "/v1/sessions/{id}/files/{path}", security(("bearer" = [])),
    params(("id" = String, Path, description = "session id"),
           ("path" = String, Path, description = "a path inside the workspace (may contain '/')"),
           ("mode" = Option<String>, Query, description = "permission bits in octal, default 644")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the file's bytes"),
    responses((status = 200, body = FileView), (status = 400, body = Problem), (status = 403, body = Problem),
              (status = 404, body = Problem), (status = 409, body = Problem), (status = 507, body = Problem)))]
pub(crate) async fn put_file(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((id, path)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Result<Json<FileView>, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let q = decoded_query(raw.as_deref(), &["mode"])?;
    let mode = match q.get("mode") {
        None => 0o644,
        Some(m) => (1..=4)
            .contains(&m.len())
            .then(|| u32::from_str_radix(m, 8).ok())
            .flatten()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                ApiError::InvalidRequest("mode is octal permission bits, 0..=777".into())
            })?,
    };
    let ws = open_workspace(&st, &who, &id).await?;
    let max = st.cfg.sessions.max_file_bytes;
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > max
    {
        return Err(ApiError::PayloadTooLarge(max as usize));
    }
    // Streamed into the new file as it arrives (never held whole): at
    // most `max` bytes, within the body deadline.
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(4);
    let p = path.clone();
    // Its own task, running while the body arrives.
    let writer = tokio::spawn(on_workspace(ws, move |w| {
        let mut from = ChunkReader {
            rx,
            cur: axum::body::Bytes::new(),
        };
        w.write_from(&p, &mut from, mode)?;
        w.stat(&p)
    }));
    let deadline = st.cfg.body_deadline();
    let feed = async {
        use futures_util::StreamExt;
        let mut stream = body.into_data_stream();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| ApiError::InvalidRequest("malformed body".into()))?;
            size += chunk.len() as u64;
            if size > max {
                return Err(ApiError::PayloadTooLarge(max as usize));
            }
            // The writer stopped (a full workspace): its error says why.
            if tx.send(Ok(chunk)).await.is_err() {
                break;
            }
        }
        Ok(size)
    };
    let fed = match tokio::time::timeout(deadline, feed).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::RequestTimeout(deadline.as_millis())),
    };
    let size = match fed {
        Ok(n) => {
            drop(tx);
            n
        }
        Err(e) => {
            // The partial file is removed by the writer's failure.
            let _ = tx
                .send(Err(std::io::Error::from_raw_os_error(libc::ECANCELED)))
                .await;
            drop(tx);
            let _ = writer.await;
            return Err(e);
        }
    };
    let info = writer.await.map_err(|_| ApiError::Internal)??;
    st.store
        .append_audit(
            NewAudit::new(
                Some(&who.tenant_id),
                "session.file_write",
                &who.actor(&ctx).actor,
                &id,
                Some(&ctx.request_id),
            )
            .with_detail(serde_json::json!({
                "path": path.chars().take(1024).collect::<String>(),
                "bytes": size,
            })),
        )
        .await?;
    Ok(Json(FileView::from(info)))
}

/// Reads a file (a symlink is followed inside the workspace only).
#[utoipa::path(get, path = "/v1/sessions/{id}/files/{path}", security(("bearer" = [])),
    params(("id" = String, Path, description = "session id"),
           ("path" = String, Path, description = "a path inside the workspace")),
    responses((status = 200, description = "the file's bytes", content_type = "application/octet-stream", body = Vec<u8>),
              (status = 400, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem),
              (status = 409, body = Problem),
              (status = 422, description = "larger than the server hands out (file_too_large)", body = Problem)))]
pub(crate) async fn get_file(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((id, path)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let ws = open_workspace(&st, &who, &id).await?;
    let max = st.cfg.sessions.max_file_bytes;
    let (file, len) = on_workspace(ws, move |w| w.open_read(&path, max)).await?;
    // Streamed from the open file, never held whole: the size it had when
    // opened, at most (a file the code grows meanwhile is cut there; one
    // it shrinks ends the response short of its length).
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(4);
    tokio::task::spawn_blocking(move || {
        let mut from = file.take(len);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let chunk = match from.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => Ok(axum::body::Bytes::copy_from_slice(&buf[..n])),
                Err(e) => Err(e),
            };
            let failed = chunk.is_err();
            if tx.blocking_send(chunk).is_err() || failed {
                return;
            }
        }
    });
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|c| (c, rx))
    }));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    )
        .into_response())
}

/// Removes a file, a symlink (never its target) or an empty directory.
#[utoipa::path(delete, path = "/v1/sessions/{id}/files/{path}", security(("bearer" = [])),
    params(("id" = String, Path, description = "session id"),
           ("path" = String, Path, description = "a path inside the workspace")),
    responses((status = 204, description = "removed"), (status = 400, body = Problem), (status = 403, body = Problem),
              (status = 404, body = Problem), (status = 409, body = Problem)))]
pub(crate) async fn delete_file(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((id, path)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let ws = open_workspace(&st, &who, &id).await?;
    let p = path.clone();
    on_workspace(ws, move |w| w.remove(&p)).await?;
    st.store
        .append_audit(
            NewAudit::new(
                Some(&who.tenant_id),
                "session.file_delete",
                &who.actor(&ctx).actor,
                &id,
                Some(&ctx.request_id),
            )
            .with_detail(
                serde_json::json!({ "path": path.chars().take(1024).collect::<String>() }),
            ),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Lists a directory of the workspace (the workspace itself by default).
#[utoipa::path(get, path = "/v1/sessions/{id}/files", security(("bearer" = [])),
    params(("id" = String, Path, description = "session id"),
           ("path" = Option<String>, Query, description = "a directory inside the workspace (default: the workspace)")),
    responses((status = 200, body = FileList), (status = 400, body = Problem), (status = 403, body = Problem),
              (status = 404, body = Problem), (status = 409, body = Problem)))]
pub(crate) async fn list_files(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<FileList>, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let q = decoded_query(raw.as_deref(), &["path"])?;
    let ws = open_workspace(&st, &who, &id).await?;
    let path = q.get("path").cloned().unwrap_or_default();
    let (entries, truncated) = on_workspace(ws, move |w| w.list(&path)).await?;
    Ok(Json(FileList {
        entries: entries.into_iter().map(FileView::from).collect(),
        truncated,
    }))
}

/// What is at a path of the workspace (a symlink itself, not its target).
#[utoipa::path(get, path = "/v1/sessions/{id}/stat", security(("bearer" = [])),
    params(("id" = String, Path, description = "session id"),
           ("path" = Option<String>, Query, description = "a path inside the workspace (default: the workspace)")),
    responses((status = 200, body = FileView), (status = 400, body = Problem), (status = 403, body = Problem),
              (status = 404, body = Problem), (status = 409, body = Problem)))]
pub(crate) async fn stat_file(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<FileView>, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let q = decoded_query(raw.as_deref(), &["path"])?;
    let ws = open_workspace(&st, &who, &id).await?;
    let path = q.get("path").cloned().unwrap_or_default();
    let info = on_workspace(ws, move |w| w.stat(&path)).await?;
    Ok(Json(FileView::from(info)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_is_one_quoted_command() {
        let argv = ["ls", "-l", "it's", "$(reboot)", "a;b"].map(String::from);
        assert_eq!(
            command_line(&argv).unwrap(),
            "exec 'ls' '-l' 'it'\\''s' '$(reboot)' 'a;b'\n"
        );
        assert!(command_line(&[]).is_err());
        assert!(command_line(&["".into()]).is_err());
        assert!(command_line(&["a\0b".into()]).is_err());
    }

    #[test]
    fn session_ids() {
        assert!(valid_session_id(&new_id("ss")));
        for bad in [
            "",
            "ss_",
            "ex_0190f0f0f0f0f0f0f0f0f0f0f0f0f0f0",
            "ss_../../etc",
        ] {
            assert!(!valid_session_id(bad), "{bad}");
        }
    }
}
