//! The vxlan backend's node side: what our lease and the network config mean for this node
//! under VXLAN — the programs' config (VNI, port, VTEP MAC, inner MTU), the host device that
//! sends host → pod traffic through encap, the IPv6 resegmenting pair, and the receive-GRO
//! device. A remote lease's side (one peer entry per family) is in [`super::peers`].

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use overlay_common::DataplaneConfig;
use tracing::{error, info, warn};

use super::Own;
use crate::{
    control::config::NetworkConfig,
    dataplane::{Config6, Dataplane, Reseg},
    node::{ethtool, grodev, hostdev, sysctl, underlay::Underlay},
};

/// What the vxlan backend has set up on this node.
pub struct VxlanNode {
    underlay_mtu: u32,
    underlay_ifindex: u32,
    underlay_mac: [u8; 6],
    public_ip: Option<Ipv4Addr>,
    public_ipv6: Option<Ipv6Addr>,
    vtep_mac: [u8; 6],
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

impl VxlanNode {
    /// `receive_gro`: keep the receive-GRO device, else remove one an earlier run left.
    pub async fn start(
        underlay: &Underlay,
        public_ip: Option<Ipv4Addr>,
        public_ipv6: Option<Ipv6Addr>,
        vtep_mac: [u8; 6],
        datapath_flags: u16,
        receive_gro: bool,
    ) -> Self {
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
        VxlanNode {
            underlay_mtu: underlay.mtu,
            underlay_ifindex: underlay.ifindex,
            underlay_mac: underlay.mac,
            public_ip,
            public_ipv6,
            vtep_mac,
            host_device: None,
            host_device6: None,
            reseg6: None,
            datapath_flags,
            receive_gro,
            gro_port: None,
            gro_up: false,
        }
    }

    /// Every resync period: sets the host device up again when an earlier attempt failed or the
    /// device has been deleted since (by hand, or by a cleanup tool), so host → pod traffic does
    /// not wait for the next lease or config event.
    pub async fn resync(&mut self, dp: &mut Dataplane, cfg: &NetworkConfig, own: Own) {
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
        let gro_pending = self.receive_gro && self.gro_port != Some(cfg.backend.port);
        let v4_pending = cfg.network().is_some() && own.v4.is_some() && self.host_device != own.v4;
        let v6_pending = cfg.ipv6_network().is_some()
            && self.public_ipv6.is_some()
            && own.v6.is_some()
            && self.host_device6 != own.v6;
        if v4_pending || v6_pending || gro_pending {
            self.write(dp, cfg, own).await;
        }
    }

    /// Writes the node's settings for `cfg` and our lease `own`: the host device and its route
    /// to the cluster network, the programs' config (VNI, port, VTEP, MTU), receive GRO, and the
    /// IPv6 side.
    pub async fn write(&mut self, dp: &mut Dataplane, cfg: &NetworkConfig, own: Own) {
        let inner_mtu = cfg.mtu(self.underlay_mtu);
        if let (Some(own), Some(network)) = (own.v4, cfg.network()) {
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
            underlay_ifindex: self.underlay_ifindex,
            underlay_mac: self.underlay_mac,
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
        self.write6(dp, cfg, own.v6).await;
    }

    /// The IPv6 side: our PublicIPv6 and VTEP for the programs, IPv6 forwarding, and the host
    /// device's IPv6 address and route (whose MTU, the tunnel's over an IPv6 underlay, makes the
    /// stack answer oversize packets with Packet Too Big).
    async fn write6(&mut self, dp: &mut Dataplane, cfg: &NetworkConfig, own: Option<Ipv6Net>) {
        let (Some(network), Some(own), Some(public_ip)) = (cfg.ipv6_network(), own, self.public_ipv6) else {
            if let Err(e) = dp.clear_config6() {
                error!(error = %e, "clearing the IPv6 dataplane config");
            }
            return;
        };
        let inner_mtu = cfg.mtu6(self.underlay_mtu);
        if self.host_device6 != Some(own) {
            if let Err(e) = sysctl::enable_ipv6_forwarding() {
                error!(error = %e, "IPv6 pod traffic is not forwarded");
            }
            match hostdev::ensure_v6(own, network, cfg.mtu(self.underlay_mtu), inner_mtu).await {
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
