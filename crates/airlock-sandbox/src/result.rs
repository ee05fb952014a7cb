//! The result of one execution: one type, serialisable to JSON.

use serde::{Deserialize, Serialize};

use crate::cgroup::CgroupVersion;

/// Why the sandbox ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum TerminationReason {
    /// The program exited (any code) or died of a signal of its own.
    Exited,
    /// The wall-clock limit was reached.
    Timeout,
    /// The CPU-time limit was reached.
    CpuLimit,
    /// The memory cgroup killed the program.
    MemoryLimit,
    /// The pids limit refused forks and the program failed.
    PidsLimit,
    /// stdout or stderr exceeded its cap.
    OutputLimit,
    /// Scratch space (bytes or inodes) ran out and the program failed.
    DiskLimit,
    /// A seccomp kill (SIGSYS): a forbidden ABI or syscall was used.
    PolicyViolation,
    /// The sandbox itself failed; see `error`.
    InternalError,
    /// A client cancelled the execution.
    Cancelled,
    /// The server shut down before the program ended.
    ServerShutdown,
    /// The server crashed while the execution ran; recorded on restart
    /// (never produced by the engine itself).
    ServerRestart,
    /// The node running it stopped heartbeating and another node failed
    /// it, or the node itself stopped it after losing the database for
    /// longer than its lease.
    NodeLost,
}

impl TerminationReason {
    /// snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            TerminationReason::Exited => "exited",
            TerminationReason::Timeout => "timeout",
            TerminationReason::CpuLimit => "cpu_limit",
            TerminationReason::MemoryLimit => "memory_limit",
            TerminationReason::PidsLimit => "pids_limit",
            TerminationReason::OutputLimit => "output_limit",
            TerminationReason::DiskLimit => "disk_limit",
            TerminationReason::PolicyViolation => "policy_violation",
            TerminationReason::InternalError => "internal_error",
            TerminationReason::Cancelled => "cancelled",
            TerminationReason::ServerShutdown => "server_shutdown",
            TerminationReason::ServerRestart => "server_restart",
            TerminationReason::NodeLost => "node_lost",
        }
    }
}

/// Landlock as actually enforced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct LandlockReport {
    /// `strict` or `best_effort_dangerous`.
    pub mode: String,
    /// ABI in force (0 = not enforced).
    pub abi: u32,
    /// Every access right of the pinned ABI is enforced.
    pub fully_enforced: bool,
}

/// seccomp as installed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct SeccompReport {
    /// Filters installed (baseline 3, +1 with `syscalls.deny`, +1 with deny_execve).
    pub filters: usize,
    /// execve after start denied.
    pub deny_execve: bool,
    /// Action for anything not allowlisted.
    pub default_action: String,
}

/// The layers actually enforced for this execution.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct Enforced {
    /// The backend that ran the code: `process`, `oci` or `gvisor`.
    pub backend: String,
    /// Its isolation level: `container`, `gvisor` or `microvm`.
    pub isolation: airlock_policy::IsolationLevel,
    /// Policy layers this backend could not enforce and ran without
    /// (only under `isolation.missing_layers = "record_dangerous"`; by
    /// default such a policy is refused instead).
    pub missing_layers: Vec<String>,
    /// Namespaces the sandbox runs in.
    pub namespaces: Vec<String>,
    /// New root via pivot_root, old root detached.
    pub pivot_root: bool,
    /// Landlock status.
    pub landlock: LandlockReport,
    /// seccomp status.
    pub seccomp: SeccompReport,
    /// All capabilities dropped and no_new_privs set.
    pub capabilities_dropped: bool,
    /// cgroup version, when a cgroup could be created.
    pub cgroup: Option<CgroupVersion>,
    /// Limits that could not be enforced as configured, with the fallback used.
    pub unavailable_limits: Vec<String>,
    /// Host uid the sandbox's processes run as.
    pub host_uid: u32,
    /// The imported OCI image (`sha256:` id of its configuration) whose
    /// read-only root the code ran in; absent: the host's runtime,
    /// read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// What ran a microVM's guest: `kvm` (hardware virtualisation) or
    /// `tcg` (QEMU's software emulation: development and tests only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
    /// The golden snapshot a microVM was restored from (`sha256:` of what
    /// shaped it); absent: it booted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// Everything known about one finished execution.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct RunResult {
    /// Exit code, when the program exited.
    pub exit_code: Option<i32>,
    /// Signal number, when the program was killed.
    pub signal: Option<i32>,
    /// Why it ended.
    pub reason: TerminationReason,
    /// Wall time from job hand-over to the end, ms.
    pub wall_time_ms: f64,
    /// Time to build the isolated sandbox before the job, ms.
    pub setup_time_ms: f64,
    /// User CPU time, ms.
    pub cpu_user_ms: f64,
    /// System CPU time, ms.
    pub cpu_sys_ms: f64,
    /// Peak memory, bytes (cgroup peak, or the largest process's RSS).
    pub peak_memory_bytes: Option<u64>,
    /// Captured stdout (lossy UTF-8).
    pub stdout: String,
    /// Captured stderr (lossy UTF-8).
    pub stderr: String,
    /// stdout hit its cap.
    pub stdout_truncated: bool,
    /// stderr hit its cap.
    pub stderr_truncated: bool,
    /// Layers actually in force.
    pub enforced: Enforced,
    /// For `internal_error`: a message safe to show to the tenant.
    pub error: Option<String>,
    /// The captured stdout bytes as the program wrote them (up to the
    /// cap), for callers that want them exactly (`stdout` is lossy UTF-8).
    #[serde(skip)]
    pub stdout_raw: Vec<u8>,
    /// Likewise for stderr.
    #[serde(skip)]
    pub stderr_raw: Vec<u8>,
}
