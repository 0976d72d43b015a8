//! Makes sure everything the build and the tests use is on this machine, checked by what is
//! used (a command on PATH, a file the build reads), not by package name: a tool installed some
//! other way counts, and a package that lacks a file (protoc without its include files) does not.
//! Whatever is missing is installed from Debian's archive (each thing maps to its package), and
//! bpf-linker is built against LLVM 22. Quick when all is present: file checks and one
//! `bpf-linker --version`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

/// How to tell that a need is met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// An executable of this name on PATH (or in the sbin directories root has on PATH).
    Command(&'static str),
    /// This file.
    File(&'static str),
    /// A file in this directory whose name starts with the prefix.
    FileIn(&'static str, &'static str),
    /// This command (program and arguments) runs and exits 0, its output discarded: for what
    /// only the program itself can tell (`python3 -c "import ensurepip"`).
    Runs(&'static [&'static str]),
}

/// One thing the build or the tests use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Need {
    pub probe: Probe,
    /// The Debian package that provides it.
    pub package: &'static str,
    /// Who uses it.
    pub used_by: &'static str,
}

const fn cmd(name: &'static str, package: &'static str, used_by: &'static str) -> Need {
    Need {
        probe: Probe::Command(name),
        package,
        used_by,
    }
}

const fn file(path: &'static str, package: &'static str, used_by: &'static str) -> Need {
    Need {
        probe: Probe::File(path),
        package,
        used_by,
    }
}

/// Everything the build, the agent and the tests invoke or read (`grep -rn 'Command::new\|exec('
/// tests/ xtask/ overlay-agent/` finds the commands).
pub const NEEDS: &[Need] = &[
    // Building.
    cmd("cc", "gcc", "linking, build scripts"),
    file("/usr/bin/rustc", "rustc-web", "the eBPF build (rustc on LLVM 22)"),
    Need {
        probe: Probe::FileIn("/usr/lib/rustlib/bpfel-unknown-none/lib", "libcore-"),
        package: "libstd-rust-web-dev-bpf",
        used_by: "the eBPF build (prebuilt core for bpfel-unknown-none)",
    },
    cmd("protoc", "protobuf-compiler", "etcd-client's build script"),
    // etcd's .proto files import these; protobuf-compiler without recommends lacks them.
    file(
        "/usr/include/google/protobuf/descriptor.proto",
        "libprotobuf-dev",
        "etcd-client's build script (protoc include)",
    ),
    file(
        "/usr/include/google/protobuf/struct.proto",
        "libprotobuf-dev",
        "etcd-client's build script (protoc include)",
    ),
    cmd("git", "git", "building the previous release (netns_upgrade)"),
    // The agent at run time.
    cmd("ip", "iproute2", "agent cleanup, tests"),
    cmd("tc", "iproute2", "agent, tests"),
    cmd("nft", "nftables", "agent (--ip-masq), tests"),
    cmd("iptables", "iptables", "agent (--iptables-forward-rules), tests"),
    cmd("iptables-restore", "iptables", "agent (--iptables-forward-rules)"),
    // The tests and the demo.
    cmd("etcd", "etcd-server", "tests, xtask run"),
    cmd("etcdctl", "etcd-client", "tests"),
    cmd("bpftool", "bpftool", "tests, README"),
    cmd("ss", "iproute2", "tests"),
    cmd("bridge", "iproute2", "tests"),
    cmd("ping", "iputils-ping", "tests"),
    cmd("iperf3", "iperf3", "tests, bench"),
    cmd("tcpdump", "tcpdump", "tests"),
    cmd("ethtool", "ethtool", "tests, bench"),
    cmd("jq", "jq", "tests/plain-bench.sh (the second bench harness)"),
    cmd("curl", "curl", "tests (health/metrics)"),
    cmd("tmux", "tmux", "tests (status --watch in a terminal)"),
    cmd("systemd-analyze", "systemd", "tests (unit file check)"),
    cmd("openssl", "openssl", "tests (etcd TLS)"),
    cmd("nsenter", "util-linux", "tests"),
    // netns_hardening builds the unit's seccomp filter: system call numbers by name.
    file(
        "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
        "linux-libc-dev",
        "tests (netns_hardening: the unit's system call filter)",
    ),
    cmd("sysctl", "procps", "tests"),
    // kube-proxy's tools (netns_services): its IPVS mode, its ipsets; conntrack for diagnostics.
    cmd("ipvsadm", "ipvsadm", "tests (kube-proxy IPVS mode)"),
    cmd("ipset", "ipset", "tests (kube-proxy IPVS mode)"),
    cmd("conntrack", "conntrack", "tests (Services)"),
    cmd("base32", "coreutils", "tests (kube-proxy chain names)"),
    cmd("timeout", "coreutils", "bench"),
    // Real hosts: one Docker daemon per test node, pods made by the CNI bridge plugin.
    file(
        "/usr/sbin/dockerd",
        "docker.io",
        "tests (Docker nodes), xtask run --docker",
    ),
    // By path: an unrelated `docker` client may come first on PATH.
    file(
        "/usr/bin/docker",
        "docker.io",
        "tests (Docker nodes), xtask run --docker",
    ),
    // The containers' image is this static busybox; the dynamic `busybox` package installs the
    // same path, so the package's own copyright file tells them apart.
    file(
        "/usr/share/doc/busybox-static/copyright",
        "busybox-static",
        "tests (Docker image), xtask run --docker",
    ),
    file(
        "/usr/lib/cni/bridge",
        "containernetworking-plugins",
        "tests (CNI bridge plugin)",
    ),
    file(
        "/usr/lib/cni/host-local",
        "containernetworking-plugins",
        "tests (CNI bridge plugin)",
    ),
];

/// What building bpf-linker needs, checked only when bpf-linker has to be built.
pub const BPF_LINKER_BUILD_NEEDS: &[Need] = &[
    file("/usr/lib/llvm-22/bin/llvm-config", "llvm-22", BUILDING_BPF_LINKER),
    file(
        "/usr/lib/llvm-22/include/llvm-c/Core.h",
        "llvm-22-dev",
        BUILDING_BPF_LINKER,
    ),
    file(
        "/usr/lib/llvm-22/lib/libPolly.a",
        "libpolly-22-dev",
        BUILDING_BPF_LINKER,
    ),
    file("/usr/include/zstd.h", "libzstd-dev", BUILDING_BPF_LINKER),
    file("/usr/include/zlib.h", "zlib1g-dev", BUILDING_BPF_LINKER),
];

/// What the VM tier (`cargo xtask test`'s tier 4, `cargo xtask vm`) uses on the host, checked
/// only when it runs. The kernels and virtme-ng themselves are not Debian packages installed on
/// the host: xtask/src/vm.rs downloads and caches them.
pub const VM_NEEDS: &[Need] = &[
    cmd("qemu-system-x86_64", "qemu-system-x86", VM_TIER),
    // virtme-ng runs depmod on the extracted kernels' modules; the guest's modprobe is the host's.
    cmd("depmod", "kmod", VM_TIER),
    cmd("modprobe", "kmod", VM_TIER),
    // virtme-ng's initramfs: a static busybox (the dynamic one has no libraries there).
    file(
        "/usr/share/doc/busybox-static/copyright",
        "busybox-static",
        VM_TIER,
    ),
    cmd("python3", "python3", "tier 4 (virtme-ng's venv)"),
    // Debian's python3 has no ensurepip (so no `python3 -m venv`) without python3-venv.
    Need {
        probe: Probe::Runs(&["python3", "-c", "import ensurepip"]),
        package: "python3-venv",
        used_by: "tier 4 (virtme-ng's venv)",
    },
    cmd("dpkg-deb", "dpkg", "tier 4 (extracting the kernel packages)"),
];

const VM_TIER: &str = "tier 4 (Debian kernels in VMs)";

const BPF_LINKER_VERSION: &str = "0.13.0";
const BUILDING_BPF_LINKER: &str = "building bpf-linker";

/// Where a need stands after [`ensure`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Present,
    Installed,
    /// Not there and not installable here; the command that fixes it.
    Missing(String),
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// What was looked for (a command name, a path, `bpf-linker 0.13.0`), and where it was
    /// found when that is not where Debian's package puts it.
    pub what: String,
    /// Where it comes from: the Debian package, or `cargo install`.
    pub source: &'static str,
    pub used_by: &'static str,
    pub state: State,
}

/// What the machine has, as the report shows it.
pub struct Report {
    pub lines: Vec<Line>,
}

impl Report {
    pub fn missing(&self) -> impl Iterator<Item = &Line> {
        self.lines.iter().filter(|l| matches!(l.state, State::Missing(_)))
    }

    pub fn render(&self) -> String {
        let width = self.lines.iter().map(|l| l.what.len()).max().unwrap_or(0);
        let src = self.lines.iter().map(|l| l.source.len()).max().unwrap_or(0);
        let mut out = String::new();
        for l in &self.lines {
            let state = match &l.state {
                State::Present => "present",
                State::Installed => "installed",
                State::Missing(_) => "missing",
            };
            let line = format!(
                "  {state:<9}  {:<width$}  {:<src$}  {}",
                l.what, l.source, l.used_by
            );
            let _ = writeln!(out, "{}", line.trim_end());
            if let State::Missing(fix) = &l.state {
                let _ = writeln!(out, "  {:<9}  fix: {fix}", "");
            }
        }
        out
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// `cargo xtask setup`: installs what is missing and prints every need with its state.
pub fn setup() -> Result<()> {
    setup_with(&[])
}

/// `cargo xtask setup --vm`: [`setup`] for [`NEEDS`] and `extra` (e.g. [`VM_NEEDS`]) together.
pub fn setup_with(extra: &[Need]) -> Result<()> {
    let report = check_and_install(&with_extra(NEEDS, extra), true)?;
    println!(
        "What the build and the tests use (state, what, where it comes from, who uses it):\n{}",
        report.render()
    );
    fail_if_missing(&report)
}

/// The install step of `cargo xtask build/test/run/bench`: silent when everything is present.
pub fn ensure() -> Result<()> {
    ensure_with(&[])
}

/// [`ensure`] for [`NEEDS`] and `extra` (e.g. [`VM_NEEDS`]) together, in one apt-get run.
pub fn ensure_with(extra: &[Need]) -> Result<()> {
    quiet_unless_changed(check_and_install(&with_extra(NEEDS, extra), true)?)
}

/// [`ensure`] for these needs alone, without the build's (`cargo xtask vm` builds nothing).
pub fn ensure_only(needs: &[Need]) -> Result<()> {
    quiet_unless_changed(check_and_install(needs, false)?)
}

fn quiet_unless_changed(report: Report) -> Result<()> {
    if report.lines.iter().any(|l| l.state != State::Present) {
        eprintln!("xtask: prerequisites:\n{}", report.render());
    }
    fail_if_missing(&report)
}

fn fail_if_missing(report: &Report) -> Result<()> {
    let missing: Vec<&str> = report.missing().map(|l| l.what.as_str()).collect();
    if !missing.is_empty() {
        bail!(
            "missing: {} (the fix for each is listed above)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// `base` then those of `extra` whose probe `base` does not already have (a need both lists
/// share is reported once, as `base` names it).
pub fn with_extra(base: &[Need], extra: &[Need]) -> Vec<Need> {
    let mut out = base.to_vec();
    for n in extra {
        if !out.iter().any(|m| m.probe == n.probe) {
            out.push(*n);
        }
    }
    out
}

/// Checks `needs` (and bpf-linker, if `linker`), installs the packages of what is missing.
fn check_and_install(needs: &[Need], linker: bool) -> Result<Report> {
    let mut needs = needs.to_vec();
    let linker_ok = !linker || bpf_linker_ok();
    if !linker_ok {
        needs.extend_from_slice(BPF_LINKER_BUILD_NEEDS);
    }
    let before: Vec<bool> = needs.iter().map(|n| met(&n.probe)).collect();
    let packages = packages_for(&needs, &before);
    let mut install_error = None;
    if !packages.is_empty() {
        if is_root() {
            eprintln!("xtask: installing Debian packages: {}", packages.join(" "));
            if let Err(e) = apt_install(&packages) {
                eprintln!("xtask: {e:#}");
                install_error = Some(e);
            }
        } else {
            eprintln!(
                "xtask: not root, so not installing: {} (run `cargo xtask setup` as root)",
                packages.join(" ")
            );
        }
    }
    let mut lines: Vec<Line> = needs
        .iter()
        .zip(&before)
        .map(|(n, was)| {
            let now = *was || met(&n.probe);
            let state = match (*was, now) {
                (true, _) => State::Present,
                (false, true) => State::Installed,
                (false, false) => State::Missing(fix_for(n, install_error.is_some())),
            };
            Line {
                what: describe(&n.probe),
                source: n.package,
                used_by: n.used_by,
                state,
            }
        })
        .collect();
    if linker {
        lines.push(ensure_bpf_linker(linker_ok, &lines));
    }
    Ok(Report { lines })
}

/// The Debian packages that provide the unmet needs, each once, in list order.
pub fn packages_for(needs: &[Need], met: &[bool]) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for (n, ok) in needs.iter().zip(met) {
        if !ok && !out.contains(&n.package) {
            out.push(n.package);
        }
    }
    out
}

fn fix_for(n: &Need, apt_failed: bool) -> String {
    let install = format!("apt-get install -y --no-install-recommends {}", n.package);
    match n.package {
        "rustc-web" | "libstd-rust-web-dev-bpf" if apt_failed => format!(
            "{install} (as root; on Debian 12 it comes from bookworm-security: add \
             `deb http://deb.debian.org/debian-security bookworm-security main` to your APT sources and \
             run apt-get update)"
        ),
        _ => format!("{install} (as root)"),
    }
}

fn probe_name(p: &Probe) -> String {
    match p {
        Probe::Command(c) => (*c).to_string(),
        Probe::File(f) => (*f).to_string(),
        Probe::FileIn(dir, prefix) => format!("{dir}/{prefix}*"),
        Probe::Runs(argv) => format!("`{}`", argv.join(" ")),
    }
}

/// The probe's name, with where a command was found if not in Debian's own directories (a tool
/// installed some other way).
fn describe(p: &Probe) -> String {
    let name = probe_name(p);
    match (p, found_at(p)) {
        (Probe::Command(_), Some(at))
            if !SYSTEM_DIRS[2..]
                .iter()
                .any(|d| Path::new(&at).parent() == Some(Path::new(d))) =>
        {
            format!("{name} ({at})")
        }
        _ => name,
    }
}

fn met(p: &Probe) -> bool {
    found_at(p).is_some()
}

/// Where the probe finds its thing.
fn found_at(p: &Probe) -> Option<String> {
    match p {
        Probe::Command(c) => find_command(c).map(|p| p.display().to_string()),
        Probe::File(f) => Path::new(f).is_file().then(|| (*f).to_string()),
        Probe::FileIn(dir, prefix) => std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .map(|e| e.path().display().to_string()),
        Probe::Runs(argv) => {
            let (prog, args) = argv.split_first()?;
            let prog = find_command(prog)?;
            Command::new(&prog)
                .args(args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .ok()?
                .success()
                .then(|| probe_name(p))
        }
    }
}

/// Searched after PATH: a non-root PATH often lacks the sbin directories.
const SYSTEM_DIRS: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// `command -v name`, also looking in [`SYSTEM_DIRS`].
fn find_command(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SYSTEM_DIRS.map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn apt_install(packages: &[&str]) -> Result<()> {
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend_from_slice(packages);
    // Installing docker.io would start the host's own Docker daemon (and with it a docker0 and
    // a FORWARD policy of DROP on the host); the tests start their own daemons in namespaces.
    let _no_starts = packages
        .contains(&"docker.io")
        .then(NoServiceStarts::new)
        .flatten();
    apt(&args)
}

/// Debian's `policy-rc.d` hook refusing service starts while it lives (only when the machine
/// has none of its own: an existing hook is left as it is).
struct NoServiceStarts;

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

impl NoServiceStarts {
    fn new() -> Option<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        if Path::new(POLICY_RC_D).exists() {
            return None;
        }
        std::fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# cargo xtask: no service starts while installing\nexit 101\n",
        )
        .ok()?;
        std::fs::set_permissions(POLICY_RC_D, std::fs::Permissions::from_mode(0o755)).ok()?;
        eprintln!("xtask: services will not be started by this install (temporary {POLICY_RC_D})");
        Some(NoServiceStarts)
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(POLICY_RC_D);
    }
}

fn apt(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get (is this Debian?)")?;
    if !status.success() {
        bail!("`apt-get {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn cargo_bin() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    home.join("bin")
}

/// `bpf-linker --version` runs (its LLVM library loads) and is the version we build with.
fn bpf_linker_ok() -> bool {
    Command::new(cargo_bin().join("bpf-linker"))
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
}

fn bpf_linker_install_command() -> String {
    format!(
        "LLVM_PREFIX=/usr/lib/llvm-22 LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker \
         --version {BPF_LINKER_VERSION} --no-default-features --features llvm-22"
    )
}

/// bpf-linker, built against LLVM 22 unless it already works (a package installed just now may
/// have been what it lacked, e.g. the LLVM library it loads).
fn ensure_bpf_linker(was_ok: bool, lines: &[Line]) -> Line {
    let line = |state| Line {
        what: format!("bpf-linker {BPF_LINKER_VERSION}"),
        source: "cargo install",
        used_by: "the eBPF build (linker for bpfel-unknown-none)",
        state,
    };
    if was_ok {
        return line(State::Present);
    }
    if bpf_linker_ok() {
        return line(State::Installed);
    }
    let llvm_missing = lines
        .iter()
        .any(|l| l.used_by == BUILDING_BPF_LINKER && matches!(l.state, State::Missing(_)));
    if llvm_missing {
        return line(State::Missing(format!(
            "install the LLVM 22 packages listed above, then {}",
            bpf_linker_install_command()
        )));
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 3 minutes)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        // bpf-linker's build script finds LLVM through LLVM_PREFIX; llvm-sys through its own.
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22")
        .status();
    match status {
        Ok(s) if s.success() && bpf_linker_ok() => line(State::Installed),
        _ => line(State::Missing(format!(
            "{} (building it failed; see cargo's errors above)",
            bpf_linker_install_command()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_install_per_package_in_list_order() {
        let needs = [
            cmd("ip", "iproute2", "t"),
            cmd("protoc", "protobuf-compiler", "t"),
            file("/a.proto", "libprotobuf-dev", "t"),
            file("/b.proto", "libprotobuf-dev", "t"),
            cmd("ss", "iproute2", "t"),
        ];
        assert_eq!(
            packages_for(&needs, &[false, true, false, false, false]),
            ["iproute2", "libprotobuf-dev"]
        );
        assert!(packages_for(&needs, &[true; 5]).is_empty());
    }

    #[test]
    fn probes_find_what_is_there_and_only_that() {
        assert!(met(&Probe::Command("sh")), "sh not found on PATH");
        assert!(!met(&Probe::Command("no-such-command-xtask")));
        assert!(met(&Probe::File("/etc/passwd")));
        assert!(!met(&Probe::File("/etc")), "a directory is not the file");
        assert!(met(&Probe::FileIn("/etc", "pass")));
        assert!(!met(&Probe::FileIn("/etc", "no-such-prefix-xtask")));
        assert!(met(&Probe::Runs(&["sh", "-c", "exit 0"])));
        assert!(
            !met(&Probe::Runs(&["sh", "-c", "exit 1"])),
            "a command that fails"
        );
        assert!(!met(&Probe::Runs(&["no-such-command-xtask"])));
    }

    #[test]
    fn vm_needs_join_the_others_once_per_probe() {
        let all = with_extra(NEEDS, VM_NEEDS);
        assert_eq!(&all[..NEEDS.len()], NEEDS);
        for (i, n) in all.iter().enumerate() {
            assert!(!all[..i].iter().any(|m| m.probe == n.probe), "{n:?} twice");
        }
        // busybox-static is in both lists: reported once.
        assert!(all.len() < NEEDS.len() + VM_NEEDS.len());
        for p in ["qemu-system-x86_64", "depmod", "modprobe", "python3", "dpkg-deb"] {
            assert!(all.iter().any(|n| probe_name(&n.probe) == p), "{p}");
        }
        assert!(VM_NEEDS.iter().any(|n| n.package == "python3-venv"));
    }

    #[test]
    fn every_need_names_a_package_and_the_list_covers_protoc_includes() {
        for n in NEEDS.iter().chain(BPF_LINKER_BUILD_NEEDS).chain(VM_NEEDS) {
            assert!(!n.package.is_empty() && !n.used_by.is_empty(), "{n:?}");
        }
        let has = |p: &str| NEEDS.iter().any(|n| probe_name(&n.probe) == p);
        assert!(has("/usr/include/google/protobuf/descriptor.proto"));
        assert!(has("/usr/include/google/protobuf/struct.proto"));
        assert!(has("protoc") && has("etcd") && has("bpftool") && has("openssl"));
    }

    #[test]
    fn report_shows_state_and_fix() {
        let r = Report {
            lines: vec![
                Line {
                    what: "protoc".into(),
                    source: "protobuf-compiler",
                    used_by: "etcd-client's build script",
                    state: State::Present,
                },
                Line {
                    what: "tcpdump".into(),
                    source: "tcpdump",
                    used_by: "tests",
                    state: State::Missing(
                        "apt-get install -y --no-install-recommends tcpdump (as root)".into(),
                    ),
                },
                Line {
                    what: "git (/usr/local/bin/git)".into(),
                    source: "git",
                    used_by: "building the previous release",
                    state: State::Installed,
                },
            ],
        };
        assert_eq!(
            r.render(),
            "  present    protoc                    protobuf-compiler  etcd-client's build script\n\
             \x20 missing    tcpdump                   tcpdump            tests\n\
             \x20            fix: apt-get install -y --no-install-recommends tcpdump (as root)\n\
             \x20 installed  git (/usr/local/bin/git)  git                building the previous release\n"
        );
        assert_eq!(r.missing().count(), 1);
    }
}
