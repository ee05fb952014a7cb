//! The tools: their arguments (checked before any request is made), the
//! API requests each makes, and their results.
//!
//! A request the API refuses becomes a tool error carrying the API's stable
//! problem code and its detail (`session_ended: …`), so an agent can act
//! on it; a program that fails is a result, not a tool error.

use std::collections::BTreeMap;

use base64::Engine;
use rmcp::handler::server::common::schema_for_type;
use rmcp::model::{CallToolResult, ContentBlock, JsonObject, Tool, ToolAnnotations};
use rmcp::schemars::JsonSchema;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::{Api, ApiRequest, truncate};

/// The largest file `sandbox_fs_read` returns: what an agent reads goes into
/// a model's context. Larger files are read in parts with `sandbox_exec`.
pub const MAX_READ_BYTES: u64 = 1 << 20;

/// The tools' names, in the order `tools/list` gives them.
pub const TOOLS: [&str; 9] = [
    "sandbox_run",
    "sandbox_create",
    "sandbox_list",
    "sandbox_exec",
    "sandbox_fs_read",
    "sandbox_fs_write",
    "sandbox_fs_list",
    "sandbox_snapshot",
    "sandbox_kill",
];

/// A program's language.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(crate = "rmcp::schemars")]
enum Language {
    Python,
    Javascript,
    Shell,
}

impl Language {
    fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Javascript => "javascript",
            Language::Shell => "shell",
        }
    }
}

/// The weakest isolation the code may run behind.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(crate = "rmcp::schemars")]
enum Isolation {
    Container,
    Gvisor,
    Microvm,
}

impl Isolation {
    fn as_str(self) -> &'static str {
        match self {
            Isolation::Container => "container",
            Isolation::Gvisor => "gvisor",
            Isolation::Microvm => "microvm",
        }
    }
}

/// `sandbox_run`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(crate = "rmcp::schemars")]
struct RunArgs {
    /// The program's language.
    language: Language,
    /// The program's source (for shell: a script).
    code: String,
    /// Text given to the program on its standard input.
    #[serde(default)]
    stdin: Option<String>,
    /// Environment variables for the program.
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Wall-clock limit in milliseconds (within the server's ceiling).
    #[serde(default)]
    timeout_ms: Option<u64>,
    /// The weakest isolation the program may run behind (the server picks
    /// the cheapest backend it offers that meets it).
    #[serde(default)]
    isolation: Option<Isolation>,
}

/// `sandbox_create`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(crate = "rmcp::schemars")]
struct CreateArgs {
    /// The language code runs in when sandbox_exec names none (default:
    /// shell).
    #[serde(default)]
    language: Option<Language>,
    /// The weakest isolation the session's executions may run behind.
    #[serde(default)]
    isolation: Option<Isolation>,
    /// The workspace's size quota in MiB (default: the server's).
    #[serde(default)]
    workspace_mib: Option<u64>,
    /// End the session after this many seconds with nothing running.
    #[serde(default)]
    idle_timeout_secs: Option<u64>,
    /// End the session this many seconds after it began at the latest.
    #[serde(default)]
    lifetime_secs: Option<u64>,
    /// Start from a snapshot's files (a snapshot id from sandbox_snapshot).
    #[serde(default)]
    from_snapshot: Option<String>,
}

/// A tool that takes nothing.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(crate = "rmcp::schemars")]
struct NoArgs {}

/// `sandbox_exec`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(crate = "rmcp::schemars")]
struct ExecArgs {
    /// The session (from sandbox_create).
    session_id: String,
    /// A shell command line, run by sh in /workspace (give this or code).
    #[serde(default)]
    command: Option<String>,
    /// Source code to run (give this or command).
    #[serde(default)]
    code: Option<String>,
    /// The language of code (default: the session's).
    #[serde(default)]
    language: Option<Language>,
    /// Text given to the program on its standard input.
    #[serde(default)]
    stdin: Option<String>,
    /// Environment variables for the program.
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Wall-clock limit in milliseconds (within the server's ceiling).
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// A session and a path in its workspace.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(crate = "rmcp::schemars")]
struct PathArgs {
    /// The session (from sandbox_create).
    session_id: String,
    /// A path inside /workspace: relative to it, or starting with
    /// /workspace/.
    path: String,
}

/// `sandbox_fs_list`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(crate = "rmcp::schemars")]
struct ListArgs {
    /// The session (from sandbox_create).
    session_id: String,
    /// A directory inside /workspace (default: /workspace itself).
    #[serde(default)]
    path: Option<String>,
}

/// How `sandbox_fs_write`'s content is written down.
#[derive(Debug, Default, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(crate = "rmcp::schemars")]
enum Encoding {
    /// The content is the file's text.
    #[default]
    Utf8,
    /// The content is the file's bytes in base64.
    Base64,
}

/// `sandbox_fs_write`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(crate = "rmcp::schemars")]
struct WriteArgs {
    /// The session (from sandbox_create).
    session_id: String,
    /// A path inside /workspace; missing parent directories are created.
    path: String,
    /// The file's whole content.
    content: String,
    /// `utf8` (default) or `base64`.
    #[serde(default)]
    encoding: Encoding,
    /// Octal permission bits, such as "755" for a script (default 644).
    #[serde(default)]
    mode: Option<String>,
}

/// A session.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(crate = "rmcp::schemars")]
struct SessionArgs {
    /// The session (from sandbox_create).
    session_id: String,
}

fn annotations(read_only: bool, destructive: bool) -> ToolAnnotations {
    // No tool reaches anything outside the sandbox platform on its own.
    ToolAnnotations::new()
        .read_only(read_only)
        .destructive(destructive)
        .open_world(false)
}

/// The tools as `tools/list` describes them.
pub(crate) fn list() -> Vec<Tool> {
    vec![
        Tool::new(
            TOOLS[0],
            "Run a program once in a fresh, isolated sandbox that is destroyed afterwards. \
             Returns the exit code, stdout, stderr and why it ended (exited, timeout, \
             memory_limit, ...).",
            schema_for_type::<RunArgs>(),
        )
        .with_annotations(annotations(false, false)),
        Tool::new(
            TOOLS[1],
            "Open a session: a sandbox environment with a private /workspace that persists \
             across sandbox_exec calls. Returns its session_id.",
            schema_for_type::<CreateArgs>(),
        )
        .with_annotations(annotations(false, false)),
        Tool::new(
            TOOLS[2],
            "List this tenant's sessions, newest first, with their state and workspace use.",
            schema_for_type::<NoArgs>(),
        )
        .with_annotations(annotations(true, false)),
        Tool::new(
            TOOLS[3],
            "Run a shell command (command) or code (code, language) in a session, in a fresh \
             sandbox whose working directory is the session's /workspace. Returns the exit \
             code, stdout and stderr.",
            schema_for_type::<ExecArgs>(),
        )
        .with_annotations(annotations(false, false)),
        Tool::new(
            TOOLS[4],
            "Read a file of a session's workspace (at most 1 MiB). Text comes back as is, \
             other bytes as base64.",
            schema_for_type::<PathArgs>(),
        )
        .with_annotations(annotations(true, false)),
        Tool::new(
            TOOLS[5],
            "Write a whole file into a session's workspace (replacing it if it exists).",
            schema_for_type::<WriteArgs>(),
        )
        .with_annotations(annotations(false, true)),
        Tool::new(
            TOOLS[6],
            "List a directory of a session's workspace: names, types, sizes, modes.",
            schema_for_type::<ListArgs>(),
        )
        .with_annotations(annotations(true, false)),
        Tool::new(
            TOOLS[7],
            "Record a snapshot of a session's workspace (content-addressed; diffable and \
             restorable into a new session with sandbox_create from_snapshot).",
            schema_for_type::<SessionArgs>(),
        )
        .with_annotations(annotations(false, false)),
        Tool::new(
            TOOLS[8],
            "End a session: whatever runs in it is killed and its workspace is deleted \
             (snapshots stay).",
            schema_for_type::<SessionArgs>(),
        )
        .with_annotations(annotations(false, true)),
    ]
}

/// Runs tool `name`; `None` when there is no such tool.
pub(crate) async fn call(
    api: &dyn Api,
    via: Option<&http::request::Parts>,
    name: &str,
    args: JsonObject,
) -> Option<CallToolResult> {
    let c = Caller { api, via };
    let out = match name {
        "sandbox_run" => with(name, args, |a| c.run(a)).await,
        "sandbox_create" => with(name, args, |a| c.create(a)).await,
        "sandbox_list" => {
            with(name, args, |NoArgs {}| async {
                c.get_json("/v1/sessions".into()).await.map(structured)
            })
            .await
        }
        "sandbox_exec" => with(name, args, |a| c.exec(a)).await,
        "sandbox_fs_read" => with(name, args, |a| c.read(a)).await,
        "sandbox_fs_write" => with(name, args, |a| c.write(a)).await,
        "sandbox_fs_list" => with(name, args, |a| c.list(a)).await,
        "sandbox_snapshot" => with(name, args, |a| c.snapshot(a)).await,
        "sandbox_kill" => with(name, args, |a| c.kill(a)).await,
        _ => return None,
    };
    Some(out.unwrap_or_else(|message| CallToolResult::error(vec![ContentBlock::text(message)])))
}

/// Runs `tool` on its arguments parsed as its type.
async fn with<T: DeserializeOwned, F: std::future::Future<Output = Outcome>>(
    tool: &str,
    args: JsonObject,
    run: impl FnOnce(T) -> F,
) -> Outcome {
    run(parse(tool, args)?).await
}

/// The arguments as the tool's type, or a message naming what is wrong.
fn parse<T: DeserializeOwned>(tool: &str, args: JsonObject) -> Result<T, String> {
    // serde's messages quote the value they refused: bounded, since it is
    // the caller's.
    serde_json::from_value(Value::Object(args)).map_err(|e| {
        format!(
            "invalid arguments for {tool}: {}",
            truncate(&e.to_string(), 300)
        )
    })
}

fn structured(v: Value) -> CallToolResult {
    CallToolResult::structured(v)
}

/// The tool calls of one MCP request.
struct Caller<'a> {
    api: &'a dyn Api,
    via: Option<&'a http::request::Parts>,
}

/// Cancels an execution when dropped while it still names one (a tool
/// call that ended before its execution did); the cancel is sent on its
/// own task, as the caller of the tool call.
struct CancelOnDrop<'a> {
    api: &'a dyn Api,
    via: Option<http::request::Parts>,
    id: Option<String>,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        let (Some(id), Ok(rt)) = (self.id.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let cancel = self.api.send(
            ApiRequest {
                method: http::Method::POST,
                path: format!("/v1/executions/{}/cancel", segment(&id)),
                content_type: None,
                body: Vec::new(),
                max_answer: None,
            },
            self.via.as_ref(),
        );
        rt.spawn(async move {
            let _ = cancel.await;
        });
    }
}

/// What a tool call ends with: its result, or the message of a tool error.
type Outcome = Result<CallToolResult, String>;

impl Caller<'_> {
    /// Sends a request; an answer other than `ok` becomes the API's
    /// problem as a message.
    async fn send(&self, req: ApiRequest, ok: u16) -> Result<Vec<u8>, String> {
        let resp = self.api.send(req, self.via).await?;
        if resp.status == ok {
            return Ok(resp.body);
        }
        Err(problem_message(resp.status, &resp.body))
    }

    async fn get_json(&self, path: String) -> Result<Value, String> {
        let body = self
            .send(
                ApiRequest {
                    method: http::Method::GET,
                    path,
                    content_type: None,
                    body: Vec::new(),
                    max_answer: None,
                },
                200,
            )
            .await?;
        json_body(&body)
    }

    /// POSTs `body` (or nothing) and reads the JSON answer.
    async fn post_json(
        &self,
        path: String,
        body: Option<&Value>,
        ok: u16,
    ) -> Result<Value, String> {
        let body = self
            .send(
                ApiRequest {
                    method: http::Method::POST,
                    path,
                    content_type: body.map(|_| "application/json"),
                    body: body.map(|b| b.to_string().into_bytes()).unwrap_or_default(),
                    max_answer: None,
                },
                ok,
            )
            .await?;
        json_body(&body)
    }

    async fn run(&self, a: RunArgs) -> Outcome {
        let mut body = json!({
            "language": a.language.as_str(),
            "code": a.code,
            "stdin": a.stdin.unwrap_or_default(),
            "env": a.env,
        });
        if let Some(ms) = a.timeout_ms {
            body["limits"] = json!({ "wall_time_ms": ms });
        }
        if let Some(level) = a.isolation {
            body["isolation"] = level.as_str().into();
        }
        self.run_to_end("/v1/executions".into(), body).await
    }

    /// Starts an execution (`body` POSTed to `path` without waiting) and
    /// waits for its end. Should the tool call end first (the client
    /// cancelled it, or went away), the execution is cancelled: an agent
    /// that gave up on a run does not leave it running to its limits.
    async fn run_to_end(&self, path: String, mut body: Value) -> Outcome {
        body["wait"] = false.into();
        let started = self.post_json(path, Some(&body), 202).await?;
        let id = started["id"]
            .as_str()
            .ok_or("the execution has no id")?
            .to_string();
        let mut guard = CancelOnDrop {
            api: self.api,
            via: self.via.cloned(),
            id: Some(id.clone()),
        };
        let doc = self.wait_for(&id).await;
        guard.id = None;
        Ok(execution_result(&doc?))
    }

    /// Polls an execution until it ended (quickly at first: a warm run
    /// ends in milliseconds; then four times a second).
    async fn wait_for(&self, id: &str) -> Result<Value, String> {
        let path = format!("/v1/executions/{}", segment(id));
        let mut pause = std::time::Duration::from_millis(2);
        loop {
            let doc = self.get_json(path.clone()).await?;
            if matches!(doc["status"].as_str(), Some("finished" | "failed")) {
                return Ok(doc);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(250));
        }
    }

    async fn create(&self, a: CreateArgs) -> Outcome {
        let mut body = json!({});
        if let Some(l) = a.language {
            body["language"] = l.as_str().into();
        }
        if let Some(level) = a.isolation {
            body["isolation"] = level.as_str().into();
        }
        for (key, v) in [
            ("workspace_mib", a.workspace_mib),
            ("idle_timeout_secs", a.idle_timeout_secs),
            ("lifetime_secs", a.lifetime_secs),
        ] {
            if let Some(v) = v {
                body[key] = v.into();
            }
        }
        if let Some(s) = a.from_snapshot {
            body["from_snapshot"] = s.into();
        }
        let doc = self
            .post_json("/v1/sessions".into(), Some(&body), 201)
            .await?;
        let mut out = json!({ "session_id": doc["id"] });
        for key in [
            "status",
            "language",
            "backend",
            "isolation",
            "workspace",
            "idle_timeout_secs",
            "expires_at",
        ] {
            if let Some(v) = doc.get(key) {
                out[key] = v.clone();
            }
        }
        Ok(structured(out))
    }

    async fn exec(&self, a: ExecArgs) -> Outcome {
        let mut body = match (a.command, a.code) {
            (Some(command), None) => {
                if a.language.is_some_and(|l| !matches!(l, Language::Shell)) {
                    return Err("command is a shell command line: give code to run a \
                                python or javascript program"
                        .into());
                }
                json!({ "language": "shell", "code": command })
            }
            (None, Some(code)) => {
                let mut b = json!({ "code": code });
                if let Some(l) = a.language {
                    b["language"] = l.as_str().into();
                }
                b
            }
            (Some(_), Some(_)) => return Err("give command or code, not both".into()),
            (None, None) => return Err("give command (a shell command line) or code".into()),
        };
        body["stdin"] = a.stdin.unwrap_or_default().into();
        body["env"] = json!(a.env);
        if let Some(ms) = a.timeout_ms {
            body["limits"] = json!({ "wall_time_ms": ms });
        }
        let path = format!("/v1/sessions/{}/exec", segment(&a.session_id));
        self.run_to_end(path, body).await
    }

    async fn read(&self, a: PathArgs) -> Outcome {
        let rel = workspace_path(&a.path)?;
        if rel.is_empty() {
            return Err("/workspace is a directory: list it with sandbox_fs_list".into());
        }
        let sid = segment(&a.session_id);
        // Its size first: a file too large for a model's context is
        // refused before any of it is read.
        let info = self
            .get_json(format!("/v1/sessions/{sid}/stat?path={}", query(&rel)))
            .await?;
        match info["type"].as_str() {
            Some("file") => {}
            Some("directory") => {
                return Err(format!(
                    "{}: is a directory: list it with sandbox_fs_list",
                    truncate(&a.path, 200)
                ));
            }
            _ => {
                return Err(format!("{}: not a regular file", truncate(&a.path, 200)));
            }
        }
        let size = info["size"].as_u64().unwrap_or(u64::MAX);
        if size > MAX_READ_BYTES {
            return Err(format!(
                "{}: {size} bytes, more than sandbox_fs_read returns ({MAX_READ_BYTES}); read \
                 a part with sandbox_exec (head -c, tail -c, sed -n)",
                truncate(&a.path, 200)
            ));
        }
        let bytes = self
            .send(
                ApiRequest {
                    method: http::Method::GET,
                    path: format!("/v1/sessions/{sid}/files/{}", path_segments(&rel)),
                    content_type: None,
                    body: Vec::new(),
                    // Never more than this is read, whatever the file
                    // has grown to since its size was asked.
                    max_answer: Some(MAX_READ_BYTES),
                },
                200,
            )
            .await
            .map_err(|e| format!("{}: {e}", truncate(&a.path, 200)))?;
        let size = bytes.len();
        let (encoding, content) = match String::from_utf8(bytes) {
            Ok(text) => ("utf8", text),
            Err(e) => (
                "base64",
                base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
            ),
        };
        Ok(structured(json!({
            "path": rel,
            "size": size,
            "encoding": encoding,
            "content": content,
        })))
    }

    async fn write(&self, a: WriteArgs) -> Outcome {
        let rel = workspace_path(&a.path)?;
        if rel.is_empty() {
            return Err("give the path of a file inside /workspace".into());
        }
        let bytes = match a.encoding {
            Encoding::Utf8 => a.content.into_bytes(),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(a.content.as_bytes())
                .map_err(|e| format!("content is not base64: {e}"))?,
        };
        let mut path = format!(
            "/v1/sessions/{}/files/{}",
            segment(&a.session_id),
            path_segments(&rel)
        );
        if let Some(mode) = a.mode {
            path.push_str("?mode=");
            path.push_str(&query(&mode));
        }
        let body = self
            .send(
                ApiRequest {
                    method: http::Method::PUT,
                    path,
                    content_type: Some("application/octet-stream"),
                    body: bytes,
                    max_answer: None,
                },
                200,
            )
            .await?;
        let mut doc = json_body(&body)?;
        doc["path"] = rel.into();
        Ok(structured(doc))
    }

    async fn list(&self, a: ListArgs) -> Outcome {
        let rel = match &a.path {
            Some(p) => workspace_path(p)?,
            None => String::new(),
        };
        let doc = self
            .get_json(format!(
                "/v1/sessions/{}/files?path={}",
                segment(&a.session_id),
                query(&rel)
            ))
            .await?;
        Ok(structured(json!({
            "path": rel,
            "entries": doc["entries"],
            "truncated": doc["truncated"],
        })))
    }

    async fn snapshot(&self, a: SessionArgs) -> Outcome {
        let path = format!("/v1/sessions/{}/snapshots", segment(&a.session_id));
        let mut doc = self.post_json(path, None, 201).await?;
        // The listing of files is for the snapshot routes, not a model's
        // context (it is empty here anyway).
        if let Some(m) = doc.as_object_mut() {
            m.remove("manifest");
        }
        Ok(structured(doc))
    }

    async fn kill(&self, a: SessionArgs) -> Outcome {
        self.send(
            ApiRequest {
                method: http::Method::DELETE,
                path: format!("/v1/sessions/{}", segment(&a.session_id)),
                content_type: None,
                body: Vec::new(),
                max_answer: None,
            },
            204,
        )
        .await?;
        Ok(structured(
            json!({ "session_id": a.session_id, "ended": true }),
        ))
    }
}

/// A record of an execution as a tool result: what an agent needs of it.
/// The program failing is a result; the sandbox failing is a tool error.
fn execution_result(doc: &Value) -> CallToolResult {
    let r = &doc["result"];
    let mut out = json!({
        "execution_id": doc["id"],
        "status": doc["status"],
        "reason": doc["reason"],
        "exit_code": r["exit_code"],
        "stdout": r["stdout"],
        "stderr": r["stderr"],
    });
    for key in [
        "signal",
        "wall_time_ms",
        "stdout_truncated",
        "stderr_truncated",
    ] {
        if let Some(v) = r.get(key).filter(|v| !v.is_null()) {
            out[key] = v.clone();
        }
    }
    for key in ["session_id", "error"] {
        if let Some(v) = doc.get(key).filter(|v| !v.is_null()) {
            out[key] = v.clone();
        }
    }
    if r.is_null() || doc["reason"] == "internal_error" {
        return CallToolResult::structured_error(out);
    }
    structured(out)
}

fn json_body(body: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|_| "the server's answer is not JSON".to_string())
}

/// A refusal as an agent reads it: the stable code, then the detail.
fn problem_message(status: u16, body: &[u8]) -> String {
    let doc: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let code = doc["code"].as_str().unwrap_or("error");
    let detail = doc["detail"]
        .as_str()
        .or(doc["title"].as_str())
        .unwrap_or("the request was refused");
    format!(
        "{}: {} (HTTP {status})",
        truncate(code, 64),
        truncate(detail, 1000)
    )
}

/// A path as the files API takes it: relative to /workspace. `/workspace`
/// and paths under it are accepted as agents see them from inside;
/// any other absolute path is refused rather than silently re-rooted.
fn workspace_path(p: &str) -> Result<String, String> {
    let rel = if p == "/workspace" {
        ""
    } else if let Some(r) = p.strip_prefix("/workspace/") {
        r
    } else if p.starts_with('/') {
        return Err(format!(
            "{}: files are inside /workspace: give a path relative to it or under /workspace/",
            truncate(p, 200)
        ));
    } else {
        p
    };
    Ok(rel.trim_start_matches('/').to_string())
}

/// One path segment percent-encoded: only unreserved characters stay as
/// they are, so the segment reaches the API exactly as given (`.` and `..`
/// included: the API refuses those itself).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A relative path with each segment encoded by [`segment`] (the Piston
/// façade writes its files through the same encoding).
pub fn path_segments(rel: &str) -> String {
    rel.split('/').map(segment).collect::<Vec<_>>().join("/")
}

/// A query value.
fn query(s: &str) -> String {
    segment(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(workspace_path("a/b.txt").unwrap(), "a/b.txt");
        assert_eq!(workspace_path("/workspace/a/b").unwrap(), "a/b");
        assert_eq!(workspace_path("/workspace").unwrap(), "");
        assert!(workspace_path("/etc/passwd").is_err());
        assert!(workspace_path("/workspacex/a").is_err());
        // Dots are encoded, never resolved here: the API refuses them.
        assert_eq!(path_segments("../x"), "%2E%2E/x");
        assert_eq!(path_segments("a b/c%d"), "a%20b/c%25d");
        assert_eq!(segment("ses_1/../x"), "ses_1%2F%2E%2E%2Fx");
    }

    #[test]
    fn schemas_refuse_unknown_arguments() {
        for t in list() {
            assert_eq!(
                t.input_schema.get("type"),
                Some(&json!("object")),
                "{}",
                t.name
            );
            assert_eq!(
                t.input_schema.get("additionalProperties"),
                Some(&json!(false)),
                "{}",
                t.name
            );
        }
        assert_eq!(
            list()
                .iter()
                .map(|t| t.name.to_string())
                .collect::<Vec<_>>(),
            TOOLS
        );
        let mut bad = JsonObject::new();
        bad.insert("code".into(), json!("1"));
        bad.insert("language".into(), json!("python"));
        bad.insert("sudo".into(), json!(true));
        let e = parse::<RunArgs>("sandbox_run", bad).unwrap_err();
        assert!(e.contains("unknown field `sudo`"), "{e}");
    }

    #[test]
    fn problems_read_as_code_and_detail() {
        let body = br#"{"type":"about:blank","title":"Conflict","status":409,"code":"session_ended","detail":"the session ended (idle_timeout)"}"#;
        assert_eq!(
            problem_message(409, body),
            "session_ended: the session ended (idle_timeout) (HTTP 409)"
        );
        assert_eq!(
            problem_message(502, b"<html>"),
            "error: the request was refused (HTTP 502)"
        );
    }
}
