//! Secret redaction: every value of a secret read during an execution is
//! replaced by `[REDACTED:name]` in its logs, stdout, stderr and output
//! before anything is stored or streamed.
//!
//! Values shorter than [`MIN_REDACT_LEN`] bytes are not redacted: a one- or
//! two-character "secret" would shred all output and protects nothing.
//!
//! A marker can be longer than the value it hides (a 4-byte value under a
//! 128-character name), so redaction can grow data. Every size cap is
//! therefore applied to the redacted text, the text that is actually
//! stored, streamed or sent: [`cut_to`] and [`StreamRedactor`]'s cap here,
//! and the broker's checks after redaction.

use std::sync::Mutex;

use serde_json::Value;
use zeroize::Zeroizing;

/// Shortest value that is redacted.
pub const MIN_REDACT_LEN: usize = 4;

/// Most text a stream holds back for an occurrence that may still grow.
const MAX_HOLD: usize = 64 << 10;

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

/// Non-overlapping spans to redact (start, end, index of a secret in it),
/// leftmost first. Every occurrence counts, also one that overlaps another
/// occurrence of the same value (`abXab` in `abXabXab`), so no byte of any
/// occurrence survives.
fn spans(secrets: &[(String, Zeroizing<String>)], text: &str) -> Vec<(usize, usize, usize)> {
    let mut all = Vec::new();
    for (i, (_, v)) in secrets.iter().enumerate() {
        let v = v.as_str();
        let mut from = 0;
        while let Some(at) = text[from..].find(v).map(|a| a + from) {
            all.push((at, at + v.len(), i));
            // The next search starts one character later: overlapping
            // occurrences are found too.
            from = at + text[at..].chars().next().map_or(1, char::len_utf8);
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
        // The value as it is, as it appears inside a JSON string (a PEM key
        // printed with json.dumps has its newlines escaped), and as an
        // ASCII-only encoder writes it: python's json.dumps default
        // (`ensure_ascii`) turns every non-ASCII character into `\uXXXX`
        // with lowercase hex, other encoders use uppercase.
        let escaped = serde_json::to_string(value)
            .ok()
            .map(|q| Zeroizing::new(q[1..q.len() - 1].to_string()));
        // Also lowercased: host names are normalised to lowercase before
        // anything records them.
        let lower = (value.bytes().any(|b| b.is_ascii_uppercase()))
            .then(|| Zeroizing::new(value.to_ascii_lowercase()));
        let forms = std::iter::once(Zeroizing::new(value.to_string()))
            .chain(escaped)
            .chain(lower)
            .chain(
                [ascii_json(value, false), ascii_json(value, true)]
                    .into_iter()
                    .flatten(),
            );
        for v in forms {
            if !g.iter().any(|(_, x)| x.as_str() == v.as_str()) {
                g.push((name.to_string(), v));
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

    /// Whether `text` holds a value (in any of the forms redacted).
    pub fn contains_secret(&self, text: &str) -> bool {
        let g = self.secrets.lock().unwrap_or_else(|p| p.into_inner());
        g.iter().any(|(_, v)| text.contains(v.as_str()))
    }

    /// Captured output as it is stored: redacted (for output that was cut
    /// at its limit, a tail that starts a value too), then cut back to
    /// `cap` bytes, since markers can be longer than what they hide.
    pub fn redact_capped(&self, text: &str, truncated: bool, cap: usize) -> String {
        let mut out = if truncated {
            self.redact_truncated(text)
        } else {
            self.redact(text)
        };
        cut_to(&mut out, cap);
        out
    }

    /// Captured output as raw bytes (a program's binary output), redacted
    /// like [`Redactor::redact_capped`]: every occurrence of a value's bytes
    /// (also overlapping ones) is replaced, a tail that starts a value when
    /// the output was cut, and the result cut back to `cap` bytes.
    pub fn redact_bytes_capped(&self, bytes: &[u8], truncated: bool, cap: usize) -> Vec<u8> {
        let g = self.secrets.lock().unwrap_or_else(|p| p.into_inner());
        let mut all = Vec::new();
        for (i, (_, v)) in g.iter().enumerate() {
            let v = v.as_bytes();
            for at in memchr::memmem::find_iter(bytes, v) {
                all.push((at, at + v.len(), i));
            }
        }
        all.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let mut merged: Vec<(usize, usize, usize)> = Vec::new();
        for s in all {
            match merged.last_mut() {
                Some(l) if s.0 < l.1 => l.1 = l.1.max(s.1),
                _ => merged.push(s),
            }
        }
        let mut out = Vec::with_capacity(bytes.len());
        let mut pos = 0;
        for (s, e, i) in merged {
            out.extend_from_slice(&bytes[pos..s]);
            out.extend_from_slice(format!("[REDACTED:{}]", g[i].0).as_bytes());
            pos = e;
        }
        let mut tail = &bytes[pos..];
        let mut marker = None;
        if truncated {
            // The longest end of the output that starts some value.
            let mut best: Option<(usize, usize)> = None;
            for (i, (_, v)) in g.iter().enumerate() {
                let v = v.as_bytes();
                let max = (v.len() - 1).min(tail.len());
                for k in (MIN_REDACT_LEN.min(v.len() - 1).max(1)..=max).rev() {
                    if tail.ends_with(&v[..k]) {
                        if best.is_none_or(|(bk, _)| k > bk) {
                            best = Some((k, i));
                        }
                        break;
                    }
                }
            }
            if let Some((k, i)) = best {
                tail = &tail[..tail.len() - k];
                marker = Some(format!("[REDACTED:{}]", g[i].0));
            }
        }
        out.extend_from_slice(tail);
        if let Some(m) = marker {
            out.extend_from_slice(m.as_bytes());
        }
        out.truncate(cap);
        out
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

/// `value` as a JSON string body written by an ASCII-only encoder: `"`,
/// `\\`, the short escapes, every other byte outside printable ASCII as
/// `\uXXXX` (UTF-16 surrogate pairs above the BMP). `None` when the value
/// is all printable ASCII (then it equals the plain escaped form).
fn ascii_json(value: &str, upper: bool) -> Option<Zeroizing<String>> {
    if value.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return None;
    }
    use std::fmt::Write;
    let mut out = Zeroizing::new(String::with_capacity(value.len() * 6));
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = if upper {
                        write!(out, "\\u{u:04X}")
                    } else {
                        write!(out, "\\u{u:04x}")
                    };
                }
            }
        }
    }
    Some(out)
}

/// Cuts `text` to at most `cap` bytes, at a character boundary.
pub fn cut_to(text: &mut String, cap: usize) -> bool {
    if text.len() <= cap {
        return false;
    }
    let mut cut = cap;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    true
}

/// Redaction of a stream that arrives in chunks: holds back just enough
/// text that a value split across chunks is still caught, and releases at
/// most `cap` bytes of redacted text in all (the stream's output limit,
/// applied to what is streamed, not to what the program wrote).
#[derive(Debug)]
pub struct StreamRedactor {
    carry: String,
    /// Bytes that may still be released.
    left: usize,
}

impl StreamRedactor {
    /// A stream that releases at most `cap` bytes.
    pub fn capped(cap: usize) -> Self {
        StreamRedactor {
            carry: String::new(),
            left: cap,
        }
    }

    fn release(&mut self, mut text: String) -> String {
        cut_to(&mut text, self.left);
        self.left -= text.len();
        text
    }

    /// Feeds text; returns what can be released now, redacted.
    pub fn push(&mut self, r: &Redactor, text: &str) -> String {
        if self.left == 0 {
            // Past the cap nothing more is released; nothing is kept.
            return String::new();
        }
        self.carry.push_str(text);
        let hold = r.max_len().saturating_sub(1);
        let mut cut = self.carry.len().saturating_sub(hold);
        while !self.carry.is_char_boundary(cut) {
            cut -= 1;
        }
        // Never cut inside an occurrence: one that straddles the cut is
        // held back whole, with what follows it (a second value that
        // overlaps it may still be arriving), and released once enough text
        // follows it. A chain of overlapping occurrences longer than
        // [`MAX_HOLD`] is released redacted up to its current end instead,
        // so the held text (and the work per chunk) stays bounded.
        {
            let g = r.secrets.lock().unwrap_or_else(|p| p.into_inner());
            for (s, e, _) in spans(&g, &self.carry) {
                if s < cut && e > cut {
                    cut = if self.carry.len() - s > MAX_HOLD {
                        e
                    } else {
                        s
                    };
                    break;
                }
            }
        }
        let rest = self.carry.split_off(cut);
        let out = r.redact(&self.carry);
        self.carry = rest;
        self.release(out)
    }

    /// Releases whatever is held, redacted. `truncated`: the source was cut
    /// at its limit, so a held tail may be the start of a value, and is
    /// redacted as such (the record is redacted the same way).
    pub fn finish(&mut self, r: &Redactor, truncated: bool) -> String {
        let all = std::mem::take(&mut self.carry);
        let out = if truncated {
            r.redact_truncated(&all)
        } else {
            r.redact(&all)
        };
        self.release(out)
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
    fn overlapping_occurrences_leave_nothing_in_records_or_streams() {
        let r = Redactor::default();
        r.add("A", "abcdXYZ1");
        r.add("B", "XYZ1-second-secret");
        let text = "..abcdXYZ1-second-secret..";
        // Positive control: whole-text redaction hides both.
        assert_eq!(r.redact(text), "..[REDACTED:A]..");
        // Streamed in chunks of every size, the same holds.
        for size in 1..text.len() {
            let mut s = StreamRedactor::capped(usize::MAX);
            let mut out = String::new();
            for chunk in text.as_bytes().chunks(size) {
                out.push_str(&s.push(&r, std::str::from_utf8(chunk).unwrap()));
            }
            out.push_str(&s.finish(&r, false));
            assert!(
                !out.contains("second") && !out.contains("abcd"),
                "{size}: {out}"
            );
        }
        // A value overlapping itself.
        let r = Redactor::default();
        r.add("S", "XYZ1-middle-part-XYZ1");
        let out = r.redact("XYZ1-middle-part-XYZ1-middle-part-XYZ1");
        assert_eq!(out, "[REDACTED:S]");
    }

    #[test]
    fn binary_output_is_redacted_as_bytes() {
        let r = Redactor::default();
        r.add("K", "s3cr3t-bytes");
        let mut raw = vec![0u8, 0xff, 0xfe];
        raw.extend_from_slice(b"s3cr3t-bytes");
        raw.extend_from_slice(&[0x80, 0x00]);
        let out = r.redact_bytes_capped(&raw, false, usize::MAX);
        let mut want = vec![0u8, 0xff, 0xfe];
        want.extend_from_slice(b"[REDACTED:K]");
        want.extend_from_slice(&[0x80, 0x00]);
        assert_eq!(out, want);
        // Cut in the middle of the value: the tail is redacted; capped.
        let cut = [&[0xffu8][..], b"s3cr3t"].concat();
        assert_eq!(
            r.redact_bytes_capped(&cut, true, usize::MAX),
            [&[0xffu8][..], b"[REDACTED:K]"].concat()
        );
        assert_eq!(
            r.redact_bytes_capped(&cut, false, usize::MAX),
            cut,
            "positive control"
        );
        assert_eq!(r.redact_bytes_capped(&raw, false, 5).len(), 5);
    }

    #[test]
    fn stream_catches_values_split_across_chunks() {
        let r = Redactor::default();
        r.add("k", "s3cr3t-value");
        let mut s = StreamRedactor::capped(usize::MAX);
        let mut out = String::new();
        for chunk in ["prefix s3c", "r3t-va", "lue suffix and s3cr3t-value", "!"] {
            out.push_str(&s.push(&r, chunk));
        }
        out.push_str(&s.finish(&r, false));
        assert_eq!(out, "prefix [REDACTED:k] suffix and [REDACTED:k]!");
        assert!(!out.contains("s3cr3t"));
    }

    #[test]
    fn the_stream_cap_holds_on_redacted_text_and_a_cut_tail_is_redacted() {
        let r = Redactor::default();
        let name = "N".repeat(128);
        r.add(&name, "abcd");
        // 4 bytes of program output become 139 bytes of marker.
        let cap = 1000;
        let mut s = StreamRedactor::capped(cap);
        let mut sent = 0;
        for _ in 0..250 {
            sent += s.push(&r, "abcd").len();
        }
        sent += s.finish(&r, false).len();
        assert_eq!(sent, cap, "exactly the cap is streamed");
        // Positive control: without the cap it would have been 35 times more.
        assert_eq!(r.redact(&"abcd".repeat(250)).len(), 250 * 139);
        // Output cut at its limit in the middle of a value: the tail held
        // back is redacted at the end, as the record is.
        let r = Redactor::default();
        r.add("S", "0123456789-secret");
        let mut s = StreamRedactor::capped(usize::MAX);
        let mut out = s.push(&r, "ok 0123456");
        out.push_str(&s.finish(&r, true));
        assert_eq!(out, "ok [REDACTED:S]");
        assert_eq!(out, r.redact_capped("ok 0123456", true, usize::MAX));
        // Positive control: a stream that simply ended keeps its text.
        let mut s = StreamRedactor::capped(usize::MAX);
        let mut out = s.push(&r, "ok 0123456");
        out.push_str(&s.finish(&r, false));
        assert_eq!(out, "ok 0123456");
    }

    #[test]
    fn ascii_only_json_forms_are_redacted() {
        let r = Redactor::default();
        r.add("S", "pässwörd-€-😀");
        // python: json.dumps(v) (ensure_ascii) and Java's uppercase form.
        let lower = "\"p\\u00e4ssw\\u00f6rd-\\u20ac-\\ud83d\\ude00\"";
        let upper = "p\\u00E4ssw\\u00F6rd-\\u20AC-\\uD83D\\uDE00";
        assert_eq!(r.redact(lower), "\"[REDACTED:S]\"");
        assert_eq!(r.redact(upper), "[REDACTED:S]");
        assert!(r.contains_secret(lower) && !r.contains_secret("p\\u00e4ss"));
        // A printable-ASCII value has no extra form.
        assert_eq!(ascii_json("plain-ascii", false), None);
        assert_eq!(
            ascii_json("a\"b\\c\n\u{1}\u{7f}", false)
                .as_deref()
                .map(String::as_str),
            Some("a\\\"b\\\\c\\n\\u0001\\u007f")
        );
    }
}
