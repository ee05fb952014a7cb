//! Errors as RFC 9457 problem documents with a stable `code`.
//!
//! The one place where errors become HTTP. Messages are written for the
//! tenant: no host paths, no database text, no internals (those go to the
//! server log under the request id).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// A problem document.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// `urn:airlock:problem:<code>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary for the code.
    pub title: &'static str,
    /// HTTP status.
    pub status: u16,
    /// What went wrong in this request.
    pub detail: String,
    /// Stable machine-readable code.
    pub code: &'static str,
}

/// Every error the API returns.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Missing, malformed, unknown or revoked API key (one body for all).
    #[error("unauthorized")]
    Unauthorized,
    /// Too many failed authentications from this client.
    #[error("too many failed authentications")]
    AuthThrottled {
        /// Seconds until the window resets.
        retry_after: u64,
    },
    /// No such resource for this tenant.
    #[error("not found")]
    NotFound,
    /// Unknown route method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Body over the limit.
    #[error("payload too large")]
    PayloadTooLarge(usize),
    /// Not `application/json`.
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// Not JSON at all (syntax, encoding, truncation).
    #[error("invalid json: {0}")]
    InvalidJson(String),
    /// Nesting deeper than allowed.
    #[error("json too deep")]
    JsonTooDeep(usize),
    /// Well-formed JSON with wrong types, unknown or missing fields, or
    /// values out of range.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A request asked for more than the tenant is allowed.
    #[error("policy denied: {0}")]
    PolicyDenied(String),
    /// The language's runtime is not installed on this host.
    #[error("runtime unavailable: {0}")]
    RuntimeUnavailable(String),
    /// No backend this server offers meets the requested isolation (or
    /// the backend named is not offered); names what is offered.
    #[error("isolation unavailable: {0}")]
    IsolationUnavailable(String),
    /// Queue full.
    #[error("queue full")]
    QueueFull,
    /// The tenant holds its whole share of running and queued executions.
    #[error("tenant queue full")]
    TenantQueueFull {
        /// Its running share.
        running: usize,
        /// Its queued share.
        queued: usize,
    },
    /// The request body did not arrive within the deadline (ms).
    #[error("request timeout")]
    RequestTimeout(u128),
    /// The tenant has this many requests in flight already.
    #[error("too many requests")]
    TooManyRequests(usize),
    /// The execution is already final.
    #[error("not cancellable")]
    NotCancellable,
    /// A compare-and-set lost (current version in the message).
    #[error("version conflict")]
    VersionConflict(String),
    /// A quota is exhausted.
    #[error("quota exceeded")]
    QuotaExceeded(String),
    /// The server is draining.
    #[error("shutting down")]
    ShuttingDown,
    /// The work asked about runs on another node, which did not answer.
    #[error("node unreachable")]
    NodeUnreachable,
    /// This server cannot hold sessions (it does not run as root, or no
    /// backend it offers binds a workspace).
    #[error("sessions unavailable")]
    SessionsUnavailable(String),
    /// The tenant holds as many open sessions as it may.
    #[error("too many sessions")]
    TooManySessions(String),
    /// The server holds as many open sessions as it may.
    #[error("sessions full")]
    SessionsFull(String),
    /// The session ended (why in the message): nothing runs in it and its
    /// files are gone.
    #[error("session ended")]
    SessionEnded(String),
    /// A workspace path that cannot be (`..`, NUL, too long, empty).
    #[error("invalid path")]
    InvalidPath(String),
    /// No file or directory at that path of the workspace.
    #[error("file not found")]
    FileNotFound,
    /// A directory where a file was meant, or the reverse, or a FIFO,
    /// socket or device.
    #[error("wrong type")]
    WrongType(String),
    /// The workspace's byte or file quota is used up; nothing changed.
    #[error("workspace full")]
    WorkspaceFull(String),
    /// The sandbox's user may not do this (a file the code made read-only).
    #[error("permission denied")]
    PermissionDenied,
    /// Removing a directory that is not empty.
    #[error("directory not empty")]
    DirectoryNotEmpty,
    /// The file is busy (a lease, a rename racing the request); retry.
    #[error("file busy")]
    FileBusy,
    /// A file larger than the server hands out in one response.
    #[error("file too large")]
    FileTooLarge(u64),
    /// The session holds as many snapshots as it may.
    #[error("too many snapshots")]
    TooManySnapshots(u64),
    /// Anything else; details only in the server log.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// (status, code, title)
    pub fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        use ApiError::*;
        match self {
            Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            AuthThrottled { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "auth_throttled",
                "Too many failed authentications",
            ),
            NotFound => (StatusCode::NOT_FOUND, "not_found", "Not found"),
            MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Method not allowed",
            ),
            PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "Payload too large",
            ),
            UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Unsupported media type",
            ),
            InvalidJson(_) => (StatusCode::BAD_REQUEST, "invalid_json", "Invalid JSON"),
            JsonTooDeep(_) => (
                StatusCode::BAD_REQUEST,
                "json_too_deep",
                "JSON nested too deeply",
            ),
            InvalidRequest(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Invalid request",
            ),
            PolicyDenied(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "policy_denied",
                "Denied by policy",
            ),
            RuntimeUnavailable(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "runtime_unavailable",
                "Runtime unavailable",
            ),
            IsolationUnavailable(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "isolation_unavailable",
                "Isolation unavailable",
            ),
            QueueFull => (
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                "Execution queue full",
            ),
            TenantQueueFull { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "tenant_queue_full",
                "Tenant's share of the queue used up",
            ),
            RequestTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "Request body too slow",
            ),
            TooManyRequests(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                "Too many requests in flight",
            ),
            NotCancellable => (StatusCode::CONFLICT, "not_cancellable", "Already finished"),
            VersionConflict(_) => (StatusCode::CONFLICT, "version_conflict", "Version conflict"),
            QuotaExceeded(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "quota_exceeded",
                "Quota exceeded",
            ),
            ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "Server shutting down",
            ),
            NodeUnreachable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "node_unreachable",
                "Node unreachable",
            ),
            SessionsUnavailable(_) => (
                StatusCode::NOT_IMPLEMENTED,
                "sessions_unavailable",
                "Sessions unavailable on this server",
            ),
            SessionsFull(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "sessions_full",
                "Server holds its maximum of sessions",
            ),
            TooManySessions(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_sessions",
                "Tenant holds its maximum of open sessions",
            ),
            SessionEnded(_) => (StatusCode::CONFLICT, "session_ended", "Session ended"),
            InvalidPath(_) => (StatusCode::BAD_REQUEST, "invalid_path", "Invalid path"),
            FileNotFound => (
                StatusCode::NOT_FOUND,
                "file_not_found",
                "No such file or directory",
            ),
            WrongType(_) => (StatusCode::CONFLICT, "wrong_type", "Wrong file type"),
            WorkspaceFull(_) => (
                StatusCode::INSUFFICIENT_STORAGE,
                "workspace_full",
                "Workspace full",
            ),
            PermissionDenied => (
                StatusCode::FORBIDDEN,
                "permission_denied",
                "Permission denied",
            ),
            DirectoryNotEmpty => (
                StatusCode::CONFLICT,
                "directory_not_empty",
                "Directory not empty",
            ),
            FileBusy => (StatusCode::CONFLICT, "file_busy", "File busy"),
            FileTooLarge(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "file_too_large",
                "File too large",
            ),
            TooManySnapshots(_) => (
                StatusCode::CONFLICT,
                "too_many_snapshots",
                "Too many snapshots",
            ),
            Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
            ),
        }
    }

    fn detail(&self) -> String {
        use ApiError::*;
        match self {
            Unauthorized => "a valid API key is required (Authorization: Bearer <key>)".into(),
            AuthThrottled { retry_after } => {
                format!(
                    "too many failed authentications from this client; retry in {retry_after} s"
                )
            }
            NotFound => "no such resource".into(),
            MethodNotAllowed => "method not allowed on this resource".into(),
            PayloadTooLarge(limit) => format!("request body exceeds {limit} bytes"),
            UnsupportedMediaType => "the body must be application/json".into(),
            JsonTooDeep(max) => format!("JSON nesting exceeds depth {max}"),
            InvalidJson(m)
            | InvalidRequest(m)
            | PolicyDenied(m)
            | RuntimeUnavailable(m)
            | IsolationUnavailable(m)
            | VersionConflict(m)
            | QuotaExceeded(m)
            | SessionsUnavailable(m)
            | SessionsFull(m)
            | TooManySessions(m)
            | InvalidPath(m)
            | WrongType(m)
            | WorkspaceFull(m) => m.clone(),
            SessionEnded(why) => format!("the session ended ({why}); start a new one"),
            FileNotFound => "no such file or directory in the workspace".into(),
            PermissionDenied => {
                "the sandbox's user may not do this (the file or its directory is read-only)".into()
            }
            DirectoryNotEmpty => "the directory is not empty".into(),
            FileBusy => "the file is busy (in use, or changing while it was reached); retry".into(),
            FileTooLarge(max) => format!(
                "the file is larger than {max} bytes, the most one request carries; \
                 split it in the sandbox, or raise sessions.max_file_bytes"
            ),
            TooManySnapshots(max) => format!(
                "the session holds {max} snapshots, the most one may (sessions.max_snapshots); \
                 a new session can start from one of them"
            ),
            QueueFull => "too many executions are queued; retry later".into(),
            TenantQueueFull { running, queued } => format!(
                "this tenant holds its whole share of this server ({running} running and \
                 {queued} waiting executions); retry when some have finished"
            ),
            RequestTimeout(ms) => format!("the request body did not arrive within {ms} ms"),
            TooManyRequests(n) => format!(
                "this tenant already has {n} requests in flight; retry when some have finished"
            ),
            NotCancellable => "the execution has already finished".into(),
            ShuttingDown => "the server is shutting down".into(),
            NodeUnreachable => "this runs on another node of the cluster, which does not answer; \
                                retry (if that node stays away, its work ends with node_lost)"
                .into(),
            Internal => "internal error; the request id identifies it in the server log".into(),
        }
    }

    /// The problem document.
    pub fn problem(&self) -> Problem {
        let (status, code, title) = self.parts();
        Problem {
            kind: format!("urn:airlock:problem:{code}"),
            title,
            status: status.as_u16(),
            detail: self.detail(),
            code,
        }
    }
}

impl From<airlock_store::StoreError> for ApiError {
    fn from(e: airlock_store::StoreError) -> Self {
        if matches!(e, airlock_store::StoreError::TenantDeleted) {
            // The key was valid a moment ago; now it is not: the same 401
            // as any other invalid key.
            return ApiError::Unauthorized;
        }
        tracing::error!(error = %e, "store error");
        ApiError::Internal
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let p = self.problem();
        let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&p).unwrap_or_default();
        let mut resp = (status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match &self {
            ApiError::Unauthorized => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"airlock\""),
                );
            }
            ApiError::AuthThrottled { retry_after } => {
                if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
                    h.insert(header::RETRY_AFTER, v);
                }
            }
            ApiError::QueueFull
            | ApiError::TenantQueueFull { .. }
            | ApiError::TooManyRequests(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::RequestTimeout(_) => {
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            ApiError::SessionsFull(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
            }
            _ => {}
        }
        resp
    }
}
