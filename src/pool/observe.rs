//! What the pool tells beyond its scrape-time counters: the time requests
//! wait in acquire and the requests each connection carried (histograms,
//! their handles resolved once per pool share), and a connection-log line for
//! every connection that ends.
//!
//! The pool starts before the metrics and logs are wired, so its endpoints
//! share one [`Observers`] cell that [`Pool::observe`] fills once; until then
//! nothing is observed.

use std::sync::{Arc, OnceLock};

use prometheus_client::metrics::histogram::Histogram;

use super::Pool;
use crate::accesslog::{ConnectionRecord, Sink};
use crate::metrics::{Metrics, Name, UpstreamLabel};

/// The cell a pool share and its endpoints and connections read their
/// observers from.
pub(crate) type Observers = Arc<OnceLock<PoolObservers>>;

/// A pool share's metric handles and connection log.
pub struct PoolObservers {
    upstream: String,
    wait: Histogram,
    per_connection: Histogram,
    log: Option<Sink>,
}

impl std::fmt::Debug for PoolObservers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolObservers")
            .field("upstream", &self.upstream)
            .field("log", &self.log.is_some())
            .finish()
    }
}

impl PoolObservers {
    /// Resolves upstream `upstream`'s handles in `metrics`; `log` is the
    /// connection log, when it is on.
    pub fn new(metrics: &Metrics, upstream: &str, log: Option<Sink>) -> Self {
        let label = UpstreamLabel {
            upstream: Name::from(upstream),
        };
        Self {
            upstream: upstream.to_owned(),
            wait: metrics.upstream_pool_wait.get_or_create(&label).clone(),
            per_connection: metrics
                .upstream_requests_per_connection
                .get_or_create(&label)
                .clone(),
            log,
        }
    }

    /// A request waited `seconds` in acquire.
    pub(crate) fn waited(&self, seconds: f64) {
        self.wait.observe(seconds);
    }

    /// A connection ended: its request count is observed and, with the
    /// connection log on, its line written (under this pool's upstream name).
    pub(crate) fn ended(&self, mut record: ConnectionRecord) {
        self.per_connection.observe(record.requests as f64);
        if let Some(log) = &self.log {
            record.upstream.clone_from(&self.upstream);
            log.write(&record);
        }
    }
}

impl Pool {
    /// Starts observing: the histograms in `observers` and, when it is on,
    /// the connection log. Only the first call has any effect.
    pub fn observe(&self, observers: PoolObservers) {
        if self.inner.observers.set(observers).is_err() {
            tracing::debug!(upstream = %self.name(), "pool already observed");
        }
    }
}
