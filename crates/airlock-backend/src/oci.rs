//! OCI runtimes as backends: `oci` (crun or runc: the host kernel behind
//! the runtime's namespaces, cgroup and read-only root) and `gvisor`
//! (runsc: gVisor's user-space kernel between the code and the host).
//!
//! Each sandbox gets a bundle generated with the `oci-spec` crate (never
//! hand-written JSON): the same read-only runtime root as the process
//! sandbox (the interpreter's binds, a generated /etc, the platform files
//! written into the root), capped scratch tmpfs, /proc with the same
//! masked and read-only paths, new pid/mount/ipc/uts/cgroup/network
//! namespaces and a user namespace mapping the sandbox user to an
//! unprivileged host id, no capabilities at all (the agent checks the
//! bounding set is empty), no_new_privs. The first process is airlock's agent, executed from a
//! sealed in-memory image passed as a descriptor (no host path of the
//! binary is mounted); it applies the same seccomp programs (and, on crun,
//! Landlock) and runs the job as init does. The runtime process itself
//! joins the sandbox's cgroup before it execs, so the runtime, gVisor's
//! sentry and gofer, and every process of the code are counted and killed
//! together; the runtime is told not to manage cgroups.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use airlock_policy::{IsolationLevel, Language, Policy};
use airlock_sandbox::hosted::{
    AgentLaunch, IMAGE_AIRLOCK_DIR, IMAGE_GUEST_ROOT, ImageRoot, Isolated, Launched, Launcher,
};
use airlock_sandbox::launch::{SANDBOX_GID, SANDBOX_UID};
use airlock_sandbox::{Engine, SandboxError};
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxIdMappingBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, Mount, MountBuilder, ProcessBuilder, RootBuilder,
    Spec, SpecBuilder, UserBuilder,
};

use crate::process::check_level;
use crate::{
    Backend, BackendError, Enforced, Hooks, Job, Prepared, Probe, Request, RunResult,
    Spec as SbSpec, Teardown, Template,
};

/// Which OCI runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// crun: namespaces on the host kernel, told to leave cgroups alone
    /// (the sandbox stays in the cgroup its runtime process joined).
    Crun,
    /// runc: as crun, but runc always manages a cgroup: it makes one
    /// nested in the sandbox's (whose limits then hold for it), removed by
    /// `runc delete`.
    Runc,
    /// runsc: gVisor, told to leave cgroups alone.
    Gvisor,
}

/// An OCI runtime binary and where its state lives.
#[derive(Debug, Clone)]
pub struct OciRuntime {
    /// crun/runc or runsc.
    pub kind: Kind,
    /// The runtime binary.
    pub binary: PathBuf,
    /// Where bundles are made (one directory per sandbox, removed after).
    pub bundles: PathBuf,
    /// gVisor's platform (`systrap`, `ptrace`, `kvm`).
    pub platform: Option<String>,
}

impl OciRuntime {
    /// The runtime's `--version` first line, when it runs.
    pub fn version(&self) -> Option<String> {
        let out = Command::new(&self.binary)
            .arg("--version")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        out.status
            .success()
            .then(|| text.lines().next().unwrap_or("").trim().to_string())
    }
}

/// What the operator chose for the runtimes (`[backends.oci]`,
/// `[backends.gvisor]`); what is unset is found here.
#[derive(Debug, Clone, Default)]
pub struct Choice {
    /// The OCI runtime: `crun`, `runc`, or a path to either.
    pub oci_runtime: Option<PathBuf>,
    /// runsc (a path, or the name found in the usual directories).
    pub runsc: Option<PathBuf>,
    /// gVisor's platform (one of [`GVISOR_PLATFORMS`]); runsc's default
    /// when unset.
    pub gvisor_platform: Option<String>,
}

/// The gVisor platforms runsc can be told to use.
pub const GVISOR_PLATFORMS: [&str; 3] = ["systrap", "ptrace", "kvm"];

/// A binary by path, or by a bare name in the usual directories.
fn named_binary(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return name.is_file().then(|| name.to_path_buf());
    }
    find_binary(&[name.to_str()?])
}

/// The runtimes here, as airlock would drive them with state under
/// `run_dir`: the operator's choice, else crun (or runc) for `oci` and
/// runsc for `gvisor`. A runtime the operator named that is not there,
/// or is not what it is named as, is in the second list with why.
pub fn installed(run_dir: &Path, choice: &Choice) -> (Vec<OciRuntime>, Vec<crate::NotHere>) {
    let mut v = Vec::new();
    let mut failed = Vec::new();
    let runtime = |kind, binary| OciRuntime {
        kind,
        binary,
        bundles: run_dir.join("bundles"),
        platform: None,
    };
    match &choice.oci_runtime {
        Some(name) => match named_binary(name) {
            // Which runtime it is comes from what it says it is, not from
            // its file name: crun and runc differ in how airlock drives
            // them (cgroups).
            Some(binary) => {
                let rt = runtime(Kind::Crun, binary);
                let first = rt.version().unwrap_or_default();
                match first.split_whitespace().next() {
                    Some("crun") => v.push(rt),
                    Some("runc") => v.push(OciRuntime {
                        kind: Kind::Runc,
                        ..rt
                    }),
                    _ => failed.push(crate::NotHere {
                        name: "oci",
                        why: format!(
                            "{} is neither crun nor runc (its --version says {first:?})",
                            rt.binary.display()
                        ),
                    }),
                }
            }
            None => failed.push(crate::NotHere {
                name: "oci",
                why: format!("the OCI runtime {} is not installed", name.display()),
            }),
        },
        None => {
            // crun 1.8 refuses hosts whose cgroup v2 hierarchy has
            // controllers while v1 is in use ("hybrid"); runc runs there.
            let hybrid = airlock_sandbox::cgroup::is_hybrid_with_v2_controllers();
            match (find_binary(&["crun"]), find_binary(&["runc"])) {
                (Some(_), Some(runc)) if hybrid => v.push(runtime(Kind::Runc, runc)),
                (Some(crun), _) => v.push(runtime(Kind::Crun, crun)),
                (None, Some(runc)) => v.push(runtime(Kind::Runc, runc)),
                (None, None) => {}
            }
        }
    }
    let runsc = match &choice.runsc {
        Some(name) => named_binary(name).ok_or_else(|| name.display().to_string()),
        None => find_binary(&["runsc"]).ok_or_else(String::new),
    };
    let platform = choice.gvisor_platform.as_deref();
    match runsc {
        Ok(_) if platform.is_some_and(|p| !GVISOR_PLATFORMS.contains(&p)) => {
            failed.push(crate::NotHere {
                name: "gvisor",
                why: format!(
                    "unknown gVisor platform {:?} (expected {})",
                    platform.unwrap_or_default(),
                    GVISOR_PLATFORMS.join(", ")
                ),
            })
        }
        Ok(binary) => v.push(OciRuntime {
            platform: choice.gvisor_platform.clone(),
            ..runtime(Kind::Gvisor, binary)
        }),
        Err(name) if !name.is_empty() => failed.push(crate::NotHere {
            name: "gvisor",
            why: format!("runsc ({name}) is not installed"),
        }),
        Err(_) => {}
    }
    (v, failed)
}

/// The first of `names` found in the usual binary directories.
pub fn find_binary(names: &[&str]) -> Option<PathBuf> {
    for dir in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        for n in names {
            let p = Path::new(dir).join(n);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Memory (MiB) and host tasks gVisor's sentry and gofer take beside the
/// code: the host cgroup holds them too.
const GVISOR_OVERHEAD: (u64, u64) = (256, 256);

#[derive(Debug)]
struct OciLauncher {
    rt: OciRuntime,
    /// The image whose root sandboxes run in, instead of the host's
    /// runtime.
    image: Option<ImageRoot>,
}

impl OciLauncher {
    fn name(&self) -> &'static str {
        match self.rt.kind {
            Kind::Crun | Kind::Runc => "oci",
            Kind::Gvisor => "gvisor",
        }
    }
}

impl Launcher for OciLauncher {
    fn isolated(&self, _policy: &Policy) -> Isolated {
        match self.rt.kind {
            Kind::Crun | Kind::Runc => Isolated {
                backend: "oci",
                isolation: IsolationLevel::Container,
                namespaces: ["user", "pid", "mount", "network", "ipc", "uts", "cgroup"]
                    .map(String::from)
                    .to_vec(),
                landlock: true,
                // The runtime process (runc also its init stage).
                overhead: (0, 2),
                unavailable_limits: Vec::new(),
                pids_by_rlimit: false,
                egress_relay: false,
                protect_pid1: false,
                guest_memory_events: false,
                accelerator: None,
                snapshot: None,
                start_timeout: None,
                output_grace: None,
                host_cpu_factor: None,
            },
            Kind::Gvisor => Isolated {
                backend: "gvisor",
                isolation: IsolationLevel::Gvisor,
                namespaces: [
                    "gvisor-sentry",
                    "user",
                    "pid",
                    "mount",
                    "network",
                    "ipc",
                    "uts",
                ]
                .map(String::from)
                .to_vec(),
                landlock: false,
                overhead: GVISOR_OVERHEAD,
                unavailable_limits: vec![
                    format!(
                        "memory: the host cgroup also holds gVisor's sentry and gofer (+{} MiB)",
                        GVISOR_OVERHEAD.0
                    ),
                    "pids: RLIMIT_NPROC inside gVisor (its tasks are not host tasks); a \
                     program stopped by it sees EAGAIN and ends as it chooses"
                        .into(),
                    "scratch inodes: gVisor's tmpfs has no inode cap; scratch is bounded by \
                     its byte cap and the sandbox's memory"
                        .into(),
                ],
                pids_by_rlimit: true,
                egress_relay: true,
                protect_pid1: true,
                guest_memory_events: false,
                accelerator: None,
                snapshot: None,
                start_timeout: None,
                output_grace: None,
                host_cpu_factor: None,
            },
        }
    }

    fn image(&self) -> Option<&ImageRoot> {
        self.image.as_ref()
    }

    fn binds_workspace(&self) -> bool {
        // crun and runc bind it in the container's user namespace, where
        // its files are the sandbox user's; gVisor's gofer serves it to
        // the sentry (the quota is the host tmpfs's either way). An image
        // root takes it over its own /workspace (a real directory,
        // checked at import), and its interpreter runs as the same user.
        true
    }

    fn launch(&self, l: &AgentLaunch<'_>) -> Result<Launched, SandboxError> {
        let spawn = |e: std::io::Error| SandboxError::SpawnInit(e);
        let bundle = self.rt.bundles.join(l.name);
        let rootfs = bundle.join("rootfs");
        // The bundle: traversable only (its config.json is root's); the root
        // inside: readable by the mapped ids (it holds the public view).
        // Created exclusively: a bundle that exists is another sandbox's
        // (or a dead one's, for recovery to reap), never reused or removed.
        fs::DirBuilder::new()
            .mode(0o711)
            .create(&bundle)
            .map_err(spawn)?;
        let cleanup_bundle = bundle.clone();
        let made = (|| {
            match &l.view.image {
                None => {
                    fs::DirBuilder::new().mode(0o755).create(&rootfs)?;
                    build_rootfs(&rootfs, l)?;
                }
                Some(_) => build_image_files(&bundle, l)?,
            }
            let spec = bundle_spec(l, self.rt.kind, &bundle)?;
            let text = serde_json::to_vec(&spec).map_err(std::io::Error::other)?;
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(bundle.join("config.json"))
                .and_then(|mut f| f.write_all(&text))
        })();
        if let Err(e) = made {
            let _ = fs::remove_dir_all(&bundle);
            return Err(spawn(e));
        }
        // The runtime's state for this one container lives in its bundle:
        // removing the bundle removes every trace, and nothing is shared
        // between sandboxes.
        let state = bundle.join("state");
        let mut cmd = Command::new(&self.rt.binary);
        cmd.arg("--root").arg(&state);
        match self.rt.kind {
            Kind::Crun | Kind::Runc => {
                if self.rt.kind == Kind::Crun {
                    cmd.arg("--cgroup-manager=disabled");
                }
                cmd.arg("run");
                if self.rt.kind == Kind::Runc {
                    // Its nested cgroup stays until the cleanup's delete:
                    // the sandbox's accounting (an OOM kill) is read first.
                    cmd.arg("--keep");
                }
                cmd.arg("--bundle")
                    .arg(&bundle)
                    .arg(format!("--preserve-fds={}", AgentLaunch::PASSED_FDS))
                    .arg("--no-new-keyring");
            }
            Kind::Gvisor => {
                // No overlay over the root: it is read-only, and runsc's
                // default overlay would keep its backing file in the root
                // directory (an image's root is shared).
                cmd.arg("--network=none")
                    .arg("--ignore-cgroups")
                    .arg("--overlay2=none");
                if l.setup_ids == l.host_ids {
                    // Unprivileged: runsc's own rootless mode.
                    cmd.arg("--rootless");
                }
                if let Some(p) = &self.rt.platform {
                    cmd.arg(format!("--platform={p}"));
                }
                cmd.arg("run").arg("--bundle").arg(&bundle);
                for fd in 3..3 + AgentLaunch::PASSED_FDS {
                    cmd.arg(format!("--pass-fd={fd}:{fd}"));
                }
            }
        }
        cmd.arg(l.name)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        let child = match l.spawn(&mut cmd) {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_dir_all(&bundle);
                return Err(spawn(e));
            }
        };
        let (binary, name) = (self.rt.binary.clone(), l.name.to_string());
        let kind = self.rt.kind;
        // gVisor's `delete` waits about 1.5 s on a sandbox that is gone
        // already; when the sandbox has a cgroup, every process of it
        // (sentry and gofer included) is dead before this runs, and
        // removing the bundle (its state inside) is all there is to do.
        // runc must remove the cgroup it nested in the sandbox's.
        let delete = kind != Kind::Gvisor || !l.has_cgroup();
        Ok(Launched {
            child,
            cleanup: Some(Box::new(move || {
                if delete {
                    delete_container(kind, &binary, &state, &name);
                }
                let _ = fs::remove_dir_all(&cleanup_bundle);
            })),
        })
    }
}

/// Removes a container's runtime state (it has no processes left).
fn delete_container(kind: Kind, binary: &Path, state: &Path, name: &str) {
    let mut cmd = Command::new(binary);
    cmd.arg("--root").arg(state);
    if kind == Kind::Gvisor {
        cmd.arg("--ignore-cgroups");
    }
    let _ = cmd
        .args(["delete", "--force", name])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Writes the platform files and /etc into the root, and makes every mount
/// point and symlink: the root is read-only inside.
fn build_rootfs(rootfs: &Path, l: &AgentLaunch<'_>) -> std::io::Result<()> {
    let inside = |p: &str| rootfs.join(p.trim_start_matches('/'));
    let mkdir = |p: &Path| fs::DirBuilder::new().recursive(true).mode(0o755).create(p);
    for f in &l.view.files {
        write_new(&inside(&f.path), &f.contents)?;
    }
    for (path, target) in &l.view.symlinks {
        let p = inside(path);
        if let Some(parent) = p.parent() {
            mkdir(parent)?;
        }
        symlink(target, &p)?;
    }
    for m in &l.view.mounts {
        let p = inside(&m.target);
        if let Some(parent) = p.parent() {
            mkdir(parent)?;
        }
        if fs::metadata(&m.host)?.is_dir() {
            mkdir(&p)?;
        } else if fs::symlink_metadata(&p).is_err() {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o444)
                .open(&p)?;
        }
    }
    for d in ["proc", "dev", "tmp", "workspace", ".airlock"] {
        mkdir(&rootfs.join(d))?;
    }
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(inside(airlock_sandbox::hosted::AGENT_PATH))?;
    Ok(())
}

/// A new read-only file (never through a symlink), its directories made.
fn write_new(p: &Path, contents: &str) -> std::io::Result<()> {
    if let Some(parent) = p.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)?;
    }
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)?
        .write_all(contents.as_bytes())
}

/// For an image root: the sandbox's own files, outside the shared image,
/// in two directories of the bundle bound read-only over the image's
/// (empty) `/opt/airlock` and `/.airlock`.
fn build_image_files(bundle: &Path, l: &AgentLaunch<'_>) -> std::io::Result<()> {
    let guest = bundle.join("guest");
    let own = bundle.join("airlock");
    let mkdir = |p: &Path| fs::DirBuilder::new().recursive(true).mode(0o755).create(p);
    mkdir(&guest)?;
    mkdir(&own)?;
    for f in &l.view.files {
        let (base, rest) = if let Some(r) = f.path.strip_prefix(IMAGE_GUEST_ROOT) {
            (&guest, r)
        } else if let Some(r) = f.path.strip_prefix(IMAGE_AIRLOCK_DIR) {
            (&own, r)
        } else {
            return Err(std::io::Error::other(
                "a file outside the image's file roots",
            ));
        };
        // Paths were checked by the engine (absolute, no `..`); the
        // directories here are new and the bundle's own.
        write_new(&base.join(rest.trim_start_matches('/')), &f.contents)?;
    }
    // The agent and its libraries are bound over these.
    let lib = own.join("lib");
    mkdir(&lib)?;
    let mount_point = |p: &Path| {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(p)
            .map(drop)
    };
    mount_point(&own.join("agent"))?;
    for (_, name) in agent_libs() {
        mount_point(&lib.join(name))?;
    }
    Ok(())
}

/// The shared libraries the airlock binary runs with (this process is
/// that binary), as mapped now: host path and file name. Read once.
fn agent_libs() -> &'static [(PathBuf, String)] {
    static LIBS: std::sync::OnceLock<Vec<(PathBuf, String)>> = std::sync::OnceLock::new();
    LIBS.get_or_init(|| {
        let maps = fs::read_to_string("/proc/self/maps").unwrap_or_default();
        let mut out: Vec<(PathBuf, String)> = Vec::new();
        for line in maps.lines() {
            let Some(path) = line.split_whitespace().nth(5) else {
                continue;
            };
            let p = Path::new(path);
            let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let system = path.starts_with("/lib") || path.starts_with("/usr/lib");
            if system
                && name.contains(".so")
                && airlock_sandbox::launch::safe_file_name(name)
                && !out.iter().any(|(_, n)| n == name)
            {
                out.push((p.to_path_buf(), name.to_string()));
            }
        }
        out
    })
}

/// The dynamic loader among [`agent_libs`] (none: a static binary).
fn agent_loader() -> Option<&'static str> {
    agent_libs()
        .iter()
        .map(|(_, n)| n.as_str())
        .find(|n| n.starts_with("ld-linux") || n.starts_with("ld-musl"))
}

fn mount(dest: &str, typ: &str, source: &str, options: &[String]) -> std::io::Result<Mount> {
    MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.to_vec())
        .build()
        .map_err(std::io::Error::other)
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_string()).collect()
}

/// The bundle's `config.json`.
fn bundle_spec(l: &AgentLaunch<'_>, kind: Kind, bundle: &Path) -> std::io::Result<Spec> {
    let e = std::io::Error::other;
    let (sandbox_uid, sandbox_gid) = if l.setup_ids == l.host_ids {
        (0, 0)
    } else {
        (SANDBOX_UID, SANDBOX_GID)
    };
    let mut mounts = vec![
        mount(
            "/proc",
            "proc",
            "proc",
            &strings(&["nosuid", "noexec", "nodev"]),
        )?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &strings(&["nosuid", "noexec", "strictatime", "mode=755", "size=65536k"]),
        )?,
    ];
    for (dir, mode) in airlock_sandbox::rootfs::SCRATCH {
        if dir == "/workspace"
            && let Some(ws) = &l.view.workspace
        {
            // A session's workspace: its own size- and inode-capped file
            // system, owned by the ids the sandbox's user maps to, bound
            // read-write (never set-uid, never a device) in place of the
            // scratch.
            mounts.push(mount(
                dir,
                "bind",
                ws,
                &strings(&["rbind", "rw", "nosuid", "nodev"]),
            )?);
            continue;
        }
        let mut opts = vec![
            "nosuid".to_string(),
            "nodev".into(),
            format!("size={}", l.view.scratch_bytes),
            format!("mode={mode}"),
        ];
        if kind == Kind::Gvisor {
            // gVisor's tmpfs takes no inode cap; the sentry's memory
            // accounting bounds it instead.
        } else {
            opts.push(format!("nr_inodes={}", l.view.scratch_inodes));
        }
        opts.push(format!("uid={sandbox_uid}"));
        opts.push(format!("gid={sandbox_gid}"));
        mounts.push(mount(dir, "tmpfs", "scratch", &opts)?);
    }
    for m in &l.view.mounts {
        mounts.push(mount(
            &m.target,
            "bind",
            &m.host,
            &strings(&["rbind", "ro", "nosuid", "nodev"]),
        )?);
    }
    if l.view.image.is_some() {
        // The sandbox's own files over the image's empty directories (the
        // bundle's path is absolute: the runtime is started in /).
        for (dir, target) in [("guest", IMAGE_GUEST_ROOT), ("airlock", IMAGE_AIRLOCK_DIR)] {
            mounts.push(mount(
                target,
                "bind",
                &bundle.join(dir).to_string_lossy(),
                &strings(&["rbind", "ro", "nosuid", "nodev"]),
            )?);
        }
    }
    let image_root = l.view.image.is_some();
    if image_root {
        // An image has its own libraries (or none, or musl's): the agent
        // runs with the host's loader and the libraries it was linked
        // with, bound read-only under /.airlock/lib; the program it then
        // executes is the image's, with the image's own.
        for (host, name) in agent_libs() {
            mounts.push(mount(
                &format!("{IMAGE_AIRLOCK_DIR}/lib/{name}"),
                "bind",
                &host.to_string_lossy(),
                &strings(&["bind", "ro", "nosuid", "nodev"]),
            )?);
        }
    }
    let mut args = Vec::new();
    if image_root && let Some(loader) = agent_loader() {
        args.extend([
            format!("{IMAGE_AIRLOCK_DIR}/lib/{loader}"),
            "--library-path".into(),
            format!("{IMAGE_AIRLOCK_DIR}/lib"),
        ]);
    }
    // gVisor loads programs through its own filesystem only, and the
    // host's loader must read the agent to load it into an image root:
    // there the binary is bound read-only (nothing else of its directory);
    // runc and crun execute the sealed image passed as a descriptor.
    let agent = if image_root || kind == Kind::Gvisor {
        mounts.push(mount(
            airlock_sandbox::hosted::AGENT_PATH,
            "bind",
            &l.agent_binary.to_string_lossy(),
            &strings(&["bind", "ro", "nosuid", "nodev"]),
        )?);
        airlock_sandbox::hosted::AGENT_PATH.to_string()
    } else {
        format!("/proc/self/fd/{}", airlock_sandbox::hosted::AGENT_IMAGE_FD)
    };
    // No capability at all: the bounding set is empty before the agent
    // starts (it checks, and that none is effective or permitted).
    // Loopback is up already (crun and runc bring it up in the new network
    // namespace; gVisor's netstack has it).
    let none: std::collections::HashSet<Capability> = std::collections::HashSet::new();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(none.clone())
        .effective(none.clone())
        .permitted(none.clone())
        .inheritable(none.clone())
        .ambient(none)
        .build()
        .map_err(e)?;
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(sandbox_uid)
                .gid(sandbox_gid)
                .build()
                .map_err(e)?,
        )
        .args({
            args.extend([agent, airlock_sandbox::agent::AGENT_ARG.to_string()]);
            args
        })
        .env(Vec::<String>::new())
        .cwd("/")
        .capabilities(capabilities)
        .no_new_privileges(true)
        .build()
        .map_err(e)?;
    let ns = |t| LinuxNamespaceBuilder::default().typ(t).build().map_err(e);
    let mut namespaces = vec![
        ns(LinuxNamespaceType::Pid)?,
        ns(LinuxNamespaceType::Mount)?,
        ns(LinuxNamespaceType::Ipc)?,
        ns(LinuxNamespaceType::Uts)?,
        ns(LinuxNamespaceType::Network)?,
    ];
    // runsc's rootless mode makes the user namespace itself.
    let rootless_gvisor = kind == Kind::Gvisor && l.setup_ids == l.host_ids;
    if !rootless_gvisor {
        namespaces.push(ns(LinuxNamespaceType::User)?);
    }
    if kind != Kind::Gvisor {
        namespaces.push(ns(LinuxNamespaceType::Cgroup)?);
    }
    let map = |inside: u32, host: u32| {
        LinuxIdMappingBuilder::default()
            .container_id(inside)
            .host_id(host)
            .size(1u32)
            .build()
            .map_err(e)
    };
    let proc_path = |p: &str| format!("/proc/{p}");
    let masked: Vec<String> = airlock_sandbox::rootfs::MASKED_PROC_FILES
        .iter()
        .chain(airlock_sandbox::rootfs::MASKED_PROC_DIRS.iter())
        .map(|p| proc_path(p))
        .collect();
    let read_only: Vec<String> = airlock_sandbox::rootfs::READ_ONLY_PROC_DIRS
        .iter()
        .map(|p| proc_path(p))
        .collect();
    // The sandbox user, and the runtime's own setup as root inside (nothing
    // of the code runs as it: the agent starts as the sandbox user).
    let (uids, gids) = if l.setup_ids.0 == l.host_ids.0 {
        (vec![map(0, l.host_ids.0)?], vec![map(0, l.host_ids.1)?])
    } else {
        (
            vec![map(SANDBOX_UID, l.host_ids.0)?, map(0, l.setup_ids.0)?],
            vec![map(SANDBOX_GID, l.host_ids.1)?, map(0, l.setup_ids.1)?],
        )
    };
    let (uids, gids) = if rootless_gvisor {
        (Vec::new(), Vec::new())
    } else {
        (uids, gids)
    };
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .uid_mappings(uids)
        .gid_mappings(gids)
        .masked_paths(masked)
        .readonly_paths(read_only)
        .resources(
            oci_spec::runtime::LinuxResourcesBuilder::default()
                .build()
                .map_err(e)?,
        )
        .build()
        .map_err(e)?;
    if kind == Kind::Runc && l.has_cgroup() {
        // Relative: nested in the cgroup the runc process joined (the
        // sandbox's), so the sandbox's limits hold for it. Without one
        // (unprivileged, no delegation) runc runs rootless and makes none.
        linux.set_cgroups_path(Some(PathBuf::from(l.name)));
    }
    let root = match &l.view.image {
        // The image's root, shared and never written: every mount point
        // exists in it (checked at import and when the backend loads it).
        Some(img) => img.rootfs.clone(),
        None => PathBuf::from("rootfs"),
    };
    SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path(root)
                .readonly(true)
                .build()
                .map_err(e)?,
        )
        .hostname("airlock")
        .mounts(mounts)
        .process(process)
        .linux(linux)
        .build()
        .map_err(e)
}

/// An OCI runtime (or gVisor) as a backend.
#[derive(Debug, Clone)]
pub struct OciBackend {
    engine: Arc<Engine>,
    launcher: Arc<OciLauncher>,
}

impl OciBackend {
    /// A backend driving `rt`, with airlock's engine for everything but
    /// starting the runtime. Creates its state and bundle directories
    /// (0700).
    pub fn new(engine: Arc<Engine>, rt: OciRuntime) -> std::io::Result<Self> {
        // Bundles must be traversable by the sandbox's mapped ids (the
        // runtime mounts the root from inside the user namespace), not
        // listable: 0711 down to them.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&rt.bundles)?;
        let mut p = Some(rt.bundles.as_path());
        while let Some(d) = p {
            if d.parent().is_none() || d.as_os_str().is_empty() {
                break;
            }
            let meta = fs::metadata(d)?;
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o111 != 0o111 {
                return Err(std::io::Error::other(format!(
                    "{} must be traversable (mode o+x) for sandboxes' mapped users",
                    d.display()
                )));
            }
            p = d.parent();
        }
        Ok(OciBackend {
            engine,
            launcher: Arc::new(OciLauncher { rt, image: None }),
        })
    }

    /// The same backend with `image`'s root instead of the host's runtime.
    pub fn with_image(self, image: ImageRoot) -> Self {
        OciBackend {
            engine: self.engine,
            launcher: Arc::new(OciLauncher {
                rt: self.launcher.rt.clone(),
                image: Some(image),
            }),
        }
    }

    /// The image its sandboxes run in, when not the host's runtime.
    pub fn image(&self) -> Option<&ImageRoot> {
        self.launcher.image.as_ref()
    }

    /// gVisor without a host cgroup cannot bound memory: the sentry keeps
    /// the code's memory in its own (RLIMIT_DATA, the process sandbox's
    /// fallback, does not reach it). Refused unless the policy accepts the
    /// danger, which the result then names.
    fn unbounded_memory(
        &self,
        policy: &Policy,
        has_cgroup: bool,
    ) -> Result<Vec<String>, BackendError> {
        crate::check_layers(
            self.name(),
            policy,
            &[(
                "limits.memory_mib (no cgroup: gVisor's memory is unbounded)",
                self.launcher.rt.kind == Kind::Gvisor && !has_cgroup,
            )],
        )
    }
}

impl Backend for OciBackend {
    fn name(&self) -> &'static str {
        self.launcher.name()
    }

    fn level(&self) -> IsolationLevel {
        match self.launcher.rt.kind {
            Kind::Crun | Kind::Runc => IsolationLevel::Container,
            Kind::Gvisor => IsolationLevel::Gvisor,
        }
    }

    fn validate(&self, req: &Request<'_>) -> Result<(), BackendError> {
        check_level(self.name(), self.level(), req.policy)?;
        if let Some(image) = self.image() {
            // The image's interpreter, not the host's, runs the code.
            airlock_sandbox::runtime::in_image(req.language, image)?;
        }
        // Unprivileged, no cgroup can be counted on (prepare checks the
        // one it got).
        if airlock_sandbox::sys::geteuid() != 0 {
            self.unbounded_memory(req.policy, false)?;
        }
        Ok(self.engine.validate(req)?)
    }

    fn prepare(&self, spec: &SbSpec<'_>) -> Result<Box<dyn Prepared>, BackendError> {
        check_level(self.name(), self.level(), spec.policy)?;
        let mut sb = self.engine.prepare_agent(
            spec.policy,
            spec.language,
            spec.extras,
            self.launcher.as_ref(),
        )?;
        let missing = self.unbounded_memory(spec.policy, sb.enforced().cgroup.is_some())?;
        if !missing.is_empty() {
            sb.record_missing_layers(missing);
        }
        Ok(Box::new(HostedSandbox {
            inner: crate::process::ProcessSandbox::from(sb),
            backend: self.name(),
            name_key: "container",
        }))
    }

    fn runs(&self, language: Language) -> bool {
        self.image()
            .is_none_or(|i| i.interpreters.iter().any(|(l, _)| *l == language))
    }

    fn template(&self, _spec: &SbSpec<'_>) -> Result<Option<Arc<dyn Template>>, BackendError> {
        Ok(None)
    }

    fn sessions(&self) -> bool {
        self.launcher.binds_workspace()
    }

    fn reap(&self, host_state: &serde_json::Value) -> usize {
        let mut n = crate::process::reap_cgroups(&self.engine, host_state);
        if let Some(name) = host_state
            .get("container")
            .and_then(serde_json::Value::as_str)
            .filter(|n| is_sandbox_name(n))
        {
            let rt = &self.launcher.rt;
            let bundle = rt.bundles.join(name);
            delete_container(rt.kind, &rt.binary, &bundle.join("state"), name);
            if fs::remove_dir_all(bundle).is_ok() {
                n += 1;
            }
        }
        n
    }

    fn reap_stale(&self, previous_pid: Option<u32>) -> usize {
        let rt = &self.launcher.rt;
        reap_stale_states(&self.engine, &rt.bundles, previous_pid, |name, dir| {
            delete_container(rt.kind, &rt.binary, &dir.join("state"), name);
        })
    }

    fn probe(&self) -> Probe {
        let version = self.launcher.rt.version();
        let policy = Policy::default();
        let extras = airlock_sandbox::Extras::default();
        let (works, fix) = if version.is_none() {
            (
                false,
                Some(format!(
                    "{} does not run; install it (Debian: apt-get install {})",
                    self.launcher.rt.binary.display(),
                    match self.launcher.rt.kind {
                        Kind::Crun => "crun",
                        Kind::Runc => "runc",
                        Kind::Gvisor => "runsc",
                    }
                )),
            )
        } else {
            // A language the root has: an image may have no shell.
            let (lang, code): (Language, &[u8]) = match self.image() {
                Some(image)
                    if !image
                        .interpreters
                        .iter()
                        .any(|(l, _)| *l == Language::Shell) =>
                {
                    match image.interpreters.first() {
                        Some((Language::Python, _)) => (Language::Python, b"pass"),
                        Some((Language::Javascript, _)) => (Language::Javascript, b""),
                        _ => (Language::Shell, b"exit 0"),
                    }
                }
                _ => (Language::Shell, b"exit 0"),
            };
            crate::verdict(
                self.engine
                    .prepare_agent(&policy, lang, &extras, self.launcher.as_ref())
                    .map(|sb| sb.execute(code, None, b"", &mut |_, _| {}))
                    .map_err(|e| e.to_string()),
            )
        };
        Probe {
            backend: self.name(),
            isolation: self.level(),
            version,
            works,
            fix,
        }
    }
}

/// Removes the per-sandbox state directories under `dir` (named `<pid>-<n>`
/// like their cgroups) of the previous server process, or of an engine
/// that is gone (no such pid here) and whose sandbox has no cgroup left (an
/// engine in another pid namespace may have a pid this one cannot see: its
/// live sandboxes still have their cgroups). `before` runs first on each
/// (a runtime's own delete). Returns how many were removed.
pub(crate) fn reap_stale_states(
    engine: &Engine,
    dir: &Path,
    previous_pid: Option<u32>,
    before: impl Fn(&str, &Path),
) -> usize {
    let parents = engine
        .cgroup_layout()
        .map(airlock_sandbox::cgroup::sandbox_parents)
        .unwrap_or_default();
    let mut n = 0;
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    for ent in entries.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        if !is_sandbox_name(&name) {
            continue;
        }
        let owner = name.split('-').next().unwrap_or("");
        // A live process of that pid may own it (a pid reused since the
        // previous server died): never.
        let alive = Path::new("/proc").join(owner).exists();
        let previous = previous_pid.is_some_and(|p| p.to_string() == owner);
        let orphaned = !parents.iter().any(|(_, p)| p.join(&name).exists());
        if !alive && (previous || orphaned) {
            before(&name, &ent.path());
            if fs::remove_dir_all(ent.path()).is_ok() {
                n += 1;
            }
        }
    }
    n
}

/// `<pid>-<n>`, as the engine names sandboxes: never a path.
pub(crate) fn is_sandbox_name(n: &str) -> bool {
    n.split_once('-').is_some_and(|(a, b)| {
        !a.is_empty()
            && !b.is_empty()
            && a.bytes().all(|c| c.is_ascii_digit())
            && b.bytes().all(|c| c.is_ascii_digit())
    })
}

/// A prepared sandbox whose isolation a runtime built (OCI, gVisor, a
/// microVM): a process sandbox's supervision around the agent, with the
/// sandbox's name in its host state under `name_key` (what `reap` reads).
#[derive(Debug)]
pub(crate) struct HostedSandbox {
    pub(crate) inner: crate::process::ProcessSandbox,
    pub(crate) backend: &'static str,
    pub(crate) name_key: &'static str,
}

impl Prepared for HostedSandbox {
    fn enforced(&self) -> &Enforced {
        self.inner.enforced()
    }

    fn prestart(&mut self) -> Result<(), BackendError> {
        self.inner.prestart()
    }

    fn tighten(&mut self, limits: &airlock_policy::Limits) -> Result<(), BackendError> {
        self.inner.tighten(limits)
    }

    fn is_alive(&self) -> bool {
        self.inner.is_alive()
    }

    fn take_broker(&mut self) -> Option<std::os::unix::net::UnixStream> {
        self.inner.take_broker()
    }

    fn take_egress(&mut self) -> Option<std::os::fd::OwnedFd> {
        self.inner.take_egress()
    }

    fn host_state(&self) -> serde_json::Value {
        let mut v = self.inner.host_state();
        v["backend"] = self.backend.into();
        v["isolation"] = self.inner.enforced().isolation.as_str().into();
        v[self.name_key] = self.inner.name().into();
        v
    }

    fn execute(self: Box<Self>, job: Job<'_>, hooks: Hooks<'_>) -> (RunResult, Teardown) {
        Box::new(self.inner).execute(job, hooks)
    }
}
