//! `tether doctor --tls HOST:PORT`: what an `[upstream.tls]` pointed at a
//! backend would meet there. Two handshakes with the settings the pool uses
//! (rustls, ring, TLS 1.2 and 1.3): the first shows the chain, the names, the
//! verdict of verification and the session; the second, from the same
//! session cache, shows whether the backend lets connections resume.
//!
//! Verification is recorded, not enforced, so that a backend tether would
//! refuse is still shown in full (see `Recorder`).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, Resumption, Tls12ClientSessionValue,
    Tls13ClientSessionValue, WebPkiServerVerifier,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, DigitallySignedStruct, HandshakeKind, NamedGroup, ProtocolVersion, RootCertStore,
    SignatureScheme,
};
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::client::TlsStream;

use crate::config::{read_certificates, split_host_port, SYSTEM_ROOTS};
use crate::pool::{certificate_reason, days_left};

/// The ALPN protocols offered unless told otherwise: those of tether's two
/// upstream protocols, h2 first, so the report says whether `protocol =
/// "http2"` would work.
pub const DEFAULT_ALPN: [&str; 2] = ["h2", "http/1.1"];

/// How long the first connection waits for TLS 1.3 session tickets, which a
/// backend sends after the handshake (one round trip after our `Finished`).
/// A backend that sends none costs the check this much.
const TICKET_WAIT: Duration = Duration::from_secs(1);

/// A certificate with fewer days left than this gets a line of advice: a
/// month leaves time to renew it through a change process.
const EXPIRY_WARNING_DAYS: i64 = 30;

/// Sessions the check's cache holds; it makes two connections to one name.
const SESSIONS: usize = 4;

/// What to check and how.
#[derive(Debug, Clone)]
pub struct TlsCheckOptions {
    /// The backend, `host:port` (an IPv6 address in brackets).
    pub target: String,
    /// The name sent as SNI and verified in the certificate. `None`: the
    /// host when it is a DNS name; an IP address sends no SNI and is verified
    /// against the certificate's IP addresses (as the pool does).
    pub server_name: Option<String>,
    /// Trust anchors: PEM files and/or `"system"` (the platform's store, as
    /// `tls.ca` says it). Empty: the platform's store.
    pub ca: Vec<String>,
    /// ALPN protocols offered, in order of preference (empty: none).
    pub alpn: Vec<String>,
    /// The limit of each step: resolving the host, each connect, each
    /// handshake.
    pub timeout: Duration,
}

/// Why the check could not be made, or failed. Each message carries its cause
/// (there is no separate `source`), so it reads whole on its own.
#[derive(Debug, thiserror::Error)]
pub enum DoctorTlsError {
    /// The target is not `host:port`.
    #[error("{0}")]
    Target(String),
    /// The host could not be resolved.
    #[error("cannot resolve {host}: {error}")]
    Resolve {
        /// The host asked for.
        host: String,
        /// What the resolver said.
        error: std::io::Error,
    },
    /// The host resolved to no address.
    #[error("{host} resolves to no address")]
    NoAddress {
        /// The host asked for.
        host: String,
    },
    /// The server name is neither a DNS name nor an IP address.
    #[error("{name:?} is not a DNS name or IP address")]
    ServerName {
        /// The name given.
        name: String,
    },
    /// A CA file could not be used.
    #[error("{0}")]
    Ca(String),
    /// rustls refused the settings.
    #[error("cannot set up TLS: {0}")]
    Setup(rustls::Error),
    /// The TCP connect failed.
    #[error("connect to {addr} failed: {error}")]
    Connect {
        /// The address dialled.
        addr: SocketAddr,
        /// What the socket said.
        error: std::io::Error,
    },
    /// A step took longer than the timeout.
    #[error("{step} with {target} timed out after {}", humantime::format_duration(*.timeout))]
    Timeout {
        /// What was under way: "resolving", "connect", "TLS handshake".
        step: &'static str,
        /// The host or address.
        target: String,
        /// The limit that passed.
        timeout: Duration,
    },
    /// The TLS handshake failed (an alert, no common version or cipher
    /// suite, a bad signature, the connection closed).
    #[error("TLS handshake with {addr} failed: {error}")]
    Handshake {
        /// The address dialled.
        addr: SocketAddr,
        /// What rustls or the socket said.
        error: std::io::Error,
    },
    /// The handshake completed but the certificate would not be accepted.
    #[error("the certificate of {addr} is not verified: {reason} ({detail})")]
    Unverified {
        /// The address dialled.
        addr: SocketAddr,
        /// The label, as in `tether_upstream_tls_failures_total{reason}`.
        reason: &'static str,
        /// What rustls said.
        detail: String,
    },
}

/// The report, as printed with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct TlsReport {
    /// The target as given.
    pub target: String,
    /// The address connected to.
    pub address: SocketAddr,
    /// The name verified in the certificate (a DNS name or an IP address).
    pub server_name: String,
    /// The SNI sent: the server name when it is a DNS name, else none.
    pub sni: Option<String>,
    /// The trust anchors used.
    pub trust: Trust,
    /// The ALPN protocols offered.
    pub alpn_offered: Vec<String>,
    /// The certificates the server sent, its own first.
    pub chain: Vec<CertificateInfo>,
    /// The names in the server's own certificate.
    pub names: LeafNames,
    /// The verdict of verification.
    pub verification: Verification,
    /// What the first handshake agreed.
    pub session: Session,
    /// What the second handshake, with the first one's session cache, did.
    pub resumption: ResumptionCheck,
    /// Plain-language advice.
    pub advice: Vec<String>,
}

/// The trust anchors a check used.
#[derive(Debug, Clone, Serialize)]
pub struct Trust {
    /// `"system"` and/or the PEM files, as given.
    pub sources: Vec<String>,
    /// Certificates loaded from them.
    pub anchors: usize,
}

/// One certificate of the chain.
#[derive(Debug, Clone, Serialize)]
pub struct CertificateInfo {
    /// Its subject's distinguished name ("CN=backend.example").
    pub subject: String,
    /// Its issuer's distinguished name.
    pub issuer: String,
    /// Start of validity, RFC 3339.
    pub not_before: String,
    /// End of validity, RFC 3339.
    pub not_after: String,
    /// Whole days until `not_after` (negative once expired).
    pub days_left: Option<i64>,
}

/// The subject alternative names of the server's certificate.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LeafNames {
    /// DNS names (wildcards as written).
    pub dns: Vec<String>,
    /// IP addresses.
    pub ip: Vec<IpAddr>,
    /// Whether the server name is among them.
    pub matches: bool,
}

/// Whether tether would accept the certificate.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// Accepted: the chain leads to an anchor, the name matches, the dates hold.
    pub ok: bool,
    /// Why not: "unknown-issuer", "name-mismatch", "expired", "not-yet-valid", …
    pub reason: Option<&'static str>,
    /// What rustls said.
    pub detail: Option<String>,
}

/// What a handshake agreed.
#[derive(Debug, Clone, Serialize)]
pub struct Session {
    /// "1.3" or "1.2".
    pub version: String,
    /// The cipher suite ("TLS13_AES_256_GCM_SHA384").
    pub cipher_suite: String,
    /// The ALPN protocol agreed, if any.
    pub alpn: Option<String>,
    /// How the backend ended the first connection while it was waited on
    /// for session tickets (an alert after the handshake), if it did.
    pub ended_by_backend: Option<String>,
}

/// The second handshake.
#[derive(Debug, Clone, Serialize)]
pub struct ResumptionCheck {
    /// TLS 1.3 session tickets the first connection received.
    pub session_tickets: usize,
    /// Whether the second handshake resumed the first one's session.
    pub resumed: bool,
    /// Why the second connection failed, if it did.
    pub error: Option<String>,
}

/// Runs the check: two connections to the target, each closed with
/// `close_notify`. A failed verification is in the report (see
/// [`TlsReport::verdict`]); a failed connect or handshake is the error.
pub async fn check(options: &TlsCheckOptions) -> Result<TlsReport, DoctorTlsError> {
    let (host, port) = split_host_port(&options.target).map_err(DoctorTlsError::Target)?;
    let address = resolve(&host, port, options.timeout).await?;
    let name = server_name(options.server_name.as_deref(), &host)?;
    let (roots, trust) = anchors(&options.ca)?;
    let probe = Probe::new(roots, &options.alpn)?;
    let mut first = probe.handshake(address, &name, options.timeout).await?;
    let session = first.get_ref().1;
    let presented = probe.recorder.take().unwrap_or_else(|| Presented {
        chain: session
            .peer_certificates()
            .map(<[_]>::to_vec)
            .unwrap_or_default(),
        verdict: Err(rustls::Error::General(
            "the server presented no certificate to verify".to_owned(),
        )),
    });
    let mut session = session_of(session);
    // TLS 1.3 tickets come after the handshake: closing at once would leave
    // the cache empty and report no resumption for a backend that has it.
    if session.version == "1.3" {
        let wait = TICKET_WAIT.min(options.timeout);
        session.ended_by_backend = await_tickets(&mut first, &probe.store, wait).await;
    }
    close(first, options.timeout).await;
    let session_tickets = probe.store.tickets.load(Ordering::Relaxed);
    let resumption = probe
        .resumption(address, &name, options.timeout, session_tickets)
        .await;
    let mut report = TlsReport {
        target: options.target.clone(),
        address,
        server_name: name_text(&name),
        sni: matches!(name, ServerName::DnsName(_)).then(|| name_text(&name)),
        trust,
        alpn_offered: options.alpn.clone(),
        chain: presented.chain.iter().map(CertificateInfo::of).collect(),
        names: leaf_names(presented.chain.first(), &name),
        verification: verification(&presented.verdict),
        session,
        resumption,
        advice: Vec::new(),
    };
    report.advice = advice(&report, options);
    Ok(report)
}

/// The first address `host` resolves to.
async fn resolve(host: &str, port: u16, timeout: Duration) -> Result<SocketAddr, DoctorTlsError> {
    let found = tokio::time::timeout(timeout, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| DoctorTlsError::Timeout {
            step: "resolving",
            target: host.to_owned(),
            timeout,
        })?
        .map_err(|error| DoctorTlsError::Resolve {
            host: host.to_owned(),
            error,
        })?
        .next();
    found.ok_or_else(|| DoctorTlsError::NoAddress {
        host: host.to_owned(),
    })
}

/// The name to verify: the one given, else the host (DNS name or IP).
fn server_name(given: Option<&str>, host: &str) -> Result<ServerName<'static>, DoctorTlsError> {
    let name = given.unwrap_or(host);
    ServerName::try_from(name.to_owned()).map_err(|_| DoctorTlsError::ServerName {
        name: name.to_owned(),
    })
}

fn name_text(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(dns) => dns.as_ref().to_owned(),
        ServerName::IpAddress(ip) => IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

/// The trust anchors of `ca` (empty: the platform's store), read as the
/// pool reads `tls.ca`.
fn anchors(ca: &[String]) -> Result<(RootCertStore, Trust), DoctorTlsError> {
    let sources = if ca.is_empty() {
        vec![SYSTEM_ROOTS.to_owned()]
    } else {
        ca.to_vec()
    };
    let mut roots = RootCertStore::empty();
    for source in &sources {
        if source == SYSTEM_ROOTS {
            // Unreadable parts of the store leave fewer anchors, which the
            // report counts.
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            continue;
        }
        for cert in read_certificates(source).map_err(DoctorTlsError::Ca)? {
            roots
                .add(cert)
                .map_err(|e| DoctorTlsError::Ca(format!("{source:?}: {e}")))?;
        }
    }
    let anchors = roots.len();
    Ok((roots, Trust { sources, anchors }))
}

/// The settings of both handshakes, with the recorder and session cache they
/// share.
struct Probe {
    config: Arc<ClientConfig>,
    recorder: Arc<Recorder>,
    store: Arc<CountingStore>,
}

impl Probe {
    fn new(roots: RootCertStore, alpn: &[String]) -> Result<Self, DoctorTlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // No anchor at all (an empty system store): nothing can be verified,
        // which the recorder reports as an unknown issuer.
        let webpki = if roots.is_empty() {
            None
        } else {
            let built =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| DoctorTlsError::Ca(e.to_string()))?;
            Some(built)
        };
        let recorder = Arc::new(Recorder {
            provider: provider.clone(),
            webpki,
            presented: Mutex::new(None),
        });
        let store = Arc::new(CountingStore::default());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(DoctorTlsError::Setup)?
            .dangerous()
            .with_custom_certificate_verifier(recorder.clone())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.clone().into_bytes()).collect();
        config.resumption = Resumption::store(store.clone());
        Ok(Self {
            config: Arc::new(config),
            recorder,
            store,
        })
    }

    /// Connects and completes a handshake, each within `timeout`.
    async fn handshake(
        &self,
        addr: SocketAddr,
        name: &ServerName<'static>,
        timeout: Duration,
    ) -> Result<TlsStream<TcpStream>, DoctorTlsError> {
        let timed_out = |step| DoctorTlsError::Timeout {
            step,
            target: addr.to_string(),
            timeout,
        };
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| timed_out("connect"))?
            .map_err(|error| DoctorTlsError::Connect { addr, error })?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        tokio::time::timeout(timeout, connector.connect(name.clone(), tcp))
            .await
            .map_err(|_| timed_out("TLS handshake"))?
            .map_err(|error| DoctorTlsError::Handshake { addr, error })
    }

    /// The second handshake, from the session cache the first one filled.
    async fn resumption(
        &self,
        addr: SocketAddr,
        name: &ServerName<'static>,
        timeout: Duration,
        session_tickets: usize,
    ) -> ResumptionCheck {
        let (resumed, error) = match self.handshake(addr, name, timeout).await {
            Ok(stream) => {
                let kind = stream.get_ref().1.handshake_kind();
                close(stream, timeout).await;
                (kind == Some(HandshakeKind::Resumed), None)
            }
            Err(e) => (false, Some(e.to_string())),
        };
        ResumptionCheck {
            session_tickets,
            resumed,
            error,
        }
    }
}

/// What the first handshake agreed.
fn session_of(session: &rustls::ClientConnection) -> Session {
    let version = match session.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => "1.3".to_owned(),
        Some(ProtocolVersion::TLSv1_2) => "1.2".to_owned(),
        Some(other) => format!("{other:?}"),
        None => "unknown".to_owned(),
    };
    let cipher_suite = session
        .negotiated_cipher_suite()
        .map(|s| s.suite())
        .map_or_else(
            || "unknown".to_owned(),
            |s| s.as_str().map_or_else(|| format!("{s:?}"), str::to_owned),
        );
    Session {
        version,
        cipher_suite,
        alpn: session
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        ended_by_backend: None,
    }
}

/// Reads the first connection until a TLS 1.3 session ticket has been
/// stored, the backend ends it, or `wait` passes; how the backend ended it,
/// if it did. Reading is what makes rustls process the tickets.
async fn await_tickets(
    stream: &mut TlsStream<TcpStream>,
    store: &CountingStore,
    wait: Duration,
) -> Option<String> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; 4096];
    while store.tickets.load(Ordering::Relaxed) == 0 {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) => return Some("the backend closed the connection".to_owned()),
                // Data nobody asked for: not what is waited for.
                Ok(_) => {}
                Err(e) => return Some(e.to_string()),
            },
            () = store.arrived.notified() => {}
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    None
}

/// Sends `close_notify` and a FIN, as tether ends a connection it retires.
async fn close(mut stream: TlsStream<TcpStream>, timeout: Duration) {
    let _ = tokio::time::timeout(timeout, stream.shutdown()).await;
}

/// The verdict as a report shows it, labelled as the pool's metrics are.
fn verification(verdict: &Result<(), rustls::Error>) -> Verification {
    match verdict {
        Ok(()) => Verification {
            ok: true,
            reason: None,
            detail: None,
        },
        Err(e) => Verification {
            ok: false,
            reason: Some(match e {
                rustls::Error::InvalidCertificate(cert) => certificate_reason(cert),
                _ => "invalid-certificate",
            }),
            detail: Some(e.to_string()),
        },
    }
}

/// The SANs of the server's certificate, and whether `name` is among them
/// (by rustls' own rules: wildcards, IP addresses).
fn leaf_names(leaf: Option<&CertificateDer<'_>>, name: &ServerName<'_>) -> LeafNames {
    let Some(leaf) = leaf else {
        return LeafNames::default();
    };
    let matches = rustls::server::ParsedCertificate::try_from(leaf)
        .is_ok_and(|parsed| rustls::client::verify_server_name(&parsed, name).is_ok());
    let mut names = LeafNames {
        matches,
        ..LeafNames::default()
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
        return names;
    };
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for general in &san.value.general_names {
            match general {
                x509_parser::extensions::GeneralName::DNSName(dns) => {
                    names.dns.push((*dns).to_owned())
                }
                x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                    if let Some(ip) = ip_of(bytes) {
                        names.ip.push(ip);
                    }
                }
                _ => {}
            }
        }
    }
    names
}

fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

impl CertificateInfo {
    fn of(der: &CertificateDer<'_>) -> Self {
        let days_left = days_left(der);
        match x509_parser::parse_x509_certificate(der.as_ref()) {
            Ok((_, cert)) => Self {
                subject: cert.subject().to_string(),
                issuer: cert.issuer().to_string(),
                not_before: date(cert.validity().not_before),
                not_after: date(cert.validity().not_after),
                days_left,
            },
            Err(e) => Self {
                subject: format!("(unparsable certificate: {e})"),
                issuer: String::new(),
                not_before: String::new(),
                not_after: String::new(),
                days_left,
            },
        }
    }
}

/// RFC 3339 in UTC; dates before 1970 as x509-parser writes them.
fn date(time: x509_parser::time::ASN1Time) -> String {
    u64::try_from(time.timestamp()).map_or_else(
        |_| time.to_string(),
        |secs| {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
        },
    )
}

/// What to do about what the check found.
fn advice(report: &TlsReport, options: &TlsCheckOptions) -> Vec<String> {
    let mut advice = verification_advice(report);
    advice.extend(expiry_advice(&report.chain));
    advice.extend(session_advice(report));
    if report.verification.ok {
        let mut settings = Vec::new();
        if let Some(name) = &options.server_name {
            settings.push(format!("server_name = {name:?}"));
        }
        if !options.ca.is_empty() {
            settings.push(format!("ca = {:?}", report.trust.sources));
        }
        let with = if settings.is_empty() {
            "its defaults".to_owned()
        } else {
            settings.join(", ")
        };
        advice.push(format!(
            "verified: [upstream.tls] with {with} accepts this backend"
        ));
    }
    advice
}

fn verification_advice(report: &TlsReport) -> Vec<String> {
    let mut advice = Vec::new();
    let names: Vec<String> = (report.names.dns.iter().cloned())
        .chain(report.names.ip.iter().map(IpAddr::to_string))
        .collect();
    if !report.names.matches {
        advice.push(format!(
            "name mismatch: the certificate is for {}, not {}; set tls.server_name to one of \
             them (here --server-name)",
            if names.is_empty() {
                "no name".to_owned()
            } else {
                names.join(", ")
            },
            report.server_name
        ));
    }
    let detail = report.verification.detail.clone().unwrap_or_default();
    match report.verification.reason {
        None | Some("name-mismatch") => {}
        Some("unknown-issuer") if report.trust.anchors == 0 => advice.push(
            "unknown issuer: there is no trust anchor here at all (an empty system store: \
             install ca-certificates, or give tls.ca the CA's PEM file, here --ca FILE)"
                .to_owned(),
        ),
        Some("unknown-issuer") => advice.push(format!(
            "unknown issuer: no trust anchor in {} signed this chain (its last issuer: {}); \
             give tls.ca the CA's PEM file (here --ca FILE)",
            report.trust.sources.join(", "),
            report.chain.last().map_or("none", |c| c.issuer.as_str())
        )),
        Some("expired") => advice.push(
            "expired: the backend's certificate is past its notAfter; renew it on the backend"
                .to_owned(),
        ),
        Some("not-yet-valid") => advice.push(
            "not yet valid: the certificate's notBefore is in the future; check this host's \
             clock and the backend's"
                .to_owned(),
        ),
        Some(reason) => advice.push(format!("verification failed ({reason}): {detail}")),
    }
    advice
}

fn expiry_advice(chain: &[CertificateInfo]) -> impl Iterator<Item = String> + '_ {
    chain.iter().filter_map(|cert| {
        let days = cert.days_left?;
        if days < 0 {
            Some(format!(
                "{} expired {} days ago",
                cert.subject,
                days.unsigned_abs()
            ))
        } else if days < EXPIRY_WARNING_DAYS {
            Some(format!(
                "{} expires in {days} days: renew it before tether's handshakes fail with \
                 \"expired\" (tether_upstream_tls_cert_days_left watches it in production)",
                cert.subject
            ))
        } else {
            None
        }
    })
}

fn session_advice(report: &TlsReport) -> Vec<String> {
    let mut advice = Vec::new();
    if let Some(ended) = &report.session.ended_by_backend {
        advice.push(format!(
            "the backend ended the connection after the handshake ({ended}); one that requires \
             a client certificate does this: set tls.client_cert and tls.client_key"
        ));
    }
    let resumption = &report.resumption;
    if let Some(error) = &resumption.error {
        advice.push(format!("the second connection failed: {error}"));
    } else if !resumption.resumed {
        let why = match (report.session.version.as_str(), resumption.session_tickets) {
            ("1.3", 0) => "the backend sent no session ticket",
            ("1.3", _) => "the backend refused its own ticket: do its instances share ticket keys?",
            _ => "the backend resumed neither by session ID nor by ticket",
        };
        advice.push(format!(
            "no resumption ({why}): every new pooled connection pays a full handshake; enable \
             session tickets or a session cache on the backend"
        ));
    }
    match report.session.alpn.as_deref() {
        Some("h2") => advice.push(
            "the backend agrees to h2: protocol = \"http2\" carries many requests on each \
             pooled connection"
                .to_owned(),
        ),
        None if report.alpn_offered.iter().any(|p| p == "h2") => advice.push(
            "no ALPN protocol agreed: protocol = \"http2\" needs a backend that agrees to h2"
                .to_owned(),
        ),
        _ => {}
    }
    if report.session.version == "1.2" {
        advice.push(
            "TLS 1.2 negotiated: tls.min_version = \"1.3\" would refuse this backend".to_owned(),
        );
    }
    advice
}

impl TlsReport {
    /// `Ok` when the certificate was verified, else why not (the handshake
    /// itself succeeded, or there would be no report).
    pub fn verdict(&self) -> Result<(), DoctorTlsError> {
        match self.verification.reason {
            None if self.verification.ok => Ok(()),
            reason => Err(DoctorTlsError::Unverified {
                addr: self.address,
                reason: reason.unwrap_or("invalid-certificate"),
                detail: self.verification.detail.clone().unwrap_or_default(),
            }),
        }
    }

    /// The report for people.
    pub fn text(&self) -> String {
        let mut out = format!("TLS check of {} ({})\n", self.target, self.address);
        out.push_str(&format!("  server name     {}\n", self.server_name));
        out.push_str(&format!(
            "  SNI             {}\n",
            self.sni.as_deref().unwrap_or("none (an IP address)")
        ));
        out.push_str(&format!(
            "  trust           {} ({} anchor{})\n",
            self.trust.sources.join(", "),
            self.trust.anchors,
            if self.trust.anchors == 1 { "" } else { "s" }
        ));
        out.push_str(&format!(
            "  ALPN offered    {}\n",
            list_or_none(&self.alpn_offered)
        ));
        out.push_str("\nCertificate chain sent by the server:\n");
        for (i, cert) in self.chain.iter().enumerate() {
            out.push_str(&cert.text(i));
        }
        if self.chain.is_empty() {
            out.push_str("  none\n");
        }
        out.push_str(&self.names_text());
        out.push_str(
            &match (&self.verification.reason, &self.verification.detail) {
                (None, _) if self.verification.ok => "\nVerification: ok\n".to_owned(),
                (reason, detail) => format!(
                    "\nVerification: FAILED, {} ({})\n",
                    reason.unwrap_or("invalid-certificate"),
                    detail.as_deref().unwrap_or("")
                ),
            },
        );
        out.push_str(&self.session_text());
        out.push_str("\nAdvice:\n");
        for line in &self.advice {
            out.push_str(&format!("  - {line}\n"));
        }
        out
    }

    fn names_text(&self) -> String {
        let ips: Vec<String> = self.names.ip.iter().map(IpAddr::to_string).collect();
        format!(
            "\nNames in the server's certificate:\n  DNS             {}\n  IP              {}\n  \
             server name     {} {}\n",
            list_or_none(&self.names.dns),
            list_or_none(&ips),
            self.server_name,
            if self.names.matches {
                "matches"
            } else {
                "DOES NOT MATCH"
            }
        )
    }

    fn session_text(&self) -> String {
        let r = &self.resumption;
        let resumed = match (&r.error, r.resumed) {
            (Some(error), _) => format!("not checked: {error}"),
            (None, true) => "resumed".to_owned(),
            (None, false) => "not resumed (a full handshake)".to_owned(),
        };
        let tickets = if self.session.version == "1.3" {
            format!(
                "\n  session tickets {} on the first connection",
                r.session_tickets
            )
        } else {
            String::new()
        };
        format!(
            "\nSession:\n  TLS version     {}\n  cipher suite    {}\n  ALPN            {}{tickets}\n  \
             second connect  {resumed}\n",
            self.session.version,
            self.session.cipher_suite,
            self.session.alpn.as_deref().unwrap_or("none")
        )
    }
}

impl CertificateInfo {
    fn text(&self, position: usize) -> String {
        let left = match self.days_left {
            Some(days) if days < 0 => format!("expired {} days ago", days.unsigned_abs()),
            Some(days) => format!("{days} days left"),
            None => "days left unknown".to_owned(),
        };
        format!(
            "  [{position}] subject    {}\n      issuer     {}\n      valid      {} to {} ({left})\n",
            self.subject, self.issuer, self.not_before, self.not_after
        )
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

/// What the server presented in a full handshake, and the real verifier's
/// verdict on it.
#[derive(Debug)]
struct Presented {
    chain: Vec<CertificateDer<'static>>,
    verdict: Result<(), rustls::Error>,
}

/// The certificate verifier of the check: it asks rustls' own WebPKI
/// verifier (the one the pool uses with `verify = "full"`), records the
/// chain and the verdict, and lets the handshake go on whatever it is. One
/// handshake then shows everything about a backend tether would refuse: its
/// chain, the session agreed, and resumption. The handshake's signatures are
/// still checked, so the session is with whoever holds the key of the
/// certificate shown; and nothing but `close_notify` is ever sent on these
/// connections, so going on with an unverified peer gives it nothing.
#[derive(Debug)]
struct Recorder {
    provider: Arc<CryptoProvider>,
    /// `None` when there is no anchor (every chain is then of an unknown issuer).
    webpki: Option<Arc<WebPkiServerVerifier>>,
    presented: Mutex<Option<Presented>>,
}

impl Recorder {
    /// What the last full handshake presented (a resumed one presents nothing).
    fn take(&self) -> Option<Presented> {
        self.presented
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = match &self.webpki {
            Some(webpki) => webpki
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .map(|_| ()),
            None => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
        };
        let chain = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.clone().into_owned())
            .collect();
        *self.presented.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Presented { chain, verdict });
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// rustls' in-memory session cache, counting the TLS 1.3 tickets stored in
/// it and waking whoever waits for one.
#[derive(Debug)]
struct CountingStore {
    inner: ClientSessionMemoryCache,
    tickets: AtomicUsize,
    arrived: Notify,
}

impl Default for CountingStore {
    fn default() -> Self {
        Self {
            inner: ClientSessionMemoryCache::new(SESSIONS),
            tickets: AtomicUsize::new(0),
            arrived: Notify::new(),
        }
    }
}

impl ClientSessionStore for CountingStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.inner.set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.inner.kx_hint(server_name)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.inner.set_tls12_session(server_name, value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.inner.tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.inner.remove_tls12_session(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.inner.insert_tls13_ticket(server_name, value);
        self.tickets.fetch_add(1, Ordering::Relaxed);
        self.arrived.notify_one();
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(server_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report of a verified TLS 1.3 backend that resumes, to be spoiled.
    fn healthy() -> TlsReport {
        TlsReport {
            target: "backend.example:443".to_owned(),
            address: "10.0.0.5:443".parse().unwrap(),
            server_name: "backend.example".to_owned(),
            sni: Some("backend.example".to_owned()),
            trust: Trust {
                sources: vec![SYSTEM_ROOTS.to_owned()],
                anchors: 140,
            },
            alpn_offered: DEFAULT_ALPN.map(str::to_owned).to_vec(),
            chain: vec![CertificateInfo {
                subject: "CN=backend.example".to_owned(),
                issuer: "CN=Example CA".to_owned(),
                not_before: "2025-01-01T00:00:00Z".to_owned(),
                not_after: "2026-01-01T00:00:00Z".to_owned(),
                days_left: Some(200),
            }],
            names: LeafNames {
                dns: vec!["backend.example".to_owned()],
                ip: Vec::new(),
                matches: true,
            },
            verification: verification(&Ok(())),
            session: Session {
                version: "1.3".to_owned(),
                cipher_suite: "TLS13_AES_128_GCM_SHA256".to_owned(),
                alpn: Some("http/1.1".to_owned()),
                ended_by_backend: None,
            },
            resumption: ResumptionCheck {
                session_tickets: 2,
                resumed: true,
                error: None,
            },
            advice: Vec::new(),
        }
    }

    fn options() -> TlsCheckOptions {
        TlsCheckOptions {
            target: "backend.example:443".to_owned(),
            server_name: None,
            ca: Vec::new(),
            alpn: DEFAULT_ALPN.map(str::to_owned).to_vec(),
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn a_healthy_backend_gets_only_the_settings_that_accept_it() {
        let report = healthy();
        assert_eq!(
            advice(&report, &options()),
            ["verified: [upstream.tls] with its defaults accepts this backend"]
        );
        assert!(report.verdict().is_ok());
    }

    #[test]
    fn each_problem_gets_its_line_and_a_failed_verification_fails_the_verdict() {
        let mut report = healthy();
        report.names.matches = false;
        report.verification = verification(&Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName,
        )));
        report.chain[0].days_left = Some(12);
        report.resumption = ResumptionCheck {
            session_tickets: 0,
            resumed: false,
            error: None,
        };
        report.session.version = "1.2".to_owned();
        report.session.alpn = None;
        let advice = advice(&report, &options());
        let has = |needle: &str| advice.iter().any(|a| a.contains(needle));
        assert!(has("name mismatch: the certificate is for backend.example"));
        assert!(has("set tls.server_name"));
        assert!(has("CN=backend.example expires in 12 days"));
        assert!(has(
            "no resumption (the backend resumed neither by session ID nor by ticket)"
        ));
        assert!(has("every new pooled connection pays a full handshake"));
        assert!(has("no ALPN protocol agreed"));
        assert!(has("TLS 1.2 negotiated"));
        assert!(!has("verified:"), "{advice:?}");
        match report.verdict() {
            Err(DoctorTlsError::Unverified { reason, .. }) => assert_eq!(reason, "name-mismatch"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_empty_trust_store_and_missing_tickets_are_named() {
        let mut report = healthy();
        report.trust.anchors = 0;
        report.verification = verification(&Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        )));
        report.resumption.resumed = false;
        report.resumption.session_tickets = 0;
        let advice = advice(&report, &options());
        assert!(advice
            .iter()
            .any(|a| a.contains("no trust anchor here at all")));
        assert!(advice
            .iter()
            .any(|a| a.contains("the backend sent no session ticket")));
        assert_eq!(report.verification.reason, Some("unknown-issuer"));
    }

    #[test]
    fn the_server_name_defaults_to_the_host_and_an_ip_is_checked_as_one() {
        assert!(matches!(
            server_name(None, "10.0.0.5").unwrap(),
            ServerName::IpAddress(_)
        ));
        let dns = server_name(None, "backend.example").unwrap();
        assert_eq!(name_text(&dns), "backend.example");
        let given = server_name(Some("other.example"), "10.0.0.5").unwrap();
        assert_eq!(name_text(&given), "other.example");
        assert!(server_name(Some("not a name"), "10.0.0.5").is_err());
    }
}
