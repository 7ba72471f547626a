//! A response head parsed where it lies, framed by the request it answers
//! (RFC 9112 §6.3): HEAD, 1xx, 204 and 304 have no body, Transfer-Encoding
//! beats Content-Length, and without either the body runs to the close.

use std::mem::MaybeUninit;
use std::time::Duration;

use super::error::H1Error;
use super::request::{
    content_length, fields_of, ConnectionInfo, Field, HeadLimits, Parsed, Version,
};
use super::span::Span;
use super::{list_tokens, trim_ows};

/// Header slots on the stack: hyper's limit, and the most a response may have.
const MAX_FIELDS: usize = 100;

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body: HEAD, 1xx, 204, 304.
    None,
    /// Content-Length bytes.
    Length(u64),
    /// Transfer-Encoding ending in `chunked`.
    Chunked,
    /// The body runs until the upstream closes.
    Close,
}

/// The `Keep-Alive` parameters a backend announced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepAlive {
    /// `timeout=`: how long the backend keeps an idle connection.
    pub timeout: Option<Duration>,
    /// `max=`: how many more requests it will take on it.
    pub max: Option<u64>,
}

/// One field of a head as text: its name, its value and, when it can be
/// passed on as it came, its whole line.
#[derive(Debug, Clone, Copy)]
pub struct FieldText<'a> {
    /// The name, as sent.
    pub name: &'a [u8],
    /// The value, without surrounding whitespace.
    pub value: &'a [u8],
    /// The line from the name to its CRLF, when it ends in one.
    pub line: Option<&'a [u8]>,
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Bytes of the buffer the head takes; the body starts here.
    pub len: usize,
    /// The version.
    pub version: Version,
    /// The status code.
    pub status: u16,
    /// The reason phrase.
    pub reason: Span,
    /// The header fields, in order.
    pub fields: Vec<Field>,
    /// How the body is delimited.
    pub framing: ResponseFraming,
    /// Both Content-Length and Transfer-Encoding: framed by the latter, and
    /// the connection must not be reused (RFC 9112 §6.3).
    pub conflicting_lengths: bool,
    /// The `Connection` tokens.
    pub connection: ConnectionInfo,
    /// The `Keep-Alive` parameters.
    pub keep_alive: KeepAlive,
}

impl ResponseHead {
    /// The fields that cross a proxy, as `(name, value, line)` slices of
    /// `buf` (the buffer the head was parsed from; `line` is the whole line
    /// with its CRLF, none when it ended in a bare LF), in order: hop-by-hop fields
    /// and those the `Connection` field names are left out (never Host or
    /// Content-Length, whose removal would change what the message means),
    /// and so is Content-Length when Transfer-Encoding frames the body too.
    pub fn end_to_end<'a>(&'a self, buf: &'a [u8]) -> impl Iterator<Item = FieldText<'a>> {
        self.fields.iter().filter_map(move |field| {
            let name = field.name.of(buf);
            let length = name.eq_ignore_ascii_case(b"content-length");
            let dropped = if length {
                self.conflicting_lengths
            } else {
                super::hop_by_hop_index(name).is_some()
                    || (!name.eq_ignore_ascii_case(b"host")
                        && self
                            .connection
                            .named
                            .iter()
                            .any(|token| token.of(buf).eq_ignore_ascii_case(name)))
            };
            (!dropped).then(|| FieldText {
                name,
                value: field.value.of(buf),
                line: field.crlf.then(|| field.line.of(buf)),
            })
        })
    }

    /// Whether the upstream connection may carry another request after this
    /// response: HTTP/1.1 without `close` (HTTP/1.0 with `keep-alive`), a
    /// body with an end the codec can find, and no conflicting lengths.
    pub fn reusable(&self) -> bool {
        reusable(
            self.version,
            &self.connection,
            self.framing,
            self.conflicting_lengths,
        )
    }
}

/// The length of a response head `httparse` read from a buffer of
/// `buffered` bytes, or `None` while it is incomplete within the limit.
fn head_len(
    parsed: httparse::Result<usize>,
    buffered: usize,
    limits: HeadLimits,
) -> Result<Option<usize>, H1Error> {
    match parsed {
        Ok(httparse::Status::Complete(len)) if len <= limits.max_head_bytes => Ok(Some(len)),
        Ok(httparse::Status::Partial) if buffered < limits.max_head_bytes => Ok(None),
        Ok(_) => Err(H1Error::BadResponse("head too large")),
        Err(httparse::Error::TooManyHeaders) => Err(H1Error::BadResponse("too many headers")),
        Err(_) => Err(H1Error::BadResponse("syntax")),
    }
}

/// The version `httparse` read in a response's status line.
fn response_version(minor: Option<u8>) -> Result<Version, H1Error> {
    match minor {
        Some(0) => Ok(Version::Http10),
        Some(1) => Ok(Version::Http11),
        _ => Err(H1Error::BadResponse("version")),
    }
}

/// Whether a response of `version`, whose `Connection` tokens are
/// `connection`, leaves its connection open for another request.
fn reusable(
    version: Version,
    connection: &ConnectionInfo,
    framing: ResponseFraming,
    conflicting_lengths: bool,
) -> bool {
    let persistent = match version {
        Version::Http11 => !connection.close,
        Version::Http10 => connection.keep_alive && !connection.close,
    };
    persistent && framing != ResponseFraming::Close && !conflicting_lengths
}

/// Parses the response head at the start of `buf`, the answer to a HEAD
/// request when `head_request`. `Partial` until the head is complete.
pub fn parse_response(
    buf: &[u8],
    limits: HeadLimits,
    head_request: bool,
) -> Result<Parsed<ResponseHead>, H1Error> {
    // Slots on the stack, left uninitialised: httparse writes those it uses.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut slots[..limits.max_headers.min(MAX_FIELDS)],
    );
    let Some(len) = head_len(parsed, buf.len(), limits)? else {
        return Ok(Parsed::Partial);
    };
    let version = response_version(response.version)?;
    let status = response.code.ok_or(H1Error::BadResponse("status"))?;
    let reason = response
        .reason
        .and_then(|r| Span::within(buf, r.as_bytes()))
        .unwrap_or_default();
    let fields = fields_of(buf, response.headers).map_err(|_| H1Error::BadResponse("fields"))?;
    let mut head = ResponseHead {
        len,
        version,
        status,
        reason,
        fields,
        framing: ResponseFraming::Close,
        conflicting_lengths: false,
        connection: ConnectionInfo::default(),
        keep_alive: KeepAlive::default(),
    };
    scan_response_fields(buf, &mut head, head_request)?;
    Ok(Parsed::Complete(head))
}

fn scan_response_fields(
    buf: &[u8],
    head: &mut ResponseHead,
    head_request: bool,
) -> Result<(), H1Error> {
    let mut scan = FieldScan::default();
    for field in &head.fields {
        scan.field(buf, field.name.of(buf), field.value.of(buf))?;
    }
    let framed = scan.finish(head.status, head_request);
    head.framing = framed.framing;
    head.conflicting_lengths = framed.conflicting_lengths;
    head.connection = framed.connection;
    head.keep_alive = framed.keep_alive;
    Ok(())
}

/// What a response's fields say of its framing and its connection, read
/// one field at a time.
#[derive(Default)]
struct FieldScan {
    length: Option<u64>,
    encoding: bool,
    chunked: bool,
    connection: ConnectionInfo,
    keep_alive: KeepAlive,
}

/// What [`FieldScan::finish`] concludes.
struct Framed {
    framing: ResponseFraming,
    conflicting_lengths: bool,
    connection: ConnectionInfo,
    keep_alive: KeepAlive,
}

impl FieldScan {
    /// Takes note of one field, `name` (any case) and `value` slices of
    /// `buf`. Names are told apart by length first: most fields are none
    /// of the four that matter.
    fn field(&mut self, buf: &[u8], name: &[u8], value: &[u8]) -> Result<(), H1Error> {
        match name.len() {
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                let this = content_length(value).ok_or(H1Error::BadResponse("content-length"))?;
                if self.length.is_some_and(|prior| prior != this) {
                    return Err(H1Error::BadResponse("differing content-lengths"));
                }
                self.length = Some(this);
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                self.encoding = true;
                let last = value.rsplit(|&b| b == b',').next().map(trim_ows);
                self.chunked = last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
            }
            10 if name.eq_ignore_ascii_case(b"connection") => {
                for token in list_tokens(value) {
                    let info = &mut self.connection;
                    if token.eq_ignore_ascii_case(b"close") {
                        info.close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        info.keep_alive = true;
                    } else if let Some(span) = Span::within(buf, token) {
                        info.upgrade |= token.eq_ignore_ascii_case(b"upgrade");
                        info.named.push(span);
                    }
                }
            }
            10 if name.eq_ignore_ascii_case(b"keep-alive") => {
                self.keep_alive = keep_alive_params(value, self.keep_alive);
            }
            _ => {}
        }
        Ok(())
    }

    /// The framing of a response with `status` (to a HEAD request when
    /// `head_request`), RFC 9112 §6.3.
    fn finish(self, status: u16, head_request: bool) -> Framed {
        let bodiless = head_request || (100..200).contains(&status) || matches!(status, 204 | 304);
        let framing = match (bodiless, self.encoding, self.length) {
            (true, _, _) => ResponseFraming::None,
            (false, true, _) if self.chunked => ResponseFraming::Chunked,
            (false, true, _) => ResponseFraming::Close,
            (false, false, Some(length)) => ResponseFraming::Length(length),
            (false, false, None) => ResponseFraming::Close,
        };
        Framed {
            framing,
            conflicting_lengths: self.encoding && self.length.is_some(),
            connection: self.connection,
            keep_alive: self.keep_alive,
        }
    }
}

/// `timeout=` (seconds) and `max=` of a `Keep-Alive` value, over `prior`;
/// parameters it does not know, or cannot read, are ignored.
fn keep_alive_params(value: &[u8], mut prior: KeepAlive) -> KeepAlive {
    for token in list_tokens(value) {
        let Some(eq) = memchr::memchr(b'=', token) else {
            continue;
        };
        let (key, number) = (trim_ows(&token[..eq]), trim_ows(&token[eq + 1..]));
        let Some(number) = content_length(number) else {
            continue;
        };
        if key.eq_ignore_ascii_case(b"timeout") {
            prior.timeout = Some(Duration::from_secs(number));
        } else if key.eq_ignore_ascii_case(b"max") {
            prior.max = Some(number);
        }
    }
    prior
}
