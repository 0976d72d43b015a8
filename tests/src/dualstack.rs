//! IPv6 on the tier-3 clusters: nodes with an IPv6 underlay address (fd00:198:18::/64 beside
//! 198.18.0.0/24), pods with an address from their node's IPv6 lease, and the pings and bulk
//! transfers the dual-stack tests run between them.

use std::{net::Ipv6Addr, path::Path, time::Duration};

use ipnet::Ipv6Net;

use crate::{
    cluster::{AgentNode, Cluster},
    netns::{require_root, unique_name, veth, Netns},
    topology::parse_ping_summary,
};

/// A dual-stack network config (flannel's defaults otherwise).
pub const DUAL: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
/// An IPv6-only network config.
pub const V6_ONLY: &str =
    r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
/// The IPv6 Network of [`DUAL`] and [`V6_ONLY`].
pub const NETWORK6: &str = "fd00:10:244::/56";

/// Node `index`'s IPv6 underlay address.
pub fn underlay6(index: u8) -> Ipv6Addr {
    format!("fd00:198:18::{}", 10 + index).parse().unwrap()
}

/// `FLANNEL_IPV6_SUBNET` from node `i`'s subnet.env (`fd00:10:244:7::1/64`: the bridge's address).
pub fn ipv6_subnet(c: &Cluster, i: usize) -> Option<Ipv6Net> {
    let text = std::fs::read_to_string(&c.nodes[i].subnet_file).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET="))?
        .trim()
        .parse()
        .ok()
}

/// `n`-th address of a subnet.
pub fn nth6(net: Ipv6Net, n: u128) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(net.network()) + n)
}

/// A cluster whose nodes also have IPv6 on the underlay, agents started, every node holding its
/// IPv6 lease; returns each node's IPv6 subnet.
pub fn cluster(n: u8, config: &str) -> (Cluster, Vec<Ipv6Net>) {
    cluster_with(n, config, |_| {})
}

/// [`cluster`] with `prepare` run on each node (its firewall, its agent's flags) before its agent
/// starts.
pub fn cluster_with(n: u8, config: &str, prepare: impl Fn(&mut AgentNode)) -> (Cluster, Vec<Ipv6Net>) {
    require_root();
    let mut c = Cluster::new(n, config).expect("building the cluster");
    for (i, node) in c.nodes.iter_mut().enumerate() {
        let addr = format!("{}/64", underlay6(i as u8 + 1));
        node.node
            .ns
            .ip(&["-6", "addr", "add", &addr, "dev", "eth0", "nodad"])
            .expect("IPv6 on the underlay");
        prepare(node);
    }
    for i in 0..c.nodes.len() {
        c.start_agent(i).expect("starting the agent");
    }
    let subnets = wait_ipv6_subnets(&c);
    (c, subnets)
}

/// Each node's IPv6 subnet, once its agent has written it to subnet.env.
pub fn wait_ipv6_subnets(c: &Cluster) -> Vec<Ipv6Net> {
    let mut subnets = Vec::new();
    for i in 0..c.nodes.len() {
        let got = Cluster::wait_for(Duration::from_secs(20), || ipv6_subnet(c, i).is_some());
        assert!(
            got.is_some(),
            "node {i} wrote no IPv6 subnet; log:\n{}",
            c.agent_log(i)
        );
        subnets.push(ipv6_subnet(c, i).unwrap().trunc());
    }
    subnets
}

/// An IPv6-only pod on each node (see [`bridge_and_pod`]), once the agents know each other:
/// 5 of 5 pings answered each way.
pub fn ipv6_only_pods_talk(c: &mut Cluster, subnets: &[Ipv6Net], what: &str) -> Vec<Netns> {
    let pods: Vec<Netns> = (0..2).map(|i| bridge_and_pod(c, i, subnets[i], false)).collect();
    wait_peers(c);
    for (from, to) in [(0, 1), (1, 0)] {
        let (counts, text) = ping6(&pods[from], nth6(subnets[to], 2), 5, None, false);
        assert_eq!(
            counts,
            Some((5, 5)),
            "pod {from} → pod {to}, {what}:\n{text}\n{}",
            c.agent_log(to)
        );
    }
    pods
}

/// `cni0` with the lease's `::1` (and, when `v4` says so, the IPv4 side as the harness builds
/// it), and one pod with `::2` on it; returns the pod's namespace.
pub fn bridge_and_pod(c: &mut Cluster, i: usize, subnet6: Ipv6Net, v4: bool) -> Netns {
    let gw = nth6(subnet6, 1);
    let ns = if v4 {
        c.add_pods(i, 1).expect("IPv4 bridge and pod");
        c.nodes[i].node.pods.remove(0).ns
    } else {
        let node = &c.nodes[i].node.ns;
        node.ip(&["link", "add", "cni0", "type", "bridge"]).unwrap();
        node.ip(&["link", "set", "cni0", "mtu", "1450", "up"]).unwrap();
        let pod = Netns::new("ovlp6").unwrap();
        veth(&pod, "eth0", Some(node), "veth6").unwrap();
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
    add_pod_ipv6(&ns, nth6(subnet6, 2), subnet6);
    ns
}

/// `ip/len` on the pod's eth0 and its default route via the subnet's `::1` (the bridge).
pub fn add_pod_ipv6(pod: &Netns, ip: Ipv6Addr, subnet6: Ipv6Net) {
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

/// `ping -6 -c count [-s size] [-M do]`: (transmitted, received) and ping's whole output.
pub fn ping6(
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

/// What an [`iperf6`] transfer's server saw.
pub struct Transfer {
    /// Bits per second received.
    pub bps: f64,
    /// Bytes received.
    pub bytes: u64,
    /// The client address the server saw.
    pub seen: String,
}

/// A 2 s iperf3 transfer over IPv6 from `client` to `server` (listening on `addr`).
pub fn iperf6(server: &Netns, addr: Ipv6Addr, client: &Netns, dir: &Path) -> Transfer {
    let report = dir.join(format!("iperf6-{}.json", unique_name("r")));
    let mut srv = server.command("iperf3");
    srv.args(["-s", "-1", "-J", "-B", &addr.to_string()])
        .stdout(std::fs::File::create(&report).unwrap());
    let mut srv = srv.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    client
        .exec("iperf3", &["-6", "-c", &addr.to_string(), "-t", "2", "-J"])
        .expect("iperf3 over IPv6");
    let _ = srv.wait();
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let received = &s["end"]["sum_received"];
    Transfer {
        bps: received["bits_per_second"].as_f64().unwrap_or(0.0),
        bytes: received["bytes"].as_u64().unwrap_or(0),
        seen: s["start"]["connected"][0]["remote_host"]
            .as_str()
            .unwrap_or("")
            .to_string(),
    }
}

/// Waits until every agent has added its IPv6 peers, attached encap and set up the IPv6 host
/// route.
pub fn wait_peers(c: &Cluster) {
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
        // Host → pod and Packet Too Big need the IPv6 route on overlay0.
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
