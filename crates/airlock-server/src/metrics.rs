//! Prometheus metrics at `/metrics`: the Prometheus text format, or
//! OpenMetrics when the scraper's `Accept` prefers it.

use std::cmp::Ordering;
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
    /// Other nodes this one declared lost.
    pub nodes_lost: Counter,
    /// Times this node stopped its own work (declared lost, or its lease
    /// ran out).
    pub node_fenced: Counter,
    /// Requests passed to the node that runs what they are about.
    pub forwarded: Counter,
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
        let (nodes_lost, node_fenced, forwarded) =
            (Counter::default(), Counter::default(), Counter::default());
        registry.register(
            "nodes_lost",
            "Other nodes this node declared lost (their work failed with node_lost)",
            nodes_lost.clone(),
        );
        registry.register(
            "node_fenced",
            "Times this node stopped its own work: declared lost, or its heartbeat lease ran out",
            node_fenced.clone(),
        );
        registry.register(
            "forwarded_requests",
            "Requests passed to the node that runs the execution or session they are about",
            forwarded.clone(),
        );
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
            nodes_lost,
            node_fenced,
            forwarded,
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

/// The exposition formats `/metrics` serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format 0.0.4 ([`Metrics::render_text`]).
    Text,
    /// OpenMetrics 1.0.0 ([`Metrics::render`]).
    OpenMetrics,
}

impl Format {
    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// (type, subtype, the `version` this server writes).
    fn media(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Format::Text => ("text", "plain", "0.0.4"),
            Format::OpenMetrics => ("application", "openmetrics-text", "1.0.0"),
        }
    }

    /// Content negotiation over the values of every `Accept` header (RFC
    /// 9110, 12.5.1): each format gets the q-value of the most specific
    /// media range that matches it (`type/subtype` with this server's
    /// `version` or none, then `type/*`, then `*/*`; a range naming another
    /// version does not match), and the higher q-value wins. On equal
    /// q-values the more specific match wins, and OpenMetrics is chosen
    /// only when named (a bare `*/*` gets the text format). No `Accept`,
    /// nothing acceptable, or only malformed ranges: the text format, which
    /// every Prometheus scraper reads.
    pub fn negotiate<'a>(accept: impl IntoIterator<Item = &'a str>) -> Format {
        let ranges: Vec<Range<'a>> = accept
            .into_iter()
            .flat_map(|v| v.split(','))
            .filter_map(Range::parse)
            .collect();
        // (q in thousandths, specificity) of a format's best match.
        let weigh = |f: Format| -> (u16, u8) {
            ranges
                .iter()
                .filter_map(|r| r.specificity(f).map(|s| (s, r.q)))
                // The most specific ranges decide; among equals, the best q.
                .max()
                .map_or((0, 0), |(s, q)| (q, s))
        };
        let (om, text) = (weigh(Format::OpenMetrics), weigh(Format::Text));
        let openmetrics = om.0 > 0
            && match (om.0.cmp(&text.0), om.1.cmp(&text.1)) {
                (Ordering::Greater, _) => true,
                (Ordering::Less, _) => false,
                (Ordering::Equal, Ordering::Equal) => om.1 >= Range::NAMED,
                (Ordering::Equal, by_specificity) => by_specificity == Ordering::Greater,
            };
        if openmetrics {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }
}

/// One media range of an `Accept` value.
#[derive(Debug)]
struct Range<'a> {
    kind: &'a str,
    subtype: &'a str,
    version: Option<&'a str>,
    /// The q-value in thousandths (0..=1000).
    q: u16,
}

impl<'a> Range<'a> {
    /// Specificity of `type/subtype` (without a version or with the one
    /// served).
    const NAMED: u8 = 2;

    fn parse(text: &'a str) -> Option<Range<'a>> {
        let mut parts = text.split(';').map(str::trim);
        let (kind, subtype) = parts.next()?.split_once('/')?;
        let (kind, subtype) = (kind.trim(), subtype.trim());
        if kind.is_empty() || subtype.is_empty() || (kind == "*" && subtype != "*") {
            return None;
        }
        let mut range = Range {
            kind,
            subtype,
            version: None,
            q: 1000,
        };
        for p in parts.filter(|p| !p.is_empty()) {
            let (name, value) = p.split_once('=')?;
            let (name, value) = (name.trim(), value.trim().trim_matches('"'));
            if name.eq_ignore_ascii_case("q") {
                range.q = parse_q(value)?;
            } else if name.eq_ignore_ascii_case("version") {
                range.version = Some(value);
            }
        }
        Some(range)
    }

    /// How specifically this range names `f` (3: with its version, 2:
    /// without one, 1: `type/*`, 0: `*/*`), or None if it does not match.
    fn specificity(&self, f: Format) -> Option<u8> {
        let (kind, subtype, version) = f.media();
        let eq = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        if self.kind == "*" {
            return Some(0);
        }
        if !eq(self.kind, kind) {
            return None;
        }
        if self.subtype == "*" {
            return Some(1);
        }
        if !eq(self.subtype, subtype) {
            return None;
        }
        match self.version {
            None => Some(Self::NAMED),
            Some(v) if v == version => Some(Self::NAMED + 1),
            Some(_) => None,
        }
    }
}

/// A q-value (`0`, `0.5`, `1.000`: at most three decimals, at most 1) in
/// thousandths.
fn parse_q(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac_value: u16 = format!("{frac:0<3}").parse().ok()?;
    match int {
        "0" => Some(frac_value),
        "1" if frac_value == 0 => Some(1000),
        _ => None,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_q_values_choose_the_format() {
        use Format::{OpenMetrics as Om, Text};
        for (accept, want) in [
            // No preference: the text format.
            ("", Text),
            ("*/*", Text),
            ("text/plain", Text),
            ("text/plain;q=1, application/openmetrics-text;q=0.1", Text),
            ("application/openmetrics-text;q=0.9, text/plain;q=0.5", Om),
            ("application/openmetrics-text; version=1.0.0", Om),
            ("application/openmetrics-text", Om),
            // Prometheus' own scrape header.
            (
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                Om,
            ),
            // Refused outright, or only a version this server does not write.
            ("application/openmetrics-text;q=0, */*", Text),
            ("application/openmetrics-text;version=0.0.1", Text),
            // The most specific range decides, whatever the wildcard says.
            ("*/*;q=0.1, application/openmetrics-text;q=0.2", Om),
            ("application/*;q=0.9, text/plain;q=0.8", Om),
            ("text/*;q=0.9, application/openmetrics-text;q=0.8", Text),
            ("application/openmetrics-text;q=0.5, text/*;q=0.5", Om),
            ("text/plain;q=0.5, */*;q=0.5", Text),
            (
                "APPLICATION/OpenMetrics-Text ; Q=0.9 , text/plain ; q=0.3",
                Om,
            ),
            // Malformed ranges are ignored.
            ("application/openmetrics-text;q=2, text/plain;q=0.1", Text),
            ("application/openmetrics-text;q=0.1234", Text),
            ("garbage, application/openmetrics-text;q=0.9", Om),
        ] {
            let values: Vec<&str> = accept.split('|').filter(|v| !v.is_empty()).collect();
            assert_eq!(Format::negotiate(values), want, "Accept: {accept}");
        }
        // Several Accept headers are one list.
        assert_eq!(
            Format::negotiate(["text/plain;q=0.2", "application/openmetrics-text;q=0.3"]),
            Om
        );
        assert_eq!(Format::negotiate(std::iter::empty()), Text);
    }

    #[test]
    fn q_values_parse_as_rfc_9110_writes_them() {
        for (v, want) in [
            ("1", Some(1000)),
            ("1.000", Some(1000)),
            ("0", Some(0)),
            ("0.5", Some(500)),
            ("0.125", Some(125)),
            ("0.", Some(0)),
            ("1.001", None),
            ("2", None),
            ("-0.5", None),
            ("0.1234", None),
            ("", None),
            ("0.a", None),
        ] {
            assert_eq!(parse_q(v), want, "{v:?}");
        }
    }
}
