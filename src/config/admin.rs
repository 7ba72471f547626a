//! `[admin]`: whether the admin server runs and where it listens. A listener
//! bound to the same address is reported by the listener checks.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::defaults;

/// `[admin]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Serve `/metrics`, `/healthz`, `/readyz` and `/config`. Default:
    /// [`defaults::admin_enabled`].
    #[serde(default = "defaults::admin_enabled")]
    pub enabled: bool,
    /// Address of the admin server. Default: [`defaults::admin_listen`].
    #[serde(default = "defaults::admin_listen")]
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: defaults::admin_enabled(),
            listen: defaults::admin_listen(),
        }
    }
}
