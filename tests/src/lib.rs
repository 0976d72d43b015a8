//! Shared harness for the root-only end-to-end tests: namespaces, links, processes, packets.

pub mod bpftest;
pub mod cluster;
pub mod cni;
pub mod docker;
pub mod dualstack;
pub mod etcd;
pub mod netns;
pub mod packet;
pub mod topology;
