//! Tier 3 (root): the host-gw backend as the setup guides configure it (`"Backend": {"Type":
//! "host-gw"}`), with agents in node namespaces on one L2 segment and a real etcd: flanneld's
//! host-gw leases and routes, pod packets bare on the wire from the BPF fast path, the pod's
//! source kept under Docker's MASQUERADE, a node set up exactly as flanneld's host-gw sets one
//! up, and what flanneld refuses (a PublicIP behind NAT, a peer that is not on-link).

use std::{net::Ipv4Addr, time::Duration};

use ipnet::Ipv4Net;
use nix::sys::signal::Signal;
use overlay_tests::{
    cluster::{output, tcp_transfer, Cluster},
    netns::require_root,
    topology::{host_gw, nth_host, ping, ping_counts},
};

const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;

fn cluster(n: u8) -> (Cluster, Vec<Ipv4Addr>) {
    require_root();
    Cluster::running(n, HOST_GW).expect("building the cluster")
}

/// The main table's route to `subnet` in node `i`'s namespace, as `ip route show` prints it.
fn route(c: &Cluster, i: usize, subnet: Ipv4Net) -> String {
    output(&c.nodes[i].node.ns, "ip", &["route", "show", &subnet.to_string()])
        .unwrap()
        .trim()
        .to_string()
}

/// `via` route as flanneld's host-gw writes it for the node with underlay address `ip`.
fn via(subnet: Ipv4Net, ip: Ipv4Addr) -> String {
    format!("{subnet} via {ip} dev eth0")
}

/// The lease values in etcd, by subnet key suffix (`10.244.1.0-24`).
fn lease_values(c: &Cluster) -> Vec<(String, String)> {
    let text = c.leases().unwrap();
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks(2)
        .map(|kv| (kv[0].rsplit('/').next().unwrap().to_string(), kv[1].to_string()))
        .collect()
}

#[test]
fn host_gw_nodes_route_pods_bare_keep_sources_and_follow_the_leases() {
    let (mut c, pods) = cluster(2);
    let subnets: Vec<Ipv4Net> = (0..2)
        .map(|i| c.nodes[i].subnet_env().unwrap().0.trunc())
        .collect();
    let (_, mtu) = c.nodes[0].subnet_env().unwrap();
    assert_eq!(
        mtu, 1500,
        "host-gw: subnet.env MTU is the interface MTU, no overhead"
    );

    // flanneld's host-gw lease, byte for byte.
    let mut values = lease_values(&c);
    values.sort();
    let want: Vec<(String, String)> = (0..2)
        .map(|i| {
            (
                format!("{}-{}", subnets[i].network(), subnets[i].prefix_len()),
                format!(
                    r#"{{"PublicIP":"198.18.0.{}","PublicIPv6":null,"BackendType":"host-gw"}}"#,
                    11 + i
                ),
            )
        })
        .collect();
    let mut want = want;
    want.sort();
    assert_eq!(values, want);

    // flanneld's routes, and no vxlan device.
    for (i, j) in [(0, 1), (1, 0)] {
        let ip = Ipv4Addr::new(198, 18, 0, 11 + j as u8);
        assert_eq!(route(&c, i, subnets[j]), via(subnets[j], ip));
        assert!(
            c.nodes[i].node.ns.ip(&["link", "show", "overlay0"]).is_err(),
            "host-gw node {i} has the vxlan host device"
        );
    }

    // Pod → pod: bare on the wire, both ways, the full pod MTU, from the BPF fast path.
    let pcap = c.dir().join("hostgw.txt");
    let filter = format!("udp port 8472 or (icmp and host {})", pods[1]);
    let cap = c.underlay.ns.capture("br0", 4, &filter, &pcap).unwrap();
    assert!(
        ping(&c.nodes[0].node.pods[0].ns, pods[1], 2, None),
        "pod 1 → pod 2"
    );
    let seen = cap.wait(&mut c.underlay.ns, Duration::from_secs(5));
    assert_eq!(seen.lines().count(), 4, "{seen}");
    assert!(
        seen.contains(&format!("{} > {}", pods[0], pods[1]))
            && seen.contains(&format!("{} > {}", pods[1], pods[0])),
        "bare pod ↔ pod ICMP not seen both ways on the underlay:\n{seen}"
    );
    assert!(!seen.contains(".8472"), "VXLAN on a host-gw underlay:\n{seen}");
    assert!(
        ping(&c.nodes[0].node.pods[0].ns, pods[1], 1, Some(mtu - 28)),
        "a DF ping of the full pod MTU was lost"
    );
    for i in 0..2 {
        let st = c.status_json(i).unwrap();
        let n = |name: &str| st["counters"][name].as_u64().unwrap_or(0);
        assert!(
            n("direct_packets") >= 2,
            "node {i} sent no pod packet from the fast path: {}",
            st["counters"]
        );
        assert_eq!(st["node"]["backend"], "host-gw", "status names the backend");
        // The receiving end skips the stack too: straight into the pod, sender checked.
        assert!(
            n("deliver_packets") >= 2 && n("drop_wrong_sender") == 0,
            "node {i} delivered no bare pod packet straight to its pod: {}",
            st["counters"]
        );
    }
    // The node itself reaches the remote pod through the per-peer route, the first packet too.
    assert_eq!(
        ping_counts(&c.nodes[0].node.ns, pods[1], 3, None),
        Some((3, 3)),
        "node 1 → pod on node 2"
    );

    // Docker's MASQUERADE on the sender must not rewrite the pod's source.
    c.masquerade_like_docker(0).unwrap();
    let (first, rest) = c.nodes.split_at_mut(1);
    let (bps, seen) = tcp_transfer(
        &mut rest[0].node.pods[0].ns,
        pods[1],
        &first[0].node.pods[0].ns,
        2,
    )
    .unwrap();
    println!("host-gw pod → pod TCP: {:.2} Gbit/s", bps / 1e9);
    assert_eq!(
        seen,
        pods[0].to_string(),
        "the receiving pod must see the sending pod's own IP"
    );

    // A route removed by hand comes back (flanneld's route check).
    c.nodes[0]
        .node
        .ns
        .ip(&["route", "del", &subnets[1].to_string()])
        .unwrap();
    let back = Cluster::wait_for(Duration::from_secs(15), || {
        route(&c, 0, subnets[1]) == via(subnets[1], Ipv4Addr::new(198, 18, 0, 12))
    });
    assert!(
        back.is_some(),
        "the deleted route was not put back; log:\n{}",
        c.agent_log(0)
    );

    // A peer whose PublicIP is not on-link is refused as flanneld's route add is: logged, no
    // route, no map entry; the other peers are untouched.
    // (A default route, as real nodes have: the peer's address is then reachable, through a
    // gateway.)
    c.nodes[0]
        .node
        .ns
        .ip(&["route", "add", "default", "via", "198.18.0.254", "dev", "eth0"])
        .unwrap();
    let off_link: Ipv4Net = "10.244.201.0/24".parse().unwrap();
    let mark = c.log_mark(0);
    c.etcdctl(&[
        "put",
        "/coreos.com/network/subnets/10.244.201.0-24",
        r#"{"PublicIP":"198.19.5.5","PublicIPv6":null,"BackendType":"host-gw"}"#,
    ])
    .unwrap();
    let line = c.wait_log_after(0, mark, "its subnet is not routed", Duration::from_secs(5));
    assert!(
        line.is_some(),
        "no error for the off-link peer; log:\n{}",
        c.agent_log(0)
    );
    assert_eq!(route(&c, 0, off_link), "", "a route to the off-link peer");
    assert!(!c.agent_peers(0).unwrap().contains(&off_link));
    assert!(
        ping(&c.nodes[0].node.pods[0].ns, pods[1], 1, None),
        "pod 1 → pod 2 after the refusal"
    );
    // A vxlan lease is skipped by a host-gw node, as flanneld skips it ("Ignoring non-host-gw").
    c.etcdctl(&[
        "put",
        "/coreos.com/network/subnets/10.244.202.0-24",
        r#"{"PublicIP":"198.18.0.14","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:14"}}"#,
    ])
    .unwrap();

    // A node that leaves takes its route and its map entry with it.
    c.stop_agent(1, Signal::SIGTERM);
    let key = format!(
        "/coreos.com/network/subnets/{}-{}",
        subnets[1].network(),
        subnets[1].prefix_len()
    );
    c.etcdctl(&["del", &key]).unwrap();
    let gone = Cluster::wait_for(Duration::from_secs(5), || {
        route(&c, 0, subnets[1]).is_empty() && !c.agent_peers(0).unwrap_or_default().contains(&subnets[1])
    });
    assert!(
        gone.is_some(),
        "the removed lease left its route or entry; log:\n{}",
        c.agent_log(0)
    );
    assert_eq!(
        route(&c, 0, "10.244.202.0/24".parse().unwrap()),
        "",
        "a route for a vxlan lease"
    );
    assert!(c.agent_running(0), "agent 1 exited; log:\n{}", c.agent_log(0));
}

/// Anti-spoofing of bare packets: another host on the segment that claims a member's pod
/// address (its packets carry its own MAC, not the member's) does not reach the pods; the same
/// host with its own address does (the stack routes it, as plain host-gw does).
#[test]
fn bare_packets_claiming_a_members_pods_from_another_host_are_dropped() {
    let (mut c, pods) = cluster(2);
    let subnets: Vec<Ipv4Net> = (0..2)
        .map(|i| c.nodes[i].subnet_env().unwrap().0.trunc())
        .collect();
    let own = Ipv4Addr::new(198, 18, 0, 100);
    let outside = c.outside_host(own.into()).unwrap();
    outside
        .ip(&["route", "add", &subnets[0].to_string(), "via", "198.18.0.11"])
        .unwrap();
    let claimed = nth_host(subnets[1], 77);
    outside
        .ip(&["addr", "add", &format!("{claimed}/32"), "dev", "eth0"])
        .unwrap();
    let counter = |c: &Cluster, name: &str| c.status_json(0).unwrap()["counters"][name].as_u64().unwrap_or(0);

    // The control: from its own address, through node 1's stack, into the pod and back.
    assert!(
        ping(&outside, pods[0], 2, None),
        "outside host → pod 1 (the testbed)"
    );
    // Node 2's pods talk to node 1's: node 1's neighbour table knows node 2's MAC (until it
    // does, bare packets from node 2's subnet cannot be checked and take the stack).
    assert!(
        ping(&c.nodes[1].node.pods[0].ns, pods[0], 2, None),
        "pod 2 → pod 1"
    );

    let before = counter(&c, "drop_wrong_sender");
    let pcap = c.dir().join("claimed.txt");
    let pod = &mut c.nodes[0].node.pods[0].ns;
    let cap = pod
        .capture("eth0", 1, &format!("icmp and src {claimed}"), &pcap)
        .unwrap();
    let claimed_s = claimed.to_string();
    let pod_s = pods[0].to_string();
    let _ = outside.exec(
        "ping",
        &["-c", "3", "-i", "0.2", "-W", "1", "-I", &claimed_s, &pod_s],
    );
    let seen = cap.wait(pod, Duration::from_secs(2));
    assert_eq!(
        seen.trim(),
        "",
        "a packet claiming pod address {claimed} of node 2 reached pod 1"
    );
    let dropped = counter(&c, "drop_wrong_sender") - before;
    assert_eq!(dropped, 3, "drop_wrong_sender counts each claimed packet");
    // Node 2's own pods still reach pod 1 straight.
    assert!(
        ping(&c.nodes[1].node.pods[0].ns, pods[0], 2, None),
        "pod 2 → pod 1 after the drops"
    );
    assert!(counter(&c, "deliver_packets") >= 2);
}

/// Node 3 runs no agent: its lease and routes are exactly what flanneld's host-gw writes.
#[test]
fn mixed_cluster_with_a_flanneld_host_gw_node() {
    let (mut c, pods) = cluster(2);
    let subnets: Vec<Ipv4Net> = (0..2)
        .map(|i| c.nodes[i].subnet_env().unwrap().0.trunc())
        .collect();
    c.add_node(3).unwrap();
    let flannel_subnet: Ipv4Net = "10.244.200.0/24".parse().unwrap();
    let n3 = &mut c.nodes[2].node;
    n3.add_bridge_for(flannel_subnet, 1500).unwrap();
    let flannel_pod = n3.add_pod_in(flannel_subnet, 1, 1500).unwrap();
    host_gw(
        n3,
        &[
            (subnets[0], Ipv4Addr::new(198, 18, 0, 11)),
            (subnets[1], Ipv4Addr::new(198, 18, 0, 12)),
        ],
    )
    .unwrap();
    c.etcdctl(&[
        "put",
        "/coreos.com/network/subnets/10.244.200.0-24",
        r#"{"PublicIP":"198.18.0.13","PublicIPv6":null,"BackendType":"host-gw"}"#,
    ])
    .unwrap();
    for i in 0..2 {
        let ok = Cluster::wait_for(Duration::from_secs(5), || {
            route(&c, i, flannel_subnet) == via(flannel_subnet, Ipv4Addr::new(198, 18, 0, 13))
        });
        assert!(
            ok.is_some(),
            "agent {} did not route the flanneld node's subnet; log:\n{}",
            i + 1,
            c.agent_log(i)
        );
    }
    c.assert_pods_reach_a_flanneld_node(&pods, 2, flannel_pod, 1472);
    for i in 0..2 {
        assert!(
            ping(&c.nodes[i].node.ns, flannel_pod, 2, None),
            "agent host → flanneld pod"
        );
    }
    // The source IP kept under Docker's MASQUERADE, towards the flanneld node's pod.
    c.masquerade_like_docker(0).unwrap();
    let (first, rest) = c.nodes.split_at_mut(1);
    let (_, seen) = tcp_transfer(
        &mut rest[1].node.pods[0].ns,
        flannel_pod,
        &first[0].node.pods[0].ns,
        2,
    )
    .unwrap();
    assert_eq!(
        seen,
        pods[0].to_string(),
        "the flanneld node's pod must see the agent pod's own IP"
    );
    // Its lease removed, its route goes.
    c.etcdctl(&["del", "/coreos.com/network/subnets/10.244.200.0-24"])
        .unwrap();
    for i in 0..2 {
        let gone = Cluster::wait_for(Duration::from_secs(5), || route(&c, i, flannel_subnet).is_empty());
        assert!(
            gone.is_some(),
            "agent {}: the removed lease's route stayed",
            i + 1
        );
    }
    assert_eq!(nth_host(flannel_subnet, 2), flannel_pod);

    // `cleanup` on a stopped host-gw node removes its routes to peers' subnets and the recorder
    // with everything else; the flanneld node's own routes are not the agent's to touch.
    c.stop_agent(0, Signal::SIGTERM);
    let out = c.run_cleanup(0, &overlay_tests::cluster::agent_bin()).unwrap();
    assert!(
        out.contains(&format!("removed route {} via 198.18.0.12", subnets[1])),
        "cleanup did not report the route to node 2's subnet: {out}"
    );
    assert_eq!(
        route(&c, 0, subnets[1]),
        "",
        "cleanup left a route to a peer's subnet"
    );
    let filters = output(
        &c.nodes[0].node.ns,
        "tc",
        &["filter", "show", "dev", "eth0", "egress"],
    )
    .unwrap();
    let links = output(&c.nodes[0].node.ns, "bpftool", &["net", "show", "dev", "eth0"]).unwrap_or_default();
    assert!(
        !filters.contains("overlay_record") && !links.contains("overlay_record"),
        "cleanup left the recorder on eth0:\n{filters}\n{links}"
    );
    assert_eq!(
        route(&c, 2, subnets[0]),
        via(subnets[0], Ipv4Addr::new(198, 18, 0, 11))
    );
}

/// flanneld's host-gw refuses to start when the PublicIP is not the interface's (a node behind
/// NAT); so does the agent, with flanneld's reason and the fix, before taking a lease.
#[test]
fn a_public_ip_behind_nat_is_refused() {
    require_root();
    let mut c = Cluster::new(1, HOST_GW).unwrap();
    c.nodes[0].extra_args = vec!["--public-ip".into(), "198.18.0.99".into()];
    c.start_agent(0).unwrap();
    let status = c.wait_agent_exit(0, Duration::from_secs(10));
    assert!(
        matches!(status, Some(s) if !s.success()),
        "agent did not fail: {status:?}"
    );
    let log = c.agent_log(0);
    assert!(
        log.contains("your PublicIP 198.18.0.99 differs from the interface's addresses, meaning that probably you're on a NAT"),
        "{log}"
    );
    assert_eq!(c.leases().unwrap(), "", "a lease was taken");
}

/// Changing a running cluster's backend, as the README says to: new config, agents restarted
/// one by one; traffic flows again once every node runs the new backend, both ways round.
#[test]
fn switching_a_cluster_between_vxlan_and_host_gw() {
    const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
    require_root();
    let (mut c, pods) = Cluster::running(2, VXLAN).expect("building the cluster");
    let subnets: Vec<Ipv4Net> = (0..2)
        .map(|i| c.nodes[i].subnet_env().unwrap().0.trunc())
        .collect();
    assert!(
        ping(&c.nodes[0].node.pods[0].ns, pods[1], 2, None),
        "vxlan: pod 1 → pod 2"
    );
    for (config, backend) in [(HOST_GW, "host-gw"), (VXLAN, "vxlan")] {
        c.etcdctl(&["put", "/coreos.com/network/config", config]).unwrap();
        for i in 0..2 {
            let held = c
                .restart_agent_fresh(i, Signal::SIGTERM, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("{backend}: node {} restart: {e:#}", i + 1));
            assert_eq!(
                held.trunc(),
                subnets[i],
                "{backend}: node {} changed subnet",
                i + 1
            );
        }
        for (i, j) in [(0usize, 1usize), (1, 0)] {
            let ok = Cluster::wait_for(Duration::from_secs(5), || {
                c.agent_peers(i).map(|p| p.contains(&subnets[j])).unwrap_or(false)
            });
            assert!(
                ok.is_some(),
                "{backend}: node {} did not learn node {}; log:\n{}",
                i + 1,
                j + 1,
                c.agent_log(i)
            );
            c.wait_encap_attached(i);
        }
        let values = lease_values(&c);
        assert!(
            values
                .iter()
                .all(|(_, v)| v.contains(&format!(r#""BackendType":"{backend}""#))),
            "{backend}: {values:?}"
        );
        for (a, b) in [(0usize, 1usize), (1, 0)] {
            assert!(
                ping(&c.nodes[a].node.pods[0].ns, pods[b], 3, None),
                "{backend}: pod {} → pod {} after the switch",
                pods[a],
                pods[b]
            );
        }
        // What is attached follows the backend: the recorder on eth0's egress with host-gw
        // only, and no pin left of a link on a device the switch removed.
        let st = c.status_json(0).unwrap();
        let attached: Vec<(String, String, bool)> = st["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["program"].as_str().unwrap_or("").to_string(),
                    a["iface"].as_str().unwrap_or("").to_string(),
                    a["iface_present"].as_bool().unwrap_or(false),
                )
            })
            .collect();
        assert!(
            attached.iter().all(|(_, _, present)| *present),
            "{backend}: a pinned link of a removed device: {attached:?}"
        );
        let recorder = attached
            .iter()
            .any(|(p, i, _)| p == "overlay_record" && i == "eth0");
        assert_eq!(
            recorder,
            backend == "host-gw",
            "{backend}: the recorder: {attached:?}"
        );
        let ip = Ipv4Addr::new(198, 18, 0, 12);
        let (hostdev, route_now) = (
            c.nodes[0].node.ns.ip(&["link", "show", "overlay0"]).is_ok(),
            route(&c, 0, subnets[1]),
        );
        if backend == "host-gw" {
            assert_eq!(
                (hostdev, route_now),
                (false, via(subnets[1], ip)),
                "host-gw: overlay0, route"
            );
        } else {
            assert_eq!(
                (hostdev, route_now.as_str()),
                (true, ""),
                "vxlan: overlay0, the host-gw route"
            );
        }
    }
}

/// flanneld's host-gw does both families: a dual-stack host-gw cluster routes each node's IPv6
/// subnet via its PublicIPv6, and IPv6 pod packets travel bare from the fast path.
#[test]
fn dual_stack_host_gw_routes_and_sends_ipv6_pods_bare() {
    use overlay_tests::dualstack::{bridge_and_pod, cluster as dual_cluster, iperf6, nth6, ping6, underlay6};
    const DUAL_HOST_GW: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"host-gw"}}"#;
    let (mut c, subnets) = dual_cluster(2, DUAL_HOST_GW);
    let subnets: Vec<ipnet::Ipv6Net> = subnets.iter().map(|s| s.trunc()).collect();
    let pods: Vec<overlay_tests::netns::Netns> = (0..2)
        .map(|i| bridge_and_pod(&mut c, i, subnets[i], true))
        .collect();
    for (i, j) in [(0usize, 1usize), (1, 0)] {
        let want = format!("{} via {} dev eth0", subnets[j], underlay6(j as u8 + 1));
        let ok = Cluster::wait_for(Duration::from_secs(5), || {
            output(
                &c.nodes[i].node.ns,
                "ip",
                &["-6", "route", "show", &subnets[j].to_string()],
            )
            .is_ok_and(|r| r.starts_with(&want))
        });
        assert!(
            ok.is_some(),
            "node {}: no route {want}; log:\n{}",
            i + 1,
            c.agent_log(i)
        );
    }
    let values = lease_values(&c);
    for i in 0..2 {
        let want = format!(
            r#"{{"PublicIP":"198.18.0.{}","PublicIPv6":"{}","BackendType":"host-gw"}}"#,
            11 + i,
            underlay6(i as u8 + 1)
        );
        assert!(
            values.iter().any(|(_, v)| *v == want),
            "no lease {want} in {values:?}"
        );
    }
    for i in 0..2 {
        c.wait_encap_attached(i);
    }
    let (a, b) = (nth6(subnets[0], 2), nth6(subnets[1], 2));
    let pcap = c.dir().join("hostgw6.txt");
    let filter = format!("udp port 8472 or (icmp6 and host {b})");
    let cap = c.underlay.ns.capture("br0", 4, &filter, &pcap).unwrap();
    let (counts, text) = ping6(&pods[0], b, 2, None, false);
    assert_eq!(counts, Some((2, 2)), "pod 1 → pod 2 over IPv6:\n{text}");
    let seen = cap.wait(&mut c.underlay.ns, Duration::from_secs(5));
    assert_eq!(seen.lines().count(), 4, "{seen}");
    assert!(
        seen.contains(&format!("{a} > {b}"))
            && seen.contains(&format!("{b} > {a}"))
            && !seen.contains(".8472"),
        "IPv6 pod packets not bare both ways on the underlay:\n{seen}"
    );
    // Both pods have spoken (their nodes learned them): the next packets are delivered straight.
    for (from, to) in [(0, b), (1, a)] {
        let (counts, text) = ping6(&pods[from], to, 2, None, false);
        assert_eq!(counts, Some((2, 2)), "pod {} → {to} over IPv6:\n{text}", from + 1);
    }
    for i in 0..2 {
        let st = c.status_json(i).unwrap();
        let n = |name: &str| st["counters"][name].as_u64().unwrap_or(0);
        assert!(
            n("direct6_packets") >= 2,
            "node {i} sent no IPv6 pod packet from the fast path: {st}"
        );
        assert!(
            n("deliver6_packets") >= 2 && n("drop_wrong_sender") == 0,
            "node {i} delivered no bare IPv6 pod packet straight to its pod: {st}"
        );
    }
    let t = iperf6(&pods[1], b, &pods[0], c.dir());
    assert_eq!(t.seen, a.to_string());
    assert!(t.bytes > 0);
}
