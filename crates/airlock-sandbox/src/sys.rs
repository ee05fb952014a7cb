//! Thin, safe wrappers over the Linux system calls the sandbox needs and
//! that `rustix` does not cover (or covers with a different shape). Every
//! `unsafe` block of the crate that talks to the kernel lives here, each with
//! the invariant that makes it sound.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Converts a libc `-1 + errno` return into `io::Result`.
fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_i(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Result of `fork`.
#[derive(Debug)]
pub enum Forked {
    /// In the parent, with the child's pid.
    Parent(libc::pid_t),
    /// In the child.
    Child,
}

/// `fork(2)`.
///
/// # Safety
/// The calling process must be single-threaded (the sandbox init always is:
/// it is a freshly exec'd binary that never starts threads), so the child
/// does not inherit locks held by threads that do not exist in it.
pub unsafe fn fork() -> io::Result<Forked> {
    // SAFETY: the caller guarantees the process is single-threaded, which is
    // the condition under which everything remains usable in the child.
    let pid = cvt_i(unsafe { libc::fork() })?;
    Ok(if pid == 0 {
        Forked::Child
    } else {
        Forked::Parent(pid)
    })
}

/// `execve(2)`; returns only on failure.
pub fn execve(path: &CStr, argv: &[CString], envp: &[CString]) -> io::Error {
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    // SAFETY: `path` and every element are NUL-terminated C strings that
    // outlive the call, and both pointer arrays are NULL-terminated.
    unsafe { libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr()) };
    io::Error::last_os_error()
}

/// Closes every descriptor numbered `first` and above.
pub fn close_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range only closes descriptors; no Rust object in this
    // process owns a descriptor >= `first` at the call sites (init holds only
    // 0-3 and the engine never calls this).
    match cvt(unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) }) {
        Ok(_) => Ok(()),
        // gVisor refuses the open-ended range (EINVAL); old kernels lack the
        // call. Close one by one up to the descriptor limit instead.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) => {
            let (soft, _) = get_rlimit(libc::RLIMIT_NOFILE)?;
            for fd in first..soft.min(1 << 20) as u32 {
                // SAFETY: as above: nothing here owns these descriptors.
                unsafe { libc::close(fd as RawFd) };
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Marks every descriptor numbered `first` and above close-on-exec (they
/// close at the next exec, not before: a spawn's own error pipe keeps
/// working until then). Async-signal-safe.
pub fn cloexec_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on
    // descriptors; it closes none.
    match cvt(unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    }) {
        Ok(_) => Ok(()),
        // Kernels before 5.11 (no CLOSE_RANGE_CLOEXEC) and gVisor: one by
        // one up to the descriptor limit.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) => {
            let (soft, _) = get_rlimit(libc::RLIMIT_NOFILE)?;
            for fd in first..soft.min(1 << 20) as u32 {
                // SAFETY: F_SETFD only sets the flag; EBADF for a number
                // not open is ignored.
                unsafe { libc::fcntl(fd as RawFd, libc::F_SETFD, libc::FD_CLOEXEC) };
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// `prctl` with integer arguments.
fn prctl(op: libc::c_int, a: libc::c_ulong, b: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: every option used by this module takes integer arguments only,
    // so no pointer is passed to the kernel.
    cvt_i(unsafe { libc::prctl(op, a, b, 0 as libc::c_ulong, 0 as libc::c_ulong) })
}

/// Ask the kernel to SIGKILL this process when its parent thread dies.
pub fn set_parent_death_kill() -> io::Result<()> {
    prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0).map(|_| ())
}

/// Marks the process non-dumpable: no core dumps, and `/proc/<pid>` of this
/// process becomes inaccessible to processes without CAP_SYS_PTRACE.
pub fn set_not_dumpable() -> io::Result<()> {
    set_dumpable(false)
}

/// `PR_SET_DUMPABLE`.
pub fn set_dumpable(on: bool) -> io::Result<()> {
    prctl(libc::PR_SET_DUMPABLE, libc::c_ulong::from(on), 0).map(|_| ())
}

/// `PR_SET_NO_NEW_PRIVS`.
pub fn set_no_new_privs() -> io::Result<()> {
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0).map(|_| ())
}

/// Landlock's `LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR`.
pub const LANDLOCK_READ: u64 = (1 << 2) | (1 << 3);

/// Adds a path-beneath rule allowing `access` under the directory
/// `parent` (an open descriptor) to the Landlock ruleset `ruleset`, not
/// yet enforced. One system call, no allocation: usable between fork and
/// exec (a rule for a mount made there, such as a process's own /proc).
pub fn landlock_allow_beneath(ruleset: RawFd, parent: RawFd, access: u64) -> io::Result<()> {
    // The kernel's struct landlock_path_beneath_attr (packed).
    #[repr(C, packed)]
    struct PathBeneath {
        allowed_access: u64,
        parent_fd: i32,
    }
    let attr = PathBeneath {
        allowed_access: access,
        parent_fd: parent,
    };
    // SAFETY: `attr` is a live value of the layout the kernel reads for
    // LANDLOCK_RULE_PATH_BENEATH (1), which it only reads, during the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset,
            1,
            &attr as *const PathBeneath,
            0u32,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Drops every capability from the bounding set, clears the ambient set and
/// locks securebits so no later exec or uid change can regain privileges.
pub fn drop_bounding_and_ambient() -> io::Result<()> {
    // Without CAP_SETPCAP (a process a runtime started unprivileged, with
    // an empty bounding set) the drops are refused even for capabilities
    // that are gone, and gVisor answers some of these calls with EINVAL:
    // what counts is the state reached, checked at the end from
    // /proc/self/status.
    for cap in 0..64 {
        match prctl(libc::PR_CAPBSET_DROP, cap, 0) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            // EINVAL: past the kernel's last capability.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => return Err(e),
        }
    }
    let cleared = prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        0,
    );
    // SECBIT_NOROOT | _LOCKED, SECBIT_NO_SETUID_FIXUP | _LOCKED,
    // SECBIT_KEEP_CAPS_LOCKED, SECBIT_NO_CAP_AMBIENT_RAISE | _LOCKED.
    let bits: libc::c_ulong = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80;
    let locked = prctl(libc::PR_SET_SECUREBITS, bits, 0);
    // gVisor reports no CapAmb line; the ambient set is a subset of
    // permitted and inheritable, so those being empty proves it empty.
    let ambient_gone = caps_zero(&["CapAmb:"])? || caps_zero(&["CapPrm:", "CapInh:"])?;
    if !(caps_zero(&["CapBnd:"])? && ambient_gone) {
        return Err(cleared
            .err()
            .unwrap_or_else(|| io::Error::from_raw_os_error(libc::EPERM)));
    }
    match locked {
        Ok(_) => Ok(()),
        // The bits keep a uid-0 transition from regaining capabilities;
        // with an empty bounding set (checked above) and no_new_privs (the
        // next step) there is nothing it could regain. Setting them needs
        // CAP_SETPCAP, which an unprivileged agent does not have.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EINVAL)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether every capability set named (`CapEff:`, `CapBnd:` ...) in
/// /proc/self/status is empty.
fn caps_zero(sets: &[&str]) -> io::Result<bool> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let mut seen = 0;
    for l in status.lines() {
        if sets.iter().any(|s| l.starts_with(s)) {
            seen += 1;
            if !l
                .split_whitespace()
                .nth(1)
                .is_some_and(|v| v.trim_start_matches('0').is_empty())
            {
                return Ok(false);
            }
        }
    }
    Ok(seen == sets.len())
}

/// Clears the effective, permitted and inheritable capability sets.
pub fn clear_capabilities() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522,
        pid: 0,
    }; // _LINUX_CAPABILITY_VERSION_3
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: header and data are valid, properly laid out
    // `__user_cap_header_struct` / two `__user_cap_data_struct` as version 3
    // requires, alive for the duration of the call.
    cvt(unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) })
        .map(|_| ())
}

/// Reads the effective capability mask of this process (for self-checks).
pub fn effective_caps_zero() -> io::Result<bool> {
    caps_zero(&["CapEff:", "CapPrm:"])
}

/// `setgroups(0, NULL)`: drop every supplementary group.
pub fn clear_groups() -> io::Result<()> {
    // SAFETY: a zero-length list with a null pointer is the documented way to
    // clear supplementary groups; the kernel reads nothing.
    cvt(unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) })
        .map(|_| ())
}

/// Sets real, effective and saved uid and gid for the (single) thread.
pub fn set_ids(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: integer-only syscalls. The raw syscall (not the libc wrapper)
    // is used on purpose: init is single-threaded, so there are no other
    // threads whose credentials glibc would need to synchronise.
    cvt(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) }).map(|_| ())
}

/// `unshare(2)`.
pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: integer-only syscall; init is single-threaded, as CLONE_NEWUSER
    // requires.
    cvt_i(unsafe { libc::unshare(flags) }).map(|_| ())
}

/// `sethostname(2)`.
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe `name`'s bytes, valid for the call.
    cvt_i(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(|_| ())
}

/// Brings the loopback interface of the current network namespace up.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket creation with constant arguments.
    let fd =
        cvt_i(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket() and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads/writes an ifreq we own and that lives across the call.
    cvt_i(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) })?;
    // SAFETY: the union member ifru_flags is the one SIOCGIFFLAGS filled in.
    unsafe {
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: as above, SIOCSIFFLAGS reads the ifreq we own.
    cvt_i(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) }).map(|_| ())
}

/// Sets soft and hard values of one rlimit.
pub fn set_rlimit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard.max(soft),
    };
    // SAFETY: `lim` is a valid rlimit that outlives the call.
    cvt_i(unsafe { libc::setrlimit(resource, &lim) }).map(|_| ())
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildStatus {
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

extern "C" fn on_sigchld(_: libc::c_int) {}

/// Makes SIGCHLD wake [`wait_any_watching`]: a handler that does nothing
/// (so a wait is interrupted) and the signal blocked until that wait
/// unblocks it atomically (no exit can slip between a check and the
/// sleep). Call before forking the children to wait for; a forked program
/// restores both ([`reset_signals`]).
pub fn wake_on_sigchld() -> io::Result<()> {
    // SAFETY: sigaction and sigprocmask with plain-old-data structures we
    // own; the handler is an extern "C" fn that touches nothing.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigchld as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_NOCLDSTOP;
        libc::sigemptyset(&mut sa.sa_mask);
        cvt_i(libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut()))?;
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        cvt_i(libc::sigprocmask(
            libc::SIG_BLOCK,
            &set,
            std::ptr::null_mut(),
        ))?;
    }
    Ok(())
}

/// [`wait_any`], giving up with EPIPE as soon as `watch` hangs up: its
/// peer (the engine) is gone, and nothing will read what a child does.
/// Sleeps until a child ends or `watch` changes (after
/// [`wake_on_sigchld`]): no polling interval, no added latency.
pub fn wait_any_watching(watch: RawFd) -> io::Result<(libc::pid_t, ChildStatus)> {
    // SAFETY: sigset_t is plain old data; sigprocmask only reads the
    // current mask into it.
    let unblocked = unsafe {
        let mut cur: libc::sigset_t = std::mem::zeroed();
        cvt_i(libc::sigprocmask(
            libc::SIG_BLOCK,
            std::ptr::null(),
            &mut cur,
        ))?;
        libc::sigdelset(&mut cur, libc::SIGCHLD);
        cur
    };
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid out-pointer for the call's duration.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid > 0 {
            return Ok((pid, decode_status(status)));
        }
        if pid == -1 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(err);
            }
        }
        let mut pfd = libc::pollfd {
            fd: watch,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no timeout, and a signal mask we own.
        let r = unsafe { libc::ppoll(&mut pfd, 1, std::ptr::null(), &unblocked) };
        if r > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLIN) != 0 {
            return Err(io::Error::from_raw_os_error(libc::EPIPE));
        }
        if r < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(err);
            }
        }
    }
}

fn decode_status(status: libc::c_int) -> ChildStatus {
    if libc::WIFEXITED(status) {
        ChildStatus::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        ChildStatus::Signaled(libc::WTERMSIG(status))
    } else {
        ChildStatus::Signaled(0)
    }
}

/// Waits for any child; returns its pid and status. Retries on EINTR.
pub fn wait_any() -> io::Result<(libc::pid_t, ChildStatus)> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid out-pointer for the call's duration.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == -1 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(err);
        }
        let st = if libc::WIFEXITED(status) {
            ChildStatus::Exited(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            ChildStatus::Signaled(libc::WTERMSIG(status))
        } else {
            continue;
        };
        return Ok((pid, st));
    }
}

/// Waits for one specific child, retrying on EINTR.
pub fn wait_pid(pid: libc::pid_t) -> io::Result<ChildStatus> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid out-pointer for the call's duration.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == -1 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(err);
        }
        if libc::WIFEXITED(status) {
            return Ok(ChildStatus::Exited(libc::WEXITSTATUS(status)));
        }
        if libc::WIFSIGNALED(status) {
            return Ok(ChildStatus::Signaled(libc::WTERMSIG(status)));
        }
    }
}

/// CPU times (µs) and peak RSS (KiB) of all waited-for children.
pub fn children_usage() -> (u64, u64, u64) {
    // SAFETY: rusage is plain old data; all-zero is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid out-pointer for the call's duration.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let us = |tv: libc::timeval| (tv.tv_sec as u64) * 1_000_000 + tv.tv_usec as u64;
    (us(ru.ru_utime), us(ru.ru_stime), ru.ru_maxrss as u64)
}

/// Sends a signal to a process.
pub fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: integer-only syscall.
    cvt_i(unsafe { libc::kill(pid, sig) }).map(|_| ())
}

/// True when the filesystem at `path` has (next to) no space left for an
/// unprivileged writer, or no free inodes.
pub fn fs_full(path: &CStr) -> bool {
    // SAFETY: statvfs is plain old data; all-zero is valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` a valid out-pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return false;
    }
    // tmpfs fills to the last block; ext4 (a microVM's scratch disk)
    // refuses a writer with a few blocks left, kept for its metadata.
    // (Only where the file system keeps blocks back from writers: on
    // tmpfs a small scratch nearly full is not full.)
    let left = st.f_bavail.saturating_mul(st.f_frsize);
    let kept_back = st.f_bavail < st.f_bfree;
    // No inode count at all (f_files 0: gVisor's tmpfs) is not "full".
    st.f_bfree == 0 || (kept_back && left < FULL_BELOW) || (st.f_files > 0 && st.f_ffree == 0)
}

/// Free space below which [`fs_full`] calls a filesystem full.
const FULL_BELOW: u64 = 256 << 10;

/// `statvfs(3)` of the file system at `path`.
pub fn statvfs(path: &str) -> io::Result<libc::statvfs> {
    let c = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: statvfs is plain old data; all-zero is valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` a valid out-pointer.
    cvt_i(unsafe { libc::statvfs(c.as_ptr(), &mut st) })?;
    Ok(st)
}

/// Allocates `len` bytes of blocks to `f` from its start (`fallocate(2)`,
/// mode 0: the file's size becomes `len`).
pub fn fallocate(f: &std::fs::File, len: u64) -> io::Result<()> {
    let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: integer-only syscall on a descriptor borrowed here.
    cvt_i(unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len) }).map(|_| ())
}

/// Mount flags (`ST_*`) of the filesystem at `path`.
pub fn mount_flags(path: &CStr) -> io::Result<u64> {
    // SAFETY: statvfs is plain old data; all-zero is valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` a valid out-pointer.
    cvt_i(unsafe { libc::statvfs(path.as_ptr(), &mut st) })?;
    Ok(st.f_flag)
}

/// Maps one page at a random address hint and returns a pointer to a copy of
/// `bytes` (NUL-terminated) placed at a random offset in it. The memory is
/// intentionally leaked: it must stay valid until `execve`.
pub fn place_at_random_address(bytes: &CStr) -> io::Result<*const libc::c_char> {
    let mut rnd = [0u8; 16];
    getrandom(&mut rnd)?;
    let r0 = u64::from_ne_bytes(rnd[..8].try_into().unwrap_or([0; 8]));
    let r1 = u64::from_ne_bytes(rnd[8..].try_into().unwrap_or([0; 8]));
    let len = bytes.to_bytes_with_nul().len();
    if len > 2048 {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    // A page-aligned hint in [16 TiB, 112 TiB): far from the usual mmap base.
    let hint = ((r0 % (96 << 28)) + (16 << 28)) << 12;
    // SAFETY: an anonymous private mapping with a hint (no MAP_FIXED) cannot
    // replace existing mappings; the kernel picks another address if the hint
    // is taken.
    let p = unsafe {
        libc::mmap(
            hint as *mut libc::c_void,
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let offset = (r1 as usize) % (4096 - len);
    // SAFETY: the mapping is 4096 bytes, writable, and offset + len <= 4096.
    unsafe {
        let dst = (p as *mut u8).add(offset);
        std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<u8>(), dst, len);
        Ok(dst as *const libc::c_char)
    }
}

/// `execve` with a caller-supplied path pointer (see
/// [`place_at_random_address`]); returns only on failure.
///
/// # Safety
/// `path` must point to a NUL-terminated string valid for the call.
pub unsafe fn execve_raw(
    path: *const libc::c_char,
    argv: &[CString],
    envp: &[CString],
) -> io::Error {
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    // SAFETY: the caller guarantees `path`; argv/envp arrays are
    // NULL-terminated and their strings outlive the call.
    unsafe { libc::execve(path, argv_ptrs.as_ptr(), envp_ptrs.as_ptr()) };
    io::Error::last_os_error()
}

/// Fills `buf` from the kernel CSPRNG.
pub fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer/length pair describes the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// `dup2(old, new)`; the new descriptor does not have CLOEXEC.
pub fn dup2(old: RawFd, new: RawFd) -> io::Result<()> {
    // SAFETY: integer-only syscall; callers use it only on descriptors they
    // own, in a child between fork and exec or in the single-threaded init.
    cvt_i(unsafe { libc::dup2(old, new) }).map(|_| ())
}

/// Duplicates `fd` to the lowest free descriptor >= `min` (F_DUPFD, no
/// CLOEXEC). Async-signal-safe.
pub fn dup_above_cloexec(fd: RawFd, min: RawFd) -> io::Result<RawFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) only creates a new descriptor.
    cvt_i(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) })
}
pub fn dup_above(fd: RawFd, min: RawFd) -> io::Result<RawFd> {
    // SAFETY: fcntl(F_DUPFD) only creates a new descriptor.
    cvt_i(unsafe { libc::fcntl(fd, libc::F_DUPFD, min) })
}

/// Sends one descriptor over a Unix socket (one byte of data, SCM_RIGHTS).
pub fn send_fd(sock: RawFd, fd: RawFd) -> io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    // SAFETY: both descriptors are open for the duration of the call (the
    // caller holds them); the borrows end before it returns.
    let (sock, fd) = unsafe {
        (
            std::os::fd::BorrowedFd::borrow_raw(sock),
            std::os::fd::BorrowedFd::borrow_raw(fd),
        )
    };
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    if !cmsg.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
    }
    rustix::net::sendmsg(
        sock,
        &[io::IoSlice::new(&[0u8])],
        &mut cmsg,
        SendFlags::NOSIGNAL,
    )
    .map(|_| ())
    .map_err(io::Error::from)
}

/// Closes a descriptor number that no object in this process owns (an
/// inherited one); a descriptor that is not open is fine.
pub fn close_unowned(fd: RawFd) {
    // SAFETY: the caller names a descriptor no Rust object owns, so closing
    // it cannot invalidate an OwnedFd/File; close has no memory effects.
    unsafe { libc::close(fd) };
}

/// Whether `fd` is an open socket.
pub fn is_socket(fd: RawFd) -> bool {
    // SAFETY: fstat writes only into the zeroed stat buffer we pass.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; an invalid fd yields EBADF, not UB.
    let rc = unsafe { libc::fstat(fd, &mut st) };
    rc == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK
}

/// Takes ownership of a raw descriptor number inherited at exec.
///
/// # Safety
/// `fd` must be open and not owned by any other object in this process.
pub unsafe fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: forwarded from the caller's guarantee.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Parent pid.
pub fn getppid() -> libc::pid_t {
    // SAFETY: getppid has no arguments and cannot fail.
    unsafe { libc::getppid() }
}

/// Effective uid.
pub fn geteuid() -> u32 {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// Effective gid.
pub fn getegid() -> u32 {
    // SAFETY: getegid has no arguments and cannot fail.
    unsafe { libc::getegid() }
}

/// Immediately terminates the process without running destructors.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and is always safe to call.
    unsafe { libc::_exit(code) }
}

/// Creates a pipe with CLOEXEC on both ends.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid two-element out-array.
    cvt_i(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 returned two fresh descriptors that nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `mount(2)` with optional source, type and data.
pub fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    let p = |s: Option<&CStr>| s.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is either null (allowed for source, type and
    // data) or a NUL-terminated string alive for the duration of the call.
    cvt_i(unsafe { libc::mount(p(source), target.as_ptr(), p(fstype), flags, p(data).cast()) })
        .map(|_| ())
}

/// `umount2(2)`.
pub fn umount2(target: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: `target` is NUL-terminated and alive for the call.
    cvt_i(unsafe { libc::umount2(target.as_ptr(), flags) }).map(|_| ())
}

/// `pivot_root(2)`.
pub fn pivot_root(new_root: &CStr, put_old: &CStr) -> io::Result<()> {
    // SAFETY: both arguments are NUL-terminated strings alive for the call.
    cvt(unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) })
        .map(|_| ())
}

/// `setsid(2)`.
pub fn setsid() -> io::Result<()> {
    // SAFETY: no arguments.
    cvt_i(unsafe { libc::setsid() }).map(|_| ())
}

/// Whether the process has no controlling terminal: opening /dev/tty
/// fails with ENXIO (Linux), EIO (gVisor), or there is no /dev/tty.
pub fn no_controlling_terminal() -> bool {
    match std::fs::OpenOptions::new().read(true).open("/dev/tty") {
        Ok(_) => false,
        Err(e) => matches!(
            e.raw_os_error(),
            Some(libc::ENXIO) | Some(libc::ENOENT) | Some(libc::EIO)
        ),
    }
}

/// Current (soft, hard) of an rlimit.
pub fn get_rlimit(resource: libc::__rlimit_resource_t) -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out-pointer for the call.
    cvt_i(unsafe { libc::getrlimit(resource, &mut lim) })?;
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// The kernel's Landlock ABI version, or 0 when Landlock is unavailable.
pub fn landlock_abi() -> u32 {
    // SAFETY: LANDLOCK_CREATE_RULESET_VERSION with a null attribute pointer
    // and size 0 is the documented version query; no memory is accessed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    if r < 0 { 0 } else { r as u32 }
}

/// Sets O_NONBLOCK on a descriptor.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL take and return integers only.
    let flags = cvt_i(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt_i(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(|_| ())
}

/// A sealed, execute-only in-memory copy of the file at `from`, named
/// `name` (it shows as `/memfd:<name> (deleted)`): it can be executed
/// through `/proc/self/fd/<fd>`, neither it nor its size can change, and
/// nobody can read it.
pub fn sealed_copy(name: &str, from: &std::path::Path) -> io::Result<OwnedFd> {
    sealed_copy_mode(name, from, 0o100)
}

/// [`sealed_copy`] with the exec bits `mode` (0o100: the owner only;
/// 0o111: also the unprivileged ids a runtime starts the agent as).
pub fn sealed_copy_mode(name: &str, from: &std::path::Path, mode: u32) -> io::Result<OwnedFd> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let base = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    // MFD_EXEC says so explicitly where `vm.memfd_noexec` exists (6.3+);
    // older kernels do not know the flag (EINVAL); `vm.memfd_noexec = 2`
    // refuses it (EACCES), and then the copy cannot be executed at all: the
    // caller fails and no zygote runs.
    let fd = match rustix::fs::memfd_create(name, base | MemfdFlags::EXEC) {
        Err(rustix::io::Errno::INVAL) => rustix::fs::memfd_create(name, base)?,
        r => r?,
    };
    let mut dst = std::fs::File::from(fd);
    io::copy(&mut std::fs::File::open(from)?, &mut dst)?;
    let fd = OwnedFd::from(dst);
    set_exec_mode(&fd, mode)?;
    // The exec bits are sealed where the kernel can (6.3+): nobody holding
    // the file can make it unexecutable for the next start.
    if rustix::fs::fcntl_add_seals(&fd, SealFlags::EXEC).is_err() {
        // Older kernels: the owner re-asserts the mode before each exec.
    }
    rustix::fs::fcntl_add_seals(
        &fd,
        SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
    )?;
    Ok(fd)
}

/// Execute-only for its owner: whoever holds it as /proc/self/exe (a
/// sandboxed program) can neither read nor write it, as Landlock keeps the
/// binary on disk unreadable for them. Called again before every exec of a
/// [`sealed_copy`]: without the exec seal, a holder with the owner's uid
/// (a rootless engine's sandboxes) could change the mode.
pub fn make_execute_only(fd: &OwnedFd) -> io::Result<()> {
    set_exec_mode(fd, 0o100)
}

fn set_exec_mode(fd: &OwnedFd, want: u32) -> io::Result<()> {
    match rustix::fs::fchmod(fd, rustix::fs::Mode::from_raw_mode(want)) {
        // Sealed exec bits refuse even an unchanged mode; what matters is
        // the mode it has.
        Err(rustix::io::Errno::PERM) => {}
        r => r?,
    }
    let mode = rustix::fs::fstat(fd)?.st_mode & 0o7777;
    if mode != want {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the zygote image's mode was changed",
        ));
    }
    Ok(())
}

/// `pidfd_open(2)`: a descriptor that names exactly this process, immune to
/// pid reuse.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: integer-only syscall.
    let fd = cvt(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) })?;
    // SAFETY: the kernel returned a fresh descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// SIGKILL through a pidfd.
pub fn pidfd_kill(pidfd: &OwnedFd) -> io::Result<()> {
    // SAFETY: a valid pidfd, a signal number, a null siginfo and no flags.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<u8>(),
            0u32,
        )
    })
    .map(|_| ())
}

/// `poll(2)` over (fd, events) pairs; returns revents per entry. EINTR is
/// reported as "nothing ready".
pub fn poll(fds: &[(RawFd, i16)], timeout_ms: i32) -> io::Result<Vec<i16>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid array of pollfd of the given length.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(vec![0; fds.len()]);
        }
        return Err(e);
    }
    Ok(pfds.iter().map(|p| p.revents).collect())
}

/// Writes `data` to the file at `path` with raw system calls only (open,
/// write, close): usable between fork and exec.
pub fn write_raw(path: &std::ffi::CStr, data: &[u8]) -> io::Result<()> {
    // SAFETY: `path` is a valid NUL-terminated string for the call.
    let fd = cvt_i(unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) })?;
    // SAFETY: `data` is valid for `data.len()` bytes; `fd` was just opened.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    let err = io::Error::last_os_error();
    // SAFETY: `fd` is open and owned here; closing it once.
    unsafe { libc::close(fd) };
    if n < 0 {
        return Err(err);
    }
    if n as usize != data.len() {
        return Err(io::Error::from(io::ErrorKind::WriteZero));
    }
    Ok(())
}

/// Clears FD_CLOEXEC on a descriptor.
pub fn clear_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETFD takes an integer argument only.
    cvt_i(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }).map(|_| ())
}

/// Sets FD_CLOEXEC on a descriptor.
pub fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETFD takes an integer argument only.
    cvt_i(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) }).map(|_| ())
}

/// Restores every catchable signal to its default action and unblocks all
/// signals. Ignored signals survive execve, and the Rust runtime ignores
/// SIGPIPE, so without this the program would start with SIGPIPE ignored.
/// Ignores every catchable signal but SIGCHLD (whose default keeps
/// children waitable). For an init whose kernel delivers its namespace's
/// signals to it (gVisor's sentry): no signal the code can route to it
/// (kill, or SIGIO/SIGURG of a descriptor it made pid 1 the owner of) ends
/// it. A forked program restores the defaults ([`reset_signals`]).
pub fn ignore_signals() {
    for sig in 1..=64 {
        if sig == libc::SIGKILL
            || sig == libc::SIGSTOP
            || sig == libc::SIGCHLD
            || (32..libc::SIGRTMIN()).contains(&sig)
        {
            continue;
        }
        // SAFETY: installing SIG_IGN for a valid, catchable signal number
        // involves no Rust handler and no shared state.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
}

pub fn reset_signals() -> io::Result<()> {
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP || (32..libc::SIGRTMIN()).contains(&sig) {
            continue;
        }
        // SAFETY: installing SIG_DFL for a valid, catchable signal number
        // involves no Rust handler and no shared state.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    // SAFETY: sigset_t is plain old data; sigemptyset initialises it and
    // sigprocmask reads it; the old-set pointer is null.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        cvt_i(libc::sigprocmask(
            libc::SIG_SETMASK,
            &set,
            std::ptr::null_mut(),
        ))?;
    }
    Ok(())
}

/// Sends one message with descriptors attached (SCM_RIGHTS) on a socket.
pub fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    // SAFETY: the caller holds `sock` and every descriptor in `fds` open for
    // the duration of the call; the borrows end before it returns.
    let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(sock) };
    // SAFETY: as above.
    let borrowed: Vec<std::os::fd::BorrowedFd<'_>> = fds
        .iter()
        .map(|&fd| unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
        .collect();
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() && !cmsg.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
    }
    rustix::net::sendmsg(
        sock,
        &[io::IoSlice::new(data)],
        &mut cmsg,
        SendFlags::NOSIGNAL,
    )
    .map(|_| ())
    .map_err(io::Error::from)
}

/// Receives one message and up to `max_fds` descriptors (close-on-exec).
/// Returns the byte count (0 at end of stream) and the descriptors; a
/// message whose data or descriptors were cut off is an error, and every
/// descriptor it carried is closed.
pub fn recv_with_fds(
    sock: RawFd,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
    // SAFETY: the caller holds `sock` open for the duration of the call.
    let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(sock) };
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let r = rustix::net::recvmsg(
        sock,
        &mut [io::IoSliceMut::new(buf)],
        &mut cmsg,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for m in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(got) = m {
            fds.extend(got);
        }
    }
    if r.flags.intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC) || fds.len() > max_fds {
        return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
    }
    Ok((r.bytes, fds))
}

/// Reaps every child that has ended, without blocking.
pub fn reap_children() {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid out-pointer for the call's duration.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
    }
}

/// Waits until the process behind `pidfd` has ended (its pidfd becomes
/// readable), for at most `timeout_ms`. True when it ended.
pub fn pidfd_wait_exit(pidfd: &OwnedFd, timeout_ms: i32) -> bool {
    matches!(poll(&[(pidfd.as_raw_fd(), libc::POLLIN)], timeout_ms), Ok(r) if r[0] != 0)
}

/// `finit_module(2)` of an xz- or uncompressed kernel module (the kernel
/// decompresses it): a microVM guest's init loads its drivers with it.
pub fn load_module(module: &std::fs::File) -> io::Result<()> {
    const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;
    // SAFETY: the descriptor is open for the call; the parameter string is
    // a valid NUL-terminated empty string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            module.as_raw_fd(),
            c"".as_ptr(),
            MODULE_INIT_COMPRESSED_FILE,
        )
    };
    match cvt(r) {
        Ok(_) => Ok(()),
        // Built into this kernel, or loaded already.
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `chroot(2)`.
pub fn chroot(path: &CStr) -> io::Result<()> {
    // SAFETY: `path` is a valid NUL-terminated string for the call.
    cvt_i(unsafe { libc::chroot(path.as_ptr()) }).map(|_| ())
}

/// `clone(2)` with `flags` (namespace flags) like fork: the child continues
/// here on a copy of the stack.
///
/// # Safety
/// As [`fork`]: the calling process must be single-threaded.
pub unsafe fn fork_with(flags: libc::c_int) -> io::Result<Forked> {
    // SAFETY: a raw clone without CLONE_VM and with a null stack duplicates
    // the address space as fork does; the caller guarantees a single thread.
    let pid = cvt(unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    })?;
    Ok(if pid == 0 {
        Forked::Child
    } else {
        Forked::Parent(pid as libc::pid_t)
    })
}

/// `execveat(fd, "", argv, envp, AT_EMPTY_PATH)`: executes the file `fd`
/// refers to; returns only on failure.
pub fn execve_fd(fd: RawFd, argv: &[CString], envp: &[CString]) -> io::Error {
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    // SAFETY: the path is an empty NUL-terminated string, every argv/envp
    // element is a NUL-terminated string that outlives the call and both
    // pointer arrays are NULL-terminated.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            fd,
            c"".as_ptr(),
            argv_ptrs.as_ptr(),
            envp_ptrs.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    io::Error::last_os_error()
}

/// Mixes `seed` into the kernel's random pool and credits it as entropy
/// (`RNDADDENTROPY`, root only): a guest restored from a snapshot must not
/// continue the random state every other restore of it shares.
pub fn add_entropy(seed: &[u8]) -> io::Result<()> {
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    let mut buf = Vec::with_capacity(8 + seed.len());
    buf.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    buf.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    buf.extend_from_slice(seed);
    // SAFETY: `buf` is a `struct rand_pool_info` (entropy_count,
    // buf_size, then buf_size bytes), valid for the call.
    cvt_i(unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, buf.as_ptr()) }).map(|_| ())
}

/// Makes the kernel's random generator reseed itself now from its input
/// pool (a restored microVM's first step after new entropy was added: its
/// generator state was saved in the snapshot every restore shares).
pub fn reseed_crng() -> io::Result<()> {
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // SAFETY: RNDRESEEDCRNG takes no argument; `f` is open for the call.
    cvt_i(unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) }).map(|_| ())
}

/// Sets the realtime clock (a restored microVM's clock is the snapshot's).
pub fn set_realtime(secs: u64, nanos: u32) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(secs)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        tv_nsec: libc::c_long::from(nanos.min(999_999_999)),
    };
    // SAFETY: `ts` is a valid timespec for the duration of the call.
    cvt_i(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(|_| ())
}

/// Powers the machine off at once (a microVM guest's init, whose VM then
/// ends). Never returns.
pub fn power_off() -> ! {
    // SAFETY: integer-only syscall; pid 1 of a guest owns the machine.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    exit_now(1)
}

/// `read(2)` into `buf` (a short read or EAGAIN as the kernel says).
pub fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid writable buffer of its length; `fd` is a
    // descriptor the caller holds for the duration of the call.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    cvt(n as libc::c_long).map(|n| n as usize)
}

/// `pread(2)` into `buf` at `offset`.
pub fn pread_fd(fd: RawFd, buf: &mut [u8], offset: i64) -> io::Result<usize> {
    // SAFETY: `buf` is a valid writable buffer of its length; `fd` is a
    // descriptor the caller holds for the duration of the call.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), offset) };
    cvt(n as libc::c_long).map(|n| n as usize)
}

/// Copies all of `src` into the empty `dst`, keeping its holes: a clone
/// (`FICLONE`) where the filesystem shares blocks, else each data extent
/// with `copy_file_range`, or read and written where that cannot copy
/// (across file systems): a disk image that is mostly holes costs what it
/// holds, not its size.
pub fn copy_sparse(src: &std::fs::File, dst: &std::fs::File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its argument; both
    // are open files borrowed for the duration of the call.
    if unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0 {
        return Ok(());
    }
    let len = src.metadata()?.len();
    // Empty until copy_file_range cannot serve; then the copy buffer.
    let mut buf: Vec<u8> = Vec::new();
    for (data, end) in data_extents(src)? {
        let (mut from, mut to) = (data, data);
        while from < end {
            if buf.is_empty() {
                // SAFETY: both offsets point to live i64s of this frame;
                // the descriptors are borrowed for the duration of the
                // call.
                let n = unsafe {
                    libc::copy_file_range(
                        src.as_raw_fd(),
                        &mut from,
                        dst.as_raw_fd(),
                        &mut to,
                        (end - from) as usize,
                        0,
                    )
                };
                match cvt(n as libc::c_long) {
                    Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                    Ok(_) => continue,
                    // Across file systems (EXDEV), or where the kernel
                    // or file system has no such copy: by hand.
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
                        ) =>
                    {
                        buf = vec![0u8; 1 << 20];
                    }
                    Err(e) => return Err(e),
                }
            }
            let want = buf.len().min((end - from) as usize);
            let n = std::os::unix::fs::FileExt::read_at(src, &mut buf[..want], from as u64)?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            std::os::unix::fs::FileExt::write_all_at(dst, &buf[..n], to as u64)?;
            from += n as i64;
            to += n as i64;
        }
    }
    dst.set_len(len)
}

/// The data extents of `f`, as (start, end) byte offsets in order
/// (`SEEK_DATA`/`SEEK_HOLE`): what a sparse file holds, its holes left
/// out (a file system without holes reports one extent of all of it).
pub fn data_extents(f: &std::fs::File) -> io::Result<Vec<(i64, i64)>> {
    let len = f.metadata()?.len() as i64;
    let seek = |off: i64, whence: libc::c_int| -> io::Result<Option<i64>> {
        // SAFETY: integer-only syscall on a descriptor borrowed here.
        let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // No data at or after `off`.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(r))
    };
    let mut out = Vec::new();
    let mut off = 0i64;
    while off < len {
        let Some(data) = seek(off, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        out.push((data, end));
        off = end;
    }
    Ok(out)
}

/// `write(2)` of `buf` (a short write or EAGAIN as the kernel says).
pub fn write_fd(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid readable buffer of its length; `fd` is a
    // descriptor the caller holds for the duration of the call.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    cvt(n as libc::c_long).map(|n| n as usize)
}
