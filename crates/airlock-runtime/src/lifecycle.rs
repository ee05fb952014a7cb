//! The life of one execution on a worker thread, as named steps:
//! [`acquire`](Executor::acquire) a sandbox (warm or cold) →
//! [`mark_running`](Executor::mark_running) → open its
//! [`broker`](Executor::broker_session) and [`egress`](Executor::egress_proxy)
//! channels → execute with live, redacted output
//! ([`OutputStreams`]) → [`close_channels`](Executor::close_channels) →
//! [`final_result`](Executor::final_result) (redacted, bounded) → the
//! record, the audit and the `finished` event. Every step fails into a
//! final record; nothing of the sandbox outlives its teardown.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock_backend::{
    CancelToken, Hooks, Job as BackendJob, Prepared, Spec, Stream, TerminationReason,
};
use airlock_broker::{Identity, Quotas, Session, StreamRedactor};
use airlock_store::{ExecStatus, Finish, now_ms};
use tokio::task::JoinHandle;

use crate::egress::{EgressRecorder, EgressState};
use crate::exec::{Executor, Job, Submission};
use crate::live::{Live, Utf8Carry};

/// The live stream's view of the output: redacted as it arrives, and
/// capped on what is streamed (redacted text can be longer than what the
/// program wrote).
struct OutputStreams {
    streams: [(Utf8Carry, StreamRedactor); 2],
    redactor: Arc<airlock_broker::Redactor>,
    live: Arc<Live>,
}

impl OutputStreams {
    fn new(sub: &Submission, redactor: Arc<airlock_broker::Redactor>, live: Arc<Live>) -> Self {
        let cap = |n: u64| StreamRedactor::capped(usize::try_from(n).unwrap_or(usize::MAX));
        let l = &sub.policy.limits;
        OutputStreams {
            streams: [
                (Utf8Carry::default(), cap(l.stdout_bytes)),
                (Utf8Carry::default(), cap(l.stderr_bytes)),
            ],
            redactor,
            live,
        }
    }

    fn push(&mut self, stream: Stream, chunk: &[u8]) {
        let (kind, i) = match stream {
            Stream::Stdout => ("stdout", 0),
            Stream::Stderr => ("stderr", 1),
        };
        let (carry, red) = &mut self.streams[i];
        let text = red.push(&self.redactor, &carry.push(chunk));
        self.live.push_output(kind, &text);
    }

    /// Flushes what is held back: an incomplete UTF-8 sequence at the very
    /// end (lossily) and a possible secret prefix.
    fn finish(&mut self, truncated: [bool; 2]) {
        for (i, kind) in [(0, "stdout"), (1, "stderr")] {
            let (carry, red) = &mut self.streams[i];
            let tail = carry.finish();
            let text = red.push(&self.redactor, &tail);
            self.live.push_output(kind, &text);
            self.live
                .push_output(kind, &red.finish(&self.redactor, truncated[i]));
        }
    }
}

/// An execution running in a session, until it is final.
struct InSession(Arc<crate::session::Workspace>, String);

impl Drop for InSession {
    fn drop(&mut self) {
        self.0.end_execution(&self.1);
    }
}

/// The egress proxy of one execution, while it runs.
type EgressTask = (tokio::sync::oneshot::Sender<()>, JoinHandle<()>);

impl Executor {
    /// Runs one dequeued job to its final record.
    pub(crate) fn run(&self, job: Job) {
        let sub = &job.sub;
        // In a session: registered at admission (`submit`), unregistered
        // however this ends.
        let _in_session = sub
            .workspace
            .as_ref()
            .map(|ws| InSession(ws.clone(), sub.id.clone()));
        if let Some(r) = job.entry.cancel.reason() {
            let fin = Finish {
                error: Some("stopped before it started"),
                ..Finish::new(ExecStatus::Failed, r.as_str(), now_ms())
            };
            self.finish(&job, "", fin);
            return;
        }
        if sub.workspace.as_ref().is_some_and(|ws| ws.is_ended()) {
            let fin = Finish {
                error: Some("the session ended"),
                ..Finish::new(
                    ExecStatus::Failed,
                    TerminationReason::Cancelled.as_str(),
                    now_ms(),
                )
            };
            self.finish(&job, "", fin);
            return;
        }
        let (mut sandbox, warm) = match self.acquire(sub) {
            Ok(got) => got,
            Err(msg) => {
                let fin = Finish {
                    error: Some(&msg),
                    ..Finish::new(
                        ExecStatus::Failed,
                        TerminationReason::InternalError.as_str(),
                        now_ms(),
                    )
                };
                self.finish(&job, &sub.backend, fin);
                return;
            }
        };
        let started = now_ms();
        let marking = self.mark_running(sub, sandbox.as_ref(), started, &job.entry.cancel);
        let live = job.entry.live.clone();
        let session = self.broker_session(sub, &live, warm);
        let egress = Arc::new(EgressRecorder {
            tenant: sub.tenant_id.clone(),
            execution: sub.id.clone(),
            request: sub.request_id.clone(),
            store: self.store.clone(),
            rt: self.rt.clone(),
            redactor: session.redactor.clone(),
            state: Mutex::new(EgressState::default()),
        });
        let egress_task = self.egress_proxy(sub, sandbox.as_mut(), &egress);
        live.push(
            "started",
            serde_json::json!({ "id": sub.id, "started_at_ms": started }).to_string(),
        );
        self.metrics.running.inc();
        let mut output = OutputStreams::new(sub, session.redactor.clone(), live.clone());
        // Served from the moment the execution's clocks run (a warm runner
        // is waiting on this channel for its code).
        let mut broker_std = sandbox.take_broker();
        let mut broker_task = None;
        let mut start_broker = || {
            broker_task = broker_std.take().and_then(|std_stream| {
                let _guard = self.rt.enter();
                std_stream.set_nonblocking(true).ok()?;
                let stream = tokio::net::UnixStream::from_std(std_stream).ok()?;
                Some(self.rt.spawn(session.clone().serve(stream)))
            });
        };
        let (result, teardown) = sandbox.execute(
            BackendJob {
                code: &sub.code,
                file_name: None,
                stdin: &sub.stdin,
            },
            Hooks {
                on_output: &mut |stream, chunk| output.push(stream, chunk),
                on_start: &mut start_broker,
                cancel: &job.entry.cancel,
            },
        );
        // Waiting for the killed processes and removing host state happen
        // off this execution's path (the reaper thread).
        self.reap(teardown);
        match self.rt.block_on(marking) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(execution = %sub.id, error = %e, "marking running failed")
            }
            Err(e) => tracing::error!(execution = %sub.id, error = %e, "marking running failed"),
        }
        output.finish([result.stdout_truncated, result.stderr_truncated]);
        self.metrics.running.dec();
        self.close_channels(broker_task, egress_task);
        let egress_log = {
            let l = egress.finish();
            (!l.is_empty() || sub.policy.network.is_proxy()).then_some(serde_json::Value::Array(l))
        };
        // The broker's own audit records are bounded the same way.
        self.rt.block_on(session.finish());
        let outcome = session.outcome();
        let (result, doc) = self.final_result(sub, result, &session.redactor);
        let status = if result.reason == TerminationReason::InternalError {
            ExecStatus::Failed
        } else {
            ExecStatus::Finished
        };
        self.finish(
            &job,
            &sub.backend,
            Finish {
                status,
                reason: result.reason.as_str(),
                result: doc.as_ref(),
                error: result.error.as_deref(),
                at_ms: now_ms(),
                output: outcome.output.as_ref(),
                handler_error: outcome.handler_error.as_ref(),
                broker_error: outcome.protocol_error.as_deref(),
                egress: egress_log.as_ref(),
            },
        );
    }

    /// A sandbox for the execution: warm from its backend's pool when one
    /// fits, else prepared cold. The error is tenant-safe.
    fn acquire(&self, sub: &Submission) -> Result<(Box<dyn Prepared>, bool), String> {
        let backend = self
            .backends
            .by_name(&sub.backend)
            .ok_or_else(|| "the chosen backend is no longer offered".to_string())?;
        if let Some(sb) = self
            .pools
            .as_ref()
            .filter(|_| sub.workspace.is_none())
            .and_then(|p| p.take(backend, sub.language, &sub.policy, handshake_len(sub)))
        {
            return Ok((sb, true));
        }
        let mut extras = crate::pool::extras(
            &self.guest,
            sub.language,
            if sub.grants.handler {
                "handler"
            } else {
                "script"
            },
            sub.policy.network.is_proxy(),
        );
        extras.workspace = sub.workspace.as_ref().map(|w| w.path.clone());
        backend
            .prepare(&Spec {
                policy: &sub.policy,
                language: sub.language,
                extras: &extras,
            })
            .map(|sb| (sb, false))
            .map_err(|e| {
                tracing::error!(execution = %sub.id, backend = backend.name(), error = %e, "sandbox creation failed");
                e.public_message()
            })
    }

    /// Records the execution as running with what a crash would leave of
    /// its sandbox. Done while it starts, not before: the acceptance is
    /// already durable, and after a crash recovery fails the execution
    /// whether it was marked or not, and sweeps the dead engine's host
    /// state either way. Awaited before the execution is finished.
    ///
    /// A record that is no longer queued was ended by someone else while
    /// this node dequeued it: another node that declared this one lost
    /// (the only writer that ends another node's queued work). Its record
    /// is final, so the program is stopped rather than run to a result
    /// nobody can record.
    fn mark_running(
        &self,
        sub: &Submission,
        sandbox: &dyn Prepared,
        started: i64,
        cancel: &CancelToken,
    ) -> JoinHandle<Result<(), airlock_store::StoreError>> {
        let host_state = sandbox.host_state().to_string();
        let (store, id, cancel) = (self.store.clone(), sub.id.clone(), cancel.clone());
        self.rt.spawn(async move {
            let r = store.mark_running(&id, started, &host_state).await;
            if let Err(airlock_store::StoreError::NotFound(_)) = &r {
                cancel.cancel(TerminationReason::NodeLost);
            }
            r
        })
    }

    /// The broker for exactly this execution, its identity fixed here.
    fn broker_session(&self, sub: &Submission, live: &Arc<Live>, warm: bool) -> Arc<Session> {
        let log_live = live.clone();
        Arc::new(Session::new(
            Identity {
                tenant_id: sub.tenant_id.clone(),
                flow_id: sub.flow_id.clone(),
                execution_id: sub.id.clone(),
                trace_id: sub.trace_id.clone(),
                request_id: sub.request_id.clone(),
            },
            airlock_broker::Grants {
                // A warm runner receives its code with `hello`.
                code: warm.then(|| String::from_utf8_lossy(&sub.code).into_owned()),
                ..sub.grants.clone()
            },
            Quotas::default(),
            self.store.clone(),
            Some(Box::new(move |rec: &serde_json::Value| {
                log_live.push("log", rec.to_string());
            })),
        ))
    }

    /// The egress proxy of exactly this execution (proxy policies only).
    fn egress_proxy(
        &self,
        sub: &Submission,
        sandbox: &mut dyn Prepared,
        recorder: &Arc<EgressRecorder>,
    ) -> Option<EgressTask> {
        let channel = sandbox.take_egress()?;
        let rules = sub.policy.network.rules().ok()?;
        let resolver = self.resolver.clone()?;
        let recorder = recorder.clone();
        let sink: airlock_egress::Sink =
            Arc::new(move |ev: airlock_egress::EgressEvent| recorder.record(ev));
        let proxy = airlock_egress::Proxy::new(rules, resolver, sink);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        Some((stop, self.rt.spawn(proxy.serve_channel(channel, stopped))))
    }

    /// Nothing may act for the execution once it is final: a task still
    /// running after its grace is aborted, and awaited, so everything it
    /// recorded on the way out (an egress flow cut off) is in before the
    /// record is written.
    fn close_channels(&self, broker: Option<JoinHandle<()>>, egress: Option<EgressTask>) {
        // Every process of the sandbox is gone, so the channel is closed:
        // the broker task ends at EOF.
        if let Some(mut t) = broker {
            self.rt.block_on(async move {
                if tokio::time::timeout(Duration::from_secs(5), &mut t)
                    .await
                    .is_err()
                {
                    t.abort();
                    let _ = t.await;
                }
            });
        }
        // Connections still open get a moment, then are cut, each
        // reporting its flow before the proxy returns.
        if let Some((cut, mut t)) = egress {
            self.rt.block_on(async move {
                if tokio::time::timeout(Duration::from_secs(2), &mut t)
                    .await
                    .is_err()
                {
                    let _ = cut.send(());
                    if tokio::time::timeout(Duration::from_secs(5), &mut t)
                        .await
                        .is_err()
                    {
                        t.abort();
                        let _ = t.await;
                    }
                }
            });
        }
    }

    /// The result as stored: output redacted within its caps (and as
    /// base64 bytes when asked).
    fn final_result(
        &self,
        sub: &Submission,
        mut result: airlock_backend::RunResult,
        redactor: &airlock_broker::Redactor,
    ) -> (airlock_backend::RunResult, Option<serde_json::Value>) {
        let limits = &sub.policy.limits;
        let capped = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        result.stdout = redactor.redact_capped(
            &result.stdout,
            result.stdout_truncated,
            capped(limits.stdout_bytes),
        );
        result.stderr = redactor.redact_capped(
            &result.stderr,
            result.stderr_truncated,
            capped(limits.stderr_bytes),
        );
        let mut doc = serde_json::to_value(&result).ok();
        if sub.base64_output
            && let Some(obj) = doc.as_mut().and_then(serde_json::Value::as_object_mut)
        {
            use base64::Engine as _;
            for (key, raw, truncated, cap) in [
                (
                    "stdout_base64",
                    &result.stdout_raw,
                    result.stdout_truncated,
                    limits.stdout_bytes,
                ),
                (
                    "stderr_base64",
                    &result.stderr_raw,
                    result.stderr_truncated,
                    limits.stderr_bytes,
                ),
            ] {
                let bytes = redactor.redact_bytes_capped(raw, truncated, capped(cap));
                obj.insert(
                    key.into(),
                    base64::engine::general_purpose::STANDARD
                        .encode(bytes)
                        .into(),
                );
            }
        }
        (result, doc)
    }
}

/// The JSON size of what a warm runner receives in its handshake (code and
/// input). JSON escaping at most sextuples a byte: only code that might
/// not fit is measured exactly.
fn handshake_len(sub: &Submission) -> usize {
    let code_json = if sub.code.len() * 6 <= airlock_broker::MAX_FRAME / 4 {
        sub.code.len() * 6
    } else {
        airlock_broker::json_len(&String::from_utf8_lossy(&sub.code))
    };
    code_json.saturating_add(
        sub.grants
            .input
            .as_ref()
            .map_or(0, airlock_broker::json_len),
    )
}
