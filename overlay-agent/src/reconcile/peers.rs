//! The datapath's peer tables, kept in step with the lease events: one [`PeerTable`] per address
//! family, written once for both. One remote lease becomes one map upsert; a removed lease
//! becomes one delete after a short hold-down, unless the lease (or another one for the same
//! subnet) comes back first.

use std::collections::{HashMap, HashSet};

use tokio::time::Instant;
use tracing::{error, info};

use crate::{
    control::lease::{Lease, Peer, SubnetKey},
    dataplane::{Dataplane, DataplaneError, MapFamily, PeerEntry},
    family::{Family, V4, V6},
};

/// A removed lease stays in the maps this long: a node whose key was deleted or expired takes
/// its lease back within milliseconds, and its packets must not meet "unknown peer" meanwhile.
pub const PEER_HOLD_DOWN: std::time::Duration = std::time::Duration::from_millis(500);

/// What a family's peer table needs beyond its maps: its side of a lease.
pub trait PeerFamily: MapFamily {
    fn peer(lease: &Lease) -> Option<Peer<Self>>;
}

impl PeerFamily for V4 {
    fn peer(lease: &Lease) -> Option<Peer<V4>> {
        lease.v4()
    }
}

impl PeerFamily for V6 {
    fn peer(lease: &Lease) -> Option<Peer<V6>> {
        lease.v6()
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

/// One family's remote subnets as the maps hold them.
pub struct PeerTable<F: PeerFamily> {
    /// Our own subnet in this family: never a peer.
    pub own: Option<F::Net>,
    peers: HashMap<F::Net, PeerEntry<F>>,
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
    /// removes those entries.
    pub fn adopt(dp: &Dataplane) -> Self {
        let peers: HashMap<F::Net, PeerEntry<F>> = dp
            .peers::<F>()
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.subnet, e))
            .collect();
        if !peers.is_empty() {
            info!(
                family = F::NAME,
                peers = peers.len(),
                "adopted the pinned peer table"
            );
        }
        PeerTable {
            own: None,
            peers,
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
    /// PublicIP.
    pub fn upsert(&mut self, dp: &mut Dataplane, lease: &Lease, reach: impl Fn(F::Addr) -> Reach) {
        let Some(p) = F::peer(lease) else { return };
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
                self.hold_down(p.subnet);
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
        // A peer that moved to a new PublicIP leaves a stale sender entry behind: drop it first.
        if let Some(old) = old {
            if old.public_ip != p.public_ip {
                let _ = dp.remove_peer::<F>(old.subnet, old.public_ip);
            }
        }
        match dp.upsert_peer(&entry) {
            Ok(()) => {
                info!(family = F::NAME, subnet = %p.subnet, public_ip = %p.public_ip, direct, "peer added");
                self.peers.insert(p.subnet, entry);
            }
            Err(e) => {
                let full = matches!(e, DataplaneError::PeersFull { .. });
                crate::metrics::peer_map_error(if full { "full" } else { "other" });
                error!(family = F::NAME, subnet = %p.subnet, error = %e, "adding peer");
            }
        }
    }

    /// A lease was deleted: its entry is held down, unless another lease owns the subnet now.
    pub fn lease_removed(&mut self, lease: &Lease) {
        let Some(p) = F::peer(lease) else { return };
        if self.owners.get(&p.subnet) == Some(&lease.key()) {
            self.hold_down(p.subnet);
        }
    }

    /// The full set of leases: entries for subnets not among them are held down, the rest
    /// upserted.
    pub fn resync(&mut self, dp: &mut Dataplane, all: &[Lease], reach: impl Fn(F::Addr) -> Reach) {
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
            self.hold_down(s);
        }
        for lease in wanted.values() {
            self.upsert(dp, lease, &reach);
        }
    }

    /// Schedules the removal of an entry whose lease went away (see [`PEER_HOLD_DOWN`]).
    fn hold_down(&mut self, subnet: F::Net) {
        if self.peers.contains_key(&subnet) {
            self.leaving
                .entry(subnet)
                .or_insert_with(|| Instant::now() + PEER_HOLD_DOWN);
        }
    }

    /// Removes the held-down entries whose time is up.
    pub fn reap(&mut self, dp: &mut Dataplane) {
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
            match dp.remove_peer::<F>(subnet, ip) {
                Ok(()) => info!(family = F::NAME, %subnet, public_ip = %ip, "peer removed"),
                Err(e) => error!(family = F::NAME, %subnet, error = %e, "removing peer"),
            }
        }
    }
}
