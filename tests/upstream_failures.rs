//! Upstream failures: every one ends in a clear status with a reason (502, 503,
//! 504), a truncated body is never passed off as complete, and a request is
//! never delivered twice unless it is safe to.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// What a scripted backend does with the n-th request (from 1) of its m-th
/// connection (from 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    /// `200 ok` with Content-Length.
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

struct Scripted {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    methods: Arc<Mutex<Vec<String>>>,
}

impl Scripted {
    async fn start(script: fn(usize, usize) -> Act) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let methods = Arc::new(Mutex::new(Vec::new()));
        let (r, m) = (requests.clone(), methods.clone());
        tokio::spawn(async move {
            let mut conn_index = 0;
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                conn_index += 1;
                tokio::spawn(scripted_conn(
                    stream,
                    conn_index,
                    script,
                    r.clone(),
                    m.clone(),
                ));
            }
        });
        Self {
            addr,
            requests,
            methods,
        }
    }

    fn methods(&self) -> Vec<String> {
        self.methods.lock().unwrap().clone()
    }
}

async fn scripted_conn(
    stream: TcpStream,
    conn_index: usize,
    script: fn(usize, usize) -> Act,
    requests: Arc<AtomicUsize>,
    methods: Arc<Mutex<Vec<String>>>,
) {
    let mut reader = BufReader::new(stream);
    let mut request_index = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let method = line.split(' ').next().unwrap_or("").to_owned();
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).await.unwrap();
            if h.trim_end().is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).await.unwrap();
        request_index += 1;
        requests.fetch_add(1, Ordering::SeqCst);
        methods.lock().unwrap().push(method);
        let stream = reader.get_mut();
        match script(conn_index, request_index) {
            Act::Respond => {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await
                    .unwrap();
            }
            Act::Reset => {
                socket2::SockRef::from(&*stream)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                return;
            }
            Act::TruncateLength => {
                let mut r = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec();
                r.extend(vec![b'x'; 1000]);
                stream.write_all(&r).await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                return;
            }
            Act::TruncateChunked => {
                stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                return;
            }
            Act::TruncateCloseDelimited => {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npartial body")
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                socket2::SockRef::from(&*stream)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                return;
            }
        }
    }
}

fn cold_config(backend: SocketAddr) -> tether::Config {
    let mut config = config_for(backend);
    config.upstreams[0].pool.min_idle = 0;
    config
}

async fn request_raw(addr: SocketAddr, request: &str) -> (Vec<u8>, End) {
    exchange_raw(addr, request.as_bytes(), Duration::from_secs(10)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_is_a_502_with_a_reason() {
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let running = tether::start(cold_config(dead_addr)).await.unwrap();
    let addr = running.tcp_addr("app").unwrap();
    let resp = get_once(addr, "/").await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.header("x-tether-error"), Some("connect-refused"));
    assert!(
        resp.text().contains(&dead_addr.to_string()),
        "{}",
        resp.text()
    );
    running.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_backend_is_a_502_within_connect_timeout() {
    // A listener that never accepts, with its queue full, drops further SYNs.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    let full = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(full)).await
        {
            fillers.push(s);
        }
    }
    let mut config = cold_config(full);
    config.upstreams[0].connect_timeout = Duration::from_millis(300);
    let running = tether::start(config).await.unwrap();
    let addr = running.tcp_addr("app").unwrap();
    let started = Instant::now();
    let resp = get_once(addr, "/").await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.header("x-tether-error"), Some("connect-timeout"));
    assert!(started.elapsed() < Duration::from_secs(5));
    running.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_backend_is_a_504_and_its_connection_is_reset() {
    let backend = Backend::start().await;
    let mut config = cold_config(backend.addr);
    config.listeners[0].request_timeout = Duration::from_millis(300);
    let running = tether::start(config).await.unwrap();
    let addr = running.tcp_addr("app").unwrap();
    let resp = get_once(addr, "/stall").await;
    assert_eq!(resp.status, 504);
    assert_eq!(resp.header("x-tether-error"), Some("upstream-timeout"));
    // The abandoned exchange's connection is not reused: it is reset.
    wait_until(Duration::from_secs(5), || {
        backend.stats.closed_by_reset.load(Ordering::SeqCst) == 1
    })
    .await;
    let resp = get_once(addr, "/").await;
    assert_eq!(resp.status, 200);
    assert_eq!(backend.accepted(), 2);
    running.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_pool_is_a_503_after_acquire_timeout() {
    let backend = Backend::start().await;
    let mut config = cold_config(backend.addr);
    config.upstreams[0].pool.max_connections = 1;
    config.upstreams[0].pool.max_idle = 1;
    config.upstreams[0].pool.acquire_timeout = Duration::from_millis(200);
    let running = tether::start(config).await.unwrap();
    let addr = running.tcp_addr("app").unwrap();
    let hog = tokio::spawn(async move { get_once(addr, "/slow?1500").await });
    wait_until(Duration::from_secs(5), || {
        backend.stats.in_flight.load(Ordering::SeqCst) == 1
    })
    .await;
    let started = Instant::now();
    let resp = get_once(addr, "/").await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.header("x-tether-error"), Some("pool-exhausted"));
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(hog.await.unwrap().status, 200);
    assert_eq!(backend.accepted(), 1);
    running.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_dying_mid_body_resets_the_client_never_a_clean_end() {
    fn script(_conn: usize, _req: usize) -> Act {
        Act::TruncateLength
    }
    fn chunked(_conn: usize, _req: usize) -> Act {
        Act::TruncateChunked
    }
    fn close_delimited(_conn: usize, _req: usize) -> Act {
        Act::TruncateCloseDelimited
    }
    for (name, f) in [
        ("content-length", script as fn(usize, usize) -> Act),
        ("chunked", chunked),
        ("close-delimited", close_delimited),
    ] {
        for version in ["HTTP/1.1", "HTTP/1.0"] {
            let backend = Scripted::start(f).await;
            let running = tether::start(cold_config(backend.addr)).await.unwrap();
            let addr = running.tcp_addr("app").unwrap();
            let request = if version == "HTTP/1.1" {
                "GET / HTTP/1.1\r\nHost: t\r\n\r\n".to_owned()
            } else {
                "GET / HTTP/1.0\r\n\r\n".to_owned()
            };
            let (bytes, end) = request_raw(addr, &request).await;
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if version == "HTTP/1.0" && name != "content-length" {
                // Buffered for a Content-Length, the failure is seen before any
                // byte reaches the client: a clean 502 instead.
                assert!(text.starts_with("HTTP/1.0 502"), "{name} {version}: {text}");
            } else {
                assert_eq!(end, End::Reset, "{name} {version}: {text}");
                assert!(
                    !text.ends_with("0\r\n\r\n"),
                    "{name} {version}: chunked body was terminated"
                );
            }
            running.drain().await;
        }
    }
}

const POST: &str =
    "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_closing_idle_pooled_connections_is_invisible_to_clients() {
    let (backend, running, addr) = backend_and_tether(|_| {}).await;
    assert_eq!(get_once(addr, "/").await.status, 200);

    // The backend has closed its idle connections: the stale check at checkout
    // notices, so neither a GET nor a POST sees an error.
    for round in 0..5 {
        let closed = backend.stats.closed.load(Ordering::SeqCst);
        backend.close_idle_connections();
        wait_until(Duration::from_secs(5), || {
            backend.stats.closed.load(Ordering::SeqCst) > closed
        })
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            get_once(addr, "/").await.status,
            200,
            "GET in round {round}"
        );
        let closed = backend.stats.closed.load(Ordering::SeqCst);
        backend.close_idle_connections();
        wait_until(Duration::from_secs(5), || {
            backend.stats.closed.load(Ordering::SeqCst) > closed
        })
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let resp = parse(&request_raw(addr, POST).await.0).await;
        assert_eq!(resp.status, 200, "POST in round {round}");
        assert_eq!(resp.body, b"hello");
    }
    assert_eq!(
        backend.stats.posts.load(Ordering::SeqCst),
        5,
        "each POST delivered once"
    );
    running.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_the_backend_close_retries_gets_and_never_sends_a_post_twice() {
    let (backend, running, addr) = backend_and_tether(|_| {}).await;
    let mut posts_ok = 0;
    for round in 0..20 {
        // No wait: the request may be written just as the backend closes.
        backend.close_idle_connections();
        assert_eq!(
            get_once(addr, "/").await.status,
            200,
            "GET in round {round}"
        );
        backend.close_idle_connections();
        let post = format!(
            "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 8\r\nConnection: close\r\n\r\nround-{round:02}"
        );
        let resp = parse(&request_raw(addr, &post).await.0).await;
        match resp.status {
            200 => posts_ok += 1,
            502 => assert_eq!(resp.header("x-tether-error"), Some("upstream-failed")),
            other => panic!("POST in round {round} got {other}"),
        }
    }
    let echoed = backend.stats.echoed.lock().unwrap().clone();
    let unique: std::collections::HashSet<_> = echoed.iter().collect();
    assert_eq!(
        unique.len(),
        echoed.len(),
        "a POST was delivered twice: {echoed:?}"
    );
    assert!(
        echoed.len() >= posts_ok,
        "{} delivered, {posts_ok} answered",
        echoed.len()
    );
    running.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_on_a_reused_connection_retries_a_get_once_but_never_a_post() {
    // The first connection answers its first request and resets on its second.
    fn script(conn: usize, req: usize) -> Act {
        if conn == 1 && req == 2 {
            Act::Reset
        } else {
            Act::Respond
        }
    }
    let backend = Scripted::start(script).await;
    let running = tether::start(cold_config(backend.addr)).await.unwrap();
    let addr = running.tcp_addr("app").unwrap();
    assert_eq!(get_once(addr, "/").await.status, 200);
    let resp = get_once(addr, "/").await;
    assert_eq!(resp.status, 200, "GET retried on a fresh connection");
    assert_eq!(backend.requests.load(Ordering::SeqCst), 3);
    running.drain().await;

    let backend = Scripted::start(script).await;
    let running = tether::start(cold_config(backend.addr)).await.unwrap();
    let addr = running.tcp_addr("app").unwrap();
    assert_eq!(get_once(addr, "/").await.status, 200);
    let (bytes, _) = request_raw(
        addr,
        "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    )
    .await;
    let resp = parse(&bytes).await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.header("x-tether-error"), Some("upstream-failed"));
    assert_eq!(backend.methods(), ["GET", "POST"], "the POST was sent once");
    running.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_upload_cancels_the_upstream_exchange() {
    let backend = Backend::start().await;
    let running = tether::start(cold_config(backend.addr)).await.unwrap();
    let addr = running.tcp_addr("app").unwrap();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"POST /count HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n")
        .await
        .unwrap();
    stream.write_all(&vec![b'x'; 200_000]).await.unwrap();
    wait_until(Duration::from_secs(5), || backend.requests() == 1).await;
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
    // The upstream connection carrying the half-sent body is reset, not reused.
    wait_until(Duration::from_secs(5), || {
        backend.stats.closed_by_reset.load(Ordering::SeqCst) == 1
    })
    .await;
    running.drain().await;
}
