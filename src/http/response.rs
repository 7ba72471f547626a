//! The upstream's response as the client gets it: hop-by-hop headers gone,
//! `Connection: close` on the connection's last exchange, and, for an HTTP/1.0
//! client (which cannot read a chunked body), the body held in memory up to
//! `http10_buffer` so that it can carry a Content-Length.

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::body::ProxyBody;
use super::error::ProxyError;
use super::{headers, Binding, Target};
use crate::pool::{BodyError, Lease, ResponseBody};

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
    response: Response<ResponseBody>,
    mut lease: Lease,
    exchange: &Exchange,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (mut head, mut body) = response.into_parts();
    if target.pool.settings().health.eject_on_5xx {
        lease.record_outcome(!head.status.is_server_error());
    }
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
        return Ok(Response::from_parts(
            head,
            ProxyBody::upstream(None, body, lease),
        ));
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
            Ok(Response::from_parts(head, ProxyBody::full(bytes)))
        }
        Ok(Ok(Buffered::Prefix(prefix))) => Ok(Response::from_parts(
            head,
            ProxyBody::upstream(Some(prefix), body, lease),
        )),
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
