//! What the admin server's `/pools` shows: per upstream and endpoint the
//! connection counts, what opened and retired them, reuse, the learned idle
//! limit and ejection; per connection its age, requests, idle time and state.
//!
//! Each connection carries a [`ConnRecord`] the endpoint keeps a weak list of
//! (touched when a connection opens, not per request); a request moves the
//! record between idle and busy with one relaxed store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::endpoint::Endpoint;
use super::Pool;
use crate::config::RetireReason;

/// Ids of upstream connections, unique in the process (every worker's share).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Why a connection was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpenedBy {
    /// The warm floor, before the endpoint first had it whole.
    Warm,
    /// The warm floor again, after connections left it.
    Refill,
    /// A request found no idle connection and a free slot.
    Demand,
    /// The warm floor of an endpoint or pool a reload added, opened before
    /// requests moved to it.
    Reload,
}

impl OpenedBy {
    pub const ALL: [OpenedBy; 4] = [Self::Warm, Self::Refill, Self::Demand, Self::Reload];

    /// The name `/pools` and the logs use.
    pub fn label(self) -> &'static str {
        match self {
            Self::Warm => "warm",
            Self::Refill => "refill",
            Self::Demand => "demand",
            Self::Reload => "reload",
        }
    }
}

/// What is known of one open connection, shared by the connection and the
/// endpoint's list.
#[derive(Debug)]
pub(crate) struct ConnRecord {
    id: u64,
    opened_at: Instant,
    opened_by: OpenedBy,
    requests: AtomicU64,
    /// Milliseconds after `opened_at` at which it last became idle, plus one;
    /// 0 while busy.
    idle_mark: AtomicU64,
}

impl ConnRecord {
    /// A record of a connection opened now, idle until a request takes it.
    pub(crate) fn new(opened_by: OpenedBy) -> Arc<Self> {
        let record = Arc::new(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            opened_at: Instant::now(),
            opened_by,
            requests: AtomicU64::new(0),
            idle_mark: AtomicU64::new(0),
        });
        record.idle(record.opened_at);
        record
    }

    /// The connection's id.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// It went back to idle at `now`.
    pub(crate) fn idle(&self, now: Instant) {
        let ms = u64::try_from(now.duration_since(self.opened_at).as_millis()).unwrap_or(u64::MAX);
        self.idle_mark
            .store(ms.saturating_add(1), Ordering::Relaxed);
    }

    /// A request took it.
    pub(crate) fn busy(&self) {
        self.idle_mark.store(0, Ordering::Relaxed);
    }

    /// It has carried `requests` requests (streams, for HTTP/2).
    pub(crate) fn served(&self, requests: u64) {
        self.requests.store(requests, Ordering::Relaxed);
    }

    fn view(&self, now: Instant) -> ConnectionView {
        let mark = self.idle_mark.load(Ordering::Relaxed);
        let idle = (mark > 0).then(|| {
            let since = self.opened_at + Duration::from_millis(mark - 1);
            millis(now.saturating_duration_since(since))
        });
        ConnectionView {
            id: self.id,
            state: if idle.is_some() { "idle" } else { "busy" },
            opened_by: self.opened_by,
            age_ms: millis(now.duration_since(self.opened_at)),
            requests: self.requests.load(Ordering::Relaxed),
            idle_ms: idle,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One upstream in `/pools`.
#[derive(Debug, Serialize)]
pub struct PoolView {
    /// The upstream's name.
    pub upstream: String,
    /// Its endpoints, every worker's share of each folded into one.
    pub endpoints: Vec<EndpointView>,
}

/// One endpoint in `/pools`.
#[derive(Debug, Default, Serialize)]
pub struct EndpointView {
    /// The address dialled.
    pub address: String,
    /// Connections open and not carrying a request (HTTP/2: no stream open).
    pub idle: usize,
    /// Connections carrying a request.
    pub busy: usize,
    /// Connections being dialled.
    pub connecting: usize,
    /// Requests in flight, dialling and waiting included.
    pub outstanding: usize,
    /// Connections opened, by cause.
    pub opened: Counts,
    /// Connections closed by tether, by reason (`error`: stale, broken or
    /// abandoned).
    pub retired: Counts,
    /// Idle connections handed out again.
    pub reused: u64,
    /// Idle connections the backend closed before tether retired them.
    pub closed_by_backend: u64,
    /// The shortest idle age at which the backend was seen closing a pooled
    /// connection, in milliseconds.
    pub learned_idle_limit_ms: Option<u64>,
    /// Whether the balancer skips it now after repeated failures.
    pub ejected: bool,
    /// Times it was ejected.
    pub ejections: u64,
    /// Every open connection.
    pub connections: Vec<ConnectionView>,
}

/// Counts by name (a cause or a reason).
pub type Counts = std::collections::BTreeMap<&'static str, u64>;

/// One connection in `/pools`.
#[derive(Debug, Serialize)]
pub struct ConnectionView {
    /// Unique in the process; the same id the logs use.
    pub id: u64,
    /// `idle` or `busy`.
    pub state: &'static str,
    /// Why it was opened.
    pub opened_by: OpenedBy,
    /// Time since it was opened, in milliseconds.
    pub age_ms: u64,
    /// Requests (HTTP/2: streams) it has carried.
    pub requests: u64,
    /// Time since it last became idle, in milliseconds; absent while busy.
    pub idle_ms: Option<u64>,
}

/// Every upstream of `pools` (each worker's share of it folded in), in the
/// order the upstreams first appear.
pub fn view(pools: &[Pool]) -> Vec<PoolView> {
    let now = Instant::now();
    let mut views: Vec<PoolView> = Vec::new();
    for pool in pools {
        let index = match views.iter().position(|v| v.upstream == pool.name()) {
            Some(index) => index,
            None => {
                views.push(PoolView {
                    upstream: pool.name().to_owned(),
                    endpoints: Vec::new(),
                });
                views.len() - 1
            }
        };
        for endpoint in pool.endpoints().iter() {
            let address = endpoint.addr().to_string();
            let endpoints = &mut views[index].endpoints;
            let at = match endpoints.iter().position(|e| e.address == address) {
                Some(at) => at,
                None => {
                    endpoints.push(EndpointView {
                        address,
                        ..EndpointView::default()
                    });
                    endpoints.len() - 1
                }
            };
            fold(&mut endpoints[at], endpoint, now);
        }
    }
    views
}

/// Adds one share of an endpoint to its view.
fn fold(view: &mut EndpointView, endpoint: &Endpoint, now: Instant) {
    let stats = endpoint.stats();
    let connections: Vec<ConnectionView> = endpoint.records().iter().map(|r| r.view(now)).collect();
    let idle = connections.iter().filter(|c| c.idle_ms.is_some()).count();
    view.idle += idle;
    view.busy += connections.len() - idle;
    view.connecting += endpoint
        .open_connections()
        .saturating_sub(endpoint.established_connections());
    view.outstanding += endpoint.outstanding();
    for cause in OpenedBy::ALL {
        *view.opened.entry(cause.label()).or_default() += stats.opened_by(cause);
    }
    for reason in RetireReason::ALL {
        *view.retired.entry(reason.label()).or_default() += stats.retired_for(reason);
    }
    view.reused += stats.reused.load(Ordering::Relaxed);
    view.closed_by_backend += stats.closed_by_backend.load(Ordering::Relaxed);
    let learned = endpoint.observed_idle_close().map(millis);
    view.learned_idle_limit_ms = match (view.learned_idle_limit_ms, learned) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    view.ejected |= endpoint.is_ejected();
    view.ejections += stats.ejections.load(Ordering::Relaxed);
    view.connections.extend(connections);
}

/// The records of an endpoint's open connections: dead entries are dropped
/// as they are found.
pub(crate) fn live(records: &mut Vec<Weak<ConnRecord>>) -> Vec<Arc<ConnRecord>> {
    records.retain(|r| r.strong_count() > 0);
    records.iter().filter_map(Weak::upgrade).collect()
}
