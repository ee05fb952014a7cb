//! Live event logs of running executions, for SSE followers and waiters.
//!
//! Bounded: output text is capped by the execution's limits, and the number
//! of events is capped too: past [`SOFT_EVENT_CAP`] events, output is
//! coalesced into events of at least [`COALESCE_BYTES`] (a program that
//! writes one byte at a time cannot make millions of events).

use std::sync::Mutex;

use tokio::sync::watch;

/// One event of an execution's stream.
#[derive(Debug, Clone)]
pub struct LiveEvent {
    /// `started`, `stdout`, `stderr`, `finished`.
    pub kind: &'static str,
    /// JSON payload.
    pub data: String,
}

/// Events kept one per write before coalescing starts.
pub const SOFT_EVENT_CAP: usize = 2048;
/// Size of coalesced output events.
pub const COALESCE_BYTES: usize = 64 << 10;

#[derive(Debug, Default)]
struct Inner {
    events: Vec<LiveEvent>,
    /// Coalesced output not yet published: (stdout, stderr).
    pending: [String; 2],
    done: bool,
}

fn output_event(kind: &'static str, text: &str) -> LiveEvent {
    LiveEvent {
        kind,
        data: serde_json::json!({ "data": text }).to_string(),
    }
}

/// The event log of one execution.
#[derive(Debug)]
pub struct Live {
    inner: Mutex<Inner>,
    tx: watch::Sender<usize>,
}

impl Default for Live {
    fn default() -> Self {
        Live {
            inner: Mutex::new(Inner::default()),
            tx: watch::channel(0).0,
        }
    }
}

impl Live {
    /// Appends an event and wakes followers.
    pub fn push(&self, kind: &'static str, data: String) {
        let n = {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if g.done {
                return;
            }
            g.events.push(LiveEvent { kind, data });
            g.events.len()
        };
        self.tx.send_replace(n);
    }

    /// Appends program output (`stdout` or `stderr`), coalescing once the
    /// log is long.
    pub fn push_output(&self, kind: &'static str, text: &str) {
        let n = {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if g.done || text.is_empty() {
                return;
            }
            if g.events.len() < SOFT_EVENT_CAP {
                g.events.push(output_event(kind, text));
            } else {
                let i = usize::from(kind == "stderr");
                g.pending[i].push_str(text);
                if g.pending[i].len() < COALESCE_BYTES {
                    return;
                }
                let chunk = std::mem::take(&mut g.pending[i]);
                g.events.push(output_event(kind, &chunk));
            }
            g.events.len()
        };
        self.tx.send_replace(n);
    }

    /// Appends the final event and closes the log.
    pub fn finish(&self, data: String) {
        let n = {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if g.done {
                return;
            }
            for (i, kind) in [(0, "stdout"), (1, "stderr")] {
                let chunk = std::mem::take(&mut g.pending[i]);
                if !chunk.is_empty() {
                    g.events.push(output_event(kind, &chunk));
                }
            }
            g.events.push(LiveEvent {
                kind: "finished",
                data,
            });
            g.done = true;
            g.events.len()
        };
        self.tx.send_replace(n);
    }

    /// Whether the final event was pushed.
    pub fn is_done(&self) -> bool {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).done
    }

    /// The event at `i`, or whether the log is closed.
    pub fn get(&self, i: usize) -> Result<LiveEvent, bool> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.events.get(i).cloned().ok_or(g.done)
    }

    /// A receiver that changes on every push.
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.tx.subscribe()
    }
}

/// Turns byte chunks into valid UTF-8 text without splitting characters.
#[derive(Debug, Default)]
pub struct Utf8Carry(Vec<u8>);

impl Utf8Carry {
    /// Whatever is held (an incomplete sequence), lossily.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.0);
        String::from_utf8_lossy(&rest).into_owned()
    }

    /// Returns the decodable prefix of carry + chunk; keeps an incomplete
    /// trailing sequence (at most 3 bytes) for the next call.
    pub fn push(&mut self, chunk: &[u8]) -> String {
        self.0.extend_from_slice(chunk);
        let cut = match std::str::from_utf8(&self.0) {
            Ok(_) => self.0.len(),
            Err(e) if e.error_len().is_none() && self.0.len() - e.valid_up_to() <= 3 => {
                e.valid_up_to()
            }
            Err(_) => self.0.len(),
        };
        let rest = self.0.split_off(cut);
        let text = String::from_utf8_lossy(&self.0).into_owned();
        self.0 = rest;
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_byte_writes_are_coalesced() {
        let l = Live::default();
        for _ in 0..200_000 {
            l.push_output("stdout", "x");
        }
        l.finish("{}".into());
        let mut n = 0;
        let mut text = String::new();
        while let Ok(ev) = l.get(n) {
            if ev.kind == "stdout" {
                let v: serde_json::Value = serde_json::from_str(&ev.data).unwrap();
                text.push_str(v["data"].as_str().unwrap());
            }
            n += 1;
        }
        assert_eq!(text.len(), 200_000, "nothing lost");
        assert!(n < SOFT_EVENT_CAP + 10, "{n} events");
    }

    #[test]
    fn utf8_carry_keeps_characters_whole() {
        let mut c = Utf8Carry::default();
        let euro = "€".as_bytes();
        assert_eq!(c.push(&[b'a', euro[0]]), "a");
        assert_eq!(c.push(&euro[1..]), "€");
        assert_eq!(c.push(&[0xff, b'b']), "\u{fffd}b");
    }
}
