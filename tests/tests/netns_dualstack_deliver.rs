//! Tier 3 (root): direct delivery of decapsulated IPv6 pod traffic through the real agent, on
//! dual-stack 2-node clusters (IPv6 pods over the IPv6 underlay, flannel-v6.1's combination):
//! the receiving node learns its pod's IPv6 address from the bridge, lists it in `status`, and
//! decap hands IPv6 packets for it straight into the pod (`deliver6_packets`), with TC decap and
//! with XDP decap (the TC program after GRO delivering what XDP stripped); `--deliver stack`
//! delivers nothing and traffic still flows; a pod whose veth was deleted falls back to the
//! stack, and its recreation on a new veth is delivered to again.
//!
//! The small helpers are copies of `netns_dualstack.rs`'s (that file grows in parallel).
//!
//! Run: `cargo build -p overlay-agent && cargo test -p overlay-tests --test netns_dualstack_deliver -- --test-threads=1 --nocapture`

use std::{net::Ipv6Addr, time::Duration};

use ipnet::Ipv6Net;
use nix::sys::signal::Signal;
use overlay_tests::{
    cluster::Cluster,
    netns::{require_root, veth, Netns},
    topology::{nth_host, parse_ping_summary, ping},
};

const DUAL: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
/// The pods' MTU (what subnet.env says for a 1500 underlay); IPv6 path MTU discovery settles
/// below it (the IPv6 tunnel carries 1430).
const POD_MTU: &str = "1450";

/// Node `index`'s IPv6 underlay address.
fn underlay6(index: u8) -> Ipv6Addr {
    format!("fd00:198:18::{}", 10 + index).parse().unwrap()
}

/// `FLANNEL_IPV6_SUBNET` from node `i`'s subnet.env.
fn ipv6_subnet(c: &Cluster, i: usize) -> Option<Ipv6Net> {
    let text = std::fs::read_to_string(&c.nodes[i].subnet_file).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET="))?
        .trim()
        .parse()
        .ok()
}

/// `n`-th address of a subnet.
fn nth6(net: Ipv6Net, n: u128) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(net.network()) + n)
}

/// A dual-stack cluster of `n` nodes with IPv6 on the underlay, agents started with `args`,
/// every node holding its IPv6 lease; returns each node's IPv6 subnet.
fn cluster(n: u8, args: &[&str]) -> (Cluster, Vec<Ipv6Net>) {
    require_root();
    let mut c = Cluster::new(n, DUAL).expect("building the cluster");
    for (i, node) in c.nodes.iter_mut().enumerate() {
        let addr = format!("{}/64", underlay6(i as u8 + 1));
        node.node
            .ns
            .ip(&["-6", "addr", "add", &addr, "dev", "eth0", "nodad"])
            .expect("IPv6 on the underlay");
        node.extra_args = args.iter().map(|a| a.to_string()).collect();
    }
    for i in 0..c.nodes.len() {
        c.start_agent(i).expect("starting the agent");
    }
    let mut subnets = Vec::new();
    for i in 0..c.nodes.len() {
        let got = Cluster::wait_for(Duration::from_secs(20), || ipv6_subnet(&c, i).is_some());
        assert!(
            got.is_some(),
            "node {i} wrote no IPv6 subnet; log:\n{}",
            c.agent_log(i)
        );
        subnets.push(ipv6_subnet(&c, i).unwrap().trunc());
    }
    (c, subnets)
}

/// One pod on node `i`, dual-stack: the harness's IPv4 bridge and pod (`cni0`, host-side veth
/// `veth1`), plus the IPv6 lease's `::1` on `cni0` and `::2` in the pod.
fn dual_stack_pod(c: &mut Cluster, i: usize, subnet6: Ipv6Net) -> Netns {
    c.add_pods(i, 1).expect("IPv4 bridge and pod");
    let pod = c.nodes[i].node.pods.remove(0).ns;
    let node = &c.nodes[i].node.ns;
    let gw = nth6(subnet6, 1);
    node.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{gw}/{}", subnet6.prefix_len()),
        "dev",
        "cni0",
        "nodad",
    ])
    .unwrap();
    add_ipv6(&pod, nth6(subnet6, 2), subnet6);
    pod
}

fn add_ipv6(pod: &Netns, ip: Ipv6Addr, subnet6: Ipv6Net) {
    pod.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{ip}/{}", subnet6.prefix_len()),
        "dev",
        "eth0",
        "nodad",
    ])
    .unwrap();
    pod.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        &nth6(subnet6, 1).to_string(),
    ])
    .unwrap();
}

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
    add_ipv6(&pod, ip6, subnet6);
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

/// `ping -6 -c count` (0.2 s apart, 2 s per reply): (transmitted, received) and ping's output.
fn ping6(from: &Netns, to: Ipv6Addr, count: u32) -> (Option<(u32, u32)>, String) {
    let c = count.to_string();
    let t = to.to_string();
    let args = [
        "netns", "exec", &from.name, "ping", "-6", "-c", &c, "-i", "0.2", "-W", "2", &t,
    ];
    let out = std::process::Command::new("ip").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (parse_ping_summary(&text), text)
}

/// A 3 s iperf3 transfer over IPv6 from `client` to `server` (listening on `addr`): (bits/s
/// and bytes the server received, the client address it saw).
fn iperf6(server: &Netns, addr: Ipv6Addr, client: &Netns, dir: &std::path::Path) -> (f64, u64, String) {
    let report = dir.join(format!("iperf6-{}.json", overlay_tests::netns::unique_name("r")));
    let mut srv = server.command("iperf3");
    srv.args(["-s", "-1", "-J", "-B", &addr.to_string()])
        .stdout(std::fs::File::create(&report).unwrap());
    let mut srv = srv.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    client
        .exec("iperf3", &["-6", "-c", &addr.to_string(), "-t", "3", "-J"])
        .expect("iperf3 over IPv6");
    let _ = srv.wait();
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let seen = s["start"]["connected"][0]["remote_host"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let received = &s["end"]["sum_received"];
    (
        received["bits_per_second"].as_f64().unwrap_or(0.0),
        received["bytes"].as_u64().unwrap_or(0),
        seen,
    )
}

/// Every node has its IPv6 peers, encap attached and the IPv6 host route.
fn wait_peers(c: &Cluster) {
    for i in 0..c.nodes.len() {
        let want = c.nodes.len() - 1;
        let ok = Cluster::wait_for(Duration::from_secs(10), || {
            c.agent_log(i)
                .lines()
                .filter(|l| l.contains("peer added") && l.contains("IPv6"))
                .count()
                >= want
        });
        assert!(
            ok.is_some(),
            "node {i} did not add its IPv6 peers; log:\n{}",
            c.agent_log(i)
        );
        c.wait_encap_attached(i);
        let routed = c.wait_log_after(
            i,
            0,
            "IPv6 host route to remote pods ready",
            Duration::from_secs(5),
        );
        assert!(
            routed.is_some(),
            "node {i}: no IPv6 host route; log:\n{}",
            c.agent_log(i)
        );
    }
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
    let (counts, text) = ping6(&pods[from], ips[to], count);
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

#[test]
fn ipv6_pod_traffic_is_delivered_straight_into_the_pod() {
    let (mut c, subnets) = cluster(2, &[]);
    let pods: Vec<Netns> = (0..2).map(|i| dual_stack_pod(&mut c, i, subnets[i])).collect();
    let ips: Vec<Ipv6Addr> = subnets.iter().map(|s| nth6(*s, 2)).collect();
    wait_peers(&c);
    // The first packets go through the stack, which resolves the pods; the agents learn them
    // from the bridges' IPv6 neighbours.
    for (from, to) in [(0, 1), (1, 0)] {
        let (counts, text) = ping6(&pods[from], ips[to], 3);
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
    let (bps, received, seen) = iperf6(&pods[1], ips[1], &pods[0], c.dir());
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
    let (mut c, subnets) = cluster(2, &["--deliver", "stack"]);
    let pods: Vec<Netns> = (0..2).map(|i| dual_stack_pod(&mut c, i, subnets[i])).collect();
    let ips: Vec<Ipv6Addr> = subnets.iter().map(|s| nth6(*s, 2)).collect();
    wait_peers(&c);
    for (from, to) in [(0, 1), (1, 0)] {
        let (counts, text) = ping6(&pods[from], ips[to], 5);
        assert_eq!(
            counts,
            Some((5, 5)),
            "pod {from} → pod {to}, --deliver stack:\n{text}"
        );
    }
    let (bps, _, seen) = iperf6(&pods[1], ips[1], &pods[0], c.dir());
    println!("IPv6 pod → pod TCP, --deliver stack: {:.2} Gbit/s", bps / 1e9);
    assert_eq!(seen, ips[0].to_string());
    assert!(bps > 100e6, "bulk TCP over IPv6: {bps} bit/s");
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
    let (mut c, subnets) = cluster(2, &["--decap", "xdp"]);
    let pods: Vec<Netns> = (0..2).map(|i| dual_stack_pod(&mut c, i, subnets[i])).collect();
    let ips: Vec<Ipv6Addr> = subnets.iter().map(|s| nth6(*s, 2)).collect();
    wait_peers(&c);
    assert_eq!(c.status_json(1).unwrap()["decap"], "xdp");
    for (from, to) in [(0, 1), (1, 0)] {
        let (counts, text) = ping6(&pods[from], ips[to], 3);
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
    let (mut c, subnets) = cluster(2, &[]);
    let mut pods: Vec<Netns> = (0..2).map(|i| dual_stack_pod(&mut c, i, subnets[i])).collect();
    let ips: Vec<Ipv6Addr> = subnets.iter().map(|s| nth6(*s, 2)).collect();
    wait_peers(&c);
    for (from, to) in [(0, 1), (1, 0)] {
        let (counts, text) = ping6(&pods[from], ips[to], 3);
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
    let (pod, veth_name) = recreate_pod(&c, 1, old, "veth1", subnets[1]);
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
    let (pod, veth_name) = recreate_pod(&c, 0, old, "veth1", subnets[0]);
    pods.insert(0, pod);
    let back = Cluster::wait_for(Duration::from_secs(1), || {
        ping6(&pods[1], ips[0], 1).0 == Some((1, 1))
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
