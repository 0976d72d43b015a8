//! Flows that depend on the node's connection tracking. A flow the node's stack routed to a
//! remote pod (a Service's DNAT, a masquerade, a stateful rule) leaves through `overlay0`, where
//! encap records its reply's 5-tuple ([`record`]); delivery hands those replies, and fragments and
//! ICMP errors, to the stack ([`stack_reason`]), whose conntrack un-NATs and reassembles them,
//! instead of delivering them straight into the pod.

use aya_ebpf::{helpers::generated::bpf_ktime_get_ns, programs::TcContext};
use overlay_common::{
    maps::{StackFlow, StackFlow6},
    wire::{IPPROTO_FRAGMENT, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP},
    Counter,
};

use crate::{
    family::{Family, Ipv4Hdr, Ipv6Hdr, V4, V6},
    verdict::count,
};

/// `StackFlow` and `StackFlow6` differ only in the size of their addresses.
macro_rules! flow_key {
    ($key:ident, $remote:expr, $local:expr, $ports:expr, $proto:expr) => {{
        let [remote_port, local_port] = $ports;
        $key {
            remote: $remote,
            local: $local,
            remote_port,
            local_port,
            proto: $proto,
            _pad0: 0,
            _pad1: 0,
        }
    }};
}

pub(crate) trait Conntrack: Family {
    /// The family's ICMP, and which of its types are errors (the stack translates the packet an
    /// error quotes).
    const ICMP: u8;
    fn is_icmp_error(icmp_type: u8) -> bool;
    /// A fragment, first or later: its flow cannot be told from it alone.
    fn is_fragment(ip: &Self::Ip) -> bool;
    /// The key of the family's stack-flow table.
    fn flow(remote: Self::Addr, local: Self::Addr, ports: [[u8; 2]; 2], proto: u8) -> Self::Flow;
}

impl Conntrack for V4 {
    const ICMP: u8 = IPPROTO_ICMP;
    /// Destination unreachable, source quench, redirect, time exceeded, parameter problem.
    #[inline(always)]
    fn is_icmp_error(ty: u8) -> bool {
        matches!(ty, 3 | 4 | 5 | 11 | 12)
    }
    #[inline(always)]
    fn is_fragment(ip: &Ipv4Hdr) -> bool {
        ip.is_fragment()
    }
    #[inline(always)]
    fn flow(remote: [u8; 4], local: [u8; 4], ports: [[u8; 2]; 2], proto: u8) -> StackFlow {
        flow_key!(StackFlow, remote, local, ports, proto)
    }
}

impl Conntrack for V6 {
    const ICMP: u8 = IPPROTO_ICMPV6;
    /// Destination unreachable, packet too big, time exceeded, parameter problem.
    #[inline(always)]
    fn is_icmp_error(ty: u8) -> bool {
        (1..=4).contains(&ty)
    }
    /// Only a Fragment header right after the fixed header counts; extension headers before it
    /// make the flow's key zeros on both sides alike.
    #[inline(always)]
    fn is_fragment(ip: &Ipv6Hdr) -> bool {
        ip.next_header == IPPROTO_FRAGMENT
    }
    #[inline(always)]
    fn flow(remote: [u8; 16], local: [u8; 16], ports: [[u8; 2]; 2], proto: u8) -> StackFlow6 {
        flow_key!(StackFlow6, remote, local, ports, proto)
    }
}

/// L4 protocols whose first four bytes are the source and destination ports.
#[inline(always)]
fn has_ports(proto: u8) -> bool {
    matches!(
        proto,
        IPPROTO_TCP | IPPROTO_UDP | 132 /* SCTP */ | 136 /* UDP-Lite */
    )
}

/// The ports at `off` as `[source, destination]` in wire order; zeros for protocols without
/// ports and for a packet too short to hold them (the stack judges those).
#[inline(always)]
fn load_ports(ctx: &TcContext, proto: u8, off: usize) -> [[u8; 2]; 2] {
    if !has_ports(proto) {
        return [[0; 2]; 2];
    }
    ctx.load(off).unwrap_or([[0; 2]; 2])
}

/// The key of the reply of `ip`'s flow: `ip` itself is the reply (decap), or the packet the
/// reply will answer (encap on `overlay0`).
#[inline(always)]
fn reply_key<F: Conntrack>(ctx: &TcContext, ip: &F::Ip, is_reply: bool) -> F::Flow {
    let (proto, l4) = F::l4(ip);
    let [sport, dport] = load_ports(ctx, proto, l4);
    if is_reply {
        F::flow(F::src(ip), F::dst(ip), [sport, dport], proto)
    } else {
        F::flow(F::dst(ip), F::src(ip), [dport, sport], proto)
    }
}

/// Records, on `overlay0`'s egress, the reply of a flow the stack routed to a remote pod.
/// Fragments are not recorded: they take the stack on the way back whatever their flow.
#[inline(always)]
pub(crate) fn record<F: Conntrack>(ctx: &TcContext, ip: &F::Ip) {
    if F::is_fragment(ip) {
        return;
    }
    let key = reply_key::<F>(ctx, ip, false);
    if F::STACK_FLOWS.get_ptr(&key).is_none() {
        // SAFETY: plain helper call.
        let now = unsafe { bpf_ktime_get_ns() };
        if F::STACK_FLOWS.insert(&key, now, 0).is_ok() {
            count(Counter::StackFlows, 1);
        }
    }
}

/// True when `ip`, a pod's packet on the bridge, belongs to a flow the stack routes (its reply
/// is recorded): it takes the stack as well, both directions alike. A new connection that
/// reuses the ports of a Service connection the stack DNATed to the same pod would otherwise go
/// around the conntrack entry that still holds its reply tuple: the reply, handed to the stack
/// as that entry's, comes back un-DNATed to the wrong socket. Through the stack, conntrack
/// resolves the clash as for any routed connection (a new source port). Fragments are left
/// alone: later ones carry no ports.
#[inline(always)]
pub(crate) fn is_stack_flow<F: Conntrack>(ctx: &TcContext, ip: &F::Ip) -> bool {
    !F::is_fragment(ip) && F::STACK_FLOWS.get_ptr(reply_key::<F>(ctx, ip, false)).is_some()
}

/// Why a decapsulated packet for a local pod must take the node's stack, if it must: a
/// fragment, an ICMP error, a reply of a recorded stack flow (its conntrack entry lives here).
#[inline(always)]
pub(crate) fn stack_reason<F: Conntrack>(ctx: &TcContext, ip: &F::Ip) -> Result<Option<Counter>, Counter> {
    if F::is_fragment(ip) {
        return Ok(Some(Counter::PassFragment));
    }
    let (proto, l4) = F::l4(ip);
    if proto == F::ICMP {
        let ty: u8 = ctx.load(l4).map_err(|_| Counter::DropMalformed)?;
        if F::is_icmp_error(ty) {
            return Ok(Some(Counter::PassIcmpError));
        }
    }
    let key = reply_key::<F>(ctx, ip, true);
    Ok(F::STACK_FLOWS.get_ptr(&key).map(|_| Counter::PassConntrack))
}
