//! The control channel between the engine (host) and the sandbox init.
//!
//! A stream socket carrying frames of `u32 length (little endian) || JSON`.
//! The reader enforces a per-direction size cap *before* allocating. The
//! init side sits inside the sandbox, so the engine treats everything it
//! receives as hostile: small cap, strict types, unknown fields rejected.
//!
//! Sequence (one sandbox):
//! ```text
//! engine                                     init
//!   ── InitConfig ───────────────────────────▶ (stage 1)
//!   ◀─────────────────────────────── Unshared    user+pid namespaces exist
//!   (writes setgroups/gid_map/uid_map)
//!   ── Mapped ───────────────────────────────▶
//!   ◀────────────────────────────── Pid1{pid}    stage 2 = pid 1 of the sandbox
//!   (moves pid 1 into the cgroup meanwhile)       builds mounts, pivot_root, net
//!   ◀──────────────────────────────────── Built
//!   ── Attached ─────────────────────────────▶   cgroup ns, caps, Landlock, seccomp
//!   ◀───────────────────── Ready | Failed{step}  every layer applied
//!   ── Job + code bytes ─────────────────────▶   (a pool hands the job over here)
//!   ◀───────────────────── Exited{..} | Failed
//! ```

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Largest frame the engine accepts from the sandbox side.
pub const MAX_FROM_INIT: usize = 16 * 1024;
/// Largest frame init accepts from the engine (code is sent as its own raw frame).
pub const MAX_TO_INIT: usize = 256 * 1024 * 1024;

/// One read-only bind mount: `host` path shown at `target` inside.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RoMount {
    /// Host path (absolute).
    pub host: String,
    /// Path inside the sandbox (absolute).
    pub target: String,
}

/// A read-only file written into the sandbox's root.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RoFile {
    /// Absolute path inside the sandbox.
    pub path: String,
    /// Contents (text).
    pub contents: String,
}

/// Everything init needs to build the sandbox. Contains nothing
/// tenant-specific: code, stdin and identity arrive later with the [`Job`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    /// cgroup v1 `tasks` files stage 1 writes "0" to (joining its cgroup
    /// before it creates anything); empty when the engine attaches (v2) or
    /// there is no cgroup.
    pub cgroup_tasks: Vec<String>,
    /// Read-only bind mounts.
    pub mounts: Vec<RoMount>,
    /// Symlinks to create inside: (path, target).
    pub symlinks: Vec<(String, String)>,
    /// Read-only files written into the root (platform files such as the
    /// guest SDKs; never tenant data).
    pub files: Vec<RoFile>,
    /// `/etc`: generated files ([`crate::rootfs`]), written first.
    pub etc_files: Vec<RoFile>,
    /// `/etc`: host files bound read-only at the same path.
    pub etc_mounts: Vec<RoMount>,
    /// Size cap of each scratch tmpfs, bytes.
    pub scratch_bytes: u64,
    /// Inode cap of each scratch tmpfs.
    pub scratch_inodes: u64,
    /// A directory (outside the new root) whose `tmp` and `workspace` hold
    /// /tmp and /workspace instead of tmpfs: a microVM's scratch disk,
    /// mounted and sized by the guest's init, which alone sets this.
    #[serde(default)]
    pub scratch_dir: Option<String>,
    /// A session's workspace (a host directory, the root of its own capped
    /// file system) bound at /workspace instead of a tmpfs; the code file
    /// then goes to /tmp.
    #[serde(default)]
    pub workspace_dir: Option<String>,
    /// Require full Landlock enforcement.
    pub landlock_strict: bool,
    /// Seccomp programs to install, in order, as (code, jt, jf, k).
    pub seccomp: Vec<Vec<(u16, u8, u8, u32)>>,
    /// The engine passed a broker socket at [`crate::launch::BROKER_FD`]; it
    /// is handed to the program (and only to it). When false, that
    /// descriptor is closed at once whatever it is.
    pub broker: bool,
    /// The engine passed an egress channel at [`crate::launch::EGRESS_FD`]:
    /// pid 1 starts the forwarder on 127.0.0.1:[`crate::launch::PROXY_PORT`]
    /// before the program; the program never holds the channel.
    pub egress: bool,
    /// Init was forked by a python zygote ([`crate::zygote`]): the program
    /// continues in the inherited interpreter instead of exec'ing one. Init
    /// refuses a configuration that does not match how it was started.
    pub zygote: bool,
}

/// The per-execution job.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// File name of the code inside /workspace (validated by the engine).
    pub file_name: String,
    /// Length of the raw code frame that follows.
    pub code_len: u64,
    /// Full argv; argv[0] is the interpreter path inside the sandbox.
    pub argv: Vec<String>,
    /// Environment, as `NAME=value`.
    pub env: Vec<String>,
    /// RLIMIT_CPU seconds (soft); hard is one more.
    pub cpu_seconds: u64,
    /// RLIMIT_NOFILE.
    pub open_files: u64,
    /// RLIMIT_FSIZE in bytes.
    pub file_size: u64,
    /// RLIMIT_NPROC when no pids cgroup is available.
    pub nproc: Option<u64>,
    /// RLIMIT_DATA when no memory cgroup is available.
    pub data_bytes: Option<u64>,
    /// Deny execve after the interpreter starts.
    pub deny_execve: bool,
}

/// Messages from init to the engine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, tag = "t", rename_all = "snake_case")]
pub enum FromInit {
    /// Stage 1 has created the user and pid namespaces and waits for id maps.
    Unshared,
    /// Host pid of the sandbox's pid 1.
    Pid1 {
        /// Host pid.
        pid: i32,
    },
    /// Pid 1 has built the filesystem view and network and waits for
    /// `Attached` (its cgroup) before the remaining layers.
    Built,
    /// Every layer is applied; waiting for a job.
    Ready {
        /// Landlock ABI in force (0 = none).
        landlock_abi: u32,
        /// Landlock fully enforced.
        landlock_full: bool,
    },
    /// An isolation step failed.
    Failed {
        /// Step name.
        step: String,
        /// errno, when there is one.
        errno: i32,
    },
    /// The program ended.
    Exited {
        /// Exit code, when it exited.
        code: Option<i32>,
        /// Signal, when it was killed.
        signal: Option<i32>,
        /// User CPU µs of waited-for processes.
        user_us: u64,
        /// System CPU µs of waited-for processes.
        sys_us: u64,
        /// Peak RSS KiB of the largest waited-for process.
        maxrss_kib: u64,
        /// A scratch filesystem was full at exit.
        scratch_full: bool,
        /// execve of the interpreter failed with this errno.
        exec_errno: Option<i32>,
        /// Processes the OOM killer ended in a cgroup the sandbox's own
        /// kernel keeps (a microVM guest's), which the host's cgroup
        /// does not see.
        #[serde(default)]
        oom_kills: u64,
    },
}

/// Messages from the engine to init.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "t", rename_all = "snake_case")]
pub enum ToInit {
    /// Configuration (first frame).
    Config(Box<InitConfig>),
    /// Id maps are written.
    Mapped,
    /// Pid 1 is in its cgroup (or none could be created without root).
    Attached,
    /// Run this job; a raw frame of `code_len` bytes follows.
    Job(Box<Job>),
    /// Configuration of an agent ([`crate::agent`]): init inside an
    /// isolation someone else built (first frame instead of `Config`).
    AgentConfig(Box<AgentConfig>),
}

/// What the agent applies itself: everything the container runtime (or
/// gVisor) does not. Nothing tenant-specific.
///
/// Sequence: `AgentConfig` ─▶, ◀─ `Ready | Failed{step}`, then `Job` and
/// its code ─▶, ◀─ `Exited | Failed`, as for init.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Landlock: `Some(strict)` where the code's system calls reach the
    /// host kernel; `None` under a user-space kernel that has none.
    pub landlock: Option<bool>,
    /// Seccomp programs to install, in order, as (code, jt, jf, k).
    pub seccomp: Vec<Vec<(u16, u8, u8, u32)>>,
    /// A broker socket is at [`crate::launch::BROKER_FD`].
    pub broker: bool,
    /// An egress channel is at [`crate::launch::EGRESS_FD`].
    pub egress: bool,
    /// The forwarder relays each connection through a socket the host
    /// sends ([`crate::relay`]) instead of handing it over.
    pub egress_relay: bool,
    /// Bring loopback up (the runtime made the network namespace and left
    /// it down).
    pub loopback: bool,
    /// The kernel delivers signals to pid 1 (gVisor): the agent ignores
    /// every catchable one (and a filter refuses signalling it).
    pub protect_pid1: bool,
    /// A guest kernel's cgroup holds the sandbox: its `memory.events` is
    /// at [`crate::launch::MEMORY_EVENTS_FD`] (a microVM).
    #[serde(default)]
    pub guest_memory_events: bool,
    /// /workspace is a session's (bound by the runtime): the code file
    /// goes to /tmp and the program starts in /workspace.
    #[serde(default)]
    pub session_workspace: bool,
}

/// Writes one frame.
pub fn write_frame<W: Write>(w: &mut W, payload: &[u8]) -> io::Result<()> {
    let len =
        u32::try_from(payload.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = Vec::with_capacity(4 + payload.len());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf)
}

/// Writes one JSON message frame.
pub fn write_msg<W: Write, T: Serialize>(w: &mut W, msg: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
    write_frame(w, &bytes)
}

/// Reads one frame of at most `max` bytes. Oversized frames are an error
/// before any allocation of their size.
pub fn read_frame<R: Read>(r: &mut R, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {max}"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Reads and decodes one JSON message frame.
pub fn read_msg<R: Read, T: for<'de> Deserialize<'de>>(r: &mut R, max: usize) -> io::Result<T> {
    // Wiped when dropped: configuration frames name host paths (cgroup
    // files), and a zygote-forked program inherits this process's memory.
    let buf = zeroize::Zeroizing::new(read_frame(r, max)?);
    serde_json::from_slice(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let mut buf = Vec::new();
        write_msg(&mut buf, &FromInit::Pid1 { pid: 7 }).unwrap();
        let got: FromInit = read_msg(&mut buf.as_slice(), MAX_FROM_INIT).unwrap();
        assert_eq!(got, FromInit::Pid1 { pid: 7 });
    }

    #[test]
    fn oversized_length_prefix_is_rejected_without_allocating() {
        let mut buf = (u32::MAX).to_le_bytes().to_vec();
        buf.extend_from_slice(b"{}");
        let err = read_frame(&mut buf.as_slice(), MAX_FROM_INIT).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn unknown_fields_and_types_are_rejected() {
        for bad in [
            &br#"{"t":"pid1","pid":1,"x":2}"#[..],
            br#"{"t":"pid1","pid":"1"}"#,
            br#"{"t":"nope"}"#,
            b"\xff\xfe",
        ] {
            let mut buf = Vec::new();
            write_frame(&mut buf, bad).unwrap();
            assert!(read_msg::<_, FromInit>(&mut buf.as_slice(), MAX_FROM_INIT).is_err());
        }
    }

    #[test]
    fn truncated_frame_is_an_error() {
        let mut buf = 10u32.to_le_bytes().to_vec();
        buf.extend_from_slice(b"abc");
        assert!(read_frame(&mut buf.as_slice(), MAX_FROM_INIT).is_err());
    }
}

/// What a microVM guest's init receives from the host before anything
/// else: the sandbox's view (built inside the guest by the same code as
/// the process sandbox's root, its bind sources read from the guest's
/// read-only root image) and what the guest needs to be a fresh machine.
/// Nothing tenant-specific.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmGuestConfig {
    /// The view; only the filesystem fields are used (mounts, symlinks,
    /// files, etc_files, etc_mounts, scratch); the rest must be empty.
    pub root: InitConfig,
    /// Host randomness (hex) mixed into the guest's pool before the agent
    /// starts.
    pub seed: String,
    /// The host's realtime clock as the VM starts (seconds, nanoseconds):
    /// the guest has no clock device of its own.
    pub clock: (u64, u32),
    /// The policy's memory limit, bytes: the guest's own cgroup around the
    /// sandbox (no swap).
    pub memory_bytes: u64,
    /// The policy's task limit: the same cgroup's pids.max.
    pub pids: u64,
    /// The host relays egress: the agent's egress channel is the guest
    /// init's, which opens an egress stream of the channel per connection
    /// ([`crate::vmchan`]).
    pub egress: bool,
    /// A session's workspace is shared with the VM (virtio-fs, tag
    /// [`crate::vminit::WORKSPACE_TAG`]): the guest mounts it and binds it
    /// at the sandbox's /workspace in place of its scratch disk's.
    #[serde(default)]
    pub workspace: bool,
}

/// Largest [`VmGuestConfig`] a guest accepts.
pub const MAX_VM_CONFIG: usize = 8 << 20;
