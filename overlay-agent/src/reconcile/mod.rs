//! The glue: lease events become map entries (peers), the host device and the receive-GRO
//! device follow our lease, local pods are learned from the bridge (endpoints), the decap hook
//! and delivery are chosen (decap). [`Reconciler`] holds what the maps should hold.

pub mod bridge;
pub mod decap;
pub mod endpoints;
pub mod peers;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use overlay_common::DataplaneConfig;
use tracing::{error, info, warn};

use crate::{
    control::{config::NetworkConfig, Event},
    dataplane::{Config6, Dataplane, Reseg},
    family::{V4, V6},
    node::{
        ethtool, grodev, hostdev, sysctl,
        underlay::{self, Underlay},
    },
};
use peers::PeerTable;

/// What the maps should hold, kept in step with the lease events.
pub struct Reconciler {
    underlay: Underlay,
    /// The underlay's connected networks: DirectRouting peers are inside them (flanneld: a
    /// peer reached without a gateway).
    segment: Option<Ipv4Net>,
    segment6: Option<Ipv6Net>,
    public_ip: Option<Ipv4Addr>,
    public_ipv6: Option<Ipv6Addr>,
    vtep_mac: [u8; 6],
    config: Option<NetworkConfig>,
    v4: PeerTable<V4>,
    v6: PeerTable<V6>,
    /// The subnets the host device is set up for.
    host_device: Option<Ipv4Net>,
    host_device6: Option<Ipv6Net>,
    /// The host device pair segmenting IPv6 GSO packets before encap, once set up
    /// ([`Config6::reseg`]).
    reseg6: Option<Reseg>,
    /// `DataplaneConfig::flags` from the command line and the underlay.
    datapath_flags: u16,
    /// Keep the receive-GRO device (`--receive-gro` with TC decap).
    receive_gro: bool,
    /// The VXLAN port the receive-GRO device was last set up for (tried once per port: a
    /// failure is not retried every resync), and whether that worked.
    gro_port: Option<u16>,
    gro_up: bool,
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
        let connected = |a: Option<IpAddr>| a.and_then(|a| underlay::connected_network(&underlay.name, a));
        let segment = match connected(underlay.ipv4.map(IpAddr::V4)) {
            Some(IpNet::V4(n)) => Some(n),
            _ => None,
        };
        let segment6 = match connected(underlay.ipv6.map(IpAddr::V6)) {
            Some(IpNet::V6(n)) => Some(n),
            _ => None,
        };
        if !receive_gro {
            match grodev::remove().await {
                Ok(true) => info!(
                    dev = grodev::GRO_DEVICE,
                    "removed the receive-GRO device (not used with this decap)"
                ),
                Ok(false) => {}
                Err(e) => warn!(dev = grodev::GRO_DEVICE, error = %e, "removing the receive-GRO device"),
            }
        }
        Reconciler {
            datapath_flags,
            underlay,
            segment,
            segment6,
            public_ip,
            public_ipv6,
            vtep_mac,
            config: None,
            v4: PeerTable::adopt(dp),
            v6: PeerTable::adopt(dp),
            host_device: None,
            host_device6: None,
            reseg6: None,
            receive_gro,
            gro_port: None,
            gro_up: false,
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

    /// Every resync period: sets the host device up again when an earlier attempt failed or the
    /// device has been deleted since (by hand, or by a cleanup tool), so host → pod traffic does
    /// not wait for the next lease or config event.
    pub async fn ensure_host_device(&mut self, dp: &mut Dataplane) {
        let was_up = self.host_device.is_some() || self.host_device6.is_some();
        if was_up && nix::net::if_::if_nametoindex(hostdev::HOST_DEVICE).is_err() {
            warn!(
                dev = hostdev::HOST_DEVICE,
                "the host device is gone; setting it up again"
            );
            self.host_device = None;
            self.host_device6 = None;
            self.reseg6 = None;
        }
        if self.gro_up && nix::net::if_::if_nametoindex(grodev::GRO_DEVICE).is_err() {
            warn!(
                dev = grodev::GRO_DEVICE,
                "the receive-GRO device is gone; setting it up again"
            );
            self.gro_port = None;
            self.gro_up = false;
        }
        let Some(cfg) = &self.config else { return };
        let gro_pending = self.receive_gro && self.gro_port != Some(cfg.backend.port);
        let v4_pending = cfg.network().is_some() && self.v4.own.is_some() && self.host_device != self.v4.own;
        let v6_pending = cfg.ipv6_network().is_some()
            && self.public_ipv6.is_some()
            && self.v6.own.is_some()
            && self.host_device6 != self.v6.own;
        if v4_pending || v6_pending || gro_pending {
            self.write_config(dp).await;
        }
    }

    async fn write_config(&mut self, dp: &mut Dataplane) {
        let Some(cfg) = &self.config else { return };
        let inner_mtu = cfg.mtu(self.underlay.mtu);
        if let (Some(own), Some(network)) = (self.v4.own, cfg.network()) {
            if self.host_device != Some(own) {
                match hostdev::ensure(own, network, inner_mtu).await {
                    Ok(()) => match dp.attach_host_encap(hostdev::HOST_DEVICE) {
                        Ok(()) => {
                            info!(dev = hostdev::HOST_DEVICE, address = %own.network(), %network, "host route to remote pods ready");
                            self.host_device = Some(own);
                        }
                        Err(e) => error!(error = %e, "attaching encap to the host device"),
                    },
                    Err(e) => error!(error = %e, "setting up the host device for host → pod traffic"),
                }
            }
        }
        let dc = DataplaneConfig {
            public_ip: self.public_ip.unwrap_or(Ipv4Addr::UNSPECIFIED).octets(),
            vni: cfg.backend.vni,
            vtep_mac: self.vtep_mac,
            port: cfg.backend.port,
            underlay_ifindex: self.underlay.ifindex,
            underlay_mac: self.underlay.mac,
            flags: self.datapath_flags,
            inner_mtu,
        };
        if let Err(e) = dp.set_config(&dc) {
            error!(error = %e, "writing the dataplane config");
        }
        if self.receive_gro && self.gro_port != Some(cfg.backend.port) {
            self.gro_port = Some(cfg.backend.port);
            self.gro_up = receive_gro(dp, cfg.backend.port).await;
        }
        self.write_config6(dp).await;
    }

    /// The IPv6 side: our PublicIPv6 and VTEP for the programs, IPv6 forwarding, and the host
    /// device's IPv6 address and route (whose MTU, the tunnel's over an IPv6 underlay, makes the
    /// stack answer oversize packets with Packet Too Big).
    async fn write_config6(&mut self, dp: &mut Dataplane) {
        let Some(cfg) = &self.config else { return };
        let (Some(network), Some(own), Some(public_ip)) = (cfg.ipv6_network(), self.v6.own, self.public_ipv6)
        else {
            if let Err(e) = dp.clear_config6() {
                error!(error = %e, "clearing the IPv6 dataplane config");
            }
            return;
        };
        let inner_mtu = cfg
            .underlay_mtu(self.underlay.mtu)
            .saturating_sub(overlay_common::wire::VXLAN6_OVERHEAD as u32);
        if self.host_device6 != Some(own) {
            if let Err(e) = sysctl::enable_ipv6_forwarding() {
                error!(error = %e, "IPv6 pod traffic is not forwarded");
            }
            match hostdev::ensure_v6(own, network, cfg.mtu(self.underlay.mtu), inner_mtu).await {
                Ok(()) => match dp.attach_host_encap(hostdev::HOST_DEVICE) {
                    Ok(()) => {
                        info!(dev = hostdev::HOST_DEVICE, address = %own.network(), %network, route_mtu = inner_mtu, "IPv6 host route to remote pods ready");
                        self.host_device6 = Some(own);
                        self.reseg6 = setup_reseg(dp);
                    }
                    Err(e) => error!(error = %e, "attaching encap to the host device"),
                },
                Err(e) => error!(error = %e, "setting up the host device for IPv6 host → pod traffic"),
            }
        }
        let c6 = Config6 {
            public_ip,
            vtep_mac: self.vtep_mac,
            inner_mtu,
            reseg: self.reseg6,
        };
        if let Err(e) = dp.set_config6(&c6) {
            error!(error = %e, "writing the IPv6 dataplane config");
        }
    }
}

/// Sets the host device pair up to segment IPv6 GSO packets with a short last segment before
/// encap: TSO (and UDP segmentation, where the kernel lets it be turned off) off on `overlay0p`
/// (its transmit segments them), encap on `overlay0`'s ingress (where the segments arrive).
/// `None`, with the reason logged, when that fails: such packets are then encapsulated whole.
fn setup_reseg(dp: &mut Dataplane) -> Option<Reseg> {
    let r = (|| -> anyhow::Result<Reseg> {
        ethtool::disable_tso(hostdev::HOST_DEVICE_PEER)?;
        // Kernels with AccECN (6.18) have one more TCP segmentation feature, which
        // ETHTOOL_STSO leaves on; older ones do not know it.
        if let Err(e) = ethtool::disable_feature(hostdev::HOST_DEVICE_PEER, "tx-tcp-accecn-segmentation") {
            tracing::debug!(error = %e, "tx-tcp-accecn-segmentation stays as it is");
        }
        let udp = match ethtool::disable_feature(hostdev::HOST_DEVICE_PEER, "tx-udp-segmentation") {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "a pod's IPv6 UDP GSO packets whose last segment is short are encapsulated whole");
                false
            }
        };
        dp.attach_host_reseg(hostdev::HOST_DEVICE)?;
        let index =
            |name: &str| nix::net::if_::if_nametoindex(name).map_err(|e| anyhow::anyhow!("{name}: {e}"));
        Ok(Reseg {
            ifindex: index(hostdev::HOST_DEVICE_PEER)?,
            return_ifindex: index(hostdev::HOST_DEVICE)?,
            udp,
        })
    })();
    match r {
        Ok(r) => Some(r),
        Err(e) => {
            warn!(error = %e, "IPv6 GSO packets whose last segment is short are encapsulated whole; a kernel VXLAN peer drops that segment where it is segmented after encap");
            None
        }
    }
}

/// Sets up the receive-GRO device for `port` with its sink; true on success. A failure
/// (another VXLAN device owns the port, e.g. a `flannel.1` left on the node, whose socket gives
/// GRO anyway; a kernel without VXLAN) costs throughput only, so it is a warning.
async fn receive_gro(dp: &mut Dataplane, port: u16) -> bool {
    let r = match grodev::ensure(port).await {
        Ok(()) => dp
            .attach_gro_sink(grodev::GRO_DEVICE)
            .map_err(anyhow::Error::from),
        Err(e) => Err(e.into()),
    };
    match r {
        Ok(()) => {
            info!(
                dev = grodev::GRO_DEVICE,
                port, "receive GRO on: the NIC merges our VXLAN frames before decap"
            );
            true
        }
        Err(e) => {
            warn!(dev = grodev::GRO_DEVICE, port, error = %format!("{e:#}"), "receive GRO unavailable: TC decap strips every frame on its own");
            false
        }
    }
}
