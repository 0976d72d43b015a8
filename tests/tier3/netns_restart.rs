//! Tier 3 (root): what a restarted or upgraded agent makes of an etcd that changed while it was
//! down, and lease renewal by the shipped binary against a real etcd (issue 25).
//! - While node 1's agent is stopped (its pinned datapath still forwarding) a peer leaves (its
//!   lease deleted), a peer moves to another PublicIP (same subnet, same etcd lease), a peer
//!   joins and node 1's own lease is deleted. The agent started again — the same binary, or this
//!   tree's after the previous release's — must make the pinned peer map and sender table
//!   exactly what etcd says, reach the moved peer, stop encapsulating to the departed one and
//!   refuse its frames, and hold a lease again that subnet.env names.
//! - The agent renews its lease in etcd: the lease's TTL read from etcd goes back up, twice, with
//!   the same key and lease, while a pod ↔ pod flow runs. flanneld has no flag for the lease's
//!   TTL and neither has the agent: a lease lasts 24 h (flannel's `subnetTTL`,
//!   `control::subnet::SUBNET_TTL`, granted by etcd) and is renewed `-subnet-lease-renew-margin`
//!   minutes before the expiry etcd reports; the largest margin, 1439, renews every 60 s.
//!
//! Run alone: `cargo build -p overlay-agent && OVERLAY_PREV_AGENT_BIN=$(cargo xtask prev-release
//! | tail -1) cargo test -p overlay-tests --test netns_restart -- --test-threads=1`

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use ipnet::Ipv4Net;
use nix::sys::signal::Signal;
use overlay_tests::{
    cluster::{agent_bin, previous_agent_bin, Cluster, UdpFlow, NETWORK_PREFIX},
    netns::require_root,
    topology::{fmt_mac, ping, ping_counts, Node},
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
/// Node 2's PublicIP after it moved.
const MOVED_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 22);
/// The lease of a node that joined while node 1 was down.
const JOINED_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);
const JOINED_SUBNET: &str = "10.244.200.0/24";
/// Pings per check; every one answered (or, to the departed node, none).
const PINGS: u32 = 5;
/// How long a started agent may take to take its lease and make its maps what etcd says.
const CONVERGE: Duration = Duration::from_secs(10);
/// flannel's lease TTL (24 h) and the largest renew margin flanneld's flag takes (minutes).
const LEASE_TTL_SECS: i64 = 24 * 3600;
const RENEW_MARGIN_MINUTES: u32 = 24 * 60 - 1;
/// Seconds between renewals with that margin.
const RENEW_EVERY_SECS: i64 = LEASE_TTL_SECS - RENEW_MARGIN_MINUTES as i64 * 60;

fn key(sn: Ipv4Net) -> String {
    format!("{NETWORK_PREFIX}/subnets/{}-{}", sn.network(), sn.prefix_len())
}

/// Node `i`'s own subnet (subnet.env holds its first address).
fn subnet_of(c: &Cluster, i: usize) -> Ipv4Net {
    c.nodes[i].subnet_env().expect("subnet.env").0.trunc()
}

/// A node's peer map (`status --json`: subnet, PublicIP, VtepMAC, mode) and sender table.
#[derive(Debug, PartialEq, Eq)]
struct Maps {
    peers: Vec<(String, String, String, String)>,
    senders: Vec<(Ipv4Addr, Ipv4Net)>,
}

impl Maps {
    /// (subnet, PublicIP) of each peer entry.
    fn peer_addrs(&self) -> Vec<(String, String)> {
        self.peers.iter().map(|p| (p.0.clone(), p.1.clone())).collect()
    }
}

/// The maps etcd calls for on the node holding `own`: every other lease a tunnelled peer entry,
/// and one sender entry per PublicIP naming its subnet.
fn etcd_says(c: &Cluster, own: Ipv4Net) -> Maps {
    let others: Vec<_> = c
        .lease_list()
        .expect("listing the leases")
        .into_iter()
        .filter(|(sn, ..)| *sn != own)
        .collect();
    let mut peers: Vec<_> = others
        .iter()
        .map(|(sn, ip, mac)| (sn.to_string(), ip.to_string(), fmt_mac(mac), "encap".to_string()))
        .collect();
    let mut senders: Vec<_> = others.iter().map(|(sn, ip, _)| (*ip, *sn)).collect();
    peers.sort();
    senders.sort();
    Maps { peers, senders }
}

/// Node `i`'s pinned maps (read while its agent runs or not).
fn maps_of(c: &Cluster, i: usize) -> anyhow::Result<Maps> {
    let v = c.status_json(i)?;
    let mut peers: Vec<_> = v["peers"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("status has no peers list"))?
        .iter()
        .map(|p| {
            let s = |k: &str| p[k].as_str().unwrap_or_default().to_string();
            (s("subnet"), s("public_ip"), s("vtep_mac"), s("mode"))
        })
        .collect();
    peers.sort();
    Ok(Maps {
        peers,
        senders: c.agent_senders(i)?,
    })
}

/// Waits until node `i`'s maps are what etcd says (both read again each time); panics naming
/// both when they are not within [`CONVERGE`].
fn assert_maps_follow_etcd(c: &Cluster, i: usize, when: &str) -> Maps {
    let own = subnet_of(c, i);
    let same = || maps_of(c, i).is_ok_and(|m| m == etcd_says(c, own));
    if Cluster::wait_for(CONVERGE, same).is_none() {
        panic!(
            "{when}: node {}'s maps are not what etcd says within {CONVERGE:?}\n  maps: {:?}\n  etcd: {:?}\nleases:\n{}\nlog:\n{}",
            i + 1,
            maps_of(c, i),
            etcd_says(c, own),
            c.leases().unwrap_or_default(),
            c.agent_log(i)
        );
    }
    etcd_says(c, own)
}

/// The etcd lease a key is attached to (`etcdctl get -w fields`); `None` without the key.
fn lease_id(c: &Cluster, key: &str) -> Option<i64> {
    let out = c.etcdctl(&["get", key, "-w", "fields"]).ok()?;
    out.lines()
        .find_map(|l| l.strip_prefix("\"Lease\" : ")?.trim().parse().ok())
}

/// (remaining, granted) TTL of etcd lease `id` in seconds, as etcd reports them; `None` once the
/// lease is gone.
fn time_to_live(c: &Cluster, id: i64) -> Option<(i64, i64)> {
    let out = c
        .etcdctl(&["lease", "timetolive", &format!("{id:x}"), "-w", "json"])
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let ttl = v["ttl"].as_i64()?;
    (ttl > 0).then_some((ttl, v["granted-ttl"].as_i64()?))
}

/// The key etcd holds for `public_ip` (its subnet) and the lease it is attached to.
fn lease_of(c: &Cluster, public_ip: Ipv4Addr) -> Option<(Ipv4Net, i64)> {
    let (sn, ..) = c
        .lease_list()
        .ok()?
        .into_iter()
        .find(|(_, ip, _)| *ip == public_ip)?;
    Some((sn, lease_id(c, &key(sn))?))
}

/// Asserts node `i` holds a live, expiring lease in etcd under its PublicIP for the subnet its
/// subnet.env names; returns (subnet, etcd lease id).
fn assert_holds_a_lease(c: &Cluster, i: usize, when: &str) -> (Ipv4Net, i64) {
    let ip = Node::underlay_ip(c.nodes[i].node.index);
    let (sn, id) = lease_of(c, ip).unwrap_or_else(|| {
        panic!(
            "{when}: etcd has no lease for node {}'s PublicIP {ip}:\n{}",
            i + 1,
            c.leases().unwrap_or_default()
        )
    });
    assert_eq!(
        subnet_of(c, i),
        sn,
        "{when}: node {}'s subnet.env names another subnet than its lease",
        i + 1
    );
    let ttl = time_to_live(c, id);
    assert!(
        id != 0 && ttl.is_some_and(|(left, granted)| granted == LEASE_TTL_SECS && left > 0),
        "{when}: node {}'s lease {} is not a live 24 h etcd lease (id {id:x}, ttl {ttl:?})",
        i + 1,
        key(sn)
    );
    (sn, id)
}

fn counter(c: &Cluster, i: usize, name: &str) -> u64 {
    let v = c.status_json(i).expect("status --json");
    v["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("status --json has no counter {name}"))
}

/// `PINGS` pings from node `from`'s pod to node `to`'s pod: how many were answered.
fn answered(c: &Cluster, pods: &[Ipv4Addr], from: usize, to: usize) -> u32 {
    let (sent, got) = ping_counts(&c.nodes[from].node.pods[0].ns, pods[to], PINGS, None)
        .unwrap_or_else(|| panic!("no summary from ping {}", pods[to]));
    assert_eq!(sent, PINGS, "ping sent {sent} of {PINGS}");
    got
}

/// [`answered`] from node 1's pod to the departed node 3's pod, and the VXLAN frames to node 3
/// that crossed the underlay bridge meanwhile (tcpdump's lines).
fn to_the_departed(c: &mut Cluster, pods: &[Ipv4Addr]) -> (u32, String) {
    let out = c.dir().join("to-departed.txt");
    let filter = format!("udp dst port 8472 and dst host {}", Node::underlay_ip(3));
    let capture = c.underlay.ns.capture("br0", 1, &filter, &out).unwrap();
    let got = answered(c, pods, 0, 2);
    // ping has waited 2 s for its last reply: anything encapsulated has crossed the bridge.
    let seen = capture.wait(&mut c.underlay.ns, Duration::from_millis(500));
    (got, seen.trim().to_string())
}

/// Every one of [`PINGS`] pings answered between the pods of nodes `a` and `b`, both ways.
fn assert_pings_both_ways(c: &Cluster, pods: &[Ipv4Addr], (a, b): (usize, usize), when: &str) {
    for (from, to) in [(a, b), (b, a)] {
        assert_eq!(
            answered(c, pods, from, to),
            PINGS,
            "{when}: pod {} → pod {}",
            from + 1,
            to + 1
        );
    }
}

/// Whether node `from`'s pod gets an answer from node `to`'s pod within `within`.
fn reaches(c: &Cluster, pods: &[Ipv4Addr], from: usize, to: usize, within: Duration) -> bool {
    let ns = &c.nodes[from].node.pods[0].ns;
    Cluster::wait_for(within, || ping(ns, pods[to], 1, None)).is_some()
}

fn modified(path: &std::path::Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The restart (`before` is node 1's binary until it stops; this tree's agent starts).
fn etcd_changed_while_the_agent_was_down(before: PathBuf, what: &str) {
    require_root();
    let mut c = Cluster::new(3, CONFIG).expect("building the cluster");
    c.nodes[0].agent_bin = Some(before);
    let pods = c.start_with_pods().expect("starting the cluster");
    let sn: Vec<Ipv4Net> = (0..3).map(|i| subnet_of(&c, i)).collect();
    for to in [1, 2] {
        assert!(
            reaches(&c, &pods, 0, to, Duration::from_secs(5)),
            "{what}: pod 1 → pod {} before anything changed",
            to + 1
        );
    }
    assert_maps_follow_etcd(&c, 0, &format!("{what}, before the stop"));

    c.stop_agent(0, Signal::SIGTERM);
    let env_before = modified(&c.nodes[0].subnet_file);
    // Node 3 leaves: its agent stops (its pinned datapath still answers) and its lease is gone.
    c.stop_agent(2, Signal::SIGTERM);
    c.etcdctl(&["del", &key(sn[2])]).unwrap();
    // Node 2 moves to another address and keeps its subnet: its lease is rewritten with the new
    // PublicIP (the same etcd lease), and its agent, started on the new address, takes it.
    c.stop_agent(1, Signal::SIGTERM);
    let old_ip = Node::underlay_ip(2);
    let ns2 = &c.nodes[1].node.ns;
    ns2.ip(&["addr", "del", &format!("{old_ip}/24"), "dev", "eth0"])
        .unwrap();
    ns2.ip(&["addr", "add", &format!("{MOVED_IP}/24"), "dev", "eth0"])
        .unwrap();
    let value = c.etcdctl(&["get", &key(sn[1]), "--print-value-only"]).unwrap();
    let moved = value.trim().replace(
        &format!(r#""PublicIP":"{old_ip}""#),
        &format!(r#""PublicIP":"{MOVED_IP}""#),
    );
    assert_ne!(
        moved,
        value.trim(),
        "node 2's lease has no PublicIP {old_ip}: {value}"
    );
    c.etcdctl(&["put", "--ignore-lease", &key(sn[1]), &moved])
        .unwrap();
    let sn2 = c
        .restart_agent_fresh(1, Signal::SIGTERM, Duration::from_secs(20))
        .expect("starting node 2's agent on its new address");
    assert_eq!(sn2.trunc(), sn[1], "node 2 took another subnet after its move");
    // A node joins (a lease of its own, nobody behind it).
    let grant = c.etcdctl(&["lease", "grant", "600"]).unwrap();
    let joined_lease = grant.split_whitespace().nth(1).expect("lease grant output");
    let joined: Ipv4Net = JOINED_SUBNET.parse().unwrap();
    let joined_value = format!(
        r#"{{"PublicIP":"{JOINED_IP}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0e:00:00:00:00:99"}}}}"#
    );
    c.etcdctl(&["put", "--lease", joined_lease, &key(joined), &joined_value])
        .unwrap();
    // Node 1's own lease is deleted.
    c.etcdctl(&["del", &key(sn[0])]).unwrap();

    // The stale maps meanwhile (what each check after the restart would see unrepaired): node 1
    // still sends to node 3 and accepts its frames, and refuses the moved node 2's.
    let (got, seen) = to_the_departed(&mut c, &pods);
    assert!(
        got == PINGS && !seen.is_empty(),
        "{what}: the stopped node 1 no longer reached node 3's pod over VXLAN ({got} of {PINGS} answered; VXLAN to node 3: {seen:?})"
    );
    assert_eq!(
        answered(&c, &pods, 1, 0),
        0,
        "{what}: node 1 accepted the moved node 2 before its restart"
    );

    // Node 1 comes back with this tree's agent.
    c.nodes[0].agent_bin = None;
    let mark = c.log_mark(0);
    c.start_agent(0).unwrap();
    let held = c.wait_log_after(0, mark, "holding lease", CONVERGE);
    assert!(
        held.is_some(),
        "{what}: the restarted agent took no lease; log:\n{}",
        c.agent_log(0)
    );
    let want = assert_maps_follow_etcd(&c, 0, &format!("{what}, after the restart"));
    let mut literal = vec![
        (sn[1].to_string(), MOVED_IP.to_string()),
        (JOINED_SUBNET.to_string(), JOINED_IP.to_string()),
    ];
    literal.sort();
    assert_eq!(want.peer_addrs(), literal, "{what}: etcd's leases");
    assert!(c.agent_running(0), "{what}: the restarted agent exited");

    // Node 1 holds a lease again: its subnet (subnet.env named it, it was free), written anew.
    let (own, _) = assert_holds_a_lease(&c, 0, what);
    assert_eq!(
        own, sn[0],
        "{what}: node 1 did not take its subnet.env's free subnet again"
    );
    assert_ne!(
        modified(&c.nodes[0].subnet_file),
        env_before,
        "{what}: the restarted agent did not write subnet.env"
    );

    // The moved node: both ways.
    assert!(
        reaches(&c, &pods, 0, 1, Duration::from_secs(5)),
        "{what}: pod 1 → the moved node 2's pod; log:\n{}",
        c.agent_log(0)
    );
    assert_pings_both_ways(&c, &pods, (0, 1), &format!("{what}, after the restart"));

    // The departed node: nothing is encapsulated to it, and its frames are refused.
    let (got, seen) = to_the_departed(&mut c, &pods);
    assert_eq!(got, 0, "{what}: pod 1 → the departed node 3's pod");
    assert!(
        seen.is_empty(),
        "{what}: node 1 still encapsulates to the departed node 3: {seen}"
    );
    let drops = counter(&c, 0, "drop_unknown_peer");
    assert_eq!(
        answered(&c, &pods, 2, 0),
        0,
        "{what}: the departed node 3's pod → pod 1"
    );
    let counted = Cluster::wait_for(Duration::from_secs(2), || {
        counter(&c, 0, "drop_unknown_peer") == drops + u64::from(PINGS)
    });
    assert!(
        counted.is_some(),
        "{what}: node 1 dropped {} of the departed node 3's {PINGS} frames as from an unknown peer",
        counter(&c, 0, "drop_unknown_peer") - drops
    );
}

#[test]
fn a_restarted_agent_makes_its_maps_what_etcd_says_after_changes_while_it_was_down() {
    etcd_changed_while_the_agent_was_down(agent_bin(), "restart");
}

#[test]
fn an_upgraded_agent_makes_its_maps_what_etcd_says_after_changes_while_it_was_down() {
    etcd_changed_while_the_agent_was_down(previous_agent_bin().to_path_buf(), "upgrade");
}

#[test]
fn the_shipped_binary_renews_its_lease_in_etcd_while_traffic_flows() {
    require_root();
    let mut c = Cluster::new(2, CONFIG).expect("building the cluster");
    for n in &mut c.nodes {
        // flanneld's spelling of the flag.
        n.extra_args
            .push(format!("-subnet-lease-renew-margin={RENEW_MARGIN_MINUTES}"));
    }
    let pods = c.start_with_pods().expect("starting the cluster");
    let leases: Vec<(Ipv4Net, i64)> = (0..2)
        .map(|i| assert_holds_a_lease(&c, i, "at the start"))
        .collect();
    let (left, granted) = time_to_live(&c, leases[0].1).unwrap();
    // Renewals are due RENEW_EVERY_SECS after the grant and after each renewal.
    let second_due = Duration::from_secs((2 * RENEW_EVERY_SECS - (granted - left)).max(0) as u64);
    let report = c.dir().join("flow.json");
    let secs = second_due.as_secs() as u32 + 5;
    let (a, b) = c.nodes.split_at_mut(1);
    let flow = UdpFlow::start(
        &mut a[0].node.pods[0].ns,
        pods[0],
        &mut b[0].node.pods[0].ns,
        secs,
        report,
    )
    .unwrap();

    // Every second: each node's key still on the same etcd lease, whose remaining TTL only
    // falls except at a renewal, when it is back at the full 24 h.
    let mut last: Vec<i64> = vec![i64::MAX; 2];
    let mut renewals: Vec<Vec<Instant>> = vec![Vec::new(); 2];
    let deadline = Instant::now() + second_due + overlay_tests::slow(Duration::from_secs(15));
    while renewals.iter().any(|r| r.len() < 2) && Instant::now() < deadline {
        for i in 0..2 {
            let ip = Node::underlay_ip(c.nodes[i].node.index);
            assert_eq!(
                lease_of(&c, ip),
                Some(leases[i]),
                "node {}'s lease changed key or etcd lease instead of being renewed; log:\n{}",
                i + 1,
                c.agent_log(i)
            );
            let (ttl, _) = time_to_live(&c, leases[i].1)
                .unwrap_or_else(|| panic!("node {}'s etcd lease expired", i + 1));
            if ttl > last[i] {
                assert!(
                    ttl >= LEASE_TTL_SECS - 2,
                    "node {}'s renewal left {ttl} s of {LEASE_TTL_SECS}",
                    i + 1
                );
                renewals[i].push(Instant::now());
            }
            last[i] = ttl;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    for (i, r) in renewals.iter().enumerate() {
        assert!(
            r.len() >= 2,
            "node {}'s lease was renewed {} times in {:?} (expected every {RENEW_EVERY_SECS} s); log:\n{}",
            i + 1,
            r.len(),
            second_due,
            c.agent_log(i)
        );
        let apart = r[1] - r[0];
        let every = Duration::from_secs(RENEW_EVERY_SECS as u64);
        assert!(
            apart > every - Duration::from_secs(3)
                && apart < every + overlay_tests::slow(Duration::from_secs(5)),
            "node {}'s renewals {apart:?} apart, expected {every:?}",
            i + 1
        );
        assert_eq!(
            subnet_of(&c, i),
            leases[i].0,
            "node {}'s subnet.env changed",
            i + 1
        );
    }
    let (sent, lost) = flow
        .finish(&mut c.nodes[0].node.pods[0].ns, Duration::from_secs(15))
        .unwrap();
    assert!(
        sent >= u64::from(secs - 1) * 1000 && lost == 0,
        "pod 2 → pod 1 across two renewals: {lost} of {sent} lost"
    );
    assert_pings_both_ways(&c, &pods, (0, 1), "after the renewals");
}
