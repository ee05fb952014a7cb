//! airlock-broker: the sandbox's only channel to the platform.
//!
//! Owns: the wire protocol (versioned, length-prefixed JSON frames with
//! request ids and a hard size limit; see docs/broker-protocol.md) and the
//! host-side handlers: logging, tenant-scoped secrets, agent memory scoped
//! to (tenant, flow), variables, context, and the handler result.
//!
//! Must never: take identity from the sandbox (tenant, flow and execution
//! are fixed when the session is created; fields the code sends claiming
//! otherwise are ignored and audited), read a secret the execution's policy
//! does not grant, or keep a connection open after a malformed, oversized
//! or out-of-order frame.

pub mod redact;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use airlock_store::{Actor, MemoryWrite, NewAudit, Store};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use redact::{Redactor, StreamRedactor};

/// Protocol version spoken here.
pub const VERSION: u64 = 1;
/// Largest frame in either direction (length prefix excluded).
pub const MAX_FRAME: usize = 1 << 20;

/// Security events (identity fields ignored, secrets denied) audited one
/// by one per execution; the rest are counted in one summary record.
pub const AUDIT_MAX: u32 = 20;

/// Who the execution is. Fixed by the host.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Tenant.
    pub tenant_id: String,
    /// Flow (memory scope).
    pub flow_id: String,
    /// Execution.
    pub execution_id: String,
    /// Trace id.
    pub trace_id: String,
    /// Request id of the creating request.
    pub request_id: String,
}

/// What the execution may see.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    /// Secret names it may read.
    pub secrets: BTreeSet<String>,
    /// Resolved config values.
    pub variables: Map<String, Value>,
    /// Handler input, when it is a handler execution.
    pub input: Option<Value>,
    /// Whether a handler runs (the runner reports its result).
    pub handler: bool,
    /// The code, for a runner that was started before its execution was
    /// bound (a warm, pooled sandbox): it gets its code in `hello`.
    pub code: Option<String>,
    /// Secret values given directly (`airlock run --handler --secret`),
    /// served instead of the store's for these names (which must also be
    /// in `secrets`). The server never sets this.
    pub given_secrets: GivenSecrets,
}

/// Secret values given to a local run. Never printed.
#[derive(Clone, Default)]
pub struct GivenSecrets(pub std::collections::BTreeMap<String, zeroize::Zeroizing<String>>);

impl std::fmt::Debug for GivenSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GivenSecrets({} names)", self.0.len())
    }
}

/// Per-execution bounds.
#[derive(Debug, Clone)]
pub struct Quotas {
    /// Requests per execution.
    pub requests: u64,
    /// Log records per execution.
    pub log_records: u64,
    /// Log bytes (message + fields) per execution.
    pub log_bytes: u64,
    /// Bytes of one log message.
    pub log_message_bytes: usize,
    /// Bytes of one record's fields (as JSON).
    pub log_fields_bytes: usize,
    /// Bytes of a memory key.
    pub memory_key_bytes: usize,
    /// Bytes of a memory value (as JSON).
    pub memory_value_bytes: usize,
    /// Keys per (tenant, flow).
    pub memory_keys: i64,
    /// Bytes of a handler output (as JSON).
    pub output_bytes: usize,
    /// Log records per second (after that, `rate_limited`).
    pub log_rate: u64,
    /// Bytes of memory values one execution may write in total.
    pub memory_write_bytes: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            requests: 10_000,
            log_records: 1_000,
            log_bytes: 1 << 20,
            log_message_bytes: 8 << 10,
            log_fields_bytes: 16 << 10,
            memory_key_bytes: 256,
            memory_value_bytes: 64 << 10,
            memory_keys: 10_000,
            output_bytes: 512 << 10,
            log_rate: 200,
            memory_write_bytes: 8 << 20,
        }
    }
}

/// How the channel ended and what the handler reported.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Handler output (redacted).
    pub output: Option<Value>,
    /// Handler error (redacted).
    pub handler_error: Option<Value>,
    /// Why the broker closed the connection, if it did.
    pub protocol_error: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    requests: u64,
    log_records: u64,
    log_bytes: u64,
    last_id: Option<u64>,
    audits: u32,
    /// Security events beyond [`AUDIT_MAX`], by kind.
    suppressed: std::collections::BTreeMap<&'static str, u64>,
    /// Memory bytes written by this execution.
    memory_bytes: u64,
    /// Log rate window: (start, records in it).
    log_window: Option<(std::time::Instant, u64)>,
    outcome: Outcome,
    result_reported: bool,
}

/// Receives each stored log record (for live streams).
pub type LogSink = Box<dyn Fn(&Value) + Send + Sync>;

/// One execution's broker.
pub struct Session {
    /// Identity.
    pub identity: Identity,
    grants: Grants,
    quotas: Quotas,
    store: Arc<dyn Store>,
    /// Values to redact, shared with the output path.
    pub redactor: Arc<Redactor>,
    on_log: Option<LogSink>,
    state: Mutex<State>,
    secrets: Mutex<SecretCache>,
}

type SecretCache = std::collections::HashMap<String, Option<zeroize::Zeroizing<String>>>;

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// A failure answered on the channel (the connection stays open).
#[derive(Debug)]
struct OpError {
    code: &'static str,
    message: String,
}

fn op_err(code: &'static str, message: impl Into<String>) -> OpError {
    OpError {
        code,
        message: message.into(),
    }
}

/// Frame envelope from the sandbox.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    v: u64,
    id: u64,
    op: String,
    #[serde(default)]
    args: Map<String, Value>,
}

/// Fields that claim an identity. Ignored wherever they appear in `args`.
const IDENTITY_FIELDS: [&str; 6] = [
    "tenant",
    "tenant_id",
    "flow",
    "flow_id",
    "execution_id",
    "execution",
];

fn parse_args<T: for<'de> Deserialize<'de>>(args: Map<String, Value>) -> Result<T, OpError> {
    serde_json::from_value(Value::Object(args)).map_err(|e| op_err("invalid_args", e.to_string()))
}

/// Memory keys: 1..=max bytes, no control characters, no `.`/`..` path
/// segments, no leading `/` (keys are opaque, but must never look like a
/// path to any later backend).
pub fn valid_memory_key(k: &str, max: usize) -> bool {
    !k.is_empty()
        && k.len() <= max
        && !k.starts_with('/')
        && !k.chars().any(char::is_control)
        && k.split('/').all(|seg| seg != "." && seg != "..")
}

/// Length of `v` serialised as JSON (`usize::MAX` if it cannot be).
pub fn json_len<T: serde::Serialize + ?Sized>(v: &T) -> usize {
    serde_json::to_string(v).map_or(usize::MAX, |s| s.len())
}

/// Secret names: `[A-Za-z_][A-Za-z0-9_.-]{0,127}`.
pub fn valid_secret_name(n: &str) -> bool {
    let b = n.as_bytes();
    (1..=128).contains(&b.len())
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c))
}

const OPS: [&str; 9] = [
    "hello",
    "log",
    "secrets.get",
    "memory.get",
    "memory.put",
    "memory.cas",
    "memory.delete",
    "memory.list",
    "result",
];

/// The op's name when it is one of ours (sandbox text is never recorded).
fn known_op(op: &str) -> &'static str {
    OPS.iter()
        .find(|o| **o == op)
        .copied()
        .unwrap_or("(unknown)")
}

/// Flow ids: 1..=128 of `[A-Za-z0-9_.-]`, not `.`/`..`.
pub fn valid_flow_id(f: &str) -> bool {
    (1..=128).contains(&f.len())
        && f != "."
        && f != ".."
        && f.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogArgs {
    level: String,
    message: String,
    #[serde(default)]
    fields: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameArgs {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyArgs {
    key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutArgs {
    key: String,
    value: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CasArgs {
    key: String,
    /// Version the entry must have now (0: must not exist).
    expected_version: i64,
    value: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListArgs {
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResultArgs {
    #[serde(default)]
    output: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

impl Session {
    /// A session for one execution.
    pub fn new(
        identity: Identity,
        grants: Grants,
        quotas: Quotas,
        store: Arc<dyn Store>,
        on_log: Option<LogSink>,
    ) -> Self {
        Session {
            identity,
            grants,
            quotas,
            store,
            redactor: Arc::new(Redactor::default()),
            on_log,
            state: Mutex::new(State::default()),
            secrets: Mutex::new(SecretCache::new()),
        }
    }

    fn secret_cache(&self) -> std::sync::MutexGuard<'_, SecretCache> {
        self.secrets.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What happened on the channel.
    pub fn outcome(&self) -> Outcome {
        self.state().outcome.clone()
    }

    fn actor(&self) -> Actor {
        Actor {
            actor: format!("execution:{}", self.identity.execution_id),
            request_id: Some(self.identity.request_id.clone()),
        }
    }

    /// Audits a security-relevant event; at most [`AUDIT_MAX`] per
    /// execution so a hostile program cannot flood the chain. The rest are
    /// counted, per kind, for [`Session::finish`].
    async fn audit(&self, kind: &'static str, subject: &str, detail: Value) {
        {
            let mut st = self.state();
            if st.audits >= AUDIT_MAX {
                *st.suppressed.entry(kind).or_default() += 1;
                return;
            }
            st.audits += 1;
        }
        let ev = NewAudit::new(
            Some(&self.identity.tenant_id),
            kind,
            &self.actor().actor,
            subject,
            Some(&self.identity.request_id),
        )
        .with_detail(detail);
        if let Err(e) = self.store.append_audit(ev).await {
            tracing::error!(error = %e, execution = %self.identity.execution_id, "broker audit failed");
        }
    }

    /// Once the channel is closed: records how many security events went
    /// unaudited beyond [`AUDIT_MAX`] (`broker.audit_suppressed`, by kind),
    /// so the fact that they happened is kept.
    pub async fn finish(&self) {
        let suppressed = std::mem::take(&mut self.state().suppressed);
        if suppressed.is_empty() {
            return;
        }
        let ev = NewAudit::new(
            Some(&self.identity.tenant_id),
            "broker.audit_suppressed",
            &self.actor().actor,
            &self.identity.execution_id,
            Some(&self.identity.request_id),
        )
        .with_detail(json!({ "audited": AUDIT_MAX, "not_audited": suppressed }));
        if let Err(e) = self.store.append_audit(ev).await {
            tracing::error!(error = %e, execution = %self.identity.execution_id, "broker audit failed");
        }
    }

    /// Serves the channel until the sandbox closes it or breaks the
    /// protocol. Never panics on input.
    pub async fn serve(self: Arc<Self>, mut stream: tokio::net::UnixStream) {
        loop {
            let mut len = [0u8; 4];
            match stream.read_exact(&mut len).await {
                Ok(_) => {}
                Err(_) => return, // closed (or broken): the normal end
            }
            let n = u32::from_le_bytes(len) as usize;
            if n > MAX_FRAME {
                self.close(
                    &mut stream,
                    format!("frame of {n} bytes exceeds {MAX_FRAME}"),
                )
                .await;
                return;
            }
            let mut buf = vec![0u8; n];
            if stream.read_exact(&mut buf).await.is_err() {
                self.close(&mut stream, "truncated frame".into()).await;
                return;
            }
            let req: Request = match serde_json::from_slice(&buf) {
                Ok(r) => r,
                Err(e) => {
                    // A fixed category only: serde's message quotes the
                    // frame, which may carry a secret.
                    let what = match e.classify() {
                        serde_json::error::Category::Data => {
                            "malformed frame: not a valid request envelope"
                        }
                        _ => "malformed frame: not JSON",
                    };
                    self.close(&mut stream, what.into()).await;
                    return;
                }
            };
            drop(buf);
            if req.v != VERSION {
                let _ = write_frame(
                    &mut stream,
                    &json!({"v": VERSION, "id": req.id, "ok": false,
                            "error": {"code": "unsupported_version", "message": format!("this broker speaks version {VERSION}")}}),
                )
                .await;
                self.close(&mut stream, "unsupported protocol version".into())
                    .await;
                return;
            }
            let refused = {
                let mut st = self.state();
                if st.last_id.is_some_and(|last| req.id <= last) {
                    Some(format!("out-of-order request id {}", req.id))
                } else {
                    st.last_id = Some(req.id);
                    st.requests += 1;
                    (st.requests > self.quotas.requests)
                        .then(|| "request quota exhausted".to_string())
                }
            };
            if let Some(why) = refused {
                self.close(&mut stream, why).await;
                return;
            }
            let id = req.id;
            let reply = match self.handle(req).await {
                Ok(result) => json!({"v": VERSION, "id": id, "ok": true, "result": result}),
                Err(e) => json!({"v": VERSION, "id": id, "ok": false,
                                 "error": {"code": e.code, "message": e.message}}),
            };
            match write_frame(&mut stream, &reply).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    self.close(&mut stream, "reply exceeds the frame limit".into())
                        .await;
                    return;
                }
                Err(_) => return,
            }
        }
    }

    async fn close(&self, stream: &mut tokio::net::UnixStream, why: String) {
        let why = self.redactor.redact(&why);
        tracing::warn!(execution = %self.identity.execution_id, reason = %why, "broker closed the channel");
        let _ = stream.shutdown().await;
        let mut st = self.state();
        if st.outcome.protocol_error.is_none() {
            st.outcome.protocol_error = Some(why.chars().take(300).collect());
        }
    }

    async fn handle(&self, mut req: Request) -> Result<Value, OpError> {
        let forged: Vec<String> = IDENTITY_FIELDS
            .iter()
            .filter(|f| req.args.remove(**f).is_some())
            .map(|f| f.to_string())
            .collect();
        if !forged.is_empty() {
            self.audit(
                "broker.identity_ignored",
                &self.identity.execution_id,
                json!({"op": known_op(&req.op), "fields": forged}),
            )
            .await;
        }
        let id = &self.identity;
        match req.op.as_str() {
            "hello" => {
                if !req.args.is_empty() {
                    return Err(op_err("invalid_args", "hello takes no arguments"));
                }
                if req.id == 0 {
                    // The warm runner's handshake: identity, mode, input and
                    // code, but no variables. Secrets are read only when the
                    // program asks (a later `hello` or `secrets.get`).
                    return Ok(json!({
                        "protocol": VERSION,
                        "execution_id": id.execution_id,
                        "tenant_id": id.tenant_id,
                        "flow_id": id.flow_id,
                        "trace_id": id.trace_id,
                        "handler": self.grants.handler,
                        "input": self.grants.input,
                        "code": self.grants.code,
                        "variables": null,
                    }));
                }
                let mut variables = self.grants.variables.clone();
                let mut secrets = Map::new();
                for name in &self.grants.secrets {
                    if let Some(v) = self.read_secret(name).await? {
                        secrets.insert(name.clone(), Value::String(v));
                    }
                }
                variables.insert("secrets".into(), Value::Object(secrets));
                Ok(json!({
                    "protocol": VERSION,
                    "execution_id": id.execution_id,
                    "tenant_id": id.tenant_id,
                    "flow_id": id.flow_id,
                    "trace_id": id.trace_id,
                    "handler": self.grants.handler,
                    "input": self.grants.input,
                    "variables": variables,
                }))
            }
            "log" => {
                let a: LogArgs = parse_args(req.args)?;
                if !["debug", "info", "warn", "error"].contains(&a.level.as_str()) {
                    return Err(op_err(
                        "invalid_args",
                        "level is debug, info, warn or error",
                    ));
                }
                // Every cap holds on what is stored and streamed: the
                // redacted text (a marker can be longer than the value it
                // replaces). The raw sizes are checked first, which bounds
                // the redaction work too.
                let too_large = |what: &str, max: usize| {
                    op_err(
                        "too_large",
                        format!("log {what} are at most {max} bytes (after redaction)"),
                    )
                };
                let (max_msg, max_fields) =
                    (self.quotas.log_message_bytes, self.quotas.log_fields_bytes);
                if a.message.len() > max_msg {
                    return Err(too_large("messages", max_msg));
                }
                let mut fields = Value::Object(a.fields);
                if json_len(&fields) > max_fields {
                    return Err(too_large("fields", max_fields));
                }
                let message = self.redactor.redact(&a.message);
                self.redactor.redact_json(&mut fields);
                let flen = json_len(&fields);
                if message.len() > max_msg {
                    return Err(too_large("messages", max_msg));
                }
                if flen > max_fields {
                    return Err(too_large("fields", max_fields));
                }
                {
                    let mut st = self.state();
                    let bytes = (message.len() + flen) as u64;
                    if st.log_records >= self.quotas.log_records
                        || st.log_bytes + bytes > self.quotas.log_bytes
                    {
                        return Err(op_err(
                            "quota_exceeded",
                            "log quota of this execution exhausted",
                        ));
                    }
                    let now = std::time::Instant::now();
                    let w = st.log_window.get_or_insert((now, 0));
                    if now.duration_since(w.0) >= std::time::Duration::from_secs(1) {
                        *w = (now, 0);
                    }
                    if w.1 >= self.quotas.log_rate {
                        return Err(op_err(
                            "rate_limited",
                            format!("at most {} log records per second", self.quotas.log_rate),
                        ));
                    }
                    w.1 += 1;
                    st.log_records += 1;
                    st.log_bytes += bytes;
                }
                let seq = self
                    .store
                    .append_log(&id.execution_id, &a.level, &message, &fields)
                    .await
                    .map_err(internal)?;
                if let Some(sink) = &self.on_log {
                    sink(
                        &json!({"seq": seq, "level": a.level, "message": message, "fields": fields,
                                 "execution_id": id.execution_id, "tenant_id": id.tenant_id,
                                 "trace_id": id.trace_id}),
                    );
                }
                Ok(json!({"seq": seq}))
            }
            "secrets.get" => {
                let a: NameArgs = parse_args(req.args)?;
                let value = self.read_secret(&a.name).await?;
                Ok(json!({"found": value.is_some(), "value": value}))
            }
            "memory.get" => {
                let a: KeyArgs = parse_args(req.args)?;
                self.check_key(&a.key)?;
                let e = self
                    .store
                    .memory_get(&id.tenant_id, &id.flow_id, &a.key)
                    .await
                    .map_err(internal)?;
                Ok(match e {
                    Some(e) => json!({"found": true, "value": e.value, "version": e.version}),
                    None => json!({"found": false, "value": null, "version": 0}),
                })
            }
            "memory.put" => {
                let a: PutArgs = parse_args(req.args)?;
                self.write_memory(&a.key, &a.value, None).await
            }
            "memory.cas" => {
                let a: CasArgs = parse_args(req.args)?;
                if a.expected_version < 0 {
                    return Err(op_err(
                        "invalid_args",
                        "expected_version is 0 (absent) or a version",
                    ));
                }
                self.write_memory(&a.key, &a.value, Some(a.expected_version))
                    .await
            }
            "memory.delete" => {
                let a: KeyArgs = parse_args(req.args)?;
                self.check_key(&a.key)?;
                let deleted = self
                    .store
                    .memory_delete(&id.tenant_id, &id.flow_id, &a.key)
                    .await
                    .map_err(internal)?;
                Ok(json!({"deleted": deleted}))
            }
            "memory.list" => {
                let a: ListArgs = parse_args(req.args)?;
                if a.prefix.len() > self.quotas.memory_key_bytes
                    || a.prefix.chars().any(char::is_control)
                {
                    return Err(op_err("invalid_key", "invalid prefix"));
                }
                let limit = a.limit.unwrap_or(100).clamp(1, 1000);
                let items = self
                    .store
                    .memory_list(
                        &id.tenant_id,
                        &id.flow_id,
                        &a.prefix,
                        a.after.as_deref(),
                        limit,
                    )
                    .await
                    .map_err(internal)?;
                let next = (items.len() == limit as usize)
                    .then(|| items.last().map(|e| e.key.clone()))
                    .flatten();
                Ok(json!({
                    "keys": items.iter().map(|e| json!({"key": e.key, "version": e.version})).collect::<Vec<_>>(),
                    "next": next,
                }))
            }
            "result" => {
                if !self.grants.handler {
                    return Err(op_err(
                        "not_a_handler",
                        "only handler executions report a result",
                    ));
                }
                let a: ResultArgs = parse_args(req.args)?;
                let mut st = self.state();
                if st.result_reported {
                    return Err(op_err(
                        "already_reported",
                        "the result was already reported",
                    ));
                }
                st.result_reported = true;
                let size = |v: &Option<Value>| v.as_ref().map_or(0, json_len);
                if size(&a.output) > self.quotas.output_bytes
                    || size(&a.error) > self.quotas.output_bytes
                {
                    st.outcome.handler_error = Some(json!({
                        "type": "OutputTooLarge",
                        "message": format!("handler output exceeds {} bytes", self.quotas.output_bytes),
                    }));
                    return Err(op_err("too_large", "output too large"));
                }
                let redact = |v: Option<Value>| {
                    v.map(|mut v| {
                        self.redactor.redact_json(&mut v);
                        v
                    })
                };
                let (output, error) = (redact(a.output), redact(a.error));
                // Checked again after redaction: markers can be longer
                // than the values they replace.
                if size(&output) > self.quotas.output_bytes
                    || size(&error) > self.quotas.output_bytes
                {
                    st.outcome.handler_error = Some(json!({
                        "type": "OutputTooLarge",
                        "message": format!("handler output exceeds {} bytes", self.quotas.output_bytes),
                    }));
                    return Err(op_err("too_large", "output too large"));
                }
                st.outcome.output = output;
                st.outcome.handler_error = error;
                Ok(json!({}))
            }
            other => Err(op_err(
                "unknown_op",
                format!(
                    "unknown operation {:?}",
                    other.chars().take(64).collect::<String>()
                ),
            )),
        }
    }

    fn check_key(&self, key: &str) -> Result<(), OpError> {
        if valid_memory_key(key, self.quotas.memory_key_bytes) {
            Ok(())
        } else {
            Err(op_err(
                "invalid_key",
                format!(
                    "keys are 1..={} bytes, without control characters, '.' or '..' segments or a leading '/'",
                    self.quotas.memory_key_bytes
                ),
            ))
        }
    }

    async fn write_memory(
        &self,
        key: &str,
        value: &Value,
        expected: Option<i64>,
    ) -> Result<Value, OpError> {
        self.check_key(key)?;
        // Keys are listed to every execution of the flow, granted or not.
        if self.redactor.contains_secret(key) {
            return Err(op_err(
                "invalid_key",
                "keys must not contain the value of a secret this execution read",
            ));
        }
        let too_large = || {
            op_err(
                "too_large",
                format!(
                    "values are at most {} bytes (after redaction)",
                    self.quotas.memory_value_bytes
                ),
            )
        };
        if json_len(value) > self.quotas.memory_value_bytes {
            return Err(too_large());
        }
        // Memory outlives the execution and is readable by executions that
        // hold no grant: secret values never go into it. The caps hold on
        // what is stored (a marker can be longer than the value it hides).
        let mut value = value.clone();
        self.redactor.redact_json(&mut value);
        let value = &value;
        let len = json_len(value);
        if len > self.quotas.memory_value_bytes {
            return Err(too_large());
        }
        {
            let mut st = self.state();
            if st.memory_bytes + len as u64 > self.quotas.memory_write_bytes {
                return Err(op_err(
                    "quota_exceeded",
                    format!(
                        "this execution may write at most {} bytes of memory",
                        self.quotas.memory_write_bytes
                    ),
                ));
            }
            st.memory_bytes += len as u64;
        }
        let id = &self.identity;
        match self
            .store
            .memory_put(
                &id.tenant_id,
                &id.flow_id,
                key,
                value,
                expected,
                airlock_store::MemoryLimits {
                    keys: self.quotas.memory_keys,
                    ..airlock_store::MemoryLimits::default()
                },
            )
            .await
            .map_err(internal)?
        {
            MemoryWrite::Written(v) => Ok(json!({"ok": true, "version": v})),
            MemoryWrite::Conflict(current) => Ok(json!({"ok": false, "version": current})),
            MemoryWrite::QuotaExceeded => Err(op_err(
                "quota_exceeded",
                format!(
                    "memory quota reached ({} keys per flow, {} MiB per tenant)",
                    self.quotas.memory_keys,
                    airlock_store::MemoryLimits::default().tenant_bytes >> 20
                ),
            )),
        }
    }

    async fn read_secret(&self, name: &str) -> Result<Option<String>, OpError> {
        if !self.grants.secrets.contains(name) {
            // The name is sandbox input: record it only when it has a
            // secret name's shape, and redacted.
            let shown = if valid_secret_name(name) {
                self.redactor.redact(name)
            } else {
                "(not a secret name)".to_string()
            };
            self.audit(
                "secret.denied",
                &shown,
                json!({"execution_id": self.identity.execution_id}),
            )
            .await;
            return Err(op_err(
                "forbidden",
                "this execution's policy does not grant that secret",
            ));
        }
        // Each granted secret is read (and audited) once per execution;
        // later reads come from this session's cache, so a loop cannot
        // turn into a stream of database writes.
        if let Some(hit) = self.secret_cache().get(name) {
            return Ok(hit.as_ref().map(|v| v.to_string()));
        }
        if let Some(v) = self.grants.given_secrets.0.get(name) {
            self.redactor.add(name, v);
            self.secret_cache()
                .insert(name.to_string(), Some(v.clone()));
            return Ok(Some(v.to_string()));
        }
        let got = self
            .store
            .get_secret(&self.identity.tenant_id, name, &self.actor())
            .await
            .map_err(internal)?;
        let value = got.map(|(_, v)| {
            let s = String::from_utf8_lossy(&v).into_owned();
            self.redactor.add(name, &s);
            s
        });
        self.secret_cache().insert(
            name.to_string(),
            value.as_ref().map(|v| zeroize::Zeroizing::new(v.clone())),
        );
        Ok(value)
    }
}

fn internal(e: airlock_store::StoreError) -> OpError {
    tracing::error!(error = %e, "broker store error");
    op_err("internal", "internal error")
}

async fn write_frame(stream: &mut tokio::net::UnixStream, v: &Value) -> std::io::Result<()> {
    let body = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    if body.len() > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "reply too large",
        ));
    }
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    stream.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_flows() {
        assert!(valid_memory_key("a/b.c", 256));
        assert!(valid_memory_key("%2e%2e/x", 256), "literal, never decoded");
        for bad in ["", "../x", "a/../b", "/abs", "a\0b", "a\nb", "./x", "a/."] {
            assert!(!valid_memory_key(bad, 256), "{bad:?}");
        }
        assert!(!valid_memory_key(&"k".repeat(257), 256));
        assert!(valid_flow_id("flow-1.a_b"));
        for bad in ["", ".", "..", "a/b", "a b", &"f".repeat(129)] {
            assert!(!valid_flow_id(bad), "{bad:?}");
        }
    }
}
