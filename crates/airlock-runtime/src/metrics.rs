//! The runtime's Prometheus metrics: executions, the queue, tenants' shares
//! and the warm pools. The server registers them beside its own.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label: termination reason, and the backend that ran the execution.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `exited`, `timeout`, ...
    pub reason: String,
    /// `process`, `oci`, `gvisor` (empty when nothing started).
    pub backend: String,
}

/// Label: tenant id.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabel {
    /// `tn_...`.
    pub tenant: String,
}

/// Label: one warm pool (backend and language).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    /// `process`, `oci`, `gvisor`.
    pub backend: String,
    /// `python`, `javascript`, `shell`.
    pub language: String,
}

/// Every metric the runtime keeps. Families are shared handles: clones
/// registered elsewhere see the same values.
#[derive(Debug)]
pub struct Metrics {
    /// Finished executions by reason and backend.
    pub executions: Family<ReasonLabel, Counter>,
    /// Accept-to-finish latency, seconds.
    pub latency: Histogram,
    /// Accepted executions waiting for a worker.
    pub queue_depth: Gauge,
    /// Executions running now.
    pub running: Gauge,
    /// Executions running now, per tenant.
    pub tenant_running: Family<TenantLabel, Gauge>,
    /// Executions waiting for a worker, per tenant.
    pub tenant_queued: Family<TenantLabel, Gauge>,
    /// Executions refused because the tenant held its whole share.
    pub tenant_queue_rejections: Family<TenantLabel, Counter>,
    /// Idle warm sandboxes per pool.
    pub pool_size: Family<PoolLabel, Gauge>,
    /// Executions served from a warm pool.
    pub pool_hits: Family<PoolLabel, Counter>,
    /// Executions that wanted a warm sandbox and started cold.
    pub pool_misses: Family<PoolLabel, Counter>,
    /// Warm sandboxes found dead while idle and discarded.
    pub pool_discarded: Family<PoolLabel, Counter>,
    /// Time to create and prestart one warm sandbox, seconds.
    pub pool_create: Histogram,
    /// Sandboxes made by the pool's current template (for python on the
    /// process backend: its zygote's forks; 0 while it has none).
    pub pool_zygote_forks: Family<PoolLabel, Gauge>,
    /// Executions that found the pool empty and were made from its fast
    /// template on demand (counted in the misses too).
    pub pool_zygote_on_demand: Counter,
}

impl Metrics {
    /// Fresh metrics (register them with [`Metrics::register`]).
    pub fn new() -> Self {
        Metrics {
            executions: Family::default(),
            latency: Histogram::new(exponential_buckets(0.002, 2.0, 16)),
            queue_depth: Gauge::default(),
            running: Gauge::default(),
            tenant_running: Family::default(),
            tenant_queued: Family::default(),
            tenant_queue_rejections: Family::default(),
            pool_size: Family::default(),
            pool_hits: Family::default(),
            pool_misses: Family::default(),
            pool_discarded: Family::default(),
            pool_create: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            pool_zygote_forks: Family::default(),
            pool_zygote_on_demand: Counter::default(),
        }
    }

    /// Adds every metric to `registry` (prefixed by it).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tenant_running_executions",
            "Executions running now, per tenant",
            self.tenant_running.clone(),
        );
        registry.register(
            "tenant_queued_executions",
            "Executions waiting for a worker, per tenant",
            self.tenant_queued.clone(),
        );
        registry.register(
            "tenant_queue_rejections",
            "Executions refused because the tenant held its whole share (max_running + max_queued)",
            self.tenant_queue_rejections.clone(),
        );
        registry.register(
            "pool_zygote_on_demand",
            "Executions made from the pool's fast template (python: the zygote) on demand because the pool was empty",
            self.pool_zygote_on_demand.clone(),
        );
        registry.register(
            "pool_zygote_forks",
            "Sandboxes made by the pool's current template (python: zygote forks; 0: none, warm sandboxes start cold)",
            self.pool_zygote_forks.clone(),
        );
        registry.register("pool_size", "Idle warm sandboxes", self.pool_size.clone());
        registry.register(
            "pool_hits",
            "Executions served warm",
            self.pool_hits.clone(),
        );
        registry.register(
            "pool_misses",
            "Executions that found no warm sandbox",
            self.pool_misses.clone(),
        );
        registry.register(
            "pool_discarded",
            "Warm sandboxes found dead while idle",
            self.pool_discarded.clone(),
        );
        registry.register(
            "pool_create_seconds",
            "Time to create and prestart a warm sandbox",
            self.pool_create.clone(),
        );
        registry.register(
            "executions",
            "Finished executions by termination reason and backend",
            self.executions.clone(),
        );
        registry.register(
            "execution_duration_seconds",
            "Time from acceptance to the final record",
            self.latency.clone(),
        );
        registry.register(
            "queue_depth",
            "Accepted executions waiting for a worker",
            self.queue_depth.clone(),
        );
        registry.register(
            "running_executions",
            "Executions running now",
            self.running.clone(),
        );
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
