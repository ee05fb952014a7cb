//! Several `airlock serve` nodes on one PostgreSQL database, as separate
//! processes with their own data directories and ports: work is admitted by
//! the node that receives it, a live event stream, a cancel and a session's
//! files reach the node that runs them through any other node, a node
//! killed with SIGKILL is declared lost by the others within its lease (its
//! executions fail with `node_lost`, its sessions end), it reaps its own
//! leftovers when it comes back, and the audit chain is one chain
//! throughout.
//!
//! These tests make their own database: they run in the suite's first
//! round only (scripts/test leaves them out of the PostgreSQL round).

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{BIN, Server, follow_sse, raw, store};

/// Heartbeat and lease of the test nodes: short, so a loss is seen fast.
const HEARTBEAT_MS: u64 = 200;
const LOST_AFTER_MS: u64 = 1500;

struct Cluster {
    url: String,
    key: String,
    config: tempfile::TempDir,
}

impl Cluster {
    fn new() -> Cluster {
        let config = tempfile::tempdir().unwrap();
        std::fs::write(
            config.path().join("node.toml"),
            format!("[node]\nheartbeat_ms = {HEARTBEAT_MS}\nlost_after_ms = {LOST_AFTER_MS}\n"),
        )
        .unwrap();
        Cluster {
            url: store::new_database(),
            key: "6b".repeat(32),
            config,
        }
    }

    fn node(&self) -> Server {
        let cfg = self.config.path().join("node.toml");
        let mut s = Server::new_on_sqlite(&["--config", cfg.to_str().unwrap()]);
        std::fs::write(s.dir.path().join("database_url"), &self.url).unwrap();
        s.env.push(("AIRLOCK_MASTER_KEY".into(), self.key.clone()));
        s.start();
        s
    }

    fn admin(&self, data: &std::path::Path, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .arg("admin")
            .arg("--data-dir")
            .arg(data)
            .args(args)
            .env("AIRLOCK_DATABASE_URL", &self.url)
            .env("AIRLOCK_MASTER_KEY", &self.key)
            .env_remove("AIRLOCK_MASTER_KEY_FILE")
            .env_remove("AIRLOCK_CONFIG")
            .output()
            .unwrap();
        assert!(out.status.success(), "admin {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    fn sql(&self, q: &str) -> Value {
        store::pg_query(&self.url, q)
    }
}

fn node_id(s: &Server) -> String {
    std::fs::read_to_string(s.data().join("node_id"))
        .unwrap()
        .trim()
        .to_string()
}

fn started(s: &Server, key: &str, body: Value) -> String {
    let r = s.post("/v1/executions", key, body);
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

fn wait_for(s: &Server, key: &str, id: &str, timeout: Duration) -> Value {
    let t = Instant::now();
    loop {
        let v = s.get(&format!("/v1/executions/{id}"), key).json();
        if matches!(v["status"].as_str(), Some("finished" | "failed")) {
            return v;
        }
        assert!(t.elapsed() < timeout, "still {}", v["status"]);
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn wait_running(s: &Server, key: &str, id: &str) {
    let t = Instant::now();
    while s.get(&format!("/v1/executions/{id}"), key).json()["status"] != "running" {
        assert!(t.elapsed() < Duration::from_secs(30), "never ran");
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn nodes_share_one_database_and_the_others_take_over_a_lost_one() {
    let c = Cluster::new();
    let (a, mut b, n3) = (c.node(), c.node(), c.node());
    let ids = [node_id(&a), node_id(&b), node_id(&n3)];
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
    c.admin(&a.data(), &["tenant", "create", "acme"]);
    let key = c.admin(&b.data(), &["key", "create", "--tenant", "acme"]);
    let key = key.trim();

    // Admitted where they arrive: each node runs what it received, and
    // every node answers for every record.
    let mut ran = Vec::new();
    for (i, s) in [&a, &b, &n3, &a, &b, &n3].into_iter().enumerate() {
        let v = s.run(key, "shell", &format!("echo {i}"));
        assert_eq!(v["status"], "finished", "{v}");
        ran.push(v["id"].as_str().unwrap().to_string());
    }
    for (i, id) in ran.iter().enumerate() {
        let owner = c.sql(&format!("SELECT node_id FROM executions WHERE id = '{id}'"));
        assert_eq!(owner[0][0], ids[i % 3].as_str(), "{id}");
        let seen = n3.get(&format!("/v1/executions/{id}"), key).json();
        assert_eq!(seen["result"]["stdout"], format!("{i}\n"));
    }

    // A live stream through a node that does not run the execution: the
    // output as it comes and the end, from node b by way of node a.
    let id = started(
        &b,
        key,
        json!({"language": "python", "wait": false,
               "code": "import time\nprint('tick', flush=True)\ntime.sleep(1)\nprint('tock', flush=True)"}),
    );
    let events = follow_sse(a.addr, &format!("/v1/executions/{id}/events"), key);
    let kinds: Vec<&str> = events.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"started"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"finished"), "{kinds:?}");
    let out: String = events
        .iter()
        .filter(|(_, k, _)| k == "stdout")
        .map(|(_, _, d)| d["data"].as_str().unwrap())
        .collect();
    assert_eq!(out, "tick\ntock\n");
    let tick = events.iter().find(|(_, k, _)| k == "stdout").unwrap().0;
    assert!(
        events.last().unwrap().0.duration_since(tick) >= Duration::from_millis(700),
        "not streamed live"
    );
    let metrics = a.get("/metrics", key).text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("airlock_forwarded_requests_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );

    // Cancel from a third node.
    let long = json!({"language": "shell", "code": "sleep 30", "wait": false,
                      "limits": {"wall_time_ms": 60000}});
    let id = started(&b, key, long.clone());
    wait_running(&b, key, &id);
    let r = n3.post(&format!("/v1/executions/{id}/cancel"), key, json!({}));
    assert_eq!(r.status, 202, "{}", r.text());
    let v = wait_for(&a, key, &id, Duration::from_secs(10));
    assert_eq!(v["reason"], "cancelled", "{v}");

    // A session on node b, used through nodes a and n3.
    let r = b.post("/v1/sessions", key, json!({"language": "shell"}));
    assert_eq!(r.status, 201, "{}", r.text());
    let ss = r.json()["id"].as_str().unwrap().to_string();
    let auth = format!("Bearer {key}");
    let r = raw(
        a.addr,
        "PUT",
        &format!("/v1/sessions/{ss}/files/note.txt"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/octet-stream"),
        ],
        Some(b"written through a"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let f = n3.get(&format!("/v1/sessions/{ss}/files/note.txt"), key);
    assert_eq!(f.body, b"written through a");
    let r = n3.post(
        &format!("/v1/sessions/{ss}/exec"),
        key,
        json!({"code": "cat /workspace/note.txt"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["result"]["stdout"], "written through a");

    // Its snapshot, taken through n3, is kept where the session runs (node
    // b's data directory): its tar comes from there through node a, and a
    // session restored from it through n3 is made there too.
    let r = n3.post(&format!("/v1/sessions/{ss}/snapshots"), key, json!({}));
    assert_eq!(r.status, 201, "{}", r.text());
    let sn = r.json()["id"].as_str().unwrap().to_string();
    let tar = a.get(&format!("/v1/snapshots/{sn}/tar"), key);
    assert_eq!(tar.status, 200, "{}", tar.text());
    let listing = crate::sessions::python(
        "import io,sys,tarfile\nt=tarfile.open(fileobj=io.BytesIO(sys.stdin.buffer.read()))\n\
         for m in t.getmembers():\n  print(m.name, repr(t.extractfile(m).read().decode()))",
        &tar.body,
    );
    assert_eq!(listing, "note.txt 'written through a'\n", "{listing}");
    let r = n3.post(
        "/v1/sessions",
        key,
        json!({"language": "shell", "from_snapshot": sn}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let restored = r.json()["id"].as_str().unwrap().to_string();
    let owner = c.sql(&format!(
        "SELECT node_id FROM sessions WHERE id = '{restored}'"
    ));
    assert_eq!(owner[0][0], ids[1].as_str(), "{owner}");
    let f = a.get(&format!("/v1/sessions/{restored}/files/note.txt"), key);
    assert_eq!(f.body, b"written through a");

    // Another tenant's snapshot on node b, for after the tenant is gone.
    c.admin(&a.data(), &["tenant", "create", "gone"]);
    let gone_key = c.admin(&a.data(), &["key", "create", "--tenant", "gone"]);
    let gone_key = gone_key.trim();
    let gone = c.sql("SELECT id FROM tenants WHERE name = 'gone'")[0][0]
        .as_str()
        .unwrap()
        .to_string();
    let r = b.post("/v1/sessions", gone_key, json!({"language": "shell"}));
    assert_eq!(r.status, 201, "{}", r.text());
    let gs = r.json()["id"].as_str().unwrap().to_string();
    let r = b.post(
        &format!("/v1/sessions/{gs}/exec"),
        gone_key,
        json!({"code": "echo mine > /workspace/mine.txt"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = a.post(&format!("/v1/sessions/{gs}/snapshots"), gone_key, json!({}));
    assert_eq!(r.status, 201, "{}", r.text());
    let blobs = b.data().join("blobs");
    assert!(blobs.join(&gone).is_dir());

    // Node b dies with work running: the others fail it with node_lost
    // within the lease (and a few heartbeats), and end its session.
    let doomed = started(&b, key, long);
    wait_running(&b, key, &doomed);
    let b_pid = b.pid();
    b.crash();
    let t = Instant::now();
    let v = wait_for(&a, key, &doomed, Duration::from_secs(15));
    let took = t.elapsed();
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["reason"], "node_lost", "{v}");
    assert!(
        took < Duration::from_millis(LOST_AFTER_MS + 10 * HEARTBEAT_MS),
        "declared lost after {took:?}"
    );
    let s = n3.get(&format!("/v1/sessions/{ss}"), key).json();
    assert_eq!(s["end_reason"], "node_lost", "{s}");
    let s = a.get(&format!("/v1/sessions/{restored}"), key).json();
    assert_eq!(s["end_reason"], "node_lost", "{s}");
    // What lives only on node b is unavailable while it is down, and says
    // so; the records are not.
    a.get(&format!("/v1/snapshots/{sn}/tar"), key)
        .problem(503, "node_unreachable");
    assert_eq!(a.get(&format!("/v1/snapshots/{sn}"), key).status, 200);
    let nodes = c.admin(&a.data(), &["nodes"]);
    let line = nodes.lines().find(|l| l.starts_with(&ids[1])).unwrap();
    assert!(line.contains("\tlost\t"), "{nodes}");
    let lost = c.sql(&format!(
        "SELECT actor, detail FROM audit WHERE kind = 'node.lost' AND subject = '{}'",
        ids[1]
    ));
    assert_eq!(lost.as_array().unwrap().len(), 1, "declared once: {lost}");
    let actor = lost[0][0].as_str().unwrap();
    assert!(
        actor == format!("node:{}", ids[0]) || actor == format!("node:{}", ids[2]),
        "{actor}"
    );
    // Its host state stays named until the node itself reaps it.
    let hs = c.sql(&format!(
        "SELECT host_state IS NOT NULL FROM executions WHERE id = '{doomed}'"
    ));
    assert_eq!(hs[0][0], 1, "{hs}");
    // Requests about its work now answer from the record.
    let r = a.post(&format!("/v1/executions/{doomed}/cancel"), key, json!({}));
    assert_eq!(r.status, 409, "{}", r.text());

    // While b is down, tenant "gone" is deleted from node a (its session
    // on b ended with b).
    let g = n3.get(&format!("/v1/sessions/{gs}"), gone_key).json();
    assert_eq!(g["end_reason"], "node_lost", "{g}");
    c.admin(&a.data(), &["tenant", "delete", "gone", "--yes"]);

    // Node b comes back: it reaps what it left (nothing of the dead
    // process's remains) and serves again; the snapshot contents it kept
    // of the deleted tenant go, the live tenant's stay.
    b.start();
    let t = Instant::now();
    while blobs.join(&gone).exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "deleted tenant's blobs kept"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    let acme = c.sql(&format!("SELECT tenant_id FROM sessions WHERE id = '{ss}'"));
    assert!(blobs.join(acme[0][0].as_str().unwrap()).is_dir());
    assert_ne!(b.pid(), b_pid);
    let hs = c.sql(&format!(
        "SELECT host_state IS NULL FROM executions WHERE id = '{doomed}'"
    ));
    assert_eq!(hs[0][0], 1, "{hs}");
    let v = b.run(key, "shell", "echo back");
    assert_eq!(v["status"], "finished", "{v}");
    let nodes = c.admin(&a.data(), &["nodes"]);
    assert_eq!(
        nodes.lines().filter(|l| l.contains("\tactive\t")).count(),
        3,
        "{nodes}"
    );

    // One chain, no gap or fork, across every node's writes.
    let out = Command::new(BIN)
        .args(["admin", "--data-dir"])
        .arg(n3.data())
        .args(["audit", "verify"])
        .env("AIRLOCK_DATABASE_URL", &c.url)
        .env("AIRLOCK_MASTER_KEY", &c.key)
        .env_remove("AIRLOCK_MASTER_KEY_FILE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let seqs = c.sql("SELECT seq FROM audit ORDER BY seq");
    let seqs: Vec<i64> = seqs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());

    // Stopped cleanly, each says so; the database goes last (a test
    // server drops its database with it).
    let mut all = [a, b, n3];
    for s in all.iter_mut() {
        let (st, _) = s.terminate();
        assert!(st.success(), "{}", s.log());
    }
    let states = c.sql("SELECT state FROM nodes ORDER BY id");
    assert!(
        states.as_array().unwrap().iter().all(|r| r[0] == "stopped"),
        "{states}"
    );
    drop(all);
}

/// Two processes cannot be one node: a server started on a copy of a
/// running node's data directory is refused; one with a data directory of
/// its own joins (positive control); a different master key is refused.
#[test]
fn a_copied_data_directory_is_not_a_second_node() {
    let c = Cluster::new();
    let a = c.node();
    let copy = tempfile::tempdir().unwrap();
    let data = copy.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    std::fs::copy(a.data().join("node_id"), data.join("node_id")).unwrap();
    let serve = |data: &std::path::Path, key: &str| {
        Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .env("AIRLOCK_DATABASE_URL", &c.url)
            .env("AIRLOCK_MASTER_KEY", key)
            .env_remove("AIRLOCK_MASTER_KEY_FILE")
            .env_remove("AIRLOCK_CONFIG")
            .output()
            .unwrap()
    };
    let out = serve(&data, &c.key);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("another airlock server runs as this node"),
        "{err}"
    );
    assert!(!err.contains(&c.url), "{err}");
    let out = serve(&copy.path().join("other"), &"a5".repeat(32));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("master key does not match"), "{err}");
    let mut b = c.node();
    assert_ne!(node_id(&a), node_id(&b));
    let mut a = a;
    for s in [&mut a, &mut b] {
        let (st, _) = s.terminate();
        assert!(st.success(), "{}", s.log());
    }
}

/// A relay between one node and PostgreSQL's Unix socket that the test can
/// cut (every relayed connection shut, new ones closed at once) and mend:
/// a network partition between that node and the database, and nothing
/// else (the node's own API stays reachable).
struct Partition {
    dir: tempfile::TempDir,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    live: std::sync::Arc<std::sync::Mutex<Vec<std::os::unix::net::UnixStream>>>,
}

impl Partition {
    fn new() -> Partition {
        use std::os::unix::net::{UnixListener, UnixStream};
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join(".s.PGSQL.5432")).unwrap();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let live = std::sync::Arc::new(std::sync::Mutex::new(Vec::<UnixStream>::new()));
        let (c, l) = (cut.clone(), live.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if c.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = UnixStream::connect("/var/run/postgresql/.s.PGSQL.5432") else {
                    continue;
                };
                let mut held = l.lock().unwrap();
                held.push(client.try_clone().unwrap());
                held.push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Partition { dir, cut, live }
    }

    /// The database URL `url` reached through this relay.
    fn url(&self, url: &str) -> String {
        url.replace(
            "host=/var/run/postgresql",
            &format!("host={}", self.dir.path().display()),
        )
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn mend(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Host processes whose command line holds `marker` (a sandbox's are seen
/// from the host: its pid namespace is a child of ours).
fn processes_with(marker: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .collect()
}

fn metric(s: &Server, key: &str, name: &str) -> f64 {
    let m = s.get("/metrics", key).text();
    m.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {m}"))
}

/// A node cut off from the database (its API still up) stops its own work
/// by itself, before the others may declare it lost, while they fail its
/// records with `node_lost`; once the database is reachable again it finds
/// itself declared lost, registers again and serves. Positive control:
/// the same execution runs on it through the relay before the cut.
#[test]
fn a_node_cut_off_from_the_database_stops_its_own_work_before_it_is_declared_lost() {
    let c = Cluster::new();
    let relay = Partition::new();
    let b = c.node();
    let a = {
        let cfg = c.config.path().join("node.toml");
        let mut s = Server::new_on_sqlite(&["--config", cfg.to_str().unwrap()]);
        std::fs::write(s.dir.path().join("database_url"), relay.url(&c.url)).unwrap();
        s.env.push(("AIRLOCK_MASTER_KEY".into(), c.key.clone()));
        s.start();
        s
    };
    let a_id = node_id(&a);
    c.admin(&b.data(), &["tenant", "create", "acme"]);
    let key = c.admin(&b.data(), &["key", "create", "--tenant", "acme"]);
    let key = key.trim();
    let marker = "29.8713";
    let sleeper = json!({"language": "shell", "wait": false, "code": format!("sleep {marker}")});

    // Through the relay it works like any node.
    let ok = a.run(key, "shell", "echo through");
    assert_eq!(ok["status"], "finished", "{ok}");
    let id = started(&a, key, sleeper.clone());
    wait_running(&a, key, &id);
    // Marked running as its sandbox starts: the program follows.
    let t = Instant::now();
    while processes_with(marker).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the program never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(metric(&a, key, "airlock_node_fenced_total"), 0.0);

    relay.cut();
    let t = Instant::now();
    // It stops the program itself within its lease (two heartbeats before
    // its end, noticed within one more), not only when told.
    while !processes_with(marker).is_empty() {
        assert!(
            t.elapsed() < Duration::from_millis(LOST_AFTER_MS + 3000),
            "still running {:?} after the cut",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(metric(&a, key, "airlock_node_fenced_total") >= 1.0);
    // The others fail its record (node b writes it), once.
    let v = wait_for(&b, key, &id, Duration::from_secs(30));
    assert_eq!(
        (v["status"].as_str(), v["reason"].as_str()),
        (Some("failed"), Some("node_lost")),
        "{v}"
    );
    let lost = c.sql(&format!(
        "SELECT count(*) FROM audit WHERE kind = 'node.lost' AND subject = '{a_id}'"
    ));
    assert_eq!(lost[0][0], 1, "{lost}");

    // Mended: it learns it was declared lost, registers again, serves.
    relay.mend();
    let t = Instant::now();
    loop {
        let st = c.sql(&format!("SELECT state FROM nodes WHERE id = '{a_id}'"));
        if st[0][0] == "active" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "not back: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let v = a.run(key, "shell", "echo again");
    assert_eq!(v["status"], "finished", "{v}");
    let owner = c.sql(&format!(
        "SELECT node_id FROM executions WHERE id = '{}'",
        v["id"].as_str().unwrap()
    ));
    assert_eq!(owner[0][0], a_id.as_str());
}

/// A listener standing in for a node: takes one request, keeps its head,
/// answers 202.
fn stand_in() -> (u16, std::thread::JoinHandle<String>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).unwrap() == 1 {
            head.push(b[0]);
        }
        let _ = c.write_all(
            b"HTTP/1.1 202 Accepted\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\
              connection: close\r\n\r\nok",
        );
        String::from_utf8(head).unwrap()
    });
    (port, h)
}

/// The caller's API key never leaves the node it was given to: what a
/// node passes on carries a signature instead (seen by a stand-in at the
/// owner's URL). That signature, sent to the real owner, is taken once
/// (positive control: the cancel it carries happens), and refused 401 when
/// sent again, altered, or beside a key; each refusal audited with its
/// reason.
#[test]
fn requests_between_nodes_are_signed_taken_once_and_never_carry_the_key() {
    let c = Cluster::new();
    let (a, b) = (c.node(), c.node());
    let (a_id, b_id) = (node_id(&a), node_id(&b));
    c.admin(&a.data(), &["tenant", "create", "acme"]);
    let key = c.admin(&b.data(), &["key", "create", "--tenant", "acme"]);
    let key = key.trim().to_string();
    let id = started(
        &a,
        &key,
        json!({"language": "shell", "wait": false, "code": "sleep 28.551"}),
    );
    wait_running(&a, &key, &id);
    let tenant = c.sql(&format!(
        "SELECT tenant_id FROM executions WHERE id = '{id}'"
    ));
    let tenant = tenant[0][0].as_str().unwrap().to_string();

    // What node b sends to "node a": a stand-in at a's URL.
    let real = c.sql(&format!("SELECT url FROM nodes WHERE id = '{a_id}'"));
    let real = real[0][0].as_str().unwrap().to_string();
    let (port, seen) = stand_in();
    c.sql(&format!(
        "UPDATE nodes SET url = 'http://127.0.0.1:{port}' WHERE id = '{a_id}' RETURNING id"
    ));
    let path = format!("/v1/executions/{id}/cancel");
    let r = b.post(&path, &key, json!({}));
    assert_eq!((r.status, r.text()), (202, "ok".to_string()));
    let head = seen.join().unwrap();
    c.sql(&format!(
        "UPDATE nodes SET url = '{real}' WHERE id = '{a_id}' RETURNING id"
    ));
    assert!(
        !head.to_ascii_lowercase().contains("authorization"),
        "{head}"
    );
    assert!(
        !head.contains(&key[4..]),
        "the key's secret left node b: {head}"
    );
    let signed = head
        .lines()
        .find_map(|l| l.strip_prefix("airlock-forwarded-by: "))
        .unwrap_or_else(|| panic!("not signed: {head}"))
        .to_string();
    let key_id = key.split('_').nth(1).unwrap();
    assert!(
        signed.starts_with(&format!("v1 {b_id} {tenant} {key_id} ")),
        "{signed}"
    );

    let send = |value: &str, extra: &[(&str, &str)]| {
        let mut h = vec![
            ("airlock-forwarded-by", value),
            ("content-type", "application/json"),
        ];
        h.extend_from_slice(extra);
        raw(a.addr, "POST", &path, &h, Some(b"{}"))
    };
    // Altered (its last digit), and beside a key: refused, the nonce not
    // spent by either.
    let last = signed.chars().last().unwrap();
    let flipped = format!(
        "{}{}",
        &signed[..signed.len() - 1],
        if last == '0' { '1' } else { '0' }
    );
    send(&flipped, &[]).problem(401, "unauthorized");
    let bearer = format!("Bearer {key}");
    send(&signed, &[("authorization", &bearer)]).problem(401, "unauthorized");
    assert_eq!(
        a.get(&format!("/v1/executions/{id}"), &key).json()["status"],
        "running"
    );
    // As it came: taken, and the execution is cancelled by it.
    let r = send(&signed, &[]);
    assert_eq!(r.status, 202, "{}", r.text());
    let v = wait_for(&a, &key, &id, Duration::from_secs(10));
    assert_eq!(v["reason"], "cancelled", "{v}");
    // Once only.
    send(&signed, &[]).problem(401, "unauthorized");
    let reasons = c.sql("SELECT detail FROM audit WHERE kind = 'auth.failure' ORDER BY seq");
    let reasons: Vec<String> = reasons
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let d: Value = match &r[0] {
                Value::String(s) => serde_json::from_str(s).unwrap(),
                v => v.clone(),
            };
            d["reason"].as_str().unwrap_or("").to_string()
        })
        .collect();
    assert_eq!(
        reasons,
        [
            "forwarded_bad_signature",
            "forwarded_malformed",
            "forwarded_replayed"
        ],
        "{reasons:?}"
    );
}
