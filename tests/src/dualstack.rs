//! IPv6 on the tier-3 clusters: nodes with an IPv6 underlay address (fd00:198:18::/64 beside
//! 198.18.0.0/24), pods with an address from their node's IPv6 lease, and the pings and bulk
//! transfers the dual-stack tests run between them.

use std::{net::Ipv6Addr, path::Path, time::Duration};

use anyhow::{bail, Context as _, Result};
use ipnet::Ipv6Net;

use crate::{
    cluster::{AgentNode, Cluster},
    netns::{require_root, unique_name, veth, Netns},
    topology::{parse_ping_summary, Node},
};

/// A dual-stack network config (flannel's defaults otherwise).
pub const DUAL: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
/// An IPv6-only network config.
pub const V6_ONLY: &str =
    r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
/// The IPv6 Network of [`DUAL`] and [`V6_ONLY`].
pub const NETWORK6: &str = "fd00:10:244::/56";

/// Node `index`'s IPv6 underlay address ([`Node::underlay_ip6`]).
pub fn underlay6(index: u8) -> Ipv6Addr {
    Node::underlay_ip6(index)
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
    try_cluster_with(n, config, prepare).unwrap_or_else(|e| panic!("{e:#}"))
}

/// [`cluster_with`] for callers that handle errors (the benchmark): the cluster is torn down
/// when this fails.
pub fn try_cluster_with(
    n: u8,
    config: &str,
    prepare: impl Fn(&mut AgentNode),
) -> Result<(Cluster, Vec<Ipv6Net>)> {
    let mut c = Cluster::new(n, config).context("building the cluster")?;
    for node in c.nodes.iter_mut() {
        node.node.add_underlay6().context("IPv6 on the underlay")?;
        prepare(node);
    }
    for i in 0..c.nodes.len() {
        c.start_agent(i).context("starting the agent")?;
    }
    let subnets = try_wait_ipv6_subnets(&c)?;
    Ok((c, subnets))
}

/// Each node's IPv6 subnet, once its agent has written it to subnet.env.
pub fn wait_ipv6_subnets(c: &Cluster) -> Vec<Ipv6Net> {
    try_wait_ipv6_subnets(c).unwrap_or_else(|e| panic!("{e:#}"))
}

/// [`wait_ipv6_subnets`], failing with the agent's log after 20 s.
pub fn try_wait_ipv6_subnets(c: &Cluster) -> Result<Vec<Ipv6Net>> {
    let mut subnets = Vec::new();
    for i in 0..c.nodes.len() {
        Cluster::wait_for(Duration::from_secs(20), || ipv6_subnet(c, i).is_some())
            .with_context(|| format!("node {i} wrote no IPv6 subnet; log:\n{}", c.agent_log(i)))?;
        subnets.push(
            ipv6_subnet(c, i)
                .context("subnet.env lost its IPv6 subnet")?
                .trunc(),
        );
    }
    Ok(subnets)
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
    try_bridge_and_pod(c, i, subnet6, v4).unwrap_or_else(|e| panic!("{e:#}"))
}

/// [`bridge_and_pod`] for callers that handle errors (the benchmark).
pub fn try_bridge_and_pod(c: &mut Cluster, i: usize, subnet6: Ipv6Net, v4: bool) -> Result<Netns> {
    let ns = if v4 {
        c.add_pods(i, 1).context("IPv4 bridge and pod")?;
        c.nodes[i].node.pods.remove(0).ns
    } else {
        let node = &c.nodes[i].node.ns;
        node.ip(&["link", "add", "cni0", "type", "bridge"])?;
        node.ip(&["link", "set", "cni0", "mtu", "1450", "up"])?;
        let pod = Netns::new("ovlp6")?;
        veth(&pod, "eth0", Some(node), "veth6")?;
        node.ip(&["link", "set", "veth6", "master", "cni0"])?;
        node.ip(&["link", "set", "veth6", "mtu", "1450"])?;
        pod.ip(&["link", "set", "eth0", "mtu", "1450"])?;
        pod
    };
    add_bridge_ipv6(&c.nodes[i].node.ns, subnet6)?;
    add_pod_ipv6(&ns, nth6(subnet6, 2), subnet6)?;
    Ok(ns)
}

/// The subnet's `::1` on the node's `cni0`, as the CNI bridge plugin gives the bridge its
/// gateway address.
pub fn add_bridge_ipv6(node: &Netns, subnet6: Ipv6Net) -> Result<()> {
    node.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{}/{}", nth6(subnet6, 1), subnet6.prefix_len()),
        "dev",
        "cni0",
        "nodad",
    ])
    .map(|_| ())
}

/// `ip/len` on the pod's eth0 and its default route via the subnet's `::1` (the bridge).
pub fn add_pod_ipv6(pod: &Netns, ip: Ipv6Addr, subnet6: Ipv6Net) -> Result<()> {
    pod.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{ip}/{}", subnet6.prefix_len()),
        "dev",
        "eth0",
        "nodad",
    ])?;
    pod.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        &nth6(subnet6, 1).to_string(),
    ])
    .map(|_| ())
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
    try_wait_peers(c).unwrap_or_else(|e| panic!("{e:#}"))
}

/// [`wait_peers`] for callers that handle errors (the benchmark).
pub fn try_wait_peers(c: &Cluster) -> Result<()> {
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
        if ok.is_none() {
            bail!(
                "node {i} did not add its IPv6 peers; leases:\n{}\nlogs:\n{}",
                c.leases().unwrap_or_default(),
                (0..c.nodes.len())
                    .map(|n| c.agent_log(n))
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            );
        }
        c.wait_encap_attached(i);
        // Host → pod and Packet Too Big need the IPv6 route on overlay0.
        let routed = c.wait_log_after(
            i,
            0,
            "IPv6 host route to remote pods ready",
            Duration::from_secs(5),
        );
        if routed.is_none() {
            bail!("node {i}: no IPv6 host route; log:\n{}", c.agent_log(i));
        }
    }
    Ok(())
}
