//! HTTP/2 upstream connections: one connection carries many streams, so a
//! request borrows a stream ([`H2Stream`]) rather than the connection.
//!
//! A connection takes new streams while it has room under the peer's
//! `SETTINGS_MAX_CONCURRENT_STREAMS`; only when every connection of an endpoint
//! is full (or draining after a GOAWAY) is another one dialled. hyper sends
//! PING every `keepalive.ping_interval` and closes a connection whose PING goes
//! unanswered for `keepalive.ping_timeout`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;

use super::body::UpstreamBody;
use super::endpoint::Endpoint;
use super::io::{UpstreamIo, Wire};
use super::lease::{sent, SendError, Slot};
use super::request::{OutboundHead, UpstreamRequest};
use super::view::ConnRecord;
use super::PoolError;
use crate::config::UpstreamConfig;

/// One HTTP/2 connection to an endpoint.
pub(crate) struct H2Conn {
    sender: SendRequest<UpstreamBody>,
    /// The peer's current SETTINGS_MAX_CONCURRENT_STREAMS.
    max_streams: Arc<AtomicUsize>,
    wire: Wire,
    in_flight: AtomicUsize,
    streams: AtomicU64,
    expires: Instant,
    /// No new streams: the peer sent GOAWAY, or the connection is retiring.
    draining: AtomicBool,
    last_active: Mutex<Instant>,
    /// What `/pools` shows of it.
    record: Arc<ConnRecord>,
    _slot: Slot,
}

/// Runs the HTTP/2 handshake (prior knowledge) over `io` with PINGs every
/// `keepalive.ping_interval`: the sender, the connection future hyper needs
/// driven, and the peer's SETTINGS_MAX_CONCURRENT_STREAMS as that future sees it.
pub(crate) async fn handshake(
    settings: &UpstreamConfig,
    addr: SocketAddr,
    io: UpstreamIo,
) -> Result<
    (
        SendRequest<UpstreamBody>,
        impl Future<Output = Result<(), hyper::Error>> + Send + 'static,
        Arc<AtomicUsize>,
    ),
    PoolError,
> {
    let (sender, mut connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(settings.keepalive.ping_interval)
        .keep_alive_timeout(settings.keepalive.ping_timeout)
        .keep_alive_while_idle(true)
        // Until the peer's SETTINGS arrive, assume it takes what we send;
        // h2 queues streams beyond the limit once it is known.
        .initial_max_send_streams(usize::MAX)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|source| PoolError::Handshake { addr, source })?;
    // hyper exposes the peer's SETTINGS_MAX_CONCURRENT_STREAMS on the
    // connection future only; read it after each poll (SETTINGS frames are
    // processed there) and share it with the pool.
    let max_streams = Arc::new(AtomicUsize::new(usize::MAX));
    let seen_max = max_streams.clone();
    let driven = std::future::poll_fn(move |cx| {
        let polled = std::pin::Pin::new(&mut connection).poll(cx);
        seen_max.store(connection.current_max_send_streams(), Ordering::Relaxed);
        polled
    });
    Ok((sender, driven, max_streams))
}

impl H2Conn {
    /// A connection over `socket` whose handshake gave `sender`: it holds
    /// `slot` as an established connection.
    pub(crate) fn new(
        sender: SendRequest<UpstreamBody>,
        wire: Wire,
        max_streams: Arc<AtomicUsize>,
        expires: Instant,
        mut slot: Slot,
        record: Arc<ConnRecord>,
    ) -> Arc<Self> {
        slot.established();
        Arc::new(Self {
            record,
            sender,
            max_streams,
            wire,
            in_flight: AtomicUsize::new(0),
            streams: AtomicU64::new(0),
            expires,
            draining: AtomicBool::new(false),
            last_active: Mutex::new(Instant::now()),
            _slot: slot,
        })
    }

    /// What `/pools` and the connection log show of it.
    pub(crate) fn record(&self) -> &ConnRecord {
        &self.record
    }

    /// Whether hyper has closed it (peer gone, PING unanswered, GOAWAY done).
    pub(crate) fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Whether a new stream may be opened on it now.
    pub(crate) fn has_room(&self, now: Instant) -> bool {
        !self.draining.load(Ordering::Relaxed)
            && !self.is_closed()
            && now < self.expires()
            && self.in_flight.load(Ordering::Relaxed)
                < self.max_streams.load(Ordering::Relaxed).max(1)
    }

    /// Streams open now.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Stops new streams on it (the peer sent GOAWAY or it is being retired).
    pub(crate) fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// When it last had no stream open.
    pub(crate) fn idle_since(&self) -> Option<Instant> {
        (self.in_flight() == 0).then(|| *self.last_active.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// When it outlives its (jittered) `max_lifetime`, its client
    /// certificate, or (once replaced) the TLS material it was made with.
    pub(crate) fn expires(&self) -> Instant {
        match self.wire.rollover_at(self.record.id()) {
            Some(at) => at.min(self.expires),
            None => self.expires,
        }
    }

    /// Makes the eventual close a reset (called when it is dropped from the
    /// pool); on TLS, after a `close_notify`.
    pub(crate) fn reset_on_close(&self) {
        self.wire.reset();
    }

    /// Opens a stream on it.
    pub(crate) fn open_stream(self: &Arc<Self>, endpoint: Arc<Endpoint>) -> H2Stream {
        if self.in_flight.fetch_add(1, Ordering::Relaxed) == 0 {
            self.record.busy();
        }
        let streams = self.streams.fetch_add(1, Ordering::Relaxed);
        self.record.served(streams + 1);
        let reused = streams > 0;
        H2Stream {
            conn: self.clone(),
            endpoint,
            reused,
            number: streams + 1,
        }
    }
}

/// A stream borrowed from an [`H2Conn`] for one exchange.
pub(crate) struct H2Stream {
    conn: Arc<H2Conn>,
    endpoint: Arc<Endpoint>,
    pub(crate) reused: bool,
    /// Which stream of the connection this is, from 1.
    pub(crate) number: u64,
}

impl H2Stream {
    /// Sends the request on a new stream.
    pub(crate) async fn send(
        &self,
        request: UpstreamRequest,
    ) -> Result<super::UpstreamResponse, SendError> {
        let UpstreamRequest { head, body } = request;
        let parts = match head {
            OutboundHead::Parts(parts) => *parts,
            head @ OutboundHead::Http1(_) => {
                let request = UpstreamRequest { head, body };
                return Err(SendError::Unsent(
                    Box::new(request),
                    Some(super::SendFailure::Http1HeadOnHttp2),
                ));
            }
        };
        let mut sender = self.conn.sender.clone();
        sent(
            sender
                .try_send_request(http::Request::from_parts(parts, body))
                .await,
        )
    }

    /// The connection's id.
    pub(crate) fn connection_id(&self) -> u64 {
        self.conn.record.id()
    }

    /// The connection stops taking streams (after the peer refused this one).
    pub(crate) fn drain_connection(&self) {
        self.conn.drain();
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        // Dropping the response body resets the stream (RST_STREAM) if it had
        // not ended; the connection itself stays up for other streams.
        if self.conn.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            let now = Instant::now();
            *self
                .conn
                .last_active
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = now;
            self.conn.record.idle(now);
        }
        self.endpoint.available.notify_one();
    }
}

/// Whether an HTTP/2 failure means the peer never processed the request: it
/// refused the stream, or its GOAWAY covered it. Such a request may be sent
/// again whatever its method (RFC 9113 §8.7).
pub(crate) fn refused_by_peer(error: &super::SendFailure) -> bool {
    let super::SendFailure::Http2(error) = error else {
        return false;
    };
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote());
        }
        source = e.source();
    }
    false
}
