//! OCI images as roots (`airlock image import`, `airlock run --image`):
//! images built here by `mkimage.py` from the host's own static busybox and
//! python, imported through the CLI, run on every backend that takes an
//! image; and the hostile ones (a tampered layer, no layers, the runc
//! CVE-2025-31133 `/dev/null` symlink, a symlinked `/proc` or
//! `/dev/console`, entries and links that leave the root), each refused
//! with exit 2 and its reason, nothing left in the store, the host
//! unchanged.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::*;

const MKIMAGE: &str = include_str!("mkimage.py");
const CORE_PATTERN: &str = "/proc/sys/kernel/core_pattern";

/// The backends here that take an image.
fn image_backends() -> Vec<&'static str> {
    backends::backends()
        .into_iter()
        .filter(|b| *b != "process")
        .collect()
}

/// A directory the sandboxes' mapped users can traverse (tempdirs are
/// 0700).
fn open_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("airlock-images")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// Builds an image from `spec` (see mkimage.py) at `out`; returns its id.
fn build(spec: &Value, out: &Path) -> String {
    let mut cmd = Command::new(PYTHON);
    cmd.args(["-c", MKIMAGE]).arg(out);
    let o = output_with_stdin(cmd, spec.to_string().as_bytes());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn image_cmd(store: &Path, args: &[&str]) -> Output {
    airlock()
        .arg("image")
        .args(args)
        .env("AIRLOCK_IMAGE_STORE", store)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `airlock image import`, which must refuse with exit 2 and one line
/// holding `reason`, leaving nothing in the store.
fn refused(store: &Path, image: &Path, reason: &str) {
    let out = image_cmd(store, &["import", image.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(reason), "expected {reason:?}: {err}");
    assert!(
        !err.contains(store.to_str().unwrap()),
        "the store's path: {err}"
    );
    for sub in ["sha256", "tmp"] {
        let left: Vec<_> = std::fs::read_dir(store.join(sub))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left in the store: {left:?}");
    }
}

fn imported(store: &Path, image: &Path, name: &str) -> Value {
    let out = image_cmd(
        store,
        &["import", image.to_str().unwrap(), "--name", name, "--json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn busybox_base() -> Vec<Value> {
    vec![
        json!({"path": "bin", "type": "dir"}),
        json!({"path": "bin/busybox", "type": "host", "host": "/bin/busybox"}),
        json!({"path": "bin/sh", "type": "symlink", "target": "busybox"}),
        json!({"path": "etc", "type": "dir"}),
        json!({"path": "etc/os-release", "data": "NAME=airlock-test-image\n"}),
        json!({"path": "dev", "type": "dir"}),
        json!({"path": "proc", "type": "dir"}),
    ]
}

/// A python image from the host's python (mkimage.py's `host-python`),
/// imported into a store of its own.
fn python_image() -> (tempfile::TempDir, String) {
    {
        let dir = open_dir();
        let store = dir.path().join("store");
        let layer = vec![json!({"type": "preset", "name": "host-python"})];
        let file = dir.path().join("python.tar");
        build(
            &json!({"format": "oci", "gzip": true, "layers": [layer]}),
            &file,
        );
        let v = imported(&store, &file, "python:test");
        assert_eq!(v["interpreters"]["python"], "/usr/bin/python3", "{v}");
        (dir, v["id"].as_str().unwrap().to_string())
    }
}

/// A fingerprint of a tree: every path with its type, mode and size.
fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.path().symlink_metadata().unwrap();
            out.push(format!(
                "{} {:o} {}",
                e.path().strip_prefix(root).unwrap().display(),
                m.permissions().mode(),
                m.len()
            ));
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

fn rootfs_of(store: &Path, id: &str) -> PathBuf {
    store
        .join("sha256")
        .join(id.trim_start_matches("sha256:"))
        .join("rootfs")
}

/// `airlock run --json` of `code` in `image` on `backend`, with `stdin`.
fn run_in(store: &Path, image: &str, backend: &str, lang: &str, code: &str, stdin: &[u8]) -> Value {
    let out = output_with_stdin(
        {
            let mut c = airlock();
            c.args([
                "run",
                "--json",
                "--lang",
                lang,
                "--backend",
                backend,
                "--image",
                image,
                "-c",
                code,
            ])
            .env("AIRLOCK_IMAGE_STORE", store);
            c
        },
        stdin,
    );
    assert!(
        out.status.success(),
        "{backend}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn images_from_a_docker_tarball_and_an_oci_layout_run_in_their_own_read_only_root() {
    if image_backends().is_empty() {
        eprintln!("skipped: no OCI runtime or runsc here (as root)");
        return;
    }
    let dir = open_dir();
    let store = dir.path().join("store");
    // docker save: one plain layer. OCI layout directory: gzip layers,
    // the second deleting a file (whiteout) and emptying a directory of
    // the first (opaque), adding one file back into it.
    let docker = dir.path().join("docker.tar");
    let docker_id = build(
        &json!({"format": "docker", "layers": [busybox_base()]}),
        &docker,
    );
    let mut base = busybox_base();
    base.extend([
        json!({"path": "etc/gone", "data": "lower"}),
        json!({"path": "data", "type": "dir"}),
        json!({"path": "data/old", "data": "lower"}),
        json!({"path": "bin/suid", "data": "x", "mode": 0o4755}),
        json!({"path": "bin/null", "type": "char"}),
    ]);
    let upper = vec![
        json!({"path": "etc/.wh.gone", "data": ""}),
        json!({"path": "data", "type": "dir"}),
        json!({"path": "data/.wh..wh..opq", "data": ""}),
        json!({"path": "data/new", "data": "upper"}),
    ];
    let layout = dir.path().join("layout");
    let oci_id = build(
        &json!({"format": "oci", "archive": "dir", "gzip": true, "layers": [base, upper]}),
        &layout,
    );
    let d = imported(&store, &docker, "busybox:docker");
    assert_eq!(d["id"], docker_id.as_str());
    assert_eq!(d["interpreters"], json!({"shell": "/bin/sh"}));
    let o = imported(&store, &layout, "busybox:oci");
    assert_eq!(o["id"], oci_id.as_str());
    assert_eq!(o["layers"], 2);
    // Importing again changes nothing.
    let again = imported(&store, &docker, "busybox:docker");
    assert_eq!(again["already"], true);
    let root = rootfs_of(&store, &oci_id);
    // No setuid bit, no device node on the host.
    assert_eq!(
        std::fs::metadata(root.join("bin/suid"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o755
    );
    assert!(!root.join("bin/null").exists());
    let before = tree(&root);
    let code = "cat /etc/os-release; ls /etc /data; ls /usr/bin/python3 2>&1; \
                echo x > /etc/x 2>&1; echo scratch > /tmp/s && cat /tmp/s; id -u";
    for backend in image_backends() {
        for (image, id) in [("busybox:docker", &docker_id), ("busybox:oci", &oci_id)] {
            let r = run_in(&store, image, backend, "shell", code, b"");
            assert_eq!(r["exit_code"], 0, "{backend} {image}: {r}");
            assert_eq!(r["enforced"]["backend"], backend);
            assert_eq!(r["enforced"]["image"], id.as_str(), "{r}");
            let out = r["stdout"].as_str().unwrap();
            assert!(out.starts_with("NAME=airlock-test-image\n"), "{out}");
            // The host's python is not there: the root is the image's.
            assert!(
                out.contains("/usr/bin/python3: No such file or directory"),
                "{out}"
            );
            assert!(out.contains("scratch\n1000\n"), "{out}");
            let err = r["stderr"].as_str().unwrap();
            // The root is read-only: EROFS from the host kernel, EACCES
            // from gVisor's.
            let expected = if backend == "gvisor" {
                "can't create /etc/x: Permission denied"
            } else {
                "can't create /etc/x: Read-only file system"
            };
            assert!(err.contains(expected), "{backend}: {err}");
            if image == "busybox:oci" {
                assert!(out.contains("/data:\nnew\n"), "{out}");
                assert!(!out.contains("gone") && !out.contains("old"), "{out}");
            }
        }
    }
    // Shared and never written: the same tree after every run.
    assert_eq!(tree(&root), before);
    // The process sandbox has no image root.
    let out = airlock()
        .args([
            "run",
            "--backend",
            "process",
            "--image",
            "busybox:oci",
            "--lang",
            "sh",
            "-c",
            "true",
        ])
        .env("AIRLOCK_IMAGE_STORE", &store)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // A language the image lacks is refused before anything starts.
    let out = airlock()
        .args([
            "run",
            "--backend",
            image_backends()[0],
            "--image",
            "busybox:oci",
            "--lang",
            "python",
            "-c",
            "pass",
        ])
        .env("AIRLOCK_IMAGE_STORE", &store)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the python runtime is not installed"),
        "{out:?}"
    );
    // List and remove.
    let list = image_cmd(&store, &["list", "--json"]);
    let v: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
    assert!(image_cmd(&store, &["remove", &docker_id]).status.success());
    let out = image_cmd(&store, &["remove", "busybox:docker"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!rootfs_of(&store, &docker_id).exists());
}

#[test]
fn hostile_probes_hold_in_a_python_image_and_the_broker_works_there() {
    if image_backends().is_empty() {
        eprintln!("skipped: no OCI runtime or runsc here (as root)");
        return;
    }
    let (dir, id) = python_image();
    let id = &id;
    let store = dir.path().join("store");
    let secret_dir = open_dir();
    let secret = secret_dir.path().join("secret.txt");
    std::fs::write(&secret, "top secret").unwrap();
    let secret = secret.display().to_string();
    assert_eq!(outside(&format!("read {secret}"))["errno"], 0);
    assert_eq!(outside("read /usr/bin/dash")["errno"], 0);
    let probe = |backend: &str, p: &str| -> Value {
        let r = run_in(
            &store,
            "python:test",
            backend,
            "python",
            PROBE,
            format!("{p}\n").as_bytes(),
        );
        assert_eq!(r["enforced"]["image"], id.as_str(), "{r}");
        let line = r["stdout"]
            .as_str()
            .unwrap()
            .trim()
            .lines()
            .last()
            .unwrap_or("null")
            .to_string();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("{backend} {p}: {r}"));
        assert!(v.is_object(), "{backend} {p}: {r}");
        v
    };
    for backend in image_backends() {
        assert_eq!(
            probe(backend, &format!("read {secret}"))["errno"],
            ENOENT,
            "{backend}"
        );
        assert_eq!(
            probe(backend, "read /etc/shadow")["errno"],
            ENOENT,
            "{backend}"
        );
        // The host's /usr/bin is not the image's.
        assert_eq!(
            probe(backend, "read /usr/bin/dash")["errno"],
            ENOENT,
            "{backend}"
        );
        let erofs = if backend == "gvisor" {
            libc::EACCES
        } else {
            libc::EROFS
        };
        assert_eq!(
            probe(backend, "write /usr/lib/airlock-probe-write")["errno"],
            erofs as i64,
            "{backend}"
        );
        // The agent is out of reach: its directory is the sandbox's own,
        // read-only.
        assert_eq!(
            probe(backend, "write /.airlock/agent")["errno"],
            if backend == "gvisor" {
                libc::EACCES
            } else {
                libc::EROFS
            } as i64,
            "{backend}"
        );
    }
    // The operator's CA certificates reach an image root too, after the
    // image's own bundle (this image has none), at /.airlock; without
    // them the image's own TLS defaults stay untouched.
    let pem = "-----BEGIN CERTIFICATE-----\nMIIBtestonly\n-----END CERTIFICATE-----\n";
    let ca = secret_dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let show = "import os\nf = os.environ.get('SSL_CERT_FILE')\nprint(f, os.environ.get('NODE_EXTRA_CA_CERTS'))\nprint(f and open(f).read(), end='')";
    for backend in image_backends() {
        let out = airlock()
            .args(["run", "--backend", backend, "--image", "python:test"])
            .args(["--lang", "python", "-c", show])
            .env("AIRLOCK_IMAGE_STORE", &store)
            .env("AIRLOCK_CA_BUNDLE", &ca)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("/.airlock/ca-certificates.crt /.airlock/extra-ca.crt\n{pem}"),
            "{backend}: {out:?}"
        );
        let out = airlock()
            .args(["run", "--backend", backend, "--image", "python:test"])
            .args(["--lang", "python", "-c", show])
            .env("AIRLOCK_IMAGE_STORE", &store)
            .env_remove("AIRLOCK_CA_BUNDLE")
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "None None\nNone",
            "{backend}"
        );
    }
    // The broker: a handler with the guest SDK at /opt/airlock, in the
    // image.
    let code = secret_dir.path().join("h.py");
    std::fs::write(
        &code,
        "import sys\ndef handler(ax, input):\n    ax.log.info('seen', n=input['n'])\n    return {'n': input['n'] + 1, 'exe': sys.executable}\n",
    )
    .unwrap();
    for backend in image_backends() {
        let out = airlock()
            .args([
                "run",
                "--backend",
                backend,
                "--image",
                "python:test",
                "--handler",
            ])
            .args(["--input", r#"{"n": 41}"#, code.to_str().unwrap()])
            .env("AIRLOCK_IMAGE_STORE", &store)
            .env("AIRLOCK_LOCAL_DIR", secret_dir.path().join("local"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{backend}: {out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v, json!({"n": 42, "exe": "/usr/bin/python3"}), "{backend}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("airlock: log info seen"));
    }
}

#[test]
fn a_tampered_layer_is_refused_before_anything_is_unpacked() {
    let dir = open_dir();
    let store = dir.path().join("store");
    for format in ["oci", "docker"] {
        for gzip in [false, true] {
            let spec = |tamper: Value| {
                json!({"format": format, "gzip": gzip, "tamper": tamper,
                       "layers": [busybox_base(), [{"path": "etc/top", "data": "x"}]]})
            };
            // Positive control: the same image untampered imports.
            let good = dir.path().join(format!("good-{format}-{gzip}.tar"));
            build(&spec(Value::Null), &good);
            let ok = image_cmd(&store, &["import", good.to_str().unwrap()]);
            assert!(ok.status.success(), "{ok:?}");
            image_cmd(&store, &["remove", &build(&spec(Value::Null), &good)]);
            let bad = dir.path().join(format!("bad-{format}-{gzip}.tar"));
            build(&spec(json!(1)), &bad);
            // A flipped byte in a gzip stream may break the stream itself
            // before its digest is compared; either way it is refused.
            let reason = if gzip && format == "docker" {
                "layer 1: "
            } else {
                "layer 1: digest mismatch"
            };
            refused(&store, &bad, reason);
        }
    }
}

#[test]
fn an_image_without_layers_is_refused() {
    let dir = open_dir();
    let store = dir.path().join("store");
    for format in ["oci", "docker"] {
        let file = dir.path().join(format!("{format}.tar"));
        build(&json!({"format": format, "layers": []}), &file);
        refused(&store, &file, "the image has no layers");
    }
}

#[test]
fn dev_null_symlinked_to_host_procfs_is_refused_at_import_and_at_run_cve_2025_31133() {
    let dir = open_dir();
    let store = dir.path().join("store");
    let pattern = std::fs::read_to_string(CORE_PATTERN).unwrap();
    let mut layer = busybox_base();
    layer.push(json!({"path": "dev/null", "type": "symlink", "target": CORE_PATTERN}));
    let file = dir.path().join("cve.tar");
    build(&json!({"format": "oci", "layers": [layer]}), &file);
    refused(&store, &file, "the image's /dev holds a symlink (null)");
    // An image changed on disk after its import fails closed at run time.
    let good = dir.path().join("good.tar");
    let id = build(
        &json!({"format": "docker", "layers": [busybox_base()]}),
        &good,
    );
    imported(&store, &good, "busybox:later");
    std::os::unix::fs::symlink(CORE_PATTERN, rootfs_of(&store, &id).join("dev/null")).unwrap();
    for backend in image_backends() {
        let out = airlock()
            .args(["run", "--backend", backend, "--image", "busybox:later"])
            .args(["--lang", "sh", "-c", "echo ran"])
            .env("AIRLOCK_IMAGE_STORE", &store)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{backend}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("the image's /dev holds a symlink (null)"),
            "{err}"
        );
        assert!(out.stdout.is_empty());
    }
    assert_eq!(std::fs::read_to_string(CORE_PATTERN).unwrap(), pattern);
}

#[test]
fn proc_dev_and_dev_console_pre_created_as_symlinks_are_refused() {
    let dir = open_dir();
    let store = dir.path().join("store");
    let without = |p: &str| -> Vec<Value> {
        busybox_base()
            .into_iter()
            .filter(|e| e["path"] != p)
            .collect()
    };
    let with = |e: Value| [busybox_base(), vec![e]].concat();
    let cases: Vec<(Vec<Value>, &str)> = vec![
        (
            [
                without("proc"),
                vec![json!({"path": "proc", "type": "symlink", "target": "/"})],
            ]
            .concat(),
            "the image's /proc is a symlink (to /)",
        ),
        (
            [
                without("dev"),
                vec![json!({"path": "dev", "type": "symlink", "target": "/proc/sys/kernel"})],
            ]
            .concat(),
            "the image's /dev is a symlink (to /proc/sys/kernel)",
        ),
        (
            with(json!({"path": "dev/console", "type": "symlink", "target": "/etc/shadow"})),
            "the image's /dev holds a symlink (console)",
        ),
        (
            with(json!({"path": "dev/pts", "type": "dir"})),
            "the image's /dev holds an entry (pts)",
        ),
        (
            with(json!({"path": "opt", "type": "symlink", "target": "/etc"})),
            "the image's /opt is a symlink (to /etc)",
        ),
        (
            with(json!({"path": "tmp", "data": "not a directory"})),
            "the image's /tmp is not a directory",
        ),
    ];
    for (i, (layer, reason)) in cases.into_iter().enumerate() {
        let file = dir.path().join(format!("{i}.tar"));
        build(&json!({"format": "docker", "layers": [layer]}), &file);
        refused(&store, &file, reason);
    }
}

#[test]
fn entries_and_links_cannot_leave_the_image_root() {
    let dir = open_dir();
    let store = dir.path().join("store");
    let outside_dir = open_dir();
    let target = outside_dir.path().to_str().unwrap().to_string();
    // `..` in an entry, a hard link to a host file, a nameless whiteout,
    // a huge extended header: refused.
    for (entry, reason) in [
        (
            json!({"path": "../../../escaped", "data": "x"}),
            "entry \"../../../escaped\" leaves the image root",
        ),
        (
            json!({"path": "etc/shadow-link", "type": "hardlink", "target": "../../../../etc/shadow"}),
            "leaves the image root",
        ),
        // A whiteout without a name, and an extended header past its
        // cap (the tar crate would read any size into memory).
        (
            json!({"path": "etc/.wh.", "data": ""}),
            "a whiteout without a name",
        ),
        (
            json!({"path": "etc/big", "data": "x", "pax_bytes": 2 << 20}),
            "an extended header of",
        ),
    ] {
        let file = dir.path().join("hostile.tar");
        let mut layer = busybox_base();
        layer.push(entry);
        build(&json!({"format": "oci", "layers": [layer]}), &file);
        refused(&store, &file, reason);
    }
    // A symlink to a host directory the image does not have, then a file
    // through it: refused (pathrs does not create through a dangling
    // link), nothing written on the host.
    let mut layer = busybox_base();
    layer.push(json!({"path": "evil", "type": "symlink", "target": target}));
    layer.push(json!({"path": "evil/pwned", "data": "written through the link"}));
    let file = dir.path().join("dangling.tar");
    build(&json!({"format": "oci", "layers": [layer]}), &file);
    refused(&store, &file, "layer 0: evil/pwned: ");
    assert_eq!(
        std::fs::read_dir(outside_dir.path()).unwrap().count(),
        0,
        "written on the host"
    );
    // An absolute symlink to a directory the image has: the file lands in
    // the image's /etc, never the host's.
    let name = format!("airlock-pwned-{}", std::process::id());
    let mut layer = busybox_base();
    layer.push(json!({"path": "evil", "type": "symlink", "target": "/etc"}));
    layer.push(json!({"path": format!("evil/{name}"), "data": "written through the link"}));
    let file = dir.path().join("through.tar");
    let id = build(&json!({"format": "oci", "layers": [layer]}), &file);
    imported(&store, &file, "through:test");
    assert!(
        !Path::new("/etc").join(&name).exists(),
        "written on the host"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs_of(&store, &id).join("etc").join(&name)).unwrap(),
        "written through the link"
    );
    image_cmd(&store, &["remove", &id]);
    // Positive control: a record under the cap is fine.
    let mut layer = busybox_base();
    layer.push(json!({"path": "etc/big", "data": "x", "pax_bytes": 4096}));
    let file = dir.path().join("meta-ok.tar");
    let id = build(&json!({"format": "oci", "layers": [layer]}), &file);
    imported(&store, &file, "meta:ok");
    image_cmd(&store, &["remove", &id]);
    // Past the size cap: refused, nothing kept.
    let big = dir.path().join("big.tar");
    build(
        &json!({"format": "docker", "layers": [busybox_base()]}),
        &big,
    );
    let out = image_cmd(
        &store,
        &["import", big.to_str().unwrap(), "--max-size", "1"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the image is too large"),
        "{out:?}"
    );
    assert_eq!(std::fs::read_dir(store.join("tmp")).unwrap().count(), 0);
}
