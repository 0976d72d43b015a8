//! overlay-agent: flannel-compatible VXLAN overlay with an eBPF datapath.
//!
//! Wings by concern, each importing only downward (docs/ARCHITECTURE.md):
//! `cli` (the face) → `daemon` (composition root) → `reconcile` and `ops` → `control` (etcd),
//! `node` (netlink, ethtool, sysctl) and `dataplane` (the only aya user) → `family`, `metrics`.

pub mod cli;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod family;
pub mod metrics;
pub mod node;
pub mod ops;
pub mod reconcile;
