//! Builds the eBPF object (overlay-ebpf) for bpfel-unknown-none and embeds it in the agent.
//!
//! Where the BPF toolchain is absent (no Debian rustc with the BPF core library, or no
//! bpf-linker), an empty stub is embedded instead so `cargo check`/`clippy` still work; the agent
//! refuses to start with it. `cargo xtask` installs the toolchain.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// Debian's rustc-web: built on LLVM 22, ships core for the BPF targets.
const BPF_RUSTC: &str = "/usr/bin/rustc";
const BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none";
const TARGET: &str = "bpfel-unknown-none";

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("overlay.bpf.o");
    for p in [
        "overlay-ebpf/src",
        "overlay-ebpf/Cargo.toml",
        "overlay-common/src",
        "overlay-common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=OVERLAY_EBPF_STUB");

    let missing = missing_toolchain();
    if env::var_os("OVERLAY_EBPF_STUB").is_some() || missing.is_some() {
        let why = missing.unwrap_or_else(|| "OVERLAY_EBPF_STUB is set".into());
        println!(
            "cargo:warning=embedding a stub eBPF object ({why}); the agent will refuse to start. \
             Run `cargo xtask build` (as root) to install the BPF toolchain."
        );
        std::fs::write(&out, b"").unwrap();
        return;
    }

    let target_dir = root.join("target").join("ebpf");
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // Start from a clean slate: the outer build's compiler settings must not leak in.
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("CARGO_") || k.starts_with("RUSTC") || k.starts_with("RUSTFLAGS") || k == "RUSTDOC" {
            cmd.env_remove(&k);
        }
    }
    // rustc finds bpf-linker through PATH; rustup users keep it in ~/.cargo/bin.
    let mut path: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = env::var_os("HOME") {
        path.push(PathBuf::from(home).join(".cargo").join("bin"));
    }
    cmd.current_dir(&root)
        .env("PATH", env::join_paths(path).unwrap())
        .env("RUSTC", BPF_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", "-Cdebuginfo=2\x1f-Clink-arg=--btf")
        .args([
            "build",
            "--package",
            "overlay-ebpf",
            "--release",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir);
    let status = cmd.status().expect("running cargo for the eBPF object");
    assert!(
        status.success(),
        "building overlay-ebpf for {TARGET} failed (see the errors above)"
    );
    let elf = target_dir.join(TARGET).join("release").join("overlay");
    std::fs::copy(&elf, &out).unwrap_or_else(|e| panic!("copying {}: {e}", elf.display()));
}

/// What is missing for the BPF build, if anything.
fn missing_toolchain() -> Option<String> {
    if !Path::new(BPF_RUSTC).exists() || !Path::new(BPF_CORE).exists() {
        return Some(format!(
            "{BPF_RUSTC} with {BPF_CORE} not installed (Debian rustc-web, libstd-rust-web-dev-bpf)"
        ));
    }
    let in_path = env::var_os("PATH")
        .map(|p| env::split_paths(&p).any(|d| d.join("bpf-linker").exists()))
        .unwrap_or(false);
    let in_cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .is_some_and(|h| h.join("bin").join("bpf-linker").exists());
    if !in_path && !in_cargo_home {
        return Some("bpf-linker not found".into());
    }
    None
}
