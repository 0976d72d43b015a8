//! Tier 3 (root): `overlay-agent monitor` as an operator runs it on a node — each drop reason
//! produced on purpose with real packets shows up with its hook, interface, outer and inner
//! addresses and ports and VNI; filters keep only what was asked; one monitor at a time; a
//! monitor killed outright stops the reports once its lease runs out.

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr, UdpSocket},
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use overlay_agent::{
    dataplane::pinned::{read_peer_stats, read_pinned_counters},
    family::V4,
};
use overlay_common::{wire::EncapParams, Counter};
use overlay_tests::{
    cluster::{agent_bin, Cluster},
    netns::require_root,
    packet,
    topology::{nth_host, Node},
};
use serde_json::Value;

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

/// A running `overlay-agent monitor --json` in node `i`'s network namespace; its lines arrive
/// on a channel. Killed when dropped.
struct Monitor {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Monitor {
    fn start(c: &Cluster, i: usize, args: &[&str]) -> Monitor {
        let n = &c.nodes[i];
        let mut child = n
            .node
            .ns
            .command_net_only(agent_bin().to_str().unwrap())
            .args(["monitor", "--json", "--pin-root", &n.pin_root])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning overlay-agent monitor");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let v: Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let mut m = Monitor { child, lines };
        let Some(first) = m.next(Duration::from_secs(5)) else {
            let _ = m.child.kill();
            let mut err = String::new();
            if let Some(mut e) = m.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("the monitor did not attach: {err}");
        };
        assert_eq!(first["type"], "attached", "{first}");
        m
    }

    fn next(&mut self, timeout: Duration) -> Option<Value> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Every line that arrives within `window`.
    fn collect(&mut self, window: Duration) -> Vec<Value> {
        let end = Instant::now() + window;
        let mut out = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(v) => out.push(v),
                Err(_) => break,
            }
        }
        out
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The crafted frames of the test, from an attacker on the underlay (198.18.0.66) to node 2.
struct Crafted {
    attacker: overlay_tests::netns::Netns,
    cases: Vec<(&'static str, Vec<u8>, Counter, Expect)>,
}

/// What the drop's event must say.
#[derive(Clone)]
struct Expect {
    outer_src: &'static str,
    vni: u64,
    inner_src: IpAddr,
}

fn crafted(c: &Cluster, pods: &[Ipv4Addr]) -> Crafted {
    let attacker = c.outside_host("198.18.0.66".parse().unwrap()).unwrap();
    let (node1_subnet, _) = c.nodes[0].subnet_env().unwrap();
    let base = crafted_base(c, &attacker);
    let legit = nth_host(node1_subnet, 7);
    let spoof: Ipv4Addr = "10.244.250.9".parse().unwrap();
    let inner = |src: Ipv4Addr| packet::udp(src, pods[1], 5555, 9999, b"MONITOR-TEST");
    let mut unknown = base;
    unknown.src_ip = [198, 18, 0, 66];
    let mut wrong_vni = base;
    wrong_vni.vni = 2;
    let mut wrong_mac = base;
    wrong_mac.inner_dst_mac = base.inner_src_mac;
    // UDP's length disagrees with IP's (a truncated frame would not cross the underlay's
    // bridge: br_netfilter drops IP packets shorter than they say).
    let mut malformed = packet::vxlan(&base, &inner(legit));
    let udp_len = u16::from_be_bytes([malformed[38], malformed[39]]) + 6;
    malformed[38..40].copy_from_slice(&udp_len.to_be_bytes());
    let from = |src: &'static str, vni: u64, inner_src: Ipv4Addr| Expect {
        outer_src: src,
        vni,
        inner_src: inner_src.into(),
    };
    let cases = vec![
        (
            "from a non-member",
            packet::vxlan(&unknown, &inner(legit)),
            Counter::DropUnknownPeer,
            from("198.18.0.66", 1, legit),
        ),
        (
            "wrong VNI",
            packet::vxlan(&wrong_vni, &inner(legit)),
            Counter::DropWrongVni,
            from("198.18.0.11", 2, legit),
        ),
        (
            "inner source outside the sender's subnet",
            packet::vxlan(&base, &inner(spoof)),
            Counter::DropSpoofedSource,
            from("198.18.0.11", 1, spoof),
        ),
        (
            "inner destination MAC not our VtepMAC",
            packet::vxlan(&wrong_mac, &inner(legit)),
            Counter::DropInnerMac,
            from("198.18.0.11", 1, legit),
        ),
        (
            "UDP length not IP's",
            malformed,
            Counter::DropMalformed,
            from("198.18.0.11", 1, legit),
        ),
    ];
    Crafted { attacker, cases }
}

/// The event for `reason` among `events`, checked field by field.
fn assert_event(events: &[Value], name: &str, reason: Counter, hook: &str, e: &Expect, pod: Ipv4Addr) {
    let ev = events
        .iter()
        .find(|v| v["type"] == "drop" && v["reason"] == reason.name())
        .unwrap_or_else(|| panic!("{name}: no {} event among {events:#?}", reason.name()));
    assert_eq!(ev["hook"], hook, "{name}: {ev}");
    assert_eq!(ev["iface"], "eth0", "{name}: {ev}");
    assert_eq!(ev["outer"]["src"], e.outer_src, "{name}: {ev}");
    assert_eq!(ev["outer"]["dst"], "198.18.0.12", "{name}: {ev}");
    assert_eq!(ev["outer"]["proto"], "udp", "{name}: {ev}");
    assert_eq!(ev["outer"]["sport"], 40000, "{name}: {ev}");
    assert_eq!(ev["outer"]["dport"], 8472, "{name}: {ev}");
    assert_eq!(ev["vni"], e.vni, "{name}: {ev}");
    assert_eq!(ev["inner"]["src"], e.inner_src.to_string(), "{name}: {ev}");
    assert_eq!(ev["inner"]["dst"], pod.to_string(), "{name}: {ev}");
    assert_eq!(ev["inner"]["sport"], 5555, "{name}: {ev}");
    assert_eq!(ev["inner"]["dport"], 9999, "{name}: {ev}");
    assert!(ev["len"].as_u64().unwrap() > 50, "{name}: {ev}");
    assert!(ev["time"].as_str().is_some_and(|t| t.len() == 15), "{name}: {ev}");
}

fn each_drop_reason_shows_up(decap: &str, hook: &str) {
    require_root();
    let mut c = Cluster::new(2, CONFIG).unwrap();
    for n in &mut c.nodes {
        n.extra_args.extend(["--decap".to_string(), decap.to_string()]);
    }
    let pods = c.start_with_pods().unwrap();
    let cr = crafted(&c, &pods);
    let node1 = Node::underlay_ip(1);
    let drops_before = peer_stats(&c, 1, node1).rx_drops;
    let mut m = Monitor::start(&c, 1, &[]);
    for (_, frame, _, _) in &cr.cases {
        packet::send_raw(&cr.attacker, "eth0", frame).unwrap();
    }
    let events = m.collect(Duration::from_secs(2));
    for (name, _, reason, e) in &cr.cases {
        assert_event(&events, name, *reason, hook, e, pods[1]);
    }
    let drops = events.iter().filter(|v| v["type"] == "drop").count();
    assert_eq!(drops, cr.cases.len(), "one event per crafted frame: {events:#?}");
    // The four refused from node 1's address count against it (the stranger's does not).
    assert_eq!(
        peer_stats(&c, 1, node1).rx_drops - drops_before,
        4,
        "node 2's rx_drops for node 1"
    );

    // The control: a well-formed frame from a member is decapsulated, and no event.
    let (node1_subnet, _) = c.nodes[0].subnet_env().unwrap();
    let legit = packet::udp(nth_host(node1_subnet, 7), pods[1], 5555, 9999, b"LEGIT");
    let ok = crafted_base(&c, &cr.attacker);
    packet::send_raw(&cr.attacker, "eth0", &packet::vxlan(&ok, &legit)).unwrap();
    let quiet = m.collect(Duration::from_secs(1));
    assert!(quiet.is_empty(), "a well-formed frame was reported: {quiet:#?}");
}

/// A well-formed VXLAN frame's outer headers from node 1 to node 2 (sent by the attacker).
fn crafted_base(c: &Cluster, attacker: &overlay_tests::netns::Netns) -> EncapParams {
    c.vxlan_from(0, 1, attacker).unwrap()
}

#[test]
fn each_drop_reason_shows_up_with_its_fields_tc_decap() {
    each_drop_reason_shows_up("tc", "tc/decap");
}

#[test]
fn each_drop_reason_shows_up_with_its_fields_xdp_decap() {
    each_drop_reason_shows_up("xdp", "xdp/decap");
}

/// A pod's VXLAN to a node (the injection encap refuses) is reported at the bridge, the pod's
/// packet as the inner tuple, no outer header.
#[test]
fn a_pods_vxlan_injection_is_reported_at_encap() {
    require_root();
    let (c, pods) = Cluster::running(2, CONFIG).unwrap();
    let mut m = Monitor::start(&c, 0, &["--reason", "drop_pod_vxlan"]);
    let node2 = Node::underlay_ip(2);
    let sock = {
        let _in = c.nodes[0].node.pods[0].ns.enter().unwrap();
        UdpSocket::bind("0.0.0.0:41000").unwrap()
    };
    sock.send_to(&[0x08, 0, 0, 0, 0, 0, 1, 0, 1, 2, 3, 4], (node2, 8472))
        .unwrap();
    let ev = m
        .next(Duration::from_secs(2))
        .expect("no event for the pod's VXLAN datagram");
    assert_eq!(ev["reason"], "drop_pod_vxlan", "{ev}");
    assert_eq!(ev["hook"], "tc/encap", "{ev}");
    assert_eq!(ev["iface"], "cni0", "{ev}");
    assert!(ev["outer"].is_null() && ev["vni"].is_null(), "{ev}");
    assert_eq!(ev["inner"]["src"], pods[0].to_string(), "{ev}");
    assert_eq!(ev["inner"]["dst"], node2.to_string(), "{ev}");
    assert_eq!(ev["inner"]["sport"], 41000, "{ev}");
    assert_eq!(ev["inner"]["dport"], 8472, "{ev}");
}

#[test]
fn filters_keep_only_what_was_asked_and_one_monitor_at_a_time() {
    require_root();
    let (c, pods) = Cluster::running(2, CONFIG).unwrap();
    let cr = crafted(&c, &pods);
    let send_all = || {
        for (_, frame, _, _) in &cr.cases {
            packet::send_raw(&cr.attacker, "eth0", frame).unwrap();
        }
    };
    {
        let mut m = Monitor::start(&c, 1, &["--reason", "drop_wrong_vni,drop_inner_mac"]);
        // A second monitor is refused with a message that says why.
        let n = &c.nodes[1];
        let second = n
            .node
            .ns
            .command_net_only(agent_bin().to_str().unwrap())
            .args(["monitor", "--pin-root", &n.pin_root, "--duration", "1"])
            .output()
            .unwrap();
        assert!(!second.status.success(), "a second monitor attached");
        let err = String::from_utf8_lossy(&second.stderr);
        assert!(
            err.contains("another `overlay-agent monitor` is attached"),
            "{err}"
        );
        send_all();
        let got: Vec<Value> = m.collect(Duration::from_secs(2));
        let reasons: Vec<&str> = got.iter().filter_map(|v| v["reason"].as_str()).collect();
        assert_eq!(reasons, ["drop_wrong_vni", "drop_inner_mac"], "{got:#?}");
    }
    {
        let mut m = Monitor::start(&c, 1, &["--peer", "198.18.0.66"]);
        send_all();
        let got = m.collect(Duration::from_secs(2));
        let reasons: Vec<&str> = got.iter().filter_map(|v| v["reason"].as_str()).collect();
        assert_eq!(reasons, ["drop_unknown_peer"], "{got:#?}");
    }
    {
        let mut m = Monitor::start(&c, 1, &["--pod", "10.244.250.9"]);
        send_all();
        let got = m.collect(Duration::from_secs(2));
        let reasons: Vec<&str> = got.iter().filter_map(|v| v["reason"].as_str()).collect();
        assert_eq!(reasons, ["drop_spoofed_source"], "{got:#?}");
    }
    // A bad reason is refused by name, with the list.
    let n = &c.nodes[1];
    let bad = n
        .node
        .ns
        .command_net_only(agent_bin().to_str().unwrap())
        .args([
            "monitor",
            "--pin-root",
            &n.pin_root,
            "--reason",
            "drop_everything",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success()
            && err.contains("\"drop_everything\" is not a drop reason")
            && err.contains("drop_wrong_vni"),
        "{err}"
    );
}

/// Killed with SIGKILL, a monitor cannot switch the reports off: its lease runs out (3 s) and
/// the programs stop reporting; the next monitor attaches at once (the lock died with it).
#[test]
fn a_killed_monitor_stops_the_reports_when_its_lease_runs_out() {
    require_root();
    let (c, pods) = Cluster::running(2, CONFIG).unwrap();
    let cr = crafted(&c, &pods);
    let wrong_vni = &cr.cases[1].1;
    let pin_root = std::path::PathBuf::from(&c.nodes[1].pin_root);
    let events = || {
        read_pinned_counters(&pin_root)
            .unwrap()
            .get(Counter::MonitorEvents)
    };
    let mut m = Monitor::start(&c, 1, &[]);
    packet::send_raw(&cr.attacker, "eth0", wrong_vni).unwrap();
    assert!(
        m.next(Duration::from_secs(2)).is_some(),
        "no event while attached"
    );
    let _ = m.child.kill();
    let _ = m.child.wait();
    let killed = Instant::now();
    // Within the lease the programs still report (into a ring nobody reads).
    std::thread::sleep(Duration::from_millis(200));
    let before = events();
    packet::send_raw(&cr.attacker, "eth0", wrong_vni).unwrap();
    let within = Cluster::wait_for(Duration::from_secs(1), || events() > before);
    assert!(
        within.is_some(),
        "no report within the lease: the test cannot tell"
    );
    std::thread::sleep(Duration::from_millis(3200).saturating_sub(killed.elapsed()));
    let before = events();
    for _ in 0..5 {
        packet::send_raw(&cr.attacker, "eth0", wrong_vni).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        events(),
        before,
        "reports went on after the killed monitor's lease"
    );
    let mut again = Monitor::start(&c, 1, &[]);
    packet::send_raw(&cr.attacker, "eth0", wrong_vni).unwrap();
    let ev = again
        .next(Duration::from_secs(2))
        .expect("the next monitor got nothing");
    assert_eq!(ev["reason"], "drop_wrong_vni", "{ev}");
}

/// node `i`'s per-peer counts for `peer` (a member), summed over the CPUs.
fn peer_stats(c: &Cluster, i: usize, peer: Ipv4Addr) -> overlay_common::PeerStats {
    let pins = std::path::Path::new(&c.nodes[i].pin_root);
    let all = read_peer_stats::<V4>(pins).unwrap().expect("no per-peer table");
    all.into_iter()
        .find_map(|(ip, s)| (ip == peer).then_some(s))
        .expect("no entry for the member")
}

/// No route to a member's PublicIP on the underlay: encap on the bridge drops the pod's packets
/// for it (`drop_no_route`), each reported with the pod's own tuple and counted as the
/// member's tx_drops, exactly.
#[test]
fn a_member_without_a_route_is_reported_at_encap_and_counted_against_it() {
    require_root();
    let (c, pods) = Cluster::running(2, CONFIG).unwrap();
    let node2 = Node::underlay_ip(2);
    let mut m = Monitor::start(&c, 0, &["--reason", "drop_no_route"]);
    let before = peer_stats(&c, 0, node2);
    let host = format!("{node2}/32");
    c.nodes[0]
        .node
        .ns
        .ip(&["route", "add", "unreachable", &host])
        .unwrap();
    let sock = {
        let _in = c.nodes[0].node.pods[0].ns.enter().unwrap();
        UdpSocket::bind("0.0.0.0:42000").unwrap()
    };
    for _ in 0..3 {
        sock.send_to(b"no-route", (pods[1], 9999)).unwrap();
    }
    let events = m.collect(Duration::from_secs(2));
    c.nodes[0]
        .node
        .ns
        .ip(&["route", "del", "unreachable", &host])
        .unwrap();
    let drops: Vec<&Value> = events.iter().filter(|v| v["type"] == "drop").collect();
    assert_eq!(drops.len(), 3, "{events:#?}");
    for ev in drops {
        assert_eq!(ev["reason"], "drop_no_route", "{ev}");
        assert_eq!(ev["hook"], "tc/encap", "{ev}");
        assert_eq!(ev["iface"], "cni0", "{ev}");
        assert!(ev["outer"].is_null(), "{ev}");
        assert_eq!(ev["inner"]["src"], pods[0].to_string(), "{ev}");
        assert_eq!(ev["inner"]["dst"], pods[1].to_string(), "{ev}");
        assert_eq!(
            (ev["inner"]["sport"].as_u64(), ev["inner"]["dport"].as_u64()),
            (Some(42000), Some(9999)),
            "{ev}"
        );
    }
    let after = peer_stats(&c, 0, node2);
    assert_eq!(
        (
            after.tx_drops - before.tx_drops,
            after.tx_packets - before.tx_packets
        ),
        (3, 0),
        "node 1's counts for node 2: {after:?}"
    );
}

/// VXLAN decap leaves to the stack (IP options: flannel peers never send them) reaches the
/// kernel's VXLAN socket of the receive-GRO device, whose sink drops what it decapsulates
/// (`drop_gro_device`): reported at that hook with the inner packet.
#[test]
fn vxlan_the_stack_decapsulates_is_reported_at_the_gro_sink() {
    require_root();
    let (c, pods) = Cluster::running(2, CONFIG).unwrap();
    let attacker = c.outside_host("198.18.0.66".parse().unwrap()).unwrap();
    let (node1_subnet, _) = c.nodes[0].subnet_env().unwrap();
    let inner = packet::udp(nth_host(node1_subnet, 7), pods[1], 5555, 9999, b"VIA-THE-STACK");
    let plain = packet::vxlan(&c.vxlan_from(0, 1, &attacker).unwrap(), &inner);
    // Four bytes of options (NOP NOP NOP EOL) after the outer IPv4 header, its lengths and
    // checksum redone.
    let mut f = plain[..34].to_vec();
    f.extend_from_slice(&[1, 1, 1, 0]);
    f.extend_from_slice(&plain[34..]);
    f[14] = 0x46;
    let tot = u16::from_be_bytes([f[16], f[17]]) + 4;
    f[16..18].copy_from_slice(&tot.to_be_bytes());
    f[24..26].copy_from_slice(&[0, 0]);
    let sum: u32 = f[14..38]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let csum = !(((folded & 0xffff) + (folded >> 16)) as u16);
    f[24..26].copy_from_slice(&csum.to_be_bytes());
    let mut m = Monitor::start(&c, 1, &[]);
    packet::send_raw(&attacker, "eth0", &f).unwrap();
    let events = m.collect(Duration::from_secs(2));
    let ev = events
        .iter()
        .find(|v| v["type"] == "drop")
        .unwrap_or_else(|| panic!("nothing reported: {events:#?}"));
    assert_eq!(ev["reason"], "drop_gro_device", "{ev}");
    assert_eq!(ev["hook"], "tc/gro-sink", "{ev}");
    assert_eq!(ev["iface"], "overlay-gro", "{ev}");
    assert_eq!(ev["inner"]["src"], nth_host(node1_subnet, 7).to_string(), "{ev}");
    assert_eq!(ev["inner"]["dst"], pods[1].to_string(), "{ev}");
    assert_eq!(ev["inner"]["dport"], 9999, "{ev}");
}
