//! The process-wide drain: two tokens every accept loop and client
//! connection watches. `drain` says "finish the exchange in flight, then end
//! the connection"; `force` says the drain deadline passed: reset now.

use tokio_util::sync::CancellationToken;

/// Signals a connection task listens to.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// Draining: finish the exchange in flight, then end the connection.
    pub drain: CancellationToken,
    /// Drain deadline passed: reset now.
    pub force: CancellationToken,
}
