//! Tier 3 (root): two nodes running the real agent, pods made only by the real CNI bridge
//! plugin (`/usr/lib/cni/bridge` + `host-local`) with the config flannel's CNI plugin derives from
//! each node's subnet.env. The agent runs without `--ip-masq`, so the plugin installs its own
//! `MASQUERADE` rules for every pod (`ipMasq: true`), and it creates `cni0` itself, after the
//! agent started.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use overlay_tests::{
    cluster::{output, tcp_transfer, Cluster, EndpointSeen},
    cni::{CniNetwork, CniPod, BRIDGE, CNI_BIN_DIR},
    netns::{require_root, Netns},
    topology::{fmt_mac, nth_host, ping, ping_counts, Node},
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

/// Two nodes with their agents holding leases and knowing each other, and no `cni0` yet.
fn cluster() -> Cluster {
    require_root();
    for plugin in ["bridge", "host-local"] {
        let path = std::path::Path::new(CNI_BIN_DIR).join(plugin);
        assert!(
            path.exists(),
            "{} is missing: install Debian's containernetworking-plugins",
            path.display()
        );
    }
    let mut c = Cluster::new(2, CONFIG).expect("building the cluster");
    for i in 0..2 {
        c.start_agent(i).unwrap();
    }
    for i in 0..2 {
        c.wait_lease(i, Duration::from_secs(20)).unwrap();
        let known = Cluster::wait_for(Duration::from_secs(5), || {
            c.agent_peers(i).map(|p| p.len() == 1).unwrap_or(false)
        });
        assert!(
            known.is_some(),
            "node{} did not learn its peer; log:\n{}",
            i + 1,
            c.agent_log(i)
        );
    }
    c
}

/// One pod per node through the plugin (which creates `cni0` on the first ADD), and both
/// agents' encap attached to it: the cluster, each node's network, the pods (node order).
fn cluster_with_pods() -> (Cluster, Vec<CniNetwork>, Vec<CniPod>) {
    let c = cluster();
    let nets: Vec<CniNetwork> = (0..2)
        .map(|i| CniNetwork::from_subnet_env(&c.nodes[i].node.ns, &c.nodes[i].subnet_file).unwrap())
        .collect();
    let pods: Vec<CniPod> = nets.iter().map(|n| n.add().expect("CNI ADD")).collect();
    for i in 0..2 {
        assert_encap_attached(&c, i);
    }
    (c, nets, pods)
}

/// Waits up to 3 s for node `i`'s agent to attach encap to the `cni0` that exists now: its log
/// says so for that ifindex, and `status --json` lists the link on it.
fn assert_encap_attached(c: &Cluster, i: usize) {
    let ifindex = c.nodes[i].node.ns.ifindex(BRIDGE).unwrap();
    let want = format!("ifindex={ifindex}");
    let logged = Cluster::wait_for(Duration::from_secs(3), || {
        c.agent_log(i).lines().any(|l| {
            l.contains("encap attached") && l.contains(&format!("bridge={BRIDGE}")) && l.ends_with(&want)
        })
    });
    assert!(
        logged.is_some(),
        "node{}: no \"encap attached\" for {BRIDGE} (ifindex {ifindex}) within 3 s; log:\n{}",
        i + 1,
        c.agent_log(i)
    );
    let st = c.status_json(i).unwrap();
    let on_bridge = st["attachments"].as_array().into_iter().flatten().any(|a| {
        a["program"] == "overlay_encap"
            && a["iface"] == BRIDGE
            && a["ifindex"].as_u64() == Some(u64::from(ifindex))
            && a["iface_present"] == true
            && a["ours"] == true
    });
    assert!(
        on_bridge,
        "node{}: status lists no overlay_encap link on {BRIDGE} ({ifindex}):\n{st:#}",
        i + 1
    );
}

/// What node `i`'s endpoint map should list for `pod`: its host veth (index and name in the
/// node), the MAC of its `eth0`, the bridge's MAC.
fn endpoint_of(c: &Cluster, i: usize, pod: &CniPod) -> EndpointSeen {
    let node = &c.nodes[i].node.ns;
    EndpointSeen {
        ip: pod.ip,
        ifindex: node.ifindex(&pod.veth).unwrap(),
        iface: Some(pod.veth.clone()),
        mac: fmt_mac(&pod.ns.mac("eth0").unwrap()),
        gw_mac: fmt_mac(&node.mac(BRIDGE).unwrap()),
    }
}

/// Waits up to `timeout` until node `i`'s endpoint map is exactly `want`; how long it took.
fn wait_endpoints(c: &Cluster, i: usize, want: &[EndpointSeen], timeout: Duration) -> Duration {
    let mut seen = Vec::new();
    let took = Cluster::wait_for(timeout, || {
        seen = c.agent_endpoints(i).unwrap_or_default();
        seen == want
    });
    took.unwrap_or_else(|| {
        panic!(
            "node{}'s endpoint map should be exactly its pods within {timeout:?}\n  want {want:?}\n  seen \
             {seen:?}\nlog:\n{}",
            i + 1,
            c.agent_log(i)
        )
    })
}

/// Packets counted on the plugin's `POSTROUTING` jump for `pod` in the node's nat table (the
/// rule `-s <pod>/32 -j CNI-…` that leads to its `MASQUERADE`); `None` when there is no such
/// rule. The nat table sees a connection's first packet only.
fn masq_jump_packets(node: &Netns, pod: Ipv4Addr) -> Option<u64> {
    let text = output(
        node,
        "iptables",
        &["-t", "nat", "-L", "POSTROUTING", "-n", "-v", "-x"],
    )
    .unwrap();
    // "  pkts bytes target     prot opt in out source        destination"
    text.lines()
        .find(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 7 && f[2].starts_with("CNI-") && f[7] == pod.to_string()
        })
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
}

/// The plugin's chain for `pod` ends in `MASQUERADE` for everything but its own subnet.
fn assert_plugin_masquerades(node: &Netns, pod: &CniPod, subnet: ipnet::Ipv4Net) {
    let rules = output(node, "iptables", &["-t", "nat", "-S"]).unwrap();
    let jump = rules
        .lines()
        .find(|l| l.starts_with(&format!("-A POSTROUTING -s {}/32", pod.ip)))
        .unwrap_or_else(|| panic!("no plugin rule for {} in POSTROUTING:\n{rules}", pod.ip));
    let chain = jump.rsplit(' ').next().unwrap();
    let own = format!("-A {chain} -d {subnet} ");
    let masq = format!("-A {chain} ! -d 224.0.0.0/4 ");
    assert!(
        rules
            .lines()
            .any(|l| l.starts_with(&own) && l.ends_with("-j ACCEPT"))
            && rules
                .lines()
                .any(|l| l.starts_with(&masq) && l.ends_with("-j MASQUERADE")),
        "the plugin's chain {chain} for {} should accept {subnet} and masquerade the rest:\n{rules}",
        pod.ip
    );
}

#[test]
fn the_plugin_builds_cni0_after_the_agent_started_encap_attaches_and_pods_ping_both_ways() {
    let c = cluster();
    for i in 0..2 {
        assert!(
            c.nodes[i].node.ns.ip(&["link", "show", BRIDGE]).is_err(),
            "node{} has a {BRIDGE} before any CNI ADD",
            i + 1
        );
    }
    let nets: Vec<CniNetwork> = (0..2)
        .map(|i| CniNetwork::from_subnet_env(&c.nodes[i].node.ns, &c.nodes[i].subnet_file).unwrap())
        .collect();
    let pods: Vec<CniPod> = nets.iter().map(|n| n.add().expect("CNI ADD")).collect();
    for i in 0..2 {
        // The plugin did what flannel's config asks: the lease's first address on cni0 with the
        // tunnel MTU, the pod in the lease behind it, routes to the network and by default.
        let env = nets[i].env();
        let subnet = env.subnet.trunc();
        let (pod, node) = (&pods[i], &c.nodes[i].node.ns);
        assert!(
            subnet.contains(&pod.ip) && pod.ip != env.subnet.addr() && pod.prefix_len == subnet.prefix_len(),
            "node{}: host-local gave {}/{} in {subnet}",
            i + 1,
            pod.ip,
            pod.prefix_len
        );
        assert_eq!(pod.gateway, Some(env.subnet.addr()), "{:#}", pod.result);
        let addr = output(node, "ip", &["-o", "-4", "addr", "show", "dev", BRIDGE]).unwrap();
        assert!(
            addr.contains(&format!("inet {} ", env.subnet)),
            "node{}: {BRIDGE} should hold {}: {addr}",
            i + 1,
            env.subnet
        );
        let mtu = output(node, "cat", &[&format!("/sys/class/net/{}/mtu", pod.veth)]).unwrap();
        assert_eq!(
            mtu.trim(),
            env.mtu.to_string(),
            "node{}: MTU of {}",
            i + 1,
            pod.veth
        );
        let routes = output(&pod.ns, "ip", &["-4", "route"]).unwrap();
        assert!(
            routes.contains(&format!("default via {}", env.subnet.addr()))
                && routes.contains(&format!("10.244.0.0/16 via {}", env.subnet.addr())),
            "pod {}: routes {routes}",
            pod.ip
        );
        assert_encap_attached(&c, i);
    }

    for (a, b) in [(0, 1), (1, 0)] {
        let counts = ping_counts(&pods[a].ns, pods[b].ip, 5, None);
        assert_eq!(
            counts,
            Some((5, 5)),
            "pod {} (node{}) → pod {} (node{}): (sent, answered)",
            pods[a].ip,
            a + 1,
            pods[b].ip,
            b + 1
        );
        // The largest DF packet the plugin's MTU allows: MTU − 20 (IP) − 8 (ICMP).
        let size = nets[a].env().mtu - 28;
        assert!(
            ping(&pods[a].ns, pods[b].ip, 2, Some(size)),
            "pod {} → pod {}: {size}-byte DF pings lost",
            pods[a].ip,
            pods[b].ip
        );
    }

    // Through the routes the plugin set up: a pod reaches the other node itself at its overlay
    // address (the subnet's .0 on overlay0), and each node reaches the other node's pod.
    for (a, b) in [(0, 1), (1, 0)] {
        let remote_node = nth_host(nets[b].env().subnet.trunc(), 0);
        assert_eq!(
            ping_counts(&pods[a].ns, remote_node, 3, None),
            Some((3, 3)),
            "pod {} → node{}'s overlay address {remote_node}: (sent, answered)",
            pods[a].ip,
            b + 1
        );
        assert_eq!(
            ping_counts(&c.nodes[a].node.ns, pods[b].ip, 3, None),
            Some((3, 3)),
            "node{} → pod {} on node{}: (sent, answered)",
            a + 1,
            pods[b].ip,
            b + 1
        );
    }

    // The agent changed nothing the plugin owns: its CHECK still passes.
    for pod in &pods {
        pod.check()
            .unwrap_or_else(|e| panic!("CNI CHECK of pod {} after the agent attached: {e:#}", pod.ip));
    }
}

#[test]
fn pod_source_ips_survive_the_plugins_masquerade_and_bulk_tcp_flows_both_ways() {
    let (mut c, nets, mut pods) = cluster_with_pods();
    for i in 0..2 {
        assert_plugin_masquerades(&c.nodes[i].node.ns, &pods[i], nets[i].env().subnet.trunc());
    }
    let before = masq_jump_packets(&c.nodes[0].node.ns, pods[0].ip);
    assert_eq!(
        before,
        Some(0),
        "node1's nat table saw pod {} before any traffic",
        pods[0].ip
    );

    // Bulk TCP each way; the server reports the peer it accepted.
    for client in [0, 1] {
        let (lo, hi) = pods.split_at_mut(1);
        let (cl, sv) = if client == 0 {
            (&lo[0], &mut hi[0])
        } else {
            (&hi[0], &mut lo[0])
        };
        let (bps, seen) = tcp_transfer(&mut sv.ns, sv.ip, &cl.ns, 2).unwrap();
        println!(
            "pod {} → pod {}: {:.0} Mbit/s, server saw {seen}",
            cl.ip,
            sv.ip,
            bps / 1e6
        );
        assert!(
            bps > 100e6,
            "bulk TCP pod {} → pod {} reached only {bps:.0} bit/s",
            cl.ip,
            sv.ip
        );
        assert_eq!(
            seen,
            cl.ip.to_string(),
            "pod {} saw its peer as {seen}, not as the sending pod {} (node{} has the plugin's MASQUERADE \
             for it)",
            sv.ip,
            cl.ip,
            client + 1
        );
    }
    // Not one pod-to-pod connection went through node1's nat POSTROUTING.
    assert_eq!(
        masq_jump_packets(&c.nodes[0].node.ns, pods[0].ip),
        Some(0),
        "pod {}'s overlay traffic passed node1's nat table (where the plugin masquerades it)",
        pods[0].ip
    );

    // Negative control: the same pod to node2's underlay address leaves through node1's stack,
    // and the plugin's rule rewrites it to node1's address; the checks above could fail.
    let node2 = Node::underlay_ip(2);
    let (_, seen) = tcp_transfer(&mut c.nodes[1].node.ns, node2, &pods[0].ns, 1).unwrap();
    assert_eq!(
        seen,
        Node::underlay_ip(1).to_string(),
        "pod {} → node2 {node2} off the overlay should be masqueraded by the plugin's rule",
        pods[0].ip
    );
    let after = masq_jump_packets(&c.nodes[0].node.ns, pods[0].ip).unwrap_or(0);
    assert!(
        after > 0,
        "the masqueraded connection was not counted on the plugin's rule"
    );
}

#[test]
fn a_pod_deleted_and_re_added_through_the_plugin_is_reached_at_once_and_the_endpoint_map_follows() {
    let (c, nets, mut pods) = cluster_with_pods();
    // Traffic from node2's pod: node1 resolves its pod, the agent makes it an endpoint.
    assert!(
        ping(&pods[1].ns, pods[0].ip, 3, None),
        "pod → pod before any restart"
    );
    let first = endpoint_of(&c, 0, &pods[0]);
    wait_endpoints(
        &c,
        0,
        std::slice::from_ref(&first),
        overlay_agent::node::bridge::RESYNC_EVERY + Duration::from_secs(1),
    );

    // Round 1: a new pod with the next address; round 2: one that asks for the first pod's
    // address back (host-local hands out freed addresses again once it wraps).
    let mut previous = first.clone();
    for (round, want_ip) in [(1, None), (2, Some(first.ip))] {
        let (old_ip, old_veth) = (pods[0].ip, pods[0].veth.clone());
        drop(pods.remove(0));
        let node = &c.nodes[0].node.ns;
        assert!(
            node.ip(&["link", "show", &old_veth]).is_err(),
            "round {round}: CNI DEL left {old_veth} behind"
        );
        assert_eq!(
            masq_jump_packets(node, old_ip),
            None,
            "round {round}: CNI DEL left the MASQUERADE rule of {old_ip}"
        );
        let gone = wait_endpoints(&c, 0, &[], Duration::from_secs(1));
        println!("round {round}: endpoint {old_ip} left the map {gone:?} after CNI DEL returned");

        let pod = match want_ip {
            Some(ip) => nets[0].add_with_ip(ip),
            None => nets[0].add(),
        }
        .unwrap_or_else(|e| panic!("round {round}: CNI ADD: {e:#}"));
        let added = Instant::now();
        if let Some(ip) = want_ip {
            assert_eq!(pod.ip, ip, "round {round}: host-local ignored IP={ip}");
        }
        pods.insert(0, pod);
        let reached = Cluster::wait_for(Duration::from_secs(3), || ping(&pods[1].ns, pods[0].ip, 1, None));
        let Some(_) = reached else {
            panic!(
                "round {round}: the re-added pod {} (veth {}) was not reachable from node2 within 3 s; log:\n{}",
                pods[0].ip,
                pods[0].veth,
                c.agent_log(0)
            )
        };
        println!(
            "round {round}: pod {} on {} answered {:?} after CNI ADD returned",
            pods[0].ip,
            pods[0].veth,
            added.elapsed()
        );
        for (a, b) in [(1, 0), (0, 1)] {
            assert_eq!(
                ping_counts(&pods[a].ns, pods[b].ip, 5, None),
                Some((5, 5)),
                "round {round}: pod {} → pod {}: (sent, answered)",
                pods[a].ip,
                pods[b].ip
            );
        }
        let now = endpoint_of(&c, 0, &pods[0]);
        assert_ne!(
            now.ifindex, previous.ifindex,
            "round {round}: the new veth reuses the old ifindex"
        );
        let took = wait_endpoints(&c, 0, std::slice::from_ref(&now), Duration::from_secs(2));
        println!("round {round}: endpoint map lists {now:?} (checked {took:?} after the pings)");
        previous = now;
    }
}
