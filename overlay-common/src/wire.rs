//! VXLAN wire format: the 64 bytes encap puts in front of an inner IPv4 packet
//! (outer Ethernet, IPv4, UDP, VXLAN, inner Ethernet), the 84 bytes in front of an inner IPv6
//! packet (outer Ethernet, IPv6, UDP, VXLAN, inner Ethernet), and the pure arithmetic around them.

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
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPV6_LEN: usize = 40;
/// Bytes inserted between the outer Ethernet header and the inner IPv6 header (IPv6 underlay).
pub const VXLAN6_OVERHEAD: usize = IPV6_LEN + UDP_LEN + VXLAN_LEN + ETH_LEN;
/// Everything in front of the inner IPv6 header after IPv6 encap.
pub const ENCAP6_HDR_LEN: usize = ETH_LEN + VXLAN6_OVERHEAD;
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPv6 Fragment extension header.
pub const IPPROTO_FRAGMENT: u8 = 44;
/// Outer hop limit: the kernel's VXLAN device (ttl 0, the default flannel uses) takes the route's
/// hop limit, `net.ipv6.conf.*.hop_limit`, 64 unless changed.
pub const OUTER_HOP_LIMIT: u8 = 64;
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

/// Everything needed to build the outer headers for one IPv6-in-IPv6 packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Encap6Params {
    pub outer_src_mac: [u8; 6],
    pub outer_dst_mac: [u8; 6],
    pub src_ip: [u8; 16],
    pub dst_ip: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub vni: u32,
    pub inner_src_mac: [u8; 6],
    pub inner_dst_mac: [u8; 6],
    /// Length of the inner IPv6 packet (40 + its payload length).
    pub inner_ip_len: u16,
    /// Traffic class of the inner packet; only its ECN bits are copied out, as the kernel's
    /// VXLAN does with flannel's settings (`tos 0`).
    pub inner_tclass: u8,
    /// The outer UDP checksum (see [`udp6_checksum`]); mandatory over IPv6.
    pub udp_csum: u16,
}

/// Adds two one's-complement partial sums (32-bit, end-around carry), as the kernel's
/// `csum_add` does.
pub const fn csum_add(a: u32, b: u32) -> u32 {
    let (s, carry) = a.overflowing_add(b);
    s.wrapping_add(carry as u32)
}

/// Folds a 32-bit one's-complement partial sum to 16 bits, not complemented.
pub const fn csum_fold16(sum: u32) -> u16 {
    let s = (sum & 0xffff) + (sum >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// One's-complement sum of big-endian 16-bit words (`b.len()` even), unfolded.
pub fn be_word_sum(b: &[u8]) -> u32 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i + 1 < b.len() {
        sum = csum_add(sum, u32::from(u16::from_be_bytes([b[i], b[i + 1]])));
        i += 2;
    }
    if i < b.len() {
        sum = csum_add(sum, u32::from(b[i]) << 8);
    }
    sum
}

/// The sum the kernel's `csum_partial`/`bpf_csum_diff` returns (native-endian words) turned
/// into a big-endian-word sum comparable with [`be_word_sum`].
pub fn native_sum_to_be(sum: u32) -> u32 {
    u32::from(u16::from_be_bytes(csum_fold16(sum).to_ne_bytes()))
}

/// IPv6 pseudo-header sum (RFC 8200 section 8.1) for upper-layer length `len` and `next_header`.
pub fn ipv6_pseudo_sum(src: &[u8; 16], dst: &[u8; 16], len: u32, next_header: u8) -> u32 {
    let mut s = csum_add(be_word_sum(src), be_word_sum(dst));
    s = csum_add(s, len >> 16);
    s = csum_add(s, len & 0xffff);
    csum_add(s, u32::from(next_header))
}

/// What the inner IPv6 packet (header and everything after it) adds to the outer UDP checksum
/// when its upper-layer checksum is, or will be, correct: the local checksum offload identity
/// (the kernel's `lco_csum`). A correct TCP/UDP/ICMPv6 checksum makes the upper-layer bytes sum to
/// the complement of their pseudo-header, so the whole inner packet sums to its 40-byte header
/// minus that pseudo-header; the payload is never read. Holds for an inner checksum the stack will
/// still fill in (CHECKSUM_PARTIAL) as for one already there, and for each TCP segment GSO cuts.
/// Only for an upper-layer header straight after the IPv6 header (`next_header` at byte 6).
pub fn lco_inner_sum(inner: &[u8; IPV6_LEN]) -> u32 {
    let payload_len = u32::from(u16::from_be_bytes([inner[4], inner[5]]));
    // The pseudo-header: the addresses (bytes 8..40 of the header), the length, the protocol.
    let mut pseudo = be_word_sum(&inner[8..40]);
    pseudo = csum_add(pseudo, payload_len);
    pseudo = csum_add(pseudo, u32::from(inner[6]));
    csum_add(be_word_sum(inner), u32::from(!csum_fold16(pseudo)))
}

/// The outer UDP checksum of a VXLAN-over-IPv6 datagram of `udp_len` bytes: pseudo-header,
/// UDP header (checksum field zero), VXLAN header and inner Ethernet header, all from `p`, plus
/// `inner_sum`, the big-endian-word sum of the inner IPv6 packet ([`lco_inner_sum`], or summed
/// byte by byte). Zero is sent as 0xffff (RFC 8200: a zero checksum means none).
/// (Summed from the fields, without building the headers: the BPF stack is small.)
pub fn udp6_checksum(p: &Encap6Params, udp_len: u16, inner_sum: u32) -> u16 {
    let len = u32::from(udp_len);
    let mut s = ipv6_pseudo_sum(&p.src_ip, &p.dst_ip, len, IPPROTO_UDP);
    s = csum_add(s, u32::from(p.src_port));
    s = csum_add(s, u32::from(p.dst_port));
    s = csum_add(s, len);
    s = csum_add(s, be_word_sum(&vxlan_header(p.vni)));
    s = csum_add(s, be_word_sum(&p.inner_dst_mac));
    s = csum_add(s, be_word_sum(&p.inner_src_mac));
    s = csum_add(s, u32::from(ETH_P_IPV6));
    s = csum_add(s, inner_sum);
    match !csum_fold16(s) {
        0 => 0xffff,
        c => c,
    }
}

/// Writes the 84 bytes that go in front of the inner IPv6 packet into `h` (in place: the BPF
/// stack is small).
pub fn encap6_header(p: &Encap6Params, h: &mut [u8; ENCAP6_HDR_LEN]) {
    h[0..6].copy_from_slice(&p.outer_dst_mac);
    h[6..12].copy_from_slice(&p.outer_src_mac);
    h[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    // Outer IPv6: version 6, traffic class = inner ECN, flow label 0 (as the kernel's VXLAN
    // without `flowlabel`).
    let tclass = p.inner_tclass & 0x03;
    h[14] = 0x60 | (tclass >> 4);
    h[15] = tclass << 4;
    let payload = (p.inner_ip_len as usize + UDP_LEN + VXLAN_LEN + ETH_LEN) as u16;
    h[18..20].copy_from_slice(&payload.to_be_bytes());
    h[20] = IPPROTO_UDP;
    h[21] = OUTER_HOP_LIMIT;
    h[22..38].copy_from_slice(&p.src_ip);
    h[38..54].copy_from_slice(&p.dst_ip);
    let u = ETH_LEN + IPV6_LEN;
    h[u..u + 2].copy_from_slice(&p.src_port.to_be_bytes());
    h[u + 2..u + 4].copy_from_slice(&p.dst_port.to_be_bytes());
    h[u + 4..u + 6].copy_from_slice(&payload.to_be_bytes());
    h[u + 6..u + 8].copy_from_slice(&p.udp_csum.to_be_bytes());
    let v = u + UDP_LEN;
    h[v..v + VXLAN_LEN].copy_from_slice(&vxlan_header(p.vni));
    let e = v + VXLAN_LEN;
    h[e..e + 6].copy_from_slice(&p.inner_dst_mac);
    h[e + 6..e + 12].copy_from_slice(&p.inner_src_mac);
    h[e + 12..e + 14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
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
    extern crate std;
    use super::*;
    use std::{vec, vec::Vec};

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

    /// RFC 1071 over a whole buffer the slow way, for the checks below.
    fn naive_sum(b: &[u8]) -> u32 {
        let mut sum: u64 = 0;
        for w in b.chunks(2) {
            sum += u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u32
    }

    fn inner6(next_header: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        p.extend_from_slice(&[next_header, 64]);
        p.extend_from_slice(&[0xfd, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        p.extend_from_slice(&[0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5]);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn lco_equals_the_full_sum_for_a_correct_inner_checksum() {
        // A UDP datagram with its checksum filled in the slow way.
        for n in [0usize, 1, 7, 100, 1401] {
            let body: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
            let mut udp = vec![0x13, 0x88, 0x17, 0x70];
            udp.extend_from_slice(&((8 + n) as u16).to_be_bytes());
            udp.extend_from_slice(&[0, 0]);
            udp.extend_from_slice(&body);
            let mut ip = inner6(IPPROTO_UDP, &udp);
            let src: [u8; 16] = ip[8..24].try_into().unwrap();
            let dst: [u8; 16] = ip[24..40].try_into().unwrap();
            let pseudo = naive_sum(
                &[
                    &src[..],
                    &dst[..],
                    &[0, 0],
                    &((8 + n) as u16).to_be_bytes(),
                    &[0, 0, 0, 17],
                ]
                .concat(),
            );
            let c = !(csum_fold16(csum_add(pseudo, naive_sum(&udp))));
            ip[46..48].copy_from_slice(&c.to_be_bytes());
            let hdr: [u8; 40] = ip[..40].try_into().unwrap();
            assert_eq!(
                csum_fold16(lco_inner_sum(&hdr)),
                csum_fold16(naive_sum(&ip)),
                "{n}-byte payload"
            );
            // And the outer checksum built on it verifies over the whole datagram.
            let mut p = Encap6Params {
                src_ip: [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                dst_ip: [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                src_port: 33333,
                dst_port: 8472,
                vni: 1,
                inner_src_mac: [0x0e, 0, 0, 0, 0, 1],
                inner_dst_mac: [0x0e, 0, 0, 0, 0, 2],
                inner_ip_len: ip.len() as u16,
                ..Default::default()
            };
            let (osrc, odst) = (p.src_ip, p.dst_ip);
            let ulen = (30 + ip.len()) as u16;
            p.udp_csum = udp6_checksum(&p, ulen, lco_inner_sum(&hdr));
            let mut h = [0u8; ENCAP6_HDR_LEN];
            encap6_header(&p, &mut h);
            let mut dgram = h[54..].to_vec();
            dgram.extend_from_slice(&ip);
            let opseudo =
                naive_sum(&[&osrc[..], &odst[..], &[0, 0], &ulen.to_be_bytes(), &[0, 0, 0, 17]].concat());
            assert_eq!(
                csum_fold16(csum_add(opseudo, naive_sum(&dgram))),
                0xffff,
                "outer checksum must verify"
            );
        }
    }

    #[test]
    fn native_sums_convert() {
        let b = [0x12u8, 0x34, 0xab, 0xcd, 0xff, 0x01];
        let mut native: u32 = 0;
        for w in b.chunks(2) {
            native = csum_add(native, u32::from(u16::from_ne_bytes([w[0], w[1]])));
        }
        assert_eq!(native_sum_to_be(native), u32::from(csum_fold16(be_word_sum(&b))));
    }

    #[test]
    fn encap6_header_fields() {
        let p = Encap6Params {
            outer_src_mac: [2, 0, 0, 0, 0, 1],
            outer_dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip: [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            dst_ip: [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            src_port: 40000,
            dst_port: 8472,
            vni: 1,
            inner_src_mac: [0x0e, 0, 0, 0, 0, 1],
            inner_dst_mac: [0x0e, 0, 0, 0, 0, 2],
            inner_ip_len: 104,
            inner_tclass: 0xb9,
            udp_csum: 0x1234,
        };
        let mut h = [0u8; ENCAP6_HDR_LEN];
        encap6_header(&p, &mut h);
        assert_eq!(&h[12..14], &[0x86, 0xdd]);
        assert_eq!(
            &h[14..18],
            &[0x60, 0x10, 0, 0],
            "ECN 01 in the traffic class, no DSCP, no flow label"
        );
        assert_eq!(u16::from_be_bytes([h[18], h[19]]), 104 + 30);
        assert_eq!((h[20], h[21]), (17, 64));
        assert_eq!(&h[54..58], &[0x9c, 0x40, 0x21, 0x18]);
        assert_eq!(u16::from_be_bytes([h[58], h[59]]), 104 + 30);
        assert_eq!(&h[60..62], &[0x12, 0x34]);
        assert_eq!(&h[62..70], &vxlan_header(1));
        assert_eq!(&h[82..84], &[0x86, 0xdd]);
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
