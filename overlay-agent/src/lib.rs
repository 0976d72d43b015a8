//! overlay-agent: flannel-compatible VXLAN overlay with an eBPF datapath.
//!
//! Control plane (`config`, `lease`, `subnet`, `subnet_env`, `iface`, `cli`) never sees BPF;
//! the datapath (`object`, `bpffs`, `dataplane`) never sees etcd.

pub mod agent;
pub mod bpffs;
pub mod cli;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod endpoints;
pub mod family;
pub mod grodev;
pub mod hostroute;
pub mod iface;
pub mod lease;
pub mod object;
pub mod ops;
pub mod peers;
pub mod subnet;
pub mod subnet_env;
