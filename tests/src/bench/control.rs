//! Control-plane measurements against a real agent and etcd: 1,000 leases → BPF map, one lease
//! → map latency, RSS, and cold start → first forwarded ping.
//!
//! Leases are written through etcd's v3 JSON gateway over plain HTTP (no extra crates); the map
//! is read in-process through `/proc/<agent>/root/<pin root>`, which resolves inside the agent's
//! own mount namespace (where `ip netns exec` gave it a private bpffs).

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::maps::{lpm_trie::Key, LpmTrie, Map, MapData};
use ipnet::Ipv4Net;
use nix::sys::signal::Signal;
use overlay_common::Peer;
use overlay_tests::{
    cluster::{Cluster, ETCD_IP, NETWORK_PREFIX},
    netns::Netns,
};

use crate::{interrupted, progress};

/// 4,096 /28s: room for 1,000 peers plus the latency probes.
pub const CONFIG_1K: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":28,"Backend":{"Type":"vxlan"}}"#;
const SUBNET_LEN: u8 = 28;

#[derive(Debug, Default)]
pub struct ControlResults {
    pub write_1k_ms: f64,
    pub sync_1k_ms: f64,
    pub lease_to_map_ms: Vec<f64>,
    pub rss_kb_idle: f64,
    pub rss_kb_1k: f64,
}

/// Minimal base64 (standard alphabet, padded) for the etcd JSON gateway.
fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One POST to etcd's JSON gateway (a fresh connection made inside the underlay namespace).
fn etcd_post(underlay: &Netns, path: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
    let mut s = {
        let _in = underlay.enter()?;
        TcpStream::connect((ETCD_IP, 2379)).context("connecting to etcd")?
    };
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let body = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {ETCD_IP}:2379\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, payload) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    if !head.starts_with("HTTP/1.1 200") {
        bail!("etcd {path}: {}", resp.chars().take(300).collect::<String>());
    }
    Ok(serde_json::from_str(payload.trim()).unwrap_or(serde_json::Value::Null))
}

fn lease_key(subnet: Ipv4Net) -> String {
    format!(
        "{NETWORK_PREFIX}/subnets/{}-{}",
        subnet.network(),
        subnet.prefix_len()
    )
}

/// flannel LeaseAttrs JSON for a fake vxlan peer number `i`.
fn lease_value(i: u32) -> String {
    let ip = Ipv4Addr::new(198, 18, 1 + (i / 250) as u8, 1 + (i % 250) as u8);
    let mac = format!(
        "0e:00:00:{:02x}:{:02x}:{:02x}",
        (i >> 16) as u8,
        (i >> 8) as u8,
        i as u8
    );
    format!(
        r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

fn put_op(subnet: Ipv4Net, i: u32) -> serde_json::Value {
    serde_json::json!({"requestPut": {"key": b64(lease_key(subnet).as_bytes()), "value": b64(lease_value(i).as_bytes())}})
}

/// Subnet number `i` of the /28 grid, skipping `own`.
fn nth_subnet(i: u32, own: Ipv4Net) -> Ipv4Net {
    let base = u32::from(Ipv4Addr::new(10, 244, 0, 0));
    let mut idx = i;
    let own_idx = (u32::from(own.network()) - base) >> (32 - SUBNET_LEN);
    if idx >= own_idx {
        idx += 1;
    }
    Ipv4Net::new(Ipv4Addr::from(base + (idx << (32 - SUBNET_LEN))), SUBNET_LEN).expect("valid /28")
}

/// The agent's pinned peer map, opened through its mount namespace.
fn open_peers(pid: u32, pin_root: &str) -> Result<LpmTrie<MapData, [u8; 4], Peer>> {
    let path = format!("/proc/{pid}/root{pin_root}/{}", overlay_common::maps::PEERS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {path}"))?;
    Ok(LpmTrie::try_from(Map::LpmTrie(data))?)
}

fn rss_kb(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

/// 1,000 leases → map, then `probes` single leases → map, with the agent's RSS.
pub fn run(probes: u32) -> Result<ControlResults> {
    let mut r = ControlResults::default();
    let mut c = Cluster::new(1, CONFIG_1K)?;
    c.start_agent(0)?;
    let (own, _) = c.wait_lease(0, Duration::from_secs(20))?;
    let own = own.trunc();
    let pid = c.nodes[0].agent_pid.context("agent pid")?;
    let pin_root = c.nodes[0].pin_root.clone();
    let peers = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match open_peers(pid, &pin_root) {
                Ok(m) => break m,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    };
    std::thread::sleep(Duration::from_millis(500));
    r.rss_kb_idle = rss_kb(pid)?;

    const N: u32 = 1000;
    // etcd allows 128 operations per transaction.
    let t0 = Instant::now();
    for chunk in (0..N).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<serde_json::Value> = chunk.iter().map(|&i| put_op(nth_subnet(i, own), i)).collect();
        etcd_post(
            &c.underlay.ns,
            "/v3/kv/txn",
            &serde_json::json!({ "success": ops }),
        )?;
    }
    r.write_1k_ms = t0.elapsed().as_secs_f64() * 1e3;
    let deadline = t0 + Duration::from_secs(30);
    loop {
        let n = peers.keys().filter(|k| k.is_ok()).count() as u32;
        if n >= N {
            r.sync_1k_ms = t0.elapsed().as_secs_f64() * 1e3;
            break;
        }
        if Instant::now() > deadline || interrupted() {
            bail!(
                "only {n} of {N} peers reached the map in 30 s; agent log:\n{}",
                c.agent_log(0)
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    progress(&format!(
        "control plane: {N} leases written in {:.0} ms, all in the BPF map after {:.0} ms",
        r.write_1k_ms, r.sync_1k_ms
    ));
    std::thread::sleep(Duration::from_millis(500));
    r.rss_kb_1k = rss_kb(pid)?;

    for k in 0..probes {
        if interrupted() {
            bail!("interrupted");
        }
        let i = N + k;
        let subnet = nth_subnet(i, own);
        let key = Key::new(u32::from(SUBNET_LEN), subnet.network().octets());
        let t = Instant::now();
        etcd_post(&c.underlay.ns, "/v3/kv/put", &put_op(subnet, i)["requestPut"])?;
        loop {
            if peers.get(&key, 0).is_ok() {
                r.lease_to_map_ms.push(t.elapsed().as_secs_f64() * 1e3);
                break;
            }
            if t.elapsed() > Duration::from_secs(5) {
                bail!("lease {subnet} did not reach the map in 5 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
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
