//! The daemon: glue between the control plane's lease events and the dataplane's maps.
//! One remote lease becomes one map upsert; one removed lease becomes one delete.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{Context as _, Result};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use overlay_common::DataplaneConfig;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use overlay_common::maps;

use crate::{
    cli::{AgentArgs, DecapChoice, DeliverChoice},
    control::{self, config::NetworkConfig, Event, NodeIdentity},
    dataplane::{object, Config6, Dataplane, DecapMode, Reseg},
    family::{V4, V6},
    node::{
        grodev, hostdev,
        underlay::{self as iface, Underlay},
    },
    ops,
    reconcile::{endpoints, peers::PeerTable},
};

/// How often the agent looks for the pod bridge (Docker creates docker0 after us).
const BRIDGE_POLL: Duration = Duration::from_millis(500);

/// How often held-down peers are checked for removal.
const REAP_TICK: Duration = Duration::from_millis(100);

/// Runs the agent until SIGTERM/SIGINT or a fatal error.
pub async fn run(args: AgentArgs) -> Result<()> {
    args.validate()?;
    object::object()?;
    let underlay = iface::resolve(&args.iface).context("finding the underlay interface (--iface)")?;
    // None on a host without IPv4: fine for an IPv6-only network; a config that enables IPv4
    // is then refused, naming --public-ip (NodeIdentity::lease_attrs).
    let public_ip = args.public_ip.or(underlay.ipv4);
    // flanneld: --public-ipv6, else the interface's preferred IPv6 address; used only when the
    // network config enables IPv6.
    let public_ipv6 = args.public_ipv6.or(underlay.ipv6);
    let node = NodeIdentity::new(public_ip, public_ipv6, underlay.mtu);
    let vtep_mac = node.vtep_mac;
    info!(
        iface = %underlay.name,
        public_ip = %public_ip.map_or("none".to_string(), |a| a.to_string()),
        public_ipv6 = %public_ipv6.map_or("none".to_string(), |a| a.to_string()),
        vtep_mac = %crate::control::lease::MacAddr(vtep_mac),
        "starting overlay-agent"
    );
    enable_ip_forward()?;

    let mut dp = Dataplane::load(&args.pin_root)?;
    log_kernel_features(&dp);
    let mut choice = choose_decap(args.decap, &underlay.name);
    info!(iface = %underlay.name, mode = ?choice.mode, why = %choice.why, "decap mode");
    if let Err(e) = dp.attach_decap(&underlay.name, choice.mode, choice.native_only) {
        if !choice.native_only {
            return Err(e)
                .with_context(|| format!("attaching decap ({:?}) to {}", choice.mode, underlay.name));
        }
        warn!(iface = %underlay.name, error = %e, "the driver runs no XDP; using TC decap");
        choice.mode = DecapMode::Tc;
        dp.attach_decap(&underlay.name, DecapMode::Tc, false)
            .with_context(|| format!("attaching decap (Tc) to {}", underlay.name))?;
    }
    info!(iface = %underlay.name, mode = ?choice.mode, pin_root = %args.pin_root.display(), "decap attached");
    if choice.mode == DecapMode::Xdp {
        match iface::ensure_gro(&underlay.name) {
            Ok(true) => {
                info!(iface = %underlay.name, "turned GRO on: XDP-decapsulated frames are merged before routing")
            }
            Ok(false) => {}
            Err(e) => warn!(iface = %underlay.name, error = %e, "could not turn GRO on"),
        }
    }
    let datapath_flags = datapath_flags(args.deliver, choice.hardware);
    let mut ops = ops::Ops::start(&args, choice.mode).await?;

    let (tx, mut rx) = mpsc::channel(4096);
    let control_opts = args.control_options();
    let mut control = tokio::spawn(async move { control::run(&control_opts, node, tx).await });

    // Peers an earlier agent left in the pinned maps are adopted: the first resync keeps or
    // removes them.
    let mut state = Sync::new(&dp, underlay, public_ip, public_ipv6, vtep_mac, datapath_flags);
    // XDP strips before GRO, so GRO merges the inner frames without help; TC decap runs after
    // GRO and needs the device for it (see `grodev`).
    state.receive_gro = args.receive_gro && choice.mode == DecapMode::Tc;
    if !state.receive_gro {
        match grodev::remove().await {
            Ok(true) => info!(
                dev = grodev::GRO_DEVICE,
                "removed the receive-GRO device (not used with this decap)"
            ),
            Ok(false) => {}
            Err(e) => warn!(dev = grodev::GRO_DEVICE, error = %e, "removing the receive-GRO device"),
        }
    }
    let mut bridge = BridgeWatch::new(&args.bridge);
    let (mut local, mut local_watch) = endpoints::start(&dp, &args.bridge);
    let mut poll = tokio::time::interval(BRIDGE_POLL);
    let mut reap = tokio::time::interval(REAP_TICK);
    // FORWARD rules and the host device are checked every --iptables-resync seconds.
    let mut resync = tokio::time::interval(Duration::from_secs(args.iptables_resync.into()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => {
                    let seen = ops.received(&ev);
                    state.apply(&mut dp, ev).await;
                    local.own_subnets(&mut dp, endpoints::OwnSubnets::of(state.v4.own, state.v6.own));
                    ops.applied(seen, state.peers());
                }
                // The control plane ended (dropping its sender): its result says why. Without
                // this a fatal error (a bad network config) could end the agent with status 0.
                None => return control_result((&mut control).await),
            },
            _ = poll.tick() => bridge.check(&mut dp),
            d = local_watch.next() => local.discovered(&mut dp, d),
            _ = reap.tick() => state.reap(&mut dp),
            _ = resync.tick() => {
                ops.ensure_forward();
                state.ensure_host_device(&mut dp).await;
            }
            r = &mut control => return control_result(r),
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: exiting, pinned maps stay"); ops.stopping(); break; }
            _ = term.recv() => { info!("SIGTERM: exiting, pinned maps stay"); ops.stopping(); break; }
        }
    }
    Ok(())
}

fn control_result(r: Result<Result<(), control::ControlError>, tokio::task::JoinError>) -> Result<()> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e).context("control plane stopped"),
        Err(e) => Err(e).context("control plane task"),
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

/// The decap hook for the underlay and why.
#[derive(Debug)]
struct DecapChoiceMade {
    mode: DecapMode,
    /// XDP must run in the driver (auto on a hardware NIC: generic XDP would be slower than TC).
    native_only: bool,
    /// The underlay is a hardware (or paravirtual) NIC, not a veth or other virtual device.
    hardware: bool,
    why: String,
}

/// `--decap` (`OVERLAY_DECAP`, the variable of earlier releases, still counts when the flag is
/// left at auto). Auto: XDP on a NIC with a bus address (a hardware or virtio NIC: its driver
/// runs XDP before GRO and builds no skb for dropped frames); TC on veth and other virtual
/// devices, where XDP would turn GSO off on the peer and copy every frame, while TC keeps GSO
/// super-packets whole.
fn choose_decap(flag: DecapChoice, iface: &str) -> DecapChoiceMade {
    let info = iface::driver_info(iface).ok();
    let hardware = info.as_ref().is_some_and(|i| !i.bus_info.is_empty());
    let driver = info.as_ref().map_or("unknown", |i| i.driver.as_str()).to_string();
    let flag = match (flag, std::env::var("OVERLAY_DECAP").as_deref()) {
        (DecapChoice::Auto, Ok("tc")) => DecapChoice::Tc,
        (DecapChoice::Auto, Ok("xdp")) => DecapChoice::Xdp,
        (f, _) => f,
    };
    let (mode, native_only, why) = match flag {
        DecapChoice::Xdp => (DecapMode::Xdp, false, "--decap xdp".to_string()),
        DecapChoice::Tc => (DecapMode::Tc, false, "--decap tc".to_string()),
        DecapChoice::Auto if hardware => (
            DecapMode::Xdp,
            true,
            format!("auto: {iface} is a NIC (driver {driver}): XDP in the driver, before GRO"),
        ),
        DecapChoice::Auto => (
            DecapMode::Tc,
            false,
            format!("auto: {iface} is a virtual device (driver {driver}): TC keeps GSO packets whole"),
        ),
    };
    DecapChoiceMade {
        mode,
        native_only,
        hardware,
        why,
    }
}

/// One line per kernel feature the datapath can use: what it does where one is missing.
fn log_kernel_features(dp: &Dataplane) {
    let kernel = crate::dataplane::kernel_release();
    for (name, present, without) in dp.features().describe() {
        if present {
            info!(%kernel, feature = name, "kernel feature in use");
        } else {
            info!(%kernel, feature = name, fallback = without, "kernel feature missing");
        }
    }
}

/// The `DataplaneConfig::flags` bits that come from flags and the underlay.
fn datapath_flags(deliver: DeliverChoice, hardware: bool) -> u16 {
    let mut flags = 0;
    match deliver {
        DeliverChoice::Peer => {}
        DeliverChoice::Veth => flags |= maps::CONFIG_DELIVER_VIA_VETH,
        DeliverChoice::Stack => flags |= maps::CONFIG_NO_DELIVER,
    }
    if hardware {
        // The NIC verified the checksums; stripping the outer headers must not forget that.
        flags |= maps::CONFIG_KEEP_CSUM;
    }
    flags
}

/// The datapath needs forwarding on (decapsulated packets are routed to the bridge).
fn enable_ip_forward() -> Result<()> {
    enable_sysctl("net.ipv4.ip_forward", "/proc/sys/net/ipv4/ip_forward")
}

/// IPv6 pod traffic is routed between the underlay and the bridge like IPv4's.
fn enable_ipv6_forwarding() -> Result<()> {
    enable_sysctl(
        "net.ipv6.conf.all.forwarding",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    )
}

/// Sets a boolean sysctl to 1 unless it is already.
fn enable_sysctl(name: &str, path: &str) -> Result<()> {
    let now = std::fs::read_to_string(path).unwrap_or_default();
    if now.trim() != "1" {
        std::fs::write(path, "1").with_context(|| format!("enabling {name}"))?;
        info!("enabled {name}");
    }
    Ok(())
}

/// The network `addr` (either family) is configured with on `iface` (address + netmask).
fn connected_network(iface: &str, addr: IpAddr) -> Option<IpNet> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    for a in addrs.filter(|a| a.interface_name == iface) {
        let (Some(ip), Some(mask)) = (a.address.as_ref(), a.netmask.as_ref()) else {
            continue;
        };
        let (ip, prefix) = match (
            ip.as_sockaddr_in(),
            mask.as_sockaddr_in(),
            ip.as_sockaddr_in6(),
            mask.as_sockaddr_in6(),
        ) {
            (Some(ip), Some(m), _, _) => (IpAddr::V4(ip.ip()), u32::from(m.ip()).leading_ones()),
            (_, _, Some(ip), Some(m)) => (IpAddr::V6(ip.ip()), u128::from(m.ip()).leading_ones()),
            _ => continue,
        };
        if ip == addr {
            return IpNet::new(ip, prefix as u8).ok().map(|n| n.trunc());
        }
    }
    None
}

/// What the maps should hold, kept in step with the lease events.
struct Sync {
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

impl Sync {
    fn new(
        dp: &Dataplane,
        underlay: Underlay,
        public_ip: Option<Ipv4Addr>,
        public_ipv6: Option<Ipv6Addr>,
        vtep_mac: [u8; 6],
        datapath_flags: u16,
    ) -> Self {
        let connected = |a: Option<IpAddr>| a.and_then(|a| connected_network(&underlay.name, a));
        let segment = match connected(underlay.ipv4.map(IpAddr::V4)) {
            Some(IpNet::V4(n)) => Some(n),
            _ => None,
        };
        let segment6 = match connected(underlay.ipv6.map(IpAddr::V6)) {
            Some(IpNet::V6(n)) => Some(n),
            _ => None,
        };
        Sync {
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
            receive_gro: false,
            gro_port: None,
            gro_up: false,
        }
    }

    fn peers(&self) -> usize {
        self.v4.len() + self.v6.len()
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

    async fn apply(&mut self, dp: &mut Dataplane, ev: Event) {
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

    fn reap(&mut self, dp: &mut Dataplane) {
        self.v4.reap(dp);
        self.v6.reap(dp);
    }

    /// Every resync period: sets the host device up again when an earlier attempt failed or the
    /// device has been deleted since (by hand, or by a cleanup tool), so host → pod traffic does
    /// not wait for the next lease or config event.
    async fn ensure_host_device(&mut self, dp: &mut Dataplane) {
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
            if let Err(e) = enable_ipv6_forwarding() {
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
        iface::disable_tso(hostdev::HOST_DEVICE_PEER)?;
        // Kernels with AccECN (6.18) have one more TCP segmentation feature, which
        // ETHTOOL_STSO leaves on; older ones do not know it.
        if let Err(e) = iface::disable_feature(hostdev::HOST_DEVICE_PEER, "tx-tcp-accecn-segmentation") {
            tracing::debug!(error = %e, "tx-tcp-accecn-segmentation stays as it is");
        }
        let udp = match iface::disable_feature(hostdev::HOST_DEVICE_PEER, "tx-udp-segmentation") {
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

/// Attaches encap to the pod bridge when it appears, and again when it is recreated.
struct BridgeWatch {
    name: String,
    attached_ifindex: Option<u32>,
    warned: bool,
}

impl BridgeWatch {
    fn new(name: &str) -> Self {
        BridgeWatch {
            name: name.to_string(),
            attached_ifindex: None,
            warned: false,
        }
    }

    fn check(&mut self, dp: &mut Dataplane) {
        let ifindex = nix::net::if_::if_nametoindex(self.name.as_str()).ok();
        if ifindex == self.attached_ifindex {
            return;
        }
        match ifindex {
            None => {
                if !self.warned {
                    warn!(bridge = %self.name, "pod bridge not there yet; will attach when it appears");
                    self.warned = true;
                }
                self.attached_ifindex = None;
            }
            Some(idx) => match dp.attach_encap(&self.name) {
                Ok(()) => {
                    info!(bridge = %self.name, ifindex = idx, "encap attached");
                    self.attached_ifindex = Some(idx);
                    self.warned = false;
                }
                Err(e) => error!(bridge = %self.name, error = %e, "attaching encap"),
            },
        }
    }
}
