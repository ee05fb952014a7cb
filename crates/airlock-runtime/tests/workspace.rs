//! A session's workspace as the files API reaches it: a capped file system
//! of its own, every path resolved inside it with the sandbox user's ids.
//! What the code could plant there (symlinks out, FIFOs, device nodes,
//! read-only files) is planted here directly, as root, on the mount.

// Test helpers may panic: a panic is a test failure with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Arc;
use std::time::Duration;

use airlock_runtime::session::{FsError, Sessions, Workspace};

const OWNER: (u32, u32) = (65534, 65534);

fn workspace(mib: u64, files: u64) -> (tempfile::TempDir, Sessions, Arc<Workspace>) {
    assert_eq!(
        rustix_euid(),
        0,
        "workspaces are mounted file systems: run the tests as root"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let s = Sessions::new(dir.path(), OWNER).unwrap();
    let ws = s
        .create(
            "ss_test",
            "tn_a",
            (mib, files),
            Duration::from_secs(60),
            Duration::from_secs(600),
            None,
        )
        .unwrap();
    (dir, s, ws)
}

fn rustix_euid() -> u32 {
    // SAFETY: geteuid has no failure modes and touches no memory.
    unsafe { libc::geteuid() }
}

#[test]
fn files_round_trip_owned_by_the_sandbox_user() {
    let (_d, s, ws) = workspace(4, 64);
    ws.write("src/app/main.py", b"print(1)\n", 0o644).unwrap();
    assert_eq!(ws.read("/src/app/main.py", 1 << 20).unwrap(), b"print(1)\n");
    let meta = std::fs::metadata(ws.path.join("src/app/main.py")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), OWNER, "the code may change it");
    let dir = std::fs::metadata(ws.path.join("src/app")).unwrap();
    assert_eq!((dir.uid(), dir.gid()), OWNER, "parents too");
    let st = ws.stat("src/app/main.py").unwrap();
    assert_eq!((st.kind, st.size, st.mode), ("file", 9, 0o644));
    let (list, more) = ws.list("src/app").unwrap();
    assert_eq!(
        list.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
        ["main.py"]
    );
    assert!(!more);
    // Overwritten whole, by rename: no temporary file stays beside it.
    ws.write("src/app/main.py", b"print(2)\n", 0o644).unwrap();
    let (list, _) = ws.list("src/app").unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    ws.remove("src/app/main.py").unwrap();
    assert!(matches!(
        ws.read("src/app/main.py", 100),
        Err(FsError::NotFound)
    ));
    assert!(matches!(ws.remove("src"), Err(FsError::NotEmpty)));
    ws.remove("src/app").unwrap();
    ws.remove("src").unwrap();
    // The session's end takes the file system with it.
    let path = ws.path.clone();
    assert!(s.end("ss_test").is_some());
    drop(ws);
    assert!(!path.exists(), "the mount point is gone");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(path.to_str().unwrap()), "unmounted");
}

#[test]
fn paths_never_leave_the_workspace() {
    let (_d, _s, ws) = workspace(4, 64);
    let host = tempfile::tempdir().unwrap();
    let secret = host.path().join("secret");
    std::fs::write(&secret, b"host secret").unwrap();
    // Positive control: a file in the workspace reads.
    ws.write("ok.txt", b"fine", 0o644).unwrap();
    assert_eq!(ws.read("ok.txt", 100).unwrap(), b"fine");
    // Planted by the code: an absolute symlink, a relative one that climbs,
    // and a directory symlink out.
    std::os::unix::fs::symlink(&secret, ws.path.join("abs")).unwrap();
    std::os::unix::fs::symlink(
        "../../../../../../..".to_string() + secret.to_str().unwrap(),
        ws.path.join("rel"),
    )
    .unwrap();
    std::os::unix::fs::symlink(host.path(), ws.path.join("dir")).unwrap();
    for p in ["abs", "rel", "dir/secret"] {
        // Resolved inside the workspace, where nothing of that name exists.
        assert!(matches!(ws.read(p, 100), Err(FsError::NotFound)), "{p}");
    }
    for p in ["../secret", "a/../../secret", "a\0b"] {
        assert!(
            matches!(ws.read(p, 100), Err(FsError::InvalidPath(_))),
            "{p:?}"
        );
    }
    assert!(matches!(
        ws.read(&"x".repeat(300), 100),
        Err(FsError::InvalidPath(_))
    ));
    // A write through a symlink replaces the link; the host file stays.
    ws.write("abs", b"overwritten", 0o644).unwrap();
    assert_eq!(std::fs::read(&secret).unwrap(), b"host secret");
    assert!(
        std::fs::symlink_metadata(ws.path.join("abs"))
            .unwrap()
            .is_file()
    );
    // A write under a directory symlink lands inside the workspace, if
    // anywhere, never in the host directory.
    let _ = ws.write("dir/new", b"x", 0o644);
    assert!(
        !host.path().join("new").exists(),
        "nothing written on the host"
    );
    // Removing a symlink removes the link, not its target.
    ws.remove("rel").unwrap();
    assert!(secret.exists());
    // stat names a symlink as one.
    assert_eq!(ws.stat("dir").unwrap().kind, "symlink");
}

#[test]
fn fifos_and_device_nodes_are_refused_without_blocking() {
    let (_d, _s, ws) = workspace(4, 64);
    let fifo = std::ffi::CString::new(ws.path.join("fifo").to_str().unwrap()).unwrap();
    // SAFETY: a valid path; mkfifo touches no memory of ours.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
    let dev = std::ffi::CString::new(ws.path.join("null").to_str().unwrap()).unwrap();
    // SAFETY: as above (a character device 1:3, /dev/null's numbers, on a
    // nodev mount).
    let made = unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    assert_eq!(made, 0);
    let t = std::time::Instant::now();
    match ws.read("fifo", 100) {
        Err(FsError::WrongType(m)) => assert!(m.contains("FIFO"), "{m}"),
        other => panic!("{other:?}"),
    }
    match ws.read("null", 100) {
        // nodev: the kernel refuses to open a device node there (EACCES)
        // before its type is even looked at.
        Err(FsError::Denied) => {}
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(2), "nothing blocked");
    assert_eq!(ws.stat("fifo").unwrap().kind, "other");
    assert!(matches!(ws.read("/", 100), Err(FsError::InvalidPath(_))));
    ws.write("d/f", b"", 0o644).unwrap();
    assert!(matches!(ws.read("d", 100), Err(FsError::WrongType(_))));
    assert!(matches!(ws.read("d/f/g", 100), Err(FsError::WrongType(_))));
    assert!(matches!(ws.read("fifo", 0), Err(FsError::WrongType(_))));
}

#[test]
fn quotas_refuse_an_upload_and_keep_the_old_file() {
    let (_d, _s, ws) = workspace(1, 8);
    ws.write("keep.bin", &[7u8; 4096], 0o644).unwrap();
    // Over the byte quota: refused whole, the old contents intact, no
    // temporary file left.
    match ws.write("keep.bin", &vec![1u8; 2 << 20], 0o644) {
        Err(FsError::Full { mib: 1, files: 8 }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(ws.read("keep.bin", 1 << 20).unwrap(), vec![7u8; 4096]);
    assert_eq!(ws.list("/").unwrap().0.len(), 1);
    // Over the file quota: 8 files in all, the ninth refused.
    for i in 1..8 {
        ws.write(&format!("f{i}"), b"x", 0o644).unwrap();
    }
    assert!(matches!(
        ws.write("f9", b"x", 0o644),
        Err(FsError::Full { .. })
    ));
    let (_, files) = ws.usage().unwrap();
    assert_eq!(files, 8);
    // A read larger than the caller's cap is refused, not truncated.
    assert!(matches!(
        ws.read("keep.bin", 100),
        Err(FsError::TooLarge(100))
    ));
}

#[test]
fn the_server_has_only_the_codes_access() {
    let (_d, _s, ws) = workspace(4, 64);
    ws.write("ro/file", b"mine", 0o644).unwrap();
    // The code makes its file and directory read-only.
    std::fs::set_permissions(
        ws.path.join("ro/file"),
        std::fs::Permissions::from_mode(0o444),
    )
    .unwrap();
    std::fs::set_permissions(ws.path.join("ro"), std::fs::Permissions::from_mode(0o555)).unwrap();
    assert!(matches!(
        ws.write("ro/file", b"x", 0o644),
        Err(FsError::Denied)
    ));
    assert!(matches!(ws.remove("ro/file"), Err(FsError::Denied)));
    assert_eq!(
        ws.read("ro/file", 100).unwrap(),
        b"mine",
        "reading still works"
    );
    // A file only root may read (not the code's user) stays unreadable.
    std::fs::write(ws.path.join("rootonly"), b"x").unwrap();
    std::fs::set_permissions(
        ws.path.join("rootonly"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    assert!(matches!(ws.read("rootonly", 100), Err(FsError::Denied)));
    // The thread's ids are root's again afterwards.
    let f = tempfile::NamedTempFile::new().unwrap();
    assert_eq!(f.as_file().metadata().unwrap().uid(), 0);
}
