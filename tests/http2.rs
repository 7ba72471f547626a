//! HTTP/2 upstreams: HTTP/1.x clients carried as streams over a few
//! connections, the peer's stream limit respected, GOAWAY invisible to clients,
//! and PING evicting a connection that stopped answering.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tether::config::Protocol;

/// An HTTP/2 (prior knowledge) backend that answers after `pause`.
async fn h2_backend(max_streams: u32, pause: Duration) -> Backend {
    Backend::builder()
        .http2(max_streams)
        .delay(pause)
        .body("hello h2")
        .start()
        .await
}

fn h2_config(backend: SocketAddr) -> tether::Config {
    let mut config = config_for(backend);
    let upstream = &mut config.upstreams[0];
    upstream.protocol = Protocol::Http2;
    upstream.pool.min_idle = 1;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_ride_at_most_two_http2_connections() {
    let backend = h2_backend(500, Duration::from_millis(300)).await;
    with_tether(h2_config(backend.addr), |t| async move {
        let addr = t.addr();
        for resp in concurrently(1000, || get_once(addr, "/")).await {
            assert_eq!(resp.status, 200, "{}", resp.text());
            assert_eq!(resp.body, b"hello h2");
        }
        assert_eq!(backend.requests(), 1000);
        let accepted = backend.accepted();
        eprintln!("1000 concurrent requests over {accepted} HTTP/2 connections");
        assert!(accepted <= 2, "{accepted} upstream connections");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_mid_load_costs_clients_nothing() {
    let backend = h2_backend(100, Duration::from_millis(20)).await;
    with_tether(h2_config(backend.addr), |t| async move {
        let addr = t.addr();
        let load = concurrently(16, || async move {
            let mut failures = 0;
            for _ in 0..40 {
                let resp = get_once(addr, "/").await;
                if resp.status != 200 {
                    eprintln!("error: {} {}", resp.status, resp.text());
                    failures += 1;
                }
            }
            failures
        });
        let goaways = async {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(150)).await;
                backend.close_gracefully();
            }
        };
        let (failures, ()) = tokio::join!(load, goaways);
        assert_eq!(failures.iter().sum::<usize>(), 0);
        assert!(
            backend.accepted() >= 2,
            "GOAWAY moved traffic to new connections"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_ping_evicts_the_connection() {
    let backend = h2_backend(100, Duration::ZERO).await;
    let relay = Relay::start(backend.addr).await;
    let mut config = h2_config(relay.addr);
    config.upstreams[0].keepalive.ping_interval = Duration::from_secs(1);
    config.upstreams[0].keepalive.ping_timeout = Duration::from_secs(1);
    with_tether(config, |t| async move {
        assert_eq!(get_once(t.addr(), "/").await.status, 200);
        assert_eq!(backend.accepted(), 1);

        relay.black_hole_existing();
        let started = tokio::time::Instant::now();
        // The floor is refilled with a new connection once the old one is evicted.
        eventually(|| backend.accepted() == 2).await;
        eprintln!("evicted and replaced within {:?}", started.elapsed());
        assert!(started.elapsed() <= Duration::from_millis(3500));
        for _ in 0..5 {
            assert_eq!(get_once(t.addr(), "/").await.status, 200);
        }
    })
    .await;
}
