//! HTTPS for the API: a PEM certificate chain and private key loaded into
//! rustls, reloaded on SIGHUP without dropping a connection.
//!
//! API keys travel in every request; on any address but loopback they must
//! not cross the network in clear. The server terminates TLS itself so a
//! single binary is enough; a reverse proxy in front stays possible.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Where the certificate and key are (`[tls]` in the config file, or
/// `--tls-cert`/`--tls-key`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file: the server's certificate first, then intermediates.
    pub cert: PathBuf,
    /// PEM file: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why the certificate or key could not be used. One line, naming the file
/// (operator input; never shown to tenants).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file did not read or parse, or holds none.
    #[error("TLS certificate {path}: {reason}")]
    Cert {
        /// The configured path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The key file did not read or parse.
    #[error("TLS key {path}: {reason}")]
    Key {
        /// The configured path.
        path: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the pair (the key does not match the certificate, an
    /// unsupported key type).
    #[error("TLS certificate {cert} with key {key}: {reason}")]
    Pair {
        /// The certificate path.
        cert: String,
        /// The key path.
        key: String,
        /// Why.
        reason: String,
    },
}

/// Reads the pair and builds a server configuration: TLS 1.2 and 1.3 with
/// rustls' safe defaults, HTTP/1.1 by ALPN, no client certificates.
pub fn load(cfg: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let cert_err = |reason: String| TlsError::Cert {
        path: cfg.cert.display().to_string(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
        .map_err(|e| cert_err(pem_reason(e, "certificate")))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(pem_reason(e, "certificate")))?;
    if chain.is_empty() {
        return Err(cert_err("no certificate in it".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key).map_err(|e| TlsError::Key {
        path: cfg.key.display().to_string(),
        reason: pem_reason(e, "private key"),
    })?;
    warn_if_readable(&cfg.key);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let pair_err = |reason: String| TlsError::Pair {
        cert: cfg.cert.display().to_string(),
        key: cfg.key.display().to_string(),
        reason,
    };
    let mut sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| pair_err(e.to_string()))?
        .with_no_client_auth()
        // Checks that the key belongs to the leaf certificate.
        .with_single_cert(chain, key)
        .map_err(|e| pair_err(e.to_string()))?;
    // The server speaks HTTP/1.1 only; a client offering h2 alone fails
    // the handshake instead of a confused exchange.
    sc.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(sc))
}

/// Why a PEM file did not yield `what`, in one readable line.
pub fn pem_reason(e: rustls::pki_types::pem::Error, what: &str) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(io) => io.to_string(),
        Error::NoItemsFound => format!("no {what} in it"),
        Error::MissingSectionEnd { end_marker } => format!(
            "not valid PEM: the {} section has no END line",
            String::from_utf8_lossy(&end_marker)
        ),
        Error::IllegalSectionStart { .. } => "not valid PEM: a malformed BEGIN line".into(),
        Error::Base64Decode(_) => "not valid PEM: bad base64 inside a section".into(),
        Error::SectionTooLarge => "not valid PEM: a section is too large".into(),
        _ => "not valid PEM".into(),
    }
}

/// A key others can read is a key others may have: said once per load, not
/// refused (a key in a secrets mount is often 0644 inside a container).
fn warn_if_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            key = %path.display(),
            mode = format_args!("{:o}", m.permissions().mode() & 0o777),
            "the TLS private key is readable by other users"
        );
    }
}

/// The acceptor in use; SIGHUP swaps in a fresh one. Connections already
/// open keep the configuration they started with.
pub struct Tls {
    cfg: TlsConfig,
    current: RwLock<TlsAcceptor>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads the pair: an error here stops the server from starting.
    pub fn new(cfg: TlsConfig) -> Result<Self, TlsError> {
        let sc = load(&cfg)?;
        Ok(Tls {
            cfg,
            current: RwLock::new(TlsAcceptor::from(sc)),
        })
    }

    /// The acceptor for the next connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reads the files again. On error the old pair stays in use: a
    /// renewal script that wrote half a file must not take the API down.
    pub fn reload(&self) -> Result<(), TlsError> {
        let sc = load(&self.cfg)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = TlsAcceptor::from(sc);
        Ok(())
    }
}
