//! The python zygote: one process per (language, policy) that has the
//! interpreter initialised and the guest SDK loaded, and forks the first
//! process of each new sandbox. The fork happens *before* isolation: the
//! forked child runs exactly the same stage 1 → pid 1 → program path as a
//! freshly exec'd init ([`crate::init`]), with every layer applied by the
//! same code in the same order; only the final step differs, where the
//! program process continues in the already-initialised interpreter instead
//! of exec'ing a new one. That skips the interpreter's start-up (the bulk of
//! a cold start) and lets every sandbox share the interpreter's pages with
//! the zygote copy-on-write.
//!
//! What the zygote holds is never tenant-specific: it is started with the
//! pooled program's fixed environment, loads only the guest SDK, and
//! receives nothing but descriptors; a tenant's code, input and identity
//! arrive over the broker in the program process, after the fork and after
//! every layer. Nothing flows back from a sandbox into the zygote.
//!
//! Shared by every sandbox of one zygote (the same trade-off as Android's
//! zygote): the address-space layout, the stack canary, and python's string
//! hash key. `random` is reseeded in every child by python's own at-fork
//! hook. The pool replaces its zygote after a bounded number of forks.
//!
//! Protocol on descriptor [`REQUEST_FD`], a SOCK_SEQPACKET socket from the
//! engine: first one [`ZygoteConfig`] (JSON, one message); the zygote
//! answers `ready <python version>` or `error <reason>`. Then per sandbox one
//! message `S` + flags byte carrying the descriptors (stdin, stdout, stderr,
//! control, [broker], [egress]); the answer is the child's pid (4 bytes,
//! little endian) with a pidfd for it, or 4 zero bytes when the fork
//! failed.

use std::ffi::{CStr, CString, c_char, c_int};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

use crate::launch::{BROKER_FD, CONTROL_FD, EGRESS_FD, Extras, InitProc, Started};
use crate::sys::{self, Forked};

/// argv[1] that makes the airlock binary act as a zygote.
pub const ZYGOTE_ARG: &str = "__airlock-zygote";
/// The engine's request socket in the zygote.
pub const REQUEST_FD: RawFd = 3;
/// Largest configuration message.
pub const MAX_CONFIG: usize = 64 * 1024;
/// Request flag: a broker channel is attached.
pub const FLAG_BROKER: u8 = 1;
/// Request flag: an egress channel is attached.
pub const FLAG_EGRESS: u8 = 2;

/// What the zygote is built for; fixed for its whole life.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ZygoteConfig {
    /// The shared libpython of the configured interpreter (host path).
    pub libpython: String,
    /// The interpreter path the program sees (`sys.executable`).
    pub executable: String,
    /// The python guest SDK (runner.py, airlock.py): file name -> source.
    /// Sources, not a host path: nothing of the host's layout enters the
    /// interpreter every sandbox inherits.
    pub guest_sources: std::collections::BTreeMap<String, String>,
    /// Where those files are inside sandboxes.
    pub guest_target: String,
    /// The engine's pid: the zygote's parent, checked once the
    /// configuration is read (not on the command line, which every sandbox
    /// of this zygote can read).
    pub engine_pid: i32,
    /// The argv a cold sandbox would exec; a job must carry exactly this.
    pub argv: Vec<String>,
    /// The environment a cold sandbox would get (`NAME=value`); the zygote
    /// runs with exactly this, and a job must carry exactly this.
    pub env: Vec<String>,
    /// Paths visible inside sandboxes (mount targets and symlinks): the
    /// zygote's import path keeps only entries beneath them, so it finds
    /// no module a cold sandbox could not.
    pub visible: Vec<String>,
}

type VoidFn = unsafe extern "C" fn();
type RunFn = unsafe extern "C" fn(*const c_char) -> c_int;
type InitFn = unsafe extern "C" fn(c_int);
type VersionFn = unsafe extern "C" fn() -> *const c_char;
type DecodeFn = unsafe extern "C" fn(*const c_char, *mut usize) -> *mut libc::wchar_t;
type SetNameFn = unsafe extern "C" fn(*const libc::wchar_t);

/// The few libpython entry points the zygote uses, resolved with dlsym.
pub(crate) struct Python {
    before_fork: VoidFn,
    after_fork_parent: VoidFn,
    after_fork_child: VoidFn,
    run_string: RunFn,
    /// The configuration the zygote was started with (checked against each job).
    pub(crate) config: ZygoteConfig,
}

fn sym(lib: *mut libc::c_void, name: &CStr) -> Result<*mut libc::c_void, String> {
    // SAFETY: `lib` is a handle returned by dlopen and `name` is a valid C string.
    let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
    if p.is_null() {
        Err(format!("libpython lacks {}", name.to_string_lossy()))
    } else {
        Ok(p)
    }
}

/// A libpython function as a typed function pointer.
///
/// # Safety
/// `T` must be the `unsafe extern "C" fn` type whose signature is the C
/// signature of the function `name` in libpython.
unsafe fn func<T: Copy>(lib: *mut libc::c_void, name: &CStr) -> Result<T, String> {
    let p = sym(lib, name)?;
    if std::mem::size_of::<T>() != std::mem::size_of::<*mut libc::c_void>() {
        return Err("function pointer size".into());
    }
    // SAFETY: `p` is the address of that function and `T` (the caller's
    // guarantee) is a function pointer type of the same size for it.
    Ok(unsafe { std::mem::transmute_copy::<*mut libc::c_void, T>(&p) })
}

/// Python's pre-initialisation flags that make it behave as `python3 -I -B -u`,
/// the flags a cold sandbox runs with.
const FLAGS: [&CStr; 5] = [
    c"Py_IsolatedFlag",
    c"Py_IgnoreEnvironmentFlag",
    c"Py_NoUserSiteDirectory",
    c"Py_DontWriteBytecodeFlag",
    c"Py_UnbufferedStdioFlag",
];

impl Python {
    /// Loads libpython, sets the flags, initialises the interpreter and runs
    /// the bootstrap (guest SDK loaded under its in-sandbox file names).
    fn start(config: ZygoteConfig) -> Result<(Python, String), String> {
        let path = CString::new(config.libpython.as_str()).map_err(|_| "bad libpython path")?;
        // SAFETY: dlopen with a valid C string; RTLD_GLOBAL so python's own
        // extension modules resolve the interpreter's symbols from it.
        let lib = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if lib.is_null() {
            return Err("libpython could not be loaded".into());
        }
        for flag in FLAGS {
            let p = sym(lib, flag)? as *mut c_int;
            // SAFETY: each symbol is one of python's global `int` flags,
            // written before the interpreter starts and from its only thread.
            unsafe { *p = 1 };
        }
        // SAFETY: each target type is the C signature of the libpython
        // function named with it (Python's C API, unchanged since 3.7).
        let (decode, set_name, init, version, py) = unsafe {
            (
                func::<DecodeFn>(lib, c"Py_DecodeLocale")?,
                func::<SetNameFn>(lib, c"Py_SetProgramName")?,
                func::<InitFn>(lib, c"Py_InitializeEx")?,
                func::<VersionFn>(lib, c"Py_GetVersion")?,
                Python {
                    before_fork: func::<VoidFn>(lib, c"PyOS_BeforeFork")?,
                    after_fork_parent: func::<VoidFn>(lib, c"PyOS_AfterFork_Parent")?,
                    after_fork_child: func::<VoidFn>(lib, c"PyOS_AfterFork_Child")?,
                    run_string: func::<RunFn>(lib, c"PyRun_SimpleString")?,
                    config,
                },
            )
        };
        let exe = CString::new(py.config.executable.as_str()).map_err(|_| "bad executable")?;
        // Install python's signal handlers like a normal interpreter start.
        // SAFETY: Py_DecodeLocale's heap copy lives for the process, as
        // Py_SetProgramName needs; both precede Py_InitializeEx, one thread.
        unsafe {
            let wide = decode(exe.as_ptr(), std::ptr::null_mut());
            if wide.is_null() {
                return Err("interpreter path not decodable".into());
            }
            set_name(wide);
            init(1);
        }
        // SAFETY: Py_GetVersion returns a static NUL-terminated string.
        let v = unsafe { CStr::from_ptr(version()) }
            .to_string_lossy()
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
        // The configuration reaches python as a JSON string literal (valid
        // python string syntax) decoded by json.loads: no value can be read
        // as code.
        let cfg = serde_json::to_string(&py.config).map_err(|_| "config")?;
        let literal = serde_json::to_string(&cfg).map_err(|_| "config")?;
        py.run(&BOOTSTRAP.replace("@CONFIG@", &literal))?;
        Ok((py, v))
    }

    fn run(&self, code: &str) -> Result<(), String> {
        let c = CString::new(code).map_err(|_| "code contains NUL")?;
        // SAFETY: the interpreter is initialised and this (its only) thread
        // holds the GIL; `c` is a valid C string for the call's duration.
        match unsafe { (self.run_string)(c.as_ptr()) } {
            0 => Ok(()),
            _ => Err("python raised".into()),
        }
    }

    /// In the sandbox's program process, after every layer and the
    /// program's rlimits: continue as the program in the inherited
    /// interpreter. Never returns.
    fn continue_as_program(&self) -> ! {
        // What a starting interpreter installs: SIGPIPE and SIGXFSZ ignored
        // (SIGINT's handler is re-installed from python below).
        // SAFETY: SIG_IGN for valid signal numbers; no Rust handler involved.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        }
        // The interpreter was initialised in the zygote, single-threaded.
        // SAFETY: this process comes from a fork bracketed by PyOS_BeforeFork
        // and has run no python since: what PyOS_AfterFork_Child expects.
        unsafe { (self.after_fork_child)() };
        let argv = &self.config.argv;
        let tail = argv.len().saturating_sub(2);
        let code = format!(
            "import signal as _s, sys as _y\n\
             _s.signal(_s.SIGINT, _s.default_int_handler)\n\
             _y.argv = {}\n_y.orig_argv = {}\ndel _s, _y\n\
             import os as _o\n\
             _p = _o.environ.get('AIRLOCK_MODE') == 'pooled'\n\
             del _o\n\
             _finish_fast(main) if _p else __import__('sys').exit(main())\n",
            serde_json::to_string(&argv[tail..]).unwrap_or_default(),
            serde_json::to_string(argv).unwrap_or_default(),
        );
        let _ = self.run(&code);
        sys::exit_now(1)
    }
}

impl crate::launch::Inherited for Python {
    fn shape(&self) -> (&[String], &[String]) {
        (&self.config.argv, &self.config.env)
    }

    fn run_program(&self) -> ! {
        self.continue_as_program()
    }
}

/// Run once in the zygote: python behaves as `python3 -I -B -u
/// <guest>/runner.py` would up to the point where the runner waits for its
/// execution. The SDK is compiled under its in-sandbox file names, so
/// tracebacks inside the sandbox name /opt/airlock paths, never host ones.
const BOOTSTRAP: &str = r#"
def _airlock_zygote(c):
    import sys, types
    def seen(p):
        return any(p == v or p.startswith(v.rstrip("/") + "/") for v in c["visible"])
    sys.path[:] = [p for p in sys.path if seen(p)]
    for p in list(sys.path_importer_cache):
        if not seen(p):
            del sys.path_importer_cache[p]
    import json, traceback, atexit, signal, collections, struct, threading  # noqa: F401
    sys.executable = c["executable"]
    sys._base_executable = c["executable"]
    def load(fname):
        path = c["guest_target"] + "/" + fname
        return path, compile(c["guest_sources"][fname], path, "exec")
    path, code = load("airlock.py")
    m = types.ModuleType("airlock")
    m.__file__ = path
    sys.modules["airlock"] = m
    exec(code, m.__dict__)
    path, code = load("runner.py")
    g = sys.modules["__main__"].__dict__
    g["__file__"] = path
    g["__name__"] = "__airlock_zygote__"
    exec(code, g)
    g["__name__"] = "__main__"
_airlock_zygote(__import__("json").loads(@CONFIG@))
del _airlock_zygote
"#;

/// Entry point of the zygote process (`airlock __airlock-zygote`).
pub fn main(args: &[String]) -> ! {
    let code = match serve(args) {
        Ok(()) => 0,
        Err(_) => 1,
    };
    sys::exit_now(code)
}

fn reply(msg: &[u8]) -> Result<(), ()> {
    sys::send_with_fds(REQUEST_FD, msg, &[]).map_err(|_| ())
}

fn serve(args: &[String]) -> Result<(), ()> {
    // Only the request socket and stdio are expected; anything else is a leak.
    sys::close_from(REQUEST_FD as u32 + 1).map_err(|_| ())?;
    if !args.is_empty() {
        return Err(());
    }
    // Executed from an unreadable image, the zygote starts non-dumpable,
    // and so would every process it forks: their /proc files would belong
    // to root, and a rootless engine could not write their id maps. It is
    // dumpable as an exec'd binary is; stage 1 and pid 1 then handle
    // dumpability as on a cold start.
    sys::set_dumpable(true).map_err(|_| ())?;
    sys::set_parent_death_kill().map_err(|_| ())?;
    // Wiped after parsing: every sandbox forked from here inherits this
    // memory.
    let mut buf = zeroize::Zeroizing::new(vec![0u8; MAX_CONFIG]);
    let (n, fds) = sys::recv_with_fds(REQUEST_FD, &mut buf, 0).map_err(|_| ())?;
    drop(fds);
    let config: ZygoteConfig = serde_json::from_slice(&buf[..n]).map_err(|_| {
        let _ = reply(b"error invalid configuration");
    })?;
    drop(buf);
    // The parent-death signal was armed before this check: if the engine
    // is gone already, the zygote is not its child any more.
    if sys::getppid() != config.engine_pid {
        return Err(());
    }
    let (python, version) = Python::start(config).map_err(|e| {
        let _ = reply(format!("error {e}").as_bytes());
    })?;
    reply(format!("ready {version}").as_bytes())?;
    let me = std::process::id() as i32;
    loop {
        sys::reap_children();
        // Wake up now and then to reap sandboxes that ended.
        let rev = sys::poll(&[(REQUEST_FD, libc::POLLIN)], 1000).map_err(|_| ())?;
        if rev[0] == 0 {
            continue;
        }
        let mut req = [0u8; 8];
        let (n, fds) = sys::recv_with_fds(REQUEST_FD, &mut req, 6).map_err(|_| ())?;
        if n == 0 {
            // The engine closed the socket: the zygote is retired. Its
            // sandboxes die with it (their parent-death signal), so it
            // leaves only after the last one has ended.
            while sys::wait_any().is_ok() {}
            return Ok(());
        }
        let flags = if n == 2 && req[0] == b'S' {
            req[1]
        } else {
            0xff
        };
        let want =
            4 + usize::from(flags & FLAG_BROKER != 0) + usize::from(flags & FLAG_EGRESS != 0);
        if flags & !(FLAG_BROKER | FLAG_EGRESS) != 0 || fds.len() != want {
            reply(&[0; 4])?;
            continue;
        }
        // SAFETY: the interpreter is initialised and this thread holds the GIL.
        unsafe { (python.before_fork)() };
        // SAFETY: the zygote is single-threaded (no thread is ever started
        // in it, by Rust or by the bootstrap).
        let forked = unsafe { sys::fork() };
        match forked {
            Ok(Forked::Child) => child(me, flags, fds, &python),
            Ok(Forked::Parent(pid)) => {
                // SAFETY: as for before_fork; this is its parent-side pair.
                unsafe { (python.after_fork_parent)() };
                drop(fds);
                // The child cannot have been reaped yet (only this thread
                // reaps), so the pid still names it.
                match sys::pidfd_open(pid) {
                    Ok(pidfd) => {
                        sys::send_with_fds(REQUEST_FD, &pid.to_le_bytes(), &[pidfd.as_raw_fd()])
                            .map_err(|_| ())?;
                    }
                    Err(_) => {
                        let _ = sys::kill(pid, libc::SIGKILL);
                        reply(&[0; 4])?;
                    }
                }
            }
            Err(_) => {
                // SAFETY: as above.
                unsafe { (python.after_fork_parent)() };
                reply(&[0; 4])?;
            }
        }
    }
}

/// In the forked child: put the received descriptors where a freshly
/// exec'd init has them, then run stage 1 exactly as init does.
fn child(zygote: i32, flags: u8, fds: Vec<OwnedFd>, python: &Python) -> ! {
    // A freshly exec'd init starts with default signal dispositions apart
    // from SIGPIPE (ignored by the Rust runtime); python's handlers must not
    // stay installed in init.
    if sys::reset_signals().is_err() {
        sys::exit_now(1);
    }
    // SAFETY: SIG_IGN for a valid signal number.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let mut targets = vec![0, 1, 2, CONTROL_FD];
    if flags & FLAG_BROKER != 0 {
        targets.push(BROKER_FD);
    }
    if flags & FLAG_EGRESS != 0 {
        targets.push(EGRESS_FD);
    }
    // Park every received descriptor above the targets first, so placing
    // one cannot overwrite another that still has to be placed.
    let mut parked = Vec::with_capacity(fds.len());
    for fd in &fds {
        match sys::dup_above(fd.as_raw_fd(), 64) {
            Ok(p) => parked.push(p),
            Err(_) => sys::exit_now(1),
        }
    }
    // The originals are closed before placing (one may sit at a target).
    drop(fds);
    for (p, t) in parked.iter().zip(&targets) {
        if sys::dup2(*p, *t).is_err() {
            sys::exit_now(1);
        }
    }
    // Everything above the highest target goes: the parked copies and the
    // zygote's own descriptors (its request socket was at 3, now replaced).
    let _ = sys::close_from(EGRESS_FD as u32 + 1);
    let code =
        crate::init::stage1_from(zygote, crate::launch::Launch::Inherited(python)).unwrap_or(1);
    sys::exit_now(code)
}

// ---------------------------------------------------------------------------
// Host side.

/// A running zygote, owned by the engine side (a warm pool). Dropping it
/// closes its request socket: the zygote then exits once every sandbox it
/// forked has ended (they die with it), and is reaped by a later
/// [`crate::engine::Engine::start_zygote`].
#[derive(Debug)]
pub struct Zygote {
    child: Option<std::process::Child>,
    sock: OwnedFd,
    lock: std::sync::Mutex<()>,
    pub(crate) policy: airlock_policy::Policy,
    pub(crate) extras: Extras,
    version: String,
    forks: std::sync::atomic::AtomicU64,
}

fn zerr(what: &str) -> crate::SandboxError {
    crate::SandboxError::Zygote(what.to_string())
}

/// The shared libpython and version of a python interpreter, asked from
/// the interpreter itself.
pub fn libpython_of(interpreter: &str) -> Result<(String, String), crate::SandboxError> {
    let out = std::process::Command::new(interpreter)
        .args([
            "-I",
            "-c",
            "import sys, sysconfig as s\n\
             print(sys.version.split()[0])\n\
             print(s.get_config_var('LIBDIR') or '')\n\
             print(s.get_config_var('INSTSONAME') or '')",
        ])
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .map_err(|_| zerr("the python interpreter could not be asked for its libpython"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let (version, dir, name) = (
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
    );
    let path = std::path::Path::new(dir).join(name);
    if !out.status.success()
        || version.is_empty()
        || !path.is_absolute()
        || name.is_empty()
        || name.contains('/')
        || !path.is_file()
    {
        return Err(zerr(
            "no shared libpython for the python interpreter (install libpython3.X)",
        ));
    }
    Ok((path.display().to_string(), version.to_string()))
}

/// What the engine hands [`start`]: the python runtime, the sealed image
/// to execute, the environment the platform adds, and the program shape.
pub(crate) struct Spawn<'a> {
    pub runtime: crate::runtime::Runtime,
    pub image: std::sync::Arc<OwnedFd>,
    pub platform_env: Vec<(String, String)>,
    pub policy: &'a airlock_policy::Policy,
    pub extras: &'a Extras,
}

/// Starts a python zygote (see [`crate::engine::Engine::start_zygote`]).
pub(crate) fn start(spawn: Spawn<'_>) -> Result<Zygote, crate::SandboxError> {
    use std::os::unix::process::CommandExt;
    let Spawn {
        runtime,
        image,
        platform_env,
        policy,
        extras,
    } = spawn;
    reap_retired();
    let entry = extras
        .entry
        .as_deref()
        .filter(|_| extras.broker && !extras.egress && extras.workspace.is_none())
        .ok_or_else(|| {
            zerr("a zygote serves a runner entry with a broker channel and no session workspace")
        })?;
    // The guest SDK: the extra files beside the entry.
    let (entry_dir, _) = entry.rsplit_once('/').ok_or_else(|| zerr("entry"))?;
    let guest_sources: std::collections::BTreeMap<String, String> = extras
        .files
        .iter()
        .filter_map(|(path, contents)| {
            let name = path.strip_prefix(entry_dir)?.strip_prefix('/')?;
            (!name.contains('/')).then(|| (name.to_string(), contents.to_string()))
        })
        .collect();
    for needed in ["airlock.py", "runner.py"] {
        if !guest_sources.contains_key(needed) {
            return Err(zerr("the entry's directory lacks the python guest SDK"));
        }
    }
    let (libpython, version) = libpython_of(&runtime.interpreter)?;
    let (argv, env) = crate::launch::program_argv_env(
        policy,
        &runtime,
        Some(entry),
        true,
        &extras
            .env
            .iter()
            .cloned()
            .chain(platform_env)
            .collect::<Vec<_>>(),
        crate::launch::code_dir(false),
        &format!("main.{}", runtime.extension),
    );
    let config = ZygoteConfig {
        libpython,
        executable: runtime.interpreter.clone(),
        guest_sources,
        guest_target: entry_dir.to_string(),
        engine_pid: std::process::id() as i32,
        argv,
        env: env.clone(),
        visible: runtime
            .mounts
            .iter()
            .map(|m| m.target.clone())
            .chain(policy.filesystem.read_only_paths.iter().cloned())
            .chain(std::iter::once(entry_dir.to_string()))
            .chain(runtime.symlinks.iter().map(|(p, _)| p.clone()))
            .collect(),
    };
    let (host, child_end) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| crate::SandboxError::SpawnInit(e.into()))?;
    let child_fd = child_end.as_raw_fd();
    // From the sealed in-memory image, named by a name: nothing a forked
    // program can read of itself (exe, maps, cmdline) names a host path.
    sys::make_execute_only(&image).map_err(crate::SandboxError::SpawnInit)?;
    let mut cmd = std::process::Command::new(format!("/proc/self/fd/{}", image.as_raw_fd()));
    cmd.arg0("airlock")
        .arg(ZYGOTE_ARG)
        .env_clear()
        .envs(env.iter().filter_map(|kv| kv.split_once('=')))
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and
    // only calls dup2/fcntl (async-signal-safe, no allocation) on
    // `child_fd`, which `child_end` keeps open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if child_fd == REQUEST_FD {
                sys::clear_cloexec(child_fd)
            } else {
                sys::dup2(child_fd, REQUEST_FD)
            }
        });
    }
    let child = cmd.spawn().map_err(crate::SandboxError::SpawnInit)?;
    drop(child_end);
    let mut z = Zygote {
        child: Some(child),
        sock: host,
        lock: std::sync::Mutex::new(()),
        policy: policy.clone(),
        extras: extras.clone(),
        version: String::new(),
        forks: std::sync::atomic::AtomicU64::new(0),
    };
    rustix::net::sockopt::set_socket_timeout(
        &z.sock,
        rustix::net::sockopt::Timeout::Recv,
        Some(std::time::Duration::from_secs(10)),
    )
    .map_err(|e| crate::SandboxError::SpawnInit(e.into()))?;
    let msg = serde_json::to_vec(&config).map_err(|_| zerr("config"))?;
    if msg.len() > MAX_CONFIG {
        return Err(zerr("configuration too large"));
    }
    sys::send_with_fds(z.sock.as_raw_fd(), &msg, &[]).map_err(|_| zerr("unreachable"))?;
    let mut buf = [0u8; 512];
    let (n, _) = sys::recv_with_fds(z.sock.as_raw_fd(), &mut buf, 0)
        .map_err(|_| zerr("no answer from the zygote"))?;
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    match answer.strip_prefix("ready ") {
        // The embedded interpreter must be the one a cold sandbox runs.
        Some(v) if v == version => {
            z.version = v.to_string();
            Ok(z)
        }
        Some(v) => Err(zerr(&format!(
            "libpython is python {v}, the interpreter is {version}"
        ))),
        None => Err(zerr(
            answer.strip_prefix("error ").unwrap_or("failed to start"),
        )),
    }
}

impl Zygote {
    /// The embedded python's version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Sandboxes forked so far.
    pub fn forks(&self) -> u64 {
        self.forks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the zygote still runs and answers.
    pub fn is_alive(&self) -> bool {
        match sys::poll(&[(self.sock.as_raw_fd(), libc::POLLIN)], 0) {
            Ok(r) => r[0] == 0,
            Err(_) => false,
        }
    }

    /// Forks one sandbox's stage 1 with these descriptors at 3, 4 and 5.
    pub(crate) fn fork(
        &self,
        ctrl: &std::os::unix::net::UnixStream,
        broker: Option<&std::os::unix::net::UnixStream>,
        egress: Option<&OwnedFd>,
    ) -> Result<Started, crate::SandboxError> {
        let (stdin_r, stdin_w) = sys::pipe().map_err(crate::SandboxError::SpawnInit)?;
        let (stdout_r, stdout_w) = sys::pipe().map_err(crate::SandboxError::SpawnInit)?;
        let (stderr_r, stderr_w) = sys::pipe().map_err(crate::SandboxError::SpawnInit)?;
        let mut fds = vec![
            stdin_r.as_raw_fd(),
            stdout_w.as_raw_fd(),
            stderr_w.as_raw_fd(),
            ctrl.as_raw_fd(),
        ];
        let mut flags = 0u8;
        if let Some(b) = broker {
            fds.push(b.as_raw_fd());
            flags |= FLAG_BROKER;
        }
        if let Some(e) = egress {
            fds.push(e.as_raw_fd());
            flags |= FLAG_EGRESS;
        }
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        sys::send_with_fds(self.sock.as_raw_fd(), &[b'S', flags], &fds)
            .map_err(|_| zerr("the zygote is gone"))?;
        let mut buf = [0u8; 8];
        let (n, mut got) = sys::recv_with_fds(self.sock.as_raw_fd(), &mut buf, 1)
            .map_err(|_| zerr("the zygote did not answer"))?;
        let pid = i32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if n != 4 || pid <= 0 || got.len() != 1 {
            return Err(zerr("the zygote could not fork"));
        }
        self.forks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pidfd = got.remove(0);
        Ok(Started {
            init: InitProc::Forked(pidfd),
            stdin: Some(std::fs::File::from(stdin_w)),
            stdout: Some(std::fs::File::from(stdout_r)),
            stderr: Some(std::fs::File::from(stderr_r)),
            pid,
        })
    }
}

/// Zygotes that were dropped while sandboxes they forked still ran.
static RETIRED: std::sync::Mutex<Vec<std::process::Child>> = std::sync::Mutex::new(Vec::new());

fn reap_retired() {
    RETIRED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_)) | Err(_)));
}

impl Drop for Zygote {
    fn drop(&mut self) {
        // Closing the request socket (a field, dropped after this) retires
        // the zygote; it is reaped once it has exited.
        if let Some(mut c) = self.child.take()
            && let Ok(None) = c.try_wait()
        {
            RETIRED.lock().unwrap_or_else(|p| p.into_inner()).push(c);
        }
    }
}
