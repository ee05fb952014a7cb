//! Filesystem escapes: host files, links, device nodes, mounts, /proc, /sys.

use super::*;

/// A host file with a secret, in a directory the sandbox never mounts.
fn host_secret() -> (tempfile::TempDir, String) {
    let dir = tempfile::Builder::new()
        .prefix("airlock-host-secret")
        .tempdir_in("/var/tmp")
        .unwrap();
    let path = dir.path().join("secret.txt");
    std::fs::write(&path, "top secret").unwrap();
    (dir, path.to_str().unwrap().to_string())
}

#[test]
fn host_file_read_is_impossible() {
    let (_d, secret) = host_secret();
    assert_eq!(outside(&format!("read {secret}"))["errno"], 0);
    assert_eq!(inside_ok(&format!("read {secret}"))["errno"], ENOENT);
    // Host credentials files are not there either (the sandbox has its own /etc).
    if is_root() {
        assert_eq!(outside("read /etc/shadow")["errno"], 0);
    }
    assert_eq!(inside_ok("read /etc/shadow")["errno"], ENOENT);
    let passwd = run_json("shell", "cat /etc/passwd", "", &[]);
    assert!(
        !passwd["stdout"]
            .as_str()
            .unwrap()
            .contains("/root:/bin/bash"),
        "{passwd}"
    );
}

#[test]
fn host_file_write_into_runtime_mount_is_read_only() {
    if is_root() {
        assert_eq!(outside("write /usr/lib/airlock-probe-write")["errno"], 0);
    }
    assert_eq!(
        inside_ok("write /usr/lib/airlock-probe-write")["errno"],
        libc::EROFS
    );
    assert_eq!(
        inside_ok("write /airlock-probe-write")["errno"],
        libc::EROFS
    );
    assert_eq!(inside_ok("write /etc/passwd")["errno"], libc::EROFS);
    // Scratch is writable.
    assert_eq!(inside_ok("write /tmp/ok")["errno"], 0);
    assert_eq!(inside_ok("write /workspace/ok")["errno"], 0);
}

#[test]
fn symlink_escape_to_host_path_is_impossible() {
    let (_d, secret) = host_secret();
    assert_eq!(outside(&format!("symlink_read {secret}"))["errno"], 0);
    assert_eq!(
        inside_ok(&format!("symlink_read {secret}"))["errno"],
        ENOENT
    );
    // /proc/1/root would lead to init's root; init is invisible (hidepid) and non-dumpable.
    assert_eq!(
        inside_ok("symlink_read /proc/1/root/etc/passwd")["errno"],
        ENOENT
    );
}

#[test]
fn hardlink_escape_from_runtime_into_scratch_is_impossible() {
    // Outside a hard link on the same filesystem works.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f");
    std::fs::write(&f, "x").unwrap();
    assert_eq!(outside(&format!("hardlink {}", f.display()))["errno"], 0);
    // Inside, linking a runtime file into scratch crosses mounts.
    assert_eq!(
        inside_ok("hardlink /usr/bin/python3.11")["errno"],
        libc::EXDEV
    );
}

#[test]
fn mknod_device_node_is_denied() {
    if is_root() {
        assert_eq!(outside("mknod")["errno"], 0);
    }
    assert_eq!(inside_ok("mknod")["errno"], EPERM);
}

#[test]
fn mount_unshare_setns_chroot_are_denied() {
    for name in [
        "mount",
        "unshare",
        "setns",
        "chroot",
        "pivot_root",
        "umount2",
        "open_tree",
        "fsopen",
        "move_mount",
    ] {
        let out = outside(&format!("syscall {name}"));
        let inn = inside_ok(&format!("syscall {name}"));
        assert_eq!(inn["errno"], EPERM, "{name}: {inn}");
        assert_ne!(out["errno"], EPERM, "{name} outside: {out}");
    }
}

#[test]
fn proc_sys_write_is_read_only() {
    if is_root() {
        assert_eq!(outside("write_same /proc/sys/kernel/hostname")["errno"], 0);
    }
    assert_eq!(
        inside_ok("write_same /proc/sys/kernel/hostname")["errno"],
        libc::EROFS
    );
    assert_eq!(
        inside_ok("write_same /proc/sys/vm/overcommit_memory")["errno"],
        libc::EROFS
    );
}

#[test]
fn sys_is_absent() {
    assert_eq!(outside("stat /sys/kernel")["errno"], 0);
    assert_eq!(inside_ok("stat /sys/kernel")["errno"], ENOENT);
    assert_eq!(
        inside_ok("write /sys/kernel/uevent_helper")["errno"],
        ENOENT
    );
}

#[test]
fn sensitive_proc_files_are_masked() {
    if is_root() {
        assert!(
            outside("read /proc/timer_list")["len"]
                .as_i64()
                .unwrap_or(0)
                > 0
        );
    }
    for f in ["kcore", "keys", "timer_list", "sysrq-trigger"] {
        let path = format!("/proc/{f}");
        let st = inside_ok(&format!("stat {path}"));
        if st["errno"] == ENOENT {
            continue; // not present on this kernel at all
        }
        // Replaced by /dev/null (character device 1:3).
        assert_eq!(st["rdev"], libc::makedev(1, 3), "{path}: {st}");
        let r = inside_ok(&format!("read {path}"));
        assert_eq!(r["len"], 0, "{path}: {r}");
    }
}

#[test]
fn code_is_copied_so_no_host_path_shows_in_mountinfo() {
    let dir = tempfile::Builder::new()
        .prefix("airlock-secret-project")
        .tempdir()
        .unwrap();
    let file = dir.path().join("prog.py");
    std::fs::write(&file, "print(open('/proc/self/mountinfo').read())\nprint(open('/workspace/prog.py').read()[:5])\n").unwrap();
    let out = airlock()
        .args(["run", "--json"])
        .arg(&file)
        .output()
        .unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = r["stdout"].as_str().unwrap();
    assert!(text.contains("print"), "{r}");
    assert!(!text.contains("airlock-secret-project"), "{text}");
    assert!(!text.contains(dir.path().to_str().unwrap()), "{text}");
}

#[test]
fn read_only_paths_expose_a_host_dir_without_write_access() {
    let data = tempfile::Builder::new()
        .prefix("airlock-ro-data")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::write(data.path().join("input.txt"), "shared data").unwrap();
    let (_dir, policy) = policy_file(&format!(
        "[filesystem]\nread_only_paths = [{:?}]\n",
        data.path().to_str().unwrap()
    ));
    let p = &policy;
    let file = data.path().join("input.txt");
    let (r, v) = inside(&format!("read {}", file.display()), &["--policy", p]);
    assert_eq!(r["reason"], "exited");
    assert_eq!(v["len"], 11, "{v}");
    let (_, v) = inside(
        &format!("write {}/new", data.path().display()),
        &["--policy", p],
    );
    assert_eq!(v["errno"], libc::EROFS, "{v}");
    // A path that does not exist is bad input, not a silently smaller view.
    std::fs::write(
        &policy,
        "[filesystem]\nread_only_paths = [\"/var/tmp/airlock-does-not-exist\"]\n",
    )
    .unwrap();
    let out = airlock()
        .args(["run", "--policy", p, "--lang", "python", "-c", "pass"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// The tools a shell node uses work inside (the runtime root has the
/// alternatives links, the loader cache, locale data, the CA bundle), and
/// /etc holds nothing of the host's that is secret or identifying.
#[test]
fn a_shell_node_has_its_tools_and_no_host_secret_in_etc() {
    let script = r#"
set -u
printf 'b\na\n' | sort | tr '\n' ' '; echo
echo 'one two' | awk '{print $2}'
echo abc | sed 's/b/X/' | grep -c aXc
which sh
env | grep -c '^HOME=/workspace$'
printf hello | base64
printf hello | sha256sum | cut -c1-16
printf hello | gzip | gzip -d; echo
mkdir -p /tmp/t && echo x > /tmp/t/f && tar -C /tmp -czf /tmp/t.tgz t && tar -tzf /tmp/t.tgz | head -1
date -u -d @0 +%Y-%m-%dT%H:%M
python3 -c "import ssl, sqlite3, json, zlib; print(ssl.create_default_context().cert_store_stats()['x509_ca'] > 0, sqlite3.sqlite_version_info >= (3,), zlib.crc32(b'x'))"
awk '$1 == "application/epub+zip" {print $2}' /etc/mime.types
printf '\303\251t\303\251' | LC_ALL=C.UTF-8 wc -m
LC_ALL=C.UTF-8 python3 -c "import locale; print(locale.setlocale(locale.LC_ALL, ''))"
for f in shadow gshadow resolv.conf machine-id ssh ssl/private sudoers localtime; do
  [ -e /etc/$f ] && echo "present $f"
done
cat /etc/hosts | tr '\t' ' '
echo end
"#;
    let r = run_json("shell", script, "", &[]);
    assert_eq!(r["exit_code"], 0, "{r}");
    let out: Vec<&str> = r["stdout"].as_str().unwrap().lines().collect();
    assert_eq!(
        out,
        [
            "a b ",
            "two",
            "1",
            "/usr/bin/sh",
            "1",
            "aGVsbG8=",
            "2cf24dba5fb0a30e",
            "hello",
            "t/",
            "1970-01-01T00:00",
            "True True 2363233923",
            "epub",
            "3",
            "C.UTF-8",
            "127.0.0.1 localhost airlock",
            "::1 localhost ip6-localhost ip6-loopback",
            "end",
        ],
        "{r}"
    );
    // Positive control: the host has what the sandbox does not show.
    assert!(std::path::Path::new("/etc/shadow").exists());
    assert!(std::path::Path::new("/etc/resolv.conf").exists());
}
