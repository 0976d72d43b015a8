//! Shared harness for the root-only end-to-end tests: namespaces, links, processes, packets.

pub mod bpftest;
pub mod cluster;
pub mod cni;
pub mod docker;
pub mod dualstack;
pub mod etcd;
pub mod kubeproxy;
pub mod netns;
pub mod packet;
pub mod scale;
pub mod topology;

/// `d` stretched by `OVERLAY_TEST_SLOWDOWN` (a whole number, default 1): how long the harness
/// waits for something to happen (etcd healthy, an agent's subnet.env, a log line, a condition).
/// The VM tier runs the tests under qemu's emulation (TCG), several times slower than the host,
/// and sets it there; what a test asserts about the datapath is unchanged.
pub fn slow(d: std::time::Duration) -> std::time::Duration {
    let k = std::env::var("OVERLAY_TEST_SLOWDOWN")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|k| *k >= 1)
        .unwrap_or(1);
    d * k
}
