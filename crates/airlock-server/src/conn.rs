//! Connections: what holds for a TCP connection before and around the
//! HTTP requests on it.
//!
//! - Every client address (IPv6: its /64) may hold at most
//!   `max_connections_per_client` connections, and the server at most
//!   `max_connections`; beyond either, the connection is answered with a
//!   problem document and closed, so one client cannot take every slot.
//!   The other nodes on a shared database ([`Peers`]) are bounded by the
//!   server's total only: one node's connections carry the requests of
//!   every client it passes on (event streams among them), which one
//!   client's share would cut off.
//! - [`Guarded`] wraps the socket: a write that makes no progress for
//!   [`WRITE_STALL`] fails (a client that never reads cannot hold its
//!   connection and the response's memory), and the HTTP library's own
//!   error responses (a malformed request line, duplicate `Content-Length`,
//!   oversized headers), which it writes with an empty body, leave as
//!   problem+json like every other error.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A write that cannot make progress for this long fails.
pub const WRITE_STALL: Duration = Duration::from_secs(30);

/// The key connections are counted under: the address, or for IPv6 its
/// /64 (one host usually holds a whole one).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// The addresses of the other active nodes (the IP literals of their
/// URLs, as they wrote them in the nodes table; refreshed after each
/// heartbeat). Exact addresses, not prefixes: only a node's own address is
/// exempt from the per-client share.
#[derive(Debug, Default)]
pub struct Peers(RwLock<HashSet<IpAddr>>);

impl Peers {
    /// Replaces the set.
    pub fn set(&self, ips: HashSet<IpAddr>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = ips;
    }

    /// Whether `ip` is another node's.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&ip)
    }
}

/// Open connections per client, bounded.
#[derive(Debug)]
pub struct ConnLimits {
    per_client: usize,
    total: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    peers: Arc<Peers>,
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The server holds `max_connections`.
    ServerFull,
    /// This client holds `max_connections_per_client`.
    ClientFull,
}

/// One admitted connection; released when dropped.
#[derive(Debug)]
pub struct ConnSlot {
    limits: Arc<ConnLimits>,
    /// The client it counts for; none for another node's.
    key: Option<IpAddr>,
}

impl ConnLimits {
    /// Limits for the whole server and per client (other than `peers`).
    pub fn new(total: usize, per_client: usize, peers: Arc<Peers>) -> Arc<Self> {
        Arc::new(ConnLimits {
            per_client,
            total,
            open: Mutex::new((0, HashMap::new())),
            peers,
        })
    }

    /// Admits a connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, Refused> {
        let key = client_key(ip);
        let mut g = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 >= self.total {
            return Err(Refused::ServerFull);
        }
        if self.peers.contains(ip) {
            g.0 += 1;
            return Ok(ConnSlot {
                limits: self.clone(),
                key: None,
            });
        }
        let n = g.1.entry(key).or_insert(0);
        if *n >= self.per_client {
            return Err(Refused::ClientFull);
        }
        *n += 1;
        g.0 += 1;
        Ok(ConnSlot {
            limits: self.clone(),
            key: Some(key),
        })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut g = self.limits.open.lock().unwrap_or_else(|p| p.into_inner());
        g.0 -= 1;
        if let Some(key) = self.key
            && let Some(n) = g.1.get_mut(&key)
        {
            *n -= 1;
            if *n == 0 {
                g.1.remove(&key);
            }
        }
    }
}

/// A complete HTTP/1.1 response carrying a problem document, for the places
/// that answer below the router (connection refusals, the HTTP library's
/// own errors). Always closes the connection.
pub fn problem_response(
    status: u16,
    reason: &str,
    code: &str,
    title: &str,
    detail: &str,
    retry_after: Option<u64>,
) -> Vec<u8> {
    let body = serde_json::json!({
        "type": format!("urn:airlock:problem:{code}"),
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    })
    .to_string();
    let retry = retry_after.map_or(String::new(), |s| format!("retry-after: {s}\r\n"));
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/problem+json\r\n\
         content-length: {}\r\n{retry}connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The problem document for one of the HTTP library's own error responses
/// (it writes them with an empty body): `None` for anything else. Ours
/// always carry `x-request-id`, which the library's never do.
fn library_error(head: &[u8]) -> Option<Vec<u8>> {
    // Cheap first: only 400, 414 and 431 heads are candidates.
    let status = head.strip_prefix(b"HTTP/1.1 4")?.get(..2)?;
    if !matches!(status, b"00" | b"14" | b"31") {
        return None;
    }
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = &head[..end];
    let ours = head
        .split(|b| *b == b'\n')
        .any(|l| l.len() >= 13 && l[..13].eq_ignore_ascii_case(b"x-request-id:"));
    if ours {
        return None;
    }
    let (status, reason, code, title, detail) = match status {
        b"00" => (
            400,
            "Bad Request",
            "malformed_request",
            "Malformed request",
            "the request is not valid HTTP/1.1 (request line, header syntax, or framing)",
        ),
        b"14" => (
            414,
            "URI Too Long",
            "uri_too_long",
            "URI too long",
            "the request target is too long",
        ),
        b"31" => (
            431,
            "Request Header Fields Too Large",
            "headers_too_large",
            "Request headers too large",
            "too many request headers, or too large",
        ),
        _ => return None,
    };
    Some(problem_response(status, reason, code, title, detail, None))
}

/// A connection's socket with a write-stall deadline, and the HTTP
/// library's bare error responses turned into problem documents.
#[derive(Debug)]
pub struct Guarded<T> {
    inner: T,
    /// A replacement response still to be written, and how much of it is.
    pending: Option<(Vec<u8>, usize)>,
    /// A replacement was made: the library closes the connection after its
    /// error response, so there is never a second one.
    replaced: bool,
    /// Armed while a write waits for the client.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Guarded<T> {
    /// Wraps a connected socket.
    pub fn new(inner: T) -> Self {
        Guarded {
            inner,
            pending: None,
            replaced: false,
            stall: None,
        }
    }
}

impl<T: AsyncWrite + Unpin> Guarded<T> {
    /// The problem document replacing `buf`, when `buf` is the library's
    /// own error response (at most once per connection).
    fn replacement(&mut self, buf: &[u8]) -> Option<Vec<u8>> {
        if self.replaced {
            return None;
        }
        let r = library_error(buf)?;
        self.replaced = true;
        Some(r)
    }

    /// Turns a pending write into an error once it has stalled too long.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let sleep = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_STALL)));
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped reading",
        ))
    }

    /// A write's outcome under the stall deadline: pending arms (or fires)
    /// it, anything else disarms it.
    fn timed(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Pending => self.stalled(cx).map(Err),
            done => {
                self.stall = None;
                done
            }
        }
    }

    fn write_timed(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.timed(cx, r)
    }

    /// Writes what is left of a replacement response.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((buf, at)) = self.pending.take() {
            match self.write_timed(cx, &buf[at..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) if at + n < buf.len() => self.pending = Some((buf, at + n)),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.pending = Some((buf, at));
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.drain(cx))?;
        if let Some(replacement) = self.replacement(buf) {
            // Taken whole; written by this and the next flush. The library
            // closes the connection after this response.
            self.pending = Some((replacement, 0));
            let _ = self.drain(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        self.write_timed(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.drain(cx))?;
        // A response head is always the start of a write.
        if let Some(first) = bufs.iter().find(|b| !b.is_empty())
            && let Some(replacement) = self.replacement(first)
        {
            self.pending = Some((replacement, 0));
            let _ = self.drain(cx)?;
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.timed(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_errors_become_problems_and_ours_pass() {
        let bare =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let p = library_error(bare).expect("rewritten");
        let text = String::from_utf8(p).unwrap();
        assert!(text.starts_with("HTTP/1.1 431 "));
        assert!(text.contains("content-type: application/problem+json\r\n"));
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["code"], "headers_too_large");
        assert!(text.contains(&format!("content-length: {}\r\n", body.len())));
        // Our own responses (x-request-id), other statuses, body bytes and
        // incomplete heads are left alone.
        assert!(library_error(b"HTTP/1.1 400 Bad Request\r\nX-Request-Id: r\r\n\r\n").is_none());
        assert!(library_error(b"HTTP/1.1 100 Continue\r\n\r\n").is_none());
        assert!(library_error(b"{\"a\":1}").is_none());
        assert!(library_error(b"HTTP/1.1 400 Bad Request\r\n").is_none());
    }

    #[test]
    fn connections_are_bounded_per_client_and_in_total() {
        let l = ConnLimits::new(3, 2, Arc::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let b2: IpAddr = "2001:db8::ffff".parse().unwrap();
        let s1 = l.admit(a).unwrap();
        let _s2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).unwrap_err(), Refused::ClientFull);
        let _s3 = l.admit(b).unwrap();
        assert_eq!(l.admit(b2).unwrap_err(), Refused::ServerFull);
        drop(s1);
        // The same /64 counts as one client.
        let _s4 = l.admit(b2).unwrap();
        assert_eq!(l.admit(a).unwrap_err(), Refused::ServerFull);
    }

    #[test]
    fn another_nodes_connections_count_only_toward_the_total() {
        let peers = Arc::new(Peers::default());
        let l = ConnLimits::new(4, 1, peers.clone());
        let node: IpAddr = "10.0.0.7".parse().unwrap();
        let beside: IpAddr = "10.0.0.8".parse().unwrap();
        // Positive control: before it is known as a node, one connection.
        let first = l.admit(node).unwrap();
        assert_eq!(l.admit(node).unwrap_err(), Refused::ClientFull);
        drop(first);
        peers.set(HashSet::from([node]));
        let held: Vec<ConnSlot> = (0..3).map(|_| l.admit(node).unwrap()).collect();
        // Its neighbour is a client like any other, and the total holds.
        let _c = l.admit(beside).unwrap();
        assert_eq!(l.admit(beside).unwrap_err(), Refused::ServerFull);
        assert_eq!(l.admit(node).unwrap_err(), Refused::ServerFull);
        drop(held);
        assert_eq!(l.admit(beside).unwrap_err(), Refused::ClientFull);
        // No longer a node: its share is one again.
        peers.set(HashSet::new());
        let _n = l.admit(node).unwrap();
        assert_eq!(l.admit(node).unwrap_err(), Refused::ClientFull);
    }
}
