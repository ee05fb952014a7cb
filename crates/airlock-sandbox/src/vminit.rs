//! A microVM guest's init: pid 1 of the guest kernel, started from the
//! guest's initramfs as `/init __airlock-vminit`.
//!
//! It turns the guest into the same sandbox the other backends build,
//! as a second wall inside the VM: it loads the guest's drivers, leaves the
//! initramfs (pivot_root cannot leave one), mounts the read-only root image,
//! and opens the one virtio-serial port to the host, over which a
//! [`vmchan::Mux`] carries the configuration, the agent's control socket,
//! stdio, the broker and egress (each connection the agent's forwarder
//! accepts is relayed over an egress stream of its own to the host's
//! proxy: the guest has no network device). Once the configuration is in, it mixes the host's
//! randomness into the guest's pool and starts the agent as pid 1 of fresh
//! pid, mount, network, IPC, UTS and cgroup namespaces, in the root
//! [`crate::init::build_root`] builds (the process sandbox's code), as the
//! unprivileged sandbox user with no capability. The agent applies the
//! rest (Landlock, seccomp, no_new_privs, rlimits) exactly as on every
//! backend and runs the one job.
//!
//! Must never: exit (the guest kernel would panic; it powers off
//! instead); trust the configuration beyond its size and shape; keep a
//! descriptor in the agent beyond its channels.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::launch::{SANDBOX_GID, SANDBOX_UID};
use crate::proto::{self, VmGuestConfig};
use crate::sys;
use crate::vmchan::{Mux, Sink, Source, stream};

/// argv[1] of the guest's init.
pub const VMINIT_ARG: &str = "__airlock-vminit";

/// Where the initramfs holds the drivers, loaded in name order.
pub const MODULES_DIR: &str = "/modules";

/// The virtio-serial port's name.
pub const PORT_NAME: &str = "airlock";

/// Where the guest mounts its read-only root image; the view's bind
/// sources are read below it.
const IMAGE: &str = "/img";

/// Where the guest mounts its scratch disk, outside every sandbox's root:
/// its `tmp` and `workspace` become the sandbox's /tmp and /workspace.
const SCRATCH: &str = "/scratch";

/// The virtio-fs tag of a session's workspace.
pub const WORKSPACE_TAG: &str = "workspace";

/// Where the guest mounts a session's workspace, outside every sandbox's
/// root (bound at its /workspace like the process sandbox binds the host
/// directory).
const WORKSPACE: &str = "/ws";

/// The serial numbers the host gives the guest's two disks (found by
/// them, not by the order the kernel happened to probe them in).
pub const ROOT_SERIAL: &str = "airlock-root";
/// See [`ROOT_SERIAL`].
pub const SCRATCH_SERIAL: &str = "airlock-scratch";

/// How long the root image's device and the port may take to appear.
const DEVICE_WAIT: Duration = Duration::from_secs(10);

/// A progress mark on the guest's console (a kernel warning, so `quiet`
/// keeps it): the host shows the console as the runtime's words when the
/// agent never reports ready.
fn note(stage: &str) {
    if let Ok(mut k) = fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        use std::io::Write;
        let _ = k.write_all(format!("<4>airlock-vminit: {stage}\n").as_bytes());
    }
}

/// Why the guest could not start its sandbox: sent to the host, which logs
/// it (no tenant runs yet).
fn fail(mux: Option<&mut Mux>, what: &str, e: impl std::fmt::Display) -> ! {
    note(&format!("failed: {what}: {e}"));
    if let Some(m) = mux {
        let _ = m.set_source(
            stream::VM,
            Source::Bytes(format!("{what}: {e}").into_bytes(), 0),
        );
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end {
            if m.step(&[], 50).is_err() {
                break;
            }
        }
    }
    sys::power_off()
}

fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> std::io::Result<()> {
    let c = |s: &str| CString::new(s).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL));
    let data = c(data)?;
    sys::mount(
        Some(&c(src)?),
        &c(target)?,
        Some(&c(fstype)?),
        flags,
        Some(&data),
    )
}

/// Entry point. Never returns.
pub fn main(args: &[String]) -> ! {
    if !args.is_empty() || std::process::id() != 1 {
        sys::exit_now(2);
    }
    let agent = match boot() {
        Ok(a) => a,
        Err((what, e)) => fail(None, what, e),
    };
    note("root image mounted");
    let port = match open_port() {
        Ok(p) => p,
        Err(e) => fail(None, "port", e),
    };
    note("port open");
    run(port, agent)
}

/// Drivers, the move out of the initramfs, the root image. Returns the
/// airlock binary (for the agent), opened before the initramfs is left.
fn boot() -> Result<OwnedFd, (&'static str, std::io::Error)> {
    let e = |what: &'static str| move |err: std::io::Error| (what, err);
    let nosuid = libc::MS_NOSUID | libc::MS_NOEXEC;
    mount("dev", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755").map_err(e("devtmpfs"))?;
    mount("proc", "/proc", "proc", nosuid | libc::MS_NODEV, "").map_err(e("proc"))?;
    mount("sys", "/sys", "sysfs", nosuid | libc::MS_NODEV, "").map_err(e("sysfs"))?;
    let mut mods: Vec<_> = fs::read_dir(MODULES_DIR)
        .map_err(e("modules"))?
        .flatten()
        .map(|d| d.path())
        .collect();
    mods.sort();
    for m in mods {
        let f = fs::File::open(&m).map_err(e("module"))?;
        sys::load_module(&f).map_err(e("module"))?;
    }
    note("drivers loaded");
    let agent: OwnedFd = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open("/init")
        .map_err(e("init binary"))?
        .into();
    // pivot_root refuses the initramfs: move a tmpfs over / instead (what
    // switch_root does) and continue there.
    fs::create_dir_all("/newroot").map_err(e("newroot"))?;
    mount(
        "guest",
        "/newroot",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "size=1m,mode=0755",
    )
    .map_err(e("newroot"))?;
    for d in ["dev", "proc", "sys", "tmp", "img", "scratch", "ws"] {
        fs::create_dir(format!("/newroot/{d}")).map_err(e("newroot"))?;
    }
    for d in ["/dev", "/proc", "/sys"] {
        let c = CString::new(d).unwrap_or_default();
        let t = CString::new(format!("/newroot{d}")).unwrap_or_default();
        sys::mount(Some(&c), &t, None, libc::MS_MOVE, None).map_err(e("move"))?;
    }
    std::env::set_current_dir("/newroot").map_err(e("newroot"))?;
    sys::mount(Some(c"."), c"/", None, libc::MS_MOVE, None).map_err(e("move root"))?;
    sys::chroot(c".").map_err(e("chroot"))?;
    std::env::set_current_dir("/").map_err(e("chroot"))?;
    let end = Instant::now() + DEVICE_WAIT;
    let root = disk(ROOT_SERIAL, end).map_err(e("root image"))?;
    // Read-only here, and read-only on the host side too (the VM opens the
    // image read-only): a guest that remounts it cannot change it.
    mount(
        &root,
        IMAGE,
        "erofs",
        libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOSUID,
        "",
    )
    .map_err(e("root image"))?;
    // The sandbox's scratch: a disk of this VM's own (made for it on the
    // host, sized by the policy), so what the code writes costs neither
    // the guest's RAM nor anyone else's space. A disk found damaged turns
    // read-only instead of being written on.
    let scratch = disk(SCRATCH_SERIAL, end).map_err(e("scratch disk"))?;
    mount(
        &scratch,
        SCRATCH,
        "ext4",
        libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOATIME,
        "errors=remount-ro,noinit_itable",
    )
    .map_err(e("scratch disk"))?;
    for (dir, mode) in crate::rootfs::SCRATCH {
        if dir == "/dev/shm" {
            continue;
        }
        let p = format!("{SCRATCH}{dir}");
        let mode = u32::from_str_radix(mode, 8).unwrap_or(0o755);
        fs::create_dir(&p).map_err(e("scratch disk"))?;
        std::os::unix::fs::chown(&p, Some(SANDBOX_UID), Some(SANDBOX_GID))
            .map_err(e("scratch disk"))?;
        fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(e("scratch disk"))?;
    }
    Ok(agent)
}

/// Leaves the sandbox exactly the policy's scratch: what the disk holds
/// beyond `bytes` and `inodes` files (the host makes it a little larger:
/// ext4 lays out inodes and metadata per block group) is taken by
/// root-owned files in a directory of the disk's root, which the sandbox
/// never sees (it has only `tmp` and `workspace`).
fn reserve_scratch(bytes: u64, inodes: u64) -> std::io::Result<()> {
    let dir = format!("{SCRATCH}/.reserve");
    fs::create_dir(&dir)?;
    fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let st = sys::statvfs(SCRATCH)?;
    // One inode of the surplus is the space file's (below).
    let surplus = st.f_favail.saturating_sub(inodes);
    for i in 1..surplus {
        fs::File::create(format!("{dir}/{i}"))?;
    }
    let st = sys::statvfs(SCRATCH)?;
    let left = st.f_bavail.saturating_mul(st.f_frsize);
    if left > bytes {
        let f = fs::File::create(format!("{dir}/space"))?;
        sys::fallocate(&f, left - bytes)?;
    }
    Ok(())
}

/// The device node of the virtio disk with serial number `serial`, waiting
/// (until `end`) for the kernel to probe it.
fn disk(serial: &str, end: Instant) -> std::io::Result<String> {
    loop {
        for d in fs::read_dir("/sys/block")?.flatten() {
            let name = d.file_name().to_string_lossy().into_owned();
            let dev = format!("/dev/{name}");
            if name.starts_with("vd")
                && fs::read_to_string(d.path().join("serial")).is_ok_and(|s| s.trim() == serial)
                && std::path::Path::new(&dev).exists()
            {
                return Ok(dev);
            }
        }
        if Instant::now() > end {
            return Err(std::io::Error::from_raw_os_error(libc::ENODEV));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The virtio-serial port named [`PORT_NAME`].
fn open_port() -> std::io::Result<OwnedFd> {
    let end = Instant::now() + DEVICE_WAIT;
    loop {
        if let Ok(dir) = fs::read_dir("/sys/class/virtio-ports") {
            for ent in dir.flatten() {
                let name = fs::read_to_string(ent.path().join("name")).unwrap_or_default();
                if name.trim_end() == PORT_NAME {
                    let dev = format!("/dev/{}", ent.file_name().to_string_lossy());
                    let f = fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .custom_flags(libc::O_CLOEXEC)
                        .open(dev)?;
                    return Ok(f.into());
                }
            }
        }
        if Instant::now() > end {
            return Err(std::io::Error::from_raw_os_error(libc::ENODEV));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The agent's ends of its channels.
struct AgentEnds {
    ctrl: UnixStream,
    broker: UnixStream,
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    /// The agent's egress channel (at descriptor 5), when the host relays
    /// egress.
    egress: Option<OwnedFd>,
}

fn run(port: OwnedFd, agent: OwnedFd) -> ! {
    let made = (|| -> std::io::Result<(Mux, AgentEnds, UnixStream)> {
        let (ctrl_here, ctrl) = UnixStream::pair()?;
        let (broker_here, broker) = UnixStream::pair()?;
        let (stdin, stdin_here) = sys::pipe()?;
        let (stdout_here, stdout) = sys::pipe()?;
        let (stderr_here, stderr) = sys::pipe()?;
        let ctrl_w: OwnedFd = ctrl_here.try_clone()?.into();
        let mux = Mux::new(
            port,
            vec![
                (Source::None, Sink::Bytes(Vec::new(), proto::MAX_VM_CONFIG)),
                (Source::Fd(ctrl_here.into()), Sink::Fd(ctrl_w)),
                (Source::None, Sink::Fd(stdin_here)),
                (Source::Fd(stdout_here), Sink::None),
                (Source::Fd(stderr_here), Sink::None),
            ],
        )?
        .guest();
        Ok((
            mux,
            AgentEnds {
                ctrl,
                broker,
                stdin,
                stdout,
                stderr,
                egress: None,
            },
            broker_here,
        ))
    })();
    let (mut mux, mut ends, broker_here) = match made {
        Ok(v) => v,
        Err(e) => fail(None, "channels", e),
    };
    // The configuration first; the engine's first control bytes wait in
    // the control socket meanwhile.
    let cfg = loop {
        if let Err(e) = mux.step(&[], 1000) {
            fail(Some(&mut mux), "channel", e)
        }
        if let Some(b) = mux.received(stream::VM) {
            match serde_json::from_slice::<VmGuestConfig>(b) {
                Ok(c) => break c,
                Err(e) => fail(Some(&mut mux), "configuration", e),
            }
        }
    };
    note("configuration received");
    if let Err(why) = check(&cfg) {
        fail(Some(&mut mux), "configuration", why)
    }
    // The broker's stream exists only when the host has a broker for
    // this sandbox (what the agent does with descriptor 4 follows its own
    // configuration, from the engine).
    if cfg.root.broker {
        let set = broker_here.try_clone().and_then(|w| {
            mux.set_stream(
                stream::BROKER,
                Source::Fd(broker_here.into()),
                Sink::Fd(w.into()),
            )
        });
        if let Err(e) = set {
            fail(Some(&mut mux), "channels", e)
        }
    } else {
        drop(broker_here);
    }
    // The agent's forwarder asks here for a socket per connection (the
    // relay mode of [`crate::relay`]), as it would ask the host's proxy.
    let egress_here = if cfg.egress {
        match rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        ) {
            Ok((here, agent)) => {
                ends.egress = Some(agent);
                Some(here)
            }
            Err(e) => fail(Some(&mut mux), "channels", std::io::Error::from(e)),
        }
    } else {
        None
    };
    match hex(&cfg.seed) {
        Some(seed) if seed.len() >= 32 => {
            if let Err(e) = sys::add_entropy(&seed) {
                fail(Some(&mut mux), "entropy", e)
            }
        }
        _ => fail(Some(&mut mux), "configuration", "seed"),
    }
    // No clock device (rtc=off): the host's time, as the VM started.
    if let Err(e) = sys::set_realtime(cfg.clock.0, cfg.clock.1) {
        fail(Some(&mut mux), "clock", e)
    }
    if let Err(e) = limits(&cfg) {
        fail(Some(&mut mux), "cgroup", e)
    }
    if let Err(e) = reserve_scratch(cfg.root.scratch_bytes, cfg.root.scratch_inodes) {
        fail(Some(&mut mux), "scratch disk", e)
    }
    // A session's workspace: the host's file server behind virtio-fs (it
    // runs as the session's own host uid and maps the sandbox user to
    // it), never set-uid, never a device; its quota is the host file
    // system's.
    if cfg.workspace
        && let Err(e) = mount(
            WORKSPACE_TAG,
            WORKSPACE,
            "virtiofs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "",
        )
    {
        fail(Some(&mut mux), "workspace", e)
    }
    let child = match start_agent(&cfg, ends, agent) {
        Ok(pid) => pid,
        Err(e) => fail(Some(&mut mux), "agent", e),
    };
    note("agent started");
    let pidfd = sys::pidfd_open(child).ok();
    let mut exited: Option<Instant> = None;
    let mut egress_here = egress_here;
    loop {
        let mut extra: Vec<(RawFd, i16)> = pidfd
            .iter()
            .filter(|_| exited.is_none())
            .map(|p| (p.as_raw_fd(), libc::POLLIN))
            .collect();
        let pid_polled = !extra.is_empty();
        if let Some(e) = &egress_here {
            extra.push((e.as_raw_fd(), libc::POLLIN));
        }
        match mux.step(&extra, 200) {
            Ok(rev) => {
                if pid_polled && rev.first().is_some_and(|r| *r != 0) {
                    let _ = sys::wait_pid(child);
                    exited = Some(Instant::now());
                }
                if egress_here.is_some()
                    && rev.get(usize::from(pid_polled)).is_some_and(|r| *r != 0)
                    && !relay_request(&mut mux, egress_here.as_ref())
                {
                    // The forwarder is gone.
                    egress_here = None;
                }
            }
            Err(_) => sys::power_off(),
        }
        // Restored from a snapshot: before anything else reaches the
        // sandbox, entropy and a clock of this machine's own.
        if let Some(r) = mux.take_resume() {
            if let Err(e) = resume(&r) {
                fail(Some(&mut mux), "resume", e)
            }
            mux.ack_resume();
        }
        // Once the agent is gone, what it wrote is sent, then the machine
        // ends (the host kills it anyway).
        if let Some(t) = exited
            && (mux.finished() || t.elapsed() > Duration::from_secs(5))
        {
            let _ = mux.flush();
            sys::power_off()
        }
    }
}

/// One request of the agent's forwarder for a connection's socket: a
/// fresh socket pair, one end on a new egress stream of the channel, the
/// other sent back; refused when every egress stream is in use. False once
/// the forwarder is gone (or sent what it never sends).
fn relay_request(mux: &mut Mux, chan: Option<&OwnedFd>) -> bool {
    use crate::relay::{RELAY_REFUSED, RELAY_REQUEST};
    let Some(chan) = chan else { return false };
    let mut b = [0u8; 1];
    match sys::recv_with_fds(chan.as_raw_fd(), &mut b, 0) {
        Ok((1, _)) if b[0] == RELAY_REQUEST => {}
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
        _ => return false,
    }
    let opened = UnixStream::pair().and_then(|(here, there)| {
        let src: OwnedFd = here.try_clone()?.into();
        Ok(mux.open_egress(src, here.into())?.map(|_| there))
    });
    match opened {
        Ok(Some(there)) => {
            sys::send_with_fds(chan.as_raw_fd(), &[RELAY_REQUEST], &[there.as_raw_fd()]).is_ok()
        }
        _ => sys::send_with_fds(chan.as_raw_fd(), &[RELAY_REFUSED], &[]).is_ok(),
    }
}

/// A restored VM's first step (see [`crate::vmchan`]): the host's fresh
/// entropy mixed in and the generator reseeded from it at once, so two
/// restores of one snapshot never share random state, and the host's
/// clock instead of the snapshot's.
fn resume(payload: &[u8]) -> std::io::Result<()> {
    let bad = || std::io::Error::from_raw_os_error(libc::EINVAL);
    let (seed, clock) = payload.split_at_checked(64).ok_or_else(bad)?;
    sys::add_entropy(seed)?;
    sys::reseed_crng()?;
    let secs = u64::from_le_bytes(
        clock
            .get(..8)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    let nanos = u32::from_le_bytes(
        clock
            .get(8..12)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    sys::set_realtime(secs, nanos)?;
    note("resumed");
    Ok(())
}

/// The guest kernel's cgroup (v2) for the sandbox: the policy's memory
/// (no swap) and tasks, so a limit ends the program in the guest before the
/// VM's RAM or the host's cgroup does.
const SANDBOX_CGROUP: &str = "/sys/fs/cgroup/sandbox";

fn limits(cfg: &VmGuestConfig) -> std::io::Result<()> {
    mount(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )?;
    fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+memory +pids")?;
    fs::create_dir(SANDBOX_CGROUP)?;
    let set = |file: &str, value: String| fs::write(format!("{SANDBOX_CGROUP}/{file}"), value);
    set("memory.max", cfg.memory_bytes.to_string())?;
    // No swap device exists in the guest; where the file exists, say so.
    match set("memory.swap.max", "0".into()) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    set("pids.max", cfg.pids.to_string())
}

/// Only the filesystem part of the view may be set, with absolute paths
/// that stay below the image.
fn check(cfg: &VmGuestConfig) -> Result<(), &'static str> {
    let r = &cfg.root;
    if !r.cgroup_tasks.is_empty()
        || !r.seccomp.is_empty()
        || r.zygote
        || r.egress
        || r.landlock_strict
        || r.scratch_dir.is_some()
        || r.workspace_dir.is_some()
    {
        return Err("fields the guest does not take");
    }
    let ok = |p: &str| {
        p.starts_with('/') && !p.contains('\0') && !p.split('/').any(|c| c == ".." || c == ".")
    };
    for m in r.mounts.iter().chain(&r.etc_mounts) {
        if !ok(&m.host) || !ok(&m.target) {
            return Err("mount path");
        }
    }
    for f in r.files.iter().chain(&r.etc_files) {
        if !ok(&f.path) {
            return Err("file path");
        }
    }
    for (p, _) in &r.symlinks {
        if !ok(p) {
            return Err("symlink path");
        }
    }
    Ok(())
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 1024 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Starts the agent as pid 1 of new namespaces in the built root, as the
/// sandbox user, with its channels at 0-5.
fn start_agent(
    cfg: &VmGuestConfig,
    ends: AgentEnds,
    agent: OwnedFd,
) -> std::io::Result<libc::pid_t> {
    let mut root = cfg.root.clone();
    root.scratch_dir = Some(SCRATCH.into());
    if cfg.workspace {
        root.workspace_dir = Some(WORKSPACE.into());
    }
    for m in root.mounts.iter_mut().chain(root.etc_mounts.iter_mut()) {
        m.host = format!("{IMAGE}{}", m.host);
    }
    let argv = [
        CString::new("airlock").unwrap_or_default(),
        CString::new(crate::agent::AGENT_ARG).unwrap_or_default(),
    ];
    let null: OwnedFd = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?
        .into();
    // SAFETY: the guest's init is single-threaded (it never starts a
    // thread), so the child inherits no lock held by another thread.
    match unsafe { sys::fork_with(libc::CLONE_NEWPID) }? {
        sys::Forked::Parent(pid) => Ok(pid),
        sys::Forked::Child => {
            let code = (|| -> Result<(), i32> {
                let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(libc::EIO);
                fs::write(format!("{SANDBOX_CGROUP}/cgroup.procs"), "0").map_err(errno)?;
                // Read by the agent once the program ends: an OOM kill here
                // is the policy's memory limit (the host's cgroup never
                // sees the guest's).
                let events: OwnedFd = fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(format!("{SANDBOX_CGROUP}/memory.events"))
                    .map_err(errno)?
                    .into();
                crate::init::build_root(&root).map_err(|(_, e)| e)?;
                sys::unshare(libc::CLONE_NEWCGROUP).map_err(errno)?;
                // The channels at the agent's numbers (stdio, control 3,
                // broker 4, egress 5), the binary at 6 (the agent closes it
                // first thing), the memory events at 7, nothing else.
                let place = [
                    ends.stdin.as_raw_fd(),
                    ends.stdout.as_raw_fd(),
                    ends.stderr.as_raw_fd(),
                    ends.ctrl.as_raw_fd(),
                    ends.broker.as_raw_fd(),
                    ends.egress.as_ref().unwrap_or(&null).as_raw_fd(),
                    agent.as_raw_fd(),
                    events.as_raw_fd(),
                ];
                let mut parked = [0; 8];
                for (i, fd) in place.iter().enumerate() {
                    parked[i] = sys::dup_above_cloexec(*fd, 64).map_err(errno)?;
                }
                for (i, fd) in parked.iter().enumerate() {
                    sys::dup2(*fd, i as RawFd).map_err(errno)?;
                }
                sys::close_from(8).map_err(errno)?;
                sys::drop_bounding_and_ambient().map_err(errno)?;
                sys::clear_groups().map_err(errno)?;
                sys::set_ids(SANDBOX_UID, SANDBOX_GID).map_err(errno)?;
                Err(errno(sys::execve_fd(6, &argv, &[])))
            })();
            sys::exit_now(code.err().unwrap_or(1).min(255))
        }
    }
}
