//! What the BPF_PROG_TEST_RUN tiers (IPv4 and IPv6) share: the kernel's verdict values, counter
//! arithmetic, and the fuzz runs' random source.

use std::collections::BTreeMap;

use overlay_agent::dataplane::Counters;
use overlay_common::Counter;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// How much counter `c` grew between two readings.
pub fn delta(before: &Counters, after: &Counters, c: Counter) -> u64 {
    after.get(c) - before.get(c)
}

/// Every counter that moved between two readings, and by how much.
pub fn moved(before: &Counters, after: &Counters) -> Vec<(&'static str, u64)> {
    Counter::ALL
        .iter()
        .filter(|c| after.get(**c) != before.get(**c))
        .map(|c| (c.name(), after.get(*c) - before.get(*c)))
        .collect()
}

/// xorshift64*: deterministic, seedable, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `0..n` for picking mutations.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Pads `frame` to the header its ethertype promises (Ethernet + IPv4 or IPv6), which
/// BPF_PROG_TEST_RUN requires of a TC program's skb (XDP takes runts as they are). True when it
/// padded.
pub fn pad_for_skb_test_run(frame: &mut Vec<u8>) -> bool {
    let min = match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => 34,
        0x86dd => 54,
        _ => 14,
    };
    if frame.len() >= min {
        return false;
    }
    frame.resize(min, 0);
    true
}

/// Every (program, verdict class) in `wanted` came up at least `min` times in a fuzz run's `hits`:
/// a generator change that sends nearly everything to one verdict (PASS, say) fails here instead
/// of passing thousands of trivial runs.
pub fn assert_every_class_hit(hits: &BTreeMap<(&str, &str), u32>, wanted: &[(&str, Counter)], min: u32) {
    let thin: Vec<_> = wanted
        .iter()
        .map(|(prog, c)| {
            (
                *prog,
                c.name(),
                hits.get(&(*prog, c.name())).copied().unwrap_or(0),
            )
        })
        .filter(|(_, _, n)| *n < min)
        .collect();
    assert!(
        thin.is_empty(),
        "verdict classes hit fewer than {min} times: {thin:?}; all: {hits:?}"
    );
}
