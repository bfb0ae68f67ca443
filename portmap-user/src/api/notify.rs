//! systemd notifications for `Type=notify` units: `READY=1` once the datapath is attached and
//! the mappings applied, `STATUS=` with counts, `RELOADING=1` (with `MONOTONIC_USEC`) then
//! `READY=1` around every reload, `STOPPING=1`, and `WATCHDOG=1` when the unit sets
//! `WatchdogSec`. Without `NOTIFY_SOCKET` (not started by systemd) each is a no-op.

use std::time::Duration;

use log::warn;
use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("systemd notification ({states:?}) failed: {e}");
    }
}

/// Start-up is done: traffic is forwarded and the control socket answers.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload starts (SIGHUP or `portmap reload`); `ready` ends it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(e) => warn!("reading CLOCK_MONOTONIC for the reload notification: {e}"),
    }
}

/// The status line `systemctl status` shows.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Shutdown starts: programs are detached next.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// How often to send `WATCHDOG=1`: half the unit's `WatchdogSec`, as sd_watchdog_enabled(3)
/// recommends; `None` when no watchdog is set (or it is meant for another process).
#[must_use]
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

/// The daemon's main loop is alive.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}
