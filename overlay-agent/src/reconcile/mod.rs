//! The glue: lease events become map entries ([`peers`]), the backend sets the node up for our
//! lease ([`vxlan`]: the programs' config, the host device, receive GRO; [`hostgw`]: the
//! programs' config, the per-peer routes), local pods are learned
//! from the bridge ([`endpoints`]), encap follows the pod bridge ([`encap_hook`]), the decap hook and
//! delivery are chosen ([`decap`]). [`Reconciler`] holds what the maps should hold.

pub mod decap;
pub mod encap_hook;
pub mod endpoints;
pub mod hostgw;
pub mod peers;
pub mod vxlan;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tracing::info;

use crate::{
    control::{backend::BackendKind, config::NetworkConfig, Event},
    dataplane::Dataplane,
    family::{Family, V4, V6},
    node::{netlink, routes::PeerRoute, underlay::Underlay},
};
use peers::{PeerTable, Reach};

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
    /// What a backend's node side starts from (the config names the backend).
    underlay: Underlay,
    public_ip: Option<Ipv4Addr>,
    public_ipv6: Option<Ipv6Addr>,
    datapath_flags: u16,
}

/// The node side of the config's backend ([`BackendKind`]): one file each.
enum Node {
    Vxlan(vxlan::VxlanNode),
    HostGw(hostgw::HostGwNode),
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
        // vxlan until the config says otherwise (it comes before our lease).
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
        let underlay = underlay.clone();
        Reconciler {
            segment,
            segment6,
            config: None,
            v4: PeerTable::adopt(dp),
            v6: PeerTable::adopt(dp),
            node,
            underlay,
            public_ip,
            public_ipv6,
            datapath_flags,
        }
    }

    pub fn peers(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Our lease's subnets, once known (which local pods are ours).
    pub fn own_subnets(&self) -> Option<endpoints::OwnSubnets> {
        endpoints::OwnSubnets::of(self.v4.own, self.v6.own)
    }

    /// How a peer is reached, per family: host-gw sends every on-link peer bare
    /// ([`hostgw::reach`]); vxlan's DirectRouting applies to a peer on our own segment (flanneld
    /// decides the same way for `flannel.1` and `flannel-v6.1`), the rest is tunnelled.
    fn reach<F: Family>(&self, segment: Option<IpNet>) -> impl Fn(F::Addr) -> Reach + use<F> {
        let (host_gw, on) = (self.host_gw(), self.direct_routing());
        move |ip| {
            let ip: IpAddr = ip.into();
            match host_gw {
                Some(reach) => reach(ip),
                None if on && segment.is_some_and(|net| net.contains(&ip)) => Reach::Direct,
                None => Reach::Tunnel,
            }
        }
    }

    fn reach_v4(&self) -> impl Fn(Ipv4Addr) -> Reach + use<> {
        self.reach::<V4>(self.segment.map(IpNet::V4))
    }

    fn reach_v6(&self) -> impl Fn(Ipv6Addr) -> Reach + use<> {
        self.reach::<V6>(self.segment6.map(IpNet::V6))
    }

    fn host_gw(&self) -> Option<impl Fn(IpAddr) -> Reach + Copy + use<>> {
        match &self.node {
            Node::HostGw(n) => Some(hostgw::reach(n.underlay_ifindex())),
            Node::Vxlan(_) => None,
        }
    }

    fn direct_routing(&self) -> bool {
        self.config.as_ref().is_some_and(|c| c.backend.direct_routing)
    }

    pub async fn apply(&mut self, dp: &mut Dataplane, ev: Event) {
        match ev {
            Event::Config(cfg) => {
                if cfg.backend.kind == BackendKind::HostGw && !matches!(self.node, Node::HostGw(_)) {
                    self.node = Node::HostGw(
                        hostgw::HostGwNode::start(
                            dp,
                            &self.underlay,
                            self.public_ip,
                            self.public_ipv6,
                            self.datapath_flags,
                        )
                        .await,
                    );
                }
                if cfg.backend.kind == BackendKind::Vxlan {
                    hostgw::remove_left(dp, &self.underlay, &networks(&cfg)).await;
                }
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
                self.v4.upsert(dp, &lease, self.reach_v4());
                self.v6.upsert(dp, &lease, self.reach_v6());
                self.sync_routes().await;
            }
            Event::PeerRemove(lease) => {
                self.v4.lease_removed(dp, &lease);
                self.v6.lease_removed(dp, &lease);
            }
            Event::Resync(all) => {
                self.v4.resync(dp, &all, self.reach_v4());
                self.v6.resync(dp, &all, self.reach_v6());
                self.sync_routes().await;
            }
        }
    }

    pub async fn reap(&mut self, dp: &mut Dataplane) {
        let before = self.peers();
        self.v4.reap(dp);
        self.v6.reap(dp);
        if self.peers() != before {
            self.sync_routes().await;
        }
    }

    /// The routes the peer tables call for (host-gw: one per peer subnet, via its PublicIP).
    fn wanted_routes(&self) -> BTreeSet<PeerRoute> {
        let v4 = self.v4.entries().map(|e| PeerRoute {
            dst: IpNet::V4(e.subnet),
            via: IpAddr::V4(e.public_ip),
        });
        let v6 = self.v6.entries().map(|e| PeerRoute {
            dst: IpNet::V6(e.subnet),
            via: IpAddr::V6(e.public_ip),
        });
        v4.chain(v6).collect()
    }

    /// host-gw only: the vxlan backend has no per-peer routes, and building the wanted set
    /// costs O(peers) on every lease event (with 5,000 peers it was most of the agent's CPU
    /// under churn).
    async fn sync_routes(&mut self) {
        if !matches!(self.node, Node::HostGw(_)) {
            return;
        }
        let wanted = self.wanted_routes();
        if let Node::HostGw(n) = &mut self.node {
            n.sync_routes(&wanted).await;
        }
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
            Node::HostGw(_) => {
                let networks = networks(cfg);
                let wanted = self.wanted_routes();
                if let Node::HostGw(n) = &mut self.node {
                    n.resync(&wanted, &networks).await;
                }
            }
        }
    }

    async fn write_config(&mut self, dp: &mut Dataplane) {
        let own = self.own();
        let Some(cfg) = &self.config else { return };
        match &mut self.node {
            Node::Vxlan(n) => n.write(dp, cfg, own).await,
            Node::HostGw(n) => n.write(dp, cfg, own).await,
        }
    }
}

/// The config's cluster networks, both families.
fn networks(cfg: &NetworkConfig) -> Vec<IpNet> {
    cfg.network()
        .map(IpNet::V4)
        .into_iter()
        .chain(cfg.ipv6_network().map(IpNet::V6))
        .collect()
}
