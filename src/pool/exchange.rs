//! One HTTP/1.1 exchange on a pooled connection, run by the task of the
//! request that holds the connection: no connection task, no channel and no
//! task hop between the request and its socket.
//!
//! The request head goes out as the bytes the proxy rewrote it into
//! (`pool::Http1Request`), or, for a head in `http` parts (a probe's),
//! encoded straight from them; either way with its framing, and the first
//! body bytes, in one write (a bodiless request's head is copied into the
//! exchange's buffer before its end, so it is one piece and one `send(2)`).
//! The response head
//! is parsed (`crate::h1`, on `httparse`) where it lands in a buffer lent for
//! the exchange, its header values kept as slices of that buffer, and the
//! body is decoded from the same buffer, its data handed on as slices too.
//! The buffer goes with the response body and is freed when the body is done
//! with: an idle pooled connection holds none.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::CONTENT_LENGTH;
use http::HeaderMap;
use http_body::{Body, Frame};
use tokio::io::AsyncWrite;

use super::body::UpstreamBody;
use super::io::UpstreamIo;
use super::lease::SendFailure;
use super::request::{OutboundHead, UpstreamRequest};
use super::response::Http1Head;
use crate::h1::{self, BodyFramer, ChunkLimits, H1Error, HeadLimits, Parsed, ResponseHead};

/// What a read asks the socket for at least: the lent buffer grows by this
/// much when it runs short, so a 16 KiB body takes one or two reads.
const READ_CHUNK: usize = 16 * 1024;
/// The most [`end_head`] adds to a head: a Content-Length or
/// `transfer-encoding: chunked`, `connection: close` and the empty line.
const END_ROOM: usize = 64;
/// Below this much room left, the buffer grows before a read.
const READ_ROOM: usize = 1024;
/// Header fields a response head may have (hyper's client allowed 100).
const MAX_RESPONSE_FIELDS: usize = 100;

/// What an exchange's write found.
pub(crate) enum Written {
    /// The request went out whole.
    Whole,
    /// The backend answered before the request body was all sent: the rest
    /// is not sent, and the connection is not reused.
    AnsweredEarly,
}

/// A write that failed.
pub(crate) enum WriteFailure {
    /// Nothing of the request reached the socket.
    Unsent(io::Error),
    /// Part of it may have reached the backend.
    Failed(SendFailure),
}

/// Writes `request` on `io`: its head (saying `Connection: close` when
/// `last`), then its body, framed by Content-Length when the length is
/// known and chunked otherwise. `buf` is the exchange's lent buffer; it is
/// left holding what the backend sent while the request was being written
/// (an early answer), usually nothing.
pub(crate) async fn write_request(
    io: &mut UpstreamIo,
    request: &mut UpstreamRequest,
    last: bool,
    buf: &mut BytesMut,
) -> Result<Written, WriteFailure> {
    let UpstreamRequest { head, body } = request;
    let (written_head, framing): (&[u8], Framing) = match head {
        // Copied before its end when it fits: one piece goes out with
        // send(2), which costs the kernel less than writev(2) of two.
        OutboundHead::Http1(head) if head.head.len() + END_ROOM <= buf.capacity() - buf.len() => {
            buf.put_slice(&head.head);
            (&[], end_head(buf, head.has_length, body, last))
        }
        OutboundHead::Http1(head) => (&head.head, end_head(buf, head.has_length, body, last)),
        OutboundHead::Parts(parts) => (&[], encode_head(buf, parts, body, last)),
    };
    // The head leaves with the body's first bytes when they are in memory.
    let first = body.front_data().cloned();
    let mut prefix = ChunkPrefix::default();
    let mut parts: [&[u8]; 5] = [written_head, buf, &[], &[], &[]];
    if let Some(data) = &first {
        parts[3] = data;
        if framing == Framing::Chunked && !data.is_empty() {
            parts[2] = prefix.of(data.len());
            parts[4] = b"\r\n";
        }
    }
    let mut early = BytesMut::new();
    let wrote = write_all(io, &parts, &mut early).await;
    buf.clear();
    match wrote {
        Ok(Some(())) => {}
        Ok(None) => {
            *buf = early;
            return Ok(Written::AnsweredEarly);
        }
        Err((0, e)) => return Err(WriteFailure::Unsent(e)),
        Err((_, e)) => return Err(WriteFailure::Failed(SendFailure::Io(e))),
    }
    if first.is_some() {
        body.drop_front();
    }
    write_body(io, body, framing, buf)
        .await
        .map_err(|e| WriteFailure::Failed(SendFailure::Io(e)))
}

/// How the request body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// By Content-Length, or there is no body.
    Length,
    /// Chunked.
    Chunked,
}

/// Encodes the request line and fields of `parts` into `buf`, then ends
/// the head as [`end_head`] does.
fn encode_head(
    buf: &mut BytesMut,
    parts: &http::request::Parts,
    body: &UpstreamBody,
    last: bool,
) -> Framing {
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", |target| target.as_str());
    buf.put_slice(parts.method.as_str().as_bytes());
    buf.put_u8(b' ');
    buf.put_slice(target.as_bytes());
    buf.put_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        buf.put_slice(name.as_str().as_bytes());
        buf.put_slice(b": ");
        buf.put_slice(value.as_bytes());
        buf.put_slice(b"\r\n");
    }
    end_head(buf, parts.headers.contains_key(CONTENT_LENGTH), body, last)
}

/// Ends a head whose fields are written into `buf`, adding the framing the
/// body needs: none when the head has its own Content-Length
/// (`has_length`), else Content-Length for a body of known size, chunked
/// for one of unknown size, nothing for no body (as hyper's client did);
/// then `Connection: close` when `last`, and the empty line.
fn end_head(buf: &mut BytesMut, has_length: bool, body: &UpstreamBody, last: bool) -> Framing {
    let framing = if has_length || body.is_end_stream() {
        Framing::Length
    } else if let Some(length) = body.size_hint().exact() {
        buf.put_slice(b"content-length: ");
        put_decimal(buf, length);
        buf.put_slice(b"\r\n");
        Framing::Length
    } else {
        buf.put_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    if last {
        buf.put_slice(b"connection: close\r\n");
    }
    buf.put_slice(b"\r\n");
    framing
}

/// Appends `n` in decimal.
fn put_decimal(buf: &mut BytesMut, n: u64) {
    buf.put_slice(h1::digits::decimal(n, &mut [0; 20]));
}

/// A chunk's size line, built on the stack.
#[derive(Default)]
struct ChunkPrefix([u8; 18]);

impl ChunkPrefix {
    /// The size line of a chunk of `len` bytes: hex digits and CRLF.
    fn of(&mut self, len: usize) -> &[u8] {
        let mut digits = [0; 16];
        let digits = h1::digits::hex(len as u64, &mut digits);
        let end = digits.len();
        self.0[..end].copy_from_slice(digits);
        self.0[end..end + 2].copy_from_slice(b"\r\n");
        &self.0[..end + 2]
    }
}

/// Writes the rest of the body as its frames arrive. Stops early, leaving
/// the rest unsent, when the backend answers meanwhile (what it sent is then
/// in `early`).
async fn write_body(
    io: &mut UpstreamIo,
    body: &mut UpstreamBody,
    framing: Framing,
    early: &mut BytesMut,
) -> io::Result<Written> {
    let mut prefix = ChunkPrefix::default();
    loop {
        let frame = poll_fn(|cx| poll_frame_or_answer(io, body, early, cx)).await;
        match frame {
            Next::Answered => return Ok(Written::AnsweredEarly),
            Next::End => {
                if framing == Framing::Chunked
                    && write_all(io, &[b"0\r\n\r\n"], early)
                        .await
                        .map_err(|(_, e)| e)?
                        .is_none()
                {
                    return Ok(Written::AnsweredEarly);
                }
                return Ok(Written::Whole);
            }
            Next::Failed(e) => return Err(io::Error::other(e)),
            Next::Frame(frame) => match frame.into_data() {
                Ok(data) if data.is_empty() => continue,
                Ok(data) if framing == Framing::Chunked => {
                    let chunk = [prefix.of(data.len()), &data, b"\r\n"];
                    if write_all(io, &chunk, early)
                        .await
                        .map_err(|(_, e)| e)?
                        .is_none()
                    {
                        return Ok(Written::AnsweredEarly);
                    }
                    continue;
                }
                Ok(data) => {
                    if write_all(io, &[&data], early)
                        .await
                        .map_err(|(_, e)| e)?
                        .is_none()
                    {
                        return Ok(Written::AnsweredEarly);
                    }
                    continue;
                }
                Err(frame) => {
                    // Trailers end a chunked body; a body framed by length
                    // cannot carry them, and they are dropped.
                    let Ok(trailers) = frame.into_trailers() else {
                        continue;
                    };
                    if framing != Framing::Chunked {
                        continue;
                    }
                    let trailer_block = encode_trailers(&trailers);
                    if write_all(io, &[&trailer_block], early)
                        .await
                        .map_err(|(_, e)| e)?
                        .is_none()
                    {
                        return Ok(Written::AnsweredEarly);
                    }
                    return Ok(Written::Whole);
                }
            },
        }
    }
}

/// The last chunk with `trailers` and the empty line.
fn encode_trailers(trailers: &HeaderMap) -> BytesMut {
    let mut block = BytesMut::with_capacity(64);
    block.put_slice(b"0\r\n");
    for (name, value) in trailers {
        block.put_slice(name.as_str().as_bytes());
        block.put_slice(b": ");
        block.put_slice(value.as_bytes());
        block.put_slice(b"\r\n");
    }
    block.put_slice(b"\r\n");
    block
}

/// The next thing the body writer does.
enum Next {
    Frame(Frame<Bytes>),
    End,
    Failed(super::body::BodyError),
    /// The backend sent something while the body was still coming.
    Answered,
}

/// The body's next frame, unless the backend answers before it comes.
fn poll_frame_or_answer(
    io: &mut UpstreamIo,
    body: &mut UpstreamBody,
    early: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<Next> {
    match Pin::new(&mut *body).poll_frame(cx) {
        Poll::Ready(Some(Ok(frame))) => Poll::Ready(Next::Frame(frame)),
        Poll::Ready(Some(Err(e))) => Poll::Ready(Next::Failed(e)),
        Poll::Ready(None) => Poll::Ready(Next::End),
        Poll::Pending => poll_answer(io, early, cx).map(|()| Next::Answered),
    }
}

/// Ready when the backend has answered (the start of a final response read
/// into `early`), closed or failed while the request is still being
/// written. Interim answers (`100 Continue`, `103 Early Hints`) are read and
/// dropped: the backend waits for the rest of the body. Under TLS a session
/// ticket is read and is no answer.
fn poll_answer(io: &mut UpstreamIo, early: &mut BytesMut, cx: &mut Context<'_>) -> Poll<()> {
    loop {
        // Readiness first, so no buffer is grown for a quiet socket.
        if io.poll_read_ready(cx).is_pending() {
            return Poll::Pending;
        }
        match ready!(poll_read(io, early, cx)) {
            Ok(read) if read > 0 => {}
            // A close or an error is found again by the response's read.
            _ => return Poll::Ready(()),
        }
        if !drop_interim(early) {
            return Poll::Ready(());
        }
    }
}

/// Drops the interim responses at the front of `early`; false once it
/// starts with a final response (or with bytes that are none), which is
/// the backend's answer.
fn drop_interim(early: &mut BytesMut) -> bool {
    let limits = HeadLimits {
        max_head_bytes: READ_CHUNK,
        max_headers: MAX_RESPONSE_FIELDS,
    };
    loop {
        if early.is_empty() {
            return true;
        }
        match h1::parse_response(early, limits, false) {
            Ok(Parsed::Complete(head))
                if (100..200).contains(&head.status) && head.status != 101 =>
            {
                early.advance(head.len);
            }
            // The rest of an interim head is still to come.
            Ok(Parsed::Partial) => return true,
            _ => return false,
        }
    }
}

/// Writes every byte of `parts`, then flushes (TLS holds records until
/// then). `Ok(None)` when the backend answered (into `early`) while the
/// socket would not take more; `Err` carries how many bytes were written
/// before the error.
async fn write_all<const N: usize>(
    io: &mut UpstreamIo,
    parts: &[&[u8]; N],
    early: &mut BytesMut,
) -> Result<Option<()>, (usize, io::Error)> {
    // On the stack: a request's few pieces need no list of their own.
    let mut slices = [IoSlice::new(&[]); N];
    let mut count = 0;
    for part in parts.iter().filter(|p| !p.is_empty()) {
        slices[count] = IoSlice::new(part);
        count += 1;
    }
    let mut slices = &mut slices[..count];
    let mut written = 0;
    while !slices.is_empty() {
        let wrote = poll_fn(
            |cx| match Pin::new(&mut *io).poll_write_vectored(cx, slices) {
                Poll::Ready(result) => Poll::Ready(Some(result)),
                Poll::Pending => poll_answer(io, early, cx).map(|()| None),
            },
        )
        .await;
        match wrote {
            None => return Ok(None),
            Some(Ok(0)) => return Err((written, io::ErrorKind::WriteZero.into())),
            Some(Ok(n)) => {
                written += n;
                IoSlice::advance_slices(&mut slices, n);
            }
            Some(Err(e)) => return Err((written, e)),
        }
    }
    poll_fn(|cx| Pin::new(&mut *io).poll_flush(cx))
        .await
        .map_err(|e| (written, e))?;
    Ok(Some(()))
}

/// The response head of an exchange, and the reader of its body.
pub(crate) struct ResponseStart {
    /// The head, its fields where they arrived.
    pub(crate) head: Http1Head,
    /// What the codec read of it.
    pub(crate) facts: HeadFacts,
    /// The body, from the bytes that came with the head.
    pub(crate) body: BodyReader,
}

/// What the pool keeps of a response head.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadFacts {
    /// The backend keeps the connection open after this response.
    pub(crate) reusable: bool,
    /// `Keep-Alive: timeout=N, max=M`.
    pub(crate) keep_alive: h1::KeepAlive,
}

/// Reads the response head into `buf` (skipping interim 1xx responses) and
/// returns it with the reader of the body that follows. `max_head` bounds
/// the head.
pub(crate) async fn read_response(
    io: &mut UpstreamIo,
    mut buf: BytesMut,
    head_request: bool,
    max_head: usize,
) -> Result<ResponseStart, SendFailure> {
    let limits = HeadLimits {
        max_head_bytes: max_head,
        max_headers: MAX_RESPONSE_FIELDS,
    };
    loop {
        if !buf.is_empty() {
            match h1::parse_response(&buf, limits, head_request) {
                // Interim answers (100 Continue, 103 Early Hints) are not the
                // response; 101 would be an upgrade, which tether never asks
                // for, and is taken as final.
                Ok(Parsed::Complete(head))
                    if (100..200).contains(&head.status) && head.status != 101 =>
                {
                    let _ = buf.split_to(head.len);
                    continue;
                }
                // Frozen, so that the head's fields and the body's first
                // bytes are slices of it.
                Ok(Parsed::Complete(head)) => return start(head, buf.freeze()),
                Ok(Parsed::Partial) => {}
                Err(e) => return Err(SendFailure::Response(e)),
            }
        }
        let read = poll_fn(|cx| poll_read(io, &mut buf, cx))
            .await
            .map_err(SendFailure::Io)?;
        if read == 0 {
            return Err(if buf.is_empty() {
                SendFailure::Closed
            } else {
                SendFailure::Response(H1Error::BadResponse("closed inside the head"))
            });
        }
    }
}

/// Reads more into `buf`, growing it when it runs short.
fn poll_read(
    io: &mut UpstreamIo,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_ROOM {
        buf.reserve(READ_CHUNK);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// The exchange's start from the head parsed at the front of `frozen`;
/// what follows the head starts the body.
fn start(head: ResponseHead, frozen: Bytes) -> Result<ResponseStart, SendFailure> {
    let facts = HeadFacts {
        reusable: head.reusable(),
        keep_alive: head.keep_alive,
    };
    let body = BodyReader {
        pending: frozen.slice(head.len..),
        buf: BytesMut::new(),
        framer: BodyFramer::for_response(head.framing, ChunkLimits::default()),
        trailers_max: ChunkLimits::default().max_trailers,
    };
    let bytes = frozen.slice(..head.len);
    let head = Http1Head::new(head, bytes).map_err(SendFailure::Response)?;
    Ok(ResponseStart { head, facts, body })
}

/// The reader of a response body: the bytes already read that are still
/// to be framed (the rest of the read that brought the head, at first),
/// the buffer further reads go to, and the framer that finds the body's
/// end.
pub(crate) struct BodyReader {
    pending: Bytes,
    buf: BytesMut,
    framer: BodyFramer,
    trailers_max: usize,
}

/// How a body read ended badly.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyReadError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The framing was broken, or the stream ended inside the body.
    #[error(transparent)]
    Framing(#[from] H1Error),
}

impl BodyReader {
    /// Whether the body is complete.
    pub(crate) fn is_done(&self) -> bool {
        self.framer.is_done()
    }

    /// Whether the body ended with nothing after it: bytes past a response's
    /// end are a broken backend, and its connection must not be reused.
    pub(crate) fn ended_clean(&self) -> bool {
        self.framer.is_done() && self.pending.is_empty() && self.buf.is_empty()
    }

    /// The exact size of the rest, when the framing tells.
    pub(crate) fn remaining(&self) -> Option<u64> {
        self.framer.remaining()
    }

    /// The next frame of the body, read from `io` when the bytes at hand
    /// hold none.
    pub(crate) fn poll_frame(
        &mut self,
        io: &mut UpstreamIo,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyReadError>>> {
        loop {
            if self.framer.is_done() {
                return Poll::Ready(None);
            }
            if !self.pending.is_empty() {
                match self.take_frame() {
                    Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Some(Err(e.into()))),
                }
                if self.framer.is_done() {
                    return Poll::Ready(None);
                }
                // A chunk-size line or trailers cut short: framed again
                // once the rest has been read behind them.
                if !self.pending.is_empty() {
                    self.buf.extend_from_slice(&self.pending);
                    self.pending = Bytes::new();
                }
            }
            let read = match ready!(poll_read(io, &mut self.buf, cx)) {
                Ok(read) => read,
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            };
            if read == 0 {
                // A close-delimited body ends here; any other is cut short.
                return match self.framer.finish() {
                    Ok(()) => Poll::Ready(None),
                    Err(e) => Poll::Ready(Some(Err(e.into()))),
                };
            }
            self.pending = self.buf.split().freeze();
        }
    }

    /// The next frame among the pending bytes, consuming the framing
    /// around it; `None` when they hold no data (more must be read, or the
    /// body just ended).
    fn take_frame(&mut self) -> Result<Option<Frame<Bytes>>, H1Error> {
        loop {
            let decoded = self.framer.decode(&self.pending)?;
            if decoded.trailers {
                self.pending.advance(decoded.used);
                return self.take_trailers();
            }
            if let Some((start, end)) = decoded.data {
                let data = self.pending.slice(start..end);
                self.pending.advance(decoded.used);
                return Ok(Some(Frame::data(data)));
            }
            self.pending.advance(decoded.used);
            if decoded.done || self.pending.is_empty() {
                return Ok(None);
            }
        }
    }

    /// The trailer section at the front of the pending bytes, when it is
    /// all there.
    fn take_trailers(&mut self) -> Result<Option<Frame<Bytes>>, H1Error> {
        match h1::parse_trailers(&self.pending, self.trailers_max)? {
            Parsed::Partial => Ok(None),
            Parsed::Complete((len, fields)) => {
                let block = self.pending.split_to(len);
                self.framer.trailers_read();
                let trailers = h1::field_map(&block, &fields)?;
                Ok(Some(Frame::trailers(trailers)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use http::Request;

    fn head_of(request: &Request<UpstreamBody>, last: bool) -> (String, Framing) {
        let mut buf = BytesMut::new();
        let (parts, ()) = Request::new(()).into_parts();
        let mut parts = parts;
        parts.method = request.method().clone();
        parts.uri = request.uri().clone();
        parts.headers = request.headers().clone();
        let framing = encode_head(&mut buf, &parts, request.body(), last);
        (String::from_utf8(buf.to_vec()).unwrap(), framing)
    }

    #[test]
    fn heads_carry_the_framing_their_body_needs() {
        let get = Request::get("/a?b=1")
            .header("host", "backend")
            .body(UpstreamBody::from_bytes(None))
            .unwrap();
        assert_eq!(
            head_of(&get, false),
            (
                "GET /a?b=1 HTTP/1.1\r\nhost: backend\r\n\r\n".to_owned(),
                Framing::Length
            )
        );
        let post = Request::post("/form")
            .body(UpstreamBody::from_bytes(Some(Bytes::from_static(b"hello"))))
            .unwrap();
        assert_eq!(
            head_of(&post, true),
            (
                "POST /form HTTP/1.1\r\ncontent-length: 5\r\nconnection: close\r\n\r\n".to_owned(),
                Framing::Length
            )
        );
        // The client's own Content-Length is what frames it.
        let declared = Request::put("/")
            .header("content-length", "5")
            .body(UpstreamBody::from_bytes(Some(Bytes::from_static(b"hello"))))
            .unwrap();
        assert_eq!(
            head_of(&declared, false).0,
            "PUT / HTTP/1.1\r\ncontent-length: 5\r\n\r\n"
        );
    }

    #[test]
    fn sizes_are_written_in_decimal_and_chunk_sizes_in_hex() {
        let mut buf = BytesMut::new();
        for n in [0, 7, 10, 1234, u64::MAX] {
            buf.clear();
            put_decimal(&mut buf, n);
            assert_eq!(&buf[..], n.to_string().as_bytes());
        }
        let mut prefix = ChunkPrefix::default();
        assert_eq!(prefix.of(0x1a2b), b"1a2b\r\n");
        assert_eq!(prefix.of(0), b"0\r\n");
        assert_eq!(prefix.of(usize::MAX), b"ffffffffffffffff\r\n");
    }
}
