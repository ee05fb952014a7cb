//! The guest SDKs and runners, embedded in the binary and written by init
//! into every sandbox's read-only root at `/opt/airlock`. They are files of
//! the sandbox, not a bind mount of a host directory: nothing in the
//! sandbox (its mount table, a zygote's memory) names a host path.

use std::sync::{Arc, OnceLock};

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

/// The guest files at their paths inside sandboxes (under
/// [`airlock_runtime::GUEST_MOUNT`]); the contents are shared, not copied.
pub fn files() -> Vec<(String, Arc<str>)> {
    static FILES_AT: OnceLock<Vec<(String, Arc<str>)>> = OnceLock::new();
    FILES_AT
        .get_or_init(|| {
            FILES
                .iter()
                .map(|(rel, text)| {
                    (
                        format!("{}/{rel}", airlock_runtime::GUEST_MOUNT),
                        Arc::from(*text),
                    )
                })
                .collect()
        })
        .clone()
}
