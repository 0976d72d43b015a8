//! Tier 3 (root): IPv6 through the real agent. Nodes with an IPv6 underlay address
//! (fd00:198:18::/64 beside 198.18.0.0/24), a network config with `EnableIPv6`, pods with an
//! address from the node's IPv6 lease on `cni0`: IPv6 pod ↔ pod both ways (and IPv4 still),
//! bulk TCP over IPv6, the pod's own IPv6 source kept under an ip6tables MASQUERADE rule, host →
//! remote pod over IPv6, Packet Too Big for an oversize packet, and an IPv6-only network.
//!
//! Run: `cargo build -p overlay-agent && cargo test -p overlay-tests --test netns_dualstack -- --test-threads=1`

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use ipnet::{Ipv4Net, Ipv6Net};
use overlay_tests::{
    cluster::{output, Cluster},
    dualstack::{
        add_bridge_ipv6, add_pod_ipv6, bridge_and_pod, cluster, iperf6, ipv6_only_pods_talk, nth6, ping6,
        underlay6, wait_ipv6_subnets, wait_peers, Transfer, DUAL, NETWORK6, V6_ONLY,
    },
    netns::{parse_mac, require_root, Netns},
    topology::{flannel_vxlan, flannel_vxlan6, fmt_mac, ping, Node},
};

#[test]
fn dual_stack_pods_talk_over_ipv6_and_ipv4_with_their_own_addresses() {
    let (mut c, subnets) = cluster(2, DUAL);
    let pods: Vec<Netns> = (0..2)
        .map(|i| bridge_and_pod(&mut c, i, subnets[i], true))
        .collect();
    wait_peers(&c);
    let ip = |i: usize| nth6(subnets[i], 2);
    for (from, to) in [(0, 1), (1, 0)] {
        let (counts, text) = ping6(&pods[from], ip(to), 5, None, false);
        assert_eq!(
            counts,
            Some((5, 5)),
            "pod {from} → pod {to} over IPv6:\n{text}\n{}",
            c.agent_log(to)
        );
    }
    // IPv4 beside it.
    let v4 = c.nodes[1].subnet_env().unwrap().0;
    let v4_pod = overlay_tests::topology::nth_host(v4.trunc(), 2);
    assert!(ping(&pods[0], v4_pod, 3, None), "IPv4 pod → pod beside IPv6");

    // Encapsulated over the IPv6 underlay: the counters say so.
    let st = c.status_json(0).unwrap();
    let text = st.to_string();
    assert!(
        text.contains("encap6"),
        "no IPv6 encap counters in status: {text}"
    );
    // `status` lists the IPv6 peer beside the IPv4 one, and our PublicIPv6.
    let peers: Vec<String> = st["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{} {}",
                p["subnet"].as_str().unwrap(),
                p["public_ip"].as_str().unwrap()
            )
        })
        .collect();
    assert!(
        peers.contains(&format!("{} {}", subnets[1], underlay6(2))),
        "no IPv6 peer in status: {peers:?}"
    );
    assert_eq!(peers.len(), 2, "{peers:?}");
    assert_eq!(st["node"]["public_ipv6"], underlay6(1).to_string());

    // The pod's own source survives a MASQUERADE rule on its node, as Docker/CNI add them.
    c.nodes[0]
        .node
        .ns
        .exec(
            "ip6tables",
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                NETWORK6,
                "!",
                "-o",
                "cni0",
                "-j",
                "MASQUERADE",
            ],
        )
        .unwrap();
    let Transfer { bps, seen, .. } = iperf6(&pods[1], ip(1), &pods[0], c.dir());
    println!("IPv6 pod → pod TCP: {:.2} Gbit/s, server saw {seen}", bps / 1e9);
    let st = c.status_json(1).unwrap();
    println!("node 1 counters after IPv6 TCP: {}", st["counters"]);
    assert!(bps > 100e6, "bulk TCP over IPv6: {bps} bit/s");
    assert_eq!(seen, ip(0).to_string(), "the IPv6 source was rewritten");

    // The node itself reaches a remote pod over IPv6, from its subnet's first address.
    let (counts, text) = ping6(&c.nodes[0].node.ns, ip(1), 3, None, false);
    assert_eq!(counts, Some((3, 3)), "node 0 → pod 1 over IPv6:\n{text}");
    let route = output(
        &c.nodes[0].node.ns,
        "ip",
        &["-6", "route", "get", &ip(1).to_string()],
    )
    .unwrap();
    assert!(
        route.contains("dev overlay0") && route.contains("mtu 1430"),
        "{route}"
    );
    // The pair that segments GSO packets with a short last segment before encap: TCP and UDP
    // segmentation off on overlay0p, encap on overlay0's ingress too.
    let features = output(&c.nodes[0].node.ns, "ethtool", &["-k", "overlay0p"]).unwrap();
    for f in [
        "tx-tcp-segmentation: off",
        "tx-tcp6-segmentation: off",
        "tx-udp-segmentation: off",
    ] {
        assert!(features.contains(f), "overlay0p: no {f:?}:\n{features}");
    }
    let attached = c.status_json(0).unwrap()["attachments"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // Encap on both of overlay0's hooks, each named by its own direction, both ours (the same
    // program on two hooks once read as two ingress links and a stranger's egress one).
    let mut on_overlay0: Vec<String> = attached
        .iter()
        .filter(|a| a["iface"] == "overlay0")
        .map(|a| format!("{} {} ours={}", a["program"], a["direction"], a["ours"]))
        .collect();
    on_overlay0.sort();
    assert_eq!(
        on_overlay0,
        [
            "\"overlay_encap\" \"egress\" ours=true",
            "\"overlay_encap\" \"ingress\" ours=true"
        ],
        "overlay0's attachments: {attached:#?}"
    );
}

#[test]
fn oversize_ipv6_gets_packet_too_big_and_then_fits() {
    let (mut c, subnets) = cluster(2, DUAL);
    let pods: Vec<Netns> = (0..2)
        .map(|i| bridge_and_pod(&mut c, i, subnets[i], true))
        .collect();
    wait_peers(&c);
    let to = nth6(subnets[1], 2);
    // 1400 bytes of payload: a 1448-byte IPv6 packet, within the pod's MTU (1450, as flanneld
    // writes it) but over the tunnel's over an IPv6 underlay (1500 − 70 = 1430). IPv6 routers
    // never fragment: the sender must hear Packet Too Big.
    let (counts, text) = ping6(&pods[0], to, 1, Some(1400), true);
    assert!(
        text.contains("mtu=1430") || text.contains("mtu = 1430") || text.contains("too big"),
        "no Packet Too Big with the tunnel MTU: {counts:?}\n{text}"
    );
    // The sender learned the path MTU: without DF, ping now fragments at the source. The far
    // pod's oversize replies meet the same tunnel and the same rule: a reply is dropped with a
    // Packet Too Big back to pod 1 until it has learned the path MTU too (captured in pod 1:
    // replies of 1448 bytes, each answered by a PTB with mtu 1430). Path MTU discovery loses
    // those packets by design; once both sides know, oversize pings get through.
    let through = Cluster::wait_for(Duration::from_secs(5), || {
        ping6(&pods[0], to, 1, Some(1400), false).0 == Some((1, 1))
    });
    assert!(
        through.is_some(),
        "oversize IPv6 never got through after Packet Too Big"
    );
    let (counts, text) = ping6(&pods[0], to, 3, Some(1400), false);
    assert_eq!(
        counts,
        Some((3, 3)),
        "oversize IPv6 once the path MTU is known:\n{text}"
    );
    // Replies fragmented by pod 1 as well: the fragments crossed the tunnel.
    let st = c.status_json(1).unwrap();
    assert!(
        st["counters"]["encap6_packets"].as_u64().unwrap_or(0) >= 6,
        "{}",
        st["counters"]
    );
}

#[test]
fn ipv6_only_network_carries_ipv6_pods() {
    let (mut c, subnets) = cluster(2, V6_ONLY);
    for i in 0..2 {
        let env = std::fs::read_to_string(&c.nodes[i].subnet_file).unwrap();
        assert!(
            !env.contains("FLANNEL_SUBNET="),
            "IPv6-only: no IPv4 subnet expected:\n{env}"
        );
    }
    ipv6_only_pods_talk(&mut c, &subnets, "IPv6-only");
}

/// Nodes whose underlay has no IPv4 at all (no address, no route; etcd reached over IPv6): the
/// agent finds eth0 by its IPv6 address, an IPv6-only network carries IPv6 pods both ways, and
/// the lease is flanneld's IPv6-only one. A config that enables IPv4 on such a host is refused,
/// naming what to do.
#[test]
fn hosts_without_ipv4_run_an_ipv6_only_network() {
    require_root();
    let mut c = Cluster::new(2, V6_ONLY).expect("building the cluster");
    let endpoint6 = c.etcd_endpoint6();
    for (i, n) in c.nodes.iter_mut().enumerate() {
        let ns = &n.node.ns;
        ns.ip(&["-4", "addr", "flush", "dev", "eth0"]).unwrap();
        let addr = format!("{}/64", underlay6(i as u8 + 1));
        ns.ip(&["-6", "addr", "add", &addr, "dev", "eth0", "nodad"])
            .unwrap();
        let v4 = output(ns, "ip", &["-4", "addr", "show"]).unwrap();
        assert!(
            !v4.contains("198.18."),
            "node {i} still has IPv4 on the underlay:\n{v4}"
        );
        n.etcd_endpoint = Some(endpoint6.clone());
    }
    for i in 0..2 {
        c.start_agent(i).unwrap();
    }
    let subnets = wait_ipv6_subnets(&c);
    for i in 0..2 {
        assert!(
            c.agent_log(i)
                .contains(&format!("address={} by=--iface eth0", underlay6(i as u8 + 1))),
            "node {i}: eth0 not chosen by its IPv6 address:\n{}",
            c.agent_log(i)
        );
    }
    // flanneld's IPv6-only lease: no IPv4 subnet in the key, PublicIP 0.0.0.0 (flanneld's
    // zero value), our PublicIPv6.
    let leases = c.leases().unwrap();
    for (i, sn) in subnets.iter().enumerate() {
        let key = format!("0.0.0.0-0&{}-{}", sn.network(), sn.prefix_len());
        let line = leases
            .lines()
            .skip_while(|l| !l.ends_with(&key))
            .nth(1)
            .unwrap_or_else(|| panic!("no lease {key}:\n{leases}"));
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["PublicIPv6"], underlay6(i as u8 + 1).to_string(), "{line}");
        assert_eq!(v["PublicIP"], "0.0.0.0", "{line}");
    }
    let pods = ipv6_only_pods_talk(&mut c, &subnets, "hosts without IPv4");
    let Transfer { bps, seen, .. } = iperf6(&pods[1], nth6(subnets[1], 2), &pods[0], c.dir());
    println!("hosts without IPv4: pod → pod TCP {:.2} Gbit/s", bps / 1e9);
    assert!(bps > 100e6, "bulk TCP between hosts without IPv4: {bps} bit/s");
    assert_eq!(seen, nth6(subnets[0], 2).to_string());

    // The same host with a config that enables IPv4 (as it is by default): refused, naming
    // the way out, and nothing taken in etcd.
    c.stop_agent(0, nix::sys::signal::Signal::SIGTERM);
    c.etcdctl(&["put", "/coreos.com/network/config", DUAL]).unwrap();
    let before = c.leases().unwrap();
    let log_from = c.agent_log(0).len();
    c.start_agent(0).unwrap();
    let status = c.wait_agent_exit(0, Duration::from_secs(20));
    let log = c.agent_log(0)[log_from..].to_string();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the agent kept running on a host without IPv4 under an IPv4 config:\n{log}"
    );
    assert!(log.contains("--public-ip"), "the error names no way out:\n{log}");
    assert!(
        !c.leases().unwrap().contains("10.244."),
        "an IPv4 lease was taken:\n{before}"
    );
}

/// DirectRouting, as flanneld applies it to `flannel-v6.1` too: peers on our IPv6 segment get
/// IPv6 pod packets bare, with no VXLAN on the wire, both ways.
#[test]
fn direct_routing_peers_get_ipv6_pod_packets_bare() {
    let config = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan","DirectRouting":true}}"#;
    let (mut c, subnets) = cluster(2, config);
    let pods: Vec<Netns> = (0..2)
        .map(|i| bridge_and_pod(&mut c, i, subnets[i], true))
        .collect();
    wait_peers(&c);
    let (a, b) = (nth6(subnets[0], 2), nth6(subnets[1], 2));
    // The first 4 packets that are pod ICMPv6 or VXLAN: 2 pings make 4 ICMPv6 packets, so any
    // VXLAN packet would be among them.
    let pcap = c.dir().join("direct6.txt");
    let filter = format!("udp port 8472 or (icmp6 and host {b})");
    let cap = c.underlay.ns.capture("br0", 4, &filter, &pcap).unwrap();
    let (counts, text) = ping6(&pods[0], b, 2, None, false);
    assert_eq!(counts, Some((2, 2)), "pod 0 → pod 1, DirectRouting:\n{text}");
    let seen = cap.wait(&mut c.underlay.ns, Duration::from_secs(5));
    assert!(
        seen.contains(&format!("{a} > {b}")) && seen.contains(&format!("{b} > {a}")),
        "bare pod ↔ pod ICMPv6 not seen both ways on the underlay:\n{seen}"
    );
    assert_eq!(seen.lines().count(), 4, "{seen}");
    assert!(
        !seen.contains(".8472"),
        "VXLAN between DirectRouting peers:\n{seen}"
    );
    for i in 0..2 {
        let st = c.status_json(i).unwrap();
        assert!(
            st["counters"]["direct6_packets"].as_u64().unwrap_or(0) > 0,
            "node {i} counted no direct IPv6 packet: {}",
            st["counters"]
        );
    }
    let Transfer { bps, seen, .. } = iperf6(&pods[1], b, &pods[0], c.dir());
    println!("DirectRouting IPv6 pod → pod TCP: {:.2} Gbit/s", bps / 1e9);
    assert_eq!(seen, a.to_string());
}

/// The agents' dual-stack leases as etcd holds them: (IPv4 subnet, PublicIP, VtepMAC, IPv6
/// subnet, PublicIPv6, IPv6 VtepMAC).
type DualLease = (Ipv4Net, Ipv4Addr, [u8; 6], Ipv6Net, Ipv6Addr, [u8; 6]);

fn dual_leases(c: &Cluster) -> Vec<DualLease> {
    let text = c.leases().unwrap();
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks(2)
        .map(|kv| {
            let key = kv[0].rsplit('/').next().unwrap();
            let (k4, k6) = key.split_once('&').expect("a dual-stack key");
            let v: serde_json::Value = serde_json::from_str(kv[1]).unwrap();
            let mac = |f: &str| parse_mac(v[f]["VtepMAC"].as_str().unwrap()).unwrap();
            let (a6, l6) = k6.rsplit_once('-').unwrap();
            (
                k4.replacen('-', "/", 1).parse().unwrap(),
                v["PublicIP"].as_str().unwrap().parse().unwrap(),
                mac("BackendData"),
                format!("{a6}/{l6}").parse().unwrap(),
                v["PublicIPv6"].as_str().unwrap().parse().unwrap(),
                mac("BackendV6Data"),
            )
        })
        .collect()
}

/// Node `n` set up exactly as flanneld's dual-stack vxlan backend sets itself up: `flannel.1`
/// over IPv4 and `flannel-v6.1` over IPv6 (kernel VXLAN, VNI 1, port 8472, its own MAC each),
/// per peer a permanent neighbour for the peer subnet's first address, an FDB entry to the
/// peer's public address and an onlink route; returns the two devices' MACs.
fn flanneld_dual_stack(node: &Node, sn4: Ipv4Net, sn6: Ipv6Net, peers: &[DualLease]) -> ([u8; 6], [u8; 6]) {
    let v4: Vec<_> = peers.iter().map(|p| (p.0, p.1, p.2)).collect();
    let v6: Vec<_> = peers.iter().map(|p| (p.3, p.4, p.5)).collect();
    let mac4 = flannel_vxlan(node, sn4, &v4).unwrap();
    let mac6 = flannel_vxlan6(node, sn6, &v6).unwrap();
    (mac4, mac6)
}

#[test]
fn mixed_cluster_with_a_flanneld_style_dual_stack_node() {
    let (mut c, subnets) = cluster(2, DUAL);
    let pods: Vec<Netns> = (0..2)
        .map(|i| bridge_and_pod(&mut c, i, subnets[i], true))
        .collect();
    wait_peers(&c);
    let peers = dual_leases(&c);
    assert_eq!(peers.len(), 2, "{peers:?}");

    // Node 3 runs no agent: kernel VXLAN for both families, as flanneld sets a node up.
    c.add_node(3).unwrap();
    let sn4: Ipv4Net = "10.244.200.0/24".parse().unwrap();
    let sn6: Ipv6Net = "fd00:10:244:c8::/64".parse().unwrap();
    let (mac4, mac6) = {
        let n3 = &c.nodes[2].node;
        n3.add_underlay6().unwrap();
        flanneld_dual_stack(n3, sn4, sn6, &peers)
    };
    c.nodes[2].node.add_bridge_for(sn4, 1450).unwrap();
    let pod4 = c.nodes[2].node.add_pod_in(sn4, 1, 1450).unwrap();
    let n3pod = c.nodes[2].node.pods.remove(0).ns;
    let n3 = &c.nodes[2].node.ns;
    add_bridge_ipv6(n3, sn6).unwrap();
    add_pod_ipv6(&n3pod, nth6(sn6, 2), sn6).unwrap();
    // Its lease, byte for byte as a dual-stack flanneld writes it.
    let value = format!(
        r#"{{"PublicIP":"198.18.0.13","PublicIPv6":"{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
        underlay6(3),
        fmt_mac(&mac4),
        fmt_mac(&mac6)
    );
    c.etcdctl(&[
        "put",
        "/coreos.com/network/subnets/10.244.200.0-24&fd00:10:244:c8::-64",
        &value,
    ])
    .unwrap();

    // Node 1's underlay computes no checksum and segments nothing (a NIC without offloads for
    // tunnels): every outer UDP checksum it sends is the one on the wire, and the kernel VXLAN
    // on node 3 checks each; node 2 keeps the veth's offloads (GSO packets cross whole).
    c.nodes[0]
        .node
        .ns
        .exec("ethtool", &["-K", "eth0", "tx", "off"])
        .expect("ethtool -K eth0 tx off on node 1");
    let csum_errors = || -> u64 {
        let out = n3.exec("cat", &["/proc/net/snmp6"]).expect("node 3's snmp6");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Udp6InCsumErrors"))
            .and_then(|v| v.trim().parse().ok())
            .expect("Udp6InCsumErrors in node 3's snmp6")
    };

    let pod6 = nth6(sn6, 2);
    for (i, pod) in pods.iter().enumerate() {
        let agent6 = nth6(subnets[i], 2);
        // The agents pick the lease up from their watch.
        let learned = Cluster::wait_for(Duration::from_secs(5), || {
            ping6(pod, pod6, 1, None, false).0 == Some((1, 1))
        });
        assert!(
            learned.is_some(),
            "agent pod {agent6} never reached the flanneld pod {pod6}:\n{}",
            c.agent_log(i)
        );
        for (from, to, what) in [
            (pod, pod6, "agent pod → flanneld pod"),
            (&n3pod, agent6, "flanneld pod → agent pod"),
        ] {
            let (counts, text) = ping6(from, to, 3, None, false);
            assert_eq!(counts, Some((3, 3)), "{what} over IPv6 (node {}):\n{text}", i + 1);
        }
        // Bulk TCP into the kernel VXLAN, which checks every outer UDP checksum over IPv6.
        let before = csum_errors();
        let Transfer { bps, seen, .. } = iperf6(&n3pod, pod6, pod, c.dir());
        let counters = &c.status_json(i).unwrap()["counters"];
        println!(
            "agent pod (node {}) → flanneld pod, TCP over IPv6: {:.2} Gbit/s ({} GSO packets segmented before encap, {} encapsulated)",
            i + 1,
            bps / 1e9,
            counters["encap6_resegmented"],
            counters["encap6_packets"]
        );
        assert_eq!(
            csum_errors() - before,
            0,
            "node 3's kernel VXLAN dropped packets from node {} for a bad outer UDP checksum",
            i + 1
        );
        if i == 0 {
            // A pod's UDP GSO (UDP_SEGMENT, as QUIC stacks send): 2940 bytes in 1370-byte
            // datagrams, the third 200 bytes. Every datagram must arrive, none dropped for its
            // outer checksum by the kernel VXLAN.
            let before = csum_errors();
            let got = udp_gso_datagrams(pod, &n3pod, pod6, 20);
            assert_eq!(
                (got, csum_errors() - before),
                (60, 0),
                "UDP GSO from node 1's pod: (datagrams received of 60, outer checksum errors)"
            );
        }
        assert!(
            counters["encap6_resegmented"].as_u64().unwrap_or(0) > 0,
            "node {}: no GSO packet with a short last segment was segmented before encap: {counters}",
            i + 1
        );
        assert!(
            bps > 100e6,
            "bulk TCP into the flanneld node over IPv6: {bps} bit/s"
        );
        assert_eq!(seen, agent6.to_string());
        let v4 = overlay_tests::topology::nth_host(c.nodes[i].subnet_env().unwrap().0.trunc(), 2);
        assert!(
            ping(pod, pod4, 3, None),
            "agent pod → flanneld pod over IPv4 (node {})",
            i + 1
        );
        assert!(
            ping(&n3pod, v4, 3, None),
            "flanneld pod → agent pod over IPv4 (node {})",
            i + 1
        );
    }
}

/// Sends `sends` UDP GSO buffers (UDP_SEGMENT 1370, 2940 bytes each: datagrams of 1370, 1370 and
/// 200 bytes) from `client` to `addr`:9999 in `server`; how many datagrams arrived.
fn udp_gso_datagrams(client: &Netns, server: &Netns, addr: Ipv6Addr, sends: u32) -> u32 {
    use std::net::UdpSocket;
    let rx = {
        let _inside = server.enter().unwrap();
        UdpSocket::bind((addr, 9999)).unwrap()
    };
    rx.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let tx = {
        let _inside = client.enter().unwrap();
        UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).unwrap()
    };
    nix::sys::socket::setsockopt(&tx, nix::sys::socket::sockopt::UdpGsoSegment, &1370).unwrap();
    let buf = vec![0x5au8; 2940];
    for _ in 0..sends {
        tx.send_to(&buf, (addr, 9999)).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut got = 0;
    let mut b = [0u8; 2048];
    while rx.recv_from(&mut b).is_ok() {
        got += 1;
    }
    got
}

/// First contact from cold, both families: node 2 has never heard from its pod (no neighbour
/// entry, so no endpoint: decap hands the first packets to the stack, which must solicit the pod
/// and forward them, as it does for IPv4) and the pod answers the very first pings.
fn first_contact_from_cold(decap: &str) {
    let (mut c, subnets) = overlay_tests::dualstack::cluster_with(2, DUAL, |n| {
        n.extra_args.extend(["--decap".to_string(), decap.to_string()]);
    });
    let pods: Vec<Netns> = (0..2)
        .map(|i| bridge_and_pod(&mut c, i, subnets[i], true))
        .collect();
    wait_peers(&c);
    let node2 = &c.nodes[1].node.ns;
    for family in ["-4", "-6"] {
        node2
            .exec("ip", &[family, "neigh", "flush", "dev", "cni0"])
            .unwrap();
    }
    let cold = Cluster::wait_for(Duration::from_secs(5), || {
        c.status_json(1).unwrap()["endpoints"]
            .as_array()
            .is_some_and(|e| e.is_empty())
    });
    assert!(
        cold.is_some(),
        "node 2 still lists endpoints after its neighbours were flushed: {}",
        c.status_json(1).unwrap()["endpoints"]
    );
    let (counts, text) = ping6(&pods[0], nth6(subnets[1], 2), 2, None, false);
    assert_eq!(
        counts,
        Some((2, 2)),
        "--decap {decap}: the first IPv6 pings to a pod its node never saw:\n{text}\n{}",
        c.agent_log(1)
    );
    let v4 = overlay_tests::topology::nth_host(c.nodes[1].subnet_env().unwrap().0.trunc(), 2);
    assert!(
        ping(&pods[0], v4, 2, None),
        "--decap {decap}: the first IPv4 pings to a pod its node never saw"
    );
}

#[test]
fn first_contact_from_cold_tc_decap() {
    first_contact_from_cold("tc");
}

#[test]
fn first_contact_from_cold_xdp_decap() {
    first_contact_from_cold("xdp");
}
