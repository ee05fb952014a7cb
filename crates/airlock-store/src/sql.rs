//! The SQL both stores share, written once: every query, row mapping and
//! audit step of [`Store`], in the dialect SQLite and PostgreSQL both accept
//! (numbered `$n` parameters, `ON CONFLICT`, `RETURNING`, `CAST(.. AS
//! BIGINT)`, text compared byte-wise). It is compiled once per driver, as a
//! module of each (`#[path = "sql.rs"]`), against that driver's `Conn`,
//! `DbRow` and store type `This`. What differs is the parent's: how a write
//! transaction is serialised and made durable (`write_tx`, `write_tx_with`),
//! which column is a row's storage order (`AUDIT_ORDER`), and what a
//! tenant's deletion must scrub afterwards (`after_tenant_delete`).

use async_trait::async_trait;
use sqlx::Row;
use zeroize::Zeroizing;

use super::{AUDIT_ORDER, Conn, DB_NOW_MS, DbRow, This};
use crate::audit::{self, AuditEvent, NewAudit, StoredRow, Verifier, VerifyReport};
use crate::crypto::{self, Keyring, NewApiKey};
use crate::{
    Actor, ApiKeyAuth, ApiKeyInfo, AuthOutcome, ExecStatus, ExecutionRecord, Finish, LogRecord,
    LostNode, MemoryEntry, MemoryLimits, MemoryWrite, NodeRecord, Page, SecretMeta, SessionRecord,
    SnapshotRecord, Store, StoreError, Tenant, TenantDeletion, new_id, now_ms,
};

/// Fails closed on a master key that is not the one this database was
/// created with: its key check value, stored by the first open, must match.
pub(super) async fn check_master_key(
    pool: &sqlx::Pool<super::Db>,
    keys: &Keyring,
) -> Result<(), StoreError> {
    let kcv = keys.key_check_value();
    sqlx::query("INSERT INTO meta (key, value) VALUES ('kcv', $1) ON CONFLICT DO NOTHING")
        .bind(kcv.as_slice())
        .execute(pool)
        .await?;
    let stored: Vec<u8> = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'kcv'")
        .fetch_one(pool)
        .await?;
    if bool::from(subtle::ConstantTimeEq::ct_eq(
        stored.as_slice(),
        kcv.as_slice(),
    )) {
        Ok(())
    } else {
        Err(StoreError::WrongMasterKey)
    }
}

/// Appends one record to the chain on a connection that holds the write
/// lock (inside a write transaction: no other writer reads the chain's head
/// until this one commits).
async fn append_in(
    conn: &mut Conn,
    keys: &Keyring,
    ev: &NewAudit,
) -> Result<AuditEvent, StoreError> {
    let last = sqlx::query("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut *conn)
        .await?;
    let (seq, prev): (i64, Vec<u8>) = match last {
        Some(r) => (r.try_get::<i64, _>(0)? + 1, r.try_get(1)?),
        None => (1, vec![0u8; 32]),
    };
    let ts = now_ms();
    let detail = serde_json::to_string(&ev.detail).map_err(|e| StoreError::Db(e.to_string()))?;
    let enc = audit::encode(
        seq,
        ts,
        ev.tenant_id.as_deref(),
        &ev.kind,
        &ev.actor,
        &ev.subject,
        ev.request_id.as_deref(),
        &detail,
    );
    let hash = keys.audit_hash(&prev, &enc);
    sqlx::query(
        "INSERT INTO audit (seq, ts, tenant_id, kind, actor, subject, request_id, detail, prev_hash, hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(seq)
    .bind(ts)
    .bind(ev.tenant_id.as_deref())
    .bind(&ev.kind)
    .bind(&ev.actor)
    .bind(&ev.subject)
    .bind(ev.request_id.as_deref())
    .bind(&detail)
    .bind(&prev)
    .bind(hash.as_slice())
    .execute(&mut *conn)
    .await?;
    Ok(AuditEvent {
        seq,
        ts_ms: ts,
        tenant_id: ev.tenant_id.clone(),
        kind: ev.kind.clone(),
        actor: ev.actor.clone(),
        subject: ev.subject.clone(),
        request_id: ev.request_id.clone(),
        detail,
        hash: crypto::hex(&hash),
    })
}

fn tenant_row(r: &DbRow) -> Result<Tenant, StoreError> {
    Ok(Tenant {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        created_at_ms: r.try_get("created_at")?,
    })
}

fn key_row(r: &DbRow) -> Result<ApiKeyInfo, StoreError> {
    Ok(ApiKeyInfo {
        id: r.try_get("id")?,
        tenant_id: r.try_get("tenant_id")?,
        created_at_ms: r.try_get("created_at")?,
        revoked_at_ms: r.try_get("revoked_at")?,
        expires_at_ms: r.try_get("expires_at")?,
    })
}

/// Inserts a fresh key for `tenant_id` inside a write transaction.
async fn insert_key(
    c: &mut Conn,
    keys: &Keyring,
    tenant_id: &str,
    expires_at_ms: Option<i64>,
) -> Result<(ApiKeyInfo, NewApiKey), StoreError> {
    let new = crypto::generate_api_key()?;
    let info = ApiKeyInfo {
        id: new.id.clone(),
        tenant_id: tenant_id.to_string(),
        created_at_ms: now_ms(),
        revoked_at_ms: None,
        expires_at_ms,
    };
    let hash = keys.api_key_hash(&new.key);
    sqlx::query(
        "INSERT INTO api_keys (id, tenant_id, hash, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&info.id)
    .bind(&info.tenant_id)
    .bind(hash.as_slice())
    .bind(info.created_at_ms)
    .bind(info.expires_at_ms)
    .execute(&mut *c)
    .await?;
    Ok((info, new))
}

fn secret_row(r: &DbRow) -> Result<SecretMeta, StoreError> {
    Ok(SecretMeta {
        name: r.try_get("name")?,
        version: r.try_get("version")?,
        created_at_ms: r.try_get("created_at")?,
        updated_at_ms: r.try_get("updated_at")?,
    })
}

fn exec_row(r: &DbRow) -> Result<ExecutionRecord, StoreError> {
    let result: Option<String> = r.try_get("result")?;
    let status: String = r.try_get("status")?;
    Ok(ExecutionRecord {
        id: r.try_get("id")?,
        tenant_id: r.try_get("tenant_id")?,
        status: ExecStatus::parse(&status)?,
        language: r.try_get("language")?,
        request_id: r.try_get("request_id")?,
        trace_id: r.try_get("trace_id")?,
        created_at_ms: r.try_get("created_at")?,
        started_at_ms: r.try_get("started_at")?,
        finished_at_ms: r.try_get("finished_at")?,
        reason: r.try_get("reason")?,
        error: r.try_get("error")?,
        flow_id: r.try_get("flow_id")?,
        output: json_col(r, "output")?,
        handler_error: json_col(r, "handler_error")?,
        broker_error: r.try_get("broker_error")?,
        egress: json_col(r, "egress")?,
        result: match result {
            Some(s) => Some(
                serde_json::from_str(&s)
                    .map_err(|e| StoreError::Corrupt(format!("result: {e}")))?,
            ),
            None => None,
        },
        host_state: r.try_get("host_state")?,
        session_id: r.try_get("session_id")?,
        policy: json_col(r, "policy")?,
        node_id: r.try_get("node_id")?,
    })
}

fn session_row(r: &DbRow) -> Result<SessionRecord, StoreError> {
    let n = |c: &str| -> Result<u64, StoreError> {
        u64::try_from(r.try_get::<i64, _>(c)?).map_err(|_| StoreError::Corrupt(c.into()))
    };
    Ok(SessionRecord {
        id: r.try_get("id")?,
        tenant_id: r.try_get("tenant_id")?,
        language: r.try_get("language")?,
        backend: r.try_get("backend")?,
        policy: json_col(r, "policy")?.unwrap_or(serde_json::Value::Null),
        workspace_mib: n("workspace_mib")?,
        workspace_files: n("workspace_files")?,
        idle_timeout_ms: r.try_get("idle_timeout_ms")?,
        created_at_ms: r.try_get("created_at")?,
        expires_at_ms: r.try_get("expires_at")?,
        ended_at_ms: r.try_get("ended_at")?,
        end_reason: r.try_get("end_reason")?,
        snapshot_after_exec: r.try_get::<i64, _>("snapshot_after_exec")? != 0,
        node_id: r.try_get("node_id")?,
    })
}

fn snapshot_row(r: &DbRow) -> Result<SnapshotRecord, StoreError> {
    let uint = |col: &str| -> Result<u64, StoreError> {
        let v: i64 = r.try_get(col)?;
        u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{col}: {v}")))
    };
    Ok(SnapshotRecord {
        id: r.try_get("id")?,
        tenant_id: r.try_get("tenant_id")?,
        session_id: r.try_get("session_id")?,
        execution_id: r.try_get("execution_id")?,
        reason: r.try_get("reason")?,
        digest: r.try_get("digest")?,
        entries: uint("entries")?,
        bytes: uint("bytes")?,
        truncated: r.try_get::<i64, _>("truncated")? != 0,
        manifest: json_col(r, "manifest")?.unwrap_or(serde_json::Value::Null),
        created_at_ms: r.try_get("created_at")?,
    })
}

const NODE_COLS: &str = "id, name, url, pid, started_at, heartbeat_at, state, lost_after_ms";

fn node_row(r: &DbRow) -> Result<NodeRecord, StoreError> {
    Ok(NodeRecord {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        url: r.try_get("url")?,
        pid: u32::try_from(r.try_get::<i64, _>("pid")?)
            .map_err(|_| StoreError::Corrupt("nodes.pid".into()))?,
        started_at_ms: r.try_get("started_at")?,
        heartbeat_at_ms: r.try_get("heartbeat_at")?,
        state: r.try_get("state")?,
        lost_after_ms: r.try_get("lost_after_ms")?,
    })
}

const SNAPSHOT_COLS: &str = "id, tenant_id, session_id, execution_id, reason, digest, entries, \
                             bytes, truncated, manifest, created_at";

const SESSION_COLS: &str = "id, tenant_id, language, backend, policy, workspace_mib, workspace_files, \
                            idle_timeout_ms, created_at, expires_at, ended_at, end_reason, \
                            snapshot_after_exec, node_id";

fn memory_row(r: &DbRow) -> Result<MemoryEntry, StoreError> {
    Ok(MemoryEntry {
        key: r.try_get("key")?,
        value: json_col(r, "value")?.unwrap_or(serde_json::Value::Null),
        version: r.try_get("version")?,
        updated_at_ms: r.try_get("updated_at")?,
    })
}

fn json_col(r: &DbRow, col: &str) -> Result<Option<serde_json::Value>, StoreError> {
    let text: Option<String> = r.try_get(col)?;
    text.map(|t| serde_json::from_str(&t).map_err(|e| StoreError::Corrupt(format!("{col}: {e}"))))
        .transpose()
}

fn audit_row(r: &DbRow) -> Result<StoredRow, StoreError> {
    let hash: Vec<u8> = r.try_get("hash")?;
    Ok(StoredRow {
        event: AuditEvent {
            seq: r.try_get("seq")?,
            ts_ms: r.try_get("ts")?,
            tenant_id: r.try_get("tenant_id")?,
            kind: r.try_get("kind")?,
            actor: r.try_get("actor")?,
            subject: r.try_get("subject")?,
            request_id: r.try_get("request_id")?,
            detail: r.try_get("detail")?,
            hash: crypto::hex(&hash),
        },
        prev_hash: r.try_get("prev_hash")?,
        hash,
    })
}

async fn tenant_dek(
    conn: &mut Conn,
    keys: &Keyring,
    tenant_id: &str,
) -> Result<crypto::DataKey, StoreError> {
    let (wrapped, deleted): (Vec<u8>, Option<i64>) =
        sqlx::query_as("SELECT wrapped_dek, deleted_at FROM tenants WHERE id = $1")
            .bind(tenant_id)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or(StoreError::NotFound("tenant"))?;
    if deleted.is_some() {
        return Err(StoreError::TenantDeleted);
    }
    Ok(keys.unwrap_dek(tenant_id, &wrapped)?)
}

/// Inside a write transaction: the tenant exists and is not deleted. A
/// request authenticated before `tenant delete` may reach its write after
/// it; that write must not bring the tenant's data back.
async fn live_tenant(conn: &mut Conn, tenant_id: &str) -> Result<(), StoreError> {
    let deleted: Option<Option<i64>> =
        sqlx::query_scalar("SELECT deleted_at FROM tenants WHERE id = $1")
            .bind(tenant_id)
            .fetch_optional(&mut *conn)
            .await?;
    match deleted {
        None => Err(StoreError::NotFound("tenant")),
        Some(Some(_)) => Err(StoreError::TenantDeleted),
        Some(None) => Ok(()),
    }
}

const EXEC_COLS: &str = "seq, id, tenant_id, status, language, request_id, trace_id, created_at, \
                         started_at, finished_at, reason, result, error, host_state, flow_id, output, handler_error, broker_error, egress, session_id, policy, node_id";

#[async_trait]
impl Store for This {
    async fn create_tenant(&self, name: &str, actor: &Actor) -> Result<Tenant, StoreError> {
        let name = name.to_string();
        let actor = actor.clone();
        self.write_tx(move |c, keys| {
            Box::pin(async move {
                let exists: Option<String> =
                    sqlx::query_scalar("SELECT id FROM tenants WHERE name = $1")
                        .bind(&name)
                        .fetch_optional(&mut *c)
                        .await?;
                if exists.is_some() {
                    return Err(StoreError::Conflict("tenant"));
                }
                let t = Tenant {
                    id: new_id("tn"),
                    name: name.clone(),
                    created_at_ms: now_ms(),
                };
                let wrapped = keys.new_wrapped_dek(&t.id)?;
                sqlx::query(
                    "INSERT INTO tenants (id, name, wrapped_dek, created_at) VALUES ($1, $2, $3, $4)",
                )
                .bind(&t.id)
                .bind(&t.name)
                .bind(&wrapped)
                .bind(t.created_at_ms)
                .execute(&mut *c)
                .await?;
                append_in(
                    c,
                    keys,
                    &NewAudit::new(
                        Some(&t.id),
                        "tenant.create",
                        &actor.actor,
                        &t.name,
                        actor.request_id.as_deref(),
                    ),
                )
                .await?;
                Ok(t)
            })
        })
        .await
    }

    async fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>, StoreError> {
        let r = sqlx::query(
            "SELECT id, name, created_at FROM tenants WHERE name = $1 AND deleted_at IS NULL",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        r.as_ref().map(tenant_row).transpose()
    }

    async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, created_at FROM tenants WHERE deleted_at IS NULL ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(tenant_row).collect()
    }

    async fn create_api_key(
        &self,
        tenant_id: &str,
        expires_at_ms: Option<i64>,
        actor: &Actor,
    ) -> Result<(ApiKeyInfo, NewApiKey), StoreError> {
        let tenant_id = tenant_id.to_string();
        let actor = actor.clone();
        self.write_tx(move |c, keys| {
            Box::pin(async move {
                live_tenant(c, &tenant_id).await?;
                let (info, new) = insert_key(c, keys, &tenant_id, expires_at_ms).await?;
                append_in(
                    c,
                    keys,
                    &NewAudit::new(
                        Some(&tenant_id),
                        "api_key.create",
                        &actor.actor,
                        &info.id,
                        actor.request_id.as_deref(),
                    )
                    .with_detail(serde_json::json!({ "expires_at_ms": expires_at_ms })),
                )
                .await?;
                Ok((info, new))
            })
        })
        .await
    }

    async fn rotate_api_key(
        &self,
        id: &str,
        grace_ms: i64,
        lifetime_ms: Option<i64>,
        actor: &Actor,
    ) -> Result<Option<(ApiKeyInfo, NewApiKey)>, StoreError> {
        let id = id.to_string();
        let actor = actor.clone();
        self.write_tx(move |c, keys| {
            Box::pin(async move {
                let now = now_ms();
                let row: Option<(String, i64, Option<i64>)> = sqlx::query_as(
                    "SELECT tenant_id, created_at, expires_at FROM api_keys WHERE id = $1 \
                     AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2)",
                )
                .bind(&id)
                .bind(now)
                .fetch_optional(&mut *c)
                .await?;
                let Some((tenant, created, old_expiry)) = row else {
                    return Ok(None);
                };
                live_tenant(c, &tenant).await?;
                let lifetime = lifetime_ms.or(old_expiry.map(|e| (e - created).max(1_000)));
                let new_expiry = lifetime.map(|l| now.saturating_add(l));
                let (info, new) = insert_key(c, keys, &tenant, new_expiry).await?;
                if grace_ms <= 0 {
                    sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2")
                        .bind(now)
                        .bind(&id)
                        .execute(&mut *c)
                        .await?;
                } else {
                    let until = old_expiry.map_or(now + grace_ms, |e| e.min(now + grace_ms));
                    sqlx::query("UPDATE api_keys SET expires_at = $1 WHERE id = $2")
                        .bind(until)
                        .bind(&id)
                        .execute(&mut *c)
                        .await?;
                }
                append_in(
                    c,
                    keys,
                    &NewAudit::new(
                        Some(&tenant),
                        "api_key.rotate",
                        &actor.actor,
                        &id,
                        actor.request_id.as_deref(),
                    )
                    .with_detail(serde_json::json!({
                        "new_key": info.id,
                        "grace_ms": grace_ms.max(0),
                        "new_expires_at_ms": new_expiry,
                    })),
                )
                .await?;
                Ok(Some((info, new)))
            })
        })
        .await
    }

    async fn delete_tenant(
        &self,
        tenant_id: &str,
        keep_records: bool,
        actor: &Actor,
    ) -> Result<TenantDeletion, StoreError> {
        let tenant_id = tenant_id.to_string();
        let actor = actor.clone();
        let d = self.write_tx(move |c, keys| {
            Box::pin(async move {
                let name: Option<String> = sqlx::query_scalar(
                    "SELECT name FROM tenants WHERE id = $1 AND deleted_at IS NULL",
                )
                .bind(&tenant_id)
                .fetch_optional(&mut *c)
                .await?;
                let Some(name) = name else {
                    return Err(StoreError::NotFound("tenant"));
                };
                let unfinished: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM executions WHERE tenant_id = $1 AND status IN ('queued', 'running')",
                )
                .bind(&tenant_id)
                .fetch_one(&mut *c)
                .await?;
                if unfinished > 0 {
                    return Err(StoreError::Conflict("unfinished executions"));
                }
                let open: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM sessions WHERE tenant_id = $1 AND ended_at IS NULL",
                )
                .bind(&tenant_id)
                .fetch_one(&mut *c)
                .await?;
                if open > 0 {
                    return Err(StoreError::Conflict("open sessions"));
                }
                let now = now_ms();
                let mut d = TenantDeletion {
                    keys_revoked: sqlx::query(
                        "UPDATE api_keys SET revoked_at = $1 WHERE tenant_id = $2 AND revoked_at IS NULL",
                    )
                    .bind(now)
                    .bind(&tenant_id)
                    .execute(&mut *c)
                    .await?
                    .rows_affected(),
                    secrets: sqlx::query("DELETE FROM secrets WHERE tenant_id = $1")
                        .bind(&tenant_id)
                        .execute(&mut *c)
                        .await?
                        .rows_affected(),
                    memory: sqlx::query("DELETE FROM memory WHERE tenant_id = $1")
                        .bind(&tenant_id)
                        .execute(&mut *c)
                        .await?
                        .rows_affected(),
                    ..TenantDeletion::default()
                };
                if !keep_records {
                    d.logs = sqlx::query(
                        "DELETE FROM execution_logs WHERE execution_id IN \
                         (SELECT id FROM executions WHERE tenant_id = $1)",
                    )
                    .bind(&tenant_id)
                    .execute(&mut *c)
                    .await?
                    .rows_affected();
                    d.executions = sqlx::query("DELETE FROM executions WHERE tenant_id = $1")
                        .bind(&tenant_id)
                        .execute(&mut *c)
                        .await?
                        .rows_affected();
                    sqlx::query("DELETE FROM sessions WHERE tenant_id = $1")
                        .bind(&tenant_id)
                        .execute(&mut *c)
                        .await?;
                    sqlx::query("DELETE FROM snapshots WHERE tenant_id = $1")
                        .bind(&tenant_id)
                        .execute(&mut *c)
                        .await?;
                }
                // The data key goes: a sealed value that remains in a copy
                // of the database taken from now on can never be opened.
                sqlx::query(
                    "UPDATE tenants SET wrapped_dek = $1, deleted_at = $2, name = $3 WHERE id = $4",
                )
                .bind(Vec::<u8>::new())
                .bind(now)
                .bind(format!("deleted:{tenant_id}"))
                .bind(&tenant_id)
                .execute(&mut *c)
                .await?;
                append_in(
                    c,
                    keys,
                    &NewAudit::new(
                        Some(&tenant_id),
                        "tenant.delete",
                        &actor.actor,
                        &name,
                        actor.request_id.as_deref(),
                    )
                    .with_detail(serde_json::json!({
                        "kept_records": keep_records,
                        "removed": d,
                    })),
                )
                .await?;
                Ok(d)
            })
        })
        .await?;
        self.after_tenant_delete().await;
        Ok(d)
    }

    async fn sweep_executions(
        &self,
        before_ms: i64,
        actor: &Actor,
    ) -> Result<(u64, u64), StoreError> {
        let actor = actor.clone();
        self.write_tx(move |c, keys| {
            Box::pin(async move {
                let logs = sqlx::query(
                    "DELETE FROM execution_logs WHERE execution_id IN (SELECT id FROM executions \
                     WHERE status IN ('finished', 'failed') AND finished_at IS NOT NULL AND finished_at < $1)",
                )
                .bind(before_ms)
                .execute(&mut *c)
                .await?
                .rows_affected();
                let executions = sqlx::query(
                    "DELETE FROM executions WHERE status IN ('finished', 'failed') \
                     AND finished_at IS NOT NULL AND finished_at < $1",
                )
                .bind(before_ms)
                .execute(&mut *c)
                .await?
                .rows_affected();
                if executions + logs > 0 {
                    append_in(
                        c,
                        keys,
                        &NewAudit::new(None, "retention.sweep", &actor.actor, "executions", None)
                            .with_detail(serde_json::json!({
                                "before_ms": before_ms,
                                "executions": executions,
                                "logs": logs,
                            })),
                    )
                    .await?;
                }
                Ok((executions, logs))
            })
        })
        .await
    }

    async fn api_key(&self, id: &str) -> Result<Option<ApiKeyAuth>, StoreError> {
        let r = sqlx::query(
            "SELECT id, tenant_id, hash, created_at, revoked_at, expires_at FROM api_keys WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match r {
            None => Ok(None),
            Some(r) => Ok(Some(ApiKeyAuth {
                info: key_row(&r)?,
                hash: r.try_get("hash")?,
            })),
        }
    }

    async fn authenticate(&self, presented: &str) -> Result<AuthOutcome, StoreError> {
        let Some(id) = crypto::parse_api_key(presented) else {
            return Ok(AuthOutcome::Malformed);
        };
        // Hash first, so a known and an unknown id cost the same work.
        let want = self.keys.api_key_hash(presented);
        let Some(row) = self.api_key(id).await? else {
            return Ok(AuthOutcome::Unknown);
        };
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            row.hash.as_slice(),
            want.as_slice(),
        )) {
            return Ok(AuthOutcome::Unknown);
        }
        let expired = row.info.expires_at_ms.is_some_and(|e| e <= now_ms());
        let (tenant_id, key_id) = (row.info.tenant_id, row.info.id);
        Ok(if row.info.revoked_at_ms.is_some() {
            AuthOutcome::Revoked { tenant_id, key_id }
        } else if expired {
            AuthOutcome::Expired { tenant_id, key_id }
        } else {
            AuthOutcome::Valid { tenant_id, key_id }
        })
    }

    async fn revoke_api_key(&self, id: &str, actor: &Actor) -> Result<bool, StoreError> {
        let id = id.to_string();
        let actor = actor.clone();
        self.write_tx(move |c, keys| {
            Box::pin(async move {
                let tenant: Option<String> = sqlx::query_scalar(
                    "SELECT tenant_id FROM api_keys WHERE id = $1 AND revoked_at IS NULL",
                )
                .bind(&id)
                .fetch_optional(&mut *c)
                .await?;
                let Some(tenant) = tenant else {
                    return Ok(false);
                };
                sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2")
                    .bind(now_ms())
                    .bind(&id)
                    .execute(&mut *c)
                    .await?;
                append_in(
                    c,
                    keys,
                    &NewAudit::new(
                        Some(&tenant),
                        "api_key.revoke",
                        &actor.actor,
                        &id,
                        actor.request_id.as_deref(),
                    ),
                )
                .await?;
                Ok(true)
            })
        })
        .await
    }

    async fn list_api_keys(&self, tenant_id: &str) -> Result<Vec<ApiKeyInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, tenant_id, created_at, revoked_at, expires_at FROM api_keys WHERE tenant_id = $1 ORDER BY created_at",
        )
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_row).collect()
    }

    async fn put_secret(
        &self,
        tenant_id: &str,
        name: &str,
        value: &[u8],
        actor: &Actor,
    ) -> Result<SecretMeta, StoreError> {
        let tenant_id = tenant_id.to_string();
        let name = name.to_string();
        let value = Zeroizing::new(value.to_vec());
        let actor = actor.clone();
        self.write_tx(move |c, keys| {
            Box::pin(async move {
                let dek = tenant_dek(c, keys, &tenant_id).await?;
                let prev = sqlx::query(
                    "SELECT name, version, created_at, updated_at FROM secrets WHERE tenant_id = $1 AND name = $2",
                )
                .bind(&tenant_id)
                .bind(&name)
                .fetch_optional(&mut *c)
                .await?;
                let now = now_ms();
                let meta = match prev.as_ref().map(secret_row).transpose()? {
                    Some(p) => SecretMeta {
                        version: p.version + 1,
                        updated_at_ms: now,
                        ..p
                    },
                    None => SecretMeta {
                        name: name.clone(),
                        version: 1,
                        created_at_ms: now,
                        updated_at_ms: now,
                    },
                };
                let sealed = Keyring::seal_secret(&dek, &tenant_id, &name, meta.version, &value)?;
                sqlx::query(
                    "INSERT INTO secrets (tenant_id, name, version, sealed, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (tenant_id, name) DO UPDATE SET
                       version = excluded.version, sealed = excluded.sealed, updated_at = excluded.updated_at",
                )
                .bind(&tenant_id)
                .bind(&name)
                .bind(meta.version)
                .bind(&sealed)
                .bind(meta.created_at_ms)
                .bind(meta.updated_at_ms)
                .execute(&mut *c)
                .await?;
                append_in(
                    c,
                    keys,
                    &NewAudit::new(
                        Some(&tenant_id),
                        "secret.write",
                        &actor.actor,
                        &name,
                        actor.request_id.as_deref(),
                    )
                    .with_detail(serde_json::json!({ "version": meta.version })),
                )
                .await?;
                Ok(meta)
            })
        })
        .await
    }

    async fn get_secret(
        &self,
        tenant_id: &str,
        name: &str,
        actor: &Actor,
    ) -> Result<Option<(SecretMeta, Zeroizing<Vec<u8>>)>, StoreError> {
        let tenant_id = tenant_id.to_string();
        let name = name.to_string();
        let actor = actor.clone();
        self.write_tx(move |c, keys| {
            Box::pin(async move {
                let row = sqlx::query(
                    "SELECT name, version, created_at, updated_at, sealed FROM secrets WHERE tenant_id = $1 AND name = $2",
                )
                .bind(&tenant_id)
                .bind(&name)
                .fetch_optional(&mut *c)
                .await?;
                let out = match row {
                    None => None,
                    Some(r) => {
                        let meta = secret_row(&r)?;
                        let sealed: Vec<u8> = r.try_get("sealed")?;
                        let dek = tenant_dek(c, keys, &tenant_id).await?;
                        let value =
                            Keyring::open_secret(&dek, &tenant_id, &name, meta.version, &sealed)?;
                        Some((meta, value))
                    }
                };
                append_in(
                    c,
                    keys,
                    &NewAudit::new(
                        Some(&tenant_id),
                        "secret.read",
                        &actor.actor,
                        &name,
                        actor.request_id.as_deref(),
                    )
                    .with_detail(serde_json::json!({ "found": out.is_some() })),
                )
                .await?;
                Ok(out)
            })
        })
        .await
    }

    async fn list_secrets(&self, tenant_id: &str) -> Result<Vec<SecretMeta>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, version, created_at, updated_at FROM secrets WHERE tenant_id = $1 ORDER BY name",
        )
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(secret_row).collect()
    }

    async fn delete_secret(
        &self,
        tenant_id: &str,
        name: &str,
        actor: &Actor,
    ) -> Result<bool, StoreError> {
        let tenant_id = tenant_id.to_string();
        let name = name.to_string();
        let actor = actor.clone();
        self.write_tx(move |c, keys| {
            Box::pin(async move {
                let n = sqlx::query("DELETE FROM secrets WHERE tenant_id = $1 AND name = $2")
                    .bind(&tenant_id)
                    .bind(&name)
                    .execute(&mut *c)
                    .await?
                    .rows_affected();
                if n > 0 {
                    append_in(
                        c,
                        keys,
                        &NewAudit::new(
                            Some(&tenant_id),
                            "secret.delete",
                            &actor.actor,
                            &name,
                            actor.request_id.as_deref(),
                        ),
                    )
                    .await?;
                }
                Ok(n > 0)
            })
        })
        .await
    }

    async fn insert_execution(
        &self,
        rec: &ExecutionRecord,
        actor: &Actor,
    ) -> Result<(), StoreError> {
        let rec = rec.clone();
        let actor = actor.clone();
        self.write_tx(move |c, keys| {
            Box::pin(async move {
                live_tenant(c, &rec.tenant_id).await?;
                sqlx::query(
                    "INSERT INTO executions (id, tenant_id, status, language, request_id, trace_id, created_at, flow_id, session_id, policy, node_id)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                )
                .bind(&rec.id)
                .bind(&rec.tenant_id)
                .bind(rec.status.as_str())
                .bind(&rec.language)
                .bind(&rec.request_id)
                .bind(&rec.trace_id)
                .bind(rec.created_at_ms)
                .bind(&rec.flow_id)
                .bind(&rec.session_id)
                .bind(rec.policy.as_ref().map(ToString::to_string))
                .bind(&rec.node_id)
                .execute(&mut *c)
                .await?;
                append_in(
                    c,
                    keys,
                    &NewAudit::new(
                        Some(&rec.tenant_id),
                        "execution.accept",
                        &actor.actor,
                        &rec.id,
                        actor.request_id.as_deref(),
                    )
                    .with_detail(serde_json::json!({
                        "language": rec.language, "trace_id": rec.trace_id,
                        "session": rec.session_id,
                    })),
                )
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn mark_running(&self, id: &str, at_ms: i64, host_state: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        let host_state = host_state.to_string();
        // Not fsync'd on its own: the finish commit that always follows
        // makes it durable. A power loss in between leaves the execution
        // queued (accepted durably), which recovery marks failed, and its
        // cgroups are swept as a dead engine's.
        self.write_tx_with(false, move |c, keys| {
            Box::pin(async move {
                let r = sqlx::query(
                    "UPDATE executions SET status = 'running', started_at = $1, host_state = $2
                     WHERE id = $3 AND status = 'queued' RETURNING tenant_id, request_id",
                )
                .bind(at_ms)
                .bind(&host_state)
                .bind(&id)
                .fetch_optional(&mut *c)
                .await?
                .ok_or(StoreError::NotFound("queued execution"))?;
                let tenant: String = r.try_get(0)?;
                let req: String = r.try_get(1)?;
                // What runs it, from the state the runtime recorded (which
                // also names host paths: those stay out of the audit).
                let hs: serde_json::Value = serde_json::from_str(&host_state).unwrap_or_default();
                let name = |k: &str| {
                    hs.get(k)
                        .and_then(serde_json::Value::as_str)
                        .map(|v| v.chars().take(32).collect::<String>())
                };
                append_in(
                    c,
                    keys,
                    &NewAudit::new(Some(&tenant), "execution.start", "server", &id, Some(&req))
                        .with_detail(serde_json::json!({
                            "backend": name("backend"), "isolation": name("isolation"),
                        })),
                )
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn finish_execution(&self, id: &str, fin: &Finish<'_>) -> Result<(), StoreError> {
        let id = id.to_string();
        let (status, at_ms) = (fin.status, fin.at_ms);
        let reason = fin.reason.to_string();
        let error = fin.error.map(str::to_string);
        let exit_code = fin
            .result
            .and_then(|v| v.get("exit_code").cloned())
            .unwrap_or(serde_json::Value::Null);
        let to_text = |v: Option<&serde_json::Value>| {
            v.map(serde_json::to_string)
                .transpose()
                .map_err(|e| StoreError::Db(e.to_string()))
        };
        let result = to_text(fin.result)?;
        let output = to_text(fin.output)?;
        let handler_error = to_text(fin.handler_error)?;
        let broker_error = fin.broker_error.map(str::to_string);
        let egress = to_text(fin.egress)?;
        self.write_tx(move |c, keys| {
            Box::pin(async move {
                let r = sqlx::query(
                    "UPDATE executions SET status = $1, reason = $2, result = $3, error = $4, output = $5,
                       handler_error = $6, broker_error = $7, egress = $8, finished_at = $9, host_state = NULL
                     WHERE id = $10 AND status IN ('queued', 'running') RETURNING tenant_id, request_id",
                )
                .bind(status.as_str())
                .bind(&reason)
                .bind(result.as_deref())
                .bind(error.as_deref())
                .bind(output.as_deref())
                .bind(handler_error.as_deref())
                .bind(broker_error.as_deref())
                .bind(egress.as_deref())
                .bind(at_ms)
                .bind(&id)
                .fetch_optional(&mut *c)
                .await?
                .ok_or(StoreError::NotFound("unfinished execution"))?;
                let tenant: String = r.try_get(0)?;
                let req: String = r.try_get(1)?;
                append_in(
                    c,
                    keys,
                    &NewAudit::new(Some(&tenant), "execution.finish", "server", &id, Some(&req))
                        .with_detail(serde_json::json!({
                            "status": status.as_str(), "reason": reason, "exit_code": exit_code,
                        })),
                )
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn execution(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<Option<ExecutionRecord>, StoreError> {
        let q = format!("SELECT {EXEC_COLS} FROM executions WHERE id = $1 AND tenant_id = $2");
        let r = sqlx::query(sqlx::AssertSqlSafe(q))
            .bind(id)
            .bind(tenant_id)
            .fetch_optional(&self.pool)
            .await?;
        r.as_ref().map(exec_row).transpose()
    }

    async fn list_executions(
        &self,
        tenant_id: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Page<ExecutionRecord>, StoreError> {
        let q = format!(
            "SELECT {EXEC_COLS} FROM executions WHERE tenant_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(q))
            .bind(tenant_id)
            .bind(before.unwrap_or(i64::MAX))
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.pool)
            .await?;
        let mut items = Vec::with_capacity(rows.len());
        let mut seqs = Vec::with_capacity(rows.len());
        for r in &rows {
            items.push(exec_row(r)?);
            seqs.push(r.try_get::<i64, _>("seq")?);
        }
        let next = if items.len() > limit as usize {
            items.truncate(limit as usize);
            seqs.get(limit as usize - 1).copied()
        } else {
            None
        };
        Ok(Page { items, next })
    }

    async fn execution_seq(&self, tenant_id: &str, id: &str) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT seq FROM executions WHERE tenant_id = $1 AND id = $2")
                .bind(tenant_id)
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn audit_seq(&self, tenant_id: &str, hash: &[u8]) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT seq FROM audit WHERE tenant_id = $1 AND hash = $2")
                .bind(tenant_id)
                .bind(hash)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn session_executions(
        &self,
        tenant_id: &str,
        session_id: &str,
        limit: u32,
    ) -> Result<Vec<ExecutionRecord>, StoreError> {
        let q = format!(
            "SELECT {EXEC_COLS} FROM executions WHERE tenant_id = $1 AND session_id = $2 ORDER BY seq DESC LIMIT $3"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(q))
            .bind(tenant_id)
            .bind(session_id)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(exec_row).collect()
    }

    async fn insert_session(&self, rec: &SessionRecord, actor: &Actor) -> Result<(), StoreError> {
        let rec = rec.clone();
        let actor = actor.clone();
        let int = |v: u64| i64::try_from(v).map_err(|_| StoreError::Corrupt("too large".into()));
        let (mib, files) = (int(rec.workspace_mib)?, int(rec.workspace_files)?);
        self.write_tx(move |c, keys| {
            Box::pin(async move {
                live_tenant(c, &rec.tenant_id).await?;
                sqlx::query(
                    "INSERT INTO sessions (id, tenant_id, language, backend, policy, workspace_mib, \
                     workspace_files, idle_timeout_ms, created_at, expires_at, snapshot_after_exec, node_id) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                )
                .bind(&rec.id)
                .bind(&rec.tenant_id)
                .bind(&rec.language)
                .bind(&rec.backend)
                .bind(rec.policy.to_string())
                .bind(mib)
                .bind(files)
                .bind(rec.idle_timeout_ms)
                .bind(rec.created_at_ms)
                .bind(rec.expires_at_ms)
                .bind(i64::from(rec.snapshot_after_exec))
                .bind(&rec.node_id)
                .execute(&mut *c)
                .await?;
                append_in(
                    c,
                    keys,
                    &NewAudit::new(
                        Some(&rec.tenant_id),
                        "session.create",
                        &actor.actor,
                        &rec.id,
                        actor.request_id.as_deref(),
                    )
                    .with_detail(serde_json::json!({
                        "language": rec.language, "backend": rec.backend,
                        "workspace_mib": rec.workspace_mib, "expires_at_ms": rec.expires_at_ms,
                    })),
                )
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn session(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let q = format!("SELECT {SESSION_COLS} FROM sessions WHERE tenant_id = $1 AND id = $2");
        sqlx::query(sqlx::AssertSqlSafe(q))
            .bind(tenant_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(session_row)
            .transpose()
    }

    async fn list_sessions(
        &self,
        tenant_id: &str,
        limit: u32,
    ) -> Result<Vec<SessionRecord>, StoreError> {
        let q = format!(
            "SELECT {SESSION_COLS} FROM sessions WHERE tenant_id = $1 ORDER BY seq DESC LIMIT $2"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(q))
            .bind(tenant_id)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(session_row).collect()
    }

    async fn end_session(
        &self,
        id: &str,
        reason: &str,
        at_ms: i64,
        actor: &Actor,
    ) -> Result<bool, StoreError> {
        let (id, reason, actor) = (id.to_string(), reason.to_string(), actor.clone());
        self.write_tx(move |c, keys| {
            Box::pin(async move {
                let tenant: Option<String> = sqlx::query_scalar(
                    "UPDATE sessions SET ended_at = $1, end_reason = $2 \
                     WHERE id = $3 AND ended_at IS NULL RETURNING tenant_id",
                )
                .bind(at_ms)
                .bind(&reason)
                .bind(&id)
                .fetch_optional(&mut *c)
                .await?;
                let Some(tenant) = tenant else {
                    return Ok(false);
                };
                append_in(
                    c,
                    keys,
                    &NewAudit::new(
                        Some(&tenant),
                        "session.end",
                        &actor.actor,
                        &id,
                        actor.request_id.as_deref(),
                    )
                    .with_detail(serde_json::json!({ "reason": reason })),
                )
                .await?;
                Ok(true)
            })
        })
        .await
    }

    async fn insert_snapshot(
        &self,
        rec: &SnapshotRecord,
        actor: &Actor,
        max_per_session: u64,
    ) -> Result<(), StoreError> {
        let rec = rec.clone();
        let actor = actor.clone();
        let int = |v: u64| i64::try_from(v).map_err(|_| StoreError::Corrupt("too large".into()));
        let (entries, bytes, max) = (int(rec.entries)?, int(rec.bytes)?, int(max_per_session)?);
        self.write_tx(move |c, keys| {
            Box::pin(async move {
                live_tenant(c, &rec.tenant_id).await?;
                // Inside the write transaction: two snapshots taken at
                // once see each other.
                let held: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM snapshots WHERE tenant_id = $1 AND session_id = $2",
                )
                .bind(&rec.tenant_id)
                .bind(&rec.session_id)
                .fetch_one(&mut *c)
                .await?;
                if held >= max {
                    return Err(StoreError::LimitReached("snapshots per session"));
                }
                sqlx::query(
                    "INSERT INTO snapshots (id, tenant_id, session_id, execution_id, reason, digest, \
                     entries, bytes, truncated, manifest, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                )
                .bind(&rec.id)
                .bind(&rec.tenant_id)
                .bind(&rec.session_id)
                .bind(&rec.execution_id)
                .bind(&rec.reason)
                .bind(&rec.digest)
                .bind(entries)
                .bind(bytes)
                .bind(i64::from(rec.truncated))
                .bind(rec.manifest.to_string())
                .bind(rec.created_at_ms)
                .execute(&mut *c)
                .await?;
                append_in(
                    c,
                    keys,
                    &NewAudit::new(
                        Some(&rec.tenant_id),
                        "session.snapshot",
                        &actor.actor,
                        &rec.session_id,
                        actor.request_id.as_deref(),
                    )
                    .with_detail(serde_json::json!({
                        "snapshot": rec.id, "digest": rec.digest, "reason": rec.reason,
                        "execution_id": rec.execution_id, "entries": rec.entries,
                        "bytes": rec.bytes, "truncated": rec.truncated,
                    })),
                )
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn snapshot(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        let q = format!("SELECT {SNAPSHOT_COLS} FROM snapshots WHERE tenant_id = $1 AND id = $2");
        sqlx::query(sqlx::AssertSqlSafe(q))
            .bind(tenant_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(snapshot_row)
            .transpose()
    }

    async fn count_snapshots(&self, tenant_id: &str, session_id: &str) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM snapshots WHERE tenant_id = $1 AND session_id = $2",
        )
        .bind(tenant_id)
        .bind(session_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn list_snapshots(
        &self,
        tenant_id: &str,
        session_id: &str,
        limit: u32,
    ) -> Result<Vec<SnapshotRecord>, StoreError> {
        let q = "SELECT id, tenant_id, session_id, execution_id, reason, digest, entries, bytes, \
                 truncated, NULL AS manifest, created_at FROM snapshots \
                 WHERE tenant_id = $1 AND session_id = $2 ORDER BY seq LIMIT $3";
        let rows = sqlx::query(sqlx::AssertSqlSafe(q))
            .bind(tenant_id)
            .bind(session_id)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(snapshot_row).collect()
    }

    async fn open_sessions(&self, node_id: &str) -> Result<Vec<SessionRecord>, StoreError> {
        let q = format!(
            "SELECT {SESSION_COLS} FROM sessions WHERE ended_at IS NULL \
             AND (node_id = $1 OR node_id IS NULL) ORDER BY seq"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(q))
            .bind(node_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(session_row).collect()
    }

    async fn leftover_executions(&self, node_id: &str) -> Result<Vec<ExecutionRecord>, StoreError> {
        let q = format!(
            "SELECT {EXEC_COLS} FROM executions \
             WHERE (status IN ('queued', 'running') OR host_state IS NOT NULL) \
             AND (node_id = $1 OR node_id IS NULL) ORDER BY seq"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(q))
            .bind(node_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(exec_row).collect()
    }

    async fn clear_host_state(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.write_tx(move |c, _| {
            Box::pin(async move {
                sqlx::query(
                    "UPDATE executions SET host_state = NULL \
                     WHERE id = $1 AND status NOT IN ('queued', 'running')",
                )
                .bind(&id)
                .execute(&mut *c)
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn register_node(&self, node: &NodeRecord) -> Result<Option<NodeRecord>, StoreError> {
        let node = node.clone();
        self.write_tx(move |c, keys| {
            Box::pin(async move {
                let q = format!("SELECT {NODE_COLS} FROM nodes WHERE id = $1");
                let before = sqlx::query(sqlx::AssertSqlSafe(q))
                    .bind(&node.id)
                    .fetch_optional(&mut *c)
                    .await?
                    .as_ref()
                    .map(node_row)
                    .transpose()?;
                let q = format!(
                    "INSERT INTO nodes \
                     (id, name, url, pid, started_at, heartbeat_at, state, lost_after_ms) \
                     VALUES ($1, $2, $3, $4, $5, {DB_NOW_MS}, 'active', $6) \
                     ON CONFLICT (id) DO UPDATE SET name = excluded.name, url = excluded.url, \
                     pid = excluded.pid, started_at = excluded.started_at, \
                     heartbeat_at = excluded.heartbeat_at, state = 'active', \
                     lost_after_ms = excluded.lost_after_ms"
                );
                sqlx::query(sqlx::AssertSqlSafe(q))
                    .bind(&node.id)
                    .bind(&node.name)
                    .bind(&node.url)
                    .bind(i64::from(node.pid))
                    .bind(node.started_at_ms)
                    .bind(node.lost_after_ms)
                    .execute(&mut *c)
                    .await?;
                append_in(
                    c,
                    keys,
                    &NewAudit::new(None, "node.start", "server", &node.id, None).with_detail(
                        serde_json::json!({
                            "name": node.name,
                            "pid": node.pid,
                            "previous_state": before.as_ref().map(|b| b.state.as_str()),
                        }),
                    ),
                )
                .await?;
                Ok(before)
            })
        })
        .await
    }

    async fn node_heartbeat(&self, id: &str) -> Result<bool, StoreError> {
        // No audit record and no write lock: a heartbeat orders nothing
        // (SQLite serialises its writes by itself).
        let q = format!(
            "UPDATE nodes SET heartbeat_at = {DB_NOW_MS} WHERE id = $1 AND state = 'active'"
        );
        let n = sqlx::query(sqlx::AssertSqlSafe(q))
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    async fn stop_node(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.write_tx(move |c, keys| {
            Box::pin(async move {
                let q = format!(
                    "UPDATE nodes SET state = 'stopped', heartbeat_at = {DB_NOW_MS} \
                     WHERE id = $1 AND state = 'active'"
                );
                let n = sqlx::query(sqlx::AssertSqlSafe(q))
                    .bind(&id)
                    .execute(&mut *c)
                    .await?
                    .rows_affected();
                if n == 1 {
                    append_in(
                        c,
                        keys,
                        &NewAudit::new(None, "node.stop", "server", &id, None),
                    )
                    .await?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError> {
        let q = format!("SELECT {NODE_COLS} FROM nodes WHERE id = $1");
        let r = sqlx::query(sqlx::AssertSqlSafe(q))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        r.as_ref().map(node_row).transpose()
    }

    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let q = format!("SELECT {NODE_COLS} FROM nodes ORDER BY started_at, id");
        let rows = sqlx::query(sqlx::AssertSqlSafe(q))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(node_row).collect()
    }

    async fn fail_lost_nodes(&self, by: &str, at_ms: i64) -> Result<Vec<LostNode>, StoreError> {
        let by = by.to_string();
        self.write_tx(move |c, keys| {
            Box::pin(async move {
                // Each node by its own lease (it fences itself within it).
                // Inside the write lock: a node declared lost by another
                // node a moment ago is no longer active here.
                let stale_now =
                    format!("state = 'active' AND heartbeat_at < {DB_NOW_MS} - lost_after_ms");
                let q = format!(
                    "SELECT id, heartbeat_at FROM nodes WHERE {stale_now} AND id <> $1 ORDER BY id"
                );
                let stale: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(q))
                    .bind(&by)
                    .fetch_all(&mut *c)
                    .await?;
                let actor = format!("node:{by}");
                let mut lost = Vec::new();
                for (id, heartbeat_at_ms) in stale {
                    // Checked again as it is changed: a heartbeat (which
                    // takes no write lock) may have arrived since the
                    // select; then the node is alive and keeps its work.
                    let q =
                        format!("UPDATE nodes SET state = 'lost' WHERE id = $1 AND {stale_now}");
                    let n = sqlx::query(sqlx::AssertSqlSafe(q))
                        .bind(&id)
                        .execute(&mut *c)
                        .await?
                        .rows_affected();
                    if n != 1 {
                        continue;
                    }
                    // Host state stays: the node reaps it when it returns.
                    let execs: Vec<(String, String, String)> = sqlx::query_as(
                        "UPDATE executions SET status = 'failed', reason = 'node_lost', \
                         error = 'the node running this execution stopped responding', \
                         finished_at = $1 \
                         WHERE node_id = $2 AND status IN ('queued', 'running') \
                         RETURNING id, tenant_id, request_id",
                    )
                    .bind(at_ms)
                    .bind(&id)
                    .fetch_all(&mut *c)
                    .await?;
                    // Sorted: the chain's order does not depend on the
                    // database's plan.
                    let mut execs = execs;
                    execs.sort();
                    for (eid, tenant, req) in &execs {
                        append_in(
                            c,
                            keys,
                            &NewAudit::new(
                                Some(tenant),
                                "execution.finish",
                                &actor,
                                eid,
                                Some(req),
                            )
                            .with_detail(serde_json::json!({
                                "status": "failed", "reason": "node_lost",
                                "exit_code": serde_json::Value::Null,
                            })),
                        )
                        .await?;
                    }
                    let mut sessions: Vec<(String, String)> = sqlx::query_as(
                        "UPDATE sessions SET ended_at = $1, end_reason = 'node_lost' \
                         WHERE node_id = $2 AND ended_at IS NULL RETURNING id, tenant_id",
                    )
                    .bind(at_ms)
                    .bind(&id)
                    .fetch_all(&mut *c)
                    .await?;
                    sessions.sort();
                    for (sid, tenant) in &sessions {
                        append_in(
                            c,
                            keys,
                            &NewAudit::new(Some(tenant), "session.end", &actor, sid, None)
                                .with_detail(serde_json::json!({ "reason": "node_lost" })),
                        )
                        .await?;
                    }
                    append_in(
                        c,
                        keys,
                        &NewAudit::new(None, "node.lost", &actor, &id, None).with_detail(
                            serde_json::json!({
                                "heartbeat_at_ms": heartbeat_at_ms,
                                "executions": execs.len(),
                                "sessions": sessions.len(),
                            }),
                        ),
                    )
                    .await?;
                    lost.push(LostNode {
                        id,
                        heartbeat_at_ms,
                        executions: execs.into_iter().map(|e| e.0).collect(),
                        sessions: sessions.into_iter().map(|s| s.0).collect(),
                    });
                }
                Ok(lost)
            })
        })
        .await
    }

    async fn append_log(
        &self,
        execution_id: &str,
        level: &str,
        message: &str,
        fields: &serde_json::Value,
    ) -> Result<i64, StoreError> {
        let (id, level, message) = (
            execution_id.to_string(),
            level.to_string(),
            message.to_string(),
        );
        let fields = serde_json::to_string(fields).map_err(|e| StoreError::Db(e.to_string()))?;
        self.write_tx(move |c, _| {
            Box::pin(async move {
                let seq: i64 = sqlx::query_scalar(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM execution_logs WHERE execution_id = $1",
                )
                .bind(&id)
                .fetch_one(&mut *c)
                .await?;
                sqlx::query(
                    "INSERT INTO execution_logs (execution_id, seq, ts, level, message, fields) VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&id)
                .bind(seq)
                .bind(now_ms())
                .bind(&level)
                .bind(&message)
                .bind(&fields)
                .execute(&mut *c)
                .await?;
                Ok(seq)
            })
        })
        .await
    }

    async fn list_logs(
        &self,
        execution_id: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<LogRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, ts, level, message, fields FROM execution_logs
             WHERE execution_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(execution_id)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(LogRecord {
                    seq: r.try_get("seq")?,
                    ts_ms: r.try_get("ts")?,
                    level: r.try_get("level")?,
                    message: r.try_get("message")?,
                    fields: json_col(r, "fields")?.unwrap_or(serde_json::Value::Null),
                })
            })
            .collect()
    }

    async fn memory_get(
        &self,
        tenant_id: &str,
        flow_id: &str,
        key: &str,
    ) -> Result<Option<MemoryEntry>, StoreError> {
        let r = sqlx::query(
            "SELECT key, value, version, updated_at FROM memory WHERE tenant_id = $1 AND flow_id = $2 AND key = $3",
        )
        .bind(tenant_id)
        .bind(flow_id)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        r.as_ref().map(memory_row).transpose()
    }

    async fn memory_put(
        &self,
        tenant_id: &str,
        flow_id: &str,
        key: &str,
        value: &serde_json::Value,
        expected: Option<i64>,
        limits: MemoryLimits,
    ) -> Result<MemoryWrite, StoreError> {
        let (t, f, k) = (tenant_id.to_string(), flow_id.to_string(), key.to_string());
        let value = serde_json::to_string(value).map_err(|e| StoreError::Db(e.to_string()))?;
        // One write transaction: the version check and the write cannot
        // interleave with another writer's (compare-and-set is atomic).
        self.write_tx(move |c, _| {
            Box::pin(async move {
                live_tenant(c, &t).await?;
                let current: Option<i64> = sqlx::query_scalar(
                    "SELECT version FROM memory WHERE tenant_id = $1 AND flow_id = $2 AND key = $3",
                )
                .bind(&t)
                .bind(&f)
                .bind(&k)
                .fetch_optional(&mut *c)
                .await?;
                if let Some(want) = expected
                    && current.unwrap_or(0) != want
                {
                    return Ok(MemoryWrite::Conflict(current.unwrap_or(0)));
                }
                if current.is_none() {
                    let n: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM memory WHERE tenant_id = $1 AND flow_id = $2",
                    )
                    .bind(&t)
                    .bind(&f)
                    .fetch_one(&mut *c)
                    .await?;
                    if n >= limits.keys {
                        return Ok(MemoryWrite::QuotaExceeded);
                    }
                }
                // One tenant's memory, over all its flows, is bounded.
                let used: i64 = sqlx::query_scalar(
                    "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM memory
                     WHERE tenant_id = $1 AND NOT (flow_id = $2 AND key = $3)",
                )
                .bind(&t)
                .bind(&f)
                .bind(&k)
                .fetch_one(&mut *c)
                .await?;
                if used + (value.len() + k.len()) as i64 > limits.tenant_bytes {
                    return Ok(MemoryWrite::QuotaExceeded);
                }
                let version = current.unwrap_or(0) + 1;
                sqlx::query(
                    "INSERT INTO memory (tenant_id, flow_id, key, value, version, updated_at, size)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (tenant_id, flow_id, key) DO UPDATE SET
                       value = excluded.value, version = excluded.version,
                       updated_at = excluded.updated_at, size = excluded.size",
                )
                .bind(&t)
                .bind(&f)
                .bind(&k)
                .bind(&value)
                .bind(version)
                .bind(now_ms())
                .bind((value.len() + k.len()) as i64)
                .execute(&mut *c)
                .await?;
                Ok(MemoryWrite::Written(version))
            })
        })
        .await
    }

    async fn memory_delete(
        &self,
        tenant_id: &str,
        flow_id: &str,
        key: &str,
    ) -> Result<bool, StoreError> {
        let n =
            sqlx::query("DELETE FROM memory WHERE tenant_id = $1 AND flow_id = $2 AND key = $3")
                .bind(tenant_id)
                .bind(flow_id)
                .bind(key)
                .execute(&self.pool)
                .await?
                .rows_affected();
        Ok(n > 0)
    }

    async fn memory_list(
        &self,
        tenant_id: &str,
        flow_id: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<MemoryEntry>, StoreError> {
        // Prefix match by range, not LIKE: no wildcard characters to escape.
        let rows = sqlx::query(
            "SELECT key, 'null' AS value, version, updated_at FROM memory
             WHERE tenant_id = $1 AND flow_id = $2 AND key >= $3 AND substr(key, 1, length($4)) = $5
               AND key > $6 ORDER BY key LIMIT $7",
        )
        .bind(tenant_id)
        .bind(flow_id)
        .bind(prefix)
        .bind(prefix)
        .bind(prefix)
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(memory_row).collect()
    }

    async fn append_audit(&self, ev: NewAudit) -> Result<AuditEvent, StoreError> {
        self.write_tx(move |c, keys| Box::pin(async move { append_in(c, keys, &ev).await }))
            .await
    }

    async fn list_audit(
        &self,
        tenant_id: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, ts, tenant_id, kind, actor, subject, request_id, detail, prev_hash, hash
             FROM audit WHERE tenant_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(tenant_id)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(audit_row(r)?.event)).collect()
    }

    async fn audit_for_subject(
        &self,
        tenant_id: &str,
        subject: &str,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, ts, tenant_id, kind, actor, subject, request_id, detail, prev_hash, hash
             FROM audit WHERE tenant_id = $1 AND subject = $2 ORDER BY seq LIMIT $3",
        )
        .bind(tenant_id)
        .bind(subject)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(audit_row(r)?.event)).collect()
    }

    async fn verify_audit(&self) -> Result<VerifyReport, StoreError> {
        let mut v = Verifier::new(&self.keys);
        let mut after = 0i64;
        // Pages in storage order (the order rows were written), not by
        // `seq`: a reordered chain must be seen as stored, and a renumbered
        // row shows up as a gap.
        let q = format!(
            "SELECT {AUDIT_ORDER} AS r, seq, ts, tenant_id, kind, actor, subject, request_id, \
             detail, prev_hash, hash FROM audit WHERE {AUDIT_ORDER} > $1 ORDER BY {AUDIT_ORDER} \
             LIMIT 1000"
        );
        loop {
            let rows = sqlx::query(sqlx::AssertSqlSafe(q.clone()))
                .bind(after)
                .fetch_all(&self.pool)
                .await?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                after = r.try_get("r")?;
                if !v.feed(&audit_row(r)?) {
                    return Ok(v.finish());
                }
            }
        }
        Ok(v.finish())
    }

    async fn close(&self) {
        self.before_close().await;
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    //! The store's guarantees, checked on each database (these tests are
    //! compiled into both stores' modules).
    use super::super::TestDb;
    use super::*;
    use crate::MasterKey;

    fn keys() -> Keyring {
        Keyring::new(&MasterKey::from_hex(&"11".repeat(32)).unwrap())
    }

    fn admin() -> Actor {
        Actor {
            actor: "admin".into(),
            request_id: None,
        }
    }

    #[tokio::test]
    async fn secrets_sealed_scoped_and_audited() {
        let db = TestDb::new().await;
        let s = db.open(keys()).await.unwrap();
        let a = s.create_tenant("a", &admin()).await.unwrap();
        let b = s.create_tenant("b", &admin()).await.unwrap();
        assert!(matches!(
            s.create_tenant("a", &admin()).await,
            Err(StoreError::Conflict(_))
        ));
        let m = s
            .put_secret(&a.id, "token", b"plaintext-canary-7731", &admin())
            .await
            .unwrap();
        assert_eq!(m.version, 1);
        let m2 = s
            .put_secret(&a.id, "token", b"plaintext-canary-7732", &admin())
            .await
            .unwrap();
        assert_eq!(m2.version, 2);
        let (_, v) = s
            .get_secret(&a.id, "token", &admin())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&v[..], b"plaintext-canary-7732");
        // What the database was given, and so holds at rest: sealed bytes
        // without the plaintext; the name beside them is in clear (positive
        // control of the read).
        let (stored_name, sealed): (String, Vec<u8>) =
            sqlx::query_as("SELECT name, sealed FROM secrets WHERE tenant_id = $1")
                .bind(&a.id)
                .fetch_one(&s.pool)
                .await
                .unwrap();
        assert_eq!(stored_name, "token");
        assert!(sealed.len() > b"plaintext-canary-7732".len());
        assert!(!sealed.windows(9).any(|w| w == b"plaintext"));
        assert!(
            s.get_secret(&b.id, "token", &admin())
                .await
                .unwrap()
                .is_none()
        );
        let report = s.verify_audit().await.unwrap();
        assert_eq!(report.first_broken, None);
        assert_eq!(report.records, 6);
        s.close().await;
        // A different master key is refused before anything is read.
        let other = Keyring::new(&MasterKey::from_hex(&"22".repeat(32)).unwrap());
        assert!(matches!(
            db.open(other).await,
            Err(StoreError::WrongMasterKey)
        ));
        // Authentication: the issued key, a flipped secret, a revoked key.
        let s = db.open(keys()).await.unwrap();
        let (info, new) = s.create_api_key(&a.id, None, &admin()).await.unwrap();
        assert_eq!(
            s.authenticate(&new.key).await.unwrap(),
            AuthOutcome::Valid {
                tenant_id: a.id.clone(),
                key_id: info.id.clone()
            }
        );
        let mut forged = new.key.to_string();
        let last = if forged.ends_with('0') { "1" } else { "0" };
        forged.replace_range(forged.len() - 1.., last);
        assert_eq!(s.authenticate(&forged).await.unwrap(), AuthOutcome::Unknown);
        assert_eq!(
            s.authenticate("Bearer x").await.unwrap(),
            AuthOutcome::Malformed
        );
        assert!(s.revoke_api_key(&info.id, &admin()).await.unwrap());
        assert!(!s.revoke_api_key(&info.id, &admin()).await.unwrap());
        assert!(matches!(
            s.authenticate(&new.key).await.unwrap(),
            AuthOutcome::Revoked { .. }
        ));
        s.close().await;
        db.remove().await;
    }

    fn lim(keys: i64) -> MemoryLimits {
        MemoryLimits {
            keys,
            ..MemoryLimits::default()
        }
    }

    /// A request authenticated just before `tenant delete` reaches its
    /// write after it: nothing may be written for the deleted tenant, and
    /// nothing of its data is left in the file.
    #[tokio::test]
    async fn a_deleted_tenant_gets_no_writes_and_leaves_no_bytes() {
        let db = TestDb::new().await;
        let s = db.open(keys()).await.unwrap();
        let t = s.create_tenant("t", &admin()).await.unwrap();
        let rec = |id: &str| {
            ExecutionRecord::queued(
                id.into(),
                t.id.clone(),
                "python",
                "r".into(),
                "0".repeat(32),
                "f".into(),
                now_ms(),
            )
        };
        let v = serde_json::json!("memory-7f3e-marker");
        // Positive controls: every write works while the tenant lives.
        s.put_secret(&t.id, "S", b"secret-9b1d-marker", &admin())
            .await
            .unwrap();
        assert!(matches!(
            s.memory_put(&t.id, "f", "k", &v, None, lim(8))
                .await
                .unwrap(),
            MemoryWrite::Written(1)
        ));
        let (key, _) = s.create_api_key(&t.id, None, &admin()).await.unwrap();
        s.insert_execution(&rec("ex_1"), &admin()).await.unwrap();
        s.finish_execution(
            "ex_1",
            &Finish::new(ExecStatus::Finished, "exited", now_ms()),
        )
        .await
        .unwrap();
        let wrapped: Vec<u8> = sqlx::query_scalar("SELECT wrapped_dek FROM tenants WHERE id = $1")
            .bind(&t.id)
            .fetch_one(&s.pool)
            .await
            .unwrap();
        assert!(wrapped.len() >= 32);
        s.delete_tenant(&t.id, false, &admin()).await.unwrap();

        let gone = |r: Result<(), StoreError>| {
            assert!(matches!(r, Err(StoreError::TenantDeleted)), "{r:?}");
        };
        gone(s.insert_execution(&rec("ex_2"), &admin()).await);
        gone(
            s.memory_put(&t.id, "f", "k2", &v, None, lim(8))
                .await
                .map(|_| ()),
        );
        gone(s.put_secret(&t.id, "S2", b"x", &admin()).await.map(|_| ()));
        assert!(s.get_secret(&t.id, "S", &admin()).await.unwrap().is_none());
        assert!(
            s.rotate_api_key(&key.id, 0, None, &admin())
                .await
                .unwrap()
                .is_none()
        );
        // The data key is gone from the row whatever the database.
        let left: Vec<u8> = sqlx::query_scalar("SELECT wrapped_dek FROM tenants WHERE id = $1")
            .bind(&t.id)
            .fetch_one(&s.pool)
            .await
            .unwrap();
        assert!(left.is_empty());
        // What the database's own files still hold, where it can say.
        db.assert_scrubbed(&[&b"memory-7f3e-marker"[..], &wrapped]);
        s.close().await;
        db.remove().await;
    }

    #[tokio::test]
    async fn memory_quotas_and_cas() {
        let db = TestDb::new().await;
        let s = db.open(keys()).await.unwrap();
        let t = s.create_tenant("t", &admin()).await.unwrap();
        let v = serde_json::json!("x");
        for k in ["a", "b"] {
            assert!(matches!(
                s.memory_put(&t.id, "f", k, &v, None, lim(2)).await.unwrap(),
                MemoryWrite::Written(1)
            ));
        }
        // Third key over a limit of 2; rewriting an existing key is fine.
        assert_eq!(
            s.memory_put(&t.id, "f", "c", &v, None, lim(2))
                .await
                .unwrap(),
            MemoryWrite::QuotaExceeded
        );
        assert_eq!(
            s.memory_put(&t.id, "f", "a", &v, Some(1), lim(2))
                .await
                .unwrap(),
            MemoryWrite::Written(2)
        );
        assert_eq!(
            s.memory_put(&t.id, "f", "a", &v, Some(1), lim(2))
                .await
                .unwrap(),
            MemoryWrite::Conflict(2)
        );
        assert_eq!(
            s.memory_put(&t.id, "g", "new", &v, Some(0), lim(2))
                .await
                .unwrap(),
            MemoryWrite::Written(1)
        );
        // The tenant-wide byte cap, across flows.
        let small = MemoryLimits {
            keys: 10,
            tenant_bytes: 256 << 10,
        };
        let big = serde_json::json!("y".repeat(60 << 10));
        for i in 0..4 {
            assert!(matches!(
                s.memory_put(&t.id, &format!("f{i}"), "big", &big, None, small)
                    .await
                    .unwrap(),
                MemoryWrite::Written(1)
            ));
        }
        assert_eq!(
            s.memory_put(&t.id, "f9", "big", &big, None, small)
                .await
                .unwrap(),
            MemoryWrite::QuotaExceeded
        );
        // Listing by prefix returns keys without values.
        let l = s.memory_list(&t.id, "f", "", None, 10).await.unwrap();
        assert_eq!(
            l.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(l[0].value.is_null());
        s.close().await;
        db.remove().await;
    }

    #[tokio::test]
    async fn audit_chain_is_serialised_across_concurrent_writers() {
        let db = TestDb::new().await;
        let s = db.open(keys()).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..40 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.append_audit(NewAudit::new(None, "test", "t", &i.to_string(), None))
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let r = s.verify_audit().await.unwrap();
        assert_eq!((r.records, r.first_broken), (40, None));
        s.close().await;
        db.remove().await;
    }

    /// Two stores on one database (two server nodes, or a server and an
    /// admin command) appending at once still make one chain: no fork, no
    /// gap, every record there once.
    #[tokio::test]
    async fn two_stores_on_one_database_append_to_one_chain() {
        let db = TestDb::new().await;
        let (a, b) = (
            db.open(keys()).await.unwrap(),
            db.open(keys()).await.unwrap(),
        );
        let mut tasks = Vec::new();
        for i in 0..60 {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                s.append_audit(NewAudit::new(None, "test", "t", &i.to_string(), None))
                    .await
                    .unwrap()
                    .seq
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=60).collect::<Vec<i64>>());
        for s in [&a, &b] {
            let r = s.verify_audit().await.unwrap();
            assert_eq!((r.records, r.first_broken), (60, None));
        }
        a.close().await;
        b.close().await;
        db.remove().await;
    }

    /// The audit table refuses changes in the database itself, not only in
    /// this code: an UPDATE and a DELETE fail with the trigger's message
    /// and the chain still verifies (positive control: an append works).
    #[tokio::test]
    async fn the_database_keeps_the_audit_log_append_only() {
        let db = TestDb::new().await;
        let s = db.open(keys()).await.unwrap();
        s.append_audit(NewAudit::new(None, "test", "t", "x", None))
            .await
            .unwrap();
        for q in ["UPDATE audit SET kind = 'forged'", "DELETE FROM audit"] {
            let e = sqlx::query(q).execute(&s.pool).await.unwrap_err();
            assert!(
                e.to_string().contains("audit log is append-only"),
                "{q}: {e}"
            );
        }
        let r = s.verify_audit().await.unwrap();
        assert_eq!((r.records, r.first_broken), (1, None));
        s.close().await;
        db.remove().await;
    }

    /// Whoever gets past the database's triggers (its owner can) and
    /// edits, deletes or swaps records is caught by the chain, at the first
    /// record touched; the intact chain verifies (positive control).
    #[tokio::test]
    async fn an_edited_deleted_or_swapped_record_breaks_the_chain_where_it_is() {
        type Tamper = fn(&This) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>>;
        let cases: [(Tamper, i64, &str); 3] = [
            (
                |s| {
                    Box::pin(async move {
                        sqlx::query("UPDATE audit SET subject = 'forged' WHERE seq = 3")
                            .execute(&s.pool)
                            .await
                            .unwrap();
                    })
                },
                3,
                "edited",
            ),
            (
                |s| {
                    Box::pin(async move {
                        sqlx::query("DELETE FROM audit WHERE seq = 2")
                            .execute(&s.pool)
                            .await
                            .unwrap();
                    })
                },
                3,
                "deleted",
            ),
            (
                |s| {
                    Box::pin(async move {
                        let cols = "ts, tenant_id, kind, actor, subject, request_id, detail, \
                                    prev_hash, hash";
                        let q =
                            format!("SELECT {cols} FROM audit WHERE seq IN (4, 5) ORDER BY seq");
                        let rows = sqlx::query(sqlx::AssertSqlSafe(q))
                            .fetch_all(&s.pool)
                            .await
                            .unwrap();
                        for (r, seq) in rows.iter().zip([5i64, 4]) {
                            sqlx::query(
                                "UPDATE audit SET ts = $1, tenant_id = $2, kind = $3, actor = $4, \
                                 subject = $5, request_id = $6, detail = $7, prev_hash = $8, \
                                 hash = $9 WHERE seq = $10",
                            )
                            .bind(r.get::<i64, _>("ts"))
                            .bind(r.get::<Option<String>, _>("tenant_id"))
                            .bind(r.get::<String, _>("kind"))
                            .bind(r.get::<String, _>("actor"))
                            .bind(r.get::<String, _>("subject"))
                            .bind(r.get::<Option<String>, _>("request_id"))
                            .bind(r.get::<String, _>("detail"))
                            .bind(r.get::<Vec<u8>, _>("prev_hash"))
                            .bind(r.get::<Vec<u8>, _>("hash"))
                            .bind(seq)
                            .execute(&s.pool)
                            .await
                            .unwrap();
                        }
                    })
                },
                4,
                "reordered",
            ),
        ];
        for (tamper, at, why) in cases {
            let db = TestDb::new().await;
            let s = db.open(keys()).await.unwrap();
            for i in 0..6 {
                s.append_audit(NewAudit::new(None, "test", "t", &i.to_string(), None))
                    .await
                    .unwrap();
            }
            let r = s.verify_audit().await.unwrap();
            assert_eq!((r.records, r.first_broken), (6, None));
            db.without_audit_triggers(&s).await;
            tamper(&s).await;
            let r = s.verify_audit().await.unwrap();
            let (seq, reason) = r
                .first_broken
                .unwrap_or_else(|| panic!("{why}: not caught"));
            assert_eq!(seq, at, "{why}: {reason}");
            assert!(reason.contains(why), "{why}: {reason}");
            s.close().await;
            db.remove().await;
        }
    }

    /// Keys, names and cursors compare byte by byte on every database (a
    /// PostgreSQL default collation would put "a" before "B" and break the
    /// prefix range and the cursors).
    #[tokio::test]
    async fn memory_keys_list_in_byte_order() {
        let db = TestDb::new().await;
        let s = db.open(keys()).await.unwrap();
        let t = s.create_tenant("t", &admin()).await.unwrap();
        let v = serde_json::json!(1);
        for k in ["p/b", "p/a", "p/B", "p/_", "p/\u{e9}", "q", "p"] {
            s.memory_put(&t.id, "f", k, &v, None, lim(100))
                .await
                .unwrap();
        }
        let keys_of = |l: Vec<MemoryEntry>| l.into_iter().map(|e| e.key).collect::<Vec<_>>();
        let all = keys_of(s.memory_list(&t.id, "f", "p/", None, 10).await.unwrap());
        assert_eq!(all, ["p/B", "p/_", "p/a", "p/b", "p/\u{e9}"]);
        let after = keys_of(
            s.memory_list(&t.id, "f", "p/", Some("p/_"), 2)
                .await
                .unwrap(),
        );
        assert_eq!(after, ["p/a", "p/b"]);
        s.close().await;
        db.remove().await;
    }

    fn node(id: &str, at: i64) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            name: format!("host-{id}"),
            url: Some(format!("http://127.0.0.1/{id}")),
            pid: 4242,
            started_at_ms: at,
            heartbeat_at_ms: at,
            state: "active".into(),
            lost_after_ms: 30_000,
        }
    }

    /// A node whose heartbeat stopped is declared lost once, by one node:
    /// its unfinished executions fail with `node_lost` (their host state
    /// kept for it to reap), its sessions end, each audited in one chain;
    /// the other node's work and a stopped node are untouched, the lost
    /// node's heartbeat is refused until it registers again, and its
    /// recovery then sees only its own leftovers.
    #[tokio::test]
    async fn a_lost_node_loses_only_its_own_work_once() {
        let db = TestDb::new().await;
        let (sa, sb) = (
            db.open(keys()).await.unwrap(),
            db.open(keys()).await.unwrap(),
        );
        let t = sa.create_tenant("t", &admin()).await.unwrap();
        let t0 = now_ms();
        assert_eq!(sa.register_node(&node("nd_a", t0)).await.unwrap(), None);
        assert_eq!(sb.register_node(&node("nd_b", t0)).await.unwrap(), None);
        assert_eq!(sb.register_node(&node("nd_c", t0)).await.unwrap(), None);
        sb.stop_node("nd_c").await.unwrap();
        // A node with a longer lease of its own than the others'.
        let patient = NodeRecord {
            lost_after_ms: 120_000,
            ..node("nd_d", t0)
        };
        assert_eq!(sb.register_node(&patient).await.unwrap(), None);
        let exec = |id: &str, node: &str| ExecutionRecord {
            node_id: Some(node.into()),
            ..ExecutionRecord::queued(
                id.into(),
                t.id.clone(),
                "python",
                "r".into(),
                "0".repeat(32),
                "f".into(),
                now_ms(),
            )
        };
        for (id, n) in [("ex_a1", "nd_a"), ("ex_a2", "nd_a"), ("ex_b1", "nd_b")] {
            sa.insert_execution(&exec(id, n), &admin()).await.unwrap();
        }
        sa.mark_running("ex_a1", now_ms(), r#"{"backend":"process","cgroup":"x"}"#)
            .await
            .unwrap();
        let session = |id: &str, node: &str| SessionRecord {
            id: id.into(),
            tenant_id: t.id.clone(),
            language: "python".into(),
            backend: "process".into(),
            policy: serde_json::json!({}),
            workspace_mib: 16,
            workspace_files: 100,
            idle_timeout_ms: 60_000,
            created_at_ms: now_ms(),
            expires_at_ms: now_ms() + 60_000,
            ended_at_ms: None,
            end_reason: None,
            snapshot_after_exec: false,
            node_id: Some(node.into()),
        };
        sa.insert_session(&session("ss_a", "nd_a"), &admin())
            .await
            .unwrap();
        sa.insert_session(&session("ss_b", "nd_b"), &admin())
            .await
            .unwrap();
        // Positive control: nothing is stale while heartbeats are fresh.
        assert!(
            sb.fail_lost_nodes("nd_b", now_ms())
                .await
                .unwrap()
                .is_empty()
        );
        assert!(sb.node_heartbeat("nd_b").await.unwrap());
        // nd_a's and nd_d's last heartbeats are a minute old on the
        // database's clock: past nd_a's lease (30 s), within nd_d's (120 s).
        sqlx::query(
            "UPDATE nodes SET heartbeat_at = heartbeat_at - 60000 WHERE id IN ('nd_a', 'nd_d')",
        )
        .execute(&sa.pool)
        .await
        .unwrap();
        let (lost, again) = tokio::join!(
            sb.fail_lost_nodes("nd_b", now_ms()),
            sa.fail_lost_nodes("nd_c", now_ms()),
        );
        let (lost, again) = (lost.unwrap(), again.unwrap());
        let lost = if lost.is_empty() {
            again
        } else {
            assert!(again.is_empty(), "declared twice: {again:?}");
            lost
        };
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert_eq!(lost[0].id, "nd_a");
        assert_eq!(lost[0].executions, ["ex_a1", "ex_a2"]);
        assert_eq!(lost[0].sessions, ["ss_a"]);
        assert!(
            sb.fail_lost_nodes("nd_b", now_ms())
                .await
                .unwrap()
                .is_empty()
        );
        for id in ["ex_a1", "ex_a2"] {
            let r = sa.execution(&t.id, id).await.unwrap().unwrap();
            assert_eq!(
                (r.status, r.reason.as_deref()),
                (ExecStatus::Failed, Some("node_lost"))
            );
        }
        let b1 = sa.execution(&t.id, "ex_b1").await.unwrap().unwrap();
        assert_eq!((b1.status, b1.reason), (ExecStatus::Queued, None));
        let ss = sa.session(&t.id, "ss_a").await.unwrap().unwrap();
        assert_eq!(ss.end_reason.as_deref(), Some("node_lost"));
        assert_eq!(
            sa.session(&t.id, "ss_b")
                .await
                .unwrap()
                .unwrap()
                .ended_at_ms,
            None
        );
        assert_eq!(sa.node("nd_a").await.unwrap().unwrap().state, "lost");
        assert_eq!(sa.node("nd_c").await.unwrap().unwrap().state, "stopped");
        let d = sa.node("nd_d").await.unwrap().unwrap();
        assert_eq!((d.state.as_str(), d.lost_after_ms), ("active", 120_000));
        // The lost node is fenced: its heartbeat no longer renews anything.
        assert!(!sa.node_heartbeat("nd_a").await.unwrap());
        // What it finds when it comes back: only its own work, the failed
        // execution whose host state is still named among it.
        let left: Vec<String> = sa
            .leftover_executions("nd_a")
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(left, ["ex_a1"]);
        let mine: Vec<String> = sb
            .leftover_executions("nd_b")
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(mine, ["ex_b1"]);
        assert!(sa.open_sessions("nd_a").await.unwrap().is_empty());
        assert_eq!(sb.open_sessions("nd_b").await.unwrap().len(), 1);
        sa.clear_host_state("ex_a1").await.unwrap();
        assert!(sa.leftover_executions("nd_a").await.unwrap().is_empty());
        // An unfinished execution's host state is not forgotten.
        sa.mark_running("ex_b1", now_ms(), "{}").await.unwrap();
        sa.clear_host_state("ex_b1").await.unwrap();
        assert!(
            sa.execution(&t.id, "ex_b1")
                .await
                .unwrap()
                .unwrap()
                .host_state
                .is_some()
        );
        let back = sa
            .register_node(&node("nd_a", now_ms()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back.state, "lost");
        assert!(sa.node_heartbeat("nd_a").await.unwrap());
        let nodes: Vec<String> = sa
            .list_nodes()
            .await
            .unwrap()
            .into_iter()
            .map(|n| n.id)
            .collect();
        assert_eq!(nodes.len(), 4);
        // One chain, with the loss in it, by the node that declared it.
        let report = sa.verify_audit().await.unwrap();
        assert_eq!(report.first_broken, None);
        let chain: Vec<(String, String, String)> =
            sqlx::query_as("SELECT kind, actor, subject FROM audit ORDER BY seq")
                .fetch_all(&sa.pool)
                .await
                .unwrap();
        let lost_ev: Vec<_> = chain.iter().filter(|e| e.0 == "node.lost").collect();
        assert_eq!(lost_ev.len(), 1, "{chain:?}");
        assert_eq!(lost_ev[0].2, "nd_a");
        assert!(lost_ev[0].1.starts_with("node:nd_"), "{:?}", lost_ev[0]);
        let failed = chain
            .iter()
            .filter(|e| e.0 == "execution.finish" && e.2.starts_with("ex_a"))
            .count();
        assert_eq!(failed, 2);
        sa.close().await;
        sb.close().await;
        db.remove().await;
    }
}
