//! Raw rtnetlink and getifaddrs queries the underlay choice needs: the route to an address
//! (`ip route get`), an interface's IPv6 addresses with their flags, the network an address is
//! configured with.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// One IPv6 address of an interface with its `IFA_F_*` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V6Addr {
    pub addr: Ipv6Addr,
    pub flags: u32,
}

/// Sends one rtnetlink request with `flags` on a new NETLINK_ROUTE socket, returned for the
/// replies.
fn rtnl_request(
    msg: rtnetlink::packet_route::RouteNetlinkMessage,
    flags: u16,
) -> Result<rtnetlink::sys::Socket, String> {
    use rtnetlink::{
        packet_core::NetlinkMessage,
        sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr},
    };
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = flags;
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);
    let io = |e: std::io::Error| e.to_string();
    let mut sock = Socket::new(NETLINK_ROUTE).map_err(io)?;
    sock.bind_auto().map_err(io)?;
    sock.connect(&SocketAddr::new(0, 0)).map_err(io)?;
    sock.send(&buf, 0).map_err(io)?;
    Ok(sock)
}

/// `ip route get dst` over netlink: (output ifindex, preferred source).
pub fn route_get(dst: Ipv4Addr) -> Result<(u32, Option<Ipv4Addr>), String> {
    let r = route_to(IpAddr::V4(dst))?;
    let src = match r.src {
        Some(IpAddr::V4(a)) => Some(a),
        _ => None,
    };
    Ok((r.oif, src))
}

/// The kernel's route to one address, as `ip route get` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteTo {
    pub oif: u32,
    pub src: Option<IpAddr>,
    /// `via`: none for an address on a connected network (on-link).
    pub gateway: Option<IpAddr>,
}

/// `ip route get dst` over netlink, either family.
pub fn route_to(dst: IpAddr) -> Result<RouteTo, String> {
    use rtnetlink::{
        packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST},
        packet_route::{
            route::{RouteAddress, RouteAttribute, RouteMessage},
            AddressFamily, RouteNetlinkMessage,
        },
    };
    let addr = |a: &RouteAddress| match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    };
    let mut msg = RouteMessage::default();
    let (family, len, d) = match dst {
        IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
        IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
    };
    msg.header.address_family = family;
    msg.header.destination_prefix_length = len;
    msg.attributes.push(RouteAttribute::Destination(d));
    let sock = rtnl_request(RouteNetlinkMessage::GetRoute(msg), NLM_F_REQUEST)?;
    let io = |e: std::io::Error| e.to_string();
    let mut rx = vec![0; 8192];
    let n = sock.recv(&mut &mut rx[..], 0).map_err(io)?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[..n]).map_err(|e| e.to_string())?;
    match reply.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(m)) => {
            let (mut oif, mut src, mut gateway) = (None, None, None);
            for a in &m.attributes {
                match a {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::PrefSource(a) => src = addr(a),
                    RouteAttribute::Gateway(a) => gateway = addr(a),
                    _ => {}
                }
            }
            Ok(RouteTo {
                oif: oif.ok_or("the route has no output interface")?,
                src,
                gateway,
            })
        }
        NetlinkPayload::Error(e) => Err(e.to_io().to_string()),
        other => Err(format!("unexpected netlink reply {other:?}")),
    }
}

/// The IPv6 addresses of interface `ifindex` with their flags (`RTM_GETADDR` dump).
pub fn ipv6_addrs(ifindex: u32) -> Result<Vec<V6Addr>, String> {
    use rtnetlink::{
        packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST},
        packet_route::{
            address::{AddressAttribute, AddressMessage},
            AddressFamily, RouteNetlinkMessage,
        },
    };
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet6;
    let sock = rtnl_request(RouteNetlinkMessage::GetAddress(msg), NLM_F_REQUEST | NLM_F_DUMP)?;
    let io = |e: std::io::Error| e.to_string();
    let mut out = Vec::new();
    let mut rx = vec![0; 65536];
    loop {
        let n = sock.recv(&mut &mut rx[..], 0).map_err(io)?;
        let mut off = 0;
        while off < n {
            let msg =
                NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[off..n]).map_err(|e| e.to_string())?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => return Err(e.to_io().to_string()),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(m))
                    if m.header.index == ifindex =>
                {
                    let mut addr = None;
                    let mut flags = u32::from(m.header.flags.bits());
                    for a in m.attributes {
                        match a {
                            AddressAttribute::Address(IpAddr::V6(ip)) => addr = Some(ip),
                            AddressAttribute::Flags(f) => flags = f.bits(),
                            _ => {}
                        }
                    }
                    out.extend(addr.map(|addr| V6Addr { addr, flags }));
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += len;
        }
    }
}

/// The network `addr` (either family) is configured with on `iface` (address + netmask).
pub fn connected_network(iface: &str, addr: IpAddr) -> Option<IpNet> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    for a in addrs.filter(|a| a.interface_name == iface) {
        let (Some(ip), Some(mask)) = (a.address.as_ref(), a.netmask.as_ref()) else {
            continue;
        };
        let (ip, prefix) = match (
            ip.as_sockaddr_in(),
            mask.as_sockaddr_in(),
            ip.as_sockaddr_in6(),
            mask.as_sockaddr_in6(),
        ) {
            (Some(ip), Some(m), _, _) => (IpAddr::V4(ip.ip()), u32::from(m.ip()).leading_ones()),
            (_, _, Some(ip), Some(m)) => (IpAddr::V6(ip.ip()), u128::from(m.ip()).leading_ones()),
            _ => continue,
        };
        if ip == addr {
            return IpNet::new(ip, prefix as u8).ok().map(|n| n.trunc());
        }
    }
    None
}
