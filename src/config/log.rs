//! `[log]`: the log level or filter and the output format. The level is
//! checked with the same parser `tracing` uses at start-up, so a bad filter is
//! a configuration problem, not a start-up failure.

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
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: defaults::log_level(),
            format: LogFormat::default(),
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

/// Checks `[log]`: the level must parse as a `tracing` filter.
pub(super) fn validate(log: &LogConfig, mut problems: Problems<'_>) {
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log.level) {
        problems.add("level", format!("not a valid level or filter: {e}"));
    }
}
