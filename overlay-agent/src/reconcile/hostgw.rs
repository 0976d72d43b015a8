//! The host-gw backend's node side, as flanneld's `pkg/backend/hostgw` and `route_network.go` set
//! a node up, with the BPF fast path in front: the programs' config (our PublicIPs, the
//! underlay; every peer is sent bare, see [`reach`]; bare pod packets from peers are delivered
//! straight to pods), the recorder on the underlay's egress (the flows the stack routes to
//! peers, whose replies take the stack), no host device (one a vxlan run left is removed), and
//! per-peer routes `SUBNET via PUBLICIP dev IFACE` kept in step with the peer
//! tables, for the node's own traffic and whatever the fast path hands to the stack. Routes that
//! go missing are put back on every resync (flanneld's route check), and routes into the
//! cluster network through our interface that no lease wants any more are removed.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use overlay_common::{
    maps::{CONFIG_BARE_FAST, CONFIG_HOST_GW},
    DataplaneConfig,
};
use tracing::{error, info, warn};

use super::{peers::Reach, Own};
use crate::{
    control::config::NetworkConfig,
    dataplane::{Config6, Dataplane},
    node::{
        grodev, hostdev, netlink,
        routes::{PeerRoute, Routes},
        sysctl,
        underlay::Underlay,
    },
};

/// What the host-gw backend has set up on this node.
pub struct HostGwNode {
    /// The recorder is attached: bare pod packets from peers may be delivered straight.
    recorder: bool,
    underlay_mtu: u32,
    underlay_ifindex: u32,
    underlay_mac: [u8; 6],
    public_ip: Option<Ipv4Addr>,
    public_ipv6: Option<Ipv6Addr>,
    datapath_flags: u16,
    routes: Option<Routes>,
    /// The peer routes we added (or found in place) and have not removed.
    installed: BTreeSet<PeerRoute>,
    /// Routes the kernel refused, logged once each.
    failed: BTreeSet<PeerRoute>,
}

/// A host-gw peer is reached bare through the underlay; one whose PublicIP is not on-link
/// there cannot be (flanneld's route add fails the same way), and stays out of the maps.
pub fn reach(underlay_ifindex: u32) -> impl Fn(IpAddr) -> Reach + Copy {
    move |ip| match netlink::route_to(ip) {
        Ok(r) if r.oif == underlay_ifindex && r.gateway.is_none() => Reach::Direct,
        Ok(_) => Reach::Refused(
            "host-gw peer is not on-link on the underlay interface (host-gw needs every node on \
             one L2 segment; use the vxlan backend otherwise)",
        ),
        Err(_) => Reach::Refused("host-gw peer has no route on this node"),
    }
}

impl HostGwNode {
    /// Removes what the vxlan backend would have set up (a host device, a receive-GRO device)
    /// so host traffic takes the per-peer routes, and attaches the recorder to the underlay's
    /// egress. Without the recorder bare pod packets are not delivered straight to pods (their
    /// flows' replies could not be told from the rest): the stack routes them.
    pub async fn start(
        dp: &mut Dataplane,
        underlay: &Underlay,
        public_ip: Option<Ipv4Addr>,
        public_ipv6: Option<Ipv6Addr>,
        datapath_flags: u16,
    ) -> Self {
        for (dev, r) in [
            (hostdev::HOST_DEVICE, hostdev::remove().await),
            (grodev::GRO_DEVICE, grodev::remove().await),
        ] {
            if let Err(e) = dp.forget_links_on(dev) {
                warn!(dev, error = %e, "removing the pins of a vxlan device's links");
            }
            match r {
                Ok(true) => info!(dev, "removed a vxlan device (this node runs host-gw)"),
                Ok(false) => {}
                Err(e) => warn!(dev, error = %e, "removing a vxlan device"),
            }
        }
        let routes = match Routes::open(underlay.ifindex) {
            Ok(r) => Some(r),
            Err(e) => {
                error!(error = %e, "no netlink connection for the routes to peers' subnets");
                None
            }
        };
        let recorder = match dp.attach_recorder(&underlay.name) {
            Ok(()) => true,
            Err(e) => {
                error!(iface = %underlay.name, error = %e,
                    "attaching the recorder; bare pod packets from peers take the stack");
                false
            }
        };
        HostGwNode {
            recorder,
            underlay_mtu: underlay.mtu,
            underlay_ifindex: underlay.ifindex,
            underlay_mac: underlay.mac,
            public_ip,
            public_ipv6,
            datapath_flags,
            routes,
            installed: BTreeSet::new(),
            failed: BTreeSet::new(),
        }
    }

    pub fn underlay_ifindex(&self) -> u32 {
        self.underlay_ifindex
    }

    /// The programs' config for `cfg`: our addresses and the underlay; the VXLAN fields stay
    /// as the config has them (host-gw peers are all sent bare, so nothing is encapsulated).
    pub async fn write(&mut self, dp: &mut Dataplane, cfg: &NetworkConfig, own: Own) {
        let dc = DataplaneConfig {
            public_ip: self.public_ip.unwrap_or(Ipv4Addr::UNSPECIFIED).octets(),
            vni: cfg.backend.vni,
            vtep_mac: [0; 6],
            port: cfg.backend.port,
            underlay_ifindex: self.underlay_ifindex,
            underlay_mac: self.underlay_mac,
            flags: self.datapath_flags | CONFIG_HOST_GW | if self.recorder { CONFIG_BARE_FAST } else { 0 },
            inner_mtu: cfg.mtu(self.underlay_mtu),
        };
        if let Err(e) = dp.set_config(&dc) {
            error!(error = %e, "writing the dataplane config");
        }
        let (Some(_), Some(_), Some(public_ip)) = (cfg.ipv6_network(), own.v6, self.public_ipv6) else {
            if let Err(e) = dp.clear_config6() {
                error!(error = %e, "clearing the IPv6 dataplane config");
            }
            return;
        };
        if let Err(e) = sysctl::enable_ipv6_forwarding() {
            error!(error = %e, "IPv6 pod traffic is not forwarded");
        }
        let c6 = Config6 {
            public_ip,
            vtep_mac: [0; 6],
            inner_mtu: cfg.mtu6(self.underlay_mtu),
            reseg: None,
        };
        if let Err(e) = dp.set_config6(&c6) {
            error!(error = %e, "writing the IPv6 dataplane config");
        }
    }

    /// Adds the routes in `wanted` we do not hold yet and removes the ones we hold that it no
    /// longer has.
    pub async fn sync_routes(&mut self, wanted: &BTreeSet<PeerRoute>) {
        let Some(routes) = &self.routes else { return };
        for r in self.installed.difference(wanted).copied().collect::<Vec<_>>() {
            match routes.delete(r).await {
                Ok(()) => info!(route = %r, "route to a peer's subnet removed"),
                Err(e) => error!(route = %r, error = %e, "removing a route to a peer's subnet"),
            }
            self.installed.remove(&r);
        }
        for r in wanted.difference(&self.installed).copied().collect::<Vec<_>>() {
            add(
                routes,
                r,
                &mut self.installed,
                &mut self.failed,
                "route to a peer's subnet added",
            )
            .await;
        }
    }

    /// Every resync period: puts back the wanted routes the kernel no longer has (removed by
    /// hand, or with their interface), and removes routes into the cluster `networks` through
    /// our interface that no lease wants (a peer that left while the agent was down).
    pub async fn resync(&mut self, wanted: &BTreeSet<PeerRoute>, networks: &[IpNet]) {
        let Some(routes) = &self.routes else { return };
        let present: BTreeSet<PeerRoute> = match routes.list(networks).await {
            Ok(l) => l.into_iter().collect(),
            Err(e) => {
                warn!(error = %e, "cannot list routes; checking them again later");
                return;
            }
        };
        for r in present.difference(wanted) {
            // A route to one of our peers' subnets through another gateway is replaced below.
            if wanted.iter().any(|w| w.dst == r.dst) {
                continue;
            }
            match routes.delete(*r).await {
                Ok(()) => info!(route = %r, "removed a route into the cluster network that no lease wants"),
                Err(e) => error!(route = %r, error = %e, "removing a stale route"),
            }
        }
        self.installed.retain(|r| present.contains(r));
        for r in wanted.difference(&present).copied().collect::<Vec<_>>() {
            add(
                routes,
                r,
                &mut self.installed,
                &mut self.failed,
                "route to a peer's subnet recovered",
            )
            .await;
        }
    }
}

/// What a vxlan node does with what a host-gw run left (the node switched backends): the
/// recorder on the underlay's egress is detached, and routes into the cluster `networks`
/// through a gateway on the underlay (more specific than the host device's, they would send pod
/// traffic bare) are removed.
pub async fn remove_left(dp: &mut Dataplane, underlay: &Underlay, networks: &[IpNet]) {
    if let Err(e) = dp.detach_recorder(&underlay.name) {
        warn!(iface = %underlay.name, error = %e, "detaching the host-gw recorder");
    }
    let routes = match Routes::open(underlay.ifindex) {
        Ok(r) => r,
        Err(e) => return warn!(error = %e, "cannot look for routes a host-gw run left"),
    };
    let left = match routes.list(networks).await {
        Ok(l) => l,
        Err(e) => return warn!(error = %e, "cannot look for routes a host-gw run left"),
    };
    for r in left {
        match routes.delete(r).await {
            Ok(()) => info!(route = %r, "removed a host-gw route (this node runs vxlan)"),
            Err(e) => error!(route = %r, error = %e, "removing a host-gw route"),
        }
    }
}

async fn add(
    routes: &Routes,
    r: PeerRoute,
    installed: &mut BTreeSet<PeerRoute>,
    failed: &mut BTreeSet<PeerRoute>,
    done: &str,
) {
    match routes.replace(r).await {
        Ok(()) => {
            info!(route = %r, "{done}");
            installed.insert(r);
            failed.remove(&r);
        }
        Err(e) => {
            if failed.insert(r) {
                error!(route = %r, error = %e, "adding a route to a peer's subnet");
            }
        }
    }
}
