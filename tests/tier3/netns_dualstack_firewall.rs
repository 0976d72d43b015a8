//! Tier 3 (root): `--iptables-forward-rules` and `--ip-masq` for IPv6, as flanneld does them
//! with ip6tables. Nodes with an IPv6 underlay (fd00:198:18::/64 beside 198.18.0.0/24), a
//! dual-stack or IPv6-only network config, one pod per node with an address from the node's
//! IPv6 lease:
//! - an ip6tables FORWARD policy of DROP: flanneld's `FLANNEL-FWD` rules for the IPv6 Network
//!   carry pod ↔ pod IPv6 (decapsulated IPv6 is routed eth0 → cni0 through FORWARD), come back
//!   after a flush and go with `cleanup`; without them (`--iptables-forward-rules=false`) the
//!   same pings are dropped;
//! - `--ip-masq`: the `ip6 overlay-agent` table beside `ip overlay-agent`; pod → pod keeps its
//!   IPv6 source, pod → a host outside the cluster is masqueraded to the node's address;
//!   `cleanup` removes both tables;
//! - an IPv6-only network gets the IPv6 rules and tables only.
//!
//! Run: `cargo build -p overlay-agent && cargo test -p overlay-tests --test netns_dualstack_firewall -- --test-threads=1`

use std::{
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use ipnet::Ipv6Net;
use nix::sys::signal::Signal;
use overlay_tests::{
    cluster::{agent_bin, output, AgentNode, Cluster},
    dualstack::{bridge_and_pod, cluster_with, nth6, ping6, underlay6, wait_peers, DUAL, NETWORK6, V6_ONLY},
    netns::{seen_source, Netns},
    topology::ping,
};

const NETWORK4: &str = "10.244.0.0/16";
const JUMP: &str = "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD";

/// flanneld's `FLANNEL-FWD` chain for `network`, as `iptables -S FLANNEL-FWD` prints it.
fn flanneld_chain(network: &str) -> Vec<String> {
    vec![
        "-N FLANNEL-FWD".to_string(),
        format!("-A FLANNEL-FWD -s {network} -m comment --comment \"flanneld forward\" -j ACCEPT"),
        format!("-A FLANNEL-FWD -d {network} -m comment --comment \"flanneld forward\" -j ACCEPT"),
    ]
}

/// `cmd` (`iptables` or `ip6tables`) in `ns`, failing the test on error.
fn tables(ns: &Netns, cmd: &str, args: &[&str]) {
    ns.exec(cmd, args)
        .unwrap_or_else(|e| panic!("{cmd} {args:?} in {}: {e:#}", ns.name));
}

/// `cmd -S FORWARD` and `cmd -S FLANNEL-FWD` (empty when the chain does not exist), as lines.
fn forward_rules(ns: &Netns, cmd: &str) -> (Vec<String>, Vec<String>) {
    let lines = |t: String| t.lines().map(str::to_string).collect::<Vec<_>>();
    let forward =
        lines(output(ns, cmd, &["-S", "FORWARD"]).unwrap_or_else(|e| panic!("{cmd} -S FORWARD: {e:#}")));
    let chain = output(ns, cmd, &["-S", "FLANNEL-FWD"])
        .map(lines)
        .unwrap_or_default();
    (forward, chain)
}

/// flanneld's rules for `network` in `cmd`'s tables, exactly once.
fn rules_in_place(ns: &Netns, cmd: &str, network: &str) -> bool {
    let (forward, chain) = forward_rules(ns, cmd);
    forward.iter().filter(|l| *l == JUMP).count() == 1 && chain == flanneld_chain(network)
}

/// Nothing of ours in `cmd`'s tables.
fn no_rules(ns: &Netns, cmd: &str) -> bool {
    let (forward, chain) = forward_rules(ns, cmd);
    !forward.iter().any(|l| l.contains("FLANNEL-FWD")) && chain.is_empty()
}

/// A node whose ip6tables FORWARD policy is DROP, with `args` for its agent.
fn drop6(args: &'static [&'static str]) -> impl Fn(&mut AgentNode) {
    move |n| {
        tables(&n.node.ns, "ip6tables", &["-P", "FORWARD", "DROP"]);
        n.extra_args.extend(args.iter().map(|s| s.to_string()));
    }
}

/// Each node's pod on its bridge, every agent knowing its IPv6 peers with encap attached and
/// the IPv6 host route set up.
fn pods(c: &mut Cluster, subnets: &[Ipv6Net], v4: bool) -> Vec<Netns> {
    let pods = (0..subnets.len())
        .map(|i| bridge_and_pod(c, i, subnets[i], v4))
        .collect();
    wait_peers(c);
    pods
}

fn assert_pods_ping6(c: &Cluster, pods: &[Netns], subnets: &[Ipv6Net], what: &str) {
    for (from, to) in [(0, 1), (1, 0)] {
        let (counts, text) = ping6(&pods[from], nth6(subnets[to], 2), 5, None, false);
        assert_eq!(
            counts,
            Some((5, 5)),
            "{what}: pod {from} → pod {to} over IPv6 (sent, received):\n{text}\n\
             node {to} ip6tables: {:?}\nlog:\n{}",
            forward_rules(&c.nodes[to].node.ns, "ip6tables"),
            c.agent_log(to)
        );
    }
}

/// The rule lines of nftables table `family overlay-agent` in `ns` (`None`: no such table).
fn masq_table(ns: &Netns, family: &str) -> Option<Vec<String>> {
    let text = output(ns, "nft", &["list", "table", family, "overlay-agent"]).ok()?;
    Some(
        text.lines()
            .map(str::trim)
            .filter(|l| l.contains(" return ") || l.contains(" masquerade "))
            .map(str::to_string)
            .collect(),
    )
}

/// flanneld's masquerade rules (`MasqIPRules`, `MasqIP6Rules`) for the family (`ip`, `ip6`) as
/// `nft list` prints our table: the Network, our lease, the family's multicast range.
fn masq_rules_of(family: &str, network: &str, subnet: &str, multicast: &str) -> Vec<String> {
    let (f, n) = (family, network);
    vec![
        "meta mark & 0x00004000 == 0x00004000 return comment \"kube-proxy NATs these\"".to_string(),
        format!("{f} saddr {n} {f} daddr {n} return comment \"pod to pod: keep the source\""),
        format!(
            "{f} saddr != {n} {f} daddr {subnet} return comment \"outside to our pods: keep the source\""
        ),
        format!("{f} saddr {n} {f} daddr != {multicast} masquerade fully-random comment \"pod to outside\""),
        format!("{f} saddr != {n} {f} daddr {n} masquerade fully-random comment \"host to remote pods\""),
    ]
}

fn masq6_rules(subnet: Ipv6Net) -> Vec<String> {
    masq_rules_of("ip6", NETWORK6, &subnet.to_string(), "ff00::/8")
}

/// `overlay-agent cleanup` for node `i` (its agent stopped); its stdout.
fn cleanup(c: &Cluster, i: usize) -> String {
    c.run_cleanup(i, &agent_bin())
        .unwrap_or_else(|e| panic!("node {i}: {e:#}"))
}

#[test]
fn ipv6_forward_drop_needs_flanneld_rules_which_come_back_and_go_with_cleanup() {
    // `--deliver stack`: decapsulated traffic is routed eth0 → cni0 through FORWARD (IPv6 always
    // is: it has no direct delivery yet).
    let (mut c, subnets) = cluster_with(2, DUAL, drop6(&["--deliver", "stack", "--iptables-resync=1"]));
    let pods = pods(&mut c, &subnets, true);
    for (i, n) in c.nodes.iter().enumerate() {
        let ns = &n.node.ns;
        let (forward6, _) = forward_rules(ns, "ip6tables");
        assert!(
            forward6.contains(&"-P FORWARD DROP".to_string()),
            "node {i}: {forward6:?}"
        );
        assert!(
            rules_in_place(ns, "ip6tables", NETWORK6),
            "node {i}: ip6tables rules {:?}\nlog:\n{}",
            forward_rules(ns, "ip6tables"),
            c.agent_log(i)
        );
        // Dual-stack: the IPv4 rules beside them, as flanneld writes both.
        assert!(
            rules_in_place(ns, "iptables", NETWORK4),
            "node {i}: iptables rules {:?}",
            forward_rules(ns, "iptables")
        );
        let log = c.agent_log(i);
        assert!(
            log.lines()
                .any(|l| l.contains("FORWARD accept rules installed") && l.contains("family=\"IPv6\"")),
            "node {i}: no IPv6 install line:\n{log}"
        );
    }
    assert_pods_ping6(&c, &pods, &subnets, "default rules");

    // Someone flushes the IPv6 chain: the agent rewrites it within the resync period (1 s).
    let ns1 = &c.nodes[1].node.ns;
    let mark = c.log_mark(1);
    tables(ns1, "ip6tables", &["-F", "FLANNEL-FWD"]);
    assert!(!rules_in_place(ns1, "ip6tables", NETWORK6));
    let back = Cluster::wait_for(Duration::from_secs(5), || {
        rules_in_place(ns1, "ip6tables", NETWORK6)
    });
    assert!(
        back.is_some(),
        "ip6tables rules not restored: {:?}",
        forward_rules(ns1, "ip6tables")
    );
    println!(
        "ip6tables FLANNEL-FWD rewritten {:?} after the flush",
        back.unwrap()
    );
    let line = c.wait_log_after(1, mark, "rewritten", Duration::from_secs(2));
    assert!(
        line.as_deref().is_some_and(|l| l.contains("family=\"IPv6\"")),
        "no IPv6 'rewritten' log line ({line:?}):\n{}",
        c.agent_log(1)
    );
    assert_pods_ping6(&c, &pods, &subnets, "after the rewrite");

    // The agent stops (its pinned datapath keeps running); the rules stay, and they are what
    // carries IPv6: flushed, with no agent to put them back, the same pings are dropped.
    c.stop_agent(1, Signal::SIGTERM);
    let ns1 = &c.nodes[1].node.ns;
    assert!(
        rules_in_place(ns1, "ip6tables", NETWORK6),
        "the rules stay when the agent stops"
    );
    tables(ns1, "ip6tables", &["-F", "FLANNEL-FWD"]);
    let (counts, text) = ping6(&pods[0], nth6(subnets[1], 2), 3, None, false);
    assert_eq!(
        counts,
        Some((3, 0)),
        "without the accept rules ip6tables FORWARD DROP must drop IPv6 pod traffic:\n{text}"
    );

    // cleanup removes the IPv6 and the IPv4 rules, and leaves the policy alone.
    let text = cleanup(&c, 1);
    assert!(
        text.contains("removed ip6tables (nf_tables) chain FLANNEL-FWD and its FORWARD jump")
            && text.contains("removed iptables (nf_tables) chain FLANNEL-FWD and its FORWARD jump"),
        "{text}"
    );
    for cmd in ["ip6tables", "iptables"] {
        assert!(
            no_rules(ns1, cmd),
            "cleanup left {cmd} rules: {:?}",
            forward_rules(ns1, cmd)
        );
    }
    assert!(
        forward_rules(ns1, "ip6tables")
            .0
            .contains(&"-P FORWARD DROP".to_string()),
        "cleanup must not touch the policy"
    );
    assert_eq!(cleanup(&c, 1).trim(), "nothing to clean up");
}

#[test]
fn without_forward_rules_ipv6_forward_drop_drops_pod_traffic() {
    // The negative control: the same cluster with `--iptables-forward-rules=false`.
    let (mut c, subnets) = cluster_with(
        2,
        DUAL,
        drop6(&["--deliver", "stack", "--iptables-forward-rules=false"]),
    );
    let pods = pods(&mut c, &subnets, true);
    for (i, n) in c.nodes.iter().enumerate() {
        for cmd in ["ip6tables", "iptables"] {
            assert!(
                no_rules(&n.node.ns, cmd),
                "node {i}: {cmd} rules with --iptables-forward-rules=false: {:?}",
                forward_rules(&n.node.ns, cmd)
            );
        }
    }
    for (from, to) in [(0, 1), (1, 0)] {
        let (counts, text) = ping6(&pods[from], nth6(subnets[to], 2), 5, None, false);
        assert_eq!(
            counts,
            Some((5, 0)),
            "pod {from} → pod {to}: ip6tables FORWARD DROP without accept rules must drop:\n{text}"
        );
    }
    // The datapath is fine: IPv4 (FORWARD policy ACCEPT) gets through, and so does IPv6 once
    // the DROP policy is gone.
    let v4 = c.nodes[1].subnet_env().unwrap().0;
    let v4_pod = overlay_tests::topology::nth_host(v4.trunc(), 2);
    assert!(ping(&pods[0], v4_pod, 3, None), "IPv4 pod → pod beside it");
    for n in &c.nodes {
        tables(&n.node.ns, "ip6tables", &["-P", "FORWARD", "ACCEPT"]);
    }
    assert_pods_ping6(&c, &pods, &subnets, "policy ACCEPT");
}

#[test]
fn ip_masq_over_ipv6_keeps_pod_sources_and_snats_to_outside_then_cleanup() {
    let (mut c, subnets) = cluster_with(2, DUAL, |n| n.extra_args.push("--ip-masq".into()));
    let pods = pods(&mut c, &subnets, true);
    for (i, n) in c.nodes.iter().enumerate() {
        let ns = &n.node.ns;
        assert_eq!(
            masq_table(ns, "ip6"),
            Some(masq6_rules(subnets[i])),
            "node {i}: table ip6 overlay-agent; log:\n{}",
            c.agent_log(i)
        );
        let v4 = n.subnet_env().unwrap().0.trunc().to_string();
        assert_eq!(
            masq_table(ns, "ip"),
            Some(masq_rules_of("ip", "10.244.0.0/16", &v4, "224.0.0.0/4")),
            "node {i}: table ip overlay-agent"
        );
        assert!(
            c.agent_log(i)
                .lines()
                .any(|l| l.contains("ip-masq rules installed") && l.contains("ip6 fd00:10:244::/56")),
            "node {i}: no install line naming IPv6:\n{}",
            c.agent_log(i)
        );
    }

    // Pod → pod over IPv6: the far pod sees the pod's own address (decapsulated packets pass the
    // receiving node's POSTROUTING, where "pod to outside" would otherwise rewrite them).
    let ip = |i: usize| nth6(subnets[i], 2);
    for (from, to) in [(0, 1), (1, 0)] {
        let seen = seen_source(&pods[from], &pods[to], ip(to).into());
        assert_eq!(
            seen,
            Some(IpAddr::V6(ip(from))),
            "pod {from} → pod {to} over IPv6 must keep its source"
        );
    }

    // "The outside": a host on the underlay segment that knows no pod routes.
    let outside_ip: Ipv6Addr = "fd00:198:18::200".parse().unwrap();
    let outside = c.outside_host(outside_ip.into()).unwrap();
    for (i, pod) in pods.iter().enumerate() {
        let seen = seen_source(pod, &outside, outside_ip.into());
        assert_eq!(
            seen,
            Some(IpAddr::V6(underlay6(i as u8 + 1))),
            "pod {} → outside over IPv6 must be masqueraded to node {i}'s address",
            ip(i)
        );
    }

    // cleanup (agent stopped) removes both tables.
    c.stop_agent(0, Signal::SIGTERM);
    let text = cleanup(&c, 0);
    assert!(
        text.contains("removed nftables table ip overlay-agent")
            && text.contains("removed nftables table ip6 overlay-agent"),
        "{text}"
    );
    let ns0 = &c.nodes[0].node.ns;
    let tables = output(ns0, "nft", &["list", "tables"]).unwrap();
    assert!(!tables.contains("overlay-agent"), "cleanup left: {tables}");
}

#[test]
fn ipv6_only_network_gets_ipv6_rules_only() {
    let (mut c, subnets) = cluster_with(2, V6_ONLY, drop6(&["--ip-masq"]));
    let pods = pods(&mut c, &subnets, false);
    for (i, n) in c.nodes.iter().enumerate() {
        let ns = &n.node.ns;
        assert!(
            rules_in_place(ns, "ip6tables", NETWORK6),
            "node {i}: ip6tables {:?}\nlog:\n{}",
            forward_rules(ns, "ip6tables"),
            c.agent_log(i)
        );
        assert!(
            no_rules(ns, "iptables"),
            "node {i}: IPv4 rules for an IPv6-only network: {:?}",
            forward_rules(ns, "iptables")
        );
        assert_eq!(
            masq_table(ns, "ip6"),
            Some(masq6_rules(subnets[i])),
            "node {i}: table ip6 overlay-agent; log:\n{}",
            c.agent_log(i)
        );
        assert_eq!(masq_table(ns, "ip"), None, "node {i}: an IPv4 table");
    }
    assert_pods_ping6(&c, &pods, &subnets, "IPv6-only, ip6tables FORWARD DROP");
    let seen = seen_source(&pods[0], &pods[1], nth6(subnets[1], 2).into());
    assert_eq!(seen, Some(IpAddr::V6(nth6(subnets[0], 2))), "IPv6-only pod → pod");
}
