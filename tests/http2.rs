//! HTTP/2 upstreams: HTTP/1.x clients carried as streams over a few
//! connections, the peer's stream limit respected, GOAWAY invisible to clients,
//! and PING evicting a connection that stopped answering.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tether::config::Protocol;
use tokio_util::sync::CancellationToken;

/// An HTTP/2 (prior knowledge) backend that answers after a short pause.
struct H2Backend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    goaway: Arc<Mutex<CancellationToken>>,
}

impl H2Backend {
    async fn start(max_streams: u32, pause: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let goaway = Arc::new(Mutex::new(CancellationToken::new()));
        let (a, r, g) = (accepted.clone(), requests.clone(), goaway.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let requests = r.clone();
                let token = g.lock().unwrap().clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        let requests = requests.clone();
                        async move {
                            requests.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(pause).await;
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                Bytes::from_static(b"hello h2"),
                            )))
                        }
                    });
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(max_streams)
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = token.cancelled() => {
                            // GOAWAY: streams in flight finish, new ones go elsewhere.
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            accepted,
            requests,
            goaway,
        }
    }

    fn send_goaway(&self) {
        let mut token = self.goaway.lock().unwrap();
        token.cancel();
        *token = CancellationToken::new();
    }
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
    let backend = H2Backend::start(500, Duration::from_millis(300)).await;
    let (running, addr) = start_tether(h2_config(backend.addr)).await;
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        tasks.push(tokio::spawn(async move { get_once(addr, "/").await }));
    }
    for t in tasks {
        let resp = t.await.unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.body, b"hello h2");
    }
    assert_eq!(backend.requests.load(Ordering::SeqCst), 1000);
    let accepted = backend.accepted.load(Ordering::SeqCst);
    eprintln!("1000 concurrent requests over {accepted} HTTP/2 connections");
    assert!(accepted <= 2, "{accepted} upstream connections");
    running.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_mid_load_costs_clients_nothing() {
    let backend = H2Backend::start(100, Duration::from_millis(20)).await;
    let (running, addr) = start_tether(h2_config(backend.addr)).await;
    let failures = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let failures = failures.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..40 {
                let resp = get_once(addr, "/").await;
                if resp.status != 200 {
                    eprintln!("error: {} {}", resp.status, resp.text());
                    failures.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        backend.send_goaway();
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::SeqCst), 0);
    assert!(
        backend.accepted.load(Ordering::SeqCst) >= 2,
        "GOAWAY moved traffic to new connections"
    );
    running.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_ping_evicts_the_connection() {
    let backend = H2Backend::start(100, Duration::ZERO).await;
    let relay = Relay::start(backend.addr).await;
    let mut config = h2_config(relay.addr);
    config.upstreams[0].keepalive.ping_interval = Duration::from_secs(1);
    config.upstreams[0].keepalive.ping_timeout = Duration::from_secs(1);
    let (running, addr) = start_tether(config).await;
    assert_eq!(get_once(addr, "/").await.status, 200);
    assert_eq!(backend.accepted.load(Ordering::SeqCst), 1);

    relay.black_hole_existing();
    let started = tokio::time::Instant::now();
    // The floor is refilled with a new connection once the old one is evicted.
    wait_until(Duration::from_secs(5), || {
        backend.accepted.load(Ordering::SeqCst) == 2
    })
    .await;
    eprintln!("evicted and replaced within {:?}", started.elapsed());
    assert!(started.elapsed() <= Duration::from_millis(3500));
    for _ in 0..5 {
        assert_eq!(get_once(addr, "/").await.status, 200);
    }
    running.drain().await;
}
