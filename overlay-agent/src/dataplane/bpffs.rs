//! bpffs: make sure it is mounted before pinning, and that the pin root is safe to trust.
//!
//! Whoever can write the pin root (or replace it) can delete the agent's link pins, which
//! detaches its programs: the datapath is gone. So the pin root is checked every time it is
//! used, whether the agent just created it or found it: a real directory (no symlink anywhere
//! on the path), owned by root, not writable by group or others, on a bpffs; every directory
//! above it owned by root and not writable by group or others unless sticky (the kernel's
//! default bpffs root is `1777`, as `/tmp`). A bpffs the agent mounts itself gets `mode=0700`
//! (what systemd mounts `/sys/fs/bpf` with).

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Component, Path, PathBuf},
};

use nix::{
    mount::{mount, MsFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC},
};

/// The standard bpffs mount point.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// Mount options of a bpffs the agent mounts itself: only root may enter it.
pub const MOUNT_DATA: &str = "mode=0700";

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("checking whether {path} is bpffs: {source}")]
    Stat { path: String, source: nix::Error },
    #[error("mounting bpffs on {path} (are we root / CAP_SYS_ADMIN?): {source}")]
    Mount { path: String, source: nix::Error },
    #[error("creating pin directory {path}: {source}")]
    CreateDir { path: String, source: std::io::Error },
    #[error("checking {path}: {source}")]
    Inspect { path: String, source: std::io::Error },
    /// The pin root (or a directory above it) could be changed by someone other than root.
    #[error("refusing pin root {pin_root}: {why}; {fix}")]
    Unsafe {
        pin_root: String,
        why: String,
        fix: String,
    },
}

/// Mounts bpffs (`mode=0700`, nosuid, nodev, noexec) on `mountpoint` unless it is mounted
/// already; true when it mounted.
pub fn ensure_mounted(mountpoint: &Path) -> Result<bool, BpffsError> {
    let path = mountpoint.display().to_string();
    if is_bpffs(mountpoint)? {
        return Ok(false);
    }
    mount(
        Some("bpf"),
        mountpoint,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(MOUNT_DATA),
    )
    .map_err(|source| BpffsError::Mount { path, source })?;
    Ok(true)
}

fn is_bpffs(path: &Path) -> Result<bool, BpffsError> {
    let st = statfs(path).map_err(|source| BpffsError::Stat {
        path: path.display().to_string(),
        source,
    })?;
    Ok(st.filesystem_type() == BPF_FS_MAGIC)
}

/// Mounts bpffs on its standard place if needed, creates `pin_root` inside it (mode 0700) and
/// checks it ([`check_pin_root`]), whether it was created now or is reused.
pub fn prepare_pin_root(pin_root: &Path) -> Result<(), BpffsError> {
    if ensure_mounted(Path::new(BPFFS_ROOT))? {
        tracing::info!(path = BPFFS_ROOT, options = MOUNT_DATA, "mounted bpffs");
    }
    let pin_root = absolute(pin_root);
    // Check what is above it first: creating a directory inside a directory someone else
    // controls would be a gift to them.
    if let Some(parent) = pin_root.parent() {
        check_ancestors(&pin_root, parent, 0)?;
    }
    let mut b = std::fs::DirBuilder::new();
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.recursive(true)
        .create(&pin_root)
        .map_err(|source| BpffsError::CreateDir {
            path: pin_root.display().to_string(),
            source,
        })?;
    // After creating: a directory someone planted between the check and the mkdir is caught.
    check_pin_root(&pin_root, 0)?;
    if !is_bpffs(&pin_root)? {
        return Err(not_on_bpffs(&pin_root));
    }
    Ok(())
}

/// `overlay-agent cleanup` removes the pin root recursively: refuse anything that is not a
/// real directory on a bpffs below the bpffs's own mount point (a mistyped `--pin-root /` or
/// `/var`, a symlink, or the whole of `/sys/fs/bpf`, which holds other programs' pins too).
/// Missing is fine (nothing to remove).
pub fn check_cleanup_target(pin_root: &Path) -> Result<(), BpffsError> {
    let pin_root = absolute(pin_root);
    let md = match std::fs::symlink_metadata(&pin_root) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(BpffsError::Inspect {
                path: pin_root.display().to_string(),
                source,
            })
        }
    };
    let refuse = |why: String, fix: &str| BpffsError::Unsafe {
        pin_root: pin_root.display().to_string(),
        why,
        fix: fix.to_string(),
    };
    if md.file_type().is_symlink() {
        return Err(refuse(
            "it is a symlink, and cleanup removes the pin root recursively".into(),
            "give --pin-root the directory itself",
        ));
    }
    if !md.is_dir() {
        return Err(refuse("it is not a directory".into(), "check --pin-root"));
    }
    if !is_bpffs(&pin_root)? {
        return Err(refuse(
            "it is not on a bpffs, and cleanup removes the pin root recursively".into(),
            "check --pin-root: the agent pins under a bpffs (default /sys/fs/bpf/overlay)",
        ));
    }
    let parent_dev = pin_root
        .parent()
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|p| p.dev());
    if parent_dev != Some(md.dev()) {
        return Err(refuse(
            "it is the bpffs mount itself, which holds other programs' pins too".into(),
            "give --pin-root the agent's own directory inside it (default /sys/fs/bpf/overlay)",
        ));
    }
    Ok(())
}

fn not_on_bpffs(pin_root: &Path) -> BpffsError {
    BpffsError::Unsafe {
        pin_root: pin_root.display().to_string(),
        why: "it is not on a bpffs".into(),
        fix: format!(
            "choose a --pin-root under {BPFFS_ROOT} (default /sys/fs/bpf/overlay), or mount one \
             there: mount -t bpf -o {MOUNT_DATA} bpf DIR"
        ),
    }
}

/// `path` made absolute against the working directory (not resolved: symlinks stay visible).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Checks the pin root itself and everything above it. `owner` is the uid that must own the
/// pin root (root, 0; tests pass their own); directories above it may also belong to root.
pub fn check_pin_root(pin_root: &Path, owner: u32) -> Result<(), BpffsError> {
    let pin_root = absolute(pin_root);
    if let Some(parent) = pin_root.parent() {
        check_ancestors(&pin_root, parent, owner)?;
    }
    let shown = pin_root.display().to_string();
    let refuse = |why: String, fix: String| BpffsError::Unsafe {
        pin_root: shown.clone(),
        why,
        fix,
    };
    let md = std::fs::symlink_metadata(&pin_root).map_err(|source| BpffsError::Inspect {
        path: shown.clone(),
        source,
    })?;
    if md.file_type().is_symlink() {
        let to = std::fs::read_link(&pin_root)
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        return Err(refuse(
            format!("it is a symlink (to {to}): whoever can replace the link can redirect the pins"),
            format!("remove it (rm {shown}) or give --pin-root a real directory on a bpffs"),
        ));
    }
    if !md.is_dir() {
        return Err(refuse(
            "it is not a directory".into(),
            format!("remove it (rm {shown}) or choose another --pin-root"),
        ));
    }
    if md.uid() != owner {
        return Err(refuse(
            format!(
                "it is owned by uid {}, not {}: its owner can delete the agent's pins and so its datapath",
                md.uid(),
                uid_name(owner)
            ),
            format!(
                "check what is in it, then remove it (rm -r {shown}) so the agent creates it, or \
                 chown root {shown}"
            ),
        ));
    }
    let mode = md.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(refuse(
            format!(
                "it is writable by group or others (mode {mode:04o}): they can delete the agent's \
                 pins and so its datapath"
            ),
            format!("chmod go-w {shown}"),
        ));
    }
    Ok(())
}

/// Each directory from `/` down to `dir` (the pin root's parent, made absolute): no symlink,
/// owned by root or `owner`, not writable by group or others unless sticky.
fn check_ancestors(pin_root: &Path, dir: &Path, owner: u32) -> Result<(), BpffsError> {
    let mut at = PathBuf::new();
    for c in dir.components() {
        match c {
            Component::RootDir => at.push("/"),
            Component::CurDir => continue,
            Component::ParentDir => {
                at.pop();
                continue;
            }
            Component::Normal(n) => at.push(n),
            Component::Prefix(_) => continue,
        }
        let md = match std::fs::symlink_metadata(&at) {
            Ok(md) => md,
            // Created below with the pin root (0700, ours), and checked afterwards.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(BpffsError::Inspect {
                    path: at.display().to_string(),
                    source,
                })
            }
        };
        let shown = at.display().to_string();
        let refuse = |why: String, fix: String| BpffsError::Unsafe {
            pin_root: pin_root.display().to_string(),
            why: format!("{shown}, a directory above it, {why}"),
            fix,
        };
        if md.file_type().is_symlink() {
            return Err(refuse(
                "is a symlink".into(),
                "give --pin-root a path without symlinks".into(),
            ));
        }
        if md.uid() != 0 && md.uid() != owner {
            return Err(refuse(
                format!("is owned by uid {}, not root", md.uid()),
                "choose a --pin-root whose directories belong to root (default /sys/fs/bpf/overlay)".into(),
            ));
        }
        let mode = md.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(refuse(
                format!("is writable by group or others without the sticky bit (mode {mode:04o})"),
                format!("chmod go-w {shown}, or choose another --pin-root"),
            ));
        }
    }
    Ok(())
}

fn uid_name(uid: u32) -> String {
    if uid == 0 {
        "root".into()
    } else {
        format!("uid {uid}")
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt as _};

    use super::*;

    /// A temp directory (mode 0700, ours) removed on drop.
    struct Tmp(PathBuf);
    impl Tmp {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("bpffs-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir(&p).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
            Tmp(p)
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    fn refused(r: Result<(), BpffsError>) -> String {
        match r {
            Err(e @ BpffsError::Unsafe { .. }) => e.to_string(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// The pin root checks, on an ordinary file system (the bpffs test is tier 3): a real
    /// directory of the owner, mode 0700 or 0755, passes; a symlink to one, a group- or
    /// other-writable one, one of another owner, and one below a world-writable non-sticky
    /// directory are refused, each naming the path and the fix.
    #[test]
    fn pin_root_must_be_a_real_directory_only_its_owner_can_write() {
        let t = Tmp::new("pinroot");
        let good = t.0.join("overlay");
        std::fs::create_dir(&good).unwrap();
        for mode in [0o700, 0o755, 0o1755] {
            std::fs::set_permissions(&good, std::fs::Permissions::from_mode(mode)).unwrap();
            check_pin_root(&good, me()).unwrap_or_else(|e| panic!("mode {mode:o}: {e}"));
        }

        let link = t.0.join("link");
        symlink(&good, &link).unwrap();
        let e = refused(check_pin_root(&link, me()));
        assert!(
            e.contains(&link.display().to_string()) && e.contains("symlink") && e.contains("rm "),
            "{e}"
        );

        for mode in [0o775, 0o757, 0o777, 0o1777] {
            std::fs::set_permissions(&good, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = refused(check_pin_root(&good, me()));
            assert!(
                e.contains("writable by group or others") && e.contains("chmod go-w"),
                "{e}"
            );
        }
        std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o700)).unwrap();

        let e = refused(check_pin_root(&good, me() + 1));
        assert!(
            e.contains(&format!("owned by uid {}", me())) && e.contains("rm -r"),
            "{e}"
        );

        // Below a directory anyone may write (no sticky bit): refused by the ancestor check.
        let open = t.0.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let inner = open.join("overlay");
        std::fs::create_dir(&inner).unwrap();
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = refused(check_pin_root(&inner, me()));
        assert!(
            e.contains(&format!("{}, a directory above it", open.display())),
            "{e}"
        );
        // Sticky (as /tmp, or a bpffs mounted without mode=): others cannot replace our entry.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        check_pin_root(&inner, me()).unwrap();

        // A symlink above the pin root.
        let via = t.0.join("via");
        symlink(&t.0, &via).unwrap();
        let e = refused(check_pin_root(&via.join("overlay"), me()));
        assert!(e.contains("a directory above it, is a symlink"), "{e}");

        // Not a directory at all.
        let file = t.0.join("file");
        std::fs::write(&file, "").unwrap();
        assert!(refused(check_pin_root(&file, me())).contains("not a directory"));
    }

    /// cleanup's guard: a pin root that is not on a bpffs (here: a directory of the test's temp
    /// file system, `/`, a symlink) is refused, a missing one is fine.
    #[test]
    fn cleanup_refuses_what_is_not_on_a_bpffs() {
        let t = Tmp::new("cleanup");
        let e = refused(check_cleanup_target(&t.0));
        assert!(
            e.contains("not on a bpffs") && e.contains(&t.0.display().to_string()),
            "{e}"
        );
        assert!(refused(check_cleanup_target(Path::new("/"))).contains("not on a bpffs"));
        let link = t.0.join("link");
        symlink("/sys/fs/bpf", &link).unwrap();
        assert!(refused(check_cleanup_target(&link)).contains("symlink"));
        check_cleanup_target(&t.0.join("missing")).unwrap();
    }
}
