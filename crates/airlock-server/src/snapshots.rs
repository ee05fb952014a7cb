//! Workspace snapshots: what a session's workspace held at one moment.
//!
//! A snapshot is a manifest (every path with its type, size, mode and, for
//! a file, the BLAKE3 hash of its contents) stored with the session's
//! records, and the contents as content-addressed blobs under
//! `<data_dir>/blobs/<tenant>/`: a file unchanged since the last snapshot
//! is stored once. The manifest's own hash is the snapshot's digest,
//! written to the audit chain when it is taken, so a snapshot shown later
//! (listed, downloaded as a tar, diffed, restored into a new session) can
//! be checked against what was recorded then; every blob is checked
//! against its hash each time it is read.
//!
//! Must never: store or hand out one tenant's blob to another (blobs are
//! kept per tenant, not shared: a shared store would tell a tenant
//! whether another holds a file), follow anything of the workspace while
//! walking it (the runtime's `Workspace::walk`), or trust a blob's bytes
//! without their hash.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use airlock_runtime::session::{FsError, WalkEntry, Workspace};
use airlock_store::{Actor, SnapshotRecord, new_id, now_ms};
use axum::body::Body;
use axum::extract::{ConnectInfo, Path as UrlPath, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AppState;
use crate::api::{Peer, ReqCtx, authenticate, parse_num, query_params, rfc3339};
use crate::problem::{ApiError, Problem};

/// Snapshot ids.
pub const SNAPSHOT_ID: &str = "^sn_[0-9a-f]{32}$";

fn valid_snapshot_id(id: &str) -> bool {
    crate::api::valid_id(id, "sn")
}

// ---------------------------------------------------------------- blobs

/// Content-addressed contents, per tenant.
#[derive(Debug)]
pub struct Blobs {
    dir: PathBuf,
}

/// A reader that hashes what it reads and, at its end, refuses bytes
/// whose hash is not the one expected (a blob changed on disk).
struct Checked<R> {
    inner: R,
    hasher: blake3::Hasher,
    want: String,
}

impl<R: Read> Read for Checked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 {
            let got = self.hasher.finalize().to_hex().to_string();
            if got != self.want {
                return Err(std::io::Error::other(format!(
                    "blob {} holds bytes of hash {got}",
                    self.want
                )));
            }
        } else {
            self.hasher.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// Made like the store's tenant ids (`tn_` and letters or digits): never
/// a path.
fn tenant_id_like(id: &str) -> bool {
    id.len() <= 64 && id.starts_with("tn_") && id[3..].bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Removes the snapshot contents this node keeps of tenants that no longer
/// exist. `admin tenant delete` removes them from the data directory it is
/// given; with several nodes, the others' copies go here, when each node
/// starts and every hour after (also what a delete interrupted before its
/// files went left behind). The directories are listed before the
/// tenants, so a tenant made in between keeps its own; ids are never
/// reused. Returns the files removed.
pub(crate) async fn sweep_deleted_tenants(st: &AppState) -> Result<u64, String> {
    let blobs = st.blobs.clone();
    let on_disk = tokio::task::spawn_blocking(move || blobs.tenants())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if on_disk.is_empty() {
        return Ok(0);
    }
    let live: std::collections::HashSet<String> = st
        .store
        .list_tenants()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|t| t.id)
        .collect();
    let gone: Vec<String> = on_disk.into_iter().filter(|t| !live.contains(t)).collect();
    let blobs = st.blobs.clone();
    tokio::task::spawn_blocking(move || {
        let mut files = 0;
        for t in gone {
            files += blobs.remove_tenant(&t).map_err(|e| format!("{t}: {e}"))?;
            tracing::info!(tenant = %t, "removed the snapshot contents of a deleted tenant");
        }
        Ok(files)
    })
    .await
    .map_err(|e| e.to_string())?
}

fn valid_hash(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Blobs {
    /// Blobs under `<data_dir>/blobs`.
    pub fn new(data_dir: &Path) -> Self {
        Blobs {
            dir: data_dir.join("blobs"),
        }
    }

    fn tenant_dir(&self, tenant_id: &str) -> PathBuf {
        // Tenant ids are `tn_` and hex (made by the store), never a path.
        self.dir.join(tenant_id)
    }

    /// Removes every blob of a deleted tenant (`admin tenant delete`: a
    /// snapshot's contents are the tenant's data, like its secrets and
    /// memory, whether or not its records are kept); returns how many
    /// files went. Ids that are not the store's are refused, so nothing
    /// but a tenant's own directory is ever removed.
    pub fn remove_tenant(&self, tenant_id: &str) -> std::io::Result<u64> {
        if !tenant_id_like(tenant_id) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a tenant id",
            ));
        }
        let dir = self.tenant_dir(tenant_id);
        let mut files = 0;
        let shards = match std::fs::read_dir(&dir) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        for shard in shards {
            let shard = shard?;
            if shard.file_type()?.is_dir() {
                files += std::fs::read_dir(shard.path())?.count() as u64;
            } else {
                files += 1;
            }
        }
        std::fs::remove_dir_all(&dir)?;
        Ok(files)
    }

    /// The tenants that have blobs here (directories named like a tenant
    /// id; anything else is left alone).
    pub fn tenants(&self) -> std::io::Result<Vec<String>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for e in entries {
            let e = e?;
            if let Some(name) = e.file_name().to_str()
                && tenant_id_like(name)
                && e.file_type()?.is_dir()
            {
                out.push(name.to_string());
            }
        }
        Ok(out)
    }

    fn path(&self, tenant_id: &str, hash: &str) -> PathBuf {
        self.tenant_dir(tenant_id).join(&hash[..2]).join(hash)
    }

    /// Stores what `from` reads; returns its hash and size. A blob already
    /// there is kept (same hash, same bytes).
    pub fn put(&self, tenant_id: &str, from: &mut dyn Read) -> std::io::Result<(String, u64)> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let tdir = self.tenant_dir(tenant_id);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&tdir)?;
        let tmp = tdir.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut size = 0u64;
        let copied = (|| -> std::io::Result<()> {
            loop {
                let n = from.read(&mut buf)?;
                if n == 0 {
                    return f.sync_all();
                }
                hasher.update(&buf[..n]);
                f.write_all(&buf[..n])?;
                size += n as u64;
            }
        })();
        drop(f);
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let hash = hasher.finalize().to_hex().to_string();
        let dest = self.path(tenant_id, &hash);
        if dest.exists() {
            let _ = std::fs::remove_file(&tmp);
        } else {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dest.parent().unwrap_or(&tdir))?;
            std::fs::rename(&tmp, &dest)?;
        }
        Ok((hash, size))
    }

    /// A blob's bytes, checked against its hash as they are read.
    pub fn open(&self, tenant_id: &str, hash: &str) -> std::io::Result<impl Read + use<>> {
        if !valid_hash(hash) {
            return Err(std::io::Error::other("not a blob hash"));
        }
        Ok(Checked {
            inner: std::fs::File::open(self.path(tenant_id, hash))?,
            hasher: blake3::Hasher::new(),
            want: hash.to_string(),
        })
    }
}

// ---------------------------------------------------------------- manifest

/// One entry of a snapshot's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    /// Relative to the workspace, `/`-separated.
    pub path: String,
    /// `file`, `directory`, `symlink` or `other` (a FIFO, a socket: listed,
    /// never read or restored).
    #[serde(rename = "type")]
    #[schema(pattern = "^(file|directory|symlink|other)$")]
    pub kind: String,
    /// Bytes (files).
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// BLAKE3 of a file's contents (hex); null for other types and for a
    /// file the sandbox user could not read.
    pub hash: Option<String>,
    /// A symlink's target.
    pub target: Option<String>,
}

/// The digest of a manifest: BLAKE3 of its JSON.
fn digest(manifest: &[ManifestEntry]) -> String {
    blake3::hash(&serde_json::to_vec(manifest).unwrap_or_default())
        .to_hex()
        .to_string()
}

/// Walks the workspace into a manifest, storing each file's contents.
fn walk_into(
    ws: &Workspace,
    blobs: &Blobs,
    tenant_id: &str,
) -> Result<(Vec<ManifestEntry>, bool), FsError> {
    let mut out = Vec::new();
    let mut visit = |e: &WalkEntry, f: Option<&mut std::fs::File>| -> Result<(), FsError> {
        let (hash, size) = match f {
            Some(f) => {
                let (h, n) = blobs
                    .put(tenant_id, f)
                    .map_err(|e| FsError::Internal(format!("blob: {e}")))?;
                (Some(h), n)
            }
            None => (None, e.size),
        };
        out.push(ManifestEntry {
            path: e.path.clone(),
            kind: e.kind.to_string(),
            size,
            mode: e.mode,
            hash,
            target: e.target.clone(),
        });
        Ok(())
    };
    let sum = ws.walk(&mut visit)?;
    Ok((out, sum.truncated || sum.skipped > 0))
}

/// Takes a snapshot of an open session's workspace and records it (the
/// audit record names its digest).
pub(crate) async fn take(
    st: &AppState,
    ws: Arc<Workspace>,
    reason: &str,
    execution_id: Option<String>,
    actor: &Actor,
) -> Result<SnapshotRecord, ApiError> {
    let max = st.cfg.sessions.max_snapshots;
    // Refused before the walk when the session is full already; the
    // insert checks again, atomically.
    if st.store.count_snapshots(&ws.tenant_id, &ws.id).await? >= max {
        return Err(ApiError::TooManySnapshots(max));
    }
    let blobs = st.blobs.clone();
    let tenant = ws.tenant_id.clone();
    let session_id = ws.id.clone();
    let t = tenant.clone();
    let (manifest, truncated) = tokio::task::spawn_blocking(move || walk_into(&ws, &blobs, &t))
        .await
        .map_err(|_| ApiError::Internal)?
        .map_err(crate::sessions::fs_error)?;
    let rec = SnapshotRecord {
        id: new_id("sn"),
        tenant_id: tenant,
        session_id,
        execution_id,
        reason: reason.to_string(),
        digest: digest(&manifest),
        entries: manifest.len() as u64,
        bytes: manifest
            .iter()
            .filter(|e| e.kind == "file")
            .map(|e| e.size)
            .sum(),
        truncated,
        manifest: serde_json::to_value(&manifest).map_err(|_| ApiError::Internal)?,
        created_at_ms: now_ms(),
    };
    let (store, rec2, actor) = (st.store.clone(), rec.clone(), actor.clone());
    match tokio::spawn(async move { store.insert_snapshot(&rec2, &actor, max).await })
        .await
        .map_err(|_| ApiError::Internal)?
    {
        Ok(()) => Ok(rec),
        Err(airlock_store::StoreError::LimitReached(_)) => Err(ApiError::TooManySnapshots(max)),
        Err(e) => Err(e.into()),
    }
}

/// Fills a new session's workspace with a snapshot's contents. Directory
/// modes get the owner's rwx (so their files can be restored into them).
pub(crate) fn restore(ws: &Workspace, blobs: &Blobs, snap: &SnapshotRecord) -> Result<(), FsError> {
    let manifest: Vec<ManifestEntry> = serde_json::from_value(snap.manifest.clone())
        .map_err(|e| FsError::Internal(format!("manifest: {e}")))?;
    for e in &manifest {
        match e.kind.as_str() {
            "directory" => ws.mkdir(&e.path, e.mode | 0o700)?,
            "file" => match &e.hash {
                Some(h) => {
                    let mut from = blobs
                        .open(&snap.tenant_id, h)
                        .map_err(|err| FsError::Internal(format!("blob {h}: {err}")))?;
                    ws.write_from(&e.path, &mut from, e.mode)?;
                }
                // Its contents were never kept: an empty file says so.
                None => ws.write(&e.path, b"", e.mode)?,
            },
            "symlink" => {
                if let Some(t) = &e.target {
                    ws.symlink(&e.path, t)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- views

/// A snapshot as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SnapshotView {
    /// Snapshot id.
    pub id: String,
    /// The session whose workspace it holds.
    pub session_id: String,
    /// The execution after which it was taken (`snapshot_after_exec`).
    pub execution_id: Option<String>,
    /// `requested` or `after_exec`.
    #[schema(pattern = "^(requested|after_exec)$")]
    pub reason: String,
    /// BLAKE3 of the manifest (hex), as the audit record names it.
    pub digest: String,
    /// Entries.
    pub entries: u64,
    /// Bytes of its files.
    pub bytes: u64,
    /// True when a walk limit (100000 entries, 64 levels, 10000 a
    /// directory) or a name that is not UTF-8 left something out.
    pub truncated: bool,
    /// RFC 3339.
    pub created_at: String,
    /// Its entries (in `GET /v1/snapshots/{id}` only).
    pub manifest: Option<Vec<ManifestEntry>>,
}

impl SnapshotView {
    pub(crate) fn of(r: &SnapshotRecord, with_manifest: bool) -> Self {
        SnapshotView {
            id: r.id.clone(),
            session_id: r.session_id.clone(),
            execution_id: r.execution_id.clone(),
            reason: r.reason.clone(),
            digest: r.digest.clone(),
            entries: r.entries,
            bytes: r.bytes,
            truncated: r.truncated,
            created_at: rfc3339(r.created_at_ms),
            manifest: with_manifest
                .then(|| serde_json::from_value(r.manifest.clone()).ok())
                .flatten(),
        }
    }
}

/// A session's snapshots.
#[derive(Debug, Serialize, ToSchema)]
pub struct SnapshotList {
    /// Oldest first.
    pub snapshots: Vec<SnapshotView>,
}

/// A file that changed between two snapshots.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChangedEntry {
    /// Path.
    pub path: String,
    /// In the base snapshot.
    pub before: ManifestEntry,
    /// In this one.
    pub after: ManifestEntry,
}

/// What differs between two snapshots.
#[derive(Debug, Serialize, ToSchema)]
pub struct SnapshotDiff {
    /// The snapshot compared.
    pub snapshot: String,
    /// The one it is compared against.
    pub against: String,
    /// In this one only.
    pub added: Vec<ManifestEntry>,
    /// In the base only.
    pub removed: Vec<ManifestEntry>,
    /// In both, with another type, contents, mode or target.
    pub changed: Vec<ChangedEntry>,
}

/// Compares two manifests by path.
pub fn diff(
    base: &[ManifestEntry],
    now: &[ManifestEntry],
) -> (Vec<ManifestEntry>, Vec<ManifestEntry>, Vec<ChangedEntry>) {
    use std::collections::BTreeMap;
    let b: BTreeMap<&str, &ManifestEntry> = base.iter().map(|e| (e.path.as_str(), e)).collect();
    let n: BTreeMap<&str, &ManifestEntry> = now.iter().map(|e| (e.path.as_str(), e)).collect();
    let added = n
        .iter()
        .filter(|(p, _)| !b.contains_key(*p))
        .map(|(_, e)| (*e).clone())
        .collect();
    let removed = b
        .iter()
        .filter(|(p, _)| !n.contains_key(*p))
        .map(|(_, e)| (*e).clone())
        .collect();
    let changed = n
        .iter()
        .filter_map(|(p, after)| {
            let before = b.get(p)?;
            // A directory's size is not its contents: its entries say what
            // changed in it.
            let differs = before.kind != after.kind
                || before.hash != after.hash
                || before.mode != after.mode
                || before.target != after.target
                || (after.kind != "directory" && before.size != after.size);
            differs.then(|| ChangedEntry {
                path: (*p).to_string(),
                before: (*before).clone(),
                after: (*after).clone(),
            })
        })
        .collect();
    (added, removed, changed)
}

// ---------------------------------------------------------------- handlers

async fn snapshot_record(
    st: &AppState,
    tenant_id: &str,
    id: &str,
) -> Result<SnapshotRecord, ApiError> {
    if !valid_snapshot_id(id) {
        return Err(ApiError::NotFound);
    }
    st.store
        .snapshot(tenant_id, id)
        .await?
        .ok_or(ApiError::NotFound)
}

/// Takes a snapshot of the session's workspace now.
#[utoipa::path(post, path = "/v1/sessions/{id}/snapshots", security(("bearer" = [])),
    params(("id" = String, Path, description = "session id")),
    responses((status = 201, body = SnapshotView), (status = 404, body = Problem),
              (status = 409, description = "the session ended (session_ended), or holds \
               `[sessions] max_snapshots` already (too_many_snapshots)", body = Problem)))]
pub(crate) async fn create_snapshot(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let ws = crate::sessions::open_workspace(&st, &who, &id).await?;
    let rec = take(&st, ws, "requested", None, &who.actor(&ctx)).await?;
    let mut resp = (StatusCode::CREATED, Json(SnapshotView::of(&rec, false))).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/snapshots/{}", rec.id)) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// A session's snapshots, oldest first (also once it ended).
#[utoipa::path(get, path = "/v1/sessions/{id}/snapshots", security(("bearer" = [])),
    params(("id" = String, Path, description = "session id"),
           ("limit" = Option<u32>, Query, description = "1..=1000, default 100")),
    responses((status = 200, body = SnapshotList), (status = 404, body = Problem)))]
pub(crate) async fn list_snapshots(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<SnapshotList>, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let q = query_params(raw.as_deref(), &["limit"])?;
    let limit = parse_num(&q, "limit", 1, 1000)?.unwrap_or(100) as u32;
    let rec = crate::sessions::record(&st, &who, &id).await?;
    let list = st
        .store
        .list_snapshots(&who.tenant_id, &rec.id, limit)
        .await?;
    Ok(Json(SnapshotList {
        snapshots: list.iter().map(|r| SnapshotView::of(r, false)).collect(),
    }))
}

/// One snapshot with its manifest.
#[utoipa::path(get, path = "/v1/snapshots/{id}", security(("bearer" = [])),
    params(("id" = String, Path, description = "snapshot id")),
    responses((status = 200, body = SnapshotView), (status = 404, body = Problem)))]
pub(crate) async fn get_snapshot(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<SnapshotView>, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let rec = snapshot_record(&st, &who.tenant_id, &id).await?;
    Ok(Json(SnapshotView::of(&rec, true)))
}

/// What changed from the snapshot `against` to this one.
#[utoipa::path(get, path = "/v1/snapshots/{id}/diff", security(("bearer" = [])),
    params(("id" = String, Path, description = "snapshot id"),
           ("against" = String, Query, description = "the snapshot to compare with (any of this tenant's)")),
    responses((status = 200, body = SnapshotDiff), (status = 400, body = Problem), (status = 404, body = Problem)))]
pub(crate) async fn diff_snapshot(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<SnapshotDiff>, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let q = query_params(raw.as_deref(), &["against"])?;
    let against = q
        .get("against")
        .ok_or_else(|| ApiError::InvalidRequest("against names a snapshot".into()))?;
    let now = snapshot_record(&st, &who.tenant_id, &id).await?;
    let base = snapshot_record(&st, &who.tenant_id, against).await?;
    let parse = |r: &SnapshotRecord| -> Result<Vec<ManifestEntry>, ApiError> {
        serde_json::from_value(r.manifest.clone()).map_err(|e| {
            tracing::error!(snapshot = %r.id, error = %e, "a stored manifest does not parse");
            ApiError::Internal
        })
    };
    let (added, removed, changed) = diff(&parse(&base)?, &parse(&now)?);
    Ok(Json(SnapshotDiff {
        snapshot: now.id,
        against: base.id,
        added,
        removed,
        changed,
    }))
}

/// A writer that sends what it is given to a response body, from a
/// blocking thread.
struct ToBody(tokio::sync::mpsc::Sender<Result<axum::body::Bytes, std::io::Error>>);

impl Write for ToBody {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(axum::body::Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The snapshot as a tar archive (every blob checked against its hash as
/// it is sent; a mismatch cuts the download short).
#[utoipa::path(get, path = "/v1/snapshots/{id}/tar", security(("bearer" = [])),
    params(("id" = String, Path, description = "snapshot id")),
    responses((status = 200, description = "a POSIX tar archive of the workspace", content_type = "application/x-tar", body = Vec<u8>),
              (status = 404, body = Problem)))]
pub(crate) async fn snapshot_tar(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let rec = snapshot_record(&st, &who.tenant_id, &id).await?;
    let manifest: Vec<ManifestEntry> =
        serde_json::from_value(rec.manifest.clone()).map_err(|_| ApiError::Internal)?;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let blobs = st.blobs.clone();
    let tenant = who.tenant_id.clone();
    let err_tx = tx.clone();
    tokio::task::spawn_blocking(move || {
        let written = write_tar(ToBody(tx), &blobs, &tenant, &manifest, rec.created_at_ms);
        if let Err(e) = written {
            tracing::error!(snapshot = %rec.id, error = %e, "snapshot archive failed");
            let _ = err_tx.blocking_send(Err(e));
        }
    });
    let body = Body::from_stream(tokio_stream(rx));
    let mut resp = (
        [
            (header::CONTENT_TYPE, "application/x-tar"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{id}.tar\"")) {
        resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

fn tokio_stream(
    mut rx: tokio::sync::mpsc::Receiver<Result<axum::body::Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<axum::body::Bytes, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn write_tar(
    out: impl Write,
    blobs: &Blobs,
    tenant: &str,
    manifest: &[ManifestEntry],
    created_at_ms: i64,
) -> std::io::Result<()> {
    let mut tar = tar::Builder::new(out);
    let mtime = u64::try_from(created_at_ms / 1000).unwrap_or(0);
    for e in manifest {
        let mut h = tar::Header::new_gnu();
        h.set_mode(e.mode & 0o777);
        h.set_mtime(mtime);
        h.set_uid(0);
        h.set_gid(0);
        match e.kind.as_str() {
            "directory" => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                tar.append_data(&mut h, format!("{}/", e.path), std::io::empty())?;
            }
            "file" => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(e.size);
                match &e.hash {
                    Some(hash) => {
                        let from = blobs.open(tenant, hash)?;
                        tar.append_data(&mut h, &e.path, from.take(e.size))?;
                    }
                    None => {
                        h.set_size(0);
                        tar.append_data(&mut h, &e.path, std::io::empty())?;
                    }
                }
            }
            "symlink" => {
                if let Some(t) = &e.target {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    tar.append_link(&mut h, &e.path, t)?;
                }
            }
            _ => {}
        }
    }
    tar.into_inner()?.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, kind: &str, hash: Option<&str>, size: u64) -> ManifestEntry {
        ManifestEntry {
            path: path.into(),
            kind: kind.into(),
            size,
            mode: 0o644,
            hash: hash.map(String::from),
            target: None,
        }
    }

    #[test]
    fn diff_names_added_removed_and_changed_by_path() {
        let base = [
            e("a", "file", Some("11"), 1),
            e("d", "directory", None, 0),
            e("d/b", "file", Some("22"), 2),
            e("gone", "file", Some("33"), 3),
        ];
        let mut now = vec![
            e("a", "file", Some("11"), 1),
            e("d", "directory", None, 0),
            e("d/b", "file", Some("44"), 4),
            e("new", "file", Some("55"), 5),
        ];
        now[1].size = 60;
        let (added, removed, changed) = diff(&base, &now);
        assert_eq!(added, [e("new", "file", Some("55"), 5)]);
        assert_eq!(removed, [e("gone", "file", Some("33"), 3)]);
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].path, "d/b");
        assert_eq!(changed[0].before.hash.as_deref(), Some("22"));
        // Control: a snapshot against itself differs in nothing.
        let (a, r, c) = diff(&now, &now);
        assert!(a.is_empty() && r.is_empty() && c.is_empty());
    }

    #[test]
    fn a_blob_whose_bytes_changed_is_refused_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::new(dir.path());
        let (h, n) = blobs.put("tn_1", &mut &b"hello"[..]).unwrap();
        assert_eq!(n, 5);
        assert_eq!(h, blake3::hash(b"hello").to_hex().to_string());
        let mut ok = String::new();
        blobs
            .open("tn_1", &h)
            .unwrap()
            .read_to_string(&mut ok)
            .unwrap();
        assert_eq!(ok, "hello");
        // Stored once: a second put of the same bytes is the same blob.
        assert_eq!(blobs.put("tn_1", &mut &b"hello"[..]).unwrap().0, h);
        std::fs::write(blobs.path("tn_1", &h), b"jello").unwrap();
        let mut bad = String::new();
        let err = blobs
            .open("tn_1", &h)
            .unwrap()
            .read_to_string(&mut bad)
            .unwrap_err();
        assert!(err.to_string().contains("holds bytes of hash"), "{err}");
        // Another tenant has no such blob.
        assert!(blobs.open("tn_2", &h).is_err());
        assert!(blobs.open("tn_1", "../../etc/passwd").is_err());
    }
}
