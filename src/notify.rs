//! Tells a service manager what tether is doing (systemd's `Type=notify`
//! protocol): `READY=1` once every listener is bound and the pools are warm,
//! `RELOADING=1` while a reload is applied, `STOPPING=1` when the drain
//! starts, and a one-line `STATUS=` with each.
//! Without `NOTIFY_SOCKET` in the environment every call does nothing, so the
//! same binary runs under systemd, in a container, or by hand.

use sd_notify::NotifyState;

/// Tells the service manager that tether is serving; `status` is what
/// `systemctl status` shows.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells the service manager that tether is reloading its configuration
/// (`READY=1` follows when it is done), with the monotonic time systemd's
/// `Type=notify-reload` asks for.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading"),
        ]),
        Err(_) => send(&[NotifyState::Reloading, NotifyState::Status("reloading")]),
    }
}

/// Tells the service manager that tether is draining, so a stop that takes
/// up to `runtime.drain_timeout` is not mistaken for a hang.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        // The service manager then times the start out and says so itself;
        // tether keeps serving.
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}
