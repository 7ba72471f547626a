//! Sending a request upstream, and the one retry of a request whose first
//! attempt failed before its response: on a freshly dialled connection, and
//! only when sending it again cannot make the backend do anything twice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{Method, Request, Response};

use super::error::ProxyError;
use crate::pool::{refused_by_peer, Lease, Pool, ResponseBody, SendError, UpstreamBody};

/// What a first attempt keeps to send its request again: the head, and the
/// body when it is wholly in memory.
type Replay = Option<(Parts, Option<Bytes>)>;

/// Sends the request, retrying once on a fresh connection when that is safe:
/// the request was never written (any method), the HTTP/2 peer refused it
/// unprocessed (any method), or it failed on a reused connection before any
/// response byte and its method is idempotent; in the last two cases only
/// when its body is in memory.
pub(super) async fn forward(
    pool: &Pool,
    parts: Parts,
    mut body: UpstreamBody,
) -> Result<(Response<ResponseBody>, Lease), ProxyError> {
    let replay = body.replayable().map(|bytes| (copy_head(&parts), bytes));
    let client_failed = body.client_failed_flag();
    let mut lease = pool.acquire().await?;
    body.notify_sent(lease.request_sent_flag());
    let received_before = lease.received();
    let failure = match lease.send(Request::from_parts(parts, body)).await {
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
    ))
    .await
}

/// The one retry of a request whose first attempt failed, when [`forward`]'s
/// rule allows it.
async fn retry(
    pool: &Pool,
    lease: Lease,
    failure: SendError,
    replay: Replay,
    received_before: u64,
    client_failed: Arc<AtomicBool>,
) -> Result<(Response<ResponseBody>, Lease), ProxyError> {
    let addr = lease.addr();
    // An HTTP/2 peer that refused the stream (or whose GOAWAY covered it) did
    // not process the request.
    let refused = matches!(&failure, SendError::Failed(source) if refused_by_peer(source));
    let clean = lease.reused() && lease.received() == received_before;
    let idempotent = replay
        .as_ref()
        .is_some_and(|(head, _)| idempotent(&head.method));
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
            tracing::debug!(upstream = %addr, error = ?reason, "request was not sent; retrying on a new connection");
            *request
        }
        SendError::Failed(source) => {
            if refused {
                lease.drain_connection();
            }
            let Some((head, bytes)) = replay else {
                return Err(error);
            };
            tracing::debug!(upstream = %addr, error = %source, refused, "request failed before a response; retrying once");
            Request::from_parts(head, UpstreamBody::from_bytes(bytes))
        }
    };
    drop(lease);
    let mut lease = pool.acquire_fresh(addr).await?;
    let (head, mut body) = request.into_parts();
    body.notify_sent(lease.request_sent_flag());
    match lease.send(Request::from_parts(head, body)).await {
        Ok(response) => Ok((response, lease)),
        Err(failure) => Err(ProxyError::send_failed(
            &failure,
            addr,
            client_failed(),
            false,
        )),
    }
}

fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The head of a request, without its extensions, for a replay.
fn copy_head(parts: &Parts) -> Parts {
    let (mut head, ()) = Request::new(()).into_parts();
    head.method = parts.method.clone();
    head.uri = parts.uri.clone();
    head.version = parts.version;
    head.headers = parts.headers.clone();
    head
}
