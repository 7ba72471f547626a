//! Pooling: many short client connections ride a few persistent upstream ones,
//! and the kernel's table shows no TIME_WAIT on either leg.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tether::config::ClientClose;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_sequential_connections_ride_the_warm_pool_without_time_wait() {
    let backend = Backend::start().await;
    let backend_port = backend.addr.port();
    let mut config = config_for(backend.addr);
    config.listeners[0].client_close = ClientClose::Abort;
    let min_idle = config.upstreams[0].pool.min_idle;
    let tw = with_tether(config, |t| async move {
        let addr = t.addr();
        let tw = TimeWaitBaseline::now();
        for i in 0..5000 {
            let resp = get_once(addr, "/").await;
            assert_eq!(resp.status, 200, "request {i}");
            assert_eq!(resp.body, b"hello");
        }

        assert_eq!(backend.requests(), 5000);
        assert!(
            backend.accepted() <= min_idle + 1,
            "backend accepted {} connections",
            backend.accepted()
        );
        // Let the last resets land before reading the kernel's table.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(tw.at_port(backend_port), (0, 0), "toward, in the backend");
        assert_eq!(tw.at_port(addr.port()), (0, 0), "toward, on the listener");
        tw
    })
    .await;
    // Drained: the pool's connections are gone, still without TIME_WAIT.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(tw.at_port(backend_port), (0, 0), "after the drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_clients_share_at_most_sixty_four_upstream_connections() {
    with_tether_and_backend(
        |config| config.listeners[0].client_close = ClientClose::Abort,
        |backend, t| async move {
            let addr = t.addr();
            let tw = TimeWaitBaseline::now();
            concurrently(64, || async move {
                for _ in 0..50 {
                    let resp = get_once(addr, "/").await;
                    assert_eq!(resp.status, 200);
                }
            })
            .await;
            let requests = backend.requests();
            let accepted = backend.accepted();
            assert_eq!(requests, 64 * 50);
            assert!(accepted <= 64, "backend accepted {accepted} connections");
            assert!(
                requests / accepted >= 10,
                "each upstream connection carried {} requests on average",
                requests / accepted
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(tw.at_port(backend.addr.port()), (0, 0));
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_floor_is_opened_at_start_and_refilled_after_the_backend_closes_it() {
    with_tether_and_backend(
        |config| {
            config.upstreams[0].pool.min_idle = 3;
            config.upstreams[0].pool.max_idle = 3;
        },
        |backend, _| async move {
            eventually(|| backend.open() == 3).await;
            assert_eq!(backend.requests(), 0, "warming sends no requests");

            backend.close_gracefully();
            eventually(|| backend.accepted() == 6 && backend.open() == 3).await;
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retired_idle_connection_is_reset_and_leaves_no_time_wait() {
    with_tether_and_backend(
        |config| {
            config.upstreams[0].pool.min_idle = 0;
            config.upstreams[0].pool.idle_timeout = Duration::from_millis(300);
        },
        |backend, t| async move {
            let tw = TimeWaitBaseline::now();
            let resp = get_once(t.addr(), "/").await;
            assert_eq!(resp.status, 200);
            assert_eq!(backend.accepted(), 1);
            // The maintenance tick retires it once idle past idle_timeout.
            eventually(|| backend.open() == 0).await;
            assert_eq!(backend.closed_by_reset(), 1, "backend saw ECONNRESET");
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(tw.at_port(backend.addr.port()), (0, 0));
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_serve_one_listener_each_with_its_share_of_the_pool() {
    let backend = Backend::start().await;
    let mut config = config_for(backend.addr);
    config.upstreams[0].pool.max_connections = 4;
    config.upstreams[0].pool.max_idle = 4;
    config.upstreams[0].pool.min_idle = 2;
    let worker = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let handle = worker.handle().clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let thread = {
        let stop = stop.clone();
        std::thread::spawn(move || worker.block_on(stop.cancelled_owned()))
    };
    with_tether_on(config, &[handle], |t| async move {
        // New connections from new ports: SO_REUSEPORT spreads them over both
        // workers' sockets.
        for _ in 0..200 {
            assert_eq!(get_once(t.addr(), "/").await.status, 200);
        }
        let shares: Vec<_> = t.pools("backend").collect();
        assert_eq!(shares.len(), 2);
        for share in &shares {
            let endpoint = &share.endpoints()[0];
            assert!(
                endpoint.stats().reused.load(Ordering::SeqCst) > 0,
                "a worker's pool share carried no request"
            );
            assert!(endpoint.open_connections() <= 2);
        }
        assert!(
            backend.accepted() <= 4,
            "backend accepted {}",
            backend.accepted()
        );
        // One series per endpoint, the shares summed.
        let metrics = t.metrics().render();
        let open: Vec<_> = metrics
            .lines()
            .filter(|l| {
                l.starts_with("upstream_connections_open{")
                    || l.starts_with("tether_upstream_connections_open{")
            })
            .collect();
        assert_eq!(open.len(), 1, "{open:?}");
    })
    .await;
    stop.cancel();
    thread.join().unwrap();
}
