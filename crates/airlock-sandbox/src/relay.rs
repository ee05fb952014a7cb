//! The egress forwarder's relay mode, for a sandbox whose connections
//! cannot be handed to the host as descriptors (gVisor: a socket of the
//! sentry's own network stack cannot leave it). For each connection
//! accepted on 127.0.0.1, the forwarder asks the host for a socket
//! ([`RELAY_REQUEST`], no descriptor), receives one end of a fresh socket
//! pair whose other end the host proxy serves exactly as an accepted
//! connection, and copies bytes both ways. It reads nothing it relays; the
//! proxy decides as always. Still never a route: the only way out is the
//! host's proxy.
//!
//! A microVM's guest init answers the same requests, with a socket whose
//! other end it carries over an egress stream of the VM's channel; when
//! every stream is in use it has none yet ([`RELAY_REFUSED`]) and the
//! connection waits for one.
//!
//! One process, one poll loop, at most [`MAX_RELAYS`] connections at once,
//! relayed or waiting (beyond, new ones are closed): no task per connection
//! counts against the sandbox's pids limit.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use crate::launch::EGRESS_FD;
use crate::sys;

/// The byte that asks the host for a relay socket (the proxy's
/// `airlock_egress::RELAY_REQUEST`).
pub const RELAY_REQUEST: u8 = b'r';

/// The answer, without a descriptor, that has no socket for a connection
/// yet (a microVM's guest init with every egress stream of its channel in
/// use): the connection waits, as in a listen backlog, and asks again
/// every [`RETRY_MS`] until one is free, for at most [`WAIT_MAX`].
pub const RELAY_REFUSED: u8 = b'n';

/// How often a waiting connection asks again.
const RETRY_MS: i32 = 20;

/// How long a connection may wait for a socket before it is closed.
const WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// Connections relayed at once.
pub const MAX_RELAYS: usize = 256;

const BUF: usize = 64 << 10;

/// One direction of a relayed connection.
struct Half {
    buf: Vec<u8>,
    off: usize,
    /// The source reached end of file (or failed).
    eof: bool,
    /// The destination's write side is shut down.
    shut: bool,
}

impl Half {
    fn new() -> Self {
        Half {
            buf: Vec::with_capacity(BUF),
            off: 0,
            eof: false,
            shut: false,
        }
    }

    fn pending(&self) -> bool {
        self.off < self.buf.len()
    }

    fn done(&self) -> bool {
        self.eof && !self.pending()
    }
}

struct Pair {
    conn: TcpStream,
    host: UnixStream,
    /// conn -> host.
    up: Half,
    /// host -> conn.
    down: Half,
}

/// Reads into an empty half; end of file (or an error) finishes it.
fn fill(src: &mut impl Read, h: &mut Half) {
    h.buf.resize(BUF, 0);
    match src.read(&mut h.buf) {
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::Interrupted =>
        {
            h.buf.clear();
        }
        Ok(0) | Err(_) => {
            h.buf.clear();
            h.eof = true;
        }
        Ok(n) => {
            h.buf.truncate(n);
            h.off = 0;
        }
    }
}

/// Writes what a half holds; on an error the direction is finished.
fn drain(dst: &mut impl Write, h: &mut Half) {
    match dst.write(&h.buf[h.off..]) {
        Ok(n) => h.off += n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(_) => {
            h.buf.clear();
            h.off = 0;
            h.eof = true;
        }
    }
    if !h.pending() {
        h.buf.clear();
        h.off = 0;
    }
}

/// Asks the host for a relay socket: `Err` when the host is gone,
/// `Ok(None)` when it refused this one connection.
fn relay_socket() -> Result<Option<UnixStream>, ()> {
    sys::send_with_fds(EGRESS_FD, &[RELAY_REQUEST], &[]).map_err(|_| ())?;
    let mut b = [0u8; 1];
    let (n, mut fds) = sys::recv_with_fds(EGRESS_FD, &mut b, 1).map_err(|_| ())?;
    if n == 1 && b[0] == RELAY_REFUSED && fds.is_empty() {
        return Ok(None);
    }
    if n != 1 || b[0] != RELAY_REQUEST || fds.len() != 1 {
        return Err(());
    }
    let fd: OwnedFd = fds.remove(0);
    let s = UnixStream::from(fd);
    s.set_nonblocking(true).map_err(|_| ())?;
    Ok(Some(s))
}

fn pair(conn: TcpStream, host: UnixStream) -> Option<Pair> {
    conn.set_nonblocking(true).ok()?;
    Some(Pair {
        conn,
        host,
        up: Half::new(),
        down: Half::new(),
    })
}

/// The relaying forwarder. Never returns.
pub(crate) fn forwarder(listener: TcpListener) -> ! {
    if listener.set_nonblocking(true).is_err() {
        sys::exit_now(1);
    }
    let mut pairs: Vec<Pair> = Vec::new();
    // Accepted, waiting for a socket (oldest first); together with the
    // pairs at most MAX_RELAYS.
    let mut waiting: std::collections::VecDeque<(TcpStream, std::time::Instant)> =
        std::collections::VecDeque::new();
    loop {
        while let Some((_, since)) = waiting.front() {
            if since.elapsed() > WAIT_MAX {
                waiting.pop_front();
                continue;
            }
            match relay_socket() {
                Ok(Some(host)) => {
                    if let Some((conn, _)) = waiting.pop_front()
                        && let Some(p) = pair(conn, host)
                    {
                        pairs.push(p);
                    }
                }
                Ok(None) => break,
                Err(()) => sys::exit_now(0),
            }
        }
        let mut fds = vec![(listener.as_raw_fd(), libc::POLLIN)];
        for p in &pairs {
            let want = |read: bool, write: bool| {
                (if read { libc::POLLIN } else { 0 }) | (if write { libc::POLLOUT } else { 0 })
            };
            fds.push((
                p.conn.as_raw_fd(),
                want(!p.up.eof && !p.up.pending(), p.down.pending()),
            ));
            fds.push((
                p.host.as_raw_fd(),
                want(!p.down.eof && !p.down.pending(), p.up.pending()),
            ));
        }
        let timeout = if waiting.is_empty() { -1 } else { RETRY_MS };
        let Ok(rev) = sys::poll(&fds, timeout) else {
            sys::exit_now(1);
        };
        // The pairs polled: one accepted below waits for the next round.
        let polled = pairs.len();
        if rev[0] != 0 {
            match listener.accept() {
                Ok((conn, _)) if pairs.len() + waiting.len() < MAX_RELAYS => {
                    // Behind others that wait: it waits too (in order).
                    let got = if waiting.is_empty() {
                        relay_socket()
                    } else {
                        Ok(None)
                    };
                    match got {
                        Ok(Some(host)) => pairs.extend(pair(conn, host)),
                        Ok(None) => waiting.push_back((conn, std::time::Instant::now())),
                        // The proxy is gone: nothing else to do.
                        Err(()) => sys::exit_now(0),
                    }
                }
                // Over the limit: this connection is closed.
                Ok(_) => {}
                Err(_) => {}
            }
        }
        for (i, p) in pairs.iter_mut().take(polled).enumerate() {
            let (c, h) = (rev[1 + 2 * i], rev[2 + 2 * i]);
            if c & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
                && !p.up.eof
                && !p.up.pending()
            {
                fill(&mut p.conn, &mut p.up);
            }
            if h & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
                && !p.down.eof
                && !p.down.pending()
            {
                fill(&mut p.host, &mut p.down);
            }
            if p.up.pending() {
                drain(&mut p.host, &mut p.up);
            }
            if p.down.pending() {
                drain(&mut p.conn, &mut p.down);
            }
            // A finished direction is passed on as a half-close.
            if p.up.done() && !p.up.shut {
                let _ = p.host.shutdown(Shutdown::Write);
                p.up.shut = true;
            }
            if p.down.done() && !p.down.shut {
                let _ = p.conn.shutdown(Shutdown::Write);
                p.down.shut = true;
            }
        }
        pairs.retain(|p| !(p.up.done() && p.down.done()));
    }
}
