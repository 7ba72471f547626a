//! The client leg: timeouts (a client that stops reading included) end in
//! RST, bad requests get a 4xx and are never forwarded, and each
//! `client_close` policy is observed on real sockets.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tether::config::ClientClose;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";
const GET_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_client_is_reset_not_closed() {
    with_tether_and_backend(
        |c| c.listeners[0].idle_timeout = Duration::from_millis(300),
        |_, t| async move {
            let mut client = Client::connect(t.addr()).await;
            let resp = client.request(GET).await;
            assert_eq!(resp.status, 200);
            assert!(resp.header("connection").is_none_or(|v| v != "close"));
            let (rest, end) = client.read_to_end().await;
            assert!(rest.is_empty());
            assert_eq!(end, End::Reset);
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_silent_clients_are_reset_after_header_timeout() {
    with_tether_and_backend(
        |c| c.listeners[0].header_timeout = Duration::from_millis(400),
        |backend, t| async move {
            // Silent: connects and sends nothing.
            let mut silent = TcpStream::connect(t.addr()).await.unwrap();
            // Slowloris: a header line every 100ms, never finishing the head.
            let mut slow = TcpStream::connect(t.addr()).await.unwrap();
            slow.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n")
                .await
                .unwrap();
            let trickle = tokio::spawn(async move {
                let started = Instant::now();
                for i in 0..40 {
                    // A reset shows up on whichever call comes first, write or read.
                    if let Err(e) = slow.write_all(format!("X-{i}: y\r\n").as_bytes()).await {
                        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
                        return (Vec::new(), End::Reset, started.elapsed());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let (data, end) = read_to_end(&mut slow).await;
                (data, end, started.elapsed())
            });
            let (data, end) = read_to_end(&mut silent).await;
            assert!(data.is_empty());
            assert_eq!(end, End::Reset);
            let (data, end, elapsed) = trickle.await.unwrap();
            assert!(data.is_empty(), "no response to an unfinished head");
            assert_eq!(end, End::Reset);
            assert!(elapsed < Duration::from_secs(4), "reset took {elapsed:?}");
            assert_eq!(backend.requests(), 0);
        },
    )
    .await;
}

/// A client whose receive buffer is small, so that tether's writes to it
/// block soon after it stops reading.
async fn small_window_client(addr: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Client connections of listener `app` reset for `send_timeout`.
async fn send_timeouts(admin: std::net::SocketAddr) -> f64 {
    let text = get_once(admin, "/metrics").await.text();
    let line = r#"tether_client_connections_closed_total{listener="app",reason="send-timeout"} "#;
    text.lines()
        .find_map(|l| l.strip_prefix(line))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_reset_after_send_timeout_and_a_slow_one_is_not() {
    const TIMEOUT: Duration = Duration::from_secs(3);
    with_tether_and_backend(
        |c| c.listeners[0].send_timeout = TIMEOUT,
        |backend, t| async move {
            // A steady reader, far slower than tether writes: a blocked
            // write goes on once the kernel has sent a third of the socket's
            // queue (up to 4 MiB), well within the timeout at this pace.
            let mut steady = small_window_client(t.addr()).await;
            steady
                .write_all(b"GET /big?8388608 HTTP/1.1\r\nHost: t\r\n\r\n")
                .await
                .unwrap();
            let mut received = 0usize;
            let mut buf = vec![0u8; 256 * 1024];
            while received < 8 * 1024 * 1024 {
                let n = steady
                    .read(&mut buf)
                    .await
                    .expect("the steady reader is not reset");
                assert!(n > 0, "the connection stays open");
                received += n;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            assert_eq!(send_timeouts(t.admin()).await, 0.0);

            // A client that asks for 64 MiB and reads none of it.
            let closed_before = backend.closed();
            let mut stalled = small_window_client(t.addr()).await;
            let asked = Instant::now();
            stalled
                .write_all(b"GET /big?67108864 HTTP/1.1\r\nHost: t\r\n\r\n")
                .await
                .unwrap();
            // Not a byte read until the reset is counted: a read would let
            // the write go on.
            while send_timeouts(t.admin()).await == 0.0 {
                assert!(asked.elapsed() < Duration::from_secs(15), "no send timeout");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let waited = asked.elapsed();
            assert!(
                waited >= TIMEOUT,
                "reset after {waited:?}, before the timeout"
            );
            let (_, end) = read_to_end(&mut stalled).await;
            assert_eq!(end, End::Reset, "reset, not closed");
            // The body was not read to its end: its upstream connection is
            // discarded, not put back in the pool.
            eventually(|| backend.closed() > closed_before).await;
            assert_eq!(send_timeouts(t.admin()).await, 1.0);
        },
    )
    .await;
}

/// Requests that must never reach the backend, with the status each gets.
const MALFORMED: &[(&str, &[u8], u16)] = &[
    ("garbage request line", b"HELLO\r\n\r\n", 400),
    (
        "bad method token",
        b"GE(T / HTTP/1.1\r\nHost: t\r\n\r\n",
        400,
    ),
    ("unknown version", b"GET / HTTP/1.7\r\nHost: t\r\n\r\n", 400),
    (
        "space before colon",
        b"GET / HTTP/1.1\r\nHost : t\r\n\r\n",
        400,
    ),
    (
        "header without colon",
        b"GET / HTTP/1.1\r\nHost: t\r\nNoColon\r\n\r\n",
        400,
    ),
    (
        "control byte in value",
        b"GET / HTTP/1.1\r\nHost: t\r\nX: a\x01b\r\n\r\n",
        400,
    ),
    (
        "NUL in target",
        b"GET /a\x00b HTTP/1.1\r\nHost: t\r\n\r\n",
        400,
    ),
    (
        "obsolete line folding",
        b"GET / HTTP/1.1\r\nHost: t\r\nX: a\r\n b\r\n\r\n",
        400,
    ),
    (
        "differing duplicate Content-Length",
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400,
    ),
    (
        "non-numeric Content-Length",
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
        400,
    ),
    (
        "negative Content-Length",
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n",
        400,
    ),
    (
        "Transfer-Encoding not ending in chunked",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n",
        400,
    ),
    (
        "Transfer-Encoding in HTTP/1.0",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "bad chunk size",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk longer than its size",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcdef\r\n0\r\n\r\n",
        400,
    ),
    (
        "missing Host in HTTP/1.1",
        b"GET / HTTP/1.1\r\nUser-Agent: t\r\n\r\n",
        400,
    ),
    (
        "two Host headers",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        400,
    ),
    ("invalid Host", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    (
        "CONNECT tunnel",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        405,
    ),
    ("oversized head", b"", 431),
    ("too many headers", b"", 431),
];

fn oversized_head() -> Vec<u8> {
    let mut r = b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: ".to_vec();
    r.extend(std::iter::repeat_n(b'a', 70 * 1024));
    r.extend_from_slice(b"\r\n\r\n");
    r
}

fn too_many_headers() -> Vec<u8> {
    let mut r = b"GET / HTTP/1.1\r\nHost: t\r\n".to_vec();
    for i in 0..200 {
        r.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    r.extend_from_slice(b"\r\n");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_a_4xx_and_never_reach_the_backend() {
    with_tether_and_backend(
        |c| c.listeners[0].close_grace = Duration::from_millis(200),
        |backend, t| async move {
            for (name, raw, status) in MALFORMED {
                let before = backend.requests();
                let raw = match *name {
                    "oversized head" => oversized_head(),
                    "too many headers" => too_many_headers(),
                    _ => raw.to_vec(),
                };
                // The client stays open: tether must not close gracefully, so it resets
                // after close_grace.
                let (bytes, end) = exchange_raw(t.addr(), &raw).await;
                let resp = parse(&bytes).await;
                assert_eq!(
                    resp.status,
                    *status,
                    "{name}: {}",
                    String::from_utf8_lossy(&bytes)
                );
                assert_eq!(resp.header("connection"), Some("close"), "{name}");
                assert_eq!(end, End::Reset, "{name}: a misbehaving client gets no FIN");
                assert_eq!(backend.requests(), before, "{name} was forwarded");
            }
            assert_eq!(backend.requests(), 0, "nothing malformed was forwarded");
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_never_forwarded_as_ambiguous() {
    let backend = Backend::start().await;
    with_tether(config_for(backend.addr), |t| async move {
        let raw = b"POST /count HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let (bytes, _end) = exchange_raw(t.addr(), raw).await;
        let resp = parse(&bytes).await;
        assert_eq!(resp.status, 400, "{}", String::from_utf8_lossy(&bytes));
        assert_eq!(backend.requests(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_headers_spelt_with_underscores_are_refused_under_every_setting() {
    use tether::config::UnderscoresInHeaders;
    // A CGI-style backend reads `Transfer_Encoding` as Transfer-Encoding, and
    // `content_length` as Content-Length: either would frame the body anew.
    let requests: [(&str, &[u8]); 2] = [
        (
            "Transfer_Encoding with Content-Length",
            b"POST /count HTTP/1.1\r\nHost: t\r\nTransfer_Encoding: chunked\r\nContent-Length: 10\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "content_length",
            b"POST /count HTTP/1.1\r\nHost: t\r\ncontent_length: 5\r\n\r\n",
        ),
    ];
    for setting in [
        UnderscoresInHeaders::Drop,
        UnderscoresInHeaders::Pass,
        UnderscoresInHeaders::Reject,
    ] {
        let tune = |c: &mut tether::Config| {
            c.listeners[0].underscores_in_headers = setting;
            c.listeners[0].close_grace = Duration::from_millis(200);
        };
        with_tether_and_backend(tune, |backend, t| async move {
            for (name, raw) in requests {
                let (bytes, end) = exchange_raw(t.addr(), raw).await;
                let resp = parse(&bytes).await;
                assert_tether_error(&resp, 400, "underscore-framing-header");
                assert_eq!(resp.header("connection"), Some("close"), "{name}");
                assert_eq!(end, End::Reset, "{name}: a misbehaving client gets no FIN");
            }
            assert_eq!(backend.requests(), 0, "{setting:?}: something was forwarded");
            assert!(backend.header_names().is_empty());
            let text = get_once(t.admin(), "/metrics").await.text();
            let refused = r#"tether_local_responses_total{listener="app",reason="underscore-framing-header"} 2"#;
            assert!(text.contains(refused), "{text}");
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_policy_closes_first_so_clients_that_wait_for_the_server_get_no_delay() {
    with_tether_and_backend(
        |c| c.listeners[0].close_grace = Duration::from_secs(5),
        |_, t| async move {
            let addr = t.addr();
            for request in [&b"GET / HTTP/1.0\r\n\r\n"[..], GET_CLOSE] {
                let started = Instant::now();
                let mut client = Client::connect(addr).await;
                client.send(request).await;
                // Like ab or PHP: read until the server closes.
                let (bytes, end) = client.read_to_end().await;
                let elapsed = started.elapsed();
                assert_eq!(end, End::Eof, "tether sent the first FIN");
                let resp = parse(&bytes).await;
                assert_eq!(resp.status, 200);
                assert_eq!(resp.body, b"hello");
                assert_eq!(resp.header("connection"), Some("close"));
                assert!(
                    elapsed < Duration::from_secs(2),
                    "no wait on close_grace: {elapsed:?}"
                );
                let client_port = client.port();
                drop(client);
                tokio::time::sleep(Duration::from_millis(100)).await;
                // TIME_WAIT is on tether's listening port, none on the app's port.
                assert!(time_wait_between(addr.port(), client_port));
                assert!(!time_wait_between(client_port, addr.port()));
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_first_policy_never_sends_the_first_fin() {
    let tune = |c: &mut tether::Config| {
        c.listeners[0].client_close = ClientClose::ClientFirst;
        c.listeners[0].close_grace = Duration::from_millis(500);
    };
    with_tether_and_backend(tune, |_, t| async move {
        let addr = t.addr();
        // A client that waits for the server: nothing until close_grace, then RST.
        let started = Instant::now();
        let (bytes, end) = exchange_raw(addr, GET_CLOSE).await;
        assert_eq!(parse(&bytes).await.status, 200);
        assert_eq!(end, End::Reset);
        assert!(started.elapsed() >= Duration::from_millis(450));

        // A client that closes first: TIME_WAIT lands on the client, none on tether.
        let mut client = Client::connect(addr).await;
        let client_port = client.port();
        assert_eq!(client.request(GET_CLOSE).await.status, 200);
        drop(client);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(time_wait_between(client_port, addr.port()));
        assert!(!time_wait_between(addr.port(), client_port));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_policy_resets_after_the_response_is_acknowledged_leaving_no_time_wait() {
    with_tether_and_backend(
        |c| c.listeners[0].client_close = ClientClose::Abort,
        |_, t| async move {
            let addr = t.addr();
            let mut ports = Vec::new();
            for _ in 0..20 {
                let mut client = Client::connect(addr).await;
                ports.push(client.port());
                client.send(GET_CLOSE).await;
                let (bytes, end) = client.read_to_end().await;
                // The whole response is readable even though the connection ends in RST.
                assert_eq!(parse(&bytes).await.body, b"hello");
                assert_eq!(end, End::Reset);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(time_wait_count(|s| s.local.port() == addr.port()), 0);
            assert_eq!(
                time_wait_count(
                    |s| ports.contains(&s.local.port()) && s.remote.port() == addr.port()
                ),
                0
            );
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_per_connection_spares_a_close_first_app_its_time_wait() {
    with_tether_and_backend(
        |c| c.listeners[0].max_requests_per_connection = 1,
        |_, t| async move {
            let addr = t.addr();
            let mut ports = Vec::new();
            for _ in 0..100 {
                // Like curl or python requests: keep-alive request, read by length, close.
                let mut client = Client::connect(addr).await;
                ports.push(client.port());
                let resp = client.request(GET).await;
                assert_eq!(resp.status, 200);
                assert_eq!(resp.header("connection"), Some("close"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let on_app = time_wait_count(|s| {
                ports.contains(&s.local.port()) && s.remote.port() == addr.port()
            });
            assert_eq!(on_app, 0, "TIME_WAIT on the app's own ports");
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_response_bytes_and_fin_arrive_together() {
    // A client that reads by length and closes at once must find tether's FIN
    // already there, or its close comes first and TIME_WAIT lands on the app.
    with_tether_and_backend(
        |c| c.listeners[0].max_requests_per_connection = 1,
        |_, t| async move {
            let addr = t.addr();
            let late_fins = tokio::task::spawn_blocking(move || {
                use std::io::{Read, Write};
                let mut late = 0;
                for _ in 0..1000 {
                    let mut stream = std::net::TcpStream::connect(addr).unwrap();
                    stream.write_all(GET).unwrap();
                    let mut response = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !response.ends_with(b"hello") {
                        let n = stream.read(&mut chunk).unwrap();
                        assert!(n > 0, "EOF before the whole response");
                        response.extend_from_slice(&chunk[..n]);
                    }
                    // The moment the last byte is readable, is the FIN there too?
                    stream.set_nonblocking(true).unwrap();
                    let peeked = stream.peek(&mut [0u8; 1]);
                    if !matches!(peeked, Ok(0)) {
                        late += 1;
                    }
                }
                late
            })
            .await
            .unwrap();
            assert_eq!(late_fins, 0, "responses whose FIN came in a later segment");
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_after_a_complete_request_still_gets_the_whole_response() {
    let backend = Backend::start().await;
    with_tether(config_for(backend.addr), |t| async move {
        let mut client = Client::connect(t.addr()).await;
        client
            .send(b"GET /big?300000 HTTP/1.1\r\nHost: t\r\n\r\n")
            .await;
        client.stream().shutdown().await.unwrap();
        let (bytes, end) = client.read_to_end().await;
        let resp = parse(&bytes).await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body.len(), 300_000);
        assert_eq!(end, End::Eof);

        // Half-closing before the head is complete is an abort: no response.
        let mut client = Client::connect(t.addr()).await;
        client.send(b"GET / HTTP/1.1\r\nHo").await;
        client.stream().shutdown().await.unwrap();
        let (bytes, end) = client.read_to_end().await;
        assert!(bytes.is_empty(), "{}", String::from_utf8_lossy(&bytes));
        assert_eq!(end, End::Reset);
        assert_eq!(backend.requests(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_clients_get_content_length_when_the_body_fits_the_buffer() {
    with_tether_and_backend(
        |c| c.listeners[0].http10_buffer = tether::config::Size::kib(64),
        |_, t| async move {
            let (bytes, end) = exchange_raw(t.addr(), b"GET /big?5000 HTTP/1.0\r\n\r\n").await;
            let resp = parse(&bytes).await;
            assert_eq!(resp.version, "HTTP/1.0");
            assert_eq!(resp.header("content-length"), Some("5000"));
            assert_eq!(resp.body.len(), 5000);
            assert_eq!(end, End::Eof);

            // Larger than the buffer: close-delimited, still complete.
            let (bytes, end) = exchange_raw(t.addr(), b"GET /big?300000 HTTP/1.0\r\n\r\n").await;
            let resp = parse(&bytes).await;
            assert_eq!(resp.header("content-length"), None);
            assert_eq!(resp.body.len(), 300_000);
            assert_eq!(end, End::Eof);

            // Keep-alive HTTP/1.0 clients keep their connection.
            let mut client = Client::connect(t.addr()).await;
            for _ in 0..3 {
                let resp = client
                    .request(b"GET /big?100 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                    .await;
                assert_eq!(resp.header("content-length"), Some("100"));
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_listener_serves_requests() {
    let backend = Backend::start().await;
    let mut config = config_for(backend.addr);
    let path = std::env::temp_dir().join(format!("tether-test-{}.sock", std::process::id()));
    config.listeners[0].listen = tether::config::ListenAddr::Unix(path.clone());
    let socket = path.clone();
    with_tether(config, |_| async move {
        let mut stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
        stream.write_all(GET_CLOSE).await.unwrap();
        let (bytes, end) = read_to_end(&mut stream).await;
        assert_eq!(end, End::Eof);
        let resp = parse(&bytes).await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, b"hello");
    })
    .await;
    assert!(!path.exists(), "socket file removed on shutdown");
}
