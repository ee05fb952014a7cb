//! Golden microVM snapshots: one per (language, policy, guest artifacts,
//! kernel, QEMU, accelerator), made by booting a VM through the ordinary
//! path until its runner waits for code, quiescing its channel and saving
//! the machine (memory in a file of its own, devices in a migration
//! stream). Every restore maps that memory copy-on-write (never read in,
//! never written back), loads the devices, gets fresh entropy and the
//! host's clock before anything else reaches it, and replays to its new
//! engine the golden guest's side of the exchange both had before the
//! code (after checking the engine's side is byte for byte the golden's).
//!
//! Nothing tenant-specific exists in a golden VM: it is made by the
//! backend itself, before any request, like a warm pool's sandbox.
//!
//! Store layout (under the microVM store): `snap/<key>/` with `mem` and
//! `state` (0440, group QEMU's: read by every restore's unprivileged
//! QEMU, written by none), `scratch` (0400: the scratch disk as the golden
//! guest has it mounted, copied for each restore by its monitor) and
//! `meta.json` (0600: the digests of the three and the transcript). What
//! a restore boots is checked against the digests first (the state file
//! every time, the memory file and the disk whenever their inode or times
//! changed); a snapshot that fails any check is removed and made again,
//! never restored.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use airlock_sandbox::sys;
use airlock_sandbox::vmchan::stream;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bumped when what a snapshot holds or how it is restored changes.
pub(crate) const FORMAT: u32 = 2;
/// Largest exchange recorded between an engine and a golden VM.
pub(crate) const MAX_TRANSCRIPT: usize = 1 << 20;
/// Why a replay stopped: the engine's side is not the golden engine's.
pub(crate) const NOT_THIS_SANDBOX: &str =
    "the engine's side differs from the snapshot's (made for another sandbox)";
/// Largest `meta.json` read.
const MAX_META: u64 = 8 << 20;

/// One piece of a golden VM's exchange with its engine, in order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Chunk {
    /// The channel stream ([`stream::CTRL`] or [`stream::BROKER`]).
    pub stream: u8,
    /// Sent by the engine to the guest (else the guest's).
    pub to_guest: bool,
    pub bytes: Vec<u8>,
}

/// What a VM's monitor does with snapshots.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(crate) enum SnapMode {
    /// Boot, run until the runner waits for its code, save the machine
    /// into `dir` (`mem`, `state`, `scratch`, `transcript.json`), end.
    Create { dir: PathBuf },
    /// Restore from `dir`, replaying `transcript` to the engine.
    Restore {
        dir: PathBuf,
        transcript: Vec<Chunk>,
        /// The golden guest's configuration (see `guest_view_digest`).
        guest_sha256: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    format: u32,
    key: String,
    mem_sha256: String,
    state_sha256: String,
    /// The scratch disk as the golden guest left it mounted.
    scratch_sha256: String,
    guest_sha256: String,
    transcript: Vec<Chunk>,
}

/// A golden snapshot checked against its digests.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    /// `sha256:<key>`: what shaped it, for results.
    pub id: String,
    pub dir: PathBuf,
    pub transcript: Vec<Chunk>,
    pub guest_sha256: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_file(p: &Path) -> std::io::Result<String> {
    let mut h = Sha256::new();
    std::io::copy(&mut fs::File::open(p)?, &mut h)?;
    Ok(hex(&h.finalize()))
}

/// Digests of memory files already checked, by what identifies their
/// bytes unchanged (device, inode, size, change and modification times).
type Seen = HashMap<(u64, u64), ((u64, i64, i64, i64, i64), String)>;

fn seen() -> &'static Mutex<Seen> {
    static SEEN: OnceLock<Mutex<Seen>> = OnceLock::new();
    SEEN.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The digest of a mostly sparse file (a scratch disk of up to the
/// policy's 64 GiB): its length, then each data extent's offset, length
/// and bytes; holes cost nothing to hash.
fn sparse_sha256(p: &Path) -> std::io::Result<String> {
    let f = fs::File::open(p)?;
    let len = f.metadata()?.len() as i64;
    let mut h = Sha256::new();
    h.update(b"sparse\0");
    h.update(len.to_le_bytes());
    let mut buf = vec![0u8; 1 << 20];
    for (data, end) in sys::data_extents(&f)? {
        h.update(data.to_le_bytes());
        h.update((end - data).to_le_bytes());
        let mut at = data;
        while at < end {
            let want = buf.len().min((end - at) as usize);
            let n = std::os::unix::fs::FileExt::read_at(&f, &mut buf[..want], at as u64)?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            h.update(&buf[..n]);
            at += n as i64;
        }
    }
    Ok(hex(&h.finalize()))
}

/// The digest of a (large) memory file: computed again only when the file
/// may have changed since it was last computed.
fn mem_digest(p: &Path) -> std::io::Result<String> {
    cached_digest(p, sha256_file)
}

/// [`mem_digest`] of a scratch disk, by [`sparse_sha256`].
fn disk_digest(p: &Path) -> std::io::Result<String> {
    cached_digest(p, sparse_sha256)
}

/// `digest(p)`, computed again only when the file may have changed since
/// it was last computed.
fn cached_digest(
    p: &Path,
    digest: fn(&Path) -> std::io::Result<String>,
) -> std::io::Result<String> {
    let m = fs::metadata(p)?;
    // By inode, not path: a snapshot moved into place keeps its digest.
    let file = (m.dev(), m.ino());
    let id = (
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    );
    if let Some((was, digest)) = seen().lock().unwrap_or_else(|e| e.into_inner()).get(&file)
        && *was == id
    {
        return Ok(digest.clone());
    }
    let digest = digest(p)?;
    seen()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(file, (id, digest.clone()));
    Ok(digest)
}

/// The snapshots of one store.
#[derive(Debug, Clone)]
pub(crate) struct Snapshots {
    dir: PathBuf,
    tmp: PathBuf,
}

impl Snapshots {
    /// `store/snap` (made 0755 like the rest of the store) and the store's
    /// `tmp` for snapshots being made.
    pub fn open(store: &Path) -> std::io::Result<Self> {
        let dir = store.join("snap");
        fs::DirBuilder::new()
            .mode(0o755)
            .recursive(true)
            .create(&dir)?;
        let m = fs::symlink_metadata(&dir)?;
        if !m.is_dir() || m.uid() != sys::geteuid() || m.mode() & 0o022 != 0 {
            return Err(std::io::Error::other(format!(
                "{} must be a directory owned by uid {} and writable by it only",
                dir.display(),
                sys::geteuid()
            )));
        }
        let tmp = store.join("tmp");
        // Snapshots left half made by a process that was killed: its pid is
        // gone, or the directory is older than an hour (far longer than
        // making one takes).
        for e in fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(3600));
            // (Also a scratch disk a monitor killed between making and
            // unlinking it left.)
            let maker_gone = name
                .strip_prefix("snap-")
                .or_else(|| name.strip_prefix("scratch-"))
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
                .is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists());
            let ours = ["snap-", "refused-", "scratch-"]
                .iter()
                .any(|p| name.starts_with(p));
            if maker_gone || (old && ours) {
                // A directory (a snapshot) or a file (a scratch disk).
                let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
            }
        }
        Ok(Snapshots { dir, tmp })
    }

    /// Golden snapshots in the store, by language (what `doctor` shows;
    /// each is checked when it is used).
    pub fn summary(&self) -> String {
        let mut by: std::collections::BTreeMap<String, usize> = Default::default();
        for e in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if e.path().join("meta.json").is_file() {
                let name = e.file_name().to_string_lossy().into_owned();
                let lang = name.split('-').next().unwrap_or("").to_string();
                *by.entry(lang).or_default() += 1;
            }
        }
        if by.is_empty() {
            return "no golden snapshot yet (a server's python pool makes one)".into();
        }
        let parts: Vec<String> = by.iter().map(|(l, n)| format!("{n} {l}")).collect();
        format!("golden snapshots: {}", parts.join(", "))
    }

    /// Holds the lock of `key` (an exclusive `flock` on `snap/<key>.lock`)
    /// until dropped: one process makes or removes a key's snapshot at a
    /// time. None when the lock file cannot be opened (then unlocked).
    pub fn lock(&self, key: &str) -> Option<fs::File> {
        let f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.dir.join(format!("{key}.lock")))
            .ok()?;
        // SAFETY: flock on a descriptor this function owns; it blocks until
        // the lock is held, which the file's lifetime then keeps.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        (r == 0).then_some(f)
    }

    /// Where the snapshot keyed `key` lives.
    pub fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// A directory for a snapshot being made, with its two files created
    /// empty and writable by `golden_gid` only: the golden VM's QEMU, whose
    /// group no other VM's QEMU has, maps the one and writes the other.
    pub fn begin(&self, golden_gid: u32) -> std::io::Result<PathBuf> {
        let mut rnd = [0u8; 8];
        sys::getrandom(&mut rnd)?;
        let d = self
            .tmp
            .join(format!("snap-{}-{}", std::process::id(), hex(&rnd)));
        fs::DirBuilder::new().mode(0o755).create(&d)?;
        for f in ["mem", "state"] {
            let file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(d.join(f))?;
            std::os::unix::fs::fchown(&file, Some(sys::geteuid()), Some(golden_gid))?;
            file.set_permissions(fs::Permissions::from_mode(0o660))?;
        }
        Ok(d)
    }

    /// Publishes what `made` holds as the snapshot keyed `key`: its files
    /// made read-only for everyone, their digests and the transcript the
    /// monitor wrote recorded in `meta.json`, the directory moved into
    /// place (replacing an older one).
    /// The golden VM's QEMU has ended; the files become readable by
    /// `qemu_gid` (every restore's QEMU) and writable by nobody.
    pub fn commit(&self, key: &str, made: &Path, qemu_gid: u32) -> Result<Snapshot, String> {
        let e = |what: &'static str| move |err: std::io::Error| format!("{what}: {err}");
        let mut text = Vec::new();
        fs::File::open(made.join("transcript.json"))
            .and_then(|f| f.take(MAX_TRANSCRIPT as u64 * 8).read_to_end(&mut text))
            .map_err(e("transcript"))?;
        let transcript: Vec<Chunk> =
            serde_json::from_slice(&text).map_err(|err| format!("transcript: {err}"))?;
        for f in ["mem", "state"] {
            let p = made.join(f);
            fs::set_permissions(&p, fs::Permissions::from_mode(0o440)).map_err(e("permissions"))?;
            std::os::unix::fs::chown(&p, Some(sys::geteuid()), Some(qemu_gid))
                .map_err(e("owner"))?;
        }
        // The scratch disk is read by monitors only (each restore gets a
        // copy of it).
        fs::set_permissions(made.join("scratch"), fs::Permissions::from_mode(0o400))
            .map_err(e("permissions"))?;
        let mut guest = String::new();
        fs::File::open(made.join("guest.sha256"))
            .and_then(|f| f.take(64).read_to_string(&mut guest))
            .map_err(e("guest"))?;
        let meta = Meta {
            format: FORMAT,
            key: key.to_string(),
            mem_sha256: mem_digest(&made.join("mem")).map_err(e("memory file"))?,
            state_sha256: sha256_file(&made.join("state")).map_err(e("state file"))?,
            scratch_sha256: disk_digest(&made.join("scratch")).map_err(e("scratch disk"))?,
            guest_sha256: guest,
            transcript,
        };
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(made.join("meta.json"))
            .map_err(e("meta"))?;
        f.write_all(&serde_json::to_vec(&meta).map_err(|err| err.to_string())?)
            .and_then(|_| f.sync_all())
            .map_err(e("meta"))?;
        let _ = fs::remove_file(made.join("transcript.json"));
        let _ = fs::remove_file(made.join("guest.sha256"));
        let dest = self.path(key);
        let _ = fs::remove_dir_all(&dest);
        fs::rename(made, &dest).map_err(e("publish"))?;
        Ok(Snapshot {
            id: format!("sha256:{}", key.rsplit('-').next().unwrap_or(key)),
            dir: dest,
            transcript: meta.transcript,
            guest_sha256: meta.guest_sha256,
        })
    }

    /// The snapshot keyed `key` when there is one that passes every check;
    /// `Err` names why one there is refused (the caller removes it).
    pub fn load(&self, key: &str) -> Result<Option<Snapshot>, String> {
        let dir = self.path(key);
        let meta_path = dir.join("meta.json");
        let mut text = Vec::new();
        match fs::File::open(&meta_path) {
            Ok(f) => {
                f.take(MAX_META)
                    .read_to_end(&mut text)
                    .map_err(|err| format!("meta.json: {err}"))?;
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(format!("meta.json: {err}")),
        }
        // Only what this module writes: a field added (a device, a mount,
        // another kernel) is a refusal, never an instruction.
        let meta: Meta =
            serde_json::from_slice(&text).map_err(|err| format!("meta.json: {err}"))?;
        if meta.format != FORMAT || meta.key != key {
            return Err("meta.json: made for another format or key".into());
        }
        let euid = sys::geteuid();
        for (f, want) in [
            ("mem", &meta.mem_sha256),
            ("state", &meta.state_sha256),
            ("scratch", &meta.scratch_sha256),
        ] {
            let p = dir.join(f);
            let m = fs::symlink_metadata(&p).map_err(|err| format!("{f}: {err}"))?;
            // Writable by nobody (QEMU's group reads it): no VM can change
            // what every later restore starts from.
            if !m.is_file() || m.uid() != euid || m.mode() & 0o222 != 0 {
                return Err(format!("{f}: not a read-only file of uid {euid}"));
            }
            let digest = match f {
                "mem" => mem_digest(&p),
                "scratch" => disk_digest(&p),
                _ => sha256_file(&p),
            }
            .map_err(|err| format!("{f}: {err}"))?;
            if &digest != want {
                return Err(format!("{f}: digest mismatch"));
            }
        }
        Ok(Some(Snapshot {
            id: format!("sha256:{}", key.rsplit('-').next().unwrap_or(key)),
            dir,
            transcript: meta.transcript,
            guest_sha256: meta.guest_sha256,
        }))
    }

    /// Removes every snapshot whose key's host part (its second field) is
    /// not `host`, each under its lock. Returns (snapshots, bytes on
    /// disk); only `dry_run` counts.
    pub fn prune(&self, host: &str, dry_run: bool) -> (usize, u64) {
        let (mut n, mut bytes) = (0, 0);
        for e in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !e.path().is_dir() || name.split('-').nth(1) == Some(host) {
                continue;
            }
            let size: u64 = fs::read_dir(e.path())
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|f| f.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum();
            n += 1;
            bytes += size;
            if !dry_run {
                // Under its lock (a maker of it finishes first). The lock
                // file stays: removed, a waiter would hold a lock on a
                // file a new maker no longer opens.
                let _lock = self.lock(&name);
                self.remove(&name);
            }
        }
        (n, bytes)
    }

    /// Removes a refused snapshot (renamed away first, so a restore
    /// starting meanwhile cannot see half of it).
    pub fn remove(&self, key: &str) {
        let mut rnd = [0u8; 8];
        let _ = sys::getrandom(&mut rnd);
        let away = self.tmp.join(format!("refused-{}", hex(&rnd)));
        if fs::rename(self.path(key), &away).is_ok() {
            let _ = fs::remove_dir_all(&away);
        }
    }
}

/// The transcript a golden monitor recorded, as chunks; only the control
/// stream both ways and the broker from the guest belong in it.
pub(crate) fn transcript(log: &[(u8, bool, Vec<u8>)]) -> Result<Vec<Chunk>, &'static str> {
    log.iter()
        .map(|(s, sent, b)| match (*s, *sent) {
            (stream::CTRL, _) | (stream::BROKER, false) => Ok(Chunk {
                stream: *s,
                to_guest: *sent,
                bytes: b.clone(),
            }),
            _ => Err("the engine wrote on the broker before the snapshot"),
        })
        .collect()
}

/// Whether the golden guest's runner has said its first broker frame (its
/// hello): it then waits for its code, and the machine may be saved.
pub(crate) fn runner_waits(log: &[(u8, bool, Vec<u8>)]) -> bool {
    let from_runner: Vec<u8> = log
        .iter()
        .filter(|(s, sent, _)| *s == stream::BROKER && !*sent)
        .flat_map(|(_, _, b)| b.iter().copied())
        .collect();
    from_runner.len() >= 4 && {
        let n = u32::from_le_bytes([
            from_runner[0],
            from_runner[1],
            from_runner[2],
            from_runner[3],
        ]);
        from_runner.len() >= 4 + n as usize
    }
}

/// Plays the golden guest's side of `transcript` to a restored VM's
/// engine: what the engine sends must be exactly what the golden engine
/// sent (else this is not the sandbox the snapshot was made for), what the
/// guest sent is sent again.
pub(crate) fn replay(
    transcript: &[Chunk],
    ctrl: &OwnedFd,
    broker: Option<&OwnedFd>,
    within: Duration,
) -> Result<(), String> {
    let end = Instant::now() + within;
    for c in transcript {
        match (c.stream, c.to_guest, broker) {
            (stream::CTRL, true, _) => {
                let mut got = vec![0u8; c.bytes.len()];
                read_exact(ctrl, &mut got, end)?;
                if got != c.bytes {
                    return Err(NOT_THIS_SANDBOX.into());
                }
            }
            (stream::CTRL, false, _) => write_all(ctrl, &c.bytes, end)?,
            (stream::BROKER, false, Some(b)) => write_all(b, &c.bytes, end)?,
            _ => return Err("the snapshot's transcript does not fit this sandbox".into()),
        }
    }
    Ok(())
}

fn wait_for(fd: &OwnedFd, events: i16, end: Instant) -> Result<(), String> {
    let left = end.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err("timed out".into());
    }
    let rev = sys::poll(
        &[(fd.as_raw_fd(), events)],
        left.as_millis().min(60_000) as i32,
    )
    .map_err(|e| e.to_string())?;
    if rev[0] & (libc::POLLERR | libc::POLLNVAL) != 0 {
        return Err("the channel failed".into());
    }
    Ok(())
}

/// Moves `len` bytes through `op` (given the offset so far), waiting on
/// `fd` for `events` between tries, until `end`.
fn move_all(
    fd: &OwnedFd,
    len: usize,
    events: i16,
    end: Instant,
    mut op: impl FnMut(usize) -> std::io::Result<usize>,
) -> Result<(), String> {
    let mut off = 0;
    while off < len {
        wait_for(fd, events, end)?;
        match op(off) {
            Ok(0) => return Err("the peer hung up".into()),
            Ok(n) => off += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

fn read_exact(fd: &OwnedFd, buf: &mut [u8], end: Instant) -> Result<(), String> {
    move_all(fd, buf.len(), libc::POLLIN, end, |off| {
        sys::read_fd(fd.as_raw_fd(), &mut buf[off..])
    })
}

fn write_all(fd: &OwnedFd, buf: &[u8], end: Instant) -> Result<(), String> {
    move_all(fd, buf.len(), libc::POLLOUT, end, |off| {
        sys::write_fd(fd.as_raw_fd(), &buf[off..])
    })
}

/// A minimal QMP client (QEMU's JSON control protocol) over a socket the
/// golden VM's QEMU was started with: enough to pause the VM and save it.
pub(crate) struct Qmp {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl Qmp {
    pub fn new(fd: OwnedFd) -> Self {
        Qmp {
            fd,
            buf: Vec::new(),
        }
    }

    /// Runs `cmd` and returns its `return` value (greeting and events
    /// skipped). QEMU's answers are bounded to 1 MiB a line.
    pub fn call(
        &mut self,
        cmd: &str,
        args: serde_json::Value,
        within: Duration,
    ) -> Result<serde_json::Value, String> {
        let end = Instant::now() + within;
        let mut line = serde_json::to_vec(&serde_json::json!({"execute": cmd, "arguments": args}))
            .map_err(|e| e.to_string())?;
        line.push(b'\n');
        write_all(&self.fd, &line, end).map_err(|e| format!("QMP {cmd}: {e}"))?;
        loop {
            let msg = self.line(end).map_err(|e| format!("QMP {cmd}: {e}"))?;
            if let Some(r) = msg.get("return") {
                return Ok(r.clone());
            }
            if let Some(err) = msg.get("error") {
                return Err(format!(
                    "QMP {cmd}: {}",
                    err.get("desc").and_then(|d| d.as_str()).unwrap_or("error")
                ));
            }
        }
    }

    fn line(&mut self, end: Instant) -> Result<serde_json::Value, String> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return serde_json::from_slice(&line).map_err(|e| e.to_string());
            }
            if self.buf.len() > 1 << 20 {
                return Err("answer too long".into());
            }
            wait_for(&self.fd, libc::POLLIN, end)?;
            let mut chunk = [0u8; 4096];
            match sys::read_fd(self.fd.as_raw_fd(), &mut chunk) {
                Ok(0) => return Err("QEMU closed its control socket".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Loads saved devices from `state` into a VM started with
    /// `-incoming defer` (its memory mapped from the snapshot's file),
    /// waiting until they are loaded and the VM runs. The socket is closed
    /// after (nobody would read QEMU's events on it).
    pub fn load(mut self, state: &Path) -> Result<(), String> {
        let t = Duration::from_secs(30);
        self.ignore_shared(t)?;
        self.call(
            "migrate-incoming",
            serde_json::json!({"uri": format!("file:{}", state.display())}),
            t,
        )?;
        let end = Instant::now() + Duration::from_secs(120);
        let mut continued = false;
        loop {
            let st = self.call("query-status", serde_json::json!({}), t)?;
            if st.get("running").and_then(|r| r.as_bool()) == Some(true) {
                return Ok(());
            }
            let mig = self.call("query-migrate", serde_json::json!({}), t)?;
            // The golden VM was paused when it was saved, so its restore
            // stays paused once loaded: it runs when told (once).
            if !continued && mig.get("status").and_then(|s| s.as_str()) == Some("completed") {
                self.call("cont", serde_json::json!({}), t)?;
                continued = true;
                continue;
            }
            if matches!(
                mig.get("status").and_then(|s| s.as_str()),
                Some("failed") | Some("cancelled")
            ) {
                return Err(format!(
                    "loading the VM failed: {}",
                    mig.get("error-desc").and_then(|d| d.as_str()).unwrap_or("")
                ));
            }
            if Instant::now() > end {
                return Err(format!(
                    "loading the VM timed out (VM {}, load {})",
                    st.get("status").and_then(|s| s.as_str()).unwrap_or("?"),
                    mig.get("status").and_then(|s| s.as_str()).unwrap_or("?")
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Opens the session and makes migration skip RAM in shared files (the
    /// memory file the snapshot keeps on its own).
    fn ignore_shared(&mut self, t: Duration) -> Result<(), String> {
        self.call("qmp_capabilities", serde_json::json!({}), t)?;
        self.call(
            "migrate-set-capabilities",
            serde_json::json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
            t,
        )
        .map(|_| ())
    }

    /// Pauses the VM and saves its devices to `state` (its memory is
    /// already in its shared file), waiting until the save completed.
    pub fn save(&mut self, state: &Path) -> Result<(), String> {
        let t = Duration::from_secs(30);
        self.ignore_shared(t)?;
        self.call("stop", serde_json::json!({}), t)?;
        self.call(
            "migrate",
            serde_json::json!({"uri": format!("file:{}", state.display())}),
            t,
        )?;
        let end = Instant::now() + Duration::from_secs(300);
        loop {
            let st = self.call("query-migrate", serde_json::json!({}), t)?;
            match st.get("status").and_then(|s| s.as_str()) {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    return Err(format!(
                        "saving the VM failed: {}",
                        st.get("error-desc").and_then(|d| d.as_str()).unwrap_or("")
                    ));
                }
                _ if Instant::now() > end => return Err("saving the VM timed out".into()),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Snapshot state of one pool template.
#[derive(Debug)]
pub(crate) enum Golden {
    Building,
    Ready(Arc<Snapshot>),
    /// It could not be made (logged), at this time: sandboxes boot.
    Failed(Instant),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot as a golden VM's monitor leaves it, committed.
    fn committed(store: &Path) -> (Snapshots, Snapshot) {
        // The microVM store makes its `tmp`.
        fs::create_dir(store.join("tmp")).unwrap();
        let snaps = Snapshots::open(store).unwrap();
        let made = snaps.begin(sys::getegid()).unwrap();
        fs::write(made.join("mem"), vec![7u8; 64 << 10]).unwrap();
        fs::write(made.join("state"), b"devices").unwrap();
        let scratch = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(made.join("scratch"))
            .unwrap();
        // Mostly a hole, as a fresh disk is.
        scratch.set_len(8 << 20).unwrap();
        std::os::unix::fs::FileExt::write_at(&scratch, b"superblock", 1024).unwrap();
        fs::write(made.join("transcript.json"), b"[]").unwrap();
        fs::write(made.join("guest.sha256"), "0".repeat(64)).unwrap();
        let snap = snaps.commit("python-k", &made, sys::getegid()).unwrap();
        (snaps, snap)
    }

    #[test]
    fn a_snapshot_whose_scratch_disk_changed_or_became_writable_is_refused() {
        let store = tempfile::tempdir().unwrap();
        let (snaps, snap) = committed(store.path());
        let disk = snap.dir.join("scratch");
        // Positive control: as committed it loads, its disk read-only for
        // everyone and readable by the monitor only.
        assert!(snaps.load("python-k").unwrap().is_some());
        assert_eq!(fs::metadata(&disk).unwrap().mode() & 0o777, 0o400);
        // One byte of the disk changed (its owner made it writable, wrote,
        // and made it read-only again): the digest no longer matches.
        fs::set_permissions(&disk, fs::Permissions::from_mode(0o600)).unwrap();
        let f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
        std::os::unix::fs::FileExt::write_at(&f, b"S", 1024).unwrap();
        drop(f);
        // Writable: refused as such, before any digest.
        assert_eq!(
            snaps.load("python-k").unwrap_err(),
            format!("scratch: not a read-only file of uid {}", sys::geteuid())
        );
        fs::set_permissions(&disk, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(
            snaps.load("python-k").unwrap_err(),
            "scratch: digest mismatch"
        );
    }

    #[test]
    fn a_restores_disk_is_a_byte_for_byte_copy_that_keeps_the_holes() {
        let store = tempfile::tempdir().unwrap();
        let (_snaps, snap) = committed(store.path());
        let src = fs::File::open(snap.dir.join("scratch")).unwrap();
        let to = store.path().join("copy");
        let dst = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&to)
            .unwrap();
        sys::copy_sparse(&src, &dst).unwrap();
        assert_eq!(
            fs::read(&to).unwrap(),
            fs::read(snap.dir.join("scratch")).unwrap()
        );
        // 8 MiB long, a few blocks stored (a clone shares them instead).
        let m = dst.metadata().unwrap();
        assert_eq!(m.len(), 8 << 20);
        assert!(m.blocks() * 512 <= 64 << 10, "{} blocks", m.blocks());
        // To another file system (tmpfs; the store is on a disk): where
        // the kernel will not copy across (EXDEV), read and written.
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let far = shm.path().join("copy");
        let dst = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&far)
            .unwrap();
        sys::copy_sparse(&src, &dst).unwrap();
        assert_eq!(
            fs::read(&far).unwrap(),
            fs::read(snap.dir.join("scratch")).unwrap()
        );
        assert!(dst.metadata().unwrap().blocks() * 512 <= 64 << 10);
    }

    #[test]
    fn a_scratch_disks_digest_covers_its_length_and_data_not_its_holes() {
        let d = tempfile::tempdir().unwrap();
        let disk = |name: &str, len: u64, at: u64, bytes: &[u8]| {
            let p = d.path().join(name);
            let f = fs::File::create(&p).unwrap();
            f.set_len(len).unwrap();
            std::os::unix::fs::FileExt::write_at(&f, bytes, at).unwrap();
            p
        };
        let a = disk("a", 64 << 20, 4096, b"superblock");
        // Positive control: the same bytes at the same place, the same
        // digest.
        assert_eq!(
            sparse_sha256(&a).unwrap(),
            sparse_sha256(&disk("same", 64 << 20, 4096, b"superblock")).unwrap()
        );
        for other in [
            disk("byte", 64 << 20, 4096, b"superblocK"),
            disk("moved", 64 << 20, 8192, b"superblock"),
            disk("longer", 65 << 20, 4096, b"superblock"),
        ] {
            assert_ne!(sparse_sha256(&a).unwrap(), sparse_sha256(&other).unwrap());
        }
    }
}
