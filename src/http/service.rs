//! The proxy service of one client connection: for each request it decides
//! whether the exchange is the connection's last, refuses what must not be
//! forwarded, reads the request body ahead, forwards it, and turns any failure
//! into the client's answer. The client connection's task awaits it in place,
//! one request at a time, so a request costs no task and no channel.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode, Version};
use http_body::Body;
use tokio::time::Instant;

use super::body::{prefetch, ExchangeDone};
use super::error::{Failure, ProxyError, Side};
use super::request::{to_request, ClientRequest};
use super::response::{respond, Exchange, ProxyResponse};
use super::{forward, headers, Binding, BindingSlot, ClientConnection, Target};
use crate::accesslog::{ms, truncate_target, AccessLog, AccessRecord};
use crate::config::{ClientClose, ListenerConfig, Protocol};
use crate::h1::{self, RewriteOptions};
use crate::pool::{BodyError, Http1Request, OutboundHead, UpstreamBody, UpstreamRequest};

/// The proxy service of one client connection.
pub struct ProxyService<C> {
    /// The listener's binding as it is now: a reload swaps it, and each
    /// request takes the one current when it starts.
    slot: Arc<BindingSlot>,
    binding: Arc<Binding>,
    client: Arc<C>,
    /// The client's address, for the events that name it.
    client_ip: Option<IpAddr>,
    /// The client's address and port, for the access log.
    client_addr: Option<SocketAddr>,
    /// The client's address as X-Forwarded-For appends it.
    forwarded_for: Option<headers::AddressText>,
}

/// An access-log line while its request is served: the record, and the
/// counter its request body adds to.
struct Logging {
    record: Box<AccessRecord>,
    bytes_in: Arc<AtomicU64>,
}

/// The line once the response head is known: status, tether's reason, the
/// time to the head, and whether it waits for the connection's end.
fn finish_head(
    mut record: Box<AccessRecord>,
    response: &ProxyResponse,
    reason: Option<&str>,
    started: Instant,
) -> Box<AccessRecord> {
    record.ttfb_ms = ms(started.elapsed());
    record.status = Some(response.status().as_u16());
    record.error = reason.map(str::to_owned);
    record.last = response.says_close();
    record.pool_wait_ms = ms(record.upstream.pool_wait);
    record.connect_ms = ms(record.upstream.connect);
    record
}

/// How the access log names an HTTP version.
fn version_label(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "unknown",
    }
}

impl<C: ClientConnection> ProxyService<C> {
    /// Serves one request to the head of its response (the body streams
    /// after): tether's own answer when it refuses or fails, else the
    /// upstream's. Counted, timed and logged here.
    pub async fn call<B>(&mut self, request: ClientRequest<'_, B>) -> ProxyResponse
    where
        B: Body<Data = Bytes, Error = BodyError> + Send + Unpin + 'static,
    {
        self.client.exchange_started();
        // One load a request, not one a connection: a keep-alive client's
        // next request after a reload follows the new settings and pool.
        if !Arc::ptr_eq(&self.binding, &self.slot.load()) {
            self.binding = self.slot.load_full();
        }
        let started = Instant::now();
        let mut logging = self
            .binding
            .access_log
            .as_ref()
            .map(|log| self.begin_line(&request, log));
        let response = self.handle(request, started, logging.as_mut()).await;
        let reason = response.error_reason();
        self.binding
            .record(response.status(), reason, Some(started));
        let Some(logging) = logging else {
            return response;
        };
        let record = finish_head(logging.record, &response, reason, started);
        let done: Arc<dyn ExchangeDone> = self.client.clone();
        response.map_body(|body| body.logged(done, record, started, logging.bytes_in))
    }

    /// A service for one accepted connection, from `addr` (none on a unix
    /// socket).
    pub fn new(slot: Arc<BindingSlot>, client: Arc<C>, addr: Option<SocketAddr>) -> Self {
        let client_ip = addr.map(|a| a.ip());
        Self {
            binding: slot.load_full(),
            slot,
            client,
            client_ip,
            client_addr: addr,
            forwarded_for: client_ip.map(headers::AddressText::of),
        }
    }

    /// The access-log line of `request`, as far as its head tells: the
    /// target as the client sent it.
    fn begin_line<B>(&self, request: &ClientRequest<'_, B>, log: &AccessLog) -> Logging {
        let target = request.head.target.of(request.bytes);
        let target = truncate_target(&String::from_utf8_lossy(target), log.max_target_bytes);
        let record = Box::new(AccessRecord {
            kind: "request",
            listener: self.binding.listener.name.clone(),
            client: self.client_addr,
            method: Some(String::from_utf8_lossy(request.method()).into_owned()),
            target: Some(target),
            version: Some(version_label(request.version())),
            ..AccessRecord::default()
        });
        Logging {
            record,
            bytes_in: Arc::new(AtomicU64::new(0)),
        }
    }

    async fn handle<B>(
        &self,
        request: ClientRequest<'_, B>,
        started: Instant,
        mut logging: Option<&mut Logging>,
    ) -> ProxyResponse
    where
        B: Body<Data = Bytes, Error = BodyError> + Send + Unpin + 'static,
    {
        let last = self.is_last_exchange(&request);
        let target = match self.admit(&request, last) {
            Ok(target) => target,
            Err(error) => return self.answer(error, last, None),
        };
        if let Some(logging) = logging.as_deref_mut() {
            // The upstream the route chose, so the line names the one used.
            logging.record.upstream.upstream = Some(target.pool.name().to_owned());
        }
        match self.proxy(request, started, last, target, logging).await {
            Ok(response) => response,
            Err(error) => self.answer(error, last, Some(target)),
        }
    }

    /// What is decided from the request head alone: refusals, the graceful
    /// close of a last exchange, and the upstream the request goes to.
    fn admit<B>(&self, request: &ClientRequest<'_, B>, last: bool) -> Result<&Target, ProxyError> {
        if last && self.binding.listener.client_close == ClientClose::Graceful {
            self.client.fin_after_response();
        }
        let ClientRequest { head, bytes, .. } = request;
        head.check(bytes).map_err(ProxyError::from_head)?;
        let host = head
            .authority(bytes)
            .and_then(|host| std::str::from_utf8(host).ok());
        self.binding
            .routes
            .pick(host)
            .ok_or_else(|| ProxyError::no_route(host))
    }

    /// Counts the request and says whether its exchange ends the connection:
    /// the client asked, the connection has carried
    /// `max_requests_per_connection`, or the process is draining.
    fn is_last_exchange<B>(&self, request: &ClientRequest<'_, B>) -> bool {
        let served = self.client.count_request();
        let limit = self.binding.listener.max_requests_per_connection;
        request.head.client_ends_connection()
            || (limit > 0 && served >= limit)
            || self.client.draining()
    }

    async fn proxy<B>(
        &self,
        request: ClientRequest<'_, B>,
        started: Instant,
        last: bool,
        target: &Target,
        logging: Option<&mut Logging>,
    ) -> Result<ProxyResponse, ProxyError>
    where
        B: Body<Data = Bytes, Error = BodyError> + Send + Unpin + 'static,
    {
        let listener = &self.binding.listener;
        let exchange = Exchange {
            client_version: request.version(),
            head_request: request.head.is_head(request.bytes),
            last,
            deadline: started + listener.request_timeout,
        };
        let (upstream_head, dropped) = self.upstream_head(&request, target)?;
        self.binding.record_dropped_underscore(dropped);
        let limit = listener.request_buffer.as_usize();
        let mut body = read_request_body(request.body, limit, exchange.deadline).await?;
        let facts = logging.map(|logging| {
            body.count_into(logging.bytes_in.clone());
            &mut logging.record.upstream
        });
        let upstream = UpstreamRequest {
            head: upstream_head,
            body,
        };
        let forwarding = forward::forward(&target.pool, upstream, facts);
        let (response, lease) = match tokio::time::timeout_at(exchange.deadline, forwarding).await {
            Ok(forwarded) => forwarded?,
            Err(_) => return Err(ProxyError::response_timeout(listener.request_timeout)),
        };
        respond(&self.binding, target, response, lease, &exchange).await
    }

    /// The head `request` goes upstream with, in the form `target`'s pool
    /// sends, and how many fields were dropped for a `_` in their name.
    fn upstream_head<B>(
        &self,
        request: &ClientRequest<'_, B>,
        target: &Target,
    ) -> Result<(OutboundHead, u64), ProxyError> {
        let listener = &self.binding.listener;
        let ClientRequest { head, bytes, .. } = request;
        if target.pool.settings().protocol == Protocol::Http2 {
            let (mut parts, ()) = to_request(head, bytes, ())
                .map_err(ProxyError::from_head)?
                .into_parts();
            let client = self.forwarded_for.and_then(|text| text.to_header_value());
            let dropped = headers::prepare_upstream(
                &mut parts,
                client.as_ref(),
                listener.forwarded_for,
                &target.fallback_host,
                listener.underscores_in_headers,
            )?;
            headers::to_http2_form(&mut parts);
            return Ok((OutboundHead::Parts(Box::new(parts)), dropped));
        }
        let method = Method::from_bytes(request.method())
            .map_err(|_| ProxyError::from_head(h1::H1Error::Syntax("method")))?;
        let options = rewrite_options(listener, target, self.forwarded_for.as_ref());
        // Room for what the rewrite adds: Host, X-Forwarded-For.
        let mut out = Vec::with_capacity(head.len + 64);
        let rewritten =
            h1::upstream_request(&mut out, bytes, head, &options).map_err(ProxyError::from_head)?;
        let head = Http1Request {
            method,
            head: out,
            has_length: rewritten.has_length,
        };
        Ok((OutboundHead::Http1(head), rewritten.dropped_underscored))
    }

    /// The client's answer to a request tether could not forward or complete.
    /// A client that misbehaved is marked, so its connection ends without a
    /// graceful close.
    fn answer(&self, error: ProxyError, last: bool, target: Option<&Target>) -> ProxyResponse {
        self.report(&error, target);
        if error.side() == Side::Client {
            self.client.mark_misbehaved();
        }
        error.into_response(last).into()
    }

    /// The event of a request tether answered itself; `target` is the
    /// upstream it was routed to, when it got that far.
    fn report(&self, error: &ProxyError, target: Option<&Target>) {
        let upstream = target.map_or("", |t| t.pool.name());
        match error.failure() {
            // `info`, so seen at the default level, where the connection's span
            // is off: the event names the listener and the client itself.
            Failure::Refused(detail) => tracing::info!(
                listener = %self.binding.listener.name,
                client = ?self.client_ip,
                status = %error.status(),
                reason = error.reason(),
                detail = detail.as_ref(),
                "request refused"
            ),
            Failure::Pool(e) => tracing::warn!(%upstream, error = %e, "no upstream connection"),
            failure @ Failure::Send { .. } => {
                tracing::warn!(%upstream, error = %failure, "upstream request failed");
            }
            Failure::ResponseTimeout(timeout) => {
                tracing::warn!(%upstream, ?timeout, "upstream response timed out");
            }
            // Counted by reason in the metrics, with no event: as for an
            // upstream body that fails while it streams to the client.
            Failure::Body(_) | Failure::BodyTimeout => {}
        }
    }
}

/// What the HTTP/1.1 rewrite of a request for `target` depends on.
fn rewrite_options<'a>(
    listener: &ListenerConfig,
    target: &'a Target,
    client: Option<&'a headers::AddressText>,
) -> RewriteOptions<'a> {
    RewriteOptions {
        underscores: listener.underscores_in_headers,
        fallback_host: target.fallback_host.as_bytes(),
        forwarded_for: client
            .filter(|_| listener.forwarded_for)
            .map(headers::AddressText::as_bytes),
    }
}

/// The request body as it goes upstream, its first `limit` bytes read ahead
/// by `deadline` (see [`prefetch`]).
async fn read_request_body<B>(
    body: B,
    limit: usize,
    deadline: Instant,
) -> Result<UpstreamBody, ProxyError>
where
    B: Body<Data = Bytes, Error = BodyError> + Send + Unpin + 'static,
{
    // Most requests have no body: no timer and no read for them. The read of a
    // body is boxed so its state does not enlarge every request's future.
    if body.is_end_stream() {
        return Ok(UpstreamBody::from_bytes(None));
    }
    match Box::pin(tokio::time::timeout_at(deadline, prefetch(body, limit))).await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(e)) => Err(ProxyError::bad_request_body(e.to_string())),
        Err(_) => Err(ProxyError::refused(
            StatusCode::REQUEST_TIMEOUT,
            "client-body-timeout",
            "the request body did not arrive within request_timeout",
        )),
    }
}
