//! Certificates for HTTPS backends under test, made by rcgen: a test CA, a
//! server certificate it signed, a client certificate it signed, a
//! self-signed one, their PEM files, and a backend's rustls settings.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use super::TempDir;

/// A test CA, a server certificate it signed (for `localhost` and
/// `127.0.0.1`, or the names given), a client certificate it signed, a
/// self-signed server certificate, and the CA's and the client's PEM files.
pub struct Pki {
    dir: TempDir,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
    ca_der: CertificateDer<'static>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: Vec<u8>,
    self_signed: (Vec<CertificateDer<'static>>, Vec<u8>),
}

impl Pki {
    /// Server certificates for `localhost` and `127.0.0.1`.
    pub fn new(label: &str) -> Self {
        Self::for_names(label, &["localhost", "127.0.0.1"])
    }

    /// Server certificates for `names` (DNS names or IP addresses).
    pub fn for_names(label: &str, names: &[&str]) -> Self {
        let dir = TempDir::new(label);
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "tether test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(names.clone())
            .unwrap()
            .signed_by(&server_key, &ca, &ca_key)
            .unwrap();
        let own_key = KeyPair::generate().unwrap();
        let own = CertificateParams::new(names)
            .unwrap()
            .self_signed(&own_key)
            .unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let pki = Self {
            ca_der: ca.der().clone(),
            server_chain: vec![server.der().clone(), ca.der().clone()],
            server_key: server_key.serialize_der(),
            self_signed: (vec![own.der().clone()], own_key.serialize_der()),
            ca,
            ca_key,
            dir,
        };
        pki.issue_client("tether-client", None, "client");
        pki
    }

    /// A client certificate for `name` signed by the CA, valid until
    /// `not_after` (default: rcgen's, years), written as `{file}.pem` and
    /// `{file}.key` by renaming each over the old (so a reader sees one or
    /// the other, never half). Its DER.
    pub fn issue_client(
        &self,
        name: &str,
        not_after: Option<time::OffsetDateTime>,
        file: &str,
    ) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        if let Some(at) = not_after {
            params.not_after = at;
        }
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        for (ext, text) in [("key", key.serialize_pem()), ("pem", cert.pem())] {
            let staged = self.path(&format!(".{file}.{ext}.new"));
            std::fs::write(&staged, text).unwrap();
            std::fs::rename(&staged, self.path(&format!("{file}.{ext}"))).unwrap();
        }
        cert.der().to_vec()
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// The CA's PEM file, as `[upstream.tls] ca` names it.
    pub fn ca_file(&self) -> String {
        self.path("ca.pem").display().to_string()
    }

    /// The backend's settings: the CA-signed certificate (or the
    /// self-signed one), optionally requiring a client certificate of the CA.
    pub fn server_config(&self, self_signed: bool, require_client: bool) -> Arc<ServerConfig> {
        let (chain, key) = if self_signed {
            self.self_signed.clone()
        } else {
            (self.server_chain.clone(), self.server_key.clone())
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca_der.clone()).unwrap();
            builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .unwrap(),
            )
        } else {
            builder.with_no_client_auth()
        };
        Arc::new(builder.with_single_cert(chain, key).unwrap())
    }
}
