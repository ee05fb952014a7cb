//! The CLI's HTTP client of a running `airlock serve` (`run --server`,
//! `doctor --server`): plain HTTP, or HTTPS verified with rustls against the
//! system's CA store or the `--ca` file. One request per connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Where the server is.
#[derive(Debug, Clone)]
pub struct Target {
    /// HTTPS.
    pub tls: bool,
    /// Host name or address, as in the URL (brackets removed).
    pub host: String,
    /// `host:port` to connect to (and for the Host header).
    pub authority: String,
}

/// Parses `http://HOST[:PORT]` or `https://HOST[:PORT]` (no path, no
/// userinfo).
pub fn target(url: &str) -> Result<Target, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!(
            "{url}: expected http://HOST:PORT or https://HOST:PORT"
        ));
    };
    let hp = rest.trim_end_matches('/');
    if hp.is_empty() || hp.contains('/') || hp.contains('@') {
        return Err(format!("{url}: expected http(s)://HOST:PORT"));
    }
    let (host, port) = match hp.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
            Ok(_) => (h, p),
            Err(_) if h.starts_with('[') => (hp, if tls { "443" } else { "80" }),
            Err(_) => return Err(format!("{url}: bad port {p:?}")),
        },
        _ => (hp, if tls { "443" } else { "80" }),
    };
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok(Target {
        tls,
        host: bare,
        authority: format!("{host}:{port}"),
    })
}

/// A connection that reads and writes.
pub trait Conn: Read + Write {}
impl<T: Read + Write> Conn for T {}

fn tls_config(ca: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(p) => {
            let bad = |e| {
                format!(
                    "--ca {}: {}",
                    p.display(),
                    airlock_server::tls::pem_reason(e, "certificate")
                )
            };
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(p)
                .map_err(bad)?
                .collect::<Result<_, _>>()
                .map_err(bad)?;
            if certs.is_empty() {
                return Err(format!("--ca {}: no certificate in it", p.display()));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("--ca {}: {e}", p.display()))?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err("no CA certificates found on this system; pass --ca FILE".into());
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Connects (and for HTTPS completes the handshake, verifying the server's
/// certificate for `t.host`).
pub fn connect(t: &Target, ca: Option<&Path>, timeout: Duration) -> Result<Box<dyn Conn>, String> {
    if !t.tls && ca.is_some() {
        return Err("--ca applies to https:// servers".into());
    }
    // The local inputs first: a bad --ca is reported as such even when the
    // server is down.
    let tls = if t.tls {
        let name = rustls::pki_types::ServerName::try_from(t.host.clone())
            .map_err(|_| format!("{}: not a host name or address", t.host))?;
        Some((tls_config(ca)?, name))
    } else {
        None
    };
    let s = connect_tcp(&t.authority)?;
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let Some((config, name)) = tls else {
        return Ok(Box::new(s));
    };
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, s);
    // Handshake now, so a certificate problem is reported as such.
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| format!("TLS with {}: {e}", t.authority))?;
    }
    Ok(Box::new(tls))
}

/// How long connecting may take (per address the name resolves to).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the first address of `authority` that answers.
fn connect_tcp(authority: &str) -> Result<TcpStream, String> {
    use std::net::ToSocketAddrs;
    let addrs = authority
        .to_socket_addrs()
        .map_err(|e| format!("{authority}: {e}"))?;
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => format!("{authority}: {e}"),
        None => format!("{authority}: the name has no address"),
    })
}

/// Sends one request and reads the whole response (at most `max` bytes).
pub fn exchange(conn: &mut dyn Conn, request: &[u8], max: u64) -> std::io::Result<Vec<u8>> {
    conn.write_all(request)?;
    conn.flush()?;
    let mut raw = Vec::new();
    match conn.take(max).read_to_end(&mut raw) {
        Ok(_) => Ok(raw),
        // A TLS peer that closes without close_notify after a complete
        // response (Connection: close) is fine.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => Ok(raw),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = target("https://airlock.example:8443/").unwrap();
        assert!(t.tls && t.host == "airlock.example" && t.authority == "airlock.example:8443");
        let t = target("http://127.0.0.1:7070").unwrap();
        assert!(!t.tls && t.authority == "127.0.0.1:7070");
        let t = target("https://[::1]:9443").unwrap();
        assert_eq!(
            (t.host.as_str(), t.authority.as_str()),
            ("::1", "[::1]:9443")
        );
        assert_eq!(target("https://h").unwrap().authority, "h:443");
        for bad in [
            "ftp://x",
            "http://",
            "http://a/b",
            "http://u@h:1",
            "http://h:x",
        ] {
            assert!(target(bad).is_err(), "{bad}");
        }
    }
}
