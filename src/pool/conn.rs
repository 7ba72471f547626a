//! One pooled upstream connection: dialling it, the IO adapter hyper drives, and
//! the [`Lease`] a request holds while it uses the connection.
//!
//! The socket is shared (`Arc<TcpStream>`) between hyper's connection task and
//! the pool, so the pool can peek at an idle connection for staleness and choose
//! how it ends (RST via linger 0, or FIN) without going through hyper's shutdown,
//! which would always send FIN and leave TIME_WAIT on tether.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::body::{ResponseBody, UpstreamBody};
use super::{Endpoint, PoolError};
use crate::config::{Retire, RetirePolicy, RetireReason};
use crate::sock::{self, PeerState};

/// The IO object handed to hyper: reads and writes through the shared socket and
/// counts bytes received, so a failed request can tell whether any response
/// byte arrived (only then is a retry unsafe).
pub(crate) struct UpstreamIo {
    socket: Arc<TcpStream>,
    received: Arc<AtomicU64>,
}

impl UpstreamIo {
    /// An IO over `socket` with a fresh received-bytes counter.
    pub(crate) fn new(socket: Arc<TcpStream>) -> Self {
        Self {
            socket,
            received: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.socket.poll_read_ready(cx))?;
            // Reads into the uninitialised part directly: zeroing it first
            // (initialize_unfilled) would cost a memset of hyper's whole read
            // buffer on every read. A read that leaves room in the buffer
            // drained the socket, so readiness is cleared as tokio's own
            // poll_read does: the next read waits for epoll instead of
            // costing a recv that returns EAGAIN (one per response otherwise).
            let room = buf.remaining();
            let mut read = 0;
            let attempt = self.socket.try_io(Interest::READABLE, || {
                read = self.socket.try_read_buf(buf)?;
                if read > 0 && read < room {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            });
            match attempt {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && read > 0 => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
            self.received.fetch_add(read as u64, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.socket.poll_write_ready(cx))?;
            match self.socket.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.socket.poll_write_ready(cx))?;
            match self.socket.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Deliberately does nothing: how an upstream connection ends (RST or FIN)
    /// is the pool's decision, taken on the shared socket.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A live upstream connection owned by the pool (idle) or by a [`Lease`] (busy).
pub(crate) struct Conn {
    sender: SendRequest<UpstreamBody>,
    socket: Arc<TcpStream>,
    received: Arc<AtomicU64>,
    expires: Instant,
    /// Requests sent on it.
    requests: u64,
    /// What the backend announced in `Keep-Alive: timeout=N, max=M`.
    announced: KeepAliveHint,
    /// An exchange said `Connection: close`: never pool it again.
    closing: bool,
    /// Retiring peer-first: its next request says `Connection: close`.
    goodbye: bool,
    /// Held for the connection's whole life: counts it against
    /// `pool.max_connections` and wakes waiters when it is gone.
    _slot: Slot,
}

/// The backend's `Keep-Alive` response header: how long it keeps an idle
/// connection and how many requests it serves on one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepAliveHint {
    /// `timeout=N`.
    pub timeout: Option<std::time::Duration>,
    /// `max=M`.
    pub max: Option<u64>,
}

impl KeepAliveHint {
    /// Parses `timeout=5, max=100` (unknown parameters are ignored).
    pub fn parse(value: &str) -> Self {
        let mut hint = Self::default();
        for part in value.split(',') {
            let Some((name, number)) = part.split_once('=') else {
                continue;
            };
            let Ok(number) = number.trim().trim_matches('"').parse::<u64>() else {
                continue;
            };
            match name.trim().to_ascii_lowercase().as_str() {
                "timeout" => hint.timeout = Some(std::time::Duration::from_secs(number)),
                "max" => hint.max = Some(number),
                _ => {}
            }
        }
        hint
    }
}

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

/// Why a connection is being closed; with `pool.retire`, decides RST or FIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Healthy, retired by policy for this reason.
    Retired(RetireReason),
    /// Broken, stale, or abandoned mid-exchange (the `error` reason).
    Discarded,
}

impl Ending {
    fn reason(self) -> RetireReason {
        match self {
            Self::Retired(reason) => reason,
            Self::Discarded => RetireReason::Error,
        }
    }
}

/// How long a connection whose last exchange said `Connection: close` waits
/// for the backend's FIN (so that tether's close is the passive one) before
/// it is reset.
const PEER_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Opens the TCP connection to an endpoint within `connect_timeout`, with the
/// upstream socket options set.
pub(crate) async fn dial(endpoint: &Endpoint) -> Result<Arc<TcpStream>, PoolError> {
    let settings = &endpoint.settings;
    let addr = endpoint.addr;
    let stream = tokio::time::timeout(settings.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| PoolError::ConnectTimeout {
            addr,
            after: settings.connect_timeout,
        })?
        .map_err(|source| PoolError::Connect { addr, source })?;
    sock::configure_upstream(&stream, &settings.keepalive);
    Ok(Arc::new(stream))
}

/// `max_lifetime` ±10 %, so a pool's connections do not all retire at once.
pub(crate) fn jittered_lifetime(settings: &crate::config::UpstreamConfig) -> std::time::Duration {
    settings
        .pool
        .max_lifetime
        .mul_f64(0.9 + fastrand::f64() * 0.2)
}

impl Conn {
    /// Dials `endpoint`, sets socket options and runs the HTTP/1 handshake.
    pub(crate) async fn connect(
        endpoint: &Arc<Endpoint>,
        mut slot: Slot,
    ) -> Result<Self, PoolError> {
        let settings = &endpoint.settings;
        let addr = endpoint.addr;
        let socket = dial(endpoint).await?;
        let received = Arc::new(AtomicU64::new(0));
        let io = UpstreamIo {
            socket: socket.clone(),
            received: received.clone(),
        };
        debug_assert_eq!(settings.protocol, crate::config::Protocol::Http1);
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| PoolError::Handshake { addr, source })?;
        let notify = Arc::downgrade(endpoint);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(upstream = %addr, error = %e, "upstream connection ended with an error");
            }
            // Let the pool notice the loss now rather than at its next tick.
            if let Some(endpoint) = notify.upgrade() {
                endpoint.maintenance.notify_one();
            }
        });
        let created = Instant::now();
        let lifetime = jittered_lifetime(settings);
        tracing::debug!(upstream = %addr, "upstream connection opened");
        endpoint.stats.opened.fetch_add(1, Ordering::Relaxed);
        slot.established();
        Ok(Self {
            sender,
            socket,
            received,
            expires: created + lifetime,
            requests: 0,
            announced: KeepAliveHint::default(),
            closing: false,
            goodbye: false,
            _slot: slot,
        })
    }

    /// Whether hyper still has the connection open. Costs no syscall; a FIN
    /// or RST that hyper has not read yet goes unnoticed (see [`Self::is_usable`]).
    pub(crate) fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }

    /// Whether an idle connection can carry another request: hyper still has it
    /// open and nothing arrived on it unasked (no FIN, no stray bytes, no RST).
    pub(crate) fn is_usable(&self) -> bool {
        self.is_open() && sock::peer_state(&*self.socket) == PeerState::Quiet
    }

    /// Whether it outlived its (jittered) `max_lifetime`.
    pub(crate) fn expired(&self, now: Instant) -> bool {
        now >= self.expires
    }

    /// The idle timeout the backend announced on this connection
    /// (`Keep-Alive: timeout=N`), if it did.
    pub(crate) fn announced_idle(&self) -> Option<std::time::Duration> {
        self.announced.timeout
    }

    /// Whether it has carried as many requests as the backend serves on one
    /// connection (`Keep-Alive: max=M`).
    pub(crate) fn at_request_limit(&self) -> bool {
        self.announced.max.is_some_and(|max| self.requests >= max)
    }

    /// Whether an exchange on it said `Connection: close`: the backend closes
    /// it, so it must never be pooled again.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing
    }

    /// Makes its next request its last (retiring peer-first): that request
    /// says `Connection: close`, and the backend closes after answering it.
    pub(crate) fn end_after_next_request(&mut self) {
        self.goodbye = true;
    }

    /// Sends a request of the pool's own (a probe) once hyper is ready for
    /// it. Such a request is never sent anywhere else, so a failure does not
    /// give it back (a client's request goes through [`Lease::send`], which
    /// does). On a connection ending after this request
    /// ([`Self::end_after_next_request`]) the request says `Connection: close`.
    pub(crate) async fn send(
        &mut self,
        request: http::Request<UpstreamBody>,
    ) -> Result<http::Response<ResponseBody>, hyper::Error> {
        let mut request = request;
        self.sender.ready().await?;
        self.prepare(&mut request);
        let response = self.sender.send_request(request).await?;
        Ok(response.map(ResponseBody::new))
    }

    /// Counts a request about to be sent, and makes it say `Connection: close`
    /// when it is the connection's last: what every send does first.
    #[inline]
    fn prepare(&mut self, request: &mut http::Request<UpstreamBody>) {
        self.requests += 1;
        if self.goodbye {
            request.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
            self.closing = true;
        }
    }

    /// The socket, for tests that check its options.
    #[cfg(test)]
    pub(crate) fn socket(&self) -> &TcpStream {
        &self.socket
    }

    /// Records `Keep-Alive: timeout=N, max=M` and `Connection: close`.
    pub(crate) fn note_response(&mut self, headers: &http::HeaderMap) {
        const KEEP_ALIVE: http::HeaderName = http::HeaderName::from_static("keep-alive");
        if let Some(value) = headers.get(KEEP_ALIVE).and_then(|v| v.to_str().ok()) {
            let hint = KeepAliveHint::parse(value);
            if hint.timeout.is_some() {
                self.announced.timeout = hint.timeout;
            }
            if hint.max.is_some() {
                self.announced.max = hint.max;
            }
        }
        self.closing |= crate::connection_header::has_token(headers, "close");
    }

    /// Bytes received so far on this connection.
    pub(crate) fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Closes the connection the way `ending` and the retire policy call for.
    pub(crate) fn close(self, ending: Ending, policy: &RetirePolicy) {
        match policy.for_reason(ending.reason()) {
            Retire::Graceful => {
                if let Err(e) = sock::send_fin(&*self.socket) {
                    tracing::debug!(error = %e, "cannot half-close retired upstream connection");
                }
            }
            // The backend already closed: closing now is the passive close.
            Retire::PeerFirst if sock::peer_state(&*self.socket) == PeerState::Closed => {}
            Retire::Abort | Retire::PeerFirst => sock::reset_on_close(&*self.socket),
        }
        // Dropping the sender ends hyper's connection task, which drops its half
        // of the socket; the last drop closes it.
    }

    /// Closes a connection whose last exchange said `Connection: close`: the
    /// backend closes it, so wait briefly for its FIN and close passively;
    /// reset if it does not come.
    pub(crate) fn close_after_peer(self) {
        tokio::spawn(async move {
            let waited = tokio::time::timeout(PEER_CLOSE_WAIT, async {
                loop {
                    if self.socket.readable().await.is_err() {
                        return;
                    }
                    match sock::peer_state(&*self.socket) {
                        PeerState::Quiet => tokio::task::yield_now().await,
                        _ => return,
                    }
                }
            })
            .await;
            if waited.is_err() || sock::peer_state(&*self.socket) != PeerState::Closed {
                sock::reset_on_close(&*self.socket);
            }
        });
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
    stream: Option<super::h2::H2Stream>,
    endpoint: Arc<Endpoint>,
    reused: bool,
    request_sent: Arc<AtomicBool>,
    _outstanding: Outstanding,
}

/// A request counted against its endpoint from the moment the endpoint was
/// chosen (dialling and waiting included) until the lease ends; the count is
/// what `least_outstanding` balances on.
pub(crate) struct Outstanding(pub(crate) Arc<Endpoint>);

impl Outstanding {
    pub(crate) fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.outstanding.fetch_add(1, Ordering::Relaxed);
        Self(endpoint)
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Lease {
    pub(crate) fn new(conn: Conn, outstanding: Outstanding, reused: bool) -> Self {
        Self {
            conn: Some(conn),
            stream: None,
            endpoint: outstanding.0.clone(),
            reused,
            request_sent: Arc::new(AtomicBool::new(false)),
            _outstanding: outstanding,
        }
    }

    /// A lease of one HTTP/2 stream.
    pub(crate) fn h2(stream: super::h2::H2Stream, outstanding: Outstanding) -> Self {
        Self {
            conn: None,
            reused: stream.reused,
            stream: Some(stream),
            endpoint: outstanding.0.clone(),
            // A stream's request body end is the stream's business, not the
            // connection's: nothing to guard on release.
            request_sent: Arc::new(AtomicBool::new(true)),
            _outstanding: outstanding,
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

    /// Flag the request body sets once it has been sent whole.
    pub(crate) fn request_sent_flag(&self) -> Arc<AtomicBool> {
        self.request_sent.clone()
    }

    /// Bytes received so far on the connection.
    pub(crate) fn received(&self) -> u64 {
        self.conn.as_ref().map_or(0, Conn::received)
    }

    /// Sends a request; `Err` carries the request back if it was never written.
    pub(crate) async fn send(
        &mut self,
        request: http::Request<UpstreamBody>,
    ) -> Result<http::Response<ResponseBody>, SendError> {
        if let Some(stream) = &self.stream {
            return Box::pin(stream.send(request)).await;
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(SendError::Unsent(Box::new(request), None));
        };
        // Written here rather than as a connection method: awaited as a
        // future of its own, it would cost every request a move of the
        // request into that future's state.
        let mut request = request;
        if let Err(e) = conn.sender.ready().await {
            return Err(SendError::Unsent(Box::new(request), Some(e)));
        }
        conn.prepare(&mut request);
        sent(conn.sender.try_send_request(request).await)
    }

    /// Takes note of what the response's headers say about the connection's
    /// future: `Keep-Alive: timeout=N, max=M`, or `Connection: close`.
    pub fn note_response(&mut self, headers: &http::HeaderMap) {
        if let Some(conn) = self.conn.as_mut() {
            conn.note_response(headers);
            if let Some(timeout) = conn.announced.timeout {
                self.endpoint.note_announced_idle(timeout);
            }
        }
    }

    /// Counts the exchange's outcome toward the endpoint's passive health.
    pub fn record_outcome(&self, success: bool) {
        self.endpoint.record(success);
    }

    /// Returns the connection to the pool: call once the response body ended.
    /// Only a connection whose request body was also sent whole is reused.
    pub fn release(mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.request_sent.load(Ordering::Acquire) {
            self.endpoint.put_idle(conn);
        } else {
            conn.close(Ending::Discarded, &self.endpoint.settings.pool.retire);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.endpoint
                .stats
                .discarded
                .fetch_add(1, Ordering::Relaxed);
            conn.close(Ending::Discarded, &self.endpoint.settings.pool.retire);
        }
    }
}

/// hyper's failure to send a request on a connection, with the request when it
/// was never written.
type TrySendError = hyper::client::conn::TrySendError<http::Request<UpstreamBody>>;

/// The outcome of a send as the pool reports it: the response with the pool's
/// body, or the failure with the request when it can be sent elsewhere.
#[inline]
pub(crate) fn sent(
    result: Result<http::Response<Incoming>, TrySendError>,
) -> Result<http::Response<ResponseBody>, SendError> {
    match result {
        Ok(response) => Ok(response.map(ResponseBody::new)),
        Err(e) => Err(send_error(e)),
    }
}

/// hyper's failure as a [`SendError`], the request recovered when unsent.
#[cold]
fn send_error(mut e: TrySendError) -> SendError {
    match e.take_message() {
        Some(request) => SendError::Unsent(Box::new(request), Some(e.into_error())),
        None => SendError::Failed(e.into_error()),
    }
}

/// A failed send.
pub(crate) enum SendError {
    /// The request was never written; it can be sent elsewhere whatever its method.
    Unsent(Box<http::Request<UpstreamBody>>, Option<hyper::Error>),
    /// The request may have reached the backend.
    Failed(hyper::Error),
}
