//! TLS toward a backend (`[upstream.tls]`): the rustls settings of an
//! upstream, built once and shared by every worker's share of its pool, the
//! handshake of the one dial path, the read through TLS of the stale check,
//! `close_notify`, and what the metrics show.
//!
//! Settings are kept in a process-wide table keyed by the upstream's name,
//! protocol and `[upstream.tls]`, so a reload that keeps them reuses them and
//! with them the session caches: connections dialled after a reload resume.
//! What the files make (the rustls settings and the caches) is replaced when
//! the files change ([`super::rotation`]).
//!
//! Resumption is per endpoint. rustls keys its session cache by server name,
//! and several endpoint addresses usually share one name; a ticket one
//! backend issued is of no use to another (unless they share ticket keys),
//! and rustls spends a TLS 1.3 ticket when it offers it. So each endpoint
//! address gets its own copy of the `ClientConfig` (its verifier, roots and
//! identity shared, behind `Arc`s) with its own session cache.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, HandshakeKind, RootCertStore};
use tokio::net::TcpStream;

use super::io::{RawIo, TlsIo};
use super::rotation::{Lineage, Material, Rotations};
use super::PoolError;
use crate::config::{
    read_certificates, read_private_key, Protocol, TlsConfig, TlsVerify, TlsVersion, UpstreamConfig,
};
use crate::sock::PeerState;

/// Why the TLS settings of an upstream could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A CA file, the client certificate or its key could not be used.
    #[error("{0}")]
    File(String),
    /// rustls refused the settings (a key that does not match, no version).
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

/// What the process-wide table is keyed by: everything the settings are
/// built from.
#[derive(PartialEq)]
struct Key {
    upstream: String,
    protocol: Protocol,
    tls: TlsConfig,
}

/// Every upstream's TLS settings in use, weakly: the pools hold them.
static TABLE: Mutex<Vec<(Key, Weak<UpstreamTls>)>> = Mutex::new(Vec::new());

/// Takes a lock whose data a panic cannot leave inconsistent.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The TLS of one upstream, shared by its pool shares (and by a reload's
/// new pool with the same settings).
pub(crate) struct UpstreamTls {
    upstream: String,
    pub(super) settings: TlsConfig,
    pub(super) protocol: Protocol,
    /// The rustls settings from the latest usable reading of the files.
    pub(super) material: ArcSwap<Material>,
    pub(super) rotations: Rotations,
    pub(super) stats: TlsStats,
}

/// What the metrics show of an upstream's TLS.
#[derive(Default)]
pub(super) struct TlsStats {
    pub(super) full: AtomicU64,
    pub(super) resumed: AtomicU64,
    pub(super) failures: Mutex<BTreeMap<&'static str, u64>>,
    /// Days left on each endpoint's certificate, from its last handshake.
    pub(super) cert_days_left: Mutex<BTreeMap<SocketAddr, i64>>,
}

impl UpstreamTls {
    /// The upstream's name.
    pub(super) fn upstream(&self) -> &str {
        &self.upstream
    }

    /// Whether verification is off (`verify = "none"`).
    pub(super) fn verify_disabled(&self) -> bool {
        self.settings.verify == TlsVerify::None
    }

    /// Days left on the client certificate in use, when one is configured.
    pub(super) fn client_cert_days_left(&self) -> Option<i64> {
        let expires = self.material.load().client_cert_expires?;
        let secs = match expires.duration_since(std::time::SystemTime::now()) {
            Ok(left) => i64::try_from(left.as_secs()).ok()?,
            Err(past) => -i64::try_from(past.duration().as_secs()).ok()?,
        };
        Some(secs.div_euclid(86_400))
    }

    /// How many rotations were put in use, and how many were refused.
    pub(super) fn rotations(&self) -> (u64, u64) {
        (
            self.rotations.applied.load(Ordering::Relaxed),
            self.rotations.refused.load(Ordering::Relaxed),
        )
    }
}

/// A TLS session just made, and what the pool keeps of how it was made.
pub(super) struct Handshaken {
    pub(super) session: TlsIo,
    pub(super) lineage: Lineage,
    /// Until when the connection may be used: before the client certificate
    /// it presented expires.
    pub(super) usable_until: Option<tokio::time::Instant>,
}

/// The TLS of `settings`' upstream, if it has `[upstream.tls]`: the one in use
/// with the same settings, else built now.
pub(crate) fn for_upstream(settings: &UpstreamConfig) -> Option<Arc<UpstreamTls>> {
    let tls = settings.tls.as_ref()?;
    let key = Key {
        upstream: settings.name.clone(),
        protocol: settings.protocol,
        tls: tls.clone(),
    };
    let mut table = lock(&TABLE);
    table.retain(|(_, weak)| weak.strong_count() > 0);
    if let Some(found) = table
        .iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, w)| w.upgrade())
    {
        return Some(found);
    }
    warn_unverified(settings);
    // Looked at before they are read: a change while reading is seen.
    let rotations = Rotations::new(tls);
    let material = Material::read(tls, settings.protocol, 0);
    if let Some(error) = material.problem() {
        tracing::error!(upstream = %settings.name, %error, "cannot set up TLS; every connection to the upstream will fail");
    }
    let built = Arc::new(UpstreamTls {
        upstream: settings.name.clone(),
        settings: tls.clone(),
        protocol: settings.protocol,
        material: ArcSwap::from_pointee(material),
        rotations,
        stats: TlsStats::default(),
    });
    table.push((key, Arc::downgrade(&built)));
    Some(built)
}

/// Warns about each upstream whose backend's certificate is not verified: at
/// start and on every reload, so it cannot be forgotten.
pub fn warn_unverified(settings: &UpstreamConfig) {
    if settings
        .tls
        .as_ref()
        .is_some_and(|t| t.verify == TlsVerify::None)
    {
        tracing::warn!(upstream = %settings.name, "tls.verify = \"none\": the backend's certificate is not verified; anyone on the path can pose as it");
    }
}

/// The rustls settings `tls` describes, with the ring provider.
pub(super) fn build(tls: &TlsConfig, protocol: Protocol) -> Result<ClientConfig, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder =
        ClientConfig::builder_with_provider(provider.clone()).with_protocol_versions(versions)?;
    let builder = match tls.verify {
        TlsVerify::Full => builder.with_root_certificates(roots(tls)?),
        TlsVerify::None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider))),
    };
    let mut config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let chain = read_certificates(&cert.to_string_lossy()).map_err(TlsSetupError::File)?;
            let key = read_private_key(&key.to_string_lossy()).map_err(TlsSetupError::File)?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = tls
        .alpn_for(protocol)
        .into_iter()
        .map(String::into_bytes)
        .collect();
    Ok(config)
}

/// The trust anchors: the platform's store and/or the PEM files.
fn roots(tls: &TlsConfig) -> Result<RootCertStore, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    if tls.uses_system_roots() {
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::warn!(%error, "cannot read part of the system's trust store");
        }
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::warn!(
                ignored,
                "the system's trust store has no usable certificate"
            );
        }
    }
    for file in tls.ca_files() {
        for cert in read_certificates(file).map_err(TlsSetupError::File)? {
            roots
                .add(cert)
                .map_err(|e| TlsSetupError::File(format!("{file:?}: {e}")))?;
        }
    }
    Ok(roots)
}

/// The name sent as SNI and verified for an endpoint address: `server_name`,
/// else the endpoint's own host (an IP endpoint: its address, no SNI).
fn server_name(
    settings: &UpstreamConfig,
    tls: &TlsConfig,
    addr: SocketAddr,
) -> ServerName<'static> {
    let by_address = || ServerName::IpAddress(addr.ip().into());
    if let Some(name) = &tls.server_name {
        return ServerName::try_from(name.clone()).unwrap_or_else(|_| by_address());
    }
    let hosts: Vec<String> = settings
        .endpoints
        .iter()
        .filter_map(|e| crate::config::split_host_port(e).ok())
        .map(|(host, _)| host)
        .collect();
    if hosts
        .iter()
        .any(|h| h.parse::<IpAddr>().ok() == Some(addr.ip()))
    {
        return by_address();
    }
    // Validation allows one DNS host at most without `server_name`.
    hosts
        .into_iter()
        .find(|h| h.parse::<IpAddr>().is_err())
        .and_then(|h| ServerName::try_from(h).ok())
        .unwrap_or_else(by_address)
}

/// A failed TLS setup or handshake with `addr`.
fn failure(addr: SocketAddr, verify: bool, reason: &'static str, detail: String) -> PoolError {
    PoolError::Tls {
        addr,
        verify,
        reason,
        detail,
    }
}

impl UpstreamTls {
    /// Refuses to dial `addr` when the client certificate in use is about to
    /// expire: a connection made with it could not be used, and the pool
    /// would make one after another. Checked before the TCP connect, so no
    /// socket is opened (and left in TIME_WAIT) for nothing.
    pub(super) fn check_dialable(&self, addr: SocketAddr) -> Result<(), PoolError> {
        let material = self.material.load();
        if let Some(problem) = material.problem() {
            return Err(self.failed(failure(addr, false, "setup", problem.to_owned())));
        }
        if material.client_cert_spent() {
            let detail =
                "the client certificate has expired or is about to: rotate it (tls.client_cert)"
                    .to_owned();
            return Err(self.failed(failure(addr, false, "client-cert-expired", detail)));
        }
        Ok(())
    }

    /// Runs the TLS handshake over a connected socket within
    /// `handshake_timeout`, with the material in use, counting it (full or
    /// resumed) or its failure.
    pub(super) async fn handshake(
        self: &Arc<Self>,
        settings: &UpstreamConfig,
        addr: SocketAddr,
        socket: Arc<TcpStream>,
    ) -> Result<Handshaken, PoolError> {
        let material = self.material.load_full();
        let config = material
            .config_for(addr)
            .map_err(|detail| self.failed(failure(addr, false, "setup", detail)))?;
        let name = server_name(settings, &self.settings, addr);
        let connector = tokio_rustls::TlsConnector::from(config);
        let limit = self.settings.handshake_timeout;
        let stream =
            match tokio::time::timeout(limit, connector.connect(name, RawIo::new(socket))).await {
                Err(_) => {
                    let detail = format!(
                        "no TLS handshake within {}",
                        humantime::format_duration(limit)
                    );
                    return Err(self.failed(failure(addr, false, "timeout", detail)));
                }
                Ok(Err(e)) => return Err(self.failed(classify(addr, &e))),
                Ok(Ok(stream)) => stream,
            };
        let (_, session) = stream.get_ref();
        match session.handshake_kind() {
            Some(HandshakeKind::Resumed) => &self.stats.resumed,
            _ => &self.stats.full,
        }
        .fetch_add(1, Ordering::Relaxed);
        if let Some(days) = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(days_left)
        {
            lock(&self.stats.cert_days_left).insert(addr, days);
        }
        Ok(Handshaken {
            session: stream,
            lineage: Lineage::new(self.clone(), &material),
            usable_until: material.usable_until(),
        })
    }

    /// Counts a failure by its reason and logs it; hands it back.
    fn failed(&self, error: PoolError) -> PoolError {
        if let PoolError::Tls { reason, .. } = &error {
            *lock(&self.stats.failures).entry(reason).or_insert(0) += 1;
        }
        tracing::warn!(upstream = %self.upstream, error = %error, "upstream TLS handshake failed");
        error
    }
}

/// Sorts a failed handshake: a certificate rustls would not accept is a
/// verification failure, by what was wrong with it; the rest is a handshake
/// failure.
fn classify(addr: SocketAddr, error: &io::Error) -> PoolError {
    let rustls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let detail = error.to_string();
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(cert)) => {
            failure(addr, true, certificate_reason(cert), detail)
        }
        Some(rustls::Error::AlertReceived(_)) => failure(addr, false, "alert", detail),
        Some(_) => failure(addr, false, "protocol", detail),
        None => failure(addr, false, "io", detail),
    }
}

/// A short label for what was wrong with the backend's certificate.
pub(crate) fn certificate_reason(error: &CertificateError) -> &'static str {
    match error {
        CertificateError::UnknownIssuer => "unknown-issuer",
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            "name-mismatch"
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "not-yet-valid"
        }
        CertificateError::Revoked => "revoked",
        CertificateError::BadSignature => "bad-signature",
        CertificateError::BadEncoding => "bad-encoding",
        _ => "invalid-certificate",
    }
}

/// Whole days until the certificate's `notAfter` (negative once expired).
pub(crate) fn days_left(der: &CertificateDer<'_>) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let now = i64::try_from(UnixTime::now().as_secs()).ok()?;
    Some((cert.validity().not_after.timestamp() - now).div_euclid(86_400))
}

/// A `std::io` reader and writer over the non-blocking shared socket, for
/// rustls' `read_tls` and `write_tls` outside hyper's polls.
struct Nonblocking<'a>(&'a TcpStream);

impl io::Read for Nonblocking<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl io::Write for Nonblocking<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads whatever waits on an idle TLS connection through rustls: records
/// that carry no application data (session tickets, key updates) are
/// processed and leave it quiet; application data is stray bytes; a
/// `close_notify` or the end of the stream is the backend closing; anything
/// rustls rejects is a failure.
pub(super) fn read_through(tls: &mut TlsIo) -> PeerState {
    let (io, session) = tls.get_mut();
    let socket = io.socket();
    let state = loop {
        match session.read_tls(&mut Nonblocking(socket)) {
            Ok(0) => break PeerState::Closed,
            Ok(_) => match session.process_new_packets() {
                Err(_) => break PeerState::Failed,
                Ok(io_state) if io_state.plaintext_bytes_to_read() > 0 => {
                    break PeerState::StrayBytes
                }
                Ok(io_state) if io_state.peer_has_closed() => break PeerState::Closed,
                Ok(_) => {}
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break PeerState::Quiet,
            Err(_) => break PeerState::Failed,
        }
    };
    // A key update the backend asked to be answered is answered now.
    flush(session, socket);
    state
}

/// Queues `close_notify` and writes it out (best effort: the socket's buffer
/// of an idle connection has room for one small record).
pub(super) fn close_notify(tls: &mut TlsIo) {
    let (io, session) = tls.get_mut();
    session.send_close_notify();
    flush(session, io.socket());
}

/// Writes what rustls has queued, as far as the socket takes it now.
fn flush(session: &mut rustls::ClientConnection, socket: &TcpStream) {
    while session.wants_write() {
        match session.write_tls(&mut Nonblocking(socket)) {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}

/// `verify = "none"`: accepts any certificate, but still checks the
/// handshake's signatures, so the session is with whoever holds the key of
/// the certificate it showed.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::super::io::Wire;
    use super::*;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::io::AsyncWriteExt;

    type Server = tokio_rustls::server::TlsStream<TcpStream>;

    /// A TLS 1.3 connection over loopback: tether's side (nobody reading it)
    /// and the backend's.
    async fn pair() -> (TlsIo, Server, Arc<TcpStream>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
            acceptor.accept(tcp).await.unwrap()
        });
        let mut roots = RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let socket = Arc::new(TcpStream::connect(addr).await.unwrap());
        let name = ServerName::IpAddress(addr.ip().into());
        let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(name, RawIo::new(socket.clone()))
            .await
            .unwrap();
        (tls, accept.await.unwrap(), socket)
    }

    /// Waits until the raw socket has bytes to read.
    async fn bytes_waiting(socket: &TcpStream) {
        for _ in 0..500 {
            if crate::sock::peer_state(socket) != PeerState::Quiet {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("nothing arrived");
    }

    #[tokio::test]
    async fn post_handshake_records_leave_an_idle_connection_quiet() {
        let (tls, mut server, socket) = pair().await;
        let session = Arc::new(Mutex::new(tls));
        let wire = Wire::tls(socket, session, std::time::Duration::ZERO, None);
        let raw = |wire: &Wire| crate::sock::peer_state(wire.socket());
        // TLS 1.3 sends its session tickets after the handshake.
        server.flush().await.unwrap();
        bytes_waiting(wire.socket()).await;
        assert_eq!(raw(&wire), PeerState::StrayBytes);
        assert_eq!(
            wire.peer_state(),
            PeerState::Quiet,
            "tickets are no stray data"
        );
        assert_eq!(raw(&wire), PeerState::Quiet, "rustls read them");
        server.get_mut().1.refresh_traffic_keys().unwrap();
        server.flush().await.unwrap();
        bytes_waiting(wire.socket()).await;
        assert_eq!(
            wire.peer_state(),
            PeerState::Quiet,
            "a key update is no stray data"
        );
        server.write_all(b"unasked").await.unwrap();
        server.flush().await.unwrap();
        bytes_waiting(wire.socket()).await;
        // Until its record is whole, application data is not yet data.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(wire.peer_state(), PeerState::StrayBytes);
    }

    #[test]
    fn the_same_settings_share_one_tls_while_in_use() {
        let mut settings = UpstreamConfig::new("shared-tls", vec!["127.0.0.1:9".to_owned()]);
        settings.tls = Some(TlsConfig::default());
        let first = for_upstream(&settings).unwrap();
        let again = for_upstream(&settings).unwrap();
        assert!(
            Arc::ptr_eq(&first, &again),
            "a reload keeping the settings keeps the sessions"
        );
        let mut changed = settings.clone();
        if let Some(tls) = changed.tls.as_mut() {
            tls.min_version = TlsVersion::Tls13;
        }
        assert!(!Arc::ptr_eq(&first, &for_upstream(&changed).unwrap()));
        let a: SocketAddr = ([127, 0, 0, 1], 1).into();
        let b: SocketAddr = ([127, 0, 0, 2], 1).into();
        let material = first.material.load();
        let (ca, cb) = (
            material.config_for(a).unwrap(),
            material.config_for(b).unwrap(),
        );
        assert!(
            !Arc::ptr_eq(&ca, &cb),
            "each endpoint has its own session cache"
        );
        assert!(Arc::ptr_eq(&ca, &material.config_for(a).unwrap()));
    }

    #[tokio::test]
    async fn a_close_notify_is_the_backend_closing() {
        let (mut tls, mut server, socket) = pair().await;
        server.shutdown().await.unwrap();
        bytes_waiting(&socket).await;
        // Tickets first, then the close_notify and the FIN: wait for all.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(read_through(&mut tls), PeerState::Closed);
    }
}
