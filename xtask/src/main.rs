//! Orchestration only: install the toolchain, build, test, run the demo, benchmark.
//! Depends on nothing heavy so it builds on a fresh machine before anything is installed.

mod prev_release;
mod toolchain;
mod vm;

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "overlay-agent developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (Debian packages, bpf-linker) and build the agent with its eBPF object.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test tier: 1 host unit tests, 2 BPF_PROG_TEST_RUN (root), 3 network namespaces
    /// (root), 4 Debian's kernels 6.1 and 6.12 in VMs (root; qemu without KVM, so slow: tier 2
    /// in full and a fixed selection of tier 3, `TIER3_SELECTION` in xtask/src/vm.rs).
    ///
    /// Tier 4 downloads what it needs once into $OVERLAY_VM_CACHE (default
    /// /var/cache/overlay-agent-vm): virtme-ng from PyPI, the kernel packages from Debian. Its
    /// guests get OVERLAY_TEST_SLOWDOWN=5 (the harness's waits stretched for emulation) unless
    /// it is set, and the host's RUST_BACKTRACE, RUST_LOG, OVERLAY_AGENT_BIN, OVERLAY_DECAP.
    Test {
        /// Only the host unit tests (no root needed, quick; no VMs either).
        #[arg(long, conflicts_with_all = ["vm_only", "no_vm"])]
        host_only: bool,
        /// Skip tier 4 (the VMs).
        #[arg(long, conflicts_with = "vm_only")]
        no_vm: bool,
        /// Only tier 4 (after building the agent and the test binaries it runs).
        #[arg(long)]
        vm_only: bool,
        /// The kernels tier 4 boots: 6.1, 6.12 (repeat the flag or separate with commas; all
        /// by default).
        #[arg(long = "kernel", value_name = "SERIES", value_delimiter = ',')]
        kernels: Vec<String>,
        /// Kill a VM that runs longer than this (minutes, boot to power-off).
        #[arg(long, value_name = "MINUTES", default_value_t = vm::DEFAULT_VM_TIMEOUT_MINS)]
        vm_timeout: u64,
        /// Extra arguments passed to the test binaries of tiers 1-3 (a name filter,
        /// --nocapture, ...). Not to tier 4, which always runs its own list.
        #[arg(last = true)]
        rest: Vec<String>,
    },
    /// Boot Debian's kernels in VMs (as tier 4 does: the host's / read-only, qemu without KVM)
    /// and run a command in each, from the workspace root, printing its output; exits with the
    /// command's status. `cargo xtask vm --kernel 6.1 -- 'bpftool feature probe | grep tcx'`
    /// (one argument is a shell command line; several are quoted as they are).
    Vm {
        /// The kernels: 6.1, 6.12 (repeat the flag or separate with commas; all by default).
        #[arg(long = "kernel", value_name = "SERIES", value_delimiter = ',')]
        kernels: Vec<String>,
        /// Kill a VM that runs longer than this (minutes).
        #[arg(long, value_name = "MINUTES", default_value_t = vm::DEFAULT_VM_TIMEOUT_MINS)]
        vm_timeout: u64,
        /// The command.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Start a local etcd and netns nodes running the agent, prove cross-node traffic, stay up.
    Run {
        /// Exit after the checks instead of waiting for Ctrl-C.
        #[arg(long)]
        exit_after_checks: bool,
        /// Number of nodes.
        #[arg(long, default_value_t = 2)]
        nodes: u32,
        /// Real Docker on every node (one dockerd per node namespace, busybox containers)
        /// instead of hand-made pods on cni0.
        #[arg(long)]
        docker: bool,
        /// The network config's backend: vxlan or host-gw.
        #[arg(long, default_value = "vxlan", value_parser = ["vxlan", "host-gw"])]
        backend: String,
    },
    /// Benchmark the BPF overlay against host-gw routing and the kernel's VXLAN (root, minutes).
    /// Writes target/bench/latest.{json,svg,txt}.
    Bench {
        /// One round with short transfers, for iteration.
        #[arg(long)]
        quick: bool,
        /// Extra arguments for the bench binary (--rounds N, --secs N, --no-control).
        #[arg(last = true)]
        rest: Vec<String>,
    },
    /// Only check and install what the build and the tests use; prints each thing as present,
    /// installed or missing (with the command that fixes it).
    Setup {
        /// Also what tier 4 uses: the host's packages, and (as root) the cached virtme-ng and
        /// kernels.
        #[arg(long)]
        vm: bool,
    },
    /// Build the previous release's agent (the commit in tests/previous-release; cached per
    /// commit) and print its path, for running netns_upgrade alone:
    /// `OVERLAY_PREV_AGENT_BIN=$(cargo xtask prev-release) cargo test -p overlay-tests --test netns_upgrade`.
    PrevRelease,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup { vm: false } => toolchain::setup(),
        Cmd::Setup { vm: true } => {
            toolchain::setup_with(toolchain::VM_NEEDS)?;
            require_root("preparing the VM cache")?;
            for k in vm::prepare(&vm::select(&[])?)?.kernels {
                println!("kernel {}: {}", k.series, k.vmlinuz.display());
            }
            Ok(())
        }
        Cmd::Vm {
            kernels,
            vm_timeout,
            command,
        } => {
            let series = vm::select(&kernels)?;
            toolchain::ensure_only(toolchain::VM_NEEDS)?;
            require_root("cargo xtask vm")?;
            let vms = vm::prepare(&series)?;
            let rc = vm::run_command(&vms, &command, Duration::from_secs(vm_timeout * 60))?;
            if rc != 0 {
                std::process::exit(rc.clamp(1, 255));
            }
            Ok(())
        }
        Cmd::PrevRelease => {
            toolchain::ensure()?;
            println!("{}", prev_release::ensure_built()?.display());
            Ok(())
        }
        Cmd::Build { release } => {
            toolchain::ensure()?;
            let mut args = vec!["build", "--package", "overlay-agent"];
            if release {
                args.push("--release");
            }
            cargo(&args)
        }
        Cmd::Test {
            host_only,
            no_vm,
            vm_only,
            kernels,
            vm_timeout,
            rest,
        } => test(&TestOpts {
            host_only,
            no_vm,
            vm_only,
            kernels,
            vm_timeout: Duration::from_secs(vm_timeout * 60),
            rest,
        }),
        Cmd::Run {
            exit_after_checks,
            nodes,
            docker,
            backend,
        } => {
            toolchain::ensure()?;
            require_root("cargo xtask run")?;
            cargo(&["build", "--release", "--package", "overlay-agent"])?;
            let mut args = vec![
                "run".to_string(),
                "--quiet".into(),
                "--release".into(),
                "--package".into(),
                "overlay-tests".into(),
                "--bin".into(),
                "testbed".into(),
                "--".into(),
                "--nodes".into(),
                nodes.to_string(),
                "--backend".into(),
                backend,
            ];
            if exit_after_checks {
                args.push("--exit-after-checks".into());
            }
            if docker {
                args.push("--docker".into());
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cargo(&args)
        }
        Cmd::Bench { quick, rest } => {
            toolchain::ensure()?;
            require_root("cargo xtask bench")?;
            cargo(&["build", "--release", "--package", "overlay-agent"])?;
            let mut args = vec![
                "run",
                "--quiet",
                "--release",
                "--package",
                "overlay-tests",
                "--bin",
                "bench",
                "--",
            ];
            if quick {
                args.push("--quick");
            }
            args.extend(rest.iter().map(String::as_str));
            cargo(&args)
        }
    }
}

/// One `cargo test` run of `cargo xtask test`.
struct Tier<'a> {
    name: &'a str,
    /// Needs root: creates namespaces and processes, so one test at a time keeps them readable.
    root: bool,
    args: Vec<&'a str>,
    env: Vec<(&'static str, PathBuf)>,
    /// Test-harness arguments (after `--`).
    harness: Vec<&'a str>,
}

struct TestOpts {
    host_only: bool,
    no_vm: bool,
    vm_only: bool,
    kernels: Vec<String>,
    vm_timeout: Duration,
    rest: Vec<String>,
}

fn test(o: &TestOpts) -> Result<()> {
    let vm_tier = !o.host_only && !o.no_vm;
    if o.vm_only && !o.rest.is_empty() {
        bail!(
            "--vm-only with test arguments ({}): they apply to tiers 1-3 only; tier 4 runs tier 2 \
             and TIER3_SELECTION (xtask/src/vm.rs); for one command in a VM use `cargo xtask vm`",
            o.rest.join(" ")
        );
    }
    if !vm_tier && !o.kernels.is_empty() {
        bail!("--kernel chooses tier 4's kernels, which --no-vm / --host-only skip");
    }
    let series = vm::select(&o.kernels)?;
    if vm_tier {
        toolchain::ensure_with(toolchain::VM_NEEDS)?;
    } else {
        toolchain::ensure()?;
    }
    let mut tiers = Vec::new();
    if !o.vm_only {
        tiers.push(Tier {
            name: "tier 1: host unit tests",
            root: false,
            args: vec![
                "test",
                "--package",
                "overlay-common",
                "--package",
                "overlay-agent",
                "--package",
                "xtask",
            ],
            env: Vec::new(),
            harness: Vec::new(),
        });
    }
    let e2e = if o.host_only || o.vm_only {
        Vec::new()
    } else {
        e2e_targets()?
    };
    if !o.host_only {
        require_root("the BPF, network-namespace and VM test tiers (use --host-only without root)")?;
    }
    // Downloads (once) before the tiers run, so a missing kernel fails now, not after them.
    let vms = if vm_tier {
        Some(vm::prepare(&series)?)
    } else {
        None
    };
    if !o.host_only && !o.vm_only {
        tiers.push(Tier {
            name: "tier 2: BPF_PROG_TEST_RUN (root)",
            root: true,
            args: vec!["test", "--package", "overlay-tests", "--test", TIER2[0]],
            env: Vec::new(),
            harness: Vec::new(),
        });
        let mut args = vec!["test", "--package", "overlay-tests"];
        for t in &e2e {
            args.extend(["--test", t.as_str()]);
        }
        // netns_upgrade upgrades from (and downgrades to) the previous release's binary, and
        // netns_restart upgrades from it with etcd changed meanwhile.
        let prev = prev_release::ensure_built()?;
        // kube-proxy's IPVS mode needs IPVS in the kernel; where it is built without, its
        // suites cannot run here (tier 4's Debian kernels have it) and are left out, loudly.
        let mut harness = Vec::new();
        if !ipvs_available() {
            eprintln!(
                "tier 3: this kernel has no IPVS (modprobe ip_vs failed): the ipvs_mode_* tests of \
                 netns_services are NOT run here; tier 4 runs them on Debian's kernels"
            );
            harness.extend(["--skip", "ipvs_mode_"]);
        }
        tiers.push(Tier {
            name: "tier 3: network namespaces, real etcd, real traffic (root)",
            root: true,
            args,
            env: vec![(prev_release::ENV, prev)],
            harness,
        });
    }
    if !o.host_only {
        // Tiers 3 and 4 run the real agent binary (target/debug/overlay-agent) in node namespaces.
        cargo(&["build", "--package", "overlay-agent"])?;
    }
    for mut t in tiers {
        eprintln!("\n=== {} ===", t.name);
        t.args.push("--");
        if t.root {
            t.args.push("--test-threads=1");
        }
        t.args.extend(t.harness.iter().copied());
        t.args.extend(o.rest.iter().map(String::as_str));
        cargo_env(&t.args, &t.env)?;
    }
    match vms {
        Some(vms) => {
            let names: Vec<&str> = vms.kernels.iter().map(|k| k.version.as_str()).collect();
            eprintln!("\n=== tier 4: Debian kernels in VMs ({}) ===", names.join(", "));
            vm::tier4(&vms, &TIER2, o.vm_timeout)
        }
        None => {
            let why = if o.host_only { "--host-only" } else { "--no-vm" };
            eprintln!("\n=== tier 4 skipped ({why}): Debian kernels 6.1/6.12 in VMs NOT tested ===");
            Ok(())
        }
    }
}

/// The BPF_PROG_TEST_RUN test binary (tier 2, `tests/tier2/prog_test_run/`); every `.rs` file
/// in tests/tier3 is tier 3.
const TIER2: [&str; 1] = ["prog_test_run"];

/// Every end-to-end test file (tests/tier3/*.rs; each is a `[[test]]` of tests/Cargo.toml, and
/// cargo refuses a name that is not).
fn e2e_targets() -> Result<Vec<String>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/tier3");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_suffix(".rs")
                .map(str::to_string)
        })
        .collect();
    names.sort();
    Ok(names)
}

fn cargo(args: &[&str]) -> Result<()> {
    cargo_env(args, &[])
}

fn cargo_env(args: &[&str], env: &[(&str, PathBuf)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// True when the running kernel has IPVS (loading `ip_vs` where it is a module).
fn ipvs_available() -> bool {
    let _ = Command::new("modprobe").arg("ip_vs").output();
    std::path::Path::new("/proc/sys/net/ipv4/vs").exists()
}

fn require_root(what: &str) -> Result<()> {
    if !toolchain::is_root() {
        bail!("{what} needs root: run it with sudo or as root");
    }
    Ok(())
}
