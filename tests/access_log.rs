//! The access log and the connection log say what happened, as the sockets
//! saw it: a request on a warm connection was not dialled for, a queued
//! request waited as long as the connection was held, a retired connection
//! ended the way the backend saw it end; a sink nobody reads delays nothing;
//! the pool's histograms count what was done.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use common::*;
use tether::config::{Config, Retire, RetirePolicy};

/// The lines of a JSON-lines log written so far (none if it is not there yet).
fn lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Waits until the log at `path` has at least `n` lines with `field == value`;
/// returns those lines.
async fn lines_with(path: &Path, field: &str, value: &str, n: usize) -> Vec<Value> {
    let matching = || -> Vec<Value> {
        lines(path)
            .into_iter()
            .filter(|l| l[field] == value)
            .collect()
    };
    eventually(|| matching().len() >= n).await;
    matching()
}

/// Both logs on, as JSON lines in files under `dir`.
fn log_to(config: &mut Config, dir: &Path) -> (PathBuf, PathBuf) {
    let (access, connections) = (dir.join("access.log"), dir.join("connections.log"));
    config.log.access.enabled = true;
    config.log.access.path = Some(access.clone());
    config.log.connections.enabled = true;
    config.log.connections.path = Some(connections.clone());
    (access, connections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_on_a_warm_pool_is_logged_as_reused_with_no_connect_time() {
    let dir = TempDir::new("access-warm");
    let backend = Backend::start().await;
    let mut config = config_for(backend.addr);
    config.upstreams[0].pool.min_idle = 1;
    let (access, _) = log_to(&mut config, dir.path());
    with_tether(config, |t| async move {
        assert_eq!(backend.accepted(), 1, "the warm connection");
        let response = get_once(t.addr(), "/some/path?q=1").await;
        assert_eq!(response.status, 200);
        let line = lines_with(&access, "kind", "request", 1).await.remove(0);
        assert_eq!(line["listener"], "app");
        assert_eq!(line["method"], "GET");
        assert_eq!(line["target"], "/some/path?q=1");
        assert_eq!(line["version"], "HTTP/1.1");
        assert_eq!(line["status"], 200);
        assert_eq!(line["bytes_out"], 5, "the backend's \"hello\"");
        assert_eq!(line["reused"], true, "{line}");
        assert_eq!(line["connect_ms"], 0.0, "{line}");
        assert_eq!(line["conn_request"], 1, "{line}");
        assert_eq!(line["attempts"], 1, "{line}");
        assert_eq!(line["upstream"], "backend");
        assert_eq!(line["endpoint"], backend.addr.to_string());
        // The exchange said `Connection: close`: its line carries the end.
        assert_eq!(line["client_end"], "FIN", "{line}");
        assert_eq!(line["client_end_reason"], "fin", "{line}");
        // The id is the one `/pools` shows for the warm connection.
        let pools: Value =
            serde_json::from_str(&get_once(t.admin(), "/pools").await.text()).unwrap();
        let id = &pools[0]["endpoints"][0]["connections"][0]["id"];
        assert_eq!(&line["upstream_conn"], id, "{pools}");
        assert_eq!(backend.accepted(), 1, "no dial for the request");
    })
    .await;
}

/// A backend on one connection at a time that holds its first request's
/// answer until `release` is notified, and answers the others at once.
async fn gated_backend(release: Arc<Notify>, got_first: Arc<Notify>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
                while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    head.drain(..end + 4);
                    if std::mem::take(&mut first) {
                        got_first.notify_one();
                        release.notified().await;
                    }
                    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_request_logs_a_pool_wait_at_least_the_hold_time() {
    const HOLD: Duration = Duration::from_millis(300);
    let dir = TempDir::new("access-wait");
    let (release, got_first) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let backend = gated_backend(release.clone(), got_first.clone()).await;
    let mut config = config_for(backend);
    let pool = &mut config.upstreams[0].pool;
    pool.max_connections = 1;
    pool.max_idle = 1;
    pool.min_idle = 1;
    pool.acquire_timeout = PATIENCE;
    let (access, _) = log_to(&mut config, dir.path());
    with_tether(config, |t| async move {
        let addr = t.addr();
        let first = tokio::spawn(async move { get_once(addr, "/first").await });
        got_first.notified().await;
        let second = tokio::spawn(async move { get_once(addr, "/second").await });
        // The second request is counted against the endpoint once it asks
        // the pool: from then on it waits for the one connection.
        let endpoint = t.pool("backend").unwrap().endpoints()[0].clone();
        eventually(|| endpoint.outstanding() == 2).await;
        tokio::time::sleep(HOLD).await;
        release.notify_one();
        assert_eq!(first.await.unwrap().status, 200);
        assert_eq!(second.await.unwrap().status, 200);

        let logged = lines_with(&access, "kind", "request", 2).await;
        let second = logged
            .iter()
            .find(|l| l["target"] == "/second")
            .expect("the second request's line");
        let waited = second["pool_wait_ms"].as_f64().unwrap();
        assert!(
            waited >= HOLD.as_millis() as f64,
            "waited {waited} ms for a connection held {HOLD:?}: {second}"
        );
        assert_eq!(second["reused"], true, "{second}");
        assert_eq!(second["conn_request"], 2, "{second}");
        let first = logged.iter().find(|l| l["target"] == "/first").unwrap();
        assert_eq!(first["upstream_conn"], second["upstream_conn"]);

        let text = get_once(t.admin(), "/metrics").await.text();
        let series = r#"tether_upstream_pool_wait_seconds"#;
        let labels = r#"{upstream="backend"}"#;
        assert_eq!(series_value(&text, &format!("{series}_count{labels}")), 2.0);
        assert!(series_value(&text, &format!("{series}_sum{labels}")) >= HOLD.as_secs_f64());
    })
    .await;
}

/// Serves three requests on one pooled connection, lets it retire idle
/// under `policy`, and returns the connection-log line and the backend.
async fn retire_idle(policy: Retire, label: &str) -> (Value, Backend, String) {
    let dir = TempDir::new(label);
    let backend = Backend::start().await;
    let mut config = config_for(backend.addr);
    let pool = &mut config.upstreams[0].pool;
    pool.min_idle = 0;
    pool.idle_timeout = Duration::from_millis(200);
    pool.retire = RetirePolicy::Uniform(policy);
    let (access, connections) = log_to(&mut config, dir.path());
    let theirs = backend.clone();
    let (line, metrics) = with_tether(config, |t| async move {
        for _ in 0..3 {
            assert_eq!(get_once(t.addr(), "/").await.status, 200);
        }
        eventually(|| theirs.closed() == 1).await;
        let line = lines_with(&connections, "reason", "idle", 1)
            .await
            .remove(0);
        let requests = lines_with(&access, "kind", "request", 3).await;
        assert!(
            requests.iter().all(|r| r["upstream_conn"] == line["id"]),
            "{requests:?} {line}"
        );
        (line, get_once(t.admin(), "/metrics").await.text())
    })
    .await;
    (line, backend, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_retired_with_abort_is_logged_as_the_reset_the_backend_saw() {
    let (line, backend, metrics) = retire_idle(Retire::Abort, "conn-abort").await;
    assert_eq!(backend.closed_by_reset(), 1, "the backend saw ECONNRESET");
    assert_eq!(line["how"], "RST", "{line}");
    assert_eq!(line["closed_by"], "tether", "{line}");
    assert_eq!(line["opened_by"], "demand", "{line}");
    assert_eq!(line["requests"], 3, "{line}");
    assert_eq!(line["upstream"], "backend", "{line}");
    assert!(line["idle_ms"].as_f64().unwrap() >= 200.0, "{line}");
    // One connection ended, having carried three requests.
    let series = "tether_upstream_requests_per_connection";
    let labels = r#"{upstream="backend"}"#;
    assert_eq!(
        series_value(&metrics, &format!("{series}_count{labels}")),
        1.0
    );
    assert_eq!(
        series_value(&metrics, &format!("{series}_sum{labels}")),
        3.0
    );
    assert_eq!(
        series_value(
            &metrics,
            &format!(r#"{series}_bucket{{le="2.0",upstream="backend"}}"#)
        ),
        0.0
    );
    assert_eq!(
        series_value(
            &metrics,
            &format!(r#"{series}_bucket{{le="5.0",upstream="backend"}}"#)
        ),
        1.0
    );
    assert_eq!(
        series_value(
            &metrics,
            r#"tether_upstream_pool_wait_seconds_count{upstream="backend"}"#
        ),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_retired_gracefully_is_logged_as_the_fin_the_backend_saw() {
    let (line, backend, _) = retire_idle(Retire::Graceful, "conn-graceful").await;
    assert_eq!(backend.closed_by_reset(), 0, "the backend read end of file");
    assert_eq!(line["how"], "FIN", "{line}");
    assert_eq!(line["closed_by"], "tether", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_nobody_reads_delays_no_request_and_counts_what_it_drops() {
    let dir = TempDir::new("access-fifo");
    let fifo = dir.path().join("access.fifo");
    run_ok(
        std::process::Command::new("mkfifo").arg(&fifo),
        " (mkfifo is needed)",
    );
    let backend = Backend::start().await;
    let mut config = config_for(backend.addr);
    config.upstreams[0].pool.min_idle = 1;
    config.log.access.enabled = true;
    config.log.access.path = Some(fifo.clone());
    config.log.access.buffer_lines = 2;
    with_tether(config, |t| async move {
        let addr = t.addr();
        let answered = concurrently(20, || async move { get_once(addr, "/").await.status }).await;
        assert!(answered.iter().all(|s| *s == 200), "{answered:?}");
        // 20 request lines (each written once its client connection has
        // ended) and a queue of 2 that nobody empties.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let text = get_once(t.admin(), "/metrics").await.text();
            let dropped = series_value(&text, r#"tether_log_lines_dropped_total{log="access"}"#);
            if dropped >= 18.0 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{dropped} dropped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_connection_end_is_on_its_last_exchange_or_on_a_line_of_its_own() {
    let dir = TempDir::new("access-ends");
    let backend = Backend::start().await;
    let mut config = config_for(backend.addr);
    config.log.access.max_target_bytes = 8;
    let (access, _) = log_to(&mut config, dir.path());
    with_tether(config, |t| async move {
        // A keep-alive client that closes after two requests.
        let mut client = Client::connect(t.addr()).await;
        for _ in 0..2 {
            let r = client
                .request(b"GET /a-long-path HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
            assert_eq!(r.status, 200);
        }
        drop(client);
        let ended = lines_with(&access, "kind", "connection", 1).await.remove(0);
        assert_eq!(ended["client_end"], "FIN", "{ended}");
        assert_eq!(ended["client_requests"], 2, "{ended}");
        let requests = lines_with(&access, "kind", "request", 2).await;
        assert!(requests.iter().all(|r| r["client_end"].is_null()));
        assert_eq!(requests[0]["target"], "/a-long-...", "cut at 8 bytes");

        // tether's own answer, ending the connection: on its line.
        let (bytes, _) = exchange_raw(t.addr(), b"GET / HTTP/1.1\r\n\r\n").await;
        assert_eq!(parse(&bytes).await.status, 400);
        let refused = lines_with(&access, "error", "missing-host", 1)
            .await
            .remove(0);
        assert_eq!(refused["kind"], "request");
        assert_eq!(refused["status"], 400);
        assert!(refused["upstream_conn"].is_null(), "never sent: {refused}");
        assert!(refused["client_end"].is_string(), "{refused}");

        // A request that could not be parsed: the connection's line says so.
        let (bytes, _) = exchange_raw(t.addr(), b"BAD\r\n\r\n").await;
        assert_eq!(parse(&bytes).await.status, 400);
        let malformed = lines_with(&access, "error", "malformed-request", 1)
            .await
            .remove(0);
        assert_eq!(malformed["kind"], "connection");
        assert_eq!(malformed["status"], 400);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_drain_closes_are_logged_before_it_returns() {
    let dir = TempDir::new("conn-drain");
    let backend = Backend::start().await;
    let mut config = config_for(backend.addr);
    config.upstreams[0].pool.min_idle = 2;
    let (_, connections) = log_to(&mut config, dir.path());
    with_tether(config, |_| async {}).await;
    let drained: Vec<Value> = lines(&connections)
        .into_iter()
        .filter(|l| l["reason"] == "drain")
        .collect();
    assert_eq!(drained.len(), 2, "{drained:?}");
    assert!(drained
        .iter()
        .all(|l| l["opened_by"] == "warm" && l["requests"] == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_logs_both_attempts_and_why() {
    // The first connection answers its first request and resets on its second.
    fn script(conn: usize, req: usize) -> Act {
        if conn == 1 && req == 2 {
            Act::Reset
        } else {
            Act::Respond
        }
    }
    let dir = TempDir::new("access-retry");
    let backend = Backend::builder().script(script).start().await;
    let mut config = config_for(backend.addr);
    config.upstreams[0].pool.min_idle = 0;
    let (access, connections) = log_to(&mut config, dir.path());
    with_tether(config, |t| async move {
        assert_eq!(get_once(t.addr(), "/first").await.status, 200);
        assert_eq!(get_once(t.addr(), "/second").await.status, 200);
        let logged = lines_with(&access, "kind", "request", 2).await;
        let (first, second) = (&logged[0], &logged[1]);
        assert_eq!(first["target"], "/first");
        assert_eq!(first["reused"], false, "dialled on demand: {first}");
        assert!(first["connect_ms"].as_f64().unwrap() > 0.0, "{first}");
        assert_eq!(first["attempts"], 1, "{first}");
        assert!(first["retry_reason"].is_null(), "{first}");
        assert_eq!(second["attempts"], 2, "{second}");
        assert_eq!(
            second["retry_reason"], "reused-connection-failed",
            "{second}"
        );
        assert_eq!(
            second["reused"], false,
            "the retry's fresh connection: {second}"
        );
        assert_eq!(second["conn_request"], 1, "{second}");
        assert_ne!(first["upstream_conn"], second["upstream_conn"]);
        // The connection the backend reset is logged as the backend's close.
        let id = first["upstream_conn"].clone();
        let reset = || -> Vec<Value> {
            lines(&connections)
                .into_iter()
                .filter(|l| l["id"] == id)
                .collect()
        };
        eventually(|| !reset().is_empty()).await;
        let reset = reset();
        assert_eq!(reset.len(), 1, "{reset:?}");
        assert_eq!(reset[0]["closed_by"], "backend", "{}", reset[0]);
        assert_eq!(reset[0]["reason"], "backend-closed", "{}", reset[0]);
        assert_eq!(reset[0]["requests"], 2, "{}", reset[0]);
    })
    .await;
}
