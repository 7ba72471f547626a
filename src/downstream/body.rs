//! The client's request body, read straight from the connection's socket by
//! whoever polls it: the proxy service reading it ahead, or the pool's
//! connection task streaming the rest upstream.
//!
//! The exchange lends its read buffer to the body ([`Inbound`], in the
//! connection's [`Wire`]): the bytes after the head are the body's start,
//! and the body reads more into the same buffer, handing out each run of
//! data as a slice of it (`Bytes`, no copy) and dropping chunked framing on
//! the way. What follows the body (a pipelined request) stays in the buffer,
//! which the exchange takes back when the body is done with. A body of an
//! earlier exchange still held somewhere reads nothing: each exchange's
//! body has its own generation.

use std::sync::Weak;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::io::{Socket, Wire};
use super::ClientError;
use crate::h1::{
    field_map, parse_trailers, BodyFramer, ChunkLimits, H1Error, Parsed, RequestFraming,
};
use crate::pool::{BodyError, FramePoll};

/// What the client is told before it sends a body it asked to announce.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
/// Bytes read at a time for a body whose length is unknown or large.
const BODY_READ: usize = 32 * 1024;
/// Below this much spare room, the buffer grows before a read.
const MIN_READ: usize = 1024;
/// Bytes of an unread body drained after the response to keep the
/// connection; beyond this, it ends.
const MAX_DRAIN: usize = 64 * 1024;

/// Where `Expect: 100-continue` stands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Continue {
    /// Not asked for, sent, or no longer needed.
    #[default]
    No,
    /// Asked for: sent when the body is first polled, unless the response
    /// or the body has begun.
    Wanted,
    /// Being written; so many bytes are out.
    Sending(usize),
}

/// One step of reading the body from the buffer.
enum Step {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
    /// The buffer holds no more of the body: read.
    More,
}

/// The state of the request body being read, shared by the exchange and the
/// body under the wire's lock.
#[derive(Debug, Default)]
pub(super) struct Inbound {
    /// Bytes read and not yet taken: the body's, and whatever follows it.
    buf: BytesMut,
    /// Where the body ends in the stream; [`BodyFramer::Done`] when there
    /// is nothing (more) to read.
    framer: BodyFramer,
    /// Which exchange's body may read.
    generation: u64,
    /// The body was dropped before its end.
    released: bool,
    /// The framing broke, or the client went: the rest cannot be found.
    broken: bool,
    /// A framing error found ahead, for the next poll.
    error: Option<H1Error>,
    expect: Continue,
    /// The response head has been written: no 100 Continue any more.
    response_started: bool,
    /// The exchange waiting for the body to end.
    exchange: Option<Waker>,
    /// The body waiting on a 100 Continue the response took over.
    body: Option<Waker>,
}

impl Inbound {
    /// Lends `buf` (the bytes after the head) to a body framed by
    /// `framing`, with `Expect: 100-continue` when `expect`. Returns the
    /// body's generation.
    pub(super) fn lend(&mut self, buf: BytesMut, framing: RequestFraming, expect: bool) -> u64 {
        self.generation += 1;
        self.buf = buf;
        self.framer = BodyFramer::for_request(framing, ChunkLimits::default());
        (self.released, self.broken, self.error) = (false, false, None);
        self.expect = if expect {
            Continue::Wanted
        } else {
            Continue::No
        };
        self.response_started = false;
        self.generation
    }

    /// The response head is about to be written: what of a 100 Continue
    /// already begun must go before it (it cannot be taken back).
    pub(super) fn start_response(&mut self) -> &'static [u8] {
        self.response_started = true;
        let rest = match self.expect {
            Continue::Sending(sent) => &CONTINUE[sent..],
            _ => &[],
        };
        self.expect = Continue::No;
        if let Some(body) = self.body.take() {
            body.wake();
        }
        rest
    }

    /// Whether the body is done with: read to its end, broken, or dropped.
    pub(super) fn poll_settled(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.released || self.broken || self.framer.is_done() {
            return Poll::Ready(());
        }
        self.exchange = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Takes the buffer back once the body is done with; `None` when the
    /// body's end cannot be found (broken, or not all here), so the
    /// connection cannot carry another request. A body dropped unread is
    /// drained from what has arrived, up to [`MAX_DRAIN`] bytes.
    pub(super) fn reclaim<S: Socket>(&mut self, wire: &Wire<S>) -> Option<BytesMut> {
        self.generation += 1;
        let complete = !self.broken && self.drain(wire);
        self.framer = BodyFramer::Done;
        self.exchange = None;
        self.body = None;
        let buf = std::mem::take(&mut self.buf);
        complete.then_some(buf)
    }

    /// Reads and discards the rest of the body, as far as it has arrived.
    fn drain<S: Socket>(&mut self, wire: &Wire<S>) -> bool {
        let mut drained = 0;
        while drained <= MAX_DRAIN {
            match self.step() {
                Ok(Step::Data(data)) => drained += data.len(),
                Ok(Step::Trailers(_) | Step::End) => return true,
                Ok(Step::More) => {
                    self.reserve();
                    match wire.read_into(&mut self.buf) {
                        Ok(n) if n > 0 => {}
                        _ => return false,
                    }
                }
                Err(_) => return false,
            }
        }
        false
    }

    /// The next piece of the body that the buffer holds.
    fn step(&mut self) -> Result<Step, H1Error> {
        if let Some(error) = self.error.take() {
            return Err(error);
        }
        if self.framer.is_done() {
            return Ok(Step::End);
        }
        if self.buf.is_empty() {
            return Ok(Step::More);
        }
        let found = self.framer.decode(&self.buf)?;
        if found.trailers {
            self.buf.advance(found.used);
            return match parse_trailers(&self.buf, ChunkLimits::default().max_trailers)? {
                Parsed::Partial => Ok(Step::More),
                Parsed::Complete((len, fields)) => {
                    let block = self.buf.split_to(len).freeze();
                    self.framer.trailers_read();
                    field_map(&block, &fields).map(Step::Trailers)
                }
            };
        }
        if let Some((start, end)) = found.data {
            self.buf.advance(start);
            return Ok(Step::Data(self.buf.split_to(end - start).freeze()));
        }
        self.buf.advance(found.used);
        Ok(if found.done { Step::End } else { Step::More })
    }

    /// After a run of data: whether the body has ended with it, found by
    /// decoding the framing already in the buffer (a chunked body's last
    /// CRLF and zero-size chunk), so that the body says it has ended with
    /// its last data, as a Content-Length body does. Decoded on a copy of
    /// the framer: the data of a next chunk is not taken here.
    fn ended_after_data(&mut self) -> bool {
        if !matches!(self.framer, BodyFramer::Chunked(_)) {
            return self.framer.is_done();
        }
        if self.buf.is_empty() {
            return false;
        }
        let mut ahead = self.framer.clone();
        match ahead.decode(&self.buf) {
            Ok(found) if found.done => {
                self.buf.advance(found.used);
                self.framer = ahead;
                true
            }
            Ok(_) => false,
            Err(error) => {
                self.error = Some(error);
                false
            }
        }
    }

    /// Room in the buffer for the next read of the body.
    fn reserve(&mut self) {
        if self.buf.capacity() - self.buf.len() >= MIN_READ {
            return;
        }
        let wanted = match (&self.framer, self.framer.remaining()) {
            (BodyFramer::Length(_), Some(left)) => {
                usize::try_from(left).map_or(BODY_READ, |l| l.min(BODY_READ))
            }
            _ => BODY_READ,
        };
        self.buf.reserve(wanted.max(MIN_READ));
    }

    /// Tells the exchange waiting for the body's end, if one is.
    fn settled(&mut self) {
        if let Some(exchange) = self.exchange.take() {
            exchange.wake();
        }
    }

    /// The body failed for `error`: it cannot be read further.
    fn fail(&mut self, error: ClientError) -> FramePoll {
        self.broken = true;
        self.framer = BodyFramer::Done;
        self.settled();
        Poll::Ready(Some(Err(BodyError::Client(Box::new(error)))))
    }
}

/// What a [`RequestBody`] reads from: the connection's wire, known to the
/// body only through this trait, so that the proxy service is built once for
/// TCP and unix listeners alike.
pub(super) trait BodySource: Send + Sync {
    /// The next frame of the body of `generation`, and whether the body has
    /// ended with it.
    fn poll_body(&self, cx: &mut Context<'_>, generation: u64) -> (FramePoll, bool);

    /// The body of `generation` is dropped.
    fn body_dropped(&self, generation: u64);
}

impl<S: Socket> BodySource for Wire<S> {
    fn poll_body(&self, cx: &mut Context<'_>, generation: u64) -> (FramePoll, bool) {
        let mut inbound = self.inbound();
        if inbound.generation != generation {
            return (Poll::Ready(None), true);
        }
        if self.poll_continue(&mut inbound, cx).is_pending() {
            return (Poll::Pending, false);
        }
        loop {
            let step = match inbound.step() {
                Ok(step) => step,
                Err(error) => return (inbound.fail(ClientError::Refused(error)), true),
            };
            let frame = match step {
                Step::Data(data) => {
                    let ended = inbound.ended_after_data();
                    if ended {
                        inbound.settled();
                    }
                    return (Poll::Ready(Some(Ok(Frame::data(data)))), ended);
                }
                Step::Trailers(fields) => Some(Ok(Frame::trailers(fields))),
                Step::End => None,
                Step::More => {
                    inbound.reserve();
                    match self.poll_read_into(cx, &mut inbound.buf) {
                        Poll::Pending => return (Poll::Pending, false),
                        Poll::Ready(Ok(0)) => {
                            return (inbound.fail(ClientError::ClosedMidBody), true);
                        }
                        Poll::Ready(Ok(_)) => continue,
                        Poll::Ready(Err(e)) => return (inbound.fail(ClientError::Io(e)), true),
                    }
                }
            };
            inbound.settled();
            return (Poll::Ready(frame), true);
        }
    }

    fn body_dropped(&self, generation: u64) {
        let mut inbound = self.inbound();
        if inbound.generation == generation {
            inbound.released = true;
            inbound.body = None;
            inbound.settled();
        }
    }
}

impl<S: Socket> Wire<S> {
    /// Writes `100 Continue` if the client asked for it and neither the
    /// response nor the body has begun; pending while it cannot be written.
    fn poll_continue(&self, inbound: &mut Inbound, cx: &mut Context<'_>) -> Poll<()> {
        let mut sent = match inbound.expect {
            Continue::No => return Poll::Ready(()),
            Continue::Wanted if inbound.response_started || !inbound.buf.is_empty() => {
                inbound.expect = Continue::No;
                return Poll::Ready(());
            }
            Continue::Wanted => 0,
            Continue::Sending(sent) => sent,
        };
        while sent < CONTINUE.len() {
            let rest = [std::io::IoSlice::new(&CONTINUE[sent..])];
            match self.poll_write(cx, &rest, false) {
                Poll::Ready(Ok(n)) if n > 0 => sent += n,
                // A failed write is the body's failure soon enough: its
                // next read sees the same socket.
                Poll::Ready(_) => break,
                Poll::Pending => {
                    inbound.expect = Continue::Sending(sent);
                    // The response may take over the rest meanwhile; it wakes this.
                    inbound.body = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        }
        inbound.expect = Continue::No;
        Poll::Ready(())
    }
}

/// The request body as the proxy service gets it.
pub(super) struct RequestBody {
    /// What it reads from; `None` for a request without a body.
    source: Option<Weak<dyn BodySource>>,
    generation: u64,
    /// Bytes still to come of a Content-Length body.
    remaining: Option<u64>,
    done: bool,
}

impl RequestBody {
    /// The body of a request that has none.
    pub(super) fn empty() -> Self {
        Self {
            source: None,
            generation: 0,
            remaining: Some(0),
            done: true,
        }
    }

    /// The body of `generation` read from `source`, framed by `framing`.
    pub(super) fn reading(
        source: Weak<dyn BodySource>,
        generation: u64,
        framing: RequestFraming,
    ) -> Self {
        Self {
            source: Some(source),
            generation,
            remaining: match framing {
                RequestFraming::Length(n) => Some(n),
                _ => None,
            },
            done: false,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> FramePoll {
        if self.done {
            return Poll::Ready(None);
        }
        let Some(source) = self.source.as_ref().and_then(Weak::upgrade) else {
            self.done = true;
            return Poll::Ready(Some(Err(BodyError::Client(Box::new(ClientError::Gone)))));
        };
        let (polled, ended) = source.poll_body(cx, self.generation);
        self.done = ended;
        if let (Some(remaining), Poll::Ready(Some(Ok(frame)))) = (&mut self.remaining, &polled) {
            *remaining = remaining.saturating_sub(frame.data_ref().map_or(0, |d| d.len() as u64));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(remaining) => SizeHint::with_exact(remaining),
            None => SizeHint::default(),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let Some(source) = self.source.as_ref().and_then(Weak::upgrade) {
            source.body_dropped(self.generation);
        }
    }
}
