//! Heads as `http` types, for the consumers that need them (trailers handed
//! on as a `HeaderMap`, and a response the proxy must rework as a map): the
//! values are slices of the buffer the head arrived in, so nothing is
//! copied.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, StatusCode};

use super::error::H1Error;
use super::request::{Field, Version};
use super::response::{ResponseFraming, ResponseHead};

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

impl ResponseHead {
    /// The head as `http` response parts, its values slices of `bytes` (the
    /// buffer it was parsed from). Content-Length goes when
    /// Transfer-Encoding frames the body too, and Transfer-Encoding when the
    /// response has no body; the hop-by-hop fields stay, for the consumer's
    /// own rules.
    pub fn to_parts(&self, bytes: &Bytes) -> Result<http::response::Parts, H1Error> {
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status =
            StatusCode::from_u16(self.status).map_err(|_| H1Error::BadResponse("status"))?;
        parts.version = match self.version {
            Version::Http10 => http::Version::HTTP_10,
            Version::Http11 => http::Version::HTTP_11,
        };
        let mut headers = HeaderMap::with_capacity(self.fields.len());
        for field in &self.fields {
            let name = HeaderName::from_bytes(field.name.of(bytes))
                .map_err(|_| H1Error::BadResponse("field name"))?;
            if (name == CONTENT_LENGTH && self.conflicting_lengths)
                || (name == TRANSFER_ENCODING && self.framing == ResponseFraming::None)
            {
                continue;
            }
            let value =
                HeaderValue::from_maybe_shared(bytes.slice(field.value.start..field.value.end))
                    .map_err(|_| H1Error::BadResponse("field value"))?;
            headers.append(name, value);
        }
        parts.headers = headers;
        Ok(parts)
    }
}
