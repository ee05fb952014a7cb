//! cgroups v1 and v2 behind one type.
//!
//! One cgroup per sandbox, created by the engine before the sandbox's first
//! process runs anything, limited (memory without swap, pids, CPU quota),
//! read for accounting, killed as a whole and removed at the end.
//!
//! v2: `<mount>/<own cgroup>/airlock/<id>`. The kernel lets a cgroup hand
//! controllers to children only while no process is in it (the
//! no-internal-processes rule); a cgroup that is airlock's to arrange (one
//! systemd delegated to it, `Delegate=yes`; the root of its container's
//! cgroup namespace; or one it is alone in) has its processes moved into
//! the leaf `<own cgroup>/airlock-server` first, so the sandboxes stay
//! inside what was delegated. Otherwise `<mount>/airlock/<id>`.
//! v1: `<controller mount>/<own cgroup>/airlock/<id>` for memory, pids, cpu
//! and cpuacct (which may share a hierarchy or not).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::SandboxError;

/// Which cgroup version a sandbox uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    /// Legacy per-controller hierarchies.
    V1,
    /// The unified hierarchy.
    V2,
}

/// Limits applied to a sandbox cgroup.
#[derive(Debug, Clone, Copy)]
pub struct CgroupLimits {
    /// Memory cap in bytes (swap is always 0).
    pub memory_bytes: u64,
    /// Max tasks.
    pub pids: u64,
    /// CPU bandwidth in cores.
    pub cpus: f64,
}

/// What the host offers, detected from /proc/self/mountinfo and /proc/self/cgroup.
#[derive(Debug, Clone)]
pub enum Layout {
    /// Unified hierarchy with memory and pids controllers available.
    V2 {
        /// Mount point.
        mount: PathBuf,
        /// Our own cgroup path (relative).
        own: String,
    },
    /// v1 controllers: (controller, directory that holds our own cgroup).
    V1 {
        /// memory, pids, cpu, cpuacct → own cgroup dir in that hierarchy.
        dirs: Vec<(&'static str, PathBuf)>,
    },
}

const V1_CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "cpuacct"];

/// Detects the cgroup layout. `None` when neither a usable v2 nor v1
/// memory+pids exists.
pub fn detect() -> Option<Layout> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let own = fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut v2_mount = None;
    let mut v1: Vec<(&'static str, PathBuf)> = Vec::new();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        let (Some(mnt), Some(root), Some(fstype)) = (pre.get(4), pre.get(3), post.first()) else {
            continue;
        };
        if *root != "/" {
            continue;
        }
        match *fstype {
            "cgroup2" => v2_mount = Some(PathBuf::from(mnt)),
            "cgroup" => {
                let opts = post.get(2).copied().unwrap_or("");
                for c in V1_CONTROLLERS {
                    if opts.split(',').any(|o| o == c) && !v1.iter().any(|(n, _)| *n == c) {
                        v1.push((c, PathBuf::from(mnt)));
                    }
                }
            }
            _ => {}
        }
    }
    if let Some(mount) = v2_mount {
        let controllers = fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        if has("memory") && has("pids") {
            let own = own_v2(
                own.lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .unwrap_or("/"),
            );
            return Some(Layout::V2 { mount, own });
        }
    }
    let have = |c: &str| v1.iter().any(|(n, _)| *n == c);
    if have("memory") && have("pids") {
        let dirs = v1
            .into_iter()
            .map(|(c, mnt)| {
                let path = own
                    .lines()
                    .find_map(|l| {
                        let mut parts = l.splitn(3, ':');
                        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
                        ctrls
                            .split(',')
                            .any(|x| x == c)
                            .then(|| path.trim_start_matches('/').to_string())
                    })
                    .unwrap_or_default();
                (c, mnt.join(path))
            })
            .collect();
        return Some(Layout::V1 { dirs });
    }
    None
}

/// A live sandbox cgroup.
#[derive(Debug)]
pub struct Cgroup {
    version: CgroupVersion,
    /// v2: one dir; v1: one per controller (name, dir).
    dirs: Vec<(&'static str, PathBuf)>,
    /// The limits written last.
    limits: CgroupLimits,
}

/// Counters read at the end of a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct CgroupStats {
    /// OOM kills inside the cgroup.
    pub oom_kills: u64,
    /// Times the pids limit refused a fork.
    pub pids_max_hits: u64,
    /// User CPU ns.
    pub cpu_user_ns: Option<u64>,
    /// System CPU ns.
    pub cpu_sys_ns: Option<u64>,
    /// Peak memory bytes.
    pub peak_memory: Option<u64>,
}

fn write(path: &Path, value: &str, step: &'static str) -> Result<(), SandboxError> {
    fs::write(path, value).map_err(|source| SandboxError::Cgroup { step, source })
}

fn read_kv(path: &Path, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == key).then(|| it.next()?.parse().ok())?
    })
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The leaf airlock's own processes move into when its cgroup is to hold
/// the sandboxes' (v2).
pub const SERVER_LEAF: &str = "airlock-server";

/// Whether airlock may move the processes of its own v2 cgroup `dir`
/// (`own`, relative to the mount) into a leaf: systemd delegated it
/// (`trusted.delegate`, or `user.delegate` for a user manager), it is the
/// root of a cgroup namespace (a container's: the real root never refuses
/// with EBUSY, so an empty `own` that does is a namespace's), or this
/// process is alone in it. Never someone else's cgroup with other
/// programs in it (a login session's).
fn ours_to_arrange(dir: &Path, own: &str) -> bool {
    let delegated = ["trusted.delegate", "user.delegate"].iter().any(|name| {
        let mut v = [0u8; 8];
        rustix::fs::getxattr(dir, *name, &mut v).is_ok_and(|n| v[..n].starts_with(b"1"))
    });
    let alone = fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|procs| {
        let me = std::process::id().to_string();
        let mut it = procs.split_whitespace();
        it.next() == Some(me.as_str()) && it.next().is_none()
    });
    delegated || own.is_empty() || alone
}

/// Moves every process of `dir` into `dir/airlock-server` (one write per
/// process, as cgroup.procs takes them; one that exits meanwhile is gone
/// already).
fn into_leaf(dir: &Path) -> io::Result<()> {
    let leaf = dir.join(SERVER_LEAF);
    match fs::create_dir(&leaf) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    // Twice: a process forked while the first pass ran is in `dir` too.
    for _ in 0..2 {
        for pid in fs::read_to_string(dir.join("cgroup.procs"))?.split_whitespace() {
            match fs::write(leaf.join("cgroup.procs"), pid) {
                Err(e) if e.raw_os_error() != Some(libc::ESRCH) => return Err(e),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Our own v2 cgroup as the sandboxes' parent: the one this process was
/// started in, also after it moved itself into [`SERVER_LEAF`].
fn own_v2(line: &str) -> String {
    let own = line.trim().trim_start_matches('/');
    match own.rsplit_once('/') {
        Some((parent, SERVER_LEAF)) => parent.to_string(),
        None if own == SERVER_LEAF => String::new(),
        _ => own.to_string(),
    }
}

impl Cgroup {
    /// Creates and limits the cgroup `name` (unique per sandbox).
    pub fn create(
        layout: &Layout,
        name: &str,
        limits: &CgroupLimits,
    ) -> Result<Cgroup, SandboxError> {
        // The parents may exist; the sandbox's own directory must not: two
        // sandboxes never share a cgroup (its limits, its accounting).
        let mk = |p: &Path| {
            p.parent()
                .map_or(Ok(()), fs::create_dir_all)
                .and_then(|()| fs::create_dir(p))
                .map_err(|source| SandboxError::Cgroup {
                    step: "create",
                    source,
                })
        };
        match layout {
            Layout::V2 { mount, own } => {
                let base = Self::v2_base(mount, own)?;
                let dir = base.join(name);
                mk(&dir)?;
                let mut cg = Cgroup {
                    version: CgroupVersion::V2,
                    dirs: vec![("unified", dir.clone())],
                    limits: *limits,
                };
                let r = (|| {
                    if dir.join("memory.swap.max").exists() {
                        write(&dir.join("memory.swap.max"), "0", "memory.swap.max")?;
                    }
                    write(&dir.join("memory.oom.group"), "1", "memory.oom.group")?;
                    cg.set_limits(limits)
                })();
                r.map(|_| cg)
            }
            Layout::V1 { dirs } => {
                let mut cg = Cgroup {
                    version: CgroupVersion::V1,
                    dirs: Vec::new(),
                    limits: *limits,
                };
                for (c, own) in dirs {
                    let dir = own.join("airlock").join(name);
                    if let Err(e) = mk(&dir) {
                        cg.remove();
                        return Err(e);
                    }
                    cg.dirs.push((c, dir));
                }
                let r = (|| {
                    let mem = cg.dir("memory").ok_or_else(missing)?;
                    let _ = fs::write(mem.join("memory.swappiness"), "0");
                    cg.set_limits(limits)
                })();
                match r {
                    Ok(()) => Ok(cg),
                    Err(e) => {
                        cg.remove();
                        Err(e)
                    }
                }
            }
        }
    }

    /// Writes the memory (without swap), pids and CPU limits. Also used to
    /// tighten a warm sandbox's limits when it is bound: memory is written
    /// before the memory+swap cap, which may never be below it (a lower
    /// value is the order that keeps it above).
    pub fn set_limits(&mut self, limits: &CgroupLimits) -> Result<(), SandboxError> {
        let quota = (limits.cpus * 100_000.0).round().max(1000.0) as u64;
        match self.version {
            CgroupVersion::V2 => {
                let dir = self.dir("").ok_or_else(missing)?;
                write(
                    &dir.join("memory.max"),
                    &limits.memory_bytes.to_string(),
                    "memory.max",
                )?;
                write(&dir.join("pids.max"), &limits.pids.to_string(), "pids.max")?;
                if dir.join("cpu.max").exists() {
                    write(&dir.join("cpu.max"), &format!("{quota} 100000"), "cpu.max")?;
                }
            }
            CgroupVersion::V1 => {
                let mem = self.dir("memory").ok_or_else(missing)?;
                write(
                    &mem.join("memory.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                    "memory.limit_in_bytes",
                )?;
                if mem.join("memory.memsw.limit_in_bytes").exists() {
                    write(
                        &mem.join("memory.memsw.limit_in_bytes"),
                        &limits.memory_bytes.to_string(),
                        "memory.memsw.limit_in_bytes",
                    )?;
                }
                let pids = self.dir("pids").ok_or_else(missing)?;
                write(&pids.join("pids.max"), &limits.pids.to_string(), "pids.max")?;
                if let Some(cpu) = self.dir("cpu") {
                    write(
                        &cpu.join("cpu.cfs_period_us"),
                        "100000",
                        "cpu.cfs_period_us",
                    )?;
                    write(
                        &cpu.join("cpu.cfs_quota_us"),
                        &quota.to_string(),
                        "cpu.cfs_quota_us",
                    )?;
                }
            }
        }
        self.limits = *limits;
        Ok(())
    }

    /// The limits written last.
    pub fn limits(&self) -> &CgroupLimits {
        &self.limits
    }

    fn v2_base(mount: &Path, own: &str) -> Result<PathBuf, SandboxError> {
        Self::v2_base_with(mount, own, &["memory", "pids", "cpu"])
    }

    /// [`Cgroup::v2_base`] handing these controllers to the sandboxes.
    fn v2_base_with(
        mount: &Path,
        own: &str,
        controllers: &[&str],
    ) -> Result<PathBuf, SandboxError> {
        let enable = |dir: &Path| -> io::Result<()> {
            let avail = fs::read_to_string(dir.join("cgroup.controllers"))?;
            let want: Vec<String> = controllers
                .iter()
                .filter(|c| avail.split_whitespace().any(|a| a == **c))
                .map(|c| format!("+{c}"))
                .collect();
            fs::write(dir.join("cgroup.subtree_control"), want.join(" "))
        };
        let try_base = |parent: &Path| -> io::Result<PathBuf> {
            enable(parent)?;
            let base = parent.join("airlock");
            fs::create_dir_all(&base)?;
            enable(&base)?;
            Ok(base)
        };
        let own_dir = mount.join(own);
        let first = match try_base(&own_dir) {
            Ok(b) => return Ok(b),
            Err(e) => e,
        };
        // EBUSY: processes in our own cgroup keep it from delegating.
        let mut arranging = None;
        if first.raw_os_error() == Some(libc::EBUSY) && ours_to_arrange(&own_dir, own) {
            match into_leaf(&own_dir).and_then(|()| try_base(&own_dir)) {
                Ok(b) => return Ok(b),
                Err(e) => arranging = Some(e),
            }
        }
        // The hierarchy's root (as root on a host), else the reason our
        // own cgroup could not be arranged.
        try_base(mount).map_err(|source| SandboxError::Cgroup {
            step: "delegate",
            source: arranging.unwrap_or(source),
        })
    }

    /// The cgroup's directories (one per v1 hierarchy, one on v2).    /// The cgroup's directories (one per v1 hierarchy, one on v2).
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(_, d)| d.clone()).collect()
    }

    fn dir(&self, controller: &str) -> Option<&Path> {
        match self.version {
            CgroupVersion::V2 => self.dirs.first().map(|(_, d)| d.as_path()),
            CgroupVersion::V1 => self
                .dirs
                .iter()
                .find(|(c, _)| *c == controller)
                .map(|(_, d)| d.as_path()),
        }
    }

    /// The cgroup version.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// v1: the `tasks` files through which a single-threaded process moves
    /// itself in (writing "0"); v2: none (the engine attaches).
    pub fn self_join_files(&self) -> Vec<String> {
        match self.version {
            CgroupVersion::V1 => self
                .dirs
                .iter()
                .filter_map(|(_, d)| d.join("tasks").to_str().map(String::from))
                .collect(),
            CgroupVersion::V2 => Vec::new(),
        }
    }

    /// Files a process writes "0" to in order to join this cgroup itself
    /// (every hierarchy for v1), before it execs anything.
    pub fn join_files(&self) -> Vec<String> {
        match self.version {
            CgroupVersion::V1 => self.self_join_files(),
            CgroupVersion::V2 => self
                .dirs
                .iter()
                .filter_map(|(_, d)| d.join("cgroup.procs").to_str().map(String::from))
                .collect(),
        }
    }

    /// Moves a process into the cgroup (every hierarchy for v1).
    pub fn add(&self, pid: i32) -> Result<(), SandboxError> {
        for (_, d) in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string(), "attach")?;
        }
        Ok(())
    }

    /// Total CPU time used so far, ns.
    pub fn cpu_usage_ns(&self) -> Option<u64> {
        match self.version {
            CgroupVersion::V2 => {
                read_kv(&self.dir("cpu")?.join("cpu.stat"), "usage_usec").map(|u| u * 1000)
            }
            CgroupVersion::V1 => read_u64(&self.dir("cpuacct")?.join("cpuacct.usage")),
        }
    }

    /// Reads the end-of-run counters.
    pub fn stats(&self) -> CgroupStats {
        match self.version {
            CgroupVersion::V2 => {
                let d = self
                    .dirs
                    .first()
                    .map(|(_, d)| d.clone())
                    .unwrap_or_default();
                CgroupStats {
                    oom_kills: read_kv(&d.join("memory.events"), "oom_kill").unwrap_or(0),
                    pids_max_hits: read_kv(&d.join("pids.events"), "max").unwrap_or(0),
                    cpu_user_ns: read_kv(&d.join("cpu.stat"), "user_usec").map(|u| u * 1000),
                    cpu_sys_ns: read_kv(&d.join("cpu.stat"), "system_usec").map(|u| u * 1000),
                    peak_memory: read_u64(&d.join("memory.peak")),
                }
            }
            CgroupVersion::V1 => {
                let mem = self
                    .dir("memory")
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                let pids = self.dir("pids").map(Path::to_path_buf).unwrap_or_default();
                let acct = self.dir("cpuacct").map(Path::to_path_buf);
                CgroupStats {
                    // v1 counts an OOM kill (and a refused fork) in the
                    // cgroup of the task it hit, not in the ancestor whose
                    // limit it reached: a runtime may nest one cgroup of
                    // its own inside the sandbox's (runc does).
                    oom_kills: sum_below(&mem, "memory.oom_control", "oom_kill"),
                    pids_max_hits: sum_below(&pids, "pids.events", "max"),
                    cpu_user_ns: acct
                        .as_ref()
                        .and_then(|a| read_u64(&a.join("cpuacct.usage_user"))),
                    cpu_sys_ns: acct
                        .as_ref()
                        .and_then(|a| read_u64(&a.join("cpuacct.usage_sys"))),
                    peak_memory: read_u64(&mem.join("memory.max_usage_in_bytes")),
                }
            }
        }
    }

    /// Every process of the cgroup, including a cgroup a runtime nested in
    /// it (one level: runc's).
    fn procs(&self) -> Vec<i32> {
        let mut out = Vec::new();
        let mut read = |d: &Path| {
            if let Ok(text) = fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        };
        for (_, d) in &self.dirs {
            read(d);
            if let Ok(rd) = fs::read_dir(d) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        read(&e.path());
                    }
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Sends SIGKILL to every process in the cgroup once, without waiting
    /// (v2: `cgroup.kill`; v1: each listed pid).
    pub fn signal_all(&self) {
        if self.version == CgroupVersion::V2
            && let Some(d) = self.dir("")
        {
            let _ = fs::write(d.join("cgroup.kill"), "1");
            return;
        }
        for pid in self.procs() {
            let _ = crate::sys::kill(pid, libc::SIGKILL);
        }
    }

    /// SIGKILLs every process in the cgroup until it is empty (stopped,
    /// SIGTERM-ignoring and freshly forked processes included). Returns
    /// whether it became empty within the deadline.
    pub fn kill_all(&self) -> bool {
        if self.version == CgroupVersion::V2
            && let Some(d) = self.dir("")
        {
            let _ = fs::write(d.join("cgroup.kill"), "1");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let procs = self.procs();
            if procs.is_empty() {
                return true;
            }
            for pid in procs {
                let _ = crate::sys::kill(pid, libc::SIGKILL);
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Kills everything and removes the cgroup directories.
    pub fn remove(&mut self) {
        if self.dirs.is_empty() {
            return;
        }
        self.kill_all();
        for (_, d) in self.dirs.drain(..) {
            // A runtime's own cgroup nested inside (runc's), emptied by the
            // kill above: it goes first, or the sandbox's cannot.
            if let Ok(rd) = fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        let _ = fs::remove_dir(e.path());
                    }
                }
            }
            for _ in 0..200 {
                match fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

/// `key` of `file` in `dir` and in its child cgroups (one level: the
/// deepest a runtime nests), summed.
fn sum_below(dir: &Path, file: &str, key: &str) -> u64 {
    let mut n = read_kv(&dir.join(file), key).unwrap_or(0);
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                n += read_kv(&e.path().join(file), key).unwrap_or(0);
            }
        }
    }
    n
}

fn missing() -> SandboxError {
    SandboxError::Cgroup {
        step: "controller",
        source: io::Error::from(io::ErrorKind::NotFound),
    }
}

/// Kills every process in the cgroup directory `dir` (one hierarchy) and
/// removes it. Used after a crash, for cgroups no live engine owns.
pub fn reap_dir(version: CgroupVersion, dir: &Path) -> bool {
    let mut cg = Cgroup {
        version,
        dirs: vec![("", dir.to_path_buf())],
        limits: CgroupLimits {
            memory_bytes: 0,
            pids: 0,
            cpus: 0.0,
        },
    };
    cg.remove();
    !dir.exists()
}

/// The `airlock/` directories this process's sandboxes are created under.
pub fn sandbox_parents(layout: &Layout) -> Vec<(CgroupVersion, PathBuf)> {
    match layout {
        Layout::V2 { mount, own } => vec![
            (CgroupVersion::V2, mount.join(own).join("airlock")),
            (CgroupVersion::V2, mount.join("airlock")),
        ],
        Layout::V1 { dirs } => dirs
            .iter()
            .map(|(_, own)| (CgroupVersion::V1, own.join("airlock")))
            .collect(),
    }
}

/// Whether cgroup v1 is in use while the v2 hierarchy (mounted beside it)
/// has controllers: the "hybrid" layout some OCI runtimes refuse.
pub fn is_hybrid_with_v2_controllers() -> bool {
    matches!(detect(), Some(Layout::V1 { .. }))
        && fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
            .is_ok_and(|c| !c.trim().is_empty())
}

/// Reaps sandbox cgroups (`airlock/<pid>-<n>`) left by an engine that is
/// gone: its owner pid is `previous_owner` (a crashed server whose pid was
/// recorded) or no longer exists, *and* the cgroup holds no process. (A
/// crashed engine's sandboxes die with it through PDEATHSIG; a cgroup with
/// live processes may belong to an engine in another pid namespace, whose
/// pids this process cannot see, and is left alone.) Returns the
/// directories removed.
pub fn reap_stale(layout: &Layout, previous_owner: Option<u32>) -> Vec<PathBuf> {
    let me = std::process::id();
    let mut reaped = Vec::new();
    for (version, parent) in sandbox_parents(layout) {
        let Ok(entries) = fs::read_dir(&parent) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(owner) = name
                .to_str()
                .and_then(|n| n.split_once('-'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok())
            else {
                continue;
            };
            let gone = !Path::new(&format!("/proc/{owner}")).exists();
            let empty = fs::read_to_string(e.path().join("cgroup.procs"))
                .is_ok_and(|t| t.trim().is_empty());
            if owner != me && (previous_owner == Some(owner) || gone) && empty {
                let dir = e.path();
                if reap_dir(version, &dir) {
                    reaped.push(dir);
                }
            }
        }
    }
    reaped
}

/// Can this process create a cgroup here? (for `doctor`)
pub fn probe_create(layout: &Layout) -> Result<(), SandboxError> {
    let name = format!("doctor-{}", std::process::id());
    let limits = CgroupLimits {
        memory_bytes: 64 << 20,
        pids: 8,
        cpus: 1.0,
    };
    Cgroup::create(layout, &name, &limits).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_leaf_is_not_its_own_parent() {
        assert_eq!(
            own_v2("/system.slice/airlock.service"),
            "system.slice/airlock.service"
        );
        assert_eq!(
            own_v2("/system.slice/airlock.service/airlock-server\n"),
            "system.slice/airlock.service"
        );
        assert_eq!(own_v2("/airlock-server"), "");
        assert_eq!(own_v2("/"), "");
        assert_eq!(own_v2("/a/airlock-server-x"), "a/airlock-server-x");
    }

    /// A v2 hierarchy (mounted at its root) whose root offers a domain
    /// controller, and that controller; none without one or as non-root.
    fn v2_with_a_controller() -> Option<(PathBuf, &'static str)> {
        if !rustix::process::geteuid().is_root() {
            return None;
        }
        let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
        let mount = info.lines().find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            (post.starts_with("cgroup2 ") && pre.get(3) == Some(&"/"))
                .then(|| pre.get(4).map(PathBuf::from))
                .flatten()
        })?;
        let avail = fs::read_to_string(mount.join("cgroup.controllers")).ok()?;
        ["memory", "pids", "hugetlb", "io"]
            .into_iter()
            .find(|c| avail.split_whitespace().any(|a| a == *c))
            .map(|c| (mount, c))
    }

    fn procs(dir: &Path) -> Vec<String> {
        fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap()
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    /// On the kernel's own cgroup v2 (this host's unified hierarchy offers
    /// hugetlb; a v2 host memory): a cgroup with another program in it is
    /// never rearranged, the sandboxes go elsewhere and the program stays;
    /// once the cgroup is delegated (systemd's `trusted.delegate`), its
    /// processes move into the server leaf and the sandboxes' parent is
    /// inside it.
    #[test]
    fn a_busy_cgroup_is_rearranged_only_when_it_is_delegated() {
        let Some((root, ctrl)) = v2_with_a_controller() else {
            eprintln!("skipped: needs root and a cgroup v2 controller");
            return;
        };
        let top = fs::read_to_string(root.join("cgroup.subtree_control")).unwrap();
        let added = !top.split_whitespace().any(|c| c == ctrl);
        if added {
            fs::write(root.join("cgroup.subtree_control"), format!("+{ctrl}")).unwrap();
        }
        let p = root.join(format!("airlock-test-{}", std::process::id()));
        fs::create_dir(&p).unwrap();
        let d = p.join("d");
        fs::create_dir(&d).unwrap();
        let mut other = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = other.id().to_string();
        fs::write(d.join("cgroup.procs"), &pid).unwrap();
        let r = std::panic::catch_unwind(|| {
            // The premise: a controller is refused to a busy cgroup's
            // children (P hands it to D first).
            fs::write(p.join("cgroup.subtree_control"), format!("+{ctrl}")).unwrap();
            let e = fs::write(d.join("cgroup.subtree_control"), format!("+{ctrl}")).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EBUSY));
            // Not ours (another program, no delegation): left as it is.
            let base = Cgroup::v2_base_with(&p, "d", &[ctrl]).unwrap();
            assert_eq!(base, p.join("airlock"));
            assert_eq!(procs(&d), [pid.as_str()]);
            assert!(!d.join(SERVER_LEAF).exists());
            // Delegated to us: its processes go into the leaf.
            rustix::fs::setxattr(
                &d,
                "trusted.delegate",
                b"1",
                rustix::fs::XattrFlags::empty(),
            )
            .unwrap();
            let base = Cgroup::v2_base_with(&p, "d", &[ctrl]).unwrap();
            assert_eq!(base, d.join("airlock"));
            assert!(procs(&d).is_empty());
            assert_eq!(procs(&d.join(SERVER_LEAF)), [pid.as_str()]);
            let enabled = fs::read_to_string(base.join("cgroup.controllers")).unwrap();
            assert!(enabled.split_whitespace().any(|c| c == ctrl), "{enabled}");
        });
        let _ = other.kill();
        let _ = other.wait();
        for dir in [
            d.join("airlock"),
            d.join(SERVER_LEAF),
            d.clone(),
            p.join("airlock"),
            p.clone(),
        ] {
            let _ = fs::remove_dir(dir);
        }
        if added {
            let _ = fs::write(root.join("cgroup.subtree_control"), format!("-{ctrl}"));
        }
        if let Err(e) = r {
            std::panic::resume_unwind(e);
        }
    }
}
