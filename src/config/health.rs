//! `[upstream.health]`: passive ejection, judged from the requests themselves.
//! An endpoint that fails too often in a row gets no new requests for a time
//! that doubles with each ejection in a row.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{defaults, Problems};

/// `[upstream.health]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Consecutive failures (connect errors, or 5xx responses when
    /// `eject_on_5xx`) after which an endpoint gets no new requests. 0 turns
    /// ejection off. Default: [`defaults::eject_after`].
    #[serde(default = "defaults::eject_after")]
    pub eject_after: u32,
    /// Count 5xx responses as failures. Default: [`defaults::eject_on_5xx`].
    #[serde(default = "defaults::eject_on_5xx")]
    pub eject_on_5xx: bool,
    /// First ejection time; doubled on each ejection in a row. Default:
    /// [`defaults::eject_time`].
    #[serde(default = "defaults::eject_time", with = "humantime_serde")]
    pub eject_time: Duration,
    /// Longest ejection time. Default: [`defaults::eject_time_max`].
    #[serde(default = "defaults::eject_time_max", with = "humantime_serde")]
    pub eject_time_max: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            eject_after: defaults::eject_after(),
            eject_on_5xx: defaults::eject_on_5xx(),
            eject_time: defaults::eject_time(),
            eject_time_max: defaults::eject_time_max(),
        }
    }
}

/// Checks one `[upstream.health]`: the first ejection time is positive and
/// within the longest.
pub(super) fn validate(health: &HealthConfig, mut problems: Problems<'_>) {
    if health.eject_time.is_zero() || health.eject_time > health.eject_time_max {
        problems.add(
            "eject_time",
            "must be greater than 0 and at most health.eject_time_max",
        );
    }
}
