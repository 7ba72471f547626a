//! Upstream failures: every one ends in a clear status with a reason (502, 503,
//! 504), a truncated body is never passed off as complete, and a request is
//! never delivered twice unless it is safe to.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// No warm floor: connections are dialled per request.
fn cold(config: &mut tether::Config) {
    config.upstreams[0].pool.min_idle = 0;
}

/// [`config_for`] `backend`, [`cold`].
fn cold_config(backend: SocketAddr) -> tether::Config {
    let mut config = config_for(backend);
    cold(&mut config);
    config
}

/// Sends `request` on a new connection and parses the whole answer.
async fn answer_to(addr: SocketAddr, request: &str) -> Response {
    parse(&exchange_raw(addr, request.as_bytes()).await.0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_is_a_502_with_a_reason() {
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    with_tether(cold_config(dead_addr), |t| async move {
        let resp = get_once(t.addr(), "/").await;
        assert_tether_error(&resp, 502, "connect-refused");
        assert!(
            resp.text().contains(&dead_addr.to_string()),
            "{}",
            resp.text()
        );
    })
    .await;
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
    with_tether(config, |t| async move {
        let started = Instant::now();
        let resp = get_once(t.addr(), "/").await;
        assert_tether_error(&resp, 502, "connect-timeout");
        assert!(started.elapsed() < Duration::from_secs(5));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_backend_is_a_504_and_its_connection_is_reset() {
    with_tether_and_backend(
        |config| {
            cold(config);
            config.listeners[0].request_timeout = Duration::from_millis(300);
        },
        |backend, t| async move {
            let resp = get_once(t.addr(), "/stall").await;
            assert_tether_error(&resp, 504, "upstream-timeout");
            // The abandoned exchange's connection is not reused: it is reset.
            eventually(|| backend.closed_by_reset() == 1).await;
            let resp = get_once(t.addr(), "/").await;
            assert_eq!(resp.status, 200);
            assert_eq!(backend.accepted(), 2);
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_pool_is_a_503_after_acquire_timeout() {
    with_tether_and_backend(
        |config| {
            cold(config);
            config.upstreams[0].pool.max_connections = 1;
            config.upstreams[0].pool.max_idle = 1;
            config.upstreams[0].pool.acquire_timeout = Duration::from_millis(200);
        },
        |backend, t| async move {
            let addr = t.addr();
            let hog = tokio::spawn(async move { get_once(addr, "/slow?1500").await });
            eventually(|| backend.in_flight() == 1).await;
            let started = Instant::now();
            let resp = get_once(addr, "/").await;
            assert_tether_error(&resp, 503, "pool-exhausted");
            assert!(started.elapsed() < Duration::from_secs(1));
            assert_eq!(hog.await.unwrap().status, 200);
            assert_eq!(backend.accepted(), 1);
        },
    )
    .await;
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
        ("content-length", script as Script),
        ("chunked", chunked),
        ("close-delimited", close_delimited),
    ] {
        for version in ["HTTP/1.1", "HTTP/1.0"] {
            let backend = Backend::builder().script(f).start().await;
            with_tether(cold_config(backend.addr), |t| async move {
                let request = if version == "HTTP/1.1" {
                    "GET / HTTP/1.1\r\nHost: t\r\n\r\n".to_owned()
                } else {
                    "GET / HTTP/1.0\r\n\r\n".to_owned()
                };
                let (bytes, end) = exchange_raw(t.addr(), request.as_bytes()).await;
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
            })
            .await;
        }
    }
}

const POST: &str =
    "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";

/// Has the backend close its idle connections and waits until one has closed.
async fn close_idle_and_wait(backend: &Backend) {
    let closed = backend.closed();
    backend.close_gracefully();
    eventually(|| backend.closed() > closed).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_closing_idle_pooled_connections_is_invisible_to_clients() {
    let backend = Backend::start().await;
    with_tether(config_for(backend.addr), |t| async move {
        let addr = t.addr();
        assert_eq!(get_once(addr, "/").await.status, 200);

        // The backend has closed its idle connections: the stale check at checkout
        // notices, so neither a GET nor a POST sees an error.
        for round in 0..5 {
            close_idle_and_wait(&backend).await;
            assert_eq!(
                get_once(addr, "/").await.status,
                200,
                "GET in round {round}"
            );
            close_idle_and_wait(&backend).await;
            let resp = answer_to(addr, POST).await;
            assert_eq!(resp.status, 200, "POST in round {round}");
            assert_eq!(resp.body, b"hello");
        }
        assert_eq!(
            backend
                .stats
                .posts
                .load(std::sync::atomic::Ordering::SeqCst),
            5,
            "each POST delivered once"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_the_backend_close_retries_gets_and_never_sends_a_post_twice() {
    let backend = Backend::start().await;
    with_tether(config_for(backend.addr), |t| async move {
        let addr = t.addr();
        let mut posts_ok = 0;
        for round in 0..20 {
            // No wait: the request may be written just as the backend closes.
            backend.close_gracefully();
            assert_eq!(
                get_once(addr, "/").await.status,
                200,
                "GET in round {round}"
            );
            backend.close_gracefully();
            let post = format!(
                "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 8\r\nConnection: close\r\n\r\nround-{round:02}"
            );
            let resp = answer_to(addr, &post).await;
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
    })
    .await;
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
    let backend = Backend::builder().script(script).start().await;
    with_tether(cold_config(backend.addr), |t| async move {
        assert_eq!(get_once(t.addr(), "/").await.status, 200);
        let resp = get_once(t.addr(), "/").await;
        assert_eq!(resp.status, 200, "GET retried on a fresh connection");
        assert_eq!(backend.requests(), 3);
    })
    .await;

    let backend = Backend::builder().script(script).start().await;
    with_tether(cold_config(backend.addr), |t| async move {
        assert_eq!(get_once(t.addr(), "/").await.status, 200);
        let resp = answer_to(
            t.addr(),
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        )
        .await;
        assert_tether_error(&resp, 502, "upstream-failed");
        assert_eq!(backend.methods(), ["GET", "POST"], "the POST was sent once");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_upload_cancels_the_upstream_exchange() {
    with_tether_and_backend(cold, |backend, t| async move {
        let mut stream = TcpStream::connect(t.addr()).await.unwrap();
        stream
            .write_all(b"POST /count HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n")
            .await
            .unwrap();
        stream.write_all(&vec![b'x'; 200_000]).await.unwrap();
        eventually(|| backend.requests() == 1).await;
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(stream);
        // The upstream connection carrying the half-sent body is reset, not reused.
        eventually(|| backend.closed_by_reset() == 1).await;
    })
    .await;
}
