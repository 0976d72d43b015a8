//! The eBPF object embedded at build time (see build.rs).

/// The ELF built from overlay-ebpf, or empty when the BPF toolchain was missing at build time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/overlay.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error(
        "this overlay-agent binary was built without the BPF toolchain and carries a stub eBPF \
         object; rebuild it with `cargo xtask build` (installs rustc-web, \
         libstd-rust-web-dev-bpf and bpf-linker) and try again"
    )]
    Stub,
}

/// The embedded eBPF object, refusing the stub.
pub fn object() -> Result<&'static [u8], ObjectError> {
    if OBJECT.is_empty() {
        Err(ObjectError::Stub)
    } else {
        Ok(OBJECT)
    }
}

/// True when the real object is embedded.
pub fn is_real() -> bool {
    !OBJECT.is_empty()
}
