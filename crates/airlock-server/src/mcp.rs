//! `/mcp`: the MCP server (`airlock-mcp`) over Streamable HTTP.
//!
//! Stateless: every JSON-RPC message is one POST answered with JSON, so no
//! MCP session state lives in the server and any node can answer. Each
//! POST is authenticated with the tenant's key before MCP sees it (an
//! unauthenticated client learns nothing, not even the tool list), its body
//! is read within the API's size cap, deadline and nesting depth, and each
//! tool call is made through this server's own API router in process
//! ([`crate::inproc`]): the same authentication, tenant scoping, limits,
//! validation and audit as any API request, and nothing the API does not
//! allow.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use airlock_mcp::{Api, ApiFuture, ApiRequest};
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

use crate::AppState;
use crate::api::{Peer, ReqCtx, authenticate};
use crate::inproc::Caller;
use crate::problem::ApiError;

/// The tools' way to the API: the router itself, called in process as
/// the caller of the MCP request.
struct InProcess {
    api: Router,
}

impl Api for InProcess {
    fn send(&self, req: ApiRequest, via: Option<&http::request::Parts>) -> ApiFuture {
        // Only reachable through the gate, which put the client's address
        // and the request context there.
        let caller = via.and_then(Caller::of_parts);
        let api = self.api.clone();
        Box::pin(async move {
            let Some(caller) = caller else {
                tracing::error!("an MCP tool call without its HTTP request");
                return Err("internal error".to_string());
            };
            caller.send(api, req).await
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
        .layer(axum::middleware::from_fn(crate::api::adapter_context))
}

/// Authenticates every request to `/mcp` and reads its body within the
/// API's limits before MCP parses it.
async fn gate(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    req: Request,
    next: Next,
) -> Response {
    match admit(&st, peer, &ctx, req).await {
        Ok(req) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// The request with its body read, if its caller may use MCP at all.
async fn admit(
    st: &AppState,
    peer: SocketAddr,
    ctx: &ReqCtx,
    req: Request,
) -> Result<Request, ApiError> {
    // The key is checked here and again by each API call a tool makes.
    // This request holds the tenant's request slot while its body
    // arrives (a tenant trickling bodies is bounded by its own limit, as
    // on every API route); the tool calls then hold their own.
    let who = authenticate(st, req.headers(), peer.ip(), ctx).await?;
    if st.draining.load(Ordering::SeqCst) {
        return Err(ApiError::ShuttingDown);
    }
    let (parts, body) = req.into_parts();
    // Whole within the deadline: a body trickled a byte at a time cannot
    // hold a connection.
    let bytes = crate::body::read(
        &parts.headers,
        body,
        st.cfg.body_limit_bytes,
        st.cfg.body_deadline(),
    )
    .await?;
    crate::body::check_depth(&bytes)?;
    drop(who);
    Ok(Request::from_parts(parts, Body::from(bytes)))
}
