//! What a client is told when tether answers a request itself.
//!
//! A failure is classified once, where it is made: which side failed, the
//! status, the short reason carried by `x-tether-error` (and the metrics), and
//! whether the request may be sent again. [`ProxyError::into_response`] is the
//! one place such a failure becomes a response, so every answer tether makes
//! has the same shape.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::body::ProxyBody;
use super::headers::Rejection;
use crate::h1::H1Error;
use crate::pool::{PoolError, SendError};

/// Header carrying the reason of every response tether makes itself.
pub const ERROR_HEADER: &str = "x-tether-error";

/// Which side of the proxy a failure belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client sent something tether will not forward. It gets a 4xx, and
    /// its connection ends after it without a graceful close.
    Client,
    /// The upstream was unreachable, failed, or was too slow.
    Upstream,
    /// tether's own limits or configuration: no pooled connection became
    /// free in time, or no route serves the request's host. The client did
    /// nothing wrong, so its connection stays open.
    Tether,
}

/// What failed, in the words the response's detail and the logs use.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The request was refused before anything was forwarded.
    #[error("{0}")]
    Refused(Cow<'static, str>),
    /// No upstream connection could be had.
    #[error(transparent)]
    Pool(PoolError),
    /// The upstream failed before a response head arrived.
    #[error("upstream {addr} failed before responding: {detail}")]
    Send {
        /// The endpoint the request went to.
        addr: SocketAddr,
        /// What hyper said.
        detail: String,
    },
    /// No response head arrived within `request_timeout`.
    #[error(
        "no response head within request_timeout ({})",
        humantime::format_duration(*.0)
    )]
    ResponseTimeout(Duration),
    /// The upstream body failed while tether held it for an HTTP/1.0 client.
    #[error("upstream body failed: {0}")]
    Body(crate::pool::BodyError),
    /// The upstream body held for an HTTP/1.0 client did not end in time.
    #[error("upstream body did not finish within request_timeout")]
    BodyTimeout,
}

/// A request tether answers itself, with everything the answer needs.
#[derive(Debug)]
pub struct ProxyError {
    side: Side,
    status: StatusCode,
    reason: &'static str,
    retry_allowed: bool,
    failure: Failure,
}

impl ProxyError {
    fn new(side: Side, status: StatusCode, reason: &'static str, failure: Failure) -> Self {
        Self {
            side,
            status,
            reason,
            retry_allowed: false,
            failure,
        }
    }

    /// A request refused before forwarding: the client's fault.
    pub fn refused(
        status: StatusCode,
        reason: &'static str,
        detail: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self::new(
            Side::Client,
            status,
            reason,
            Failure::Refused(detail.into()),
        )
    }

    /// A request [`Rejection`] refuses, with the reason the client is told.
    pub fn rejected(rejection: Rejection) -> Self {
        let (status, reason) = rejection.answer();
        Self::refused(status, reason, rejection.detail())
    }

    /// A request head refused by the codec's checks or its rewrite: as a
    /// [`Rejection`] where it is one (so that its detail says what to do
    /// instead), else with the codec's own answer.
    pub fn from_head(error: H1Error) -> Self {
        match Rejection::from_h1(&error) {
            Some(rejection) => Self::rejected(rejection),
            None => {
                let (status, reason) = error.answer();
                Self::refused(status, reason, error.to_string())
            }
        }
    }

    /// No route of the listener matches `host`, and it has no default
    /// upstream: 403 `no-route`.
    pub fn no_route(host: Option<&str>) -> Self {
        let detail = match host {
            Some(host) => format!("no route of this listener serves host {host:?}"),
            None => {
                "the request names no host, and this listener has no default upstream".to_owned()
            }
        };
        Self::new(
            Side::Tether,
            StatusCode::FORBIDDEN,
            "no-route",
            Failure::Refused(detail.into()),
        )
    }

    /// The client's request body failed: bad framing, or the client went away.
    pub fn bad_request_body(detail: impl Into<Cow<'static, str>>) -> Self {
        Self::refused(StatusCode::BAD_REQUEST, "bad-request-body", detail)
    }

    /// No response head within `timeout` (the listener's `request_timeout`).
    pub fn response_timeout(timeout: Duration) -> Self {
        Self::upstream_timeout(Failure::ResponseTimeout(timeout))
    }

    /// The upstream body failed while it was held for an HTTP/1.0 client.
    pub fn body_failed(error: crate::pool::BodyError) -> Self {
        Self::upstream_failed(Failure::Body(error))
    }

    /// The upstream body held for an HTTP/1.0 client did not end in time.
    pub fn body_timeout() -> Self {
        Self::upstream_timeout(Failure::BodyTimeout)
    }

    fn upstream_failed(failure: Failure) -> Self {
        Self::new(
            Side::Upstream,
            StatusCode::BAD_GATEWAY,
            "upstream-failed",
            failure,
        )
    }

    fn upstream_timeout(failure: Failure) -> Self {
        Self::new(
            Side::Upstream,
            StatusCode::GATEWAY_TIMEOUT,
            "upstream-timeout",
            failure,
        )
    }

    /// A failed send to `addr`, and whether the request may go out once more
    /// on a fresh connection: a request never written may, whatever its
    /// method; one that was written may when `resend_safe` (the sender knows
    /// the backend did not process it, or that processing it twice is
    /// harmless). `client_body_failed` puts the failure on the client, whose
    /// body broke while it was being sent.
    pub(crate) fn send_failed(
        failure: &SendError,
        addr: SocketAddr,
        client_body_failed: bool,
        resend_safe: bool,
    ) -> Self {
        let (detail, retry_allowed) = match failure {
            SendError::Unsent(_, reason) => (
                reason
                    .as_ref()
                    .map_or_else(|| "connection closed".to_owned(), ToString::to_string),
                true,
            ),
            SendError::Failed(..) if client_body_failed => {
                return Self::bad_request_body("the client's request body failed")
            }
            SendError::Failed(source, _) => (source.to_string(), resend_safe),
        };
        Self {
            retry_allowed,
            ..Self::upstream_failed(Failure::Send { addr, detail })
        }
    }

    /// Which side failed.
    pub fn side(&self) -> Side {
        self.side
    }

    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The reason in `x-tether-error` and in the metrics.
    pub fn reason(&self) -> &'static str {
        self.reason
    }

    /// What failed.
    pub fn failure(&self) -> &Failure {
        &self.failure
    }

    /// Whether the failure leaves the request safe to send once more on a
    /// fresh connection. The service sends a request twice at most.
    pub fn retry_allowed(&self) -> bool {
        self.retry_allowed
    }

    /// The response: the status, the reason in [`ERROR_HEADER`], and
    /// `"<status> <reason>: <detail>\n"` as a plain-text body. It carries
    /// `Connection: close` when the exchange is the connection's `last`, and
    /// always when the client misbehaved.
    pub fn into_response(self, last: bool) -> Response<ProxyBody> {
        let body = format!(
            "{} {}: {}\n",
            self.status.as_u16(),
            self.reason,
            self.failure
        );
        let mut response = Response::new(ProxyBody::full(Bytes::from(body)));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.reason));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if last || self.side == Side::Client {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<PoolError> for ProxyError {
    /// 503 when the upstream is there but cannot take the request now (every
    /// connection busy, every endpoint ejected); any other failure to reach it
    /// is a 502.
    fn from(error: PoolError) -> Self {
        let (side, status) = match error {
            PoolError::Exhausted { .. } => (Side::Tether, StatusCode::SERVICE_UNAVAILABLE),
            PoolError::AllEjected { .. } => (Side::Upstream, StatusCode::SERVICE_UNAVAILABLE),
            _ => (Side::Upstream, StatusCode::BAD_GATEWAY),
        };
        Self::new(side, status, error.reason(), Failure::Pool(error))
    }
}

impl From<Rejection> for ProxyError {
    fn from(rejection: Rejection) -> Self {
        let (status, reason) = rejection.answer();
        Self::refused(status, reason, "request rejected before forwarding")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn text(response: Response<ProxyBody>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_refusal_names_its_reason_and_always_closes() {
        let response = ProxyError::from(Rejection::Connect).into_response(false);
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[ERROR_HEADER], "connect-not-supported");
        assert_eq!(response.headers()[header::CONNECTION], "close");
        assert_eq!(
            text(response).await,
            "405 connect-not-supported: request rejected before forwarding\n"
        );
    }

    #[tokio::test]
    async fn an_upstream_failure_closes_only_the_last_exchange() {
        let error = ProxyError::response_timeout(Duration::from_secs(2));
        assert_eq!(error.side(), Side::Upstream);
        let response = error.into_response(false);
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(response.headers().get(header::CONNECTION).is_none());
        assert_eq!(
            text(response).await,
            "504 upstream-timeout: no response head within request_timeout (2s)\n"
        );
        let response = ProxyError::body_timeout().into_response(true);
        assert_eq!(response.headers()[header::CONNECTION], "close");
    }

    #[test]
    fn pool_failures_keep_their_reason_and_an_exhausted_pool_is_tethers_own() {
        let addr: SocketAddr = ([127, 0, 0, 1], 80).into();
        let second = Duration::from_secs(1);
        let upstream = String::from("backend");
        let cases = [
            (
                PoolError::Exhausted {
                    addr,
                    waited: second,
                },
                Side::Tether,
                StatusCode::SERVICE_UNAVAILABLE,
                "pool-exhausted",
            ),
            (
                PoolError::AllEjected { upstream },
                Side::Upstream,
                StatusCode::SERVICE_UNAVAILABLE,
                "all-endpoints-ejected",
            ),
            (
                PoolError::ConnectTimeout {
                    addr,
                    after: second,
                },
                Side::Upstream,
                StatusCode::BAD_GATEWAY,
                "connect-timeout",
            ),
        ];
        for (pool_error, side, status, reason) in cases {
            let error = ProxyError::from(pool_error);
            assert_eq!(
                (error.side(), error.status(), error.reason()),
                (side, status, reason)
            );
            assert!(!error.retry_allowed());
        }
    }
}
