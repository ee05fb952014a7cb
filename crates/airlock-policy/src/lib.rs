//! airlock-policy: the declarative policy that shapes one sandbox.
//!
//! Owns: the `Policy` type, its secure defaults (documented where they are
//! built), TOML loading with unknown fields rejected, and validation with
//! errors a person can act on.
//!
//! Must never: perform I/O beyond parsing a string it is handed, contain
//! `unsafe`, or let a policy grant more than the engine's baseline (a policy
//! can only tighten the seccomp baseline, never widen it).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub mod egress;

/// Languages airlock knows how to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// CPython 3 (`python3`).
    Python,
    /// Node.js (`node`).
    Javascript,
    /// POSIX shell (`sh`).
    Shell,
}

impl Language {
    /// All languages, in a stable order.
    pub const ALL: [Language; 3] = [Language::Python, Language::Javascript, Language::Shell];

    /// Parses a user-facing language name (`python`, `py`, `javascript`,
    /// `js`, `node`, `shell`, `sh`).
    pub fn parse(name: &str) -> Result<Self, PolicyError> {
        match name.to_ascii_lowercase().as_str() {
            "python" | "python3" | "py" => Ok(Language::Python),
            "javascript" | "js" | "node" => Ok(Language::Javascript),
            "shell" | "sh" => Ok(Language::Shell),
            _ => Err(PolicyError::UnknownLanguage(truncate_for_message(name))),
        }
    }

    /// Infers the language from a file name's extension.
    pub fn from_file_name(name: &str) -> Option<Self> {
        let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
        match ext.as_str() {
            "py" => Some(Language::Python),
            "js" | "mjs" | "cjs" => Some(Language::Javascript),
            "sh" => Some(Language::Shell),
            _ => None,
        }
    }

    /// The canonical lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Javascript => "javascript",
            Language::Shell => "shell",
        }
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The whole policy for one execution.
///
/// Every field has a secure default; a TOML file only needs to name what it
/// changes. Unknown fields anywhere are an error, so a typo never silently
/// falls back to a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Resource limits.
    pub limits: Limits,
    /// Filesystem view and scratch space.
    pub filesystem: Filesystem,
    /// Network access. Default: none at all.
    pub network: Network,
    /// System-call policy on top of the engine's baseline filter.
    pub syscalls: Syscalls,
    /// Environment variables the program sees.
    pub env: Env,
    /// How strictly the kernel's isolation features are required.
    pub isolation: Isolation,
}

/// Resource limits. Units are in the field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Wall-clock limit from program start to kill. Default 10 000 ms.
    pub wall_time_ms: u64,
    /// CPU time (user + system, all processes of the sandbox). Default 10 000 ms.
    pub cpu_time_ms: u64,
    /// Memory (RAM + tmpfs pages charged to the sandbox; swap is never
    /// allowed). Default 256 MiB.
    pub memory_mib: u64,
    /// Maximum number of tasks (processes + threads, including the two
    /// airlock init processes of the sandbox). Default 64.
    pub pids: u64,
    /// CPU bandwidth in cores (cgroup quota). Default 1.0.
    pub cpus: f64,
    /// Captured stdout cap; the sandbox is killed with `output_limit` beyond
    /// it. Default 1 MiB.
    pub stdout_bytes: u64,
    /// Captured stderr cap, same rule. Default 1 MiB.
    pub stderr_bytes: u64,
    /// Maximum size of stdin handed to the program. Default 8 MiB.
    pub stdin_bytes: u64,
    /// Maximum size of the submitted code. Default 1 MiB.
    pub code_bytes: u64,
    /// RLIMIT_NOFILE for the program. Default 256.
    pub open_files: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            wall_time_ms: 10_000,
            cpu_time_ms: 10_000,
            memory_mib: 256,
            pids: 64,
            cpus: 1.0,
            stdout_bytes: 1 << 20,
            stderr_bytes: 1 << 20,
            stdin_bytes: 8 << 20,
            code_bytes: 1 << 20,
            open_files: 256,
        }
    }
}

/// Memory (MiB) a sandbox's own two processes (stage 1 and pid 1) are
/// charged before the program starts, rounded up: measured at 64-320 KiB
/// on the process backend, so a code that leaves less than this free
/// cannot even be written.
pub const SANDBOX_OWN_MIB: u64 = 1;

/// The smallest `limits.memory_mib` any policy may have.
pub const MIN_MEMORY_MIB: u64 = 8;

impl Limits {
    /// The least `memory_mib` these limits can start a sandbox with: the
    /// code is written into `/workspace`, a scratch tmpfs whose pages are
    /// charged to the sandbox's memory, so the largest code accepted
    /// (`code_bytes`) and the sandbox's own processes must fit; never below
    /// [`MIN_MEMORY_MIB`].
    pub fn min_memory_mib(&self) -> u64 {
        (self.code_bytes.div_ceil(1 << 20) + SANDBOX_OWN_MIB).max(MIN_MEMORY_MIB)
    }
}

/// Ceilings on what a request may ask for in its limits (the operator's
/// `[ceilings]`). A request can lower any limit freely; raising one above
/// its ceiling is a denial. Units are in the field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitCeilings {
    /// Default 60 000 ms.
    pub wall_time_ms: u64,
    /// Default 60 000 ms.
    pub cpu_time_ms: u64,
    /// Default 1024 MiB.
    pub memory_mib: u64,
    /// Default 256 tasks.
    pub pids: u64,
    /// Default 2 cores.
    pub cpus: f64,
    /// Default 8 MiB.
    pub stdout_bytes: u64,
    /// Default 8 MiB.
    pub stderr_bytes: u64,
    /// Default 1024.
    pub open_files: u64,
}

impl Default for LimitCeilings {
    fn default() -> Self {
        LimitCeilings {
            wall_time_ms: 60_000,
            cpu_time_ms: 60_000,
            memory_mib: 1024,
            pids: 256,
            cpus: 2.0,
            stdout_bytes: 8 << 20,
            stderr_bytes: 8 << 20,
            open_files: 1024,
        }
    }
}

/// The limits a request asks for; unset ones keep the base policy's.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LimitsRequest {
    /// ms.
    pub wall_time_ms: Option<u64>,
    /// ms.
    pub cpu_time_ms: Option<u64>,
    /// MiB.
    pub memory_mib: Option<u64>,
    /// Tasks.
    pub pids: Option<u64>,
    /// Cores.
    pub cpus: Option<f64>,
    /// Bytes.
    pub stdout_bytes: Option<u64>,
    /// Bytes.
    pub stderr_bytes: Option<u64>,
    /// Files.
    pub open_files: Option<u64>,
}

/// A limit a request asked for above its ceiling.
#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    /// Dotted field name (`limits.memory_mib`).
    pub field: &'static str,
    /// What was asked.
    pub value: String,
    /// The ceiling.
    pub max: String,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} = {} exceeds the allowed maximum {}",
            self.field, self.value, self.max
        )
    }
}

impl Limits {
    /// The limits of a request against these (the base policy's): each one
    /// it sets replaces the base's if at most its ceiling; any above its
    /// ceiling (or not a number) is a denial, and nothing is granted then.
    /// Unset fields keep the base's. The result is never above a ceiling
    /// the request touched, nor different from the base where it did not.
    pub fn narrow(
        &self,
        want: &LimitsRequest,
        ceiling: &LimitCeilings,
    ) -> Result<Limits, Vec<Denial>> {
        let mut out = self.clone();
        let mut denied = Vec::new();
        let mut set = |field: &'static str, v: Option<u64>, max: u64, slot: &mut u64| {
            if let Some(v) = v {
                if v > max {
                    denied.push(Denial {
                        field,
                        value: v.to_string(),
                        max: max.to_string(),
                    });
                } else {
                    *slot = v;
                }
            }
        };
        let c = ceiling;
        set(
            "limits.wall_time_ms",
            want.wall_time_ms,
            c.wall_time_ms,
            &mut out.wall_time_ms,
        );
        set(
            "limits.cpu_time_ms",
            want.cpu_time_ms,
            c.cpu_time_ms,
            &mut out.cpu_time_ms,
        );
        set(
            "limits.memory_mib",
            want.memory_mib,
            c.memory_mib,
            &mut out.memory_mib,
        );
        set("limits.pids", want.pids, c.pids, &mut out.pids);
        set(
            "limits.stdout_bytes",
            want.stdout_bytes,
            c.stdout_bytes,
            &mut out.stdout_bytes,
        );
        set(
            "limits.stderr_bytes",
            want.stderr_bytes,
            c.stderr_bytes,
            &mut out.stderr_bytes,
        );
        set(
            "limits.open_files",
            want.open_files,
            c.open_files,
            &mut out.open_files,
        );
        if let Some(v) = want.cpus {
            if !v.is_finite() || v > c.cpus {
                denied.push(Denial {
                    field: "limits.cpus",
                    value: v.to_string(),
                    max: c.cpus.to_string(),
                });
            } else {
                out.cpus = v;
            }
        }
        if denied.is_empty() {
            Ok(out)
        } else {
            Err(denied)
        }
    }
}

impl Isolation {
    /// The stronger of this minimum and a request's: a request can raise
    /// the boundary its code runs behind, never lower it.
    pub fn require(&mut self, minimum: Option<IsolationLevel>) {
        self.minimum = self.minimum.max(minimum);
    }
}

/// Filesystem view. The root is always read-only and minimal; only scratch
/// (`/tmp`, `/workspace`, `/dev/shm`) is writable, each a private tmpfs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Filesystem {
    /// Size cap of each scratch tmpfs. Default 64 MiB.
    pub scratch_mib: u64,
    /// Inode cap of each scratch tmpfs. Default 4096.
    pub scratch_inodes: u64,
    /// Extra host paths exposed read-only at the same path. Default: none.
    /// Must be absolute, normalised (no `.`/`..`), and outside the paths the
    /// engine owns (`/proc`, `/dev`, `/tmp`, `/workspace`, `/etc`, `/`).
    pub read_only_paths: Vec<String>,
}

impl Default for Filesystem {
    fn default() -> Self {
        Filesystem {
            scratch_mib: 64,
            scratch_inodes: 4096,
            read_only_paths: Vec::new(),
        }
    }
}

/// Network access. The sandbox never gets a route: either no network at
/// all, or egress only through the host-side proxy, which admits the
/// listed `host:port` patterns and nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, tag = "mode", rename_all = "snake_case")]
pub enum Network {
    /// A private network namespace with only loopback. The default.
    #[default]
    None,
    /// Egress through the host-side proxy (`HTTP_PROXY`, `HTTPS_PROXY` and
    /// `ALL_PROXY` point at a forwarder on 127.0.0.1 inside the sandbox).
    Proxy {
        /// `host:port`, `*.suffix:port`, `1.2.3.4:port` or `[v6]:port`.
        /// Names may only resolve to public addresses.
        #[serde(default)]
        allow: Vec<String>,
        /// Like `allow`, and these names may also resolve to loopback,
        /// private, link-local, CGNAT or unique-local addresses.
        #[serde(default)]
        allow_private: Vec<String>,
    },
}

impl Network {
    /// Whether egress goes through the proxy. An empty allowlist is no
    /// network at all: no proxy, no forwarder in the sandbox.
    pub fn is_proxy(&self) -> bool {
        match self {
            Network::None => false,
            Network::Proxy {
                allow,
                allow_private,
            } => !(allow.is_empty() && allow_private.is_empty()),
        }
    }

    /// The parsed allowlist (empty for `none`).
    pub fn rules(&self) -> Result<Vec<egress::EgressRule>, PolicyError> {
        match self {
            Network::None => Ok(Vec::new()),
            Network::Proxy {
                allow,
                allow_private,
            } => {
                if allow.len() + allow_private.len() > ceilings::EGRESS_RULES {
                    return Err(PolicyError::Parse(format!(
                        "network: at most {} egress rules",
                        ceilings::EGRESS_RULES
                    )));
                }
                allow
                    .iter()
                    .map(|r| egress::parse_rule(r, false))
                    .chain(allow_private.iter().map(|r| egress::parse_rule(r, true)))
                    .collect::<Result<_, _>>()
                    .map_err(PolicyError::Parse)
            }
        }
    }
}

/// System-call policy. The engine's baseline filter (an allowlist with a
/// documented deny list, see `airlock-sandbox/seccomp/`) always applies; a
/// policy can only deny more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Syscalls {
    /// Deny `execve`/`execveat` after the interpreter has started, so the
    /// program cannot run other binaries. Default false.
    pub deny_execve: bool,
    /// Extra syscall names to deny with EPERM. Default: none.
    pub deny: Vec<String>,
}

/// Environment. The program starts with an empty environment plus the
/// documented baseline (`PATH`, `HOME`, `LANG`, `LC_ALL`, `TMPDIR`, `USER`,
/// `PYTHONDONTWRITEBYTECODE`, `PYTHONUNBUFFERED`) and whatever `vars` adds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Env {
    /// Extra variables. Names must be `[A-Za-z_][A-Za-z0-9_]*`; loader and
    /// interpreter-injection variables (`LD_*`, `PYTHONSTARTUP`,
    /// `NODE_OPTIONS`, ...) are refused.
    pub vars: BTreeMap<String, String>,
}

/// How strictly isolation is required: the boundary the code must be
/// behind, and what happens when a backend cannot enforce a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Isolation {
    /// Landlock enforcement mode.
    pub landlock: LandlockMode,
    /// The weakest isolation level the code may run behind. Default none:
    /// the cheapest backend the operator offers (every backend enforces
    /// the whole policy or refuses it; the level is about the boundary).
    pub minimum: Option<IsolationLevel>,
    /// What a backend does with a policy layer it cannot enforce. Default
    /// `refuse`: the execution does not start.
    pub missing_layers: MissingLayers,
}

/// The boundary between the code and the host, ordered weakest first: a
/// request for a level is met by that level or any stronger one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub enum IsolationLevel {
    /// Kernel namespaces, cgroups, seccomp and Landlock around the code,
    /// which talks to the host kernel directly (the process sandbox, OCI
    /// containers).
    Container,
    /// A user-space kernel (gVisor) between the code and the host kernel:
    /// the code's system calls are served by the sentry, not the host.
    Gvisor,
    /// Hardware virtualisation: the code runs on its own guest kernel.
    Microvm,
}

impl IsolationLevel {
    /// Every level, weakest first.
    pub const ALL: [IsolationLevel; 3] = [
        IsolationLevel::Container,
        IsolationLevel::Gvisor,
        IsolationLevel::Microvm,
    ];

    /// The name used in policies and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            IsolationLevel::Container => "container",
            IsolationLevel::Gvisor => "gvisor",
            IsolationLevel::Microvm => "microvm",
        }
    }

    /// Parses a level name.
    pub fn parse(name: &str) -> Result<Self, PolicyError> {
        Self::ALL
            .into_iter()
            .find(|l| l.as_str() == name)
            .ok_or_else(|| PolicyError::UnknownIsolation(name.chars().take(32).collect()))
    }
}

impl fmt::Display for IsolationLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a backend does with a policy layer it cannot enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MissingLayers {
    /// Refuse to run (strict mode). The default.
    #[default]
    Refuse,
    /// DANGEROUS: run without the layer and name it in the result's
    /// `enforced.missing_layers`.
    RecordDangerous,
}

/// Landlock enforcement mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LandlockMode {
    /// The pinned Landlock ABI must be fully enforced or the sandbox does not
    /// start. The default.
    #[default]
    Strict,
    /// DANGEROUS outside development: run with whatever Landlock the kernel
    /// offers, possibly none. The achieved status is recorded in the result.
    BestEffortDangerous,
}

/// Baseline environment variables, as (name, value).
pub const BASELINE_ENV: &[(&str, &str)] = &[
    ("PATH", "/usr/local/bin:/usr/bin:/bin"),
    ("HOME", "/workspace"),
    ("LANG", "C.UTF-8"),
    ("LC_ALL", "C.UTF-8"),
    ("TMPDIR", "/tmp"),
    ("USER", "sandbox"),
    ("PYTHONDONTWRITEBYTECODE", "1"),
    ("PYTHONUNBUFFERED", "1"),
];

/// Environment variable names (or prefixes ending in `*`) that can inject
/// code into a loader or interpreter; a policy may never set them.
const FORBIDDEN_ENV: &[&str] = &[
    "LD_*",
    "GCONV_PATH",
    "PYTHONSTARTUP",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONINSPECT",
    "PYTHONBREAKPOINT",
    "NODE_OPTIONS",
    "NODE_PATH",
    "NODE_REPL_EXTERNAL_MODULE",
    "BASH_ENV",
    "ENV",
    "IFS",
    "PATH",
    "HOME",
];

/// Hard ceilings: a policy beyond these is an operator mistake, not a wish.
pub mod ceilings {
    /// 24 hours.
    pub const WALL_TIME_MS: u64 = 24 * 3600 * 1000;
    /// 64 GiB.
    pub const MEMORY_MIB: u64 = 64 * 1024;
    /// Tasks per sandbox.
    pub const PIDS: u64 = 32_768;
    /// Cores.
    pub const CPUS: f64 = 256.0;
    /// Captured output per stream.
    pub const OUTPUT_BYTES: u64 = 256 << 20;
    /// stdin size.
    pub const STDIN_BYTES: u64 = 256 << 20;
    /// Code size.
    pub const CODE_BYTES: u64 = 64 << 20;
    /// Open files.
    pub const OPEN_FILES: u64 = 65_536;
    /// Scratch size.
    pub const SCRATCH_MIB: u64 = 64 * 1024;
    /// Scratch inodes.
    pub const SCRATCH_INODES: u64 = 1 << 24;
    /// Environment entries.
    pub const ENV_VARS: usize = 256;
    /// Bytes per environment value.
    pub const ENV_VALUE_BYTES: usize = 32 << 10;
    /// Extra read-only paths.
    pub const READ_ONLY_PATHS: usize = 64;
    /// Egress rules.
    pub const EGRESS_RULES: usize = 256;
}

/// Why a policy was rejected. Messages name the field and the allowed range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// The TOML did not parse or had unknown fields or wrong types.
    #[error("invalid policy: {0}")]
    Parse(String),
    /// A numeric field is outside its allowed range.
    #[error("invalid policy: {field} = {value} is out of range ({min}..={max})")]
    OutOfRange {
        /// Dotted field name.
        field: &'static str,
        /// Offending value.
        value: String,
        /// Lowest allowed.
        min: String,
        /// Highest allowed.
        max: String,
    },
    /// Fields each in range that together no sandbox can start with (the
    /// largest code accepted does not fit where it is written).
    #[error("invalid policy: {0}")]
    Unrunnable(String),
    /// A read-only path is not acceptable.
    #[error("invalid policy: filesystem.read_only_paths entry {path:?}: {reason}")]
    BadPath {
        /// The path as given (truncated).
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// An environment variable is not acceptable.
    #[error("invalid policy: env.vars entry {name:?}: {reason}")]
    BadEnv {
        /// The name as given (truncated).
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A syscall name in `syscalls.deny` is malformed.
    #[error("invalid policy: syscalls.deny entry {0:?} is not a syscall name")]
    BadSyscallName(String),
    /// Unknown language name.
    #[error("unknown language {0:?} (expected python, javascript or shell)")]
    UnknownLanguage(String),
    /// Unknown isolation level name.
    #[error("unknown isolation level {0:?} (expected container, gvisor or microvm)")]
    UnknownIsolation(String),
}

fn truncate_for_message(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// One line for a TOML error in `text`: the reason, the table it is in,
/// the line and column, and for an unknown key the nearest valid one
/// ("unknown field `max_concurent` at line 1, column 1; did you mean
/// `max_concurrent`?").
pub fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().replace('\n', " ");
    let msg = msg.trim();
    // serde's "unknown field `x`, expected one of `a`, `b`" (or "expected
    // `a` or `b`"): the reason first, the location, a suggestion, then
    // what was expected.
    let (reason, expected) = match msg.split_once(", expected ") {
        Some((r, x)) if r.starts_with("unknown field `") => (r.to_string(), Some(x)),
        _ => (msg.to_string(), None),
    };
    let mut out = reason.clone();
    if let Some(span) = e.span() {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        // The table the key sits in: the last header above it.
        let table = before
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('[') && l.ends_with(']'));
        if let Some(t) = table {
            out.push_str(&format!(" in {t}"));
        }
        out.push_str(&format!(" at line {line}, column {col}"));
    }
    if let Some(expected) = expected {
        let field = reason
            .trim_start_matches("unknown field `")
            .trim_end_matches('`');
        let valid: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        let near = valid
            .iter()
            .map(|v| (strsim::levenshtein(field, v), *v))
            .min()
            .filter(|(d, v)| *d <= (v.len() / 3).max(2))
            .map(|(_, v)| v)
            // `memory` for `memory_mib`: a key with the unit left off.
            .or_else(|| {
                valid
                    .iter()
                    .copied()
                    .find(|v| v.strip_prefix(field).is_some_and(|r| r.starts_with('_')))
            });
        if let Some(v) = near {
            out.push_str(&format!("; did you mean `{v}`?"));
        }
        out.push_str(&format!(" (expected {expected})"));
    }
    out
}

impl Policy {
    /// Parses a TOML policy. Unknown fields and wrong types are errors; the
    /// message is one line with the line and column of the problem.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let policy: Policy =
            toml::from_str(text).map_err(|e| PolicyError::Parse(describe_toml_error(text, &e)))?;
        policy.validate()?;
        Ok(policy)
    }

    /// Checks every field against its range and rules.
    pub fn validate(&self) -> Result<(), PolicyError> {
        self.network.rules()?;
        let l = &self.limits;
        range_u64(
            "limits.wall_time_ms",
            l.wall_time_ms,
            1,
            ceilings::WALL_TIME_MS,
        )?;
        range_u64(
            "limits.cpu_time_ms",
            l.cpu_time_ms,
            1,
            ceilings::WALL_TIME_MS,
        )?;
        range_u64(
            "limits.memory_mib",
            l.memory_mib,
            MIN_MEMORY_MIB,
            ceilings::MEMORY_MIB,
        )?;
        range_u64("limits.pids", l.pids, 1, ceilings::PIDS)?;
        if !(l.cpus.is_finite() && l.cpus >= 0.01 && l.cpus <= ceilings::CPUS) {
            return Err(PolicyError::OutOfRange {
                field: "limits.cpus",
                value: l.cpus.to_string(),
                min: "0.01".into(),
                max: ceilings::CPUS.to_string(),
            });
        }
        range_u64(
            "limits.stdout_bytes",
            l.stdout_bytes,
            0,
            ceilings::OUTPUT_BYTES,
        )?;
        range_u64(
            "limits.stderr_bytes",
            l.stderr_bytes,
            0,
            ceilings::OUTPUT_BYTES,
        )?;
        range_u64(
            "limits.stdin_bytes",
            l.stdin_bytes,
            0,
            ceilings::STDIN_BYTES,
        )?;
        range_u64("limits.code_bytes", l.code_bytes, 1, ceilings::CODE_BYTES)?;
        range_u64("limits.open_files", l.open_files, 16, ceilings::OPEN_FILES)?;
        let f = &self.filesystem;
        range_u64(
            "filesystem.scratch_mib",
            f.scratch_mib,
            1,
            ceilings::SCRATCH_MIB,
        )?;
        range_u64(
            "filesystem.scratch_inodes",
            f.scratch_inodes,
            16,
            ceilings::SCRATCH_INODES,
        )?;
        // The code is written into /workspace before the program starts:
        // a code_bytes it cannot hold would turn an accepted code into a
        // sandbox failure.
        if l.code_bytes > f.scratch_mib << 20 {
            return Err(PolicyError::Unrunnable(format!(
                "limits.code_bytes = {} does not fit in filesystem.scratch_mib = {} \
                 (the code is written into /workspace, a scratch tmpfs of that size)",
                l.code_bytes, f.scratch_mib
            )));
        }
        let memory = l.min_memory_mib();
        if l.memory_mib < memory {
            return Err(PolicyError::Unrunnable(format!(
                "limits.memory_mib = {} is below {memory}, the least that holds \
                 limits.code_bytes = {} (written into scratch, which is charged to the \
                 sandbox's memory) and the sandbox's own processes",
                l.memory_mib, l.code_bytes
            )));
        }
        if f.read_only_paths.len() > ceilings::READ_ONLY_PATHS {
            return Err(PolicyError::OutOfRange {
                field: "filesystem.read_only_paths",
                value: format!("{} entries", f.read_only_paths.len()),
                min: "0".into(),
                max: ceilings::READ_ONLY_PATHS.to_string(),
            });
        }
        for p in &f.read_only_paths {
            validate_ro_path(p)?;
        }
        for name in &self.syscalls.deny {
            let ok = !name.is_empty()
                && name.len() <= 32
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !ok {
                return Err(PolicyError::BadSyscallName(truncate_for_message(name)));
            }
        }
        if self.env.vars.len() > ceilings::ENV_VARS {
            return Err(PolicyError::OutOfRange {
                field: "env.vars",
                value: format!("{} entries", self.env.vars.len()),
                min: "0".into(),
                max: ceilings::ENV_VARS.to_string(),
            });
        }
        for (name, value) in &self.env.vars {
            validate_env(name, value)?;
        }
        Ok(())
    }

    /// The full environment the program starts with: baseline plus `vars`.
    pub fn program_env(&self) -> Vec<(String, String)> {
        let mut env: BTreeMap<String, String> = BASELINE_ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in &self.env.vars {
            env.insert(k.clone(), v.clone());
        }
        env.into_iter().collect()
    }
}

fn range_u64(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), PolicyError> {
    if value < min || value > max {
        return Err(PolicyError::OutOfRange {
            field,
            value: value.to_string(),
            min: min.to_string(),
            max: max.to_string(),
        });
    }
    Ok(())
}

/// Paths the engine builds itself; exposing a host path over them would
/// replace the minimal view with the host's.
const RESERVED_PATHS: &[&str] = &["/proc", "/dev", "/tmp", "/workspace", "/etc", "/sys"];

fn validate_ro_path(p: &str) -> Result<(), PolicyError> {
    let bad = |reason| {
        Err(PolicyError::BadPath {
            path: truncate_for_message(p),
            reason,
        })
    };
    if p.len() > 4096 || p.contains('\0') {
        return bad("too long or contains NUL");
    }
    if !p.starts_with('/') {
        return bad("must be absolute");
    }
    if p == "/" {
        return bad("the host root cannot be exposed");
    }
    if p.ends_with('/') || p.contains("//") {
        return bad("must be normalised (no trailing or double slash)");
    }
    if p.split('/').any(|c| c == "." || c == "..") {
        return bad("must not contain . or .. components");
    }
    for r in RESERVED_PATHS {
        if p == *r || p.starts_with(&format!("{r}/")) {
            return bad("lies under a path the sandbox builds itself");
        }
    }
    Ok(())
}

fn validate_env(name: &str, value: &str) -> Result<(), PolicyError> {
    let bad = |reason| {
        Err(PolicyError::BadEnv {
            name: truncate_for_message(name),
            reason,
        })
    };
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') || name.len() > 128 {
        return bad("name must match [A-Za-z_][A-Za-z0-9_]{0,127}");
    }
    for f in FORBIDDEN_ENV {
        let hit = match f.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == *f,
        };
        if hit {
            return bad("this variable can inject code or override the sandbox layout");
        }
    }
    if value.len() > ceilings::ENV_VALUE_BYTES || value.contains('\0') {
        return bad("value too long or contains NUL");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_mistyped_key_is_named_with_its_table_line_and_nearest_valid_key() {
        let text = "[limits]\nwall_time_ms = 5\nmemory = 3\n";
        let e = Policy::from_toml(text).unwrap_err().to_string();
        assert!(
            e.contains(
                "unknown field `memory` in [limits] at line 3, column 1; did you mean `memory_mib`?"
            ),
            "{e}"
        );
        let e = Policy::from_toml("[filesystem]\nscratch_mb = 4\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "`scratch_mb` in [filesystem] at line 2, column 1; did you mean `scratch_mib`?"
            ),
            "{e}"
        );
        let e = Policy::from_toml("[limtis]\n").unwrap_err().to_string();
        assert!(e.contains("did you mean `limits`?"), "{e}");
        // Nothing near: no suggestion, still the key, place and expected list.
        let e = Policy::from_toml("zzzzzzzz = 1\n").unwrap_err().to_string();
        assert!(
            !e.contains("did you mean") && e.contains("`zzzzzzzz` at line 1"),
            "{e}"
        );
        assert!(e.contains("(expected one of `limits`"), "{e}");
    }

    use super::*;

    #[test]
    fn defaults_are_valid_and_secure() {
        let p = Policy::default();
        p.validate().unwrap();
        assert_eq!(p.network, Network::None);
        assert_eq!(p.isolation.landlock, LandlockMode::Strict);
        assert!(!p.syscalls.deny_execve);
        assert!(p.filesystem.read_only_paths.is_empty());
    }

    #[test]
    fn empty_toml_is_the_default() {
        assert_eq!(Policy::from_toml("").unwrap(), Policy::default());
    }

    #[test]
    fn unknown_field_is_rejected_with_location() {
        let err = Policy::from_toml("[limits]\nwall_time_ms = 5\nmemroy_mib = 3\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("memroy_mib"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn unknown_section_is_rejected() {
        assert!(Policy::from_toml("[egress]\nallow = []\n").is_err());
    }

    #[test]
    fn wrong_type_is_rejected() {
        let err = Policy::from_toml("[limits]\npids = \"many\"\n").unwrap_err();
        assert!(matches!(err, PolicyError::Parse(_)));
    }

    #[test]
    fn out_of_range_names_field() {
        let err = Policy::from_toml("[limits]\nmemory_mib = 1\n").unwrap_err();
        assert_eq!(
            err,
            PolicyError::OutOfRange {
                field: "limits.memory_mib",
                value: "1".into(),
                min: "8".into(),
                max: ceilings::MEMORY_MIB.to_string()
            }
        );
        assert!(Policy::from_toml("[limits]\ncpus = nan\n").is_err());
        assert!(Policy::from_toml("[limits]\ncpus = -1.0\n").is_err());
        assert!(Policy::from_toml("[limits]\nwall_time_ms = 0\n").is_err());
    }

    /// The largest code a policy accepts must fit where it is written:
    /// /workspace's scratch tmpfs, whose pages the sandbox's memory pays
    /// for besides its own processes. At the boundary it is accepted.
    #[test]
    fn the_largest_code_accepted_fits_in_scratch_and_memory() {
        let mib = 1u64 << 20;
        let policy = |code: u64, scratch: u64, memory: u64| {
            format!(
                "[limits]\ncode_bytes = {code}\nmemory_mib = {memory}\n\
                 [filesystem]\nscratch_mib = {scratch}\n"
            )
        };
        let err = Policy::from_toml(&policy(mib + 1, 1, 64)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid policy: limits.code_bytes = 1048577 does not fit in filesystem.scratch_mib = 1 \
             (the code is written into /workspace, a scratch tmpfs of that size)"
        );
        Policy::from_toml(&policy(mib, 1, 64)).unwrap();
        // 7 MiB of code and 1 MiB for the sandbox's own processes: 8.
        let err = Policy::from_toml(&policy(7 * mib + 1, 64, 8)).unwrap_err();
        assert!(matches!(err, PolicyError::Unrunnable(_)), "{err}");
        assert!(
            err.to_string().contains(
                "limits.memory_mib = 8 is below 9, the least that holds limits.code_bytes = 7340033"
            ),
            "{err}"
        );
        Policy::from_toml(&policy(7 * mib, 64, 8)).unwrap();
        Policy::from_toml(&policy(7 * mib + 1, 64, 9)).unwrap();
        // Never below the range's own minimum, whatever the code.
        let tiny = Limits {
            code_bytes: 1,
            ..Limits::default()
        };
        assert_eq!(tiny.min_memory_mib(), MIN_MEMORY_MIB);
        assert_eq!(Limits::default().min_memory_mib(), MIN_MEMORY_MIB);
        Policy::default().validate().unwrap();
    }

    #[test]
    fn network_modes() {
        assert_eq!(
            Policy::from_toml("[network]\nmode = \"none\"\n")
                .unwrap()
                .network,
            Network::None
        );
        assert!(Policy::from_toml("[network]\nmode = \"host\"\n").is_err());
    }

    #[test]
    fn landlock_mode_names_the_danger() {
        let p = Policy::from_toml("[isolation]\nlandlock = \"best_effort_dangerous\"\n").unwrap();
        assert_eq!(p.isolation.landlock, LandlockMode::BestEffortDangerous);
        assert!(Policy::from_toml("[isolation]\nlandlock = \"off\"\n").is_err());
    }

    #[test]
    fn hostile_read_only_paths_are_rejected() {
        for p in [
            "relative",
            "/",
            "/proc",
            "/proc/1",
            "/etc",
            "/usr/../etc",
            "/a//b",
            "/a/",
            "/tmp/x",
            "/a\0b",
        ] {
            let text = format!("[filesystem]\nread_only_paths = [{p:?}]\n");
            assert!(Policy::from_toml(&text).is_err(), "{p:?} accepted");
        }
        Policy::from_toml("[filesystem]\nread_only_paths = [\"/opt/data\"]\n").unwrap();
    }

    #[test]
    fn injection_env_vars_are_rejected() {
        for name in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "NODE_OPTIONS",
            "PYTHONSTARTUP",
            "PATH",
            "1X",
            "A-B",
            "",
        ] {
            let mut p = Policy::default();
            p.env.vars.insert(name.into(), "x".into());
            assert!(p.validate().is_err(), "{name:?} accepted");
        }
        let mut p = Policy::default();
        p.env.vars.insert("GREETING".into(), "hi".into());
        p.validate().unwrap();
        assert!(p.program_env().contains(&("GREETING".into(), "hi".into())));
        assert!(p.program_env().iter().any(|(k, _)| k == "PATH"));
    }

    #[test]
    fn syscall_names_are_checked() {
        assert!(Policy::from_toml("[syscalls]\ndeny = [\"../x\"]\n").is_err());
        Policy::from_toml("[syscalls]\ndeny = [\"getpid\"]\ndeny_execve = true\n").unwrap();
    }

    #[test]
    fn language_detection() {
        assert_eq!(Language::from_file_name("a/b.py"), Some(Language::Python));
        assert_eq!(
            Language::from_file_name("x.mjs"),
            Some(Language::Javascript)
        );
        assert_eq!(Language::from_file_name("run.sh"), Some(Language::Shell));
        assert_eq!(Language::from_file_name("README"), None);
        assert!(Language::parse("cobol").is_err());
        assert_eq!(Language::parse("JS").unwrap(), Language::Javascript);
    }

    /// A wildcard or an empty entry in a deny list is an error, never an
    /// allow (nor a silent no-op).
    #[test]
    fn a_wildcard_or_empty_deny_rule_is_a_validation_error() {
        for bad in ["", "*", "get*", " ", "ptrace,", "ptrace*"] {
            let text = format!("[syscalls]\ndeny = [{bad:?}]\n");
            assert!(
                matches!(
                    Policy::from_toml(&text),
                    Err(PolicyError::BadSyscallName(_))
                ),
                "{bad:?} accepted"
            );
        }
        Policy::from_toml("[syscalls]\ndeny = [\"ptrace\"]\n").unwrap();
    }

    mod merge {
        use proptest::prelude::*;

        use super::super::*;

        fn opt(max: u64) -> impl Strategy<Value = Option<u64>> {
            proptest::option::of(0..=max)
        }

        fn request() -> impl Strategy<Value = LimitsRequest> {
            (
                (opt(200_000), opt(200_000), opt(4096), opt(2048)),
                (
                    proptest::option::of(0.0f64..8.0),
                    opt(32 << 20),
                    opt(32 << 20),
                    opt(4096),
                ),
            )
                .prop_map(|((w, c, m, p), (cpus, o, e, f))| LimitsRequest {
                    wall_time_ms: w,
                    cpu_time_ms: c,
                    memory_mib: m,
                    pids: p,
                    cpus,
                    stdout_bytes: o,
                    stderr_bytes: e,
                    open_files: f,
                })
        }

        fn ceiling() -> impl Strategy<Value = LimitCeilings> {
            (
                (1u64..100_000, 1u64..100_000, 1u64..2048, 1u64..1024),
                (0.1f64..4.0, 1u64..(16 << 20), 1u64..(16 << 20), 16u64..2048),
            )
                .prop_map(|((w, c, m, p), (cpus, o, e, f))| LimitCeilings {
                    wall_time_ms: w,
                    cpu_time_ms: c,
                    memory_mib: m,
                    pids: p,
                    cpus,
                    stdout_bytes: o,
                    stderr_bytes: e,
                    open_files: f,
                })
        }

        fn level() -> impl Strategy<Value = Option<IsolationLevel>> {
            proptest::option::of(proptest::sample::select(IsolationLevel::ALL.to_vec()))
        }

        proptest! {
            // No regression files in the tree: a failure prints its
            // minimal input, which becomes a named test.
            #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

            /// Narrowing never grants above a ceiling, never changes what
            /// the request did not name, and a single limit above its
            /// ceiling refuses the whole request, naming exactly those.
            #[test]
            fn narrowing_never_widens(req in request(), c in ceiling()) {
                let base = Limits::default();
                let fields: [(&str, Option<f64>, f64, f64); 8] = [
                    ("limits.wall_time_ms", req.wall_time_ms.map(|v| v as f64), c.wall_time_ms as f64, base.wall_time_ms as f64),
                    ("limits.cpu_time_ms", req.cpu_time_ms.map(|v| v as f64), c.cpu_time_ms as f64, base.cpu_time_ms as f64),
                    ("limits.memory_mib", req.memory_mib.map(|v| v as f64), c.memory_mib as f64, base.memory_mib as f64),
                    ("limits.pids", req.pids.map(|v| v as f64), c.pids as f64, base.pids as f64),
                    ("limits.cpus", req.cpus, c.cpus, base.cpus),
                    ("limits.stdout_bytes", req.stdout_bytes.map(|v| v as f64), c.stdout_bytes as f64, base.stdout_bytes as f64),
                    ("limits.stderr_bytes", req.stderr_bytes.map(|v| v as f64), c.stderr_bytes as f64, base.stderr_bytes as f64),
                    ("limits.open_files", req.open_files.map(|v| v as f64), c.open_files as f64, base.open_files as f64),
                ];
                let over: Vec<&str> = fields
                    .iter()
                    .filter(|(_, v, max, _)| v.is_some_and(|v| v > *max))
                    .map(|(f, ..)| *f)
                    .collect();
                match base.narrow(&req, &c) {
                    Ok(out) => {
                        prop_assert!(over.is_empty());
                        let got = [
                            out.wall_time_ms as f64, out.cpu_time_ms as f64, out.memory_mib as f64,
                            out.pids as f64, out.cpus, out.stdout_bytes as f64,
                            out.stderr_bytes as f64, out.open_files as f64,
                        ];
                        for ((name, v, max, b), g) in fields.iter().zip(got) {
                            match v {
                                Some(v) => {
                                    prop_assert_eq!(g, *v, "{}", name);
                                    prop_assert!(g <= *max, "{} above its ceiling", name);
                                }
                                None => prop_assert_eq!(g, *b, "{} changed unasked", name),
                            }
                        }
                        prop_assert_eq!(out.stdin_bytes, base.stdin_bytes);
                        prop_assert_eq!(out.code_bytes, base.code_bytes);
                    }
                    Err(denied) => {
                        let mut named: Vec<&str> = denied.iter().map(|d| d.field).collect();
                        let mut over = over;
                        named.sort_unstable();
                        over.sort_unstable();
                        prop_assert_eq!(named, over);
                    }
                }
            }

            /// The isolation a request gets is never below the policy's
            /// minimum nor the request's: the strictest of them.
            #[test]
            fn isolation_is_the_strictest_of_base_and_request(base in level(), asked in level()) {
                let mut iso = Isolation { minimum: base, ..Isolation::default() };
                iso.require(asked);
                prop_assert_eq!(iso.minimum, base.max(asked));
                prop_assert!(iso.minimum >= base && iso.minimum >= asked);
            }
        }
    }
}
