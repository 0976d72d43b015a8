//! Tier 3 (root): a cluster of node namespaces running the real agent binary against a real
//! etcd, pods on CNI-style bridges built from each node's subnet.env.

use std::time::Duration;

use nix::sys::signal::Signal;
use overlay_tests::{
    cluster::{output, tcp_transfer, Cluster, UdpFlow},
    netns::require_root,
    topology::{ping, ping_counts},
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

/// Starts `n` agents and gives each node one pod; returns the pod addresses.
fn cluster(n: u8, config: &str) -> (Cluster, Vec<std::net::Ipv4Addr>) {
    require_root();
    Cluster::running(n, config).expect("building the cluster")
}

#[test]
fn three_nodes_all_pairs_ping_bulk_tcp_and_kept_source_ip() {
    let (mut c, pods) = cluster(3, CONFIG);
    let (_, mtu) = c.nodes[0].subnet_env().unwrap();
    assert_eq!(mtu, 1450, "subnet.env MTU must be the underlay MTU (1500) − 50");
    for a in 0..3 {
        for b in 0..3 {
            if a != b {
                assert!(
                    ping(&c.nodes[a].node.pods[0].ns, pods[b], 2, None),
                    "pod {} → pod {}: no reply",
                    pods[a],
                    pods[b]
                );
                // Largest DF packet the pod MTU allows: 1450 − 20 (IP) − 8 (ICMP).
                assert!(
                    ping(&c.nodes[a].node.pods[0].ns, pods[b], 1, Some(mtu - 28)),
                    "pod {} → pod {}: MTU-sized DF ping lost",
                    pods[a],
                    pods[b]
                );
            }
        }
    }

    // A MASQUERADE rule as Docker/CNI install it on the sender must not rewrite pod sources.
    c.masquerade_like_docker(0).unwrap();
    let (first, rest) = c.nodes.split_at_mut(1);
    let (bps, seen) = tcp_transfer(
        &mut rest[0].node.pods[0].ns,
        pods[1],
        &first[0].node.pods[0].ns,
        2,
    )
    .unwrap();
    assert!(
        bps > 100e6,
        "bulk TCP across the overlay reached only {bps} bit/s"
    );
    assert_eq!(
        seen,
        pods[0].to_string(),
        "the receiving pod must see the sending pod's own IP"
    );
}

#[test]
fn host_to_remote_pod_and_flannel_style_dot_zero_sources() {
    let (mut c, pods) = cluster(2, CONFIG);
    // The node itself (hostNetwork processes, health checks) reaches a remote pod: every one
    // of 3 pings answered, the very first included, on a cold path (the node has not resolved
    // its peer's underlay MAC yet: the first packet waits for ARP and must then leave with the
    // right MACs).
    let counts = ping_counts(&c.nodes[0].node.ns, pods[1], 3, None);
    assert_eq!(
        counts,
        Some((3, 3)),
        "node1 → pod on node2: (sent, answered) of 3 pings"
    );
    // Its packets leave from the subnet's .0 address, as flanneld's flannel.1 does.
    let (subnet, _) = c.nodes[0].subnet_env().unwrap();
    let route = output(&c.nodes[0].node.ns, "ip", &["route", "get", &pods[1].to_string()]).unwrap();
    assert!(
        route.contains(&format!("src {}", subnet.network())),
        "host traffic to remote pods should use {} as source: {route}",
        subnet.network()
    );
    // And the remote pod sees exactly that address: a TCP connection from the node.
    let (first, rest) = c.nodes.split_at_mut(1);
    let (bps, seen) = tcp_transfer(&mut rest[0].node.pods[0].ns, pods[1], &first[0].node.ns, 1)
        .expect("TCP from node1 to the pod on node2");
    assert!(bps > 0.0, "no data arrived");
    assert_eq!(
        seen,
        subnet.network().to_string(),
        "the remote pod must see node1's connection come from its subnet's .0"
    );

    // The host device deleted under the running agent (by hand, or a cleanup tool): it is set
    // up again within the resync period (5 s), with no lease or config event.
    c.nodes[0].node.ns.ip(&["link", "del", "overlay0"]).unwrap();
    assert!(
        !ping(&c.nodes[0].node.ns, pods[1], 1, None),
        "reached the pod with no host device"
    );
    let back = Cluster::wait_for(Duration::from_secs(8), || {
        ping(&c.nodes[0].node.ns, pods[1], 1, None)
    });
    assert!(
        back.is_some()
            && c.agent_log(0)
                .contains("the host device is gone; setting it up again"),
        "node1 → pod on node2 did not come back after overlay0 was deleted; log:\n{}",
        c.agent_log(0)
    );
    let route = output(&c.nodes[0].node.ns, "ip", &["route", "get", &pods[1].to_string()]).unwrap();
    assert!(route.contains("dev overlay0"), "{route}");
}

#[test]
fn joining_and_leaving_nodes_are_reflected_within_a_second() {
    let (mut c, _pods) = cluster(2, CONFIG);
    // A lease appearing in etcd (a node joining) reaches node1's map within a second.
    let key = "/coreos.com/network/subnets/10.244.250.0-24";
    let value = r#"{"PublicIP":"198.18.0.99","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:99"}}"#;
    c.etcdctl(&["put", key, value]).unwrap();
    let joined = Cluster::wait_for(Duration::from_secs(1), || {
        c.agent_peers(0)
            .unwrap_or_default()
            .iter()
            .any(|n| n.to_string() == "10.244.250.0/24")
    });
    assert!(
        joined.is_some(),
        "a new lease was not in node1's peer map within 1 s"
    );
    c.etcdctl(&["del", key]).unwrap();
    // A failed read of the map is not "removed".
    let left = Cluster::wait_for(Duration::from_secs(1), || {
        c.agent_peers(0)
            .is_ok_and(|p| !p.iter().any(|n| n.to_string() == "10.244.250.0/24"))
    });
    assert!(
        left.is_some(),
        "a deleted lease was still in node1's peer map after 1 s"
    );

    // A real node joining: its pods are reachable from the others right after it has a lease.
    c.add_node(3).unwrap();
    c.start_agent(2).unwrap();
    let new_pod = c.add_pods(2, 1).unwrap()[0];
    let reached = Cluster::wait_for(Duration::from_secs(3), || {
        ping(&c.nodes[0].node.pods[0].ns, new_pod, 1, None)
    });
    assert!(
        reached.is_some(),
        "pod on the new node3 unreachable from node1; log:\n{}",
        c.agent_log(2)
    );
}

#[test]
fn agent_restart_keeps_its_subnet_and_traffic_flows_again() {
    let (mut c, pods) = cluster(2, CONFIG);
    let (before, _) = c.nodes[1].subnet_env().unwrap();
    for sig in [Signal::SIGTERM, Signal::SIGKILL] {
        // The pinned datapath forwards without any agent: only fresh evidence from the new
        // process counts (subnet.env rewritten, a new "holding lease" line, still running).
        let after = c
            .restart_agent_fresh(1, sig, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("after {sig:?} + start: {e:#}"));
        assert_eq!(
            after, before,
            "after {sig:?} + start the agent took another subnet"
        );
        let back = Cluster::wait_for(Duration::from_secs(5), || {
            ping(&c.nodes[0].node.pods[0].ns, pods[1], 1, None)
        });
        assert!(
            back.is_some(),
            "traffic did not flow again after {sig:?} + start; log:\n{}",
            c.agent_log(1)
        );
        // 10 pings, 0.2 s apart: every one answered, and the new agent still runs ~2 s on.
        assert!(
            ping(&c.nodes[0].node.pods[0].ns, pods[1], 10, None),
            "after {sig:?} + start: not every one of 10 pings was answered"
        );
        assert!(
            c.agent_running(1),
            "the restarted agent exited after {sig:?} + start; log:\n{}",
            c.agent_log(1)
        );
    }
}

#[test]
fn direct_routing_peers_on_the_same_segment_skip_encapsulation() {
    let config = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#;
    let (mut c, pods) = cluster(2, config);
    assert!(
        ping(&c.nodes[0].node.pods[0].ns, pods[1], 3, None),
        "direct-routed ping failed"
    );
    // On the wire between the nodes the pod packets travel bare: no UDP 8472 at all. The
    // capture takes the first 4 packets that are either pod ICMP or VXLAN: 2 pings make 4 ICMP
    // packets, so any VXLAN packet would be among them.
    let pcap = c.dir().join("direct.txt");
    let filter = format!("udp port 8472 or (icmp and host {})", pods[1]);
    let cap = c.underlay.ns.capture("br0", 4, &filter, &pcap).unwrap();
    assert!(ping(&c.nodes[0].node.pods[0].ns, pods[1], 2, None));
    let seen = cap.wait(&mut c.underlay.ns, Duration::from_secs(5));
    assert!(
        seen.contains(&format!("{} > {}", pods[0], pods[1])),
        "bare pod→pod ICMP not seen on the underlay (DirectRouting should not encapsulate):\n{seen}"
    );
    assert_eq!(seen.lines().count(), 4, "{seen}");
    assert!(
        !seen.contains(".8472"),
        "VXLAN on the underlay between DirectRouting peers:\n{seen}"
    );
}

#[test]
fn mixed_cluster_with_a_kernel_vxlan_flannel_node() {
    use overlay_tests::topology::flannel_vxlan;
    let (mut c, pods) = cluster(2, CONFIG);
    // Node 3 runs no agent: it is set up exactly as flanneld's vxlan backend sets up a node.
    c.add_node(3).unwrap();
    let peers = c.lease_list().unwrap();
    assert_eq!(peers.len(), 2, "expected the two agents' leases, got {peers:?}");
    let flannel_subnet: ipnet::Ipv4Net = "10.244.200.0/24".parse().unwrap();
    let n3 = &mut c.nodes[2].node;
    let mac = flannel_vxlan(n3, flannel_subnet, &peers).unwrap();
    n3.add_bridge_for(flannel_subnet, 1450).unwrap();
    let flannel_pod = n3.add_pod_in(flannel_subnet, 1, 1450).unwrap();
    let value = format!(
        r#"{{"PublicIP":"198.18.0.13","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
        overlay_tests::topology::fmt_mac(&mac)
    );
    c.etcdctl(&["put", "/coreos.com/network/subnets/10.244.200.0-24", &value])
        .unwrap();
    for i in 0..2 {
        let ok = Cluster::wait_for(Duration::from_secs(2), || {
            c.agent_peers(i)
                .map(|p| p.contains(&flannel_subnet))
                .unwrap_or(false)
        });
        assert!(
            ok.is_some(),
            "agent {} did not pick up the flannel node's lease",
            i + 1
        );
    }
    // Largest DF ping: flannel.1's MTU (1450) − 28. flanneld's node reaches pods from its .0
    // address on flannel.1.
    c.assert_pods_reach_a_flanneld_node(&pods, 2, flannel_pod, 1422);
}

#[test]
fn restarts_lose_no_packet_of_a_steady_udp_flow() {
    let (mut c, pods) = cluster(2, CONFIG);
    let subnets: Vec<_> = (0..2).map(|i| c.nodes[i].subnet_env().unwrap().0).collect();
    for sig in [Signal::SIGTERM, Signal::SIGKILL] {
        // 1,000 packets/s of 100-byte UDP from the pod on node1 to the pod on node2, for 6 s.
        let report = c.dir().join(format!("udp-{sig:?}.json"));
        let (first, rest) = c.nodes.split_at_mut(1);
        let flow = UdpFlow::start(
            &mut rest[0].node.pods[0].ns,
            pods[1],
            &mut first[0].node.pods[0].ns,
            6,
            report,
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        // Restart the receiving node's agent, then the sending node's, under the flow.
        // Each new agent must prove it came up (fresh subnet.env, a new "holding lease" line,
        // still running): the pinned programs would carry the flow even if it died at start.
        for node in [1, 0] {
            let held = c
                .restart_agent_fresh(node, sig, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("{sig:?}: node{} restart: {e:#}", node + 1));
            assert_eq!(
                held,
                subnets[node],
                "{sig:?}: node{} came back with another subnet",
                node + 1
            );
            std::thread::sleep(Duration::from_millis(1000));
        }
        let (packets, lost) = flow
            .finish(&mut c.nodes[1].node.pods[0].ns, Duration::from_secs(8))
            .unwrap();
        assert!(packets >= 5000, "{sig:?}: only {packets} packets in the flow");
        assert_eq!(
            lost, 0,
            "{sig:?}: {lost} of {packets} packets lost across agent restarts"
        );
        for node in [0, 1] {
            assert!(
                c.agent_running(node),
                "{sig:?}: node{}'s restarted agent exited during the flow; log:\n{}",
                node + 1,
                c.agent_log(node)
            );
        }
    }
}

#[test]
fn a_pod_ignoring_the_mtu_gets_frag_needed_and_tcp_still_completes() {
    let (mut c, pods) = cluster(2, CONFIG);
    // A second pod on node1 with MTU 1500, as if it ignored subnet.env's 1450.
    let (subnet, _) = c.nodes[0].subnet_env().unwrap();
    let big = c.nodes[0].node.add_pod_in(subnet, 2, 1500).unwrap();
    let big_ns = &c.nodes[0].node.pods[1].ns;
    // A 1500-byte DF ping (1472 + 28) cannot cross a 1450 tunnel: ICMP tells the pod so.
    let out = big_ns
        .command("ping")
        .args([
            "-c",
            "2",
            "-W",
            "1",
            "-M",
            "do",
            "-s",
            "1472",
            &pods[1].to_string(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("mtu = 1450") || text.contains("mtu=1450"),
        "expected ICMP fragmentation-needed with next-hop MTU 1450 for {big}, got:\n{text}"
    );
    // PMTU discovery then lets a TCP transfer from that pod complete.
    let (first, rest) = c.nodes.split_at_mut(1);
    let (bps, seen) = tcp_transfer(
        &mut rest[0].node.pods[0].ns,
        pods[1],
        &first[0].node.pods[1].ns,
        2,
    )
    .unwrap();
    assert!(bps > 50e6, "TCP from the MTU-1500 pod reached only {bps} bit/s");
    assert_eq!(seen, big.to_string());
}

#[test]
fn crafted_vxlan_from_an_attacker_on_the_underlay_is_dropped_and_counted() {
    use overlay_agent::dataplane::pinned::read_pinned_counters;
    use overlay_common::Counter;
    use overlay_tests::packet;
    let (c, pods) = cluster(2, CONFIG);
    // The attacker: a namespace on the underlay segment.
    let attacker = c.outside_host("198.18.0.66".parse().unwrap()).unwrap();

    let victim = &c.nodes[1];
    let (node1_subnet, _) = c.nodes[0].subnet_env().unwrap();
    let base = c.vxlan_from(0, 1, &attacker).unwrap();
    let inner = |src: std::net::Ipv4Addr, tag: &[u8]| packet::udp(src, pods[1], 5555, 9999, tag);
    let legit_src = overlay_tests::topology::nth_host(node1_subnet, 7);
    let mut unknown = base;
    unknown.src_ip = [198, 18, 0, 66];
    let mut wrong_vni = base;
    wrong_vni.vni = 2;
    // flannel.1 takes only frames for its own MAC: here the sender's own VtepMAC.
    let mut wrong_mac = base;
    wrong_mac.inner_dst_mac = base.inner_src_mac;
    let cases = [
        (
            "from a non-member",
            packet::vxlan(&unknown, &inner(legit_src, b"SPOOF-A")),
            Counter::DropUnknownPeer,
        ),
        (
            "wrong VNI",
            packet::vxlan(&wrong_vni, &inner(legit_src, b"SPOOF-B")),
            Counter::DropWrongVni,
        ),
        (
            "inner source outside the sender's subnet",
            packet::vxlan(&base, &inner("10.244.250.9".parse().unwrap(), b"SPOOF-C")),
            Counter::DropSpoofedSource,
        ),
        (
            "inner destination MAC not the receiver's VtepMAC",
            packet::vxlan(&wrong_mac, &inner(legit_src, b"SPOOF-D")),
            Counter::DropInnerMac,
        ),
    ];
    let pin_root = std::path::PathBuf::from(&victim.pin_root);
    for (name, frame, counter) in &cases {
        let before = read_pinned_counters(&pin_root).unwrap();
        packet::send_raw(&attacker, "eth0", frame).unwrap();
        let moved = Cluster::wait_for(Duration::from_secs(1), || {
            read_pinned_counters(&pin_root).unwrap().get(*counter) > before.get(*counter)
        });
        assert!(
            moved.is_some(),
            "{name}: {} did not count the crafted packet",
            counter.name()
        );
    }
    // Control: the same crafting with a member's address, our VNI and a source inside its subnet
    // is decapsulated, so the drops above are the checks at work, not broken frames.
    let before = read_pinned_counters(&pin_root).unwrap();
    packet::send_raw(
        &attacker,
        "eth0",
        &packet::vxlan(&base, &inner(legit_src, b"LEGIT")),
    )
    .unwrap();
    let moved = Cluster::wait_for(Duration::from_secs(1), || {
        read_pinned_counters(&pin_root)
            .unwrap()
            .get(Counter::DecapPackets)
            > before.get(Counter::DecapPackets)
    });
    assert!(
        moved.is_some(),
        "a well-formed frame from a member's address was not decapsulated"
    );
}

/// A pod cannot inject VXLAN: its UDP to another node's VXLAN port would leave through the
/// node's masquerade from a member's PublicIP, carrying an inner packet of the pod's making (a
/// source it does not own, in its node's subnet). Encap drops it at the bridge and counts it.
/// The control: the very same datagram sent by node 1 itself is decapsulated and delivered, so
/// what keeps the pod's copy out is the drop, not a broken frame.
#[test]
fn a_pod_cannot_inject_vxlan_through_its_nodes_masquerade() {
    use std::net::UdpSocket;
    let (c, pods) = cluster(2, CONFIG);
    c.masquerade_like_docker(0).unwrap();
    let leases = c.lease_list().unwrap();
    let node2 = overlay_tests::topology::Node::underlay_ip(2);
    let vtep2 = leases.iter().find(|l| l.1 == node2).expect("node 2's lease").2;
    let (node1_subnet, _) = c.nodes[0].subnet_env().unwrap();
    let spoofed = overlay_tests::topology::nth_host(node1_subnet, 99);
    let datagram = |tag: &[u8]| {
        // VXLAN (flags I, VNI 1), then the inner frame for node 2's VtepMAC.
        let mut d = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
        let ip = overlay_tests::packet::udp(spoofed, pods[1], 5555, 9999, tag);
        d.extend(overlay_tests::packet::eth_ip(
            vtep2,
            [0x0a, 0x58, 0, 0, 0, 0x99],
            &ip,
        ));
        d
    };
    let listener = {
        let _in = c.nodes[1].node.pods[0].ns.enter().unwrap();
        UdpSocket::bind("0.0.0.0:9999").unwrap()
    };
    listener.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let send_from = |ns: &overlay_tests::netns::Netns, tag: &[u8]| {
        let sock = {
            let _in = ns.enter().unwrap();
            UdpSocket::bind("0.0.0.0:0").unwrap()
        };
        sock.send_to(&datagram(tag), (node2, 8472)).unwrap();
    };
    let counter = |name: &str| c.status_json(0).unwrap()["counters"][name].as_u64().unwrap_or(0);

    send_from(&c.nodes[0].node.ns, b"FROM-NODE-1");
    let mut buf = [0u8; 64];
    let got = listener
        .recv_from(&mut buf)
        .map(|(n, from)| (buf[..n].to_vec(), from));
    match got {
        Ok((data, from)) => {
            assert_eq!(data, b"FROM-NODE-1", "the control datagram's payload");
            assert_eq!(
                from.ip(),
                std::net::IpAddr::V4(spoofed),
                "the inner source as sent"
            );
        }
        Err(e) => panic!("the control: node 1's own VXLAN datagram did not reach pod 2 ({e})"),
    }

    let before = counter("drop_pod_vxlan");
    for _ in 0..3 {
        send_from(&c.nodes[0].node.pods[0].ns, b"FROM-POD-1");
    }
    match listener.recv_from(&mut buf) {
        Ok((n, from)) => panic!(
            "pod 1's injected VXLAN reached pod 2 as a packet from {from}: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{e}"
        ),
    }
    let counted = Cluster::wait_for(Duration::from_secs(2), || counter("drop_pod_vxlan") - before == 3);
    assert!(
        counted.is_some(),
        "node 1 counted {} of the pod's 3 VXLAN datagrams as drop_pod_vxlan",
        counter("drop_pod_vxlan") - before
    );
    // Pod traffic itself is untouched.
    assert!(
        ping(&c.nodes[0].node.pods[0].ns, pods[1], 2, None),
        "pod 1 → pod 2 after the drops"
    );
}

#[test]
fn a_recreated_bridge_gets_encap_again() {
    let (mut c, pods) = cluster(2, CONFIG);
    let attached_to = |c: &Cluster, ifindex: u32| {
        let want = format!("ifindex={ifindex}");
        Cluster::wait_for(Duration::from_secs(3), || {
            c.agent_log(0)
                .lines()
                .any(|l| l.contains("encap attached") && l.contains("bridge=cni0") && l.ends_with(&want))
        })
        .is_some()
    };
    let old = c.nodes[0].node.ns.ifindex("cni0").unwrap();
    assert!(
        attached_to(&c, old),
        "encap never attached to cni0 ({old}); log:\n{}",
        c.agent_log(0)
    );
    // Docker/CNI restarts can delete and recreate the bridge (new ifindex, no programs).
    let (subnet, mtu) = c.nodes[0].subnet_env().unwrap();
    c.nodes[0].node.pods.clear();
    c.nodes[0].node.ns.ip(&["link", "del", "cni0"]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    c.nodes[0].node.add_bridge_for(subnet, mtu).unwrap();
    let pod = c.nodes[0].node.add_pod_in(subnet, 1, mtu).unwrap();
    let new = c.nodes[0].node.ns.ifindex("cni0").unwrap();
    assert_ne!(old, new);
    // Reachable alone would not prove it (the host route via overlay0 also carries pod traffic):
    // the agent must attach encap to the new bridge.
    assert!(
        attached_to(&c, new),
        "encap not attached to the recreated cni0 ({new}); log:\n{}",
        c.agent_log(0)
    );
    let back = Cluster::wait_for(Duration::from_secs(5), || {
        ping(&c.nodes[0].node.pods[0].ns, pods[1], 1, None)
    });
    assert!(
        back.is_some(),
        "pod {pod} on the recreated cni0 cannot reach {}",
        pods[1]
    );
}

/// What node `i`'s endpoint map should hold: each of its pods with its host-side veth (index and
/// name in the node's namespace), its MAC, and the bridge's MAC.
fn expected_endpoints(c: &Cluster, i: usize) -> Vec<overlay_tests::cluster::EndpointSeen> {
    use overlay_tests::topology::fmt_mac;
    let node = &c.nodes[i].node;
    let gw_mac = fmt_mac(&node.ns.mac("cni0").unwrap());
    let mut v: Vec<_> = node
        .pods
        .iter()
        .map(|p| overlay_tests::cluster::EndpointSeen {
            ip: p.ip,
            ifindex: node.ns.ifindex(&p.veth).unwrap(),
            iface: Some(p.veth.clone()),
            mac: fmt_mac(&p.ns.mac("eth0").unwrap()),
            gw_mac: gw_mac.clone(),
        })
        .collect();
    v.sort();
    v
}

/// Waits (up to `timeout`) until node `i`'s endpoint map, per `overlay-agent status --json`, is
/// exactly `want`.
fn wait_endpoints(c: &Cluster, i: usize, want: &[overlay_tests::cluster::EndpointSeen], timeout: Duration) {
    let mut seen = Vec::new();
    let ok = Cluster::wait_for(timeout, || {
        seen = c.agent_endpoints(i).unwrap_or_default();
        seen == want
    });
    assert!(
        ok.is_some(),
        "node{}'s endpoint map should list exactly its pods within {timeout:?}\n  want {want:?}\n  \
         seen {seen:?}\nlog:\n{}",
        i + 1,
        c.agent_log(i)
    );
}

#[test]
fn the_endpoint_map_lists_each_local_pod_and_loses_a_deleted_veth_at_once() {
    use overlay_agent::{dataplane::pinned::read_pinned_endpoints, family::V4};
    let (mut c, pods) = cluster(2, CONFIG);
    let (subnet, mtu) = c.nodes[0].subnet_env().unwrap();
    let second = c.nodes[0].node.add_pod_in(subnet, 2, mtu).unwrap();
    // Traffic across the overlay and between the two local pods: the hosts resolve their pods'
    // addresses and the bridges learn their MACs.
    for ((node, pod), to) in [
        ((0, 0), pods[1]),
        ((0, 1), pods[1]),
        ((1, 0), pods[0]),
        ((1, 0), second),
        ((0, 0), second),
    ] {
        assert!(
            ping(&c.nodes[node].node.pods[pod].ns, to, 2, None),
            "pod {} on node{} → {to}: no reply",
            c.nodes[node].node.pods[pod].ip,
            node + 1
        );
    }
    let want = expected_endpoints(&c, 0);
    assert_eq!(want.len(), 2, "node1 has two pods: {want:?}");
    wait_endpoints(&c, 0, &want, Duration::from_secs(2));
    wait_endpoints(&c, 1, &expected_endpoints(&c, 1), Duration::from_secs(2));

    // A deleted veth leaves the map within milliseconds of RTM_DELLINK (a stale ifindex would
    // black-hole the pod's traffic), not at the next periodic resync.
    let pin_root = std::path::PathBuf::from(&c.nodes[0].pin_root);
    let veth = c.nodes[0].node.pods[1].veth.clone();
    c.nodes[0].node.ns.ip(&["link", "del", &veth]).unwrap();
    let start = std::time::Instant::now();
    let mut left = Vec::new();
    while start.elapsed() < Duration::from_secs(6) {
        left = read_pinned_endpoints::<V4>(&pin_root).unwrap();
        if !left.iter().any(|e| e.ip == second) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let took = start.elapsed();
    println!("endpoint {second} left the map {took:?} after its veth was deleted");
    assert!(
        took < Duration::from_millis(250),
        "{second}'s endpoint stayed in the map {took:?} after its veth {veth} was deleted (want < 250 ms; \
         the periodic resync is every {:?}); map: {left:?}",
        overlay_agent::node::bridge::RESYNC_EVERY
    );
    c.nodes[0].node.pods.remove(1);
    // The bridge's MAC may change with its ports (it takes the lowest port MAC unless one was
    // set), which flushes its neighbour table: the other pod is back once traffic re-resolves
    // it, with the bridge's new MAC.
    assert!(
        ping(&c.nodes[1].node.pods[0].ns, pods[0], 2, None),
        "pod {} unreachable after its neighbour's veth was deleted",
        pods[0]
    );
    wait_endpoints(&c, 0, &expected_endpoints(&c, 0), Duration::from_secs(2));
}

#[test]
fn a_restarted_pod_is_reachable_again_within_a_second() {
    use std::time::{SystemTime, UNIX_EPOCH};
    let (mut c, pods) = cluster(2, CONFIG);
    let target = pods[0];
    let old = expected_endpoints(&c, 0);
    // Pings every 10 ms from the pod on node2 to the pod on node1, each reply timestamped.
    let log = c.dir().join("flood.txt");
    let pinger = &mut c.nodes[1].node.pods[0].ns;
    let mut cmd = pinger.command("ping");
    cmd.args(["-D", "-n", "-i", "0.01", "-W", "1", &target.to_string()])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::null());
    let pid = pinger.spawn(cmd).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // The pod is a known endpoint before its restart (decap delivers to its veth, where the
    // datapath does that), so what follows is about the restart. Up to a periodic resync.
    wait_endpoints(
        &c,
        0,
        &old,
        overlay_agent::node::bridge::RESYNC_EVERY + Duration::from_secs(1),
    );
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let deleted = now();
    // Down for 300 ms, then back with the same address on a new veth with a new MAC.
    let veth = c.nodes[0]
        .node
        .recreate_pod(0, Duration::from_millis(300))
        .unwrap();
    let recreated = now();
    std::thread::sleep(Duration::from_secs(2));
    c.nodes[1].node.pods[0].ns.kill(pid, Signal::SIGINT);

    // `[1732551234.567890] 64 bytes from 10.244.1.2: icmp_seq=12 ttl=62 time=0.321 ms`
    let text = std::fs::read_to_string(&log).unwrap();
    let replies: Vec<(f64, u64)> = text
        .lines()
        .filter(|l| l.contains(" bytes from "))
        .filter_map(|l| {
            let ts = l.strip_prefix('[')?.split(']').next()?.parse().ok()?;
            let seq = l.split("icmp_seq=").nth(1)?.split(' ').next()?.parse().ok()?;
            Some((ts, seq))
        })
        .collect();
    let before = replies.iter().filter(|r| r.0 < deleted).count();
    assert!(
        before >= 50,
        "the flow was not running before the restart: {before} replies in 1 s\n{text}"
    );
    let after: Vec<(f64, u64)> = replies.iter().copied().filter(|r| r.0 >= recreated).collect();
    let Some(&(first, first_seq)) = after.first() else {
        panic!(
            "no reply in the 2 s after the pod was recreated; log:\n{}",
            c.agent_log(0)
        )
    };
    let delay = first - recreated;
    println!(
        "first reply {:.0} ms after the pod was recreated ({:.0} ms after it was deleted)",
        delay * 1e3,
        (first - deleted) * 1e3
    );
    assert!(
        delay < 1.0,
        "the recreated pod answered only {delay:.3} s after it was back (want < 1 s)"
    );
    // Once back, every ping is answered.
    let last_seq = after.last().unwrap().1;
    let answered = after.len() as u64;
    assert_eq!(
        answered,
        last_seq - first_seq + 1,
        "pings {first_seq}..={last_seq} after the restart: {} unanswered",
        last_seq - first_seq + 1 - answered
    );

    // The endpoint map follows: the new veth and MAC for the same address.
    let new = expected_endpoints(&c, 0);
    assert_eq!(new.len(), 1);
    assert_eq!(new[0].iface.as_deref(), Some(veth.as_str()));
    assert_ne!(
        new[0].ifindex, old[0].ifindex,
        "the recreated veth kept its ifindex"
    );
    assert_ne!(new[0].mac, old[0].mac, "the recreated pod kept its MAC");
    wait_endpoints(&c, 0, &new, Duration::from_secs(1));
}

/// Receive GRO (`overlay-gro`): on a NIC-like underlay (the nodes segment to the MTU, GRO on
/// where they receive) the receiving NIC merges our VXLAN frames before TC decap strips them;
/// with the device deleted it merges none (the control: the device is what does it), and the
/// agent sets it up again. What its socket receives is dropped, never delivered; cleanup
/// removes it.
#[test]
fn receive_gro_merges_nic_frames_before_tc_decap_and_its_device_delivers_nothing() {
    use overlay_agent::{dataplane::pinned::read_pinned_counters, node::grodev::GRO_DEVICE};
    use overlay_common::{wire::EncapParams, Counter};
    use overlay_tests::{
        packet,
        topology::{ethtool_k, NIC_NODE_OFFLOADS, NIC_PORT_OFFLOADS},
    };
    require_root();
    let mut c = Cluster::new(2, CONFIG).unwrap();
    for n in &mut c.nodes {
        n.extra_args = ["--decap", "tc", "--iptables-resync", "1"]
            .map(String::from)
            .to_vec();
    }
    let pods = c.start_with_pods().unwrap();
    for (i, n) in c.nodes.iter().enumerate() {
        ethtool_k(&n.node.ns, "eth0", NIC_NODE_OFFLOADS).unwrap();
        ethtool_k(&c.underlay.ns, &format!("p{}", i + 1), NIC_PORT_OFFLOADS).unwrap();
    }
    let receiver = &c.nodes[1];
    assert!(
        receiver.node.ns.ip(&["link", "show", GRO_DEVICE]).is_ok(),
        "no {GRO_DEVICE} on a TC-decap node; log:\n{}",
        c.agent_log(1)
    );
    let pin_root = std::path::PathBuf::from(&receiver.pin_root);
    let transfer = |c: &mut Cluster| {
        let before = read_pinned_counters(&pin_root).unwrap();
        let (first, rest) = c.nodes.split_at_mut(1);
        let (bps, _) = tcp_transfer(
            &mut rest[0].node.pods[0].ns,
            pods[1],
            &first[0].node.pods[0].ns,
            2,
        )
        .unwrap();
        // Merging is the point, not speed (tier 4 runs this in a slow VM).
        assert!(bps > 10e6, "bulk TCP reached only {bps} bit/s");
        let after = read_pinned_counters(&pin_root).unwrap();
        let d = |k: Counter| after.get(k) - before.get(k);
        (d(Counter::DecapPackets), d(Counter::DecapGsoPackets))
    };
    let (decap, gso) = transfer(&mut c);
    assert!(
        gso * 4 > decap,
        "with {GRO_DEVICE}, only {gso} of {decap} decapsulated packets were GRO-merged"
    );

    // The control: the same transfer with another device in its place (a veth: the agent sees
    // the name and leaves it alone) merges nothing.
    let ns = &c.nodes[1].node.ns;
    ns.ip(&["link", "del", GRO_DEVICE]).unwrap();
    ns.ip(&[
        "link", "add", GRO_DEVICE, "type", "veth", "peer", "name", "ovlgrop",
    ])
    .unwrap();
    let (decap, gso) = transfer(&mut c);
    assert!(
        gso * 100 < decap,
        "without {GRO_DEVICE}, {gso} of {decap} packets were still merged: the test cannot tell"
    );
    let mark = c.log_mark(1);
    c.nodes[1].node.ns.ip(&["link", "del", GRO_DEVICE]).unwrap();
    assert!(
        c.wait_log_after(1, mark, "receive GRO on", Duration::from_secs(10))
            .is_some(),
        "the agent did not set {GRO_DEVICE} up again; log:\n{}",
        c.agent_log(1)
    );
    let (decap, gso) = transfer(&mut c);
    assert!(
        gso * 4 > decap,
        "{GRO_DEVICE} set up again: only {gso} of {decap} packets merged"
    );

    // What decap leaves to the stack on our port (here: to another address of the node) reaches
    // the device's socket, and is dropped there.
    let receiver = &c.nodes[1];
    receiver
        .node
        .ns
        .ip(&["addr", "add", "198.18.0.112/24", "dev", "eth0"])
        .unwrap();
    let sender = c.outside_host("198.18.0.67".parse().unwrap()).unwrap();
    let leases = c.lease_list().unwrap();
    let vtep = |i: u8| {
        let ip = overlay_tests::topology::Node::underlay_ip(i);
        leases.iter().find(|l| l.1 == ip).expect("lease of a node").2
    };
    let (node1_subnet, _) = c.nodes[0].subnet_env().unwrap();
    let frame = packet::vxlan(
        &EncapParams {
            outer_src_mac: sender.mac("eth0").unwrap(),
            outer_dst_mac: receiver.node.ns.mac("eth0").unwrap(),
            src_ip: [198, 18, 0, 11],
            dst_ip: [198, 18, 0, 112],
            src_port: 40000,
            dst_port: 8472,
            vni: 1,
            inner_src_mac: vtep(1),
            inner_dst_mac: vtep(2),
            inner_ip_len: 0,
            inner_tos: 0,
        },
        &packet::udp(
            overlay_tests::topology::nth_host(node1_subnet, 7),
            pods[1],
            5555,
            9999,
            b"VIA-GRO-DEVICE",
        ),
    );
    let before = read_pinned_counters(&pin_root).unwrap();
    packet::send_raw(&sender, "eth0", &frame).unwrap();
    let moved = Cluster::wait_for(Duration::from_secs(2), || {
        read_pinned_counters(&pin_root)
            .unwrap()
            .get(Counter::DropGroDevice)
            > before.get(Counter::DropGroDevice)
    });
    assert!(
        moved.is_some(),
        "a VXLAN frame to another local address did not end at {GRO_DEVICE}'s sink"
    );

    c.stop_agent(1, Signal::SIGTERM);
    let out = c.run_cleanup(1, &overlay_tests::cluster::agent_bin()).unwrap();
    assert!(
        c.nodes[1].node.ns.ip(&["link", "show", GRO_DEVICE]).is_err(),
        "cleanup left {GRO_DEVICE}: {out}"
    );
}

/// Routing semantics across the overlay, as on `flannel.1`: each node is a router hop. A reply
/// arrives with TTL 64 − 2; `ping -t N` walks the path as traceroute does: TTL 1 expires at
/// node 1 (its bridge address answers), TTL 2 at node 2 (its overlay address, as `flannel.1`'s
/// `.0` answers), TTL 3 reaches the pod.
#[test]
fn each_node_is_a_router_hop_ttl_and_traceroute() {
    let (c, pods) = cluster(2, CONFIG);
    let subnet = |i: usize| c.nodes[i].subnet_env().unwrap().0.trunc();
    let pod1 = &c.nodes[0].node.pods[0].ns;
    let run = |ttl: Option<u8>| {
        let t = ttl.map(|t| t.to_string());
        let mut args = vec!["-c", "1", "-W", "2"];
        if let Some(t) = &t {
            args.extend(["-t", t]);
        }
        let to = pods[1].to_string();
        args.push(&to);
        // ping exits non-zero on a lost or expired echo: its output is the result here.
        let out = pod1.command("ping").args(&args).output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let reply = run(None);
    assert!(
        reply.contains("ttl=62"),
        "pod 2's echo reply, sent with TTL 64, must arrive with 62 (two router hops):\n{reply}"
    );
    let hop = |n: u32, i: usize| overlay_tests::topology::nth_host(subnet(i), n);
    for (ttl, from) in [(1u8, hop(1, 0)), (2, subnet(1).network())] {
        let out = run(Some(ttl));
        assert!(
            out.contains(&format!("From {from}")) && out.contains("Time to live exceeded"),
            "TTL {ttl} must expire at {from}:\n{out}"
        );
    }
    let out = run(Some(3));
    assert!(out.contains("1 received"), "TTL 3 reaches pod 2:\n{out}");
}
