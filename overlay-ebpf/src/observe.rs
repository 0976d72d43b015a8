//! What an operator sees beyond the counters: traffic per member (`OVL_PEER_STATS`, counted
//! where a packet leaves for a member or is accepted from one) and the drops reported to an
//! attached `overlay-agent monitor` (`OVL_EVENTS`, see `overlay_common::monitor`).
//!
//! The per-member counts are one hash lookup per packet into an entry the agent created; an
//! address without an entry (not a member) counts nowhere. Drop reports are looked at on the
//! drop path only: a packet that is sent, delivered or passed never reads the monitor's maps.

use aya_ebpf::{
    bindings::__sk_buff,
    btf_maps::PerCpuHashMap,
    helpers::generated::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_skb_load_bytes},
    programs::{TcContext, XdpContext},
};
use overlay_common::{
    maps::MAX_PEERS,
    monitor::{take_token, DropEvent, Hook, CAPTURE},
    Counter, PeerStats,
};

use crate::{
    family::Family,
    maps::{OVL_EVENTS, OVL_MONITOR, OVL_MONITOR_STATE},
    verdict::{count, Verdict},
};

/// `OVL_PEER_STATS` / `OVL_PEER_STATS6` (flag 1: `BPF_F_NO_PREALLOC`).
pub(crate) type PeerStatsMap<A> = PerCpuHashMap<A, PeerStats, { MAX_PEERS as usize }, 1>;

/// The coarse monotonic clock (a tick's resolution is plenty for "last seen", and it costs less
/// than `bpf_ktime_get_ns` on every packet).
#[inline(always)]
fn coarse_now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// A packet for member `peer` left (`Ok`, with the bytes it left with) or was dropped on the way.
#[inline(always)]
pub(crate) fn sent<F: Family>(peer: &F::Addr, r: &Result<Verdict, Counter>) {
    let Some(s) = F::PEER_STATS.get_ptr_mut(peer) else {
        return;
    };
    // SAFETY: this CPU's slot of an entry the lookup just returned.
    unsafe {
        match r {
            Ok(v) => {
                (*s).tx_packets += 1;
                (*s).tx_bytes += v.len;
                (*s).tx_last_ns = coarse_now();
            }
            Err(_) => (*s).tx_drops += 1,
        }
    }
}

/// A packet of `len` bytes from member `peer` was accepted.
#[inline(always)]
pub(crate) fn received<F: Family>(peer: &F::Addr, len: u64) {
    let Some(s) = F::PEER_STATS.get_ptr_mut(peer) else {
        return;
    };
    // SAFETY: as in `sent`.
    unsafe {
        (*s).rx_packets += 1;
        (*s).rx_bytes += len;
        (*s).rx_last_ns = coarse_now();
    }
}

/// VXLAN from `peer` was dropped (counted only if `peer` is a member).
#[inline(always)]
pub(crate) fn refused<F: Family>(peer: &F::Addr) {
    if let Some(s) = F::PEER_STATS.get_ptr_mut(peer) {
        // SAFETY: as in `sent`.
        unsafe { (*s).rx_drops += 1 };
    }
}

/// A program's context, as a drop report needs it.
pub(crate) trait Capture {
    fn ifindex(&self) -> u32;
    fn len(&self) -> u32;
    /// Copies the packet's first bytes (at most [`CAPTURE`]) to `to`: how many it copied.
    ///
    /// # Safety
    /// `to` points to [`CAPTURE`] writable bytes.
    unsafe fn copy_to(&self, to: *mut u8) -> u32;
}

impl Capture for TcContext {
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: reading a field of our own context.
        unsafe { (*self.skb.skb).ifindex }
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        self.skb.len()
    }
    /// In a constant size, the largest multiple of 8 the packet has up to [`CAPTURE`] (6.1's
    /// verifier cannot tell a computed length from 0): up to 7 bytes of a short packet's tail
    /// go uncopied.
    #[inline(always)]
    unsafe fn copy_to(&self, to: *mut u8) -> u32 {
        let len = self.skb.len();
        let load = |n: u32| {
            // SAFETY: `n` is at most CAPTURE, the room the caller gave.
            match unsafe { bpf_skb_load_bytes(self.skb.skb as *const _, 0, to as *mut _, n) } {
                0 => n,
                _ => 0,
            }
        };
        macro_rules! largest {
            ($($n:literal)*) => {
                $(if len >= $n {
                    return load($n);
                })*
            };
        }
        const _: () = assert!(CAPTURE == 160);
        largest!(160 152 144 136 128 120 112 104 96 88 80 72 64 56 48 40 32 24 16);
        0
    }
}

impl Capture for XdpContext {
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: reading a field of our own context.
        unsafe { (*self.ctx).ingress_ifindex }
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        (self.data_end() - self.data()) as u32
    }
    /// In 8-byte steps with direct packet access (`bpf_xdp_load_bytes` is Linux 5.18): up to
    /// 7 bytes of a frame's tail can go uncopied.
    #[inline(always)]
    unsafe fn copy_to(&self, to: *mut u8) -> u32 {
        let (start, end) = (self.data(), self.data_end());
        let mut n = 0;
        while n < CAPTURE {
            if start + n + 8 > end {
                break;
            }
            // SAFETY: bounds checked just above; `to` has CAPTURE bytes.
            unsafe { *(to.add(n) as *mut [u8; 8]) = *((start + n) as *const [u8; 8]) };
            n += 8;
        }
        n as u32
    }
}

/// Reports a drop to an attached monitor (see `overlay_common::monitor`): within its lease,
/// for a reason it asked for, and within this CPU's rate; what the rate limit or a full ring
/// keeps back is counted.
#[inline(always)]
pub(crate) fn report<C: Capture>(ctx: &C, hook: Hook, reason: Counter) {
    let Some(m) = OVL_MONITOR.get(0) else { return };
    if m.until_ns == 0 || m.reasons & (1u64 << (reason as u32 & 63)) == 0 {
        return;
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if now >= m.until_ns {
        return;
    }
    let Some(state) = OVL_MONITOR_STATE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot.
    let (next, ok) = take_token(unsafe { *state }, now, m.rate, m.burst);
    // SAFETY: as above.
    unsafe { *state = next };
    if !ok {
        count(Counter::MonitorSuppressed, 1);
        return;
    }
    let Some(mut entry) = OVL_EVENTS.reserve(0) else {
        count(Counter::MonitorLost, 1);
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` is the reserved event, written in place (it does not fit the stack).
    unsafe {
        (*e).ts_ns = now;
        (*e).ifindex = ctx.ifindex();
        (*e).len = ctx.len();
        (*e).reason = reason as u16;
        (*e).hook = hook as u8;
        (*e)._pad = 0;
        (*e).captured = ctx.copy_to((*e).data.as_mut_ptr()) as u8;
    }
    entry.submit(0);
    count(Counter::MonitorEvents, 1);
}

/// [`report`] for a TC program, in a frame of its own.
#[inline(never)]
pub(crate) fn report_tc(skb: *mut __sk_buff, hook: Hook, reason: Counter) {
    report(&TcContext::new(skb), hook, reason)
}

/// [`report`] for the XDP program, in a frame of its own.
#[inline(never)]
pub(crate) fn report_xdp(xdp: *mut aya_ebpf::bindings::xdp_md, reason: Counter) {
    report(&XdpContext::new(xdp), Hook::DecapXdp, reason)
}
