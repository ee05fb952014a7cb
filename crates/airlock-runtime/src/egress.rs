//! One execution's egress decisions: kept in its record (bounded), in the
//! audit chain (the first ones one by one, then one summary), with secret
//! values redacted from every field.

use std::sync::{Arc, Mutex};

use airlock_store::{NewAudit, Store};
use tokio::runtime::Handle;

/// Egress decisions kept in an execution's record, per kind: denials
/// (which a program can produce at will) never crowd out what got through.
const EGRESS_LOG_MAX: usize = 256;
/// Egress decisions audited one by one per execution, per kind; beyond
/// that they are counted, and one `egress.summary` record at the end says
/// how many more there were (a program can open thousands of connections a
/// second: the audit chain must not grow with them).
const EGRESS_AUDIT_MAX: u64 = 64;
/// Distinct destinations named in the summary.
const EGRESS_SUMMARY_HOSTS: usize = 32;

/// What one kind of egress decision (allowed or denied) added up to.
#[derive(Debug, Default)]
struct EgressTally {
    /// Decisions of this kind.
    total: u64,
    /// Kept in the record.
    logged: usize,
    /// Bytes up and down of those not audited one by one.
    unaudited_up: u64,
    unaudited_down: u64,
    /// `host:port` -> decisions not audited one by one (bounded).
    unaudited_hosts: std::collections::BTreeMap<String, u64>,
}

impl EgressTally {
    fn unaudited(&self) -> u64 {
        self.total.saturating_sub(EGRESS_AUDIT_MAX)
    }

    fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "total": self.total,
            "audited": self.total.min(EGRESS_AUDIT_MAX),
            "not_audited": self.unaudited(),
            "not_audited_bytes_up": self.unaudited_up,
            "not_audited_bytes_down": self.unaudited_down,
            "not_audited_destinations": self.unaudited_hosts,
        })
    }
}

/// Records one execution's egress decisions: in its record (bounded), in
/// the audit chain (each of the first [`EGRESS_AUDIT_MAX`] per kind, then
/// one summary), with secret values redacted from every field (a program
/// can put a value it read into a host name).
pub(crate) struct EgressRecorder {
    pub(crate) tenant: String,
    pub(crate) execution: String,
    pub(crate) request: String,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) rt: Handle,
    pub(crate) redactor: Arc<airlock_broker::Redactor>,
    pub(crate) state: Mutex<EgressState>,
}

#[derive(Default)]
pub(crate) struct EgressState {
    log: Vec<serde_json::Value>,
    allowed: EgressTally,
    denied: EgressTally,
    /// Audit appends in flight, awaited before the record is final.
    pending: Vec<tokio::task::JoinHandle<()>>,
}

impl EgressRecorder {
    pub(crate) fn record(&self, mut ev: airlock_egress::EgressEvent) {
        // Redacted as text that may have been cut (the proxy bounds what it
        // reports, which can cut a value), then bounded again: a marker can
        // be longer than what it hides.
        let r = &self.redactor;
        for (field, max) in [(&mut ev.host, 255), (&mut ev.method, 16)] {
            *field = r.redact_truncated(field);
            airlock_broker::redact::cut_to(field, max);
        }
        for (field, max) in [(&mut ev.reason, 300), (&mut ev.address, 64)] {
            if let Some(f) = field {
                *f = r.redact_truncated(f);
                airlock_broker::redact::cut_to(f, max);
            }
        }
        let v = serde_json::to_value(&ev).unwrap_or_default();
        let subject = format!("{}:{}", ev.host, ev.port);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let st = &mut *st;
        let tally = if ev.decision == "allowed" {
            &mut st.allowed
        } else {
            &mut st.denied
        };
        tally.total += 1;
        if tally.logged < EGRESS_LOG_MAX {
            tally.logged += 1;
            st.log.push(v.clone());
        }
        if tally.total > EGRESS_AUDIT_MAX {
            tally.unaudited_up += ev.bytes_up;
            tally.unaudited_down += ev.bytes_down;
            let n = tally.unaudited_hosts.len();
            if let Some(c) = tally.unaudited_hosts.get_mut(&subject) {
                *c += 1;
            } else if n < EGRESS_SUMMARY_HOSTS {
                tally.unaudited_hosts.insert(subject, 1);
            }
            return;
        }
        let audit = NewAudit::new(
            Some(&self.tenant),
            &format!("egress.{}", ev.decision),
            &format!("execution:{}", self.execution),
            &subject,
            Some(&self.request),
        )
        .with_detail(v);
        let store = self.store.clone();
        st.pending.push(self.rt.spawn(async move {
            if let Err(e) = store.append_audit(audit).await {
                tracing::error!(error = %e, "egress audit failed");
            }
        }));
    }

    /// Once the proxy has stopped: waits for the audits, appends the
    /// summary when decisions went unaudited, and returns the record's log.
    pub(crate) fn finish(&self) -> Vec<serde_json::Value> {
        let (pending, summary, log) = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let summary = (st.allowed.unaudited() + st.denied.unaudited() > 0).then(|| {
                serde_json::json!({
                    "allowed": st.allowed.summary(),
                    "denied": st.denied.summary(),
                })
            });
            (
                std::mem::take(&mut st.pending),
                summary,
                std::mem::take(&mut st.log),
            )
        };
        self.rt.block_on(async {
            for h in pending {
                let _ = h.await;
            }
            if let Some(detail) = summary {
                let audit = NewAudit::new(
                    Some(&self.tenant),
                    "egress.summary",
                    &format!("execution:{}", self.execution),
                    &self.execution,
                    Some(&self.request),
                )
                .with_detail(detail);
                if let Err(e) = self.store.append_audit(audit).await {
                    tracing::error!(error = %e, "egress audit failed");
                }
            }
        });
        log
    }
}
