//! The previous release's `overlay-agent`, for the upgrade/downgrade tests (tests/tier3/netns_upgrade.rs).
//!
//! `tests/previous-release` names the release commit. Its tree is exported with `git archive`
//! into `target/prev-release/src/<commit>` and built there with its own Cargo.lock into the shared
//! `target/prev-release/target`; the binary is kept as `target/prev-release/bin/overlay-agent-<commit>`,
//! so it is built once per commit.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// The file naming the previous release, relative to the workspace root.
pub const RECORD: &str = "tests/previous-release";
/// The environment variable through which the tests get the binary.
pub const ENV: &str = "OVERLAY_PREV_AGENT_BIN";

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// The commit in `tests/previous-release`: the first line that is neither empty nor a `#` comment.
pub fn recorded_commit(root: &Path) -> Result<String> {
    let path = root.join(RECORD);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_record(&text).with_context(|| format!("in {}", path.display()))
}

fn parse_record(text: &str) -> Result<String> {
    let Some(line) = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
    else {
        bail!("no commit: expected one line with a full 40-hex-digit commit hash");
    };
    if line.len() != 40 || !line.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{line:?} is not a full 40-hex-digit commit hash (use `git rev-parse <rev>`)");
    }
    Ok(line.to_ascii_lowercase())
}

/// Builds the previous release's agent unless the binary for that exact commit is cached;
/// returns its path.
pub fn ensure_built() -> Result<PathBuf> {
    let root = workspace_root();
    let commit = recorded_commit(&root)?;
    let base = root.join("target").join("prev-release");
    let bin = base.join("bin").join(format!("overlay-agent-{commit}"));
    if bin.is_file() {
        eprintln!("xtask: previous release {commit}: cached {}", bin.display());
        return Ok(bin);
    }
    require_commit(&root, &commit)?;
    let src = base.join("src").join(&commit);
    if !src.join("Cargo.toml").is_file() {
        export_tree(&root, &commit, &src)?;
    }
    eprintln!(
        "xtask: building the previous release's overlay-agent ({commit}) in {}",
        src.display()
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(&src)
        .args(["build", "--locked", "--package", "overlay-agent", "--target-dir"])
        .arg(base.join("target"))
        // A stub eBPF object would build "successfully" and refuse to start in the tests.
        .env_remove("OVERLAY_EBPF_STUB")
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!(
            "building overlay-agent at {commit} in {} failed ({status})",
            src.display()
        );
    }
    let built = base.join("target").join("debug").join("overlay-agent");
    let bytes = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    if !embeds_bpf_object(&bytes) {
        bail!(
            "{} (commit {commit}) embeds no eBPF object: it was built without the BPF toolchain \
             (`cargo xtask setup` installs it)",
            built.display()
        );
    }
    // Copy, then rename: an interrupted copy never looks like a cached binary.
    std::fs::create_dir_all(bin.parent().expect("bin has a parent"))?;
    let tmp = bin.with_extension("tmp");
    std::fs::copy(&built, &tmp)
        .with_context(|| format!("copying {} to {}", built.display(), tmp.display()))?;
    std::fs::rename(&tmp, &bin)?;
    eprintln!("xtask: previous release {commit}: {}", bin.display());
    Ok(bin)
}

/// Fails with the fix when the clone does not have `commit` (a shallow CI checkout).
fn require_commit(root: &Path, commit: &str) -> Result<()> {
    let have = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
        .stderr(Stdio::null())
        .status()
        .context("running git (needed to export the previous release)")?
        .success();
    if have {
        return Ok(());
    }
    let shallow = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["rev-parse", "--is-shallow-repository"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "true")
        .unwrap_or(false);
    bail!(
        "{RECORD} names commit {commit} (the previous release the upgrade tests start from), but this \
         clone does not have it{}. Fetch it with `git fetch --unshallow` (or `git fetch origin {commit}`) \
         and run the tests again",
        if shallow { " (it is a shallow clone)" } else { "" }
    )
}

/// `git archive <commit> | tar -x` into `dest` (through a temporary directory, so a half-written
/// tree is never mistaken for a complete one).
fn export_tree(root: &Path, commit: &str, dest: &Path) -> Result<()> {
    let tmp = dest.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let mut archive = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["archive", "--format=tar", commit])
        .stdout(Stdio::piped())
        .spawn()
        .context("running git archive")?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&tmp)
        .stdin(archive.stdout.take().expect("piped stdout"))
        .status()
        .context("running tar")?;
    let git = archive.wait()?;
    if !git.success() || !tar.success() {
        bail!("exporting {commit} with `git archive | tar -x` failed (git {git}, tar {tar})");
    }
    let _ = std::fs::remove_dir_all(dest);
    std::fs::rename(&tmp, dest).with_context(|| format!("moving {} to {}", tmp.display(), dest.display()))?;
    Ok(())
}

/// True when `bin` contains a little-endian 64-bit ELF for EM_BPF (247): the agent's build
/// script embeds an empty stub instead when the BPF toolchain is missing.
fn embeds_bpf_object(bin: &[u8]) -> bool {
    const MAGIC: &[u8] = b"\x7fELF\x02\x01\x01";
    const EM_BPF: u16 = 247;
    // The binary's own header is at offset 0 (an x86-64 ELF): look past it.
    bin.windows(MAGIC.len())
        .enumerate()
        .skip(1)
        .filter(|(_, w)| *w == MAGIC)
        .any(|(at, _)| {
            bin.get(at + 18..at + 20)
                .is_some_and(|m| u16::from_le_bytes([m[0], m[1]]) == EM_BPF)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_format() {
        let c = "0b09c8234a1b4003ba43ee286d5ddac8dcb30fe9";
        assert_eq!(parse_record(&format!("# comment\n\n{c}\n")).unwrap(), c);
        assert_eq!(parse_record(&format!("  {}  \n", c.to_uppercase())).unwrap(), c);
        for bad in [
            "",
            "# only a comment\n",
            "0b09c82\n",
            "v0.1.0\n",
            &format!("{c}0\n"),
        ] {
            assert!(parse_record(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn detects_an_embedded_bpf_object() {
        let mut host = b"\x7fELF\x02\x01\x01".to_vec();
        host.resize(64, 0);
        assert!(
            !embeds_bpf_object(&host),
            "the binary's own header is not an eBPF object"
        );
        let mut bpf = b"\x7fELF\x02\x01\x01".to_vec();
        bpf.resize(18, 0);
        bpf.extend_from_slice(&247u16.to_le_bytes());
        bpf.resize(64, 0);
        let mut with = host.clone();
        with.extend_from_slice(&bpf);
        assert!(embeds_bpf_object(&with));
        let mut x86 = bpf.clone();
        x86[18..20].copy_from_slice(&62u16.to_le_bytes());
        let mut without = host;
        without.extend_from_slice(&x86);
        assert!(!embeds_bpf_object(&without));
    }
}
