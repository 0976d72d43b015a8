//! Tier 3 (root): `overlay-agent explain SRC DST --json` says what the packets really do. Two
//! dual-stack nodes with real etcd and agents, a pod on each; for every case explain runs in the
//! node's namespace first, then real packets are sent and the datapath's counters (`status
//! --json`) must have moved the way explain said: every counter a hop on a node names went up by
//! at least one per packet, and the counters of the other outcomes on that side did not (fewer
//! than half the packets: ARP, neighbour discovery and etcd's traffic move some). Cases, both
//! families: pod → remote pod (encap / direct, and delivered on the receiver), pod → a subnet no
//! member holds (refused), pod → an address outside the cluster network (stack), node → remote
//! pod (through `overlay0` on vxlan, the stack's route on host-gw) and the other node → pod; backends vxlan, vxlan with
//! `--deliver stack`, and host-gw; on vxlan also no underlay route to the member (drop).
//! explain also answers with the agent stopped (the pins stay), and names the missing pin root.
//!
//! Run: `cargo build -p overlay-agent && cargo test -p overlay-tests --test netns_explain -- --test-threads=1`

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use nix::sys::signal::Signal;
use overlay_tests::{
    cluster::{agent_bin, Cluster, ETCD_IP, ETCD_IP6},
    dualstack::{bridge_and_pod, cluster_with, nth6},
    netns::Netns,
    topology::{nth_host, Node},
};
use serde_json::Value;

/// Packets sent per case.
const N: u64 = 20;

/// Counters of what a node does with a packet it sends (SRC on this node) ...
const SEND_SIDE: &[&str] = &[
    "encap_packets",
    "encap6_packets",
    "direct_packets",
    "direct6_packets",
    "pass_stack",
    "pass_encap",
    "pass_too_big",
    "pass_ttl",
    "pass_nat",
    "pass_conntrack",
    "drop_no_route",
    "drop_pod_vxlan",
];
/// ... and with one it receives.
const RECEIVE_SIDE: &[&str] = &[
    "decap_packets",
    "decap6_packets",
    "deliver_packets",
    "deliver6_packets",
    "xdp_decap_to_stack",
    "pass_decap",
    "drop_unknown_peer",
    "drop_spoofed_source",
    "drop_wrong_vni",
    "drop_inner_mac",
    "drop_wrong_sender",
    "pass_unverified",
];

const DUAL_VXLAN: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
const DUAL_HOST_GW: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"host-gw"}}"#;

/// The testbed: two nodes, a dual-stack pod on each.
struct Bed {
    c: Cluster,
    pods: Vec<Netns>,
    /// Pod addresses per node: (IPv4, IPv6).
    addrs: Vec<(IpAddr, IpAddr)>,
}

fn bed(config: &str, extra: &[&str]) -> Bed {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let (mut c, subnets) = cluster_with(2, config, |n| n.extra_args.extend(extra.iter().cloned()));
    let pods: Vec<Netns> = (0..2)
        .map(|i| bridge_and_pod(&mut c, i, subnets[i], true))
        .collect();
    let addrs: Vec<(IpAddr, IpAddr)> = (0..2)
        .map(|i| {
            let v4 = nth_host(c.nodes[i].subnet_env().expect("subnet.env").0.trunc(), 2);
            (v4.into(), nth6(subnets[i], 2).into())
        })
        .collect();
    // Every node knows the other's subnets of both families and has encap attached.
    for i in 0..2 {
        let ok = Cluster::wait_for(Duration::from_secs(15), || {
            c.status_json(i)
                .is_ok_and(|s| s["peers"].as_array().is_some_and(|p| p.len() == 2))
        });
        assert!(
            ok.is_some(),
            "node {i} did not program both peers; log:\n{}",
            c.agent_log(i)
        );
        c.wait_encap_attached(i);
    }
    // First contact both ways (neighbour discovery, the nodes learning their pods), so what
    // the cases send is all that is counted.
    for (from, to) in [(0, 1), (1, 0)] {
        for dst in [addrs[to].0, addrs[to].1] {
            let ok = Cluster::wait_for(Duration::from_secs(15), || ping(&pods[from], dst, 1) == Some(1));
            assert!(
                ok.is_some(),
                "pod {from} never reached {dst}; logs:\n{}\n---\n{}",
                c.agent_log(0),
                c.agent_log(1)
            );
        }
    }
    // The receivers' endpoint maps hold the pods (delivery straight to them needs it).
    for i in 0..2 {
        let ok = Cluster::wait_for(Duration::from_secs(10), || {
            c.status_json(i)
                .is_ok_and(|s| s["endpoints"].as_array().is_some_and(|e| e.len() >= 2))
        });
        assert!(ok.is_some(), "node {i} did not learn its pod's two addresses");
    }
    Bed { c, pods, addrs }
}

/// `ping [-6] -c count -i 0.1 -W 1 dst` from `ns`: replies received (`None`: no summary).
fn ping(ns: &Netns, dst: IpAddr, count: u64) -> Option<u64> {
    let c = count.to_string();
    let d = dst.to_string();
    let mut args = vec!["-c", c.as_str(), "-i", "0.1", "-W", "1", d.as_str()];
    if dst.is_ipv6() {
        args.insert(0, "-6");
    }
    let out = ns.command("ping").args(&args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    overlay_tests::topology::parse_ping_summary(&text).map(|(_, r)| u64::from(r))
}

/// `overlay-agent explain SRC DST --json` in node `i`'s namespace.
fn explain(c: &Cluster, i: usize, src: IpAddr, dst: IpAddr) -> Value {
    let n = &c.nodes[i];
    let out = n
        .node
        .ns
        .command_net_only(agent_bin().to_str().unwrap())
        .args([
            "explain",
            &src.to_string(),
            &dst.to_string(),
            "--json",
            "--pin-root",
            &n.pin_root,
        ])
        .arg("--subnet-file")
        .arg(&n.subnet_file)
        .output()
        .expect("running overlay-agent explain");
    assert!(
        out.status.success(),
        "explain {src} {dst} on node {i} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("explain --json prints JSON")
}

fn counters(c: &Cluster, i: usize) -> BTreeMap<String, u64> {
    let st = c.status_json(i).expect("status --json");
    st["counters"]
        .as_object()
        .expect("status has counters")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect()
}

/// The node an explanation hop is at: "this node" is `here`, "node ADDR" the node with that
/// underlay address.
fn node_of(at: &str, here: usize) -> usize {
    if at == "this node" {
        return here;
    }
    let addr: IpAddr = at
        .strip_prefix("node ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("hop at {at:?}"));
    (0..2)
        .find(|k| {
            let idx = *k as u8 + 1;
            addr == IpAddr::from(Node::underlay_ip(idx)) || addr == IpAddr::from(Node::underlay_ip6(idx))
        })
        .unwrap_or_else(|| panic!("hop at {at}: no such node"))
}

/// One case: explain on each node in `on` (with the verdict it must give), then `N` pings from
/// `from`, then every node's counters against what the explanations said.
fn case(b: &Bed, what: &str, from: &Netns, src: IpAddr, dst: IpAddr, on: &[(usize, &str)]) {
    let c = &b.c;
    // (node, counter) → explained by which node's explanation; sides explained on each node.
    let mut want: Vec<(usize, String, String)> = Vec::new();
    let mut sides: Vec<(usize, &[&str], Vec<String>)> = Vec::new();
    let mut shown = String::new();
    for &(i, verdict) in on {
        let e = explain(c, i, src, dst);
        let text = serde_json::to_string_pretty(&e).unwrap();
        assert_eq!(
            e["verdict"], verdict,
            "{what}: explain {src} {dst} on node {i} says {} where {verdict} was expected:\n{text}",
            e["verdict"]
        );
        let local_src = e["src_is"]
            .as_str()
            .is_some_and(|s| s.starts_with("a local pod") || s.starts_with("this node's address"));
        let mut named_here = Vec::new();
        for h in e["hops"].as_array().expect("hops") {
            let k = node_of(h["at"].as_str().expect("hop at"), i);
            for ctr in h["counters"].as_array().expect("hop counters") {
                let ctr = ctr.as_str().unwrap().to_string();
                if k == i {
                    named_here.push(ctr.clone());
                }
                want.push((k, ctr, format!("node {i}'s explanation")));
            }
        }
        sides.push((i, if local_src { SEND_SIDE } else { RECEIVE_SIDE }, named_here));
        shown += &format!("--- explain on node {i}:\n{text}\n");
    }
    let before: Vec<BTreeMap<String, u64>> = (0..2).map(|i| counters(c, i)).collect();
    ping(from, dst, N);
    let after: Vec<BTreeMap<String, u64>> = (0..2).map(|i| counters(c, i)).collect();
    let delta = |k: usize, name: &str| {
        after[k].get(name).copied().unwrap_or(0) - before[k].get(name).copied().unwrap_or(0)
    };
    for (k, ctr, by) in &want {
        assert!(
            delta(*k, ctr) >= N,
            "{what}: {by} says node {k} counts each packet in {ctr}, but it moved by {} for {N} packets\n{shown}",
            delta(*k, ctr)
        );
    }
    for (i, side, named) in &sides {
        for ctr in side.iter().filter(|c| !named.iter().any(|n| n == *c)) {
            assert!(
                delta(*i, ctr) < N / 2,
                "{what}: node {i} counted {} packets in {ctr}, which its explanation does not name\n{shown}",
                delta(*i, ctr)
            );
        }
    }
}

/// The cases every backend runs. `pod_to_pod`: node 0's verdict for pod → remote pod, node 1's
/// for receiving it; `node_to_pod`: node 0's for its own packet to the remote pod;
/// `member_to_pod`: node 0's for receiving node 1's own packet to node 0's pod.
fn cases(b: &Bed, pod_to_pod: (&str, &str), node_to_pod: &str, member_to_pod: &str) {
    let (p0, p1) = (b.addrs[0], b.addrs[1]);
    let node0 = &b.c.nodes[0].node.ns;
    let node1 = &b.c.nodes[1].node.ns;
    for (pod, member) in [
        (p0.0, IpAddr::from(Node::underlay_ip(2))),
        (p0.1, IpAddr::from(Node::underlay_ip6(2))),
    ] {
        case(b, "member node → pod", node1, member, pod, &[(0, member_to_pod)]);
    }
    let families = [
        (
            p0.0,
            p1.0,
            IpAddr::from(Node::underlay_ip(1)),
            "10.244.200.2".parse::<IpAddr>().unwrap(),
            IpAddr::from(ETCD_IP),
        ),
        (
            p0.1,
            p1.1,
            IpAddr::from(Node::underlay_ip6(1)),
            "fd00:10:244:f0::2".parse().unwrap(),
            IpAddr::from(ETCD_IP6.parse::<Ipv6Addr>().unwrap()),
        ),
    ];
    for (src, dst, node_ip, unleased, outside) in families {
        case(
            b,
            "pod → remote pod",
            &b.pods[0],
            src,
            dst,
            &[(0, pod_to_pod.0), (1, pod_to_pod.1)],
        );
        case(
            b,
            "pod → a subnet no member holds",
            &b.pods[0],
            src,
            unleased,
            &[(0, "refused")],
        );
        case(
            b,
            "pod → outside the cluster network",
            &b.pods[0],
            src,
            outside,
            &[(0, "stack")],
        );
        case(b, "node → remote pod", node0, node_ip, dst, &[(0, node_to_pod)]);
    }
}

#[test]
fn vxlan_explain_matches_the_datapath() {
    let mut b = bed(DUAL_VXLAN, &[]);
    cases(&b, ("encap", "deliver"), "encap", "deliver");

    // No underlay route to the member: encap drops (drop_no_route), both families. (The
    // routes go with the node's namespace if this fails.)
    let node0 = &b.c.nodes[0].node.ns;
    for (dst, member) in [
        (b.addrs[1].0, IpAddr::from(Node::underlay_ip(2))),
        (b.addrs[1].1, IpAddr::from(Node::underlay_ip6(2))),
    ] {
        let host = format!("{member}/{}", if member.is_ipv4() { 32 } else { 128 });
        let fam = if member.is_ipv4() { "-4" } else { "-6" };
        node0.ip(&[fam, "route", "add", "unreachable", &host]).unwrap();
        let src = if dst.is_ipv4() { b.addrs[0].0 } else { b.addrs[0].1 };
        case(&b, "no route to the member", &b.pods[0], src, dst, &[(0, "drop")]);
        node0.ip(&[fam, "route", "del", "unreachable", &host]).unwrap();
    }

    // The readable form, on a real node.
    let (src, dst) = (b.addrs[0].0, b.addrs[1].0);
    let n = &b.c.nodes[0];
    let out = n
        .node
        .ns
        .command_net_only(agent_bin().to_str().unwrap())
        .args([
            "explain",
            &src.to_string(),
            &dst.to_string(),
            "--pin-root",
            &n.pin_root,
        ])
        .arg("--subnet-file")
        .arg(&n.subnet_file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(
        text.starts_with(&format!("{src} → {dst}: encap (encap → remote at 198.18.0.12)\n"))
            && text.contains(
                "outer 198.18.0.11 → 198.18.0.12, UDP 32768-60999 (from the flow hash) → 8472, VNI 1"
            )
            && text.contains("1. this node — tc ingress on cni0 (overlay_encap): encap"),
        "explain's text:\n{text}"
    );

    // The pins outlive the agent: explain reads the same answer from them.
    // (stop_agent signals the agent and reaps it.)
    b.c.stop_agent(0, Signal::SIGTERM);
    let e = explain(&b.c, 0, b.addrs[0].0, b.addrs[1].0);
    assert_eq!(e["verdict"], "encap", "with the agent stopped:\n{e}");
    assert_eq!(e["hops"][0]["outer"]["udp_dst_port"], 8472, "{e}");

    // No pins at all: the error names the pin root.
    let out = b.c.nodes[0]
        .node
        .ns
        .command_net_only(agent_bin().to_str().unwrap())
        .args([
            "explain",
            "10.244.1.2",
            "10.244.2.2",
            "--pin-root",
            "/sys/fs/bpf/no-such-overlay-pins",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("no pinned map")
            && err.contains("/sys/fs/bpf/no-such-overlay-pins"),
        "explain without pins: {err}"
    );
    b.pods.clear();
}

#[test]
fn vxlan_deliver_stack_explain_matches_the_datapath() {
    let b = bed(DUAL_VXLAN, &["--deliver", "stack"]);
    // Encap on the bridge hands the pod's packet to the stack (pass_stack), overlay0's egress
    // encapsulates it; the receiver strips it and leaves it to its stack.
    cases(&b, ("encap", "stack"), "encap", "stack");
}

#[test]
fn host_gw_explain_matches_the_datapath() {
    let b = bed(DUAL_HOST_GW, &[]);
    cases(&b, ("direct", "deliver"), "stack", "stack");
}
