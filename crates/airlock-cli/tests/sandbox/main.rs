//! The sandbox security suite: one integration-test binary made of modules.
//!
//! Each test is named after the attack it tries. Where it is safe, the same
//! probe (`probe.py`) runs outside the sandbox first as a positive control,
//! proving the attack would work (or at least reach the kernel) there; the
//! test then asserts the exact errno, signal or termination reason inside.
//! No test sends traffic anywhere but this machine's own loopback.

// Test helpers may panic: a panic is a test failure with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod backends;
mod cli;
mod escapes;
mod images;
mod isolation;
mod limits;
mod microvm;
mod session;
mod syscalls;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

pub const PROBE: &str = include_str!("probe.py");
pub const PYTHON: &str = "/usr/bin/python3";

pub fn airlock() -> Command {
    Command::new(env!("CARGO_BIN_EXE_airlock"))
}

pub fn output_with_stdin(mut cmd: Command, stdin: &[u8]) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut w = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait");
    let _ = writer.join();
    out
}

/// Runs code in a sandbox with `--json` and returns the parsed result.
pub fn run_json(lang: &str, code: &str, stdin: &str, extra: &[&str]) -> Value {
    let mut cmd = airlock();
    cmd.args(["run", "--json", "--lang", lang])
        .args(extra)
        .args(["-c", code]);
    let out = output_with_stdin(cmd, stdin.as_bytes());
    assert!(
        out.status.code() == Some(0),
        "airlock failed: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("result JSON")
}

/// Runs a probe inside the sandbox; returns (engine result, probe JSON).
pub fn inside(probe: &str, extra: &[&str]) -> (Value, Value) {
    let r = run_json("python", PROBE, &format!("{probe}\n"), extra);
    let stdout = r["stdout"].as_str().unwrap_or("").trim().to_string();
    let v = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    (r, v)
}

/// Runs the probe inside and insists the program exited normally.
pub fn inside_ok(probe: &str) -> Value {
    let (r, v) = inside(probe, &[]);
    assert_eq!(
        r["reason"], "exited",
        "probe {probe} did not exit normally: {r}"
    );
    assert!(!v.is_null(), "probe {probe} printed nothing: {r}");
    v
}

/// Runs the same probe outside the sandbox (positive control).
pub fn outside(probe: &str) -> Value {
    let mut cmd = Command::new(PYTHON);
    cmd.args(["-c", PROBE]);
    let out = output_with_stdin(cmd, format!("{probe}\n").as_bytes());
    assert!(
        out.status.success(),
        "outside probe {probe} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim().lines().last().unwrap_or("null")).expect("probe JSON")
}

/// Writes a policy file; keep the returned directory alive while it is used.
pub fn policy_file(toml: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, toml).unwrap();
    let path = path.to_str().unwrap().to_string();
    (dir, path)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub const EPERM: i64 = libc::EPERM as i64;
pub const ENOENT: i64 = libc::ENOENT as i64;
