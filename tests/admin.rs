//! The admin server tells an operator what tether is doing: outcomes by reason,
//! how client connections ended, pool state, and the kernel's TIME_WAIT counts.

mod common;

use std::time::Duration;

use common::*;
use tether::config::ClientClose;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_outcomes_endings_and_time_wait() {
    with_tether_and_backend(
        |config| {
            config.listeners[0].client_close = ClientClose::Graceful;
            config.listeners[0].close_grace = Duration::from_millis(200);
        },
        |backend, t| async move {
            let (addr, admin) = (t.addr(), t.admin());
            for _ in 0..3 {
                assert_eq!(get_once(addr, "/").await.status, 200);
            }
            let (bytes, _) = exchange_raw(addr, b"BAD\r\n\r\n").await;
            assert_eq!(parse(&bytes).await.status, 400);
            let (bytes, _) = exchange_raw(addr, b"GET / HTTP/1.1\r\n\r\n").await;
            assert_eq!(
                parse(&bytes).await.header("x-tether-error"),
                Some("missing-host")
            );

            let text = get_once(admin, "/metrics").await.text();
            let listener = |name: &str, labels: &str| {
                series_value(&text, &format!("{name}{{listener=\"app\",{labels}}}"))
            };
            assert_eq!(listener("tether_requests_total", r#"class="2xx""#), 3.0);
            assert_eq!(listener("tether_requests_total", r#"class="4xx""#), 2.0);
            assert_eq!(
                listener(
                    "tether_local_responses_total",
                    r#"reason="malformed-request""#
                ),
                1.0
            );
            assert_eq!(
                listener("tether_local_responses_total", r#"reason="missing-host""#),
                1.0
            );
            assert_eq!(
                listener(
                    "tether_client_connections_closed_total",
                    r#"reason="misbehaved""#
                ),
                2.0
            );
            assert_eq!(
                series_value(
                    &text,
                    r#"tether_client_connections_accepted_total{listener="app"}"#
                ),
                5.0
            );
            let endpoint = |name: &str| {
                series_value(
                    &text,
                    &format!(
                        r#"{name}{{upstream="backend",endpoint="{}"}}"#,
                        backend.addr
                    ),
                )
            };
            assert_eq!(endpoint("tether_upstream_connections_open"), 2.0);
            assert_eq!(endpoint("tether_time_wait_toward_upstream"), 0.0);
            // Graceful close: the TIME_WAIT of each finished exchange is on the listener.
            assert!(series_value(&text, r#"tether_time_wait_on_listener{listener="app"}"#) >= 3.0);

            assert_eq!(get_once(admin, "/healthz").await.status, 200);
            t.ready().await;
            assert_eq!(get_once(admin, "/readyz").await.status, 200);
            let config = get_once(admin, "/config").await.text();
            assert!(tether::Config::from_toml(&config).is_ok(), "{config}");
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_shows_every_connection_and_what_opened_them() {
    with_tether_and_backend(
        |config| config.upstreams[0].pool.min_idle = 2,
        |backend, t| async move {
            let (addr, admin) = (t.addr(), t.admin());
            for _ in 0..3 {
                assert_eq!(get_once(addr, "/").await.status, 200);
            }
            let response = get_once(admin, "/pools").await;
            assert_eq!(response.status, 200);
            assert_eq!(response.header("content-type"), Some("application/json"));
            let pools: serde_json::Value = serde_json::from_str(&response.text()).unwrap();
            let endpoint = &pools[0]["endpoints"][0];
            assert_eq!(pools[0]["upstream"], "backend");
            assert_eq!(endpoint["address"], backend.addr.to_string());
            // The warm floor carried every request: nothing dialled on demand.
            assert_eq!(endpoint["opened"]["warm"], 2, "{endpoint:#}");
            assert_eq!(endpoint["opened"]["demand"], 0, "{endpoint:#}");
            assert_eq!(endpoint["reused"], 3, "{endpoint:#}");
            assert_eq!(endpoint["idle"], 2, "{endpoint:#}");
            assert_eq!(endpoint["busy"], 0, "{endpoint:#}");
            assert_eq!(endpoint["ejected"], false);
            for reason in ["idle", "lifetime", "max_requests", "error", "drain"] {
                assert_eq!(endpoint["retired"][reason], 0, "{endpoint:#}");
            }
            let connections = endpoint["connections"].as_array().unwrap();
            assert_eq!(connections.len(), backend.accepted(), "{endpoint:#}");
            let served: u64 = connections
                .iter()
                .map(|c| c["requests"].as_u64().unwrap())
                .sum();
            assert_eq!(served, 3, "{endpoint:#}");
            for c in connections {
                assert_eq!(c["state"], "idle");
                assert!(c["idle_ms"].as_u64().unwrap() <= c["age_ms"].as_u64().unwrap());
            }
            let ids: std::collections::BTreeSet<u64> = connections
                .iter()
                .map(|c| c["id"].as_u64().unwrap())
                .collect();
            assert_eq!(ids.len(), 2, "ids are unique: {endpoint:#}");
        },
    )
    .await;
}
