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

#[cfg(test)]
mod tests {
    use overlay_common::{maps, programs};

    use super::*;

    #[test]
    fn embedded_object_has_every_program_and_map_with_btf() {
        let bytes = object().expect("the real eBPF object must be embedded (run via cargo xtask test)");
        let obj = aya_obj::Object::parse(bytes).expect("the embedded object parses");
        for name in programs::ALL {
            assert!(
                obj.programs.contains_key(name),
                "program {name} missing; found {:?}",
                obj.programs.keys()
            );
        }
        for name in maps::ALL {
            assert!(
                obj.maps.contains_key(name),
                "map {name} missing; found {:?}",
                obj.maps.keys()
            );
        }
        assert!(
            obj.btf.is_some(),
            "the object carries no BTF (build with -Clink-arg=--btf)"
        );
    }
}
