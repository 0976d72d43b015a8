//! IPv6 pods over the IPv6 underlay, as flanneld's `flannel-v6.1` carries them: encap of IPv6
//! pod packets to `OVL_PEERS6` subnets (outer IPv6 from our PublicIPv6 to the peer's), decap of
//! IPv6 VXLAN from `OVL_VTEPS6` senders, and delivery of decapsulated packets straight to the
//! local pods in `OVL_ENDPOINTS6`. The verdict plumbing (`finish`, `redirect`, `strip_outer`,
//! XDP's mark, `to_endpoint`) is shared with the IPv4 half in `main.rs`.
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
//! whose last segment is shorter is therefore not encapsulated whole: it goes through the host
//! device's veth pair (TSO and UDP segmentation off on `overlay0p`), whose transmit segments it,
//! and its segments come back to encap on `overlay0`'s ingress one by one, each with its own checksum. A super-packet crossing a veth
//! whole arrives CHECKSUM_PARTIAL and is not verified at all; a segment on a wire is.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LOOKUP_OUTPUT, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6,
    },
    btf_maps::lpm_trie::Key,
    helpers::generated::{
        bpf_csum_diff, bpf_fib_lookup, bpf_get_hash_recalc, bpf_redirect, bpf_skb_load_bytes,
        bpf_skb_store_bytes, bpf_xdp_adjust_head,
    },
    programs::{TcContext, XdpContext},
};
use overlay_common::{
    maps::{endpoint6_dev_key, StackFlow6, CONFIG6_READY, CONFIG6_RESEG_UDP, CONFIG_NO_DELIVER, PEER_DIRECT},
    wire::{
        encap6_header, flow_source_port, lco_inner_sum, native_sum_to_be, udp6_checksum, vxlan_vni,
        Encap6Params, ENCAP6_HDR_LEN, ETH_LEN, ETH_P_IPV6, IPPROTO_FRAGMENT, IPPROTO_ICMPV6, IPPROTO_TCP,
        IPPROTO_UDP, IPV6_LEN, UDP_LEN, VXLAN6_OVERHEAD, VXLAN_LEN,
    },
    Counter, DataplaneConfig, DataplaneConfig6,
};

use crate::{
    at_ingress, config, count, fib_usable, finish, grow_for_vxlan, load_ports, mark_decapped, redirect,
    strip_outer, to_endpoint, to_stack_from_bridge, Verdict, AF_INET6, OVL_CONFIG6, OVL_ENDPOINTS6,
    OVL_ENDPOINT_DEVS6, OVL_PEERS6, OVL_SCRATCH, OVL_STACK_FLOWS6, OVL_VTEPS6, SCRATCH_BYTES, TC_ACT_OK,
    TC_ACT_SHOT,
};

// The IPv6 halves are BPF-to-BPF calls of their own rather than inlined into the entry points:
// each gets its own stack frame, so the IPv4 and IPv6 locals never add up past the 512-byte
// limit. They count their own verdicts and return the action as a plain integer.

/// Encap of an IPv6 frame; the action for the TC entry point.
#[inline(never)]
pub(crate) fn encap6(skb: *mut aya_ebpf::bindings::__sk_buff) -> u32 {
    finish(try_encap6(&TcContext::new(skb)), TC_ACT_SHOT)
}

/// XDP decap of an IPv6 frame; the action for the XDP entry point.
#[inline(never)]
pub(crate) fn decap6_xdp(xdp: *mut aya_ebpf::bindings::xdp_md) -> u32 {
    let ctx = XdpContext::new(xdp);
    let r = match config() {
        Ok(cfg) => try_decap6_xdp(&ctx, cfg),
        Err(_) => Ok(Verdict::pass(xdp_action::XDP_PASS, Counter::PassDecap)),
    };
    finish(r, xdp_action::XDP_DROP)
}

/// TC decap of an IPv6 frame; the action for the TC entry point.
#[inline(never)]
pub(crate) fn decap6_tc(skb: *mut aya_ebpf::bindings::__sk_buff) -> u32 {
    let ctx = TcContext::new(skb);
    let r = match config() {
        Ok(cfg) => try_decap6_tc(&ctx, cfg),
        Err(_) => Ok(Verdict::pass(TC_ACT_OK, Counter::PassDecap)),
    };
    finish(r, TC_ACT_SHOT)
}

/// A frame XDP decap stripped (and GRO may have merged) whose inner packet is IPv6: delivered
/// straight to a local pod when it is one, else left to the stack; the action for the TC entry
/// point.
#[inline(never)]
pub(crate) fn deliver6_decapped(skb: *mut aya_ebpf::bindings::__sk_buff) -> u32 {
    let ctx = TcContext::new(skb);
    let r = match config() {
        Ok(cfg) => {
            deliver6(&ctx, cfg).map(|v| v.unwrap_or(Verdict::pass(TC_ACT_OK, Counter::XdpDecapToStack)))
        }
        Err(_) => Ok(Verdict::pass(TC_ACT_OK, Counter::PassDecap)),
    };
    finish(r, TC_ACT_SHOT)
}

/// The IPv6 config, when the agent has written it (an IPv4-only node never does).
#[inline(always)]
fn config6() -> Option<&'static DataplaneConfig6> {
    match OVL_CONFIG6.get(0) {
        Some(c) if c.flags & CONFIG6_READY != 0 => Some(c),
        _ => None,
    }
}

/// 16-byte equality without a `bcmp` call (which the BPF target cannot link).
#[inline(always)]
fn eq16(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let mut diff = 0u8;
    let mut i = 0;
    while i < 16 {
        diff |= a[i] ^ b[i];
        i += 1;
    }
    diff == 0
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

// ---------------------------------------------------------------------------------------------
// Encap
// ---------------------------------------------------------------------------------------------

/// The inner IPv6 header.
#[repr(C)]
#[derive(Clone, Copy)]
struct InnerIp6 {
    vtc_flow: [u8; 4],
    payload_len: [u8; 2],
    next_header: u8,
    hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<InnerIp6>() == IPV6_LEN);

/// Encap of an IPv6 frame seen on the pod bridge (or `overlay0`).
#[inline(always)]
fn try_encap6(ctx: &TcContext) -> Result<Verdict, Counter> {
    let ip: InnerIp6 = ctx.load(ETH_LEN).map_err(|_| Counter::DropMalformed)?;
    let key = Key::new(128, ip.dst);
    let Some(peer) = OVL_PEERS6.get(&key) else {
        return Ok(Verdict::pass(TC_ACT_OK, Counter::PassEncap));
    };
    let cfg = config()?;
    let cfg6 = config6().ok_or(Counter::DropNoConfig)?;
    // Segments coming back from being resegmented (on `overlay0`'s ingress) were the stack's
    // already: they are sent, never handed to it again.
    // SAFETY: reading a field of our own context.
    let returned = unsafe { (*ctx.skb.skb).ingress_ifindex } == cfg6.reseg_return_ifindex;
    if !returned {
        if let Some(pass) = to_stack_from_bridge(ctx, cfg) {
            return Ok(Verdict::pass(TC_ACT_OK, pass));
        }
    }
    if !at_ingress(ctx) {
        record_stack_flow6(ctx, &ip);
    }
    let direct = peer.flags & PEER_DIRECT != 0;
    let inner_len = ctx.len() - ETH_LEN as u32;
    // SAFETY: reading a field of our own context.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    let wire_len = if gso_size == 0 {
        inner_len
    } else {
        segment_len(ctx, &ip, gso_size)?
    };
    if !direct && wire_len > cfg6.inner_mtu {
        // Too big for the tunnel: the stack routes it via the host device, whose route carries
        // the tunnel MTU, and answers with ICMPv6 Packet Too Big (IPv6 routers never fragment).
        return Ok(Verdict::pass(TC_ACT_OK, Counter::PassTooBig));
    }
    if !direct && gso_size != 0 && short_tail(ctx, cfg6, &ip, inner_len, wire_len, gso_size) {
        // SAFETY: plain helper call.
        let action = unsafe { bpf_redirect(cfg6.reseg_ifindex, 0) } as u32;
        return Ok(Verdict::pass(action, Counter::Encap6Resegmented));
    }
    // What the inner packet adds to the outer UDP checksum, before anything else takes stack.
    let inner_sum = if direct {
        0
    } else {
        inner_checksum_sum(ctx, &ip, inner_len, gso_size != 0)?
    };

    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET6;
    fib.ifindex = cfg.underlay_ifindex;
    // Writing union members is safe; these are the IPv6 lookup's.
    fib.__bindgen_anon_3.ipv6_src = words(&cfg6.public_ip);
    fib.__bindgen_anon_4.ipv6_dst = words(&peer.public_ip);
    // SAFETY: fib points to a properly sized bpf_fib_lookup on our stack.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    } as u32;
    let rc = fib_usable(rc)?;
    let out_ifindex = fib.ifindex;
    if direct {
        return redirect(
            ctx,
            rc,
            &fib,
            out_ifindex,
            Counter::Direct6Packets,
            Counter::Direct6Bytes,
        );
    }

    // SAFETY: the skb pointer is the program's context.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    grow_for_vxlan(ctx, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, VXLAN6_OVERHEAD)?;

    let mut p = Encap6Params {
        outer_src_mac: fib.smac,
        outer_dst_mac: fib.dmac,
        src_ip: cfg6.public_ip,
        dst_ip: peer.public_ip,
        src_port: flow_source_port(hash),
        dst_port: cfg.port,
        vni: cfg.vni,
        inner_src_mac: cfg6.vtep_mac,
        inner_dst_mac: peer.vtep_mac,
        inner_ip_len: inner_len as u16,
        inner_tclass: (ip.vtc_flow[0] << 4) | (ip.vtc_flow[1] >> 4),
        udp_csum: 0,
    };
    // For a GSO packet the checksum of one full-sized segment (see the module comment).
    let csum_udp_len = (wire_len + (UDP_LEN + VXLAN_LEN + ETH_LEN) as u32) as u16;
    p.udp_csum = outer_checksum(&p, u32::from(csum_udp_len), inner_sum) as u16;
    if store_header(ctx.skb.skb, &p) != 0 {
        return Err(Counter::DropMalformed);
    }
    redirect(
        ctx,
        rc,
        &fib,
        out_ifindex,
        Counter::Encap6Packets,
        Counter::Encap6Bytes,
    )
}

/// The reply's key of an IPv6 flow: the ports right after the IPv6 header for TCP/UDP/SCTP,
/// zeros for anything else (extension headers included, on both sides alike).
#[inline(always)]
fn flow6(ctx: &TcContext, ip: &InnerIp6, reply: bool) -> StackFlow6 {
    let [sport, dport] = load_ports(ctx, ip.next_header, ETH_LEN + IPV6_LEN);
    let (remote, local, remote_port, local_port) = if reply {
        (ip.src, ip.dst, sport, dport)
    } else {
        (ip.dst, ip.src, dport, sport)
    };
    StackFlow6 {
        remote,
        local,
        remote_port,
        local_port,
        proto: ip.next_header,
        _pad0: 0,
        _pad1: 0,
    }
}

/// `crate::record_stack_flow` for IPv6 (fragments are not recorded: they always take the
/// stack on the way back).
#[inline(never)]
fn record_stack_flow6(ctx: &TcContext, ip: &InnerIp6) {
    if ip.next_header == IPPROTO_FRAGMENT {
        return;
    }
    let key = flow6(ctx, ip, false);
    if OVL_STACK_FLOWS6.get_ptr(&key).is_none() {
        // SAFETY: plain helper call.
        let now = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_ns() };
        if OVL_STACK_FLOWS6.insert(&key, &now, 0).is_ok() {
            count(Counter::StackFlows, 1);
        }
    }
}

/// `crate::stack_reason` for IPv6: fragments, ICMPv6 errors (types 1–4) and replies of
/// recorded stack flows take the stack.
#[inline(always)]
fn stack_reason6(ctx: &TcContext, ip: &InnerIp6) -> Result<Option<Counter>, Counter> {
    match ip.next_header {
        IPPROTO_FRAGMENT => return Ok(Some(Counter::PassFragment)),
        IPPROTO_ICMPV6 => {
            let ty: u8 = ctx.load(ETH_LEN + IPV6_LEN).map_err(|_| Counter::DropMalformed)?;
            if (1..=4).contains(&ty) {
                return Ok(Some(Counter::PassIcmpError));
            }
        }
        _ => {}
    }
    let key = flow6(ctx, ip, true);
    Ok(OVL_STACK_FLOWS6.get_ptr(&key).map(|_| Counter::PassConntrack))
}

// The arithmetic below runs in calls of its own: unrolled over byte arrays it needs many
// registers, and the spills would not fit in encap6's frame.

/// [`udp6_checksum`] in a frame of its own.
#[inline(never)]
fn outer_checksum(p: &Encap6Params, udp_len: u32, inner_sum: u32) -> u32 {
    u32::from(udp6_checksum(p, udp_len as u16, inner_sum))
}

/// [`lco_inner_sum`] in a frame of its own.
#[inline(never)]
fn lco_sum(hdr: &[u8; IPV6_LEN]) -> u32 {
    lco_inner_sum(hdr)
}

/// Builds the outer headers and writes them over the first 84 bytes; 0 on success.
#[inline(never)]
fn store_header(skb: *mut aya_ebpf::bindings::__sk_buff, p: &Encap6Params) -> i64 {
    let mut hdr = [0u8; ENCAP6_HDR_LEN];
    encap6_header(p, &mut hdr);
    // SAFETY: hdr holds ENCAP6_HDR_LEN bytes.
    unsafe { bpf_skb_store_bytes(skb, 0, hdr.as_ptr() as *const _, ENCAP6_HDR_LEN as u32, 0) }
}

/// An IPv6 address as the FIB lookup's `__u32[4]` (network byte order kept).
#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// True for a TCP GSO packet (a UDP one too, with `CONFIG6_RESEG_UDP`) whose last segment would
/// be shorter than the others, when the host device can segment it first (see
/// `DataplaneConfig6::reseg_ifindex`): encapsulated whole, that segment would leave with a wrong
/// outer UDP checksum. Never for a packet that came back from the host device, so nothing goes
/// round twice.
#[inline(always)]
fn short_tail(
    ctx: &TcContext,
    cfg6: &DataplaneConfig6,
    ip: &InnerIp6,
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

/// Length of one inner IPv6 packet of a GSO packet on the wire: gso_size plus the IPv6 header
/// and the TCP (with options) or UDP header.
#[inline(always)]
fn segment_len(ctx: &TcContext, ip: &InnerIp6, gso_size: u32) -> Result<u32, Counter> {
    let l4 = match ip.next_header {
        IPPROTO_TCP => {
            let doff: u8 = ctx
                .load(ETH_LEN + IPV6_LEN + 12)
                .map_err(|_| Counter::DropMalformed)?;
            u32::from(doff >> 4) * 4
        }
        IPPROTO_UDP => UDP_LEN as u32,
        _ => 0,
    };
    Ok(gso_size + IPV6_LEN as u32 + l4)
}

/// The big-endian-word sum of the inner IPv6 packet (header and all), for the outer UDP checksum.
#[inline(always)]
fn inner_checksum_sum(ctx: &TcContext, ip: &InnerIp6, inner_len: u32, gso: bool) -> Result<u32, Counter> {
    let whole = u32::from(be16(ip.payload_len)) + IPV6_LEN as u32 == inner_len;
    let lco = matches!(ip.next_header, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMPV6);
    if gso || (lco && whole) {
        // SAFETY: InnerIp6 is 40 plain bytes.
        let hdr: &[u8; IPV6_LEN] = unsafe { &*(ip as *const InnerIp6 as *const [u8; IPV6_LEN]) };
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

// ---------------------------------------------------------------------------------------------
// Decap
// ---------------------------------------------------------------------------------------------

/// Outer IPv6 + UDP + VXLAN + inner Ethernet + the inner IPv6 fields decap checks.
#[repr(C)]
struct Vxlan6Frame {
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    eth_proto: [u8; 2],
    vtc_flow: [u8; 4],
    payload_len: [u8; 2],
    next_header: u8,
    hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
    /// UDP header; in a fragment, the Fragment header (next header, reserved, offset/flags, id).
    udp_sport: [u8; 2],
    udp_dport: [u8; 2],
    udp_len: [u8; 2],
    udp_csum: [u8; 2],
    /// VXLAN; in a fragment, the UDP header of a first fragment.
    vxlan: [u8; VXLAN_LEN],
    inner_dst: [u8; 6],
    inner_src_mac: [u8; 6],
    inner_proto: [u8; 2],
    inner_vtc: [u8; 4],
    _inner_mid: [u8; 4],
    inner_src: [u8; 16],
}
const FRAME6_LEN: usize = core::mem::size_of::<Vxlan6Frame>();
const _: () = assert!(FRAME6_LEN == ENCAP6_HDR_LEN + 24);
/// Outer Ethernet + IPv6: what a frame needs for a first look.
const OUTER6_L3_END: usize = ETH_LEN + IPV6_LEN;

enum Classified6 {
    Pass,
    Decap,
}

/// The IPv6 decap rules, shared by XDP and TC. `have` bytes of `f` are valid: the whole struct,
/// or just the outer Ethernet and IPv6 headers of a shorter frame.
#[inline(always)]
fn classify6(
    f: &Vxlan6Frame,
    have: usize,
    frame_len: usize,
    cfg: &DataplaneConfig,
    cfg6: &DataplaneConfig6,
) -> Result<Classified6, Counter> {
    if have < OUTER6_L3_END || be16(f.eth_proto) != ETH_P_IPV6 || f.vtc_flow[0] >> 4 != 6 {
        return Ok(Classified6::Pass);
    }
    if !eq16(&f.dst, &cfg6.public_ip) {
        return Ok(Classified6::Pass);
    }
    if f.next_header == IPPROTO_FRAGMENT {
        // Only a first fragment (offset 0) shows the UDP port; later ones go to the stack.
        let first = be16(f.udp_dport) & 0xfff8 == 0;
        let port = be16([f.vxlan[2], f.vxlan[3]]);
        if have == FRAME6_LEN && f.udp_sport[0] == IPPROTO_UDP && first && port == cfg.port {
            return Err(Counter::DropFragment);
        }
        return Ok(Classified6::Pass);
    }
    // Other extension headers: flannel peers never send them; the stack has the say.
    if f.next_header != IPPROTO_UDP || have < FRAME6_LEN || be16(f.udp_dport) != cfg.port {
        return Ok(Classified6::Pass);
    }
    // From here on it is VXLAN for us: anything wrong is dropped.
    let payload_len = be16(f.payload_len) as usize;
    if payload_len + OUTER6_L3_END > frame_len
        || be16(f.udp_len) as usize != payload_len
        || payload_len < UDP_LEN + VXLAN_LEN + ETH_LEN + IPV6_LEN
    {
        return Err(Counter::DropMalformed);
    }
    // SAFETY: the hash map value is read once and copied.
    let vtep = match unsafe { OVL_VTEPS6.get(f.src) } {
        Some(v) => *v,
        None => return Err(Counter::DropUnknownPeer),
    };
    match vxlan_vni(&f.vxlan) {
        None => return Err(Counter::DropMalformed),
        Some(vni) if vni != cfg.vni => return Err(Counter::DropWrongVni),
        Some(_) => {}
    }
    if be16(f.inner_proto) != ETH_P_IPV6 || f.inner_vtc[0] >> 4 != 6 {
        return Err(Counter::DropMalformed);
    }
    if !vtep.contains(f.inner_src) {
        return Err(Counter::DropSpoofedSource);
    }
    Ok(Classified6::Decap)
}

/// XDP decap of an IPv6 frame (`cfg` is the node config, already checked ready).
#[inline(always)]
fn try_decap6_xdp(ctx: &XdpContext, cfg: &DataplaneConfig) -> Result<Verdict, Counter> {
    let pass = Verdict::pass(xdp_action::XDP_PASS, Counter::PassDecap);
    let Some(cfg6) = config6() else {
        return Ok(pass);
    };
    let start = ctx.data();
    let end = ctx.data_end();
    let frame_len = end - start;
    let mut short: Vxlan6Frame = unsafe { core::mem::zeroed() };
    let (f, have): (&Vxlan6Frame, usize) = if start + FRAME6_LEN <= end {
        // SAFETY: bounds checked just above.
        (unsafe { &*(start as *const Vxlan6Frame) }, FRAME6_LEN)
    } else if start + OUTER6_L3_END <= end {
        // SAFETY: bounds checked just above; copies only the outer Ethernet and IPv6 headers.
        unsafe {
            core::ptr::copy_nonoverlapping(
                start as *const u8,
                &mut short as *mut _ as *mut u8,
                OUTER6_L3_END,
            );
        }
        (&short, OUTER6_L3_END)
    } else {
        return Ok(pass);
    };
    match classify6(f, have, frame_len, cfg, cfg6)? {
        Classified6::Pass => Ok(pass),
        Classified6::Decap => {
            // SAFETY: helper on our own context.
            if unsafe { bpf_xdp_adjust_head(ctx.ctx, VXLAN6_OVERHEAD as i32) } != 0 {
                return Err(Counter::DropAdjustRoom);
            }
            let start = ctx.data();
            if start + ETH_LEN > ctx.data_end() {
                return Err(Counter::DropMalformed);
            }
            // SAFETY: bounds checked just above.
            unsafe { (*(start as *mut [u8; 6])) = cfg.underlay_mac };
            mark_decapped(ctx);
            Ok(Verdict {
                action: xdp_action::XDP_PASS,
                counter: Counter::Decap6Packets,
                bytes: Some(Counter::Decap6Bytes),
                len: (frame_len - VXLAN6_OVERHEAD) as u64,
            })
        }
    }
}

/// TC decap of an IPv6 frame: stripped (GSO kept) and delivered straight to a local pod, or
/// handed to the stack, addressed to the underlay NIC from the sender's VtepMAC, as the IPv4
/// path does for a pod it does not deliver to.
#[inline(always)]
fn try_decap6_tc(ctx: &TcContext, cfg: &DataplaneConfig) -> Result<Verdict, Counter> {
    let pass = Verdict::pass(TC_ACT_OK, Counter::PassDecap);
    let Some(cfg6) = config6() else {
        return Ok(pass);
    };
    let frame_len = ctx.len() as usize;
    let mut f: Vxlan6Frame = unsafe { core::mem::zeroed() };
    let have = if frame_len >= FRAME6_LEN {
        f = ctx.load(0).map_err(|_| Counter::DropMalformed)?;
        FRAME6_LEN
    } else if frame_len >= OUTER6_L3_END {
        let head: [u8; OUTER6_L3_END] = ctx.load(0).map_err(|_| Counter::DropMalformed)?;
        // SAFETY: Vxlan6Frame starts with exactly these bytes.
        unsafe { core::ptr::write(&mut f as *mut _ as *mut [u8; OUTER6_L3_END], head) };
        OUTER6_L3_END
    } else {
        return Ok(pass);
    };
    match classify6(&f, have, frame_len, cfg, cfg6)? {
        Classified6::Pass => Ok(pass),
        Classified6::Decap => {
            // SAFETY: reading a field of our own context.
            let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
            strip_outer(ctx, cfg, VXLAN6_OVERHEAD)?;
            if gso {
                count(Counter::DecapGsoPackets, 1);
            }
            let len = ctx.len() as u64;
            if let Some(v) = deliver6(ctx, cfg)? {
                count(Counter::Decap6Packets, 1);
                count(Counter::Decap6Bytes, len);
                return Ok(v);
            }
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&cfg.underlay_mac);
            macs[6..].copy_from_slice(&f.inner_src_mac);
            ctx.store(0, &macs, 0).map_err(|_| Counter::DropMalformed)?;
            Ok(Verdict {
                action: TC_ACT_OK,
                counter: Counter::Decap6Packets,
                bytes: Some(Counter::Decap6Bytes),
                len,
            })
        }
    }
}

/// The IPv6 twin of `crate::deliver`: a decapsulated IPv6 packet (the frame starts with its
/// Ethernet header) for a pod in `OVL_ENDPOINTS6` whose veth still exists goes straight into
/// the pod with its hop limit decremented, as the node's forwarding would (IPv6 has no header
/// checksum to patch). `None` leaves it to the stack: delivery off, not a known endpoint, its
/// veth gone, its hop limit expiring here (the stack sends Time Exceeded), or a packet whose flow
/// depends on the node's conntrack (`stack_reason6`, counted).
#[inline(always)]
fn deliver6(ctx: &TcContext, cfg: &DataplaneConfig) -> Result<Option<Verdict>, Counter> {
    const HOP_LIMIT_OFF: usize = ETH_LEN + 7;
    if cfg.flags & CONFIG_NO_DELIVER != 0 {
        return Ok(None);
    }
    let ip: InnerIp6 = ctx.load(ETH_LEN).map_err(|_| Counter::DropMalformed)?;
    // SAFETY: the hash map value is read once and copied.
    let Some(ep) = (unsafe { OVL_ENDPOINTS6.get(ip.dst) }).copied() else {
        return Ok(None);
    };
    // The veth must still exist: the kernel drops device-map entries of removed devices.
    if OVL_ENDPOINT_DEVS6.get_ifindex(endpoint6_dev_key(ep.ifindex)) != Some(ep.ifindex) {
        return Ok(None);
    }
    if ip.hop_limit <= 1 {
        return Ok(None);
    }
    if let Some(reason) = stack_reason6(ctx, &ip)? {
        count(reason, 1);
        return Ok(None);
    }
    ctx.store(HOP_LIMIT_OFF, &(ip.hop_limit - 1), 0)
        .map_err(|_| Counter::DropMalformed)?;
    to_endpoint(ctx, cfg, &ep, Counter::Deliver6Packets, Counter::Deliver6Bytes).map(Some)
}
