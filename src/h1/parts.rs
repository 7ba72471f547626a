//! A response head read straight into `http` parts, for a consumer that
//! hands the response on as an `http::Response` (the pool's HTTP/1.1
//! exchanges): one pass over `httparse`'s fields builds the header map,
//! whose values are slices of the buffer the head arrived in, and learns
//! the framing as [`parse_response`](super::parse_response) does.

use std::mem::MaybeUninit;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, StatusCode};

use super::error::H1Error;
use super::request::{Field, HeadLimits, Parsed, Version};
use super::response::{
    head_len, response_version, reusable, FieldScan, KeepAlive, ResponseFraming,
};

/// Header slots on the stack: hyper's limit, and the most a response may have.
const MAX_FIELDS: usize = 100;
/// `Keep-Alive`, which the `http` crate has no constant for.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// A response head as `http` parts, with what the codec learned of it.
#[derive(Debug)]
pub struct ResponseParts {
    /// Bytes of the buffer the head takes; the body starts here.
    pub len: usize,
    /// Status, version and header map (Content-Length removed when
    /// Transfer-Encoding frames the body too).
    pub parts: http::response::Parts,
    /// How the body is delimited.
    pub framing: ResponseFraming,
    /// Whether the connection may carry another request after it (see
    /// [`ResponseHead::reusable`](super::ResponseHead::reusable)).
    pub reusable: bool,
    /// The `Keep-Alive` parameters.
    pub keep_alive: KeepAlive,
}

/// A header map of `fields` (from [`parse_trailers`](super::parse_trailers),
/// say), their values slices of `bytes`, the buffer they were parsed in.
pub fn field_map(bytes: &Bytes, fields: &[Field]) -> Result<HeaderMap, H1Error> {
    let mut map = HeaderMap::with_capacity(fields.len());
    for field in fields {
        let name = HeaderName::from_bytes(field.name.of(bytes))
            .map_err(|_| H1Error::BadChunk("trailer name"))?;
        let value = HeaderValue::from_maybe_shared(bytes.slice(field.value.start..field.value.end))
            .map_err(|_| H1Error::BadChunk("trailer value"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// Parses the response head at the start of `buf`, the answer to a HEAD
/// request when `head_request`. `Partial` until the head is complete; on
/// `Partial` nothing refers to `buf`.
pub fn parse_response_parts(
    buf: &Bytes,
    limits: HeadLimits,
    head_request: bool,
) -> Result<Parsed<ResponseParts>, H1Error> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut response = httparse::Response::new(&mut []);
    let fields = limits.max_headers.min(MAX_FIELDS);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut slots[..fields],
    );
    let Some(len) = head_len(parsed, buf.len(), limits)? else {
        return Ok(Parsed::Partial);
    };
    let version = response_version(response.version)?;
    let code = response.code.ok_or(H1Error::BadResponse("status"))?;
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = StatusCode::from_u16(code).map_err(|_| H1Error::BadResponse("status"))?;
    parts.version = match version {
        Version::Http10 => http::Version::HTTP_10,
        Version::Http11 => http::Version::HTTP_11,
    };
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    let mut scan = FieldScan::default();
    for field in response.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| H1Error::BadResponse("field name"))?;
        // Told apart as names, which for standard ones costs a compare of
        // two small numbers: most fields are none of these four.
        if name == CONTENT_LENGTH
            || name == TRANSFER_ENCODING
            || name == CONNECTION
            || name == KEEP_ALIVE
        {
            scan.field(buf, name.as_str().as_bytes(), field.value)?;
        }
        let value = HeaderValue::from_maybe_shared(buf.slice_ref(field.value))
            .map_err(|_| H1Error::BadResponse("field value"))?;
        headers.append(name, value);
    }
    let framed = scan.finish(code, head_request);
    if framed.conflicting_lengths {
        // Transfer-Encoding frames it (RFC 9112 §6.3): the length is wrong.
        headers.remove(CONTENT_LENGTH);
    }
    parts.headers = headers;
    Ok(Parsed::Complete(ResponseParts {
        len,
        parts,
        framing: framed.framing,
        reusable: reusable(
            version,
            &framed.connection,
            framed.framing,
            framed.conflicting_lengths,
        ),
        keep_alive: framed.keep_alive,
    }))
}
