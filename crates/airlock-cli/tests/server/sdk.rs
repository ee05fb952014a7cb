//! The client SDKs in `clients/`, run by their own test suites against a
//! real server: what a user of them gets is what these tests exercise.

use std::process::Command;

use crate::Server;

#[test]
fn python_client_passes_its_tests_against_a_real_server() {
    let python = crate::contract::tool("AIRLOCK_CI_PYTHON", &["/opt/airlock-ci/bin/python"]);
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let other = s.tenant("other");
    let client = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../clients/python");
    let out = Command::new(&python)
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(client.join("tests"))
        .env("PYTHONPATH", client.join("src"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("AIRLOCK_URL", format!("http://{}", s.addr))
        .env("AIRLOCK_API_KEY", &key)
        .env("AIRLOCK_OTHER_KEY", &other)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{}", s.log());
    // Positive control: every test ran, none was skipped.
    assert!(text.contains("Ran 7 tests"), "{text}");
    assert!(text.trim_end().ends_with("OK"), "{text}");
    // The tree's client, not an installed copy.
    let which = Command::new(&python)
        .args(["-c", "import airlock; print(airlock.__file__)"])
        .env("PYTHONPATH", client.join("src"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&which.stdout).contains("clients/python/src/airlock"),
        "{which:?}"
    );
}

#[test]
fn typescript_client_passes_its_tests_against_a_real_server() {
    let node = crate::contract::tool("AIRLOCK_NODE", &["node"]);
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let other = s.tenant("other");
    let client = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../clients/typescript");
    let out = Command::new(&node)
        .args(["--test", "--test-reporter=spec"])
        .arg(client.join("test/client.test.mjs"))
        .env("AIRLOCK_URL", format!("http://{}", s.addr))
        .env("AIRLOCK_API_KEY", &key)
        .env("AIRLOCK_OTHER_KEY", &other)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Positive control: every test ran, none was skipped.
    assert!(text.contains("ℹ tests 6"), "{text}");
    assert!(text.contains("ℹ pass 6"), "{text}");
    assert!(text.contains("ℹ skipped 0"), "{text}");
}
