//! Orchestration only: install the toolchain, build, test, run the demo, benchmark.
//! Depends on nothing heavy so it builds on a fresh machine before anything is installed.

mod prev_release;
mod toolchain;

use std::{path::PathBuf, process::Command};

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
    /// Run every test tier: host unit tests, BPF_PROG_TEST_RUN (root), network namespaces (root).
    Test {
        /// Only the host unit tests (no root needed, quick).
        #[arg(long)]
        host_only: bool,
        /// Extra arguments passed to the test binaries (a name filter, --nocapture, ...).
        #[arg(last = true)]
        rest: Vec<String>,
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
    Setup,
    /// Build the previous release's agent (the commit in tests/previous-release; cached per
    /// commit) and print its path, for running netns_upgrade alone:
    /// `OVERLAY_PREV_AGENT_BIN=$(cargo xtask prev-release) cargo test -p overlay-tests --test netns_upgrade`.
    PrevRelease,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => toolchain::setup(),
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
        Cmd::Test { host_only, rest } => test(host_only, &rest),
        Cmd::Run {
            exit_after_checks,
            nodes,
            docker,
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
}

fn test(host_only: bool, rest: &[String]) -> Result<()> {
    toolchain::ensure()?;
    let mut tiers = vec![Tier {
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
    }];
    let e2e = if host_only { Vec::new() } else { e2e_targets()? };
    if !host_only {
        require_root("the BPF and network-namespace test tiers (use --host-only without root)")?;
        tiers.push(Tier {
            name: "tier 2: BPF_PROG_TEST_RUN (root)",
            root: true,
            args: vec![
                "test",
                "--package",
                "overlay-tests",
                "--test",
                TIER2[0],
                "--test",
                TIER2[1],
            ],
            env: Vec::new(),
        });
        let mut args = vec!["test", "--package", "overlay-tests"];
        for t in &e2e {
            args.extend(["--test", t.as_str()]);
        }
        // netns_upgrade upgrades from (and downgrades to) the previous release's binary.
        let prev = prev_release::ensure_built()?;
        tiers.push(Tier {
            name: "tier 3: network namespaces, real etcd, real traffic (root)",
            root: true,
            args,
            env: vec![(prev_release::ENV, prev)],
        });
        // Tier 3 runs the real agent binary (target/debug/overlay-agent) in node namespaces.
        cargo(&["build", "--package", "overlay-agent"])?;
    }
    for mut t in tiers {
        eprintln!("\n=== {} ===", t.name);
        t.args.push("--");
        if t.root {
            t.args.push("--test-threads=1");
        }
        t.args.extend(rest.iter().map(String::as_str));
        cargo_env(&t.args, &t.env)?;
    }
    Ok(())
}

/// The BPF_PROG_TEST_RUN test files (tier 2); every other file in tests/tests is tier 3.
const TIER2: [&str; 2] = ["prog_test_run", "prog_test_run_v6"];

/// Every end-to-end test file in tests/tests except the BPF_PROG_TEST_RUN tier.
fn e2e_targets() -> Result<Vec<String>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/tests");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_suffix(".rs")
                .map(str::to_string)
        })
        .filter(|n| !TIER2.contains(&n.as_str()))
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

fn require_root(what: &str) -> Result<()> {
    if !toolchain::is_root() {
        bail!("{what} needs root: run it with sudo or as root");
    }
    Ok(())
}
