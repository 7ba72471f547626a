//! What crosses tether and what does not: hop-by-hop headers stop at tether,
//! Host is preserved, X-Forwarded-For is appended, and bodies stream both ways.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn headers_seen(resp: &Resp) -> Vec<(String, String)> {
    resp.text()
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect()
}

fn seen<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_stripped_and_host_and_forwarded_for_are_set() {
    let (_backend, running, addr) = backend_and_tether(|_| {}).await;

    let request = "GET /headers?x=1 HTTP/1.1\r\n\
        Host: legacy.example:8080\r\n\
        Connection: close, X-Drop-Me\r\n\
        X-Drop-Me: secret\r\n\
        Keep-Alive: timeout=5\r\n\
        Proxy-Connection: keep-alive\r\n\
        TE: trailers\r\n\
        Upgrade: websocket\r\n\
        X-Forwarded-For: 10.1.2.3\r\n\
        X-End-To-End: kept\r\n\r\n";
    let (bytes, _) = exchange_raw(addr, request.as_bytes(), Duration::from_secs(5)).await;
    let resp = parse(&bytes).await;
    assert_eq!(resp.status, 200);
    let h = headers_seen(&resp);
    assert_eq!(seen(&h, "uri"), Some("/headers?x=1"));
    assert_eq!(seen(&h, "host"), Some("legacy.example:8080"));
    assert_eq!(seen(&h, "x-forwarded-for"), Some("10.1.2.3, 127.0.0.1"));
    assert_eq!(seen(&h, "x-end-to-end"), Some("kept"));
    for gone in [
        "connection",
        "x-drop-me",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
    ] {
        assert_eq!(seen(&h, gone), None, "{gone} reached the backend");
    }
    running.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_hop_by_hop_headers_are_stripped_too() {
    use tokio::io::AsyncBufReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if line.trim_end().is_empty() {
                        reader
                            .get_mut()
                            .write_all(
                                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Secret\r\n\
                                  X-Secret: s\r\nKeep-Alive: timeout=3\r\nX-Kept: yes\r\n\r\nok",
                            )
                            .await
                            .unwrap();
                    }
                }
            });
        }
    });
    let mut config = config_for(backend_addr);
    config.upstreams[0].pool.min_idle = 0;
    let running = tether::start(config).await.unwrap();
    let addr = running.tcp_addr("app").unwrap();
    let resp = get_once(addr, "/").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, b"ok");
    assert_eq!(resp.header("x-kept"), Some("yes"));
    assert_eq!(resp.header("x-secret"), None);
    assert_eq!(resp.header("keep-alive"), None);
    running.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_can_be_turned_off_and_http10_gets_a_host() {
    let (backend, running, addr) = backend_and_tether(|config| {
        config.listeners[0].forwarded_for = false;
    })
    .await;
    let (bytes, _) = exchange_raw(
        addr,
        b"GET /headers HTTP/1.0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let resp = parse(&bytes).await;
    let h = headers_seen(&resp);
    assert_eq!(seen(&h, "x-forwarded-for"), None);
    assert_eq!(seen(&h, "host"), Some(backend.addr.to_string().as_str()));
    running.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_client_is_served_many_requests_on_one_connection() {
    let (_backend, running, addr) = backend_and_tether(|_| {}).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut reader = BufReader::new(stream);
    for i in 0..100 {
        let body = format!("message {i}");
        let request = format!(
            "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        reader
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .unwrap();
        let resp = read_response(&mut reader, false).await.unwrap();
        assert_eq!(resp.text(), body);
    }
    // HEAD has no body even though the upstream declares a length.
    reader
        .get_mut()
        .write_all(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let resp = read_response(&mut reader, true).await.unwrap();
    assert_eq!(resp.header("content-length"), Some("5"));
    reader
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let resp = read_response(&mut reader, false).await.unwrap();
    assert_eq!(resp.body, b"hello");
    running.drain().await;
}
