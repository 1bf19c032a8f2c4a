//! Turns SIGTERM and SIGINT into shutdown steps: the first stops receiving and lets
//! running jobs finish within the grace period, the second cancels them at once.

use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::daemon::Shutdown;

/// Waits for signals and drives `shutdown`; returns after the second signal.
///
/// # Errors
/// When the signal handlers cannot be installed.
pub async fn forward_signals(shutdown: Shutdown) -> std::io::Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let name = |term: bool| if term { "SIGTERM" } else { "SIGINT" };

    let first = tokio::select! {
        _ = terminate.recv() => true,
        _ = interrupt.recv() => false,
    };
    info!(
        signal = name(first),
        "Shutting down: finishing running jobs (send again to stop at once)."
    );
    shutdown.stop.cancel();

    let second = tokio::select! {
        _ = terminate.recv() => true,
        _ = interrupt.recv() => false,
    };
    warn!(
        signal = name(second),
        "Second signal: cancelling running jobs."
    );
    shutdown.abort.cancel();
    Ok(())
}
