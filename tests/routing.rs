//! One listener in front of several backends: requests are routed by their
//! host — an absolute-form target's authority (what an app with `http_proxy`
//! sends) or the Host header — and reach their backend in origin form with
//! that host; a host no route serves gets 403 `no-route` and reaches no
//! backend; CONNECT gets 405 with the reason; a reload that adds a route
//! moves the next request of an open keep-alive connection, on the same port.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;
use tether::app::Outcome;
use tether::config::{Config, RouteConfig, UpstreamConfig};

/// tether's `app` listener with no default upstream and `routes`
/// (host pattern, upstream), in front of `backends` (upstream name, address).
fn routed(backends: &[(&str, &Backend)], routes: &[(&str, &str)]) -> Config {
    let mut config = config_for(backends[0].1.addr);
    config.admin.enabled = true;
    config.upstreams = backends
        .iter()
        .map(|(name, b)| UpstreamConfig::new(name, vec![b.addr.to_string()]))
        .collect();
    let listener = &mut config.listeners[0];
    listener.upstream = String::new();
    listener.routes = routes
        .iter()
        .map(|(host, upstream)| RouteConfig::new(host.parse().unwrap(), upstream))
        .collect();
    config.validate().unwrap();
    config
}

/// What the backend's `/headers` saw: `(name, value)` per line, `uri` and
/// `method` first.
fn seen(resp: &Response, name: &str) -> Option<String> {
    resp.text().lines().find_map(|l| {
        let (n, v) = l.split_once(": ")?;
        n.eq_ignore_ascii_case(name).then(|| v.to_owned())
    })
}

/// Asserts `resp` came from a backend's `/headers` with origin-form `uri`
/// and Host `host`.
#[track_caller]
fn reached(resp: &Response, uri: &str, host: &str) {
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(seen(resp, "uri").as_deref(), Some(uri), "{}", resp.text());
    assert_eq!(seen(resp, "host").as_deref(), Some(host), "{}", resp.text());
}

/// Requests each backend has served.
fn served(backends: &[&Backend]) -> Vec<usize> {
    backends.iter().map(|b| b.requests()).collect()
}

/// The access log's lines so far.
fn log_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_and_origin_form_requests_reach_the_backend_their_host_routes_to() {
    let (api, billing, svc) = (
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    );
    let mut config = routed(
        &[("api", &api), ("billing", &billing), ("svc", &svc)],
        &[
            ("api.internal", "api"),
            ("billing.internal:8080", "billing"),
            ("*.svc.internal", "svc"),
        ],
    );
    let dir = TempDir::new("tether-routing");
    let access = dir.path().join("access.log");
    config.log.access.enabled = true;
    config.log.access.path = Some(access.clone());
    let all = [&api, &billing, &svc];
    with_tether(config, |t| async move {
        // One keep-alive connection, as an app's HTTP client with http_proxy
        // keeps to its proxy, carrying requests for every backend.
        let mut app = Client::connect(t.addr()).await;
        let cases: [(&[u8], &str, &str, [usize; 3]); 5] = [
            (
                b"GET http://api.internal/headers?x=1 HTTP/1.1\r\nHost: api.internal\r\nProxy-Connection: keep-alive\r\n\r\n",
                "/headers?x=1",
                "api.internal",
                [1, 0, 0],
            ),
            // The target's authority wins over a Host that disagrees.
            (
                b"GET http://billing.internal:8080/headers HTTP/1.1\r\nHost: api.internal\r\n\r\n",
                "/headers",
                "billing.internal:8080",
                [1, 1, 0],
            ),
            (
                b"GET /headers HTTP/1.1\r\nHost: API.Internal:80\r\n\r\n",
                "/headers",
                "API.Internal:80",
                [2, 1, 0],
            ),
            (
                b"GET http://a.b.svc.internal/headers?q HTTP/1.1\r\nHost: a.b.svc.internal\r\n\r\n",
                "/headers?q",
                "a.b.svc.internal",
                [2, 1, 1],
            ),
            // Absolute form without Host: the target names the host.
            (
                b"GET http://x.svc.internal:81/headers HTTP/1.1\r\n\r\n",
                "/headers",
                "x.svc.internal:81",
                [2, 1, 2],
            ),
        ];
        for (request, uri, host, counts) in cases {
            let resp = app.request(request).await;
            reached(&resp, uri, host);
            assert_eq!(served(&all), counts, "{}", String::from_utf8_lossy(request));
        }

        // Hosts no route serves: the wildcard's own domain, another port of
        // an exact pattern with one, a name nothing mentions.
        for request in [
            &b"GET /headers HTTP/1.1\r\nHost: svc.internal\r\n\r\n"[..],
            b"GET http://billing.internal/headers HTTP/1.1\r\nHost: billing.internal\r\n\r\n",
            b"GET http://www.example.com/ HTTP/1.1\r\nHost: www.example.com\r\n\r\n",
        ] {
            let resp = app.request(request).await;
            assert_tether_error(&resp, 403, "no-route");
            assert!(resp.text().contains("no route"), "{}", resp.text());
            // A well-formed request refused by configuration: the connection
            // stays open for the app's next request.
            assert_eq!(resp.header("connection"), None);
        }
        assert_eq!(served(&all), [2, 1, 2], "an unrouted request reached a backend");
        let resp = app
            .request(b"GET http://api.internal/headers HTTP/1.1\r\nHost: api.internal\r\n\r\n")
            .await;
        reached(&resp, "/headers", "api.internal");

        let metrics = get_once(t.admin(), "/metrics").await.text();
        assert!(
            metrics.contains(r#"tether_local_responses_total{listener="app",reason="no-route"} 3"#),
            "{metrics}"
        );

        // The access log names the upstream each request used, and none
        // for the refused ones.
        let mut lines = Vec::new();
        eventually(|| {
            lines = log_lines(&access);
            lines.len() >= 9
        })
        .await;
        let upstreams: Vec<&Value> = lines.iter().map(|l| &l["upstream"]).collect();
        let expected = ["api", "billing", "api", "svc", "svc"];
        for (i, name) in expected.iter().enumerate() {
            assert_eq!(upstreams[i], name, "line {i}: {}", lines[i]);
        }
        for line in &lines[5..8] {
            assert_eq!(line["error"], "no-route", "{line}");
            assert_eq!(line["status"], 403, "{line}");
            assert!(line["upstream"].is_null(), "{line}");
        }
        assert_eq!(lines[8]["upstream"], "api");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_https_targets_are_refused_with_the_reason() {
    let api = Backend::start().await;
    let config = routed(&[("api", &api)], &[("api.internal", "api")]);
    with_tether(config, |t| async move {
        let (bytes, _) = exchange_raw(
            t.addr(),
            b"CONNECT api.internal:443 HTTP/1.1\r\nHost: api.internal:443\r\n\r\n",
        )
        .await;
        let resp = parse(&bytes).await;
        assert_tether_error(&resp, 405, "connect-not-supported");
        let text = resp.text();
        assert!(text.contains("cannot be pooled"), "{text}");
        assert!(text.contains("http://"), "{text}");

        let (bytes, _) = exchange_raw(
            t.addr(),
            b"GET https://api.internal/headers HTTP/1.1\r\nHost: api.internal\r\n\r\n",
        )
        .await;
        let resp = parse(&bytes).await;
        assert_tether_error(&resp, 400, "https-target");
        assert!(resp.text().contains("http://"), "{}", resp.text());
        assert_eq!(api.requests(), 0, "a refused request reached the backend");
    })
    .await;
}

/// Runs `program` with `args`, its proxy environment set to `proxy` only.
async fn through_proxy(program: &str, args: &[&str], proxy: &str, hint: &str) -> String {
    let mut command = tokio::process::Command::new(program);
    command.args(args);
    for name in [
        "NO_PROXY",
        "no_proxy",
        "ALL_PROXY",
        "all_proxy",
        "HTTPS_PROXY",
        "https_proxy",
    ] {
        command.env_remove(name);
    }
    command.env("http_proxy", proxy).env("HTTP_PROXY", proxy);
    let out = tokio::time::timeout(PATIENCE, command.output())
        .await
        .unwrap_or_else(|_| panic!("{program} did not finish"))
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}); {hint}"));
    assert!(
        out.status.success(),
        "{program}: {}\n{}",
        out.status,
        printed(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What an app's HTTP client does with `http_proxy` set: curl and Python's
/// `requests` send absolute-form requests, and each reaches its backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_python_requests_with_http_proxy_reach_their_backends() {
    let (api, billing) = (Backend::start().await, Backend::start().await);
    let config = routed(
        &[("api", &api), ("billing", &billing)],
        &[("api.internal", "api"), ("*.billing.internal", "billing")],
    );
    with_tether(config, |t| async move {
        let proxy = format!("http://{}", t.addr());
        let text = through_proxy(
            "curl",
            &["-sS", "-x", &proxy, "http://api.internal/headers?from=curl"],
            &proxy,
            "install curl (apt-get install curl)",
        )
        .await;
        assert!(text.contains("uri: /headers?from=curl\n"), "{text}");
        assert!(text.contains("host: api.internal\n"), "{text}");
        assert_eq!((api.requests(), billing.requests()), (1, 0));

        let script = "import requests\n\
            r = requests.get('http://eu.billing.internal/headers?from=python', timeout=10)\n\
            print(r.status_code)\n\
            print(r.text)\n";
        let text = through_proxy(
            "python3",
            &["-c", script],
            &proxy,
            "install Python's requests (pip install requests)",
        )
        .await;
        assert!(text.starts_with("200\n"), "{text}");
        assert!(text.contains("uri: /headers?from=python\n"), "{text}");
        assert!(text.contains("host: eu.billing.internal\n"), "{text}");
        assert_eq!((api.requests(), billing.requests()), (1, 1));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_adds_a_route_moves_an_open_connections_next_request() {
    let (api, fresh) = (Backend::start().await, Backend::start().await);
    let config = routed(&[("api", &api)], &[("api.internal", "api")]);
    let mut next = config.clone();
    next.upstreams
        .push(UpstreamConfig::new("fresh", vec![fresh.addr.to_string()]));
    next.listeners[0]
        .routes
        .push(RouteConfig::new("new.internal".parse().unwrap(), "fresh"));
    next.validate().unwrap();
    with_tether(config, |t| async move {
        let port = t.addr();
        let mut app = Client::connect(port).await;
        let to_new = b"GET http://new.internal/headers HTTP/1.1\r\nHost: new.internal\r\n\r\n";
        assert_tether_error(&app.request(to_new).await, 403, "no-route");
        let resp = app
            .request(b"GET /headers HTTP/1.1\r\nHost: api.internal\r\n\r\n")
            .await;
        reached(&resp, "/headers", "api.internal");

        let report = t.reload(next).await;
        assert_eq!(report.result, Outcome::Applied, "{:?}", report.error);
        assert_eq!(t.addr(), port, "the listener was re-bound");

        let resp = app.request(to_new).await;
        reached(&resp, "/headers", "new.internal");
        assert_eq!((api.requests(), fresh.requests()), (1, 1));
        let resp = app
            .request(b"GET /headers HTTP/1.1\r\nHost: api.internal\r\n\r\n")
            .await;
        reached(&resp, "/headers", "api.internal");
    })
    .await;
}
