//! Encap: TC ingress on the pod bridge (and `overlay0`'s egress and ingress). A packet for a
//! remote pod subnet gets outer Ethernet/IP/UDP/VXLAN headers and is redirected to the underlay
//! NIC with MACs from the kernel's FIB and neighbour tables, or is sent as it is to a
//! DirectRouting peer. What each family checks first ([`try_encap4`], [`try_encap6`]) sits side
//! by side; the route and the send ([`route_and_send`]) are written once.
//!
//! Conntrack: encap on `overlay0`'s egress records the flows the stack routed to a remote pod
//! (`conntrack::record`); encap on the bridge hands the packets the node's netfilter already
//! NATed (br_netfilter, marked `NAT_MARK` by the agent's nftables rule) to the stack, which
//! routes them through `overlay0`.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup as FibParams, bpf_redir_neigh,
        BPF_ADJ_ROOM_ENCAP_L2_SHIFT, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
    },
    btf_maps::lpm_trie::Key,
    helpers::generated::{bpf_fib_lookup, bpf_get_hash_recalc, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use overlay_common::{
    maps::{CONFIG_BARE_FAST, CONFIG_NO_DELIVER, NAT_MARK, PEER_DIRECT},
    wire::{
        encap_header, flow_source_port, Encap6Params, EncapParams, ETH_LEN, IPPROTO_TCP, IPPROTO_UDP,
        IPV6_LEN, UDP_LEN, VXLAN_LEN,
    },
    Counter, DataplaneConfig,
};

use crate::{
    conntrack::{self, Conntrack},
    csum6,
    decap::eq_bytes,
    deliver::{expires_here, Deliver},
    family::{Family, Ipv4Hdr, Ipv6Hdr, AF_INET6, V4, V6},
    maps::{OVL_PEERS, OVL_PEERS6},
    observe, plain,
    verdict::{config, config6, Verdict, TC_ACT_OK, TC_ACT_REDIRECT},
};

pub(crate) trait Encap: Conntrack {
    /// Encap of a frame of the family, from its inner Ethernet header on.
    fn try_encap(ctx: &TcContext) -> Result<Verdict, Counter>;
}

impl Encap for V4 {
    #[inline(always)]
    fn try_encap(ctx: &TcContext) -> Result<Verdict, Counter> {
        try_encap4(ctx)
    }
}

impl Encap for V6 {
    #[inline(always)]
    fn try_encap(ctx: &TcContext) -> Result<Verdict, Counter> {
        try_encap6(ctx)
    }
}

// ---------------------------------------------------------------------------------------------
// What each family checks before the route.
// ---------------------------------------------------------------------------------------------

/// IPv4 (and anything that is neither IPv4 nor IPv6, which passes).
#[inline(always)]
fn try_encap4(ctx: &TcContext) -> Result<Verdict, Counter> {
    let proto: u16 = ctx.load(12).map_err(|_| Counter::DropMalformed)?;
    if proto != overlay_common::wire::ETH_P_IP.to_be() {
        return Ok(Verdict::pass(TC_ACT_OK, Counter::PassEncap));
    }
    let ip: Ipv4Hdr = ctx.load(ETH_LEN).map_err(|_| Counter::DropMalformed)?;
    let key = Key::new(32, ip.dst);
    let peer = match OVL_PEERS.get(&key) {
        Some(p) => *p,
        None => {
            // A later fragment has no UDP header to tell the port by.
            let first = u16::from_be_bytes(ip.frag) & 0x1fff == 0;
            let udp = (ip.proto == IPPROTO_UDP && first).then(|| ip.l4_offset());
            return pass_unless_vxlan::<V4>(ctx, udp, &ip.dst, |cfg| cfg.public_ip == ip.dst);
        }
    };
    let cfg = config()?;
    if let Some(pass) = to_stack_from_bridge(ctx, cfg) {
        return Ok(Verdict::pass(TC_ACT_OK, pass));
    }
    // Seen on the bridge (what a pod sent), or on `overlay0`'s egress (what the stack routed).
    let from_bridge = at_ingress(ctx);
    if !from_bridge {
        conntrack::record::<V4>(ctx, &ip);
    } else if conntrack::is_stack_flow::<V4>(ctx, &ip) {
        return Ok(Verdict::pass(TC_ACT_OK, Counter::PassConntrack));
    }
    let direct = peer.flags & PEER_DIRECT != 0;
    let inner_len = ctx.len() - ETH_LEN as u32;
    if !direct && wire_len(ctx, inner_len, (ip.ver_ihl & 0x0f) * 4, ip.proto, ip.l4_offset())? > cfg.inner_mtu
    {
        // Too big for the tunnel (a pod ignoring subnet.env's MTU): the stack routes it via the
        // host device, whose MTU is the tunnel's, and sends ICMP fragmentation-needed for DF
        // packets (PMTU discovery) or fragments the rest, which then come back here.
        return Ok(Verdict::pass(TC_ACT_OK, Counter::PassTooBig));
    }
    // The bridge's packets cross this node as a router hop, as on `flannel.1` (the stack counted
    // the hop of what it routed): one whose TTL runs out here is left to the stack, the others'
    // TTL goes down by one in `route_and_send`.
    if from_bridge && expires_here::<V4>(&ip) {
        return Ok(Verdict::pass(TC_ACT_OK, Counter::PassTtl));
    }
    route_and_send::<V4>(
        ctx,
        cfg,
        &cfg.public_ip,
        &peer.public_ip,
        direct,
        from_bridge.then(|| V4::hop_word(&ip)),
        |fib, src_port| {
            let hdr = encap_header(&EncapParams {
                outer_src_mac: fib.smac,
                outer_dst_mac: fib.dmac,
                src_ip: cfg.public_ip,
                dst_ip: peer.public_ip,
                src_port,
                dst_port: cfg.port,
                vni: cfg.vni,
                inner_src_mac: cfg.vtep_mac,
                inner_dst_mac: peer.vtep_mac,
                inner_ip_len: inner_len as u16,
                inner_tos: ip.tos,
            });
            ctx.store(0, &hdr, 0).map_err(|_| Counter::DropMalformed)
        },
    )
}

/// A packet for no remote pod subnet goes to the stack, unless it is a pod's VXLAN for a node:
/// UDP (`udp`: where its header is) to the VXLAN port of our PublicIP (`ours`) or a member's.
/// A pod never needs to send VXLAN, and after the node's masquerade it would arrive as a
/// member's, inner source and all.
#[inline(always)]
fn pass_unless_vxlan<F: Family>(
    ctx: &TcContext,
    udp: Option<usize>,
    dst: &F::Addr,
    ours: impl FnOnce(&DataplaneConfig) -> bool,
) -> Result<Verdict, Counter> {
    let pass = Ok(Verdict::pass(TC_ACT_OK, Counter::PassEncap));
    let Some(l4) = udp else { return pass };
    let Ok(dport) = ctx.load::<[u8; 2]>(l4 + 2) else {
        return pass;
    };
    let Ok(cfg) = config() else { return pass };
    if u16::from_be_bytes(dport) != cfg.port {
        return pass;
    }
    // SAFETY: a hash map lookup; the value is not read.
    if ours(cfg) || unsafe { F::VTEPS.get(dst) }.is_some() {
        return Err(Counter::DropPodVxlan);
    }
    pass
}

/// IPv6. The outer UDP checksum IPv6 requires, and resegmenting, are `csum6`'s.
#[inline(always)]
fn try_encap6(ctx: &TcContext) -> Result<Verdict, Counter> {
    let mut ip: Ipv6Hdr = ctx.load(ETH_LEN).map_err(|_| Counter::DropMalformed)?;
    let key = Key::new(128, ip.dst);
    let Some(peer) = OVL_PEERS6.get(&key) else {
        let udp = (ip.next_header == IPPROTO_UDP).then_some(ETH_LEN + IPV6_LEN);
        return pass_unless_vxlan::<V6>(ctx, udp, &ip.dst, |_| {
            config6().is_some_and(|c| eq_bytes(&c.public_ip, &ip.dst))
        });
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
    // Seen on the bridge (a pod's), not on `overlay0` (the stack's, or segments coming back).
    let from_bridge = at_ingress(ctx) && !returned;
    if !at_ingress(ctx) {
        record_stack_flow6(ctx, &ip);
    } else if from_bridge && conntrack::is_stack_flow::<V6>(ctx, &ip) {
        return Ok(Verdict::pass(TC_ACT_OK, Counter::PassConntrack));
    }
    let direct = peer.flags & PEER_DIRECT != 0;
    let inner_len = ctx.len() - ETH_LEN as u32;
    let wire_len = wire_len(ctx, inner_len, IPV6_LEN as u8, ip.next_header, ETH_LEN + IPV6_LEN)?;
    if !direct && wire_len > cfg6.inner_mtu {
        // Too big for the tunnel: the stack routes it via the host device, whose route carries
        // the tunnel MTU, and answers with ICMPv6 Packet Too Big (IPv6 routers never fragment).
        return Ok(Verdict::pass(TC_ACT_OK, Counter::PassTooBig));
    }
    // A router hop, written before the outer checksum sums the inner packet (and before a
    // packet goes to be resegmented); IPv4 writes it once encap made the header its own.
    if from_bridge {
        if expires_here::<V6>(&ip) {
            return Ok(Verdict::pass(TC_ACT_OK, Counter::PassTtl));
        }
        V6::forwarded(ctx, &ip, ETH_LEN)?;
        // The copy too: the outer UDP checksum below sums the inner header from it.
        ip.hop_limit -= 1;
    }
    // SAFETY: reading a field of our own context.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if !direct && gso_size != 0 && csum6::short_tail(ctx, cfg6, &ip, inner_len, wire_len, gso_size) {
        // SAFETY: plain helper call.
        let action = unsafe { bpf_redirect(cfg6.reseg_ifindex, 0) } as u32;
        return Ok(Verdict::pass(action, Counter::Encap6Resegmented));
    }
    // What the inner packet adds to the outer UDP checksum, before anything else takes stack.
    let inner_sum = if direct {
        0
    } else {
        csum6::inner_checksum_sum(ctx, &ip, inner_len, gso_size != 0)?
    };
    route_and_send::<V6>(
        ctx,
        cfg,
        &cfg6.public_ip,
        &peer.public_ip,
        direct,
        None,
        |fib, src_port| {
            let mut p = Encap6Params {
                outer_src_mac: fib.smac,
                outer_dst_mac: fib.dmac,
                src_ip: cfg6.public_ip,
                dst_ip: peer.public_ip,
                src_port,
                dst_port: cfg.port,
                vni: cfg.vni,
                inner_src_mac: cfg6.vtep_mac,
                inner_dst_mac: peer.vtep_mac,
                inner_ip_len: inner_len as u16,
                inner_tclass: (ip.vtc_flow[0] << 4) | (ip.vtc_flow[1] >> 4),
                udp_csum: 0,
            };
            // For a GSO packet the checksum of one full-sized segment (see `csum6`).
            let csum_udp_len = (wire_len + (UDP_LEN + VXLAN_LEN + ETH_LEN) as u32) as u16;
            p.udp_csum = csum6::outer_checksum(&p, u32::from(csum_udp_len), inner_sum) as u16;
            if csum6::store_header(ctx.skb.skb, &p) != 0 {
                return Err(Counter::DropMalformed);
            }
            Ok(())
        },
    )
}

/// `conntrack::record` in a frame of its own: `try_encap6`'s would not hold it.
#[inline(never)]
fn record_stack_flow6(ctx: &TcContext, ip: &Ipv6Hdr) {
    conntrack::record::<V6>(ctx, ip)
}

/// Length of the inner IP packets that will be on the wire: the packet itself (`inner_len`), or
/// for a GSO packet one segment (gso_size plus the IP header of `l3_len` bytes and the TCP or UDP
/// header at `l4`).
#[inline(always)]
fn wire_len(ctx: &TcContext, inner_len: u32, l3_len: u8, proto: u8, l4: usize) -> Result<u32, Counter> {
    // SAFETY: reading a field of our own context.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        return Ok(inner_len);
    }
    let l4_len = match proto {
        IPPROTO_TCP => {
            let doff: u8 = ctx.load(l4 + 12).map_err(|_| Counter::DropMalformed)?;
            u32::from(doff >> 4) * 4
        }
        IPPROTO_UDP => UDP_LEN as u32,
        _ => 0,
    };
    Ok(gso_size + u32::from(l3_len) + l4_len)
}

// ---------------------------------------------------------------------------------------------
// Where a pod packet leaves to: the stack, or the underlay.
// ---------------------------------------------------------------------------------------------

/// Where the packet is seen: on a device's ingress (the bridge; `overlay0` for resegmented
/// packets) or its egress (`overlay0`: routed by the node's stack). The kernel sets the
/// receiving device before TC ingress runs; on egress it is the device the packet came in on, or
/// none for the node's own packets, never the one it leaves by.
#[inline(always)]
fn at_ingress(ctx: &TcContext) -> bool {
    // SAFETY: reading fields of our own context.
    unsafe { (*ctx.skb.skb).ingress_ifindex == (*ctx.skb.skb).ifindex }
}

/// A packet the node's netfilter NATed before encap saw it on the bridge (br_netfilter runs the
/// nat PREROUTING hook on the bridge port): clears the agent's mark and says to leave it to the
/// stack, which confirms the connection and routes it through `overlay0`. Only on ingress: on
/// `overlay0`'s egress the packet has been through the stack already (without br_netfilter the
/// mark is set after encap on the bridge saw it).
#[inline(always)]
fn take_nat_mark(ctx: &TcContext) -> bool {
    // SAFETY: reading and writing fields of our own context (TC programs may write the mark).
    unsafe {
        let skb = ctx.skb.skb;
        if (*skb).mark & NAT_MARK == 0 || !at_ingress(ctx) {
            return false;
        }
        (*skb).mark &= !NAT_MARK;
    }
    true
}

/// Why encap leaves a pod packet for a remote pod to the node's stack, if it does: NATed before
/// encap saw it (`PassNat`), or `--deliver stack` (`PassStack`: the stack takes both directions).
/// Either way the stack routes it through `overlay0`, whose encap sends it.
#[inline(always)]
fn to_stack_from_bridge(ctx: &TcContext, cfg: &DataplaneConfig) -> Option<Counter> {
    if take_nat_mark(ctx) {
        return Some(Counter::PassNat);
    }
    if cfg.flags & CONFIG_NO_DELIVER != 0 && at_ingress(ctx) {
        return Some(Counter::PassStack);
    }
    None
}

/// The end both families share: the next hop towards `dst` on the underlay from the FIB, then
/// the pod packet as it is to a DirectRouting peer (on our L2 segment), or, with room made in
/// front of it and `outer` writing the outer headers (given the FIB's answer and the UDP source
/// port from the flow hash), the VXLAN packet.
/// What left (or was dropped on the way) is counted for the member `dst`.
#[inline(always)]
fn route_and_send<F: Deliver>(
    ctx: &TcContext,
    cfg: &DataplaneConfig,
    src: &F::Addr,
    dst: &F::Addr,
    direct: bool,
    hop: Option<[u8; 2]>,
    outer: impl FnOnce(&FibParams, u16) -> Result<(), Counter>,
) -> Result<Verdict, Counter> {
    let r = (|| {
        let mut fib: FibParams = unsafe { core::mem::zeroed() };
        let rc = fib_usable(underlay_next_hop::<F>(ctx, cfg, src, dst, &mut fib))?;
        let out_ifindex = fib.ifindex;
        if direct {
            if let Some(hop) = hop {
                F::forwarded_from(ctx, hop, ETH_LEN)?;
            }
            if cfg.flags & CONFIG_BARE_FAST != 0 {
                plain::mark_sent(ctx);
            }
            return redirect(ctx, rc, &fib, out_ifindex, F::DIRECT);
        }
        // SAFETY: the skb pointer is the program's context.
        let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
        grow_for_vxlan(ctx, F::ENCAP_L3, F::OVERHEAD)?;
        outer(&fib, flow_source_port(hash))?;
        // `hop`'s TTL is written only now, into a header encap has made the packet's own: written
        // before, it would unshare a TCP packet's cloned header once more (bench, veth underlay,
        // TCP 4 flows: 13.2 Gbit/s, 0.63× host-gw, written before encap; 21.3, 1.28×, here).
        if let Some(hop) = hop {
            F::forwarded_from(ctx, hop, ETH_LEN + F::OVERHEAD)?;
        }
        redirect(ctx, rc, &fib, out_ifindex, F::ENCAP)
    })();
    observe::sent::<F>(dst, &r);
    r
}

/// The FIB's next hop on the underlay from `src` to `dst` (our address and a node's) into a
/// zeroed `fib`: the lookup's return code.
#[inline(always)]
pub(crate) fn underlay_next_hop<F: Family>(
    ctx: &TcContext,
    cfg: &DataplaneConfig,
    src: &F::Addr,
    dst: &F::Addr,
    fib: &mut FibParams,
) -> u32 {
    fib.ifindex = cfg.underlay_ifindex;
    // tot_len stays 0: a GSO packet is longer than the MTU until it is segmented, and the
    // FIB's MTU check would refuse it.
    F::fib_addrs(fib, src, dst);
    // SAFETY: fib points to a properly sized bpf_fib_lookup on the caller's stack.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            fib,
            core::mem::size_of::<FibParams>() as i32,
            // We originate the packet. (The kernel still wants forwarding on the NIC.)
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    rc as u32
}

/// The FIB lookup's answer for the outer packet, either family: `rc` when encap can go on (a
/// route, its neighbour resolved or not yet), else why not.
#[inline(always)]
fn fib_usable(rc: u32) -> Result<u32, Counter> {
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH => Ok(rc),
        // A non-GSO packet larger than the underlay MTU even before encapsulation.
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(Counter::DropTooBig),
        _ => Err(Counter::DropNoRoute),
    }
}

/// Room for `overhead` bytes of outer Ethernet, `l3` (`BPF_F_ADJ_ROOM_ENCAP_L3_IPV4` or `_IPV6`),
/// UDP and VXLAN in front of the inner Ethernet frame, with the flags that keep GSO/TSO right
/// (the packet keeps its gso_size; the kernel marks it a UDP tunnel).
#[inline(always)]
pub(crate) fn grow_for_vxlan(ctx: &TcContext, l3: u32, overhead: usize) -> Result<(), Counter> {
    let flags = (BPF_F_ADJ_ROOM_FIXED_GSO | l3 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH)
        as u64
        | ((ETH_LEN as u64) << BPF_ADJ_ROOM_ENCAP_L2_SHIFT);
    ctx.adjust_room(overhead as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| Counter::DropAdjustRoom)
}

/// Sends the (possibly rewritten) frame out of `ifindex`, with MACs from the FIB when the
/// neighbour is known, else letting the kernel resolve it.
#[inline(always)]
fn redirect(
    ctx: &TcContext,
    fib_rc: u32,
    fib: &FibParams,
    ifindex: u32,
    counters: (Counter, Counter),
) -> Result<Verdict, Counter> {
    let len = ctx.len() as u64;
    let action = if fib_rc == BPF_FIB_LKUP_RET_SUCCESS {
        let macs: [u8; 12] = {
            let mut m = [0u8; 12];
            m[..6].copy_from_slice(&fib.dmac);
            m[6..].copy_from_slice(&fib.smac);
            m
        };
        ctx.store(0, &macs, 0).map_err(|_| Counter::DropMalformed)?;
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(ifindex, 0) }
    } else if matches!(counters.0, Counter::EncapPackets | Counter::Encap6Packets) {
        // The neighbour is not resolved yet: the kernel routes the outer packet itself and
        // queues it until ARP answers. No next hop is passed on purpose: with one, the kernel
        // keeps the skb's route, and a packet the node sent through `overlay0` carries the
        // route to the pod via `overlay0`; once ARP answered, the queued packet was sent with
        // `overlay0`'s MAC as both source and destination and never arrived (the node's first
        // packet to a remote pod was lost). Without one, the outer route replaces it.
        // SAFETY: a NULL next hop with length 0 is the helper's documented form.
        unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) }
    } else {
        // DirectRouting: the inner destination (a pod) has no kernel route via the underlay;
        // the FIB lookup's next hop (the peer) says where it goes.
        let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
        nh.nh_family = u32::from(fib.family);
        // SAFETY: reading the union member the FIB lookup filled for its family.
        unsafe {
            if fib.family == AF_INET6 {
                nh.__bindgen_anon_1.ipv6_nh = fib.__bindgen_anon_4.ipv6_dst;
            } else {
                nh.__bindgen_anon_1.ipv4_nh = fib.__bindgen_anon_4.ipv4_dst;
            }
        }
        // SAFETY: nh is a valid bpf_redir_neigh on our stack.
        unsafe {
            bpf_redirect_neigh(
                ifindex,
                &mut nh,
                core::mem::size_of::<bpf_redir_neigh>() as i32,
                0,
            )
        }
    };
    if action as u32 != TC_ACT_REDIRECT {
        return Err(Counter::DropNoRoute);
    }
    Ok(Verdict::counted(TC_ACT_REDIRECT, counters, len))
}
