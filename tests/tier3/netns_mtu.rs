//! Tier 3 (root): the MTU a real underlay interface has, end to end, on the underlays users run
//! (1400, GCP's 1460, AWS's 9001): subnet.env says the interface MTU − 50 and the pods get it;
//! over the IPv4 tunnel a DF packet of exactly that size arrives and one byte more is answered
//! with fragmentation-needed naming it; over the IPv6 tunnel (70 bytes of overhead) the same
//! with Packet Too Big at MTU − 70; bulk TCP crosses both. Nothing injects the MTU: the agent
//! reads it from `eth0`.
//!
//! Run: `cargo build -p overlay-agent && cargo test -p overlay-tests --test netns_mtu -- --test-threads=1`

use std::{net::IpAddr, time::Duration};

use overlay_tests::{
    cluster::{tcp_transfer, Cluster},
    dualstack::{bridge_and_pod, iperf6, nth6, try_wait_ipv6_subnets, wait_peers, DUAL},
    netns::{require_root, Netns},
    topology::nth_host,
};

/// `ping` (`-6` for IPv6) of one DF echo whose IP packet is `size` bytes; its whole output
/// (ping exits non-zero on an expired or refused echo: the output is the result here).
fn df_ping(from: &Netns, to: IpAddr, size: u32) -> String {
    let (v6, header) = match to {
        IpAddr::V4(_) => (false, 28),
        IpAddr::V6(_) => (true, 48),
    };
    let payload = (size - header).to_string();
    let to = to.to_string();
    let mut args = vec!["-c", "1", "-W", "2", "-M", "do", "-s", &payload, &to];
    if v6 {
        args.insert(0, "-6");
    }
    let out = from.command("ping").args(&args).output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn mtu_end_to_end(mtu: u32) {
    require_root();
    let mut c = Cluster::new(2, DUAL).expect("building the cluster");
    for (i, n) in c.nodes.iter_mut().enumerate() {
        n.node.add_underlay6().unwrap();
        let m = mtu.to_string();
        c.underlay
            .ns
            .ip(&["link", "set", &format!("p{}", i + 1), "mtu", &m])
            .unwrap();
        n.node.ns.ip(&["link", "set", "eth0", "mtu", &m]).unwrap();
    }
    for i in 0..2 {
        c.start_agent(i).unwrap();
    }
    let subnets = try_wait_ipv6_subnets(&c).unwrap();
    let (tunnel4, tunnel6) = (mtu - 50, mtu - 70);
    for i in 0..2 {
        let (_, env_mtu) = c.nodes[i].subnet_env().expect("subnet.env");
        assert_eq!(env_mtu, tunnel4, "node {i}: FLANNEL_MTU on a {mtu}-byte eth0");
    }
    let mut pods: Vec<Netns> = (0..2)
        .map(|i| bridge_and_pod(&mut c, i, subnets[i], true))
        .collect();
    wait_peers(&c);
    let pod_mtu: u32 =
        String::from_utf8_lossy(&pods[0].exec("cat", &["/sys/class/net/eth0/mtu"]).unwrap().stdout)
            .trim()
            .parse()
            .unwrap();
    assert_eq!(pod_mtu, tunnel4, "the pod's MTU, from subnet.env");

    let v4 = nth_host(c.nodes[1].subnet_env().unwrap().0.trunc(), 2);
    let v6 = nth6(subnets[1], 2);
    // First contact first (the pods and bridges are new: their link-local addresses are still
    // in DAD and neighbour discovery may take seconds), so the sizes below are all that is tested.
    for to in [IpAddr::from(v6), IpAddr::from(v4)] {
        let ok = Cluster::wait_for(Duration::from_secs(10), || {
            df_ping(&pods[0], to, 100).contains("1 received")
        });
        assert!(ok.is_some(), "{mtu}: pod 1 never reached pod 2 at {to}");
    }
    let out = df_ping(&pods[0], v6.into(), tunnel6);
    assert!(
        out.contains("1 received"),
        "{mtu}: a {tunnel6}-byte DF IPv6 packet must arrive:\n{out}"
    );
    let out = df_ping(&pods[0], v6.into(), tunnel6 + 1);
    assert!(
        out.contains(&format!("Packet too big: mtu={tunnel6}")),
        "{mtu}: one byte more over the IPv6 tunnel must get Packet Too Big naming {tunnel6}:\n{out}"
    );
    let out = df_ping(&pods[0], v4.into(), tunnel4);
    assert!(
        out.contains("1 received"),
        "{mtu}: a {tunnel4}-byte DF IPv4 packet must arrive:\n{out}"
    );
    // One byte more than the pod's own MTU: a pod that ignores subnet.env (its veth raised to
    // the underlay's MTU) hears from its node which size fits.
    let veth = overlay_tests::cluster::output(
        &c.nodes[0].node.ns,
        "ip",
        &["-o", "link", "show", "master", "cni0"],
    )
    .unwrap()
    .split(": ")
    .nth(1)
    .and_then(|n| n.split('@').next())
    .expect("the pod's veth on cni0")
    .to_string();
    c.nodes[0]
        .node
        .ns
        .ip(&["link", "set", &veth, "mtu", &mtu.to_string()])
        .unwrap();
    pods[0]
        .ip(&["link", "set", "eth0", "mtu", &mtu.to_string()])
        .unwrap();
    let out = df_ping(&pods[0], v4.into(), tunnel4 + 1);
    assert!(
        out.contains(&format!("Frag needed and DF set (mtu = {tunnel4})")),
        "{mtu}: one byte more over the IPv4 tunnel must get fragmentation-needed naming {tunnel4}:\n{out}"
    );
    pods[0]
        .ip(&["link", "set", "eth0", "mtu", &tunnel4.to_string()])
        .unwrap();

    let (client, server) = pods.split_at_mut(1);
    let (bps, _) = tcp_transfer(&mut server[0], v4, &client[0], 2).expect("bulk TCP over IPv4");
    assert!(bps > 1e7, "{mtu}: bulk TCP over IPv4 at {bps:.0} bit/s");
    let t = iperf6(&pods[1], v6, &pods[0], c.dir());
    assert!(t.bps > 1e7, "{mtu}: bulk TCP over IPv6 at {:.0} bit/s", t.bps);
}

#[test]
fn underlay_mtu_1400() {
    mtu_end_to_end(1400);
}

#[test]
fn underlay_mtu_1460() {
    mtu_end_to_end(1460);
}

#[test]
fn underlay_mtu_9001() {
    mtu_end_to_end(9001);
}
