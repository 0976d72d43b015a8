//! overlay-agent: flannel-compatible VXLAN overlay with an eBPF datapath.
//!
//! Control plane (`config`, `lease`, `subnet`, `subnet_env`, `iface`, `cli`) never sees BPF;
//! the datapath (`object`, `bpffs`, `dataplane`) never sees etcd.

pub mod bpffs;
pub mod dataplane;
pub mod object;
