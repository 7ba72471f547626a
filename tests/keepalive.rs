//! Keeping pooled connections alive on tether's terms: the backend never gets
//! to close an idle pooled connection first (and so never holds a TIME_WAIT),
//! whether tether probes, follows `Keep-Alive: timeout=N`, or learns the
//! backend's idle limit by watching it.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;

/// Requests separated by gaps that straddle the backend's 2 s idle limit.
async fn sporadic(addr: std::net::SocketAddr, total: Duration) -> (usize, usize) {
    let gaps_ms = [300u64, 2500, 700, 3100, 1200, 2200, 150, 2800, 900, 1900];
    let deadline = tokio::time::Instant::now() + total;
    let (mut ok, mut errors) = (0, 0);
    let mut i = 0;
    while tokio::time::Instant::now() < deadline {
        match get_once(addr, "/").await.status {
            200 => ok += 1,
            _ => errors += 1,
        }
        tokio::time::sleep(Duration::from_millis(gaps_ms[i % gaps_ms.len()])).await;
        i += 1;
    }
    (ok, errors)
}

/// A backend that closes a connection idle for 2 s, saying so in a
/// `Keep-Alive` header when `announce`.
async fn idle_closing_backend(announce: bool) -> Backend {
    let mut backend = Backend::builder().idle_close(Duration::from_secs(2));
    if announce {
        backend = backend.keep_alive("timeout=2");
    }
    backend.start().await
}

/// Probes every second, each answered within a second.
fn probing(mut config: tether::Config) -> tether::Config {
    let probe = &mut config.upstreams[0].keepalive.probe;
    probe.enabled = true;
    probe.interval = Duration::from_secs(1);
    probe.timeout = Duration::from_secs(1);
    config
}

/// The backend closed no pooled connection (`closed_by_backend` of them),
/// so it holds no TIME_WAIT.
fn assert_backend_never_closed_first(
    closed_by_backend: usize,
    tw: &TimeWaitBaseline,
    backend: &Backend,
) {
    assert_eq!(
        closed_by_backend, 0,
        "the backend closed a pooled connection"
    );
    assert_eq!(
        tw.on_local_port(backend.addr.port()),
        0,
        "TIME_WAIT in the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_keep_pooled_connections_alive_past_the_backend_idle_timeout() {
    let backend = idle_closing_backend(false).await;
    with_tether(probing(config_for(backend.addr)), |t| async move {
        let tw = TimeWaitBaseline::now();
        let (ok, errors) = sporadic(t.addr(), Duration::from_secs(20)).await;
        let probes = backend.stats.probes.load(Ordering::SeqCst);
        let closed_by_backend = backend.stats.closed_idle_by_backend.load(Ordering::SeqCst);
        eprintln!("probes: {ok} requests, {errors} errors, {probes} probes, backend closed {closed_by_backend} idle connections, accepted {}", backend.accepted());
        assert_eq!(errors, 0);
        assert!(probes > 0);
        assert_backend_never_closed_first(closed_by_backend, &tw, &backend);
        assert_eq!(
            backend.accepted(),
            2,
            "the warm connections lived throughout"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_keep_alive_timeout_is_never_overstayed() {
    let backend = idle_closing_backend(true).await;
    with_tether(config_for(backend.addr), |t| async move {
        let tw = TimeWaitBaseline::now();
        let (ok, errors) = sporadic(t.addr(), Duration::from_secs(12)).await;
        let closed_by_backend = backend.stats.closed_idle_by_backend.load(Ordering::SeqCst);
        let max_gap = backend.stats.max_idle_gap_ms.load(Ordering::SeqCst);
        eprintln!("announced: {ok} requests, {errors} errors, longest idle reuse {max_gap} ms, backend closed {closed_by_backend}, accepted {}", backend.accepted());
        assert_eq!(errors, 0);
        assert!(
            max_gap < 2000,
            "a connection was used {max_gap} ms after its last response"
        );
        assert_backend_never_closed_first(closed_by_backend, &tw, &backend);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unannounced_idle_limit_is_learned_from_the_first_close() {
    let backend = idle_closing_backend(false).await;
    let config = config_for(backend.addr);
    let min_idle = config.upstreams[0].pool.min_idle;
    with_tether(config, |t| async move {
        let (ok, errors) = sporadic(t.addr(), Duration::from_secs(12)).await;
        let closed_by_backend = backend.stats.closed_idle_by_backend.load(Ordering::SeqCst);
        let learned = t.pool("backend").unwrap().endpoints()[0].observed_idle_close();
        eprintln!("learned: {ok} requests, {errors} errors, backend closed {closed_by_backend}, learned {learned:?}");
        assert_eq!(errors, 0);
        let learned = learned.expect("the idle limit was learned");
        assert!(
            learned >= Duration::from_millis(1900) && learned < Duration::from_millis(3000),
            "{learned:?}"
        );
        // Only the first round of idle connections is closed by the backend.
        assert!(
            closed_by_backend <= min_idle + 1,
            "backend closed {closed_by_backend}"
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn warm_floor_holds_through_five_minutes_without_traffic() {
    let backend = Backend::start().await;
    let config = config_for(backend.addr);
    let min_idle = config.upstreams[0].pool.min_idle;
    with_tether(config, |t| async move {
        for minute_tenth in 0..30 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            assert_eq!(
                backend.open(),
                min_idle,
                "after {}s",
                (minute_tenth + 1) * 10
            );
            let endpoint = t.pool("backend").unwrap().endpoints()[0].clone();
            assert_eq!(endpoint.idle_connections(), min_idle);
        }
        assert_eq!(backend.accepted(), min_idle, "no connection was replaced");
        assert_eq!(backend.requests(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_connection_is_evicted_by_its_probe_and_replaced() {
    let backend = Backend::start().await;
    let relay = Relay::start(backend.addr).await;
    with_tether(probing(config_for(relay.addr)), |t| async move {
        assert_eq!(get_once(t.addr(), "/").await.status, 200);

        relay.black_hole_existing();
        let endpoint = t.pool("backend").unwrap().endpoints()[0].clone();
        let started = tokio::time::Instant::now();
        // Both idle connections fail their probe within interval + timeout (plus
        // the idle time they had already accumulated).
        eventually_within(Duration::from_secs(4), || {
            endpoint.stats().probe_failures.load(Ordering::SeqCst) >= 2
        })
        .await;
        eprintln!("evicted within {:?}", started.elapsed());
        for _ in 0..5 {
            assert_eq!(
                get_once(t.addr(), "/").await.status,
                200,
                "served on a new connection"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_first_lifetime_retirement_lets_the_backend_close() {
    use tether::config::{Retire, RetireByReason, RetirePolicy};
    let backend = Backend::start().await;
    let mut config = config_for(backend.addr);
    config.upstreams[0].pool.min_idle = 1;
    config.upstreams[0].pool.max_lifetime = Duration::from_millis(300);
    config.upstreams[0].pool.retire = RetirePolicy::PerReason(RetireByReason {
        lifetime: Retire::PeerFirst,
        ..RetireByReason::default()
    });
    with_tether(config, |t| async move {
        let tw = TimeWaitBaseline::now();
        for _ in 0..25 {
            assert_eq!(get_once(t.addr(), "/").await.status, 200);
            tokio::time::sleep(Duration::from_millis(80)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let goodbyes = backend.stats.goodbyes.load(Ordering::SeqCst);
        let (toward_backend, in_backend) = tw.at_port(backend.addr.port());
        eprintln!("peer_first: {goodbyes} goodbye requests, {} accepted, TIME_WAIT in backend {in_backend}, toward backend {toward_backend}", backend.accepted());
        assert!(
            goodbyes >= 2,
            "connections past their lifetime said goodbye"
        );
        // The backend closed those connections itself: the TIME_WAIT is its own.
        assert!(in_backend >= 1);
        assert_eq!(toward_backend, 0, "tether never closed first");
    })
    .await;
}
