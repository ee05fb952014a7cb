//! The files in deploy/: the systemd unit passes `systemd-analyze verify`
//! and its command line, run as systemd runs it, serves and speaks
//! sd_notify; the probes the container image and the Kubernetes manifests
//! use answer on that server; every manifest is the Kubernetes API type it
//! claims with no field that type lacks; every `AIRLOCK_*` variable these
//! files set is one airlock reads; ports, paths and grace periods agree.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_airlock");

/// The server's drain on SIGTERM (its `shutdown_grace_ms` default): every
/// file's stop timeout must leave it whole, with room for the teardown.
const SHUTDOWN_GRACE_MS: u64 = 10_000;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(deploy().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The environment variables airlock reads: those `airlock serve` takes
/// (`--help` names them), and the few read by name (docs/server.md).
fn known_env() -> BTreeSet<String> {
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let mut known: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|s| s.split(['=', ']']).next())
        .map(str::to_string)
        .collect();
    assert!(known.contains("AIRLOCK_LISTEN"), "{help}");
    for v in [
        "AIRLOCK_MASTER_KEY",
        "AIRLOCK_MASTER_KEY_FILE",
        "AIRLOCK_LOG",
    ] {
        known.insert(v.to_string());
    }
    known
}

fn assert_known(file: &str, names: impl IntoIterator<Item = String>) {
    let known = known_env();
    for n in names {
        if n.starts_with("AIRLOCK_") {
            assert!(
                known.contains(&n),
                "{file} sets {n}, which airlock never reads"
            );
        }
    }
}

// ------------------------------------------------------------ systemd

/// A unit file's `[Service]` keys, each with its values in order.
fn unit_service(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut section = String::new();
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_string();
            continue;
        }
        if section == "[Service]" {
            let (k, v) = line.split_once('=').expect("key=value");
            keys.entry(k.to_string()).or_default().push(v.to_string());
        }
    }
    keys
}

/// `systemd-analyze verify` on the unit as installed, with ExecStart's
/// binary at `bin`: its complaints, empty when it has none.
fn verify_unit(text: &str, bin: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("airlock.service");
    std::fs::write(&unit, text.replace("/usr/local/bin/airlock", bin)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze (the systemd package) is installed");
    let mut said = String::from_utf8_lossy(&out.stderr).into_owned();
    said.push_str(&String::from_utf8_lossy(&out.stdout));
    if !out.status.success() && said.is_empty() {
        said = format!("{:?}", out.status);
    }
    said
}

#[test]
fn the_systemd_unit_verifies_and_says_what_the_issue_asks() {
    let text = read("systemd/airlock.service");
    let said = verify_unit(&text, BIN);
    assert_eq!(said, "", "systemd-analyze verify");
    // The check can fail: a misspelt key and a missing binary are caught.
    let said = verify_unit(&text.replace("Delegate=yes", "Delegat=yes"), BIN);
    assert!(said.contains("Unknown key"), "{said}");
    let said = verify_unit(&text, "/nonexistent/airlock");
    assert!(said.contains("not executable"), "{said}");

    let s = unit_service(&text);
    let one = |k: &str| {
        let v = s.get(k).unwrap_or_else(|| panic!("no {k}"));
        assert_eq!(v.len(), 1, "{k}");
        v[0].as_str()
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("NotifyAccess"), "main");
    assert_eq!(one("Delegate"), "yes");
    assert_eq!(one("KillMode"), "mixed");
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert_eq!(one("StateDirectory"), "airlock");
    assert_eq!(one("StateDirectoryMode"), "0700");
    assert_eq!(one("RuntimeDirectory"), "airlock");
    assert_eq!(one("ExecStart"), "/usr/local/bin/airlock serve");
    let stop: u64 = one("TimeoutStopSec").parse().unwrap();
    assert!(
        stop * 1000 >= SHUTDOWN_GRACE_MS * 3,
        "TimeoutStopSec {stop}"
    );
    assert_known(
        "airlock.service",
        s["Environment"]
            .iter()
            .map(|e| e.split('=').next().unwrap().to_string()),
    );
}

/// Runs the unit's ExecStart with the unit's environment as systemd would
/// (its `%S` state directory created 0700, `$NOTIFY_SOCKET` bound here,
/// and the listen address from the environment file); returns it, its
/// URL, and the notification socket.
struct Served {
    child: std::process::Child,
    url: String,
    notify: UnixDatagram,
    data: PathBuf,
    _dirs: tempfile::TempDir,
}

fn serve_as_the_unit() -> Served {
    let text = read("systemd/airlock.service");
    let s = unit_service(&text);
    let dirs = tempfile::tempdir().unwrap();
    let state = dirs.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let data = state.join("airlock");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let sock = dirs.path().join("notify");
    let notify = UnixDatagram::bind(&sock).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let exec = s["ExecStart"][0].replace("/usr/local/bin/airlock", BIN);
    let argv: Vec<&str> = exec.split_whitespace().collect();
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("STATE_DIRECTORY", &data)
        .env("NOTIFY_SOCKET", &sock)
        // From /etc/airlock/airlock.env: a port of its own here.
        .env("AIRLOCK_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for e in &s["Environment"] {
        let (k, v) = e.split_once('=').unwrap();
        cmd.env(k, v.replace("%S", state.to_str().unwrap()));
    }
    let mut child = cmd.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let url = loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "exited before listening"
        );
        if let Some(u) = line.trim().strip_prefix("airlock: listening on ") {
            break u.to_string();
        }
    };
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    Served {
        child,
        url,
        notify,
        data,
        _dirs: dirs,
    }
}

fn notification(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification within 30 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn http_status(url: &str, path: &str) -> u16 {
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// The container image's HEALTHCHECK command, aimed at `url`.
fn healthcheck(url: &str) -> std::process::ExitStatus {
    let d = dockerfile();
    let hc = d.iter().find(|(i, _)| i == "HEALTHCHECK").unwrap();
    let cmd = hc.1.split_once("CMD ").unwrap().1;
    let argv: Vec<String> = serde_json::from_str(cmd).unwrap();
    let port = url.rsplit(':').next().unwrap();
    let argv: Vec<String> = argv
        .into_iter()
        .map(|a| a.replace("127.0.0.1:7070", &format!("127.0.0.1:{port}")))
        .collect();
    Command::new(&argv[0]).args(&argv[1..]).status().unwrap()
}

#[test]
fn the_units_command_line_serves_notifies_and_answers_the_probes_the_other_files_use() {
    let mut s = serve_as_the_unit();
    let ready = notification(&s.notify);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    // The probes of the manifests and the image's health check.
    for p in k8s_probe_paths() {
        assert_eq!(http_status(&s.url, &p), 200, "{p}");
    }
    assert!(healthcheck(&s.url).success());
    // Its data is in the unit's state directory (%S/airlock).
    for f in ["airlock.db", "master.key", "node_id"] {
        assert!(s.data.join(f).is_file(), "{f} not in the state directory");
    }
    // SIGTERM (KillMode=mixed sends it to the server alone): it drains,
    // says so, and exits 0 well within TimeoutStopSec.
    // SAFETY: kill(2) on the pid of a child this test spawned and has not
    // reaped (so the pid is still its); no memory is involved.
    let r = unsafe { libc::kill(s.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(r, 0);
    let stopping = notification(&s.notify);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    let t = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "not stopped");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    // Negative control: with the server gone, the health check fails.
    assert!(!healthcheck(&s.url).success());
}

// ------------------------------------------------------------ Dockerfile

/// The Dockerfile's instructions (continuations joined, comments dropped):
/// (INSTRUCTION, arguments).
fn dockerfile() -> Vec<(String, String)> {
    let text = read("docker/Dockerfile");
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if t.starts_with('#') {
            continue;
        }
        if let Some(part) = t.strip_suffix('\\') {
            cur.push_str(part);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (i, a) = cur.split_once(' ').unwrap_or((cur.as_str(), ""));
        out.push((i.to_ascii_uppercase(), a.trim().to_string()));
        cur.clear();
    }
    assert!(cur.is_empty(), "a continuation at the end");
    out
}

#[test]
fn the_dockerfile_builds_the_binary_and_runs_it_as_the_other_files_expect() {
    let d = dockerfile();
    let all = |i: &str| -> Vec<&str> {
        d.iter()
            .filter(|(x, _)| x == i)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    let from = all("FROM");
    assert_eq!(from.len(), 2, "{from:?}");
    // The toolchain the workspace asks for, and the Debian release CI tests.
    let rust = from[0]
        .split("rust:")
        .nth(1)
        .and_then(|v| v.split('-').next())
        .unwrap();
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml"))
            .unwrap();
    let wanted = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    let v = |s: &str| -> Vec<u32> { s.split('.').map(|p| p.parse().unwrap()).collect() };
    assert!(
        v(rust) >= v(wanted),
        "image rust {rust} < rust-version {wanted}"
    );
    assert!(from[0].ends_with("AS build"), "{}", from[0]);
    assert!(from[1].contains("debian:bookworm"), "{}", from[1]);
    let run = all("RUN").join(" ");
    assert!(run.contains("cargo build --release --locked -p airlock-cli"));
    // What a sandbox runs, and python's shared library for the zygote
    // (bookworm's python is 3.11).
    for pkg in [
        "python3",
        "libpython3.11",
        "nodejs",
        "dash",
        "ca-certificates",
        "crun",
        "runc",
    ] {
        assert!(
            run.split_whitespace().any(|w| w == pkg),
            "{pkg} not installed"
        );
    }
    assert!(all("COPY").contains(&"--from=build /out/airlock /usr/local/bin/airlock"));
    assert_eq!(all("ENTRYPOINT"), [r#"["/usr/local/bin/airlock"]"#]);
    assert_eq!(all("CMD"), [r#"["serve"]"#]);
    assert_eq!(all("STOPSIGNAL"), ["SIGTERM"]);
    // ENV, EXPOSE, VOLUME and the health check agree.
    let env: BTreeMap<String, String> = all("ENV")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_known("Dockerfile", env.keys().cloned());
    let port = env["AIRLOCK_LISTEN"]
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(env["AIRLOCK_LISTEN"], format!("0.0.0.0:{port}"));
    assert_eq!(all("EXPOSE"), [port.as_str()]);
    assert_eq!(
        all("VOLUME"),
        [format!(r#"["{}"]"#, env["AIRLOCK_DATA_DIR"]).as_str()]
    );
    let hc = all("HEALTHCHECK");
    assert_eq!(hc.len(), 1);
    assert!(
        hc[0].contains(&format!("http://127.0.0.1:{port}/readyz")),
        "{}",
        hc[0]
    );
    // The build context leaves the build tree and git out.
    let ignore = read("docker/Dockerfile.dockerignore");
    for p in ["target", ".git"] {
        assert!(ignore.lines().any(|l| l.trim() == p), "{p}");
    }
}

// ------------------------------------------------------------ Kubernetes

/// Deserialises one manifest into the API type its kind names and back:
/// a field the type does not have (a typo, a wrong level) or a value of the
/// wrong shape is an error naming the kind.
fn check_manifest(doc: &Value) -> Result<(), String> {
    use k8s_openapi::api::{apps::v1 as apps, core::v1 as core, policy::v1 as policy};
    fn round<T: serde::de::DeserializeOwned + serde::Serialize>(
        doc: &Value,
    ) -> Result<Value, String> {
        let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
        serde_json::to_value(typed).map_err(|e| e.to_string())
    }
    let kind = doc["kind"].as_str().ok_or("no kind")?;
    let back = match kind {
        "StatefulSet" => round::<apps::StatefulSet>(doc),
        "Deployment" => round::<apps::Deployment>(doc),
        "Service" => round::<core::Service>(doc),
        "PodDisruptionBudget" => round::<policy::PodDisruptionBudget>(doc),
        other => Err(format!("no check for kind {other}")),
    }
    .map_err(|e| format!("{kind}: {e}"))?;
    if let Some(at) = difference(doc, &back, String::new()) {
        return Err(format!(
            "{kind}: {at}: a field its type does not have or a value of another shape"
        ));
    }
    Ok(())
}

/// Where `read` (the manifest) and `back` (it read as its type and written
/// again) first differ, as a path like `.spec.replica`.
fn difference(read: &Value, back: &Value, at: String) -> Option<String> {
    match (read, back) {
        (Value::Object(a), Value::Object(b)) => a
            .iter()
            .find_map(|(k, v)| match b.get(k) {
                None => Some(format!("{at}.{k}")),
                Some(w) => difference(v, w, format!("{at}.{k}")),
            })
            .or_else(|| {
                b.keys()
                    .find(|k| !a.contains_key(*k))
                    .map(|k| format!("{at}.{k}"))
            }),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (v, w))| difference(v, w, format!("{at}[{i}]"))),
        (a, b) if a == b => None,
        _ => Some(if at.is_empty() { ".".into() } else { at }),
    }
}

fn yaml_docs(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect()
}

/// The manifests of one set, checked against its kustomization: every
/// file listed exists, and every manifest in the directory is listed.
fn manifest_set(set: &str) -> Vec<Value> {
    let dir = deploy().join("kubernetes").join(set);
    let k = yaml_docs(&read(&format!("kubernetes/{set}/kustomization.yaml")));
    assert_eq!(k.len(), 1);
    let k = &k[0];
    assert_eq!(k["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    assert_eq!(k["kind"], "Kustomization");
    let keys: BTreeSet<&str> = k.as_object().unwrap().keys().map(String::as_str).collect();
    assert!(
        keys.is_subset(&BTreeSet::from([
            "apiVersion",
            "kind",
            "namespace",
            "resources"
        ])),
        "{keys:?}"
    );
    let listed: BTreeSet<String> = k["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "{set}: kustomization resources");
    let mut docs = Vec::new();
    for f in &listed {
        for d in yaml_docs(&read(&format!("kubernetes/{set}/{f}"))) {
            check_manifest(&d).unwrap_or_else(|e| panic!("{set}/{f}: {e}"));
            docs.push(d);
        }
    }
    docs
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The one container of a workload, and its env as name → entry.
fn container(w: &Value) -> (&Value, BTreeMap<String, Value>) {
    let cs = w["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(cs.len(), 1);
    let env = cs[0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect();
    (&cs[0], env)
}

fn k8s_probe_paths() -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    for set in ["single", "cluster"] {
        for d in manifest_set(set) {
            if d["kind"] == "StatefulSet" || d["kind"] == "Deployment" {
                let (c, _) = container(&d);
                for p in ["readinessProbe", "livenessProbe"] {
                    paths.insert(c[p]["httpGet"]["path"].as_str().unwrap().to_string());
                }
            }
        }
    }
    paths
}

/// What both sets share: one privileged container running `serve` on the
/// port its env names, probes on that port, a Service in front, a grace
/// period longer than the drain, the data directory mounted where the env
/// says; every AIRLOCK_* variable one airlock reads.
fn common_checks(set: &str, docs: &[Value], w: &Value) {
    let (c, env) = container(w);
    assert_known(set, env.keys().cloned());
    assert_eq!(c["args"], serde_json::json!(["serve"]));
    assert_eq!(c["securityContext"]["privileged"], true);
    let listen = env["AIRLOCK_LISTEN"]["value"].as_str().unwrap();
    let port: i64 = listen.strip_prefix("0.0.0.0:").unwrap().parse().unwrap();
    let ports = c["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["containerPort"], port);
    let pname = ports[0]["name"].as_str().unwrap();
    for p in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[p]["httpGet"]["port"], pname, "{set} {p}");
    }
    let grace = w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        grace * 1000 >= 2 * SHUTDOWN_GRACE_MS,
        "{set}: grace {grace}"
    );
    let labels = &w["spec"]["template"]["metadata"]["labels"];
    assert_eq!(w["spec"]["selector"]["matchLabels"], *labels);
    let svc = of_kind(docs, "Service");
    assert_eq!(svc.len(), 1, "{set}");
    assert_eq!(svc[0]["spec"]["selector"], *labels);
    assert_eq!(svc[0]["spec"]["ports"][0]["targetPort"], pname);
    let data = env["AIRLOCK_DATA_DIR"]["value"].as_str().unwrap();
    let mounts = c["volumeMounts"].as_array().unwrap();
    assert!(
        mounts.iter().any(|m| m["mountPath"] == data),
        "{set}: nothing mounted at the data directory {data}"
    );
    let key = &env["AIRLOCK_MASTER_KEY"]["valueFrom"]["secretKeyRef"];
    assert_eq!(
        key["name"], "airlock",
        "{set}: the master key from the secret"
    );
}

#[test]
fn the_kubernetes_manifests_are_the_types_they_claim_and_agree_with_airlock() {
    // The check can fail: a field at the wrong level, and a value of the
    // wrong shape.
    let d = &yaml_docs(&read("kubernetes/single/statefulset.yaml"))[0];
    let mut typo = d.clone();
    typo["spec"]["replica"] = 1.into();
    let e = check_manifest(&typo).unwrap_err();
    assert!(e.contains("replica"), "{e}");
    let mut shape = d.clone();
    shape["spec"]["replicas"] = "one".into();
    let e = check_manifest(&shape).unwrap_err();
    assert!(e.starts_with("StatefulSet: invalid type"), "{e}");

    // One replica on SQLite, on a persistent volume.
    let single = manifest_set("single");
    let sts = of_kind(&single, "StatefulSet");
    assert_eq!(sts.len(), 1);
    assert_eq!(sts[0]["spec"]["replicas"], 1);
    common_checks("single", &single, sts[0]);
    let (c, env) = container(sts[0]);
    assert!(!env.contains_key("AIRLOCK_DATABASE_URL"));
    let claim = sts[0]["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
        .as_str()
        .unwrap();
    let data = env["AIRLOCK_DATA_DIR"]["value"].as_str().unwrap();
    assert!(
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == claim && m["mountPath"] == data),
        "the data directory is not on the claim"
    );

    // Several replicas on PostgreSQL, each reachable by the others.
    let cluster = manifest_set("cluster");
    let dep = of_kind(&cluster, "Deployment");
    assert_eq!(dep.len(), 1);
    assert!(dep[0]["spec"]["replicas"].as_u64().unwrap() >= 2);
    common_checks("cluster", &cluster, dep[0]);
    let (c, env) = container(dep[0]);
    assert_eq!(
        env["AIRLOCK_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"],
        "airlock"
    );
    // Kubernetes expands $(VAR) only from variables defined before it.
    let order: Vec<&str> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    let at = |n: &str| order.iter().position(|x| *x == n).unwrap();
    let url = env["AIRLOCK_NODE_URL"]["value"].as_str().unwrap();
    let port = env["AIRLOCK_LISTEN"]["value"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap();
    assert_eq!(url, format!("http://$(POD_IP):{port}"));
    assert!(at("POD_IP") < at("AIRLOCK_NODE_URL"));
    assert_eq!(
        env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );
    assert!(at("POD_NAME") < at("AIRLOCK_NODE_NAME"));
    let pdb = of_kind(&cluster, "PodDisruptionBudget");
    assert_eq!(pdb.len(), 1);
    assert_eq!(
        pdb[0]["spec"]["selector"]["matchLabels"],
        dep[0]["spec"]["template"]["metadata"]["labels"]
    );
}
