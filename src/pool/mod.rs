//! Upstream connection pools: one [`Pool`] per `[[upstream]]`, one [`Endpoint`]
//! per resolved address, each with its own LIFO idle list and connection bound.
//!
//! Invariants:
//! - an endpoint never has more than `pool.max_connections` connections open
//!   (idle, busy or being dialled): each holds a semaphore permit for its life;
//! - an idle connection is checked for staleness (hyper closed it, or a peek
//!   shows FIN, RST or stray bytes) before it is handed out;
//! - a connection goes back to the idle list only when its exchange is known to
//!   be complete and its request body was sent whole ([`Lease::release`]);
//!   every other path discards it, with RST unless `pool.retire.error` is
//!   `graceful` (then FIN);
//! - with zero traffic each endpoint keeps `pool.min_idle` connections open, and
//!   a background task per pool refills, retires and reaps them;
//! - endpoints that vanish from DNS leave the balancing set at once, retire
//!   their idle connections, and are dropped when their last lease ends.
//!
//! The pool is built on `hyper::client::conn` rather than hyper-util's client:
//! that pool has no warm floor, always closes with FIN, and needs a timer for
//! its idle timeout to fire at all. hyper stays inside the pool: requests go up
//! as [`UpstreamBody`] and responses come back as [`ResponseBody`].

mod body;
mod conn;
mod h2;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Balance, Protocol, Retire, RetireReason, UpstreamConfig};
pub(crate) use body::hint_plus;
pub use body::{BodyError, ResponseBody, UpstreamBody};
pub(crate) use conn::SendError;
use conn::{Conn, Ending, Outstanding, Slot};
pub use conn::{KeepAliveHint, Lease};
pub(crate) use h2::refused_by_peer;
use h2::H2Conn;

/// How often the maintenance task looks at every endpoint even without a wake-up.
const MAINTENANCE_TICK: Duration = Duration::from_secs(1);
/// First and largest pause between refill attempts after connect failures.
const REFILL_BACKOFF_MIN: Duration = Duration::from_millis(200);
const REFILL_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Idle connections above `max_idle` are retired only after this long idle, so a
/// burst that briefly returns many connections does not churn them.
const OVER_MAX_IDLE_GRACE: Duration = Duration::from_secs(1);
/// A backend closing an idle connection sooner than this is not taken for an
/// idle timeout (it is an announced close or an error).
const MIN_OBSERVED_IDLE_CLOSE: Duration = Duration::from_millis(500);
/// Idle connections checked out sooner than this skip the staleness peek.
const PEEK_AFTER_IDLE: Duration = Duration::from_millis(50);
/// Largest probe response body read (and discarded).
const PROBE_BODY_LIMIT: usize = 64 * 1024;

/// How long a connection may stay idle given the backend's idle limit: three
/// quarters of it, so tether acts well before the backend does.
fn idle_limit(backend_limit: Duration) -> Duration {
    backend_limit.mul_f64(0.75)
}

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
        }
    }
}

/// Counters an endpoint keeps about its connections.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Connections dialled successfully.
    pub opened: AtomicU64,
    /// Idle connections retired by policy (idle timeout, lifetime, max_idle).
    pub retired: AtomicU64,
    /// Connections closed because they were stale, broken or abandoned.
    pub discarded: AtomicU64,
    /// Idle connections handed out again.
    pub reused: AtomicU64,
    /// Probes sent on idle connections.
    pub probes: AtomicU64,
    /// Probes that failed (the connection was discarded).
    pub probe_failures: AtomicU64,
    /// Times the endpoint was ejected.
    pub ejections: AtomicU64,
    /// Idle connections the backend closed before tether retired them.
    pub closed_by_backend: AtomicU64,
}

/// One resolved address of an upstream and its connections.
pub struct Endpoint {
    addr: SocketAddr,
    settings: Arc<UpstreamConfig>,
    /// LIFO: push and pop at the end; the front holds the coldest.
    idle: Mutex<Vec<IdleConn>>,
    slots: Arc<Semaphore>,
    open: AtomicUsize,
    /// Connections past their handshake (`open` less those still dialling).
    established: AtomicUsize,
    outstanding: AtomicUsize,
    /// Signalled when a connection is returned or a slot frees.
    available: Notify,
    /// Signalled when the maintenance task should look at this endpoint now.
    maintenance: Arc<Notify>,
    removed: AtomicBool,
    refilling: AtomicBool,
    refill_failures: AtomicU32,
    refill_not_before: Mutex<Option<Instant>>,
    /// Shortest idle age at which the backend was seen closing a pooled
    /// connection, in milliseconds; 0 while none was seen.
    observed_idle_close_ms: AtomicU64,
    /// The latest `Keep-Alive: timeout=N` the endpoint sent, in milliseconds;
    /// 0 while none was seen.
    announced_idle_ms: AtomicU64,
    health: Mutex<Health>,
    /// HTTP/2 connections (shared by many streams); empty for HTTP/1.1.
    h2: Mutex<Vec<Arc<H2Conn>>>,
    /// An HTTP/2 dial is in progress: others wait for it instead of dialling.
    h2_dialing: AtomicBool,
    stats: EndpointStats,
}

/// Passive health of an endpoint.
#[derive(Debug, Default)]
struct Health {
    consecutive_failures: u32,
    /// Ejections in a row (reset by a success after the last one).
    ejections: u32,
    ejected_until: Option<Instant>,
}

struct IdleConn {
    conn: Conn,
    since: Instant,
    /// Probe at this instant, when probes are enabled.
    probe_at: Option<Instant>,
}

impl Endpoint {
    fn new(addr: SocketAddr, settings: Arc<UpstreamConfig>, maintenance: Arc<Notify>) -> Self {
        Self {
            addr,
            slots: Arc::new(Semaphore::new(settings.pool.max_connections)),
            settings,
            idle: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            established: AtomicUsize::new(0),
            outstanding: AtomicUsize::new(0),
            available: Notify::new(),
            maintenance,
            removed: AtomicBool::new(false),
            refilling: AtomicBool::new(false),
            refill_failures: AtomicU32::new(0),
            refill_not_before: Mutex::new(None),
            observed_idle_close_ms: AtomicU64::new(0),
            announced_idle_ms: AtomicU64::new(0),
            health: Mutex::new(Health::default()),
            h2: Mutex::new(Vec::new()),
            h2_dialing: AtomicBool::new(false),
            stats: EndpointStats::default(),
        }
    }

    /// The address this endpoint dials.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections open now (idle and busy).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections open now that finished their handshake (not dialling).
    pub fn established_connections(&self) -> usize {
        self.established.load(Ordering::Relaxed)
    }

    /// Idle connections now (HTTP/2: connections with no stream open).
    pub fn idle_connections(&self) -> usize {
        self.lock_idle().len() + self.lock_h2().iter().filter(|c| c.in_flight() == 0).count()
    }

    fn lock_h2(&self) -> std::sync::MutexGuard<'_, Vec<Arc<H2Conn>>> {
        self.h2.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_http2(&self) -> bool {
        self.settings.protocol == Protocol::Http2
    }

    /// Drops HTTP/2 connections that hyper closed, and retires idle ones that
    /// expired, sat idle too long above the floor, or belong to a removed
    /// endpoint. Dropping the last handle makes hyper send GOAWAY and close.
    fn reap_h2(&self) {
        let pool = &self.settings.pool;
        let now = Instant::now();
        let removed = self.removed.load(Ordering::Relaxed);
        let mut dropped = Vec::new();
        {
            let mut conns = self.lock_h2();
            let mut open = conns.len();
            conns.retain(|conn| {
                if conn.is_closed() {
                    self.stats.discarded.fetch_add(1, Ordering::Relaxed);
                    open -= 1;
                    dropped.push((conn.clone(), RetireReason::Error));
                    return false;
                }
                let Some(idle_since) = conn.idle_since() else {
                    return true;
                };
                let cold =
                    now.duration_since(idle_since) >= pool.idle_timeout && open > pool.min_idle;
                let reason = if removed {
                    RetireReason::Drain
                } else if conn.expired(now) {
                    RetireReason::Lifetime
                } else {
                    RetireReason::Idle
                };
                if removed || conn.expired(now) || cold {
                    self.stats.retired.fetch_add(1, Ordering::Relaxed);
                    conn.drain();
                    open -= 1;
                    dropped.push((conn.clone(), reason));
                    return false;
                }
                true
            });
        }
        for (conn, reason) in dropped {
            // hyper sends GOAWAY when the last handle goes; then RST or FIN.
            if self.resets_on(reason) || conn.is_closed() {
                conn.reset_on_close();
            }
        }
    }

    /// Requests in flight now.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Lifetime counters.
    pub fn stats(&self) -> &EndpointStats {
        &self.stats
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<IdleConn>> {
        // A panic while holding this lock cannot leave the Vec inconsistent.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn retire_policy(&self) -> &crate::config::RetirePolicy {
        &self.settings.pool.retire
    }

    /// Whether a connection retired for `reason` should end with a reset.
    fn resets_on(&self, reason: RetireReason) -> bool {
        self.retire_policy().for_reason(reason) != Retire::Graceful
    }

    /// Takes the most recently used idle connection that is still usable.
    fn pop_idle(&self) -> Option<Conn> {
        loop {
            let mut idle = self.lock_idle().pop()?;
            let now = Instant::now();
            if self.usable_until(&idle).is_some_and(|until| now >= until) {
                self.stats.retired.fetch_add(1, Ordering::Relaxed);
                idle.conn
                    .close(Ending::Retired(RetireReason::Idle), self.retire_policy());
                continue;
            }
            if idle.conn.expired(now) {
                if self.retire_policy().for_reason(RetireReason::Lifetime) == Retire::PeerFirst
                    && idle.conn.is_usable()
                {
                    // This request is the connection's last: it says goodbye.
                    idle.conn.end_after_next_request();
                    return Some(idle.conn);
                }
                self.stats.retired.fetch_add(1, Ordering::Relaxed);
                idle.conn.close(
                    Ending::Retired(RetireReason::Lifetime),
                    self.retire_policy(),
                );
                continue;
            }
            // A connection back in the list for only a moment cannot have met
            // an idle timeout; hyper's own watch of the socket covers it, and
            // the peek (a syscall per request) is kept for ones that sat.
            let sat = now.duration_since(idle.since) >= PEEK_AFTER_IDLE;
            let stale = if sat {
                !idle.conn.is_usable()
            } else {
                !idle.conn.is_open()
            };
            if stale {
                tracing::debug!(upstream = %self.addr, "discarding stale idle connection");
                self.learn_idle_close(now.duration_since(idle.since));
                self.stats.discarded.fetch_add(1, Ordering::Relaxed);
                idle.conn.close(Ending::Discarded, self.retire_policy());
                continue;
            }
            return Some(idle.conn);
        }
    }

    /// The backend closed a pooled connection after `age` idle: from now on,
    /// idle connections to it are retired before that age.
    fn learn_idle_close(&self, age: Duration) {
        self.stats.closed_by_backend.fetch_add(1, Ordering::Relaxed);
        // Shorter gaps are closes the backend announced or errors, not an
        // idle timeout.
        if age < MIN_OBSERVED_IDLE_CLOSE {
            return;
        }
        let ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
        let previous = self.observed_idle_close_ms.load(Ordering::Relaxed);
        if previous == 0 || ms < previous {
            self.observed_idle_close_ms.store(ms, Ordering::Relaxed);
            tracing::info!(
                upstream = %self.addr,
                idle = ?age,
                retire_after = ?idle_limit(age),
                "backend closed an idle pooled connection; retiring idle connections to it earlier"
            );
        }
    }

    /// When an idle connection must be retired so that tether, not the
    /// backend, ends it: ¾ of the shortest idle limit the backend announced
    /// (`Keep-Alive: timeout=N`, on this connection or any other to the
    /// endpoint) or was seen enforcing. Computed afresh, so connections that
    /// were idle before the first announcement are covered too.
    fn usable_until(&self, idle: &IdleConn) -> Option<Instant> {
        let millis = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
        [
            millis(self.observed_idle_close_ms.load(Ordering::Relaxed)),
            millis(self.announced_idle_ms.load(Ordering::Relaxed)),
            idle.conn.announced_idle(),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|limit| idle.since + idle_limit(limit))
    }

    /// Records a `Keep-Alive: timeout=N` seen on a response from this endpoint.
    pub(crate) fn note_announced_idle(&self, timeout: Duration) {
        let ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let previous = self.announced_idle_ms.swap(ms, Ordering::Relaxed);
        if previous != ms {
            tracing::debug!(upstream = %self.addr, ?timeout, "backend announces its keep-alive timeout");
            self.maintenance.notify_one();
        }
    }

    fn lock_health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the endpoint is ejected now.
    pub fn is_ejected(&self) -> bool {
        self.lock_health()
            .ejected_until
            .is_some_and(|until| Instant::now() < until)
    }

    /// Records the outcome of a connect or an exchange; enough failures in a
    /// row eject the endpoint for a time that doubles with each ejection.
    pub(crate) fn record(&self, success: bool) {
        let settings = &self.settings.health;
        let mut health = self.lock_health();
        if success {
            health.consecutive_failures = 0;
            if health
                .ejected_until
                .is_some_and(|until| Instant::now() >= until)
            {
                health.ejected_until = None;
                health.ejections = 0;
            }
            return;
        }
        health.consecutive_failures += 1;
        if settings.eject_after == 0 || health.consecutive_failures < settings.eject_after {
            return;
        }
        health.consecutive_failures = 0;
        let factor = 1u32 << health.ejections.min(16);
        let time = settings
            .eject_time
            .saturating_mul(factor)
            .min(settings.eject_time_max);
        health.ejections += 1;
        health.ejected_until = Some(Instant::now() + time);
        self.stats.ejections.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(upstream = %self.addr, ejected_for = ?time, "endpoint ejected after repeated failures");
    }

    /// The observed idle limit, for the admin view.
    pub fn observed_idle_close(&self) -> Option<Duration> {
        match self.observed_idle_close_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Returns a connection after a complete exchange.
    fn put_idle(&self, conn: Conn) {
        let now = Instant::now();
        if conn.is_closing() {
            // This exchange said `Connection: close`; the backend closes it.
            self.stats.retired.fetch_add(1, Ordering::Relaxed);
            conn.close_after_peer();
            return;
        }
        let reason = if self.removed.load(Ordering::Relaxed) {
            Some(RetireReason::Drain)
        } else if conn.at_request_limit() {
            Some(RetireReason::MaxRequests)
        } else if conn.expired(now)
            && self.retire_policy().for_reason(RetireReason::Lifetime) != Retire::PeerFirst
        {
            Some(RetireReason::Lifetime)
        } else {
            None
        };
        if let Some(reason) = reason {
            self.stats.retired.fetch_add(1, Ordering::Relaxed);
            conn.close(Ending::Retired(reason), self.retire_policy());
            return;
        }
        let probe = &self.settings.keepalive.probe;
        let probe_at = probe.enabled.then(|| now + probe.interval);
        self.lock_idle().push(IdleConn {
            conn,
            since: now,
            probe_at,
        });
        self.available.notify_one();
    }

    /// Retires idle connections that outlived their lifetime, sat idle too long
    /// above the floor, exceed `max_idle`, or near the backend's idle limit;
    /// discards dead ones; sends due probes. Returns when it next needs to run.
    fn reap(self: &Arc<Self>) -> Option<Instant> {
        let pool = &self.settings.pool;
        let now = Instant::now();
        let mut closing = Vec::new();
        let mut probing = Vec::new();
        let mut next: Option<Instant> = None;
        {
            let mut idle = self.lock_idle();
            let removed = self.removed.load(Ordering::Relaxed);
            // Connections above the floor may be retired; count from the cold end.
            let mut open = self.open.load(Ordering::Relaxed);
            let mut kept = Vec::with_capacity(idle.len());
            let idle_count = idle.len();
            for (position, entry) in idle.drain(..).enumerate() {
                let hotter = idle_count - position - 1;
                let dead = !entry.conn.is_open();
                let usable_until = self.usable_until(&entry);
                let near_idle_limit = usable_until.is_some_and(|until| now >= until);
                let past_lifetime = entry.conn.expired(now);
                let peer_first =
                    self.retire_policy().for_reason(RetireReason::Lifetime) == Retire::PeerFirst;
                let cold =
                    now.duration_since(entry.since) >= pool.idle_timeout && open > pool.min_idle;
                let over_max = hotter >= pool.max_idle
                    && now.duration_since(entry.since) >= OVER_MAX_IDLE_GRACE;
                if dead {
                    closing.push((
                        entry.conn,
                        Ending::Discarded,
                        Some(now.duration_since(entry.since)),
                    ));
                    open = open.saturating_sub(1);
                } else if removed {
                    closing.push((entry.conn, Ending::Retired(RetireReason::Drain), None));
                    open = open.saturating_sub(1);
                } else if near_idle_limit || cold || over_max {
                    closing.push((entry.conn, Ending::Retired(RetireReason::Idle), None));
                    open = open.saturating_sub(1);
                } else if past_lifetime && peer_first && entry.probe_at.is_some() {
                    // A probe is the last request: it says goodbye.
                    let mut conn = entry.conn;
                    conn.end_after_next_request();
                    probing.push(conn);
                } else if past_lifetime {
                    closing.push((entry.conn, Ending::Retired(RetireReason::Lifetime), None));
                    open = open.saturating_sub(1);
                } else if entry.probe_at.is_some_and(|at| now >= at) {
                    probing.push(entry.conn);
                } else {
                    for at in [usable_until, entry.probe_at].into_iter().flatten() {
                        next = Some(next.map_or(at, |n| n.min(at)));
                    }
                    kept.push(entry);
                }
            }
            *idle = kept;
        }
        for (conn, ending, idle_age) in closing {
            match ending {
                Ending::Retired(_) => self.stats.retired.fetch_add(1, Ordering::Relaxed),
                Ending::Discarded => self.stats.discarded.fetch_add(1, Ordering::Relaxed),
            };
            if let Some(age) = idle_age {
                self.learn_idle_close(age);
            }
            tracing::debug!(upstream = %self.addr, ?ending, "closing idle upstream connection");
            conn.close(ending, self.retire_policy());
        }
        for conn in probing {
            tokio::spawn(probe(self.clone(), conn));
        }
        next
    }

    /// Opens connections in the background until `min_idle` are open, one dial
    /// at a time, backing off (with jitter) after failures.
    fn refill(self: &Arc<Self>) {
        if self.removed.load(Ordering::Relaxed)
            || self.open.load(Ordering::Relaxed) >= self.settings.pool.min_idle
        {
            return;
        }
        if let Some(not_before) = *self
            .refill_not_before
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            if Instant::now() < not_before {
                return;
            }
        }
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let endpoint = self.clone();
        tokio::spawn(async move {
            while !endpoint.removed.load(Ordering::Relaxed)
                && endpoint.open.load(Ordering::Relaxed) < endpoint.settings.pool.min_idle
            {
                let Ok(permit) = endpoint.slots.clone().try_acquire_owned() else {
                    break;
                };
                let slot = Slot::new(permit, endpoint.clone());
                let connected = if endpoint.is_http2() {
                    H2Conn::connect(&endpoint, slot).await.map(|conn| {
                        endpoint.lock_h2().push(conn);
                        endpoint.available.notify_waiters();
                    })
                } else {
                    Conn::connect(&endpoint, slot)
                        .await
                        .map(|conn| endpoint.put_idle(conn))
                };
                match connected {
                    Ok(()) => {
                        endpoint.refill_failures.store(0, Ordering::Relaxed);
                        endpoint.record(true);
                    }
                    Err(e) => {
                        endpoint.record(false);
                        let failures = endpoint.refill_failures.fetch_add(1, Ordering::Relaxed) + 1;
                        let backoff = backoff(failures);
                        tracing::warn!(upstream = %endpoint.addr, error = %e, retry_in = ?backoff, "cannot open warm connection");
                        *endpoint
                            .refill_not_before
                            .lock()
                            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + backoff);
                        break;
                    }
                }
            }
            endpoint.refilling.store(false, Ordering::Release);
        });
    }

    fn retire_all_idle(&self) {
        let h2 = std::mem::take(&mut *self.lock_h2());
        for conn in h2 {
            conn.drain();
            if self.resets_on(RetireReason::Drain) {
                conn.reset_on_close();
            }
        }
        let idle = std::mem::take(&mut *self.lock_idle());
        for entry in idle {
            self.stats.retired.fetch_add(1, Ordering::Relaxed);
            entry
                .conn
                .close(Ending::Retired(RetireReason::Drain), self.retire_policy());
        }
    }
}

/// Probes an idle connection; puts it back if the backend answers as
/// expected, discards it otherwise (as `pool.retire.error` says: RST unless
/// `graceful`).
async fn probe(endpoint: Arc<Endpoint>, mut conn: Conn) {
    let settings = &endpoint.settings.keepalive.probe;
    endpoint.stats.probes.fetch_add(1, Ordering::Relaxed);
    let host = endpoint
        .settings
        .endpoints
        .first()
        .cloned()
        .unwrap_or_else(|| endpoint.addr.to_string());
    // On a connection retiring peer-first, `Conn::send` makes this request say
    // `Connection: close`: the backend closes it after answering.
    let request = http::Request::builder()
        .method(settings.method.as_method())
        .uri(settings.path.as_str())
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "tether-probe")
        .body(UpstreamBody::from_bytes(None));
    let outcome = match request {
        Ok(request) => tokio::time::timeout(settings.timeout, probe_exchange(&mut conn, request))
            .await
            .map_err(|_| "timed out".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string())),
        Err(e) => Err(e.to_string()),
    };
    match outcome {
        Ok((status, headers)) if settings.accepts(status) => {
            conn.note_response(&headers);
            if let Some(timeout) = conn.announced_idle() {
                endpoint.note_announced_idle(timeout);
            }
            tracing::trace!(upstream = %endpoint.addr, status, "probe answered");
            endpoint.put_idle(conn);
        }
        other => {
            endpoint
                .stats
                .probe_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(upstream = %endpoint.addr, outcome = ?other.map(|(status, _)| status), "probe failed; discarding the connection");
            conn.close(Ending::Discarded, endpoint.retire_policy());
        }
    }
}

async fn probe_exchange(
    conn: &mut Conn,
    request: http::Request<UpstreamBody>,
) -> Result<(u16, http::HeaderMap), Box<dyn std::error::Error + Send + Sync>> {
    let response = conn.send(request).await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    // Read the body to its end so the connection stays reusable; bounded.
    let body = http_body_util::Limited::new(response.into_body(), PROBE_BODY_LIMIT);
    http_body_util::BodyExt::collect(body).await?;
    Ok((status, headers))
}

/// Jittered exponential backoff: 200ms, 400ms, … up to 10s, each ±25 %.
fn backoff(failures: u32) -> Duration {
    let exp = REFILL_BACKOFF_MIN.saturating_mul(1u32 << failures.saturating_sub(1).min(10));
    exp.min(REFILL_BACKOFF_MAX)
        .mul_f64(0.75 + fastrand::f64() * 0.5)
}

/// The connection pool of one upstream; a cheap handle.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    settings: Arc<UpstreamConfig>,
    endpoints: RwLock<Arc<Vec<Arc<Endpoint>>>>,
    next: AtomicUsize,
    maintenance: Arc<Notify>,
    shutdown: CancellationToken,
}

impl Pool {
    /// Resolves the endpoints once (so the first requests have somewhere to go),
    /// then starts the background task that warms, reaps and re-resolves.
    pub async fn start(settings: UpstreamConfig) -> Self {
        let settings = Arc::new(settings);
        let inner = Arc::new(PoolInner {
            settings: settings.clone(),
            endpoints: RwLock::new(Arc::new(Vec::new())),
            next: AtomicUsize::new(0),
            maintenance: Arc::new(Notify::new()),
            shutdown: CancellationToken::new(),
        });
        let pool = Self { inner };
        let first = tokio::time::timeout(settings.connect_timeout, resolve(&settings)).await;
        match first {
            Ok(addrs) => pool.apply_addresses(addrs),
            Err(_) => {
                tracing::warn!(upstream = %settings.name, "initial DNS resolution timed out; retrying in the background")
            }
        }
        tokio::spawn(maintain(Arc::downgrade(&pool.inner)));
        pool
    }

    /// The upstream's settings.
    pub fn settings(&self) -> &UpstreamConfig {
        &self.inner.settings
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.inner.settings.name
    }

    /// Whether every endpoint has its warm floor (`pool.min_idle`
    /// connections) open. An upstream whose endpoints have not resolved yet
    /// is not warm: a request now would have nowhere to go.
    pub fn is_warm(&self) -> bool {
        let endpoints = self.endpoints();
        let floor = self.inner.settings.pool.min_idle;
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

    fn pick(&self) -> Result<Arc<Endpoint>, PoolError> {
        self.pick_excluding(&[])
    }

    /// Picks among endpoints that are not ejected and not in `excluded`.
    fn pick_excluding(&self, excluded: &[SocketAddr]) -> Result<Arc<Endpoint>, PoolError> {
        let all = self.endpoints();
        if all.is_empty() {
            return Err(PoolError::NoEndpoints {
                upstream: self.inner.settings.name.clone(),
            });
        }
        let endpoints: Vec<Arc<Endpoint>> = all
            .iter()
            .filter(|e| !excluded.contains(&e.addr) && !e.is_ejected())
            .cloned()
            .collect();
        if endpoints.is_empty() {
            return Err(PoolError::AllEjected {
                upstream: self.inner.settings.name.clone(),
            });
        }
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let chosen = match self.inner.settings.balance {
            Balance::RoundRobin => &endpoints[start % endpoints.len()],
            Balance::LeastOutstanding => {
                // Rotate the starting point so ties spread instead of piling on
                // the first endpoint.
                let n = endpoints.len();
                (0..n)
                    .map(|i| &endpoints[(start + i) % n])
                    .min_by_key(|e| e.outstanding.load(Ordering::Relaxed))
                    .unwrap_or(&endpoints[0])
            }
        };
        Ok(chosen.clone())
    }

    fn apply_addresses(&self, addrs: Vec<SocketAddr>) {
        let mut changed = Vec::new();
        {
            let mut guard = self
                .inner
                .endpoints
                .write()
                .unwrap_or_else(|e| e.into_inner());
            let current = guard.clone();
            let mut next: Vec<Arc<Endpoint>> = Vec::with_capacity(addrs.len());
            for addr in &addrs {
                match current.iter().find(|e| e.addr == *addr) {
                    Some(existing) => next.push(existing.clone()),
                    None => {
                        tracing::info!(upstream = %self.inner.settings.name, endpoint = %addr, "endpoint added");
                        next.push(Arc::new(Endpoint::new(
                            *addr,
                            self.inner.settings.clone(),
                            self.inner.maintenance.clone(),
                        )));
                    }
                }
            }
            for old in current.iter() {
                if !addrs.contains(&old.addr) {
                    tracing::info!(upstream = %self.inner.settings.name, endpoint = %old.addr, "endpoint removed; draining it");
                    old.removed.store(true, Ordering::Relaxed);
                    changed.push(old.clone());
                }
            }
            *guard = Arc::new(next);
        }
        for endpoint in changed {
            endpoint.retire_all_idle();
        }
        self.inner.maintenance.notify_one();
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

async fn acquire_on(outstanding: Outstanding, fresh: bool) -> Result<Lease, PoolError> {
    let endpoint = &outstanding.0.clone();
    // Dialling and HTTP/2 are boxed: the reuse of an idle HTTP/1 connection,
    // the common case, should not carry their state in every request's future.
    if endpoint.is_http2() {
        return Box::pin(acquire_h2(outstanding)).await;
    }
    let waited = endpoint.settings.pool.acquire_timeout;
    let deadline = Instant::now() + waited;
    loop {
        let notified = endpoint.available.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !fresh {
            if let Some(conn) = endpoint.pop_idle() {
                endpoint.stats.reused.fetch_add(1, Ordering::Relaxed);
                // Any connection that sat in the idle list may have been closed
                // by the backend meanwhile, warm ones that never carried a
                // request included: all count as reused for the retry rule.
                return Ok(Lease::new(conn, outstanding, true));
            }
        }
        if let Ok(permit) = endpoint.slots.clone().try_acquire_owned() {
            let slot = Slot::new(permit, endpoint.clone());
            let conn = match Box::pin(Conn::connect(endpoint, slot)).await {
                Ok(conn) => conn,
                Err(e) => {
                    endpoint.record(false);
                    return Err(e);
                }
            };
            endpoint.record(true);
            return Ok(Lease::new(conn, outstanding, false));
        }
        if fresh {
            // A fresh connection needs a free slot; the coldest idle one gives up its own.
            let coldest = {
                let mut idle = endpoint.lock_idle();
                (!idle.is_empty()).then(|| idle.remove(0))
            };
            if let Some(entry) = coldest {
                endpoint.stats.retired.fetch_add(1, Ordering::Relaxed);
                entry.conn.close(
                    Ending::Retired(RetireReason::Idle),
                    endpoint.retire_policy(),
                );
                continue;
            }
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Err(PoolError::Exhausted {
                addr: endpoint.addr,
                waited,
            });
        }
    }
}

/// Opens a stream on an HTTP/2 connection with room, dialling another only when
/// every connection is full (one dial at a time; the others wait for it).
async fn acquire_h2(outstanding: Outstanding) -> Result<Lease, PoolError> {
    let endpoint = outstanding.0.clone();
    let waited = endpoint.settings.pool.acquire_timeout;
    let deadline = Instant::now() + waited;
    loop {
        let notified = endpoint.available.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let now = Instant::now();
        let roomy = endpoint.lock_h2().iter().find(|c| c.has_room(now)).cloned();
        if let Some(conn) = roomy {
            let stream = conn.open_stream(endpoint.clone());
            if stream.reused {
                endpoint.stats.reused.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(Lease::h2(stream, outstanding));
        }
        if !endpoint.h2_dialing.swap(true, Ordering::AcqRel) {
            // Another dial may have finished between the look for room and
            // taking the flag: look again before opening yet another connection.
            if endpoint
                .lock_h2()
                .iter()
                .any(|c| c.has_room(Instant::now()))
            {
                endpoint.h2_dialing.store(false, Ordering::Release);
                continue;
            }
            let dialled = match endpoint.slots.clone().try_acquire_owned() {
                Ok(permit) => {
                    let slot = Slot::new(permit, endpoint.clone());
                    Some(H2Conn::connect(&endpoint, slot).await)
                }
                Err(_) => None,
            };
            endpoint.h2_dialing.store(false, Ordering::Release);
            match dialled {
                Some(Ok(conn)) => {
                    endpoint.record(true);
                    endpoint.lock_h2().push(conn);
                    endpoint.available.notify_waiters();
                    continue;
                }
                Some(Err(e)) => {
                    endpoint.record(false);
                    endpoint.available.notify_waiters();
                    return Err(e);
                }
                None => {}
            }
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Err(PoolError::Exhausted {
                addr: endpoint.addr,
                waited,
            });
        }
    }
}

/// Resolves every configured endpoint; names that fail are logged and skipped.
async fn resolve(settings: &UpstreamConfig) -> Vec<SocketAddr> {
    let mut addrs = Vec::new();
    for endpoint in &settings.endpoints {
        match tokio::net::lookup_host(endpoint.as_str()).await {
            Ok(found) => {
                for addr in found {
                    if !addrs.contains(&addr) {
                        addrs.push(addr);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(upstream = %settings.name, endpoint = %endpoint, error = %e, "cannot resolve endpoint")
            }
        }
    }
    addrs
}

/// The pool's background task: refills the warm floor, reaps idle connections,
/// and re-resolves DNS names. Ends when the pool is closed or dropped.
async fn maintain(pool: std::sync::Weak<PoolInner>) {
    let mut next_resolve = {
        let Some(inner) = pool.upgrade() else { return };
        Instant::now() + inner.settings.dns_refresh
    };
    loop {
        let (maintenance, shutdown, wake) = {
            let Some(inner) = pool.upgrade() else { return };
            let handle = Pool { inner };
            if Instant::now() >= next_resolve || handle.endpoints().is_empty() {
                let settings = handle.inner.settings.clone();
                let addrs = resolve(&settings).await;
                // Keep the old set when DNS fails entirely rather than emptying it.
                if !addrs.is_empty() {
                    handle.apply_addresses(addrs);
                }
                next_resolve = Instant::now() + settings.dns_refresh;
            }
            let mut wake = Instant::now() + MAINTENANCE_TICK;
            for endpoint in handle.endpoints().iter() {
                if let Some(at) = endpoint.reap() {
                    wake = wake.min(at);
                }
                endpoint.reap_h2();
                endpoint.refill();
            }
            (
                handle.inner.maintenance.clone(),
                handle.inner.shutdown.clone(),
                wake,
            )
        };
        tokio::select! {
            _ = maintenance.notified() => {}
            _ = tokio::time::sleep_until(wake) => {}
            _ = shutdown.cancelled() => return,
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

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) <= Duration::from_millis(250));
        assert!(backoff(30) <= REFILL_BACKOFF_MAX.mul_f64(1.25));
        assert!(backoff(30) >= REFILL_BACKOFF_MAX.mul_f64(0.75));
    }
}
