//! Integration tests of `airlock serve` and `airlock admin`: a real server
//! process, a real database (the SQLite file, or in the suite's second
//! round a PostgreSQL database: see `store.rs`), real sockets. The HTTP client here is
//! deliberately raw (std TcpStream) so tests can send exactly the bytes a
//! hostile client would.

// Test helpers may panic: a panic is a test failure with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod abuse;
mod api;
mod audit;
mod backends;
mod broker;
mod contract;
mod egress;
mod hygiene;
mod lifecycle;
mod mcp;
mod nodes;
mod piston;
mod pool;
mod postgres;
mod redaction;
mod sdk;
mod sessions;
mod store;
mod tenants;
mod tls;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_airlock");

pub fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// A data directory with tenants and keys, and optionally a running server.
#[derive(Debug)]
pub struct Server {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub extra_args: Vec<String>,
    pub stderr_path: PathBuf,
    /// Run the server and admin commands as uid/gid 65534 from this copy
    /// of the binary (a rootless server).
    pub unprivileged: Option<PathBuf>,
    /// `--listen` (default 127.0.0.1:0).
    pub listen: String,
    /// Environment variables set for the server.
    pub env: Vec<(String, String)>,
}

/// The command that runs the binary (as 65534 through setpriv, when
/// `unprivileged` names the copy to run).
fn airlock_cmd(unprivileged: Option<&Path>) -> Command {
    match unprivileged {
        Some(bin) => {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(bin);
            c
        }
        None => Command::new(BIN),
    }
}

pub fn admin(dir: &Path, args: &[&str]) -> std::process::Output {
    admin_as(None, dir, args)
}

fn admin_as(unprivileged: Option<&Path>, dir: &Path, args: &[&str]) -> std::process::Output {
    airlock_cmd(unprivileged)
        .arg("admin")
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env_remove("AIRLOCK_MASTER_KEY")
        .env_remove("AIRLOCK_MASTER_KEY_FILE")
        .env_remove("AIRLOCK_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .envs(store::url_for(dir).map(|u| ("AIRLOCK_DATABASE_URL", u)))
        .output()
        .expect("run airlock admin")
}

impl Server {
    /// A fresh data directory (not started), with a fresh PostgreSQL
    /// database in the PostgreSQL round.
    pub fn new(extra: &[&str]) -> Server {
        let s = Server::new_on_sqlite(extra);
        if store::on_postgres() {
            std::fs::write(s.dir.path().join("database_url"), store::new_database()).unwrap();
        }
        s
    }

    /// A fresh data directory whose server uses the SQLite file whatever
    /// the round.
    pub fn new_on_sqlite(extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let stderr_path = dir.path().join("server.log");
        Server {
            dir,
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            stderr_path,
            unprivileged: None,
            listen: "127.0.0.1:0".into(),
            env: Vec::new(),
        }
    }

    /// Starts as uid/gid 65534 (a rootless server; the test runs as root).
    pub fn start_unprivileged(extra: &[&str]) -> Server {
        use std::os::unix::fs::PermissionsExt;
        // SQLite: PostgreSQL's local socket authenticates the OS user, and
        // nothing of a rootless server's store differs.
        let mut s = Server::new_on_sqlite(extra);
        std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = s.dir.path().join("airlock");
        std::fs::copy(BIN, &bin).unwrap();
        std::fs::create_dir(s.data()).unwrap();
        std::fs::set_permissions(s.data(), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(s.data(), Some(65534), Some(65534)).unwrap();
        s.unprivileged = Some(bin);
        s.start();
        s
    }

    /// Starts with defaults plus `extra` flags.
    pub fn start_with(extra: &[&str]) -> Server {
        let mut s = Server::new(extra);
        s.start();
        s
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Creates a tenant and returns a key for it.
    pub fn tenant(&self, name: &str) -> String {
        let out = admin_as(
            self.unprivileged.as_deref(),
            &self.data(),
            &["tenant", "create", name],
        );
        assert!(
            out.status.success(),
            "tenant create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.key(name)
    }

    pub fn key(&self, tenant: &str) -> String {
        let out = admin_as(
            self.unprivileged.as_deref(),
            &self.data(),
            &["key", "create", "--tenant", tenant],
        );
        assert!(out.status.success(), "key create");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .unwrap();
        let mut child = airlock_cmd(self.unprivileged.as_deref())
            .arg("serve")
            .arg("--listen")
            .arg(&self.listen)
            .arg("--data-dir")
            .arg(self.data())
            .args(&self.extra_args)
            .env_remove("AIRLOCK_MASTER_KEY")
            .env_remove("AIRLOCK_MASTER_KEY_FILE")
            .env_remove("AIRLOCK_CONFIG")
            .env_remove("AIRLOCK_DATABASE_URL")
            .env_remove("DATABASE_URL")
            .envs(store::url_for(&self.data()).map(|u| ("AIRLOCK_DATABASE_URL", u)))
            .env("AIRLOCK_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn airlock serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let line = line.trim();
        let addr = line
            .strip_prefix("airlock: listening on http://")
            .or_else(|| line.strip_prefix("airlock: listening on https://"))
            .unwrap_or_else(|| panic!("server did not start: {line:?} {}", self.log()));
        self.addr = addr.parse().unwrap();
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGKILL, like a crash.
    pub fn crash(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM and wait; returns the exit status and how long it took.
    pub fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let mut c = self.child.take().unwrap();
        let t = Instant::now();
        let pid = libc::pid_t::try_from(c.id()).unwrap();
        // SAFETY: `pid` is our own child, not yet waited for, so the pid
        // cannot have been reused by another process; kill has no memory
        // effects.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let st = c.wait().unwrap();
        (st, t.elapsed())
    }

    pub fn req(&self, method: &str, path: &str, key: Option<&str>, body: Option<&Value>) -> Resp {
        let auth = key.map(|k| format!("Bearer {k}"));
        let mut h: Vec<(&str, &str)> = Vec::new();
        if let Some(a) = &auth {
            h.push(("Authorization", a));
        }
        let text = body.map(|b| b.to_string());
        if text.is_some() {
            h.push(("Content-Type", "application/json"));
        }
        raw(
            self.addr,
            method,
            path,
            &h,
            text.as_deref().map(str::as_bytes),
        )
    }

    pub fn get(&self, path: &str, key: &str) -> Resp {
        self.req("GET", path, Some(key), None)
    }

    pub fn post(&self, path: &str, key: &str, body: Value) -> Resp {
        self.req("POST", path, Some(key), Some(&body))
    }

    /// Runs code and waits for the record.
    pub fn run(&self, key: &str, lang: &str, code: &str) -> Value {
        self.exec(key, serde_json::json!({"language": lang, "code": code}))
    }

    /// Creates an execution from `body` and waits for its record (200).
    pub fn exec(&self, key: &str, body: Value) -> Value {
        let r = self.post("/v1/executions", key, body);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// Stores a secret (200).
    pub fn put_secret(&self, key: &str, name: &str, value: &str) {
        let r = self.req(
            "PUT",
            &format!("/v1/secrets/{name}"),
            Some(key),
            Some(&serde_json::json!({ "value": value })),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }

    /// Polls until the execution's status is one of `want`.
    pub fn wait_status(&self, key: &str, id: &str, want: &[&str]) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.get(&format!("/v1/executions/{id}"), key).json();
            if want.contains(&v["status"].as_str().unwrap_or("")) {
                return v;
            }
            assert!(Instant::now() < deadline, "status stayed {}", v["status"]);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs SQL on a data directory's database (`<data>/airlock.db`) with
/// python's sqlite3 (not our code), or on its server's PostgreSQL database
/// in that round, and returns the rows as JSON (blobs as hex).
pub fn query(db: &Path, sql: &str) -> Value {
    if let Some(url) = db.parent().and_then(store::url_for) {
        return store::pg_query(&url, sql);
    }
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import json,sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\n\
             rows=c.execute(sys.argv[2]).fetchall()\nc.commit()\n\
             print(json.dumps([[x.hex() if isinstance(x, bytes) else x for x in r] for r in rows]))",
        )
        .arg(db)
        .arg(sql)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The `warm_pools` line of `airlock doctor --server URL EXTRA...`.
pub fn doctor_pools_line(url: &str, extra: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(["doctor", "--server", url])
        .args(extra)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.contains("warm_pools"))
        .unwrap_or_else(|| panic!("{text}"))
        .to_string()
}

/// A test CA (`ca.pem`, `ca.key`) and a server certificate signed by it for
/// `san` (`srv.pem`, `srv.key`; e.g. `DNS:pkgs.test` or
/// `IP:127.0.0.1,DNS:localhost`) in `dir`: openssl CLI, EC P-256 keys.
pub fn test_ca(dir: &Path, san: &str) {
    let sh = format!(
        "set -e; cd {d}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=airlock-test-ca 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout srv.key -out srv.csr -subj /CN=airlock-test-server 2>/dev/null
printf 'subjectAltName={san}\\nbasicConstraints=CA:FALSE\\n' > ext.cnf
openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile ext.cnf 2>/dev/null",
        d = dir.display()
    );
    let out = Command::new("sh").arg("-c").arg(&sh).output().unwrap();
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Server {
    /// Stops the server the way an operator would (SIGTERM: it drains,
    /// ends its sessions and unmounts their workspaces), then kills it if
    /// it is still there after a while. A bare SIGKILL would leave every
    /// open session's workspace mounted on the host, and no later server
    /// has this data directory's token to reap them.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let mut stopped = false;
            if let Ok(pid) = libc::pid_t::try_from(c.id()) {
                // SAFETY: `pid` is our own child, not yet waited for, so
                // the pid cannot have been reused by another process; kill
                // has no memory effects.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                let t = Instant::now();
                while !stopped && t.elapsed() < Duration::from_secs(20) {
                    stopped = matches!(c.try_wait(), Ok(Some(_)));
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if !stopped {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if let Some(url) = store::url_for(&self.data()) {
            store::drop_database(&url);
        }
    }
}

/// A response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts a problem+json with this status and code.
    pub fn problem(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, status, "{}", self.text());
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{}",
            self.text()
        );
        let v = self.json();
        assert_eq!(v["code"], code, "{v}");
        assert_eq!(v["status"], status);
        assert_eq!(v["type"], format!("urn:airlock:problem:{code}"));
        v
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(pos) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_line = std::str::from_utf8(&b[..pos]).unwrap_or("0");
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = pos + 2;
        out.extend_from_slice(&b[start..(start + size).min(b.len())]);
        b = &b[(start + size + 2).min(b.len())..];
    }
}

/// Sends exactly these bytes as one HTTP/1.1 request and reads the response.
pub fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(180))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("send head");
    // The body goes out from another thread: the server may answer (413)
    // without reading all of a huge body, and the answer must be read.
    let writer = body.map(|b| {
        let mut w = s.try_clone().unwrap();
        let b = b.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&b);
        })
    });
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
    if let Some(w) = writer {
        let _ = w.join();
    }
    parse_response(&buf)
}

pub fn parse_response(buf: &[u8]) -> Resp {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = buf[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Resp {
        status,
        headers,
        body,
    }
}

/// Follows an SSE stream to its end, noting when each event arrived.
pub fn follow_sse(addr: SocketAddr, path: &str, key: &str) -> Vec<(Instant, String, Value)> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut raw_text = String::new();
    let mut events = Vec::new();
    let mut seen = 0;
    let mut buf = [0u8; 65536];
    loop {
        let n = s.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        let now = Instant::now();
        raw_text.push_str(&String::from_utf8_lossy(&buf[..n]));
        // Events are "event: X\nid: N\ndata: {...}\n\n"; chunk-size lines
        // of the transfer encoding sit between events, never inside one
        // small event.
        while let Some(start) = raw_text[seen..].find("event: ") {
            let at = seen + start;
            let Some(end) = raw_text[at..].find("\n\n") else {
                break;
            };
            let block = &raw_text[at..at + end];
            let kind = block
                .lines()
                .next()
                .unwrap()
                .trim_start_matches("event: ")
                .to_string();
            let data = block
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap_or("null");
            events.push((now, kind, serde_json::from_str(data).unwrap_or(Value::Null)));
            seen = at + end + 2;
        }
    }
    events
}
