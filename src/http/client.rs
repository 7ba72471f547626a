//! What the proxy service knows of, and asks of, the client connection it
//! serves. The client leg sits above this module and implements the trait, so
//! the service never names the type that carries a connection's state.

use super::body::ExchangeDone;

/// The client connection a [`ProxyService`](super::ProxyService) answers on.
///
/// Every request calls several of these, so the service is generic over its
/// implementor rather than holding an `Arc<dyn ClientConnection>`: the calls
/// stay direct (and inlinable) loads and stores on the connection's state, and
/// there is a single implementor, so nothing is compiled twice.
pub trait ClientConnection: ExchangeDone + 'static {
    /// A request head was parsed and handed to the service: the connection's
    /// header and idle timeouts stop until the exchange is done.
    fn exchange_started(&self);

    /// Counts a request; returns how many the connection has carried.
    fn count_request(&self) -> u64;

    /// Whether the process is draining: the exchange being served is the
    /// connection's last.
    fn draining(&self) -> bool;

    /// The exchange being served ends the connection and its client may be
    /// closed gracefully: tether sends its FIN right behind the last response
    /// byte, in the same flush, so a client that closes as soon as it has read
    /// the response finds the FIN already there and closes passively.
    fn fin_after_response(&self);

    /// The client sent something tether refused; it gets no graceful close.
    fn mark_misbehaved(&self);
}
