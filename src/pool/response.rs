//! What the pool hands back for a request: the response head as the
//! upstream's protocol delivered it, and the body (see [`ResponseBody`]).
//!
//! An HTTP/1.1 head stays the bytes it arrived in, with the spans the codec
//! found: the proxy relays its fields from there and builds no header map
//! unless it must rework the head. An HTTP/2 head is hyper's `http` parts.

use bytes::Bytes;
use http::StatusCode;

use super::body::ResponseBody;
use crate::h1::{self, H1Error};

/// A response from a pooled connection: its head and its body.
pub struct UpstreamResponse {
    /// The head.
    pub head: UpstreamHead,
    /// The body, which holds an HTTP/1.1 connection while it is read.
    pub body: ResponseBody,
}

/// A response head as the pool read it.
#[derive(Debug)]
pub enum UpstreamHead {
    /// An HTTP/1.1 exchange's head, parsed where it lies.
    Http1(Http1Head),
    /// An HTTP/2 stream's head, as hyper built it.
    Parts(http::response::Parts),
}

/// An HTTP/1.x response head: the bytes it was read from and what the
/// codec found in them.
#[derive(Debug)]
pub struct Http1Head {
    /// The status, checked to be one `http` accepts.
    pub status: StatusCode,
    /// The bytes the head was parsed from (the head alone).
    pub bytes: Bytes,
    /// The spans and facts of the head, into `bytes`.
    pub head: h1::ResponseHead,
}

impl Http1Head {
    /// The head parsed at the front of `bytes`; `Err` for a status `http`
    /// does not accept (below 100).
    pub(crate) fn new(head: h1::ResponseHead, bytes: Bytes) -> Result<Self, H1Error> {
        let status =
            StatusCode::from_u16(head.status).map_err(|_| H1Error::BadResponse("status"))?;
        Ok(Self {
            status,
            bytes,
            head,
        })
    }

    /// The fields that cross a proxy (see [`h1::ResponseHead::end_to_end`]).
    pub fn end_to_end(&self) -> impl Iterator<Item = h1::FieldText<'_>> {
        self.head.end_to_end(&self.bytes)
    }

    /// The reason phrase as the upstream sent it.
    pub fn reason(&self) -> &[u8] {
        self.head.reason.of(&self.bytes)
    }
}

impl UpstreamHead {
    /// The status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Http1(head) => head.status,
            Self::Parts(parts) => parts.status,
        }
    }

    /// The head as `http` parts, for a consumer that reworks it as a map.
    pub fn into_parts(self) -> Result<http::response::Parts, H1Error> {
        match self {
            Self::Http1(head) => head.head.to_parts(&head.bytes),
            Self::Parts(parts) => Ok(parts),
        }
    }
}
