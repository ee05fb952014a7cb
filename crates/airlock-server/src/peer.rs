//! Requests about work another node runs, passed to that node.
//!
//! Any node answers any request for a tenant's data from the shared
//! database. What lives only on the node that runs it — an execution's live
//! event stream and its cancel switch, a session's workspace and the
//! sandboxes running in it — is reached through that node: this layer
//! authenticates the caller here, finds the owning node in the record, and
//! sends the request there, streaming both ways.
//!
//! The caller's API key never leaves the node it was given to. The request
//! goes without it, signed instead (`airlock-forwarded-by`): the sending
//! node, the receiving node, the tenant and key id it authenticated, the
//! time, a nonce, the method and the path, under a key every node derives
//! from the master key they share. The owner takes a signed request once
//! (nonces are remembered for as long as a signature is fresh), only when
//! it is addressed to it, from an active node, within two minutes of its
//! making, and only while that API key is still valid; anything else is
//! 401 and audited. A signed request is never passed on a second time.
//!
//! Only for records of another node that are still live; everything else
//! goes to the handlers, which answer as on a single node.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::{Body as HttpBody, Frame, Incoming};
use hyper_util::rt::TokioIo;

use crate::AppState;
use crate::api::{Principal, ReqCtx, authenticate};
use crate::problem::ApiError;

/// Set on a request one node passes to another: its signature (see the
/// module's documentation). A request carrying it is answered where it
/// arrives, by the tenant and key it names once the signature holds.
pub const FORWARDED_BY: &str = "airlock-forwarded-by";

/// How far a signature's time may be from the receiving node's clock.
const FRESH_MS: i64 = 120_000;

/// Nonces remembered at most (each for [`FRESH_MS`] either way of its
/// time): beyond, signed requests are refused 503 until old ones expire.
const SEEN_MAX: usize = 1 << 20;

/// The caller a signed request was authenticated as by the node that
/// passed it on.
#[derive(Debug, Clone)]
pub(crate) struct Forwarded {
    /// The tenant.
    pub tenant_id: String,
    /// The API key's id (the key itself was not sent).
    pub key_id: String,
    /// The sending node.
    pub from: String,
}

/// The nonces of the signed requests taken, with when each may be
/// forgotten (its time plus [`FRESH_MS`]: older ones are refused anyway).
#[derive(Debug, Default)]
pub(crate) struct Seen(std::sync::Mutex<std::collections::HashMap<[u8; 16], i64>>);

impl Seen {
    /// Takes `nonce` once: false when it was taken before, or when the
    /// set is full of unexpired ones.
    fn take(&self, nonce: [u8; 16], ts: i64, now: i64) -> Result<bool, ApiError> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= SEEN_MAX {
            m.retain(|_, until| *until >= now);
            if m.len() >= SEEN_MAX {
                return Err(ApiError::NodeUnreachable);
            }
        }
        Ok(m.insert(nonce, ts + FRESH_MS).is_none())
    }
}

/// The signature over one request, every field length-prefixed so no two
/// requests encode alike.
#[allow(clippy::too_many_arguments)]
fn mac(
    key: &[u8; 32],
    from: &str,
    to: &str,
    tenant: &str,
    key_id: &str,
    ts: i64,
    nonce: &[u8; 16],
    method: &str,
    path: &str,
) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    for part in [
        b"v1".as_slice(),
        from.as_bytes(),
        to.as_bytes(),
        tenant.as_bytes(),
        key_id.as_bytes(),
        &ts.to_le_bytes(),
        nonce,
        method.as_bytes(),
        path.as_bytes(),
    ] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize()
}

fn hex_decode<const N: usize>(s: &str) -> Option<[u8; N]> {
    // Digits only: from_str_radix alone would take a sign ("+a").
    if s.len() != 2 * N || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The header value signing a request from this node to `to` for `who`.
fn sign(st: &AppState, to: &str, who: &Principal, method: &str, path: &str) -> String {
    // 122 bits from the system's random source: never the same twice.
    let nonce = *uuid::Uuid::new_v4().as_bytes();
    let ts = airlock_store::now_ms();
    let m = mac(
        &st.node_key,
        &st.node.id,
        to,
        &who.tenant_id,
        &who.key_id,
        ts,
        &nonce,
        method,
        path,
    );
    format!(
        "v1 {} {} {} {ts} {} {}",
        st.node.id,
        who.tenant_id,
        who.key_id,
        hex(&nonce),
        m.to_hex()
    )
}

/// Checks a signed request's header; the caller it names, or why not (a
/// reason for the audit record, never shown to the client).
async fn verify(
    st: &AppState,
    value: &str,
    method: &str,
    path: &str,
) -> Result<Forwarded, &'static str> {
    let parts: Vec<&str> = value.split(' ').collect();
    let ["v1", from, tenant, key_id, ts, nonce, sig] = parts.as_slice() else {
        return Err("forwarded_malformed");
    };
    let well_formed = crate::node::valid_id(from)
        && crate::api::valid_id(tenant, "tn")
        && key_id.len() == 16
        && key_id.bytes().all(|b| b.is_ascii_hexdigit());
    let (Some(nonce), Some(sig), Ok(ts)) = (
        hex_decode::<16>(nonce),
        hex_decode::<32>(sig),
        ts.parse::<i64>(),
    ) else {
        return Err("forwarded_malformed");
    };
    if !well_formed {
        return Err("forwarded_malformed");
    }
    let expected = mac(
        &st.node_key,
        from,
        &st.node.id,
        tenant,
        key_id,
        ts,
        &nonce,
        method,
        path,
    );
    // blake3::Hash compares in constant time.
    if expected != blake3::Hash::from_bytes(sig) {
        return Err("forwarded_bad_signature");
    }
    let now = airlock_store::now_ms();
    if (now - ts).abs() > FRESH_MS {
        return Err("forwarded_stale");
    }
    match st.forwards_seen.take(nonce, ts, now) {
        Ok(true) => {}
        Ok(false) => return Err("forwarded_replayed"),
        Err(_) => return Err("forwarded_too_many"),
    }
    match st.store.node(from).await {
        Ok(Some(n)) if n.state == "active" && n.id != st.node.id => {}
        _ => return Err("forwarded_unknown_node"),
    }
    Ok(Forwarded {
        tenant_id: tenant.to_string(),
        key_id: key_id.to_string(),
        from: from.to_string(),
    })
}

/// The caller of a signed request, while its key is still valid (it may
/// have been revoked since the sending node checked it).
pub(crate) async fn principal(st: &AppState, f: &Forwarded) -> Result<Principal, ApiError> {
    let valid = st.store.api_key(&f.key_id).await?.is_some_and(|k| {
        k.info.tenant_id == f.tenant_id
            && k.info.revoked_at_ms.is_none()
            && k.info
                .expires_at_ms
                .is_none_or(|e| e > airlock_store::now_ms())
    });
    if !valid {
        return Err(ApiError::Unauthorized);
    }
    let Some(slot) = st
        .tenant_requests
        .enter(&f.tenant_id, st.cfg.max_requests_per_tenant)
    else {
        st.metrics.tenant_request_rejections.inc();
        return Err(ApiError::TooManyRequests(st.cfg.max_requests_per_tenant));
    };
    Ok(Principal::new(f.tenant_id.clone(), f.key_id.clone(), slot))
}

/// A signed request: checked here, its caller put on the request's context
/// for the handlers; refused 401 (and audited) when the signature does not
/// hold.
async fn take_signed(
    st: &AppState,
    mut req: Request,
    next: Next,
    peer: std::net::IpAddr,
) -> Response {
    let value = req
        .headers()
        .get_all(FORWARDED_BY)
        .iter()
        .map(|v| v.to_str().unwrap_or(""))
        .collect::<Vec<_>>();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let method = req.method().as_str().to_string();
    // Throttled like any credential, and like a valid key a valid
    // signature never is: over the limit, a bad one costs no database
    // write (nothing before the signature holds touches the database).
    let (limit, window) = (
        st.cfg.auth_failure_limit,
        Duration::from_secs(st.cfg.auth_failure_window_secs),
    );
    let client = crate::conn::client_key(peer);
    // One signature, and no credential beside it.
    let verdict = if value.len() != 1 || req.headers().contains_key(header::AUTHORIZATION) {
        Err("forwarded_malformed")
    } else {
        verify(st, value[0], &method, &path).await
    };
    let Some(ctx) = req.extensions_mut().get_mut::<ReqCtx>() else {
        return ApiError::Internal.into_response();
    };
    match verdict {
        Ok(f) => {
            tracing::debug!(from = %f.from, tenant = %f.tenant_id, "a request passed on by another node");
            ctx.forwarded = Some(f);
            next.run(req).await
        }
        Err(why) => {
            st.metrics.auth_failures.inc();
            if let Some(retry_after) = st.limiter.blocked(client, limit, window) {
                return ApiError::AuthThrottled { retry_after }.into_response();
            }
            st.limiter.fail(client, limit, window);
            tracing::warn!(%peer, reason = why, "a signed node-to-node request was refused");
            let ev = airlock_store::NewAudit::new(
                None,
                "auth.failure",
                &format!("client:{peer}"),
                "",
                Some(&ctx.request_id),
            )
            .with_detail(serde_json::json!({ "reason": why }));
            if let Err(e) = st.store.append_audit(ev).await {
                return ApiError::from(e).into_response();
            }
            ApiError::Unauthorized.into_response()
        }
    }
}

/// How long connecting to another node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a request is about, when that lives on one node.
enum Target {
    /// Its live events and cancel switch: on the node running it.
    Execution(String),
    /// Its workspace: on the node holding the session.
    Session(String),
    /// Its contents: in the data directory of the node whose session took
    /// it, which serves its tar.
    Snapshot(String),
    /// A session made from a snapshot (`from_snapshot` in the body): made
    /// where that snapshot's contents are.
    NewSession,
}

fn target(method: &axum::http::Method, path: &str) -> Option<Target> {
    // Segments as the router sees them (percent-decoded), so an encoded id
    // (`ex%5F1`) is the same record; one that does not decode is none.
    let segs: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
        })
        .collect::<Result<_, _>>()
        .ok()?;
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    match segs.as_slice() {
        ["v1", "executions", id, "events"] if method == axum::http::Method::GET => {
            Some(Target::Execution(id.to_string()))
        }
        ["v1", "executions", id, "cancel"] if method == axum::http::Method::POST => {
            Some(Target::Execution(id.to_string()))
        }
        ["v1", "sessions"] if method == axum::http::Method::POST => Some(Target::NewSession),
        ["v1", "sessions", id, ..] => Some(Target::Session(id.to_string())),
        ["v1", "snapshots", id, "tar"] if method == axum::http::Method::GET => {
            Some(Target::Snapshot(id.to_string()))
        }
        _ => None,
    }
}

/// The middleware: passes a request about another node's live work to that
/// node, and everything else on.
pub(crate) async fn forward(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let client = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    if req.headers().contains_key(FORWARDED_BY) {
        let Some(client) = client else {
            return ApiError::Internal.into_response();
        };
        return take_signed(&st, req, next, client).await;
    }
    if st.cfg.store.postgres_url().is_none() {
        return next.run(req).await;
    }
    let Some(t) = target(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let local = match &t {
        Target::Execution(id) => st.exec.entry(id).is_some(),
        Target::Session(id) => st.sessions.as_ref().is_some_and(|s| s.holds(id)),
        Target::Snapshot(_) | Target::NewSession => false,
    };
    if local {
        return next.run(req).await;
    }
    let Some(peer) = client else {
        return ApiError::Internal.into_response();
    };
    let Some(ctx) = req.extensions().get::<ReqCtx>().cloned() else {
        return ApiError::Internal.into_response();
    };
    // The caller first: nothing of an unauthenticated request is read or
    // looked up (its body included), as in the handlers.
    let who = match authenticate(&st, req.headers(), peer, &ctx).await {
        Ok(w) => w,
        Err(e) => return e.into_response(),
    };
    // A new session's body says whether it starts from a snapshot: read
    // it here (bounded as the handler bounds it) and hand it on whole.
    let (req, t) = match t {
        Target::NewSession => {
            let (parts, body) = req.into_parts();
            let bytes = match crate::body::read(
                &parts.headers,
                body,
                st.cfg.body_limit_bytes,
                st.cfg.body_deadline(),
            )
            .await
            {
                Ok(b) => b,
                Err(e) => return e.into_response(),
            };
            let from = from_snapshot(&bytes);
            let req = Request::from_parts(parts, Body::from(bytes));
            match from {
                Some(sn) => (req, Target::Snapshot(sn)),
                None => {
                    // The handler authenticates it again: this slot is not
                    // held twice.
                    drop(who);
                    return next.run(req).await;
                }
            }
        }
        t => (req, t),
    };
    let node_id = match owner_of(&st, &who, &t).await {
        Ok(Some(n)) => n,
        Ok(None) => {
            drop(who);
            return next.run(req).await;
        }
        Err(e) => return e.into_response(),
    };
    match send(&st, req, who, &node_id).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// The node that runs what the request is about, when that is a live
/// record of another node's.
async fn owner_of(st: &AppState, who: &Principal, t: &Target) -> Result<Option<String>, ApiError> {
    let node = match t {
        Target::Execution(id) => st
            .store
            .execution(&who.tenant_id, id)
            .await?
            .filter(|r| !r.status.is_terminal())
            .and_then(|r| r.node_id),
        Target::Session(id) => st
            .store
            .session(&who.tenant_id, id)
            .await?
            .filter(|r| r.ended_at_ms.is_none())
            .and_then(|r| r.node_id),
        // Kept by the node whose session took it, open or ended.
        Target::Snapshot(id) => match st.store.snapshot(&who.tenant_id, id).await? {
            Some(sn) => st
                .store
                .session(&who.tenant_id, &sn.session_id)
                .await?
                .and_then(|r| r.node_id),
            None => None,
        },
        Target::NewSession => None,
    };
    Ok(node.filter(|n| *n != st.node.id))
}

/// The `from_snapshot` of a new session's body, when it is one well-formed
/// (anything else goes to the handler, which says what is wrong).
fn from_snapshot(body: &[u8]) -> Option<String> {
    crate::body::check_depth(body).ok()?;
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let id = v.get("from_snapshot")?.as_str()?;
    crate::api::valid_id(id, "sn").then(|| id.to_string())
}

/// Headers that belong to one connection, not to the request.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
    )
}

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (k, v) in from {
        if !hop_by_hop(k) {
            to.append(k, v.clone());
        }
    }
}

async fn send(
    st: &AppState,
    req: Request,
    who: Principal,
    node_id: &str,
) -> Result<Response, ApiError> {
    let node = st.store.node(node_id).await?;
    let Some(url) = node
        .filter(|n| n.state == "active")
        .and_then(|n| n.url)
        .and_then(|u| u.parse::<Uri>().ok())
    else {
        return Err(ApiError::NodeUnreachable);
    };
    let (Some(host), Some(scheme)) = (url.host(), url.scheme_str()) else {
        return Err(ApiError::NodeUnreachable);
    };
    let tls = scheme == "https";
    let port = url.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let authority = url
        .authority()
        .map(|a| a.as_str().to_string())
        .ok_or(ApiError::NodeUnreachable)?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut out = hyper::Request::builder()
        .method(parts.method.clone())
        .uri(path.as_str())
        .body(body)
        .map_err(|_| ApiError::Internal)?;
    let signed = sign(st, node_id, &who, parts.method.as_str(), &path);
    copy_headers(&parts.headers, out.headers_mut());
    let h = out.headers_mut();
    // The caller's key stays here: the signature says who it is.
    h.remove(header::AUTHORIZATION);
    h.insert(
        header::HOST,
        HeaderValue::from_str(&authority).map_err(|_| ApiError::NodeUnreachable)?,
    );
    h.insert(
        HeaderName::from_static(FORWARDED_BY),
        HeaderValue::from_str(&signed).map_err(|_| ApiError::Internal)?,
    );
    if let Some(ctx) = parts.extensions.remove::<ReqCtx>() {
        // The same request id on both nodes' logs.
        if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
            h.insert("x-request-id", v);
        }
    }
    let unreachable = |e: &dyn std::fmt::Display| {
        tracing::warn!(node = %node_id, error = %e, "the node running this does not answer");
        ApiError::NodeUnreachable
    };
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|e| unreachable(&e))?
    .map_err(|e| unreachable(&e))?;
    let _ = tcp.set_nodelay(true);
    let resp = if tls {
        let name =
            rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| unreachable(&e))?;
        let cfg = st.peer_tls.clone().ok_or(ApiError::NodeUnreachable)?;
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
        )
        .await
        .map_err(|e| unreachable(&e))?
        .map_err(|e| unreachable(&e))?;
        exchange(TokioIo::new(stream), out).await
    } else {
        exchange(TokioIo::new(tcp), out).await
    }
    .map_err(|e| unreachable(&e))?;
    st.metrics.forwarded.inc();
    let (rparts, incoming) = resp.into_parts();
    let mut r = Response::new(Body::new(Held {
        inner: incoming,
        _who: who,
    }));
    *r.status_mut() = rparts.status;
    copy_headers(&rparts.headers, r.headers_mut());
    Ok(r)
}

async fn exchange<IO>(io: IO, req: hyper::Request<Body>) -> hyper::Result<hyper::Response<Incoming>>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await?;
    // The connection is driven for as long as the response body is read;
    // it ends with it (one request per connection).
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "forwarded connection ended");
        }
    });
    tx.send_request(req).await
}

/// The owner's response body, holding the caller's place in its tenant's
/// count of requests in flight until it ends (as a local stream does).
struct Held {
    inner: Incoming,
    _who: Principal,
}

impl HttpBody for Held {
    type Data = hyper::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The TLS client configuration for nodes with `https://` URLs: the host's
/// trust store plus `node.ca_file`.
pub(crate) fn tls_client(
    ca: Option<&std::path::Path>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    if let Some(p) = ca {
        let bad = |e| {
            format!(
                "node.ca_file {}: {}",
                p.display(),
                crate::tls::pem_reason(e, "certificate")
            )
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(p)
            .map_err(bad)?
            .collect::<Result<_, _>>()
            .map_err(bad)?;
        if certs.is_empty() {
            return Err(format!(
                "node.ca_file {}: no certificate in it",
                p.display()
            ));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("node.ca_file {}: {e}", p.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn only_live_work_routes_are_passed_on() {
        let t = |m: Method, p: &str| match target(&m, p) {
            Some(Target::Execution(id)) => format!("ex {id}"),
            Some(Target::Session(id)) => format!("ss {id}"),
            Some(Target::Snapshot(id)) => format!("sn {id}"),
            Some(Target::NewSession) => "new".into(),
            None => "-".into(),
        };
        assert_eq!(t(Method::GET, "/v1/executions/ex_1/events"), "ex ex_1");
        assert_eq!(t(Method::POST, "/v1/executions/ex_1/cancel"), "ex ex_1");
        assert_eq!(t(Method::GET, "/v1/executions/ex_1"), "-");
        assert_eq!(t(Method::GET, "/v1/executions/ex_1/cancel"), "-");
        assert_eq!(t(Method::GET, "/v1/executions/ex_1/logs"), "-");
        assert_eq!(t(Method::PUT, "/v1/sessions/ss_1/files/a/b"), "ss ss_1");
        assert_eq!(t(Method::DELETE, "/v1/sessions/ss_1"), "ss ss_1");
        assert_eq!(t(Method::GET, "/v1/sessions"), "-");
        assert_eq!(t(Method::POST, "/v1/sessions"), "new");
        assert_eq!(t(Method::GET, "/v1/snapshots/sn_1/tar"), "sn sn_1");
        assert_eq!(t(Method::GET, "/v1/snapshots/sn_1"), "-");
        assert_eq!(t(Method::GET, "/v1/secrets/x"), "-");
        // Encoded as the router decodes it.
        assert_eq!(t(Method::GET, "/v1/executions/ex%5F1/events"), "ex ex_1");
        assert_eq!(t(Method::POST, "/v1/%73essions"), "new");
        assert_eq!(t(Method::GET, "/v1/executions/ex%FF/events"), "-");
    }

    #[test]
    fn only_a_well_formed_snapshot_id_routes_a_new_session() {
        let id = format!("sn_{}", "0".repeat(32));
        assert_eq!(
            from_snapshot(format!(r#"{{"from_snapshot":"{id}"}}"#).as_bytes()),
            Some(id)
        );
        assert_eq!(from_snapshot(br#"{"from_snapshot":"../x"}"#), None);
        assert_eq!(from_snapshot(br#"{"language":"python"}"#), None);
        assert_eq!(from_snapshot(&b"[".repeat(10_000)), None);
    }

    #[test]
    fn a_signature_covers_every_field_and_their_boundaries() {
        let k = [7u8; 32];
        let n = [1u8; 16];
        let base = mac(&k, "nd_a", "nd_b", "tn_t", "k1", 5, &n, "POST", "/p");
        let others = [
            mac(
                &[8u8; 32], "nd_a", "nd_b", "tn_t", "k1", 5, &n, "POST", "/p",
            ),
            mac(&k, "nd_c", "nd_b", "tn_t", "k1", 5, &n, "POST", "/p"),
            mac(&k, "nd_a", "nd_c", "tn_t", "k1", 5, &n, "POST", "/p"),
            mac(&k, "nd_a", "nd_b", "tn_u", "k1", 5, &n, "POST", "/p"),
            mac(&k, "nd_a", "nd_b", "tn_t", "k2", 5, &n, "POST", "/p"),
            mac(&k, "nd_a", "nd_b", "tn_t", "k1", 6, &n, "POST", "/p"),
            mac(
                &k, "nd_a", "nd_b", "tn_t", "k1", 5, &[2u8; 16], "POST", "/p",
            ),
            mac(&k, "nd_a", "nd_b", "tn_t", "k1", 5, &n, "GET", "/p"),
            mac(&k, "nd_a", "nd_b", "tn_t", "k1", 5, &n, "POST", "/q"),
            // The same bytes split elsewhere.
            mac(&k, "nd_a", "nd_b", "tn_t", "k1", 5, &n, "POS", "T/p"),
        ];
        for o in others {
            assert_ne!(o, base);
        }
        assert_eq!(
            base,
            mac(&k, "nd_a", "nd_b", "tn_t", "k1", 5, &n, "POST", "/p")
        );
    }

    #[test]
    fn a_nonce_is_taken_once() {
        let seen = Seen::default();
        assert!(seen.take([1; 16], 1000, 1000).unwrap());
        assert!(!seen.take([1; 16], 1000, 1001).unwrap());
        assert!(seen.take([2; 16], 1000, 1001).unwrap());
    }

    #[test]
    fn hex_is_read_exactly() {
        assert_eq!(hex_decode::<2>("0aff"), Some([0x0a, 0xff]));
        assert_eq!(hex(&[0x0a, 0xff]), "0aff");
        assert_eq!(hex_decode::<2>("0af"), None);
        assert_eq!(hex_decode::<2>("0afff"), None);
        assert_eq!(hex_decode::<2>("0agf"), None);
        assert_eq!(hex_decode::<2>("+a0f"), None);
    }

    #[test]
    fn connection_headers_stay_behind() {
        let mut from = HeaderMap::new();
        from.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        from.insert(header::CONNECTION, HeaderValue::from_static("close"));
        from.insert(header::HOST, HeaderValue::from_static("evil"));
        from.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        let mut to = HeaderMap::new();
        copy_headers(&from, &mut to);
        assert_eq!(to.len(), 1);
        assert!(to.contains_key(header::AUTHORIZATION));
    }
}
