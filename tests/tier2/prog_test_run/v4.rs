//! Tier 2 (root): the real programs, loaded by the agent's own code, driven with
//! BPF_PROG_TEST_RUN. Outputs are compared byte for byte with `overlay_common::wire`.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use overlay_agent::{
    dataplane::{Dataplane, PeerEntry},
    family::V4,
};
use overlay_common::{
    maps, programs,
    wire::{self, EncapParams, ENCAP_HDR_LEN, IPPROTO_TCP, IPPROTO_UDP},
    Counter, DataplaneConfig, DEFAULT_VNI, DEFAULT_VXLAN_PORT,
};
use overlay_tests::{
    bpftest::{
        assert_decap_cases, delta, fuzz, moved, permanent_neighbour, pod_endpoint, xdp_stripped, DecapCase,
        Expect, FuzzModel, Node, Rng, BRIDGE_MAC, DECAP_DROPS, POD_MAC, TC_ACT_OK, TC_ACT_REDIRECT, XDP_PASS,
    },
    netns::{require_root, Netns, PinRoot},
    packet,
};

const OUR_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 12);
const PEER_UNDERLAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x12];
const OUR_VTEP: [u8; 6] = [0x0e, 0, 0, 0, 0, 0x11];
const PEER_VTEP: [u8; 6] = [0x0e, 0, 0, 0, 0, 0x12];
const OUR_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const PEER_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);

/// A node ([`Node`]) with a permanent neighbour for the peer, the datapath loaded into it with its
/// maps filled as the agent would.
struct Fixture {
    node: Node,
    underlay_mac: [u8; 6],
}

impl Fixture {
    fn new() -> Self {
        let mut node = Node::new("ptr", "net.ipv4.ip_forward=1", maps::MAX_PEERS, |ns| {
            permanent_neighbour(ns, "198.18.0.12", "02:00:00:00:00:12")
        });
        let underlay_mac = node.ns.mac("eth0").unwrap();
        let cfg = DataplaneConfig {
            public_ip: OUR_IP.octets(),
            vni: DEFAULT_VNI,
            vtep_mac: OUR_VTEP,
            port: DEFAULT_VXLAN_PORT,
            underlay_ifindex: node.ns.ifindex("eth0").unwrap(),
            underlay_mac,
            flags: 0,
            inner_mtu: 1450,
        };
        node.dp.set_config(&cfg).unwrap();
        node.dp
            .upsert_peer(&PeerEntry::<V4> {
                subnet: "10.244.2.0/24".parse::<Ipv4Net>().unwrap(),
                public_ip: PEER_IP,
                vtep_mac: PEER_VTEP,
                direct: false,
            })
            .unwrap();
        // Our pod, a local endpoint: TC decap delivers packets for it straight to its veth.
        let ifindex = node.ns.ifindex("eth0p").unwrap();
        node.inside(|dp| dp.upsert_endpoint(&pod_endpoint::<V4>(OUR_POD, ifindex)))
            .unwrap();
        Fixture { node, underlay_mac }
    }

    /// One counter's value on each possible CPU, read straight from the per-CPU map.
    fn per_cpu(&mut self, c: Counter) -> Vec<u64> {
        let map = self
            .node
            .dp
            .ebpf_mut()
            .map(overlay_common::maps::COUNTERS)
            .unwrap();
        let arr: aya::maps::PerCpuArray<_, u64> = aya::maps::PerCpuArray::try_from(map).unwrap();
        arr.get(&(c as u32), 0).unwrap().iter().copied().collect()
    }

    /// A VXLAN frame from the peer to us around `inner_ip`.
    fn vxlan_from_peer(&self, inner_ip: &[u8]) -> EncapParams {
        let _ = inner_ip;
        vxlan_from_peer(self.underlay_mac)
    }
}

/// The outer headers of a VXLAN frame from the peer to our NIC (`underlay_mac`).
fn vxlan_from_peer(underlay_mac: [u8; 6]) -> EncapParams {
    EncapParams {
        outer_src_mac: PEER_UNDERLAY_MAC,
        outer_dst_mac: underlay_mac,
        src_ip: PEER_IP.octets(),
        dst_ip: OUR_IP.octets(),
        src_port: 45678,
        dst_port: DEFAULT_VXLAN_PORT,
        vni: DEFAULT_VNI,
        inner_src_mac: PEER_VTEP,
        inner_dst_mac: OUR_VTEP,
        inner_ip_len: 0,
        inner_tos: 0,
    }
}

fn pod_packets() -> Vec<(&'static str, Vec<u8>)> {
    let big = vec![0xabu8; 1400];
    vec![
        ("udp", packet::udp(OUR_POD, PEER_POD, 5000, 6000, b"hello")),
        ("tcp", packet::ipv4(OUR_POD, PEER_POD, IPPROTO_TCP, &[0x11; 40])),
        (
            "icmp",
            packet::ipv4(OUR_POD, PEER_POD, 1, &[8, 0, 0, 0, 0, 1, 0, 1]),
        ),
        ("mtu-sized", packet::udp(OUR_POD, PEER_POD, 5000, 6000, &big)),
    ]
}

/// `ip` with its TOS byte set to `tos` and the header checksum redone (summed here, not with
/// `wire`).
fn with_tos(mut ip: Vec<u8>, tos: u8) -> Vec<u8> {
    ip[1] = tos;
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = !ones_sum(&ip[..20]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip
}

/// One's-complement sum of 16-bit words, folded (independent of `wire::ipv4_checksum`).
fn ones_sum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Checks every outer header field of an encapsulated frame against values written here, not
/// against `wire::encap_header` (which the program itself calls, so a wrong field there would
/// cancel out): what a flannel.1 (kernel VXLAN, VNI 1, port 8472, UDP checksum off) peer expects.
fn assert_outer_literal(name: &str, out: &[u8], inner: &[u8], outer_tos: u8) {
    let h = &out[..64];
    // Outer Ethernet: to the peer's underlay MAC (its neighbour entry), from our eth0.
    assert_eq!(h[0..6], [0x02, 0, 0, 0, 0, 0x12], "{name}: outer destination MAC");
    assert_eq!(
        h[6..12],
        [0x02, 0, 0, 0, 0, 0x11],
        "{name}: outer source MAC (eth0's)"
    );
    assert_eq!(h[12..14], [0x08, 0x00], "{name}: outer ethertype");
    // Outer IPv4.
    assert_eq!(h[14], 0x45, "{name}: outer version/IHL");
    assert_eq!(
        h[15], outer_tos,
        "{name}: outer TOS for inner TOS {:#04x} (DSCP not inherited, ECN copied)",
        inner[1]
    );
    assert_eq!(
        usize::from(u16::from_be_bytes([h[16], h[17]])),
        inner.len() + 50,
        "{name}: outer total length"
    );
    assert_eq!(
        h[18..20],
        [0, 0],
        "{name}: outer IP id (0: DF set, atomic datagram)"
    );
    assert_eq!(
        h[20..22],
        [0x40, 0x00],
        "{name}: outer flags/offset: DF, not a fragment"
    );
    assert_eq!(h[22], 64, "{name}: outer TTL");
    assert_eq!(h[23], 17, "{name}: outer protocol UDP");
    assert_eq!(
        ones_sum(&h[14..34]),
        0xffff,
        "{name}: outer IPv4 header checksum wrong: {:02x?}",
        &h[14..34]
    );
    assert_eq!(h[26..30], [198, 18, 0, 11], "{name}: outer source IP");
    assert_eq!(h[30..34], [198, 18, 0, 12], "{name}: outer destination IP");
    // UDP.
    let sport = u16::from_be_bytes([h[34], h[35]]);
    assert!(
        (32768..61000).contains(&sport),
        "{name}: source port {sport} outside the kernel's ephemeral range"
    );
    assert_eq!(h[36..38], [0x21, 0x18], "{name}: UDP destination port 8472");
    assert_eq!(
        usize::from(u16::from_be_bytes([h[38], h[39]])),
        inner.len() + 30,
        "{name}: UDP length"
    );
    assert_eq!(
        h[40..42],
        [0, 0],
        "{name}: UDP checksum 0, as flannel.1 sends over IPv4"
    );
    // VXLAN: I flag, VNI 1, reserved bytes zero.
    assert_eq!(h[42..50], [0x08, 0, 0, 0, 0, 0, 1, 0], "{name}: VXLAN header");
    // Inner Ethernet: to the peer's VtepMAC, from ours.
    assert_eq!(
        h[50..56],
        [0x0e, 0, 0, 0, 0, 0x12],
        "{name}: inner destination MAC = peer VtepMAC"
    );
    assert_eq!(
        h[56..62],
        [0x0e, 0, 0, 0, 0, 0x11],
        "{name}: inner source MAC = our VtepMAC"
    );
    assert_eq!(h[62..64], [0x08, 0x00], "{name}: inner ethertype");
}

#[test]
fn encap_output_matches_the_shared_builder() {
    let mut fx = Fixture::new();
    let underlay_mac = fx.underlay_mac;
    assert_eq!(underlay_mac, [0x02, 0, 0, 0, 0, 0x11], "the fixture's eth0 MAC");
    // (name, inner packet, expected outer TOS). The outer DSCP is 0 whatever the pod set, as
    // flannel.1 (`tos 0`) sends; the ECN bits are copied so congestion marks survive the tunnel.
    let udp = pod_packets()[0].1.clone();
    let mut cases: Vec<(String, Vec<u8>, u8)> = pod_packets()
        .into_iter()
        .map(|(n, ip)| (n.to_string(), ip, 0x00))
        .collect();
    cases.extend([
        // EF (DSCP 46) + ECT(1).
        ("udp tos 0xb9".to_string(), with_tos(udp.clone(), 0xb9), 0x01),
        // EF + ECT(0).
        ("udp tos 0xba".to_string(), with_tos(udp.clone(), 0xba), 0x02),
        // EF + not-ECT: nothing copied.
        ("udp tos 0xb8".to_string(), with_tos(udp.clone(), 0xb8), 0x00),
        // CE is copied as CE (RFC 6040 normal mode). Linux's own VXLAN encap
        // (INET_ECN_encapsulate) writes ECT(0) for an inner CE instead; a kernel decapsulator
        // accepts either (outer CE over inner CE leaves the inner CE).
        ("udp tos 0x03".to_string(), with_tos(udp, 0x03), 0x03),
    ]);
    for (name, ip, outer_tos) in cases {
        let name = name.as_str();
        let frame = packet::eth_ip(BRIDGE_MAC, POD_MAC, &ip);
        let before = fx.node.counters();
        let (verdict, out) = fx.node.run(programs::ENCAP, &frame);
        assert_eq!(
            verdict,
            TC_ACT_REDIRECT,
            "{name}: encap verdict; counters moved: {:?}",
            moved(&before, &fx.node.counters())
        );
        assert_eq!(
            out.len(),
            frame.len() + 50,
            "{name}: 50 bytes of outer headers expected"
        );
        let sport = u16::from_be_bytes([out[34], out[35]]);
        assert!(
            (32768..61000).contains(&sport),
            "{name}: source port {sport} outside the flow range"
        );
        let expected = wire::encap_header(&EncapParams {
            outer_src_mac: underlay_mac,
            outer_dst_mac: PEER_UNDERLAY_MAC,
            src_ip: OUR_IP.octets(),
            dst_ip: PEER_IP.octets(),
            src_port: sport,
            dst_port: DEFAULT_VXLAN_PORT,
            vni: DEFAULT_VNI,
            inner_src_mac: OUR_VTEP,
            inner_dst_mac: PEER_VTEP,
            inner_ip_len: ip.len() as u16,
            inner_tos: ip[1],
        });
        assert_eq!(
            &out[..ENCAP_HDR_LEN],
            &expected[..],
            "{name}: outer headers differ from the builder"
        );
        assert_eq!(&out[ENCAP_HDR_LEN..], &ip[..], "{name}: inner packet changed");
        assert_outer_literal(name, &out, &ip, outer_tos);
        let after = fx.node.counters();
        assert_eq!(
            delta(&before, &after, Counter::EncapPackets),
            1,
            "{name}: encap_packets"
        );
        assert_eq!(
            delta(&before, &after, Counter::EncapBytes),
            out.len() as u64,
            "{name}: encap_bytes"
        );
    }
    // Larger than the tunnel MTU (1450, a pod ignoring subnet.env) and not GSO: handed to the
    // stack unchanged, which answers DF packets with ICMP fragmentation-needed via the host
    // device's MTU (tier 3 checks that end to end). BPF_PROG_TEST_RUN cannot mark a packet GSO;
    // real GSO packets are covered by the bulk TCP tests in tier 3.
    for len in [1451usize, 3000] {
        let ip = packet::ipv4(OUR_POD, PEER_POD, IPPROTO_TCP, &vec![0x33; len - 20]);
        let frame = packet::eth_ip(BRIDGE_MAC, POD_MAC, &ip);
        let before = fx.node.counters();
        let (verdict, out) = fx.node.run(programs::ENCAP, &frame);
        assert_eq!(verdict, TC_ACT_OK, "a {len}-byte packet must go to the stack");
        assert_eq!(out, frame, "a {len}-byte packet must be unchanged");
        assert_eq!(
            delta(&before, &fx.node.counters(), Counter::PassTooBig),
            1,
            "pass_too_big for {len} bytes"
        );
    }
    // Exactly the tunnel MTU still fits.
    let ip = packet::ipv4(OUR_POD, PEER_POD, IPPROTO_TCP, &[0x44; 1430]);
    assert_eq!(
        fx.node
            .run(programs::ENCAP, &packet::eth_ip(BRIDGE_MAC, POD_MAC, &ip))
            .0,
        TC_ACT_REDIRECT,
        "1450 bytes fit"
    );

    // The same flow always gets the same source port.
    let frame = packet::eth_ip(BRIDGE_MAC, POD_MAC, &pod_packets()[0].1);
    let (_, a) = fx.node.run(programs::ENCAP, &frame);
    let (_, b) = fx.node.run(programs::ENCAP, &frame);
    assert_eq!(a[34..36], b[34..36], "one flow, one source port");

    // Many flows spread over many ports (ECMP and RSS on the underlay hash on them), all in the
    // kernel's range as `flannel.1` picks them: 200 flows, at most a few sharing a port.
    let ports: std::collections::BTreeSet<u16> = (0..200u16)
        .map(|i| {
            let ip = packet::udp(OUR_POD, PEER_POD, 10000 + i, 6000, b"flow");
            let (_, out) = fx
                .node
                .run(programs::ENCAP, &packet::eth_ip(BRIDGE_MAC, POD_MAC, &ip));
            u16::from_be_bytes([out[34], out[35]])
        })
        .collect();
    assert!(
        ports.len() >= 190,
        "200 flows got only {} source ports",
        ports.len()
    );
    assert!(
        ports.iter().all(|p| (32768..61000).contains(p)),
        "a source port outside 32768–60999: {ports:?}"
    );
}

/// An `__sk_buff` for a packet that arrived on the device the test run puts it on (`lo`, 1):
/// encap then sees it on ingress, as on the bridge.
fn on_ingress() -> Vec<u8> {
    let mut c = vec![0u8; 192];
    c[36..40].copy_from_slice(&1u32.to_ne_bytes());
    c
}

/// Encap on the bridge is a router hop, as the node's routing is on `flannel.1`: TTL 64 leaves
/// as 63 inside the tunnel (checksum updated), TTL 1 is left to the stack (Time Exceeded from
/// this node); what the stack routed (`overlay0`'s egress) keeps the TTL it has.
#[test]
fn encap_on_the_bridge_counts_the_nodes_hop() {
    let mut fx = Fixture::new();
    let frame = |ttl: u8| {
        let mut ip = packet::udp(OUR_POD, PEER_POD, 5000, 6000, b"hop");
        ip[8] = ttl;
        let c = header_checksum(&ip[..20]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        packet::eth_ip(BRIDGE_MAC, POD_MAC, &ip)
    };
    let ingress = on_ingress();
    let before = fx.node.counters();
    let (verdict, out) = fx.node.run_ctx(programs::ENCAP, &frame(64), Some(&ingress));
    assert_eq!(verdict, TC_ACT_REDIRECT, "TTL 64 on the bridge: encapsulated");
    let inner = &out[50 + 14..50 + 14 + 20];
    assert_eq!(inner[8], 63, "TTL 64 → 63 inside the tunnel");
    assert_eq!(
        header_checksum(inner),
        u16::from_be_bytes([inner[10], inner[11]]),
        "inner checksum"
    );
    assert_eq!(delta(&before, &fx.node.counters(), Counter::EncapPackets), 1);

    let before = fx.node.counters();
    let (verdict, out) = fx.node.run_ctx(programs::ENCAP, &frame(1), Some(&ingress));
    assert_eq!(verdict, TC_ACT_OK, "TTL 1 on the bridge: to the stack");
    assert_eq!(out, frame(1), "TTL 1: untouched for the stack to answer");
    assert_eq!(delta(&before, &fx.node.counters(), Counter::PassTtl), 1);

    let (verdict, out) = fx.node.run(programs::ENCAP, &frame(64));
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "TTL 64 routed by the stack: encapsulated"
    );
    assert_eq!(out[50 + 14 + 8], 64, "the stack counted this hop already");
}

#[test]
fn encap_leaves_local_and_non_cluster_traffic_alone() {
    let mut fx = Fixture::new();
    let cases = vec![
        (
            "outside the cluster",
            packet::eth_ip(
                BRIDGE_MAC,
                POD_MAC,
                &packet::udp(OUR_POD, Ipv4Addr::new(10, 9, 9, 9), 1, 2, b"x"),
            ),
        ),
        (
            "no lease for that subnet",
            packet::eth_ip(
                BRIDGE_MAC,
                POD_MAC,
                &packet::udp(OUR_POD, Ipv4Addr::new(10, 244, 3, 3), 1, 2, b"x"),
            ),
        ),
        ("ARP", packet::eth([0xff; 6], POD_MAC, 0x0806, &[0u8; 28])),
        ("IPv6", packet::eth(BRIDGE_MAC, POD_MAC, 0x86dd, &[0x60; 60])),
    ];
    for (name, frame) in cases {
        let before = fx.node.counters();
        let (verdict, out) = fx.node.run(programs::ENCAP, &frame);
        assert_eq!(verdict, TC_ACT_OK, "{name}: must be handed to the stack");
        assert_eq!(out, frame, "{name}: must be unchanged");
        assert_eq!(
            delta(&before, &fx.node.counters(), Counter::PassEncap),
            1,
            "{name}: pass_encap"
        );
    }
}

/// RFC 1071 over an IPv4 header, written here so the expectation does not share code with
/// what the program or the agent use.
fn header_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .enumerate()
        .filter(|(i, _)| *i != 5)
        .map(|(_, w)| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// TC decap of a UDP packet to `dst` with inner TTL `ttl` (header checksum valid):
/// (verdict, output, counters moved).
fn decap_tc_ttl(fx: &mut Fixture, dst: Ipv4Addr, ttl: u8) -> (u32, Vec<u8>, Vec<(&'static str, u64)>) {
    let mut inner = packet::udp(PEER_POD, dst, 6000, 5000, b"ttl");
    inner[8] = ttl;
    let c = header_checksum(&inner[..20]);
    inner[10..12].copy_from_slice(&c.to_be_bytes());
    let frame = packet::vxlan(&fx.vxlan_from_peer(&inner), &inner);
    let before = fx.node.counters();
    let (verdict, out) = fx.node.run(programs::DECAP_TC, &frame);
    (verdict, out, moved(&before, &fx.node.counters()))
}

/// Routing semantics, as `flannel.1` and the node's forwarding give them: TTL 2 arrives with 1
/// (checksum updated); 1 and 0 would expire here, so the stack gets them untouched, to answer
/// Time Exceeded (traceroute shows the node's hop).
#[test]
fn decap_delivers_only_while_the_ttl_allows() {
    let mut fx = Fixture::new();
    let (verdict, out, moved) = decap_tc_ttl(&mut fx, OUR_POD, 2);
    assert_eq!(verdict, TC_ACT_REDIRECT, "TTL 2: {moved:?}");
    assert_eq!(out[14 + 8], 1, "TTL 2 → 1");
    assert_eq!(
        header_checksum(&out[14..34]),
        u16::from_be_bytes([out[24], out[25]]),
        "TTL 2 → 1: header checksum updated"
    );
    assert_eq!(&out[..12], &[POD_MAC, BRIDGE_MAC].concat(), "TTL 2: to the pod");
    for ttl in [1, 0] {
        let (verdict, out, moved) = decap_tc_ttl(&mut fx, OUR_POD, ttl);
        assert_eq!(verdict, TC_ACT_OK, "TTL {ttl}: to the stack; moved {moved:?}");
        assert_eq!(out[14 + 8], ttl, "TTL {ttl} left for the stack to judge");
        assert_eq!(&out[..6], &fx.underlay_mac, "TTL {ttl}: addressed to the node");
        assert!(
            moved.contains(&("decap_packets", 1)) && !moved.iter().any(|m| m.0 == "deliver_packets"),
            "TTL {ttl}: {moved:?}"
        );
    }
}

#[test]
fn decap_restores_the_inner_packet_in_xdp_and_tc() {
    let mut fx = Fixture::new();
    // Another pod of ours that is not (yet) a known endpoint: always via the stack.
    let unknown_pod = Ipv4Addr::new(10, 244, 1, 3);
    for (prog, dst) in [
        (programs::DECAP_XDP, OUR_POD),
        (programs::DECAP_TC, unknown_pod),
        (programs::DECAP_TC, OUR_POD),
    ] {
        for (name, _) in pod_packets() {
            let inner = match name {
                "tcp" => packet::ipv4(PEER_POD, dst, IPPROTO_TCP, &[0x22; 40]),
                _ => packet::udp(PEER_POD, dst, 6000, 5000, b"reply"),
            };
            let frame = packet::vxlan(&fx.vxlan_from_peer(&inner), &inner);
            let before = fx.node.counters();
            let (verdict, out) = fx.node.run(prog, &frame);
            let delivered = prog == programs::DECAP_TC && dst == OUR_POD;
            let want_verdict = match prog {
                programs::DECAP_XDP => XDP_PASS,
                _ if delivered => TC_ACT_REDIRECT,
                _ => TC_ACT_OK,
            };
            assert_eq!(verdict, want_verdict, "{prog}/{name} to {dst}: verdict");
            let expected = if delivered {
                // Straight to the pod, as the node's routing would send it: from the bridge's
                // MAC to the pod's, TTL 64 → 63, header checksum updated.
                let mut ip = inner.clone();
                assert_eq!(ip[8], 64);
                ip[8] = 63;
                let c = header_checksum(&ip[..20]);
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                packet::eth_ip(POD_MAC, BRIDGE_MAC, &ip)
            } else {
                let e = packet::eth_ip(fx.underlay_mac, PEER_VTEP, &inner);
                if prog == programs::DECAP_XDP {
                    // XDP marks what it stripped for the TC program after GRO.
                    xdp_stripped(fx.node.xdp_meta(), fx.underlay_mac, &e)
                } else {
                    e
                }
            };
            assert_eq!(
                out, expected,
                "{prog}/{name} to {dst}: decapsulated frame (and XDP's metadata)"
            );
            let after = fx.node.counters();
            assert_eq!(
                (
                    delta(&before, &after, Counter::DecapPackets),
                    delta(&before, &after, Counter::DeliverPackets)
                ),
                (1, u64::from(delivered)),
                "{prog}/{name} to {dst}: (decap_packets, deliver_packets)"
            );
        }
    }
}

#[test]
fn decap_verdicts_for_bad_and_foreign_packets() {
    let mut fx = Fixture::new();
    let inner = packet::udp(PEER_POD, OUR_POD, 6000, 5000, b"payload-payload");
    let good = fx.vxlan_from_peer(&inner);
    let mut wrong_vni = good;
    wrong_vni.vni = 42;
    let mut unknown = good;
    unknown.src_ip = [198, 18, 0, 99];
    let spoofed_inner = packet::udp(
        Ipv4Addr::new(10, 244, 3, 3),
        OUR_POD,
        6000,
        5000,
        b"payload-payload",
    );
    let mut truncated = packet::vxlan(&good, &inner);
    truncated.truncate(truncated.len() - 10);
    let mut fragment = packet::vxlan(&good, &inner);
    fragment[20] = 0x20; // More Fragments
    let mut options = packet::vxlan(&good, &inner);
    options[14] = 0x46;
    let mut no_i_flag = packet::vxlan(&good, &inner);
    no_i_flag[42] = 0;
    let mut other_port = good;
    other_port.dst_port = 4789;
    let not_udp = packet::eth_ip(
        fx.underlay_mac,
        PEER_UNDERLAY_MAC,
        &packet::ipv4(PEER_IP, OUR_IP, IPPROTO_TCP, &[0; 40]),
    );
    let plain_udp = packet::eth_ip(
        fx.underlay_mac,
        PEER_UNDERLAY_MAC,
        &packet::udp(PEER_IP, OUR_IP, 1, 53, b"dns"),
    );
    let arp = packet::eth([0xff; 6], PEER_UNDERLAY_MAC, 0x0806, &[0u8; 28]);
    let runt = vec![0u8; 20];

    // (name, frame, dropped?, counter)
    let cases: Vec<DecapCase> = vec![
        (
            "wrong VNI",
            packet::vxlan(&wrong_vni, &inner),
            true,
            Counter::DropWrongVni,
        ),
        (
            "unknown source",
            packet::vxlan(&unknown, &inner),
            true,
            Counter::DropUnknownPeer,
        ),
        (
            "inner source outside the peer's subnet",
            packet::vxlan(&good, &spoofed_inner),
            true,
            Counter::DropSpoofedSource,
        ),
        ("truncated", truncated, true, Counter::DropMalformed),
        ("first fragment", fragment, true, Counter::DropFragment),
        (
            "VXLAN without the I flag",
            no_i_flag,
            true,
            Counter::DropMalformed,
        ),
        ("IP options", options, false, Counter::PassDecap),
        (
            "another UDP port",
            packet::vxlan(&other_port, &inner),
            false,
            Counter::PassDecap,
        ),
        ("not UDP", not_udp, false, Counter::PassDecap),
        ("plain UDP", plain_udp, false, Counter::PassDecap),
        ("ARP", arp, false, Counter::PassDecap),
        ("runt", runt, false, Counter::PassDecap),
    ];
    assert_decap_cases(&mut fx.node, &cases, <[u8]>::to_vec);
}

#[test]
fn programs_count_per_cpu_and_pins_live_under_the_pin_root() {
    let mut fx = Fixture::new();
    let frame = packet::eth_ip(
        fx.underlay_mac,
        PEER_UNDERLAY_MAC,
        &packet::udp(PEER_IP, OUR_IP, 1, 53, b"dns"),
    );
    // Each CPU counts in its own slot: runs pinned to the first CPU land there and nowhere else,
    // runs on the last CPU land there, and the agent's reading is their sum.
    let online = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    let cpus: Vec<usize> = (0..nix::sched::CpuSet::count())
        .filter(|&c| online.is_set(c).unwrap_or(false))
        .collect();
    let (first, last) = (cpus[0], *cpus.last().unwrap());
    let before = fx.node.counters();
    let slot_before = fx.per_cpu(Counter::PassDecap);
    for (cpu, runs) in [(first, 5u64), (last, 3)] {
        let mut only = nix::sched::CpuSet::new();
        only.set(cpu).unwrap();
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &only).unwrap();
        for _ in 0..runs {
            assert_eq!(fx.node.run(programs::DECAP_XDP, &frame).0, XDP_PASS);
        }
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &online).unwrap();
    let slot_after = fx.per_cpu(Counter::PassDecap);
    let grew: Vec<(usize, u64)> = slot_after
        .iter()
        .zip(&slot_before)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(cpu, (a, b))| (cpu, a - b))
        .collect();
    let want: Vec<(usize, u64)> = if first == last {
        vec![(first, 8)]
    } else {
        vec![(first, 5), (last, 3)]
    };
    assert_eq!(grew, want, "per-CPU slots that grew (cpu, by)");
    assert_eq!(delta(&before, &fx.node.counters(), Counter::PassDecap), 8);
    let pinned = overlay_agent::dataplane::pinned::read_pinned_counters(fx.node.dp.pin_root()).unwrap();
    assert_eq!(
        pinned,
        fx.node.counters(),
        "the pinned counter map is the one the programs write"
    );
    for m in overlay_common::maps::ALL {
        assert!(
            fx.node.dp.pin_root().join(m).exists(),
            "map {m} not pinned under {}",
            fx.node.dp.pin_root().display()
        );
    }
    let _ = IPPROTO_UDP;
}

#[test]
fn a_pinned_counters_map_with_another_layout_is_replaced_and_its_counts_carried_over() {
    require_root();
    let pins = PinRoot::new();
    std::fs::create_dir_all(&pins.0).unwrap();
    // What an older agent with fewer counter slots would have left behind (the release before
    // datapath v2 had 18), with counts in it.
    let path = pins.0.join(overlay_common::maps::COUNTERS);
    let out = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&path)
        .args([
            "type",
            "percpu_array",
            "key",
            "4",
            "value",
            "8",
            "entries",
            "18",
            "name",
            "OVL_COUNTERS",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Slot 2 (decap_packets) = 7 on every CPU, slot 10 (drop_unknown_peer) = 3 on every CPU.
    for (slot, value) in [(2u32, 7u64), (10, 3)] {
        let mut args: Vec<String> = vec!["map".into(), "update".into(), "pinned".into()];
        args.push(path.display().to_string());
        args.push("key".into());
        args.extend(slot.to_le_bytes().iter().map(|b| b.to_string()));
        args.push("value".into());
        args.extend(value.to_le_bytes().iter().map(|b| b.to_string()));
        let out = std::process::Command::new("bpftool")
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bpftool map update: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let cpus = aya::util::nr_cpus().unwrap() as u64;
    let dp = Dataplane::load(&pins.0).expect("loading over an incompatible pinned map");
    let counters = dp.counters().expect("reading counters from the replaced map");
    assert_eq!(counters.0.len(), overlay_common::counters::COUNTER_COUNT as usize);
    assert_eq!(
        (
            counters.get(Counter::DecapPackets),
            counters.get(Counter::DropUnknownPeer)
        ),
        (7 * cpus, 3 * cpus),
        "the counts of the retired map must be carried over"
    );
    assert_eq!(counters.get(Counter::EncapPackets), 0);
    let pinned = aya::maps::MapData::from_pin(&path).unwrap();
    assert_eq!(
        pinned.info().unwrap().max_entries(),
        overlay_common::counters::COUNTER_SLOTS,
        "the pin must now be the new map"
    );
}

/// What the rules say a frame should get: (dropped?, counter).
type Verdict = (bool, Counter);

/// Independent reference model of the decap rules, on plain bytes.
fn model_decap(f: &[u8], tc: bool) -> Verdict {
    const PASS: Verdict = (false, Counter::PassDecap);
    let be16 = |o: usize| u16::from_be_bytes([f[o], f[o + 1]]);
    if f.len() < 34 || be16(12) != 0x0800 || f[23] != 17 || f[14] != 0x45 || f[30..34] != OUR_IP.octets() {
        return PASS;
    }
    // UDP and beyond are only examined in frames long enough to be VXLAN at all (84 bytes).
    let full = f.len() >= 84;
    let frag = be16(20) & 0x3fff;
    if frag != 0 {
        return if frag & 0x1fff == 0 && full && be16(36) == DEFAULT_VXLAN_PORT {
            (true, Counter::DropFragment)
        } else {
            PASS
        };
    }
    if !full || be16(36) != DEFAULT_VXLAN_PORT {
        return PASS;
    }
    let (tot, udp) = (be16(16) as usize, be16(38) as usize);
    if tot + 14 > f.len() || udp + 20 != tot || tot < 70 {
        return (true, Counter::DropMalformed);
    }
    if f[26..30] != PEER_IP.octets() {
        return (true, Counter::DropUnknownPeer);
    }
    if f[42] & 0x08 == 0 {
        return (true, Counter::DropMalformed);
    }
    if u32::from_be_bytes([0, f[46], f[47], f[48]]) != DEFAULT_VNI {
        return (true, Counter::DropWrongVni);
    }
    if be16(62) != 0x0800 || f[64] >> 4 != 4 {
        return (true, Counter::DropMalformed);
    }
    if f[76..79] != [10, 244, 2] {
        return (true, Counter::DropSpoofedSource);
    }
    if f[50..56] != OUR_VTEP {
        return (true, Counter::DropInnerMac);
    }
    // TC hands packets for a local endpoint straight to it unless their TTL runs out here, or
    // they are fragments or ICMP errors (conntrack's to reassemble or translate: the stack).
    let inner_frag = be16(70) & 0x3fff != 0;
    let ihl = usize::from(f[64] & 0x0f) * 4;
    let icmp_error = f[73] == 1 && f.get(64 + ihl).is_some_and(|t| matches!(t, 3 | 4 | 5 | 11 | 12));
    if tc && f[80..84] == OUR_POD.octets() && f[72] > 1 && !inner_frag && !icmp_error {
        return (false, Counter::DeliverPackets);
    }
    (false, Counter::DecapPackets)
}

/// What a decap program must output for a frame the model gave `counter` (`None`: a drop,
/// whose bytes nobody reads). Outer headers are exactly 50 bytes in every frame the model lets
/// through (IHL 5, no VLAN); the TTL is decremented with the header checksum patched per
/// RFC 1624, so a packet whose checksum was already wrong stays wrong by the same amount.
/// A frame for the stack is addressed to the underlay NIC (`underlay_mac`), so the node takes
/// it as its own; XDP (`xdp`: whether the kernel gives it metadata) marks it ([`xdp_stripped`]).
fn model_decap_output(
    f: &[u8],
    xdp: Option<bool>,
    counter: Counter,
    underlay_mac: [u8; 6],
) -> Option<Vec<u8>> {
    const OUTER: usize = 50;
    match counter {
        Counter::PassDecap => Some(f.to_vec()),
        Counter::DecapPackets => Some(match xdp {
            Some(meta) => xdp_stripped(meta, underlay_mac, &f[OUTER..]),
            None => {
                let mut out = f[OUTER..].to_vec();
                out[..6].copy_from_slice(&underlay_mac);
                out
            }
        }),
        Counter::DeliverPackets => {
            let mut out = f[OUTER..].to_vec();
            out[0..6].copy_from_slice(&POD_MAC);
            out[6..12].copy_from_slice(&BRIDGE_MAC);
            let (ttl, proto) = (out[22], out[23]);
            let old = u16::from_be_bytes([ttl, proto]);
            let new = u16::from_be_bytes([ttl - 1, proto]);
            out[22] = ttl - 1;
            let hc = u16::from_be_bytes([out[24], out[25]]);
            let mut sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            out[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
            Some(out)
        }
        _ => None,
    }
}

/// Independent reference model of the encap rules.
fn model_encap(f: &[u8]) -> Verdict {
    if u16::from_be_bytes([f[12], f[13]]) != 0x0800 {
        return (false, Counter::PassEncap);
    }
    if f.len() < 34 {
        return (true, Counter::DropMalformed);
    }
    if f[30..33] != [10, 244, 2] {
        return (false, Counter::PassEncap);
    }
    if f.len() - 14 > 1450 {
        return (false, Counter::PassTooBig);
    }
    (false, Counter::EncapPackets)
}

/// A random or mutated frame: valid VXLAN or pod frames bent in the ways that break parsers.
fn fuzz_frame(rng: &mut Rng, underlay_mac: [u8; 6], decap: bool) -> Vec<u8> {
    let inner = match rng.below(3) {
        0 => packet::udp(PEER_POD, OUR_POD, 1, 2, &vec![7u8; rng.below(200)]),
        1 => packet::ipv4(PEER_POD, OUR_POD, IPPROTO_TCP, &vec![9u8; 20 + rng.below(1500)]),
        // From any subnet, to our local pod or to an address on our node that is no endpoint
        // (TC decap then hands it to the stack instead of delivering it).
        _ => packet::ipv4(
            Ipv4Addr::new(10, 244, rng.below(4) as u8, 9),
            [OUR_POD, Ipv4Addr::new(10, 244, 1, 77)][rng.below(2)],
            1,
            &[8, 0, 0, 0],
        ),
    };
    // TTLs that may expire here (the header checksum kept valid): the model delivers only > 1.
    let mut inner = inner;
    if rng.below(4) == 0 {
        inner[8] = [2, 1, 0][rng.below(3)];
        let c = header_checksum(&inner[..20]);
        inner[10..12].copy_from_slice(&c.to_be_bytes());
    }
    let mut f = if decap {
        let mut p = vxlan_from_peer(underlay_mac);
        if rng.below(8) == 0 {
            p.vni = rng.below(4) as u32;
        }
        if rng.below(8) == 0 {
            p.src_ip[3] = rng.below(256) as u8;
        }
        if rng.below(10) == 0 {
            p.dst_port = [8472, 4789, 53][rng.below(3)];
        }
        if rng.below(10) == 0 {
            // Not for our VtepMAC: the sender's own, broadcast, or ours with one bit off.
            p.inner_dst_mac = [PEER_VTEP, [0xff; 6], [0x0e, 0, 0, 0, 0, 0x10]][rng.below(3)];
        }
        packet::vxlan(&p, &inner)
    } else {
        let dst = [PEER_POD, Ipv4Addr::new(10, 244, 3, 3), Ipv4Addr::new(10, 9, 9, 9)][rng.below(3)];
        let mut ip = inner.clone();
        ip[16..20].copy_from_slice(&dst.octets());
        packet::eth_ip(BRIDGE_MAC, POD_MAC, &ip)
    };
    // Mutations (every frame is at least 42 bytes here); truncation comes last.
    for _ in 0..rng.below(4) {
        match rng.below(9) {
            0 => {}
            1 => f[14] = 0x40 | (rng.below(16) as u8), // IHL
            2 => f[20] = [0x20, 0x00, 0x40, 0x01][rng.below(4)], // MF / offset / DF
            3 => {
                // A VLAN tag in front of the IP header.
                f.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
            }
            4 => f[12..14].copy_from_slice(&[[0x86, 0xdd], [0x08, 0x06], [0x08, 0x00]][rng.below(3)]),
            5 if f.len() > 40 => f[38..40].copy_from_slice(&(rng.below(70000) as u16).to_be_bytes()), // UDP length
            6 if f.len() > 18 => f[16..18].copy_from_slice(&(rng.below(70000) as u16).to_be_bytes()), // IP length
            7 => {
                let i = rng.below(f.len().min(90));
                f[i] = rng.below(256) as u8;
            }
            _ => f[23] = [17, 6, 1][rng.below(3)],
        }
    }
    if rng.below(6) == 0 {
        let n = 14 + rng.below(f.len() - 13);
        f.truncate(n);
    }
    f
}

/// The IPv4 half of the fuzz run: VXLAN frames to decap and pod frames to encap, bent.
struct Model {
    underlay_mac: [u8; 6],
    xdp_meta: bool,
}

impl FuzzModel for Model {
    fn frame(&mut self, rng: &mut Rng, i: usize) -> (&'static str, Vec<u8>) {
        let decap = i.is_multiple_of(2);
        let frame = fuzz_frame(rng, self.underlay_mac, decap);
        let prog = if decap {
            if i.is_multiple_of(4) {
                programs::DECAP_XDP
            } else {
                programs::DECAP_TC
            }
        } else {
            programs::ENCAP
        };
        (prog, frame)
    }

    fn expect(&mut self, prog: &'static str, frame: &[u8]) -> Expect {
        if prog == programs::ENCAP {
            let (drop, counter) = model_encap(frame);
            return Expect {
                drop,
                counter,
                redirect: None,
                output: None,
            };
        }
        let (drop, counter) =
            if prog == programs::DECAP_XDP && !self.xdp_meta && frame[6..12] == self.underlay_mac {
                // Without XDP metadata, the NIC's own MAC as the source is XDP's mark.
                (true, Counter::DropOwnMac)
            } else {
                model_decap(frame, prog == programs::DECAP_TC)
            };
        Expect {
            drop,
            counter,
            redirect: Some(counter == Counter::DeliverPackets),
            output: model_decap_output(
                frame,
                (prog == programs::DECAP_XDP).then_some(self.xdp_meta),
                counter,
                self.underlay_mac,
            ),
        }
    }

    fn classes(&self) -> Vec<(&'static str, Counter)> {
        let mut decap_classes = vec![Counter::PassDecap, Counter::DecapPackets];
        decap_classes.extend(DECAP_DROPS);
        // Not the model's encap DropMalformed (an IPv4 frame shorter than 34 bytes): the fuzz
        // loop pads such frames to 34, since BPF_PROG_TEST_RUN refuses them for TC programs.
        let encap_classes = [Counter::PassEncap, Counter::PassTooBig, Counter::EncapPackets];
        let mut wanted: Vec<(&str, Counter)> = Vec::new();
        wanted.extend(decap_classes.iter().map(|c| (programs::DECAP_XDP, *c)));
        wanted.extend(decap_classes.iter().map(|c| (programs::DECAP_TC, *c)));
        wanted.push((programs::DECAP_TC, Counter::DeliverPackets));
        wanted.extend(encap_classes.iter().map(|c| (programs::ENCAP, *c)));
        wanted
    }
}

#[test]
fn fuzzed_packets_get_exactly_the_verdicts_of_the_reference_model() {
    let mut fx = Fixture::new();
    let mut model = Model {
        underlay_mac: fx.underlay_mac,
        xdp_meta: fx.node.xdp_meta(),
    };
    fuzz(&mut fx.node, &mut model, 0x5eed_1234_abcd_0001, 100_000);
}

#[test]
fn a_full_peer_map_is_a_clear_error_and_nothing_is_half_applied() {
    use overlay_agent::dataplane::DataplaneError;
    require_root();
    let pins = PinRoot::new();
    let mut dp = Dataplane::load_with_capacity(&pins.0, 4).unwrap();
    let peer = |i: u8| PeerEntry::<V4> {
        subnet: format!("10.244.{i}.0/24").parse().unwrap(),
        public_ip: Ipv4Addr::new(198, 18, 1, i),
        vtep_mac: [0x0e, 0, 0, 0, 1, i],
        direct: false,
    };
    for i in 1..=4 {
        dp.upsert_peer(&peer(i)).unwrap();
    }
    match dp.upsert_peer(&peer(5)) {
        Err(e @ DataplaneError::PeersFull { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("10.244.5.0/24") && msg.contains("full"),
                "unclear error: {msg}"
            );
        }
        other => panic!("a fifth peer in a 4-entry map must fail with PeersFull, got {other:?}"),
    }
    let mut subnets: Vec<String> = dp
        .peers::<V4>()
        .unwrap()
        .iter()
        .map(|p| p.subnet.to_string())
        .collect();
    subnets.sort();
    assert_eq!(
        subnets,
        ["10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24", "10.244.4.0/24"]
    );
    // The sender table did not keep the rejected peer either (no half-applied state).
    let vteps: aya::maps::HashMap<_, [u8; 4], overlay_common::Vtep> =
        aya::maps::HashMap::try_from(dp.ebpf_mut().map(overlay_common::maps::VTEPS).unwrap()).unwrap();
    assert!(
        vteps.get(&[198, 18, 1, 5], 0).is_err(),
        "the rejected peer's sender entry was left behind"
    );
    assert_eq!(vteps.keys().count(), 4);
    // Two subnets, one PublicIP (a node that took a new subnet while its old lease lives on):
    // the sender entry of 198.18.1.4 exists for 10.244.4.0/24. A new subnet from that address
    // that does not fit must leave the old entry as it was, not remove it: decap checks every
    // packet from 198.18.1.4 against it.
    let mut second = peer(4);
    second.subnet = "10.244.9.0/24".parse().unwrap();
    assert!(
        matches!(dp.upsert_peer(&second), Err(DataplaneError::PeersFull { .. })),
        "a fifth subnet in a 4-entry map must fail with PeersFull"
    );
    let vteps: aya::maps::HashMap<_, [u8; 4], overlay_common::Vtep> =
        aya::maps::HashMap::try_from(dp.ebpf_mut().map(overlay_common::maps::VTEPS).unwrap()).unwrap();
    let kept = vteps
        .get(&[198, 18, 1, 4], 0)
        .expect("the rollback removed the sender entry another subnet still uses");
    assert_eq!(
        (kept.subnet, kept.prefix_len),
        ([10, 244, 4, 0], 24),
        "the rollback must restore the sender entry as it was"
    );
    // Updating a peer that is already there still works when the map is full.
    let mut moved = peer(2);
    moved.vtep_mac = [0x0e, 0, 0, 0, 2, 2];
    dp.upsert_peer(&moved)
        .expect("updating an existing peer in a full map");
}

/// The load-time probe tells what this kernel takes: the datapath loads from 5.11 on (encap's
/// `BPF_F_ADJ_ROOM_ENCAP_L2_ETH`), with TCX from 6.6, and marks the config for decap's
/// `BPF_F_ADJ_ROOM_DECAP_L4_UDP` only where the kernel took it. Older kernels are refused at
/// load with an error naming the kernel and the missing flag (the VM tier runs this test on
/// Debian 11's 5.10 too).
#[test]
fn kernel_features_are_probed_once_at_load_and_old_kernels_refused() {
    require_root();
    let ns = Netns::new("ptk").unwrap();
    let _inside = ns.enter().unwrap();
    let pins = PinRoot::new();
    let version = aya::util::KernelVersion::current().expect("the running kernel's version");
    let loaded = Dataplane::load(&pins.0);
    if version < aya::util::KernelVersion::new(5, 11, 0) {
        let err = loaded
            .err()
            .expect("a kernel before 5.11 must be refused at load")
            .to_string();
        assert!(
            err.contains(&overlay_agent::dataplane::kernel_release()) && err.contains("ENCAP_L2_ETH"),
            "the refusal names the kernel and what it lacks: {err}"
        );
        return;
    }
    let mut dp = loaded.expect("loading the datapath");
    let f = dp.features();
    assert_eq!(
        f.tcx,
        version >= aya::util::KernelVersion::new(6, 6, 0),
        "TCX from 6.6 on: {f:?}"
    );
    dp.set_config(&DataplaneConfig::default()).unwrap();
    let flags = {
        let map = dp.ebpf_mut().map(overlay_common::maps::CONFIG).unwrap();
        let arr = aya::maps::Array::<_, DataplaneConfig>::try_from(map).unwrap();
        arr.get(&0, 0).unwrap().flags
    };
    assert_eq!(
        flags & overlay_common::maps::CONFIG_DECAP_L4_UDP != 0,
        f.decap_l4_udp,
        "the config carries the probe's DECAP_L4_UDP answer: flags {flags:#x}, {f:?}"
    );
}

/// The peer's traffic counts in `OVL_PEER_STATS`, summed over the CPUs; `None` without an entry.
fn peer_stats(fx: &mut Fixture, ip: Ipv4Addr) -> Option<overlay_common::PeerStats> {
    let map = fx.node.dp.ebpf_mut().map(maps::PEER_STATS).unwrap();
    let stats: aya::maps::PerCpuHashMap<_, [u8; 4], overlay_common::PeerStats> =
        aya::maps::PerCpuHashMap::try_from(map).unwrap();
    let v = stats.get(&ip.octets(), 0).ok()?;
    Some(overlay_agent::dataplane::pinned::sum_per_cpu(v.iter()))
}

#[test]
fn per_peer_counts_are_exact_and_exist_only_for_members() {
    let mut fx = Fixture::new();
    let zero = peer_stats(&mut fx, PEER_IP).expect("the agent's upsert created the member's entry");
    assert_eq!(zero, overlay_common::PeerStats::default());
    // 5 pod packets to the peer's subnet: 5 sent, with the bytes as they left.
    let mut sent_bytes = 0;
    for (_, ip) in pod_packets().into_iter().chain(pod_packets().into_iter().take(1)) {
        let (verdict, out) = fx
            .node
            .run(programs::ENCAP, &packet::eth_ip(BRIDGE_MAC, POD_MAC, &ip));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        sent_bytes += out.len() as u64;
    }
    let s = peer_stats(&mut fx, PEER_IP).unwrap();
    assert_eq!((s.tx_packets, s.tx_bytes), (5, sent_bytes), "{s:?}");
    assert!(s.tx_last_ns > 0 && s.rx_last_ns == 0, "{s:?}");
    // 3 VXLAN frames from the peer (2 by XDP, 1 by TC), 2 with a wrong VNI, 1 from a stranger.
    let [good, wrong, stranger] = peer_frames(&fx);
    let inner = packet::udp(PEER_POD, OUR_POD, 6000, 5000, b"payload-payload");
    for (prog, frame) in [
        (programs::DECAP_XDP, &good),
        (programs::DECAP_XDP, &good),
        (programs::DECAP_TC, &good),
        (programs::DECAP_XDP, &wrong),
        (programs::DECAP_TC, &wrong),
        (programs::DECAP_XDP, &stranger),
    ] {
        fx.node.run(prog, frame);
    }
    let s = peer_stats(&mut fx, PEER_IP).unwrap();
    // Bytes once stripped: the inner frame, 14 + the inner IP packet.
    let inner_frame = (ETH_HDR + inner.len()) as u64;
    assert_eq!(
        (s.rx_packets, s.rx_bytes, s.rx_drops, s.tx_drops),
        (3, 3 * inner_frame, 2, 0),
        "{s:?}"
    );
    assert!(s.rx_last_ns >= s.tx_last_ns, "{s:?}");
    assert_eq!(
        peer_stats(&mut fx, Ipv4Addr::new(198, 18, 0, 99)),
        None,
        "no entry for a stranger"
    );
    // The member leaves: its entry goes with its sender entry.
    fx.node
        .dp
        .remove_peer::<V4>("10.244.2.0/24".parse().unwrap(), PEER_IP)
        .unwrap();
    assert_eq!(
        peer_stats(&mut fx, PEER_IP),
        None,
        "the entry outlived the member"
    );
}

const ETH_HDR: usize = 14;

/// VXLAN frames to us around one pod packet: from the peer, from the peer with a wrong VNI
/// (42), and from a stranger (198.18.0.99).
fn peer_frames(fx: &Fixture) -> [Vec<u8>; 3] {
    let inner = packet::udp(PEER_POD, OUR_POD, 6000, 5000, b"payload-payload");
    let good = vxlan_from_peer(fx.underlay_mac);
    let mut wrong = good;
    wrong.vni = 42;
    let mut stranger = good;
    stranger.src_ip = [198, 18, 0, 99];
    [good, wrong, stranger].map(|p| packet::vxlan(&p, &inner))
}

/// CLOCK_MONOTONIC, the programs' `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn set_monitor(fx: &mut Fixture, m: overlay_common::monitor::MonitorConfig) {
    let map = fx.node.dp.ebpf_mut().map_mut(maps::MONITOR).unwrap();
    let mut arr: aya::maps::Array<_, overlay_common::monitor::MonitorConfig> =
        aya::maps::Array::try_from(map).unwrap();
    arr.set(0, m, 0).unwrap();
}

/// Every event in the ring, as the programs wrote them.
fn drain_events(fx: &mut Fixture) -> Vec<overlay_common::monitor::DropEvent> {
    let map = fx.node.dp.ebpf_mut().map_mut(maps::EVENTS).unwrap();
    let mut ring = aya::maps::RingBuf::try_from(map).unwrap();
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        assert_eq!(
            item.len(),
            std::mem::size_of::<overlay_common::monitor::DropEvent>()
        );
        // SAFETY: length checked; plain old data.
        out.push(unsafe {
            std::ptr::read_unaligned(item.as_ptr() as *const overlay_common::monitor::DropEvent)
        });
    }
    out
}

#[test]
fn drops_are_reported_with_their_fields_only_while_a_monitor_asks_within_its_rate() {
    use overlay_common::monitor::{Hook, MonitorConfig, CAPTURE};
    let mut fx = Fixture::new();
    let [_, wrong, stranger] = peer_frames(&fx);
    let pod_vxlan = packet::eth_ip(
        BRIDGE_MAC,
        POD_MAC,
        &packet::udp(OUR_POD, PEER_IP, 5000, 8472, b"x"),
    );

    // No monitor: nothing reported, nothing counted as kept back.
    let before = fx.node.counters();
    fx.node.run(programs::DECAP_XDP, &wrong);
    assert!(drain_events(&mut fx).is_empty());
    let after = fx.node.counters();
    for c in [
        Counter::MonitorEvents,
        Counter::MonitorSuppressed,
        Counter::MonitorLost,
    ] {
        assert_eq!(delta(&before, &after, c), 0, "{}", c.name());
    }

    let all = u64::MAX;
    let live = |reasons, rate, burst| MonitorConfig {
        until_ns: monotonic_ns() + 60_000_000_000,
        reasons,
        rate,
        burst,
    };
    set_monitor(&mut fx, live(all, 1000, 100));
    let before = fx.node.counters();
    fx.node.run(programs::DECAP_XDP, &wrong);
    fx.node.run(programs::DECAP_TC, &stranger);
    fx.node.run(programs::ENCAP, &pod_vxlan);
    let events = drain_events(&mut fx);
    let after = fx.node.counters();
    assert_eq!(delta(&before, &after, Counter::MonitorEvents), 3);
    let want = [
        (Counter::DropWrongVni, Hook::DecapXdp, &wrong),
        (Counter::DropUnknownPeer, Hook::DecapTc, &stranger),
        (Counter::DropPodVxlan, Hook::Encap, &pod_vxlan),
    ];
    assert_eq!(events.len(), want.len(), "{events:?}");
    let mut last_ts = 0;
    for (e, (reason, hook, frame)) in events.iter().zip(want) {
        let what = reason.name();
        assert_eq!((e.reason, e.hook), (reason as u16, hook as u8), "{what}");
        assert_eq!(e.len as usize, frame.len(), "{what}: the packet's length");
        let n = usize::from(e.captured);
        // Both hooks copy whole 8-byte steps, up to CAPTURE.
        assert_eq!(
            n,
            frame.len().min(CAPTURE) / 8 * 8,
            "{what}: bytes captured of {}",
            frame.len()
        );
        assert_eq!(&e.data[..n], &frame[..n], "{what}: the packet's first bytes");
        assert!(e.ts_ns >= last_ts && e.ts_ns <= monotonic_ns(), "{what}: time");
        last_ts = e.ts_ns;
    }

    // Only the reasons asked for.
    set_monitor(&mut fx, live(1 << Counter::DropUnknownPeer as u32, 1000, 100));
    fx.node.run(programs::DECAP_XDP, &wrong);
    fx.node.run(programs::DECAP_XDP, &stranger);
    let events = drain_events(&mut fx);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].reason, Counter::DropUnknownPeer as u16);

    // A lease that ran out (the monitor died): nothing.
    let mut expired = live(all, 1000, 100);
    expired.until_ns = monotonic_ns() - 1;
    set_monitor(&mut fx, expired);
    fx.node.run(programs::DECAP_XDP, &wrong);
    assert!(
        drain_events(&mut fx).is_empty(),
        "reported past the monitor's lease"
    );

    // The rate limit: a burst of 3 at 1 a second, 10 drops: 3 reported, 7 counted as kept back.
    set_monitor(&mut fx, live(all, 1, 3));
    let before = fx.node.counters();
    for _ in 0..10 {
        fx.node.run(programs::DECAP_XDP, &wrong);
    }
    let after = fx.node.counters();
    let events = drain_events(&mut fx);
    assert!(
        (3..=4).contains(&events.len()),
        "{} events reported against a burst of 3",
        events.len()
    );
    assert_eq!(
        delta(&before, &after, Counter::MonitorEvents) + delta(&before, &after, Counter::MonitorSuppressed),
        10,
        "every drop reported or counted as kept back"
    );

    // A full ring (nobody reads): what does not fit is counted as lost.
    set_monitor(&mut fx, live(all, 1_000_000, 1_000_000));
    let before = fx.node.counters();
    let slots = overlay_common::monitor::RING_BYTES as usize
        / (std::mem::size_of::<overlay_common::monitor::DropEvent>() + 8);
    for _ in 0..slots + 100 {
        fx.node.run(programs::DECAP_XDP, &wrong);
    }
    let after = fx.node.counters();
    let (reported, lost) = (
        delta(&before, &after, Counter::MonitorEvents),
        delta(&before, &after, Counter::MonitorLost),
    );
    assert_eq!(reported + lost, (slots + 100) as u64);
    assert!(
        lost >= 100 && reported as usize <= slots,
        "reported {reported}, lost {lost}, {slots} slots"
    );
    assert_eq!(drain_events(&mut fx).len() as u64, reported);
}
