//! The client side of tether: one task per accepted connection, serving HTTP/1.0
//! and HTTP/1.1 with hyper, and deciding how the connection ends.
//!
//! hyper would close with FIN on every path; tether wants FIN only where the
//! close discipline allows it. So the connection is served with
//! `poll_without_shutdown`, the socket is taken back afterwards on every path,
//! and [`ClientIo`] resets (SO_LINGER 0) on drop unless a path has explicitly
//! chosen an orderly close. Timeouts (header, idle) are tether's own, driven by
//! a per-connection `Clock` that the IO and the service update.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::ClientClose;
use crate::drain::Shutdown;
use crate::http::body::ExchangeDone;
use crate::http::{Binding, ProxyService};
use crate::metrics::{Name, ReasonLabels};
use crate::sock;

/// An accepted client stream.
pub enum ClientStream {
    /// TCP (usually loopback).
    Tcp(TcpStream),
    /// A unix stream socket (no RST exists there; aborts are plain closes).
    Unix(UnixStream),
}

/// How a client connection ended, for logs and the
/// `tether_client_connections_closed` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Orderly: FIN exchanged.
    Closed,
    /// Aborted with RST.
    Reset(ResetReason),
}

/// Why tether reset a client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// No complete request head within `header_timeout`.
    HeaderTimeout,
    /// Silent between requests for `idle_timeout`.
    IdleTimeout,
    /// The socket failed under hyper (not a parse error).
    ConnectionError,
    /// Still open at the drain deadline.
    DrainDeadline,
    /// tether's own FIN could not be sent.
    FinFailed,
    /// The client did not close within `close_grace` after tether's FIN or
    /// goodbye.
    CloseGrace,
    /// `client_close = "abort"`: reset once the response was acknowledged.
    CloseAbort,
    /// A client that sent a bad request did not close within `close_grace`.
    Misbehaved,
}

impl Ending {
    /// The metric label: `fin`, or the reset's reason.
    pub fn label(self) -> &'static str {
        match self {
            Self::Closed => "fin",
            Self::Reset(reason) => reason.label(),
        }
    }
}

impl ResetReason {
    /// The metric and log label.
    pub fn label(self) -> &'static str {
        match self {
            Self::HeaderTimeout => "header-timeout",
            Self::IdleTimeout => "idle-timeout",
            Self::ConnectionError => "connection-error",
            Self::DrainDeadline => "drain-deadline",
            Self::FinFailed => "fin-failed",
            Self::CloseGrace => "close-grace",
            Self::CloseAbort => "close-policy-abort",
            Self::Misbehaved => "misbehaved",
        }
    }
}

/// Per-connection state shared by the IO, the service and the connection task.
pub struct ConnState {
    clock: Clock,
    misbehaved: AtomicBool,
    requests: AtomicU64,
    /// The head just read carried both Content-Length and Transfer-Encoding.
    ambiguous_framing: AtomicBool,
    /// Set when an exchange ends: the next bytes start a new head to scan.
    rescan: AtomicBool,
    /// The exchange in flight is the connection's last and the listener closes
    /// gracefully: FIN as soon as its response is flushed.
    fin_when_flushed: AtomicBool,
    /// The last response is complete; the next flush ends with a FIN.
    fin_ready: AtomicBool,
    /// tether has already sent its FIN.
    fin_sent: AtomicBool,
    /// Cancelled when the process starts draining.
    drain: CancellationToken,
}

impl ConnState {
    fn new(header_timeout: Duration, idle_timeout: Duration, drain: CancellationToken) -> Self {
        Self {
            clock: Clock::new(header_timeout, idle_timeout),
            misbehaved: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            ambiguous_framing: AtomicBool::new(false),
            rescan: AtomicBool::new(false),
            fin_when_flushed: AtomicBool::new(false),
            fin_ready: AtomicBool::new(false),
            fin_sent: AtomicBool::new(false),
            drain,
        }
    }

    /// Whether the process is draining: the exchange being served is the
    /// connection's last.
    pub fn draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// The exchange being served ends the connection and its client may be
    /// closed gracefully: tether sends its FIN right behind the last response
    /// byte, in the same flush, so a client that closes as soon as it has read
    /// the response finds the FIN already there and closes passively.
    pub fn fin_after_response(&self) {
        self.fin_when_flushed.store(true, Ordering::Relaxed);
    }

    /// Whether the request now being served declared both Content-Length and
    /// Transfer-Encoding (hyper reads it as chunked; tether refuses it, as a
    /// request-smuggling attempt or a broken client).
    pub fn take_ambiguous_framing(&self) -> bool {
        self.ambiguous_framing.swap(false, Ordering::Relaxed)
    }

    /// A request head was parsed and handed to the service.
    pub fn exchange_started(&self) {
        self.clock.set_busy();
    }

    /// Counts a request; returns how many this connection has carried.
    pub fn count_request(&self) -> u64 {
        self.requests.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The client sent something tether refused; it gets no graceful close.
    pub fn mark_misbehaved(&self) {
        self.misbehaved.store(true, Ordering::Relaxed);
    }
}

impl ExchangeDone for ConnState {
    fn exchange_done(&self, complete: bool) {
        // Only a response handed over whole may be followed by a FIN: after a
        // truncated one, a FIN would make a close-delimited body look complete.
        if complete
            && self.fin_when_flushed.load(Ordering::Relaxed)
            && !self.misbehaved.load(Ordering::Relaxed)
        {
            self.fin_ready.store(true, Ordering::Relaxed);
        }
        self.rescan.store(true, Ordering::Relaxed);
        self.clock.set(Phase::Idle, Instant::now());
    }
}

/// Watches the bytes of a request head as they arrive, for the one ambiguity
/// hyper resolves silently: Content-Length together with Transfer-Encoding
/// (RFC 9112 §6.3 lets a server reject it; tether does, as nginx does).
struct HeadScan {
    buf: Vec<u8>,
    active: bool,
    limit: usize,
}

impl HeadScan {
    fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            active: true,
            limit,
        }
    }

    /// Feeds newly read bytes; returns `Some(ambiguous)` once the head is complete.
    fn feed(&mut self, bytes: &[u8]) -> Option<bool> {
        if !self.active {
            return None;
        }
        // Usually the whole head arrives in one read: scan it where it lies.
        let scanned = if self.buf.is_empty() {
            scan_head(bytes, self.limit)
        } else {
            let room = self.limit.saturating_sub(self.buf.len());
            self.buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
            scan_head(&self.buf, self.limit)
        };
        let Some(result) = scanned else {
            if self.buf.is_empty() {
                self.buf
                    .extend_from_slice(&bytes[..bytes.len().min(self.limit)]);
            }
            return None;
        };
        self.active = false;
        self.buf.clear();
        if self.buf.capacity() > 16 * 1024 {
            self.buf = Vec::new();
        }
        Some(result)
    }
}

/// `Some(ambiguous)` once `bytes` hold a whole head (or `limit` bytes of one).
fn scan_head(bytes: &[u8], limit: usize) -> Option<bool> {
    match head_of(bytes) {
        Some(head) => Some(declares_both_lengths(head)),
        None if bytes.len() >= limit => Some(false),
        None => None,
    }
}

/// The head in `bytes` up to the empty line that ends it, once it is complete.
/// Leading empty lines before a request line are skipped, and bare LF line
/// ends count, as hyper accepts both.
fn head_of(bytes: &[u8]) -> Option<&[u8]> {
    let start = bytes.iter().position(|b| *b != b'\r' && *b != b'\n')?;
    let head = &bytes[start..];
    let mut from = 0;
    while let Some(found) = memchr::memchr(b'\n', &head[from..]) {
        let at = from + found;
        let ends = match head.get(at + 1) {
            Some(b'\n') => true,
            Some(b'\r') => head.get(at + 2) == Some(&b'\n'),
            _ => false,
        };
        if ends {
            return Some(&head[..at]);
        }
        from = at + 1;
    }
    None
}

fn declares_both_lengths(head: &[u8]) -> bool {
    let (mut length, mut encoding) = (false, false);
    for line in head.split(|b| *b == b'\n').skip(1) {
        let name = line.split(|b| *b == b':').next().unwrap_or_default();
        length |= name.eq_ignore_ascii_case(b"content-length");
        encoding |= name.eq_ignore_ascii_case(b"transfer-encoding");
    }
    length && encoding
}

/// What a client connection is doing, for its timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a request head (or just accepted).
    Head,
    /// A request is being served; no client timeout runs.
    Busy,
    /// Waiting for the next request.
    Idle,
}

/// The header and idle timers of one connection.
///
/// The phase and the instant it began live in one atomic word that the IO and
/// the service update without waking anyone; the connection's single timer is
/// lazy: when it fires it reads the phase and either expires or re-arms. A
/// timer that fires early costs one wake-up; one that fires late would let a
/// slow client overstay, so it is never armed past the earliest deadline any
/// phase could have from now.
struct Clock {
    /// Phase in the top two bits, milliseconds since `origin` in the rest.
    word: AtomicU64,
    origin: Instant,
    header_timeout: Duration,
    idle_timeout: Duration,
}

const PHASE_SHIFT: u32 = 62;
const SINCE_MASK: u64 = (1 << PHASE_SHIFT) - 1;

impl Clock {
    fn new(header_timeout: Duration, idle_timeout: Duration) -> Self {
        Self {
            word: AtomicU64::new(0),
            origin: Instant::now(),
            header_timeout,
            idle_timeout,
        }
    }

    fn encode(&self, phase: Phase, at: Instant) -> u64 {
        let tag = match phase {
            Phase::Head => 0,
            Phase::Busy => 1,
            Phase::Idle => 2,
        };
        let millis =
            u64::try_from(at.duration_since(self.origin).as_millis()).unwrap_or(SINCE_MASK);
        (tag << PHASE_SHIFT) | (millis & SINCE_MASK)
    }

    fn decode(&self, word: u64) -> (Phase, Instant) {
        let phase = match word >> PHASE_SHIFT {
            0 => Phase::Head,
            1 => Phase::Busy,
            _ => Phase::Idle,
        };
        (
            phase,
            self.origin + Duration::from_millis(word & SINCE_MASK),
        )
    }

    fn set(&self, phase: Phase, at: Instant) {
        self.word.store(self.encode(phase, at), Ordering::Release);
    }

    /// Busy has no deadline, so no clock read.
    fn set_busy(&self) {
        self.word.store(1 << PHASE_SHIFT, Ordering::Release);
    }

    /// Bytes arrived from the client: an idle connection starts a request head.
    fn bytes_arrived(&self) {
        let word = self.word.load(Ordering::Acquire);
        if self.decode(word).0 == Phase::Idle {
            // Lost races are harmless: whoever wins set a newer phase.
            let _ = self.word.compare_exchange(
                word,
                self.encode(Phase::Head, Instant::now()),
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }

    fn deadline(&self) -> Option<(Instant, ResetReason)> {
        match self.decode(self.word.load(Ordering::Acquire)) {
            (Phase::Head, since) => Some((since + self.header_timeout, ResetReason::HeaderTimeout)),
            (Phase::Idle, since) => Some((since + self.idle_timeout, ResetReason::IdleTimeout)),
            (Phase::Busy, _) => None,
        }
    }

    /// Resolves with the reason once a deadline passes in the phase it was set for.
    async fn expired(&self) -> ResetReason {
        // Any phase entered from now on has a deadline no earlier than this.
        let horizon = self.header_timeout.min(self.idle_timeout);
        let soonest = Instant::now() + horizon;
        let first = self.deadline().map_or(soonest, |(at, _)| at.min(soonest));
        let timer = tokio::time::sleep_until(first);
        tokio::pin!(timer);
        loop {
            timer.as_mut().await;
            let now = Instant::now();
            let next = match self.deadline() {
                Some((at, reason)) if at <= now => return reason,
                Some((at, _)) => at.min(now + horizon),
                None => now + horizon,
            };
            timer.as_mut().reset(next);
        }
    }
}

/// The client socket as hyper sees it. Resets on drop unless an orderly close
/// was chosen, so every path nobody thought about ends in RST, never in a FIN
/// that would leave TIME_WAIT behind.
pub struct ClientIo {
    stream: ClientStream,
    state: Arc<ConnState>,
    scan: HeadScan,
    reset_on_drop: bool,
}

impl ClientIo {
    fn tcp(&self) -> Option<&TcpStream> {
        match &self.stream {
            ClientStream::Tcp(s) => Some(s),
            ClientStream::Unix(_) => None,
        }
    }

    fn peer_closed(&self) -> bool {
        match &self.stream {
            ClientStream::Tcp(s) => sock::peer_state(s) == sock::PeerState::Closed,
            ClientStream::Unix(s) => sock::peer_state(s) == sock::PeerState::Closed,
        }
    }

    fn send_fin(&self) -> io::Result<()> {
        match &self.stream {
            ClientStream::Tcp(s) => sock::send_fin(s),
            ClientStream::Unix(s) => sock::send_fin(s),
        }
    }

    /// Reads and discards until the client's FIN, for at most `grace`.
    async fn await_peer_fin(&mut self, grace: Duration) -> bool {
        // Whatever a closing client still sends is discarded: a small buffer does.
        let mut scratch = [0u8; 512];
        let wait = async {
            loop {
                match self.read(&mut scratch).await {
                    Ok(0) => return true,
                    Ok(_) => continue,
                    Err(_) => return false,
                }
            }
        };
        tokio::time::timeout(grace, wait).await.unwrap_or(false)
    }

    /// Waits until the client has acknowledged every byte sent, for at most `grace`.
    async fn await_acknowledged(&self, grace: Duration) {
        let Some(tcp) = self.tcp() else { return };
        let deadline = Instant::now() + grace;
        let mut pause = Duration::from_micros(200);
        while Instant::now() < deadline {
            match sock::unacknowledged_bytes(tcp) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
            }
        }
    }

    fn close_orderly(mut self) -> Ending {
        self.reset_on_drop = false;
        Ending::Closed
    }

    fn reset(self, why: ResetReason) -> Ending {
        // Drop does the reset.
        drop(self);
        Ending::Reset(why)
    }
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        if self.reset_on_drop {
            if let ClientStream::Tcp(s) = &self.stream {
                sock::reset_on_close(s);
            }
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = match &mut self.stream {
            ClientStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        };
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.clock.bytes_arrived();
            let this = &mut *self;
            if this.state.rescan.swap(false, Ordering::Relaxed) {
                this.scan.active = true;
            }
            if this.scan.feed(&buf.filled()[before..]) == Some(true) {
                this.state.ambiguous_framing.store(true, Ordering::Relaxed);
            }
        }
        polled
    }
}

impl ClientIo {
    /// The last bytes of a connection's last response are being written: they
    /// go with MSG_MORE, so they leave with the FIN that the flush will send.
    fn writing_last_response(&self) -> bool {
        self.state.fin_ready.load(Ordering::Relaxed)
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let (ClientStream::Tcp(s), true) = (&self.stream, self.writing_last_response()) {
            return sock::poll_send_more(s, cx, &[io::IoSlice::new(buf)]);
        }
        match &mut self.stream {
            ClientStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let (ClientStream::Tcp(s), true) = (&self.stream, self.writing_last_response()) {
            return sock::poll_send_more(s, cx, bufs);
        }
        match &mut self.stream {
            ClientStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientStream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// hyper flushes once its buffer is written out; after the last response of
    /// a gracefully closed connection, that is where the FIN goes.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = match &mut self.stream {
            ClientStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Unix(s) => Pin::new(s).poll_flush(cx),
        };
        if matches!(flushed, Poll::Ready(Ok(())))
            && self.state.fin_ready.swap(false, Ordering::Relaxed)
            && self.send_fin().is_ok()
        {
            self.state.fin_sent.store(true, Ordering::Relaxed);
        }
        flushed
    }

    /// Never called by the serving path (it uses `poll_without_shutdown`); kept
    /// inert so nothing can send a FIN behind the close policy's back.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

enum Served {
    Finished(hyper::Result<()>),
    TimedOut(ResetReason),
    Forced,
}

/// Serves one client connection to its end, then closes it by the listener's
/// policy. Returns how it ended.
pub async fn serve(
    stream: ClientStream,
    client: Option<SocketAddr>,
    binding: Arc<Binding>,
    shutdown: Shutdown,
) -> Ending {
    let listener = &binding.listener;
    // The connection's own tokens: polling them (on every wake-up of this task,
    // and once per request) touches only this connection's lock, not the
    // process-wide tokens every connection on every worker shares.
    let drain = shutdown.drain.child_token();
    let force = shutdown.force.child_token();
    let state = Arc::new(ConnState::new(
        listener.header_timeout,
        listener.idle_timeout,
        drain.clone(),
    ));
    let io = ClientIo {
        stream,
        state: state.clone(),
        scan: HeadScan::new(listener.max_header_bytes.as_usize()),
        reset_on_drop: true,
    };
    let service = ProxyService::new(binding.clone(), state.clone(), client);
    let max_head = listener.max_header_bytes.as_usize();
    let mut conn = hyper::server::conn::http1::Builder::new()
        .half_close(true)
        .header_read_timeout(None)
        .max_header_size(max_head)
        .max_buf_size(max_head.max(8192 + 1) * 2)
        .serve_connection(TokioIo::new(io), service);

    let expired = state.clock.expired();
    tokio::pin!(expired);
    let mut draining = false;
    let served = loop {
        tokio::select! {
            result = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => {
                break Served::Finished(result);
            }
            reason = &mut expired => break Served::TimedOut(reason),
            _ = force.cancelled() => break Served::Forced,
            _ = drain.cancelled(), if !draining => draining = true,
        }
        // Idle connections end now; a busy one ends after its response, which
        // carries `Connection: close`.
        Pin::new(&mut conn).graceful_shutdown();
    };
    let parts = conn.into_parts();
    let io = parts.io.into_inner();
    drop(parts.service);
    let ending = match served {
        Served::Finished(Ok(())) => {
            if state.misbehaved.load(Ordering::Relaxed) {
                linger_then_reset(io, listener.close_grace).await
            } else {
                close_by_policy(io, listener.client_close, listener.close_grace).await
            }
        }
        Served::Finished(Err(e)) => {
            if e.is_parse() || e.is_parse_too_large() || e.is_parse_status() {
                // hyper has answered with a 4xx (and Connection: close).
                tracing::info!(listener = %listener.name, ?client, error = %e, "malformed request refused");
                let status = if e.is_parse_too_large() {
                    http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
                } else {
                    http::StatusCode::BAD_REQUEST
                };
                binding.record(status, Some("malformed-request"), None);
                linger_then_reset(io, listener.close_grace).await
            } else {
                tracing::debug!(listener = %listener.name, ?client, error = %e, "client connection failed");
                io.reset(ResetReason::ConnectionError)
            }
        }
        Served::TimedOut(reason) => {
            tracing::debug!(listener = %listener.name, ?client, reason = reason.label(), "client connection timed out");
            io.reset(reason)
        }
        Served::Forced => io.reset(ResetReason::DrainDeadline),
    };
    tracing::debug!(listener = %listener.name, ?client, ?ending, "client connection ended");
    let how = ending.label();
    binding
        .metrics
        .client_closed
        .get_or_create(&ReasonLabels {
            listener: binding.label.clone(),
            reason: Name::from(how),
        })
        .inc();
    ending
}

/// Ends a connection whose last exchange said `Connection: close`.
async fn close_by_policy(mut io: ClientIo, policy: ClientClose, grace: Duration) -> Ending {
    if policy != ClientClose::Abort
        && !io.state.fin_sent.load(Ordering::Relaxed)
        && io.peer_closed()
    {
        // The client closed first: closing now is the passive close.
        return io.close_orderly();
    }
    match policy {
        ClientClose::Graceful => {
            if !io.state.fin_sent.load(Ordering::Relaxed) && io.send_fin().is_err() {
                return io.reset(ResetReason::FinFailed);
            }
            if io.await_peer_fin(grace).await {
                io.close_orderly()
            } else {
                io.reset(ResetReason::CloseGrace)
            }
        }
        ClientClose::ClientFirst => {
            if io.await_peer_fin(grace).await {
                io.close_orderly()
            } else {
                io.reset(ResetReason::CloseGrace)
            }
        }
        ClientClose::Abort => {
            io.await_acknowledged(grace).await;
            io.reset(ResetReason::CloseAbort)
        }
    }
}

/// A misbehaving client: no FIN from tether; its own FIN within `grace` gets
/// the passive close, otherwise RST.
async fn linger_then_reset(mut io: ClientIo, grace: Duration) -> Ending {
    if io.await_peer_fin(grace).await {
        io.close_orderly()
    } else {
        io.reset(ResetReason::Misbehaved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_scan_flags_both_lengths_across_reads() {
        let mut scan = HeadScan::new(1024);
        assert_eq!(
            scan.feed(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTrans"),
            None
        );
        assert_eq!(
            scan.feed(b"fer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            Some(true)
        );
        let mut scan = HeadScan::new(1024);
        assert_eq!(
            scan.feed(b"\r\nPOST / HTTP/1.1\nContent-Length: 3\n\nabc"),
            Some(false)
        );
        let mut scan = HeadScan::new(16);
        assert_eq!(scan.feed(b"GET / HTTP/1.1\r\nX: aaaaaaaaaa"), Some(false));
    }
}
