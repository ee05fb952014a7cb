//! airlock-egress: the one place where a sandbox's traffic may leave.
//!
//! Owns: the host-side proxy for one execution. The sandbox has no route
//! out; a forwarder inside it accepts TCP connections on 127.0.0.1 and
//! passes each one, as a descriptor, over the execution's egress channel.
//! Here each connection is read as an HTTP proxy request (CONNECT or an
//! absolute-form HTTP request) and decided on.
//!
//! Order of checks, all fail-closed: the host is normalised (IDNA, case,
//! trailing dot, every IPv4 spelling); it must match a port-scoped rule
//! *before* anything is resolved (a denied name is never looked up); IP
//! literals pass only when a rule names them; a name is resolved once, as
//! a fully qualified name (no search domains), and only public addresses
//! are used unless the rule allows private ones; the proxy connects to
//! exactly the address it checked (no second lookup, no rebinding). A
//! CONNECT tunnel's ClientHello must name the same host; an HTTP request is
//! forwarded alone with `Connection: close`, so a pipelined or kept-alive
//! second request is never forwarded unchecked.
//!
//! Must never: resolve a name no rule admits, connect anywhere but the
//! checked address, parse anything from the sandbox without a size bound,
//! or outlive its execution.

pub mod tls;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use airlock_policy::egress::{
    AddrClass, EgressRule, Host, classify, normalize_host, split_host_port,
};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A connection from the sandbox: a TCP connection its forwarder accepted
/// (handed over as a descriptor), or the host end of a socket pair the
/// forwarder relays one through (where descriptors cannot leave the
/// sandbox: gVisor).
pub trait Client: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Client for T {}

/// Largest request head read from the sandbox.
pub const MAX_HEAD: usize = 16 << 10;
/// Connections open at once per execution.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections open at once over all executions of this process (each
/// holds two descriptors).
pub const MAX_CONNECTIONS_TOTAL: usize = 1024;
static TOTAL: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_CONNECTIONS_TOTAL);
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const DNS_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Ports whose protocol is TLS from the first byte (HTTPS and its
/// alternate port, SMTPS, NNTPS, LDAPS, DNS over TLS, FTPS, TELNETS, IMAPS,
/// IRCS, POP3S, SIPS, IRC over TLS). A tunnel to one of them carries a TLS
/// ClientHello naming the CONNECT host first, and nothing else before it;
/// plain HTTP to one of them is refused (it would skip the name check).
pub const TLS_PORTS: [u16; 14] = [
    443, 465, 563, 636, 853, 989, 990, 992, 993, 994, 995, 5061, 6697, 8443,
];

/// Longest first line of a non-TLS tunnel that is waited for before it is
/// decided; HTTP servers refuse longer request lines too.
const MAX_FIRST_LINE: usize = 8 << 10;

/// One decision, for the audit log and the execution's egress log.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct EgressEvent {
    /// `allowed` or `denied`.
    #[cfg_attr(feature = "schema", schema(value_type = String, pattern = "^(allowed|denied)$"))]
    pub decision: &'static str,
    /// `CONNECT` or the HTTP method.
    pub method: String,
    /// Normalised host (or the raw one, bounded, when it did not parse).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Why it was denied.
    pub reason: Option<String>,
    /// The address connected to.
    pub address: Option<String>,
    /// Bytes from the sandbox to the destination.
    pub bytes_up: u64,
    /// Bytes from the destination to the sandbox.
    pub bytes_down: u64,
}

/// Receives every decision.
pub type Sink = Arc<dyn Fn(EgressEvent) + Send + Sync>;

/// Where names are resolved.
#[derive(Debug, Clone)]
pub enum Dns {
    /// The host's resolver configuration (/etc/resolv.conf).
    System,
    /// One nameserver (UDP and TCP), e.g. a test's own.
    Nameserver(SocketAddr),
}

/// A shared resolver.
pub type Resolver = hickory_resolver::TokioResolver;

/// Builds a resolver for `dns`.
pub fn resolver(dns: &Dns) -> std::io::Result<Resolver> {
    use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig};
    use hickory_resolver::name_server::TokioConnectionProvider;
    let mut b = match dns {
        Dns::System => {
            hickory_resolver::Resolver::builder_tokio().map_err(std::io::Error::other)?
        }
        Dns::Nameserver(addr) => hickory_resolver::Resolver::builder_with_config(
            ResolverConfig::from_parts(
                None,
                vec![],
                NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true),
            ),
            TokioConnectionProvider::default(),
        ),
    };
    let opts = b.options_mut();
    if matches!(dns, Dns::Nameserver(_)) {
        // A configured nameserver is the only source of answers.
        opts.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
    }
    // Every decision sees a fresh answer; a cached one could be stale
    // relative to what was checked, and caching across tenants leaks.
    opts.cache_size = 0;
    opts.attempts = 1;
    opts.timeout = DNS_TIMEOUT;
    Ok(b.build())
}

/// The proxy of one execution.
pub struct Proxy {
    rules: Vec<EgressRule>,
    resolver: Arc<Resolver>,
    sink: Sink,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("rules", &self.rules.len())
            .finish_non_exhaustive()
    }
}

/// An opened connection's event, emitted exactly once: when it ends, or
/// when it is dropped because its execution ended first (so nothing that
/// got through goes unrecorded).
struct Flow<'a> {
    proxy: &'a Proxy,
    ev: Option<EgressEvent>,
    up: std::sync::atomic::AtomicU64,
    down: std::sync::atomic::AtomicU64,
}

impl<'a> Flow<'a> {
    fn new(proxy: &'a Proxy, method: &str, host: &Host, port: u16, addr: SocketAddr) -> Self {
        Flow {
            proxy,
            ev: Some(EgressEvent {
                decision: "allowed",
                method: bounded(method, 16),
                host: host.to_string(),
                port,
                reason: Some("cut off when the execution ended".into()),
                address: Some(addr.to_string()),
                bytes_up: 0,
                bytes_down: 0,
            }),
            up: Default::default(),
            down: Default::default(),
        }
    }

    /// Ends the flow: allowed (`None`) or closed for a reason.
    fn finish(mut self, denied: Option<&str>) {
        if let Some(ev) = self.ev.as_mut() {
            ev.reason = denied.map(str::to_string);
            if denied.is_some() {
                ev.decision = "denied";
            }
        }
    }
}

impl Drop for Flow<'_> {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(mut ev) = self.ev.take() {
            ev.bytes_up = self.up.load(Relaxed);
            ev.bytes_down = self.down.load(Relaxed);
            self.proxy.emit(ev);
        }
    }
}

#[derive(Debug)]
struct Denied(String);

fn denied(s: impl Into<String>) -> Denied {
    Denied(s.into())
}

/// The request head, parsed.
struct Head {
    method: String,
    target: String,
    /// Header lines as they came (name, value).
    headers: Vec<(String, String)>,
    /// Bytes read past the head.
    rest: Vec<u8>,
}

impl Proxy {
    /// A proxy admitting `rules`.
    pub fn new(rules: Vec<EgressRule>, resolver: Arc<Resolver>, sink: Sink) -> Arc<Self> {
        Arc::new(Proxy {
            rules,
            resolver,
            sink,
        })
    }

    /// Serves the execution's egress channel until the sandbox closes it
    /// and its connections have ended, or until `stop` fires: then every
    /// open connection is cut and has emitted its event (an allowed flow
    /// reports when it ends) before this returns. Nothing that got through
    /// goes unrecorded.
    pub async fn serve_channel(
        self: Arc<Self>,
        channel: OwnedFd,
        stop: tokio::sync::oneshot::Receiver<()>,
    ) {
        // The channel is a SOCK_SEQPACKET socket, which tokio does not
        // drive; a blocking reader thread hands descriptors over. It ends
        // when the sandbox side closes (its last process is gone).
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Incoming>(8);
        tokio::task::spawn_blocking(move || {
            loop {
                let got = match recv_fd(&channel) {
                    Ok(Some((_, Some(fd)))) => Incoming::Accepted(fd),
                    // A relay request (one byte, no descriptor): a fresh
                    // socket pair, one end sent back into the sandbox for
                    // its forwarder to relay the connection through.
                    Ok(Some((RELAY_REQUEST, None))) => match relay_pair(&channel) {
                        Ok(host_end) => Incoming::Relayed(host_end),
                        Err(_) => return,
                    },
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => return,
                };
                if tx.blocking_send(got).is_err() {
                    return;
                }
            }
        });
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut conns = tokio::task::JoinSet::new();
        let mut stop = std::pin::pin!(stop);
        let mut open = true;
        loop {
            let fd = tokio::select! {
                fd = rx.recv(), if open => fd,
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                _ = &mut stop => {
                    // Cut every connection and wait until each task is gone
                    // (its flow's event is emitted as it drops).
                    conns.abort_all();
                    while conns.join_next().await.is_some() {}
                    return;
                }
            };
            let Some(incoming) = fd else {
                // Channel closed: open connections may finish (or be cut
                // by `stop`).
                open = false;
                if conns.is_empty() {
                    return;
                }
                continue;
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                continue; // over the limit: the connection is closed
            };
            let Ok(total) = TOTAL.try_acquire() else {
                continue;
            };
            let me = self.clone();
            match incoming {
                Incoming::Accepted(fd) => {
                    let Some(stream) = tcp_from(Some(fd)) else {
                        continue;
                    };
                    conns.spawn(async move {
                        me.handle(stream).await;
                        drop((permit, total));
                    });
                }
                Incoming::Relayed(host_end) => {
                    let Ok(stream) = tokio::net::UnixStream::from_std(host_end) else {
                        continue;
                    };
                    conns.spawn(async move {
                        me.handle(stream).await;
                        drop((permit, total));
                    });
                }
            }
        }
    }

    fn emit(&self, ev: EgressEvent) {
        (self.sink)(ev);
    }

    fn deny_event(&self, method: &str, host: &str, port: u16, why: &str) {
        self.emit(EgressEvent {
            decision: "denied",
            method: bounded(method, 16),
            host: bounded(host, 255),
            port,
            reason: Some(why.to_string()),
            address: None,
            bytes_up: 0,
            bytes_down: 0,
        });
    }

    /// Handles one connection from the sandbox.
    pub async fn handle<C: Client>(&self, mut client: C) {
        let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client)).await {
            Ok(Ok(h)) => h,
            Ok(Err(why)) => {
                let _ = respond(&mut client, 400, &why.0).await;
                self.deny_event("?", "?", 0, &why.0);
                return;
            }
            Err(_) => {
                self.deny_event("?", "?", 0, "request head not received in time");
                return;
            }
        };
        if head.method.eq_ignore_ascii_case("CONNECT") {
            self.connect(client, head).await;
        } else {
            self.forward(client, head).await;
        }
    }

    /// Decides on a destination: rule first, then (names only) one lookup
    /// and the address check. Returns the address to connect to.
    async fn decide(&self, host: &Host, port: u16) -> Result<SocketAddr, Denied> {
        let matching: Vec<&EgressRule> = self
            .rules
            .iter()
            .filter(|r| r.matches(host, port))
            .collect();
        if matching.is_empty() {
            return Err(denied("not in the allowlist"));
        }
        let private = matching.iter().any(|r| r.private);
        let usable = |c: AddrClass| match c {
            AddrClass::Public => true,
            AddrClass::Loopback
            | AddrClass::Private
            | AddrClass::LinkLocal
            | AddrClass::Cgnat
            | AddrClass::UniqueLocal => private,
            AddrClass::V4Embedded | AddrClass::Reserved => false,
        };
        let name = match host {
            // A rule names this literal; a non-public one only through
            // allow_private, and never a reserved or IPv4-embedding one.
            Host::Ip(a) => {
                return if usable(classify(*a)) {
                    Ok(SocketAddr::new(*a, port))
                } else {
                    Err(denied("address class not allowed by the rule"))
                };
            }
            Host::Name(n) => n,
        };
        // Fully qualified: no search-domain expansion.
        let lookup = tokio::time::timeout(DNS_TIMEOUT, self.resolver.lookup_ip(format!("{name}.")))
            .await
            .map_err(|_| denied("DNS lookup timed out"))?
            .map_err(|_| denied("DNS lookup failed"))?;
        let mut classes = Vec::new();
        for a in lookup.iter() {
            let c = classify(a);
            if usable(c) {
                return Ok(SocketAddr::new(a, port));
            }
            classes.push(c);
        }
        Err(if classes.is_empty() {
            denied("name has no address")
        } else {
            denied(format!(
                "name resolves to a forbidden address ({})",
                serde_json::to_string(&classes[0])
                    .unwrap_or_default()
                    .trim_matches('"')
            ))
        })
    }

    async fn connect<C: Client>(&self, mut client: C, head: Head) {
        let Some((raw_host, port)) = split_host_port(&head.target) else {
            let _ = respond(&mut client, 400, "CONNECT needs host:port").await;
            self.deny_event("CONNECT", &head.target, 0, "malformed CONNECT target");
            return;
        };
        let host = match normalize_host(raw_host) {
            Ok(h) => h,
            Err(e) => {
                let _ = respond(&mut client, 400, &e.to_string()).await;
                self.deny_event("CONNECT", raw_host, port, &e.to_string());
                return;
            }
        };
        let addr = match self.decide(&host, port).await {
            Ok(a) => a,
            Err(Denied(why)) => {
                let _ = respond(&mut client, 403, &why).await;
                self.deny_event("CONNECT", &host.to_string(), port, &why);
                return;
            }
        };
        let mut upstream =
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => s,
                _ => {
                    let _ = respond(&mut client, 502, "destination unreachable").await;
                    self.deny_event(
                        "CONNECT",
                        &host.to_string(),
                        port,
                        "destination unreachable",
                    );
                    return;
                }
            };
        if client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
        // The first bytes into the tunnel decide whether it stays open: a
        // TLS ClientHello must name the CONNECT host. The destination may
        // speak first (it is relayed meanwhile).
        let flow = Flow::new(self, "CONNECT", &host, port, addr);
        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut ur, mut uw) = upstream.split();
        let mut first = head.rest;
        let down = async {
            let n = copy(&mut ur, &mut cw, &flow.down).await;
            let _ = cw.shutdown().await;
            n
        };
        let up = async {
            // A TLS client speaks first, within the head timeout. On other
            // ports the destination may speak first (SSH, SMTP, MySQL): the
            // client's first bytes are waited for as long as the tunnel is
            // open, and decided on whenever they come, with the timeout
            // running from the first one.
            let tls_port = TLS_PORTS.contains(&port);
            let mut deadline = tls_port.then(|| tokio::time::Instant::now() + HEAD_TIMEOUT);
            let verdict = loop {
                if !first.is_empty()
                    && first[0] == 0x16
                    && first.len() < tls::first_record_len(&first)
                {
                    // The first record is still arriving: do not re-parse.
                } else if let Some(v) = match tls::client_hello(&first) {
                    tls::Hello::Incomplete if first.len() < tls::MAX_HELLO => None,
                    tls::Hello::Incomplete => Some(Err("ClientHello too large")),
                    // Not even a leading empty line: a TLS port's first
                    // byte starts a TLS record.
                    tls::Hello::NotTls if TLS_PORTS.contains(&port) => {
                        Some(Err("not TLS on a TLS port"))
                    }
                    // Plain HTTP must use the absolute form, where the Host
                    // is the checked one and one request is forwarded: in a
                    // tunnel, any Host on the same address would do.
                    tls::Hello::NotTls => match plain_http(&first) {
                        Some(true) => Some(Err(
                            "plain HTTP inside a CONNECT tunnel (use http:// through the proxy)",
                        )),
                        Some(false) => Some(Ok(())),
                        None if first.len() > MAX_FIRST_LINE => {
                            Some(Err("tunnel's first line too long to decide"))
                        }
                        None => None,
                    },
                    tls::Hello::Malformed => Some(Err("malformed ClientHello")),
                    tls::Hello::Encrypted => {
                        Some(Err("Encrypted Client Hello hides the server name"))
                    }
                    tls::Hello::Sni(None) if matches!(host, Host::Name(_)) => {
                        Some(Err("ClientHello without a server name"))
                    }
                    tls::Hello::Sni(None) => Some(Ok(())),
                    tls::Hello::Sni(Some(sni)) => Some(match normalize_host(&sni) {
                        Ok(h) if h == host => Ok(()),
                        _ => Err("ClientHello names another host (SNI mismatch)"),
                    }),
                } {
                    break v;
                }
                if first.len() >= tls::MAX_HELLO {
                    break Err("ClientHello too large");
                }
                let mut buf = [0u8; 4096];
                let read = match deadline {
                    Some(d) => tokio::time::timeout_at(d, cr.read(&mut buf)).await,
                    None => Ok(cr.read(&mut buf).await),
                };
                match read {
                    Ok(Ok(0)) => {
                        break if first.is_empty() {
                            Ok(())
                        } else {
                            Err("closed before its first bytes could be decided")
                        };
                    }
                    Ok(Ok(n)) => {
                        first.extend_from_slice(&buf[..n]);
                        deadline.get_or_insert_with(|| tokio::time::Instant::now() + HEAD_TIMEOUT);
                    }
                    Ok(Err(_)) => break Err("read failed"),
                    Err(_) => break Err("first bytes not decided in time"),
                }
            };
            verdict?;
            if uw.write_all(&first).await.is_err() {
                return Ok(0);
            }
            flow.up
                .fetch_add(first.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let n = copy(&mut cr, &mut uw, &flow.up).await;
            let _ = uw.shutdown().await;
            Ok(n)
        };
        // When the check fails, the whole tunnel is torn down at once.
        let up_res = {
            tokio::pin!(up);
            tokio::pin!(down);
            tokio::select! {
                u = &mut up => match u {
                    Err(why) => Err(why),
                    Ok(_) => {
                        down.await;
                        Ok(())
                    }
                },
                _ = &mut down => up.await.map(|_| ()),
            }
        };
        drop((cr, cw, ur, uw));
        flow.finish(up_res.err());
    }

    async fn forward<C: Client>(&self, mut client: C, head: Head) {
        let method = head.method.clone();
        let Some((raw_host, port, path)) = absolute_form(&head.target) else {
            // (refusals are all audited)
            let _ = respond(&mut client, 400, "use CONNECT, or an absolute http:// URL").await;
            self.deny_event(&method, "?", 0, "not an absolute http:// request");
            return;
        };
        let host = match normalize_host(raw_host) {
            Ok(h) => h,
            Err(e) => {
                let _ = respond(&mut client, 400, &e.to_string()).await;
                self.deny_event(&method, raw_host, port, &e.to_string());
                return;
            }
        };
        if TLS_PORTS.contains(&port) {
            // A TLS port: plain HTTP there would skip the server-name check.
            let _ = respond(&mut client, 403, "that port is TLS: use CONNECT").await;
            self.deny_event(&method, &host.to_string(), port, "plain HTTP to a TLS port");
            return;
        }
        // Request framing: one request, a Content-Length body at most.
        let mut length: Option<u64> = None;
        for (k, v) in &head.headers {
            if k.eq_ignore_ascii_case("transfer-encoding") {
                let _ = respond(&mut client, 501, "chunked request bodies are not supported").await;
                self.deny_event(
                    &method,
                    &host.to_string(),
                    port,
                    "transfer-encoding in request",
                );
                return;
            }
            if k.eq_ignore_ascii_case("content-length") {
                let v = v.trim();
                let n = match v.parse::<u64>() {
                    Ok(n)
                        if !v.is_empty()
                            && v.len() <= 19
                            && v.bytes().all(|b| b.is_ascii_digit()) =>
                    {
                        n
                    }
                    _ => {
                        let _ = respond(&mut client, 400, "bad Content-Length").await;
                        self.deny_event(&method, &host.to_string(), port, "bad content-length");
                        return;
                    }
                };
                if length.is_some_and(|l| l != n) {
                    let _ = respond(&mut client, 400, "conflicting Content-Length").await;
                    self.deny_event(
                        &method,
                        &host.to_string(),
                        port,
                        "conflicting content-length",
                    );
                    return;
                }
                length = Some(n);
            }
        }
        let addr = match self.decide(&host, port).await {
            Ok(a) => a,
            Err(Denied(why)) => {
                let _ = respond(&mut client, 403, &why).await;
                self.deny_event(&method, &host.to_string(), port, &why);
                return;
            }
        };
        let mut upstream =
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => s,
                _ => {
                    let _ = respond(&mut client, 502, "destination unreachable").await;
                    self.deny_event(&method, &host.to_string(), port, "destination unreachable");
                    return;
                }
            };
        let flow = Flow::new(self, &method, &host, port, addr);
        let authority = if port == 80 {
            host.to_string()
        } else {
            format!("{host}:{port}")
        };
        let mut out = format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\n");
        for (k, v) in &head.headers {
            let hop = [
                "host",
                "connection",
                "proxy-connection",
                "keep-alive",
                "proxy-authorization",
                "te",
                "upgrade",
            ]
            .iter()
            .any(|h| k.eq_ignore_ascii_case(h));
            if !hop {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        out.push_str("Connection: close\r\n\r\n");
        let body_len = length.unwrap_or(0);
        let mut up_n = out.len() as u64;
        if upstream.write_all(out.as_bytes()).await.is_err() {
            return;
        }
        // The body, exactly: bytes after it (a pipelined request) are
        // never forwarded.
        let have = (head.rest.len() as u64).min(body_len) as usize;
        if upstream.write_all(&head.rest[..have]).await.is_err() {
            return;
        }
        up_n += have as u64;
        let mut left = body_len - have as u64;
        let mut buf = vec![0u8; 16 << 10];
        while left > 0 {
            let want = (left as usize).min(buf.len());
            match client.read(&mut buf[..want]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if upstream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                    up_n += n as u64;
                }
            }
        }
        flow.up.store(up_n, std::sync::atomic::Ordering::Relaxed);
        copy(&mut upstream, &mut client, &flow.down).await;
        let _ = client.shutdown().await;
        flow.finish(None);
    }
}

/// HTTP methods (RFC 9110 and WebDAV) and HTTP/2's connection preface.
const METHODS: [&[u8]; 17] = [
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"PRI",
    b"PROPFIND",
    b"PROPPATCH",
    b"MKCOL",
    b"COPY",
    b"MOVE",
    b"LOCK",
    b"UNLOCK",
];

/// Whether the first bytes of a non-TLS tunnel are (the start of) an HTTP
/// request, as a lenient server would read them: `Some(true)` HTTP,
/// `Some(false)` certainly not, `None` not decidable yet (wait for more).
///
/// What makes plain HTTP in a tunnel dangerous is the `Host` header, which
/// needs an HTTP/1 request line: `METHOD target HTTP/1.x`. So, after
/// leading whitespace and control bytes (RFC 9112 lets servers ignore empty
/// lines before the request line; lenient ones skip more): an `HTTP/`
/// version anywhere in the first line, in any case and whatever separates
/// the words, is HTTP; a known method followed by whitespace is HTTP at once
/// (also HTTP/0.9 style); a first word with a byte no method token can
/// hold, or ended by a control byte that is not whitespace (binary
/// protocols), is not; a complete first line without a version is not.
fn plain_http(b: &[u8]) -> Option<bool> {
    let space = |c: &u8| matches!(c, b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c');
    let blank = |c: &u8| space(c) || c.is_ascii_control();
    let start = b.iter().position(|c| !blank(c))?;
    let b = &b[start..];
    let line_end = b.iter().position(|c| *c == b'\n');
    let line = &b[..line_end.unwrap_or(b.len())];
    if line.windows(5).any(|w| w.eq_ignore_ascii_case(b"HTTP/")) {
        return Some(true);
    }
    // RFC 9110 token characters.
    let tchar = |c: &u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(c);
    let Some(end) = line.iter().position(|c| !tchar(c)) else {
        // The first word is still arriving (or the line is only a word).
        return line_end.map(|_| false);
    };
    let (word, next) = (&line[..end], line[end]);
    if !space(&next) {
        return Some(false);
    }
    if METHODS.contains(&word) {
        return Some(true);
    }
    line_end.map(|_| false)
}

fn bounded(s: &str, n: usize) -> String {
    s.chars()
        .take(n)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// `http://host[:port][/path]` → (host, port, origin-form path).
fn absolute_form(target: &str) -> Option<(&str, u16, String)> {
    let scheme_end = target.find("://")?;
    if !target[..scheme_end].eq_ignore_ascii_case("http") {
        return None;
    }
    let rest = &target[scheme_end + 3..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.contains('@') || authority.is_empty() {
        return None; // userinfo: a classic allowlist confusion
    }
    let mut path = rest[end..].split('#').next().unwrap_or("").to_string();
    if path.is_empty() || path.starts_with('?') {
        path.insert(0, '/');
    }
    if let Some((h, p)) = split_host_port(authority) {
        return Some((h, p, path));
    }
    if authority.ends_with(':') {
        return None;
    }
    Some((authority, 80, path))
}

async fn read_head<C: Client>(client: &mut C) -> Result<Head, Denied> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let mut scanned = 0usize;
    let end = loop {
        let from = scanned.saturating_sub(3);
        if let Some(p) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            break from + p;
        }
        scanned = buf.len();
        if buf.len() >= MAX_HEAD {
            return Err(denied("request head too large"));
        }
        let n = client
            .read(&mut chunk[..(MAX_HEAD + 4 - buf.len()).min(4096)])
            .await
            .map_err(|_| denied("read failed"))?;
        if n == 0 {
            return Err(denied("connection closed before a request"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| denied("request head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(denied("malformed request line"));
    };
    if (version != "HTTP/1.1" && version != "HTTP/1.0")
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || target.is_empty()
        || !target.bytes().all(|b| (0x21..0x7f).contains(&b))
    {
        return Err(denied("malformed request line"));
    }
    let mut headers = Vec::new();
    for l in lines {
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| denied("malformed header"))?;
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if k.is_empty() || !k.bytes().all(token) {
            return Err(denied("malformed header"));
        }
        if v.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(denied("malformed header"));
        }
        headers.push((k.to_string(), v.trim().to_string()));
    }
    Ok(Head {
        method: method.to_string(),
        target: target.to_string(),
        headers,
        rest: buf[end + 4..].to_vec(),
    })
}

async fn respond<C: Client>(client: &mut C, status: u16, why: &str) -> std::io::Result<()> {
    let reason = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        501 => "Not Implemented",
        _ => "Bad Gateway",
    };
    let body = format!("airlock egress: {why}\n");
    let msg = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    client.write_all(msg.as_bytes()).await?;
    client.shutdown().await
}

async fn copy<R, W>(r: &mut R, w: &mut W, count: &std::sync::atomic::AtomicU64) -> u64
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return total,
            Ok(n) => {
                if w.write_all(&buf[..n]).await.is_err() {
                    return total;
                }
                total += n as u64;
                count.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// One descriptor from the channel: `Some` for a message, `None` at EOF.
/// The byte a forwarder sends, without a descriptor, to ask for a relay
/// socket (see [`Incoming::Relayed`]).
pub const RELAY_REQUEST: u8 = b'r';

/// What arrives on an egress channel.
enum Incoming {
    /// A connection the forwarder accepted, as its descriptor.
    Accepted(OwnedFd),
    /// The host end of a socket pair whose other end went back to the
    /// forwarder, which relays one accepted connection through it.
    Relayed(std::os::unix::net::UnixStream),
}

/// One message: its first byte and the first descriptor it carried (any
/// further one is closed). None at end of stream.
fn recv_fd(sock: &OwnedFd) -> std::io::Result<Option<(u8, Option<OwnedFd>)>> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let r = rustix::net::recvmsg(
        sock,
        &mut [std::io::IoSliceMut::new(&mut byte)],
        &mut cmsg,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    if r.bytes == 0 {
        return Ok(None);
    }
    let mut first = None;
    for m in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            for fd in fds {
                if first.is_none() {
                    first = Some(fd);
                }
                // Any further descriptor is dropped (closed) here.
            }
        }
    }
    Ok(Some((byte[0], first)))
}

/// Makes a socket pair, sends one end over `channel` and returns the
/// other (nonblocking, for the proxy).
fn relay_pair(channel: &OwnedFd) -> std::io::Result<std::os::unix::net::UnixStream> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    use std::os::fd::AsFd;
    let (host, sandbox) = std::os::unix::net::UnixStream::pair()?;
    let fds = [sandbox.as_fd()];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    if !cmsg.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other("control buffer"));
    }
    rustix::net::sendmsg(
        channel,
        &[std::io::IoSlice::new(&[RELAY_REQUEST])],
        &mut cmsg,
        SendFlags::NOSIGNAL,
    )?;
    drop(sandbox);
    host.set_nonblocking(true)?;
    Ok(host)
}

/// Accepts only what the forwarder may send: a connected TCP socket.
fn tcp_from(fd: Option<OwnedFd>) -> Option<TcpStream> {
    use rustix::net::{AddressFamily, SocketType, sockopt};
    let fd = fd?;
    if sockopt::socket_type(&fd).ok()? != SocketType::STREAM {
        return None;
    }
    let domain = sockopt::socket_domain(&fd).ok()?;
    if domain != AddressFamily::INET && domain != AddressFamily::INET6 {
        return None;
    }
    if sockopt::socket_acceptconn(&fd).ok()? {
        return None;
    }
    // Connected (a socket that was never connected has no peer).
    rustix::net::getpeername(&fd).ok()??;
    let std_stream = std::net::TcpStream::from(fd);
    std_stream.set_nonblocking(true).ok()?;
    TcpStream::from_std(std_stream).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_in_tunnels_is_recognised() {
        for http in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"CONNECT x:1 HTTP/1.1",
            b"GET ",
            b"\r\nGET / HTTP/1.1\r\nHost: other\r\n\r\n",
            b"\r\n\r\n \t GET /",
            b"get / http/1.1\r\n",
            b"FOO /x HTTP/1.0\r\n",
            b"PRI * HTTP/2.0\r\n",
            b"GET /\r\n",
            b"\x0bGET / HTTP/1.1\r\n",
            b"GET\x0c/\x0cHTTP/1.1",
            b"\x00\x00GET\t/x",
            b"X-whatever HTTP/1.1",
        ] {
            assert_eq!(
                plain_http(http),
                Some(true),
                "{:?}",
                String::from_utf8_lossy(http)
            );
        }
        // (TLS never gets here: a 0x16 first byte goes to the ClientHello
        // parser.)
        for other in [
            &b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"[..],
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f", // postgres SSLRequest
            b"\x00\x00\x00\x4f\x00\x03\x00\x00user\x00x\x00", // postgres startup
            b"*1\r\n$4\r\nPING\r\n",             // redis
            b"get some-key\r\n",                 // memcached
        ] {
            assert_eq!(
                plain_http(other),
                Some(false),
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
        // A split first write is waited for, never decided on its start.
        for partial in [
            &b""[..],
            b"\r",
            b"\r\n",
            b"G",
            b"GE",
            b"FOO /x",
            b"  ",
            b"\x01GET",
        ] {
            assert_eq!(
                plain_http(partial),
                None,
                "{:?}",
                String::from_utf8_lossy(partial)
            );
        }
    }

    #[test]
    fn absolute_forms() {
        assert_eq!(
            absolute_form("http://a.test/x?y"),
            Some(("a.test", 80, "/x?y".into()))
        );
        assert_eq!(
            absolute_form("HTTP://a.test:8080"),
            Some(("a.test", 8080, "/".into()))
        );
        assert_eq!(
            absolute_form("http://[::1]:81/"),
            Some(("[::1]", 81, "/".into()))
        );
        assert_eq!(
            absolute_form("http://a.test?q"),
            Some(("a.test", 80, "/?q".into()))
        );
        assert_eq!(absolute_form("https://a.test/"), None);
        assert_eq!(absolute_form("/relative"), None);
        assert_eq!(absolute_form("http://user@evil.test@a.test/"), None);
        assert_eq!(absolute_form("http://a.test:/"), None);
    }
}
