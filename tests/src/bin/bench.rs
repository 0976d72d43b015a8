//! `cargo xtask bench`: the BPF overlay against plain routing (flannel host-gw, the testbed's
//! physical limit) and the kernel's VXLAN device set up as flanneld does it, on a veth underlay
//! and on one that behaves like real NICs (segmentation on send, GRO on receive). IPv6 too: the
//! agent on a dual-stack network against flanneld's `flannel-v6.1`, IPv6 pods over an IPv6
//! underlay.
//!
//! All cases stay up side by side (each on its own underlay segment) and are measured in
//! alternation, round after round, so background noise hits them alike. Then a real agent gets
//! 5,000 leases (`--peers`) and a churn for the control-plane numbers (`--control-only`: just
//! those). Output: a table, target/bench/*.json, an SVG.
//! Everything lives in namespaces owned by guards, torn down on error and on Ctrl-C.

#[path = "../bench/beds.rs"]
mod beds;
#[path = "../bench/control.rs"]
mod control;
#[path = "../bench/monitor.rs"]
mod monitor;
#[path = "../bench/report.rs"]
mod report;
#[path = "../bench/traffic.rs"]
mod traffic;

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        OnceLock,
    },
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use beds::{Bed, Case, Flavour};
use overlay_tests::netns::require_root;
use report::Samples;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static START: OnceLock<Instant> = OnceLock::new();

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

pub fn progress(msg: &str) {
    let t = START.get_or_init(Instant::now).elapsed().as_secs();
    eprintln!("[{:>2}:{:02}] {msg}", t / 60, t % 60);
}

struct Opts {
    rounds: u32,
    secs: u32,
    rr_secs: u32,
    probes: u32,
    control: bool,
    /// The monitor under a flood of drops (`monitor.rs`).
    monitor: bool,
    peers: usize,
    churn_secs: f64,
    cases: Vec<Case>,
}

fn parse_args() -> Result<Opts> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut o = if quick {
        Opts {
            rounds: 1,
            secs: 1,
            rr_secs: 1,
            probes: 20,
            control: true,
            monitor: true,
            peers: 1000,
            churn_secs: 10.0,
            cases: Case::default_cases(),
        }
    } else {
        Opts {
            rounds: 3,
            secs: 3,
            rr_secs: 2,
            probes: 50,
            control: true,
            monitor: true,
            peers: 5000,
            churn_secs: 60.0,
            cases: Case::default_cases(),
        }
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> Result<u32> {
            it.next()
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{name} needs a number"))
        };
        match a.as_str() {
            "--quick" => {}
            "--rounds" => o.rounds = num("--rounds")?,
            "--secs" => o.secs = num("--secs")?,
            "--no-control" => o.control = false,
            "--control-only" => {
                o.cases.clear();
                o.monitor = false;
            }
            "--no-monitor" => o.monitor = false,
            "--monitor-only" => {
                o.cases.clear();
                o.control = false;
            }
            "--peers" => o.peers = num("--peers")? as usize,
            "--churn-secs" => o.churn_secs = f64::from(num("--churn-secs")?),
            "--cases" => {
                let list = it.next().context("--cases needs a list, e.g. host-gw,bpf-tc")?;
                o.cases = list
                    .split(',')
                    .map(|n| Case::by_name(n).with_context(|| format!("--cases: no case {n:?}")))
                    .collect::<Result<_>>()?;
            }
            "--data-only" => {
                o.control = false;
                o.monitor = false;
            }
            "--help" | "-h" => {
                println!(
                    "bench [--quick] [--rounds N] [--secs N] [--no-control | --control-only] [--no-monitor | --monitor-only] [--peers N] [--churn-secs N] [--cases {}]",
                    Case::ALL.map(Case::name).join(",")
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(o)
}

/// Sets INTERRUPTED on SIGINT/SIGTERM; the run stops at the next step and guards clean up.
fn on_signals() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    extern "C" fn handler(_: i32) {
        INTERRUPTED.store(true, Ordering::Relaxed);
    }
    let action = SigAction::new(SigHandler::Handler(handler), SaFlags::empty(), SigSet::empty());
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        let _ = sigaction(Signal::SIGINT, &action);
        let _ = sigaction(Signal::SIGTERM, &action);
    }
}

fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted: tearing everything down");
    }
    Ok(())
}

fn sh(cmd: &str) -> String {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() -> Result<()> {
    START.get_or_init(Instant::now);
    let o = parse_args()?;
    require_root();
    on_signals();
    let agent = overlay_tests::cluster::use_release_agent()?;
    for tool in ["iperf3", "ethtool", "etcd", "ping", "ss", "timeout"] {
        if !overlay_tests::cluster::have(tool) {
            bail!("{tool} is not installed (cargo xtask setup installs the toolchain)");
        }
    }
    let out_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let out_dir = out_dir.canonicalize()?;
    let meta = serde_json::json!({
        "date": sh("date -u +%Y-%m-%dT%H:%M:%SZ"),
        "nproc": sh("nproc"),
        "kernel": sh("uname -r"),
        "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
        "loadavg_start": sh("cat /proc/loadavg"),
        "rounds": o.rounds,
        "secs": o.secs,
        "rr_secs": o.rr_secs,
        "agent": agent.display().to_string(),
    });
    let load = meta["loadavg_start"].as_str().unwrap_or("?");
    if o.cases.is_empty() {
        progress(&format!("control plane only; load {load}"));
    } else {
        progress(&format!(
            "{} round(s) × {} underlays × {} cases; {} s per transfer; load {load}",
            o.rounds,
            Flavour::ALL.len(),
            o.cases.len(),
            o.secs,
        ));
    }

    let mut samples = Samples::default();
    let mut errors = Vec::new();
    let mut cold = Vec::new();
    {
        let mut beds = Vec::new();
        for &c in &o.cases {
            check_interrupt()?;
            progress(&format!("building {} testbed", c.name()));
            beds.push(Bed::new(c).with_context(|| format!("building the {} testbed", c.name()))?);
        }
        for round in 0..o.rounds {
            for f in Flavour::ALL {
                for b in &beds {
                    b.set_flavour(f)?;
                }
                // Rotate the order each round so no case always runs first (or right after another).
                let n = beds.len();
                for k in 0..n {
                    check_interrupt()?;
                    let bed = &mut beds[(k + round as usize) % n];
                    measure(bed, f, &o, round, &mut samples, &mut errors);
                }
            }
            check_interrupt()?;
            if let Some(xdp) = beds.iter_mut().find(|b| b.case == Case::BpfXdp) {
                xdp.set_flavour(Flavour::Veth)?;
                let ip = xdp.server_ip;
                match control::cold_start(xdp.cluster().expect("agents"), 0, ip) {
                    Ok(ms) => {
                        progress(&format!(
                            "round {}: bpf-xdp cold start → first forwarded ping {ms:.0} ms",
                            round + 1
                        ));
                        cold.push(ms);
                    }
                    Err(e) => {
                        progress(&format!("cold start failed: {e:#}"));
                        errors.push(format!("cold start: {e:#}"));
                    }
                }
            }
        }
        if !beds.is_empty() {
            progress("tearing down the data-plane testbeds");
        }
    }
    check_interrupt()?;
    let cp = if o.control {
        progress(&format!("control plane: one agent, {} leases", o.peers));
        let co = control::ControlOpts {
            peers: o.peers,
            probes: o.probes,
            churn_secs: o.churn_secs,
        };
        match control::run(&co) {
            Ok(cp) => Some(cp),
            Err(e) => {
                progress(&format!("control plane failed: {e:#}"));
                errors.push(format!("control plane: {e:#}"));
                None
            }
        }
    } else {
        None
    };

    check_interrupt()?;
    let mon = if o.monitor {
        progress("monitor: 100k drops/s offered, default rate limit, then none");
        match monitor::run(100_000, 5.0) {
            Ok(rows) => Some(rows),
            Err(e) => {
                progress(&format!("monitor flood failed: {e:#}"));
                errors.push(format!("monitor flood: {e:#}"));
                None
            }
        }
    } else {
        None
    };

    let mut table = report::table(&samples, o.rounds, cp.as_ref(), &cold);
    if let Some(rows) = &mon {
        table += &monitor::table(rows);
    }
    println!("{table}");
    if !errors.is_empty() {
        println!("\nfailed runs ({}):", errors.len());
        for e in &errors {
            println!("  {e}");
        }
    }
    let mut json = report::json(&samples, cp.as_ref(), &cold, &errors, meta.clone());
    if let Some(rows) = &mon {
        json["monitor_flood"] = serde_json::to_value(rows)?;
    }
    let stamp = meta["date"].as_str().unwrap_or("run").replace(':', "");
    let text = serde_json::to_string_pretty(&json)?;
    std::fs::write(out_dir.join(format!("bench-{stamp}.json")), &text)?;
    std::fs::write(out_dir.join("latest.json"), &text)?;
    std::fs::write(out_dir.join("latest.txt"), &table)?;
    let title = format!(
        "overlay-agent vs host-gw — {} ({} CPUs, kernel {})",
        meta["date"].as_str().unwrap_or(""),
        meta["nproc"].as_str().unwrap_or("?"),
        meta["kernel"].as_str().unwrap_or("?")
    );
    std::fs::write(out_dir.join("latest.svg"), report::svg(&samples, &title))?;
    progress(&format!(
        "wrote {0}/latest.json, {0}/bench-{stamp}.json, {0}/latest.svg, {0}/latest.txt",
        out_dir.display()
    ));
    Ok(())
}

/// One case on one underlay flavour: TCP 1 and 4 flows, UDP 64 B, ping-pong. A failed run is
/// recorded as NaN (shown as FAIL) with its error, never dropped.
fn measure(bed: &mut Bed, f: Flavour, o: &Opts, round: u32, s: &mut Samples, errors: &mut Vec<String>) {
    let case = bed.case;
    let ip = bed.server_ip;
    let tag = format!(
        "round {}/{} {:<13} {:<12}",
        round + 1,
        o.rounds,
        f.name(),
        case.name()
    );
    let mut fail = |what: &str, e: anyhow::Error| {
        let msg = format!("{tag} {what}: {e:#}");
        progress(&msg);
        errors.push(msg);
    };
    let bed_vip = match bed.add_service() {
        Ok(v) => Some(v),
        Err(e) => {
            s.push(f, case, "svc_tcp1_gbps", f64::NAN);
            fail("adding the Service", e);
            None
        }
    };
    let (client, server) = bed.pods();
    let mut line = Vec::new();
    for (flows, g, c, r) in [
        (1, "tcp1_gbps", "cpu1_s_per_gbit", "retr1"),
        (4, "tcp4_gbps", "cpu4_s_per_gbit", "retr4"),
    ] {
        match traffic::tcp(server, ip, client, o.secs, flows) {
            Ok(t) => {
                s.push(f, case, g, t.gbps);
                s.push(f, case, c, t.cpu_s_per_gbit);
                s.push(f, case, r, t.retransmits);
                line.push(format!(
                    "tcp×{flows} {:.2} Gbit/s ({:.0} retr)",
                    t.gbps, t.retransmits
                ));
            }
            Err(e) => {
                for m in [g, c, r] {
                    s.push(f, case, m, f64::NAN);
                }
                fail(&format!("TCP {flows} flow(s)"), e);
            }
        }
    }
    match bed_vip.map(|vip| traffic::tcp_via(server, ip, vip, client, o.secs, 1)) {
        Some(Ok(t)) => {
            s.push(f, case, "svc_tcp1_gbps", t.gbps);
            line.push(format!("svc tcp×1 {:.2} Gbit/s", t.gbps));
        }
        Some(Err(e)) => {
            s.push(f, case, "svc_tcp1_gbps", f64::NAN);
            fail("TCP 1 flow via a ClusterIP", e);
        }
        None => {}
    }
    match traffic::udp64(server, ip, client, o.secs) {
        Ok(pps) => {
            s.push(f, case, "udp64_kpps", pps / 1e3);
            line.push(format!("udp64 {:.0} kpps", pps / 1e3));
        }
        Err(e) => {
            s.push(f, case, "udp64_kpps", f64::NAN);
            fail("UDP 64 B", e);
        }
    }
    match traffic::rr(server, ip, client, o.rr_secs) {
        Ok(r) => {
            s.push(f, case, "rr_mean_us", r.mean_us);
            s.push(f, case, "rr_p99_us", r.p99_us);
            line.push(format!("rr {:.1}/{:.1} µs", r.mean_us, r.p99_us));
        }
        Err(e) => {
            s.push(f, case, "rr_mean_us", f64::NAN);
            s.push(f, case, "rr_p99_us", f64::NAN);
            fail("TCP RR", e);
        }
    }
    progress(&format!("{tag} {}", line.join(", ")));
}
