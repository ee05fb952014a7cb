//! Sessions: a tenant's workspace that outlives its executions.
//!
//! A session is a private `/workspace` in which a tenant runs code many
//! times. Every execution in it still gets a fresh sandbox of the
//! session's backend and policy, never reused; what persists between them
//! is the workspace alone. The workspace is a file system of its own (a
//! tmpfs capped in bytes and inodes, `nosuid,nodev`), mounted by the
//! server under `<run_dir>/sessions/<data-dir token>-<session id>`:
//! - its quota is the kernel's (ENOSPC), for code and uploads alike;
//! - nothing in it can be a hard link to a host file (another file
//!   system), a set-uid program or a device;
//! - the files API works on it through `pathrs` (openat2
//!   `RESOLVE_IN_ROOT`) from a descriptor opened when it was made, with
//!   the file-system ids of the sandbox's user, so `..`, symlinks planted
//!   by the code and races against them cannot leave it, and the server
//!   can do there only what the code could.
//!
//! Must never: let a session be reached by another tenant (every lookup
//! names the tenant); keep a workspace after its session ended (the last
//! execution still running in it holds the mount, detached); follow a
//! path out of a workspace.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use airlock_backend::CancelToken;

/// Why a workspace or one of its files could not be used. The messages
/// are tenant-safe: they name the path the tenant gave, never a host
/// path.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The path is not one a workspace can hold (empty, `..`, NUL, too
    /// long, not UTF-8).
    #[error("invalid path: {0}")]
    InvalidPath(&'static str),
    /// Nothing there.
    #[error("no such file or directory")]
    NotFound,
    /// A directory where a file was asked for, or the reverse, or a FIFO,
    /// socket or device (never opened: a FIFO would block the server).
    #[error("{0}")]
    WrongType(&'static str),
    /// The workspace's byte or file quota is reached; nothing was changed.
    #[error("the workspace is full (its quota is {mib} MiB and {files} files)")]
    Full {
        /// Byte quota, MiB.
        mib: u64,
        /// File quota.
        files: u64,
    },
    /// The file is larger than the server hands out in one response.
    #[error("the file is larger than {0} bytes")]
    TooLarge(u64),
    /// The sandbox's user may not do this (a file the code made read-only).
    #[error("permission denied")]
    Denied,
    /// A directory that is not empty.
    #[error("the directory is not empty")]
    NotEmpty,
    /// The file is in use in a way that refuses this now (a lease, a
    /// rename racing the resolution); retrying may succeed.
    #[error("the file is busy; retry")]
    Busy,
    /// Anything else: logged, never shown.
    #[error("internal error")]
    Internal(String),
}

/// One entry of a directory listing, or a stat.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FileInfo {
    /// Its name (the last component; `""` for the workspace itself).
    pub name: String,
    /// `file`, `directory`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Last modification, Unix ms.
    pub modified_ms: i64,
}

/// The largest number of entries a listing returns.
pub const MAX_LIST: usize = 10_000;

/// The most entries a walk of a workspace visits.
pub const MAX_WALK: usize = 100_000;

/// The deepest directory a walk enters.
pub const MAX_DEPTH: usize = 64;

/// One entry a walk visits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalkEntry {
    /// Relative to the workspace, `/`-separated.
    pub path: String,
    /// `file`, `directory`, `symlink` or `other`.
    pub kind: &'static str,
    /// Bytes (0 for a directory).
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// A symlink's target (when it is UTF-8).
    pub target: Option<String>,
}

/// What a walk calls for each entry: for a regular file, with its
/// contents open for reading.
pub type Visit<'a> = dyn FnMut(&WalkEntry, Option<&mut std::fs::File>) -> Result<(), FsError> + 'a;

/// What a walk saw besides its entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalkSummary {
    /// Entries visited.
    pub entries: usize,
    /// A limit ([`MAX_WALK`], [`MAX_DEPTH`], [`MAX_LIST`] a directory)
    /// stopped it before it saw everything.
    pub truncated: bool,
    /// Names skipped because they are not UTF-8.
    pub skipped: usize,
    /// Regular files listed whose contents the sandbox user may not read.
    pub unreadable: usize,
}

/// A session's workspace, mounted; unmounted (detached) and its mount
/// point removed when the last holder drops it.
#[derive(Debug)]
pub struct Workspace {
    /// Session id.
    pub id: String,
    /// Owning tenant.
    pub tenant_id: String,
    /// The mount point (host path; never shown to tenants).
    pub path: PathBuf,
    /// `O_PATH` descriptor of the workspace's root, opened right after the
    /// mount: every file operation starts from it.
    root: OwnedFd,
    /// The sandbox user's host ids: file operations run with them.
    owner: (u32, u32),
    /// Quotas (for messages).
    mib: u64,
    files: u64,
    /// Idle timeout and the end of its lifetime.
    idle: Duration,
    expires: Instant,
    state: Mutex<State>,
    ended: AtomicBool,
    /// What its mount counts against the server's limits, released when
    /// the mount goes (not when the session ends: an ended workspace still
    /// held by a request or an execution still holds memory).
    mounted: Arc<Mutex<Mounted>>,
    /// What reserves `owner` for this session alone when its backend gave
    /// it ids of its own; released after the unmount (fields drop after
    /// [`Drop::drop`]).
    _hold: Option<Box<dyn std::fmt::Debug + Send + Sync>>,
}

/// Workspaces mounted now: in all, per tenant, and their quotas' MiB.
#[derive(Debug, Default)]
struct Mounted {
    total: usize,
    mib: u64,
    per_tenant: HashMap<String, usize>,
}

#[derive(Debug)]
struct State {
    /// Executions running in it (id, kill switch).
    running: HashMap<String, CancelToken>,
    /// When the last one ended (or the session was made).
    last_active: Instant,
}

impl Drop for Workspace {
    fn drop(&mut self) {
        detach(&self.path);
        if self.path.exists() {
            // Still mounted (busy beyond a lazy unmount's reach, which it
            // never should be): it keeps counting.
            tracing::error!(session = %self.id, "a workspace could not be unmounted");
            return;
        }
        let mut m = self.mounted.lock().unwrap_or_else(|p| p.into_inner());
        m.total = m.total.saturating_sub(1);
        m.mib = m.mib.saturating_sub(self.mib);
        if let Some(n) = m.per_tenant.get_mut(&self.tenant_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.per_tenant.remove(&self.tenant_id);
            }
        }
    }
}

impl Workspace {
    /// Whether the session ended (no execution may start in it).
    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Its quota: MiB and files.
    pub fn quota(&self) -> (u64, u64) {
        (self.mib, self.files)
    }

    /// How many executions run in it now.
    pub fn running(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .running
            .len()
    }

    /// Registers an execution about to run in it; false when the session
    /// ended meanwhile.
    pub fn begin(&self, execution: &str, cancel: CancelToken) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_ended() {
            return false;
        }
        s.running.insert(execution.to_string(), cancel);
        true
    }

    /// An execution in it ended: the idle clock restarts.
    pub fn end_execution(&self, execution: &str) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.running.remove(execution);
        s.last_active = Instant::now();
    }

    /// Why it should end now, if it should: `lifetime` past its maximum
    /// lifetime, `idle_timeout` when nothing ran in it for its idle time.
    fn due(&self, now: Instant) -> Option<&'static str> {
        if now >= self.expires {
            return Some("lifetime");
        }
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (s.running.is_empty() && now.duration_since(s.last_active) >= self.idle)
            .then_some("idle_timeout")
    }

    /// [`Workspace::close`] if it is due now, decided under the same lock
    /// `begin` takes.
    fn close_if_due(&self, now: Instant) -> Option<&'static str> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let why = if now >= self.expires {
            "lifetime"
        } else if s.running.is_empty() && now.duration_since(s.last_active) >= self.idle {
            "idle_timeout"
        } else {
            return None;
        };
        self.ended.store(true, Ordering::SeqCst);
        for c in s.running.values() {
            c.cancel(airlock_backend::TerminationReason::Cancelled);
        }
        Some(why)
    }

    /// Marks it ended and kills what runs in it.
    fn close(&self) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.ended.store(true, Ordering::SeqCst);
        for c in s.running.values() {
            c.cancel(airlock_backend::TerminationReason::Cancelled);
        }
    }

    fn root(&self) -> Result<pathrs::Root, FsError> {
        self.root
            .try_clone()
            .map(pathrs::Root::from_fd)
            .map_err(|e| FsError::Internal(format!("workspace root: {e}")))
    }

    fn full(&self) -> FsError {
        FsError::Full {
            mib: self.mib,
            files: self.files,
        }
    }

    /// Writes `bytes` to `path` (parents made as needed): to a new file
    /// beside it, renamed over it once whole, so a reader or the code sees
    /// the old contents or the new, and a full workspace leaves the old
    /// file as it was.
    pub fn write(&self, path: &str, bytes: &[u8], mode: u32) -> Result<(), FsError> {
        self.write_from(path, &mut &bytes[..], mode)
    }

    /// [`Workspace::write`] from a reader (a snapshot's blob restored).
    pub fn write_from(&self, path: &str, from: &mut dyn Read, mode: u32) -> Result<(), FsError> {
        let rel = checked(path)?;
        let (parent, name) = split(&rel)?;
        let _ids = AsOwner::enter(self.owner)?;
        let root = self.root()?;
        if !parent.as_os_str().is_empty() {
            root.mkdir_all(&parent, &std::fs::Permissions::from_mode(0o755))
                .map_err(|e| self.map(e))?;
        }
        let tmp = parent.join(format!(".airlock-upload-{}", unique()));
        let mut f = root
            .create_file(
                &tmp,
                pathrs::flags::OpenFlags::O_WRONLY
                    | pathrs::flags::OpenFlags::O_EXCL
                    | pathrs::flags::OpenFlags::O_CLOEXEC,
                &std::fs::Permissions::from_mode(mode & 0o777),
            )
            .map_err(|e| self.map(e))?;
        let written = std::io::copy(from, &mut f).and_then(|_| f.flush());
        drop(f);
        if let Err(e) = written {
            let _ = root.remove_file(&tmp);
            return Err(self.map_io(&e));
        }
        // renameat2 replaces the name: a symlink there is replaced, never
        // followed; a directory there is refused.
        match root.rename(&tmp, parent.join(name), pathrs::flags::RenameFlags::empty()) {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = root.remove_file(&tmp);
                Err(self.map(e))
            }
        }
    }

    /// Reads a regular file of at most `max` bytes. Symlinks, the last
    /// component's included, are followed within the workspace only (an
    /// absolute target is taken from the workspace's root).
    pub fn read(&self, path: &str, max: u64) -> Result<Vec<u8>, FsError> {
        let (mut f, len) = self.open_read(path, max)?;
        let mut out = Vec::with_capacity(len as usize);
        (&mut f)
            .take(max + 1)
            .read_to_end(&mut out)
            .map_err(|e| self.map_io(&e))?;
        if out.len() as u64 > max {
            return Err(FsError::TooLarge(max));
        }
        Ok(out)
    }

    /// A regular file of at most `max` bytes opened for reading, and its
    /// size (as [`Workspace::read`] resolves it; the caller streams it and
    /// must stop at `max`, the file may grow meanwhile).
    pub fn open_read(&self, path: &str, max: u64) -> Result<(std::fs::File, u64), FsError> {
        let rel = checked(path)?;
        let _ids = AsOwner::enter(self.owner)?;
        let root = self.root()?;
        // O_NONBLOCK: a FIFO planted by the code must not hang the open.
        let f = root
            .open_subpath(
                &rel,
                pathrs::flags::OpenFlags::O_RDONLY
                    | pathrs::flags::OpenFlags::O_NONBLOCK
                    | pathrs::flags::OpenFlags::O_CLOEXEC,
            )
            .map_err(|e| self.map(e))?;
        let meta = f.metadata().map_err(|e| self.map_io(&e))?;
        if !meta.file_type().is_file() {
            return Err(wrong_type(meta.mode()));
        }
        if meta.len() > max {
            return Err(FsError::TooLarge(max));
        }
        Ok((f, meta.len()))
    }

    /// Removes a file, a symlink (not its target) or an empty directory.
    pub fn remove(&self, path: &str) -> Result<(), FsError> {
        let rel = checked(path)?;
        let _ids = AsOwner::enter(self.owner)?;
        let root = self.root()?;
        let h = root.resolve_nofollow(&rel).map_err(|e| self.map(e))?;
        let meta = fd_meta(&h)?;
        drop(h);
        if file_type(meta.st_mode) == libc::S_IFDIR {
            root.remove_dir(&rel).map_err(|e| self.map(e))
        } else {
            root.remove_file(&rel).map_err(|e| self.map(e))
        }
    }

    /// What is at `path` (a symlink itself, not its target).
    pub fn stat(&self, path: &str) -> Result<FileInfo, FsError> {
        let _ids = AsOwner::enter(self.owner)?;
        let root = self.root()?;
        let rel = checked_or_root(path)?;
        let h = root.resolve_nofollow(&rel).map_err(|e| self.map(e))?;
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(info(name, &fd_meta(&h)?))
    }

    /// The entries of a directory (`""` or `/`: the workspace), sorted by
    /// name, at most [`MAX_LIST`]; true when there were more.
    pub fn list(&self, path: &str) -> Result<(Vec<FileInfo>, bool), FsError> {
        let _ids = AsOwner::enter(self.owner)?;
        let root = self.root()?;
        let rel = checked_or_root(path)?;
        let dir = root
            .open_subpath(
                &rel,
                pathrs::flags::OpenFlags::O_RDONLY
                    | pathrs::flags::OpenFlags::O_DIRECTORY
                    | pathrs::flags::OpenFlags::O_CLOEXEC,
            )
            .map_err(|e| self.map(e))?;
        let dir = pathrs::Root::from_fd(OwnedFd::from(dir));
        let mut names = read_names(&dir)?;
        names.sort();
        let more = names.len() > MAX_LIST;
        names.truncate(MAX_LIST);
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            // Each entry from the directory's own descriptor, never
            // followed: an entry that went away meanwhile is skipped.
            if let Ok(h) = dir.resolve_nofollow(&n)
                && let Ok(meta) = fd_meta(&h)
            {
                out.push(info(n, &meta));
            }
        }
        Ok((out, more))
    }

    /// Makes a directory (and its parents) of permission bits `mode`.
    pub fn mkdir(&self, path: &str, mode: u32) -> Result<(), FsError> {
        let rel = checked(path)?;
        let _ids = AsOwner::enter(self.owner)?;
        self.root()?
            .mkdir_all(&rel, &std::fs::Permissions::from_mode(mode & 0o777))
            .map(drop)
            .map_err(|e| self.map(e))
    }

    /// Makes a symlink at `path` to `target` (parents made as needed). The
    /// target is only text: every operation of the files API resolves it
    /// inside the workspace, and so does the sandbox, whose root is its own.
    pub fn symlink(&self, path: &str, target: &str) -> Result<(), FsError> {
        let rel = checked(path)?;
        if target.is_empty() || target.len() > MAX_PATH || target.contains('\0') {
            return Err(FsError::InvalidPath(
                "a symlink target of 1..=1024 bytes without NUL",
            ));
        }
        let (parent, _) = split(&rel)?;
        let _ids = AsOwner::enter(self.owner)?;
        let root = self.root()?;
        if !parent.as_os_str().is_empty() {
            root.mkdir_all(&parent, &std::fs::Permissions::from_mode(0o755))
                .map_err(|e| self.map(e))?;
        }
        root.create(&rel, &pathrs::InodeType::Symlink(PathBuf::from(target)))
            .map_err(|e| self.map(e))
    }

    /// Visits everything in the workspace, depth first in name order, at
    /// most [`MAX_WALK`] entries and [`MAX_DEPTH`] directories deep: each
    /// entry with, for a regular file, its contents open for reading. Every
    /// entry is resolved from its directory's descriptor without following
    /// it, and opened from that resolution (never by name again), so the
    /// code swapping a name for a symlink meanwhile changes nothing the
    /// walk reads but that entry. Names that are not UTF-8 are skipped
    /// (and counted). The workspace is reached with the sandbox user's
    /// ids; `visit` runs with the server's own (what it writes is the
    /// server's, e.g. a snapshot's blobs).
    pub fn walk(&self, visit: &mut Visit<'_>) -> Result<WalkSummary, FsError> {
        // Read through a descriptor opened for reading (the root's own is
        // O_PATH, which cannot list).
        let root = {
            let _ids = AsOwner::enter(self.owner)?;
            let d = self
                .root()?
                .open_subpath(
                    "/",
                    pathrs::flags::OpenFlags::O_RDONLY
                        | pathrs::flags::OpenFlags::O_DIRECTORY
                        | pathrs::flags::OpenFlags::O_CLOEXEC,
                )
                .map_err(|e| self.map(e))?;
            pathrs::Root::from_fd(OwnedFd::from(d))
        };
        let mut sum = WalkSummary::default();
        self.walk_dir(&root, "", 0, visit, &mut sum)?;
        Ok(sum)
    }

    fn walk_dir(
        &self,
        dir: &pathrs::Root,
        prefix: &str,
        depth: usize,
        visit: &mut Visit<'_>,
        sum: &mut WalkSummary,
    ) -> Result<(), FsError> {
        let mut names = Vec::new();
        let raw_names = {
            let _ids = AsOwner::enter(self.owner)?;
            read_raw_names(dir)?
        };
        for raw in raw_names {
            match String::from_utf8(raw) {
                Ok(n) => names.push(n),
                Err(_) => sum.skipped += 1,
            }
        }
        if names.len() > MAX_LIST {
            sum.truncated = true;
            names.truncate(MAX_LIST);
        }
        names.sort();
        for name in names {
            if sum.entries >= MAX_WALK {
                sum.truncated = true;
                return Ok(());
            }
            let ids = AsOwner::enter(self.owner)?;
            // Gone meanwhile: not part of what the walk saw.
            let Ok(h) = dir.resolve_nofollow(&name) else {
                continue;
            };
            let Ok(meta) = fd_meta(&h) else { continue };
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            let fi = info(name.clone(), &meta);
            let mut entry = WalkEntry {
                path,
                kind: fi.kind,
                size: fi.size,
                mode: fi.mode,
                target: None,
            };
            sum.entries += 1;
            match file_type(meta.st_mode) {
                libc::S_IFREG => {
                    let f = h.reopen(
                        pathrs::flags::OpenFlags::O_RDONLY
                            | pathrs::flags::OpenFlags::O_NONBLOCK
                            | pathrs::flags::OpenFlags::O_CLOEXEC,
                    );
                    drop(ids);
                    match f {
                        Ok(mut f) => visit(&entry, Some(&mut f))?,
                        // A file the code made unreadable: listed, its
                        // contents not kept.
                        Err(_) => {
                            sum.unreadable += 1;
                            visit(&entry, None)?;
                        }
                    }
                }
                libc::S_IFDIR => {
                    entry.size = 0;
                    let d = h
                        .reopen(
                            pathrs::flags::OpenFlags::O_RDONLY
                                | pathrs::flags::OpenFlags::O_DIRECTORY
                                | pathrs::flags::OpenFlags::O_CLOEXEC,
                        )
                        .map_err(|e| self.map(e));
                    drop(ids);
                    visit(&entry, None)?;
                    if depth + 1 >= MAX_DEPTH {
                        sum.truncated = true;
                        continue;
                    }
                    // A directory the code made unreadable is listed, not
                    // entered.
                    let Ok(d) = d else {
                        sum.truncated = true;
                        continue;
                    };
                    let sub = pathrs::Root::from_fd(OwnedFd::from(d));
                    self.walk_dir(&sub, &entry.path, depth + 1, visit, sum)?;
                }
                libc::S_IFLNK => {
                    entry.target = dir
                        .readlink(&name)
                        .ok()
                        .and_then(|t| t.to_str().map(str::to_string));
                    drop(ids);
                    visit(&entry, None)?;
                }
                _ => {
                    drop(ids);
                    visit(&entry, None)?;
                }
            }
        }
        Ok(())
    }

    /// Bytes and files in use (from the file system's own counters).
    pub fn usage(&self) -> Result<(u64, u64), FsError> {
        let st = rustix::fs::fstatvfs(&self.root).map_err(|e| FsError::Internal(e.to_string()))?;
        let used_bytes = (st.f_blocks - st.f_bfree) * st.f_frsize;
        // The root directory is one of the inodes.
        let used_files = (st.f_files - st.f_ffree).saturating_sub(1);
        Ok((used_bytes, used_files))
    }

    fn map(&self, e: pathrs::error::Error) -> FsError {
        match e.kind() {
            pathrs::error::ErrorKind::OsError(Some(n)) => self.map_errno(n),
            pathrs::error::ErrorKind::SafetyViolation => {
                FsError::InvalidPath("it leaves the workspace")
            }
            _ => FsError::Internal(e.to_string()),
        }
    }

    fn map_io(&self, e: &std::io::Error) -> FsError {
        match e.raw_os_error() {
            Some(n) => self.map_errno(n),
            None => FsError::Internal(e.to_string()),
        }
    }

    fn map_errno(&self, n: i32) -> FsError {
        match n {
            libc::ENOENT => FsError::NotFound,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => self.full(),
            libc::EACCES | libc::EPERM | libc::EROFS => FsError::Denied,
            libc::ENOTDIR => FsError::WrongType("a part of the path is not a directory"),
            libc::EISDIR => FsError::WrongType("it is a directory"),
            libc::ELOOP => FsError::WrongType("it is a symlink"),
            libc::ENOTEMPTY | libc::EEXIST => FsError::NotEmpty,
            libc::ENAMETOOLONG => FsError::InvalidPath("a name is too long"),
            libc::EXDEV => FsError::InvalidPath("it leaves the workspace"),
            libc::ENXIO => FsError::WrongType("it is a socket, not a regular file"),
            // ECANCELED: the server stopped an upload itself.
            libc::EAGAIN | libc::EBUSY | libc::ETXTBSY | libc::ECANCELED => FsError::Busy,
            other => FsError::Internal(format!("errno {other}")),
        }
    }
}

fn fd_meta(h: &pathrs::Handle) -> Result<rustix::fs::Stat, FsError> {
    // fstat on the O_PATH descriptor itself: the inode resolved, not a
    // path that could be swapped meanwhile.
    rustix::fs::fstat(h.as_fd()).map_err(|e| FsError::Internal(e.to_string()))
}

fn file_type(mode: u32) -> u32 {
    mode & libc::S_IFMT
}

fn read_names(dir: &pathrs::Root) -> Result<Vec<String>, FsError> {
    Ok(read_raw_names(dir)?
        .into_iter()
        .map(|n| String::from_utf8_lossy(&n).into_owned())
        .collect())
}

/// A directory's names (at most [`MAX_LIST`] + 1), as the file system
/// holds them.
fn read_raw_names(dir: &pathrs::Root) -> Result<Vec<Vec<u8>>, FsError> {
    let fd = dir
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| FsError::Internal(e.to_string()))?;
    let mut d = rustix::fs::Dir::read_from(fd).map_err(|e| FsError::Internal(e.to_string()))?;
    let mut names = Vec::new();
    while let Some(ent) = d.read() {
        let ent = ent.map_err(|e| FsError::Internal(e.to_string()))?;
        let n = ent.file_name().to_bytes();
        if n == b"." || n == b".." {
            continue;
        }
        names.push(n.to_vec());
        if names.len() > MAX_LIST {
            break;
        }
    }
    Ok(names)
}

fn wrong_type(mode: u32) -> FsError {
    FsError::WrongType(match file_type(mode) {
        libc::S_IFDIR => "it is a directory",
        libc::S_IFIFO => "it is a FIFO, not a regular file",
        libc::S_IFSOCK => "it is a socket, not a regular file",
        libc::S_IFBLK | libc::S_IFCHR => "it is a device node, not a regular file",
        libc::S_IFLNK => "it is a symlink",
        _ => "it is not a regular file",
    })
}

fn info(name: String, st: &rustix::fs::Stat) -> FileInfo {
    FileInfo {
        name,
        kind: match file_type(st.st_mode) {
            libc::S_IFREG => "file",
            libc::S_IFDIR => "directory",
            libc::S_IFLNK => "symlink",
            _ => "other",
        },
        size: u64::try_from(st.st_size).unwrap_or(0),
        mode: st.st_mode & 0o7777,
        modified_ms: st.st_mtime * 1000 + i64::try_from(st.st_mtime_nsec / 1_000_000).unwrap_or(0),
    }
}

/// The longest path a request may name, bytes.
pub const MAX_PATH: usize = 1024;

/// A tenant's path as one relative to the workspace: components of at
/// most 255 bytes, no `..` (refused, not clamped: a client that sends one
/// has a bug or an intent), no NUL, `.` and empty components dropped.
fn checked(path: &str) -> Result<PathBuf, FsError> {
    let out = normalized(path)?;
    if out.as_os_str().is_empty() {
        return Err(FsError::InvalidPath("it names the workspace itself"));
    }
    Ok(out)
}

/// `path` relative to the workspace, `""` and `.` components dropped
/// (empty: the workspace itself); `..`, NUL and over-long paths or names
/// refused.
fn normalized(path: &str) -> Result<PathBuf, FsError> {
    if path.len() > MAX_PATH {
        return Err(FsError::InvalidPath("longer than 1024 bytes"));
    }
    if path.contains('\0') {
        return Err(FsError::InvalidPath("it contains NUL"));
    }
    let mut out = PathBuf::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(FsError::InvalidPath("`..` is not allowed")),
            c if c.len() > 255 => return Err(FsError::InvalidPath("a name is too long")),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// [`checked`], where a path of no name (`""`, `/`, `.`) is the workspace
/// itself.
fn checked_or_root(path: &str) -> Result<PathBuf, FsError> {
    let out = normalized(path)?;
    if out.as_os_str().is_empty() {
        Ok(PathBuf::from("/"))
    } else {
        Ok(out)
    }
}

fn split(rel: &Path) -> Result<(PathBuf, &std::ffi::OsStr), FsError> {
    let name = rel
        .file_name()
        .ok_or(FsError::InvalidPath("it names no file"))?;
    if name.as_bytes().starts_with(b".airlock-upload-") {
        return Err(FsError::InvalidPath(
            "names starting .airlock-upload- are reserved",
        ));
    }
    Ok((
        rel.parent().map(Path::to_path_buf).unwrap_or_default(),
        name,
    ))
}

fn unique() -> String {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    use std::hash::{BuildHasher, Hasher};
    // Unpredictable to the code (which could plant a name it guessed and
    // make the upload fail): the standard library's per-process random
    // hash keys, over a counter.
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    format!("{n}-{:016x}", h.finish())
}

/// This thread's file-system ids become the sandbox user's for as long as
/// it lives: the server reaches a workspace with exactly the access the
/// code has (the kernel drops the file capabilities of an fsuid that is
/// not 0), and what it creates belongs to the code's user.
struct AsOwner {
    /// The ids restored on drop (the server's own).
    ids: (u32, u32),
}

impl AsOwner {
    fn enter(ids: (u32, u32)) -> Result<Self, FsError> {
        // setfsuid/setfsgid act on the calling thread only and report the
        // previous id, not errors: the new ids are read back to check.
        // SAFETY: plain syscalls on this thread's credentials; no memory.
        unsafe {
            libc::setfsgid(ids.1);
            libc::setfsuid(ids.0);
        }
        // SAFETY: as above; -1 (u32::MAX) changes nothing and returns the
        // current id.
        let (u, g) = unsafe { (libc::setfsuid(u32::MAX), libc::setfsgid(u32::MAX)) };
        // From here on dropped (ids back to root's) on every path.
        let guard = AsOwner { ids: (0, 0) };
        if (u as u32, g as u32) != ids {
            return Err(FsError::Internal(format!(
                "file-system ids {u}/{g} instead of {}/{}",
                ids.0, ids.1
            )));
        }
        Ok(guard)
    }
}

impl Drop for AsOwner {
    fn drop(&mut self) {
        // Back to the server's own (root's) before the thread does
        // anything else.
        // SAFETY: as in `enter`.
        let (u, g) = unsafe {
            libc::setfsuid(self.ids.0);
            libc::setfsgid(self.ids.1);
            (libc::setfsuid(u32::MAX), libc::setfsgid(u32::MAX))
        };
        // A thread left with the sandbox user's ids would do the server's
        // next work as that user: never go on.
        if (u as u32, g as u32) != self.ids {
            std::process::abort();
        }
    }
}

/// Why a session could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// This server cannot make workspaces (it does not run as root).
    #[error("sessions need the server to run as root (each workspace is a file system of its own)")]
    Unavailable,
    /// The tenant holds as many open sessions as it may.
    #[error("this tenant already holds {0} open sessions, its maximum; end one first")]
    TenantFull(usize),
    /// The server holds as many workspaces (or as much of their memory)
    /// as it may. The message says nothing of how many: that would tell a
    /// tenant about the others.
    #[error("this server holds as many sessions as it may; retry later")]
    ServerFull,
    /// The host refused the mount or the directory.
    #[error("the workspace could not be made")]
    Host(String),
}

/// Unmounts a workspace, detached (a sandbox still holding its bind while
/// it is torn down keeps the file system until it is gone), and removes
/// its mount point. Never follows a symlink at the path.
fn detach(path: &Path) {
    let _ = rustix::mount::unmount(
        path,
        rustix::mount::UnmountFlags::DETACH | rustix::mount::UnmountFlags::NOFOLLOW,
    );
    let _ = std::fs::remove_dir(path);
}

/// The sessions this server holds, by id.
#[derive(Debug)]
pub struct Sessions {
    base: PathBuf,
    owner: (u32, u32),
    /// Workspaces one tenant, and all tenants, may have mounted, and the
    /// MiB all their quotas may add up to.
    max: (usize, usize, u64),
    /// The prefix of this server's mount points (`<instance>-<id>`).
    instance: String,
    live: Mutex<HashMap<String, Arc<Workspace>>>,
    mounted: Arc<Mutex<Mounted>>,
}

impl Sessions {
    /// Workspaces under `<run_dir>/sessions` for a sandbox user of host ids
    /// `owner`; [`SessionError::Unavailable`] when this process cannot
    /// mount (not root).
    pub fn new(run_dir: &Path, owner: (u32, u32)) -> Result<Self, SessionError> {
        if rustix::process::geteuid().as_raw() != 0 {
            return Err(SessionError::Unavailable);
        }
        let base = run_dir.join("sessions");
        // Traversable by the sandbox's mapped ids (init binds the
        // workspace from inside its user namespace), not listable.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&base)
            .map_err(|e| SessionError::Host(format!("{}: {e}", base.display())))?;
        let mut p = Some(base.as_path());
        while let Some(d) = p {
            let mode = std::fs::metadata(d)
                .map_err(|e| SessionError::Host(format!("{}: {e}", d.display())))?
                .permissions()
                .mode();
            if mode & 0o111 != 0o111 {
                return Err(SessionError::Host(format!(
                    "{} must be traversable (mode o+x) for sandboxes' mapped users",
                    d.display()
                )));
            }
            p = d.parent();
        }
        Ok(Sessions {
            base,
            owner,
            max: (usize::MAX, usize::MAX, u64::MAX),
            instance: std::process::id().to_string(),
            live: Mutex::new(HashMap::new()),
            mounted: Arc::new(Mutex::new(Mounted::default())),
        })
    }

    /// Names this server's mount points `<instance>-<id>` (default: its
    /// pid). A server gives the token of its data directory, which only
    /// one server at a time may hold: what [`Sessions::reap_stale`] finds
    /// under it was left by an earlier run of the same server, never by
    /// another one.
    pub fn with_instance(mut self, instance: &str) -> Self {
        self.instance = instance
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        self
    }

    /// At most `per_tenant` mounted workspaces per tenant, `total` in all,
    /// and `total_mib` of quota in all (each a tmpfs: memory):
    /// [`Sessions::create`] refuses more ([`SessionError::TenantFull`],
    /// [`SessionError::ServerFull`])
    /// (each workspace holds host memory, up to its quota).
    pub fn with_limits(mut self, per_tenant: usize, total: usize, total_mib: u64) -> Self {
        self.max = (per_tenant, total, total_mib);
        self
    }

    /// Unmounts and removes what an earlier run of this server left (its
    /// mount points carry this server's instance token, see
    /// [`Sessions::with_instance`]); returns how many. Another server's
    /// workspaces, live or not, are never touched.
    pub fn reap_stale(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.base) else {
            return 0;
        };
        let prefix = format!("{}-", self.instance);
        let live: Vec<PathBuf> = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|w| w.path.clone())
            .collect();
        let mut n = 0;
        for e in entries.flatten() {
            let path = e.path();
            let ours = e
                .file_name()
                .to_str()
                .is_some_and(|s| s.starts_with(&prefix));
            if ours && !live.contains(&path) {
                detach(&path);
                if !path.exists() {
                    n += 1;
                }
            }
        }
        n
    }

    /// Makes and mounts a session's workspace, owned by the sandbox user's
    /// ids or by the ones its backend gave it (`owner`).
    pub fn create(
        &self,
        id: &str,
        tenant_id: &str,
        (mib, files): (u64, u64),
        idle: Duration,
        lifetime: Duration,
        owner: Option<airlock_backend::SessionOwner>,
    ) -> Result<Arc<Workspace>, SessionError> {
        let (ids, hold) = match owner {
            Some(o) => (o.ids, Some(o.hold)),
            None => (self.owner, None),
        };
        // Held until the new session is in the map: two creations at once
        // cannot both take the last place.
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        // Counted by what is mounted, not by what is open: an ended
        // session's workspace still held by a request or an execution
        // still holds memory.
        let mut mounted = self.mounted.lock().unwrap_or_else(|p| p.into_inner());
        let (per_tenant, total, total_mib) = self.max;
        if mounted.total >= total || mounted.mib.saturating_add(mib) > total_mib {
            return Err(SessionError::ServerFull);
        }
        if mounted.per_tenant.get(tenant_id).copied().unwrap_or(0) >= per_tenant {
            return Err(SessionError::TenantFull(per_tenant));
        }
        let host = |what: &str, e: std::io::Error| SessionError::Host(format!("{what}: {e}"));
        let path = self.base.join(format!("{}-{id}", self.instance));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| host("mount point", e))?;
        let cleanup = |e| {
            let _ = std::fs::remove_dir(&path);
            e
        };
        let data = format!(
            "size={},nr_inodes={},mode=0700,uid={},gid={}",
            mib.saturating_mul(1 << 20),
            // The root directory is an inode too.
            files.saturating_add(1),
            ids.0,
            ids.1
        );
        rustix::mount::mount(
            "airlock-session",
            &path,
            "tmpfs",
            rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV,
            Some(
                CString::new(data)
                    .map_err(|e| cleanup(SessionError::Host(e.to_string())))?
                    .as_c_str(),
            ),
        )
        .map_err(|e| cleanup(host("mount", e.into())))?;
        let root = rustix::fs::open(
            &path,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        );
        let root = match root {
            Ok(fd) => fd,
            Err(e) => {
                detach(&path);
                return Err(SessionError::Host(format!("open: {e}")));
            }
        };
        let now = Instant::now();
        let ws = Arc::new(Workspace {
            id: id.to_string(),
            tenant_id: tenant_id.to_string(),
            path,
            root,
            owner: ids,
            mib,
            files,
            idle,
            expires: now + lifetime,
            state: Mutex::new(State {
                running: HashMap::new(),
                last_active: now,
            }),
            ended: AtomicBool::new(false),
            mounted: self.mounted.clone(),
            _hold: hold,
        });
        mounted.total += 1;
        mounted.mib = mounted.mib.saturating_add(mib);
        *mounted.per_tenant.entry(tenant_id.to_string()).or_insert(0) += 1;
        live.insert(id.to_string(), ws.clone());
        Ok(ws)
    }

    /// A tenant's live session.
    pub fn get(&self, tenant_id: &str, id: &str) -> Option<Arc<Workspace>> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .filter(|w| w.tenant_id == tenant_id)
            .cloned()
    }

    /// Whether a session is live here (any tenant's: for routing only).
    pub fn holds(&self, id: &str) -> bool {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
    }

    /// How many live sessions a tenant holds.
    pub fn count(&self, tenant_id: &str) -> usize {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|w| w.tenant_id == tenant_id)
            .count()
    }

    /// Ends a session: no execution starts in it any more, the running
    /// ones are killed, and its workspace goes once the last of them is
    /// gone. Returns it when it was live.
    pub fn end(&self, id: &str) -> Option<Arc<Workspace>> {
        let ws = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)?;
        ws.close();
        Some(ws)
    }

    /// Ends a session if it is still due (its lifetime over, or idle with
    /// nothing registered), checked again under its lock so an execution
    /// registered since [`Sessions::due`] keeps it. Returns why it ended.
    pub fn end_if_due(&self, id: &str) -> Option<&'static str> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let ws = live.get(id)?.clone();
        let why = ws.close_if_due(Instant::now())?;
        live.remove(id);
        Some(why)
    }

    /// The sessions due to end now, with why.
    pub fn due(&self) -> Vec<(String, &'static str)> {
        let now = Instant::now();
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(|w| w.due(now).map(|why| (w.id.clone(), why)))
            .collect()
    }

    /// Every live session's id.
    pub fn ids(&self) -> Vec<String> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_relative_and_never_climb() {
        assert_eq!(checked("a/b.txt").unwrap(), PathBuf::from("a/b.txt"));
        assert_eq!(checked("/a//./b").unwrap(), PathBuf::from("a/b"));
        assert!(matches!(
            checked("a/../../etc"),
            Err(FsError::InvalidPath(_))
        ));
        assert!(matches!(checked("a\0b"), Err(FsError::InvalidPath(_))));
        assert!(matches!(
            checked(&"x".repeat(256)),
            Err(FsError::InvalidPath(_))
        ));
        assert!(matches!(
            checked(&"a/".repeat(600)),
            Err(FsError::InvalidPath(_))
        ));
        assert!(matches!(checked("/"), Err(FsError::InvalidPath(_))));
        for root in ["", "/", ".", "./", "//./."] {
            assert_eq!(
                checked_or_root(root).unwrap(),
                PathBuf::from("/"),
                "{root:?}"
            );
        }
        assert!(matches!(
            checked_or_root(".."),
            Err(FsError::InvalidPath(_))
        ));
        assert!(matches!(
            split(Path::new("d/.airlock-upload-1")),
            Err(FsError::InvalidPath(_))
        ));
    }
}
