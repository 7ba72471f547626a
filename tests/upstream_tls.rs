//! HTTPS backends (`[upstream.tls]`): an in-process rustls backend with
//! certificates made by rcgen (`common::tls`), on real loopback sockets. It
//! counts handshakes (full and resumed, as its own rustls session says),
//! requests, and how each connection ended (a `close_notify`, then a reset or
//! a FIN).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::{HandshakeKind, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use common::*;
use tether::config::{Config, TlsConfig, TlsVerify};

/// What the TLS backend saw.
#[derive(Default)]
struct Seen {
    accepted: AtomicUsize,
    full: AtomicUsize,
    resumed: AtomicUsize,
    failed_handshakes: AtomicUsize,
    requests: AtomicUsize,
    client_certs: AtomicUsize,
    key_updates: AtomicUsize,
    /// A `close_notify` read, then the socket reset.
    close_notify_then_reset: AtomicUsize,
    /// A `close_notify` read, then a FIN.
    close_notify_then_fin: AtomicUsize,
    /// The connection ended without a `close_notify`.
    unclean: AtomicUsize,
    /// Every connection that completed its handshake.
    conns: std::sync::Mutex<Vec<ConnSeen>>,
}

/// One connection as the backend saw it.
#[derive(Clone)]
struct ConnSeen {
    /// The client certificate it presented (DER), if any.
    client_cert: Option<Vec<u8>>,
    /// When each of its requests arrived.
    requests: Vec<Instant>,
    closed: Option<Instant>,
}

impl Seen {
    fn get(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::SeqCst)
    }

    fn conns(&self) -> Vec<ConnSeen> {
        self.conns.lock().unwrap().clone()
    }

    /// Connections still open that presented `cert`.
    fn open_with(&self, cert: &[u8]) -> usize {
        self.conns()
            .iter()
            .filter(|c| c.closed.is_none() && c.client_cert.as_deref() == Some(cert))
            .count()
    }

    fn on(&self, index: usize, change: impl FnOnce(&mut ConnSeen)) {
        change(&mut self.conns.lock().unwrap()[index]);
    }
}

/// Marks its connection closed however serving it ends.
struct Closes(Arc<Seen>, usize);

impl Drop for Closes {
    fn drop(&mut self) {
        self.0.on(self.1, |c| c.closed = Some(Instant::now()));
    }
}

/// A TLS backend answering `200 ok` to every GET, until told to close its
/// connections.
struct TlsBackend {
    addr: SocketAddr,
    seen: Arc<Seen>,
    close_all: tokio::sync::watch::Sender<u64>,
}

impl TlsBackend {
    /// Starts it; with `key_update`, each response is followed, that long
    /// after, by a TLS key update on the idle connection.
    async fn start(config: Arc<ServerConfig>, key_update: Option<Duration>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let (close_all, closing) = tokio::sync::watch::channel(0u64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let theirs = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                theirs.accepted.fetch_add(1, Ordering::SeqCst);
                let (acceptor, seen, closing) = (acceptor.clone(), theirs.clone(), closing.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        seen.failed_handshakes.fetch_add(1, Ordering::SeqCst);
                        return;
                    };
                    serve(tls, seen, closing, key_update).await;
                });
            }
        });
        Self {
            addr,
            seen,
            close_all,
        }
    }

    /// Every connection sends `close_notify` and FIN.
    fn close_every_connection(&self) {
        self.close_all.send_modify(|generation| *generation += 1);
    }
}

/// Serves one TLS connection.
async fn serve(
    mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    seen: Arc<Seen>,
    mut closing: tokio::sync::watch::Receiver<u64>,
    key_update: Option<Duration>,
) {
    let session = tls.get_ref().1;
    match session.handshake_kind() {
        Some(HandshakeKind::Resumed) => seen.resumed.fetch_add(1, Ordering::SeqCst),
        _ => seen.full.fetch_add(1, Ordering::SeqCst),
    };
    if session.peer_certificates().is_some() {
        seen.client_certs.fetch_add(1, Ordering::SeqCst);
    }
    let client_cert = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| cert.to_vec());
    let index = {
        let mut conns = seen.conns.lock().unwrap();
        conns.push(ConnSeen {
            client_cert,
            requests: Vec::new(),
            closed: None,
        });
        conns.len() - 1
    };
    let _closes = Closes(seen.clone(), index);
    closing.mark_unchanged();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let read = tokio::select! {
            read = tls.read(&mut buf) => read,
            _ = closing.changed() => {
                let _ = tls.shutdown().await;
                return;
            }
        };
        match read {
            Ok(0) => return ended_after_close_notify(tls, &seen).await,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(_) => {
                seen.unclean.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
        while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            head.drain(..end + 4);
            seen.requests.fetch_add(1, Ordering::SeqCst);
            seen.on(index, |c| c.requests.push(Instant::now()));
            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
            if tls.write_all(answer).await.is_err() || tls.flush().await.is_err() {
                return;
            }
            if let Some(after) = key_update {
                tokio::time::sleep(after).await;
                tls.get_mut().1.refresh_traffic_keys().unwrap();
                tls.flush().await.unwrap();
                seen.key_updates.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// After a `close_notify`: how the TCP connection under it ends.
async fn ended_after_close_notify(
    mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    seen: &Seen,
) {
    let mut byte = [0u8; 1];
    let raw = &mut tls.get_mut().0;
    match tokio::time::timeout(PATIENCE, raw.read(&mut byte)).await {
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            seen.close_notify_then_reset.fetch_add(1, Ordering::SeqCst)
        }
        Ok(Ok(0)) => seen.close_notify_then_fin.fetch_add(1, Ordering::SeqCst),
        _ => seen.unclean.fetch_add(1, Ordering::SeqCst),
    };
}

/// tether toward `backend` over TLS with `tls`, the upstream named `name`
/// (distinct per test: the TLS settings are shared process-wide by name).
fn tls_config(backend: SocketAddr, name: &str, tls: TlsConfig) -> Config {
    let mut config = config_for(backend);
    config.upstreams[0].name = name.to_owned();
    config.listeners[0].upstream = name.to_owned();
    config.upstreams[0].tls = Some(tls);
    config.validate().unwrap();
    config
}

/// `[upstream.tls]` trusting the test CA only.
fn trusting(pki: &Pki) -> TlsConfig {
    TlsConfig {
        ca: vec![pki.ca_file()],
        ..TlsConfig::default()
    }
}

async fn metrics(t: &Tether) -> String {
    get_once(t.admin(), "/metrics").await.text()
}

/// Connections tether opened to the upstream, over every endpoint.
fn opened(t: &Tether, upstream: &str) -> u64 {
    t.pools(upstream)
        .flat_map(|p| {
            p.endpoints()
                .iter()
                .map(|e| e.stats().opened.load(Ordering::SeqCst))
                .collect::<Vec<_>>()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_short_clients_cost_a_few_handshakes_and_a_refill_resumes() {
    let pki = Pki::new("tls-resume");
    let backend = TlsBackend::start(pki.server_config(false, false), None).await;
    let mut config = tls_config(backend.addr, "tls-resume", trusting(&pki));
    config.upstreams[0].pool.min_idle = 4;
    let seen = backend.seen.clone();
    with_tether(config, |t| async move {
        let addr = t.addr();
        let statuses = concurrently(8, || async move {
            let mut ok = 0;
            for _ in 0..250 {
                ok += usize::from(get_once(addr, "/").await.status == 200);
            }
            ok
        })
        .await;
        assert_eq!(statuses.iter().sum::<usize>(), 2000);
        assert_eq!(Seen::get(&seen.requests), 2000);
        let handshakes = Seen::get(&seen.full) + Seen::get(&seen.resumed);
        // The warm floor, and at most one more per concurrent client.
        assert!(
            handshakes <= 4 + 8,
            "{handshakes} handshakes for 2000 clients"
        );
        assert_eq!(handshakes as u64, opened(&t, "tls-resume"));
        let first_full = Seen::get(&seen.full);
        println!("2000 clients: {handshakes} handshakes ({first_full} full)");

        // The backend ends every connection; the pool refills its floor,
        // resuming the sessions it cached.
        let before = Seen::get(&seen.accepted);
        backend.close_every_connection();
        eventually(|| {
            Seen::get(&seen.accepted) >= before + 4 && t.pools("tls-resume").all(|p| p.is_warm())
        })
        .await;
        eventually(|| Seen::get(&seen.resumed) >= 4).await;
        let text = metrics(&t).await;
        let resumed = series_value(
            &text,
            "tether_upstream_tls_handshakes_total{upstream=\"tls-resume\",kind=\"resumed\"}",
        );
        let full = series_value(
            &text,
            "tether_upstream_tls_handshakes_total{upstream=\"tls-resume\",kind=\"full\"}",
        );
        assert_eq!(resumed as usize, Seen::get(&seen.resumed), "{text}");
        assert_eq!(full as usize, Seen::get(&seen.full), "{text}");
        assert_eq!(
            Seen::get(&seen.full),
            first_full,
            "the refill made no full handshake"
        );
        println!("after the refill: {full} full, {resumed} resumed");
        let days = series_value(
            &text,
            "tether_upstream_tls_cert_days_left{upstream=\"tls-resume\"",
        );
        assert!(
            days > 300.0,
            "rcgen's certificates are valid for years: {days}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unverifiable_backend_gets_no_request() {
    let pki = Pki::new("tls-verify");
    let backend = TlsBackend::start(pki.server_config(true, false), None).await;
    let cases = [
        ("tls-verify-system", TlsConfig::default(), "unknown-issuer"),
        (
            "tls-verify-name",
            TlsConfig {
                server_name: Some("elsewhere.example".into()),
                ..trusting(&pki)
            },
            "unknown-issuer",
        ),
    ];
    for (name, tls, reason) in cases {
        let mut config = tls_config(backend.addr, name, tls);
        config.upstreams[0].pool.min_idle = 0;
        with_tether(config, |t| async move {
            let response = get_once(t.addr(), "/").await;
            assert_tether_error(&response, 502, "upstream-tls-verify");
            let text = metrics(&t).await;
            let prefix = format!(
                "tether_upstream_tls_failures_total{{upstream=\"{name}\",reason=\"{reason}\"}}"
            );
            assert!(series_value(&text, &prefix) >= 1.0);
        })
        .await;
    }
    assert_eq!(Seen::get(&backend.seen.requests), 0);
    // The refused connections were reset, not closed: no TIME_WAIT on
    // tether's side toward the backend.
    let port = backend.addr.port();
    assert_eq!(
        time_wait_count(|s| s.remote.port() == port),
        0,
        "a failed handshake leaves no TIME_WAIT"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_server_name_is_refused_and_the_right_ca_is_trusted() {
    let pki = Pki::new("tls-name");
    let backend = TlsBackend::start(pki.server_config(false, false), None).await;
    let wrong = TlsConfig {
        server_name: Some("elsewhere.example".into()),
        ..trusting(&pki)
    };
    let mut config = tls_config(backend.addr, "tls-name-wrong", wrong);
    config.upstreams[0].pool.min_idle = 0;
    with_tether(config, |t| async move {
        let response = get_once(t.addr(), "/").await;
        assert_tether_error(&response, 502, "upstream-tls-verify");
        let text = metrics(&t).await;
        assert!(series_value(&text, "tether_upstream_tls_failures_total{upstream=\"tls-name-wrong\",reason=\"name-mismatch\"}") >= 1.0);
    })
    .await;
    assert_eq!(Seen::get(&backend.seen.requests), 0);
    let config = tls_config(backend.addr, "tls-name-right", trusting(&pki));
    with_tether(config, |t| async move {
        assert_eq!(get_once(t.addr(), "/").await.status, 200);
        let text = metrics(&t).await;
        assert_eq!(
            series_value(
                &text,
                "tether_upstream_tls_verify_disabled{upstream=\"tls-name-right\"}"
            ),
            0.0
        );
    })
    .await;
    assert_eq!(Seen::get(&backend.seen.requests), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_none_reaches_a_self_signed_backend_and_says_so() {
    let pki = Pki::new("tls-none");
    let backend = TlsBackend::start(pki.server_config(true, false), None).await;
    let tls = TlsConfig {
        verify: TlsVerify::None,
        ..TlsConfig::default()
    };
    let config = tls_config(backend.addr, "tls-none", tls);
    with_tether(config, |t| async move {
        assert_eq!(get_once(t.addr(), "/").await.status, 200);
        let text = metrics(&t).await;
        assert_eq!(
            series_value(
                &text,
                "tether_upstream_tls_verify_disabled{upstream=\"tls-none\"}"
            ),
            1.0
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_update_on_an_idle_connection_does_not_make_it_stale() {
    let pki = Pki::new("tls-idle");
    let update = Duration::from_millis(100);
    let backend = TlsBackend::start(pki.server_config(false, false), Some(update)).await;
    let mut config = tls_config(backend.addr, "tls-idle", trusting(&pki));
    config.upstreams[0].pool.min_idle = 1;
    let seen = backend.seen.clone();
    with_tether(config, |t| async move {
        // The session tickets of TLS 1.3 arrived after the handshake, while
        // the warm connection sat idle.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for round in 1..=3 {
            assert_eq!(get_once(t.addr(), "/").await.status, 200);
            eventually(|| Seen::get(&seen.key_updates) == round).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(
            Seen::get(&seen.accepted),
            1,
            "the one connection carried every request"
        );
        let endpoint = t.pools("tls-idle").next().unwrap().endpoints()[0].clone();
        assert_eq!(endpoint.stats().reused.load(Ordering::SeqCst), 3);
        assert_eq!(endpoint.stats().discarded.load(Ordering::SeqCst), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_tls_connection_ends_with_close_notify_then_reset() {
    let pki = Pki::new("tls-abort");
    let backend = TlsBackend::start(pki.server_config(false, false), None).await;
    let mut config = tls_config(backend.addr, "tls-abort", trusting(&pki));
    config.upstreams[0].pool.min_idle = 1;
    config.upstreams[0].pool.max_lifetime = Duration::from_secs(1);
    let seen = backend.seen.clone();
    let baseline = TimeWaitBaseline::now();
    with_tether(config, |t| async move {
        assert_eq!(get_once(t.addr(), "/").await.status, 200);
        eventually(|| Seen::get(&seen.close_notify_then_reset) >= 2).await;
    })
    .await;
    assert_eq!(Seen::get(&backend.seen.close_notify_then_fin), 0);
    assert_eq!(
        baseline.at_port(backend.addr.port()),
        (0, 0),
        "no TIME_WAIT on either side"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_requiring_a_client_certificate_accepts_tethers() {
    let pki = Pki::new("tls-mutual");
    let backend = TlsBackend::start(pki.server_config(false, true), None).await;
    let tls = TlsConfig {
        client_cert: Some(pki.path("client.pem")),
        client_key: Some(pki.path("client.key")),
        ..trusting(&pki)
    };
    let config = tls_config(backend.addr, "tls-mutual", tls);
    with_tether(config, |t| async move {
        assert_eq!(get_once(t.addr(), "/").await.status, 200);
        let text = metrics(&t).await;
        assert!(
            series_value(
                &text,
                "tether_upstream_tls_client_cert_days_left{upstream=\"tls-mutual\"}"
            ) > 300.0
        );
    })
    .await;
    assert!(Seen::get(&backend.seen.client_certs) >= 1);
    assert_eq!(Seen::get(&backend.seen.failed_handshakes), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_upstreams_negotiate_h2_over_tls() {
    let pki = Pki::new("tls-h2");
    let mut server = ServerConfig::clone(&pki.server_config(false, false));
    server.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let negotiated = Arc::new(AtomicUsize::new(0));
    let theirs = negotiated.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                theirs.fetch_add(1, Ordering::SeqCst);
            }
            let service = hyper::service::service_fn(|_request| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from_static(b"ok"),
                )))
            });
            let builder =
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
            tokio::spawn(async move {
                let _ = builder
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    let mut config = tls_config(addr, "tls-h2", trusting(&pki));
    config.upstreams[0].protocol = tether::config::Protocol::Http2;
    config.upstreams[0].pool.min_idle = 1;
    with_tether(config, |t| async move {
        for _ in 0..3 {
            let response = get_once(t.addr(), "/").await;
            assert_eq!((response.status, response.text()), (200, "ok".to_owned()));
        }
    })
    .await;
    assert_eq!(
        negotiated.load(Ordering::SeqCst),
        1,
        "one h2 connection carried every request"
    );
}

/// Connection-per-request clients through tether until `stop` is set: how
/// many requests got a 200 and how many did not.
fn steady_load(
    addr: SocketAddr,
    clients: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(usize, usize)> {
    tokio::spawn(async move {
        let loops = (0..clients).map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0, 0);
                while !stop.load(Ordering::SeqCst) {
                    match get_once(addr, "/").await.status {
                        200 => ok += 1,
                        _ => failed += 1,
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (ok, failed)
            })
        });
        let mut total = (0, 0);
        for done in loops.collect::<Vec<_>>() {
            let (ok, failed) = done.await.unwrap();
            total = (total.0 + ok, total.1 + failed);
        }
        total
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_rotated_under_load_reaches_every_pooled_connection_within_the_window()
{
    let pki = Pki::new("tls-rotate");
    let old_der = tether::config::read_certificates(&pki.path("client.pem").display().to_string())
        .unwrap()[0]
        .to_vec();
    let backend = TlsBackend::start(pki.server_config(false, true), None).await;
    let window = Duration::from_secs(3);
    let tls = TlsConfig {
        client_cert: Some(pki.path("client.pem")),
        client_key: Some(pki.path("client.key")),
        rotation_window: window,
        ..trusting(&pki)
    };
    let mut config = tls_config(backend.addr, "tls-rotate", tls);
    config.upstreams[0].pool.min_idle = 4;
    let seen = backend.seen.clone();
    with_tether(config, |t| async move {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let load = steady_load(t.addr(), 3, stop.clone());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = seen.open_with(&old_der);
        assert!(before >= 4, "the warm floor presents the first certificate");

        let new_der = pki.issue_client("tether-client-2", None, "client");
        let rotated = Instant::now();
        // Within the window (plus the look each second and the settling),
        // no pooled connection presents the old certificate.
        eventually_within(window + Duration::from_secs(4), || {
            seen.open_with(&old_der) == 0 && seen.open_with(&new_der) >= 1
        })
        .await;
        let rolled = rotated.elapsed();
        let requests_on_old = |seen: &Seen| -> usize {
            seen.conns()
                .iter()
                .filter(|c| c.client_cert.as_deref() == Some(&old_der[..]))
                .map(|c| c.requests.len())
                .sum()
        };
        let old_served = requests_on_old(&seen);
        tokio::time::sleep(Duration::from_millis(700)).await;
        stop.store(true, Ordering::SeqCst);
        let (ok, failed) = load.await.unwrap();
        assert_eq!(failed, 0, "{ok} answered, {failed} failed");
        assert_eq!(
            requests_on_old(&seen),
            old_served,
            "the old certificate is out of use"
        );
        assert!(
            seen.open_with(&new_der) >= 4,
            "the floor presents the new one"
        );
        let text = metrics(&t).await;
        let applied =
            "tether_upstream_tls_rotations_total{upstream=\"tls-rotate\",result=\"applied\"}";
        assert_eq!(series_value(&text, applied), 1.0, "{text}");
        let old_closes: Vec<Duration> = seen
            .conns()
            .iter()
            .filter(|c| c.client_cert.as_deref() == Some(&old_der[..]))
            .filter_map(|c| c.closed.map(|at| at.saturating_duration_since(rotated)))
            .collect();
        let first = old_closes.iter().min().copied().unwrap_or_default();
        println!(
            "rotation under load: {ok} requests, {failed} failed; {} connections with the \
             old certificate closed from {first:?} to {rolled:?} after the files changed \
             (window {window:?})",
            old_closes.len()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_pooled_connection_outlives_its_client_certificate() {
    let pki = Pki::new("tls-expiry");
    let not_after = time::OffsetDateTime::now_utc() + time::Duration::seconds(6);
    let der = pki.issue_client("short-lived", Some(not_after), "short");
    // The certificate's notAfter (whole seconds), as this clock sees it.
    let left = time::OffsetDateTime::from_unix_timestamp(not_after.unix_timestamp()).unwrap()
        - time::OffsetDateTime::now_utc();
    let expires = Instant::now() + Duration::try_from(left).unwrap();
    let backend = TlsBackend::start(pki.server_config(false, true), None).await;
    let tls = TlsConfig {
        client_cert: Some(pki.path("short.pem")),
        client_key: Some(pki.path("short.key")),
        ..trusting(&pki)
    };
    let mut config = tls_config(backend.addr, "tls-expiry", tls);
    config.upstreams[0].pool.min_idle = 2;
    let seen = backend.seen.clone();
    with_tether(config, |t| async move {
        assert_eq!(get_once(t.addr(), "/").await.status, 200);
        assert!(seen.open_with(&der) >= 2);
        tokio::time::sleep_until((expires + Duration::from_millis(500)).into()).await;
        for conn in seen.conns() {
            let closed = conn.closed.expect("closed by the certificate's expiry");
            assert!(closed < expires, "closed {:?} after expiry", closed - expires);
            assert!(conn.requests.iter().all(|at| *at < expires));
        }
        // Past expiry the backend refuses the certificate: no request goes
        // out on a connection made with it.
        let resp = get_once(t.addr(), "/").await;
        assert_tether_error(&resp, 502, "upstream-tls-handshake");
        let text = metrics(&t).await;
        let refused = "tether_upstream_tls_failures_total{upstream=\"tls-expiry\",reason=\"client-cert-expired\"}";
        assert!(series_value(&text, refused) >= 1.0, "{text}");
        let dialled = seen.conns().len();
        assert!(dialled <= 4, "no dial after dial near expiry: {dialled} connections");
        assert!(seen.conns().iter().all(|c| c.requests.iter().all(|at| *at < expires)));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_new_files_are_refused_and_the_ones_in_use_stay() {
    let pki = Pki::new("tls-refuse");
    let backend = TlsBackend::start(pki.server_config(false, true), None).await;
    let tls = TlsConfig {
        client_cert: Some(pki.path("client.pem")),
        client_key: Some(pki.path("client.key")),
        ..trusting(&pki)
    };
    let config = tls_config(backend.addr, "tls-refuse", tls);
    let seen = backend.seen.clone();
    with_tether(config, |t| async move {
        assert_eq!(get_once(t.addr(), "/").await.status, 200);
        let series = |result: &str| {
            format!("tether_upstream_tls_rotations_total{{upstream=\"tls-refuse\",result=\"{result}\"}}")
        };
        // A key that is not PEM: the files in use stay.
        let staged = pki.path(".client.key.new");
        std::fs::write(&staged, "not a key").unwrap();
        std::fs::rename(&staged, pki.path("client.key")).unwrap();
        let mut text = String::new();
        for _ in 0..50 {
            text = metrics(&t).await;
            if series_value(&text, &series("refused")) >= 1.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(series_value(&text, &series("refused")), 1.0, "{text}");
        assert_eq!(series_value(&text, &series("applied")), 0.0);
        // New connections still present the certificate in use.
        let before = seen.conns().len();
        backend.close_every_connection();
        eventually(|| seen.conns().len() >= before + 2).await;
        assert_eq!(get_once(t.addr(), "/").await.status, 200);
        assert_eq!(Seen::get(&seen.failed_handshakes), 0);
        // An expired certificate would stop every new connection: refused.
        let expired = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        pki.issue_client("tether-client-expired", Some(expired), "client");
        let refused_at = |n: f64| {
            let series = series("refused");
            let t = &t;
            async move {
                for _ in 0..80 {
                    if series_value(&metrics(t).await, &series) >= n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        refused_at(2.0).await;
        text = metrics(&t).await;
        assert!(series_value(&text, &series("refused")) >= 2.0, "{text}");
        assert_eq!(series_value(&text, &series("applied")), 0.0);
        // A good pair is taken.
        pki.issue_client("tether-client-3", None, "client");
        for _ in 0..50 {
            text = metrics(&t).await;
            if series_value(&text, &series("applied")) >= 1.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(series_value(&text, &series("applied")), 1.0, "{text}");
        // The same bytes written again (a periodic copy) roll nothing over.
        for file in ["client.pem", "client.key"] {
            let staged = pki.path(&format!(".{file}.same"));
            std::fs::copy(pki.path(file), &staged).unwrap();
            std::fs::rename(&staged, pki.path(file)).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
        text = metrics(&t).await;
        assert_eq!(series_value(&text, &series("applied")), 1.0, "{text}");
    })
    .await;
}
