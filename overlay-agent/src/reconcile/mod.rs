//! The glue: lease events become map entries ([`peers`]), the backend sets the node up for our
//! lease ([`vxlan`]: the programs' config, the host device, receive GRO), local pods are learned
//! from the bridge ([`endpoints`]), encap follows the pod bridge ([`encap_hook`]), the decap hook and
//! delivery are chosen ([`decap`]). [`Reconciler`] holds what the maps should hold.

pub mod decap;
pub mod encap_hook;
pub mod endpoints;
pub mod peers;
pub mod vxlan;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tracing::info;

use crate::{
    control::{config::NetworkConfig, Event},
    dataplane::Dataplane,
    family::{V4, V6},
    node::{netlink, underlay::Underlay},
};
use peers::PeerTable;

/// What the maps should hold, kept in step with the lease events.
pub struct Reconciler {
    /// The underlay's connected networks: DirectRouting peers are inside them (flanneld: a
    /// peer reached without a gateway).
    segment: Option<Ipv4Net>,
    segment6: Option<Ipv6Net>,
    config: Option<NetworkConfig>,
    v4: PeerTable<V4>,
    v6: PeerTable<V6>,
    /// What the backend set up on this node.
    node: Node,
}

/// The node side of the config's backend ([`BackendKind`](crate::control::backend::BackendKind)):
/// one file each.
enum Node {
    Vxlan(vxlan::VxlanNode),
}

/// Our lease's subnets (either may be absent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Own {
    pub v4: Option<Ipv4Net>,
    pub v6: Option<Ipv6Net>,
}

impl Reconciler {
    /// Over what an earlier agent left in the pinned maps (adopted: the first resync keeps or
    /// removes those peers). `receive_gro`: keep the receive-GRO device, else remove one an
    /// earlier run left.
    pub async fn start(
        dp: &Dataplane,
        underlay: Underlay,
        public_ip: Option<Ipv4Addr>,
        public_ipv6: Option<Ipv6Addr>,
        vtep_mac: [u8; 6],
        datapath_flags: u16,
        receive_gro: bool,
    ) -> Self {
        let connected = |a: Option<IpAddr>| a.and_then(|a| netlink::connected_network(&underlay.name, a));
        let segment = match connected(underlay.ipv4.map(IpAddr::V4)) {
            Some(IpNet::V4(n)) => Some(n),
            _ => None,
        };
        let segment6 = match connected(underlay.ipv6.map(IpAddr::V6)) {
            Some(IpNet::V6(n)) => Some(n),
            _ => None,
        };
        // The only backend: vxlan (BackendKind).
        let node = Node::Vxlan(
            vxlan::VxlanNode::start(
                &underlay,
                public_ip,
                public_ipv6,
                vtep_mac,
                datapath_flags,
                receive_gro,
            )
            .await,
        );
        Reconciler {
            segment,
            segment6,
            config: None,
            v4: PeerTable::adopt(dp),
            v6: PeerTable::adopt(dp),
            node,
        }
    }

    pub fn peers(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Our lease's subnets, once known (which local pods are ours).
    pub fn own_subnets(&self) -> Option<endpoints::OwnSubnets> {
        endpoints::OwnSubnets::of(self.v4.own, self.v6.own)
    }

    /// DirectRouting applies to a peer on our own segment, per family (flanneld decides the
    /// same way for `flannel.1` and `flannel-v6.1`).
    fn direct_v4(&self) -> impl Fn(Ipv4Addr) -> bool + use<> {
        let (on, segment) = (self.direct_routing(), self.segment);
        move |ip| on && segment.is_some_and(|net| net.contains(&ip))
    }

    fn direct_v6(&self) -> impl Fn(Ipv6Addr) -> bool + use<> {
        let (on, segment) = (self.direct_routing(), self.segment6);
        move |ip| on && segment.is_some_and(|net| net.contains(&ip))
    }

    fn direct_routing(&self) -> bool {
        self.config.as_ref().is_some_and(|c| c.backend.direct_routing)
    }

    pub async fn apply(&mut self, dp: &mut Dataplane, ev: Event) {
        match ev {
            Event::Config(cfg) => {
                self.config = Some(cfg);
                self.write_config(dp).await;
            }
            Event::OwnLease(lease) => {
                // `subnet=10.244.7.0/24` as before IPv6 (scripts and tests read it).
                let v6 = lease.ipv6_subnet.map(|n| n.to_string()).unwrap_or_default();
                match lease.subnet {
                    Some(v4) => info!(subnet = %v4, ipv6_subnet = %v6, "holding lease"),
                    None => info!(ipv6_subnet = %v6, "holding lease"),
                }
                self.v4.own = lease.subnet;
                self.v6.own = lease.ipv6_subnet;
                self.write_config(dp).await;
            }
            Event::PeerUpsert(lease) => {
                self.v4.upsert(dp, &lease, self.direct_v4());
                self.v6.upsert(dp, &lease, self.direct_v6());
            }
            Event::PeerRemove(lease) => {
                self.v4.lease_removed(&lease);
                self.v6.lease_removed(&lease);
            }
            Event::Resync(all) => {
                self.v4.resync(dp, &all, self.direct_v4());
                self.v6.resync(dp, &all, self.direct_v6());
            }
        }
    }

    pub fn reap(&mut self, dp: &mut Dataplane) {
        self.v4.reap(dp);
        self.v6.reap(dp);
    }

    fn own(&self) -> Own {
        Own {
            v4: self.v4.own,
            v6: self.v6.own,
        }
    }

    /// Every resync period: the backend puts back what it set up on the node and was removed
    /// since (the host device, the receive-GRO device), so host → pod traffic does not wait for
    /// the next lease or config event.
    pub async fn resync(&mut self, dp: &mut Dataplane) {
        let own = self.own();
        let Some(cfg) = &self.config else { return };
        match &mut self.node {
            Node::Vxlan(n) => n.resync(dp, cfg, own).await,
        }
    }

    async fn write_config(&mut self, dp: &mut Dataplane) {
        let own = self.own();
        let Some(cfg) = &self.config else { return };
        match &mut self.node {
            Node::Vxlan(n) => n.write(dp, cfg, own).await,
        }
    }
}
