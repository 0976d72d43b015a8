//! The dataplane's side of the family vocabulary ([`crate::family`]): which maps hold a
//! family's peers and local pods, and how its addresses and subnets become their keys and values.

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::Pod;
use overlay_common::{
    maps::{self, PEER_DIRECT},
    Peer, Peer6, Vtep, Vtep6,
};

use crate::family::{Family, V4, V6};

/// A remote node's side in one family as the datapath sees it: its subnet, reached at its
/// PublicIP (PublicIPv6) with the VtepMAC of its `BackendData` (`BackendV6Data`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerEntry<F: Family = V4> {
    pub subnet: F::Net,
    pub public_ip: F::Addr,
    pub vtep_mac: [u8; 6],
    /// DirectRouting: same L2 segment, no encapsulation.
    pub direct: bool,
}

/// One entry of a family's sender table: a PublicIP and the subnet decap accepts inner sources
/// from when VXLAN arrives from it.
pub type SenderEntry<F> = (<F as Family>::Addr, <F as Family>::Net);

/// A pod on this node as the datapath sees it: decap delivers packets for `ip` straight to
/// `ifindex` (the pod's host-side veth), addressed to `mac`, from `gw_mac` (the bridge).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LocalEndpoint<F: Family = V4> {
    pub ip: F::Addr,
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub gw_mac: [u8; 6],
}

/// A family's maps: the peer trie and its sender table (`OVL_PEERS`/`OVL_VTEPS`, or the `6`
/// ones), the endpoint map and the device map whose entries the kernel deletes with their
/// device, so decap never redirects to a veth that is gone.
pub trait MapFamily: Family {
    /// An address as a map key (network byte order).
    type Key: Pod + Eq;
    type Peer: Pod;
    type Vtep: Pod;
    const PEERS: &'static str;
    const VTEPS: &'static str;
    const ENDPOINTS: &'static str;
    const ENDPOINT_DEVS: &'static str;
    /// Traffic per member, keyed by its PublicIP (`OVL_PEER_STATS`, `OVL_PEER_STATS6`).
    const PEER_STATS: &'static str;
    /// Several endpoints can share one device entry ([`MapFamily::dev_key`] ignores the
    /// address), so an entry is deleted only when no endpoint uses it any more.
    const SHARED_DEV: bool;
    fn key(a: Self::Addr) -> Self::Key;
    fn from_key(k: Self::Key) -> Self::Addr;
    /// The device-map key of the endpoint `a` on veth `ifindex`: the IPv4 address itself
    /// (one entry per address), the ifindex for IPv6 (one entry per veth, shared by its
    /// addresses).
    fn dev_key(a: Self::Addr, ifindex: u32) -> u32;
    fn peer_value(public_ip: Self::Key, vtep_mac: [u8; 6], flags: u16) -> Self::Peer;
    /// (PublicIP, VtepMAC, flags) of a peer value.
    fn peer_fields(p: &Self::Peer) -> (Self::Key, [u8; 6], u16);
    fn vtep_value(subnet: Self::Key, prefix_len: u8) -> Self::Vtep;
    /// (subnet, prefix length) of a sender value.
    fn vtep_fields(v: &Self::Vtep) -> (Self::Key, u8);
}

impl<F: MapFamily> PeerEntry<F> {
    pub(super) fn value(&self) -> F::Peer {
        let flags = if self.direct { PEER_DIRECT } else { 0 };
        F::peer_value(F::key(self.public_ip), self.vtep_mac, flags)
    }

    pub(super) fn from_value(subnet: F::Net, p: &F::Peer) -> Self {
        let (ip, vtep_mac, flags) = F::peer_fields(p);
        PeerEntry {
            subnet,
            public_ip: F::from_key(ip),
            vtep_mac,
            direct: flags & PEER_DIRECT != 0,
        }
    }
}

impl MapFamily for V4 {
    type Key = [u8; 4];
    type Peer = Peer;
    type Vtep = Vtep;
    const PEERS: &'static str = maps::PEERS;
    const VTEPS: &'static str = maps::VTEPS;
    const ENDPOINTS: &'static str = maps::ENDPOINTS;
    const ENDPOINT_DEVS: &'static str = maps::ENDPOINT_DEVS;
    const PEER_STATS: &'static str = maps::PEER_STATS;
    const SHARED_DEV: bool = false;
    fn key(a: Ipv4Addr) -> [u8; 4] {
        a.octets()
    }
    fn from_key(k: [u8; 4]) -> Ipv4Addr {
        Ipv4Addr::from(k)
    }
    fn dev_key(a: Ipv4Addr, _ifindex: u32) -> u32 {
        maps::endpoint_dev_key(a.octets())
    }
    fn peer_value(public_ip: [u8; 4], vtep_mac: [u8; 6], flags: u16) -> Peer {
        Peer {
            public_ip,
            vtep_mac,
            flags,
        }
    }
    fn peer_fields(p: &Peer) -> ([u8; 4], [u8; 6], u16) {
        (p.public_ip, p.vtep_mac, p.flags)
    }
    fn vtep_fields(v: &Vtep) -> ([u8; 4], u8) {
        (v.subnet, v.prefix_len)
    }
    fn vtep_value(subnet: [u8; 4], prefix_len: u8) -> Vtep {
        Vtep {
            subnet,
            prefix_len,
            _pad: [0; 3],
        }
    }
}

impl MapFamily for V6 {
    type Key = [u8; 16];
    type Peer = Peer6;
    type Vtep = Vtep6;
    const PEERS: &'static str = maps::PEERS6;
    const VTEPS: &'static str = maps::VTEPS6;
    const ENDPOINTS: &'static str = maps::ENDPOINTS6;
    const ENDPOINT_DEVS: &'static str = maps::ENDPOINT_DEVS6;
    const PEER_STATS: &'static str = maps::PEER_STATS6;
    const SHARED_DEV: bool = true;
    fn key(a: Ipv6Addr) -> [u8; 16] {
        a.octets()
    }
    fn from_key(k: [u8; 16]) -> Ipv6Addr {
        Ipv6Addr::from(k)
    }
    fn dev_key(_a: Ipv6Addr, ifindex: u32) -> u32 {
        maps::endpoint6_dev_key(ifindex)
    }
    fn peer_value(public_ip: [u8; 16], vtep_mac: [u8; 6], flags: u16) -> Peer6 {
        Peer6 {
            public_ip,
            vtep_mac,
            flags,
        }
    }
    fn peer_fields(p: &Peer6) -> ([u8; 16], [u8; 6], u16) {
        (p.public_ip, p.vtep_mac, p.flags)
    }
    fn vtep_fields(v: &Vtep6) -> ([u8; 16], u8) {
        (v.subnet, v.prefix_len)
    }
    fn vtep_value(subnet: [u8; 16], prefix_len: u8) -> Vtep6 {
        Vtep6 {
            subnet,
            prefix_len,
            _pad: [0; 3],
        }
    }
}
