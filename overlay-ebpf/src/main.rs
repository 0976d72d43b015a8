//! The datapath: VXLAN encap on the pod bridge, decap on the underlay NIC.
//!
//! | map            | type          | key                    | value             | written by |
//! |----------------|---------------|------------------------|-------------------|------------|
//! | `OVL_CONFIG`   | array[1]      | 0                      | `DataplaneConfig` | agent      |
//! | `OVL_PEERS`    | LPM trie      | remote pod subnet      | `Peer`            | agent      |
//! | `OVL_VTEPS`    | hash          | peer PublicIP          | `Vtep`            | agent      |
//! | `OVL_ENDPOINTS`| hash          | local pod IPv4         | `Endpoint`        | agent      |
//! | `OVL_ENDPOINT_DEVS` | devmap hash | local pod IPv4   | veth ifindex      | agent; kernel removes gone devices |
//! | `OVL_COUNTERS` | per-CPU array | `Counter` index        | `u64`             | programs   |
//! | `OVL_CONFIG6`  | array[1]      | 0                      | `DataplaneConfig6`| agent      |
//! | `OVL_PEERS6`   | LPM trie      | remote IPv6 pod subnet | `Peer6`           | agent      |
//! | `OVL_VTEPS6`   | hash          | peer PublicIPv6        | `Vtep6`           | agent      |
//! | `OVL_SCRATCH`  | per-CPU array[1] | 0                   | 512 bytes         | programs (scratch) |
//! | `OVL_ENDPOINTS6` | hash        | local pod IPv6         | `Endpoint`        | agent      |
//! | `OVL_ENDPOINT_DEVS6` | devmap hash | veth ifindex       | veth ifindex      | agent; kernel removes gone devices |
//! | `OVL_STACK_FLOWS` | LRU hash   | a reply's 5-tuple      | first seen (ns)   | encap on `overlay0`'s egress |
//! | `OVL_STACK_FLOWS6` | LRU hash  | a reply's IPv6 5-tuple | first seen (ns)   | encap on `overlay0`'s egress |
//!
//! Conntrack: a flow the node's stack routed to a remote pod (a Service's DNAT, a masquerade, a
//! stateful rule) leaves through `overlay0`, where encap records it; decap hands its replies to
//! the stack (whose conntrack entry un-NATs them) instead of delivering them into the pod. Encap
//! on the bridge hands the packets the node's netfilter already NATed (br_netfilter, marked
//! `NAT_MARK` by the agent's nftables rule) to the stack, which routes them through `overlay0`.
//! Fragments and ICMP errors for a local pod always take the stack.
//! Entry points are thin wrappers: the `try_*` functions return a verdict or a named drop
//! reason, which is counted. Header arithmetic lives in `overlay_common::wire`. The same programs
//! carry both families: IPv4 pods over the IPv4 underlay (here), IPv6 pods over the IPv6
//! underlay (`v6.rs`), the two combinations flannel's `flannel.1` and `flannel-v6.1` use.
// Built for bpfel-unknown-none by overlay-agent's build script; on the host (`cargo check
// --workspace`) it compiles as an ordinary binary that does nothing.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup as FibParams, bpf_redir_neigh, xdp_action,
        BPF_ADJ_ROOM_ENCAP_L2_SHIFT, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
        BPF_F_ADJ_ROOM_NO_CSUM_RESET,
    },
    btf_maps::{lpm_trie::Key, Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    helpers::generated::{
        bpf_fib_lookup, bpf_get_hash_recalc, bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh,
        bpf_redirect_peer, bpf_xdp_adjust_head, bpf_xdp_adjust_meta,
    },
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use overlay_common::{
    counters::COUNTER_SLOTS,
    maps::{
        endpoint_dev_key, StackFlow, StackFlow6, CONFIG_DECAP_L4_UDP, CONFIG_DELIVER_VIA_VETH,
        CONFIG_KEEP_CSUM, CONFIG_NO_DELIVER, CONFIG_READY, MAX_ENDPOINTS, MAX_PEERS, MAX_STACK_FLOWS,
        NAT_MARK, PEER_DIRECT,
    },
    wire::{
        encap_header, vxlan_vni, EncapParams, ENCAP_HDR_LEN, ETH_LEN, ETH_P_IP, IPPROTO_ICMP, IPPROTO_TCP,
        IPPROTO_UDP, IPV4_LEN, IP_FRAG_MASK, UDP_LEN, VXLAN_LEN, VXLAN_OVERHEAD,
    },
    Counter, DataplaneConfig, DataplaneConfig6, Endpoint, Peer, Peer6, Vtep, Vtep6,
};

mod v6;

#[btf_map]
static OVL_CONFIG: Array<DataplaneConfig, 1> = Array::new();
#[btf_map]
static OVL_PEERS: LpmTrie<[u8; 4], Peer, { MAX_PEERS as usize }> = LpmTrie::new();
#[btf_map]
static OVL_VTEPS: HashMap<[u8; 4], Vtep, { MAX_PEERS as usize }> = HashMap::new();
#[btf_map]
static OVL_ENDPOINTS: HashMap<[u8; 4], Endpoint, { MAX_ENDPOINTS as usize }> = HashMap::new();
#[btf_map]
static OVL_ENDPOINT_DEVS: DevMapHash<{ MAX_ENDPOINTS as usize }> = DevMapHash::new();
#[btf_map]
static OVL_COUNTERS: PerCpuArray<u64, { COUNTER_SLOTS as usize }> = PerCpuArray::new();
#[btf_map]
static OVL_CONFIG6: Array<DataplaneConfig6, 1> = Array::new();
#[btf_map]
static OVL_PEERS6: LpmTrie<[u8; 16], Peer6, { MAX_PEERS as usize }> = LpmTrie::new();
#[btf_map]
static OVL_VTEPS6: HashMap<[u8; 16], Vtep6, { MAX_PEERS as usize }> = HashMap::new();
/// Per-CPU scratch memory for what does not fit on the 512-byte BPF stack (IPv6 encap sums packet
/// bytes through it).
#[btf_map]
static OVL_SCRATCH: PerCpuArray<[u32; SCRATCH_BYTES / 4], 1> = PerCpuArray::new();
const SCRATCH_BYTES: usize = 512;
#[btf_map]
static OVL_ENDPOINTS6: HashMap<[u8; 16], Endpoint, { MAX_ENDPOINTS as usize }> = HashMap::new();
/// Keyed by the veth's ifindex (`endpoint6_dev_key`): one entry per pod, whatever its addresses.
#[btf_map]
static OVL_ENDPOINT_DEVS6: DevMapHash<{ MAX_ENDPOINTS as usize }> = DevMapHash::new();
/// Replies of flows the stack routed out through `overlay0` (see the module comment).
#[btf_map]
static OVL_STACK_FLOWS: LruHashMap<StackFlow, u64, { MAX_STACK_FLOWS as usize }> = LruHashMap::new();
#[btf_map]
static OVL_STACK_FLOWS6: LruHashMap<StackFlow6, u64, { MAX_STACK_FLOWS as usize }> = LruHashMap::new();

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// Not in the pinned bindings yet (uapi `enum bpf_adj_room_flags`, 1 << 10).
const BPF_F_ADJ_ROOM_DECAP_L4_UDP: u64 = 1 << 10;
// TC verdicts as the u32 the shared plumbing uses (the bindings' types differ between them).
const TC_ACT_OK: u32 = aya_ebpf::bindings::TC_ACT_OK as u32;
const TC_ACT_SHOT: u32 = aya_ebpf::bindings::TC_ACT_SHOT as u32;
const TC_ACT_REDIRECT: u32 = aya_ebpf::bindings::TC_ACT_REDIRECT as u32;
const ETH_P_IP_BE: u16 = ETH_P_IP.to_be();
const ETH_P_IPV6_BE: u16 = overlay_common::wire::ETH_P_IPV6.to_be();
/// XDP metadata that marks a frame XDP decap stripped, for the TC program on the same NIC
/// (after GRO) to deliver it straight to a local pod. Only XDP programs can write metadata.
const DECAPPED_MARK: u32 = 0x4f56_4c31; // "OVL1"

#[inline(always)]
fn count(c: Counter, n: u64) {
    if let Some(p) = OVL_COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *p += n };
    }
}

#[inline(always)]
fn config() -> Result<&'static DataplaneConfig, Counter> {
    match OVL_CONFIG.get(0) {
        Some(c) if c.flags & CONFIG_READY != 0 => Ok(c),
        _ => Err(Counter::DropNoConfig),
    }
}

/// Outcome of a program that did not fail: the verdict and what to count.
struct Verdict {
    action: u32,
    counter: Counter,
    bytes: Option<Counter>,
    len: u64,
}

impl Verdict {
    const fn pass(action: u32, counter: Counter) -> Self {
        Verdict {
            action,
            counter,
            bytes: None,
            len: 0,
        }
    }
}

#[inline(always)]
fn finish(r: Result<Verdict, Counter>, drop_action: u32) -> u32 {
    match r {
        Ok(v) => {
            count(v.counter, 1);
            if let Some(b) = v.bytes {
                count(b, v.len);
            }
            v.action
        }
        Err(reason) => {
            count(reason, 1);
            drop_action
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encap: TC ingress on the pod bridge.
// ---------------------------------------------------------------------------------------------

#[classifier]
pub fn overlay_encap(ctx: TcContext) -> i32 {
    // Each family is a BPF-to-BPF call with its own stack frame: the verifier limits the frames
    // of a call chain to 512 bytes together, and one body holding both families' locals would
    // not fit.
    if let Ok(ETH_P_IPV6_BE) = ctx.load::<u16>(12) {
        return v6::encap6(ctx.skb.skb) as i32;
    }
    encap4(ctx.skb.skb) as i32
}

#[inline(never)]
fn encap4(skb: *mut aya_ebpf::bindings::__sk_buff) -> u32 {
    finish(try_encap(&TcContext::new(skb)), TC_ACT_SHOT)
}

/// The inner IPv4 header, read from the packet.
#[repr(C)]
struct InnerIp {
    ver_ihl: u8,
    tos: u8,
    tot_len: [u8; 2],
    id: [u8; 2],
    frag: [u8; 2],
    ttl: u8,
    proto: u8,
    csum: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

impl InnerIp {
    /// Offset of the L4 header in the frame (bounded for the verifier).
    #[inline(always)]
    fn l4_offset(&self) -> usize {
        ETH_LEN + (usize::from(self.ver_ihl & 0x0f) * 4 & 0x3c)
    }

    /// True for any fragment (first or later): its flow cannot be told from it alone.
    #[inline(always)]
    fn is_fragment(&self) -> bool {
        u16::from_be_bytes(self.frag) & IP_FRAG_MASK != 0
    }
}

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
pub(crate) fn to_stack_from_bridge(ctx: &TcContext, cfg: &DataplaneConfig) -> Option<Counter> {
    if take_nat_mark(ctx) {
        return Some(Counter::PassNat);
    }
    if cfg.flags & CONFIG_NO_DELIVER != 0 && at_ingress(ctx) {
        return Some(Counter::PassStack);
    }
    None
}

/// L4 protocols whose first four bytes are the source and destination ports.
#[inline(always)]
pub(crate) fn has_ports(proto: u8) -> bool {
    matches!(
        proto,
        IPPROTO_TCP | IPPROTO_UDP | 132 /* SCTP */ | 136 /* UDP-Lite */
    )
}

/// The ports at `off` as `[source, destination]` in wire order; zeros for protocols without
/// ports and for a packet too short to hold them (the stack judges those).
#[inline(always)]
pub(crate) fn load_ports(ctx: &TcContext, proto: u8, off: usize) -> [[u8; 2]; 2] {
    if !has_ports(proto) {
        return [[0; 2]; 2];
    }
    ctx.load(off).unwrap_or([[0; 2]; 2])
}

/// Records, on `overlay0`'s egress, the reply of a flow the stack routed to a remote pod.
#[inline(always)]
fn record_stack_flow(ctx: &TcContext, ip: &InnerIp) {
    if ip.is_fragment() {
        // Fragments take the stack on the way back whatever their flow (see `stack_reason`).
        return;
    }
    let [sport, dport] = load_ports(ctx, ip.proto, ip.l4_offset());
    let key = StackFlow {
        remote: ip.dst,
        local: ip.src,
        remote_port: dport,
        local_port: sport,
        proto: ip.proto,
        _pad0: 0,
        _pad1: 0,
    };
    if OVL_STACK_FLOWS.get_ptr(&key).is_none() {
        // SAFETY: plain helper call.
        let now = unsafe { bpf_ktime_get_ns() };
        if OVL_STACK_FLOWS.insert(&key, &now, 0).is_ok() {
            count(Counter::StackFlows, 1);
        }
    }
}

/// Why a decapsulated IPv4 packet for a local pod must take the node's stack, if it must: a
/// reply of a recorded stack flow (its conntrack entry lives here), a fragment, an ICMP error.
#[inline(always)]
fn stack_reason(ctx: &TcContext, ip: &InnerIp) -> Result<Option<Counter>, Counter> {
    if ip.is_fragment() {
        return Ok(Some(Counter::PassFragment));
    }
    let l4 = ip.l4_offset();
    if ip.proto == IPPROTO_ICMP {
        let ty: u8 = ctx.load(l4).map_err(|_| Counter::DropMalformed)?;
        // Destination unreachable, source quench, redirect, time exceeded, parameter problem.
        if matches!(ty, 3 | 4 | 5 | 11 | 12) {
            return Ok(Some(Counter::PassIcmpError));
        }
    }
    let [sport, dport] = load_ports(ctx, ip.proto, l4);
    let key = StackFlow {
        remote: ip.src,
        local: ip.dst,
        remote_port: sport,
        local_port: dport,
        proto: ip.proto,
        _pad0: 0,
        _pad1: 0,
    };
    Ok(OVL_STACK_FLOWS.get_ptr(&key).map(|_| Counter::PassConntrack))
}

#[inline(always)]
fn try_encap(ctx: &TcContext) -> Result<Verdict, Counter> {
    let proto: u16 = ctx.load(12).map_err(|_| Counter::DropMalformed)?;
    if proto != ETH_P_IP_BE {
        return Ok(Verdict::pass(TC_ACT_OK, Counter::PassEncap));
    }
    let ip: InnerIp = ctx.load(ETH_LEN).map_err(|_| Counter::DropMalformed)?;
    let key = Key::new(32, ip.dst);
    let peer = match OVL_PEERS.get(&key) {
        Some(p) => *p,
        None => return Ok(Verdict::pass(TC_ACT_OK, Counter::PassEncap)),
    };
    let cfg = config()?;
    if let Some(pass) = to_stack_from_bridge(ctx, cfg) {
        return Ok(Verdict::pass(TC_ACT_OK, pass));
    }
    if !at_ingress(ctx) {
        record_stack_flow(ctx, &ip);
    }
    let inner_len = ctx.len() - ETH_LEN as u32;
    if peer.flags & PEER_DIRECT == 0 && inner_l3_len(ctx, &ip, inner_len)? > cfg.inner_mtu {
        // Too big for the tunnel (a pod ignoring subnet.env's MTU): the stack routes it via the
        // host device, whose MTU is the tunnel's, and sends ICMP fragmentation-needed for DF
        // packets (PMTU discovery) or fragments the rest, which then come back here.
        return Ok(Verdict::pass(TC_ACT_OK, Counter::PassTooBig));
    }

    // Next hop towards the peer's PublicIP on the underlay.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.ifindex = cfg.underlay_ifindex;
    // tot_len stays 0: a GSO packet is longer than the MTU until it is segmented, and the
    // FIB's MTU check would refuse it.
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(cfg.public_ip);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(peer.public_ip);
    // SAFETY: fib points to a properly sized bpf_fib_lookup on our stack.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            // We originate the outer packet. (The kernel still wants forwarding on the NIC.)
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    let rc = fib_usable(rc as u32)?;
    let out_ifindex = fib.ifindex;

    if peer.flags & PEER_DIRECT != 0 {
        // DirectRouting: the peer is on our L2 segment; forward the pod packet unencapsulated.
        return redirect(
            ctx,
            rc,
            &fib,
            out_ifindex,
            Counter::DirectPackets,
            Counter::DirectBytes,
        );
    }

    // SAFETY: the skb pointer is the program's context.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    grow_for_vxlan(ctx, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, VXLAN_OVERHEAD)?;

    let hdr = encap_header(&EncapParams {
        outer_src_mac: fib.smac,
        outer_dst_mac: fib.dmac,
        src_ip: cfg.public_ip,
        dst_ip: peer.public_ip,
        src_port: overlay_common::wire::flow_source_port(hash),
        dst_port: cfg.port,
        vni: cfg.vni,
        inner_src_mac: cfg.vtep_mac,
        inner_dst_mac: peer.vtep_mac,
        inner_ip_len: inner_len as u16,
        inner_tos: ip.tos,
    });
    ctx.store(0, &hdr, 0).map_err(|_| Counter::DropMalformed)?;
    redirect(
        ctx,
        rc,
        &fib,
        out_ifindex,
        Counter::EncapPackets,
        Counter::EncapBytes,
    )
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
fn grow_for_vxlan(ctx: &TcContext, l3: u32, overhead: usize) -> Result<(), Counter> {
    let flags = (BPF_F_ADJ_ROOM_FIXED_GSO | l3 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH)
        as u64
        | ((ETH_LEN as u64) << BPF_ADJ_ROOM_ENCAP_L2_SHIFT);
    ctx.adjust_room(overhead as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| Counter::DropAdjustRoom)
}

/// Length of the inner IPv4 packets that will be on the wire: the packet itself, or for a GSO
/// packet one segment (gso_size plus its IP and TCP/UDP headers).
#[inline(always)]
fn inner_l3_len(ctx: &TcContext, ip: &InnerIp, inner_len: u32) -> Result<u32, Counter> {
    // SAFETY: reading a field of our own context.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        return Ok(inner_len);
    }
    let ihl = u32::from(ip.ver_ihl & 0x0f) * 4;
    let proto: u8 = ctx.load(ETH_LEN + 9).map_err(|_| Counter::DropMalformed)?;
    let l4 = match proto {
        IPPROTO_TCP => {
            let doff: u8 = ctx
                .load(ETH_LEN + (ihl as usize & 0x3c) + 12)
                .map_err(|_| Counter::DropMalformed)?;
            u32::from(doff >> 4) * 4
        }
        IPPROTO_UDP => UDP_LEN as u32,
        _ => 0,
    };
    Ok(gso_size + ihl + l4)
}

/// Sends the (possibly rewritten) frame out of `ifindex`, with MACs from the FIB when the
/// neighbour is known, else letting the kernel resolve it.
#[inline(always)]
fn redirect(
    ctx: &TcContext,
    fib_rc: u32,
    fib: &FibParams,
    ifindex: u32,
    packets: Counter,
    bytes: Counter,
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
    } else if matches!(packets, Counter::EncapPackets | Counter::Encap6Packets) {
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
    Ok(Verdict {
        action: TC_ACT_REDIRECT,
        counter: packets,
        bytes: Some(bytes),
        len,
    })
}

// ---------------------------------------------------------------------------------------------
// Decap: XDP (or TC) ingress on the underlay NIC.
// ---------------------------------------------------------------------------------------------

/// Outer IPv4 + UDP + VXLAN + inner Ethernet + the inner IPv4 fields decap checks.
#[repr(C)]
struct VxlanFrame {
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    eth_proto: [u8; 2],
    ver_ihl: u8,
    tos: u8,
    tot_len: [u8; 2],
    id: [u8; 2],
    frag: [u8; 2],
    ttl: u8,
    proto: u8,
    csum: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
    udp_sport: [u8; 2],
    udp_dport: [u8; 2],
    udp_len: [u8; 2],
    udp_csum: [u8; 2],
    vxlan: [u8; VXLAN_LEN],
    inner_dst: [u8; 6],
    inner_src_mac: [u8; 6],
    inner_proto: [u8; 2],
    inner_ver_ihl: u8,
    _inner_mid: [u8; 11],
    inner_src: [u8; 4],
    inner_dst_ip: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<VxlanFrame>() == ENCAP_HDR_LEN + IPV4_LEN);

/// Offsets inside [`VxlanFrame`] that are not field-aligned lookups.
const OUTER_L4_END: usize = ETH_LEN + IPV4_LEN + UDP_LEN;

/// What to do with a frame on the underlay, from its first bytes.
enum Classified {
    /// Not VXLAN for us: hand to the stack untouched.
    Pass,
    /// Valid VXLAN from a known peer: strip the outer headers.
    Decap,
}

/// The decap rules, shared by the XDP and TC variants. `frame` holds the first
/// `min(frame_len, size_of::<VxlanFrame>())` bytes; `have` says how many are valid.
#[inline(always)]
fn classify(
    f: &VxlanFrame,
    have: usize,
    frame_len: usize,
    cfg: &DataplaneConfig,
) -> Result<Classified, Counter> {
    if have < ETH_LEN + IPV4_LEN || f.eth_proto != ETH_P_IP.to_be_bytes() {
        return Ok(Classified::Pass);
    }
    if f.proto != IPPROTO_UDP || f.ver_ihl != 0x45 {
        // Not UDP, or IP options: flannel peers never send VXLAN with options.
        return Ok(Classified::Pass);
    }
    if f.dst != cfg.public_ip {
        return Ok(Classified::Pass);
    }
    let frag = u16::from_be_bytes(f.frag) & IP_FRAG_MASK;
    if frag != 0 {
        // Later fragments carry no UDP header; the first one tells the port.
        if frag & 0x1fff == 0 && have >= OUTER_L4_END && u16::from_be_bytes(f.udp_dport) == cfg.port {
            return Err(Counter::DropFragment);
        }
        return Ok(Classified::Pass);
    }
    if have < OUTER_L4_END || u16::from_be_bytes(f.udp_dport) != cfg.port {
        return Ok(Classified::Pass);
    }
    // From here on it is VXLAN for us: anything wrong is dropped.
    let tot_len = u16::from_be_bytes(f.tot_len) as usize;
    let udp_len = u16::from_be_bytes(f.udp_len) as usize;
    if have < core::mem::size_of::<VxlanFrame>()
        || tot_len + ETH_LEN > frame_len
        || udp_len + IPV4_LEN != tot_len
        || tot_len < VXLAN_OVERHEAD + IPV4_LEN
    {
        return Err(Counter::DropMalformed);
    }
    // SAFETY: the hash map value is read once and copied.
    let vtep = match unsafe { OVL_VTEPS.get(f.src) } {
        Some(v) => *v,
        None => return Err(Counter::DropUnknownPeer),
    };
    match vxlan_vni(&f.vxlan) {
        None => return Err(Counter::DropMalformed),
        Some(vni) if vni != cfg.vni => return Err(Counter::DropWrongVni),
        Some(_) => {}
    }
    if f.inner_proto != ETH_P_IP.to_be_bytes() || f.inner_ver_ihl >> 4 != 4 {
        return Err(Counter::DropMalformed);
    }
    if !vtep.contains(f.inner_src) {
        return Err(Counter::DropSpoofedSource);
    }
    Ok(Classified::Decap)
}

#[xdp]
pub fn overlay_decap_xdp(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH_LEN <= end {
        // SAFETY: bounds checked just above.
        let eth = unsafe { &*(start as *const [u8; ETH_LEN]) };
        if [eth[12], eth[13]] == overlay_common::wire::ETH_P_IPV6.to_be_bytes() {
            return v6::decap6_xdp(ctx.ctx);
        }
    }
    decap4_xdp(ctx.ctx)
}

#[inline(never)]
fn decap4_xdp(xdp: *mut aya_ebpf::bindings::xdp_md) -> u32 {
    finish(try_decap_xdp(&XdpContext::new(xdp)), xdp_action::XDP_DROP)
}

#[inline(always)]
fn try_decap_xdp(ctx: &XdpContext) -> Result<Verdict, Counter> {
    let cfg = match config() {
        Ok(c) => c,
        Err(_) => return Ok(Verdict::pass(xdp_action::XDP_PASS, Counter::PassDecap)),
    };
    let start = ctx.data();
    let end = ctx.data_end();
    let frame_len = end - start;
    let full = core::mem::size_of::<VxlanFrame>();
    // Direct packet access needs a constant-size bounds check; shorter frames are classified on
    // a zero-padded copy of what is there.
    let mut short: VxlanFrame = unsafe { core::mem::zeroed() };
    let (f, have): (&VxlanFrame, usize) = if start + full <= end {
        // SAFETY: bounds checked just above.
        (unsafe { &*(start as *const VxlanFrame) }, full)
    } else if start + ETH_LEN + IPV4_LEN <= end {
        // SAFETY: bounds checked just above; copies only the first two headers.
        unsafe {
            core::ptr::copy_nonoverlapping(
                start as *const u8,
                &mut short as *mut _ as *mut u8,
                ETH_LEN + IPV4_LEN,
            );
        }
        (&short, ETH_LEN + IPV4_LEN)
    } else {
        return Ok(Verdict::pass(xdp_action::XDP_PASS, Counter::PassDecap));
    };
    match classify(f, have, frame_len, cfg)? {
        Classified::Pass => Ok(Verdict::pass(xdp_action::XDP_PASS, Counter::PassDecap)),
        Classified::Decap => {
            let inner_len = (frame_len - ENCAP_HDR_LEN) as u64;
            // SAFETY: helper on our own context.
            if unsafe { bpf_xdp_adjust_head(ctx.ctx, VXLAN_OVERHEAD as i32) } != 0 {
                return Err(Counter::DropAdjustRoom);
            }
            let start = ctx.data();
            if start + ETH_LEN > ctx.data_end() {
                return Err(Counter::DropMalformed);
            }
            // The inner frame is addressed to our VtepMAC; the stack wants the NIC's own MAC.
            // SAFETY: bounds checked just above.
            unsafe { (*(start as *mut [u8; 6])) = cfg.underlay_mac };
            mark_decapped(ctx);
            Ok(Verdict {
                action: xdp_action::XDP_PASS,
                counter: Counter::DecapPackets,
                bytes: Some(Counter::DecapBytes),
                len: inner_len + ETH_LEN as u64,
            })
        }
    }
}

/// Tags the frame for [`try_decap_tc`] (best effort: a driver without metadata support just
/// leaves the frame to the stack).
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

/// True when XDP decap stripped this frame (see [`mark_decapped`]).
#[inline(always)]
fn decapped_by_xdp(ctx: &TcContext) -> bool {
    // SAFETY: reading fields of our own context.
    let (meta, data) = unsafe { ((*ctx.skb.skb).data_meta as usize, (*ctx.skb.skb).data as usize) };
    // SAFETY: bounds checked in the same expression.
    meta + 4 <= data && unsafe { *(meta as *const u32) } == DECAPPED_MARK
}

/// A frame XDP decap already stripped (and GRO may have merged): deliver it straight to a
/// local pod when it is one, else leave it to the stack.
#[inline(always)]
fn try_deliver_decapped(ctx: &TcContext, cfg: &DataplaneConfig) -> Result<Verdict, Counter> {
    let stack = Verdict::pass(TC_ACT_OK, Counter::XdpDecapToStack);
    let proto: u16 = ctx.load(12).map_err(|_| Counter::DropMalformed)?;
    if proto != ETH_P_IP_BE {
        return Ok(stack);
    }
    // XDP only marks frames whose inner IPv4 header it checked, so this load cannot fail.
    let ip: InnerIp = ctx.load(ETH_LEN).map_err(|_| Counter::DropMalformed)?;
    Ok(deliver(ctx, cfg, ip.dst)?.unwrap_or(stack))
}

#[classifier]
pub fn overlay_decap_tc(ctx: TcContext) -> i32 {
    // An IPv6 frame is IPv6 VXLAN, or an inner IPv6 frame XDP already stripped; the IPv4 code
    // handles everything else (inner IPv4 frames XDP stripped among them).
    if let Ok(ETH_P_IPV6_BE) = ctx.load::<u16>(12) {
        if decapped_by_xdp(&ctx) {
            return v6::deliver6_decapped(ctx.skb.skb) as i32;
        }
        return v6::decap6_tc(ctx.skb.skb) as i32;
    }
    decap4_tc(ctx.skb.skb) as i32
}

#[inline(never)]
fn decap4_tc(skb: *mut aya_ebpf::bindings::__sk_buff) -> u32 {
    finish(try_decap_tc(&TcContext::new(skb)), TC_ACT_SHOT)
}

#[inline(always)]
fn try_decap_tc(ctx: &TcContext) -> Result<Verdict, Counter> {
    let cfg = match config() {
        Ok(c) => c,
        Err(_) => return Ok(Verdict::pass(TC_ACT_OK, Counter::PassDecap)),
    };
    if decapped_by_xdp(ctx) {
        return try_deliver_decapped(ctx, cfg);
    }
    let frame_len = ctx.len() as usize;
    let mut f: VxlanFrame = unsafe { core::mem::zeroed() };
    let full = core::mem::size_of::<VxlanFrame>();
    let have = if frame_len >= full {
        f = ctx.load(0).map_err(|_| Counter::DropMalformed)?;
        full
    } else if frame_len >= ETH_LEN + IPV4_LEN {
        let head: [u8; ETH_LEN + IPV4_LEN] = ctx.load(0).map_err(|_| Counter::DropMalformed)?;
        // SAFETY: VxlanFrame starts with exactly these bytes.
        unsafe { core::ptr::write(&mut f as *mut _ as *mut [u8; ETH_LEN + IPV4_LEN], head) };
        ETH_LEN + IPV4_LEN
    } else {
        return Ok(Verdict::pass(TC_ACT_OK, Counter::PassDecap));
    };
    match classify(&f, have, frame_len, cfg)? {
        Classified::Pass => Ok(Verdict::pass(TC_ACT_OK, Counter::PassDecap)),
        Classified::Decap => {
            // SAFETY: reading a field of our own context.
            let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
            strip_outer(ctx, cfg, VXLAN_OVERHEAD)?;
            if gso {
                count(Counter::DecapGsoPackets, 1);
            }
            let len = ctx.len() as u64;
            if let Some(v) = deliver(ctx, cfg, f.inner_dst_ip)? {
                count(Counter::DecapPackets, 1);
                count(Counter::DecapBytes, len);
                return Ok(v);
            }
            // To the stack: addressed to the NIC's own MAC, from the sender's VtepMAC, as the
            // XDP variant hands it on.
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&cfg.underlay_mac);
            macs[6..].copy_from_slice(&f.inner_src_mac);
            ctx.store(0, &macs, 0).map_err(|_| Counter::DropMalformed)?;
            Ok(Verdict {
                action: TC_ACT_OK,
                counter: Counter::DecapPackets,
                bytes: Some(Counter::DecapBytes),
                len,
            })
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

/// Hands a decapsulated packet for `dst` straight to a pod on this node, as the node's routing
/// would (TTL decremented, from the bridge's MAC to the pod's), without the bridge or the
/// routing. `None` leaves the packet to the stack: delivery off, not a known endpoint, its veth
/// gone, its TTL expiring (the stack sends time-exceeded), or a packet whose flow depends on the
/// node's conntrack ([`stack_reason`], counted). `v6::deliver6` is the IPv6 twin.
#[inline(always)]
fn deliver(ctx: &TcContext, cfg: &DataplaneConfig, dst: [u8; 4]) -> Result<Option<Verdict>, Counter> {
    const TTL_OFF: usize = ETH_LEN + 8;
    const CSUM_OFF: usize = ETH_LEN + 10;
    if cfg.flags & CONFIG_NO_DELIVER != 0 {
        return Ok(None);
    }
    // SAFETY: the hash map value is read once and copied.
    let Some(ep) = (unsafe { OVL_ENDPOINTS.get(dst) }).copied() else {
        return Ok(None);
    };
    // The veth must still exist: the kernel drops device-map entries of removed devices.
    if OVL_ENDPOINT_DEVS.get_ifindex(endpoint_dev_key(dst)) != Some(ep.ifindex) {
        return Ok(None);
    }
    let ip: InnerIp = ctx.load(ETH_LEN).map_err(|_| Counter::DropMalformed)?;
    if ip.ttl <= 1 {
        return Ok(None);
    }
    if let Some(reason) = stack_reason(ctx, &ip)? {
        count(reason, 1);
        return Ok(None);
    }
    let old = [ip.ttl, ip.proto];
    let new = [ip.ttl - 1, ip.proto];
    ctx.l3_csum_replace(
        CSUM_OFF,
        u16::from_ne_bytes(old) as u64,
        u16::from_ne_bytes(new) as u64,
        2,
    )
    .map_err(|_| Counter::DropMalformed)?;
    ctx.store(TTL_OFF, &new[0], 0)
        .map_err(|_| Counter::DropMalformed)?;
    to_endpoint(ctx, cfg, &ep, Counter::DeliverPackets, Counter::DeliverBytes).map(Some)
}

/// The family-independent end of delivery: the frame readdressed from the bridge's MAC to the
/// pod's and redirected into the pod (`bpf_redirect_peer`) or to its veth (`--deliver veth`).
#[inline(always)]
fn to_endpoint(
    ctx: &TcContext,
    cfg: &DataplaneConfig,
    ep: &Endpoint,
    packets: Counter,
    bytes: Counter,
) -> Result<Verdict, Counter> {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&ep.mac);
    macs[6..].copy_from_slice(&ep.gw_mac);
    ctx.store(0, &macs, 0).map_err(|_| Counter::DropMalformed)?;
    let len = ctx.len() as u64;
    // SAFETY: plain helper calls.
    let action = unsafe {
        if cfg.flags & CONFIG_DELIVER_VIA_VETH != 0 {
            bpf_redirect(ep.ifindex, 0)
        } else {
            bpf_redirect_peer(ep.ifindex, 0)
        }
    };
    if action as u32 != TC_ACT_REDIRECT {
        return Err(Counter::DropNoRoute);
    }
    Ok(Verdict {
        action: TC_ACT_REDIRECT,
        counter: packets,
        bytes: Some(bytes),
        len,
    })
}

/// TC ingress of the receive-GRO device (`overlay-gro`): the kernel's VXLAN socket hands it
/// what decap on the NIC left to the stack; nothing is ever delivered through it.
#[classifier]
pub fn overlay_gro_sink(_ctx: TcContext) -> i32 {
    count(Counter::DropGroDevice, 1);
    TC_ACT_SHOT as i32
}

// ---------------------------------------------------------------------------------------------
// Load-time probe (never attached).
// ---------------------------------------------------------------------------------------------

/// What this kernel's `bpf_skb_adjust_room` takes, as bits ([`overlay_common::probe`]): the
/// agent runs it once (BPF_PROG_TEST_RUN, a 128-byte IPv4 frame) and sets the config from the
/// answer, so no program ever passes a flag its kernel refuses on every packet.
#[classifier]
pub fn overlay_probe(ctx: TcContext) -> i32 {
    let mut found = 0;
    let decap = BPF_F_ADJ_ROOM_FIXED_GSO as u64 | BPF_F_ADJ_ROOM_DECAP_L4_UDP;
    if ctx
        .adjust_room(-(UDP_LEN as i32), BPF_ADJ_ROOM_MAC, decap)
        .is_ok()
    {
        found |= overlay_common::probe::DECAP_L4_UDP;
    }
    // Exactly the encap's call.
    if grow_for_vxlan(&ctx, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, VXLAN_OVERHEAD).is_ok() {
        found |= overlay_common::probe::ENCAP_L2_ETH;
    }
    found
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
