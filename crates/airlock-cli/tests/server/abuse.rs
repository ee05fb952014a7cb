//! One client or tenant trying to take the server away from the others:
//! slow bodies, connection hoarding, a tenant filling the queue; and the
//! edge's own answers (the HTTP library's errors, ambiguous credentials).
//! Each refusal is checked together with its positive control: the other
//! client or tenant is still served.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{Resp, Server, parse_response};

/// A TCP connection to the server from a chosen loopback source address
/// (every 127.0.0.0/8 address is this machine): another "client".
fn connect_from(src: [u8; 4], to: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from((src, 0)).into()).unwrap();
    sock.connect(&to.into()).unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn read_all(mut s: TcpStream) -> Resp {
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    parse_response(&buf)
}

fn send(mut s: TcpStream, bytes: &[u8]) -> Resp {
    s.write_all(bytes).unwrap();
    read_all(s)
}

fn get_from(src: [u8; 4], to: SocketAddr, path: &str, key: Option<&str>) -> Resp {
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    send(
        connect_from(src, to),
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
    )
}

/// Starts a POST whose body never finishes (one byte of 100 is sent).
fn slow_post(src: [u8; 4], to: SocketAddr, key: &str) -> TcpStream {
    let mut s = connect_from(src, to);
    write!(
        s,
        "POST /v1/executions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    )
    .unwrap();
    s
}

fn config(s: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("airlock.toml");
    std::fs::write(&p, s).unwrap();
    let path = p.to_str().unwrap().to_string();
    (dir, path)
}

#[test]
fn slow_bodies_time_out_and_no_client_or_tenant_holds_every_connection() {
    let (_cfg, path) = config(
        "body_timeout_ms = 1500\nmax_connections = 64\nmax_connections_per_client = 8\n\
         max_requests_per_tenant = 4\n",
    );
    let s = Server::start_with(&["--config", &path]);
    let a = s.tenant("alpha");
    let b = s.tenant("beta");
    let (c1, c2, c3) = ([127, 0, 0, 1], [127, 0, 0, 2], [127, 0, 0, 3]);

    // A body trickled forever is cut off with 408 after the deadline.
    let t = Instant::now();
    let r = read_all(slow_post(c1, s.addr, &a));
    let took = t.elapsed();
    r.problem(408, "request_timeout");
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(8),
        "{took:?}"
    );
    // Positive control: the same request sent whole is served.
    let body = json!({"language": "shell", "code": "true", "wait": false}).to_string();
    let r = send(
        connect_from(c1, s.addr),
        format!(
            "POST /v1/executions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {a}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 202, "{}", r.text());

    // One client holding its 8 connections gets the 9th refused, with a
    // reason; another client is served meanwhile.
    let held: Vec<TcpStream> = (0..8).map(|_| connect_from(c2, s.addr)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let r = read_all(connect_from(c2, s.addr));
    r.problem(429, "too_many_connections");
    assert!(r.header("retry-after").is_some());
    assert_eq!(get_from(c3, s.addr, "/healthz", None).status, 200);
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        get_from(c2, s.addr, "/healthz", None).status,
        200,
        "slots are given back"
    );

    // One tenant holding its 4 requests in flight (slow bodies, from two
    // clients) gets its 5th refused; the other tenant is served.
    let slow: Vec<TcpStream> = (0..4)
        .map(|i| slow_post(if i % 2 == 0 { c1 } else { c3 }, s.addr, &a))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let r = get_from(c2, s.addr, "/v1/secrets", Some(&a));
    r.problem(429, "too_many_requests");
    let ok = get_from(c2, s.addr, "/v1/secrets", Some(&b));
    assert_eq!(ok.status, 200, "{}", ok.text());
    // Once the slow bodies have timed out, alpha is served again.
    for c in slow {
        read_all(c).problem(408, "request_timeout");
    }
    let r = get_from(c2, s.addr, "/v1/secrets", Some(&a));
    assert_eq!(r.status, 200, "{}", r.text());
    let m = s.req("GET", "/metrics", None, None).text();
    assert!(
        m.contains("airlock_tenant_request_rejections_total 1"),
        "{m}"
    );
}

#[test]
fn a_server_holding_all_its_connections_answers_503_and_serves_again_once_they_close() {
    let (_cfg, path) = config("max_connections = 6\nmax_connections_per_client = 4\n");
    let s = Server::start_with(&["--config", &path]);
    let (c1, c2, c3) = ([127, 0, 0, 1], [127, 0, 0, 2], [127, 0, 0, 3]);
    // Positive control: a third client is served while there is room.
    assert_eq!(get_from(c3, s.addr, "/healthz", None).status, 200);
    // Two clients, each within its own share, hold every connection.
    let held: Vec<TcpStream> = (0..4)
        .map(|_| connect_from(c1, s.addr))
        .chain((0..2).map(|_| connect_from(c2, s.addr)))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let r = get_from(c3, s.addr, "/healthz", None);
    r.problem(503, "server_busy");
    assert!(r.header("retry-after").is_some());
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        get_from(c3, s.addr, "/healthz", None).status,
        200,
        "slots are given back"
    );
}

fn tenant_id(s: &Server, name: &str) -> String {
    let out = crate::admin(&s.data(), &["tenant", "list"]);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find(|l| l.ends_with(&format!("\t{name}")))
        .unwrap()
        .split('\t')
        .next()
        .unwrap()
        .to_string()
}

fn metric(s: &Server, line_start: &str) -> Option<f64> {
    s.req("GET", "/metrics", None, None)
        .text()
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn one_tenant_cannot_fill_the_queue_or_starve_the_others() {
    // One worker, a queue of 10: a tenant may have 2 waiting unless
    // configured; "big" may have 5.
    let (_cfg, path) = config("[tenants.limits.big]\nmax_queued = 5\n");
    let s = Server::start_with(&[
        "--max-concurrent",
        "1",
        "--queue-size",
        "10",
        "--config",
        &path,
    ]);
    let a = s.tenant("alpha");
    let b = s.tenant("beta");
    let big = s.tenant("big");
    let slow = json!({"language": "shell", "code": "sleep 0.5", "wait": false});
    let post = |key: &str| s.post("/v1/executions", key, slow.clone());
    let ids: Vec<String> = (0..3)
        .map(|i| {
            let r = post(&a);
            assert_eq!(r.status, 202, "{}", r.text());
            let id = r.json()["id"].as_str().unwrap().to_string();
            if i == 0 {
                s.wait_status(&a, &id, &["running"]);
            }
            id
        })
        .collect();
    // Alpha holds its share: refused, with its own code, while the server
    // has room (beta is accepted).
    let r = post(&a);
    let p = r.problem(429, "tenant_queue_full");
    assert!(r.header("retry-after").is_some());
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("1 running and 2 waiting")
    );
    let rb = post(&b);
    assert_eq!(rb.status, 202, "{}", rb.text());
    let b_id = rb.json()["id"].as_str().unwrap().to_string();
    // The configured tenant has its own, larger share: 5 waiting.
    let mut big_ids = Vec::new();
    for _ in 0..5 {
        let r = post(&big);
        assert_eq!(r.status, 202, "{}", r.text());
        big_ids.push(r.json()["id"].as_str().unwrap().to_string());
    }
    post(&big).problem(429, "tenant_queue_full");
    let alpha = tenant_id(&s, "alpha");
    assert_eq!(
        metric(
            &s,
            &format!("airlock_tenant_queue_rejections_total{{tenant=\"{alpha}\"}}")
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &s,
            &format!("airlock_tenant_queued_executions{{tenant=\"{alpha}\"}}")
        ),
        Some(2.0)
    );
    // The server's own capacity (1 + 10) fills with beta's second and a
    // third tenant's first: then that is queue_full, for everyone.
    let rb2 = post(&b);
    assert_eq!(rb2.status, 202, "{}", rb2.text());
    let gamma = s.tenant("gamma");
    assert_eq!(post(&gamma).status, 202);
    let delta = s.tenant("delta");
    post(&delta).problem(429, "queue_full");
    // Fair dispatch: beta's one execution runs before alpha's third, though
    // alpha queued first (workers go to the tenant running the fewest,
    // taking turns on ties), and before big's backlog.
    let started = |key: &str, id: &str| -> String {
        let v: Value = s.wait_status(key, id, &["finished"]);
        v["started_at"].as_str().unwrap().to_string()
    };
    let a3 = started(&a, &ids[2]);
    let b1 = started(&b, &b_id);
    let a2 = started(&a, &ids[1]);
    let big_last = started(&big, big_ids.last().unwrap());
    assert!(
        b1 < a3,
        "beta {b1} waited for alpha's backlog (alpha 3rd {a3})"
    );
    assert!(a2 < b1, "turns: alpha's 2nd {a2} came before beta {b1}");
    assert!(b1 < big_last);
    // Everything ran; nothing was lost.
    for id in &ids {
        assert_eq!(s.wait_status(&a, id, &["finished"])["reason"], "exited");
    }
}

#[test]
fn two_tenants_cannot_fill_a_server_with_many_workers() {
    // 8 workers, a queue of 8: a tenant's share counts what waits beyond
    // the workers it could start on, so two tenants holding everything they
    // may still leave room for a third.
    let s = Server::start_with(&["--max-concurrent", "8", "--queue-size", "8"]);
    let keys: Vec<String> = ["alpha", "beta", "gamma"]
        .iter()
        .map(|t| s.tenant(t))
        .collect();
    let slow = json!({"language": "shell", "code": "sleep 3", "wait": false});
    let mut accepted = Vec::new();
    for key in &keys[..2] {
        let mut n = 0;
        loop {
            let r = s.post("/v1/executions", key, slow.clone());
            if r.status != 202 {
                r.problem(429, "tenant_queue_full");
                break;
            }
            n += 1;
            assert!(n <= 16, "never refused");
        }
        accepted.push(n);
        // (Beta's count depends on the workers alpha's executions hold:
        // wait until all 8 run.)
        let t = Instant::now();
        while metric(&s, "airlock_running_executions") != Some(8.0) {
            assert!(t.elapsed() < Duration::from_secs(20), "alpha's 8 never ran");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Alpha: 8 on the workers + 2 waiting; beta: 2 waiting.
    assert_eq!(accepted, [10, 2]);
    let r = s.post("/v1/executions", &keys[2], slow);
    assert_eq!(r.status, 202, "gamma is still admitted: {}", r.text());
}

#[test]
fn a_tenant_runs_at_most_its_max_running_while_workers_stay_free() {
    // Five workers; every tenant may run one execution at once, "big" three.
    let (_cfg, path) =
        config("[tenants]\nmax_running = 1\n[tenants.limits.big]\nmax_running = 3\n");
    let s = Server::start_with(&[
        "--max-concurrent",
        "5",
        "--queue-size",
        "16",
        "--config",
        &path,
    ]);
    let a = s.tenant("alpha");
    let big = s.tenant("big");
    let slow = json!({"language": "shell", "code": "sleep 2", "wait": false});
    let post = |key: &str| {
        let r = s.post("/v1/executions", key, slow.clone());
        assert_eq!(r.status, 202, "{}", r.text());
        r.json()["id"].as_str().unwrap().to_string()
    };
    let alpha: Vec<String> = (0..2).map(|_| post(&a)).collect();
    let bigs: Vec<String> = (0..3).map(|_| post(&big)).collect();
    // Positive control: big's own limit lets all three run at once.
    for id in &bigs {
        s.wait_status(&big, id, &["running"]);
    }
    s.wait_status(&a, &alpha[0], &["running"]);
    // Alpha's second waits although a worker is free (1 alpha + 3 big
    // running of 5 workers).
    std::thread::sleep(Duration::from_millis(500));
    let second = s.get(&format!("/v1/executions/{}", alpha[1]), &a).json();
    assert_eq!(second["status"], "queued", "{second}");
    assert_eq!(metric(&s, "airlock_running_executions"), Some(4.0));
    // It runs once alpha's first has finished.
    s.wait_status(&a, &alpha[0], &["finished"]);
    let v = s.wait_status(&a, &alpha[1], &["finished"]);
    assert_eq!(v["result"]["exit_code"], 0, "{v}");
    let (first, second) = (s.get(&format!("/v1/executions/{}", alpha[0]), &a).json(), v);
    // (RFC 3339 times with their fraction trimmed: "26.1Z" is 26.100.)
    let instant = |v: &serde_json::Value| {
        let t = v.as_str().unwrap().trim_end_matches('Z');
        let (secs, frac) = t.split_once('.').unwrap_or((t, ""));
        format!("{secs}.{frac:0<9}")
    };
    assert!(
        instant(&second["started_at"]) >= instant(&first["finished_at"]),
        "{first} {second}"
    );
}

#[test]
fn the_http_librarys_own_errors_are_problem_documents() {
    let s = Server::start_with(&[]);
    let to = s.addr;
    let c = [127, 0, 0, 1];
    let many: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases: [(&str, Vec<u8>, u16, &str); 4] = [
        (
            "too many headers",
            format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n").into_bytes(),
            431,
            "headers_too_large",
        ),
        (
            "duplicate Content-Length",
            b"POST /v1/executions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"
                .to_vec(),
            400,
            "malformed_request",
        ),
        (
            "bad request line",
            b"GET /healthz HTTP/1.1 trailing\r\nHost: x\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
        (
            "URI too long",
            format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000)).into_bytes(),
            414,
            "uri_too_long",
        ),
    ];
    for (what, bytes, status, code) in cases {
        let r = send(connect_from(c, to), &bytes);
        assert_eq!(r.status, status, "{what}: {}", r.text());
        let p = r.problem(status, code);
        assert!(p["detail"].as_str().unwrap().len() > 10, "{what}");
        assert_eq!(
            r.header("content-length").map(str::to_string),
            Some(r.body.len().to_string()),
            "{what}"
        );
    }
    // Positive control: the router's own answers are unchanged and carry
    // the request id.
    let r = get_from(c, to, "/nope", None);
    r.problem(404, "not_found");
    assert!(r.header("x-request-id").is_some());
    assert_eq!(get_from(c, to, "/healthz", None).status, 200);
}

/// Audit rows (kind, detail) of this data directory: auth failures of no
/// known tenant are in no tenant's trail.
pub fn audit_rows(db: &std::path::Path) -> Vec<(String, Value)> {
    let rows = crate::query(db, "SELECT kind, detail FROM audit ORDER BY seq");
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_string(),
                serde_json::from_str(r[1].as_str().unwrap()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn two_authorization_headers_are_refused_and_audited() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let other = s.tenant("other");
    let c = [127, 0, 0, 1];
    for second in [&key, &other, &"alk_garbage".to_string()] {
        let r = send(
            connect_from(c, s.addr),
            format!(
                "GET /v1/secrets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
                 Authorization: Bearer {second}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        );
        let p = r.problem(400, "invalid_request");
        assert!(p["detail"].as_str().unwrap().contains("one Authorization"));
    }
    // Positive control: the same key alone is accepted.
    assert_eq!(s.get("/v1/secrets", &key).status, 200);
    let rows = audit_rows(&s.data().join("airlock.db"));
    let refused = rows
        .iter()
        .filter(|(k, d)| k == "auth.failure" && d["reason"] == "multiple_authorization_headers")
        .count();
    assert_eq!(refused, 3, "{rows:?}");
}

/// A POST to `path` whose body never finishes (one byte of 100 is sent),
/// with `key` or without any.
fn trickle(to: SocketAddr, path: &str, key: Option<&str>) -> TcpStream {
    let mut s = connect_from([127, 0, 0, 1], to);
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    )
    .unwrap();
    s
}

/// Nothing of a request without a valid key is read: it is refused on its
/// head, while its body has not arrived (on PostgreSQL too, where a new
/// session's body is read before the handler to route it to the node
/// holding its snapshot). Positive control: with a key, the same body is
/// waited for until the body deadline.
#[test]
fn a_request_without_a_key_is_refused_before_its_body_is_read() {
    let (_cfg, path) = config("body_timeout_ms = 3000\n");
    let s = Server::start_with(&["--config", &path]);
    let key = s.tenant("acme");
    for p in ["/v1/sessions", "/v1/executions"] {
        read_all(trickle(s.addr, p, None)).problem(401, "unauthorized");
        read_all(trickle(s.addr, p, Some("alk_not_a_key"))).problem(401, "unauthorized");
        read_all(trickle(s.addr, p, Some(&key))).problem(408, "request_timeout");
    }
}
