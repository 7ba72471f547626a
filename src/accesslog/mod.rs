//! The access log (one line per request) and the connection log (one line per
//! upstream connection that ends), written off the request path.
//!
//! The request path only formats a line and offers it to a bounded queue with
//! `try_send`; one thread per log, with blocking writes, empties the queue into
//! a file or standard output. A sink that is slow, or never read (a FIFO with
//! no reader), fills the queue, and further lines are dropped and counted
//! (`tether_log_lines_dropped_total`): a log never delays a request, and never
//! holds more than `buffer_lines` lines in memory.
//!
//! A leaf: the layers above fill the records ([`AccessRecord`],
//! [`ConnectionRecord`]) and hand them to a [`Sink`].

mod record;
mod sink;

pub use record::{ms, truncate_target, AccessRecord, ConnectionRecord, UpstreamFacts};
pub use sink::{Sink, SinkSettings};

/// The access log as a listener's requests use it.
#[derive(Debug, Clone)]
pub struct AccessLog {
    /// Where its lines go.
    pub sink: Sink,
    /// `log.access.max_target_bytes`.
    pub max_target_bytes: usize,
}

/// Failures to start a log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log file could not be opened for append.
    #[error("cannot open the {log} log {path}: {source}")]
    Open {
        /// `access` or `connections`.
        log: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The writer thread could not be started.
    #[error("cannot start the {log} log's writer thread: {source}")]
    Thread {
        /// `access` or `connections`.
        log: &'static str,
        /// Why.
        source: std::io::Error,
    },
}
