//! `[log]`: the log level or filter and the output format; `[log.access]`
//! (one line per request) and `[log.connections]` (one line per upstream
//! connection that ends). The level is checked with the same parser `tracing`
//! uses at start-up, so a bad filter is a configuration problem, not a start-up
//! failure.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{defaults, Problems};

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Minimum level, or any `tracing` filter directive (`"info,tether::pool=debug"`).
    /// Default: [`defaults::log_level`].
    #[serde(default = "defaults::log_level")]
    pub level: String,
    /// `"text"` for people, `"json"` for log pipelines. Default: [`LogFormat::Text`].
    #[serde(default)]
    pub format: LogFormat,
    /// `[log.access]`: one line per request.
    #[serde(default)]
    pub access: AccessLogConfig,
    /// `[log.connections]`: one line per upstream connection that ends.
    #[serde(default)]
    pub connections: ConnectionLogConfig,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: defaults::log_level(),
            format: LogFormat::default(),
            access: AccessLogConfig::default(),
            connections: ConnectionLogConfig::default(),
        }
    }
}

/// `[log.access]`: one line per request, tether's own answers included,
/// written off the request path by one writer thread.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// Write the access log. Default: [`defaults::access_log_enabled`].
    #[serde(default = "defaults::access_log_enabled")]
    pub enabled: bool,
    /// `"json"` (one object a line) or `"text"` (`key=value` pairs).
    /// Default: [`defaults::access_log_format`].
    #[serde(default = "defaults::access_log_format")]
    pub format: LogFormat,
    /// File the lines are appended to (created if missing); absent: standard
    /// output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Lines queued for the writer; a line that finds the queue full is
    /// dropped and counted in `tether_log_lines_dropped_total{log="access"}`.
    /// Default: [`defaults::log_buffer_lines`].
    #[serde(default = "defaults::log_buffer_lines")]
    pub buffer_lines: usize,
    /// Longest request target written; longer ones are cut (at a character
    /// boundary) and end in `...`. Default: [`defaults::max_target_bytes`].
    #[serde(default = "defaults::max_target_bytes")]
    pub max_target_bytes: usize,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        Self {
            enabled: defaults::access_log_enabled(),
            format: defaults::access_log_format(),
            path: None,
            buffer_lines: defaults::log_buffer_lines(),
            max_target_bytes: defaults::max_target_bytes(),
        }
    }
}

/// `[log.connections]`: one line per upstream connection that ends, written
/// off the request path by one writer thread.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConnectionLogConfig {
    /// Write the connection log. Default: [`defaults::connection_log_enabled`].
    #[serde(default = "defaults::connection_log_enabled")]
    pub enabled: bool,
    /// `"json"` or `"text"`, as for `[log.access]`.
    /// Default: [`defaults::access_log_format`].
    #[serde(default = "defaults::access_log_format")]
    pub format: LogFormat,
    /// File the lines are appended to (created if missing); absent: standard
    /// output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Lines queued for the writer; beyond it lines are dropped and counted in
    /// `tether_log_lines_dropped_total{log="connections"}`.
    /// Default: [`defaults::log_buffer_lines`].
    #[serde(default = "defaults::log_buffer_lines")]
    pub buffer_lines: usize,
}

impl Default for ConnectionLogConfig {
    fn default() -> Self {
        Self {
            enabled: defaults::connection_log_enabled(),
            format: defaults::access_log_format(),
            path: None,
            buffer_lines: defaults::log_buffer_lines(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The largest `buffer_lines`: a queue of a million lines of a few hundred
/// bytes is already hundreds of MiB.
const MAX_BUFFER_LINES: usize = 1 << 20;

/// Checks `[log]`: the level must parse as a `tracing` filter.
pub(super) fn validate(log: &LogConfig, mut problems: Problems<'_>) {
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log.level) {
        problems.add("level", format!("not a valid level or filter: {e}"));
    }
    let sinks = [
        ("access", &log.access.path, log.access.buffer_lines),
        (
            "connections",
            &log.connections.path,
            log.connections.buffer_lines,
        ),
    ];
    for (section, path, buffer_lines) in sinks {
        if buffer_lines == 0 {
            problems.add(
                &format!("{section}.buffer_lines"),
                "must be at least 1 (0 would drop every line)",
            );
        }
        if buffer_lines > MAX_BUFFER_LINES {
            problems.add(
                &format!("{section}.buffer_lines"),
                format!("must be at most {MAX_BUFFER_LINES}: the queue is memory"),
            );
        }
        if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            problems.add(
                &format!("{section}.path"),
                "must name a file; leave it out for standard output",
            );
        }
    }
    if log.access.max_target_bytes == 0 {
        problems.add("access.max_target_bytes", "must be at least 1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError};

    #[test]
    fn log_sections_are_checked_with_their_key_paths() {
        let mut config = Config::from_toml(crate::config::MINIMAL).unwrap();
        config.log.access.buffer_lines = 0;
        config.log.access.max_target_bytes = 0;
        config.log.connections.buffer_lines = MAX_BUFFER_LINES + 1;
        config.log.connections.path = Some(PathBuf::new());
        let Err(ConfigError::Invalid(problems)) = config.validate() else {
            panic!("expected problems");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "log.access.buffer_lines",
                "log.connections.buffer_lines",
                "log.connections.path",
                "log.access.max_target_bytes"
            ]
        );
    }

    #[test]
    fn the_logs_are_off_and_json_by_default() {
        let config = Config::from_toml(crate::config::MINIMAL).unwrap();
        assert!(!config.log.access.enabled && !config.log.connections.enabled);
        assert_eq!(config.log.access.format, LogFormat::Json);
        assert_eq!(config.log.access.path, None);
        assert_eq!(config.log.access.max_target_bytes, 512);
    }
}
