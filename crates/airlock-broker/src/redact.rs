//! Secret redaction: every value of a secret read during an execution is
//! replaced by `[REDACTED:name]` in its logs, stdout, stderr and output
//! before anything is stored or streamed.
//!
//! Values shorter than [`MIN_REDACT_LEN`] bytes are not redacted: a one- or
//! two-character "secret" would shred all output and protects nothing.

use std::sync::Mutex;

use serde_json::Value;
use zeroize::Zeroizing;

/// Shortest value that is redacted.
pub const MIN_REDACT_LEN: usize = 4;

/// The secret values of one execution.
#[derive(Default)]
pub struct Redactor {
    secrets: Mutex<Vec<(String, Zeroizing<String>)>>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Redactor(..)")
    }
}

/// Non-overlapping occurrences (start, end, index of secret), leftmost
/// first, longest first at the same start.
fn spans(secrets: &[(String, Zeroizing<String>)], text: &str) -> Vec<(usize, usize, usize)> {
    let mut all = Vec::new();
    for (i, (_, v)) in secrets.iter().enumerate() {
        for (at, m) in text.match_indices(v.as_str()) {
            all.push((at, at + m.len(), i));
        }
    }
    all.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    // Overlapping occurrences (of two secrets, or of one with itself)
    // merge into one redacted span, so no part of either survives.
    let mut out: Vec<(usize, usize, usize)> = Vec::new();
    for s in all {
        match out.last_mut() {
            Some(l) if s.0 < l.1 => l.1 = l.1.max(s.1),
            _ => out.push(s),
        }
    }
    out
}

impl Redactor {
    /// Adds a secret value to redact from now on.
    pub fn add(&self, name: &str, value: &str) {
        if value.len() < MIN_REDACT_LEN {
            return;
        }
        let mut g = self.secrets.lock().unwrap_or_else(|p| p.into_inner());
        // The value as it is, and as it appears inside a JSON string (a PEM
        // key printed with json.dumps has its newlines escaped).
        let escaped = serde_json::to_string(value)
            .ok()
            .map(|q| q[1..q.len() - 1].to_string());
        for v in std::iter::once(value.to_string()).chain(escaped) {
            if !g.iter().any(|(_, x)| x.as_str() == v) {
                g.push((name.to_string(), Zeroizing::new(v)));
            }
        }
    }

    /// Like [`Redactor::redact`], for text that was cut at a size limit:
    /// a tail that is the start of a value is redacted too.
    pub fn redact_truncated(&self, text: &str) -> String {
        let mut out = self.redact(text);
        let g = self.secrets.lock().unwrap_or_else(|p| p.into_inner());
        let mut best: Option<(usize, usize)> = None;
        for (i, (_, v)) in g.iter().enumerate() {
            let max = (v.len() - 1).min(out.len());
            for k in (MIN_REDACT_LEN.min(v.len() - 1).max(1)..=max).rev() {
                if out.is_char_boundary(out.len() - k)
                    && v.is_char_boundary(k)
                    && out.ends_with(&v[..k])
                {
                    if best.is_none_or(|(bk, _)| k > bk) {
                        best = Some((k, i));
                    }
                    break;
                }
            }
        }
        if let Some((k, i)) = best {
            let cut = out.len() - k;
            out.truncate(cut);
            out.push_str(&format!("[REDACTED:{}]", g[i].0));
        }
        out
    }

    /// Length in bytes of the longest value.
    pub fn max_len(&self) -> usize {
        let g = self.secrets.lock().unwrap_or_else(|p| p.into_inner());
        g.iter().map(|(_, v)| v.len()).max().unwrap_or(0)
    }

    /// `text` with every value replaced.
    pub fn redact(&self, text: &str) -> String {
        let g = self.secrets.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_empty() {
            return text.to_string();
        }
        let mut out = String::with_capacity(text.len());
        let mut pos = 0;
        for (s, e, i) in spans(&g, text) {
            out.push_str(&text[pos..s]);
            out.push_str(&format!("[REDACTED:{}]", g[i].0));
            pos = e;
        }
        out.push_str(&text[pos..]);
        out
    }

    /// Redacts every string (and object key) inside a JSON value.
    pub fn redact_json(&self, v: &mut Value) {
        match v {
            Value::String(s) => *s = self.redact(s),
            Value::Array(a) => a.iter_mut().for_each(|x| self.redact_json(x)),
            Value::Object(m) => {
                let old = std::mem::take(m);
                for (k, mut x) in old {
                    self.redact_json(&mut x);
                    m.insert(self.redact(&k), x);
                }
            }
            _ => {}
        }
    }
}

/// Redaction of a stream that arrives in chunks: holds back just enough
/// text that a value split across chunks is still caught.
#[derive(Debug, Default)]
pub struct StreamRedactor {
    carry: String,
}

impl StreamRedactor {
    /// Feeds text; returns what can be released now, redacted.
    pub fn push(&mut self, r: &Redactor, text: &str) -> String {
        self.carry.push_str(text);
        let hold = r.max_len().saturating_sub(1);
        let mut cut = self.carry.len().saturating_sub(hold);
        while !self.carry.is_char_boundary(cut) {
            cut -= 1;
        }
        // A complete occurrence that straddles the cut is released whole.
        {
            let g = r.secrets.lock().unwrap_or_else(|p| p.into_inner());
            for (s, e, _) in spans(&g, &self.carry) {
                if s < cut && e > cut {
                    cut = e;
                }
            }
        }
        let rest = self.carry.split_off(cut);
        let out = r.redact(&self.carry);
        self.carry = rest;
        out
    }

    /// Releases whatever is held, redacted.
    pub fn finish(&mut self, r: &Redactor) -> String {
        let all = std::mem::take(&mut self.carry);
        r.redact(&all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_values_and_json() {
        let r = Redactor::default();
        r.add("db", "hunter22");
        r.add("tiny", "ab");
        assert_eq!(r.redact("pw=hunter22, ab"), "pw=[REDACTED:db], ab");
        let mut v = serde_json::json!({"a": ["x hunter22 y"], "hunter22": 1});
        r.redact_json(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"a": ["x [REDACTED:db] y"], "[REDACTED:db]": 1})
        );
    }

    #[test]
    fn overlapping_values_and_escaped_forms_and_cut_tails() {
        let r = Redactor::default();
        r.add("A", "abcdXYZ1");
        r.add("B", "XYZ1-second-secret");
        let out = r.redact("..abcdXYZ1-second-secret..");
        assert!(!out.contains("second") && !out.contains("abcd"), "{out}");
        r.add("PEM", "line1\nline2");
        let json = serde_json::to_string("line1\nline2").unwrap();
        assert_eq!(r.redact(&json), "\"[REDACTED:PEM]\"");
        assert_eq!(
            r.redact_truncated("output ends with XYZ1-sec"),
            "output ends with [REDACTED:B]"
        );
        assert_eq!(r.redact_truncated("harmless tail"), "harmless tail");
    }

    #[test]
    fn stream_catches_values_split_across_chunks() {
        let r = Redactor::default();
        r.add("k", "s3cr3t-value");
        let mut s = StreamRedactor::default();
        let mut out = String::new();
        for chunk in ["prefix s3c", "r3t-va", "lue suffix and s3cr3t-value", "!"] {
            out.push_str(&s.push(&r, chunk));
        }
        out.push_str(&s.finish(&r));
        assert_eq!(out, "prefix [REDACTED:k] suffix and [REDACTED:k]!");
        assert!(!out.contains("s3cr3t"));
    }
}
