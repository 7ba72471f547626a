//! One pooled HTTP/1.1 upstream connection: its IO (the shared socket, or
//! the TLS session over it), the exchanges it carries (`exchange`, run by
//! the task of the request that holds it), what the backend announced
//! about it (`Keep-Alive`, `Connection: close`), and how it ends (RST, FIN,
//! or waiting for the backend's FIN).

use std::future::poll_fn;

use bytes::BytesMut;
use http::Method;
use tokio::time::Instant;

use super::body::UpstreamBody;
use super::exchange::{self, HeadFacts, ResponseStart, WriteFailure, Written};
use super::io::{UpstreamIo, Wire};
use super::lease::{SendError, SendFailure, Slot};
use super::request::UpstreamRequest;
use super::retire::{close_manner, Close};
use super::view::{ConnRecord, Ending};
use crate::config::{Retire, RetirePolicy, RetireReason};
use crate::sock::PeerState;

/// What an exchange's buffer starts with: room for a request head and
/// the response head with the start of its body.
const EXCHANGE_BUFFER: usize = 16 * 1024;

/// A live upstream connection owned by the pool (idle), by a [`Lease`]
/// (busy), or, while its response body is read, by that body.
///
/// Boxed once, when it is dialled: it passes from the idle list to a lease,
/// to a response body and back on every request, and each of those moves
/// then copies a pointer, not its state.
///
/// [`Lease`]: super::Lease
pub(crate) struct Conn(Box<ConnState>);

impl std::ops::Deref for Conn {
    type Target = ConnState;

    fn deref(&self) -> &ConnState {
        &self.0
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut ConnState {
        &mut self.0
    }
}

/// What a [`Conn`] is.
pub(crate) struct ConnState {
    io: UpstreamIo,
    wire: Wire,
    /// The largest response head it reads (`max_response_header_bytes`).
    max_head: usize,
    /// An exchange on it failed, or left it in a state no next request can
    /// start from: it must not be reused.
    broken: bool,
    expires: Instant,
    /// Requests sent on it.
    requests: u64,
    /// What the backend announced in `Keep-Alive: timeout=N, max=M`.
    announced: KeepAliveHint,
    /// An exchange said `Connection: close`: never pool it again.
    closing: bool,
    /// Retiring peer-first: its next request says `Connection: close`.
    goodbye: bool,
    /// What `/pools` shows of it.
    record: std::sync::Arc<ConnRecord>,
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

/// How long a connection whose last exchange said `Connection: close` waits
/// for the backend's FIN (so that tether's close is the passive one) before
/// it is reset.
const PEER_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl Conn {
    /// A connection over `io` (whose socket `wire` holds too): it holds
    /// `slot` as an established connection, and reads response heads of up
    /// to `max_head` bytes.
    pub(crate) fn new(
        io: UpstreamIo,
        wire: Wire,
        max_head: usize,
        expires: Instant,
        mut slot: Slot,
        record: std::sync::Arc<ConnRecord>,
    ) -> Self {
        slot.established();
        Self(Box::new(ConnState {
            record,
            io,
            wire,
            max_head,
            broken: false,
            expires,
            requests: 0,
            announced: KeepAliveHint::default(),
            closing: false,
            goodbye: false,
            _slot: slot,
        }))
    }

    /// What `/pools` shows of it.
    pub(crate) fn record(&self) -> &ConnRecord {
        &self.record
    }

    /// Whether no exchange on it failed. Costs no syscall; a FIN or RST that
    /// arrived while it was idle goes unnoticed (see [`Self::is_usable`]).
    pub(crate) fn is_open(&self) -> bool {
        !self.broken
    }

    /// Whether something arrived on the socket since it was last read dry,
    /// as far as the runtime has seen (no syscall); otherwise `watch` is
    /// woken when something does.
    pub(crate) fn arrived(&self, watch: &std::task::Waker) -> bool {
        self.wire
            .poll_arrival(&mut std::task::Context::from_waker(watch))
    }

    /// Marks it unusable for another request.
    pub(crate) fn mark_broken(&mut self) {
        self.broken = true;
    }

    /// Whether an idle connection can carry another request: no exchange on
    /// it failed and nothing arrived on it unasked (no FIN, no stray bytes,
    /// no RST).
    pub(crate) fn is_usable(&self) -> bool {
        self.is_open() && self.wire.peer_state() == PeerState::Quiet
    }

    /// When it outlives its (jittered) `max_lifetime`, its client
    /// certificate, or (once replaced) the TLS material it was made with.
    pub(crate) fn expires(&self) -> Instant {
        match self.wire.rollover_at(self.record.id()) {
            Some(at) => at.min(self.expires),
            None => self.expires,
        }
    }

    /// The idle timeout the backend announced on this connection
    /// (`Keep-Alive: timeout=N`), if it did.
    pub(crate) fn announced_idle(&self) -> Option<std::time::Duration> {
        self.announced.timeout
    }

    /// How the backend closed it, if it did: `peer-first` after its FIN,
    /// `RST` after its reset. A peek: for a connection being discarded.
    pub(crate) fn closed_by_backend(&self) -> Option<&'static str> {
        match self.wire.peer_state() {
            PeerState::Closed => Some("peer-first"),
            PeerState::Failed => Some("RST"),
            PeerState::Quiet | PeerState::StrayBytes => None,
        }
    }

    /// The connection's id.
    pub(crate) fn id(&self) -> u64 {
        self.record.id()
    }

    /// Requests sent on it so far: after a send, that request's number.
    pub(crate) fn requests(&self) -> u64 {
        self.requests
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

    /// Writes `request` and reads its response head; the body is the
    /// returned reader's to read, over [`Self::io_mut`]. Counts the request,
    /// and makes it say `Connection: close` when it is the connection's last
    /// ([`Self::end_after_next_request`]). `Unsent` gives the request back
    /// when none of it reached the socket.
    pub(crate) async fn exchange(
        &mut self,
        mut request: UpstreamRequest,
    ) -> Result<ResponseStart, SendError> {
        if self.broken {
            return Err(SendError::Unsent(
                Box::new(request),
                Some(SendFailure::Closed),
            ));
        }
        let last = self.goodbye;
        let head_request = request.head.method() == Method::HEAD;
        let mut buf = BytesMut::with_capacity(EXCHANGE_BUFFER);
        let written = exchange::write_request(&mut self.io, &mut request, last, &mut buf).await;
        match written {
            Ok(Written::Whole) => {}
            // The rest of the body stays unsent: the connection is done.
            Ok(Written::AnsweredEarly) => self.broken = true,
            Err(WriteFailure::Unsent(e)) => {
                self.broken = true;
                return Err(SendError::Unsent(
                    Box::new(request),
                    Some(SendFailure::Io(e)),
                ));
            }
            Err(WriteFailure::Failed(e)) => {
                self.count_request(last);
                self.broken = true;
                return Err(SendError::Failed(e, Some(Box::new(request.head))));
            }
        }
        self.count_request(last);
        // The head is kept until the response's head arrives, so that a
        // retry can send it again without a copy made for every request.
        let UpstreamRequest { head, body } = request;
        drop(body);
        let max_head = self.max_head;
        match exchange::read_response(&mut self.io, buf, head_request, max_head).await {
            Ok(start) => {
                self.note_head(&start.facts);
                Ok(start)
            }
            Err(e) => {
                self.broken = true;
                Err(SendError::Failed(e, Some(Box::new(head))))
            }
        }
    }

    /// Counts a request that reached the socket; `last` when it said
    /// `Connection: close`.
    #[inline]
    fn count_request(&mut self, last: bool) {
        self.requests += 1;
        self.record.served(self.requests);
        self.closing |= last;
    }

    /// Sends a request of the pool's own (a probe) and reads its response
    /// to the end, discarding at most `body_limit` bytes of body. Such a
    /// request is never sent anywhere else, so a failure does not give it
    /// back. Returns the status.
    pub(crate) async fn probe(
        &mut self,
        request: http::Request<UpstreamBody>,
        body_limit: usize,
    ) -> Result<u16, super::BoxError> {
        let start = match self.exchange(request.into()).await {
            Ok(start) => start,
            Err(SendError::Unsent(_, e)) => {
                return Err(e.map_or_else(|| "connection closed".into(), Into::into))
            }
            Err(SendError::Failed(e, _)) => return Err(e.into()),
        };
        let status = start.head.status.as_u16();
        let mut reader = start.body;
        let mut read = 0usize;
        while let Some(frame) = poll_fn(|cx| reader.poll_frame(&mut self.io, cx)).await {
            let frame = frame.inspect_err(|_| self.broken = true)?;
            read += frame.data_ref().map_or(0, bytes::Bytes::len);
            if read > body_limit {
                self.broken = true;
                return Err("probe response body too large".into());
            }
        }
        self.body_ended(&reader);
        Ok(status)
    }

    /// Records what the response head said of the connection's future.
    fn note_head(&mut self, facts: &HeadFacts) {
        if facts.keep_alive.timeout.is_some() {
            self.announced.timeout = facts.keep_alive.timeout;
        }
        if facts.keep_alive.max.is_some() {
            self.announced.max = facts.keep_alive.max;
        }
        self.closing |= !facts.reusable;
    }

    /// The exchange's response body was read to its end (or its close):
    /// bytes after its end leave the connection unusable.
    pub(crate) fn body_ended(&mut self, reader: &exchange::BodyReader) {
        if !reader.ended_clean() {
            self.broken = true;
        }
    }

    /// The IO a response body is read from.
    pub(crate) fn io_mut(&mut self) -> &mut UpstreamIo {
        &mut self.io
    }

    /// The socket, for tests that check its options.
    #[cfg(test)]
    pub(crate) fn socket(&self) -> &tokio::net::TcpStream {
        self.wire.socket()
    }

    /// Bytes received so far on this connection.
    pub(crate) fn received(&self) -> u64 {
        self.io.received_bytes()
    }

    /// Closes the connection the way the retire policy for `reason` calls for.
    pub(crate) fn close(self, reason: RetireReason, policy: &RetirePolicy) {
        let policy = policy.for_reason(reason);
        // Only peer_first asks whether the backend closed already (a peek).
        let peer_closed =
            policy == Retire::PeerFirst && self.wire.peer_state() == PeerState::Closed;
        let manner = close_manner(policy, peer_closed);
        self.record.ended(match manner {
            Close::Fin => Ending::by_tether("FIN", reason),
            Close::Reset => Ending::by_tether("RST", reason),
            Close::Passive => Ending::by_backend("peer-first", reason.label()),
        });
        match manner {
            Close::Fin => {
                if let Err(e) = self.wire.send_fin() {
                    tracing::debug!(error = %e, "cannot half-close retired upstream connection");
                }
            }
            Close::Passive => {}
            Close::Reset => self.wire.reset(),
        }
        // The last handle to the socket closes it: its IO's and the wire's
        // go with the connection.
    }

    /// Resets a connection abandoned mid-exchange outside the pool's hands
    /// (its response body dropped holding it).
    pub(crate) fn abandon(self) {
        self.record
            .ended(Ending::by_tether("RST", RetireReason::Error));
        self.wire.reset();
    }

    /// Closes a connection whose last exchange said `Connection: close`: the
    /// backend closes it, so wait briefly for its FIN and close passively;
    /// reset if it does not come.
    pub(crate) fn close_after_peer(self) {
        tokio::spawn(async move {
            let waited = tokio::time::timeout(PEER_CLOSE_WAIT, async {
                loop {
                    if self.wire.socket().readable().await.is_err() {
                        return;
                    }
                    match self.wire.peer_state() {
                        PeerState::Quiet => tokio::task::yield_now().await,
                        _ => return,
                    }
                }
            })
            .await;
            // Its last request said goodbye only when retiring at its lifetime.
            let reason = if self.goodbye {
                RetireReason::Lifetime.label()
            } else {
                "backend-closed"
            };
            if waited.is_err() || self.wire.peer_state() != PeerState::Closed {
                self.wire.reset();
                self.record.ended(Ending {
                    closed_by: "tether",
                    how: "RST",
                    reason,
                });
            } else {
                self.record.ended(Ending::by_backend("peer-first", reason));
            }
        });
    }
}
