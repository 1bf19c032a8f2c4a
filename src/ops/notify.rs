//! The systemd notify protocol (`Type=notify`): tells the service manager that orchgpu is
//! ready, what it is doing, that it is stopping, and (with `WatchdogSec=`) that it is alive.
//!
//! This module owns only the messages; `main` decides when orchgpu is ready, `signal`
//! when it starts stopping, and `main`'s watchdog task when it is alive. Outside systemd (`NOTIFY_SOCKET` unset) every call does nothing.
//! A failed send is logged and otherwise ignored: a missing status line must never stop
//! the daemon.

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// Sends `READY=1` with a status line: start-up is over and messages are being received.
pub(crate) fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(&one_line(status))]);
}

/// Sends `STOPPING=1` with a status line: shutdown has begun.
pub(crate) fn stopping(status: &str) {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status(&one_line(status)),
    ]);
}

/// The watchdog interval systemd asks for (`WatchdogSec=`), if any.
pub(crate) fn watchdog_interval() -> Option<std::time::Duration> {
    sd_notify::watchdog_enabled()
}

/// Sends `WATCHDOG=1`: the daemon is alive and making progress.
pub(crate) fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// Sends a `STATUS=` line, shown by `systemctl status`.
pub(crate) fn status(status: &str) {
    send(&[NotifyState::Status(&one_line(status))]);
}

/// The protocol is one `NAME=value` per line: a newline in a status would start a field.
fn one_line(status: &str) -> String {
    status.replace(['\n', '\r'], " ")
}

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    // One small datagram on a local socket: it does not block for long.
    match sd_notify::notify(states) {
        Ok(()) => debug!(states = ?states, "Notified the service manager."),
        Err(e) => warn!(error = %e, "Cannot notify the service manager."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_stays_on_one_line() {
        assert_eq!(one_line("a\nREADY=1\r"), "a READY=1 ");
    }
}
