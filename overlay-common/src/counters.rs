//! Per-CPU counters: one slot per [`Counter`] in the `OVL_COUNTERS` per-CPU array.
//! The names double as metric labels and as drop reasons in `overlay-agent status`.

/// Index into the per-CPU counter array. Append only: the index is the map key.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    EncapPackets = 0,
    EncapBytes,
    DecapPackets,
    DecapBytes,
    DirectPackets,
    DirectBytes,
    /// Seen by encap but not for a remote pod subnet: handed to the stack unchanged.
    PassEncap,
    /// Seen by decap but not VXLAN for us: handed to the stack unchanged.
    PassDecap,
    /// The agent has not written the config yet.
    DropNoConfig,
    /// Headers truncated or inconsistent (lengths, IHL, VXLAN flags).
    DropMalformed,
    /// VXLAN to our port from an address that is not a member's PublicIP.
    DropUnknownPeer,
    /// VXLAN with a VNI other than ours.
    DropWrongVni,
    /// Inner source address outside the sending peer's subnet.
    DropSpoofedSource,
    /// Fragmented VXLAN datagram: cannot be validated, flannel peers never send these.
    DropFragment,
    /// No route / neighbour to the peer's PublicIP.
    DropNoRoute,
    /// The kernel refused to grow or shrink the packet.
    DropAdjustRoom,
    /// Packet too large for the tunnel.
    DropTooBig,
    /// Larger than the tunnel MTU: handed to the stack, which routes it via the host device and
    /// answers DF packets with ICMP fragmentation-needed (or fragments the others).
    PassTooBig,
    /// Decapsulated and handed straight to a local pod's veth (no bridge, no routing).
    DeliverPackets,
    DeliverBytes,
    /// Decapsulated packets that were GSO super-packets (several MTU-sized segments in one).
    DecapGsoPackets,
    /// Frames XDP decap stripped that the TC program on the same NIC (after GRO) left to the
    /// stack: not for a local pod, or delivery is off.
    XdpDecapToStack,
    /// IPv6 pod packets encapsulated over the IPv6 underlay (the IPv4 ones are `EncapPackets`).
    Encap6Packets,
    Encap6Bytes,
    /// IPv6 VXLAN stripped (the IPv4 ones are `DecapPackets`).
    Decap6Packets,
    Decap6Bytes,
    /// IPv6 pod packets forwarded unencapsulated to a DirectRouting peer.
    Direct6Packets,
    Direct6Bytes,
    /// IPv6 TCP GSO packets with a short last segment sent through the host device to be
    /// segmented before encap, so every segment gets its own outer UDP checksum (counted again,
    /// segment by segment, in `Encap6Packets` when they come back).
    Encap6Resegmented,
    /// Decapsulated IPv6 packets handed straight to a local pod's veth (the IPv4 ones are
    /// `DeliverPackets`); also counted in `Decap6Packets` by the program that stripped them.
    Deliver6Packets,
    Deliver6Bytes,
    /// Seen by encap on the bridge already destination-NATed by the node's netfilter
    /// (br_netfilter, e.g. a Service's DNAT; marked by the agent's nftables rule): handed to the
    /// stack, which confirms the connection and routes it through `overlay0`.
    PassNat,
    /// Decapsulated for a local pod but a reply of a flow the node's stack routed out (its
    /// conntrack entry un-NATs it): handed to the stack, not delivered straight into the pod.
    PassConntrack,
    /// Decapsulated for a local pod but an IP fragment (no ports to tell its flow; conntrack
    /// reassembles it): handed to the stack.
    PassFragment,
    /// Decapsulated for a local pod but an ICMP error (conntrack translates the packet it
    /// quotes for NATed flows): handed to the stack.
    PassIcmpError,
    /// Flows the stack routed out through `overlay0` that encap recorded in `OVL_STACK_FLOWS`
    /// or `OVL_STACK_FLOWS6` (first packet of each).
    StackFlows,
    /// Seen by encap on the bridge with `--deliver stack`: both directions of pod traffic take
    /// the node's stack (as with `flannel.1`), so this node's conntrack and FORWARD rules see
    /// every packet of a flow; encap on `overlay0`'s egress sends it.
    PassStack,
    /// Frames the receive-GRO device (`overlay-gro`, see the agent's `--receive-gro`) was
    /// handed by the kernel's VXLAN socket: decap left them to the stack (not a packet for us),
    /// and nothing is ever delivered through that device, so they are dropped.
    DropGroDevice,
    /// host-gw: a bare pod packet from the underlay for a local pod whose source lies in a
    /// member's subnet but whose Ethernet source is not that member's MAC (as this node's
    /// neighbour table has the member's PublicIP): another host claiming the member's pods.
    DropWrongSender,
    /// host-gw: a bare pod packet for a local pod from a member's subnet while this node's
    /// neighbour table does not know the member's MAC yet (nothing to check the sender against):
    /// handed to the stack, which routes it as plain host-gw does.
    PassUnverified,
    /// XDP decap on a kernel that refuses XDP metadata: a frame arriving with the NIC's own MAC
    /// as its source (looped back or forged). There XDP marks what it stripped by that source
    /// MAC, so such a frame must not reach the TC program after GRO.
    DropOwnMac,
    /// Encap: a pod's UDP packet to the VXLAN port of a node's PublicIP (a pod never needs to
    /// send VXLAN; after the node's masquerade it would arrive as a member's).
    DropPodVxlan,
    /// Decap: VXLAN from a member whose inner frame is not addressed to our VtepMAC (the
    /// kernel's VXLAN device would not take it either).
    DropInnerMac,
    /// Encap: a pod's packet whose TTL (hop limit) runs out at this node, as it would on the
    /// node's routing: left to the stack, which answers Time Exceeded.
    PassTtl,
    /// Drops reported to an attached `overlay-agent monitor` (`OVL_EVENTS`).
    MonitorEvents,
    /// Drops a monitor asked for that the rate limit (per CPU) left unreported.
    MonitorSuppressed,
    /// Drops a monitor asked for that found its ring buffer full (it reads too slowly).
    MonitorLost,
}

/// Number of counters defined.
pub const COUNTER_COUNT: u32 = Counter::MonitorLost as u32 + 1;

/// Slots in the per-CPU array (its `max_entries`): room to append counters without changing
/// the pinned map's layout, so an upgrade keeps the counts.
pub const COUNTER_SLOTS: u32 = 64;
const _: () = assert!(COUNTER_COUNT <= COUNTER_SLOTS);

impl Counter {
    /// All counters in index order.
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::EncapPackets,
        Counter::EncapBytes,
        Counter::DecapPackets,
        Counter::DecapBytes,
        Counter::DirectPackets,
        Counter::DirectBytes,
        Counter::PassEncap,
        Counter::PassDecap,
        Counter::DropNoConfig,
        Counter::DropMalformed,
        Counter::DropUnknownPeer,
        Counter::DropWrongVni,
        Counter::DropSpoofedSource,
        Counter::DropFragment,
        Counter::DropNoRoute,
        Counter::DropAdjustRoom,
        Counter::DropTooBig,
        Counter::PassTooBig,
        Counter::DeliverPackets,
        Counter::DeliverBytes,
        Counter::DecapGsoPackets,
        Counter::XdpDecapToStack,
        Counter::Encap6Packets,
        Counter::Encap6Bytes,
        Counter::Decap6Packets,
        Counter::Decap6Bytes,
        Counter::Direct6Packets,
        Counter::Direct6Bytes,
        Counter::Encap6Resegmented,
        Counter::Deliver6Packets,
        Counter::Deliver6Bytes,
        Counter::PassNat,
        Counter::PassConntrack,
        Counter::PassFragment,
        Counter::PassIcmpError,
        Counter::StackFlows,
        Counter::PassStack,
        Counter::DropGroDevice,
        Counter::DropWrongSender,
        Counter::PassUnverified,
        Counter::DropOwnMac,
        Counter::DropPodVxlan,
        Counter::DropInnerMac,
        Counter::PassTtl,
        Counter::MonitorEvents,
        Counter::MonitorSuppressed,
        Counter::MonitorLost,
    ];

    /// Stable snake_case name, used as a metric label and in status output.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::EncapPackets => "encap_packets",
            Counter::EncapBytes => "encap_bytes",
            Counter::DecapPackets => "decap_packets",
            Counter::DecapBytes => "decap_bytes",
            Counter::DirectPackets => "direct_packets",
            Counter::DirectBytes => "direct_bytes",
            Counter::PassEncap => "pass_encap",
            Counter::PassDecap => "pass_decap",
            Counter::DropNoConfig => "drop_no_config",
            Counter::DropMalformed => "drop_malformed",
            Counter::DropUnknownPeer => "drop_unknown_peer",
            Counter::DropWrongVni => "drop_wrong_vni",
            Counter::DropSpoofedSource => "drop_spoofed_source",
            Counter::DropFragment => "drop_fragment",
            Counter::DropNoRoute => "drop_no_route",
            Counter::DropAdjustRoom => "drop_adjust_room",
            Counter::DropTooBig => "drop_too_big",
            Counter::PassTooBig => "pass_too_big",
            Counter::DeliverPackets => "deliver_packets",
            Counter::DeliverBytes => "deliver_bytes",
            Counter::DecapGsoPackets => "decap_gso_packets",
            Counter::XdpDecapToStack => "xdp_decap_to_stack",
            Counter::Encap6Packets => "encap6_packets",
            Counter::Encap6Bytes => "encap6_bytes",
            Counter::Decap6Packets => "decap6_packets",
            Counter::Decap6Bytes => "decap6_bytes",
            Counter::Direct6Packets => "direct6_packets",
            Counter::Direct6Bytes => "direct6_bytes",
            Counter::Encap6Resegmented => "encap6_resegmented",
            Counter::Deliver6Packets => "deliver6_packets",
            Counter::Deliver6Bytes => "deliver6_bytes",
            Counter::PassNat => "pass_nat",
            Counter::PassConntrack => "pass_conntrack",
            Counter::PassFragment => "pass_fragment",
            Counter::PassIcmpError => "pass_icmp_error",
            Counter::StackFlows => "stack_flows",
            Counter::PassStack => "pass_stack",
            Counter::DropGroDevice => "drop_gro_device",
            Counter::DropWrongSender => "drop_wrong_sender",
            Counter::PassUnverified => "pass_unverified",
            Counter::DropOwnMac => "drop_own_mac",
            Counter::DropPodVxlan => "drop_pod_vxlan",
            Counter::DropInnerMac => "drop_inner_mac",
            Counter::PassTtl => "pass_ttl",
            Counter::MonitorEvents => "monitor_events",
            Counter::MonitorSuppressed => "monitor_suppressed",
            Counter::MonitorLost => "monitor_lost",
        }
    }

    /// The counter with index `i`.
    pub const fn from_index(i: u32) -> Option<Counter> {
        if i < COUNTER_COUNT {
            Some(Counter::ALL[i as usize])
        } else {
            None
        }
    }

    /// The drop reasons, in index order.
    pub fn drops() -> impl Iterator<Item = Counter> {
        Counter::ALL.into_iter().filter(|c| c.is_drop())
    }

    /// The drop reason named `name` (as [`Counter::name`] spells it).
    pub fn drop_named(name: &str) -> Option<Counter> {
        Counter::drops().find(|c| c.name() == name)
    }

    /// True for the counters that record dropped packets.
    pub const fn is_drop(self) -> bool {
        let i = self as u32;
        (i >= Counter::DropNoConfig as u32 && i <= Counter::DropTooBig as u32)
            || matches!(
                self,
                Counter::DropGroDevice
                    | Counter::DropWrongSender
                    | Counter::DropOwnMac
                    | Counter::DropPodVxlan
                    | Counter::DropInnerMac
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_index_order_and_names_are_unique() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "Counter::ALL[{i}] is {c:?}");
            for other in &Counter::ALL[..i] {
                assert_ne!(c.name(), other.name(), "duplicate counter name");
            }
        }
        assert!(Counter::DropMalformed.is_drop());
        assert!(!Counter::PassDecap.is_drop());
        assert!(Counter::DropTooBig.is_drop());
        assert!(!Counter::PassTooBig.is_drop());
        assert!(Counter::DropGroDevice.is_drop());
        assert!(!Counter::PassStack.is_drop());
        assert!(Counter::DropWrongSender.is_drop());
        assert!(!Counter::PassUnverified.is_drop());
        assert!(Counter::DropOwnMac.is_drop());
        assert!(Counter::DropPodVxlan.is_drop());
        assert!(Counter::DropInnerMac.is_drop());
    }
}
