//! The backends the agent implements, as the network config's `Backend.Type` names them
//! (case-insensitively, as flanneld reads it), and what each costs a pod packet on the underlay.
//! Each backend has its node side in `reconcile/` (one file each) and its lease data in
//! [`super::lease`].

use overlay_common::wire::{VXLAN6_OVERHEAD, VXLAN_OVERHEAD};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Vxlan,
    /// flanneld's host-gw: pod packets travel unencapsulated to the peer node's PublicIP, which
    /// must be on our L2 segment.
    HostGw,
}

impl BackendKind {
    pub const ALL: [BackendKind; 2] = [BackendKind::Vxlan, BackendKind::HostGw];

    /// The `Backend.Type` (and lease `BackendType`) value.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Vxlan => "vxlan",
            BackendKind::HostGw => "host-gw",
        }
    }

    /// The backend `Backend.Type` names.
    pub fn from_type(t: &str) -> Option<BackendKind> {
        Self::ALL.into_iter().find(|k| t.eq_ignore_ascii_case(k.name()))
    }

    /// Bytes a pod packet gains over an IPv4 underlay: subnet.env's `FLANNEL_MTU` is the
    /// interface MTU minus this (vxlan: outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14;
    /// host-gw: nothing).
    pub fn overhead(self) -> u32 {
        match self {
            BackendKind::Vxlan => VXLAN_OVERHEAD as u32,
            BackendKind::HostGw => 0,
        }
    }

    /// The same over an IPv6 underlay (vxlan: outer IPv6 40 instead of 20).
    pub fn overhead6(self) -> u32 {
        match self {
            BackendKind::Vxlan => VXLAN6_OVERHEAD as u32,
            BackendKind::HostGw => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_and_overheads_as_flannel() {
        assert_eq!(BackendKind::from_type("VXLAN"), Some(BackendKind::Vxlan));
        assert_eq!(BackendKind::from_type("vxlan"), Some(BackendKind::Vxlan));
        assert_eq!(BackendKind::from_type("udp"), None);
        assert_eq!(BackendKind::from_type("host-gw"), Some(BackendKind::HostGw));
        assert_eq!(BackendKind::from_type("Host-GW"), Some(BackendKind::HostGw));
        assert_eq!(BackendKind::from_type("hostgw"), None);
        assert_eq!(BackendKind::Vxlan.overhead(), 50);
        assert_eq!(BackendKind::Vxlan.overhead6(), 70);
        assert_eq!(BackendKind::HostGw.overhead(), 0);
        assert_eq!(BackendKind::HostGw.overhead6(), 0);
    }
}
