//! Prometheus metrics (text exposition at `/metrics`).

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

/// Every metric the server exports: the runtime's, and the API's own.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Executions, queue, tenants' shares, pools.
    pub runtime: Arc<airlock_runtime::metrics::Metrics>,
    /// Failed authentications.
    pub auth_failures: Counter,
    /// Requests refused with 429 because the queue was full.
    pub rejected: Counter,
    /// Requests refused because their tenant had too many in flight.
    pub tenant_request_rejections: Counter,
}

impl Metrics {
    /// Registers everything.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("airlock");
        let runtime = Arc::new(airlock_runtime::metrics::Metrics::new());
        runtime.register(&mut registry);
        let auth_failures = Counter::default();
        let rejected = Counter::default();
        let tenant_request_rejections = Counter::default();
        registry.register(
            "tenant_request_rejections",
            "Requests refused because their tenant had max_requests_per_tenant in flight",
            tenant_request_rejections.clone(),
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
            runtime,
            auth_failures,
            rejected,
            tenant_request_rejections,
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
