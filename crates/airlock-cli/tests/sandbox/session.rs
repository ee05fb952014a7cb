//! A session's workspace bound into process sandboxes: what one execution
//! leaves in /workspace the next one finds, nothing else does, and the
//! workspace's own quota ends a writer with ENOSPC.

use std::sync::Arc;
use std::time::Duration;

use airlock_policy::{Language, Policy};
use airlock_runtime::session::{Sessions, Workspace};
use airlock_sandbox::{Engine, EngineConfig, Extras, RunResult};

fn engine() -> Engine {
    let mut cfg = EngineConfig::from_current_exe().unwrap();
    cfg.init_path = env!("CARGO_BIN_EXE_airlock").into();
    Engine::new(cfg)
}

fn run(engine: &Engine, ws: Option<&Arc<Workspace>>, code: &str) -> RunResult {
    let extras = Extras {
        workspace: ws.map(|w| w.path.clone()),
        ..Extras::default()
    };
    let sb = engine
        .prepare_with(&Policy::default(), Language::Shell, &extras)
        .unwrap();
    sb.execute(code.as_bytes(), None, b"", &mut |_, _| {})
}

#[test]
fn a_session_workspace_persists_between_fresh_sandboxes_and_holds_no_code() {
    assert!(crate::is_root(), "workspaces are mounted: run as root");
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let sessions = Sessions::new(dir.path(), (65534, 65534)).unwrap();
    let ws = sessions
        .create(
            "ss_sandbox",
            "tn_a",
            (2, 64),
            Duration::from_secs(60),
            Duration::from_secs(600),
            None,
        )
        .unwrap();
    let e = engine();
    let first = run(
        &e,
        Some(&ws),
        "echo kept > /workspace/state && ls -A /workspace && echo $0",
    );
    assert_eq!(first.exit_code, Some(0), "{first:?}");
    // The code file is in /tmp, not the workspace.
    assert_eq!(first.stdout, "state\n/tmp/main.sh\n", "{first:?}");
    let second = run(&e, Some(&ws), "cat /workspace/state; ls -A /workspace");
    assert_eq!(second.stdout, "kept\nstate\n", "{second:?}");
    // The files API sees what the code wrote, and the code sees uploads.
    assert_eq!(ws.read("state", 100).unwrap(), b"kept\n");
    ws.write("from-api", b"hello\n", 0o644).unwrap();
    let third = run(
        &e,
        Some(&ws),
        "cat /workspace/from-api && echo more >> /workspace/from-api",
    );
    assert_eq!(
        (third.exit_code, third.stdout.as_str()),
        (Some(0), "hello\n")
    );
    assert_eq!(ws.read("from-api", 100).unwrap(), b"hello\nmore\n");
    // Control: a sandbox without the session has an empty workspace of
    // its own.
    let other = run(&e, None, "ls -A /workspace | grep -v main.sh; true");
    assert_eq!(other.stdout, "", "{other:?}");
    // The quota is the file system's: 2 MiB, then ENOSPC.
    let full = run(
        &e,
        Some(&ws),
        "head -c 4194304 /dev/zero > /workspace/big; echo status=$?",
    );
    assert!(full.stderr.contains("No space left on device"), "{full:?}");
    assert!(full.stdout.contains("status=1"), "{full:?}");
    drop(sessions.end("ss_sandbox"));
    let path = ws.path.clone();
    drop(ws);
    assert!(!path.exists());
}
