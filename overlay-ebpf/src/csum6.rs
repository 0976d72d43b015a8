//! The IPv6 outer UDP checksum, the one part of encap with no IPv4 twin (IPv4's outer UDP
//! checksum is 0), and resegmenting, which exists for it.
//!
//! The outer UDP checksum is mandatory over IPv6 (RFC 8200; the kernel's VXLAN drops zero
//! checksums unless `udp6zerocsumrx`, which flanneld does not set) and is computed here:
//! - TCP, UDP and ICMPv6 right after the IPv6 header: from the headers alone (local checksum
//!   offload, `wire::lco_inner_sum`): right whether the pod's stack filled its checksum in or
//!   left it to offload (CHECKSUM_PARTIAL, filled in later on the way out);
//! - anything else (fragments, extension headers, other protocols): summed byte by byte.
//!
//! GSO packets: `bpf_skb_adjust_room` marks them `SKB_GSO_UDP_TUNNEL`, never
//! `SKB_GSO_UDP_TUNNEL_CSUM` (net/core/filter.c, `bpf_skb_net_grow`), so segmentation
//! (`__skb_udp_tunnel_segment`: `if (!need_csum) continue;`, and NICs alike) copies the checksum
//! field into every segment unchanged. The checksum written is the one of a full-sized segment
//! (it depends on nothing but the UDP length, the inner headers being identical in every
//! segment): right for every segment of that size. A TCP GSO packet (and a pod's UDP GSO one)
//! whose last segment is shorter is therefore not encapsulated whole ([`short_tail`]): it goes
//! through the host device's veth pair (TSO and UDP segmentation off on `overlay0p`), whose
//! transmit segments it, and its segments come back to encap on `overlay0`'s ingress one by one,
//! each with its own checksum. A super-packet crossing a veth whole arrives CHECKSUM_PARTIAL and
//! is not verified at all; a segment on a wire is.
//!
//! The arithmetic runs in calls of its own: unrolled over byte arrays it needs many registers,
//! and the spills would not fit in the IPv6 encap's frame.

use aya_ebpf::{
    helpers::generated::{bpf_csum_diff, bpf_skb_load_bytes, bpf_skb_store_bytes},
    programs::TcContext,
};
use overlay_common::{
    maps::CONFIG6_RESEG_UDP,
    wire::{
        encap6_header, lco_inner_sum, native_sum_to_be, udp6_checksum, Encap6Params, ENCAP6_HDR_LEN, ETH_LEN,
        IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IPV6_LEN,
    },
    Counter, DataplaneConfig6,
};

use crate::{
    family::{be16, Ipv6Hdr},
    maps::{OVL_SCRATCH, SCRATCH_BYTES},
};

/// [`udp6_checksum`] in a frame of its own.
#[inline(never)]
pub(crate) fn outer_checksum(p: &Encap6Params, udp_len: u32, inner_sum: u32) -> u32 {
    u32::from(udp6_checksum(p, udp_len as u16, inner_sum))
}

/// [`lco_inner_sum`] in a frame of its own.
#[inline(never)]
fn lco_sum(hdr: &[u8; IPV6_LEN]) -> u32 {
    lco_inner_sum(hdr)
}

/// Builds the outer headers and writes them over the first 84 bytes; 0 on success.
#[inline(never)]
pub(crate) fn store_header(skb: *mut aya_ebpf::bindings::__sk_buff, p: &Encap6Params) -> i64 {
    let mut hdr = [0u8; ENCAP6_HDR_LEN];
    encap6_header(p, &mut hdr);
    // SAFETY: hdr holds ENCAP6_HDR_LEN bytes.
    unsafe { bpf_skb_store_bytes(skb, 0, hdr.as_ptr() as *const _, ENCAP6_HDR_LEN as u32, 0) }
}

/// True for a TCP GSO packet (a UDP one too, with `CONFIG6_RESEG_UDP`) whose last segment would
/// be shorter than the others, when the host device can segment it first (see
/// `DataplaneConfig6::reseg_ifindex`): encapsulated whole, that segment would leave with a wrong
/// outer UDP checksum. Never for a packet that came back from the host device, so nothing goes
/// round twice.
#[inline(always)]
pub(crate) fn short_tail(
    ctx: &TcContext,
    cfg6: &DataplaneConfig6,
    ip: &Ipv6Hdr,
    inner_len: u32,
    wire_len: u32,
    gso_size: u32,
) -> bool {
    let udp = ip.next_header == IPPROTO_UDP && cfg6.flags & CONFIG6_RESEG_UDP != 0;
    if cfg6.reseg_ifindex == 0 || !(ip.next_header == IPPROTO_TCP || udp) {
        return false;
    }
    // SAFETY: reading a field of our own context.
    let arrived_on = unsafe { (*ctx.skb.skb).ingress_ifindex };
    if arrived_on == cfg6.reseg_return_ifindex {
        return false;
    }
    let payload = inner_len.saturating_sub(wire_len - gso_size);
    !payload.is_multiple_of(gso_size)
}

/// The big-endian-word sum of the inner IPv6 packet (header and all), for the outer UDP checksum.
#[inline(always)]
pub(crate) fn inner_checksum_sum(
    ctx: &TcContext,
    ip: &Ipv6Hdr,
    inner_len: u32,
    gso: bool,
) -> Result<u32, Counter> {
    let whole = u32::from(be16(ip.payload_len)) + IPV6_LEN as u32 == inner_len;
    let lco = matches!(ip.next_header, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMPV6);
    if gso || (lco && whole) {
        // SAFETY: Ipv6Hdr is 40 plain bytes.
        let hdr: &[u8; IPV6_LEN] = unsafe { &*(ip as *const Ipv6Hdr as *const [u8; IPV6_LEN]) };
        return Ok(lco_sum(hdr));
    }
    let s = byte_sum(ctx.skb.skb, ETH_LEN as u32, inner_len);
    if s < 0 {
        return Err(if s == -2 {
            Counter::DropTooBig
        } else {
            Counter::DropMalformed
        });
    }
    Ok(s as u32)
}

/// Sum of `len` packet bytes from `off`, 512 at a time (`bpf_csum_diff`'s most) through the
/// per-CPU `OVL_SCRATCH` buffer, as a big-endian-word sum; -1 when the bytes cannot be read, -2
/// when there are too many.
///
/// Every length passed to `bpf_skb_load_bytes` is bounded by arithmetic alone (`& (CHUNK - 1)`,
/// then `+ 1`), never by a branch: verifiers before 6.8 do not narrow a range from a `!= 0` test
/// and refuse a length that may be 0 (6.1 refused the whole encap program for it).
#[inline(never)]
fn byte_sum(skb: *mut aya_ebpf::bindings::__sk_buff, off: u32, len: u32) -> i64 {
    const CHUNK: u32 = SCRATCH_BYTES as u32;
    /// Up to a 9216-byte inner packet (jumbo underlays).
    const MAX_CHUNKS: u32 = 18;
    if len == 0 {
        return 0;
    }
    // The last chunk holds 1..=CHUNK bytes; the ones before it are full.
    let full = (len - 1) / CHUNK;
    if full > MAX_CHUNKS {
        return -2;
    }
    let Some(buf) = OVL_SCRATCH.get_ptr_mut(0) else {
        return -1;
    };
    let buf = buf as *mut u32;
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < MAX_CHUNKS && i < full {
        let Some(s) = add_chunk(skb, off + i * CHUNK, buf, CHUNK, sum) else {
            return -1;
        };
        sum = s;
        i += 1;
    }
    let last = ((len - 1) & (CHUNK - 1)) + 1;
    if last < CHUNK {
        // Zeros after the last byte add nothing (and an odd last byte is the high half of its
        // word, as RFC 1071 pads it: chunks start at even offsets).
        // SAFETY: buf is a CHUNK-byte map value.
        unsafe { *(buf as *mut [u32; SCRATCH_BYTES / 4]) = [0; SCRATCH_BYTES / 4] };
    }
    match add_chunk(skb, off + full * CHUNK, buf, last, sum) {
        Some(s) => i64::from(native_sum_to_be(s)),
        None => -1,
    }
}

/// `sum` plus `n` (1..=512) packet bytes from `at`, read into `buf` (the 512-byte scratch
/// value, whose bytes past `n` the caller zeroed); `None` when they cannot be read.
#[inline(always)]
fn add_chunk(
    skb: *mut aya_ebpf::bindings::__sk_buff,
    at: u32,
    buf: *mut u32,
    n: u32,
    sum: u32,
) -> Option<u32> {
    // SAFETY: buf is a SCRATCH_BYTES-byte map value and n is at most that.
    if unsafe { bpf_skb_load_bytes(skb as *const _, at, buf as *mut _, n) } != 0 {
        return None;
    }
    // SAFETY: as above; a zero-length `from`.
    let s = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, buf, SCRATCH_BYTES as u32, sum) };
    (s >= 0).then_some(s as u32)
}
