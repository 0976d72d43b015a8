//! `overlay-agent monitor` under a flood of drops: a host on the underlay sends node 2 VXLAN
//! with a wrong VNI (from node 1's address, so decap drops it as `drop_wrong_vni`) at a fixed
//! rate while a monitor is attached, once with its default rate limit and once with the limit
//! out of the way. Measured: what was offered and dropped, what the monitor showed, what the
//! kernel kept back (rate limit, full ring) and whether the monitor said so, the monitor's CPU.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use overlay_agent::dataplane::pinned::read_pinned_counters;
use overlay_common::Counter;
use overlay_tests::{
    cluster::{agent_bin, Cluster},
    packet::{self, RawSender},
};
use serde::Serialize;

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The monitor's `--rate` (events/s per CPU).
    pub rate: u32,
    pub secs: f64,
    /// Frames sent per second.
    pub offered_pps: f64,
    /// `drop_wrong_vni` per second on node 2.
    pub dropped_pps: f64,
    /// Events the programs reported (`monitor_events`), per second.
    pub reported_pps: f64,
    /// Lines the monitor printed for them.
    pub shown: u64,
    /// `monitor_suppressed` + `monitor_lost`, and what the monitor said of them.
    pub kept_back: u64,
    pub said_kept_back: u64,
    /// Every drop reported or counted as kept back, and the monitor said exactly that.
    pub accounted: bool,
    /// The monitor process's CPU over the flood, % of one CPU.
    pub monitor_cpu_pct: f64,
}

/// CPU time (user + system) of `pid` so far, seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: state is 3rd, utime 14th, stime 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

struct Monitor(Child);

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The flood at `pps` for `secs`, once per rate limit.
pub fn run(pps: u64, secs: f64) -> Result<Vec<Row>> {
    let (c, pods) = Cluster::running(2, CONFIG).context("the two-node cluster")?;
    let attacker = c.outside_host("198.18.0.66".parse()?)?;
    let mut params = c.vxlan_from(0, 1, &attacker)?;
    params.vni = 2;
    let (node1_subnet, _) = c.nodes[0].subnet_env().context("node 1's subnet.env")?;
    let inner = packet::udp(
        overlay_tests::topology::nth_host(node1_subnet, 7),
        pods[1],
        5555,
        9999,
        &[0u8; 18],
    );
    let frame = packet::vxlan(&params, &inner);
    let sender = RawSender::open(&attacker, "eth0")?;
    let pin_root = c.nodes[1].pin_root.clone();
    let mut rows = Vec::new();
    for (rate, burst) in [(1000u32, 200u32), (10_000_000, 10_000_000)] {
        let out_path = c.dir().join(format!("monitor-{rate}.jsonl"));
        let out = std::fs::File::create(&out_path)?;
        let n = &c.nodes[1];
        let child = n
            .node
            .ns
            .command_net_only(agent_bin().to_str().context("agent path")?)
            .args(["monitor", "--json", "--pin-root", &pin_root])
            .args(["--rate", &rate.to_string(), "--burst", &burst.to_string()])
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()?;
        let mut mon = Monitor(child);
        let pid = mon.0.id();
        let attached = Cluster::wait_for(Duration::from_secs(5), || {
            std::fs::read_to_string(&out_path).is_ok_and(|s| s.contains("\"attached\""))
        });
        anyhow::ensure!(attached.is_some(), "the monitor did not attach");
        let before = read_pinned_counters(Path::new(&pin_root))?;
        let cpu0 = cpu_secs(pid);
        let t0 = Instant::now();
        let mut sent = 0u64;
        while t0.elapsed().as_secs_f64() < secs {
            // Batches of 64 on a schedule, so the rate holds whatever one send costs.
            let due = (t0.elapsed().as_secs_f64() * pps as f64) as u64;
            while sent < due {
                for _ in 0..64 {
                    sender.send(&frame)?;
                }
                sent += 64;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        let flood = t0.elapsed().as_secs_f64();
        // The monitor catches up and says what was kept back (once a second; and at its end).
        std::thread::sleep(Duration::from_millis(1500));
        let cpu = cpu_secs(pid) - cpu0;
        let span = t0.elapsed().as_secs_f64();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGINT,
        )?;
        let _ = mon.0.wait();
        let after = read_pinned_counters(Path::new(&pin_root))?;
        let d = |k: Counter| after.get(k) - before.get(k);
        let (mut shown, mut said) = (0u64, 0u64);
        for line in BufReader::new(std::fs::File::open(&out_path)?).lines() {
            let v: serde_json::Value = serde_json::from_str(&line?)?;
            match v["type"].as_str() {
                Some("drop") => shown += 1,
                Some("kept_back") => {
                    said += v["suppressed"].as_u64().unwrap_or(0) + v["lost"].as_u64().unwrap_or(0)
                }
                _ => {}
            }
        }
        let dropped = d(Counter::DropWrongVni);
        let reported = d(Counter::MonitorEvents);
        let kept_back = d(Counter::MonitorSuppressed) + d(Counter::MonitorLost);
        rows.push(Row {
            rate,
            secs: flood,
            offered_pps: sent as f64 / flood,
            dropped_pps: dropped as f64 / flood,
            reported_pps: reported as f64 / flood,
            shown,
            kept_back,
            said_kept_back: said,
            accounted: dropped == reported + kept_back && shown == reported && said == kept_back,
            monitor_cpu_pct: 100.0 * cpu / span,
        });
    }
    Ok(rows)
}

/// The rows as the report prints them.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "\nmonitor under a flood of drops (drop_wrong_vni at node 2, monitor attached with --json)\n",
    );
    s += &format!(
        "{:<14}{:>12}{:>12}{:>14}{:>10}{:>12}{:>12}{:>11}{:>14}\n",
        "--rate/CPU",
        "offered/s",
        "dropped/s",
        "reported/s",
        "shown",
        "kept back",
        "said",
        "accounted",
        "monitor CPU"
    );
    for r in rows {
        s += &format!(
            "{:<14}{:>12.0}{:>12.0}{:>14.0}{:>10}{:>12}{:>12}{:>11}{:>13.1}%\n",
            r.rate,
            r.offered_pps,
            r.dropped_pps,
            r.reported_pps,
            r.shown,
            r.kept_back,
            r.said_kept_back,
            if r.accounted { "yes" } else { "NO" },
            r.monitor_cpu_pct
        );
    }
    s
}
