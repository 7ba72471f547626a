//! Lifecycles: drain deadlines, connection lifetimes, and how load spreads over
//! several endpoints.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tether::config::Balance;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_resets_what_is_still_running_at_the_deadline() {
    let (backend, running, addr) = backend_and_tether(|config| {
        config.runtime.drain_timeout = Duration::from_millis(500);
    })
    .await;

    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(b"GET /stall HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    wait_until(Duration::from_secs(5), || {
        backend.stats.in_flight.load(Ordering::SeqCst) == 1
    })
    .await;
    // An idle keep-alive client is told the connection is over at once.
    let idle = TcpStream::connect(addr).await.unwrap();
    let mut idle = BufReader::new(idle);
    idle.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut idle, false).await.unwrap().status, 200);

    let admin = running.admin_addr().unwrap();
    running.ready().await;
    assert_eq!(get_once(admin, "/readyz").await.status, 200);
    let drain = tokio::spawn(running.drain());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let readiness = get_once(admin, "/readyz").await;
    assert_eq!(readiness.status, 503, "not ready while draining");
    let (_, idle_end) = read_to_end(idle.get_mut(), Duration::from_secs(5)).await;
    assert_eq!(
        idle_end,
        End::Eof,
        "idle client closed by the graceful policy"
    );
    let (bytes, end) = read_to_end(&mut stalled, Duration::from_secs(5)).await;
    assert!(bytes.is_empty());
    assert_eq!(
        end,
        End::Reset,
        "the stalled exchange is reset at the deadline"
    );
    assert!(drain.await.unwrap().forced);
    // The upstream connection of the abandoned exchange is reset too.
    wait_until(Duration::from_secs(5), || {
        backend.stats.closed_by_reset.load(Ordering::SeqCst) >= 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_retired_at_max_lifetime_and_the_floor_is_refilled() {
    let (backend, running, addr) = backend_and_tether(|config| {
        config.upstreams[0].pool.min_idle = 1;
        config.upstreams[0].pool.max_lifetime = Duration::from_millis(400);
    })
    .await;
    assert_eq!(get_once(addr, "/").await.status, 200);
    // Each lifetime ends in a reset, and a new warm connection takes its place.
    wait_until(Duration::from_secs(10), || {
        backend.stats.closed_by_reset.load(Ordering::SeqCst) >= 2 && backend.open() == 1
    })
    .await;
    assert_eq!(get_once(addr, "/").await.status, 200);
    running.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_outstanding_spreads_concurrent_requests_over_endpoints() {
    let a = Backend::start().await;
    let b = Backend::start().await;
    let mut config = config_for(a.addr);
    config.upstreams[0].endpoints = vec![a.addr.to_string(), b.addr.to_string()];
    let (running, addr) = start_tether(config).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        tasks.push(tokio::spawn(
            async move { get_once(addr, "/slow?300").await },
        ));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 200);
    }
    assert_eq!(a.requests() + b.requests(), 20);
    assert!(
        a.requests() >= 8 && b.requests() >= 8,
        "a {} b {}",
        a.requests(),
        b.requests()
    );
    running.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_alternates_endpoints() {
    let a = Backend::start().await;
    let b = Backend::start().await;
    let mut config = config_for(a.addr);
    config.upstreams[0].endpoints = vec![a.addr.to_string(), b.addr.to_string()];
    config.upstreams[0].balance = Balance::RoundRobin;
    let (running, addr) = start_tether(config).await;
    for _ in 0..10 {
        assert_eq!(get_once(addr, "/").await.status, 200);
    }
    assert_eq!((a.requests(), b.requests()), (5, 5));
    running.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_name_endpoint_resolves_and_serves() {
    let backend = Backend::start().await;
    let mut config = config_for(backend.addr);
    config.upstreams[0].endpoints = vec![format!("localhost:{}", backend.addr.port())];
    let running = tether::start(config).await.unwrap();
    let addr = running.tcp_addr("app").unwrap();
    assert_eq!(get_once(addr, "/").await.status, 200);
    running.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_endpoint_is_ejected_and_costs_clients_no_errors() {
    let live = Backend::start().await;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let mut config = config_for(live.addr);
    config.upstreams[0].endpoints = vec![dead_addr.to_string(), live.addr.to_string()];
    config.upstreams[0].pool.min_idle = 0;
    config.upstreams[0].health.eject_after = 3;
    let running = tether::start(config).await.unwrap();
    let addr = running.tcp_addr("app").unwrap();
    for i in 0..40 {
        let resp = get_once(addr, "/").await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
    }
    assert_eq!(live.requests(), 40);
    let pool = running.pool("backend").unwrap();
    let dead_endpoint = pool
        .endpoints()
        .iter()
        .find(|e| e.addr() == dead_addr)
        .cloned()
        .unwrap();
    assert!(dead_endpoint.is_ejected());
    assert_eq!(dead_endpoint.stats().ejections.load(Ordering::SeqCst), 1);
    running.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_endpoint_ejected_requests_get_a_503_with_the_reason() {
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let mut config = config_for(dead_addr);
    config.upstreams[0].pool.min_idle = 0;
    config.upstreams[0].health.eject_after = 2;
    let running = tether::start(config).await.unwrap();
    let addr = running.tcp_addr("app").unwrap();
    assert_eq!(get_once(addr, "/").await.status, 502);
    assert_eq!(get_once(addr, "/").await.status, 502);
    let resp = get_once(addr, "/").await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.header("x-tether-error"), Some("all-endpoints-ejected"));
    running.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_answering_5xx_is_ejected_when_configured() {
    let failing = Backend::start_with(BackendOptions {
        fail_all: true,
        ..BackendOptions::default()
    })
    .await;
    let healthy = Backend::start().await;
    let mut config = config_for(healthy.addr);
    config.upstreams[0].endpoints = vec![failing.addr.to_string(), healthy.addr.to_string()];
    config.upstreams[0].balance = Balance::RoundRobin;
    config.upstreams[0].health.eject_after = 3;
    config.upstreams[0].health.eject_on_5xx = true;
    let (running, addr) = start_tether(config).await;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(get_once(addr, "/").await.status);
    }
    assert_eq!(
        failing.requests(),
        3,
        "ejected after three 500s: {statuses:?}"
    );
    assert!(statuses[10..].iter().all(|s| *s == 200), "{statuses:?}");
    running.drain().await;
}
