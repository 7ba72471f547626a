//! The proxy service: what happens to one request between the client connection
//! and the pool. Header rules, the pre-read of the request body, the single
//! retry of a request that failed on a reused connection, error responses with
//! a reason, the request timeout, and HTTP/1.0 response buffering.

pub mod body;
pub mod headers;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::config::{ClientClose, ListenerConfig};
use crate::downstream::ConnState;
use crate::metrics::{ListenerLabel, Metrics, Name, ReasonLabels, RequestLabels};
use crate::pool::{
    refused_by_peer, BodyError, Lease, Pool, PoolError, ResponseBody, SendError, UpstreamBody,
};
use body::{prefetch, ProxyBody};

/// Header carrying the reason of every response tether makes itself.
pub const ERROR_HEADER: &str = "x-tether-error";

/// A listener bound to its upstream pool: what it forwards to, shared by its
/// connections.
pub struct Binding {
    /// The listener's name as a metric label.
    pub label: Name,
    /// The listener's settings.
    pub listener: ListenerConfig,
    /// The upstream's pool.
    pub pool: Pool,
    /// Host sent upstream when an HTTP/1.0 client sent none.
    pub fallback_host: String,
    /// Where outcomes are counted.
    pub metrics: Arc<Metrics>,
    /// The per-request handles into `metrics`.
    pub counters: BindingMetrics,
}

/// Metric handles a binding touches on every request, resolved once so the
/// request path does no label hashing.
pub struct BindingMetrics {
    by_class: [prometheus_client::metrics::counter::Counter; 5],
    latency: prometheus_client::metrics::histogram::Histogram,
}

impl BindingMetrics {
    /// Resolves the handles of listener `label`.
    pub fn new(metrics: &Metrics, label: &Name) -> Self {
        let class = |class: &'static str| {
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    listener: label.clone(),
                    class,
                })
                .clone()
        };
        Self {
            by_class: ["1xx", "2xx", "3xx", "4xx", "5xx"].map(class),
            latency: metrics
                .response_latency
                .get_or_create(&ListenerLabel {
                    listener: label.clone(),
                })
                .clone(),
        }
    }
}

impl Binding {
    /// Counts one answered request, and its reason when tether made the response.
    pub fn record(&self, status: StatusCode, reason: Option<&str>, started: Option<Instant>) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.counters.by_class[class].inc();
        if let Some(reason) = reason {
            self.metrics
                .local_responses
                .get_or_create(&ReasonLabels {
                    listener: self.label.clone(),
                    reason: Name::from(reason),
                })
                .inc();
        }
        if let Some(started) = started {
            self.counters
                .latency
                .observe(started.elapsed().as_secs_f64());
        }
    }
}

/// The hyper service of one client connection.
#[derive(Clone)]
pub struct ProxyService {
    binding: Arc<Binding>,
    conn: Arc<ConnState>,
    client: Option<IpAddr>,
    /// The client's address as X-Forwarded-For appends it.
    forwarded_for: Option<HeaderValue>,
}

type ServiceFuture = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = ServiceFuture;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.conn.exchange_started();
        let this = self.clone();
        Box::pin(async move {
            let started = Instant::now();
            let done = this.conn.clone();
            let binding = this.binding.clone();
            let response = this.handle(request, started).await;
            let reason = response
                .headers()
                .get(ERROR_HEADER)
                .and_then(|v| v.to_str().ok());
            binding.record(response.status(), reason, Some(started));
            Ok(response.map(|body| body.on_done(done)))
        })
    }
}

/// Why forwarding failed, before any response head reached the client.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("upstream {addr} failed before responding: {detail}")]
    Upstream { addr: SocketAddr, detail: String },
    #[error("the client's request body failed")]
    ClientBody,
}

impl ProxyService {
    /// A service for one accepted connection.
    pub fn new(binding: Arc<Binding>, conn: Arc<ConnState>, client: Option<SocketAddr>) -> Self {
        let client = client.map(|a| a.ip());
        Self {
            binding,
            conn,
            client,
            forwarded_for: client.and_then(headers::forwarded_for_value),
        }
    }

    async fn handle(self, request: Request<Incoming>, started: Instant) -> Response<ProxyBody> {
        let listener = &self.binding.listener;
        let served = self.conn.count_request();
        let limit = listener.max_requests_per_connection;
        let last = headers::client_ends_connection(&request)
            || (limit > 0 && served >= limit)
            || self.conn.draining();

        if self.conn.take_ambiguous_framing() {
            return self.refuse(
                StatusCode::BAD_REQUEST,
                "ambiguous-framing",
                "Content-Length together with Transfer-Encoding",
            );
        }
        if last && listener.client_close == ClientClose::Graceful {
            self.conn.fin_after_response();
        }
        if let Some(reason) = headers::reject_reason(&request) {
            let status = if reason == "connect-not-supported" {
                StatusCode::METHOD_NOT_ALLOWED
            } else {
                StatusCode::BAD_REQUEST
            };
            return self.refuse(status, reason, "request rejected before forwarding");
        }

        let client_version = request.version();
        let method = request.method().clone();
        let (mut parts, body) = request.into_parts();
        headers::prepare_upstream(
            &mut parts,
            self.forwarded_for.as_ref(),
            listener.forwarded_for,
            &self.binding.fallback_host,
        );
        if self.binding.pool.settings().protocol == crate::config::Protocol::Http2 {
            headers::to_http2_form(&mut parts);
        }

        let deadline = started + listener.request_timeout;
        let limit = listener.request_buffer.as_usize();
        // Most requests have no body: no timer and no read for them. The read
        // of a body is boxed so its state does not enlarge every request's
        // future (which is copied whole when hyper boxes it).
        let prefetched = if body.is_end_stream() {
            Ok(Ok(UpstreamBody::from_bytes(None)))
        } else {
            Box::pin(tokio::time::timeout_at(deadline, prefetch(body, limit))).await
        };
        let body = match prefetched {
            Ok(Ok(body)) => body,
            Ok(Err(e)) => {
                return self.refuse(StatusCode::BAD_REQUEST, "bad-request-body", &e.to_string())
            }
            Err(_) => {
                return self.refuse(
                    StatusCode::REQUEST_TIMEOUT,
                    "client-body-timeout",
                    "the request body did not arrive within request_timeout",
                )
            }
        };

        let forwarded = tokio::time::timeout_at(deadline, self.forward(parts, body)).await;
        let (response, lease) = match forwarded {
            Ok(Ok(pair)) => pair,
            Ok(Err(e @ ForwardError::ClientBody)) => {
                return self.refuse(StatusCode::BAD_REQUEST, "bad-request-body", &e.to_string())
            }
            Ok(Err(ForwardError::Pool(e))) => {
                tracing::warn!(upstream = %self.binding.pool.name(), error = %e, "no upstream connection");
                let status = match e {
                    PoolError::Exhausted { .. } | PoolError::AllEjected { .. } => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                    _ => StatusCode::BAD_GATEWAY,
                };
                return error_response(status, e.reason(), &e.to_string(), last);
            }
            Ok(Err(e @ ForwardError::Upstream { .. })) => {
                tracing::warn!(upstream = %self.binding.pool.name(), error = %e, "upstream request failed");
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    "upstream-failed",
                    &e.to_string(),
                    last,
                );
            }
            Err(_) => {
                tracing::warn!(upstream = %self.binding.pool.name(), timeout = ?listener.request_timeout, "upstream response timed out");
                return error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream-timeout",
                    &format!(
                        "no response head within request_timeout ({})",
                        humantime::format_duration(listener.request_timeout)
                    ),
                    last,
                );
            }
        };

        let (mut head, upstream_body) = response.into_parts();
        let mut lease = lease;
        lease.note_response(&head.headers);
        if listener_counts_5xx(&self.binding) {
            lease.record_outcome(!head.status.is_server_error());
        }
        headers::strip_hop_by_hop(&mut head.headers);
        head.version = Version::HTTP_11;
        if last {
            head.headers
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let needs_length = client_version == Version::HTTP_10
            && method != Method::HEAD
            && !head.headers.contains_key(header::CONTENT_LENGTH)
            && body_allowed(head.status);
        if !needs_length {
            return Response::from_parts(head, ProxyBody::upstream(None, upstream_body, lease));
        }
        let limit = listener.http10_buffer.as_usize();
        let buffered = Box::pin(tokio::time::timeout_at(
            deadline,
            buffer_up_to(upstream_body, limit),
        ))
        .await;
        match buffered {
            Ok(Ok(Buffered::Whole(bytes))) => {
                lease.release();
                head.headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                Response::from_parts(head, ProxyBody::full(bytes))
            }
            Ok(Ok(Buffered::Prefix(prefix, rest))) => {
                Response::from_parts(head, ProxyBody::upstream(Some(prefix), rest, lease))
            }
            Ok(Err(BodyError::Upstream(e) | BodyError::Client(e))) => error_response(
                StatusCode::BAD_GATEWAY,
                "upstream-failed",
                &format!("upstream body failed: {e}"),
                last,
            ),
            Err(_) => error_response(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream-timeout",
                "upstream body did not finish within request_timeout",
                last,
            ),
        }
    }

    /// Sends the request, retrying once on a fresh connection when that is safe:
    /// the request was never written (any method), or it failed on a reused
    /// connection before any response byte and its body is in memory and its
    /// method idempotent.
    async fn forward(
        &self,
        parts: http::request::Parts,
        mut body: UpstreamBody,
    ) -> Result<(Response<ResponseBody>, Lease), ForwardError> {
        let replay = body.replayable().map(|bytes| (copy_head(&parts), bytes));
        let client_failed = body.client_failed_flag();
        let mut lease = self.binding.pool.acquire().await?;
        body.notify_sent(lease.request_sent_flag());
        let received_before = lease.received();
        let failure = match lease.send(Request::from_parts(parts, body)).await {
            Ok(response) => return Ok((response, lease)),
            Err(failure) => failure,
        };
        // The retry path is boxed: most requests never take it, and its
        // futures would otherwise enlarge every request's state.
        Box::pin(self.retry(lease, failure, replay, received_before, client_failed)).await
    }

    /// The one retry of a request whose first attempt failed: on a freshly
    /// dialled connection, when [`Self::forward`]'s rule allows it.
    async fn retry(
        &self,
        lease: Lease,
        failure: SendError,
        replay: Option<(http::request::Parts, Option<Bytes>)>,
        received_before: u64,
        client_failed: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<(Response<ResponseBody>, Lease), ForwardError> {
        let addr = lease.addr();
        let retry = match failure {
            SendError::Unsent(request, reason) => {
                tracing::debug!(upstream = %addr, error = ?reason, "request was not sent; retrying on a new connection");
                *request
            }
            SendError::Failed(source) => {
                if client_failed.load(Ordering::Acquire) {
                    return Err(ForwardError::ClientBody);
                }
                // An HTTP/2 peer that refused the stream (or whose GOAWAY covered
                // it) did not process the request: safe to resend, any method.
                let refused = refused_by_peer(&source);
                if refused {
                    lease.drain_connection();
                }
                let clean = lease.reused() && lease.received() == received_before;
                match replay {
                    Some((head, bytes)) if refused || (clean && idempotent(&head.method)) => {
                        tracing::debug!(upstream = %addr, error = %source, refused, "request failed before a response; retrying once");
                        Request::from_parts(head, UpstreamBody::from_bytes(bytes))
                    }
                    _ => {
                        return Err(ForwardError::Upstream {
                            addr,
                            detail: source.to_string(),
                        })
                    }
                }
            }
        };
        drop(lease);
        let mut lease = self.binding.pool.acquire_fresh(addr).await?;
        let (head, mut body) = retry.into_parts();
        body.notify_sent(lease.request_sent_flag());
        match lease.send(Request::from_parts(head, body)).await {
            Ok(response) => Ok((response, lease)),
            Err(SendError::Unsent(_, reason)) => Err(ForwardError::Upstream {
                addr,
                detail: reason.map_or_else(|| "connection closed".to_owned(), |e| e.to_string()),
            }),
            Err(SendError::Failed(_)) if client_failed.load(Ordering::Acquire) => {
                Err(ForwardError::ClientBody)
            }
            Err(SendError::Failed(source)) => Err(ForwardError::Upstream {
                addr,
                detail: source.to_string(),
            }),
        }
    }

    /// A 4xx for a request tether will not forward. The client misbehaved, so its
    /// connection ends and gets no graceful close.
    fn refuse(
        &self,
        status: StatusCode,
        reason: &'static str,
        detail: &str,
    ) -> Response<ProxyBody> {
        tracing::info!(listener = %self.binding.listener.name, client = ?self.client, %status, reason, detail, "request refused");
        self.conn.mark_misbehaved();
        error_response(status, reason, detail, true)
    }
}

/// A response tether makes itself; the reason goes in a header and the body.
pub fn error_response(
    status: StatusCode,
    reason: &'static str,
    detail: &str,
    close: bool,
) -> Response<ProxyBody> {
    let body = format!("{} {reason}: {detail}\n", status.as_u16());
    let mut response = Response::new(ProxyBody::full(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(ERROR_HEADER, HeaderValue::from_static(reason));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn listener_counts_5xx(binding: &Binding) -> bool {
    binding.pool.settings().health.eject_on_5xx
}

fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn body_allowed(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// The head of a request, without its extensions, for a replay.
fn copy_head(parts: &http::request::Parts) -> http::request::Parts {
    let (mut head, ()) = Request::new(()).into_parts();
    head.method = parts.method.clone();
    head.uri = parts.uri.clone();
    head.version = parts.version;
    head.headers = parts.headers.clone();
    head
}

enum Buffered {
    Whole(Bytes),
    Prefix(Bytes, ResponseBody),
}

/// Reads `body` until it ends or exceeds `limit` bytes.
async fn buffer_up_to(mut body: ResponseBody, limit: usize) -> Result<Buffered, BodyError> {
    let mut buffer = BytesMut::new();
    loop {
        if buffer.len() > limit {
            return Ok(Buffered::Prefix(buffer.freeze(), body));
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
