//! The request head for the next hop, rewritten from the buffer it arrived
//! in: kept lines are copied as they came, and only the request line, Host
//! and X-Forwarded-For are written anew. The head is left open, without its
//! empty line, for the pool's writer, which adds its own framing field (the
//! client's Transfer-Encoding is dropped: the writer frames what it sends)
//! and `Connection: close` on a connection's last request.

use super::error::H1Error;
use super::hop_by_hop_index;
use super::request::{Field, RequestFraming, RequestHead, TargetForm};
use super::span::Span;
use crate::config::UnderscoresInHeaders;

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

/// What a request head's rewrite learnt besides the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    /// How many fields were dropped for a `_` in their name.
    pub dropped_underscored: u64,
    /// Whether the head kept a Content-Length, which then frames the body.
    pub has_length: bool,
}

/// A head copied into `out` as it is rewritten from `src`.
struct Flat<'a> {
    src: &'a [u8],
    out: &'a mut Vec<u8>,
}

impl Flat<'_> {
    fn span(&mut self, span: Span) {
        self.out.extend_from_slice(span.of(self.src));
    }

    fn text(&mut self, text: &'static [u8]) {
        self.out.extend_from_slice(text);
    }

    fn put(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// A kept field: its line as it came, or rebuilt with CRLF if it ended
    /// in a bare LF (never passed on: a next hop might read it otherwise).
    fn field(&mut self, field: &Field) {
        if field.crlf {
            self.span(field.line);
        } else {
            self.span(field.name);
            self.text(b": ");
            self.span(field.value);
            self.text(b"\r\n");
        }
    }
}

/// Appends to `out` the upstream form of `head` (parsed from `buf`):
/// origin-form target, HTTP/1.1, hop-by-hop fields (Transfer-Encoding
/// among them) and those `Connection` names removed (never Host or
/// Content-Length), one Content-Length of several that agree, names with
/// `_` dropped, passed or refused as `underscores` says (a spelling of a
/// framing header refused always), Host from an absolute-form target's
/// authority (userinfo left out) or the fallback, and the client appended
/// to X-Forwarded-For. The head is left open: no empty line.
pub fn upstream_request(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &RequestHead,
    options: &RewriteOptions<'_>,
) -> Result<Rewritten, H1Error> {
    let mut wire = Flat { src: buf, out };
    if head.underscore_framing {
        return Err(H1Error::UnderscoreFraming);
    }
    if options.underscores == UnderscoresInHeaders::Reject && !head.underscored.is_empty() {
        return Err(H1Error::UnderscoreInHeader);
    }
    wire.span(head.method);
    wire.text(b" ");
    match head.form {
        TargetForm::Absolute { path, .. } if path.is_empty() => wire.text(b"/"),
        TargetForm::Absolute { path, .. } => wire.span(path),
        _ => wire.span(head.target),
    }
    wire.text(b" HTTP/1.1\r\n");
    let target_host = match head.form {
        TargetForm::Absolute { authority, .. } => Some(authority.host),
        _ => None,
    };
    if let Some(host) = target_host {
        // RFC 9112 §3.2.2: the target's authority replaces Host.
        wire.text(b"Host: ");
        wire.span(host);
        wire.text(b"\r\n");
    } else if head.host.count == 0 && !options.fallback_host.is_empty() {
        wire.text(b"Host: ");
        wire.put(options.fallback_host);
        wire.text(b"\r\n");
    }
    let mut dropped_underscored = 0;
    let mut forwarded = Vec::new();
    let mut length_seen = false;
    for (index, field) in head.fields.iter().enumerate() {
        let name = field.name.of(buf);
        if repeated_length(name, &mut length_seen) {
            continue;
        }
        let kept = match hop_by_hop_index(name) {
            // Transfer-Encoding among them: the writer frames what it sends.
            Some(_) => false,
            None if target_host.is_some() && name.eq_ignore_ascii_case(b"host") => false,
            None if options.forwarded_for.is_some()
                && name.eq_ignore_ascii_case(b"x-forwarded-for") =>
            {
                forwarded.push(field.value);
                false
            }
            None => !named_by_connection(buf, name, &head.connection.named),
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
        forwarded_for(&mut wire, &forwarded, client);
    }
    Ok(Rewritten {
        dropped_underscored,
        has_length: matches!(head.framing, RequestFraming::Length(_)),
    })
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
/// message means).
fn named_by_connection(buf: &[u8], name: &[u8], named: &[Span]) -> bool {
    if name.eq_ignore_ascii_case(b"host") || name.eq_ignore_ascii_case(b"content-length") {
        return false;
    }
    named
        .iter()
        .any(|token| token.of(buf).eq_ignore_ascii_case(name))
}

/// One X-Forwarded-For: the prior values (those that are visible ASCII, as
/// the hyper path reads them) joined by `, `, then the client.
fn forwarded_for(wire: &mut Flat<'_>, prior: &[Span], client: &[u8]) {
    wire.text(b"X-Forwarded-For: ");
    for value in prior {
        let bytes = value.of(wire.src);
        if bytes
            .iter()
            .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
        {
            wire.span(*value);
            wire.text(b", ");
        }
    }
    wire.put(client);
    wire.text(b"\r\n");
}
