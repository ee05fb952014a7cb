//! The broker: the sandbox's only channel to the platform. Handlers and the
//! guest SDKs end to end, then hostile programs speaking the raw protocol.

use std::time::Duration;

use serde_json::{Value, json};

use crate::{Server, follow_sse};

/// Raw protocol helpers for hostile python programs (no SDK).
const RAW: &str = r#"
import json, os, struct, sys
FD = int(os.environ["AIRLOCK_BROKER_FD"])
def read_exact(n):
    out = b""
    while len(out) < n:
        try:
            b = os.read(FD, n - len(out))
        except ConnectionResetError:
            # The broker closed the channel with bytes of ours unread
            # (a frame it refused): a close, as the kernel reports it.
            return None
        if not b:
            return None
        out += b
    return out
def frame(obj):
    b = json.dumps(obj).encode()
    return struct.pack("<I", len(b)) + b
def recv():
    h = read_exact(4)
    if h is None:
        return "closed"
    return json.loads(read_exact(struct.unpack("<I", h)[0]))
def call(i, op, **args):
    os.write(FD, frame({"v": 1, "id": i, "op": op, "args": args}))
    return recv()
"#;

#[test]
fn python_handler_uses_logs_secrets_memory_and_everything_is_redacted() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let secret = "pw-7f3e9c1d-canary";
    s.put_secret(&key, "DB_PASSWORD", secret);
    let code = r#"
import sys
def handler(ax, input):
    value, found = ax.secrets.get("DB_PASSWORD")
    ax.log.info("connecting with " + value, user=input["user"], pw=value)
    print("stdout has", value)
    print("stderr has", value, file=sys.stderr)
    n = ax.agent.memory.get("runs", 0) + 1
    ax.agent.memory.put("runs", n)
    return {"runs": n, "found": found, "leak": value, "mode": ax.variables["mode"],
            "from_variables": ax.variables["secrets"]["DB_PASSWORD"], "flow": ax.flow_id,
            "execution": ax.execution_id}
"#;
    let body = json!({"language": "python", "handler": true, "code": code, "flow": "flow-a",
                      "input": {"user": "u1"}, "secrets": ["DB_PASSWORD"],
                      "variables": {"mode": "test"}});
    let v = s.exec(&key, body.clone());
    assert_eq!(v["status"], "finished", "{v}");
    assert_eq!(v["result"]["exit_code"], 0, "{v}");
    let out = &v["output"];
    assert_eq!(out["runs"], 1);
    assert_eq!(out["found"], true);
    assert_eq!(out["mode"], "test");
    assert_eq!(out["flow"], "flow-a");
    assert_eq!(out["execution"], v["id"]);
    // Redacted in output, variables echo, stdout, stderr and logs.
    assert_eq!(out["leak"], "[REDACTED:DB_PASSWORD]");
    assert_eq!(out["from_variables"], "[REDACTED:DB_PASSWORD]");
    assert_eq!(v["result"]["stdout"], "stdout has [REDACTED:DB_PASSWORD]\n");
    assert_eq!(v["result"]["stderr"], "stderr has [REDACTED:DB_PASSWORD]\n");
    let id = v["id"].as_str().unwrap();
    let logs = s.get(&format!("/v1/executions/{id}/logs"), &key).json();
    let log = &logs["logs"][0];
    assert_eq!(log["level"], "info");
    assert_eq!(log["message"], "connecting with [REDACTED:DB_PASSWORD]");
    assert_eq!(log["fields"]["user"], "u1");
    assert_eq!(log["fields"]["pw"], "[REDACTED:DB_PASSWORD]");
    assert_eq!(log["execution_id"], id);
    assert_eq!(log["trace_id"], v["trace_id"]);
    let events = follow_sse(s.addr, &format!("/v1/executions/{id}/events"), &key);
    assert!(
        events.iter().any(|(_, k, _)| k == "log"),
        "{:?}",
        events
            .iter()
            .map(|e| (e.1.clone(), e.2.clone()))
            .collect::<Vec<_>>()
    );
    let everything = format!(
        "{v}{logs}{}{}",
        s.get("/v1/audit?limit=500", &key).text(),
        events.iter().map(|e| e.2.to_string()).collect::<String>()
    );
    assert!(!everything.contains(secret), "secret value leaked");
    // Memory is durable per (tenant, flow): a second run sees the first.
    let v2 = s.exec(&key, body);
    assert_eq!(v2["output"]["runs"], 2);
    let m = s.get("/v1/memory/flow-a/runs", &key).json();
    assert_eq!(
        (m["value"].as_i64(), m["version"].as_i64()),
        (Some(2), Some(2))
    );
    // Every read is audited by name, attributed to the execution.
    let audit = s.get("/v1/audit?limit=500", &key).json();
    let reads: Vec<_> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "secret.read" && e["subject"] == "DB_PASSWORD")
        .collect();
    assert!(reads.len() >= 2, "{reads:?}");
    assert_eq!(reads[0]["actor"], format!("execution:{id}"));
}

#[test]
fn javascript_handlers_commonjs_and_esm() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    s.put_secret(&key, "TOKEN", "tok-5a5a5a5a");
    let cjs = r#"
exports.handler = function (ax, input) {
  const { value, found } = ax.secrets.get('TOKEN');
  ax.log.warn('token ' + value, { n: input.n });
  const v = ax.agent.memory.put('k', { n: input.n });
  return { doubled: input.n * 2, found, value, version: v, exec: ax.execution_id };
};
"#;
    let v = s.exec(&key,
        json!({"language": "javascript", "handler": true, "code": cjs, "input": {"n": 21}, "secrets": ["TOKEN"]}),
    );
    assert_eq!(v["result"]["exit_code"], 0, "{v}");
    assert_eq!(v["output"]["doubled"], 42, "{v}");
    assert_eq!(v["output"]["found"], true);
    assert_eq!(v["output"]["value"], "[REDACTED:TOKEN]");
    assert_eq!(v["output"]["version"], 1);
    let id = v["id"].as_str().unwrap();
    let logs = s.get(&format!("/v1/executions/{id}/logs"), &key).json();
    assert_eq!(logs["logs"][0]["level"], "warn");
    assert_eq!(logs["logs"][0]["message"], "token [REDACTED:TOKEN]");

    let esm = r#"
export async function handler(ax, input) {
  const prev = ax.agent.memory.get('k');
  return { prev, sum: input.a + input.b };
}
"#;
    let v = s.exec(
        &key,
        json!({"language": "javascript", "handler": true, "code": esm, "input": {"a": 1, "b": 2}}),
    );
    assert_eq!(v["output"], json!({"prev": {"n": 21}, "sum": 3}), "{v}");

    // A thrown error is a structured error with the stack.
    let v = s.exec(&key,
        json!({"language": "javascript", "handler": true,
               "code": "module.exports.handler = () => { throw new TypeError('bad input here'); };"}),
    );
    assert_eq!(v["result"]["exit_code"], 1);
    assert_eq!(v["handler_error"]["type"], "TypeError", "{v}");
    assert_eq!(v["handler_error"]["message"], "bad input here");
    assert!(
        v["handler_error"]["traceback"]
            .as_str()
            .unwrap()
            .contains("TypeError")
    );
}

#[test]
fn handler_errors_are_structured() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let v = s.exec(&key,
        json!({"language": "python", "handler": true,
               "code": "def helper(x):\n    raise ValueError(f'no {x}')\n\ndef handler(ax, input):\n    return helper(input)\n",
               "input": "thing"}),
    );
    assert_eq!(v["status"], "finished");
    assert_eq!(v["result"]["exit_code"], 1);
    let e = &v["handler_error"];
    assert_eq!(e["type"], "ValueError", "{v}");
    assert_eq!(e["message"], "no thing");
    let tb = e["traceback"].as_str().unwrap();
    assert!(tb.contains("in helper") && tb.contains("line 2"), "{tb}");
    let v = s.exec(
        &key,
        json!({"language": "python", "handler": true, "code": "x = 1\n"}),
    );
    assert_eq!(v["handler_error"]["type"], "HandlerMissing", "{v}");
    let v = s.exec(&key,
        json!({"language": "python", "handler": true, "code": "def handler(ax, input):\n    return object()\n"}),
    );
    assert_eq!(v["handler_error"]["type"], "NotSerializable", "{v}");
    let v = s.exec(
        &key,
        json!({"language": "python", "handler": true, "code": "def handler(ax, input:\n"}),
    );
    assert_eq!(v["handler_error"]["type"], "LoadError", "{v}");
    assert!(
        v["handler_error"]["traceback"]
            .as_str()
            .unwrap()
            .contains("SyntaxError")
    );
}

#[test]
fn forged_tenant_and_flow_fields_are_ignored_and_audited() {
    let s = Server::start_with(&[]);
    let a = s.tenant("alpha");
    let b = s.tenant("beta");
    // beta's memory, which alpha's code will try to overwrite.
    let r = s.req(
        "PUT",
        "/v1/memory/shared/k",
        Some(&b),
        Some(&json!({"value": "beta's"})),
    );
    assert_eq!(r.status, 200);
    let tenants = crate::admin(&s.data(), &["tenant", "list"]);
    let list = String::from_utf8(tenants.stdout).unwrap();
    let beta_id = list
        .lines()
        .find(|l| l.ends_with("beta"))
        .unwrap()
        .split('\t')
        .next()
        .unwrap();
    let code = format!(
        "{RAW}\nr = call(1, 'memory.put', key='k', value='forged', tenant_id='{beta_id}', flow_id='shared', tenant='{beta_id}', flow='shared')\nprint(json.dumps(r))\nr = call(2, 'hello', tenant_id='{beta_id}')\nprint(json.dumps(r))\n"
    );
    let v = s.exec(
        &a,
        json!({"language": "python", "code": code, "flow": "mine"}),
    );
    let lines: Vec<Value> = v["result"]["stdout"]
        .as_str()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["ok"], true, "{v}");
    assert_eq!(
        lines[1]["result"]["flow_id"], "mine",
        "identity stays the host's"
    );
    assert_ne!(lines[1]["result"]["tenant_id"], beta_id);
    // beta's entry is untouched; the write landed in alpha's own scope.
    assert_eq!(s.get("/v1/memory/shared/k", &b).json()["value"], "beta's");
    assert_eq!(s.get("/v1/memory/mine/k", &a).json()["value"], "forged");
    s.get("/v1/memory/shared/k", &a).problem(404, "not_found");
    // The attempt is in alpha's audit trail, naming the fields.
    let audit = s.get("/v1/audit?limit=500", &a).json();
    let ev = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "broker.identity_ignored")
        .expect("forgery audited");
    assert!(ev["detail"]["fields"].to_string().contains("tenant_id"));
    assert_eq!(
        ev["actor"],
        format!("execution:{}", v["id"].as_str().unwrap())
    );
    assert!(
        !s.get("/v1/audit?limit=500", &b)
            .text()
            .contains("identity_ignored")
    );
}

#[test]
fn secrets_are_scoped_by_tenant_and_policy() {
    let s = Server::start_with(&[]);
    let a = s.tenant("alpha");
    let b = s.tenant("beta");
    s.put_secret(&a, "ALLOWED", "alpha-allowed-1");
    s.put_secret(&a, "NOT_GRANTED", "alpha-not-granted-2");
    s.put_secret(&b, "BETA_ONLY", "beta-only-3");
    let code = format!(
        "{RAW}\nfor i, n in enumerate(['ALLOWED', 'NOT_GRANTED', 'BETA_ONLY'], 1):\n    print(json.dumps(call(i, 'secrets.get', name=n)))\n"
    );
    let v = s.exec(
        &a,
        json!({"language": "python", "code": code, "secrets": ["ALLOWED", "BETA_ONLY"]}),
    );
    let lines: Vec<Value> = v["result"]["stdout"]
        .as_str()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Positive control: the granted secret of the caller's tenant is read.
    assert_eq!(lines[0]["result"]["found"], true, "{v}");
    // Not granted by this execution's policy: refused.
    assert_eq!(lines[1]["ok"], false);
    assert_eq!(lines[1]["error"]["code"], "forbidden");
    // Granted by name, but it is another tenant's: simply not found.
    assert_eq!(lines[2]["result"]["found"], false);
    assert!(!v.to_string().contains("beta-only-3") && !v.to_string().contains("alpha-not-granted"));
    let audit = s.get("/v1/audit?limit=500", &a).text();
    assert!(audit.contains("secret.denied") && audit.contains("NOT_GRANTED"));
}

#[test]
fn hostile_frames_close_only_that_channel() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let cases = [
        (
            "1 GiB length prefix",
            "os.write(FD, struct.pack('<I', 1 << 30))\nprint(recv())",
            "exceeds",
        ),
        (
            "invalid JSON",
            "os.write(FD, struct.pack('<I', 5) + b'{nope')\nprint(recv())",
            "malformed",
        ),
        (
            "unknown envelope field",
            "os.write(FD, frame({'v': 1, 'id': 1, 'op': 'hello', 'args': {}, 'tenant': 'x'}))\nprint(recv())",
            "malformed",
        ),
        (
            "out-of-order id",
            "print(call(5, 'hello')['ok'])\nprint(recv() if os.write(FD, frame({'v': 1, 'id': 5, 'op': 'hello'})) else 0)",
            "out-of-order",
        ),
        (
            "wrong version",
            "os.write(FD, frame({'v': 99, 'id': 1, 'op': 'hello'}))\nprint(recv()['error']['code'])\nprint(recv())",
            "unsupported protocol version",
        ),
        (
            "1 MiB key",
            "print(call(1, 'memory.put', key='k' * (1 << 20), value=1))",
            "exceeds",
        ),
    ];
    for (name, body, want) in cases {
        let v = s.exec(
            &key,
            json!({"language": "python", "code": format!("{RAW}\n{body}\n")}),
        );
        assert_eq!(v["result"]["exit_code"], 0, "{name}: {v}");
        let out = v["result"]["stdout"].as_str().unwrap();
        assert!(
            out.trim_end().ends_with("closed"),
            "{name}: channel not closed: {out}"
        );
        let err = v["broker_error"].as_str().unwrap_or("");
        assert!(err.contains(want), "{name}: broker_error {err:?}");
    }
    // Bad arguments are answered, and the channel stays open.
    let code = format!(
        "{RAW}\nfor i, (op, a) in enumerate([('memory.put', {{'key': '../etc/passwd', 'value': 1}}), ('memory.put', {{'key': 'a\\x00b', 'value': 1}}), ('memory.get', {{'key': 'k' * 300}}), ('nope', {{}}), ('log', {{'level': 'loud', 'message': 'x'}}), ('memory.put', {{'key': '%2e%2e/x', 'value': 'literal'}})], 1):\n    print(json.dumps(call(i, op, **a)))\n"
    );
    let v = s.exec(
        &key,
        json!({"language": "python", "code": code, "flow": "f"}),
    );
    let lines: Vec<Value> = v["result"]["stdout"]
        .as_str()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let codes: Vec<&str> = lines[..5]
        .iter()
        .map(|l| l["error"]["code"].as_str().unwrap_or("ok"))
        .collect();
    assert_eq!(
        codes,
        [
            "invalid_key",
            "invalid_key",
            "invalid_key",
            "unknown_op",
            "invalid_args"
        ],
        "{v}"
    );
    assert_eq!(
        lines[5]["ok"], true,
        "a %-encoded key is a literal, never decoded"
    );
    assert!(v["broker_error"].is_null());
    let lit = s.get("/v1/memory/f/%252e%252e%2Fx", &key);
    assert_eq!(lit.json()["value"], "literal", "{}", lit.text());
    // The server is unaffected.
    assert_eq!(
        s.run(&key, "shell", "echo fine")["result"]["stdout"],
        "fine\n"
    );
}

#[test]
fn the_channel_is_private_single_and_drops_passed_descriptors() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    // A long-running execution holding its own channel.
    let other = s.post(
        "/v1/executions",
        &key,
        json!({"language": "python", "wait": false, "code": "import time\ntime.sleep(5)"}),
    );
    let other_id = other.json()["id"].as_str().unwrap().to_string();
    s.wait_status(&key, &other_id, &["running"]);
    let code = format!(
        r#"{RAW}
import array, socket, glob
# Every socket any process in this sandbox can see.
socks = set()
for p in glob.glob('/proc/[0-9]*/fd/*'):
    try:
        t = os.readlink(p)
    except OSError:
        continue
    if t.startswith('socket:'):
        socks.add(t)
print(json.dumps(sorted(socks)))
# No socket files anywhere reachable.
import stat
found = []
for root in ('/tmp', '/workspace', '/run', '/var', '/opt', '/dev'):
    for dp, dn, fn in os.walk(root):
        for f in fn:
            try:
                if stat.S_ISSOCK(os.lstat(os.path.join(dp, f)).st_mode):
                    found.append(os.path.join(dp, f))
            except OSError:
                pass
print(json.dumps(found))
# Thousands of duplicates are still one channel with one sequence of ids.
dups = [os.dup(FD) for _ in range(200)]
ok = 0
for i in range(1, 2001):
    fd = dups[i % len(dups)]
    os.write(fd, frame({{"v": 1, "id": i, "op": "memory.get", "args": {{"key": "x"}}}}))
    r = recv()
    ok += r["ok"]
print(ok)
# A descriptor passed with SCM_RIGHTS is discarded by the broker.
probe = os.memfd_create("airlock-scm-probe")
sock = socket.socket(fileno=os.dup(FD))
msg = frame({{"v": 1, "id": 5000, "op": "hello", "args": {{}}}})
sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [probe]))])
print(recv()["ok"])
"#
    );
    let v = s.exec(
        &key,
        json!({"language": "python", "code": code, "limits": {"open_files": 512}}),
    );
    let out: Vec<&str> = v["result"]["stdout"].as_str().unwrap().lines().collect();
    assert_eq!(out.len(), 4, "{v}");
    let socks: Vec<String> = serde_json::from_str(out[0]).unwrap();
    assert_eq!(
        socks.len(),
        1,
        "exactly one socket visible (its own channel): {socks:?}"
    );
    assert_eq!(out[1], "[]", "no socket files");
    assert_eq!(out[2], "2000");
    assert_eq!(out[3], "True");
    // The passed descriptor did not land in the server.
    for e in std::fs::read_dir(format!("/proc/{}/fd", s.pid()))
        .unwrap()
        .flatten()
    {
        let t = std::fs::read_link(e.path())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        assert!(
            !t.contains("airlock-scm-probe"),
            "server holds the sandbox's fd: {t}"
        );
    }
    // The other execution was unaffected.
    let o = s.wait_status(&key, &other_id, &["finished"]);
    assert_eq!(o["reason"], "exited");
    assert!(o["broker_error"].is_null());
}

#[test]
fn compare_and_set_races_between_two_executions() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let code = r#"
import airlock
ax = airlock.connect()
m = ax.agent.memory
done = retries = 0
while done < 40:
    value, version = m.get_versioned("counter")
    ok, _ = m.cas("counter", version, (value or 0) + 1)
    if ok:
        done += 1
    else:
        retries += 1
print(retries)
"#;
    let ids: Vec<String> = (0..2)
        .map(|_| {
            let r = s.post(
                "/v1/executions",
                &key,
                json!({"language": "python", "wait": false, "code": code, "flow": "race",
                       "limits": {"wall_time_ms": 30000}}),
            );
            r.json()["id"].as_str().unwrap().to_string()
        })
        .collect();
    let mut retries = 0;
    for id in &ids {
        let v = s.wait_status(&key, id, &["finished"]);
        assert_eq!(v["result"]["exit_code"], 0, "{v}");
        retries += v["result"]["stdout"]
            .as_str()
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap();
    }
    let m = s.get("/v1/memory/race/counter", &key).json();
    assert_eq!(m["value"], 80, "no increment lost ({retries} retries)");
    assert_eq!(m["version"], 80);
    // CAS through the API too: a stale version is refused.
    let r = s.req(
        "PUT",
        "/v1/memory/race/counter",
        Some(&key),
        Some(&json!({"value": 0, "expected_version": 79})),
    );
    r.problem(409, "version_conflict");
    std::thread::sleep(Duration::from_millis(1));
}

#[test]
fn log_quota_and_memory_quotas_hold() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let code = r#"
import airlock, time
ax = airlock.connect()
def burst(n, msg):
    done = 0
    try:
        for i in range(n):
            ax.log.debug(msg)
            done += 1
    except airlock.AirlockError as e:
        return "%d %s" % (done, e.code)
    return "%d ok" % done
print(burst(1000, "x"))           # rate: 200 per second
time.sleep(1.1)
print(burst(300, "y" * 8192))     # bytes: 1 MiB per execution
try:
    ax.agent.memory.put("big", "x" * (70 << 10))
except airlock.AirlockError as e:
    print(e.code)
"#;
    let v = s.exec(
        &key,
        json!({"language": "python", "code": code, "limits": {"wall_time_ms": 20000}}),
    );
    let out: Vec<&str> = v["result"]["stdout"].as_str().unwrap().lines().collect();
    assert_eq!(out.len(), 3, "{v}");
    // 200 per second: on a slow machine the window may roll over once
    // during the burst, never more often than that.
    let (n1, why1) = out[0].split_once(' ').unwrap();
    let n1: u64 = n1.parse().unwrap();
    assert_eq!(why1, "rate_limited", "{v}");
    assert!(
        (200..=400).contains(&n1),
        "{n1} records passed the rate limit"
    );
    // 1 MiB of log text per execution.
    let (n2, why2) = out[1].split_once(' ').unwrap();
    let n2: u64 = n2.parse().unwrap();
    assert_eq!(why2, "quota_exceeded", "{v}");
    assert_eq!(n2, ((1u64 << 20) - n1) / (8192 + 2), "{v}");
    assert_eq!(out[2], "too_large");
    let id = v["id"].as_str().unwrap();
    let logs = s
        .get(&format!("/v1/executions/{id}/logs?limit=1000"), &key)
        .json();
    assert_eq!(logs["logs"].as_array().unwrap().len() as u64, n1 + n2);
}

#[test]
fn secret_values_never_escape_through_side_channels() {
    let s = Server::start_with(&[]);
    let key = s.tenant("acme");
    let secret = "sv-91b2c3d4e5-canary";
    s.put_secret(&key, "S", secret);
    // Stream: the value is printed while a client follows the live stream,
    // split across two writes.
    let code = format!(
        r#"{RAW}
import time
v = call(1, "secrets.get", name="S")["result"]["value"]
time.sleep(0.3)
sys.stdout.write("a:" + v[:7]); sys.stdout.flush()
time.sleep(0.3)
sys.stdout.write(v[7:] + "\n"); sys.stdout.flush()
print(json.dumps(call(2, "memory.put", key="copy", value={{"k": v}})))
print(json.dumps(call(3, "secrets.get", name=v)))
print(json.dumps(call(4, v, tenant_id="x")))
sys.stdout.flush()
time.sleep(0.3)
# Last: a malformed frame that quotes the value in serde's error text.
os.write(FD, frame({{"v": 1, "id": 9, "op": "hello", v: 1}}))
print(recv())
"#
    );
    let r = s.post(
        "/v1/executions",
        &key,
        json!({"language": "python", "code": code, "wait": false, "secrets": ["S"], "flow": "f"}),
    );
    let id = r.json()["id"].as_str().unwrap().to_string();
    let events = follow_sse(s.addr, &format!("/v1/executions/{id}/events"), &key);
    let live: String = events.iter().map(|e| e.2.to_string()).collect();
    assert!(live.contains("a:[REDACTED:S]"), "{live}");
    let rec = s.get(&format!("/v1/executions/{id}"), &key).text();
    assert!(rec.contains("broker_error"), "{rec}");
    let memory = s.get("/v1/memory/f/copy", &key).text();
    assert!(memory.contains("[REDACTED:S]"), "{memory}");
    let audit = s.get("/v1/audit?limit=500", &key).text();
    let logs = s.get(&format!("/v1/executions/{id}/logs"), &key).text();
    for (what, text) in [
        ("live stream", &live),
        ("record", &rec),
        ("memory", &memory),
        ("audit", &audit),
        ("logs", &logs),
    ] {
        assert!(!text.contains(secret), "secret value in {what}: {text}");
    }
    assert!(!s.log().contains(secret), "secret value in the server log");
    // Positive control: the program did get the value (it printed it,
    // redacted) and the malformed frame did close the channel.
    let v: Value = serde_json::from_str(&rec).unwrap();
    assert!(
        v["result"]["stdout"]
            .as_str()
            .unwrap()
            .ends_with("closed\n"),
        "{v}"
    );
    assert!(
        v["broker_error"]
            .as_str()
            .unwrap()
            .starts_with("malformed frame")
    );
}
