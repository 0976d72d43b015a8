//! `overlay-agent explain SRC DST`: what this node's datapath does with a packet from SRC to DST,
//! hop by hop, from the pinned maps and links, the node's routes and subnet.env, whether the
//! agent runs or not (as `status`). [`gather`] reads the node into [`Facts`]; [`explain`] is a
//! pure function of them that follows the programs' own decisions (encap.rs, decap.rs,
//! deliver.rs, plain.rs in overlay-ebpf), naming the counter each hop moves.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use overlay_common::{
    maps::{
        self, CONFIG_BARE_FAST, CONFIG_DELIVER_VIA_VETH, CONFIG_HOST_GW, CONFIG_NO_DELIVER, CONFIG_READY,
    },
    programs,
};
use serde::Serialize;

use super::status::{self, AttachmentView, StatusError};
use crate::{
    control::{lease::MacAddr, subnet_env},
    dataplane::{self, pinned},
    family::{V4, V6},
    node::{hostdev::HOST_DEVICE, netlink},
};

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("{arg} {value:?} is not an IP address; give a pod or node address, e.g. 10.244.1.2 or fd00:10:244:1::2")]
    NotAnAddress { arg: &'static str, value: String },
    #[error(
        "SRC {src} and DST {dst} are of different families; a packet has one: give two IPv4 or two \
         IPv6 addresses"
    )]
    MixedFamilies { src: IpAddr, dst: IpAddr },
    #[error(transparent)]
    Status(#[from] StatusError),
    #[error(transparent)]
    Dataplane(#[from] dataplane::DataplaneError),
}

/// Parses SRC and DST: addresses of one family.
pub fn parse_addrs(src: &str, dst: &str) -> Result<(IpAddr, IpAddr), ExplainError> {
    let parse = |arg, value: &str| {
        value
            .trim()
            .parse::<IpAddr>()
            .map_err(|_| ExplainError::NotAnAddress {
                arg,
                value: value.to_string(),
            })
    };
    let (s, d) = (parse("SRC", src)?, parse("DST", dst)?);
    if s.is_ipv4() != d.is_ipv4() {
        return Err(ExplainError::MixedFamilies { src: s, dst: d });
    }
    Ok((s, d))
}

// ---------------------------------------------------------------------------------------------
// What the node holds: the pure input of `explain`.
// ---------------------------------------------------------------------------------------------

/// The node's datapath settings (`OVL_CONFIG`, `OVL_CONFIG6`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    /// `CONFIG_READY`: the agent has written the config.
    pub ready: bool,
    pub host_gw: bool,
    /// host-gw with the recorder attached: bare pod packets from members are delivered straight.
    pub bare_fast: bool,
    /// `--deliver stack`.
    pub no_deliver: bool,
    /// `--deliver veth`.
    pub via_veth: bool,
    pub public_ip: Ipv4Addr,
    /// Our PublicIPv6 when the IPv6 side is configured.
    pub public_ip6: Option<Ipv6Addr>,
    pub vni: u32,
    pub port: u16,
    pub vtep_mac: [u8; 6],
    pub vtep_mac6: [u8; 6],
    pub inner_mtu: u32,
    pub inner_mtu6: u32,
    /// The underlay NIC's name (or its ifindex when it has none here).
    pub underlay: String,
}

/// One remote subnet (`OVL_PEERS`/`OVL_PEERS6`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerFact {
    pub subnet: IpNet,
    pub public_ip: IpAddr,
    pub vtep_mac: [u8; 6],
    pub direct: bool,
}

/// One local pod address (`OVL_ENDPOINTS`/`OVL_ENDPOINTS6`) and its device-map entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointFact {
    pub ip: IpAddr,
    pub ifindex: u32,
    pub iface: Option<String>,
    /// The ifindex the device map holds for it (`None`: no entry, its veth is gone).
    pub device: Option<u32>,
}

/// subnet.env.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseFacts {
    pub file: PathBuf,
    /// The file could be read.
    pub read: bool,
    /// `FLANNEL_NETWORK`, `FLANNEL_IPV6_NETWORK`.
    pub networks: Vec<IpNet>,
    /// Our lease: `FLANNEL_SUBNET`, `FLANNEL_IPV6_SUBNET` (as networks).
    pub subnets: Vec<IpNet>,
    /// `FLANNEL_IPMASQ`.
    pub ip_masq: Option<bool>,
}

/// Where our programs are attached, as readable phrases (`None`: not attached).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hooks {
    /// Encap on the pod bridge's ingress: "tc ingress on cni0 (overlay_encap)".
    pub bridge_encap: Option<String>,
    /// Encap on `overlay0`'s egress (vxlan).
    pub host_encap: Option<String>,
    /// Decap on the underlay: XDP, else TC.
    pub decap: Option<String>,
    /// The TC program on the underlay's ingress (TC decap, or delivery after XDP decap).
    pub decap_tc: Option<String>,
    /// host-gw's recorder on the underlay's egress.
    pub recorder: Option<String>,
}

/// The node's route to an address (`ip route get`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteFact {
    pub dev: String,
    pub via: Option<IpAddr>,
    pub src: Option<IpAddr>,
}

/// Everything `explain` decides from.
#[derive(Debug, Clone)]
pub struct Facts {
    pub node: NodeFacts,
    pub peers: Vec<PeerFact>,
    /// The sender tables (`OVL_VTEPS`/`OVL_VTEPS6`): member PublicIP → the subnet decap accepts.
    pub senders: Vec<(IpAddr, IpNet)>,
    pub endpoints: Vec<EndpointFact>,
    pub lease: LeaseFacts,
    /// The node's own addresses and their interfaces.
    pub local_addrs: Vec<(IpAddr, String)>,
    pub hooks: Hooks,
    /// Routes the node has (absent: none, or `ip route get` failed: the reason).
    pub routes: BTreeMap<IpAddr, Result<RouteFact, String>>,
}

impl Facts {
    /// The peer whose subnet holds `ip` (longest prefix, as the LPM trie answers).
    fn peer_for(&self, ip: IpAddr) -> Option<&PeerFact> {
        self.peers
            .iter()
            .filter(|p| p.subnet.contains(&ip))
            .max_by_key(|p| p.subnet.prefix_len())
    }

    fn endpoint(&self, ip: IpAddr) -> Option<&EndpointFact> {
        self.endpoints.iter().find(|e| e.ip == ip)
    }

    fn our_subnet(&self, v6: bool) -> Option<IpNet> {
        self.lease
            .subnets
            .iter()
            .copied()
            .find(|n| matches!(n, IpNet::V6(_)) == v6)
    }

    fn our_public_ip(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.node.public_ip6.map(IpAddr::V6)
        } else {
            (self.node.ready && !self.node.public_ip.is_unspecified())
                .then_some(IpAddr::V4(self.node.public_ip))
        }
    }

    fn route(&self, ip: IpAddr) -> Result<&RouteFact, String> {
        match self.routes.get(&ip) {
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) => Err(e.clone()),
            None => Err("no route".to_string()),
        }
    }

    /// What `ip` is to this node.
    fn role(&self, ip: IpAddr) -> Role<'_> {
        if let Some((_, iface)) = self.local_addrs.iter().find(|(a, _)| *a == ip) {
            return Role::Node(iface.clone());
        }
        if self.our_public_ip(ip.is_ipv6()) == Some(ip) {
            return Role::Node(self.node.underlay.clone());
        }
        if let Some(sn) = self.our_subnet(ip.is_ipv6()).filter(|n| n.contains(&ip)) {
            return Role::LocalPod(sn, self.endpoint(ip));
        }
        if let Some(e) = self.endpoint(ip) {
            return Role::LocalPod(IpNet::from(ip), Some(e));
        }
        if let Some(p) = self.peer_for(ip) {
            return Role::RemotePod(p);
        }
        if self.peers.iter().any(|p| p.public_ip == ip) || self.senders.iter().any(|(a, _)| *a == ip) {
            return Role::Member;
        }
        if let Some(n) = self.lease.networks.iter().find(|n| n.contains(&ip)) {
            return Role::Unleased(*n);
        }
        Role::Outside
    }
}

#[derive(Debug, Clone)]
enum Role<'a> {
    /// One of this node's addresses (on that interface).
    Node(String),
    /// Inside our lease (that subnet), with its endpoint entry if it has one.
    LocalPod(IpNet, Option<&'a EndpointFact>),
    /// Inside a remote member's subnet.
    RemotePod(&'a PeerFact),
    /// A member node's PublicIP.
    Member,
    /// Inside the cluster network, but no member holds it.
    Unleased(IpNet),
    /// Outside the cluster network.
    Outside,
}

impl Role<'_> {
    fn describe(&self) -> String {
        match self {
            Role::Node(iface) => format!("this node's address (on {iface})"),
            Role::LocalPod(sn, Some(e)) => {
                format!("a local pod in our lease {sn} (endpoint entry: {})", veth_name(e))
            }
            Role::LocalPod(sn, None) => format!("in our lease {sn}, no endpoint entry (not a learned pod)"),
            Role::RemotePod(p) => format!("a remote pod: {} is the member {}'s", p.subnet, p.public_ip),
            Role::Member => "a member node's PublicIP".to_string(),
            Role::Unleased(n) => format!("in the cluster network {n}, but no member holds its subnet here"),
            Role::Outside => "outside the cluster network".to_string(),
        }
    }
}

fn veth_name(e: &EndpointFact) -> String {
    match &e.iface {
        Some(n) => format!("{n} (ifindex {})", e.ifindex),
        None => format!("ifindex {}", e.ifindex),
    }
}

// ---------------------------------------------------------------------------------------------
// The answer.
// ---------------------------------------------------------------------------------------------

/// What a hop does with the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The pod bridge forwards it between its ports; no program of ours sees it.
    Bridge,
    /// VXLAN-encapsulated and sent to a member.
    Encap,
    /// Sent bare to a member (host-gw, DirectRouting).
    Direct,
    /// Handed to (or routed by) the node's stack.
    Stack,
    /// In the cluster network but no member holds it: handed to the stack, likely unreachable.
    Refused,
    /// Dropped by a program.
    Drop,
    /// Outer headers checked and stripped.
    Decap,
    /// Straight into the pod.
    Deliver,
    /// A remote node's part: what must hold there.
    Remote,
    /// Not through this node, or not the overlay's.
    NotHere,
}

impl Action {
    fn label(self) -> &'static str {
        match self {
            Action::Bridge => "bridge",
            Action::Encap => "encap",
            Action::Direct => "direct",
            Action::Stack => "stack",
            Action::Refused => "refused",
            Action::Drop => "drop",
            Action::Decap => "decap",
            Action::Deliver => "deliver",
            Action::Remote => "remote",
            Action::NotHere => "not here",
        }
    }
}

/// The outer header encap writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outer {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// "32768-60999 (from the flow hash)".
    pub udp_src_port: &'static str,
    pub udp_dst_port: u16,
    pub vni: u32,
    /// "0 (none)" for IPv4, "computed" for IPv6.
    pub udp_checksum: &'static str,
    pub inner_src_mac: String,
    pub inner_dst_mac: String,
}

/// The peer entry a hop uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerView {
    pub subnet: IpNet,
    pub public_ip: IpAddr,
    pub vtep_mac: String,
    pub mode: &'static str,
}

impl PeerView {
    fn of(p: &PeerFact) -> Self {
        PeerView {
            subnet: p.subnet,
            public_ip: p.public_ip,
            vtep_mac: MacAddr(p.vtep_mac).to_string(),
            mode: if p.direct { "direct" } else { "encap" },
        }
    }
}

/// One hop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hop {
    /// "this node" or "node 198.18.0.12".
    pub at: String,
    /// Which hook sees the packet ("tc ingress on cni0 (overlay_encap)"), or what does.
    pub hook: String,
    pub action: Action,
    /// Counters (`status`'s names) this hop adds one to per packet, on the node `at` names.
    pub counters: Vec<&'static str>,
    /// What it does, in sentences.
    pub says: Vec<String>,
    /// What would make it do something else.
    pub unless: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer: Option<Outer>,
    /// The largest inner packet this hop sends on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The route the hop's packet takes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteFact>,
}

impl Hop {
    fn new(at: impl Into<String>, hook: impl Into<String>, action: Action) -> Self {
        Hop {
            at: at.into(),
            hook: hook.into(),
            action,
            counters: Vec::new(),
            says: Vec::new(),
            unless: Vec::new(),
            peer: None,
            outer: None,
            mtu: None,
            route: None,
        }
    }
    fn counter(mut self, c: &'static str) -> Self {
        self.counters.push(c);
        self
    }
    fn says(mut self, s: impl Into<String>) -> Self {
        self.says.push(s.into());
        self
    }
    fn unless(mut self, s: impl Into<String>) -> Self {
        self.unless.push(s.into());
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub family: &'static str,
    pub backend: &'static str,
    pub src_is: String,
    pub dst_is: String,
    /// What this node does with it, in one word: `bridge`, `encap`, `direct`, `stack`,
    /// `refused`, `drop`, `deliver` (received and delivered straight), `not_here`.
    pub verdict: Action,
    pub summary: String,
    pub hops: Vec<Hop>,
    /// What this node cannot see but matters (our lease, the remote node's checks).
    pub notes: Vec<String>,
}

const HERE: &str = "this node";

/// Family-specific names.
struct Fam {
    v6: bool,
}

impl Fam {
    fn encap(&self) -> &'static str {
        if self.v6 {
            "encap6_packets"
        } else {
            "encap_packets"
        }
    }
    fn direct(&self) -> &'static str {
        if self.v6 {
            "direct6_packets"
        } else {
            "direct_packets"
        }
    }
    fn decap(&self) -> &'static str {
        if self.v6 {
            "decap6_packets"
        } else {
            "decap_packets"
        }
    }
    fn deliver(&self) -> &'static str {
        if self.v6 {
            "deliver6_packets"
        } else {
            "deliver_packets"
        }
    }
    fn peers(&self) -> &'static str {
        if self.v6 {
            maps::PEERS6
        } else {
            maps::PEERS
        }
    }
    fn vteps(&self) -> &'static str {
        if self.v6 {
            maps::VTEPS6
        } else {
            maps::VTEPS
        }
    }
    fn endpoints(&self) -> &'static str {
        if self.v6 {
            maps::ENDPOINTS6
        } else {
            maps::ENDPOINTS
        }
    }
    fn ttl(&self) -> &'static str {
        if self.v6 {
            "hop limit"
        } else {
            "TTL"
        }
    }
    fn too_big(&self) -> &'static str {
        if self.v6 {
            "ICMPv6 Packet Too Big"
        } else {
            "ICMP fragmentation-needed (DF set) or fragments it"
        }
    }
}

/// What the datapath of the node `f` describes does with a packet from `src` to `dst` (one
/// family: [`parse_addrs`]).
pub fn explain(f: &Facts, src: IpAddr, dst: IpAddr) -> Explanation {
    let fam = Fam { v6: dst.is_ipv6() };
    let (rs, rd) = (f.role(src), f.role(dst));
    let mut notes = Vec::new();
    if !f.node.ready {
        notes.push(
            "the agent has not written OVL_CONFIG yet: until it does, the programs pass every packet \
             to the stack"
                .to_string(),
        );
    }
    if fam.v6 && f.node.public_ip6.is_none() {
        notes.push("IPv6 is not configured on this node (OVL_CONFIG6 not ready): the programs leave IPv6 to the stack".into());
    }
    let hops = match (&rs, &rd) {
        (Role::LocalPod(..), Role::LocalPod(..)) => vec![Hop::new(HERE, "the pod bridge", Action::Bridge)
            .says("both are pods on this node's bridge: it forwards the frame port to port, no overlay")
            .says("encap runs on the bridge device's own ingress, which bridged frames never reach")],
        (Role::LocalPod(sn, _), Role::RemotePod(p)) => send_from_pod(f, &fam, src, dst, *sn, p, &mut notes),
        (Role::LocalPod(..), _) => pod_to_non_pod(f, &fam, dst, &rd),
        (Role::Node(_), Role::RemotePod(p)) => node_to_remote_pod(f, &fam, src, dst, p, &mut notes),
        (Role::RemotePod(p), Role::LocalPod(_, ep)) => receive_from_pod(f, &fam, src, dst, p, *ep),
        (Role::RemotePod(p), Role::Node(_)) => receive_from_pod(f, &fam, src, dst, p, None),
        (Role::Node(_), Role::LocalPod(..)) => vec![route_hop(f, dst, Action::Stack)
            .says("the node's own packet to a local pod: the stack routes it to the bridge; no program of ours acts")],
        (Role::Member, Role::LocalPod(_, ep)) if !f.node.host_gw => {
            member_node_to_pod(f, &fam, src, dst, *ep)
        }
        (Role::Member | Role::Outside | Role::Unleased(_), Role::LocalPod(..)) => {
            vec![unencapsulated_in(f, &fam, src)]
        }
        (Role::RemotePod(_), _) => vec![Hop::new(HERE, "none", Action::NotHere).says(format!(
            "{src} is a remote pod and {dst} is not on this node: the packet leaves {src}'s own node, \
             never this one (run explain there)"
        ))],
        _ => vec![route_hop(f, dst, Action::NotHere).says(
            "neither address is a pod of this node: not the overlay's, the node's stack routes it as any other packet",
        )],
    };
    let verdict = overall(&hops);
    let summary = summary(&hops, verdict, src, dst);
    Explanation {
        src,
        dst,
        family: if fam.v6 { "IPv6" } else { "IPv4" },
        backend: if f.node.host_gw { "host-gw" } else { "vxlan" },
        src_is: rs.describe(),
        dst_is: rd.describe(),
        verdict,
        summary,
        hops,
        notes,
    }
}

/// This node's verdict: the last hop here that decides (a delivery after decap, an encap after
/// the stack), else its first.
fn overall(hops: &[Hop]) -> Action {
    let here: Vec<&Hop> = hops.iter().filter(|h| h.at == HERE).collect();
    if let Some(h) = here.iter().find(|h| h.action == Action::Drop) {
        return h.action;
    }
    if here.iter().any(|h| h.action == Action::Refused) {
        return Action::Refused;
    }
    for want in [Action::Deliver, Action::Encap, Action::Direct] {
        if here.iter().any(|h| h.action == want) {
            return want;
        }
    }
    here.first().map_or(Action::NotHere, |h| match h.action {
        Action::Decap => Action::Stack,
        a => a,
    })
}

fn summary(hops: &[Hop], verdict: Action, src: IpAddr, dst: IpAddr) -> String {
    let path: Vec<String> = hops
        .iter()
        .map(|h| {
            if h.at == HERE {
                h.action.label().to_string()
            } else {
                format!("{} at {}", h.action.label(), h.at.trim_start_matches("node "))
            }
        })
        .collect();
    format!("{src} → {dst}: {} ({})", verdict.label(), path.join(" → "))
}

/// A hop that is the node's stack routing `dst`.
fn route_hop(f: &Facts, dst: IpAddr, action: Action) -> Hop {
    let mut h = Hop::new(HERE, "the node's stack", action);
    match f.route(dst) {
        Ok(r) => {
            h = h.says(format!("route to {dst}: {}", route_text(r)));
            h.route = Some(r.clone());
        }
        Err(e) => h = h.says(format!("no route to {dst} ({e}): unreachable from this node")),
    }
    h
}

fn route_text(r: &RouteFact) -> String {
    let mut s = String::new();
    if let Some(via) = r.via {
        let _ = write!(s, "via {via} ");
    }
    let _ = write!(s, "dev {}", r.dev);
    if let Some(src) = r.src {
        let _ = write!(s, " src {src}");
    }
    s
}

fn not_attached(what: &str) -> String {
    format!("{what}: not attached")
}

/// SRC a local pod, DST a remote member's pod: encap on the bridge.
fn send_from_pod(
    f: &Facts,
    fam: &Fam,
    src: IpAddr,
    dst: IpAddr,
    our: IpNet,
    p: &PeerFact,
    notes: &mut Vec<String>,
) -> Vec<Hop> {
    let Some(hook) = f.hooks.bridge_encap.clone() else {
        let mut hops = vec![
            Hop::new(HERE, not_attached("encap on the pod bridge"), Action::Stack)
                .says("no encap program on the bridge: the bridge hands the packet to the node's stack"),
        ];
        hops.extend(node_to_remote_pod(f, fam, src, dst, p, notes));
        return hops;
    };
    let mut h = Hop::new(HERE, hook, Action::Stack);
    h.peer = Some(PeerView::of(p));
    let direct = p.direct || f.node.host_gw;
    h = h.says(if f.node.host_gw {
        // host-gw leases carry no VtepMAC.
        format!(
            "{} has {} → member {} (host-gw: sent bare)",
            fam.peers(),
            p.subnet,
            p.public_ip
        )
    } else {
        format!(
            "{} has {} → member {} (VtepMAC {}, {})",
            fam.peers(),
            p.subnet,
            p.public_ip,
            MacAddr(p.vtep_mac),
            if direct {
                "DirectRouting: sent bare"
            } else {
                "VXLAN"
            }
        )
    });
    if f.node.no_deliver {
        // to_stack_from_bridge: CONFIG_NO_DELIVER, before anything else.
        h = h
            .counter("pass_stack")
            .says("--deliver stack: encap hands every pod packet for a remote pod to the node's stack");
        let mut hops = vec![h];
        hops.extend(node_to_remote_pod(f, fam, src, dst, p, notes));
        return hops;
    }
    let hop = send(f, fam, h, p, direct, true);
    let mut hops = vec![hop];
    if !matches!(hops[0].action, Action::Drop) {
        hops.push(remote_accepts(f, fam, src, our, p, direct, notes));
    }
    hops
}

/// `route_and_send`: the FIB's next hop to the member, then bare or VXLAN. `from_bridge`: seen
/// on the bridge (a router hop, TTL checked), not on `overlay0`'s egress.
fn send(f: &Facts, fam: &Fam, mut h: Hop, p: &PeerFact, direct: bool, from_bridge: bool) -> Hop {
    match f.route(p.public_ip) {
        Err(e) => {
            h.action = Action::Drop;
            h.counters = vec!["drop_no_route"];
            return h.says(format!(
                "no underlay route to the member's PublicIP {} ({e}): the packet is dropped",
                p.public_ip
            ));
        }
        Ok(r) => {
            h = h.says(format!("underlay route to {}: {}", p.public_ip, route_text(r)));
            h.route = Some(r.clone());
        }
    }
    let next = h.route.as_ref().and_then(|r| r.via).unwrap_or(p.public_ip);
    let out_dev = h
        .route
        .as_ref()
        .map_or("the underlay".to_string(), |r| r.dev.clone());
    if from_bridge {
        h = h
            .unless("marked by the agent's nftables rule (a connection the node destination-NATed, br_netfilter on): to the stack (pass_nat)")
            .unless(format!(
                "a flow recorded in OVL_STACK_FLOWS{} (a new connection on the ports of a NATed one): to the stack (pass_conntrack)",
                if fam.v6 { "6" } else { "" }
            ));
    }
    let mtu = if fam.v6 {
        f.node.inner_mtu6
    } else {
        f.node.inner_mtu
    };
    if direct {
        h.action = Action::Direct;
        h.counters.push(fam.direct());
        h = h.says(format!(
            "sent bare (no outer header) to next hop {next} on {out_dev}{}",
            if from_bridge {
                format!(", {} − 1", fam.ttl())
            } else {
                String::new()
            }
        ));
        if f.node.host_gw {
            h.mtu = Some(mtu);
            h = h.says(format!("MTU {mtu}: the underlay's (host-gw adds no header)"));
        } else {
            h = h.says("DirectRouting: the member shares our underlay segment; no tunnel MTU check");
        }
    } else {
        h.action = Action::Encap;
        h.counters.push(fam.encap());
        let (our, csum) = match (fam.v6, f.node.public_ip6) {
            (true, Some(a)) => (IpAddr::V6(a), "computed (IPv6 requires it)"),
            (true, None) => (IpAddr::V6(Ipv6Addr::UNSPECIFIED), "computed (IPv6 requires it)"),
            (false, _) => (IpAddr::V4(f.node.public_ip), "0 (none, as flannel.1)"),
        };
        let o = Outer {
            src: our,
            dst: p.public_ip,
            udp_src_port: "32768-60999 (from the flow hash)",
            udp_dst_port: f.node.port,
            vni: f.node.vni,
            udp_checksum: csum,
            inner_src_mac: MacAddr(if fam.v6 { f.node.vtep_mac6 } else { f.node.vtep_mac }).to_string(),
            inner_dst_mac: MacAddr(p.vtep_mac).to_string(),
        };
        h = h.says(format!(
            "outer {} → {}, UDP {} → {}, VNI {}, UDP checksum {}; inner MAC {} → {} (the member's VtepMAC); redirected out of {out_dev} to next hop {next}",
            o.src,
            o.dst,
            o.udp_src_port,
            o.udp_dst_port,
            o.vni,
            o.udp_checksum,
            o.inner_src_mac,
            o.inner_dst_mac,
        ));
        h.outer = Some(o);
        h.mtu = Some(mtu);
        h = h
            .says(format!(
                "MTU {mtu} (the underlay's − {}): larger packets go to the stack (pass_too_big), which answers {}",
                if fam.v6 { 70 } else { 50 },
                fam.too_big()
            ))
            .unless(format!("larger than {mtu}: to the stack (pass_too_big)"));
        if from_bridge {
            h = h.says(format!("{} − 1 (a router hop, as with flannel.1)", fam.ttl()));
        }
    }
    if from_bridge {
        h = h.unless(format!(
            "{} ≤ 1: to the stack (pass_ttl), which answers Time Exceeded",
            fam.ttl()
        ));
    }
    h
}

/// What the member must hold to accept what we send it (its maps are not ours to read).
fn remote_accepts(
    f: &Facts,
    fam: &Fam,
    src: IpAddr,
    our: IpNet,
    p: &PeerFact,
    direct: bool,
    notes: &mut Vec<String>,
) -> Hop {
    let our_ip = f.our_public_ip(fam.v6);
    let our_ip_s = our_ip.map_or("our PublicIP".into(), |a| a.to_string());
    let at = format!("node {}", p.public_ip);
    let h = if direct && f.node.host_gw {
        Hop::new(&at, "tc ingress on its underlay NIC (overlay_decap_tc, host-gw)", Action::Remote)
            .counter(fam.deliver())
            .says(format!(
                "delivers it straight into the pod if {src} lies in a member's subnet there ({our} for {our_ip_s}: it does when it has our lease) \
                 and the frame's Ethernet source is the MAC its neighbour table has for {our_ip_s} (else drop_wrong_sender; unresolved: its stack, pass_unverified)"
            ))
            .unless("not a pod it has learned, or its --deliver stack: its stack routes it")
    } else if direct {
        Hop::new(&at, "its underlay NIC", Action::Remote)
            .says("a bare packet is not VXLAN: its decap passes it (pass_decap) and its stack routes it to the pod")
            .counter("pass_decap")
    } else {
        Hop::new(&at, "decap on its underlay NIC (xdp or tc)", Action::Remote)
            .counter(fam.decap())
            .says(format!(
                "accepts it if its sender table ({}) names {our} for {our_ip_s} (it does when it has our lease), its VNI is {} and its VtepMAC is {}",
                fam.vteps(),
                f.node.vni,
                MacAddr(p.vtep_mac)
            ))
            .says("then delivers it straight into the pod when the pod is in its endpoint map, else its stack routes it")
            .unless("no sender entry for us: drop_unknown_peer; one naming another subnet: drop_spoofed_source; another VNI: drop_wrong_vni; another VtepMAC: drop_inner_mac")
    };
    if f.lease.read {
        if f.lease.subnets.contains(&our) {
            notes.push(format!("our lease {our} is in {}", f.lease.file.display()));
        } else {
            notes.push(format!(
                "{} names no lease of ours holding {src}: the member drops it (drop_spoofed_source) unless its sender table names a subnet holding {src} for {our_ip_s}",
                f.lease.file.display()
            ));
        }
    } else {
        notes.push(format!(
            "{} could not be read: whether this node holds its lease is not known here",
            f.lease.file.display()
        ));
    }
    h
}

/// SRC this node, DST a remote pod: the stack routes it; vxlan: via `overlay0`, whose egress
/// encap sends it.
fn node_to_remote_pod(
    f: &Facts,
    fam: &Fam,
    src: IpAddr,
    dst: IpAddr,
    p: &PeerFact,
    notes: &mut Vec<String>,
) -> Vec<Hop> {
    let mut hops = Vec::new();
    let r = route_hop(f, dst, Action::Stack);
    let via_host = r.route.as_ref().is_some_and(|r| r.dev == HOST_DEVICE);
    let inner_src = r.route.as_ref().and_then(|r| r.src);
    hops.push(r);
    if f.node.host_gw {
        let last = hops.last_mut().expect("one hop");
        *last = last.clone().says(format!(
            "host-gw: the stack sends it bare to the member {} by the agent's route for {}{}",
            p.public_ip,
            p.subnet,
            match &f.hooks.recorder {
                Some(h) => format!("; {h} records its flow so the reply takes the stack"),
                None => String::new(),
            }
        ));
        return hops;
    }
    if !via_host {
        let last = hops.last_mut().expect("one hop");
        *last = last.clone().says(format!(
            "not via {HOST_DEVICE}: the overlay does not carry it (the agent routes the cluster network via {HOST_DEVICE})"
        ));
        return hops;
    }
    let Some(hook) = f.hooks.host_encap.clone() else {
        hops.push(
            Hop::new(
                HERE,
                not_attached(&format!("encap on {HOST_DEVICE}'s egress")),
                Action::Drop,
            )
            .says(format!(
                "nothing encapsulates what leaves {HOST_DEVICE}: it is lost"
            )),
        );
        return hops;
    };
    let h = Hop::new(HERE, hook, Action::Stack).says(format!(
        "{} has {} → member {}; the flow's reply is recorded in OVL_STACK_FLOWS{} so it takes the stack here",
        fam.peers(),
        p.subnet,
        p.public_ip,
        if fam.v6 { "6" } else { "" }
    ));
    let mut h = send(f, fam, h, p, p.direct, false);
    h.peer = Some(PeerView::of(p));
    let dropped = h.action == Action::Drop;
    hops.push(h);
    if !dropped {
        let our = inner_src
            .and_then(|s| f.our_subnet(fam.v6).filter(|n| n.contains(&s)))
            .or(f.our_subnet(fam.v6));
        if let Some(our) = our {
            hops.push(remote_accepts(
                f,
                fam,
                inner_src.unwrap_or(src),
                our,
                p,
                p.direct,
                notes,
            ));
        }
    }
    hops
}

/// SRC a local pod, DST not a remote pod: no peer entry, encap passes it to the stack.
fn pod_to_non_pod(f: &Facts, fam: &Fam, dst: IpAddr, rd: &Role) -> Vec<Hop> {
    let hook = f
        .hooks
        .bridge_encap
        .clone()
        .unwrap_or_else(|| not_attached("encap on the pod bridge"));
    let attached = f.hooks.bridge_encap.is_some();
    let mut h = Hop::new(HERE, hook, Action::Stack);
    if attached {
        h = h.counter("pass_encap").says(format!(
            "{} has no subnet holding {dst}: encap hands it to the node's stack",
            fam.peers()
        ));
    }
    let vxlan_note = format!(
        "UDP to port {} of a member's PublicIP or ours: dropped (drop_pod_vxlan)",
        f.node.port
    );
    let masq = |h: Hop| {
        match f.lease.ip_masq {
        Some(true) => h.says("--ip-masq (FLANNEL_IPMASQ=true): masqueraded to the node's address as it leaves the cluster network"),
        Some(false) => h.says("no --ip-masq (FLANNEL_IPMASQ=false): it leaves with the pod's address"),
        None => h,
    }
    };
    match rd {
        Role::Unleased(n) => {
            h.action = Action::Refused;
            let mut h = h.says(format!(
                "{dst} is in the cluster network {n} but no member holds its subnet (no lease, or a lease this node refused): \
                 nothing carries it, likely unreachable"
            ));
            match f.route(dst) {
                Ok(r) => {
                    h = h.says(format!("the stack's route: {}", route_text(r)));
                    if r.dev == HOST_DEVICE {
                        h = h.says(format!(
                            "encap on {HOST_DEVICE}'s egress finds no peer either (pass_encap): the packet is lost"
                        ));
                    }
                    h.route = Some(r.clone());
                }
                Err(e) => h = h.says(format!("the stack has no route to it ({e})")),
            }
            vec![h]
        }
        Role::Node(iface) => vec![h
            .says(format!("the stack delivers it to this node ({iface})"))
            .unless(vxlan_note)],
        Role::Member => {
            let h = masq(h.unless(vxlan_note));
            let mut r = route_hop(f, dst, Action::Stack);
            r.says.insert(
                0,
                "a member node's address: not the overlay's, the underlay carries it".into(),
            );
            vec![h, r]
        }
        _ => {
            let h = masq(h);
            vec![
                h,
                route_hop(f, dst, Action::Stack).says("outside the cluster network: not the overlay's"),
            ]
        }
    }
}

/// This node receives from a remote pod.
fn receive_from_pod(
    f: &Facts,
    fam: &Fam,
    src: IpAddr,
    dst: IpAddr,
    p: &PeerFact,
    ep: Option<&EndpointFact>,
) -> Vec<Hop> {
    let our_ip = f.our_public_ip(fam.v6);
    let our_ip_s = our_ip.map_or("our PublicIP".into(), |a| a.to_string());
    let direct = p.direct || f.node.host_gw;
    let sender = Hop::new(
        format!("node {}", p.public_ip),
        "encap on its pod bridge",
        Action::Remote,
    )
    .says(if direct {
        format!("sends it bare to {our_ip_s} (when its peer table has our lease)")
    } else {
        format!(
            "encapsulates it {} → {our_ip_s}, UDP → {}, VNI {} (when its peer table has our lease)",
            p.public_ip, f.node.port, f.node.vni
        )
    })
    .counter(if direct { fam.direct() } else { fam.encap() });
    let mut hops = vec![sender];
    let underlay = &f.node.underlay;
    if direct {
        let hook = f
            .hooks
            .decap_tc
            .clone()
            .unwrap_or_else(|| not_attached(&format!("tc ingress on {underlay}")));
        let mut h = Hop::new(HERE, hook, Action::Stack);
        if !(f.node.host_gw && f.node.bare_fast) || f.hooks.decap_tc.is_none() {
            h = h.counter("pass_decap").says(
                "a bare pod packet is not VXLAN: decap passes it to the stack, which routes it to the bridge",
            );
            if f.node.host_gw {
                h = h.says("host-gw without the recorder attached: bare packets are not delivered straight");
            }
            hops.push(h);
            return hops;
        }
        h = h.says(format!(
            "host-gw: {src} lies in {}, the member {}'s subnet ({}); the frame must come from the MAC our neighbour table has for {} \
             (else drop_wrong_sender; unresolved: the stack, pass_unverified)",
            p.subnet,
            p.public_ip,
            fam.peers(),
            p.public_ip
        ));
        hops.push(deliver(f, fam, h, dst, ep, false));
        return hops;
    }
    let Some(decap) = f.hooks.decap.clone() else {
        hops.push(
            Hop::new(HERE, not_attached(&format!("decap on {underlay}")), Action::Stack)
                .says("no decap program: the VXLAN packet goes to the stack, which has no socket on the port for it"),
        );
        return hops;
    };
    let xdp = decap.starts_with("xdp");
    let mut h = Hop::new(HERE, decap, Action::Decap);
    match f.senders.iter().find(|(a, _)| *a == p.public_ip) {
        None => {
            h.action = Action::Drop;
            h.counters = vec!["drop_unknown_peer"];
            hops.push(h.says(format!(
                "{} has no entry for {}: VXLAN from it is dropped",
                fam.vteps(),
                p.public_ip
            )));
            return hops;
        }
        Some((_, net)) if !net.contains(&src) => {
            h.action = Action::Drop;
            h.counters = vec!["drop_spoofed_source"];
            hops.push(h.says(format!(
                "{} names {net} for {}, which does not hold {src}: dropped",
                fam.vteps(),
                p.public_ip
            )));
            return hops;
        }
        Some((_, net)) => {
            h = h.counter(fam.decap()).says(format!(
                "outer source {} is a member: {} names {net} for it, which holds {src}; VNI {} and inner destination MAC {} (our VtepMAC) are checked; \
                 the outer headers are stripped",
                p.public_ip,
                fam.vteps(),
                f.node.vni,
                MacAddr(if fam.v6 { f.node.vtep_mac6 } else { f.node.vtep_mac })
            ));
            h = h.unless("another VNI: drop_wrong_vni; another inner MAC: drop_inner_mac; a first fragment to our port: drop_fragment");
        }
    }
    hops.push(h);
    let h = if xdp {
        Hop::new(
            HERE,
            f.hooks
                .decap_tc
                .clone()
                .unwrap_or_else(|| not_attached(&format!("tc ingress on {underlay}"))),
            Action::Stack,
        )
        .says("XDP marked what it stripped; after GRO the TC program delivers it")
    } else {
        Hop::new(HERE, "the same program (tc decap)", Action::Stack)
    };
    hops.push(deliver(f, fam, h, dst, ep, xdp));
    hops
}

/// `deliver_checked`: straight into a known pod, else the stack.
fn deliver(f: &Facts, fam: &Fam, mut h: Hop, dst: IpAddr, ep: Option<&EndpointFact>, after_xdp: bool) -> Hop {
    let stack = |h: Hop, why: String| {
        let h = h.says(format!("{why}: the stack routes it"));
        if after_xdp {
            h.counter("xdp_decap_to_stack")
        } else {
            h
        }
    };
    if f.node.no_deliver {
        return stack(h, "--deliver stack".into());
    }
    let Some(e) = ep else {
        return stack(h, format!("{dst} is not in {}", fam.endpoints()));
    };
    if e.device != Some(e.ifindex) {
        return stack(
            h,
            format!(
                "{dst}'s veth (ifindex {}) has no entry in the device map (it is gone)",
                e.ifindex
            ),
        );
    }
    h.action = Action::Deliver;
    h.counters.push(fam.deliver());
    h = h
        .says(format!(
            "{} has {dst} on {}: {}, {} − 1",
            fam.endpoints(),
            veth_name(e),
            if f.node.via_veth {
                "bpf_redirect to the veth (--deliver veth)"
            } else {
                "bpf_redirect_peer straight into the pod"
            },
            fam.ttl()
        ))
        .unless(format!(
            "{} ≤ 1, a recorded NATed flow (pass_conntrack), a fragment (pass_fragment) or an ICMP error (pass_icmp_error): the stack",
            fam.ttl()
        ));
    h
}

/// SRC a vxlan member's PublicIP, DST a local pod: the member's stack routes it through its
/// `overlay0` from `overlay0`'s address (its subnet's network address; the agent's postrouting
/// rule masquerades other sources outside the cluster network to it), which our decap accepts
/// as from its subnet.
fn member_node_to_pod(f: &Facts, fam: &Fam, src: IpAddr, dst: IpAddr, ep: Option<&EndpointFact>) -> Vec<Hop> {
    let Some(p) = f.peers.iter().find(|p| p.public_ip == src) else {
        return vec![unencapsulated_in(f, fam, src)];
    };
    let inner = p.subnet.network();
    let mut hops = vec![Hop::new(format!("node {src}"), "its stack and overlay0", Action::Remote).says(format!(
        "a member's own packet to our pods leaves its {HOST_DEVICE} from {inner}, the address the agent gives \
         {HOST_DEVICE} in its subnet {} (the route's source; its postrouting rule masquerades any other source \
         outside the cluster network to it): the packet this node receives is from {inner}",
        p.subnet
    ))];
    let mut rest = receive_from_pod(f, fam, inner, dst, p, ep);
    // The member's encap is on its overlay0's egress, not its bridge.
    if let Some(first) = rest.first_mut() {
        first.hook = format!("encap on its {HOST_DEVICE}'s egress");
    }
    hops.extend(rest);
    hops
}

/// SRC not a pod of the network (or an unknown one), DST a local pod: not VXLAN.
fn unencapsulated_in(f: &Facts, _fam: &Fam, src: IpAddr) -> Hop {
    let hook = f
        .hooks
        .decap_tc
        .clone()
        .or(f.hooks.decap.clone())
        .unwrap_or_else(|| not_attached(&format!("decap on {}", f.node.underlay)));
    Hop::new(HERE, hook, Action::Stack)
        .counter("pass_decap")
        .says(format!(
            "{src} is no member's pod: such a packet arrives bare, decap passes it to the stack, which routes it to the bridge"
        ))
        .unless("VXLAN carrying it from a member is dropped (drop_spoofed_source: not in that member's subnet; drop_unknown_peer: not a member)")
}

// ---------------------------------------------------------------------------------------------
// Reading the node.
// ---------------------------------------------------------------------------------------------

/// Reads the node: the pinned maps and links under `pin_root` (as `status`), subnet.env, the
/// node's addresses and the routes to `src`, `dst` and the members that hold them.
pub fn gather(pin_root: &Path, subnet_file: &Path, src: IpAddr, dst: IpAddr) -> Result<Facts, ExplainError> {
    let st = status::read(pin_root)?;
    let c = pinned::read_config(pin_root)?;
    let c6 = if pinned::is_pinned(pin_root, maps::CONFIG6) {
        Some(pinned::read_config6(pin_root)?).filter(|c| c.flags & maps::CONFIG6_READY != 0)
    } else {
        None
    };
    let underlay = nix::net::if_::if_indextoname(c.underlay_ifindex)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("ifindex {}", c.underlay_ifindex));
    let node = NodeFacts {
        ready: c.flags & CONFIG_READY != 0,
        host_gw: c.flags & CONFIG_HOST_GW != 0,
        bare_fast: c.flags & CONFIG_BARE_FAST != 0,
        no_deliver: c.flags & CONFIG_NO_DELIVER != 0,
        via_veth: c.flags & CONFIG_DELIVER_VIA_VETH != 0,
        public_ip: c.public_ip.into(),
        public_ip6: c6.map(|c| c.public_ip.into()),
        vni: c.vni,
        port: c.port,
        vtep_mac: c.vtep_mac,
        vtep_mac6: c6.map_or([0; 6], |c| c.vtep_mac),
        inner_mtu: c.inner_mtu,
        inner_mtu6: c6.map_or(0, |c| c.inner_mtu),
        underlay,
    };
    let peers: Vec<PeerFact> = st
        .peers
        .iter()
        .filter_map(|p| {
            Some(PeerFact {
                subnet: p.subnet,
                public_ip: p.public_ip,
                vtep_mac: p.vtep_mac.parse::<MacAddr>().ok()?.0,
                direct: p.mode == "direct",
            })
        })
        .collect();
    let mut senders: Vec<(IpAddr, IpNet)> = pinned::read_senders::<V4>(pin_root)?
        .into_iter()
        .map(|(a, n)| (a.into(), n.into()))
        .collect();
    if pinned::is_pinned(pin_root, maps::VTEPS6) {
        senders.extend(
            pinned::read_senders::<V6>(pin_root)?
                .into_iter()
                .map(|(a, n)| (a.into(), n.into())),
        );
    }
    let endpoints = st
        .endpoints
        .iter()
        .map(|e| EndpointFact {
            ip: e.ip,
            ifindex: e.ifindex,
            iface: e.iface.clone(),
            device: match e.ip {
                IpAddr::V4(a) => pinned::endpoint_device::<V4>(pin_root, a, e.ifindex),
                IpAddr::V6(a) => pinned::endpoint_device::<V6>(pin_root, a, e.ifindex),
            },
        })
        .collect();
    let lease = read_lease(subnet_file);
    let local_addrs = nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs
                .filter_map(|a| {
                    let s = a.address?;
                    let ip = if let Some(v4) = s.as_sockaddr_in() {
                        IpAddr::V4(v4.ip())
                    } else {
                        IpAddr::V6(s.as_sockaddr_in6()?.ip())
                    };
                    Some((ip, a.interface_name))
                })
                .collect()
        })
        .unwrap_or_default();
    let hooks = hooks_of(&st.attachments, &node.underlay);
    let mut f = Facts {
        node,
        peers,
        senders,
        endpoints,
        lease,
        local_addrs,
        hooks,
        routes: BTreeMap::new(),
    };
    let mut wanted = vec![src, dst];
    wanted.extend(
        [src, dst]
            .iter()
            .filter_map(|a| f.peer_for(*a))
            .map(|p| p.public_ip),
    );
    for ip in wanted {
        let r = netlink::route_to(ip).map(|r| RouteFact {
            dev: nix::net::if_::if_indextoname(r.oif)
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|_| format!("ifindex {}", r.oif)),
            via: r.gateway,
            src: r.src,
        });
        f.routes.insert(ip, r);
    }
    Ok(f)
}

fn read_lease(path: &Path) -> LeaseFacts {
    let Ok(text) = std::fs::read_to_string(path) else {
        return LeaseFacts {
            file: path.to_path_buf(),
            ..LeaseFacts::default()
        };
    };
    let key = subnet_env::parse_previous_subnets(&text);
    let ip_masq = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("FLANNEL_IPMASQ="))
        .map(|v| v.trim().trim_matches('"') == "true")
        .next_back();
    LeaseFacts {
        file: path.to_path_buf(),
        read: true,
        networks: subnet_env::parse_networks(&text),
        subnets: key
            .ipv4
            .map(IpNet::V4)
            .into_iter()
            .chain(key.ipv6.map(IpNet::V6))
            .collect(),
        ip_masq,
    }
}

/// Our hooks as phrases, from `status`'s attachments.
pub fn hooks_of(attachments: &[AttachmentView], underlay: &str) -> Hooks {
    let phrase = |a: &AttachmentView| {
        let dir = match (a.hook.as_str(), a.direction) {
            ("xdp", _) => format!("xdp{}", a.xdp_mode.map(|m| format!(" ({m})")).unwrap_or_default()),
            (_, Some(d)) => format!("tc {d}"),
            (h, None) => h.to_string(),
        };
        let gone = if a.iface_present {
            ""
        } else {
            ", defunct: the interface is gone"
        };
        format!("{dir} on {} ({}{gone})", a.iface, a.program)
    };
    let find =
        |pred: &dyn Fn(&AttachmentView) -> bool| attachments.iter().find(|a| a.ours && pred(a)).map(phrase);
    Hooks {
        bridge_encap: find(&|a| a.program == programs::ENCAP && a.iface != HOST_DEVICE),
        // `status` tells the two links on `overlay0` (one program) by the pin's name only: the
        // resegmenting one is pinned as RESEG_LINK; clsact filters carry their direction.
        host_encap: attachments
            .iter()
            .find(|a| {
                let reseg = a.pin.as_ref().and_then(|p| p.file_name()).is_some_and(|n| {
                    n.to_string_lossy()
                        .starts_with(&format!("{}@", dataplane::RESEG_LINK))
                });
                a.ours
                    && a.program == programs::ENCAP
                    && a.iface == HOST_DEVICE
                    && !reseg
                    && (a.pin.is_some() || a.direction == Some("egress"))
            })
            .map(|a| {
                let gone = if a.iface_present {
                    ""
                } else {
                    ", defunct: the interface is gone"
                };
                format!("tc egress on {} ({}{gone})", a.iface, a.program)
            }),
        decap: find(&|a| a.program == programs::DECAP_XDP && a.iface == underlay)
            .or_else(|| find(&|a| a.program == programs::DECAP_TC && a.iface == underlay)),
        decap_tc: find(&|a| a.program == programs::DECAP_TC && a.iface == underlay),
        recorder: find(&|a| a.program == programs::RECORD && a.iface == underlay),
    }
}

impl Explanation {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("Explanation always serializes")
    }

    /// Human-readable form: one block per hop.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{}", self.summary);
        let _ = writeln!(s, "  src {}: {}", self.src, self.src_is);
        let _ = writeln!(s, "  dst {}: {}", self.dst, self.dst_is);
        let _ = writeln!(s, "  {} over {}", self.family, self.backend);
        for (i, h) in self.hops.iter().enumerate() {
            let _ = writeln!(s, "\n{}. {} — {}: {}", i + 1, h.at, h.hook, h.action.label());
            for line in &h.says {
                let _ = writeln!(s, "   {line}");
            }
            if !h.counters.is_empty() {
                let _ = writeln!(s, "   counts: {}", h.counters.join(", "));
            }
            for u in &h.unless {
                let _ = writeln!(s, "   unless {u}");
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(s);
            for n in &self.notes {
                let _ = writeln!(s, "note: {n}");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn route(dev: &str, via: Option<&str>, src: Option<&str>) -> Result<RouteFact, String> {
        Ok(RouteFact {
            dev: dev.into(),
            via: via.map(ip),
            src: src.map(ip),
        })
    }

    /// Node 198.18.0.11 holding 10.244.1.0/24 and fd00:10:244:1::/64, one member 198.18.0.12
    /// with 10.244.2.0/24 and fd00:10:244:2::/64, one local pod .2 of each family; vxlan, TC
    /// decap, everything attached.
    fn facts() -> Facts {
        let mut routes = BTreeMap::new();
        for (to, r) in [
            ("198.18.0.12", route("eth0", None, Some("198.18.0.11"))),
            ("fd00:198:18::12", route("eth0", None, Some("fd00:198:18::11"))),
            ("10.244.2.2", route(HOST_DEVICE, None, Some("10.244.1.0"))),
            (
                "fd00:10:244:2::2",
                route(HOST_DEVICE, None, Some("fd00:10:244:1::")),
            ),
            ("10.244.1.2", route("cni0", None, Some("10.244.1.1"))),
            (
                "203.0.113.9",
                route("eth0", Some("198.18.0.1"), Some("198.18.0.11")),
            ),
            ("10.244.9.2", route(HOST_DEVICE, None, Some("10.244.1.0"))),
        ] {
            routes.insert(ip(to), r);
        }
        Facts {
            node: NodeFacts {
                ready: true,
                host_gw: false,
                bare_fast: false,
                no_deliver: false,
                via_veth: false,
                public_ip: Ipv4Addr::new(198, 18, 0, 11),
                public_ip6: Some("fd00:198:18::11".parse().unwrap()),
                vni: 1,
                port: 8472,
                vtep_mac: [2, 0, 0, 0, 0, 0x11],
                vtep_mac6: [2, 0, 0, 0, 6, 0x11],
                inner_mtu: 1450,
                inner_mtu6: 1430,
                underlay: "eth0".into(),
            },
            peers: vec![
                PeerFact {
                    subnet: net("10.244.2.0/24"),
                    public_ip: ip("198.18.0.12"),
                    vtep_mac: [2, 0, 0, 0, 0, 0x12],
                    direct: false,
                },
                PeerFact {
                    subnet: net("fd00:10:244:2::/64"),
                    public_ip: ip("fd00:198:18::12"),
                    vtep_mac: [2, 0, 0, 0, 6, 0x12],
                    direct: false,
                },
            ],
            senders: vec![
                (ip("198.18.0.12"), net("10.244.2.0/24")),
                (ip("fd00:198:18::12"), net("fd00:10:244:2::/64")),
            ],
            endpoints: ["10.244.1.2", "fd00:10:244:1::2"]
                .iter()
                .map(|a| EndpointFact {
                    ip: ip(a),
                    ifindex: 7,
                    iface: Some("veth1".into()),
                    device: Some(7),
                })
                .collect(),
            lease: LeaseFacts {
                file: "/run/flannel/subnet.env".into(),
                read: true,
                networks: vec![net("10.244.0.0/16"), net("fd00:10:244::/56")],
                subnets: vec![net("10.244.1.0/24"), net("fd00:10:244:1::/64")],
                ip_masq: Some(true),
            },
            local_addrs: vec![
                (ip("198.18.0.11"), "eth0".into()),
                (ip("10.244.1.1"), "cni0".into()),
                (ip("10.244.1.0"), HOST_DEVICE.into()),
            ],
            hooks: Hooks {
                bridge_encap: Some("tc ingress on cni0 (overlay_encap)".into()),
                host_encap: Some("tc egress on overlay0 (overlay_encap)".into()),
                decap: Some("tc ingress on eth0 (overlay_decap_tc)".into()),
                decap_tc: Some("tc ingress on eth0 (overlay_decap_tc)".into()),
                recorder: None,
            },
            routes,
        }
    }

    /// Every counter the hops at this node name.
    fn here(e: &Explanation) -> Vec<&'static str> {
        e.hops
            .iter()
            .filter(|h| h.at == HERE)
            .flat_map(|h| h.counters.clone())
            .collect()
    }

    #[test]
    fn bad_arguments_are_named() {
        let e = parse_addrs("10.244.1.2", "pod-b").unwrap_err().to_string();
        assert!(e.starts_with("DST \"pod-b\" is not an IP address"), "{e}");
        let e = parse_addrs("10.244.1.256", "10.244.2.2").unwrap_err().to_string();
        assert!(e.starts_with("SRC "), "{e}");
        let e = parse_addrs("10.244.1.2", "fd00::2").unwrap_err().to_string();
        assert!(e.contains("different families"), "{e}");
        assert_eq!(
            parse_addrs(" fd00::1", "fd00::2").unwrap(),
            (ip("fd00::1"), ip("fd00::2"))
        );
    }

    #[test]
    fn local_pod_to_remote_pod_is_encapsulated_with_flannels_header() {
        let f = facts();
        let e = explain(&f, ip("10.244.1.2"), ip("10.244.2.2"));
        assert_eq!(e.verdict, Action::Encap, "{}", e.render());
        assert_eq!(here(&e), ["encap_packets"]);
        let h = &e.hops[0];
        assert_eq!(h.hook, "tc ingress on cni0 (overlay_encap)");
        let o = h.outer.as_ref().expect("an outer header");
        assert_eq!((o.src, o.dst), (ip("198.18.0.11"), ip("198.18.0.12")));
        assert_eq!((o.udp_dst_port, o.vni), (8472, 1));
        assert!(o.udp_src_port.starts_with("32768-60999"));
        assert!(o.udp_checksum.starts_with('0'));
        assert_eq!(o.inner_dst_mac, "02:00:00:00:00:12");
        assert_eq!(h.mtu, Some(1450));
        assert_eq!(h.route.as_ref().unwrap().dev, "eth0");
        assert!(h.unless.iter().any(|u| u.contains("pass_ttl")));
        assert!(h.unless.iter().any(|u| u.contains("pass_too_big")));
        let r = &e.hops[1];
        assert_eq!(r.at, "node 198.18.0.12");
        assert_eq!(r.counters, ["decap_packets"]);
        assert!(
            r.says[0].contains("names 10.244.1.0/24 for 198.18.0.11"),
            "{:?}",
            r.says
        );
        assert!(e.notes.iter().any(|n| n.contains("our lease 10.244.1.0/24")));
    }

    #[test]
    fn ipv6_uses_the_6_maps_and_a_checksum() {
        let f = facts();
        let e = explain(&f, ip("fd00:10:244:1::2"), ip("fd00:10:244:2::2"));
        assert_eq!(e.verdict, Action::Encap, "{}", e.render());
        assert_eq!(here(&e), ["encap6_packets"]);
        let o = e.hops[0].outer.as_ref().unwrap();
        assert_eq!((o.src, o.dst), (ip("fd00:198:18::11"), ip("fd00:198:18::12")));
        assert!(o.udp_checksum.starts_with("computed"));
        assert_eq!(o.inner_src_mac, "02:00:00:00:06:11");
        assert_eq!(e.hops[0].mtu, Some(1430));
        assert!(e.hops[0].says[0].starts_with("OVL_PEERS6 has fd00:10:244:2::/64"));
        assert_eq!(e.hops[1].counters, ["decap6_packets"]);
    }

    #[test]
    fn deliver_stack_hands_it_to_the_stack_and_overlay0_sends_it() {
        let mut f = facts();
        f.node.no_deliver = true;
        let e = explain(&f, ip("10.244.1.2"), ip("10.244.2.2"));
        assert_eq!(here(&e), ["pass_stack", "encap_packets"], "{}", e.render());
        assert_eq!(e.hops[1].route.as_ref().unwrap().dev, HOST_DEVICE);
        assert_eq!(e.hops[2].hook, "tc egress on overlay0 (overlay_encap)");
    }

    #[test]
    fn no_member_for_the_subnet_is_refused() {
        let f = facts();
        let e = explain(&f, ip("10.244.1.2"), ip("10.244.9.2"));
        assert_eq!(e.verdict, Action::Refused, "{}", e.render());
        assert_eq!(here(&e), ["pass_encap"]);
        assert!(e.dst_is.contains("no member holds"), "{}", e.dst_is);
    }

    #[test]
    fn no_route_to_the_member_drops() {
        let mut f = facts();
        f.routes
            .insert(ip("198.18.0.12"), Err("Network unreachable".into()));
        let e = explain(&f, ip("10.244.1.2"), ip("10.244.2.2"));
        assert_eq!(e.verdict, Action::Drop, "{}", e.render());
        assert_eq!(here(&e), ["drop_no_route"]);
        assert_eq!(e.hops.len(), 1, "nothing reaches the member");
    }

    #[test]
    fn direct_routing_and_host_gw_send_bare() {
        let mut f = facts();
        f.peers[0].direct = true;
        let e = explain(&f, ip("10.244.1.2"), ip("10.244.2.2"));
        assert_eq!((e.verdict, here(&e)), (Action::Direct, vec!["direct_packets"]));
        assert!(e.hops[0].outer.is_none());
        assert_eq!(
            e.hops[1].counters,
            ["pass_decap"],
            "a vxlan member stacks bare packets"
        );

        let mut f = facts();
        f.node.host_gw = true;
        f.node.bare_fast = true;
        f.node.inner_mtu = 1500;
        let e = explain(&f, ip("10.244.1.2"), ip("10.244.2.2"));
        assert_eq!((e.verdict, here(&e)), (Action::Direct, vec!["direct_packets"]));
        assert_eq!(e.hops[0].mtu, Some(1500));
        assert_eq!(e.hops[1].counters, ["deliver_packets"]);
        assert!(e.hops[1].says[0].contains("neighbour table has for 198.18.0.11"));
        assert_eq!(e.backend, "host-gw");
    }

    #[test]
    fn receiving_checks_the_sender_table_then_delivers() {
        let f = facts();
        let e = explain(&f, ip("10.244.2.2"), ip("10.244.1.2"));
        assert_eq!(e.verdict, Action::Deliver, "{}", e.render());
        assert_eq!(here(&e), ["decap_packets", "deliver_packets"]);
        assert_eq!(e.hops[0].at, "node 198.18.0.12");
        assert!(e.hops[2].says[0].contains("veth1 (ifindex 7)"));
        assert!(e.hops[2].says[0].contains("bpf_redirect_peer"));

        let e = explain(&f, ip("fd00:10:244:2::2"), ip("fd00:10:244:1::2"));
        assert_eq!(here(&e), ["decap6_packets", "deliver6_packets"]);

        let mut g = facts();
        g.senders.clear();
        let e = explain(&g, ip("10.244.2.2"), ip("10.244.1.2"));
        assert_eq!((e.verdict, here(&e)), (Action::Drop, vec!["drop_unknown_peer"]));

        let mut g = facts();
        g.senders[0].1 = net("10.244.3.0/24");
        let e = explain(&g, ip("10.244.2.2"), ip("10.244.1.2"));
        assert_eq!((e.verdict, here(&e)), (Action::Drop, vec!["drop_spoofed_source"]));

        let mut g = facts();
        g.endpoints[0].device = None;
        let e = explain(&g, ip("10.244.2.2"), ip("10.244.1.2"));
        assert_eq!((e.verdict, here(&e)), (Action::Stack, vec!["decap_packets"]));

        let mut g = facts();
        g.hooks.decap = Some("xdp (driver) on eth0 (overlay_decap_xdp)".into());
        let e = explain(&g, ip("10.244.2.2"), ip("10.244.1.3"));
        assert_eq!(
            here(&e),
            ["decap_packets", "xdp_decap_to_stack"],
            "{}",
            e.render()
        );

        let mut g = facts();
        g.node.no_deliver = true;
        let e = explain(&g, ip("10.244.2.2"), ip("10.244.1.2"));
        assert_eq!((e.verdict, here(&e)), (Action::Stack, vec!["decap_packets"]));

        let mut g = facts();
        g.node.host_gw = true;
        let e = explain(&g, ip("10.244.2.2"), ip("10.244.1.2"));
        assert_eq!(
            (e.verdict, here(&e)),
            (Action::Stack, vec!["pass_decap"]),
            "host-gw without the recorder"
        );
        g.node.bare_fast = true;
        let e = explain(&g, ip("10.244.2.2"), ip("10.244.1.2"));
        assert_eq!((e.verdict, here(&e)), (Action::Deliver, vec!["deliver_packets"]));
        assert_eq!(e.hops[0].counters, ["direct_packets"]);
    }

    #[test]
    fn the_rest_is_the_bridges_or_the_stacks() {
        let f = facts();
        let e = explain(&f, ip("10.244.1.2"), ip("10.244.1.3"));
        assert_eq!((e.verdict, here(&e)), (Action::Bridge, vec![]));

        let e = explain(&f, ip("10.244.1.2"), ip("203.0.113.9"));
        assert_eq!((e.verdict, here(&e)), (Action::Stack, vec!["pass_encap"]));
        assert!(e.render().contains("masqueraded"), "{}", e.render());

        let e = explain(&f, ip("10.244.1.2"), ip("198.18.0.12"));
        assert_eq!(e.dst_is, "a member node's PublicIP");
        assert!(e.hops[0].unless[0].contains("drop_pod_vxlan"));

        let e = explain(&f, ip("198.18.0.11"), ip("10.244.2.2"));
        assert_eq!(e.verdict, Action::Encap, "{}", e.render());
        assert_eq!(here(&e), ["encap_packets"]);
        assert_eq!(e.hops[1].hook, "tc egress on overlay0 (overlay_encap)");
        assert!(e.hops[2].says[0].contains("names 10.244.1.0/24"));

        let e = explain(&f, ip("198.18.0.12"), ip("10.244.1.2"));
        assert_eq!(e.verdict, Action::Deliver, "{}", e.render());
        assert!(
            e.hops[0].says[0].contains("leaves its overlay0 from 10.244.2.0"),
            "{:?}",
            e.hops[0].says
        );
        assert_eq!(here(&e), ["decap_packets", "deliver_packets"]);
        let mut g = facts();
        g.node.host_gw = true;
        let e = explain(&g, ip("198.18.0.12"), ip("10.244.1.2"));
        assert_eq!(
            (e.verdict, here(&e)),
            (Action::Stack, vec!["pass_decap"]),
            "host-gw: bare from the node's address"
        );

        let e = explain(&f, ip("10.244.2.2"), ip("203.0.113.9"));
        assert_eq!(e.verdict, Action::NotHere);
        let e = explain(&f, ip("203.0.113.9"), ip("10.244.1.2"));
        assert_eq!((e.verdict, here(&e)), (Action::Stack, vec!["pass_decap"]));
    }

    #[test]
    fn renders_one_block_per_hop_and_json() {
        let f = facts();
        let e = explain(&f, ip("10.244.1.2"), ip("10.244.2.2"));
        let text = e.render();
        assert!(
            text.starts_with("10.244.1.2 → 10.244.2.2: encap (encap → remote at 198.18.0.12)\n"),
            "{text}"
        );
        assert!(
            text.contains("\n1. this node — tc ingress on cni0 (overlay_encap): encap\n"),
            "{text}"
        );
        assert!(text.contains("   counts: encap_packets\n"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["verdict"], "encap");
        assert_eq!(v["hops"][0]["outer"]["udp_dst_port"], 8472);
        assert_eq!(v["hops"][0]["counters"][0], "encap_packets");
        assert_eq!(v["hops"][1]["action"], "remote");
    }

    fn link(
        program: &str,
        pin: &str,
        iface: &str,
        hook: &str,
        direction: Option<&'static str>,
    ) -> AttachmentView {
        AttachmentView {
            program: program.into(),
            iface: iface.into(),
            ifindex: 3,
            iface_present: true,
            hook: hook.into(),
            xdp_mode: (hook == "xdp").then_some("driver"),
            direction,
            link_id: Some(1),
            prog_id: Some(2),
            pin: Some(PathBuf::from(format!(
                "/sys/fs/bpf/overlay/links/{pin}@{iface}@3"
            ))),
            ours: true,
        }
    }

    #[test]
    fn hooks_from_the_attachments() {
        // As `status` lists them: both links on overlay0 hold one program, so both show the
        // first direction it is found in; the pin's name tells them apart.
        let a = [
            link(programs::DECAP_XDP, programs::DECAP_XDP, "eth0", "xdp", None),
            link(
                programs::DECAP_TC,
                programs::DECAP_TC,
                "eth0",
                "tcx",
                Some("ingress"),
            ),
            link(programs::ENCAP, programs::ENCAP, "cni0", "tcx", Some("ingress")),
            link(
                programs::ENCAP,
                dataplane::RESEG_LINK,
                HOST_DEVICE,
                "tcx",
                Some("ingress"),
            ),
            link(
                programs::ENCAP,
                programs::ENCAP,
                HOST_DEVICE,
                "tcx",
                Some("ingress"),
            ),
        ];
        let h = hooks_of(&a, "eth0");
        assert_eq!(
            h.bridge_encap.as_deref(),
            Some("tc ingress on cni0 (overlay_encap)")
        );
        assert_eq!(
            h.host_encap.as_deref(),
            Some("tc egress on overlay0 (overlay_encap)")
        );
        assert_eq!(
            h.decap.as_deref(),
            Some("xdp (driver) on eth0 (overlay_decap_xdp)")
        );
        assert_eq!(
            h.decap_tc.as_deref(),
            Some("tc ingress on eth0 (overlay_decap_tc)")
        );
        assert_eq!(h.recorder, None);
        let only_reseg = hooks_of(&a[3..4], "eth0");
        assert_eq!(
            only_reseg.host_encap, None,
            "the resegmenting link is not encap on egress"
        );
        assert_eq!(
            hooks_of(&a[1..2], "eth1").decap,
            None,
            "another interface's decap"
        );
    }
}
