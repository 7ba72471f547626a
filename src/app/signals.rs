//! The signals a running tether acts on: SIGTERM and SIGINT drain, SIGHUP
//! reloads the configuration file. All three handlers
//! are installed together, before anything binds, so a signal that arrives
//! while tether starts never meets its default action (SIGHUP's would end
//! the process).

use tokio::signal::unix::{signal, SignalKind};

/// What arrived.
pub(crate) enum Signal {
    Terminate,
    Interrupt,
    Hangup,
}

/// Handlers for SIGTERM, SIGINT and SIGHUP.
pub(crate) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the three handlers; call it on the runtime that will wait.
    pub(crate) fn watch() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal.
    pub(crate) async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => {
                tracing::info!("SIGTERM received");
                Signal::Terminate
            }
            _ = self.int.recv() => {
                tracing::info!("SIGINT received");
                Signal::Interrupt
            }
            _ = self.hup.recv() => Signal::Hangup,
        }
    }

    /// Waits for SIGTERM or SIGINT, calling `on_hangup` at every SIGHUP.
    pub(crate) async fn stop_requested(&mut self, mut on_hangup: impl FnMut()) {
        loop {
            match self.next().await {
                Signal::Hangup => {
                    tracing::info!("SIGHUP received: reloading the configuration");
                    on_hangup();
                }
                Signal::Terminate | Signal::Interrupt => return,
            }
        }
    }
}

/// Ignores SIGHUP from now until `Signals::watch` installs its handler, so
/// a SIGHUP that arrives while tether loads its configuration is not fatal.
/// Call it first thing in `tether run`.
#[allow(unsafe_code)]
pub fn ignore_hangup() {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler
    // code; tokio's later sigaction replaces it.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}
