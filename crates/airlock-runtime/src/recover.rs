//! Crash recovery: after an unclean stop, every execution the store still
//! shows as queued or running is failed with `server_restart`, and every
//! backend destroys what the dead server left of its sandboxes: what the
//! records name, then anything else the dead process made.

use airlock_backend::{Backends, TerminationReason};
use airlock_store::{ExecStatus, Finish, NewAudit, Store, StoreError, now_ms};

/// Fails the previous server's unfinished executions and reaps their host
/// state. Returns (executions failed, host objects reaped); audited as
/// `server.recovered` when there was anything.
pub async fn recover(
    store: &dyn Store,
    backends: &Backends,
    previous_pid: Option<u32>,
) -> Result<(usize, usize), StoreError> {
    let mut reaped = 0;
    let leftovers = store.unfinished_executions().await?;
    for rec in &leftovers {
        if let Some(hs) = rec
            .host_state
            .as_deref()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        {
            // Records from before backends were named are the process
            // backend's.
            let name = hs
                .get("backend")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("process");
            if let Some(b) = backends.by_name(name) {
                reaped += b.reap(&hs);
            }
        }
        store
            .finish_execution(
                &rec.id,
                &Finish {
                    error: Some("the server stopped unexpectedly while this execution ran"),
                    ..Finish::new(
                        ExecStatus::Failed,
                        TerminationReason::ServerRestart.as_str(),
                        now_ms(),
                    )
                },
            )
            .await?;
    }
    for b in backends.all() {
        reaped += b.reap_stale(previous_pid);
    }
    if !leftovers.is_empty() || reaped > 0 {
        store
            .append_audit(
                NewAudit::new(None, "server.recovered", "server", "", None).with_detail(
                    serde_json::json!({ "executions": leftovers.len(), "cgroups_reaped": reaped }),
                ),
            )
            .await?;
    }
    Ok((leftovers.len(), reaped))
}
