//! The bodies a pooled connection carries: [`UpstreamBody`], the request body
//! sent upstream, and [`ResponseBody`], the response body handed back.
//!
//! Both belong to the pool, so the layers above use the pool's types, not the
//! HTTP client's: `ResponseBody` wraps hyper's `Incoming`, and another HTTP/1
//! implementation can hand out the same type. It polls straight through, with
//! no allocation per frame. The client's side of a request body is a
//! [`ClientBody`]: the pool sits below the client leg that reads it, so it
//! knows that body only as a boxed [`Body`].

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::exchange::BodyReader;
use super::h1::Conn;

/// What a body's `poll_frame` returns, for every body on the request path.
pub type FramePoll = Poll<Option<Result<Frame<Bytes>, BodyError>>>;

/// The rest of a client's request body that did not fit in memory, as the
/// client leg reads it from the client's socket. Boxed once per request that
/// streams, never per frame.
pub type ClientBody = Pin<Box<dyn Body<Data = Bytes, Error = BodyError> + Send>>;

/// What a body's failure carries: the error of whichever HTTP implementation
/// read it (hyper's, or tether's own HTTP/1 codec's).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Errors a body on a pooled connection can yield.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The client's request body failed (bad framing, or the client went away).
    #[error("client request body: {0}")]
    Client(#[source] BoxError),
    /// The upstream's response body failed (reset, or closed mid-body).
    #[error("upstream response body: {0}")]
    Upstream(#[source] BoxError),
}

/// The request body as sent upstream: frames already in memory, then, when the
/// body did not fit in them, the rest streamed from the client.
///
/// It raises its [`client_failed_flag`](UpstreamBody::client_failed_flag)
/// when the client's side of the body failed.
pub struct UpstreamBody {
    buffered: VecDeque<Frame<Bytes>>,
    rest: Option<ClientBody>,
    client_failed: Arc<AtomicBool>,
    /// Counts the body's bytes for the access log, when it is on.
    counted: Option<Arc<AtomicU64>>,
}

impl UpstreamBody {
    /// A body made of `buffered` (already read from the client), followed by
    /// `rest` when the client's body has not ended yet.
    #[inline]
    pub fn new(buffered: VecDeque<Frame<Bytes>>, rest: Option<ClientBody>) -> Self {
        Self {
            buffered,
            rest,
            client_failed: Arc::new(AtomicBool::new(false)),
            counted: None,
        }
    }

    /// Adds the body's bytes to `counter`: those in memory now, the streamed
    /// rest as it passes.
    pub fn count_into(&mut self, counter: Arc<AtomicU64>) {
        let buffered: u64 = self
            .buffered
            .iter()
            .filter_map(Frame::data_ref)
            .map(|d| d.len() as u64)
            .sum();
        counter.fetch_add(buffered, Ordering::Relaxed);
        self.counted = Some(counter);
    }

    /// A body of fixed bytes (used for the replay of a buffered body).
    #[inline]
    pub fn from_bytes(bytes: Option<Bytes>) -> Self {
        Self::new(bytes.map(Frame::data).into_iter().collect(), None)
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

    /// The first frame's data, when it is in memory: what a send writes with
    /// the head, before taking it off with [`Self::drop_front`].
    pub(crate) fn front_data(&self) -> Option<&Bytes> {
        self.buffered.front().and_then(Frame::data_ref)
    }

    /// Takes off the first frame, written with the head.
    pub(crate) fn drop_front(&mut self) {
        self.buffered.pop_front();
    }

    /// Raised when the client's side of the body failed (as opposed to the upstream).
    pub fn client_failed_flag(&self) -> Arc<AtomicBool> {
        self.client_failed.clone()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> FramePoll {
        if let Some(frame) = self.buffered.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(rest) = self.rest.as_mut() else {
            return Poll::Ready(None);
        };
        match rest.as_mut().poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.rest = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(counter), Some(data)) = (&self.counted, frame.data_ref()) {
                    counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                if self.rest.as_ref().is_some_and(Body::is_end_stream) {
                    self.rest = None;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.rest = None;
                self.client_failed.store(true, Ordering::Release);
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_empty() && self.rest.as_ref().is_none_or(Body::is_end_stream)
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
pub(crate) fn hint_plus(hint: SizeHint, extra: u64) -> SizeHint {
    let mut total = SizeHint::new();
    total.set_lower(hint.lower() + extra);
    if let Some(upper) = hint.upper() {
        total.set_upper(upper + extra);
    }
    total
}

/// The response body of an exchange on a pooled connection, as the pool hands
/// it out. Its failures are [`BodyError::Upstream`].
///
/// An HTTP/1.1 body holds its connection while it is read (the request's
/// task reads it from the socket itself). Whoever holds the
/// [`Lease`](super::Lease) gives the body to [`Lease::release`] once it has
/// ended, or to [`Lease::take_back`] before dropping the lease, which
/// discards the connection; a body dropped still holding its connection
/// resets it.
///
/// [`Lease::release`]: super::Lease::release
/// [`Lease::take_back`]: super::Lease::take_back
pub struct ResponseBody {
    inner: Inner,
}

// One per exchange, never moved in bulk: boxing the exchange would cost an
// allocation per response.
#[allow(clippy::large_enum_variant)]
enum Inner {
    /// An HTTP/2 stream's body, as hyper receives it.
    Stream(Incoming),
    /// An HTTP/1.1 body, read from its connection by its reader.
    Exchange {
        conn: Option<Conn>,
        reader: BodyReader,
    },
    /// Nothing.
    Empty,
}

impl ResponseBody {
    /// Wraps the body hyper received on an HTTP/2 stream.
    #[inline]
    pub(crate) fn stream(inner: Incoming) -> Self {
        Self {
            inner: Inner::Stream(inner),
        }
    }

    /// The body `reader` reads from `conn`.
    #[inline]
    pub(crate) fn exchange(conn: Conn, reader: BodyReader) -> Self {
        Self {
            inner: Inner::Exchange {
                conn: Some(conn),
                reader,
            },
        }
    }

    /// No body.
    pub(crate) fn empty() -> Self {
        Self {
            inner: Inner::Empty,
        }
    }

    /// The connection the body was read from, taken back.
    pub(crate) fn take_conn(&mut self) -> Option<Conn> {
        match &mut self.inner {
            Inner::Exchange { conn, .. } => conn.take(),
            Inner::Stream(_) | Inner::Empty => None,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    #[inline]
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> FramePoll {
        let (conn, reader) = match &mut self.inner {
            Inner::Stream(inner) => {
                return Pin::new(inner)
                    .poll_frame(cx)
                    .map_err(|e| BodyError::Upstream(e.into()))
            }
            Inner::Empty => return Poll::Ready(None),
            Inner::Exchange { conn, reader } => (conn, reader),
        };
        let Some(conn) = conn.as_mut() else {
            return Poll::Ready(None);
        };
        match reader.poll_frame(conn.io_mut(), cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Err(e))) => {
                conn.mark_broken();
                Poll::Ready(Some(Err(BodyError::Upstream(e.into()))))
            }
            Poll::Ready(None) => {
                conn.body_ended(reader);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if reader.is_done() {
                    conn.body_ended(reader);
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Stream(inner) => inner.is_end_stream(),
            Inner::Exchange { reader, .. } => reader.is_done(),
            Inner::Empty => true,
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Stream(inner) => inner.size_hint(),
            Inner::Exchange { reader, .. } => reader
                .remaining()
                .map_or_else(SizeHint::default, SizeHint::with_exact),
            Inner::Empty => SizeHint::with_exact(0),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Every path that gives the connection back takes it first; one
        // still here was abandoned mid-body, and is reset, never closed
        // with a FIN that would leave TIME_WAIT.
        if let Some(conn) = self.take_conn() {
            conn.abandon();
        }
    }
}
