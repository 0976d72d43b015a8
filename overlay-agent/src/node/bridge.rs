//! The pod bridge as netlink sees it: its ifindex, MAC and own addresses, its ports, its FDB
//! (pod MAC → port) and its IPv4 and IPv6 neighbour tables (pod IP → MAC), dumped as one
//! [`Discovery`]. A task subscribed to `RTNLGRP_LINK` and `RTNLGRP_NEIGH` (FDB changes arrive
//! there too) dumps the three tables [`DEBOUNCE`] after a change that may concern the bridge, at
//! once when a port or the bridge is deleted (a stale ifindex would black-hole the pod), and
//! every [`RESYNC_EVERY`] regardless ([`watch`]). Which of these are pods is decided in
//! `reconcile::endpoints`.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use futures::{channel::mpsc::UnboundedReceiver, StreamExt as _, TryStreamExt as _};
use rtnetlink::{
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::{
        address::{AddressAttribute, AddressMessage},
        link::{LinkAttribute, LinkMessage},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
        AddressFamily, RouteNetlinkMessage,
    },
    sys::SocketAddr,
    Handle, MulticastGroup,
};
use tokio::{
    sync::watch,
    task::JoinHandle,
    time::{Instant, MissedTickBehavior},
};
use tracing::{error, info, warn};

use crate::family::{Family, V4, V6};

/// A change that may concern the bridge is acted on this long after it arrived, so the burst of
/// notifications one pod start or stop causes becomes one resync.
pub const DEBOUNCE: Duration = Duration::from_millis(20);
/// The safety net: a full resync this often, whatever netlink said (or failed to say).
pub const RESYNC_EVERY: Duration = Duration::from_secs(5);
/// One resync's three dumps must finish within this.
const DUMP_TIMEOUT: Duration = Duration::from_secs(3);

// Neighbour (NUD) states, as in <linux/neighbour.h>.
pub const NUD_INCOMPLETE: u16 = 0x01;
pub const NUD_REACHABLE: u16 = 0x02;
pub const NUD_STALE: u16 = 0x04;
pub const NUD_DELAY: u16 = 0x08;
pub const NUD_PROBE: u16 = 0x10;
pub const NUD_FAILED: u16 = 0x20;
pub const NUD_NOARP: u16 = 0x40;
pub const NUD_PERMANENT: u16 = 0x80;
/// States whose link-layer address the host stands behind.
pub const NUD_USABLE: u16 = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT | NUD_NOARP;
/// States of a neighbour being (or having failed to be) resolved.
pub const NUD_UNRESOLVED: u16 = NUD_INCOMPLETE | NUD_FAILED;

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("opening a netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("netlink, {what}: {source}")]
    Netlink {
        what: &'static str,
        source: rtnetlink::Error,
    },
    #[error("the netlink dumps took longer than {0:?}")]
    Timeout(Duration),
}

fn nl(what: &'static str) -> impl FnOnce(rtnetlink::Error) -> EndpointError {
    move |source| EndpointError::Netlink { what, source }
}

/// The pod bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BridgeLink {
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// One bridge FDB entry (AF_BRIDGE neighbour): `mac` is behind `port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdbEntry {
    pub mac: [u8; 6],
    pub port: u32,
    /// `NDA_MASTER`: the bridge whose table this is (absent for a device's own entries).
    pub master: Option<u32>,
    /// NUD state bits (`NUD_PERMANENT`: a local address of the port or bridge).
    pub state: u16,
}

/// One IPv4 (or IPv6) neighbour entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour<F: Family = V4> {
    pub ip: F::Addr,
    pub ifindex: u32,
    /// `None` while unresolved.
    pub mac: Option<[u8; 6]>,
    /// NUD state bits.
    pub state: u16,
}

/// What netlink said about the bridge, before any filtering.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Discovery {
    /// `None`: there is no link of the bridge's name.
    pub bridge: Option<BridgeLink>,
    /// Links whose master is the bridge.
    pub ports: BTreeSet<u32>,
    pub fdb: Vec<FdbEntry>,
    pub neighbours: Vec<Neighbour>,
    pub neighbours6: Vec<Neighbour<V6>>,
    /// The bridge's own addresses (never a pod's).
    pub bridge_addrs: BTreeSet<IpAddr>,
}

/// What discovery needs of an address family: its netlink family, its neighbours in a
/// discovery, the address of a neighbour message.
pub trait NeighbourFamily: Family {
    /// `AF_INET` / `AF_INET6`.
    const FAMILY: AddressFamily;
    fn neighbours(d: &Discovery) -> &[Neighbour<Self>];
    /// The address of a neighbour message of this family.
    fn from_neighbour(a: &NeighbourAddress) -> Option<Self::Addr>;
}

impl NeighbourFamily for V4 {
    const FAMILY: AddressFamily = AddressFamily::Inet;
    fn neighbours(d: &Discovery) -> &[Neighbour<Self>] {
        &d.neighbours
    }
    fn from_neighbour(a: &NeighbourAddress) -> Option<Ipv4Addr> {
        match a {
            NeighbourAddress::Inet(ip) => Some(*ip),
            _ => None,
        }
    }
}

impl NeighbourFamily for V6 {
    const FAMILY: AddressFamily = AddressFamily::Inet6;
    fn neighbours(d: &Discovery) -> &[Neighbour<Self>] {
        &d.neighbours6
    }
    fn from_neighbour(a: &NeighbourAddress) -> Option<Ipv6Addr> {
        match a {
            NeighbourAddress::Inet6(ip) => Some(*ip),
            _ => None,
        }
    }
}

/// Discoveries from the netlink task, newest first: a slow agent loop skips stale ones.
pub struct EndpointWatch {
    rx: Option<watch::Receiver<Option<Discovery>>>,
}

/// Starts the netlink task that watches `bridge`.
pub fn watch(bridge: &str) -> EndpointWatch {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(track(bridge.to_string(), tx));
    EndpointWatch { rx: Some(rx) }
}

impl EndpointWatch {
    /// A watch that never yields (no endpoint map to keep).
    pub fn none() -> Self {
        EndpointWatch { rx: None }
    }

    /// The next discovery; never resolves once the task is gone (or was never started).
    pub async fn next(&mut self) -> Discovery {
        loop {
            let Some(rx) = &mut self.rx else {
                return std::future::pending().await;
            };
            if rx.changed().await.is_err() {
                error!("the local endpoint watcher stopped; the endpoint map is no longer kept in step");
                self.rx = None;
                continue;
            }
            if let Some(d) = rx.borrow_and_update().clone() {
                return d;
            }
        }
    }
}

/// A netlink connection whose driver task ends with it.
struct Conn {
    handle: Handle,
    task: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Notifications = UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>;

/// The bridge and ports of the latest discovery: which notifications matter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Known {
    pub bridge: Option<u32>,
    pub ports: BTreeSet<u32>,
}

impl From<&Discovery> for Known {
    fn from(d: &Discovery) -> Self {
        Known {
            bridge: d.bridge.map(|b| b.ifindex),
            ports: d.ports.clone(),
        }
    }
}

/// How soon a notification calls for a resync: at once when the bridge or one of its ports is
/// deleted (or notifications were lost), after [`DEBOUNCE`] for other link changes and for
/// neighbour (IPv4 and IPv6) and FDB changes on the bridge and its ports, never for the rest
/// (other devices' neighbour and FDB entries).
pub fn urgency(payload: &NetlinkPayload<RouteNetlinkMessage>, known: &Known) -> Option<Duration> {
    use RouteNetlinkMessage as M;
    let m = match payload {
        NetlinkPayload::InnerMessage(m) => m,
        NetlinkPayload::Overrun(_) => return Some(Duration::ZERO),
        _ => return None,
    };
    match m {
        M::DelLink(l) if known.bridge == Some(l.header.index) || known.ports.contains(&l.header.index) => {
            Some(Duration::ZERO)
        }
        M::NewLink(_) | M::DelLink(_) | M::SetLink(_) => Some(DEBOUNCE),
        M::NewNeighbour(n) | M::DelNeighbour(n) => {
            let bridge = known.bridge?;
            let ours = match n.header.family {
                AddressFamily::Inet | AddressFamily::Inet6 => n.header.ifindex == bridge,
                AddressFamily::Bridge => {
                    known.ports.contains(&n.header.ifindex) || neighbour_master(n) == Some(bridge)
                }
                _ => false,
            };
            ours.then_some(DEBOUNCE)
        }
        _ => None,
    }
}

/// The netlink task: notifications in, discoveries out, until the agent drops its receiver.
async fn track(bridge: String, tx: watch::Sender<Option<Discovery>>) {
    let mut t = Tracker {
        bridge,
        dumps: None,
        known: Known::default(),
        failing: false,
    };
    let mut events: Option<(Notifications, Conn)> = None;
    let mut every = tokio::time::interval(RESYNC_EVERY);
    every.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut due: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tx.closed() => return,
            _ = every.tick() => {
                if events.is_none() {
                    events = subscribe();
                }
                due = Some(Instant::now());
            }
            _ = sleep_until(due) => {
                due = None;
                if let Some(d) = t.resync().await {
                    tx.send_replace(Some(d));
                }
            }
            m = next_notification(&mut events) => {
                let urgency = match m {
                    Some(payload) => urgency(&payload, &t.known),
                    None => {
                        warn!("the netlink notification socket closed; resubscribing");
                        events = subscribe();
                        Some(Duration::ZERO)
                    }
                };
                if let Some(after) = urgency {
                    let at = Instant::now() + after;
                    due = Some(due.map_or(at, |d| d.min(at)));
                }
            }
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The next notification's payload; `None` once the socket is gone; never without a socket.
async fn next_notification(
    events: &mut Option<(Notifications, Conn)>,
) -> Option<NetlinkPayload<RouteNetlinkMessage>> {
    match events {
        Some((rx, _)) => rx.next().await.map(|(m, _)| m.payload),
        None => std::future::pending().await,
    }
}

/// Joins the link and neighbour groups; on failure the periodic resync tries again.
fn subscribe() -> Option<(Notifications, Conn)> {
    match rtnetlink::new_multicast_connection(&[MulticastGroup::Link, MulticastGroup::Neigh]) {
        Ok((conn, handle, rx)) => Some((
            rx,
            Conn {
                handle,
                task: tokio::spawn(conn),
            },
        )),
        Err(e) => {
            warn!(error = %e, "subscribing to link and neighbour changes; resyncing every {RESYNC_EVERY:?} only");
            None
        }
    }
}

struct Tracker {
    bridge: String,
    /// The connection dumps run on (not the notification socket, whose overruns must not cut a
    /// dump short).
    dumps: Option<Conn>,
    known: Known,
    /// The last resync failed (logged once until one works again).
    failing: bool,
}

impl Tracker {
    async fn resync(&mut self) -> Option<Discovery> {
        let r = match self.connection() {
            Ok(handle) => tokio::time::timeout(DUMP_TIMEOUT, discover(&handle, &self.bridge))
                .await
                .unwrap_or(Err(EndpointError::Timeout(DUMP_TIMEOUT))),
            Err(e) => Err(e),
        };
        match r {
            Ok(d) => {
                if self.failing {
                    info!(bridge = %self.bridge, "local endpoint discovery works again");
                    self.failing = false;
                }
                self.known = Known::from(&d);
                Some(d)
            }
            Err(e) => {
                if !self.failing {
                    warn!(bridge = %self.bridge, error = %e, "discovering local endpoints; retrying");
                    self.failing = true;
                }
                // A fresh socket next time.
                self.dumps = None;
                None
            }
        }
    }

    fn connection(&mut self) -> Result<Handle, EndpointError> {
        if let Some(c) = &self.dumps {
            return Ok(c.handle.clone());
        }
        let (conn, handle, _) = rtnetlink::new_connection()?;
        self.dumps = Some(Conn {
            handle: handle.clone(),
            task: tokio::spawn(conn),
        });
        Ok(handle)
    }
}

/// Dumps links, the bridge's addresses, the bridge FDB and the IPv4 and IPv6 neighbours.
pub async fn discover(handle: &Handle, bridge: &str) -> Result<Discovery, EndpointError> {
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing links"))?;
    let Some(br) = links.iter().find(|l| link_name(l) == Some(bridge)).and_then(|l| {
        Some(BridgeLink {
            ifindex: l.header.index,
            mac: link_mac(l)?,
        })
    }) else {
        return Ok(Discovery::default());
    };
    let ports = links
        .iter()
        .filter(|l| link_master(l) == Some(br.ifindex))
        .map(|l| l.header.index)
        .collect();
    let fdb: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await
        .map_err(nl("dumping the bridge FDB"))?;
    let neighbours: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute()
        .try_collect()
        .await
        .map_err(nl("dumping the IPv4 neighbours"))?;
    let neighbours6: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet6)
        .execute()
        .try_collect()
        .await
        .map_err(nl("dumping the IPv6 neighbours"))?;
    let addrs: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(br.ifindex)
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing the bridge's addresses"))?;
    Ok(Discovery {
        bridge: Some(br),
        ports,
        fdb: fdb.iter().filter_map(fdb_entry).collect(),
        neighbours: neighbours.iter().filter_map(neighbour_of).collect(),
        neighbours6: neighbours6.iter().filter_map(neighbour_of).collect(),
        bridge_addrs: addrs
            .iter()
            .filter(|a| a.header.index == br.ifindex)
            .flat_map(|a| &a.attributes)
            .filter_map(|a| match a {
                AddressAttribute::Address(ip) | AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            })
            .collect(),
    })
}

fn link_name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_mac(l: &LinkMessage) -> Option<[u8; 6]> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => m.as_slice().try_into().ok(),
        _ => None,
    })
}

fn link_master(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(i) => Some(*i),
        _ => None,
    })
}

fn lladdr(n: &NeighbourMessage) -> Option<[u8; 6]> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(m) => m.as_slice().try_into().ok(),
        _ => None,
    })
}

fn neighbour_master(n: &NeighbourMessage) -> Option<u32> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Controller(i) => Some(*i),
        _ => None,
    })
}

/// An AF_BRIDGE neighbour message as an FDB entry (it needs an Ethernet address).
pub fn fdb_entry(n: &NeighbourMessage) -> Option<FdbEntry> {
    if n.header.family != AddressFamily::Bridge {
        return None;
    }
    Some(FdbEntry {
        mac: lladdr(n)?,
        port: n.header.ifindex,
        master: neighbour_master(n),
        state: n.header.state.into(),
    })
}

/// An AF_INET neighbour message as a neighbour entry.
pub fn neighbour(n: &NeighbourMessage) -> Option<Neighbour> {
    neighbour_of(n)
}

/// A neighbour message of family `A` as a neighbour entry.
pub fn neighbour_of<F: NeighbourFamily>(n: &NeighbourMessage) -> Option<Neighbour<F>> {
    if n.header.family != F::FAMILY {
        return None;
    }
    let ip = n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(d) => F::from_neighbour(d),
        _ => None,
    })?;
    Some(Neighbour {
        ip,
        ifindex: n.header.ifindex,
        mac: lladdr(n),
        state: n.header.state.into(),
    })
}

#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub const BR: u32 = 4;

    pub fn mac(n: u8) -> [u8; 6] {
        [0x0a, 0x58, 0x0a, 0xf4, 0x01, n]
    }

    pub fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, 1, n)
    }

    pub fn ip6(n: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, n)
    }

    pub fn neigh6(a: Ipv6Addr, m: [u8; 6], state: u16) -> Neighbour<V6> {
        Neighbour {
            ip: a,
            ifindex: BR,
            mac: Some(m),
            state,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fixtures::*, *};

    #[test]
    fn notifications_that_matter_and_how_soon() {
        use RouteNetlinkMessage as M;
        let known = Known {
            bridge: Some(BR),
            ports: [10, 11].into(),
        };
        let link = |index: u32| {
            let mut l = LinkMessage::default();
            l.header.index = index;
            l
        };
        let nmsg = |family: AddressFamily, ifindex: u32, master: Option<u32>| {
            let mut n = NeighbourMessage::default();
            n.header.family = family;
            n.header.ifindex = ifindex;
            n.attributes.extend(master.map(NeighbourAttribute::Controller));
            n
        };
        let inner = NetlinkPayload::InnerMessage;
        let now = Some(Duration::ZERO);
        let soon = Some(DEBOUNCE);
        let cases = [
            ("port deleted", inner(M::DelLink(link(10))), now),
            ("bridge deleted", inner(M::DelLink(link(BR))), now),
            ("other link deleted", inner(M::DelLink(link(50))), soon),
            ("link added", inner(M::NewLink(link(12))), soon),
            (
                "ARP on the bridge",
                inner(M::NewNeighbour(nmsg(AddressFamily::Inet, BR, None))),
                soon,
            ),
            (
                "ARP on the underlay",
                inner(M::NewNeighbour(nmsg(AddressFamily::Inet, 2, None))),
                None,
            ),
            (
                "IPv6 ND on the bridge",
                inner(M::NewNeighbour(nmsg(AddressFamily::Inet6, BR, None))),
                soon,
            ),
            (
                "IPv6 ND on the underlay",
                inner(M::NewNeighbour(nmsg(AddressFamily::Inet6, 2, None))),
                None,
            ),
            (
                "FDB entry on a port",
                inner(M::DelNeighbour(nmsg(AddressFamily::Bridge, 11, Some(BR)))),
                soon,
            ),
            (
                "FDB entry on a new port",
                inner(M::NewNeighbour(nmsg(AddressFamily::Bridge, 12, Some(BR)))),
                soon,
            ),
            (
                "another bridge's FDB",
                inner(M::NewNeighbour(nmsg(AddressFamily::Bridge, 30, Some(29)))),
                None,
            ),
            ("lost notifications", NetlinkPayload::Overrun(Vec::new()), now),
        ];
        for (what, payload, want) in cases {
            assert_eq!(urgency(&payload, &known), want, "{what}");
        }
        // No bridge yet: links matter (it may appear), neighbours cannot.
        let none = Known::default();
        assert_eq!(urgency(&inner(M::NewLink(link(4))), &none), soon);
        assert_eq!(
            urgency(&inner(M::NewNeighbour(nmsg(AddressFamily::Inet, 4, None))), &none),
            None
        );
    }

    #[test]
    fn netlink_messages_become_fdb_and_neighbour_entries() {
        let mut f = NeighbourMessage::default();
        f.header.family = AddressFamily::Bridge;
        f.header.ifindex = 10;
        f.header.state = NUD_STALE.into();
        f.attributes = vec![
            NeighbourAttribute::LinkLayerAddress(mac(2).to_vec()),
            NeighbourAttribute::Controller(BR),
        ];
        assert_eq!(
            fdb_entry(&f),
            Some(FdbEntry {
                mac: mac(2),
                port: 10,
                master: Some(BR),
                state: NUD_STALE,
            })
        );
        assert_eq!(neighbour(&f), None, "an FDB entry is no IPv4 neighbour");

        let mut n = NeighbourMessage::default();
        n.header.family = AddressFamily::Inet;
        n.header.ifindex = BR;
        n.header.state = NUD_INCOMPLETE.into();
        n.attributes = vec![NeighbourAttribute::Destination(NeighbourAddress::Inet(ip(2)))];
        assert_eq!(
            neighbour(&n),
            Some(Neighbour {
                ip: ip(2),
                ifindex: BR,
                mac: None,
                state: NUD_INCOMPLETE,
            })
        );
        assert_eq!(fdb_entry(&n), None);
        assert_eq!(neighbour_of::<V6>(&n), None, "an IPv4 neighbour is no IPv6 one");

        let mut n6 = NeighbourMessage::default();
        n6.header.family = AddressFamily::Inet6;
        n6.header.ifindex = BR;
        n6.header.state = NUD_REACHABLE.into();
        n6.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip6(2))),
            NeighbourAttribute::LinkLayerAddress(mac(2).to_vec()),
        ];
        assert_eq!(
            neighbour_of::<V6>(&n6),
            Some(neigh6(ip6(2), mac(2), NUD_REACHABLE))
        );
        assert_eq!(neighbour(&n6), None, "an IPv6 neighbour is no IPv4 one");
    }
}
