//! Tier 3 (root): what other members' leases can do to a node (issue 24, items 1 and 2), with
//! two agent nodes, a real etcd and real pod traffic.
//! - The sender table (`OVL_VTEPS`) follows the leases: a second lease with node 2's PublicIP
//!   that comes and goes leaves node 2's own entry in place, and a restart repairs a sender
//!   table someone changed while no agent ran.
//! - Junk leases are never programmed, are counted by reason on `/metrics` and logged once per
//!   key, and the valid peers keep working; a held-back lease is programmed once the lease that
//!   held its subnet is gone.

use std::{net::Ipv4Addr, process::Command, time::Duration};

use ipnet::Ipv4Net;
use nix::sys::signal::Signal;
use overlay_tests::{
    cluster::{Cluster, NETWORK_PREFIX},
    netns::{require_root, Netns},
    topology::ping,
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/17","Backend":{"Type":"vxlan"}}"#;
const HEALTHZ_PORT: u16 = 9475;

fn key(subnet: &str) -> String {
    format!("{NETWORK_PREFIX}/subnets/{subnet}")
}

/// A vxlan lease value from `ip` (VtepMAC from its last byte).
fn value(ip: Ipv4Addr) -> String {
    let last = ip.octets()[3];
    format!(
        r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0e:00:00:00:00:{last:02x}"}}}}"#
    )
}

/// Node `i`'s own subnet (subnet.env holds its first address).
fn subnet_of(c: &Cluster, i: usize) -> Ipv4Net {
    c.nodes[i].subnet_env().expect("subnet.env").0.trunc()
}

/// The `a-b` of a subnet, as in its key.
fn dashed(sn: Ipv4Net) -> String {
    format!("{}-{}", sn.network(), sn.prefix_len())
}

/// `bpftool` on a map pinned by node `i`'s agent (the pins are in the host's bpffs).
fn bpftool(c: &Cluster, i: usize, map: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("bpftool");
    let pinned = format!("{}/{map}", c.nodes[i].pin_root);
    match args.split_first() {
        Some((verb, rest)) => cmd.args(["map", verb, "pinned", &pinned]).args(rest),
        None => cmd.args(["-j", "map", "dump", "pinned", &pinned]),
    };
    cmd.output().expect("running bpftool")
}

/// Node `i`'s sender table: (PublicIP, subnet) per entry, sorted.
fn senders(c: &Cluster, i: usize) -> Vec<(Ipv4Addr, Ipv4Net)> {
    c.agent_senders(i).expect("reading the sender table")
}

/// Node `i`'s peer map per `overlay-agent status --json`: (subnet, PublicIP), sorted.
fn peers(c: &Cluster, i: usize) -> Vec<(String, String)> {
    let v = c.status_json(i).expect("status --json");
    let mut out: Vec<(String, String)> = v["peers"]
        .as_array()
        .expect("status has a peers list")
        .iter()
        .map(|p| {
            let s = |k: &str| p[k].as_str().unwrap_or_default().to_string();
            (s("subnet"), s("public_ip"))
        })
        .collect();
    out.sort();
    out
}

fn has_peer(c: &Cluster, i: usize, subnet: &str) -> bool {
    c.agent_peers(i)
        .unwrap_or_default()
        .iter()
        .any(|n| n.to_string() == subnet)
}

fn metrics(ns: &Netns) -> String {
    let url = format!("http://127.0.0.1:{HEALTHZ_PORT}/metrics");
    let out = ns
        .command("curl")
        .args(["-sf", "--max-time", "5", &url])
        .output()
        .expect("running curl");
    assert!(out.status.success(), "GET /metrics failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn rejected(text: &str, reason: &str) -> Option<u64> {
    let series = format!("overlay_leases_rejected_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
}

const NODE2_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 12);

#[test]
fn a_second_lease_of_a_nodes_address_and_a_changed_sender_table_do_not_cut_it_off() {
    require_root();
    let (mut c, pods) = Cluster::running(2, CONFIG).expect("building the cluster");
    let (sn1, sn2) = (subnet_of(&c, 0), subnet_of(&c, 1));
    assert!(
        ping(&c.nodes[1].node.pods[0].ns, pods[0], 3, None),
        "node 2's pod → node 1's pod before anything happened"
    );
    assert_eq!(senders(&c, 0), [(NODE2_IP, sn2)], "node 1's sender table");

    // A second lease with node 2's PublicIP (node 2 re-leasing with the same address) appears
    // and goes away again.
    let second = (1..127u8)
        .map(|i| format!("10.244.{i}.0/24").parse::<Ipv4Net>().unwrap())
        .rev()
        .find(|sn| *sn != sn1 && *sn != sn2)
        .unwrap();
    c.etcdctl(&["put", &key(&dashed(second)), &value(NODE2_IP)])
        .unwrap();
    let seen = Cluster::wait_for(Duration::from_secs(3), || has_peer(&c, 0, &second.to_string()));
    assert!(
        seen.is_some(),
        "node 1 never programmed {second}; log:\n{}",
        c.agent_log(0)
    );
    assert_eq!(
        senders(&c, 0),
        [(NODE2_IP, sn2)],
        "a second lease of node 2's address took node 2's sender entry"
    );
    assert!(
        ping(&c.nodes[1].node.pods[0].ns, pods[0], 3, None),
        "node 2's pod → node 1's pod while a second lease of node 2's address exists"
    );
    c.etcdctl(&["del", &key(&dashed(second))]).unwrap();
    let gone = Cluster::wait_for(Duration::from_secs(3), || !has_peer(&c, 0, &second.to_string()));
    assert!(gone.is_some(), "node 1 never removed {second}");
    assert_eq!(
        senders(&c, 0),
        [(NODE2_IP, sn2)],
        "node 2's sender entry must stay, naming its own subnet"
    );
    assert!(
        ping(&c.nodes[1].node.pods[0].ns, pods[0], 3, None),
        "node 2's pod → node 1's pod after a second lease of node 2's address came and went"
    );

    // While node 1's agent is stopped, its pinned sender table is changed by hand: node 2's
    // entry deleted, an entry no lease names added.
    c.stop_agent(0, Signal::SIGTERM);
    let del = bpftool(&c, 0, "OVL_VTEPS", &["delete", "key", "198", "18", "0", "12"]);
    assert!(
        del.status.success(),
        "bpftool delete: {}",
        String::from_utf8_lossy(&del.stderr)
    );
    let junk = [
        "key", "198", "18", "0", "99", "value", "10", "244", "99", "0", "24", "0", "0", "0",
    ];
    let add = bpftool(&c, 0, "OVL_VTEPS", &[&["update"][..], &junk[..]].concat());
    assert!(
        add.status.success(),
        "bpftool update: {}",
        String::from_utf8_lossy(&add.stderr)
    );
    let orphan = (Ipv4Addr::new(198, 18, 0, 99), "10.244.99.0/24".parse().unwrap());
    assert_eq!(senders(&c, 0), [orphan]);
    // The pinned programs still run: node 2's packets now meet an unknown sender.
    assert!(
        !ping(&c.nodes[1].node.pods[0].ns, pods[0], 1, None),
        "node 2's pod reached node 1's pod with node 2's sender entry deleted"
    );
    c.restart_agent_fresh(0, Signal::SIGTERM, Duration::from_secs(20))
        .expect("restarting node 1's agent");
    let repaired = Cluster::wait_for(Duration::from_secs(5), || senders(&c, 0) == [(NODE2_IP, sn2)]);
    assert!(
        repaired.is_some(),
        "the restarted agent did not repair its sender table: {:?}; log:\n{}",
        senders(&c, 0),
        c.agent_log(0)
    );
    assert!(
        ping(&c.nodes[1].node.pods[0].ns, pods[0], 3, None),
        "node 2's pod → node 1's pod after the restart"
    );
    assert!(
        ping(&c.nodes[0].node.pods[0].ns, pods[1], 3, None),
        "node 1's pod → node 2's pod after the restart"
    );
}

#[test]
fn junk_leases_are_not_programmed_and_are_counted_and_valid_peers_keep_working() {
    require_root();
    let mut c = Cluster::new(2, CONFIG).expect("building the cluster");
    c.nodes[0]
        .extra_args
        .extend(["--healthz-port".into(), HEALTHZ_PORT.to_string()]);
    let pods = c.start_with_pods().expect("starting the agents");
    let (sn1, sn2) = (subnet_of(&c, 0), subnet_of(&c, 1));
    let node1_ip = Ipv4Addr::new(198, 18, 0, 11);
    let other = Ipv4Addr::new(198, 18, 0, 77);
    let before = metrics(&c.nodes[0].node.ns);
    for reason in ["key", "outside_network", "subnet_len", "public_ip", "overlap"] {
        assert_eq!(
            rejected(&before, reason),
            Some(0),
            "{reason} before any junk:\n{before}"
        );
    }
    // Subnets away from the nodes' own, inside the harness's pod range.
    let free: Vec<String> = (10..127u8)
        .map(|i| format!("10.244.{i}.0-24"))
        .filter(|k| *k != dashed(sn1) && *k != dashed(sn2))
        .collect();
    let junk: Vec<(String, String, &str)> = vec![
        ("0.0.0.0-1".into(), value(other), "outside_network"),
        ("128.0.0.0-1".into(), value(other), "outside_network"),
        ("10.244.200.0-24".into(), value(other), "outside_network"),
        ("10.244.0.0-16".into(), value(other), "outside_network"),
        ("10.244.0.0-17".into(), value(other), "subnet_len"),
        ("10.244.7.0-25".into(), value(other), "subnet_len"),
        ("10.244.7.0-024".into(), value(other), "key"),
        // Node 2's key spelt otherwise, from another address: it would replace node 2's entry.
        (format!("{}-024", sn2.network()), value(other), "key"),
        (free[0].clone(), value(node1_ip), "public_ip"),
        (free[1].clone(), value(Ipv4Addr::LOCALHOST), "public_ip"),
        // Node 2's subnet (and ours) under a higher key: the lower key holds it.
        (
            format!("{}&fd00:10:244:7::-64", dashed(sn2)),
            value(other),
            "overlap",
        ),
        (
            format!("{}&fd00:10:244:8::-64", dashed(sn1)),
            value(other),
            "overlap",
        ),
    ];
    for (k, v, _) in &junk {
        c.etcdctl(&["put", &key(k), v]).unwrap();
    }
    // A valid lease after them: once it is in the map, the junk before it was seen.
    let valid = free[2].replace('-', "/");
    c.etcdctl(&["put", &key(&free[2]), &value(Ipv4Addr::new(198, 18, 0, 78))])
        .unwrap();
    let seen = Cluster::wait_for(Duration::from_secs(3), || has_peer(&c, 0, &valid));
    assert!(
        seen.is_some(),
        "the valid lease never reached node 1; log:\n{}",
        c.agent_log(0)
    );
    let want_peers = {
        let mut v = vec![
            (sn2.to_string(), "198.18.0.12".to_string()),
            (valid.clone(), "198.18.0.78".to_string()),
        ];
        v.sort();
        v
    };
    assert_eq!(peers(&c, 0), want_peers, "node 1's peer map holds junk");
    // The same junk written again (as a renewal does): counted and logged once per key.
    for (k, v, _) in &junk {
        c.etcdctl(&["put", &key(k), v]).unwrap();
    }
    c.etcdctl(&["put", &key(&free[2]), &value(Ipv4Addr::new(198, 18, 0, 79))])
        .unwrap();
    let seen = Cluster::wait_for(Duration::from_secs(3), || {
        peers(&c, 0).contains(&(valid.clone(), "198.18.0.79".to_string()))
    });
    assert!(seen.is_some(), "the changed valid lease never reached node 1");
    let text = metrics(&c.nodes[0].node.ns);
    for reason in ["key", "outside_network", "subnet_len", "public_ip", "overlap"] {
        let want = junk.iter().filter(|j| j.2 == reason).count() as u64;
        assert_eq!(
            rejected(&text, reason),
            Some(want),
            "overlay_leases_rejected_total{{reason=\"{reason}\"}}"
        );
    }
    let log = c.agent_log(0);
    for (k, _, reason) in &junk {
        let lines = log
            .lines()
            .filter(|l| l.contains("not programming it") && l.contains(&key(k)))
            .collect::<Vec<_>>();
        assert_eq!(lines.len(), 1, "warnings about {k}: {lines:#?}");
        assert!(
            lines[0].contains(&format!("reason=\"{reason}\""))
                || lines[0].contains(&format!("reason={reason}")),
            "{}",
            lines[0]
        );
    }
    // Deleting the other spelling of node 2's key deletes nothing of node 2's.
    c.etcdctl(&["del", &key(&format!("{}-024", sn2.network()))])
        .unwrap();
    // A barrier instead of a fixed wait: the agent handles events in order, so once a change
    // written after the delete is in the map, the delete has been handled too.
    c.etcdctl(&["put", &key(&free[2]), &value(Ipv4Addr::new(198, 18, 0, 80))])
        .unwrap();
    let seen = Cluster::wait_for(Duration::from_secs(3), || {
        peers(&c, 0).contains(&(valid.clone(), "198.18.0.80".to_string()))
    });
    assert!(seen.is_some(), "the change after the delete never reached node 1");
    assert_eq!(
        peers(&c, 0).len(),
        2,
        "deleting an alias of node 2's key removed a peer"
    );
    for (from, to) in [(1, 0), (0, 1)] {
        assert!(
            ping(&c.nodes[from].node.pods[0].ns, pods[to], 3, None),
            "pod on node {} → pod on node {} with the junk leases in etcd",
            from + 1,
            to + 1
        );
    }

    // A lease held back by a lower key is programmed once that lease is gone.
    let held = free[3].clone();
    let dual = format!("{held}&fd00:10:244:9::-64");
    c.etcdctl(&["put", &key(&held), &value(Ipv4Addr::new(198, 18, 0, 80))])
        .unwrap();
    c.etcdctl(&["put", &key(&dual), &value(Ipv4Addr::new(198, 18, 0, 81))])
        .unwrap();
    let subnet = held.replace('-', "/");
    let first = Cluster::wait_for(Duration::from_secs(3), || {
        peers(&c, 0).contains(&(subnet.clone(), "198.18.0.80".to_string()))
    });
    assert!(
        first.is_some(),
        "the lower key's lease was not programmed: {:?}",
        peers(&c, 0)
    );
    c.etcdctl(&["del", &key(&held)]).unwrap();
    let taken = Cluster::wait_for(Duration::from_secs(3), || {
        peers(&c, 0).contains(&(subnet.clone(), "198.18.0.81".to_string()))
    });
    assert!(
        taken.is_some(),
        "the held-back lease was not programmed after the holder went: {:?}; log:\n{}",
        peers(&c, 0),
        c.agent_log(0)
    );
    let text = metrics(&c.nodes[0].node.ns);
    assert_eq!(
        rejected(&text, "overlap"),
        Some(3),
        "the held-back lease counted once"
    );
}
