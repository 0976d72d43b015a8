//! Per-peer traffic as `status` and `status --watch` show it: the members' counts from the
//! pinned `OVL_PEER_STATS`/`OVL_PEER_STATS6` tables, how long ago each direction last moved,
//! and whether we send to a peer that does not answer.

use std::{collections::BTreeMap, net::IpAddr, path::Path, time::Duration};

use overlay_common::PeerStats;
use serde::Serialize;

use crate::dataplane::{pinned, DataplaneError};

/// A peer whose last packet heard is this much older than the last one sent is not answering.
pub const SILENCE: Duration = Duration::from_secs(5);
/// ...as long as we sent to it this recently (a peer we stopped sending to is idle, not silent).
pub const RECENT: Duration = Duration::from_secs(10);

/// Every member's summed counts (IPv4 and IPv6 PublicIPs), and the coarse clock's now to read
/// their last-seen times against. `peers` is `None` when the pinned datapath has neither table
/// (pinned by a release before per-peer counts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub now_ns: u64,
    pub peers: Option<BTreeMap<IpAddr, PeerStats>>,
}

/// Reads both families' tables under `pin_root` (a missing one is no stats, not an error).
pub fn read(pin_root: &Path) -> Result<Sample, DataplaneError> {
    let peers = pinned::read_member_stats(pin_root)?.map(|v| v.into_iter().collect());
    Ok(Sample {
        now_ns: pinned::coarse_now_ns(),
        peers,
    })
}

/// How long before `now_ns` a last-seen stamp is; `None` for never (0).
pub fn ago(last_ns: u64, now_ns: u64) -> Option<Duration> {
    (last_ns != 0).then(|| Duration::from_nanos(now_ns.saturating_sub(last_ns)))
}

/// We send to a peer and hear nothing back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unanswered {
    /// Nothing ever accepted from it; `sending`: we sent within [`RECENT`].
    Never { sending: bool },
    /// Sending within [`RECENT`], last heard this long ago (at least [`SILENCE`] before the last
    /// packet sent).
    For(Duration),
}

impl Unanswered {
    /// Whether `s` shows a peer we send to that does not answer (see [`SILENCE`], [`RECENT`]).
    pub fn of(s: &PeerStats, now_ns: u64) -> Option<Unanswered> {
        if s.tx_packets == 0 || s.tx_last_ns == 0 {
            return None;
        }
        let sending = ago(s.tx_last_ns, now_ns).is_some_and(|d| d <= RECENT);
        if s.rx_last_ns == 0 {
            return Some(Unanswered::Never { sending });
        }
        let gap = Duration::from_nanos(s.tx_last_ns.saturating_sub(s.rx_last_ns));
        (sending && gap >= SILENCE)
            .then(|| Unanswered::For(Duration::from_nanos(now_ns.saturating_sub(s.rx_last_ns))))
    }

    /// "sending, nothing heard back for 42s", as `status` notes it under the peer.
    pub fn note(self) -> String {
        match self {
            Unanswered::Never { sending: true } => "sending, never heard back".to_string(),
            Unanswered::Never { sending: false } => "sent to it, never heard back".to_string(),
            Unanswered::For(d) => format!("sending, nothing heard back for {}", fmt_duration(d)),
        }
    }
}

/// One member's traffic in `status` (`status --json`: the peer's `traffic`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrafficView {
    /// Packets sent to it (VXLAN, or bare to a direct / host-gw peer) and their bytes as they
    /// left on the underlay.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Packets accepted from it and their bytes once stripped.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Drops attributed to it: on the way out, on the way in.
    pub tx_drops: u64,
    pub rx_drops: u64,
    /// CLOCK_MONOTONIC_COARSE ns of the last packet sent / accepted, 0 for never.
    pub tx_last_ns: u64,
    pub rx_last_ns: u64,
    /// Seconds since then, when `status` read them (`null`: never).
    pub last_sent_secs_ago: Option<f64>,
    pub last_heard_secs_ago: Option<f64>,
    /// We send to it and hear nothing back ([`Unanswered`]).
    pub unanswered: bool,
    /// What `status` notes about it ("sending, nothing heard back for 42s"), if anything.
    pub note: Option<String>,
}

impl TrafficView {
    pub fn of(s: &PeerStats, now_ns: u64) -> Self {
        let unanswered = Unanswered::of(s, now_ns);
        TrafficView {
            tx_packets: s.tx_packets,
            tx_bytes: s.tx_bytes,
            rx_packets: s.rx_packets,
            rx_bytes: s.rx_bytes,
            tx_drops: s.tx_drops,
            rx_drops: s.rx_drops,
            tx_last_ns: s.tx_last_ns,
            rx_last_ns: s.rx_last_ns,
            last_sent_secs_ago: ago(s.tx_last_ns, now_ns).map(|d| d.as_secs_f64()),
            last_heard_secs_ago: ago(s.rx_last_ns, now_ns).map(|d| d.as_secs_f64()),
            unanswered: unanswered.is_some(),
            note: unanswered.map(Unanswered::note),
        }
    }

    /// The line under the peer's row: `tx 1000 pkts 1.13 MB, 2s ago | rx … | drops tx 0 rx 0`.
    pub fn line(&self) -> String {
        let ago = |secs: Option<f64>| fmt_ago(secs.map(Duration::from_secs_f64));
        format!(
            "tx {} pkts {}, {} | rx {} pkts {}, {} | drops tx {} rx {}",
            self.tx_packets,
            fmt_bytes(self.tx_bytes),
            ago(self.last_sent_secs_ago),
            self.rx_packets,
            fmt_bytes(self.rx_bytes),
            ago(self.last_heard_secs_ago),
            self.tx_drops,
            self.rx_drops
        )
    }
}

/// `3s`, `2m05s`, `1h02m`, `3d04h` (whole seconds; under a second is `0s`).
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// `3s ago`, or `never`.
pub fn fmt_ago(d: Option<Duration>) -> String {
    d.map_or_else(|| "never".to_string(), |d| format!("{} ago", fmt_duration(d)))
}

/// `512 B`, `1.50 kB`, `12.3 MB`, `1.00 GB` (powers of 1000, three significant digits).
pub fn fmt_bytes(n: u64) -> String {
    scaled(n as f64, "B")
}

/// `0 bit/s`, `800 bit/s`, `8.00 Mbit/s`.
pub fn fmt_bits_per_sec(bits: f64) -> String {
    scaled(bits, "bit/s")
}

fn scaled(v: f64, unit: &str) -> String {
    const PREFIXES: [&str; 6] = ["", "k", "M", "G", "T", "P"];
    if v < 1000.0 {
        return format!("{} {unit}", v.round() as u64);
    }
    let mut v = v;
    let mut i = 0;
    while v >= 999.5 && i + 1 < PREFIXES.len() {
        v /= 1000.0;
        i += 1;
    }
    let digits = if v >= 99.95 {
        0
    } else if v >= 9.995 {
        1
    } else {
        2
    };
    format!("{v:.digits$} {}{unit}", PREFIXES[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn stats(tx_packets: u64, tx_last_s: u64, rx_packets: u64, rx_last_s: u64) -> PeerStats {
        PeerStats {
            tx_packets,
            tx_bytes: tx_packets * 148,
            rx_packets,
            rx_bytes: rx_packets * 98,
            tx_last_ns: tx_last_s * S,
            rx_last_ns: rx_last_s * S,
            tx_drops: 0,
            rx_drops: 0,
        }
    }

    #[test]
    fn a_peer_that_never_answers_stands_out() {
        let now = 1_000 * S;
        // Both directions moving: fine.
        assert_eq!(Unanswered::of(&stats(10, 999, 10, 999), now), None);
        // Nothing sent: nothing to answer.
        assert_eq!(Unanswered::of(&stats(0, 0, 5, 990), now), None);
        assert_eq!(Unanswered::of(&PeerStats::default(), now), None);
        // Sent, never heard.
        assert_eq!(
            Unanswered::of(&stats(10, 999, 0, 0), now),
            Some(Unanswered::Never { sending: true })
        );
        assert_eq!(
            Unanswered::of(&stats(10, 900, 0, 0), now),
            Some(Unanswered::Never { sending: false })
        );
        // Sending now, last heard 42 s ago.
        let u = Unanswered::of(&stats(10, 1_000, 3, 958), now);
        assert_eq!(u, Some(Unanswered::For(Duration::from_secs(42))));
        assert_eq!(u.unwrap().note(), "sending, nothing heard back for 42s");
        // Heard a moment before the last send (a reply on its way): fine.
        assert_eq!(Unanswered::of(&stats(10, 1_000, 3, 996), now), None);
        // Both went quiet together long ago: idle, not unanswered.
        assert_eq!(Unanswered::of(&stats(10, 900, 3, 800), now), None);
    }

    #[test]
    fn the_traffic_line_and_json() {
        let now = 1_000 * S;
        let v = TrafficView::of(&stats(1000, 998, 0, 0), now);
        assert_eq!(
            v.line(),
            "tx 1000 pkts 148 kB, 2s ago | rx 0 pkts 0 B, never | drops tx 0 rx 0"
        );
        assert!(v.unanswered);
        assert_eq!(v.note.as_deref(), Some("sending, never heard back"));
        let j = serde_json::to_value(&v).unwrap();
        assert_eq!(j["tx_packets"], 1000);
        assert_eq!(j["tx_bytes"], 148_000);
        assert_eq!(j["last_sent_secs_ago"], 2.0);
        assert_eq!(j["last_heard_secs_ago"], serde_json::Value::Null);
        assert_eq!(j["rx_last_ns"], 0);
        assert_eq!(j["unanswered"], true);
    }

    #[test]
    fn human_units() {
        assert_eq!(fmt_bytes(0), "0 B");
        assert_eq!(fmt_bytes(999), "999 B");
        assert_eq!(fmt_bytes(1_000), "1.00 kB");
        assert_eq!(fmt_bytes(1_234_567), "1.23 MB");
        assert_eq!(fmt_bytes(12_345_678), "12.3 MB");
        assert_eq!(fmt_bytes(999_999), "1.00 MB");
        assert_eq!(fmt_bits_per_sec(800.0), "800 bit/s");
        assert_eq!(fmt_bits_per_sec(8_000_000.0), "8.00 Mbit/s");
        assert_eq!(fmt_bits_per_sec(123_456_789_012.0), "123 Gbit/s");
        assert_eq!(fmt_duration(Duration::from_millis(900)), "0s");
        assert_eq!(fmt_duration(Duration::from_secs(42)), "42s");
        assert_eq!(fmt_duration(Duration::from_secs(125)), "2m05s");
        assert_eq!(fmt_duration(Duration::from_secs(3720)), "1h02m");
        assert_eq!(fmt_duration(Duration::from_secs(3 * 86400 + 4 * 3600)), "3d04h");
        assert_eq!(fmt_ago(None), "never");
        assert_eq!(fmt_ago(Some(Duration::from_secs(3))), "3s ago");
    }
}
