//! Local endpoints: the pods on this node's bridge, kept in the `OVL_ENDPOINTS` (IPv4) and
//! `OVL_ENDPOINTS6` (IPv6) maps so decap can hand their packets straight to their host-side veth.
//!
//! Discovery is netlink only: the pod bridge (ifindex, MAC, own addresses), its ports, its FDB
//! (pod MAC → port) and its IPv4 and IPv6 neighbour tables (pod IP → MAC). A pod address is an
//! endpoint once the host has a usable neighbour entry for it inside our lease of that family
//! and the bridge has learned that MAC on one of its ports. A pod the host has never ARPed (or
//! solicited, for IPv6) is not one yet: decap hands its packets to the stack, which resolves
//! it, and the next sync picks it up. Both families go through the same generic code
//! ([`EndpointFamily`]).
//!
//! Keeping it in step: a task subscribed to `RTNLGRP_LINK` and `RTNLGRP_NEIGH` (FDB changes
//! arrive there too) dumps the three tables [`DEBOUNCE`] after a change that may concern the
//! bridge, at once when a port or the bridge is deleted (a stale ifindex would black-hole the
//! pod), and every [`RESYNC_EVERY`] regardless. The agent loop diffs each result against what the
//! map holds ([`LocalEndpoints`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use futures::{channel::mpsc::UnboundedReceiver, StreamExt as _, TryStreamExt as _};
use ipnet::{Ipv4Net, Ipv6Net};
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
use tracing::{debug, error, info, warn};

use crate::{
    control::lease::MacAddr,
    dataplane::{Dataplane, DataplaneError, LocalEndpoint, MapFamily},
    family::{Family, V4, V6},
    metrics::METRICS,
};

/// A change that may concern the bridge is acted on this long after it arrived, so the burst of
/// notifications one pod start or stop causes becomes one resync.
pub const DEBOUNCE: Duration = Duration::from_millis(20);
/// The safety net: a full resync this often, whatever netlink said (or failed to say).
pub const RESYNC_EVERY: Duration = Duration::from_secs(5);
/// One resync's three dumps must finish within this.
const DUMP_TIMEOUT: Duration = Duration::from_secs(3);

// Neighbour (NUD) states, as in <linux/neighbour.h>.
const NUD_INCOMPLETE: u16 = 0x01;
const NUD_REACHABLE: u16 = 0x02;
const NUD_STALE: u16 = 0x04;
const NUD_DELAY: u16 = 0x08;
const NUD_PROBE: u16 = 0x10;
const NUD_FAILED: u16 = 0x20;
const NUD_NOARP: u16 = 0x40;
const NUD_PERMANENT: u16 = 0x80;
/// States whose link-layer address the host stands behind.
const NUD_USABLE: u16 = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT | NUD_NOARP;
/// States of a neighbour being (or having failed to be) resolved.
const NUD_UNRESOLVED: u16 = NUD_INCOMPLETE | NUD_FAILED;

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

/// What endpoint discovery needs of an address family, on top of its maps
/// ([`MapFamily`]): its neighbours in a discovery and which addresses of our lease can be
/// pods.
pub trait EndpointFamily: MapFamily {
    /// `AF_INET` / `AF_INET6`.
    const FAMILY: AddressFamily;
    fn neighbours(d: &Discovery) -> &[Neighbour<Self>];
    /// The address of a neighbour message of this family.
    fn from_neighbour(a: &NeighbourAddress) -> Option<Self::Addr>;
    /// Whether a neighbour at `a` may be a pod of our lease `own`: inside it, and not its
    /// network address (nor broadcast, nor a link-local address).
    fn pod_address(a: Self::Addr, own: &Self::Net) -> bool;
}

impl EndpointFamily for V4 {
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
    fn pod_address(a: Ipv4Addr, own: &Ipv4Net) -> bool {
        own.contains(&a) && a != own.network() && a != own.broadcast()
    }
}

impl EndpointFamily for V6 {
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
    fn pod_address(a: Ipv6Addr, own: &Ipv6Net) -> bool {
        // The network address is the subnet-router anycast address (RFC 4291 2.6.1).
        own.contains(&a) && a != own.network() && !a.is_unicast_link_local() && !a.is_multicast()
    }
}

/// The pods of a discovery inside `subnet` (our lease of family `F`): each neighbour of the
/// bridge in a usable state whose MAC the bridge has learned on exactly one of its ports (the
/// bridge's own addresses excepted).
pub fn join<F: EndpointFamily>(d: &Discovery, subnet: F::Net) -> BTreeMap<F::Addr, LocalEndpoint<F>> {
    let mut out = BTreeMap::new();
    let Some(bridge) = d.bridge else { return out };
    // MAC → port; `None` when the MAC is behind several ports (then the stack decides).
    let mut port_of: HashMap<[u8; 6], Option<u32>> = HashMap::new();
    for f in &d.fdb {
        let learned = f.master == Some(bridge.ifindex)
            && f.port != bridge.ifindex
            && d.ports.contains(&f.port)
            && f.state & NUD_PERMANENT == 0;
        if learned {
            port_of
                .entry(f.mac)
                .and_modify(|p| {
                    if *p != Some(f.port) {
                        *p = None
                    }
                })
                .or_insert(Some(f.port));
        }
    }
    let host = |ip: F::Addr| F::pod_address(ip, &subnet) && !d.bridge_addrs.contains(&ip.into());
    for n in F::neighbours(d) {
        if n.ifindex != bridge.ifindex || n.state & NUD_USABLE == 0 || n.state & NUD_UNRESOLVED != 0 {
            continue;
        }
        let Some(mac) = n.mac.filter(|m| is_unicast(*m)) else {
            continue;
        };
        if !host(n.ip) {
            continue;
        }
        if let Some(Some(port)) = port_of.get(&mac) {
            out.insert(
                n.ip,
                LocalEndpoint {
                    ip: n.ip,
                    ifindex: *port,
                    mac,
                    gw_mac: bridge.mac,
                },
            );
        }
    }
    out
}

fn is_unicast(mac: [u8; 6]) -> bool {
    mac[0] & 1 == 0 && mac != [0; 6]
}

/// What to write to make the map hold `wanted`.
#[derive(Debug, PartialEq, Eq)]
pub struct Changes<F: Family = V4> {
    /// New or changed (another veth or MAC) endpoints.
    pub upsert: Vec<LocalEndpoint<F>>,
    /// Addresses that are no longer endpoints.
    pub remove: Vec<F::Addr>,
}

impl<F: Family> Default for Changes<F> {
    fn default() -> Self {
        Changes {
            upsert: Vec::new(),
            remove: Vec::new(),
        }
    }
}

/// The difference between what the map holds and what it should.
pub fn diff<F: Family>(
    held: &[LocalEndpoint<F>],
    wanted: &BTreeMap<F::Addr, LocalEndpoint<F>>,
) -> Changes<F> {
    let held: HashMap<F::Addr, &LocalEndpoint<F>> = held.iter().map(|e| (e.ip, e)).collect();
    let mut remove: Vec<F::Addr> = held
        .keys()
        .filter(|ip| !wanted.contains_key(ip))
        .copied()
        .collect();
    remove.sort();
    let upsert = wanted
        .values()
        .filter(|w| held.get(&w.ip) != Some(w))
        .copied()
        .collect();
    Changes { upsert, remove }
}

/// The map operations endpoint syncing needs, for either family ([`Dataplane`] in the agent, a
/// fake in tests).
pub trait EndpointMap {
    fn endpoints<F: EndpointFamily>(&self) -> Result<Vec<LocalEndpoint<F>>, DataplaneError>;
    fn upsert_endpoint<F: EndpointFamily>(&mut self, e: &LocalEndpoint<F>) -> Result<(), DataplaneError>;
    fn remove_endpoint<F: EndpointFamily>(&mut self, ip: F::Addr) -> Result<(), DataplaneError>;
}

impl EndpointMap for Dataplane {
    fn endpoints<F: EndpointFamily>(&self) -> Result<Vec<LocalEndpoint<F>>, DataplaneError> {
        Dataplane::endpoints::<F>(self)
    }
    fn upsert_endpoint<F: EndpointFamily>(&mut self, e: &LocalEndpoint<F>) -> Result<(), DataplaneError> {
        Dataplane::upsert_endpoint(self, e)
    }
    fn remove_endpoint<F: EndpointFamily>(&mut self, ip: F::Addr) -> Result<(), DataplaneError> {
        Dataplane::remove_endpoint::<F>(self, ip)
    }
}

/// Our lease's subnets, once it is known (a lease holds at least one of them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnSubnets {
    pub v4: Option<Ipv4Net>,
    pub v6: Option<Ipv6Net>,
}

impl OwnSubnets {
    /// `None` until the first lease: both subnets unknown.
    pub fn of(v4: Option<Ipv4Net>, v6: Option<Ipv6Net>) -> Option<Self> {
        (v4.is_some() || v6.is_some()).then_some(OwnSubnets { v4, v6 })
    }
}

/// The agent loop's side: applies each discovery to both maps.
#[derive(Debug, Default)]
pub struct LocalEndpoints {
    /// Our lease: only its addresses are endpoints. Until it is known the maps are left as
    /// adopted; a family the lease has no subnet in has no endpoints.
    own: Option<OwnSubnets>,
    /// The latest discovery, applied again when our subnets change.
    last: Option<Discovery>,
    /// Entries in the IPv4 and IPv6 maps (for the metric).
    held: [usize; 2],
}

impl LocalEndpoints {
    /// A new discovery from the netlink task.
    pub fn discovered(&mut self, map: &mut impl EndpointMap, d: Discovery) {
        self.last = Some(d);
        self.sync(map);
    }

    /// Our subnets ([`OwnSubnets::of`]), after every control-plane event; a change re-applies
    /// the latest discovery.
    pub fn own_subnets(&mut self, map: &mut impl EndpointMap, own: Option<OwnSubnets>) {
        if own != self.own {
            self.own = own;
            self.sync(map);
        }
    }

    fn sync(&mut self, map: &mut impl EndpointMap) {
        let Some(d) = &self.last else { return };
        let own = self.own;
        if let Some(n) = sync_family::<V4>(map, d, own.map(|o| o.v4)) {
            self.held[0] = n;
        }
        if let Some(n) = sync_family::<V6>(map, d, own.map(|o| o.v6)) {
            self.held[1] = n;
        }
        METRICS.local_endpoints.set((self.held[0] + self.held[1]) as i64);
    }
}

/// Makes family `F`'s map hold the pods of `d` in `own` (`None`: not known yet, `Some(None)`:
/// the lease has no subnet of this family). Returns the number of entries the map then holds,
/// `None` when it was left alone.
fn sync_family<F: EndpointFamily>(
    map: &mut impl EndpointMap,
    d: &Discovery,
    own: Option<Option<F::Net>>,
) -> Option<usize> {
    let wanted = match (d.bridge, own) {
        (None, _) | (Some(_), Some(None)) => BTreeMap::new(),
        (Some(_), Some(Some(own))) => join::<F>(d, own),
        // Which pods are ours is not known yet: keep what an earlier agent left.
        (Some(_), None) => return None,
    };
    let held = match map.endpoints::<F>() {
        Ok(h) => h,
        Err(e) => {
            error!(family = F::NAME, error = %e, "reading the endpoint map");
            return None;
        }
    };
    let mut count = held.len();
    let Changes { upsert, remove } = diff(&held, &wanted);
    for ip in remove {
        match map.remove_endpoint::<F>(ip) {
            Ok(()) => {
                count -= 1;
                debug!(%ip, "local endpoint removed");
            }
            Err(e) => error!(%ip, error = %e, "removing a local endpoint"),
        }
    }
    for e in upsert {
        let new = !held.iter().any(|h| h.ip == e.ip);
        match map.upsert_endpoint(&e) {
            Ok(()) => {
                count += usize::from(new);
                let what = if new {
                    "local endpoint added"
                } else {
                    "local endpoint changed"
                };
                debug!(ip = %e.ip, ifindex = e.ifindex, mac = %MacAddr(e.mac), "{what}");
            }
            Err(err) => error!(ip = %e.ip, error = %err, "writing a local endpoint"),
        }
    }
    Some(count)
}

/// Discoveries from the netlink task, newest first: a slow agent loop skips stale ones.
pub struct EndpointWatch {
    rx: Option<watch::Receiver<Option<Discovery>>>,
}

impl EndpointWatch {
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

/// Adopts what the pinned endpoint maps hold (the first sync keeps or removes it) and starts
/// watching `bridge`. Without an endpoint map in the datapath nothing is watched.
pub fn start(dp: &Dataplane, bridge: &str) -> (LocalEndpoints, EndpointWatch) {
    match dp
        .endpoints::<V4>()
        .and_then(|v4| Ok((v4, dp.endpoints::<V6>()?)))
    {
        Ok((v4, v6)) => {
            if !v4.is_empty() || !v6.is_empty() {
                info!(
                    endpoints = v4.len(),
                    endpoints6 = v6.len(),
                    "adopted the pinned endpoint maps"
                );
            }
            METRICS.local_endpoints.set((v4.len() + v6.len()) as i64);
            let (tx, rx) = watch::channel(None);
            tokio::spawn(track(bridge.to_string(), tx));
            let local = LocalEndpoints {
                held: [v4.len(), v6.len()],
                ..LocalEndpoints::default()
            };
            (local, EndpointWatch { rx: Some(rx) })
        }
        Err(e) => {
            warn!(error = %e, "no local endpoint map: decapsulated packets always go through the stack");
            (LocalEndpoints::default(), EndpointWatch { rx: None })
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
pub fn neighbour_of<F: EndpointFamily>(n: &NeighbourMessage) -> Option<Neighbour<F>> {
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
mod tests {
    use super::*;

    const BR: u32 = 4;
    const BR_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 1];
    const SUBNET: &str = "10.244.1.0/24";

    fn mac(n: u8) -> [u8; 6] {
        [0x0a, 0x58, 0x0a, 0xf4, 0x01, n]
    }

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, 1, n)
    }

    fn learned(m: [u8; 6], port: u32) -> FdbEntry {
        FdbEntry {
            mac: m,
            port,
            master: Some(BR),
            state: NUD_REACHABLE,
        }
    }

    fn neigh(a: Ipv4Addr, m: [u8; 6], state: u16) -> Neighbour {
        Neighbour {
            ip: a,
            ifindex: BR,
            mac: Some(m),
            state,
        }
    }

    fn ep(a: Ipv4Addr, ifindex: u32, m: [u8; 6]) -> LocalEndpoint {
        LocalEndpoint {
            ip: a,
            ifindex,
            mac: m,
            gw_mac: BR_MAC,
        }
    }

    /// Bridge 4 with ports 10 and 11; pod .2 (MAC 2) behind port 10, pod .3 (MAC 3) behind 11.
    fn two_pods() -> Discovery {
        Discovery {
            bridge: Some(BridgeLink {
                ifindex: BR,
                mac: BR_MAC,
            }),
            ports: [10, 11].into(),
            fdb: vec![
                learned(mac(2), 10),
                learned(mac(3), 11),
                // The ports' and the bridge's own addresses.
                FdbEntry {
                    state: NUD_PERMANENT,
                    ..learned([0x02, 0xaa, 0, 0, 0, 10], 10)
                },
                FdbEntry {
                    state: NUD_PERMANENT,
                    ..learned(BR_MAC, BR)
                },
            ],
            neighbours: vec![
                neigh(ip(2), mac(2), NUD_REACHABLE),
                neigh(ip(3), mac(3), NUD_STALE),
            ],
            neighbours6: vec![
                neigh6(ip6(2), mac(2), NUD_REACHABLE),
                neigh6(ip6(3), mac(3), NUD_STALE),
            ],
            bridge_addrs: [IpAddr::V4(ip(1)), IpAddr::V6(ip6(1))].into(),
        }
    }

    const SUBNET6: &str = "fd00:10:244:1::/64";

    fn ip6(n: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, n)
    }

    fn neigh6(a: Ipv6Addr, m: [u8; 6], state: u16) -> Neighbour<V6> {
        Neighbour {
            ip: a,
            ifindex: BR,
            mac: Some(m),
            state,
        }
    }

    fn ep6(a: Ipv6Addr, ifindex: u32, m: [u8; 6]) -> LocalEndpoint<V6> {
        LocalEndpoint {
            ip: a,
            ifindex,
            mac: m,
            gw_mac: BR_MAC,
        }
    }

    fn joined6(d: &Discovery) -> Vec<LocalEndpoint<V6>> {
        join::<V6>(d, SUBNET6.parse().unwrap()).into_values().collect()
    }

    fn own(v4: Option<&str>, v6: Option<&str>) -> Option<OwnSubnets> {
        OwnSubnets::of(v4.map(|n| n.parse().unwrap()), v6.map(|n| n.parse().unwrap()))
    }

    #[test]
    fn ipv6_pods_are_joined_by_the_same_rules() {
        let mut d = two_pods();
        assert_eq!(
            joined6(&d),
            vec![ep6(ip6(2), 10, mac(2)), ep6(ip6(3), 11, mac(3))]
        );
        // The pod's link-local address, though its MAC is on a port.
        d.neighbours6.push(neigh6(
            "fe80::858:aff:fef4:102".parse().unwrap(),
            mac(2),
            NUD_REACHABLE,
        ));
        // The bridge's own address (a pod claiming it), the subnet-router anycast address, a
        // multicast entry, another node's pod and an unresolved one.
        d.neighbours6.push(neigh6(ip6(1), mac(2), NUD_REACHABLE));
        d.neighbours6.push(neigh6(ip6(0), mac(2), NUD_REACHABLE));
        d.fdb.push(learned([0x33, 0x33, 0, 0, 0, 1], 10));
        d.neighbours6.push(neigh6(
            "ff02::1".parse().unwrap(),
            [0x33, 0x33, 0, 0, 0, 1],
            NUD_NOARP,
        ));
        d.neighbours6
            .push(neigh6("fd00:10:244:2::5".parse().unwrap(), mac(2), NUD_REACHABLE));
        d.neighbours6.push(neigh6(ip6(9), mac(2), NUD_INCOMPLETE));
        // An IPv4 neighbour is no IPv6 endpoint and the other way round.
        assert_eq!(
            joined6(&d),
            vec![ep6(ip6(2), 10, mac(2)), ep6(ip6(3), 11, mac(3))]
        );
        assert_eq!(joined(&d), vec![ep(ip(2), 10, mac(2)), ep(ip(3), 11, mac(3))]);
        // The bridge's own IPv4 address is skipped as well.
        d.neighbours.push(neigh(ip(1), mac(2), NUD_REACHABLE));
        assert_eq!(joined(&d), vec![ep(ip(2), 10, mac(2)), ep(ip(3), 11, mac(3))]);
    }

    #[test]
    fn both_maps_follow_the_lease_of_their_family() {
        let mut map = FakeMap::default();
        map.put(ep6(ip6(9), 6, mac(9)));
        let mut local = LocalEndpoints::default();
        local.discovered(&mut map, two_pods());
        assert_eq!(
            map.v6(),
            vec![ep6(ip6(9), 6, mac(9))],
            "no lease yet: adopted entries stay"
        );
        local.own_subnets(&mut map, own(Some(SUBNET), Some(SUBNET6)));
        assert_eq!(map.v4(), vec![ep(ip(2), 10, mac(2)), ep(ip(3), 11, mac(3))]);
        assert_eq!(map.v6(), vec![ep6(ip6(2), 10, mac(2)), ep6(ip6(3), 11, mac(3))]);
        // Port 10 deleted: both addresses of that pod go.
        let mut d = two_pods();
        d.ports.remove(&10);
        d.fdb.retain(|f| f.port != 10);
        local.discovered(&mut map, d);
        assert_eq!(map.v4(), vec![ep(ip(3), 11, mac(3))]);
        assert_eq!(map.v6(), vec![ep6(ip6(3), 11, mac(3))]);
        // A lease without IPv6 (IPv6 turned off): the IPv6 map empties, IPv4 stays.
        local.own_subnets(&mut map, own(Some(SUBNET), None));
        assert_eq!(map.v4(), vec![ep(ip(3), 11, mac(3))]);
        assert!(map.v6().is_empty(), "left: {:?}", map.v6());
        // IPv6-only.
        local.own_subnets(&mut map, own(None, Some(SUBNET6)));
        assert!(map.v4().is_empty(), "left: {:?}", map.v4());
        assert_eq!(map.v6(), vec![ep6(ip6(3), 11, mac(3))]);
    }

    fn joined(d: &Discovery) -> Vec<LocalEndpoint> {
        join(d, SUBNET.parse().unwrap()).into_values().collect()
    }

    #[test]
    fn a_pod_is_its_neighbour_entry_joined_with_the_fdb_port_of_its_mac() {
        assert_eq!(
            joined(&two_pods()),
            vec![ep(ip(2), 10, mac(2)), ep(ip(3), 11, mac(3))]
        );
    }

    #[test]
    fn every_resolved_neighbour_state_counts_and_unresolved_ones_do_not() {
        for (state, counts) in [
            (NUD_REACHABLE, true),
            (NUD_STALE, true),
            (NUD_DELAY, true),
            (NUD_PROBE, true),
            (NUD_PERMANENT, true),
            (NUD_NOARP, true),
            (NUD_INCOMPLETE, false),
            (NUD_FAILED, false),
            (0, false),
        ] {
            let mut d = two_pods();
            d.neighbours[0].state = state;
            let got = joined(&d).iter().any(|e| e.ip == ip(2));
            assert_eq!(
                got, counts,
                "neighbour state {state:#x}: endpoint expected {counts}, seen {got}"
            );
        }
    }

    #[test]
    fn neighbours_without_a_learned_port_are_not_endpoints() {
        let mut d = two_pods();
        // Never ARPed: no neighbour entry for .4, though its MAC is on a port.
        d.fdb.push(learned(mac(4), 11));
        // Unresolved: no link-layer address.
        d.neighbours.push(Neighbour {
            mac: None,
            ..neigh(ip(5), mac(5), NUD_INCOMPLETE)
        });
        // The MAC is nowhere in the FDB (its veth was deleted with its entries).
        d.neighbours.push(neigh(ip(6), mac(6), NUD_REACHABLE));
        // The MAC is behind a device that is not (or no longer) a port of the bridge.
        d.fdb.push(learned(mac(7), 99));
        d.neighbours.push(neigh(ip(7), mac(7), NUD_REACHABLE));
        // The MAC is the port's own (local, permanent) address.
        d.neighbours
            .push(neigh(ip(8), [0x02, 0xaa, 0, 0, 0, 10], NUD_REACHABLE));
        // Another bridge's table, and a device's own (`self`) entry.
        d.fdb.push(FdbEntry {
            master: Some(77),
            ..learned(mac(9), 10)
        });
        d.neighbours.push(neigh(ip(9), mac(9), NUD_REACHABLE));
        d.fdb.push(FdbEntry {
            master: None,
            ..learned(mac(10), 10)
        });
        d.neighbours.push(neigh(ip(10), mac(10), NUD_REACHABLE));
        // The same MAC behind two ports: ambiguous, left to the stack.
        d.fdb.push(learned(mac(11), 10));
        d.fdb.push(learned(mac(11), 11));
        d.neighbours.push(neigh(ip(11), mac(11), NUD_REACHABLE));
        assert_eq!(joined(&d), vec![ep(ip(2), 10, mac(2)), ep(ip(3), 11, mac(3))]);
    }

    #[test]
    fn only_unicast_neighbours_of_the_bridge_inside_our_subnet_count() {
        let mut d = two_pods();
        // Outside our lease (another node's pod, or the host's LAN).
        d.fdb.push(learned(mac(20), 10));
        d.neighbours
            .push(neigh(Ipv4Addr::new(10, 244, 2, 20), mac(20), NUD_REACHABLE));
        // Network and broadcast addresses of the lease.
        d.fdb.push(learned(mac(21), 10));
        d.neighbours.push(neigh(ip(0), mac(21), NUD_PERMANENT));
        d.neighbours.push(neigh(ip(255), mac(21), NUD_PERMANENT));
        // On another device (the underlay) though the MAC is on a port.
        d.fdb.push(learned(mac(22), 10));
        d.neighbours.push(Neighbour {
            ifindex: 2,
            ..neigh(ip(22), mac(22), NUD_REACHABLE)
        });
        // A multicast link-layer address.
        let mcast = [0x01, 0x00, 0x5e, 0, 0, 1];
        d.fdb.push(learned(mcast, 10));
        d.neighbours.push(neigh(ip(23), mcast, NUD_NOARP));
        assert_eq!(joined(&d), vec![ep(ip(2), 10, mac(2)), ep(ip(3), 11, mac(3))]);
    }

    #[test]
    fn two_addresses_of_one_pod_are_two_endpoints() {
        let mut d = two_pods();
        d.neighbours.push(neigh(ip(42), mac(2), NUD_STALE));
        assert_eq!(
            joined(&d),
            vec![
                ep(ip(2), 10, mac(2)),
                ep(ip(3), 11, mac(3)),
                ep(ip(42), 10, mac(2))
            ]
        );
    }

    #[test]
    fn no_bridge_no_endpoints() {
        let d = Discovery {
            bridge: None,
            ..two_pods()
        };
        assert!(joined(&d).is_empty());
    }

    #[test]
    fn diff_upserts_new_and_changed_and_removes_gone() {
        let held = [
            ep(ip(2), 10, mac(2)),
            ep(ip(3), 11, mac(3)),
            ep(ip(4), 12, mac(4)),
        ];
        let wanted: BTreeMap<_, _> = [
            ep(ip(2), 10, mac(2)),  // unchanged
            ep(ip(3), 13, mac(33)), // restarted pod: new veth, new MAC
            ep(ip(5), 14, mac(5)),  // new
        ]
        .into_iter()
        .map(|e| (e.ip, e))
        .collect();
        assert_eq!(
            diff(&held, &wanted),
            Changes {
                upsert: vec![ep(ip(3), 13, mac(33)), ep(ip(5), 14, mac(5))],
                remove: vec![ip(4)],
            }
        );
        let same: BTreeMap<_, _> = held.iter().map(|e| (e.ip, *e)).collect();
        assert_eq!(diff(&held, &same), Changes::default());
    }

    /// An in-memory endpoint map for both families.
    #[derive(Default)]
    struct FakeMap {
        /// Address → (ifindex, MAC, gateway MAC).
        entries: BTreeMap<IpAddr, (u32, [u8; 6], [u8; 6])>,
        writes: usize,
    }

    impl FakeMap {
        fn put<F: EndpointFamily>(&mut self, e: LocalEndpoint<F>) {
            self.entries.insert(e.ip.into(), (e.ifindex, e.mac, e.gw_mac));
        }
        fn of<F: EndpointFamily>(&self) -> Vec<LocalEndpoint<F>> {
            self.entries
                .iter()
                .filter_map(|(ip, (ifindex, mac, gw_mac))| {
                    Some(LocalEndpoint {
                        ip: F::from_ip(*ip)?,
                        ifindex: *ifindex,
                        mac: *mac,
                        gw_mac: *gw_mac,
                    })
                })
                .collect()
        }
        fn v4(&self) -> Vec<LocalEndpoint> {
            self.of()
        }
        fn v6(&self) -> Vec<LocalEndpoint<V6>> {
            self.of()
        }
    }

    impl EndpointMap for FakeMap {
        fn endpoints<F: EndpointFamily>(&self) -> Result<Vec<LocalEndpoint<F>>, DataplaneError> {
            Ok(self.of())
        }
        fn upsert_endpoint<F: EndpointFamily>(&mut self, e: &LocalEndpoint<F>) -> Result<(), DataplaneError> {
            self.writes += 1;
            self.put(*e);
            Ok(())
        }
        fn remove_endpoint<F: EndpointFamily>(&mut self, ip: F::Addr) -> Result<(), DataplaneError> {
            self.writes += 1;
            self.entries.remove(&ip.into());
            Ok(())
        }
    }

    fn contents(m: &FakeMap) -> Vec<LocalEndpoint> {
        m.v4()
    }

    #[test]
    fn adopted_entries_stay_until_our_subnet_is_known_then_the_first_sync_corrects_them() {
        // An earlier agent left .2 on an old veth and .9, which is gone.
        let mut map = FakeMap::default();
        for e in [ep(ip(2), 5, mac(2)), ep(ip(9), 6, mac(9))] {
            map.put(e);
        }
        let mut local = LocalEndpoints::default();
        local.discovered(&mut map, two_pods());
        assert_eq!(
            contents(&map),
            vec![ep(ip(2), 5, mac(2)), ep(ip(9), 6, mac(9))],
            "without our lease nothing may change"
        );
        local.own_subnets(&mut map, own(Some(SUBNET), None));
        assert_eq!(contents(&map), vec![ep(ip(2), 10, mac(2)), ep(ip(3), 11, mac(3))]);
        // The same discovery again writes nothing.
        let writes = map.writes;
        local.discovered(&mut map, two_pods());
        local.own_subnets(&mut map, own(Some(SUBNET), None));
        assert_eq!(map.writes, writes, "an unchanged node must not rewrite the map");
    }

    #[test]
    fn a_deleted_veth_and_a_recreated_pod_are_followed() {
        let mut map = FakeMap::default();
        let mut local = LocalEndpoints::default();
        local.own_subnets(&mut map, own(Some(SUBNET), None));
        local.discovered(&mut map, two_pods());
        // Port 10 is deleted: its FDB entries go with it, the neighbour entry stays.
        let mut d = two_pods();
        d.ports.remove(&10);
        d.fdb.retain(|f| f.port != 10);
        local.discovered(&mut map, d.clone());
        assert_eq!(contents(&map), vec![ep(ip(3), 11, mac(3))]);
        // Recreated on port 12 with a new MAC; the host re-resolved it.
        d.ports.insert(12);
        d.fdb.push(learned(mac(12), 12));
        d.neighbours[0].mac = Some(mac(12));
        local.discovered(&mut map, d);
        assert_eq!(
            contents(&map),
            vec![ep(ip(2), 12, mac(12)), ep(ip(3), 11, mac(3))]
        );
    }

    #[test]
    fn a_missing_bridge_empties_the_map_even_before_the_lease() {
        let mut map = FakeMap::default();
        map.put(ep(ip(2), 10, mac(2)));
        let mut local = LocalEndpoints::default();
        local.discovered(&mut map, Discovery::default());
        assert!(contents(&map).is_empty(), "left: {:?}", contents(&map));
    }

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
