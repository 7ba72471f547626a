//! The admin server tells an operator what tether is doing: outcomes by reason,
//! how client connections ended, pool state, and the kernel's TIME_WAIT counts.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tether::config::ClientClose;

async fn admin_get(admin: SocketAddr, path: &str) -> Resp {
    get_once(admin, path).await
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {prefix} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_outcomes_endings_and_time_wait() {
    let (backend, running, addr) = backend_and_tether(|config| {
        config.listeners[0].client_close = ClientClose::Graceful;
        config.listeners[0].close_grace = Duration::from_millis(200);
    })
    .await;
    let admin = running.admin_addr().unwrap();

    for _ in 0..3 {
        assert_eq!(get_once(addr, "/").await.status, 200);
    }
    let (bytes, _) = exchange_raw(addr, b"BAD\r\n\r\n", Duration::from_secs(5)).await;
    assert_eq!(parse(&bytes).await.status, 400);
    let (bytes, _) = exchange_raw(addr, b"GET / HTTP/1.1\r\n\r\n", Duration::from_secs(5)).await;
    assert_eq!(
        parse(&bytes).await.header("x-tether-error"),
        Some("missing-host")
    );

    let text = admin_get(admin, "/metrics").await.text();
    assert_eq!(
        metric(
            &text,
            r#"tether_requests_total{listener="app",class="2xx"}"#
        ),
        3.0
    );
    assert_eq!(
        metric(
            &text,
            r#"tether_requests_total{listener="app",class="4xx"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            r#"tether_local_responses_total{listener="app",reason="malformed-request"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"tether_local_responses_total{listener="app",reason="missing-host"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"tether_client_connections_closed_total{listener="app",reason="misbehaved"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            r#"tether_client_connections_accepted_total{listener="app"}"#
        ),
        5.0
    );
    let endpoint = backend.addr.to_string();
    assert_eq!(
        metric(
            &text,
            &format!(
                r#"tether_upstream_connections_open{{upstream="backend",endpoint="{endpoint}"}}"#
            )
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            &format!(
                r#"tether_time_wait_toward_upstream{{upstream="backend",endpoint="{endpoint}"}}"#
            )
        ),
        0.0
    );
    // Graceful close: the TIME_WAIT of each finished exchange is on the listener.
    assert!(metric(&text, r#"tether_time_wait_on_listener{listener="app"}"#) >= 3.0);

    assert_eq!(admin_get(admin, "/healthz").await.status, 200);
    running.ready().await;
    assert_eq!(admin_get(admin, "/readyz").await.status, 200);
    let config = admin_get(admin, "/config").await.text();
    assert!(tether::Config::from_toml(&config).is_ok(), "{config}");
    running.drain().await;
}
