//! tether's own HTTP/1 server on the client leg: an idle keep-alive
//! connection holds no buffer, `Expect: 100-continue` is answered, pipelined
//! requests are answered in order however their bytes arrive, chunked bodies
//! with extensions and trailers arrive decoded, and HTTP/1.0 clients get a
//! Content-Length exactly up to `http10_buffer`.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Raises this process's soft open-file limit to its hard one; returns it.
fn raise_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read or fill the struct given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    limit.rlim_cur
}

/// `count` keep-alive connections, each with one GET answered (read into a
/// small buffer on the stack, so the client side keeps nothing but its
/// socket), opened 100 at a time.
async fn idle_connections(addr: std::net::SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut open = Vec::with_capacity(count);
    for _ in 0..count.div_ceil(100) {
        let batch = concurrently(100.min(count - open.len()), move || async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                .await
                .unwrap();
            let mut answer = [0u8; 512];
            let mut got = 0;
            while !answer[..got].ends_with(b"hello") {
                let n = stream.read(&mut answer[got..]).await.unwrap();
                assert!(n > 0, "closed before the answer");
                got += n;
            }
            stream
        })
        .await;
        open.extend(batch);
    }
    open
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_costs_at_most_8_kib() {
    const CLIENTS: usize = 2000;
    assert!(
        raise_nofile() > 2 * CLIENTS as u64 + 500,
        "open-file limit too low"
    );
    let tune = |c: &mut tether::Config| {
        c.listeners[0].idle_timeout = Duration::from_secs(600);
        c.listeners[0].max_connections = 3 * CLIENTS;
    };
    with_tether_and_backend(tune, |_, t| async move {
        // Warmed up first, so that what the allocator keeps for itself (and
        // the runtime's first growth) is in the figure before.
        drop(idle_connections(t.addr(), 500).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = rss_kib(std::process::id());
        let clients = idle_connections(t.addr(), CLIENTS).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let with = rss_kib(std::process::id());
        let per = with.saturating_sub(before) * 1024 / CLIENTS as u64;
        eprintln!(
            "RSS {before} KiB, with {CLIENTS} idle keep-alive connections {with} KiB: \
             {per} B each, both ends of the connection in this process"
        );
        assert!(per <= 8 * 1024, "{per} B per idle keep-alive connection");
        // Still served: idle is not dead.
        let mut client = Client::over(clients.into_iter().next().unwrap());
        let resp = client.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!(resp.status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    with_tether_and_backend(
        |_| {},
        |backend, t| async move {
            let mut stream = TcpStream::connect(t.addr()).await.unwrap();
            stream
                .write_all(
                    b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
                )
                .await
                .unwrap();
            let mut interim = [0u8; 25];
            tokio::time::timeout(PATIENCE, stream.read_exact(&mut interim))
                .await
                .expect("no 100 Continue")
                .unwrap();
            assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
            stream.write_all(b"hello").await.unwrap();
            let mut client = Client::over(stream);
            let resp = client.response().await;
            assert_eq!((resp.status, resp.text()), (200, "hello".to_owned()));
            assert_eq!(backend.requests(), 1);

            // Refused before its body is wanted: the answer, and no 100 first.
            let (bytes, _) = exchange_raw(
                t.addr(),
                b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
            )
            .await;
            let text = String::from_utf8_lossy(&bytes);
            assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
            assert_tether_error(&parse(&bytes).await, 400, "missing-host");
        },
    )
    .await;
}

/// Four requests, back to back: a Content-Length body, a chunked one, none,
/// and a last one that closes.
const PIPELINE: &[u8] = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nfirst\
POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nsecond\r\n0\r\n\r\n\
GET /headers HTTP/1.1\r\nHost: t\r\nX-Third: 3\r\n\r\n\
POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\nConnection: close\r\n\r\nfourth";

/// Sends [`PIPELINE`] in writes of `step` bytes and checks the four answers
/// arrive in order, then tether's FIN.
async fn pipeline(addr: std::net::SocketAddr, step: usize) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    for piece in PIPELINE.chunks(step) {
        stream.write_all(piece).await.unwrap();
        if step < PIPELINE.len() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let mut client = Client::over(stream);
    assert_eq!(client.response().await.text(), "first", "by {step}");
    assert_eq!(client.response().await.text(), "second", "by {step}");
    let third = client.response().await.text();
    assert!(third.contains("x-third: 3"), "by {step}: {third}");
    let fourth = client.response().await;
    assert_eq!(fourth.text(), "fourth", "by {step}");
    assert_eq!(fourth.header("connection"), Some("close"));
    let (rest, end) = client.read_to_end().await;
    assert!(rest.is_empty(), "by {step}");
    assert_eq!(end, End::Eof, "by {step}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_however_their_bytes_arrive() {
    with_tether_and_backend(
        |_| {},
        |backend, t| async move {
            for step in [PIPELINE.len(), 97, 13, 1] {
                pipeline(t.addr(), step).await;
            }
            assert_eq!(backend.requests(), 16);
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_with_extensions_and_trailers_arrive_decoded() {
    with_tether_and_backend(
        |_| {},
        |backend, t| async move {
            let mut client = Client::connect(t.addr()).await;
            let resp = client
                .request(
                    b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n\
                      3;name=value\r\nabc\r\n2;x;y=\"q r\"\r\nde\r\n0;last\r\n\
                      X-Trailer: yes\r\nX-Other: 2\r\n\r\n",
                )
                .await;
            assert_eq!((resp.status, resp.text()), (200, "abcde".to_owned()));
            // The connection goes on after the trailers.
            let resp = client.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
            assert_eq!(resp.body, b"hello");

            // Longer than request_buffer: the rest streams from the socket
            // to the backend, chunk by chunk.
            let mut request =
                b"POST /count HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for _ in 0..200 {
                request.extend_from_slice(b"1000;n=1\r\n");
                request.extend(std::iter::repeat_n(b'x', 0x1000));
                request.extend_from_slice(b"\r\n");
            }
            request.extend_from_slice(b"0\r\nX-End: 1\r\n\r\n");
            let resp = client.request(&request).await;
            assert_eq!(resp.text(), (200 * 0x1000).to_string());
            let resp = client.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
            assert_eq!(resp.body, b"hello");
            assert_eq!(backend.requests(), 4);
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_clients_get_a_content_length_up_to_http10_buffer_and_a_close_past_it() {
    with_tether_and_backend(
        |c| c.listeners[0].http10_buffer = tether::config::Size::kib(1),
        |_, t| async move {
            let mut client = Client::connect(t.addr()).await;
            let keep_alive = |n: usize| {
                format!("GET /big?{n} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").into_bytes()
            };
            let resp = client.request(&keep_alive(1024)).await;
            assert_eq!(resp.version, "HTTP/1.0");
            assert_eq!(resp.header("content-length"), Some("1024"));
            assert_eq!(resp.header("connection"), Some("keep-alive"));
            assert_eq!(resp.body.len(), 1024);

            // One byte past the buffer: close-delimited, and said so.
            client.send(&keep_alive(1025)).await;
            let (bytes, end) = client.read_to_end().await;
            let resp = parse(&bytes).await;
            assert_eq!(resp.header("content-length"), None);
            assert_eq!(resp.header("connection"), Some("close"));
            assert_eq!(resp.body.len(), 1025);
            assert_eq!(end, End::Eof);
        },
    )
    .await;
}
