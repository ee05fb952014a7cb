//! Prometheus metrics (text exposition at `/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label: termination reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `exited`, `timeout`, ...
    pub reason: String,
}

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Finished executions by reason.
    pub executions: Family<ReasonLabel, Counter>,
    /// Accept-to-finish latency, seconds.
    pub latency: Histogram,
    /// Accepted executions waiting for a worker.
    pub queue_depth: Gauge,
    /// Executions running now.
    pub running: Gauge,
    /// Failed authentications.
    pub auth_failures: Counter,
    /// Requests refused with 429 because the queue was full.
    pub rejected: Counter,
    /// Requests refused because their tenant had too many in flight.
    pub tenant_request_rejections: Counter,
    /// Executions running now, per tenant.
    pub tenant_running: Family<TenantLabel, Gauge>,
    /// Executions waiting for a worker, per tenant.
    pub tenant_queued: Family<TenantLabel, Gauge>,
    /// Executions refused because the tenant held its whole share.
    pub tenant_queue_rejections: Family<TenantLabel, Counter>,
    /// Idle warm sandboxes by language.
    pub pool_size: Family<LangLabel, Gauge>,
    /// Executions served from a warm pool, by language.
    pub pool_hits: Family<LangLabel, Counter>,
    /// Executions that wanted a warm sandbox and started cold.
    pub pool_misses: Family<LangLabel, Counter>,
    /// Warm sandboxes found dead while idle and discarded.
    pub pool_discarded: Family<LangLabel, Counter>,
    /// Time to create and prestart one warm sandbox, seconds.
    pub pool_create: Histogram,
    /// Sandboxes forked by the language's zygote (0 while it has none).
    pub pool_zygote_forks: Family<LangLabel, Gauge>,
    /// Executions that found the pool empty and were forked from the
    /// zygote on demand (counted in the misses too).
    pub pool_zygote_on_demand: Counter,
}

/// Label: tenant id.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabel {
    /// `tn_...`.
    pub tenant: String,
}

/// Label: language.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LangLabel {
    /// `python`, `javascript`, `shell`.
    pub language: String,
}

impl Metrics {
    /// Registers everything.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("airlock");
        let executions = Family::<ReasonLabel, Counter>::default();
        let latency = Histogram::new(exponential_buckets(0.002, 2.0, 16));
        let queue_depth = Gauge::default();
        let running = Gauge::default();
        let auth_failures = Counter::default();
        let rejected = Counter::default();
        let tenant_request_rejections = Counter::default();
        let tenant_running = Family::<TenantLabel, Gauge>::default();
        let tenant_queued = Family::<TenantLabel, Gauge>::default();
        let tenant_queue_rejections = Family::<TenantLabel, Counter>::default();
        registry.register(
            "tenant_running_executions",
            "Executions running now, per tenant",
            tenant_running.clone(),
        );
        registry.register(
            "tenant_queued_executions",
            "Executions waiting for a worker, per tenant",
            tenant_queued.clone(),
        );
        registry.register(
            "tenant_queue_rejections",
            "Executions refused because the tenant held its whole share (max_running + max_queued)",
            tenant_queue_rejections.clone(),
        );
        registry.register(
            "tenant_request_rejections",
            "Requests refused because their tenant had max_requests_per_tenant in flight",
            tenant_request_rejections.clone(),
        );
        let pool_size = Family::<LangLabel, Gauge>::default();
        let pool_hits = Family::<LangLabel, Counter>::default();
        let pool_misses = Family::<LangLabel, Counter>::default();
        let pool_discarded = Family::<LangLabel, Counter>::default();
        let pool_create = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let pool_zygote_forks = Family::<LangLabel, Gauge>::default();
        let pool_zygote_on_demand = Counter::default();
        registry.register(
            "pool_zygote_on_demand",
            "Python executions forked from the zygote on demand because the pool was empty",
            pool_zygote_on_demand.clone(),
        );
        registry.register(
            "pool_zygote_forks",
            "Sandboxes forked by the current zygote (0: no zygote, warm sandboxes start cold)",
            pool_zygote_forks.clone(),
        );
        registry.register("pool_size", "Idle warm sandboxes", pool_size.clone());
        registry.register("pool_hits", "Executions served warm", pool_hits.clone());
        registry.register(
            "pool_misses",
            "Executions that found no warm sandbox",
            pool_misses.clone(),
        );
        registry.register(
            "pool_discarded",
            "Warm sandboxes found dead while idle",
            pool_discarded.clone(),
        );
        registry.register(
            "pool_create_seconds",
            "Time to create and prestart a warm sandbox",
            pool_create.clone(),
        );
        registry.register(
            "executions",
            "Finished executions by termination reason",
            executions.clone(),
        );
        registry.register(
            "execution_duration_seconds",
            "Time from acceptance to the final record",
            latency.clone(),
        );
        registry.register(
            "queue_depth",
            "Accepted executions waiting for a worker",
            queue_depth.clone(),
        );
        registry.register(
            "running_executions",
            "Executions running now",
            running.clone(),
        );
        registry.register(
            "auth_failures",
            "Requests refused for a missing, malformed, unknown or revoked key",
            auth_failures.clone(),
        );
        registry.register(
            "queue_rejections",
            "Executions refused because the queue was full",
            rejected.clone(),
        );
        Metrics {
            registry,
            executions,
            latency,
            queue_depth,
            running,
            auth_failures,
            rejected,
            tenant_request_rejections,
            tenant_running,
            tenant_queued,
            tenant_queue_rejections,
            pool_size,
            pool_hits,
            pool_misses,
            pool_discarded,
            pool_create,
            pool_zygote_forks,
            pool_zygote_on_demand,
        }
    }

    /// OpenMetrics text (what the encoder writes).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// The Prometheus text format 0.0.4, for scrapers that do not ask for
    /// OpenMetrics: the same samples, with a counter's HELP and TYPE under
    /// its sample name (`x_total`), and no `# EOF` or `# UNIT` lines.
    pub fn render_text(&self) -> String {
        to_text_format(&self.render())
    }
}

/// OpenMetrics text -> Prometheus text format 0.0.4.
fn to_text_format(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (*p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) {
                    format!("{name}_total")
                } else {
                    name.to_string()
                };
                out.push_str(prefix);
                out.push_str(&name);
                if !tail.is_empty() {
                    out.push(' ');
                    out.push_str(tail);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
