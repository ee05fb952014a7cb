//! Routes: tenant API, health, metrics, OpenAPI. Handlers stay thin: they
//! authenticate, parse, call the store or the executor, and render.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use airlock_policy::{Language, Policy};
use airlock_sandbox::{Request as EngineRequest, SandboxError, TerminationReason};
use airlock_store::{
    Actor, AuthOutcome, ExecStatus, ExecutionRecord, Finish, NewAudit, SecretMeta, new_id, now_ms,
};
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use futures_util::stream::{self, Stream};
use serde::{Deserialize, Serialize};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::AppState;
use crate::body;
use crate::problem::{ApiError, Problem};
use airlock_backend::{BackendError, Want};
use airlock_runtime::Submission;

// ---------------------------------------------------------------- context

/// Per-request identity, set by [`request_context`].
#[derive(Debug, Clone)]
pub struct ReqCtx {
    /// `req_...`, or the caller's `X-Request-Id` when it is well-formed.
    pub request_id: String,
    /// W3C trace id from `traceparent`, or a fresh one.
    pub trace_id: String,
    /// Set only by the node-to-node layer (`peer.rs`) for a request another
    /// node signed and passed on: the tenant and key id that node
    /// authenticated. Nothing a client sends sets it.
    pub(crate) forwarded: Option<crate::peer::Forwarded>,
}

impl ReqCtx {
    /// The caller's well-formed `X-Request-Id` and `traceparent`, or fresh
    /// ids.
    pub(crate) fn of(headers: &HeaderMap) -> ReqCtx {
        let request_id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| valid_request_id(v))
            .map_or_else(|| new_id("req"), str::to_string);
        let trace_id = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent)
            .unwrap_or_else(new_trace_id);
        ReqCtx {
            request_id,
            trace_id,
            forwarded: None,
        }
    }
}

fn valid_request_id(v: &str) -> bool {
    (1..=64).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Parses a W3C `traceparent` (version 00 layout) and returns its trace id.
pub fn parse_traceparent(v: &str) -> Option<String> {
    let parts: Vec<&str> = v.trim().split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if parts.len() < 4 || !hex(parts[0], 2) || parts[0] == "ff" {
        return None;
    }
    if parts[0] == "00" && parts.len() != 4 {
        return None;
    }
    let (trace, span) = (parts[1], parts[2]);
    if !hex(trace, 32) || !hex(span, 16) || !hex(parts[3], 2) {
        return None;
    }
    if trace.bytes().all(|b| b == b'0') || span.bytes().all(|b| b == b'0') {
        return None;
    }
    Some(trace.to_string())
}

fn new_trace_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Middleware: request id and trace id for every request, echoed back.
pub async fn request_context(mut req: Request, next: Next) -> Response {
    let ReqCtx {
        request_id,
        trace_id,
        ..
    } = ReqCtx::of(req.headers());
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    req.extensions_mut().insert(ReqCtx {
        request_id: request_id.clone(),
        trace_id: trace_id.clone(),
        forwarded: None,
    });
    let started = Instant::now();
    let mut resp = next.run(req).await;
    // Errors the framework produced itself (an extractor's rejection, such
    // as a path that is not valid UTF-8) become problem documents too: one
    // error format, and never the framework's own text.
    let is_problem = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/problem+json");
    if !is_problem && (resp.status().is_client_error() || resp.status().is_server_error()) {
        resp = match resp.status() {
            StatusCode::NOT_FOUND => ApiError::NotFound,
            StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType,
            s if s.is_client_error() => ApiError::InvalidRequest("malformed request".into()),
            _ => ApiError::Internal,
        }
        .into_response();
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    tracing::info!(
        %method, path = %path.chars().take(200).collect::<String>(), status = resp.status().as_u16(),
        request_id = %request_id, trace_id = %trace_id,
        ms = started.elapsed().as_secs_f64() * 1000.0, "request"
    );
    resp
}

/// Middleware of the protocol adapters (`/mcp`, `/api/v2`): request and
/// trace ids set, echoed back and logged as by [`request_context`], their
/// own error bodies left as their protocols define them.
pub(crate) async fn adapter_context(mut req: Request, next: Next) -> Response {
    let ctx = ReqCtx::of(req.headers());
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    req.extensions_mut().insert(ctx.clone());
    let started = Instant::now();
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    tracing::info!(
        %method, path = %path.chars().take(200).collect::<String>(), status = resp.status().as_u16(),
        request_id = %ctx.request_id, trace_id = %ctx.trace_id,
        ms = started.elapsed().as_secs_f64() * 1000.0, "request"
    );
    resp
}

// ---------------------------------------------------------------- auth

/// An authenticated caller. Holds the tenant's in-flight request slot for
/// as long as it lives (keep it alive for a response that streams).
#[derive(Debug, Clone)]
pub struct Principal {
    /// Tenant.
    pub tenant_id: String,
    /// Key id.
    pub key_id: String,
    _slot: Arc<TenantSlot>,
}

/// Requests in flight per tenant, so one tenant cannot hold every
/// connection the server has (slow bodies, idle event streams).
#[derive(Debug, Default)]
pub struct TenantRequests {
    map: std::sync::Mutex<HashMap<String, usize>>,
}

/// One request's place in its tenant's count.
#[derive(Debug)]
pub(crate) struct TenantSlot {
    reqs: Arc<TenantRequests>,
    tenant: String,
}

impl TenantRequests {
    pub(crate) fn enter(self: &Arc<Self>, tenant: &str, max: usize) -> Option<TenantSlot> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(tenant.to_string()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(TenantSlot {
            reqs: self.clone(),
            tenant: tenant.to_string(),
        })
    }
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        let mut m = self.reqs.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.tenant);
            }
        }
    }
}

impl Principal {
    /// The caller `key_id` of `tenant_id`, holding `slot`.
    pub(crate) fn new(tenant_id: String, key_id: String, slot: TenantSlot) -> Principal {
        Principal {
            tenant_id,
            key_id,
            _slot: Arc::new(slot),
        }
    }

    pub(crate) fn actor(&self, ctx: &ReqCtx) -> Actor {
        Actor {
            actor: format!("key:{}", self.key_id),
            request_id: Some(ctx.request_id.clone()),
        }
    }
}

/// Failed authentications per client address, in fixed windows.
#[derive(Debug, Default)]
pub struct AuthLimiter {
    map: std::sync::Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

const LIMITER_MAX_CLIENTS: usize = 100_000;

impl AuthLimiter {
    /// Seconds until `ip` may try again, when it is over the limit.
    pub(crate) fn blocked(&self, ip: IpAddr, limit: u32, window: Duration) -> Option<u64> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let (start, n) = *map.get(&ip)?;
        let age = start.elapsed();
        (age < window && n >= limit).then(|| (window - age).as_secs().max(1))
    }

    /// Counts a failure; returns true when this one crossed the limit.
    pub(crate) fn fail(&self, ip: IpAddr, limit: u32, window: Duration) -> bool {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= LIMITER_MAX_CLIENTS {
            map.retain(|_, (s, _)| s.elapsed() < window);
            if map.len() >= LIMITER_MAX_CLIENTS {
                // Under a distributed flood, forget the oldest half rather
                // than grow without bound.
                let mut ages: Vec<_> = map.iter().map(|(k, (s, _))| (*s, *k)).collect();
                ages.sort();
                for (_, k) in ages.into_iter().take(LIMITER_MAX_CLIENTS / 2) {
                    map.remove(&k);
                }
            }
        }
        let e = map.entry(ip).or_insert((Instant::now(), 0));
        if e.0.elapsed() >= window {
            *e = (Instant::now(), 0);
        }
        e.1 += 1;
        e.1 == limit
    }
}

/// Authenticates the caller or refuses with one identical 401 body.
pub async fn authenticate(
    st: &AppState,
    headers: &HeaderMap,
    peer: IpAddr,
    ctx: &ReqCtx,
) -> Result<Principal, ApiError> {
    if let Some(f) = &ctx.forwarded {
        return crate::peer::principal(st, f).await;
    }
    let limit = st.cfg.auth_failure_limit;
    let window = Duration::from_secs(st.cfg.auth_failure_window_secs);
    // IPv6 clients are counted per /64: one host usually holds a whole one.
    let peer = crate::conn::client_key(peer);
    let throttled = st.limiter.blocked(peer, limit, window);
    // More than one credential is ambiguous (a proxy in front might check
    // one, the server another): refused, whatever they are.
    let ambiguous = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .nth(1)
        .is_some();
    let presented = headers
        .get(header::AUTHORIZATION)
        .filter(|_| !ambiguous)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|k| k.len() <= 256);
    let outcome = match presented {
        None => None,
        Some(k) => Some(st.store.authenticate(k).await?),
    };
    let (why, tenant) = match outcome {
        // A valid key is never throttled: others' failures from the same
        // address (a NAT, a proxy) must not lock a tenant out.
        Some(AuthOutcome::Valid { tenant_id, key_id }) => {
            let Some(slot) = st
                .tenant_requests
                .enter(&tenant_id, st.cfg.max_requests_per_tenant)
            else {
                st.metrics.tenant_request_rejections.inc();
                return Err(ApiError::TooManyRequests(st.cfg.max_requests_per_tenant));
            };
            return Ok(Principal::new(tenant_id, key_id, slot));
        }
        _ if throttled.is_some() => {
            // Over the limit: refused without a database write per attempt.
            st.metrics.auth_failures.inc();
            return Err(ApiError::AuthThrottled {
                retry_after: throttled.unwrap_or(1),
            });
        }
        None if ambiguous => ("multiple_authorization_headers", None),
        None => ("missing", None),
        Some(AuthOutcome::Malformed) => ("malformed", None),
        Some(AuthOutcome::Unknown) => ("unknown", None),
        Some(AuthOutcome::Revoked { tenant_id, key_id }) => ("revoked", Some((tenant_id, key_id))),
        Some(AuthOutcome::Expired { tenant_id, key_id }) => ("expired", Some((tenant_id, key_id))),
    };
    st.metrics.auth_failures.inc();
    let crossed = st.limiter.fail(peer, limit, window);
    let ev = NewAudit::new(
        tenant.as_ref().map(|(t, _)| t.as_str()),
        if crossed {
            "auth.throttled"
        } else {
            "auth.failure"
        },
        &format!("client:{peer}"),
        tenant.as_ref().map_or("", |(_, k)| k.as_str()),
        Some(&ctx.request_id),
    )
    .with_detail(serde_json::json!({ "reason": why }));
    st.store.append_audit(ev).await?;
    Err(if ambiguous {
        ApiError::InvalidRequest("exactly one Authorization header is allowed".into())
    } else {
        ApiError::Unauthorized
    })
}

// ---------------------------------------------------------------- views

pub(crate) fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// The engine's result of one execution as the API shows it: the engine's
/// own fields (secret values redacted in stdout and stderr), plus the exact
/// bytes when asked for.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunResultDoc {
    /// The engine's result.
    #[serde(flatten)]
    pub result: airlock_sandbox::RunResult,
    /// stdout's exact bytes, base64 (`output_encoding: base64` only).
    pub stdout_base64: Option<String>,
    /// stderr's exact bytes, base64 (`output_encoding: base64` only).
    pub stderr_base64: Option<String>,
}

/// A handler's exception.
#[derive(Debug, Serialize, ToSchema)]
pub struct HandlerErrorDoc {
    /// Exception type (or `LoadError`, `HandlerMissing`, `NotSerializable`,
    /// `OutputTooLarge`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Message.
    pub message: String,
    /// Traceback, when there is one.
    pub traceback: Option<String>,
}

/// An execution as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExecutionView {
    /// Execution id.
    pub id: String,
    /// Owning tenant.
    pub tenant_id: String,
    /// `queued`, `running`, `finished` or `failed`.
    #[schema(pattern = "^(queued|running|finished|failed)$")]
    pub status: String,
    /// Language.
    pub language: String,
    /// Termination reason once final.
    #[schema(value_type = Option<airlock_sandbox::TerminationReason>)]
    pub reason: Option<String>,
    /// Why a failed execution has no result.
    pub error: Option<String>,
    /// Request id of the creating request.
    pub request_id: String,
    /// W3C trace id.
    pub trace_id: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub started_at: Option<String>,
    /// RFC 3339.
    pub finished_at: Option<String>,
    /// The engine's result: exit_code, signal, reason, stdout, stderr,
    /// usage and the isolation layers enforced (null until final, and in
    /// listings).
    #[schema(value_type = Option<RunResultDoc>)]
    pub result: Option<serde_json::Value>,
    /// Flow (memory scope).
    pub flow_id: String,
    /// The session it ran in (`POST /v1/sessions/{id}/exec`), if any.
    pub session_id: Option<String>,
    /// A handler's return value: any JSON (null in listings and for scripts).
    #[schema(value_type = Option<serde_json::Value>)]
    pub output: Option<serde_json::Value>,
    /// A handler's exception: type, message, traceback.
    #[schema(value_type = Option<HandlerErrorDoc>)]
    pub handler_error: Option<serde_json::Value>,
    /// Why the broker closed the sandbox's channel early (malformed,
    /// oversized or out-of-order frame), if it did.
    pub broker_error: Option<String>,
    /// Egress decisions (executions with a `network` allowlist).
    #[schema(value_type = Option<Vec<airlock_egress::EgressEvent>>)]
    pub egress: Option<serde_json::Value>,
}

impl From<&ExecutionRecord> for ExecutionView {
    fn from(r: &ExecutionRecord) -> Self {
        ExecutionView {
            id: r.id.clone(),
            tenant_id: r.tenant_id.clone(),
            status: r.status.as_str().into(),
            language: r.language.clone(),
            reason: r.reason.clone(),
            error: r.error.clone(),
            request_id: r.request_id.clone(),
            trace_id: r.trace_id.clone(),
            created_at: rfc3339(r.created_at_ms),
            started_at: r.started_at_ms.map(rfc3339),
            finished_at: r.finished_at_ms.map(rfc3339),
            result: r.result.clone(),
            flow_id: r.flow_id.clone(),
            session_id: r.session_id.clone(),
            output: r.output.clone(),
            handler_error: r.handler_error.clone(),
            broker_error: r.broker_error.clone(),
            egress: r.egress.clone(),
        }
    }
}

/// Renders a record as the `finished` event's JSON.
pub fn render_record(r: &ExecutionRecord) -> String {
    serde_json::to_string(&ExecutionView::from(r)).unwrap_or_default()
}

/// A page of executions.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExecutionList {
    /// Newest first; `result` and `output` are omitted here (GET the
    /// execution for them).
    pub executions: Vec<ExecutionView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Secret metadata (never a value).
#[derive(Debug, Serialize, ToSchema)]
pub struct SecretView {
    /// Name.
    pub name: String,
    /// Version (1 on first write).
    pub version: i64,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

impl From<&SecretMeta> for SecretView {
    fn from(m: &SecretMeta) -> Self {
        SecretView {
            name: m.name.clone(),
            version: m.version,
            created_at: rfc3339(m.created_at_ms),
            updated_at: rfc3339(m.updated_at_ms),
        }
    }
}

/// The tenant's secrets.
#[derive(Debug, Serialize, ToSchema)]
pub struct SecretList {
    /// By name.
    pub secrets: Vec<SecretView>,
}

/// One audit record.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditView {
    /// RFC 3339.
    pub time: String,
    /// e.g. `execution.finish`, `secret.write`, `auth.failure`, `policy.denied`.
    pub kind: String,
    /// `key:<id>`, `admin`, `server`, `client:<addr>`.
    pub actor: String,
    /// Execution id, secret name or key id.
    pub subject: String,
    /// Request id.
    pub request_id: Option<String>,
    /// Details.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
    /// This record's chain link (hex).
    pub hash: String,
}

impl From<airlock_store::AuditEvent> for AuditView {
    fn from(e: airlock_store::AuditEvent) -> Self {
        AuditView {
            time: rfc3339(e.ts_ms),
            detail: serde_json::from_str(&e.detail).unwrap_or(serde_json::Value::Null),
            kind: e.kind,
            actor: e.actor,
            subject: e.subject,
            request_id: e.request_id,
            hash: e.hash,
        }
    }
}

/// A page of audit records.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditList {
    /// Oldest first.
    pub events: Vec<AuditView>,
    /// Pass as `after` for the next page (a record's hash); absent on the
    /// last page.
    pub next_after: Option<String>,
}

// ---------------------------------------------------------------- requests

/// Limits a request may set; each at most the server's ceiling.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsRequest {
    /// ms.
    #[serde(default, deserialize_with = "body::opt_u64")]
    pub wall_time_ms: Option<u64>,
    /// ms.
    #[serde(default, deserialize_with = "body::opt_u64")]
    pub cpu_time_ms: Option<u64>,
    /// MiB.
    #[serde(default, deserialize_with = "body::opt_u64")]
    pub memory_mib: Option<u64>,
    /// Tasks.
    #[serde(default, deserialize_with = "body::opt_u64")]
    pub pids: Option<u64>,
    /// Cores.
    pub cpus: Option<f64>,
    /// Bytes.
    #[serde(default, deserialize_with = "body::opt_u64")]
    pub stdout_bytes: Option<u64>,
    /// Bytes.
    #[serde(default, deserialize_with = "body::opt_u64")]
    pub stderr_bytes: Option<u64>,
    /// Files.
    #[serde(default, deserialize_with = "body::opt_u64")]
    pub open_files: Option<u64>,
}

impl LimitsRequest {
    /// The policy crate's form of it.
    fn to_policy(&self) -> airlock_policy::LimitsRequest {
        airlock_policy::LimitsRequest {
            wall_time_ms: self.wall_time_ms,
            cpu_time_ms: self.cpu_time_ms,
            memory_mib: self.memory_mib,
            pids: self.pids,
            cpus: self.cpus,
            stdout_bytes: self.stdout_bytes,
            stderr_bytes: self.stderr_bytes,
            open_files: self.open_files,
        }
    }
}

fn default_true() -> bool {
    true
}

/// `POST /v1/executions`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateExecution {
    /// `python`, `javascript` or `shell`.
    pub language: String,
    /// Source code.
    pub code: String,
    /// Bytes for the program's stdin.
    #[serde(default)]
    pub stdin: String,
    /// Environment variables added to the program's (names
    /// `[A-Za-z_][A-Za-z0-9_]*`; loader and interpreter-injection variables
    /// such as `LD_PRELOAD`, `PYTHONSTARTUP` or `NODE_OPTIONS` are refused).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Tighter (or, up to the ceilings, looser) limits.
    #[serde(default)]
    pub limits: Option<LimitsRequest>,
    /// Wait for the result (default) or return 202 at once.
    #[serde(default = "default_true")]
    pub wait: bool,
    /// Flow id scoping agent memory (default `default`).
    #[serde(default)]
    pub flow: Option<String>,
    /// Run `handler(ax, input)` from the code instead of the code as a
    /// script (python and javascript).
    #[serde(default)]
    pub handler: bool,
    /// The handler's input: any JSON.
    #[serde(default)]
    #[schema(value_type = Option<serde_json::Value>)]
    pub input: Option<serde_json::Value>,
    /// Secret names this execution may read through the broker.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Egress through the host-side proxy: `allow` / `allow_private`
    /// rules (`host:port`, `*.suffix:port`, `ip:port`), each within what
    /// the server's `[egress]` configuration permits.
    #[serde(default)]
    pub network: Option<NetworkRequest>,
    /// Config values delivered to the code at start (`ax.variables`).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub variables: serde_json::Map<String, serde_json::Value>,
    /// `base64`: the record's result also carries the exact bytes of
    /// stdout and stderr (`stdout_base64`, `stderr_base64`; secret values
    /// redacted, capped like the text). Default `utf8`: text only (lossy
    /// for bytes that are not UTF-8).
    #[serde(default)]
    pub output_encoding: OutputEncoding,
    /// The weakest isolation the code may run behind (`container` <
    /// `gvisor` < `microvm`); the server runs the cheapest backend it
    /// offers that meets it, or answers 422 `isolation_unavailable`.
    #[serde(default)]
    pub isolation: Option<airlock_policy::IsolationLevel>,
    /// One backend by name (`process`, `oci`, `gvisor`), which the server
    /// must offer (and which must meet `isolation` too).
    #[serde(default)]
    #[schema(max_length = 32)]
    pub backend: Option<String>,
}

/// How a record carries the program's output.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputEncoding {
    /// Text (UTF-8; other bytes become U+FFFD).
    #[default]
    Utf8,
    /// Text, and the exact bytes as base64.
    Base64,
}

/// A request's egress allowlist.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkRequest {
    /// Names that must resolve to public addresses.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Names that may resolve to private addresses too.
    #[serde(default)]
    pub allow_private: Vec<String>,
}

/// Whether `ceiling` covers `r`: same port, and the same host, a host under
/// a ceiling wildcard, or a narrower wildcard.
fn covers(
    ceiling: &airlock_policy::egress::EgressRule,
    r: &airlock_policy::egress::EgressRule,
) -> bool {
    use airlock_policy::egress::HostPattern as P;
    if ceiling.port != r.port {
        return false;
    }
    match (&ceiling.host, &r.host) {
        (P::Exact(a), P::Exact(b)) => a == b,
        (P::Ip(a), P::Ip(b)) => a == b,
        (P::Suffix(s), P::Exact(h)) => h.len() > s.len() + 1 && h.ends_with(&format!(".{s}")),
        (P::Suffix(s), P::Suffix(t)) => t == s || t.ends_with(&format!(".{s}")),
        _ => false,
    }
}

/// `PUT /v1/secrets/{name}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutSecret {
    /// The value (UTF-8, at most 64 KiB).
    pub value: String,
}

const MAX_SECRET_BYTES: usize = 64 << 10;

fn valid_secret_name(n: &str) -> bool {
    let b = n.as_bytes();
    (1..=128).contains(&b.len())
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c))
}

/// Applies request limits to the base policy. Above a ceiling: denial.
pub(crate) fn resolve_policy_from(
    st: &AppState,
    base: &Policy,
    req: Option<&LimitsRequest>,
) -> Result<Policy, ApiError> {
    let mut p = base.clone();
    let Some(r) = req else { return Ok(p) };
    p.limits = p
        .limits
        .narrow(&r.to_policy(), &st.cfg.ceilings)
        .map_err(|denied| {
            ApiError::PolicyDenied(
                denied
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
    p.validate()
        .map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    Ok(p)
}

// ---------------------------------------------------------------- handlers

pub(crate) type Peer = ConnectInfo<SocketAddr>;

async fn fallback() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "alive")))]
async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: false while draining.
#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "ready"), (status = 503, body = Problem)))]
async fn readyz(State(st): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    if st.draining.load(Ordering::SeqCst) {
        return Err(ApiError::ShuttingDown);
    }
    Ok(Json(serde_json::json!({ "status": "ready" })))
}

/// Prometheus metrics: OpenMetrics when the scraper's `Accept` prefers it
/// (q-values weighed), else the Prometheus text format 0.0.4.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format 0.0.4, or OpenMetrics 1.0 when Accept asks for application/openmetrics-text", content_type = "text/plain")))]
async fn metrics(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let format = crate::metrics::Format::negotiate(
        headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let body = match format {
        crate::metrics::Format::OpenMetrics => st.metrics.render(),
        crate::metrics::Format::Text => st.metrics.render_text(),
    };
    (
        [
            (header::CONTENT_TYPE, format.content_type()),
            (header::VARY, "accept"),
        ],
        body,
    )
        .into_response()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json")))]
async fn openapi(State(st): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        st.openapi.as_ref().clone(),
    )
        .into_response()
}

/// A policy denial: audited, then answered with 422.
pub(crate) async fn deny(st: &AppState, who: &Principal, ctx: &ReqCtx, why: String) -> ApiError {
    match audit_denial(st, who, ctx, "policy.denied", &why).await {
        Ok(()) => ApiError::PolicyDenied(why),
        Err(e) => e,
    }
}

/// Records a refused execution request. Fails closed: a denial that
/// cannot be recorded is an error.
pub(crate) async fn audit_denial(
    st: &AppState,
    who: &Principal,
    ctx: &ReqCtx,
    action: &str,
    why: &str,
) -> Result<(), ApiError> {
    let ev = NewAudit::new(
        Some(&who.tenant_id),
        action,
        &who.actor(ctx).actor,
        "execution",
        Some(&ctx.request_id),
    )
    .with_detail(serde_json::json!({ "reason": why }));
    st.store
        .append_audit(ev)
        .await
        .map(|_| ())
        .map_err(Into::into)
}

/// Runs code in a fresh sandbox.
#[utoipa::path(post, path = "/v1/executions", request_body = CreateExecution,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "finished (wait: true)", body = ExecutionView),
        (status = 202, description = "accepted (wait: false)", body = ExecutionView),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 413, body = Problem),
        (status = 415, body = Problem), (status = 422, body = Problem), (status = 429, body = Problem),
        (status = 503, body = Problem)))]
async fn create_execution(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    if st.draining.load(Ordering::SeqCst) {
        return Err(ApiError::ShuttingDown);
    }
    let req: CreateExecution = body::json(
        &headers,
        body,
        st.cfg.body_limit_bytes,
        st.cfg.body_deadline(),
    )
    .await?;
    // The body may have taken long to arrive: check again.
    if st.draining.load(Ordering::SeqCst) {
        return Err(ApiError::ShuttingDown);
    }
    start_execution(st, who, ctx, req, None).await
}

/// A backend's refusal of a request as the API answers it.
pub(crate) fn validation_error(e: BackendError) -> ApiError {
    match e {
        BackendError::Sandbox(SandboxError::RuntimeMissing(_)) => {
            ApiError::RuntimeUnavailable(e.public_message())
        }
        BackendError::Sandbox(SandboxError::InvalidRequest(m)) => ApiError::InvalidRequest(m),
        BackendError::Unsupported { .. } | BackendError::Unavailable { .. } => {
            ApiError::IsolationUnavailable(e.public_message())
        }
        other => {
            tracing::error!(error = %other, "request validation failed");
            ApiError::Internal
        }
    }
}

/// Whether `id` is one of ours of this kind: `<prefix>_` and 32 hex digits.
pub(crate) fn valid_id(id: &str, prefix: &str) -> bool {
    id.len() == prefix.len() + 33
        && id.starts_with(prefix)
        && id.as_bytes()[prefix.len()] == b'_'
        && id[prefix.len() + 1..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit())
}

/// What binds an execution to a session: its workspace, the policy it
/// starts from and the backend it runs on.
pub(crate) struct InSession {
    pub workspace: Arc<airlock_runtime::session::Workspace>,
    pub policy: Policy,
    pub backend: String,
    /// Snapshot the workspace once the execution ended.
    pub snapshot_after: bool,
}

/// Validates, admits, records and queues one execution (in a session when
/// one is given); waits for its record unless the request said not to.
pub(crate) async fn start_execution(
    st: AppState,
    who: Principal,
    ctx: ReqCtx,
    req: CreateExecution,
    session: Option<InSession>,
) -> Result<Response, ApiError> {
    let language =
        Language::parse(&req.language).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    let base = session.as_ref().map_or(&st.cfg.policy, |s| &s.policy);
    let policy = match resolve_policy_from(&st, base, req.limits.as_ref()) {
        Ok(p) => p,
        Err(ApiError::PolicyDenied(why)) => return Err(deny(&st, &who, &ctx, why).await),
        Err(e) => return Err(e),
    };
    let mut policy = policy;
    if !req.env.is_empty() {
        // Checked like the base policy's own: the deny list of injection
        // variables, the count and size caps.
        policy.env.vars.extend(req.env.clone());
        policy
            .validate()
            .map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    }
    let flow_id = req.flow.clone().unwrap_or_else(|| "default".into());
    if !airlock_broker::valid_flow_id(&flow_id) {
        return Err(ApiError::InvalidRequest(
            "flow ids are 1..=128 of [A-Za-z0-9_.-]".into(),
        ));
    }
    if req.handler && language == Language::Shell {
        return Err(ApiError::InvalidRequest(
            "handlers are python or javascript".into(),
        ));
    }
    if req.input.is_some() && !req.handler {
        return Err(ApiError::InvalidRequest(
            "input is for handler executions".into(),
        ));
    }
    if req.secrets.len() > 64 || req.secrets.iter().any(|n| !valid_secret_name(n)) {
        return Err(ApiError::InvalidRequest(
            "secrets lists at most 64 valid secret names".into(),
        ));
    }
    if req.variables.contains_key("secrets")
        || req.variables.len() > 256
        || airlock_broker::json_len(&req.variables) > (64 << 10)
    {
        return Err(ApiError::InvalidRequest(
            "variables: at most 256 entries and 64 KiB, and \"secrets\" is reserved".into(),
        ));
    }
    let grants = airlock_broker::Grants {
        secrets: req.secrets.iter().cloned().collect(),
        variables: req.variables.clone(),
        input: req
            .handler
            .then(|| req.input.clone().unwrap_or(serde_json::Value::Null)),
        handler: req.handler,
        code: None,
        given_secrets: Default::default(),
    };
    let wanted = req.network.as_ref().map(|net| {
        (
            net,
            airlock_policy::Network::Proxy {
                allow: net.allow.clone(),
                allow_private: net.allow_private.clone(),
            },
        )
    });
    if wanted.as_ref().is_some_and(|(_, w)| !w.is_proxy()) {
        // An empty allowlist asks for no network at all (whatever the base
        // policy has), and may use a warm sandbox.
        policy.network = airlock_policy::Network::None;
    } else if let Some((net, wanted)) = wanted {
        let rules = wanted
            .rules()
            .map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
        let ceiling = |list: &[String], private: bool| {
            list.iter()
                .filter_map(|c| airlock_policy::egress::parse_rule(c, private).ok())
                .collect::<Vec<_>>()
        };
        let (pub_c, priv_c) = (
            ceiling(&st.cfg.egress.allow, false),
            ceiling(&st.cfg.egress.allow_private, true),
        );
        let outside: Vec<String> = rules
            .iter()
            .zip(net.allow.iter().chain(net.allow_private.iter()))
            .filter(|(r, _)| {
                !(if r.private { &priv_c } else { &pub_c })
                    .iter()
                    .any(|c| covers(c, r))
            })
            .map(|(_, raw)| raw.chars().take(100).collect())
            .collect();
        if !outside.is_empty() {
            let why = format!(
                "egress not permitted by this server: {}",
                outside.join(", ")
            );
            return Err(deny(&st, &who, &ctx, why).await);
        }
        if !st.exec.egress_available() {
            return Err(ApiError::RuntimeUnavailable(
                "egress is unavailable on this server (no DNS resolver)".into(),
            ));
        }
        policy.network = wanted;
    }
    let code = req.code.into_bytes();
    let stdin = req.stdin.into_bytes();
    // The boundary: the stronger of the base policy's minimum and the
    // request's, met by the cheapest offered backend (or the one named).
    policy.isolation.require(req.isolation);
    let backend = match st.exec.backends().select(Want {
        minimum: policy.isolation.minimum,
        backend: session
            .as_ref()
            .map(|s| s.backend.as_str())
            .or(req.backend.as_deref()),
    }) {
        Ok(b) => b.clone(),
        Err(e) => {
            let why = e.public_message();
            audit_denial(&st, &who, &ctx, "isolation.unavailable", &why).await?;
            return Err(ApiError::IsolationUnavailable(why));
        }
    };
    backend
        .validate(&EngineRequest {
            language,
            code: &code,
            file_name: None,
            stdin: &stdin,
            policy: &policy,
        })
        .map_err(validation_error)?;
    let share = st.exec.share_for(&who.tenant_id).await?;
    let slot = match st.exec.try_admit(&who.tenant_id, share) {
        Ok(slot) => slot,
        Err(airlock_runtime::Full::Server) => {
            st.metrics.rejected.inc();
            return Err(ApiError::QueueFull);
        }
        Err(airlock_runtime::Full::Tenant(share)) => {
            return Err(ApiError::TenantQueueFull {
                running: share.max_running,
                queued: share.max_queued,
            });
        }
    };
    let rec = ExecutionRecord {
        session_id: session.as_ref().map(|s| s.workspace.id.clone()),
        policy: serde_json::to_value(&policy).ok(),
        node_id: Some(st.node.id.clone()),
        ..ExecutionRecord::queued(
            new_id("ex"),
            who.tenant_id.clone(),
            language.as_str(),
            ctx.request_id.clone(),
            ctx.trace_id.clone(),
            flow_id.clone(),
            now_ms(),
        )
    };
    let snapshot_after = session
        .as_ref()
        .filter(|s| s.snapshot_after)
        .map(|s| s.workspace.clone());
    let sub = Submission {
        id: rec.id.clone(),
        tenant_id: who.tenant_id.clone(),
        request_id: ctx.request_id.clone(),
        language,
        code,
        stdin,
        policy,
        flow_id,
        trace_id: ctx.trace_id.clone(),
        grants,
        base64_output: req.output_encoding == OutputEncoding::Base64,
        backend: backend.name().to_string(),
        workspace: session.map(|s| s.workspace),
    };
    // Recording and queueing happen in their own task: a client that
    // disconnects now must not leave a record that nothing will run.
    let (store, exec, actor, rec2) = (
        st.store.clone(),
        st.exec.clone(),
        who.actor(&ctx),
        rec.clone(),
    );
    let entry = tokio::spawn(async move {
        store.insert_execution(&rec2, &actor).await?;
        match exec.submit(slot, sub) {
            Ok(e) => Ok(Some(e)),
            Err(_) => {
                store
                    .finish_execution(
                        &rec2.id,
                        &Finish {
                            error: Some("the server is shutting down"),
                            ..Finish::new(
                                ExecStatus::Failed,
                                TerminationReason::ServerShutdown.as_str(),
                                now_ms(),
                            )
                        },
                    )
                    .await?;
                Ok::<_, airlock_store::StoreError>(None)
            }
        }
    })
    .await
    .map_err(|_| ApiError::Internal)??
    .ok_or(ApiError::ShuttingDown)?;
    let location = format!("/v1/executions/{}", rec.id);
    let after = snapshot_after.map(|ws| {
        let (st, live, id, actor) = (
            st.clone(),
            entry.live.clone(),
            rec.id.clone(),
            who.actor(&ctx),
        );
        // Its own task: taken whether or not the client waits.
        tokio::spawn(async move {
            let mut rx = live.subscribe();
            while !live.is_done() {
                if rx.changed().await.is_err() {
                    break;
                }
            }
            match crate::snapshots::take(&st, ws.clone(), "after_exec", Some(id.clone()), &actor)
                .await
            {
                Ok(_) => {}
                // Not taken, and the audit trail says so: a reviewer
                // finds why the execution has no snapshot after it.
                Err(ApiError::TooManySnapshots(max)) => {
                    let ev = NewAudit::new(
                        Some(&ws.tenant_id),
                        "session.snapshot_refused",
                        &actor.actor,
                        &ws.id,
                        actor.request_id.as_deref(),
                    )
                    .with_detail(serde_json::json!({
                        "execution_id": id, "reason": "too_many_snapshots", "max": max,
                    }));
                    if let Err(e) = st.store.append_audit(ev).await {
                        tracing::error!(error = %e, "auditing a refused snapshot failed");
                    }
                }
                Err(e) => tracing::error!(error = %e, "the snapshot after an execution failed"),
            }
        })
    });
    if !req.wait {
        let mut resp = (StatusCode::ACCEPTED, Json(ExecutionView::from(&rec))).into_response();
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        return Ok(resp);
    }
    let mut rx = entry.live.subscribe();
    while !entry.live.is_done() {
        if rx.changed().await.is_err() {
            break;
        }
    }
    // A client that waited sees the snapshot listed when it gets the
    // record.
    if let Some(t) = after {
        let _ = t.await;
    }
    let rec = st
        .store
        .execution(&who.tenant_id, &rec.id)
        .await?
        .ok_or(ApiError::Internal)?;
    Ok(Json(ExecutionView::from(&rec)).into_response())
}

/// One execution.
#[utoipa::path(get, path = "/v1/executions/{id}", security(("bearer" = [])),
    params(("id" = String, Path, description = "execution id")),
    responses((status = 200, body = ExecutionView), (status = 404, body = Problem)))]
async fn get_execution(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<ExecutionView>, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let rec = st
        .store
        .execution(&who.tenant_id, &id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(ExecutionView::from(&rec)))
}

pub(crate) fn query_params(
    raw: Option<&str>,
    allowed: &[&str],
) -> Result<HashMap<String, String>, ApiError> {
    let mut out = HashMap::new();
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if !allowed.contains(&k) {
            return Err(ApiError::InvalidRequest(format!(
                "unknown query parameter {:?}",
                k.chars().take(32).collect::<String>()
            )));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

pub(crate) fn parse_num(
    q: &HashMap<String, String>,
    key: &str,
    min: i64,
    max: i64,
) -> Result<Option<i64>, ApiError> {
    match q.get(key) {
        None => Ok(None),
        Some(v) => v
            .parse::<i64>()
            .ok()
            .or_else(|| body::integral(v.parse::<f64>().ok()?))
            .filter(|n| (min..=max).contains(n))
            .map(Some)
            .ok_or_else(|| {
                ApiError::InvalidRequest(format!("{key} must be an integer in {min}..={max}"))
            }),
    }
}

/// The tenant's executions, newest first.
#[utoipa::path(get, path = "/v1/executions", security(("bearer" = [])),
    params(("limit" = Option<u32>, Query, description = "1..=100, default 20"),
           ("cursor" = Option<String>, Query, description = "next_cursor of the previous page (an execution id)")),
    responses((status = 200, body = ExecutionList), (status = 400, body = Problem),
               (status = 404, description = "the cursor is not one of this tenant's executions", body = Problem)))]
async fn list_executions(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<ExecutionList>, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let q = query_params(raw.as_deref(), &["limit", "cursor"])?;
    let limit = parse_num(&q, "limit", 1, 100)?.unwrap_or(20) as u32;
    // Cursors are the last execution's id: opaque, and they reveal nothing
    // about other tenants (storage positions would count their executions).
    let cursor = match q.get("cursor") {
        None => None,
        Some(c) => {
            if !valid_id(c, "ex") {
                return Err(ApiError::InvalidRequest(
                    "cursor is an execution id (next_cursor)".into(),
                ));
            }
            // Well-formed but not one of this tenant's: absent, like
            // anything of another tenant's.
            Some(
                st.store
                    .execution_seq(&who.tenant_id, c)
                    .await?
                    .ok_or(ApiError::NotFound)?,
            )
        }
    };
    let page = st
        .store
        .list_executions(&who.tenant_id, cursor, limit)
        .await?;
    Ok(Json(ExecutionList {
        // Summaries: a page of full results could be 100 x 16 MiB.
        executions: page
            .items
            .iter()
            .map(|r| ExecutionView {
                result: None,
                output: None,
                ..ExecutionView::from(r)
            })
            .collect(),
        next_cursor: page.next.and(page.items.last().map(|r| r.id.clone())),
    }))
}

/// Cancels a queued or running execution.
#[utoipa::path(post, path = "/v1/executions/{id}/cancel", security(("bearer" = [])),
    params(("id" = String, Path, description = "execution id")),
    responses((status = 202, body = ExecutionView), (status = 404, body = Problem), (status = 409, body = Problem)))]
async fn cancel_execution(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let rec = st
        .store
        .execution(&who.tenant_id, &id)
        .await?
        .ok_or(ApiError::NotFound)?;
    if rec.status.is_terminal() {
        return Err(ApiError::NotCancellable);
    }
    match st.exec.entry(&id) {
        // Finished between the record read and now: nothing to cancel.
        Some(e) if e.tenant_id == who.tenant_id && !e.live.is_done() => {
            e.cancel.cancel(TerminationReason::Cancelled)
        }
        _ => return Err(ApiError::NotCancellable),
    }
    st.store
        .append_audit(NewAudit::new(
            Some(&who.tenant_id),
            "execution.cancel",
            &who.actor(&ctx).actor,
            &id,
            Some(&ctx.request_id),
        ))
        .await?;
    Ok((StatusCode::ACCEPTED, Json(ExecutionView::from(&rec))).into_response())
}

/// Events of an execution as Server-Sent Events: `started`, `stdout`,
/// `stderr` (data `{"data": text}`), `log` (a handler's log record),
/// `finished` (the record). Live while it runs, replayed from the record
/// afterwards. Each event's data is documented as `ExecutionEvent`.
#[utoipa::path(get, path = "/v1/executions/{id}/events", security(("bearer" = [])),
    params(("id" = String, Path, description = "execution id")),
    responses((status = 200, description = "text/event-stream", content_type = "text/event-stream"), (status = 404, body = Problem)))]
async fn execution_events(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let rec = st
        .store
        .execution(&who.tenant_id, &id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let live = st
        .exec
        .entry(&id)
        .filter(|e| e.tenant_id == who.tenant_id)
        .map(|e| e.live.clone());
    let stream: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> = match live
    {
        Some(live) => Box::pin(live_stream(live)),
        None => {
            // Finished (or finished between the two reads): replay.
            let rec = if rec.status.is_terminal() {
                rec
            } else {
                st.store
                    .execution(&who.tenant_id, &id)
                    .await?
                    .ok_or(ApiError::NotFound)?
            };
            let logs = st.store.list_logs(&rec.id, 0, 1000).await?;
            Box::pin(stream::iter(replay(&rec, &logs).into_iter().map(Ok)))
        }
    };
    // The stream keeps the caller's in-flight slot until it ends.
    let stream = futures_util::StreamExt::map(stream, move |ev| {
        let _held = &who;
        ev
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

fn live_stream(
    live: Arc<airlock_runtime::live::Live>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let rx = live.subscribe();
    stream::unfold((live, rx, 0usize), |(live, mut rx, i)| async move {
        loop {
            match live.get(i) {
                Ok(ev) => {
                    let e = Event::default()
                        .event(ev.kind)
                        .id(i.to_string())
                        .data(ev.data);
                    return Some((Ok(e), (live, rx, i + 1)));
                }
                Err(true) => return None,
                Err(false) => {
                    if rx.changed().await.is_err() && live.get(i).is_err() {
                        return None;
                    }
                }
            }
        }
    })
}

/// The events of a finished execution, from its record (the same events
/// a live stream sent; `openapi::execution_events` documents them).
pub(crate) fn replay(rec: &ExecutionRecord, logs: &[airlock_store::LogRecord]) -> Vec<Event> {
    let mut out = Vec::new();
    if let Some(at) = rec.started_at_ms {
        out.push((
            "started",
            serde_json::json!({ "id": rec.id, "started_at_ms": at }).to_string(),
        ));
    }
    for l in logs {
        out.push((
            "log",
            serde_json::json!({"seq": l.seq, "level": l.level, "message": l.message,
                               "fields": l.fields, "execution_id": rec.id,
                               "tenant_id": rec.tenant_id, "trace_id": rec.trace_id})
            .to_string(),
        ));
    }
    if let Some(r) = &rec.result {
        for k in ["stdout", "stderr"] {
            if let Some(t) = r.get(k).and_then(|v| v.as_str()).filter(|t| !t.is_empty()) {
                out.push((k, serde_json::json!({ "data": t }).to_string()));
            }
        }
    }
    if rec.status.is_terminal() {
        out.push(("finished", render_record(rec)));
    }
    out.into_iter()
        .enumerate()
        .map(|(i, (k, d))| Event::default().event(k).id(i.to_string()).data(d))
        .collect()
}

/// Creates or replaces a secret. The value is sealed at rest and never
/// returned by any endpoint.
#[utoipa::path(put, path = "/v1/secrets/{name}", security(("bearer" = [])),
    params(("name" = String, Path, description = "[A-Za-z_][A-Za-z0-9_.-]{0,127}")),
    request_body = PutSecret,
    responses((status = 200, body = SecretView), (status = 400, body = Problem)))]
async fn put_secret(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Body,
) -> Result<Json<SecretView>, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    if !valid_secret_name(&name) {
        return Err(ApiError::InvalidRequest(
            "secret names match [A-Za-z_][A-Za-z0-9_.-]{0,127}".into(),
        ));
    }
    let req: PutSecret = body::json(
        &headers,
        body,
        st.cfg.body_limit_bytes,
        st.cfg.body_deadline(),
    )
    .await?;
    let value = zeroize::Zeroizing::new(req.value.into_bytes());
    if value.len() > MAX_SECRET_BYTES {
        return Err(ApiError::InvalidRequest(format!(
            "secret values are at most {MAX_SECRET_BYTES} bytes"
        )));
    }
    let meta = st
        .store
        .put_secret(&who.tenant_id, &name, &value, &who.actor(&ctx))
        .await?;
    Ok(Json(SecretView::from(&meta)))
}

/// Lists secret names and versions.
#[utoipa::path(get, path = "/v1/secrets", security(("bearer" = [])),
    responses((status = 200, body = SecretList)))]
async fn list_secrets(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
) -> Result<Json<SecretList>, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let list = st.store.list_secrets(&who.tenant_id).await?;
    Ok(Json(SecretList {
        secrets: list.iter().map(SecretView::from).collect(),
    }))
}

/// Deletes a secret.
#[utoipa::path(delete, path = "/v1/secrets/{name}", security(("bearer" = [])),
    params(("name" = String, Path, description = "secret name")),
    responses((status = 204, description = "deleted"), (status = 404, body = Problem)))]
async fn delete_secret(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    if !valid_secret_name(&name) {
        return Err(ApiError::NotFound);
    }
    if st
        .store
        .delete_secret(&who.tenant_id, &name, &who.actor(&ctx))
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound)
    }
}

/// The tenant's audit records, oldest first.
#[utoipa::path(get, path = "/v1/audit", security(("bearer" = [])),
    params(("after" = Option<String>, Query, description = "hash of the record to start after (next_after)"),
           ("limit" = Option<u32>, Query, description = "1..=500, default 100")),
    responses((status = 200, body = AuditList),
               (status = 404, description = "the cursor is not one of this tenant's records", body = Problem)))]
async fn list_audit(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<AuditList>, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let q = query_params(raw.as_deref(), &["after", "limit"])?;
    // The cursor is a record's hash: chain positions would count every
    // tenant's records.
    let after = match q.get("after") {
        None => 0,
        Some(h) => {
            let bytes: Option<Vec<u8>> = (h.len() == 64)
                .then(|| {
                    (0..64)
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).ok())
                        .collect()
                })
                .flatten();
            let Some(b) = bytes else {
                return Err(ApiError::InvalidRequest(
                    "after is a record's hash (64 hex digits, next_after)".into(),
                ));
            };
            st.store
                .audit_seq(&who.tenant_id, &b)
                .await?
                .ok_or(ApiError::NotFound)?
        }
    };
    let limit = parse_num(&q, "limit", 1, 500)?.unwrap_or(100) as u32;
    let events = st.store.list_audit(&who.tenant_id, after, limit).await?;
    let next_after = (events.len() == limit as usize)
        .then(|| events.last().map(|e| e.hash.clone()))
        .flatten();
    Ok(Json(AuditList {
        events: events.into_iter().map(AuditView::from).collect(),
        next_after,
    }))
}

/// One log record an execution wrote through the broker.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogView {
    /// Order within the execution.
    pub seq: i64,
    /// RFC 3339.
    pub time: String,
    /// `debug`, `info`, `warn`, `error`.
    pub level: String,
    /// Message (secret values redacted).
    pub message: String,
    /// Structured fields.
    #[schema(value_type = Object)]
    pub fields: serde_json::Value,
    /// Execution id.
    pub execution_id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Trace id.
    pub trace_id: String,
}

/// A page of log records.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogList {
    /// Oldest first.
    pub logs: Vec<LogView>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_after: Option<i64>,
}

/// Log records of one execution.
#[utoipa::path(get, path = "/v1/executions/{id}/logs", security(("bearer" = [])),
    params(("id" = String, Path, description = "execution id"),
           ("after" = Option<i64>, Query, description = "seq to start after"),
           ("limit" = Option<u32>, Query, description = "1..=1000, default 500")),
    responses((status = 200, body = LogList), (status = 404, body = Problem)))]
async fn execution_logs(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<LogList>, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let q = query_params(raw.as_deref(), &["after", "limit"])?;
    let after = parse_num(&q, "after", 0, i64::MAX)?.unwrap_or(0);
    let limit = parse_num(&q, "limit", 1, 1000)?.unwrap_or(500) as u32;
    let rec = st
        .store
        .execution(&who.tenant_id, &id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let logs = st.store.list_logs(&rec.id, after, limit).await?;
    let next_after = (logs.len() == limit as usize)
        .then(|| logs.last().map(|l| l.seq))
        .flatten();
    Ok(Json(LogList {
        logs: logs
            .into_iter()
            .map(|l| LogView {
                seq: l.seq,
                time: rfc3339(l.ts_ms),
                level: l.level,
                message: l.message,
                fields: l.fields,
                execution_id: rec.id.clone(),
                tenant_id: rec.tenant_id.clone(),
                trace_id: rec.trace_id.clone(),
            })
            .collect(),
        next_after,
    }))
}

/// One agent-memory entry.
#[derive(Debug, Serialize, ToSchema)]
pub struct MemoryView {
    /// Flow.
    pub flow: String,
    /// Key.
    pub key: String,
    /// Value: any JSON.
    #[schema(value_type = serde_json::Value)]
    pub value: serde_json::Value,
    /// Version (1 on first write).
    pub version: i64,
    /// RFC 3339.
    pub updated_at: String,
}

/// A key of a flow's memory (values are read one by one).
#[derive(Debug, Serialize, ToSchema)]
pub struct MemoryKeyView {
    /// Key.
    pub key: String,
    /// Version.
    pub version: i64,
    /// RFC 3339.
    pub updated_at: String,
}

/// Keys of a flow's memory.
#[derive(Debug, Serialize, ToSchema)]
pub struct MemoryList {
    /// In key order.
    pub entries: Vec<MemoryKeyView>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_after: Option<String>,
}

/// `PUT /v1/memory/{flow}/{key}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutMemory {
    /// Any JSON value (at most 64 KiB serialised).
    #[schema(value_type = serde_json::Value)]
    pub value: serde_json::Value,
    /// Write only if the current version is this (0: must not exist).
    #[serde(default, deserialize_with = "body::opt_i64")]
    pub expected_version: Option<i64>,
}

fn memory_scope(flow: &str, key: Option<&str>) -> Result<(), ApiError> {
    if !airlock_broker::valid_flow_id(flow) {
        return Err(ApiError::InvalidRequest(
            "flow ids are 1..=128 of [A-Za-z0-9_.-]".into(),
        ));
    }
    if let Some(k) = key
        && !airlock_broker::valid_memory_key(k, airlock_broker::Quotas::default().memory_key_bytes)
    {
        return Err(ApiError::InvalidRequest(
            "memory keys are 1..=256 bytes, without control characters, '.' or '..' segments or a leading '/'"
                .into(),
        ));
    }
    Ok(())
}

fn memory_view(flow: &str, e: airlock_store::MemoryEntry) -> MemoryView {
    MemoryView {
        flow: flow.to_string(),
        key: e.key,
        value: e.value,
        version: e.version,
        updated_at: rfc3339(e.updated_at_ms),
    }
}

/// Reads one memory entry of a flow.
#[utoipa::path(get, path = "/v1/memory/{flow}/{key}", security(("bearer" = [])),
    params(("flow" = String, Path, description = "flow id"), ("key" = String, Path, description = "key (may contain '/')")),
    responses((status = 200, body = MemoryView), (status = 404, body = Problem)))]
async fn get_memory(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((flow, key)): Path<(String, String)>,
) -> Result<Json<MemoryView>, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    memory_scope(&flow, Some(&key))?;
    let e = st
        .store
        .memory_get(&who.tenant_id, &flow, &key)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(memory_view(&flow, e)))
}

/// Writes (seeds) one memory entry, optionally compare-and-set.
#[utoipa::path(put, path = "/v1/memory/{flow}/{key}", security(("bearer" = [])),
    params(("flow" = String, Path, description = "flow id"), ("key" = String, Path, description = "key")),
    request_body = PutMemory,
    responses((status = 200, body = MemoryView), (status = 409, body = Problem), (status = 422, body = Problem)))]
async fn put_memory(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((flow, key)): Path<(String, String)>,
    body: Body,
) -> Result<Json<MemoryView>, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    memory_scope(&flow, Some(&key))?;
    let req: PutMemory = body::json(
        &headers,
        body,
        st.cfg.body_limit_bytes,
        st.cfg.body_deadline(),
    )
    .await?;
    let q = airlock_broker::Quotas::default();
    if airlock_broker::json_len(&req.value) > q.memory_value_bytes {
        return Err(ApiError::InvalidRequest(format!(
            "memory values are at most {} bytes",
            q.memory_value_bytes
        )));
    }
    if req.expected_version.is_some_and(|v| v < 0) {
        return Err(ApiError::InvalidRequest(
            "expected_version is 0 or a version".into(),
        ));
    }
    match st
        .store
        .memory_put(
            &who.tenant_id,
            &flow,
            &key,
            &req.value,
            req.expected_version,
            airlock_store::MemoryLimits {
                keys: q.memory_keys,
                ..airlock_store::MemoryLimits::default()
            },
        )
        .await?
    {
        airlock_store::MemoryWrite::Written(_) => {}
        airlock_store::MemoryWrite::Conflict(v) => {
            return Err(ApiError::VersionConflict(format!(
                "the current version is {v}"
            )));
        }
        airlock_store::MemoryWrite::QuotaExceeded => {
            return Err(ApiError::QuotaExceeded(format!(
                "this flow already holds {} keys",
                q.memory_keys
            )));
        }
    }
    let e = st
        .store
        .memory_get(&who.tenant_id, &flow, &key)
        .await?
        .ok_or(ApiError::Internal)?;
    Ok(Json(memory_view(&flow, e)))
}

/// Deletes one memory entry.
#[utoipa::path(delete, path = "/v1/memory/{flow}/{key}", security(("bearer" = [])),
    params(("flow" = String, Path, description = "flow id"), ("key" = String, Path, description = "key")),
    responses((status = 204, description = "deleted"), (status = 404, body = Problem)))]
async fn delete_memory(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((flow, key)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    memory_scope(&flow, Some(&key))?;
    if st.store.memory_delete(&who.tenant_id, &flow, &key).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound)
    }
}

/// Lists a flow's memory entries by key prefix.
#[utoipa::path(get, path = "/v1/memory/{flow}", security(("bearer" = [])),
    params(("flow" = String, Path, description = "flow id"),
           ("prefix" = Option<String>, Query, description = "key prefix"),
           ("after" = Option<String>, Query, description = "key to start after"),
           ("limit" = Option<u32>, Query, description = "1..=1000, default 100")),
    responses((status = 200, body = MemoryList)))]
async fn list_memory(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(flow): Path<String>,
    q: Result<
        axum::extract::Query<HashMap<String, String>>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Result<Json<MemoryList>, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let axum::extract::Query(q) =
        q.map_err(|_| ApiError::InvalidRequest("malformed query string".into()))?;
    memory_scope(&flow, None)?;
    if let Some(k) = q
        .keys()
        .find(|k| !["prefix", "after", "limit"].contains(&k.as_str()))
    {
        return Err(ApiError::InvalidRequest(format!(
            "unknown query parameter {:?}",
            k.chars().take(32).collect::<String>()
        )));
    }
    let limit = match q.get("limit") {
        None => 100,
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| ApiError::InvalidRequest("limit must be in 1..=1000".into()))?,
    };
    let prefix = q.get("prefix").map_or("", String::as_str);
    if prefix.len() > 256 || prefix.chars().any(char::is_control) {
        return Err(ApiError::InvalidRequest("invalid prefix".into()));
    }
    let items = st
        .store
        .memory_list(
            &who.tenant_id,
            &flow,
            prefix,
            q.get("after").map(String::as_str),
            limit,
        )
        .await?;
    let next_after = (items.len() == limit as usize)
        .then(|| items.last().map(|e| e.key.clone()))
        .flatten();
    Ok(Json(MemoryList {
        entries: items
            .into_iter()
            .map(|e| MemoryKeyView {
                key: e.key,
                version: e.version,
                updated_at: rfc3339(e.updated_at_ms),
            })
            .collect(),
        next_after,
    }))
}

// ---------------------------------------------------------------- router

struct SecurityAddon;

impl Modify for SecurityAddon {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document, generated from the handlers and types above.
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "airlock", description = "Multi-tenant sandboxed code execution"),
    paths(healthz, readyz, metrics, openapi, create_execution, get_execution, list_executions,
          cancel_execution, execution_events, execution_logs, put_secret, list_secrets, delete_secret,
          list_audit, get_memory, put_memory, delete_memory, list_memory,
          crate::sessions::create_session, crate::sessions::list_sessions,
          crate::sessions::get_session, crate::sessions::delete_session,
          crate::sessions::session_exec, crate::sessions::session_executions,
          crate::sessions::put_file, crate::sessions::get_file, crate::sessions::delete_file,
          crate::sessions::list_files, crate::sessions::stat_file,
          crate::snapshots::create_snapshot, crate::snapshots::list_snapshots,
          crate::snapshots::get_snapshot, crate::snapshots::diff_snapshot,
          crate::snapshots::snapshot_tar,
          crate::evidence::execution_evidence, crate::evidence::session_evidence),
    components(schemas(Problem, ExecutionView, ExecutionList, CreateExecution, LimitsRequest, NetworkRequest,
                       RunResultDoc, airlock_sandbox::RunResult, airlock_sandbox::Enforced,
                       airlock_sandbox::result::LandlockReport, airlock_sandbox::result::SeccompReport,
                       airlock_sandbox::TerminationReason, airlock_sandbox::cgroup::CgroupVersion,
                       HandlerErrorDoc, airlock_egress::EgressEvent,
                       OutputEncoding,
                       SecretView, SecretList, PutSecret, AuditView, AuditList, LogView, LogList,
                       MemoryView, MemoryKeyView, MemoryList, PutMemory,
                       crate::sessions::CreateSession, crate::sessions::SessionView,
                       crate::sessions::WorkspaceView, crate::sessions::SessionList,
                       crate::sessions::SessionExec, crate::sessions::FileView,
                       crate::sessions::FileList,
                       crate::snapshots::SnapshotView, crate::snapshots::SnapshotList,
                       crate::snapshots::ManifestEntry, crate::snapshots::SnapshotDiff,
                       crate::snapshots::ChangedEntry, crate::evidence::Evidence)),
    modifiers(&SecurityAddon)
)]
pub struct ApiDoc;

/// All routes: the API, the Piston façade, and `/mcp` unless `[mcp]`
/// turned it off.
pub fn router(st: AppState) -> Router {
    let api = routes(st.clone());
    let mut app = api
        .clone()
        .merge(crate::piston::router(st.clone(), api.clone()));
    if st.cfg.mcp.enabled {
        app = app.merge(crate::mcp::router(st, api));
    }
    app
}

/// The API's routes.
fn routes(st: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route(
            "/v1/executions",
            post(create_execution).get(list_executions),
        )
        .route("/v1/executions/{id}", get(get_execution))
        .route("/v1/executions/{id}/cancel", post(cancel_execution))
        .route("/v1/executions/{id}/events", get(execution_events))
        .route("/v1/executions/{id}/logs", get(execution_logs))
        .route(
            "/v1/executions/{id}/evidence",
            get(crate::evidence::execution_evidence),
        )
        .route(
            "/v1/sessions/{id}/evidence",
            get(crate::evidence::session_evidence),
        )
        .route("/v1/memory/{flow}", get(list_memory))
        .route(
            "/v1/memory/{flow}/{*key}",
            get(get_memory).put(put_memory).delete(delete_memory),
        )
        .route("/v1/secrets", get(list_secrets))
        .route("/v1/secrets/{name}", put(put_secret).delete(delete_secret))
        .route("/v1/audit", get(list_audit))
        .route(
            "/v1/sessions",
            post(crate::sessions::create_session).get(crate::sessions::list_sessions),
        )
        .route(
            "/v1/sessions/{id}",
            get(crate::sessions::get_session).delete(crate::sessions::delete_session),
        )
        .route(
            "/v1/sessions/{id}/exec",
            post(crate::sessions::session_exec),
        )
        .route(
            "/v1/sessions/{id}/executions",
            get(crate::sessions::session_executions),
        )
        .route("/v1/sessions/{id}/files", get(crate::sessions::list_files))
        .route(
            "/v1/sessions/{id}/files/{*path}",
            put(crate::sessions::put_file)
                .get(crate::sessions::get_file)
                .delete(crate::sessions::delete_file),
        )
        .route("/v1/sessions/{id}/stat", get(crate::sessions::stat_file))
        .route(
            "/v1/sessions/{id}/snapshots",
            post(crate::snapshots::create_snapshot).get(crate::snapshots::list_snapshots),
        )
        .route("/v1/snapshots/{id}", get(crate::snapshots::get_snapshot))
        .route(
            "/v1/snapshots/{id}/diff",
            get(crate::snapshots::diff_snapshot),
        )
        .route(
            "/v1/snapshots/{id}/tar",
            get(crate::snapshots::snapshot_tar),
        )
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        // Inside the request context (its ids), before any handler: work
        // another node runs is answered there.
        .layer(axum::middleware::from_fn_with_state(
            st.clone(),
            crate::peer::forward,
        ))
        .layer(axum::middleware::from_fn(request_context))
        .with_state(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parsing() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parse_traceparent(ok).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
    }

    #[test]
    fn secret_names() {
        assert!(valid_secret_name("DB_PASSWORD"));
        assert!(valid_secret_name("a.b-c"));
        for bad in ["", "../x", "a/b", "1abc", "a\0b", &"a".repeat(129)] {
            assert!(!valid_secret_name(bad), "{bad:?}");
        }
    }
}
