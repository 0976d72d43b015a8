//! Host → remote pod traffic. One NOARP device, `overlay0`, carries the node's `.0` address (as
//! flanneld's `flannel.1` does) and one route for the whole cluster network (and with IPv6, the
//! IPv6 subnet's first address and a route for the IPv6 network, as `flannel-v6.1`); encap runs on its TC
//! egress and redirects to the underlay, so nothing is ever transmitted on the device itself. No
//! per-peer routes, ARP or FDB entries. It is one end of a veth pair (`overlay0`/`overlay0p`):
//! veth exists on every kernel, where the dummy driver is often a module that is not loaded.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt as _;
use ipnet::{Ipv4Net, Ipv6Net};
use rtnetlink::{
    packet_route::{
        address::{AddressAttribute, AddressHeaderFlags, AddressMessage},
        route::{RouteAttribute, RouteMessage, RouteMetric, RouteScope},
    },
    Handle, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

/// The host device's name.
pub const HOST_DEVICE: &str = "overlay0";
/// Its veth peer (never addressed; packets encap does not take end there).
pub const HOST_DEVICE_PEER: &str = "overlay0p";

#[derive(Debug, thiserror::Error)]
pub enum HostRouteError {
    #[error("opening a netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("netlink, {what}: {source}")]
    Netlink {
        what: &'static str,
        source: rtnetlink::Error,
    },
    #[error("{0} did not appear after it was created")]
    Missing(&'static str),
}

fn nl(what: &'static str) -> impl FnOnce(rtnetlink::Error) -> HostRouteError {
    move |source| HostRouteError::Netlink { what, source }
}

/// Index of link `name`, if it exists (the kernel answers ENODEV for a name that does not).
pub(crate) async fn find_link(handle: &Handle, name: &str) -> Result<Option<u32>, rtnetlink::Error> {
    match handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link.map(|l| l.header.index)),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e),
    }
}

async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, HostRouteError> {
    find_link(handle, name)
        .await
        .map_err(nl("looking up the host device"))
}

/// Creates (or updates) the host device for our `subnet` inside the cluster `network`.
/// Idempotent: safe on every start and on every lease change; a correct address is left alone so
/// a restarting agent does not blip host traffic.
pub async fn ensure(subnet: Ipv4Net, network: Ipv4Net, mtu: u32) -> Result<(), HostRouteError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let conn = tokio::spawn(conn);
    let r = configure(&handle, subnet, network, mtu).await;
    conn.abort();
    r
}

/// Removes the host device (and its peer with it) if it exists; true if it did. The host-gw
/// backend routes host traffic per peer instead.
pub async fn remove() -> Result<bool, HostRouteError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let conn = tokio::spawn(conn);
    let r = async {
        let Some(dev) = link_index(&handle, HOST_DEVICE).await? else {
            return Ok(false);
        };
        handle
            .link()
            .del(dev)
            .execute()
            .await
            .map_err(nl("removing the host device"))?;
        Ok(true)
    }
    .await;
    conn.abort();
    r
}

/// The IPv6 side, as flanneld's `flannel-v6.1`: our IPv6 subnet's first address (`::`, /128) on
/// the host device and one route for the IPv6 network with `route_mtu` (the tunnel MTU over an
/// IPv6 underlay), so the stack sends Packet Too Big for anything larger. `dev_mtu` is the
/// device's own MTU (the IPv4 tunnel MTU), used only when this call creates the device.
pub async fn ensure_v6(
    subnet: Ipv6Net,
    network: Ipv6Net,
    dev_mtu: u32,
    route_mtu: u32,
) -> Result<(), HostRouteError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let conn = tokio::spawn(conn);
    let r = async {
        let dev = device(&handle, dev_mtu).await?;
        let addr = subnet.network();
        ensure_address(&handle, dev, IpAddr::V6(addr), 128).await?;
        let mut route = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(network.trunc().network(), network.prefix_len())
            .output_interface(dev)
            .pref_source(addr)
            .build();
        route
            .attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(route_mtu)]));
        replace_route(&handle, route, "routing the IPv6 cluster network").await
    }
    .await;
    conn.abort();
    r
}

/// Creates the device (a veth pair) if needed and brings it up, NOARP; its ifindex.
async fn device(handle: &Handle, mtu: u32) -> Result<u32, HostRouteError> {
    if link_index(handle, HOST_DEVICE).await?.is_none() {
        let veth = LinkVeth::new(HOST_DEVICE, HOST_DEVICE_PEER).build();
        handle
            .link()
            .add(veth)
            .execute()
            .await
            .map_err(nl("creating the host device"))?;
    }
    let dev = link_index(handle, HOST_DEVICE)
        .await?
        .ok_or(HostRouteError::Missing(HOST_DEVICE))?;
    let peer = link_index(handle, HOST_DEVICE_PEER)
        .await?
        .ok_or(HostRouteError::Missing(HOST_DEVICE_PEER))?;
    let up = LinkUnspec::new_with_index(peer).up().build();
    handle
        .link()
        .set(up)
        .execute()
        .await
        .map_err(nl("bringing the host device's peer up"))?;
    let set = LinkUnspec::new_with_index(dev).mtu(mtu).arp(false).up().build();
    handle
        .link()
        .set(set)
        .execute()
        .await
        .map_err(nl("setting up the host device"))?;
    Ok(dev)
}

/// Makes `addr/prefix` the device's only address of its family (IPv6 link-local addresses the
/// kernel adds are left alone); a correct address is not touched.
async fn ensure_address(handle: &Handle, dev: u32, addr: IpAddr, prefix: u8) -> Result<(), HostRouteError> {
    let ours = |m: &AddressMessage| {
        m.attributes.iter().find_map(|at| match at {
            AddressAttribute::Address(a) if a.is_ipv4() == addr.is_ipv4() => match a {
                IpAddr::V6(v6) if v6.is_unicast_link_local() => None,
                _ => Some(*a),
            },
            _ => None,
        })
    };
    let current: Vec<(AddressMessage, IpAddr)> = handle
        .address()
        .get()
        .set_link_index_filter(dev)
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .map_err(nl("listing the host device's addresses"))?
        .into_iter()
        .filter_map(|m| ours(&m).map(|a| (m, a)))
        .collect();
    if let [(m, a)] = current.as_slice() {
        if *a == addr && m.header.prefix_len == prefix {
            return Ok(());
        }
    }
    for (m, _) in current {
        handle
            .address()
            .del(m)
            .execute()
            .await
            .map_err(nl("removing a stale address"))?;
    }
    let mut add = handle.address().add(dev, addr, prefix);
    // No duplicate address detection: a tentative IPv6 address cannot be a route's preferred
    // source yet, and adding the route right after it failed with EINVAL (2 of 6 test runs).
    // The device is NOARP and the address ours alone.
    add.message_mut().header.flags |= AddressHeaderFlags::Nodad;
    add.execute()
        .await
        .map_err(nl("adding the node's address to the host device"))
}

async fn configure(
    handle: &Handle,
    subnet: Ipv4Net,
    network: Ipv4Net,
    mtu: u32,
) -> Result<(), HostRouteError> {
    let dev = device(handle, mtu).await?;
    let addr = subnet.network();
    ensure_address(handle, dev, IpAddr::V4(addr), 32).await?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(network.trunc().network(), network.prefix_len())
        .output_interface(dev)
        .pref_source(addr)
        .scope(RouteScope::Link)
        .build();
    replace_route(handle, route, "routing the cluster network").await
}

/// Adds `route`, replacing one to the same destination.
async fn replace_route(
    handle: &Handle,
    route: RouteMessage,
    what: &'static str,
) -> Result<(), HostRouteError> {
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(nl(what))
}
