//! The in-sandbox init: synchronous, single-threaded, no tokio.
//!
//! The engine execs the airlock binary with [`INIT_ARG`]; `main` dispatches
//! here before anything else runs. Two stages:
//!
//! * **stage 1** (host pid namespace): reads the [`InitConfig`], drops
//!   supplementary groups, creates the user and pid namespaces, waits for the
//!   engine to write the id maps, becomes the unprivileged sandbox user and
//!   forks stage 2. It then only waits; it never runs untrusted code.
//! * **stage 2** (pid 1 of the new pid namespace): applies every layer in the
//!   order of [`Step`], reports `Ready`, waits for one [`Job`], writes the
//!   code into scratch, forks the program, reaps, reports `Exited` and exits,
//!   which makes the kernel SIGKILL everything left in the namespace.
//!
//! Stage 2 stops at `Ready` with every layer already applied and nothing
//! tenant-specific inside: that is the point where a warm pool can park it.

use std::ffi::{CStr, CString};
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus,
};

use crate::launch::{
    BROKER_FD, CONTROL_FD, EGRESS_FD, Launch, PROXY_PORT, SANDBOX_GID, SANDBOX_UID,
};
use crate::proto::{self, FromInit, InitConfig, Job, ToInit};
use crate::sys::{self, ChildStatus, Forked};

/// The Landlock ABI airlock pins. Strict mode requires every access right of
/// this ABI to be enforced (Linux 6.10+).
pub const LANDLOCK_ABI: ABI = ABI::V5;
/// The numeric value of [`LANDLOCK_ABI`].
pub const LANDLOCK_ABI_NUM: u32 = 5;
/// Where stage 2 assembles the new root (inside its private mount namespace).
const NEW_ROOT: &str = "/tmp";

/// The isolation steps, in the order they are applied. Each is reported on
/// its own when it fails, so an operator knows exactly which layer is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read the configuration frame: without it nothing is known.
    ReadConfig,
    /// Join the sandbox cgroup (v1: the process moves itself, which avoids
    /// the kernel's global migration lock); every later process inherits it.
    CgroupJoin,
    /// Drop host supplementary groups (root's group 0 would otherwise stay
    /// attached to the sandbox's credentials).
    ClearGroups,
    /// Create the user + pid namespaces: the program must never hold host
    /// privileges, and must not see or signal host processes.
    UserPidNamespace,
    /// Wait for the engine to write the uid/gid maps.
    IdMaps,
    /// Become the unprivileged sandbox uid/gid (mapped to an unprivileged host id).
    SetIds,
    /// Re-arm the parent-death signal cleared by the credential change, so
    /// the sandbox dies with the engine.
    ParentDeath,
    /// Fork pid 1 of the new pid namespace.
    ForkPid1,
    /// New mount, network, IPC and UTS namespaces: private mount table, no
    /// network but loopback, private SysV IPC, own hostname.
    Namespaces,
    /// Stop mount propagation to and from the host.
    MakePrivate,
    /// A tmpfs that becomes the new root.
    RootTmpfs,
    /// Read-only bind mounts of the language runtime only.
    BindRuntime,
    /// Symlinks such as /bin -> usr/bin.
    Symlinks,
    /// Platform files written into the root (the guest SDKs): their
    /// contents travel in the configuration, so no host directory is
    /// mounted and no host path appears in the sandbox's mount table.
    PlatformFiles,
    /// A minimal generated /etc with no host passwd/shadow contents.
    Etc,
    /// A minimal /dev: null, zero, full, random, urandom; no tty or console.
    Dev,
    /// A fresh /proc for the new pid namespace.
    Proc,
    /// Mask sensitive /proc files and make /proc/sys read-only.
    MaskProc,
    /// Private size- and inode-capped tmpfs for /tmp, /workspace and /dev/shm.
    Scratch,
    /// Switch to the new root.
    PivotRoot,
    /// Detach the old root so no host path remains reachable.
    DetachOldRoot,
    /// Make the root filesystem and /dev read-only.
    RootReadOnly,
    /// Set the sandbox hostname.
    Hostname,
    /// Bring loopback up (the only interface).
    Loopback,
    /// Wait until the engine has put this process into the sandbox cgroup,
    /// then root a new cgroup namespace there: no view of the host cgroup tree.
    CgroupNamespace,
    /// New session: no controlling terminal (defeats TIOCSTI-style injection).
    Setsid,
    /// Close every descriptor but stdio and the control socket.
    CloseFds,
    /// Non-dumpable init: its /proc entries (environ, mem, fd) are unreadable.
    Dumpable,
    /// RLIMIT_CORE 0.
    CoreLimit,
    /// Make the program, not init, the memory-cgroup OOM victim.
    OomScore,
    /// Drop every capability (bounding, ambient, effective, permitted, inheritable).
    DropCapabilities,
    /// PR_SET_NO_NEW_PRIVS: exec can never grant privileges.
    NoNewPrivs,
    /// Landlock: read-only everywhere except scratch.
    Landlock,
    /// seccomp-BPF filters.
    Seccomp,
    /// Receive the job.
    ReadJob,
    /// Write the submitted code into /workspace.
    WriteCode,
    /// Start the egress forwarder on 127.0.0.1 (proxy policies only).
    Egress,
    /// Fork the program.
    ForkProgram,
}

impl Step {
    /// Stable snake_case name.
    pub fn name(self) -> &'static str {
        match self {
            Step::ReadConfig => "read_config",
            Step::CgroupJoin => "cgroup_join",
            Step::ClearGroups => "clear_groups",
            Step::UserPidNamespace => "user_pid_namespace",
            Step::IdMaps => "id_maps",
            Step::SetIds => "set_ids",
            Step::ParentDeath => "parent_death_signal",
            Step::ForkPid1 => "fork_pid1",
            Step::Namespaces => "namespaces",
            Step::MakePrivate => "make_mounts_private",
            Step::RootTmpfs => "root_tmpfs",
            Step::BindRuntime => "bind_runtime",
            Step::Symlinks => "symlinks",
            Step::PlatformFiles => "platform_files",
            Step::Etc => "etc",
            Step::Dev => "dev",
            Step::Proc => "proc",
            Step::MaskProc => "mask_proc",
            Step::Scratch => "scratch",
            Step::PivotRoot => "pivot_root",
            Step::DetachOldRoot => "detach_old_root",
            Step::RootReadOnly => "root_read_only",
            Step::Hostname => "hostname",
            Step::Loopback => "loopback",
            Step::CgroupNamespace => "cgroup_namespace",
            Step::Setsid => "setsid",
            Step::CloseFds => "close_fds",
            Step::Dumpable => "not_dumpable",
            Step::CoreLimit => "core_limit",
            Step::OomScore => "oom_score",
            Step::DropCapabilities => "drop_capabilities",
            Step::NoNewPrivs => "no_new_privs",
            Step::Landlock => "landlock",
            Step::Seccomp => "seccomp",
            Step::ReadJob => "read_job",
            Step::WriteCode => "write_code",
            Step::Egress => "egress_forwarder",
            Step::ForkProgram => "fork_program",
        }
    }
}

pub(crate) type StepResult<T> = Result<T, (Step, i32)>;

/// Writes read-only (0444) files into the new root, creating their parent
/// directories; never follows a link and never replaces what exists.
fn write_ro_files(
    files: &[crate::proto::RoFile],
    step: Step,
    nr: &dyn Fn(&str) -> String,
) -> StepResult<()> {
    for f in files {
        let p = nr(&f.path);
        if let Some(parent) = std::path::Path::new(&p).parent() {
            at(
                step,
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent),
            )?;
        }
        at(
            step,
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o444)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&p)
                .and_then(|mut w| w.write_all(f.contents.as_bytes())),
        )?;
    }
    Ok(())
}

pub(crate) fn at<T, E: Into<StepErr>>(step: Step, r: Result<T, E>) -> StepResult<T> {
    r.map_err(|e| (step, e.into().0))
}

/// An errno carrier so `at` accepts io errors and plain failures alike.
pub(crate) struct StepErr(i32);
impl From<std::io::Error> for StepErr {
    fn from(e: std::io::Error) -> Self {
        StepErr(e.raw_os_error().unwrap_or(0))
    }
}
impl From<()> for StepErr {
    fn from(_: ()) -> Self {
        StepErr(0)
    }
}

fn cstr(s: &str) -> CString {
    // Paths built here never contain NUL: they come from validated config.
    CString::new(s).unwrap_or_default()
}

/// Entry point for the init process. `args` are the process arguments after
/// [`INIT_ARG`]: the engine's pid.
pub fn main(args: &[String]) -> ! {
    let code = stage1(args).unwrap_or(1);
    sys::exit_now(code)
}

pub(crate) fn report(ctrl: &mut UnixStream, (step, errno): (Step, i32)) {
    let _ = proto::write_msg(
        ctrl,
        &FromInit::Failed {
            step: step.name().into(),
            errno,
        },
    );
}

fn stage1(args: &[String]) -> Result<i32, ()> {
    let expected_parent: i32 = args.first().and_then(|a| a.parse().ok()).ok_or(())?;
    stage1_from(expected_parent, Launch::Exec)
}

/// Stage 1, for a freshly exec'd init or a child forked by a zygote
/// (`expected_parent` is the engine or the zygote).
pub(crate) fn stage1_from(expected_parent: i32, launch: Launch<'_>) -> Result<i32, ()> {
    // Anything inherited beyond stdio, the control socket and the broker
    // and egress channels is a leak.
    sys::close_from(EGRESS_FD as u32 + 1).map_err(|_| ())?;
    sys::set_parent_death_kill().map_err(|_| ())?;
    if sys::getppid() != expected_parent {
        return Err(());
    }
    // SAFETY: the engine passes the control socket as descriptor 3 and
    // nothing else in this freshly exec'd process owns it.
    let mut ctrl = UnixStream::from(unsafe { sys::owned(CONTROL_FD) });
    let cfg = match proto::read_msg::<_, ToInit>(&mut ctrl, proto::MAX_TO_INIT) {
        Ok(ToInit::Config(cfg)) => cfg,
        _ => {
            report(&mut ctrl, (Step::ReadConfig, 0));
            return Err(());
        }
    };
    // The engine says which start-up it arranged; anything else is refused.
    if cfg.zygote != matches!(launch, Launch::Inherited(_)) {
        report(&mut ctrl, (Step::ReadConfig, libc::EINVAL));
        return Err(());
    }
    // Without a broker, descriptor 4 is whatever leaked in: close it. With
    // one, it must be the socket the engine passed.
    if !cfg.broker {
        sys::close_unowned(BROKER_FD);
    } else if !sys::is_socket(BROKER_FD) {
        report(&mut ctrl, (Step::CloseFds, libc::EBADF));
        return Err(());
    }
    if !cfg.egress {
        sys::close_unowned(EGRESS_FD);
    } else if !sys::is_socket(EGRESS_FD) {
        report(&mut ctrl, (Step::CloseFds, libc::EBADF));
        return Err(());
    }
    let mut cfg = cfg;
    let r = (|| -> StepResult<()> {
        for tasks in &cfg.cgroup_tasks {
            at(Step::CgroupJoin, fs::write(tasks, "0"))?;
        }
        // Host cgroup paths are not needed again; a zygote-forked program
        // inherits this memory, so they are wiped, not just dropped.
        for t in cfg.cgroup_tasks.drain(..) {
            drop(zeroize::Zeroizing::new(t));
        }
        if sys::geteuid() == 0 {
            at(Step::ClearGroups, sys::clear_groups())?;
        }
        at(
            Step::UserPidNamespace,
            sys::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWPID),
        )?;
        at(
            Step::IdMaps,
            proto::write_msg(&mut ctrl, &FromInit::Unshared),
        )?;
        match proto::read_msg::<_, ToInit>(&mut ctrl, 1024) {
            Ok(ToInit::Mapped) => {}
            _ => return Err((Step::IdMaps, 0)),
        }
        at(Step::SetIds, sys::set_ids(SANDBOX_UID, SANDBOX_GID))?;
        at(Step::ParentDeath, sys::set_parent_death_kill())?;
        if sys::getppid() != expected_parent {
            return Err((Step::ParentDeath, libc::ESRCH));
        }
        Ok(())
    })();
    if let Err(e) = r {
        report(&mut ctrl, e);
        return Err(());
    }
    let (go_r, go_w) = sys::pipe().map_err(|_| report(&mut ctrl, (Step::ForkPid1, 0)))?;
    // SAFETY: init is single-threaded (a fresh exec; no threads are started).
    match unsafe { sys::fork() } {
        Err(e) => {
            report(&mut ctrl, (Step::ForkPid1, e.raw_os_error().unwrap_or(0)));
            Err(())
        }
        Ok(Forked::Parent(pid)) => {
            drop(go_r);
            // Stage 1 keeps no copy of the broker or egress channels. Only
            // when they exist: otherwise those numbers may now be the pipe
            // above.
            if cfg.broker {
                sys::close_unowned(BROKER_FD);
            }
            if cfg.egress {
                sys::close_unowned(EGRESS_FD);
            }
            // Stage 1 only waits from here on: it gives up the capabilities
            // it holds in the sandbox's user namespace (defence in depth; the
            // program cannot see it, it lives in the parent pid namespace).
            let dropped = sys::drop_bounding_and_ambient()
                .and_then(|_| sys::clear_capabilities())
                .and_then(|_| sys::set_no_new_privs());
            if dropped.is_err() {
                let _ = sys::kill(pid, libc::SIGKILL);
                return Err(());
            }
            let sent = proto::write_msg(&mut ctrl, &FromInit::Pid1 { pid });
            drop(ctrl);
            // Release pid 1 only after the engine knows its host pid.
            let mut go_w = fs::File::from(go_w);
            if sent.is_err() || go_w.write_all(b"g").is_err() {
                let _ = sys::kill(pid, libc::SIGKILL);
            }
            drop(go_w);
            // Stage 1 keeps no stdio: the pipes' only holders are the sandbox.
            for fd in 0..3 {
                // SAFETY: descriptors 0-2 are owned by no Rust object here.
                drop(unsafe { sys::owned(fd) });
            }
            let _ = sys::wait_pid(pid);
            Ok(0)
        }
        Ok(Forked::Child) => {
            drop(go_w);
            // Die with stage 1; then make sure stage 1 was still alive after
            // the signal was armed (its release byte proves it).
            if sys::set_parent_death_kill().is_err() {
                sys::exit_now(1);
            }
            let mut b = [0u8; 1];
            let mut go_r = fs::File::from(go_r);
            if !matches!(go_r.read(&mut b), Ok(1)) {
                sys::exit_now(1);
            }
            drop(go_r);
            stage2(ctrl, &cfg, launch)
        }
    }
}

fn stage2(mut ctrl: UnixStream, cfg: &InitConfig, launch: Launch<'_>) -> ! {
    let (abi, full) = match build(cfg, &mut ctrl) {
        Ok(v) => v,
        Err(e) => {
            report(&mut ctrl, e);
            sys::exit_now(1)
        }
    };
    serve_job(
        ctrl,
        (abi, full),
        JobChannels {
            broker: cfg.broker,
            egress: cfg.egress,
            relay: false,
            watch: false,
            memory_events: None,
            code_dir: crate::launch::code_dir(cfg.workspace_dir.is_some()),
            in_session: cfg.workspace_dir.is_some(),
        },
        launch,
    )
}

/// From `Ready` on, for init and the agent alike: reports every layer
/// applied (the Landlock status reached), waits for exactly one job and its
/// code, runs it and exits (as pid 1, ending every process left).
pub(crate) fn serve_job(
    mut ctrl: UnixStream,
    (abi, full): (u32, bool),
    channels: JobChannels,
    launch: Launch<'_>,
) -> ! {
    if proto::write_msg(
        &mut ctrl,
        &FromInit::Ready {
            landlock_abi: abi,
            landlock_full: full,
        },
    )
    .is_err()
    {
        sys::exit_now(1);
    }
    let job = match proto::read_msg::<_, ToInit>(&mut ctrl, proto::MAX_TO_INIT) {
        Ok(ToInit::Job(job)) => job,
        _ => {
            report(&mut ctrl, (Step::ReadJob, 0));
            sys::exit_now(1)
        }
    };
    let code = match proto::read_frame(
        &mut ctrl,
        job.code_len.min(proto::MAX_TO_INIT as u64) as usize,
    ) {
        Ok(c) if c.len() as u64 == job.code_len => c,
        _ => {
            report(&mut ctrl, (Step::ReadJob, 0));
            sys::exit_now(1)
        }
    };
    match run_job(&mut ctrl, &job, &code, channels, launch) {
        Ok(()) => sys::exit_now(0),
        Err(e) => {
            report(&mut ctrl, e);
            sys::exit_now(1)
        }
    }
}

/// Applies every isolation layer in order. Returns (Landlock ABI, fully enforced).
fn build(cfg: &InitConfig, ctrl: &mut UnixStream) -> StepResult<(u32, bool)> {
    build_root(cfg)?;
    // The engine moves this process into the sandbox cgroup while the view
    // above is built; the cgroup namespace must be rooted there.
    at(
        Step::CgroupNamespace,
        proto::write_msg(ctrl, &FromInit::Built),
    )?;
    match proto::read_msg::<_, ToInit>(ctrl, 1024) {
        Ok(ToInit::Attached) => {}
        _ => return Err((Step::CgroupNamespace, 0)),
    }
    at(Step::CgroupNamespace, sys::unshare(libc::CLONE_NEWCGROUP))?;

    lock_down(cfg.landlock_strict, &cfg.seccomp, false)
}

/// The mount, network, IPC and UTS namespaces and the new root: read-only
/// binds of `cfg.mounts` (their sources resolved in the caller's mount
/// namespace: the host's, or a microVM guest's root image), platform files,
/// /etc, a minimal /dev, a fresh masked /proc, capped scratch, pivot_root,
/// then the root read-only, the hostname and loopback. The process
/// sandbox's init and a microVM guest's init build the same view with it.
pub(crate) fn build_root(cfg: &InitConfig) -> StepResult<()> {
    at(
        Step::Namespaces,
        sys::unshare(
            libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS,
        ),
    )?;
    at(
        Step::MakePrivate,
        sys::mount(
            None,
            &cstr("/"),
            None,
            libc::MS_REC | libc::MS_PRIVATE,
            None,
        ),
    )?;
    // Pin every bind source before the new root's tmpfs covers NEW_ROOT
    // (a source under it would vanish); the binds then go through
    // /proc/self/fd, so they also cannot be redirected by a path swap.
    let mut sources = Vec::with_capacity(cfg.mounts.len());
    for m in &cfg.mounts {
        let fd = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(&m.host)
            .map_err(|e| (Step::BindRuntime, e.raw_os_error().unwrap_or(0)))?;
        sources.push(fd);
    }
    // A session's workspace, pinned the same way (and never through a
    // symlink: the platform made it a directory).
    let workspace_src = match &cfg.workspace_dir {
        Some(p) => Some(
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(p)
                .map_err(|e| (Step::Scratch, e.raw_os_error().unwrap_or(0)))?,
        ),
        None => None,
    };
    at(
        Step::RootTmpfs,
        sys::mount(
            Some(c"airlock"),
            &cstr(NEW_ROOT),
            Some(c"tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some(c"size=4m,nr_inodes=8192,mode=0755"),
        ),
    )?;
    let nr = |p: &str| format!("{NEW_ROOT}{p}");

    for (m, src) in cfg.mounts.iter().zip(&sources) {
        let via = format!("/proc/self/fd/{}", src.as_raw_fd());
        bind_ro(&via, &nr(&m.target), false).map_err(|e| (Step::BindRuntime, e))?;
    }
    drop(sources);
    for (path, target) in &cfg.symlinks {
        let p = nr(path);
        if let Some(parent) = std::path::Path::new(&p).parent() {
            at(
                Step::Symlinks,
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent),
            )?;
        }
        at(Step::Symlinks, std::os::unix::fs::symlink(target, &p))?;
    }

    write_ro_files(&cfg.files, Step::PlatformFiles, &nr)?;

    // /etc: generated files, and the host's public files that programs
    // expect, bound read-only (the list and the reasons: rootfs.json).
    at(
        Step::Etc,
        fs::DirBuilder::new().mode(0o755).create(nr("/etc")),
    )?;
    write_ro_files(&cfg.etc_files, Step::Etc, &nr)?;
    for m in &cfg.etc_mounts {
        bind_ro(&m.host, &nr(&m.target), false).map_err(|e| (Step::Etc, e))?;
    }

    // /dev: a small tmpfs with five device nodes bound from the host.
    at(
        Step::Dev,
        fs::DirBuilder::new().mode(0o755).create(nr("/dev")),
    )?;
    at(
        Step::Dev,
        sys::mount(
            Some(c"airlock-dev"),
            &cstr(&nr("/dev")),
            Some(c"tmpfs"),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some(c"size=64k,nr_inodes=64,mode=0755"),
        ),
    )?;
    for dev in ["null", "zero", "full", "random", "urandom"] {
        bind_ro(&format!("/dev/{dev}"), &nr(&format!("/dev/{dev}")), true)
            .map_err(|e| (Step::Dev, e))?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        at(
            Step::Dev,
            std::os::unix::fs::symlink(target, nr(&format!("/dev/{link}"))),
        )?;
    }
    at(
        Step::Dev,
        fs::DirBuilder::new().mode(0o755).create(nr("/dev/shm")),
    )?;

    // /proc of the new pid namespace; processes the user cannot ptrace
    // (non-dumpable init) are invisible.
    at(
        Step::Proc,
        fs::DirBuilder::new().mode(0o555).create(nr("/proc")),
    )?;
    let proc_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let proc_target = cstr(&nr("/proc"));
    if sys::mount(
        Some(c"proc"),
        &proc_target,
        Some(c"proc"),
        proc_flags,
        Some(c"hidepid=invisible"),
    )
    .is_err()
    {
        at(
            Step::Proc,
            sys::mount(
                Some(c"proc"),
                &proc_target,
                Some(c"proc"),
                proc_flags,
                Some(c"hidepid=2"),
            ),
        )?;
    }
    mask_proc(&nr("/proc"), &nr("/dev/null")).map_err(|e| (Step::MaskProc, e))?;

    // Scratch: private per sandbox, capped in bytes and inodes.
    let scratch = format!(
        "size={},nr_inodes={}",
        cfg.scratch_bytes, cfg.scratch_inodes
    );
    for (dir, mode) in crate::rootfs::SCRATCH {
        let target = nr(dir);
        if dir != "/dev/shm" {
            at(
                Step::Scratch,
                fs::DirBuilder::new().mode(0o755).create(&target),
            )?;
        }
        // A guest's scratch disk: its directory bound here, no set-uid
        // and no devices (its size and inodes are the disk's). /dev/shm
        // stays memory.
        // A session's workspace: its host directory bound here, no
        // set-uid and no devices (its size and inodes are capped by the
        // file system the platform made for it).
        let session = workspace_src
            .as_ref()
            .filter(|_| dir == "/workspace")
            .map(|fd| format!("/proc/self/fd/{}", fd.as_raw_fd()));
        // (A microVM guest has both: the session's workspace wins at
        // /workspace, its scratch disk holds /tmp.)
        if let Some(disk) = session.or_else(|| {
            cfg.scratch_dir
                .as_deref()
                .filter(|_| dir != "/dev/shm")
                .map(|d| format!("{d}{dir}"))
        }) {
            let t = cstr(&target);
            at(
                Step::Scratch,
                sys::mount(Some(&cstr(&disk)), &t, None, libc::MS_BIND, None),
            )?;
            at(
                Step::Scratch,
                sys::mount(
                    None,
                    &t,
                    None,
                    libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV,
                    None,
                ),
            )?;
            continue;
        }
        let data = cstr(&format!(
            "{scratch},mode={mode},uid={SANDBOX_UID},gid={SANDBOX_GID}"
        ));
        at(
            Step::Scratch,
            sys::mount(
                Some(c"scratch"),
                &cstr(&target),
                Some(c"tmpfs"),
                libc::MS_NOSUID | libc::MS_NODEV,
                Some(&data),
            ),
        )?;
    }
    // /dev itself becomes read-only (its shm submount stays writable).
    at(
        Step::RootReadOnly,
        sys::mount(
            None,
            &cstr(&nr("/dev")),
            None,
            libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
            Some(c"size=64k,nr_inodes=64,mode=0755"),
        ),
    )?;

    at(Step::PivotRoot, std::env::set_current_dir(NEW_ROOT))?;
    at(Step::PivotRoot, sys::pivot_root(c".", c"."))?;
    at(Step::DetachOldRoot, sys::umount2(c".", libc::MNT_DETACH))?;
    at(Step::DetachOldRoot, std::env::set_current_dir("/"))?;
    at(
        Step::RootReadOnly,
        sys::mount(
            None,
            c"/",
            None,
            libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            Some(c"size=4m,nr_inodes=8192,mode=0755"),
        ),
    )?;

    at(Step::Hostname, sys::sethostname("airlock"))?;
    at(Step::Loopback, sys::loopback_up())
}

/// The layers every init applies last, whoever built the isolation around
/// it (this init's own namespaces and root, an OCI runtime, gVisor): its
/// own session, no descriptors but the channels, non-dumpable, no core
/// files, the program as the OOM victim, no capabilities, no_new_privs,
/// Landlock (`landlock`: Some(strict); None where the kernel the code
/// meets has none, as under gVisor), then the seccomp programs. Returns
/// (Landlock ABI in force, fully enforced).
/// `memory_events`: a guest's `memory.events` at
/// [`crate::launch::MEMORY_EVENTS_FD`] is kept (the only descriptor beyond
/// the channels).
pub(crate) fn lock_down(
    landlock: impl Into<Option<bool>>,
    seccomp: &[Vec<(u16, u8, u8, u32)>],
    memory_events: bool,
) -> StepResult<(u32, bool)> {
    match sys::setsid() {
        Ok(()) => {}
        // A runtime may have made this process a group leader already (in
        // a session of its own, made before it exec'd): what the step is
        // for is that no controlling terminal is reachable.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) && sys::no_controlling_terminal() => {}
        Err(e) => return Err((Step::Setsid, e.raw_os_error().unwrap_or(0))),
    }
    if memory_events {
        let events = crate::launch::MEMORY_EVENTS_FD;
        for fd in EGRESS_FD + 1..events {
            sys::close_unowned(fd);
        }
        at(Step::CloseFds, sys::close_from(events as u32 + 1))?;
    } else {
        at(Step::CloseFds, sys::close_from(EGRESS_FD as u32 + 1))?;
    }
    // The uid change above made the process non-dumpable, which makes its
    // /proc files root-owned; lift that for one write, then lock it again.
    at(Step::OomScore, sys::set_dumpable(true))?;
    at(
        Step::OomScore,
        fs::write("/proc/self/oom_score_adj", "1000"),
    )?;
    at(Step::Dumpable, sys::set_not_dumpable())?;
    at(Step::CoreLimit, sys::set_rlimit(libc::RLIMIT_CORE, 0, 0))?;

    at(Step::DropCapabilities, sys::drop_bounding_and_ambient())?;
    at(Step::DropCapabilities, sys::clear_capabilities())?;
    match sys::effective_caps_zero() {
        Ok(true) => {}
        _ => return Err((Step::DropCapabilities, libc::EPERM)),
    }
    at(Step::NoNewPrivs, sys::set_no_new_privs())?;

    let (abi, full) = match landlock.into() {
        Some(strict) => apply_landlock(strict)?,
        None => (0, false),
    };

    for prog in seccomp {
        let filter: Vec<seccompiler::sock_filter> = prog
            .iter()
            .map(|&(code, jt, jf, k)| seccompiler::sock_filter { code, jt, jf, k })
            .collect();
        seccompiler::apply_filter(&filter).map_err(|e| {
            let errno = match e {
                seccompiler::Error::Seccomp(io) | seccompiler::Error::Prctl(io) => {
                    io.raw_os_error().unwrap_or(0)
                }
                _ => 0,
            };
            (Step::Seccomp, errno)
        })?;
    }
    Ok((abi, full))
}

/// Bind-mounts `host` read-only at `target`, creating the mount point. Keeps
/// the source's locked flags (a user namespace may not clear them) and adds
/// nosuid (and nodev unless `device` is set).
fn bind_ro(host: &str, target: &str, device: bool) -> Result<(), i32> {
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(0);
    let meta = fs::metadata(host).map_err(errno)?;
    let tpath = std::path::Path::new(target);
    if let Some(parent) = tpath.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(errno)?;
    }
    if meta.is_dir() {
        match fs::DirBuilder::new().mode(0o755).create(tpath) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(errno(e)),
        }
    } else {
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(tpath)
            .map_err(errno)?;
    }
    let h = cstr(host);
    let t = cstr(target);
    sys::mount(Some(&h), &t, None, libc::MS_BIND | libc::MS_REC, None).map_err(errno)?;
    let locked = sys::mount_flags(&h).map_err(errno)?;
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID;
    if !device {
        flags |= libc::MS_NODEV;
    }
    for (st, ms) in [
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
        (libc::ST_NODEV, libc::MS_NODEV),
    ] {
        if locked & st != 0 {
            flags |= ms;
        }
    }
    sys::mount(None, &t, None, flags, None).map_err(errno)
}

/// Masks sensitive /proc entries and makes kernel tunables read-only.
fn mask_proc(proc_root: &str, dev_null: &str) -> Result<(), i32> {
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(0);
    // Files replaced by /dev/null: kernel memory, keyrings, timer and
    // scheduler internals (address leaks), and the magic SysRq trigger.
    for f in crate::rootfs::MASKED_PROC_FILES {
        let p = format!("{proc_root}/{f}");
        if fs::symlink_metadata(&p).is_ok() {
            sys::mount(Some(&cstr(dev_null)), &cstr(&p), None, libc::MS_BIND, None)
                .map_err(errno)?;
        }
    }
    // Directories replaced by an empty read-only tmpfs.
    for d in crate::rootfs::MASKED_PROC_DIRS {
        let p = format!("{proc_root}/{d}");
        if fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
            sys::mount(
                Some(c"masked"),
                &cstr(&p),
                Some(c"tmpfs"),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                Some(c"size=0,nr_inodes=1,mode=0555"),
            )
            .map_err(errno)?;
        }
    }
    // Kernel tunables and hardware interfaces: visible but read-only.
    for d in crate::rootfs::READ_ONLY_PROC_DIRS {
        let p = format!("{proc_root}/{d}");
        if fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
            let c = cstr(&p);
            sys::mount(Some(&c), &c, None, libc::MS_BIND | libc::MS_REC, None).map_err(errno)?;
            sys::mount(
                None,
                &c,
                None,
                libc::MS_BIND
                    | libc::MS_REMOUNT
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                None,
            )
            .map_err(errno)?;
        }
    }
    Ok(())
}

/// Landlock: read + execute on `/`, full access to scratch, read/write on
/// the harmless devices. Returns (ABI in force, fully enforced).
fn apply_landlock(strict: bool) -> StepResult<(u32, bool)> {
    let kernel_abi = sys::landlock_abi();
    if kernel_abi == 0 && !strict {
        return Ok((0, false));
    }
    let level = if strict {
        CompatLevel::HardRequirement
    } else {
        CompatLevel::BestEffort
    };
    let fail = |_| (Step::Landlock, libc::ENOSYS);
    let all = AccessFs::from_all(LANDLOCK_ABI);
    let read = AccessFs::from_read(LANDLOCK_ABI);
    let dev_rw = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev | AccessFs::Truncate;
    let rules = [
        ("/", read),
        ("/tmp", all),
        ("/workspace", all),
        ("/dev/shm", all),
        ("/dev/null", dev_rw),
        ("/dev/zero", dev_rw),
        ("/dev/full", dev_rw),
        ("/dev/random", AccessFs::ReadFile | AccessFs::IoctlDev),
        ("/dev/urandom", AccessFs::ReadFile | AccessFs::IoctlDev),
    ];
    let mut ruleset = Ruleset::default()
        .set_compatibility(level)
        .handle_access(all)
        .map_err(fail)?
        .create()
        .map_err(fail)?;
    for (path, access) in rules {
        let fd = PathFd::new(path).map_err(|_| (Step::Landlock, libc::ENOENT))?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(fail)?;
    }
    let status = ruleset.restrict_self().map_err(fail)?;
    let full = status.ruleset == RulesetStatus::FullyEnforced;
    if strict && !full {
        return Err((Step::Landlock, libc::ENOSYS));
    }
    let abi = if status.ruleset == RulesetStatus::NotEnforced {
        0
    } else {
        kernel_abi.min(LANDLOCK_ABI_NUM)
    };
    Ok((abi, full))
}

/// The egress forwarder: accepts TCP connections on 127.0.0.1 inside the
/// sandbox and hands each one, as a descriptor, to the host-side proxy over
/// the egress channel. It never reads what flows through them; the proxy
/// decides. It runs with every restriction pid 1 has (seccomp, Landlock,
/// no capabilities), so killing it only costs the program its egress.
fn forwarder(listener: std::net::TcpListener) -> ! {
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                if sys::send_fd(EGRESS_FD, conn.as_raw_fd()).is_err() {
                    // The proxy is gone: nothing else to do.
                    sys::exit_now(0);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => sys::exit_now(1),
        }
    }
}

/// Starts the forwarder (a child of pid 1) and gives up pid 1's copy of
/// the channel, so the program never inherits it.
fn start_forwarder(broker: bool, relay: bool) -> StepResult<()> {
    let listener = at(
        Step::Egress,
        std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, PROXY_PORT)),
    )?;
    // SAFETY: init is single-threaded.
    match at(Step::Egress, unsafe { sys::fork() })? {
        Forked::Child => {
            // The forwarder holds the listener and the egress channel only:
            // not init's control socket, not the program's broker channel.
            sys::close_unowned(CONTROL_FD);
            if broker {
                sys::close_unowned(BROKER_FD);
            }
            // Nor the sandbox's stdio (the program's pipes).
            if let Ok(null) = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                for fd in 0..3 {
                    let _ = sys::dup2(null.as_raw_fd(), fd);
                }
            }
            if relay {
                crate::relay::forwarder(listener)
            }
            forwarder(listener)
        }
        Forked::Parent(_) => {
            drop(listener);
            sys::close_unowned(EGRESS_FD);
            Ok(())
        }
    }
}

/// The channels a job runs with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct JobChannels {
    /// Where the code file is written ([`crate::launch::code_dir`]).
    pub code_dir: &'static str,
    /// /workspace is a session's: the program starts in it (its files
    /// are what the program works on; relative paths mean them).
    pub in_session: bool,
    /// A broker socket is at descriptor 4 (the program's).
    pub broker: bool,
    /// An egress channel is at 5: the forwarder starts.
    pub egress: bool,
    /// The forwarder relays connections instead of handing them over.
    pub relay: bool,
    /// Pid 1 leaves when the control channel hangs up (an agent).
    pub watch: bool,
    /// A guest kernel's `memory.events` for the sandbox's cgroup, read
    /// once the program has ended.
    pub memory_events: Option<RawFd>,
}

pub(crate) fn run_job(
    ctrl: &mut UnixStream,
    job: &Job,
    code: &[u8],
    channels: JobChannels,
    launch: Launch<'_>,
) -> StepResult<()> {
    if let Launch::Inherited(py) = launch {
        // A zygote serves exactly one program shape: the argv and
        // environment it was started with.
        let (argv, env) = py.shape();
        let mut want = env.to_vec();
        let mut got = job.env.clone();
        want.sort();
        got.sort();
        if job.argv != argv || want != got {
            return Err((Step::ReadJob, libc::EINVAL));
        }
    }
    let JobChannels {
        broker,
        egress,
        relay,
        watch,
        memory_events,
        code_dir,
        in_session,
    } = channels;
    if egress {
        start_forwarder(broker, relay)?;
    }
    if !crate::launch::safe_file_name(&job.file_name) || job.argv.is_empty() {
        return Err((Step::ReadJob, libc::EINVAL));
    }
    let path = format!("{code_dir}/{}", job.file_name);
    at(
        Step::WriteCode,
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .and_then(|mut f| f.write_all(code)),
    )?;
    let argv: Vec<CString> = job
        .argv
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<_, _>>()
        .map_err(|_| (Step::ReadJob, libc::EINVAL))?;
    let envp: Vec<CString> = job
        .env
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<_, _>>()
        .map_err(|_| (Step::ReadJob, libc::EINVAL))?;
    if watch {
        at(Step::ForkProgram, sys::wake_on_sigchld())?;
    }
    let (err_r, err_w) = at(Step::ForkProgram, sys::pipe())?;
    // SAFETY: init is single-threaded.
    match at(Step::ForkProgram, unsafe { sys::fork() })? {
        Forked::Child => {
            drop(err_r);
            if let Launch::Inherited(py) = launch {
                if let Err(errno) = program_setup(job, true) {
                    let mut w = fs::File::from(err_w);
                    let _ = w.write_all(&errno.to_le_bytes());
                    sys::exit_now(127)
                }
                // An exec would make the program dumpable again (pid 1 is
                // not); without one it says so itself, as a cold program is.
                if sys::set_dumpable(true).is_err() {
                    sys::exit_now(127)
                }
                // No exec: the error pipe (close-on-exec otherwise) and every
                // descriptor above the broker channel go now (program_setup
                // closed the control socket).
                drop(err_w);
                if sys::close_from(EGRESS_FD as u32).is_err() {
                    sys::exit_now(127)
                }
                py.run_program()
            }
            let errno = match in_session
                .then(|| std::env::set_current_dir("/workspace"))
                .transpose()
            {
                Ok(_) => exec_program(job, &argv, &envp),
                Err(e) => e.raw_os_error().unwrap_or(libc::EINVAL),
            };
            let mut w = fs::File::from(err_w);
            let _ = w.write_all(&errno.to_le_bytes());
            sys::exit_now(127)
        }
        Forked::Parent(pid) => {
            drop(err_w);
            if broker {
                // The channel is the program's; init keeps no copy.
                sys::close_unowned(BROKER_FD);
            }
            let mut buf = [0u8; 4];
            let mut r = fs::File::from(err_r);
            let exec_errno = match r.read(&mut buf) {
                Ok(4) => Some(i32::from_le_bytes(buf)),
                _ => None,
            };
            drop(r);
            // Init's own stdio would keep the pipes open after the program's
            // exit; give them up.
            if let Ok(null) = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                for fd in 0..3 {
                    let _ = sys::dup2(null.as_raw_fd(), fd);
                }
            }
            let status = loop {
                // An agent watches its control channel too: a runtime does
                // not tie the sandbox to the engine's life as PDEATHSIG
                // does for init, so when the engine is gone, pid 1 leaves
                // and takes every process with it.
                let waited = if watch {
                    sys::wait_any_watching(ctrl.as_raw_fd())
                } else {
                    sys::wait_any()
                };
                match waited {
                    Ok((p, st)) if p == pid => break st,
                    Ok(_) => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EPIPE) => sys::exit_now(1),
                    Err(_) => break ChildStatus::Signaled(libc::SIGKILL),
                }
            };
            let (user_us, sys_us, maxrss_kib) = sys::children_usage();
            let scratch_full = crate::rootfs::SCRATCH
                .iter()
                .any(|(p, _)| sys::fs_full(&cstr(p)));
            let oom_kills = memory_events.map_or(0, oom_kills);
            let (code, signal) = match status {
                ChildStatus::Exited(c) => (Some(c), None),
                ChildStatus::Signaled(s) => (None, Some(s)),
            };
            at(
                Step::ForkProgram,
                proto::write_msg(
                    ctrl,
                    &FromInit::Exited {
                        code,
                        signal,
                        user_us,
                        sys_us,
                        maxrss_kib,
                        scratch_full,
                        exec_errno,
                        oom_kills,
                    },
                ),
            )?;
            Ok(())
        }
    }
}

/// `oom_kill` of a cgroup v2 `memory.events` open at `fd` (0 when it
/// cannot be read).
fn oom_kills(fd: RawFd) -> u64 {
    let mut buf = [0u8; 1024];
    let n = sys::pread_fd(fd, &mut buf, 0).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        .unwrap_or(0)
}

/// In the program's process: last per-program limits, then exec. Returns the
/// errno when anything fails.
fn exec_program(job: &Job, argv: &[CString], envp: &[CString]) -> i32 {
    let e = |err: std::io::Error| err.raw_os_error().unwrap_or(libc::EINVAL);
    if let Err(errno) = program_setup(job, false) {
        return errno;
    }
    if job.deny_execve {
        let Ok(path) = CString::new(job.argv[0].as_str()) else {
            return libc::EINVAL;
        };
        let ptr = match sys::place_at_random_address(&path) {
            Ok(p) => p,
            Err(err) => return e(err),
        };
        if let Err(errno) = crate::seccomp::install_deny_execve(Some(ptr as u64)) {
            return errno;
        }
        // SAFETY: `ptr` points to a NUL-terminated copy of argv[0] in a
        // mapping that is never unmapped before exec.
        return e(unsafe { sys::execve_raw(ptr, argv, envp) });
    }
    let path: &CStr = &argv[0];
    e(sys::execve(path, argv, envp))
}

/// The program's own state before it starts: the control socket closed,
/// default signals, its own session, its rlimits, and (for a program that
/// never execs, `no_exec`) execve denied outright when the policy says so.
fn program_setup(job: &Job, no_exec: bool) -> Result<(), i32> {
    let e = |err: std::io::Error| err.raw_os_error().unwrap_or(libc::EINVAL);
    // The control socket is init's alone.
    // SAFETY: descriptor 3 is the control socket, owned by the parent's
    // UnixStream; in this forked child that object is never used again.
    drop(unsafe { sys::owned(CONTROL_FD) });
    sys::reset_signals().map_err(e)?;
    // Already a group leader is impossible for a fresh child; anything else is fatal.
    sys::setsid().map_err(e)?;
    let clamp = |res, want: u64| -> Result<(), std::io::Error> {
        let (_, hard) = sys::get_rlimit(res)?;
        let v = want.min(hard);
        sys::set_rlimit(res, v, v)
    };
    let limits = (|| -> Result<(), std::io::Error> {
        let (_, cpu_hard) = sys::get_rlimit(libc::RLIMIT_CPU)?;
        sys::set_rlimit(
            libc::RLIMIT_CPU,
            job.cpu_seconds.min(cpu_hard),
            (job.cpu_seconds + 1).min(cpu_hard),
        )?;
        clamp(libc::RLIMIT_NOFILE, job.open_files)?;
        clamp(libc::RLIMIT_FSIZE, job.file_size)?;
        clamp(libc::RLIMIT_CORE, 0)?;
        if let Some(n) = job.nproc {
            clamp(libc::RLIMIT_NPROC, n)?;
        }
        if let Some(d) = job.data_bytes {
            clamp(libc::RLIMIT_DATA, d)?;
        }
        Ok(())
    })();
    limits.map_err(e)?;
    if no_exec && job.deny_execve {
        crate::seccomp::install_deny_execve(None)?;
    }
    Ok(())
}
