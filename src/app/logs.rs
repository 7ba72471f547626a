//! Starting the access and connection logs from `[log]`: each log's writer
//! thread, its dropped-lines counter, and the hand-over to the listeners'
//! bindings and the pools.

use crate::accesslog::{AccessLog, LogError, Sink, SinkSettings};
use crate::config::LogConfig;
use crate::metrics::{LogLabel, Metrics};
use crate::pool::{Pool, PoolObservers};

/// The logs that are on.
pub(crate) struct Logs {
    /// `[log.access]`, for every listener's binding.
    pub(crate) access: Option<AccessLog>,
    /// `[log.connections]`, for every pool.
    connections: Option<Sink>,
}

impl Logs {
    /// Starts the writer of each log that is on.
    pub(crate) fn start(config: &LogConfig, metrics: &Metrics) -> Result<Self, LogError> {
        let sink = |settings: SinkSettings| {
            let dropped = metrics
                .log_lines_dropped
                .get_or_create(&LogLabel { log: settings.log })
                .clone();
            Sink::start(&settings, dropped)
        };
        let access = match config.access.enabled {
            true => Some(AccessLog {
                sink: sink(SinkSettings::from(&config.access))?,
                max_target_bytes: config.access.max_target_bytes,
            }),
            false => None,
        };
        let connections = match config.connections.enabled {
            true => Some(sink(SinkSettings::from(&config.connections))?),
            false => None,
        };
        Ok(Self {
            access,
            connections,
        })
    }

    /// Waits, up to `limit` each, until the lines queued so far are written.
    pub(crate) async fn settle(&self, limit: std::time::Duration) {
        if let Some(access) = &self.access {
            access.sink.settle(limit).await;
        }
        if let Some(connections) = &self.connections {
            connections.settle(limit).await;
        }
    }

    /// Gives every pool share its histograms and the connection log.
    pub(crate) fn observe(&self, pools: &[Pool], metrics: &Metrics) {
        for pool in pools {
            pool.observe(PoolObservers::new(
                metrics,
                pool.name(),
                self.connections.clone(),
            ));
        }
    }
}
