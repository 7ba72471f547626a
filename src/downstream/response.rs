//! The response as the client gets it, written by tether itself: the status
//! line in the client's version, the fields as the proxy service left them
//! (an HTTP/1.x upstream's end-to-end fields as they came, or a header map's,
//! lowercase), the framing tether chooses, and the body, with the head and
//! the body's first bytes in one write when the body is ready (one piece,
//! so `send(2)`, when the body fits the head's buffer; vectored otherwise).
//!
//! What hyper's server did and clients may count on is kept: `HTTP/1.0` in
//! the status line for an HTTP/1.0 client; a `date` field when the response
//! has none; Content-Length from the field or from an exact body size,
//! chunked for HTTP/1.1 clients otherwise, and no body for HEAD, 1xx, 204 and
//! 304; `connection: keep-alive` for an HTTP/1.0 client that keeps its
//! connection. Where hyper was loose, tether is not: a close-delimited body
//! always says `connection: close`.

use std::cell::RefCell;
use std::io::IoSlice;
use std::ops::Range;
use std::pin::Pin;
use std::task::Poll;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};
use http::StatusCode;
use http_body::Body;

use super::clock::Clock;
use super::io::{Socket, Wire};
use super::state::ClientState;
use super::ClientError;
use crate::h1::FieldText;
use crate::http::body::ProxyBody;
use crate::http::{ClientHead, ProxyResponse};

/// Pieces queued for one write at most: beyond, the queue is written first.
const MAX_PIECES: usize = 16;
/// Body bytes queued before they are written, however ready the body is.
const MAX_QUEUED: usize = 256 * 1024;

/// What the response must fit, from the request it answers.
pub(super) struct Answering {
    /// The client spoke HTTP/1.0.
    pub http10: bool,
    /// The request was HEAD: its response carries no body.
    pub head_request: bool,
    /// The connection ends after this response, whatever it says (the
    /// process began draining after the service looked).
    pub closing: bool,
}

/// How the body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body.
    Empty,
    /// So many bytes.
    Length(u64),
    /// Chunked.
    Chunked,
    /// Until tether closes the connection (an HTTP/1.0 client, a body of
    /// unknown length beyond `http10_buffer`).
    Close,
}

/// A response head ready to write.
struct Head {
    bytes: Vec<u8>,
    framing: Framing,
    /// The connection ends after this response.
    last: bool,
}

/// Writes `response` to the client. `prelude` goes first (the rest of a
/// `100 Continue` already begun). The last bytes of a connection's last
/// response are written with MSG_MORE and followed at once by tether's FIN
/// when the service asked for it (see [`ClientState::wants_fin`]), so both
/// leave in one segment. Returns whether the connection ends after it.
pub(super) async fn write<S: Socket>(
    wire: &Wire<S>,
    response: ProxyResponse,
    answering: &Answering,
    prelude: &'static [u8],
    state: &ClientState,
) -> Result<bool, ClientError> {
    let ProxyResponse { head, mut body } = response;
    let encoded = head_of(&head, &body, answering);
    // The upstream's head holds the buffer it was read into: let it go
    // before the body streams.
    drop(head);
    let head = encoded;
    let mut out = Output::new(prelude, head.bytes);
    let mut remaining = match head.framing {
        Framing::Length(n) => n,
        Framing::Empty => 0,
        Framing::Chunked | Framing::Close => u64::MAX,
    };
    if head.framing != Framing::Empty && remaining > 0 {
        loop {
            let frame = match poll_now(&mut body).await {
                Some(frame) => frame,
                None => {
                    // Not ready: what is queued goes now, and the wait
                    // starts with nothing held back.
                    out.flush(wire, false, &state.clock).await?;
                    std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
                }
            };
            let ended = match frame {
                None => true,
                Some(Err(e)) => return Err(ClientError::ResponseBody(e)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        out.data(data, head.framing, &mut remaining)?;
                    }
                    body.is_end_stream() || remaining == 0
                }
            };
            if ended {
                break;
            }
            if out.full() {
                out.flush(wire, false, &state.clock).await?;
            }
        }
        if matches!(head.framing, Framing::Length(_)) && remaining > 0 {
            return Err(ClientError::ResponseTooShort);
        }
    }
    if head.framing == Framing::Chunked && !out.copy_in(b"0\r\n\r\n") {
        out.push(Piece::Static(b"0\r\n\r\n"));
    }
    // Done with: the upstream connection goes back to the pool now, and the
    // exchange is over for the access log.
    drop(body);
    let fin = head.last && state.wants_fin();
    out.flush(wire, fin, &state.clock).await?;
    if fin && crate::sock::send_fin(&wire.socket).is_ok() {
        state.note_fin_sent();
    }
    // Only now, the response handed over whole: until the last flush went
    // through, the send timeout, not the idle one, ran.
    state.clock.set_idle();
    Ok(head.last)
}

/// The body's next frame if it is ready now, without waiting.
async fn poll_now(
    body: &mut ProxyBody,
) -> Option<Option<Result<http_body::Frame<Bytes>, crate::pool::BodyError>>> {
    std::future::poll_fn(|cx| match Pin::new(&mut *body).poll_frame(cx) {
        Poll::Ready(frame) => Poll::Ready(Some(frame)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// The head to write for `head`: a header map's fields, or an upstream's
/// relayed as they came.
fn head_of(head: &ClientHead, body: &ProxyBody, answering: &Answering) -> Head {
    match head {
        ClientHead::Parts(parts) => {
            let fields = parts.headers.iter().map(|(name, value)| FieldText {
                name: name.as_str().as_bytes(),
                value: value.as_bytes(),
                line: None,
            });
            let says_close = crate::connection_header::has_token(&parts.headers, "close");
            let line = StatusLine {
                status: parts.status,
                reason: None,
            };
            let close = Close {
                asked: says_close,
                written: says_close,
            };
            encode_head(line, fields, close, body, answering)
        }
        ClientHead::Relay { head, last } => {
            let line = StatusLine {
                status: head.status,
                reason: Some(head.reason()).filter(|reason| !reason.is_empty()),
            };
            let close = Close {
                asked: *last,
                written: false,
            };
            encode_head(line, head.end_to_end(), close, body, answering)
        }
    }
}

/// A status line's status and, when the upstream sent one, its reason.
struct StatusLine<'a> {
    status: StatusCode,
    reason: Option<&'a [u8]>,
}

/// Whether the service asked for `Connection: close`, and whether `fields`
/// carry it already.
#[derive(Clone, Copy)]
struct Close {
    asked: bool,
    written: bool,
}

/// The head of a response with `fields` (the connection's already gone),
/// closing as `close` says, answering as `answering` says, for `body`.
fn encode_head<'a>(
    line: StatusLine<'_>,
    fields: impl Iterator<Item = FieldText<'a>>,
    close: Close,
    body: &ProxyBody,
    answering: &Answering,
) -> Head {
    let status = line.status;
    let mut out = Vec::with_capacity(512);
    status_line(&mut out, &line, answering.http10);
    let may_have_length = !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED);
    let bodiless = answering.head_request || !may_have_length;
    let (mut length, mut dated) = (None, false);
    for text in fields {
        let name = text.name;
        if name.eq_ignore_ascii_case(b"content-length") {
            // One, and only where a length may be: it is the framing.
            match crate::h1::content_length(text.value) {
                Some(n) if may_have_length && length.is_none() => length = Some(n),
                _ => continue,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"trailer")
        {
            // The framing is tether's own (the service strips these).
            continue;
        } else if name.eq_ignore_ascii_case(b"date") {
            dated = true;
        }
        match text.line {
            // A relayed line goes as it came, in one copy.
            Some(line) => out.extend_from_slice(line),
            None => field(&mut out, name, text.value),
        }
    }
    let framing = match length {
        Some(n) => Framing::Length(n),
        None => framing_of(&mut out, body, may_have_length, answering),
    };
    let last = answering.closing || close.asked || framing == Framing::Close;
    if last && !close.written {
        out.extend_from_slice(b"connection: close\r\n");
    } else if !last && answering.http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        date(&mut out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Head {
        bytes: out,
        framing: if bodiless { Framing::Empty } else { framing },
        last,
    }
}

/// The framing of a body whose head gave no length, its field written to
/// `out`: the body's exact size when known, else chunked (delimited by the
/// close for an HTTP/1.0 client).
fn framing_of(
    out: &mut Vec<u8>,
    body: &ProxyBody,
    may_have_length: bool,
    answering: &Answering,
) -> Framing {
    let bodiless = answering.head_request || !may_have_length;
    let exact = if body.is_end_stream() {
        Some(0)
    } else {
        body.size_hint().exact()
    };
    match exact {
        Some(0) if may_have_length && !answering.head_request => {
            out.extend_from_slice(b"content-length: 0\r\n");
            Framing::Length(0)
        }
        Some(n) if n > 0 && may_have_length => {
            out.extend_from_slice(b"content-length: ");
            decimal(out, n);
            out.extend_from_slice(b"\r\n");
            Framing::Length(n)
        }
        Some(n) => Framing::Length(n),
        None if bodiless => Framing::Empty,
        None if answering.http10 => Framing::Close,
        None => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Framing::Chunked
        }
    }
}

/// `HTTP/1.x <code> <reason>`: the upstream's own reason phrase when it
/// sent one, else the canonical one.
fn status_line(out: &mut Vec<u8>, line: &StatusLine<'_>, http10: bool) {
    if !http10 && line.status == StatusCode::OK && line.reason.is_none_or(|r| r == b"OK") {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    out.extend_from_slice(if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    out.extend_from_slice(line.status.as_str().as_bytes());
    out.push(b' ');
    match line.reason {
        Some(reason) => out.extend_from_slice(reason),
        // A reason must be there: many parsers expect one.
        None => out.extend_from_slice(
            line.status
                .canonical_reason()
                .unwrap_or("<none>")
                .as_bytes(),
        ),
    }
    out.extend_from_slice(b"\r\n");
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `n` in decimal.
fn decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(crate::h1::digits::decimal(n, &mut [0; 20]));
}

/// `n` in hexadecimal, a chunk-size.
fn hex(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(crate::h1::digits::hex(n, &mut [0; 16]));
}

thread_local! {
    /// The `date` value of the current second: formatted once a second per
    /// worker, as hyper does.
    static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// The current time as an IMF-fixdate (RFC 9110 §5.6.7).
fn date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            *cached = (second, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(cached.1.as_bytes());
    });
}

/// One piece of what is to be written.
enum Piece {
    /// A range of the output's own bytes: the head, chunk-size lines, and
    /// body bytes copied after them.
    Own(Range<usize>),
    /// Body data, as the body gave it.
    Data(Bytes),
    /// Fixed text.
    Static(&'static [u8]),
}

/// Bytes queued for one write: the head, framing and small body data in
/// one owned buffer, larger data as it came.
struct Output {
    own: Vec<u8>,
    /// What `own` may hold of copied body bytes: the capacity the head came
    /// with, so copying stays for small bodies and never grows the buffer.
    room: usize,
    pieces: Vec<Piece>,
    queued: usize,
}

impl Output {
    fn new(prelude: &'static [u8], head: Vec<u8>) -> Self {
        let mut pieces = Vec::with_capacity(4);
        if !prelude.is_empty() {
            pieces.push(Piece::Static(prelude));
        }
        pieces.push(Piece::Own(0..head.len()));
        Self {
            queued: head.len(),
            room: head.capacity(),
            own: head,
            pieces,
        }
    }

    fn push(&mut self, piece: Piece) {
        self.queued += match &piece {
            Piece::Own(range) => range.len(),
            Piece::Data(data) => data.len(),
            Piece::Static(text) => text.len(),
        };
        self.pieces.push(piece);
    }

    /// Queues `data`: copied after the head when the head's buffer has
    /// room for it, so a small response leaves in one piece (send(2) costs
    /// the kernel less than writev(2) of several); as it came otherwise.
    fn push_data(&mut self, data: Bytes) {
        if !self.copy_in(&data) {
            self.push(Piece::Data(data));
        }
    }

    /// Appends `bytes` to the owned buffer if they fit in its `room`.
    fn copy_in(&mut self, bytes: &[u8]) -> bool {
        if self.own.len() + bytes.len() > self.room {
            return false;
        }
        let start = self.own.len();
        self.own.extend_from_slice(bytes);
        self.own_from(start);
        true
    }

    /// Queues the owned bytes from `start` on, joining the piece before
    /// when it ends there, so that contiguous bytes are one piece.
    fn own_from(&mut self, start: usize) {
        let end = self.own.len();
        if end == start {
            return;
        }
        self.queued += end - start;
        match self.pieces.last_mut() {
            Some(Piece::Own(range)) if range.end == start => range.end = end,
            _ => self.pieces.push(Piece::Own(start..end)),
        }
    }

    /// Queues body data as `framing` writes it; `remaining` counts down a
    /// Content-Length, which the body may not overrun.
    fn data(
        &mut self,
        data: Bytes,
        framing: Framing,
        remaining: &mut u64,
    ) -> Result<(), ClientError> {
        if data.is_empty() {
            return Ok(());
        }
        match framing {
            Framing::Length(_) => {
                let len = data.len() as u64;
                if len > *remaining {
                    return Err(ClientError::ResponseTooLong);
                }
                *remaining -= len;
                self.push_data(data);
            }
            Framing::Chunked => {
                let start = self.own.len();
                hex(&mut self.own, data.len() as u64);
                self.own.extend_from_slice(b"\r\n");
                self.own_from(start);
                self.push_data(data);
                if !self.copy_in(b"\r\n") {
                    self.push(Piece::Static(b"\r\n"));
                }
            }
            Framing::Close => self.push_data(data),
            Framing::Empty => {}
        }
        Ok(())
    }

    /// Whether the queue should be written before more is added.
    fn full(&self) -> bool {
        self.pieces.len() + 3 > MAX_PIECES || self.queued >= MAX_QUEUED
    }

    /// Writes everything queued; with `more`, each write says more follows
    /// (MSG_MORE), so the FIN sent next joins the last bytes.
    async fn flush<S: Socket>(
        &mut self,
        wire: &Wire<S>,
        more: bool,
        clock: &Clock,
    ) -> Result<(), ClientError> {
        while self.queued > 0 {
            let written = std::future::poll_fn(|cx| {
                let mut slices = [IoSlice::new(&[]); MAX_PIECES];
                let mut count = 0;
                for piece in self.pieces.iter().take(MAX_PIECES) {
                    slices[count] = IoSlice::new(match piece {
                        Piece::Own(range) => &self.own[range.clone()],
                        Piece::Data(data) => data,
                        Piece::Static(text) => text,
                    });
                    count += 1;
                }
                let polled = wire.poll_write(cx, &slices[..count], more);
                if polled.is_pending() {
                    // The client's socket is full: `send_timeout` runs.
                    clock.write_blocked();
                }
                polled
            })
            .await?;
            clock.write_progressed();
            if written == 0 {
                return Err(ClientError::Io(std::io::ErrorKind::WriteZero.into()));
            }
            self.advance(written);
        }
        // Kept for the next pieces: chunk-size lines and small data are
        // written into it.
        self.own.clear();
        Ok(())
    }

    /// Drops the first `written` bytes of the queue.
    fn advance(&mut self, mut written: usize) {
        self.queued -= written;
        let mut done = 0;
        for piece in &mut self.pieces {
            let len = match piece {
                Piece::Own(range) => range.len(),
                Piece::Data(data) => data.len(),
                Piece::Static(text) => text.len(),
            };
            if written < len {
                match piece {
                    Piece::Own(range) => range.start += written,
                    Piece::Data(data) => data.advance(written),
                    Piece::Static(text) => *text = &text[written..],
                }
                break;
            }
            written -= len;
            done += 1;
            if written == 0 {
                break;
            }
        }
        self.pieces.drain(..done);
    }
}
