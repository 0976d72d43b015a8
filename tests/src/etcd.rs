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
    /// The test process's address on the veth (the source etcd sees for the test's requests).
    pub host: Ipv4Addr,
    root_dev: String,
    dir: PathBuf,
    pid: Option<u32>,
    /// Client TLS (https, client certificates required) when set.
    tls: Option<Pki>,
    /// `user:password` for etcdctl once auth is enabled.
    user: Option<String>,
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub fn start_new() -> Result<Self> {
        Self::start_with(false)
    }

    /// Starts etcd serving clients over TLS only, requiring a client certificate signed by the
    /// test CA in [`Etcd::pki`].
    pub fn start_new_tls() -> Result<Self> {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Result<Self> {
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
        let tls = if tls {
            Some(Pki::generate(&dir.join("pki"), addr)?)
        } else {
            None
        };
        let mut etcd = Etcd {
            ns,
            addr,
            host,
            root_dev,
            dir,
            pid: None,
            tls,
            user: None,
        };
        etcd.start()?;
        Ok(etcd)
    }

    /// `http://ADDR:2379` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:2379", self.addr)
    }

    /// The certificates of a TLS etcd.
    pub fn pki(&self) -> Option<&Pki> {
        self.tls.as_ref()
    }

    /// A scratch directory removed with this guard.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Creates `root` with `password`, grants it the root role and enables authentication;
    /// etcdctl of this guard logs in as root from then on.
    pub fn enable_auth(&mut self, password: &str) -> Result<()> {
        self.etcdctl(&["user", "add", &format!("root:{password}")])?;
        self.etcdctl(&["user", "grant-role", "root", "root"])?;
        self.etcdctl(&["auth", "enable"])?;
        self.user = Some(format!("root:{password}"));
        Ok(())
    }

    /// Cuts the test process (the host side of the veth) off etcd's client port, or restores
    /// it. New connections are refused at once; established ones die with etcd's next restart.
    /// [`Etcd::etcdctl_local`] still works.
    pub fn block_host(&self, blocked: bool) -> Result<()> {
        reject_clients(&self.ns, &self.host.to_string(), blocked)
    }

    /// etcdctl run inside etcd's own namespace (works while [`Etcd::block_host`] is on).
    pub fn etcdctl_local(&self, args: &[&str]) -> Result<String> {
        let mut full = self.etcdctl_flags();
        full.extend(args.iter().map(|a| a.to_string()));
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        let out = self.ns.exec("etcdctl", &full)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn etcdctl_flags(&self) -> Vec<String> {
        let mut v = vec![
            format!("--endpoints={}", self.endpoint()),
            "--dial-timeout=2s".to_string(),
        ];
        if let Some(p) = &self.tls {
            v.push(format!("--cacert={}", p.ca.display()));
            v.push(format!("--cert={}", p.client_cert.display()));
            v.push(format!("--key={}", p.client_key.display()));
        }
        if let Some(u) = &self.user {
            v.push(format!("--user={u}"));
        }
        v
    }

    /// Name of the host side of the veth (root namespace).
    pub fn root_dev(&self) -> &str {
        &self.root_dev
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
        let client_url = self.endpoint();
        if let Some(p) = &self.tls {
            cmd.arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&p.ca)
                .arg("--cert-file")
                .arg(&p.server_cert)
                .arg("--key-file")
                .arg(&p.server_key);
        }
        cmd.args([
            "--data-dir",
            &self.dir.join("data").to_string_lossy(),
            "--name",
            "default",
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
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
            // From inside the namespace, so a blocked host does not matter.
            if self
                .etcdctl_local(&["endpoint", "health", "--command-timeout=1s"])
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
        let mut full = self.etcdctl_flags();
        full.extend(args.iter().map(|a| a.to_string()));
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

/// In etcd's namespace `ns`: every packet from `src` to the client port answered with a TCP
/// reset (an established connection breaks at its next packet, new ones are refused at once),
/// or that rule removed again.
pub fn reject_clients(ns: &Netns, src: &str, reject: bool) -> Result<()> {
    let op = if reject { "-I" } else { "-D" };
    ns.exec(
        "iptables",
        &[
            op,
            "INPUT",
            "-s",
            src,
            "-p",
            "tcp",
            "--dport",
            "2379",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ],
    )
    .map(|_| ())
}

/// A throwaway PKI made with the openssl CLI: a CA, a server certificate for etcd's address, a
/// client certificate, and a second, unrelated CA (to show a wrong `--etcd-cafile` is caught).
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub other_ca: PathBuf,
}

impl Pki {
    /// Writes everything into `dir` (EC P-256 keys, PKCS#8, valid for a day).
    pub fn generate(dir: &std::path::Path, server_ip: Ipv4Addr) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let f = |name: &str| dir.join(name);
        let s = |p: &PathBuf| p.to_string_lossy().into_owned();
        let openssl = |args: &[&str]| crate::netns::run("openssl", args).map(|_| ());
        let new_ca = |key: &PathBuf, cert: &PathBuf, cn: &str| {
            openssl(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &s(key),
                "-out",
                &s(cert),
                "-days",
                "1",
                "-subj",
                &format!("/CN={cn}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ])
        };
        new_ca(&f("ca.key"), &f("ca.pem"), "overlay-test-ca")?;
        new_ca(&f("other-ca.key"), &f("other-ca.pem"), "overlay-test-other-ca")?;
        let leaf = |name: &str, ext: String| -> Result<()> {
            let (key, csr, cert, extf) = (
                f(&format!("{name}.key")),
                f(&format!("{name}.csr")),
                f(&format!("{name}.pem")),
                f(&format!("{name}.ext")),
            );
            std::fs::write(&extf, ext)?;
            openssl(&[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &s(&key),
                "-out",
                &s(&csr),
                "-subj",
                &format!("/CN={name}"),
            ])?;
            openssl(&[
                "x509",
                "-req",
                "-in",
                &s(&csr),
                "-CA",
                &s(&f("ca.pem")),
                "-CAkey",
                &s(&f("ca.key")),
                "-CAcreateserial",
                "-out",
                &s(&cert),
                "-days",
                "1",
                "-extfile",
                &s(&extf),
            ])
        };
        leaf(
            "server",
            format!("subjectAltName=IP:{server_ip}\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n"),
        )?;
        leaf(
            "client",
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n".to_string(),
        )?;
        Ok(Pki {
            ca: f("ca.pem"),
            server_cert: f("server.pem"),
            server_key: f("server.key"),
            client_cert: f("client.pem"),
            client_key: f("client.key"),
            other_ca: f("other-ca.pem"),
        })
    }
}

/// Three etcd members in one namespace, each on its own address of a /29 taken out of
/// 198.19.0.0/16, reachable from the test process over one veth. Drop kills every member and
/// removes the namespace and the data directories.
pub struct EtcdCluster {
    ns: Netns,
    pub addrs: [Ipv4Addr; 3],
    dir: PathBuf,
    pids: [Option<u32>; 3],
}

impl EtcdCluster {
    /// Starts all three members and waits until each answers.
    pub fn start_new() -> Result<Self> {
        // Four /30 counter slots always contain one aligned pair = one /29 of our own.
        let n = NEXT_BLOCK.fetch_add(4, Ordering::Relaxed);
        let slot = (std::process::id().wrapping_mul(64).wrapping_add(n + (n & 1))) % 16384;
        let base = u32::from(Ipv4Addr::new(198, 19, 0, 0)) + slot * 4;
        let host = Ipv4Addr::from(base + 1);
        let addrs = [
            Ipv4Addr::from(base + 2),
            Ipv4Addr::from(base + 3),
            Ipv4Addr::from(base + 4),
        ];

        let ns = Netns::new("etcdc")?;
        let root_dev = unique_name("etc");
        veth(&ns, "eth0", None, &root_dev)?;
        for a in addrs {
            ns.ip(&["addr", "add", &format!("{a}/29"), "dev", "eth0"])?;
        }
        crate::netns::ip(&["addr", "add", &format!("{host}/29"), "dev", &root_dev])?;
        let dir = std::env::temp_dir().join(format!("overlay-etcdc-{}", unique_name("d")));
        std::fs::create_dir_all(&dir)?;
        let mut c = EtcdCluster {
            ns,
            addrs,
            dir,
            pids: [None; 3],
        };
        for i in 0..3 {
            c.spawn_member(i)?;
        }
        for i in 0..3 {
            c.wait_healthy(i)?;
        }
        Ok(c)
    }

    /// `http://ADDR:2379` of each member.
    pub fn endpoints(&self) -> Vec<String> {
        self.addrs.iter().map(|a| format!("http://{a}:2379")).collect()
    }

    fn spawn_member(&mut self, i: usize) -> Result<()> {
        assert!(self.pids[i].is_none(), "member {i} already running");
        let a = self.addrs[i];
        let initial: Vec<String> = self
            .addrs
            .iter()
            .enumerate()
            .map(|(j, a)| format!("m{j}=http://{a}:2380"))
            .collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("m{i}.log")))?;
        let mut cmd = self.ns.command("etcd");
        cmd.args(["--name", &format!("m{i}"), "--data-dir"])
            .arg(self.dir.join(format!("m{i}")))
            .args([
                "--listen-client-urls",
                &format!("http://{a}:2379"),
                "--advertise-client-urls",
                &format!("http://{a}:2379"),
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://{a}:2380"),
                "--initial-advertise-peer-urls",
                &format!("http://{a}:2380"),
            ])
            .args([
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-state",
                "new",
            ])
            .args(["--initial-cluster-token", &format!("ovl-{}", self.ns.name)])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.pids[i] = Some(self.ns.spawn(cmd)?);
        Ok(())
    }

    fn wait_healthy(&self, i: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self
                .etcdctl_at(i, &["endpoint", "health", "--command-timeout=1s"])
                .is_ok()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "etcd member m{i} did not become healthy within 30 s; see {}",
            self.dir.display()
        )
    }

    /// Kills member `i` (SIGKILL: a crash, not a shutdown).
    pub fn kill_member(&mut self, i: usize) {
        if let Some(pid) = self.pids[i].take() {
            self.ns.kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// Restarts member `i` on its data directory and waits until it answers.
    pub fn restart_member(&mut self, i: usize) -> Result<()> {
        self.spawn_member(i)?;
        self.wait_healthy(i)
    }

    /// etcdctl against member `i` only.
    pub fn etcdctl_at(&self, i: usize, args: &[&str]) -> Result<String> {
        let ep = format!("--endpoints=http://{}:2379", self.addrs[i]);
        let mut full = vec![ep.as_str(), "--dial-timeout=2s"];
        full.extend_from_slice(args);
        let out = crate::netns::run("etcdctl", &full)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// etcdctl against every member that runs.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let eps: Vec<String> = (0..3)
            .filter(|i| self.pids[*i].is_some())
            .map(|i| format!("http://{}:2379", self.addrs[i]))
            .collect();
        let ep = format!("--endpoints={}", eps.join(","));
        let mut full = vec![ep.as_str(), "--dial-timeout=2s", "--command-timeout=5s"];
        full.extend_from_slice(args);
        let out = crate::netns::run("etcdctl", &full)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// [`EtcdCluster::etcdctl`], retried for up to 20 s (a leader election after a member
    /// died or came back takes a few seconds).
    pub fn etcdctl_retry(&self, args: &[&str]) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.etcdctl(args) {
                Ok(out) => return Ok(out),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Members the test process (the agent, in-process) has established client connections
    /// to, by index.
    pub fn members_with_client_connections(&self) -> Result<Vec<usize>> {
        let out = self
            .ns
            .exec("ss", &["-Htn", "state", "established", "( sport = :2379 )"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let host = Ipv4Addr::from(u32::from(self.addrs[0]) - 1).to_string();
        let mut v: Vec<usize> = (0..3)
            .filter(|i| {
                let local = format!("{}:2379", self.addrs[*i]);
                text.lines()
                    .any(|l| l.contains(&local) && l.contains(&format!("{host}:")))
            })
            .collect();
        v.dedup();
        Ok(v)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill_member(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
