//! Redaction under attack: markers that would grow data past every cap,
//! forms of a value that escaped it, a value cut at the output limit on the
//! live stream, a value used as a memory key. Every test has its positive
//! control (the same path without the secret, or the value really printed).

use std::time::Instant;

use serde_json::{Value, json};

use crate::{Server, follow_sse};

/// A 4-byte value under a 128-character name: its marker is 139 bytes,
/// nearly 35 times the value.
const SHORT: &str = "q7Zx";

fn long_name() -> String {
    format!("S{}", "N".repeat(127))
}

/// Follows an execution's event stream to its end: the events, and the
/// stdout they carried.
fn stream_stdout(s: &Server, key: &str, id: &str) -> (Vec<(Instant, String, Value)>, String) {
    let events = follow_sse(s.addr, &format!("/v1/executions/{id}/events"), key);
    let stdout = events
        .iter()
        .filter(|e| e.1 == "stdout")
        .map(|e| e.2["data"].as_str().unwrap().to_string())
        .collect();
    (events, stdout)
}

fn stdout_lines(v: &Value) -> Vec<String> {
    v["result"]["stdout"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn redaction_markers_cannot_grow_memory_or_logs_past_their_caps() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let name = long_name();
    s.put_secret(&key, &name, SHORT);
    let marker_len = format!("[REDACTED:{name}]").len();
    assert_eq!(marker_len, 139);
    // 60 KiB of the value passes the 64 KiB check as sent and would be
    // stored at 35 times that; the same size of harmless text is stored.
    let code = format!(
        r#"
import airlock, json, time
ax = airlock.connect()
v, _ = ax.secrets.get({name:?})
def attempt(f):
    try:
        f()
        return "ok"
    except airlock.AirlockError as e:
        return e.code
print(attempt(lambda: ax.agent.memory.put("grown", v * (15 << 10))))
print(attempt(lambda: ax.agent.memory.put("plain", "w" * (60 << 10))))
print(attempt(lambda: ax.agent.memory.put("few", v * 10)))
print(attempt(lambda: ax.log.info("fields", blob=v * (3 << 10))))
print(attempt(lambda: ax.log.info("fields", blob="w" * (12 << 10))))
print(attempt(lambda: ax.log.info(v * 200)))
print(attempt(lambda: ax.log.info("w" * 8000)))
time.sleep(1.1)
# 58 values are 232 bytes as sent and 8 062 bytes as stored: the 1 MiB
# log quota of the execution must count the latter.
n = 0
why = "ok"
for i in range(190):
    why = attempt(lambda: ax.log.debug(v * 58))
    if why != "ok":
        break
    n += 1
print(n, why)
"#
    );
    let v = s.exec(
        &key,
        json!({"language": "python", "code": code, "secrets": [name], "flow": "f",
               "limits": {"wall_time_ms": 30000}}),
    );
    let out = stdout_lines(&v);
    assert_eq!(out.len(), 8, "{v}");
    assert_eq!(out[0], "too_large", "memory value grown by markers: {v}");
    assert_eq!(out[1], "ok", "positive control: 60 KiB of plain text");
    assert_eq!(out[2], "ok", "a few markers fit");
    assert_eq!(out[3], "too_large", "log fields grown by markers: {v}");
    assert_eq!(out[4], "ok", "positive control: 12 KiB of plain fields");
    assert_eq!(out[5], "too_large", "log message grown by markers: {v}");
    assert_eq!(out[6], "ok", "positive control: an 8000-byte message");
    let stored_len = 58 * marker_len;
    let used: usize =
        8000 + 2 + "fields".len() + json!({"blob": "w".repeat(12 << 10)}).to_string().len();
    let expect = ((1usize << 20) - used) / (stored_len + 2);
    assert_eq!(
        out[7],
        format!("{expect} quota_exceeded"),
        "the log quota counts the redacted bytes: {v}"
    );
    // What was stored is within the caps and holds no value.
    let few = s.get("/v1/memory/f/few", &key);
    assert_eq!(few.status, 200, "{}", few.text());
    assert_eq!(few.json()["value"], format!("[REDACTED:{name}]").repeat(10));
    s.get("/v1/memory/f/grown", &key).problem(404, "not_found");
    let id = v["id"].as_str().unwrap();
    let logs = s
        .get(&format!("/v1/executions/{id}/logs?limit=1000"), &key)
        .json();
    let stored: usize = logs["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["message"].as_str().unwrap().len() + l["fields"].to_string().len())
        .sum();
    assert!(stored <= 1 << 20, "{stored} bytes of logs stored");
    assert!(!logs.to_string().contains(SHORT));
}

#[test]
fn the_live_stream_carries_at_most_the_output_cap_after_redaction() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let name = long_name();
    s.put_secret(&key, &name, SHORT);
    // 64 KiB of output made of the value: 2.2 MiB once redacted.
    let cap = 64 << 10;
    let code = format!(
        r#"
import airlock, sys, time
v, _ = airlock.connect().secrets.get({name:?})
time.sleep(0.5)
for _ in range(16):
    sys.stdout.write(v * 1024); sys.stdout.flush()
time.sleep(0.3)
"#
    );
    let r = s.post(
        "/v1/executions",
        &key,
        json!({"language": "python", "code": code, "secrets": [name], "wait": false,
               "limits": {"stdout_bytes": cap}}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let (events, streamed) = stream_stdout(&s, &key, &id);
    let rec = s.get(&format!("/v1/executions/{id}"), &key).json();
    let stored = rec["result"]["stdout"].as_str().unwrap();
    // Positive control: the program really wrote the value (redacted), and
    // the stream was followed live, not replayed from the record.
    assert!(stored.starts_with(&format!("[REDACTED:{name}]")), "{rec}");
    assert!(events.iter().any(|e| e.1 == "started"));
    assert_eq!(streamed.len(), cap, "stream cut exactly at the cap");
    assert_eq!(stored.len(), cap, "record cut exactly at the cap");
    assert_eq!(streamed, stored);
    assert!(!streamed.contains(SHORT));
}

#[test]
fn ascii_escaped_values_cut_tails_on_the_stream_and_memory_keys_are_redacted() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let secret = "pässwörd-€-canary-0815";
    s.put_secret(&key, "S", secret);
    let code = r#"
import airlock, json, sys, time
ax = airlock.connect()
v, _ = ax.secrets.get("S")
# Positive control: python's default json.dumps does escape non-ASCII.
print(json.dumps("ä-unrelated"))
print(json.dumps({"pw": v}))
print(json.dumps([v]), file=sys.stderr)
ax.log.info(json.dumps(v), copy=json.dumps(v))
def attempt(f):
    try:
        return f()
    except airlock.AirlockError as e:
        return e.code
print(attempt(lambda: ax.agent.memory.put("user/" + v, 1)))
print(attempt(lambda: ax.agent.memory.put("user/" + json.dumps(v)[1:-1], 1)))
print(attempt(lambda: ax.agent.memory.put("user/plain", 1)))
print(json.dumps(ax.agent.memory.list("user/")))
"#;
    let v = s.exec(
        &key,
        json!({"language": "python", "code": code, "secrets": ["S"], "flow": "f"}),
    );
    let out = stdout_lines(&v);
    assert_eq!(out[0], r#""\u00e4-unrelated""#, "{v}");
    assert_eq!(out[1], r#"{"pw": "[REDACTED:S]"}"#, "{v}");
    assert_eq!(
        v["result"]["stderr"].as_str().unwrap(),
        "[\"[REDACTED:S]\"]\n"
    );
    assert_eq!(out[2], "invalid_key", "a value as a memory key: {v}");
    assert_eq!(out[3], "invalid_key", "its escaped form as a key: {v}");
    assert_eq!(out[4], "1", "positive control: a plain key");
    assert_eq!(out[5], r#"["user/plain"]"#, "{v}");
    let id = v["id"].as_str().unwrap();
    let logs = s.get(&format!("/v1/executions/{id}/logs"), &key).json();
    assert_eq!(logs["logs"][0]["message"], "\"[REDACTED:S]\"", "{logs}");
    assert_eq!(logs["logs"][0]["fields"]["copy"], "\"[REDACTED:S]\"");
    let escaped = &serde_json::to_string(&json!(secret)).unwrap();
    let everything = format!("{v}{logs}{}", s.get("/v1/memory/f?prefix=", &key).text());
    assert!(!everything.contains(secret));
    assert!(!everything.contains("p\\u00e4ssw"), "{everything}");
    assert!(!everything.contains(&escaped[1..escaped.len() - 1]));

    // Output cut at its limit in the middle of a value: the live stream
    // ends redacted, exactly as the record does.
    let filler = "f".repeat(50);
    let code = format!(
        r#"
import airlock, sys, time
v, _ = airlock.connect().secrets.get("S")
time.sleep(0.5)
sys.stdout.write({filler:?} + v + "\n"); sys.stdout.flush()
time.sleep(0.3)
"#
    );
    let r = s.post(
        "/v1/executions",
        &key,
        json!({"language": "python", "code": code, "secrets": ["S"], "wait": false,
               "limits": {"stdout_bytes": 64}}),
    );
    let id = r.json()["id"].as_str().unwrap().to_string();
    let (events, streamed) = stream_stdout(&s, &key, &id);
    let rec = s.get(&format!("/v1/executions/{id}"), &key).json();
    assert_eq!(rec["result"]["stdout_truncated"], true, "{rec}");
    assert_eq!(rec["result"]["stdout"], format!("{filler}[REDACTED:S]"));
    assert_eq!(streamed, format!("{filler}[REDACTED:S]"), "{events:?}");
    assert!(!streamed.contains("pä"));
}

#[test]
fn broker_security_audits_beyond_the_cap_leave_one_summary() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let code = r#"
import airlock
ax = airlock.connect()
for i in range(25):
    try:
        ax.secrets.get("NOT_GRANTED_%d" % i)
    except airlock.AirlockError as e:
        pass
"#;
    let v = s.exec(&key, json!({"language": "python", "code": code}));
    assert_eq!(v["result"]["exit_code"], 0, "{v}");
    let audit = s.get("/v1/audit?limit=500", &key).json();
    let events = audit["events"].as_array().unwrap();
    let denied = events
        .iter()
        .filter(|e| e["kind"] == "secret.denied")
        .count();
    assert_eq!(denied, 20, "the first 20 one by one");
    let summary: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "broker.audit_suppressed")
        .collect();
    assert_eq!(summary.len(), 1, "{audit}");
    assert_eq!(summary[0]["detail"]["not_audited"]["secret.denied"], 5);
    assert_eq!(summary[0]["subject"], v["id"]);
    // Positive control: an execution that stays under the cap leaves none.
    let v2 = s.exec(
        &key,
        json!({"language": "python", "code": code.replace("25", "3")}),
    );
    let audit = s.get("/v1/audit?limit=500", &key).json();
    assert!(
        !audit["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "broker.audit_suppressed" && e["subject"] == v2["id"])
    );
}

#[test]
fn binary_output_comes_back_exactly_as_base64_and_redacted() {
    use base64::Engine as _;
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    s.put_secret(&key, "S", "bin-s3cr3t-value");
    let code = r#"
import airlock, sys
v, _ = airlock.connect().secrets.get("S")
sys.stdout.buffer.write(bytes(range(256)) + v.encode() + b"\xff\xfe")
sys.stderr.buffer.write(b"\x00err\x80")
"#;
    let body = |enc: &str| json!({"language": "python", "code": code, "secrets": ["S"], "output_encoding": enc});
    let v = s.exec(&key, body("base64"));
    let b64 = base64::engine::general_purpose::STANDARD;
    let out = b64
        .decode(v["result"]["stdout_base64"].as_str().unwrap())
        .unwrap();
    let mut want: Vec<u8> = (0..=255u8).collect();
    want.extend_from_slice(b"[REDACTED:S]\xff\xfe");
    assert_eq!(out, want, "{v}");
    let err = b64
        .decode(v["result"]["stderr_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(err, b"\x00err\x80");
    assert!(!v.to_string().contains("bin-s3cr3t"));
    // Positive control: as text, the bytes that are not UTF-8 are lost, and
    // without asking there is no base64.
    let t = s.exec(&key, body("utf8"));
    let text = t["result"]["stdout"].as_str().unwrap();
    assert!(
        text.contains('\u{fffd}') && text.ends_with("[REDACTED:S]\u{fffd}\u{fffd}"),
        "{t}"
    );
    assert!(t["result"].get("stdout_base64").is_none(), "{t}");
    s.post(
        "/v1/executions",
        &key,
        json!({"language": "python", "code": "1", "output_encoding": "hex"}),
    )
    .problem(400, "invalid_request");
}

/// Runs `code` in one python execution with the long-named secret granted
/// and returns its stdout lines.
fn python_lines(s: &Server, key: &str, name: &str, code: &str) -> (Value, Vec<String>) {
    let v = s.exec(
        key,
        json!({"language": "python", "code": code, "secrets": [name], "flow": "f",
               "limits": {"wall_time_ms": 60000}}),
    );
    assert_eq!(v["result"]["exit_code"], 0, "{v}");
    let out = stdout_lines(&v);
    (v, out)
}

#[test]
fn the_memory_write_quota_counts_the_redacted_bytes_stored() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let name = long_name();
    s.put_secret(&key, &name, SHORT);
    let marker = format!("[REDACTED:{name}]");
    let (value_cap, quota) = (64usize << 10, 8usize << 20);
    // The most copies of the value whose redacted form still fits one
    // memory value: 471 copies, 1 886 bytes as sent, 65 471 as stored.
    let copies = (value_cap - 2) / marker.len();
    let (sent, stored) = (SHORT.len() * copies + 2, marker.len() * copies + 2);
    assert_eq!((copies, sent, stored), (471, 1886, 65471));
    // 128 such writes fit the 8 MiB quota; the 129th would pass 8 MiB.
    let fit = quota / stored;
    assert_eq!(fit, 128);
    let writes = fit + 1;
    let program = |value: &str| {
        format!(
            r#"
import airlock
ax = airlock.connect()
v, _ = ax.secrets.get({name:?})
value = {value}
n, why = 0, "ok"
for i in range({writes}):
    try:
        ax.agent.memory.put("w/%03d" % i, value)
    except airlock.AirlockError as e:
        why = e.code + " " + e.message
        break
    n += 1
print(n, why)
"#
        )
    };
    let (v, out) = python_lines(&s, &key, &name, &program(&format!("v * {copies}")));
    assert_eq!(
        out,
        [format!(
            "{fit} quota_exceeded this execution may write at most {quota} bytes of memory"
        )],
        "the quota counts the stored (redacted) bytes: {v}"
    );
    // What was stored: exactly `fit` values, each the redacted form.
    let last = s.get(&format!("/v1/memory/f/w/{:03}", fit - 1), &key);
    assert_eq!(last.status, 200, "{}", last.text());
    assert_eq!(last.json()["value"], marker.repeat(copies));
    s.get(&format!("/v1/memory/f/w/{fit:03}"), &key)
        .problem(404, "not_found");
    assert!(!v.to_string().contains(SHORT));

    // Positive control: the same number of writes of the same number of
    // raw bytes, as plain text, stays well within the quota.
    let (v, out) = python_lines(
        &s,
        &key,
        &name,
        &program(&format!("\"w\" * {}", SHORT.len() * copies)),
    );
    assert_eq!(
        out,
        [format!("{writes} ok")],
        "plain text of the same size: {v}"
    );
    let last = s.get(&format!("/v1/memory/f/w/{fit:03}"), &key);
    assert_eq!(last.status, 200, "{}", last.text());
    assert_eq!(
        json_len(&last.json()["value"]),
        sent,
        "the control sent as many bytes per write"
    );
}

fn json_len(v: &Value) -> usize {
    v.to_string().len()
}

#[test]
fn handler_output_over_the_cap_after_redaction_is_refused() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let name = long_name();
    s.put_secret(&key, &name, SHORT);
    let marker = format!("[REDACTED:{name}]");
    let cap = 512usize << 10;
    // 3 771 copies of the value and `pad` plain bytes: 15 204 bytes as
    // sent with pad 117, 524 288 (exactly the cap) once redacted.
    let copies = (cap - 2) / marker.len();
    let pad = cap - 2 - copies * marker.len();
    assert_eq!((copies, pad), (3771, 117));
    let code = format!(
        r#"
def handler(ax, input):
    v, _ = ax.secrets.get({name:?})
    return v * {copies} + "w" * input["pad"]
"#
    );
    let run = |pad: usize| {
        s.exec(
            &key,
            json!({"language": "python", "handler": true, "code": code, "secrets": [name],
                   "input": {"pad": pad}, "limits": {"wall_time_ms": 30000}}),
        )
    };
    // Positive control: exactly the cap after redaction is kept.
    let v = run(pad);
    assert_eq!(v["status"], "finished", "{v}");
    assert_eq!(v["result"]["exit_code"], 0, "{v}");
    assert!(v["handler_error"].is_null(), "{v}");
    let want = format!("{}{}", marker.repeat(copies), "w".repeat(pad));
    assert_eq!(json_len(&json!(want)), cap);
    assert_eq!(v["output"], want.as_str(), "output at the cap");
    // One byte more: still 15 205 bytes as sent, one over the cap stored.
    assert!(SHORT.len() * copies + pad + 1 + 2 < cap);
    let v = run(pad + 1);
    assert_eq!(v["status"], "finished", "{v}");
    assert_eq!(v["result"]["exit_code"], 1, "{v}");
    assert!(v["output"].is_null(), "{v}");
    assert_eq!(v["handler_error"]["type"], "OutputTooLarge", "{v}");
    assert_eq!(
        v["handler_error"]["message"],
        format!("handler output exceeds {cap} bytes"),
        "{v}"
    );
    // The runner's report was refused with the broker's code.
    let stderr = v["result"]["stderr"].as_str().unwrap();
    assert!(
        stderr.contains("airlock.AirlockError: too_large: output too large"),
        "{v}"
    );
    assert!(!v.to_string().contains(SHORT));
}
