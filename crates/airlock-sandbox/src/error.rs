//! One error type for the sandbox crate: every isolation step has its own
//! variant so a failure says exactly which layer did not come up. Messages
//! name the step and the OS error, never a host path of the caller's; the
//! engine's `public_message` is what a tenant may see.

use std::io;

/// A failure to build, run or tear down a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The requested language's interpreter is not installed on this host.
    #[error("the {0} runtime is not installed on this host")]
    RuntimeMissing(&'static str),
    /// The init helper binary could not be started.
    #[error("starting the sandbox init process failed: {0}")]
    SpawnInit(io::Error),
    /// The control channel between engine and init failed or was violated.
    #[error("sandbox control channel: {0}")]
    Control(String),
    /// Writing the user namespace's uid/gid maps failed (without them the
    /// sandbox would run with an unmapped or host identity).
    #[error("writing user namespace id maps failed: {0}")]
    IdMap(io::Error),
    /// Creating or configuring the sandbox cgroup failed.
    #[error("cgroup setup failed at {step}: {source}")]
    Cgroup {
        /// Which cgroup step.
        step: &'static str,
        /// OS error.
        source: io::Error,
    },
    /// The sandbox reported that an isolation step failed inside it.
    #[error("isolation step {step} failed: {detail}")]
    Isolation {
        /// The step (matches [`crate::init::Step`] names).
        step: String,
        /// errno text.
        detail: String,
    },
    /// Compiling the seccomp policy failed (a bug in the embedded policy or a
    /// bad name in `syscalls.deny`).
    #[error("seccomp policy: {0}")]
    SeccompPolicy(String),
    /// I/O on the sandbox's stdio pipes or waiting for it failed.
    #[error("sandbox supervision failed: {0}")]
    Supervise(io::Error),
    /// The python zygote (a forking interpreter) is unavailable or failed.
    #[error("python zygote: {0}")]
    Zygote(String),
    /// The request was invalid (size caps etc.).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl SandboxError {
    /// A message safe to show to a tenant: names the failing layer, never a
    /// host path or internal detail.
    pub fn public_message(&self) -> String {
        match self {
            SandboxError::RuntimeMissing(lang) => format!("the {lang} runtime is not installed"),
            SandboxError::InvalidRequest(m) => format!("invalid request: {m}"),
            SandboxError::Isolation { step, .. } => format!("sandbox isolation step {step} failed"),
            SandboxError::SpawnInit(_) => "sandbox init could not start".into(),
            SandboxError::Control(_) => "sandbox control channel failed".into(),
            SandboxError::IdMap(_) => "sandbox user namespace setup failed".into(),
            SandboxError::Cgroup { step, .. } => format!("sandbox cgroup setup failed ({step})"),
            SandboxError::SeccompPolicy(_) => "sandbox seccomp policy invalid".into(),
            SandboxError::Supervise(_) => "sandbox supervision failed".into(),
            SandboxError::Zygote(_) => "sandbox init could not start".into(),
        }
    }
}
