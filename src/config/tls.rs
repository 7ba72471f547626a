//! `[upstream.tls]`: TLS toward the backend. The section's presence turns TLS
//! on; every key has a default, so `[upstream.tls]` alone means "verified TLS
//! with the system's roots, SNI from the endpoint's host name".
//!
//! Files named here (CA bundles, the client certificate and key) are read at
//! validation, so a missing or unparsable file is a problem with its key path
//! before anything binds, again when the pool builds its TLS settings, and
//! whenever they change on disk (the pool rotates to them).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use super::{defaults, split_host_port, Problems, Protocol};

/// The word in `ca` that stands for the platform's trust store.
pub const SYSTEM_ROOTS: &str = "system";

/// `[upstream.tls]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The name sent as SNI and verified in the backend's certificate.
    /// Default: the endpoint's host name; an IP endpoint sends no SNI and is
    /// verified against the certificate's IP addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// Whether the backend's certificate is verified. Default:
    /// [`TlsVerify::Full`].
    #[serde(default)]
    pub verify: TlsVerify,
    /// Trust anchors: `"system"` (the platform's store) and/or PEM files.
    /// Default: [`defaults::tls_ca`].
    #[serde(default = "defaults::tls_ca")]
    pub ca: Vec<String>,
    /// PEM certificate chain tether presents (mutual TLS); with `client_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
    /// ALPN protocols offered. Default: [`defaults::tls_alpn`] of the
    /// upstream's protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpn: Option<Vec<String>>,
    /// Oldest TLS version accepted. Default: [`TlsVersion::Tls12`].
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Time allowed for the TLS handshake after the TCP connect; then 502.
    /// Default: [`defaults::tls_handshake_timeout`].
    #[serde(default = "defaults::tls_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How long an aborted connection waits for its `close_notify` to be
    /// acknowledged before the reset. Default: [`defaults::tls_close_notify_wait`].
    #[serde(default = "defaults::tls_close_notify_wait", with = "humantime_serde")]
    pub close_notify_wait: Duration,
    /// When `ca`, `client_cert` or `client_key` change on disk, the pooled
    /// connections made with the old files are replaced over this long.
    /// Default: [`defaults::tls_rotation_window`].
    #[serde(default = "defaults::tls_rotation_window", with = "humantime_serde")]
    pub rotation_window: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            server_name: None,
            verify: TlsVerify::default(),
            ca: defaults::tls_ca(),
            client_cert: None,
            client_key: None,
            alpn: None,
            min_version: TlsVersion::default(),
            handshake_timeout: defaults::tls_handshake_timeout(),
            close_notify_wait: defaults::tls_close_notify_wait(),
            rotation_window: defaults::tls_rotation_window(),
        }
    }
}

impl TlsConfig {
    /// The ALPN protocols offered for an upstream speaking `protocol`.
    pub fn alpn_for(&self, protocol: Protocol) -> Vec<String> {
        self.alpn
            .clone()
            .unwrap_or_else(|| defaults::tls_alpn(protocol))
    }

    /// Whether the platform's trust store is among the anchors.
    pub fn uses_system_roots(&self) -> bool {
        self.ca.iter().any(|c| c == SYSTEM_ROOTS)
    }

    /// The PEM files among the anchors.
    pub fn ca_files(&self) -> impl Iterator<Item = &str> {
        self.ca
            .iter()
            .map(String::as_str)
            .filter(|c| *c != SYSTEM_ROOTS)
    }

    /// Every file the settings are built from: the CA files, the client
    /// certificate and its key. A change to any of them is a rotation.
    pub fn files(&self) -> Vec<PathBuf> {
        self.ca_files()
            .map(PathBuf::from)
            .chain(self.client_cert.iter().cloned())
            .chain(self.client_key.iter().cloned())
            .collect()
    }
}

/// `tls.verify`
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum TlsVerify {
    /// The chain to a trusted anchor, the name, the validity dates. The
    /// default: an unverified backend is anyone on the path.
    #[default]
    Full,
    /// Nothing is verified (the handshake's signatures still are): for a
    /// backend with a certificate nobody can verify. Warned at start and on
    /// every reload, and shown by `tether_upstream_tls_verify_disabled`.
    None,
}

/// `tls.min_version`
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3. The default: TLS 1.2 is still what many backends
    /// (and their load balancers) offer, and rustls offers only its safe
    /// cipher suites.
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// Reads the certificates of a PEM file; an error in words.
pub fn read_certificates(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {path:?}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{path:?} is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{path:?} holds no certificate"));
    }
    Ok(certs)
}

/// Reads the private key of a PEM file; an error in words.
pub fn read_private_key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("no private key read from {path:?}: {e}"))
}

/// Checks `[upstream.tls]` of an upstream with `endpoints` speaking `protocol`.
pub(super) fn validate(
    tls: &TlsConfig,
    endpoints: &[String],
    protocol: Protocol,
    mut problems: Problems<'_>,
) {
    problems.positive("handshake_timeout", tls.handshake_timeout);
    problems.positive("rotation_window", tls.rotation_window);
    // A day is longer than any certificate should stay in use once replaced.
    problems.at_most(
        "rotation_window",
        tls.rotation_window,
        Duration::from_secs(86_400),
    );
    if tls.ca.is_empty() && tls.verify == TlsVerify::Full {
        problems.add("ca", "at least one anchor: \"system\" or a PEM file");
    }
    for (i, file) in tls.ca.iter().enumerate() {
        if file != SYSTEM_ROOTS {
            if let Err(message) = read_certificates(file) {
                problems.add(&format!("ca[{i}]"), message);
            }
        }
    }
    validate_identity(tls, &mut problems);
    if let Some(name) = &tls.server_name {
        if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
            problems.add(
                "server_name",
                format!("{name:?} is not a DNS name or IP address"),
            );
        }
    } else {
        let hosts: HashSet<String> = endpoints
            .iter()
            .filter_map(|e| split_host_port(e).ok())
            .map(|(host, _)| host)
            .filter(|host| host.parse::<std::net::IpAddr>().is_err())
            .collect();
        if hosts.len() > 1 {
            problems.add(
                "server_name",
                "the endpoints name several hosts: say which name their certificates carry",
            );
        }
    }
    let alpn = tls.alpn_for(protocol);
    if alpn.iter().any(|p| p.is_empty() || p.len() > 255) {
        problems.add("alpn", "each protocol is 1 to 255 bytes");
    }
    // rustls refuses a backend that picks a protocol not offered, so offering
    // only what the pool speaks means the pool always speaks what was agreed.
    let speaks: &[&str] = match protocol {
        Protocol::Http1 => &["http/1.1", "http/1.0"],
        Protocol::Http2 => &["h2"],
    };
    if let Some(other) = alpn.iter().find(|p| !speaks.contains(&p.as_str())) {
        problems.add(
            "alpn",
            format!("{other:?} is not spoken by this upstream's protocol: offer {speaks:?}"),
        );
    }
}

/// `client_cert` and `client_key`: both or neither, each readable.
fn validate_identity(tls: &TlsConfig, problems: &mut Problems<'_>) {
    match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            if let Err(message) = read_certificates(&cert.to_string_lossy()) {
                problems.add("client_cert", message);
            }
            if let Err(message) = read_private_key(&key.to_string_lossy()) {
                problems.add("client_key", message);
            }
        }
        (Some(_), None) => problems.add("client_key", "client_cert needs client_key"),
        (None, Some(_)) => problems.add("client_cert", "client_key needs client_cert"),
        (None, None) => {}
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};

    fn problems(tls: &str) -> Vec<String> {
        let text = format!(
            r#"
            [[listener]]
            name = "app"
            listen = "127.0.0.1:8080"
            upstream = "backend"
            [[upstream]]
            name = "backend"
            endpoints = ["a.example:443", "b.example:443"]
            [upstream.tls]
            {tls}
            "#
        );
        match Config::from_toml(&text) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid(found)) => found.into_iter().map(|p| p.key).collect(),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn every_tls_problem_names_its_key() {
        let keys = problems(
            r#"
            ca = ["system", "/nonexistent/ca.pem"]
            client_cert = "/nonexistent/cert.pem"
            handshake_timeout = "0s"
            "#,
        );
        for expected in [
            "upstream[0].tls.ca[1]",
            "upstream[0].tls.client_key",
            "upstream[0].tls.handshake_timeout",
            "upstream[0].tls.server_name",
        ] {
            assert!(
                keys.iter().any(|k| k == expected),
                "{expected} missing from {keys:?}"
            );
        }
        assert!(problems("server_name = \"backend.example\"").is_empty());
    }

    #[test]
    fn only_protocols_the_pool_speaks_are_offered() {
        assert!(
            problems("server_name = \"b.example\"\nalpn = [\"http/1.1\", \"http/1.0\"]").is_empty()
        );
        assert_eq!(
            problems("server_name = \"b.example\"\nalpn = [\"h2\", \"http/1.1\"]"),
            ["upstream[0].tls.alpn"]
        );
    }

    #[test]
    fn defaults_follow_the_protocol() {
        let tls = super::TlsConfig::default();
        assert_eq!(tls.alpn_for(crate::config::Protocol::Http1), ["http/1.1"]);
        assert_eq!(tls.alpn_for(crate::config::Protocol::Http2), ["h2"]);
        assert!(tls.uses_system_roots());
    }
}
