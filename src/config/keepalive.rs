//! `[upstream.keepalive]` and `[upstream.keepalive.probe]`: what keeps an idle
//! pooled connection alive and finds a dead one — TCP keepalive on every
//! socket, PING frames on HTTP/2, and optional HTTP/1.1 probe requests so the
//! backend never closes an idle connection first.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{defaults, Problems};

/// `[upstream.keepalive]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeepaliveConfig {
    /// Idle time before the first TCP keepalive probe. Default:
    /// [`defaults::tcp_idle`].
    #[serde(default = "defaults::tcp_idle", with = "humantime_serde")]
    pub tcp_idle: Duration,
    /// Interval between unanswered probes. Default: [`defaults::tcp_interval`].
    #[serde(default = "defaults::tcp_interval", with = "humantime_serde")]
    pub tcp_interval: Duration,
    /// Unanswered probes before the kernel declares the connection dead.
    /// Default: [`defaults::tcp_count`].
    #[serde(default = "defaults::tcp_count")]
    pub tcp_count: u32,
    /// HTTP/2 only: PING interval on every connection, idle or not. Default:
    /// [`defaults::ping_interval`].
    #[serde(default = "defaults::ping_interval", with = "humantime_serde")]
    pub ping_interval: Duration,
    /// HTTP/2 only: a PING not answered within this evicts the connection.
    /// Default: [`defaults::ping_timeout`].
    #[serde(default = "defaults::ping_timeout", with = "humantime_serde")]
    pub ping_timeout: Duration,
    /// HTTP/1.1 probes on idle pooled connections.
    #[serde(default)]
    pub probe: ProbeConfig,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        Self {
            tcp_idle: defaults::tcp_idle(),
            tcp_interval: defaults::tcp_interval(),
            tcp_count: defaults::tcp_count(),
            ping_interval: defaults::ping_interval(),
            ping_timeout: defaults::ping_timeout(),
            probe: ProbeConfig::default(),
        }
    }
}

/// Probe request method.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum ProbeMethod {
    /// `HEAD`: no body to read.
    #[default]
    Head,
    /// `GET`.
    Get,
    /// `OPTIONS`.
    Options,
}

impl ProbeMethod {
    /// The HTTP method.
    pub fn as_method(self) -> http::Method {
        match self {
            Self::Head => http::Method::HEAD,
            Self::Get => http::Method::GET,
            Self::Options => http::Method::OPTIONS,
        }
    }
}

/// `[upstream.keepalive.probe]`. Writing any key of the table turns probes on
/// unless it says `enabled = false`; a key left out takes its default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(from = "ProbeTable")]
pub struct ProbeConfig {
    /// Send probes. Without a probe table: [`defaults::probe_enabled`]; with
    /// one, true unless it says `enabled = false`. Always written out
    /// resolved, so `/config` and `tether check` show whether probes run.
    pub enabled: bool,
    /// `HEAD`, `GET` or `OPTIONS`. Default [`ProbeMethod::Head`]: nothing to
    /// read back.
    pub method: ProbeMethod,
    /// Request target of the probe. Default: [`defaults::probe_path`].
    pub path: String,
    /// Idle time after which a pooled connection is probed; set it below the
    /// backend's keep-alive timeout. Default: [`defaults::probe_interval`].
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Time allowed for the probe's response; then the connection is reset.
    /// Default: [`defaults::probe_timeout`].
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Status classes that count as alive. Default: [`defaults::probe_expect`].
    pub expect: Vec<String>,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            enabled: defaults::probe_enabled(),
            method: ProbeMethod::default(),
            path: defaults::probe_path(),
            interval: defaults::probe_interval(),
            timeout: defaults::probe_timeout(),
            expect: defaults::probe_expect(),
        }
    }
}

/// `[upstream.keepalive.probe]` as written: every key optional, so that what
/// the operator set can be told from what was left to its default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeTable {
    enabled: Option<bool>,
    method: Option<ProbeMethod>,
    path: Option<String>,
    #[serde(default, with = "humantime_serde")]
    interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    expect: Option<Vec<String>>,
}

impl From<ProbeTable> for ProbeConfig {
    /// An operator who tunes a probe means to have probes: a table that sets
    /// `interval`, `path` or any other key would otherwise leave them off
    /// without a word. Only an explicit `enabled` overrides that.
    fn from(table: ProbeTable) -> Self {
        let tuned = table.method.is_some()
            || table.path.is_some()
            || table.interval.is_some()
            || table.timeout.is_some()
            || table.expect.is_some();
        Self {
            enabled: table.enabled.unwrap_or(tuned || defaults::probe_enabled()),
            method: table.method.unwrap_or_default(),
            path: table.path.unwrap_or_else(defaults::probe_path),
            interval: table.interval.unwrap_or_else(defaults::probe_interval),
            timeout: table.timeout.unwrap_or_else(defaults::probe_timeout),
            expect: table.expect.unwrap_or_else(defaults::probe_expect),
        }
    }
}

impl ProbeConfig {
    /// Whether a probe's status means the connection is alive.
    pub fn accepts(&self, status: u16) -> bool {
        let class = format!("{}xx", status / 100);
        self.expect.iter().any(|e| e.eq_ignore_ascii_case(&class))
    }
}

/// The shortest `tcp_idle` and `tcp_interval`: the kernel takes them in
/// whole seconds.
const MIN_TCP_CLOCK: Duration = Duration::from_secs(1);

/// Checks the TCP keepalive of one `[upstream.keepalive]`.
pub(super) fn validate_tcp(k: &KeepaliveConfig, mut problems: Problems<'_>) {
    problems.at_least("tcp_idle", k.tcp_idle, MIN_TCP_CLOCK);
    problems.at_least("tcp_interval", k.tcp_interval, MIN_TCP_CLOCK);
    problems.at_least("tcp_count", k.tcp_count, 1);
}

/// Checks the HTTP keepalive of one `[upstream.keepalive]`: HTTP/2 PINGs and
/// the HTTP/1.1 probe requests of `[upstream.keepalive.probe]`.
pub(super) fn validate_http(k: &KeepaliveConfig, mut problems: Problems<'_>) {
    if k.ping_interval.is_zero() || k.ping_timeout.is_zero() {
        problems.add(
            "ping_interval",
            "ping_interval and ping_timeout must be greater than 0",
        );
    }
    validate_probe(&k.probe, problems.within("probe"));
}

/// Checks one `[upstream.keepalive.probe]`: clocks that run, an origin-form
/// path, and status classes that exist.
fn validate_probe(probe: &ProbeConfig, mut problems: Problems<'_>) {
    problems.positive("interval", probe.interval);
    problems.positive("timeout", probe.timeout);
    if !probe.path.starts_with('/') || probe.path.parse::<http::uri::PathAndQuery>().is_err() {
        problems.add(
            "path",
            format!(
                "{:?} is not an origin-form path like \"/health\"",
                probe.path
            ),
        );
    }
    for (j, class) in probe.expect.iter().enumerate() {
        if !["1xx", "2xx", "3xx", "4xx", "5xx"].contains(&class.to_ascii_lowercase().as_str()) {
            problems.add(
                &format!("expect[{j}]"),
                format!("{class:?} is not a status class like \"2xx\""),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::{Config, ConfigError, MINIMAL};

    /// The probe settings of [`MINIMAL`] with `table` as its probe table.
    fn probe_with(table: &str) -> super::ProbeConfig {
        let text = format!("{MINIMAL}\n[upstream.keepalive.probe]\n{table}\n");
        let config = Config::from_toml(&text).unwrap();
        config.upstreams[0].keepalive.probe.clone()
    }

    #[test]
    fn without_a_probe_table_probes_stay_off() {
        let config = Config::from_toml(MINIMAL).unwrap();
        assert!(!config.upstreams[0].keepalive.probe.enabled);
    }

    #[test]
    fn any_key_in_the_probe_table_turns_probes_on() {
        let probe = probe_with(r#"interval = "10s""#);
        assert!(probe.enabled);
        assert_eq!(probe.interval, Duration::from_secs(10));
        assert_eq!(probe.path, "/", "keys left out keep their defaults");
        for table in [
            r#"path = "/health""#,
            r#"method = "GET""#,
            r#"timeout = "1s""#,
            r#"expect = ["2xx"]"#,
        ] {
            assert!(probe_with(table).enabled, "{table}");
        }
    }

    #[test]
    fn enabled_false_keeps_a_tuned_probe_off() {
        let probe = probe_with("enabled = false\ninterval = \"10s\"\npath = \"/health\"");
        assert!(!probe.enabled);
        assert_eq!(probe.interval, Duration::from_secs(10));
        assert!(!probe_with("enabled = false").enabled);
        assert!(probe_with("enabled = true").enabled);
        assert!(!probe_with("").enabled, "an empty table sets no key");
    }

    #[test]
    fn the_effective_config_shows_the_resolved_enabled() {
        let text = format!("{MINIMAL}\n[upstream.keepalive.probe]\ninterval = \"10s\"\n");
        let config = Config::from_toml(&text).unwrap();
        let printed: toml::Value = config.to_toml().parse().unwrap();
        let probe = &printed["upstream"][0]["keepalive"]["probe"];
        assert_eq!(probe["enabled"].as_bool(), Some(true));
        assert_eq!(probe["interval"].as_str(), Some("10s"));
        assert_eq!(Config::from_toml(&config.to_toml()).unwrap(), config);
    }

    #[test]
    fn an_unknown_probe_key_is_still_an_error_with_its_path() {
        let text = format!("{MINIMAL}\n[upstream.keepalive.probe]\nintervall = \"10s\"\n");
        let Err(ConfigError::Invalid(problems)) = Config::from_toml(&text) else {
            panic!("a misspelt key loaded");
        };
        assert!(
            problems.iter().any(|p| p.key.contains("probe")),
            "{problems:?}"
        );
    }
}
