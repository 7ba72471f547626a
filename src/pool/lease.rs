//! What a request holds while it uses the pool: the [`Lease`] of a connection
//! (or of an HTTP/2 stream), the [`Outstanding`] count `least_outstanding`
//! balances on, and the connection [`Slot`] every open connection holds.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;

use crate::h1::H1Error;

use super::body::{ResponseBody, UpstreamBody};
use super::endpoint::Endpoint;
use super::h1::Conn;
use super::h2::H2Stream;
use super::request::{OutboundHead, UpstreamRequest};
use super::response::{UpstreamHead, UpstreamResponse};

/// A connection slot of an endpoint; dropping it frees the slot.
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    endpoint: Arc<Endpoint>,
    /// The connection holding it finished its handshake (counted in the
    /// endpoint's `established`, which readiness reads: a dial in progress
    /// holds a slot but is not yet a warm connection).
    established: bool,
}

impl Slot {
    pub(crate) fn new(permit: OwnedSemaphorePermit, endpoint: Arc<Endpoint>) -> Self {
        endpoint.open.fetch_add(1, Ordering::Relaxed);
        Self {
            _permit: permit,
            endpoint,
            established: false,
        }
    }

    /// Records that the connection holding this slot is open for requests.
    pub(crate) fn established(&mut self) {
        if !self.established {
            self.established = true;
            self.endpoint.established.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.endpoint.open.fetch_sub(1, Ordering::Relaxed);
        if self.established {
            self.endpoint.established.fetch_sub(1, Ordering::Relaxed);
        }
        // The permit is released after this body runs; waiters re-check then.
        self.endpoint.available.notify_one();
        self.endpoint.maintenance.notify_one();
    }
}

/// A connection checked out for one exchange.
///
/// [`Lease::release`] returns it to the pool once the exchange is provably
/// complete; dropping the lease instead discards the connection, so a
/// connection abandoned mid-exchange (client gone, timeout, error) is never
/// reused. A discarded connection ends as `pool.retire.error` says: with RST
/// unless that is `graceful` (FIN).
pub struct Lease {
    conn: Option<Conn>,
    /// An HTTP/2 lease borrows a stream instead of a connection.
    stream: Option<H2Stream>,
    endpoint: Arc<Endpoint>,
    reused: bool,
    /// The connection's id and which request on it this is, kept at the
    /// send: the connection itself is with the response body from then on.
    sent_on: Option<(u64, u64)>,
    /// Connect and handshake, when the connection was dialled for this request.
    connect: Option<std::time::Duration>,
    _outstanding: Outstanding,
}

/// A request counted against its endpoint from the moment the endpoint was
/// chosen (dialling and waiting included) until the lease ends; the count is
/// what `least_outstanding` balances on.
pub(crate) struct Outstanding(Arc<Endpoint>);

impl Outstanding {
    pub(crate) fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.outstanding.fetch_add(1, Ordering::Relaxed);
        Self(endpoint)
    }

    /// The endpoint counted against.
    pub(crate) fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection or stream ready for a request, before it is leased.
pub(crate) enum Ready {
    /// An HTTP/1.1 connection from the idle list.
    Idle(Conn),
    /// An HTTP/1.1 connection dialled for this request.
    Fresh(Conn),
    /// A stream on an HTTP/2 connection.
    Stream(H2Stream),
}

impl Lease {
    /// Leases what is ready to the request counted by `outstanding`.
    pub(crate) fn new(ready: Ready, outstanding: Outstanding) -> Self {
        let endpoint = outstanding.0.clone();
        let (conn, stream, reused) = match ready {
            // Any connection that sat in the idle list may have been closed
            // by the backend meanwhile, warm ones that never carried a
            // request included: all count as reused for the retry rule.
            Ready::Idle(conn) => (Some(conn), None, true),
            Ready::Fresh(conn) => (Some(conn), None, false),
            Ready::Stream(stream) => {
                let reused = stream.reused;
                (None, Some(stream), reused)
            }
        };
        Self {
            conn,
            stream,
            endpoint,
            reused,
            sent_on: None,
            connect: None,
            _outstanding: outstanding,
        }
    }

    /// The connection was dialled for this request, in `connect`.
    pub(crate) fn dialled_in(mut self, connect: std::time::Duration) -> Self {
        self.connect = Some(connect);
        self
    }

    /// Connect and handshake of a connection dialled for this request; `None`
    /// when the request went on one already open.
    pub fn connect_time(&self) -> Option<std::time::Duration> {
        self.connect
    }

    /// The connection's id, as `/pools` and the connection log show it.
    pub fn connection_id(&self) -> Option<u64> {
        match (&self.conn, &self.stream, self.sent_on) {
            (_, _, Some((id, _))) => Some(id),
            (Some(conn), _, None) => Some(conn.id()),
            (None, Some(stream), None) => Some(stream.connection_id()),
            (None, None, None) => None,
        }
    }

    /// Which request on the connection this is, from 1, once it was sent
    /// (HTTP/2: which stream).
    pub fn request_number(&self) -> Option<u64> {
        match (&self.conn, &self.stream, self.sent_on) {
            (_, _, Some((_, number))) => Some(number),
            (Some(conn), _, None) => Some(conn.requests()),
            (None, Some(stream), None) => Some(stream.number),
            (None, None, None) => None,
        }
    }

    /// After the peer refused the stream or sent GOAWAY: no new streams on
    /// that HTTP/2 connection.
    pub(crate) fn drain_connection(&self) {
        if let Some(stream) = &self.stream {
            stream.drain_connection();
        }
    }

    /// Whether the connection came from the idle list (or, for HTTP/2, had
    /// carried streams before): a failure on it may be the backend having
    /// closed it while idle, which makes the one retry worthwhile.
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// The upstream address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.endpoint.addr
    }

    /// Bytes received so far on the connection.
    pub(crate) fn received(&self) -> u64 {
        self.conn.as_ref().map_or(0, Conn::received)
    }

    /// Sends a request; `Err` carries the request back if it was never written.
    pub(crate) async fn send(
        &mut self,
        request: UpstreamRequest,
    ) -> Result<UpstreamResponse, SendError> {
        if let Some(stream) = &self.stream {
            return Box::pin(stream.send(request)).await;
        }
        // The connection stays the lease's while the exchange runs: a
        // request abandoned meanwhile drops the lease, which discards it.
        let Some(conn) = self.conn.as_mut() else {
            return Err(SendError::Unsent(Box::new(request), None));
        };
        let start = conn.exchange(request).await?;
        if let Some(timeout) = conn.announced_idle() {
            self.endpoint.note_announced_idle(timeout);
        }
        self.sent_on = Some((conn.id(), conn.requests()));
        let (head, reader) = (start.head, start.body);
        let body = match self.conn.take() {
            Some(conn) => ResponseBody::exchange(conn, reader),
            None => ResponseBody::empty(),
        };
        Ok(UpstreamResponse {
            head: UpstreamHead::Http1(head),
            body,
        })
    }

    /// Takes the connection back from the response body that was reading
    /// on it, so that the lease's end (release or drop) decides its fate.
    pub fn take_back(&mut self, body: &mut ResponseBody) {
        if let Some(conn) = body.take_conn() {
            self.conn = Some(conn);
        }
    }

    /// Counts the exchange's outcome toward the endpoint's passive health.
    pub fn record_outcome(&self, success: bool) {
        self.endpoint.record(success);
    }

    /// Returns the connection to the pool: call once the response `body`
    /// ended. Only a connection whose exchange left it usable is reused: one
    /// whose request body was not sent whole (the backend answered early,
    /// or the client's body failed) is not.
    pub fn release(mut self, body: &mut ResponseBody) {
        self.take_back(body);
        let Some(conn) = self.conn.take() else {
            return;
        };
        if conn.is_open() {
            self.endpoint.put_idle(conn);
        } else {
            self.endpoint.discard(conn);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.endpoint.discard(conn);
        }
    }
}

/// What failed when a request was sent.
#[derive(Debug, thiserror::Error)]
pub enum SendFailure {
    /// hyper's HTTP/2 client failed.
    #[error(transparent)]
    Http2(#[from] hyper::Error),
    /// The socket failed.
    #[error("{0}")]
    Io(std::io::Error),
    /// The backend closed the connection before a response byte.
    #[error("the backend closed the connection before responding")]
    Closed,
    /// The response could not be read: its head or framing was broken.
    #[error(transparent)]
    Response(H1Error),
    /// An HTTP/1.1 head came for an HTTP/2 stream, which takes `http`
    /// parts: a caller's mistake, never sent.
    #[error("an HTTP/1.1 request head cannot go on an HTTP/2 stream")]
    Http1HeadOnHttp2,
}

/// hyper's failure to send a request on a connection, with the request when it
/// was never written.
type TrySendError = hyper::client::conn::TrySendError<http::Request<UpstreamBody>>;

/// The outcome of a send as the pool reports it: the response with the pool's
/// body, or the failure with the request when it can be sent elsewhere.
#[inline]
pub(crate) fn sent(
    result: Result<http::Response<Incoming>, TrySendError>,
) -> Result<UpstreamResponse, SendError> {
    match result {
        Ok(response) => {
            let (head, body) = response.into_parts();
            Ok(UpstreamResponse {
                head: UpstreamHead::Parts(head),
                body: ResponseBody::stream(body),
            })
        }
        Err(e) => Err(send_error(e)),
    }
}

/// hyper's failure as a [`SendError`], the request recovered when unsent.
#[cold]
fn send_error(mut e: TrySendError) -> SendError {
    match e.take_message() {
        Some(request) => SendError::Unsent(Box::new(request.into()), Some(e.into_error().into())),
        None => SendError::Failed(e.into_error().into(), None),
    }
}

/// A failed send.
pub(crate) enum SendError {
    /// The request was never written; it can be sent elsewhere whatever its method.
    Unsent(Box<UpstreamRequest>, Option<SendFailure>),
    /// The request may have reached the backend. The head comes back
    /// when the sender kept it (HTTP/1.1 does, hyper's HTTP/2 does not).
    Failed(SendFailure, Option<Box<OutboundHead>>),
}
