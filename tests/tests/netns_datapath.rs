//! Tier 3 (root): two node namespaces on an underlay, pods on each node's cni0, the programs
//! attached with the agent's own loading code, real pings across. No etcd: peers are written
//! directly, as the agent does for each lease.

use overlay_agent::dataplane::{Dataplane, DecapMode, PeerEntry};
use overlay_common::{Counter, DataplaneConfig, DEFAULT_VNI, DEFAULT_VXLAN_PORT};
use overlay_tests::{
    netns::{require_root, PinRoot},
    topology::{ping, Node, Underlay},
};

fn vtep_mac(index: u8) -> [u8; 6] {
    [0x0e, 0, 0, 0, 0, index]
}

/// Loads and attaches the datapath inside `node`'s namespace, pointing at `peer`.
fn start(node: &Node, peer: &Node, pins: &PinRoot, mode: DecapMode) -> Dataplane {
    let _inside = node.ns.enter().unwrap();
    let mut dp = Dataplane::load(&pins.0).expect("loading the datapath");
    dp.attach_encap("cni0").expect("attaching encap to cni0");
    dp.attach_decap("eth0", mode).expect("attaching decap to eth0");
    dp.set_config(&DataplaneConfig {
        public_ip: Node::underlay_ip(node.index).octets(),
        vni: DEFAULT_VNI,
        vtep_mac: vtep_mac(node.index),
        port: DEFAULT_VXLAN_PORT,
        underlay_ifindex: node.ns.ifindex("eth0").unwrap(),
        underlay_mac: node.ns.mac("eth0").unwrap(),
        flags: 0,
        inner_mtu: 1450,
    })
    .unwrap();
    dp.upsert_peer(&PeerEntry {
        subnet: Node::subnet(peer.index).parse().unwrap(),
        public_ip: Node::underlay_ip(peer.index),
        vtep_mac: vtep_mac(peer.index),
        direct: false,
    })
    .unwrap();
    dp
}

fn two_nodes_forward_pod_traffic(mode: DecapMode) {
    require_root();
    let (pins_a, pins_b) = (PinRoot::new(), PinRoot::new());
    let underlay = Underlay::new().unwrap();
    let mut a = Node::new(&underlay, 1, 1500).unwrap();
    let mut b = Node::new(&underlay, 2, 1500).unwrap();
    for n in [&mut a, &mut b] {
        n.add_bridge(1450).unwrap();
        n.add_pod(1, 1450).unwrap();
    }
    let dp_a = start(&a, &b, &pins_a, mode);
    let dp_b = start(&b, &a, &pins_b, mode);

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
    let links = std::fs::read_dir(pins_a.0.join("links")).unwrap().count();
    assert_eq!(
        links, 2,
        "{mode:?}: expected one pinned link per program (encap, decap)"
    );
    drop(dp_a);
    // Removing the pins detaches everything and leaves nothing on bpffs.
    for pins in [&pins_a, &pins_b] {
        overlay_agent::dataplane::remove_pins(&pins.0).unwrap();
        assert!(!pins.0.exists(), "pins left under {}", pins.0.display());
    }
    assert!(
        !ping(&a.pods[0].ns, b.pods[0].ip, 1, None),
        "{mode:?}: traffic still flows with the pins removed"
    );
}

#[test]
fn xdp_decap_two_nodes_forward_pod_traffic() {
    two_nodes_forward_pod_traffic(DecapMode::Xdp);
}

#[test]
fn tc_decap_two_nodes_forward_pod_traffic() {
    two_nodes_forward_pod_traffic(DecapMode::Tc);
}
