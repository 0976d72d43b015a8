//! Node and pod namespaces wired like production: an underlay segment between nodes
//! (198.18.0.0/24 on a bridge in its own namespace, fd00:198:18::/64 beside it where a test or the
//! bench adds it), a `cni0` bridge on every node with pods on it.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::Result;
use ipnet::{Ipv4Net, Ipv6Net};

use crate::netns::{unique_name, veth, Netns};

/// The shared underlay L2 segment: a bridge inside its own namespace.
pub struct Underlay {
    pub ns: Netns,
}

impl Underlay {
    pub fn new() -> Result<Self> {
        let ns = Netns::new("ovlu")?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        Ok(Underlay { ns })
    }
}

/// One node: `eth0` on the underlay (198.18.0.<10+index>/24), `cni0` with 10.244.<index>.1/24.
pub struct Node {
    pub ns: Netns,
    pub index: u8,
    pub pods: Vec<Pod>,
}

/// One pod: `eth0` on its node's `cni0`, default route via the bridge address.
pub struct Pod {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// The host-side veth (a port of `cni0`, in the node namespace).
    pub veth: String,
    pub subnet: Ipv4Net,
    pub mtu: u32,
}

impl Node {
    pub fn underlay_ip(index: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, 10 + index)
    }

    /// Node `index`'s IPv6 underlay address (fd00:198:18::<10+index>, the decimal digits as
    /// written, like 198.18.0.<10+index>), added by [`Node::add_underlay6`].
    pub fn underlay_ip6(index: u8) -> Ipv6Addr {
        format!("fd00:198:18::{}", 10 + u32::from(index))
            .parse()
            .expect("a valid IPv6 address")
    }

    pub fn subnet(index: u8) -> String {
        format!("10.244.{index}.0/24")
    }

    /// Creates the node namespace and its underlay link (MTU `mtu`), forwarding on.
    pub fn new(underlay: &Underlay, index: u8, mtu: u32) -> Result<Self> {
        let ns = Netns::new("ovln")?;
        let port = format!("p{index}");
        veth(&ns, "eth0", Some(&underlay.ns), &port)?;
        underlay.ns.ip(&["link", "set", &port, "master", "br0"])?;
        underlay.ns.ip(&["link", "set", &port, "mtu", &mtu.to_string()])?;
        ns.ip(&["link", "set", "eth0", "mtu", &mtu.to_string()])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/24", Self::underlay_ip(index)),
            "dev",
            "eth0",
        ])?;
        ns.sysctl("net.ipv4.ip_forward=1")?;
        Ok(Node {
            ns,
            index,
            pods: Vec::new(),
        })
    }

    /// Adds [`Node::underlay_ip6`]`/64` to `eth0` (no DAD: the address is usable at once).
    pub fn add_underlay6(&self) -> Result<()> {
        let addr = format!("{}/64", Self::underlay_ip6(self.index));
        self.ns
            .ip(&["-6", "addr", "add", &addr, "dev", "eth0", "nodad"])
            .map(|_| ())
    }

    /// Creates `cni0` (10.244.<index>.1/24) as the CNI bridge plugin does.
    pub fn add_bridge(&self, pod_mtu: u32) -> Result<()> {
        self.add_bridge_for(Self::subnet(self.index).parse()?, pod_mtu)
    }

    /// Creates `cni0` with the first host address of `subnet`, as the CNI bridge plugin does.
    pub fn add_bridge_for(&self, subnet: Ipv4Net, pod_mtu: u32) -> Result<()> {
        let gw = nth_host(subnet, 1);
        self.ns.ip(&["link", "add", "cni0", "type", "bridge"])?;
        self.ns
            .ip(&["link", "set", "cni0", "mtu", &pod_mtu.to_string()])?;
        self.ns.ip(&[
            "addr",
            "add",
            &format!("{gw}/{}", subnet.prefix_len()),
            "dev",
            "cni0",
        ])?;
        self.ns.ip(&["link", "set", "cni0", "up"])?;
        Ok(())
    }

    /// Adds pod number `n` (address 10.244.<index>.<n+1>) with the given MTU.
    pub fn add_pod(&mut self, n: u8, mtu: u32) -> Result<Ipv4Addr> {
        self.add_pod_in(Self::subnet(self.index).parse()?, n, mtu)
    }

    /// Adds pod number `n` (the subnet's host n+1) on `cni0` with the given MTU.
    pub fn add_pod_in(&mut self, subnet: Ipv4Net, n: u8, mtu: u32) -> Result<Ipv4Addr> {
        let ip = nth_host(subnet, u32::from(n) + 1);
        let pod = self.make_pod(subnet, ip, mtu, &format!("veth{n}"))?;
        self.pods.push(pod);
        Ok(ip)
    }

    /// A pod namespace with `ip` on `eth0`, its peer `port` on `cni0`.
    fn make_pod(&self, subnet: Ipv4Net, ip: Ipv4Addr, mtu: u32, port: &str) -> Result<Pod> {
        let gw = nth_host(subnet, 1);
        let pod = Netns::new("ovlp")?;
        veth(&pod, "eth0", Some(&self.ns), port)?;
        self.ns.ip(&["link", "set", port, "master", "cni0"])?;
        self.ns.ip(&["link", "set", port, "mtu", &mtu.to_string()])?;
        pod.ip(&["link", "set", "eth0", "mtu", &mtu.to_string()])?;
        pod.ip(&[
            "addr",
            "add",
            &format!("{ip}/{}", subnet.prefix_len()),
            "dev",
            "eth0",
        ])?;
        pod.ip(&["route", "add", "default", "via", &gw.to_string()])?;
        Ok(Pod {
            ns: pod,
            ip,
            veth: port.to_string(),
            subnet,
            mtu,
        })
    }

    /// A pod restart as the kubelet and the CNI bridge plugin do it: pod `i`'s host-side veth
    /// is deleted with its namespace; after `down` a new namespace gets the same address on a
    /// new veth pair (new name, new MACs) on `cni0` and announces itself with a gratuitous ARP,
    /// as the bridge plugin does. Returns the new host-side veth's name.
    pub fn recreate_pod(&mut self, i: usize, down: Duration) -> Result<String> {
        let old = self.pods.remove(i);
        let (ip, subnet, mtu) = (old.ip, old.subnet, old.mtu);
        self.ns.ip(&["link", "del", &old.veth])?;
        drop(old);
        std::thread::sleep(down);
        let pod = self.make_pod(subnet, ip, mtu, &unique_name("vethr"))?;
        let frame = crate::packet::garp(pod.ns.mac("eth0")?, ip);
        crate::packet::send_raw(&pod.ns, "eth0", &frame)?;
        let veth = pod.veth.clone();
        self.pods.insert(i, pod);
        Ok(veth)
    }
}

/// The `n`th address of `subnet` (0 is the network address).
pub fn nth_host(subnet: Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + n)
}

/// `ping -c count` from a namespace; true when every reply arrived: ping's summary says
/// `count` transmitted and `count` received. (Its exit status alone is 0 as soon as one reply
/// came back, so partial loss would pass.) Callers that tolerate loss use [`ping_counts`].
pub fn ping(from: &Netns, to: Ipv4Addr, count: u32, size: Option<u32>) -> bool {
    matches!(ping_counts(from, to, count, size), Some((sent, received)) if sent == count && received == count)
}

/// `ping -c count [-M do -s size]` from a namespace: (transmitted, received) from ping's
/// summary line, or `None` when ping printed no summary (e.g. no route, bad address).
/// No `-w` deadline on purpose: with one, ping keeps sending past `count` to make up for
/// losses; `-W 2` bounds the wait for each reply instead.
pub fn ping_counts(from: &Netns, to: Ipv4Addr, count: u32, size: Option<u32>) -> Option<(u32, u32)> {
    let c = count.to_string();
    let mut args = vec![
        "netns", "exec", &from.name, "ping", "-c", &c, "-i", "0.2", "-W", "2", "-q",
    ];
    let s;
    if let Some(size) = size {
        s = size.to_string();
        args.extend(["-M", "do", "-s", &s]);
    }
    let t = to.to_string();
    args.push(&t);
    // Not `Netns::exec`: that fails on a non-zero exit, and ping exits 1 on any loss.
    let out = std::process::Command::new("ip").args(&args).output().ok()?;
    parse_ping_summary(&String::from_utf8_lossy(&out.stdout))
}

/// (transmitted, received) from ping's summary:
/// "10 packets transmitted, 9 received, [+1 errors, ]10% packet loss, time 1803ms".
pub fn parse_ping_summary(text: &str) -> Option<(u32, u32)> {
    let line = text.lines().find(|l| l.contains("packets transmitted"))?;
    let mut parts = line.split(',');
    let sent = parts.next()?.split_whitespace().next()?.parse().ok()?;
    let received = parts.next()?.split_whitespace().next()?.parse().ok()?;
    Some((sent, received))
}

/// A flanneld vxlan peer as [`flannel_vxlan`] programs it: (subnet, underlay IP, flannel.1 MAC).
pub type VxlanPeer = (Ipv4Net, Ipv4Addr, [u8; 6]);

/// Configures the kernel VXLAN device exactly as flanneld's vxlan backend does, and returns the
/// MAC of `flannel.1`.
///
/// Idempotent, like flanneld: the first call creates `flannel.1` (VNI 1, `local` = the node's
/// underlay IP, `dev eth0`, UDP 8472, `nolearning`, MTU = eth0's − 50, up) with `my_subnet`'s
/// network address as a /32; every call then (re)applies `peers`. Call it once with no peers on
/// each node to learn the MACs, then again with the peers, the way flanneld adds them as leases
/// arrive. Per peer: a permanent ARP entry for `10.244.P.0`, an FDB entry pointing the peer's MAC
/// at its underlay IP, and `10.244.P.0/24 via 10.244.P.0 dev flannel.1 onlink`.
pub fn flannel_vxlan(node: &Node, my_subnet: Ipv4Net, peers: &[VxlanPeer]) -> Result<[u8; 6]> {
    let ns = &node.ns;
    if ns.ip(&["link", "show", "flannel.1"]).is_err() {
        let local = Node::underlay_ip(node.index).to_string();
        ns.ip(&[
            "link",
            "add",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            &local,
            "dev",
            "eth0",
            "dstport",
            "8472",
            "nolearning",
        ])?;
        let eth0_mtu: u32 = String::from_utf8_lossy(&ns.exec("cat", &["/sys/class/net/eth0/mtu"])?.stdout)
            .trim()
            .parse()?;
        ns.ip(&["link", "set", "flannel.1", "mtu", &(eth0_mtu - 50).to_string()])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/32", my_subnet.network()),
            "dev",
            "flannel.1",
        ])?;
        ns.ip(&["link", "set", "flannel.1", "up"])?;
    }
    for (subnet, underlay_ip, mac) in peers {
        let mac = fmt_mac(mac);
        let gw = subnet.network().to_string();
        ns.ip(&[
            "neigh",
            "replace",
            &gw,
            "lladdr",
            &mac,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ])?;
        // flanneld appends (a VTEP may have several destinations); appending an existing one is a no-op.
        ns.exec(
            "bridge",
            &[
                "fdb",
                "append",
                &mac,
                "dev",
                "flannel.1",
                "dst",
                &underlay_ip.to_string(),
                "self",
                "permanent",
            ],
        )?;
        ns.ip(&[
            "route",
            "replace",
            &subnet.to_string(),
            "via",
            &gw,
            "dev",
            "flannel.1",
            "onlink",
        ])?;
    }
    ns.mac("flannel.1")
}

/// A flanneld IPv6 vxlan peer as [`flannel_vxlan6`] programs it: (IPv6 subnet, PublicIPv6,
/// flannel-v6.1 MAC).
pub type Vxlan6Peer = (Ipv6Net, Ipv6Addr, [u8; 6]);

/// Configures the kernel's IPv6 VXLAN device exactly as a dual-stack flanneld's vxlan backend
/// does, and returns the MAC of `flannel-v6.1`.
///
/// Idempotent like [`flannel_vxlan`]: the first call creates `flannel-v6.1` (VNI 1, `local` = the
/// node's IPv6 underlay address ([`Node::add_underlay6`]), `dev eth0`, UDP 8472, `nolearning`),
/// asking for eth0's MTU − 50 in the create request as flanneld does for both its devices; the
/// kernel caps a VXLAN device over IPv6 at its lower device's MTU − 70 and keeps that silently
/// (1430 over a 1500 underlay; setting 1450 afterwards is refused). Then, as flanneld:
/// `accept_ra` 0 on the device, `my_subnet`'s network address as a /128, up. IPv6 forwarding
/// goes on too (flanneld expects the host to forward, as for IPv4). Every call then (re)applies
/// `peers`: a permanent neighbour entry for the peer subnet's first address → the peer's MAC,
/// an FDB entry pointing that MAC at the peer's PublicIPv6, and `<subnet> via <first address>
/// dev flannel-v6.1 onlink`.
pub fn flannel_vxlan6(node: &Node, my_subnet: Ipv6Net, peers: &[Vxlan6Peer]) -> Result<[u8; 6]> {
    const DEV: &str = "flannel-v6.1";
    let ns = &node.ns;
    if ns.ip(&["link", "show", DEV]).is_err() {
        let local = Node::underlay_ip6(node.index).to_string();
        let eth0_mtu: u32 = String::from_utf8_lossy(&ns.exec("cat", &["/sys/class/net/eth0/mtu"])?.stdout)
            .trim()
            .parse()?;
        ns.ip(&[
            "link",
            "add",
            DEV,
            "mtu",
            &(eth0_mtu - 50).to_string(),
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            &local,
            "dev",
            "eth0",
            "dstport",
            "8472",
            "nolearning",
        ])?;
        // sysctl's syntax for a device name with a dot in it: the dot becomes a slash.
        ns.sysctl("net.ipv6.conf.flannel-v6/1.accept_ra=0")?;
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/128", my_subnet.network()),
            "dev",
            DEV,
            "nodad",
        ])?;
        ns.ip(&["link", "set", DEV, "up"])?;
        ns.sysctl("net.ipv6.conf.all.forwarding=1")?;
    }
    for (subnet, underlay_ip, mac) in peers {
        let mac = fmt_mac(mac);
        let gw = subnet.network().to_string();
        ns.ip(&[
            "-6",
            "neigh",
            "replace",
            &gw,
            "lladdr",
            &mac,
            "dev",
            DEV,
            "nud",
            "permanent",
        ])?;
        ns.exec(
            "bridge",
            &[
                "fdb",
                "append",
                &mac,
                "dev",
                DEV,
                "dst",
                &underlay_ip.to_string(),
                "self",
                "permanent",
            ],
        )?;
        ns.ip(&[
            "-6",
            "route",
            "replace",
            &subnet.to_string(),
            "via",
            &gw,
            "dev",
            DEV,
            "onlink",
        ])?;
    }
    ns.mac(DEV)
}

/// flannel host-gw: `route replace <subnet> via <peer underlay IP>` for every peer.
pub fn host_gw(node: &Node, peers: &[(Ipv4Net, Ipv4Addr)]) -> Result<()> {
    for (subnet, via) in peers {
        node.ns.ip(&[
            "route",
            "replace",
            &subnet.to_string(),
            "via",
            &via.to_string(),
            "dev",
            "eth0",
        ])?;
    }
    Ok(())
}

/// Offloads of a NIC-like underlay (the bench's nic-emulation, tests/plain-bench.sh `nic`):
/// the nodes' eth0 segment to the MTU and coalesce what they receive.
pub const NIC_NODE_OFFLOADS: &[&str] = &[
    "tso",
    "off",
    "gso",
    "off",
    "tx-udp_tnl-segmentation",
    "off",
    "tx-udp_tnl-csum-segmentation",
    "off",
    "gro",
    "on",
];
/// The switch ports of a NIC-like underlay forward frames as they come: no segmentation
/// offload (veth runs GRO on a frame only when the sending end has TSO off), no GRO.
pub const NIC_PORT_OFFLOADS: &[&str] = &[
    "tso",
    "off",
    "gso",
    "off",
    "tx-udp_tnl-segmentation",
    "off",
    "tx-udp_tnl-csum-segmentation",
    "off",
    "gro",
    "off",
];
/// veth's defaults, on the nodes and the ports: 64 KB segments cross the "wire" whole.
pub const VETH_OFFLOADS: &[&str] = &[
    "tso",
    "on",
    "gso",
    "on",
    "tx-udp_tnl-segmentation",
    "on",
    "tx-udp_tnl-csum-segmentation",
    "on",
    "gro",
    "off",
];

/// `ethtool -K <dev> <features...>` inside `ns` (e.g. `["tso", "off", "gso", "off"]`).
pub fn ethtool_k(ns: &Netns, dev: &str, features: &[&str]) -> Result<()> {
    let mut args = vec!["-K", dev];
    args.extend_from_slice(features);
    ns.exec("ethtool", &args).map(|_| ())
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

#[cfg(test)]
mod tests {
    use super::parse_ping_summary;

    #[test]
    fn ping_summary_counts_replies_not_exit_status() {
        let full = "--- 10.244.1.2 ping statistics ---\n3 packets transmitted, 3 received, 0% packet loss, time 402ms\n";
        assert_eq!(parse_ping_summary(full), Some((3, 3)));
        let partial = "3 packets transmitted, 2 received, 33.3333% packet loss, time 404ms\n";
        assert_eq!(parse_ping_summary(partial), Some((3, 2)));
        let errors = "5 packets transmitted, 0 received, +5 errors, 100% packet loss, time 812ms\n";
        assert_eq!(parse_ping_summary(errors), Some((5, 0)));
        assert_eq!(parse_ping_summary("connect: Network is unreachable\n"), None);
    }
}
