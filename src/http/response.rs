//! The upstream's response as the client gets it: hop-by-hop headers gone,
//! `Connection: close` on the connection's last exchange, and, for an HTTP/1.0
//! client (which cannot read a chunked body), the body held in memory up to
//! `http10_buffer` so that it can carry a Content-Length.
//!
//! An HTTP/1.x upstream's head is relayed as it came ([`ClientHead::Relay`]):
//! its end-to-end fields go to the client from the bytes they arrived in,
//! and no header map is built. Only a head the proxy must change (a length
//! for an HTTP/1.0 client) becomes `http` parts first, as tether's own
//! answers and HTTP/2 heads are.

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::body::ProxyBody;
use super::error::{ProxyError, ERROR_HEADER};
use super::{headers, Binding, Target};
use crate::h1::ResponseFraming;
use crate::pool::{BodyError, Http1Head, Lease, ResponseBody, UpstreamHead, UpstreamResponse};

/// A response as the client's connection writes it.
pub struct ProxyResponse {
    /// The head.
    pub head: ClientHead,
    /// The body.
    pub body: ProxyBody,
}

/// A response head for the client.
pub enum ClientHead {
    /// A head as `http` parts, hop-by-hop fields already gone: tether's own
    /// answers, HTTP/2 upstreams' heads, and heads the proxy changed.
    Parts(http::response::Parts),
    /// An HTTP/1.x upstream's head, relayed: its end-to-end fields as they
    /// came, and `Connection: close` when `last`.
    Relay {
        /// The upstream's head.
        head: Http1Head,
        /// The exchange ends the client connection.
        last: bool,
    },
}

impl ProxyResponse {
    /// The status.
    pub fn status(&self) -> StatusCode {
        match &self.head {
            ClientHead::Parts(parts) => parts.status,
            ClientHead::Relay { head, .. } => head.status,
        }
    }

    /// tether's reason for an answer of its own (its [`ERROR_HEADER`]);
    /// none for an upstream's response.
    pub fn error_reason(&self) -> Option<&str> {
        match &self.head {
            ClientHead::Parts(parts) => parts.headers.get(ERROR_HEADER)?.to_str().ok(),
            ClientHead::Relay { .. } => None,
        }
    }

    /// Whether the head says `Connection: close`.
    pub fn says_close(&self) -> bool {
        match &self.head {
            ClientHead::Parts(parts) => {
                crate::connection_header::has_token(&parts.headers, "close")
            }
            ClientHead::Relay { last, .. } => *last,
        }
    }

    /// The response with its body wrapped by `wrap`.
    pub fn map_body(self, wrap: impl FnOnce(ProxyBody) -> ProxyBody) -> Self {
        Self {
            head: self.head,
            body: wrap(self.body),
        }
    }
}

impl From<Response<ProxyBody>> for ProxyResponse {
    fn from(response: Response<ProxyBody>) -> Self {
        let (head, body) = response.into_parts();
        Self {
            head: ClientHead::Parts(head),
            body,
        }
    }
}

/// What the response must fit, from the request it answers.
pub(super) struct Exchange {
    /// The client's HTTP version.
    pub client_version: Version,
    /// The request was HEAD: its response has no body to hold.
    pub head_request: bool,
    /// The exchange ends the client connection.
    pub last: bool,
    /// When the listener's `request_timeout` runs out.
    pub deadline: Instant,
}

/// Turns the response of `target`'s upstream into the client's. The lease goes with the
/// body, or back to the pool at once when the body was read whole here.
pub(super) async fn respond(
    binding: &Binding,
    target: &Target,
    response: UpstreamResponse,
    mut lease: Lease,
    exchange: &Exchange,
) -> Result<ProxyResponse, ProxyError> {
    let UpstreamResponse { head, mut body } = response;
    if target.pool.settings().health.eject_on_5xx {
        lease.record_outcome(!head.status().is_server_error());
    }
    let head = match head {
        UpstreamHead::Http1(head) if !needs_length(&head, exchange) => {
            return Ok(ProxyResponse {
                head: ClientHead::Relay {
                    head,
                    last: exchange.last,
                },
                body: ProxyBody::upstream(None, body, lease),
            });
        }
        head => head.into_parts(),
    };
    let mut head = match head {
        Ok(head) => head,
        Err(e) => {
            // The lease, dropped holding the connection, discards it.
            lease.take_back(&mut body);
            return Err(ProxyError::body_failed(BodyError::Upstream(e.into())));
        }
    };
    headers::strip_hop_by_hop(&mut head.headers);
    head.version = Version::HTTP_11;
    if exchange.last {
        head.headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let needs_length = exchange.client_version == Version::HTTP_10
        && !exchange.head_request
        && !head.headers.contains_key(header::CONTENT_LENGTH)
        && body_allowed(head.status);
    if !needs_length {
        return Ok(Response::from_parts(head, ProxyBody::upstream(None, body, lease)).into());
    }
    let limit = binding.listener.http10_buffer.as_usize();
    let buffered = Box::pin(tokio::time::timeout_at(
        exchange.deadline,
        buffer_up_to(&mut body, limit),
    ))
    .await;
    match buffered {
        Ok(Ok(Buffered::Whole(bytes))) => {
            lease.release(&mut body);
            head.headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            Ok(Response::from_parts(head, ProxyBody::full(bytes)).into())
        }
        Ok(Ok(Buffered::Prefix(prefix))) => {
            Ok(Response::from_parts(head, ProxyBody::upstream(Some(prefix), body, lease)).into())
        }
        failed => {
            // The lease, dropped holding the connection, discards it.
            lease.take_back(&mut body);
            match failed {
                Ok(Err(e)) => Err(ProxyError::body_failed(e)),
                _ => Err(ProxyError::body_timeout()),
            }
        }
    }
}

/// Whether an HTTP/1.0 client needs a length the upstream's head does not
/// give (the head is then reworked, and the body held to measure it).
fn needs_length(head: &Http1Head, exchange: &Exchange) -> bool {
    exchange.client_version == Version::HTTP_10
        && !exchange.head_request
        && !matches!(head.head.framing, ResponseFraming::Length(_))
        && body_allowed(head.status)
}

fn body_allowed(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// What [`buffer_up_to`] read.
enum Buffered {
    /// The whole body.
    Whole(Bytes),
    /// The first part of a longer body; the rest is still to be read.
    Prefix(Bytes),
}

/// Reads `body` until it ends or exceeds `limit` bytes.
async fn buffer_up_to(body: &mut ResponseBody, limit: usize) -> Result<Buffered, BodyError> {
    let mut buffer = BytesMut::new();
    loop {
        if buffer.len() > limit {
            return Ok(Buffered::Prefix(buffer.freeze()));
        }
        match body.frame().await {
            None => return Ok(Buffered::Whole(buffer.freeze())),
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    buffer.extend_from_slice(&data);
                }
                if body.is_end_stream() {
                    return Ok(Buffered::Whole(buffer.freeze()));
                }
            }
        }
    }
}
