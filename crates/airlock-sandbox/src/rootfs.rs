//! The filesystem view a sandbox gets beyond its runtime: what `/etc` holds.
//!
//! Data, not code: `rootfs.json` lists the files airlock generates (never
//! the host's), the host files bound read-only when the host has them
//! (public data programs expect: the loader cache, Debian's alternatives
//! links, the CA bundle, mime types), and the paths that are never there
//! (password hashes, the host's resolvers and hosts, private keys, the
//! machine id). Every entry carries its reason, and a test keeps the lists
//! honest. The same view is for every backend.
//!
//! The operator may add CA certificates ([`crate::EngineConfig::extra_ca`]):
//! then the bundle inside is the host's followed by the operator's, and the
//! operator's alone is at [`EXTRA_CA_PATH`] for runtimes that add to their
//! own store (node's `NODE_EXTRA_CA_CERTS`).

use std::sync::{Arc, OnceLock};

use serde::Deserialize;

use crate::proto::{RoFile, RoMount};

/// Where the CA bundle is inside every sandbox (Debian's path; python's
/// ssl, OpenSSL and curl look there, and the variables below point at it).
pub const CA_BUNDLE_PATH: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The operator's own CA certificates alone, when it added some.
pub const EXTRA_CA_PATH: &str = "/etc/ssl/certs/airlock-extra.crt";
/// Largest operator bundle accepted.
pub const MAX_EXTRA_CA_BYTES: usize = 1 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct View {
    #[cfg_attr(not(test), allow(dead_code))]
    comment: String,
    generated: Vec<Generated>,
    host: Vec<Entry>,
    never: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Generated {
    path: String,
    contents: String,
    // Read by the tests: every entry must say why it is there.
    #[cfg_attr(not(test), allow(dead_code))]
    comment: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    path: String,
    #[cfg_attr(not(test), allow(dead_code))]
    comment: String,
}

const VIEW_JSON: &str = include_str!("../rootfs.json");

fn view() -> &'static View {
    static VIEW: OnceLock<View> = OnceLock::new();
    // The data is part of the binary and checked by the tests below.
    #[allow(clippy::expect_used)]
    VIEW.get_or_init(|| serde_json::from_str(VIEW_JSON).expect("rootfs.json parses"))
}

fn under(path: &str, root: &str) -> bool {
    path == root || path.strip_prefix(root).is_some_and(|r| r.starts_with('/'))
}

/// Files of /proc replaced by /dev/null on every backend: kernel memory,
/// keyrings, timer and scheduler internals (address leaks), the magic
/// SysRq trigger.
pub const MASKED_PROC_FILES: [&str; 15] = [
    "kcore",
    "keys",
    "timer_list",
    "sched_debug",
    "sysrq-trigger",
    "latency_stats",
    "kallsyms",
    "kpagecount",
    "kpageflags",
    "kpagecgroup",
    "key-users",
    "slabinfo",
    "vmallocinfo",
    "pagetypeinfo",
    "iomem",
];

/// Directories of /proc replaced by an empty read-only tmpfs: hardware
/// interfaces.
pub const MASKED_PROC_DIRS: [&str; 4] = ["acpi", "scsi", "firmware", "asound"];

/// Directories of /proc left visible but read-only: kernel tunables.
pub const READ_ONLY_PROC_DIRS: [&str; 5] = ["sys", "sysvipc", "irq", "bus", "fs"];

/// The scratch filesystems (path, mode): private, size- and inode-capped
/// tmpfs, the only writable places.
pub const SCRATCH: [(&str, &str); 3] = [
    ("/tmp", "1777"),
    ("/workspace", "0755"),
    ("/dev/shm", "1777"),
];

/// Whether `path` is one of the paths a sandbox never holds (or lies under
/// one).
pub fn is_never(path: &str) -> bool {
    view().never.iter().any(|n| under(path, &n.path))
}

/// The operator's CA certificates, checked: PEM text with at least one
/// certificate and nothing but certificates, at most
/// [`MAX_EXTRA_CA_BYTES`].
pub fn check_extra_ca(pem: &str) -> Result<(), String> {
    if pem.len() > MAX_EXTRA_CA_BYTES {
        return Err(format!(
            "the CA bundle is larger than {MAX_EXTRA_CA_BYTES} bytes"
        ));
    }
    let mut certs = 0;
    let mut inside = false;
    for line in pem.lines().map(str::trim) {
        match line {
            "-----BEGIN CERTIFICATE-----" if !inside => inside = true,
            "-----END CERTIFICATE-----" if inside => {
                inside = false;
                certs += 1;
            }
            l if l.starts_with("-----") => {
                return Err(format!(
                    "the CA bundle holds something other than certificates ({})",
                    l.chars().take(40).collect::<String>()
                ));
            }
            _ => {}
        }
    }
    if inside || certs == 0 {
        return Err("the CA bundle holds no complete PEM certificate".into());
    }
    Ok(())
}

/// Reads and checks the operator's CA bundle file (the message names the
/// file: it is the operator's own input).
pub fn load_extra_ca(path: &std::path::Path) -> Result<Arc<str>, String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| {
            f.take(MAX_EXTRA_CA_BYTES as u64 + 1)
                .read_to_string(&mut text)
        })
        .map_err(|e| format!("CA bundle {}: {e}", path.display()))?;
    check_extra_ca(&text).map_err(|e| format!("CA bundle {}: {e}", path.display()))?;
    Ok(Arc::from(text))
}

/// `/etc` for one sandbox: files to write and host files to bind (only
/// those the host has). `ca` is the combined bundle and the operator's own
/// certificates, when the operator added some.
pub(crate) fn etc(ca: Option<&(Arc<str>, Arc<str>)>) -> (Vec<RoFile>, Vec<RoMount>) {
    let v = view();
    let mut files: Vec<RoFile> = v
        .generated
        .iter()
        .map(|g| RoFile {
            path: g.path.clone(),
            contents: g.contents.clone(),
        })
        .collect();
    let mut binds = Vec::new();
    for h in &v.host {
        if ca.is_some() && h.path == CA_BUNDLE_PATH {
            continue;
        }
        if std::fs::symlink_metadata(&h.path).is_ok() {
            binds.push(RoMount {
                host: h.path.clone(),
                target: h.path.clone(),
            });
        }
    }
    if let Some((combined, extra)) = ca {
        files.push(RoFile {
            path: CA_BUNDLE_PATH.into(),
            contents: combined.to_string(),
        });
        files.push(RoFile {
            path: EXTRA_CA_PATH.into(),
            contents: extra.to_string(),
        });
    }
    (files, binds)
}

/// The host files of /etc a sandbox sees (bound read-only), those that
/// exist here: what a microVM's root image must carry for the guest to
/// show the same /etc.
pub fn host_etc_paths() -> Vec<String> {
    etc(None).1.into_iter().map(|m| m.host).collect()
}

/// The host's CA bundle followed by the operator's certificates.
pub(crate) fn combine_ca(extra: &str) -> Arc<str> {
    let host = std::fs::read_to_string(CA_BUNDLE_PATH).unwrap_or_default();
    let mut out = host;
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(extra);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Arc::from(out)
}

/// The variables that point TLS clients at the bundle (set for every
/// program when the sandbox has one): OpenSSL and python's ssl
/// (`SSL_CERT_FILE`), requests and pip (`REQUESTS_CA_BUNDLE`, `PIP_CERT`),
/// curl (`CURL_CA_BUNDLE`), and node, which keeps its own store and adds
/// only the operator's certificates (`NODE_EXTRA_CA_CERTS`: the whole
/// bundle would cost every node start tens of milliseconds).
pub(crate) fn ca_env(bundle: Option<&str>, extra: Option<&str>) -> Vec<(&'static str, String)> {
    let mut env = Vec::new();
    if let Some(bundle) = bundle {
        for k in [
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
            "PIP_CERT",
            "CURL_CA_BUNDLE",
        ] {
            env.push((k, bundle.to_string()));
        }
    }
    if let Some(extra) = extra {
        env.push(("NODE_EXTRA_CA_CERTS", extra.to_string()));
    }
    env
}

/// Where an image root's sandbox finds the image's own CA bundle followed
/// by the operator's certificates (only when the operator added some: an
/// image otherwise keeps its own store untouched).
pub const IMAGE_CA_BUNDLE_PATH: &str = "/.airlock/ca-certificates.crt";
/// The operator's certificates alone, in an image root's sandbox.
pub const IMAGE_EXTRA_CA_PATH: &str = "/.airlock/extra-ca.crt";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_says_why_and_nothing_secret_is_bound() {
        let v = view();
        assert!(v.comment.len() > 40);
        for g in &v.generated {
            assert!(g.comment.len() > 10, "{}", g.path);
            assert!(g.path.starts_with("/etc/"), "{}", g.path);
            assert!(!is_never(&g.path), "{} is generated and never", g.path);
        }
        for h in v.host.iter().chain(&v.never) {
            assert!(h.comment.len() > 10, "{} has no reason", h.path);
            assert!(h.path.starts_with("/etc/"), "{}", h.path);
        }
        for h in &v.host {
            assert!(!is_never(&h.path), "{} is bound and never", h.path);
            assert!(
                !v.generated.iter().any(|g| g.path == h.path),
                "{} twice",
                h.path
            );
        }
        // The generated accounts are the sandbox's, never a host's.
        let passwd = &v
            .generated
            .iter()
            .find(|g| g.path == "/etc/passwd")
            .unwrap();
        assert_eq!(passwd.contents.lines().count(), 3);
        for must in [
            "/etc/shadow",
            "/etc/resolv.conf",
            "/etc/machine-id",
            "/etc/ssl/private/x",
        ] {
            assert!(is_never(must), "{must}");
        }
    }

    #[test]
    fn operator_bundles_are_checked() {
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        assert!(check_extra_ca(cert).is_ok());
        assert!(check_extra_ca("").is_err());
        assert!(check_extra_ca("-----BEGIN CERTIFICATE-----\nMIIB\n").is_err());
        let key = format!("{cert}-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n");
        assert!(
            check_extra_ca(&key)
                .unwrap_err()
                .contains("other than certificates")
        );
        let (files, _) = etc(Some(&(combine_ca(cert), Arc::from(cert))));
        let bundle = files.iter().find(|f| f.path == CA_BUNDLE_PATH).unwrap();
        assert!(bundle.contents.ends_with(cert));
        assert!(
            files
                .iter()
                .any(|f| f.path == EXTRA_CA_PATH && f.contents == cert)
        );
    }
}
