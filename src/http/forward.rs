//! Sending a request upstream, and the one retry of a request whose first
//! attempt failed before its response: on a freshly dialled connection, and
//! only when sending it again cannot make the backend do anything twice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::Method;

use tokio::time::Instant;

use super::error::ProxyError;
use crate::accesslog::UpstreamFacts;
use crate::pool::{
    refused_by_peer, Lease, OutboundHead, Pool, SendError, UpstreamBody, UpstreamRequest,
    UpstreamResponse,
};

/// What the access log is told of the upstream side, when it is on.
type Facts<'a> = Option<&'a mut UpstreamFacts>;

/// What a first attempt keeps to send its request again: the body, when it
/// is wholly in memory, and a copy of the head when the sender does not
/// give the head back on failure (HTTP/2; an HTTP/1.1 exchange does).
struct Replay {
    body: Option<Bytes>,
    head: Option<OutboundHead>,
}

/// Sends the request, retrying once on a fresh connection when that is safe:
/// the request was never written (any method), the HTTP/2 peer refused it
/// unprocessed (any method), or it failed on a reused connection before any
/// response byte and its method is idempotent; in the last two cases only
/// when its body is in memory. `facts`, when the access log is on, is told
/// the pool wait, the connection and the attempts.
pub(super) async fn forward(
    pool: &Pool,
    request: UpstreamRequest,
    mut facts: Facts<'_>,
) -> Result<(UpstreamResponse, Lease), ProxyError> {
    let gives_head_back = matches!(request.head, OutboundHead::Http1(_));
    let replay = request.body.replayable().map(|bytes| Replay {
        body: bytes,
        head: (!gives_head_back).then(|| request.head.replay_copy()),
    });
    let client_failed = request.body.client_failed_flag();
    let mut lease = timed(&mut facts, pool.acquire()).await?;
    let received_before = lease.received();
    let sent = lease.send(request).await;
    note_attempt(&mut facts, &lease);
    let failure = match sent {
        Ok(response) => return Ok((response, lease)),
        Err(failure) => failure,
    };
    // The retry path is boxed: most requests never take it, and its futures
    // would otherwise enlarge every request's state.
    Box::pin(retry(
        pool,
        lease,
        failure,
        replay,
        received_before,
        client_failed,
        facts,
    ))
    .await
}

/// Awaits a checkout, adding its time to the pool wait in `facts` (timed only
/// when the access log is on).
async fn timed(
    facts: &mut Facts<'_>,
    acquire: impl std::future::Future<Output = Result<Lease, crate::pool::PoolError>>,
) -> Result<Lease, crate::pool::PoolError> {
    let Some(facts) = facts.as_deref_mut() else {
        return acquire.await;
    };
    let started = Instant::now();
    let acquired = acquire.await;
    facts.pool_wait += started.elapsed();
    acquired
}

/// Tells `facts` of an attempt sent on `lease`'s connection.
fn note_attempt(facts: &mut Facts<'_>, lease: &Lease) {
    if let Some(facts) = facts.as_deref_mut() {
        facts.attempts += 1;
        facts.endpoint = Some(lease.addr());
        facts.upstream_conn = lease.connection_id();
        facts.reused = Some(lease.reused());
        facts.conn_request = lease.request_number();
        facts.connect = lease.connect_time().unwrap_or_default();
    }
}

/// The one retry of a request whose first attempt failed, when [`forward`]'s
/// rule allows it.
async fn retry(
    pool: &Pool,
    lease: Lease,
    failure: SendError,
    replay: Option<Replay>,
    received_before: u64,
    client_failed: Arc<AtomicBool>,
    mut facts: Facts<'_>,
) -> Result<(UpstreamResponse, Lease), ProxyError> {
    let addr = lease.addr();
    // An HTTP/2 peer that refused the stream (or whose GOAWAY covered it) did
    // not process the request.
    let refused = matches!(&failure, SendError::Failed(source, _) if refused_by_peer(source));
    let clean = lease.reused() && lease.received() == received_before;
    let (replay_body, replay_head) = match (replay, &failure) {
        (Some(replay), SendError::Failed(_, Some(_))) => (Some(replay.body), None),
        (Some(replay), _) => (Some(replay.body), replay.head),
        (None, _) => (None, None),
    };
    let method = match &failure {
        SendError::Failed(_, Some(head)) => Some(head.method()),
        _ => replay_head.as_ref().map(OutboundHead::method),
    };
    let idempotent = replay_body.is_some() && method.is_some_and(idempotent);
    let client_failed = || client_failed.load(Ordering::Acquire);
    let error = ProxyError::send_failed(
        &failure,
        addr,
        client_failed(),
        refused || (clean && idempotent),
    );
    if !error.retry_allowed() {
        return Err(error);
    }
    let request = match failure {
        SendError::Unsent(request, reason) => {
            set_retry_reason(&mut facts, "unsent");
            tracing::debug!(upstream = %addr, error = ?reason, "request was not sent; retrying on a new connection");
            *request
        }
        SendError::Failed(source, returned) => {
            if refused {
                lease.drain_connection();
            }
            let (Some(head), Some(bytes)) =
                (returned.map(|head| *head).or(replay_head), replay_body)
            else {
                return Err(error);
            };
            tracing::debug!(upstream = %addr, error = %source, refused, "request failed before a response; retrying once");
            let reason = if refused {
                "refused"
            } else {
                "reused-connection-failed"
            };
            set_retry_reason(&mut facts, reason);
            UpstreamRequest {
                head,
                body: UpstreamBody::from_bytes(bytes),
            }
        }
    };
    drop(lease);
    let mut lease = timed(&mut facts, pool.acquire_fresh(addr)).await?;
    let sent = lease.send(request).await;
    note_attempt(&mut facts, &lease);
    match sent {
        Ok(response) => Ok((response, lease)),
        Err(failure) => Err(ProxyError::send_failed(
            &failure,
            addr,
            client_failed(),
            false,
        )),
    }
}

fn set_retry_reason(facts: &mut Facts<'_>, reason: &'static str) {
    if let Some(facts) = facts.as_deref_mut() {
        facts.retry_reason = Some(reason);
    }
}

fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}
