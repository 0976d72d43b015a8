//! Tier 3 (root): direct delivery of decapsulated IPv6 pod traffic through the real agent, on
//! dual-stack 2-node clusters (IPv6 pods over the IPv6 underlay, flannel-v6.1's combination):
//! the receiving node learns its pod's IPv6 address from the bridge, lists it in `status`, and
//! decap hands IPv6 packets for it straight into the pod (`deliver6_packets`), with TC decap and
//! with XDP decap (the TC program after GRO delivering what XDP stripped); `--deliver stack`
//! delivers nothing and traffic still flows; a pod whose veth was deleted falls back to the
//! stack, and its recreation on a new veth is delivered to again.
//!
//! Run: `cargo build -p overlay-agent && cargo test -p overlay-tests --test netns_dualstack_deliver -- --test-threads=1 --nocapture`

use std::{net::Ipv6Addr, time::Duration};

use ipnet::Ipv6Net;
use nix::sys::signal::Signal;
use overlay_tests::{
    cluster::Cluster,
    dualstack::{
        add_pod_ipv6, bridge_and_pod, cluster_with, iperf6, ipv6_subnet, nth6, ping6, wait_peers, Transfer,
        DUAL,
    },
    netns::{veth, Netns},
    topology::{nth_host, ping},
};
/// The pods' MTU (what subnet.env says for a 1500 underlay); IPv6 path MTU discovery settles
/// below it (the IPv6 tunnel carries 1430).
const POD_MTU: &str = "1450";

/// A pod restart as the kubelet and the CNI bridge plugin do it, dual-stack: pod `old`'s
/// host-side veth `old_veth` on node `i` is deleted (its namespace with it), and a new namespace
/// gets the same addresses on a new veth pair (new name, new MACs) on `cni0`, then announces
/// them (a gratuitous ARP and an unsolicited Neighbor Advertisement with the Override flag, so
/// the node's neighbour entries take the new MAC at once). Returns (pod, its veth's name).
fn recreate_pod(c: &Cluster, i: usize, old: Netns, old_veth: &str, subnet6: Ipv6Net) -> (Netns, String) {
    let node = &c.nodes[i].node.ns;
    node.ip(&["link", "del", old_veth]).unwrap();
    drop(old);
    std::thread::sleep(Duration::from_millis(300));
    let (subnet4, _) = c.nodes[i].subnet_env().unwrap();
    let subnet4 = subnet4.trunc();
    let port = overlay_tests::netns::unique_name("vr");
    let pod = Netns::new("ovlp6r").unwrap();
    veth(&pod, "eth0", Some(node), &port).unwrap();
    node.ip(&["link", "set", &port, "master", "cni0"]).unwrap();
    node.ip(&["link", "set", &port, "mtu", POD_MTU]).unwrap();
    pod.ip(&["link", "set", "eth0", "mtu", POD_MTU]).unwrap();
    let ip4 = nth_host(subnet4, 2);
    pod.ip(&[
        "addr",
        "add",
        &format!("{ip4}/{}", subnet4.prefix_len()),
        "dev",
        "eth0",
    ])
    .unwrap();
    pod.ip(&[
        "route",
        "add",
        "default",
        "via",
        &nth_host(subnet4, 1).to_string(),
    ])
    .unwrap();
    let ip6 = nth6(subnet6, 2);
    add_pod_ipv6(&pod, ip6, subnet6).unwrap();
    let mac = pod.mac("eth0").unwrap();
    overlay_tests::packet::send_raw(&pod, "eth0", &overlay_tests::packet::garp(mac, ip4)).unwrap();
    overlay_tests::packet::send_raw(&pod, "eth0", &unsolicited_na(mac, ip6)).unwrap();
    (pod, port)
}

/// An unsolicited Neighbor Advertisement (RFC 4861 7.2.6) for `ip` at `mac`, Override set, to
/// all nodes: Ethernet, IPv6 (hop limit 255), ICMPv6 136 with a Target Link-Layer option.
fn unsolicited_na(mac: [u8; 6], ip: Ipv6Addr) -> Vec<u8> {
    let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
    let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend_from_slice(&ip.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac);
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for w in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
    };
    add(&ip.octets());
    add(&all_nodes.octets());
    add(&(icmp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(&icmp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    icmp[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let mut f = vec![0x33, 0x33, 0, 0, 0, 1];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&all_nodes.octets());
    f.extend_from_slice(&icmp);
    f
}

/// Counter `name` of node `i` (from `status --json`, which reads the pins whether the agent
/// runs or not).
fn counter(c: &Cluster, i: usize, name: &str) -> u64 {
    let st = c.status_json(i).unwrap();
    st["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {}", st["counters"]))
}

/// Node `i`'s endpoint entry for `ip` in `status --json`: (ifindex, veth name, pod MAC).
fn endpoint(c: &Cluster, i: usize, ip: Ipv6Addr) -> Option<(u32, Option<String>, String)> {
    let st = c.status_json(i).ok()?;
    st["endpoints"].as_array()?.iter().find_map(|e| {
        (e["ip"].as_str()? == ip.to_string()).then(|| {
            (
                e["ifindex"].as_u64().unwrap_or(0) as u32,
                e["iface"].as_str().map(str::to_string),
                e["mac"].as_str().unwrap_or("").to_string(),
            )
        })
    })
}

/// Waits until node `i` lists `ip` as an endpoint on veth `veth` with `pod`'s MAC.
fn wait_endpoint(c: &Cluster, i: usize, ip: Ipv6Addr, veth: &str, pod: &Netns, within: Duration) {
    let mac = overlay_tests::topology::fmt_mac(&pod.mac("eth0").unwrap());
    let mut seen = None;
    let ok = Cluster::wait_for(within, || {
        seen = endpoint(c, i, ip);
        matches!(&seen, Some((_, Some(v), m)) if v == veth && *m == mac)
    });
    assert!(
        ok.is_some(),
        "node {i} should list {ip} on {veth} ({mac}) within {within:?}; seen {seen:?}\nstatus: {}\nlog:\n{}",
        c.status_json(i)
            .map(|s| s["endpoints"].to_string())
            .unwrap_or_default(),
        c.agent_log(i)
    );
}

/// `count` pings from `pods[from]` to pod `to`, all answered; returns how many IPv6 packets
/// each node delivered meanwhile.
fn pings_delivered(
    c: &Cluster,
    pods: &[Netns],
    ips: &[Ipv6Addr],
    from: usize,
    to: usize,
    count: u32,
) -> [u64; 2] {
    let before = [
        counter(c, 0, "deliver6_packets"),
        counter(c, 1, "deliver6_packets"),
    ];
    let (counts, text) = ping6(&pods[from], ips[to], count, None, false);
    assert_eq!(
        counts,
        Some((count, count)),
        "pod {from} → pod {to} ({}) over IPv6:\n{text}\nlog of node {to}:\n{}",
        ips[to],
        c.agent_log(to)
    );
    [
        counter(c, 0, "deliver6_packets") - before[0],
        counter(c, 1, "deliver6_packets") - before[1],
    ]
}

/// Two nodes running agents with `args`, a dual-stack pod on each (its IPv6 address `::2` of the
/// node's IPv6 subnet), every agent knowing its IPv6 peers: (cluster, pods, their IPv6 addresses).
fn two_pods(args: &[&str]) -> (Cluster, Vec<Netns>, Vec<Ipv6Addr>) {
    let (mut c, subnets) = cluster_with(2, DUAL, |n| {
        n.extra_args.extend(args.iter().map(|a| a.to_string()))
    });
    let pods: Vec<Netns> = (0..2)
        .map(|i| bridge_and_pod(&mut c, i, subnets[i], true))
        .collect();
    wait_peers(&c);
    (c, pods, subnets.iter().map(|s| nth6(*s, 2)).collect())
}

#[test]
fn ipv6_pod_traffic_is_delivered_straight_into_the_pod() {
    let (c, pods, ips) = two_pods(&[]);
    // The first packets go through the stack, which resolves the pods; the agents learn them
    // from the bridges' IPv6 neighbours.
    for (from, to) in [(0, 1), (1, 0)] {
        let (counts, text) = ping6(&pods[from], ips[to], 3, None, false);
        assert_eq!(counts, Some((3, 3)), "pod {from} → pod {to}:\n{text}");
    }
    // The IPv4 side too, so that its pods are endpoints as well.
    let v4 = nth_host(c.nodes[1].subnet_env().unwrap().0.trunc(), 2);
    assert!(ping(&pods[0], v4, 2, None), "IPv4 pod → pod beside IPv6");
    for i in 0..2 {
        wait_endpoint(&c, i, ips[i], "veth1", &pods[i], Duration::from_secs(2));
    }
    let v4_listed = Cluster::wait_for(Duration::from_secs(2), || {
        c.agent_endpoints(1)
            .unwrap_or_default()
            .iter()
            .any(|e| e.ip == v4)
    });
    assert!(v4_listed.is_some(), "node 1 did not learn its IPv4 pod {v4}");
    // Each echo request is delivered on the receiving node, each reply on the sender's.
    let moved = pings_delivered(&c, &pods, &ips, 0, 1, 5);
    assert_eq!(
        moved,
        [5, 5],
        "deliver6_packets on (node 0, node 1) for 5 pings 0 → 1"
    );
    let moved = pings_delivered(&c, &pods, &ips, 1, 0, 5);
    assert_eq!(
        moved,
        [5, 5],
        "deliver6_packets on (node 0, node 1) for 5 pings 1 → 0"
    );
    // The IPv4 side is delivered as before.
    let d4 = counter(&c, 1, "deliver_packets");
    assert!(ping(&pods[0], v4, 3, None), "IPv4 pod → pod beside IPv6");
    assert_eq!(
        counter(&c, 1, "deliver_packets") - d4,
        3,
        "IPv4 deliveries on node 1"
    );

    // Bulk TCP: every byte the server received came through delivery on its node.
    let bytes_before = counter(&c, 1, "deliver6_bytes");
    let Transfer {
        bps,
        bytes: received,
        seen,
    } = iperf6(&pods[1], ips[1], &pods[0], c.dir());
    let delivered = counter(&c, 1, "deliver6_bytes") - bytes_before;
    println!(
        "IPv6 pod → pod TCP, delivered: {:.2} Gbit/s ({received} bytes received, node 1 delivered {delivered} bytes)",
        bps / 1e9
    );
    println!("node 1 counters: {}", c.status_json(1).unwrap()["counters"]);
    assert_eq!(seen, ips[0].to_string(), "the pod's IPv6 source");
    assert!(bps > 100e6, "bulk TCP over IPv6: {bps} bit/s");
    assert!(
        delivered >= received,
        "node 1 delivered {delivered} bytes of IPv6 (headers included) for {received} bytes of TCP payload"
    );
    // status (text) lists the IPv6 endpoint: run in the node's network namespace (veth names)
    // and the host's mount namespace (the pins).
    let out = c.nodes[1]
        .node
        .ns
        .command_net_only(overlay_tests::cluster::agent_bin().to_str().unwrap())
        .args(["status", "--pin-root", &c.nodes[1].pin_root])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains(&ips[1].to_string()) && l.contains("veth1")),
        "status does not list {} on veth1:\n{text}",
        ips[1]
    );
}

#[test]
fn with_deliver_stack_nothing_is_delivered_and_ipv6_still_flows() {
    let (c, pods, ips) = two_pods(&["--deliver", "stack"]);
    for (from, to) in [(0, 1), (1, 0)] {
        let (counts, text) = ping6(&pods[from], ips[to], 5, None, false);
        assert_eq!(
            counts,
            Some((5, 5)),
            "pod {from} → pod {to}, --deliver stack:\n{text}"
        );
    }
    let Transfer { bps, seen, .. } = iperf6(&pods[1], ips[1], &pods[0], c.dir());
    println!("IPv6 pod → pod TCP, --deliver stack: {:.2} Gbit/s", bps / 1e9);
    assert_eq!(seen, ips[0].to_string());
    assert!(
        bps > 100e6,
        "bulk TCP over IPv6: {bps} bit/s; counters: {} / {}",
        c.status_json(0).unwrap()["counters"],
        c.status_json(1).unwrap()["counters"]
    );
    for i in 0..2 {
        assert_eq!(counter(&c, i, "deliver6_packets"), 0, "node {i} delivered IPv6");
        assert_eq!(counter(&c, i, "deliver_packets"), 0, "node {i} delivered IPv4");
        assert!(
            counter(&c, i, "decap6_packets") >= 5,
            "node {i} decapsulated no IPv6"
        );
    }
}

#[test]
fn ipv6_stripped_by_xdp_is_delivered_by_the_tc_program_after_gro() {
    let (c, pods, ips) = two_pods(&["--decap", "xdp"]);
    assert_eq!(c.status_json(1).unwrap()["decap"], "xdp");
    for (from, to) in [(0, 1), (1, 0)] {
        let (counts, text) = ping6(&pods[from], ips[to], 3, None, false);
        assert_eq!(counts, Some((3, 3)), "pod {from} → pod {to}, XDP decap:\n{text}");
    }
    wait_endpoint(&c, 1, ips[1], "veth1", &pods[1], Duration::from_secs(2));
    let to_stack = counter(&c, 1, "xdp_decap_to_stack");
    let moved = pings_delivered(&c, &pods, &ips, 0, 1, 5);
    assert_eq!(moved[1], 5, "deliver6_packets on node 1 for 5 pings, XDP decap");
    assert_eq!(
        counter(&c, 1, "xdp_decap_to_stack"),
        to_stack,
        "node 1 left IPv6 XDP had stripped to the stack"
    );
}

#[test]
fn a_deleted_pod_falls_back_to_the_stack_and_its_recreation_is_delivered_to_again() {
    let (mut c, mut pods, ips) = two_pods(&[]);
    for (from, to) in [(0, 1), (1, 0)] {
        let (counts, text) = ping6(&pods[from], ips[to], 3, None, false);
        assert_eq!(counts, Some((3, 3)), "pod {from} → pod {to}:\n{text}");
    }
    wait_endpoint(&c, 1, ips[1], "veth1", &pods[1], Duration::from_secs(2));
    let (old_ifindex, _, _) = endpoint(&c, 1, ips[1]).unwrap();

    // Node 1's agent stops (the datapath stays pinned), then its pod is recreated on a new veth:
    // nobody updates the endpoint map, which still names the deleted veth. The kernel dropped
    // that veth's device-map entry, so decap hands the pod's packets to the stack, which
    // reaches the new pod.
    c.stop_agent(1, Signal::SIGTERM);
    let old = pods.remove(1);
    let (pod, veth_name) = recreate_pod(&c, 1, old, "veth1", ipv6_subnet(&c, 1).unwrap().trunc());
    pods.insert(1, pod);
    let stale = endpoint(&c, 1, ips[1]);
    assert!(
        matches!(&stale, Some((i, None, _)) if *i == old_ifindex),
        "the stopped agent's map should still name the deleted veth {old_ifindex}: {stale:?}"
    );
    let decap_before = counter(&c, 1, "decap6_packets");
    let moved = pings_delivered(&c, &pods, &ips, 0, 1, 5);
    assert_eq!(moved[1], 0, "node 1 delivered to a deleted veth");
    assert!(
        counter(&c, 1, "decap6_packets") - decap_before >= 5,
        "node 1 decapsulated the pings"
    );

    // The agent is back: it replaces the stale entry with the new veth, and delivery resumes.
    let log_from = c.agent_log(1).len();
    c.start_agent(1).unwrap();
    assert!(
        c.wait_log_after(1, log_from, "holding lease", Duration::from_secs(20))
            .is_some(),
        "node 1's agent took no lease after its restart:\n{}",
        c.agent_log(1)
    );
    wait_endpoint(&c, 1, ips[1], &veth_name, &pods[1], Duration::from_secs(7));
    let moved = pings_delivered(&c, &pods, &ips, 0, 1, 5);
    assert_eq!(moved[1], 5, "node 1's deliveries to the recreated pod");

    // A restart under a running agent: the deleted veth's entry goes at once, the recreated
    // pod is answered within a second and delivered to once the agent has learned it.
    let old = pods.remove(0);
    let (pod, veth_name) = recreate_pod(&c, 0, old, "veth1", ipv6_subnet(&c, 0).unwrap().trunc());
    pods.insert(0, pod);
    let back = Cluster::wait_for(Duration::from_secs(1), || {
        ping6(&pods[1], ips[0], 1, None, false).0 == Some((1, 1))
    });
    assert!(
        back.is_some(),
        "pod 0 unreachable over IPv6 a second after its restart; log:\n{}",
        c.agent_log(0)
    );
    wait_endpoint(&c, 0, ips[0], &veth_name, &pods[0], Duration::from_secs(2));
    let moved = pings_delivered(&c, &pods, &ips, 1, 0, 5);
    assert_eq!(moved[0], 5, "node 0's deliveries to its recreated pod");
}
