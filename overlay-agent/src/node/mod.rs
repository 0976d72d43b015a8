//! Host plumbing, never etcd or BPF: the underlay's choice and its addresses, ethtool, sysctls,
//! the host device, the receive-GRO device.

pub mod bridge;
pub mod ethtool;
pub mod grodev;
pub mod hostdev;
pub mod netlink;
pub mod routes;
pub mod sysctl;
pub mod underlay;
