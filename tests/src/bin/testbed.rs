//! `cargo xtask run`: a local etcd and netns nodes running the agent with pods on their bridges.
//! Prints the leases, proves cross-node ping and a TCP transfer (with a MASQUERADE rule on the
//! sender, showing the source IP the far pod saw), then stays up until Ctrl-C.
//!
//! `--backend host-gw`: flanneld's host-gw config instead of vxlan; the per-peer routes the
//! agents wrote are printed too.
//!
//! `--docker`: each node runs a real Docker daemon (in its namespace, started with the options
//! `overlay-agent docker-opts` wrote) and the agent attaches to `docker0`; busybox containers
//! take the pods' place, with Docker's own MASQUERADE rule on.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Result};
use overlay_tests::{
    cluster::{tcp_transfer, use_release_agent, Cluster},
    docker::{self, Dockerd},
    netns::require_root,
    topology::ping,
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let exit_after = args.iter().any(|a| a == "--exit-after-checks");
    let nodes: u8 = args
        .iter()
        .position(|a| a == "--nodes")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(2);
    if nodes < 2 {
        bail!("--nodes must be at least 2 to show cross-node traffic");
    }
    let docker = args.iter().any(|a| a == "--docker");
    let config = match args
        .iter()
        .position(|a| a == "--backend")
        .and_then(|i| args.get(i + 1))
    {
        None => CONFIG,
        Some(b) if b == "vxlan" => CONFIG,
        Some(b) if b == "host-gw" => HOST_GW,
        Some(b) => bail!("--backend {b}: the agent implements vxlan and host-gw"),
    };
    require_root();
    let agent = use_release_agent()?;
    println!("==> agent binary: {}", agent.display());
    // Ctrl-C at any point tears the cluster down (its guards run when main returns).
    let stop = Arc::new(AtomicBool::new(false));
    ctrlc_wait(stop.clone());
    let check = || -> Result<()> {
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted; tearing down");
        }
        Ok(())
    };

    println!("==> etcd on the underlay (198.18.0.1:2379), network config: {config}");
    let mut c = Cluster::new(nodes, config)?;
    check()?;
    if docker {
        return docker_demo(c, exit_after, &stop);
    }
    println!("==> starting {nodes} agents (logs under {})", c.dir().display());
    for i in 0..c.nodes.len() {
        c.start_agent(i)?;
    }
    let mut pods = Vec::new();
    for i in 0..c.nodes.len() {
        let ips = c.add_pods(i, 1)?;
        let (subnet, mtu) = c.nodes[i].subnet_env().unwrap();
        println!(
            "    node{} (198.18.0.{}): lease {subnet}, MTU {mtu}, pod {}",
            i + 1,
            11 + i,
            ips[0]
        );
        pods.push(ips[0]);
    }
    check()?;
    println!("==> leases in etcd:");
    for line in c.leases()?.lines() {
        println!("    {line}");
    }
    // Give every agent a moment to learn every peer from its watch.
    std::thread::sleep(Duration::from_millis(500));
    if config == HOST_GW {
        println!("==> node1's routes to the other nodes' pods (flanneld's host-gw routes):");
        let routes =
            overlay_tests::cluster::output(&c.nodes[0].node.ns, "ip", &["route", "show", "10.244.0.0/16"])?;
        for line in routes.lines().filter(|l| l.contains(" via ")) {
            println!("    {line}");
        }
    }

    check()?;
    let mut failures = 0;
    println!("==> all-pairs ping between pods");
    for a in 0..c.nodes.len() {
        for b in 0..c.nodes.len() {
            if a == b {
                continue;
            }
            let ok = ping(&c.nodes[a].node.pods[0].ns, pods[b], 3, None);
            println!(
                "    {} -> {}: {}",
                pods[a],
                pods[b],
                if ok { "ok" } else { "FAILED" }
            );
            failures += usize::from(!ok);
        }
    }

    println!(
        "==> MASQUERADE on node1 (as Docker/CNI add it), then a 3 s TCP transfer node1 pod -> node2 pod"
    );
    c.masquerade_like_docker(0)?;
    let (first, rest) = c.nodes.split_at_mut(1);
    let (bps, seen) = tcp_transfer(
        &mut rest[0].node.pods[0].ns,
        pods[1],
        &first[0].node.pods[0].ns,
        3,
    )?;
    println!(
        "    throughput {:.2} Gbit/s; the far pod saw the connection come from {seen}",
        bps / 1e9
    );
    if bps <= 0.0 {
        println!("    FAILED: no data arrived");
        failures += 1;
    }
    if seen != pods[0].to_string() {
        println!("    FAILED: the source IP was rewritten (expected {})", pods[0]);
        failures += 1;
    } else {
        println!("    source IP kept: {seen} is the sending pod's own address");
    }

    check()?;
    let try_this = format!(
        "ip netns exec {} ping {}",
        c.nodes[0].node.pods[0].ns.name, pods[1]
    );
    finish(&c, failures, exit_after, &stop, &try_this)
}

/// Fails with the agents' logs when a check failed; otherwise returns (`--exit-after-checks`)
/// or keeps the cluster up until Ctrl-C, suggesting `try_this`.
fn finish(c: &Cluster, failures: usize, exit_after: bool, stop: &AtomicBool, try_this: &str) -> Result<()> {
    if failures > 0 {
        for i in 0..c.nodes.len() {
            eprintln!("--- agent log node{} ---\n{}", i + 1, c.agent_log(i));
        }
        bail!("{failures} check(s) failed");
    }
    println!("==> all checks passed");
    if exit_after {
        return Ok(());
    }
    println!("==> cluster stays up; Ctrl-C to tear it down. Try:\n    {try_this}");
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("==> tearing down");
    Ok(())
}

/// The demo on Docker nodes. `c` has its nodes but no agent yet; the daemons are dropped before
/// the cluster (they run in its namespaces).
fn docker_demo(mut c: Cluster, exit_after: bool, stop: &AtomicBool) -> Result<()> {
    let interrupted = || -> Result<()> {
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted; tearing down");
        }
        Ok(())
    };
    println!(
        "==> starting {} agents on docker0 (logs under {})",
        c.nodes.len(),
        c.dir().display()
    );
    for i in 0..c.nodes.len() {
        c.nodes[i]
            .extra_args
            .extend(["--bridge".to_string(), "docker0".to_string()]);
        c.start_agent(i)?;
    }
    let mut daemons = Vec::new();
    let mut containers = Vec::new();
    for i in 0..c.nodes.len() {
        let (subnet, mtu) = c.wait_lease(i, Duration::from_secs(20))?;
        interrupted()?;
        let d = Dockerd::new(&c.nodes[i].node.ns, &c.nodes[i].subnet_file)?;
        let ct = d.run(&format!("c{}", i + 1))?;
        println!(
            "    node{}: lease {subnet}, MTU {mtu}; dockerd {}; container {} at {}",
            i + 1,
            d.opts().join(" "),
            ct.name,
            ct.ip
        );
        daemons.push(d);
        containers.push(ct);
    }
    for i in 0..c.nodes.len() {
        c.wait_log_after(i, 0, "encap attached", Duration::from_secs(10));
    }
    interrupted()?;
    let mut failures = 0;
    println!("==> all-pairs ping between containers");
    for a in 0..containers.len() {
        for b in 0..containers.len() {
            if a == b {
                continue;
            }
            let got = daemons[a].ping(&containers[a], containers[b].ip, 3);
            let ok = got == Some((3, 3));
            println!(
                "    {} -> {}: {}",
                containers[a].ip,
                containers[b].ip,
                if ok {
                    "ok".to_string()
                } else {
                    format!("FAILED {got:?}")
                }
            );
            failures += usize::from(!ok);
        }
    }
    println!(
        "==> a 3 s TCP transfer {} -> {}",
        containers[0].name, containers[1].name
    );
    let t = docker::tcp_transfer(&containers[1], &containers[0], 3)?;
    println!(
        "    throughput {:.2} Gbit/s; {} saw the connection come from {}",
        t.bits_per_second / 1e9,
        containers[1].name,
        t.client_seen
    );
    if t.client_seen != containers[0].ip.to_string() {
        println!(
            "    FAILED: Docker's MASQUERADE rewrote the source (expected {})",
            containers[0].ip
        );
        failures += 1;
    } else {
        println!("    source IP kept under Docker's MASQUERADE rule");
    }
    let try_this = format!(
        "/usr/bin/docker -H unix://{} exec {} ping {}",
        daemons[0].socket().display(),
        containers[0].name,
        containers[1].ip
    );
    let done = finish(&c, failures, exit_after, stop, &try_this);
    // The daemons run in the cluster's namespaces: they go first.
    drop(daemons);
    done
}

/// Sets `flag` on SIGINT/SIGTERM.
fn ctrlc_wait(flag: Arc<AtomicBool>) {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    let _ = FLAG.set(flag);
    extern "C" fn on_signal(_: i32) {
        if let Some(f) = FLAG.get() {
            f.store(true, Ordering::Relaxed);
        }
    }
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        let _ = sigaction(Signal::SIGINT, &action);
        let _ = sigaction(Signal::SIGTERM, &action);
    }
}
