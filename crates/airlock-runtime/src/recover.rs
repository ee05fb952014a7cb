//! Crash recovery of one node: after an unclean stop, every execution the
//! store still shows as queued or running on this node is failed with
//! `server_restart`, and every backend destroys what the dead process left
//! of its sandboxes: what the records name (also of executions another node
//! failed with `node_lost` meanwhile), then anything else the dead process
//! made. Other nodes' work is never touched: on a shared database it is
//! theirs, alive or failed by their peers.

use airlock_backend::{Backends, TerminationReason};
use airlock_store::{ExecStatus, Finish, NewAudit, Store, StoreError, now_ms};

/// Fails the previous run's unfinished executions of node `node_id` and
/// reaps their host state. Returns (executions failed, host objects
/// reaped); audited as `server.recovered` when there was anything.
pub async fn recover(
    store: &dyn Store,
    backends: &Backends,
    node_id: &str,
    previous_pid: Option<u32>,
) -> Result<(usize, usize), StoreError> {
    let mut reaped = 0;
    let mut failed = 0;
    let leftovers = store.leftover_executions(node_id).await?;
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
        if rec.status.is_terminal() {
            // Failed by another node while this one was gone: only its host
            // state was left to reap.
            store.clear_host_state(&rec.id).await?;
            continue;
        }
        let fin = store
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
            .await;
        match fin {
            Ok(()) => failed += 1,
            // Another node declared this one lost meanwhile and failed it
            // first: its record is final, which is all recovery wants.
            Err(StoreError::NotFound(_)) => store.clear_host_state(&rec.id).await?,
            Err(e) => return Err(e),
        }
    }
    for b in backends.all() {
        reaped += b.reap_stale(previous_pid);
    }
    if !leftovers.is_empty() || reaped > 0 {
        store
            .append_audit(
                NewAudit::new(None, "server.recovered", "server", node_id, None).with_detail(
                    serde_json::json!({ "executions": failed, "cgroups_reaped": reaped }),
                ),
            )
            .await?;
    }
    Ok((failed, reaped))
}
