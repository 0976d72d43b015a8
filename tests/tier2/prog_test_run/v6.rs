//! Tier 2 (root), IPv6: the real programs, loaded by the agent's own code, driven with
//! BPF_PROG_TEST_RUN on IPv6 pod traffic over an IPv6 underlay (flannel-v6.1's combination).
//! Every expectation is written here: literal header values, a checksum and packet builders of
//! this file's own (nothing from `overlay_common::wire`, which the programs call), and a
//! reference model of the rules for the fuzz run.

use std::net::Ipv6Addr;

use overlay_agent::{
    dataplane::{Config6, PeerEntry, Reseg, STALE_IFINDEX},
    family::{V4, V6},
};
use overlay_common::{maps, programs, Counter, DataplaneConfig, DEFAULT_VNI, DEFAULT_VXLAN_PORT};
use overlay_tests::{
    bpftest::{
        assert_decap_cases, delta, fuzz, moved, pad_for_skb_test_run, permanent_neighbour, pod_endpoint,
        xdp_stripped, DecapCase, Expect, FuzzModel, Moved, Node, Rng, BRIDGE_MAC, DECAP_DROPS, MIN_HITS,
        POD_MAC, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_MARK, XDP_PASS,
    },
    netns::Netns,
};

/// Our PublicIPv6 2001:db8::11 and the peer's 2001:db8::12, as bytes.
const OUR_IP6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];
const PEER_IP6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12];
/// A DirectRouting peer on our segment.
const DIRECT_IP6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x13];
const OUR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const PEER_UNDERLAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x12];
const DIRECT_UNDERLAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x13];
const OUR_VTEP6: [u8; 6] = [0x0e, 0, 0, 0, 0x06, 0x11];
const PEER_VTEP6: [u8; 6] = [0x0e, 0, 0, 0, 0x06, 0x12];
/// Pods: ours fd00:10:244:1::2 (a local endpoint behind eth0p), the peer's fd00:10:244:2::2
/// (its subnet fd00:10:244:2::/64); fd00:10:244:1::3 is ours too but no known endpoint.
const OUR_POD: [u8; 16] = pod(1, 2);
const UNKNOWN_POD: [u8; 16] = pod(1, 3);
const PEER_POD: [u8; 16] = pod(2, 2);
const INNER_MTU6: u32 = 1430;

const fn pod(subnet: u8, host: u8) -> [u8; 16] {
    [0xfd, 0, 0, 0x10, 0x02, 0x44, 0, subnet, 0, 0, 0, 0, 0, 0, 0, host]
}

fn net6(s: &str) -> ipnet::Ipv6Net {
    s.parse().unwrap()
}

/// A node ([`Node`]) with an IPv6 underlay address (2001:db8::11/64) and permanent neighbours for
/// the peers, the datapath loaded with both configs and two IPv6 peers.
struct Fixture {
    node: Node,
}

impl Fixture {
    fn new() -> Self {
        Self::with_capacity(overlay_common::maps::MAX_PEERS, true)
    }

    /// With `peers`, the peer at 2001:db8::12 for fd00:10:244:2::/64 and the DirectRouting one at
    /// 2001:db8::13 for fd00:10:244:3::/64.
    fn with_capacity(max_peers: u32, peers: bool) -> Self {
        // bpf_fib_lookup for AF_INET6 answers FWD_DISABLED on a device without IPv6 forwarding,
        // even for output lookups (net/core/filter.c, bpf_ipv6_fib_lookup); a node forwards
        // IPv6 pod traffic anyway.
        let mut node = Node::new("ptr6", "net.ipv6.conf.all.forwarding=1", max_peers, |ns| {
            ns.ip(&["-6", "addr", "add", "2001:db8::11/64", "dev", "eth0", "nodad"])
                .unwrap();
            permanent_neighbour(ns, "2001:db8::12", "02:00:00:00:00:12");
            permanent_neighbour(ns, "2001:db8::13", "02:00:00:00:00:13");
        });
        let cfg = node_config(&node.ns, 0);
        node.dp.set_config(&cfg).unwrap();
        node.dp
            .set_config6(&Config6 {
                public_ip: Ipv6Addr::from(OUR_IP6),
                vtep_mac: OUR_VTEP6,
                inner_mtu: INNER_MTU6,
                reseg: None,
            })
            .unwrap();
        let mut fx = Fixture { node };
        // Our pod, a local endpoint: TC decap delivers packets for it straight to its veth.
        let eth0p = fx.node.ns.ifindex("eth0p").unwrap();
        fx.upsert_endpoint(OUR_POD, eth0p);
        if peers {
            fx.node
                .dp
                .upsert_peer(&PeerEntry::<V6> {
                    subnet: net6("fd00:10:244:2::/64"),
                    public_ip: Ipv6Addr::from(PEER_IP6),
                    vtep_mac: PEER_VTEP6,
                    direct: false,
                })
                .unwrap();
            fx.node
                .dp
                .upsert_peer(&PeerEntry::<V6> {
                    subnet: net6("fd00:10:244:3::/64"),
                    public_ip: Ipv6Addr::from(DIRECT_IP6),
                    vtep_mac: [0x0e, 0, 0, 0, 0x06, 0x13],
                    direct: true,
                })
                .unwrap();
        }
        fx
    }

    /// Writes a local endpoint from inside the node namespace ([`Node::inside`]).
    fn upsert_endpoint(&mut self, ip: [u8; 16], ifindex: u32) {
        self.node
            .inside(|dp| dp.upsert_endpoint(&pod_endpoint::<V6>(Ipv6Addr::from(ip), ifindex)))
            .unwrap();
    }
}

/// The node-wide config the fixture writes, with delivery `flags` (`CONFIG_NO_DELIVER`…).
fn node_config(ns: &Netns, flags: u16) -> DataplaneConfig {
    DataplaneConfig {
        public_ip: [198, 18, 0, 11],
        vni: DEFAULT_VNI,
        vtep_mac: [0x0e, 0, 0, 0, 0, 0x11],
        port: DEFAULT_VXLAN_PORT,
        underlay_ifindex: ns.ifindex("eth0").unwrap(),
        underlay_mac: ns.mac("eth0").unwrap(),
        flags,
        inner_mtu: 1450,
    }
}

// ---------------------------------------------------------------------------------------------
// Packets and checksums, written here.
// ---------------------------------------------------------------------------------------------

/// RFC 1071 one's-complement sum of 16-bit big-endian words (odd tail padded), folded.
fn ones_sum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    for b in parts {
        assert!(b.len() % 2 == 0 || std::ptr::eq(*b, *parts.last().unwrap()));
        for w in b.chunks(2) {
            sum += u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The IPv6 pseudo-header (RFC 8200 8.1).
fn pseudo(src: &[u8], dst: &[u8], len: usize, nh: u8) -> Vec<u8> {
    let mut p = src.to_vec();
    p.extend_from_slice(dst);
    p.extend_from_slice(&(len as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, nh]);
    p
}

/// An IPv6 packet: version 6, traffic class `tc`, flow label 0x12345, hop limit 64.
fn ipv6(src: [u8; 16], dst: [u8; 16], nh: u8, tc: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60 | (tc >> 4), (tc << 4) | 0x01, 0x23, 0x45];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[nh, 64]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

/// An upper-layer segment (TCP/UDP/ICMPv6) in IPv6 with its checksum at `csum_at` filled in.
fn l4_in_ipv6(src: [u8; 16], dst: [u8; 16], nh: u8, tc: u8, mut seg: Vec<u8>, csum_at: usize) -> Vec<u8> {
    seg[csum_at..csum_at + 2].copy_from_slice(&[0, 0]);
    let c = !ones_sum(&[&pseudo(&src, &dst, seg.len(), nh), &seg]);
    seg[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    ipv6(src, dst, nh, tc, &seg)
}

fn udp6(src: [u8; 16], dst: [u8; 16], tc: u8, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0x13, 0x88, 0x17, 0x70];
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    l4_in_ipv6(src, dst, 17, tc, u, 6)
}

fn tcp6(src: [u8; 16], dst: [u8; 16], payload: &[u8]) -> Vec<u8> {
    let mut t = vec![
        0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
    ];
    t.extend_from_slice(payload);
    l4_in_ipv6(src, dst, 6, 0, t, 16)
}

fn icmp6_echo(src: [u8; 16], dst: [u8; 16], n: usize) -> Vec<u8> {
    let mut m = vec![128, 0, 0, 0, 0x12, 0x34, 0, 1];
    m.extend((0..n).map(|i| i as u8));
    l4_in_ipv6(src, dst, 58, 0, m, 2)
}

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// What a peer puts on the wire for `inner` (outer UDP checksum filled in here).
#[derive(Clone, Copy)]
struct Outer {
    src: [u8; 16],
    dst: [u8; 16],
    dport: u16,
    vni: u32,
    vxlan_flags: u8,
}

fn good_outer() -> Outer {
    Outer {
        src: PEER_IP6,
        dst: OUR_IP6,
        dport: DEFAULT_VXLAN_PORT,
        vni: DEFAULT_VNI,
        vxlan_flags: 0x08,
    }
}

fn vxlan6_frame(o: &Outer, inner_eth_type: u16, inner: &[u8]) -> Vec<u8> {
    let mut udp = vec![0xb2, 0x6e];
    udp.extend_from_slice(&o.dport.to_be_bytes());
    udp.extend_from_slice(&((30 + inner.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    let v = o.vni.to_be_bytes();
    udp.extend_from_slice(&[o.vxlan_flags, 0, 0, 0, v[1], v[2], v[3], 0]);
    udp.extend_from_slice(&OUR_VTEP6);
    udp.extend_from_slice(&PEER_VTEP6);
    udp.extend_from_slice(&inner_eth_type.to_be_bytes());
    udp.extend_from_slice(inner);
    let c = !ones_sum(&[&pseudo(&o.src, &o.dst, udp.len(), 17), &udp]);
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[17, 64]);
    ip.extend_from_slice(&o.src);
    ip.extend_from_slice(&o.dst);
    ip.extend_from_slice(&udp);
    eth(OUR_MAC, PEER_UNDERLAY_MAC, 0x86dd, &ip)
}

fn from_peer(inner: &[u8]) -> Vec<u8> {
    vxlan6_frame(&good_outer(), 0x86dd, inner)
}

/// An `__sk_buff` for BPF_PROG_TEST_RUN with only gso_size/gso_segs set (offsets 176 and 164 in
/// the uapi struct; everything else must be zero).
fn skb_ctx(gso_size: u32, gso_segs: u32) -> Vec<u8> {
    skb_ctx_from(gso_size, gso_segs, 0)
}

/// [`skb_ctx`] for a packet that arrived on device `ingress_ifindex` (offset 36).
fn skb_ctx_from(gso_size: u32, gso_segs: u32, ingress_ifindex: u32) -> Vec<u8> {
    let mut c = vec![0u8; 192];
    c[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    c[164..168].copy_from_slice(&gso_segs.to_ne_bytes());
    c[176..180].copy_from_slice(&gso_size.to_ne_bytes());
    c
}

// ---------------------------------------------------------------------------------------------
// Encap
// ---------------------------------------------------------------------------------------------

/// Encap on the bridge is a router hop (see the IPv4 twin): hop limit 64 leaves as 63 inside
/// the tunnel, 1 is left to the stack (Time Exceeded from this node), and what the stack routed
/// keeps its hop limit.
#[test]
fn encap6_on_the_bridge_counts_the_nodes_hop() {
    let mut fx = Fixture::new();
    let frame = |hop: u8| {
        let mut ip = udp6(OUR_POD, PEER_POD, 0, b"hop");
        ip[7] = hop;
        eth(BRIDGE_MAC, POD_MAC, 0x86dd, &ip)
    };
    let ingress = skb_ctx_from(0, 0, 1);
    let before = fx.node.counters();
    let (verdict, out) = fx.node.run_ctx(programs::ENCAP, &frame(64), Some(&ingress));
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "hop limit 64 on the bridge: encapsulated"
    );
    assert_eq!(out[70 + 14 + 7], 63, "hop limit 64 → 63 inside the tunnel");
    assert_udp_checksum("hop limit 64 → 63", &out);
    assert_eq!(delta(&before, &fx.node.counters(), Counter::Encap6Packets), 1);
    let before = fx.node.counters();
    let (verdict, out) = fx.node.run_ctx(programs::ENCAP, &frame(1), Some(&ingress));
    assert_eq!(verdict, TC_ACT_OK, "hop limit 1 on the bridge: to the stack");
    assert_eq!(out, frame(1), "hop limit 1: untouched for the stack to answer");
    assert_eq!(delta(&before, &fx.node.counters(), Counter::PassTtl), 1);
    let (verdict, out) = fx.node.run(programs::ENCAP, &frame(64));
    assert_eq!(verdict, TC_ACT_REDIRECT, "routed by the stack: encapsulated");
    assert_eq!(out[70 + 14 + 7], 64, "the stack counted this hop already");
}

/// Every outer field of an IPv6 VXLAN frame against literal values: what flanneld's
/// flannel-v6.1 (kernel VXLAN over IPv6, VNI 1, port 8472, udp6zerocsumtx off) sends.
fn assert_outer6_literal(name: &str, out: &[u8], inner: &[u8], outer_tc: u8) {
    assert!(
        out.len() == inner.len() + 84,
        "{name}: 84 bytes of outer headers expected"
    );
    let h = &out[..84];
    assert_eq!(h[0..6], [0x02, 0, 0, 0, 0, 0x12], "{name}: outer destination MAC");
    assert_eq!(
        h[6..12],
        [0x02, 0, 0, 0, 0, 0x11],
        "{name}: outer source MAC (eth0's)"
    );
    assert_eq!(h[12..14], [0x86, 0xdd], "{name}: outer ethertype IPv6");
    assert_eq!(
        h[14..18],
        [0x60 | (outer_tc >> 4), outer_tc << 4, 0, 0],
        "{name}: version 6, traffic class {outer_tc:#04x} (ECN of the inner {:#04x}), flow label 0",
        (inner[0] << 4) | (inner[1] >> 4)
    );
    assert_eq!(
        usize::from(u16::from_be_bytes([h[18], h[19]])),
        inner.len() + 30,
        "{name}: outer payload length"
    );
    assert_eq!(h[20], 17, "{name}: outer next header UDP");
    assert_eq!(h[21], 64, "{name}: outer hop limit");
    assert_eq!(
        h[22..38],
        [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11],
        "{name}: outer source 2001:db8::11"
    );
    assert_eq!(
        h[38..54],
        [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12],
        "{name}: outer destination 2001:db8::12"
    );
    let sport = u16::from_be_bytes([h[54], h[55]]);
    assert!((32768..61000).contains(&sport), "{name}: source port {sport}");
    assert_eq!(h[56..58], [0x21, 0x18], "{name}: UDP destination port 8472");
    assert_eq!(
        usize::from(u16::from_be_bytes([h[58], h[59]])),
        inner.len() + 30,
        "{name}: UDP length"
    );
    assert_ne!(
        h[60..62],
        [0, 0],
        "{name}: a zero UDP checksum is refused by IPv6 receivers"
    );
    assert_eq!(
        h[62..70],
        [0x08, 0, 0, 0, 0, 0, 1, 0],
        "{name}: VXLAN header, VNI 1"
    );
    assert_eq!(
        h[70..76],
        [0x0e, 0, 0, 0, 0x06, 0x12],
        "{name}: inner destination MAC = peer's IPv6 VtepMAC"
    );
    assert_eq!(
        h[76..82],
        [0x0e, 0, 0, 0, 0x06, 0x11],
        "{name}: inner source MAC = our IPv6 VtepMAC"
    );
    assert_eq!(h[82..84], [0x86, 0xdd], "{name}: inner ethertype");
    assert_eq!(&out[84..], inner, "{name}: inner packet changed");
}

/// The outer UDP checksum verifies over pseudo-header and the whole datagram (RFC 8200).
fn assert_udp_checksum(name: &str, out: &[u8]) {
    assert!(
        udp_checksum_verifies(out),
        "{name}: outer UDP checksum {:02x?} does not verify",
        &out[60..62]
    );
}

fn udp_checksum_verifies(out: &[u8]) -> bool {
    let udp = &out[54..];
    ones_sum(&[&pseudo(&out[22..38], &out[38..54], udp.len(), 17), udp]) == 0xffff
}

/// Whether the outer checksum of `inner` must verify. The program takes the inner packet's
/// share from its headers when an upper-layer checksum follows the IPv6 header directly (TCP,
/// UDP, ICMPv6) and the packet is exactly its payload length; that share is right only when the
/// inner checksum is. Every other packet is summed byte by byte and always verifies.
fn outer_checksum_must_verify(inner: &[u8]) -> bool {
    let nh = inner[6];
    let pl = u16::from_be_bytes([inner[4], inner[5]]) as usize;
    let lco = matches!(nh, 6 | 17 | 58) && pl + 40 == inner.len();
    !lco || ones_sum(&[&pseudo(&inner[8..24], &inner[24..40], pl, nh), &inner[40..]]) == 0xffff
}

#[test]
fn encap6_output_matches_literal_headers_and_a_verifying_checksum() {
    let mut fx = Fixture::new();
    let mut dest_opts = vec![17, 0, 1, 4, 0, 0, 0, 0]; // Destination Options, PadN, then UDP
    dest_opts.extend_from_slice(&[0x13, 0x88, 0x17, 0x70, 0, 12, 0, 0, 1, 2, 3, 4]);
    let mut fragment = vec![17, 0, 0, 1, 0, 0, 0x12, 0x34]; // first of several
    fragment.extend_from_slice(&[0x13, 0x88, 0x17, 0x70, 0x05, 0xdc, 0xab, 0xcd]);
    fragment.extend_from_slice(&[0x5a; 1001]);
    // (name, inner packet, expected outer traffic class)
    let cases: Vec<(&str, Vec<u8>, u8)> = vec![
        ("udp", udp6(OUR_POD, PEER_POD, 0, b"hello"), 0),
        ("udp odd length", udp6(OUR_POD, PEER_POD, 0, b"hello!!"), 0),
        ("tcp", tcp6(OUR_POD, PEER_POD, &[0x11; 40]), 0),
        ("icmpv6 echo", icmp6_echo(OUR_POD, PEER_POD, 56), 0),
        ("mtu-sized udp", udp6(OUR_POD, PEER_POD, 0, &[0xab; 1430 - 48]), 0),
        // DSCP EF + ECT(1): only the ECN bits go out, as with the kernel's VXLAN (tos 0).
        ("tclass 0xb9", udp6(OUR_POD, PEER_POD, 0xb9, b"x"), 0x01),
        ("tclass 0xba", udp6(OUR_POD, PEER_POD, 0xba, b"x"), 0x02),
        ("tclass 0xb8", udp6(OUR_POD, PEER_POD, 0xb8, b"x"), 0x00),
        ("CE", udp6(OUR_POD, PEER_POD, 0x03, b"x"), 0x03),
        // Summed byte by byte (no upper-layer checksum right after the IPv6 header):
        (
            "destination options",
            ipv6(OUR_POD, PEER_POD, 60, 0, &dest_opts),
            0,
        ),
        ("first fragment", ipv6(OUR_POD, PEER_POD, 44, 0, &fragment), 0),
        (
            "no next header, 1430",
            ipv6(OUR_POD, PEER_POD, 59, 0, &[0xc3; 1390]),
            0,
        ),
        (
            "no next header, 1 byte",
            ipv6(OUR_POD, PEER_POD, 59, 0, &[0xc3]),
            0,
        ),
        (
            "no next header, 512",
            ipv6(OUR_POD, PEER_POD, 59, 0, &[0x3c; 472]),
            0,
        ),
    ];
    for (name, ip, tc) in &cases {
        let frame = eth(BRIDGE_MAC, POD_MAC, 0x86dd, ip);
        let before = fx.node.counters();
        let (verdict, out) = fx.node.run(programs::ENCAP, &frame);
        let after = fx.node.counters();
        assert_eq!(
            verdict,
            TC_ACT_REDIRECT,
            "{name}: verdict; counters moved {:?}",
            moved(&before, &after)
        );
        assert_outer6_literal(name, &out, ip, *tc);
        assert_udp_checksum(name, &out);
        assert_eq!(
            delta(&before, &after, Counter::Encap6Packets),
            1,
            "{name}: encap6_packets"
        );
        assert_eq!(
            delta(&before, &after, Counter::Encap6Bytes),
            out.len() as u64,
            "{name}: encap6_bytes"
        );
        assert_eq!(
            delta(&before, &after, Counter::EncapPackets),
            0,
            "{name}: not an IPv4 encap"
        );
    }

    // A TCP packet whose checksum the pod's stack left to offload (CHECKSUM_PARTIAL: the field
    // holds the folded pseudo-header sum, the rest is filled in on the way out). The outer
    // checksum must verify once the inner one is filled in, as the NIC or skb_checksum_help will.
    let mut partial = tcp6(OUR_POD, PEER_POD, &[0x77; 333]);
    let tcp_len = partial.len() - 40;
    let ph = ones_sum(&[&pseudo(&OUR_POD, &PEER_POD, tcp_len, 6)]);
    partial[56..58].copy_from_slice(&ph.to_be_bytes());
    let (verdict, mut out) = fx
        .node
        .run(programs::ENCAP, &eth(BRIDGE_MAC, POD_MAC, 0x86dd, &partial));
    assert_eq!(verdict, TC_ACT_REDIRECT, "partial-checksum tcp");
    let full = tcp6(OUR_POD, PEER_POD, &[0x77; 333]);
    out[84 + 56..84 + 58].copy_from_slice(&full[56..58]);
    assert_udp_checksum("partial-checksum tcp, inner checksum filled in afterwards", &out);

    // Same flow, same source port.
    let frame = eth(BRIDGE_MAC, POD_MAC, 0x86dd, &cases[0].1);
    let (_, a) = fx.node.run(programs::ENCAP, &frame);
    let (_, b) = fx.node.run(programs::ENCAP, &frame);
    assert_eq!(a[54..56], b[54..56], "one flow, one source port");

    // A sum that comes out 0 is sent as 0xffff (RFC 8200: 0 means "no checksum", which IPv6
    // UDP may not send). Made so on purpose: a payload the program sums byte by byte (next
    // header 253), whose first word (even-aligned in the outer datagram) takes the checksum the
    // zero-payload packet got, which turns the sum into 0xffff; the flow, and with it the
    // source port, stays the same.
    let inner = |w: [u8; 2]| ipv6(OUR_POD, PEER_POD, 253, 0, &[w[0], w[1], 0, 0, 0, 0, 0, 0]);
    let (_, first) = fx
        .node
        .run(programs::ENCAP, &eth(BRIDGE_MAC, POD_MAC, 0x86dd, &inner([0, 0])));
    let c = [first[60], first[61]];
    assert_ne!(
        c,
        [0xff, 0xff],
        "the zero-payload packet must not already sum to zero"
    );
    let (_, zero) = fx
        .node
        .run(programs::ENCAP, &eth(BRIDGE_MAC, POD_MAC, 0x86dd, &inner(c)));
    assert_eq!(zero[54..56], first[54..56], "the same flow's source port");
    assert_eq!([zero[60], zero[61]], [0xff, 0xff], "a zero sum is sent as 0xffff");
    assert_udp_checksum("a zero sum sent as 0xffff", &zero);
}

#[test]
fn encap6_hands_oversize_packets_to_the_stack_for_packet_too_big() {
    let mut fx = Fixture::new();
    // Larger than the tunnel (1430 = 1500 − 70): unchanged to the stack, which routes it via the
    // host device (route MTU 1430) and answers ICMPv6 Packet Too Big.
    for len in [1431usize, 3000] {
        let ip = ipv6(OUR_POD, PEER_POD, 59, 0, &vec![0x33; len - 40]);
        let frame = eth(BRIDGE_MAC, POD_MAC, 0x86dd, &ip);
        let before = fx.node.counters();
        let (verdict, out) = fx.node.run(programs::ENCAP, &frame);
        assert_eq!(verdict, TC_ACT_OK, "{len} bytes: to the stack");
        assert_eq!(out, frame, "{len} bytes: unchanged");
        assert_eq!(
            delta(&before, &fx.node.counters(), Counter::PassTooBig),
            1,
            "{len}: pass_too_big"
        );
    }
    // GSO: the segment size decides. A 3000-byte TCP packet cut into 1370-byte segments makes
    // 1370 + 40 + 20 = 1430-byte packets: it fits and goes on to the encapsulation (which
    // BPF_PROG_TEST_RUN's skb, with a gso_size but no gso_type, cannot pass: the kernel refuses
    // to grow a GSO packet that is not TCP, so it is counted as drop_adjust_room here; tier 3
    // sends real GSO traffic). With 1371-byte segments it is too big.
    let tcp = tcp6(OUR_POD, PEER_POD, &[0x44; 2940]);
    let frame = eth(BRIDGE_MAC, POD_MAC, 0x86dd, &tcp);
    let before = fx.node.counters();
    let (verdict, _) = fx.node.run_ctx(programs::ENCAP, &frame, Some(&skb_ctx(1370, 3)));
    let after = fx.node.counters();
    assert_eq!(
        (
            verdict,
            delta(&before, &after, Counter::PassTooBig),
            delta(&before, &after, Counter::DropAdjustRoom)
        ),
        (TC_ACT_SHOT, 0, 1),
        "1370-byte segments fit the tunnel: moved {:?}",
        moved(&before, &after)
    );
    let before = fx.node.counters();
    let (verdict, out) = fx.node.run_ctx(programs::ENCAP, &frame, Some(&skb_ctx(1371, 3)));
    assert_eq!(
        (verdict, delta(&before, &fx.node.counters(), Counter::PassTooBig)),
        (TC_ACT_OK, 1),
        "1371-byte segments are too big"
    );
    assert_eq!(out, frame);
}

/// A TCP GSO packet whose last segment is short goes, unchanged, to the host device pair to be
/// segmented (encapsulated whole, that segment would carry the full-sized segments' outer UDP
/// checksum); one whose segments are all full-sized is encapsulated whole; a packet that came
/// back from the pair never goes round again; and without the pair nothing is sent there.
#[test]
fn encap6_sends_gso_packets_with_a_short_last_segment_to_be_segmented() {
    const RESEG: u32 = 41; // overlay0p, TSO off: where such packets go
    const RETURN: u32 = 42; // overlay0: where their segments come back
    let mut fx = Fixture::new();
    let run_l4 = |fx: &mut Fixture, udp: bool, payload: usize, ctx: Vec<u8>| {
        let data = vec![0x44; payload];
        let inner = if udp {
            udp6(OUR_POD, PEER_POD, 0, &data)
        } else {
            tcp6(OUR_POD, PEER_POD, &data)
        };
        let frame = eth(BRIDGE_MAC, POD_MAC, 0x86dd, &inner);
        let before = fx.node.counters();
        let (verdict, out) = fx.node.run_ctx(programs::ENCAP, &frame, Some(&ctx));
        let after = fx.node.counters();
        (
            verdict,
            out == frame,
            delta(&before, &after, Counter::Encap6Resegmented),
            delta(&before, &after, Counter::DropAdjustRoom),
        )
    };
    let run = |fx: &mut Fixture, payload: usize, ctx: Vec<u8>| run_l4(fx, false, payload, ctx);
    let pair = |fx: &mut Fixture, udp: bool| {
        fx.node
            .dp
            .set_config6(&Config6 {
                public_ip: Ipv6Addr::from(OUR_IP6),
                vtep_mac: OUR_VTEP6,
                inner_mtu: INNER_MTU6,
                reseg: Some(Reseg {
                    ifindex: RESEG,
                    return_ifindex: RETURN,
                    udp,
                }),
            })
            .unwrap()
    };
    // Without the pair (its setup failed): encapsulated whole, as before (BPF_PROG_TEST_RUN's
    // GSO skb cannot grow: drop_adjust_room, see above).
    assert_eq!(
        run(&mut fx, 2940, skb_ctx(1370, 3)),
        (TC_ACT_SHOT, true, 0, 1),
        "no pair"
    );
    pair(&mut fx, false);
    // 2940 = 2 × 1370 + 200: the third segment is short.
    assert_eq!(
        run(&mut fx, 2940, skb_ctx(1370, 3)),
        (TC_ACT_REDIRECT, true, 1, 0),
        "short last segment: unchanged, to the pair"
    );
    // 2740 = 2 × 1370: every segment full-sized, encapsulated whole.
    assert_eq!(
        run(&mut fx, 2740, skb_ctx(1370, 2)),
        (TC_ACT_SHOT, true, 0, 1),
        "full segments"
    );
    // Came back from the pair still GSO (TSO turned on again behind our back): never again.
    assert_eq!(
        run(&mut fx, 2940, skb_ctx_from(1370, 3, RETURN)),
        (TC_ACT_SHOT, true, 0, 1),
        "from the pair"
    );
    // From elsewhere (the pod bridge) it does go.
    assert_eq!(
        run(&mut fx, 2940, skb_ctx_from(1370, 3, RESEG + 100)),
        (TC_ACT_REDIRECT, true, 1, 0),
        "from the bridge"
    );
    // Not GSO: a single packet has no segments, encapsulated as always.
    let (verdict, same, reseg, _) = run(&mut fx, 1000, skb_ctx(0, 0));
    assert_eq!(
        (verdict, same, reseg),
        (TC_ACT_REDIRECT, false, 0),
        "not GSO: encapsulated"
    );
    // A pod's UDP GSO packet (UDP_SEGMENT): 2940 bytes of data in 1370-byte segments. Only when
    // the pair segments UDP too does it go there; otherwise encapsulated whole.
    assert_eq!(
        run_l4(&mut fx, true, 2940, skb_ctx(1370, 3)),
        (TC_ACT_SHOT, true, 0, 1),
        "UDP, the pair segments TCP only"
    );
    pair(&mut fx, true);
    assert_eq!(
        run_l4(&mut fx, true, 2940, skb_ctx(1370, 3)),
        (TC_ACT_REDIRECT, true, 1, 0),
        "UDP, short last segment: to the pair"
    );
    assert_eq!(
        run_l4(&mut fx, true, 2740, skb_ctx(1370, 2)),
        (TC_ACT_SHOT, true, 0, 1),
        "UDP, full segments: encapsulated whole"
    );
}

#[test]
fn encap6_leaves_other_traffic_alone_and_routes_direct_peers() {
    let mut fx = Fixture::new();
    let cases = vec![
        (
            "outside the cluster",
            udp6(
                OUR_POD,
                [0x20, 1, 0xd, 0xb8, 9, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
                0,
                b"x",
            ),
        ),
        ("no lease for that subnet", udp6(OUR_POD, pod(4, 4), 0, b"x")),
        ("local pod", udp6(OUR_POD, pod(1, 9), 0, b"x")),
    ];
    for (name, ip) in cases {
        let frame = eth(BRIDGE_MAC, POD_MAC, 0x86dd, &ip);
        let before = fx.node.counters();
        let (verdict, out) = fx.node.run(programs::ENCAP, &frame);
        assert_eq!(
            (verdict, &out),
            (TC_ACT_OK, &frame),
            "{name}: to the stack unchanged"
        );
        assert_eq!(
            delta(&before, &fx.node.counters(), Counter::PassEncap),
            1,
            "{name}: pass_encap"
        );
    }
    // DirectRouting peer: the pod packet itself, to the peer's underlay MAC.
    let ip = udp6(OUR_POD, pod(3, 7), 0, b"direct");
    let frame = eth(BRIDGE_MAC, POD_MAC, 0x86dd, &ip);
    let before = fx.node.counters();
    let (verdict, out) = fx.node.run(programs::ENCAP, &frame);
    assert_eq!(verdict, TC_ACT_REDIRECT, "direct: redirected");
    assert_eq!(
        out,
        eth(DIRECT_UNDERLAY_MAC, OUR_MAC, 0x86dd, &ip),
        "direct: MACs from the FIB, packet as is"
    );
    assert_eq!(delta(&before, &fx.node.counters(), Counter::Direct6Packets), 1);
    // Without the IPv6 config (an IPv6 lease given up) a packet for a peer subnet is dropped
    // and counted, as the IPv4 path does without its config.
    fx.node.dp.clear_config6().unwrap();
    let frame = eth(BRIDGE_MAC, POD_MAC, 0x86dd, &udp6(OUR_POD, PEER_POD, 0, b"x"));
    let before = fx.node.counters();
    assert_eq!(fx.node.run(programs::ENCAP, &frame).0, TC_ACT_SHOT);
    assert_eq!(delta(&before, &fx.node.counters(), Counter::DropNoConfig), 1);
}

// ---------------------------------------------------------------------------------------------
// Decap
// ---------------------------------------------------------------------------------------------

#[test]
fn decap6_restores_the_inner_packet_in_xdp_and_tc() {
    let mut fx = Fixture::new();
    for (prog, dst) in [
        (programs::DECAP_XDP, OUR_POD),
        (programs::DECAP_TC, UNKNOWN_POD),
        (programs::DECAP_TC, OUR_POD),
    ] {
        for (name, inner) in [
            ("udp", udp6(PEER_POD, dst, 0, b"reply")),
            ("tcp", tcp6(PEER_POD, dst, &[0x22; 1000])),
            ("icmpv6", icmp6_echo(PEER_POD, dst, 56)),
        ] {
            let frame = from_peer(&inner);
            let before = fx.node.counters();
            let (verdict, out) = fx.node.run(prog, &frame);
            let after = fx.node.counters();
            let xdp = prog == programs::DECAP_XDP;
            let delivered = !xdp && dst == OUR_POD;
            let what = format!("{prog}/{name} to {}", Ipv6Addr::from(dst));
            assert_eq!(
                verdict,
                match (xdp, delivered) {
                    (true, _) => XDP_PASS,
                    (false, true) => TC_ACT_REDIRECT,
                    (false, false) => TC_ACT_OK,
                },
                "{what}: verdict; moved {:?}",
                moved(&before, &after)
            );
            let want = if delivered {
                // Straight to the pod, as the node's forwarding would send it: from the bridge's
                // MAC (0a:58:00:00:00:01) to the pod's (0a:58:00:00:00:02), hop limit 64 → 63.
                let mut w = vec![0x0a, 0x58, 0, 0, 0, 0x02, 0x0a, 0x58, 0, 0, 0, 0x01, 0x86, 0xdd];
                assert_eq!(inner[7], 64);
                w.extend_from_slice(&inner);
                w[14 + 7] = 63;
                w
            } else {
                // The inner frame for the stack: to eth0's MAC (02:00:00:00:00:11), from the
                // peer's IPv6 VtepMAC; XDP marks it for the TC program after GRO.
                let mut w = vec![0x02, 0, 0, 0, 0, 0x11];
                w.extend_from_slice(&[0x0e, 0, 0, 0, 0x06, 0x12]);
                w.extend_from_slice(&[0x86, 0xdd]);
                w.extend_from_slice(&inner);
                if xdp {
                    xdp_stripped(fx.node.xdp_meta(), OUR_MAC, &w)
                } else {
                    w
                }
            };
            assert_eq!(out, want, "{what}: decapsulated frame");
            for (c, n) in [
                (Counter::Decap6Packets, 1),
                (Counter::Decap6Bytes, (inner.len() + 14) as u64),
                (Counter::Deliver6Packets, u64::from(delivered)),
                (
                    Counter::Deliver6Bytes,
                    if delivered { (inner.len() + 14) as u64 } else { 0 },
                ),
                (Counter::DecapPackets, 0),
                (Counter::DeliverPackets, 0),
            ] {
                assert_eq!(delta(&before, &after, c), n, "{what}: {}", c.name());
            }
        }
    }
    // A frame XDP stripped comes to the TC program with its mark (tier 3 covers that program:
    // BPF_PROG_TEST_RUN gives a TC program no XDP metadata).
    let inner = udp6(PEER_POD, OUR_POD, 0, b"after-gro");
    let (_, stripped) = fx.node.run(programs::DECAP_XDP, &from_peer(&inner));
    if fx.node.xdp_meta() {
        assert_eq!(&stripped[..4], &XDP_MARK);
    } else {
        assert_eq!(
            &stripped[..12],
            &[OUR_MAC, OUR_MAC].concat(),
            "the mark without metadata"
        );
    }
}

/// TC decap of a UDP packet to `dst` with inner hop limit `hop`: (verdict, output, counters moved).
fn decap_tc_to(fx: &mut Fixture, dst: [u8; 16], hop: u8) -> (u32, Vec<u8>, Vec<(&'static str, u64)>) {
    let mut inner = udp6(PEER_POD, dst, 0, b"hop-limit");
    inner[7] = hop;
    let before = fx.node.counters();
    let (verdict, out) = fx.node.run(programs::DECAP_TC, &from_peer(&inner));
    (verdict, out, moved(&before, &fx.node.counters()))
}

#[test]
fn decap6_delivers_only_while_the_hop_limit_the_config_and_the_veth_allow() {
    let mut fx = Fixture::new();
    // Hop limit 2 arrives with 1; 1 and 0 would expire here: the stack answers Time Exceeded,
    // as for IPv4's TTL.
    let (verdict, out, moved) = decap_tc_to(&mut fx, OUR_POD, 2);
    assert_eq!(verdict, TC_ACT_REDIRECT, "hop limit 2: {moved:?}");
    assert_eq!(out[14 + 7], 1, "hop limit 2 → 1");
    assert_eq!(
        &out[..12],
        &[0x0a, 0x58, 0, 0, 0, 0x02, 0x0a, 0x58, 0, 0, 0, 0x01]
    );
    for hop in [1, 0] {
        let (verdict, out, moved) = decap_tc_to(&mut fx, OUR_POD, hop);
        assert_eq!(
            verdict, TC_ACT_OK,
            "hop limit {hop}: to the stack; moved {moved:?}"
        );
        assert_eq!(out[14 + 7], hop, "hop limit {hop} left for the stack to judge");
        assert_eq!(&out[..6], &OUR_MAC, "hop limit {hop}: addressed to the node");
        assert!(
            moved.contains(&("decap6_packets", 1)) && !moved.iter().any(|m| m.0 == "deliver6_packets"),
            "hop limit {hop}: {moved:?}"
        );
    }

    // `--deliver stack`: decapsulated, never delivered; `--deliver veth` delivers too.
    let (stack, veth, plain) = (
        node_config(&fx.node.ns, maps::CONFIG_NO_DELIVER),
        node_config(&fx.node.ns, maps::CONFIG_DELIVER_VIA_VETH),
        node_config(&fx.node.ns, 0),
    );
    fx.node.dp.set_config(&stack).unwrap();
    let (verdict, _, moved) = decap_tc_to(&mut fx, OUR_POD, 64);
    assert_eq!(verdict, TC_ACT_OK, "--deliver stack: {moved:?}");
    fx.node.dp.set_config(&veth).unwrap();
    let (verdict, _, moved) = decap_tc_to(&mut fx, OUR_POD, 64);
    assert_eq!(verdict, TC_ACT_REDIRECT, "--deliver veth: {moved:?}");
    assert!(moved.contains(&("deliver6_packets", 1)), "{moved:?}");
    fx.node.dp.set_config(&plain).unwrap();

    // A pod with two IPv6 addresses on its own veth: one device entry for both, kept until the
    // last address goes; the kernel removes it with the veth, and decap then leaves the pod's
    // packets to the stack, whatever the endpoint map still says.
    fx.node
        .ns
        .ip(&["link", "add", "podv", "type", "veth", "peer", "name", "podp"])
        .unwrap();
    let podv = fx.node.ns.ifindex("podv").unwrap();
    let (a, b) = (pod(1, 4), pod(1, 5));
    for ip in [a, b] {
        fx.upsert_endpoint(ip, podv);
    }
    let dev_entry = |fx: &mut Fixture, ifindex: u32| {
        let m = fx.node.dp.ebpf_mut().map(maps::ENDPOINT_DEVS6).unwrap();
        let devs = aya::maps::DevMapHash::try_from(m).unwrap();
        devs.get(ifindex, 0).ok().map(|v| v.if_index)
    };
    assert_eq!(dev_entry(&mut fx, podv), Some(podv));
    for ip in [a, b] {
        let (verdict, _, moved) = decap_tc_to(&mut fx, ip, 64);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{}: {moved:?}", Ipv6Addr::from(ip));
    }
    fx.node.dp.remove_endpoint::<V6>(Ipv6Addr::from(a)).unwrap();
    let (verdict, _, moved) = decap_tc_to(&mut fx, a, 64);
    assert_eq!(verdict, TC_ACT_OK, "a removed endpoint: {moved:?}");
    let (verdict, _, moved) = decap_tc_to(&mut fx, b, 64);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "the veth's other address lost its device entry with the first: {moved:?}"
    );
    fx.node.dp.remove_endpoint::<V6>(Ipv6Addr::from(b)).unwrap();
    assert_eq!(
        dev_entry(&mut fx, podv),
        None,
        "the last address took the device entry with it"
    );

    // Deleted under a (pinned, still filled in) endpoint: the stack gets its packets.
    fx.upsert_endpoint(a, podv);
    let (verdict, _, _) = decap_tc_to(&mut fx, a, 64);
    assert_eq!(verdict, TC_ACT_REDIRECT, "before the veth is deleted");
    fx.node.ns.ip(&["link", "del", "podv"]).unwrap();
    let (verdict, out, moved) = decap_tc_to(&mut fx, a, 64);
    assert_eq!(
        verdict, TC_ACT_OK,
        "a deleted veth: to the stack; moved {moved:?}"
    );
    assert_eq!(&out[..6], &OUR_MAC);
    let listed: Vec<(Ipv6Addr, u32)> = fx
        .node
        .dp
        .endpoints::<V6>()
        .unwrap()
        .iter()
        .map(|e| (e.ip, e.ifindex))
        .collect();
    assert!(
        listed.contains(&(Ipv6Addr::from(a), STALE_IFINDEX)),
        "the endpoint of a deleted veth is reported stale: {listed:?}"
    );
    // A pod moved to another veth: the old device entry goes when nothing uses it.
    let eth0p = fx.node.ns.ifindex("eth0p").unwrap();
    fx.node
        .ns
        .ip(&["link", "add", "podw", "type", "veth", "peer", "name", "podq"])
        .unwrap();
    let podw = fx.node.ns.ifindex("podw").unwrap();
    fx.upsert_endpoint(b, podw);
    fx.upsert_endpoint(b, eth0p);
    assert_eq!(dev_entry(&mut fx, podw), None, "the old veth's entry stayed");
    assert_eq!(
        dev_entry(&mut fx, eth0p),
        Some(eth0p),
        "OUR_POD's veth lost its entry"
    );
    let (verdict, _, _) = decap_tc_to(&mut fx, b, 64);
    assert_eq!(verdict, TC_ACT_REDIRECT);
}

#[test]
fn decap6_verdicts_for_bad_and_foreign_packets() {
    let mut fx = Fixture::new();
    let inner = udp6(PEER_POD, OUR_POD, 0, b"payload-payload");
    let mut wrong_vni = good_outer();
    wrong_vni.vni = 42;
    let mut unknown = good_outer();
    unknown.src[15] = 0x99;
    let mut no_i_flag = good_outer();
    no_i_flag.vxlan_flags = 0;
    let mut other_port = good_outer();
    other_port.dport = 4789;
    let mut other_dst = good_outer();
    other_dst.dst[15] = 0x77;
    let spoofed = udp6(pod(7, 7), OUR_POD, 0, b"payload-payload");
    let good = from_peer(&inner);
    let mut truncated = good.clone();
    truncated.truncate(good.len() - 10);
    let mut udp_len_wrong = good.clone();
    udp_len_wrong[59] ^= 0x04;
    let mut short_payload = good.clone();
    short_payload[18..20].copy_from_slice(&69u16.to_be_bytes());
    short_payload[58..60].copy_from_slice(&69u16.to_be_bytes());
    let inner_v4 = vxlan6_frame(&good_outer(), 0x0800, &[0x45; 60]);
    let mut inner_version = from_peer(&inner);
    inner_version[84] = 0x40;
    // Fragments: a Fragment header (44) between the IPv6 and UDP headers.
    let frag = |offset_flags: u16, dport: u16| {
        let mut f = good.clone();
        f[20] = 44;
        let mut fh = vec![17, 0];
        fh.extend_from_slice(&offset_flags.to_be_bytes());
        fh.extend_from_slice(&[0, 0, 0x56, 0x78]);
        f.splice(54..54, fh);
        f[64..66].copy_from_slice(&dport.to_be_bytes());
        let pl = (f.len() - 54) as u16;
        f[18..20].copy_from_slice(&pl.to_be_bytes());
        f
    };
    let mut hop_by_hop = good.clone();
    hop_by_hop[20] = 0;
    hop_by_hop.splice(54..54, [17, 0, 1, 4, 0, 0, 0, 0]);
    let mut not_udp = good.clone();
    not_udp[20] = 6;
    let mut bad_version = good.clone();
    bad_version[14] = 0x40;
    let arp = eth([0xff; 6], PEER_UNDERLAY_MAC, 0x0806, &[0u8; 28]);
    let mut runt6 = good.clone();
    runt6.truncate(40);
    // (name, frame, dropped?, counter)
    let cases: Vec<DecapCase> = vec![
        (
            "wrong VNI",
            vxlan6_frame(&wrong_vni, 0x86dd, &inner),
            true,
            Counter::DropWrongVni,
        ),
        (
            "unknown sender",
            vxlan6_frame(&unknown, 0x86dd, &inner),
            true,
            Counter::DropUnknownPeer,
        ),
        (
            "inner source outside the sender's subnet",
            from_peer(&spoofed),
            true,
            Counter::DropSpoofedSource,
        ),
        ("truncated", truncated, true, Counter::DropMalformed),
        (
            "UDP length not the payload length",
            udp_len_wrong,
            true,
            Counter::DropMalformed,
        ),
        (
            "payload too short for an inner IPv6 header",
            short_payload,
            true,
            Counter::DropMalformed,
        ),
        (
            "VXLAN without the I flag",
            vxlan6_frame(&no_i_flag, 0x86dd, &inner),
            true,
            Counter::DropMalformed,
        ),
        (
            "IPv4 inside IPv6 (not a flannel combination)",
            inner_v4,
            true,
            Counter::DropMalformed,
        ),
        (
            "inner version 4 behind an IPv6 ethertype",
            inner_version,
            true,
            Counter::DropMalformed,
        ),
        (
            "first fragment to our port",
            frag(0x0001, 8472),
            true,
            Counter::DropFragment,
        ),
        (
            "atomic fragment to our port",
            frag(0x0000, 8472),
            true,
            Counter::DropFragment,
        ),
        ("later fragment", frag(0x00b9, 8472), false, Counter::PassDecap),
        (
            "first fragment to another port",
            frag(0x0001, 53),
            false,
            Counter::PassDecap,
        ),
        ("hop-by-hop header first", hop_by_hop, false, Counter::PassDecap),
        (
            "another UDP port",
            vxlan6_frame(&other_port, 0x86dd, &inner),
            false,
            Counter::PassDecap,
        ),
        (
            "not our address",
            vxlan6_frame(&other_dst, 0x86dd, &inner),
            false,
            Counter::PassDecap,
        ),
        ("not UDP", not_udp, false, Counter::PassDecap),
        (
            "IP version 4 in an IPv6 ethertype",
            bad_version,
            false,
            Counter::PassDecap,
        ),
        ("ARP", arp, false, Counter::PassDecap),
        ("runt IPv6", runt6, false, Counter::PassDecap),
    ];
    assert_decap_cases(&mut fx.node, &cases, |frame| {
        let mut frame = frame.to_vec();
        if pad_for_skb_test_run(&mut frame) {
            frame[20] = 0; // no longer UDP: still passes
        }
        frame
    });
    // Without the IPv6 config an IPv6-only or IPv4-only node leaves IPv6 VXLAN to the stack.
    fx.node.dp.clear_config6().unwrap();
    for prog in [programs::DECAP_XDP, programs::DECAP_TC] {
        let before = fx.node.counters();
        let (verdict, out) = fx.node.run(prog, &good);
        assert!(
            verdict == XDP_PASS || verdict == TC_ACT_OK,
            "{prog}: no IPv6 config → pass"
        );
        assert_eq!(out, good);
        assert_eq!(delta(&before, &fx.node.counters(), Counter::PassDecap), 1);
    }
}

// ---------------------------------------------------------------------------------------------
// Peer table API
// ---------------------------------------------------------------------------------------------

#[test]
fn ipv6_peers_are_listed_removed_and_never_half_applied() {
    use overlay_agent::dataplane::DataplaneError;
    let mut fx = Fixture::with_capacity(4, false);
    let peer = |i: u8| PeerEntry::<V6> {
        subnet: net6(&format!("fd00:10:244:{i:x}::/64")),
        public_ip: Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, u16::from(i)),
        vtep_mac: [0x0e, 0, 0, 0, 6, i],
        direct: i == 3,
    };
    for i in 1..=4 {
        fx.node.dp.upsert_peer(&peer(i)).unwrap();
    }
    assert_eq!(
        fx.node.dp.peers::<V6>().unwrap(),
        (1..=4).map(peer).collect::<Vec<_>>(),
        "peers6() lists what went in"
    );
    assert!(
        fx.node.dp.peers::<V4>().unwrap().is_empty(),
        "the IPv4 table stays empty"
    );
    match fx.node.dp.upsert_peer(&peer(5)) {
        Err(e @ DataplaneError::PeersFull { .. }) => {
            assert!(e.to_string().contains("fd00:10:244:5::/64"), "unclear error: {e}")
        }
        other => panic!("a fifth IPv6 peer in a 4-entry map must fail with PeersFull, got {other:?}"),
    }
    fn vteps(fx: &mut Fixture) -> aya::maps::HashMap<&aya::maps::MapData, [u8; 16], overlay_common::Vtep6> {
        aya::maps::HashMap::try_from(fx.node.dp.ebpf_mut().map(overlay_common::maps::VTEPS6).unwrap())
            .unwrap()
    }
    assert!(
        vteps(&mut fx).get(&peer(5).public_ip.octets(), 0).is_err(),
        "the rejected peer's sender entry was left behind"
    );
    // A second subnet from the PublicIPv6 of peer 4 that does not fit: the sender entry peer 4's
    // subnet relies on must be restored as it was, not removed.
    let mut second = peer(4);
    second.subnet = net6("fd00:10:244:99::/64");
    assert!(matches!(
        fx.node.dp.upsert_peer(&second),
        Err(DataplaneError::PeersFull { .. })
    ));
    let kept = vteps(&mut fx)
        .get(&peer(4).public_ip.octets(), 0)
        .expect("the rollback removed the sender entry another subnet still uses");
    assert_eq!(
        (kept.subnet, kept.prefix_len),
        (net6("fd00:10:244:4::/64").network().octets(), 64),
        "the rollback must restore the sender entry as it was"
    );
    // Removal takes the subnet and its sender; absent is no error.
    fx.node
        .dp
        .remove_peer::<V6>(peer(2).subnet, peer(2).public_ip)
        .unwrap();
    fx.node
        .dp
        .remove_peer::<V6>(peer(2).subnet, peer(2).public_ip)
        .unwrap();
    assert_eq!(fx.node.dp.peers::<V6>().unwrap(), vec![peer(1), peer(3), peer(4)]);
    assert!(vteps(&mut fx).get(&peer(2).public_ip.octets(), 0).is_err());
    // The maps are pinned with typed BTF: bpftool shows named fields.
    let out = std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(fx.node.dp.pin_root().join(overlay_common::maps::PEERS6))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"public_ip\"") && text.contains("\"vtep_mac\""),
        "bpftool map dump of OVL_PEERS6 lacks field names:\n{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Fuzz run against a reference model
// ---------------------------------------------------------------------------------------------

/// What the rules say a frame should get: (dropped?, counter).
type Verdict = (bool, Counter);

/// The IPv6 decap rules on plain bytes (for IPv6 frames; others are the IPv4 model's business);
/// `tc`: the TC program, which also delivers to local endpoints.
fn model_decap6(f: &[u8], tc: bool, flows: &std::collections::HashSet<Flow6>) -> Verdict {
    const PASS: Verdict = (false, Counter::PassDecap);
    let be16 = |o: usize| u16::from_be_bytes([f[o], f[o + 1]]);
    if f.len() < 54 || f[14] >> 4 != 6 || f[38..54] != OUR_IP6 {
        return PASS;
    }
    // Beyond the IPv6 header only in frames that hold a whole VXLAN frame up to the inner source
    // address (108 bytes).
    let full = f.len() >= 108;
    if f[20] == 44 {
        return if full && f[54] == 17 && be16(56) & 0xfff8 == 0 && be16(64) == 8472 {
            (true, Counter::DropFragment)
        } else {
            PASS
        };
    }
    if f[20] != 17 || !full || be16(56) != 8472 {
        return PASS;
    }
    let pl = be16(18) as usize;
    if pl + 54 > f.len() || be16(58) as usize != pl || pl < 70 {
        return (true, Counter::DropMalformed);
    }
    if f[22..38] != PEER_IP6 && f[22..38] != DIRECT_IP6 {
        return (true, Counter::DropUnknownPeer);
    }
    if f[62] & 0x08 == 0 {
        return (true, Counter::DropMalformed);
    }
    if f[66..69] != [0, 0, 1] {
        return (true, Counter::DropWrongVni);
    }
    if be16(82) != 0x86dd || f[84] >> 4 != 6 {
        return (true, Counter::DropMalformed);
    }
    let subnet = if f[22..38] == PEER_IP6 { 2 } else { 3 };
    if f[92..100] != [0xfd, 0, 0, 0x10, 0x02, 0x44, 0, subnet] {
        return (true, Counter::DropSpoofedSource);
    }
    if f[70..76] != OUR_VTEP6 {
        return (true, Counter::DropInnerMac);
    }
    // TC hands packets for a local endpoint straight to it unless their hop limit runs out here
    // (the inner header is whole: payload length ≥ 70 above), or the stack must see them:
    // fragments, ICMPv6 errors and replies of flows the stack routed out (conntrack's business).
    if tc && f[108..124] == OUR_POD && f[91] > 1 {
        let next_header = f[90];
        if next_header == 44 {
            return (false, Counter::Decap6Packets);
        }
        if next_header == 58 {
            match f.get(124) {
                None => return (true, Counter::DropMalformed),
                Some(1..=4) => return (false, Counter::Decap6Packets),
                Some(_) => {}
            }
        }
        if flows.contains(&flow6(&f[70..], true)) {
            return (false, Counter::Decap6Packets);
        }
        return (false, Counter::Deliver6Packets);
    }
    (false, Counter::Decap6Packets)
}

/// A stack flow as the datapath keys it: (remote, local, remote port, local port, protocol).
type Flow6 = ([u8; 16], [u8; 16], [u8; 2], [u8; 2], u8);

/// The flow of the IPv6 packet in Ethernet frame `f`, keyed by its reply's direction when
/// `reply` (a packet from the remote end); ports are zero for protocols without them and for
/// packets too short to hold them.
fn flow6(f: &[u8], reply: bool) -> Flow6 {
    let at = |o: usize| -> [u8; 16] { f[o..o + 16].try_into().unwrap() };
    let proto = f[20];
    let ports = match proto {
        6 | 17 | 132 | 136 if f.len() >= 58 => [[f[54], f[55]], [f[56], f[57]]],
        _ => [[0; 2]; 2],
    };
    let (src, dst) = (at(22), at(38));
    if reply {
        (src, dst, ports[0], ports[1], proto)
    } else {
        (dst, src, ports[1], ports[0], proto)
    }
}

/// The flow encap records on `overlay0`'s egress (what the fuzz's context-less runs model) for
/// a frame the model sent towards a peer subnet; fragments are never recorded.
fn recorded_flow6(f: &[u8], counter: Counter) -> Option<Flow6> {
    let to_peer = matches!(
        counter,
        Counter::Encap6Packets | Counter::Direct6Packets | Counter::PassTooBig | Counter::DropTooBig
    );
    (to_peer && f[20] != 44).then(|| flow6(f, false))
}

/// `xdp`: XDP's output, with or without XDP metadata.
fn model_decap6_output(f: &[u8], xdp: Option<bool>, counter: Counter) -> Option<Vec<u8>> {
    match counter {
        Counter::PassDecap => Some(f.to_vec()),
        Counter::Decap6Packets => Some(match xdp {
            Some(meta) => xdp_stripped(meta, OUR_MAC, &f[70..]),
            None => {
                let mut out = f[70..].to_vec();
                out[..6].copy_from_slice(&OUR_MAC);
                out
            }
        }),
        Counter::Deliver6Packets => {
            // 70 bytes of outer headers off; to the pod's MAC from the bridge's; hop limit − 1.
            let mut out = f[70..].to_vec();
            out[0..6].copy_from_slice(&POD_MAC);
            out[6..12].copy_from_slice(&BRIDGE_MAC);
            out[21] -= 1;
            Some(out)
        }
        _ => None,
    }
}

/// The IPv6 encap rules.
fn model_encap6(f: &[u8]) -> Verdict {
    let dst_net = &f[38..46];
    if dst_net == [0xfd, 0, 0, 0x10, 0x02, 0x44, 0, 3] {
        // Unencapsulated, so the underlay's MTU (1500) decides: the FIB lookup refuses a frame
        // the device would not forward (longer than MTU + Ethernet + a VLAN tag), as for IPv4.
        if f.len() > 1500 + 14 + 4 {
            return (true, Counter::DropTooBig);
        }
        return (false, Counter::Direct6Packets);
    }
    if dst_net != [0xfd, 0, 0, 0x10, 0x02, 0x44, 0, 2] {
        return (false, Counter::PassEncap);
    }
    if f.len() - 14 > INNER_MTU6 as usize {
        return (false, Counter::PassTooBig);
    }
    (false, Counter::Encap6Packets)
}

fn fuzz_inner(rng: &mut Rng, src: [u8; 16], dst: [u8; 16]) -> Vec<u8> {
    match rng.below(5) {
        0 => udp6(src, dst, rng.below(256) as u8, &vec![7u8; rng.below(200)]),
        1 => tcp6(src, dst, &vec![9u8; rng.below(1500)]),
        2 => icmp6_echo(src, dst, rng.below(100)),
        3 => ipv6(src, dst, 59, 0, &vec![0x5a; rng.below(1500)]),
        _ => {
            let mut fragment = vec![17, 0, 0, rng.below(2) as u8, 0, 0, 0, 1];
            fragment.extend_from_slice(&vec![3u8; rng.below(600)]);
            ipv6(src, dst, 44, 0, &fragment)
        }
    }
}

fn fuzz_frame(rng: &mut Rng, decap: bool) -> Vec<u8> {
    let mut f = if decap {
        let src = [PEER_POD, pod(3, 3), pod(rng.below(5) as u8, 9)][rng.below(3)];
        // Our local endpoint, or a pod of ours that is none; hop limits that may expire here.
        let dst = [OUR_POD, OUR_POD, UNKNOWN_POD][rng.below(3)];
        let mut inner = fuzz_inner(rng, src, dst);
        inner[7] = [64, 64, 64, 2, 1, 0][rng.below(6)];
        let mut o = good_outer();
        if rng.below(8) == 0 {
            o.vni = rng.below(3) as u32;
        }
        if rng.below(6) == 0 {
            o.src = [
                PEER_IP6,
                DIRECT_IP6,
                [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x44],
            ][rng.below(3)];
        }
        if rng.below(10) == 0 {
            o.dport = [8472, 4789, 53][rng.below(3)];
        }
        if rng.below(12) == 0 {
            o.dst[15] = rng.below(256) as u8;
        }
        if rng.below(12) == 0 {
            o.vxlan_flags = [0, 0x08, 0x0c][rng.below(3)];
        }
        let mut f = vxlan6_frame(&o, [0x86dd, 0x86dd, 0x86dd, 0x0800][rng.below(4)], &inner);
        if rng.below(10) == 0 {
            // Not for our IPv6 VtepMAC: the sender's own, broadcast, or ours with one bit off.
            f[70..76].copy_from_slice(&[PEER_VTEP6, [0xff; 6], [0x0e, 0, 0, 0, 0x06, 0x10]][rng.below(3)]);
        }
        f
    } else {
        let dst = [PEER_POD, pod(3, 5), pod(4, 4), pod(1, 9)][rng.below(4)];
        eth(BRIDGE_MAC, POD_MAC, 0x86dd, &fuzz_inner(rng, OUR_POD, dst))
    };
    for _ in 0..rng.below(4) {
        match rng.below(8) {
            0 => {}
            1 => f[14] = (rng.below(16) as u8) << 4 | (f[14] & 0x0f), // version
            2 if decap => {
                // A Fragment header (first or later fragment, of UDP or TCP) after the outer
                // IPv6 header.
                let proto = f[20];
                f[20] = 44;
                let off: u16 = [0x0001, 0x0000, 0x0159][rng.below(3)];
                let mut fh = vec![[proto, 6][rng.below(2)], 0];
                fh.extend_from_slice(&off.to_be_bytes());
                fh.extend_from_slice(&[0, 0, 0, 9]);
                f.splice(54..54, fh);
            }
            3 if f.len() > 60 => f[58..60].copy_from_slice(&(rng.below(70000) as u16).to_be_bytes()), // UDP length
            4 => f[18..20].copy_from_slice(&(rng.below(70000) as u16).to_be_bytes()), // payload length
            5 => {
                let i = rng.below(f.len().min(110));
                f[i] = rng.below(256) as u8;
            }
            6 => f[20] = [17, 6, 0, 58][rng.below(4)],
            _ => f[12..14].copy_from_slice(&[[0x86, 0xdd], [0x08, 0x06]][rng.below(2)]),
        }
    }
    if rng.below(6) == 0 {
        let n = 14 + rng.below(f.len() - 13);
        f.truncate(n);
    }
    f
}

/// The IPv6 half of the fuzz run: IPv6 VXLAN frames to decap and IPv6 pod frames to encap,
/// bent; encap records the flows it sends (the fuzz's context-less runs model `overlay0`'s
/// egress), whose replies decap must then hand to the stack.
#[derive(Default)]
struct Model {
    /// The flows encap recorded so far, and how many deliveries they turned into stack passes.
    flows: std::collections::HashSet<Flow6>,
    conntrack_passes: u32,
    /// Encapsulated frames with a verifying outer checksum (true) / a corrupted inner one (false).
    checksums: std::collections::BTreeMap<bool, u32>,
    /// Whether the kernel gives XDP metadata ([`xdp_stripped`]).
    xdp_meta: bool,
}

impl FuzzModel for Model {
    fn frame(&mut self, rng: &mut Rng, i: usize) -> (&'static str, Vec<u8>) {
        let decap = !i.is_multiple_of(3);
        let frame = fuzz_frame(rng, decap);
        let prog = match (decap, i % 2) {
            (false, _) => programs::ENCAP,
            (true, 0) => programs::DECAP_XDP,
            (true, _) => programs::DECAP_TC,
        };
        (prog, frame)
    }

    fn expect(&mut self, prog: &'static str, frame: &[u8]) -> Expect {
        let decap = prog != programs::ENCAP;
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        let (drop, counter) = match (decap, ethertype) {
            (_, 0x86dd) if prog == programs::DECAP_XDP && !self.xdp_meta && frame[6..12] == OUR_MAC => {
                // Without XDP metadata, the NIC's own MAC as the source is XDP's mark.
                (true, Counter::DropOwnMac)
            }
            (_, 0x86dd) if decap => model_decap6(frame, prog == programs::DECAP_TC, &self.flows),
            (_, 0x86dd) => model_encap6(frame),
            (true, _) => (false, Counter::PassDecap),
            (false, _) => (false, Counter::PassEncap),
        };
        if ethertype == 0x86dd && !decap {
            self.flows.extend(recorded_flow6(frame, counter));
        }
        let redirect = matches!(
            counter,
            Counter::Encap6Packets | Counter::Direct6Packets | Counter::Deliver6Packets
        );
        let output = if decap {
            model_decap6_output(
                frame,
                (prog == programs::DECAP_XDP).then_some(self.xdp_meta),
                counter,
            )
        } else {
            match counter {
                Counter::PassEncap | Counter::PassTooBig => Some(frame.to_vec()),
                Counter::Direct6Packets => Some(eth(DIRECT_UNDERLAY_MAC, OUR_MAC, 0x86dd, &frame[14..])),
                _ => None,
            }
        };
        Expect {
            drop,
            counter,
            redirect: Some(redirect),
            output,
        }
    }

    fn check(&mut self, i: usize, frame: &[u8], out: &[u8], expect: &Expect, moved: Moved) -> bool {
        self.conntrack_passes += delta(moved.before, moved.after, Counter::PassConntrack) as u32;
        if expect.counter != Counter::Encap6Packets {
            return false;
        }
        // Encapsulated: the literal outer fields and a checksum that verifies.
        let inner = &frame[14..];
        let tc = (inner[1] >> 4) & 0x03;
        assert_outer6_literal(&format!("run {i}"), out, inner, tc);
        let must = outer_checksum_must_verify(inner);
        assert!(
            udp_checksum_verifies(out) == must,
            "run {i}: outer checksum verifies: {}, the model says {must}\nframe: {frame:02x?}",
            !must
        );
        *self.checksums.entry(must).or_default() += 1;
        true
    }

    fn classes(&self) -> Vec<(&'static str, Counter)> {
        let mut decap_classes = vec![Counter::PassDecap, Counter::Decap6Packets];
        decap_classes.extend(DECAP_DROPS);
        let encap_classes = [
            Counter::PassEncap,
            Counter::PassTooBig,
            Counter::Encap6Packets,
            Counter::Direct6Packets,
        ];
        let mut wanted: Vec<(&str, Counter)> = Vec::new();
        for prog in [programs::DECAP_XDP, programs::DECAP_TC] {
            wanted.extend(decap_classes.iter().map(|c| (prog, *c)));
        }
        wanted.push((programs::DECAP_TC, Counter::Deliver6Packets));
        wanted.extend(encap_classes.iter().map(|c| (programs::ENCAP, *c)));
        wanted
    }
}

#[test]
fn fuzzed_ipv6_frames_get_exactly_the_verdicts_of_the_reference_model() {
    let mut fx = Fixture::new();
    let mut model = Model {
        xdp_meta: fx.node.xdp_meta(),
        ..Model::default()
    };
    fuzz(&mut fx.node, &mut model, 0x5eed_0006_abcd_0006, 60_000);
    let Model {
        flows,
        conntrack_passes,
        checksums,
        ..
    } = model;
    println!(
        "encapsulated with a verifying outer checksum (true) / a corrupted inner one (false): {checksums:?}"
    );
    assert!(
        checksums.get(&true).copied().unwrap_or(0) >= 1000,
        "too few encapsulated frames with a checksum to verify: {checksums:?}"
    );
    println!(
        "{} flows recorded; {conntrack_passes} replies passed to the stack for them",
        flows.len()
    );
    assert!(
        conntrack_passes >= MIN_HITS,
        "too few replies of recorded flows: {conntrack_passes}"
    );
}
