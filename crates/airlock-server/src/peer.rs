//! Requests about work another node runs, passed to that node.
//!
//! Any node answers any request for a tenant's data from the shared
//! database. What lives only on the node that runs it — an execution's live
//! event stream and its cancel switch, a session's workspace and the
//! sandboxes running in it — is reached through that node: this layer
//! authenticates the caller here, finds the owning node in the record, and
//! sends the request there as it came (the caller's own key, which the
//! owner checks again against the same database: no node trusts another
//! with a tenant's identity), streaming both ways. Marked with
//! `airlock-forwarded-by`, a request is never passed on a second time.
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

/// Set on a request one node passes to another (its value: the sender's
/// node id). A request carrying it is answered where it arrives.
pub const FORWARDED_BY: &str = "airlock-forwarded-by";

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
    if st.cfg.store.postgres_url().is_none() || req.headers().contains_key(FORWARDED_BY) {
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
    let Some(peer) = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
    else {
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
        .uri(path)
        .body(body)
        .map_err(|_| ApiError::Internal)?;
    copy_headers(&parts.headers, out.headers_mut());
    let h = out.headers_mut();
    h.insert(
        header::HOST,
        HeaderValue::from_str(&authority).map_err(|_| ApiError::NodeUnreachable)?,
    );
    h.insert(
        HeaderName::from_static(FORWARDED_BY),
        HeaderValue::from_str(&st.node.id).map_err(|_| ApiError::Internal)?,
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
