//! The OpenAPI document as this server answers: generated from the
//! handlers (`api::ApiDoc`), then completed with what the code enforces
//! but attributes cannot say, from this server's own configuration:
//!
//! - every error is `application/problem+json` with the `Problem` schema;
//! - the statuses every route can answer (the HTTP layer's 400, 500; 401
//!   and 429 where a key is needed; 408, 413, 415 where a body is read);
//! - path and query parameters with the alphabets and ranges checked;
//! - request bodies closed to unknown fields, with the languages, the
//!   server's limit ceilings, the egress grant and the rules that tie fields
//!   together (`input` only with `handler`, handlers not in shell).
//! - the events of `/v1/executions/{id}/events` (text/event-stream): each
//!   event's `event:` name and the JSON schema of its `data:` line.
//!
//! A request the document calls valid is accepted (or fails only for what
//! no schema can know: a missing resource, a full queue, a missing runtime);
//! CI checks this with schemathesis against a real server.

use airlock_policy::IsolationLevel;
use serde_json::{Value, json};
use utoipa::OpenApi;

use crate::ServerConfig;
use crate::api::ApiDoc;

const PROBLEM: &str = "#/components/schemas/Problem";

/// Secret names.
pub const SECRET_NAME: &str = "^[A-Za-z_][A-Za-z0-9_.-]{0,127}$";
/// Flow ids (1..=128 of `[A-Za-z0-9_.-]`, not `.` or `..`).
pub const FLOW_ID: &str = r"^(?!\.\.?$)[A-Za-z0-9_.-]{1,128}$";
/// Memory keys: no control characters, no leading `/`, no `.` or `..`
/// segment; at most 256 bytes (64 characters are always within that).
pub const MEMORY_KEY: &str =
    r"^(?!/)(?!\.\.?(/|$))(?!.*/\.\.?(/|$))[^\u0000-\u001f\u007f-\u009f]{1,64}$";
/// Execution ids.
pub const EXECUTION_ID: &str = "^ex_[0-9a-f]{32}$";
/// Audit record hashes.
pub const AUDIT_HASH: &str = "^[0-9a-f]{64}$";
/// A path inside a workspace naming a file or directory: no NUL, no `..`
/// segment, at least one name (`""` and `.` segments are dropped), names
/// of at most 255 and paths of at most 1024 (bytes, which the server
/// checks; characters here).
pub const WORKSPACE_PATH: &str = concat!(
    r"^(?!(.*/)?\.\.(/|$))(?!(\.?/)*\.?$)(?!.*[^/]{256})",
    r"[^\u0000]{1,1024}$"
);
/// A path a file is written to: also not named `.airlock-upload-*` (the
/// names uploads are written under before they replace the file).
pub const WORKSPACE_FILE: &str = concat!(
    r"^(?!(.*/)?\.\.(/|$))(?!(\.?/)*\.?$)(?!.*[^/]{256})",
    r"(?!(.*/)?\.airlock-upload-[^/]*(/\.?)*$)[^\u0000]{1,1024}$"
);
/// A directory of a workspace: as [`WORKSPACE_PATH`], or no name at all
/// (the workspace itself).
pub const WORKSPACE_DIR: &str = concat!(
    r"^(?!(.*/)?\.\.(/|$))(?!.*[^/]{256})",
    r"[^\u0000]{0,1024}$"
);

fn problem(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": PROBLEM}}},
    })
}

fn default_description(status: &str) -> &'static str {
    match status {
        "400" => {
            "malformed request, invalid field or parameter (invalid_request, invalid_json, json_too_deep, malformed_request)"
        }
        "401" => "missing, malformed, unknown or revoked API key (unauthorized)",
        "403" => "the sandbox's user may not do this (permission_denied)",
        "404" => {
            "no such resource for this tenant (not_found), or no such file in the workspace (file_not_found)"
        }
        "408" => "the request body did not arrive in time (request_timeout)",
        "409" => {
            "conflict (not_cancellable, version_conflict, session_ended, wrong_type, directory_not_empty, file_busy)"
        }
        "413" => "request body too large (payload_too_large)",
        "414" => "request target too long (uri_too_long)",
        "415" => "the body must be application/json (unsupported_media_type)",
        "422" => {
            "denied by policy or quota, no runtime or isolation, or a file too large to hand out (policy_denied, quota_exceeded, runtime_unavailable, isolation_unavailable, file_too_large)"
        }
        "429" => {
            "too many failed authentications, requests in flight, queued executions or open sessions (auth_throttled, too_many_requests, queue_full, tenant_queue_full, too_many_sessions)"
        }
        "431" => "request headers too large (headers_too_large)",
        "500" => "internal error; the request id names it in the server log (internal)",
        "501" => "this server cannot hold sessions (sessions_unavailable)",
        "503" => {
            "the server is shutting down, or the node running this does not answer (shutting_down, node_unreachable)"
        }
        "507" => "the workspace's byte or file quota is used up; nothing changed (workspace_full)",
        _ => "error",
    }
}

/// The document this server serves at `/openapi.json`.
/// `offered`: the backends this server runs, as (name, level, whether it
/// holds sessions).
pub fn document(cfg: &ServerConfig, offered: &[(&str, IsolationLevel, bool)]) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_else(|_| json!({}));
    complete_responses(&mut doc);
    constrain_parameters(&mut doc);
    constrain_bodies(&mut doc, cfg);
    let all: Vec<(&str, IsolationLevel)> = offered.iter().map(|(n, l, _)| (*n, *l)).collect();
    let holders: Vec<(&str, IsolationLevel)> = offered
        .iter()
        .filter(|b| b.2)
        .map(|(n, l, _)| (*n, *l))
        .collect();
    constrain_isolation(&mut doc, "CreateExecution", &all);
    constrain_isolation(&mut doc, "CreateSession", &holders);
    describe_events(&mut doc);
    describe_metrics(&mut doc);
    doc
}

/// `/metrics` answers in either format, as `Accept` prefers
/// (`metrics::Format::negotiate`).
fn describe_metrics(doc: &mut Value) {
    if let Some(ok) = doc.pointer_mut("/paths/~1metrics/get/responses/200") {
        let text = json!({"schema": {"type": "string"}});
        ok["description"] = json!(
            "The Prometheus text format 0.0.4, or OpenMetrics 1.0.0 when Accept prefers \
             application/openmetrics-text (q-values weighed; no preference: the text format)."
        );
        ok["content"] = json!({"text/plain": text, "application/openmetrics-text": text});
    }
}

/// The path whose 200 answer is the stream of [`execution_events`].
const EVENTS_PATH: &str = "/v1/executions/{id}/events";

/// Every event `GET /v1/executions/{id}/events` sends, as (the `event:`
/// name, its component schema's name, what it is, the schema of the JSON
/// in its `data:` line). The stream sends `started` once the sandbox
/// starts, `stdout`, `stderr` and `log` as they happen, and `finished`
/// last; a replay of a finished execution sends the same events from the
/// record (`started`, every `log`, the whole `stdout` and `stderr`, then
/// `finished`). Each event's `id:` is its position in the stream, from 0.
pub fn execution_events() -> [(&'static str, &'static str, &'static str, Value); 5] {
    let record = |name: &str| json!({"$ref": format!("#/components/schemas/{name}")});
    [
        (
            "started",
            "StartedEvent",
            "The sandbox started: the execution's clocks run from `started_at_ms`.",
            json!({"type": "object", "additionalProperties": false,
                "required": ["id", "started_at_ms"],
                "properties": {
                    "id": {"type": "string", "pattern": EXECUTION_ID, "description": "Execution id."},
                    "started_at_ms": {"type": "integer", "description": "Unix time in milliseconds."}}}),
        ),
        (
            "stdout",
            "StdoutEvent",
            "Program output on stdout, redacted, in chunks of any size (a replay sends it whole).",
            json!({"type": "object", "additionalProperties": false, "required": ["data"],
                "properties": {"data": {"type": "string", "description": "UTF-8 text."}}}),
        ),
        (
            "stderr",
            "StderrEvent",
            "Program output on stderr, as `stdout`.",
            json!({"type": "object", "additionalProperties": false, "required": ["data"],
                "properties": {"data": {"type": "string", "description": "UTF-8 text."}}}),
        ),
        (
            "log",
            "LogEvent",
            "A record the handler wrote with `ax.log` (as `GET /v1/executions/{id}/logs` lists it).",
            json!({"type": "object", "additionalProperties": false,
                "required": ["seq", "level", "message", "fields", "execution_id", "tenant_id", "trace_id"],
                "properties": {
                    "seq": {"type": "integer", "minimum": 1, "description": "Order within the execution, from 1."},
                    "level": {"enum": ["debug", "info", "warn", "error"]},
                    "message": {"type": "string"},
                    "fields": {"type": "object", "description": "Structured fields."},
                    "execution_id": {"type": "string", "pattern": EXECUTION_ID},
                    "tenant_id": {"type": "string"},
                    "trace_id": {"type": "string", "description": "W3C trace id."}}}),
        ),
        (
            "finished",
            "FinishedEvent",
            "The execution ended: its record, as `GET /v1/executions/{id}` answers (only id, \
             status and reason when the record could not be read back). Always the last event.",
            json!({"anyOf": [
                record("ExecutionView"),
                {"type": "object", "required": ["id", "status", "reason"],
                 "properties": {"id": {"type": "string", "pattern": EXECUTION_ID},
                                "status": {"enum": ["finished", "failed"]},
                                "reason": {"type": "string"}}}]}),
        ),
    ]
}

/// Names every event of the execution stream and the shape of its data:
/// one component per event (an SSE event as an object: `event` the name,
/// `id` its position, `data` a string holding JSON of `contentSchema`),
/// `ExecutionEvent` the one of them each event is, as the stream's schema.
fn describe_events(doc: &mut Value) {
    let events = execution_events();
    let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let mut mapping = serde_json::Map::new();
    for (name, component, description, data) in &events {
        let r = format!("#/components/schemas/{component}");
        schemas.insert(
            (*component).to_string(),
            json!({"type": "object", "description": description,
                "required": ["event", "id", "data"],
                "properties": {
                    "event": {"const": name},
                    "id": {"type": "string", "pattern": "^[0-9]+$",
                           "description": "Position in the stream, from 0."},
                    "data": {"type": "string", "contentMediaType": "application/json",
                             "contentSchema": data}}}),
        );
        mapping.insert((*name).to_string(), json!(r));
    }
    let names: Vec<&str> = events.iter().map(|e| e.0).collect();
    schemas.insert(
        "ExecutionEvent".into(),
        json!({"description": format!(
                "One Server-Sent Event of an execution's stream: `event:` names it ({}), \
                 `data:` is one line of JSON. Comment lines (`:`) keep an idle stream alive.",
                names.join(", ")),
            "oneOf": mapping.values().map(|r| json!({"$ref": r})).collect::<Vec<_>>(),
            "discriminator": {"propertyName": "event", "mapping": mapping}}),
    );
    let pointer = format!(
        "/paths/{}/get/responses/200",
        EVENTS_PATH.replace('~', "~0").replace('/', "~1")
    );
    if let Some(ok) = doc.pointer_mut(&pointer) {
        ok["description"] = json!(format!(
            "The execution's events as Server-Sent Events (each one an ExecutionEvent): {}",
            names.join(", ")
        ));
        ok["content"] = json!({"text/event-stream": {"schema":
            {"$ref": "#/components/schemas/ExecutionEvent"}}});
    }
}

/// A request may name only offered backends, and only levels some offered
/// backend meets (a named backend: levels it meets itself).
fn constrain_isolation(doc: &mut Value, name: &str, offered: &[(&str, IsolationLevel)]) {
    let Some(s) = schema(doc, name) else {
        return;
    };
    let up_to = |max: IsolationLevel| -> Vec<&str> {
        IsolationLevel::ALL
            .into_iter()
            .filter(|l| *l <= max)
            .map(IsolationLevel::as_str)
            .collect()
    };
    let strongest = offered
        .iter()
        .map(|(_, l)| *l)
        .max()
        .unwrap_or(IsolationLevel::Container);
    let names: Vec<&str> = offered.iter().map(|(n, _)| *n).collect();
    s["properties"]["backend"] = json!({"type": ["string", "null"], "enum": names,
        "description": "One backend by name, among those this server offers."});
    s["properties"]["isolation"] = json!({"anyOf": [{"type": "null"}, {"enum": up_to(strongest)}],
        "description": "The weakest isolation the code may run behind, among the levels this server's backends meet."});
    let rules: Vec<Value> = offered
        .iter()
        .map(|(name, level)| {
            json!({"if": {"required": ["backend"], "properties": {"backend": {"const": name}}},
                   "then": {"properties": {"isolation": {"anyOf": [{"type": "null"}, {"enum": up_to(*level)}]}}}})
        })
        .collect();
    if let Some(all) = s.get_mut("allOf").and_then(Value::as_array_mut) {
        all.extend(rules);
    } else {
        s["allOf"] = Value::Array(rules);
    }
}

fn operations(doc: &mut Value) -> Vec<(String, &mut Value)> {
    let mut out = Vec::new();
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, item) in paths.iter_mut() {
            if let Some(item) = item.as_object_mut() {
                for (_, op) in item.iter_mut() {
                    out.push((path.clone(), op));
                }
            }
        }
    }
    out
}

fn complete_responses(doc: &mut Value) {
    for (_, op) in operations(doc) {
        let secured = op.get("security").is_some();
        let body = op.get("requestBody").is_some();
        let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
            continue;
        };
        // Errors declared with the Problem schema: their media type.
        for (status, r) in responses.iter_mut() {
            let is_problem = r
                .pointer("/content/application~1json/schema/$ref")
                .and_then(Value::as_str)
                == Some(PROBLEM);
            if is_problem {
                let description = r
                    .get("description")
                    .and_then(Value::as_str)
                    .filter(|d| !d.is_empty())
                    .map_or_else(|| default_description(status).to_string(), str::to_string);
                *r = problem(&description);
            }
        }
        let mut add = |status: &str| {
            responses
                .entry(status.to_string())
                .or_insert_with(|| problem(default_description(status)));
        };
        // The HTTP layer's own answers, and internal errors, on any route.
        for s in ["400", "414", "431", "500"] {
            add(s);
        }
        if secured {
            add("401");
            add("429");
        }
        if body {
            for s in ["408", "413", "415"] {
                add(s);
            }
        }
    }
}

fn set_param(op: &mut Value, name: &str, schema: Value) {
    if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
        for p in params {
            if p["name"] == name {
                p["schema"] = schema.clone();
            }
        }
    }
}

fn constrain_parameters(doc: &mut Value) {
    let int = |min: i64, max: i64| json!({"type": "integer", "minimum": min, "maximum": max});
    let pattern = |p: &str| json!({"type": "string", "pattern": p});
    for (path, op) in operations(doc) {
        match path.as_str() {
            "/v1/executions" => {
                set_param(op, "limit", int(1, 100));
                set_param(op, "cursor", pattern(EXECUTION_ID));
            }
            "/v1/audit" => {
                set_param(op, "limit", int(1, 500));
                set_param(op, "after", pattern(AUDIT_HASH));
            }
            "/v1/executions/{id}/logs" => {
                set_param(op, "limit", int(1, 1000));
                set_param(op, "after", int(0, i64::MAX));
            }
            "/v1/memory/{flow}" => {
                set_param(op, "flow", pattern(FLOW_ID));
                set_param(op, "limit", int(1, 1000));
                set_param(
                    op,
                    "prefix",
                    pattern(r"^[^\u0000-\u001f\u007f-\u009f]{0,64}$"),
                );
            }
            "/v1/memory/{flow}/{key}" => {
                set_param(op, "flow", pattern(FLOW_ID));
                set_param(op, "key", pattern(MEMORY_KEY));
            }
            "/v1/secrets/{name}" => set_param(op, "name", pattern(SECRET_NAME)),
            "/v1/sessions" => set_param(op, "limit", int(1, 100)),
            "/v1/sessions/{id}" | "/v1/sessions/{id}/exec" => {
                set_param(op, "id", pattern(crate::sessions::SESSION_ID));
            }
            "/v1/sessions/{id}/snapshots" => {
                set_param(op, "id", pattern(crate::sessions::SESSION_ID));
                set_param(op, "limit", int(1, 1000));
            }
            "/v1/sessions/{id}/evidence" => {
                set_param(op, "id", pattern(crate::sessions::SESSION_ID));
            }
            "/v1/executions/{id}/evidence" => set_param(op, "id", pattern(EXECUTION_ID)),
            "/v1/snapshots/{id}" | "/v1/snapshots/{id}/tar" => {
                set_param(op, "id", pattern(crate::snapshots::SNAPSHOT_ID));
            }
            "/v1/snapshots/{id}/diff" => {
                set_param(op, "id", pattern(crate::snapshots::SNAPSHOT_ID));
                set_param(op, "against", pattern(crate::snapshots::SNAPSHOT_ID));
            }
            "/v1/sessions/{id}/executions" => {
                set_param(op, "id", pattern(crate::sessions::SESSION_ID));
                set_param(op, "limit", int(1, 100));
            }
            "/v1/sessions/{id}/files" | "/v1/sessions/{id}/stat" => {
                set_param(op, "id", pattern(crate::sessions::SESSION_ID));
                set_param(op, "path", pattern(WORKSPACE_DIR));
            }
            "/v1/sessions/{id}/files/{path}" => {
                set_param(op, "id", pattern(crate::sessions::SESSION_ID));
                let writes = op.get("requestBody").is_some();
                set_param(
                    op,
                    "path",
                    pattern(if writes {
                        WORKSPACE_FILE
                    } else {
                        WORKSPACE_PATH
                    }),
                );
                set_param(op, "mode", pattern("^0?[0-7]{1,3}$"));
                if writes {
                    // An empty body is an empty file.
                    op["requestBody"]["required"] = json!(false);
                }
            }
            _ => {}
        }
    }
}

fn schema<'a>(doc: &'a mut Value, name: &str) -> Option<&'a mut Value> {
    doc.pointer_mut(&format!("/components/schemas/{name}"))
}

fn constrain_bodies(doc: &mut Value, cfg: &ServerConfig) {
    // Every request type rejects unknown fields.
    for name in [
        "CreateExecution",
        "LimitsRequest",
        "NetworkRequest",
        "PutSecret",
        "PutMemory",
        "CreateSession",
        "SessionExec",
    ] {
        if let Some(s) = schema(doc, name) {
            s["additionalProperties"] = json!(false);
        }
    }
    let limits = &cfg.policy.limits;
    let c = &cfg.ceilings;
    if let Some(s) = schema(doc, "CreateExecution") {
        let p = &mut s["properties"];
        p["language"]["enum"] = json!(["python", "javascript", "shell"]);
        // Bytes are checked (for ASCII text, characters).
        p["code"]["maxLength"] = json!(limits.code_bytes);
        p["code"]["description"] = json!(format!(
            "Source code, at most {} bytes of UTF-8.",
            limits.code_bytes
        ));
        p["stdin"]["maxLength"] = json!(limits.stdin_bytes);
        p["flow"]["pattern"] = json!(FLOW_ID);
        p["secrets"]["maxItems"] = json!(64);
        p["secrets"]["items"]["pattern"] = json!(SECRET_NAME);
        p["variables"]["maxProperties"] = json!(256);
        p["variables"]["propertyNames"] = json!({"not": {"const": "secrets"}});
        p["env"] = env_schema(cfg);
        // The fewest tasks and open files a sandbox starts with, by
        // language, one task more with egress (engine::check_runnable).
        let starts = |pids: u64, files: u64| {
            json!({"properties": {"limits": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
                "pids": {"minimum": pids}, "open_files": {"minimum": files}}}]}}})
        };
        let js =
            json!({"required": ["language"], "properties": {"language": {"const": "javascript"}}});
        let egress = json!({"required": ["network"], "properties": {"network": {"type": "object",
            "anyOf": [{"required": ["allow"], "properties": {"allow": {"minItems": 1}}},
                      {"required": ["allow_private"], "properties": {"allow_private": {"minItems": 1}}}]}}});
        s["allOf"] = json!([
            // `input` is for handlers.
            {"if": {"required": ["input"], "properties": {"input": {"not": {"type": "null"}}}},
             "then": {"required": ["handler"], "properties": {"handler": {"const": true}}}},
            // Handlers are python or javascript.
            {"if": {"required": ["handler"], "properties": {"handler": {"const": true}}},
             "then": {"properties": {"language": {"enum": ["python", "javascript"]}}}},
            {"if": {"allOf": [js, egress]}, "then": starts(10, 20),
             "else": {"if": js, "then": starts(9, 20),
                      "else": {"if": egress, "then": starts(4, 16), "else": starts(3, 16)}}},
        ]);
    }
    let sc = &cfg.sessions;
    if let Some(s) = schema(doc, "CreateSession") {
        let p = &mut s["properties"];
        p["language"]["enum"] = json!(["python", "javascript", "shell", null]);
        let range = |p: &mut Value, k: &str, min: u64, max: u64| {
            p[k]["minimum"] = json!(min);
            p[k]["maximum"] = json!(max);
        };
        range(p, "workspace_mib", 1, sc.max_workspace_mib);
        range(p, "workspace_files", 16, sc.max_workspace_files);
        range(p, "idle_timeout_secs", 1, sc.max_idle_timeout_secs);
        range(p, "lifetime_secs", 1, sc.max_lifetime_secs);
        p["from_snapshot"]["pattern"] = json!(crate::snapshots::SNAPSHOT_ID);
        // Sessions start javascript sandboxes too: the per-language
        // minimums of tasks and files hold for their limits.
        s["allOf"] = json!([
            {"if": {"required": ["language"], "properties": {"language": {"const": "javascript"}}},
             "then": {"properties": {"limits": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
                 "pids": {"minimum": 9}, "open_files": {"minimum": 20}}}]}}}}
        ]);
    }
    if let Some(s) = schema(doc, "SessionExec") {
        let p = &mut s["properties"];
        p["language"]["enum"] = json!(["python", "javascript", "shell", null]);
        p["code"]["maxLength"] = json!(limits.code_bytes);
        p["stdin"]["maxLength"] = json!(limits.stdin_bytes);
        p["flow"]["pattern"] = json!(FLOW_ID);
        p["secrets"]["maxItems"] = json!(64);
        p["secrets"]["items"]["pattern"] = json!(SECRET_NAME);
        p["variables"]["maxProperties"] = json!(256);
        p["variables"]["propertyNames"] = json!({"not": {"const": "secrets"}});
        p["argv"]["minItems"] = json!(1);
        p["argv"]["maxItems"] = json!(4096);
        p["env"] = env_schema(cfg);
        s["allOf"] = json!([
            // Exactly one of code and argv.
            {"oneOf": [
                {"required": ["code"], "properties": {"code": {"type": "string"},
                    "argv": {"type": "null"}}},
                {"required": ["argv"], "properties": {"argv": {"type": "array"},
                    "code": {"type": "null"}, "handler": {"const": false},
                    "language": {"enum": ["shell", null]}}}]},
            {"if": {"required": ["input"], "properties": {"input": {"not": {"type": "null"}}}},
             "then": {"required": ["handler"], "properties": {"handler": {"const": true}}}},
            {"if": {"required": ["handler"], "properties": {"handler": {"const": true}}},
             "then": {"required": ["language"],
                      "properties": {"language": {"enum": ["python", "javascript"]}}}},
        ]);
        p_argv_items(s);
    }
    if let Some(s) = schema(doc, "LimitsRequest") {
        let p = &mut s["properties"];
        // The smallest values a sandbox of some language starts with; the
        // rule per language is in CreateExecution's allOf.
        let range = |p: &mut Value, k: &str, min: u64, max: u64| {
            p[k]["minimum"] = json!(min);
            p[k]["maximum"] = json!(max.max(min));
        };
        range(p, "wall_time_ms", 1, c.wall_time_ms);
        range(p, "cpu_time_ms", 1, c.cpu_time_ms);
        // The largest code accepted is held in the sandbox's memory.
        range(p, "memory_mib", limits.min_memory_mib(), c.memory_mib);
        range(p, "pids", 3, c.pids);
        range(p, "stdout_bytes", 0, c.stdout_bytes);
        range(p, "stderr_bytes", 0, c.stderr_bytes);
        range(p, "open_files", 16, c.open_files);
        p["cpus"]["minimum"] = json!(0.01);
        p["cpus"]["maximum"] = json!(c.cpus);
        p["pids"]["description"] = json!(
            "Tasks, at least 3 (node: 9), one more with egress; at most the server's ceiling."
        );
    }
    if let Some(s) = schema(doc, "NetworkRequest") {
        for (field, grant) in [
            ("allow", &cfg.egress.allow),
            ("allow_private", &cfg.egress.allow_private),
        ] {
            s["properties"][field]["items"] = grant_items(grant);
            if grant.is_empty() {
                s["properties"][field]["maxItems"] = json!(0);
            }
        }
    }
    if let Some(s) = schema(doc, "PutSecret") {
        s["properties"]["value"]["maxLength"] = json!(64 << 10);
    }
    if let Some(s) = schema(doc, "PutMemory") {
        s["properties"]["expected_version"]["minimum"] = json!(0);
    }
}

/// `env` of a request: names a program may be given (the policy's deny
/// list of loader and interpreter-injection variables excluded), values
/// without NUL.
fn env_schema(cfg: &ServerConfig) -> Value {
    let room = airlock_policy::ceilings::ENV_VARS.saturating_sub(cfg.policy.env.vars.len());
    json!({"type": "object", "maxProperties": room,
        "description": "Environment variables added to the program's.",
        "propertyNames": {"pattern": "^(?!LD_)[A-Za-z_][A-Za-z0-9_]{0,127}$",
            "not": {"enum": ["GCONV_PATH", "PYTHONSTARTUP", "PYTHONPATH", "PYTHONHOME",
                "PYTHONINSPECT", "PYTHONBREAKPOINT", "NODE_OPTIONS", "NODE_PATH",
                "NODE_REPL_EXTERNAL_MODULE", "BASH_ENV", "ENV", "IFS", "PATH", "HOME"]}},
        "additionalProperties": {"type": "string",
            "maxLength": airlock_policy::ceilings::ENV_VALUE_BYTES, "pattern": "^[^\\u0000]*$"}})
}

/// `argv`'s words: no NUL, the first one not empty.
fn p_argv_items(s: &mut Value) {
    s["properties"]["argv"]["items"] = json!({"type": "string", "pattern": "^[^\\u0000]*$"});
    s["properties"]["argv"]["prefixItems"] = json!([{"type": "string", "minLength": 1}]);
}

/// The rules a request may name, as a schema: each exact entry of the
/// server's grant, and for a `*.suffix:port` entry any name under it.
fn grant_items(grant: &[String]) -> Value {
    let options: Vec<Value> = grant
        .iter()
        .map(|g| match g.strip_prefix("*.") {
            Some(rest) => {
                let (suffix, port) = rest.rsplit_once(':').unwrap_or((rest, ""));
                let escaped: String = suffix
                    .chars()
                    .map(|ch| if ch == '.' { "\\.".to_string() } else { ch.to_string() })
                    .collect();
                json!({"type": "string",
                       "pattern": format!("^([a-z0-9]([a-z0-9-]{{0,61}}[a-z0-9])?\\.)+{escaped}:{port}$")})
            }
            None => json!({"const": g}),
        })
        .collect();
    match options.len() {
        0 => json!({"type": "string"}),
        _ => json!({"anyOf": options}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_is_a_problem_document_and_bodies_are_closed() {
        let doc = document(
            &ServerConfig::default(),
            &[("process", IsolationLevel::Container, true)],
        );
        let paths = doc["paths"].as_object().unwrap();
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                for (status, r) in op["responses"].as_object().unwrap() {
                    if status.starts_with('4') || status.starts_with('5') {
                        assert!(
                            r["content"].get("application/problem+json").is_some()
                                && r["content"].get("application/json").is_none(),
                            "{method} {path} {status}: {r}"
                        );
                    }
                }
                assert!(op["responses"].get("500").is_some(), "{method} {path}");
                if op.get("security").is_some() {
                    assert!(op["responses"].get("401").is_some(), "{method} {path}");
                }
            }
        }
        let create = &doc["components"]["schemas"]["CreateExecution"];
        assert_eq!(create["additionalProperties"], false);
        assert_eq!(
            create["properties"]["language"]["enum"],
            json!(["python", "javascript", "shell"])
        );
        // The default server grants no egress: no rule is valid.
        assert_eq!(
            doc["components"]["schemas"]["NetworkRequest"]["properties"]["allow"]["maxItems"],
            0
        );
        assert_eq!(
            doc["components"]["schemas"]["LimitsRequest"]["properties"]["memory_mib"]["maximum"],
            1024
        );
    }

    /// What the server's own code writes on an execution's stream: the
    /// replay of a record with every part (a start, a log record, stdout,
    /// stderr, an end), through axum's SSE encoder, parsed back as
    /// (`event:`, `id:`, `data:` as JSON).
    fn emitted_events() -> Vec<(String, String, Value)> {
        use airlock_store::{ExecStatus, ExecutionRecord, LogRecord};
        use axum::response::IntoResponse;
        let mut rec = ExecutionRecord::queued(
            format!("ex_{}", "0".repeat(32)),
            "tn_1".into(),
            "python",
            "req_1".into(),
            "0af7651916cd43dd8448eb211c80319c".into(),
            "default".into(),
            1_000,
        );
        rec.status = ExecStatus::Finished;
        rec.started_at_ms = Some(1_001);
        rec.finished_at_ms = Some(1_002);
        rec.reason = Some("exited".into());
        rec.result = Some(json!({"exit_code": 0, "stdout": "out\n", "stderr": "err\n"}));
        let logs = [LogRecord {
            seq: 1,
            ts_ms: 1_001,
            level: "info".into(),
            message: "hello".into(),
            fields: json!({"k": 1}),
        }];
        let events = crate::api::replay(&rec, &logs);
        let sse = axum::response::sse::Sse::new(futures_util::stream::iter(
            events.into_iter().map(Ok::<_, std::convert::Infallible>),
        ));
        let body = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(axum::body::to_bytes(
                sse.into_response().into_body(),
                usize::MAX,
            ))
            .unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        text.split("\n\n")
            .filter(|block| !block.trim().is_empty())
            .map(|block| {
                let field = |name: &str| {
                    block
                        .lines()
                        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                        .unwrap_or_else(|| panic!("no {name} in {block:?}"))
                        .to_string()
                };
                let data = serde_json::from_str(&field("data")).unwrap();
                (field("event"), field("id"), data)
            })
            .collect()
    }

    /// Whether `v` conforms to `schema` (resolving `$ref`s in `doc`):
    /// `$ref`, `anyOf`, `oneOf`, `const`, `enum` and `type` everywhere;
    /// `required`, `properties` and `additionalProperties: false` of
    /// objects down to `depth` levels (a record's nested result document is
    /// checked for its type only).
    fn conforms(doc: &Value, schema: &Value, v: &Value, depth: u32) -> Result<(), String> {
        if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
            let target = doc
                .pointer(r.trim_start_matches('#'))
                .ok_or_else(|| format!("dangling {r}"))?;
            return conforms(doc, target, v, depth);
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(options) = schema.get(key).and_then(Value::as_array) {
                let errors: Vec<String> = options
                    .iter()
                    .filter_map(|o| conforms(doc, o, v, depth).err())
                    .collect();
                if errors.len() == options.len() {
                    return Err(format!("{v} matches none of {key}: {errors:?}"));
                }
            }
        }
        if let Some(c) = schema.get("const")
            && c != v
        {
            return Err(format!("{v} is not {c}"));
        }
        if let Some(e) = schema.get("enum").and_then(Value::as_array)
            && !e.contains(v)
        {
            return Err(format!("{v} is not one of {e:?}"));
        }
        if let Some(t) = schema.get("type") {
            let types: Vec<&str> = match t {
                Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                t => t.as_str().into_iter().collect(),
            };
            let is = |t: &str| match t {
                "null" => v.is_null(),
                "string" => v.is_string(),
                "integer" => v.is_i64() || v.is_u64(),
                "number" => v.is_number(),
                "boolean" => v.is_boolean(),
                "object" => v.is_object(),
                "array" => v.is_array(),
                _ => false,
            };
            if !types.iter().any(|t| is(t)) {
                return Err(format!("{v} is not of type {t}"));
            }
        }
        if let (true, Some(obj)) = (depth > 0, v.as_object()) {
            for key in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let key = key.as_str().unwrap_or_default();
                if !obj.contains_key(key) {
                    return Err(format!("{v} lacks required {key}"));
                }
            }
            let properties = schema.get("properties").and_then(Value::as_object);
            for (key, value) in obj {
                match properties.and_then(|p| p.get(key)) {
                    Some(p) => {
                        conforms(doc, p, value, depth - 1).map_err(|e| format!("{key}: {e}"))?
                    }
                    None if schema.get("additionalProperties") == Some(&json!(false)) => {
                        return Err(format!("{key} is not in the schema"));
                    }
                    None => {}
                }
            }
        }
        Ok(())
    }

    /// The document names every event the server writes on an execution's
    /// stream, and only those: the list is derived from what the server's
    /// own code emits (its replay of a record with every part, through the
    /// SSE encoder; the live stream sends the same events), never a copy.
    /// Each event's `data` conforms to its documented schema, and the
    /// stream's media type points at them.
    #[test]
    fn the_document_names_every_event_the_server_streams_with_its_data() {
        let doc = document(
            &ServerConfig::default(),
            &[("process", IsolationLevel::Container, true)],
        );
        let emitted = emitted_events();
        let names: std::collections::BTreeSet<&str> =
            emitted.iter().map(|(e, ..)| e.as_str()).collect();
        // Positive control: the record had every part, so every kind of
        // event came out (a replay of a smaller record would prove less).
        assert_eq!(names.len(), 5, "{emitted:?}");
        let union = &doc["components"]["schemas"]["ExecutionEvent"];
        let documented: std::collections::BTreeSet<&str> = union["discriminator"]["mapping"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(names, documented, "emitted vs documented events");
        assert_eq!(
            union["oneOf"].as_array().unwrap().len(),
            documented.len(),
            "{union}"
        );
        for (event, id, data) in &emitted {
            let r = union["discriminator"]["mapping"][event.as_str()]
                .as_str()
                .unwrap();
            let component = doc.pointer(r.trim_start_matches('#')).unwrap();
            assert_eq!(component["properties"]["event"]["const"], *event);
            let wrapped = json!({"event": event, "id": id, "data": data.to_string()});
            conforms(&doc, component, &wrapped, 2).unwrap_or_else(|e| panic!("{event}: {e}"));
            let data_schema = &component["properties"]["data"];
            assert_eq!(data_schema["contentMediaType"], "application/json");
            conforms(&doc, &data_schema["contentSchema"], data, 2)
                .unwrap_or_else(|e| panic!("{event} data {data}: {e}"));
        }
        // Negative control: the check does catch data of the wrong shape.
        let started =
            &doc["components"]["schemas"]["StartedEvent"]["properties"]["data"]["contentSchema"];
        assert!(conforms(&doc, started, &json!({"id": "ex_1"}), 2).is_err());
        assert!(
            conforms(
                &doc,
                started,
                &json!({"id": "x", "started_at_ms": 1, "extra": 1}),
                2
            )
            .is_err()
        );
        let ok = doc
            .pointer("/paths/~1v1~1executions~1{id}~1events/get/responses/200")
            .unwrap();
        assert_eq!(
            ok["content"]["text/event-stream"]["schema"]["$ref"],
            "#/components/schemas/ExecutionEvent"
        );
        for name in &names {
            assert!(ok["description"].as_str().unwrap().contains(name), "{ok}");
        }
    }

    /// `memory_mib` may not go below what holds the largest code accepted.
    #[test]
    fn the_memory_minimum_follows_the_code_limit() {
        let mut cfg = ServerConfig::default();
        let doc = document(&cfg, &[("process", IsolationLevel::Container, true)]);
        let memory = &doc["components"]["schemas"]["LimitsRequest"]["properties"]["memory_mib"];
        assert_eq!(memory["minimum"], 8);
        cfg.policy.limits.code_bytes = 16 << 20;
        cfg.policy.limits.memory_mib = 64;
        let doc = document(&cfg, &[("process", IsolationLevel::Container, true)]);
        let memory = &doc["components"]["schemas"]["LimitsRequest"]["properties"]["memory_mib"];
        assert_eq!(memory["minimum"], 17);
    }

    #[test]
    fn metrics_name_both_formats() {
        let doc = document(
            &ServerConfig::default(),
            &[("process", IsolationLevel::Container, true)],
        );
        let content = &doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"];
        assert!(content.get("text/plain").is_some(), "{content}");
        assert!(
            content.get("application/openmetrics-text").is_some(),
            "{content}"
        );
    }

    #[test]
    fn grants_become_the_rules_a_request_may_name() {
        let items = grant_items(&["pypi.org:443".into(), "*.example.com:443".into()]);
        assert_eq!(items["anyOf"][0]["const"], "pypi.org:443");
        let re = items["anyOf"][1]["pattern"].as_str().unwrap();
        assert!(re.ends_with(r"example\.com:443$"), "{re}");
    }
}
