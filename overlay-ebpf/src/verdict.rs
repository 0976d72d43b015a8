//! What every program ends with: a [`Verdict`] (or a named drop reason), counted by [`finish`];
//! the counters; the node's config, which no program acts without.

use overlay_common::{maps::CONFIG6_READY, maps::CONFIG_READY, Counter, DataplaneConfig, DataplaneConfig6};

use crate::maps::{OVL_CONFIG, OVL_CONFIG6, OVL_COUNTERS};

// TC verdicts as the u32 the shared plumbing uses (the bindings' types differ between them).
pub(crate) const TC_ACT_OK: u32 = aya_ebpf::bindings::TC_ACT_OK as u32;
pub(crate) const TC_ACT_SHOT: u32 = aya_ebpf::bindings::TC_ACT_SHOT as u32;
pub(crate) const TC_ACT_REDIRECT: u32 = aya_ebpf::bindings::TC_ACT_REDIRECT as u32;

#[inline(always)]
pub(crate) fn count(c: Counter, n: u64) {
    if let Some(p) = OVL_COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *p += n };
    }
}

/// The node's config, once the agent has written it.
#[inline(always)]
pub(crate) fn config() -> Result<&'static DataplaneConfig, Counter> {
    match OVL_CONFIG.get(0) {
        Some(c) if c.flags & CONFIG_READY != 0 => Ok(c),
        _ => Err(Counter::DropNoConfig),
    }
}

/// The IPv6 config, when the agent has written it (an IPv4-only node never does).
#[inline(always)]
pub(crate) fn config6() -> Option<&'static DataplaneConfig6> {
    match OVL_CONFIG6.get(0) {
        Some(c) if c.flags & CONFIG6_READY != 0 => Some(c),
        _ => None,
    }
}

/// Outcome of a program that did not fail: the verdict and what to count.
pub(crate) struct Verdict {
    pub(crate) action: u32,
    pub(crate) counter: Counter,
    pub(crate) bytes: Option<Counter>,
    pub(crate) len: u64,
}

impl Verdict {
    pub(crate) const fn pass(action: u32, counter: Counter) -> Self {
        Verdict {
            action,
            counter,
            bytes: None,
            len: 0,
        }
    }

    /// `action`, counting one packet in `counter` and `len` bytes in `bytes`.
    pub(crate) const fn counted(action: u32, (counter, bytes): (Counter, Counter), len: u64) -> Self {
        Verdict {
            action,
            counter,
            bytes: Some(bytes),
            len,
        }
    }
}

/// Counts the verdict (or the drop reason, which `on_drop` reports to an attached monitor)
/// and returns the action: the end of every entry point.
#[inline(always)]
pub(crate) fn finish(r: Result<Verdict, Counter>, drop_action: u32, on_drop: impl FnOnce(Counter)) -> u32 {
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
            on_drop(reason);
            drop_action
        }
    }
}
