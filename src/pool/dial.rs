//! The one dial path: TCP connect with the upstream socket options, the TLS
//! handshake when the upstream has `[upstream.tls]`, the protocol's handshake, the task that drives the connection (inside the
//! connection's tracing span), and the bookkeeping every new connection gets.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::Instrument;

use super::endpoint::Endpoint;
use super::h1::Conn;
use super::h2::{self, H2Conn};
use super::io::{UpstreamIo, Wire};
use super::lease::Slot;
use super::view::{ConnRecord, OpenedBy};
use super::PoolError;
use crate::config::{Protocol, UpstreamConfig};
use crate::sock;

/// A connection just opened, of the endpoint's protocol.
pub(crate) enum Dialled {
    Http1(Conn),
    Http2(Arc<H2Conn>),
}

/// Dials `endpoint` holding `slot`, runs the handshake of the upstream's
/// protocol and starts the task that drives the connection.
pub(crate) async fn open(
    endpoint: &Arc<Endpoint>,
    slot: Slot,
    cause: OpenedBy,
) -> Result<Dialled, PoolError> {
    if let Some(tls) = &endpoint.tls {
        tls.check_dialable(endpoint.addr)?;
    }
    let socket = connect(endpoint).await?;
    // A connection that fails its handshakes, or whose dial is abandoned
    // (the request that wanted it gone), is reset, not closed: it leaves no
    // TIME_WAIT on tether.
    let mut unless_established = ResetOnDrop(Some(socket.clone()));
    let established = establish(endpoint, socket, slot, cause).await?;
    unless_established.0 = None;
    Ok(established)
}

/// Resets the socket it holds when dropped holding it.
struct ResetOnDrop(Option<Arc<TcpStream>>);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(socket) = self.0.take() {
            sock::reset_on_close(&*socket);
        }
    }
}

/// Runs the TLS and the protocol's handshakes over a connected `socket`.
async fn establish(
    endpoint: &Arc<Endpoint>,
    socket: Arc<TcpStream>,
    slot: Slot,
    cause: OpenedBy,
) -> Result<Dialled, PoolError> {
    let settings = endpoint.settings.load_full();
    let addr = endpoint.addr;
    let record = ConnRecord::new(cause);
    // Events about this connection, here and in its driving task, carry
    // where it goes, from which local port and its id; made at debug level.
    let span = tracing::debug_span!(
        "upstream",
        upstream = %settings.name,
        endpoint = %addr,
        local = ?socket.local_addr().ok(),
        id = record.id(),
        opened_by = cause.label(),
    );
    let mut expires = Instant::now() + jittered_lifetime(&settings);
    let (io, wire) = match &endpoint.tls {
        None => (UpstreamIo::new(socket.clone()), Wire::plain(socket.clone())),
        Some(tls) => {
            let made = tls.handshake(&settings, addr, socket.clone()).await?;
            // It never outlives the client certificate it presented.
            expires = made
                .usable_until
                .map_or(expires, |until| until.min(expires));
            let shared = Arc::new(std::sync::Mutex::new(made.session));
            let wait = settings
                .tls
                .as_ref()
                .map_or_else(crate::config::defaults::tls_close_notify_wait, |t| {
                    t.close_notify_wait
                });
            (
                UpstreamIo::tls(shared.clone()),
                Wire::tls(socket.clone(), shared, wait, Some(made.lineage)),
            )
        }
    };
    let dialled = match settings.protocol {
        // HTTP/1.1 has no handshake, and no task: each exchange is run by
        // the task of the request that holds the connection.
        Protocol::Http1 => {
            let max_head = settings.max_response_header_bytes.as_usize();
            let conn = Conn::new(io, wire, max_head, expires, slot, record.clone());
            Dialled::Http1(conn)
        }
        Protocol::Http2 => {
            let (sender, connection, max_streams) = h2::handshake(&settings, addr, io).await?;
            drive(endpoint, &span, connection);
            let conn = H2Conn::new(sender, wire, max_streams, expires, slot, record.clone());
            Dialled::Http2(conn)
        }
    };
    endpoint.track(&record);
    endpoint.stats.count_opened(cause);
    tracing::debug!(parent: &span, "upstream connection opened");
    Ok(dialled)
}

/// Drives hyper's HTTP/2 connection future for the connection's life; when
/// it ends, the pool hears of it at once rather than at its next tick.
fn drive(
    endpoint: &Arc<Endpoint>,
    span: &tracing::Span,
    connection: impl Future<Output = Result<(), hyper::Error>> + Send + 'static,
) {
    let endpoint = Arc::downgrade(endpoint);
    tokio::spawn(
        async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
            if let Some(endpoint) = endpoint.upgrade() {
                endpoint.maintenance.notify_one();
                endpoint.available.notify_waiters();
            }
        }
        .instrument(span.clone()),
    );
}

/// Opens the TCP connection to an endpoint within `connect_timeout`, with the
/// upstream socket options set.
async fn connect(endpoint: &Endpoint) -> Result<Arc<TcpStream>, PoolError> {
    let settings = endpoint.settings.load_full();
    let addr = endpoint.addr;
    let stream = tokio::time::timeout(settings.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| PoolError::ConnectTimeout {
            addr,
            after: settings.connect_timeout,
        })?
        .map_err(|source| PoolError::Connect { addr, source })?;
    sock::configure_upstream(&stream, &settings.keepalive);
    Ok(Arc::new(stream))
}

/// `max_lifetime` ±10 %, so a pool's connections do not all retire at once.
fn jittered_lifetime(settings: &UpstreamConfig) -> std::time::Duration {
    settings
        .pool
        .max_lifetime
        .mul_f64(0.9 + fastrand::f64() * 0.2)
}
