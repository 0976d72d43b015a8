//! systemd `Type=notify`: READY=1 once the node can carry traffic, STOPPING=1 on shutdown.
//! Without `NOTIFY_SOCKET` (not under systemd) every call is a no-op.

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// The lease is held, subnet.env written and the programs attached.
pub fn ready(subnet: ipnet::IpNet) {
    let status = format!("holding {subnet}");
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// Shutting down (SIGTERM/SIGINT).
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    match sd_notify::notify(states) {
        Ok(()) => debug!(?states, "notified systemd"),
        Err(e) => warn!(error = %e, "sd_notify failed"),
    }
}
