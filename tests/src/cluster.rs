//! A whole cluster in namespaces: an underlay segment with etcd on it, node namespaces running the
//! real `overlay-agent` binary, and a CNI-style `cni0` bridge with pods built from each node's
//! subnet.env, the way the flannel CNI plugin does it.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use ipnet::Ipv4Net;
use nix::sys::signal::Signal;

use crate::{
    netns::{unique_name, Netns},
    topology::{Node, Underlay},
};

/// etcd listens on the underlay bridge's address.
pub const ETCD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// etcd's IPv6 address on the underlay, for nodes without IPv4.
pub const ETCD_IP6: &str = "fd00:198:18::1";
pub const NETWORK_PREFIX: &str = "/coreos.com/network";
pub const UNDERLAY_MTU: u32 = 1500;

/// The agent binary under test: `$OVERLAY_AGENT_BIN`, else the workspace's debug build.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("OVERLAY_AGENT_BIN") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/overlay-agent")
}

/// The variable naming the previous release's agent (`cargo xtask prev-release` prints it).
pub const PREV_AGENT_ENV: &str = "OVERLAY_PREV_AGENT_BIN";

/// The previous release's binary from `$OVERLAY_PREV_AGENT_BIN`, for upgrade tests; panics
/// (never a silent skip) when it is unset, unreadable, or the binary under test itself.
pub fn previous_agent_bin() -> &'static std::path::Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let p = std::env::var_os(PREV_AGENT_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                panic!(
                    "{PREV_AGENT_ENV} is not set: it must name the previous release's overlay-agent. \
                 `cargo xtask test` builds it and sets it; alone: \
                 {PREV_AGENT_ENV}=$(cargo xtask prev-release | tail -1) cargo test ..."
                )
            });
        let prev = std::fs::read(&p).unwrap_or_else(|e| panic!("{PREV_AGENT_ENV}={}: {e}", p.display()));
        let cur = std::fs::read(agent_bin())
            .unwrap_or_else(|e| panic!("{}: {e} (cargo build -p overlay-agent)", agent_bin().display()));
        assert!(
            prev != cur,
            "{PREV_AGENT_ENV}={} is the binary under test itself: an upgrade from it proves nothing",
            p.display()
        );
        p
    })
}

/// Makes [`agent_bin`] the workspace's release build unless `$OVERLAY_AGENT_BIN` names one (the
/// demo and the benchmark run what `cargo xtask run/bench` built); fails when it is missing.
pub fn use_release_agent() -> Result<PathBuf> {
    if std::env::var_os("OVERLAY_AGENT_BIN").is_none() {
        let release = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/overlay-agent");
        std::env::set_var("OVERLAY_AGENT_BIN", &release);
    }
    let agent = agent_bin();
    if !agent.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p overlay-agent` (cargo xtask \
             run and bench do)",
            agent.display()
        );
    }
    Ok(agent)
}

/// One node of the cluster and its agent.
pub struct AgentNode {
    pub node: Node,
    pub agent_pid: Option<u32>,
    pub subnet_file: PathBuf,
    pub log_file: PathBuf,
    /// bpffs directory the agent pins into (inside the agent's own mount namespace).
    pub pin_root: String,
    /// Extra flags for the agent.
    pub extra_args: Vec<String>,
    /// Extra environment variables for the agent (e.g. `NOTIFY_SOCKET`).
    pub extra_env: Vec<(String, String)>,
    /// The binary [`Cluster::start_agent`] runs on this node (another release's, for upgrade
    /// tests); `None`: [`agent_bin`].
    pub agent_bin: Option<PathBuf>,
    /// The etcd endpoint this node's agent uses; `None`: [`Cluster::etcd_endpoint`].
    pub etcd_endpoint: Option<String>,
}

impl AgentNode {
    /// This node's lease as the agent wrote it to subnet.env: (subnet, MTU).
    pub fn subnet_env(&self) -> Option<(Ipv4Net, u32)> {
        let text = std::fs::read_to_string(&self.subnet_file).ok()?;
        let mut subnet = None;
        let mut mtu = None;
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("FLANNEL_SUBNET=") {
                subnet = v.trim().parse::<Ipv4Net>().ok();
            }
            if let Some(v) = line.strip_prefix("FLANNEL_MTU=") {
                mtu = v.trim().parse().ok();
            }
        }
        Some((subnet?, mtu?))
    }
}

/// Underlay + etcd + nodes. Everything is removed on drop.
pub struct Cluster {
    pub nodes: Vec<AgentNode>,
    pub underlay: Underlay,
    dir: PathBuf,
    etcd_pid: Option<u32>,
}

impl Cluster {
    /// Creates the underlay, starts etcd on it, writes `config` as the network config, and creates
    /// `nodes` node namespaces (agents not started).
    pub fn new(nodes: u8, config: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(unique_name("ovlcluster"));
        std::fs::create_dir_all(&dir)?;
        let underlay = Underlay::new()?;
        underlay
            .ns
            .ip(&["addr", "add", &format!("{ETCD_IP}/24"), "dev", "br0"])?;
        underlay.ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ETCD_IP6}/64"),
            "dev",
            "br0",
            "nodad",
        ])?;
        let mut cluster = Cluster {
            nodes: Vec::new(),
            underlay,
            dir,
            etcd_pid: None,
        };
        cluster.start_etcd()?;
        if !config.is_empty() {
            cluster.etcdctl(&["put", &format!("{NETWORK_PREFIX}/config"), config])?;
        }
        for i in 1..=nodes {
            cluster.add_node(i)?;
        }
        Ok(cluster)
    }

    pub fn etcd_endpoint(&self) -> String {
        format!("http://{ETCD_IP}:2379")
    }

    /// etcd over IPv6, for nodes without IPv4 ([`AgentNode::etcd_endpoint`]).
    pub fn etcd_endpoint6(&self) -> String {
        format!("http://[{ETCD_IP6}]:2379")
    }

    /// Stops etcd (SIGKILL: an outage, not a shutdown); its data stays for [`Cluster::start_etcd`].
    pub fn stop_etcd(&mut self) {
        if let Some(pid) = self.etcd_pid.take() {
            self.underlay.ns.kill(pid, Signal::SIGKILL);
        }
    }

    /// Starts etcd on the underlay with the cluster's data directory and waits until it is healthy.
    pub fn start_etcd(&mut self) -> Result<()> {
        let data = self.dir.join("etcd");
        let url = |port: u16| format!("http://{ETCD_IP}:{port}");
        let mut cmd = self.underlay.ns.command("etcd");
        cmd.args(["--name", "default", "--data-dir"])
            .arg(&data)
            .args([
                "--listen-client-urls",
                &format!("{},http://[{ETCD_IP6}]:2379", url(2379)),
                "--advertise-client-urls",
                &url(2379),
            ])
            .args([
                "--listen-peer-urls",
                &url(2380),
                "--initial-advertise-peer-urls",
                &url(2380),
            ])
            .args(["--initial-cluster", &format!("default={}", url(2380))])
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("etcd.log"))?,
            );
        self.etcd_pid = Some(self.underlay.ns.spawn(cmd)?);
        let deadline = Instant::now() + crate::slow(Duration::from_secs(20));
        while Instant::now() < deadline {
            if self.etcdctl(&["endpoint", "health"]).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "etcd did not become healthy in 20 s; see {}",
            self.dir.join("etcd.log").display()
        )
    }

    /// Runs etcdctl (v3 API) against the cluster's etcd; returns stdout.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let ep = self.etcd_endpoint();
        let mut full = vec!["--endpoints", &ep, "--command-timeout=3s"];
        full.extend_from_slice(args);
        let out = self.underlay.ns.exec("etcdctl", &full)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Adds node `index` (underlay address 198.18.0.<10+index>); its agent is not started.
    pub fn add_node(&mut self, index: u8) -> Result<()> {
        let node = Node::new(&self.underlay, index, UNDERLAY_MTU)?;
        let ndir = self.dir.join(format!("node{index}"));
        std::fs::create_dir_all(&ndir)?;
        self.nodes.push(AgentNode {
            node,
            agent_pid: None,
            subnet_file: ndir.join("subnet.env"),
            log_file: ndir.join("agent.log"),
            pin_root: format!("/sys/fs/bpf/{}", unique_name("ovlagent")),
            extra_args: Vec::new(),
            extra_env: Vec::new(),
            agent_bin: None,
            etcd_endpoint: None,
        });
        Ok(())
    }

    /// Starts node `i`'s agent (index into `nodes`).
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let n = &mut self.nodes[i];
        let ep = n
            .etcd_endpoint
            .clone()
            .unwrap_or_else(|| format!("http://{ETCD_IP}:2379"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log_file)?;
        // Network namespace only: the agent pins into the host's bpffs, as on a real node, so its
        // programs stay attached across restarts.
        let bin = n.agent_bin.clone().unwrap_or_else(agent_bin);
        let mut cmd = n.node.ns.command_net_only(bin.to_str().context("agent path")?);
        cmd.envs(n.extra_env.iter().map(|(k, v)| (k, v)));
        cmd.args(["--etcd-endpoints", &ep, "--iface", "eth0", "--subnet-file"])
            .arg(&n.subnet_file)
            .args(["--pin-root", &n.pin_root, "-v", "1"])
            .args(&n.extra_args)
            .stdout(log.try_clone()?)
            .stderr(log);
        n.agent_pid = Some(n.node.ns.spawn(cmd)?);
        Ok(())
    }

    /// Stops node `i`'s agent with `signal` and reaps it.
    pub fn stop_agent(&mut self, i: usize, signal: Signal) {
        let n = &mut self.nodes[i];
        if let Some(pid) = n.agent_pid.take() {
            n.node.ns.kill(pid, signal);
        }
    }

    /// Waits up to `timeout` for node `i`'s agent to exit; its exit status, or `None` if it
    /// still runs.
    pub fn wait_agent_exit(&mut self, i: usize, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + crate::slow(timeout);
        let n = &mut self.nodes[i];
        let pid = n.agent_pid?;
        loop {
            if let Some(st) = n.node.ns.try_wait(pid) {
                n.agent_pid = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `bin cleanup` for node `i` with the agent's flags, to run in the node's network namespace
    /// and the host's mount namespace, where the agent pinned.
    pub fn cleanup_command(&self, i: usize, bin: &std::path::Path) -> Result<Command> {
        let n = &self.nodes[i];
        let mut cmd = n.node.ns.command_net_only(bin.to_str().context("agent path")?);
        cmd.args([
            "cleanup",
            "--pin-root",
            &n.pin_root,
            "--iface",
            "eth0",
            "--bridge",
            "cni0",
        ])
        // As a variable (the unit's way): a previous release's cleanup has no --subnet-file.
        .env("FLANNELD_SUBNET_FILE", &n.subnet_file)
        .stdin(Stdio::null());
        Ok(cmd)
    }

    /// "The outside": a host on the underlay segment, with `addr` (an IPv4 /24 or IPv6 /64 on the
    /// underlay) and no pod routes, so a pod's packets reach it only as the node sends them.
    pub fn outside_host(&self, addr: std::net::IpAddr) -> Result<Netns> {
        let outside = Netns::new("ovlo")?;
        let port = unique_name("po");
        crate::netns::veth(&outside, "eth0", Some(&self.underlay.ns), &port)?;
        self.underlay.ns.ip(&["link", "set", &port, "master", "br0"])?;
        match addr {
            std::net::IpAddr::V4(a) => outside.ip(&["addr", "add", &format!("{a}/24"), "dev", "eth0"])?,
            std::net::IpAddr::V6(a) => {
                outside.ip(&["-6", "addr", "add", &format!("{a}/64"), "dev", "eth0", "nodad"])?
            }
        };
        Ok(outside)
    }

    /// Runs `bin cleanup` on node `i` ([`Cluster::cleanup_command`]); its stdout, or an error
    /// with its exit status and everything it printed when it failed.
    pub fn run_cleanup(&self, i: usize, bin: &std::path::Path) -> Result<String> {
        let out = self
            .cleanup_command(i, bin)?
            .output()
            .context("running cleanup")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "cleanup failed ({}): {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }

    /// True while node `i`'s agent process runs (`try_wait`: an exited agent is reaped, not a
    /// zombie that still looks alive in /proc).
    pub fn agent_running(&mut self, i: usize) -> bool {
        let n = &mut self.nodes[i];
        let Some(pid) = n.agent_pid else { return false };
        if n.node.ns.try_wait(pid).is_some() {
            n.agent_pid = None;
            return false;
        }
        true
    }

    /// Waits until node `i`'s agent has written subnet.env; returns (subnet, MTU).
    pub fn wait_lease(&self, i: usize, timeout: Duration) -> Result<(Ipv4Net, u32)> {
        let timeout = crate::slow(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.nodes[i].subnet_env() {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} wrote no subnet.env within {timeout:?}; agent log:\n{}",
                    i + 1,
                    self.agent_log(i)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The length of node `i`'s agent log now: a mark for [`Cluster::wait_log_after`] (the log
    /// is appended across restarts, so a line from an earlier process must not count).
    pub fn log_mark(&self, i: usize) -> usize {
        self.agent_log(i).len()
    }

    /// Waits up to `timeout` for a line containing `needle` written to node `i`'s agent log after
    /// `mark`; that line.
    pub fn wait_log_after(&self, i: usize, mark: usize, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + crate::slow(timeout);
        loop {
            let log = self.agent_log(i);
            let fresh = log.get(mark..).unwrap_or_default();
            if let Some(line) = fresh.lines().find(|l| l.contains(needle)) {
                return Some(line.to_string());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Restarts node `i`'s agent (stopped with `signal`) and proves the *new* process took its
    /// lease, not that the old one left state behind: subnet.env is removed before the start and
    /// must be written again, a "holding lease" line must be logged after the restart, and the
    /// new process must still run (`try_wait`). Returns the subnet the new agent holds.
    pub fn restart_agent_fresh(&mut self, i: usize, signal: Signal, timeout: Duration) -> Result<Ipv4Net> {
        self.stop_agent(i, signal);
        match std::fs::remove_file(&self.nodes[i].subnet_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let mark = self.log_mark(i);
        self.start_agent(i)?;
        let (subnet, _) = self.wait_lease(i, timeout)?;
        let line = self.wait_log_after(i, mark, "holding lease", timeout);
        let Some(line) = line else {
            bail!(
                "node {}: the restarted agent logged no \"holding lease\" within {timeout:?}; log since the restart:\n{}",
                i + 1,
                self.agent_log(i).get(mark..).unwrap_or_default()
            );
        };
        // subnet.env holds the subnet's first host address (FLANNEL_SUBNET=10.244.1.1/24), the log
        // the network (subnet=10.244.1.0/24).
        if !line.contains(&format!("subnet={}", subnet.trunc())) {
            bail!(
                "node {}: subnet.env says {subnet}, the restarted agent logged {line:?}",
                i + 1
            );
        }
        if !self.agent_running(i) {
            bail!(
                "node {}: the restarted agent exited after taking its lease; log since the restart:\n{}",
                i + 1,
                self.agent_log(i).get(mark..).unwrap_or_default()
            );
        }
        Ok(subnet)
    }

    /// Waits up to 5 s for node `i`'s agent to log "encap attached" (to the cni0 built by
    /// [`Cluster::add_pods`]). Knowing the peers is not enough: until encap is attached, pod
    /// packets are lost (seen: the first of 3 pings, every time, when pinging at once). Older
    /// releases (upgrade tests) may log it differently: a readiness wait, not a check; the
    /// tests' own pings judge.
    pub fn wait_encap_attached(&self, i: usize) {
        self.wait_log_after(i, 0, "encap attached", Duration::from_secs(5));
    }

    pub fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log_file).unwrap_or_default()
    }

    /// Builds `cni0` from node `i`'s subnet.env and adds `pods` pods, as the CNI plugin does.
    pub fn add_pods(&mut self, i: usize, pods: u8) -> Result<Vec<Ipv4Addr>> {
        let (subnet, mtu) = self.wait_lease(i, Duration::from_secs(20))?;
        let n = &mut self.nodes[i];
        n.node.add_bridge_for(subnet, mtu)?;
        let mut ips = Vec::new();
        for p in 0..pods {
            ips.push(n.node.add_pod_in(subnet, p + 1, mtu)?);
        }
        Ok(ips)
    }

    /// The remote subnets in node `i`'s BPF peer map, read from the agent's pins with bpftool
    /// inside the agent's mount namespace.
    pub fn agent_peers(&self, i: usize) -> Result<Vec<Ipv4Net>> {
        let n = &self.nodes[i];
        let pid = n.agent_pid.context("agent not running")?;
        let out = Command::new("nsenter")
            .args([
                "--target",
                &pid.to_string(),
                "--mount",
                "--net",
                "bpftool",
                "-j",
                "map",
                "dump",
                "pinned",
            ])
            .arg(format!("{}/OVL_PEERS", n.pin_root))
            .output()?;
        if !out.status.success() {
            bail!("bpftool map dump: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let mut nets = Vec::new();
        for e in v.as_array().into_iter().flatten() {
            let k = &e["formatted"]["key"];
            let len = k["prefix_len"].as_u64().unwrap_or(0) as u8;
            let d: Vec<u8> = k["data"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|b| b.as_u64().map(|b| b as u8))
                .collect();
            if d.len() == 4 {
                nets.push(Ipv4Net::new(Ipv4Addr::new(d[0], d[1], d[2], d[3]), len)?);
            }
        }
        nets.sort();
        Ok(nets)
    }

    /// Node `i`'s sender table (`OVL_VTEPS`): (PublicIP, subnet) per entry, sorted. Read from the
    /// pins in the host's bpffs, so it works while no agent runs.
    pub fn agent_senders(&self, i: usize) -> Result<Vec<(Ipv4Addr, Ipv4Net)>> {
        let pinned = format!("{}/OVL_VTEPS", self.nodes[i].pin_root);
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned", &pinned])
            .output()?;
        if !out.status.success() {
            bail!(
                "bpftool map dump {pinned}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let bytes = |v: &serde_json::Value| -> Vec<u8> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|b| b.as_u64().map(|b| b as u8))
                .collect()
        };
        let mut senders = Vec::new();
        for e in v.as_array().into_iter().flatten() {
            let f = &e["formatted"];
            let (ip, sn) = (bytes(&f["key"]), bytes(&f["value"]["subnet"]));
            let len = f["value"]["prefix_len"].as_u64().context("sender prefix_len")? as u8;
            let ([a, b, c, d], [w, x, y, z]) = (ip[..].try_into()?, sn[..].try_into()?);
            senders.push((
                Ipv4Addr::new(a, b, c, d),
                Ipv4Net::new(Ipv4Addr::new(w, x, y, z), len)?,
            ));
        }
        senders.sort();
        Ok(senders)
    }

    /// Polls `f` every 20 ms until it returns true or `timeout` passes; returns the time it took.
    pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
        let timeout = crate::slow(timeout);
        let start = Instant::now();
        while start.elapsed() < timeout {
            if f() {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The leases in etcd, as `key value` lines.
    pub fn leases(&self) -> Result<String> {
        self.etcdctl(&["get", "--prefix", &format!("{NETWORK_PREFIX}/subnets/")])
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Agents first (they live in node namespaces), then etcd, then the files.
        for n in &mut self.nodes {
            if let Some(pid) = n.agent_pid.take() {
                n.node.ns.kill(pid, Signal::SIGTERM);
            }
        }
        for n in &self.nodes {
            let _ = std::fs::remove_dir_all(&n.pin_root);
        }
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `cmd` in `ns` and returns its stdout, failing with stderr.
pub fn output(ns: &Netns, cmd: &str, args: &[&str]) -> Result<String> {
    let out = ns.exec(cmd, args)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A TCP transfer of `seconds` from `client` to an iperf3 server in `server` at `server_ip`.
/// Returns (bits per second received, the client address the server saw).
pub fn tcp_transfer(
    server: &mut Netns,
    server_ip: Ipv4Addr,
    client: &Netns,
    seconds: u32,
) -> Result<(f64, String)> {
    let out_path = std::env::temp_dir().join(unique_name("iperf"));
    let srv = IperfServer::start(server, server_ip, out_path.clone())?;
    let client_res = client.exec(
        "iperf3",
        &["-c", &server_ip.to_string(), "-t", &seconds.to_string(), "-J"],
    );
    let v = srv.report(server, crate::slow(Duration::from_secs(5)));
    let _ = std::fs::remove_file(&out_path);
    let client_out = client_res.context("iperf3 client")?;
    let v = v?;
    let remote = v["start"]["connected"][0]["remote_host"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let c: serde_json::Value = serde_json::from_slice(&client_out.stdout).context("iperf3 client output")?;
    let bps = c["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    Ok((bps, remote))
}

/// A one-test iperf3 server (`-s -1 -J`) writing its JSON report to a file.
struct IperfServer {
    report: PathBuf,
    pid: u32,
}

impl IperfServer {
    fn start(server: &mut Netns, server_ip: Ipv4Addr, report: PathBuf) -> Result<Self> {
        let mut srv = server.command("iperf3");
        srv.args(["-s", "-1", "-J", "-B", &server_ip.to_string()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&report)?)
            .stderr(Stdio::null());
        let pid = server.spawn(srv)?;
        // Listening before the client connects (a fixed 300 ms was too short under the VM
        // tier's emulation: the client was refused and the server never reported).
        let listening = || {
            server
                .exec("ss", &["-Hltn", "sport = :5201"])
                .is_ok_and(|o| !o.stdout.is_empty())
        };
        if Cluster::wait_for(Duration::from_secs(5), listening).is_none() {
            bail!("the iperf3 server in {} did not listen on port 5201", server.name);
        }
        Ok(IperfServer { report, pid })
    }

    /// Waits (up to `timeout`) for the complete report, then reaps the server.
    fn report(self, server: &mut Netns, timeout: Duration) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        let v = loop {
            let text = std::fs::read_to_string(&self.report).unwrap_or_default();
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                break v;
            }
            if Instant::now() > deadline {
                server.kill(self.pid, Signal::SIGTERM);
                bail!("no iperf3 report within {timeout:?}: {text}");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        server.kill(self.pid, Signal::SIGTERM);
        Ok(v)
    }
}

/// Checks a command exists in PATH (for clearer failures than "No such file").
pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A steady UDP flow (iperf3, 100-byte datagrams at 1,000 packets/s) between two pods.
pub struct UdpFlow {
    server: IperfServer,
}

impl UdpFlow {
    /// Starts the receiver in `server` (listening on `server_ip`) and the sender in `client`
    /// for `secs` seconds.
    pub fn start(
        server: &mut Netns,
        server_ip: Ipv4Addr,
        client: &mut Netns,
        secs: u32,
        report: PathBuf,
    ) -> Result<Self> {
        let server = IperfServer::start(server, server_ip, report)?;
        let mut cli = client.command("iperf3");
        cli.args([
            "-c",
            &server_ip.to_string(),
            "-u",
            "-b",
            "800K",
            "-l",
            "100",
            "-t",
            &secs.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        client.spawn(cli)?;
        Ok(UdpFlow { server })
    }

    /// Waits for the receiver's report (up to `timeout`); returns (packets sent, packets lost).
    pub fn finish(self, server: &mut Netns, timeout: Duration) -> Result<(u64, u64)> {
        let v = self.server.report(server, timeout)?;
        let sum = &v["end"]["sum"];
        Ok((
            sum["packets"].as_u64().unwrap_or(0),
            sum["lost_packets"].as_u64().unwrap_or(u64::MAX),
        ))
    }
}

impl Cluster {
    /// `n` nodes with their agents started and one pod each, every agent knowing every other
    /// node; returns the cluster and the pod addresses (node order).
    pub fn running(n: u8, config: &str) -> Result<(Cluster, Vec<Ipv4Addr>)> {
        let mut c = Cluster::new(n, config)?;
        let pods = c.start_with_pods()?;
        Ok((c, pods))
    }

    /// Starts every node's agent (as configured: flags, binary) and gives each node one pod,
    /// waiting until every agent knows every other node; returns the pod addresses (node order).
    pub fn start_with_pods(&mut self) -> Result<Vec<Ipv4Addr>> {
        let c = self;
        for i in 0..c.nodes.len() {
            c.start_agent(i)?;
        }
        let mut pods = Vec::new();
        for i in 0..c.nodes.len() {
            pods.push(c.add_pods(i, 1)?[0]);
        }
        for i in 0..c.nodes.len() {
            let want = c.nodes.len() - 1;
            let ok = Cluster::wait_for(Duration::from_secs(5), || {
                c.agent_peers(i).map(|p| p.len() == want).unwrap_or(false)
            });
            if ok.is_none() {
                bail!(
                    "node {} did not learn its {want} peers; log:\n{}",
                    i + 1,
                    c.agent_log(i)
                );
            }
        }
        for i in 0..c.nodes.len() {
            c.wait_encap_attached(i);
        }
        Ok(pods)
    }

    /// The outer headers of a well-formed VXLAN frame from node `from` to node `to` (their
    /// PublicIPs, node `to`'s NIC and VtepMAC, VNI 1, port 8472) as a host on the underlay
    /// (`sender`) crafts it: what a test bends to produce each of decap's drops.
    pub fn vxlan_from(
        &self,
        from: usize,
        to: usize,
        sender: &Netns,
    ) -> Result<overlay_common::wire::EncapParams> {
        let leases = self.lease_list()?;
        let vtep = |i: usize| -> Result<[u8; 6]> {
            let ip = Node::underlay_ip(i as u8 + 1);
            Ok(leases
                .iter()
                .find(|l| l.1 == ip)
                .context("no lease of the node")?
                .2)
        };
        Ok(overlay_common::wire::EncapParams {
            outer_src_mac: sender.mac("eth0")?,
            outer_dst_mac: self.nodes[to].node.ns.mac("eth0")?,
            src_ip: Node::underlay_ip(from as u8 + 1).octets(),
            dst_ip: Node::underlay_ip(to as u8 + 1).octets(),
            src_port: 40000,
            dst_port: 8472,
            vni: 1,
            inner_src_mac: vtep(from)?,
            inner_dst_mac: vtep(to)?,
            inner_ip_len: 0,
            inner_tos: 0,
        })
    }

    /// The vxlan leases in etcd: (subnet, PublicIP, VtepMAC), sorted by subnet.
    pub fn lease_list(&self) -> Result<Vec<(Ipv4Net, Ipv4Addr, [u8; 6])>> {
        let text = self.leases()?;
        let lines: Vec<&str> = text.lines().collect();
        let mut out = Vec::new();
        for kv in lines.chunks(2) {
            let [key, value] = kv else {
                bail!("odd etcdctl output:\n{text}")
            };
            let subnet: Ipv4Net = key.rsplit('/').next().unwrap_or("").replace('-', "/").parse()?;
            let v: serde_json::Value = serde_json::from_str(value)?;
            let ip: Ipv4Addr = v["PublicIP"].as_str().context("PublicIP")?.parse()?;
            let mac = crate::netns::parse_mac(v["BackendData"]["VtepMAC"].as_str().context("VtepMAC")?)?;
            out.push((subnet, ip, mac));
        }
        out.sort();
        Ok(out)
    }

    /// The mixed cluster's checks, both ways between each agent node's pod (`pods`, node order)
    /// and the flanneld node `flannel` (no agent) with its pod `flannel_pod`: pod → pod (3 pings),
    /// pod ← pod (3), a DF ping of `df_size` bytes from the agent pod, the flanneld host → the agent
    /// pod (2). Panics naming the failed direction.
    pub fn assert_pods_reach_a_flanneld_node(
        &self,
        pods: &[Ipv4Addr],
        flannel: usize,
        flannel_pod: Ipv4Addr,
        df_size: u32,
    ) {
        use crate::topology::ping;
        for (i, pod) in pods.iter().enumerate() {
            let agent_pod = &self.nodes[i].node.pods[0].ns;
            assert!(
                ping(agent_pod, flannel_pod, 3, None),
                "agent pod {pod} → flanneld pod {flannel_pod} failed"
            );
            assert!(
                ping(&self.nodes[flannel].node.pods[0].ns, *pod, 3, None),
                "flanneld pod {flannel_pod} → agent pod {pod} failed"
            );
            assert!(
                ping(agent_pod, flannel_pod, 1, Some(df_size)),
                "DF ping of {df_size} bytes agent pod {pod} → flanneld pod failed"
            );
            assert!(
                ping(&self.nodes[flannel].node.ns, *pod, 2, None),
                "flanneld host → agent pod {pod} failed"
            );
        }
    }

    /// Adds the rule Docker and the CNI portmap/bridge plugins install on node `i`:
    /// `-t nat -A POSTROUTING -s 10.244.0.0/16 ! -o cni0 -j MASQUERADE`.
    pub fn masquerade_like_docker(&self, i: usize) -> Result<()> {
        self.nodes[i].node.ns.exec(
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                "10.244.0.0/16",
                "!",
                "-o",
                "cni0",
                "-j",
                "MASQUERADE",
            ],
        )?;
        Ok(())
    }
}

/// One local endpoint as `overlay-agent status --json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EndpointSeen {
    pub ip: Ipv4Addr,
    pub ifindex: u32,
    /// The veth's name as resolved in the node's namespace.
    pub iface: Option<String>,
    pub mac: String,
    pub gw_mac: String,
}

impl Cluster {
    /// `overlay-agent status --json` for node `i`, run in its network namespace (so interface
    /// names resolve there) and the host's mount namespace (where the pins are).
    pub fn status_json(&self, i: usize) -> Result<serde_json::Value> {
        let n = &self.nodes[i];
        let out = n
            .node
            .ns
            .command_net_only(agent_bin().to_str().context("agent path")?)
            .args(["status", "--json", "--pin-root", &n.pin_root])
            .output()?;
        if !out.status.success() {
            bail!(
                "overlay-agent status on node {}: {}",
                i + 1,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Node `i`'s local IPv4 endpoints per `overlay-agent status --json`, sorted by address
    /// (IPv6 ones, listed after them, are left out).
    pub fn agent_endpoints(&self, i: usize) -> Result<Vec<EndpointSeen>> {
        let v = self.status_json(i)?;
        let mut out = Vec::new();
        for e in v["endpoints"]
            .as_array()
            .context("status has no endpoints list")?
        {
            let s = |k: &str| e[k].as_str().map(str::to_string);
            let ip: std::net::IpAddr = s("ip").context("endpoint ip")?.parse()?;
            let std::net::IpAddr::V4(ip) = ip else {
                continue;
            };
            out.push(EndpointSeen {
                ip,
                ifindex: e["ifindex"].as_u64().context("endpoint ifindex")? as u32,
                iface: s("iface"),
                mac: s("mac").context("endpoint mac")?,
                gw_mac: s("gw_mac").context("endpoint gw_mac")?,
            });
        }
        out.sort();
        Ok(out)
    }
}
