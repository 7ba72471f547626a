//! Metric families (Prometheus text via `prometheus-client`), served by the
//! admin server's `/metrics`.
//!
//! Counters on the request path are updated inline; pool state and the
//! TIME_WAIT census are read at scrape time by collectors, so a scrape shows the
//! kernel's own count of TIME_WAIT toward each endpoint and on each listener.

use std::fmt;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A cheaply cloned label value (listener names, reasons).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Name(pub Arc<str>);

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Self(Arc::from(s))
    }
}

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        encoder.write_str(&self.0)
    }
}

/// Labels naming a listener.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// The listener's name.
    pub listener: Name,
}

/// Labels of a request outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The listener's name.
    pub listener: Name,
    /// Status class: `2xx` … `5xx`.
    pub class: &'static str,
}

/// Labels of something that happened for a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The listener's name.
    pub listener: Name,
    /// Short reason (the `x-tether-error` value, or how a connection ended).
    pub reason: Name,
}

/// Labels naming an upstream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    /// The upstream's name.
    pub upstream: Name,
}

/// Labels naming one of tether's logs.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LogLabel {
    /// `access` or `connections`.
    pub log: &'static str,
}

/// Buckets of `tether_upstream_pool_wait_seconds`: from the few microseconds
/// of taking an idle connection to the seconds of a saturated pool.
const POOL_WAIT_BUCKETS: [f64; 17] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Buckets of `tether_upstream_requests_per_connection`: counts, not times.
const REQUESTS_PER_CONNECTION_BUCKETS: [f64; 13] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];

/// Every metric tether keeps.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Requests answered, by status class.
    pub requests: Family<RequestLabels, Counter>,
    /// Responses tether made itself (errors and refusals), by reason.
    pub local_responses: Family<ReasonLabels, Counter>,
    /// Time from request head to response head, seconds.
    pub response_latency: Family<ListenerLabel, Histogram>,
    /// Client connections accepted.
    pub client_accepted: Family<ListenerLabel, Counter>,
    /// Client connections open now.
    pub client_active: Family<ListenerLabel, Gauge>,
    /// Client connections ended, by how: `fin` or the reason for an RST.
    pub client_closed: Family<ReasonLabels, Counter>,
    /// Accept errors, by kind (`resources` pauses accepting).
    pub accept_errors: Family<ReasonLabels, Counter>,
    /// Request header fields removed before forwarding, by why
    /// (`underscore`: a name with `_` under `underscores_in_headers = "drop"`).
    pub request_headers_dropped: Family<ReasonLabels, Counter>,
    /// Time a request spent in the pool's acquire on an endpoint: from asking
    /// for a connection to holding one (or to the failure), the connect and
    /// handshake included when it dialled one; seconds. Observed once per
    /// attempt, so the one retry on a fresh connection observes again.
    pub upstream_pool_wait: Family<UpstreamLabel, Histogram>,
    /// Requests (HTTP/2: streams) an upstream connection carried, observed
    /// once when it ends.
    pub upstream_requests_per_connection: Family<UpstreamLabel, Histogram>,
    /// Log lines dropped: the queue to the writer was full, or the sink failed.
    pub log_lines_dropped: Family<LogLabel, Counter>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tether");
        let requests = Family::default();
        registry.register(
            "requests",
            "Requests answered, by status class",
            requests.clone(),
        );
        let local_responses = Family::default();
        registry.register(
            "local_responses",
            "Responses tether made itself (errors, refusals), by reason",
            local_responses.clone(),
        );
        let response_latency = Family::<ListenerLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ])
        });
        registry.register(
            "response_latency_seconds",
            "Time from request head to response head",
            response_latency.clone(),
        );
        let client_accepted = Family::default();
        registry.register(
            "client_connections_accepted",
            "Client connections accepted",
            client_accepted.clone(),
        );
        let client_active = Family::default();
        registry.register(
            "client_connections_active",
            "Client connections open now",
            client_active.clone(),
        );
        let client_closed = Family::default();
        registry.register(
            "client_connections_closed",
            "Client connections ended: reason=fin for an orderly close, else why tether reset it",
            client_closed.clone(),
        );
        let accept_errors = Family::default();
        registry.register(
            "accept_errors",
            "Accept errors, by kind",
            accept_errors.clone(),
        );
        let request_headers_dropped = Family::default();
        registry.register(
            "request_headers_dropped",
            "Request header fields removed before forwarding, by reason",
            request_headers_dropped.clone(),
        );
        let (upstream_pool_wait, upstream_requests_per_connection, log_lines_dropped) =
            register_pool_and_log_families(&mut registry);
        Self {
            registry: Mutex::new(registry),
            upstream_pool_wait,
            upstream_requests_per_connection,
            log_lines_dropped,
            requests,
            local_responses,
            response_latency,
            client_accepted,
            client_active,
            client_closed,
            accept_errors,
            request_headers_dropped,
        }
    }

    /// Adds a metric kept by the layer that owns it (a reload's counters).
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        self.lock().register(name, help, metric);
    }

    /// Adds a family whose values are read at scrape time (the pools' state,
    /// the kernel's TIME_WAIT table).
    pub fn register_collector(&self, collector: impl Collector + 'static) {
        self.lock().register_collector(Box::new(collector));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.lock()) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        text
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The families the pool and the logs feed: the pool-wait and
/// requests-per-connection histograms, and the dropped log lines.
fn register_pool_and_log_families(
    registry: &mut Registry,
) -> (
    Family<UpstreamLabel, Histogram>,
    Family<UpstreamLabel, Histogram>,
    Family<LogLabel, Counter>,
) {
    let pool_wait = Family::<UpstreamLabel, Histogram>::new_with_constructor(|| {
        Histogram::new(POOL_WAIT_BUCKETS)
    });
    registry.register(
        "upstream_pool_wait_seconds",
        "Time a request waited in the pool's acquire (dial included when it dialled), per attempt",
        pool_wait.clone(),
    );
    let per_connection = Family::<UpstreamLabel, Histogram>::new_with_constructor(|| {
        Histogram::new(REQUESTS_PER_CONNECTION_BUCKETS)
    });
    registry.register(
        "upstream_requests_per_connection",
        "Requests an upstream connection carried, observed when it ends",
        per_connection.clone(),
    );
    let dropped = Family::default();
    registry.register(
        "log_lines_dropped",
        "Log lines dropped because the writer's queue was full or the sink failed",
        dropped.clone(),
    );
    (pool_wait, per_connection, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_with_their_labels() {
        let metrics = Metrics::new();
        let listener = Name::from("app");
        metrics
            .requests
            .get_or_create(&RequestLabels {
                listener: listener.clone(),
                class: "2xx",
            })
            .inc();
        metrics
            .local_responses
            .get_or_create(&ReasonLabels {
                listener,
                reason: Name::from("upstream-timeout"),
            })
            .inc();
        let text = metrics.render();
        assert!(
            text.contains(r#"tether_requests_total{listener="app",class="2xx"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"reason="upstream-timeout""#), "{text}");
    }
}
