//! The executor: admission (bounded concurrency + bounded queue, with
//! per-tenant shares of both), fair dispatch across tenants, worker threads
//! that own the sandboxes, cancellation and drain.
//!
//! Fairness: each tenant has a share (executions it may run at once and
//! have waiting; see [`TenantShare`]). The server admits at most
//! `max_concurrent + queue_size`; a tenant may have at most `max_queued`
//! waiting beyond the workers it could start on at once (a quarter of the
//! queue by default), so it takes four tenants, whatever the number of
//! cores, to fill the server for everyone. A free worker takes the next
//! execution of the waiting tenant that runs the fewest (ties: the one
//! waiting longest), never one of a tenant at its `max_running` (a cancelled
//! one excepted: it ends at once), so a tenant with a long backlog cannot
//! starve one that just arrived.
//!
//! Workers are long-lived OS threads, not tokio tasks: the engine is
//! synchronous, and `PR_SET_PDEATHSIG` (which kills a sandbox when the
//! thread that spawned it dies) follows the spawning *thread*, so sandboxes
//! must be spawned from threads that live as long as the server.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use airlock_broker::{Grants, Identity, Quotas, Session, StreamRedactor};
use airlock_policy::{Language, Policy};
use airlock_sandbox::{CancelToken, Engine, Extras, Stream, TerminationReason};
use airlock_store::{ExecStatus, Finish, NewAudit, Store, now_ms};
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::live::{Live, Utf8Carry};
use crate::metrics::{Metrics, ReasonLabel};

/// What a worker needs to run one execution.
#[derive(Debug)]
pub struct Submission {
    /// Execution id.
    pub id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Request id (audit).
    pub request_id: String,
    /// Language.
    pub language: Language,
    /// Code.
    pub code: Vec<u8>,
    /// stdin.
    pub stdin: Vec<u8>,
    /// Resolved policy.
    pub policy: Policy,
    /// Flow (memory scope).
    pub flow_id: String,
    /// W3C trace id.
    pub trace_id: String,
    /// What the broker may hand out.
    pub grants: Grants,
    /// The record also carries stdout and stderr as base64 bytes.
    pub base64_output: bool,
}

/// The executor no longer takes jobs.
#[derive(Debug, Clone, Copy)]
pub struct Stopped;

/// A running or queued execution, as the API sees it.
#[derive(Debug)]
pub struct Entry {
    /// Owning tenant (checked before anything is shown or cancelled).
    pub tenant_id: String,
    /// Event log.
    pub live: Arc<Live>,
    /// Kill switch.
    pub cancel: CancelToken,
    /// A worker has taken it off the queue.
    pub dequeued: std::sync::atomic::AtomicBool,
}

struct Job {
    sub: Submission,
    entry: Arc<Entry>,
    accepted: Instant,
    _slot: Slot,
}

/// One admitted execution's place (in the server's and its tenant's
/// count); released when dropped.
#[derive(Debug)]
pub struct Slot {
    exec: Arc<Executor>,
    tenant: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.exec.sched();
        s.admitted -= 1;
        if let Some(t) = s.tenants.get_mut(&self.tenant) {
            t.admitted -= 1;
        }
        s.prune(&self.tenant);
        self.exec.idle.send_replace(s.admitted);
    }
}

/// What one tenant may hold of the node's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantShare {
    /// Executions it may run at once.
    pub max_running: usize,
    /// Executions it may have waiting for a worker.
    pub max_queued: usize,
}

/// Why an execution was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// Running + queued executions are at the server's capacity.
    Server,
    /// The tenant holds its whole share.
    Tenant(TenantShare),
}

#[derive(Default)]
struct TenantQueue {
    /// Admitted and not yet finished (queued, running, finishing).
    admitted: usize,
    running: usize,
    queued: std::collections::VecDeque<Job>,
    max_running: usize,
}

/// Admission counts and the per-tenant queues, under one lock.
#[derive(Default)]
struct Sched {
    /// Admitted over all tenants.
    admitted: usize,
    /// Running over all tenants.
    running: usize,
    tenants: HashMap<String, TenantQueue>,
    /// Tenants with queued executions, longest waiting first.
    order: std::collections::VecDeque<String>,
    /// Set by [`Executor::stop`]: workers leave once nothing is queued.
    stopped: bool,
}

impl Sched {
    /// Forgets a tenant that holds nothing (the map stays bounded by the
    /// tenants that are active).
    fn prune(&mut self, tenant: &str) {
        if self
            .tenants
            .get(tenant)
            .is_some_and(|t| t.admitted == 0 && t.running == 0 && t.queued.is_empty())
        {
            self.tenants.remove(tenant);
        }
    }

    /// The next job to run: of the waiting tenants below their running
    /// share, the one running the fewest (ties: waiting longest). A tenant
    /// at its share whose next job is cancelled is eligible too: that job
    /// only records its end, and must not hold its place meanwhile.
    fn next_job(&mut self) -> Option<Job> {
        let mut best: Option<(usize, usize)> = None;
        for (i, name) in self.order.iter().enumerate() {
            let Some(t) = self.tenants.get(name) else {
                continue;
            };
            let cancelled = t
                .queued
                .front()
                .is_some_and(|j| j.entry.cancel.reason().is_some());
            if t.running >= t.max_running && !cancelled {
                continue;
            }
            if best.is_none_or(|(_, r)| t.running < r) {
                best = Some((i, t.running));
            }
        }
        let (i, _) = best?;
        let name = self.order.remove(i)?;
        let t = self.tenants.get_mut(&name)?;
        let job = t.queued.pop_front()?;
        t.running += 1;
        self.running += 1;
        if !t.queued.is_empty() {
            self.order.push_back(name);
        }
        Some(job)
    }
}

/// A job a worker runs: releases the tenant's running place when dropped,
/// also if running it panicked.
struct Running<'a> {
    exec: &'a Executor,
    tenant: String,
    id: String,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.exec
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        {
            let mut s = self.exec.sched();
            s.running -= 1;
            if let Some(t) = s.tenants.get_mut(&self.tenant) {
                t.running -= 1;
            }
            self.exec.publish(&self.tenant, &s);
            s.prune(&self.tenant);
        }
        // A tenant held back by its running share may go now.
        self.exec.work.notify_all();
    }
}

/// Renders a finished record for the `finished` event (set by the API).
pub type RecordRenderer = dyn Fn(&airlock_store::ExecutionRecord) -> String + Send + Sync;

/// Admission, workers and the registry of live executions.
pub struct Executor {
    sched: Mutex<Sched>,
    /// Signalled when a job is queued or a running one ends.
    work: std::sync::Condvar,
    accepting: std::sync::atomic::AtomicBool,
    /// Running + waiting executions admitted at most.
    capacity: usize,
    shares: TenantShares,
    idle: watch::Sender<usize>,
    registry: Mutex<HashMap<String, Arc<Entry>>>,
    store: Arc<dyn Store>,
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    rt: Handle,
    render: Box<RecordRenderer>,
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    guest: Option<Vec<(String, Arc<str>)>>,
    resolver: Option<Arc<airlock_egress::Resolver>>,
    pool_spec: Option<PoolSpec>,
    pool: Pool,
    workers_n: usize,
    refill: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Teardowns of finished sandboxes (waiting for their killed processes,
    /// removing their cgroups), done by one thread off the request path.
    reaper: Mutex<
        Option<(
            Sender<airlock_sandbox::Teardown>,
            std::thread::JoinHandle<()>,
        )>,
    >,
}

/// Egress decisions kept in an execution's record, per kind: denials
/// (which a program can produce at will) never crowd out what got through.
const EGRESS_LOG_MAX: usize = 256;
/// Egress decisions audited one by one per execution, per kind; beyond
/// that they are counted, and one `egress.summary` record at the end says
/// how many more there were (a program can open thousands of connections a
/// second: the audit chain must not grow with them).
const EGRESS_AUDIT_MAX: u64 = 64;
/// Distinct destinations named in the summary.
const EGRESS_SUMMARY_HOSTS: usize = 32;

/// What one kind of egress decision (allowed or denied) added up to.
#[derive(Debug, Default)]
struct EgressTally {
    /// Decisions of this kind.
    total: u64,
    /// Kept in the record.
    logged: usize,
    /// Bytes up and down of those not audited one by one.
    unaudited_up: u64,
    unaudited_down: u64,
    /// `host:port` -> decisions not audited one by one (bounded).
    unaudited_hosts: std::collections::BTreeMap<String, u64>,
}

impl EgressTally {
    fn unaudited(&self) -> u64 {
        self.total.saturating_sub(EGRESS_AUDIT_MAX)
    }

    fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "total": self.total,
            "audited": self.total.min(EGRESS_AUDIT_MAX),
            "not_audited": self.unaudited(),
            "not_audited_bytes_up": self.unaudited_up,
            "not_audited_bytes_down": self.unaudited_down,
            "not_audited_destinations": self.unaudited_hosts,
        })
    }
}

/// Records one execution's egress decisions: in its record (bounded), in
/// the audit chain (each of the first [`EGRESS_AUDIT_MAX`] per kind, then
/// one summary), with secret values redacted from every field (a program
/// can put a value it read into a host name).
struct EgressRecorder {
    tenant: String,
    execution: String,
    request: String,
    store: Arc<dyn Store>,
    rt: Handle,
    redactor: Arc<airlock_broker::Redactor>,
    state: Mutex<EgressState>,
}

#[derive(Default)]
struct EgressState {
    log: Vec<serde_json::Value>,
    allowed: EgressTally,
    denied: EgressTally,
    /// Audit appends in flight, awaited before the record is final.
    pending: Vec<tokio::task::JoinHandle<()>>,
}

impl EgressRecorder {
    fn record(&self, mut ev: airlock_egress::EgressEvent) {
        // Redacted as text that may have been cut (the proxy bounds what it
        // reports, which can cut a value), then bounded again: a marker can
        // be longer than what it hides.
        let r = &self.redactor;
        for (field, max) in [(&mut ev.host, 255), (&mut ev.method, 16)] {
            *field = r.redact_truncated(field);
            airlock_broker::redact::cut_to(field, max);
        }
        for (field, max) in [(&mut ev.reason, 300), (&mut ev.address, 64)] {
            if let Some(f) = field {
                *f = r.redact_truncated(f);
                airlock_broker::redact::cut_to(f, max);
            }
        }
        let v = serde_json::to_value(&ev).unwrap_or_default();
        let subject = format!("{}:{}", ev.host, ev.port);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let st = &mut *st;
        let tally = if ev.decision == "allowed" {
            &mut st.allowed
        } else {
            &mut st.denied
        };
        tally.total += 1;
        if tally.logged < EGRESS_LOG_MAX {
            tally.logged += 1;
            st.log.push(v.clone());
        }
        if tally.total > EGRESS_AUDIT_MAX {
            tally.unaudited_up += ev.bytes_up;
            tally.unaudited_down += ev.bytes_down;
            let n = tally.unaudited_hosts.len();
            if let Some(c) = tally.unaudited_hosts.get_mut(&subject) {
                *c += 1;
            } else if n < EGRESS_SUMMARY_HOSTS {
                tally.unaudited_hosts.insert(subject, 1);
            }
            return;
        }
        let audit = NewAudit::new(
            Some(&self.tenant),
            &format!("egress.{}", ev.decision),
            &format!("execution:{}", self.execution),
            &subject,
            Some(&self.request),
        )
        .with_detail(v);
        let store = self.store.clone();
        st.pending.push(self.rt.spawn(async move {
            if let Err(e) = store.append_audit(audit).await {
                tracing::error!(error = %e, "egress audit failed");
            }
        }));
    }

    /// Once the proxy has stopped: waits for the audits, appends the
    /// summary when decisions went unaudited, and returns the record's log.
    fn finish(&self) -> Vec<serde_json::Value> {
        let (pending, summary, log) = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let summary = (st.allowed.unaudited() + st.denied.unaudited() > 0).then(|| {
                serde_json::json!({
                    "allowed": st.allowed.summary(),
                    "denied": st.denied.summary(),
                })
            });
            (
                std::mem::take(&mut st.pending),
                summary,
                std::mem::take(&mut st.log),
            )
        };
        self.rt.block_on(async {
            for h in pending {
                let _ = h.await;
            }
            if let Some(detail) = summary {
                let audit = NewAudit::new(
                    Some(&self.tenant),
                    "egress.summary",
                    &format!("execution:{}", self.execution),
                    &self.execution,
                    Some(&self.request),
                )
                .with_detail(detail);
                if let Err(e) = self.store.append_audit(audit).await {
                    tracing::error!(error = %e, "egress audit failed");
                }
            }
        });
        log
    }
}

/// Records one more failure of `lang`'s pool: it waits 1 s, doubling to
/// 60 s, before the next attempt. Returns the wait.
fn back_off(backoff: &mut HashMap<Language, (Instant, Duration)>, lang: Language) -> Duration {
    let wait = backoff.get(&lang).map_or(Duration::from_secs(1), |(_, w)| {
        (*w * 2).min(Duration::from_secs(60))
    });
    backoff.insert(lang, (Instant::now() + wait, wait));
    wait
}

/// Where the guest SDKs appear inside every sandbox (read-only).
pub const GUEST_MOUNT: &str = "/opt/airlock";

/// Sandboxes one python zygote forks before it is replaced.
pub const ZYGOTE_FORKS: u64 = 1000;

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("capacity", &self.capacity)
            .field("admitted", &self.sched().admitted)
            .finish_non_exhaustive()
    }
}

/// Warm sandboxes: fully isolated, runtime and guest SDK loaded, no tenant
/// data, waiting to be bound to exactly one execution.
#[derive(Debug)]
pub struct PoolSpec {
    /// The policy warm sandboxes are built with (the server's base policy;
    /// only executions with exactly this policy use them).
    pub policy: Policy,
    /// Idle sandboxes to keep per language.
    pub targets: Vec<(Language, usize)>,
}

#[derive(Debug, Default)]
struct Pool {
    idle: Mutex<HashMap<Language, std::collections::VecDeque<airlock_sandbox::Sandbox>>>,
    /// The python zygote, shared with the workers: when the pool is empty,
    /// an execution that fits it is forked from it on demand instead of
    /// starting cold. Owned (started, replaced) by the refill thread.
    zygote: Mutex<Option<Arc<airlock_sandbox::Zygote>>>,
    /// Refill requests (and stop) for the refill thread.
    wake: std::sync::Condvar,
    stop: Mutex<bool>,
}

/// What the executor works with.
#[allow(missing_debug_implementations)]
pub struct Deps {
    /// Storage.
    pub store: Arc<dyn Store>,
    /// The sandbox engine.
    pub engine: Arc<Engine>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Renders the `finished` event.
    pub render: Box<RecordRenderer>,
    /// Guest SDK files written at /opt/airlock in every sandbox.
    pub guest: Option<Vec<(String, Arc<str>)>>,
    /// Resolver for egress proxies (none: egress executions get no proxy).
    pub resolver: Option<Arc<airlock_egress::Resolver>>,
    /// Warm pools (none: every execution starts cold).
    pub pool: Option<PoolSpec>,
    /// Tenants' shares: the default, and some tenants' own (by name).
    pub shares: (TenantShare, HashMap<String, TenantShare>),
}

/// Tenants' shares; names are resolved to ids lazily (tenants may be
/// created while the server runs).
struct TenantShares {
    default: TenantShare,
    by_name: HashMap<String, TenantShare>,
    by_id: Mutex<HashMap<String, TenantShare>>,
}

impl Executor {
    /// Starts `workers` worker threads; at most `workers + queue` executions
    /// are admitted at once.
    pub fn start(workers: usize, queue: usize, deps: Deps) -> std::io::Result<Arc<Self>> {
        let Deps {
            store,
            engine,
            metrics,
            render,
            guest,
            resolver,
            pool: pool_spec,
            shares: (default_share, by_name),
        } = deps;
        let exec = Arc::new(Executor {
            sched: Mutex::new(Sched::default()),
            work: std::sync::Condvar::new(),
            accepting: std::sync::atomic::AtomicBool::new(true),
            capacity: workers + queue,
            shares: TenantShares {
                default: default_share,
                by_name,
                by_id: Mutex::new(HashMap::new()),
            },
            idle: watch::channel(0).0,
            registry: Mutex::new(HashMap::new()),
            store,
            engine,
            metrics,
            rt: Handle::current(),
            render,
            workers: Mutex::new(Vec::new()),
            guest,
            resolver,
            pool_spec: pool_spec.filter(|p| p.targets.iter().any(|(_, n)| *n > 0)),
            pool: Pool::default(),
            workers_n: workers,
            refill: Mutex::new(None),
            reaper: Mutex::new(None),
        });
        let (reap_tx, reap_rx) = mpsc::channel::<airlock_sandbox::Teardown>();
        let reaper = std::thread::Builder::new()
            .name("airlock-reaper".into())
            .spawn(move || {
                for t in reap_rx {
                    drop(t);
                }
            })?;
        *exec.reaper.lock().unwrap_or_else(|p| p.into_inner()) = Some((reap_tx, reaper));
        let mut handles = Vec::with_capacity(workers);
        for i in 0..workers {
            let e = exec.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("airlock-worker-{i}"))
                    .spawn(move || e.worker())?,
            );
        }
        *exec.workers.lock().unwrap_or_else(|p| p.into_inner()) = handles;
        if exec.pool_spec.is_some() && exec.guest.is_some() {
            // Long-lived, like the workers: sandboxes die with the thread
            // that spawned them (PDEATHSIG).
            let e = exec.clone();
            *exec.refill.lock().unwrap_or_else(|p| p.into_inner()) = Some(
                std::thread::Builder::new()
                    .name("airlock-pool".into())
                    .spawn(move || e.refill_loop())?,
            );
        }
        Ok(exec)
    }

    fn sched(&self) -> std::sync::MutexGuard<'_, Sched> {
        self.sched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The share of a tenant: its own when the configuration names it,
    /// else the default. Names are looked up once per tenant id.
    pub async fn share_for(
        &self,
        tenant_id: &str,
    ) -> Result<TenantShare, airlock_store::StoreError> {
        let sh = &self.shares;
        if sh.by_name.is_empty() {
            return Ok(sh.default);
        }
        if let Some(v) = sh
            .by_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant_id)
        {
            return Ok(*v);
        }
        let tenants = self.store.list_tenants().await?;
        let mut by_id = sh.by_id.lock().unwrap_or_else(|p| p.into_inner());
        for t in tenants {
            let share = sh.by_name.get(&t.name).copied().unwrap_or(sh.default);
            by_id.insert(t.id, share);
        }
        Ok(by_id.get(tenant_id).copied().unwrap_or(sh.default))
    }

    /// Reserves a place for one of `tenant`'s executions, or says which
    /// limit is reached: the server's capacity (`max_concurrent +
    /// queue_size`), or the tenant's part of the queue. A tenant's waiting
    /// executions are counted beyond the workers it could use at once, so
    /// the number of workers does not change how many tenants it takes to
    /// fill the queue (four at the default quarter each).
    pub fn try_admit(self: &Arc<Self>, tenant: &str, share: TenantShare) -> Result<Slot, Full> {
        let mut s = self.sched();
        if s.admitted >= self.capacity {
            return Err(Full::Server);
        }
        let (held, running) = s
            .tenants
            .get(tenant)
            .map_or((0, 0), |t| (t.admitted, t.running));
        // Workers this tenant could still start on now.
        let free = share
            .max_running
            .saturating_sub(running)
            .min(self.workers_n.saturating_sub(s.running));
        let waiting = held.saturating_sub(running + free);
        if waiting >= share.max_queued {
            drop(s);
            self.metrics
                .tenant_queue_rejections
                .get_or_create(&crate::metrics::TenantLabel {
                    tenant: tenant.to_string(),
                })
                .inc();
            return Err(Full::Tenant(share));
        }
        let t = s.tenants.entry(tenant.to_string()).or_default();
        t.admitted += 1;
        t.max_running = share.max_running;
        s.admitted += 1;
        self.idle.send_replace(s.admitted);
        Ok(Slot {
            exec: self.clone(),
            tenant: tenant.to_string(),
        })
    }

    /// Publishes a tenant's running and queued counts.
    fn publish(&self, tenant: &str, s: &Sched) {
        let label = crate::metrics::TenantLabel {
            tenant: tenant.to_string(),
        };
        let (running, queued) = s
            .tenants
            .get(tenant)
            .map_or((0, 0), |t| (t.running, t.queued.len()));
        self.metrics
            .tenant_running
            .get_or_create(&label)
            .set(running as i64);
        self.metrics
            .tenant_queued
            .get_or_create(&label)
            .set(queued as i64);
    }

    /// Queues an admitted execution (its record already exists). Fails only
    /// once the executor is stopping.
    pub fn submit(&self, slot: Slot, sub: Submission) -> Result<Arc<Entry>, Stopped> {
        let entry = Arc::new(Entry {
            tenant_id: sub.tenant_id.clone(),
            live: Arc::new(Live::default()),
            cancel: CancelToken::new(),
            dequeued: std::sync::atomic::AtomicBool::new(false),
        });
        let mut s = self.sched();
        if s.stopped || !self.accepting.load(Ordering::SeqCst) {
            return Err(Stopped);
        }
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sub.id.clone(), entry.clone());
        self.metrics.queue_depth.inc();
        let tenant = sub.tenant_id.clone();
        let job = Job {
            sub,
            entry: entry.clone(),
            accepted: Instant::now(),
            _slot: slot,
        };
        let t = s.tenants.entry(tenant.clone()).or_default();
        t.queued.push_back(job);
        if t.queued.len() == 1 {
            s.order.push_back(tenant.clone());
        }
        self.publish(&tenant, &s);
        drop(s);
        self.work.notify_one();
        Ok(entry)
    }

    /// The live entry of a queued or running execution.
    pub fn entry(&self, id: &str) -> Option<Arc<Entry>> {
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Cancels every queued and running execution with `reason`.
    pub fn cancel_all(&self, reason: TerminationReason) {
        for e in self
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            e.cancel.cancel(reason);
        }
    }

    /// Refuses every later submission (taken under the queue lock, so no
    /// submission can slip in after this returns).
    pub fn close_intake(&self) {
        let _guard = self.sched();
        self.accepting.store(false, Ordering::SeqCst);
    }

    /// Cancels executions no worker has taken yet.
    pub fn cancel_queued(&self, reason: TerminationReason) {
        for e in self
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            if !e.dequeued.load(Ordering::SeqCst) {
                e.cancel.cancel(reason);
            }
        }
    }

    /// Whether executions can get an egress proxy (a resolver exists).
    pub fn egress_available(&self) -> bool {
        self.resolver.is_some()
    }

    /// Executions admitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.sched().admitted
    }

    /// Waits until nothing is in flight or `timeout` passes; true if idle.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let mut rx = self.idle.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Stops taking jobs and joins the workers (call once idle).
    pub fn stop(&self) {
        self.sched().stopped = true;
        self.work.notify_all();
        let handles = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for h in handles {
            let _ = h.join();
        }
        // Every pending teardown completes before the server exits.
        if let Some((tx, h)) = self.reaper.lock().unwrap_or_else(|p| p.into_inner()).take() {
            drop(tx);
            let _ = h.join();
        }
        *self.pool.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.pool.wake.notify_all();
        if let Some(h) = self.refill.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
        // Idle warm sandboxes are destroyed (every process killed, cgroup
        // removed) as they drop.
        self.pool
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn pool_extras(&self, lang: Language) -> Extras {
        let mut x = Extras {
            broker: true,
            ..Extras::default()
        };
        if let Some(g) = &self.guest {
            x.files.extend(g.iter().cloned());
        }
        x.entry = match lang {
            Language::Python => Some(format!("{GUEST_MOUNT}/python/runner.py")),
            Language::Javascript => Some(format!("{GUEST_MOUNT}/javascript/runner.js")),
            Language::Shell => None,
        };
        x.env.push(("AIRLOCK_MODE".into(), "pooled".into()));
        x
    }

    /// Keeps every pool at its target. Creates only while a worker is free,
    /// so refilling never competes with executions for the CPU it needs.
    fn refill_loop(&self) {
        let Some(spec) = &self.pool_spec else { return };
        // After a failure a language waits (1 s, doubling to 60 s) before
        // the next attempt: a missing runtime must not spin or flood logs.
        let mut backoff: HashMap<Language, (Instant, Duration)> = HashMap::new();
        // Python sandboxes are forked by a zygote (interpreter and SDK
        // already loaded) when the host has a shared libpython; it lives on
        // this thread, like everything it forks. Without one, or while it
        // fails, sandboxes start cold as before.
        let mut zygote: Option<Arc<airlock_sandbox::Zygote>> = None;
        let mut zygote_retry = Instant::now();
        loop {
            if *self.pool.stop.lock().unwrap_or_else(|p| p.into_inner()) {
                return;
            }
            for (lang, target) in &spec.targets {
                if *lang == Language::Shell
                    || backoff
                        .get(lang)
                        .is_some_and(|(until, _)| Instant::now() < *until)
                {
                    continue;
                }
                // Sandboxes that died idle are dropped here; if they keep
                // dying, this language backs off like a failed creation.
                let died = {
                    let mut idle = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
                    let q = idle.entry(*lang).or_default();
                    let before = q.len();
                    q.retain(airlock_sandbox::Sandbox::is_alive);
                    before - q.len()
                };
                if died > 0 {
                    self.metrics
                        .pool_discarded
                        .get_or_create(&crate::metrics::LangLabel {
                            language: lang.as_str().into(),
                        })
                        .inc_by(died as u64);
                    let wait = back_off(&mut backoff, *lang);
                    tracing::warn!(
                        language = lang.as_str(),
                        died,
                        retry_in_s = wait.as_secs(),
                        "warm sandboxes died while idle"
                    );
                    continue;
                }
                loop {
                    let have = self
                        .pool
                        .idle
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(lang)
                        .map_or(0, |q| q.len());
                    self.metrics
                        .pool_size
                        .get_or_create(&crate::metrics::LangLabel {
                            language: lang.as_str().into(),
                        })
                        .set(have as i64);
                    let stopping = *self.pool.stop.lock().unwrap_or_else(|p| p.into_inner())
                        || !self.accepting.load(Ordering::SeqCst);
                    if have >= *target || self.in_flight() >= self.workers_n || stopping {
                        break;
                    }
                    let t = Instant::now();
                    let extras = self.pool_extras(*lang);
                    if *lang == Language::Python {
                        self.keep_zygote(&mut zygote, &mut zygote_retry, &spec.policy, &extras);
                    }
                    let made = match (&zygote, *lang) {
                        (Some(z), Language::Python) => {
                            let made = self.engine.prepare_from(z.as_ref());
                            self.publish_forks(Some(z));
                            made
                        }
                        _ => self.engine.prepare_with(&spec.policy, *lang, &extras),
                    }
                    .and_then(|mut sb| sb.prestart().map(|_| sb));
                    match made {
                        Ok(sb) => {
                            backoff.remove(lang);
                            self.metrics.pool_create.observe(t.elapsed().as_secs_f64());
                            self.pool
                                .idle
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .entry(*lang)
                                .or_default()
                                .push_back(sb);
                        }
                        Err(e) => {
                            let wait = back_off(&mut backoff, *lang);
                            tracing::warn!(language = lang.as_str(), error = %e, retry_in_s = wait.as_secs(), "warm sandbox creation failed");
                            break;
                        }
                    }
                }
            }
            let g = self.pool.stop.lock().unwrap_or_else(|p| p.into_inner());
            if *g {
                return;
            }
            let _ = self.pool.wake.wait_timeout(g, Duration::from_millis(500));
        }
    }

    /// Keeps a working zygote in `slot`: replaces a dead one and one that
    /// has forked [`ZYGOTE_FORKS`] sandboxes (which bounds how many
    /// sandboxes share its address-space layout and hash key), and after a
    /// failure waits a minute before trying again.
    fn keep_zygote(
        &self,
        slot: &mut Option<Arc<airlock_sandbox::Zygote>>,
        retry: &mut Instant,
        policy: &Policy,
        extras: &Extras,
    ) {
        if slot
            .as_ref()
            .is_some_and(|z| !z.is_alive() || z.forks() >= ZYGOTE_FORKS)
        {
            // Retired: it exits once the sandboxes it forked have ended.
            *slot = None;
        }
        if slot.is_none() && Instant::now() >= *retry {
            match self.engine.start_zygote(policy, extras) {
                Ok(z) => {
                    tracing::info!(python = z.version(), "python zygote started");
                    *slot = Some(Arc::new(z));
                }
                Err(e) => {
                    *retry = Instant::now() + Duration::from_secs(60);
                    tracing::warn!(error = %e, "no python zygote; warm python sandboxes start cold");
                }
            }
        }
        self.publish_forks(slot.as_deref());
        *self.pool.zygote.lock().unwrap_or_else(|p| p.into_inner()) = slot.clone();
    }

    /// Publishes how many sandboxes the current zygote has forked (after
    /// every fork, so the gauge never lags behind the pool).
    fn publish_forks(&self, zygote: Option<&airlock_sandbox::Zygote>) {
        self.metrics
            .pool_zygote_forks
            .get_or_create(&crate::metrics::LangLabel {
                language: Language::Python.as_str().into(),
            })
            .set(zygote.map_or(0, |z| z.forks() as i64));
    }

    /// A warm sandbox for this execution, when one fits it exactly.
    fn take_warm(&self, sub: &Submission) -> Option<airlock_sandbox::Sandbox> {
        let spec = self.pool_spec.as_ref()?;
        if !spec
            .targets
            .iter()
            .any(|(l, n)| *l == sub.language && *n > 0)
        {
            return None;
        }
        let label = crate::metrics::LangLabel {
            language: sub.language.as_str().into(),
        };
        // Warm sandboxes are built for the base policy without egress; any
        // other policy has no pool and starts cold (a miss).
        // The code travels in one broker reply (at most 1 MiB): big code
        // and input start cold instead.
        // JSON escaping at most sextuples a byte: only code that might not
        // fit is measured exactly.
        let code_json = if sub.code.len() * 6 <= airlock_broker::MAX_FRAME / 4 {
            sub.code.len() * 6
        } else {
            airlock_broker::json_len(&String::from_utf8_lossy(&sub.code))
        };
        let handshake = code_json.saturating_add(
            sub.grants
                .input
                .as_ref()
                .map_or(0, airlock_broker::json_len),
        );
        if sub.policy != spec.policy
            || sub.policy.network.is_proxy()
            || handshake > airlock_broker::MAX_FRAME / 2
        {
            self.metrics.pool_misses.get_or_create(&label).inc();
            return None;
        }
        let got = loop {
            let next = self
                .pool
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(&sub.language)
                .and_then(|q| q.pop_front());
            match next {
                Some(sb) if sb.is_alive() => break Some(sb),
                Some(dead) => {
                    // Died while idle: destroyed here, never used.
                    self.metrics.pool_discarded.get_or_create(&label).inc();
                    drop(dead);
                }
                None => break None,
            }
        };
        match &got {
            Some(_) => self.metrics.pool_hits.get_or_create(&label).inc(),
            None => self.metrics.pool_misses.get_or_create(&label).inc(),
        };
        self.pool.wake.notify_all();
        if got.is_none() && sub.language == Language::Python {
            // Empty pool: a fork from the zygote is still far cheaper than
            // a cold start (no interpreter start-up), and just as isolated.
            let z = self
                .pool
                .zygote
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(z) = z.filter(|z| z.is_alive()) {
                let made = self.engine.prepare_from(&z);
                self.publish_forks(Some(&z));
                match made.and_then(|mut sb| sb.prestart().map(|_| sb)) {
                    Ok(sb) => {
                        self.metrics.pool_zygote_on_demand.inc();
                        return Some(sb);
                    }
                    Err(e) => tracing::warn!(error = %e, "zygote fork failed; starting cold"),
                }
            }
        }
        got
    }

    fn worker(&self) {
        loop {
            let job = {
                let mut s = self.sched();
                loop {
                    if let Some(job) = s.next_job() {
                        self.publish(&job.sub.tenant_id, &s);
                        break job;
                    }
                    if s.stopped && s.order.is_empty() {
                        return;
                    }
                    s = self.work.wait(s).unwrap_or_else(|p| p.into_inner());
                }
            };
            self.metrics.queue_depth.dec();
            job.entry.dequeued.store(true, Ordering::SeqCst);
            let _running = Running {
                exec: self,
                tenant: job.sub.tenant_id.clone(),
                id: job.sub.id.clone(),
            };
            self.run(job);
        }
    }

    fn finish(&self, job: &Job, fin: Finish<'_>) {
        let sub = &job.sub;
        if let Err(e) = self.rt.block_on(self.store.finish_execution(&sub.id, &fin)) {
            tracing::error!(execution = %sub.id, error = %e, "storing the final record failed");
        }
        if fin.reason == TerminationReason::PolicyViolation.as_str() {
            let ev = NewAudit::new(
                Some(&sub.tenant_id),
                "policy.violation",
                "server",
                &sub.id,
                Some(&sub.request_id),
            )
            .with_detail(serde_json::json!({ "reason": fin.reason }));
            if let Err(e) = self.rt.block_on(self.store.append_audit(ev)) {
                tracing::error!(execution = %sub.id, error = %e, "audit append failed");
            }
        }
        self.metrics
            .executions
            .get_or_create(&ReasonLabel {
                reason: fin.reason.to_string(),
            })
            .inc();
        self.metrics
            .latency
            .observe(job.accepted.elapsed().as_secs_f64());
        let rec = self
            .rt
            .block_on(self.store.execution(&sub.tenant_id, &sub.id))
            .ok()
            .flatten();
        let data = rec.as_ref().map_or_else(
            || serde_json::json!({ "id": sub.id, "status": fin.status.as_str(), "reason": fin.reason }).to_string(),
            |r| (self.render)(r),
        );
        job.entry.live.finish(data);
        tracing::info!(
            execution = %sub.id, tenant = %sub.tenant_id, request_id = %sub.request_id,
            status = fin.status.as_str(), reason = fin.reason, "execution finished"
        );
    }

    /// Hands a finished sandbox's teardown to the reaper thread (inline
    /// when it is gone).
    fn reap(&self, t: airlock_sandbox::Teardown) {
        let g = self.reaper.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((tx, _)) = g.as_ref()
            && let Err(mpsc::SendError(t)) = tx.send(t)
        {
            drop(g);
            drop(t);
        }
    }

    fn extras(&self, sub: &Submission) -> Extras {
        let mut x = Extras {
            broker: true,
            egress: sub.policy.network.is_proxy(),
            ..Extras::default()
        };
        if let Some(g) = &self.guest {
            x.files.extend(g.iter().cloned());
            x.entry = match sub.language {
                Language::Python => Some(format!("{GUEST_MOUNT}/python/runner.py")),
                Language::Javascript => Some(format!("{GUEST_MOUNT}/javascript/runner.js")),
                Language::Shell => None,
            };
        }
        let mode = if sub.grants.handler {
            "handler"
        } else {
            "script"
        };
        x.env.push(("AIRLOCK_MODE".into(), mode.into()));
        x
    }

    fn run(&self, job: Job) {
        let sub = &job.sub;
        if let Some(r) = job.entry.cancel.reason() {
            self.finish(
                &job,
                Finish {
                    error: Some("stopped before it started"),
                    ..Finish::new(ExecStatus::Failed, r.as_str(), now_ms())
                },
            );
            return;
        }
        let warm = self.take_warm(sub);
        let is_warm = warm.is_some();
        let mut sandbox = match warm.map(Ok).unwrap_or_else(|| {
            self.engine
                .prepare_with(&sub.policy, sub.language, &self.extras(sub))
        }) {
            Ok(sb) => sb,
            Err(e) => {
                tracing::error!(execution = %sub.id, error = %e, "sandbox creation failed");
                let msg = e.public_message();
                self.finish(
                    &job,
                    Finish {
                        error: Some(&msg),
                        ..Finish::new(
                            ExecStatus::Failed,
                            TerminationReason::InternalError.as_str(),
                            now_ms(),
                        )
                    },
                );
                return;
            }
        };
        let host_state = serde_json::json!({
            "cgroups": sandbox
                .cgroup_dirs()
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>(),
        })
        .to_string();
        let started = now_ms();
        // Recorded while the execution starts, not before: the acceptance is
        // already durable, and after a crash recovery fails the execution
        // whether it was marked or not, and sweeps the cgroups of the dead
        // engine either way. Awaited before the execution is finished.
        let marking = {
            let (store, id) = (self.store.clone(), sub.id.clone());
            self.rt
                .spawn(async move { store.mark_running(&id, started, &host_state).await })
        };
        let live = job.entry.live.clone();
        // The broker for exactly this execution, identity fixed here.
        let log_live = live.clone();
        let session = Arc::new(Session::new(
            Identity {
                tenant_id: sub.tenant_id.clone(),
                flow_id: sub.flow_id.clone(),
                execution_id: sub.id.clone(),
                trace_id: sub.trace_id.clone(),
                request_id: sub.request_id.clone(),
            },
            airlock_broker::Grants {
                // A warm runner receives its code with `hello`.
                code: is_warm.then(|| String::from_utf8_lossy(&sub.code).into_owned()),
                ..sub.grants.clone()
            },
            Quotas::default(),
            self.store.clone(),
            Some(Box::new(move |rec: &serde_json::Value| {
                log_live.push("log", rec.to_string());
            })),
        ));
        // Served from the moment the execution's clocks run (a warm
        // runner is waiting on this channel for its code).
        let mut broker_std = sandbox.take_broker();
        let mut broker_task = None;
        // The egress proxy of exactly this execution (proxy policies only).
        let egress = Arc::new(EgressRecorder {
            tenant: sub.tenant_id.clone(),
            execution: sub.id.clone(),
            request: sub.request_id.clone(),
            store: self.store.clone(),
            rt: self.rt.clone(),
            redactor: session.redactor.clone(),
            state: Mutex::new(EgressState::default()),
        });
        let egress_task = match (sandbox.take_egress(), sub.policy.network.rules()) {
            (Some(channel), Ok(rules)) => self.resolver.clone().map(|resolver| {
                let recorder = egress.clone();
                let sink: airlock_egress::Sink =
                    Arc::new(move |ev: airlock_egress::EgressEvent| recorder.record(ev));
                let proxy = airlock_egress::Proxy::new(rules, resolver, sink);
                let (stop, stopped) = tokio::sync::oneshot::channel();
                (stop, self.rt.spawn(proxy.serve_channel(channel, stopped)))
            }),
            _ => None,
        };
        live.push(
            "started",
            serde_json::json!({ "id": sub.id, "started_at_ms": started }).to_string(),
        );
        self.metrics.running.inc();
        let redactor = session.redactor.clone();
        // The output limits hold on what is streamed: redacted text, which
        // can be longer than what the program wrote.
        let cap = |n: u64| StreamRedactor::capped(usize::try_from(n).unwrap_or(usize::MAX));
        let limits = &sub.policy.limits;
        let mut streams = [
            (Utf8Carry::default(), cap(limits.stdout_bytes)),
            (Utf8Carry::default(), cap(limits.stderr_bytes)),
        ];
        let mut on_output = |stream: Stream, chunk: &[u8]| {
            let (kind, i) = match stream {
                Stream::Stdout => ("stdout", 0),
                Stream::Stderr => ("stderr", 1),
            };
            let (carry, red) = &mut streams[i];
            let text = red.push(&redactor, &carry.push(chunk));
            live.push_output(kind, &text);
        };
        let mut start_broker = || {
            broker_task = broker_std.take().and_then(|std_stream| {
                let _guard = self.rt.enter();
                std_stream.set_nonblocking(true).ok()?;
                let stream = tokio::net::UnixStream::from_std(std_stream).ok()?;
                Some(self.rt.spawn(session.clone().serve(stream)))
            });
        };
        let (mut result, teardown) = sandbox.execute_deferred(
            &sub.code,
            None,
            &sub.stdin,
            &mut on_output,
            &job.entry.cancel,
            &mut start_broker,
        );
        // Waiting for the killed processes and removing the cgroup happen
        // off this execution's path (the reaper thread).
        self.reap(teardown);
        match self.rt.block_on(marking) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(execution = %sub.id, error = %e, "marking running failed")
            }
            Err(e) => tracing::error!(execution = %sub.id, error = %e, "marking running failed"),
        }
        for (i, kind, truncated) in [
            (0, "stdout", result.stdout_truncated),
            (1, "stderr", result.stderr_truncated),
        ] {
            let (carry, red) = &mut streams[i];
            // An incomplete UTF-8 sequence at the very end, lossily.
            let tail = carry.finish();
            let text = red.push(&redactor, &tail);
            live.push_output(kind, &text);
            live.push_output(kind, &red.finish(&redactor, truncated));
        }
        self.metrics.running.dec();
        // Every process of the sandbox is gone, so the channel is closed:
        // the broker task ends at EOF.
        // Nothing may act for this execution once it is final: a task still
        // running after its grace is aborted, and awaited, so everything it
        // recorded on the way out (an egress flow cut off) is in before the
        // record is written.
        let stop = |t: Option<tokio::task::JoinHandle<()>>, grace: Duration| {
            if let Some(mut t) = t {
                self.rt.block_on(async move {
                    if tokio::time::timeout(grace, &mut t).await.is_err() {
                        t.abort();
                        let _ = t.await;
                    }
                });
            }
        };
        // Every process of the sandbox is gone, so the channel is closed:
        // the broker task ends at EOF.
        stop(broker_task, Duration::from_secs(5));
        // The sandbox is gone; connections still open get a moment, then are
        // cut, each reporting its flow before the proxy returns.
        if let Some((cut, mut t)) = egress_task {
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
        let egress = {
            let l = egress.finish();
            (!l.is_empty() || sub.policy.network.is_proxy()).then_some(serde_json::Value::Array(l))
        };
        // The broker's own audit records are bounded the same way.
        self.rt.block_on(session.finish());
        let outcome = session.outcome();
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
        let status = if result.reason == TerminationReason::InternalError {
            ExecStatus::Failed
        } else {
            ExecStatus::Finished
        };
        self.finish(
            &job,
            Finish {
                status,
                reason: result.reason.as_str(),
                result: doc.as_ref(),
                error: result.error.as_deref(),
                at_ms: now_ms(),
                output: outcome.output.as_ref(),
                handler_error: outcome.handler_error.as_ref(),
                broker_error: outcome.protocol_error.as_deref(),
                egress: egress.as_ref(),
            },
        );
    }
}
