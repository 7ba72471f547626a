//! Metric families (Prometheus text via `prometheus-client`), served by the
//! admin server's `/metrics`.
//!
//! Counters on the request path are updated inline; pool state and the
//! TIME_WAIT census are read at scrape time by collectors, so a scrape shows the
//! kernel's own count of TIME_WAIT toward each endpoint and on each listener.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use std::fmt::Write as _;

use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::census;
use crate::pool::Pool;

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
        Self {
            registry: Mutex::new(registry),
            requests,
            local_responses,
            response_latency,
            client_accepted,
            client_active,
            client_closed,
            accept_errors,
        }
    }

    /// Adds the scrape-time view of the pools and the TIME_WAIT census.
    pub fn watch(&self, pools: Vec<Pool>, listeners: Vec<(String, Option<SocketAddr>)>) {
        self.lock()
            .register_collector(Box::new(PoolCollector { pools, listeners }));
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

/// Folds rows with the same upstream and endpoint into the first of them.
fn merge_rows(rows: &mut Vec<(String, String, u64)>, combine: impl Fn(u64, u64) -> u64) {
    let mut merged: Vec<(String, String, u64)> = Vec::with_capacity(rows.len());
    for (upstream, endpoint, value) in rows.drain(..) {
        match merged
            .iter_mut()
            .find(|(u, e, _)| *u == upstream && *e == endpoint)
        {
            Some(row) => row.2 = combine(row.2, value),
            None => merged.push((upstream, endpoint, value)),
        }
    }
    *rows = merged;
}

struct PoolCollector {
    pools: Vec<Pool>,
    listeners: Vec<(String, Option<SocketAddr>)>,
}

impl fmt::Debug for PoolCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolCollector")
            .field("pools", &self.pools.len())
            .finish()
    }
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        type Row = (String, String, u64);
        let mut counters: [(&str, &str, Vec<Row>); 8] = [
            (
                "upstream_connections_opened",
                "Upstream connections dialled",
                Vec::new(),
            ),
            (
                "upstream_connections_retired",
                "Idle upstream connections retired by policy",
                Vec::new(),
            ),
            (
                "upstream_connections_discarded",
                "Upstream connections closed as stale, broken or abandoned",
                Vec::new(),
            ),
            (
                "upstream_connections_reused",
                "Idle upstream connections handed out again",
                Vec::new(),
            ),
            (
                "upstream_probes",
                "Probe requests sent on idle upstream connections",
                Vec::new(),
            ),
            (
                "upstream_probe_failures",
                "Probes that failed (the connection was reset)",
                Vec::new(),
            ),
            (
                "upstream_closed_by_backend",
                "Idle upstream connections the backend closed before tether retired them",
                Vec::new(),
            ),
            (
                "upstream_ejections",
                "Times the endpoint was ejected after repeated failures",
                Vec::new(),
            ),
        ];
        let mut gauges: [(&str, &str, Vec<Row>); 6] = [
            (
                "upstream_connections_open",
                "Upstream connections open now",
                Vec::new(),
            ),
            (
                "upstream_connections_idle",
                "Idle upstream connections now",
                Vec::new(),
            ),
            (
                "upstream_requests_outstanding",
                "Requests in flight per endpoint",
                Vec::new(),
            ),
            (
                "time_wait_toward_upstream",
                "TIME_WAIT sockets on this host toward the endpoint (kernel table)",
                Vec::new(),
            ),
            (
                "upstream_ejected",
                "1 while the endpoint is ejected",
                Vec::new(),
            ),
            (
                "upstream_observed_idle_close_ms",
                "Shortest idle age at which the backend closed a pooled connection (0: never seen)",
                Vec::new(),
            ),
        ];
        let census = census::time_wait().unwrap_or_default();
        for pool in &self.pools {
            for endpoint in pool.endpoints().iter() {
                let (name, addr) = (pool.name().to_owned(), endpoint.addr().to_string());
                let stats = endpoint.stats();
                let row = |v: u64| (name.clone(), addr.clone(), v);
                counters[0]
                    .2
                    .push(row(stats.opened.load(Ordering::Relaxed)));
                counters[1]
                    .2
                    .push(row(stats.retired.load(Ordering::Relaxed)));
                counters[2]
                    .2
                    .push(row(stats.discarded.load(Ordering::Relaxed)));
                counters[3]
                    .2
                    .push(row(stats.reused.load(Ordering::Relaxed)));
                counters[4]
                    .2
                    .push(row(stats.probes.load(Ordering::Relaxed)));
                counters[5]
                    .2
                    .push(row(stats.probe_failures.load(Ordering::Relaxed)));
                counters[6]
                    .2
                    .push(row(stats.closed_by_backend.load(Ordering::Relaxed)));
                counters[7]
                    .2
                    .push(row(stats.ejections.load(Ordering::Relaxed)));
                gauges[0].2.push(row(endpoint.open_connections() as u64));
                gauges[1].2.push(row(endpoint.idle_connections() as u64));
                gauges[2].2.push(row(endpoint.outstanding() as u64));
                let toward = census
                    .iter()
                    .filter(|s| s.remote == endpoint.addr())
                    .count();
                gauges[3].2.push(row(toward as u64));
                gauges[4].2.push(row(u64::from(endpoint.is_ejected())));
                let observed = endpoint
                    .observed_idle_close()
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                gauges[5].2.push(row(observed));
            }
        }
        // With several workers an upstream has one pool per worker: one series
        // per endpoint all the same, summed (a TIME_WAIT count, a flag or an
        // observation shared by the shares is taken once).
        for (_, _, rows) in &mut counters {
            merge_rows(rows, |a, b| a + b);
        }
        for (i, (_, _, rows)) in gauges.iter_mut().enumerate() {
            if i < 3 {
                merge_rows(rows, |a, b| a + b);
            } else {
                merge_rows(rows, u64::max);
            }
        }
        for (name, help, rows) in counters {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for (upstream, endpoint, value) in rows {
                let labels = [
                    ("upstream", upstream.as_str()),
                    ("endpoint", endpoint.as_str()),
                ];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        for (name, help, rows) in gauges {
            let mut family =
                encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
            for (upstream, endpoint, value) in rows {
                let labels = [
                    ("upstream", upstream.as_str()),
                    ("endpoint", endpoint.as_str()),
                ];
                ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "time_wait_on_listener",
            "TIME_WAIT sockets whose local port is the listener's (kernel table)",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (listener, addr) in &self.listeners {
            let Some(addr) = addr else { continue };
            let count = census
                .iter()
                .filter(|s| s.local.port() == addr.port())
                .count();
            let labels = [("listener", listener.as_str())];
            ConstGauge::new(count as i64).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
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
