//! Choosing a backend: the cheapest offered one that meets a request's
//! minimum isolation, a level or backend nobody offers refused with 422
//! `isolation_unavailable` (audited, nothing started), and the result
//! naming what ran.

use serde_json::json;

use crate::{Server, query};

#[test]
fn the_cheapest_offered_backend_meeting_the_minimum_runs_and_the_result_names_it() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    // Positive control: no minimum, and a minimum the process backend meets.
    for body in [
        json!({"language": "shell", "code": "echo ok"}),
        json!({"language": "shell", "code": "echo ok", "isolation": "container"}),
        json!({"language": "shell", "code": "echo ok", "backend": "process"}),
    ] {
        let v = s.exec(&key, body);
        assert_eq!(v["status"], "finished", "{v}");
        assert_eq!(v["result"]["stdout"], "ok\n");
        assert_eq!(v["result"]["enforced"]["backend"], "process");
        assert_eq!(v["result"]["enforced"]["isolation"], "container");
        assert_eq!(v["result"]["enforced"]["missing_layers"], json!([]));
    }
}

#[test]
fn a_level_or_backend_not_offered_is_refused_with_422_audited_and_nothing_starts() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let before = query(
        &s.data().join("airlock.db"),
        "SELECT count(*) FROM executions",
    )[0][0]
        .as_i64()
        .unwrap();
    for (body, wanted) in [
        (
            json!({"language": "shell", "code": "echo no", "isolation": "gvisor"}),
            "isolation gvisor",
        ),
        (
            json!({"language": "shell", "code": "echo no", "isolation": "microvm"}),
            "isolation microvm",
        ),
        (
            json!({"language": "shell", "code": "echo no", "backend": "oci"}),
            "backend \"oci\"",
        ),
        (
            json!({"language": "shell", "code": "echo no", "backend": "process", "isolation": "gvisor"}),
            "backend process (container) at isolation gvisor",
        ),
    ] {
        let r = s.post("/v1/executions", &key, body.clone());
        assert_eq!(r.status, 422, "{body}: {}", r.text());
        let p = r.json();
        assert_eq!(p["code"], "isolation_unavailable", "{p}");
        assert_eq!(
            p["detail"],
            format!("{wanted} is not offered here (offered: process (container))"),
            "{p}"
        );
    }
    // An unknown level is not a level at all: bad input.
    let r = s.post(
        "/v1/executions",
        &key,
        json!({"language": "shell", "code": "echo no", "isolation": "hypervisor"}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let db = s.data().join("airlock.db");
    let after = query(&db, "SELECT count(*) FROM executions")[0][0]
        .as_i64()
        .unwrap();
    assert_eq!(after, before, "nothing was recorded as started");
    let audited = query(
        &db,
        "SELECT count(*) FROM audit WHERE kind = 'isolation.unavailable'",
    )[0][0]
        .as_i64()
        .unwrap();
    assert_eq!(audited, 4);
}
