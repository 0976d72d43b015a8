//! The datapath's peer tables, kept in step with the lease events: one [`PeerTable`] per address
//! family, written once for both. One remote lease becomes one map upsert; a removed lease
//! becomes one delete after a short hold-down, unless the lease (or another one for the same
//! subnet) comes back first.
//!
//! The sender table (`OVL_VTEPS`/`OVL_VTEPS6`: one entry per PublicIP, naming the one subnet
//! decap accepts inner sources from) follows the peer entries: an address keeps its entry while
//! any peer entry uses it and loses it with the last one. Of several subnets of one address the
//! entry keeps naming the one it names while that one's lease lives: a second lease with a
//! node's address (a stale one, or anyone's junk) cannot take the node's traffic away; when the
//! named lease goes (held down), the entry moves at once to the oldest other live subnet (a
//! node that re-leases deletes its old lease first, then writes the new one). A resync and a
//! restart read both pinned maps and put right whatever they hold that the leases do not say.

use std::collections::{HashMap, HashSet};

use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::{
    control::lease::{Lease, Peer, SubnetKey},
    dataplane::{Dataplane, DataplaneError, MapFamily, PeerEntry, SenderEntry},
    family::{Family, V4, V6},
};

/// A removed lease stays in the maps this long: a node whose key was deleted or expired takes
/// its lease back within milliseconds, and its packets must not meet "unknown peer" meanwhile.
pub const PEER_HOLD_DOWN: std::time::Duration = std::time::Duration::from_millis(500);

/// What a family's peer table needs beyond its maps: its side of a lease.
pub trait PeerFamily: MapFamily {
    /// The lease's usable side in this family.
    fn peer(lease: &Lease) -> Option<Peer<Self>>;
    /// The lease's subnet in this family, usable or not.
    fn subnet(lease: &Lease) -> Option<Self::Net>;
}

impl PeerFamily for V4 {
    fn peer(lease: &Lease) -> Option<Peer<V4>> {
        lease.v4()
    }
    fn subnet(lease: &Lease) -> Option<ipnet::Ipv4Net> {
        lease.subnet
    }
}

impl PeerFamily for V6 {
    fn peer(lease: &Lease) -> Option<Peer<V6>> {
        lease.v6()
    }
    fn subnet(lease: &Lease) -> Option<ipnet::Ipv6Net> {
        lease.ipv6_subnet
    }
}

/// The map operations of a peer table: [`Dataplane`]'s (a model of the maps in the tests).
pub trait PeerMaps<F: MapFamily> {
    /// A peer entry and its sender entry (pointed at the entry's subnet), all or nothing.
    fn upsert_peer(&mut self, e: &PeerEntry<F>) -> Result<(), DataplaneError>;
    /// A peer entry alone (its sender entry names another subnet of its address).
    fn upsert_subnet(&mut self, e: &PeerEntry<F>) -> Result<(), DataplaneError>;
    /// A peer entry and its sender entry.
    fn remove_peer(&mut self, subnet: F::Net, ip: F::Addr) -> Result<(), DataplaneError>;
    /// A peer entry alone.
    fn remove_subnet(&mut self, subnet: F::Net) -> Result<(), DataplaneError>;
    fn set_sender(&mut self, ip: F::Addr, subnet: F::Net) -> Result<(), DataplaneError>;
    fn remove_sender(&mut self, ip: F::Addr) -> Result<(), DataplaneError>;
    fn peers(&self) -> Result<Vec<PeerEntry<F>>, DataplaneError>;
    fn senders(&self) -> Result<Vec<SenderEntry<F>>, DataplaneError>;
    /// The per-member traffic counts made the sender table's members (none in the model).
    fn sync_stats(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
}

impl<F: MapFamily> PeerMaps<F> for Dataplane {
    fn upsert_peer(&mut self, e: &PeerEntry<F>) -> Result<(), DataplaneError> {
        Dataplane::upsert_peer(self, e)
    }
    fn upsert_subnet(&mut self, e: &PeerEntry<F>) -> Result<(), DataplaneError> {
        Dataplane::upsert_subnet(self, e)
    }
    fn remove_peer(&mut self, subnet: F::Net, ip: F::Addr) -> Result<(), DataplaneError> {
        Dataplane::remove_peer::<F>(self, subnet, ip)
    }
    fn remove_subnet(&mut self, subnet: F::Net) -> Result<(), DataplaneError> {
        Dataplane::remove_subnet::<F>(self, subnet)
    }
    fn set_sender(&mut self, ip: F::Addr, subnet: F::Net) -> Result<(), DataplaneError> {
        Dataplane::set_sender::<F>(self, ip, subnet)
    }
    fn remove_sender(&mut self, ip: F::Addr) -> Result<(), DataplaneError> {
        Dataplane::remove_sender::<F>(self, ip)
    }
    fn peers(&self) -> Result<Vec<PeerEntry<F>>, DataplaneError> {
        Dataplane::peers::<F>(self)
    }
    fn senders(&self) -> Result<Vec<SenderEntry<F>>, DataplaneError> {
        Dataplane::senders::<F>(self)
    }
    fn sync_stats(&mut self) -> Result<(), DataplaneError> {
        Dataplane::sync_peer_stats::<F>(self)
    }
}

/// How the backend reaches a peer's PublicIP, as it decides it per peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Through VXLAN.
    Tunnel,
    /// Bare, to a peer on our L2 segment (vxlan's DirectRouting, host-gw).
    Direct,
    /// Not at all: the peer stays out of the maps, and the reason is logged once (host-gw: a
    /// PublicIP that is not on-link).
    Refused(&'static str),
}

fn entry<F: Family>(p: &Peer<F>, direct: bool) -> PeerEntry<F> {
    PeerEntry {
        subnet: p.subnet,
        public_ip: p.public_ip,
        vtep_mac: p.vtep.map_or([0; 6], |d| d.vtep_mac.0),
        direct,
    }
}

/// One PublicIP's sender entry and the peer entries that use it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sender<F: Family> {
    /// The subnet the map's entry names, as last read or written (`None`: it has none).
    named: Option<F::Net>,
    /// The peer entries with this PublicIP, the oldest first (after a restart: the one the
    /// entry names, then by subnet).
    users: Vec<F::Net>,
}

impl<F: Family> Sender<F> {
    fn new(named: Option<F::Net>) -> Self {
        Sender {
            named,
            users: Vec::new(),
        }
    }
}

/// The peer entries and sender table of one family.
type Maps<F> = (
    HashMap<<F as Family>::Net, PeerEntry<F>>,
    HashMap<<F as Family>::Addr, Sender<F>>,
);

/// One family's remote subnets as the maps hold them.
pub struct PeerTable<F: PeerFamily> {
    /// Our own subnet in this family: never a peer.
    pub own: Option<F::Net>,
    peers: HashMap<F::Net, PeerEntry<F>>,
    /// The sender entries, by PublicIP, and the peer entries that use each.
    senders: HashMap<F::Addr, Sender<F>>,
    /// The lease (key) each entry came from: a removed lease takes its entry with it only if no
    /// other lease (the same node under a new key, e.g. IPv6 turned on) replaced it.
    owners: HashMap<F::Net, SubnetKey>,
    /// Entries whose lease went away, removed at the given time unless it returns.
    leaving: HashMap<F::Net, Instant>,
    /// Subnets whose peer the backend refused ([`Reach::Refused`]), logged once each.
    refused: HashSet<F::Net>,
}

impl<F: PeerFamily> PeerTable<F> {
    /// The table over what an earlier agent left in the pinned maps: the first resync keeps or
    /// removes those entries, and repairs the sender table.
    pub fn adopt(dp: &impl PeerMaps<F>) -> Self {
        let (peers, senders) = read_maps(dp).unwrap_or_default();
        if !peers.is_empty() {
            info!(
                family = F::NAME,
                peers = peers.len(),
                senders = senders.len(),
                "adopted the pinned peer table"
            );
        }
        PeerTable {
            own: None,
            peers,
            senders,
            owners: HashMap::new(),
            leaving: HashMap::new(),
            refused: HashSet::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The entries the maps hold (held-down ones included).
    pub fn entries(&self) -> impl Iterator<Item = &PeerEntry<F>> {
        self.peers.values()
    }

    /// Puts this family's side of `lease` into the maps, reached as `reach` says for its
    /// PublicIP. A lease without a usable side in this family takes its entry away (held down).
    pub fn upsert(&mut self, dp: &mut impl PeerMaps<F>, lease: &Lease, reach: impl Fn(F::Addr) -> Reach) {
        let Some(p) = F::peer(lease) else {
            self.lease_removed(dp, lease);
            return;
        };
        if Some(p.subnet) == self.own {
            return;
        }
        self.owners.insert(p.subnet, lease.key());
        let direct = match reach(p.public_ip) {
            Reach::Tunnel => false,
            Reach::Direct => true,
            Reach::Refused(why) => {
                if self.refused.insert(p.subnet) {
                    crate::metrics::peer_map_error("refused");
                    error!(family = F::NAME, subnet = %p.subnet, public_ip = %p.public_ip, "{why}; its subnet is not routed");
                }
                self.hold_down(dp, p.subnet);
                return;
            }
        };
        self.refused.remove(&p.subnet);
        // The lease is back (or still there): no removal.
        self.leaving.remove(&p.subnet);
        let entry = entry(&p, direct);
        let old = self.peers.get(&p.subnet).copied();
        if old == Some(entry) {
            return;
        }
        let ip = entry.public_ip;
        let s = self.senders.entry(ip).or_insert_with(|| Sender::new(None));
        let new_user = !s.users.contains(&p.subnet);
        if new_user {
            s.users.push(p.subnet);
        }
        // The sender entry is this subnet's unless an older live subnet of its address has it.
        let takes = self.sender_for(ip) == Some(p.subnet);
        let written = if takes {
            dp.upsert_peer(&entry)
        } else {
            dp.upsert_subnet(&entry)
        };
        match written {
            Ok(()) => {
                info!(family = F::NAME, subnet = %p.subnet, public_ip = %p.public_ip, direct, "peer added");
                self.peers.insert(p.subnet, entry);
                if takes {
                    if let Some(s) = self.senders.get_mut(&ip) {
                        s.named = Some(p.subnet);
                    }
                }
                // A peer that moved to a new PublicIP no longer uses the old one's entry.
                if let Some(old) = old.filter(|o| o.public_ip != ip) {
                    self.sender_released(dp, old.public_ip, old.subnet);
                }
            }
            Err(e) => {
                if new_user {
                    self.sender_released(dp, ip, p.subnet);
                }
                let full = matches!(e, DataplaneError::PeersFull { .. });
                crate::metrics::peer_map_error(if full { "full" } else { "other" });
                error!(family = F::NAME, subnet = %p.subnet, error = %e, "adding peer");
            }
        }
    }

    /// The subnet `ip`'s sender entry should name: the one it names while that one's lease is
    /// live (not held down), else the oldest live one of its subnets, else the one it names or
    /// the oldest.
    fn sender_for(&self, ip: F::Addr) -> Option<F::Net> {
        let s = self.senders.get(&ip)?;
        let live = |u: &F::Net| !self.leaving.contains_key(u);
        let named = s.named.filter(|n| s.users.contains(n));
        named
            .filter(live)
            .or_else(|| s.users.iter().copied().find(live))
            .or(named)
            .or_else(|| s.users.first().copied())
    }

    /// `subnet` no longer uses `ip`: the sender entry goes with its last user, and names
    /// another user when it named this one.
    fn sender_released(&mut self, dp: &mut impl PeerMaps<F>, ip: F::Addr, subnet: F::Net) {
        let Some(s) = self.senders.get_mut(&ip) else {
            return;
        };
        s.users.retain(|u| *u != subnet);
        self.settle_sender(dp, ip);
    }

    /// Makes `ip`'s sender entry what its users call for ([`Self::sender_for`]): none without
    /// users.
    fn settle_sender(&mut self, dp: &mut impl PeerMaps<F>, ip: F::Addr) {
        let wanted = self.sender_for(ip);
        let Some(s) = self.senders.get_mut(&ip) else {
            return;
        };
        match wanted {
            None => {
                if let Err(e) = dp.remove_sender(ip) {
                    error!(family = F::NAME, public_ip = %ip, error = %e, "removing a sender entry");
                    return;
                }
                if s.named.is_some() {
                    info!(family = F::NAME, public_ip = %ip, "sender entry removed (no peer uses it)");
                }
                self.senders.remove(&ip);
            }
            Some(want) if s.named != Some(want) => match dp.set_sender(ip, want) {
                Ok(()) => {
                    info!(family = F::NAME, public_ip = %ip, subnet = %want, "sender entry names another subnet of its address");
                    s.named = Some(want);
                }
                Err(e) => error!(family = F::NAME, public_ip = %ip, error = %e, "writing a sender entry"),
            },
            Some(_) => {}
        }
    }

    /// A lease was deleted: its entry is held down, unless another lease owns the subnet now.
    pub fn lease_removed(&mut self, dp: &mut impl PeerMaps<F>, lease: &Lease) {
        let Some(subnet) = F::subnet(lease) else { return };
        if self.owners.get(&subnet) == Some(&lease.key()) {
            self.hold_down(dp, subnet);
        }
    }

    /// The full set of leases, compared with what the pinned maps hold (read again, not
    /// remembered): entries for subnets not among them are held down, the rest upserted, and
    /// the sender table repaired (entries no peer entry uses removed, missing or wrong ones
    /// written).
    pub fn resync(&mut self, dp: &mut impl PeerMaps<F>, all: &[Lease], reach: impl Fn(F::Addr) -> Reach) {
        match read_maps(dp) {
            Some((peers, senders)) => (self.peers, self.senders) = (peers, senders),
            None => warn!(
                family = F::NAME,
                "cannot read the pinned peer maps; resyncing from what was written"
            ),
        }
        let wanted: HashMap<F::Net, &Lease> = all
            .iter()
            .filter_map(|l| Some((F::peer(l)?.subnet, l)))
            .filter(|(sn, _)| Some(*sn) != self.own)
            .collect();
        let stale: Vec<F::Net> = self
            .peers
            .keys()
            .filter(|s| !wanted.contains_key(s))
            .copied()
            .collect();
        for s in stale {
            self.hold_down(dp, s);
        }
        for lease in wanted.values() {
            self.upsert(dp, lease, &reach);
        }
        let ips: Vec<F::Addr> = self.senders.keys().copied().collect();
        for ip in ips {
            let was = self.senders.get(&ip).and_then(|s| s.named);
            self.settle_sender(dp, ip);
            let now = self.senders.get(&ip).and_then(|s| s.named);
            if was != now {
                warn!(family = F::NAME, public_ip = %ip, was = ?was, now = ?now, "the pinned sender table was out of step with the peers; repaired");
            }
        }
        if let Err(e) = dp.sync_stats() {
            warn!(family = F::NAME, error = %e, "cannot bring the per-peer traffic counts in step with the members");
        }
    }

    /// Schedules the removal of an entry whose lease went away (see [`PEER_HOLD_DOWN`]); its
    /// address's sender entry moves to another live subnet of that address, if it has one.
    fn hold_down(&mut self, dp: &mut impl PeerMaps<F>, subnet: F::Net) {
        let Some(ip) = self.peers.get(&subnet).map(|e| e.public_ip) else {
            return;
        };
        self.leaving
            .entry(subnet)
            .or_insert_with(|| Instant::now() + PEER_HOLD_DOWN);
        self.settle_sender(dp, ip);
    }

    /// Removes the held-down entries whose time is up: the subnet, and its sender entry when no
    /// other entry uses its PublicIP (one delete each; a shared sender entry names another of
    /// its subnets).
    pub fn reap(&mut self, dp: &mut impl PeerMaps<F>) {
        let now = Instant::now();
        let due: Vec<F::Net> = self
            .leaving
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(s, _)| *s)
            .collect();
        for subnet in due {
            self.leaving.remove(&subnet);
            self.owners.remove(&subnet);
            let Some(old) = self.peers.remove(&subnet) else {
                continue;
            };
            let ip = old.public_ip;
            let shared = self
                .senders
                .get(&ip)
                .is_some_and(|s| s.users.iter().any(|u| *u != subnet));
            let removed = if shared {
                dp.remove_subnet(subnet)
            } else {
                dp.remove_peer(subnet, ip)
            };
            match removed {
                Ok(()) => info!(family = F::NAME, %subnet, public_ip = %ip, "peer removed"),
                Err(e) => error!(family = F::NAME, %subnet, error = %e, "removing peer"),
            }
            if shared {
                self.sender_released(dp, ip, subnet);
            } else {
                self.senders.remove(&ip);
            }
        }
    }
}

/// The peer entries and the sender table as the pinned maps hold them, each sender with the
/// entries that use it (the subnet it names counted as the oldest); `None` when a map cannot be
/// read.
fn read_maps<F: MapFamily>(dp: &impl PeerMaps<F>) -> Option<Maps<F>> {
    let peers: HashMap<F::Net, PeerEntry<F>> = dp.peers().ok()?.into_iter().map(|e| (e.subnet, e)).collect();
    let mut senders: HashMap<F::Addr, Sender<F>> = dp
        .senders()
        .ok()?
        .into_iter()
        .map(|(ip, sn)| (ip, Sender::new(Some(sn))))
        .collect();
    let mut entries: Vec<&PeerEntry<F>> = peers.values().collect();
    entries.sort_by_key(|e| e.subnet);
    for e in entries {
        let s = senders.entry(e.public_ip).or_insert_with(|| Sender::new(None));
        s.users.push(e.subnet);
    }
    for s in senders.values_mut() {
        if let Some(i) = s.users.iter().position(|u| Some(*u) == s.named) {
            let named = s.users.remove(i);
            s.users.insert(0, named);
        }
    }
    Some((peers, senders))
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::Ipv4Addr};

    use ipnet::Ipv4Net;

    use super::*;
    use crate::control::lease::LeaseAttrs;

    /// The two maps, as the kernel would hold them.
    #[derive(Default)]
    struct Model {
        peers: BTreeMap<Ipv4Net, PeerEntry<V4>>,
        senders: BTreeMap<Ipv4Addr, Ipv4Net>,
        /// Map operations done (reads not counted).
        writes: usize,
    }

    impl PeerMaps<V4> for Model {
        fn upsert_peer(&mut self, e: &PeerEntry<V4>) -> Result<(), DataplaneError> {
            self.writes += 2;
            self.senders.insert(e.public_ip, e.subnet);
            self.peers.insert(e.subnet, *e);
            Ok(())
        }
        fn upsert_subnet(&mut self, e: &PeerEntry<V4>) -> Result<(), DataplaneError> {
            self.writes += 1;
            self.peers.insert(e.subnet, *e);
            Ok(())
        }
        fn remove_peer(&mut self, subnet: Ipv4Net, ip: Ipv4Addr) -> Result<(), DataplaneError> {
            self.writes += 2;
            self.peers.remove(&subnet);
            self.senders.remove(&ip);
            Ok(())
        }
        fn remove_subnet(&mut self, subnet: Ipv4Net) -> Result<(), DataplaneError> {
            self.writes += 1;
            self.peers.remove(&subnet);
            Ok(())
        }
        fn set_sender(&mut self, ip: Ipv4Addr, subnet: Ipv4Net) -> Result<(), DataplaneError> {
            self.writes += 1;
            self.senders.insert(ip, subnet);
            Ok(())
        }
        fn remove_sender(&mut self, ip: Ipv4Addr) -> Result<(), DataplaneError> {
            self.writes += 1;
            self.senders.remove(&ip);
            Ok(())
        }
        fn peers(&self) -> Result<Vec<PeerEntry<V4>>, DataplaneError> {
            Ok(self.peers.values().copied().collect())
        }
        fn senders(&self) -> Result<Vec<(Ipv4Addr, Ipv4Net)>, DataplaneError> {
            Ok(self.senders.iter().map(|(a, n)| (*a, *n)).collect())
        }
    }

    impl Model {
        /// The sender table as (PublicIP's last byte, subnet's third byte) pairs.
        fn senders_short(&self) -> Vec<(u8, u8)> {
            self.senders
                .iter()
                .map(|(ip, sn)| (ip.octets()[3], sn.network().octets()[2]))
                .collect()
        }

        fn subnets(&self) -> Vec<u8> {
            self.peers.keys().map(|sn| sn.network().octets()[2]).collect()
        }
    }

    /// The lease of 10.244.`third`.0/24 from 198.18.0.`last`.
    fn lease(third: u8, last: u8) -> Lease {
        Lease {
            subnet: Some(Ipv4Net::new(Ipv4Addr::new(10, 244, third, 0), 24).unwrap()),
            ipv6_subnet: None,
            attrs: LeaseAttrs::vxlan(Ipv4Addr::new(198, 18, 0, last), 1, [2, 0, 0, 0, 0, last]),
            expiration: None,
        }
    }

    fn tunnel(_: Ipv4Addr) -> Reach {
        Reach::Tunnel
    }

    async fn reap_after_hold_down(t: &mut PeerTable<V4>, m: &mut Model) {
        tokio::time::advance(PEER_HOLD_DOWN + std::time::Duration::from_millis(1)).await;
        t.reap(m);
    }

    /// The reproduction: a second lease with node 2's PublicIP comes and goes; node 2's
    /// own subnet keeps its sender entry all along.
    #[tokio::test(start_paused = true)]
    async fn a_sender_entry_stays_with_its_subnet_while_that_lease_lives() {
        let mut m = Model::default();
        let mut t = PeerTable::<V4>::adopt(&m);
        t.upsert(&mut m, &lease(2, 12), tunnel);
        t.upsert(&mut m, &lease(3, 13), tunnel);
        // A second subnet from node 2's address: one map write, and the entry still names 2.
        let before = m.writes;
        t.upsert(&mut m, &lease(9, 12), tunnel);
        assert_eq!(m.writes - before, 1);
        assert_eq!(m.subnets(), [2, 3, 9]);
        assert_eq!(m.senders_short(), [(12, 2), (13, 3)]);
        let before = m.writes;
        t.lease_removed(&mut m, &lease(9, 12));
        reap_after_hold_down(&mut t, &mut m).await;
        assert_eq!(m.subnets(), [2, 3]);
        assert_eq!(
            m.senders_short(),
            [(12, 2), (13, 3)],
            "node 2's own subnet lost its sender entry"
        );
        assert_eq!(m.writes - before, 1, "one delete");
        // The last subnet of an address takes its entry along: one removal, as before.
        let before = m.writes;
        t.lease_removed(&mut m, &lease(3, 13));
        reap_after_hold_down(&mut t, &mut m).await;
        assert_eq!(m.senders_short(), [(12, 2)]);
        assert_eq!(m.writes - before, 2);
        // A node that re-leases: its old lease goes (held down), the new one comes. The entry
        // moves to the new subnet at once, not after the hold-down.
        t.lease_removed(&mut m, &lease(2, 12));
        t.upsert(&mut m, &lease(9, 12), tunnel);
        assert_eq!(m.senders_short(), [(12, 9)]);
        reap_after_hold_down(&mut t, &mut m).await;
        assert_eq!((m.subnets(), m.senders_short()), (vec![9], vec![(12, 9)]));
        // The held-down lease returning in time does not take the entry back.
        t.upsert(&mut m, &lease(2, 12), tunnel);
        t.lease_removed(&mut m, &lease(2, 12));
        t.upsert(&mut m, &lease(2, 12), tunnel);
        assert_eq!(m.senders_short(), [(12, 9)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_moves_leaves_a_shared_sender_entry_to_its_other_subnet() {
        let mut m = Model::default();
        let mut t = PeerTable::<V4>::adopt(&m);
        t.upsert(&mut m, &lease(9, 12), tunnel);
        t.upsert(&mut m, &lease(2, 12), tunnel);
        assert_eq!(m.senders_short(), [(12, 9)]);
        // 10.244.9.0/24 moves to 198.18.0.14: 198.18.0.12's entry names 10.244.2.0/24 now.
        t.upsert(&mut m, &lease(9, 14), tunnel);
        assert_eq!(m.senders_short(), [(12, 2), (14, 9)]);
        // And 10.244.2.0/24 moves too: 198.18.0.12 has no subnet left.
        t.upsert(&mut m, &lease(2, 14), tunnel);
        assert_eq!(m.senders_short(), [(14, 9)]);
        assert_eq!(m.subnets(), [2, 9]);
    }

    /// A restart (adoption) and a resync compare with the maps: a missing entry is written, a
    /// wrong one corrected, one no peer uses removed, a missing peer entry put back.
    #[tokio::test(start_paused = true)]
    async fn adoption_and_resync_repair_what_the_maps_hold() {
        let mut m = Model::default();
        let mut t = PeerTable::<V4>::adopt(&m);
        let all = [lease(2, 12), lease(3, 13), lease(4, 14)];
        t.resync(&mut m, &all, tunnel);
        // What another hand did to the pinned maps while no agent ran.
        m.senders.remove(&Ipv4Addr::new(198, 18, 0, 12));
        m.senders
            .insert(Ipv4Addr::new(198, 18, 0, 13), "10.244.77.0/24".parse().unwrap());
        m.senders
            .insert(Ipv4Addr::new(198, 18, 0, 99), "10.244.99.0/24".parse().unwrap());
        let mut t = PeerTable::<V4>::adopt(&m);
        t.resync(&mut m, &all, tunnel);
        assert_eq!(m.senders_short(), [(12, 2), (13, 3), (14, 4)]);
        // The same under a running agent: its next resync reads the maps again.
        m.peers.remove(&"10.244.4.0/24".parse().unwrap());
        m.senders.remove(&Ipv4Addr::new(198, 18, 0, 14));
        m.senders
            .insert(Ipv4Addr::new(198, 18, 0, 98), "10.244.98.0/24".parse().unwrap());
        t.resync(&mut m, &all, tunnel);
        assert_eq!(m.subnets(), [2, 3, 4]);
        assert_eq!(m.senders_short(), [(12, 2), (13, 3), (14, 4)]);
        // In step: a resync writes nothing.
        let before = m.writes;
        t.resync(&mut m, &all, tunnel);
        assert_eq!(m.writes, before);
    }

    /// A lease that loses its side in a family (the control plane held it back) gives up that
    /// entry, unless another lease owns the subnet now.
    #[tokio::test(start_paused = true)]
    async fn a_lease_without_its_side_gives_its_entry_up() {
        let mut m = Model::default();
        let mut t = PeerTable::<V4>::adopt(&m);
        t.upsert(&mut m, &lease(2, 12), tunnel);
        let mut stripped = lease(2, 12);
        stripped.attrs.public_ip = Ipv4Addr::UNSPECIFIED;
        t.upsert(&mut m, &stripped, tunnel);
        reap_after_hold_down(&mut t, &mut m).await;
        assert!(m.peers.is_empty() && m.senders.is_empty());
    }
}
