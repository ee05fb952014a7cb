//! The host side: creates a sandbox, hands it one job, supervises it and
//! tears every trace of it down.
//!
//! The spawn path has two halves so a warm pool can sit between them:
//! [`Engine::prepare`] returns a [`Sandbox`] with every layer applied and
//! nothing tenant-specific inside; [`Sandbox::execute`] binds one job to it,
//! runs it and destroys it. [`Engine::run`] does both.
//!
//! Thread note: the sandbox's init has PR_SET_PDEATHSIG tied to the *thread*
//! that spawned it, so callers must keep that thread alive until the
//! sandbox ends (a dedicated spawner thread in a server).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use airlock_policy::{LandlockMode, Language, Policy};

use crate::cgroup::{self, Cgroup, CgroupLimits, Layout};
use crate::error::SandboxError;
use crate::launch::{
    BROKER_FD, CONTROL_FD, EGRESS_FD, Extras, INIT_ARG, InitProc, SANDBOX_GID, SANDBOX_UID,
    Started, program_argv_env, safe_file_name,
};
use crate::proto::{self, FromInit, InitConfig, Job, ToInit};
use crate::result::{Enforced, LandlockReport, RunResult, SeccompReport, TerminationReason};
use crate::runtime::{self, Runtime};
use crate::zygote::Zygote;
use crate::{seccomp, sys};

/// Engine settings that belong to the host, not to a policy.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The binary that acts as sandbox init (`airlock` itself by default).
    pub init_path: PathBuf,
    /// Interpreter overrides per language.
    pub interpreters: BTreeMap<Language, PathBuf>,
    /// Host uid/gid sandboxes run as when the engine runs as root. Default
    /// 65534 (nobody): never root, never a real user.
    pub root_host_ids: (u32, u32),
    /// Use cgroups when available. Default true.
    pub use_cgroups: bool,
    /// CA certificates (PEM) the operator adds to the host's for every
    /// sandbox (checked with [`crate::rootfs::check_extra_ca`]). Default
    /// none: the host's bundle alone.
    pub extra_ca: Option<Arc<str>>,
}

impl EngineConfig {
    /// Defaults: this executable as init, default interpreters, nobody.
    pub fn from_current_exe() -> io::Result<Self> {
        Ok(EngineConfig {
            init_path: std::env::current_exe()?,
            interpreters: BTreeMap::new(),
            root_host_ids: (65534, 65534),
            use_cgroups: true,
            extra_ca: None,
        })
    }
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The program's stdout.
    Stdout,
    /// The program's stderr.
    Stderr,
}

/// The sandbox engine. Cheap to share by reference across threads.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    cgroups: Option<Layout>,
    /// Resolved runtimes; the host's interpreters do not move while it runs.
    runtimes: Mutex<BTreeMap<Language, Runtime>>,
    /// A sealed in-memory copy of the init binary that zygotes are
    /// executed from (see [`Engine::zygote_image`]).
    zygote_image: Mutex<Option<Arc<std::os::fd::OwnedFd>>>,
    /// The same for the agent a runtime starts as an unprivileged id
    /// (executable, not readable, by all).
    agent_image: Mutex<Option<Arc<std::os::fd::OwnedFd>>>,
    /// The CA bundle inside (host's + operator's) and the operator's
    /// certificates alone, when the operator added some.
    ca: Option<(Arc<str>, Arc<str>)>,
}

/// One execution request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Language.
    pub language: Language,
    /// Code bytes (copied into the sandbox, never bind-mounted).
    pub code: &'a [u8],
    /// Preferred script file name (a basename; replaced by `main.<ext>` when
    /// it is not a plain safe name).
    pub file_name: Option<&'a str>,
    /// Bytes fed to the program's stdin.
    pub stdin: &'a [u8],
    /// The policy.
    pub policy: &'a Policy,
}

/// Numbers the sandboxes of this process where no randomness is available.
static SEQ: AtomicU64 = AtomicU64::new(0);

/// A sandbox's name on this host (its cgroup's, bundle's and container's):
/// `<engine pid>-<64 random bits>`. Random, not a counter: engines in
/// other pid namespaces may share the pid, and a counter would tell a
/// tenant (who can see its bundle's name) how many sandboxes others ran.
/// Creation is exclusive anyway: a name that exists is an error.
pub(crate) fn sandbox_name() -> String {
    let mut b = [0u8; 8];
    let n = match sys::getrandom(&mut b) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => SEQ.fetch_add(1, Ordering::Relaxed),
    };
    format!("{}-{n}", std::process::id())
}

/// Limits below which a sandbox of `lang` cannot start at all: a request
/// asking for less is refused as bad input (never left to fail as an
/// isolation step, which would look like an operator's fault).
///
/// Tasks: stage 1, pid 1 and the program are three, the egress forwarder a
/// fourth; node starts eight threads besides its own (below nine tasks it
/// stalls creating them). Open files: node needs 20 (with 16 it crashes
/// while starting); python and sh start with the policy minimum of 16.
pub fn check_runnable(policy: &Policy, lang: Language) -> Result<(), SandboxError> {
    let (pids, open_files) = match lang {
        Language::Javascript => (9, 20),
        Language::Python | Language::Shell => (3, 16),
    };
    let pids = pids + u64::from(policy.network.is_proxy());
    let l = &policy.limits;
    let mut short = Vec::new();
    if l.pids < pids {
        short.push(format!(
            "limits.pids = {} is below {pids}, the fewest tasks a {} sandbox{} starts with",
            l.pids,
            lang.as_str(),
            if policy.network.is_proxy() {
                " with egress"
            } else {
                ""
            }
        ));
    }
    if l.open_files < open_files {
        short.push(format!(
            "limits.open_files = {} is below {open_files}, the fewest a {} sandbox starts with",
            l.open_files,
            lang.as_str()
        ));
    }
    if short.is_empty() {
        Ok(())
    } else {
        Err(SandboxError::InvalidRequest(short.join("; ")))
    }
}

/// Most bytes of [`Extras::files`] (the root tmpfs holds 4 MiB).
pub const MAX_EXTRA_FILES_BYTES: usize = 1 << 20;

/// Where extra files may not go: what init builds itself.
const RESERVED_ROOTS: [&str; 7] = [
    "/etc",
    "/dev",
    "/proc",
    "/tmp",
    "/workspace",
    "/usr",
    "/lib",
];

fn under(path: &str, root: &str) -> bool {
    path == root || path.strip_prefix(root).is_some_and(|r| r.starts_with('/'))
}

fn valid_target(t: &str) -> bool {
    t.starts_with('/')
        && t.len() > 1
        && t.split('/').all(|c| c != ".." && c != ".")
        && !t.contains('\0')
}
/// Lets another thread stop a running execution. The supervising loop
/// checks it at least every 50 ms and kills the whole sandbox; the result
/// carries the reason given here.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicU8>);

impl CancelToken {
    /// A token nobody has triggered yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests the kill. The first reason wins. Only `Cancelled`,
    /// `ServerShutdown` and `NodeLost` are meaningful here; others are
    /// mapped to `Cancelled`.
    pub fn cancel(&self, reason: TerminationReason) {
        let code = match reason {
            TerminationReason::ServerShutdown => 2,
            TerminationReason::NodeLost => 3,
            _ => 1,
        };
        let _ = self
            .0
            .compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The requested reason, if any.
    pub fn reason(&self) -> Option<TerminationReason> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            2 => Some(TerminationReason::ServerShutdown),
            3 => Some(TerminationReason::NodeLost),
            _ => Some(TerminationReason::Cancelled),
        }
    }
}

impl Engine {
    /// Creates an engine, detecting the cgroup layout once.
    pub fn new(cfg: EngineConfig) -> Self {
        let cgroups = if cfg.use_cgroups {
            cgroup::detect()
        } else {
            None
        };
        let ca = cfg
            .extra_ca
            .as_ref()
            .map(|extra| (crate::rootfs::combine_ca(extra), extra.clone()));
        Engine {
            cfg,
            cgroups,
            runtimes: Mutex::new(BTreeMap::new()),
            zygote_image: Mutex::new(None),
            agent_image: Mutex::new(None),
            ca,
        }
    }

    /// Environment the engine adds for every program (after the policy's
    /// and the platform's extras): where the CA bundle is.
    pub(crate) fn platform_env(&self) -> Vec<(String, String)> {
        let has_bundle =
            self.ca.is_some() || std::path::Path::new(crate::rootfs::CA_BUNDLE_PATH).is_file();
        crate::rootfs::ca_env(
            has_bundle.then_some(crate::rootfs::CA_BUNDLE_PATH),
            self.ca.is_some().then_some(crate::rootfs::EXTRA_CA_PATH),
        )
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The binary zygotes run: a sealed memfd copy of the init binary,
    /// made once. Every program a zygote forks has the zygote's image
    /// mapped, so `/proc/self/exe` and `/proc/self/maps` would name the
    /// binary's host path; from a memfd they read `/memfd:airlock`.
    pub(crate) fn zygote_image(&self) -> Result<Arc<std::os::fd::OwnedFd>, SandboxError> {
        let mut g = self.zygote_image.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fd) = g.as_ref() {
            return Ok(fd.clone());
        }
        let fd = Arc::new(
            sys::sealed_copy("airlock", self.init_path()).map_err(SandboxError::SpawnInit)?,
        );
        *g = Some(fd.clone());
        Ok(fd)
    }

    /// Starts a python zygote for sandboxes with `policy` and `extras` (a
    /// guest runner entry and a broker channel: the pooled program shape).
    /// Must be called from a long-lived thread: the zygote dies with it.
    pub fn start_zygote(&self, policy: &Policy, extras: &Extras) -> Result<Zygote, SandboxError> {
        crate::zygote::start(crate::zygote::Spawn {
            runtime: self.runtime(Language::Python)?,
            image: self.zygote_image()?,
            platform_env: self.platform_env(),
            policy,
            extras,
        })
    }

    /// The CA bundle inside and the operator's certificates, when added.
    pub(crate) fn ca(&self) -> Option<&(Arc<str>, Arc<str>)> {
        self.ca.as_ref()
    }

    /// Host ids sandboxes run as when the engine runs as root.
    pub(crate) fn root_host_ids(&self) -> (u32, u32) {
        self.cfg.root_host_ids
    }

    /// The sealed in-memory image runtimes execute the agent from.
    pub(crate) fn agent_image(&self) -> Result<Arc<std::os::fd::OwnedFd>, SandboxError> {
        let mut g = self.agent_image.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fd) = g.as_ref() {
            return Ok(fd.clone());
        }
        let fd = Arc::new(
            sys::sealed_copy_mode("airlock", self.init_path(), 0o111)
                .map_err(SandboxError::SpawnInit)?,
        );
        *g = Some(fd.clone());
        Ok(fd)
    }

    /// The binary that acts as init (and zygote).
    pub fn init_path(&self) -> &std::path::Path {
        &self.cfg.init_path
    }

    /// The detected cgroup layout.
    pub fn cgroup_layout(&self) -> Option<&Layout> {
        self.cgroups.as_ref()
    }

    /// Resolves a language runtime (honouring overrides).
    pub fn runtime(&self, lang: Language) -> Result<Runtime, SandboxError> {
        let mut cache = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rt) = cache.get(&lang) {
            return Ok(rt.clone());
        }
        let rt = runtime::resolve(lang, self.cfg.interpreters.get(&lang).map(PathBuf::as_path))?;
        cache.insert(lang, rt.clone());
        Ok(rt)
    }

    /// Checks a request against its policy without starting anything.
    pub fn validate(&self, req: &Request<'_>) -> Result<(), SandboxError> {
        req.policy
            .validate()
            .map_err(|e| SandboxError::InvalidRequest(e.to_string()))?;
        if req.code.len() as u64 > req.policy.limits.code_bytes {
            return Err(SandboxError::InvalidRequest(format!(
                "code is {} bytes, over the limit of {} (limits.code_bytes)",
                req.code.len(),
                req.policy.limits.code_bytes
            )));
        }
        if req.stdin.len() as u64 > req.policy.limits.stdin_bytes {
            return Err(SandboxError::InvalidRequest(format!(
                "stdin is {} bytes, over the limit of {} (limits.stdin_bytes)",
                req.stdin.len(),
                req.policy.limits.stdin_bytes
            )));
        }
        for p in &req.policy.filesystem.read_only_paths {
            if !std::path::Path::new(p).exists() {
                return Err(SandboxError::InvalidRequest(format!(
                    "filesystem.read_only_paths entry {p:?} does not exist on this host"
                )));
            }
        }
        seccomp::programs_for(&req.policy.syscalls.deny)?;
        self.runtime(req.language)?;
        check_runnable(req.policy, req.language)
    }

    /// Runs one request in a fresh sandbox. `on_output` sees every captured
    /// chunk as it arrives (for pass-through); it must not block for long.
    pub fn run(
        &self,
        req: &Request<'_>,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<RunResult, SandboxError> {
        self.validate(req)?;
        let sandbox = self.prepare(req.policy, req.language)?;
        Ok(sandbox.execute(req.code, req.file_name, req.stdin, on_output))
    }

    /// Builds a fully isolated sandbox for `policy` and `lang`, waiting for
    /// a job. Nothing tenant-specific is inside yet.
    pub fn prepare(&self, policy: &Policy, lang: Language) -> Result<Sandbox, SandboxError> {
        self.prepare_with(policy, lang, &Extras::default())
    }

    /// [`Engine::prepare`] with platform extras (guest mounts, a broker
    /// channel, an entry script).
    pub fn prepare_with(
        &self,
        policy: &Policy,
        lang: Language,
        extras: &Extras,
    ) -> Result<Sandbox, SandboxError> {
        self.prepare_inner(policy, lang, extras, None)
    }

    /// A sandbox whose first process is forked by `zygote` (its policy,
    /// language and extras), isolated exactly like [`Engine::prepare_with`].
    pub fn prepare_from(&self, zygote: &Zygote) -> Result<Sandbox, SandboxError> {
        self.prepare_inner(
            &zygote.policy,
            Language::Python,
            &zygote.extras,
            Some(zygote),
        )
    }

    fn prepare_inner(
        &self,
        policy: &Policy,
        lang: Language,
        extras: &Extras,
        zygote: Option<&Zygote>,
    ) -> Result<Sandbox, SandboxError> {
        let started = Instant::now();
        let runtime = self.check_spec(policy, lang, extras)?;
        let mut programs = seccomp::programs_for(&policy.syscalls.deny)?;
        let euid = sys::geteuid();
        let cgroup_name = sandbox_name();
        let cgroup_limits = CgroupLimits {
            memory_bytes: policy.limits.memory_mib << 20,
            pids: policy.limits.pids,
            cpus: policy.limits.cpus,
        };
        // cgroup v1: create the cgroup now and let stage 1 move itself in by
        // writing "0" to each `tasks` file. Moving the calling thread is the
        // one migration the kernel does without taking the global
        // threadgroup rwsem, whose write side waits for an RCU grace period
        // (4-16 ms per sandbox measured here when the engine moves a pid).
        let mut early_cgroup = None;
        if let Some(layout @ Layout::V1 { .. }) = &self.cgroups {
            match Cgroup::create(layout, &cgroup_name, &cgroup_limits) {
                Ok(cg) => early_cgroup = Some(cg),
                Err(e) if euid == 0 => return Err(e),
                Err(_) => {}
            }
        }
        let (etc_files, etc_mounts) = crate::rootfs::etc(self.ca());
        let init_cfg = InitConfig {
            cgroup_tasks: early_cgroup
                .as_ref()
                .map(Cgroup::self_join_files)
                .unwrap_or_default(),
            mounts: {
                let mut m = runtime.mounts.clone();
                m.extend(
                    policy
                        .filesystem
                        .read_only_paths
                        .iter()
                        .map(|p| proto::RoMount {
                            host: p.clone(),
                            target: p.clone(),
                        }),
                );
                m
            },
            symlinks: runtime.symlinks.clone(),
            etc_files,
            etc_mounts,
            files: extras
                .files
                .iter()
                .map(|(path, contents)| proto::RoFile {
                    path: path.clone(),
                    contents: contents.to_string(),
                })
                .collect(),
            scratch_bytes: policy.filesystem.scratch_mib << 20,
            scratch_inodes: policy.filesystem.scratch_inodes,
            scratch_dir: None,
            workspace_dir: extras
                .workspace
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
            landlock_strict: policy.isolation.landlock == LandlockMode::Strict,
            seccomp: std::mem::take(&mut programs),
            broker: extras.broker,
            egress: extras.egress,
            zygote: zygote.is_some(),
        };
        let filters = init_cfg.seccomp.len();

        let Channels {
            host_ctrl,
            child_ctrl,
            host_broker,
            child_broker,
            host_egress,
            child_egress,
        } = Channels::new(extras)?;
        let Started {
            init,
            stdin: stdin_w,
            stdout: stdout_r,
            stderr: stderr_r,
            pid,
        } = match zygote {
            Some(z) => z.fork(&child_ctrl, child_broker.as_ref(), child_egress.as_ref())?,
            None => {
                let mut child = self.spawn_init(
                    child_ctrl.as_raw_fd(),
                    child_broker.as_ref().map(|c| c.as_raw_fd()),
                    child_egress.as_ref().map(|c| c.as_raw_fd()),
                )?;
                Started {
                    stdin: child.stdin.take().map(|p| File::from(OwnedFd::from(p))),
                    stdout: child.stdout.take().map(|p| File::from(OwnedFd::from(p))),
                    stderr: child.stderr.take().map(|p| File::from(OwnedFd::from(p))),
                    pid: child.id() as i32,
                    init: InitProc::Child(child),
                }
            }
        };
        drop(child_ctrl);
        drop(child_broker);
        drop(child_egress);

        let (host_uid, host_gid) = if euid == 0 {
            self.cfg.root_host_ids
        } else {
            (euid, sys::getegid())
        };

        let mut sb = Sandbox {
            child: Some(init),
            stdin: stdin_w,
            stdout: stdout_r,
            stderr: stderr_r,
            ctrl: host_ctrl,
            broker: host_broker,
            egress: host_egress,
            init_broker: extras.broker,
            prestarted: false,
            entry: extras.entry.clone(),
            session_workspace: extras.workspace.is_some(),
            extra_env: extras
                .env
                .iter()
                .cloned()
                .chain(self.platform_env())
                .collect(),
            pid1: None,
            cgroup: None,
            runtime,
            policy: policy.clone(),
            enforced: Enforced {
                backend: "process".into(),
                isolation: airlock_policy::IsolationLevel::Container,
                missing_layers: Vec::new(),
                namespaces: ["user", "pid", "mount", "network", "ipc", "uts", "cgroup"]
                    .map(String::from)
                    .to_vec(),
                pivot_root: true,
                landlock: LandlockReport {
                    mode: String::new(),
                    abi: 0,
                    fully_enforced: false,
                },
                seccomp: SeccompReport {
                    filters: filters + usize::from(policy.syscalls.deny_execve),
                    deny_execve: policy.syscalls.deny_execve,
                    default_action: "errno(EPERM)".into(),
                },
                capabilities_dropped: true,
                cgroup: None,
                unavailable_limits: Vec::new(),
                host_uid,
                image: None,
                accelerator: None,
                snapshot: None,
            },
            setup_time: Duration::ZERO,
            cleanup: None,
            name: cgroup_name.clone(),
            pids_by_rlimit: false,
            output_grace: OUTPUT_GRACE,
            host_cpu_factor: 1,
        };
        sb.enforced.landlock.mode = match policy.isolation.landlock {
            LandlockMode::Strict => "strict".into(),
            LandlockMode::BestEffortDangerous => "best_effort_dangerous".into(),
        };
        sb.send_config(&init_cfg)?;
        let pid1 = sb.write_id_maps(pid, host_uid, host_gid)?;
        // cgroup v2: a helper thread creates the cgroup and moves pid 1 into
        // it while pid 1 builds the sandbox; pid 1 waits for `Attached`
        // before it creates its cgroup namespace and before anything
        // untrusted runs.
        let cgroup_job = match (&early_cgroup, self.cgroups.clone()) {
            (None, Some(layout @ Layout::V2 { .. })) => Some(std::thread::spawn(move || {
                Cgroup::create(&layout, &cgroup_name, &cgroup_limits)
                    .and_then(|cg| cg.add(pid1).map(|_| cg))
            })),
            _ => None,
        };
        let built = sb.expect_built();
        let cg = match cgroup_job.map(|j| j.join()) {
            _ if early_cgroup.is_some() => early_cgroup,
            Some(Ok(Ok(cg))) => Some(cg),
            Some(Ok(Err(e))) if euid == 0 => return Err(e),
            Some(Err(_)) if euid == 0 => {
                return Err(SandboxError::Cgroup {
                    step: "create",
                    source: io::Error::other("cgroup thread panicked"),
                });
            }
            _ => None,
        };
        if cg.is_none() {
            sb.enforced.unavailable_limits = vec![
                "memory: no cgroup, RLIMIT_DATA used (no swap control, no tmpfs accounting)".into(),
                "pids: no cgroup, RLIMIT_NPROC used".into(),
                "cpu quota: no cgroup, not enforced (CPU time still limited by RLIMIT_CPU)".into(),
            ];
        }
        sb.enforced.cgroup = cg.as_ref().map(Cgroup::version);
        sb.cgroup = cg;
        built?;
        sb.expect_ready()?;
        sb.setup_time = started.elapsed();
        Ok(sb)
    }

    /// Checks what a sandbox is built from (the policy's minimums for the
    /// language, the platform's files, environment, entry and egress) and
    /// resolves the runtime.
    pub(crate) fn check_spec(
        &self,
        policy: &Policy,
        lang: Language,
        extras: &Extras,
    ) -> Result<Runtime, SandboxError> {
        self.check_spec_in(policy, lang, extras, None)
    }

    /// [`Self::check_spec`] for a root that is `image` when given: the
    /// runtime is the image's, the policy may not bind host paths into it,
    /// and platform files go under [`crate::hosted::IMAGE_GUEST_ROOT`] (the
    /// only place an image root takes them).
    pub(crate) fn check_spec_in(
        &self,
        policy: &Policy,
        lang: Language,
        extras: &Extras,
        image: Option<&crate::hosted::ImageRoot>,
    ) -> Result<Runtime, SandboxError> {
        check_runnable(policy, lang)?;
        let files_bytes: usize = extras.files.iter().map(|(_, c)| c.len()).sum();
        if files_bytes > MAX_EXTRA_FILES_BYTES
            || extras.files.iter().any(|(target, _)| {
                !valid_target(target) || RESERVED_ROOTS.iter().any(|r| under(target, r))
            })
        {
            return Err(SandboxError::InvalidRequest(format!(
                "extra files need absolute paths outside {} and at most {} bytes in all",
                RESERVED_ROOTS.join(", "),
                MAX_EXTRA_FILES_BYTES
            )));
        }
        if extras.env.iter().any(|(k, v)| {
            !k.starts_with("AIRLOCK_")
                || !k
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
                || v.contains('\0')
                || v.len() > 4096
        }) {
            return Err(SandboxError::InvalidRequest(
                "extra environment names must be AIRLOCK_[A-Z0-9_]*".into(),
            ));
        }
        if let Some(ws) = &extras.workspace {
            // A session's workspace is bound only from a real directory
            // the platform made: never a symlink, never a relative path.
            // An image root takes it too: /workspace is a real directory
            // (never a symlink) of every imported image, checked at
            // import; the bind covers whatever the image put there.
            let is_dir = std::fs::symlink_metadata(ws).is_ok_and(|m| m.is_dir());
            if !ws.is_absolute() || !is_dir || ws.to_str().is_none() {
                return Err(SandboxError::InvalidRequest(
                    "a session workspace needs a directory".into(),
                ));
            }
        }
        let wants_proxy = policy.network.is_proxy();
        if wants_proxy != extras.egress {
            // Fail closed both ways: no silent "no network" for a policy
            // that asked for egress, no forwarder without a policy.
            return Err(SandboxError::InvalidRequest(if wants_proxy {
                "network.mode = \"proxy\" needs the egress proxy of `airlock serve` or `airlock run`".into()
            } else {
                "an egress channel needs network.mode = \"proxy\"".into()
            }));
        }
        if extras.entry.as_deref().is_some_and(|e| !valid_target(e)) {
            return Err(SandboxError::InvalidRequest(
                "entry must be an absolute path".into(),
            ));
        }
        if let Some(image) = image {
            if !policy.filesystem.read_only_paths.is_empty() {
                return Err(SandboxError::InvalidRequest(
                    "filesystem.read_only_paths name host paths, and this backend's root is \
                     an image: it holds none of the host"
                        .into(),
                ));
            }
            if extras
                .files
                .iter()
                .any(|(f, _)| !under(f, crate::hosted::IMAGE_GUEST_ROOT))
            {
                return Err(SandboxError::InvalidRequest(format!(
                    "extra files of an image root go under {}",
                    crate::hosted::IMAGE_GUEST_ROOT
                )));
            }
            return runtime::in_image(lang, image);
        }
        let runtime = self.runtime(lang)?;
        // Platform files go into the root's own tmpfs: never into (or
        // through) a bind mount or a symlink of the runtime, or of the
        // policy's read-only paths.
        let occupied = runtime
            .mounts
            .iter()
            .map(|m| m.target.as_str())
            .chain(runtime.symlinks.iter().map(|(p, _)| p.as_str()))
            .chain(policy.filesystem.read_only_paths.iter().map(String::as_str));
        for o in occupied {
            if extras.files.iter().any(|(f, _)| under(f, o) || under(o, f)) {
                return Err(SandboxError::InvalidRequest(
                    "extra files may not overlap the runtime's mounts or symlinks".into(),
                ));
            }
        }
        Ok(runtime)
    }

    /// Spawns a fresh `airlock __airlock-init` with the control socket at
    /// descriptor 3 and the broker and egress ends at 4 and 5.
    fn spawn_init(
        &self,
        child_fd: i32,
        child_broker_fd: Option<i32>,
        child_egress_fd: Option<i32>,
    ) -> Result<Child, SandboxError> {
        let mut cmd = Command::new(&self.cfg.init_path);
        // argv[0] is a name, not the binary's host path.
        std::os::unix::process::CommandExt::arg0(&mut cmd, "airlock");
        cmd.arg(INIT_ARG)
            .arg(std::process::id().to_string())
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // The descriptors the closure names (`child_fd`, `child_broker_fd`,
        // `child_egress_fd`) are owned by the caller's socket ends, alive
        // until after this function returns, so they are open in the child.
        // The broker and egress ends are first copied to >= 16, so placing
        // the control end at 3 cannot overwrite them, and their final dup2
        // to 4 and 5 cannot overwrite 3.
        // SAFETY: between fork and exec the closure calls only fcntl and
        // dup2 (async-signal-safe, no allocation) on those open descriptors.
        unsafe {
            cmd.pre_exec(move || {
                // Park the broker end above 4 first, so placing the control
                // end at 3 cannot clobber it (and vice versa).
                let parked = match child_broker_fd {
                    Some(fd) => Some(sys::dup_above(fd, 16)?),
                    None => None,
                };
                let parked_egress = match child_egress_fd {
                    Some(fd) => Some(sys::dup_above(fd, 16)?),
                    None => None,
                };
                if child_fd == CONTROL_FD {
                    sys::clear_cloexec(child_fd)?;
                } else {
                    sys::dup2(child_fd, CONTROL_FD)?;
                }
                if let Some(fd) = parked {
                    sys::dup2(fd, BROKER_FD)?;
                }
                match parked_egress {
                    Some(fd) => sys::dup2(fd, EGRESS_FD),
                    None => Ok(()),
                }
            });
        }
        cmd.spawn().map_err(SandboxError::SpawnInit)
    }
}

/// The socket pairs between the host and a sandbox: control, and the
/// broker and egress channels when the extras ask for them.
pub(crate) struct Channels {
    pub host_ctrl: UnixStream,
    pub child_ctrl: UnixStream,
    pub host_broker: Option<UnixStream>,
    pub child_broker: Option<UnixStream>,
    pub host_egress: Option<OwnedFd>,
    pub child_egress: Option<OwnedFd>,
}

impl Channels {
    pub(crate) fn new(extras: &Extras) -> Result<Channels, SandboxError> {
        let (host_ctrl, child_ctrl) = UnixStream::pair().map_err(SandboxError::SpawnInit)?;
        let (host_broker, child_broker) = if extras.broker {
            let (h, c) = UnixStream::pair().map_err(SandboxError::SpawnInit)?;
            (Some(h), Some(c))
        } else {
            (None, None)
        };
        // The egress channel carries one descriptor per message: a
        // SOCK_SEQPACKET pair keeps message boundaries.
        let (host_egress, child_egress) = if extras.egress {
            let (h, c) = rustix::net::socketpair(
                rustix::net::AddressFamily::UNIX,
                rustix::net::SocketType::SEQPACKET,
                rustix::net::SocketFlags::CLOEXEC,
                None,
            )
            .map_err(|e| SandboxError::SpawnInit(e.into()))?;
            (Some(h), Some(c))
        } else {
            (None, None)
        };
        Ok(Channels {
            host_ctrl,
            child_ctrl,
            host_broker,
            child_broker,
            host_egress,
            child_egress,
        })
    }
}

/// What is left of a sandbox once its result is known: processes that were
/// sent SIGKILL and its cgroup. Dropping it waits until every process is
/// gone and removes the cgroup.
#[derive(Debug)]
pub struct Teardown {
    _sandbox: Sandbox,
}

/// A sandbox with every layer applied, waiting for exactly one job.
#[derive(Debug)]
pub struct Sandbox {
    child: Option<InitProc>,
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
    ctrl: UnixStream,
    broker: Option<UnixStream>,
    egress: Option<OwnedFd>,
    init_broker: bool,
    /// The program was started before its execution was bound (a warm,
    /// pooled sandbox); its code arrives over the broker.
    prestarted: bool,
    entry: Option<String>,
    /// /workspace is a session's: the code file goes to /tmp.
    session_workspace: bool,
    extra_env: Vec<(String, String)>,
    pid1: Option<OwnedFd>,
    cgroup: Option<Cgroup>,
    runtime: Runtime,
    policy: Policy,
    enforced: Enforced,
    setup_time: Duration,
    /// Removes a runtime's state once every process is gone.
    cleanup: Option<Cleanup>,
    /// `<engine pid>-<n>`: its cgroup's and container's name.
    name: String,
    /// The host cgroup's pids limit cannot count the code's processes (a
    /// user-space kernel's tasks are not host tasks): RLIMIT_NPROC holds
    /// them instead.
    pids_by_rlimit: bool,
    /// How long output may take to end after the program exited (see
    /// [`crate::hosted::Isolated::output_grace`]).
    output_grace: Duration,
    /// The host cgroup's CPU budget in policy CPU times (see
    /// [`crate::hosted::Isolated::host_cpu_factor`]).
    host_cpu_factor: u64,
}

/// How long the program's output may take to end after it exited (its
/// descendants may hold it: they are killed then, and what they wrote is
/// drained).
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// A runtime's cleanup, run once when the sandbox is destroyed.
struct Cleanup(Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for Cleanup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cleanup")
    }
}

/// What [`crate::hosted`] builds a sandbox from.
pub(crate) struct HostedParts<'a> {
    pub child: InitProc,
    pub stdin: Option<File>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
    pub ctrl: UnixStream,
    pub broker: Option<UnixStream>,
    pub egress: Option<OwnedFd>,
    pub extras: &'a Extras,
    pub runtime: Runtime,
    pub policy: &'a Policy,
    pub enforced: Enforced,
    pub cgroup: Option<Cgroup>,
    pub cleanup: Option<Box<dyn FnOnce() + Send>>,
    pub platform_env: Vec<(String, String)>,
    pub name: String,
    pub pids_by_rlimit: bool,
    pub output_grace: Option<Duration>,
    pub host_cpu_factor: Option<u64>,
}

fn control_err(what: &str) -> impl Fn(io::Error) -> SandboxError + '_ {
    move |e| SandboxError::Control(format!("{what}: {e}"))
}

impl Sandbox {
    /// A sandbox around an agent a runtime started (see [`crate::hosted`]).
    pub(crate) fn hosted(p: HostedParts<'_>) -> Sandbox {
        Sandbox {
            child: Some(p.child),
            stdin: p.stdin,
            stdout: p.stdout,
            stderr: p.stderr,
            ctrl: p.ctrl,
            broker: p.broker,
            egress: p.egress,
            init_broker: p.extras.broker,
            prestarted: false,
            entry: p.extras.entry.clone(),
            session_workspace: p.extras.workspace.is_some(),
            extra_env: p.extras.env.iter().cloned().chain(p.platform_env).collect(),
            pid1: None,
            cgroup: p.cgroup,
            runtime: p.runtime,
            policy: p.policy.clone(),
            enforced: p.enforced,
            setup_time: Duration::ZERO,
            cleanup: p.cleanup.map(Cleanup),
            name: p.name,
            pids_by_rlimit: p.pids_by_rlimit,
            output_grace: p.output_grace.unwrap_or(OUTPUT_GRACE),
            host_cpu_factor: p.host_cpu_factor.unwrap_or(1).max(1),
        }
    }

    /// Names policy layers the sandbox runs without (only under
    /// `isolation.missing_layers = "record_dangerous"`, decided by its
    /// backend).
    pub fn record_missing_layers(&mut self, layers: Vec<String>) {
        self.enforced.missing_layers.extend(layers);
    }

    /// `<engine pid>-<n>`: the name of its cgroup (and container).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Up to 2 KiB of what a failed runtime wrote on stderr (one line),
    /// once its process has ended (waiting at most a second).
    pub(crate) fn runtime_stderr(&mut self) -> String {
        if let Some(InitProc::Child(c)) = self.child.as_mut() {
            let until = Instant::now() + Duration::from_secs(1);
            while Instant::now() < until && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let Some(f) = self.stderr.as_mut() else {
            return String::new();
        };
        if sys::set_nonblocking(f.as_raw_fd()).is_err() {
            return String::new();
        }
        let mut buf = vec![0u8; 2048];
        let n = f.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n])
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub(crate) fn ctrl_mut(&mut self) -> &mut UnixStream {
        &mut self.ctrl
    }

    pub(crate) fn set_setup_time(&mut self, d: Duration) {
        self.setup_time = d;
    }

    fn recv(&mut self) -> Result<FromInit, SandboxError> {
        let msg: FromInit = proto::read_msg(&mut self.ctrl, proto::MAX_FROM_INIT)
            .map_err(control_err("receive"))?;
        if let FromInit::Failed { step, errno } = &msg {
            return Err(SandboxError::Isolation {
                step: step.chars().take(64).collect(),
                detail: io::Error::from_raw_os_error(*errno).to_string(),
            });
        }
        Ok(msg)
    }

    /// Sends the configuration and waits until init has created its user
    /// and pid namespaces.
    fn send_config(&mut self, cfg: &InitConfig) -> Result<(), SandboxError> {
        self.ctrl
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(control_err("timeout"))?;
        proto::write_msg(&mut self.ctrl, &ToInit::Config(Box::new(cfg.clone())))
            .map_err(control_err("send config"))?;
        match self.recv()? {
            FromInit::Unshared => Ok(()),
            other => Err(SandboxError::Control(format!("unexpected {other:?}"))),
        }
    }

    /// Writes the id maps and waits until every layer is applied.
    /// Writes the id maps of stage 1's user namespace and returns the host
    /// pid of the sandbox's pid 1 (held as a pidfd from then on).
    fn write_id_maps(&mut self, pid: i32, uid: u32, gid: u32) -> Result<i32, SandboxError> {
        let proc_dir = format!("/proc/{pid}");
        std::fs::write(format!("{proc_dir}/setgroups"), "deny").map_err(SandboxError::IdMap)?;
        std::fs::write(
            format!("{proc_dir}/gid_map"),
            format!("{SANDBOX_GID} {gid} 1\n"),
        )
        .map_err(SandboxError::IdMap)?;
        std::fs::write(
            format!("{proc_dir}/uid_map"),
            format!("{SANDBOX_UID} {uid} 1\n"),
        )
        .map_err(SandboxError::IdMap)?;
        proto::write_msg(&mut self.ctrl, &ToInit::Mapped).map_err(control_err("send mapped"))?;
        match self.recv()? {
            FromInit::Pid1 { pid } if pid > 0 => {
                // Without a pidfd the sandbox could not be killed reliably: fail closed.
                self.pid1 = Some(sys::pidfd_open(pid).map_err(SandboxError::Supervise)?);
                Ok(pid)
            }
            other => Err(SandboxError::Control(format!("unexpected {other:?}"))),
        }
    }

    /// Waits until pid 1 has built the filesystem view and network.
    fn expect_built(&mut self) -> Result<(), SandboxError> {
        match self.recv()? {
            FromInit::Built => Ok(()),
            other => Err(SandboxError::Control(format!("unexpected {other:?}"))),
        }
    }

    /// Releases pid 1 (its cgroup is in place) and waits until every layer
    /// is applied.
    fn expect_ready(&mut self) -> Result<(), SandboxError> {
        proto::write_msg(&mut self.ctrl, &ToInit::Attached)
            .map_err(control_err("send attached"))?;
        self.expect_ready_msg()
    }

    /// Waits for `Ready` and records the Landlock status it reports.
    pub(crate) fn expect_ready_msg(&mut self) -> Result<(), SandboxError> {
        match self.recv()? {
            FromInit::Ready {
                landlock_abi,
                landlock_full,
            } => {
                self.enforced.landlock.abi = landlock_abi.min(crate::init::LANDLOCK_ABI_NUM);
                self.enforced.landlock.fully_enforced = landlock_full;
                Ok(())
            }
            other => Err(SandboxError::Control(format!("unexpected {other:?}"))),
        }
    }

    /// What this sandbox enforces.
    pub fn enforced(&self) -> &Enforced {
        &self.enforced
    }

    /// Starts the program now, before anything tenant-specific exists: the
    /// job carries no code and the program (a runner) waits for its code
    /// on the broker channel. Limits count from [`Sandbox::execute`]. This
    /// is what a warm pool holds.
    pub fn prestart(&mut self) -> Result<(), SandboxError> {
        if self.prestarted {
            return Ok(());
        }
        if !self.init_broker || self.entry.is_none() {
            return Err(SandboxError::InvalidRequest(
                "only a runner with a broker channel can be started before its code".into(),
            ));
        }
        let job = self.job(0, None);
        proto::write_msg(&mut self.ctrl, &ToInit::Job(Box::new(job)))
            .map_err(control_err("send job"))?;
        proto::write_frame(&mut self.ctrl, &[]).map_err(control_err("send code"))?;
        self.prestarted = true;
        Ok(())
    }

    /// Applies limits tighter than the ones the sandbox was built with, at
    /// the moment it is bound to an execution (a warm sandbox built for the
    /// base policy serving a request that only tightens it). Every field
    /// must be at most what it is; what a prestarted program already holds
    /// as an rlimit (open files; pids and memory where no cgroup counts
    /// them; CPU time where no cgroup is polled) can only stay equal.
    /// Nothing is changed when it refuses.
    pub fn tighten(&mut self, want: &airlock_policy::Limits) -> Result<(), SandboxError> {
        let have = &self.policy.limits;
        let refuse = |why: &str| {
            Err(SandboxError::InvalidRequest(format!(
                "not a tightening: {why}"
            )))
        };
        let looser = [
            ("wall_time_ms", want.wall_time_ms > have.wall_time_ms),
            ("cpu_time_ms", want.cpu_time_ms > have.cpu_time_ms),
            ("memory_mib", want.memory_mib > have.memory_mib),
            ("pids", want.pids > have.pids),
            ("cpus", want.cpus > have.cpus),
            ("stdout_bytes", want.stdout_bytes > have.stdout_bytes),
            ("stderr_bytes", want.stderr_bytes > have.stderr_bytes),
            ("stdin_bytes", want.stdin_bytes > have.stdin_bytes),
            ("code_bytes", want.code_bytes > have.code_bytes),
            ("open_files", want.open_files > have.open_files),
        ];
        if let Some((f, _)) = looser.iter().find(|(_, l)| *l) {
            return refuse(&format!("limits.{f} is above the sandbox's"));
        }
        let cg = self.cgroup.is_some();
        if self.prestarted {
            let held = [
                ("open_files", want.open_files != have.open_files),
                ("cpu_time_ms", !cg && want.cpu_time_ms != have.cpu_time_ms),
                (
                    "pids",
                    (!cg || self.pids_by_rlimit) && want.pids != have.pids,
                ),
                ("memory_mib", !cg && want.memory_mib != have.memory_mib),
            ];
            if let Some((f, _)) = held.iter().find(|(_, d)| *d) {
                return refuse(&format!(
                    "limits.{f} is an rlimit the program already holds"
                ));
            }
        }
        if let Some(cg) = &mut self.cgroup
            && (want.memory_mib != have.memory_mib
                || want.pids != have.pids
                || want.cpus != have.cpus)
        {
            // The host cgroup may hold more than the code (gVisor's sentry):
            // the difference the sandbox was built with is kept.
            let built = cg.limits();
            let extra_mem = built.memory_bytes.saturating_sub(have.memory_mib << 20);
            let extra_pids = built.pids.saturating_sub(have.pids);
            cg.set_limits(&CgroupLimits {
                memory_bytes: (want.memory_mib << 20) + extra_mem,
                pids: want.pids + extra_pids,
                cpus: want.cpus,
            })?;
        }
        self.policy.limits = want.clone();
        Ok(())
    }

    /// Whether an idle (pooled) sandbox is still whole: pid 1 alive and
    /// nothing reported on the control channel (such as the program's exit).
    pub fn is_alive(&self) -> bool {
        let mut fds = vec![(self.ctrl.as_raw_fd(), libc::POLLIN)];
        if let Some(p) = &self.pid1 {
            fds.push((p.as_raw_fd(), libc::POLLIN));
        }
        match sys::poll(&fds, 0) {
            Ok(rev) => rev.iter().all(|r| *r == 0),
            Err(_) => false,
        }
    }

    /// The host end of the egress channel (once): a SOCK_SEQPACKET socket
    /// on which each message carries one TCP connection accepted by the
    /// forwarder inside the sandbox.
    pub fn take_egress(&mut self) -> Option<OwnedFd> {
        self.egress.take()
    }

    /// The host end of the broker channel (once).
    pub fn take_broker(&mut self) -> Option<UnixStream> {
        self.broker.take()
    }

    /// Host cgroup directories of this sandbox (what a crashed server
    /// must reap on restart).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        self.cgroup.as_ref().map(Cgroup::dirs).unwrap_or_default()
    }

    /// Binds the job, runs it to the end and destroys the sandbox.
    pub fn execute(
        self,
        code: &[u8],
        file_name: Option<&str>,
        stdin: &[u8],
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> RunResult {
        self.execute_cancellable(code, file_name, stdin, on_output, &CancelToken::new())
    }

    /// [`Sandbox::execute`], stoppable from another thread through `cancel`.
    pub fn execute_cancellable(
        self,
        code: &[u8],
        file_name: Option<&str>,
        stdin: &[u8],
        on_output: &mut dyn FnMut(Stream, &[u8]),
        cancel: &CancelToken,
    ) -> RunResult {
        self.execute_from(code, file_name, stdin, on_output, cancel, &mut || {})
    }

    /// [`Sandbox::execute_cancellable`], calling `on_start` once the clocks
    /// run (wall time started, CPU baseline taken) and before the program
    /// gets its job. A prestarted program can only start working after
    /// something `on_start` attaches (its broker session), so nothing it
    /// does escapes the limits.
    pub fn execute_from(
        self,
        code: &[u8],
        file_name: Option<&str>,
        stdin: &[u8],
        on_output: &mut dyn FnMut(Stream, &[u8]),
        cancel: &CancelToken,
        on_start: &mut dyn FnMut(),
    ) -> RunResult {
        let (result, teardown) =
            self.execute_deferred(code, file_name, stdin, on_output, cancel, on_start);
        drop(teardown);
        result
    }

    /// [`Sandbox::execute_from`], returning as soon as the result is known:
    /// every process has been sent SIGKILL and the output is drained, while
    /// waiting for the processes to be gone and removing the cgroup is left
    /// to the returned [`Teardown`] (dropping it does that, on any thread).
    pub fn execute_deferred(
        mut self,
        code: &[u8],
        file_name: Option<&str>,
        stdin: &[u8],
        on_output: &mut dyn FnMut(Stream, &[u8]),
        cancel: &CancelToken,
        on_start: &mut dyn FnMut(),
    ) -> (RunResult, Teardown) {
        let started = Instant::now();
        // The CPU the sandbox used before its job (a prestarted program's
        // start, a runtime's own setup: runc, gVisor's sentry, a microVM's
        // boot) is the platform's, not the code's: its limit and its
        // accounting start here.
        let base = self.cgroup.as_ref().map(Cgroup::stats).unwrap_or_default();
        let mut sup = Supervision {
            cancel: Some(cancel.clone()),
            cpu_base: (base.cpu_user_ns.unwrap_or(0), base.cpu_sys_ns.unwrap_or(0)),
            ..Supervision::default()
        };
        on_start();
        if let Err(e) = self.supervise(code, file_name, stdin, on_output, &mut sup, started) {
            sup.internal = Some(e);
        }
        let wall = started.elapsed();
        // Every process is sent SIGKILL now; waiting for them to be gone and
        // removing the cgroup is the teardown's job.
        self.signal_kill();
        // Drain what is left in the pipes: they reach end of file as the
        // last process holding them dies.
        self.drain(&mut sup, on_output);
        let result = self.finish(sup, wall);
        (result, Teardown { _sandbox: self })
    }

    /// Sends SIGKILL to every process of the sandbox without waiting.
    fn signal_kill(&mut self) {
        if let Some(pidfd) = &self.pid1 {
            let _ = sys::pidfd_kill(pidfd);
        }
        if let Some(cg) = &self.cgroup {
            cg.signal_all();
        }
        match self.child.as_mut() {
            Some(InitProc::Child(child)) => {
                let _ = child.kill();
            }
            Some(InitProc::Forked(pidfd)) => {
                let _ = sys::pidfd_kill(pidfd);
            }
            None => {}
        }
    }

    fn job(&self, code_len: usize, file_name: Option<&str>) -> Job {
        let l = &self.policy.limits;
        let name = match file_name {
            Some(n) if safe_file_name(n) => n.to_string(),
            _ => format!("main.{}", self.runtime.extension),
        };
        let (argv, env) = program_argv_env(
            &self.policy,
            &self.runtime,
            self.entry.as_deref(),
            self.init_broker,
            &self.extra_env,
            crate::launch::code_dir(self.session_workspace),
            &name,
        );
        let have_cg = self.cgroup.is_some();
        Job {
            file_name: name,
            code_len: code_len as u64,
            argv,
            env,
            cpu_seconds: l.cpu_time_ms.div_ceil(1000),
            open_files: l.open_files,
            // Above the scratch cap, so a full tmpfs reports ENOSPC first.
            file_size: (self.policy.filesystem.scratch_mib + 1) << 20,
            nproc: (!have_cg || self.pids_by_rlimit).then_some(l.pids),
            data_bytes: (!have_cg).then_some(l.memory_mib << 20),
            deny_execve: self.policy.syscalls.deny_execve,
        }
    }

    fn supervise(
        &mut self,
        code: &[u8],
        file_name: Option<&str>,
        stdin: &[u8],
        on_output: &mut dyn FnMut(Stream, &[u8]),
        sup: &mut Supervision,
        started: Instant,
    ) -> Result<(), SandboxError> {
        if !self.prestarted {
            let job = self.job(code.len(), file_name);
            proto::write_msg(&mut self.ctrl, &ToInit::Job(Box::new(job)))
                .map_err(control_err("send job"))?;
            proto::write_frame(&mut self.ctrl, code).map_err(control_err("send code"))?;
        }

        let mut stdin_w = self.stdin.take();
        let mut stdout = self.stdout.take();
        let mut stderr = self.stderr.take();
        let r = self.pump(
            stdin,
            &mut stdin_w,
            &mut stdout,
            &mut stderr,
            on_output,
            sup,
            started,
        );
        // Give the readers back for the final drain.
        self.stdout = stdout;
        self.stderr = stderr;
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn pump(
        &mut self,
        stdin: &[u8],
        stdin_w: &mut Option<File>,
        stdout: &mut Option<File>,
        stderr: &mut Option<File>,
        on_output: &mut dyn FnMut(Stream, &[u8]),
        sup: &mut Supervision,
        started: Instant,
    ) -> Result<(), SandboxError> {
        for fd in [
            stdout.as_ref().map(|s| s.as_raw_fd()),
            stderr.as_ref().map(|s| s.as_raw_fd()),
        ]
        .into_iter()
        .flatten()
        {
            sys::set_nonblocking(fd).map_err(SandboxError::Supervise)?;
        }
        if let Some(w) = &stdin_w {
            sys::set_nonblocking(w.as_raw_fd()).map_err(SandboxError::Supervise)?;
        }
        self.ctrl
            .set_nonblocking(true)
            .map_err(SandboxError::Supervise)?;
        if stdin.is_empty() {
            *stdin_w = None;
        }
        let mut stdin_off = 0usize;
        let deadline = started + Duration::from_millis(self.policy.limits.wall_time_ms);
        // A prestarted program's start-up is not the execution's: CPU
        // counts from the bind.
        let cpu_base_ns = sup.cpu_base.0 + sup.cpu_base.1;
        let cpu_limit_ns = self
            .policy
            .limits
            .cpu_time_ms
            .saturating_mul(1_000_000)
            .saturating_mul(self.host_cpu_factor)
            .saturating_add(cpu_base_ns);
        let mut ctrl_buf: Vec<u8> = Vec::new();
        let mut ctrl_open = true;
        let mut exit_seen: Option<Instant> = None;
        let mut buf = vec![0u8; 64 * 1024];

        loop {
            if (sup.exit.is_some() && stdout.is_none() && stderr.is_none()) || !ctrl_open {
                return Ok(());
            }
            if sup.exit.is_some()
                && exit_seen.get_or_insert_with(Instant::now).elapsed() > self.output_grace
            {
                // The program is gone; descendants holding the pipes are
                // killed by destroy() and drained afterwards.
                return Ok(());
            }
            if let Some(r) = sup.cancel.as_ref().and_then(CancelToken::reason) {
                sup.engine_reason.get_or_insert(r);
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                sup.engine_reason.get_or_insert(TerminationReason::Timeout);
                return Ok(());
            }
            if let Some(cg) = &self.cgroup
                && cg.cpu_usage_ns().is_some_and(|u| u >= cpu_limit_ns)
            {
                sup.engine_reason.get_or_insert(TerminationReason::CpuLimit);
                return Ok(());
            }
            let mut fds: Vec<(i32, i16)> = vec![(self.ctrl.as_raw_fd(), libc::POLLIN)];
            let out_fd = stdout.as_ref().map(|s| s.as_raw_fd());
            let err_fd = stderr.as_ref().map(|s| s.as_raw_fd());
            let in_fd = stdin_w.as_ref().map(|s| s.as_raw_fd());
            for fd in [out_fd, err_fd].into_iter().flatten() {
                fds.push((fd, libc::POLLIN));
            }
            if let Some(fd) = in_fd {
                fds.push((fd, libc::POLLOUT));
            }
            let wait = deadline
                .saturating_duration_since(now)
                .min(Duration::from_millis(50));
            let revents =
                sys::poll(&fds, wait.as_millis().max(1) as i32).map_err(SandboxError::Supervise)?;
            for (i, &(fd, _)) in fds.iter().enumerate() {
                let rev = revents[i];
                if rev == 0 {
                    continue;
                }
                if fd == self.ctrl.as_raw_fd() {
                    match self.ctrl.read(&mut buf) {
                        Ok(0) => ctrl_open = false,
                        Ok(n) => {
                            ctrl_buf.extend_from_slice(&buf[..n]);
                            if ctrl_buf.len() > proto::MAX_FROM_INIT + 4 {
                                return Err(SandboxError::Control(
                                    "oversized message from sandbox".into(),
                                ));
                            }
                            let mut cursor = ctrl_buf.as_slice();
                            if ctrl_buf.len() >= 4 {
                                let len = u32::from_le_bytes([
                                    ctrl_buf[0],
                                    ctrl_buf[1],
                                    ctrl_buf[2],
                                    ctrl_buf[3],
                                ]) as usize;
                                if len > proto::MAX_FROM_INIT {
                                    return Err(SandboxError::Control(
                                        "oversized message from sandbox".into(),
                                    ));
                                }
                                if ctrl_buf.len() >= 4 + len {
                                    let msg: FromInit =
                                        proto::read_msg(&mut cursor, proto::MAX_FROM_INIT)
                                            .map_err(control_err("decode"))?;
                                    match msg {
                                        FromInit::Exited { .. } => sup.exit = Some(msg),
                                        FromInit::Failed { step, errno } => {
                                            return Err(SandboxError::Isolation {
                                                step: step.chars().take(64).collect(),
                                                detail: io::Error::from_raw_os_error(errno)
                                                    .to_string(),
                                            });
                                        }
                                        other => {
                                            return Err(SandboxError::Control(format!(
                                                "unexpected {other:?}"
                                            )));
                                        }
                                    }
                                }
                            }
                        }
                        Err(e)
                            if e.kind() == io::ErrorKind::WouldBlock
                                || e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => ctrl_open = false,
                    }
                } else if Some(fd) == in_fd {
                    let Some(w) = stdin_w.as_mut() else { continue };
                    if rev & (libc::POLLERR | libc::POLLHUP) != 0 {
                        *stdin_w = None;
                        continue;
                    }
                    match w.write(&stdin[stdin_off..]) {
                        Ok(n) => {
                            stdin_off += n;
                            if stdin_off >= stdin.len() {
                                *stdin_w = None;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => *stdin_w = None,
                    }
                } else {
                    let (stream, reader) = if Some(fd) == out_fd {
                        (Stream::Stdout, &mut *stdout)
                    } else {
                        (Stream::Stderr, &mut *stderr)
                    };
                    let Some(r) = reader.as_mut() else { continue };
                    match r.read(&mut buf) {
                        Ok(0) => *reader = None,
                        Ok(n) => {
                            if sup.capture(stream, &buf[..n], &self.policy, on_output) {
                                sup.engine_reason
                                    .get_or_insert(TerminationReason::OutputLimit);
                                return Ok(());
                            }
                        }
                        Err(e)
                            if e.kind() == io::ErrorKind::WouldBlock
                                || e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => *reader = None,
                    }
                }
            }
        }
    }

    /// Kills every process of the sandbox and reaps init. Idempotent.
    fn destroy(&mut self) {
        if let Some(pidfd) = self.pid1.take() {
            let _ = sys::pidfd_kill(&pidfd);
        }
        if let Some(cg) = &self.cgroup {
            cg.kill_all();
        }
        match self.child.as_mut() {
            Some(InitProc::Child(child)) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Some(InitProc::Forked(pidfd)) => {
                // The zygote reaps it; the cgroup can only be removed once
                // it has exited.
                let _ = sys::pidfd_kill(pidfd);
                sys::pidfd_wait_exit(pidfd, 2000);
            }
            None => {}
        }
    }

    fn drain(&mut self, sup: &mut Supervision, on_output: &mut dyn FnMut(Stream, &[u8])) {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut buf = vec![0u8; 64 * 1024];
        for (stream, reader) in [
            (Stream::Stdout, self.stdout.take()),
            (Stream::Stderr, self.stderr.take()),
        ] {
            let Some(mut f) = reader else { continue };
            while Instant::now() < deadline {
                match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if sup.capture(stream, &buf[..n], &self.policy, on_output) {
                            sup.engine_reason
                                .get_or_insert(TerminationReason::OutputLimit);
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        let _ = sys::poll(&[(f.as_raw_fd(), libc::POLLIN)], 20);
                    }
                    Err(_) => break,
                }
            }
        }
    }

    fn finish(&mut self, sup: Supervision, wall: Duration) -> RunResult {
        let stats = self.cgroup.as_ref().map(Cgroup::stats).unwrap_or_default();
        let (
            mut code,
            mut signal,
            mut user_us,
            mut sys_us,
            mut rss_kib,
            mut scratch_full,
            mut exec_errno,
            mut guest_oom_kills,
        ) = (None, None, 0, 0, 0, false, None, 0);
        if let Some(FromInit::Exited {
            code: c,
            signal: s,
            user_us: u,
            sys_us: sy,
            maxrss_kib,
            scratch_full: f,
            exec_errno: x,
            oom_kills,
        }) = sup.exit
        {
            (
                code,
                signal,
                user_us,
                sys_us,
                rss_kib,
                scratch_full,
                exec_errno,
                guest_oom_kills,
            ) = (c, s, u, sy, maxrss_kib, f, x, oom_kills);
        }
        let cpu_user_ms = stats.cpu_user_ns.map_or(user_us as f64 / 1000.0, |n| {
            n.saturating_sub(sup.cpu_base.0) as f64 / 1e6
        });
        let cpu_sys_ms = stats.cpu_sys_ns.map_or(sys_us as f64 / 1000.0, |n| {
            n.saturating_sub(sup.cpu_base.1) as f64 / 1e6
        });
        let cpu_total_ms = cpu_user_ms + cpu_sys_ms;
        let mut error = None;
        let reason = if let Some(e) = &sup.internal {
            error = Some(e.public_message());
            TerminationReason::InternalError
        } else if signal == Some(libc::SIGSYS) {
            TerminationReason::PolicyViolation
        } else if stats.oom_kills > 0 || guest_oom_kills > 0 {
            // The host's cgroup, or the cgroup a guest kernel keeps around
            // the sandbox (its count as the agent read it).
            TerminationReason::MemoryLimit
        } else if let Some(r) = sup.engine_reason {
            r
        } else if sup.exit.is_none() {
            error = Some("sandbox init ended without a report".into());
            TerminationReason::InternalError
        } else if let Some(errno) = exec_errno {
            error = Some(format!(
                "the interpreter could not start: {}",
                io::Error::from_raw_os_error(errno)
            ));
            TerminationReason::InternalError
        } else if signal == Some(libc::SIGXCPU)
            || (signal == Some(libc::SIGKILL)
                && cpu_total_ms >= self.policy.limits.cpu_time_ms as f64)
        {
            TerminationReason::CpuLimit
        } else if signal == Some(libc::SIGXFSZ) || (scratch_full && code != Some(0)) {
            TerminationReason::DiskLimit
        } else if stats.pids_max_hits > 0 && code != Some(0) {
            TerminationReason::PidsLimit
        } else {
            TerminationReason::Exited
        };
        if sup.engine_reason.is_some() && reason != TerminationReason::Exited && sup.exit.is_none()
        {
            signal = Some(libc::SIGKILL);
            code = None;
        }
        RunResult {
            exit_code: code,
            signal,
            reason,
            wall_time_ms: wall.as_secs_f64() * 1000.0,
            setup_time_ms: self.setup_time.as_secs_f64() * 1000.0,
            cpu_user_ms,
            cpu_sys_ms,
            peak_memory_bytes: stats
                .peak_memory
                .or((rss_kib > 0).then_some(rss_kib * 1024)),
            stdout: String::from_utf8_lossy(&sup.out).into_owned(),
            stderr: String::from_utf8_lossy(&sup.err).into_owned(),
            stdout_truncated: sup.out_truncated,
            stderr_truncated: sup.err_truncated,
            enforced: self.enforced.clone(),
            error,
            stdout_raw: sup.out,
            stderr_raw: sup.err,
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.destroy();
        if let Some(Cleanup(f)) = self.cleanup.take() {
            f();
        }
        if let Some(mut cg) = self.cgroup.take() {
            cg.remove();
        }
    }
}

#[derive(Default)]
struct Supervision {
    out: Vec<u8>,
    err: Vec<u8>,
    out_truncated: bool,
    err_truncated: bool,
    exit: Option<FromInit>,
    engine_reason: Option<TerminationReason>,
    internal: Option<SandboxError>,
    cancel: Option<CancelToken>,
    /// cgroup CPU (user, sys) ns already used when the execution was bound.
    cpu_base: (u64, u64),
}

impl Supervision {
    /// Appends within the cap; returns true when the cap was exceeded.
    fn capture(
        &mut self,
        stream: Stream,
        data: &[u8],
        policy: &Policy,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> bool {
        let (buf, cap, truncated) = match stream {
            Stream::Stdout => (
                &mut self.out,
                policy.limits.stdout_bytes as usize,
                &mut self.out_truncated,
            ),
            Stream::Stderr => (
                &mut self.err,
                policy.limits.stderr_bytes as usize,
                &mut self.err_truncated,
            ),
        };
        let room = cap.saturating_sub(buf.len());
        let take = room.min(data.len());
        if take > 0 {
            buf.extend_from_slice(&data[..take]);
            on_output(stream, &data[..take]);
        }
        if take < data.len() {
            *truncated = true;
            return true;
        }
        false
    }
}
