//! Tier 3 (root): hosts whose FORWARD policy is DROP (what Docker sets when it turns forwarding
//! on, and ufw's and firewalld's default). The agent's `--iptables-forward-rules` (flanneld's
//! `FLANNEL-FWD` chain) keeps overlay traffic flowing on every path: the BPF fast path, the
//! stack path (`--deliver stack`: decapsulated packets are routed eth0 → cni0 through FORWARD)
//! and host → remote pod; the rules come back after a flush and `cleanup` removes them.
//!
//! Run: `cargo build -p overlay-agent && cargo test -p overlay-tests --test netns_firewall -- --test-threads=1`

use std::time::Duration;

use nix::sys::signal::Signal;
use overlay_tests::{
    cluster::{agent_bin, output, Cluster},
    netns::{require_root, Netns},
    topology::{ping, ping_counts},
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const JUMP: &str = "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD";
const ACCEPT_FROM: &str =
    "-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT";
const ACCEPT_TO: &str = "-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT";

fn iptables(ns: &Netns, args: &[&str]) {
    ns.exec("iptables", args)
        .unwrap_or_else(|e| panic!("iptables {args:?} in {}: {e:#}", ns.name));
}

/// `iptables -S FORWARD` and `-S FLANNEL-FWD` (empty when the chain does not exist), as lines.
fn forward_rules(ns: &Netns) -> (Vec<String>, Vec<String>) {
    let lines = |t: String| t.lines().map(str::to_string).collect::<Vec<_>>();
    let forward = lines(output(ns, "iptables", &["-S", "FORWARD"]).expect("iptables -S FORWARD"));
    let chain = output(ns, "iptables", &["-S", "FLANNEL-FWD"])
        .map(lines)
        .unwrap_or_default();
    (forward, chain)
}

/// flanneld's rules, exactly once: the jump at the end of FORWARD and the chain's two accepts.
fn rules_in_place(ns: &Netns) -> bool {
    let (forward, chain) = forward_rules(ns);
    forward.iter().filter(|l| *l == JUMP).count() == 1 && chain == ["-N FLANNEL-FWD", ACCEPT_FROM, ACCEPT_TO]
}

/// A cluster of two nodes whose FORWARD policy is DROP before the agents start.
fn drop_cluster(extra: &[&str]) -> (Cluster, Vec<std::net::Ipv4Addr>) {
    let mut c = Cluster::new(2, CONFIG).expect("building the cluster");
    for n in &mut c.nodes {
        iptables(&n.node.ns, &["-P", "FORWARD", "DROP"]);
        n.extra_args.extend(extra.iter().map(|s| s.to_string()));
    }
    let pods = c.start_with_pods().expect("agents and pods");
    (c, pods)
}

fn assert_pods_talk(c: &Cluster, pods: &[std::net::Ipv4Addr], what: &str) {
    for (from, to) in [(0, 1), (1, 0)] {
        let got = ping_counts(&c.nodes[from].node.pods[0].ns, pods[to], 5, None);
        assert_eq!(
            got,
            Some((5, 5)),
            "{what}: pod {from} → pod {to} under FORWARD DROP (sent, received);\n\
             node {to} rules: {:?}\nlog:\n{}",
            forward_rules(&c.nodes[to].node.ns),
            c.agent_log(to)
        );
    }
}

#[test]
fn forward_drop_policy_keeps_the_fast_path_and_host_to_pod_and_rules_come_back() {
    require_root();
    let (c, pods) = drop_cluster(&["--iptables-resync=1"]);
    for (i, n) in c.nodes.iter().enumerate() {
        let (forward, _) = forward_rules(&n.node.ns);
        assert!(
            forward.contains(&"-P FORWARD DROP".to_string()),
            "node {i}: {forward:?}"
        );
        assert!(
            rules_in_place(&n.node.ns),
            "node {i}: {:?}",
            forward_rules(&n.node.ns)
        );
    }
    assert_pods_talk(&c, &pods, "default delivery");

    // Host → remote pod through overlay0.
    let host = &c.nodes[0].node.ns;
    assert!(ping(host, pods[1], 3, None), "node 0 → pod 1 under FORWARD DROP");

    // Someone flushes the chain, or deletes the jump: the agent puts each back (resync 1 s).
    for piece in [Piece::Accepts, Piece::Jump] {
        assert_resynced(&c, 1, "iptables", piece);
    }
}

/// What someone removes of flanneld's FORWARD rules: the chain's accepts, or the jump to it.
#[derive(Clone, Copy, Debug)]
enum Piece {
    Accepts,
    Jump,
}

/// flanneld's rules exactly once in backend `tool` (`iptables`: nf_tables, `iptables-legacy`).
fn rules_in(ns: &Netns, tool: &str) -> bool {
    let lines = |args: &[&str]| {
        output(ns, tool, args)
            .map(|t| t.lines().map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    lines(&["-S", "FORWARD"]).iter().filter(|l| *l == JUMP).count() == 1
        && lines(&["-S", "FLANNEL-FWD"]) == ["-N FLANNEL-FWD", ACCEPT_FROM, ACCEPT_TO]
}

/// Removes `piece` of node `i`'s rules in backend `tool` and waits for the agent (resync 1 s)
/// to put it back, saying so in its log.
fn assert_resynced(c: &Cluster, i: usize, tool: &str, piece: Piece) {
    let ns = &c.nodes[i].node.ns;
    let mark = c.log_mark(i);
    let args: &[&str] = match piece {
        Piece::Accepts => &["-F", "FLANNEL-FWD"],
        Piece::Jump => &[
            "-D",
            "FORWARD",
            "-m",
            "comment",
            "--comment",
            "flanneld forward",
            "-j",
            "FLANNEL-FWD",
        ],
    };
    ns.exec(tool, args)
        .unwrap_or_else(|e| panic!("{tool} {args:?}: {e:#}"));
    assert!(
        !rules_in(ns, tool),
        "{tool}: {piece:?} still there after removing it"
    );
    let back = Cluster::wait_for(Duration::from_secs(5), || rules_in(ns, tool));
    assert!(
        back.is_some(),
        "{tool}: {piece:?} not restored within 5 s:\n{}",
        output(ns, tool, &["-S"]).unwrap_or_default()
    );
    assert!(
        c.wait_log_after(i, mark, "rewritten", Duration::from_secs(2))
            .is_some(),
        "{tool}: {piece:?}: no 'rewritten' log line:\n{}",
        c.agent_log(i)
    );
}

#[test]
fn stack_path_under_forward_drop_needs_the_rules_and_cleanup_removes_them() {
    require_root();
    // `--deliver stack`: decapsulated packets are routed by the node, eth0 → cni0, through FORWARD.
    let (mut c, pods) = drop_cluster(&["--deliver", "stack"]);
    assert_pods_talk(&c, &pods, "stack delivery");

    // Without the rules the same path is dropped: the accept rules are what carries it. The
    // agent is stopped first (its pinned datapath keeps running) so it cannot put them back.
    c.stop_agent(1, Signal::SIGTERM);
    let ns1 = &c.nodes[1].node.ns;
    assert!(rules_in_place(ns1), "the rules stay when the agent stops");
    let mut cleanup = c.cleanup_command(1, &agent_bin()).expect("cleanup command");
    let out = cleanup.output().expect("running cleanup");
    assert!(
        out.status.success(),
        "cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (forward, chain) = forward_rules(ns1);
    assert!(
        !forward.iter().any(|l| l.contains("FLANNEL-FWD")) && chain.is_empty(),
        "cleanup left rules: {forward:?} {chain:?}"
    );
    assert!(
        forward.contains(&"-P FORWARD DROP".to_string()),
        "cleanup must not touch the policy"
    );
    // cleanup also removed the pinned datapath: start the agent again, then take its rules away.
    let mark = c.log_mark(1);
    c.start_agent(1).expect("agent restarted");
    let ns1 = &c.nodes[1].node.ns;
    assert!(
        Cluster::wait_for(Duration::from_secs(10), || rules_in_place(ns1)).is_some(),
        "the restarted agent installs the rules: {:?}\n{}",
        forward_rules(ns1),
        c.agent_log(1)
    );
    c.wait_log_after(1, mark, "encap attached", Duration::from_secs(10));
    // cleanup emptied the maps: decap drops the peer's packets until its lease is back in them.
    let knows_peer = Cluster::wait_for(Duration::from_secs(10), || {
        c.agent_peers(1).is_ok_and(|p| p.len() == 1)
    });
    assert!(
        knows_peer.is_some(),
        "restarted agent did not learn its peer:\n{}",
        c.agent_log(1)
    );
    assert_pods_talk(&c, &pods, "after cleanup and restart");

    c.stop_agent(1, Signal::SIGTERM);
    let ns1 = &c.nodes[1].node.ns;
    iptables(ns1, &["-F", "FLANNEL-FWD"]);
    let got = ping_counts(&c.nodes[0].node.pods[0].ns, pods[1], 3, None);
    assert_eq!(
        got,
        Some((3, 0)),
        "without the accept rules FORWARD DROP must drop the stack path"
    );
}

#[test]
fn a_drop_policy_in_the_legacy_backend_gets_the_rules_there_too() {
    require_root();
    // The host's firewall is iptables-legacy (its filter table exists), while `iptables` here is
    // the nf_tables one: a packet must pass both, so the accept must be in both.
    let mut c = Cluster::new(2, CONFIG).expect("building the cluster");
    for n in &mut c.nodes {
        n.node
            .ns
            .exec("iptables-legacy", &["-P", "FORWARD", "DROP"])
            .expect("iptables-legacy -P FORWARD DROP");
        n.extra_args
            .extend(["--deliver", "stack", "--iptables-resync=1"].map(String::from));
    }
    let pods = c.start_with_pods().expect("agents and pods");
    for (i, n) in c.nodes.iter().enumerate() {
        let legacy = output(&n.node.ns, "iptables-legacy", &["-S", "FLANNEL-FWD"]).unwrap_or_default();
        assert!(
            legacy.lines().any(|l| l == ACCEPT_TO) && legacy.lines().any(|l| l == ACCEPT_FROM),
            "node {i}: no rules in the legacy backend: {legacy:?}\n{}",
            c.agent_log(i)
        );
        assert!(rules_in_place(&n.node.ns), "node {i}: nf_tables rules");
    }
    assert_pods_talk(&c, &pods, "legacy DROP, stack delivery");
    // Each piece removed from the legacy backend comes back there.
    for piece in [Piece::Accepts, Piece::Jump] {
        assert_resynced(&c, 1, "iptables-legacy", piece);
    }
    assert_pods_talk(&c, &pods, "legacy DROP, after the resyncs");
    // cleanup removes them from both backends.
    c.stop_agent(1, Signal::SIGTERM);
    let out = c
        .cleanup_command(1, &agent_bin())
        .expect("cleanup command")
        .output()
        .expect("running cleanup");
    assert!(
        out.status.success(),
        "cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ns1 = &c.nodes[1].node.ns;
    assert!(
        output(ns1, "iptables-legacy", &["-S", "FLANNEL-FWD"]).is_err(),
        "cleanup left the legacy chain"
    );
    assert!(
        forward_rules(ns1).1.is_empty(),
        "cleanup left the nf_tables chain"
    );
}
