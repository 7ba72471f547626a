//! Lifecycles: drain deadlines, connection lifetimes, and how load spreads over
//! several endpoints.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tether::config::{Balance, Config};

/// A config whose upstream has `endpoints`, in that order.
fn config_with_endpoints(endpoints: &[SocketAddr]) -> Config {
    let mut config = config_for(endpoints[0]);
    config.upstreams[0].endpoints = endpoints.iter().map(|e| e.to_string()).collect();
    config
}

/// An address nothing listens on.
async fn refusing_addr() -> SocketAddr {
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    dead.local_addr().unwrap()
}

/// This test drains by hand: the drain is what it watches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_resets_what_is_still_running_at_the_deadline() {
    let backend = Backend::start().await;
    let mut config = config_for(backend.addr);
    config.runtime.drain_timeout = Duration::from_millis(500);
    let running = tether::start(config).await.unwrap();
    let addr = running.tcp_addr("app").unwrap();

    let mut stalled = Client::connect(addr).await;
    stalled
        .send(b"GET /stall HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    eventually(|| backend.in_flight() == 1).await;
    // An idle keep-alive client is told the connection is over at once.
    let mut idle = Client::connect(addr).await;
    let resp = idle.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(resp.status, 200);

    let admin = running.admin_addr().unwrap();
    running.ready().await;
    assert_eq!(get_once(admin, "/readyz").await.status, 200);
    let drain = tokio::spawn(running.drain());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let readiness = get_once(admin, "/readyz").await;
    assert_eq!(readiness.status, 503, "not ready while draining");
    let (_, idle_end) = idle.read_to_end().await;
    assert_eq!(
        idle_end,
        End::Eof,
        "idle client closed by the graceful policy"
    );
    let (bytes, end) = stalled.read_to_end().await;
    assert!(bytes.is_empty());
    assert_eq!(
        end,
        End::Reset,
        "the stalled exchange is reset at the deadline"
    );
    assert!(drain.await.unwrap().forced);
    // The upstream connection of the abandoned exchange is reset too.
    eventually(|| backend.closed_by_reset() >= 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_retired_at_max_lifetime_and_the_floor_is_refilled() {
    with_tether_and_backend(
        |config| {
            config.upstreams[0].pool.min_idle = 1;
            config.upstreams[0].pool.max_lifetime = Duration::from_millis(400);
        },
        |backend, t| async move {
            assert_eq!(get_once(t.addr(), "/").await.status, 200);
            // Each lifetime ends in a reset, and a new warm connection takes its place.
            eventually(|| backend.closed_by_reset() >= 2 && backend.open() == 1).await;
            assert_eq!(get_once(t.addr(), "/").await.status, 200);
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_outstanding_spreads_concurrent_requests_over_endpoints() {
    let (a, b) = (Backend::start().await, Backend::start().await);
    with_tether(config_with_endpoints(&[a.addr, b.addr]), |t| async move {
        let addr = t.addr();
        for resp in concurrently(20, || get_once(addr, "/slow?300")).await {
            assert_eq!(resp.status, 200);
        }
        assert_eq!(a.requests() + b.requests(), 20);
        assert!(
            a.requests() >= 8 && b.requests() >= 8,
            "a {} b {}",
            a.requests(),
            b.requests()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_alternates_endpoints() {
    let (a, b) = (Backend::start().await, Backend::start().await);
    let mut config = config_with_endpoints(&[a.addr, b.addr]);
    config.upstreams[0].balance = Balance::RoundRobin;
    with_tether(config, |t| async move {
        for _ in 0..10 {
            assert_eq!(get_once(t.addr(), "/").await.status, 200);
        }
        assert_eq!((a.requests(), b.requests()), (5, 5));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_name_endpoint_resolves_and_serves() {
    let backend = Backend::start().await;
    let mut config = config_for(backend.addr);
    config.upstreams[0].endpoints = vec![format!("localhost:{}", backend.addr.port())];
    with_tether(config, |t| async move {
        assert_eq!(get_once(t.addr(), "/").await.status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_endpoint_is_ejected_and_costs_clients_no_errors() {
    let live = Backend::start().await;
    let dead_addr = refusing_addr().await;
    let mut config = config_with_endpoints(&[dead_addr, live.addr]);
    config.upstreams[0].pool.min_idle = 0;
    config.upstreams[0].health.eject_after = 3;
    with_tether(config, |t| async move {
        for i in 0..40 {
            let resp = get_once(t.addr(), "/").await;
            assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
        }
        assert_eq!(live.requests(), 40);
        let pool = t.pool("backend").unwrap();
        let dead_endpoint = pool
            .endpoints()
            .iter()
            .find(|e| e.addr() == dead_addr)
            .cloned()
            .unwrap();
        assert!(dead_endpoint.is_ejected());
        assert_eq!(dead_endpoint.stats().ejections.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_endpoint_ejected_requests_get_a_503_with_the_reason() {
    let mut config = config_for(refusing_addr().await);
    config.upstreams[0].pool.min_idle = 0;
    config.upstreams[0].health.eject_after = 2;
    with_tether(config, |t| async move {
        assert_eq!(get_once(t.addr(), "/").await.status, 502);
        assert_eq!(get_once(t.addr(), "/").await.status, 502);
        let resp = get_once(t.addr(), "/").await;
        assert_tether_error(&resp, 503, "all-endpoints-ejected");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_answering_5xx_is_ejected_when_configured() {
    let failing = Backend::builder().status(500).start().await;
    let healthy = Backend::start().await;
    let mut config = config_with_endpoints(&[failing.addr, healthy.addr]);
    config.upstreams[0].balance = Balance::RoundRobin;
    config.upstreams[0].health.eject_after = 3;
    config.upstreams[0].health.eject_on_5xx = true;
    with_tether(config, |t| async move {
        let mut statuses = Vec::new();
        for _ in 0..20 {
            statuses.push(get_once(t.addr(), "/").await.status);
        }
        assert_eq!(
            failing.requests(),
            3,
            "ejected after three 500s: {statuses:?}"
        );
        assert!(statuses[10..].iter().all(|s| *s == 200), "{statuses:?}");
    })
    .await;
}
