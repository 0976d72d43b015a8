//! A real etcd in its own network namespace, reachable from the test process over a veth.
//!
//! Each guard takes a /30 out of 198.19.0.0/16 (inside the benchmarking range 198.18.0.0/15,
//! never routed off the machine), unique per guard via a counter and the process id. Drop kills
//! etcd, deletes the namespace (and with it the veth) and the data directory, even on panic.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Stdio,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::netns::{unique_name, veth, Netns};

static NEXT_BLOCK: AtomicU32 = AtomicU32::new(0);

pub struct Etcd {
    ns: Netns,
    /// etcd's address inside the namespace.
    pub addr: Ipv4Addr,
    dir: PathBuf,
    pid: Option<u32>,
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub fn start_new() -> Result<Self> {
        let n = NEXT_BLOCK.fetch_add(1, Ordering::Relaxed);
        // 16384 /30 blocks in 198.19.0.0/16; spread processes by pid, guards by counter.
        let block = (std::process::id().wrapping_mul(64).wrapping_add(n)) % 16384;
        let base = u32::from(Ipv4Addr::new(198, 19, 0, 0)) + block * 4;
        let host = Ipv4Addr::from(base + 1);
        let addr = Ipv4Addr::from(base + 2);

        let ns = Netns::new("etcd")?;
        let root_dev = unique_name("etd");
        veth(&ns, "eth0", None, &root_dev)?;
        ns.ip(&["addr", "add", &format!("{addr}/30"), "dev", "eth0"])?;
        crate::netns::ip(&["addr", "add", &format!("{host}/30"), "dev", &root_dev])?;

        let dir = std::env::temp_dir().join(format!("overlay-etcd-{}", unique_name("d")));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut etcd = Etcd {
            ns,
            addr,
            dir,
            pid: None,
        };
        etcd.start()?;
        Ok(etcd)
    }

    /// `http://ADDR:2379`.
    pub fn endpoint(&self) -> String {
        format!("http://{}:2379", self.addr)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    /// The last lines etcd logged (for failure messages).
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// (Re)starts etcd on the same data directory and waits until it answers.
    pub fn start(&mut self) -> Result<()> {
        assert!(self.pid.is_none(), "etcd already running");
        let a = self.addr;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = self.ns.command("etcd");
        cmd.args([
            "--data-dir",
            &self.dir.join("data").to_string_lossy(),
            "--name",
            "default",
            "--listen-client-urls",
            &format!("http://{a}:2379"),
            "--advertise-client-urls",
            &format!("http://{a}:2379"),
            "--listen-peer-urls",
            &format!("http://{a}:2380"),
            "--initial-advertise-peer-urls",
            &format!("http://{a}:2380"),
            "--initial-cluster",
            &format!("default=http://{a}:2380"),
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        self.pid = Some(self.ns.spawn(cmd)?);

        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self
                .etcdctl(&["endpoint", "health", "--command-timeout=1s"])
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd at {} did not become healthy within 30 s; log:\n{}",
                    self.endpoint(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops etcd (SIGTERM, waits), keeping its data.
    pub fn stop(&mut self) {
        if let Some(pid) = self.pid.take() {
            self.ns.kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
    }

    /// Runs etcdctl (v3 API) against this etcd from the root namespace; returns stdout.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let ep = format!("--endpoints={}", self.endpoint());
        let mut full = vec![ep.as_str(), "--dial-timeout=2s"];
        full.extend_from_slice(args);
        let out = std::process::Command::new("etcdctl")
            .args(&full)
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::null())
            .output()
            .context("spawning etcdctl")?;
        if !out.status.success() {
            bail!(
                "etcdctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Puts a key with no lease.
    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        // `--` so values starting with '-' are not flags.
        self.etcdctl(&["put", "--", key, value]).map(|_| ())
    }

    /// Puts a key attached to a new lease of `ttl_secs`.
    pub fn put_with_ttl(&self, key: &str, value: &str, ttl_secs: u32) -> Result<()> {
        let out = self.etcdctl(&["lease", "grant", &ttl_secs.to_string()])?;
        // "lease 694d7b3b1c4f0a0b granted with TTL(60s)"
        let id = out
            .split_whitespace()
            .nth(1)
            .context("parsing `etcdctl lease grant` output")?
            .to_string();
        self.etcdctl(&["put", "--lease", &id, "--", key, value])
            .map(|_| ())
    }

    pub fn del(&self, key: &str) -> Result<()> {
        self.etcdctl(&["del", key]).map(|_| ())
    }

    /// (value, lease id) of a key; lease 0 means no lease.
    pub fn get(&self, key: &str) -> Result<Option<(String, i64)>> {
        let out = self.etcdctl(&["get", key, "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("parsing etcdctl json")?;
        let Some(kv) = v["kvs"].as_array().and_then(|a| a.first()) else {
            return Ok(None);
        };
        let lease = kv["lease"].as_i64().unwrap_or(0);
        let mut value = self.etcdctl(&["get", "--print-value-only", key])?;
        if value.ends_with('\n') {
            value.pop();
        }
        Ok(Some((value, lease)))
    }

    /// Keys under a prefix.
    pub fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        let out = self.etcdctl(&["get", "--prefix", "--keys-only", prefix])?;
        Ok(out
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// Remaining TTL of an etcd lease in seconds (-1 when it does not exist).
    pub fn lease_ttl(&self, lease: i64) -> Result<i64> {
        let out = self.etcdctl(&["lease", "timetolive", &format!("{lease:x}"), "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v["ttl"].as_i64().unwrap_or(-1))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        // `ns` drops next: namespace and veth go with it.
    }
}
