//! `/mcp`: the MCP server (`airlock-mcp`) over Streamable HTTP.
//!
//! Stateless: every JSON-RPC message is one POST answered with JSON, so no
//! MCP session state lives in the server and any node can answer. Each
//! POST is authenticated with the tenant's key before MCP sees it (an
//! unauthenticated client learns nothing, not even the tool list), its body
//! is read within the API's size cap, deadline and nesting depth, and each
//! tool call is made through this server's own API router in process, with
//! the caller's credentials and address: the same authentication, tenant
//! scoping, limits, validation and audit as any API request, and nothing
//! the API does not allow.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use airlock_mcp::{Api, ApiFuture, ApiRequest, ApiResponse};
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tower::ServiceExt;

use crate::AppState;
use crate::api::{Peer, ReqCtx, authenticate};
use crate::problem::ApiError;

/// The largest API answer a tool call reads (a record carries at most the
/// output caps of the server's ceilings; a file read is at most 1 MiB).
const MAX_ANSWER: usize = 256 << 20;

/// The tools' way to the API: the router itself, called in process.
struct InProcess {
    api: Router,
}

impl Api for InProcess {
    fn send(&self, req: ApiRequest, via: Option<&http::request::Parts>) -> ApiFuture {
        // What the MCP request carried: its credentials, its client's
        // address and its request and trace ids, so the API call is the
        // caller's in every respect (and its audit records name the MCP
        // request).
        let auth = via.and_then(|p| p.headers.get(header::AUTHORIZATION).cloned());
        let peer = via.and_then(|p| p.extensions.get::<ConnectInfo<SocketAddr>>().copied());
        let ctx = via.and_then(|p| p.extensions.get::<ReqCtx>().cloned());
        let traceparent = via.and_then(|p| p.headers.get("traceparent").cloned());
        let api = self.api.clone();
        Box::pin(async move {
            // Only reachable through the gate, which saw both.
            let (Some(peer), Some(ctx)) = (peer, ctx) else {
                tracing::error!("an MCP tool call without its HTTP request");
                return Err("internal error".to_string());
            };
            let mut b = http::Request::builder()
                .method(req.method)
                .uri(req.path.as_str());
            if let Some(a) = auth {
                b = b.header(header::AUTHORIZATION, a);
            }
            if let Some(t) = traceparent {
                b = b.header("traceparent", t);
            }
            if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
                b = b.header("x-request-id", v);
            }
            if let Some(ct) = req.content_type {
                b = b.header(header::CONTENT_TYPE, ct);
            }
            let mut r = b.body(Body::from(req.body)).map_err(|e| {
                tracing::error!(error = %e, "an MCP tool built an invalid request");
                "internal error".to_string()
            })?;
            r.extensions_mut().insert(peer);
            let Ok(resp) = api.oneshot(r).await;
            let status = resp.status().as_u16();
            let body = axum::body::to_bytes(resp.into_body(), MAX_ANSWER)
                .await
                .map_err(|_| "the answer was too large".to_string())?;
            Ok(ApiResponse {
                status,
                body: body.to_vec(),
            })
        })
    }
}

/// `/mcp` behind its gate; `api` is the router tool calls go through.
pub(crate) fn router(st: AppState, api: Router) -> Router {
    let handler = airlock_mcp::Server::new(Arc::new(InProcess { api }));
    let config = StreamableHttpServerConfig::default()
        // No MCP sessions: each POST stands alone and is answered with
        // JSON (nothing is pushed to the client).
        .with_legacy_session_mode(false)
        .with_json_response(true)
        // Every request carries the tenant's key, which a page the browser
        // was tricked into loading does not have; the Host check (meant
        // for unauthenticated local servers) would only refuse real
        // deployments behind their own names. Origin is checked instead.
        .disable_allowed_hosts()
        .with_allowed_origins(st.cfg.mcp.allowed_origins.clone())
        .enforce_origin_validation()
        .with_max_request_body_bytes(st.cfg.body_limit_bytes);
    let svc = StreamableHttpService::new(
        move || Ok(handler.clone()),
        Arc::new(NeverSessionManager::default()),
        config,
    );
    Router::new()
        .nest_service("/mcp", svc)
        .layer(axum::middleware::from_fn_with_state(st, gate))
}

/// Authenticates every request to `/mcp` and reads its body within the
/// API's limits before MCP parses it.
async fn gate(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    req: Request,
    next: Next,
) -> Response {
    let ctx = ReqCtx::of(req.headers());
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let started = Instant::now();
    let mut resp = match admit(&st, peer, &ctx, req).await {
        Ok(mut req) => {
            req.extensions_mut().insert(ctx.clone());
            next.run(req).await
        }
        Err(e) => e.into_response(),
    };
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

/// The request with its body read, if its caller may use MCP at all.
async fn admit(
    st: &AppState,
    peer: SocketAddr,
    ctx: &ReqCtx,
    req: Request,
) -> Result<Request, ApiError> {
    // The key is checked here and again by each API call a tool makes:
    // the tenant's request slot is held by those calls, not by this one.
    drop(authenticate(st, req.headers(), peer.ip(), ctx).await?);
    if st.draining.load(Ordering::SeqCst) {
        return Err(ApiError::ShuttingDown);
    }
    let (parts, body) = req.into_parts();
    let limit = st.cfg.body_limit_bytes;
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    // Whole within the deadline: a body trickled a byte at a time cannot
    // hold a connection.
    let deadline = st.cfg.body_deadline();
    let bytes = tokio::time::timeout(deadline, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| ApiError::RequestTimeout(deadline.as_millis()))?
        .map_err(|_| ApiError::PayloadTooLarge(limit))?;
    crate::body::check_depth(&bytes)?;
    Ok(Request::from_parts(parts, Body::from(bytes)))
}
