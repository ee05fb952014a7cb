//! Requests to this server's own API router, made in process on behalf of
//! a caller: how the protocol adapters (MCP at `/mcp`, the Piston façade
//! at `/api/v2`) act. Each call carries the caller's credentials, client
//! address, trace and request id, so it is the caller's API request in
//! every respect: authentication, tenant scoping, per-tenant request
//! slots, validation, limits and audit. An adapter can do nothing its
//! caller could not do with the API itself.

use std::net::SocketAddr;

use airlock_mcp::{ApiRequest, ApiResponse};
use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, HeaderValue, header};
use tower::ServiceExt;

use crate::api::ReqCtx;

/// The largest answer read back (a record carries at most the output caps
/// of the server's ceilings).
const MAX_ANSWER: usize = 256 << 20;

/// Who a call is made for.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    authorization: Option<HeaderValue>,
    traceparent: Option<HeaderValue>,
    peer: SocketAddr,
    request_id: String,
}

impl Caller {
    /// The caller of a request with these headers, from `peer`, whose
    /// request context is `ctx`.
    pub(crate) fn new(headers: &HeaderMap, peer: SocketAddr, ctx: &ReqCtx) -> Caller {
        // The inner requests join the caller's trace: its `traceparent`,
        // or one naming the trace id this request was given.
        // Built from the trace id this request was given (the caller's
        // when its `traceparent` was valid), so a malformed one cannot
        // split the inner requests off into traces of their own.
        let span = &uuid::Uuid::new_v4().simple().to_string()[..16];
        let traceparent = HeaderValue::from_str(&format!("00-{}-{span}-01", ctx.trace_id)).ok();
        Caller {
            authorization: headers.get(header::AUTHORIZATION).cloned(),
            traceparent,
            peer,
            request_id: ctx.request_id.clone(),
        }
    }

    /// The caller of the HTTP request an adapter was handed (its client
    /// address and request context were put there by the server).
    pub(crate) fn of_parts(p: &http::request::Parts) -> Option<Caller> {
        let peer = p.extensions.get::<ConnectInfo<SocketAddr>>()?.0;
        let ctx = p.extensions.get::<ReqCtx>()?;
        Some(Caller::new(&p.headers, peer, ctx))
    }

    /// Sends `req` through `api` as this caller.
    pub(crate) async fn send(&self, api: Router, req: ApiRequest) -> Result<ApiResponse, String> {
        let mut b = http::Request::builder()
            .method(req.method)
            .uri(req.path.as_str());
        if let Some(a) = &self.authorization {
            b = b.header(header::AUTHORIZATION, a);
        }
        if let Some(t) = &self.traceparent {
            b = b.header("traceparent", t);
        }
        if let Ok(v) = HeaderValue::from_str(&self.request_id) {
            b = b.header("x-request-id", v);
        }
        if let Some(ct) = req.content_type {
            b = b.header(header::CONTENT_TYPE, ct);
        }
        let mut r = b.body(Body::from(req.body)).map_err(|e| {
            tracing::error!(error = %e, "an adapter built an invalid API request");
            "internal error".to_string()
        })?;
        r.extensions_mut().insert(ConnectInfo(self.peer));
        let Ok(resp) = api.oneshot(r).await;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let max = req.max_answer.map_or(MAX_ANSWER, |m| {
            usize::try_from(m).unwrap_or(MAX_ANSWER).min(MAX_ANSWER)
        });
        let body = axum::body::to_bytes(resp.into_body(), max)
            .await
            .map_err(|_| format!("the answer is larger than {max} bytes"))?;
        Ok(ApiResponse {
            status,
            body: body.to_vec(),
            retry_after,
        })
    }
}
