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
        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(vec!["tether-client".to_owned()]).unwrap();
        client_params
            .distinguished_name
            .push(DnType::CommonName, "tether-client");
        let client = client_params.signed_by(&client_key, &ca, &ca_key).unwrap();
        let own_key = KeyPair::generate().unwrap();
        let own = CertificateParams::new(names)
            .unwrap()
            .self_signed(&own_key)
            .unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("client.pem"), client.pem()).unwrap();
        std::fs::write(dir.path().join("client.key"), client_key.serialize_pem()).unwrap();
        Self {
            ca_der: ca.der().clone(),
            server_chain: vec![server.der().clone(), ca.der().clone()],
            server_key: server_key.serialize_der(),
            self_signed: (vec![own.der().clone()], own_key.serialize_der()),
            dir,
        }
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
