//! Data-plane measurements between two pods: iperf3 TCP and UDP, a TCP ping-pong, and the CPU
//! the whole machine spent in sys + softirq while a transfer ran (/proc/stat).

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::Signal;
use overlay_tests::netns::Netns;

/// Kernel USER_HZ: /proc/stat counts in these.
const USER_HZ: f64 = 100.0;
const RR_PORT: u16 = 7777;
const RR_SIZE: usize = 64;

/// One TCP throughput run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tcp {
    pub gbps: f64,
    pub retransmits: f64,
    /// CPU-seconds (sys + softirq, all CPUs) per Gbit delivered.
    pub cpu_s_per_gbit: f64,
}

/// sys + softirq jiffies over all CPUs.
fn sys_softirq() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    // cpu user nice system idle iowait irq softirq ...
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if f.len() < 7 {
        bail!("unexpected /proc/stat line: {cpu}");
    }
    Ok(f[2] + f[6])
}

/// Starts a one-shot iperf3 server bound to `ip` in `server` and waits until it listens.
fn iperf_server(server: &mut Netns, ip: IpAddr) -> Result<u32> {
    let mut srv = server.command("iperf3");
    srv.args(["-s", "-1", "-B", &ip.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let pid = server.spawn(srv)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let ss = server.exec("ss", &["-Hltn", "sport", "= :5201"])?;
        if !ss.stdout.is_empty() {
            return Ok(pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill(pid, Signal::SIGKILL);
    bail!("iperf3 server did not listen within 5 s")
}

/// Runs an iperf3 client (with a hard timeout) against a fresh server; returns its JSON.
fn iperf(
    server: &mut Netns,
    ip: IpAddr,
    client: &Netns,
    secs: u32,
    extra: &[&str],
) -> Result<serde_json::Value> {
    iperf_via(server, ip, ip, client, secs, extra)
}

/// [`iperf`] with the client connecting to `to` (a Service address DNATed to `ip`).
fn iperf_via(
    server: &mut Netns,
    ip: IpAddr,
    to: IpAddr,
    client: &Netns,
    secs: u32,
    extra: &[&str],
) -> Result<serde_json::Value> {
    let pid = iperf_server(server, ip)?;
    let limit = (secs + 10).to_string();
    let (ips, s) = (to.to_string(), secs.to_string());
    let mut args = vec![
        &limit[..],
        "iperf3",
        "-c",
        &ips,
        "-t",
        &s,
        "-J",
        "--connect-timeout",
        "3000",
    ];
    args.extend_from_slice(extra);
    let out = client
        .command("timeout")
        .args(&args)
        .stdin(Stdio::null())
        .output();
    server.kill(pid, Signal::SIGKILL);
    let out = out.context("running iperf3")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 printed no JSON ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    Ok(v)
}

/// TCP throughput with `flows` parallel streams for `secs` seconds.
pub fn tcp(server: &mut Netns, ip: IpAddr, client: &Netns, secs: u32, flows: u32) -> Result<Tcp> {
    tcp_via(server, ip, ip, client, secs, flows)
}

/// [`tcp`] to the server at `ip` through address `to` (a ClusterIP the client's node DNATs).
pub fn tcp_via(
    server: &mut Netns,
    ip: IpAddr,
    to: IpAddr,
    client: &Netns,
    secs: u32,
    flows: u32,
) -> Result<Tcp> {
    let p = flows.to_string();
    let before = sys_softirq()?;
    let v = iperf_via(server, ip, to, client, secs, &["-P", &p])?;
    let cpu_s = (sys_softirq()? - before) as f64 / USER_HZ;
    let recv = &v["end"]["sum_received"];
    let bps = recv["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON without end.sum_received")?;
    let seconds = recv["seconds"].as_f64().unwrap_or(f64::from(secs));
    let gbit = bps * seconds / 1e9;
    Ok(Tcp {
        gbps: bps / 1e9,
        retransmits: v["end"]["sum_sent"]["retransmits"].as_f64().unwrap_or(0.0),
        // Below 0.1 Gbit/s (a stalled transfer) the ratio says nothing: leave it out.
        cpu_s_per_gbit: if gbit > 0.1 * seconds {
            cpu_s / gbit
        } else {
            f64::NAN
        },
    })
}

/// UDP 64-byte payloads at full speed; returns packets per second that arrived.
pub fn udp64(server: &mut Netns, ip: IpAddr, client: &Netns, secs: u32) -> Result<f64> {
    let v = iperf(server, ip, client, secs, &["-u", "-l", "64", "-b", "0"])?;
    // The client's end.sum carries the server's view: packets sent, and how many were lost.
    let sum = &v["end"]["sum"];
    let packets = sum["packets"]
        .as_f64()
        .context("iperf3 UDP JSON without end.sum.packets")?;
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let seconds = sum["seconds"].as_f64().unwrap_or(f64::from(secs));
    Ok((packets - lost).max(0.0) / seconds)
}

/// TCP request/response latency in microseconds: (mean, p99).
#[derive(Clone, Copy, Debug, Default)]
pub struct Rr {
    pub mean_us: f64,
    pub p99_us: f64,
}

/// 64-byte ping-pong over one TCP connection (TCP_NODELAY) for `secs` seconds, one request in
/// flight: server thread in `server`'s namespace, client on this thread inside `client`'s.
pub fn rr(server: &Netns, ip: IpAddr, client: &Netns, secs: u32) -> Result<Rr> {
    let addr = SocketAddr::from((ip, RR_PORT));
    let listener = {
        let _in = server.enter()?;
        TcpListener::bind(addr).with_context(|| format!("binding {addr} in {}", server.name))?
    };
    let srv = std::thread::spawn(move || -> Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut buf = [0u8; RR_SIZE];
        loop {
            match s.read_exact(&mut buf) {
                Ok(()) => s.write_all(&buf)?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    });
    let mut stream = {
        let _in = client.enter()?;
        TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .with_context(|| format!("connecting to {addr}"))?
    };
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [7u8; RR_SIZE];
    let mut samples: Vec<u32> = Vec::with_capacity(200_000);
    let warmup = 200;
    let start = Instant::now();
    let end = start + Duration::from_secs(u64::from(secs));
    let mut i = 0u64;
    loop {
        let t = Instant::now();
        if t >= end {
            break;
        }
        stream.write_all(&buf)?;
        stream.read_exact(&mut buf).context("ping-pong reply")?;
        if i >= warmup {
            samples.push(t.elapsed().as_nanos() as u32);
        }
        i += 1;
    }
    drop(stream);
    srv.join()
        .map_err(|_| anyhow::anyhow!("ping-pong server panicked"))??;
    if samples.is_empty() {
        bail!("no ping-pong round trips completed");
    }
    let mean = samples.iter().map(|&x| f64::from(x)).sum::<f64>() / samples.len() as f64;
    samples.sort_unstable();
    let p99 = samples[(samples.len() * 99 / 100).min(samples.len() - 1)];
    Ok(Rr {
        mean_us: mean / 1e3,
        p99_us: f64::from(p99) / 1e3,
    })
}

/// The median of `v` (NaN when empty); NaNs (failed runs) sort last and are excluded.
pub fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Percentile `p` (0..=100) of `v` by nearest rank (the scale test's too).
pub use overlay_tests::scale::percentile;
