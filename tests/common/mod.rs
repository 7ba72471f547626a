//! Test fixtures: an in-process HTTP/1.1 backend that counts what it sees, raw
//! socket clients that tell FIN from RST, and helpers to start tether on
//! ephemeral ports.

#![allow(dead_code)]

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tether::config::{Config, ListenAddr, ListenerConfig, UpstreamConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

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
}

/// How a test backend behaves beyond answering.
#[derive(Clone, Default)]
pub struct BackendOptions {
    /// Close a connection (FIN) after this long without traffic, as nginx's
    /// `keepalive_timeout` or Node's `keepAliveTimeout` do.
    pub idle_close: Option<Duration>,
    /// A `Keep-Alive` header to put on every response (`"timeout=2"`).
    pub keep_alive: Option<&'static str>,
    /// Answer every request with 500.
    pub fail_all: bool,
}

/// When a backend connection last read or wrote.
#[derive(Default)]
struct Activity {
    last_read: Mutex<Option<std::time::Instant>>,
    last_write: Mutex<Option<std::time::Instant>>,
}

impl Activity {
    fn last(&self) -> Option<std::time::Instant> {
        let r = *self.last_read.lock().unwrap();
        let w = *self.last_write.lock().unwrap();
        r.max(w)
    }
}

/// An HTTP/1.1 backend on an ephemeral loopback port.
///
/// Paths: `/` → "hello"; `/headers` → the request headers, one per line;
/// `/count` → number of body bytes received; `/echo` → the body back;
/// `/big?N` → N bytes, chunked; `/stall` → never answers; `/slow?MS` → answers
/// after MS milliseconds.
pub struct Backend {
    pub addr: SocketAddr,
    pub stats: Arc<BackendStats>,
    close_idle: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl Backend {
    pub async fn start() -> Self {
        Self::start_with(BackendOptions::default()).await
    }

    pub async fn start_with(options: BackendOptions) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(BackendStats::default());
        let close_idle = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (s, c, st) = (stats.clone(), close_idle.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = st.cancelled() => return,
                };
                s.accepted.fetch_add(1, Ordering::SeqCst);
                let stats = s.clone();
                let token = c.lock().unwrap().clone();
                tokio::spawn(serve_backend_conn(stream, stats, token, options.clone()));
            }
        });
        Self {
            addr,
            stats,
            close_idle,
            stop,
        }
    }

    /// Gracefully closes every connection that is idle now (the backend sends FIN).
    pub fn close_idle_connections(&self) {
        let mut token = self.close_idle.lock().unwrap();
        token.cancel();
        *token = CancellationToken::new();
    }

    pub fn accepted(&self) -> usize {
        self.stats.accepted.load(Ordering::SeqCst)
    }
    pub fn requests(&self) -> usize {
        self.stats.requests.load(Ordering::SeqCst)
    }
    pub fn open(&self) -> usize {
        self.accepted() - self.stats.closed.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve_backend_conn(
    stream: TcpStream,
    stats: Arc<BackendStats>,
    close: CancellationToken,
    options: BackendOptions,
) {
    let activity = Arc::new(Activity::default());
    let svc_stats = stats.clone();
    let svc_activity = activity.clone();
    let keep_alive = options.keep_alive;
    let fail_all = options.fail_all;
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let stats = svc_stats.clone();
        let activity = svc_activity.clone();
        async move {
            if let Some(last) = *activity.last_write.lock().unwrap() {
                let gap = last.elapsed().as_millis() as usize;
                stats.max_idle_gap_ms.fetch_max(gap, Ordering::SeqCst);
            }
            if req
                .headers()
                .get("user-agent")
                .is_some_and(|v| v == "tether-probe")
            {
                stats.probes.fetch_add(1, Ordering::SeqCst);
            }
            if req
                .headers()
                .get("connection")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"))
            {
                stats.goodbyes.fetch_add(1, Ordering::SeqCst);
            }
            let mut response = backend_respond(req, stats).await;
            if fail_all {
                *response.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            }
            if let Some(value) = keep_alive {
                response
                    .headers_mut()
                    .insert("keep-alive", value.parse().unwrap());
            }
            Ok::<_, Infallible>(response)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(
        TokioIo::new(ResetObserver {
            stream,
            stats: stats.clone(),
            seen: false,
            activity: activity.clone(),
        }),
        service,
    );
    tokio::pin!(conn);
    let idle_watch = async {
        let Some(limit) = options.idle_close else {
            return std::future::pending::<()>().await;
        };
        loop {
            let since = activity.last().unwrap_or_else(std::time::Instant::now);
            let wait = limit.saturating_sub(since.elapsed());
            if wait.is_zero() {
                return;
            }
            tokio::time::sleep(wait).await;
        }
    };
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = close.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        _ = idle_watch => {
            stats.closed_idle_by_backend.fetch_add(1, Ordering::SeqCst);
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    let _ = result;
    stats.closed.fetch_add(1, Ordering::SeqCst);
}

/// Counts a read that fails with ECONNRESET (hyper reports an idle connection's
/// reset as a plain close, so the backend watches the socket itself).
struct ResetObserver {
    stream: TcpStream,
    stats: Arc<BackendStats>,
    seen: bool,
    activity: Arc<Activity>,
}

impl tokio::io::AsyncRead for ResetObserver {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            *self.activity.last_read.lock().unwrap() = Some(std::time::Instant::now());
        }
        if let std::task::Poll::Ready(Err(e)) = &polled {
            if e.kind() == io::ErrorKind::ConnectionReset && !self.seen {
                self.seen = true;
                self.stats.closed_by_reset.fetch_add(1, Ordering::SeqCst);
            }
        }
        polled
    }
}

impl tokio::io::AsyncWrite for ResetObserver {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
            *self.activity.last_write.lock().unwrap() = Some(std::time::Instant::now());
        }
        polled
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

type TestBody = http_body_util::combinators::BoxBody<Bytes, io::Error>;

fn full(text: impl Into<Bytes>) -> TestBody {
    Full::new(text.into()).map_err(|e| match e {}).boxed()
}

async fn backend_respond(req: Request<Incoming>, stats: Arc<BackendStats>) -> Response<TestBody> {
    stats.requests.fetch_add(1, Ordering::SeqCst);
    stats.in_flight.fetch_add(1, Ordering::SeqCst);
    if req.method() == hyper::Method::POST {
        stats.posts.fetch_add(1, Ordering::SeqCst);
    }
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let response = match path.as_str() {
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
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            total += d.len();
                        }
                    }
                    Err(_) => break,
                }
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
        "/big" => {
            let total: u64 = query.parse().unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures_stream(total, chunk);
            Response::new(StreamBody::new(stream).boxed())
        }
        "/stall" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Response::new(full("late"))
        }
        "/slow" => {
            let ms: u64 = query.parse().unwrap_or(100);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(full("slow"))
        }
        _ => Response::new(full("hello")),
    };
    stats.in_flight.fetch_sub(1, Ordering::SeqCst);
    response
}

fn futures_stream(
    total: u64,
    chunk: Bytes,
) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, io::Error>> + Send + Sync + 'static {
    let mut remaining = total;
    tokio_stream_from_fn(move || {
        if remaining == 0 {
            return None;
        }
        let n = remaining.min(chunk.len() as u64) as usize;
        remaining -= n as u64;
        Some(Ok(Frame::data(chunk.slice(..n))))
    })
}

/// A stream from a closure, without pulling in a stream utility crate.
fn tokio_stream_from_fn<T, F>(f: F) -> FromFn<F>
where
    F: FnMut() -> Option<T> + Unpin,
{
    FromFn(f)
}

pub struct FromFn<F>(F);

impl<T, F: FnMut() -> Option<T> + Unpin> futures_core::Stream for FromFn<F> {
    type Item = T;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        std::task::Poll::Ready((self.0)())
    }
}

/// A config with one listener (`app`, TCP port 0) and one upstream (`backend`).
pub fn config_for(backend: SocketAddr) -> Config {
    let mut listener = ListenerConfig::new(
        "app",
        ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()),
        "backend",
    );
    listener.close_grace = Duration::from_millis(500);
    let upstream = UpstreamConfig::new("backend", vec![backend.to_string()]);
    let mut config = Config::default();
    config.listeners.push(listener);
    config.upstreams.push(upstream);
    config.runtime.drain_timeout = Duration::from_secs(5);
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config.validate().unwrap();
    config
}

/// Starts tether in-process and waits until the warm floor is open.
pub async fn start_tether(config: Config) -> (tether::Running, SocketAddr) {
    let min_idle = config.upstreams[0].pool.min_idle;
    let running = tether::start(config).await.unwrap();
    let addr = running.tcp_addr("app").unwrap();
    let pool = running.pool("backend").unwrap().clone();
    // Established, not merely dialling: a request sent while the warm dial is
    // still in progress would dial a connection of its own.
    wait_until(Duration::from_secs(5), || {
        pool.endpoints()
            .iter()
            .all(|e| e.established_connections() >= min_idle)
    })
    .await;
    (running, addr)
}

/// Polls `condition` every 10ms until it holds or `limit` passes; panics then.
pub async fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How the server ended a connection, as the client's socket reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// read() returned 0: FIN.
    Eof,
    /// read() failed with ECONNRESET: RST.
    Reset,
    /// Nothing within the wait.
    Open,
}

/// Reads until the server ends the connection or `limit` passes.
pub async fn read_to_end(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, End) {
    let mut data = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (data, End::Open),
            Ok(Ok(0)) => return (data, End::Eof),
            Ok(Ok(n)) => data.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => return (data, End::Reset),
            Ok(Err(e)) => panic!("unexpected read error: {e}"),
        }
    }
}

/// Sends raw bytes on a new connection and reads until the server ends it.
pub async fn exchange_raw(addr: SocketAddr, request: &[u8], limit: Duration) -> (Vec<u8>, End) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_to_end(&mut stream, limit).await
}

/// A parsed response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub version: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response (Content-Length, chunked, or to EOF) from a buffered stream.
pub async fn read_response<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    head_request: bool,
) -> io::Result<Resp> {
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    if line.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no response"));
    }
    let mut parts = line.trim_end().splitn(3, ' ');
    let version = parts.next().unwrap_or("").to_owned();
    let status: u16 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).await?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let mut resp = Resp {
        version,
        status,
        headers,
        body: Vec::new(),
    };
    if head_request || status == 204 || status == 304 {
        return Ok(resp);
    }
    if let Some(len) = resp.header("content-length") {
        let len: usize = len.parse().unwrap();
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body).await?;
        resp.body = body;
    } else if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).await?;
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                let mut trailer = String::new();
                loop {
                    trailer.clear();
                    reader.read_line(&mut trailer).await?;
                    if trailer.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            let mut chunk = vec![0u8; size + 2];
            reader.read_exact(&mut chunk).await?;
            resp.body.extend_from_slice(&chunk[..size]);
        }
    } else {
        reader.read_to_end(&mut resp.body).await?;
    }
    Ok(resp)
}

/// One GET on a new connection with `Connection: close`; returns the response.
pub async fn get_once(addr: SocketAddr, path: &str) -> Resp {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut reader = BufReader::new(stream);
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    reader
        .get_mut()
        .write_all(request.as_bytes())
        .await
        .unwrap();
    read_response(&mut reader, false).await.unwrap()
}

/// Parses a whole raw response buffer.
pub async fn parse(bytes: &[u8]) -> Resp {
    let mut reader = BufReader::new(bytes);
    read_response(&mut reader, false).await.unwrap()
}

/// Resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// TIME_WAIT entries that appeared after a point in the test, so entries left
/// by earlier tests (which linger for a minute) cannot be mistaken for ours.
pub struct TimeWaitBaseline(std::collections::HashSet<(SocketAddr, SocketAddr)>);

impl TimeWaitBaseline {
    pub fn now() -> Self {
        Self(
            tether::census::time_wait()
                .unwrap()
                .into_iter()
                .map(|s| (s.local, s.remote))
                .collect(),
        )
    }

    pub fn new_entries(&self) -> Vec<tether::census::TcpSocket> {
        tether::census::time_wait()
            .unwrap()
            .into_iter()
            .filter(|s| !self.0.contains(&(s.local, s.remote)))
            .collect()
    }

    /// New TIME_WAIT sockets whose remote port is `port`.
    pub fn toward_port(&self, port: u16) -> usize {
        self.new_entries()
            .iter()
            .filter(|s| s.remote.port() == port)
            .count()
    }

    /// New TIME_WAIT sockets whose local port is `port`.
    pub fn on_local_port(&self, port: u16) -> usize {
        self.new_entries()
            .iter()
            .filter(|s| s.local.port() == port)
            .count()
    }
}

/// Spawns a `tether run` command, reads the bound listen address from its log,
/// and keeps draining the log (echoing warnings) so the child never blocks.
pub fn spawn_tether(mut command: std::process::Command) -> (std::process::Child, SocketAddr) {
    use std::io::BufRead;
    let mut child = command
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("tether exited before listening")
            .unwrap();
        if let Some(rest) = line.split("listen=").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("tether: {line}");
            }
        }
    });
    (child, addr)
}

/// A TCP relay between tether and the backend that can start black-holing the
/// connections it already carries (as a dead NAT entry or a hung peer would),
/// while new connections still go through.
pub struct Relay {
    pub addr: std::net::SocketAddr,
    generation: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Relay {
    pub async fn start(backend: std::net::SocketAddr) -> Self {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let generation = Arc::new(AtomicUsize::new(0));
        let g = generation.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(server) = tokio::net::TcpStream::connect(backend).await else {
                    continue;
                };
                let born = g.load(Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (mut from, mut to, g) in [
                    (
                        Box::new(cr) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                        Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                        g.clone(),
                    ),
                    (Box::new(sr), Box::new(cw), g.clone()),
                ] {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if g.load(Ordering::SeqCst) != born {
                                continue; // black-holed: swallow the bytes
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Self { addr, generation }
    }

    /// Every connection carried so far stops delivering anything.
    pub fn black_hole_existing(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// A backend, and tether in front of it configured by `tune`, warm and ready.
pub async fn backend_and_tether(
    tune: impl FnOnce(&mut Config),
) -> (Backend, tether::Running, SocketAddr) {
    let backend = Backend::start().await;
    let mut config = config_for(backend.addr);
    tune(&mut config);
    let (running, addr) = start_tether(config).await;
    (backend, running, addr)
}

/// Runs `ip` (iproute2) with `args`; panics with its stderr when it fails.
pub fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (install iproute2): {e}"));
    assert!(
        out.status.success(),
        "ip {}: {} (network namespaces need root)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sends signal `name` ("TERM", "HUP") to process `pid`.
pub fn send_signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

/// Runs `command` to its end: its exit code and stderr.
pub async fn code_and_stderr(command: &mut tokio::process::Command) -> (i32, String) {
    let out = command.output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
