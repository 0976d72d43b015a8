//! Map names and the key/value layouts shared with the eBPF programs.
//!
//! | map            | type           | key                         | value              | written by |
//! |----------------|----------------|-----------------------------|--------------------|------------|
//! | `OVL_CONFIG`   | array[1]       | `u32` 0                     | [`DataplaneConfig`]| agent      |
//! | `OVL_PEERS`    | LPM trie       | prefix + remote subnet      | [`Peer`]           | agent      |
//! | `OVL_VTEPS`    | hash           | peer PublicIP (`[u8; 4]`)   | [`Vtep`]           | agent      |
//! | `OVL_ENDPOINTS`| hash           | local pod IPv4 (`[u8; 4]`)  | [`Endpoint`]       | agent      |
//! | `OVL_ENDPOINT_DEVS` | devmap hash | local pod IPv4 ([`endpoint_dev_key`]) | its veth's ifindex | agent; the kernel deletes entries of removed devices |
//! | `OVL_COUNTERS` | per-CPU array  | [`crate::Counter`] as `u32` | `u64`              | programs   |
//! | `OVL_CONFIG6`  | array[1]       | `u32` 0                     | [`DataplaneConfig6`]| agent     |
//! | `OVL_PEERS6`   | LPM trie       | prefix + remote IPv6 subnet | [`Peer6`]          | agent      |
//! | `OVL_VTEPS6`   | hash           | peer PublicIPv6 (`[u8; 16]`)| [`Vtep6`]          | agent      |
//! | `OVL_SCRATCH`  | per-CPU array[1] | `u32` 0                   | 512 bytes          | programs (scratch space) |
//! | `OVL_ENDPOINTS6` | hash         | local pod IPv6 (`[u8; 16]`) | [`Endpoint`]       | agent      |
//! | `OVL_ENDPOINT_DEVS6` | devmap hash | veth ifindex (`u32`)     | the same ifindex   | agent; the kernel deletes entries of removed devices |
//! | `OVL_STACK_FLOWS` | LRU hash    | [`StackFlow`] (a reply's 5-tuple) | first seen, ns (`u64`) | encap on `overlay0`'s egress |
//! | `OVL_STACK_FLOWS6` | LRU hash   | [`StackFlow6`]              | first seen, ns (`u64`) | encap on `overlay0`'s egress |
//! | `OVL_PEER_STATS` | per-CPU hash | member PublicIP (`[u8; 4]`) | [`PeerStats`]     | agent creates and deletes entries (one per sender); programs count |
//! | `OVL_PEER_STATS6` | per-CPU hash | member PublicIPv6 (`[u8; 16]`) | [`PeerStats`]  | as `OVL_PEER_STATS` |
//! | `OVL_MONITOR`  | array[1]       | `u32` 0                     | [`crate::monitor::MonitorConfig`] | `overlay-agent monitor` while it runs |
//! | `OVL_MONITOR_STATE` | per-CPU array[1] | `u32` 0              | [`crate::monitor::RateState`] | programs (the rate limit) |
//! | `OVL_EVENTS`   | ring buffer    | —                           | [`crate::monitor::DropEvent`] | programs, while a monitor is attached |
//!
//! IPv6 pod traffic travels over the IPv6 underlay (flannel's `flannel-v6.1`: outer IPv6 from
//! `PublicIPv6` to the peer's), IPv4 pod traffic over IPv4: the IPv6 tables are separate maps, so
//! the IPv4 maps an older release pinned keep their layout and are adopted on upgrade.
//!
//! All addresses are stored in network byte order as byte arrays, all other integers in host order.

use core::mem::size_of;

pub const CONFIG: &str = "OVL_CONFIG";
pub const PEERS: &str = "OVL_PEERS";
pub const VTEPS: &str = "OVL_VTEPS";
pub const ENDPOINTS: &str = "OVL_ENDPOINTS";
pub const ENDPOINT_DEVS: &str = "OVL_ENDPOINT_DEVS";
pub const COUNTERS: &str = "OVL_COUNTERS";
pub const CONFIG6: &str = "OVL_CONFIG6";
pub const PEERS6: &str = "OVL_PEERS6";
pub const VTEPS6: &str = "OVL_VTEPS6";
pub const SCRATCH: &str = "OVL_SCRATCH";
pub const ENDPOINTS6: &str = "OVL_ENDPOINTS6";
pub const ENDPOINT_DEVS6: &str = "OVL_ENDPOINT_DEVS6";
pub const STACK_FLOWS: &str = "OVL_STACK_FLOWS";
pub const STACK_FLOWS6: &str = "OVL_STACK_FLOWS6";
pub const PEER_STATS: &str = "OVL_PEER_STATS";
pub const PEER_STATS6: &str = "OVL_PEER_STATS6";
pub const MONITOR: &str = "OVL_MONITOR";
pub const MONITOR_STATE: &str = "OVL_MONITOR_STATE";
pub const EVENTS: &str = "OVL_EVENTS";
/// Every map the object defines; each is pinned under the pin root by this name.
pub const ALL: [&str; 19] = [
    CONFIG,
    PEERS,
    VTEPS,
    ENDPOINTS,
    ENDPOINT_DEVS,
    COUNTERS,
    CONFIG6,
    PEERS6,
    VTEPS6,
    SCRATCH,
    ENDPOINTS6,
    ENDPOINT_DEVS6,
    STACK_FLOWS,
    STACK_FLOWS6,
    PEER_STATS,
    PEER_STATS6,
    MONITOR,
    MONITOR_STATE,
    EVENTS,
];
/// The peer tables, created with the loader's capacity (`max_peers`) rather than the object's.
pub const PEER_TABLES: [&str; 6] = [PEERS, VTEPS, PEERS6, VTEPS6, PEER_STATS, PEER_STATS6];

/// Traffic to and from one member node (its PublicIP, or PublicIPv6 in `OVL_PEER_STATS6`),
/// one value per CPU (the reader sums them). The agent creates a zeroed entry with the
/// member's sender entry and deletes it with that entry, so the table holds exactly the
/// members; the programs only count into entries that exist.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Packets sent to the member (VXLAN, or bare to a DirectRouting / host-gw peer) and their
    /// bytes as they left on the underlay (as `encap_bytes`).
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Packets accepted from the member (VXLAN stripped, or bare host-gw packets delivered) and
    /// their bytes once stripped (as `decap_bytes`).
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// When the last packet was sent to / accepted from it: CLOCK_MONOTONIC_COARSE ns
    /// (`bpf_ktime_get_coarse_ns`), 0 for never.
    pub tx_last_ns: u64,
    pub rx_last_ns: u64,
    /// Packets for the member dropped on the way out (no route to its PublicIP, refused to
    /// grow, too big).
    pub tx_drops: u64,
    /// VXLAN from the member dropped on the way in (wrong VNI, inner source outside its
    /// subnet, not to our VtepMAC, malformed, no room).
    pub rx_drops: u64,
}
const _: () = assert!(size_of::<PeerStats>() == 64);

/// Key of a pod in `OVL_ENDPOINT_DEVS`: its IPv4 address's bytes read as a native `u32`.
/// A device map entry disappears with its device, so decap never redirects to a veth that is
/// gone (a pod deleted while the agent was not running), whatever `OVL_ENDPOINTS` still says.
pub const fn endpoint_dev_key(ip: [u8; 4]) -> u32 {
    u32::from_ne_bytes(ip)
}

/// Key of a pod's veth in `OVL_ENDPOINT_DEVS6`: its ifindex. An IPv6 address has no 32-bit
/// key of its own, so the IPv6 device map is keyed by the device: one entry per veth, shared by
/// the pod's IPv6 addresses, and gone with the veth as in `OVL_ENDPOINT_DEVS`. (Should the
/// kernel give that ifindex to a later device, the entry comes back only when the agent writes
/// that device's endpoints, in a sync that first removes or replaces the stale ones.)
pub const fn endpoint6_dev_key(ifindex: u32) -> u32 {
    ifindex
}

/// Capacity of each stack-flow table (`OVL_STACK_FLOWS`, `OVL_STACK_FLOWS6`): flows the node's
/// stack routed to a remote pod (after a Service's DNAT, for instance) whose replies must take
/// the stack too. Least recently used entries go first when it is full.
pub const MAX_STACK_FLOWS: u32 = 65536;

/// The packet mark bit the agent's nftables rule (table `inet overlay-agent`, hook prerouting,
/// after DNAT) sets on packets of connections the node's netfilter destination-NATed. With
/// br_netfilter, such a packet is already NATed when encap sees it on the bridge: encap leaves
/// it to the stack (clearing the bit) so conntrack confirms the connection and the stack routes
/// it through `overlay0`, whose encap records the flow in `OVL_STACK_FLOWS`. One bit no other
/// component of a Kubernetes node is known to use (kube-proxy: 0x4000, 0x8000; Calico:
/// 0xffff0000 by default; Cilium: 0x0f00; Istio: 0x539).
pub const NAT_MARK: u32 = 0x0000_2000;

/// The mark host-gw's fast path gives the pod packets it sends bare to a peer (on the way from
/// the pod bridge to the underlay NIC, which no netfilter hook sees): the recorder on the NIC's
/// egress (`overlay_record`) skips them and sets the mark back to 0, and records the rest, the
/// packets the node's stack routed. A whole value, not a bit: a packet the stack routed carries
/// it only if a rule set exactly this.
pub const SENT_MARK: u32 = 0x4f56_5345; // "OVSE"

/// Key of `OVL_STACK_FLOWS`: the 5-tuple of a *reply* to a flow the stack routed out through
/// `overlay0`, as decap reads it from the decapsulated packet: from the remote end (the packet's
/// destination when it left) to the local one. Ports in network byte order as on the wire, 0 for
/// protocols without ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StackFlow {
    pub remote: [u8; 4],
    pub local: [u8; 4],
    pub remote_port: [u8; 2],
    pub local_port: [u8; 2],
    pub proto: u8,
    /// Scalars, not `[u8; 3]`: zeroing a 3-byte array compiles to a `memset` call on BPF, one
    /// more frame in the call chain that 6.1's 512-byte stack limit counts (32 bytes each).
    pub _pad0: u8,
    pub _pad1: u16,
}
const _: () = assert!(size_of::<StackFlow>() == 16);

/// The IPv6 twin of [`StackFlow`] (`OVL_STACK_FLOWS6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StackFlow6 {
    pub remote: [u8; 16],
    pub local: [u8; 16],
    pub remote_port: [u8; 2],
    pub local_port: [u8; 2],
    pub proto: u8,
    /// Scalars, not `[u8; 3]`: zeroing a 3-byte array compiles to a `memset` call on BPF, one
    /// more frame in the call chain that 6.1's 512-byte stack limit counts (32 bytes each).
    pub _pad0: u8,
    pub _pad1: u16,
}
const _: () = assert!(size_of::<StackFlow6>() == 40);

/// Capacity of the local endpoint table (pods on this node).
pub const MAX_ENDPOINTS: u32 = 16384;

/// Capacity of the peer tables (remote subnets).
pub const MAX_PEERS: u32 = 16384;

/// `DataplaneConfig::flags`: the agent has filled the config in.
pub const CONFIG_READY: u16 = 1;
/// `DataplaneConfig::flags`: deliver decapsulated packets to a local pod with `bpf_redirect` to
/// its host-side veth (through the veth's transmit path) instead of `bpf_redirect_peer`.
pub const CONFIG_DELIVER_VIA_VETH: u16 = 1 << 1;
/// `DataplaneConfig::flags`: keep the NIC's "checksum verified" state when stripping the outer
/// headers (`BPF_F_ADJ_ROOM_NO_CSUM_RESET`); set on hardware NICs.
pub const CONFIG_KEEP_CSUM: u16 = 1 << 2;
/// `DataplaneConfig::flags`: do not deliver straight to pods, always hand decapsulated packets
/// to the stack (the datapath v1 behaviour; for measurements and as an escape hatch).
pub const CONFIG_NO_DELIVER: u16 = 1 << 3;
/// `DataplaneConfig::flags`: this kernel's `bpf_skb_adjust_room` accepts
/// `BPF_F_ADJ_ROOM_DECAP_L4_UDP` (probed once at load), so decap clears a GSO packet's UDP-tunnel
/// state when it strips the outer headers. Without it the flag is never passed.
pub const CONFIG_DECAP_L4_UDP: u16 = 1 << 4;
/// `DataplaneConfig::flags`: the node runs the host-gw backend (for `status`; the programs act
/// on [`CONFIG_BARE_FAST`]).
pub const CONFIG_HOST_GW: u16 = 1 << 5;
/// `DataplaneConfig::flags` (host-gw, with the recorder attached to the underlay's egress):
/// decap on the underlay delivers bare pod packets from members straight to local pods, and
/// encap marks what it sends bare ([`SENT_MARK`]) for the recorder.
pub const CONFIG_BARE_FAST: u16 = 1 << 6;
/// XDP decap marks what it stripped with metadata for the TC program after GRO (status only:
/// the programs read the load-time global `XDP_META`, which the agent sets from a helper probe).
pub const CONFIG_XDP_META: u16 = 1 << 7;
/// XDP decap is attached on a kernel without XDP metadata: XDP marks what it stripped by
/// addressing it from the NIC's own MAC to itself (and drops frames that arrive from that MAC),
/// and the TC program after GRO takes such frames as stripped. Never set without XDP in front.
pub const CONFIG_XDP_MAC_MARK: u16 = 1 << 8;

/// Node-wide settings the programs need. One entry, key 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// Our PublicIP: the outer source address.
    pub public_ip: [u8; 4],
    /// VXLAN network identifier (24 bits used).
    pub vni: u32,
    /// Our VtepMAC: the inner source MAC, and the inner destination peers use.
    pub vtep_mac: [u8; 6],
    /// UDP destination port of the tunnel.
    pub port: u16,
    /// Underlay NIC.
    pub underlay_ifindex: u32,
    /// The underlay NIC's own MAC: decapsulated frames are addressed to it.
    pub underlay_mac: [u8; 6],
    /// [`CONFIG_READY`] and future bits.
    pub flags: u16,
    /// Largest inner IPv4 packet the tunnel carries (underlay MTU − 50).
    pub inner_mtu: u32,
}
const _: () = assert!(size_of::<DataplaneConfig>() == 32);

/// `DataplaneConfig6::flags`: the agent has filled the IPv6 config in. Without it the programs
/// leave all IPv6 traffic alone (an IPv4-only node).
pub const CONFIG6_READY: u16 = 1;
/// `DataplaneConfig6::flags`: the resegmenting pair segments UDP GSO packets too (the pod's
/// `UDP_SEGMENT`; `tx-udp-segmentation` off on `overlay0p`), not only TCP ones.
pub const CONFIG6_RESEG_UDP: u16 = 2;

/// The node's IPv6 settings, one entry (key 0) in `OVL_CONFIG6`. The IPv6 programs also need
/// `OVL_CONFIG` (VNI, port, underlay NIC and its MAC, delivery flags: one set for both families,
/// as flanneld gives `flannel.1` and `flannel-v6.1` the same VNI, port and underlay).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataplaneConfig6 {
    /// Our PublicIPv6: the outer source address, and the address decap accepts VXLAN on.
    pub public_ip: [u8; 16],
    /// Our IPv6 VtepMAC (`BackendV6Data.VtepMAC`): the inner source MAC of IPv6 encap.
    pub vtep_mac: [u8; 6],
    /// [`CONFIG6_READY`], [`CONFIG6_RESEG_UDP`].
    pub flags: u16,
    /// Largest inner IPv6 packet the tunnel carries (underlay MTU − 70).
    pub inner_mtu: u32,
    /// Where a TCP (with [`CONFIG6_RESEG_UDP`] also UDP) GSO packet whose last segment is shorter
    /// than the others goes to be segmented before encap (the host device's peer, `overlay0p`,
    /// TSO off); 0: nowhere, such packets are encapsulated whole. The segments come back on [`DataplaneConfig6::reseg_return_ifindex`].
    ///
    /// Why: `bpf_skb_adjust_room` marks an encapsulated GSO packet `SKB_GSO_UDP_TUNNEL`, never
    /// `SKB_GSO_UDP_TUNNEL_CSUM`, so wherever it is segmented after encap every segment carries
    /// the one outer UDP checksum encap wrote. That checksum is right for every segment of the
    /// full size and wrong for a shorter last one, which a kernel VXLAN receiver drops.
    pub reseg_ifindex: u32,
    /// The host device (`overlay0`), where the segments arrive; encap there never sends a
    /// packet back to be segmented again.
    pub reseg_return_ifindex: u32,
    pub _reserved: u32,
}
const _: () = assert!(size_of::<DataplaneConfig6>() == 40);

/// A remote node's IPv6 side, the value for its IPv6 subnet in `OVL_PEERS6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peer6 {
    /// The peer's PublicIPv6: the outer destination address.
    pub public_ip: [u8; 16],
    /// The peer's IPv6 VtepMAC (`BackendV6Data.VtepMAC`): the inner destination MAC.
    pub vtep_mac: [u8; 6],
    /// [`PEER_DIRECT`].
    pub flags: u16,
}
const _: () = assert!(size_of::<Peer6>() == 24);

/// What IPv6 decap knows about a sender, keyed by its PublicIPv6 in `OVL_VTEPS6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vtep6 {
    /// The sender's IPv6 pod subnet (network address).
    pub subnet: [u8; 16],
    /// Prefix length of the sender's IPv6 subnet.
    pub prefix_len: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<Vtep6>() == 20);

impl Vtep6 {
    /// True when `addr` lies inside the sender's IPv6 subnet.
    /// (64-bit halves: the BPF target has no 128-bit shifts.)
    pub fn contains(&self, addr: [u8; 16]) -> bool {
        let (hi_len, lo_len) = if self.prefix_len >= 64 {
            (64, self.prefix_len - 64)
        } else {
            (self.prefix_len, 0)
        };
        let half = |b: &[u8; 16], at: usize| {
            let mut h = [0u8; 8];
            h.copy_from_slice(&b[at..at + 8]);
            u64::from_be_bytes(h)
        };
        let (mh, ml) = (prefix_mask64(hi_len), prefix_mask64(lo_len));
        (half(&addr, 0) & mh) == (half(&self.subnet, 0) & mh)
            && (half(&addr, 8) & ml) == (half(&self.subnet, 8) & ml)
    }
}

/// 64-bit netmask for a prefix length; lengths above 64 are treated as 64.
pub const fn prefix_mask64(prefix_len: u8) -> u64 {
    if prefix_len == 0 {
        0
    } else if prefix_len >= 64 {
        u64::MAX
    } else {
        u64::MAX << (64 - prefix_len)
    }
}

/// `Peer::flags`: reach this peer without encapsulation (DirectRouting, same L2 segment).
pub const PEER_DIRECT: u16 = 1;

/// A remote node, the value for its subnet in `OVL_PEERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// The peer's PublicIP: the outer destination address.
    pub public_ip: [u8; 4],
    /// The peer's VtepMAC: the inner destination MAC.
    pub vtep_mac: [u8; 6],
    /// [`PEER_DIRECT`].
    pub flags: u16,
}
const _: () = assert!(size_of::<Peer>() == 12);

/// What decap knows about a sender, keyed by its PublicIP in `OVL_VTEPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vtep {
    /// The sender's pod subnet (network address).
    pub subnet: [u8; 4],
    /// Prefix length of the sender's subnet.
    pub prefix_len: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<Vtep>() == 8);

impl Vtep {
    /// True when `addr` lies inside the sender's subnet.
    pub fn contains(&self, addr: [u8; 4]) -> bool {
        let mask = prefix_mask(self.prefix_len);
        (u32::from_be_bytes(addr) & mask) == (u32::from_be_bytes(self.subnet) & mask)
    }
}

/// A pod on this node, the value for its IPv4 address in `OVL_ENDPOINTS` (and for its IPv6
/// address in `OVL_ENDPOINTS6`): decap hands packets
/// for it straight to its veth, skipping the bridge and the node's routing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// The host-side veth of the pod (a port of the pod bridge).
    pub ifindex: u32,
    /// The pod's MAC: the destination MAC of delivered frames.
    pub mac: [u8; 6],
    /// The pod bridge's MAC (the pod's gateway): the source MAC of delivered frames.
    pub gw_mac: [u8; 6],
}
const _: () = assert!(size_of::<Endpoint>() == 16);

/// Netmask for a prefix length, host order; lengths above 32 are treated as 32.
pub const fn prefix_mask(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else if prefix_len >= 32 {
        u32::MAX
    } else {
        u32::MAX << (32 - prefix_len)
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C), only integer and byte-array fields, no implicit padding (size asserted above).
    unsafe impl aya::Pod for DataplaneConfig {}
    // SAFETY: repr(C), only byte arrays and a u16, no implicit padding (size asserted above).
    unsafe impl aya::Pod for Peer {}
    // SAFETY: repr(C), byte arrays and explicit padding only (size asserted above).
    unsafe impl aya::Pod for Vtep {}
    // SAFETY: repr(C), a u32 and byte arrays, no implicit padding (size asserted above).
    unsafe impl aya::Pod for Endpoint {}
    // SAFETY: repr(C), byte arrays, a u16 and u32s, no implicit padding (size asserted above).
    unsafe impl aya::Pod for DataplaneConfig6 {}
    // SAFETY: repr(C), byte arrays and a u16, no implicit padding (size asserted above).
    unsafe impl aya::Pod for Peer6 {}
    // SAFETY: repr(C), byte arrays and explicit padding only (size asserted above).
    unsafe impl aya::Pod for Vtep6 {}
    // SAFETY: repr(C), byte arrays and explicit padding (a u8, a u16) only (size asserted above).
    unsafe impl aya::Pod for StackFlow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for StackFlow6 {}
    // SAFETY: repr(C), u64s only (size asserted above).
    unsafe impl aya::Pod for PeerStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_contains_only_its_subnet() {
        let v = Vtep {
            subnet: [10, 244, 7, 0],
            prefix_len: 24,
            _pad: [0; 3],
        };
        assert!(v.contains([10, 244, 7, 1]));
        assert!(v.contains([10, 244, 7, 255]));
        assert!(!v.contains([10, 244, 8, 1]));
        assert!(!v.contains([10, 245, 7, 1]));
        let all = Vtep {
            subnet: [0; 4],
            prefix_len: 0,
            _pad: [0; 3],
        };
        assert!(all.contains([1, 2, 3, 4]));
    }

    #[test]
    fn vtep6_contains_only_its_subnet() {
        let mut subnet = [0u8; 16];
        subnet[..8].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 7]);
        let v = Vtep6 {
            subnet,
            prefix_len: 64,
            _pad: [0; 3],
        };
        let mut a = subnet;
        a[15] = 9;
        assert!(v.contains(a));
        a[7] = 8;
        assert!(!v.contains(a));
        let all = Vtep6::default();
        assert!(all.contains([0xff; 16]));
        let host = Vtep6 {
            subnet: a,
            prefix_len: 128,
            _pad: [0; 3],
        };
        assert!(host.contains(a));
        let mut b = a;
        b[15] ^= 1;
        assert!(!host.contains(b));
        let wide = Vtep6 {
            subnet,
            prefix_len: 56,
            _pad: [0; 3],
        };
        assert!(wide.contains(a), "byte 7 is outside a /56");
        assert_eq!(prefix_mask64(1), 1u64 << 63);
    }

    #[test]
    fn prefix_masks() {
        assert_eq!(prefix_mask(0), 0);
        assert_eq!(prefix_mask(16), 0xffff_0000);
        assert_eq!(prefix_mask(24), 0xffff_ff00);
        assert_eq!(prefix_mask(32), u32::MAX);
        assert_eq!(prefix_mask(40), u32::MAX);
    }
}
