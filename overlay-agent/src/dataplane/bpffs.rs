//! bpffs: make sure it is mounted before pinning.

use std::path::Path;

use nix::{
    mount::{mount, MsFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC},
};

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("checking whether {path} is bpffs: {source}")]
    Stat { path: String, source: nix::Error },
    #[error("mounting bpffs on {path} (are we root / CAP_SYS_ADMIN?): {source}")]
    Mount { path: String, source: nix::Error },
    #[error("creating pin directory {path}: {source}")]
    CreateDir { path: String, source: std::io::Error },
}

/// Mounts bpffs on `mountpoint` unless it is mounted already.
pub fn ensure_mounted(mountpoint: &Path) -> Result<(), BpffsError> {
    let path = mountpoint.display().to_string();
    let st = statfs(mountpoint).map_err(|source| BpffsError::Stat {
        path: path.clone(),
        source,
    })?;
    if st.filesystem_type() == BPF_FS_MAGIC {
        return Ok(());
    }
    mount(
        Some("bpf"),
        mountpoint,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| BpffsError::Mount { path, source })
}

/// Mounts bpffs on its standard place if needed and creates `pin_root` inside it.
pub fn prepare_pin_root(pin_root: &Path) -> Result<(), BpffsError> {
    ensure_mounted(Path::new("/sys/fs/bpf"))?;
    std::fs::create_dir_all(pin_root).map_err(|source| BpffsError::CreateDir {
        path: pin_root.display().to_string(),
        source,
    })
}
