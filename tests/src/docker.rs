//! Real Docker in node namespaces: one `dockerd` per node with state of its own, started with
//! the options `overlay-agent docker-opts` derives from the node's subnet.env (as flannel's
//! mk-docker-opts.sh feeds docker.service), a busybox image imported from a local tar (nothing
//! is pulled), and containers on the node's `docker0`.
//!
//! A [`Dockerd`] guard removes everything its daemon made when it drops, pass or fail: the
//! containers, the daemon, its containerd and shims, their mounts, cgroups and directories,
//! and `docker0`. Drop it before the node's namespace (declare it after the [`Cluster`]).
//!
//! [`Cluster`]: crate::cluster::Cluster

use std::{
    io::Read as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicU32, AtomicUsize, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use nix::{sys::signal::Signal, unistd::Pid};

use crate::{
    cluster::agent_bin,
    netns::{unique_name, Netns},
    topology::parse_ping_summary,
};

/// Debian's docker.io client. Not a bare `docker`: `/usr/local/bin/docker`, earlier in PATH,
/// is an unrelated newer client.
pub const DOCKER: &str = "/usr/bin/docker";
/// Debian's docker.io daemon.
pub const DOCKERD: &str = "/usr/sbin/dockerd";
/// The static busybox the test image is made of.
pub const BUSYBOX: &str = "/bin/busybox";
/// The image every container runs (busybox and its applets, imported from a tar).
pub const IMAGE: &str = "ovd-busybox:latest";

/// PATH for the daemon: Debian's containerd, runc, docker-init and iptables.
const DAEMON_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// How long a docker client call may take before it counts as hung.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

static NEXT: AtomicU32 = AtomicU32::new(0);
/// Daemons alive in this process; the last one to go removes the shared run directories.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Shared directories Docker and containerd create under /run that did not exist before our
/// first daemon (children before parents).
static SHARED_DIRS: OnceLock<Vec<PathBuf>> = OnceLock::new();

/// One container: its name, address on `docker0` and init process (in the root pid namespace).
#[derive(Debug, Clone)]
pub struct Container {
    pub name: String,
    pub ip: Ipv4Addr,
    pub pid: u32,
}

impl Container {
    /// A host command prepared to run in the container's network namespace only (the host's
    /// binaries, e.g. iperf3), not started.
    pub fn net_command(&self, cmd: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/proc/{}/ns/net", self.pid))
            .arg("--")
            .arg(cmd);
        c
    }
}

/// A `dockerd` running in one node's network namespace (and the host's other namespaces, so
/// it sees the host's cgroup mounts), with its own data root, exec root, socket and cgroup
/// parent. Removes everything it created on drop.
pub struct Dockerd {
    netns: String,
    dir: PathBuf,
    cgroup_parent: String,
    opts: Vec<String>,
    daemon: Option<Child>,
}

impl Dockerd {
    /// Starts a daemon in `ns` with the options `overlay-agent docker-opts` writes from
    /// `subnet_file` (the node's lease, so it must exist), waits until it answers, and imports
    /// [`IMAGE`].
    pub fn new(ns: &Netns, subnet_file: &Path) -> Result<Self> {
        SHARED_DIRS.get_or_init(|| {
            [
                "/run/docker/plugins",
                "/run/docker",
                "/run/containerd/s",
                "/run/containerd",
            ]
            .iter()
            .map(PathBuf::from)
            .filter(|p| !p.exists())
            .collect()
        });
        // Short: the daemon's and containerd's unix sockets live below it (108-byte limit).
        let tag = format!(
            "ovd-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        LIVE.fetch_add(1, Ordering::SeqCst);
        // The guard exists from here on, so a failed start is cleaned up too.
        let mut d = Dockerd {
            netns: ns.name.clone(),
            dir: PathBuf::from("/tmp").join(&tag),
            cgroup_parent: tag,
            opts: Vec::new(),
            daemon: None,
        };
        std::fs::create_dir_all(&d.dir)?;
        d.opts = docker_opts(subnet_file, &d.dir.join("docker_opts.env"))?;
        // The config keeps the daemon's trust key out of /etc/docker.
        std::fs::write(
            d.dir.join("daemon.json"),
            serde_json::json!({ "deprecated-key-path": d.dir.join("key.json") }).to_string(),
        )?;
        d.start()?;
        d.import_image()?;
        Ok(d)
    }

    /// The options taken from `overlay-agent docker-opts` (`--bip=… --ip-masq=… --mtu=…`).
    pub fn opts(&self) -> &[String] {
        &self.opts
    }

    /// The daemon's API socket (`docker -H unix://<this>`).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("s")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("dockerd.log")
    }

    /// The last `lines` lines of the daemon's log (all its runs), for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The daemon's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// Starts the daemon (after [`Dockerd::stop`]) and waits up to 30 s until it answers.
    pub fn start(&mut self) -> Result<()> {
        if self.daemon.is_some() {
            bail!("dockerd already runs");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let dir = &self.dir;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(DOCKERD)
            .arg("--config-file")
            .arg(dir.join("daemon.json"))
            .arg("--data-root")
            .arg(dir.join("d"))
            .arg("--exec-root")
            .arg(dir.join("x"))
            .arg("--pidfile")
            .arg(dir.join("pid"))
            .arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .args(["--storage-driver", "vfs", "--userland-proxy=false"])
            .arg(format!("--cgroup-parent=/{}", self.cgroup_parent))
            .args(&self.opts)
            .env("PATH", DAEMON_PATH)
            .env_remove("DOCKER_HOST")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.daemon = Some(cmd.spawn().context("spawning dockerd")?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self
                .docker(&["version", "--format", "{{.Server.Version}}"])
                .is_ok()
            {
                return Ok(());
            }
            if let Some(st) = self.daemon.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.daemon = None;
                bail!("dockerd exited ({st}) while starting:\n{}", self.log_tail(30));
            }
            if Instant::now() > deadline {
                bail!("dockerd did not answer within 30 s:\n{}", self.log_tail(30));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the daemon as `systemctl stop docker` does (SIGTERM; SIGKILL after 20 s) and
    /// reaps it. Its containers stop with it (they run with `--stop-signal KILL`).
    pub fn stop(&mut self) {
        let Some(mut child) = self.daemon.take() else {
            return;
        };
        let pid = Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// A docker client command for this daemon (not started).
    pub fn client(&self) -> Command {
        let mut c = Command::new(DOCKER);
        c.arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .stdin(Stdio::null());
        c
    }

    /// Runs `docker args` against this daemon; its stdout, or its stderr as the error.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.client();
        cmd.args(args);
        let out = output_within(&mut cmd, CLIENT_TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "`docker {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Imports [`IMAGE`]: a root filesystem of busybox with a symlink per applet.
    fn import_image(&self) -> Result<()> {
        let root = self.dir.join("img");
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin)?;
        std::fs::copy(BUSYBOX, bin.join("busybox")).with_context(|| format!("copying {BUSYBOX}"))?;
        let list = crate::netns::run(BUSYBOX, &["--list"])?;
        for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
            if applet != "busybox" {
                std::os::unix::fs::symlink("busybox", bin.join(applet))?;
            }
        }
        let tar = self.dir.join("img.tar");
        crate::netns::run(
            "tar",
            &[
                "-C",
                root.to_str().context("image path")?,
                "-cf",
                tar.to_str().context("tar path")?,
                ".",
            ],
        )?;
        self.docker(&["import", tar.to_str().context("tar path")?, IMAGE])?;
        Ok(())
    }

    /// Runs a container `name` of [`IMAGE`] (`sleep 1d`, detached) on the default bridge.
    pub fn run(&self, name: &str) -> Result<Container> {
        self.docker(&[
            "run",
            "-d",
            "--name",
            name,
            "--stop-signal",
            "KILL",
            IMAGE,
            "sleep",
            "1d",
        ])?;
        let out = self.docker(&[
            "inspect",
            "-f",
            "{{.NetworkSettings.IPAddress}} {{.State.Pid}}",
            name,
        ])?;
        let mut parts = out.split_whitespace();
        let (Some(ip), Some(pid)) = (parts.next(), parts.next()) else {
            bail!("docker inspect {name}: unexpected output {out:?}");
        };
        Ok(Container {
            name: name.to_string(),
            ip: ip
                .parse()
                .with_context(|| format!("container {name} has no IPv4 address: {out:?}"))?,
            pid: pid.parse()?,
        })
    }

    /// `docker exec <container> args…`: its output, whatever its exit status.
    pub fn exec_output(&self, c: &Container, args: &[&str]) -> Result<Output> {
        let mut cmd = self.client();
        cmd.args(["exec", &c.name]).args(args);
        output_within(&mut cmd, CLIENT_TIMEOUT)
    }

    /// `docker exec <container> args…`: its stdout, or a failure when it exits non-zero.
    pub fn exec(&self, c: &Container, args: &[&str]) -> Result<String> {
        let mut full = vec!["exec", c.name.as_str()];
        full.extend_from_slice(args);
        self.docker(&full)
    }

    /// Starts `args` detached inside `c` (`docker exec -d`).
    pub fn exec_detached(&self, c: &Container, args: &[&str]) -> Result<()> {
        let mut full = vec!["exec", "-d", c.name.as_str()];
        full.extend_from_slice(args);
        self.docker(&full).map(|_| ())
    }

    /// `docker exec <c> nc -w 3 <to> <port>` (busybox nc, prints what it receives), not started.
    pub fn nc_command(&self, c: &Container, to: Ipv4Addr, port: u16) -> Command {
        let mut cmd = self.client();
        cmd.args([
            "exec",
            &c.name,
            "nc",
            "-w",
            "3",
            &to.to_string(),
            &port.to_string(),
        ]);
        cmd
    }

    /// busybox `ping -c count` inside `from`: (transmitted, received) from its summary, or
    /// `None` when it printed none.
    pub fn ping(&self, from: &Container, to: Ipv4Addr, count: u32) -> Option<(u32, u32)> {
        let c = count.to_string();
        let t = to.to_string();
        let out = self
            .exec_output(from, &["ping", "-c", &c, "-i", "0.2", "-W", "2", "-q", &t])
            .ok()?;
        parse_ping_summary(&String::from_utf8_lossy(&out.stdout))
    }

    /// Everything this daemon left: containers, the daemon, its containerd, shims and
    /// container processes, mounts, cgroups, directories, and docker0.
    fn cleanup(&mut self) {
        if self.daemon.is_some() {
            if let Ok(ids) = self.docker(&["ps", "-aq"]) {
                let ids: Vec<&str> = ids.split_whitespace().collect();
                if !ids.is_empty() {
                    let mut args = vec!["rm", "-f"];
                    args.extend(ids);
                    let _ = self.docker(&args);
                }
            }
        }
        self.stop();
        let mark = format!("{}/", self.dir.display());
        // containerd and its shims name our directories on their command lines; container
        // processes sit in our cgroup parent.
        let mut pids = processes_naming(&mark);
        pids.extend(cgroup_processes(&self.cgroup_parent));
        for &pid in &pids {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // A shim that did not exit by itself leaves its socket in containerd's shared directory.
        let address = self.dir.join("x/containerd/containerd.sock");
        for e in std::fs::read_dir(self.dir.join("d/containers"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Some(sock) = shim_socket(&address, &e.file_name().to_string_lossy()) {
                let _ = std::fs::remove_file(sock);
            }
        }
        unmount_under(&self.dir);
        remove_cgroups(&self.cgroup_parent);
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = Command::new("ip")
            .args(["-n", &self.netns, "link", "del", "docker0"])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.cleanup();
        if LIVE.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Empty ones only: rmdir fails on anything still in use.
            for d in SHARED_DIRS.get().into_iter().flatten() {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
}

/// Runs `overlay-agent docker-opts -f subnet_file -d out` and returns the options it wrote.
pub fn docker_opts(subnet_file: &Path, out: &Path) -> Result<Vec<String>> {
    let bin = agent_bin();
    crate::netns::run(
        bin.to_str().context("agent path")?,
        &[
            "docker-opts",
            "-f",
            subnet_file.to_str().context("subnet file path")?,
            "-d",
            out.to_str().context("output path")?,
        ],
    )?;
    let text = std::fs::read_to_string(out).with_context(|| format!("reading {}", out.display()))?;
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix("DOCKER_OPTS="))
        .with_context(|| format!("no DOCKER_OPTS in {text:?}"))?;
    Ok(value
        .trim()
        .trim_matches('"')
        .split_whitespace()
        .map(str::to_string)
        .collect())
}

/// The address a TCP client comes from as `server` sees it: busybox `nc -l` in `server`
/// answers one connection on `port` with its own `netstat -tn`, whose line for `port` names
/// the peer. `client` connects to `server` on `port` and prints what it receives (e.g.
/// [`Dockerd::nc_command`]); it is run again while the listener is not up yet.
pub fn peer_seen_by(
    server_d: &Dockerd,
    server: &Container,
    port: u16,
    client: &mut Command,
) -> Result<Ipv4Addr> {
    let p = port.to_string();
    server_d.exec_detached(server, &["nc", "-l", "-p", &p, "-e", "netstat", "-tn"])?;
    let mut last = String::new();
    for _ in 0..3 {
        let out = output_within(client.stdin(Stdio::null()), CLIENT_TIMEOUT)?;
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(ip) = netstat_peer(&last, port) {
            return Ok(ip);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    bail!(
        "{:?} → {}:{port}: no netstat line for the connection; last answer:\n{last}",
        client,
        server.ip
    )
}

/// The foreign address of the TCP connection whose local port is `port` in `netstat -tn`
/// output (`::ffff:` of a v4-mapped address stripped).
pub fn netstat_peer(text: &str, port: u16) -> Option<Ipv4Addr> {
    text.lines().find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        if cols.len() < 5 || !cols[0].starts_with("tcp") || !cols[3].ends_with(&format!(":{port}")) {
            return None;
        }
        let (addr, _) = cols[4].rsplit_once(':')?;
        addr.trim_start_matches("::ffff:").parse().ok()
    })
}

/// One bulk TCP transfer between containers, as iperf3 reported it.
#[derive(Debug)]
pub struct Transfer {
    /// Bytes the server received.
    pub bytes: u64,
    pub bits_per_second: f64,
    /// The client's address as the server saw it.
    pub client_seen: String,
}

/// Bulk TCP for `seconds` from `client` to `server`: the host's iperf3 run in each
/// container's network namespace.
pub fn tcp_transfer(server: &Container, client: &Container, seconds: u32) -> Result<Transfer> {
    let report = std::env::temp_dir().join(unique_name("ovdiperf"));
    let mut srv = server.net_command("iperf3");
    srv.args(["-s", "-1", "-J", "-B", &server.ip.to_string()])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&report)?)
        .stderr(Stdio::null());
    let mut srv = KillOnDrop(srv.spawn().context("spawning iperf3 -s")?);
    std::thread::sleep(Duration::from_millis(300));
    let mut cli = client.net_command("iperf3");
    cli.args([
        "-c",
        &server.ip.to_string(),
        "-t",
        &seconds.to_string(),
        "--connect-timeout",
        "3000",
        "-J",
    ]);
    let res = output_within(&mut cli, Duration::from_secs(u64::from(seconds) + 20));
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && matches!(srv.0.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(srv);
    let text = std::fs::read_to_string(&report).unwrap_or_default();
    let _ = std::fs::remove_file(&report);
    let out = res.context("iperf3 client")?;
    let c: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 client output: {}", String::from_utf8_lossy(&out.stdout)))?;
    if let Some(e) = c["error"].as_str() {
        bail!("iperf3 client: {e}");
    }
    let s: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("iperf3 server report: {text}"))?;
    Ok(Transfer {
        bytes: c["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0),
        bits_per_second: c["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0),
        client_seen: s["start"]["connected"][0]["remote_host"]
            .as_str()
            .unwrap_or("")
            .to_string(),
    })
}

/// A child killed and reaped on drop.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to completion, capturing its output; kills it after `timeout`.
fn output_within(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
    // Drain both pipes on threads so a chatty child never blocks on a full pipe.
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|s| Box::new(s) as _));
    let err = drain(child.stderr.take().map(|s| Box::new(s) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{:?} did not finish within {timeout:?}", cmd.get_program());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// The socket containerd's runc v2 shim for container `id` listens on, for a containerd at
/// `address`: `/run/containerd/s/<sha256 of "<address>/moby/<id>">` (containerd 1.6).
fn shim_socket(address: &Path, id: &str) -> Option<PathBuf> {
    use std::io::Write as _;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .ok()?;
    let key = format!("{}/moby/{id}", address.display());
    child.stdin.take()?.write_all(key.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    let hex = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()?
        .to_string();
    Some(Path::new("/run/containerd/s").join(hex))
}

/// Processes (other than us) whose command line contains `needle`.
fn processes_naming(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Every cgroup hierarchy's directory for `parent` (v1 controllers, named and unified ones).
fn cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = dir
        .filter_map(|e| Some(e.ok()?.path().join(parent)))
        .filter(|p| p.is_dir())
        .collect();
    let v2 = Path::new("/sys/fs/cgroup").join(parent);
    if v2.join("cgroup.procs").exists() {
        out.push(v2);
    }
    out
}

/// The processes in `parent` and below it, in any hierarchy.
fn cgroup_processes(parent: &str) -> Vec<u32> {
    fn walk(dir: &Path, out: &mut Vec<u32>) {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(&e.path(), out);
            }
        }
    }
    let mut out = Vec::new();
    for d in cgroup_dirs(parent) {
        walk(&d, &mut out);
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Removes `parent` and its children from every hierarchy (retrying while exiting tasks leave).
fn remove_cgroups(parent: &str) {
    fn rmdir_tree(dir: &Path) -> bool {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                rmdir_tree(&e.path());
            }
        }
        std::fs::remove_dir(dir).is_ok() || !dir.exists()
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for d in cgroup_dirs(parent) {
        while !rmdir_tree(&d) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// True while `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Mount points at or below `dir` per /proc/self/mountinfo, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let root = dir.display().to_string();
    let prefix = format!("{root}/");
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<String> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|m| *m == root || m.starts_with(&prefix))
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.len()));
    out.dedup();
    out
}

/// Unmounts everything at or below `dir` (lazily; repeated for stacked mounts).
fn unmount_under(dir: &Path) {
    for _ in 0..5 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return;
        }
        for m in mounts {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netstat_peer_reads_the_connection_on_the_port() {
        let text = "Active Internet connections (w/o servers)\n\
            Proto Recv-Q Send-Q Local Address           Foreign Address         State\n\
            tcp        0      1 10.244.1.2:48720         10.244.2.2:7000          FIN_WAIT1\n\
            tcp        1      0 ::ffff:10.244.2.2:7000   ::ffff:10.244.1.2:48720  CLOSE_WAIT\n";
        assert_eq!(netstat_peer(text, 7000), Some(Ipv4Addr::new(10, 244, 1, 2)));
        let v4 = "tcp 0 0 10.244.2.2:7000 198.18.0.11:1234 ESTABLISHED\n";
        assert_eq!(netstat_peer(v4, 7000), Some(Ipv4Addr::new(198, 18, 0, 11)));
        assert_eq!(netstat_peer(text, 7001), None);
        assert_eq!(netstat_peer("nc: can't connect\n", 7000), None);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mountinfo("/tmp/plain"), "/tmp/plain");
        assert_eq!(unescape_mountinfo(r"/tmp/x\"), r"/tmp/x\");
    }
}
