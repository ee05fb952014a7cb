//! HTTPS: the server terminates TLS with the operator's certificate, the
//! CLI verifies it (the system's roots or `--ca`), SIGHUP swaps the
//! certificate without a restart, and a bad pair is refused at start.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::{BIN, Server, test_ca};

/// A server (not started) that will serve HTTPS with `tls/srv.pem`, a
/// certificate for 127.0.0.1 only signed by `tls/ca.pem`.
fn https_server() -> (Server, PathBuf) {
    let mut s = Server::new(&[]);
    let tls = s.dir.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    test_ca(&tls, "IP:127.0.0.1");
    s.extra_args = vec![
        "--tls-cert".into(),
        tls.join("srv.pem").display().to_string(),
        "--tls-key".into(),
        tls.join("srv.key").display().to_string(),
    ];
    (s, tls)
}

/// `airlock run --server URL [--ca CA] -- python` of `print(6*7)`.
fn cli_run(url: &str, ca: Option<&Path>, key: &str) -> Output {
    let mut c = Command::new(BIN);
    c.args(["run", "--server", url]);
    if let Some(ca) = ca {
        c.arg("--ca").arg(ca);
    }
    c.args(["--lang", "python", "-c", "print(6*7)"])
        .env("AIRLOCK_API_KEY", key)
        .env_remove("AIRLOCK_CA")
        .env_remove("AIRLOCK_SERVER")
        .output()
        .unwrap()
}

/// Exit 2 with one line on stderr that contains `want`.
fn refused(out: &Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(want), "{want:?} not in {err}");
}

fn hup(s: &Server) {
    let pid = libc::pid_t::try_from(s.pid()).unwrap();
    // SAFETY: `pid` is our own running child (not yet waited for), so it
    // cannot name another process; kill has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
}

/// Replaces `to` with `from` by a rename, as a renewal tool would.
fn install(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

#[test]
fn the_cli_runs_over_https_verifies_the_certificate_and_sighup_swaps_it() {
    let (mut s, tls) = https_server();
    s.start();
    let key = s.tenant("acme");
    let url = format!("https://{}", s.addr);
    let ca1 = tls.join("ca.pem");

    let out = cli_run(&url, Some(&ca1), &key);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n");

    // Not trusted: the test CA is in no system store.
    refused(&cli_run(&url, None, &key), "invalid peer certificate");
    // Trusted CA, wrong name: the certificate names 127.0.0.1 only.
    let by_name = format!("https://localhost:{}", s.addr.port());
    refused(&cli_run(&by_name, Some(&ca1), &key), "not valid for name");
    // Plain HTTP to the TLS port gets no HTTP answer (and no data).
    let mut c = std::net::TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    // A TLS alert record (content type 21, version 3.x), nothing else.
    assert_eq!(got.get(..2), Some(&[21u8, 3][..]), "{got:?}");
    assert!(got.len() <= 7, "{got:?}");
    refused(
        &cli_run(&format!("http://{}", s.addr), None, &key),
        "not an HTTP response",
    );

    // doctor reads the pools over HTTPS too.
    let line = crate::doctor_pools_line(&url, &["--ca", &ca1.display().to_string()]);
    assert!(line.starts_with("ok"), "{line}");

    // A renewed certificate under another CA, swapped in by SIGHUP.
    let tls2 = s.dir.path().join("tls2");
    std::fs::create_dir(&tls2).unwrap();
    test_ca(&tls2, "IP:127.0.0.1");
    let ca2 = tls2.join("ca.pem");
    install(&tls2.join("srv.key"), &tls.join("srv.key"));
    install(&tls2.join("srv.pem"), &tls.join("srv.pem"));
    hup(&s);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = cli_run(&url, Some(&ca2), &key);
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n");
            break;
        }
        assert!(Instant::now() < deadline, "never reloaded: {}", s.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    refused(&cli_run(&url, Some(&ca1), &key), "invalid peer certificate");

    // A half-written renewal: the reload fails, the server keeps serving
    // the last good pair.
    std::fs::write(tls.join("srv.pem"), "-----BEGIN CERTIFICATE-----\ngarbage").unwrap();
    hup(&s);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.log().contains("TLS reload failed") {
        assert!(Instant::now() < deadline, "{}", s.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = cli_run(&url, Some(&ca2), &key);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (st, _) = s.terminate();
    assert!(st.success(), "SIGHUP did not stop the server: {st:?}");
    let reloads: Vec<_> = crate::abuse::audit_rows(&s.data().join("airlock.db"))
        .into_iter()
        .filter(|(k, _)| k == "server.tls_reload")
        .map(|(_, d)| d["ok"].clone())
        .collect();
    assert_eq!(reloads, [true, false]);
}

#[test]
fn a_bad_certificate_or_key_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    test_ca(dir.path(), "IP:127.0.0.1");
    let data = dir.path().join("data");
    let p = |n: &str| dir.path().join(n).display().to_string();
    let serve = |args: &[String]| {
        Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .args(args)
            .env_remove("AIRLOCK_CONFIG")
            .env_remove("AIRLOCK_TLS_CERT")
            .env_remove("AIRLOCK_TLS_KEY")
            .output()
            .unwrap()
    };
    let pair = |cert: &str, key: &str| {
        vec![
            "--tls-cert".into(),
            cert.into(),
            "--tls-key".into(),
            key.into(),
        ]
    };

    refused(
        &serve(&pair(&p("none.pem"), &p("srv.key"))),
        "TLS certificate",
    );
    // A key where the certificate belongs: no certificate in it.
    refused(
        &serve(&pair(&p("srv.key"), &p("srv.key"))),
        "no certificate",
    );
    refused(&serve(&pair(&p("srv.pem"), &p("srv.pem"))), "TLS key");
    // The CA's key does not belong to the server's certificate.
    refused(&serve(&pair(&p("srv.pem"), &p("ca.key"))), "with key");
    // Half a pair.
    let out = serve(&["--tls-cert".into(), p("srv.pem")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key"));
    let cfg = dir.path().join("airlock.toml");
    std::fs::write(&cfg, format!("[tls]\ncert = {:?}\n", p("srv.pem"))).unwrap();
    let mut args = vec!["--config".to_string(), cfg.display().to_string()];
    refused(&serve(&args), "key");
    assert!(!data.exists(), "nothing was created for a refused start");

    // Positive control: the same pair from the config file serves HTTPS.
    std::fs::write(
        &cfg,
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n",
            p("srv.pem"),
            p("srv.key")
        ),
    )
    .unwrap();
    let mut s = Server::new(&[]);
    args.clear();
    s.extra_args = vec!["--config".into(), cfg.display().to_string()];
    s.start();
    let key = s.tenant("acme");
    let out = cli_run(
        &format!("https://{}", s.addr),
        Some(&dir.path().join("ca.pem")),
        &key,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn plain_http_beyond_loopback_is_warned_about() {
    const WARNING: &str = "plain HTTP beyond loopback";
    let mut s = Server::new(&[]);
    s.listen = "0.0.0.0:0".into();
    s.start();
    let mut deadline = Instant::now() + Duration::from_secs(10);
    while !s.log().contains(WARNING) {
        assert!(Instant::now() < deadline, "{}", s.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    s.terminate();
    // Controls: loopback, and HTTPS on every address, warn of nothing.
    let (mut t, _) = https_server();
    t.listen = "0.0.0.0:0".into();
    t.start();
    let mut l = Server::start_with(&[]);
    deadline = Instant::now() + Duration::from_secs(10);
    for srv in [&mut t, &mut l] {
        while !srv.log().contains("airlock serving") {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(20));
        }
        srv.terminate();
        assert!(!srv.log().contains(WARNING), "{}", srv.log());
    }
}

/// A TLS client that never sends its ClientHello holds its slot for the
/// handshake bound at most, and over the per-client limit a connection is
/// closed at once, unanswered.
#[test]
fn silent_tls_clients_are_bounded_and_counted() {
    let (mut s, tls) = https_server();
    let cfg = s.dir.path().join("airlock.toml");
    std::fs::write(&cfg, "max_connections_per_client = 2\n").unwrap();
    s.extra_args
        .extend(["--config".into(), cfg.display().to_string()]);
    s.start();
    let key = s.tenant("acme");
    let url = format!("https://{}", s.addr);
    let ca = tls.join("ca.pem");
    let silent = || {
        let c = std::net::TcpStream::connect(s.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        c
    };
    let t0 = Instant::now();
    let mut first = silent();
    let second = silent();
    // Over the limit: closed without a byte (no handshake is spent on it).
    let mut third = silent();
    let mut buf = [0u8; 64];
    let t = Instant::now();
    let n = third.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let out = cli_run(&url, Some(&ca), &key);
    assert_eq!(out.status.code(), Some(2), "the CLI is over the limit too");
    // Positive control: one silent client leaves, the CLI gets its slot.
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = cli_run(&url, Some(&ca), &key);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The other is closed by the server when the handshake bound (10 s)
    // ends, unanswered.
    let n = first.read(&mut buf).unwrap_or(0);
    let held = t0.elapsed();
    assert_eq!(n, 0);
    assert!(
        held >= Duration::from_secs(9) && held < Duration::from_secs(20),
        "held {held:?}"
    );
}
