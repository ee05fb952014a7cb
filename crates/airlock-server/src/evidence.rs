//! Evidence bundles: one document per execution or session that says what
//! ran, under which policy and isolation, what it did (result, usage,
//! egress, audit records) and what it changed in the workspace, anchored
//! in the audit chain so that it can be checked later.
//!
//! The bundle is `{"body": …, "digest": …, "anchor": …}`. `digest` is
//! SHA-256 of `body` serialised as compact JSON with keys sorted and
//! integral numbers written as integers, as it is served (python:
//! `json.dumps(body, sort_keys=True, separators=(",", ":"),
//! ensure_ascii=False)`); issuing the bundle appends an `evidence.issue`
//! audit record naming that digest, and `anchor` is that record (its hash
//! is a link of the chain `airlock admin audit verify` walks). Whoever
//! holds a bundle recomputes the digest, finds the record by its hash in
//! `GET /v1/audit`, and compares: a bundle edited afterwards does not
//! match, and a record removed or changed breaks the chain.

use axum::extract::{ConnectInfo, Path, State};
use axum::http::HeaderMap;
use axum::{Extension, Json};
use serde::Serialize;
use serde_json::{Value, json};
use sha2::Digest;
use utoipa::ToSchema;

use crate::AppState;
use crate::api::{AuditView, ExecutionView, Peer, Principal, ReqCtx, authenticate, rfc3339};
use crate::problem::{ApiError, Problem};
use crate::snapshots::{ManifestEntry, SnapshotView};
use airlock_store::{NewAudit, SnapshotRecord};

/// The most audit records and executions a bundle carries.
const MAX_RECORDS: u32 = 10_000;
/// The most executions a session's bundle lists.
const MAX_EXECUTIONS: u32 = 1_000;

/// An evidence bundle.
#[derive(Debug, Serialize, ToSchema)]
pub struct Evidence {
    /// What the bundle says (what `digest` covers).
    #[schema(value_type = Object)]
    pub body: Value,
    /// SHA-256 (hex) of `body` as compact JSON with sorted keys.
    pub digest: String,
    /// The `evidence.issue` audit record naming `digest`.
    pub anchor: AuditView,
}

/// SHA-256 of a JSON value serialised compactly with sorted keys
/// (serde_json's maps are ordered by key).
pub fn digest(body: &Value) -> String {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Numbers that are integers written as integers (`4`, never `4.0`), so
/// the body's JSON is the same whichever language parses and writes it
/// again (JavaScript has no `4.0`; python keeps what it parsed).
fn integral_numbers(v: Value) -> Value {
    match v {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Value::from(f as i64),
            _ => Value::Number(n),
        },
        Value::Array(a) => Value::Array(a.into_iter().map(integral_numbers).collect()),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| (k, integral_numbers(v)))
                .collect(),
        ),
        other => other,
    }
}

async fn issue(
    st: &AppState,
    who: &Principal,
    ctx: &ReqCtx,
    subject: &str,
    body: Value,
) -> Result<Json<Evidence>, ApiError> {
    let body = integral_numbers(body);
    let digest = digest(&body);
    let ev = st
        .store
        .append_audit(
            NewAudit::new(
                Some(&who.tenant_id),
                "evidence.issue",
                &who.actor(ctx).actor,
                subject,
                Some(&ctx.request_id),
            )
            .with_detail(json!({ "digest": digest, "kind": body["kind"] })),
        )
        .await?;
    Ok(Json(Evidence {
        body,
        digest,
        anchor: AuditView::from(ev),
    }))
}

fn manifest(r: &SnapshotRecord) -> Vec<ManifestEntry> {
    serde_json::from_value(r.manifest.clone()).unwrap_or_default()
}

/// The diff of two snapshots of a listing (which carries no manifests:
/// both are read whole here).
async fn diff_doc(
    st: &AppState,
    who: &Principal,
    base: &SnapshotRecord,
    now: &SnapshotRecord,
) -> Result<Value, ApiError> {
    let full = |id: String| async move {
        st.store
            .snapshot(&who.tenant_id, &id)
            .await?
            .ok_or(ApiError::Internal)
    };
    let (base, now) = (full(base.id.clone()).await?, full(now.id.clone()).await?);
    let (added, removed, changed) = crate::snapshots::diff(&manifest(&base), &manifest(&now));
    Ok(
        json!({"snapshot": now.id, "against": base.id, "added": added, "removed": removed,
              "changed": changed}),
    )
}

async fn audit_of(st: &AppState, who: &Principal, subject: &str) -> Result<Vec<Value>, ApiError> {
    Ok(st
        .store
        .audit_for_subject(&who.tenant_id, subject, MAX_RECORDS)
        .await?
        .into_iter()
        .map(|e| serde_json::to_value(AuditView::from(e)).unwrap_or(Value::Null))
        .collect())
}

/// The evidence of one execution: its record (timing, usage, exit status
/// and reason, the backend and layers enforced, the egress log), the
/// policy it ran under, its audit records, and, in a session that takes
/// snapshots after each execution, the workspace's change.
#[utoipa::path(get, path = "/v1/executions/{id}/evidence", security(("bearer" = [])),
    params(("id" = String, Path, description = "execution id")),
    responses((status = 200, body = Evidence), (status = 404, body = Problem)))]
pub(crate) async fn execution_evidence(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Evidence>, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let rec = st
        .store
        .execution(&who.tenant_id, &id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let mut snapshots = Vec::new();
    let mut workspace_diff = Value::Null;
    if let Some(sid) = &rec.session_id {
        let all = st
            .store
            .list_snapshots(&who.tenant_id, sid, MAX_RECORDS)
            .await?;
        if let Some(pos) = all
            .iter()
            .position(|s| s.execution_id.as_deref() == Some(id.as_str()))
        {
            snapshots.push(SnapshotView::of(&all[pos], false));
            if pos > 0 {
                workspace_diff = diff_doc(&st, &who, &all[pos - 1], &all[pos]).await?;
            }
        }
    }
    let body = json!({
        "kind": "execution",
        "issued_at": rfc3339(airlock_store::now_ms()),
        "execution": ExecutionView::from(&rec),
        "policy": rec.policy,
        "audit": audit_of(&st, &who, &id).await?,
        "snapshots": snapshots,
        "workspace_diff": workspace_diff,
    });
    issue(&st, &who, &ctx, &id, body).await
}

/// The evidence of a session: its record, every execution in it (status,
/// reason, exit code, timing), its audit records (creation, file writes
/// and deletes, snapshots, end), its snapshots and the change from its
/// first snapshot to its last.
#[utoipa::path(get, path = "/v1/sessions/{id}/evidence", security(("bearer" = [])),
    params(("id" = String, Path, description = "session id")),
    responses((status = 200, body = Evidence), (status = 404, body = Problem)))]
pub(crate) async fn session_evidence(
    State(st): State<AppState>,
    ConnectInfo(peer): Peer,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Evidence>, ApiError> {
    let who = authenticate(&st, &headers, peer.ip(), &ctx).await?;
    let rec = crate::sessions::record(&st, &who, &id).await?;
    let mut execs = st
        .store
        .session_executions(&who.tenant_id, &id, MAX_EXECUTIONS)
        .await?;
    execs.reverse();
    let executions: Vec<Value> = execs
        .iter()
        .map(|r| {
            let v = ExecutionView::from(r);
            json!({"id": v.id, "status": v.status, "reason": v.reason, "language": v.language,
                   "created_at": v.created_at, "started_at": v.started_at,
                   "finished_at": v.finished_at,
                   "exit_code": r.result.as_ref().and_then(|x| x.get("exit_code")).cloned(),
                   "policy": r.policy})
        })
        .collect();
    let snaps = st
        .store
        .list_snapshots(&who.tenant_id, &id, MAX_RECORDS)
        .await?;
    let workspace_diff = match (snaps.first(), snaps.last()) {
        (Some(a), Some(b)) if a.id != b.id => diff_doc(&st, &who, a, b).await?,
        _ => Value::Null,
    };
    let body = json!({
        "kind": "session",
        "issued_at": rfc3339(airlock_store::now_ms()),
        "session": crate::sessions::session_view(&st, &rec, None),
        "policy": rec.policy,
        "executions": executions,
        "audit": audit_of(&st, &who, &id).await?,
        "snapshots": snaps.iter().map(|s| SnapshotView::of(s, false)).collect::<Vec<_>>(),
        "workspace_diff": workspace_diff,
    });
    issue(&st, &who, &ctx, &id, body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_is_sha256_of_sorted_compact_json() {
        let body = json!({"b": [1, 2.5, "x\u{1}"], "a": {"z": null, "k": "é"}});
        // The same bytes python's json.dumps(sort_keys=True,
        // separators=(",", ":"), ensure_ascii=False) writes.
        let text = r#"{"a":{"k":"é","z":null},"b":[1,2.5,"x\u0001"]}"#;
        let want: String = sha2::Sha256::digest(text.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(digest(&body), want);
        assert_ne!(digest(&json!({"a": 1})), digest(&json!({"a": 2})));
    }

    #[test]
    fn integral_numbers_are_written_as_integers() {
        let v = integral_numbers(json!({"a": 4.0, "b": [1.5, -2.0, 7], "c": {"d": 1e300}}));
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"a":4,"b":[1.5,-2,7],"c":{"d":1e+300}}"#
        );
    }
}
