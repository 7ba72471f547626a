//! Upstream connection pools: one [`Pool`] per `[[upstream]]`, one [`Endpoint`]
//! per resolved address, each with its own LIFO idle list and connection bound.
//!
//! Invariants:
//! - an endpoint never has more than `pool.max_connections` connections open
//!   (idle, busy or being dialled): each holds a slot for its life;
//! - an idle connection is checked for staleness (an exchange on it failed,
//!   or a peek shows FIN, RST or stray bytes) before it is handed out;
//! - a connection goes back to the idle list only when its exchange is known to
//!   be complete and its request body was sent whole ([`Lease::release`]);
//!   every other path discards it, closed as `pool.retire.error` says (RST
//!   unless that is `graceful`, then FIN);
//! - what happens to an idle connection is one decision (`retire`), asked on
//!   its return, at a checkout and in the background sweep;
//! - with zero traffic each endpoint keeps `pool.min_idle` connections open, and
//!   a background task per pool refills, retires and reaps them (`maintain`);
//! - endpoints that vanish from DNS leave the balancing set at once, retire
//!   their idle connections, and are dropped when their last lease ends.
//!
//! Files: `endpoint` (slots, idle list, health), `acquire` (the one acquire
//! loop), `dial` (the one dial path), `h1` and `h2` (a connection of each
//! protocol), `exchange` (an HTTP/1.1 exchange: the request written, the
//! response head read, the body decoded), `io` (the socket, plain or under
//! TLS), `lease`, `retire`, `probe`,
//! `maintain`, `balance`, `body`, `metrics`, `observe` (histograms and the
//! connection log), `tls` (rustls settings, handshake, read-through and
//! `close_notify`), `view` (`/pools`),
//! `reconfigure` (a reload's change to a running pool), `registry` (every
//! pool by upstream name).
//!
//! A pool's settings are one `ArcSwap<UpstreamConfig>` its endpoints share:
//! a reload swaps them in place and every reader sees the new ones at its
//! next look (socket options and HTTP/2 pings, set at the dial, apply to
//! connections dialled after it).
//!
//! HTTP/1.1 is tether's own (`h1`, `exchange`, on the `crate::h1` codec):
//! the request's task writes the request and reads the response on the
//! socket itself, with no connection task, channel or task hop between
//! them. HTTP/2 is `hyper::client::conn`'s, whose connection task
//! multiplexes the streams (the work hyper and h2 do well); hyper-util's
//! client pool is not used, as it has no warm floor, always closes with
//! FIN, and needs a timer for its idle timeout to fire at all. Requests go
//! up as [`UpstreamBody`] and responses come back as [`ResponseBody`], the
//! pool's own types for both protocols.

mod acquire;
mod balance;
mod body;
mod dial;
mod endpoint;
mod exchange;
mod h1;
mod h2;
mod io;
mod lease;
mod maintain;
pub mod metrics;
mod observe;
mod probe;
mod reconfigure;
mod registry;
mod request;
mod response;
mod retire;
mod rotation;
mod tls;
mod view;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::UpstreamConfig;
use acquire::acquire_on;
pub(crate) use body::hint_plus;
pub use body::{BodyError, BoxError, ClientBody, FramePoll, ResponseBody, UpstreamBody};
pub use endpoint::{Endpoint, EndpointStats};
pub use h1::KeepAliveHint;
pub(crate) use h2::refused_by_peer;
pub use lease::Lease;
use lease::Outstanding;
pub(crate) use lease::SendError;
pub use lease::SendFailure;
pub use observe::PoolObservers;
pub use reconfigure::Reconfigured;
pub use registry::{Registry, Shares};
pub use request::{Http1Request, OutboundHead, UpstreamRequest};
pub use response::{Http1Head, UpstreamHead, UpstreamResponse};
// For `tether doctor --tls`, which labels and dates certificates as the pool does.
pub(crate) use tls::{certificate_reason, days_left};
pub use tls::{warn_unverified, TlsSetupError};
pub use view::{view, ConnectionView, EndpointView, OpenedBy, PoolView};

/// Failures to obtain an upstream connection.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No address is known for the upstream (DNS has not answered).
    #[error("upstream {upstream:?} has no resolved endpoints")]
    NoEndpoints { upstream: String },
    /// Every endpoint is ejected after repeated failures.
    #[error("every endpoint of upstream {upstream:?} is ejected after repeated failures")]
    AllEjected { upstream: String },
    /// Every connection slot stayed busy for `acquire_timeout`.
    #[error("no connection to {addr} became free within {}", humantime::format_duration(*waited))]
    Exhausted { addr: SocketAddr, waited: Duration },
    /// The TCP connect did not finish within `connect_timeout`.
    #[error("connect to {addr} timed out after {}", humantime::format_duration(*after))]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    /// The TCP connect failed.
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The TLS handshake failed (`verify`: the backend's certificate was
    /// refused, for `reason`).
    #[error("TLS with {addr} failed ({reason}): {detail}")]
    Tls {
        addr: SocketAddr,
        verify: bool,
        reason: &'static str,
        detail: String,
    },
    /// hyper refused the new connection.
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

impl PoolError {
    /// Short machine-readable reason for the `x-tether-error` header.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoEndpoints { .. } => "no-endpoints",
            Self::AllEjected { .. } => "all-endpoints-ejected",
            Self::Exhausted { .. } => "pool-exhausted",
            Self::ConnectTimeout { .. } => "connect-timeout",
            Self::Connect { source, .. }
                if source.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                "connect-refused"
            }
            Self::Connect { .. } | Self::Handshake { .. } => "connect-failed",
            Self::Tls { verify: true, .. } => "upstream-tls-verify",
            Self::Tls { .. } => "upstream-tls-handshake",
        }
    }

    /// Whether tether refused to dial on its own account (its TLS settings
    /// unusable, its client certificate expired): nothing is known of the
    /// endpoint, so it counts against neither its health nor ejection.
    pub(crate) fn is_local_refusal(&self) -> bool {
        matches!(
            self,
            Self::Tls {
                reason: "setup" | "client-cert-expired",
                ..
            }
        )
    }
}

/// The connection pool of one upstream; a cheap handle.
#[derive(Clone)]
pub struct Pool {
    pub(crate) inner: Arc<PoolInner>,
}

/// An upstream's settings, shared by its pool and endpoints and swapped in
/// place when a reload changes them.
pub(crate) type SharedSettings = Arc<arc_swap::ArcSwap<UpstreamConfig>>;

pub(crate) struct PoolInner {
    /// The upstream's name: what a reload matches pools by, so it never changes.
    pub(super) name: String,
    pub(super) settings: SharedSettings,
    /// What opens the first warm floor of the pool's endpoints.
    pub(super) first_floor: OpenedBy,
    /// Held while the endpoint set is resolved and replaced, by a DNS
    /// refresh or a reload, so the two never interleave.
    pub(super) addresses: tokio::sync::Mutex<()>,
    pub(super) endpoints: RwLock<Arc<Vec<Arc<Endpoint>>>>,
    pub(super) next: AtomicUsize,
    pub(super) maintenance: Arc<Notify>,
    pub(super) shutdown: CancellationToken,
    pub(super) observers: observe::Observers,
    /// The upstream's TLS, fixed for the pool's life (a reload that changes
    /// `[upstream.tls]` starts a new pool).
    pub(super) tls: Option<Arc<tls::UpstreamTls>>,
}

impl Pool {
    /// Resolves the endpoints once (so the first requests have somewhere to go),
    /// then starts the background task that warms, reaps and re-resolves.
    pub async fn start(settings: UpstreamConfig) -> Self {
        Self::start_opened_by(settings, OpenedBy::Warm).await
    }

    /// As [`Pool::start`], its first warm floor counted as opened by `cause`.
    pub async fn start_opened_by(settings: UpstreamConfig, cause: OpenedBy) -> Self {
        let settings = Arc::new(settings);
        let inner = Arc::new(PoolInner {
            name: settings.name.clone(),
            settings: Arc::new(arc_swap::ArcSwap::new(settings.clone())),
            first_floor: cause,
            addresses: tokio::sync::Mutex::new(()),
            endpoints: RwLock::new(Arc::new(Vec::new())),
            next: AtomicUsize::new(0),
            maintenance: Arc::new(Notify::new()),
            shutdown: CancellationToken::new(),
            observers: Arc::default(),
            tls: tls::for_upstream(&settings),
        });
        let pool = Self { inner };
        let first =
            tokio::time::timeout(settings.connect_timeout, maintain::resolve(&settings)).await;
        match first {
            Ok(addrs) => pool.apply_addresses(addrs),
            Err(_) => {
                tracing::warn!(upstream = %settings.name, "initial DNS resolution timed out; retrying in the background")
            }
        }
        tokio::spawn(maintain::maintain(Arc::downgrade(&pool.inner)));
        pool
    }

    /// The upstream's settings now (a reload may swap them).
    pub fn settings(&self) -> arc_swap::Guard<Arc<UpstreamConfig>> {
        self.inner.settings.load()
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Whether every endpoint has its warm floor (`pool.min_idle`
    /// connections) open. An upstream whose endpoints have not resolved yet
    /// is not warm: a request now would have nowhere to go.
    pub fn is_warm(&self) -> bool {
        let endpoints = self.endpoints();
        let floor = self.settings().pool.min_idle;
        !endpoints.is_empty()
            && endpoints
                .iter()
                .all(|e| e.established_connections() >= floor)
    }

    /// The endpoints currently balanced across.
    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.inner
            .endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Picks an endpoint and checks out a connection: the hottest usable idle
    /// one, else a new one if a slot is free, else waits up to `acquire_timeout`.
    ///
    /// A connect failure (the request was never sent) is retried on each other
    /// endpoint in turn, so a dead endpoint costs latency, not errors, until it
    /// is ejected.
    pub async fn acquire(&self) -> Result<Lease, PoolError> {
        let mut tried: Vec<SocketAddr> = Vec::new();
        loop {
            let endpoint = self.pick_excluding(&tried)?;
            let addr = endpoint.addr;
            match acquire_on(Outstanding::new(endpoint), false).await {
                Err(e @ (PoolError::Connect { .. } | PoolError::ConnectTimeout { .. })) => {
                    tried.push(addr);
                    if tried.len() >= self.endpoints().len() {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "connect failed; trying another endpoint");
                }
                other => return other,
            }
        }
    }

    /// Checks out a freshly dialled connection to the same endpoint as a failed
    /// lease: used for the one retry of a request that failed on a reused one.
    pub async fn acquire_fresh(&self, addr: SocketAddr) -> Result<Lease, PoolError> {
        let endpoints = self.endpoints();
        let endpoint = match endpoints.iter().find(|e| e.addr == addr) {
            Some(e) => e.clone(),
            None => self.pick()?,
        };
        acquire_on(Outstanding::new(endpoint), true).await
    }

    /// Makes the endpoint set the one `addrs` names, keeping the endpoints
    /// it already has (a DNS refresh: added endpoints warm in the background).
    fn apply_addresses(&self, addrs: Vec<SocketAddr>) {
        let current = self.endpoints();
        let next = addrs
            .iter()
            .map(|addr| match current.iter().find(|e| e.addr == *addr) {
                Some(existing) => existing.clone(),
                None => {
                    tracing::info!(upstream = %self.inner.name, endpoint = %addr, "endpoint added");
                    self.new_endpoint(*addr, self.inner.first_floor)
                }
            })
            .collect();
        self.publish(next);
    }

    /// Balances across `next` from now on; endpoints not in it leave the set,
    /// retire their idle connections and are dropped when their last lease
    /// ends.
    fn publish(&self, next: Vec<Arc<Endpoint>>) {
        let previous = {
            let mut guard = self
                .inner
                .endpoints
                .write()
                .unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut *guard, Arc::new(next.clone()))
        };
        for old in previous.iter() {
            if !next.iter().any(|n| Arc::ptr_eq(n, old)) {
                tracing::info!(upstream = %self.inner.name, endpoint = %old.addr, "endpoint removed; draining it");
                old.removed.store(true, Ordering::Relaxed);
                old.retire_all_idle();
            }
        }
        self.inner.maintenance.notify_one();
    }

    fn new_endpoint(&self, addr: SocketAddr, first_floor: OpenedBy) -> Arc<Endpoint> {
        Arc::new(Endpoint::new(
            addr,
            self.inner.settings.clone(),
            self.inner.maintenance.clone(),
            first_floor,
            self.inner.observers.clone(),
            self.inner.tls.clone(),
        ))
    }

    /// Stops the background task and retires every idle connection.
    pub fn close(&self) {
        self.inner.shutdown.cancel();
        for endpoint in self.endpoints().iter() {
            endpoint.removed.store(true, Ordering::Relaxed);
            endpoint.retire_all_idle();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A listener that holds every connection and counts accepts and resets.
    async fn holder() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, resets) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, r) = (accepted.clone(), resets.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) => return,
                            Ok(_) => continue,
                            Err(e) => {
                                if e.kind() == std::io::ErrorKind::ConnectionReset {
                                    r.fetch_add(1, Ordering::SeqCst);
                                }
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted, resets)
    }

    async fn eventually(mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not met in 5s");
    }

    #[tokio::test]
    async fn vanished_endpoint_is_drained_and_a_new_one_is_warmed() {
        let (a, a_accepted, a_resets) = holder().await;
        let (b, b_accepted, _) = holder().await;
        let mut settings = UpstreamConfig::new("u", vec![a.to_string()]);
        settings.pool.min_idle = 1;
        let pool = Pool::start(settings).await;
        eventually(|| a_accepted.load(Ordering::SeqCst) == 1).await;

        pool.apply_addresses(vec![b]);
        let endpoints = pool.endpoints();
        assert_eq!(endpoints.len(), 1);
        assert_eq!(endpoints[0].addr(), b);
        eventually(|| a_resets.load(Ordering::SeqCst) == 1).await;
        eventually(|| b_accepted.load(Ordering::SeqCst) == 1).await;
        pool.close();
    }

    #[tokio::test]
    async fn upstream_sockets_carry_keepalive_and_nodelay() {
        let (a, accepted, _) = holder().await;
        let mut settings = UpstreamConfig::new("u", vec![a.to_string()]);
        settings.pool.min_idle = 1;
        settings.keepalive.tcp_idle = Duration::from_secs(17);
        settings.keepalive.tcp_interval = Duration::from_secs(4);
        settings.keepalive.tcp_count = 5;
        let pool = Pool::start(settings).await;
        eventually(|| accepted.load(Ordering::SeqCst) == 1).await;
        let endpoint = pool.endpoints()[0].clone();
        eventually(|| endpoint.idle_connections() == 1).await;
        let idle = endpoint.lock_idle();
        let sock = socket2::SockRef::from(idle[0].conn.socket());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.keepalive_time().unwrap(), Duration::from_secs(17));
        assert_eq!(sock.keepalive_interval().unwrap(), Duration::from_secs(4));
        assert_eq!(sock.keepalive_retries().unwrap(), 5);
        assert!(sock.nodelay().unwrap());
        drop(idle);
        pool.close();
    }
}
