//! Tier 2 (root): the real programs, loaded by the agent's own code, driven with
//! BPF_PROG_TEST_RUN: IPv4 pod traffic over the IPv4 underlay (`v4`, flannel.1's combination) and
//! IPv6 over IPv6 (`v6`, flannel-v6.1's). Each half writes its own expectations (literal header
//! values, checksums of its own, a reference model of the rules for its fuzz run); what they share
//! is the harness in `overlay_tests::bpftest`: the node, the runner and the fuzz loop.

mod v4;
mod v6;
