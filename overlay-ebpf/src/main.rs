//! The datapath: VXLAN encap on the pod bridge, decap on the underlay NIC, delivery straight
//! into the pods; for host-gw, the same hooks with bare pod packets. This file holds the entry points only: each dispatches by EtherType to a
//! BPF-to-BPF call per family, whose result (a verdict, or a named drop reason) is counted.
//!
//! | file           | concern |
//! |----------------|---------|
//! | `maps.rs`      | every map, in one table: name, type, key, value, who writes it |
//! | `verdict.rs`   | `Verdict`, `finish` (count and return), the counters, the node's config |
//! | `family.rs`    | `V4`/`V6`: the family vocabulary, the IP headers |
//! | `encap.rs`     | encap: each family's checks side by side, the route and the send written once |
//! | `csum6.rs`     | the IPv6 outer UDP checksum and resegmenting (no IPv4 twin) |
//! | `decap.rs`     | decap: each family's rules side by side, the XDP and TC hooks written once |
//! | `deliver.rs`   | delivery of decapsulated packets straight into local pods |
//! | `conntrack.rs` | the flows that must take the node's stack (recorded, recognised) |
//! | `plain.rs`     | host-gw: bare pod packets received (delivered) and routed out (recorded) |
//! | `observe.rs`   | traffic per member, drop reports for an attached monitor |
//!
//! The same programs carry both families: IPv4 pods over the IPv4 underlay and IPv6 pods over
//! the IPv6 underlay, the two combinations flannel's `flannel.1` and `flannel-v6.1` use. Header
//! arithmetic lives in `overlay_common::wire`.
// Built for bpfel-unknown-none by overlay-agent's build script; on the host (`cargo check
// --workspace`) it compiles as an ordinary binary that does nothing.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod conntrack;
mod csum6;
mod decap;
mod deliver;
mod encap;
mod family;
mod maps;
mod observe;
mod plain;
mod verdict;

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_FIXED_GSO,
    },
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use overlay_common::{
    monitor::Hook,
    wire::{ETH_LEN, ETH_P_IPV6, UDP_LEN, VXLAN_OVERHEAD},
    Counter,
};

use crate::{
    decap::{decapped_by_xdp, Decap, NotVxlan, BPF_F_ADJ_ROOM_DECAP_L4_UDP},
    deliver::Deliver,
    encap::{grow_for_vxlan, Encap},
    family::{V4, V6},
    observe::{report_tc, report_xdp},
    plain::Plain,
    verdict::{config, finish, Verdict, TC_ACT_OK, TC_ACT_SHOT},
};

const ETH_P_IPV6_BE: u16 = ETH_P_IPV6.to_be();

// Each family is a BPF-to-BPF call with its own stack frame (`#[inline(never)]`, one instance
// per family): the verifier limits the frames of a call chain to 512 bytes together, and one
// body holding both families' locals would not fit.

/// TC ingress on the pod bridge (and `overlay0`'s egress and ingress).
#[classifier]
pub fn overlay_encap(ctx: TcContext) -> i32 {
    if let Ok(ETH_P_IPV6_BE) = ctx.load::<u16>(12) {
        return encap::<V6>(ctx.skb.skb) as i32;
    }
    encap::<V4>(ctx.skb.skb) as i32
}

#[inline(never)]
fn encap<F: Encap>(skb: *mut aya_ebpf::bindings::__sk_buff) -> u32 {
    finish(F::try_encap(&TcContext::new(skb)), TC_ACT_SHOT, |r| {
        report_tc(skb, Hook::Encap, r)
    })
}

/// XDP on the underlay NIC.
#[xdp]
pub fn overlay_decap_xdp(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH_LEN <= end {
        // SAFETY: bounds checked just above.
        let eth = unsafe { &*(start as *const [u8; ETH_LEN]) };
        if [eth[12], eth[13]] == ETH_P_IPV6.to_be_bytes() {
            return decap_xdp::<V6>(ctx.ctx);
        }
    }
    decap_xdp::<V4>(ctx.ctx)
}

#[inline(never)]
fn decap_xdp<F: Decap>(xdp: *mut aya_ebpf::bindings::xdp_md) -> u32 {
    finish(
        decap::xdp::<F>(&XdpContext::new(xdp)),
        xdp_action::XDP_DROP,
        |r| report_xdp(xdp, r),
    )
}

/// TC ingress on the underlay NIC: VXLAN to strip, or (after XDP decap and GRO) an inner frame
/// XDP marked, to deliver. An IPv6 frame is IPv6 VXLAN or an inner IPv6 frame; the IPv4 call
/// handles everything else (inner IPv4 frames XDP stripped among them).
#[classifier]
pub fn overlay_decap_tc(ctx: TcContext) -> i32 {
    let v6 = matches!(ctx.load::<u16>(12), Ok(ETH_P_IPV6_BE));
    let skb = ctx.skb.skb;
    let r = match (v6, decapped_by_xdp(&ctx)) {
        (true, true) => deliver_decapped::<V6>(skb),
        (true, false) => match decap_tc::<V6>(skb) {
            BARE => receive_bare::<V6>(skb),
            r => r,
        },
        (false, true) => deliver_decapped::<V4>(skb),
        (false, false) => match decap_tc::<V4>(skb) {
            BARE => receive_bare::<V4>(skb),
            r => r,
        },
    };
    r as i32
}

/// What `decap_tc` answers for a bare frame on a host-gw node (no TC action has this value):
/// the entry point hands it to `receive_bare`, each in a frame of its own (the verifier's
/// 512 bytes are for a call chain, and decap's frame is large).
const BARE: u32 = u32::MAX;

#[inline(never)]
fn decap_tc<F: Decap>(skb: *mut aya_ebpf::bindings::__sk_buff) -> u32 {
    match decap::tc::<F>(&TcContext::new(skb)) {
        Ok(v) => finish(Ok(v), TC_ACT_SHOT, |_| {}),
        Err(NotVxlan::Drop(reason)) => finish(Err(reason), TC_ACT_SHOT, |r| report_tc(skb, Hook::DecapTc, r)),
        Err(NotVxlan::Bare) => BARE,
    }
}

/// host-gw: a frame that is not VXLAN, maybe a member's pod packet for a local pod.
#[inline(never)]
fn receive_bare<F: Plain>(skb: *mut aya_ebpf::bindings::__sk_buff) -> u32 {
    let ctx = TcContext::new(skb);
    let stack = Verdict::pass(TC_ACT_OK, Counter::PassDecap);
    let r = match (config(), F::config()) {
        (Ok(cfg), Some(fcfg)) => plain::receive::<F>(&ctx, cfg, fcfg).map(|v| v.unwrap_or(stack)),
        _ => Ok(stack),
    };
    finish(r, TC_ACT_SHOT, |r| report_tc(skb, Hook::DecapTc, r))
}

/// TC egress on the underlay NIC (host-gw): records the flows the node's stack routed to
/// remote pods; every packet goes on unchanged.
#[classifier]
pub fn overlay_record(ctx: TcContext) -> i32 {
    if plain::sent_by_encap(&ctx) {
        return TC_ACT_OK as i32;
    }
    if let Ok(ETH_P_IPV6_BE) = ctx.load::<u16>(12) {
        return record::<V6>(ctx.skb.skb) as i32;
    }
    record::<V4>(ctx.skb.skb) as i32
}

#[inline(never)]
fn record<F: Plain>(skb: *mut aya_ebpf::bindings::__sk_buff) -> u32 {
    plain::record::<F>(&TcContext::new(skb));
    TC_ACT_OK
}

#[inline(never)]
fn deliver_decapped<F: Deliver>(skb: *mut aya_ebpf::bindings::__sk_buff) -> u32 {
    let ctx = TcContext::new(skb);
    let r = match config() {
        Ok(cfg) => deliver::decapped::<F>(&ctx, cfg),
        Err(_) => Ok(Verdict::pass(TC_ACT_OK, Counter::PassDecap)),
    };
    finish(r, TC_ACT_SHOT, |r| report_tc(skb, Hook::DecapTc, r))
}

/// TC ingress of the receive-GRO device (`overlay-gro`): the kernel's VXLAN socket hands it
/// what decap on the NIC left to the stack; nothing is ever delivered through it.
#[classifier]
pub fn overlay_gro_sink(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    finish(Err(Counter::DropGroDevice), TC_ACT_SHOT, |r| {
        report_tc(skb, Hook::GroSink, r)
    }) as i32
}

/// Load-time probe (never attached): what this kernel's `bpf_skb_adjust_room` takes, as bits
/// ([`overlay_common::probe`]). The agent runs it once (BPF_PROG_TEST_RUN, a 128-byte IPv4
/// frame) and sets the config from the answer, so no program ever passes a flag its kernel
/// refuses on every packet.
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
