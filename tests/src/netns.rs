//! Network namespaces, veths and processes for root-only end-to-end tests.
//!
//! Every object is owned by a guard whose `Drop` removes it, so a failing test leaves nothing
//! behind. Names carry the test process id so leftovers of a killed run never collide.

use std::{
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context as _, Result};

/// Panics with a clear message unless running as root (all tiers above unit tests need it).
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (network namespaces, BPF); run it via `cargo xtask test` as root"
    );
}

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn run(cmd: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd}"))?;
    if !out.status.success() {
        bail!(
            "`{cmd} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// `ip <args>` in the current (root) namespace.
pub fn ip(args: &[&str]) -> Result<Output> {
    run("ip", args)
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique short name: `<prefix><pid>x<n>` (fits IFNAMSIZ for short prefixes).
pub fn unique_name(prefix: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// A network namespace, deleted (with everything in it) on drop.
pub struct Netns {
    pub name: String,
    children: Vec<Child>,
}

impl Netns {
    /// Creates a namespace with a unique name derived from `prefix`, loopback up.
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique_name(prefix);
        ip(&["netns", "add", &name])?;
        let ns = Netns {
            name,
            children: Vec::new(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `cmd args` inside the namespace and waits for it.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Result<Output> {
        let mut full = vec!["netns", "exec", &self.name, cmd];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// `ip <args>` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command prepared to run inside the namespace (not started).
    pub fn command(&self, cmd: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, cmd]);
        c
    }

    /// A command prepared to run inside the namespace's network only: unlike `ip netns exec` it
    /// keeps the host's mount namespace, so its bpffs pins outlive the process (hitless restart).
    pub fn command_net_only(&self, cmd: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path())).arg("--").arg(cmd);
        c
    }

    /// Starts a long-running process inside the namespace; it is killed when the namespace drops.
    pub fn spawn(&mut self, mut cmd: Command) -> Result<u32> {
        let child = cmd.spawn().context("spawning a process in a namespace")?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// Kills and reaps a process started with [`Netns::spawn`].
    pub fn kill(&mut self, pid: u32, signal: nix::sys::signal::Signal) {
        if let Some(i) = self.children.iter().position(|c| c.id() == pid) {
            let mut child = self.children.remove(i);
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
            let _ = child.wait();
        }
    }

    /// The exit status of a process started with [`Netns::spawn`] once it has exited (it is
    /// reaped then); `None` while it runs.
    pub fn try_wait(&mut self, pid: u32) -> Option<std::process::ExitStatus> {
        let i = self.children.iter().position(|c| c.id() == pid)?;
        let status = self.children[i].try_wait().ok()??;
        // Reaped by try_wait above; only the handle goes.
        drop(self.children.remove(i));
        Some(status)
    }

    /// Moves the calling thread into the namespace until the guard drops.
    pub fn enter(&self) -> Result<Entered> {
        let original = std::fs::File::open("/proc/thread-self/ns/net").context("opening our netns")?;
        let target = std::fs::File::open(self.path()).with_context(|| format!("opening {}", self.path()))?;
        nix::sched::setns(&target, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {}", self.name))?;
        Ok(Entered { original })
    }

    /// The names of our BPF programs attached as legacy `clsact` filters on `dev`'s `dir`
    /// (`ingress`/`egress`) hook, one entry per filter: what kernels without TCX (before 6.6) get
    /// instead of pinned links. Read with `tc -j filter show`.
    pub fn our_tc_filters(&self, dev: &str, dir: &str) -> Result<Vec<String>> {
        let out = self.exec("tc", &["-j", "filter", "show", "dev", dev, dir])?;
        let text = String::from_utf8_lossy(&out.stdout);
        if text.trim().is_empty() {
            return Ok(Vec::new());
        }
        let v: serde_json::Value = serde_json::from_str(&text).context("parsing tc -j filter show")?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f.get("options")?.get("bpf_name")?.as_str())
            .filter(|n| n.starts_with("overlay_"))
            .map(str::to_string)
            .collect())
    }

    /// Starts `tcpdump -c count` on `dev` with `filter`, its text going to `out`, and returns once
    /// tcpdump says it is listening (a fixed sleep misses the first packets under the VM tier's
    /// emulation). Finish it with [`Capture::wait`].
    pub fn capture(
        &mut self,
        dev: &str,
        count: usize,
        filter: &str,
        out: &std::path::Path,
    ) -> Result<Capture> {
        let err = out.with_extension("stderr");
        let mut cmd = self.command("tcpdump");
        cmd.args(["-l", "-ni", dev, "-c", &count.to_string(), filter])
            .stdout(std::fs::File::create(out)?)
            .stderr(std::fs::File::create(&err)?);
        let pid = self.spawn(cmd)?;
        let listening = || std::fs::read_to_string(&err).is_ok_and(|t| t.contains("listening on"));
        let deadline = std::time::Instant::now() + crate::slow(std::time::Duration::from_secs(10));
        while !listening() {
            if std::time::Instant::now() > deadline || self.try_wait(pid).is_some() {
                let text = std::fs::read_to_string(&err).unwrap_or_default();
                self.kill(pid, nix::sys::signal::Signal::SIGTERM);
                bail!("tcpdump on {dev} did not start listening: {text}");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(Capture {
            pid,
            count,
            out: out.to_path_buf(),
        })
    }

    /// Sets a sysctl inside the namespace (`net.ipv4.ip_forward=1` style).
    pub fn sysctl(&self, kv: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", kv]).map(|_| ())
    }

    /// Path of the namespace file, for `setns`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Ifindex of `dev` inside the namespace.
    pub fn ifindex(&self, dev: &str) -> Result<u32> {
        let out = self.exec("cat", &[&format!("/sys/class/net/{dev}/ifindex")])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    }

    /// MAC address of `dev` inside the namespace.
    pub fn mac(&self, dev: &str) -> Result<[u8; 6]> {
        let out = self.exec("cat", &[&format!("/sys/class/net/{dev}/address")])?;
        parse_mac(String::from_utf8_lossy(&out.stdout).trim())
    }
}

/// A running `tcpdump -c N` started by [`Netns::capture`].
pub struct Capture {
    pid: u32,
    count: usize,
    out: std::path::PathBuf,
}

impl Capture {
    /// Waits until tcpdump has printed its `count` packets (it then exits by itself) or `timeout`
    /// (scaled by [`crate::slow`]) has passed, stops it, and returns the packet lines it printed.
    pub fn wait(self, ns: &mut Netns, timeout: std::time::Duration) -> String {
        let deadline = std::time::Instant::now() + crate::slow(timeout);
        let lines = || std::fs::read_to_string(&self.out).unwrap_or_default();
        while lines().lines().count() < self.count && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        ns.kill(self.pid, nix::sys::signal::Signal::SIGTERM);
        lines()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Deleting the namespace removes its interfaces and the veth peers elsewhere.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// The calling thread is inside another namespace until this drops.
pub struct Entered {
    original: std::fs::File,
}

impl Drop for Entered {
    fn drop(&mut self) {
        nix::sched::setns(&self.original, nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("returning to the original network namespace");
    }
}

/// A pin root under bpffs unique to this test, removed (with its pins) on drop.
pub struct PinRoot(pub std::path::PathBuf);

impl PinRoot {
    /// Mounts bpffs on /sys/fs/bpf first if needed (a fresh machine has none).
    pub fn new() -> Self {
        overlay_agent::dataplane::bpffs::ensure_mounted(std::path::Path::new("/sys/fs/bpf"))
            .expect("mounting bpffs");
        PinRoot(std::path::PathBuf::from(format!(
            "/sys/fs/bpf/{}",
            unique_name("ovltest")
        )))
    }
}

impl Default for PinRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("not a MAC address: {s:?}");
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).with_context(|| format!("not a MAC address: {s:?}"))?;
    }
    Ok(mac)
}

/// Creates a veth pair: `a_dev` inside `a`, `b_dev` inside `b` (`None` = the root namespace).
/// Both ends are brought up; deleting either namespace removes the pair.
pub fn veth(a: &Netns, a_dev: &str, b: Option<&Netns>, b_dev: &str) -> Result<()> {
    let tmp_a = unique_name("va");
    let tmp_b = unique_name("vb");
    ip(&["link", "add", &tmp_a, "type", "veth", "peer", "name", &tmp_b])?;
    let moved = (|| -> Result<()> {
        ip(&["link", "set", &tmp_a, "netns", &a.name, "name", a_dev])?;
        a.ip(&["link", "set", a_dev, "up"])?;
        match b {
            Some(b) => {
                ip(&["link", "set", &tmp_b, "netns", &b.name, "name", b_dev])?;
                b.ip(&["link", "set", b_dev, "up"])?;
            }
            None => {
                ip(&["link", "set", &tmp_b, "name", b_dev])?;
                ip(&["link", "set", b_dev, "up"])?;
            }
        }
        Ok(())
    })();
    if moved.is_err() {
        let _ = ip(&["link", "del", &tmp_a]);
        let _ = ip(&["link", "del", &tmp_b]);
    }
    moved
}

/// A link in the root namespace, deleted on drop.
pub struct RootLink(pub String);

impl Drop for RootLink {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.0]);
    }
}

/// The source address a server in `server_ns` on `addr`:8080 sees when `client` connects to it
/// (`curl`, so a MASQUERADE or SNAT on the way shows): `None` when no connection arrives
/// within 10 s. Either family.
pub fn seen_source(client: &Netns, server_ns: &Netns, addr: std::net::IpAddr) -> Option<std::net::IpAddr> {
    use std::{
        io::{Read as _, Write as _},
        net::TcpListener,
        time::{Duration, Instant},
    };
    let path = server_ns.path();
    let (tx, rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        let target = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&target, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let l = TcpListener::bind((addr, 8080)).unwrap();
        l.set_nonblocking(true).unwrap();
        tx.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok((mut s, peer)) = l.accept() {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
                return Some(peer.ip());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    });
    rx.recv().unwrap();
    let url = match addr {
        std::net::IpAddr::V4(a) => format!("http://{a}:8080/"),
        std::net::IpAddr::V6(a) => format!("http://[{a}]:8080/"),
    };
    let _ = client.exec("curl", &["-s", "--max-time", "5", &url]);
    server.join().unwrap()
}
