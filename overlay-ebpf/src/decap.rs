//! Decap on the underlay NIC: XDP in the driver, or TC ingress. VXLAN to our port and VNI from a
//! member's PublicIP whose inner source lies in that member's subnet is stripped; anything else
//! that claims to be our VXLAN is dropped and counted by reason; all other traffic passes
//! untouched. The rules are each family's own (`Decap::classify`, side by side); what
//! follows them is one generic tail per hook ([`xdp`], [`tc`]).

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action, BPF_F_ADJ_ROOM_FIXED_GSO,
        BPF_F_ADJ_ROOM_NO_CSUM_RESET,
    },
    helpers::generated::{bpf_skb_load_bytes, bpf_xdp_adjust_head, bpf_xdp_adjust_meta},
    programs::{TcContext, XdpContext},
};
use overlay_common::{
    maps::{CONFIG_BARE_FAST, CONFIG_DECAP_L4_UDP, CONFIG_KEEP_CSUM, CONFIG_XDP_MAC_MARK},
    wire::{
        vxlan_vni, ENCAP6_HDR_LEN, ENCAP_HDR_LEN, ETH_LEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_FRAGMENT,
        IPPROTO_UDP, IPV4_LEN, IPV6_LEN, IP_FRAG_MASK, UDP_LEN, VXLAN_LEN, VXLAN_OVERHEAD,
    },
    Counter, DataplaneConfig, DataplaneConfig6, Vtep, Vtep6,
};

use crate::{
    deliver::{deliver, Deliver},
    family::{be16, EthHdr, Family, Ipv4Hdr, UdpHdr, V4, V6},
    observe,
    verdict::{config, count, Verdict, TC_ACT_OK},
};

/// Not in the pinned bindings yet (uapi `enum bpf_adj_room_flags`, 1 << 10).
pub(crate) const BPF_F_ADJ_ROOM_DECAP_L4_UDP: u64 = 1 << 10;
/// XDP metadata that marks a frame XDP decap stripped, for the TC program on the same NIC
/// (after GRO) to deliver it straight to a local pod. Only XDP programs can write metadata.
const DECAPPED_MARK: u32 = 0x4f56_4c31; // "OVL1"

/// What to do with a frame on the underlay, from its first bytes.
pub(crate) enum Classified {
    /// Not VXLAN for us: hand to the stack untouched.
    Pass,
    /// Valid VXLAN from a known peer: strip the outer headers.
    Decap,
}

pub(crate) trait Decap: Deliver {
    /// The inner fields decap checks, after the inner Ethernet header.
    type Inner;
    /// The outer Ethernet and IP headers: what a frame needs for a first look.
    type Head;
    /// The decap rules, shared by the XDP and TC hooks. `have` bytes of `f` are valid: the
    /// whole frame, or just the `Head` of a shorter one; `frame_len` is the whole frame's.
    fn classify(
        f: &Frame<Self>,
        have: usize,
        frame_len: usize,
        cfg: &DataplaneConfig,
        fcfg: &Self::Config,
    ) -> Result<Classified, Counter>;
    /// True when `inner_src` lies in the member's subnet.
    fn from_member(vtep: &Self::Vtep, inner_src: Self::Addr) -> bool;
}

/// Outer Ethernet + IP (`O`) + UDP + VXLAN + inner Ethernet + the inner fields decap checks (`I`).
#[repr(C)]
pub(crate) struct VxlanFrame<O, I> {
    eth: EthHdr,
    ip: O,
    /// UDP header; in an IPv6 fragment, the Fragment header (next header, reserved,
    /// offset/flags, id).
    udp: UdpHdr,
    /// VXLAN; in an IPv6 fragment, the UDP header of a first fragment.
    vxlan: [u8; VXLAN_LEN],
    inner_eth: EthHdr,
    inner: I,
}
pub(crate) type Frame<F> = VxlanFrame<<F as Family>::Ip, <F as Decap>::Inner>;

// ---------------------------------------------------------------------------------------------
// The rules, per family.
// ---------------------------------------------------------------------------------------------

const FRAME_LEN: usize = core::mem::size_of::<Frame<V4>>();
const _: () = assert!(FRAME_LEN == ENCAP_HDR_LEN + IPV4_LEN);
/// Outer Ethernet + IPv4 + UDP.
const OUTER_L4_END: usize = ETH_LEN + IPV4_LEN + UDP_LEN;

impl Decap for V4 {
    /// The whole inner IPv4 header.
    type Inner = Ipv4Hdr;
    type Head = [u8; ETH_LEN + IPV4_LEN];

    #[inline(always)]
    fn classify(
        f: &Frame<V4>,
        have: usize,
        frame_len: usize,
        cfg: &DataplaneConfig,
        _: &(),
    ) -> Result<Classified, Counter> {
        if have < ETH_LEN + IPV4_LEN || f.eth.proto != ETH_P_IP.to_be_bytes() {
            return Ok(Classified::Pass);
        }
        if f.ip.proto != IPPROTO_UDP || f.ip.ver_ihl != 0x45 {
            // Not UDP, or IP options: flannel peers never send VXLAN with options.
            return Ok(Classified::Pass);
        }
        if f.ip.dst != cfg.public_ip {
            return Ok(Classified::Pass);
        }
        let frag = be16(f.ip.frag) & IP_FRAG_MASK;
        if frag != 0 {
            // Later fragments carry no UDP header; the first one tells the port.
            if frag & 0x1fff == 0 && have >= OUTER_L4_END && be16(f.udp.dport) == cfg.port {
                return Err(Counter::DropFragment);
            }
            return Ok(Classified::Pass);
        }
        if have < OUTER_L4_END || be16(f.udp.dport) != cfg.port {
            return Ok(Classified::Pass);
        }
        // From here on it is VXLAN for us: anything wrong is dropped.
        let tot_len = be16(f.ip.tot_len) as usize;
        let udp_len = be16(f.udp.len) as usize;
        if have < FRAME_LEN
            || tot_len + ETH_LEN > frame_len
            || udp_len + IPV4_LEN != tot_len
            || tot_len < VXLAN_OVERHEAD + IPV4_LEN
        {
            return Err(Counter::DropMalformed);
        }
        let inner_ok = f.inner_eth.proto == ETH_P_IP.to_be_bytes() && f.inner.ver_ihl >> 4 == 4;
        let to_our_vtep = eq_mac(&f.inner_eth.dst, &cfg.vtep_mac);
        from_a_member::<V4>(f, inner_ok, f.inner.src, to_our_vtep, cfg)
    }

    #[inline(always)]
    fn from_member(vtep: &Vtep, inner_src: [u8; 4]) -> bool {
        vtep.contains(inner_src)
    }
}

/// The inner IPv6 fields decap checks.
#[repr(C)]
pub(crate) struct Inner6 {
    vtc: [u8; 4],
    _mid: [u8; 4],
    src: [u8; 16],
}
const FRAME6_LEN: usize = core::mem::size_of::<Frame<V6>>();
const _: () = assert!(FRAME6_LEN == ENCAP6_HDR_LEN + 24);
/// Outer Ethernet + IPv6.
const OUTER6_L3_END: usize = ETH_LEN + IPV6_LEN;

impl Decap for V6 {
    type Inner = Inner6;
    type Head = [u8; OUTER6_L3_END];

    #[inline(always)]
    fn classify(
        f: &Frame<V6>,
        have: usize,
        frame_len: usize,
        cfg: &DataplaneConfig,
        cfg6: &DataplaneConfig6,
    ) -> Result<Classified, Counter> {
        if have < OUTER6_L3_END || be16(f.eth.proto) != ETH_P_IPV6 || f.ip.vtc_flow[0] >> 4 != 6 {
            return Ok(Classified::Pass);
        }
        if !eq_bytes(&f.ip.dst, &cfg6.public_ip) {
            return Ok(Classified::Pass);
        }
        if f.ip.next_header == IPPROTO_FRAGMENT {
            // Only a first fragment (offset 0) shows the UDP port; later ones go to the stack.
            let first = be16(f.udp.dport) & 0xfff8 == 0;
            let port = be16([f.vxlan[2], f.vxlan[3]]);
            if have == FRAME6_LEN && f.udp.sport[0] == IPPROTO_UDP && first && port == cfg.port {
                return Err(Counter::DropFragment);
            }
            return Ok(Classified::Pass);
        }
        // Other extension headers: flannel peers never send them; the stack has the say.
        if f.ip.next_header != IPPROTO_UDP || have < FRAME6_LEN || be16(f.udp.dport) != cfg.port {
            return Ok(Classified::Pass);
        }
        // From here on it is VXLAN for us: anything wrong is dropped.
        let payload_len = be16(f.ip.payload_len) as usize;
        if payload_len + OUTER6_L3_END > frame_len
            || be16(f.udp.len) as usize != payload_len
            || payload_len < UDP_LEN + VXLAN_LEN + ETH_LEN + IPV6_LEN
        {
            return Err(Counter::DropMalformed);
        }
        let inner_ok = be16(f.inner_eth.proto) == ETH_P_IPV6 && f.inner.vtc[0] >> 4 == 6;
        let to_our_vtep = eq_mac(&f.inner_eth.dst, &cfg6.vtep_mac);
        from_a_member::<V6>(f, inner_ok, f.inner.src, to_our_vtep, cfg)
    }

    #[inline(always)]
    fn from_member(vtep: &Vtep6, inner_src: [u8; 16]) -> bool {
        vtep.contains(inner_src)
    }
}

/// Byte-array equality without a `bcmp` call (which the BPF target cannot link).
#[inline(always)]
pub(crate) fn eq_bytes<const N: usize>(a: &[u8; N], b: &[u8; N]) -> bool {
    let mut diff = 0u8;
    let mut i = 0;
    while i < N {
        diff |= a[i] ^ b[i];
        i += 1;
    }
    diff == 0
}

/// MAC equality in two word compares (no byte loop: decap's frame is near the stack limit).
#[inline(always)]
pub(crate) fn eq_mac(a: &[u8; 6], b: &[u8; 6]) -> bool {
    let word = |m: &[u8; 6]| u32::from_ne_bytes([m[0], m[1], m[2], m[3]]);
    let half = |m: &[u8; 6]| u16::from_ne_bytes([m[4], m[5]]);
    word(a) == word(b) && half(a) == half(b)
}

/// The rules both families end with, for VXLAN to our port: a member's PublicIP as the source,
/// our VNI, an inner packet of the family (`inner_ok`) from inside that member's subnet,
/// addressed to our VtepMAC of the family (`to_our_vtep`).
#[inline(always)]
fn from_a_member<F: Decap>(
    f: &Frame<F>,
    inner_ok: bool,
    inner_src: F::Addr,
    to_our_vtep: bool,
    cfg: &DataplaneConfig,
) -> Result<Classified, Counter> {
    // SAFETY: the hash map value is read once and copied.
    let vtep = match unsafe { F::VTEPS.get(F::src(&f.ip)) } {
        Some(v) => *v,
        None => return Err(Counter::DropUnknownPeer),
    };
    match vxlan_vni(&f.vxlan) {
        None => return Err(Counter::DropMalformed),
        Some(vni) if vni != cfg.vni => return Err(Counter::DropWrongVni),
        Some(_) => {}
    }
    if !inner_ok {
        return Err(Counter::DropMalformed);
    }
    if !F::from_member(&vtep, inner_src) {
        return Err(Counter::DropSpoofedSource);
    }
    if !to_our_vtep {
        return Err(Counter::DropInnerMac);
    }
    Ok(Classified::Decap)
}

// ---------------------------------------------------------------------------------------------
// The hooks, generic over the family.
// ---------------------------------------------------------------------------------------------

/// XDP decap: the outer headers stripped before GRO, the frame handed to the stack addressed to
/// the NIC and marked for the TC program after GRO ([`decapped_by_xdp`]).
#[inline(always)]
pub(crate) fn xdp<F: Decap>(ctx: &XdpContext) -> Result<Verdict, Counter> {
    let pass = Verdict::pass(xdp_action::XDP_PASS, Counter::PassDecap);
    let Ok(cfg) = config() else {
        return Ok(pass);
    };
    let Some(fcfg) = F::config() else {
        return Ok(pass);
    };
    let start = ctx.data();
    let end = ctx.data_end();
    let frame_len = end - start;
    let meta = xdp_meta();
    if !meta && start + ETH_LEN <= end {
        // The mark below: a frame from the wire must never carry it.
        // SAFETY: bounds checked just above.
        if eq_mac(unsafe { &*((start + 6) as *const [u8; 6]) }, &cfg.underlay_mac) {
            return Err(Counter::DropOwnMac);
        }
    }
    let full = core::mem::size_of::<Frame<F>>();
    let head = core::mem::size_of::<F::Head>();
    // Direct packet access needs a constant-size bounds check; shorter frames are classified on
    // a zero-padded copy of what is there.
    let mut short: Frame<F> = unsafe { core::mem::zeroed() };
    let (f, have): (&Frame<F>, usize) = if start + full <= end {
        // SAFETY: bounds checked just above.
        (unsafe { &*(start as *const Frame<F>) }, full)
    } else if start + head <= end {
        // SAFETY: bounds checked just above; copies only the outer Ethernet and IP headers.
        unsafe {
            core::ptr::copy_nonoverlapping(start as *const u8, &mut short as *mut _ as *mut u8, head);
        }
        (&short, head)
    } else {
        return Ok(pass);
    };
    let classified = F::classify(f, have, frame_len, cfg, fcfg).inspect_err(|_| {
        observe::refused::<F>(&F::src(&f.ip));
    })?;
    match classified {
        Classified::Pass => Ok(pass),
        Classified::Decap => {
            // Counted before the strip moves the outer header `f` points into.
            observe::received::<F>(&F::src(&f.ip), (frame_len - F::OVERHEAD) as u64);
            // SAFETY: helper on our own context.
            if unsafe { bpf_xdp_adjust_head(ctx.ctx, F::OVERHEAD as i32) } != 0 {
                return Err(Counter::DropAdjustRoom);
            }
            let start = ctx.data();
            if start + ETH_LEN > ctx.data_end() {
                return Err(Counter::DropMalformed);
            }
            // The inner frame is addressed to our VtepMAC; the stack wants the NIC's own MAC.
            // SAFETY: bounds checked just above.
            unsafe { (*(start as *mut [u8; 6])) = cfg.underlay_mac };
            if meta {
                mark_decapped(ctx);
            } else {
                // No metadata on this kernel: the mark is the NIC's own MAC as the source too.
                // SAFETY: bounds checked just above.
                unsafe { (*((start + 6) as *mut [u8; 6])) = cfg.underlay_mac };
            }
            Ok(Verdict::counted(
                xdp_action::XDP_PASS,
                F::DECAP,
                (frame_len - F::OVERHEAD) as u64,
            ))
        }
    }
}

/// TC decap: stripped (a GSO packet whole) and delivered straight to a local pod, or handed to
/// the stack addressed to the NIC from the sender's VtepMAC, as the XDP hook hands it on. On a
/// host-gw node a frame that is not VXLAN for us goes to `plain::receive` (in a frame of its own,
/// [`NotVxlan`]).
#[inline(always)]
pub(crate) fn tc<F: Decap>(ctx: &TcContext) -> Result<Verdict, NotVxlan> {
    let pass = Verdict::pass(TC_ACT_OK, Counter::PassDecap);
    let Ok(cfg) = config() else {
        return Ok(pass);
    };
    let Some(fcfg) = F::config() else {
        return Ok(pass);
    };
    match tc_vxlan::<F>(ctx, cfg, fcfg) {
        Ok(Some(v)) => Ok(v),
        Ok(None) if cfg.flags & CONFIG_BARE_FAST != 0 => Err(NotVxlan::Bare),
        Ok(None) => Ok(pass),
        Err(reason) => Err(NotVxlan::Drop(reason)),
    }
}

/// Why [`tc`] did not end with a verdict: a drop reason, or a bare frame on a host-gw node.
pub(crate) enum NotVxlan {
    Drop(Counter),
    Bare,
}

/// [`tc`] for a frame that may be VXLAN: `None` when it is not VXLAN for us.
#[inline(always)]
fn tc_vxlan<F: Decap>(
    ctx: &TcContext,
    cfg: &DataplaneConfig,
    fcfg: &F::Config,
) -> Result<Option<Verdict>, Counter> {
    let frame_len = ctx.len() as usize;
    let full = core::mem::size_of::<Frame<F>>();
    let head = core::mem::size_of::<F::Head>();
    let mut f: Frame<F> = unsafe { core::mem::zeroed() };
    // Loaded in place (no temporary copy: this frame is near the stack limit).
    let have = if frame_len >= full {
        full
    } else if frame_len >= head {
        head
    } else {
        return Ok(None);
    };
    let into = &mut f as *mut Frame<F> as *mut core::ffi::c_void;
    // SAFETY: `have` is at most the size of `f`, which the helper writes into.
    if unsafe { bpf_skb_load_bytes(ctx.skb.skb as *const _, 0, into, have as u32) } != 0 {
        return Err(Counter::DropMalformed);
    }
    let classified = F::classify(&f, have, frame_len, cfg, fcfg).inspect_err(|_| {
        observe::refused::<F>(&F::src(&f.ip));
    })?;
    match classified {
        Classified::Pass => Ok(None),
        Classified::Decap => {
            // SAFETY: reading a field of our own context.
            let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
            strip_outer(ctx, cfg, F::OVERHEAD)?;
            if gso {
                count(Counter::DecapGsoPackets, 1);
            }
            let len = ctx.len() as u64;
            observe::received::<F>(&F::src(&f.ip), len);
            if let Some(v) = deliver::<F>(ctx, cfg)? {
                count(F::DECAP.0, 1);
                count(F::DECAP.1, len);
                return Ok(Some(v));
            }
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&cfg.underlay_mac);
            macs[6..].copy_from_slice(&f.inner_eth.src);
            ctx.store(0, &macs, 0).map_err(|_| Counter::DropMalformed)?;
            Ok(Some(Verdict::counted(TC_ACT_OK, F::DECAP, len)))
        }
    }
}

/// Removes `overhead` bytes of outer IPv4 or IPv6 + UDP + VXLAN + inner Ethernet after the outer
/// Ethernet header (the inner frame then starts with the outer Ethernet header, rewritten by the
/// caller). Same family in and out, so `skb->protocol` stays right without a DECAP_L3 flag.
///
/// A GSO packet (veth-forwarded, or GRO-merged) keeps its length per segment
/// (`BPF_F_ADJ_ROOM_FIXED_GSO`) and so crosses whole. Kernels that know
/// `BPF_F_ADJ_ROOM_DECAP_L4_UDP` (the agent probes it at load: `CONFIG_DECAP_L4_UDP`) also clear
/// its UDP-tunnel GSO state; on the others (6.1 to 6.18 at least) the packet keeps that state,
/// which the pod's veth carries fine (its `hw_enc_features` take the packet whole) but the
/// bridge and `ip_forward` do not: such packets are delivered straight to the pod whenever it is
/// a known endpoint.
#[inline(always)]
fn strip_outer(ctx: &TcContext, cfg: &DataplaneConfig, overhead: usize) -> Result<(), Counter> {
    let mut flags = BPF_F_ADJ_ROOM_FIXED_GSO as u64;
    if cfg.flags & CONFIG_KEEP_CSUM != 0 {
        flags |= BPF_F_ADJ_ROOM_NO_CSUM_RESET as u64;
    }
    if cfg.flags & CONFIG_DECAP_L4_UDP != 0 {
        flags |= BPF_F_ADJ_ROOM_DECAP_L4_UDP;
    }
    ctx.adjust_room(-(overhead as i32), BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| Counter::DropAdjustRoom)
}

/// Whether XDP programs may call `bpf_xdp_adjust_meta` on this kernel: the agent sets it at
/// load from a helper probe (some kernel builds refuse the helper to XDP, and the verifier
/// refuses a program that calls it). Read-only data, so the verifier knows the value and never
/// walks the call when it is 0.
#[unsafe(no_mangle)]
static XDP_META: u32 = 1;

/// [`XDP_META`]: whether XDP decap marks what it stripped with metadata.
#[inline(always)]
fn xdp_meta() -> bool {
    // SAFETY: a plain read of our own static; volatile so the compiler keeps the load the
    // agent's value decides.
    unsafe { core::ptr::read_volatile(&XDP_META) != 0 }
}

/// Tags the frame for the TC program after GRO with metadata (best effort: a driver without
/// metadata support just leaves the frame to the stack). Only called when [`xdp_meta`].
#[inline(always)]
fn mark_decapped(ctx: &XdpContext) {
    // SAFETY: helper on our own context.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -4) } != 0 {
        return;
    }
    let meta = ctx.metadata();
    if meta + 4 <= ctx.data() {
        // SAFETY: bounds checked just above.
        unsafe { *(meta as *mut u32) = DECAPPED_MARK };
    }
}

/// True when XDP decap stripped this frame: its metadata mark ([`mark_decapped`]), or on a
/// kernel without XDP metadata, with XDP attached ([`CONFIG_XDP_MAC_MARK`]), a frame from the
/// NIC's own MAC to itself (XDP drops such frames from the wire).
#[inline(always)]
pub(crate) fn decapped_by_xdp(ctx: &TcContext) -> bool {
    if xdp_meta() {
        // SAFETY: reading fields of our own context.
        let (meta, data) = unsafe { ((*ctx.skb.skb).data_meta as usize, (*ctx.skb.skb).data as usize) };
        // SAFETY: bounds checked in the same expression.
        return meta + 4 <= data && unsafe { *(meta as *const u32) } == DECAPPED_MARK;
    }
    let Ok(cfg) = config() else { return false };
    if cfg.flags & CONFIG_XDP_MAC_MARK == 0 {
        return false;
    }
    let Ok([dst, src]) = ctx.load::<[[u8; 6]; 2]>(0) else {
        return false;
    };
    eq_mac(&dst, &cfg.underlay_mac) && eq_mac(&src, &cfg.underlay_mac)
}
