//! Delivery straight to the pod: a decapsulated packet for a pod on this node goes into the pod
//! (`bpf_redirect_peer`, or `bpf_redirect` to its veth with `--deliver veth`) as the node's
//! routing would hand it on (TTL or hop limit decremented, from the bridge's MAC to the pod's),
//! without the bridge or the routing. Everything else is left to the stack.

use aya_ebpf::{
    helpers::generated::{bpf_redirect, bpf_redirect_peer},
    programs::TcContext,
};
use overlay_common::{
    maps::{endpoint6_dev_key, endpoint_dev_key, CONFIG_DELIVER_VIA_VETH, CONFIG_NO_DELIVER},
    wire::ETH_LEN,
    Counter, DataplaneConfig, Endpoint,
};

use crate::{
    conntrack::{stack_reason, Conntrack},
    family::{Ipv4Hdr, Ipv6Hdr, V4, V6},
    verdict::{count, Verdict, TC_ACT_OK, TC_ACT_REDIRECT},
};

pub(crate) trait Deliver: Conntrack {
    /// Writes `hop_limit - 1` into the packet's IP header at `at` (and mends what covers it).
    #[inline(always)]
    fn forwarded(ctx: &TcContext, ip: &Self::Ip, at: usize) -> Result<(), Counter> {
        Self::forwarded_from(ctx, Self::hop_word(ip), at)
    }
    /// What [`Deliver::forwarded`] needs of the header, as plain bytes (no reference to it
    /// crosses into encap's sending code): the TTL and protocol, or the hop limit.
    fn hop_word(ip: &Self::Ip) -> [u8; 2];
    /// [`Deliver::forwarded`] from [`Deliver::hop_word`].
    fn forwarded_from(ctx: &TcContext, hop: [u8; 2], at: usize) -> Result<(), Counter>;
    /// `ep`'s key in the device map of the family's veths (`ENDPOINT_DEVS`), whose entries the
    /// kernel deletes with the device.
    fn dev_key(addr: Self::Addr, ep: &Endpoint) -> u32;
}

impl Deliver for V4 {
    /// Keyed by the pod's IPv4 address.
    #[inline(always)]
    fn dev_key(addr: [u8; 4], _ep: &Endpoint) -> u32 {
        endpoint_dev_key(addr)
    }
    /// The TTL and the header checksum over it.
    #[inline(always)]
    fn hop_word(ip: &Ipv4Hdr) -> [u8; 2] {
        [ip.ttl, ip.proto]
    }
    #[inline(always)]
    fn forwarded_from(ctx: &TcContext, old: [u8; 2], at: usize) -> Result<(), Counter> {
        let (ttl_off, csum_off) = (at + 8, at + 10);
        let new = [old[0] - 1, old[1]];
        ctx.l3_csum_replace(
            csum_off,
            u16::from_ne_bytes(old) as u64,
            u16::from_ne_bytes(new) as u64,
            2,
        )
        .map_err(|_| Counter::DropMalformed)?;
        ctx.store(ttl_off, &new[0], 0).map_err(|_| Counter::DropMalformed)
    }
}

impl Deliver for V6 {
    /// Keyed by the veth's ifindex: an IPv6 address does not fit the device map's `u32` key.
    #[inline(always)]
    fn dev_key(_addr: [u8; 16], ep: &Endpoint) -> u32 {
        endpoint6_dev_key(ep.ifindex)
    }
    /// IPv6 has no header checksum to patch.
    #[inline(always)]
    fn hop_word(ip: &Ipv6Hdr) -> [u8; 2] {
        [ip.hop_limit, 0]
    }
    #[inline(always)]
    fn forwarded_from(ctx: &TcContext, hop: [u8; 2], at: usize) -> Result<(), Counter> {
        ctx.store(at + 7, &(hop[0] - 1), 0)
            .map_err(|_| Counter::DropMalformed)
    }
}

/// Whether a packet's TTL (hop limit) runs out at this node, a router hop for what it forwards
/// (decap's delivery, and encap of what the bridge hands over): the stack gets it, to answer
/// Time Exceeded (traceroute shows this node).
#[inline(always)]
pub(crate) fn expires_here<F: Deliver>(ip: &F::Ip) -> bool {
    F::hop_limit(ip) <= 1
}

/// Hands a decapsulated packet (the frame starts with its inner Ethernet header) straight to a
/// pod on this node. `None` leaves the packet to the stack: delivery off, not a known endpoint,
/// its veth gone, its TTL or hop limit expiring here (the stack sends time-exceeded), or a packet
/// whose flow depends on the node's conntrack ([`stack_reason`], counted).
#[inline(always)]
pub(crate) fn deliver<F: Deliver>(
    ctx: &TcContext,
    cfg: &DataplaneConfig,
) -> Result<Option<Verdict>, Counter> {
    deliver_checked::<F>(ctx, cfg, |_| Ok(true))
}

/// [`deliver`], asking `sender_ok` once the packet is for a known endpoint (before anything is
/// written) whether its sender may reach the pod straight: `false` leaves it to the stack, an
/// error drops it (host-gw's bare packets, `plain.rs`).
#[inline(always)]
pub(crate) fn deliver_checked<F: Deliver>(
    ctx: &TcContext,
    cfg: &DataplaneConfig,
    sender_ok: impl FnOnce(&F::Ip) -> Result<bool, Counter>,
) -> Result<Option<Verdict>, Counter> {
    if cfg.flags & CONFIG_NO_DELIVER != 0 {
        return Ok(None);
    }
    let ip: F::Ip = ctx.load(ETH_LEN).map_err(|_| Counter::DropMalformed)?;
    let dst = F::dst(&ip);
    // SAFETY: the hash map value is read once and copied.
    let Some(ep) = (unsafe { F::ENDPOINTS.get(dst) }).copied() else {
        return Ok(None);
    };
    // The veth must still exist: the kernel drops device-map entries of removed devices.
    if F::ENDPOINT_DEVS.get_ifindex(F::dev_key(dst, &ep)) != Some(ep.ifindex) {
        return Ok(None);
    }
    if !sender_ok(&ip)? {
        return Ok(None);
    }
    if expires_here::<F>(&ip) {
        return Ok(None);
    }
    if let Some(reason) = stack_reason::<F>(ctx, &ip)? {
        count(reason, 1);
        return Ok(None);
    }
    F::forwarded(ctx, &ip, ETH_LEN)?;
    to_endpoint(ctx, cfg, &ep, F::DELIVER).map(Some)
}

/// A frame XDP decap already stripped (and GRO may have merged): delivered straight to a local
/// pod when it is one, else left to the stack.
#[inline(always)]
pub(crate) fn decapped<F: Deliver>(ctx: &TcContext, cfg: &DataplaneConfig) -> Result<Verdict, Counter> {
    let stack = Verdict::pass(TC_ACT_OK, Counter::XdpDecapToStack);
    // XDP marks only frames of its own family; this is for anything else GRO could hand on.
    let proto: u16 = ctx.load(12).map_err(|_| Counter::DropMalformed)?;
    if proto != F::ETHERTYPE.to_be() {
        return Ok(stack);
    }
    Ok(deliver::<F>(ctx, cfg)?.unwrap_or(stack))
}

/// The end of delivery: the frame readdressed from the bridge's MAC to the pod's and redirected
/// into the pod (`bpf_redirect_peer`) or to its veth (`--deliver veth`).
#[inline(always)]
fn to_endpoint(
    ctx: &TcContext,
    cfg: &DataplaneConfig,
    ep: &Endpoint,
    counters: (Counter, Counter),
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
    Ok(Verdict::counted(TC_ACT_REDIRECT, counters, len))
}
