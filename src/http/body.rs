//! Body adapters between the two legs.
//!
//! [`UpstreamBody`] carries the client's request body upstream: up to
//! `request_buffer` bytes are read before anything is forwarded (so framing
//! errors in that part are answered with 400, never forwarded), and a body that
//! fits whole can be replayed for the one retry. [`ProxyBody`] carries the response back and owns
//! the upstream [`Lease`]: the connection returns to the pool only when the
//! response body has ended; if the body errors or is dropped early, the lease
//! discards the connection with RST.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::pool::Lease;

/// Errors a body adapter can yield.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The client's request body failed (bad framing, or the client went away).
    #[error("client request body: {0}")]
    Client(#[source] hyper::Error),
    /// The upstream's response body failed (reset, or closed mid-body).
    #[error("upstream response body: {0}")]
    Upstream(#[source] hyper::Error),
}

/// The request body as sent upstream.
pub struct UpstreamBody {
    buffered: VecDeque<Frame<Bytes>>,
    rest: Option<Incoming>,
    sent: Option<Arc<AtomicBool>>,
    client_failed: Arc<AtomicBool>,
}

impl UpstreamBody {
    /// Reads `body` until it ends or `limit` bytes are in memory, before anything
    /// is forwarded: framing errors in that part are the client's 400, and a body
    /// that fits whole can be replayed.
    pub async fn prefetch(mut body: Incoming, limit: usize) -> Result<Self, hyper::Error> {
        let mut buffered = VecDeque::new();
        let mut total = 0usize;
        while total < limit && !body.is_end_stream() {
            match body.frame().await {
                None => break,
                Some(frame) => {
                    let frame = frame?;
                    total += frame.data_ref().map_or(0, Bytes::len);
                    buffered.push_back(frame);
                }
            }
        }
        let rest = (!body.is_end_stream()).then_some(body);
        Ok(Self {
            buffered,
            rest,
            sent: None,
            client_failed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A body of fixed bytes (used for the replay of a buffered body).
    pub fn from_bytes(bytes: Option<Bytes>) -> Self {
        Self {
            buffered: bytes.map(Frame::data).into_iter().collect(),
            rest: None,
            sent: None,
            client_failed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The whole body, if it is all in memory (and so can be sent again).
    /// Trailers are not replayed, so a body with trailers is not replayable.
    pub fn replayable(&self) -> Option<Option<Bytes>> {
        if self.rest.is_some() {
            return None;
        }
        let mut whole = BytesMut::new();
        for frame in &self.buffered {
            whole.extend_from_slice(frame.data_ref()?);
        }
        Some((!whole.is_empty()).then(|| whole.freeze()))
    }

    /// Sets the flag raised once the body has been sent whole.
    pub fn notify_sent(&mut self, flag: Arc<AtomicBool>) {
        if self.buffered.is_empty() && self.rest.is_none() {
            flag.store(true, Ordering::Release);
        }
        self.sent = Some(flag);
    }

    /// Raised when the client's side of the body failed (as opposed to the upstream).
    pub fn client_failed_flag(&self) -> Arc<AtomicBool> {
        self.client_failed.clone()
    }

    fn mark_sent(&self) {
        if let Some(flag) = &self.sent {
            flag.store(true, Ordering::Release);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(frame) = self.buffered.pop_front() {
            if self.buffered.is_empty() && self.rest.is_none() {
                self.mark_sent();
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(rest) = self.rest.as_mut() else {
            self.mark_sent();
            return Poll::Ready(None);
        };
        match Pin::new(rest).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.rest = None;
                self.mark_sent();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if self.rest.as_ref().is_some_and(Body::is_end_stream) {
                    self.rest = None;
                    self.mark_sent();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.rest = None;
                self.client_failed.store(true, Ordering::Release);
                Poll::Ready(Some(Err(BodyError::Client(e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let end = self.buffered.is_empty() && self.rest.as_ref().is_none_or(Body::is_end_stream);
        if end {
            self.mark_sent();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        let first: u64 = self
            .buffered
            .iter()
            .filter_map(Frame::data_ref)
            .map(|d| d.len() as u64)
            .sum();
        match &self.rest {
            None => SizeHint::with_exact(first),
            Some(rest) => hint_plus(rest.size_hint(), first),
        }
    }
}

/// A body's size hint grown by `extra` bytes held in front of it.
fn hint_plus(hint: SizeHint, extra: u64) -> SizeHint {
    let mut total = SizeHint::new();
    total.set_lower(hint.lower() + extra);
    if let Some(upper) = hint.upper() {
        total.set_upper(upper + extra);
    }
    total
}

/// Told when the response body is done with.
pub trait ExchangeDone: Send + Sync {
    /// The exchange is over. `complete` is true only when every byte of the
    /// body was handed to the connection; false when it was abandoned or failed.
    fn exchange_done(&self, complete: bool);
}

/// The response body as sent to the client.
pub struct ProxyBody {
    kind: Kind,
    done: Option<Arc<dyn ExchangeDone>>,
    /// Every frame has been yielded and the body ended cleanly.
    finished: bool,
}

// One per exchange, never moved in bulk: boxing the upstream variant would
// cost an allocation per response to save bytes nobody copies.
#[allow(clippy::large_enum_variant)]
enum Kind {
    Full(Option<Bytes>),
    Upstream {
        prefix: Option<Bytes>,
        body: Incoming,
        lease: Option<Lease>,
    },
}

impl ProxyBody {
    /// A complete body held in memory.
    pub fn full(bytes: Bytes) -> Self {
        let kind = Kind::Full((!bytes.is_empty()).then_some(bytes));
        Self {
            finished: matches!(kind, Kind::Full(None)),
            kind,
            done: None,
        }
    }

    /// An upstream body streamed through, after `prefix` (already read from it).
    pub fn upstream(prefix: Option<Bytes>, body: Incoming, lease: Lease) -> Self {
        Self {
            finished: prefix.is_none() && body.is_end_stream(),
            kind: Kind::Upstream {
                prefix,
                body,
                lease: Some(lease),
            },
            done: None,
        }
    }

    /// Registers who to tell when the body is finished with.
    pub fn on_done(mut self, done: Arc<dyn ExchangeDone>) -> Self {
        self.done = Some(done);
        self
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match &mut this.kind {
            Kind::Full(bytes) => {
                this.finished = true;
                Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b))))
            }
            Kind::Upstream {
                prefix,
                body,
                lease,
            } => {
                if let Some(bytes) = prefix.take() {
                    this.finished = body.is_end_stream();
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(None) => {
                        this.finished = true;
                        if let Some(lease) = lease.take() {
                            lease.release();
                        }
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        if body.is_end_stream() {
                            this.finished = true;
                            if let Some(lease) = lease.take() {
                                lease.release();
                            }
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(Some(Err(e))) => {
                        // Dropping the lease resets the upstream connection.
                        lease.take();
                        Poll::Ready(Some(Err(BodyError::Upstream(e))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream { prefix, body, .. } => prefix.is_none() && body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream { prefix, body, .. } => hint_plus(
                body.size_hint(),
                prefix.as_ref().map_or(0, |p| p.len() as u64),
            ),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Kind::Upstream {
            prefix: None,
            body,
            lease,
        } = &mut self.kind
        {
            // Bodiless responses (HEAD, 204, 304, length 0) are never polled.
            if body.is_end_stream() {
                if let Some(lease) = lease.take() {
                    lease.release();
                }
            }
        }
        if let Some(done) = self.done.take() {
            done.exchange_done(self.finished);
        }
    }
}
