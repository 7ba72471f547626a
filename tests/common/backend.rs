//! The test backend: one in-process HTTP server, configured by a builder, that
//! counts what it sees (accepts, closes, resets, requests) and misbehaves on
//! cue; and a relay that can black-hole the connections it carries. hyper
//! serves it (HTTP/1.1 or HTTP/2) unless a script asks for faults hyper will
//! not commit (a reset instead of an answer, a body cut short): then a plain
//! HTTP/1.1 loop does.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, DropGuard};

/// What the backend saw.
#[derive(Default)]
pub struct BackendStats {
    pub accepted: AtomicUsize,
    pub closed: AtomicUsize,
    pub closed_by_reset: AtomicUsize,
    pub requests: AtomicUsize,
    pub posts: AtomicUsize,
    pub bytes_received: AtomicUsize,
    pub in_flight: AtomicUsize,
    /// The method of every request, in arrival order.
    pub methods: Mutex<Vec<String>>,
    /// The header names of every request hyper served, in arrival order.
    pub header_names: Mutex<Vec<Vec<String>>>,
    /// Bodies of every `/echo` request, in arrival order.
    pub echoed: Mutex<Vec<Bytes>>,
    /// Idle connections the backend closed itself (its keep-alive timeout).
    pub closed_idle_by_backend: AtomicUsize,
    /// Longest silence seen on a connection before a request on it, in ms.
    pub max_idle_gap_ms: AtomicUsize,
    /// Probe requests seen (User-Agent: tether-probe).
    pub probes: AtomicUsize,
    /// Requests that said `Connection: close` (a peer-first goodbye).
    pub goodbyes: AtomicUsize,
    /// Connections accepted when the first request arrived.
    pub accepted_at_first_request: std::sync::OnceLock<usize>,
}

/// What a scripted backend does with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// `200` with the body, framed by Content-Length.
    Respond,
    /// Reset the connection without answering.
    Reset,
    /// Send the head and part of a Content-Length body, then FIN.
    TruncateLength,
    /// Send the head and one chunk of a chunked body, then FIN.
    TruncateChunked,
    /// Send a close-delimited head and some body, then RST.
    TruncateCloseDelimited,
}

impl Act {
    /// What goes on the wire (`body` is the answer's).
    fn bytes(self, body: &str) -> Vec<u8> {
        match self {
            Act::Respond => format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
            Act::Reset => Vec::new(),
            Act::TruncateLength => {
                let mut r = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec();
                r.extend(vec![b'x'; 1000]);
                r
            }
            Act::TruncateChunked => {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".to_vec()
            }
            Act::TruncateCloseDelimited => {
                b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npartial body".to_vec()
            }
        }
    }

    /// Whether the connection ends in RST rather than FIN.
    fn resets(self) -> bool {
        matches!(self, Act::Reset | Act::TruncateCloseDelimited)
    }
}

/// What to do with the n-th request (from 1) of the m-th connection (from 1):
/// `script(m, n)`.
pub type Script = fn(usize, usize) -> Act;

/// How a backend behaves; [`Backend::builder`] starts from answering every
/// request at once over HTTP/1.1 on an ephemeral loopback port.
#[derive(Clone)]
pub struct BackendBuilder {
    bind: SocketAddr,
    http2_streams: Option<u32>,
    idle_close: Option<Duration>,
    keep_alive: Option<&'static str>,
    status: Option<u16>,
    body: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    delay: Duration,
    script: Option<Script>,
}

impl BackendBuilder {
    /// Listen on `addr` instead of an ephemeral loopback port.
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    /// Speak HTTP/2 (prior knowledge), allowing `max_streams` concurrent
    /// streams per connection; [`Backend::close_gracefully`] then sends GOAWAY.
    pub fn http2(mut self, max_streams: u32) -> Self {
        self.http2_streams = Some(max_streams);
        self
    }

    /// Close a connection (FIN) after this long without traffic, as nginx's
    /// `keepalive_timeout` or Node's `keepAliveTimeout` do.
    pub fn idle_close(mut self, after: Duration) -> Self {
        self.idle_close = Some(after);
        self
    }

    /// Announce `Keep-Alive: value` (`"timeout=2"`) on every response.
    pub fn keep_alive(mut self, value: &'static str) -> Self {
        self.keep_alive = Some(value);
        self
    }

    /// Answer every request with this status.
    pub fn status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// The body of `/` (and of a script's [`Act::Respond`]); `"hello"` unless set.
    pub fn body(mut self, body: &'static str) -> Self {
        self.body = body;
        self
    }

    /// Add a header field to every response.
    pub fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Wait this long before answering each request.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Serve HTTP/1.1 by hand and do what `script` says with each request.
    pub fn script(mut self, script: Script) -> Self {
        self.script = Some(script);
        self
    }

    /// Binds and starts accepting.
    pub async fn start(self) -> Backend {
        let listener = TcpListener::bind(self.bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(BackendStats::default());
        let graceful = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            Arc::new(self),
            stats.clone(),
            graceful.clone(),
            stop.clone(),
        ));
        Backend {
            addr,
            stats,
            graceful,
            _stop: Arc::new(stop.drop_guard()),
        }
    }
}

/// A running test backend, a handle its clones share; it stops accepting when
/// the last is dropped.
///
/// Paths: `/` → the body (`"hello"`); `/headers` → the request line and
/// headers, one per line; `/count` → the number of body bytes received;
/// `/echo` → the body back; `/big?N` → N bytes, chunked; `/stall` → never
/// answers; `/slow?MS` → answers after MS milliseconds.
#[derive(Clone)]
pub struct Backend {
    pub addr: SocketAddr,
    pub stats: Arc<BackendStats>,
    graceful: Arc<Mutex<CancellationToken>>,
    _stop: Arc<DropGuard>,
}

impl Backend {
    /// A backend that answers every request at once, over HTTP/1.1.
    pub async fn start() -> Self {
        Self::builder().start().await
    }

    /// A backend to configure before [`BackendBuilder::start`].
    pub fn builder() -> BackendBuilder {
        BackendBuilder {
            bind: "127.0.0.1:0".parse().unwrap(),
            http2_streams: None,
            idle_close: None,
            keep_alive: None,
            status: None,
            body: "hello",
            headers: Vec::new(),
            delay: Duration::ZERO,
            script: None,
        }
    }

    /// Closes every open connection gracefully: over HTTP/1.1 an idle
    /// connection gets a FIN (a busy one after its exchange); over HTTP/2 each
    /// gets a GOAWAY. Connections accepted later are not affected.
    pub fn close_gracefully(&self) {
        let mut token = self.graceful.lock().unwrap();
        token.cancel();
        *token = CancellationToken::new();
    }

    pub fn accepted(&self) -> usize {
        self.stats.accepted.load(Ordering::SeqCst)
    }
    /// Connections accepted when the first request arrived (`None`: none yet).
    pub fn accepted_at_first_request(&self) -> Option<usize> {
        self.stats.accepted_at_first_request.get().copied()
    }
    pub fn requests(&self) -> usize {
        self.stats.requests.load(Ordering::SeqCst)
    }
    pub fn closed(&self) -> usize {
        self.stats.closed.load(Ordering::SeqCst)
    }
    pub fn closed_by_reset(&self) -> usize {
        self.stats.closed_by_reset.load(Ordering::SeqCst)
    }
    pub fn in_flight(&self) -> usize {
        self.stats.in_flight.load(Ordering::SeqCst)
    }
    pub fn open(&self) -> usize {
        self.accepted() - self.closed()
    }
    pub fn methods(&self) -> Vec<String> {
        self.stats.methods.lock().unwrap().clone()
    }
    /// The header names of every request hyper served, in arrival order.
    pub fn header_names(&self) -> Vec<Vec<String>> {
        self.stats.header_names.lock().unwrap().clone()
    }
}

async fn accept_loop(
    listener: TcpListener,
    behaviour: Arc<BackendBuilder>,
    stats: Arc<BackendStats>,
    graceful: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
) {
    let mut connections = 0;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
            _ = stop.cancelled() => return,
        };
        connections += 1;
        stats.accepted.fetch_add(1, Ordering::SeqCst);
        let (behaviour, stats) = (behaviour.clone(), stats.clone());
        let graceful = graceful.lock().unwrap().clone();
        tokio::spawn(async move {
            match behaviour.script {
                Some(script) => {
                    serve_scripted(stream, connections, script, &behaviour, &stats).await
                }
                None => serve(stream, behaviour, stats.clone(), graceful).await,
            }
            stats.closed.fetch_add(1, Ordering::SeqCst);
        });
    }
}

/// Serves one connection with hyper until it ends, closing it gracefully when
/// asked to or when it has been idle for `idle_close`.
async fn serve(
    stream: TcpStream,
    behaviour: Arc<BackendBuilder>,
    stats: Arc<BackendStats>,
    graceful: CancellationToken,
) {
    let activity = Arc::new(Activity::default());
    let io = TokioIo::new(Observed {
        stream,
        stats: stats.clone(),
        reset_seen: false,
        activity: activity.clone(),
    });
    let service = {
        let (behaviour, stats, activity) = (behaviour.clone(), stats.clone(), activity.clone());
        hyper::service::service_fn(move |req| {
            let (behaviour, stats, activity) = (behaviour.clone(), stats.clone(), activity.clone());
            async move { Ok::<_, Infallible>(answer(req, &behaviour, &stats, &activity).await) }
        })
    };
    let idle = idle_for(behaviour.idle_close, &activity);
    match behaviour.http2_streams {
        None => {
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
            drive(conn, |c| c.graceful_shutdown(), graceful, idle, &stats).await;
        }
        Some(streams) => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .max_concurrent_streams(streams)
                .serve_connection(io, service);
            drive(conn, |c| c.graceful_shutdown(), graceful, idle, &stats).await;
        }
    }
}

/// Runs `conn` to its end; when `graceful` is cancelled or `idle` ends, asks
/// it to shut down with `shutdown` and lets it finish.
async fn drive<C: Future>(
    conn: C,
    shutdown: impl FnOnce(Pin<&mut C>),
    graceful: CancellationToken,
    idle: impl Future<Output = ()>,
    stats: &BackendStats,
) {
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = graceful.cancelled() => {}
        _ = idle => {
            stats.closed_idle_by_backend.fetch_add(1, Ordering::SeqCst);
        }
    }
    shutdown(conn.as_mut());
    let _ = conn.await;
}

/// Ends once the connection has seen no traffic for `limit` (never without one).
async fn idle_for(limit: Option<Duration>, activity: &Activity) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    loop {
        let since = activity.last().unwrap_or_else(Instant::now);
        let wait = limit.saturating_sub(since.elapsed());
        if wait.is_zero() {
            return;
        }
        tokio::time::sleep(wait).await;
    }
}

type TestBody = http_body_util::combinators::BoxBody<Bytes, io::Error>;

fn full(text: impl Into<Bytes>) -> TestBody {
    Full::new(text.into()).map_err(|e| match e {}).boxed()
}

/// Counts a request that arrived.
fn record(stats: &BackendStats, method: &str) {
    stats.requests.fetch_add(1, Ordering::SeqCst);
    let _ = stats
        .accepted_at_first_request
        .set(stats.accepted.load(Ordering::SeqCst));
    if method == "POST" {
        stats.posts.fetch_add(1, Ordering::SeqCst);
    }
    stats.methods.lock().unwrap().push(method.to_owned());
}

/// Answers one request as `behaviour` says.
async fn answer(
    req: Request<Incoming>,
    behaviour: &BackendBuilder,
    stats: &BackendStats,
    activity: &Activity,
) -> Response<TestBody> {
    if let Some(last) = *activity.last_write.lock().unwrap() {
        let gap = last.elapsed().as_millis() as usize;
        stats.max_idle_gap_ms.fetch_max(gap, Ordering::SeqCst);
    }
    let header_is = |name: &str, value: &str| {
        req.headers()
            .get(name)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(value.as_bytes()))
    };
    if header_is("user-agent", "tether-probe") {
        stats.probes.fetch_add(1, Ordering::SeqCst);
    }
    if header_is("connection", "close") {
        stats.goodbyes.fetch_add(1, Ordering::SeqCst);
    }
    let names = req.headers().keys().map(|n| n.as_str().to_owned());
    stats.header_names.lock().unwrap().push(names.collect());
    record(stats, req.method().as_str());
    stats.in_flight.fetch_add(1, Ordering::SeqCst);
    if !behaviour.delay.is_zero() {
        tokio::time::sleep(behaviour.delay).await;
    }
    let mut response = route(req, behaviour.body, stats).await;
    stats.in_flight.fetch_sub(1, Ordering::SeqCst);
    if let Some(status) = behaviour.status {
        *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    }
    let headers = response.headers_mut();
    if let Some(value) = behaviour.keep_alive {
        headers.insert("keep-alive", value.parse().unwrap());
    }
    for (name, value) in &behaviour.headers {
        headers.append(*name, value.parse().unwrap());
    }
    response
}

async fn route(
    req: Request<Incoming>,
    body: &'static str,
    stats: &BackendStats,
) -> Response<TestBody> {
    let query = req.uri().query().unwrap_or("").to_owned();
    match req.uri().path() {
        "/headers" => {
            let mut text = format!("method: {}\nuri: {}\n", req.method(), req.uri());
            for (name, value) in req.headers() {
                text.push_str(&format!("{}: {}\n", name, value.to_str().unwrap_or("?")));
            }
            Response::new(full(text))
        }
        "/count" => {
            let mut body = req.into_body();
            let mut total = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                total += frame.data_ref().map_or(0, |d| d.len());
            }
            stats.bytes_received.fetch_add(total, Ordering::SeqCst);
            Response::new(full(total.to_string()))
        }
        "/echo" => {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            stats.echoed.lock().unwrap().push(body.clone());
            Response::new(full(body))
        }
        "/big" => Response::new(StreamBody::new(Chunks::of(query.parse().unwrap_or(0))).boxed()),
        "/stall" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Response::new(full("late"))
        }
        "/slow" => {
            let ms: u64 = query.parse().unwrap_or(100);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(full("slow"))
        }
        _ => Response::new(full(body)),
    }
}

/// A body of `remaining` bytes of `x`, in 64 KiB frames.
struct Chunks {
    remaining: u64,
    chunk: Bytes,
}

impl Chunks {
    fn of(total: u64) -> Self {
        Self {
            remaining: total,
            chunk: Bytes::from(vec![b'x'; 64 * 1024]),
        }
    }
}

impl futures_core::Stream for Chunks {
    type Item = Result<Frame<Bytes>, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }
}

/// Serves one connection by hand: reads each request (head and a
/// Content-Length body) and does what `script` says with it.
async fn serve_scripted(
    stream: TcpStream,
    connection: usize,
    script: Script,
    behaviour: &BackendBuilder,
    stats: &BackendStats,
) {
    let mut reader = BufReader::new(stream);
    for request in 1.. {
        let Some(method) = read_request(&mut reader).await else {
            return;
        };
        record(stats, &method);
        let act = script(connection, request);
        let stream = reader.get_mut();
        stream.write_all(&act.bytes(behaviour.body)).await.unwrap();
        match act {
            Act::Respond => continue,
            Act::Reset => {}
            // Let the partial answer reach tether before the connection ends.
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
        if act.resets() {
            socket2::SockRef::from(&*stream)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
        return;
    }
}

/// Reads one request's head and Content-Length body; its method, or `None`
/// once the peer has closed.
async fn read_request(reader: &mut BufReader<TcpStream>) -> Option<String> {
    let mut line = String::new();
    if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
        return None;
    }
    let method = line.split(' ').next().unwrap_or("").to_owned();
    let mut length = 0usize;
    loop {
        line.clear();
        reader.read_line(&mut line).await.unwrap();
        if line.trim_end().is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).await.unwrap();
    Some(method)
}

/// When a backend connection last read or wrote.
#[derive(Default)]
struct Activity {
    last_read: Mutex<Option<Instant>>,
    last_write: Mutex<Option<Instant>>,
}

impl Activity {
    fn last(&self) -> Option<Instant> {
        let r = *self.last_read.lock().unwrap();
        let w = *self.last_write.lock().unwrap();
        r.max(w)
    }
}

/// A backend connection that notes its traffic and counts a read that fails
/// with ECONNRESET (hyper reports an idle connection's reset as a plain close,
/// so the backend watches the socket itself).
struct Observed {
    stream: TcpStream,
    stats: Arc<BackendStats>,
    reset_seen: bool,
    activity: Arc<Activity>,
}

impl AsyncRead for Observed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            *self.activity.last_read.lock().unwrap() = Some(Instant::now());
        }
        if let Poll::Ready(Err(e)) = &polled {
            if e.kind() == io::ErrorKind::ConnectionReset && !self.reset_seen {
                self.reset_seen = true;
                self.stats.closed_by_reset.fetch_add(1, Ordering::SeqCst);
            }
        }
        polled
    }
}

impl AsyncWrite for Observed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            *self.activity.last_write.lock().unwrap() = Some(Instant::now());
        }
        polled
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A TCP relay between tether and a backend that can start black-holing the
/// connections it already carries (as a dead NAT entry or a hung peer would),
/// while new connections still go through.
pub struct Relay {
    pub addr: SocketAddr,
    generation: Arc<AtomicUsize>,
}

impl Relay {
    pub async fn start(backend: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let generation = Arc::new(AtomicUsize::new(0));
        let g = generation.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(server) = TcpStream::connect(backend).await else {
                    continue;
                };
                let born = g.load(Ordering::SeqCst);
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(carry(client_read, server_write, g.clone(), born));
                tokio::spawn(carry(server_read, client_write, g.clone(), born));
            }
        });
        Self { addr, generation }
    }

    /// Every connection carried so far stops delivering anything.
    pub fn black_hole_existing(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either ends, swallowing the bytes once the
/// relay's generation has moved past `born`.
async fn carry(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    generation: Arc<AtomicUsize>,
    born: usize,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if generation.load(Ordering::SeqCst) != born {
            continue; // black-holed: swallow the bytes
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
