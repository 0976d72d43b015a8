//! Local endpoints: the pods on this node's bridge, kept in the `OVL_ENDPOINTS` (IPv4) and
//! `OVL_ENDPOINTS6` (IPv6) maps so decap can hand their packets straight to their host-side veth.
//!
//! Each [`Discovery`] of the bridge (`node::bridge`) is joined here: a pod address is an
//! endpoint once the host has a usable neighbour entry for it inside our lease of that family
//! and the bridge has learned that MAC on one of its ports. A pod the host has never ARPed (or
//! solicited, for IPv6) is not one yet: decap hands its packets to the stack, which resolves
//! it, and the next sync picks it up. Both families go through the same generic code
//! ([`EndpointFamily`]); the agent loop diffs each result against what the map holds
//! ([`LocalEndpoints`]).

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnet::{Ipv4Net, Ipv6Net};
use tracing::{debug, error, info, warn};

use crate::{
    control::lease::MacAddr,
    dataplane::{Dataplane, DataplaneError, LocalEndpoint, MapFamily},
    family::{Family, V4, V6},
    metrics::METRICS,
    node::bridge::{
        self, Discovery, EndpointWatch, NeighbourFamily, NUD_PERMANENT, NUD_UNRESOLVED, NUD_USABLE,
    },
};

/// What endpoint syncing needs of an address family, on top of its maps ([`MapFamily`]) and
/// its discovery ([`NeighbourFamily`]): which addresses of our lease can be pods.
pub trait EndpointFamily: MapFamily + NeighbourFamily {
    /// Whether a neighbour at `a` may be a pod of our lease `own`: inside it, and not its
    /// network address (nor broadcast, nor a link-local address).
    fn pod_address(a: Self::Addr, own: &Self::Net) -> bool;
}

impl EndpointFamily for V4 {
    fn pod_address(a: Ipv4Addr, own: &Ipv4Net) -> bool {
        own.contains(&a) && a != own.network() && a != own.broadcast()
    }
}

impl EndpointFamily for V6 {
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
            let local = LocalEndpoints {
                held: [v4.len(), v6.len()],
                ..LocalEndpoints::default()
            };
            (local, bridge::watch(bridge))
        }
        Err(e) => {
            warn!(error = %e, "no local endpoint map: decapsulated packets always go through the stack");
            (LocalEndpoints::default(), EndpointWatch::none())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::node::bridge::{fixtures::*, *};

    const BR_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 1];
    const SUBNET: &str = "10.244.1.0/24";

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
}
