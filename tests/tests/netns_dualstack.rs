//! Tier 3 (root): IPv6 through the real agent. Nodes with an IPv6 underlay address
//! (fd00:198:18::/64 beside 198.18.0.0/24), a network config with `EnableIPv6`, pods with an
//! address from the node's IPv6 lease on `cni0`: IPv6 pod ↔ pod both ways (and IPv4 still),
//! bulk TCP over IPv6, the pod's own IPv6 source kept under an ip6tables MASQUERADE rule, host →
//! remote pod over IPv6, Packet Too Big for an oversize packet, and an IPv6-only network.
//!
//! Run: `cargo build -p overlay-agent && cargo test -p overlay-tests --test netns_dualstack -- --test-threads=1`

use std::{net::Ipv6Addr, time::Duration};

use ipnet::Ipv6Net;
use overlay_tests::{
    cluster::{output, Cluster},
    netns::{require_root, Netns},
    topology::{parse_ping_summary, ping},
};

const DUAL: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
const V6_ONLY: &str =
    r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
const NETWORK6: &str = "fd00:10:244::/56";

/// Node `index`'s IPv6 underlay address.
fn underlay6(index: u8) -> Ipv6Addr {
    format!("fd00:198:18::{}", 10 + index).parse().unwrap()
}

/// `FLANNEL_IPV6_SUBNET` from node `i`'s subnet.env (`fd00:10:244:7::1/64`: the bridge's address).
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

/// A cluster whose nodes also have IPv6 on the underlay, agents started, every node holding its
/// IPv6 lease; returns each node's IPv6 subnet.
fn cluster(n: u8, config: &str) -> (Cluster, Vec<Ipv6Net>) {
    require_root();
    let mut c = Cluster::new(n, config).expect("building the cluster");
    for (i, node) in c.nodes.iter().enumerate() {
        let addr = format!("{}/64", underlay6(i as u8 + 1));
        node.node
            .ns
            .ip(&["-6", "addr", "add", &addr, "dev", "eth0", "nodad"])
            .expect("IPv6 on the underlay");
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

/// `cni0` with the lease's `::1` (and, when `v4` says so, the IPv4 side as the harness builds
/// it), and one pod with `::2` on it; returns the pod's namespace.
fn bridge_and_pod(c: &mut Cluster, i: usize, subnet6: Ipv6Net, v4: bool) -> Netns {
    let gw = nth6(subnet6, 1);
    let ns = if v4 {
        c.add_pods(i, 1).expect("IPv4 bridge and pod");
        c.nodes[i].node.pods.remove(0).ns
    } else {
        let node = &c.nodes[i].node.ns;
        node.ip(&["link", "add", "cni0", "type", "bridge"]).unwrap();
        node.ip(&["link", "set", "cni0", "mtu", "1450", "up"]).unwrap();
        let pod = Netns::new("ovlp6").unwrap();
        overlay_tests::netns::veth(&pod, "eth0", Some(node), "veth6").unwrap();
        node.ip(&["link", "set", "veth6", "master", "cni0"]).unwrap();
        node.ip(&["link", "set", "veth6", "mtu", "1450"]).unwrap();
        pod.ip(&["link", "set", "eth0", "mtu", "1450"]).unwrap();
        pod
    };
    let node = &c.nodes[i].node.ns;
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
    let ip = nth6(subnet6, 2);
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{ip}/{}", subnet6.prefix_len()),
        "dev",
        "eth0",
        "nodad",
    ])
    .unwrap();
    ns.ip(&["-6", "route", "add", "default", "via", &gw.to_string()])
        .unwrap();
    ns
}

/// `ping -6 -c count [-s size] [-M do]`: (transmitted, received) and ping's whole output.
fn ping6(
    from: &Netns,
    to: Ipv6Addr,
    count: u32,
    size: Option<u32>,
    df: bool,
) -> (Option<(u32, u32)>, String) {
    let c = count.to_string();
    let mut args = vec![
        "netns", "exec", &from.name, "ping", "-6", "-c", &c, "-i", "0.2", "-W", "2",
    ];
    let s;
    if let Some(size) = size {
        s = size.to_string();
        args.extend(["-s", &s]);
    }
    if df {
        args.extend(["-M", "do"]);
    }
    let t = to.to_string();
    args.push(&t);
    let out = std::process::Command::new("ip").args(&args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (parse_ping_summary(&text), text)
}

fn wait_peers(c: &Cluster) {
    for i in 0..c.nodes.len() {
        let want = c.nodes.len() - 1;
        let ok = Cluster::wait_for(Duration::from_secs(10), || {
            c.agent_log(i).matches("family=\"IPv6\"").count() > 0
                && c.agent_log(i)
                    .lines()
                    .filter(|l| l.contains("peer added") && l.contains("IPv6"))
                    .count()
                    >= want
        });
        assert!(
            ok.is_some(),
            "node {i} did not add its IPv6 peers; leases:\n{}\nlogs:\n{}",
            c.leases().unwrap_or_default(),
            (0..c.nodes.len())
                .map(|n| c.agent_log(n))
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        c.wait_encap_attached(i);
    }
}

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
    let mut srv = pods[1].command("iperf3");
    let report = c.dir().join("iperf6.json");
    srv.args(["-s", "-1", "-J", "-B", &ip(1).to_string()])
        .stdout(std::fs::File::create(&report).unwrap());
    let mut srv = srv.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let client = pods[0]
        .exec("iperf3", &["-6", "-c", &ip(1).to_string(), "-t", "2", "-J"])
        .expect("iperf3 over IPv6");
    let _ = srv.wait();
    let server: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let seen = server["start"]["connected"][0]["remote_host"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let cj: serde_json::Value = serde_json::from_slice(&client.stdout).unwrap();
    let bps = cj["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
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
    let pods: Vec<Netns> = (0..2)
        .map(|i| bridge_and_pod(&mut c, i, subnets[i], false))
        .collect();
    wait_peers(&c);
    for (from, to) in [(0, 1), (1, 0)] {
        let (counts, text) = ping6(&pods[from], nth6(subnets[to], 2), 5, None, false);
        assert_eq!(
            counts,
            Some((5, 5)),
            "pod {from} → pod {to}, IPv6-only:\n{text}\n{}",
            c.agent_log(to)
        );
    }
}
