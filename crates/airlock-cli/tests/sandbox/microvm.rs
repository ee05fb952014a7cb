//! The microVM backend (QEMU microvm, its own guest kernel, airlock as the
//! guest's init), under KVM where a real guest kernel runs on it and under
//! TCG otherwise, as on this machine: slow to boot (seconds), so each test
//! runs its probes as one batch in one VM. Positive controls run the same
//! probes on the host first; the table says what each must answer inside.

use super::*;

/// QEMU, a guest kernel and erofs-utils are here (`.ci/run` installs
/// them); the tests insist rather than skip when they are.
fn microvm_here() -> bool {
    let has = |p: &str| std::path::Path::new(p).exists();
    let kernel = std::fs::read_dir("/boot")
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        })
        .unwrap_or(false);
    is_root() && has("/usr/bin/qemu-system-x86_64") && has("/usr/bin/mkfs.erofs") && kernel
}

/// Runs `probes` (one per line) in one microVM; returns the result and
/// one answer per probe.
fn batch(probes: &[String], extra: &[&str]) -> (Value, Vec<Value>) {
    let mut args = vec!["--backend", "microvm"];
    args.extend_from_slice(extra);
    let r = run_json("python", PROBE, &(probes.join("\n") + "\n"), &args);
    let answers: Vec<Value> = r["stdout"]
        .as_str()
        .unwrap_or("")
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    (r, answers)
}

#[test]
fn code_runs_in_its_own_guest_kernel_behind_the_same_layers_as_on_the_host() {
    if !microvm_here() {
        panic!("the microvm backend needs root, qemu-system-x86, a /boot kernel and erofs-utils");
    }
    let dir = tempfile::Builder::new()
        .prefix("airlock-vm-secret")
        .tempdir_in("/var/tmp")
        .unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "top secret").unwrap();
    let secret = secret.display().to_string();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    use std::os::linux::net::SocketAddrExt;
    let name = format!("airlock-vm-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let _abstract = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    let (enoent, erofs, eperm, refused) =
        (ENOENT, libc::EROFS as i64, EPERM, libc::ECONNREFUSED as i64);
    // (probe, field, expected inside); each is answered differently on
    // the host (the positive control below).
    let rows: Vec<(String, &str, Value)> = vec![
        (format!("read {secret}"), "errno", enoent.into()),
        ("read /etc/shadow".into(), "errno", enoent.into()),
        (
            "write /usr/lib/airlock-probe-write".into(),
            "errno",
            erofs.into(),
        ),
        ("write /airlock-probe-write".into(), "errno", erofs.into()),
        (
            "write /proc/sys/kernel/core_pattern".into(),
            "errno",
            erofs.into(),
        ),
        ("write /workspace/ok".into(), "errno", 0.into()),
        ("mknod".into(), "errno", eperm.into()),
        ("clone_newuser".into(), "errno", eperm.into()),
        ("caps_raise".into(), "capset_errno", eperm.into()),
        // The agent is pid 1 of the sandbox's namespace, non-dumpable,
        // under the /proc (hidepid=invisible) the process sandbox mounts:
        // invisible to the code, as init is there.
        ("read /proc/1/mem".into(), "errno", enoent.into()),
        ("read /proc/1/fd/3".into(), "errno", enoent.into()),
        // The guest's own devices and filesystems are not in the sandbox:
        // no root image device, no channel port, no sysfs.
        ("stat /dev/vda".into(), "errno", enoent.into()),
        // Nor the scratch disk's device or its mount (only its two
        // directories, at /tmp and /workspace).
        ("stat /dev/vdb".into(), "errno", enoent.into()),
        ("stat /scratch".into(), "errno", enoent.into()),
        ("stat /dev/vport0p1".into(), "errno", enoent.into()),
        ("stat /sys/class".into(), "errno", enoent.into()),
        (format!("connect_tcp {port}"), "errno", refused.into()),
        (format!("connect_abstract {name}"), "errno", refused.into()),
        ("netdev".into(), "ifaces", serde_json::json!(["lo"])),
    ];
    // Positive controls: on the host each of these answers otherwise.
    assert_eq!(outside(&format!("read {secret}"))["errno"], 0);
    assert_eq!(outside("read /etc/shadow")["errno"], 0);
    assert_eq!(outside("stat /sys/class")["errno"], 0);
    assert_eq!(outside(&format!("connect_tcp {port}"))["errno"], 0);
    assert_eq!(outside(&format!("connect_abstract {name}"))["errno"], 0);
    let host_release = outside("uname")["release"].clone();

    let mut probes: Vec<String> = rows.iter().map(|(p, _, _)| p.clone()).collect();
    probes.extend(["uname".into(), "status".into(), "fds".into()]);
    let (r, answers) = batch(&probes, &[]);
    assert_eq!(r["reason"], "exited", "{r}");
    assert_eq!(r["enforced"]["backend"], "microvm", "{r}");
    assert_eq!(r["enforced"]["isolation"], "microvm", "{r}");
    let accel = r["enforced"]["accelerator"].as_str().unwrap_or("");
    assert!(accel == "kvm" || accel == "tcg", "{r}");
    assert_eq!(r["enforced"]["landlock"]["fully_enforced"], true, "{r}");
    assert_eq!(answers.len(), probes.len(), "{r}");
    let wrong: Vec<String> = rows
        .iter()
        .zip(&answers)
        .filter(|((_, field, want), got)| &got[*field] != want)
        .map(|((probe, field, want), got)| format!("{probe}: {field} {got} (want {want})"))
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
    let n = rows.len();
    // Its own kernel: not the host's.
    let release = &answers[n]["release"];
    assert_ne!(release, &host_release, "{release}");
    assert!(
        release.as_str().unwrap_or("").contains("cloud"),
        "{release}"
    );
    let st = &answers[n + 1];
    assert_eq!(st["Uid"], "1000\t1000\t1000\t1000", "{st}");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd"] {
        assert_eq!(st[set], "0000000000000000", "{set}: {st}");
    }
    assert_eq!(st["NoNewPrivs"], "1", "{st}");
    assert_eq!(st["Seccomp"], "2", "{st}");
    assert_eq!(answers[n + 2]["fds"], serde_json::json!([0, 1, 2, 3]));
}

#[test]
fn a_microvm_that_runs_out_of_time_is_killed_and_nothing_of_it_is_left() {
    if !microvm_here() {
        panic!("the microvm backend needs root, qemu-system-x86, a /boot kernel and erofs-utils");
    }
    // The guest's console goes to a file named only for this run: its
    // QEMU and its state are recognisable by it.
    let dir = tempfile::tempdir().unwrap();
    // QEMU runs as an unprivileged user: it must be able to create the file.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let console = dir.path().join("console.txt");
    let marker = console.display().to_string();
    let holding_marker = || -> Vec<String> {
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline"))
                && String::from_utf8_lossy(&cmd).contains(&marker)
            {
                found.push(format!("process {}", e.file_name().to_string_lossy()));
            }
        }
        for e in std::fs::read_dir("/run/airlock/vm")
            .into_iter()
            .flatten()
            .flatten()
        {
            if std::fs::read_to_string(e.path().join("vm.json")).is_ok_and(|t| t.contains(&marker))
            {
                found.push(format!("state {}", e.path().display()));
            }
        }
        found
    };
    let mut cmd = airlock();
    cmd.env("AIRLOCK_VM_CONSOLE", &console).args([
        "run",
        "--json",
        "--lang",
        "python",
        "--backend",
        "microvm",
        "--timeout",
        "2",
        "-c",
        "import time\nprint('started', flush=True)\ntime.sleep(600)\n",
    ]);
    let run = std::thread::spawn(move || output_with_stdin(cmd, b""));
    // While it runs: QEMU (found by the marker on its command line) is
    // pid 1 of its own pid namespace, in its own network, mount and IPC
    // namespaces, unprivileged, with no_new_privs.
    let qemu = {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let found = std::fs::read_dir("/proc").unwrap().flatten().find(|e| {
                std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("qemu-system") && c.contains(&marker)
                })
            });
            if let Some(e) = found {
                break e.path();
            }
            assert!(std::time::Instant::now() < end, "no QEMU seen");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let status = std::fs::read_to_string(qemu.join("status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    assert_eq!(field("NoNewPrivs"), "1", "{status}");
    // A uid of its own VM (held by the monitor's lock: no other VM's QEMU
    // can have it while this one runs), the shared QEMU group.
    let uid: u32 = field("Uid").split('\t').next().unwrap().parse().unwrap();
    assert_eq!(
        field("Uid"),
        vec![uid.to_string(); 4].join("\t"),
        "{status}"
    );
    assert_eq!(field("Gid"), "65533\t65533\t65533\t65533", "{status}");
    let base = airlock_backend::microvm::QEMU_UID_BASE;
    assert!(
        (base..base + airlock_backend::microvm::QEMU_UIDS).contains(&uid),
        "{status}"
    );
    let uid_lock = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/run/airlock/vm-uids/{}", uid - base))
        .unwrap();
    use std::os::fd::AsRawFd;
    let try_lock = || {
        // SAFETY: flock with LOCK_NB on a descriptor this test owns.
        let r = unsafe { libc::flock(uid_lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap()
        }
    };
    assert_eq!(try_lock(), libc::EWOULDBLOCK, "the uid is not held");
    assert!(field("NSpid").ends_with("\t1"), "{status}");
    for ns in ["net", "pid", "mnt", "ipc", "uts"] {
        // Positive control: the test itself is in the host's namespaces.
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let theirs = std::fs::read_link(qemu.join(format!("ns/{ns}"))).unwrap();
        assert_ne!(ours, theirs, "{ns}");
    }
    // The root image is open read-only in QEMU itself: a guest that
    // remounted it read-write still could not change it (BoxLite
    // CVE-2026-46695's class). Positive control: QEMU's channel socket is
    // open read-write.
    let open_modes = || {
        let mut modes: Vec<(String, u32)> = Vec::new();
        for fd in std::fs::read_dir(qemu.join("fd")).unwrap().flatten() {
            let target = std::fs::read_link(fd.path())
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            let info = std::fs::read_to_string(qemu.join("fdinfo").join(fd.file_name()))
                .unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                .unwrap_or(u32::MAX);
            modes.push((target, flags & libc::O_ACCMODE as u32));
        }
        modes
    };
    // QEMU may be seen right after its exec, before it has opened its
    // drive: wait (bounded) until it has, then look.
    let mut modes = open_modes();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !modes.iter().any(|(t, _)| t.ends_with(".erofs")) && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(20));
        modes = open_modes();
    }
    let image: Vec<_> = modes
        .iter()
        .filter(|(t, _)| t.ends_with(".erofs"))
        .collect();
    assert_eq!(image.len(), 1, "{modes:?}");
    assert_eq!(image[0].1, libc::O_RDONLY as u32, "{modes:?}");
    assert!(
        modes
            .iter()
            .any(|(t, m)| t.starts_with("socket:") && *m == libc::O_RDWR as u32),
        "{modes:?}"
    );
    let out = run.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Positive controls: the program started in the guest (and the guest
    // kernel wrote its console where the marker says).
    assert_eq!(r["reason"], "timeout", "{r}");
    assert_eq!(r["stdout"], "started\n", "{r}");
    assert_eq!(r["enforced"]["backend"], "microvm", "{r}");
    let booted = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(booted.contains("Linux version"), "{booted}");
    // QEMU and the sandbox's state are gone once the run returns, and its
    // uid is free again (positive control of the lock above).
    assert_eq!(holding_marker(), Vec::<String>::new());
    assert_eq!(try_lock(), 0);
}

#[test]
fn memory_and_task_limits_hold_inside_the_guest() {
    if !microvm_here() {
        panic!("the microvm backend needs root, qemu-system-x86, a /boot kernel and erofs-utils");
    }
    let grow = "chunks = []\nfor i in range(40):\n    chunks.append(bytearray(4 << 20))\nprint('grew', len(chunks), flush=True)\n";
    let bomb = "import os, time\nkids = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(60)\n            os._exit(0)\n        kids += 1\nexcept OSError as e:\n    print('kids', kids, e.errno)\n";
    // Positive control: forking works until the task limit stops it with
    // EAGAIN, and 160 MiB fit in 256. (Forks first: a fork of a process
    // already holding 160 MiB copies its page tables, which under TCG
    // took most of the wall-clock limit.)
    // (Guest CPU time under TCG stretches with a busy host: the control
    // gets a minute of it, and of wall clock.)
    let (_d, roomy) = policy_file("[limits]\ncpu_time_ms = 60000\n");
    let r = run_json(
        "python",
        &format!("{bomb}{grow}"),
        "",
        &[
            "--backend",
            "microvm",
            "--memory",
            "256",
            "--pids",
            "16",
            "--timeout",
            "60",
            "--policy",
            &roomy,
        ],
    );
    assert_eq!(r["reason"], "exited", "{r}");
    let out = r["stdout"].as_str().unwrap_or("");
    assert!(out.contains("grew 40\n"), "{r}");
    let kids: Vec<&str> = out
        .lines()
        .find_map(|l| l.strip_prefix("kids "))
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        kids.get(1).copied(),
        Some(&*libc::EAGAIN.to_string()),
        "{r}"
    );
    let n: u64 = kids[0].parse().unwrap();
    assert!(n > 0 && n < 16, "{r}");
    // The guest's cgroup holds the policy's memory: the same growth in 64
    // MiB is killed (SIGKILL by the guest kernel's OOM killer) long before
    // 160 MiB, and said to be the memory limit (the host's cgroup saw no
    // OOM kill: the agent read the guest's count).
    let r = run_json(
        "python",
        grow,
        "",
        &["--backend", "microvm", "--memory", "64"],
    );
    assert_eq!(r["signal"], 9, "{r}");
    assert_eq!(r["reason"], "memory_limit", "{r}");
    assert!(!r["stdout"].as_str().unwrap_or("").contains("grew"), "{r}");
}

#[test]
fn scratch_is_a_disk_of_the_vms_own_that_holds_the_policys_quota() {
    if !microvm_here() {
        panic!("the microvm backend needs root, qemu-system-x86, a /boot kernel and erofs-utils");
    }
    let (_d, policy) = policy_file(
        "[filesystem]\nscratch_mib = 48\nscratch_inodes = 256\n[limits]\nmemory_mib = 32\ncpu_time_ms = 60000\n",
    );
    let code = r#"
import os
MIB = 1 << 20
CHUNK = b'x' * MIB
def fill(path, limit):
    n = 0
    try:
        with open(path, 'wb') as f:
            while n < limit:
                f.write(CHUNK)
                n += MIB
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return n // MIB, e.errno
    return n // MIB, 0
# More than the sandbox's memory fits: the disk is not the guest's RAM.
print('big', *fill('/workspace/big', 40 * MIB), flush=True)
with open('/workspace/big', 'rb') as f:
    f.seek(39 * MIB)
    print('read', len(f.read()), flush=True)
os.remove('/workspace/big')
# /tmp and /workspace share the one quota.
print('tmp', *fill('/tmp/part', 24 * MIB), flush=True)
print('rest', *fill('/workspace/rest', 100 * MIB), flush=True)
os.remove('/tmp/part')
os.remove('/workspace/rest')
# Files: the inode quota.
n = 0
try:
    while True:
        open('/tmp/f%d' % n, 'w').close()
        n += 1
except OSError as e:
    print('files', n, e.errno, flush=True)
raise SystemExit(1)
"#;
    let r = run_json(
        "python",
        code,
        "",
        &[
            "--backend",
            "microvm",
            "--policy",
            &policy,
            "--timeout",
            "90",
        ],
    );
    let out = r["stdout"].as_str().unwrap_or("");
    let line = |k: &str| -> Vec<u64> {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k} ")))
            .unwrap_or_else(|| panic!("no {k} in {r}"))
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect()
    };
    // Positive controls: 40 MiB fit in 48 with 32 MiB of memory, and read
    // back; 24 MiB fit in /tmp.
    assert_eq!(line("big"), [40, 0], "{r}");
    assert_eq!(line("read"), [1 << 20], "{r}");
    assert_eq!(line("tmp"), [24, 0], "{r}");
    // What is left for /workspace is the quota's rest, to the MiB: ENOSPC
    // at 48 MiB written in all (47 whole MiB and a part: the guest's
    // reserve of the disk's surplus takes a block of metadata), none
    // beyond it.
    let rest = line("rest");
    assert_eq!(rest[1], libc::ENOSPC as u64, "{r}");
    assert!((47..=48).contains(&(24 + rest[0])), "{r}");
    // The policy's files, to the file.
    let files = line("files");
    assert_eq!(files[1], libc::ENOSPC as u64, "{r}");
    assert!((255..=256).contains(&files[0]), "{r}");
    assert_eq!(r["reason"], "disk_limit", "{r}");
    assert!(
        r["enforced"]["unavailable_limits"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l
                .as_str()
                .unwrap()
                .contains("share a disk of the VM's own (48 MiB, 256 files")),
        "{r}"
    );
    // A disk of many block groups (2 GiB: 16 of them, each laid out with
    // its own inodes and metadata) still gives exactly the policy's.
    let (_d, policy) = policy_file("[filesystem]\nscratch_mib = 2048\nscratch_inodes = 100\n");
    let r = run_json(
        "python",
        "import os\nst = os.statvfs('/workspace')\nprint('space', st.f_bavail * st.f_frsize >> 20)\n\
         n = 0\ntry:\n    while True:\n        open('/tmp/f%d' % n, 'w').close()\n        n += 1\n\
         except OSError as e:\n    print('files', n, e.errno)\n",
        "",
        &["--backend", "microvm", "--policy", &policy],
    );
    let out = r["stdout"].as_str().unwrap_or("");
    assert!(
        out.contains("space 2047\n") || out.contains("space 2048\n"),
        "{r}"
    );
    assert!(
        out.contains("files 99 28\n") || out.contains("files 100 28\n"),
        "{r}"
    );
}

#[test]
fn airlock_vm_builds_the_guest_images_and_prunes_only_what_they_do_not_use() {
    if !microvm_here() {
        panic!("the microvm backend needs root, qemu-system-x86, a /boot kernel and erofs-utils");
    }
    let store = tempfile::tempdir().unwrap();
    let vm = |args: &[&str]| {
        let out = airlock()
            .arg("vm")
            .args(args)
            .env("AIRLOCK_VM_STORE", store.path())
            .env("AIRLOCK_VM_ACCEL", "tcg")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let built: Value = serde_json::from_str(&vm(&["build-image", "--json"])).unwrap();
    let initrd = built["initrd"]["path"].as_str().unwrap().to_string();
    let root = built["root"]["path"].as_str().unwrap().to_string();
    // Content-addressed in the store, read-only.
    use std::os::unix::fs::PermissionsExt;
    for p in [&initrd, &root] {
        assert!(p.starts_with(store.path().to_str().unwrap()), "{p}");
        let m = std::fs::metadata(p).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o444, "{p}");
        assert_eq!(
            m.len(),
            built[if p == &initrd { "initrd" } else { "root" }]["bytes"]
        );
    }
    let id = built["root"]["id"].as_str().unwrap();
    assert!(
        root.ends_with(&format!("{}.erofs", &id["sha256:".len()..])),
        "{built}"
    );
    assert_eq!(built["stale"]["entries"], 0, "{built}");
    // What an earlier binary left: an initramfs with its reference, and a
    // snapshot made with other artifacts (its key's host part differs).
    let old_initrd = store
        .path()
        .join("initrd")
        .join(format!("{}.cpio", "ab".repeat(32)));
    std::fs::write(&old_initrd, vec![0u8; 1 << 20]).unwrap();
    let old_ref = store.path().join("refs/initrd-old");
    std::fs::write(&old_ref, "ab".repeat(32)).unwrap();
    let old_snap = store
        .path()
        .join("snap")
        .join(format!("python-0123456789abcdef-{}", "cd".repeat(32)));
    std::fs::create_dir_all(&old_snap).unwrap();
    std::fs::write(old_snap.join("mem"), vec![1u8; 1 << 20]).unwrap();
    // Said by build-image, counted by a dry run, removed by prune.
    let again: Value = serde_json::from_str(&vm(&["build-image", "--json"])).unwrap();
    assert_eq!(again["initrd"]["path"], initrd.as_str(), "cached: {again}");
    assert_eq!(again["stale"]["entries"], 2, "{again}");
    assert!(vm(&["prune", "--dry-run"]).starts_with("would remove 2 "));
    assert!(old_initrd.exists() && old_snap.exists());
    assert!(vm(&["prune"]).starts_with("removed 2 "));
    assert!(!old_initrd.exists() && !old_ref.exists() && !old_snap.exists());
    // What the current artifacts are stays (positive control: found, not
    // rebuilt, nothing more to prune).
    let after: Value = serde_json::from_str(&vm(&["build-image", "--json"])).unwrap();
    assert_eq!(after["initrd"]["path"], initrd.as_str());
    assert_eq!(after["root"]["path"], root.as_str());
    assert_eq!(after["stale"]["entries"], 0, "{after}");
    assert!(std::path::Path::new(&initrd).exists() && std::path::Path::new(&root).exists());
}

#[test]
fn microvm_qemu_opens_and_runs_nothing_of_the_host_but_what_it_boots() {
    if !microvm_here() {
        panic!("the microvm backend needs root, qemu-system-x86, a /boot kernel and erofs-utils");
    }
    // A QEMU that is a shell script: it runs /bin/sh, which is not among
    // what QEMU's Landlock ruleset lets it read or run (its binary, the
    // system's libraries and firmware, the guest's artifacts).
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let wrapper = dir.path().join("qemu-system-x86_64");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\nexec /usr/bin/qemu-system-x86_64 \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Positive control: outside the ruleset, as QEMU's user, it is QEMU.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65533", "--regid=65533", "--clear-groups"])
        .arg(&wrapper)
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("QEMU emulator version"));
    // Under it, its exec is refused with EACCES and the run fails
    // closed, saying so.
    let out = airlock()
        .args([
            "run",
            "--backend",
            "microvm",
            "--lang",
            "python",
            "-c",
            "print(1)",
        ])
        .env("AIRLOCK_QEMU", &wrapper)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("QEMU does not start: Permission denied (os error 13)"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}
