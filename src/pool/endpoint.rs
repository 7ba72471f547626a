//! One resolved address of an upstream: its connection slots, its LIFO idle
//! list (HTTP/1.1) or its shared connections (HTTP/2), what it taught the pool
//! about its idle limit, and its passive health.
//!
//! Every path that holds an idle connection — the return after an exchange,
//! a checkout, the background sweep — asks [`retire::decide`] what happens to
//! it, and [`Endpoint::dispose`] carries the answer out.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Wake, Waker};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use super::h1::Conn;
use super::h2::H2Conn;
use super::lease::Slot;
use super::observe::Observers;
use super::probe::probe;
use super::retire::{
    self, close_manner, idle_limit, Close, EndpointFacts, IdleFacts, Moment, Verdict,
};
use super::tls::UpstreamTls;
use super::view::{self, ConnRecord, Ending, OpenedBy};
use super::SharedSettings;
use crate::config::{Protocol, RetireReason, UpstreamConfig};

/// A backend closing an idle connection sooner than this is not taken for an
/// idle timeout (it is an announced close or an error).
const MIN_OBSERVED_IDLE_CLOSE: Duration = Duration::from_millis(500);

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
    /// Connections opened, by [`OpenedBy`] in its declaration order.
    opened_by: [AtomicU64; OpenedBy::ALL.len()],
    /// Connections closed by tether, by [`RetireReason`] in `ALL` order.
    retired_by: [AtomicU64; 5],
}

impl EndpointStats {
    /// Connections opened for `cause`.
    pub fn opened_by(&self, cause: OpenedBy) -> u64 {
        self.opened_by[cause as usize].load(Ordering::Relaxed)
    }

    /// Connections tether closed for `reason` (`error`: discarded).
    pub fn retired_for(&self, reason: RetireReason) -> u64 {
        let index = RetireReason::ALL.iter().position(|r| *r == reason);
        index.map_or(0, |i| self.retired_by[i].load(Ordering::Relaxed))
    }

    /// Counts a connection opened for `cause`.
    pub(super) fn count_opened(&self, cause: OpenedBy) {
        self.opened.fetch_add(1, Ordering::Relaxed);
        self.opened_by[cause as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection tether closes for `reason`: an `error` is a
    /// discard, anything else a retirement.
    pub(super) fn count_closed(&self, reason: RetireReason) {
        let total = match reason {
            RetireReason::Error => &self.discarded,
            _ => &self.retired,
        };
        total.fetch_add(1, Ordering::Relaxed);
        if let Some(i) = RetireReason::ALL.iter().position(|r| *r == reason) {
            self.retired_by[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One resolved address of an upstream and its connections.
pub struct Endpoint {
    pub(super) addr: SocketAddr,
    /// The pool's settings, swapped in place by a reload.
    pub(super) settings: SharedSettings,
    /// LIFO: push and pop at the end; the front holds the coldest.
    idle: Mutex<Vec<IdleConn>>,
    slots: Arc<Semaphore>,
    pub(super) open: AtomicUsize,
    /// Connections past their handshake (`open` less those still dialling).
    pub(super) established: AtomicUsize,
    pub(super) outstanding: AtomicUsize,
    /// Signalled when a connection is returned or a slot frees.
    pub(super) available: Notify,
    /// Signalled when the maintenance task should look at this endpoint now.
    pub(super) maintenance: Arc<Notify>,
    /// Wakes the maintenance task; registered on the socket of each idle
    /// connection, so whatever arrives on one (the backend's FIN, RST or
    /// stray bytes) is looked at at once, as a connection task would.
    idle_watch: Waker,
    pub(super) removed: AtomicBool,
    pub(super) refilling: AtomicBool,
    pub(super) refill_failures: AtomicU32,
    pub(super) refill_not_before: Mutex<Option<Instant>>,
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
    pub(super) h2_dialing: AtomicBool,
    /// The endpoint had its warm floor whole at least once: later floor
    /// dials are refills.
    pub(super) was_warm: AtomicBool,
    /// What opens the connections of the first warm floor: a reload warms
    /// what it added before requests reach it.
    pub(super) first_floor: OpenedBy,
    /// Every open connection's record, for `/pools`.
    records: Mutex<Vec<Weak<ConnRecord>>>,
    pub(super) stats: EndpointStats,
    /// The pool share's histograms and connection log.
    pub(super) observers: Observers,
    /// The upstream's TLS, when it has `[upstream.tls]`.
    pub(super) tls: Option<Arc<UpstreamTls>>,
}

/// Passive health of an endpoint.
#[derive(Debug, Default)]
struct Health {
    consecutive_failures: u32,
    /// Ejections in a row (reset by a success after the last one).
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// An HTTP/1.1 connection in the idle list.
pub(super) struct IdleConn {
    pub(super) conn: Conn,
    since: Instant,
    /// Probe at this instant, when probes are enabled.
    probe_at: Option<Instant>,
}

/// The waker of the idle watch: it signals the maintenance task.
struct WakeMaintenance(Arc<Notify>);

impl Wake for WakeMaintenance {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.notify_one();
    }
}

/// Takes a lock whose data a panic cannot leave inconsistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Endpoint {
    pub(super) fn new(
        addr: SocketAddr,
        settings: SharedSettings,
        maintenance: Arc<Notify>,
        first_floor: OpenedBy,
        observers: Observers,
        tls: Option<Arc<UpstreamTls>>,
    ) -> Self {
        Self {
            addr,
            slots: Arc::new(Semaphore::new(settings.load().pool.max_connections)),
            settings,
            idle: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            established: AtomicUsize::new(0),
            outstanding: AtomicUsize::new(0),
            available: Notify::new(),
            idle_watch: Waker::from(Arc::new(WakeMaintenance(maintenance.clone()))),
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
            was_warm: AtomicBool::new(false),
            first_floor,
            records: Mutex::new(Vec::new()),
            stats: EndpointStats::default(),
            observers,
            tls,
        }
    }

    /// The upstream's settings now.
    pub(super) fn settings(&self) -> arc_swap::Guard<Arc<UpstreamConfig>> {
        self.settings.load()
    }

    /// Follows a reload's `pool.max_connections`: a larger bound frees more
    /// slots at once; a smaller one takes slots out as connections give them
    /// back, so no open connection is closed for it.
    pub(super) fn resize_slots(&self, from: usize, to: usize) {
        if to > from {
            self.slots.add_permits(to - from);
        } else if let Ok(fewer) = u32::try_from(from - to) {
            let slots = self.slots.clone();
            tokio::spawn(async move {
                if let Ok(taken) = slots.acquire_many_owned(fewer).await {
                    taken.forget();
                }
            });
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

    /// Requests in flight now.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Lifetime counters.
    pub fn stats(&self) -> &EndpointStats {
        &self.stats
    }

    /// Whether the endpoint is ejected now.
    pub fn is_ejected(&self) -> bool {
        lock(&self.health)
            .ejected_until
            .is_some_and(|until| Instant::now() < until)
    }

    /// The observed idle limit, for the admin view.
    pub fn observed_idle_close(&self) -> Option<Duration> {
        millis(self.observed_idle_close_ms.load(Ordering::Relaxed))
    }

    /// The records of every open connection.
    pub(super) fn records(&self) -> Vec<Arc<ConnRecord>> {
        view::live(&mut lock(&self.records))
    }

    /// Adds a new connection's record; its end will be observed.
    pub(super) fn track(&self, record: &Arc<ConnRecord>) {
        record.observe_end(self.observers.clone(), self.addr);
        let mut records = lock(&self.records);
        records.retain(|r| r.strong_count() > 0);
        records.push(Arc::downgrade(record));
    }

    pub(super) fn lock_idle(&self) -> MutexGuard<'_, Vec<IdleConn>> {
        lock(&self.idle)
    }

    pub(super) fn lock_h2(&self) -> MutexGuard<'_, Vec<Arc<H2Conn>>> {
        lock(&self.h2)
    }

    pub(super) fn is_http2(&self) -> bool {
        self.settings().protocol == Protocol::Http2
    }

    /// A connection slot, if one is free under `pool.max_connections`.
    pub(super) fn try_slot(self: &Arc<Self>) -> Option<Slot> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        Some(Slot::new(permit, self.clone()))
    }

    /// Adds a new HTTP/2 connection and wakes the requests waiting for room.
    pub(super) fn push_h2(&self, conn: Arc<H2Conn>) {
        self.lock_h2().push(conn);
        self.available.notify_waiters();
    }

    /// What the retirement decision needs to know of an idle connection.
    fn facts(&self, entry: &IdleConn, alive: bool) -> IdleFacts {
        IdleFacts {
            since: entry.since,
            expires: entry.conn.expires(),
            backend_idle_limit: self.backend_idle_limit(entry.conn.announced_idle()),
            at_request_limit: entry.conn.at_request_limit(),
            said_close: entry.conn.is_closing(),
            alive,
            probe_at: entry.probe_at,
        }
    }

    /// What the retirement decision needs to know of this endpoint.
    fn endpoint_facts(&self, open: usize, hotter: Option<usize>) -> EndpointFacts {
        EndpointFacts {
            removed: self.removed.load(Ordering::Relaxed),
            above_floor: open > self.settings().pool.min_idle,
            hotter,
        }
    }

    /// The shortest idle limit the backend announced (`Keep-Alive: timeout=N`,
    /// on `announced` — this connection — or any other to the endpoint) or was
    /// seen enforcing. Read afresh, so connections that were idle before the
    /// first announcement are covered too.
    fn backend_idle_limit(&self, announced: Option<Duration>) -> Option<Duration> {
        [
            millis(self.observed_idle_close_ms.load(Ordering::Relaxed)),
            millis(self.announced_idle_ms.load(Ordering::Relaxed)),
            announced,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Takes the most recently used idle connection that is still usable.
    pub(super) fn take_idle(self: &Arc<Self>) -> Option<Conn> {
        loop {
            let mut entry = self.lock_idle().pop()?;
            let now = Instant::now();
            // The peek costs a syscall: only for connections that sat, or on
            // whose socket something arrived.
            let alive = if retire::worth_peeking(entry.since, now)
                || entry.conn.arrived(&self.idle_watch)
            {
                entry.conn.is_usable()
            } else {
                entry.conn.is_open()
            };
            let facts = self.facts(&entry, alive);
            let verdict = retire::decide(
                &facts,
                &self.endpoint_facts(self.open_connections(), None),
                Moment::CheckedOut,
                &self.settings().pool,
                now,
            );
            match verdict {
                Verdict::Keep { .. } | Verdict::LastRequest => {
                    if verdict == Verdict::LastRequest {
                        entry.conn.end_after_next_request();
                    }
                    entry.conn.record().busy();
                    return Some(entry.conn);
                }
                verdict => self.dispose(entry, verdict, now),
            }
        }
    }

    /// Returns a connection after a complete exchange.
    pub(super) fn put_idle(self: &Arc<Self>, conn: Conn) {
        if !conn.is_open() {
            return self.discard(conn);
        }
        let now = Instant::now();
        let probe = &self.settings().keepalive.probe;
        let entry = IdleConn {
            conn,
            since: now,
            probe_at: probe.enabled.then(|| now + probe.interval),
        };
        // It just finished an exchange: alive as far as anyone can tell
        // without a syscall.
        let facts = self.facts(&entry, true);
        let verdict = retire::decide(
            &facts,
            &self.endpoint_facts(self.open_connections(), Some(0)),
            Moment::Returned,
            &self.settings().pool,
            now,
        );
        if let Verdict::Keep { .. } = verdict {
            entry.conn.record().idle(now);
            // Watched from now on; what already arrived, the checkout peeks at.
            entry.conn.arrived(&self.idle_watch);
            self.lock_idle().push(entry);
            self.available.notify_one();
        } else {
            self.dispose(entry, verdict, now);
        }
    }

    /// Discards a connection abandoned mid-exchange or not sent whole.
    pub(super) fn discard(&self, conn: Conn) {
        // A connection that failed under its exchange was often closed or
        // reset by the backend: the log says so (a peek, on this cold path).
        if let Some(how) = conn.closed_by_backend() {
            conn.record()
                .ended(Ending::by_backend(how, "backend-closed"));
        }
        self.stats.count_closed(RetireReason::Error);
        conn.close(RetireReason::Error, &self.settings().pool.retire);
    }

    /// Carries out a verdict other than keeping the connection.
    pub(super) fn dispose(self: &Arc<Self>, entry: IdleConn, verdict: Verdict, now: Instant) {
        let policy = &self.settings().pool.retire;
        match verdict {
            // Only a checkout hands out a last request; elsewhere it stays.
            Verdict::Keep { .. } | Verdict::LastRequest => self.lock_idle().push(entry),
            Verdict::Probe { last } => {
                let mut conn = entry.conn;
                conn.record().busy();
                if last {
                    // A probe is the last request: it says goodbye.
                    conn.end_after_next_request();
                }
                tokio::spawn(probe(self.clone(), conn));
            }
            Verdict::Retire(reason) => {
                self.stats.count_closed(reason);
                tracing::debug!(upstream = %self.addr, ?reason, "retiring idle upstream connection");
                entry.conn.close(reason, policy);
            }
            Verdict::Discard => {
                tracing::debug!(upstream = %self.addr, "discarding stale idle connection");
                if let Some(how) = entry.conn.closed_by_backend() {
                    entry
                        .conn
                        .record()
                        .ended(Ending::by_backend(how, "backend-closed"));
                }
                self.learn_idle_close(now.duration_since(entry.since));
                self.stats.count_closed(RetireReason::Error);
                entry.conn.close(RetireReason::Error, policy);
            }
            Verdict::AwaitPeerClose => {
                // This exchange said `Connection: close`; the backend closes it.
                self.stats.retired.fetch_add(1, Ordering::Relaxed);
                entry.conn.close_after_peer();
            }
        }
    }

    /// Sweeps the idle list: every connection is decided on from the cold end
    /// (so the floor counts down as connections go). Returns when the list
    /// next needs a look.
    pub(super) fn sweep(self: &Arc<Self>) -> Option<Instant> {
        let now = Instant::now();
        let mut verdicts = Vec::new();
        let mut next: Option<Instant> = None;
        {
            let mut idle = self.lock_idle();
            let mut open = self.open_connections();
            let count = idle.len();
            let mut kept = Vec::with_capacity(count);
            for (position, entry) in idle.drain(..).enumerate() {
                // A peek each: no task watches an idle connection, so this is
                // where a backend's close of one is found.
                let facts = self.facts(&entry, entry.conn.is_usable());
                let at = self.endpoint_facts(open, Some(count - position - 1));
                match retire::decide(&facts, &at, Moment::Swept, &self.settings().pool, now) {
                    Verdict::Keep { recheck } => {
                        next = earliest(next, recheck);
                        kept.push(entry);
                    }
                    verdict => {
                        if !matches!(verdict, Verdict::Probe { .. }) {
                            open = open.saturating_sub(1);
                        }
                        verdicts.push((entry, verdict));
                    }
                }
            }
            *idle = kept;
        }
        for (entry, verdict) in verdicts {
            self.dispose(entry, verdict, now);
        }
        next
    }

    /// Sweeps the HTTP/2 connections: drops those hyper closed, and retires
    /// idle ones by the same decision as HTTP/1.1 (their list has no order,
    /// so `max_idle` does not apply). Dropping the last handle makes hyper
    /// send GOAWAY and close.
    pub(super) fn sweep_h2(&self) {
        let now = Instant::now();
        let mut closing = Vec::new();
        {
            let mut conns = self.lock_h2();
            let mut open = conns.len();
            conns.retain(|conn| {
                let idle_since = conn.idle_since();
                if idle_since.is_none() && !conn.is_closed() {
                    return true;
                }
                let facts = IdleFacts {
                    since: idle_since.unwrap_or(now),
                    expires: conn.expires(),
                    backend_idle_limit: None,
                    at_request_limit: false,
                    said_close: false,
                    alive: !conn.is_closed(),
                    probe_at: None,
                };
                let at = self.endpoint_facts(open, None);
                let reason =
                    match retire::decide(&facts, &at, Moment::Swept, &self.settings().pool, now) {
                        Verdict::Retire(reason) => reason,
                        Verdict::Discard => RetireReason::Error,
                        _ => return true,
                    };
                open -= 1;
                closing.push((conn.clone(), reason));
                false
            });
        }
        for (conn, reason) in closing {
            self.retire_h2(&conn, reason);
        }
    }

    /// Stops new streams on an HTTP/2 connection leaving the pool and sets how
    /// its socket ends once hyper lets go of it.
    fn retire_h2(&self, conn: &H2Conn, reason: RetireReason) {
        self.stats.count_closed(reason);
        conn.drain();
        let policy = self.settings().pool.retire.for_reason(reason);
        let reset = close_manner(policy, false) == Close::Reset;
        conn.record().ended(match (conn.is_closed(), reset) {
            (true, _) => Ending::by_backend("peer-first", "backend-closed"),
            (false, true) => Ending::by_tether("RST", reason),
            (false, false) => Ending::by_tether("FIN", reason),
        });
        // hyper has closed it or sends GOAWAY when the last handle goes: the
        // backend's side is already closing, so no peek is needed.
        if reset || conn.is_closed() {
            conn.reset_on_close();
        }
    }

    /// Retires every idle connection (the endpoint left DNS or the pool closes).
    pub(super) fn retire_all_idle(self: &Arc<Self>) {
        let h2 = std::mem::take(&mut *self.lock_h2());
        for conn in h2 {
            self.retire_h2(&conn, RetireReason::Drain);
        }
        let idle = std::mem::take(&mut *self.lock_idle());
        let now = Instant::now();
        for entry in idle {
            self.dispose(entry, Verdict::Retire(RetireReason::Drain), now);
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

    /// Records the outcome of a connect or an exchange; enough failures in a
    /// row eject the endpoint for a time that doubles with each ejection.
    pub(crate) fn record(&self, success: bool) {
        let settings = &self.settings().health;
        let mut health = lock(&self.health);
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

    /// Whether a failed refill should wait before the next attempt.
    pub(super) fn refill_backing_off(&self) -> bool {
        lock(&self.refill_not_before).is_some_and(|not_before| Instant::now() < not_before)
    }

    /// No refill before `until`.
    pub(super) fn back_off_refill(&self, until: Instant) {
        *lock(&self.refill_not_before) = Some(until);
    }
}

/// The earlier of two optional instants.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A stored millisecond count, 0 meaning none.
fn millis(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}
