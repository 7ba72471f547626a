//! A request as the pool sends it: its head in one of two forms, and the
//! body. An HTTP/1.1 head the proxy rewrote from the client's own bytes goes
//! out as those bytes, with no header map between; `http` parts carry the
//! heads of HTTP/2 streams, which hyper encodes, and of the pool's own probes.

use http::Method;

use super::body::UpstreamBody;

/// A request for an upstream connection or stream.
pub struct UpstreamRequest {
    /// The head.
    pub head: OutboundHead,
    /// The body.
    pub body: UpstreamBody,
}

/// The head of an [`UpstreamRequest`].
#[derive(Debug)]
pub enum OutboundHead {
    /// An HTTP/1.1 head already on the wire's terms.
    Http1(Http1Request),
    /// `http` parts, encoded where they are sent (by hyper for HTTP/2);
    /// boxed, so that the request of the HTTP/1.1 path, moved between await
    /// points, does not carry their size.
    Parts(Box<http::request::Parts>),
}

/// An HTTP/1.1 request head as the next hop reads it: the request line and
/// the end-to-end fields, each ended by CRLF, but not the empty line. The
/// exchange adds its framing field when the head has none, `Connection:
/// close` on a connection's last request, and the empty line.
#[derive(Debug, Clone)]
pub struct Http1Request {
    /// The method, for what depends on it: a HEAD's response has no body,
    /// and only an idempotent request may be sent twice.
    pub method: Method,
    /// The head's bytes: a `Vec`, which freezing into `Bytes` would give a
    /// second allocation; the exchange hands the head back on failure, so
    /// it is copied only if the request is sent again elsewhere.
    pub head: Vec<u8>,
    /// The head carries a Content-Length, which frames the body.
    pub has_length: bool,
}

impl OutboundHead {
    /// The request's method.
    pub fn method(&self) -> &Method {
        match self {
            Self::Http1(head) => &head.method,
            Self::Parts(parts) => &parts.method,
        }
    }

    /// A copy to send again; parts are copied without their extensions.
    pub fn replay_copy(&self) -> Self {
        match self {
            Self::Http1(head) => Self::Http1(head.clone()),
            Self::Parts(parts) => {
                let (mut head, ()) = http::Request::new(()).into_parts();
                head.method = parts.method.clone();
                head.uri = parts.uri.clone();
                head.version = parts.version;
                head.headers = parts.headers.clone();
                Self::Parts(Box::new(head))
            }
        }
    }
}

impl From<http::Request<UpstreamBody>> for UpstreamRequest {
    fn from(request: http::Request<UpstreamBody>) -> Self {
        let (parts, body) = request.into_parts();
        Self {
            head: OutboundHead::Parts(Box::new(parts)),
            body,
        }
    }
}
