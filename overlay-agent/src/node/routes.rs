//! Per-peer routes as flanneld's host-gw writes them: `SUBNET via PUBLICIP dev IFACE` in the
//! main table (no protocol, metric or source of their own, exactly like its `netlink.RouteAdd`),
//! added or replaced, deleted, and listed so what is missing or left over can be found.

use std::net::IpAddr;

use futures::TryStreamExt as _;
use ipnet::IpNet;
use rtnetlink::{
    packet_route::{
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol},
        AddressFamily,
    },
    Handle, RouteMessageBuilder,
};

use super::hostdev::HostRouteError;

/// The main routing table.
const RT_TABLE_MAIN: u32 = 254;

/// One route to a peer's subnet through its PublicIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerRoute {
    pub dst: IpNet,
    pub via: IpAddr,
}

impl std::fmt::Display for PeerRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} via {}", self.dst, self.via)
    }
}

/// A netlink connection for the routes via one interface.
pub struct Routes {
    handle: Handle,
    conn: tokio::task::JoinHandle<()>,
    ifindex: u32,
}

impl Drop for Routes {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

fn nl(what: &'static str) -> impl FnOnce(rtnetlink::Error) -> HostRouteError {
    move |source| HostRouteError::Netlink { what, source }
}

impl Routes {
    pub fn open(ifindex: u32) -> Result<Self, HostRouteError> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        Ok(Routes {
            handle,
            conn: tokio::spawn(conn),
            ifindex,
        })
    }

    fn message(&self, r: PeerRoute) -> RouteMessage {
        RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(r.dst.network(), r.dst.prefix_len())
            .and_then(|b| b.gateway(r.via))
            .expect("a PeerRoute's destination and gateway are of one family")
            .output_interface(self.ifindex)
            // What `ip route add` and flanneld's netlink.RouteAdd give a route (rtnetlink's
            // builder would say `static`).
            .protocol(RouteProtocol::Boot)
            .build()
    }

    /// Adds the route, replacing one to the same destination (flanneld deletes a differing one
    /// and adds its own). The kernel refuses a gateway that is not on-link.
    pub async fn replace(&self, r: PeerRoute) -> Result<(), HostRouteError> {
        self.handle
            .route()
            .add(self.message(r))
            .replace()
            .execute()
            .await
            .map_err(nl("adding a route to a peer's subnet"))
    }

    /// Deletes the route; one that is already gone is not an error.
    pub async fn delete(&self, r: PeerRoute) -> Result<(), HostRouteError> {
        match self.handle.route().del(self.message(r)).execute().await {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
            other => other.map_err(nl("deleting a route to a peer's subnet")),
        }
    }

    /// The main table's routes through a gateway on our interface whose destination lies in
    /// one of `within` (the cluster networks): ours, a flanneld's before us, or ones by hand.
    pub async fn list(&self, within: &[IpNet]) -> Result<Vec<PeerRoute>, HostRouteError> {
        let mut found = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            if !within
                .iter()
                .any(|n| matches!(n, IpNet::V4(_)) == (family == AddressFamily::Inet))
            {
                continue;
            }
            let mut dump = RouteMessage::default();
            dump.header.address_family = family;
            let msgs: Vec<RouteMessage> = self
                .handle
                .route()
                .get(dump)
                .execute()
                .try_collect()
                .await
                .map_err(nl("listing routes"))?;
            found.extend(
                msgs.iter()
                    .filter_map(|m| self.peer_route(m))
                    .filter(|r| within.iter().any(|n| n.contains(&r.dst))),
            );
        }
        Ok(found)
    }

    fn peer_route(&self, m: &RouteMessage) -> Option<PeerRoute> {
        let addr = |a: &RouteAddress| match a {
            RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
            RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
            _ => None,
        };
        let (mut dst, mut via, mut oif, mut table) = (None, None, None, u32::from(m.header.table));
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(a) => dst = addr(a),
                RouteAttribute::Gateway(a) => via = addr(a),
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Table(t) => table = *t,
                _ => {}
            }
        }
        if table != RT_TABLE_MAIN || oif != Some(self.ifindex) {
            return None;
        }
        let dst = IpNet::new(dst?, m.header.destination_prefix_length).ok()?;
        Some(PeerRoute { dst, via: via? })
    }
}
