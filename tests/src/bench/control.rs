//! Control-plane measurements against a real agent and etcd: 5,000 (`--peers`) leases → BPF
//! map with the agent running, one lease → map latency among them, a churn of 100 lease
//! changes a second with an etcd compaction and defrag half-way, RSS, the agent started over
//! 5,000 leases, and cold start → first forwarded ping.
//!
//! The fake nodes, the etcd JSON gateway and the reading of the pinned map are
//! `overlay_tests::scale`'s (the scale test's too).

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::Signal;
use overlay_tests::{
    cluster::Cluster,
    netns::Netns,
    scale::{self, cpu_seconds, rss_kb, wait_equal, Churn, ChurnStats, Gateway, LogSummary, PinnedPeers},
};

use crate::{interrupted, progress};

/// What the control-plane run does.
pub struct ControlOpts {
    pub peers: usize,
    pub probes: u32,
    /// Seconds of churn (0: none).
    pub churn_secs: f64,
}

/// Lease changes a second during the churn.
pub const CHURN_RATE: u32 = 100;

#[derive(Debug, Default)]
pub struct ControlResults {
    pub peers: usize,
    pub write_ms: f64,
    pub sync_ms: f64,
    pub lease_to_map_ms: Vec<f64>,
    pub rss_kb_idle: f64,
    pub rss_kb_peers: f64,
    pub churn: Option<ChurnResults>,
    /// The agent started (pins removed) over the leases → all of them in the map.
    pub start_ms: f64,
    pub started_peers: usize,
    pub rss_kb_started: f64,
}

#[derive(Debug, Default)]
pub struct ChurnResults {
    pub stats: ChurnStats,
    pub cpu_s: f64,
    pub log_lines: usize,
    /// The map exactly what etcd says after the churn: how long it took, or how many entries
    /// still differed 20 s later.
    pub converged_ms: Option<f64>,
    pub differences: usize,
    pub rss_kb: f64,
}

/// `n` leases → map with the agent running, `probes` single leases → map, the churn, and the
/// agent started over all of them; with the agent's RSS.
pub fn run(o: &ControlOpts) -> Result<ControlResults> {
    let mut r = ControlResults {
        peers: o.peers,
        ..Default::default()
    };
    let mut c = Cluster::new(1, scale::CONFIG)?;
    c.start_agent(0)?;
    let (own, _) = c.wait_lease(0, Duration::from_secs(20))?;
    let own = Some(own.trunc());
    let pid = c.nodes[0].agent_pid.context("agent pid")?;
    let map = PinnedPeers::open(pid, &c.nodes[0].pin_root, Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_millis(500));
    r.rss_kb_idle = rss_kb(pid)?;

    let n = o.peers;
    let live = scale::slots(0, n, own);
    let leases: Vec<scale::FakePeer> = live.iter().map(|&s| scale::peer(s, 0)).collect();
    let gw = Gateway { ns: &c.underlay.ns };
    let t0 = Instant::now();
    gw.put_all(&leases)?;
    r.write_ms = t0.elapsed().as_secs_f64() * 1e3;
    let want = leases.iter().map(|p| (p.subnet, p.view())).collect();
    match wait_equal(&map, &want, Duration::from_secs(60)) {
        Ok(_) => r.sync_ms = t0.elapsed().as_secs_f64() * 1e3,
        Err(d) => bail!(
            "{} of {n} peers differ 60 s after writing them, first {:?}; agent log:\n{}",
            d.len(),
            &d[..d.len().min(5)],
            c.agent_log(0)
        ),
    }
    progress(&format!(
        "control plane: {n} leases written in {:.0} ms, all in the BPF map after {:.0} ms",
        r.write_ms, r.sync_ms
    ));
    std::thread::sleep(Duration::from_millis(500));
    r.rss_kb_peers = rss_kb(pid)?;

    let probes = scale::slots(live.last().map_or(0, |s| s + 1), o.probes as usize, own);
    for &slot in &probes {
        if interrupted() {
            bail!("interrupted");
        }
        let p = scale::peer(slot, 0);
        let t = Instant::now();
        gw.put(&p)?;
        while map.get(p.subnet) != Some(p.view()) {
            if t.elapsed() > Duration::from_secs(5) {
                bail!("lease {} did not reach the map in 5 s", p.subnet);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        r.lease_to_map_ms.push(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(20));
    }

    if o.churn_secs > 0.0 {
        let live: Vec<u32> = live.iter().chain(&probes).copied().collect();
        let free = scale::slots(probes.last().map_or(0, |s| s + 1), 1000, own);
        r.churn = Some(churn(&c, &gw, &map, pid, &live, &free, o.churn_secs)?);
    }

    // Started over the leases, from nothing pinned (as on a node's first boot).
    let want = gw.leases(own)?;
    r.started_peers = want.len();
    c.stop_agent(0, Signal::SIGTERM);
    c.run_cleanup(0, &overlay_tests::cluster::agent_bin())?;
    let t0 = Instant::now();
    c.start_agent(0)?;
    let pid = c.nodes[0].agent_pid.context("agent pid")?;
    let map = PinnedPeers::open(pid, &c.nodes[0].pin_root, Duration::from_secs(10))?;
    match wait_equal(&map, &want, Duration::from_secs(60)) {
        Ok(_) => r.start_ms = t0.elapsed().as_secs_f64() * 1e3,
        Err(d) => bail!(
            "{} of {} peers differ 60 s after starting the agent, first {:?}",
            d.len(),
            want.len(),
            &d[..d.len().min(5)]
        ),
    }
    progress(&format!(
        "control plane: agent started over {} leases, all in the BPF map after {:.0} ms",
        want.len(),
        r.start_ms
    ));
    std::thread::sleep(Duration::from_millis(500));
    r.rss_kb_started = rss_kb(pid)?;
    Ok(r)
}

/// [`CHURN_RATE`] lease changes a second for `secs`, etcd compacted to its current revision
/// and defragmented half-way; then the map against etcd.
fn churn(
    c: &Cluster,
    gw: &Gateway,
    map: &PinnedPeers,
    pid: u32,
    live: &[u32],
    free: &[u32],
    secs: f64,
) -> Result<ChurnResults> {
    progress(&format!(
        "control plane: churn of {CHURN_RATE} lease changes/s for {secs:.0} s, compaction and defrag half-way"
    ));
    let mut churn = Churn::new(live, free);
    let (mark, cpu0) = (c.log_mark(0), cpu_seconds(pid)?);
    let stats = std::thread::scope(|s| -> Result<ChurnStats> {
        let runner = s.spawn(|| churn.run(gw, map, CHURN_RATE, secs));
        std::thread::sleep(Duration::from_secs_f64(secs / 2.0));
        let rev = gw.revision()?;
        c.etcdctl(&["compact", &rev.to_string()])?;
        c.etcdctl(&["defrag"])?;
        progress(&format!(
            "control plane: compacted at revision {rev}, defragmented"
        ));
        runner.join().expect("churn thread")
    })?;
    let mut r = ChurnResults {
        cpu_s: cpu_seconds(pid)? - cpu0,
        log_lines: LogSummary::of(&c.agent_log(0), mark).lines,
        ..Default::default()
    };
    let own = c.nodes[0].subnet_env().map(|(s, _)| s.trunc());
    let t = Instant::now();
    match wait_equal(map, &gw.leases(own)?, Duration::from_secs(20)) {
        Ok(_) => r.converged_ms = Some(t.elapsed().as_secs_f64() * 1e3),
        Err(d) => r.differences = d.len(),
    }
    r.rss_kb = rss_kb(pid)?;
    progress(&format!(
        "control plane: churn: {} changes in {:.1} s, put → map p99 {:.1} ms, {} unseen, agent CPU {:.2} s",
        stats.changes,
        stats.secs,
        scale::percentile(&stats.put_ms, 99.0),
        stats.unseen.len(),
        r.cpu_s
    ));
    r.stats = stats;
    Ok(r)
}

/// Cold start: stop node1's agent, remove its datapath with `overlay-agent cleanup`, start
/// it again and time until a pod on node1 first gets a ping answer from the pod on node2.
pub fn cold_start(c: &mut Cluster, client: usize, server_ip: IpAddr) -> Result<f64> {
    c.stop_agent(client, Signal::SIGTERM);
    // The datapath outlives the agent (pinned links, by design): clear it so the start is cold.
    let out = c
        .cleanup_command(client, &overlay_tests::cluster::agent_bin())?
        .output()?;
    if !out.status.success() {
        bail!(
            "overlay-agent cleanup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let pod: &Netns = &c.nodes[client].node.pods[0].ns;
    if pod
        .exec("ping", &["-c", "1", "-W", "0.5", "-q", &server_ip.to_string()])
        .is_ok()
    {
        bail!("pods still reach each other after stopping the agent and `overlay-agent cleanup`: not a cold start");
    }
    // One-shot pings, each waiting up to 50 ms, back to back from the moment the agent starts,
    // until one is answered (or 20 s). A single long-running `ping -c 1 -w 20` started before the agent
    // was seen never to get its answer here (its probes stopped reaching the bridge after the node
    // had answered "unreachable"), while a fresh ping right after was answered.
    let t0 = Instant::now();
    c.start_agent(client)?;
    let pod: &Netns = &c.nodes[client].node.pods[0].ns;
    let mut answered = false;
    while t0.elapsed() < Duration::from_secs(20) {
        if pod
            .exec("ping", &["-c", "1", "-W", "0.05", "-q", &server_ip.to_string()])
            .is_ok()
        {
            answered = true;
            break;
        }
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    if !answered {
        let pid = c.nodes[client].agent_pid.unwrap_or(0);
        bail!(
            "no ping answer within 20 s of starting the agent (pid {pid}; threads blocked in: {}; children: {}); log:\n{}",
            wchans(pid),
            children(pid),
            c.agent_log(client)
        );
    }
    Ok(ms)
}

/// Where each of the agent's threads sleeps in the kernel (diagnostics for a stalled start).
fn wchans(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "?".into();
    };
    let mut w: Vec<String> = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("wchan")).ok())
        .collect();
    w.sort();
    w.dedup();
    w.join(",")
}

/// The agent's child processes with their command lines (a hung helper shows here).
fn children(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "?".into();
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for k in kids.split_whitespace() {
            let cmd = std::fs::read_to_string(format!("/proc/{k}/cmdline"))
                .unwrap_or_default()
                .replace('\0', " ");
            out.push(format!("{k}: {}", cmd.trim()));
        }
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join("; ")
    }
}
