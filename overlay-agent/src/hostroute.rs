//! Host → remote pod traffic. One NOARP device, `overlay0`, carries the node's `.0` address (as
//! flanneld's `flannel.1` does) and one route for the whole cluster network; encap runs on its TC
//! egress and redirects to the underlay, so nothing is ever transmitted on the device itself. No
//! per-peer routes, ARP or FDB entries. It is one end of a veth pair (`overlay0`/`overlay0p`):
//! veth exists on every kernel, where the dummy driver is often a module that is not loaded.

use std::process::Command;

use ipnet::Ipv4Net;

/// The host device's name.
pub const HOST_DEVICE: &str = "overlay0";
/// Its veth peer (never addressed; packets encap does not take end there).
pub const HOST_DEVICE_PEER: &str = "overlay0p";

#[derive(Debug, thiserror::Error)]
pub enum HostRouteError {
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("running ip: {0}")]
    Spawn(#[from] std::io::Error),
}

fn ip(args: &[&str]) -> Result<(), HostRouteError> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(HostRouteError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Creates (or updates) the host device for our `subnet` inside the cluster `network`.
/// Idempotent: safe on every start and on every lease change.
pub fn ensure(subnet: Ipv4Net, network: Ipv4Net, mtu: u32) -> Result<(), HostRouteError> {
    if ip(&["link", "show", HOST_DEVICE]).is_err() {
        ip(&[
            "link",
            "add",
            HOST_DEVICE,
            "type",
            "veth",
            "peer",
            "name",
            HOST_DEVICE_PEER,
        ])?;
    }
    ip(&["link", "set", HOST_DEVICE_PEER, "up"])?;
    ip(&[
        "link",
        "set",
        HOST_DEVICE,
        "mtu",
        &mtu.to_string(),
        "arp",
        "off",
        "up",
    ])?;
    let addr = subnet.network();
    // Leave a correct address alone (a restarting agent must not blip host traffic).
    let current = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", HOST_DEVICE])
        .output()?;
    let text = String::from_utf8_lossy(&current.stdout);
    let want = format!("inet {addr}/32 ");
    if !text.contains(&want) || text.lines().count() != 1 {
        ip(&["addr", "flush", "dev", HOST_DEVICE])?;
        ip(&["addr", "add", &format!("{addr}/32"), "dev", HOST_DEVICE])?;
    }
    ip(&[
        "route",
        "replace",
        &network.trunc().to_string(),
        "dev",
        HOST_DEVICE,
        "src",
        &addr.to_string(),
    ])?;
    Ok(())
}

/// Removes the host device (and with it its address and route). Missing is fine.
pub fn remove() -> Result<(), HostRouteError> {
    if ip(&["link", "show", HOST_DEVICE]).is_ok() {
        ip(&["link", "del", HOST_DEVICE])?;
    }
    Ok(())
}
