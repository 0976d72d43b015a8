//! Tier 3 (root): real Docker on the nodes. Each node runs the agent with `--bridge docker0` and
//! a `dockerd` started with the options `overlay-agent docker-opts` writes from its subnet.env
//! (flannel's mk-docker-opts.sh: `--bip`, `--ip-masq=true`, `--mtu`), so Docker's own
//! MASQUERADE rule is on; busybox containers on two nodes talk across the overlay.
//!
//! Run: `cargo build -p overlay-agent && cargo test -p overlay-tests --test netns_docker -- --test-threads=1`

use std::{net::Ipv4Addr, process::Command, time::Duration};

use ipnet::Ipv4Net;
use nix::sys::signal::Signal;
use overlay_tests::{
    cluster::{output, Cluster},
    docker::{peer_seen_by, tcp_transfer, Container, Dockerd},
    netns::require_root,
    topology::{fmt_mac, nth_host},
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
/// Pings per direction; every one must be answered.
const PINGS: u32 = 5;
const PORT: u16 = 7000;

/// A two-node cluster whose agents attach to `docker0`, and the nodes' Docker daemons. Fields
/// drop in order: the daemons before the namespaces they run in.
struct DockerNodes {
    docker: Vec<Dockerd>,
    c: Cluster,
}

impl DockerNodes {
    /// Two nodes, agents configured with `--bridge docker0` and `agent_args`, none started.
    fn new(agent_args: &[&str]) -> Self {
        require_root();
        let mut c = Cluster::new(2, CONFIG).expect("building the cluster");
        for n in &mut c.nodes {
            n.extra_args.extend(
                ["--bridge", "docker0"]
                    .iter()
                    .chain(agent_args)
                    .map(|s| s.to_string()),
            );
        }
        DockerNodes {
            docker: Vec::new(),
            c,
        }
    }

    /// Starts node `i`'s agent; its subnet (the network, `10.244.7.0/24`) once it holds a lease.
    fn start_agent(&mut self, i: usize) -> Ipv4Net {
        self.c.start_agent(i).expect("starting the agent");
        self.c
            .wait_lease(i, Duration::from_secs(20))
            .expect("agent lease")
            .0
            .trunc()
    }

    /// Both agents, then both daemons (the order of a node booting with systemd).
    fn start_all(agent_args: &[&str]) -> (Self, [Ipv4Net; 2]) {
        let mut d = Self::new(agent_args);
        let subnets = [d.start_agent(0), d.start_agent(1)];
        d.start_docker(0);
        d.start_docker(1);
        d.wait_peers();
        (d, subnets)
    }

    /// Starts node `i`'s dockerd (pushed to `docker` in start order: start node 0's first).
    fn start_docker(&mut self, i: usize) {
        assert_eq!(self.docker.len(), i, "start the daemons in node order");
        let n = &self.c.nodes[i];
        let d = Dockerd::new(&n.node.ns, &n.subnet_file)
            .unwrap_or_else(|e| panic!("node {}: starting dockerd: {e:#}", i + 1));
        self.docker.push(d);
    }

    /// Waits until each agent knows the other node.
    fn wait_peers(&self) {
        for i in 0..2 {
            let ok = Cluster::wait_for(Duration::from_secs(10), || {
                self.c.agent_peers(i).map(|p| p.len() == 1).unwrap_or(false)
            });
            assert!(
                ok.is_some(),
                "node {} did not learn its peer; log:\n{}",
                i + 1,
                self.c.agent_log(i)
            );
        }
    }

    /// Waits until node `i`'s agent logged "encap attached" for docker0's current ifindex
    /// after `mark` (a log offset); that ifindex.
    fn wait_encap_on_docker0(&self, i: usize, mark: usize) -> u32 {
        let ifindex = self.c.nodes[i]
            .node
            .ns
            .ifindex("docker0")
            .expect("docker0 on the node");
        let want = format!("ifindex={ifindex}");
        let found = Cluster::wait_for(Duration::from_secs(10), || {
            self.c
                .agent_log(i)
                .get(mark..)
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains("encap attached") && l.split_whitespace().any(|w| w == want))
        });
        assert!(
            found.is_some(),
            "node {}: no \"encap attached\" for docker0 (ifindex {ifindex}) within 10 s; log since the mark:\n{}",
            i + 1,
            self.c.agent_log(i).get(mark..).unwrap_or_default()
        );
        ifindex
    }

    /// Runs container `name` on node `i`.
    fn run(&self, i: usize, name: &str) -> Container {
        self.docker[i]
            .run(name)
            .unwrap_or_else(|e| panic!("node {}: docker run {name}: {e:#}", i + 1))
    }

    /// `PINGS` pings from `from` (on node `i`) to `to`; every one must be answered.
    fn assert_pings(&self, i: usize, from: &Container, to: &Container) {
        let counts = self.docker[i].ping(from, to.ip, PINGS);
        assert_eq!(
            counts,
            Some((PINGS, PINGS)),
            "container {} ({}) on node {} → {} ({}): (sent, answered) of {PINGS} pings\nnode 1 agent log:\n{}\nnode 2 agent log:\n{}",
            from.name,
            from.ip,
            i + 1,
            to.name,
            to.ip,
            self.c.agent_log(0),
            self.c.agent_log(1),
        );
    }

    /// The client address a TCP server in `server` (node `si`) sees for a connection from
    /// `client` (node `ci`).
    /// Container `a` on node 0 and `b` on node 1: every ping answered each way, and a new TCP
    /// connection each way arrives from the client container's own address (not its node's,
    /// which Docker's MASQUERADE would substitute if the packet were routed).
    fn assert_talk_both_ways(&self, a: &Container, b: &Container) {
        self.assert_pings(0, a, b);
        self.assert_pings(1, b, a);
        assert_eq!(
            self.peer_seen(1, b, 0, a),
            a.ip,
            "b saw a's connection come from another address: source rewritten"
        );
        assert_eq!(
            self.peer_seen(0, a, 1, b),
            b.ip,
            "a saw b's connection come from another address: source rewritten"
        );
    }

    fn peer_seen(&self, si: usize, server: &Container, ci: usize, client: &Container) -> Ipv4Addr {
        let mut nc = self.docker[ci].nc_command(client, server.ip, PORT);
        peer_seen_by(&self.docker[si], server, PORT, &mut nc).unwrap_or_else(|e| {
            panic!(
                "TCP {} (node {}) → {} (node {}): {e:#}",
                client.name,
                ci + 1,
                server.name,
                si + 1
            )
        })
    }

    fn iptables(&self, i: usize, args: &[&str]) -> String {
        output(&self.c.nodes[i].node.ns, "iptables", args)
            .unwrap_or_else(|e| panic!("node {}: iptables {}: {e:#}", i + 1, args.join(" ")))
    }
}

#[test]
fn containers_on_two_nodes_talk_with_their_own_addresses() {
    let (d, subnets) = DockerNodes::start_all(&[]);
    for (i, subnet) in subnets.iter().enumerate() {
        // mk-docker-opts.sh's options from the agent's subnet.env: the lease's first address
        // as the bridge IP, Docker's masquerading on (the agent's --ip-masq is off), tunnel MTU.
        let want = [
            format!("--bip={}/24", nth_host(*subnet, 1)),
            "--ip-masq=true".to_string(),
            "--mtu=1450".to_string(),
        ];
        assert_eq!(d.docker[i].opts(), want, "node {}: docker-opts", i + 1);
        let nat = d.iptables(i, &["-t", "nat", "-S", "POSTROUTING"]);
        let rule = format!("-A POSTROUTING -s {subnet} ! -o docker0 -j MASQUERADE");
        assert!(
            nat.lines().any(|l| l == rule),
            "node {}: Docker's MASQUERADE rule {rule:?} is missing:\n{nat}",
            i + 1
        );
        d.wait_encap_on_docker0(i, 0);
    }
    let a = d.run(0, "ca");
    let b = d.run(1, "cb");
    for (c, s) in [(&a, subnets[0]), (&b, subnets[1])] {
        assert!(
            s.contains(&c.ip),
            "container {} got {} outside its node's lease {s}",
            c.name,
            c.ip
        );
    }

    d.assert_talk_both_ways(&a, &b);
    // The check can tell sources apart: a connection from node 1 itself (routed via overlay0)
    // arrives from a node address, not a container's.
    let node = &d.c.nodes[0].node.ns;
    let mut from_node = Command::new("ip");
    from_node.args([
        "netns",
        "exec",
        &node.name,
        "busybox",
        "nc",
        "-w",
        "3",
        &b.ip.to_string(),
        &PORT.to_string(),
    ]);
    let seen = peer_seen_by(&d.docker[1], &b, PORT, &mut from_node).expect("TCP node 1 → b");
    assert_ne!(
        seen, a.ip,
        "a connection from node 1 itself looked like container a's"
    );
    assert!(
        seen == Ipv4Addr::new(198, 18, 0, 11) || seen == subnets[0].network(),
        "node 1 → b came from {seen}: neither node 1's underlay address nor its overlay0 address"
    );

    // Bulk TCP a → b.
    let t = tcp_transfer(&b, &a, 3).expect("iperf3 a → b");
    println!(
        "bulk TCP a → b: {} MB in 3 s, {:.0} Mbit/s",
        t.bytes / 1_000_000,
        t.bits_per_second / 1e6
    );
    assert!(
        t.bytes >= 30_000_000,
        "bulk TCP across the overlay between containers moved only {} bytes in 3 s ({:.1} Mbit/s)",
        t.bytes,
        t.bits_per_second / 1e6
    );
    assert_eq!(
        t.client_seen,
        a.ip.to_string(),
        "the iperf3 server in b must see a's own address"
    );
}

#[test]
fn docker_started_before_the_agent_and_after_it() {
    let mut d = DockerNodes::new(&[]);
    // Node 1: an agent run takes the lease and writes subnet.env while there is no docker0
    // (so nothing is attached to it), then stops; Docker starts from that subnet.env and runs
    // a container; only then does the agent start again, finding docker0 already there (an
    // agent restart or upgrade on a Docker node, or a Docker unit not ordered after it).
    let s0 = d.start_agent(0);
    d.c.wait_log_after(0, 0, "holding lease", Duration::from_secs(10))
        .expect("the first agent run holds its lease");
    d.c.stop_agent(0, Signal::SIGTERM);
    let first_run = d.c.agent_log(0);
    assert!(
        !first_run.contains("encap attached"),
        "the first agent run attached encap though there was no docker0:\n{first_run}"
    );
    d.start_docker(0);
    let a = d.run(0, "ca");
    let mark = d.c.log_mark(0);
    let again = d.start_agent(0);
    assert_eq!(again, s0, "node 1's agent changed its subnet across the restart");
    // Node 2: the agent first, then Docker (the systemd order).
    let s1 = d.start_agent(1);
    d.start_docker(1);
    let b = d.run(1, "cb");
    d.wait_peers();
    d.wait_encap_on_docker0(0, mark);
    d.wait_encap_on_docker0(1, 0);
    assert!(
        s0.contains(&a.ip) && s1.contains(&b.ip),
        "a {} in {s0}, b {} in {s1}",
        a.ip,
        b.ip
    );

    d.assert_talk_both_ways(&a, &b);
}

/// FORWARD policy DROP on both nodes, then fresh containers: the first packets go to a
/// container that has not sent anything yet, so the agent cannot have learned it from the
/// node's neighbour table and decap hands them to the node's stack, through FORWARD.
fn containers_talk_with_forward_policy_drop(agent_args: &[&str]) {
    let (d, _) = DockerNodes::start_all(agent_args);
    for i in 0..2 {
        d.iptables(i, &["-P", "FORWARD", "DROP"]);
        let fwd = d.iptables(i, &["-S", "FORWARD"]);
        assert!(
            fwd.lines().next() == Some("-P FORWARD DROP"),
            "node {}: FORWARD policy not DROP:\n{fwd}",
            i + 1
        );
        d.wait_encap_on_docker0(i, 0);
    }
    let a = d.run(0, "ca");
    let b = d.run(1, "cb");
    let dump = |d: &DockerNodes| {
        (0..2)
            .map(|i| {
                format!(
                    "node {} FORWARD:\n{}",
                    i + 1,
                    d.iptables(i, &["-v", "-n", "-L", "FORWARD"])
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    // a → b first: b is silent until a's packets reach it, so node 2's agent has not learned it.
    let known = d.c.agent_endpoints(1).expect("node 2 endpoints");
    assert!(
        !known.iter().any(|e| e.ip == b.ip),
        "premise: node 2's agent should not know b before it sent anything: {known:?}"
    );
    let counts = d.docker[0].ping(&a, b.ip, PINGS);
    assert_eq!(
        counts,
        Some((PINGS, PINGS)),
        "a → b (b silent so far) with FORWARD policy DROP: (sent, answered)\n{}",
        dump(&d)
    );
    d.assert_pings(1, &b, &a);
    assert_eq!(d.peer_seen(1, &b, 0, &a), a.ip, "TCP a → b");
    assert_eq!(d.peer_seen(0, &a, 1, &b), b.ip, "TCP b → a");
}

#[test]
fn forward_policy_drop_containers_still_talk() {
    containers_talk_with_forward_policy_drop(&[]);
}

#[test]
fn forward_policy_drop_containers_still_talk_with_deliver_stack() {
    // Every decapsulated packet goes through the node's stack and FORWARD chain.
    containers_talk_with_forward_policy_drop(&["--deliver", "stack"]);
}

#[test]
fn docker_restart_recreating_docker0_gets_encap_again() {
    let (mut d, _) = DockerNodes::start_all(&[]);
    let old = d.wait_encap_on_docker0(0, 0);
    d.wait_encap_on_docker0(1, 0);
    let a = d.run(0, "ca");
    let b = d.run(1, "cb");
    d.assert_pings(0, &a, &b);

    // Docker stops (its containers with it); docker0 goes, as after a reboot or when an
    // operator deletes it to change --bip; Docker starts again and makes a new docker0.
    let mark = d.c.log_mark(0);
    d.docker[0].stop();
    let ns = &d.c.nodes[0].node.ns;
    let left = ns.ip(&["link", "show", "docker0"]).is_ok();
    println!("Docker left docker0 behind when it stopped: {left}");
    if left {
        ns.ip(&["link", "del", "docker0"]).expect("deleting docker0");
    }
    // Let the agent see the bridge gone (it polls every 500 ms).
    let gone =
        d.c.wait_log_after(0, mark, "pod bridge not there yet", Duration::from_secs(5));
    d.docker[0].start().expect("starting dockerd again");
    let a2 = d.run(0, "ca2");
    let new = d.wait_encap_on_docker0(0, mark);
    assert_ne!(new, old, "docker0 was not recreated (same ifindex)");
    println!("docker0 ifindex {old} → {new}; agent saw it gone: {gone:?}");

    let st = d.c.status_json(0).expect("status --json");
    let encaps: Vec<&serde_json::Value> = st["attachments"]
        .as_array()
        .expect("status has no attachments list")
        .iter()
        .filter(|a| a["program"] == "overlay_encap")
        .collect();
    assert!(
        encaps.iter().any(|a| a["iface"] == "docker0"
            && a["ifindex"].as_u64() == Some(u64::from(new))
            && a["iface_present"] == true),
        "status lists no encap on the new docker0 (ifindex {new}): {encaps:?}"
    );
    assert!(
        !encaps
            .iter()
            .any(|a| a["ifindex"].as_u64() == Some(u64::from(old))),
        "status still lists encap on the old docker0 (ifindex {old}): {encaps:?}"
    );

    d.assert_pings(0, &a2, &b);
    d.assert_pings(1, &b, &a2);
    assert_eq!(
        d.peer_seen(1, &b, 0, &a2),
        a2.ip,
        "TCP a2 → b (source kept: encap on the new docker0)"
    );

    // Node 1's local endpoints: only a2, on its live veth, with the new docker0's MAC as the
    // source of delivered frames (nothing left of the old container or bridge).
    let bridge_mac = fmt_mac(&d.c.nodes[0].node.ns.mac("docker0").expect("docker0 MAC"));
    let eps = d.c.agent_endpoints(0).expect("status endpoints");
    assert!(
        eps.len() == 1 && eps[0].ip == a2.ip && eps[0].iface.is_some() && eps[0].gw_mac == bridge_mac,
        "node 1 endpoints after the Docker restart should be a2 ({}) behind docker0 ({bridge_mac}): {eps:?}",
        a2.ip
    );
}
