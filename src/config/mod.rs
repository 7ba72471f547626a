//! Configuration: the schema, its defaults (each with the reason for it), loading
//! from one TOML file plus `TETHER__…` environment overrides, and validation.
//!
//! Loading ([`load`](Config::load)) parses straight into final types
//! (`Duration`, [`Size`], enums), section by section, and then
//! [`Config::validate`] checks the combinations. Every problem found is
//! reported with its key path, so an operator fixes a file in one pass, and
//! nothing binds before the whole file is known to be good.
//!
//! Each section's file holds its types, their `Default` impls and its checks,
//! which [`Config::validate`] calls in turn; [`defaults`] holds every default
//! value once, with its reason; `validate` holds the checks the sections share;
//! `load` reads the file and the environment.

use std::fmt;

use serde::{Deserialize, Serialize};

mod admin;
pub mod defaults;
mod health;
mod keepalive;
mod listener;
mod load;
mod log;
mod look;
mod pool;
mod route;
mod runtime;
mod size;
mod tls;
mod upstream;
mod validate;

pub use admin::AdminConfig;
pub use health::HealthConfig;
pub use keepalive::{KeepaliveConfig, ProbeConfig, ProbeMethod};
pub use listener::{ClientClose, ListenAddr, ListenerConfig, UnderscoresInHeaders};
pub use log::{AccessLogConfig, ConnectionLogConfig, LogConfig, LogFormat};
pub use look::FileLook;
pub use pool::{PoolConfig, Retire, RetireByReason, RetirePolicy, RetireReason};
pub use route::{split_authority, HostPattern, RouteConfig};
pub use runtime::RuntimeConfig;
pub use size::Size;
pub use tls::{
    read_certificates, read_private_key, TlsConfig, TlsVerify, TlsVersion, SYSTEM_ROOTS,
};
pub use upstream::{split_host_port, Balance, Protocol, UpstreamConfig};
use validate::Problems;

/// Prefix of environment variables that override file keys:
/// `TETHER__RUNTIME__DRAIN_TIMEOUT=10s`, `TETHER__LISTENER__0__LISTEN=127.0.0.1:9000`.
pub const ENV_PREFIX: &str = "TETHER__";

/// Problems found while loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or is not TOML.
    #[error("cannot load {path}: {message}")]
    Load {
        /// The file; empty when the text did not come from a file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// One or more keys are wrong; each entry names its key path.
    #[error("{} problem(s) in the configuration:\n{}", .0.len(), format_problems(.0))]
    Invalid(Vec<Problem>),
}

/// One configuration problem and the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, with `[i]` for array entries: `listener[0].idle_timeout`.
    pub key: String,
    /// What is wrong, in words an operator can act on.
    pub message: String,
}

impl Problem {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

fn format_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The whole configuration of one tether process.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Local ports the legacy app connects to. At least one.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// Backends, each with its own pool. At least one.
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,
    /// The admin server.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Process-wide settings.
    #[serde(default)]
    pub runtime: RuntimeConfig,
}

impl Config {
    /// Checks the combinations of keys; reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut found = Vec::new();
        log::validate(&self.log, Problems::new("log", &mut found));
        for (name, missing) in [
            ("listener", self.listeners.is_empty()),
            ("upstream", self.upstreams.is_empty()),
        ] {
            if missing {
                found.push(Problem::new(
                    name,
                    format!("at least one [[{name}]] is required"),
                ));
            }
        }
        listener::validate(&self.listeners, &self.upstreams, &self.admin, &mut found);
        upstream::validate(&self.upstreams, &mut found);
        runtime::validate(&self.runtime, Problems::new("runtime", &mut found));
        if found.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(found))
        }
    }

    /// The effective configuration as TOML (every key, defaults filled in).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// The upstream a listener forwards to (validation guarantees it exists).
    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

/// The smallest file that loads: one listener, one upstream.
#[cfg(test)]
const MINIMAL: &str = r#"
        [[listener]]
        name = "app"
        listen = "127.0.0.1:8080"
        upstream = "backend"

        [[upstream]]
        name = "backend"
        endpoints = ["127.0.0.1:9000"]
    "#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_with_its_key_path() {
        let text = r#"
            bogus = 1
            [log]
            level = "info"
            colour = "yes"
            [[listener]]
            name = "app"
            upstream = "missing"
            listen = "127.0.0.1:8080"
            max_header_bytes = "1KiB"
            [[listener]]
            name = "two"
            upstream = "backend"
            idle_timeout = "soon"
            listen = "127.0.0.1:8081"
            [[upstream]]
            endpoints = ["nohost"]
            name = "backend"
            [upstream.pool]
            min_idle = 8
            max_idle = 4
        "#;
        let Err(ConfigError::Invalid(problems)) = Config::from_toml(text) else {
            panic!("expected problems");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "bogus",
            "log.colour",
            "listener[1].idle_timeout",
            "listener[0].upstream",
            "listener[0].max_header_bytes",
            "upstream[0].endpoints[0]",
            "upstream[0].pool.min_idle",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
    }

    #[test]
    fn effective_config_round_trips_through_toml() {
        let c = Config::from_toml(MINIMAL).unwrap();
        let again = Config::from_toml(&c.to_toml()).unwrap();
        assert_eq!(c, again);
    }
}
