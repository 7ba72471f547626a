//! The HTTP/1.1 upstream leg on real sockets, against backends that write
//! exact bytes ([`RawBackend`]): interim responses skipped, before the
//! response and while an upload is still being sent; chunked bodies with
//! extensions and trailers cut into small writes; a backend answering an
//! upload before reading it; bytes after a response's end; a response head
//! over `max_response_header_bytes`; backends that close after answering
//! (HTTP/1.0, `Connection: close`) and the TIME_WAIT that must not land on
//! tether; how each kind of request body is framed toward the backend; a
//! backend's FIN on an idle pooled connection racing a POST; and a response
//! head relayed as the backend wrote it (case, order, reason phrase), less
//! its hop-by-hop fields.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tether::config::Size;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// No warm floor: every connection the backend accepts was dialled for a
/// request, so the count tells which requests shared one.
fn cold(backend: SocketAddr) -> tether::Config {
    let mut config = config_for(backend);
    config.upstreams[0].pool.min_idle = 0;
    config
}

/// `future`'s output; panics after [`PATIENCE`], so a hang fails the test.
async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .expect("nothing within the patience")
}

/// The next final response on `client`: tether's own `100 Continue` to a
/// client that sent `Expect` is skipped.
async fn final_response(client: &mut Client) -> Response {
    loop {
        let response = within(client.response()).await;
        if !(100..200).contains(&response.status) {
            return response;
        }
    }
}

/// `len` bytes that are not all alike, so a byte lost, doubled or moved shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 23) as u8).collect()
}

/// A chunked response: each `(extension, data)` a chunk, then the last
/// chunk (with an extension of its own) and `trailers`.
fn chunked_response(chunks: &[(&str, &[u8])], trailers: &str) -> Vec<u8> {
    let mut bytes =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum, X-Parts\r\n\r\n"
            .to_vec();
    for (extension, data) in chunks {
        bytes.extend_from_slice(format!("{:x}{extension}\r\n", data.len()).as_bytes());
        bytes.extend_from_slice(data);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(format!("0;last=yes\r\n{trailers}\r\n").as_bytes());
    bytes
}

/// `data` as a chunked body of `size`-byte chunks.
fn chunked_body(data: &[u8], size: usize) -> Vec<u8> {
    let mut body = Vec::new();
    for chunk in data.chunks(size) {
        body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        body.extend_from_slice(chunk);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_responses_are_skipped_and_the_connection_is_reused() {
    // Broken by passing a 1xx on as the response (the client reads it first),
    // by reading the 200 as part of an interim head, or by not reusing the
    // connection after such an exchange.
    let backend = RawBackend::start(|mut conn| async move {
        let mut first = true;
        while conn.read_request().await.is_some() {
            let hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n";
            if first {
                // Every head in writes of its own, the final one cut mid-line.
                conn.write(b"HTTP/1.1 100 Continue\r\n\r\n").await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                conn.write(hints).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                let ok = ok_with("hello");
                conn.write_in_pieces(&ok, &[7], Duration::from_millis(5))
                    .await;
                first = false;
            } else {
                // All three in one segment.
                let mut bytes = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
                bytes.extend_from_slice(hints);
                bytes.extend_from_slice(&ok_with("again"));
                conn.write(&bytes).await;
            }
        }
    })
    .await;
    with_tether(cold(backend.addr), |t| async move {
        let mut client = Client::connect(t.addr()).await;
        for expected in ["hello", "again"] {
            client.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
            let resp = within(client.response()).await;
            assert_eq!((resp.status, resp.text()), (200, expected.to_owned()));
        }
        assert_eq!(backend.accepted(), 1, "the connection was not reused");
        assert_eq!(backend.requests_on(1).len(), 2);
    })
    .await;
}

/// The upload of [`interim_responses_during_an_upload_do_not_stop_its_body`].
const UPLOAD: usize = 300 * 1024;
/// How much of it the client sends before it pauses: more than
/// `request_buffer`, so tether is already writing it when the interim
/// answer comes, and waits on the client for the rest.
const BEFORE_PAUSE: usize = 100 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_responses_during_an_upload_do_not_stop_its_body() {
    // A backend answers `100 Continue` to a request with `Expect` (clients send
    // one with large uploads) and may send `103 Early Hints` as soon as it has
    // the head, while the body is still coming. Broken by taking such an
    // interim answer for an early final one: the rest of the body is never
    // written, the backend waits for it, and the client gets a 504 at
    // `request_timeout` instead of the 200.
    let backend = RawBackend::start(|mut conn| async move {
        while let Some(head) = conn.read_head().await {
            if head.header("expect").is_some() {
                conn.write(b"HTTP/1.1 100 Continue\r\n\r\n").await;
            } else {
                conn.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
                    .await;
            }
            let Some(request) = conn.read_body(head).await else {
                return;
            };
            let got = request.body.map_or(0, |b| b.len());
            conn.write(&ok_with(&got.to_string())).await;
        }
    })
    .await;
    let mut config = cold(backend.addr);
    config.listeners[0].request_timeout = Duration::from_secs(3);
    with_tether(config, |t| async move {
        let body = pattern(UPLOAD);
        let mut outcomes = Vec::new();
        for expect in ["Expect: 100-continue\r\n", ""] {
            let before = backend.requests().len();
            let head = format!(
                "POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {UPLOAD}\r\n{expect}\r\n"
            );
            let mut client = Client::connect(t.addr()).await;
            client.send(head.as_bytes()).await;
            client.send(&body[..BEFORE_PAUSE]).await;
            eventually(|| backend.requests().len() > before).await;
            // The interim answer reaches tether while it waits for the rest.
            tokio::time::sleep(Duration::from_millis(200)).await;
            client.send(&body[BEFORE_PAUSE..]).await;
            let resp = final_response(&mut client).await;
            let reason = resp.header("x-tether-error").map(str::to_owned);
            outcomes.push((expect.trim_end(), resp.status, resp.text(), reason));
        }
        let whole = backend
            .requests()
            .iter()
            .filter(|r| r.body.as_ref() == Some(&body))
            .count();
        assert!(
            outcomes
                .iter()
                .all(|(_, status, text, _)| *status == 200 && *text == UPLOAD.to_string()),
            "{outcomes:?}; the backend got {whole} of the 2 bodies whole"
        );
        assert_eq!(whole, 2, "a body arrived altered");
        assert_eq!(backend.accepted(), 1, "the connection was not reused");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_responses_cut_into_small_writes_arrive_whole_and_keep_the_connection() {
    // Broken by a decoder that loses its place when a size line, an
    // extension, a chunk's CRLF or the trailers are split across reads (the
    // data arrives altered, or the exchange fails), or that leaves the
    // trailers unread (the connection is then not reused).
    let small = chunked_response(
        &[
            (";name=first", b"hello"),
            (";a=b;quoted=\"x y\"", b","),
            ("", b" world"),
            (";ext", b" and goodbye"),
        ],
        "X-Checksum: abc123\r\nX-Parts: 4\r\n",
    );
    let big_data = pattern(110_001);
    let big = chunked_response(
        &[
            (";part=1", &big_data[..40_000]),
            ("", &big_data[40_000..40_001]),
            (";part=3", &big_data[40_001..]),
        ],
        "X-Checksum: def456\r\n",
    );
    let backend = RawBackend::start(move |mut conn| {
        let (small, big) = (small.clone(), big.clone());
        async move {
            let mut served = 0;
            while conn.read_request().await.is_some() {
                served += 1;
                match served {
                    1 => {
                        let pause = Duration::from_millis(1);
                        conn.write_in_pieces(&small, &[1, 2, 3], pause).await;
                    }
                    2 => {
                        let pause = Duration::from_millis(1);
                        conn.write_in_pieces(&big, &[997, 4093, 13], pause).await;
                    }
                    _ => {
                        conn.write(&ok_with("plain")).await;
                    }
                }
            }
        }
    })
    .await;
    with_tether(cold(backend.addr), |t| async move {
        let mut client = Client::connect(t.addr()).await;
        let get = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";
        let resp = within(client.request(get)).await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), "hello, world and goodbye");
        let resp = within(client.request(get)).await;
        assert_eq!(resp.status, 200);
        assert!(
            resp.body == big_data,
            "the large chunked body arrived altered"
        );
        let resp = within(client.request(get)).await;
        assert_eq!((resp.status, resp.text()), (200, "plain".to_owned()));
        assert_eq!(backend.accepted(), 1, "the connection was not reused");
        assert_eq!(backend.requests_on(1).len(), 3);
    })
    .await;
}

/// The upload a backend refuses early: far more than the socket buffers
/// between tether and a backend that reads nothing can hold (tether's send
/// buffer alone grows to `tcp_wmem`'s largest, 4 MiB by default).
const REFUSED: usize = 16 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_to_an_upload_reaches_the_client_and_ends_the_connection() {
    // The backend reads the head only, answers 413 at once and never reads
    // again. Broken by not watching for an answer while the body is written:
    // tether blocks writing into buffers nobody drains and the client gets a
    // 504 at `request_timeout`. Broken too by reusing the connection whose
    // body was cut short (the next request would be read as body bytes).
    let backend = RawBackend::start(|mut conn| async move {
        if conn.number > 1 {
            return conn.serve(|_| ok_with("fresh")).await;
        }
        if conn.read_head().await.is_none() {
            return;
        }
        conn.write(
            b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\nContent-Length: 9\r\n\r\ntoo large",
        )
        .await;
        conn.hold(PATIENCE * 2).await;
    })
    .await;
    let mut config = cold(backend.addr);
    config.listeners[0].request_timeout = Duration::from_secs(5);
    with_tether(config, |t| async move {
        let stream = TcpStream::connect(t.addr()).await.unwrap();
        let (read, mut write) = stream.into_split();
        let uploader = tokio::spawn(async move {
            let head =
                format!("POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {REFUSED}\r\n\r\n");
            if write.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let piece = pattern(64 * 1024);
            for _ in 0..REFUSED / piece.len() {
                if write.write_all(&piece).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // Whole: held open, so that the response is all there is to see.
            std::future::pending::<()>().await;
        });
        let mut reader = BufReader::new(read);
        let resp = within(tether::tools::load::read_response(&mut reader, false))
            .await
            .expect("a response");
        uploader.abort();
        drop(reader);
        assert_eq!(
            (resp.status, resp.text()),
            (413, "too large".to_owned()),
            "{:?}",
            resp.header("x-tether-error")
        );
        let resp = get_once(t.addr(), "/").await;
        assert_eq!((resp.status, resp.text()), (200, "fresh".to_owned()));
        assert_eq!(backend.accepted(), 2, "the cut-short connection was reused");
        assert_eq!(backend.requests_on(1).len(), 1);
    })
    .await;
}

/// What a broken backend sends after its response: a whole response of its
/// own, which a reused connection would hand to the next request.
const STOLEN: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSTOLEN";

/// A backend whose first connection answers its one request with "hello"
/// followed by [`STOLEN`], in the same write or `later`, once the
/// connection is idle (`sent` is raised then); later connections answer
/// "fresh".
async fn junk_backend(later: bool, sent: Arc<AtomicBool>) -> RawBackend {
    RawBackend::start(move |mut conn| {
        let sent = sent.clone();
        async move {
            if conn.number > 1 {
                return conn.serve(|_| ok_with("fresh")).await;
            }
            if conn.read_request().await.is_none() {
                return;
            }
            let mut bytes = ok_with("hello");
            if later {
                conn.write(&bytes).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                conn.write(STOLEN).await;
            } else {
                bytes.extend_from_slice(STOLEN);
                conn.write(&bytes).await;
            }
            sent.store(true, Ordering::SeqCst);
            // Nothing more is answered here; what still comes is recorded.
            while conn.read_request().await.is_some() {}
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_a_response_end_its_connection_and_reach_no_client() {
    // Broken by keeping a connection with bytes left over after the body:
    // the next request would go on it and its client would get "STOLEN".
    for later in [false, true] {
        let sent = Arc::new(AtomicBool::new(false));
        let backend = junk_backend(later, sent.clone()).await;
        with_tether(cold(backend.addr), |t| async move {
            let mut client = Client::connect(t.addr()).await;
            let resp = within(client.request(b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\n")).await;
            assert_eq!((resp.status, resp.text()), (200, "hello".to_owned()));
            eventually(|| sent.load(Ordering::SeqCst)).await;
            // Let the junk reach tether before the next request.
            tokio::time::sleep(Duration::from_millis(100)).await;
            client
                .send(b"GET /2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .await;
            let (raw, _) = client.read_to_end().await;
            let text = String::from_utf8_lossy(&raw);
            assert!(!text.contains("STOLEN"), "later={later}: {text}");
            let resp = parse(&raw).await;
            assert_eq!(
                (resp.status, resp.text()),
                (200, "fresh".to_owned()),
                "later={later}"
            );
            assert_eq!(backend.accepted(), 2, "later={later}: reused");
            assert_eq!(backend.requests_on(1).len(), 1, "later={later}");
        })
        .await;
    }
}

/// A response whose head holds a field of `padding` bytes.
fn head_of(padding: usize) -> Vec<u8> {
    let mut bytes = b"HTTP/1.1 200 OK\r\nX-Padding: ".to_vec();
    bytes.resize(bytes.len() + padding, b'p');
    bytes.extend_from_slice(b"\r\nContent-Length: 5\r\n\r\nhello");
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_head_over_the_limit_is_a_502_and_its_connection_is_reset() {
    // The backend sends a 10 KiB head slowly, against an 8 KiB limit.
    // Broken by a limit not enforced (a 200, or a head buffered for ever),
    // by one enforced below the configured size (the 7 KiB head fails), by a
    // retry (the backend sees /big twice), or by ending the connection with
    // a FIN (tether then holds TIME_WAIT once the backend closes too).
    let backend = RawBackend::start(|mut conn| async move {
        while let Some(request) = conn.read_request().await {
            if request.target() == "/big" {
                let pause = Duration::from_millis(5);
                conn.write_in_pieces(&head_of(10 * 1024), &[1024], pause)
                    .await;
                conn.end().await;
                return;
            }
            conn.write(&head_of(7 * 1024)).await;
        }
    })
    .await;
    let mut config = cold(backend.addr);
    config.upstreams[0].max_response_header_bytes = Size::kib(8);
    config.validate().unwrap();
    with_tether(config, |t| async move {
        let tw = TimeWaitBaseline::now();
        let resp = within(get_once(t.addr(), "/big")).await;
        assert_tether_error(&resp, 502, "upstream-failed");
        eventually(|| backend.end_of(1).is_some()).await;
        assert_eq!(backend.end_of(1), Some(End::Reset));
        let resp = within(get_once(t.addr(), "/small")).await;
        assert_eq!((resp.status, resp.text()), (200, "hello".to_owned()));
        let targets: Vec<_> = backend
            .requests()
            .iter()
            .map(|r| r.target().to_owned())
            .collect();
        assert_eq!(targets, ["/big", "/small"]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            tw.toward_port(backend.addr.port()),
            0,
            "TIME_WAIT on tether"
        );
    })
    .await;
}

/// Responses after which the backend closes: how it answers, and how long
/// it waits before its FIN.
const CLOSING: [(&str, &[u8], Duration); 5] = [
    (
        "HTTP/1.0 with a length",
        b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        Duration::from_millis(200),
    ),
    (
        "HTTP/1.0 to the close",
        b"HTTP/1.0 200 OK\r\n\r\nhello",
        Duration::ZERO,
    ),
    (
        "Connection: close with a length",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
        Duration::from_millis(200),
    ),
    (
        "Connection: close, chunked",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        Duration::from_millis(200),
    ),
    (
        "Connection: close to the close",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello",
        Duration::ZERO,
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_closes_after_answering_keeps_time_wait_on_its_own_side() {
    // Broken by reusing such a connection (the second request would go on a
    // closing one: a second accept missing, or a 502), by tether closing
    // first (its FIN before the backend's puts TIME_WAIT on tether), or by
    // a reset instead of the passive close (the backend sees RST).
    for (name, answer, pause) in CLOSING {
        let backend = RawBackend::start(move |mut conn| async move {
            if conn.read_request().await.is_none() {
                return;
            }
            conn.write(answer).await;
            tokio::time::sleep(pause).await;
            conn.shutdown().await;
            conn.end().await;
        })
        .await;
        let port = backend.addr.port();
        with_tether(cold(backend.addr), |t| async move {
            let tw = TimeWaitBaseline::now();
            for _ in 0..2 {
                let resp = within(get_once(t.addr(), "/")).await;
                assert_eq!(
                    (resp.status, resp.text()),
                    (200, "hello".to_owned()),
                    "{name}"
                );
            }
            assert_eq!(backend.accepted(), 2, "{name}: reused");
            eventually(|| backend.end_of(1).is_some() && backend.end_of(2).is_some()).await;
            for number in [1, 2] {
                assert_eq!(backend.end_of(number), Some(End::Eof), "{name}: {number}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(tw.toward_port(port), 0, "{name}: TIME_WAIT on tether");
            assert_eq!(
                tw.on_local_port(port),
                2,
                "{name}: the backend closed first"
            );
        })
        .await;
    }
}

/// A backend that answers HEAD with `Content-Length: 1000` and no body,
/// anything else with "ok".
async fn framing_backend() -> RawBackend {
    RawBackend::start(|conn| {
        conn.serve(|request| {
            if request.method() == "HEAD" {
                b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".to_vec()
            } else {
                ok_with("ok")
            }
        })
    })
    .await
}

/// The framing fields of a request the backend received.
fn framing(request: &RawRequest) -> (Option<&str>, Option<&str>) {
    (
        request.header("content-length"),
        request.header("transfer-encoding"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_requests_carry_no_framing_and_a_head_answer_ends_at_its_head() {
    // Broken by framing fields on a request without a body, or by waiting
    // for the 1000 bytes a HEAD answer announces (the exchange hangs, or the
    // connection is not reused for the next request).
    let backend = framing_backend().await;
    with_tether(cold(backend.addr), |t| async move {
        let mut client = Client::connect(t.addr()).await;
        let resp = within(client.request(b"GET /get HTTP/1.1\r\nHost: t\r\n\r\n")).await;
        assert_eq!((resp.status, resp.text()), (200, "ok".to_owned()));
        client.send(b"HEAD /head HTTP/1.1\r\nHost: t\r\n\r\n").await;
        let resp = within(client.head_response()).await;
        assert_eq!(
            (resp.status, resp.header("content-length")),
            (200, Some("1000"))
        );
        let resp = within(client.request(b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n")).await;
        assert_eq!((resp.status, resp.text()), (200, "ok".to_owned()));

        let seen = backend.requests();
        let targets: Vec<_> = seen.iter().map(RawRequest::target).collect();
        assert_eq!(targets, ["/get", "/head", "/after"]);
        assert_eq!(framing(&seen[0]), (None, None), "GET");
        assert_eq!(seen[0].body.as_deref(), Some(&b""[..]));
        assert_eq!(framing(&seen[1]), (None, None), "HEAD");
        assert_eq!(backend.accepted(), 1, "the connection was not reused");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_framed_by_length_when_whole_and_chunked_when_streamed() {
    // Broken by the client's own chunked framing passed on next to tether's
    // Content-Length, by a body read whole into `request_buffer` still sent
    // chunked, by a streamed body sent with a length it cannot know, or by a
    // body that arrives altered.
    let backend = framing_backend().await;
    with_tether(cold(backend.addr), |t| async move {
        let large = pattern(300 * 1024);
        let mut streamed = b"POST /streamed HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        streamed.extend_from_slice(&chunked_body(&large, 10_000));
        let mut length = format!(
            "POST /length HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
            large.len()
        )
        .into_bytes();
        length.extend_from_slice(&large);
        let small = b"POST /small HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n".to_vec();
        let mut client = Client::connect(t.addr()).await;
        for request in [streamed, length, small] {
            let resp = within(client.request(&request)).await;
            assert_eq!((resp.status, resp.text()), (200, "ok".to_owned()));
        }

        let seen = backend.requests();
        let targets: Vec<_> = seen.iter().map(RawRequest::target).collect();
        assert_eq!(targets, ["/streamed", "/length", "/small"]);
        assert_eq!(framing(&seen[0]), (None, Some("chunked")), "streamed");
        assert!(seen[0].body.as_ref() == Some(&large), "streamed body altered");
        assert_eq!(framing(&seen[1]), (Some("307200"), None), "with a length");
        assert!(seen[1].body.as_ref() == Some(&large), "body with a length altered");
        assert_eq!(backend.accepted(), 1, "the connection was not reused");
        // Last: a chunked body that fits `request_buffer` is read whole
        // before it is sent, so its length is known.
        assert_eq!(framing(&seen[2]), (Some("11"), None), "small chunked");
        assert_eq!(seen[2].body.as_deref(), Some(&b"hello world"[..]));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_just_after_the_backend_closed_the_idle_connection_is_sent_once_on_a_fresh_one() {
    // The backend sends FIN on the idle pooled connection and keeps reading
    // it; a POST comes 5 ms later. Broken by not seeing that FIN at once: the
    // POST is written on the closing connection (the backend records it
    // there) and the client gets a 502, or it is retried and sent twice.
    let (close, _) = tokio::sync::watch::channel(0usize);
    let close = Arc::new(close);
    let (closed, mut closes) = tokio::sync::mpsc::unbounded_channel::<()>();
    let told = close.clone();
    let backend = RawBackend::start(move |mut conn| {
        let mut told = told.subscribe();
        let closed = closed.clone();
        async move {
            loop {
                let request = tokio::select! {
                    request = conn.read_request() => request,
                    _ = told.changed() => break,
                };
                let Some(request) = request else {
                    return;
                };
                let body = String::from_utf8_lossy(&request.body.unwrap_or_default()).into_owned();
                conn.write(&ok_with(&body)).await;
            }
            conn.shutdown().await;
            let _ = closed.send(());
            // What still comes here is recorded, and never answered.
            while conn.read_request().await.is_some() {}
        }
    })
    .await;
    with_tether(cold(backend.addr), |t| async move {
        assert_eq!(within(get_once(t.addr(), "/")).await.status, 200);
        for round in 0..5 {
            close.send_modify(|n| *n += 1);
            within(closes.recv()).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            let body = format!("round-{round}");
            let post = format!(
                "POST /r HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let (raw, _) = within(exchange_raw(t.addr(), post.as_bytes())).await;
            let resp = parse(&raw).await;
            assert_eq!((resp.status, resp.text()), (200, body.clone()), "round {round}");
            let posts: Vec<_> = backend
                .requests()
                .into_iter()
                .filter(|r| r.method() == "POST" && r.body.as_deref() == Some(body.as_bytes()))
                .map(|r| r.connection)
                .collect();
            assert_eq!(posts, [round + 2], "round {round}: connections the POST went on");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_head_is_relayed_as_the_backend_wrote_it_less_its_hop_by_hop_fields() {
    // Broken by rebuilding the head from a header map: names come out
    // lowercased, repeated fields move next to each other, and a reason
    // phrase of the backend's own is replaced by the canonical one (or none).
    let backend = RawBackend::start(|mut conn| async move {
        while conn.read_request().await.is_some() {
            conn.write(
                b"HTTP/1.1 299 Fine Thanks\r\nContent-Type: text/plain\r\nSet-Cookie: a=1\r\n\
                  Connection: X-Private, keep-alive\r\nX-Private: secret\r\n\
                  Keep-Alive: timeout=30\r\nset-cookie: b=2\r\nX-MiXeD-Case: Yes\r\n\
                  Content-Length: 5\r\n\r\nhello",
            )
            .await;
        }
    })
    .await;
    with_tether(cold(backend.addr), |t| async move {
        let (bytes, _) = within(exchange_raw(
            t.addr(),
            b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        ))
        .await;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let kept = "HTTP/1.1 299 Fine Thanks\r\nContent-Type: text/plain\r\nSet-Cookie: a=1\r\n\
                    set-cookie: b=2\r\nX-MiXeD-Case: Yes\r\nContent-Length: 5\r\n";
        assert!(text.starts_with(kept), "{text}");
        for gone in ["X-Private", "secret", "Keep-Alive", "keep-alive"] {
            assert!(!text.contains(gone), "{gone} crossed: {text}");
        }
        let head_end = text.find("\r\n\r\n").unwrap();
        let added = &text[kept.len()..head_end];
        assert!(added.contains("connection: close"), "{text}");
        assert!(added.contains("date: "), "{text}");
        assert!(text.ends_with("\r\n\r\nhello"), "{text}");
    })
    .await;
}

#[tokio::test]
async fn a_request_head_reaches_the_backend_as_the_client_wrote_it_less_its_hop_by_hop_fields() {
    // Broken by rebuilding the head from a header map: names come out
    // lowercased and repeated fields move next to each other.
    let backend = RawBackend::start(|mut conn| async move {
        while conn.read_request().await.is_some() {
            conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    })
    .await;
    with_tether(cold(backend.addr), |t| async move {
        let (bytes, _) = within(exchange_raw(
            t.addr(),
            b"POST /p?q=1 HTTP/1.1\r\nHost: t\r\nX-MiXeD-Case: 1\r\nAccept: a\r\n\
              x-b: 2\r\naccept: b\r\nConnection: close, X-Private\r\nX-Private: s\r\n\
              Keep-Alive: timeout=5\r\nContent-Length: 5\r\n\r\nhello",
        ))
        .await;
        assert!(bytes.starts_with(b"HTTP/1.1 200 "), "{bytes:?}");
        let requests = backend.requests();
        let [request] = &requests[..] else {
            panic!("{} requests", requests.len());
        };
        let kept = "POST /p?q=1 HTTP/1.1\r\nHost: t\r\nX-MiXeD-Case: 1\r\nAccept: a\r\n\
                    x-b: 2\r\naccept: b\r\nContent-Length: 5\r\n";
        assert!(request.head.starts_with(kept), "{}", request.head);
        for gone in ["X-Private", "Keep-Alive", "close"] {
            assert!(
                !request.head.contains(gone),
                "{gone} crossed: {}",
                request.head
            );
        }
        assert_eq!(request.header("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(request.body.as_deref(), Some(&b"hello"[..]));
    })
    .await;
}
