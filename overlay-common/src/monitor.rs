//! Live drop events: what the programs write into the `OVL_EVENTS` ring buffer while
//! `overlay-agent monitor` is attached, and the settings it attaches with (`OVL_MONITOR`).
//!
//! Only the drop path looks at `OVL_MONITOR`: a packet that is sent, delivered or passed never
//! reads it. A drop is reported while `until_ns` lies ahead (the monitor keeps moving it
//! forward, so a monitor killed with SIGKILL stops the reports within [`LEASE_NS`]), its
//! reason's bit is set in `reasons`, and the CPU's token bucket ([`RateState`]) has a token.
//! What the bucket refuses is counted in `monitor_suppressed`, what the full ring refuses in
//! `monitor_lost`; the monitor reports both, so no event goes missing unsaid.

use core::mem::size_of;

/// How far ahead the monitor sets `until_ns` each time it renews it (it renews every second).
pub const LEASE_NS: u64 = 3_000_000_000;

/// Bytes of the packet each event carries (from its first byte): outer Ethernet, IPv6, UDP,
/// VXLAN, inner Ethernet, IPv6 and the inner ports fit (132 bytes).
pub const CAPTURE: usize = 160;

/// Size of the ring buffer (a power of two, a multiple of the page size): 2,048 events.
pub const RING_BYTES: u32 = 512 * 1024;

/// `OVL_MONITOR`'s one entry (key 0), written by the monitor.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorConfig {
    /// CLOCK_MONOTONIC ns (`bpf_ktime_get_ns`) until which drops are reported; 0: never.
    pub until_ns: u64,
    /// Drop reasons reported: bit `i` for the counter with index `i`.
    pub reasons: u64,
    /// Events per second each CPU may report (the bucket's refill rate).
    pub rate: u32,
    /// Events a CPU may report at once after a quiet spell (the bucket's size).
    pub burst: u32,
}
const _: () = assert!(size_of::<MonitorConfig>() == 24);

/// A CPU's token bucket (`OVL_MONITOR_STATE`, per-CPU): tokens in millionths, refilled by
/// `rate` per second of `bpf_ktime_get_ns` since `last_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    pub tokens: u64,
    pub last_ns: u64,
}
const _: () = assert!(size_of::<RateState>() == 16);

/// One token, in [`RateState::tokens`]' unit.
pub const TOKEN: u64 = 1_000_000;

/// The bucket after `now`: refilled at `rate` per second (capped at `burst`), and whether it
/// had a token for this event (then taken). Pure, so the host tests it; the programs run it.
#[inline(always)]
pub fn take_token(state: RateState, now: u64, rate: u32, burst: u32) -> (RateState, bool) {
    let cap = u64::from(burst) * TOKEN;
    let elapsed = now.saturating_sub(state.last_ns);
    // rate ≤ 2^32 and elapsed capped at 4.3 s: the product stays below 2^64.
    let refill = elapsed.min(4_294_967_296) * u64::from(rate) / 1000;
    let tokens = (state.tokens + refill).min(cap);
    if tokens >= TOKEN {
        (
            RateState {
                tokens: tokens - TOKEN,
                last_ns: now,
            },
            true,
        )
    } else {
        (RateState { tokens, last_ns: now }, false)
    }
}

/// Where a program saw the packet it dropped.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// TC on the pod bridge or the host device (`overlay_encap`).
    Encap = 1,
    /// XDP on the underlay NIC (`overlay_decap_xdp`).
    DecapXdp = 2,
    /// TC ingress on the underlay NIC (`overlay_decap_tc`), delivery after XDP included.
    DecapTc = 3,
    /// TC ingress of the receive-GRO device (`overlay_gro_sink`).
    GroSink = 4,
}

impl Hook {
    pub const fn from_u8(v: u8) -> Option<Hook> {
        match v {
            1 => Some(Hook::Encap),
            2 => Some(Hook::DecapXdp),
            3 => Some(Hook::DecapTc),
            4 => Some(Hook::GroSink),
            _ => None,
        }
    }

    /// As `monitor` prints it: the attach type and the program.
    pub const fn name(self) -> &'static str {
        match self {
            Hook::Encap => "tc/encap",
            Hook::DecapXdp => "xdp/decap",
            Hook::DecapTc => "tc/decap",
            Hook::GroSink => "tc/gro-sink",
        }
    }
}

/// One dropped packet, as a program reports it into `OVL_EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when it was dropped.
    pub ts_ns: u64,
    /// The device the program runs on.
    pub ifindex: u32,
    /// The packet's whole length.
    pub len: u32,
    /// The drop reason: a [`crate::Counter`] index.
    pub reason: u16,
    /// [`Hook`].
    pub hook: u8,
    /// How many bytes of `data` are the packet's (the rest is zero).
    pub captured: u8,
    pub _pad: u32,
    /// The packet's first bytes, from its Ethernet header.
    pub data: [u8; CAPTURE],
}
const _: () = assert!(size_of::<DropEvent>() == 24 + CAPTURE);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C), integers only, no implicit padding (size asserted above).
    unsafe impl aya::Pod for MonitorConfig {}
    // SAFETY: repr(C), u64s only (size asserted above).
    unsafe impl aya::Pod for RateState {}
    // SAFETY: repr(C), integers, explicit padding and a byte array, no implicit padding
    // (size asserted above).
    unsafe impl aya::Pod for DropEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_gives_burst_at_once_then_rate_per_second() {
        let (rate, burst) = (100, 10);
        let mut s = RateState {
            tokens: u64::from(burst) * TOKEN,
            last_ns: 1_000_000_000,
        };
        let mut now = s.last_ns;
        let mut taken = 0;
        for _ in 0..50 {
            let (n, ok) = take_token(s, now, rate, burst);
            s = n;
            taken += u32::from(ok);
        }
        assert_eq!(taken, burst, "a burst of {burst} at one instant");
        // One second of 1,000 drops a second: the refill (100), no more.
        taken = 0;
        for _ in 0..1000 {
            now += 1_000_000;
            let (n, ok) = take_token(s, now, rate, burst);
            s = n;
            taken += u32::from(ok);
        }
        assert!(
            (99..=101).contains(&taken),
            "{taken} events in a second at rate {rate}"
        );
        // A long quiet spell refills to the burst only.
        now += 3_600_000_000_000;
        let (n, _) = take_token(s, now, rate, burst);
        assert_eq!(n.tokens, (u64::from(burst) - 1) * TOKEN);
        // A clock that does not move (or a state from the future) gives nothing extra.
        let (n, ok) = take_token(
            RateState {
                tokens: 0,
                last_ns: now + 5,
            },
            now,
            rate,
            burst,
        );
        assert!(!ok && n.tokens == 0);
    }

    #[test]
    fn hooks_round_trip() {
        for h in [Hook::Encap, Hook::DecapXdp, Hook::DecapTc, Hook::GroSink] {
            assert_eq!(Hook::from_u8(h as u8), Some(h));
        }
        assert_eq!(Hook::from_u8(0), None);
    }
}
