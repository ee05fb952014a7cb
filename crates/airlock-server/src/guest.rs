//! The guest SDKs and runners, embedded in the binary and written at start
//! into a fresh root-owned, world-readable, read-only directory that every
//! sandbox sees read-only at `/opt/airlock`. (The data directory itself is
//! 0700 and must stay so; the sandbox's identity could not traverse it.)

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

const FILES: [(&str, &str); 4] = [
    (
        "python/airlock.py",
        include_str!("../../../guest/python/airlock.py"),
    ),
    (
        "python/runner.py",
        include_str!("../../../guest/python/runner.py"),
    ),
    (
        "javascript/airlock.js",
        include_str!("../../../guest/javascript/airlock.js"),
    ),
    (
        "javascript/runner.js",
        include_str!("../../../guest/javascript/runner.js"),
    ),
];

/// Writes the guest files; the directory is removed when the handle drops.
pub fn install() -> std::io::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("airlock-guest-")
        .tempdir()?;
    for (rel, text) in FILES {
        let path = dir.path().join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&path)?;
        f.write_all(text.as_bytes())?;
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}
