//! The pool's metrics, read at scrape time: one row per endpoint for each
//! family in `FAMILIES`, the shares of an upstream on several workers
//! folded into one series.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::endpoint::{Endpoint, EndpointStats};
use super::tls::UpstreamTls;
use super::view::OpenedBy;
use super::Registry;
use crate::census::{self, TcpSocket};

/// How the shares of one endpoint (one per worker) fold into one series.
#[derive(Clone, Copy)]
enum Fold {
    /// Each share counts its own connections.
    Sum,
    /// The value is the endpoint's, seen alike by every share (a TIME_WAIT
    /// count, a flag, an observation shared by the shares): taken once.
    Max,
}

/// What a family reads of an endpoint, and so its kind.
enum Read {
    /// A counter: one of the endpoint's [`EndpointStats`], summed over shares.
    Stat(fn(&EndpointStats) -> &AtomicU64),
    /// A gauge computed from the endpoint and the kernel's TIME_WAIT table.
    Live(Fold, fn(&Endpoint, &[TcpSocket]) -> u64),
}

/// One metric family of the pool: name, help, what it reads.
struct Family(&'static str, &'static str, Read);

/// Every family, in the order they are rendered (a table: one row a family).
#[rustfmt::skip]
const FAMILIES: &[Family] = &[
    Family("upstream_connections_opened", "Upstream connections dialled", Read::Stat(|s| &s.opened)),
    Family("upstream_connections_retired", "Idle upstream connections retired by policy", Read::Stat(|s| &s.retired)),
    Family("upstream_connections_discarded", "Upstream connections closed as stale, broken or abandoned", Read::Stat(|s| &s.discarded)),
    Family("upstream_connections_reused", "Idle upstream connections handed out again", Read::Stat(|s| &s.reused)),
    Family("upstream_probes", "Probe requests sent on idle upstream connections", Read::Stat(|s| &s.probes)),
    Family("upstream_probe_failures", "Probes that failed (the connection was reset)", Read::Stat(|s| &s.probe_failures)),
    Family("upstream_closed_by_backend", "Idle upstream connections the backend closed before tether retired them", Read::Stat(|s| &s.closed_by_backend)),
    Family("upstream_ejections", "Times the endpoint was ejected after repeated failures", Read::Stat(|s| &s.ejections)),
    Family("upstream_connections_open", "Upstream connections open now", Read::Live(Fold::Sum, |e, _| e.open_connections() as u64)),
    Family("upstream_connections_idle", "Idle upstream connections now", Read::Live(Fold::Sum, |e, _| e.idle_connections() as u64)),
    Family("upstream_requests_outstanding", "Requests in flight per endpoint", Read::Live(Fold::Sum, |e, _| e.outstanding() as u64)),
    Family("time_wait_toward_upstream", "TIME_WAIT sockets on this host toward the endpoint (kernel table)", Read::Live(Fold::Max, |e, census| {
        census.iter().filter(|s| s.remote == e.addr()).count() as u64
    })),
    Family("upstream_ejected", "1 while the endpoint is ejected", Read::Live(Fold::Max, |e, _| u64::from(e.is_ejected()))),
    Family("upstream_observed_idle_close_ms", "Shortest idle age at which the backend closed a pooled connection (0: never seen)", Read::Live(Fold::Max, |e, _| {
        e.observed_idle_close()
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    })),
];

/// The scrape-time view of every pool in a registry (every worker's share
/// of every upstream, as a reload leaves them), for the metrics registry.
pub struct PoolCollector {
    pools: Registry,
}

impl PoolCollector {
    /// A collector over the pools in `pools`.
    pub fn new(pools: Registry) -> Self {
        Self { pools }
    }

    /// One family's rows: (upstream, endpoint, value), shares folded.
    fn rows(&self, family: &Family, census: &[TcpSocket]) -> Vec<(String, String, u64)> {
        self.rows_of(|endpoint| match family.2 {
            Read::Stat(stat) => (stat(endpoint.stats()).load(Ordering::Relaxed), Fold::Sum),
            Read::Live(fold, live) => (live(endpoint, census), fold),
        })
    }

    /// Rows of what `read` takes from each endpoint: (upstream, endpoint,
    /// value), shares folded.
    fn rows_of(&self, read: impl Fn(&Endpoint) -> (u64, Fold)) -> Vec<(String, String, u64)> {
        let mut rows: Vec<(String, String, u64)> = Vec::new();
        for pool in &self.pools.all() {
            for endpoint in pool.endpoints().iter() {
                let (value, fold) = read(endpoint);
                let (upstream, addr) = (pool.name(), endpoint.addr().to_string());
                match rows
                    .iter_mut()
                    .find(|(u, e, _)| u == upstream && *e == addr)
                {
                    Some(row) => {
                        row.2 = match fold {
                            Fold::Sum => row.2.saturating_add(value),
                            Fold::Max => row.2.max(value),
                        }
                    }
                    None => rows.push((upstream.to_owned(), addr, value)),
                }
            }
        }
        rows
    }
}

impl fmt::Debug for PoolCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolCollector")
            .field("pools", &self.pools)
            .finish()
    }
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let census = census::time_wait().unwrap_or_default();
        for family in FAMILIES {
            let Family(name, help, read) = family;
            let metric_type = match read {
                Read::Stat(_) => ConstCounter::new(0u64).metric_type(),
                Read::Live(..) => ConstGauge::new(0i64).metric_type(),
            };
            let mut encoder = encoder.encode_descriptor(name, help, None, metric_type)?;
            for (upstream, endpoint, value) in self.rows(family, &census) {
                let labels = [
                    ("upstream", upstream.as_str()),
                    ("endpoint", endpoint.as_str()),
                ];
                let series = encoder.encode_family(&labels)?;
                match read {
                    Read::Stat(_) => ConstCounter::new(value).encode(series)?,
                    Read::Live(..) => {
                        ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(series)?
                    }
                }
            }
        }
        self.encode_opened_by(&mut encoder)?;
        self.encode_tls(&mut encoder)
    }
}

impl PoolCollector {
    /// `upstream_connections_opened_by`: connections opened, by what opened
    /// them (warm floor, refill, demand, reload).
    fn encode_opened_by(&self, encoder: &mut DescriptorEncoder) -> Result<(), fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "upstream_connections_opened_by",
            "Upstream connections dialled, by cause: warm (first warm floor), refill, demand (a request found none idle), reload (warm floor of what a reload added)",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for cause in OpenedBy::ALL {
            for (upstream, endpoint, value) in
                self.rows_of(|e| (e.stats().opened_by(cause), Fold::Sum))
            {
                let labels = [
                    ("upstream", upstream.as_str()),
                    ("endpoint", endpoint.as_str()),
                    ("cause", cause.label()),
                ];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }

    /// The TLS of every upstream that has it, once per upstream (its shares
    /// share one).
    fn tls(&self) -> Vec<Arc<UpstreamTls>> {
        let mut seen: Vec<Arc<UpstreamTls>> = Vec::new();
        for pool in &self.pools.all() {
            if let Some(tls) = &pool.inner.tls {
                if !seen.iter().any(|s| s.upstream() == tls.upstream()) {
                    seen.push(tls.clone());
                }
            }
        }
        seen
    }

    /// The `upstream_tls_*` families: handshakes by kind, failures by reason,
    /// verification off, days left on the certificates.
    fn encode_tls(&self, encoder: &mut DescriptorEncoder) -> Result<(), fmt::Error> {
        let all = self.tls();
        let counter = ConstCounter::new(0u64).metric_type();
        let gauge = ConstGauge::new(0i64).metric_type();
        let mut family = encoder.encode_descriptor(
            "upstream_tls_handshakes",
            "Upstream TLS handshakes completed, by kind: full or resumed (a cached session)",
            None,
            counter,
        )?;
        for tls in &all {
            for (kind, value) in [("full", &tls.stats.full), ("resumed", &tls.stats.resumed)] {
                let labels = [("upstream", tls.upstream()), ("kind", kind)];
                ConstCounter::new(value.load(Ordering::Relaxed))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "upstream_tls_failures",
            "Upstream TLS handshakes that failed, by reason (unknown-issuer, name-mismatch, expired, timeout, alert, ...)",
            None,
            counter,
        )?;
        for tls in &all {
            let failures = tls
                .stats
                .failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            for (reason, value) in failures {
                let labels = [("upstream", tls.upstream()), ("reason", reason)];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "upstream_tls_rotations",
            "Changes to the upstream's TLS files (CA, client certificate, key), by result: applied (pooled connections roll over within tls.rotation_window) or refused (unusable; the files in use stay)",
            None,
            counter,
        )?;
        for tls in &all {
            let (applied, refused) = tls.rotations();
            for (result, value) in [("applied", applied), ("refused", refused)] {
                let labels = [("upstream", tls.upstream()), ("result", result)];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "upstream_tls_verify_disabled",
            "1 when the upstream's certificate is not verified (tls.verify = \"none\")",
            None,
            gauge,
        )?;
        for tls in &all {
            let labels = [("upstream", tls.upstream())];
            ConstGauge::new(i64::from(tls.verify_disabled()))
                .encode(family.encode_family(&labels)?)?;
        }
        self.encode_days_left(encoder, &all)
    }

    /// Days left on each endpoint's certificate (from its last handshake) and
    /// on the client certificate.
    fn encode_days_left(
        &self,
        encoder: &mut DescriptorEncoder,
        all: &[Arc<UpstreamTls>],
    ) -> Result<(), fmt::Error> {
        let gauge = ConstGauge::new(0i64).metric_type();
        let mut family = encoder.encode_descriptor(
            "upstream_tls_cert_days_left",
            "Days until the endpoint's server certificate expires, as of its last handshake",
            None,
            gauge,
        )?;
        for tls in all {
            let days = tls
                .stats
                .cert_days_left
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            for (addr, value) in days {
                let endpoint = addr.to_string();
                let labels = [
                    ("upstream", tls.upstream()),
                    ("endpoint", endpoint.as_str()),
                ];
                ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "upstream_tls_client_cert_days_left",
            "Days until the client certificate tether presents to the upstream expires",
            None,
            gauge,
        )?;
        for tls in all {
            if let Some(value) = tls.client_cert_days_left() {
                let labels = [("upstream", tls.upstream())];
                ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
