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
        "404" => "no such resource for this tenant (not_found)",
        "408" => "the request body did not arrive in time (request_timeout)",
        "409" => "conflict (not_cancellable, version_conflict)",
        "413" => "request body too large (payload_too_large)",
        "414" => "request target too long (uri_too_long)",
        "415" => "the body must be application/json (unsupported_media_type)",
        "422" => {
            "denied by policy or quota, or no runtime (policy_denied, quota_exceeded, runtime_unavailable)"
        }
        "429" => {
            "too many failed authentications, requests in flight or queued executions (auth_throttled, too_many_requests, queue_full, tenant_queue_full)"
        }
        "431" => "request headers too large (headers_too_large)",
        "500" => "internal error; the request id names it in the server log (internal)",
        "503" => "the server is shutting down (shutting_down)",
        _ => "error",
    }
}

/// The document this server serves at `/openapi.json`.
/// `offered`: the backends this server runs, as (name, level).
pub fn document(cfg: &ServerConfig, offered: &[(&str, IsolationLevel)]) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_else(|_| json!({}));
    complete_responses(&mut doc);
    constrain_parameters(&mut doc);
    constrain_bodies(&mut doc, cfg);
    constrain_isolation(&mut doc, offered);
    doc
}

/// A request may name only offered backends, and only levels some offered
/// backend meets (a named backend: levels it meets itself).
fn constrain_isolation(doc: &mut Value, offered: &[(&str, IsolationLevel)]) {
    let Some(s) = schema(doc, "CreateExecution") else {
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
        range(p, "memory_mib", 8, c.memory_mib);
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
            &[("process", IsolationLevel::Container)],
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

    #[test]
    fn grants_become_the_rules_a_request_may_name() {
        let items = grant_items(&["pypi.org:443".into(), "*.example.com:443".into()]);
        assert_eq!(items["anyOf"][0]["const"], "pypi.org:443");
        let re = items["anyOf"][1]["pattern"].as_str().unwrap();
        assert!(re.ends_with(r"example\.com:443$"), "{re}");
    }
}
