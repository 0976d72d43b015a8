//! Hand-built frames for BPF_PROG_TEST_RUN and attacker tests.

use std::net::Ipv4Addr;

use overlay_common::wire::{self, EncapParams, ETH_P_IP, IPPROTO_UDP};

/// An IPv4 packet (no options) with a correct header checksum around `payload`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let c = wire::ipv4_checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    let mut p = h.to_vec();
    p.extend_from_slice(payload);
    p
}

/// A UDP datagram (checksum 0) inside IPv4.
pub fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    ipv4(src, dst, IPPROTO_UDP, &u)
}

/// An Ethernet frame.
pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A gratuitous ARP (a request for its own address, broadcast) from `mac`/`ip`: how a new
/// interface tells its segment which MAC the address now has.
pub fn garp(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut arp = Vec::with_capacity(28);
    arp.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet, IPv4, request
    arp.extend_from_slice(&mac);
    arp.extend_from_slice(&ip.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&ip.octets());
    eth([0xff; 6], mac, 0x0806, &arp)
}

/// A full VXLAN frame as a peer sends it: outer headers from the shared builder, then `inner_ip`.
pub fn vxlan(p: &EncapParams, inner_ip: &[u8]) -> Vec<u8> {
    let mut params = *p;
    params.inner_ip_len = inner_ip.len() as u16;
    let mut f = wire::encap_header(&params).to_vec();
    f.extend_from_slice(inner_ip);
    f
}

/// An IPv4 Ethernet frame around `ip`.
pub fn eth_ip(dst: [u8; 6], src: [u8; 6], ip: &[u8]) -> Vec<u8> {
    eth(dst, src, ETH_P_IP, ip)
}

/// Sends `frame` as-is out of `dev` in `ns` (an AF_PACKET raw socket): for crafted traffic from a
/// namespace playing an attacker on the underlay.
pub fn send_raw(ns: &crate::netns::Netns, dev: &str, frame: &[u8]) -> anyhow::Result<()> {
    RawSender::open(ns, dev)?.send(frame)
}

/// An AF_PACKET raw socket on `dev` in a namespace, for sending many crafted frames.
pub struct RawSender {
    fd: std::os::fd::OwnedFd,
    ifindex: u32,
}

impl RawSender {
    pub fn open(ns: &crate::netns::Netns, dev: &str) -> anyhow::Result<RawSender> {
        use std::os::fd::{FromRawFd as _, OwnedFd};
        let _inside = ns.enter()?;
        let ifindex = nix::net::if_::if_nametoindex(dev)?;
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        anyhow::ensure!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(RawSender { fd, ifindex })
    }

    /// Sends `frame` as-is (it starts with its Ethernet header).
    pub fn send(&self, frame: &[u8]) -> anyhow::Result<()> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: sockaddr_ll is plain data.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: frame and addr are valid for the lengths given.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        anyhow::ensure!(
            rc == frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }
}
