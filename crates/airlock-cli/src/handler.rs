//! `airlock run --handler`: a node handler run locally, with the broker a
//! server would give it. Logs go to stderr; agent memory lives in a local
//! data directory (`AIRLOCK_LOCAL_DIR`, default `<data dir>/local`, its own
//! database and master key) under a tenant named `local`; secrets come from
//! `--secret NAME=@FILE` or `--secret NAME` (the environment variable NAME)
//! and are never stored. The handler's output is printed as JSON on stdout;
//! the program's own stdout and stderr go to stderr (redacted), so stdout
//! holds the output alone.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use airlock_backend::{
    Backend, BackendError, CancelToken, Extras, Hooks, Job, SandboxError, Spec, Stream,
    TerminationReason,
};
use airlock_broker::{GivenSecrets, Grants, Identity, Quotas, Session, StreamRedactor};
use airlock_policy::{Language, Policy};
use airlock_store::{ExecStatus, ExecutionRecord, Finish, Store, new_id, now_ms};
use serde_json::{Value, json};

use crate::Usage;

/// One local handler run.
pub struct HandlerRun<'a> {
    pub language: Language,
    pub code: &'a [u8],
    pub file_name: Option<&'a str>,
    pub policy: &'a Policy,
    pub input: Value,
    pub secrets: GivenSecrets,
    pub flow: String,
    pub json: bool,
}

/// Where local runs keep their data.
pub fn local_dir() -> PathBuf {
    std::env::var_os("AIRLOCK_LOCAL_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| airlock_server::config::default_data_dir().join("local"))
}

/// Parses `--secret NAME=@FILE` or `--secret NAME` (from the environment).
pub fn parse_secret(arg: &str) -> Result<(String, zeroize::Zeroizing<String>), Usage> {
    let (name, value) = match arg.split_once('=') {
        Some((name, src)) => {
            let Some(path) = src.strip_prefix('@') else {
                return Err(Usage(format!(
                    "--secret {name}=...: give the value as @FILE or in the environment variable {name}, never on the command line"
                )));
            };
            let text = std::fs::read_to_string(path).map_err(|e| {
                Usage(format!(
                    "--secret {name}: cannot read {path}: {}",
                    crate::short_io(&e)
                ))
            })?;
            (
                name,
                zeroize::Zeroizing::new(text.trim_end_matches('\n').to_string()),
            )
        }
        None => {
            let v = std::env::var(arg).map_err(|_| {
                Usage(format!(
                    "--secret {arg}: the environment variable {arg} is not set"
                ))
            })?;
            (arg, zeroize::Zeroizing::new(v))
        }
    };
    if !airlock_broker::valid_secret_name(name) {
        return Err(Usage(format!(
            "--secret {name:?}: secret names match [A-Za-z_][A-Za-z0-9_.-]{{0,127}}"
        )));
    }
    if value.len() > 64 << 10 {
        return Err(Usage(format!(
            "--secret {name}: values are at most 65536 bytes"
        )));
    }
    Ok((name.to_string(), value))
}

pub fn run(backend: &dyn Backend, r: HandlerRun<'_>) -> Result<ExitCode, Usage> {
    if r.language == Language::Shell {
        return Err(Usage("handlers are python or javascript".into()));
    }
    if !airlock_broker::valid_flow_id(&r.flow) {
        return Err(Usage(
            "--flow: flow ids are 1..=128 of [A-Za-z0-9_.-]".into(),
        ));
    }
    // The broker's tasks run on the runtime's worker while this thread
    // supervises the sandbox.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Usage(format!("cannot start the async runtime: {e}")))?;
    let dir = local_dir();
    let (store, tenant) = rt
        .block_on(async {
            let store: Arc<dyn Store> =
                airlock_server::open_store(&dir, &Default::default()).await?;
            let actor = airlock_store::Actor {
                actor: "local".into(),
                request_id: None,
            };
            let tenant = match store.tenant_by_name("local").await? {
                Some(t) => t,
                None => store.create_tenant("local", &actor).await?,
            };
            Ok::<_, airlock_server::ServeError>((store, tenant))
        })
        .map_err(|e| Usage(format!("local data directory: {e}")))?;
    let id = new_id("ex");
    let trace_id = uuid_hex();
    let rec = ExecutionRecord::queued(
        id.clone(),
        tenant.id.clone(),
        r.language.as_str(),
        "local".into(),
        trace_id.clone(),
        r.flow.clone(),
        now_ms(),
    );
    let actor = airlock_store::Actor {
        actor: "local".into(),
        request_id: None,
    };
    rt.block_on(store.insert_execution(&rec, &actor))
        .map_err(|e| Usage(format!("local data directory: {e}")))?;
    let quiet = r.json;
    let session = Arc::new(Session::new(
        Identity {
            tenant_id: tenant.id.clone(),
            flow_id: r.flow.clone(),
            execution_id: id.clone(),
            trace_id,
            request_id: "local".into(),
        },
        Grants {
            secrets: r.secrets.0.keys().cloned().collect(),
            variables: Default::default(),
            input: Some(r.input.clone()),
            handler: true,
            code: None,
            given_secrets: r.secrets,
        },
        Quotas::default(),
        store.clone(),
        Some(Box::new(move |rec: &Value| {
            if !quiet {
                eprintln!(
                    "airlock: log {} {} {}",
                    rec["level"].as_str().unwrap_or(""),
                    rec["message"].as_str().unwrap_or(""),
                    rec["fields"]
                );
            }
        })),
    ));
    let files = airlock_server::guest::files();
    let entry = match r.language {
        Language::Python => "/opt/airlock/python/runner.py",
        _ => "/opt/airlock/javascript/runner.js",
    };
    let extras = Extras {
        files,
        broker: true,
        entry: Some(entry.into()),
        env: vec![("AIRLOCK_MODE".into(), "handler".into())],
        egress: r.policy.network.is_proxy(),
        workspace: None,
    };
    let rules = r.policy.network.rules().map_err(|e| Usage(e.to_string()))?;
    let mut sandbox = match backend.prepare(&Spec {
        policy: r.policy,
        language: r.language,
        extras: &extras,
    }) {
        Ok(sb) => sb,
        Err(
            e @ (BackendError::Sandbox(
                SandboxError::InvalidRequest(_) | SandboxError::RuntimeMissing(_),
            )
            | BackendError::Unsupported { .. }
            | BackendError::Unavailable { .. }),
        ) => {
            return Err(Usage(e.to_string()));
        }
        Err(e) => {
            eprintln!("airlock: sandbox failed: {e}");
            return Ok(ExitCode::from(125));
        }
    };
    let proxy = match sandbox.take_egress() {
        Some(ch) => Some(crate::egress::LocalProxy::start(ch, rules, r.json).map_err(Usage)?),
        None => None,
    };
    let mut broker_std = sandbox.take_broker();
    let mut broker_task = None;
    let mut start_broker = || {
        broker_task = broker_std.take().and_then(|s| {
            let _guard = rt.enter();
            s.set_nonblocking(true).ok()?;
            let stream = tokio::net::UnixStream::from_std(s).ok()?;
            Some(rt.spawn(session.clone().serve(stream)))
        });
    };
    // The program's output goes to stderr, redacted.
    let redactor = session.redactor.clone();
    let mut reds = [
        StreamRedactor::capped(usize::MAX),
        StreamRedactor::capped(usize::MAX),
    ];
    let mut carry = [
        airlock_runtime::live::Utf8Carry::default(),
        airlock_runtime::live::Utf8Carry::default(),
    ];
    let json_mode = r.json;
    let mut on_output = |s: Stream, data: &[u8]| {
        if json_mode {
            return;
        }
        let i = usize::from(s == Stream::Stderr);
        let text = reds[i].push(&redactor, &carry[i].push(data));
        let _ = std::io::stderr().write_all(text.as_bytes());
    };
    let cancel = CancelToken::new();
    let (result, teardown) = sandbox.execute(
        Job {
            code: r.code,
            file_name: r.file_name,
            stdin: b"",
        },
        Hooks {
            on_output: &mut on_output,
            on_start: &mut start_broker,
            cancel: &cancel,
        },
    );
    drop(teardown);
    if !r.json {
        for (i, red) in reds.iter_mut().enumerate() {
            let tail = carry[i].finish();
            let mut text = red.push(&redactor, &tail);
            text.push_str(&red.finish(&redactor, false));
            let _ = std::io::stderr().write_all(text.as_bytes());
        }
    }
    if let Some(t) = broker_task {
        let _ =
            rt.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(5), t).await });
    }
    rt.block_on(session.finish());
    let decisions = proxy.map(crate::egress::LocalProxy::finish);
    let outcome = session.outcome();
    let mut doc = serde_json::to_value(&result).unwrap_or_default();
    for k in ["stdout", "stderr"] {
        if let Some(t) = doc.get_mut(k).and_then(|v| v.as_str().map(str::to_string)) {
            doc[k] = redactor.redact(&t).into();
        }
    }
    let status = if result.reason == TerminationReason::InternalError {
        ExecStatus::Failed
    } else {
        ExecStatus::Finished
    };
    let egress = decisions
        .as_ref()
        .map(|d| serde_json::to_value(d).unwrap_or_default());
    let stored = rt.block_on(store.finish_execution(
        &id,
        &Finish {
            status,
            reason: result.reason.as_str(),
            result: Some(&doc),
            error: result.error.as_deref(),
            at_ms: now_ms(),
            output: outcome.output.as_ref(),
            handler_error: outcome.handler_error.as_ref(),
            broker_error: outcome.protocol_error.as_deref(),
            egress: egress.as_ref(),
        },
    ));
    rt.block_on(store.close());
    if let Err(e) = stored {
        eprintln!(
            "airlock: could not record the run in {}: {e}",
            dir.display()
        );
    }
    if r.json {
        println!(
            "{}",
            json!({"id": id, "output": outcome.output, "handler_error": outcome.handler_error,
                   "broker_error": outcome.protocol_error, "result": doc, "egress": egress})
        );
        return Ok(if result.reason == TerminationReason::InternalError {
            ExitCode::from(125)
        } else {
            ExitCode::SUCCESS
        });
    }
    if let Some(why) = crate::limit_line(&result, r.policy) {
        eprintln!("airlock: {}: {why}", result.reason.as_str());
    }
    if result.reason == TerminationReason::InternalError {
        eprintln!(
            "airlock: sandbox failed: {}",
            result.error.as_deref().unwrap_or("internal error")
        );
        return Ok(ExitCode::from(125));
    }
    if let Some(e) = &outcome.handler_error {
        eprintln!(
            "airlock: handler failed: {}: {}",
            e["type"].as_str().unwrap_or("Error"),
            e["message"].as_str().unwrap_or("")
        );
        if let Some(tb) = e["traceback"].as_str() {
            eprint!("{tb}");
        }
        return Ok(ExitCode::from(1));
    }
    if let Some(why) = &outcome.protocol_error {
        eprintln!("airlock: broker closed the channel: {why}");
    }
    match &outcome.output {
        Some(out) if result.reason == TerminationReason::Exited => {
            println!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        _ => {
            let code = match (result.exit_code, result.signal) {
                (Some(c), _) if c != 0 => c,
                (_, Some(s)) => 128 + s,
                _ => 1,
            };
            Ok(ExitCode::from(code.clamp(0, 255) as u8))
        }
    }
}

fn uuid_hex() -> String {
    let mut b = [0u8; 16];
    let _ = airlock_sandbox::sys::getrandom(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}
