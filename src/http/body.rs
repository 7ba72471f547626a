//! Body adapters between the two legs.
//!
//! [`prefetch`] reads up to `request_buffer` bytes of the client's request body
//! before anything is forwarded, so framing errors in that part are answered
//! with 400, never forwarded, and a body that fits whole can be replayed for
//! the one retry; what it read becomes the pool's [`UpstreamBody`].
//! [`ProxyBody`] carries the pool's [`ResponseBody`] back and owns the upstream
//! [`Lease`]: the connection returns to the pool only when the response body
//! has ended; if the body errors or is dropped early, the lease discards the
//! connection (with RST unless `pool.retire.error` is `graceful`).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use tokio::time::Instant;

use crate::accesslog::{ms, AccessRecord};
pub use crate::pool::BodyError;
use crate::pool::{hint_plus, Lease, ResponseBody, UpstreamBody};

/// Reads the client's request `body` until it ends or `limit` bytes are in
/// memory, before anything is forwarded: framing errors in that part are the
/// client's 400, and a body that fits whole can be replayed. What is left of
/// a longer body is boxed for the pool, which streams it.
pub async fn prefetch<B>(mut body: B, limit: usize) -> Result<UpstreamBody, BodyError>
where
    B: Body<Data = Bytes, Error = BodyError> + Send + Unpin + 'static,
{
    let mut buffered = VecDeque::new();
    let mut total = 0usize;
    // A chunked body says it has ended only by yielding nothing more:
    // `is_end_stream` stays false after its last frame.
    let mut ended = body.is_end_stream();
    while total < limit && !ended {
        match body.frame().await {
            None => ended = true,
            Some(frame) => {
                let frame = frame?;
                total += frame.data_ref().map_or(0, Bytes::len);
                buffered.push_back(frame);
                ended = body.is_end_stream();
            }
        }
    }
    let rest = (!ended).then(|| Box::pin(body) as crate::pool::ClientBody);
    Ok(UpstreamBody::new(buffered, rest))
}

/// Takes an exchange's access-log line once its response body is done with.
pub trait ExchangeDone: Send + Sync {
    /// The exchange's access-log line is complete (the access log is on).
    fn exchange_logged(&self, record: Box<AccessRecord>);
}

/// An access-log line being filled while its response body is sent: the
/// bytes counted, the total time taken when the body is done with.
struct Pending {
    record: Box<AccessRecord>,
    started: Instant,
    bytes_in: Arc<std::sync::atomic::AtomicU64>,
    /// Who writes the line.
    done: Arc<dyn ExchangeDone>,
}

/// The response body as sent to the client.
pub struct ProxyBody {
    kind: Kind,
    /// The access-log line, when the log is on.
    log: Option<Box<Pending>>,
}

enum Kind {
    Full(Option<Bytes>),
    /// Boxed: the response moves by value through every layer between the
    /// pool and the client's writer, some ten copies per request; inline,
    /// each copied 312 bytes, where an allocation costs less than two.
    Upstream(Box<Upstream>),
}

/// An upstream body streaming through.
struct Upstream {
    /// Bytes already read from it, handed over first.
    prefix: Option<Bytes>,
    body: ResponseBody,
    /// Released when the body ends cleanly, dropped (discarding the
    /// connection) when it does not.
    lease: Option<Lease>,
}

impl ProxyBody {
    /// A complete body held in memory.
    pub fn full(bytes: Bytes) -> Self {
        let kind = Kind::Full((!bytes.is_empty()).then_some(bytes));
        Self { kind, log: None }
    }

    /// An upstream body streamed through, after `prefix` (already read from it).
    pub fn upstream(prefix: Option<Bytes>, body: ResponseBody, lease: Lease) -> Self {
        Self {
            kind: Kind::Upstream(Box::new(Upstream {
                prefix,
                body,
                lease: Some(lease),
            })),
            log: None,
        }
    }

    /// Carries the exchange's access-log line: the body counts its bytes and
    /// times its end, and hands the line to `done` when it is done with.
    /// `bytes_in` counts the request body.
    pub fn logged(
        mut self,
        done: Arc<dyn ExchangeDone>,
        record: Box<AccessRecord>,
        started: Instant,
        bytes_in: Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        self.log = Some(Box::new(Pending {
            record,
            started,
            bytes_in,
            done,
        }));
        self
    }

    /// Counts response bytes handed over, for the access log.
    #[inline]
    fn count(&mut self, frame: &Option<Result<Frame<Bytes>, BodyError>>) {
        if let (Some(log), Some(Ok(frame))) = (self.log.as_mut(), frame) {
            if let Some(data) = frame.data_ref() {
                log.record.bytes_out += data.len() as u64;
            }
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = self.as_mut().poll_inner(cx);
        if let Poll::Ready(frame) = &polled {
            self.count(frame);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream(up) => up.prefix.is_none() && up.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(up) => hint_plus(
                up.body.size_hint(),
                up.prefix.as_ref().map_or(0, |p| p.len() as u64),
            ),
        }
    }
}

impl ProxyBody {
    /// The next frame, releasing or discarding the lease as the body ends.
    fn poll_inner(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match &mut this.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(up) => {
                let Upstream {
                    prefix,
                    body,
                    lease,
                } = &mut **up;
                if let Some(bytes) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Some(Err(e))) => {
                        // Dropping the lease discards the upstream connection.
                        if let Some(mut lease) = lease.take() {
                            lease.take_back(body);
                        }
                        Poll::Ready(Some(Err(e)))
                    }
                    Poll::Ready(frame) => {
                        // Ended, with its last frame or after it: the
                        // connection can serve another request.
                        if frame.is_none() || body.is_end_stream() {
                            if let Some(lease) = lease.take() {
                                lease.release(body);
                            }
                        }
                        Poll::Ready(frame)
                    }
                }
            }
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Kind::Upstream(up) = &mut self.kind {
            let Upstream {
                prefix,
                body,
                lease,
            } = &mut **up;
            if let Some(mut lease) = lease.take() {
                // Bodiless responses (HEAD, 204, 304, length 0) are never
                // polled; any other body not read to its end discards the
                // connection with the lease.
                if prefix.is_none() && body.is_end_stream() {
                    lease.release(body);
                } else {
                    lease.take_back(body);
                }
            }
        }
        if let Some(log) = self.log.take() {
            let Pending {
                mut record,
                started,
                bytes_in,
                done,
            } = *log;
            record.total_ms = ms(started.elapsed());
            record.bytes_in = bytes_in.load(std::sync::atomic::Ordering::Relaxed);
            done.exchange_logged(record);
        }
    }
}
