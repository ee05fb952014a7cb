//! Key material: the master key, the keys derived from it, envelope
//! encryption of secrets, API-key hashing and the audit-chain MAC.
//!
//! Layout (all keys 32 bytes, derived with BLAKE3's KDF mode from the master
//! key under fixed context strings, so one master key never serves two
//! purposes):
//! - the key-encryption key (KEK) wraps each tenant's random data key (DEK)
//!   with XChaCha20-Poly1305, the tenant id as associated data;
//! - each secret is sealed with its tenant's DEK, the tenant id, name and
//!   version as associated data (a ciphertext moved to another row, tenant
//!   or version fails to open);
//! - API keys are stored only as a BLAKE3 keyed hash under the API-key MAC
//!   key (a stolen database does not yield usable keys, and without the
//!   master key no hash can be precomputed);
//! - audit records are chained with a BLAKE3 keyed hash under the audit MAC
//!   key, so someone with write access to the database but not the master
//!   key cannot rebuild a valid chain after editing it.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

/// Errors of key handling. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The master key text is not 64 hex digits.
    #[error("master key must be 64 hexadecimal characters (32 bytes)")]
    MasterKeyFormat,
    /// Reading or writing the master key file failed.
    #[error("master key file: {0}")]
    MasterKeyFile(io::Error),
    /// The OS random source failed (fail closed: never fall back).
    #[error("random source unavailable")]
    Random,
    /// Authenticated decryption failed: wrong key, or the ciphertext or its
    /// associated data was tampered with.
    #[error("ciphertext failed authentication")]
    Open,
    /// Encryption failed (only on absurd lengths).
    #[error("encryption failed")]
    Seal,
}

const NONCE_LEN: usize = 24;

/// Fills `buf` from the OS CSPRNG.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(buf).map_err(|_| CryptoError::Random)
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(D[(b >> 4) as usize] as char);
        s.push(D[(b & 15) as usize] as char);
    }
    s
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks(2).enumerate() {
        let v = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        };
        out[i] = (v(pair[0])? << 4) | v(pair[1])?;
    }
    Some(out)
}

/// The root of all key material. Never stored in the database.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// Parses 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(s: &str) -> Result<Self, CryptoError> {
        unhex32(s.trim())
            .map(|k| MasterKey(Zeroizing::new(k)))
            .ok_or(CryptoError::MasterKeyFormat)
    }

    /// A fresh random key.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut k = Zeroizing::new([0u8; 32]);
        random_bytes(&mut k[..])?;
        Ok(MasterKey(k))
    }

    /// Reads a key file (64 hex digits). Refuses files other users can
    /// read: a world-readable master key is a leaked master key.
    pub fn from_file(path: &Path) -> Result<Self, CryptoError> {
        use std::os::unix::fs::MetadataExt;
        let mut f = std::fs::File::open(path).map_err(CryptoError::MasterKeyFile)?;
        let meta = f.metadata().map_err(CryptoError::MasterKeyFile)?;
        if meta.mode() & 0o077 != 0 {
            return Err(CryptoError::MasterKeyFile(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "master key file is accessible to group or others (chmod 600)",
            )));
        }
        let mut text = Zeroizing::new(String::new());
        Read::by_ref(&mut f)
            .take(256)
            .read_to_string(&mut text)
            .map_err(CryptoError::MasterKeyFile)?;
        Self::from_hex(&text)
    }

    /// Generates a key into `path` (mode 0600, never overwriting).
    pub fn generate_into(path: &Path) -> Result<Self, CryptoError> {
        let key = Self::generate()?;
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(CryptoError::MasterKeyFile)?;
        let text = Zeroizing::new(format!("{}\n", hex(&key.0[..])));
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(CryptoError::MasterKeyFile)?;
        Ok(key)
    }
}

/// Keys derived from the master key, one per purpose.
pub struct Keyring {
    kek: Zeroizing<[u8; 32]>,
    api_key_mac: Zeroizing<[u8; 32]>,
    audit_mac: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keyring(..)")
    }
}

/// A tenant's data key, unwrapped only for the duration of one operation.
pub struct DataKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

fn seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let cipher = XChaCha20Poly1305::new(key.into());
    let mut nonce = [0u8; NONCE_LEN];
    random_bytes(&mut nonce)?;
    let ct = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| CryptoError::Seal)?;
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

fn open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if sealed.len() < NONCE_LEN + 16 {
        return Err(CryptoError::Open);
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let cipher = XChaCha20Poly1305::new(key.into());
    cipher
        .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
        .map(Zeroizing::new)
        .map_err(|_| CryptoError::Open)
}

/// Associated data binding a secret's ciphertext to its row.
fn secret_aad(tenant_id: &str, name: &str, version: i64) -> Vec<u8> {
    let mut aad = Vec::new();
    for part in [tenant_id.as_bytes(), name.as_bytes()] {
        aad.extend_from_slice(&(part.len() as u64).to_le_bytes());
        aad.extend_from_slice(part);
    }
    aad.extend_from_slice(&version.to_le_bytes());
    aad
}

impl Keyring {
    /// The key the nodes on one database sign the requests they pass each
    /// other with: derived from the master key, which they all hold, and
    /// used for nothing else.
    pub fn node_request_key(master: &MasterKey) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(blake3::derive_key(
            "airlock v1 node-to-node requests",
            &master.0[..],
        ))
    }

    /// Derives every purpose key from `master`.
    pub fn new(master: &MasterKey) -> Self {
        let m = &master.0[..];
        Keyring {
            kek: Zeroizing::new(blake3::derive_key(
                "airlock v1 tenant key-encryption key",
                m,
            )),
            api_key_mac: Zeroizing::new(blake3::derive_key("airlock v1 api key hash", m)),
            audit_mac: Zeroizing::new(blake3::derive_key("airlock v1 audit chain", m)),
        }
    }

    /// A fresh data key for a new tenant, returned wrapped for storage.
    pub fn new_wrapped_dek(&self, tenant_id: &str) -> Result<Vec<u8>, CryptoError> {
        let mut dek = Zeroizing::new([0u8; 32]);
        random_bytes(&mut dek[..])?;
        seal(&self.kek, tenant_id.as_bytes(), &dek[..])
    }

    /// Unwraps a tenant's data key; fails if it was moved to another tenant.
    pub fn unwrap_dek(&self, tenant_id: &str, wrapped: &[u8]) -> Result<DataKey, CryptoError> {
        let raw = open(&self.kek, tenant_id.as_bytes(), wrapped)?;
        let arr: [u8; 32] = raw.as_slice().try_into().map_err(|_| CryptoError::Open)?;
        Ok(DataKey(Zeroizing::new(arr)))
    }

    /// Seals a secret value for one (tenant, name, version).
    pub fn seal_secret(
        dek: &DataKey,
        tenant_id: &str,
        name: &str,
        version: i64,
        value: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        seal(&dek.0, &secret_aad(tenant_id, name, version), value)
    }

    /// Opens a sealed secret value.
    pub fn open_secret(
        dek: &DataKey,
        tenant_id: &str,
        name: &str,
        version: i64,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        open(&dek.0, &secret_aad(tenant_id, name, version), sealed)
    }

    /// A value that identifies the master key without revealing it.
    pub fn key_check_value(&self) -> [u8; 32] {
        *blake3::keyed_hash(&self.kek, b"airlock v1 key check value").as_bytes()
    }

    /// Keyed hash of a whole API key.
    pub fn api_key_hash(&self, key: &str) -> [u8; 32] {
        *blake3::keyed_hash(&self.api_key_mac, key.as_bytes()).as_bytes()
    }

    /// The audit chain link: a keyed hash over the previous link and the
    /// record's canonical encoding.
    pub fn audit_hash(&self, prev: &[u8], encoded: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.audit_mac);
        h.update(&(prev.len() as u64).to_le_bytes());
        h.update(prev);
        h.update(encoded);
        *h.finalize().as_bytes()
    }
}

/// A new API key: `alk_<16 hex id>_<64 hex secret>` (32 random bytes of
/// secret). The id is public and names the key in listings and audit.
#[derive(Debug)]
pub struct NewApiKey {
    /// Public key id (16 hex digits).
    pub id: String,
    /// The whole key, shown once.
    pub key: Zeroizing<String>,
}

/// Generates a new API key.
pub fn generate_api_key() -> Result<NewApiKey, CryptoError> {
    let mut id = [0u8; 8];
    random_bytes(&mut id)?;
    let mut secret = Zeroizing::new([0u8; 32]);
    random_bytes(&mut secret[..])?;
    let id = hex(&id);
    let key = Zeroizing::new(format!("alk_{id}_{}", hex(&secret[..])));
    Ok(NewApiKey { id, key })
}

/// Splits a presented key into its id, or `None` when it is not exactly
/// the shape airlock issues (checked before any lookup).
pub fn parse_api_key(presented: &str) -> Option<&str> {
    let rest = presented.strip_prefix("alk_")?;
    let (id, secret) = rest.split_once('_')?;
    let is_hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (is_hex(id, 16) && is_hex(secret, 64)).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Keyring {
        Keyring::new(&MasterKey::from_hex(&"ab".repeat(32)).unwrap())
    }

    #[test]
    fn secret_roundtrip_and_binding() {
        let k = ring();
        let wrapped = k.new_wrapped_dek("t1").unwrap();
        let dek = k.unwrap_dek("t1", &wrapped).unwrap();
        assert!(
            k.unwrap_dek("t2", &wrapped).is_err(),
            "DEK bound to its tenant"
        );
        let sealed = Keyring::seal_secret(&dek, "t1", "db", 1, b"hunter2").unwrap();
        assert_eq!(
            &Keyring::open_secret(&dek, "t1", "db", 1, &sealed).unwrap()[..],
            b"hunter2"
        );
        assert!(Keyring::open_secret(&dek, "t1", "db2", 1, &sealed).is_err());
        assert!(Keyring::open_secret(&dek, "t1", "db", 2, &sealed).is_err());
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(Keyring::open_secret(&dek, "t1", "db", 1, &flipped).is_err());
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
    }

    #[test]
    fn api_keys_parse_strictly() {
        let k = generate_api_key().unwrap();
        assert_eq!(parse_api_key(&k.key), Some(k.id.as_str()));
        assert_eq!(parse_api_key(""), None);
        assert_eq!(parse_api_key("alk_"), None);
        assert_eq!(parse_api_key(&k.key.to_uppercase()), None);
        assert_eq!(parse_api_key(&format!("{}0", &*k.key)), None);
        let other = ring();
        let ring2 = Keyring::new(&MasterKey::generate().unwrap());
        assert_ne!(other.api_key_hash(&k.key), ring2.api_key_hash(&k.key));
    }

    #[test]
    fn master_key_parse() {
        assert!(MasterKey::from_hex("zz").is_err());
        assert!(MasterKey::from_hex(&"0".repeat(63)).is_err());
        assert!(MasterKey::from_hex(&format!(" {}\n", "0F".repeat(32))).is_ok());
    }
}
