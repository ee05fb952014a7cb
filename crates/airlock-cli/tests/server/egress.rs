//! Egress: default-deny, a domain allowlist enforced by the host-side
//! proxy, and the known bypasses. Every destination is a test host on this
//! machine's loopback, named by a DNS server the test runs itself.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::Server;

/// A DNS server on 127.0.0.1 answering A queries from a table (a name may
/// have a sequence of answers, one per query: rebinding), logging every
/// name it is asked.
struct Dns {
    addr: SocketAddr,
    asked: Arc<Mutex<Vec<String>>>,
}

impl Dns {
    fn start(table: HashMap<&'static str, Vec<Ipv4Addr>>) -> Dns {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        let mut served: HashMap<String, usize> = HashMap::new();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                let q = &buf[..n];
                if n < 12 {
                    continue;
                }
                // Question name.
                let mut i = 12;
                let mut labels = Vec::new();
                while i < n && q[i] != 0 {
                    let l = q[i] as usize;
                    labels
                        .push(String::from_utf8_lossy(&q[i + 1..(i + 1 + l).min(n)]).into_owned());
                    i += 1 + l;
                }
                let qend = i + 5;
                if qend > n {
                    continue;
                }
                let qtype = u16::from_be_bytes([q[i + 1], q[i + 2]]);
                let name = labels.join(".").to_lowercase();
                log.lock().unwrap().push(name.clone());
                let answers: Vec<Ipv4Addr> = match table.get(name.as_str()) {
                    Some(seq) if qtype == 1 => {
                        let k = served.entry(name.clone()).or_insert(0);
                        let a = seq[(*k).min(seq.len() - 1)];
                        *k += 1;
                        vec![a]
                    }
                    _ => vec![],
                };
                let known = table.contains_key(name.as_str());
                let mut r = Vec::new();
                r.extend_from_slice(&q[..2]);
                r.extend_from_slice(&[0x81, if known { 0x80 } else { 0x83 }]);
                r.extend_from_slice(&[0, 1]);
                r.extend_from_slice(&(answers.len() as u16).to_be_bytes());
                r.extend_from_slice(&[0, 0, 0, 0]);
                r.extend_from_slice(&q[12..qend]);
                for a in answers {
                    r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4]);
                    r.extend_from_slice(&a.octets());
                }
                let _ = sock.send_to(&r, from);
            }
        });
        Dns { addr, asked }
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

/// A test host: answers HTTP requests with "upstream-ok", echoes anything
/// else, and records what each connection sent first.
struct Upstream {
    port: u16,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Upstream {
    fn start(ip: Ipv4Addr, port: u16) -> Upstream {
        let l = TcpListener::bind((ip, port)).unwrap();
        let port = l.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let log = log.clone();
                std::thread::spawn(move || {
                    // Long enough for a client that stays silent past the
                    // proxy's head timeout.
                    c.set_read_timeout(Some(Duration::from_secs(20))).ok();
                    let mut buf = [0u8; 65536];
                    let n = c.read(&mut buf).unwrap_or(0);
                    if buf[..n].starts_with(b"GET ") || buf[..n].starts_with(b"POST ") {
                        let _ = c
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nupstream-ok");
                        // Everything the proxy sends on this connection is
                        // recorded, so a forwarded second request would show.
                        let mut all = buf[..n].to_vec();
                        c.set_read_timeout(Some(Duration::from_millis(300))).ok();
                        while let Ok(k) = c.read(&mut buf) {
                            if k == 0 {
                                break;
                            }
                            all.extend_from_slice(&buf[..k]);
                        }
                        log.lock().unwrap().push(all);
                        return;
                    }
                    log.lock().unwrap().push(buf[..n].to_vec());
                    let _ = c.write_all(&buf[..n]);
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Upstream { port, seen }
    }

    fn seen(&self) -> Vec<Vec<u8>> {
        self.seen.lock().unwrap().clone()
    }
}

/// Python helpers run inside the sandbox: talk to the forwarder directly.
const CLIENT: &str = r#"
import json, os, socket, sys
PROXY = ("127.0.0.1", 3128)
def talk(data, then=b"", wait=1.0):
    s = socket.create_connection(PROXY, timeout=5)
    s.sendall(data)
    out = b""
    s.settimeout(wait)
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
            if then and b"\r\n\r\n" in out and out.startswith(b"HTTP/1.1 200 Connection"):
                s.sendall(then)
                then = b""
    except socket.timeout:
        pass
    s.close()
    return out.decode("latin-1")
def status(resp):
    return resp.split(" ")[1] if resp.startswith("HTTP/") else "closed"
"#;

fn hello(sni: &str) -> String {
    // A minimal TLS 1.2 ClientHello record naming `sni`, as python bytes.
    let n = sni.as_bytes();
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    let mut list = vec![0u8];
    list.extend_from_slice(&(n.len() as u16).to_be_bytes());
    list.extend_from_slice(n);
    let mut data = (list.len() as u16).to_be_bytes().to_vec();
    data.extend_from_slice(&list);
    let mut ext = vec![0, 0];
    ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
    ext.extend_from_slice(&data);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1u8];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    format!(
        "bytes.fromhex('{}')",
        rec.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// A ClientHello whose outer SNI is `sni` and which also carries an
/// Encrypted Client Hello extension (0xfe0d) hiding the real name.
fn hello_ech(sni: &str) -> String {
    let plain = hello(sni);
    let hex = &plain["bytes.fromhex('".len()..plain.len() - 2];
    let mut rec: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let ext = [0xfe, 0x0d, 0, 4, 1, 2, 3, 4];
    rec.extend_from_slice(&ext);
    let add = ext.len();
    let rl = u16::from_be_bytes([rec[3], rec[4]]) as usize + add;
    rec[3..5].copy_from_slice(&(rl as u16).to_be_bytes());
    let hl = u32::from_be_bytes([0, rec[6], rec[7], rec[8]]) as usize + add;
    rec[6..9].copy_from_slice(&(hl as u32).to_be_bytes()[1..]);
    // Extensions length: record(5) + handshake header(4) + version(2) +
    // random(32) + session id(1) + suites(2+2) + compression(1+1).
    let at = 5 + 4 + 2 + 32 + 1 + 4 + 2;
    let el = u16::from_be_bytes([rec[at], rec[at + 1]]) as usize + add;
    rec[at..at + 2].copy_from_slice(&(el as u16).to_be_bytes());
    format!(
        "bytes.fromhex('{}')",
        rec.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

struct Setup {
    s: Server,
    key: String,
    dns: Dns,
    up: Upstream,
    other: Upstream,
}

fn setup() -> Setup {
    setup_with("")
}

/// `setup` with these top-level configuration lines.
fn setup_with(top: &str) -> Setup {
    setup_with_port(|_| top.to_string())
}

/// `setup` with the configuration lines `top` makes from the test host's
/// port.
fn setup_with_port(top: impl FnOnce(u16) -> String) -> Setup {
    let up = Upstream::start(Ipv4Addr::LOCALHOST, 0);
    let p = up.port;
    let top = top(p);
    // A second host on another loopback address, same port (rebinding).
    let other = Upstream::start(Ipv4Addr::new(127, 0, 0, 2), p);
    let lo = Ipv4Addr::LOCALHOST;
    let dns = Dns::start(HashMap::from([
        ("allowed.test", vec![lo]),
        ("a.wild.test", vec![lo]),
        ("wild.test", vec![lo]),
        ("evilwild.test", vec![lo]),
        ("wild.test.evil.test", vec![lo]),
        ("denied.test", vec![lo]),
        ("sneaky.public.test", vec![lo]),
        ("meta.public.test", vec![Ipv4Addr::new(169, 254, 169, 254)]),
        ("rebind.test", vec![lo, Ipv4Addr::new(127, 0, 0, 2)]),
        ("tls.test", vec![Ipv4Addr::new(127, 0, 0, 3)]),
        ("silent.test", vec![Ipv4Addr::new(127, 0, 0, 4)]),
        ("pkgs.test", vec![Ipv4Addr::new(127, 0, 0, 5)]),
    ]));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("airlock.toml");
    std::fs::write(
        &cfg,
        format!(
            "{top}\n[egress]\nallow = [\"*.public.test:{p}\", \"127.0.0.1:{p}\"]\nallow_private = [\"allowed.test:{p}\", \"*.wild.test:{p}\", \"rebind.test:{p}\", \"tls.test:443\", \"silent.test:{p}\", \"pkgs.test:{p}\"]\ndns = \"{}\"\n",
            dns.addr
        ),
    )
    .unwrap();
    let s = Server::start_with(&["--config", cfg.to_str().unwrap()]);
    std::mem::forget(dir);
    let key = s.tenant("acme");
    Setup {
        s,
        key,
        dns,
        up,
        other,
    }
}

fn run(t: &Setup, code: &str, network: Value) -> Value {
    let r = t.s.post(
        "/v1/executions",
        &t.key,
        json!({"language": "python", "code": format!("{CLIENT}\n{code}"), "network": network,
               "limits": {"wall_time_ms": 30000}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["result"]["exit_code"], 0, "{v}");
    v
}

fn lines(v: &Value) -> Vec<String> {
    v["result"]["stdout"]
        .as_str()
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn allowlist_decides_before_dns_and_checks_addresses_after() {
    let t = setup();
    let p = t.up.port;
    let net = json!({"allow": [format!("sneaky.public.test:{p}"), format!("meta.public.test:{p}"), format!("127.0.0.1:{p}")],
                     "allow_private": [format!("allowed.test:{p}"), format!("*.wild.test:{p}")]});
    let code = format!(
        r#"
targets = ["allowed.test", "denied.test", "a.wild.test", "wild.test", "evilwild.test",
           "wild.test.evil.test", "sneaky.public.test", "meta.public.test",
           "127.0.0.1", "2130706433", "0x7f000001", "0x7f.1", "127.1", "0177.0.0.1",
           "[::1]", "[::ffff:127.0.0.1]", "ALLOWED.TEST.", "allowed.test:{p}@denied.test"]
for h in targets:
    r = talk(("CONNECT %s:{p} HTTP/1.1\r\nHost: x\r\n\r\n" % h).encode(), then=b"ping\r\n")
    print(h, status(r), "ping" in r.split("\r\n\r\n", 1)[-1])
r = talk(b"GET http://allowed.test:{p}/x HTTP/1.1\r\nHost: evil.test\r\n\r\n")
print("http", status(r), r.endswith("upstream-ok"))
r = talk(b"GET http://denied.test:{p}/x HTTP/1.1\r\n\r\n")
print("http-denied", status(r))
print("port", status(talk(b"CONNECT allowed.test:1 HTTP/1.1\r\n\r\n")))
"#
    );
    let v = run(&t, &code, net);
    let out = lines(&v);
    let want = [
        "allowed.test 200 True",
        "denied.test 403 False",
        "a.wild.test 200 True",
        "wild.test 403 False",
        "evilwild.test 403 False",
        "wild.test.evil.test 403 False",
        "sneaky.public.test 403 False",
        "meta.public.test 403 False",
        "127.0.0.1 403 False",
        "2130706433 403 False",
        "0x7f000001 403 False",
        "0x7f.1 403 False",
        "127.1 403 False",
        "0177.0.0.1 403 False",
        "[::1] 403 False",
        "[::ffff:127.0.0.1] 403 False",
        "ALLOWED.TEST. 200 True",
    ];
    for (i, w) in want.iter().enumerate() {
        assert_eq!(out[i], *w, "{out:?}");
    }
    assert!(
        out[17].ends_with(" 400 False") || out[17].ends_with(" 403 False"),
        "{out:?}"
    );
    assert_eq!(out[18], "http 200 True");
    assert_eq!(out[19], "http-denied 403");
    assert_eq!(out[20], "port 403");
    // The forwarded request carried the checked Host, not the client's.
    let seen = t.up.seen();
    let get = seen
        .iter()
        .find(|r| r.starts_with(b"GET /x"))
        .expect("request forwarded");
    let text = String::from_utf8_lossy(get);
    assert!(
        text.contains(&format!("Host: allowed.test:{p}")) && !text.contains("evil.test"),
        "{text}"
    );
    // No DNS query for anything a rule does not admit, nor for literals.
    let asked = t.dns.asked();
    for never in [
        "denied.test",
        "wild.test",
        "evilwild.test",
        "wild.test.evil.test",
    ] {
        assert!(
            !asked.iter().any(|a| a == never),
            "{never} was looked up: {asked:?}"
        );
    }
    assert!(
        asked.iter().any(|a| a == "allowed.test"),
        "positive control: {asked:?}"
    );
    // Every decision is in the record and the audit log.
    let egress = v["egress"].as_array().unwrap();
    assert!(egress.iter().any(|e| e["decision"] == "allowed"
        && e["host"] == "allowed.test"
        && e["bytes_up"].as_u64().unwrap() > 0));
    let meta = egress
        .iter()
        .find(|e| e["host"] == "meta.public.test")
        .unwrap();
    assert_eq!(
        meta["reason"],
        "name resolves to a forbidden address (link_local)"
    );
    let sneaky = egress
        .iter()
        .find(|e| e["host"] == "sneaky.public.test")
        .unwrap();
    assert_eq!(
        sneaky["reason"],
        "name resolves to a forbidden address (loopback)"
    );
    let audit = t.s.get("/v1/audit?limit=500", &t.key).text();
    assert!(audit.contains("egress.allowed") && audit.contains("egress.denied"));
}

#[test]
fn sni_mismatch_pipelining_relays_rebinding_and_direct_connections() {
    let t = setup();
    let p = t.up.port;
    let net = json!({"allow_private": [format!("allowed.test:{p}"), format!("rebind.test:{p}")]});
    let good = hello("allowed.test");
    let evil = hello("evil.test");
    let ech = hello_ech("allowed.test");
    let code = format!(
        r#"
import errno
r = talk(b"CONNECT allowed.test:{p} HTTP/1.1\r\n\r\n", then={good})
print("sni-ok", status(r), len(r.split("\r\n\r\n", 1)[1]))
r = talk(b"CONNECT allowed.test:{p} HTTP/1.1\r\n\r\n", then={evil})
print("sni-evil", status(r), len(r.split("\r\n\r\n", 1)[1]))
r = talk(b"GET http://allowed.test:{p}/one HTTP/1.1\r\n\r\nGET http://denied.test:{p}/two HTTP/1.1\r\n\r\n")
print("pipelined", status(r), r.count("HTTP/1.1"))
r = talk(b"CONNECT allowed.test:{p} HTTP/1.1\r\n\r\n", then=b"CONNECT denied.test:{p} HTTP/1.1\r\n\r\n")
print("relay", status(r), len(r.split("\r\n\r\n", 1)[1]))
r = talk(b"CONNECT allowed.test:{p} HTTP/1.1\r\n\r\n", then=b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n")
print("http-in-tunnel", status(r), len(r.split("\r\n\r\n", 1)[1]))
r = talk(b"CONNECT allowed.test:{p} HTTP/1.1\r\n\r\n", then={ech})
print("ech", status(r), len(r.split("\r\n\r\n", 1)[1]))
r = talk(b"CONNECT rebind.test:{p} HTTP/1.1\r\n\r\n", then=b"which")
print("rebind", status(r))
for addr in [("127.0.0.1", {p}), ("10.255.255.1", 80)]:
    try:
        socket.create_connection(addr, timeout=2)
        print("direct", addr[0], "connected")
    except OSError as e:
        print("direct", addr[0], errno.errorcode.get(e.errno, e.errno))
"#
    );
    // Positive control for the bypass: from the host, the test server is
    // reachable at that address.
    std::net::TcpStream::connect(("127.0.0.1", p)).unwrap();
    let before = t.up.seen().len();
    let v = run(&t, &code, net);
    let out = lines(&v);
    // "bytes.fromhex('<hex>')": two hex digits per byte.
    let hello_len = (good.len() - "bytes.fromhex('')".len()) / 2;
    assert_eq!(out[0], format!("sni-ok 200 {hello_len}"), "{out:?}");
    assert_eq!(out[1], "sni-evil 200 0", "{out:?}");
    assert_eq!(out[2], "pipelined 200 1", "{out:?}");
    // A CONNECT relayed inside the tunnel is HTTP inside a tunnel: closed.
    assert_eq!(out[3], "relay 200 0", "{out:?}");
    assert_eq!(out[4], "http-in-tunnel 200 0", "{out:?}");
    assert_eq!(out[5], "ech 200 0", "{out:?}");
    assert_eq!(out[6], "rebind 200", "{out:?}");
    assert_eq!(out[7], "direct 127.0.0.1 ECONNREFUSED", "{out:?}");
    assert_eq!(out[8], "direct 10.255.255.1 ENETUNREACH", "{out:?}");
    let seen: Vec<String> = t.up.seen()[before..]
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    // The mismatched ClientHello never reached the destination; the
    // matching one did.
    assert!(!seen.iter().any(|s| s.contains("evil.test")), "{seen:?}");
    assert!(
        seen.iter()
            .any(|s| s.contains("allowed.test") && s.starts_with('\u{16}'))
    );
    // Exactly one request forwarded from the pipelined pair: the second
    // never reached any upstream.
    assert_eq!(
        seen.iter().filter(|s| s.starts_with("GET /one")).count(),
        1,
        "{seen:?}"
    );
    assert!(!seen.iter().any(|s| s.contains("/two")), "{seen:?}");
    // Neither the relayed CONNECT, the HTTP request inside a tunnel nor
    // the ECH hello reached the destination.
    assert!(
        !seen
            .iter()
            .any(|s| s.contains("denied.test") || s.contains("other.test")),
        "{seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|s| s.as_bytes().windows(4).any(|w| w == [0xfe, 0x0d, 0, 4]))
    );
    assert!(!t.dns.asked().iter().any(|a| a == "denied.test"));
    // Rebinding: one lookup, and the connection went to the checked
    // address (127.0.0.1), never to the second answer (127.0.0.2).
    assert_eq!(
        t.dns.asked().iter().filter(|a| *a == "rebind.test").count(),
        1
    );
    assert!(
        t.other.seen().is_empty(),
        "connected to the rebound address"
    );
    let egress = v["egress"].as_array().unwrap();
    let sni = egress
        .iter()
        .find(|e| e["reason"].as_str().is_some_and(|r| r.contains("SNI")))
        .expect("SNI mismatch logged");
    assert_eq!(sni["decision"], "denied");
}

#[test]
fn egress_audits_are_bounded_then_summarised_and_never_hold_a_secret() {
    let t = setup();
    let p = t.up.port;
    let r = t.s.req(
        "PUT",
        "/v1/secrets/LABEL",
        Some(&t.key),
        // Mixed case: host names are lowercased before anything records
        // them, and the lowercased value is redacted too.
        Some(&json!({"value": "K7f3Q9z2x"})),
    );
    assert_eq!(r.status, 200);
    let code = format!(
        r#"{CLIENT}
import airlock
v, _ = airlock.connect().secrets.get("LABEL")
def once(host):
    s = socket.create_connection(PROXY, timeout=5)
    s.sendall(("CONNECT %s:{p} HTTP/1.1\r\n\r\n" % host).encode())
    head = s.recv(4096).decode("latin-1")
    s.close()
    return head.split(" ")[1]
print(sorted(set(once("allowed.test") for _ in range(80))))
print(sorted(set(once("denied.test") for _ in range(70))))
print(once(v + ".wild.test"))
print(once(v * 25 + ".x.test"))
"#
    );
    let r = t.s.post(
        "/v1/executions",
        &t.key,
        json!({"language": "python", "code": code, "secrets": ["LABEL"],
               "network": {"allow_private": [format!("allowed.test:{p}"), format!("*.wild.test:{p}")]},
               "limits": {"wall_time_ms": 30000}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        lines(&v),
        ["['200']", "['403']", "403", "400"],
        "positive control: every connection was decided: {v}"
    );
    let id = v["id"].as_str().unwrap();
    let audit = t.s.get("/v1/audit?limit=500", &t.key).json();
    let mine: Vec<&Value> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["actor"] == format!("execution:{id}"))
        .collect();
    let count = |k: &str| mine.iter().filter(|e| e["kind"] == k).count();
    assert_eq!(
        count("egress.allowed"),
        64,
        "allowed audited one by one up to the cap"
    );
    assert_eq!(count("egress.denied"), 64, "denied likewise");
    assert_eq!(count("egress.summary"), 1);
    let sum = &mine.iter().find(|e| e["kind"] == "egress.summary").unwrap()["detail"];
    assert_eq!(sum["allowed"]["total"], 80, "{sum}");
    assert_eq!(sum["allowed"]["not_audited"], 16, "{sum}");
    assert_eq!(sum["denied"]["total"], 72, "{sum}");
    assert_eq!(sum["denied"]["not_audited"], 8, "{sum}");
    assert_eq!(
        sum["allowed"]["not_audited_destinations"][format!("allowed.test:{p}")],
        16
    );
    // The value the program put into a host name is redacted everywhere.
    let all = format!("{v}{audit}");
    assert!(
        !all.contains("k7f3q9z2x") && !all.contains("K7f3Q9z2x"),
        "{all}"
    );
    assert!(all.contains("[REDACTED:LABEL].wild.test"), "{all}");
    // A host made of 25 values (232 bytes) would be 400 once redacted: the
    // recorded host keeps the 255-byte bound.
    let long = v["egress"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["host"].as_str())
        .find(|h| h.starts_with("[REDACTED:LABEL][REDACTED:LABEL]"))
        .expect("the long host is recorded, redacted");
    assert_eq!(long.len(), 255, "{long}");
}

#[test]
fn a_client_that_stays_silent_past_the_head_timeout_is_still_checked() {
    let t = setup();
    let p = t.up.port;
    let net = json!({"allow_private": [format!("allowed.test:{p}")]});
    // 11 s of silence (past the 10 s head timeout), then plain HTTP; and
    // the positive control: the same silence, then a non-HTTP protocol.
    let code = format!(
        r#"
import threading, time
def tunnel(first, out, i):
    s = socket.create_connection(PROXY, timeout=20)
    s.sendall(b"CONNECT allowed.test:{p} HTTP/1.1\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    time.sleep(11)
    got = b""
    try:
        s.sendall(first)
        s.settimeout(1.0)
        while True:
            b = s.recv(65536)
            if not b:
                break
            got += b
    except OSError:
        pass
    out[i] = len(got)
out = [None, None]
ts = [threading.Thread(target=tunnel, args=(b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n", out, 0)),
      threading.Thread(target=tunnel, args=(b"SSH-2.0-late\r\n", out, 1))]
for th in ts: th.start()
for th in ts: th.join()
print(out[0], out[1])
"#
    );
    let v = run(&t, &code, net);
    assert_eq!(
        lines(&v),
        [format!("0 {}", "SSH-2.0-late\r\n".len())],
        "{v}"
    );
    assert!(
        !t.up
            .seen()
            .iter()
            .any(|b| String::from_utf8_lossy(b).contains("other.test"))
    );
}

#[test]
fn a_flow_its_upstream_keeps_open_is_recorded_when_the_execution_ends() {
    let t = setup();
    let p = t.up.port;
    // An upstream that accepts and then neither sends nor closes, so the
    // flow outlives the sandbox until the proxy cuts it.
    let l = TcpListener::bind((Ipv4Addr::new(127, 0, 0, 4), p)).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in l.incoming().flatten() {
            held.push(c);
        }
    });
    let code = format!(
        r#"
s = socket.create_connection(PROXY, timeout=5)
s.sendall(b"CONNECT silent.test:{p} HTTP/1.1\r\n\r\n")
print(s.recv(4096).split(b" ")[1].decode())
s.sendall(b"SSH-2.0-left-open\r\n")
"#
    );
    let v = run(
        &t,
        &code,
        json!({"allow_private": [format!("silent.test:{p}")]}),
    );
    assert_eq!(lines(&v), ["200"], "{v}");
    let flows: Vec<&Value> = v["egress"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["host"] == "silent.test")
        .collect();
    assert_eq!(flows.len(), 1, "the flow is in the record: {v}");
    assert_eq!(flows[0]["decision"], "allowed");
    assert_eq!(flows[0]["reason"], "cut off when the execution ended");
    assert_eq!(flows[0]["bytes_up"], "SSH-2.0-left-open\r\n".len());
    let id = v["id"].as_str().unwrap();
    let audit = t.s.get("/v1/audit?limit=500", &t.key).json();
    assert!(
        audit["events"].as_array().unwrap().iter().any(|e| {
            e["kind"] == "egress.allowed"
                && e["actor"] == format!("execution:{id}")
                && e["subject"] == format!("silent.test:{p}")
        }),
        "and audited: {audit}"
    );
}

/// Prints the proxy variable, a blank line, and whether anything listens
/// at the forwarder's address (`connected`, or the errno).
const CHECK_NO_NETWORK: &str = "import os\nprint(os.environ.get('HTTPS_PROXY'))\nprint('')\ntry:\n    socket.create_connection(PROXY, timeout=2)\n    print('connected')\nexcept OSError as e:\n    print(e.errno)\n";

#[test]
fn plain_http_cannot_hide_in_a_tunnel_behind_blanks_or_split_writes() {
    let t = setup();
    let p = t.up.port;
    // A test host on a TLS port (another loopback address: nothing else
    // here listens there).
    let tls_host = Upstream::start(Ipv4Addr::new(127, 0, 0, 3), 443);
    let net = json!({"allow_private": [format!("allowed.test:{p}"), "tls.test:443"]});
    let good = hello("tls.test");
    let code = format!(
        r#"
import time
def tunnel(target, parts, gap=0.3):
    s = socket.create_connection(PROXY, timeout=5)
    s.sendall(b"CONNECT " + target + b" HTTP/1.1\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    for i, part in enumerate(parts):
        if i:
            time.sleep(gap)
        try:
            s.sendall(part)
        except OSError:
            break
    out = b""
    s.settimeout(1.0)
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
    except (socket.timeout, OSError):
        pass
    s.close()
    return head.split(b" ")[1].decode() + " " + str(len(out))
req = b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n"
plain = b"allowed.test:{p}"
print("crlf", tunnel(plain, [b"\r\n" + req]))
print("blanks", tunnel(plain, [b"\r\n\r\n \t" + req]))
print("split", tunnel(plain, [b"\r", b"\n", b"G", b"ET / HTTP/1.1\r\nHost: other.test\r\n\r\n"]))
print("lowercase", tunnel(plain, [b"get / http/1.1\r\nHost: other.test\r\n\r\n"]))
print("vtab", tunnel(plain, [b"\x0bGET / HTTP/1.1\r\nHost: other.test\r\n\r\n"]))
print("formfeed", tunnel(plain, [b"GET\x0c/\x0cHTTP/1.1\r\nHost: other.test\r\n\r\n"]))
print("ssh", tunnel(plain, [b"SSH-2.0-airlock-test\r\n"]))
tls = b"tls.test:443"
print("tls-ok", tunnel(tls, [{good}]))
print("tls-split", tunnel(tls, [{good}[:3], {good}[3:]]))
print("tls-crlf", tunnel(tls, [b"\r\n" + {good}]))
print("tls-space", tunnel(tls, [b" " + {good}]))
print("tls-ssh", tunnel(tls, [b"SSH-2.0-airlock-test\r\n"]))
print("tls-http", tunnel(tls, [req]))
"#
    );
    let v = run(&t, &code, net);
    let out = lines(&v);
    let hello_len = (good.len() - "bytes.fromhex('')".len()) / 2;
    assert_eq!(
        out,
        [
            "crlf 200 0".to_string(),
            "blanks 200 0".into(),
            "split 200 0".into(),
            "lowercase 200 0".into(),
            "vtab 200 0".into(),
            "formfeed 200 0".into(),
            // Positive controls: a non-HTTP protocol on a plain port, and
            // a ClientHello (whole or split) on a TLS port, get through.
            format!("ssh 200 {}", "SSH-2.0-airlock-test\r\n".len()),
            format!("tls-ok 200 {hello_len}"),
            format!("tls-split 200 {hello_len}"),
            "tls-crlf 200 0".into(),
            "tls-space 200 0".into(),
            "tls-ssh 200 0".into(),
            "tls-http 200 0".into(),
        ],
        "{v}"
    );
    // Nothing of the refused tunnels reached either host.
    let seen: Vec<String> =
        t.up.seen()
            .iter()
            .chain(tls_host.seen().iter())
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
    assert!(!seen.iter().any(|s| s.contains("other.test")), "{seen:?}");
    assert!(seen.iter().any(|s| s.starts_with("SSH-2.0-airlock-test")));
    // (A refused tunnel's upstream connection closes without a byte.)
    let tls_seen: Vec<Vec<u8>> = tls_host
        .seen()
        .into_iter()
        .filter(|b| !b.is_empty())
        .collect();
    assert_eq!(tls_seen.len(), 2, "two ClientHellos, nothing else");
    assert!(tls_seen.iter().all(|b| b[0] == 0x16), "{tls_seen:?}");
    let reasons: Vec<&str> = v["egress"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .collect();
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.starts_with("plain HTTP inside a CONNECT tunnel"))
            .count(),
        6,
        "{reasons:?}"
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| **r == "not TLS on a TLS port")
            .count(),
        4,
        "{reasons:?}"
    );
}

#[test]
fn network_is_default_deny_and_requests_stay_within_the_server_grant() {
    let t = setup();
    let p = t.up.port;
    // No network field: no forwarder, no proxy variables, nothing listens.
    let v = run(&t, CHECK_NO_NETWORK, Value::Null);
    assert_eq!(lines(&v), ["None", "", "111"], "{v}");
    assert!(v["egress"].is_null());
    // An empty allowlist is the same: no network at all, no forwarder.
    for empty in [json!({}), json!({"allow": [], "allow_private": []})] {
        let e = run(&t, CHECK_NO_NETWORK, empty.clone());
        assert_eq!(lines(&e), ["None", "", "111"], "{empty} {e}");
        assert!(e["egress"].is_null(), "{e}");
    }
    // Positive control: one rule gives a forwarder that answers.
    let with = run(
        &t,
        CHECK_NO_NETWORK,
        json!({"allow_private": [format!("allowed.test:{p}")]}),
    );
    assert_eq!(lines(&with)[0], "http://127.0.0.1:3128", "{with}");
    assert_eq!(lines(&with)[2], "connected", "{with}");
    // Asking for what the server does not grant is a denial.
    for net in [
        json!({"allow": ["pypi.org:443"]}),
        json!({"allow": [format!("allowed.test:{p}")]}),
        json!({"allow_private": ["*.other.test:1"]}),
        json!({"allow_private": [format!("x.allowed.test:{p}")]}),
    ] {
        let r = t.s.post(
            "/v1/executions",
            &t.key,
            json!({"language": "python", "code": "pass", "network": net}),
        );
        r.problem(422, "policy_denied");
    }
    let r = t.s.post(
        "/v1/executions",
        &t.key,
        json!({"language": "python", "code": "pass", "network": {"allow": ["no-port.test"]}}),
    );
    r.problem(400, "invalid_request");
}

#[test]
fn an_empty_allowlist_means_no_network_even_when_the_base_policy_has_one() {
    // The server's base policy gives every execution a proxy to
    // allowed.test (within its own grant).
    let t = setup_with_port(|p| {
        format!("[policy.network]\nmode = \"proxy\"\nallow_private = [\"allowed.test:{p}\"]\n")
    });
    let p = t.up.port;
    let code = format!(
        r#"
import os
print(sorted(k for k in os.environ if k.lower().endswith("_proxy")))
print(os.environ.get("HTTPS_PROXY"))
try:
    socket.create_connection(PROXY, timeout=2).close()
    print("connected")
except OSError as e:
    print(e.errno)
try:
    print(status(talk(b"CONNECT allowed.test:{p} HTTP/1.1\r\n\r\n")))
except OSError as e:
    print(e.errno)
"#
    );
    let proxied = [
        "['ALL_PROXY', 'HTTPS_PROXY', 'HTTP_PROXY', 'NO_PROXY', 'all_proxy', 'http_proxy', 'https_proxy', 'no_proxy']",
        "http://127.0.0.1:3128",
        "connected",
        "200",
    ];
    // The record has both connections (in either order): the bare one,
    // and the tunnel.
    let tunnelled = |v: &Value| {
        let mut egress: Vec<(String, String, String)> = v["egress"]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"))
            .iter()
            .map(|e| {
                let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
                (s("host"), s("decision"), s("reason"))
            })
            .collect();
        egress.sort();
        assert_eq!(
            egress,
            [
                (
                    "?".into(),
                    "denied".into(),
                    "connection closed before a request".into()
                ),
                ("allowed.test".into(), "allowed".into(), String::new()),
            ],
            "{v}"
        );
    };
    // Positive control: without a `network` field the base policy's
    // network is there.
    let base = run(&t, &code, Value::Null);
    assert_eq!(lines(&base), proxied, "{base}");
    tunnelled(&base);
    // An empty allowlist asks for no network at all, whatever the base
    // policy has: no proxy variables, nothing listens on 3128.
    for empty in [json!({}), json!({"allow": [], "allow_private": []})] {
        let e = run(&t, &code, empty.clone());
        assert_eq!(lines(&e), ["[]", "None", "111", "111"], "{empty} {e}");
        assert!(e["egress"].is_null(), "{empty} {e}");
    }
    // Positive control: a request with one rule connects.
    let one = run(
        &t,
        &code,
        json!({"allow_private": [format!("allowed.test:{p}")]}),
    );
    assert_eq!(lines(&one), proxied, "{one}");
    tunnelled(&one);
}

#[test]
fn airlock_run_accepts_the_allowlist_from_a_policy_file() {
    let up = Upstream::start(Ipv4Addr::LOCALHOST, 0);
    let p = up.port;
    let dns = Dns::start(HashMap::from([("allowed.test", vec![Ipv4Addr::LOCALHOST])]));
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!("[network]\nmode = \"proxy\"\nallow_private = [\"allowed.test:{p}\"]\n"),
    )
    .unwrap();
    let code = format!(
        "{CLIENT}\nimport urllib.request\nprint(urllib.request.urlopen('http://allowed.test:{p}/via-env', timeout=5).read().decode())\nprint(status(talk(b'CONNECT denied.test:{p} HTTP/1.1\\r\\n\\r\\n')))\n"
    );
    let out = std::process::Command::new(crate::BIN)
        .args(["run", "--json", "--lang", "python", "--policy"])
        .arg(&policy)
        .arg("-c")
        .arg(&code)
        .env("AIRLOCK_EGRESS_DNS", dns.addr.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    // urllib found the proxy through HTTP_PROXY, as any client would.
    assert_eq!(v["stdout"], "upstream-ok\n403\n", "{v}");
    let egress = v["egress"].as_array().unwrap();
    assert_eq!(egress.len(), 2, "{egress:?}");
    let mut decisions: Vec<&str> = egress
        .iter()
        .map(|e| e["decision"].as_str().unwrap())
        .collect();
    decisions.sort_unstable();
    assert_eq!(decisions, ["allowed", "denied"], "{egress:?}");
    assert!(!dns.asked().iter().any(|a| a == "denied.test"));
    // Without the policy, the same program has no network at all.
    let out = std::process::Command::new(crate::BIN)
        .args(["run", "--json", "--lang", "python", "-c"])
        .arg(format!(
            "{CLIENT}\ntry:\n    talk(b'x')\nexcept OSError as e:\n    print(e.errno)\n"
        ))
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stdout"], "111\n", "{v}");
}

/// An HTTPS package index on 127.0.0.5:`port` under the test CA (python's
/// http.server behind ssl, a test upstream): `/` answers `tls-ok`,
/// `/simple/demo/` lists one wheel, which it serves.
fn https_index(dir: &std::path::Path, port: u16) -> std::process::Child {
    let script = r#"
import hashlib, http.server, io, ssl, sys, zipfile
d, port = sys.argv[1], int(sys.argv[2])
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w") as z:
    z.writestr("demo/__init__.py", "VALUE = 42\n")
    z.writestr("demo-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n")
    z.writestr("demo-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr("demo-1.0.dist-info/RECORD", "")
wheel = buf.getvalue()
name = "demo-1.0-py3-none-any.whl"
digest = hashlib.sha256(wheel).hexdigest()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/":
            body, ctype = b"tls-ok", "text/plain"
        elif self.path.rstrip("/") == "/simple/demo":
            body = ('<html><body><a href="/files/%s#sha256=%s">%s</a></body></html>' % (name, digest, name)).encode()
            ctype = "text/html"
        elif self.path == "/files/" + name:
            body, ctype = wheel, "application/octet-stream"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(d + "/srv.pem", d + "/srv.key")
srv = http.server.ThreadingHTTPServer(("127.0.0.5", port), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("ready", flush=True)
srv.serve_forever()
"#;
    let mut child = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(dir)
        .arg(port.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready");
    child
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn https_through_egress_works_for_real_clients_under_an_operator_ca() {
    let dir = tempfile::tempdir().unwrap();
    crate::test_ca(dir.path(), "DNS:pkgs.test");
    let ca = dir.path().join("ca.pem");
    let t = setup_with(&format!("ca_bundle = {:?}", ca.display().to_string()));
    let p = t.up.port;
    let _index = KillOnDrop(https_index(dir.path(), p));
    let net = json!({"allow_private": [format!("pkgs.test:{p}")]});
    let post = |s: &Server, lang: &str, code: &str| -> Value {
        let r = s.post(
            "/v1/executions",
            &t.key,
            json!({"language": lang, "code": code, "network": net,
                   "limits": {"wall_time_ms": 60000, "memory_mib": 512}}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    // python urllib (HTTPS_PROXY, the bundle through SSL_CERT_FILE).
    let py = format!(
        "import urllib.request, ssl\nprint(urllib.request.urlopen('https://pkgs.test:{p}/', timeout=20).read().decode())\nprint(ssl.create_default_context().cert_store_stats()['x509_ca'] > 100)\n"
    );
    let v = post(&t.s, "python", &py);
    assert_eq!(v["result"]["stdout"], "tls-ok\nTrue\n", "{v}");
    // pip download from the index (PIP_CERT).
    let pip = format!(
        "import subprocess, sys, os\nr = subprocess.run([sys.executable, '-m', 'pip', 'download', 'demo==1.0', '--no-deps', '--index-url', 'https://pkgs.test:{p}/simple', '-d', '/tmp/dl', '--disable-pip-version-check', '--no-cache-dir', '-q'], capture_output=True, text=True)\nprint(r.returncode, r.stderr[-300:])\nprint(os.listdir('/tmp/dl') if os.path.isdir('/tmp/dl') else [])\n"
    );
    let v = post(&t.s, "shell", &format!("python3 - <<'EOF'\n{pip}\nEOF\n"));
    assert_eq!(
        v["result"]["stdout"], "0 \n['demo-1.0-py3-none-any.whl']\n",
        "{v}"
    );
    // node https over a CONNECT tunnel (node keeps its own store and adds
    // NODE_EXTRA_CA_CERTS).
    let js = format!(
        r#"
const http = require('http'), tls = require('tls');
const req = http.request({{host: '127.0.0.1', port: 3128, method: 'CONNECT', path: 'pkgs.test:{p}'}});
req.on('connect', (res, socket) => {{
  const s = tls.connect({{socket, servername: 'pkgs.test'}}, () => {{
    s.write('GET / HTTP/1.1\r\nHost: pkgs.test\r\nConnection: close\r\n\r\n');
  }});
  let out = '';
  s.on('data', d => out += d);
  s.on('end', () => console.log(out.split('\r\n\r\n')[1]));
  s.on('error', e => console.log('error', e.code));
}});
req.end();
"#
    );
    let v = post(&t.s, "javascript", &js);
    assert_eq!(v["result"]["stdout"], "tls-ok\n", "{v}");
    // curl (HTTPS_PROXY, CURL_CA_BUNDLE), where it is installed.
    if std::path::Path::new("/usr/bin/curl").exists() {
        let v = post(
            &t.s,
            "shell",
            &format!("curl -sS https://pkgs.test:{p}/; echo; echo $?"),
        );
        assert_eq!(v["result"]["stdout"], "tls-ok\n0\n", "{v}");
    }

    // Positive control for the test CA: a server without the operator's
    // bundle refuses the same certificate (python: verify failed; curl 60).
    let plain = setup();
    let _index2 = KillOnDrop(https_index(dir.path(), plain.up.port));
    let q = plain.up.port;
    let r = plain.s.post(
        "/v1/executions",
        &plain.key,
        json!({"language": "python", "network": {"allow_private": [format!("pkgs.test:{q}")]},
               "code": format!("import urllib.request, ssl\ntry:\n    urllib.request.urlopen('https://pkgs.test:{q}/', timeout=20)\n    print('verified')\nexcept Exception as e:\n    print(type(getattr(e, 'reason', e)).__name__, getattr(getattr(e, 'reason', e), 'verify_message', ''))\n")}),
    );
    let v = r.json();
    assert_eq!(
        v["result"]["stdout"], "SSLCertVerificationError unable to get local issuer certificate\n",
        "{v}"
    );
}

#[test]
fn egress_holds_the_same_way_through_oci_and_gvisor() {
    // oci: the forwarder hands each connection over as a descriptor, as in
    // the process sandbox; gvisor: it relays it through a socket the host
    // sends in (no descriptor can leave the sentry).
    let installed = |bins: &[&str]| {
        crate::is_root()
            && bins
                .iter()
                .any(|b| std::path::Path::new("/usr/bin").join(b).is_file())
    };
    let mut backends = vec!["process"];
    if installed(&["crun", "runc"]) {
        backends.push("oci");
    }
    if installed(&["runsc"]) {
        backends.push("gvisor");
    }
    if backends.len() == 1 {
        return;
    }
    let offer: Vec<String> = backends.iter().map(|b| format!("{b:?}")).collect();
    let t = setup_with(&format!(
        "[backends]\noffer = [{}]\n[pool]\npython = 0\njavascript = 0\n",
        offer.join(", ")
    ));
    let p = t.up.port;
    let net = json!({"allow_private": [format!("allowed.test:{p}")]});
    let code = format!(
        r#"
for h in ["allowed.test", "denied.test", "127.0.0.1"]:
    r = talk(("CONNECT %s:{p} HTTP/1.1\r\nHost: x\r\n\r\n" % h).encode(), then=b"ping\r\n")
    print(h, status(r), "ping" in r.split("\r\n\r\n", 1)[-1])
# Several at once, and a bulk transfer both ways through one.
socks = [socket.create_connection(PROXY, timeout=5) for _ in range(5)]
for s in socks:
    s.sendall(("CONNECT allowed.test:{p} HTTP/1.1\r\n\r\n").encode())
ok = 0
for s in socks:
    head = s.recv(4096)
    data = b"bulk\r\n" + b"x" * 300000
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        b = s.recv(65536)
        if not b:
            break
        got += b
    ok += head.startswith(b"HTTP/1.1 200") and got == data
    s.close()
print("parallel", ok)
"#
    );
    for backend in backends {
        let r = t.s.post(
            "/v1/executions",
            &t.key,
            json!({"language": "python", "code": format!("{CLIENT}\n{code}"), "network": net,
                   "backend": backend, "limits": {"wall_time_ms": 30000}}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["result"]["enforced"]["backend"], backend, "{v}");
        assert_eq!(
            lines(&v),
            [
                "allowed.test 200 True",
                "denied.test 403 False",
                "127.0.0.1 403 False",
                "parallel 5"
            ],
            "{backend}: {v}"
        );
        let decisions: Vec<(String, String)> = v["egress"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["host"].as_str().unwrap().to_string(),
                    e["decision"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert!(
            decisions.contains(&("allowed.test".into(), "allowed".into()))
                && decisions.contains(&("denied.test".into(), "denied".into())),
            "{backend}: {decisions:?}"
        );
    }
}

#[test]
fn egress_holds_through_a_microvm_whose_connections_cross_its_channel() {
    // No network device in the guest: each connection its forwarder
    // accepts crosses the VM's channel on an egress stream of its own and
    // reaches the host's proxy as a relayed socket (TCG here).
    if !crate::backends::microvm_here() {
        panic!("the microvm backend needs root, qemu-system-x86 and erofs-utils");
    }
    let t = setup_with(
        "[backends]\noffer = [\"process\", \"microvm\"]\npools = []\n\
         [backends.microvm]\naccel = \"tcg\"\n[pool]\npython = 0\njavascript = 0\n",
    );
    let p = t.up.port;
    let net = json!({"allow_private": [format!("allowed.test:{p}")]});
    let streams = 16;
    let code = format!(
        r#"
for h in ["allowed.test", "denied.test", "127.0.0.1"]:
    r = talk(("CONNECT %s:{p} HTTP/1.1\r\nHost: x\r\n\r\n" % h).encode(), then=b"ping\r\n")
    print(h, status(r), "ping" in r.split("\r\n\r\n", 1)[-1])
# The server ends first: its end of file reaches the program.
s = socket.create_connection(PROXY, timeout=5)
s.sendall(b"GET http://allowed.test:{p}/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
s.settimeout(60)
got = b""
try:
    while True:
        b = s.recv(65536)
        if not b:
            print("server closed", got.endswith(b"upstream-ok"))
            break
        got += b
except socket.timeout:
    print("no end of file", got[:40])
s.close()
# Every egress stream in use at once (the streams of the connections
# above come back as their ends close; a connection that finds none free
# waits for one).
held = [socket.create_connection(PROXY, timeout=5) for _ in range({streams})]
for s in held:
    s.sendall(("CONNECT allowed.test:{p} HTTP/1.1\r\n\r\n").encode())
heads = []
for s in held:
    s.settimeout(30)
    heads.append(s.recv(4096).startswith(b"HTTP/1.1 200"))
# One more waits, neither answered nor closed, until one of them ends.
extra = socket.create_connection(PROXY, timeout=5)
extra.sendall(("CONNECT allowed.test:{p} HTTP/1.1\r\n\r\n").encode())
extra.settimeout(3)
try:
    early = extra.recv(4096)
    early = "closed" if not early else early.split(b" ")[1].decode()
except socket.timeout:
    early = "waits"
held.pop(0).close()
extra.settimeout(30)
late = extra.recv(4096).startswith(b"HTTP/1.1 200")
extra.close()
for s in held:
    s.close()
print("at once", heads.count(True), early, late)
# The streams come back: more connections than streams, one after the
# other, each a bulk transfer both ways.
ok = 0
for i in range({streams} + 4):
    s = socket.create_connection(PROXY, timeout=5)
    s.sendall(("CONNECT allowed.test:{p} HTTP/1.1\r\n\r\n").encode())
    s.settimeout(30)
    head = s.recv(4096)
    data = b"bulk\r\n" + bytes([i]) * 100000
    s.sendall(data)
    back = b""
    while len(back) < len(data):
        b = s.recv(65536)
        if not b:
            break
        back += b
    ok += head.startswith(b"HTTP/1.1 200") and back == data
    s.close()
print("after", ok)
"#
    );
    let r = t.s.post(
        "/v1/executions",
        &t.key,
        json!({"language": "python", "code": format!("{CLIENT}\n{code}"), "network": net,
               "backend": "microvm", "limits": {"wall_time_ms": 60000}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["result"]["enforced"]["backend"], "microvm", "{v}");
    assert_eq!(
        lines(&v),
        [
            "allowed.test 200 True".to_string(),
            "denied.test 403 False".into(),
            "127.0.0.1 403 False".into(),
            "server closed True".into(),
            format!("at once {streams} waits True"),
            format!("after {}", streams + 4),
        ],
        "{v}"
    );
    let decisions: Vec<(String, String)> = v["egress"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["host"].as_str().unwrap().to_string(),
                e["decision"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        decisions.contains(&("allowed.test".into(), "allowed".into()))
            && decisions.contains(&("denied.test".into(), "denied".into())),
        "{decisions:?}"
    );
    let limits = v["result"]["enforced"]["unavailable_limits"].to_string();
    assert!(
        limits.contains(&format!("at most {streams} at once")),
        "{v}"
    );
}
