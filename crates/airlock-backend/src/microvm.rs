//! The microVM backend: every sandbox is a fresh QEMU `microvm` machine
//! with its own guest kernel, whose init is airlock itself
//! ([`airlock_sandbox::vminit`]) building the same sandbox inside the guest
//! that the process backend builds on the host, so the virtual machine is a
//! second wall, not the only one.
//!
//! Host side, per sandbox: the engine starts `airlock __airlock-vmm` (the
//! VM monitor, [`vmm_main`]) exactly as it starts an OCI runtime, with the
//! sandbox's stdio, control, broker and egress channels; the monitor starts
//! QEMU (in the sandbox's cgroup, as an unprivileged user, under QEMU's own
//! seccomp sandbox) and relays those channels over the one virtio-serial
//! port ([`airlock_sandbox::vmchan`]): no network device exists in the
//! guest, and nothing the guest sends is trusted beyond the channel's
//! bounds. The engine, the agent's handshake, supervision, limits and
//! teardown are those of every hosted backend.
//!
//! Guest artifacts, built on first use and cached content-addressed under
//! the store ([`Store`]): the initramfs (the airlock binary, its shared
//! libraries and the kernel modules the guest needs) and the read-only root
//! image (erofs) holding the host's runtimes (python3, node, sh and common
//! tools, their libraries, the files of /etc a sandbox sees).
//!
//! Accelerator: KVM where `/dev/kvm` really runs a guest; otherwise QEMU's
//! software emulation (TCG), only when the operator allows it (slow: for
//! development and tests). The result's `enforced.accelerator` says which.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use airlock_policy::{IsolationLevel, Language, Policy};
use airlock_sandbox::hosted::{AgentLaunch, Isolated, Launched, Launcher};
use airlock_sandbox::proto::{InitConfig, RoFile, RoMount, VmGuestConfig};
use airlock_sandbox::vmchan::{self, ChanError, Mux, Sink, Source, stream};
use airlock_sandbox::{Engine, SandboxError, sys};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::process::check_level;
use crate::snapshot::{self, Golden, SnapMode, Snapshots};
use crate::{Backend, BackendError, Prepared, Probe, Request, Spec, Template};

/// argv[1] of the VM monitor.
pub const VMM_ARG: &str = "__airlock-vmm";

/// Guest memory beyond the policy's: the guest kernel, the initramfs
/// (the airlock binary) and page cache of the root image.
const GUEST_OVERHEAD_MIB: u64 = 160;
/// The least guest memory: the kernel unpacks the initramfs (tens of MiB)
/// into it before anything else runs.
const GUEST_MIN_MIB: u64 = 256;

/// The guest's RAM for a policy's memory limit (which the guest's own
/// cgroup holds the code to).
fn guest_memory_mib(policy_mib: u64) -> u64 {
    (policy_mib + GUEST_OVERHEAD_MIB).max(GUEST_MIN_MIB)
}
/// Host memory beyond the guest's: QEMU itself (TCG's translation cache
/// is capped at 64 MiB).
const QEMU_OVERHEAD_MIB: u64 = 160;
/// Host tasks of QEMU (its threads) and the monitor.
const HOST_TASKS: u64 = 64;
/// When the monitor shows the guest's console because its agent has not
/// answered yet (KVM, TCG): well before the engine gives up on it.
const CONSOLE_AFTER: [std::time::Duration; 2] = [
    std::time::Duration::from_secs(20),
    std::time::Duration::from_secs(90),
];

/// How long a guest kernel may take to boot and stop under KVM when
/// checking that KVM really runs one.
const KVM_CHECK_SECS: u64 = 15;

/// Bumped when what goes into the guest's artifacts changes.
const ARTIFACT_FORMAT: u32 = 2;

/// Which accelerator runs guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl Accel {
    /// Its name in results.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the operator chose.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// QEMU binary (default: `qemu-system-x86_64` on PATH).
    pub qemu: Option<PathBuf>,
    /// Guest kernel (default: the newest `/boot/vmlinuz-*`, a Debian cloud
    /// kernel preferred); its modules are read from
    /// `/lib/modules/<version>`.
    pub kernel: Option<PathBuf>,
    /// Force an accelerator; `None` picks KVM when it runs a guest here.
    pub accel: Option<Accel>,
    /// Run under TCG when KVM does not work (otherwise the backend is not
    /// available without KVM).
    pub allow_tcg: bool,
    /// Where guest artifacts are cached (default [`default_store`]).
    pub store: Option<PathBuf>,
}

/// Where guest artifacts are cached: `AIRLOCK_VM_STORE`, else
/// /var/lib/airlock/vm as root, else the user's data directory.
pub fn default_store() -> PathBuf {
    if let Some(p) = std::env::var_os("AIRLOCK_VM_STORE").filter(|p| !p.is_empty()) {
        return p.into();
    }
    if sys::geteuid() == 0 {
        return "/var/lib/airlock/vm".into();
    }
    std::env::var_os("XDG_DATA_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(std::env::temp_dir)
        .join("airlock/vm")
}

/// The host's pieces for running guests.
#[derive(Debug, Clone)]
pub struct VmHost {
    /// QEMU.
    pub qemu: PathBuf,
    /// Its version line.
    pub qemu_version: String,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Its modules directory.
    pub modules: PathBuf,
    /// The accelerator guests run with.
    pub accel: Accel,
    /// `mkfs.ext4`, which makes each VM's scratch disk.
    pub mkfs: PathBuf,
    /// virtiofsd, which serves a session's workspace to its VMs (none: this
    /// host's microVMs hold no sessions).
    pub virtiofsd: Option<PathBuf>,
}

/// Finds QEMU, a kernel and an accelerator, or says what is missing.
pub fn discover(settings: &Settings) -> Result<VmHost, String> {
    let qemu = match &settings.qemu {
        Some(p) => p.clone(),
        None => crate::oci::find_binary(&["qemu-system-x86_64"]).ok_or(
            "qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)",
        )?,
    };
    let out = Command::new(&qemu)
        .arg("--version")
        .env_clear()
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("{} does not run: {e}", qemu.display()))?;
    let qemu_version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let kernel = match &settings.kernel {
        Some(k) => k.clone(),
        None => find_kernel()
            .ok_or("no guest kernel in /boot (Debian: apt-get install linux-image-cloud-amd64)")?,
    };
    let version = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .ok_or_else(|| format!("{}: not named vmlinuz-<version>", kernel.display()))?;
    let modules = Path::new("/lib/modules").join(version);
    if !modules.join("modules.dep").is_file() {
        return Err(format!(
            "{}: no modules.dep for the guest kernel",
            modules.display()
        ));
    }
    fs::File::open(&kernel).map_err(|e| format!("{}: {e}", kernel.display()))?;
    let mkfs = crate::oci::find_binary(&["mkfs.ext4"])
        .ok_or("mkfs.ext4 is not installed (Debian: apt-get install e2fsprogs)")?;
    let store = settings.store.clone().unwrap_or_else(default_store);
    let accel = match settings.accel {
        Some(a) => a,
        None if kvm_runs_guests() && kvm_boots(&qemu, &qemu_version, &kernel, &store) => Accel::Kvm,
        None if settings.allow_tcg => Accel::Tcg,
        None => {
            return Err(
                "KVM does not run a guest here; allow software emulation (TCG, slow, \
                 development only) to use the microvm backend anyway"
                    .into(),
            );
        }
    };
    // Distributions put it beside QEMU's helpers; `cargo install
    // virtiofsd` puts it on PATH.
    let virtiofsd = crate::oci::find_binary(&["virtiofsd"]).or_else(|| {
        ["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    });
    Ok(VmHost {
        qemu,
        qemu_version,
        kernel,
        modules,
        accel,
        mkfs,
        virtiofsd,
    })
}

/// Whether /dev/kvm runs a guest (the doctor's probe, in a child process:
/// a broken KVM must not hang or crash this one).
fn kvm_runs_guests() -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let Ok(exe) = std::env::current_exe() else {
        return false;
    };
    succeeds_within(
        Command::new(exe).arg(airlock_sandbox::kvm::KVM_PROBE_ARG),
        5,
    )
}

/// Whether `cmd`, run without stdio, exits successfully within `secs`
/// (killed otherwise).
fn succeeds_within(cmd: &mut Command, secs: u64) -> bool {
    let Ok(mut child) = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return s.success(),
            Ok(None) if std::time::Instant::now() < end => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Whether the guest kernel itself runs under KVM here: some nested or
/// paravirtual KVM devices run the doctor's few instructions but crash or
/// hang a real kernel. Boots it without a root (it panics and the machine
/// stops at once when it runs); the verdict is kept in the store per
/// (QEMU, kernel).
fn kvm_boots(qemu: &Path, qemu_version: &str, kernel: &Path, store: &Path) -> bool {
    let mut key = Sha256::new();
    key.update(qemu_version.as_bytes());
    key_file(&mut key, qemu);
    key_file(&mut key, kernel);
    let verdict = store
        .join("refs")
        .join(format!("kvm-{}", hex(&key.finalize())));
    match fs::read_to_string(&verdict).as_deref() {
        Ok("boots") => return true,
        Ok("fails") => return false,
        _ => {}
    }
    let boots = succeeds_within(
        Command::new(qemu)
            .args([
                "-M",
                "microvm,isa-serial=off,rtc=off",
                "-accel",
                "kvm",
                "-cpu",
                "host",
            ])
            .args([
                "-m",
                "128",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
            ])
            .args(["-nic", "none", "-no-reboot", "-kernel"])
            .arg(kernel)
            .args(["-append", "quiet loglevel=0 panic=-1"])
            .env_clear(),
        KVM_CHECK_SECS,
    );
    if fs::create_dir_all(store.join("refs")).is_ok() {
        let _ = fs::write(&verdict, if boots { "boots" } else { "fails" });
    }
    boots
}

/// The newest `/boot/vmlinuz-*`, a cloud kernel (made for virtual
/// machines: virtio drivers, small) preferred.
fn find_kernel() -> Option<PathBuf> {
    let mut found: Vec<(bool, Vec<u64>, PathBuf)> = fs::read_dir("/boot")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let ver = name.strip_prefix("vmlinuz-")?.to_string();
            let nums = ver
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .take(4)
                .filter_map(|s| s.parse().ok())
                .collect();
            Some((ver.contains("cloud"), nums, e.path()))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, _, p)| p)
}

// ---------------------------------------------------------------------
// Guest artifacts

/// The guest artifacts' store: `initrd/<sha256>.cpio` and
/// `root/<sha256>.erofs` (content-addressed, read-only), `refs/<key>`
/// naming the artifact built from inputs whose key that is, `tmp/` for
/// builds in progress.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// The artifacts one guest boots from.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// The initramfs.
    pub initrd: PathBuf,
    /// The read-only root image.
    pub root: PathBuf,
    /// `sha256:<hex>` of the root image.
    pub root_id: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Store {
    /// The store at `dir` (created 0755: QEMU reads it as an unprivileged
    /// user; nothing in it is secret).
    pub fn open(dir: &Path) -> std::io::Result<Store> {
        for sub in ["initrd", "root", "refs", "tmp"] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir.join(sub))?;
        }
        // What boots as every guest's init comes from here: nobody but
        // this user may have placed or replaced anything in it (a store
        // under a shared directory someone else created first is refused).
        let euid = sys::geteuid();
        for d in std::iter::once(dir.to_path_buf())
            .chain(["initrd", "root", "refs", "tmp"].map(|s| dir.join(s)))
        {
            let m = fs::symlink_metadata(&d)?;
            if !m.is_dir() || m.uid() != euid || m.mode() & 0o022 != 0 {
                return Err(std::io::Error::other(format!(
                    "{} must be a directory owned by uid {euid} and writable by it only",
                    d.display()
                )));
            }
        }
        Ok(Store { dir: dir.into() })
    }

    /// Where the store is.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lookup(&self, key: &str) -> Option<PathBuf> {
        let digest = fs::read_to_string(self.dir.join("refs").join(key)).ok()?;
        let digest = digest.trim();
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let kind = key.split('-').next()?;
        let ext = if kind == "initrd" { "cpio" } else { "erofs" };
        let p = self.dir.join(kind).join(format!("{digest}.{ext}"));
        // Content-addressed: a file whose bytes are not its name is not
        // booted (it is rebuilt).
        let mut h = Sha256::new();
        let mut f = fs::File::open(&p).ok()?;
        std::io::copy(&mut f, &mut h).ok()?;
        (hex(&h.finalize()) == digest).then_some(p)
    }

    /// Moves a finished build into place under its digest and records
    /// `key` for it.
    fn commit(&self, key: &str, built: &Path, kind: &str, ext: &str) -> std::io::Result<PathBuf> {
        let mut h = Sha256::new();
        let mut f = fs::File::open(built)?;
        std::io::copy(&mut f, &mut h)?;
        let digest = hex(&h.finalize());
        fs::set_permissions(built, fs::Permissions::from_mode(0o444))?;
        let dest = self.dir.join(kind).join(format!("{digest}.{ext}"));
        fs::rename(built, &dest)?;
        let tmp_ref = self.dir.join("tmp").join(format!("{key}.ref"));
        fs::write(&tmp_ref, &digest)?;
        fs::rename(tmp_ref, self.dir.join("refs").join(key))?;
        Ok(dest)
    }

    /// Removes every initramfs and root image but `keep`, and the
    /// references to what is gone (see [`MicrovmBackend::prune`]).
    fn prune(&self, keep: &[&Path], dry_run: bool) -> (usize, u64) {
        let (mut n, mut bytes) = (0, 0);
        for kind in ["initrd", "root"] {
            for e in fs::read_dir(self.dir.join(kind))
                .into_iter()
                .flatten()
                .flatten()
            {
                let p = e.path();
                if keep.contains(&p.as_path()) {
                    continue;
                }
                let size = e.metadata().map_or(0, |m| m.blocks() * 512);
                if dry_run || fs::remove_file(&p).is_ok() {
                    n += 1;
                    bytes += size;
                }
            }
        }
        if dry_run {
            return (n, bytes);
        }
        // References to a file no longer here (the KVM verdicts stay).
        for e in fs::read_dir(self.dir.join("refs"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(kind) = ["initrd", "root"]
                .into_iter()
                .find(|k| name.starts_with(&format!("{k}-")))
            else {
                continue;
            };
            let ext = if kind == "initrd" { "cpio" } else { "erofs" };
            let digest = fs::read_to_string(e.path()).unwrap_or_default();
            if !self
                .dir
                .join(kind)
                .join(format!("{}.{ext}", digest.trim()))
                .is_file()
            {
                let _ = fs::remove_file(e.path());
            }
        }
        (n, bytes)
    }

    fn tmp_path(&self, what: &str) -> std::io::Result<PathBuf> {
        let mut rnd = [0u8; 8];
        sys::getrandom(&mut rnd)?;
        Ok(self.dir.join("tmp").join(format!("{what}-{}", hex(&rnd))))
    }

    /// The guest's artifacts for `engine`'s runtimes on `host`, built now
    /// when missing (seconds; once per change of their inputs).
    pub fn artifacts(&self, engine: &Engine, host: &VmHost) -> Result<Artifacts, String> {
        let initrd = self.initrd(engine, host)?;
        let (root, root_id) = self.root_image(engine)?;
        Ok(Artifacts {
            initrd,
            root,
            root_id,
        })
    }

    fn initrd(&self, engine: &Engine, host: &VmHost) -> Result<PathBuf, String> {
        let binary = engine.init_path();
        let modules = guest_modules(&host.modules)?;
        let libs = binary_libs(binary)?;
        let mut key = Sha256::new();
        key.update(ARTIFACT_FORMAT.to_le_bytes());
        for p in std::iter::once(binary.to_path_buf())
            .chain(modules.iter().cloned())
            .chain(libs.iter().map(|(p, _)| p.clone()))
        {
            key_file(&mut key, &p);
        }
        let key = format!("initrd-{}", hex(&key.finalize()));
        if let Some(p) = self.lookup(&key) {
            return Ok(p);
        }
        let e = |what: &'static str| {
            move |err: std::io::Error| format!("building the initramfs: {what}: {err}")
        };
        let out = self.tmp_path("initrd").map_err(e("temporary file"))?;
        let stripped = self.tmp_path("init").map_err(e("temporary file"))?;
        // Debug information and symbols are most of a development build's
        // size (71 MiB of it stripped of debug information only, 51 without
        // symbols too), and the whole initramfs is unpacked into the
        // guest's memory: a larger one no longer fitted the smallest guest
        // (the kernel's "Initramfs unpacking failed: write error"). The
        // guest's init needs no symbols: backtraces are read on the host.
        let init_src = match Command::new("/usr/bin/strip")
            .env_clear()
            .arg("--strip-all")
            .arg("-o")
            .arg(&stripped)
            .arg(binary)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Ok(s) if s.success() => stripped.clone(),
            _ => binary.to_path_buf(),
        };
        let made = write_initrd(&out, &init_src, &libs, &modules);
        let _ = fs::remove_file(&stripped);
        if let Err(err) = made {
            let _ = fs::remove_file(&out);
            return Err(format!("building the initramfs: {err}"));
        }
        self.commit(&key, &out, "initrd", "cpio")
            .map_err(e("store"))
    }

    fn root_image(&self, engine: &Engine) -> Result<(PathBuf, String), String> {
        let tree = root_tree(engine)?;
        let mut key = Sha256::new();
        key.update(ARTIFACT_FORMAT.to_le_bytes());
        for (path, entry) in &tree {
            key.update(path.as_os_str().as_encoded_bytes());
            key.update([0]);
            match entry {
                Entry::Dir => key.update(b"d"),
                Entry::Link(t) => {
                    key.update(b"l");
                    key.update(t.as_os_str().as_encoded_bytes());
                }
                Entry::File => key_file(&mut key, path),
            }
        }
        let key = format!("root-{}", hex(&key.finalize()));
        let found = match self.lookup(&key) {
            Some(p) => p,
            None => self.build_root(&key, &tree)?,
        };
        let id = found
            .file_stem()
            .and_then(|s| s.to_str())
            .map(|s| format!("sha256:{s}"))
            .unwrap_or_default();
        Ok((found, id))
    }

    fn build_root(&self, key: &str, tree: &BTreeMap<PathBuf, Entry>) -> Result<PathBuf, String> {
        let e = |what: &'static str| {
            move |err: std::io::Error| format!("building the root image: {what}: {err}")
        };
        let staging = self.tmp_path("rootfs").map_err(e("staging"))?;
        let out = self.tmp_path("root").map_err(e("staging"))?;
        let made = (|| -> Result<(), String> {
            fs::DirBuilder::new()
                .mode(0o755)
                .create(&staging)
                .map_err(e("staging"))?;
            for (path, entry) in tree {
                let rel = path.strip_prefix("/").unwrap_or(path);
                let dest = staging.join(rel);
                if let Some(parent) = dest.parent() {
                    fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o755)
                        .create(parent)
                        .map_err(e("staging"))?;
                }
                match entry {
                    Entry::Dir => match fs::DirBuilder::new().mode(0o755).create(&dest) {
                        Ok(()) => {}
                        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
                        Err(err) => return Err(e("staging")(err)),
                    },
                    Entry::Link(t) => {
                        std::os::unix::fs::symlink(t, &dest).map_err(e("staging"))?;
                    }
                    Entry::File => {
                        if fs::hard_link(path, &dest).is_err() {
                            fs::copy(path, &dest).map_err(e("copy"))?;
                        }
                    }
                }
            }
            let out_status = Command::new("mkfs.erofs")
                .arg("--all-root")
                // A fixed UUID: the same inputs make the same image.
                .arg("-U00000000-0000-0000-0000-000000000000")
                .arg("-T0")
                .arg("--quiet")
                .arg(&out)
                .arg(&staging)
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .map_err(|err| {
                    format!("mkfs.erofs does not run ({err}); Debian: apt-get install erofs-utils")
                })?;
            if !out_status.status.success() {
                return Err(format!(
                    "mkfs.erofs failed: {}",
                    String::from_utf8_lossy(&out_status.stderr).trim()
                ));
            }
            Ok(())
        })();
        let _ = fs::remove_dir_all(&staging);
        if let Err(err) = made {
            let _ = fs::remove_file(&out);
            return Err(err);
        }
        self.commit(key, &out, "root", "erofs").map_err(e("store"))
    }
}

/// A file's identity for a cache key: path, size, modification time,
/// inode and mode (contents are hashed only once built).
fn key_file(key: &mut Sha256, p: &Path) {
    key.update(p.as_os_str().as_encoded_bytes());
    key.update([0]);
    if let Ok(m) = fs::metadata(p) {
        for v in [
            m.size(),
            m.mtime() as u64,
            m.mtime_nsec() as u64,
            m.ino(),
            u64::from(m.mode()),
        ] {
            key.update(v.to_le_bytes());
        }
    }
}

/// Modules the guest loads, dependencies first: the virtio-mmio transport,
/// the block device, erofs (the root image), ext4 (the scratch disk) and
/// the entropy device (the console is built
/// into the kernels this uses, or listed too).
fn guest_modules(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let dep = fs::read_to_string(dir.join("modules.dep"))
        .map_err(|e| format!("{}: {e}", dir.join("modules.dep").display()))?;
    let builtin = fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    let deps: BTreeMap<String, Vec<String>> = dep
        .lines()
        .filter_map(|l| {
            let (m, rest) = l.split_once(':')?;
            Some((
                m.to_string(),
                rest.split_whitespace().map(String::from).collect(),
            ))
        })
        .collect();
    let by_name = |name: &str| {
        deps.keys()
            .find(|k| {
                Path::new(k)
                    .file_name()
                    .and_then(|f| f.to_str())
                    .and_then(|f| f.split(".ko").next())
                    .is_some_and(|f| f.replace('-', "_") == name.replace('-', "_"))
            })
            .cloned()
    };
    let mut order: Vec<String> = Vec::new();
    fn visit(m: &str, deps: &BTreeMap<String, Vec<String>>, order: &mut Vec<String>, depth: u32) {
        if depth > 16 || order.iter().any(|o| o == m) {
            return;
        }
        for d in deps.get(m).into_iter().flatten() {
            visit(d, deps, order, depth + 1);
        }
        order.push(m.to_string());
    }
    for name in [
        "virtio",
        "virtio_ring",
        "virtio_mmio",
        "virtio_console",
        "virtio_blk",
        "erofs",
        "ext4",
        "crc32c_generic",
        "virtio_rng",
    ] {
        let is_builtin = builtin.lines().any(|l| {
            Path::new(l)
                .file_name()
                .and_then(|f| f.to_str())
                .and_then(|f| f.split(".ko").next())
                .is_some_and(|f| f.replace('-', "_") == name)
        });
        if is_builtin {
            continue;
        }
        match by_name(name) {
            Some(m) => visit(&m, &deps, &mut order, 0),
            // ext4's checksums (a soft dependency, which modules.dep does
            // not list): most kernels build it in.
            None if name == "crc32c_generic" => {}
            None => {
                return Err(format!(
                    "the guest kernel has no {name} module and does not build it in"
                ));
            }
        }
    }
    Ok(order.into_iter().map(|m| dir.join(m)).collect())
}

/// The shared libraries `binary` loads (through the host's loader's
/// `--list`, which maps them without running the program), as (host path,
/// file name); the loader itself is among them.
fn binary_libs(binary: &Path) -> Result<Vec<(PathBuf, String)>, String> {
    let mut out = Vec::new();
    for p in elf_deps(binary)? {
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or("library name")?
            .to_string();
        out.push((p, name));
    }
    Ok(out)
}

/// The host's dynamic loader.
fn loader() -> Result<PathBuf, String> {
    for p in ["/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1"] {
        if Path::new(p).exists() {
            return Ok(p.into());
        }
    }
    Err("no dynamic loader found".into())
}

fn is_elf(p: &Path) -> bool {
    let mut b = [0u8; 4];
    fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
        && b == *b"\x7fELF"
}

/// The libraries an ELF file needs, resolved by the host's loader.
fn elf_deps(file: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Command::new(loader()?)
        .arg("--list")
        .arg(file)
        .env_clear()
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("the dynamic loader does not run: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v = Vec::new();
    for line in text.lines() {
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            v.push(PathBuf::from(p));
        }
    }
    Ok(v)
}

fn write_initrd(
    out: &Path,
    init: &Path,
    libs: &[(PathBuf, String)],
    modules: &[PathBuf],
) -> std::io::Result<()> {
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(out)?;
    let mut w = std::io::BufWriter::new(f);
    let mut ino = 1u32;
    let dir = |w: &mut std::io::BufWriter<fs::File>, name: &str, ino: &mut u32| {
        *ino += 1;
        cpio::NewcBuilder::new(name)
            .ino(*ino)
            .mode(0o040755)
            .nlink(2)
            .write(&mut *w, 0)
            .finish()
            .map(|_| ())
    };
    for d in [
        "dev",
        "proc",
        "sys",
        "lib",
        "lib64",
        "lib/x86_64-linux-gnu",
        "usr",
        "usr/lib",
        "usr/lib/x86_64-linux-gnu",
        "modules",
    ] {
        dir(&mut w, d, &mut ino)?;
    }
    let file = |w: &mut std::io::BufWriter<fs::File>,
                name: &str,
                src: &Path,
                mode: u32,
                ino: &mut u32|
     -> std::io::Result<()> {
        *ino += 1;
        let mut f = fs::File::open(src)?;
        let len = f.metadata()?.len();
        let len32 = u32::try_from(len).map_err(|_| std::io::Error::other("file over 4 GiB"))?;
        let mut cw = cpio::NewcBuilder::new(name)
            .ino(*ino)
            .mode(0o100000 | mode)
            .nlink(1)
            .write(&mut *w, len32);
        std::io::copy(&mut f, &mut cw)?;
        cw.finish().map(|_| ())
    };
    file(&mut w, "init", init, 0o755, &mut ino)?;
    for (src, name) in libs {
        let dest = if name.starts_with("ld-linux") {
            format!("lib64/{name}")
        } else {
            format!("lib/x86_64-linux-gnu/{name}")
        };
        file(&mut w, &dest, src, 0o755, &mut ino)?;
    }
    for (i, m) in modules.iter().enumerate() {
        let name = m.file_name().and_then(|n| n.to_str()).unwrap_or("module");
        file(
            &mut w,
            &format!("modules/{i:02}-{name}"),
            m,
            0o644,
            &mut ino,
        )?;
    }
    let w = cpio::newc::trailer(w)?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// One entry of the root image.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir,
    File,
    Link(PathBuf),
}

/// Tools a shell node uses, taken into the root image when the host has
/// them (with their libraries).
const SHELL_TOOLS: &[&str] = &[
    "sh",
    "dash",
    "bash",
    "cat",
    "ls",
    "echo",
    "printf",
    "env",
    "printenv",
    "sort",
    "uniq",
    "head",
    "tail",
    "wc",
    "tr",
    "cut",
    "paste",
    "join",
    "comm",
    "fold",
    "nl",
    "rev",
    "tac",
    "grep",
    "egrep",
    "fgrep",
    "sed",
    "awk",
    "mawk",
    "gawk",
    "which",
    "tar",
    "gzip",
    "gunzip",
    "zcat",
    "base64",
    "base32",
    "sha1sum",
    "sha256sum",
    "sha512sum",
    "md5sum",
    "date",
    "sleep",
    "mkdir",
    "rmdir",
    "rm",
    "cp",
    "mv",
    "ln",
    "touch",
    "chmod",
    "find",
    "xargs",
    "test",
    "[",
    "true",
    "false",
    "id",
    "uname",
    "basename",
    "dirname",
    "tee",
    "seq",
    "expr",
    "stat",
    "du",
    "df",
    "readlink",
    "realpath",
    "mktemp",
    "od",
    "diff",
    "cmp",
    "timeout",
    "nproc",
    "pwd",
    "whoami",
    "yes",
    "split",
    "csplit",
    "shuf",
    "truncate",
    "dd",
    "sum",
    "cksum",
];

/// Directories a root image never takes from a python installation.
const PYTHON_SKIP: &[&str] = &[
    "test",
    "site-packages",
    "dist-packages",
    "idlelib",
    "tkinter",
    "turtledemo",
];

/// What the root image holds: for each runtime the engine resolves, the
/// interpreter with its symlinks and libraries (and python's standard
/// library), the shell tools, time zone data, the files of /etc a sandbox
/// sees, and an empty directory for every bind the sandbox's view makes.
fn root_tree(engine: &Engine) -> Result<BTreeMap<PathBuf, Entry>, String> {
    let mut t = Tree::default();
    // The agent runs in the sandbox's root with the libraries found there.
    for (lib, _) in binary_libs(engine.init_path())? {
        t.add_path(&lib)?;
    }
    for lang in [Language::Python, Language::Javascript, Language::Shell] {
        let Ok(rt) = engine.runtime(lang) else {
            continue;
        };
        for m in &rt.mounts {
            let p = Path::new(&m.host);
            let system = m.host == "/usr/bin"
                || airlock_sandbox::runtime::SYSTEM_LIB_DIRS.contains(&m.host.as_str());
            // System directories hold only what the runtimes need (added
            // below); anything else a runtime binds comes whole.
            if system {
                t.dir_chain(p);
            } else {
                t.add_tree(p, &[])?;
            }
        }
        t.add_path(Path::new(&rt.interpreter))?;
        if lang == Language::Python {
            let out = Command::new(&rt.interpreter)
                .args([
                    "-I",
                    "-c",
                    "import sysconfig; print(sysconfig.get_path('stdlib')); \
                     print(sysconfig.get_path('platstdlib'))",
                ])
                .env_clear()
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .map_err(|e| format!("python does not run: {e}"))?;
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let p = Path::new(line.trim());
                if p.is_absolute() && p.is_dir() {
                    t.add_tree(p, PYTHON_SKIP)?;
                }
            }
        }
        if lang == Language::Shell {
            for tool in SHELL_TOOLS {
                for dir in ["/usr/bin", "/bin"] {
                    let p = Path::new(dir).join(tool);
                    if fs::symlink_metadata(&p).is_ok() {
                        t.add_path(&p)?;
                        break;
                    }
                }
            }
        }
    }
    for p in airlock_sandbox::rootfs::host_etc_paths() {
        t.add_tree(Path::new(&p), &[])?;
    }
    // Libraries of every program and extension module taken.
    let elves: Vec<PathBuf> = t
        .entries
        .iter()
        .filter(|(p, e)| **e == Entry::File && is_elf(p))
        .map(|(p, _)| p.clone())
        .collect();
    for f in elves {
        for dep in elf_deps(&f)? {
            t.add_path(&dep)?;
        }
    }
    Ok(t.entries)
}

#[derive(Default)]
struct Tree {
    entries: BTreeMap<PathBuf, Entry>,
    budget: u64,
}

/// Files a root image takes at most (a mistaken tree must not copy a
/// whole disk).
const MAX_ENTRIES: u64 = 200_000;

impl Tree {
    fn insert(&mut self, p: PathBuf, e: Entry) -> Result<(), String> {
        self.budget += 1;
        if self.budget > MAX_ENTRIES {
            return Err("the root image would hold too many files".into());
        }
        self.entries.entry(p).or_insert(e);
        Ok(())
    }

    /// `p` and its parents as directories (canonical: a parent that is a
    /// symlink on the host, /lib on merged-/usr, is recreated by the view).
    fn dir_chain(&mut self, p: &Path) {
        let mut cur = Some(p);
        while let Some(d) = cur {
            if d == Path::new("/") {
                break;
            }
            if !fs::symlink_metadata(d).is_ok_and(|m| m.file_type().is_symlink()) {
                self.entries.entry(d.to_path_buf()).or_insert(Entry::Dir);
            }
            cur = d.parent();
        }
    }

    /// One path, following its symlinks (each recorded as a link).
    fn add_path(&mut self, p: &Path) -> Result<(), String> {
        let mut cur = canonical_parent(p).ok_or_else(|| format!("{}: no parent", p.display()))?;
        for _ in 0..16 {
            let Ok(meta) = fs::symlink_metadata(&cur) else {
                return Ok(());
            };
            if let Some(parent) = cur.parent() {
                self.dir_chain(parent);
            }
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&cur).map_err(|e| e.to_string())?;
                let next = if target.is_absolute() {
                    target.clone()
                } else {
                    cur.parent().unwrap_or(Path::new("/")).join(&target)
                };
                self.insert(cur.clone(), Entry::Link(target))?;
                cur = match canonical_parent(&next) {
                    Some(n) => n,
                    None => return Ok(()),
                };
                continue;
            }
            if meta.is_file() && meta.mode() & 0o004 != 0 {
                self.insert(cur, Entry::File)?;
            } else if meta.is_dir() {
                self.insert(cur, Entry::Dir)?;
            }
            return Ok(());
        }
        Ok(())
    }

    /// A whole tree, symlinks kept as they are, `skip` names left out.
    fn add_tree(&mut self, root: &Path, skip: &[&str]) -> Result<(), String> {
        let Ok(meta) = fs::symlink_metadata(root) else {
            return Ok(());
        };
        if !meta.is_dir() {
            return self.add_path(root);
        }
        let root = root.canonicalize().map_err(|e| e.to_string())?;
        self.dir_chain(&root);
        let mut stack = vec![root];
        while let Some(d) = stack.pop() {
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for ent in rd.flatten() {
                let name = ent.file_name();
                if name.to_str().is_some_and(|n| skip.contains(&n)) {
                    continue;
                }
                let p = ent.path();
                let Ok(m) = fs::symlink_metadata(&p) else {
                    continue;
                };
                if m.file_type().is_symlink() {
                    let t = fs::read_link(&p).map_err(|e| e.to_string())?;
                    self.insert(p, Entry::Link(t))?;
                } else if m.is_dir() {
                    self.insert(p.clone(), Entry::Dir)?;
                    stack.push(p);
                } else if m.is_file() && m.mode() & 0o004 != 0 {
                    // A file the host keeps from other users is never put
                    // into an image every sandbox (and QEMU's user) reads.
                    self.insert(p, Entry::File)?;
                }
            }
        }
        Ok(())
    }
}

fn canonical_parent(p: &Path) -> Option<PathBuf> {
    let parent = p.parent()?.canonicalize().ok()?;
    Some(parent.join(p.file_name()?))
}

// ---------------------------------------------------------------------
// Launching

/// What the monitor is given (a file in the sandbox's state directory,
/// root-only).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmmConfig {
    qemu: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    root: PathBuf,
    memory_mib: u64,
    cpus: u32,
    accel: Accel,
    /// Host uid/gid QEMU runs as when airlock is not root; as root, QEMU
    /// takes this group and a uid of its own VM ([`own_qemu_uid`]).
    qemu_ids: (u32, u32),
    /// Supplementary group for /dev/kvm, when KVM is used.
    kvm_gid: Option<u32>,
    guest: VmGuestConfig,
    /// A file for the guest kernel's console (`AIRLOCK_VM_CONSOLE` of the
    /// engine's process: debugging a guest that does not start).
    console: Option<PathBuf>,
    /// Made into a golden snapshot, or restored from one.
    #[serde(default)]
    snapshot: Option<SnapMode>,
    /// The sandbox's scratch disk.
    scratch: ScratchDisk,
    /// A session's workspace, shared with the guest over virtio-fs.
    #[serde(default)]
    workspace: Option<VmWorkspace>,
}

/// A session's workspace as a VM gets it: virtiofsd serves the directory
/// (the session's tmpfs) as the session's own host ids, in namespaces of
/// its own, under Landlock and its seccomp filter, to QEMU's
/// vhost-user-fs device. QEMU itself never opens it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmWorkspace {
    virtiofsd: PathBuf,
    dir: PathBuf,
    /// The session's host uid and gid (a QEMU uid of the session's own,
    /// see [`session_ids`]), which own the workspace.
    ids: (u32, u32),
}

/// What a VM's scratch disk holds: /tmp and /workspace together (ext4,
/// made by the monitor for a cold or golden VM, copied from the snapshot
/// for a restored one, handed to QEMU as a descriptor).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScratchDisk {
    mkfs: PathBuf,
    /// Where a cold or restored VM's disk is made (and at once unlinked).
    dir: PathBuf,
    /// What the code may write, in bytes and files.
    bytes: u64,
    inodes: u64,
}

/// The scratch disk's file in a snapshot (made there by the golden VM's
/// monitor; part of it).
const SCRATCH_FILE: &str = "scratch";

/// A fresh name for a cold or restored VM's scratch disk.
fn scratch_name(s: &ScratchDisk) -> std::io::Result<PathBuf> {
    let mut rnd = [0u8; 8];
    sys::getrandom(&mut rnd)?;
    Ok(s.dir
        .join(format!("scratch-{}-{}", std::process::id(), hex(&rnd))))
}
/// Its block size.
const SCRATCH_BLOCK: u64 = 4096;

/// Blocks of a scratch disk on which an unprivileged writer can store at
/// least `bytes` in `inodes` files: the data, the inode tables (256
/// bytes an inode), per block group (32768 blocks) its bitmaps, a
/// superblock and descriptor backup and a table block of rounding, the
/// directories, and what ext4 keeps back for its own metadata (a
/// fiftieth, at most 4096 blocks), which no writer gets. The guest's
/// init takes what is left over beyond `bytes` and `inodes` (see
/// `vminit::reserve_scratch`), so the sandbox gets exactly those.
fn scratch_blocks(bytes: u64, inodes: u64) -> u64 {
    let data = bytes.div_ceil(SCRATCH_BLOCK)
        + (inodes + 32).saturating_mul(256).div_ceil(SCRATCH_BLOCK)
        + 32;
    let groups = data.div_ceil(32768) + 1;
    let b = data + 6 * groups;
    b + b.div_ceil(49).min(4096)
}

/// The inodes to ask mkfs for so that at least `inodes` files fit:
/// ext4's reserved ones (11), the two directories and the guest's reserve
/// directory and space file on top, in whole inode-table blocks (16
/// inodes of 256 bytes) of each block group, as mkfs lays them out.
fn scratch_inodes(bytes: u64, inodes: u64) -> u64 {
    let unit = 16 * scratch_blocks(bytes, inodes).div_ceil(32768);
    (inodes + 15).div_ceil(unit) * unit
}

/// Makes the scratch disk at `p` (a new file): ext4 without a journal
/// (nothing on it outlives the VM) or room to grow, with every inode
/// table written now (the guest kernel has nothing to initialise later),
/// nothing kept back for root.
fn make_scratch(s: &ScratchDisk, p: &Path) -> Result<(), String> {
    let e = |err: std::io::Error| format!("making the scratch disk: {err}");
    let size = scratch_blocks(s.bytes, s.inodes) * SCRATCH_BLOCK;
    // Sparse, so nothing is taken yet: a VM whose disk could not be
    // filled to its quota here does not start (fails closed) rather than
    // meeting I/O errors later.
    if let Some(dir) = p.parent() {
        let st = sys::statvfs(&dir.to_string_lossy()).map_err(e)?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        if free < size {
            return Err(format!(
                "making the scratch disk: the host has {} MiB free for it, it takes {} MiB",
                free >> 20,
                size.div_ceil(1 << 20)
            ));
        }
    }
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)
        .map_err(e)?;
    f.set_len(size).map_err(e)?;
    drop(f);
    let inodes = scratch_inodes(s.bytes, s.inodes).to_string();
    let out = Command::new(&s.mkfs)
        .args([
            "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0", "-N",
        ])
        .arg(&inodes)
        .args([
            "-O",
            "^has_journal,^resize_inode",
            "-E",
            "lazy_itable_init=0,nodiscard",
            "-L",
            "scratch",
        ])
        .arg(p)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(e)?;
    if !out.status.success() {
        return Err(format!(
            "making the scratch disk: mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The scratch disk for the VM `cfg` describes, open for QEMU: made in
/// the snapshot being made, or made (cold) or copied from the snapshot
/// (restore: byte for byte the disk the golden guest has mounted) in the
/// store's `tmp` as `scratch-<monitor pid>-<random>` and unlinked there
/// at once (a name left by a monitor killed in between is removed when
/// the store is next opened).
fn scratch_disk(cfg: &VmmConfig) -> Result<OwnedFd, String> {
    let e = |err: std::io::Error| format!("the scratch disk: {err}");
    let open = |p: &Path| {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(p)
    };
    match &cfg.snapshot {
        Some(SnapMode::Create { dir }) => {
            let p = dir.join(SCRATCH_FILE);
            make_scratch(&cfg.scratch, &p)?;
            Ok(open(&p).map_err(e)?.into())
        }
        Some(SnapMode::Restore { dir, .. }) => {
            let src = fs::File::open(dir.join(SCRATCH_FILE)).map_err(e)?;
            let p = scratch_name(&cfg.scratch).map_err(e)?;
            let dst = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(&p)
                .map_err(e)?;
            let _ = fs::remove_file(&p);
            sys::copy_sparse(&src, &dst).map_err(e)?;
            Ok(dst.into())
        }
        None => {
            let p = scratch_name(&cfg.scratch).map_err(e)?;
            make_scratch(&cfg.scratch, &p)?;
            let f = open(&p).map_err(e)?;
            let _ = fs::remove_file(&p);
            Ok(f.into())
        }
    }
}

#[derive(Debug)]
struct VmLauncher {
    host: VmHost,
    artifacts: Artifacts,
    states: PathBuf,
    /// Where scratch disks are made: the store's `tmp`, on the store's
    /// file system (a disk, where the snapshots are), not the state
    /// directory's (/run: often tmpfs, host memory).
    scratch_tmp: PathBuf,
}

impl Launcher for VmLauncher {
    fn isolated(&self, policy: &Policy) -> Isolated {
        Isolated {
            backend: "microvm",
            isolation: IsolationLevel::Microvm,
            namespaces: ["vm", "pid", "mount", "network", "ipc", "uts", "cgroup"]
                .map(String::from)
                .to_vec(),
            landlock: true,
            overhead: (
                guest_memory_mib(policy.limits.memory_mib) - policy.limits.memory_mib
                    + QEMU_OVERHEAD_MIB,
                HOST_TASKS,
            ),
            unavailable_limits: vec![
                format!(
                    "memory: a cgroup inside the guest (no swap); the guest's RAM adds \
                     {GUEST_OVERHEAD_MIB} MiB for its kernel (at least {GUEST_MIN_MIB} MiB in \
                     all) and the host cgroup holds QEMU (+{QEMU_OVERHEAD_MIB} MiB)"
                ),
                "pids: a cgroup and RLIMIT_NPROC inside the guest (its tasks are not host tasks)"
                    .into(),
                format!(
                    "scratch: /tmp and /workspace share a disk of the VM's own ({} MiB, {} \
                     files; not the guest's RAM), /dev/shm is tmpfs in the guest's RAM; a \
                     session's /workspace is its own, served to the VM over virtio-fs",
                    policy.filesystem.scratch_mib, policy.filesystem.scratch_inodes
                ),
                format!(
                    "egress: each connection relayed over the VM's channel to the host's proxy \
                     (no network device in the guest), at most {} at once",
                    vmchan::EGRESS_STREAMS
                ),
            ]
            .into_iter()
            .chain((self.host.accel == Accel::Tcg).then(|| {
                "boundary: TCG is QEMU's software emulation, not hardware virtualisation \
                 (allowed by the operator for development and tests)"
                    .to_string()
            }))
            .collect(),
            pids_by_rlimit: true,
            // No descriptor leaves a VM: the forwarder relays through
            // sockets the guest's init hands it, one egress stream each.
            egress_relay: true,
            protect_pid1: false,
            // The guest's own cgroup ends a program over its memory: the
            // agent reads its oom_kill count (the host's sees none).
            guest_memory_events: true,
            accelerator: Some(self.host.accel.as_str()),
            snapshot: None,
            // A cold boot under TCG takes seconds, many more when the
            // host's cores are busy.
            start_timeout: Some(std::time::Duration::from_secs(match self.host.accel {
                Accel::Kvm => 30,
                Accel::Tcg => 180,
            })),
            // The guest's last output and its end cross the channel after
            // the agent's exit report may have: a guest slowed by a busy
            // host (seen under TCG beside a VM flooding its channel) took
            // longer than the engine's half second, and its output was
            // lost with the VM.
            output_grace: Some(std::time::Duration::from_secs(match self.host.accel {
                Accel::Kvm => 2,
                Accel::Tcg => 5,
            })),
            // The host cgroup holds QEMU: the guest's vCPU plus the
            // emulation, devices and channel around it (under TCG several
            // host cores for one guest's; a flood of its channel took 10 s
            // of host CPU in 6 s). The code's own CPU time is held to the
            // policy in the guest (RLIMIT_CPU); the host ends the VM at
            // this multiple of it.
            host_cpu_factor: Some(match self.host.accel {
                Accel::Kvm => 2,
                Accel::Tcg => 4,
            }),
        }
    }

    fn binds_workspace(&self) -> bool {
        // Served to the guest over virtio-fs by virtiofsd (a VM that
        // boots; a golden or restored one is a ModeLauncher's, which
        // binds none).
        self.host.virtiofsd.is_some()
    }

    fn launch(&self, l: &AgentLaunch<'_>) -> Result<Launched, SandboxError> {
        self.launch_as(l, None)
    }
}

/// Why a restore was refused before it started: its snapshot's guest was
/// configured with another view.
const STALE_VIEW: &str = "the snapshot was made for another view of the sandbox";

/// sha256 of a guest's configuration without what each VM gets afresh.
fn guest_view_digest(g: &VmGuestConfig) -> String {
    let mut g = g.clone();
    g.seed = String::new();
    g.clock = (0, 0);
    hex(&Sha256::digest(serde_json::to_vec(&g).unwrap_or_default()))
}

/// The host ids a golden VM's QEMU runs as: as root, ids of its own (just
/// below every other VM's), so no other VM's QEMU, should a guest take it
/// over, can write the files a golden VM is being saved into.
fn golden_ids(setup: (u32, u32)) -> (u32, u32) {
    if sys::geteuid() == 0 {
        (setup.0.saturating_sub(1), setup.1.saturating_sub(1))
    } else {
        setup
    }
}

/// A VM made into a golden snapshot or restored from one.
#[derive(Debug)]
struct ModeLauncher {
    base: Arc<VmLauncher>,
    mode: SnapMode,
    /// The snapshot restored from, for the result.
    snapshot: Option<String>,
}

impl Launcher for ModeLauncher {
    fn isolated(&self, policy: &Policy) -> Isolated {
        Isolated {
            snapshot: self.snapshot.clone(),
            ..self.base.isolated(policy)
        }
    }

    fn launch(&self, l: &AgentLaunch<'_>) -> Result<Launched, SandboxError> {
        self.base.launch_as(l, Some(&self.mode))
    }
}

impl VmLauncher {
    /// A session's workspace for one of its VMs: only for a VM that boots
    /// (a golden snapshot's memory is not shared with a file server, and a
    /// restore's is copy-on-write), only a directory that a session's own
    /// ids own ([`session_ids`]), which no VM's QEMU runs as.
    fn vm_workspace(&self, dir: &str, mode: Option<&SnapMode>) -> std::io::Result<VmWorkspace> {
        let refuse = |why: &str| std::io::Error::other(why.to_string());
        let Some(virtiofsd) = &self.host.virtiofsd else {
            return Err(refuse("virtiofsd is not installed"));
        };
        if mode.is_some() {
            return Err(refuse("a session's VM boots; it is never restored"));
        }
        let m = fs::symlink_metadata(dir)?;
        let ids = (m.uid(), m.gid());
        if !m.is_dir() || !is_qemu_uid(ids.0) || ids.1 != ids.0 || sys::geteuid() != 0 {
            return Err(refuse("the workspace is not a microVM session's"));
        }
        Ok(VmWorkspace {
            virtiofsd: virtiofsd.clone(),
            dir: dir.into(),
            ids,
        })
    }

    fn launch_as(
        &self,
        l: &AgentLaunch<'_>,
        mode: Option<&SnapMode>,
    ) -> Result<Launched, SandboxError> {
        let spawn = SandboxError::SpawnInit;
        let state = self.states.join(l.name);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&state)
            .map_err(spawn)?;
        let cleanup_state = state.clone();
        let made = (|| -> std::io::Result<PathBuf> {
            let mut seed = [0u8; 64];
            sys::getrandom(&mut seed)?;
            let v = l.view;
            let workspace = match &v.workspace {
                Some(dir) => Some(self.vm_workspace(dir, mode)?),
                None => None,
            };
            let (etc_files, files): (Vec<RoFile>, Vec<RoFile>) = v
                .files
                .iter()
                .cloned()
                .partition(|f| f.path.starts_with("/etc/"));
            let (etc_mounts, mounts): (Vec<RoMount>, Vec<RoMount>) = v
                .mounts
                .iter()
                .cloned()
                .partition(|m| m.target.starts_with("/etc/"));
            let cfg = VmmConfig {
                qemu: self.host.qemu.clone(),
                kernel: self.host.kernel.clone(),
                initrd: self.artifacts.initrd.clone(),
                root: self.artifacts.root.clone(),
                memory_mib: guest_memory_mib(l.policy.limits.memory_mib),
                cpus: (l.policy.limits.cpus.ceil() as u32).clamp(1, 16),
                accel: self.host.accel,
                qemu_ids: match mode {
                    Some(SnapMode::Create { .. }) => golden_ids(l.setup_ids),
                    _ => l.setup_ids,
                },
                kvm_gid: match self.host.accel {
                    Accel::Kvm => fs::metadata("/dev/kvm").ok().map(|m| m.gid()),
                    Accel::Tcg => None,
                },
                guest: VmGuestConfig {
                    root: InitConfig {
                        cgroup_tasks: Vec::new(),
                        mounts,
                        symlinks: v.symlinks.clone(),
                        files,
                        etc_files,
                        etc_mounts,
                        scratch_bytes: v.scratch_bytes,
                        scratch_inodes: v.scratch_inodes,
                        scratch_dir: None,
                        workspace_dir: None,
                        landlock_strict: false,
                        seccomp: Vec::new(),
                        broker: false,
                        egress: false,
                        zygote: false,
                    },
                    seed: hex(&seed),
                    clock: (0, 0),
                    memory_bytes: l.policy.limits.memory_mib << 20,
                    pids: l.policy.limits.pids,
                    egress: false,
                    workspace: workspace.is_some(),
                },
                console: std::env::var_os("AIRLOCK_VM_CONSOLE").map(PathBuf::from),
                snapshot: mode.cloned(),
                scratch: ScratchDisk {
                    mkfs: self.host.mkfs.clone(),
                    dir: self.scratch_tmp.clone(),
                    bytes: v.scratch_bytes,
                    inodes: v.scratch_inodes,
                },
                workspace,
            };
            // What a restore's guest already has: the view its golden VM
            // was configured with. Recorded by the golden VM, compared by
            // every restore (a change of the host's /etc, CA bundle or
            // runtimes that the key does not see makes it stale).
            let view = guest_view_digest(&cfg.guest);
            match mode {
                Some(SnapMode::Create { dir }) => fs::write(dir.join("guest.sha256"), &view)?,
                Some(SnapMode::Restore { guest_sha256, .. }) if *guest_sha256 != view => {
                    return Err(std::io::Error::other(STALE_VIEW));
                }
                _ => {}
            }
            let p = state.join("vm.json");
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&p)?;
            f.write_all(&serde_json::to_vec(&cfg).map_err(std::io::Error::other)?)?;
            Ok(p)
        })();
        let cfg_path = match made {
            Ok(p) => p,
            Err(e) => {
                let _ = fs::remove_dir_all(&state);
                return Err(spawn(e));
            }
        };
        let mut cmd = Command::new(l.agent_binary);
        cmd.arg(VMM_ARG).arg(&cfg_path).env_clear();
        let child = match l.spawn(&mut cmd) {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_dir_all(&state);
                return Err(spawn(e));
            }
        };
        Ok(Launched {
            child,
            cleanup: Some(Box::new(move || {
                let _ = fs::remove_dir_all(&cleanup_state);
            })),
        })
    }
}

// ---------------------------------------------------------------------
// The VM monitor

/// QEMU's arguments: the guest's port on `port_fd`, its serial console
/// (the kernel's warnings and the guest init's progress, read by the
/// monitor) on `console_fd`, or in the debugging file when one is named,
/// the scratch disk on `scratch_fds` (read-write, read-only), the
/// commands of a snapshot or the workspace's file server (never both) on
/// `fd7`.
fn qemu_args(
    cfg: &VmmConfig,
    port_fd: RawFd,
    console_fd: RawFd,
    scratch_fds: (RawFd, RawFd),
    fd7: RawFd,
) -> Vec<String> {
    let qmp_fd = fd7;
    let mut a: Vec<String> = Vec::new();
    let mut push = |v: &[&str]| a.extend(v.iter().map(|s| s.to_string()));
    let console = cfg
        .console
        .as_ref()
        .map(|p| p.to_string_lossy().replace(',', ",,"));
    let file = |dir: &Path, f: &str| dir.join(f).to_string_lossy().replace(',', ",,");
    match &cfg.snapshot {
        // A session's VM: its memory shared with the workspace's file
        // server (vhost-user maps the guest's queues and buffers), in an
        // anonymous file no path names.
        None if cfg.workspace.is_some() => push(&[
            "-object",
            &format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                cfg.memory_mib
            ),
            "-M",
            "microvm,rtc=off,memory-backend=mem",
        ]),
        None => push(&["-M", "microvm,rtc=off"]),
        Some(mode) => {
            // Guest memory in a file: the golden VM's shared (its pages
            // land in the file, which the save then skips), a restore's
            // mapped private and read-only (copy-on-write: the file is
            // neither read in nor ever written).
            let (dir, how) = match mode {
                SnapMode::Create { dir } => (dir, "share=on"),
                SnapMode::Restore { dir, .. } => (dir, "share=off,readonly=on,rom=off"),
            };
            push(&[
                "-object",
                &format!(
                    "memory-backend-file,id=mem,size={}M,mem-path={},{how}",
                    cfg.memory_mib,
                    file(dir, "mem")
                ),
                "-M",
                "microvm,rtc=off,memory-backend=mem",
            ]);
            // Commands (save; load) on a socket of the monitor's.
            push(&[
                "-chardev",
                &format!("socket,id=qmp,fd={qmp_fd}"),
                "-mon",
                "chardev=qmp,mode=control",
            ]);
            if let SnapMode::Restore { .. } = mode {
                push(&["-incoming", "defer"]);
            }
        }
    }
    match &console {
        None => push(&[
            "-chardev",
            &format!("socket,id=console,fd={console_fd}"),
            "-serial",
            "chardev:console",
        ]),
        Some(c) => push(&["-serial", &format!("file:{c}")]),
    }
    match cfg.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        // Under emulation, guest time follows executed instructions
        // (icount): a busy host cannot skew the guest kernel's timer
        // calibration at boot (seen to hang a guest in early boot).
        Accel::Tcg => push(&[
            "-accel",
            "tcg,tb-size=64",
            "-cpu",
            "max",
            "-icount",
            "shift=auto,sleep=on",
        ]),
    }
    let mem = cfg.memory_mib.to_string();
    let cpus = cfg.cpus.to_string();
    push(&["-m", &mem, "-smp", &cpus]);
    // Nothing but what is named here: no default devices, no network, no
    // display, no monitor, no configuration files, QEMU's own seccomp
    // sandbox on.
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-nic",
        "none",
        "-no-reboot",
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-msg",
        "timestamp=off",
    ]);
    let kernel = cfg.kernel.to_string_lossy().into_owned();
    let initrd = cfg.initrd.to_string_lossy().into_owned();
    push(&["-kernel", &kernel, "-initrd", &initrd]);
    push(&[
        "-append",
        &format!(
            "{} panic=-1 rdinit=/init -- {}",
            if console.is_some() {
                "console=ttyS0"
            } else {
                "console=ttyS0 quiet"
            },
            airlock_sandbox::vminit::VMINIT_ARG
        ),
    ]);
    push(&[
        "-device",
        "virtio-serial-device,max_ports=2",
        "-chardev",
        &format!("socket,id=port,fd={port_fd}"),
        "-device",
        &format!(
            "virtserialport,chardev=port,name={}",
            airlock_sandbox::vminit::PORT_NAME
        ),
    ]);
    // The root image: read-only for QEMU itself, so a guest that remounts
    // it read-write still cannot change it.
    // An I/O error on the host is the guest's (never a VM paused for ever).
    let root = cfg.root.to_string_lossy().replace(',', ",,");
    push(&[
        "-drive",
        &format!("file={root},if=none,id=root,format=raw,readonly=on,rerror=report"),
        "-device",
        &format!(
            "virtio-blk-device,drive=root,serial={}",
            airlock_sandbox::vminit::ROOT_SERIAL
        ),
        // The scratch disk, the monitor's descriptor: QEMU opens no path
        // of it. Nothing on it outlives the VM, so flushes are not waited
        // for.
        "-add-fd",
        &format!("fd={},set=1", scratch_fds.0),
        "-add-fd",
        &format!("fd={},set=1", scratch_fds.1),
        "-drive",
        "file=/dev/fdset/1,if=none,id=scratch,format=raw,cache=unsafe,werror=report,rerror=report,\
         file.locking=off",
        "-device",
        &format!(
            "virtio-blk-device,drive=scratch,serial={}",
            airlock_sandbox::vminit::SCRATCH_SERIAL
        ),
        "-object",
        "rng-random,id=rng,filename=/dev/urandom",
        "-device",
        "virtio-rng-device,rng=rng",
    ]);
    if cfg.workspace.is_some() {
        // The workspace's file server on the monitor's connected socket.
        push(&[
            "-chardev",
            &format!("socket,id=ws,fd={fd7}"),
            "-device",
            &format!(
                "vhost-user-fs-device,chardev=ws,tag={}",
                airlock_sandbox::vminit::WORKSPACE_TAG
            ),
        ]);
    }
    a
}

/// The first of the host uids VMs' QEMU run as (as root): one per running
/// VM, [`QEMU_UIDS`] of them, above the ranges distributions and
/// container runtimes hand out. No two running VMs' QEMU share a uid:
/// whatever a taken-over QEMU could reach as its user (a file it created,
/// its user's keyring, per-user limits) is not another VM's.
pub const QEMU_UID_BASE: u32 = 0x7000_0000;
/// How many uids [`QEMU_UID_BASE`] starts.
pub const QEMU_UIDS: u32 = 1 << 16;
/// Where monitors hold their uid: `<n>` locked (flock) by the monitor of
/// the VM whose QEMU runs as `QEMU_UID_BASE + n`, released when it ends
/// (however it ends).
const QEMU_UID_LOCKS: &str = "/run/airlock/vm-uids";

/// Whether `uid` is one of [`QEMU_UIDS`].
fn is_qemu_uid(uid: u32) -> bool {
    (QEMU_UID_BASE..QEMU_UID_BASE + QEMU_UIDS).contains(&uid)
}

/// The host ids of a microVM session (uid and gid alike, one of the QEMU
/// uids, which no VM's QEMU takes while the returned lock is held): its
/// workspace is theirs, and the virtiofsd that serves it to the session's
/// VMs runs as them, so what one session's file server could reach as its
/// user is not another's, nor any QEMU's.
pub fn session_ids() -> Result<(fs::File, u32), String> {
    own_qemu_uid()
}

/// Makes `dir` (0700: root's own state) without making its missing parents
/// 0700 as well: a recursive `DirBuilder` gives every parent the leaf's
/// mode, and the run directory above must stay traversable (0711) for the
/// other backends' mapped users (on a fresh host the first microVM made
/// /run/airlock 0700 and the OCI backend then refused to start).
fn private_dir(dir: &Path) -> std::io::Result<()> {
    if let Some(parent) = dir.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(parent)?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        r => r,
    }
}

/// A uid for this VM's QEMU and the lock that holds it.
fn own_qemu_uid() -> Result<(fs::File, u32), String> {
    let e = |err: std::io::Error| format!("a uid for QEMU: {err}");
    private_dir(Path::new(QEMU_UID_LOCKS)).map_err(e)?;
    let m = fs::symlink_metadata(QEMU_UID_LOCKS).map_err(e)?;
    if !m.is_dir() || m.uid() != 0 || m.mode() & 0o022 != 0 {
        return Err(format!(
            "a uid for QEMU: {QEMU_UID_LOCKS} must be a directory of root's, writable by it only"
        ));
    }
    let mut rnd = [0u8; 4];
    sys::getrandom(&mut rnd).map_err(e)?;
    let start = u32::from_le_bytes(rnd) % QEMU_UIDS;
    // Bounded: far more tries than VMs a host runs at once.
    for i in 0..4096 {
        let n = (start + i) % QEMU_UIDS;
        let f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(Path::new(QEMU_UID_LOCKS).join(n.to_string()))
            .map_err(e)?;
        // SAFETY: flock on a descriptor this function owns; LOCK_NB never
        // blocks.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok((f, QEMU_UID_BASE + n));
        }
    }
    Err("a uid for QEMU: every one tried is in use".into())
}

/// QEMU's Landlock ruleset (applied in its process just before the exec):
/// it may read and run its binary and the system's libraries, read the
/// system's firmware and data (`/usr/share`), the guest's kernel,
/// initramfs and root image, the snapshot it restores (the one it makes it
/// may write too), /proc (the host's, which only a rootless QEMU, without
/// namespaces, reaches: as root QEMU mounts a /proc of its own, which the
/// rule does not cover, so it reads none), /dev/urandom, /dev/null and (under KVM)
/// /dev/kvm and /sys, write the debugging console file when one is named
/// (made here for QEMU's `ids`); nothing else of the host's files (other
/// VMs' state and snapshots, the server's data, /etc, /home), whatever its
/// uid could read. No TCP at all, no abstract socket or signal beyond its
/// own domain (what its namespaces already deny as root; all a rootless
/// QEMU has). None where the kernel has no Landlock (the other walls
/// stand). The descriptor is placed above 64, out of the way of the ones
/// QEMU is given.
fn qemu_landlock(cfg: &VmmConfig, ids: (u32, u32)) -> Result<Option<OwnedFd>, String> {
    use landlock::{ABI, Access, AccessFs};
    let abi = ABI::V5;
    let all = AccessFs::from_all(abi);
    let read = AccessFs::from_read(abi);
    let dev = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev;
    let mut rules: Vec<(PathBuf, landlock::BitFlags<AccessFs>)> = SYSTEM_READ
        .into_iter()
        .map(|p| (PathBuf::from(p), read))
        .collect();
    for p in [&cfg.qemu, &cfg.kernel, &cfg.initrd, &cfg.root] {
        rules.push((p.clone(), read));
    }
    rules.push(("/dev/urandom".into(), AccessFs::ReadFile.into()));
    rules.push(("/dev/null".into(), dev));
    if cfg.accel == Accel::Kvm {
        rules.push(("/dev/kvm".into(), dev));
        rules.push(("/sys".into(), read));
    }
    match &cfg.snapshot {
        Some(SnapMode::Create { dir }) => rules.push((dir.clone(), all)),
        Some(SnapMode::Restore { dir, .. }) => rules.push((dir.clone(), read)),
        None => {}
    }
    if let Some(console) = &cfg.console {
        // The file only (made now, QEMU's), not its directory.
        let f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(console)
            .map_err(|err| format!("the console file: {err}"))?;
        if sys::geteuid() == 0 {
            std::os::unix::fs::fchown(&f, Some(ids.0), Some(ids.1))
                .map_err(|err| format!("the console file: {err}"))?;
        }
        rules.push((console.clone(), AccessFs::WriteFile | AccessFs::Truncate));
    }
    landlock_fd(rules)
}

/// The system's libraries and data, read-only: what QEMU and virtiofsd
/// load.
const SYSTEM_READ: [&str; 9] = [
    "/usr/lib",
    "/usr/lib64",
    "/lib",
    "/lib64",
    "/usr/local/lib",
    "/usr/share",
    "/usr/local/share",
    "/etc/ld.so.cache",
    "/proc",
];

/// A Landlock ruleset that handles every file-system and network access
/// and scopes signals and abstract sockets, allowing `rules` only; its
/// descriptor above 64 (None where the kernel has no Landlock).
fn landlock_fd(
    rules: Vec<(PathBuf, landlock::BitFlags<landlock::AccessFs>)>,
) -> Result<Option<OwnedFd>, String> {
    use landlock::{
        ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
        RulesetAttr, RulesetCreatedAttr, Scope,
    };
    let e = |err: landlock::RulesetError| format!("Landlock ruleset: {err}");
    let abi = ABI::V5;
    let all = AccessFs::from_all(abi);
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)
        .map_err(e)?
        .handle_access(AccessNet::from_all(abi))
        .map_err(e)?
        .scope(Scope::from_all(ABI::V6))
        .map_err(e)?
        .create()
        .map_err(e)?;
    for (path, access) in rules {
        // What this host does not have (/lib64 on some) needs no rule.
        let Ok(fd) = PathFd::new(&path) else {
            continue;
        };
        ruleset = ruleset.add_rule(PathBeneath::new(fd, access)).map_err(e)?;
    }
    let fd: Option<OwnedFd> = ruleset.into();
    let Some(fd) = fd else {
        return Ok(None);
    };
    let high = sys::dup_above_cloexec(fd.as_raw_fd(), 64)
        .map_err(|err| format!("Landlock ruleset: {err}"))?;
    // SAFETY: `high` was just made by F_DUPFD_CLOEXEC and is owned by
    // nothing else.
    Ok(Some(unsafe { sys::owned(high) }))
}

/// virtiofsd's Landlock ruleset: its binary and the system's libraries,
/// its own /proc (a rule added in its process once that is mounted), and
/// the workspace, where it may do anything but execute and make devices;
/// nothing else of the host's files, no network, no signal or abstract
/// socket beyond its own domain. Refused where the kernel has no Landlock
/// (the file server is the part of a session's VM a guest kernel talks to
/// directly: it never runs without this wall).
fn virtiofsd_landlock(w: &VmWorkspace) -> Result<OwnedFd, String> {
    use landlock::{ABI, Access, AccessFs};
    let read = AccessFs::from_read(ABI::V5);
    let mut rules: Vec<(PathBuf, landlock::BitFlags<AccessFs>)> = SYSTEM_READ
        .into_iter()
        .map(|p| (PathBuf::from(p), read))
        .collect();
    rules.push((w.virtiofsd.clone(), read));
    rules.push((
        w.dir.clone(),
        AccessFs::from_all(ABI::V5)
            & !(AccessFs::Execute | AccessFs::MakeChar | AccessFs::MakeBlock),
    ));
    landlock_fd(rules)?.ok_or_else(|| "virtiofsd: this kernel has no Landlock".to_string())
}

/// Descriptors virtiofsd may hold (one per file the guest has looked up):
/// far more than a workspace's files, bounded.
const VIRTIOFSD_FILES: u64 = 1 << 16;

/// Where virtiofsd finds the workspace in its own root.
const VIRTIOFSD_SHARED: &str = "/ws";

/// virtiofsd's own root, made in its process before its exec and pivoted
/// into: its binary, the system's libraries and loader cache read-only,
/// its own /proc (`hidepid=invisible`: QEMU, beside it in the VM's pid
/// namespace, is not there), the workspace at [`VIRTIOFSD_SHARED`],
/// nothing else of the host's tree (no other session's workspace, no
/// /run, no /etc), read-only but for the workspace. Whatever name a guest
/// kernel sends, virtiofsd has nowhere else to go; Landlock walls the same
/// paths in again. Everything is made here, before the fork: the child
/// only calls mkdir, open, mount, pivot_root and chdir on these strings.
struct VirtiofsdRoot {
    /// The mount point of its root (in the VM's state directory).
    root: std::ffi::CString,
    /// Directories to make in the root's tmpfs, parents first.
    dirs: Vec<std::ffi::CString>,
    /// Empty files to make there (file bind targets).
    files: Vec<std::ffi::CString>,
    /// Read-only binds (host path, path in the root).
    binds: Vec<(std::ffi::CString, std::ffi::CString)>,
    /// The workspace's bind target and /proc's mount point.
    ws: std::ffi::CString,
    proc_dir: std::ffi::CString,
}

fn virtiofsd_root(binary: &Path, state: &Path) -> Result<VirtiofsdRoot, String> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let e = |err: std::io::Error| format!("virtiofsd's root: {err}");
    let root = state.join("fs-root");
    fs::DirBuilder::new().mode(0o755).create(&root).map_err(e)?;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| "virtiofsd's root: a path with NUL".to_string())
    };
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let mut dirs: Vec<PathBuf> = Vec::new();
    let add_dir = |d: &Path, dirs: &mut Vec<PathBuf>| {
        let mut chain: Vec<PathBuf> = d
            .ancestors()
            .take_while(|a| *a != Path::new("/"))
            .map(Path::to_path_buf)
            .collect();
        chain.reverse();
        for a in chain {
            if !dirs.contains(&a) {
                dirs.push(a);
            }
        }
    };
    let mut binds = Vec::new();
    let mut files = Vec::new();
    // Directories under their own names (the loader looks in /lib, the
    // ELF interpreter is named through /lib64), their targets resolved.
    for d in ["/usr/lib", "/usr/lib64", "/lib", "/lib64"] {
        let Ok(real) = fs::canonicalize(d) else {
            continue;
        };
        if !real.is_dir() {
            continue;
        }
        add_dir(Path::new(d), &mut dirs);
        binds.push((c(&real)?, c(&inside(Path::new(d)))?));
    }
    for f in [Path::new("/etc/ld.so.cache"), binary] {
        let Ok(real) = fs::canonicalize(f) else {
            continue;
        };
        if let Some(parent) = f.parent() {
            add_dir(parent, &mut dirs);
        }
        files.push(c(&inside(f))?);
        binds.push((c(&real)?, c(&inside(f))?));
    }
    add_dir(Path::new(VIRTIOFSD_SHARED), &mut dirs);
    add_dir(Path::new("/proc"), &mut dirs);
    Ok(VirtiofsdRoot {
        root: c(&root)?,
        dirs: dirs
            .iter()
            .map(|d| c(&inside(d)))
            .collect::<Result<_, _>>()?,
        files,
        binds,
        ws: c(&inside(Path::new(VIRTIOFSD_SHARED)))?,
        proc_dir: c(&inside(Path::new("/proc")))?,
    })
}

/// Confines `cmd` as virtiofsd for `w` (see [`start_virtiofsd`]): its own
/// root, namespaces, the session's ids, no capability, no_new_privs,
/// Landlock, the parent-death signal; `listen_fd` (when not -1) at
/// descriptor 3. The returned ruleset must stay open until the spawn.
fn confine_virtiofsd(
    cmd: &mut Command,
    w: &VmWorkspace,
    binary: &Path,
    state: &Path,
    monitor_fd: RawFd,
    listen_fd: RawFd,
) -> Result<OwnedFd, String> {
    let e = |err: std::io::Error| format!("virtiofsd: {err}");
    let jail = virtiofsd_root(binary, state)?;
    let ws_src = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(w.dir.as_os_str()))
        .map_err(|_| "virtiofsd: a path with NUL".to_string())?;
    let landlock = virtiofsd_landlock(w)?;
    let landlock_fd = landlock.as_raw_fd();
    let (uid, gid) = w.ids;
    // Within the hard limit this process has (raising it takes a
    // capability hosts and containers often withhold).
    let files = sys::get_rlimit(libc::RLIMIT_NOFILE)
        .map(|(_, hard)| hard.min(VIRTIOFSD_FILES))
        .map_err(e)?;
    let fail = || std::io::Error::last_os_error();
    // SAFETY: the closure runs between fork and exec and calls only
    // async-signal-safe syscalls on strings and values made before the
    // fork (no allocation).
    unsafe {
        cmd.pre_exec(move || {
            if listen_fd >= 0 {
                let moved = sys::dup_above_cloexec(listen_fd, 16)?;
                sys::dup2(moved, 3)?;
            }
            sys::unshare(
                libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS,
            )?;
            sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
            // Its root: a small tmpfs, the binds, the workspace, /proc.
            sys::mount(
                Some(c"virtiofsd"),
                &jail.root,
                Some(c"tmpfs"),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                Some(c"size=64k,nr_inodes=256,mode=0755"),
            )?;
            for d in &jail.dirs {
                if libc::mkdir(d.as_ptr(), 0o755) != 0 {
                    return Err(fail());
                }
            }
            for f in &jail.files {
                let fd = libc::open(
                    f.as_ptr(),
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o444,
                );
                if fd < 0 {
                    return Err(fail());
                }
                libc::close(fd);
            }
            let ro = libc::MS_REMOUNT
                | libc::MS_BIND
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV;
            for (src, dst) in &jail.binds {
                sys::mount(Some(src), dst, None, libc::MS_BIND, None)?;
                sys::mount(None, dst, None, ro, None)?;
            }
            sys::mount(Some(&ws_src), &jail.ws, None, libc::MS_BIND, None)?;
            sys::mount(
                None,
                &jail.ws,
                None,
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                None,
            )?;
            sys::mount(
                Some(c"proc"),
                &jail.proc_dir,
                Some(c"proc"),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                Some(c"hidepid=invisible"),
            )?;
            if libc::chdir(jail.root.as_ptr()) != 0 {
                return Err(fail());
            }
            sys::pivot_root(c".", c".")?;
            sys::umount2(c".", libc::MNT_DETACH)?;
            if libc::chdir(c"/".as_ptr()) != 0 {
                return Err(fail());
            }
            sys::mount(
                None,
                c"/",
                None,
                libc::MS_REMOUNT
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                Some(c"size=64k,nr_inodes=256,mode=0755"),
            )?;
            // It works from the shared directory (virtiofsd probes openat2
            // on its working directory).
            if libc::chdir(c"/ws".as_ptr()) != 0 {
                return Err(fail());
            }
            let lim = libc::rlimit {
                rlim_cur: files,
                rlim_max: files,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(fail());
            }
            if libc::setgroups(0, std::ptr::null()) != 0 {
                return Err(fail());
            }
            sys::set_ids(uid, gid)?;
            sys::set_no_new_privs()?;
            // Its own /proc, mounted just now (a rule for the host's does
            // not cover it): read-only.
            let proc_fd = libc::open(c"/proc".as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
            if proc_fd < 0 {
                return Err(fail());
            }
            sys::landlock_allow_beneath(landlock_fd, proc_fd, sys::LANDLOCK_READ)?;
            libc::close(proc_fd);
            if libc::syscall(libc::SYS_landlock_restrict_self, landlock_fd, 0u32) != 0 {
                return Err(fail());
            }
            sys::set_parent_death_kill()?;
            let mut alive = libc::pollfd {
                fd: monitor_fd,
                events: libc::POLLIN,
                revents: 0,
            };
            if libc::poll(&mut alive, 1, 0) != 0 {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            sys::cloexec_from(4)?;
            Ok(())
        });
    }
    Ok(landlock)
}

/// Starts virtiofsd for a session's VM, serving the workspace on a socket
/// whose other end (connected already) is returned for QEMU. It runs as
/// the session's ids (the guest's sandbox user shown as theirs, every
/// other guest id squashed to them), in the VM's pid namespace (beside
/// QEMU, under another uid: neither can signal or trace the other, and its
/// /proc hides QEMU) and mount, network, IPC and UTS namespaces of its
/// own, in a root of its own ([`VirtiofsdRoot`]), with no capability,
/// no_new_privs, its Landlock ruleset and its own seccomp filter (fatal
/// on anything else), dying with the monitor. Extended attributes, ACLs,
/// file handles and caching are off: the guest gets plain files, and what
/// the files API changes it sees at once.
fn start_virtiofsd(
    w: &VmWorkspace,
    state: &Path,
    monitor_fd: RawFd,
) -> Result<(std::process::Child, OwnedFd, Option<OwnedFd>), String> {
    let e = |err: std::io::Error| format!("virtiofsd: {err}");
    if sys::geteuid() != 0 {
        return Err("virtiofsd: a session's VM needs root".into());
    }
    let binary = fs::canonicalize(&w.virtiofsd).map_err(e)?;
    let sock = state.join("fs.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).map_err(e)?;
    let connected = std::os::unix::net::UnixStream::connect(&sock);
    let _ = fs::remove_file(&sock);
    let qemu_end = OwnedFd::from(connected.map_err(e)?);
    let (su, sg) = (
        airlock_sandbox::launch::SANDBOX_UID,
        airlock_sandbox::launch::SANDBOX_GID,
    );
    let (uid, gid) = w.ids;
    let mut cmd = Command::new(&binary);
    cmd.arg("--fd=3")
        .arg(format!("--shared-dir={VIRTIOFSD_SHARED}"))
        .args([
            "--sandbox=none",
            "--seccomp=kill",
            "--inode-file-handles=never",
            "--cache=never",
            "--no-announce-submounts",
            "--thread-pool-size=0",
            "--rlimit-nofile=0",
            "--log-level=error",
        ])
        .arg(format!("--translate-uid=map:{su}:{uid}:1"))
        .arg(format!("--translate-uid=squash-guest:0:{uid}:{su}"))
        .arg(format!(
            "--translate-uid=squash-guest:{}:{uid}:{}",
            su + 1,
            u32::MAX - su - 1
        ))
        .arg(format!("--translate-gid=map:{sg}:{gid}:1"))
        .arg(format!("--translate-gid=squash-guest:0:{gid}:{sg}"))
        .arg(format!(
            "--translate-gid=squash-guest:{}:{gid}:{}",
            sg + 1,
            u32::MAX - sg - 1
        ))
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let _ruleset = confine_virtiofsd(
        &mut cmd,
        w,
        &binary,
        state,
        monitor_fd,
        listener.as_raw_fd(),
    )?;
    let mut child = cmd
        .spawn()
        .map_err(|err| format!("virtiofsd does not start: {err}"))?;
    drop(listener);
    // Its stderr, drained by the monitor's loop as it comes (a guest
    // that makes it log must not fill the pipe and stall its one worker).
    let said = child.stderr.take().map(OwnedFd::from);
    Ok((child, qemu_end, said))
}

/// A child killed and waited for when dropped (the monitor never leaves
/// one behind, however it returns).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads what `src` has now (0 when nothing); at its end, or when it
/// fails, it is dropped, so it is polled no more.
/// The byte a relay request and its answer carry (the proxy's
/// `airlock_egress::RELAY_REQUEST`, the forwarder's).
const RELAY_REQUEST: u8 = airlock_sandbox::relay::RELAY_REQUEST;

/// The proxy's answer to a relay request: the host end of a connection's
/// socket; None when the proxy is gone or answered otherwise.
fn relay_answer(chan: Option<&OwnedFd>) -> Option<OwnedFd> {
    let mut b = [0u8; 1];
    let (n, mut fds) = sys::recv_with_fds(chan?.as_raw_fd(), &mut b, 1).ok()?;
    (n == 1 && b[0] == RELAY_REQUEST && fds.len() == 1).then(|| fds.remove(0))
}

fn read_some(src: &mut Option<OwnedFd>, buf: &mut [u8]) -> usize {
    let Some(fd) = src else { return 0 };
    match sys::read_fd(fd.as_raw_fd(), buf) {
        Ok(n) if n > 0 => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        _ => {
            *src = None;
            0
        }
    }
}

/// Entry point of `airlock __airlock-vmm CONFIG`: starts QEMU and relays
/// the sandbox's channels over the guest's port until QEMU ends. Never
/// returns.
pub fn vmm_main(args: &[String]) -> ! {
    let code = match vmm(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("airlock vm: {e}");
            1
        }
    };
    sys::exit_now(code)
}

fn vmm(args: &[String]) -> Result<i32, String> {
    let [path] = args else {
        return Err("usage: __airlock-vmm CONFIG".into());
    };
    // Die with the engine's runtime thread (set again: this is a fresh
    // exec, but the launcher set it before).
    sys::set_parent_death_kill().map_err(|e| e.to_string())?;
    let mut text = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(64 << 20).read_to_end(&mut text))
        .map_err(|e| format!("configuration: {e}"))?;
    let cfg: VmmConfig =
        serde_json::from_slice(&text).map_err(|e| format!("configuration: {e}"))?;
    // The agent image at 6 is not needed here (the guest has its own copy).
    sys::close_unowned(6);
    sys::close_from(7).map_err(|e| e.to_string())?;
    let (host_port, qemu_port) =
        std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
    let (host_console, qemu_console) =
        std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
    let qemu_fd = qemu_port.as_raw_fd();
    let console_fd = qemu_console.as_raw_fd();
    // A golden or restored VM's QEMU takes commands (save, load) on a
    // socket at 7.
    let creating = matches!(cfg.snapshot, Some(SnapMode::Create { .. }));
    let (host_qmp, qemu_qmp) = if cfg.snapshot.is_some() {
        let (h, q) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
        (Some(OwnedFd::from(h)), Some(q))
    } else {
        (None, None)
    };
    let qmp_fd = qemu_qmp.as_ref().map_or(-1, |q| q.as_raw_fd());
    let scratch = scratch_disk(&cfg)?;
    // QEMU asks its descriptor set for a read-only descriptor too (while
    // it probes the disk, before it takes write permission).
    let scratch_ro: OwnedFd = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", scratch.as_raw_fd()))
        .map_err(|e| format!("the scratch disk: {e}"))?
        .into();
    let (scratch_fd, scratch_ro_fd) = (scratch.as_raw_fd(), scratch_ro.as_raw_fd());
    let keep_below: u32 = if cfg.snapshot.is_some() || cfg.workspace.is_some() {
        8
    } else {
        7
    };
    let mut cmd = Command::new(&cfg.qemu);
    cmd.args(qemu_args(&cfg, 3, 4, (5, 6), 7))
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let kvm_gid = cfg.kvm_gid;
    let as_root = sys::geteuid() == 0;
    // As root, a uid no other running VM's QEMU has (held until this
    // monitor ends); the group stays the configured one (the snapshot
    // files QEMU reads are that group's).
    let (_uid_lock, uid, gid) = match as_root {
        true => {
            let (lock, uid) = own_qemu_uid()?;
            (Some(lock), uid, cfg.qemu_ids.1)
        }
        false => (None, cfg.qemu_ids.0, cfg.qemu_ids.1),
    };
    let landlock = qemu_landlock(&cfg, (uid, gid))?;
    let landlock_fd = landlock.as_ref().map_or(-1, |f| f.as_raw_fd());
    // QEMU is the part of a microVM a guest attacks: it runs as pid 1 of a
    // pid namespace of its own (it cannot name, signal or trace another
    // VM's QEMU; a session's VM shares it with its virtiofsd, which is
    // then pid 1, under another uid) with its own /proc, no network (an empty network
    // namespace), its own IPC and UTS namespaces, as the unprivileged
    // user, with no_new_privs, under QEMU's own seccomp sandbox.
    if as_root {
        sys::unshare(libc::CLONE_NEWPID).map_err(|e| format!("pid namespace: {e}"))?;
    }
    // Taken before the fork: a monitor that dies before QEMU's parent-death
    // signal is set is seen through it (QEMU's parent is outside its pid
    // namespace, so getppid() cannot tell).
    let monitor = sys::pidfd_open(std::process::id() as libc::pid_t).map_err(|e| e.to_string())?;
    let monitor_fd = monitor.as_raw_fd();
    // A session's workspace: its file server first (QEMU connects to it
    // as it starts), ended with this monitor's VM.
    let (virtiofsd, ws_end) = match &cfg.workspace {
        Some(w) => {
            let state = Path::new(path).parent().unwrap_or(Path::new("/"));
            let (child, end, said) = start_virtiofsd(w, state, monitor_fd)?;
            (Some((Reaped(child), said)), Some(end))
        }
        None => (None, None),
    };
    // QEMU's descriptor 7: the snapshot's commands or the file server.
    let fd7 = match (&ws_end, qmp_fd) {
        (Some(end), _) => end.as_raw_fd(),
        (None, fd) => fd,
    };
    // SAFETY: the closure runs between fork and exec and calls only
    // async-signal-safe syscalls (no allocation: values copied in, literals).
    unsafe {
        cmd.pre_exec(move || {
            // All moved out of the way first: no dup2 below may land on
            // a descriptor not yet moved.
            let moved = sys::dup_above_cloexec(qemu_fd, 16)?;
            let moved_console = sys::dup_above_cloexec(console_fd, 16)?;
            let moved_scratch = sys::dup_above_cloexec(scratch_fd, 16)?;
            let moved_scratch_ro = sys::dup_above_cloexec(scratch_ro_fd, 16)?;
            let moved_qmp = match fd7 {
                -1 => -1,
                fd => sys::dup_above_cloexec(fd, 16)?,
            };
            sys::dup2(moved, 3)?;
            sys::dup2(moved_console, 4)?;
            sys::dup2(moved_scratch, 5)?;
            sys::dup2(moved_scratch_ro, 6)?;
            if moved_qmp >= 0 {
                sys::dup2(moved_qmp, 7)?;
            }
            if as_root {
                sys::unshare(
                    libc::CLONE_NEWNS
                        | libc::CLONE_NEWNET
                        | libc::CLONE_NEWIPC
                        | libc::CLONE_NEWUTS,
                )?;
                sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
                sys::mount(
                    Some(c"proc"),
                    c"/proc",
                    Some(c"proc"),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    None,
                )?;
                let groups: [libc::gid_t; 1] = [kvm_gid.unwrap_or(gid)];
                let n = usize::from(kvm_gid.is_some());
                if libc::setgroups(n, groups.as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                sys::set_ids(uid, gid)?;
            }
            sys::set_no_new_privs()?;
            // Last of the file system: from here QEMU opens only what
            // its ruleset names (the ruleset's descriptor is close-on-exec).
            if landlock_fd >= 0
                && libc::syscall(libc::SYS_landlock_restrict_self, landlock_fd, 0u32) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // After the change of ids, which clears it: QEMU dies with the
            // monitor (and the monitor with its engine), never outliving
            // the sandbox; a monitor already gone is caught here.
            sys::set_parent_death_kill()?;
            let mut alive = libc::pollfd {
                fd: monitor_fd,
                events: libc::POLLIN,
                revents: 0,
            };
            if libc::poll(&mut alive, 1, 0) != 0 {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            // The monitor's channels above QEMU's (and the pidfd) must
            // not reach QEMU: closed by the exec (not here, where the
            // spawn's pipe for an exec error is among them).
            sys::cloexec_from(keep_below)?;
            Ok(())
        });
    }
    let mut qemu = cmd
        .spawn()
        .map_err(|e| format!("QEMU does not start: {e}"))?;
    drop((
        qemu_port,
        qemu_console,
        qemu_qmp,
        scratch,
        scratch_ro,
        ws_end,
    ));
    sys::set_nonblocking(host_console.as_raw_fd()).map_err(|e| e.to_string())?;
    let mut host_console = Some(OwnedFd::from(host_console));
    let qemu_err = qemu.stderr.take();
    let pidfd = sys::pidfd_open(qemu.id() as libc::pid_t).map_err(|e| e.to_string())?;
    // SAFETY: the launcher placed the sandbox's stdio at 0-2, the control
    // socket at 3 and the broker and egress channels (or /dev/null) at 4
    // and 5; nothing else in this process owns them.
    let (stdin, stdout, stderr, ctrl, broker) = unsafe {
        (
            sys::owned(0),
            sys::owned(1),
            sys::owned(2),
            sys::owned(3),
            sys::owned(4),
        )
    };
    // SAFETY: as above, descriptor 5 is the egress channel or /dev/null;
    // nothing else in this process owns it.
    let egress = unsafe { sys::owned(5) };
    let mut egress = sys::is_socket(egress.as_raw_fd()).then_some(egress);
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| e.to_string());
    let broker_pair = if sys::is_socket(broker.as_raw_fd()) {
        let w = dup(&broker)?;
        (Source::Fd(broker), Sink::Fd(w))
    } else {
        drop(broker);
        (Source::None, Sink::None)
    };
    let mut guest = cfg.guest.clone();
    guest.root.broker = !matches!(broker_pair.0, Source::None);
    guest.egress = egress.is_some();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    guest.clock = (now.as_secs(), now.subsec_nanos());
    let guest_cfg = serde_json::to_vec(&guest).map_err(|e| e.to_string())?;
    let ctrl_w = dup(&ctrl)?;
    // This process's own messages go to the sandbox's stderr (what the
    // engine reports as the runtime's words when the agent never starts).
    let report = dup(&stderr)?;
    let restoring = match &cfg.snapshot {
        Some(SnapMode::Restore { transcript, .. }) => Some(transcript.clone()),
        _ => None,
    };
    let broker_replay = match (&restoring, &broker_pair.0) {
        (Some(_), Source::Fd(b)) => Some(dup(b)?),
        _ => None,
    };
    // A restored guest is configured already and its control stream
    // starts after the replay below.
    let (vm_src, ctrl_pair, ctrl_replay) = match &restoring {
        None => (
            Source::Bytes(guest_cfg, 0),
            (Source::Fd(ctrl), Sink::Fd(ctrl_w)),
            None,
        ),
        Some(_) => (
            Source::None,
            (Source::None, Sink::None),
            Some((ctrl, ctrl_w)),
        ),
    };
    let mut mux = Mux::new(
        host_port.into(),
        vec![
            (vm_src, Sink::Bytes(Vec::new(), 4096)),
            ctrl_pair,
            (Source::Fd(stdin), Sink::None),
            (Source::None, Sink::Fd(stdout)),
            (Source::None, Sink::Fd(stderr)),
            broker_pair,
        ],
    )
    .map_err(|e| e.to_string())?;
    let mut report = fs::File::from(report);
    // The guest's agent has spoken (a restored one did so in its golden
    // VM, replayed here).
    let mut spoken = false;
    let mut host_qmp = host_qmp;
    if let (Some(transcript), Some((ctrl, ctrl_w))) = (&restoring, ctrl_replay) {
        // The saved devices loaded (the memory is mapped already); the VM
        // runs once they are.
        let loaded = match (&cfg.snapshot, host_qmp.take()) {
            (Some(SnapMode::Restore { dir, .. }), Some(q)) => {
                snapshot::Qmp::new(q).load(&dir.join("state"))
            }
            _ => Err("no control socket".into()),
        };
        if let Err(e) = loaded {
            let _ = writeln!(report, "airlock vm: restoring the snapshot: {e}");
            let _ = qemu.kill();
            let _ = qemu.wait();
            return Ok(1);
        }
        // Fresh entropy and the host's clock, first thing.
        let mut payload = [0u8; vmchan::RESUME_LEN];
        sys::getrandom(&mut payload[..64]).map_err(|e| e.to_string())?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        payload[64..72].copy_from_slice(&now.as_secs().to_le_bytes());
        payload[72..76].copy_from_slice(&now.subsec_nanos().to_le_bytes());
        mux.resume(&payload);
        // The guest answers once it has reseeded and set its clock:
        // nothing is replayed to the engine for a VM that did not resume.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut resumed = Ok(());
        while !mux.resumed() {
            let qemu_gone = match mux.step(&[(pidfd.as_raw_fd(), libc::POLLIN)], 100) {
                Ok(rev) => rev[0] != 0,
                Err(e) => {
                    resumed = Err(e.to_string());
                    break;
                }
            };
            if qemu_gone || std::time::Instant::now() > end {
                resumed = Err("the restored guest did not resume".to_string());
                break;
            }
        }
        if let Err(e) = resumed.and_then(|()| {
            snapshot::replay(
                transcript,
                &ctrl,
                broker_replay.as_ref(),
                std::time::Duration::from_secs(60),
            )
        }) {
            let _ = writeln!(report, "airlock vm: restoring the snapshot: {e}");
            let _ = qemu.kill();
            let _ = qemu.wait();
            return Ok(1);
        }
        drop(broker_replay);
        mux.set_stream(stream::CTRL, Source::Fd(ctrl), Sink::Fd(ctrl_w))
            .map_err(|e| e.to_string())?;
        spoken = true;
    }
    if creating {
        mux.record(&[stream::CTRL, stream::BROKER], snapshot::MAX_TRANSCRIPT);
    }
    if egress.is_some() {
        mux.allow_egress();
    }
    // Egress streams the guest opened whose socket the proxy has not sent
    // yet, in the order asked (it answers in order).
    let mut asked: std::collections::VecDeque<u8> = std::collections::VecDeque::new();
    let mut quiescing = false;
    let mut save = false;
    let mut said = false;
    // QEMU's own messages (some a guest can provoke): drained as they come
    // so QEMU never blocks on them, the first 4 KiB kept for the report.
    let mut qemu_err = qemu_err.map(OwnedFd::from);
    if let Some(fd) = &qemu_err {
        sys::set_nonblocking(fd.as_raw_fd()).map_err(|e| e.to_string())?;
    }
    let mut qemu_said: Vec<u8> = Vec::new();
    // virtiofsd's, the same way.
    let (_virtiofsd, mut vfs_err) = match virtiofsd {
        Some((child, err)) => (Some(child), err),
        None => (None, None),
    };
    if let Some(fd) = &vfs_err {
        sys::set_nonblocking(fd.as_raw_fd()).map_err(|e| e.to_string())?;
    }
    let mut vfs_said: Vec<u8> = Vec::new();
    let mut console: Vec<u8> = Vec::new();
    let mut console_shown = false;
    let booted = std::time::Instant::now();
    let outcome = loop {
        let mut extra = vec![(pidfd.as_raw_fd(), libc::POLLIN)];
        let mut at = |src: &Option<OwnedFd>| {
            src.as_ref().map(|fd| {
                extra.push((fd.as_raw_fd(), libc::POLLIN));
                extra.len() - 1
            })
        };
        let (err_at, console_at, vfs_at) = (at(&qemu_err), at(&host_console), at(&vfs_err));
        let egress_at = if asked.is_empty() { None } else { at(&egress) };
        match mux.step(&extra, 1000) {
            Ok(rev) => {
                let ready = |i: Option<usize>| i.is_some_and(|i| rev[i] != 0);
                // Each connection the guest opens gets a socket of the
                // proxy's, exactly as a forwarder in relay mode asks for
                // one (the proxy serves it as this sandbox's connection).
                for id in mux.take_opened() {
                    let sent = egress.as_ref().is_some_and(|e| {
                        sys::send_with_fds(e.as_raw_fd(), &[RELAY_REQUEST], &[]).is_ok()
                    });
                    if sent {
                        asked.push_back(id);
                    } else {
                        mux.refuse(id);
                    }
                }
                if ready(egress_at) {
                    match relay_answer(egress.as_ref()) {
                        Some(sock) => {
                            if let Some(id) = asked.pop_front() {
                                let attached =
                                    sock.try_clone().and_then(|w| mux.attach(id, sock, w));
                                if attached.is_err() {
                                    mux.refuse(id);
                                }
                            }
                        }
                        None => {
                            // The proxy is gone: no connection leaves now.
                            egress = None;
                            for id in asked.drain(..) {
                                mux.refuse(id);
                            }
                        }
                    }
                }
                let mut buf = [0u8; 4096];
                // The guest's console until its agent first speaks, the
                // last 16 KiB kept: shown (as the runtime's words, which
                // the engine logs) only when the agent does not answer in
                // time or QEMU fails first; drained and dropped after.
                if ready(console_at) {
                    let n = read_some(&mut host_console, &mut buf);
                    if !spoken && !mux.heard(stream::CTRL) {
                        console.extend_from_slice(&buf[..n]);
                        let over = console.len().saturating_sub(16 << 10);
                        console.drain(..over);
                    }
                }
                if !console_shown
                    && !spoken
                    && !mux.heard(stream::CTRL)
                    && booted.elapsed() > CONSOLE_AFTER[usize::from(cfg.accel == Accel::Tcg)]
                {
                    console_shown = true;
                    let _ = writeln!(
                        report,
                        "airlock vm: the guest's agent has not answered after {} s; its console:\n{}",
                        booted.elapsed().as_secs(),
                        String::from_utf8_lossy(&console).trim_end()
                    );
                }
                if ready(err_at) {
                    let n = read_some(&mut qemu_err, &mut buf);
                    let room = 4096usize.saturating_sub(qemu_said.len());
                    qemu_said.extend_from_slice(&buf[..n.min(room)]);
                }
                if ready(vfs_at) {
                    let n = read_some(&mut vfs_err, &mut buf);
                    let room = 4096usize.saturating_sub(vfs_said.len());
                    vfs_said.extend_from_slice(&buf[..n.min(room)]);
                }
                if !said && let Some(r) = mux.received(stream::VM) {
                    said = true;
                    let r = String::from_utf8_lossy(r);
                    let _ = writeln!(report, "airlock vm: the guest failed: {}", r.trim());
                }
                // A golden VM: once its runner waits for code, the channel
                // is quiesced, then the machine saved.
                if creating && !quiescing {
                    match mux.recorded() {
                        None => break Some(ChanError::Violation("snapshot exchange too large")),
                        Some(log) if snapshot::runner_waits(log) => {
                            mux.quiesce();
                            quiescing = true;
                        }
                        Some(_) => {}
                    }
                }
                if quiescing && mux.quiesced() && mux.sent_all() {
                    save = true;
                    break None;
                }
                if ready(Some(0)) {
                    break None;
                }
            }
            Err(ChanError::HungUp) => break None,
            Err(e) => break Some(e),
        }
    };
    if let Some(e) = &outcome {
        let _ = writeln!(report, "airlock vm: {e}");
        let _ = qemu.kill();
    }
    if save && let (Some(SnapMode::Create { dir }), Some(qmp)) = (&cfg.snapshot, host_qmp) {
        let saved = (|| -> Result<(), String> {
            if mux.heard(stream::STDOUT) || mux.heard(stream::STDERR) {
                return Err("the golden VM's runner wrote output".into());
            }
            let chunks = snapshot::transcript(mux.recorded().unwrap_or_default())?;
            let mut q = snapshot::Qmp::new(qmp);
            q.save(&dir.join("state"))?;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dir.join("transcript.json"))
                .map_err(|e| e.to_string())?;
            f.write_all(&serde_json::to_vec(&chunks).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
            let _ = q.call(
                "quit",
                serde_json::json!({}),
                std::time::Duration::from_secs(10),
            );
            Ok(())
        })();
        let _ = qemu.kill();
        let _ = qemu.wait();
        return Ok(match saved {
            Ok(()) => 0,
            Err(e) => {
                let _ = writeln!(report, "airlock vm: saving the golden VM: {e}");
                1
            }
        });
    }
    let status = qemu.wait().map_err(|e| e.to_string())?;
    if !status.success()
        && !console_shown
        && !spoken
        && !mux.heard(stream::CTRL)
        && !console.is_empty()
    {
        let _ = writeln!(
            report,
            "airlock vm: QEMU ended before the guest's agent answered; its console:\n{}",
            String::from_utf8_lossy(&console).trim_end()
        );
    }
    if !status.success() {
        if let Some(fd) = qemu_err {
            let _ = fs::File::from(fd).take(4096).read_to_end(&mut qemu_said);
        }
        let text = String::from_utf8_lossy(&qemu_said[..qemu_said.len().min(4096)]);
        if !text.trim().is_empty() {
            let _ = writeln!(report, "airlock vm: QEMU: {}", text.trim());
        }
        if let Some(fd) = vfs_err.take() {
            // Non-blocking: what is there now.
            let _ = fs::File::from(fd).take(4096).read_to_end(&mut vfs_said);
        }
        let said = String::from_utf8_lossy(&vfs_said[..vfs_said.len().min(4096)]);
        if !said.trim().is_empty() {
            let _ = writeln!(report, "airlock vm: virtiofsd: {}", said.trim());
        }
    }
    Ok(if outcome.is_some() {
        1
    } else {
        status.code().unwrap_or(1)
    })
}

// ---------------------------------------------------------------------
// The backend

/// The microVM backend on this host as `settings` choose: QEMU, kernel and
/// accelerator found, the artifacts built or found in the store.
pub fn backend(
    engine: Arc<Engine>,
    settings: &Settings,
    run_dir: &Path,
) -> Result<Arc<MicrovmBackend>, String> {
    let host = discover(settings)?;
    let store = settings.store.clone().unwrap_or_else(default_store);
    Ok(Arc::new(MicrovmBackend::new(
        engine, host, &store, run_dir,
    )?))
}

/// The microVM backend.
#[derive(Debug, Clone)]
pub struct MicrovmBackend {
    engine: Arc<Engine>,
    launcher: Arc<VmLauncher>,
    snaps: Snapshots,
    store: Store,
}

impl MicrovmBackend {
    /// A backend on `host`, its artifacts built (or found) in `store`, its
    /// per-sandbox state under `run_dir/vm`.
    pub fn new(
        engine: Arc<Engine>,
        host: VmHost,
        store: &Path,
        run_dir: &Path,
    ) -> Result<Self, String> {
        let store = Store::open(store).map_err(|e| format!("{}: {e}", store.display()))?;
        let artifacts = store.artifacts(&engine, &host)?;
        let states = run_dir.join("vm");
        private_dir(&states).map_err(|e| format!("{}: {e}", states.display()))?;
        let snaps =
            Snapshots::open(store.dir()).map_err(|e| format!("{}: {e}", store.dir().display()))?;
        Ok(MicrovmBackend {
            engine,
            launcher: Arc::new(VmLauncher {
                host,
                artifacts,
                states,
                scratch_tmp: store.dir().join("tmp"),
            }),
            snaps,
            store,
        })
    }

    /// What shapes a golden snapshot for `spec` here: its key,
    /// `<language>-<host>-<digest>`, where `host` ([`Self::host_key`])
    /// names the artifacts, kernel, QEMU and accelerator it was made with
    /// (what `prune` compares) and `digest` everything.
    fn snapshot_key(&self, spec: &Spec<'_>) -> String {
        let host = self.host_key();
        let mut h = Sha256::new();
        h.update(host.as_bytes());
        h.update(serde_json::to_vec(spec.policy).unwrap_or_default());
        h.update(spec.language.as_str().as_bytes());
        let x = spec.extras;
        for (path, contents) in &x.files {
            for part in [path.as_bytes(), contents.as_bytes()] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part);
            }
        }
        h.update([u8::from(x.broker), u8::from(x.egress)]);
        h.update(x.entry.as_deref().unwrap_or("").as_bytes());
        h.update([0]);
        for (k, v) in &x.env {
            h.update(format!("{k}={v}\0").as_bytes());
        }
        format!("{}-{host}-{}", spec.language.as_str(), hex(&h.finalize()))
    }

    /// The part of a snapshot's key this host's pieces make: the snapshot
    /// format, the artifacts, the kernel, QEMU, the accelerator (and under
    /// KVM the host's CPU and kernel). 16 hex digits.
    fn host_key(&self) -> String {
        let l = &self.launcher;
        let mut h = Sha256::new();
        h.update(snapshot::FORMAT.to_le_bytes());
        key_file(&mut h, &l.artifacts.initrd);
        h.update(l.artifacts.root_id.as_bytes());
        key_file(&mut h, &l.host.kernel);
        key_file(&mut h, &l.host.qemu);
        h.update(l.host.qemu_version.as_bytes());
        h.update(l.host.accel.as_str().as_bytes());
        // Under KVM the guest saw the host's CPU (`-cpu host`) and chose its
        // mitigations for it: another CPU, microcode or host kernel makes
        // another snapshot.
        if l.host.accel == Accel::Kvm {
            h.update(fs::read("/proc/sys/kernel/osrelease").unwrap_or_default());
            let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            for field in ["model name", "microcode", "flags"] {
                let line = cpuinfo.lines().find(|l| l.starts_with(field)).unwrap_or("");
                h.update(line.as_bytes());
                h.update([0]);
            }
        }
        hex(&h.finalize())[..16].to_string()
    }

    /// The guest's artifacts this backend boots.
    pub fn artifacts(&self) -> &Artifacts {
        &self.launcher.artifacts
    }

    /// Removes from the store what this backend no longer uses: other
    /// initramfs and root images (an earlier airlock binary's, runtimes
    /// since changed) with their references, and golden snapshots made
    /// with other artifacts, kernel, QEMU or accelerator. Only `dry_run`
    /// counts. Returns (entries, bytes on disk). A server of another
    /// airlock version using the same store at the time loses its
    /// artifacts (its VMs fail to start, its snapshots are made again).
    pub fn prune(&self, dry_run: bool) -> (usize, u64) {
        let a = &self.launcher.artifacts;
        let (n, bytes) = self.store.prune(&[&a.initrd, &a.root], dry_run);
        let (sn, sbytes) = self.snaps.prune(&self.host_key(), dry_run);
        (n + sn, bytes + sbytes)
    }

    /// Boots a golden VM for `spec` and saves it (seconds; a minute or
    /// more under TCG): `Err` says why not.
    fn make_golden(
        &self,
        key: &str,
        policy: &Policy,
        language: Language,
        extras: &airlock_sandbox::Extras,
    ) -> Result<snapshot::Snapshot, String> {
        let setup = self.engine.hosted_ids().1;
        let made = self
            .snaps
            .begin(golden_ids(setup).1)
            .map_err(|e| format!("snapshot directory: {e}"))?;
        let result = (|| {
            let launcher = ModeLauncher {
                base: self.launcher.clone(),
                mode: SnapMode::Create { dir: made.clone() },
                snapshot: None,
            };
            let mut sb = self
                .engine
                .prepare_agent(policy, language, extras, &launcher)
                .map_err(|e| e.to_string())?;
            sb.prestart().map_err(|e| e.to_string())?;
            // The monitor saves the machine and ends once the runner
            // waits for its code.
            let end = std::time::Instant::now()
                + std::time::Duration::from_secs(match self.accel() {
                    Accel::Kvm => 60,
                    Accel::Tcg => 300,
                });
            while sb.is_alive() {
                if std::time::Instant::now() > end {
                    return Err("the golden VM was not saved in time".to_string());
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            drop(sb);
            self.snaps.commit(key, &made, setup.1)
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&made);
        }
        result
    }

    /// The accelerator guests run with.
    pub fn accel(&self) -> Accel {
        self.launcher.host.accel
    }

    /// The host pieces and artifacts, for `doctor`.
    pub fn describe(&self) -> String {
        format!(
            "{}, kernel {}, root image {}, accelerator {}, {}, {}",
            self.launcher.host.qemu_version,
            self.launcher
                .host
                .kernel
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            self.launcher.artifacts.root_id,
            self.accel().as_str(),
            self.snaps.summary(),
            match &self.launcher.host.virtiofsd {
                Some(p) => format!("sessions through {}", p.display()),
                None => "no sessions (virtiofsd is not installed)".into(),
            }
        )
    }

    /// What this backend cannot do yet, refused rather than run weaker.
    fn unsupported(&self, policy: &Policy) -> Result<(), BackendError> {
        let mut layers = Vec::new();
        if !policy.filesystem.read_only_paths.is_empty() {
            layers.push("filesystem.read_only_paths (a microVM sees only its root image)".into());
        }
        if layers.is_empty() {
            Ok(())
        } else {
            Err(BackendError::Unsupported {
                backend: "microvm",
                layers,
            })
        }
    }
}

impl Backend for MicrovmBackend {
    fn name(&self) -> &'static str {
        "microvm"
    }

    fn level(&self) -> IsolationLevel {
        IsolationLevel::Microvm
    }

    fn validate(&self, req: &Request<'_>) -> Result<(), BackendError> {
        check_level(self.name(), self.level(), req.policy)?;
        self.unsupported(req.policy)?;
        Ok(self.engine.validate(req)?)
    }

    fn prepare(&self, spec: &Spec<'_>) -> Result<Box<dyn Prepared>, BackendError> {
        check_level(self.name(), self.level(), spec.policy)?;
        self.unsupported(spec.policy)?;
        let sb = self.engine.prepare_agent(
            spec.policy,
            spec.language,
            spec.extras,
            self.launcher.as_ref(),
        )?;
        Ok(Box::new(crate::oci::HostedSandbox {
            inner: crate::process::ProcessSandbox::from(sb),
            backend: "microvm",
            name_key: "vm",
        }))
    }

    fn template(&self, spec: &Spec<'_>) -> Result<Option<Arc<dyn Template>>, BackendError> {
        // A python runner waiting for its code on the broker: what a golden
        // snapshot holds. (JavaScript's V8 seeds Math.random when it
        // starts and cannot be reseeded: restores of one saved node would
        // share its sequence, so node VMs boot.)
        // (A sandbox with egress boots too: its proxy channel is made for
        // the execution it serves, which a golden VM does not know.)
        // (A session's VM boots too: its memory is shared with the
        // workspace's file server, which a snapshot's is not.)
        if spec.language != Language::Python
            || !spec.extras.broker
            || spec.extras.entry.is_none()
            || spec.extras.egress
            || spec.extras.workspace.is_some()
        {
            return Ok(None);
        }
        self.unsupported(spec.policy)?;
        let t = Arc::new(SnapshotTemplate {
            backend: self.clone(),
            key: self.snapshot_key(spec),
            policy: spec.policy.clone(),
            language: spec.language,
            extras: spec.extras.clone(),
            golden: Mutex::new(Golden::Building),
            spawned: std::sync::atomic::AtomicU64::new(0),
            building: std::sync::atomic::AtomicBool::new(false),
        });
        t.clone().build();
        Ok(Some(Arc::new(t)))
    }

    fn reap(&self, host_state: &serde_json::Value) -> usize {
        let mut n = crate::process::reap_cgroups(&self.engine, host_state);
        if let Some(name) = host_state
            .get("vm")
            .and_then(serde_json::Value::as_str)
            .filter(|n| crate::oci::is_sandbox_name(n))
            && fs::remove_dir_all(self.launcher.states.join(name)).is_ok()
        {
            n += 1;
        }
        n
    }

    fn reap_stale(&self, previous_pid: Option<u32>) -> usize {
        crate::oci::reap_stale_states(&self.engine, &self.launcher.states, previous_pid, |_, _| {})
    }

    fn sessions(&self) -> bool {
        // The workspace reaches a VM only through virtiofsd, and only a
        // root server makes the session's ids.
        self.launcher.host.virtiofsd.is_some() && sys::geteuid() == 0
    }

    fn session_owner(&self) -> Result<Option<crate::SessionOwner>, BackendError> {
        let (lock, uid) = session_ids().map_err(|e| {
            BackendError::Sandbox(SandboxError::SpawnInit(std::io::Error::other(e)))
        })?;
        Ok(Some(crate::SessionOwner {
            ids: (uid, uid),
            hold: Box::new(lock),
        }))
    }

    fn probe(&self) -> Probe {
        let policy = Policy::default();
        let extras = airlock_sandbox::Extras::default();
        let (works, fix) = crate::verdict(
            self.engine
                .prepare_agent(&policy, Language::Shell, &extras, self.launcher.as_ref())
                .map(|sb| sb.execute(b"exit 0", None, b"", &mut |_, _| {}))
                .map_err(|e| e.to_string()),
        );
        Probe {
            backend: self.name(),
            isolation: self.level(),
            version: Some(self.describe()),
            works,
            fix,
        }
    }
}

// ---------------------------------------------------------------------
// Pools restored from golden snapshots

/// A pool's source of restored VMs: its golden snapshot, made in the
/// background when missing (until then, and whenever it cannot be made,
/// sandboxes boot cold).
#[derive(Debug)]
struct SnapshotTemplate {
    backend: MicrovmBackend,
    key: String,
    policy: Policy,
    language: Language,
    extras: airlock_sandbox::Extras,
    golden: Mutex<Golden>,
    spawned: std::sync::atomic::AtomicU64,
    /// A thread is finding or making the snapshot (one at a time).
    building: std::sync::atomic::AtomicBool,
}

impl SnapshotTemplate {
    fn set(&self, g: Golden) {
        *self.golden.lock().unwrap_or_else(|e| e.into_inner()) = g;
    }

    /// Finds the golden snapshot, or makes it, in a thread of its own.
    fn build(self: Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.building.swap(true, Ordering::AcqRel) {
            return;
        }
        self.set(Golden::Building);
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("airlock-golden".into())
            .spawn(move || {
                let b = &self.backend;
                // One maker per key on this host (another server sharing
                // the store waits here, then finds what this one made).
                let _lock = b.snaps.lock(&self.key);
                let found = match b.snaps.load(&self.key) {
                    Ok(found) => found,
                    Err(why) => {
                        tracing::warn!(key = %self.key, reason = %why, "snapshot refused; made again");
                        b.snaps.remove(&self.key);
                        None
                    }
                };
                let got = match found {
                    Some(s) => Ok(s),
                    None => {
                        let t = std::time::Instant::now();
                        let made = b.make_golden(&self.key, &self.policy, self.language, &self.extras);
                        if made.is_ok() {
                            tracing::info!(key = %self.key, ms = t.elapsed().as_millis() as u64, "golden snapshot made");
                        }
                        made
                    }
                };
                match got {
                    Ok(s) => self.set(Golden::Ready(Arc::new(s))),
                    Err(why) => {
                        tracing::warn!(key = %self.key, reason = %why, "no golden snapshot; microVMs boot cold");
                        self.set(Golden::Failed(std::time::Instant::now()));
                    }
                }
                self.building.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no golden snapshot thread");
            me.set(Golden::Failed(std::time::Instant::now()));
            me.building.store(false, Ordering::Release);
        }
    }

    fn cold(&self) -> Result<Box<dyn Prepared>, BackendError> {
        self.backend.prepare(&Spec {
            policy: &self.policy,
            language: self.language,
            extras: &self.extras,
        })
    }
}

impl Template for Arc<SnapshotTemplate> {
    fn spawn(&self) -> Result<Box<dyn Prepared>, BackendError> {
        self.spawned
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ready = match &*self.golden.lock().unwrap_or_else(|e| e.into_inner()) {
            Golden::Ready(s) => Some(s.clone()),
            _ => None,
        };
        if ready.is_none() {
            return self.cold();
        }
        // Checked again before every restore: a snapshot whose files no
        // longer match their digests is never restored (it is made again
        // meanwhile, and this sandbox boots).
        let snap = match self.backend.snaps.load(&self.key) {
            Ok(Some(s)) => s,
            refused => {
                let why = refused.err().unwrap_or_else(|| "missing".into());
                tracing::warn!(key = %self.key, reason = %why, "snapshot refused; made again");
                self.backend.snaps.remove(&self.key);
                self.clone().build();
                return self.cold();
            }
        };
        let launcher = ModeLauncher {
            base: self.backend.launcher.clone(),
            mode: SnapMode::Restore {
                dir: snap.dir.clone(),
                transcript: snap.transcript.clone(),
                guest_sha256: snap.guest_sha256.clone(),
            },
            snapshot: Some(snap.id.clone()),
        };
        let sb = match self.backend.engine.prepare_agent(
            &self.policy,
            self.language,
            &self.extras,
            &launcher,
        ) {
            Ok(sb) => sb,
            // Made for another view, or the engine's side differs from the
            // golden's: this snapshot can serve no sandbox now.
            Err(e)
                if e.to_string().contains(STALE_VIEW)
                    || e.to_string().contains(snapshot::NOT_THIS_SANDBOX) =>
            {
                tracing::warn!(key = %self.key, reason = %e, "snapshot refused; made again");
                self.backend.snaps.remove(&self.key);
                self.clone().build();
                return self.cold();
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Box::new(crate::oci::HostedSandbox {
            inner: crate::process::ProcessSandbox::from(sb),
            backend: "microvm",
            name_key: "vm",
        }))
    }

    fn healthy(&self) -> bool {
        // A snapshot that could not be made is tried again ten minutes
        // later: the pool replaces a template that says no.
        !matches!(
            &*self.golden.lock().unwrap_or_else(|e| e.into_inner()),
            Golden::Failed(at) if at.elapsed() > std::time::Duration::from_secs(600)
        )
    }

    fn is_fast(&self) -> bool {
        matches!(
            &*self.golden.lock().unwrap_or_else(|e| e.into_inner()),
            Golden::Ready(_)
        )
    }

    fn spawned(&self) -> u64 {
        self.spawned.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A workspace of a session's ids, for a confined program.
    fn workspace(dir: &Path, uid: u32) -> PathBuf {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
        let ws = dir.join("ws");
        fs::create_dir(&ws).unwrap();
        std::os::unix::fs::chown(&ws, Some(uid), Some(uid)).unwrap();
        fs::set_permissions(&ws, fs::Permissions::from_mode(0o700)).unwrap();
        ws
    }

    /// The microVM's private state directories leave the run directory
    /// above them traversable for the other backends (a fresh host's first
    /// VM made /run/airlock 0700 and the OCI backend refused to start).
    #[test]
    fn private_state_dirs_leave_their_parents_traversable() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let leaf = run.join("vm");
        private_dir(&leaf).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!((mode(&run), mode(&leaf)), (0o711, 0o700));
        // Again, with both there: nothing changes and nothing fails.
        private_dir(&leaf).unwrap();
        assert_eq!((mode(&run), mode(&leaf)), (0o711, 0o700));
        // A parent that exists keeps its own mode.
        fs::set_permissions(&run, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&run.join("vm-uids")).unwrap();
        assert_eq!(mode(&run), 0o755);
    }

    /// What virtiofsd's confinement leaves it, probed by a static shell
    /// (busybox) confined exactly as virtiofsd is: its own root holds
    /// nothing of the host's but the libraries, its binary and the
    /// workspace (ENOENT for the rest), Landlock refuses what the root
    /// does hold beyond them (EACCES: its own root directory, running
    /// anything from the workspace), /proc shows it alone, and it is the
    /// session's user; the workspace itself is writable (positive
    /// control).
    #[test]
    fn virtiofsd_sees_only_its_workspace_libraries_and_itself() {
        assert_eq!(sys::geteuid(), 0, "virtiofsd's confinement needs root");
        let busybox = Path::new("/bin/busybox");
        assert!(busybox.exists(), "needs busybox-static");
        let dir = tempfile::tempdir().unwrap();
        let (_lock, uid) = session_ids().unwrap();
        let ws = workspace(dir.path(), uid);
        let bin = dir.path().join("busybox");
        fs::copy(busybox, &bin).unwrap();
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(ws.join("in"), "uploaded").unwrap();
        std::os::unix::fs::chown(ws.join("in"), Some(uid), Some(uid)).unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        let w = VmWorkspace {
            virtiofsd: bin.clone(),
            dir: ws.clone(),
            ids: (uid, uid),
        };
        let probe = &"\
            for p in /etc/passwd /run /root /var /bin/sh /home; do \
              [ -e $p ] && echo \"there $p\" || echo \"absent $p\"; done; \
            ls / 2>&1 | sed 's/.*: //'; \
            pwd; id -u; id -G; cat in; echo; echo made > out && echo wrote; \
            cp BIN ./x && ./x true 2>&1 | sed 's/.*: //'; \
            for p in /proc/[0-9]*; do stat -c %u $p; done | sort -u; \
            grep -c . /usr/lib/os-release"
            .replace("BIN", &bin.to_string_lossy());
        let monitor = sys::pidfd_open(std::process::id() as libc::pid_t).unwrap();
        let mut cmd = Command::new(&bin);
        cmd.args(["sh", "-c", probe])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let _ruleset =
            confine_virtiofsd(&mut cmd, &w, &bin, &state, monitor.as_raw_fd(), -1).unwrap();
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[..6],
            [
                "absent /etc/passwd",
                "absent /run",
                "absent /root",
                "absent /var",
                "absent /bin/sh",
                "absent /home"
            ],
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let uid_s = uid.to_string();
        let os_release = fs::read_to_string("/usr/lib/os-release")
            .unwrap()
            .lines()
            .filter(|l| !l.is_empty())
            .count()
            .to_string();
        assert_eq!(
            lines[6..],
            [
                "Permission denied",
                "/ws",
                uid_s.as_str(),
                uid_s.as_str(),
                "uploaded",
                "wrote",
                "Permission denied",
                uid_s.as_str(),
                os_release.as_str(),
            ],
            "{text}"
        );
        assert_eq!(fs::read_to_string(ws.join("out")).unwrap(), "made\n");
        let st = fs::metadata(ws.join("out")).unwrap();
        assert_eq!((st.uid(), st.gid()), (uid, uid));
        // Positive control for the refusals: outside the confinement, the
        // same probe finds the host's files.
        let host = Command::new(&bin)
            .args([
                "sh",
                "-c",
                "[ -e /etc/passwd ] && ls / >/dev/null && echo seen; \
                 for p in /proc/[0-9]*; do stat -c %u $p; done | sort -u | grep -cx 0",
            ])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&host.stdout), "seen\n1\n");
    }

    /// Without its Landlock ruleset virtiofsd does not start: a kernel
    /// without Landlock gets no session VMs rather than a weaker file
    /// server (here Landlock exists: the ruleset is made).
    #[test]
    fn virtiofsd_is_never_started_without_landlock() {
        let dir = tempfile::tempdir().unwrap();
        let w = VmWorkspace {
            virtiofsd: "/bin/busybox".into(),
            dir: dir.path().into(),
            ids: (QEMU_UID_BASE, QEMU_UID_BASE),
        };
        assert!(virtiofsd_landlock(&w).is_ok());
    }
}
