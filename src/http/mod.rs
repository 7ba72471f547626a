//! The proxy service: what happens to one request between the client connection
//! and the pool. Header rules (`headers`), the pre-read of the request body and
//! the response body (`body`), the single retry of a request that failed on a
//! reused connection (`forward`), the response and its HTTP/1.0 buffering
//! (`response`), the request timeout, which upstream a request goes to
//! (`route`), and what the client is told when tether answers itself
//! (`error`). The client connection is known only through
//! [`ClientConnection`], which the layer above implements.

pub mod body;
mod client;
mod error;
mod forward;
pub mod headers;
mod request;
mod response;
mod route;
mod service;

use std::sync::Arc;

use http::StatusCode;
use tokio::time::Instant;

use crate::config::ListenerConfig;
use crate::metrics::{ListenerLabel, Metrics, Name, ReasonLabels, RequestLabels};
pub use client::ClientConnection;
pub use error::{Failure, ProxyError, Side, ERROR_HEADER};
pub use request::ClientRequest;
pub use response::{ClientHead, ProxyResponse};
pub use route::{Routes, Target};
pub use service::ProxyService;

/// A listener bound to its upstreams' pools: what it forwards to, shared by
/// its connections.
pub struct Binding {
    /// The listener's name as a metric label.
    pub label: Name,
    /// The listener's settings.
    pub listener: ListenerConfig,
    /// Its routes and default upstream, each with this worker's share of
    /// the upstream's pool.
    pub routes: Routes,
    /// Where outcomes are counted.
    pub metrics: Arc<Metrics>,
    /// The per-request handles into `metrics`.
    pub counters: BindingMetrics,
    /// The access log, when `[log.access]` is on.
    pub access_log: Option<crate::accesslog::AccessLog>,
}

/// Where a listener's accept loop and connections find its [`Binding`]: a
/// reload stores a new one, which new requests take.
pub type BindingSlot = arc_swap::ArcSwap<Binding>;

/// The reason label of a client connection that ended with a FIN.
pub const FIN: &str = "fin";

/// Metric handles a binding touches on every request, resolved once so the
/// request path does no label hashing.
pub struct BindingMetrics {
    by_class: [prometheus_client::metrics::counter::Counter; 5],
    latency: prometheus_client::metrics::histogram::Histogram,
    dropped_underscore: prometheus_client::metrics::counter::Counter,
    /// Client connections that ended with a FIN, by far the most common
    /// ending: resolved at the first, so that the series appears only once
    /// it counts something, as the other endings' do.
    closed_fin: std::sync::OnceLock<prometheus_client::metrics::counter::Counter>,
}

impl BindingMetrics {
    /// Resolves the handles of listener `label`.
    pub fn new(metrics: &Metrics, label: &Name) -> Self {
        let class = |class: &'static str| {
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    listener: label.clone(),
                    class,
                })
                .clone()
        };
        Self {
            by_class: ["1xx", "2xx", "3xx", "4xx", "5xx"].map(class),
            latency: metrics
                .response_latency
                .get_or_create(&ListenerLabel {
                    listener: label.clone(),
                })
                .clone(),
            dropped_underscore: metrics
                .request_headers_dropped
                .get_or_create(&ReasonLabels {
                    listener: label.clone(),
                    reason: Name::from("underscore"),
                })
                .clone(),
            closed_fin: std::sync::OnceLock::new(),
        }
    }
}

impl Binding {
    /// Counts a client connection's end, by `reason` (`fin`, or why it was
    /// reset).
    pub fn record_client_closed(&self, reason: &'static str) {
        let resolve = || {
            self.metrics
                .client_closed
                .get_or_create(&ReasonLabels {
                    listener: self.label.clone(),
                    reason: Name::from(reason),
                })
                .clone()
        };
        if reason == FIN {
            self.counters.closed_fin.get_or_init(resolve).inc();
        } else {
            resolve().inc();
        }
    }

    /// Counts request header fields dropped because their name has a `_`.
    pub fn record_dropped_underscore(&self, fields: u64) {
        if fields > 0 {
            self.counters.dropped_underscore.inc_by(fields);
        }
    }

    /// Counts one answered request, and its reason when tether made the response.
    pub fn record(&self, status: StatusCode, reason: Option<&str>, started: Option<Instant>) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.counters.by_class[class].inc();
        if let Some(reason) = reason {
            self.metrics
                .local_responses
                .get_or_create(&ReasonLabels {
                    listener: self.label.clone(),
                    reason: Name::from(reason),
                })
                .inc();
        }
        if let Some(started) = started {
            self.counters
                .latency
                .observe(started.elapsed().as_secs_f64());
        }
    }
}
