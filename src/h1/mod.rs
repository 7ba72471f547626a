//! The HTTP/1 codec of the fast path: request and response heads parsed with
//! `httparse` into byte ranges of the buffer they arrived in, a request head
//! rewritten for the next hop from those bytes in one copy, and bodies
//! framed by state machines that find where a message ends without copying it.
//! A leaf: it knows tether's header rules but nothing of sockets or pools.

mod body;
pub mod digits;
mod error;
mod parts;
mod request;
mod response;
mod rewrite;
mod span;
#[cfg(test)]
mod tests;

pub use body::{parse_trailers, BodyFramer, ChunkLimits, ChunkedBody, Decoded, Progress};
pub use error::H1Error;
pub use parts::field_map;
pub use request::{
    parse_request, Authority, ConnectionInfo, Field, HeadLimits, HostInfo, Parsed, RequestFraming,
    RequestHead, Scheme, TargetForm, Version,
};
pub use response::{parse_response, FieldText, KeepAlive, ResponseFraming, ResponseHead};
pub use rewrite::{upstream_request, RewriteOptions, Rewritten};
pub use span::Span;

pub(crate) use request::content_length;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// plus the legacy `Keep-Alive` and `Proxy-Connection`, lowercase. The one
/// table of them: `http::headers` builds its `HeaderName`s from it.
pub const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Where `name` (any case) stands in [`HOP_BY_HOP`], if it is hop-by-hop.
pub fn hop_by_hop_index(name: &[u8]) -> Option<usize> {
    HOP_BY_HOP
        .iter()
        .position(|hop| hop.as_bytes().eq_ignore_ascii_case(name))
}

/// Whether `name`, with `_` read as `-`, is `Content-Length` or
/// `Transfer-Encoding`: a backend that maps both to one variable (CGI's
/// `HTTP_CONTENT_LENGTH`) could frame the body by it, a smuggling vector.
pub fn spells_framing_header(name: &[u8]) -> bool {
    [&b"content-length"[..], b"transfer-encoding"]
        .iter()
        .any(|framing| {
            name.len() == framing.len()
                && name
                    .iter()
                    .zip(framing.iter())
                    .all(|(&a, &b)| a.eq_ignore_ascii_case(&b) || (a == b'_' && b == b'-'))
        })
}

/// The comma-separated tokens of a list-valued field (`Connection`, `TE`),
/// trimmed of spaces and tabs, empty ones skipped; nothing when the value is
/// not visible ASCII, SP and HTAB (as `HeaderValue::to_str` reads it).
pub(crate) fn list_tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    let readable = value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
    value
        .split(move |&b| readable && b == b',')
        .filter(move |_| readable)
        .map(trim_ows)
        .filter(|token| !token.is_empty())
}

/// `bytes` without leading and trailing spaces and tabs.
pub(crate) fn trim_ows(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |i| i + 1);
    &bytes[start..end.max(start)]
}
