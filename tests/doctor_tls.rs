//! `tether doctor --tls` as an operator runs it: the binary against
//! in-process rustls backends on loopback, with a CA and a server
//! certificate made here by rcgen. The backend counts its own handshakes
//! (full and resumed, as its rustls session says) and how each connection
//! ended, so the report is checked against the other side.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::NoServerSessionStorage;
use rustls::{HandshakeKind, ServerConfig};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use common::*;

/// The name the server's certificate is for.
const NAME: &str = "backend.test";
/// Days the server's certificate has left (and half a day more).
const LEAF_DAYS: u64 = 90;
const DAY: u64 = 86_400;

/// A test CA and a server certificate it signed for [`NAME`], valid for
/// [`LEAF_DAYS`] more days; the CA's PEM file.
struct Pki {
    dir: TempDir,
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
}

impl Pki {
    fn new(label: &str) -> Self {
        let dir = TempDir::new(label);
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "tether doctor test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![NAME.to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, NAME);
        let now = rcgen::date_time_ymd(1970, 1, 1)
            + SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        params.not_before = now - Duration::from_secs(DAY);
        params.not_after = now + Duration::from_secs(LEAF_DAYS * DAY + DAY / 2);
        let leaf = params.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Self {
            dir,
            chain: vec![leaf.der().clone(), ca.der().clone()],
            key: key.serialize_der(),
        }
    }

    fn ca_file(&self) -> String {
        self.dir.path().join("ca.pem").display().to_string()
    }

    /// The backend's settings: h2 and http/1.1 by ALPN; with `resumption`,
    /// stateless session tickets, else no ticketer, no session storage and
    /// no TLS 1.3 ticket.
    fn server_config(&self, resumption: bool) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()));
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        if resumption {
            config.ticketer = rustls::crypto::ring::Ticketer::new().unwrap();
        } else {
            config.session_storage = Arc::new(NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
        }
        Arc::new(config)
    }
}

/// What the backend saw.
#[derive(Default)]
struct Seen {
    full: AtomicUsize,
    resumed: AtomicUsize,
    /// Connections the client ended with `close_notify`.
    close_notify: AtomicUsize,
}

/// A TLS backend: it completes each handshake, sends its session tickets,
/// and reads until the client ends the connection.
async fn backend(config: Arc<ServerConfig>) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let theirs = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), theirs.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                match tls.get_ref().1.handshake_kind() {
                    Some(HandshakeKind::Resumed) => &seen.resumed,
                    _ => &seen.full,
                }
                .fetch_add(1, Ordering::SeqCst);
                let _ = tls.flush().await;
                let mut buf = [0u8; 1024];
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) => {
                            seen.close_notify.fetch_add(1, Ordering::SeqCst);
                            let _ = tls.shutdown().await;
                            return;
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Runs `tether doctor --tls ADDR ARGS`: its exit code, stdout and stderr.
async fn doctor(addr: SocketAddr, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::from(tether_command())
        .args(["doctor", "--tls", &addr.to_string()])
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`doctor`] with `--json`: its exit code and report, and its stderr.
async fn doctor_json(addr: SocketAddr, args: &[&str]) -> (i32, Value, String) {
    let mut args = args.to_vec();
    args.push("--json");
    let (code, stdout, stderr) = doctor(addr, &args).await;
    let report = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}\nstderr: {stderr}"));
    (code, report, stderr)
}

fn advice(report: &Value) -> Vec<String> {
    report["advice"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

/// The chain is the one the backend sends: its certificate, then the CA's.
fn assert_chain_shown(report: &Value) {
    let chain = report["chain"].as_array().unwrap();
    assert_eq!(chain.len(), 2, "{report:#}");
    assert_eq!(chain[0]["subject"], format!("CN={NAME}"));
    assert_eq!(chain[0]["issuer"], "CN=tether doctor test CA");
    assert_eq!(chain[1]["subject"], "CN=tether doctor test CA");
    let days = chain[0]["days_left"].as_i64().unwrap();
    assert!(
        (LEAF_DAYS as i64 - 1..=LEAF_DAYS as i64).contains(&days),
        "{days} days left, rcgen was told {LEAF_DAYS}"
    );
    assert_eq!(report["names"]["dns"], serde_json::json!([NAME]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_backend_shows_its_chain_h2_and_a_resumed_second_handshake() {
    let pki = Pki::new("doctor-tls-ok");
    let (addr, seen) = backend(pki.server_config(true)).await;
    let ca = pki.ca_file();
    let (code, report, stderr) = doctor_json(addr, &["--server-name", NAME, "--ca", &ca]).await;
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(report["verification"]["ok"], true, "{report:#}");
    assert_eq!(report["verification"]["reason"], Value::Null);
    assert_chain_shown(&report);
    assert_eq!(report["names"]["matches"], true);
    assert_eq!(
        (&report["server_name"], &report["sni"]),
        (&NAME.into(), &NAME.into())
    );
    assert_eq!(report["session"]["version"], "1.3");
    assert_eq!(report["session"]["alpn"], "h2");
    assert!(report["session"]["cipher_suite"]
        .as_str()
        .unwrap()
        .starts_with("TLS13_"));
    assert_eq!(report["resumption"]["resumed"], true, "{report:#}");
    assert!(report["resumption"]["session_tickets"].as_u64().unwrap() >= 1);
    let advice = advice(&report);
    assert!(
        !advice.iter().any(|a| a.contains("no resumption")),
        "{advice:?}"
    );
    assert!(
        advice.iter().any(|a| a.starts_with("verified:")),
        "{advice:?}"
    );
    // The backend's own view: one full handshake, one resumed, both
    // connections ended with close_notify.
    // The doctor may exit before the backend has read its last Finished:
    // both connections' ends, seen here, come after both handshakes' counts.
    eventually(|| seen.close_notify.load(Ordering::SeqCst) == 2).await;
    assert_eq!(seen.full.load(Ordering::SeqCst), 1);
    assert_eq!(seen.resumed.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_ca_the_system_roots_refuse_it_and_the_chain_is_still_shown() {
    let pki = Pki::new("doctor-tls-system");
    let (addr, _seen) = backend(pki.server_config(true)).await;
    let (code, report, stderr) = doctor_json(addr, &["--server-name", NAME]).await;
    assert_ne!(code, 0, "{report:#}");
    assert_eq!(report["verification"]["ok"], false);
    assert_eq!(report["verification"]["reason"], "unknown-issuer");
    assert_eq!(report["trust"]["sources"], serde_json::json!(["system"]));
    assert_chain_shown(&report);
    assert_eq!(report["names"]["matches"], true, "the name is right");
    assert_eq!(report["session"]["version"], "1.3");
    assert!(stderr.contains("unknown-issuer"), "{stderr}");
    assert!(
        advice(&report).iter().any(|a| a.contains("unknown issuer")),
        "{report:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_server_name_is_a_name_mismatch() {
    let pki = Pki::new("doctor-tls-name");
    let (addr, _seen) = backend(pki.server_config(true)).await;
    let ca = pki.ca_file();
    let (code, report, _) =
        doctor_json(addr, &["--server-name", "elsewhere.test", "--ca", &ca]).await;
    assert_ne!(code, 0, "{report:#}");
    assert_eq!(report["verification"]["reason"], "name-mismatch");
    assert_eq!(report["names"]["matches"], false);
    assert_eq!(report["sni"], "elsewhere.test");
    assert_chain_shown(&report);
    assert!(
        advice(&report)
            .iter()
            .any(|a| a.contains("name mismatch") && a.contains("tls.server_name")),
        "{report:#}"
    );
    // An IP target without --server-name is verified against IP SANs, and
    // the certificate has none.
    let (code, report, _) = doctor_json(addr, &["--ca", &ca]).await;
    assert_ne!(code, 0, "{report:#}");
    assert_eq!(report["verification"]["reason"], "name-mismatch");
    assert_eq!(report["server_name"], "127.0.0.1");
    assert_eq!(report["sni"], Value::Null, "no SNI for an IP address");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_without_resumption_is_told_every_connection_pays_a_full_handshake() {
    let pki = Pki::new("doctor-tls-noresume");
    let (addr, seen) = backend(pki.server_config(false)).await;
    let ca = pki.ca_file();
    let started = std::time::Instant::now();
    let (code, report, stderr) = doctor_json(addr, &["--server-name", NAME, "--ca", &ca]).await;
    assert_eq!(code, 0, "verified, only slower: {report:#}\n{stderr}");
    assert!(
        started.elapsed() < PATIENCE,
        "the wait for tickets is bounded"
    );
    assert_eq!(report["resumption"]["resumed"], false);
    assert_eq!(report["resumption"]["session_tickets"], 0);
    assert!(
        advice(&report).iter().any(|a| a.contains("no resumption")
            && a.contains("every new pooled connection pays a full handshake")),
        "{report:#}"
    );
    eventually(|| seen.close_notify.load(Ordering::SeqCst) == 2).await;
    assert_eq!(seen.full.load(Ordering::SeqCst), 2);
    assert_eq!(seen.resumed.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_for_people_shows_chain_names_verdict_and_session() {
    let pki = Pki::new("doctor-tls-text");
    let (addr, _seen) = backend(pki.server_config(true)).await;
    let ca = pki.ca_file();
    let (code, text, stderr) = doctor(
        addr,
        &["--server-name", NAME, "--ca", &ca, "--alpn", "http/1.1"],
    )
    .await;
    println!("{text}");
    assert_eq!(code, 0, "{text}\n{stderr}");
    for expected in [
        "Certificate chain sent by the server:",
        &format!("subject    CN={NAME}"),
        "issuer     CN=tether doctor test CA",
        "Verification: ok",
        "TLS version     1.3",
        "ALPN            http/1.1",
        "second connect  resumed",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    let (code, text, stderr) = doctor(addr, &["--server-name", NAME]).await;
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("Verification: FAILED, unknown-issuer"),
        "{text}"
    );
    assert!(text.contains(&format!("subject    CN={NAME}")), "{text}");
    assert!(
        stderr.contains("is not verified: unknown-issuer"),
        "{stderr}"
    );
}
