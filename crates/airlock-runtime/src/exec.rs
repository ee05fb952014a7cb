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

use airlock_backend::{Backends, CancelToken, Teardown, TerminationReason};
use airlock_broker::Grants;
use airlock_policy::{Language, Policy};
use airlock_store::{Finish, NewAudit, Store};
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::live::Live;
use crate::metrics::{Metrics, ReasonLabel};
use crate::pool::{PoolSpec, Pools};

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
    /// The backend that runs it (chosen at admission among the offered
    /// ones, see [`Backends::select`]).
    pub backend: String,
    /// The session whose workspace it runs in (a cold sandbox with the
    /// workspace bound at /workspace; never a pooled one).
    pub workspace: Option<Arc<crate::session::Workspace>>,
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

pub(crate) struct Job {
    pub(crate) sub: Submission,
    pub(crate) entry: Arc<Entry>,
    pub(crate) accepted: Instant,
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
    pub(crate) store: Arc<dyn Store>,
    pub(crate) backends: Backends,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) rt: Handle,
    render: Box<RecordRenderer>,
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    pub(crate) guest: Vec<(String, Arc<str>)>,
    pub(crate) resolver: Option<Arc<airlock_egress::Resolver>>,
    pub(crate) pools: Option<Pools>,
    workers_n: usize,
    refill: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Teardowns of finished sandboxes (waiting for their killed processes,
    /// removing their cgroups), done by one thread off the request path.
    reaper: Mutex<Option<(Sender<Teardown>, std::thread::JoinHandle<()>)>>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("capacity", &self.capacity)
            .field("admitted", &self.sched().admitted)
            .finish_non_exhaustive()
    }
}

/// What the executor works with.
#[allow(missing_debug_implementations)]
pub struct Deps {
    /// Storage.
    pub store: Arc<dyn Store>,
    /// The backends this node offers.
    pub backends: Backends,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Renders the `finished` event.
    pub render: Box<RecordRenderer>,
    /// Guest SDK files written at /opt/airlock in every sandbox (none:
    /// programs run bare, without the broker's SDK or a pool).
    pub guest: Vec<(String, Arc<str>)>,
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
            backends,
            metrics,
            render,
            guest,
            resolver,
            pool: pool_spec,
            shares: (default_share, by_name),
        } = deps;
        let pools = pool_spec
            .filter(|p| !guest.is_empty() && p.targets.iter().any(|(_, n)| *n > 0))
            .map(|spec| Pools::new(spec, backends.clone(), metrics.clone(), guest.clone()));
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
            backends,
            metrics,
            rt: Handle::current(),
            render,
            workers: Mutex::new(Vec::new()),
            guest,
            resolver,
            pools,
            workers_n: workers,
            refill: Mutex::new(None),
            reaper: Mutex::new(None),
        });
        let (reap_tx, reap_rx) = mpsc::channel::<Teardown>();
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
        if exec.pools.is_some() {
            // Long-lived, like the workers: sandboxes die with the thread
            // that spawned them (PDEATHSIG).
            let e = exec.clone();
            *exec.refill.lock().unwrap_or_else(|p| p.into_inner()) = Some(
                std::thread::Builder::new()
                    .name("airlock-pool".into())
                    .spawn(move || {
                        if let Some(pools) = &e.pools {
                            pools.refill_loop(&|| {
                                e.in_flight() < e.workers_n && e.accepting.load(Ordering::SeqCst)
                            });
                        }
                    })?,
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
        // In a session: registered in it from admission on, so the
        // session's end kills it even while it waits for a worker, and its
        // idle clock waits for it (the worker unregisters it however it
        // ends). A session that ended already: it only records its end.
        if let Some(ws) = &sub.workspace
            && !ws.begin(&sub.id, entry.cancel.clone())
        {
            entry.cancel.cancel(TerminationReason::Cancelled);
        }
        let mut s = self.sched();
        if s.stopped || !self.accepting.load(Ordering::SeqCst) {
            if let Some(ws) = &sub.workspace {
                ws.end_execution(&sub.id);
            }
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

    /// The backends this node offers.
    pub fn backends(&self) -> &Backends {
        &self.backends
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
        if let Some(p) = &self.pools {
            p.stop();
        }
        if let Some(h) = self.refill.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
        // Idle warm sandboxes are destroyed (every process killed, cgroup
        // removed) as they drop.
        if let Some(p) = &self.pools {
            p.clear();
        }
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

    pub(crate) fn finish(&self, job: &Job, backend: &str, fin: Finish<'_>) {
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
                backend: backend.to_string(),
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
    pub(crate) fn reap(&self, t: Teardown) {
        let g = self.reaper.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((tx, _)) = g.as_ref()
            && let Err(mpsc::SendError(t)) = tx.send(t)
        {
            drop(g);
            drop(t);
        }
    }
}
