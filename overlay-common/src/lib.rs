//! Types and pure functions shared by the eBPF programs and the agent.
//!
//! Everything here is `no_std` and allocation-free so the kernel side can use it. The packet
//! arithmetic (outer headers, checksums, source-port hashing, VNI encoding) lives here and is
//! unit-tested on the host; the eBPF code only does bounds checks, head adjustment and copying.
#![no_std]

pub mod counters;
pub mod maps;
pub mod monitor;
pub mod wire;

pub use counters::Counter;
pub use maps::{DataplaneConfig, DataplaneConfig6, Endpoint, Peer, Peer6, PeerStats, Vtep, Vtep6};

/// Default root under bpffs where the agent pins its maps.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/overlay";

/// flannel's defaults for the vxlan backend.
pub const DEFAULT_VNI: u32 = 1;
pub const DEFAULT_VXLAN_PORT: u16 = 8472;

/// Names of the programs in the eBPF object (the Rust function names).
/// The bits `overlay_probe` answers with.
pub mod probe {
    /// `bpf_skb_adjust_room` takes `BPF_F_ADJ_ROOM_DECAP_L4_UDP`.
    pub const DECAP_L4_UDP: i32 = 1;
    /// `bpf_skb_adjust_room` takes encap's flags, `BPF_F_ADJ_ROOM_ENCAP_L2_ETH` among them
    /// (Linux 5.11): without it no packet can be encapsulated.
    pub const ENCAP_L2_ETH: i32 = 1 << 1;
}

/// The eBPF object's load-time globals (read-only data the agent sets before loading).
pub mod globals {
    /// `u32`: 1 when XDP programs may call `bpf_xdp_adjust_meta` (XDP decap then marks what it
    /// stripped for the TC program after GRO), 0 when the kernel refuses the helper to XDP.
    pub const XDP_META: &str = "XDP_META";
}

pub mod programs {
    /// TC ingress on the pod bridge: encapsulates traffic to remote pod subnets.
    pub const ENCAP: &str = "overlay_encap";
    /// XDP on the underlay NIC: strips VXLAN from known peers.
    pub const DECAP_XDP: &str = "overlay_decap_xdp";
    /// TC ingress on the underlay NIC: the same rules as the XDP variant.
    pub const DECAP_TC: &str = "overlay_decap_tc";
    /// TC ingress on the receive-GRO device: drops whatever the kernel's VXLAN socket hands it
    /// (the device exists only so GRO merges our port's frames; nothing is delivered through it).
    pub const GRO_SINK: &str = "overlay_gro_sink";
    /// Never attached: test-run once at load to learn what this kernel's helpers accept
    /// (its answer: [`crate::probe`]).
    pub const PROBE: &str = "overlay_probe";
    /// TC egress on the underlay NIC, host-gw only: records the flows the node's stack routed
    /// to remote pods (their replies take the stack), as encap on `overlay0`'s egress does for
    /// vxlan.
    pub const RECORD: &str = "overlay_record";
    /// All programs, in the order the object lists them.
    pub const ALL: [&str; 6] = [ENCAP, DECAP_XDP, DECAP_TC, GRO_SINK, PROBE, RECORD];
}
