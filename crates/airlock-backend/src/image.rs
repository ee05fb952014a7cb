//! OCI images as read-only sandbox roots: `airlock image import FILE`.
//!
//! An image arrives as an OCI image layout (a directory, or a tarball of
//! one) or as a `docker save` tarball. Everything in it is hostile until
//! verified: the manifest and configuration are checked against their
//! digests, every layer blob against its descriptor's digest before a byte
//! of it is unpacked, and the unpacked stream against the configuration's
//! `diff_ids` while it is unpacked. Unpacking goes through `pathrs`
//! (openat2 `RESOLVE_IN_ROOT`): no entry, symlink or hard link of a layer
//! can reach outside the image's own root, whatever it names. Device nodes
//! and FIFOs are never created; setuid and setgid bits are dropped; files
//! are owned by whoever imports (never an id the image names).
//!
//! The root is then checked for what runtimes mount over: `/proc`, `/dev`,
//! `/tmp`, `/workspace`, `/.airlock` and `/opt/airlock` must be real, empty
//! directories or absent (then made). A symlink there is how container
//! escapes start (runc CVE-2025-31133 bound masked paths through a
//! `/dev/null` symlink; CVE-2019-16884 and its kin used a symlinked
//! `/proc`): such an image is refused, not repaired. The import lands only
//! whole: it is staged under `tmp/` and renamed into
//! `sha256/<config digest>/` at the end; a failure removes the stage and
//! changes nothing else.
//!
//! One unpacked root per image, shared read-only by every sandbox that runs
//! it: the runtimes never write into it (every mount point exists already).

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, Permissions};
use std::io::{self, BufReader, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use airlock_policy::Language;
use airlock_sandbox::hosted::{IMAGE_GUEST_ROOT, ImageRoot};
use oci_spec::image::{Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, Os};
use pathrs::flags::OpenFlags;
use pathrs::{InodeType, Root};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Why an image was refused. Each refusal is its own variant: they are
/// different attacks (or accidents), and the operator's fix differs.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The input cannot be read.
    #[error("{0}")]
    Read(String),
    /// Not an OCI layout or `docker save` archive, or malformed JSON.
    #[error("not a usable image: {0}")]
    Format(String),
    /// A blob's content does not match its digest: tampered or corrupt.
    /// Nothing of it is unpacked.
    #[error("{what}: digest mismatch (expected {expected}, got {actual})")]
    Digest {
        /// Which blob.
        what: String,
        /// The digest the image claims.
        expected: String,
        /// The digest of what is there.
        actual: String,
    },
    /// The image has no layers: there is no root to run.
    #[error("the image has no layers: nothing to use as a root")]
    NoLayers,
    /// A layer entry names a path outside the root (`..`), or a link
    /// target that leaves it.
    #[error("layer {layer}: entry {path:?} leaves the image root")]
    Escape {
        /// Layer index (0 is the base).
        layer: usize,
        /// The entry as the archive names it (shortened).
        path: String,
    },
    /// A path runtimes mount over is a symlink, not a directory, or holds
    /// entries in the image.
    #[error("the image's {path} {why}: refused (runtimes mount over it)")]
    MountPoint {
        /// The path inside the image.
        path: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// Past a size or count cap.
    #[error("the image is too large: {0}")]
    TooLarge(String),
    /// No image of that name or digest.
    #[error("no image {0:?} (see `airlock image list`)")]
    NotFound(String),
    /// The store itself failed.
    #[error("image store: {0}")]
    Store(String),
}

/// Caps of one import.
#[derive(Debug, Clone, Copy)]
pub struct ImportLimits {
    /// Bytes of files unpacked, all layers together (and of an archive's
    /// blobs staged).
    pub max_bytes: u64,
    /// Entries unpacked, all layers together.
    pub max_entries: u64,
}

impl Default for ImportLimits {
    fn default() -> Self {
        ImportLimits {
            max_bytes: 16 << 30,
            max_entries: 2_000_000,
        }
    }
}

/// Largest JSON document of an image (index, manifest, configuration).
const MAX_JSON: u64 = 4 << 20;
/// Most layers an image may have.
const MAX_LAYERS: usize = 256;
/// Most of an image's CA bundle read (Debian's is about 220 KiB).
const MAX_CA_BUNDLE: usize = 4 << 20;
/// Largest PAX or GNU long-name record read.
const MAX_META: u64 = 1 << 20;
/// Longest symlink target or entry path accepted.
const MAX_PATH: usize = 4096;

/// What the store keeps about one image (`image.json` beside its root).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImageRecord {
    /// `sha256:<hex>` of the configuration: the image's identity.
    pub id: String,
    /// The configuration's `diff_ids`, base first.
    pub layers: Vec<String>,
    /// Bytes of files unpacked.
    pub bytes: u64,
    /// Entries unpacked.
    pub entries: u64,
    /// Device nodes and FIFOs the layers held (never created).
    pub skipped_devices: u64,
    /// Interpreter path inside the image, per language it has.
    pub interpreters: BTreeMap<String, String>,
}

/// The result of one import.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The record.
    pub record: ImageRecord,
    /// The name it is stored under, when it has one.
    pub name: Option<String>,
    /// It was in the store already (the new copy was discarded).
    pub already: bool,
}

/// The image store: `sha256/<hex>/{rootfs,image.json}`, `refs/<name>`,
/// `tmp/` for imports in progress.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// Where images live by default: `/var/lib/airlock/images` as root, else
/// under the user's data directory.
pub fn default_store() -> PathBuf {
    if airlock_sandbox::sys::geteuid() == 0 {
        return "/var/lib/airlock/images".into();
    }
    std::env::var_os("XDG_DATA_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|d| !d.is_empty())
                .map(|h| PathBuf::from(h).join(".local/share"))
        })
        .unwrap_or_else(std::env::temp_dir)
        .join("airlock/images")
}

fn store_err(e: impl std::fmt::Display) -> ImageError {
    ImageError::Store(e.to_string())
}

fn read_err(what: &str, e: impl std::fmt::Display) -> ImageError {
    ImageError::Read(format!("{what}: {e}"))
}

/// A name an image is stored under: `[a-z0-9._/:@-]`, 1..=255 bytes, no
/// `..`, not starting with `/` or `.`.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 255
        && !n.contains("..")
        && !n.starts_with(['/', '.', '-'])
        && n.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'.' | b'_' | b'/' | b':' | b'@' | b'-')
        })
}

fn ref_file(n: &str) -> String {
    // '+' is not a name character: the mapping is reversible.
    n.replace('/', "+")
}

fn sha256_hex(d: &str) -> Option<&str> {
    let hex = d.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(hex)
}

impl Store {
    /// The store at `dir` (made on first import).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Store { dir: dir.into() }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the store's directories: traversable by sandboxes' mapped
    /// users (the runtimes open the roots from inside user namespaces),
    /// listable by the owner only.
    fn ensure(&self) -> Result<(), ImageError> {
        for d in ["sha256", "refs", "tmp"] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(self.dir.join(d))
                .map_err(store_err)?;
        }
        for d in [self.dir.clone(), self.dir.join("sha256")] {
            fs::set_permissions(&d, Permissions::from_mode(0o711)).map_err(store_err)?;
        }
        Ok(())
    }

    /// Imports `source` (an OCI layout directory, or a tarball of one or
    /// of `docker save`), storing it under `name` when given.
    pub fn import(
        &self,
        source: &Path,
        name: Option<&str>,
        limits: ImportLimits,
    ) -> Result<Imported, ImageError> {
        if let Some(n) = name
            && !valid_name(n)
        {
            return Err(ImageError::Format(format!(
                "image name {:?}: use [a-z0-9._/:@-], at most 255 bytes",
                cut(n)
            )));
        }
        self.ensure()?;
        let stage =
            self.dir
                .join("tmp")
                .join(format!("{}-{:016x}", std::process::id(), rand_u64()));
        fs::DirBuilder::new()
            .mode(0o711)
            .create(&stage)
            .map_err(store_err)?;
        let out = self.import_staged(source, &stage, limits);
        let result = out.and_then(|record| {
            let hex = sha256_hex(&record.id)
                .ok_or_else(|| store_err("bad id"))?
                .to_string();
            let dest = self.dir.join("sha256").join(&hex);
            let _ = fs::remove_dir_all(stage.join("src"));
            let already = match fs::rename(&stage, &dest) {
                Ok(()) => false,
                Err(_) if dest.join("image.json").is_file() => true,
                Err(e) => return Err(store_err(e)),
            };
            if let Some(n) = name {
                self.set_ref(n, &record.id)?;
            }
            Ok(Imported {
                record,
                name: name.map(str::to_string),
                already,
            })
        });
        // Nothing of a failed (or duplicate) import stays.
        if stage.exists() {
            let _ = fs::remove_dir_all(&stage);
        }
        result
    }

    fn set_ref(&self, name: &str, id: &str) -> Result<(), ImageError> {
        let refs = self.dir.join("refs");
        let tmp = refs.join(format!(".tmp-{:016x}", rand_u64()));
        fs::write(&tmp, format!("{id}\n")).map_err(store_err)?;
        fs::rename(&tmp, refs.join(ref_file(name))).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            store_err(e)
        })
    }

    fn import_staged(
        &self,
        source: &Path,
        stage: &Path,
        limits: ImportLimits,
    ) -> Result<ImageRecord, ImageError> {
        let meta = fs::metadata(source).map_err(|e| read_err(&source.display().to_string(), e))?;
        let layout = if meta.is_dir() {
            source.to_path_buf()
        } else {
            let src = stage.join("src");
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&src)
                .map_err(store_err)?;
            stage_archive(source, &src, limits)?;
            src
        };
        let layout_root = Root::open(&layout).map_err(|e| read_err("image layout", e))?;
        let image = if layout_exists(&layout_root, "index.json") {
            oci_layout(&layout_root)?
        } else if layout_exists(&layout_root, "manifest.json") {
            docker_layout(&layout_root)?
        } else {
            return Err(ImageError::Format(
                "neither an OCI image layout (index.json) nor a `docker save` archive \
                 (manifest.json)"
                    .into(),
            ));
        };
        if image.layers.is_empty() {
            return Err(ImageError::NoLayers);
        }
        if image.layers.len() > MAX_LAYERS {
            return Err(ImageError::TooLarge(format!(
                "{} layers (at most {MAX_LAYERS})",
                image.layers.len()
            )));
        }
        let diff_ids = image.config.rootfs().diff_ids().clone();
        if diff_ids.len() != image.layers.len() {
            return Err(ImageError::Format(format!(
                "{} layers but {} diff_ids in the configuration",
                image.layers.len(),
                diff_ids.len()
            )));
        }
        // Every layer verified before any is unpacked.
        for (i, l) in image.layers.iter().enumerate() {
            let mut f = layout_root
                .open_subpath(&l.path, OpenFlags::O_RDONLY)
                .map_err(|e| read_err(&format!("layer {i}"), e))?;
            match &l.digest {
                Some(d) => verify(&mut f, d, &format!("layer {i}"), limits.max_bytes)?,
                None => {
                    // A `docker save` layer is named by its uncompressed
                    // digest only: check that now, before unpacking.
                    let actual =
                        hash_reader(decompress(f)?, limits.max_bytes, &format!("layer {i}"))?;
                    expect_digest(&format!("layer {i}"), &diff_ids[i], &actual)?;
                }
            }
        }
        let rootfs = stage.join("rootfs");
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&rootfs)
            .map_err(store_err)?;
        let root = Root::open(&rootfs).map_err(store_err)?;
        let mut unpack = Unpack::new(&root, limits);
        for (i, l) in image.layers.iter().enumerate() {
            let f = layout_root
                .open_subpath(&l.path, OpenFlags::O_RDONLY)
                .map_err(|e| read_err(&format!("layer {i}"), e))?;
            let mut hashing = HashingReader::new(decompress(f)?);
            unpack.layer(i, &mut hashing)?;
            // The rest of the stream (tar padding) counts for the digest.
            io::copy(&mut hashing, &mut io::sink())
                .map_err(|e| read_err(&format!("layer {i}"), e))?;
            expect_digest(
                &format!("layer {i} (unpacked)"),
                &diff_ids[i],
                &hashing.hex(),
            )?;
        }
        unpack.apply_dir_modes()?;
        check_mount_points(&root)?;
        let interpreters = find_interpreters(&root);
        let record = ImageRecord {
            id: image.id,
            layers: diff_ids,
            bytes: unpack.bytes,
            entries: unpack.entries,
            skipped_devices: unpack.skipped,
            interpreters,
        };
        let text = serde_json::to_vec_pretty(&record).map_err(store_err)?;
        fs::write(stage.join("image.json"), text).map_err(store_err)?;
        Ok(record)
    }

    /// Every image, with the names pointing at it.
    pub fn list(&self) -> Result<Vec<(ImageRecord, Vec<String>)>, ImageError> {
        let mut names: BTreeMap<String, Vec<String>> = BTreeMap::new();
        if let Ok(dir) = fs::read_dir(self.dir.join("refs")) {
            for e in dir.flatten() {
                let file = e.file_name().to_string_lossy().into_owned();
                if file.starts_with('.') {
                    continue;
                }
                if let Ok(id) = fs::read_to_string(e.path()) {
                    names
                        .entry(id.trim().to_string())
                        .or_default()
                        .push(file.replace('+', "/"));
                }
            }
        }
        let mut out = Vec::new();
        let Ok(dir) = fs::read_dir(self.dir.join("sha256")) else {
            return Ok(out);
        };
        for e in dir.flatten() {
            if let Ok(r) = self.record_at(&e.path()) {
                let n = names.remove(&r.id).unwrap_or_default();
                out.push((r, n));
            }
        }
        out.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        Ok(out)
    }

    fn record_at(&self, dir: &Path) -> Result<ImageRecord, ImageError> {
        let text = fs::read(dir.join("image.json")).map_err(store_err)?;
        serde_json::from_slice(&text).map_err(store_err)
    }

    /// The image `reference` names: a stored name, `sha256:<hex>`, or a
    /// prefix of at least 12 hex digits of one.
    pub fn resolve(&self, reference: &str) -> Result<ImageRecord, ImageError> {
        let not_found = || ImageError::NotFound(cut(reference).to_string());
        let hex = if let Some(h) = sha256_hex(reference) {
            h.to_string()
        } else if valid_name(reference)
            && let Ok(id) = fs::read_to_string(self.dir.join("refs").join(ref_file(reference)))
        {
            sha256_hex(id.trim()).ok_or_else(not_found)?.to_string()
        } else {
            let prefix = reference.strip_prefix("sha256:").unwrap_or(reference);
            if prefix.len() < 12 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(not_found());
            }
            let mut found = fs::read_dir(self.dir.join("sha256"))
                .map_err(|_| not_found())?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix));
            match (found.next(), found.next()) {
                (Some(one), None) => one,
                _ => return Err(not_found()),
            }
        };
        let record = self
            .record_at(&self.dir.join("sha256").join(&hex))
            .map_err(|_| not_found())?;
        if record.id != format!("sha256:{hex}") {
            return Err(ImageError::Store(format!(
                "{hex}: record names another image"
            )));
        }
        Ok(record)
    }

    /// The root a backend runs `reference` from, checked again for what
    /// runtimes mount over (the store is the operator's, but a root that
    /// changed since its import must still fail closed).
    pub fn root(&self, reference: &str) -> Result<ImageRoot, ImageError> {
        let record = self.resolve(reference)?;
        let hex = sha256_hex(&record.id).unwrap_or_default();
        let rootfs = self.dir.join("sha256").join(hex).join("rootfs");
        let root = Root::open(&rootfs).map_err(store_err)?;
        check_mount_points(&root)?;
        let interpreters = record
            .interpreters
            .iter()
            .filter_map(|(l, p)| Some((Language::parse(l).ok()?, p.clone())))
            .collect();
        // The image's CA bundle, read inside its root (a symlink there
        // resolves in the image, never on the host), bounded.
        let ca_bundle = root
            .open_subpath("etc/ssl/certs/ca-certificates.crt", OpenFlags::O_RDONLY)
            .ok()
            .and_then(|f| {
                let mut text = String::new();
                f.take(MAX_CA_BUNDLE as u64)
                    .read_to_string(&mut text)
                    .ok()
                    .map(|_| std::sync::Arc::from(text))
            });
        Ok(ImageRoot {
            id: record.id,
            rootfs,
            interpreters,
            ca_bundle,
        })
    }

    /// Removes a name; the image itself when `reference` is its digest or
    /// when no name points at it any more. Returns the removed image's id.
    pub fn remove(&self, reference: &str) -> Result<Option<String>, ImageError> {
        let record = self.resolve(reference)?;
        if valid_name(reference) && sha256_hex(reference).is_none() {
            let _ = fs::remove_file(self.dir.join("refs").join(ref_file(reference)));
        }
        let named = self
            .list()?
            .into_iter()
            .any(|(r, names)| r.id == record.id && !names.is_empty());
        if named && valid_name(reference) && sha256_hex(reference).is_none() {
            return Ok(None);
        }
        // Names left pointing at it go with it.
        if let Ok(dir) = fs::read_dir(self.dir.join("refs")) {
            for e in dir.flatten() {
                if fs::read_to_string(e.path()).is_ok_and(|id| id.trim() == record.id) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let hex = sha256_hex(&record.id).unwrap_or_default();
        fs::remove_dir_all(self.dir.join("sha256").join(hex)).map_err(store_err)?;
        Ok(Some(record.id))
    }
}

fn cut(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    // Only a unique staging name: a clock fallback is enough.
    if getrandom_fill(&mut b).is_err() {
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    }
    u64::from_le_bytes(b)
}

fn getrandom_fill(b: &mut [u8]) -> io::Result<()> {
    File::open("/dev/urandom")?.read_exact(b)
}

fn layout_exists(root: &Root, p: &str) -> bool {
    root.open_subpath(p, OpenFlags::O_RDONLY).is_ok()
}

/// An image as its layout describes it, before unpacking.
struct Described {
    id: String,
    config: ImageConfiguration,
    layers: Vec<LayerRef>,
}

struct LayerRef {
    /// Path inside the layout.
    path: String,
    /// The blob's digest (OCI); `docker save` layers have only diff_ids.
    digest: Option<String>,
}

fn read_json<T: serde::de::DeserializeOwned>(
    root: &Root,
    path: &str,
    digest: Option<&str>,
) -> Result<(T, String), ImageError> {
    let f = root
        .open_subpath(path, OpenFlags::O_RDONLY)
        .map_err(|e| read_err(path, e))?;
    let mut bytes = Vec::new();
    f.take(MAX_JSON + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| read_err(path, e))?;
    if bytes.len() as u64 > MAX_JSON {
        return Err(ImageError::TooLarge(format!(
            "{path} is larger than {MAX_JSON} bytes"
        )));
    }
    let actual = format!("sha256:{}", hex(&Sha256::digest(&bytes)));
    if let Some(d) = digest {
        expect_digest(path, d, &actual)?;
    }
    let v =
        serde_json::from_slice(&bytes).map_err(|e| ImageError::Format(format!("{path}: {e}")))?;
    Ok((v, actual))
}

fn blob_path(digest: &str) -> Result<String, ImageError> {
    match sha256_hex(digest) {
        Some(h) => Ok(format!("blobs/sha256/{h}")),
        None => Err(ImageError::Format(format!(
            "digest {:?}: only sha256 digests are supported",
            cut(digest)
        ))),
    }
}

fn host_arch() -> Arch {
    match std::env::consts::ARCH {
        "x86_64" => Arch::Amd64,
        "aarch64" => Arch::ARM64,
        other => Arch::Other(other.to_string()),
    }
}

/// The one image manifest of an OCI layout for this host's platform.
fn oci_layout(root: &Root) -> Result<Described, ImageError> {
    let (index, _) = read_json::<ImageIndex>(root, "index.json", None)?;
    let mut candidates: Vec<Descriptor> = Vec::new();
    let mut queue: Vec<(Descriptor, usize)> =
        index.manifests().iter().map(|d| (d.clone(), 0)).collect();
    while let Some((d, depth)) = queue.pop() {
        if let Some(p) = d.platform()
            && (*p.os() != Os::Linux || *p.architecture() != host_arch())
        {
            continue;
        }
        let mt = d.media_type().to_string();
        if mt.contains("image.index") || mt.contains("manifest.list") {
            if depth >= 2 {
                return Err(ImageError::Format("image indexes nested too deep".into()));
            }
            let (nested, _) = read_json::<ImageIndex>(
                root,
                &blob_path(d.digest().as_ref())?,
                Some(d.digest().as_ref()),
            )?;
            queue.extend(nested.manifests().iter().map(|n| (n.clone(), depth + 1)));
        } else if mt.contains("manifest") {
            candidates.push(d);
        }
    }
    // One image, once: a layout that lists the same manifest twice (under
    // two names) is still one image.
    candidates.sort_by(|a, b| a.digest().as_ref().cmp(b.digest().as_ref()));
    candidates.dedup_by(|a, b| a.digest() == b.digest());
    let d = match candidates.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(ImageError::Format(format!(
                "the layout holds no image manifest for linux/{}",
                std::env::consts::ARCH
            )));
        }
        many => {
            return Err(ImageError::Format(format!(
                "the layout holds {} images for this platform; import a layout with one",
                many.len()
            )));
        }
    };
    let (manifest, _) = read_json::<ImageManifest>(
        root,
        &blob_path(d.digest().as_ref())?,
        Some(d.digest().as_ref()),
    )?;
    let cd = manifest.config().digest().to_string();
    let (config, id) = read_json::<ImageConfiguration>(root, &blob_path(&cd)?, Some(&cd))?;
    let layers = manifest
        .layers()
        .iter()
        .map(|l| {
            let digest = l.digest().to_string();
            Ok(LayerRef {
                path: blob_path(&digest)?,
                digest: Some(digest),
            })
        })
        .collect::<Result<Vec<_>, ImageError>>()?;
    Ok(Described { id, config, layers })
}

#[derive(Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

/// The one image of a `docker save` archive.
fn docker_layout(root: &Root) -> Result<Described, ImageError> {
    let (entries, _) = read_json::<Vec<DockerEntry>>(root, "manifest.json", None)?;
    let [entry] = entries.as_slice() else {
        return Err(ImageError::Format(format!(
            "the archive holds {} images; save one image per archive",
            entries.len()
        )));
    };
    // The configuration is named by its digest (`<hex>.json`, or
    // `blobs/sha256/<hex>` in newer archives): hold it to that name.
    let named = entry
        .config
        .strip_suffix(".json")
        .or_else(|| entry.config.strip_prefix("blobs/sha256/"))
        .map(|h| format!("sha256:{h}"))
        .filter(|d| sha256_hex(d).is_some());
    let (config, id) = read_json::<ImageConfiguration>(root, &entry.config, named.as_deref())?;
    let layers = entry
        .layers
        .iter()
        .map(|p| LayerRef {
            path: p.clone(),
            digest: p
                .strip_prefix("blobs/sha256/")
                .map(|h| format!("sha256:{h}"))
                .filter(|d| sha256_hex(d).is_some()),
        })
        .collect();
    Ok(Described { id, config, layers })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn expect_digest(what: &str, expected: &str, actual: &str) -> Result<(), ImageError> {
    if sha256_hex(expected).is_none() {
        return Err(ImageError::Format(format!(
            "{what}: digest {:?} is not sha256",
            cut(expected)
        )));
    }
    if expected != actual {
        return Err(ImageError::Digest {
            what: what.into(),
            expected: expected.into(),
            actual: actual.into(),
        });
    }
    Ok(())
}

fn hash_reader(mut r: impl Read, max: u64, what: &str) -> Result<String, ImageError> {
    let mut h = HashingReader::new(&mut r);
    let n =
        io::copy(&mut (&mut h).take(max + 1), &mut io::sink()).map_err(|e| read_err(what, e))?;
    if n > max {
        return Err(ImageError::TooLarge(format!("a layer exceeds {max} bytes")));
    }
    Ok(h.hex())
}

/// Hashes a blob from its start and rewinds it.
fn verify(f: &mut File, digest: &str, what: &str, max: u64) -> Result<(), ImageError> {
    let actual = hash_reader(&mut *f, max, what)?;
    expect_digest(what, digest, &actual)?;
    f.rewind().map_err(|e| read_err(what, e))
}

struct HashingReader<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hash: Sha256::new(),
        }
    }
    fn hex(&self) -> String {
        format!("sha256:{}", hex(&self.hash.clone().finalize()))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// A layer's tar stream, gzip or plain (by its first bytes, whatever its
/// media type says).
fn decompress(f: File) -> Result<Box<dyn Read>, ImageError> {
    let mut r = BufReader::new(f);
    let head = io::BufRead::fill_buf(&mut r).map_err(|e| read_err("layer", e))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(r)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Err(ImageError::Format(
            "zstd-compressed layers are not supported; save the image with gzip or \
             uncompressed layers"
                .into(),
        ))
    } else {
        Ok(Box::new(r))
    }
}

/// An entry's path as components below the root: `.` and a leading `/`
/// dropped, `..` refused.
fn inside(layer: usize, raw: &Path) -> Result<PathBuf, ImageError> {
    let escape = || ImageError::Escape {
        layer,
        path: cut(&raw.to_string_lossy()).to_string(),
    };
    if raw.as_os_str().len() > MAX_PATH {
        return Err(escape());
    }
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return Err(escape()),
        }
    }
    Ok(out)
}

struct Unpack<'a> {
    root: &'a Root,
    limits: ImportLimits,
    bytes: u64,
    entries: u64,
    skipped: u64,
    /// Directory modes, applied once everything is written (a read-only
    /// directory must not stop a later entry inside it).
    dir_modes: BTreeMap<PathBuf, u32>,
}

/// The archive itself (a tarball's layout), not one of its layers.
const ARCHIVE: usize = usize::MAX;

fn label(layer: usize) -> String {
    if layer == ARCHIVE {
        "archive".into()
    } else {
        format!("layer {layer}")
    }
}

fn unpack_err(layer: usize, path: &Path, e: impl std::fmt::Display) -> ImageError {
    ImageError::Read(format!(
        "{}: {}: {e}",
        label(layer),
        cut(&path.to_string_lossy())
    ))
}

impl<'a> Unpack<'a> {
    fn new(root: &'a Root, limits: ImportLimits) -> Self {
        Unpack {
            root,
            limits,
            bytes: 0,
            entries: 0,
            skipped: 0,
            dir_modes: BTreeMap::new(),
        }
    }

    fn layer(&mut self, layer: usize, stream: &mut dyn Read) -> Result<(), ImageError> {
        let mut archive = tar::Archive::new(stream);
        let mut created: HashSet<PathBuf> = HashSet::new();
        // Raw: PAX and GNU long-name records come as entries, read here
        // within a cap (the tar crate would read any size into memory).
        let entries = archive
            .entries()
            .map_err(|e| read_err(&label(layer), e))?
            .raw(true);
        let mut long_path: Option<PathBuf> = None;
        let mut long_link: Option<PathBuf> = None;
        for entry in entries {
            let mut entry = entry.map_err(|e| read_err(&label(layer), e))?;
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(ImageError::TooLarge(format!(
                    "more than {} entries",
                    self.limits.max_entries
                )));
            }
            let kind = entry.header().entry_type();
            if matches!(
                kind,
                tar::EntryType::XHeader
                    | tar::EntryType::XGlobalHeader
                    | tar::EntryType::GNULongName
                    | tar::EntryType::GNULongLink
            ) {
                let size = entry.size();
                if size > MAX_META {
                    return Err(ImageError::TooLarge(format!(
                        "{}: an extended header of {size} bytes (at most {MAX_META})",
                        label(layer)
                    )));
                }
                let mut data = Vec::with_capacity(size as usize);
                (&mut entry)
                    .take(MAX_META)
                    .read_to_end(&mut data)
                    .map_err(|e| read_err(&label(layer), e))?;
                let as_path = |b: &[u8]| {
                    use std::os::unix::ffi::OsStrExt;
                    let b = b.split(|c| *c == 0).next().unwrap_or_default();
                    PathBuf::from(std::ffi::OsStr::from_bytes(b))
                };
                match kind {
                    tar::EntryType::GNULongName => long_path = Some(as_path(&data)),
                    tar::EntryType::GNULongLink => long_link = Some(as_path(&data)),
                    tar::EntryType::XHeader => {
                        for ext in tar::PaxExtensions::new(&data) {
                            let ext = ext.map_err(|e| read_err(&label(layer), e))?;
                            match ext.key_bytes() {
                                b"path" => long_path = Some(as_path(ext.value_bytes())),
                                b"linkpath" => long_link = Some(as_path(ext.value_bytes())),
                                // A size the header does not hold would be
                                // misread as archive structure: refused.
                                b"size" => {
                                    return Err(ImageError::Format(format!(
                                        "{}: PAX size records are not supported",
                                        label(layer)
                                    )));
                                }
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
                continue;
            }
            let raw = match long_path.take() {
                Some(p) => p,
                None => entry
                    .path()
                    .map_err(|e| read_err(&label(layer), e))?
                    .into_owned(),
            };
            let link = match long_link.take() {
                Some(p) => Some(p),
                None => entry
                    .link_name()
                    .map_err(|e| read_err(&label(layer), e))?
                    .map(std::borrow::Cow::into_owned),
            };
            let path = inside(layer, &raw)?;
            if path.as_os_str().is_empty() {
                continue;
            }
            let file_name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
            // Whiteouts: the layer removes what lower layers had.
            if file_name == ".wh..wh..opq" {
                self.opaque(layer, &parent, &created)?;
                continue;
            }
            if let Some(gone) = file_name.strip_prefix(".wh.") {
                if gone.is_empty() || gone == "." {
                    return Err(ImageError::Format(format!(
                        "{}: a whiteout without a name",
                        label(layer)
                    )));
                }
                let target = parent.join(gone);
                inside(layer, &target)?;
                self.remove(layer, &target)?;
                continue;
            }
            let mode = entry.header().mode().unwrap_or(0o644);
            let make_parent = |root: &Root| {
                if !parent.as_os_str().is_empty() {
                    root.mkdir_all(&parent, &Permissions::from_mode(0o755))
                        .map_err(|e| unpack_err(layer, &path, e))?;
                }
                Ok::<(), ImageError>(())
            };
            match kind {
                tar::EntryType::Directory => {
                    if !self.is_dir(&path) {
                        self.remove(layer, &path)?;
                    }
                    self.root
                        .mkdir_all(&path, &Permissions::from_mode(0o755))
                        .map_err(|e| unpack_err(layer, &path, e))?;
                    // Sticky kept; setuid and setgid never.
                    self.dir_modes.insert(path.clone(), mode & 0o1777);
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let size = entry.size();
                    self.bytes = self.bytes.saturating_add(size);
                    if self.bytes > self.limits.max_bytes {
                        return Err(ImageError::TooLarge(format!(
                            "more than {} bytes unpacked",
                            self.limits.max_bytes
                        )));
                    }
                    make_parent(self.root)?;
                    self.remove(layer, &path)?;
                    let mut f = self
                        .root
                        .create_file(
                            &path,
                            OpenFlags::O_WRONLY
                                | OpenFlags::O_CREAT
                                | OpenFlags::O_EXCL
                                | OpenFlags::O_NOFOLLOW
                                | OpenFlags::O_CLOEXEC,
                            &Permissions::from_mode(0o600),
                        )
                        .map_err(|e| unpack_err(layer, &path, e))?;
                    let copied = io::copy(&mut (&mut entry).take(size), &mut f)
                        .map_err(|e| unpack_err(layer, &path, e))?;
                    if copied != size {
                        return Err(unpack_err(layer, &path, "truncated"));
                    }
                    f.flush().map_err(|e| unpack_err(layer, &path, e))?;
                    f.set_permissions(Permissions::from_mode(mode & 0o777))
                        .map_err(|e| unpack_err(layer, &path, e))?;
                }
                tar::EntryType::Symlink => {
                    let target = link
                        .clone()
                        .ok_or_else(|| unpack_err(layer, &path, "symlink without target"))?;
                    if target.as_os_str().is_empty() || target.as_os_str().len() > MAX_PATH {
                        return Err(unpack_err(layer, &path, "bad symlink target"));
                    }
                    make_parent(self.root)?;
                    self.remove(layer, &path)?;
                    // Any target may be stored: it is only ever resolved
                    // inside the image's root (here by pathrs, in a
                    // sandbox by the kernel inside its own root).
                    self.root
                        .create(&path, &InodeType::Symlink(target))
                        .map_err(|e| unpack_err(layer, &path, e))?;
                }
                tar::EntryType::Link => {
                    let target = link
                        .clone()
                        .ok_or_else(|| unpack_err(layer, &path, "hard link without target"))?;
                    let target = inside(layer, &target)?;
                    make_parent(self.root)?;
                    self.remove(layer, &path)?;
                    self.root
                        .create(&path, &InodeType::Hardlink(target))
                        .map_err(|e| unpack_err(layer, &path, e))?;
                }
                tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                    // Never created: a sandbox has no use for an image's
                    // device nodes (its /dev is the runtime's own).
                    self.skipped += 1;
                    if path.starts_with("dev") || path.starts_with("proc") {
                        // Left for the mount point check to name.
                        make_parent(self.root)?;
                        self.remove(layer, &path)?;
                        self.root
                            .create_file(
                                &path,
                                OpenFlags::O_WRONLY | OpenFlags::O_CREAT | OpenFlags::O_EXCL,
                                &Permissions::from_mode(0o000),
                            )
                            .map_err(|e| unpack_err(layer, &path, e))?;
                    }
                    continue;
                }
                other => {
                    return Err(unpack_err(
                        layer,
                        &path,
                        format!("entry type {other:?} is not supported"),
                    ));
                }
            }
            // The entry and every directory above it are this layer's.
            let mut p = Some(path.as_path());
            while let Some(q) = p.filter(|q| !q.as_os_str().is_empty()) {
                if !created.insert(q.to_path_buf()) {
                    break;
                }
                p = q.parent();
            }
        }
        Ok(())
    }

    /// An opaque directory: whatever lower layers put in `dir` goes now;
    /// what this layer put there so far stays.
    fn opaque(
        &self,
        layer: usize,
        dir: &Path,
        created: &HashSet<PathBuf>,
    ) -> Result<(), ImageError> {
        let Ok(handle) = self.root.resolve_nofollow(dir) else {
            return Ok(());
        };
        let Ok(d) = handle.reopen(OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY) else {
            return Ok(());
        };
        let names: Vec<PathBuf> = rustix::fs::Dir::read_from(&d)
            .map_err(|e| unpack_err(layer, dir, e))?
            .flatten()
            .map(|e| {
                use std::os::unix::ffi::OsStrExt;
                PathBuf::from(std::ffi::OsStr::from_bytes(e.file_name().to_bytes()))
            })
            .filter(|n| n != Path::new(".") && n != Path::new(".."))
            .collect();
        for n in names {
            let child = dir.join(n);
            if !created.contains(&child) {
                self.remove(layer, &child)?;
            }
        }
        Ok(())
    }

    fn is_dir(&self, path: &Path) -> bool {
        self.root
            .resolve_nofollow(path)
            .ok()
            .and_then(|h| rustix::fs::fstat(&h).ok())
            .is_some_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir())
    }

    fn remove(&self, layer: usize, path: &Path) -> Result<(), ImageError> {
        match self.root.remove_all(path) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    pathrs::error::ErrorKind::OsError(Some(libc::ENOENT))
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(unpack_err(layer, path, e)),
        }
    }

    fn apply_dir_modes(&self) -> Result<(), ImageError> {
        // Deepest first, so a parent made read-only comes last.
        for (path, mode) in self.dir_modes.iter().rev() {
            if let Ok(h) = self.root.resolve_nofollow(path)
                && let Ok(d) = h.reopen(OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY)
            {
                d.set_permissions(Permissions::from_mode(*mode))
                    .map_err(|e| unpack_err(0, path, e))?;
            }
        }
        Ok(())
    }
}

/// The paths runtimes mount over, and whether they must be empty in the
/// image.
const MOUNT_POINTS: [(&str, bool); 7] = [
    ("proc", true),
    ("dev", true),
    ("tmp", false),
    ("workspace", false),
    (".airlock", true),
    ("opt", false),
    // IMAGE_GUEST_ROOT, below the root.
    ("opt/airlock", true),
];

/// Each mount point is a real directory (made when absent), empty where a
/// runtime's mount must hide nothing the image planted.
fn check_mount_points(root: &Root) -> Result<(), ImageError> {
    debug_assert_eq!(IMAGE_GUEST_ROOT, "/opt/airlock");
    for (path, empty) in MOUNT_POINTS {
        let refuse = |why: String| ImageError::MountPoint {
            path: match path {
                "proc" => "/proc",
                "dev" => "/dev",
                "tmp" => "/tmp",
                "workspace" => "/workspace",
                ".airlock" => "/.airlock",
                "opt" => "/opt",
                _ => "/opt/airlock",
            },
            why,
        };
        let handle = match root.resolve_nofollow(path) {
            Ok(h) => h,
            Err(e)
                if matches!(
                    e.kind(),
                    pathrs::error::ErrorKind::OsError(Some(libc::ENOENT))
                ) =>
            {
                root.mkdir_all(path, &Permissions::from_mode(0o755))
                    .map_err(|e| refuse(format!("cannot be made ({e})")))?;
                continue;
            }
            Err(e) => return Err(refuse(format!("cannot be resolved ({e})"))),
        };
        let st = rustix::fs::fstat(&handle).map_err(|e| refuse(format!("({e})")))?;
        let ft = rustix::fs::FileType::from_raw_mode(st.st_mode);
        if ft.is_symlink() {
            let target = root
                .readlink(path)
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default();
            return Err(refuse(format!("is a symlink (to {})", cut(&target))));
        }
        if !ft.is_dir() {
            return Err(refuse("is not a directory".into()));
        }
        if empty {
            let d = handle
                .reopen(OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY)
                .map_err(|e| refuse(format!("({e})")))?;
            let first = rustix::fs::Dir::read_from(&d)
                .map_err(|e| refuse(format!("({e})")))?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .find(|n| n != "." && n != "..");
            if let Some(n) = first {
                let kind = root
                    .resolve_nofollow(format!("{path}/{n}"))
                    .ok()
                    .and_then(|h| rustix::fs::fstat(&h).ok())
                    .map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode));
                let what = match kind {
                    Some(k) if k.is_symlink() => "a symlink",
                    _ => "an entry",
                };
                return Err(refuse(format!("holds {what} ({})", cut(&n))));
            }
        }
    }
    Ok(())
}

/// Where each language's interpreter is inside the image (resolved inside
/// its root, an executable regular file).
fn find_interpreters(root: &Root) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for lang in [Language::Python, Language::Javascript, Language::Shell] {
        let found = airlock_sandbox::runtime::default_candidates(lang)
            .iter()
            .find(|c| {
                root.resolve(c.trim_start_matches('/'))
                    .ok()
                    .and_then(|h| rustix::fs::fstat(&h).ok())
                    .is_some_and(|st| {
                        rustix::fs::FileType::from_raw_mode(st.st_mode).is_file()
                            && st.st_mode & 0o111 != 0
                    })
            });
        if let Some(p) = found {
            out.insert(lang.as_str().to_string(), (*p).to_string());
        }
    }
    out
}

/// Unpacks an archive's files (the layout inside it) into `dest`, in root:
/// regular files, directories and symlinks only, within the byte cap.
fn stage_archive(source: &Path, dest: &Path, limits: ImportLimits) -> Result<(), ImageError> {
    let f = File::open(source).map_err(|e| read_err(&source.display().to_string(), e))?;
    let root = Root::open(dest).map_err(store_err)?;
    let mut unpack = Unpack::new(&root, limits);
    let mut r = decompress(f)?;
    unpack.layer(ARCHIVE, &mut r).map_err(|e| match e {
        ImageError::Escape { path, .. } => {
            ImageError::Format(format!("archive entry {path:?} leaves the archive"))
        }
        e => e,
    })
}
