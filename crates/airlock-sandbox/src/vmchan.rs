//! The channel between a microVM guest and its host: one virtio-serial
//! port carrying several byte streams (the VM's own configuration, the
//! agent's control socket, stdin, stdout, stderr, the broker), each with
//! its own credit window so that one slow reader never stalls the others.
//!
//! Both ends run the same [`Mux`]: the host's VM monitor process (relaying
//! to the engine's sockets and pipes) and the guest's init (relaying to the
//! agent's). Neither trusts the other's frames: every header is checked
//! before its payload is read into memory, a payload is at most
//! [`MAX_PAYLOAD`], a stream never buffers more than [`WINDOW`] bytes the
//! peer sent beyond what it was granted, and any violation ends the channel
//! (the host then ends the VM). Memory per channel is therefore bounded by
//! `STREAMS × WINDOW` plus one frame, whatever the guest sends.
//!
//! Frame: `kind u8 | stream u8 | 0u16 | len u32 (LE) | payload`. Kinds:
//! data (1..=MAX_PAYLOAD bytes), end of stream (empty), credit (4 bytes:
//! bytes the receiver has consumed and the sender may send again).
//!
//! Snapshots add three kinds, on stream 0 only. Before a golden VM is
//! saved the host sends *quiesce*: the guest writes out what it received,
//! credits it, answers *quiesced* and then sends nothing at all, so no
//! byte is in flight inside the saved machine. A VM restored from it
//! starts with a fresh host end whose first frame is *resume*
//! ([`RESUME_LEN`] bytes: fresh entropy and the host's clock): the guest
//! resets every stream's window to match the fresh host end and hands the
//! payload to its init before it delivers anything that follows; once its
//! init has applied it, the guest answers *resumed*. After quiesce the host
//! sends nothing at all (so no frame, whole or cut, is inside the saved
//! machine), and a paused guest takes nothing but resume. Only the host may
//! send quiesce and resume, only the guest quiesced and resumed.
//!
//! Egress adds two kinds, on the [`EGRESS_STREAMS`] egress streams only:
//! each carries one connection the guest's forwarder accepted, relayed to
//! the host's egress proxy. The guest opens a closed one with *open*
//! (empty) and may send data behind it at once (the host holds up to one
//! window until its proxy hands it a socket); each end sends end of stream
//! when its side is done, and once the host has sent its own and received
//! and written out the guest's, it sends *release* (empty): the stream is
//! closed again on both ends and may carry the next connection. Only the
//! guest may open (a closed stream, on a host that relays egress), only the
//! host release (a stream both ends have ended). A credit the host receives
//! on a closed stream is one the guest sent before the release reached it:
//! ignored.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::sys;

/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 32 << 10;
/// Bytes a sender may have in flight on one stream.
pub const WINDOW: usize = 256 << 10;
/// Header bytes.
pub const HEADER: usize = 8;
/// Outgoing bytes queued for the port before reading more from sources.
const TX_LIMIT: usize = 2 * MAX_PAYLOAD;

const DATA: u8 = 1;
const EOF: u8 = 2;
const CREDIT: u8 = 3;
const QUIESCE: u8 = 4;
const QUIESCED: u8 = 5;
const RESUME: u8 = 6;
const RESUMED: u8 = 7;
const OPEN: u8 = 8;
const RELEASE: u8 = 9;

/// Payload of a resume frame: 64 bytes of host entropy, then the host's
/// realtime clock (seconds u64, nanoseconds u32, LE), then 4 zero bytes.
pub const RESUME_LEN: usize = 80;

/// Which end of the channel a [`Mux`] is (the kinds each may receive
/// differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The VM monitor.
    Host,
    /// The guest's init.
    Guest,
}

/// Where an end is in the quiesce handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quiesce {
    Running,
    /// The guest was asked: it drains, then answers.
    Asked,
    /// The guest answered: it sends nothing until resumed.
    Paused,
}

/// Stream numbers.
pub mod stream {
    /// The VM's configuration (host to guest) and the guest init's
    /// failure report (guest to host).
    pub const VM: u8 = 0;
    /// The agent's control socket.
    pub const CTRL: u8 = 1;
    /// The program's stdin (host to guest).
    pub const STDIN: u8 = 2;
    /// The program's stdout (guest to host).
    pub const STDOUT: u8 = 3;
    /// The program's stderr (guest to host).
    pub const STDERR: u8 = 4;
    /// The broker socket.
    pub const BROKER: u8 = 5;
    /// The first egress stream (see [`super::EGRESS_STREAMS`]).
    pub const EGRESS: u8 = 6;
}

/// Egress connections a guest may have relayed at once: one stream each.
pub const EGRESS_STREAMS: usize = 16;

/// Number of streams.
pub const STREAMS: usize = stream::EGRESS as usize + EGRESS_STREAMS;

fn is_egress(id: usize) -> bool {
    id >= stream::EGRESS as usize && id < STREAMS
}

/// Why a channel ended other than by its streams finishing.
#[derive(Debug, thiserror::Error)]
pub enum ChanError {
    /// The peer broke the protocol: the reason, for the operator's log.
    #[error("channel protocol violation: {0}")]
    Violation(&'static str),
    /// The port itself failed.
    #[error("channel port: {0}")]
    Port(#[from] io::Error),
    /// The port hung up (the VM or the host side is gone).
    #[error("channel port hung up")]
    HungUp,
}

/// Where the bytes a stream sends come from.
#[derive(Debug)]
pub enum Source {
    /// Nothing: this end never sends on the stream.
    None,
    /// A local descriptor, read until end of file.
    Fd(OwnedFd),
    /// Bytes in memory, then end of stream.
    Bytes(Vec<u8>, usize),
}

/// Where the bytes a stream receives go.
#[derive(Debug)]
pub enum Sink {
    /// Nothing: the peer must never send on the stream (a violation).
    None,
    /// A local descriptor; closed once the peer's end of stream is written.
    Fd(OwnedFd),
    /// Kept in memory up to the given size (more is a violation), complete
    /// once the peer ends the stream.
    Bytes(Vec<u8>, usize),
    /// Host, an egress stream the guest opened: what arrives waits (within
    /// the window) until [`Mux::attach`] gives it a descriptor.
    Held,
}

/// Where an egress stream is in its life (the fixed streams are always
/// [`Life::Fixed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    Fixed,
    /// Free for the next connection.
    Closed,
    /// Carrying one.
    Open,
    /// Guest: the host released it; closed once what is pending is
    /// written out.
    Released,
}

#[derive(Debug)]
struct Stream {
    src: Source,
    dst: Sink,
    /// Bytes this end may still send.
    credit: usize,
    /// Received, not yet written to the sink.
    pending: Vec<u8>,
    pending_off: usize,
    /// Written to the sink (or dropped), not yet credited back.
    unacked: usize,
    /// The peer ended the stream.
    peer_eof: bool,
    /// This end ended it.
    sent_eof: bool,
    /// The sink failed (its reader left): what arrives is dropped.
    dst_gone: bool,
    /// The peer has sent data on it.
    heard: bool,
    life: Life,
}

impl Stream {
    fn new(src: Source, dst: Sink) -> Self {
        Stream {
            src,
            dst,
            credit: WINDOW,
            pending: Vec::new(),
            pending_off: 0,
            unacked: 0,
            peer_eof: false,
            sent_eof: false,
            dst_gone: false,
            heard: false,
            life: Life::Fixed,
        }
    }

    fn closed() -> Self {
        Stream {
            life: Life::Closed,
            ..Stream::new(Source::None, Sink::None)
        }
    }

    fn has_pending(&self) -> bool {
        self.pending_off < self.pending.len()
    }
}

/// One end of the channel.
#[derive(Debug)]
pub struct Mux {
    port: OwnedFd,
    streams: Vec<Stream>,
    tx: Vec<u8>,
    tx_off: usize,
    rx: Vec<u8>,
    end: End,
    quiesce: Quiesce,
    /// Host: the guest answered quiesced.
    quiesced: bool,
    /// Host: the guest answered resumed.
    resumed_ack: bool,
    /// Guest: a resume's payload not yet taken by its init (nothing after
    /// it is parsed until it is).
    resumed: Option<Vec<u8>>,
    /// Recording: which streams (bit per stream), up to how many bytes.
    record_mask: u32,
    record_max: usize,
    log: Vec<(u8, bool, Vec<u8>)>,
    log_bytes: usize,
    log_over: bool,
    /// Host: the guest may open egress streams.
    egress: bool,
    /// Host: egress streams the guest opened, not yet taken.
    opened: Vec<u8>,
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

impl Mux {
    /// A channel over `port` (made non-blocking, as is every descriptor
    /// of `streams`, which are indexed by stream number).
    pub fn new(port: OwnedFd, streams: Vec<(Source, Sink)>) -> io::Result<Self> {
        sys::set_nonblocking(port.as_raw_fd())?;
        let mut s = Vec::with_capacity(STREAMS);
        for (src, dst) in streams.into_iter().take(STREAMS) {
            for fd in [&src]
                .into_iter()
                .filter_map(|x| match x {
                    Source::Fd(f) => Some(f.as_raw_fd()),
                    _ => None,
                })
                .chain(match &dst {
                    Sink::Fd(f) => Some(f.as_raw_fd()),
                    _ => None,
                })
            {
                sys::set_nonblocking(fd)?;
            }
            s.push(Stream::new(src, dst));
        }
        while s.len() < stream::EGRESS as usize {
            s.push(Stream::new(Source::None, Sink::None));
        }
        s.truncate(stream::EGRESS as usize);
        while s.len() < STREAMS {
            s.push(Stream::closed());
        }
        Ok(Mux {
            port,
            streams: s,
            tx: Vec::new(),
            tx_off: 0,
            rx: Vec::new(),
            end: End::Host,
            quiesce: Quiesce::Running,
            quiesced: false,
            resumed_ack: false,
            resumed: None,
            record_mask: 0,
            record_max: 0,
            log: Vec::new(),
            log_bytes: 0,
            log_over: false,
            egress: false,
            opened: Vec::new(),
        })
    }

    /// Host: the guest may open egress streams (this end relays them to
    /// an egress proxy); otherwise an open is a violation.
    pub fn allow_egress(&mut self) {
        self.egress = true;
    }

    /// Host: the egress streams the guest opened since the last call, in
    /// order; each waits for [`Mux::attach`] or [`Mux::refuse`].
    pub fn take_opened(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.opened)
    }

    /// Host: the proxy's socket for an opened egress stream (`src` and
    /// `dst` are the same socket): what the guest sent so far is written
    /// to it first.
    pub fn attach(&mut self, id: u8, src: OwnedFd, dst: OwnedFd) -> io::Result<()> {
        let Some(s) = self.streams.get_mut(id as usize) else {
            return Ok(());
        };
        if s.life != Life::Open || !matches!(s.dst, Sink::Held) {
            return Ok(());
        }
        sys::set_nonblocking(src.as_raw_fd())?;
        sys::set_nonblocking(dst.as_raw_fd())?;
        s.src = Source::Fd(src);
        s.dst = Sink::Fd(dst);
        Ok(())
    }

    /// Host: no connection for an opened egress stream (the proxy is gone
    /// or refused): the guest gets end of stream at once, and what it sent
    /// and sends is dropped (and credited) until it ends its side.
    pub fn refuse(&mut self, id: u8) {
        let Some(s) = self.streams.get_mut(id as usize) else {
            return;
        };
        if s.life != Life::Open || !matches!(s.dst, Sink::Held) {
            return;
        }
        s.src = Source::Bytes(Vec::new(), 0);
        s.unacked += s.pending.len() - s.pending_off;
        s.pending.clear();
        s.pending_off = 0;
        s.dst = Sink::None;
        s.dst_gone = true;
    }

    /// Guest: opens a closed egress stream for one connection (`src` and
    /// `dst` are the same socket) and tells the host; None when every
    /// egress stream is in use (or the channel is quiescing).
    pub fn open_egress(&mut self, src: OwnedFd, dst: OwnedFd) -> io::Result<Option<u8>> {
        if self.end != End::Guest || !self.sending() {
            return Ok(None);
        }
        let Some(id) = (stream::EGRESS as usize..STREAMS).find(|i| {
            let s = &self.streams[*i];
            s.life == Life::Closed
        }) else {
            return Ok(None);
        };
        sys::set_nonblocking(src.as_raw_fd())?;
        sys::set_nonblocking(dst.as_raw_fd())?;
        self.streams[id] = Stream {
            life: Life::Open,
            ..Stream::new(Source::Fd(src), Sink::Fd(dst))
        };
        self.push_frame(OPEN, id as u8, &[]);
        Ok(Some(id as u8))
    }

    /// Egress streams in use.
    pub fn egress_open(&self) -> usize {
        self.streams
            .iter()
            .filter(|s| matches!(s.life, Life::Open | Life::Released))
            .count()
    }

    /// Records the data this end sends and receives on `streams` from now
    /// on, in order (adjacent pieces of one stream and direction joined),
    /// up to `max` bytes in all: a golden VM's exchange with its engine.
    pub fn record(&mut self, streams: &[u8], max: usize) {
        self.record_mask = streams
            .iter()
            .filter(|s| (**s as usize) < STREAMS)
            .fold(0, |m, s| m | 1 << s);
        self.record_max = max;
    }

    /// What was recorded: (stream, sent by this end, bytes); None when it
    /// outgrew its bound.
    pub fn recorded(&self) -> Option<&[(u8, bool, Vec<u8>)]> {
        (!self.log_over).then_some(&self.log[..])
    }

    fn note_data(&mut self, stream: usize, sent: bool, bytes: &[u8]) {
        if self.record_mask & (1 << stream) == 0 || self.log_over {
            return;
        }
        if self.log_bytes + bytes.len() > self.record_max {
            self.log_over = true;
            return;
        }
        self.log_bytes += bytes.len();
        match self.log.last_mut() {
            Some((s, d, b)) if *s as usize == stream && *d == sent => b.extend_from_slice(bytes),
            _ => self.log.push((stream as u8, sent, bytes.to_vec())),
        }
    }

    /// Marks this end as the guest's (a channel is the host's otherwise).
    pub fn guest(mut self) -> Self {
        self.end = End::Guest;
        self
    }

    /// Host: asks the guest to quiesce (see the module's notes); from now
    /// on this end sends nothing more (no data, no credit).
    pub fn quiesce(&mut self) {
        if self.end == End::Host && self.quiesce == Quiesce::Running {
            self.push_frame(QUIESCE, stream::VM, &[]);
            self.quiesce = Quiesce::Asked;
        }
    }

    /// Host: nothing this end queued is still unsent.
    pub fn sent_all(&self) -> bool {
        self.tx_len() == 0
    }

    /// Host: the restored guest has applied its resume.
    pub fn resumed(&self) -> bool {
        self.resumed_ack
    }

    /// Guest: its init has applied the resume: tells the host.
    pub fn ack_resume(&mut self) {
        if self.end == End::Guest {
            self.push_frame(RESUMED, stream::VM, &[]);
        }
    }

    /// Host: the guest has quiesced.
    pub fn quiesced(&self) -> bool {
        self.quiesced
    }

    /// Host, first thing on a restored VM's fresh channel: resumes the
    /// guest with `payload`.
    pub fn resume(&mut self, payload: &[u8; RESUME_LEN]) {
        if self.end == End::Host {
            self.push_frame(RESUME, stream::VM, payload);
        }
    }

    /// Guest: the payload of a resume that arrived (once). Nothing that
    /// followed it is delivered before it is taken.
    pub fn take_resume(&mut self) -> Option<Vec<u8>> {
        self.resumed.take()
    }

    /// Guest: it has quiesced and waits for a resume.
    pub fn paused(&self) -> bool {
        self.quiesce == Quiesce::Paused
    }

    /// Whether sources may be read (not while quiescing or paused).
    fn sending(&self) -> bool {
        self.quiesce == Quiesce::Running
    }

    /// What arrived on a [`Sink::Bytes`] stream, once the peer ended it.
    pub fn received(&self, stream: u8) -> Option<&[u8]> {
        let s = self.streams.get(stream as usize)?;
        match &s.dst {
            Sink::Bytes(b, _) if s.peer_eof => Some(b),
            _ => None,
        }
    }

    /// Sets both ends of a stream that has not been used yet.
    pub fn set_stream(&mut self, stream: u8, src: Source, dst: Sink) -> io::Result<()> {
        for fd in [
            match &src {
                Source::Fd(f) => Some(f.as_raw_fd()),
                _ => None,
            },
            match &dst {
                Sink::Fd(f) => Some(f.as_raw_fd()),
                _ => None,
            },
        ]
        .into_iter()
        .flatten()
        {
            sys::set_nonblocking(fd)?;
        }
        if let Some(s) = self.streams.get_mut(stream as usize) {
            *s = Stream::new(src, dst);
        }
        Ok(())
    }

    /// Whether the peer has sent data on `stream`.
    pub fn heard(&self, stream: u8) -> bool {
        self.streams.get(stream as usize).is_some_and(|s| s.heard)
    }

    /// Replaces a stream's source (before anything was sent on it).
    pub fn set_source(&mut self, stream: u8, src: Source) -> io::Result<()> {
        if let Source::Fd(f) = &src {
            sys::set_nonblocking(f.as_raw_fd())?;
        }
        if let Some(s) = self.streams.get_mut(stream as usize) {
            s.src = src;
        }
        Ok(())
    }

    /// Every stream has ended both ways and nothing is left to send.
    pub fn finished(&self) -> bool {
        self.tx_off >= self.tx.len()
            && self.streams.iter().all(|s| {
                matches!(s.src, Source::None)
                    && (matches!(s.dst, Sink::None) || s.peer_eof)
                    && matches!(s.life, Life::Fixed | Life::Closed)
            })
    }

    /// Every stream the peer sends on has ended and been written out.
    #[cfg(test)]
    fn drained(&self) -> bool {
        self.streams
            .iter()
            .all(|s| !s.has_pending() && (s.peer_eof || matches!(s.dst, Sink::None)))
    }

    fn push_frame(&mut self, kind: u8, stream: u8, payload: &[u8]) {
        if self.tx_off > 0 && self.tx_off == self.tx.len() {
            self.tx.clear();
            self.tx_off = 0;
        }
        self.tx.extend_from_slice(&[kind, stream, 0, 0]);
        self.tx
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.tx.extend_from_slice(payload);
    }

    fn tx_len(&self) -> usize {
        self.tx.len() - self.tx_off
    }

    /// Polls the port, every stream and `extra` once (up to `timeout_ms`),
    /// moving what can move. Returns the revents of `extra`.
    pub fn step(&mut self, extra: &[(RawFd, i16)], timeout_ms: i32) -> Result<Vec<i16>, ChanError> {
        // Frames that arrived behind a resume, once it has been taken.
        if self.resumed.is_none() && !self.rx.is_empty() {
            self.parse()?;
        }
        if self.sending() {
            self.fill_from_memory();
        }
        self.queue_credits();
        let mut set: Vec<(RawFd, i16)> = Vec::with_capacity(2 + 2 * STREAMS + extra.len());
        let port = self.port.as_raw_fd();
        let mut port_events = libc::POLLIN;
        if self.tx_len() > 0 {
            port_events |= libc::POLLOUT;
        }
        set.push((port, port_events));
        // (index into set, stream, is_src)
        let mut roles: Vec<(usize, usize, bool)> = Vec::new();
        for (i, s) in self.streams.iter().enumerate() {
            if let Source::Fd(f) = &s.src
                && s.credit > 0
                && self.quiesce == Quiesce::Running
                && self.tx.len() - self.tx_off < TX_LIMIT
            {
                roles.push((set.len(), i, true));
                set.push((f.as_raw_fd(), libc::POLLIN));
            }
            if let Sink::Fd(f) = &s.dst
                && s.has_pending()
            {
                roles.push((set.len(), i, false));
                set.push((f.as_raw_fd(), libc::POLLOUT));
            }
        }
        let first_extra = set.len();
        set.extend_from_slice(extra);
        let rev = sys::poll(&set, timeout_ms)?;
        if rev[0] & libc::POLLOUT != 0 {
            self.flush()?;
        }
        if rev[0] & libc::POLLIN != 0 && self.resumed.is_none() {
            self.read_port()?;
        } else if rev[0] & libc::POLLIN == 0 && rev[0] & (libc::POLLHUP | libc::POLLERR) != 0 {
            return Err(ChanError::HungUp);
        }
        for (idx, i, is_src) in roles {
            let r = rev[idx];
            if r == 0 {
                continue;
            }
            if is_src {
                self.read_source(i);
            } else {
                self.write_sink(i);
            }
        }
        // Sinks can often take more right away (a pipe with room).
        for i in 0..STREAMS {
            if self.streams[i].has_pending() && matches!(self.streams[i].dst, Sink::Fd(_)) {
                self.write_sink(i);
            }
            self.close_finished_sink(i);
            self.end_egress(i);
        }
        self.queue_credits();
        self.finish_quiesce();
        if self.tx_len() > 0 {
            self.flush()?;
        }
        Ok(rev[first_extra..].to_vec())
    }

    /// Guest, asked to quiesce: once everything received is written out,
    /// credits every byte of it and answers; from then on sends nothing.
    fn finish_quiesce(&mut self) {
        if self.end != End::Guest
            || self.quiesce != Quiesce::Asked
            || self.streams.iter().any(Stream::has_pending)
        {
            return;
        }
        for i in 0..STREAMS {
            let s = &mut self.streams[i];
            if s.unacked > 0 && !s.peer_eof {
                let n = s.unacked as u32;
                s.unacked = 0;
                self.push_frame(CREDIT, i as u8, &n.to_le_bytes());
            }
        }
        self.push_frame(QUIESCED, stream::VM, &[]);
        self.quiesce = Quiesce::Paused;
    }

    /// Sends what the port takes now.
    pub fn flush(&mut self) -> Result<(), ChanError> {
        while self.tx_off < self.tx.len() {
            match sys::write_fd(self.port.as_raw_fd(), &self.tx[self.tx_off..]) {
                Ok(0) => return Err(ChanError::HungUp),
                Ok(n) => self.tx_off += n,
                Err(e) if would_block(&e) => break,
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => return Err(ChanError::HungUp),
                Err(e) => return Err(e.into()),
            }
        }
        if self.tx_off == self.tx.len() {
            self.tx.clear();
            self.tx_off = 0;
        }
        Ok(())
    }

    fn fill_from_memory(&mut self) {
        for i in 0..STREAMS {
            loop {
                if self.tx_len() >= TX_LIMIT {
                    return;
                }
                let s = &mut self.streams[i];
                let Source::Bytes(b, off) = &mut s.src else {
                    break;
                };
                if *off >= b.len() {
                    s.src = Source::None;
                    s.sent_eof = true;
                    self.push_frame(EOF, i as u8, &[]);
                    break;
                }
                let n = (b.len() - *off).min(MAX_PAYLOAD).min(s.credit);
                if n == 0 {
                    break;
                }
                let chunk = b[*off..*off + n].to_vec();
                *off += n;
                s.credit -= n;
                self.push_frame(DATA, i as u8, &chunk);
            }
        }
    }

    fn read_source(&mut self, i: usize) {
        let s = &mut self.streams[i];
        let Source::Fd(f) = &s.src else { return };
        let want = s.credit.min(MAX_PAYLOAD);
        if want == 0 {
            return;
        }
        let mut buf = vec![0u8; want];
        match sys::read_fd(f.as_raw_fd(), &mut buf) {
            Ok(0) => {
                s.src = Source::None;
                s.sent_eof = true;
                self.push_frame(EOF, i as u8, &[]);
            }
            Ok(n) => {
                s.credit -= n;
                self.push_frame(DATA, i as u8, &buf[..n]);
                self.note_data(i, true, &buf[..n]);
            }
            Err(e) if would_block(&e) => {}
            Err(_) => {
                // A failed source ends its stream like end of file.
                s.src = Source::None;
                s.sent_eof = true;
                self.push_frame(EOF, i as u8, &[]);
            }
        }
    }

    fn write_sink(&mut self, i: usize) {
        let s = &mut self.streams[i];
        let Sink::Fd(f) = &s.dst else { return };
        while s.has_pending() {
            match sys::write_fd(f.as_raw_fd(), &s.pending[s.pending_off..]) {
                Ok(n) if n > 0 => {
                    s.pending_off += n;
                    s.unacked += n;
                }
                Err(e) if would_block(&e) => return,
                _ => {
                    // Its reader left: what is pending and what follows is
                    // dropped (and credited, so the peer never stalls).
                    s.unacked += s.pending.len() - s.pending_off;
                    s.pending.clear();
                    s.pending_off = 0;
                    s.dst = Sink::None;
                    s.dst_gone = true;
                    return;
                }
            }
        }
        s.pending.clear();
        s.pending_off = 0;
    }

    fn close_finished_sink(&mut self, i: usize) {
        let s = &mut self.streams[i];
        if s.peer_eof && !s.has_pending() && matches!(s.dst, Sink::Fd(_)) {
            let Sink::Fd(f) = std::mem::replace(&mut s.dst, Sink::None) else {
                return;
            };
            // A socket is often also its stream's source (another
            // descriptor of it: a connection, the broker, the control
            // channel): the peer's end is passed on as a half-close, or
            // the far side would wait for it for ever (closing this
            // descriptor alone ends nothing while the other is open).
            if crate::sys::is_socket(f.as_raw_fd()) {
                let _ = std::os::unix::net::UnixStream::from(f).shutdown(std::net::Shutdown::Write);
            }
        }
    }

    /// Host: an egress stream both ends have ended and whose bytes are
    /// written out is released. Guest: a released one whose bytes are
    /// written out is closed (its descriptors with it).
    fn end_egress(&mut self, i: usize) {
        let s = &self.streams[i];
        if s.has_pending() || !s.peer_eof || !s.sent_eof {
            return;
        }
        match (self.end, s.life) {
            (End::Host, Life::Open) if self.quiesce == Quiesce::Running => {
                self.push_frame(RELEASE, i as u8, &[]);
                self.streams[i] = Stream::closed();
            }
            (End::Guest, Life::Released) => self.streams[i] = Stream::closed(),
            _ => {}
        }
    }

    fn queue_credits(&mut self) {
        if self.quiesce != Quiesce::Running {
            return;
        }
        for i in 0..STREAMS {
            // Credits wait (summed in `unacked`) while the port is not
            // taking what is queued: a peer that never reads cannot make
            // this end queue without bound.
            if self.tx_len() >= TX_LIMIT {
                return;
            }
            let s = &mut self.streams[i];
            if s.unacked > 0 && (s.unacked >= WINDOW / 4 || !s.has_pending()) && !s.peer_eof {
                let n = s.unacked as u32;
                s.unacked = 0;
                self.push_frame(CREDIT, i as u8, &n.to_le_bytes());
            }
        }
    }

    fn read_port(&mut self) -> Result<(), ChanError> {
        let mut buf = [0u8; HEADER + MAX_PAYLOAD];
        loop {
            // Never hold more than one frame's worth unparsed.
            let room = HEADER + MAX_PAYLOAD - self.rx.len();
            if room == 0 {
                return Err(ChanError::Violation("frame larger than the limit"));
            }
            match sys::read_fd(self.port.as_raw_fd(), &mut buf[..room]) {
                Ok(0) => return Err(ChanError::HungUp),
                Ok(n) => {
                    self.rx.extend_from_slice(&buf[..n]);
                    self.parse()?;
                    if self.resumed.is_some() {
                        return Ok(());
                    }
                }
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn parse(&mut self) -> Result<(), ChanError> {
        let mut off = 0;
        while self.rx.len() - off >= HEADER {
            let h = &self.rx[off..off + HEADER];
            let (kind, id) = (h[0], h[1] as usize);
            if h[2] != 0 || h[3] != 0 {
                return Err(ChanError::Violation("reserved header bytes set"));
            }
            let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
            if id >= STREAMS {
                return Err(ChanError::Violation("unknown stream"));
            }
            let ok_len = match (kind, self.end) {
                (DATA, _) => (1..=MAX_PAYLOAD).contains(&len),
                (EOF, _) => len == 0,
                (CREDIT, _) => len == 4,
                (QUIESCE, End::Guest) | (QUIESCED, End::Host) | (RESUMED, End::Host) => {
                    len == 0 && id == 0
                }
                (RESUME, End::Guest) => len == RESUME_LEN && id == 0,
                (OPEN, End::Host) | (RELEASE, End::Guest) => len == 0 && is_egress(id),
                _ => return Err(ChanError::Violation("unknown frame kind")),
            };
            if !ok_len {
                return Err(ChanError::Violation("bad frame length"));
            }
            if self.rx.len() - off < HEADER + len {
                break;
            }
            let payload = off + HEADER..off + HEADER + len;
            off += HEADER + len;
            match kind {
                QUIESCE => {
                    if self.quiesce != Quiesce::Running {
                        return Err(ChanError::Violation("quiesce while quiescing"));
                    }
                    self.quiesce = Quiesce::Asked;
                    continue;
                }
                QUIESCED => {
                    if self.quiesce != Quiesce::Asked || self.quiesced {
                        return Err(ChanError::Violation("quiesced unasked"));
                    }
                    self.quiesced = true;
                    continue;
                }
                RESUMED => {
                    if self.resumed_ack {
                        return Err(ChanError::Violation("second resumed"));
                    }
                    self.resumed_ack = true;
                    continue;
                }
                OPEN => {
                    if !self.egress {
                        return Err(ChanError::Violation("egress the host does not relay"));
                    }
                    if self.streams[id].life != Life::Closed {
                        return Err(ChanError::Violation("open of a stream in use"));
                    }
                    self.streams[id] = Stream {
                        life: Life::Open,
                        ..Stream::new(Source::None, Sink::Held)
                    };
                    self.opened.push(id as u8);
                    continue;
                }
                RELEASE if self.quiesce == Quiesce::Running => {
                    let s = &mut self.streams[id];
                    if s.life != Life::Open || !s.peer_eof || !s.sent_eof {
                        return Err(ChanError::Violation("release of a stream in use"));
                    }
                    s.life = Life::Released;
                    continue;
                }
                // Sent before the guest's release reached it (see the
                // module's notes): nothing to credit.
                CREDIT if self.end == End::Host && self.streams[id].life == Life::Closed => {
                    continue;
                }
                RESUME => {
                    if self.quiesce != Quiesce::Paused {
                        return Err(ChanError::Violation("resume of a guest not paused"));
                    }
                    // The fresh host end starts every window afresh.
                    for st in &mut self.streams {
                        st.credit = WINDOW;
                        st.unacked = 0;
                    }
                    self.quiesce = Quiesce::Running;
                    self.resumed = Some(self.rx[payload].to_vec());
                    // What follows waits until the init has taken it.
                    break;
                }
                // A guest asked to quiesce, or paused, takes nothing but its
                // resume: the host sends nothing after its quiesce.
                _ if self.end == End::Guest && self.quiesce != Quiesce::Running => {
                    return Err(ChanError::Violation("frame to a paused guest"));
                }
                _ => {}
            }
            if kind == DATA && self.record_mask & (1 << id) != 0 {
                let bytes = self.rx[payload.clone()].to_vec();
                self.note_data(id, false, &bytes);
            }
            let s = &mut self.streams[id];
            match kind {
                DATA => {
                    if s.peer_eof {
                        return Err(ChanError::Violation("data after end of stream"));
                    }
                    s.heard = true;
                    match &mut s.dst {
                        Sink::None if s.dst_gone => {
                            if s.unacked + len > WINDOW {
                                return Err(ChanError::Violation("data beyond the window"));
                            }
                            s.unacked += len;
                        }
                        Sink::None => {
                            return Err(ChanError::Violation("data on a stream that takes none"));
                        }
                        Sink::Bytes(b, cap) => {
                            if b.len() + len > *cap {
                                return Err(ChanError::Violation("stream over its size"));
                            }
                            b.extend_from_slice(&self.rx[payload]);
                            s.unacked += len;
                        }
                        Sink::Fd(_) | Sink::Held => {
                            if s.pending.len() - s.pending_off + s.unacked + len > WINDOW {
                                return Err(ChanError::Violation("data beyond the window"));
                            }
                            if s.pending_off > 0 && s.pending_off == s.pending.len() {
                                s.pending.clear();
                                s.pending_off = 0;
                            }
                            s.pending.extend_from_slice(&self.rx[payload]);
                        }
                    }
                }
                EOF => {
                    if s.peer_eof {
                        return Err(ChanError::Violation("second end of stream"));
                    }
                    if matches!(s.dst, Sink::None) && !s.dst_gone {
                        return Err(ChanError::Violation("end of a stream that takes none"));
                    }
                    s.peer_eof = true;
                }
                _ => {
                    let p = &self.rx[payload];
                    let n = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize;
                    if n == 0 || s.credit + n > WINDOW {
                        return Err(ChanError::Violation("credit beyond the window"));
                    }
                    s.credit += n;
                }
            }
        }
        self.rx.drain(..off);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn pair() -> (OwnedFd, OwnedFd) {
        let (a, b) = UnixStream::pair().unwrap();
        (a.into(), b.into())
    }

    /// Runs both ends until `done` says so (bounded).
    fn pump(a: &mut Mux, b: &mut Mux, mut done: impl FnMut(&Mux, &Mux) -> bool) {
        for _ in 0..20_000 {
            if done(a, b) {
                return;
            }
            a.step(&[], 1).unwrap();
            b.step(&[], 1).unwrap();
        }
        panic!("did not finish");
    }

    #[test]
    fn streams_carry_bytes_both_ways_with_end_of_stream() {
        let (pa, pb) = pair();
        let (stdin_w, stdin_r) = pair();
        let (guest_in_r, guest_in_w) = pair();
        let big: Vec<u8> = (0..3 * WINDOW).map(|i| (i % 251) as u8).collect();
        let mut host = Mux::new(
            pa,
            vec![
                (Source::Bytes(b"config".to_vec(), 0), Sink::None),
                (Source::None, Sink::None),
                (Source::Fd(stdin_r), Sink::None),
            ],
        )
        .unwrap();
        let mut guest = Mux::new(
            pb,
            vec![
                (Source::None, Sink::Bytes(Vec::new(), 1024)),
                (Source::None, Sink::None),
                (Source::None, Sink::Fd(guest_in_w)),
            ],
        )
        .unwrap();
        let writer = std::thread::spawn({
            let big = big.clone();
            move || {
                let mut w = UnixStream::from(stdin_w);
                w.write_all(&big).unwrap();
            }
        });
        let reader = std::thread::spawn(move || {
            let mut r = UnixStream::from(guest_in_r);
            r.set_nonblocking(false).unwrap();
            let mut got = Vec::new();
            r.read_to_end(&mut got).unwrap();
            got
        });
        pump(&mut host, &mut guest, |h, g| {
            g.received(stream::VM).is_some() && g.drained() && h.finished()
        });
        assert_eq!(guest.received(stream::VM).unwrap(), b"config");
        writer.join().unwrap();
        drop(guest);
        assert_eq!(reader.join().unwrap(), big);
    }

    #[test]
    fn a_socket_that_is_its_streams_source_and_sink_gets_the_peers_end_as_a_half_close() {
        // The broker stream: at each end one socket is both the stream's
        // source and its sink (two descriptors of it), as the monitor and
        // the guest's init hold it.
        let (pa, pb) = pair();
        let (host_sock, host_far) = pair();
        let (guest_sock, guest_far) = pair();
        let both = |fd: OwnedFd| {
            let w = fd.try_clone().unwrap();
            (Source::Fd(fd), Sink::Fd(w))
        };
        let none = || (Source::None, Sink::None);
        let streams = |fd| {
            let mut v: Vec<(Source, Sink)> = (0..stream::BROKER).map(|_| none()).collect();
            v.push(both(fd));
            v
        };
        let mut host = Mux::new(pa, streams(host_sock)).unwrap();
        let mut guest = Mux::new(pb, streams(guest_sock)).unwrap().guest();
        // The program sends a request and keeps its side open; the
        // host's broker reads it, answers and hangs up (as it does on a
        // frame it refuses).
        let mut host_far = UnixStream::from(host_far);
        let mut guest_far = UnixStream::from(guest_far);
        guest_far.write_all(b"request").unwrap();
        let broker = std::thread::spawn(move || {
            let mut got = [0u8; 7];
            host_far.read_exact(&mut got).unwrap();
            host_far.write_all(b"answer").unwrap();
            drop(host_far);
            got
        });
        let program = std::thread::spawn(move || {
            guest_far
                .set_read_timeout(Some(std::time::Duration::from_secs(15)))
                .unwrap();
            let mut got = Vec::new();
            let r = guest_far.read_to_end(&mut got).map_err(|e| e.kind());
            (r.map(|_| got), guest_far)
        });
        pump(&mut host, &mut guest, |_, _| program.is_finished());
        // The broker had the request and the program the answer (positive
        // controls), then its end: a read of 0, not a wait until the
        // timeout while its own side is still open.
        assert_eq!(&broker.join().unwrap(), b"request");
        let (got, _open) = program.join().unwrap();
        assert_eq!(got, Ok(b"answer".to_vec()));
    }

    fn violation(frames: &[u8]) -> String {
        violation_at(End::Host, frames)
    }

    /// What `frames` sent to an end of kind `end` does to it.
    fn violation_at(end: End, frames: &[u8]) -> String {
        violation_with(end, false, frames)
    }

    /// [`violation_at`], on a host that relays egress when `egress`.
    fn violation_with(end: End, egress: bool, frames: &[u8]) -> String {
        let (pa, pb) = pair();
        // A sink that takes nothing (a full pipe nobody reads): whatever
        // arrives stays pending and is never credited, so the window is
        // exactly what the peer was first granted.
        let (_keep, sink) = crate::sys::pipe().unwrap();
        crate::sys::set_nonblocking(sink.as_raw_fd()).unwrap();
        let chunk = [0u8; 4096];
        while sys::write_fd(sink.as_raw_fd(), &chunk).is_ok() {}
        let mut host = Mux::new(
            pa,
            vec![
                (Source::None, Sink::Bytes(Vec::new(), 16)),
                (Source::None, Sink::Fd(sink)),
            ],
        )
        .unwrap();
        if end == End::Guest {
            host = host.guest();
        }
        if egress {
            host.allow_egress();
        }
        let frames = frames.to_vec();
        let peer = std::thread::spawn(move || {
            let mut peer = UnixStream::from(pb);
            let _ = peer.write_all(&frames);
            // Held open (what the host sends read and dropped) until the
            // host side is done with it.
            let mut sink = Vec::new();
            let _ = peer.read_to_end(&mut sink);
        });
        let mut out = "none".to_string();
        for _ in 0..100 {
            match host.step(&[], 10) {
                Err(ChanError::Violation(why)) => {
                    out = why.to_string();
                    break;
                }
                Err(e) => {
                    out = e.to_string();
                    break;
                }
                Ok(_) => {}
            }
        }
        drop(host);
        peer.join().unwrap();
        out
    }

    fn frame(kind: u8, stream: u8, len: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![kind, stream, 0, 0];
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// A stream whose local reader left still holds the peer to its
    /// window (what arrives is dropped and credited, never buffered): a
    /// peer sending beyond it without credit ends the channel.
    #[test]
    fn a_stream_whose_reader_left_still_holds_the_peer_to_its_window() {
        let parse = |bytes: usize| {
            let (pa, _pb) = pair();
            let mut host = Mux::new(
                pa,
                vec![(Source::None, Sink::None), (Source::None, Sink::None)],
            )
            .unwrap();
            host.streams[1].dst_gone = true;
            let mut sent = 0;
            while sent < bytes {
                let n = (bytes - sent).min(MAX_PAYLOAD);
                host.rx.extend(frame(DATA, 1, n as u32, &vec![7; n]));
                sent += n;
                if let Err(e) = host.parse() {
                    return e.to_string();
                }
            }
            "none".into()
        };
        // Positive control: exactly one window without credit is within
        // bounds; one byte more is not.
        assert_eq!(parse(WINDOW), "none");
        assert_eq!(
            parse(WINDOW + 1),
            "channel protocol violation: data beyond the window"
        );
    }

    #[test]
    fn hostile_frames_end_the_channel_with_their_reason() {
        assert_eq!(
            violation(&frame(DATA, STREAMS as u8, 1, b"x")),
            "unknown stream"
        );
        assert_eq!(violation(&frame(0xee, 1, 0, b"")), "unknown frame kind");
        assert_eq!(violation(&frame(DATA, 1, 0, b"")), "bad frame length");
        assert_eq!(
            violation(&frame(DATA, 1, u32::MAX, b"")),
            "bad frame length"
        );
        assert_eq!(
            violation(&frame(DATA, 2, 1, b"x")),
            "data on a stream that takes none"
        );
        assert_eq!(
            violation(&frame(CREDIT, 1, 4, &1u32.to_le_bytes())),
            "credit beyond the window"
        );
        let mut over = Vec::new();
        for _ in 0..(WINDOW / MAX_PAYLOAD + 1) {
            over.extend(frame(DATA, 1, MAX_PAYLOAD as u32, &vec![0; MAX_PAYLOAD]));
        }
        // Positive control: exactly the window fits (nobody reads the
        // sink's other end, so nothing is credited).
        assert_eq!(
            violation(&over[..over.len() - HEADER - MAX_PAYLOAD]),
            "none"
        );
        assert_eq!(violation(&over), "data beyond the window");
        assert_eq!(
            violation(&frame(DATA, 0, 17, &[0; 17])),
            "stream over its size"
        );
        let mut twice = frame(EOF, 1, 0, b"");
        twice.extend(frame(EOF, 1, 0, b""));
        assert_eq!(violation(&twice), "second end of stream");
        let mut after = frame(EOF, 1, 0, b"");
        after.extend(frame(DATA, 1, 1, b"x"));
        assert_eq!(violation(&after), "data after end of stream");
        let mut h = frame(DATA, 1, 1, b"x");
        h[2] = 1;
        assert_eq!(violation(&h), "reserved header bytes set");
    }

    #[test]
    fn only_the_host_may_quiesce_or_resume_and_only_a_paused_guest_resumes() {
        let resume = frame(RESUME, 0, RESUME_LEN as u32, &[0; RESUME_LEN]);
        // A guest cannot make its host quiesce, resume or pause.
        assert_eq!(violation(&frame(QUIESCE, 0, 0, b"")), "unknown frame kind");
        assert_eq!(violation(&resume), "unknown frame kind");
        // Quiesced the host never asked for (it would skip the drain).
        assert_eq!(violation(&frame(QUIESCED, 0, 0, b"")), "quiesced unasked");
        let mut twice = frame(RESUMED, 0, 0, b"");
        assert_eq!(violation(&twice), "none");
        twice.extend(frame(RESUMED, 0, 0, b""));
        assert_eq!(violation(&twice), "second resumed");
        // A paused guest takes nothing but its resume: no frame left in
        // flight can be read as part of it.
        let mut paused = frame(QUIESCE, 0, 0, b"");
        paused.extend(frame(CREDIT, 1, 4, &1u32.to_le_bytes()));
        assert_eq!(violation_at(End::Guest, &paused), "frame to a paused guest");
        // The host end's kinds reach a guest only as the host sends them.
        assert_eq!(
            violation_at(End::Guest, &frame(QUIESCED, 0, 0, b"")),
            "unknown frame kind"
        );
        assert_eq!(
            violation_at(End::Guest, &resume),
            "resume of a guest not paused"
        );
        assert_eq!(
            violation_at(End::Guest, &frame(QUIESCE, 1, 0, b"")),
            "bad frame length"
        );
        assert_eq!(
            violation_at(End::Guest, &frame(RESUME, 0, 8, &[0; 8])),
            "bad frame length"
        );
        let mut again = frame(QUIESCE, 0, 0, b"");
        again.extend(frame(QUIESCE, 0, 0, b""));
        assert_eq!(violation_at(End::Guest, &again), "quiesce while quiescing");
    }

    /// A guest quiesced by one host end, resumed by a fresh one over the
    /// same port (what a VM restored from a snapshot sees).
    #[test]
    fn a_quiesced_guest_sends_nothing_until_a_fresh_host_resumes_it_with_full_windows() {
        let (pa, pb) = pair();
        let pa2 = pa.try_clone().unwrap();
        let (ctrl_host, ctrl_host_peer) = pair();
        let (ctrl_guest, ctrl_guest_peer) = pair();
        let mut host = Mux::new(
            pa,
            vec![
                (Source::None, Sink::None),
                (
                    Source::Fd(ctrl_host.try_clone().unwrap()),
                    Sink::Fd(ctrl_host),
                ),
            ],
        )
        .unwrap();
        let mut guest = Mux::new(
            pb,
            vec![
                (Source::None, Sink::None),
                (
                    Source::Fd(ctrl_guest.try_clone().unwrap()),
                    Sink::Fd(ctrl_guest),
                ),
            ],
        )
        .unwrap()
        .guest();
        let mut hp = UnixStream::from(ctrl_host_peer);
        let mut gp = UnixStream::from(ctrl_guest_peer);
        // Traffic both ways before the snapshot.
        hp.write_all(b"config").unwrap();
        gp.write_all(b"ready").unwrap();
        let mut got = [0u8; 6];
        pump(&mut host, &mut guest, |_, _| true);
        for _ in 0..200 {
            host.step(&[], 1).unwrap();
            guest.step(&[], 1).unwrap();
        }
        gp.set_nonblocking(true).unwrap();
        gp.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"config");
        let mut five = [0u8; 5];
        hp.set_nonblocking(true).unwrap();
        hp.read_exact(&mut five).unwrap();
        assert_eq!(&five, b"ready");
        host.quiesce();
        pump(&mut host, &mut guest, |h, _| h.quiesced());
        assert!(guest.paused());
        // Paused: what the sandbox writes now is not sent.
        gp.write_all(b"late").unwrap();
        for _ in 0..100 {
            host.step(&[], 1).unwrap();
            guest.step(&[], 1).unwrap();
        }
        let mut none = [0u8; 4];
        assert!(hp.read(&mut none).is_err(), "sent while paused");
        // The saved machine's host end is gone; a fresh one resumes it.
        drop(host);
        let (ctrl2, ctrl2_peer) = pair();
        let mut fresh = Mux::new(
            pa2,
            vec![
                (Source::None, Sink::None),
                (Source::Fd(ctrl2.try_clone().unwrap()), Sink::Fd(ctrl2)),
            ],
        )
        .unwrap();
        let mut payload = [7u8; RESUME_LEN];
        payload[79] = 9;
        fresh.resume(&payload);
        // Sent behind the resume in the same burst: held until taken.
        let mut hp2 = UnixStream::from(ctrl2_peer);
        hp2.write_all(b"job").unwrap();
        for _ in 0..20 {
            fresh.step(&[], 1).unwrap();
        }
        guest.step(&[], 50).unwrap();
        let mut job = [0u8; 3];
        assert!(
            gp.read(&mut job).is_err(),
            "delivered before the resume was taken"
        );
        assert_eq!(guest.take_resume().unwrap(), payload);
        assert_eq!(guest.take_resume(), None);
        assert!(!fresh.resumed());
        guest.ack_resume();
        pump(&mut fresh, &mut guest, |h, _| h.resumed());
        // Both ends now move more than a window each way without a
        // violation: their windows agree.
        let big: Vec<u8> = (0..2 * WINDOW + 5).map(|i| (i % 253) as u8).collect();
        let (b1, b2) = (big.clone(), big.clone());
        let w1 = std::thread::spawn(move || {
            hp2.set_nonblocking(false).unwrap();
            hp2.write_all(&b1).unwrap();
            let mut back = vec![0u8; 4 + b1.len()];
            hp2.read_exact(&mut back).unwrap();
            back
        });
        let w2 = std::thread::spawn(move || {
            gp.set_nonblocking(false).unwrap();
            let mut first = vec![0u8; 3 + b2.len()];
            gp.read_exact(&mut first).unwrap();
            gp.write_all(&b2).unwrap();
            first
        });
        let mut done = 0;
        while !(w1.is_finished() && w2.is_finished()) {
            fresh.step(&[], 1).unwrap();
            guest.step(&[], 1).unwrap();
            done += 1;
            assert!(done < 200_000, "stalled");
        }
        let to_guest = w2.join().unwrap();
        assert_eq!(&to_guest[..3], b"job");
        assert_eq!(&to_guest[3..], &big[..]);
        let to_host = w1.join().unwrap();
        assert_eq!(&to_host[..4], b"late");
        assert_eq!(&to_host[4..], &big[..]);
    }

    #[test]
    fn egress_streams_open_only_closed_from_the_guest_and_release_only_from_the_host() {
        let e = stream::EGRESS;
        let open = frame(OPEN, e, 0, b"");
        // Positive control: a host that relays egress takes an open.
        assert_eq!(violation_with(End::Host, true, &open), "none");
        // One that does not, never.
        assert_eq!(violation(&open), "egress the host does not relay");
        // Only egress streams open, with an empty frame.
        assert_eq!(
            violation_with(End::Host, true, &frame(OPEN, stream::BROKER, 0, b"")),
            "bad frame length"
        );
        assert_eq!(
            violation_with(End::Host, true, &frame(OPEN, e, 1, b"x")),
            "bad frame length"
        );
        let mut twice = open.clone();
        twice.extend(frame(OPEN, e, 0, b""));
        assert_eq!(
            violation_with(End::Host, true, &twice),
            "open of a stream in use"
        );
        // A closed stream takes no data and no end; an opened one holds a
        // window (nobody attached a socket yet) and no more.
        assert_eq!(
            violation_with(End::Host, true, &frame(DATA, e + 1, 1, b"x")),
            "data on a stream that takes none"
        );
        assert_eq!(
            violation_with(End::Host, true, &frame(EOF, e + 1, 0, b"")),
            "end of a stream that takes none"
        );
        let mut held = open.clone();
        for _ in 0..WINDOW / MAX_PAYLOAD {
            held.extend(frame(DATA, e, MAX_PAYLOAD as u32, &vec![1; MAX_PAYLOAD]));
        }
        assert_eq!(violation_with(End::Host, true, &held), "none");
        held.extend(frame(DATA, e, 1, b"x"));
        assert_eq!(
            violation_with(End::Host, true, &held),
            "data beyond the window"
        );
        // A credit on a closed stream reaches a host legitimately (sent
        // before the guest saw the release): ignored; on a guest, never.
        let credit = frame(CREDIT, e, 4, &1u32.to_le_bytes());
        assert_eq!(violation_with(End::Host, true, &credit), "none");
        assert_eq!(
            violation_at(End::Guest, &credit),
            "credit beyond the window"
        );
        // The kinds go one way each.
        assert_eq!(violation_at(End::Guest, &open), "unknown frame kind");
        let release = frame(RELEASE, e, 0, b"");
        assert_eq!(
            violation_with(End::Host, true, &release),
            "unknown frame kind"
        );
        // A guest takes a release only of a stream both ends have ended.
        assert_eq!(
            violation_at(End::Guest, &release),
            "release of a stream in use"
        );
    }

    /// Egress connections through a pair of ends: the guest's forwarder
    /// side (`Mux::open_egress`) and the host's proxy side (`attach`,
    /// `refuse`).
    #[test]
    fn egress_connections_carry_bytes_half_close_and_reuse_their_streams() {
        let (pa, pb) = pair();
        let mut host = Mux::new(pa, vec![]).unwrap();
        host.allow_egress();
        let mut guest = Mux::new(pb, vec![]).unwrap().guest();
        // Every stream opened at once; one more is refused.
        let mut conns = Vec::new();
        for _ in 0..EGRESS_STREAMS {
            let (here, there) = UnixStream::pair().unwrap();
            let id = guest
                .open_egress(here.try_clone().unwrap().into(), here.into())
                .unwrap()
                .expect("a free stream");
            conns.push((id, there));
        }
        let (spare, _spare_peer) = UnixStream::pair().unwrap();
        assert_eq!(
            guest
                .open_egress(spare.try_clone().unwrap().into(), spare.into())
                .unwrap(),
            None
        );
        assert_eq!(guest.egress_open(), EGRESS_STREAMS);
        // The guest sends before the host has a socket for them.
        for (i, (_, c)) in conns.iter_mut().enumerate() {
            c.write_all(format!("hello {i}").as_bytes()).unwrap();
        }
        let mut opened = Vec::new();
        pump(&mut host, &mut guest, |h, _| {
            h.opened.len() == EGRESS_STREAMS
        });
        opened.extend(host.take_opened());
        assert_eq!(opened, conns.iter().map(|(id, _)| *id).collect::<Vec<_>>());
        // The first is refused by the proxy: the guest's side sees end of
        // stream; the rest get sockets.
        host.refuse(opened[0]);
        let mut proxies = Vec::new();
        for id in &opened[1..] {
            let (near, far) = UnixStream::pair().unwrap();
            host.attach(*id, near.try_clone().unwrap().into(), near.into())
                .unwrap();
            far.set_nonblocking(true).unwrap();
            proxies.push(far);
        }
        let mut refused = conns.remove(0).1;
        refused.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        pump(&mut host, &mut guest, |_, _| {
            let mut b = [0u8; 16];
            matches!(refused.read(&mut b), Ok(0))
        });
        // Each proxy socket got its connection's bytes, in order.
        for (i, far) in proxies.iter_mut().enumerate() {
            let want = format!("hello {}", i + 1);
            let mut buf = vec![0u8; want.len()];
            pump(&mut host, &mut guest, |_, _| {
                let mut b = [0u8; 64];
                if let Ok(n) = far.read(&mut b) {
                    got.extend_from_slice(&b[..n]);
                }
                got.len() >= want.len()
            });
            buf.copy_from_slice(&got[..want.len()]);
            got.clear();
            assert_eq!(buf, want.as_bytes());
        }
        // The proxy ends its side first (the server closed): the guest's
        // reader sees end of file while it can still send.
        let (_, c1) = &mut conns[0];
        let far1 = &mut proxies[0];
        far1.write_all(b"reply").unwrap();
        far1.shutdown(std::net::Shutdown::Write).unwrap();
        c1.set_nonblocking(true).unwrap();
        let mut back = Vec::new();
        let mut eof = false;
        pump(&mut host, &mut guest, |_, _| {
            let mut b = [0u8; 64];
            match c1.read(&mut b) {
                Ok(0) => eof = true,
                Ok(n) => back.extend_from_slice(&b[..n]),
                Err(_) => {}
            }
            eof
        });
        assert_eq!(back, b"reply");
        c1.write_all(b"late").unwrap();
        let mut late = Vec::new();
        pump(&mut host, &mut guest, |_, _| {
            let mut b = [0u8; 64];
            if let Ok(n) = far1.read(&mut b) {
                late.extend_from_slice(&b[..n]);
            }
            late == b"late"
        });
        // Every connection ends both ways: all streams come back.
        drop(refused);
        for (_, c) in conns.drain(..) {
            drop(c);
        }
        for p in proxies.drain(..) {
            drop(p);
        }
        pump(&mut host, &mut guest, |h, g| {
            g.egress_open() == 0 && h.egress_open() == 0
        });
        // And carry the next connections: three rounds over every stream.
        for round in 0..3 {
            let mut pairs = Vec::new();
            for _ in 0..EGRESS_STREAMS {
                let (here, there) = UnixStream::pair().unwrap();
                guest
                    .open_egress(here.try_clone().unwrap().into(), here.into())
                    .unwrap()
                    .expect("a stream released");
                pairs.push(there);
            }
            pump(&mut host, &mut guest, |h, _| {
                h.opened.len() == EGRESS_STREAMS
            });
            let mut far = Vec::new();
            for id in host.take_opened() {
                let (near, f) = UnixStream::pair().unwrap();
                host.attach(id, near.try_clone().unwrap().into(), near.into())
                    .unwrap();
                far.push(f);
            }
            for (c, f) in pairs.iter_mut().zip(far.iter_mut()) {
                c.write_all(format!("round {round}").as_bytes()).unwrap();
                c.shutdown(std::net::Shutdown::Write).unwrap();
                f.shutdown(std::net::Shutdown::Write).unwrap();
            }
            for f in far.iter_mut() {
                f.set_nonblocking(true).unwrap();
                let mut all = Vec::new();
                pump(&mut host, &mut guest, |_, _| {
                    let mut b = [0u8; 64];
                    match f.read(&mut b) {
                        Ok(0) => true,
                        Ok(n) => {
                            all.extend_from_slice(&b[..n]);
                            false
                        }
                        Err(_) => false,
                    }
                });
                assert_eq!(all, format!("round {round}").as_bytes());
            }
            drop(pairs);
            drop(far);
            pump(&mut host, &mut guest, |h, g| {
                g.egress_open() == 0 && h.egress_open() == 0
            });
        }
    }
}
