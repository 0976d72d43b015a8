//! `overlay-agent status`: what the pinned maps and links say, whether the agent runs or not.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use overlay_common::{
    maps::{self, CONFIG_HOST_GW, CONFIG_READY},
    programs, Counter,
};
use rtnetlink::packet_route::link::{LinkAttribute, LinkXdp};
use serde::Serialize;

use super::traffic::{self, TrafficView};
use crate::{
    control::lease::MacAddr,
    dataplane::{self, pinned, DecapMode, MapFamily, PeerEntry},
    family::{V4, V6},
};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Dataplane(#[from] dataplane::DataplaneError),
    #[error("status --watch: writing to the terminal: {0}")]
    Terminal(std::io::Error),
}

/// This node's settings as the datapath sees them (`OVL_CONFIG`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeView {
    /// False until the agent has written the config.
    pub ready: bool,
    /// The backend the node runs: `vxlan` or `host-gw`.
    pub backend: &'static str,
    pub public_ip: Ipv4Addr,
    pub vni: u32,
    pub port: u16,
    pub vtep_mac: String,
    pub underlay_ifindex: u32,
    pub inner_mtu: u32,
    /// Our PublicIPv6 once the IPv6 side is configured.
    pub public_ipv6: Option<Ipv6Addr>,
}

/// One remote subnet (`OVL_PEERS`, or `OVL_PEERS6` for an IPv6 one).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerView {
    pub subnet: IpNet,
    pub public_ip: IpAddr,
    pub vtep_mac: String,
    /// `encap` (VXLAN) or `direct` (DirectRouting, same L2 segment).
    pub mode: &'static str,
    /// The traffic with its PublicIP (`OVL_PEER_STATS`; two subnets of one address show the
    /// same counts); `None` when the pinned datapath has no per-peer counts, or none for it.
    pub traffic: Option<TrafficView>,
}

impl PeerView {
    fn of<F: MapFamily>(p: &PeerEntry<F>, traffic: &traffic::Sample) -> Self {
        let public_ip: IpAddr = p.public_ip.into();
        PeerView {
            subnet: p.subnet.into(),
            public_ip,
            vtep_mac: MacAddr(p.vtep_mac).to_string(),
            mode: if p.direct { "direct" } else { "encap" },
            traffic: traffic
                .peers
                .as_ref()
                .and_then(|m| m.get(&public_ip))
                .map(|s| TrafficView::of(s, traffic.now_ns)),
        }
    }
}

/// One pod address on this node (`OVL_ENDPOINTS`, or `OVL_ENDPOINTS6` for an IPv6 one): decap
/// delivers its packets to `ifindex` directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointView {
    pub ip: IpAddr,
    /// The pod's host-side veth.
    pub ifindex: u32,
    /// Its name, when it exists in the namespace `status` runs in.
    pub iface: Option<String>,
    /// The pod's MAC.
    pub mac: String,
    /// The bridge's MAC (the source of delivered frames).
    pub gw_mac: String,
}

/// One program attached to an interface: a link pinned under `<pin_root>/links` (ours), or
/// another XDP or TCX program on an interface we attach to (not ours).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttachmentView {
    /// Ours: the name in the pin; others: the kernel's name for it (at most 15 characters).
    pub program: String,
    /// Its name in the namespace `status` runs in, else as the pin spells it (dots become `_`).
    pub iface: String,
    pub ifindex: u32,
    /// The interface exists with this ifindex in the namespace `status` runs in (a link on a
    /// deleted device is defunct: it holds the program but sees no packets).
    pub iface_present: bool,
    /// `xdp`, `tcx`, another kernel link type, or `unknown` (the pin could not be read).
    pub hook: String,
    /// XDP: `driver`, `generic` or `offload`, as netlink reports the program.
    pub xdp_mode: Option<&'static str>,
    /// TCX: `ingress` or `egress`.
    pub direction: Option<&'static str>,
    /// The kernel's link id (ours only).
    pub link_id: Option<u32>,
    pub prog_id: Option<u32>,
    /// Where the link is pinned (ours only).
    pub pin: Option<PathBuf>,
    /// Pinned under our pin root.
    pub ours: bool,
}

impl AttachmentView {
    /// The same program on the same hook of the same interface.
    fn same_hook(&self, other: &AttachmentView) -> bool {
        self.ifindex == other.ifindex
            && self.hook == other.hook
            && self.xdp_mode.or(self.direction) == other.xdp_mode.or(other.direction)
            && self.prog_id == other.prog_id
    }
}

/// A link pin's name taken apart: `<program>@<iface>@<ifindex>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkPin<'a> {
    pub program: &'a str,
    /// As the pin spells it: bpffs refuses dots, so `eth0.100` is `eth0_100`.
    pub iface: &'a str,
    pub ifindex: u32,
}

impl<'a> LinkPin<'a> {
    /// `None` for a name that is not `<program>@<iface>@<ifindex>`.
    pub fn parse(name: &'a str) -> Option<Self> {
        let (program, rest) = name.split_once('@')?;
        let (iface, ifindex) = rest.rsplit_once('@')?;
        if program.is_empty() || iface.is_empty() {
            return None;
        }
        Some(LinkPin {
            program,
            iface,
            ifindex: ifindex.parse().ok().filter(|i| *i != 0)?,
        })
    }
}

/// The decap mode the pinned links say is in use: an XDP decap link on the underlay (any
/// interface while `underlay_ifindex` is unknown, 0) is XDP mode (the TC program beside it only
/// delivers), a TC decap link alone is TC mode; `None` without either.
pub fn decap_in_use(attachments: &[AttachmentView], underlay_ifindex: u32) -> Option<DecapMode> {
    let pinned = |prog: &str| {
        attachments
            .iter()
            .any(|a| a.ours && a.program == prog && (underlay_ifindex == 0 || a.ifindex == underlay_ifindex))
    };
    if pinned(programs::DECAP_XDP) {
        Some(DecapMode::Xdp)
    } else if pinned(programs::DECAP_TC) {
        Some(DecapMode::Tc)
    } else {
        None
    }
}

/// One kernel feature the datapath uses where the kernel has it (see
/// [`dataplane::KernelFeatures`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FeatureView {
    pub name: &'static str,
    pub present: bool,
    /// What the datapath does without it.
    pub fallback: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub pin_root: PathBuf,
    /// The running kernel's release (`uname -r`).
    pub kernel: String,
    /// What the datapath found in this kernel: TCX from its version, the adjust_room flag from
    /// the config the agent wrote (unknown, so shown missing, until it has).
    pub features: Vec<FeatureView>,
    pub node: NodeView,
    /// `xdp`, `tc`, or `none` when no decap link is pinned (see [`decap_in_use`]).
    pub decap: &'static str,
    /// Our pinned links, then the programs of others on the interfaces we attach to.
    pub attachments: Vec<AttachmentView>,
    pub peers: Vec<PeerView>,
    /// Local pods (empty when the pinned datapath has no endpoint map).
    pub endpoints: Vec<EndpointView>,
    /// Counter name → value summed over CPUs.
    pub counters: BTreeMap<&'static str, u64>,
}

/// Reads `OVL_CONFIG`, `OVL_PEERS`, `OVL_ENDPOINTS` and `OVL_COUNTERS` (and their IPv6
/// counterparts, when pinned) under `pin_root`.
pub fn read(pin_root: &Path) -> Result<Status, StatusError> {
    let c = pinned::read_config(pin_root)?;
    let node = NodeView {
        ready: c.flags & CONFIG_READY != 0,
        backend: if c.flags & CONFIG_HOST_GW != 0 {
            "host-gw"
        } else {
            "vxlan"
        },
        public_ip: c.public_ip.into(),
        vni: c.vni,
        port: c.port,
        vtep_mac: MacAddr(c.vtep_mac).to_string(),
        underlay_ifindex: c.underlay_ifindex,
        inner_mtu: c.inner_mtu,
        public_ipv6: None,
    };

    let sample = traffic::read(pin_root)?;
    let mut peers: Vec<PeerView> = pinned::read_peers::<V4>(pin_root)?
        .iter()
        .map(|p| PeerView::of(p, &sample))
        .collect();
    // A datapath pinned by a release before IPv6 has no IPv6 tables.
    let mut public_ipv6 = None;
    if pinned::is_pinned(pin_root, maps::PEERS6) && pinned::is_pinned(pin_root, maps::CONFIG6) {
        peers.extend(
            pinned::read_peers::<V6>(pin_root)?
                .iter()
                .map(|p| PeerView::of(p, &sample)),
        );
        let c6 = pinned::read_config6(pin_root)?;
        if c6.flags & maps::CONFIG6_READY != 0 {
            public_ipv6 = Some(Ipv6Addr::from(c6.public_ip));
        }
    }

    // A datapath pinned by an older release has no endpoint map (or no IPv6 one).
    let view = |ip: IpAddr, ifindex: u32, mac: [u8; 6], gw_mac: [u8; 6]| EndpointView {
        ip,
        ifindex,
        // (An ifindex no device has comes back as an empty name.)
        iface: nix::net::if_::if_indextoname(ifindex)
            .ok()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty()),
        mac: MacAddr(mac).to_string(),
        gw_mac: MacAddr(gw_mac).to_string(),
    };
    let mut endpoints: Vec<EndpointView> = Vec::new();
    if pinned::is_pinned(pin_root, maps::ENDPOINTS) {
        endpoints.extend(
            pinned::read_pinned_endpoints::<V4>(pin_root)?
                .into_iter()
                .map(|e| view(e.ip.into(), e.ifindex, e.mac, e.gw_mac)),
        );
    }
    if pinned::is_pinned(pin_root, maps::ENDPOINTS6) {
        endpoints.extend(
            pinned::read_pinned_endpoints::<V6>(pin_root)?
                .into_iter()
                .map(|e| view(e.ip.into(), e.ifindex, e.mac, e.gw_mac)),
        );
    }

    let counters = pinned::read_pinned_counters(pin_root)?;
    let counters = Counter::ALL
        .iter()
        .map(|c| (c.name(), counters.get(*c)))
        .collect();
    let node = NodeView { public_ipv6, ..node };
    let underlay = if node.ready { node.underlay_ifindex } else { 0 };
    let tcx = dataplane::kernel_has_tcx();
    let mut attachments = read_attachments(pin_root, underlay);
    if !tcx {
        attachments.extend(read_clsact_filters());
    }
    let decap = decap_in_use(&attachments, underlay).map_or("none", DecapMode::label);
    let features = dataplane::KernelFeatures {
        tcx,
        decap_l4_udp: c.flags & maps::CONFIG_DECAP_L4_UDP != 0,
        xdp_meta: c.flags & maps::CONFIG_XDP_META != 0,
    }
    .describe()
    .into_iter()
    .map(|(name, present, fallback)| FeatureView {
        name,
        present,
        fallback,
    })
    .collect();
    Ok(Status {
        pin_root: pin_root.to_path_buf(),
        kernel: dataplane::kernel_release(),
        features,
        node,
        decap,
        attachments,
        peers,
        endpoints,
        counters,
    })
}

/// Our pinned links (the underlay first, then by ifindex; XDP before TC on an interface) and
/// the XDP and TCX programs of others on the interfaces they are on and on the underlay. Best
/// effort: a link that cannot be read is `unknown`, a hook that cannot be queried is left out,
/// nothing fails `status`. (Legacy netlink TC filters of others are not looked for.)
fn read_attachments(pin_root: &Path, underlay_ifindex: u32) -> Vec<AttachmentView> {
    let mut pins: Vec<(String, PathBuf)> = std::fs::read_dir(pin_root.join(dataplane::LINKS_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    pins.sort();
    let xdp = xdp_programs();
    let mut tcx = TcxPrograms::default();
    let mut out = Vec::new();
    for (name, path) in pins {
        let pin = LinkPin::parse(&name).unwrap_or(LinkPin {
            program: &name,
            iface: "?",
            ifindex: 0,
        });
        let present = present_name(pin.ifindex, pin.iface);
        let info = pinned::link_info(&path);
        let (hook, prog_id) = (info.hook, info.program_id);
        let xdp_mode = match (hook.as_str(), prog_id) {
            ("xdp", Some(id)) => xdp_mode_of(&xdp, pin.ifindex, id),
            _ => None,
        };
        let direction = match (hook.as_str(), prog_id, &present) {
            ("tcx", Some(id), Some(iface)) => tcx.direction(iface, id, pin.program == dataplane::RESEG_LINK),
            _ => None,
        };
        // Encap's second link on the host device is pinned under a name of its own.
        let program = if pin.program == dataplane::RESEG_LINK {
            overlay_common::programs::ENCAP
        } else {
            pin.program
        };
        out.push(AttachmentView {
            program: program.to_string(),
            iface: present.clone().unwrap_or_else(|| pin.iface.to_string()),
            ifindex: pin.ifindex,
            iface_present: present.is_some(),
            hook,
            xdp_mode,
            direction,
            link_id: info.link_id,
            prog_id,
            pin: Some(path),
            ours: true,
        });
    }
    out.sort_by_cached_key(|a| {
        (
            a.ifindex != underlay_ifindex,
            a.ifindex,
            a.hook != "xdp",
            a.program.clone(),
        )
    });

    // Programs of others on the same interfaces: whatever runs there besides our links (our
    // program attached to the same interface by someone else is theirs too: another hook).
    let ifindexes: BTreeSet<u32> = out
        .iter()
        .filter(|a| a.iface_present)
        .map(|a| a.ifindex)
        .chain((underlay_ifindex != 0).then_some(underlay_ifindex))
        .collect();
    let mut others = Vec::new();
    for ifindex in ifindexes {
        let Ok(iface) = nix::net::if_::if_indextoname(ifindex) else {
            continue;
        };
        let iface = iface.to_string_lossy().into_owned();
        let other = |program: String, hook: &str, prog_id: u32| AttachmentView {
            program,
            iface: iface.clone(),
            ifindex,
            iface_present: true,
            hook: hook.to_string(),
            xdp_mode: None,
            direction: None,
            link_id: None,
            prog_id: Some(prog_id),
            pin: None,
            ours: false,
        };
        for &(id, mode) in xdp.get(&ifindex).into_iter().flatten() {
            others.push(AttachmentView {
                xdp_mode: Some(mode),
                ..other(pinned::program_name(id), "xdp", id)
            });
        }
        for direction in TcxPrograms::DIRECTIONS {
            for (id, name) in tcx.programs(&iface, direction) {
                others.push(AttachmentView {
                    direction: Some(direction),
                    ..other(name.clone(), "tcx", *id)
                });
            }
        }
    }
    others.retain(|o| !out.iter().any(|a| a.same_hook(o)));
    out.extend(others);
    out
}

/// Our TC programs attached as `clsact` filters (kernels without TCX, where they are not
/// pinned), found on every interface with `tc -j filter show`. Best effort, like the rest.
fn read_clsact_filters() -> Vec<AttachmentView> {
    let mut out = Vec::new();
    let Ok(ifaces) = nix::net::if_::if_nameindex() else {
        return out;
    };
    for i in ifaces.iter() {
        let iface = i.name().to_string_lossy().into_owned();
        for direction in ["ingress", "egress"] {
            let Ok(o) = std::process::Command::new("tc")
                .args(["-j", "filter", "show", "dev", &iface, direction])
                .output()
            else {
                return out;
            };
            for (program, prog_id) in parse_clsact_filters(&o.stdout) {
                out.push(AttachmentView {
                    program,
                    iface: iface.clone(),
                    ifindex: i.index(),
                    iface_present: true,
                    hook: "clsact".to_string(),
                    xdp_mode: None,
                    direction: Some(direction),
                    link_id: None,
                    prog_id,
                    pin: None,
                    ours: true,
                });
            }
        }
    }
    out
}

/// Our filters (`overlay_*` BPF programs at [`dataplane::TC_PRIORITY`]) in `tc -j filter show`
/// output: (program, program id).
pub fn parse_clsact_filters(json: &[u8]) -> Vec<(String, Option<u32>)> {
    let Ok(serde_json::Value::Array(filters)) = serde_json::from_slice(json) else {
        return Vec::new();
    };
    filters
        .iter()
        .filter(|f| f.get("pref").and_then(|p| p.as_u64()) == Some(u64::from(dataplane::TC_PRIORITY)))
        .filter_map(|f| {
            let opts = f.get("options")?;
            let name = opts.get("bpf_name")?.as_str()?;
            if !name.starts_with("overlay_") {
                return None;
            }
            let id = opts
                .get("prog")
                .and_then(|p| p.get("id"))
                .and_then(|i| i.as_u64())
                .and_then(|i| u32::try_from(i).ok());
            Some((name.to_string(), id))
        })
        .collect()
}

/// The name of `ifindex` in this namespace, if it is the interface the pin names.
fn present_name(ifindex: u32, pin_iface: &str) -> Option<String> {
    let name = nix::net::if_::if_indextoname(ifindex).ok()?;
    let name = name.to_string_lossy().into_owned();
    (name.replace('.', "_") == pin_iface).then_some(name)
}

/// The mode XDP program `prog_id` runs in on `ifindex`.
fn xdp_mode_of(
    xdp: &HashMap<u32, Vec<(u32, &'static str)>>,
    ifindex: u32,
    prog_id: u32,
) -> Option<&'static str> {
    xdp.get(&ifindex)?
        .iter()
        .find(|(id, _)| *id == prog_id)
        .map(|(_, mode)| *mode)
}

/// The programs in an `IFLA_XDP` attribute, with the mode each runs in (the kernel reports one
/// program id per mode in use).
fn xdp_modes(attrs: &[LinkXdp]) -> Vec<(u32, &'static str)> {
    attrs
        .iter()
        .filter_map(|a| match a {
            LinkXdp::DrvProgId(id) => Some((*id, "driver")),
            LinkXdp::SkbProgId(id) => Some((*id, "generic")),
            LinkXdp::HwProgId(id) => Some((*id, "offload")),
            _ => None,
        })
        .collect()
}

/// ifindex → XDP programs with their modes, from one netlink link dump (empty if it fails).
/// On a thread of its own, so a caller already inside a tokio runtime can use `read` too.
fn xdp_programs() -> HashMap<u32, Vec<(u32, &'static str)>> {
    let dump = || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .ok()?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection().ok()?;
            let conn = tokio::spawn(conn);
            let mut out = HashMap::new();
            let mut links = handle.link().get().execute();
            while let Ok(Some(msg)) = links.try_next().await {
                for attr in &msg.attributes {
                    if let LinkAttribute::Xdp(xdp) = attr {
                        let progs = xdp_modes(xdp);
                        if !progs.is_empty() {
                            out.insert(msg.header.index, progs);
                        }
                    }
                }
            }
            conn.abort();
            Some(out)
        })
    };
    std::thread::scope(|s| s.spawn(dump).join().ok().flatten()).unwrap_or_default()
}

/// The TCX programs on (interface, direction): (program id, name), each hook queried once.
#[derive(Default)]
struct TcxPrograms(HashMap<(String, &'static str), Vec<(u32, String)>>);

impl TcxPrograms {
    const DIRECTIONS: [&'static str; 2] = ["ingress", "egress"];

    fn programs(&mut self, iface: &str, direction: &'static str) -> &[(u32, String)] {
        self.0
            .entry((iface.to_string(), direction))
            .or_insert_with(|| pinned::tcx_programs(iface, direction == "ingress"))
    }

    /// Where program `prog_id` is attached on `iface`. Encap runs on both of the host
    /// device's hooks (egress: what the stack routes; ingress: segments coming back from being
    /// resegmented, pinned as `RESEG_LINK`): there the pin tells which link is which.
    fn direction(&mut self, iface: &str, prog_id: u32, reseg: bool) -> Option<&'static str> {
        let found: Vec<&'static str> = Self::DIRECTIONS
            .into_iter()
            .filter(|d| self.programs(iface, d).iter().any(|(id, _)| *id == prog_id))
            .collect();
        match found[..] {
            [one] => Some(one),
            [_, _] => Some(if reseg { "ingress" } else { "egress" }),
            _ => None,
        }
    }
}

impl Status {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("Status always serializes")
    }

    /// Human-readable form.
    pub fn render(&self) -> String {
        let n = &self.node;
        let mut s = String::new();
        let _ = writeln!(s, "pin root    {}", self.pin_root.display());
        let _ = writeln!(s, "kernel      {}", self.kernel);
        for f in &self.features {
            if f.present {
                let _ = writeln!(s, "  {:<26} yes", f.name);
            } else {
                let _ = writeln!(s, "  {:<26} no: {}", f.name, f.fallback);
            }
        }
        if n.ready && n.backend == "host-gw" {
            let _ = writeln!(
                s,
                "node        backend host-gw  PublicIP {}  MTU {}",
                n.public_ip, n.inner_mtu
            );
        } else if n.ready {
            let _ = writeln!(
                s,
                "node        backend {}  PublicIP {}  VNI {}  port {}  VtepMAC {}  inner MTU {}",
                n.backend, n.public_ip, n.vni, n.port, n.vtep_mac, n.inner_mtu
            );
        } else {
            let _ = writeln!(
                s,
                "node        not configured yet (the agent has not written OVL_CONFIG)"
            );
        }
        let _ = writeln!(s, "decap       {}", self.decap);
        let ours = self.attachments.iter().filter(|a| a.ours).count();
        let _ = write!(s, "\nattachments ({ours} ours");
        if ours < self.attachments.len() {
            let _ = write!(s, ", {} not ours", self.attachments.len() - ours);
        }
        let _ = writeln!(s, ")");
        if !self.attachments.is_empty() {
            let _ = writeln!(
                s,
                "  {:<18} {:<20} {:<12} {:>6} {:>6}  pin",
                "program", "interface", "hook", "link", "prog"
            );
        }
        for a in &self.attachments {
            let iface = if a.iface_present {
                format!("{} ({})", a.iface, a.ifindex)
            } else {
                format!("{} ({}, gone)", a.iface, a.ifindex)
            };
            let hook = match a.xdp_mode.or(a.direction) {
                Some(how) => format!("{} {how}", a.hook),
                None => a.hook.clone(),
            };
            let id = |v: Option<u32>| v.map_or("-".to_string(), |v| v.to_string());
            let pin = match &a.pin {
                Some(p) => p.strip_prefix(&self.pin_root).unwrap_or(p).display().to_string(),
                None if a.ours => format!("(clsact filter pref {}, not pinned)", dataplane::TC_PRIORITY),
                None => "(not ours)".to_string(),
            };
            let _ = writeln!(
                s,
                "  {:<18} {:<20} {:<12} {:>6} {:>6}  {pin}",
                a.program,
                iface,
                hook,
                id(a.link_id),
                id(a.prog_id)
            );
        }
        let unanswered = self
            .peers
            .iter()
            .filter(|p| p.traffic.as_ref().is_some_and(|t| t.unanswered))
            .count();
        match unanswered {
            0 => writeln!(s, "\npeers ({})", self.peers.len()),
            n => writeln!(s, "\npeers ({}, {n} not answering)", self.peers.len()),
        }
        .unwrap_or_default();
        if !self.peers.is_empty() {
            let _ = writeln!(s, "  {:<24} {:<24} {:<18} mode", "subnet", "PublicIP", "VtepMAC");
        }
        for p in &self.peers {
            let _ = writeln!(
                s,
                "  {:<24} {:<24} {:<18} {}",
                p.subnet.to_string(),
                p.public_ip.to_string(),
                p.vtep_mac,
                p.mode
            );
            if let Some(t) = &p.traffic {
                let _ = writeln!(s, "      {}", t.line());
                if let Some(note) = &t.note {
                    let _ = writeln!(s, "    ! {note}");
                }
            }
        }
        let _ = writeln!(s, "\nlocal endpoints ({})", self.endpoints.len());
        if !self.endpoints.is_empty() {
            let _ = writeln!(s, "  {:<26} {:<24} mac", "ip", "veth");
        }
        for e in &self.endpoints {
            let veth = match &e.iface {
                Some(name) => format!("{name} ({})", e.ifindex),
                None => e.ifindex.to_string(),
            };
            let _ = writeln!(s, "  {:<26} {:<24} {}", e.ip.to_string(), veth, e.mac);
        }
        let _ = writeln!(s, "\ncounters");
        for c in Counter::ALL {
            let v = self.counters.get(c.name()).copied().unwrap_or(0);
            let _ = writeln!(s, "  {:<22} {v}", c.name());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clsact_filters_of_ours_are_found_in_tc_json() {
        // `tc -j filter show dev cni0 ingress` (iproute2 6.1) with our filter, another tool's
        // filter at another priority, and a non-BPF one.
        let json = br#"[{"protocol":"all","pref":1,"kind":"bpf","chain":0},
            {"protocol":"all","pref":1,"kind":"bpf","chain":0,"options":{"handle":"0x4f56",
             "bpf_name":"overlay_encap","direct-action":true,"not_in_hw":true,
             "prog":{"id":57,"name":"overlay_encap","tag":"0a1b2c3d4e5f6071","jited":1}}},
            {"protocol":"all","pref":49152,"kind":"bpf","chain":0,"options":{"handle":"0x1",
             "bpf_name":"overlay_encap","direct-action":true,"prog":{"id":58}}},
            {"protocol":"ip","pref":2,"kind":"u32","chain":0}]"#;
        assert_eq!(
            parse_clsact_filters(json),
            [("overlay_encap".to_string(), Some(57))],
            "only our filter at our priority counts"
        );
        assert!(parse_clsact_filters(b"").is_empty());
        assert!(parse_clsact_filters(b"[]").is_empty());
    }

    #[test]
    fn link_pin_names() {
        let p = |name| LinkPin::parse(name).map(|p| (p.program, p.iface, p.ifindex));
        assert_eq!(p("overlay_encap@cni0@5"), Some(("overlay_encap", "cni0", 5)));
        assert_eq!(
            p("overlay_decap_xdp@eth0_100@12"),
            Some(("overlay_decap_xdp", "eth0_100", 12))
        );
        // Interface names may hold an `@`; the ifindex is after the last one.
        assert_eq!(p("overlay_encap@a@b@7"), Some(("overlay_encap", "a@b", 7)));
        for bad in [
            "OVL_PEERS",
            "overlay_encap@cni0",
            "overlay_encap@cni0@",
            "overlay_encap@cni0@x5",
            "overlay_encap@cni0@0",
            "overlay_encap@cni0@-1",
            "@cni0@5",
            "overlay_encap@@5",
        ] {
            assert_eq!(p(bad), None, "{bad:?} is not a link pin name");
        }
    }

    fn pinned(program: &str, ifindex: u32, hook: &str) -> AttachmentView {
        AttachmentView {
            program: program.to_string(),
            iface: format!("if{ifindex}"),
            ifindex,
            iface_present: true,
            hook: hook.to_string(),
            xdp_mode: None,
            direction: None,
            link_id: Some(10 + ifindex),
            prog_id: Some(20 + ifindex),
            pin: Some(PathBuf::from(format!(
                "/sys/fs/bpf/o/links/{program}@if{ifindex}@{ifindex}"
            ))),
            ours: true,
        }
    }

    #[test]
    fn decap_mode_from_the_pins() {
        let encap = pinned(programs::ENCAP, 5, "tcx");
        let tc = pinned(programs::DECAP_TC, 2, "tcx");
        let xdp = pinned(programs::DECAP_XDP, 2, "xdp");
        let mode = |a: &[AttachmentView], underlay| decap_in_use(a, underlay);
        assert_eq!(mode(&[], 2), None);
        assert_eq!(mode(std::slice::from_ref(&encap), 2), None);
        assert_eq!(mode(&[encap.clone(), tc.clone()], 2), Some(DecapMode::Tc));
        assert_eq!(
            mode(&[tc.clone(), encap.clone(), xdp.clone()], 2),
            Some(DecapMode::Xdp)
        );
        // Underlay not known yet (no config written): any interface counts.
        assert_eq!(mode(&[tc.clone(), xdp.clone()], 0), Some(DecapMode::Xdp));
        // An XDP decap pinned on another interface is not the underlay's decap.
        assert_eq!(mode(&[tc.clone(), xdp.clone()], 3), None);
        assert_eq!(
            mode(&[tc.clone(), pinned(programs::DECAP_XDP, 7, "xdp")], 2),
            Some(DecapMode::Tc)
        );
        // Someone else's program named like ours is not our decap.
        let foreign = AttachmentView {
            ours: false,
            pin: None,
            link_id: None,
            ..xdp.clone()
        };
        assert_eq!(mode(&[tc, foreign], 2), Some(DecapMode::Tc));
    }

    #[test]
    fn xdp_modes_from_netlink() {
        use rtnetlink::packet_route::link::XdpAttached;
        // One program in the driver: the kernel sends its mode and its id twice.
        let drv = [
            LinkXdp::Attached(XdpAttached::Driver),
            LinkXdp::DrvProgId(41),
            LinkXdp::ProgId(41),
        ];
        assert_eq!(xdp_modes(&drv), vec![(41, "driver")]);
        let multi = [
            LinkXdp::SkbProgId(7),
            LinkXdp::DrvProgId(8),
            LinkXdp::HwProgId(9),
            LinkXdp::Attached(XdpAttached::Multiple),
        ];
        assert_eq!(
            xdp_modes(&multi),
            vec![(7, "generic"), (8, "driver"), (9, "offload")]
        );
        assert_eq!(xdp_modes(&[LinkXdp::Attached(XdpAttached::None)]), vec![]);
        let by_if = HashMap::from([(2, xdp_modes(&multi))]);
        assert_eq!(xdp_mode_of(&by_if, 2, 8), Some("driver"));
        assert_eq!(xdp_mode_of(&by_if, 2, 41), None);
        assert_eq!(xdp_mode_of(&by_if, 3, 8), None);
    }

    #[test]
    fn render_lists_the_attachments() {
        let xdp = AttachmentView {
            xdp_mode: Some("driver"),
            ..pinned(programs::DECAP_XDP, 2, "xdp")
        };
        let tc = AttachmentView {
            direction: Some("ingress"),
            ..pinned(programs::DECAP_TC, 2, "tcx")
        };
        let gone = AttachmentView {
            iface_present: false,
            ..pinned(programs::ENCAP, 9, "tcx")
        };
        let other = AttachmentView {
            program: "fw_ingress".into(),
            ours: false,
            pin: None,
            link_id: None,
            prog_id: Some(77),
            direction: Some("ingress"),
            ..pinned("", 2, "tcx")
        };
        let st = Status {
            pin_root: PathBuf::from("/sys/fs/bpf/o"),
            kernel: "6.1.0-57-amd64".into(),
            features: vec![FeatureView {
                name: "tcx",
                present: false,
                fallback: "clsact",
            }],
            node: NodeView {
                ready: true,
                backend: "vxlan",
                public_ip: Ipv4Addr::new(198, 18, 0, 11),
                vni: 1,
                port: 8472,
                vtep_mac: "02:00:00:00:00:01".into(),
                underlay_ifindex: 2,
                inner_mtu: 1450,
                public_ipv6: None,
            },
            decap: "xdp",
            attachments: vec![xdp, tc, gone, other],
            peers: vec![
                PeerView {
                    subnet: "10.244.2.0/24".parse().unwrap(),
                    public_ip: "198.18.0.12".parse().unwrap(),
                    vtep_mac: "02:00:00:00:00:02".into(),
                    mode: "encap",
                    traffic: Some(TrafficView::of(
                        &overlay_common::PeerStats {
                            tx_packets: 50,
                            tx_bytes: 7_400,
                            rx_packets: 3,
                            rx_bytes: 294,
                            tx_last_ns: 1_000_000_000_000,
                            rx_last_ns: 958_000_000_000,
                            tx_drops: 1,
                            rx_drops: 0,
                        },
                        1_000_500_000_000,
                    )),
                },
                PeerView {
                    subnet: "10.244.3.0/24".parse().unwrap(),
                    public_ip: "198.18.0.13".parse().unwrap(),
                    vtep_mac: "02:00:00:00:00:03".into(),
                    mode: "direct",
                    traffic: None,
                },
            ],
            endpoints: ["10.244.1.2", "fd00:10:244:1::2"]
                .into_iter()
                .map(|ip| EndpointView {
                    ip: ip.parse().unwrap(),
                    ifindex: 7,
                    iface: Some("veth1".into()),
                    mac: "0a:58:0a:f4:01:02".into(),
                    gw_mac: "0a:58:0a:f4:01:01".into(),
                })
                .collect(),
            counters: BTreeMap::new(),
        };
        let text = st.render();
        let line = |start: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(start))
                .unwrap_or_else(|| panic!("no line starting {start:?}:\n{text}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(line("decap"), "decap xdp");
        assert_eq!(line("attachments"), "attachments (3 ours, 1 not ours)");
        assert_eq!(line("kernel"), "kernel 6.1.0-57-amd64");
        assert_eq!(line("tcx"), "tcx no: clsact");
        assert_eq!(
            line("overlay_decap_xdp"),
            "overlay_decap_xdp if2 (2) xdp driver 12 22 links/overlay_decap_xdp@if2@2"
        );
        assert_eq!(
            line("overlay_decap_tc"),
            "overlay_decap_tc if2 (2) tcx ingress 12 22 links/overlay_decap_tc@if2@2"
        );
        assert_eq!(
            line("overlay_encap"),
            "overlay_encap if9 (9, gone) tcx 19 29 links/overlay_encap@if9@9"
        );
        assert_eq!(
            line("fw_ingress"),
            "fw_ingress if2 (2) tcx ingress - 77 (not ours)"
        );
        assert_eq!(line("peers"), "peers (2, 1 not answering)");
        assert_eq!(
            line("10.244.2.0/24"),
            "10.244.2.0/24 198.18.0.12 02:00:00:00:00:02 encap",
            "the peer's row keeps its shape"
        );
        assert_eq!(
            line("tx 50"),
            "tx 50 pkts 7.40 kB, 0s ago | rx 3 pkts 294 B, 42s ago | drops tx 1 rx 0"
        );
        assert_eq!(line("!"), "! sending, nothing heard back for 42s");
        assert_eq!(
            line("10.244.3.0/24"),
            "10.244.3.0/24 198.18.0.13 02:00:00:00:00:03 direct"
        );
        assert_eq!(
            text.matches("pkts").count(),
            2,
            "no traffic line without counts:\n{text}"
        );
        assert_eq!(line("local endpoints"), "local endpoints (2)");
        assert_eq!(line("10.244.1.2"), "10.244.1.2 veth1 (7) 0a:58:0a:f4:01:02");
        assert_eq!(
            line("fd00:10:244:1::2"),
            "fd00:10:244:1::2 veth1 (7) 0a:58:0a:f4:01:02"
        );
        let json: serde_json::Value = serde_json::from_str(&st.to_json()).unwrap();
        assert_eq!(json["endpoints"][1]["ip"], "fd00:10:244:1::2");
        assert_eq!(json["decap"], "xdp");
        assert_eq!(json["attachments"][0]["xdp_mode"], "driver");
        assert_eq!(json["attachments"][1]["direction"], "ingress");
        assert_eq!(json["attachments"][3]["ours"], false);
        assert_eq!(json["attachments"][3]["pin"], serde_json::Value::Null);
        let t = &json["peers"][0]["traffic"];
        assert_eq!(json["peers"][0]["public_ip"], "198.18.0.12");
        assert_eq!(
            (t["tx_packets"].as_u64(), t["rx_packets"].as_u64()),
            (Some(50), Some(3))
        );
        assert_eq!(
            (t["tx_bytes"].as_u64(), t["rx_bytes"].as_u64()),
            (Some(7_400), Some(294))
        );
        assert_eq!(
            (t["tx_drops"].as_u64(), t["rx_drops"].as_u64()),
            (Some(1), Some(0))
        );
        assert_eq!(t["last_heard_secs_ago"], 42.5);
        assert_eq!(t["unanswered"], true);
        assert_eq!(t["note"], "sending, nothing heard back for 42s");
        assert_eq!(json["peers"][1]["traffic"], serde_json::Value::Null);
    }
}
