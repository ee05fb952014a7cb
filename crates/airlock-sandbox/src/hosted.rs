//! Sandboxes whose isolation a runtime builds (an OCI runtime, gVisor),
//! with airlock's agent ([`crate::agent`]) as their first process.
//!
//! The engine keeps everything that is not the runtime's: the checks of
//! what the sandbox is built from, its cgroup (the runtime process joins it
//! itself before it execs, so the runtime and everything it starts is
//! inside before anything runs), the channels, the agent's configuration
//! and handshake, and, from `Ready` on, the very supervision, limits,
//! accounting and teardown of a process sandbox. A [`Launcher`] only turns
//! an [`AgentLaunch`] (the filesystem view, the policy, the channels) into
//! a started runtime process.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use airlock_policy::{IsolationLevel, LandlockMode, Language, Policy};

use crate::cgroup::{Cgroup, CgroupLimits};
use crate::engine::{Engine, Sandbox};
use crate::error::SandboxError;
use crate::launch::{CONTROL_FD, Extras, InitProc};
use crate::proto::{self, AgentConfig, RoFile, RoMount, ToInit};
use crate::result::{Enforced, LandlockReport, SeccompReport};
use crate::{seccomp, sys};

/// Where the agent's image (a sealed in-memory copy of the airlock binary)
/// is passed: the runtime executes `/proc/self/fd/6`, so no host path of
/// the binary is ever mounted into the sandbox.
pub const AGENT_IMAGE_FD: RawFd = 6;

/// Where a runtime that binds the agent shows it inside.
pub const AGENT_PATH: &str = "/.airlock/agent";

/// Where platform files (the guest SDKs) go in a sandbox whose root is an
/// image: the image has this directory empty (checked at import), and the
/// runtime binds the sandbox's own files over it.
pub const IMAGE_GUEST_ROOT: &str = "/opt/airlock";

/// Where an image root's sandbox holds airlock's own files (the agent, the
/// host libraries it is loaded with, the operator's CA bundle): bound from
/// the bundle, empty in the image.
pub const IMAGE_AIRLOCK_DIR: &str = "/.airlock";

/// An imported OCI image used as the root filesystem instead of the host's
/// runtime: read-only, shared by every sandbox of it, its mount points
/// checked to be real empty directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRoot {
    /// `sha256:<hex>` of the image's configuration.
    pub id: String,
    /// The unpacked root on the host.
    pub rootfs: std::path::PathBuf,
    /// Interpreter path inside the image, per language it has.
    pub interpreters: Vec<(Language, String)>,
    /// The image's own CA bundle (`/etc/ssl/certs/ca-certificates.crt`,
    /// read inside its root), which the operator's certificates extend.
    pub ca_bundle: Option<std::sync::Arc<str>>,
}

/// The filesystem view a runtime builds: the same one the process sandbox
/// builds for itself.
#[derive(Debug, Clone)]
pub struct AgentView {
    /// Read-only binds of the host (the runtime, the policy's read-only
    /// paths, host files of /etc).
    pub mounts: Vec<RoMount>,
    /// Symlinks such as /bin -> usr/bin.
    pub symlinks: Vec<(String, String)>,
    /// Files written into the root (generated /etc, platform files).
    pub files: Vec<RoFile>,
    /// Size cap of each scratch tmpfs (/tmp, /workspace, /dev/shm), bytes.
    pub scratch_bytes: u64,
    /// Inode cap of each scratch tmpfs.
    pub scratch_inodes: u64,
    /// The image whose root replaces the host's runtime (then `mounts` and
    /// `symlinks` are empty and every file is under [`IMAGE_GUEST_ROOT`] or
    /// [`IMAGE_AIRLOCK_DIR`]).
    pub image: Option<ImageRoot>,
    /// A session's workspace (a host directory the platform made, checked
    /// by the engine), bound read-write at /workspace in place of its
    /// scratch tmpfs; only by a launcher that [binds
    /// one](Launcher::binds_workspace).
    pub workspace: Option<String>,
}

/// Everything a [`Launcher`] gets to start one sandbox.
#[derive(Debug)]
pub struct AgentLaunch<'a> {
    /// A name unique on this host (container id, state directory name).
    pub name: &'a str,
    /// The view to build.
    pub view: &'a AgentView,
    /// The policy (limits, network).
    pub policy: &'a Policy,
    /// The language.
    pub language: Language,
    /// Host uid and gid the sandbox's user maps to.
    pub host_ids: (u32, u32),
    /// Host uid and gid the runtime's own setup runs as (root inside the
    /// user namespace, gone before the agent starts as the sandbox user):
    /// as root, the ids just below `host_ids` (65533 beside nobody's
    /// 65534); unprivileged, the same as `host_ids` (one id to map: the
    /// sandbox user is then root inside, without any capability).
    pub setup_ids: (u32, u32),
    /// The airlock binary on the host, for a runtime that cannot execute
    /// the agent from its passed image (gVisor loads programs through its
    /// own filesystem): bound read-only at [`AGENT_PATH`].
    pub agent_binary: &'a std::path::Path,
    fds: [RawFd; 4],
    join: Vec<CString>,
}

/// What a launcher reports of the isolation it built.
#[derive(Debug, Clone)]
pub struct Isolated {
    /// Backend name for the result.
    pub backend: &'static str,
    /// Its level.
    pub isolation: IsolationLevel,
    /// Namespaces (or their equivalent) the code runs in.
    pub namespaces: Vec<String>,
    /// Landlock is applied by the agent (the code meets the host kernel).
    pub landlock: bool,
    /// Extra memory (MiB) and tasks the runtime's own processes take in
    /// the sandbox's cgroup (gVisor's sentry and gofer), on top of the
    /// policy's limits.
    pub overhead: (u64, u64),
    /// Limits the runtime cannot enforce as configured, with the fallback.
    pub unavailable_limits: Vec<String>,
    /// The code's processes are not host tasks (gVisor): the policy's
    /// pids limit is RLIMIT_NPROC inside, the host cgroup's only bounds
    /// the runtime.
    pub pids_by_rlimit: bool,
    /// Connections cannot leave as descriptors (gVisor): the forwarder
    /// relays them through sockets the host sends in.
    pub egress_relay: bool,
    /// The kernel does not shield pid 1 from its namespace's signals
    /// (gVisor): a filter refuses signalling it ([`seccomp::protect_pid1`]).
    pub protect_pid1: bool,
    /// The sandbox runs in a guest kernel's cgroup whose `memory.events`
    /// the agent receives ([`crate::launch::MEMORY_EVENTS_FD`]): an OOM kill
    /// there is the policy's memory limit (a microVM).
    pub guest_memory_events: bool,
    /// A virtual machine's accelerator (`kvm`, `tcg`), for the result.
    pub accelerator: Option<&'static str>,
    /// The golden snapshot a virtual machine is restored from, for the
    /// result.
    pub snapshot: Option<String>,
    /// How long the agent may take to report every layer applied, when
    /// longer than [`AGENT_START_TIMEOUT`] (a guest kernel booting under
    /// software emulation on a busy host).
    pub start_timeout: Option<Duration>,
    /// How long the program's output may take to end after it exited,
    /// when longer than the engine's default (half a second): a guest's
    /// output crosses its VM's channel after the exit report may have.
    pub output_grace: Option<Duration>,
    /// The host cgroup holds more than the code (a VM's QEMU emulating
    /// it): it ends the sandbox at this many times the policy's CPU time
    /// (the code's own is held to the policy inside, by RLIMIT_CPU).
    pub host_cpu_factor: Option<u64>,
}

/// A started runtime process.
pub struct Launched {
    /// The runtime process (`crun run`, `runsc run`): stdio is the
    /// program's, it ends when the sandbox does.
    pub child: Child,
    /// Removes the runtime's state once every process is gone (container
    /// state, bundle directory).
    pub cleanup: Option<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for Launched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launched")
            .field("child", &self.child)
            .finish_non_exhaustive()
    }
}

/// Starts a runtime around the agent.
pub trait Launcher: Send + Sync + std::fmt::Debug {
    /// What the isolation it builds is.
    fn isolated(&self, policy: &Policy) -> Isolated;
    /// Starts the runtime for one sandbox. `cmd` must be prepared with
    /// [`AgentLaunch::channels`] so the channels reach the agent.
    fn launch(&self, launch: &AgentLaunch<'_>) -> Result<Launched, SandboxError>;
    /// The image the sandbox's root is, when not the host's runtime.
    fn image(&self) -> Option<&ImageRoot> {
        None
    }
    /// Whether it binds [`AgentView::workspace`] at /workspace; the engine
    /// refuses a session's workspace for one that does not, rather than
    /// lose what the code writes there.
    fn binds_workspace(&self) -> bool {
        false
    }
}

impl AgentLaunch<'_> {
    /// How many descriptors beyond stdio the runtime must pass (3..=6).
    pub const PASSED_FDS: u32 = 4;

    /// Starts `cmd` as the sandbox's runtime process: in `/`, with piped
    /// stdio (the program's), holding the channels ([`Self::channels`]).
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<Child> {
        cmd.current_dir("/")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        self.channels(cmd);
        cmd.spawn()
    }

    /// The sandbox has a cgroup: killing it kills every process the
    /// runtime started, before the launcher's cleanup runs.
    pub fn has_cgroup(&self) -> bool {
        !self.join.is_empty()
    }

    /// Arranges for `cmd`'s process to join the sandbox cgroup and to hold
    /// the control socket, the broker and egress channels (or /dev/null in
    /// their place) and the agent image at 3, 4, 5 and 6 when it execs.
    pub fn channels(&self, cmd: &mut Command) {
        let fds = self.fds;
        let join = self.join.clone();
        // The descriptors in `fds` are owned by the engine's socket ends and
        // the image, alive until spawn returns, so they are open in the
        // child. All are first copied to >= 16, so placing one at 3..=6
        // cannot overwrite another still to be placed. `join` holds
        // NUL-terminated paths made before the fork.
        // SAFETY: between fork and exec the closure only calls setsid,
        // prctl, open, write, close, fcntl and dup2 (async-signal-safe; no
        // allocation: the paths and the array are moved in whole).
        unsafe {
            cmd.pre_exec(move || {
                // A session of its own: the runtime and the sandbox never
                // have the server's controlling terminal.
                sys::setsid()?;
                // The runtime dies with the thread that started it, as the
                // process sandbox's init does (runc's container follows
                // it; the agent also leaves when its control channel
                // hangs up, which covers runsc's sentry).
                sys::set_parent_death_kill()?;
                for path in &join {
                    sys::write_raw(path, b"0")?;
                }
                // Parked close-on-exec: only the copies at 3..=6 reach the
                // runtime (and through it the agent).
                let mut parked = [0; 4];
                for (i, fd) in fds.iter().enumerate() {
                    parked[i] = sys::dup_above_cloexec(*fd, 16)?;
                }
                for (i, fd) in parked.iter().enumerate() {
                    sys::dup2(*fd, CONTROL_FD + i as RawFd)?;
                }
                Ok(())
            });
        }
    }
}

impl Engine {
    /// Builds a sandbox whose isolation `launcher`'s runtime makes, with the
    /// agent inside applying the rest; from `Ready` on it is supervised
    /// exactly like a process sandbox.
    /// The host ids a hosted sandbox's code runs as, and the ids its
    /// runtime (or VM monitor's QEMU) is set up as: as root, the ids just
    /// below the code's; unprivileged, this user's for both.
    pub fn hosted_ids(&self) -> ((u32, u32), (u32, u32)) {
        if sys::geteuid() == 0 {
            let ids = self.root_host_ids();
            (ids, (ids.0.saturating_sub(1), ids.1.saturating_sub(1)))
        } else {
            let ids = (sys::geteuid(), sys::getegid());
            (ids, ids)
        }
    }

    pub fn prepare_agent(
        &self,
        policy: &Policy,
        lang: Language,
        extras: &Extras,
        launcher: &dyn Launcher,
    ) -> Result<Sandbox, SandboxError> {
        let started = Instant::now();
        // A runtime that would not bind a session's workspace (its
        // sandbox would write to a scratch of its own): refused rather than
        // lost.
        if extras.workspace.is_some() && !launcher.binds_workspace() {
            return Err(SandboxError::InvalidRequest(
                "this backend does not run sessions".into(),
            ));
        }
        let image_root = launcher.image();
        let runtime = self.check_spec_in(policy, lang, extras, image_root)?;
        let isolated = launcher.isolated(policy);
        let mut programs = seccomp::programs_for(&policy.syscalls.deny)?;
        if isolated.protect_pid1 {
            programs.push(seccomp::protect_pid1()?);
        }
        let euid = sys::geteuid();
        let name = crate::engine::sandbox_name();
        let (mem_extra, pids_extra) = isolated.overhead;
        let cgroup = match self.cgroup_layout() {
            Some(layout) => {
                let limits = CgroupLimits {
                    memory_bytes: (policy.limits.memory_mib + mem_extra) << 20,
                    pids: policy.limits.pids + pids_extra,
                    cpus: policy.limits.cpus,
                };
                match Cgroup::create(layout, &name, &limits) {
                    Ok(cg) => Some(cg),
                    Err(e) if euid == 0 => return Err(e),
                    Err(_) => None,
                }
            }
            None => None,
        };
        let join = cgroup
            .as_ref()
            .map(Cgroup::join_files)
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                CString::new(p)
                    .map_err(|_| SandboxError::SpawnInit(std::io::Error::other("cgroup path")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let view = match image_root {
            None => {
                let (etc_files, etc_mounts) = crate::rootfs::etc(self.ca());
                let mut mounts = runtime.mounts.clone();
                mounts.extend(policy.filesystem.read_only_paths.iter().map(|p| RoMount {
                    host: p.clone(),
                    target: p.clone(),
                }));
                mounts.extend(etc_mounts);
                let mut files = etc_files;
                files.extend(extras.files.iter().map(|(path, contents)| RoFile {
                    path: path.clone(),
                    contents: contents.to_string(),
                }));
                AgentView {
                    mounts,
                    symlinks: runtime.symlinks.clone(),
                    files,
                    scratch_bytes: policy.filesystem.scratch_mib << 20,
                    scratch_inodes: policy.filesystem.scratch_inodes,
                    image: None,
                    // Checked by check_spec_in: absolute, a directory, UTF-8.
                    workspace: extras
                        .workspace
                        .as_ref()
                        .and_then(|w| w.to_str())
                        .map(str::to_string),
                }
            }
            Some(img) => {
                // The image's own /etc, untouched: only the platform's
                // files, and the operator's CA certificates after the
                // image's own when there are some.
                let mut files: Vec<RoFile> = extras
                    .files
                    .iter()
                    .map(|(path, contents)| RoFile {
                        path: path.clone(),
                        contents: contents.to_string(),
                    })
                    .collect();
                if let Some((_, extra)) = self.ca() {
                    let mut bundle = img.ca_bundle.as_deref().unwrap_or("").to_string();
                    if !bundle.is_empty() && !bundle.ends_with('\n') {
                        bundle.push('\n');
                    }
                    bundle.push_str(extra);
                    files.push(RoFile {
                        path: crate::rootfs::IMAGE_CA_BUNDLE_PATH.into(),
                        contents: bundle,
                    });
                    files.push(RoFile {
                        path: crate::rootfs::IMAGE_EXTRA_CA_PATH.into(),
                        contents: extra.to_string(),
                    });
                }
                AgentView {
                    mounts: Vec::new(),
                    symlinks: Vec::new(),
                    files,
                    scratch_bytes: policy.filesystem.scratch_mib << 20,
                    scratch_inodes: policy.filesystem.scratch_inodes,
                    image: Some(img.clone()),
                    // Checked by check_spec_in: absolute, a directory, UTF-8.
                    workspace: extras
                        .workspace
                        .as_ref()
                        .and_then(|w| w.to_str())
                        .map(str::to_string),
                }
            }
        };

        let crate::engine::Channels {
            host_ctrl,
            child_ctrl,
            host_broker,
            child_broker,
            host_egress,
            child_egress,
        } = crate::engine::Channels::new(extras)?;
        let null = File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(SandboxError::SpawnInit)?;
        let image = self.agent_image()?;
        let (host_ids, setup_ids) = self.hosted_ids();
        let launch = AgentLaunch {
            name: &name,
            view: &view,
            policy,
            language: lang,
            host_ids,
            setup_ids,
            agent_binary: self.init_path(),
            fds: [
                child_ctrl.as_raw_fd(),
                child_broker
                    .as_ref()
                    .map_or(null.as_raw_fd(), AsRawFd::as_raw_fd),
                child_egress
                    .as_ref()
                    .map_or(null.as_raw_fd(), AsRawFd::as_raw_fd),
                image.as_raw_fd(),
            ],
            join,
        };
        let launched = launcher.launch(&launch)?;
        drop((child_ctrl, child_broker, child_egress, null));
        let Launched { mut child, cleanup } = launched;
        let stdin = child.stdin.take().map(|p| File::from(OwnedFd::from(p)));
        let stdout = child.stdout.take().map(|p| File::from(OwnedFd::from(p)));
        let stderr = child.stderr.take().map(|p| File::from(OwnedFd::from(p)));
        let landlock = isolated
            .landlock
            .then_some(policy.isolation.landlock == LandlockMode::Strict);
        let enforced = Enforced {
            backend: isolated.backend.into(),
            isolation: isolated.isolation,
            missing_layers: Vec::new(),
            namespaces: isolated.namespaces.clone(),
            pivot_root: true,
            landlock: LandlockReport {
                mode: match (landlock, policy.isolation.landlock) {
                    (None, _) => "not_applicable".into(),
                    (Some(_), LandlockMode::Strict) => "strict".into(),
                    (Some(_), LandlockMode::BestEffortDangerous) => "best_effort_dangerous".into(),
                },
                abi: 0,
                fully_enforced: false,
            },
            seccomp: SeccompReport {
                filters: programs.len() + usize::from(policy.syscalls.deny_execve),
                deny_execve: policy.syscalls.deny_execve,
                default_action: "errno(EPERM)".into(),
            },
            capabilities_dropped: true,
            cgroup: cgroup.as_ref().map(Cgroup::version),
            unavailable_limits: if cgroup.is_none() {
                vec![
                    "memory: no cgroup, RLIMIT_DATA used (no swap control, no tmpfs accounting)"
                        .into(),
                    "pids: no cgroup, RLIMIT_NPROC used".into(),
                    "cpu quota: no cgroup, not enforced (CPU time still limited by RLIMIT_CPU)"
                        .into(),
                ]
            } else {
                isolated.unavailable_limits.clone()
            },
            host_uid: host_ids.0,
            image: image_root.map(|i| i.id.clone()),
            accelerator: isolated.accelerator.map(String::from),
            snapshot: isolated.snapshot.clone(),
        };
        let mut sb = Sandbox::hosted(crate::engine::HostedParts {
            child: InitProc::Child(child),
            stdin,
            stdout,
            stderr,
            ctrl: host_ctrl,
            broker: host_broker,
            egress: host_egress,
            extras,
            runtime,
            policy,
            enforced,
            cgroup,
            cleanup,
            platform_env: match image_root {
                None => self.platform_env(),
                Some(_) => crate::rootfs::ca_env(
                    self.ca().map(|_| crate::rootfs::IMAGE_CA_BUNDLE_PATH),
                    self.ca().map(|_| crate::rootfs::IMAGE_EXTRA_CA_PATH),
                )
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            },
            name: name.clone(),
            pids_by_rlimit: isolated.pids_by_rlimit,
            output_grace: isolated.output_grace,
            host_cpu_factor: isolated.host_cpu_factor,
        });
        let cfg = AgentConfig {
            landlock,
            seccomp: programs,
            broker: extras.broker,
            egress: extras.egress,
            egress_relay: isolated.egress_relay,
            loopback: false,
            protect_pid1: isolated.protect_pid1,
            guest_memory_events: isolated.guest_memory_events,
            session_workspace: extras.workspace.is_some(),
        };
        let timeout = isolated.start_timeout.unwrap_or(AGENT_START_TIMEOUT);
        if let Err(e) = sb.agent_handshake(&cfg, timeout) {
            // What the runtime said (its own errors go to the stderr it
            // shares with the agent): for the operator's log, never a
            // tenant's message (public_message names the step only).
            let said = sb.runtime_stderr();
            return Err(match (e, said.is_empty()) {
                (SandboxError::Control(m), false) => {
                    SandboxError::Control(format!("{m}; the runtime said: {said}"))
                }
                (e, _) => e,
            });
        }
        sb.set_setup_time(started.elapsed());
        Ok(sb)
    }
}

/// Answers of the agent's handshake are bounded in time: a runtime that
/// never starts it must not hold a worker.
pub(crate) const AGENT_START_TIMEOUT: Duration = Duration::from_secs(30);

impl Sandbox {
    /// Sends the agent its configuration and waits until every layer is
    /// applied.
    fn agent_handshake(
        &mut self,
        cfg: &AgentConfig,
        timeout: Duration,
    ) -> Result<(), SandboxError> {
        let ctrl = self.ctrl_mut();
        ctrl.set_read_timeout(Some(timeout))
            .map_err(|e| SandboxError::Control(format!("timeout: {e}")))?;
        proto::write_msg(ctrl, &ToInit::AgentConfig(Box::new(cfg.clone())))
            .map_err(|e| SandboxError::Control(format!("send config: {e}")))?;
        self.expect_ready_msg()
    }
}
