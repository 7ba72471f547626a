//! The head for the next hop, as slices of the buffer the head arrived in
//! plus a few small owned pieces, ready for one `write_vectored`: kept lines
//! go out as they came (runs of adjacent ones as one slice), only the request
//! or status line, Host, X-Forwarded-For and `Connection` are written anew.
//!
//! Chunked bodies are forwarded as they came, framing and all, so the
//! `Transfer-Encoding` fields of a chunked message are kept, though hop-by-hop:
//! the next hop reads the same chunks the client (or upstream) wrote. The
//! one exception is a head for a writer that frames the body itself
//! ([`upstream_request_into`]), which leaves out every framing field but the
//! one Content-Length and leaves the head open for the writer's own.
//!
//! One rewrite fills either form of the head: a [`WireHead`] of slices, or a
//! flat copy in a `Vec` (a [`HeadSink`] each).

use std::io::IoSlice;

use super::error::H1Error;
use super::hop_by_hop_index;
use super::request::{Field, RequestFraming, RequestHead, TargetForm, Version};
use super::response::{ResponseFraming, ResponseHead};
use super::span::Span;
use crate::config::UnderscoresInHeaders;

/// Index of `transfer-encoding` in [`super::HOP_BY_HOP`].
const TRANSFER_ENCODING: usize = 5;

/// One piece of a head to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Bytes of the buffer the head was parsed from.
    Buf(Span),
    /// Bytes of the head's own small store.
    Owned(Span),
    /// Fixed text.
    Static(&'static [u8]),
}

/// A head to write: its pieces in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WireHead {
    parts: Vec<Part>,
    owned: Vec<u8>,
}

impl WireHead {
    /// The pieces, in order.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The pieces as `IoSlice`s over `buf` (the buffer the head was parsed
    /// from) and the head's own store, for one vectored write.
    pub fn io_slices<'a>(&'a self, buf: &'a [u8]) -> Vec<IoSlice<'a>> {
        self.parts
            .iter()
            .map(|part| IoSlice::new(self.bytes(buf, part)))
            .collect()
    }

    /// The head's length in bytes.
    pub fn len(&self) -> usize {
        self.parts
            .iter()
            .map(|part| match part {
                Part::Buf(span) | Part::Owned(span) => span.len(),
                Part::Static(text) => text.len(),
            })
            .sum()
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The head as one contiguous copy (for tests and logs).
    pub fn to_vec(&self, buf: &[u8]) -> Vec<u8> {
        self.parts
            .iter()
            .flat_map(|part| self.bytes(buf, part).iter().copied())
            .collect()
    }

    fn bytes<'a>(&'a self, buf: &'a [u8], part: &Part) -> &'a [u8] {
        match part {
            Part::Buf(span) => span.of(buf),
            Part::Owned(span) => span.of(&self.owned),
            Part::Static(text) => text,
        }
    }
}

/// Where a rewritten head goes, piece by piece.
pub trait HeadSink {
    /// Adds a span of the buffer the head was parsed from.
    fn buf(&mut self, span: Span);
    /// Adds fixed text.
    fn text(&mut self, text: &'static [u8]);
    /// Adds bytes the rewrite made.
    fn own(&mut self, bytes: &[u8]);

    /// A kept field: its line as it came, or rebuilt with CRLF if it ended
    /// in a bare LF (never passed on: a next hop might read it otherwise).
    fn field(&mut self, field: &Field) {
        if field.crlf {
            self.buf(field.line);
        } else {
            self.buf(field.name);
            self.text(b": ");
            self.buf(field.value);
            self.text(b"\r\n");
        }
    }
}

impl HeadSink for WireHead {
    /// Joined to the previous piece when adjacent, so that a run of kept
    /// lines is one slice.
    fn buf(&mut self, span: Span) {
        if let Some(Part::Buf(last)) = self.parts.last_mut() {
            if last.end == span.start {
                last.end = span.end;
                return;
            }
        }
        self.parts.push(Part::Buf(span));
    }

    fn text(&mut self, text: &'static [u8]) {
        self.parts.push(Part::Static(text));
    }

    fn own(&mut self, bytes: &[u8]) {
        let start = self.owned.len();
        self.owned.extend_from_slice(bytes);
        self.parts
            .push(Part::Owned(Span::new(start, self.owned.len())));
    }
}

/// A head copied flat into `out` as it is rewritten from `src`.
struct Flat<'a> {
    src: &'a [u8],
    out: &'a mut Vec<u8>,
}

impl HeadSink for Flat<'_> {
    fn buf(&mut self, span: Span) {
        self.out.extend_from_slice(span.of(self.src));
    }

    fn text(&mut self, text: &'static [u8]) {
        self.out.extend_from_slice(text);
    }

    fn own(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }
}

/// What the upstream form of a request depends on besides the request.
#[derive(Debug, Clone, Copy)]
pub struct RewriteOptions<'a> {
    /// The listener's `underscores_in_headers`.
    pub underscores: UnderscoresInHeaders,
    /// Host for a request without one (HTTP/1.0): the endpoint's address.
    pub fallback_host: &'a [u8],
    /// The client's address to append to X-Forwarded-For, when on.
    pub forwarded_for: Option<&'a [u8]>,
}

/// The upstream form of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The head to write.
    pub head: WireHead,
    /// How many fields were dropped for a `_` in their name.
    pub dropped_underscored: u64,
}

/// Writes the upstream form of `head` (parsed from `buf`): origin-form
/// target, HTTP/1.1, hop-by-hop fields and those `Connection` names removed,
/// one Content-Length of several that agree,
/// (never Host or Content-Length, nor Transfer-Encoding of a chunked body,
/// which is forwarded as it came), names with `_` dropped, passed or refused
/// as `underscores` says (a spelling of a framing header refused always),
/// Host from an absolute-form target's authority (userinfo left out) or the
/// fallback, and the client appended to X-Forwarded-For.
pub fn upstream_request(
    buf: &[u8],
    head: &RequestHead,
    options: &RewriteOptions<'_>,
) -> Result<Upstream, H1Error> {
    let mut wire = WireHead::default();
    let dropped_underscored = rewrite_request(&mut wire, buf, head, options, false)?;
    wire.text(b"\r\n");
    Ok(Upstream {
        head: wire,
        dropped_underscored,
    })
}

/// What a request head's rewrite learnt besides the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    /// How many fields were dropped for a `_` in their name.
    pub dropped_underscored: u64,
    /// Whether the head kept a Content-Length, which then frames the body.
    pub has_length: bool,
}

/// The upstream form of `head`, as [`upstream_request`] writes it, copied
/// into `out` for a writer that frames the body itself: no
/// Transfer-Encoding (the writer decides the framing of what it sends), and
/// the head left open, without its empty line, for the writer's framing and
/// `Connection` fields.
pub fn upstream_request_into(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &RequestHead,
    options: &RewriteOptions<'_>,
) -> Result<Rewritten, H1Error> {
    let mut flat = Flat { src: buf, out };
    let dropped_underscored = rewrite_request(&mut flat, buf, head, options, true)?;
    Ok(Rewritten {
        dropped_underscored,
        has_length: matches!(head.framing, RequestFraming::Length(_)),
    })
}

/// The rewrite of [`upstream_request`] into `sink`, up to the empty line;
/// `writer_frames`: Transfer-Encoding is left out whatever the framing.
/// Returns how many fields were dropped for their `_`.
fn rewrite_request(
    sink: &mut impl HeadSink,
    buf: &[u8],
    head: &RequestHead,
    options: &RewriteOptions<'_>,
    writer_frames: bool,
) -> Result<u64, H1Error> {
    if head.underscore_framing {
        return Err(H1Error::UnderscoreFraming);
    }
    if options.underscores == UnderscoresInHeaders::Reject && !head.underscored.is_empty() {
        return Err(H1Error::UnderscoreInHeader);
    }
    let wire = sink;
    wire.buf(head.method);
    wire.text(b" ");
    match head.form {
        TargetForm::Absolute { path, .. } if path.is_empty() => wire.text(b"/"),
        TargetForm::Absolute { path, .. } => wire.buf(path),
        _ => wire.buf(head.target),
    }
    wire.text(b" HTTP/1.1\r\n");
    let target_host = match head.form {
        TargetForm::Absolute { authority, .. } => Some(authority.host),
        _ => None,
    };
    if let Some(host) = target_host {
        // RFC 9112 §3.2.2: the target's authority replaces Host.
        wire.text(b"Host: ");
        wire.buf(host);
        wire.text(b"\r\n");
    } else if head.host.count == 0 && !options.fallback_host.is_empty() {
        wire.text(b"Host: ");
        wire.own(options.fallback_host);
        wire.text(b"\r\n");
    }
    let keep_chunked = !writer_frames && head.framing == RequestFraming::Chunked;
    let mut dropped_underscored = 0;
    let mut forwarded = Vec::new();
    let mut length_seen = false;
    for (index, field) in head.fields.iter().enumerate() {
        let name = field.name.of(buf);
        if repeated_length(name, &mut length_seen) {
            continue;
        }
        let kept = match hop_by_hop_index(name) {
            Some(TRANSFER_ENCODING) => keep_chunked,
            Some(_) => false,
            None if target_host.is_some() && name.eq_ignore_ascii_case(b"host") => false,
            None if options.forwarded_for.is_some()
                && name.eq_ignore_ascii_case(b"x-forwarded-for") =>
            {
                forwarded.push(field.value);
                false
            }
            None => !named_by_connection(buf, name, &head.connection.named, keep_chunked),
        };
        if kept
            && options.underscores == UnderscoresInHeaders::Drop
            && head.underscored.contains(&index)
        {
            dropped_underscored += 1;
        } else if kept {
            wire.field(field);
        }
    }
    if let Some(client) = options.forwarded_for {
        forwarded_for(wire, buf, &forwarded, client);
    }
    Ok(dropped_underscored)
}

/// Whether `name` is a Content-Length after the first: the parser has
/// made sure they agree, and one is passed on (RFC 9110 §8.6), as hyper does.
fn repeated_length(name: &[u8], seen: &mut bool) -> bool {
    if !name.eq_ignore_ascii_case(b"content-length") {
        return false;
    }
    std::mem::replace(seen, true)
}

/// Whether `name` is one the `Connection` field lists, and may be removed:
/// Host and Content-Length never are (removing them would change what the
/// message means), nor Transfer-Encoding of a body forwarded chunked.
fn named_by_connection(buf: &[u8], name: &[u8], named: &[Span], keep_chunked: bool) -> bool {
    if name.eq_ignore_ascii_case(b"host")
        || name.eq_ignore_ascii_case(b"content-length")
        || (keep_chunked && name.eq_ignore_ascii_case(b"transfer-encoding"))
    {
        return false;
    }
    named
        .iter()
        .any(|token| token.of(buf).eq_ignore_ascii_case(name))
}

/// One X-Forwarded-For: the prior values (those that are visible ASCII, as
/// the hyper path reads them) joined by `, `, then the client.
fn forwarded_for(wire: &mut impl HeadSink, buf: &[u8], prior: &[Span], client: &[u8]) {
    wire.text(b"X-Forwarded-For: ");
    for value in prior {
        let bytes = value.of(buf);
        if bytes
            .iter()
            .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
        {
            wire.buf(*value);
            wire.text(b", ");
        }
    }
    wire.own(client);
    wire.text(b"\r\n");
}

/// What the client's form of a response depends on.
#[derive(Debug, Clone, Copy)]
pub struct ClientResponseOptions {
    /// The client's version, which the status line carries.
    pub version: Version,
    /// The exchange ends the client connection: `Connection: close`.
    pub last: bool,
}

/// Writes the client's form of a response head: the client's version,
/// hop-by-hop fields and those `Connection` names removed (Transfer-Encoding
/// kept for a chunked body, forwarded as it came), and `Connection: close` on
/// the last exchange, `Connection: keep-alive` for an HTTP/1.0 client that
/// keeps its connection. A chunked body cannot go to an HTTP/1.0 client as
/// it is: the caller buffers it or delimits it by the close.
pub fn client_response(
    buf: &[u8],
    head: &ResponseHead,
    options: ClientResponseOptions,
) -> WireHead {
    let mut wire = WireHead::default();
    wire.text(match options.version {
        Version::Http10 => b"HTTP/1.0 ",
        Version::Http11 => b"HTTP/1.1 ",
    });
    let status = head.status;
    let digits = [
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ];
    wire.own(&digits);
    wire.text(b" ");
    wire.buf(head.reason);
    wire.text(b"\r\n");
    let keep_chunked = head.framing == ResponseFraming::Chunked;
    let mut length_seen = false;
    for field in &head.fields {
        let name = field.name.of(buf);
        if repeated_length(name, &mut length_seen) {
            continue;
        }
        let kept = match hop_by_hop_index(name) {
            Some(TRANSFER_ENCODING) => keep_chunked,
            Some(_) => false,
            None => !named_by_connection(buf, name, &head.connection.named, keep_chunked),
        };
        if kept {
            wire.field(field);
        }
    }
    if options.last {
        wire.text(b"Connection: close\r\n");
    } else if options.version == Version::Http10 {
        wire.text(b"Connection: keep-alive\r\n");
    }
    wire.text(b"\r\n");
    wire
}
