//! Receive GRO for our VXLAN port. The kernel merges the MTU-sized frames of a UDP tunnel into
//! one GSO packet only when a socket with a `gro_receive` handler owns the destination port
//! (`udp_gro_receive`); `flannel.1` owns 8472 and gets it, TC decap alone does not, so on a NIC
//! every frame is stripped and delivered on its own. This module keeps one collect-metadata
//! (`external`) VXLAN device, `overlay-gro`, on the port: its socket makes the NIC's GRO merge
//! our frames before decap on the NIC's TC ingress strips them, whole.
//!
//! The device never carries a packet. Decap takes every valid frame before the socket sees it;
//! what the socket still gets (frames decap leaves to the stack: to another local address, with
//! IP options) it would deliver through the device, so a TC program there drops it
//! (`drop_gro_device`). It has no address (IPv6 off), no route points at it, and a
//! collect-metadata device drops what it is asked to send without tunnel metadata.

use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVxlan};

use crate::node::hostdev::HostRouteError;

/// The device's name.
pub const GRO_DEVICE: &str = "overlay-gro";

fn nl(what: &'static str) -> impl FnOnce(rtnetlink::Error) -> HostRouteError {
    move |source| HostRouteError::Netlink { what, source }
}

/// Creates the device for `port` (replacing one an earlier agent left, whose port may differ)
/// and brings it up.
pub async fn ensure(port: u16) -> Result<(), HostRouteError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let conn = tokio::spawn(conn);
    let r = create(&handle, port).await;
    conn.abort();
    r
}

/// Removes the device if it exists; true if it did.
pub async fn remove() -> Result<bool, HostRouteError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let conn = tokio::spawn(conn);
    let r = delete(&handle).await;
    conn.abort();
    r
}

async fn index(handle: &Handle) -> Result<Option<u32>, HostRouteError> {
    crate::node::hostdev::find_link(handle, GRO_DEVICE)
        .await
        .map_err(nl("looking up the receive-GRO device"))
}

/// Deletes the device if it exists; true if it did.
async fn delete(handle: &Handle) -> Result<bool, HostRouteError> {
    let Some(i) = index(handle).await? else {
        return Ok(false);
    };
    handle
        .link()
        .del(i)
        .execute()
        .await
        .map_err(nl("removing the receive-GRO device"))?;
    Ok(true)
}

async fn create(handle: &Handle, port: u16) -> Result<(), HostRouteError> {
    delete(handle).await?;
    let vxlan = LinkMessageBuilder::<LinkVxlan>::new(GRO_DEVICE)
        .port(port)
        .collect_metadata(true)
        .learning(false)
        .build();
    handle.link().add(vxlan).execute().await.map_err(nl(
        "creating the receive-GRO device (a VXLAN device in external mode)",
    ))?;
    let dev = index(handle).await?.ok_or(HostRouteError::Missing(GRO_DEVICE))?;
    // No IPv6 link-local address, so the device never has anything of its own to send.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{GRO_DEVICE}/disable_ipv6"), "1");
    let up = LinkUnspec::new_with_index(dev).arp(false).up().build();
    handle.link().set(up).execute().await.map_err(nl(
        "bringing the receive-GRO device up (its VXLAN socket binds the port)",
    ))
}
