//! Admission at a listener's `max_connections`: a new client is admitted at
//! once by resetting the longest-idle keep-alive client connection, never one
//! with a request in flight; with none idle, or without `evict_idle_at_cap`,
//! it waits.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tether::Config;

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";

/// The bound on a new client's first answer at the cap.
const ADMITTED_WITHIN: Duration = Duration::from_millis(100);

/// `count` keep-alive clients, each with one request answered, opened 250 at
/// a time.
async fn idle_clients(addr: SocketAddr, count: usize) -> Vec<Client> {
    let mut clients = Vec::with_capacity(count);
    while clients.len() < count {
        let mut opening = tokio::task::JoinSet::new();
        for _ in 0..250.min(count - clients.len()) {
            opening.spawn(async move {
                let mut client = Client::connect(addr).await;
                assert_eq!(client.request(GET).await.status, 200);
                client
            });
        }
        clients.extend(opening.join_all().await);
    }
    clients
}

/// Sends one GET on a new connection and times it, from connect to the whole
/// response; returns the client (still connected), its status and the time.
async fn timed_get(addr: SocketAddr) -> (Client, u16, Duration) {
    let started = Instant::now();
    let mut client = Client::connect(addr).await;
    let status = tokio::time::timeout(PATIENCE, client.request(GET))
        .await
        .expect("the new client was answered")
        .status;
    (client, status, started.elapsed())
}

/// Whether nothing arrives on `client` (no byte, FIN or RST) for `wait`.
async fn quiet_for(client: &mut Client, wait: Duration) -> bool {
    let mut byte = [0u8; 1];
    tokio::time::timeout(wait, client.stream().peek(&mut byte))
        .await
        .is_err()
}

/// Client connections of listener `app` reset to make room, by the metrics.
fn evicted(text: &str) -> u64 {
    let line = r#"tether_client_connections_closed_total{listener="app",reason="evicted-idle"} "#;
    text.lines()
        .find_map(|l| l.strip_prefix(line))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// A listener capped at `cap` whose idle clients would otherwise stay.
fn capped(config: &mut Config, cap: usize, evict: bool) {
    let listener = &mut config.listeners[0];
    listener.max_connections = cap;
    listener.evict_idle_at_cap = evict;
    listener.idle_timeout = Duration::from_secs(600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_the_longest_idle_client_is_reset_to_admit_a_new_one() {
    const CAP: usize = 50;
    with_tether_and_backend(
        |config| capped(config, CAP, true),
        |_backend, t| async move {
            let addr = t.addr();
            let mut oldest = idle_clients(addr, 1).await.remove(0);
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut others = idle_clients(addr, CAP - 1).await;

            let (_newcomer, status, took) = timed_get(addr).await;
            assert_eq!(status, 200);
            assert!(took < ADMITTED_WITHIN, "admitted after {took:?}");

            let (_, end) = oldest.read_to_end().await;
            assert_eq!(end, End::Reset, "the longest-idle client is reset");
            // Every other old client is still served on its connection.
            for client in &mut others {
                assert_eq!(client.request(GET).await.status, 200);
            }
            eventually(|| evicted(&t.metrics().render()) == 1).await;
            assert_eq!(evicted(&t.metrics().render()), 1);
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_eviction_a_new_client_waits_while_idle_clients_hold_the_cap() {
    const CAP: usize = 50;
    with_tether_and_backend(
        |config| capped(config, CAP, false),
        |_backend, t| async move {
            let addr = t.addr();
            let mut idle = idle_clients(addr, CAP).await;
            let mut newcomer = Client::connect(addr).await;
            newcomer.send(GET).await;
            assert!(
                quiet_for(&mut newcomer, Duration::from_secs(1)).await,
                "a new client is answered at the cap without eviction"
            );
            // A client leaving frees its permit: the new one is served.
            drop(idle.pop());
            assert_eq!(newcomer.response().await.status, 200);
            assert_eq!(evicted(&t.metrics().render()), 0);
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_connections_are_never_reset_to_make_room() {
    const CAP: usize = 50;
    with_tether_and_backend(
        |config| capped(config, CAP, true),
        |backend, t| async move {
            let addr = t.addr();
            let mut busy = Vec::new();
            for _ in 0..CAP {
                let mut client = Client::connect(addr).await;
                client
                    .send(b"GET /slow?1500 HTTP/1.1\r\nHost: t\r\n\r\n")
                    .await;
                busy.push(client);
            }
            eventually(|| backend.in_flight() == CAP).await;
            let mut newcomer = Client::connect(addr).await;
            newcomer.send(GET).await;
            assert!(
                quiet_for(&mut newcomer, Duration::from_millis(500)).await,
                "a new client is answered while every connection is busy"
            );
            assert_eq!(evicted(&t.metrics().render()), 0);
            // Every request in flight is answered whole.
            for client in &mut busy {
                let resp = client.response().await;
                assert_eq!((resp.status, resp.body.as_slice()), (200, &b"slow"[..]));
            }
            // Once they are idle, one makes room for the new client.
            assert_eq!(newcomer.response().await.status, 200);
            eventually(|| evicted(&t.metrics().render()) == 1).await;
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_clients_at_the_cap_admit_new_ones_within_100ms() {
    const CLIENTS: usize = 10_000;
    const NEWCOMERS: usize = 20;
    let files = tether::rlimit::raise_open_files().unwrap().now;
    assert!(
        files > CLIENTS as u64 + 1_000,
        "open-file limit {files} is too low for this test"
    );
    let backend = Backend::start().await;
    let mut config = default_config(backend.addr);
    config.runtime.worker_threads = 2;
    capped(&mut config, CLIENTS, true);
    let proxy = TetherProcess::start(&config);
    let addr = proxy.listen;

    let opening = Instant::now();
    let mut oldest = idle_clients(addr, 1).await.remove(0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _rest = idle_clients(addr, CLIENTS - 1).await;
    let opened = opening.elapsed();

    let mut newcomers = Vec::with_capacity(NEWCOMERS);
    let mut slowest = Duration::ZERO;
    for _ in 0..NEWCOMERS {
        let (client, status, took) = timed_get(addr).await;
        assert_eq!(status, 200, "a new client's own request is answered");
        slowest = slowest.max(took);
        newcomers.push(client);
    }
    eprintln!(
        "{CLIENTS} idle clients opened in {opened:?}; {NEWCOMERS} new clients at the cap, \
         slowest answered in {slowest:?}"
    );
    assert!(slowest < ADMITTED_WITHIN, "admitted after {slowest:?}");
    let (_, end) = oldest.read_to_end().await;
    assert_eq!(end, End::Reset, "the longest-idle client is reset first");
    let metrics = get_once(proxy.admin(), "/metrics").await.text();
    assert_eq!(evicted(&metrics), NEWCOMERS as u64);
}
