//! airlock-sandbox: the Linux process isolation backend.
//!
//! Owns: namespaces, the new root (pivot_root), Landlock, seccomp-BPF,
//! capabilities, cgroups v1/v2, rlimits, spawning, supervising, killing and
//! accounting one sandbox. This is the one crate where syscall-level
//! `unsafe` lives: raw calls in [`sys`] and [`kvm`]; [`init`] and [`engine`]
//! only call its documented unsafe fns (fork, fd adoption, the pre-exec hook).
//!
//! Must never: depend on tokio, a database or HTTP; run untrusted code before
//! every layer is applied; return host paths in tenant-facing messages
//! ([`SandboxError::public_message`]); fail open when a layer cannot be
//! applied (the only relaxation is Landlock's explicitly named
//! `best_effort_dangerous` mode, and missing cgroups when unprivileged, both
//! recorded in the result).
//!
//! Layer order (see [`init::Step`]): cgroup join (v1: stage 1 moves itself
//! in) → user+pid namespaces → id maps →
//! unprivileged ids → mount/net/ipc/uts namespaces → new root (read-only
//! runtime binds, generated /etc, minimal /dev, fresh masked /proc, capped
//! scratch) → pivot_root + detach → read-only root → hostname, loopback →
//! (v2: the engine has moved pid 1 into its cgroup) cgroup namespace →
//! setsid, close fds, non-dumpable, RLIMIT_CORE 0 → drop all capabilities →
//! no_new_privs → Landlock → seccomp → (job) → rlimits → optional execve
//! lock → exec.

pub mod agent;
pub mod cgroup;
pub mod engine;
pub mod error;
pub mod hosted;
pub mod init;
pub mod kvm;
pub mod launch;
pub mod proto;
pub mod relay;
pub mod result;
pub mod rootfs;
pub mod runtime;
pub mod seccomp;
pub mod sys;
pub mod vmchan;
pub mod vminit;
pub mod zygote;

pub use engine::{CancelToken, Engine, EngineConfig, Request, Sandbox, Stream, Teardown};
pub use error::SandboxError;
pub use launch::Extras;
pub use result::{Enforced, RunResult, TerminationReason};
pub use zygote::Zygote;
