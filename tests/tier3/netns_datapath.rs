//! Tier 3 (root): two node namespaces on an underlay, pods on each node's cni0, the programs
//! attached with the agent's own loading code, real pings across. No etcd: peers are written
//! directly, as the agent does for each lease.

use overlay_agent::{
    dataplane::{Dataplane, DecapMode, LocalEndpoint, PeerEntry},
    family::V4,
};
use overlay_common::{Counter, DataplaneConfig, DEFAULT_VNI, DEFAULT_VXLAN_PORT};
use overlay_tests::{
    netns::{require_root, PinRoot},
    topology::{ping, Node, Underlay},
};

fn vtep_mac(index: u8) -> [u8; 6] {
    [0x0e, 0, 0, 0, 0, index]
}

/// How decap hands packets to the local pod in a test run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delivery {
    /// No endpoint known: the stack routes the inner packet to the bridge.
    Stack,
    /// The pod is an endpoint: `bpf_redirect_peer` into its namespace.
    Peer,
    /// The pod is an endpoint: `bpf_redirect` through its host-side veth.
    Veth,
}

/// Loads and attaches the datapath inside `node`'s namespace, pointing at `peer`.
fn start(node: &Node, peer: &Node, pins: &PinRoot, mode: DecapMode) -> Dataplane {
    start_delivering(node, peer, pins, mode, Delivery::Stack)
}

fn start_delivering(node: &Node, peer: &Node, pins: &PinRoot, mode: DecapMode, how: Delivery) -> Dataplane {
    let _inside = node.ns.enter().unwrap();
    let mut dp = Dataplane::load(&pins.0).expect("loading the datapath");
    dp.attach_encap("cni0").expect("attaching encap to cni0");
    dp.attach_decap("eth0", mode, false)
        .expect("attaching decap to eth0");
    dp.set_config(&DataplaneConfig {
        public_ip: Node::underlay_ip(node.index).octets(),
        vni: DEFAULT_VNI,
        vtep_mac: vtep_mac(node.index),
        port: DEFAULT_VXLAN_PORT,
        underlay_ifindex: node.ns.ifindex("eth0").unwrap(),
        underlay_mac: node.ns.mac("eth0").unwrap(),
        flags: if how == Delivery::Veth {
            overlay_common::maps::CONFIG_DELIVER_VIA_VETH
        } else {
            0
        },
        inner_mtu: 1450,
    })
    .unwrap();
    if how != Delivery::Stack {
        let pod = &node.pods[0];
        let pod_mac = pod.ns.mac("eth0").unwrap();
        dp.upsert_endpoint(&LocalEndpoint::<V4> {
            ip: pod.ip,
            ifindex: node.ns.ifindex(&pod.veth).unwrap(),
            mac: pod_mac,
            gw_mac: node.ns.mac("cni0").unwrap(),
        })
        .unwrap();
    }
    dp.upsert_peer(&PeerEntry::<V4> {
        subnet: Node::subnet(peer.index).parse().unwrap(),
        public_ip: Node::underlay_ip(peer.index),
        vtep_mac: vtep_mac(peer.index),
        direct: false,
    })
    .unwrap();
    dp
}

fn two_nodes_forward_pod_traffic(mode: DecapMode) {
    forward_pod_traffic(mode, Delivery::Stack);
}

/// An underlay and two nodes on it, each with `cni0` and one pod at the tunnel MTU.
fn two_nodes() -> (Underlay, Node, Node) {
    let underlay = Underlay::new().unwrap();
    let mut a = Node::new(&underlay, 1, 1500).unwrap();
    let mut b = Node::new(&underlay, 2, 1500).unwrap();
    for n in [&mut a, &mut b] {
        n.add_bridge(1450).unwrap();
        n.add_pod(1, 1450).unwrap();
    }
    (underlay, a, b)
}

fn forward_pod_traffic(mode: DecapMode, how: Delivery) {
    require_root();
    let (pins_a, pins_b) = (PinRoot::new(), PinRoot::new());
    let (_underlay, a, b) = two_nodes();
    let dp_a = start_delivering(&a, &b, &pins_a, mode, how);
    let dp_b = start_delivering(&b, &a, &pins_b, mode, how);

    assert!(
        ping(&a.pods[0].ns, b.pods[0].ip, 5, None),
        "{mode:?}: pod {} could not ping pod {} across the overlay",
        a.pods[0].ip,
        b.pods[0].ip
    );
    // Full-size packets at the pod MTU (1450 − 28 bytes of IP/ICMP) with DF set.
    assert!(
        ping(&b.pods[0].ns, a.pods[0].ip, 3, Some(1422)),
        "{mode:?}: MTU-sized DF ping failed"
    );

    let (ca, cb) = (dp_a.counters().unwrap(), dp_b.counters().unwrap());
    for (name, c) in [("a", &ca), ("b", &cb)] {
        assert!(
            c.get(Counter::EncapPackets) >= 8,
            "{mode:?}: node {name} encapsulated {} packets, expected ≥ 8",
            c.get(Counter::EncapPackets)
        );
        assert!(
            c.get(Counter::DecapPackets) >= 8,
            "{mode:?}: node {name} decapsulated {} packets, expected ≥ 8",
            c.get(Counter::DecapPackets)
        );
        let drops: u64 = Counter::ALL
            .iter()
            .filter(|c| c.is_drop())
            .map(|d| c.get(*d))
            .sum();
        assert_eq!(drops, 0, "{mode:?}: node {name} dropped packets: {c:?}");
        // Every decapsulated packet went straight to the pod, or none did.
        let want = if how == Delivery::Stack {
            0
        } else {
            c.get(Counter::DecapPackets)
        };
        assert_eq!(
            c.get(Counter::DeliverPackets),
            want,
            "{mode:?}/{how:?}: node {name} delivered {} of {} decapsulated packets straight to the pod",
            c.get(Counter::DeliverPackets),
            c.get(Counter::DecapPackets)
        );
    }
    if how != Delivery::Stack {
        // The rest of the test is about pins, the same for every delivery.
        return;
    }

    // The links are pinned: with the loader gone (an agent restart), traffic keeps flowing.
    drop((dp_a, dp_b));
    assert!(
        ping(&a.pods[0].ns, b.pods[0].ip, 2, None),
        "{mode:?}: traffic stopped when the loader exited"
    );
    // A new loader adopts the pinned links and maps instead of attaching twice.
    let dp_a = start(&a, &b, &pins_a, mode);
    assert!(
        ping(&a.pods[0].ns, b.pods[0].ip, 2, None),
        "{mode:?}: traffic stopped after adoption"
    );
    // (No links directory at all where nothing was pinned: TC decap without TCX.)
    let links = std::fs::read_dir(pins_a.0.join("links")).map_or(0, |d| d.count());
    let tcx = overlay_agent::dataplane::kernel_has_tcx();
    if tcx {
        // XDP decap also has the TC program after GRO, which delivers to pods.
        let want = if mode == DecapMode::Xdp { 3 } else { 2 };
        assert_eq!(
            links, want,
            "{mode:?}: expected one pinned link per program (encap, decap, and TC delivery with XDP)"
        );
    } else {
        // Before 6.6 TC programs are clsact filters, not links: only XDP is pinned, and the
        // second loader replaced each filter of the first instead of adding one in front.
        let want = usize::from(mode == DecapMode::Xdp);
        assert_eq!(
            links, want,
            "{mode:?}: expected only XDP decap as a pinned link (no TCX)"
        );
        for (dev, prog) in [("cni0", "overlay_encap"), ("eth0", "overlay_decap_tc")] {
            assert_eq!(
                a.ns.our_tc_filters(dev, "ingress").unwrap(),
                [prog],
                "{mode:?}: expected exactly one clsact filter of ours on {dev} ingress after a restart"
            );
        }
    }
    drop(dp_a);
    // With TCX, removing the pins detaches everything and leaves nothing on bpffs; before it,
    // clsact filters stay until `overlay-agent cleanup` removes them, as the README says.
    for (node, pins) in [(&a, &pins_a), (&b, &pins_b)] {
        if tcx {
            overlay_agent::dataplane::pinned::remove_pins(&pins.0).unwrap();
        } else {
            let _inside = node.ns.enter().unwrap();
            let r = overlay_agent::cli::cleanup::run(&pins.0, &["eth0".into(), "cni0".into()]);
            assert!(r.failed.is_empty(), "{mode:?}: cleanup failed: {:?}", r.failed);
            for dev in ["cni0", "eth0"] {
                let left = node.ns.our_tc_filters(dev, "ingress").unwrap();
                assert!(
                    left.is_empty(),
                    "{mode:?}: cleanup left filters {left:?} on {dev}"
                );
            }
        }
        assert!(!pins.0.exists(), "pins left under {}", pins.0.display());
    }
    // The kernel releases an unpinned link asynchronously: give it a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while ping(&a.pods[0].ns, b.pods[0].ip, 1, None) {
        assert!(
            std::time::Instant::now() < deadline,
            "{mode:?}: traffic still flows 3 s after the pins were removed"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn xdp_decap_two_nodes_forward_pod_traffic() {
    two_nodes_forward_pod_traffic(DecapMode::Xdp);
}

#[test]
fn tc_decap_two_nodes_forward_pod_traffic() {
    two_nodes_forward_pod_traffic(DecapMode::Tc);
}

#[test]
fn tc_decap_delivers_straight_to_the_pod_with_redirect_peer() {
    forward_pod_traffic(DecapMode::Tc, Delivery::Peer);
}

#[test]
fn tc_decap_delivers_straight_to_the_pod_through_its_veth() {
    forward_pod_traffic(DecapMode::Tc, Delivery::Veth);
}

#[test]
fn xdp_decap_then_tc_delivers_straight_to_the_pod() {
    forward_pod_traffic(DecapMode::Xdp, Delivery::Peer);
}

/// Bulk TCP over a veth underlay, whose "wire" carries GSO super-packets: TC decap must take
/// them whole (not one MTU-sized packet at a time) and hand them to the pod still whole.
#[test]
fn bulk_tcp_crosses_a_gso_underlay_in_super_packets_delivered_whole() {
    require_root();
    let (pins_a, pins_b) = (PinRoot::new(), PinRoot::new());
    let (_underlay, a, mut b) = two_nodes();
    let dp_a = start_delivering(&a, &b, &pins_a, DecapMode::Tc, Delivery::Peer);
    let dp_b = start_delivering(&b, &a, &pins_b, DecapMode::Tc, Delivery::Peer);
    let before = dp_b.counters().unwrap();
    let server_ip = b.pods[0].ip;
    let (bps, _) = overlay_tests::cluster::tcp_transfer(&mut b.pods[0].ns, server_ip, &a.pods[0].ns, 2)
        .expect("iperf3 across the overlay");
    let after = dp_b.counters().unwrap();
    let d = |c: Counter| after.get(c) - before.get(c);
    let (packets, bytes, gso) = (
        d(Counter::DecapPackets),
        d(Counter::DecapBytes),
        d(Counter::DecapGsoPackets),
    );
    assert!(bps > 1e8, "bulk TCP ran at {bps:.0} bit/s");
    assert!(packets > 0, "node b decapsulated nothing");
    let mean = bytes / packets;
    assert!(
        mean > 4 * 1500,
        "decapsulated packets average {mean} bytes ({bytes} B in {packets}): GSO super-packets were \
         split before decap (expected far more than the 1500-byte MTU)"
    );
    assert!(
        gso * 2 > packets,
        "only {gso} of {packets} decapsulated packets were GSO super-packets"
    );
    assert_eq!(
        d(Counter::DeliverPackets),
        packets,
        "every decapsulated packet must go straight to the pod"
    );
    let drops: u64 = Counter::ALL.iter().filter(|c| c.is_drop()).map(|c| d(*c)).sum();
    assert_eq!(drops, 0, "node b dropped packets: {after:?}");
    drop((dp_a, dp_b));
    for pins in [&pins_a, &pins_b] {
        overlay_agent::dataplane::pinned::remove_pins(&pins.0).unwrap();
    }
}

/// A pod deleted and recreated with the same address while no agent keeps the endpoint map
/// (the agent restarting): the stale endpoint entry names a veth that is gone. Decap must not
/// redirect into it (a black hole) but hand the packets to the stack, which reaches the new pod.
#[test]
fn a_stale_endpoint_of_a_deleted_veth_falls_back_to_the_stack() {
    require_root();
    let (pins_a, pins_b) = (PinRoot::new(), PinRoot::new());
    let (_underlay, a, mut b) = two_nodes();
    let dp_a = start_delivering(&a, &b, &pins_a, DecapMode::Tc, Delivery::Peer);
    let dp_b = start_delivering(&b, &a, &pins_b, DecapMode::Tc, Delivery::Peer);
    assert!(
        ping(&a.pods[0].ns, b.pods[0].ip, 3, None),
        "before the pod restart"
    );
    let stale = dp_b.endpoints::<V4>().unwrap();
    assert_eq!(stale.len(), 1, "node b's endpoint: {stale:?}");
    let delivered = dp_b.counters().unwrap().get(Counter::DeliverPackets);
    assert!(
        delivered >= 3,
        "pings went straight to the pod before the restart ({delivered})"
    );

    b.recreate_pod(0, std::time::Duration::from_millis(100)).unwrap();
    // Nobody updated the maps: the endpoint map still names the old veth.
    let pinned = overlay_agent::dataplane::pinned::read_pinned_endpoints::<V4>(&pins_b.0).unwrap();
    assert_eq!(pinned, stale, "the endpoint map must still hold the stale entry");
    assert!(
        ping(&a.pods[0].ns, b.pods[0].ip, 5, None),
        "the recreated pod {} is unreachable: decap redirected into the deleted veth",
        b.pods[0].ip
    );
    let after = dp_b.counters().unwrap();
    assert_eq!(
        after.get(Counter::DeliverPackets),
        delivered,
        "nothing may be delivered to the deleted veth"
    );
    // The agent sees the entry as stale (ifindex 0), so its next resync replaces or removes it.
    let seen: Vec<u32> = dp_b
        .endpoints::<V4>()
        .unwrap()
        .iter()
        .map(|e| e.ifindex)
        .collect();
    assert_eq!(
        seen,
        vec![overlay_agent::dataplane::STALE_IFINDEX],
        "endpoints() must mark the stale entry"
    );
    drop((dp_a, dp_b));
    for pins in [&pins_a, &pins_b] {
        overlay_agent::dataplane::pinned::remove_pins(&pins.0).unwrap();
    }
}
