//! The one acquire loop, for HTTP/1.1 and HTTP/2 alike: take what is ready
//! (the hottest usable idle connection, or a stream on a connection with
//! room), else dial if a slot is free, else wait up to `acquire_timeout`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::dial::{self, Dialled};
use super::endpoint::Endpoint;
use super::lease::{Lease, Outstanding, Ready};
use super::retire::Verdict;
use super::view::OpenedBy;
use super::PoolError;
use crate::config::RetireReason;

/// The outcome of an attempt to open a connection for a request.
enum Dial {
    /// Opened: what the request can use, and how long connect and handshake took.
    Opened(Ready, Duration),
    /// The dial failed; the request was never sent.
    Failed(PoolError),
    /// No slot is free, or another request is dialling the HTTP/2 connection.
    Busy,
    /// Room appeared while getting ready to dial: look again.
    Again,
}

/// Checks out a connection (or stream) on the endpoint `outstanding` counts
/// against. `fresh` asks for a newly dialled HTTP/1.1 connection (the retry
/// of a request that failed on a reused one); the coldest idle connection
/// gives up its slot for it if none is free. The time it takes, whatever the
/// outcome, is the pool-wait histogram's observation.
pub(super) async fn acquire_on(outstanding: Outstanding, fresh: bool) -> Result<Lease, PoolError> {
    let endpoint = outstanding.endpoint().clone();
    let started = Instant::now();
    let acquired = checkout(outstanding, fresh, started).await;
    if let Some(observers) = endpoint.observers.get() {
        observers.waited(started.elapsed().as_secs_f64());
    }
    acquired
}

/// [`acquire_on`]'s loop, begun at `started`.
async fn checkout(
    outstanding: Outstanding,
    fresh: bool,
    started: Instant,
) -> Result<Lease, PoolError> {
    let endpoint = outstanding.endpoint().clone();
    let waited = endpoint.settings().pool.acquire_timeout;
    let deadline = started + waited;
    // The common case, an idle connection at hand, needs no waiting set up.
    if let Some(ready) = take_ready(&endpoint, fresh) {
        return Ok(Lease::new(ready, outstanding));
    }
    loop {
        let notified = endpoint.available.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(ready) = take_ready(&endpoint, fresh) {
            return Ok(Lease::new(ready, outstanding));
        }
        // Dialling is boxed: the reuse of an idle connection, the common
        // case, should not carry its state in every request's future.
        match Box::pin(dial_for_request(&endpoint)).await {
            Dial::Opened(ready, connect) => {
                return Ok(Lease::new(ready, outstanding).dialled_in(connect))
            }
            Dial::Failed(e) => return Err(e),
            Dial::Again => continue,
            Dial::Busy => {}
        }
        if fresh && give_up_coldest(&endpoint) {
            continue;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Err(PoolError::Exhausted {
                addr: endpoint.addr,
                waited,
            });
        }
    }
}

/// What the endpoint has ready without dialling.
fn take_ready(endpoint: &Arc<Endpoint>, fresh: bool) -> Option<Ready> {
    if endpoint.is_http2() {
        let now = Instant::now();
        let roomy = endpoint
            .lock_h2()
            .iter()
            .find(|c| c.has_room(now))
            .cloned()?;
        let stream = roomy.open_stream(endpoint.clone());
        if stream.reused {
            endpoint.stats.reused.fetch_add(1, Ordering::Relaxed);
        }
        return Some(Ready::Stream(stream));
    }
    if fresh {
        return None;
    }
    let conn = endpoint.take_idle()?;
    endpoint.stats.reused.fetch_add(1, Ordering::Relaxed);
    Some(Ready::Idle(conn))
}

/// Dials a connection for a request if a slot is free. HTTP/2 dials one at a
/// time: the connection it opens has room for the others.
async fn dial_for_request(endpoint: &Arc<Endpoint>) -> Dial {
    let http2 = endpoint.is_http2();
    if http2 {
        if endpoint.h2_dialing.swap(true, Ordering::AcqRel) {
            return Dial::Busy;
        }
        // Another dial may have finished between the look for room and
        // taking the flag: look again before opening yet another connection.
        let now = Instant::now();
        if endpoint.lock_h2().iter().any(|c| c.has_room(now)) {
            endpoint.h2_dialing.store(false, Ordering::Release);
            return Dial::Again;
        }
    }
    let dialling = Instant::now();
    let dialled = match endpoint.try_slot() {
        Some(slot) => Some(dial::open(endpoint, slot, OpenedBy::Demand).await),
        None => None,
    };
    let connect = dialling.elapsed();
    if http2 {
        endpoint.h2_dialing.store(false, Ordering::Release);
    }
    match dialled {
        None => Dial::Busy,
        Some(Ok(Dialled::Http1(conn))) => {
            endpoint.record(true);
            Dial::Opened(Ready::Fresh(conn), connect)
        }
        Some(Ok(Dialled::Http2(conn))) => {
            endpoint.record(true);
            let stream = conn.open_stream(endpoint.clone());
            endpoint.push_h2(conn);
            Dial::Opened(Ready::Stream(stream), connect)
        }
        Some(Err(e)) => {
            if !e.is_local_refusal() {
                endpoint.record(false);
            }
            // Waiters for the HTTP/2 dial try for themselves now.
            endpoint.available.notify_waiters();
            Dial::Failed(e)
        }
    }
}

/// Retires the coldest idle connection so its slot can carry a fresh one;
/// whether there was one.
fn give_up_coldest(endpoint: &Arc<Endpoint>) -> bool {
    let coldest = {
        let mut idle = endpoint.lock_idle();
        (!idle.is_empty()).then(|| idle.remove(0))
    };
    match coldest {
        Some(entry) => {
            endpoint.dispose(entry, Verdict::Retire(RetireReason::Idle), Instant::now());
            true
        }
        None => false,
    }
}
