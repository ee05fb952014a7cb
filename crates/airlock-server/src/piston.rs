//! A Piston-compatible façade: `GET /api/v2/runtimes` and
//! `POST /api/v2/execute` with Piston's request and response shapes, so a
//! client written for Piston runs its code in airlock unchanged (given the
//! tenant's key: `Authorization: Bearer KEY`, or the bare key as Piston's
//! public API takes its token).
//!
//! It is an adapter over this server's API, called in process as the
//! caller ([`crate::inproc`]): one file and no arguments is one execution
//! (served warm); several files or arguments are a session made for the
//! request (files written into its /workspace, the first one run with the
//! arguments, the session ended afterwards). Every step is an API request
//! of the tenant's: authenticated, limited and audited as such.
//!
//! Differences from Piston: there is no compile stage (python, javascript
//! and sh are interpreted; the `compile_*` fields are accepted and
//! checked, then unused), and `run.output` is stdout followed by stderr
//! (the records keep the two streams, not their interleaving).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use airlock_mcp::ApiRequest;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::api::{Principal, ReqCtx, authenticate};
use crate::inproc::Caller;
use crate::problem::ApiError;

/// Files one request may carry.
const MAX_FILES: usize = 64;
/// Arguments one request may carry.
const MAX_ARGS: usize = 1024;

/// A language as `/api/v2/runtimes` lists it.
#[derive(Debug, Clone)]
struct Runtime {
    /// Piston's name for it.
    language: &'static str,
    /// The interpreter's version (`3.11.2`).
    version: String,
    aliases: &'static [&'static str],
    /// Piston names the runtime where a language has several.
    runtime: Option<&'static str>,
    /// The API's name for it.
    api_language: &'static str,
    /// The interpreter, as the sandbox sees it (host paths are the
    /// sandbox's: its root is the host's runtime, read-only).
    interpreter: String,
}

/// The languages this host runs, with their interpreters' versions
/// (asked once, at start).
fn detect() -> Vec<Runtime> {
    use airlock_policy::Language as L;
    let table: [(L, &str, &[&str], Option<&str>); 3] = [
        (L::Python, "python", &["py", "py3", "python3"], None),
        (
            L::Javascript,
            "javascript",
            &["js", "node", "node-js", "node-javascript"],
            Some("node"),
        ),
        (L::Shell, "sh", &["shell"], None),
    ];
    let mut out = Vec::new();
    for (lang, name, aliases, runtime) in table {
        let Ok(rt) = airlock_sandbox::runtime::resolve(lang, None) else {
            continue;
        };
        out.push(Runtime {
            language: name,
            version: version_of(&rt.interpreter),
            aliases,
            runtime,
            api_language: lang.as_str(),
            interpreter: rt.interpreter,
        });
    }
    out
}

/// The first `x.y.z` an interpreter prints for `--version`; `0.0.0` for
/// one that has none (dash).
fn version_of(interpreter: &str) -> String {
    let out = std::process::Command::new(interpreter)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output();
    let text = match out {
        Ok(o) => format!(
            "{} {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(_) => String::new(),
    };
    text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|w| semver::Version::parse(w.trim_matches('.')).ok())
        .map(|v| v.to_string())
        .next()
        .unwrap_or_else(|| "0.0.0".into())
}

/// Whether a Piston version selector (`3.11.2`, `3.x`, `>=3.8`, `*`)
/// admits `version`. A bare version means that version exactly, as in
/// Piston (node-semver), not `^` as Rust's semver would read it.
fn version_matches(version: &str, selector: &str) -> bool {
    let Ok(v) = semver::Version::parse(version) else {
        return false;
    };
    let sel = selector.trim();
    if sel.is_empty() || sel == "*" || sel == "x" {
        return true;
    }
    if let Ok(exact) = semver::Version::parse(sel) {
        return exact == v;
    }
    semver::VersionReq::parse(sel).is_ok_and(|r| r.matches(&v))
}

#[derive(Clone)]
struct Piston {
    st: AppState,
    api: Router,
    runtimes: Arc<Vec<Runtime>>,
}

/// `/api/v2/runtimes` and `/api/v2/execute`; `api` is the router the
/// requests go through.
pub(crate) fn router(st: AppState, api: Router) -> Router {
    let p = Piston {
        st,
        api,
        runtimes: Arc::new(detect()),
    };
    Router::new()
        .route("/api/v2/runtimes", get(runtimes))
        .route("/api/v2/execute", post(execute))
        .with_state(p)
        .layer(axum::middleware::from_fn(crate::api::adapter_context))
}

/// An error as Piston answers it: `{"message": ...}`, with airlock's
/// stable `code` beside it and the headers a client acts on
/// (`WWW-Authenticate`, `Retry-After`).
#[derive(Debug)]
struct Refusal {
    status: u16,
    code: String,
    message: String,
    headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            json!({ "message": self.message, "code": self.code }).to_string(),
        )
            .into_response();
        for (name, v) in self.headers {
            resp.headers_mut().insert(name, v);
        }
        resp
    }
}

fn fail(status: u16, code: &str, message: String) -> Refusal {
    Refusal {
        status,
        code: code.to_string(),
        message,
        headers: Vec::new(),
    }
}

/// The API's refusal as Piston's.
fn refused(e: ApiError) -> Refusal {
    let p = e.problem();
    let mut r = fail(p.status, p.code, p.detail.clone());
    let original = e.into_response();
    for h in [header::WWW_AUTHENTICATE, header::RETRY_AFTER] {
        if let Some(v) = original.headers().get(&h) {
            r.headers.push((h, v.clone()));
        }
    }
    r
}

/// An inner API answer that is not the expected one, as Piston's error.
fn from_answer(status: u16, body: &[u8], retry_after: Option<&str>) -> Refusal {
    let doc: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let code = doc["code"].as_str().unwrap_or("error");
    let detail = doc["detail"]
        .as_str()
        .unwrap_or("the request was refused")
        .to_string();
    let mut r = fail(status, code, detail);
    if let Some(v) = retry_after.and_then(|v| HeaderValue::from_str(v).ok()) {
        r.headers.push((header::RETRY_AFTER, v));
    }
    r
}

/// At most 64 characters of a caller's input, to echo it back.
fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Authenticates the caller (a bare key is taken as a bearer one) and
/// returns who the inner calls are made as, and the principal, whose
/// tenant request slot the caller holds while its body arrives (then the
/// inner calls hold their own).
async fn admit(
    p: &Piston,
    headers: &HeaderMap,
    peer: SocketAddr,
    ctx: &ReqCtx,
) -> Result<(Caller, Principal), Refusal> {
    let mut headers = headers.clone();
    // Only a single header is rewritten: two stay two, and are refused
    // as ambiguous like anywhere else.
    let single = headers.get_all(header::AUTHORIZATION).iter().count() == 1;
    let bare = headers
        .get(header::AUTHORIZATION)
        .filter(|_| single)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.contains(' ') && !v.is_empty())
        .map(|v| format!("Bearer {v}"));
    if let Some(b) = bare
        && let Ok(v) = HeaderValue::from_str(&b)
    {
        headers.insert(header::AUTHORIZATION, v);
    }
    let who = authenticate(&p.st, &headers, peer.ip(), ctx)
        .await
        .map_err(refused)?;
    if p.st.draining.load(Ordering::SeqCst) {
        return Err(refused(ApiError::ShuttingDown));
    }
    Ok((Caller::new(&headers, peer, ctx), who))
}

async fn runtimes(
    State(p): State<Piston>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    drop(admit(&p, &headers, peer, &ctx).await?);
    let list: Vec<Value> = p
        .runtimes
        .iter()
        .map(|r| {
            let mut v = json!({
                "language": r.language, "version": r.version, "aliases": r.aliases,
            });
            if let Some(rt) = r.runtime {
                v["runtime"] = rt.into();
            }
            v
        })
        .collect();
    Ok(axum::Json(list).into_response())
}

/// `POST /api/v2/execute`, as Piston documents it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Execute {
    language: String,
    version: String,
    files: Vec<File>,
    #[serde(default)]
    stdin: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default, deserialize_with = "crate::body::opt_i64")]
    run_timeout: Option<i64>,
    #[serde(default, deserialize_with = "crate::body::opt_i64")]
    compile_timeout: Option<i64>,
    #[serde(default, deserialize_with = "crate::body::opt_i64")]
    run_cpu_time: Option<i64>,
    #[serde(default, deserialize_with = "crate::body::opt_i64")]
    compile_cpu_time: Option<i64>,
    #[serde(default, deserialize_with = "crate::body::opt_i64")]
    run_memory_limit: Option<i64>,
    #[serde(default, deserialize_with = "crate::body::opt_i64")]
    compile_memory_limit: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    name: Option<String>,
    content: String,
    #[serde(default)]
    encoding: Option<String>,
}

/// A Piston limit: absent, `-1` (none: the server's own), or positive.
fn limit(name: &str, v: Option<i64>) -> Result<Option<u64>, Refusal> {
    match v {
        None | Some(-1) => Ok(None),
        Some(n) if n > 0 => Ok(Some(n as u64)),
        Some(_) => Err(fail(
            400,
            "invalid_request",
            format!("{name} must be a positive number, or -1 for no limit of its own"),
        )),
    }
}

fn decode(i: usize, f: &File) -> Result<Vec<u8>, Refusal> {
    let bad = |why: &str| fail(400, "invalid_request", format!("files[{i}].content {why}"));
    match f.encoding.as_deref().unwrap_or("utf8") {
        "utf8" => Ok(f.content.clone().into_bytes()),
        "base64" => base64::engine::general_purpose::STANDARD
            .decode(f.content.as_bytes())
            .map_err(|_| bad("is not base64")),
        "hex" => {
            let s = f.content.trim();
            if !s.len().is_multiple_of(2) {
                return Err(bad("is not hex"));
            }
            (0..s.len())
                .step_by(2)
                .map(|j| u8::from_str_radix(s.get(j..j + 2).unwrap_or("x"), 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|_| bad("is not hex"))
        }
        _ => Err(fail(
            400,
            "invalid_request",
            format!("files[{i}].encoding must be utf8, base64 or hex"),
        )),
    }
}

async fn execute(
    State(p): State<Piston>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Refusal> {
    let (caller, who) = admit(&p, &headers, peer, &ctx).await?;
    // The slot is held while the body arrives, as on every API route: a
    // tenant trickling bodies is bounded by its own request limit.
    let req: Execute = crate::body::json(
        &headers,
        body,
        p.st.cfg.body_limit_bytes,
        p.st.cfg.body_deadline(),
    )
    .await
    .map_err(refused)?;
    let actor = who.actor(&ctx);
    drop(who);
    let Some(rt) = p
        .runtimes
        .iter()
        .find(|r| r.language == req.language || r.aliases.contains(&req.language.as_str()))
        .filter(|r| version_matches(&r.version, &req.version))
    else {
        return Err(fail(
            400,
            "runtime_unknown",
            format!(
                "{}-{} runtime is unknown",
                clip(&req.language),
                clip(&req.version)
            ),
        ));
    };
    if req.files.is_empty() || req.files.len() > MAX_FILES {
        return Err(fail(
            400,
            "invalid_request",
            format!("files must hold 1 to {MAX_FILES} files"),
        ));
    }
    if req.args.len() > MAX_ARGS {
        return Err(fail(
            400,
            "invalid_request",
            format!("args may hold at most {MAX_ARGS} arguments"),
        ));
    }
    let mut limits = serde_json::Map::new();
    let checked = [
        ("run_timeout", req.run_timeout, Some("wall_time_ms")),
        ("run_cpu_time", req.run_cpu_time, Some("cpu_time_ms")),
        ("run_memory_limit", req.run_memory_limit, None),
        ("compile_timeout", req.compile_timeout, None),
        ("compile_cpu_time", req.compile_cpu_time, None),
        ("compile_memory_limit", req.compile_memory_limit, None),
    ];
    for (name, v, key) in checked {
        match limit(name, v)? {
            Some(n) if name == "run_memory_limit" => {
                limits.insert("memory_mib".into(), n.div_ceil(1 << 20).into());
            }
            Some(n) => {
                if let Some(k) = key {
                    limits.insert(k.into(), n.into());
                }
            }
            None => {}
        }
    }
    let mut files = Vec::with_capacity(req.files.len());
    for (i, f) in req.files.iter().enumerate() {
        let bytes = decode(i, f)?;
        files.push((
            f.name.clone().unwrap_or_else(|| format!("file{i}.code")),
            bytes,
        ));
    }
    let limits = Value::Object(limits);
    let one = files.len() == 1 && req.args.is_empty();
    let record = match (one, std::str::from_utf8(&files[0].1)) {
        (true, Ok(code)) => {
            let body = json!({
                "language": rt.api_language, "code": code, "stdin": req.stdin, "limits": limits,
            });
            call_json(
                &p,
                &caller,
                http::Method::POST,
                "/v1/executions".into(),
                Some(body),
                200,
            )
            .await
        }
        _ => {
            // Its own task: a client that goes away does not stop the
            // session from being ended.
            let job = Job {
                files,
                args: req.args.clone(),
                stdin: req.stdin.clone(),
                limits,
            };
            let (p2, rt2) = (p.clone(), rt.clone());
            let run =
                tokio::spawn(async move { in_session(&p2, &caller, &rt2, &job, &actor).await });
            run.await
                .map_err(|_| fail(500, "internal_error", "internal error".into()))?
        }
    };
    answer(rt, &record?)
}

/// One API request with a JSON body (or none); its JSON answer when the
/// status is `ok`.
async fn call_json(
    p: &Piston,
    caller: &Caller,
    method: http::Method,
    path: String,
    body: Option<Value>,
    ok: u16,
) -> Result<Value, Refusal> {
    let resp = caller
        .send(
            p.api.clone(),
            ApiRequest {
                method,
                path,
                content_type: body.as_ref().map(|_| "application/json"),
                body: body.map(|b| b.to_string().into_bytes()).unwrap_or_default(),
                max_answer: None,
            },
        )
        .await
        .map_err(|m| fail(500, "internal_error", m))?;
    if resp.status != ok {
        return Err(from_answer(
            resp.status,
            &resp.body,
            resp.retry_after.as_deref(),
        ));
    }
    if resp.body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&resp.body)
        .map_err(|_| fail(500, "internal_error", "internal error".into()))
}

/// What a request runs in a session: its files (the first is run), the
/// arguments, stdin and the limits.
struct Job {
    files: Vec<(String, Vec<u8>)>,
    args: Vec<String>,
    stdin: String,
    limits: Value,
}

/// Several files or arguments: a session of the request's own, its
/// files written, the first run with the arguments, the session ended
/// whatever happened.
async fn in_session(
    p: &Piston,
    caller: &Caller,
    rt: &Runtime,
    job: &Job,
    actor: &airlock_store::Actor,
) -> Result<Value, Refusal> {
    let Job {
        files,
        args,
        stdin,
        limits,
    } = job;
    // Short timeouts: should the end below be missed (a crash), the
    // session ends by itself soon, and a restart ends it anyway.
    let ses = call_json(
        p,
        caller,
        http::Method::POST,
        "/v1/sessions".into(),
        Some(json!({"language": rt.api_language, "idle_timeout_secs": 60})),
        201,
    )
    .await?;
    let Some(id) = ses["id"].as_str().map(str::to_string) else {
        return Err(fail(500, "internal_error", "internal error".into()));
    };
    let run = async {
        for (name, bytes) in files {
            let path = format!(
                "/v1/sessions/{id}/files/{}",
                airlock_mcp::path_segments(name)
            );
            let resp = caller
                .send(
                    p.api.clone(),
                    ApiRequest {
                        method: http::Method::PUT,
                        path,
                        content_type: Some("application/octet-stream"),
                        body: bytes.clone(),
                        max_answer: None,
                    },
                )
                .await
                .map_err(|m| fail(500, "internal_error", m))?;
            if resp.status != 200 {
                return Err(from_answer(
                    resp.status,
                    &resp.body,
                    resp.retry_after.as_deref(),
                ));
            }
        }
        let mut argv = vec![rt.interpreter.clone(), files[0].0.clone()];
        argv.extend(args.iter().cloned());
        call_json(
            p,
            caller,
            http::Method::POST,
            format!("/v1/sessions/{id}/exec"),
            Some(json!({"argv": argv, "stdin": stdin, "limits": limits})),
            200,
        )
        .await
    }
    .await;
    // Ended by the server itself, not by an API request: it needs no
    // request slot of the tenant's (one at its limit still has its
    // session ended) and a revoked key cannot prevent it.
    if let Err(e) = crate::sessions::end(&p.st, &id, "deleted", actor).await {
        tracing::error!(session = %id, error = %e, "ending a Piston request's session failed");
    }
    run
}

fn signal_name(n: i64) -> String {
    let name = match n {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        31 => "SIGSYS",
        _ => return format!("SIG{n}"),
    };
    name.into()
}

/// A record as Piston's answer.
fn answer(rt: &Runtime, doc: &Value) -> Result<Response, Refusal> {
    let r = &doc["result"];
    let reason = doc["reason"].as_str().unwrap_or("internal_error");
    if r.is_null() || reason == "internal_error" {
        return Err(fail(500, "internal_error", "the sandbox failed".into()));
    }
    let stdout = r["stdout"].as_str().unwrap_or("");
    let stderr = r["stderr"].as_str().unwrap_or("");
    let signal = r["signal"].as_i64();
    let code = if signal.is_some() {
        Value::Null
    } else {
        r["exit_code"].clone()
    };
    let (status, message) = match reason {
        "exited" if signal.is_some() => (Some("SG"), None),
        "exited" if r["exit_code"].as_i64() == Some(0) => (None, None),
        "exited" => (Some("RE"), None),
        "timeout" => (Some("TO"), Some("Time limit exceeded (wall clock)")),
        "cpu_limit" => (Some("TO"), Some("Time limit exceeded (CPU time)")),
        "memory_limit" => (Some("SG"), Some("Memory limit exceeded")),
        "output_limit" if r["stdout_truncated"] == true => {
            (Some("OL"), Some("stdout length exceeded"))
        }
        "output_limit" => (Some("EL"), Some("stderr length exceeded")),
        "pids_limit" => (Some("RE"), Some("Process limit exceeded")),
        "disk_limit" => (Some("RE"), Some("Disk space exceeded")),
        "policy_violation" => (Some("SG"), Some("Forbidden system call")),
        _ => (Some("XX"), Some("The execution was stopped by the server")),
    };
    let ms = |v: &Value| v.as_f64().map(|f| f.round() as u64);
    let cpu = match (ms(&r["cpu_user_ms"]), ms(&r["cpu_sys_ms"])) {
        (Some(u), Some(s)) => Some(u + s),
        _ => None,
    };
    let run = json!({
        "stdout": stdout,
        "stderr": stderr,
        "output": format!("{stdout}{stderr}"),
        "code": code,
        "signal": signal.map(signal_name),
        "status": status,
        "message": message,
        "cpu_time": cpu,
        "wall_time": ms(&r["wall_time_ms"]),
        "memory": r["peak_memory_bytes"],
    });
    Ok(
        axum::Json(json!({ "language": rt.language, "version": rt.version, "run": run }))
            .into_response(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_selectors_read_as_piston_reads_them() {
        assert!(version_matches("3.11.2", "3.11.2"));
        assert!(!version_matches("3.12.0", "3.11.2"));
        assert!(version_matches("3.11.2", "3.x"));
        assert!(version_matches("3.11.2", "*"));
        assert!(version_matches("3.11.2", ">=3.8"));
        assert!(!version_matches("3.11.2", "2.x"));
        assert!(!version_matches("3.11.2", "not a version"));
    }

    #[test]
    fn hex_and_base64_files_decode_and_bad_ones_are_refused() {
        let f = |content: &str, encoding: &str| File {
            name: None,
            content: content.into(),
            encoding: Some(encoding.into()),
        };
        assert_eq!(decode(0, &f("00ff41", "hex")).unwrap(), vec![0, 255, b'A']);
        assert_eq!(decode(0, &f("AP9B", "base64")).unwrap(), vec![0, 255, b'A']);
        assert!(decode(0, &f("0g", "hex")).is_err());
        assert!(decode(0, &f("abc", "hex")).is_err());
        assert!(decode(0, &f("x", "rot13")).is_err());
    }
}
