//! host-gw's bare pod packets: what the underlay NIC receives and sends that is not VXLAN.
//!
//! Receive ([`receive`], from TC decap when a frame is not VXLAN for us): a pod packet for a
//! local pod from inside a member's subnet is delivered straight into the pod, as decap delivers
//! a decapsulated one, if its Ethernet source is that member's MAC (the neighbour entry of the
//! member's PublicIP: the sender is the member). Another MAC is dropped (`DropWrongSender`); an
//! unresolved neighbour leaves the packet to the stack (`PassUnverified`). Everything else (a
//! packet from outside the members' subnets, for the node, for a pod not learned yet) is the
//! stack's, routed as plain host-gw routes it.
//!
//! Record ([`record`], TC egress on the underlay NIC): the packets the node's stack routed to a
//! remote pod subnet (the node's own, a Service's DNAT, what encap handed to the stack) have
//! their reply's flow recorded, so delivery hands the replies to the stack, whose conntrack
//! un-NATs them (see `conntrack.rs`). What encap sent bare itself carries [`SENT_MARK`] and is
//! skipped.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS},
    btf_maps::lpm_trie::Key,
    programs::TcContext,
};
use overlay_common::{maps::SENT_MARK, wire::ETH_LEN, Counter, DataplaneConfig, DataplaneConfig6};

use crate::{
    conntrack,
    deliver::{deliver_checked, Deliver},
    encap::underlay_next_hop,
    family::{EthHdr, Family, Ipv4Hdr, Ipv6Hdr, V4, V6},
    maps::{OVL_PEERS, OVL_PEERS6},
    observe,
    verdict::{count, Verdict},
};

pub(crate) trait Plain: Deliver {
    /// The PublicIP of the member whose subnet holds `addr`, if one does.
    fn member(addr: Self::Addr) -> Option<Self::Addr>;
    /// Our PublicIP of the family.
    fn public_ip(cfg: &DataplaneConfig, fcfg: &Self::Config) -> Self::Addr;
    /// A header the fast path takes: the family's version, for IPv4 without options.
    fn simple(ip: &Self::Ip) -> bool;
}

impl Plain for V4 {
    #[inline(always)]
    fn member(addr: [u8; 4]) -> Option<[u8; 4]> {
        OVL_PEERS.get(&Key::new(32, addr)).map(|p| p.public_ip)
    }
    #[inline(always)]
    fn public_ip(cfg: &DataplaneConfig, _: &()) -> [u8; 4] {
        cfg.public_ip
    }
    #[inline(always)]
    fn simple(ip: &Ipv4Hdr) -> bool {
        ip.ver_ihl == 0x45
    }
}

impl Plain for V6 {
    #[inline(always)]
    fn member(addr: [u8; 16]) -> Option<[u8; 16]> {
        OVL_PEERS6.get(&Key::new(128, addr)).map(|p| p.public_ip)
    }
    #[inline(always)]
    fn public_ip(_: &DataplaneConfig, cfg6: &DataplaneConfig6) -> [u8; 16] {
        cfg6.public_ip
    }
    #[inline(always)]
    fn simple(ip: &Ipv6Hdr) -> bool {
        ip.vtc_flow[0] >> 4 == 6
    }
}

/// A frame decap found not to be VXLAN for us, on a host-gw node: delivered straight to a local
/// pod (see the module), or `None` for the stack.
#[inline(always)]
pub(crate) fn receive<F: Plain>(
    ctx: &TcContext,
    cfg: &DataplaneConfig,
    fcfg: &F::Config,
) -> Result<Option<Verdict>, Counter> {
    let eth: EthHdr = ctx.load(0).map_err(|_| Counter::DropMalformed)?;
    // Only frames addressed to the NIC: the stack drops the rest (a promiscuous NIC's).
    if eth.proto != F::ETHERTYPE.to_be_bytes() || eth.dst != cfg.underlay_mac {
        return Ok(None);
    }
    deliver_checked::<F>(ctx, cfg, |ip| {
        if !F::simple(ip) {
            return Ok(false);
        }
        let Some(member) = F::member(F::src(ip)) else {
            return Ok(false);
        };
        let accepted = from_member::<F>(ctx, cfg, &F::public_ip(cfg, fcfg), &member, &eth.src)?;
        if accepted {
            observe::received::<F>(&member, u64::from(ctx.len()));
        }
        Ok(accepted)
    })
}

/// True when `mac` is the member's (`member`, its PublicIP) as the neighbour table has it.
#[inline(always)]
fn from_member<F: Family>(
    ctx: &TcContext,
    cfg: &DataplaneConfig,
    ours: &F::Addr,
    member: &F::Addr,
    mac: &[u8; 6],
) -> Result<bool, Counter> {
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    match underlay_next_hop::<F>(ctx, cfg, ours, member, &mut fib) {
        BPF_FIB_LKUP_RET_SUCCESS if fib.dmac == *mac => Ok(true),
        BPF_FIB_LKUP_RET_SUCCESS => Err(Counter::DropWrongSender),
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            count(Counter::PassUnverified, 1);
            Ok(false)
        }
        _ => Ok(false),
    }
}

/// True for a packet encap sent bare (and marked): its mark goes back to 0 here, on its way out.
#[inline(always)]
pub(crate) fn sent_by_encap(ctx: &TcContext) -> bool {
    // SAFETY: reading a field of our own context.
    if unsafe { (*ctx.skb.skb).mark } != SENT_MARK {
        return false;
    }
    ctx.set_mark(0);
    true
}

/// Encap's side of [`sent_by_encap`].
#[inline(always)]
pub(crate) fn mark_sent(ctx: &TcContext) {
    ctx.set_mark(SENT_MARK);
}

/// Records the reply of a packet of the family the stack routed to a remote pod subnet.
#[inline(always)]
pub(crate) fn record<F: Plain>(ctx: &TcContext) {
    let Ok(proto) = ctx.load::<[u8; 2]>(12) else {
        return;
    };
    if proto != F::ETHERTYPE.to_be_bytes() {
        return;
    }
    let Ok(ip) = ctx.load::<F::Ip>(ETH_LEN) else {
        return;
    };
    if F::member(F::dst(&ip)).is_some() {
        conntrack::record::<F>(ctx, &ip);
    }
}
