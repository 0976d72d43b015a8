//! Tier 4 of `cargo xtask test`, and `cargo xtask vm`: Debian's own kernels (6.1 and 6.12),
//! each booted under qemu with virtme-ng, running test binaries cargo built on the host.
//!
//! - qemu runs on TCG: this machine is itself a VM, and Debian's kernels hang under its
//!   paravirtual KVM.
//! - virtme-ng shares the host's `/` read-only over 9p (tmpfs overlays on /etc, /lib, /usr, /var,
//!   /tmp), so the guest runs the host's etcd, iproute2, ..., the agent in `target/debug` and the
//!   test binaries in `target/debug/deps` as they are. One directory per kernel is writable:
//!   `target/vm/VERSION/guest`, where `xtask/vm-guest.sh` (run by `vng --exec`) writes its log.
//!   vng's own exit status says nothing (255 without udev on the host), so pass and fail are
//!   read from that log alone: a run without its end line failed.
//! - Downloads are cached outside the repository (a fresh clone on the same machine reuses them)
//!   in `$OVERLAY_VM_CACHE`, default `/var/cache/overlay-agent-vm`: `virtme-ng-VERSION/` (a
//!   Python venv with virtme-ng from PyPI) and `kernels/VERSION/` (a `linux-image-*` package
//!   extracted with `dpkg-deb -x` and `depmod` run on it, not installed). The newest package of
//!   each series in APT's lists is used, so a new Debian ABI is picked up by itself (and the
//!   older one of that series removed from the cache).

use std::{
    collections::HashMap,
    fmt::Write as _,
    fs::File,
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::prev_release::workspace_root;

/// One kernel series: Debian's newest `linux-image-PREFIX<N>SUFFIX` (generic `-amd64` flavour:
/// the `-cloud-amd64` kernels lack 9p).
#[derive(Debug, PartialEq, Eq)]
pub struct Series {
    /// What `--kernel` takes.
    pub name: &'static str,
    /// The kernel version (the package name without `linux-image-`) is PREFIX, a number, SUFFIX.
    prefix: &'static str,
    suffix: &'static str,
}

/// The kernels tier 4 boots, in this order.
pub const SERIES: &[Series] = &[
    // bookworm's own kernel: the oldest a Debian 12 node runs (clsact qdiscs, no TCX).
    Series {
        name: "6.1",
        prefix: "6.1.0-",
        suffix: "-amd64",
    },
    // bookworm-security's newer kernel (TCX).
    Series {
        name: "6.12",
        prefix: "6.12.",
        suffix: "+deb12-amd64",
    },
];

/// Tier 2 runs in full in every VM; of tier 3 these (test binary, exact test name), each as one
/// run of its binary with `--exact`. A name that no longer exists fails the tier (a filter that
/// matches nothing does not count as passed).
#[rustfmt::skip]
pub const TIER3_SELECTION: &[(&str, &str)] = &[
    ("netns_datapath", "xdp_decap_two_nodes_forward_pod_traffic"),
    ("netns_datapath", "tc_decap_delivers_straight_to_the_pod_with_redirect_peer"),
    ("netns_datapath", "xdp_decap_then_tc_delivers_straight_to_the_pod"),
    ("netns_datapath", "tc_decap_delivers_straight_to_the_pod_through_its_veth"),
    ("netns_cluster", "agent_restart_keeps_its_subnet_and_traffic_flows_again"),
    ("netns_cluster", "direct_routing_peers_on_the_same_segment_skip_encapsulation"),
    ("netns_cluster", "restarts_lose_no_packet_of_a_steady_udp_flow"),
    ("netns_cluster", "mixed_cluster_with_a_kernel_vxlan_flannel_node"),
    (
        "netns_cluster",
        "receive_gro_merges_nic_frames_before_tc_decap_and_its_device_delivers_nothing",
    ),
    ("netns_dualstack", "dual_stack_pods_talk_over_ipv6_and_ipv4_with_their_own_addresses"),
    ("netns_dualstack_deliver", "ipv6_stripped_by_xdp_is_delivered_by_the_tc_program_after_gro"),
    ("netns_ops", "ip_masq_snat_restart_and_cleanup"),
    ("netns_services", "ipvs_mode_default_delivery"),
    ("netns_services", "ipvs_mode_host_gw"),
    ("netns_hostgw", "host_gw_nodes_route_pods_bare_keep_sources_and_follow_the_leases"),
    ("netns_monitor", "each_drop_reason_shows_up_with_its_fields_xdp_decap"),
    ("netns_peer_stats", "vxlan_counts_each_peer_exactly_over_ipv4_and_ipv6"),
];

const VIRTME_NG_VERSION: &str = "1.42";
const CACHE_ENV: &str = "OVERLAY_VM_CACHE";
const DEFAULT_CACHE: &str = "/var/cache/overlay-agent-vm";
const GUEST_SCRIPT: &str = include_str!("../vm-guest.sh");
const MARK: &str = "##xtask-vm## ";
const CPUS: &str = "2";
const MEMORY: &str = "2G";
/// Limits inside the guest, per run: a whole tier-2 binary (6.1 took ~3 minutes for both, most
/// of it one fuzz test), one tier-3 test.
const TIER2_RUN_TIMEOUT_SECS: u64 = 20 * 60;
const TIER3_RUN_TIMEOUT_SECS: u64 = 10 * 60;
/// `OVERLAY_TEST_SLOWDOWN` in the guest unless the host sets it: the harness's waits (etcd, an
/// agent's subnet.env, ...) stretch by it under TCG, several times slower than the host (and
/// slower still while anything else runs: an agent took 10 s to load its programs on 6.12 with
/// another VM running, against the harness's 20 s for the whole lease).
const GUEST_SLOWDOWN: &str = "5";
/// Passed from the host's environment into the guest when set there (tier 4 sets
/// `OVERLAY_AGENT_BIN` to its snapshot of `target/debug/overlay-agent` otherwise).
const GUEST_ENV: &[&str] = &[
    "OVERLAY_TEST_SLOWDOWN",
    "OVERLAY_AGENT_BIN",
    "OVERLAY_DECAP",
    "RUST_BACKTRACE",
    "RUST_LIB_BACKTRACE",
    "RUST_LOG",
];
/// The limit on one VM, boot to power-off (`--vm-timeout`); a hung guest is killed.
pub const DEFAULT_VM_TIMEOUT_MINS: u64 = 30;

/// The series `--kernel` names (each a series name; several, or comma-separated), all if none.
pub fn select(names: &[String]) -> Result<Vec<&'static Series>> {
    let known = || SERIES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ");
    for n in names {
        if !SERIES.iter().any(|s| s.name == n.trim()) {
            bail!(
                "--kernel {n:?}: not a kernel series tier 4 knows (known: {})",
                known()
            );
        }
    }
    Ok(SERIES
        .iter()
        .filter(|s| names.is_empty() || names.iter().any(|n| n.trim() == s.name))
        .collect())
}

impl Series {
    /// The number in a version of this series (`6.1.0-57-amd64` → 57), if it is one.
    fn number(&self, version: &str) -> Option<u32> {
        let n = version.strip_prefix(self.prefix)?.strip_suffix(self.suffix)?;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        n.parse().ok()
    }

    /// `apt-cache search --names-only` pattern for this series' packages.
    fn apt_pattern(&self) -> String {
        let esc = |s: &str| s.replace('.', "\\.").replace('+', "\\+");
        format!("^linux-image-{}[0-9]+{}$", esc(self.prefix), esc(self.suffix))
    }
}

/// The newest kernel version of the series in an `apt-cache search` listing (`NAME - summary`
/// lines); other packages (`-unsigned`, `-dbg`, `-cloud-amd64`, other series) are ignored.
pub fn newest_version(series: &Series, listing: &str) -> Option<String> {
    listing
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.strip_prefix("linux-image-"))
        .filter_map(|v| Some((series.number(v)?, v)))
        .max_by_key(|(n, _)| *n)
        .map(|(_, v)| v.to_string())
}

/// A kernel ready to boot.
pub struct Kernel {
    pub series: &'static str,
    pub version: String,
    pub vmlinuz: PathBuf,
}

/// What booting needs: virtme-ng's venv and the kernels.
pub struct Vms {
    venv_bin: PathBuf,
    pub kernels: Vec<Kernel>,
}

fn cache_dir() -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE))
}

/// Makes the cache hold virtme-ng and the newest kernel of each series (downloading what it
/// lacks), under a lock so two runs on one machine do not build it at once.
pub fn prepare(series: &[&'static Series]) -> Result<Vms> {
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let _lock = Lock::take(&cache.join("lock"))?;
    let started = Instant::now();
    let venv_bin = ensure_venv(&cache)?;
    let mut kernels = Vec::new();
    for s in series {
        kernels.push(ensure_kernel(&cache, s)?);
    }
    let secs = started.elapsed().as_secs();
    if secs > 5 {
        eprintln!("xtask: VM cache {} ready in {secs} s", cache.display());
    }
    Ok(Vms { venv_bin, kernels })
}

/// `flock(2)` on a file in the cache, released when dropped (or when the process dies).
struct Lock(#[allow(dead_code)] File);

impl Lock {
    fn take(path: &Path) -> Result<Self> {
        use std::os::fd::AsRawFd as _;
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on an fd we own; no memory is passed.
        if unsafe { flock(f.as_raw_fd(), LOCK_EX) } != 0 {
            bail!("locking {}: {}", path.display(), std::io::Error::last_os_error());
        }
        Ok(Lock(f))
    }
}

const LOCK_EX: i32 = 2;
const SIGKILL: i32 = 9;

extern "C" {
    fn flock(fd: i32, operation: i32) -> i32;
    fn kill(pid: i32, sig: i32) -> i32;
}

/// A marker written last, so a half-made directory (interrupted download, pip run) is redone.
const COMPLETE: &str = ".complete";

fn ensure_venv(cache: &Path) -> Result<PathBuf> {
    let venv = cache.join(format!("virtme-ng-{VIRTME_NG_VERSION}"));
    let bin = venv.join("bin");
    if venv.join(COMPLETE).is_file() && bin.join("vng").is_file() {
        return Ok(bin);
    }
    eprintln!(
        "xtask: installing virtme-ng {VIRTME_NG_VERSION} from PyPI into {}",
        venv.display()
    );
    if venv.exists() {
        std::fs::remove_dir_all(&venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(bin.join("pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("virtme-ng=={VIRTME_NG_VERSION}"),
    ]))?;
    if !bin.join("vng").is_file() {
        bail!(
            "pip installed virtme-ng, but {} is missing",
            bin.join("vng").display()
        );
    }
    std::fs::write(venv.join(COMPLETE), "")?;
    Ok(bin)
}

fn apt_search(series: &Series) -> Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args(["search", "--names-only", &series.apt_pattern()])
        .stderr(Stdio::inherit())
        .output()
        .context("running apt-cache (is this Debian?)")?;
    if !out.status.success() {
        bail!(
            "`apt-cache search --names-only {}` failed ({})",
            series.apt_pattern(),
            out.status
        );
    }
    Ok(newest_version(series, &String::from_utf8_lossy(&out.stdout)))
}

fn apt_update() -> Result<()> {
    eprintln!("xtask: apt-get update (for the kernel packages)");
    run(Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The newest complete kernel of the series already in the cache.
fn cached_kernel(kernels: &Path, series: &Series) -> Option<String> {
    let listing: String = std::fs::read_dir(kernels)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join(COMPLETE).is_file())
        .filter_map(|e| Some(format!("linux-image-{}\n", e.file_name().to_str()?)))
        .collect();
    newest_version(series, &listing)
}

fn kernel_at(kernels: &Path, series: &'static Series, version: &str) -> Kernel {
    Kernel {
        series: series.name,
        version: version.to_string(),
        vmlinuz: kernels
            .join(version)
            .join("boot")
            .join(format!("vmlinuz-{version}")),
    }
}

fn ensure_kernel(cache: &Path, series: &'static Series) -> Result<Kernel> {
    let kernels = cache.join("kernels");
    std::fs::create_dir_all(&kernels)?;
    let cached = cached_kernel(&kernels, series);
    let mut newest = apt_search(series)?;
    if newest.is_none() {
        apt_update()?;
        newest = apt_search(series)?;
    }
    let Some(mut version) = newest else {
        if let Some(v) = cached {
            eprintln!(
                "xtask: no linux-image for {} in APT's lists; using the cached {v}",
                series.name
            );
            return Ok(kernel_at(&kernels, series, &v));
        }
        bail!(
            "no package matches {} in APT's lists (after apt-get update): is bookworm(-security) in \
             the APT sources?",
            series.apt_pattern()
        );
    };
    if cached.as_deref() != Some(version.as_str()) {
        let downloads = cache.join("downloads");
        let mut got = download_kernel(&downloads, &version);
        if got.is_err() {
            // The lists may be older than the archive, which drops old ABIs.
            eprintln!(
                "xtask: {:#}; updating APT's lists and trying again",
                got.as_ref().unwrap_err()
            );
            apt_update()?;
            if let Some(v) = apt_search(series)? {
                version = v;
            }
            got = download_kernel(&downloads, &version);
        }
        match got {
            Ok(deb) => {
                extract_kernel(&kernels, &deb, &version)?;
                let _ = std::fs::remove_file(&deb);
                prune(&kernels, series, &version);
            }
            Err(e) => match cached {
                Some(v) => {
                    eprintln!("xtask: {e:#}; using the cached {v} instead of {version}");
                    version = v;
                }
                None => return Err(e),
            },
        }
    }
    let k = kernel_at(&kernels, series, &version);
    if !k.vmlinuz.is_file() {
        bail!(
            "{} is missing (remove {} to redo it)",
            k.vmlinuz.display(),
            kernels.join(&version).display()
        );
    }
    Ok(k)
}

/// `apt-get download linux-image-VERSION` into `dir`; the .deb's path.
fn download_kernel(dir: &Path, version: &str) -> Result<PathBuf> {
    let package = format!("linux-image-{version}");
    std::fs::create_dir_all(dir)?;
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
    };
    if let Some(deb) = find() {
        let _ = std::fs::remove_file(deb); // maybe cut short; a new one is quick
    }
    eprintln!("xtask: downloading {package} into {}", dir.display());
    // As root in a directory _apt cannot write, apt warns "Download is performed unsandboxed":
    // harmless.
    run(Command::new("apt-get")
        .current_dir(dir)
        .args(["download", "-q", &package]))?;
    find().with_context(|| format!("apt-get download left no {package}_*.deb in {}", dir.display()))
}

fn extract_kernel(kernels: &Path, deb: &Path, version: &str) -> Result<()> {
    let tmp = kernels.join(format!(".{version}.tmp"));
    let dest = kernels.join(version);
    for d in [&tmp, &dest] {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    eprintln!("xtask: extracting {} into {}", deb.display(), dest.display());
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp))?;
    run(Command::new("depmod").arg("-a").arg("-b").arg(&tmp).arg(version))?;
    std::fs::write(tmp.join(COMPLETE), "")?;
    std::fs::rename(&tmp, &dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))
}

/// Removes the series' other kernels from the cache.
fn prune(kernels: &Path, series: &Series, keep: &str) {
    let Ok(entries) = std::fs::read_dir(kernels) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name != keep && series.number(&name).is_some() {
            eprintln!("xtask: removing the older {name} from the VM cache");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let what = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// `cargo test -p overlay-tests --no-run --message-format=json --test ...`: each test binary's
/// executable, by name. The tiers before have built them, so this is quick.
pub fn build_test_binaries(names: &[&str]) -> Result<HashMap<String, PathBuf>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args([
        "test",
        "--package",
        "overlay-tests",
        "--no-run",
        "--message-format=json",
    ]);
    for n in names {
        cmd.args(["--test", n]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cargo}"))?;
    if !out.status.success() {
        bail!("building the test binaries for tier 4 failed ({})", out.status);
    }
    let found = test_executables(&String::from_utf8_lossy(&out.stdout));
    for n in names {
        if !found.contains_key(*n) {
            bail!("cargo built no test binary named {n} (is tests/tier3/{n}.rs gone?)");
        }
    }
    Ok(found)
}

/// From cargo's JSON messages, every test target's executable by target name.
pub fn test_executables(json: &str) -> HashMap<String, PathBuf> {
    json.lines()
        .filter(|l| l.contains(r#""reason":"compiler-artifact""#) && l.contains(r#""kind":["test"]"#))
        .filter_map(|l| {
            let target = &l[l.find(r#""target":{"#)?..];
            Some((
                json_string(target, "name")?,
                PathBuf::from(json_string(l, "executable")?),
            ))
        })
        .collect()
}

/// The first `"key":"value"` string in a JSON text, unescaped (enough for cargo's messages).
fn json_string(text: &str, key: &str) -> Option<String> {
    let start = text.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let mut out = String::new();
    let mut chars = text[start..].chars();
    loop {
        match chars.next()? {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                c => out.push(c),
            },
            c => out.push(c),
        }
    }
}

/// One run in the guest: a test binary, whole (tier 2) or one exact test (tier 3).
#[derive(Clone, Debug)]
pub struct Planned {
    pub binary: String,
    pub test: Option<String>,
    pub exe: PathBuf,
    pub timeout_secs: u64,
}

impl Planned {
    /// Its id in the plan and log, and its name in reports.
    pub fn id(&self) -> String {
        match &self.test {
            None => self.binary.clone(),
            Some(t) => format!("{}::{t}", self.binary),
        }
    }

    fn args(&self) -> Vec<String> {
        let mut a = vec!["--test-threads=1".to_string()];
        if let Some(t) = &self.test {
            a.extend(["--exact".to_string(), t.clone()]);
        }
        a
    }
}

/// Tier 2's binaries in full, then [`TIER3_SELECTION`] one test per run.
pub fn tier4_plan(tier2: &[&str], exes: &HashMap<String, PathBuf>) -> Result<Vec<Planned>> {
    let exe = |b: &str| {
        exes.get(b)
            .cloned()
            .with_context(|| format!("no executable for test binary {b}"))
    };
    let mut plan = Vec::new();
    for b in tier2 {
        plan.push(Planned {
            binary: b.to_string(),
            test: None,
            exe: exe(b)?,
            timeout_secs: TIER2_RUN_TIMEOUT_SECS,
        });
    }
    for (b, t) in TIER3_SELECTION {
        plan.push(Planned {
            binary: b.to_string(),
            test: Some(t.to_string()),
            exe: exe(b)?,
            timeout_secs: TIER3_RUN_TIMEOUT_SECS,
        });
    }
    Ok(plan)
}

/// The guest's plan file (see xtask/vm-guest.sh).
fn plan_text(lines: &[(String, u64, PathBuf, PathBuf, Vec<String>)]) -> Result<String> {
    let mut out = String::new();
    for (id, timeout, workdir, program, args) in lines {
        let fields = [
            id.clone(),
            workdir.display().to_string(),
            program.display().to_string(),
        ];
        for f in fields.iter().chain(args) {
            if f.is_empty() || f.contains(char::is_whitespace) {
                bail!("{f:?}: the guest's plan cannot carry an empty field or one with spaces");
            }
        }
        let _ = writeln!(
            out,
            "{id} {timeout} {} {} {}",
            fields[1],
            fields[2],
            args.join(" ")
        );
    }
    Ok(out)
}

/// What one VM left in its log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GuestLog {
    /// `uname -r` in the guest.
    pub kernel: Option<String>,
    pub runs: Vec<RunOutput>,
    /// The guest script reached its end.
    pub done: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub struct RunOutput {
    pub id: String,
    pub output: String,
    /// Exit status and seconds, from the end line; None: the run never ended.
    pub end: Option<(i32, u64)>,
}

/// Splits the guest's log at its marker lines (see xtask/vm-guest.sh). A marker may follow
/// output that did not end its line.
pub fn parse_log(text: &str) -> GuestLog {
    let mut log = GuestLog::default();
    for line in text.split_inclusive('\n') {
        let (before, marker) = match line.find(MARK) {
            Some(i) => (&line[..i], Some(line[i + MARK.len()..].trim())),
            None => (line, None),
        };
        if let Some(r) = log.runs.last_mut().filter(|r| r.end.is_none()) {
            r.output.push_str(before);
        }
        let Some(m) = marker else { continue };
        let mut words = m.split_whitespace();
        match (words.next(), words.next()) {
            (Some("kernel"), Some(k)) => log.kernel = Some(k.to_string()),
            (Some("begin"), Some(id)) => log.runs.push(RunOutput {
                id: id.to_string(),
                output: String::new(),
                end: None,
            }),
            (Some("end"), Some(id)) => {
                let field = |name: &str| {
                    m.split_whitespace()
                        .find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse::<i64>().ok())
                };
                if let Some(r) = log.runs.iter_mut().rev().find(|r| r.id == id && r.end.is_none()) {
                    r.end = Some((
                        field("rc").unwrap_or(-1) as i32,
                        field("secs").unwrap_or(0).max(0) as u64,
                    ));
                }
            }
            (Some("done"), _) => log.done = true,
            _ => {}
        }
    }
    log
}

/// libtest's `test result: ...` counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub passed: u32,
    pub failed: u32,
    pub ignored: u32,
}

/// The last `test result: ok. 17 passed; 0 failed; 0 ignored; ...` line in a test binary's
/// output (children's output may share the line, so it is looked for anywhere in one).
pub fn summary(output: &str) -> Option<Summary> {
    let line = output.lines().rev().find(|l| l.contains("test result: "))?;
    let rest = &line[line.find("test result: ")? + "test result: ".len()..];
    // "ok. 17 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.2s"
    let counts = rest.split_once(". ")?.1;
    let count = |what: &str| -> Option<u32> {
        counts.split(';').find_map(|part| {
            let mut w = part.split_whitespace();
            let n = w.next()?.parse().ok()?;
            (w.next()? == what).then_some(n)
        })
    };
    Some(Summary {
        passed: count("passed")?,
        failed: count("failed")?,
        ignored: count("ignored").unwrap_or(0),
    })
}

/// The names libtest lists under its last `failures:` heading.
pub fn failures(output: &str) -> Vec<String> {
    let lines: Vec<&str> = output.lines().collect();
    let Some(at) = lines.iter().rposition(|l| l.trim_end() == "failures:") else {
        return Vec::new();
    };
    lines[at + 1..]
        .iter()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| l.starts_with("    ") && !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .collect()
}

/// The test libtest announced last (`test NAME ... `), for a run cut short.
fn last_started(output: &str) -> Option<&str> {
    output
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("test ")?.split(" ... ").next())
}

/// Pass or fail of one planned run: how many tests passed, and each failure with its reason.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub passed: u32,
    pub failed: Vec<String>,
}

pub fn judge(p: &Planned, out: Option<&RunOutput>) -> Verdict {
    let id = p.id();
    let fail = |why: String| Verdict {
        passed: 0,
        failed: vec![format!("{id}: {why}")],
    };
    let Some(out) = out else {
        return fail("not run (the guest stopped before it)".into());
    };
    let cut_short = |what: &str| {
        let during = last_started(&out.output)
            .map(|t| format!(", during {t}"))
            .unwrap_or_default();
        format!("{what}{during}")
    };
    let Some((rc, secs)) = out.end else {
        return fail(cut_short("did not finish: the guest died or hit the VM timeout"));
    };
    if rc == 124 || rc == 137 {
        return fail(cut_short(&format!(
            "timed out after {secs} s (limit {} s)",
            p.timeout_secs
        )));
    }
    let Some(s) = summary(&out.output) else {
        return fail(cut_short(&format!(
            "exit status {rc} and no libtest summary: it crashed"
        )));
    };
    match &p.test {
        Some(name) => {
            let ran = out.output.contains(&format!("test {name} ... "));
            if s.passed + s.failed + s.ignored == 0 {
                fail("no test ran: no test has exactly this name (renamed? edit TIER3_SELECTION)".into())
            } else if s.failed > 0 {
                fail("FAILED".into())
            } else if s.ignored > 0 && s.passed == 0 {
                fail("ignored (#[ignore]), so not run".into())
            } else if s.passed != 1 || !ran {
                fail(format!(
                    "expected this one test to run, libtest reports {} passed",
                    s.passed
                ))
            } else if rc != 0 {
                fail(format!("exit status {rc} although the test passed"))
            } else {
                Verdict {
                    passed: 1,
                    failed: Vec::new(),
                }
            }
        }
        None => {
            let mut failed: Vec<String> = failures(&out.output)
                .into_iter()
                .map(|t| format!("{id}::{t}: FAILED"))
                .collect();
            if failed.is_empty() {
                if s.failed > 0 {
                    failed.push(format!("{id}: {} tests FAILED", s.failed));
                } else if s.passed == 0 {
                    failed.push(format!("{id}: no test ran"));
                } else if rc != 0 {
                    failed.push(format!("{id}: exit status {rc} although its tests passed"));
                }
            }
            Verdict {
                passed: s.passed,
                failed,
            }
        }
    }
}

/// One kernel's tier-4 outcome.
pub struct KernelResult {
    pub version: String,
    pub secs: u64,
    pub boot_secs: Option<u64>,
    /// (passed, failed) per tier.
    pub tier2: (u32, u32),
    pub tier3: (u32, u32),
    pub failed: Vec<String>,
}

impl KernelResult {
    pub fn line(&self) -> String {
        let boot = self
            .boot_secs
            .map(|b| format!(" (boot {b} s)"))
            .unwrap_or_default();
        if self.failed.is_empty() {
            format!(
                "tier 4: {}: {}+{} tests passed in {} s{boot}",
                self.version, self.tier2.0, self.tier3.0, self.secs
            )
        } else {
            format!(
                "tier 4: {}: FAILED: {}+{} tests passed, {} failed, in {} s{boot}",
                self.version,
                self.tier2.0,
                self.tier3.0,
                self.failed.len(),
                self.secs
            )
        }
    }
}

/// Judges every planned run of one VM from its log.
pub fn judge_kernel(
    version: &str,
    plan: &[Planned],
    log: &GuestLog,
    secs: u64,
    boot_secs: Option<u64>,
) -> KernelResult {
    let mut r = KernelResult {
        version: version.to_string(),
        secs,
        boot_secs,
        tier2: (0, 0),
        tier3: (0, 0),
        failed: Vec::new(),
    };
    match &log.kernel {
        None => r
            .failed
            .push("the guest script never started (see console.log)".into()),
        Some(k) if k != version => r.failed.push(format!("the guest ran kernel {k}, not {version}")),
        Some(_) => {}
    }
    for p in plan {
        let v = judge(p, log.runs.iter().find(|o| o.id == p.id()));
        let tier = if p.test.is_none() {
            &mut r.tier2
        } else {
            &mut r.tier3
        };
        tier.0 += v.passed;
        tier.1 += v.failed.len() as u32;
        r.failed.extend(v.failed);
    }
    if log.kernel.is_some() && !log.done && r.failed.is_empty() {
        r.failed.push("the guest script did not finish".into());
    }
    r
}

/// The final table of tier 4.
pub fn table(results: &[KernelResult]) -> String {
    let w = results
        .iter()
        .map(|r| r.version.len())
        .max()
        .unwrap_or(0)
        .max("kernel".len());
    let mut out = format!(
        "  {:<w$}  {:>7}  {:>7}  {:>6}  {:>7}  result\n",
        "kernel", "tier 2", "tier 3", "boot", "total"
    );
    for r in results {
        let frac = |(p, f): (u32, u32)| format!("{p}/{}", p + f);
        let boot = r
            .boot_secs
            .map(|b| format!("{b} s"))
            .unwrap_or_else(|| "-".into());
        let result = if r.failed.is_empty() { "ok" } else { "FAILED" };
        let _ = writeln!(
            out,
            "  {:<w$}  {:>7}  {:>7}  {boot:>6}  {:>7}  {result}",
            r.version,
            frac(r.tier2),
            frac(r.tier3),
            format!("{} s", r.secs)
        );
        for f in &r.failed {
            let _ = writeln!(out, "      {f}");
        }
    }
    out
}

/// Where one kernel's VM writes: `target/vm/VERSION/` with `guest/` (the guest's writable
/// directory: plan, script, log, dmesg) and `console.log` (vng's output: the serial console).
struct VmDirs {
    guest: PathBuf,
    console: PathBuf,
}

impl VmDirs {
    fn fresh(version: &str) -> Result<Self> {
        let base = workspace_root().join("target").join("vm").join(version);
        if base.exists() {
            std::fs::remove_dir_all(&base).with_context(|| format!("removing {}", base.display()))?;
        }
        let guest = base.join("guest");
        std::fs::create_dir_all(&guest).with_context(|| format!("creating {}", guest.display()))?;
        Ok(VmDirs {
            console: base.join("console.log"),
            guest,
        })
    }
}

/// How one boot went, from the host's side.
struct Boot {
    log: GuestLog,
    secs: u64,
    /// Seconds until the guest script wrote its first line.
    boot_secs: Option<u64>,
    timed_out: bool,
}

/// Boots the kernel running `plan` (id, timeout, workdir, program, args) in the guest with the
/// environment file `env` ([`guest_env`]), streams
/// the guest's log to stdout as it grows, and returns it.
fn boot(vms: &Vms, k: &Kernel, dirs: &VmDirs, plan: &str, env: &str, timeout: Duration) -> Result<Boot> {
    std::fs::write(dirs.guest.join("plan"), plan)?;
    std::fs::write(dirs.guest.join("env"), env)?;
    let script = dirs.guest.join("guest.sh");
    std::fs::write(&script, GUEST_SCRIPT)?;
    let log_path = dirs.guest.join("log");
    std::fs::write(&log_path, "")?;
    let console =
        File::create(&dirs.console).with_context(|| format!("creating {}", dirs.console.display()))?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path =
        std::env::join_paths(std::iter::once(vms.venv_bin.clone()).chain(std::env::split_paths(&path)))?;
    let exec = format!("sh {} {}", script.display(), dirs.guest.display());
    let mut cmd = Command::new(vms.venv_bin.join("vng"));
    cmd.current_dir(workspace_root())
        // vng runs virtme-run by name.
        .env("PATH", path)
        .args(["--verbose", "--disable-kvm", "--run"])
        .arg(&k.vmlinuz)
        .args(["--cpus", CPUS, "--memory", MEMORY, "--name", "overlay-vm"])
        .arg("--rwdir")
        .arg(&dirs.guest)
        // The modules: vng links /lib/modules/VERSION to them, but the guest has an empty
        // tmpfs on /var/cache (and /var/tmp, ...), where the cache usually is.
        .arg("--rodir")
        .arg(
            k.vmlinuz
                .parent()
                .and_then(Path::parent)
                .context("kernel directory")?,
        )
        .arg("--cwd")
        .arg(workspace_root())
        .args(["--exec", &exec])
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console);
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting vng")?;
    let mut stream = Stream::new(&log_path, k.series);
    let mut boot_secs = None;
    let mut timed_out = false;
    loop {
        if stream.poll()? && boot_secs.is_none() {
            boot_secs = Some(started.elapsed().as_secs());
        }
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > timeout {
            eprintln!(
                "\nxtask: the {} VM hit its limit of {} min: killing it",
                k.version,
                timeout.as_secs() / 60
            );
            kill_tree(&mut child);
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = child.wait();
    stream.poll()?;
    stream.finish();
    let text = std::fs::read(&log_path).unwrap_or_default();
    Ok(Boot {
        log: parse_log(&String::from_utf8_lossy(&text)),
        secs: started.elapsed().as_secs(),
        boot_secs,
        timed_out,
    })
}

/// The guest's environment file: [`GUEST_ENV`] as the host has them, and
/// `OVERLAY_TEST_SLOWDOWN` ([`GUEST_SLOWDOWN`]) unless the host sets it.
fn guest_env(host: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::new();
    for name in GUEST_ENV {
        let value = host(name).or_else(|| (*name == "OVERLAY_TEST_SLOWDOWN").then(|| GUEST_SLOWDOWN.into()));
        if let Some(v) = value {
            let _ = writeln!(out, "export {name}={}", shell_quote(&v));
        }
    }
    out
}

/// Kills vng and everything under it (virtme-run, qemu).
fn kill_tree(child: &mut Child) {
    for _ in 0..2 {
        let mut pids = descendants(child.id());
        pids.push(child.id());
        for pid in pids.into_iter().rev() {
            // SAFETY: kill(2) with a pid and a signal number; no memory involved.
            unsafe { kill(pid as i32, SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every process under `root`, parents before children, from /proc/*/stat.
fn descendants(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            Some((pid, stat_ppid(&stat)?))
        })
        .collect();
    let mut out = vec![];
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (pid, _) in parents.iter().filter(|(_, pp)| *pp == p) {
            if !out.contains(pid) {
                out.push(*pid);
                frontier.push(*pid);
            }
        }
    }
    out
}

/// The parent pid in a /proc/PID/stat line (`pid (comm) state ppid ...`; comm may hold spaces
/// and parentheses).
fn stat_ppid(stat: &str) -> Option<u32> {
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Prints the guest's log as it grows, line by line, markers in words.
struct Stream {
    path: PathBuf,
    prefix: String,
    pos: u64,
    pending: Vec<u8>,
}

impl Stream {
    fn new(path: &Path, series: &str) -> Self {
        Stream {
            path: path.to_path_buf(),
            prefix: format!("[{series}] "),
            pos: 0,
            pending: Vec::new(),
        }
    }

    /// Prints what was added; true if anything was.
    fn poll(&mut self) -> Result<bool> {
        let Ok(mut f) = File::open(&self.path) else {
            return Ok(false);
        };
        f.seek(SeekFrom::Start(self.pos))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        if buf.is_empty() {
            return Ok(false);
        }
        self.pos += buf.len() as u64;
        self.pending.extend_from_slice(&buf);
        let mut out = std::io::stdout().lock();
        while let Some(nl) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=nl).collect();
            let _ = writeln!(
                out,
                "{}{}",
                self.prefix,
                show_line(&String::from_utf8_lossy(&line[..nl]))
            );
        }
        let _ = out.flush();
        Ok(true)
    }

    fn finish(&mut self) {
        if !self.pending.is_empty() {
            let line = String::from_utf8_lossy(&self.pending).into_owned();
            println!("{}{}", self.prefix, show_line(&line));
            self.pending.clear();
        }
    }
}

/// A log line as printed: the markers become headings.
fn show_line(line: &str) -> String {
    let Some(i) = line.find(MARK) else {
        return line.to_string();
    };
    let (before, m) = (&line[..i], &line[i + MARK.len()..]);
    let mut w = m.split_whitespace();
    let shown = match (w.next(), w.next()) {
        (Some("kernel"), Some(k)) => format!("--- guest up: kernel {k}"),
        (Some("begin"), Some(id)) => format!("--- {id}"),
        (Some("end"), Some(id)) => {
            let rest: Vec<&str> = w.collect();
            format!("--- {id}: {}", rest.join(" "))
        }
        (Some("done"), _) => "--- guest done".to_string(),
        _ => m.to_string(),
    };
    if before.is_empty() {
        shown
    } else {
        format!("{before}\n{shown}")
    }
}

fn print_console_tail(dirs: &VmDirs, lines: usize) {
    let text = std::fs::read_to_string(&dirs.console).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    eprintln!(
        "xtask: last lines of the VM's console ({}):",
        dirs.console.display()
    );
    for l in &all[all.len().saturating_sub(lines)..] {
        eprintln!("    {l}");
    }
}

/// Tier 4: for each kernel, tier 2 in full and [`TIER3_SELECTION`] in a VM; a summary line per
/// kernel, a table, and an error naming every failure.
pub fn tier4(vms: &Vms, tier2: &[&str], timeout: Duration) -> Result<()> {
    let mut names: Vec<&str> = tier2.to_vec();
    for (b, _) in TIER3_SELECTION {
        if !names.contains(b) {
            names.push(b);
        }
    }
    let exes = build_test_binaries(&names)?;
    // Both kernels test one build, even if cargo rebuilds target/debug meanwhile.
    let snap = workspace_root().join("target").join("vm").join("bin");
    let exes = snapshot(&snap, &exes)?;
    let agent = snapshot_one(&snap, &workspace_root().join("target/debug/overlay-agent"))?;
    let env = guest_env(|name| {
        std::env::var(name)
            .ok()
            .or_else(|| (name == "OVERLAY_AGENT_BIN").then(|| agent.display().to_string()))
    });
    let plan = tier4_plan(tier2, &exes)?;
    let workdir = workspace_root().join("tests");
    let lines: Vec<_> = plan
        .iter()
        .map(|p| (p.id(), p.timeout_secs, workdir.clone(), p.exe.clone(), p.args()))
        .collect();
    let plan_file = plan_text(&lines)?;
    let mut results = Vec::new();
    for k in &vms.kernels {
        eprintln!(
            "\n=== tier 4: {} in a VM (TCG): {} tier-2 binaries in full, {} tier-3 tests ===",
            k.version,
            tier2.len(),
            TIER3_SELECTION.len()
        );
        let dirs = VmDirs::fresh(&k.version)?;
        let b = boot(vms, k, &dirs, &plan_file, &env, timeout)?;
        let mut r = judge_kernel(&k.version, &plan, &b.log, b.secs, b.boot_secs);
        if b.timed_out {
            r.failed.insert(
                0,
                format!("the VM was killed at its limit of {} s", timeout.as_secs()),
            );
        }
        if !b.log.done {
            print_console_tail(&dirs, 40);
        }
        if !r.failed.is_empty() {
            eprintln!(
                "xtask: the guest's files (log, dmesg) are in {}, the console in {}",
                dirs.guest.display(),
                dirs.console.display()
            );
        }
        eprintln!("{}", r.line());
        results.push(r);
    }
    eprintln!("\n=== tier 4 summary ===\n{}", table(&results));
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.failed.is_empty())
        .map(|r| format!("on {}: {}", r.version, r.failed.join("; ")))
        .collect();
    if !failed.is_empty() {
        bail!("tier 4 failed {}", failed.join(" | "));
    }
    Ok(())
}

/// Hard links (copies, if linking fails) of the executables in `dir`, emptied first: cargo
/// writes a rebuilt binary as a new file, so the links keep this build.
fn snapshot(dir: &Path, exes: &HashMap<String, PathBuf>) -> Result<HashMap<String, PathBuf>> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    exes.iter()
        .map(|(name, exe)| Ok((name.clone(), snapshot_one(dir, exe)?)))
        .collect()
}

fn snapshot_one(dir: &Path, exe: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let to = dir.join(exe.file_name().context("an executable without a file name")?);
    let _ = std::fs::remove_file(&to);
    if std::fs::hard_link(exe, &to).is_err() {
        std::fs::copy(exe, &to).with_context(|| format!("copying {} to {}", exe.display(), to.display()))?;
    }
    Ok(to)
}

/// `cargo xtask vm`: the command in each kernel's VM, from the workspace root, its output
/// printed; the highest exit status (or 1 if a guest did not finish it).
pub fn run_command(vms: &Vms, command: &[String], timeout: Duration) -> Result<i32> {
    let script = if command.len() == 1 {
        command[0].clone()
    } else {
        command
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut worst = 0;
    for k in &vms.kernels {
        eprintln!("\n=== {} in a VM (TCG): {script} ===", k.version);
        let dirs = VmDirs::fresh(&k.version)?;
        let cmd_file = dirs.guest.join("cmd.sh");
        std::fs::write(&cmd_file, format!("{script}\n"))?;
        let plan = plan_text(&[(
            "cmd".into(),
            0,
            workspace_root(),
            PathBuf::from("/bin/sh"),
            vec![cmd_file.display().to_string()],
        )])?;
        let env = guest_env(|name| std::env::var(name).ok());
        let b = boot(vms, k, &dirs, &plan, &env, timeout)?;
        let end = b.log.runs.first().and_then(|r| r.end);
        match end {
            Some((rc, secs)) => {
                eprintln!(
                    "xtask: {}: exit status {rc} after {secs} s ({} s with boot)",
                    k.version, b.secs
                );
                worst = worst.max(rc);
            }
            None => {
                print_console_tail(&dirs, 40);
                eprintln!(
                    "xtask: {}: the command did not finish ({})",
                    k.version,
                    if b.timed_out {
                        "VM timeout"
                    } else {
                        "the guest died"
                    }
                );
                worst = worst.max(1);
            }
        }
        eprintln!("xtask: guest files (log, dmesg): {}", dirs.guest.display());
    }
    Ok(worst)
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const APT_6_1: &str = "\
linux-image-6.1.0-47-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.1.0-9-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.1.0-57-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.1.0-58-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)
linux-image-6.1.0-58-amd64-unsigned - Linux 6.1 for 64-bit PCs
linux-image-6.1.0-58-amd64-dbg - Debug symbols for Linux 6.1.0-58-amd64
linux-image-6.1.0-56-amd64 - Linux 6.1 for 64-bit PCs (signed)
";

    #[test]
    fn newest_kernel_package_by_number_not_by_text() {
        assert_eq!(
            newest_version(&SERIES[0], APT_6_1).as_deref(),
            Some("6.1.0-57-amd64")
        );
        let apt_6_12 = "linux-image-6.12.99+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)\n\
                        linux-image-6.12.117+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)\n\
                        linux-image-6.12.113+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)\n\
                        linux-image-6.12.120+deb12-cloud-amd64 - Linux 6.12 cloud\n";
        assert_eq!(
            newest_version(&SERIES[1], apt_6_12).as_deref(),
            Some("6.12.117+deb12-amd64")
        );
        // Neither series takes the other's packages.
        assert_eq!(newest_version(&SERIES[1], APT_6_1), None);
        assert_eq!(newest_version(&SERIES[0], apt_6_12), None);
        assert_eq!(newest_version(&SERIES[0], ""), None);
    }

    #[test]
    fn apt_patterns_are_anchored_and_escaped() {
        assert_eq!(SERIES[0].apt_pattern(), r"^linux-image-6\.1\.0-[0-9]+-amd64$");
        assert_eq!(
            SERIES[1].apt_pattern(),
            r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$"
        );
        assert_eq!(SERIES[1].number("6.12.117+deb12-amd64"), Some(117));
        assert_eq!(SERIES[1].number("6.12.+deb12-amd64"), None);
        assert_eq!(SERIES[0].number("6.1.0-5x-amd64"), None);
    }

    #[test]
    fn kernel_selection() {
        let names = |v: &[&str]| {
            select(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .map(|s| s.iter().map(|s| s.name).collect::<Vec<_>>())
        };
        assert_eq!(names(&[]).unwrap(), ["6.1", "6.12"]);
        assert_eq!(names(&["6.12"]).unwrap(), ["6.12"]);
        assert_eq!(names(&["6.12", "6.1"]).unwrap(), ["6.1", "6.12"]);
        assert!(names(&["6.6"])
            .unwrap_err()
            .to_string()
            .contains("known: 6.1, 6.12"));
    }

    #[test]
    fn test_executables_from_cargo_json() {
        let json = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#overlay-tests@0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["bin"],"crate_types":["bin"],"name":"testbed","src_path":"/w/tests/src/bin/testbed.rs"},"executable":"/w/target/debug/testbed","fresh":true}
{"reason":"compiler-artifact","package_id":"path+file:///w/tests#overlay-tests@0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["test"],"crate_types":["bin"],"name":"prog_test_run","src_path":"/w/tests/tier2/prog_test_run/main.rs"},"profile":{"test":true},"filenames":["/w/target/debug/deps/prog_test_run-2e06"],"executable":"/w/target/debug/deps/prog_test_run-2e06","fresh":true}
{"reason":"build-finished","success":true}"#;
        let exes = test_executables(json);
        assert_eq!(exes.len(), 1);
        assert_eq!(
            exes["prog_test_run"],
            PathBuf::from("/w/target/debug/deps/prog_test_run-2e06")
        );
        assert_eq!(
            json_string(r#"{"a":"x\"y\\z"}"#, "a").as_deref(),
            Some(r#"x"y\z"#)
        );
    }

    #[test]
    fn every_selected_test_exists_in_its_file() {
        let dir = workspace_root().join("tests/tier3");
        for (b, t) in TIER3_SELECTION {
            let src = std::fs::read_to_string(dir.join(format!("{b}.rs"))).unwrap();
            assert!(
                src.contains(&format!("fn {t}(")),
                "{b}::{t} not in tests/tier3/{b}.rs"
            );
        }
    }

    fn planned(test: Option<&str>) -> Planned {
        Planned {
            binary: "netns_ops".into(),
            test: test.map(String::from),
            exe: "/w/target/debug/deps/netns_ops-1".into(),
            timeout_secs: 600,
        }
    }

    fn run(id: &str, output: &str, end: Option<(i32, u64)>) -> RunOutput {
        RunOutput {
            id: id.into(),
            output: output.into(),
            end,
        }
    }

    #[test]
    fn plan_lines_and_their_limits() {
        let p = planned(Some("ip_masq"));
        let text =
            plan_text(&[(p.id(), p.timeout_secs, "/w/tests".into(), p.exe.clone(), p.args())]).unwrap();
        assert_eq!(
            text,
            "netns_ops::ip_masq 600 /w/tests /w/target/debug/deps/netns_ops-1 --test-threads=1 --exact ip_masq\n"
        );
        assert!(plan_text(&[("a".into(), 0, "/w space".into(), "/bin/sh".into(), vec![])]).is_err());
    }

    #[test]
    fn guest_log_is_split_at_its_markers() {
        let text = "\
##xtask-vm## kernel 6.1.0-57-amd64
##xtask-vm## begin prog_test_run
running 2 tests
test a ... ok
no newline at the end##xtask-vm## end prog_test_run rc=0 secs=12
##xtask-vm## begin netns_ops::x
test x ... ";
        let log = parse_log(text);
        assert_eq!(log.kernel.as_deref(), Some("6.1.0-57-amd64"));
        assert!(!log.done);
        assert_eq!(
            log.runs,
            [
                run(
                    "prog_test_run",
                    "running 2 tests\ntest a ... ok\nno newline at the end",
                    Some((0, 12))
                ),
                run("netns_ops::x", "test x ... ", None),
            ]
        );
        assert!(parse_log(&format!("{text}\n##xtask-vm## done\n")).done);
    }

    const PASSED_ONE: &str = "\nrunning 1 test\ntest ip_masq ... ok\n\n\
        test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 6 filtered out; finished in 40.12s\n\n";

    #[test]
    fn libtest_summaries() {
        assert_eq!(
            summary(PASSED_ONE),
            Some(Summary {
                passed: 1,
                failed: 0,
                ignored: 0
            })
        );
        assert_eq!(
            summary("agent: exiting test result: FAILED. 15 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out"),
            Some(Summary {
                passed: 15,
                failed: 2,
                ignored: 1
            })
        );
        assert_eq!(summary("running 3 tests\ntest a ... "), None);
        let out = "failures:\n\n---- a stdout ----\nboom\n\n\nfailures:\n    a\n    fuzz_b\n\n\
                   test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out\n";
        assert_eq!(failures(out), ["a", "fuzz_b"]);
        assert!(failures(PASSED_ONE).is_empty());
    }

    #[test]
    fn one_exact_test_passes_only_if_it_ran_and_passed() {
        let p = planned(Some("ip_masq"));
        let id = p.id();
        let ok = judge(&p, Some(&run(&id, PASSED_ONE, Some((0, 41)))));
        assert_eq!(
            ok,
            Verdict {
                passed: 1,
                failed: vec![]
            }
        );
        // A name that matches nothing: libtest says ok, with 0 tests.
        let none = "\nrunning 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 7 filtered out\n";
        let v = judge(&p, Some(&run(&id, none, Some((0, 1)))));
        assert_eq!(v.passed, 0);
        assert!(v.failed[0].contains("no test ran"), "{v:?}");
        let ignored =
            "test ip_masq ... ignored\ntest result: ok. 0 passed; 0 failed; 1 ignored; 0 measured\n";
        assert!(judge(&p, Some(&run(&id, ignored, Some((0, 1))))).failed[0].contains("ignored"));
        let failed = "test ip_masq ... FAILED\n\nfailures:\n    ip_masq\n\n\
                      test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured\n";
        assert_eq!(
            judge(&p, Some(&run(&id, failed, Some((101, 30))))).failed,
            ["netns_ops::ip_masq: FAILED"]
        );
        let timed_out = judge(
            &p,
            Some(&run(&id, "running 1 test\ntest ip_masq ... ", Some((124, 600)))),
        );
        assert_eq!(
            timed_out.failed,
            ["netns_ops::ip_masq: timed out after 600 s (limit 600 s), during ip_masq"]
        );
        assert!(judge(&p, Some(&run(&id, "test ip_masq ... ", None))).failed[0].contains("did not finish"));
        assert!(judge(&p, None).failed[0].contains("not run"));
        // A crash after the summary (a non-zero status) fails too.
        assert!(judge(&p, Some(&run(&id, PASSED_ONE, Some((139, 41))))).failed[0].contains("exit status 139"));
    }

    #[test]
    fn a_whole_binary_names_each_failed_test() {
        let p = planned(None);
        let out = "test a ... ok\ntest b ... FAILED\n\nfailures:\n    b\n\n\
                   test result: FAILED. 16 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out\n";
        assert_eq!(
            judge(&p, Some(&run("netns_ops", out, Some((101, 190))))),
            Verdict {
                passed: 16,
                failed: vec!["netns_ops::b: FAILED".into()]
            }
        );
        let all = "test result: ok. 17 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n";
        assert_eq!(judge(&p, Some(&run("netns_ops", all, Some((0, 190))))).passed, 17);
        let zero = "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n";
        assert_eq!(
            judge(&p, Some(&run("netns_ops", zero, Some((0, 1))))).failed,
            ["netns_ops: no test ran"]
        );
    }

    #[test]
    fn a_kernel_fails_if_its_guest_died_midway() {
        let plan = [planned(None), planned(Some("ip_masq"))];
        let log = parse_log(
            "##xtask-vm## kernel 6.1.0-57-amd64\n##xtask-vm## begin netns_ops\n\
             test result: ok. 17 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n\
             ##xtask-vm## end netns_ops rc=0 secs=190\n",
        );
        let r = judge_kernel("6.1.0-57-amd64", &plan, &log, 300, Some(25));
        assert_eq!((r.tier2, r.tier3), ((17, 0), (0, 1)));
        assert_eq!(
            r.failed,
            ["netns_ops::ip_masq: not run (the guest stopped before it)"]
        );
        assert_eq!(
            r.line(),
            "tier 4: 6.1.0-57-amd64: FAILED: 17+0 tests passed, 1 failed, in 300 s (boot 25 s)"
        );
        // Wrong kernel, or no guest at all.
        let r = judge_kernel("6.12.117+deb12-amd64", &plan, &log, 300, None);
        assert!(r.failed[0].contains("ran kernel 6.1.0-57-amd64"));
        let r = judge_kernel("6.1.0-57-amd64", &plan, &GuestLog::default(), 30, None);
        assert!(r.failed[0].contains("never started") && r.failed.len() == 3);
    }

    #[test]
    fn summary_line_and_table() {
        let ok = KernelResult {
            version: "6.1.0-57-amd64".into(),
            secs: 512,
            boot_secs: Some(23),
            tier2: (17, 0),
            tier3: (11, 0),
            failed: vec![],
        };
        assert_eq!(
            ok.line(),
            "tier 4: 6.1.0-57-amd64: 17+11 tests passed in 512 s (boot 23 s)"
        );
        let bad = KernelResult {
            version: "6.12.117+deb12-amd64".into(),
            secs: 640,
            boot_secs: None,
            tier2: (16, 1),
            tier3: (11, 0),
            failed: vec!["prog_test_run::x: FAILED".into()],
        };
        assert_eq!(
            table(&[ok, bad]),
            "  kernel                 tier 2   tier 3    boot    total  result\n\
             \x20 6.1.0-57-amd64          17/17    11/11    23 s    512 s  ok\n\
             \x20 6.12.117+deb12-amd64    16/17    11/11       -    640 s  FAILED\n\
             \x20     prog_test_run::x: FAILED\n"
        );
    }

    #[test]
    fn process_tree_helpers() {
        assert_eq!(stat_ppid("123 (a) b) c) S 45 123 123 0 -1"), Some(45));
        assert_eq!(stat_ppid("garbage"), None);
        // This test's own process is under its parent.
        let me = std::process::id();
        let parent = stat_ppid(&std::fs::read_to_string("/proc/self/stat").unwrap()).unwrap();
        assert!(descendants(parent).contains(&me));
        assert_eq!(shell_quote("ip"), "ip");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn guest_environment() {
        assert_eq!(guest_env(|_| None), "export OVERLAY_TEST_SLOWDOWN=5\n");
        let host = |n: &str| match n {
            "OVERLAY_TEST_SLOWDOWN" => Some("8".to_string()),
            "RUST_LOG" => Some("overlay_agent=debug info".to_string()),
            "HOME" => Some("/root".to_string()),
            _ => None,
        };
        assert_eq!(
            guest_env(host),
            "export OVERLAY_TEST_SLOWDOWN=8\nexport RUST_LOG='overlay_agent=debug info'\n"
        );
    }

    #[test]
    fn markers_print_as_headings() {
        assert_eq!(show_line("##xtask-vm## begin prog_test_run"), "--- prog_test_run");
        assert_eq!(
            show_line("x##xtask-vm## end a rc=0 secs=3"),
            "x\n--- a: rc=0 secs=3"
        );
        assert_eq!(show_line("plain"), "plain");
    }
}
