//! What the admin server's `/pools` shows: per upstream and endpoint the
//! connection counts, what opened and retired them, reuse, the learned idle
//! limit and ejection; per connection its age, requests, idle time and state.
//!
//! Each connection carries a [`ConnRecord`] the endpoint keeps a weak list of
//! (touched when a connection opens, not per request); a request moves the
//! record between idle and busy with one relaxed store.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::endpoint::Endpoint;
use super::observe::Observers;
use super::Pool;
use crate::accesslog::{self, ConnectionRecord};
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
    /// How it ended, once tether knows (the first account given wins).
    ending: OnceLock<Ending>,
    /// Where its end is reported, once it is established.
    observed: OnceLock<(Observers, SocketAddr)>,
}

/// How an upstream connection ended, for the connection log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ending {
    /// `tether` or `backend`: who closed first.
    pub(crate) closed_by: &'static str,
    /// `FIN`, `RST` or `peer-first`.
    pub(crate) how: &'static str,
    /// A retire reason's label, or `backend-closed`.
    pub(crate) reason: &'static str,
}

impl Ending {
    /// tether closed it, with `how`, for `reason`.
    pub(crate) fn by_tether(how: &'static str, reason: RetireReason) -> Self {
        Self {
            closed_by: "tether",
            how,
            reason: reason.label(),
        }
    }

    /// The backend closed it first (`how`: `peer-first` after its FIN, `RST`
    /// after its reset), for `reason`.
    pub(crate) fn by_backend(how: &'static str, reason: &'static str) -> Self {
        Self {
            closed_by: "backend",
            how,
            reason,
        }
    }
}

/// The reason of a connection whose end nobody accounted for: dropped with
/// its pool or its task, its socket closed by the drop (FIN).
const DROPPED: Ending = Ending {
    closed_by: "tether",
    how: "FIN",
    reason: "dropped",
};

impl ConnRecord {
    /// A record of a connection opened now, idle until a request takes it.
    pub(crate) fn new(opened_by: OpenedBy) -> Arc<Self> {
        let record = Arc::new(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            opened_at: Instant::now(),
            opened_by,
            requests: AtomicU64::new(0),
            idle_mark: AtomicU64::new(0),
            ending: OnceLock::new(),
            observed: OnceLock::new(),
        });
        record.idle(record.opened_at);
        record
    }

    /// The connection's id.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Requests (streams) it has carried so far.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Records how it ends; an earlier account stands.
    pub(crate) fn ended(&self, ending: Ending) {
        let _ = self.ending.set(ending);
    }

    /// Its end is reported to `observers` as a connection to `endpoint`.
    pub(crate) fn observe_end(&self, observers: Observers, endpoint: SocketAddr) {
        let _ = self.observed.set((observers, endpoint));
    }

    /// Time since it last became idle; `None` while busy.
    fn idle_for(&self, now: Instant) -> Option<Duration> {
        let mark = self.idle_mark.load(Ordering::Relaxed);
        (mark > 0).then(|| {
            let since = self.opened_at + Duration::from_millis(mark - 1);
            now.saturating_duration_since(since)
        })
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
        let idle = self.idle_for(now).map(millis);
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

impl Drop for ConnRecord {
    /// The last holder of the record is the connection itself: it is gone.
    fn drop(&mut self) {
        let Some((observers, endpoint)) = self.observed.get() else {
            // Never established: a dial whose handshake failed.
            return;
        };
        let Some(observers) = observers.get() else {
            return;
        };
        let now = Instant::now();
        let ending = self.ending.get().copied().unwrap_or(DROPPED);
        observers.ended(ConnectionRecord {
            id: self.id,
            upstream: String::new(),
            endpoint: *endpoint,
            opened_by: self.opened_by.label(),
            age_ms: accesslog::ms(now.duration_since(self.opened_at)),
            requests: self.requests(),
            idle_ms: self.idle_for(now).map(accesslog::ms),
            closed_by: ending.closed_by,
            how: ending.how,
            reason: ending.reason,
        });
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
