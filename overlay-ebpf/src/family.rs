//! The two address families the programs carry, as one vocabulary: `V4` (IPv4 pods over the IPv4
//! underlay, flannel's `flannel.1`) and `V6` (IPv6 pods over the IPv6 underlay, `flannel-v6.1`).
//! [`Family`] holds what every concern needs (the IP header, the family's config, its counters);
//! each concern extends it with a trait of its own (`encap::Encap`, `decap::Decap`,
//! `deliver::Deliver`, `conntrack::Conntrack`) whose two impls sit side by side in that file.
//!
//! The generic code is monomorphized and inlined: each family still runs in a BPF-to-BPF frame of
//! its own per entry point (`main.rs`), so the two families' locals never share the 512-byte stack.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6},
    btf_maps::{DevMapHash, HashMap, LruHashMap},
};
use overlay_common::{
    maps::{StackFlow, StackFlow6, MAX_ENDPOINTS, MAX_PEERS, MAX_STACK_FLOWS},
    wire::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, IPV6_LEN, IP_FRAG_MASK, VXLAN6_OVERHEAD, VXLAN_OVERHEAD},
    Counter, DataplaneConfig6, Endpoint, Vtep, Vtep6,
};

use crate::{
    maps::{
        OVL_ENDPOINTS, OVL_ENDPOINTS6, OVL_ENDPOINT_DEVS, OVL_ENDPOINT_DEVS6, OVL_PEER_STATS,
        OVL_PEER_STATS6, OVL_STACK_FLOWS, OVL_STACK_FLOWS6, OVL_VTEPS, OVL_VTEPS6,
    },
    observe::PeerStatsMap,
    verdict::config6,
};

pub(crate) type Vteps<A, V> = HashMap<A, V, { MAX_PEERS as usize }>;
pub(crate) type Endpoints<A> = HashMap<A, Endpoint, { MAX_ENDPOINTS as usize }>;
pub(crate) type EndpointDevs = DevMapHash<{ MAX_ENDPOINTS as usize }>;
pub(crate) type StackFlows<K> = LruHashMap<K, u64, { MAX_STACK_FLOWS as usize }>;

/// IPv4: pods and underlay.
pub(crate) struct V4;
/// IPv6: pods and underlay.
pub(crate) struct V6;

const AF_INET: u8 = 2;
pub(crate) const AF_INET6: u8 = 10;

pub(crate) trait Family {
    /// An address in network byte order.
    type Addr: Copy + 'static;
    /// The IP header, as read from the packet right after the Ethernet header.
    type Ip;
    /// What the family needs beyond the node config (`DataplaneConfig`): nothing for IPv4, whose
    /// fields are the node config's; `DataplaneConfig6` for IPv6.
    type Config: 'static;
    /// What the VTEP table says of a member (its pod subnet).
    type Vtep: Copy + 'static;
    /// The key of the stack-flow table: a reply's 5-tuple.
    type Flow: 'static;
    /// The EtherType of its IP packets.
    const ETHERTYPE: u16;
    /// Outer IP + UDP + VXLAN + inner Ethernet: what encap adds and decap strips.
    const OVERHEAD: usize;
    /// `bpf_skb_adjust_room`'s flag for an outer header of the family.
    const ENCAP_L3: u32;
    /// `(packets, bytes)` counters of each way a packet leaves.
    const ENCAP: (Counter, Counter);
    const DIRECT: (Counter, Counter);
    const DECAP: (Counter, Counter);
    const DELIVER: (Counter, Counter);
    /// The family's maps (`maps.rs`).
    const VTEPS: &'static Vteps<Self::Addr, Self::Vtep>;
    const ENDPOINTS: &'static Endpoints<Self::Addr>;
    const ENDPOINT_DEVS: &'static EndpointDevs;
    const STACK_FLOWS: &'static StackFlows<Self::Flow>;
    /// Traffic per member, keyed by its PublicIP (see `observe.rs`).
    const PEER_STATS: &'static PeerStatsMap<Self::Addr>;

    /// The family's config, `None` while the agent has not written it.
    fn config() -> Option<&'static Self::Config>;
    fn src(ip: &Self::Ip) -> Self::Addr;
    fn dst(ip: &Self::Ip) -> Self::Addr;
    /// The L4 protocol and the offset of its header in the frame (for IPv6: the next header,
    /// right after the fixed header).
    fn l4(ip: &Self::Ip) -> (u8, usize);
    /// The TTL or hop limit.
    fn hop_limit(ip: &Self::Ip) -> u8;
    /// Fills the FIB lookup's family and addresses.
    fn fib_addrs(fib: &mut FibParams, src: &Self::Addr, dst: &Self::Addr);
}

/// The Ethernet header (inner or outer).
#[repr(C)]
pub(crate) struct EthHdr {
    pub(crate) dst: [u8; 6],
    pub(crate) src: [u8; 6],
    pub(crate) proto: [u8; 2],
}

/// The IPv4 header (inner or outer).
#[repr(C)]
pub(crate) struct Ipv4Hdr {
    pub(crate) ver_ihl: u8,
    pub(crate) tos: u8,
    pub(crate) tot_len: [u8; 2],
    pub(crate) id: [u8; 2],
    pub(crate) frag: [u8; 2],
    pub(crate) ttl: u8,
    pub(crate) proto: u8,
    pub(crate) csum: [u8; 2],
    pub(crate) src: [u8; 4],
    pub(crate) dst: [u8; 4],
}

impl Ipv4Hdr {
    /// Offset of the L4 header in the frame (bounded for the verifier).
    #[inline(always)]
    pub(crate) fn l4_offset(&self) -> usize {
        ETH_LEN + ((usize::from(self.ver_ihl & 0x0f) * 4) & 0x3c)
    }

    /// True for any fragment (first or later): its flow cannot be told from it alone.
    #[inline(always)]
    pub(crate) fn is_fragment(&self) -> bool {
        u16::from_be_bytes(self.frag) & IP_FRAG_MASK != 0
    }
}

/// The IPv6 fixed header (inner or outer).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Ipv6Hdr {
    pub(crate) vtc_flow: [u8; 4],
    pub(crate) payload_len: [u8; 2],
    pub(crate) next_header: u8,
    pub(crate) hop_limit: u8,
    pub(crate) src: [u8; 16],
    pub(crate) dst: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<Ipv6Hdr>() == IPV6_LEN);

/// The UDP header.
#[repr(C)]
pub(crate) struct UdpHdr {
    pub(crate) sport: [u8; 2],
    pub(crate) dport: [u8; 2],
    pub(crate) len: [u8; 2],
    pub(crate) csum: [u8; 2],
}

/// No family config beyond the node's.
static NONE: () = ();

impl Family for V4 {
    type Addr = [u8; 4];
    type Ip = Ipv4Hdr;
    type Config = ();
    type Vtep = Vtep;
    type Flow = StackFlow;
    const ETHERTYPE: u16 = ETH_P_IP;
    const OVERHEAD: usize = VXLAN_OVERHEAD;
    const ENCAP_L3: u32 = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4;
    const ENCAP: (Counter, Counter) = (Counter::EncapPackets, Counter::EncapBytes);
    const DIRECT: (Counter, Counter) = (Counter::DirectPackets, Counter::DirectBytes);
    const DECAP: (Counter, Counter) = (Counter::DecapPackets, Counter::DecapBytes);
    const DELIVER: (Counter, Counter) = (Counter::DeliverPackets, Counter::DeliverBytes);
    const VTEPS: &'static Vteps<[u8; 4], Vtep> = &OVL_VTEPS;
    const ENDPOINTS: &'static Endpoints<[u8; 4]> = &OVL_ENDPOINTS;
    const ENDPOINT_DEVS: &'static EndpointDevs = &OVL_ENDPOINT_DEVS;
    const STACK_FLOWS: &'static StackFlows<StackFlow> = &OVL_STACK_FLOWS;
    const PEER_STATS: &'static PeerStatsMap<[u8; 4]> = &OVL_PEER_STATS;

    #[inline(always)]
    fn config() -> Option<&'static ()> {
        Some(&NONE)
    }
    #[inline(always)]
    fn src(ip: &Ipv4Hdr) -> [u8; 4] {
        ip.src
    }
    #[inline(always)]
    fn dst(ip: &Ipv4Hdr) -> [u8; 4] {
        ip.dst
    }
    #[inline(always)]
    fn l4(ip: &Ipv4Hdr) -> (u8, usize) {
        (ip.proto, ip.l4_offset())
    }
    #[inline(always)]
    fn hop_limit(ip: &Ipv4Hdr) -> u8 {
        ip.ttl
    }
    #[inline(always)]
    fn fib_addrs(fib: &mut FibParams, src: &[u8; 4], dst: &[u8; 4]) {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(*src);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(*dst);
    }
}

impl Family for V6 {
    type Addr = [u8; 16];
    type Ip = Ipv6Hdr;
    type Config = DataplaneConfig6;
    type Vtep = Vtep6;
    type Flow = StackFlow6;
    const ETHERTYPE: u16 = ETH_P_IPV6;
    const OVERHEAD: usize = VXLAN6_OVERHEAD;
    const ENCAP_L3: u32 = BPF_F_ADJ_ROOM_ENCAP_L3_IPV6;
    const ENCAP: (Counter, Counter) = (Counter::Encap6Packets, Counter::Encap6Bytes);
    const DIRECT: (Counter, Counter) = (Counter::Direct6Packets, Counter::Direct6Bytes);
    const DECAP: (Counter, Counter) = (Counter::Decap6Packets, Counter::Decap6Bytes);
    const DELIVER: (Counter, Counter) = (Counter::Deliver6Packets, Counter::Deliver6Bytes);
    const VTEPS: &'static Vteps<[u8; 16], Vtep6> = &OVL_VTEPS6;
    const ENDPOINTS: &'static Endpoints<[u8; 16]> = &OVL_ENDPOINTS6;
    const ENDPOINT_DEVS: &'static EndpointDevs = &OVL_ENDPOINT_DEVS6;
    const STACK_FLOWS: &'static StackFlows<StackFlow6> = &OVL_STACK_FLOWS6;
    const PEER_STATS: &'static PeerStatsMap<[u8; 16]> = &OVL_PEER_STATS6;

    #[inline(always)]
    fn config() -> Option<&'static DataplaneConfig6> {
        config6()
    }
    #[inline(always)]
    fn src(ip: &Ipv6Hdr) -> [u8; 16] {
        ip.src
    }
    #[inline(always)]
    fn dst(ip: &Ipv6Hdr) -> [u8; 16] {
        ip.dst
    }
    #[inline(always)]
    fn l4(ip: &Ipv6Hdr) -> (u8, usize) {
        (ip.next_header, ETH_LEN + IPV6_LEN)
    }
    #[inline(always)]
    fn hop_limit(ip: &Ipv6Hdr) -> u8 {
        ip.hop_limit
    }
    #[inline(always)]
    fn fib_addrs(fib: &mut FibParams, src: &[u8; 16], dst: &[u8; 16]) {
        fib.family = AF_INET6;
        // Writing union members is safe; these are the IPv6 lookup's.
        fib.__bindgen_anon_3.ipv6_src = words(src);
        fib.__bindgen_anon_4.ipv6_dst = words(dst);
    }
}

/// An IPv6 address as the FIB lookup's `__u32[4]` (network byte order kept).
#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

#[inline(always)]
pub(crate) fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}
