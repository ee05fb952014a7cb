//! The audit chain: record shape, canonical encoding and verification.
//!
//! Record `n` stores `hash_n = MAC(hash_{n-1}, encode(record_n))` with
//! `hash_0` = 32 zero bytes, where MAC is BLAKE3 keyed with a key derived
//! from the master key. `seq` is part of the encoding and must run 1, 2, 3,
//! ... without gaps, so an edited record breaks its own hash, a deleted one
//! leaves a gap and breaks its successor's link, and a reordered pair
//! breaks both links. Truncation of the newest records is detectable only
//! against an anchored head (`verify` reports the head so operators can
//! anchor it elsewhere).

use serde::{Deserialize, Serialize};

use crate::crypto::Keyring;

/// A record to append.
#[derive(Debug, Clone)]
pub struct NewAudit {
    /// Tenant the event belongs to (`None` for platform events such as an
    /// unauthenticated request).
    pub tenant_id: Option<String>,
    /// Dotted kind, e.g. `secret.write`.
    pub kind: String,
    /// Who caused it.
    pub actor: String,
    /// What it concerns (an execution id, a secret name, a key id).
    pub subject: String,
    /// Request id, when there is one.
    pub request_id: Option<String>,
    /// Structured details (never secret values).
    pub detail: serde_json::Value,
}

impl NewAudit {
    /// A record with empty detail.
    pub fn new(
        tenant_id: Option<&str>,
        kind: &str,
        actor: &str,
        subject: &str,
        request_id: Option<&str>,
    ) -> Self {
        NewAudit {
            tenant_id: tenant_id.map(str::to_string),
            kind: kind.into(),
            actor: actor.into(),
            subject: subject.into(),
            request_id: request_id.map(str::to_string),
            detail: serde_json::Value::Object(Default::default()),
        }
    }

    /// Sets the detail document.
    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }
}

/// A stored record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditEvent {
    /// Position in the chain, from 1.
    pub seq: i64,
    /// Time, Unix ms.
    pub ts_ms: i64,
    /// Tenant.
    pub tenant_id: Option<String>,
    /// Kind.
    pub kind: String,
    /// Actor.
    pub actor: String,
    /// Subject.
    pub subject: String,
    /// Request id.
    pub request_id: Option<String>,
    /// Detail, as stored (JSON text).
    pub detail: String,
    /// Hex of this record's link.
    pub hash: String,
}

/// The result of walking the chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records checked.
    pub records: i64,
    /// Seq and hash of the newest record (anchor this elsewhere).
    pub head: Option<(i64, String)>,
    /// The first broken record and why, or `None` when intact.
    pub first_broken: Option<(i64, String)>,
}

/// Canonical, unambiguous encoding of a record's content: each field
/// length-prefixed, optional fields tagged.
#[allow(clippy::too_many_arguments)]
pub fn encode(
    seq: i64,
    ts_ms: i64,
    tenant_id: Option<&str>,
    kind: &str,
    actor: &str,
    subject: &str,
    request_id: Option<&str>,
    detail: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + detail.len());
    out.extend_from_slice(b"airlock-audit-v1");
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&ts_ms.to_le_bytes());
    let mut field = |v: Option<&str>| match v {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    };
    field(tenant_id);
    field(Some(kind));
    field(Some(actor));
    field(Some(subject));
    field(request_id);
    field(Some(detail));
    out
}

/// A row as read back for verification.
#[derive(Debug)]
pub struct StoredRow {
    /// Fields as stored.
    pub event: AuditEvent,
    /// Stored previous link.
    pub prev_hash: Vec<u8>,
    /// Stored link.
    pub hash: Vec<u8>,
}

/// Incremental chain verifier: feed rows in `seq` order.
#[derive(Debug)]
pub struct Verifier<'a> {
    keys: &'a Keyring,
    expected_seq: i64,
    prev: Vec<u8>,
    report: VerifyReport,
}

impl<'a> Verifier<'a> {
    /// Starts at the genesis link.
    pub fn new(keys: &'a Keyring) -> Self {
        Verifier {
            keys,
            expected_seq: 1,
            prev: vec![0u8; 32],
            report: VerifyReport {
                records: 0,
                head: None,
                first_broken: None,
            },
        }
    }

    /// Checks one row; returns false once the chain is broken.
    pub fn feed(&mut self, row: &StoredRow) -> bool {
        if self.report.first_broken.is_some() {
            return false;
        }
        self.report.records += 1;
        let e = &row.event;
        let broken = if e.seq != self.expected_seq {
            Some(format!(
                "expected record {} here, found {} (a record was deleted or reordered)",
                self.expected_seq, e.seq
            ))
        } else if row.prev_hash != self.prev {
            Some("its link to the previous record does not match (deleted or reordered)".into())
        } else {
            let enc = encode(
                e.seq,
                e.ts_ms,
                e.tenant_id.as_deref(),
                &e.kind,
                &e.actor,
                &e.subject,
                e.request_id.as_deref(),
                &e.detail,
            );
            let want = self.keys.audit_hash(&row.prev_hash, &enc);
            (want.as_slice() != row.hash.as_slice())
                .then(|| "its content does not match its hash (edited)".to_string())
        };
        if let Some(why) = broken {
            self.report.first_broken = Some((e.seq, why));
            return false;
        }
        self.expected_seq += 1;
        self.prev = row.hash.clone();
        self.report.head = Some((e.seq, crate::crypto::hex(&row.hash)));
        true
    }

    /// The report.
    pub fn finish(self) -> VerifyReport {
        self.report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_unambiguous() {
        let a = encode(1, 2, Some("ab"), "c", "d", "e", None, "{}");
        let b = encode(1, 2, Some("a"), "bc", "d", "e", None, "{}");
        let c = encode(1, 2, None, "abc", "d", "e", None, "{}");
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_ne!(b, c);
    }
}
