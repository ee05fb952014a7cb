//! What the engine, init and the zygote share, so none of them imports
//! another's internals: the descriptor numbers and ids of a sandbox, what a
//! platform adds to one ([`Extras`]), how its first process was started,
//! and the program's argv and environment.
//!
//! Dependency direction: `engine` -> {`launch`, `init` (nothing but its
//! entry), `zygote`}; `zygote` -> {`launch`, `init::stage1_from`}; `init` ->
//! `launch`. No cycle.

use std::os::fd::{OwnedFd, RawFd};
use std::process::Child;
use std::sync::Arc;

use airlock_policy::Policy;

use crate::runtime::Runtime;

/// argv[1] that makes the airlock binary act as sandbox init.
pub const INIT_ARG: &str = "__airlock-init";
/// The uid the program runs as inside the sandbox.
pub const SANDBOX_UID: u32 = 1000;
/// The gid the program runs as inside the sandbox.
pub const SANDBOX_GID: u32 = 1000;
/// The control socket's descriptor number in init.
pub const CONTROL_FD: RawFd = 3;
/// Descriptor of the broker channel, when the engine gives one. The program
/// inherits it (and `AIRLOCK_BROKER_FD` names it); init never reads it.
pub const BROKER_FD: RawFd = 4;
/// Descriptor of the egress channel (a SOCK_SEQPACKET socketpair end), when
/// the policy allows egress. Only the forwarder holds it.
pub const EGRESS_FD: RawFd = 5;
/// Descriptor of the agent's binary as a microVM guest's init starts it
/// (closed by the agent first thing).
pub const AGENT_BINARY_FD: RawFd = 6;
/// Descriptor of `memory.events` of the cgroup a microVM guest's kernel
/// keeps around the sandbox, when the agent is told so: read after the
/// program ends (its `oom_kill`), never inherited by the program.
pub const MEMORY_EVENTS_FD: RawFd = 7;
/// Where the forwarder listens inside the sandbox (`HTTP_PROXY` points here).
pub const PROXY_PORT: u16 = 3128;

/// What a platform adds to a sandbox beyond its policy. Nothing here is
/// tenant-specific: identity, code and input arrive later.
#[derive(Debug, Clone, Default)]
pub struct Extras {
    /// Read-only files written into the sandbox's root: (absolute path
    /// inside, contents), e.g. the guest SDKs. Written, not bind-mounted,
    /// so no host path shows in the sandbox (its mount table names the
    /// source of every bind).
    pub files: Vec<(String, Arc<str>)>,
    /// Give the program a broker channel: one end of a socketpair at
    /// descriptor [`BROKER_FD`] (named by `AIRLOCK_BROKER_FD`); the other
    /// end is returned by [`Sandbox::take_broker`].
    pub broker: bool,
    /// Run this script (a path inside the sandbox) with the code file as its
    /// argument, instead of running the code file directly.
    pub entry: Option<String>,
    /// Extra environment for the program; names must start with `AIRLOCK_`
    /// (the policy's environment rules cannot be bypassed through here).
    pub env: Vec<(String, String)>,
    /// Give the sandbox an egress forwarder on 127.0.0.1 whose
    /// connections are handed to the host-side proxy over a socketpair
    /// (the other end is returned by [`Sandbox::take_egress`]). Required
    /// by, and only allowed with, `network.mode = "proxy"`.
    pub egress: bool,
    /// A session's workspace: a host directory (the root of a size- and
    /// inode-capped file system of its own, made by the platform) bound at
    /// /workspace instead of a fresh tmpfs, so what one execution leaves
    /// there the next one finds. The code file then goes to /tmp, never
    /// into the workspace. None: /workspace is private to the sandbox.
    pub workspace: Option<std::path::PathBuf>,
}

/// Where the code file of a job goes: the sandbox's own /workspace, or
/// /tmp when /workspace is a session's (the code is not the session's
/// data, and a second execution must not find the first one's file).
pub(crate) fn code_dir(session_workspace: bool) -> &'static str {
    if session_workspace {
        "/tmp"
    } else {
        "/workspace"
    }
}

/// Stage 1 of a sandbox's init: a child of the engine, or forked by a
/// zygote (then only a pidfd is held; the zygote reaps it).
#[derive(Debug)]
pub(crate) enum InitProc {
    Child(Child),
    Forked(OwnedFd),
}

/// A stage 1 started by a zygote or spawned by the engine, with the host
/// ends of its stdio and its host pid.
#[derive(Debug)]
pub(crate) struct Started {
    /// The process.
    pub init: InitProc,
    /// The program's stdin (write end).
    pub stdin: Option<std::fs::File>,
    /// The program's stdout (read end).
    pub stdout: Option<std::fs::File>,
    /// The program's stderr (read end).
    pub stderr: Option<std::fs::File>,
    /// Host pid of stage 1.
    pub pid: i32,
}

/// A program that is already loaded in the process init forks (the python
/// zygote's interpreter): it serves exactly one argv and environment, and
/// continues as the program instead of an execve.
pub(crate) trait Inherited {
    /// The argv and environment (`NAME=value`) it was started for.
    fn shape(&self) -> (&[String], &[String]);
    /// In the program process, with every layer and rlimit applied:
    /// becomes the program. Never returns.
    fn run_program(&self) -> !;
}

/// How the program process starts once every layer is applied.
#[derive(Clone, Copy)]
pub(crate) enum Launch<'a> {
    /// execve the job's argv (a freshly exec'd init).
    Exec,
    /// Continue in a program already loaded (the zygote's interpreter).
    Inherited(&'a dyn Inherited),
}

fn egress_env(policy: &Policy) -> Vec<(&'static str, String)> {
    if !policy.network.is_proxy() {
        return Vec::new();
    }
    let url = format!("http://127.0.0.1:{PROXY_PORT}");
    let mut v: Vec<(&'static str, String)> = [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ]
    .into_iter()
    .map(|k| (k, url.clone()))
    .collect();
    v.push(("NO_PROXY", "localhost,127.0.0.1,::1".into()));
    v.push(("no_proxy", "localhost,127.0.0.1,::1".into()));
    v
}

/// The program's argv and environment (`NAME=value`) for a job whose code
/// is `<code_dir>/<file_name>` (see [`code_dir`]).
pub(crate) fn program_argv_env(
    policy: &Policy,
    runtime: &Runtime,
    entry: Option<&str>,
    broker: bool,
    extra_env: &[(String, String)],
    code_dir: &str,
    file_name: &str,
) -> (Vec<String>, Vec<String>) {
    let mut argv = vec![runtime.interpreter.clone()];
    argv.extend(runtime.args.iter().cloned());
    if let Some(entry) = entry {
        argv.push(entry.to_string());
    }
    argv.push(format!("{code_dir}/{file_name}"));
    let env = policy
        .program_env()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .chain(broker.then(|| format!("AIRLOCK_BROKER_FD={BROKER_FD}")))
        .chain(extra_env.iter().map(|(k, v)| format!("{k}={v}")))
        .chain(
            egress_env(policy)
                .into_iter()
                .map(|(k, v)| format!("{k}={v}")),
        )
        .collect();
    (argv, env)
}

/// A plain basename: letters, digits, `.`, `_`, `-`; not hidden; at most 128 bytes.
pub fn safe_file_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && !n.starts_with('.')
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
