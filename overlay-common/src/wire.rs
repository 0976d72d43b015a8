//! VXLAN wire format: the 64 bytes encap puts in front of an inner IPv4 packet
//! (outer Ethernet, IPv4, UDP, VXLAN, inner Ethernet), and the pure arithmetic around it.

pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
pub const UDP_LEN: usize = 8;
pub const VXLAN_LEN: usize = 8;
/// Bytes inserted between the outer Ethernet header and the inner IPv4 header.
pub const VXLAN_OVERHEAD: usize = IPV4_LEN + UDP_LEN + VXLAN_LEN + ETH_LEN;
/// Everything in front of the inner IPv4 header after encap.
pub const ENCAP_HDR_LEN: usize = ETH_LEN + VXLAN_OVERHEAD;
/// Offset of the inner IPv4 header in a VXLAN frame as it arrives on the underlay.
pub const INNER_IP_OFFSET: usize = ENCAP_HDR_LEN;

pub const ETH_P_IP: u16 = 0x0800;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// IPv4 flags/fragment-offset field: Don't Fragment.
pub const IP_DF: u16 = 0x4000;
/// IPv4 flags/fragment-offset field: More Fragments + offset (any non-zero value is a fragment).
pub const IP_FRAG_MASK: u16 = 0x3fff;
/// Outer TTL, as the kernel's VXLAN device uses with its default (inherit none) settings.
pub const OUTER_TTL: u8 = 64;
/// VXLAN flags byte: the I bit (VNI valid).
pub const VXLAN_FLAG_I: u8 = 0x08;

/// Everything needed to build the outer headers for one packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncapParams {
    pub outer_src_mac: [u8; 6],
    pub outer_dst_mac: [u8; 6],
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub vni: u32,
    pub inner_src_mac: [u8; 6],
    pub inner_dst_mac: [u8; 6],
    /// Length of the inner IPv4 packet (its total length).
    pub inner_ip_len: u16,
    /// TOS of the inner packet; only its ECN bits are copied out, as the kernel's VXLAN does.
    pub inner_tos: u8,
}

/// Internet checksum of an IPv4 header whose checksum field is zero.
pub fn ipv4_checksum(hdr: &[u8; IPV4_LEN]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < IPV4_LEN {
        sum += u32::from(u16::from_be_bytes([hdr[i], hdr[i + 1]]));
        i += 2;
    }
    fold_checksum(sum)
}

/// Folds a 32-bit one's-complement sum into the final 16-bit checksum.
pub const fn fold_checksum(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The 8-byte VXLAN header for `vni` (RFC 7348: flags with the I bit, 24-bit VNI).
pub const fn vxlan_header(vni: u32) -> [u8; VXLAN_LEN] {
    let v = vni.to_be_bytes();
    [VXLAN_FLAG_I, 0, 0, 0, v[1], v[2], v[3], 0]
}

/// The VNI of a VXLAN header, or `None` when the I flag is missing.
pub const fn vxlan_vni(hdr: &[u8; VXLAN_LEN]) -> Option<u32> {
    if hdr[0] & VXLAN_FLAG_I == 0 {
        return None;
    }
    Some(u32::from_be_bytes([0, hdr[4], hdr[5], hdr[6]]))
}

/// UDP source port from a flow hash, spread over the kernel's default range (32768..=60999)
/// the way the kernel's `udp_flow_src_port` does it, so one flow always takes one path.
pub const fn flow_source_port(hash: u32) -> u16 {
    const MIN: u32 = 32768;
    const MAX: u32 = 61000;
    let hash = if hash == 0 { 0x9e37_79b9 } else { hash };
    ((((hash as u64) * ((MAX - MIN) as u64)) >> 32) as u32 + MIN) as u16
}

/// Builds the 64 bytes that go in front of the inner IPv4 packet.
pub fn encap_header(p: &EncapParams) -> [u8; ENCAP_HDR_LEN] {
    let mut h = [0u8; ENCAP_HDR_LEN];
    // Outer Ethernet.
    h[0..6].copy_from_slice(&p.outer_dst_mac);
    h[6..12].copy_from_slice(&p.outer_src_mac);
    h[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    // Outer IPv4.
    let ip_total = (p.inner_ip_len as usize + VXLAN_OVERHEAD) as u16;
    let mut ip = [0u8; IPV4_LEN];
    ip[0] = 0x45;
    ip[1] = p.inner_tos & 0x03;
    ip[2..4].copy_from_slice(&ip_total.to_be_bytes());
    ip[6..8].copy_from_slice(&IP_DF.to_be_bytes());
    ip[8] = OUTER_TTL;
    ip[9] = IPPROTO_UDP;
    ip[12..16].copy_from_slice(&p.src_ip);
    ip[16..20].copy_from_slice(&p.dst_ip);
    let csum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    h[ETH_LEN..ETH_LEN + IPV4_LEN].copy_from_slice(&ip);
    // UDP, checksum 0 as flannel's kernel VXLAN sends over IPv4.
    let u = ETH_LEN + IPV4_LEN;
    let udp_len = ip_total - IPV4_LEN as u16;
    h[u..u + 2].copy_from_slice(&p.src_port.to_be_bytes());
    h[u + 2..u + 4].copy_from_slice(&p.dst_port.to_be_bytes());
    h[u + 4..u + 6].copy_from_slice(&udp_len.to_be_bytes());
    // VXLAN.
    let v = u + UDP_LEN;
    h[v..v + VXLAN_LEN].copy_from_slice(&vxlan_header(p.vni));
    // Inner Ethernet.
    let e = v + VXLAN_LEN;
    h[e..e + 6].copy_from_slice(&p.inner_dst_mac);
    h[e + 6..e + 12].copy_from_slice(&p.inner_src_mac);
    h[e + 12..e + 14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_known_header() {
        // Example from RFC 1071 style worked examples: a real captured header.
        let mut hdr: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01,
            0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_checksum(&hdr), 0xb861);
        hdr[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        // A header with its checksum in place sums to zero.
        let mut sum = 0u32;
        for w in hdr.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        assert_eq!(fold_checksum(sum), 0);
    }

    #[test]
    fn vni_round_trip_and_flag() {
        for vni in [0u32, 1, 42, 0x00ff_ffff] {
            assert_eq!(vxlan_vni(&vxlan_header(vni)), Some(vni));
        }
        assert_eq!(vxlan_header(1), [0x08, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(vxlan_vni(&[0, 0, 0, 0, 0, 0, 1, 0]), None);
    }

    #[test]
    fn source_port_stays_in_range_and_spreads() {
        let mut seen_low = false;
        let mut seen_high = false;
        for i in 0..10_000u32 {
            let p = flow_source_port(i.wrapping_mul(0x9e37_79b9));
            assert!((32768..61000).contains(&p), "port {p} out of range");
            seen_low |= p < 40000;
            seen_high |= p > 55000;
        }
        assert!(seen_low && seen_high, "ports do not spread over the range");
        assert_eq!(flow_source_port(7), flow_source_port(7));
    }

    #[test]
    fn encap_header_fields() {
        let p = EncapParams {
            outer_src_mac: [2, 0, 0, 0, 0, 1],
            outer_dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip: [198, 18, 0, 11],
            dst_ip: [198, 18, 0, 12],
            src_port: 40000,
            dst_port: 8472,
            vni: 1,
            inner_src_mac: [0x0e, 0, 0, 0, 0, 1],
            inner_dst_mac: [0x0e, 0, 0, 0, 0, 2],
            inner_ip_len: 84,
            inner_tos: 0xff,
        };
        let h = encap_header(&p);
        assert_eq!(&h[0..6], &p.outer_dst_mac);
        assert_eq!(&h[12..14], &[0x08, 0x00]);
        let ip: [u8; 20] = h[14..34].try_into().unwrap();
        assert_eq!(ip[0], 0x45);
        assert_eq!(ip[1], 0x03, "only ECN bits are inherited");
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 84 + 50);
        assert_eq!(ip[9], IPPROTO_UDP);
        let mut zeroed = ip;
        zeroed[10] = 0;
        zeroed[11] = 0;
        assert_eq!(u16::from_be_bytes([ip[10], ip[11]]), ipv4_checksum(&zeroed));
        assert_eq!(&h[34..36], &40000u16.to_be_bytes());
        assert_eq!(&h[36..38], &8472u16.to_be_bytes());
        assert_eq!(u16::from_be_bytes([h[38], h[39]]), 84 + 30);
        assert_eq!(&h[40..42], &[0, 0], "UDP checksum must be 0");
        assert_eq!(&h[42..50], &vxlan_header(1));
        assert_eq!(&h[50..56], &p.inner_dst_mac);
        assert_eq!(&h[56..62], &p.inner_src_mac);
        assert_eq!(&h[62..64], &[0x08, 0x00]);
    }
}
