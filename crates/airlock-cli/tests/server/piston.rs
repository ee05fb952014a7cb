//! The Piston-compatible façade (`/api/v2/runtimes`, `/api/v2/execute`),
//! driven with the requests of Piston's API documentation and of its
//! clients, byte for byte where the host allows (the versions are this
//! host's interpreters').

use serde_json::{Value, json};

use crate::{Server, raw};

fn piston(s: &Server, auth: Option<&str>, path: &str, body: Option<&Value>) -> crate::Resp {
    let mut h: Vec<(&str, &str)> = Vec::new();
    if let Some(a) = auth {
        h.push(("Authorization", a));
    }
    let text = body.map(Value::to_string);
    if text.is_some() {
        h.push(("Content-Type", "application/json"));
    }
    let method = if body.is_some() { "POST" } else { "GET" };
    raw(s.addr, method, path, &h, text.as_deref().map(str::as_bytes))
}

/// A Piston error: the status, and its `message` (with airlock's code).
fn error(r: &crate::Resp, status: u16, code: &str) -> String {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["code"], code, "{v}");
    v["message"].as_str().unwrap().to_string()
}

#[test]
fn piston_clients_run_their_documented_requests_unchanged() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let bearer = format!("Bearer {key}");
    // Piston's public API takes its token bare; both forms work.
    let r = piston(&s, Some(&key), "/api/v2/runtimes", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let list = r.json();
    let find = |lang: &str| -> Value {
        list.as_array()
            .unwrap()
            .iter()
            .find(|x| x["language"] == lang)
            .cloned()
            .unwrap_or_else(|| panic!("{lang} not in {list}"))
    };
    let py = find("python");
    let js = find("javascript");
    let sh = find("sh");
    assert!(py["aliases"].as_array().unwrap().contains(&json!("py")));
    assert_eq!(js["runtime"], "node");
    assert!(sh["aliases"].as_array().unwrap().contains(&json!("shell")));
    let py_version = py["version"].as_str().unwrap().to_string();
    assert!(py_version.starts_with("3."), "{py}");
    let js_version = js["version"].as_str().unwrap().to_string();

    // The documented example: a named file, arguments, every limit field.
    let doc = json!({
        "language": "js",
        "version": js_version,
        "files": [{"name": "my_cool_code.js", "content": "console.log(process.argv)"}],
        "stdin": "",
        "args": ["1", "2", "3"],
        "compile_timeout": 10000,
        "run_timeout": 3000,
        "compile_memory_limit": -1,
        "run_memory_limit": -1
    });
    let r = piston(&s, Some(&bearer), "/api/v2/execute", Some(&doc));
    assert_eq!(r.status, 200, "{}\n{}", r.text(), s.log());
    let v = r.json();
    assert_eq!(
        (&v["language"], &v["version"]),
        (&json!("javascript"), &json!(js_version))
    );
    let run = &v["run"];
    assert_eq!(run["code"], 0, "{v}");
    assert_eq!(run["signal"], Value::Null);
    let argv: Vec<String> = run["stdout"]
        .as_str()
        .unwrap()
        .split('\'')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    assert_eq!(argv.len(), 5, "{v}");
    assert!(argv[0].ends_with("/node"), "{argv:?}");
    assert_eq!(argv[1..], ["/workspace/my_cool_code.js", "1", "2", "3"]);
    assert_eq!(run["output"], run["stdout"]);
    assert_eq!(run["stderr"], "");

    // The clients' one-liner: no name, a version range.
    let r = piston(
        &s,
        Some(&key),
        "/api/v2/execute",
        Some(
            &json!({"language": "python", "version": "3.x", "files": [{"content": "print('This code ran')"}]}),
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["version"], py_version);
    assert_eq!(v["run"]["stdout"], "This code ran\n");
    assert_eq!(
        (&v["run"]["code"], &v["run"]["status"]),
        (&json!(0), &Value::Null)
    );
    assert!(v["run"]["wall_time"].as_u64().is_some(), "{v}");
    // stdin, stderr and a failing exit, in sh.
    let r = piston(
        &s,
        Some(&key),
        "/api/v2/execute",
        Some(&json!({"language": "sh", "version": "*", "stdin": "ab",
                     "files": [{"content": "cat; echo err >&2; exit 3"}]})),
    );
    let v = r.json();
    assert_eq!(v["run"]["stdout"], "ab", "{v}");
    assert_eq!(v["run"]["stderr"], "err\n");
    assert_eq!(v["run"]["output"], "aberr\n");
    assert_eq!(
        (&v["run"]["code"], &v["run"]["status"]),
        (&json!(3), &json!("RE"))
    );
    // Several files (base64 and hex ones too): the first runs, the others
    // sit beside it.
    let r = piston(
        &s,
        Some(&key),
        "/api/v2/execute",
        Some(
            &json!({"language": "py3", "version": py_version, "args": ["x y"],
            "files": [
                {"name": "main.py", "content": "import sys, helper\nprint(helper.twice(sys.argv[1]), open('data.bin','rb').read())"},
                {"name": "helper.py", "content": "ZGVmIHR3aWNlKHMpOiByZXR1cm4gcyAqIDIK", "encoding": "base64"},
                {"name": "data.bin", "content": "00ff", "encoding": "hex"}
            ]}),
        ),
    );
    let v = r.json();
    assert_eq!(v["run"]["stdout"], "x yx y b'\\x00\\xff'\n", "{v}");
    // A limit ends it, and says which.
    let r = piston(
        &s,
        Some(&key),
        "/api/v2/execute",
        Some(
            &json!({"language": "python", "version": "*", "run_timeout": 300,
                     "files": [{"content": "while True: pass"}]}),
        ),
    );
    let v = r.json();
    assert_eq!(v["run"]["status"], "TO", "{v}");
    assert_eq!(v["run"]["message"], "Time limit exceeded (wall clock)");
    assert_eq!(v["run"]["signal"], "SIGKILL");
    assert_eq!(v["run"]["code"], Value::Null);
    // Every one of them is an execution of the tenant's, on its record.
    let mine = s.get("/v1/executions?limit=100", &key).json();
    assert_eq!(mine["executions"].as_array().unwrap().len(), 5, "{mine}");
    // The sessions the multi-file requests used are ended.
    let sessions = s.get("/v1/sessions", &key).json();
    let all = sessions["sessions"].as_array().unwrap();
    assert_eq!(all.len(), 2, "{sessions}");
    assert!(
        all.iter()
            .all(|x| x["status"] == "ended" && x["end_reason"] == "deleted"),
        "{sessions}"
    );
}

#[test]
fn piston_requests_that_are_wrong_get_pistons_errors_with_airlocks_codes() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let exec = |auth: Option<&str>, body: Value| piston(&s, auth, "/api/v2/execute", Some(&body));
    let ok = json!({"language": "python", "version": "*", "files": [{"content": "print(1)"}]});
    // Positive control.
    assert_eq!(exec(Some(&key), ok.clone()).status, 200);
    // No key, a wrong one: the API's 401, in Piston's shape.
    let r = exec(None, ok.clone());
    error(&r, 401, "unauthorized");
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"airlock\"")
    );
    error(
        &piston(&s, None, "/api/v2/runtimes", None),
        401,
        "unauthorized",
    );
    error(&exec(Some("alk_nope"), ok.clone()), 401, "unauthorized");
    // Two keys (a bare one and a bearer one) are ambiguous, as anywhere.
    let bearer = format!("Bearer {key}");
    let body = ok.to_string();
    let r = raw(
        s.addr,
        "POST",
        "/api/v2/execute",
        &[
            ("Authorization", &key),
            ("Authorization", &bearer),
            ("Content-Type", "application/json"),
        ],
        Some(body.as_bytes()),
    );
    error(&r, 400, "invalid_request");
    // Languages and versions this host does not run.
    let m = error(
        &exec(
            Some(&key),
            json!({"language": "cobol", "version": "*", "files": [{"content": "x"}]}),
        ),
        400,
        "runtime_unknown",
    );
    assert_eq!(m, "cobol-* runtime is unknown");
    let m = error(
        &exec(
            Some(&key),
            json!({"language": "python", "version": "2.x", "files": [{"content": "x"}]}),
        ),
        400,
        "runtime_unknown",
    );
    assert_eq!(m, "python-2.x runtime is unknown");
    // Shapes Piston documents as required, and fields it does not know.
    error(
        &exec(
            Some(&key),
            json!({"language": "python", "version": "*", "files": []}),
        ),
        400,
        "invalid_request",
    );
    let m = error(
        &exec(
            Some(&key),
            json!({"language": "python", "files": [{"content": "x"}]}),
        ),
        400,
        "invalid_request",
    );
    assert!(m.contains("missing field `version`"), "{m}");
    let m = error(
        &exec(
            Some(&key),
            json!({"language": "python", "version": "*", "files": [{"content": "x"}], "sudo": true}),
        ),
        400,
        "invalid_request",
    );
    assert!(m.contains("unknown field `sudo`"), "{m}");
    let m = error(
        &exec(
            Some(&key),
            json!({"language": "python", "version": "*", "run_timeout": -5, "files": [{"content": "x"}]}),
        ),
        400,
        "invalid_request",
    );
    assert!(
        m.starts_with("run_timeout must be a positive number"),
        "{m}"
    );
    error(
        &exec(
            Some(&key),
            json!({"language": "python", "version": "*", "files": [{"content": "zz", "encoding": "hex"}]}),
        ),
        400,
        "invalid_request",
    );
    // Above the server's ceiling: refused, audited, never clamped.
    let m = error(
        &exec(
            Some(&key),
            json!({"language": "python", "version": "*", "run_timeout": 999_999_999, "files": [{"content": "x"}]}),
        ),
        422,
        "policy_denied",
    );
    assert!(m.contains("wall_time_ms"), "{m}");
    // A file name that would leave the workspace: the files API refuses
    // it, and the request's session is ended all the same.
    let m = error(
        &exec(
            Some(&key),
            json!({"language": "python", "version": "*",
                   "files": [{"name": "main.py", "content": "1"}, {"name": "../../etc/x", "content": "1"}]}),
        ),
        400,
        "invalid_path",
    );
    assert!(!m.contains("/var/") && !m.contains("/run/"), "{m}");
    // An execution the API refuses after the files were written: the
    // session is ended all the same.
    error(
        &exec(
            Some(&key),
            json!({"language": "python", "version": "*", "run_timeout": 999_999_999,
                   "files": [{"name": "main.py", "content": "1"}, {"name": "b.py", "content": "1"}]}),
        ),
        422,
        "policy_denied",
    );
    let sessions = s.get("/v1/sessions", &key).json();
    let all = sessions["sessions"].as_array().unwrap();
    assert_eq!(all.len(), 2, "{sessions}");
    assert!(
        all.iter().all(|x| x["end_reason"] == "deleted"),
        "{sessions}"
    );
}
