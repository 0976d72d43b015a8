//! Installs what the build and the tests need, when it is missing. Idempotent and quick when
//! everything is present: one `dpkg-query` and one `bpf-linker --version`.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// Debian packages: the BPF-capable rustc (LLVM 22) with prebuilt core for bpfel, LLVM for
/// bpf-linker, protoc for etcd-client, and the real components the tests and demo use.
pub const PACKAGES: &[&str] = &[
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "protobuf-compiler",
    // google/protobuf/*.proto, which etcd-client's .proto files import (not pulled in by protoc).
    "libprotobuf-dev",
    "etcd-server",
    "etcd-client",
    "bpftool",
    "iproute2",
    "iptables",
    "nftables",
    "iputils-ping",
    "iperf3",
    "tcpdump",
    "ethtool",
    "curl",
    "systemd",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

pub fn ensure() -> Result<()> {
    let missing = missing_packages()?;
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "missing Debian packages: {}. Install them as root (`cargo xtask setup` as root \
                 does it) or run this command as root",
                missing.join(" ")
            );
        }
        eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
        apt(&["update", "-q"])?;
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(missing.iter().map(String::as_str));
        apt(&args).with_context(|| {
            format!(
                "apt-get could not install {}; on Debian 12 rustc-web and libstd-rust-web-dev-bpf \
                 come from bookworm-security: make sure it is in your sources",
                missing.join(" ")
            )
        })?;
    }
    ensure_bpf_linker()
}

fn missing_packages() -> Result<Vec<String>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${db:Status-Abbrev}\n"])
        .args(PACKAGES)
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query (is this Debian?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?;
            (it.next()? == "ii").then_some(name)
        })
        .collect();
    Ok(PACKAGES
        .iter()
        .filter(|p| !installed.contains(p))
        .map(|p| p.to_string())
        .collect())
}

fn apt(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
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

fn ensure_bpf_linker() -> Result<()> {
    let linker = cargo_bin().join("bpf-linker");
    if let Ok(out) = Command::new(&linker).arg("--version").output() {
        if String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
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
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("building bpf-linker failed ({status}); it needs llvm-22-dev, libpolly-22-dev, libzstd-dev and zlib1g-dev");
    }
    Ok(())
}
