//! What crosses tether and what does not: hop-by-hop headers stop at tether,
//! names with `_` are dropped, passed or refused as the listener says, Host is
//! preserved, X-Forwarded-For is appended, and bodies stream both ways.

mod common;

use common::*;
use tether::config::UnderscoresInHeaders;

/// The request headers the backend's `/headers` saw, as it listed them.
fn headers_seen(resp: &Response) -> Vec<(String, String)> {
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
    let backend = Backend::start().await;
    with_tether(config_for(backend.addr), |t| async move {
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
        let (bytes, _) = exchange_raw(t.addr(), request.as_bytes()).await;
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_hop_by_hop_headers_are_stripped_too() {
    let backend = Backend::builder()
        .body("ok")
        .header("connection", "X-Secret")
        .header("x-secret", "s")
        .keep_alive("timeout=3")
        .header("x-kept", "yes")
        .start()
        .await;
    let mut config = config_for(backend.addr);
    config.upstreams[0].pool.min_idle = 0;
    with_tether(config, |t| async move {
        let resp = get_once(t.addr(), "/").await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, b"ok");
        assert_eq!(resp.header("x-kept"), Some("yes"));
        assert_eq!(resp.header("x-secret"), None);
        assert_eq!(resp.header("keep-alive"), None);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_can_be_turned_off_and_http10_gets_a_host() {
    with_tether_and_backend(
        |config| config.listeners[0].forwarded_for = false,
        |backend, t| async move {
            let (bytes, _) = exchange_raw(t.addr(), b"GET /headers HTTP/1.0\r\n\r\n").await;
            let h = headers_seen(&parse(&bytes).await);
            assert_eq!(seen(&h, "x-forwarded-for"), None);
            assert_eq!(seen(&h, "host"), Some(backend.addr.to_string().as_str()));
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_client_is_served_many_requests_on_one_connection() {
    let backend = Backend::start().await;
    with_tether(config_for(backend.addr), |t| async move {
        let mut client = Client::connect(t.addr()).await;
        for i in 0..100 {
            let body = format!("message {i}");
            let request = format!(
                "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            assert_eq!(client.request(request.as_bytes()).await.text(), body);
        }
        // HEAD has no body even though the upstream declares a length.
        client.send(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n").await;
        let resp = client.head_response().await;
        assert_eq!(resp.header("content-length"), Some("5"));
        let resp = client.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!(resp.body, b"hello");
    })
    .await;
}

/// A GET carrying `X_Custom`, written byte for byte.
const UNDERSCORED: &[u8] =
    b"GET / HTTP/1.1\r\nHost: t\r\nX_Custom: 1\r\nX-Plain: 2\r\nConnection: close\r\n\r\n";

/// The value of the `{listener="app",reason}` sample of `family`, 0 when absent.
fn sample(metrics: &str, family: &str, reason: &str) -> u64 {
    let prefix = format!("{family}{{listener=\"app\",reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscored_header_is_dropped_by_default_and_counted() {
    let backend = Backend::start().await;
    let config = config_for(backend.addr);
    assert_eq!(
        config.listeners[0].underscores_in_headers,
        UnderscoresInHeaders::Drop
    );
    with_tether(config, |t| async move {
        let (bytes, _) = exchange_raw(t.addr(), UNDERSCORED).await;
        assert_eq!(parse(&bytes).await.status, 200);
        let names = backend.header_names();
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].contains(&"x-plain".to_owned()), "{names:?}");
        assert!(!names[0].contains(&"x_custom".to_owned()), "{names:?}");
        let metrics = get_once(t.admin(), "/metrics").await.text();
        let family = "tether_request_headers_dropped_total";
        assert_eq!(sample(&metrics, family, "underscore"), 1, "{metrics}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscored_header_is_forwarded_under_pass() {
    with_tether_and_backend(
        |c| c.listeners[0].underscores_in_headers = UnderscoresInHeaders::Pass,
        |backend, t| async move {
            let (bytes, _) = exchange_raw(t.addr(), UNDERSCORED).await;
            assert_eq!(parse(&bytes).await.status, 200);
            let names = backend.header_names();
            assert_eq!(names.len(), 1, "{names:?}");
            assert!(names[0].contains(&"x_custom".to_owned()), "{names:?}");
            let metrics = get_once(t.admin(), "/metrics").await.text();
            let family = "tether_request_headers_dropped_total";
            assert_eq!(sample(&metrics, family, "underscore"), 0, "{metrics}");
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscored_header_is_refused_under_reject() {
    with_tether_and_backend(
        |c| c.listeners[0].underscores_in_headers = UnderscoresInHeaders::Reject,
        |backend, t| async move {
            let (bytes, end) = exchange_raw(t.addr(), UNDERSCORED).await;
            let resp = parse(&bytes).await;
            assert_tether_error(&resp, 400, "underscore-in-header");
            assert_eq!(resp.header("connection"), Some("close"));
            assert_eq!(end, End::Reset, "a refused client gets no FIN");
            assert_eq!(backend.requests(), 0);
            let metrics = get_once(t.admin(), "/metrics").await.text();
            let family = "tether_local_responses_total";
            assert_eq!(sample(&metrics, family, "underscore-in-header"), 1);
            // A request without `_` in any name still goes through.
            assert_eq!(get_once(t.addr(), "/").await.status, 200);
        },
    )
    .await;
}
