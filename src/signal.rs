//! Turns SIGTERM and SIGINT into shutdown steps: the first stops receiving and lets
//! running jobs finish within the grace period, the second cancels them at once. Each
//! step is also told to systemd (`notify`).

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};

use crate::daemon::Shutdown;
use crate::ops::notify;

/// SIGTERM and SIGINT handlers, installed: from then on these signals no longer kill the
/// process, so `main` installs them before it tells systemd it is ready.
pub struct Signals {
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    /// Installs the handlers; must be called inside the tokio runtime.
    ///
    /// # Errors
    /// When the signal handlers cannot be installed.
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for signals and drives `shutdown`; returns after the second signal.
    pub async fn forward(mut self, shutdown: Shutdown) {
        let first = self.next().await;
        info!(
            signal = first,
            "Shutting down: finishing running jobs (send again to stop at once)."
        );
        crate::ops::telemetry::get().set_ready(false);
        notify::stopping("Stopping: finishing running jobs.");
        shutdown.stop.cancel();

        let second = self.next().await;
        warn!(signal = second, "Second signal: cancelling running jobs.");
        notify::status("Stopping: cancelling running jobs.");
        shutdown.abort.cancel();
    }

    /// The name of the next signal received.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}
