//! `overlay-agent status --watch`: a terminal view of the per-peer traffic, redrawn in place
//! every `--interval` seconds until Ctrl-C: packets and bits per second each way, computed from
//! two successive reads of the pinned maps, when each direction last moved, a peer we send to
//! that does not answer, and the datapath's drop counters that moved.

use std::{
    collections::BTreeMap,
    io::Write,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::Duration,
};

use overlay_common::{
    maps::{CONFIG_HOST_GW, CONFIG_READY},
    Counter,
};

use super::{
    status::StatusError,
    traffic::{self, fmt_ago, fmt_bits_per_sec, Unanswered},
};
use crate::dataplane::{pinned, Counters};

/// Clear the screen and go home (ANSI), before each frame.
pub const CLEAR: &str = "\x1b[H\x1b[2J";

/// One read of what the view shows.
#[derive(Debug, Clone)]
pub struct Reading {
    /// Our PublicIP and backend, once the agent has configured the datapath.
    pub node: Option<(Ipv4Addr, &'static str)>,
    pub traffic: traffic::Sample,
    pub counters: Counters,
}

/// Reads the node's config, the per-peer counts and the datapath counters under `pin_root`.
pub fn read(pin_root: &Path) -> Result<Reading, StatusError> {
    let c = pinned::read_config(pin_root)?;
    let node = (c.flags & CONFIG_READY != 0).then(|| {
        let backend = if c.flags & CONFIG_HOST_GW != 0 {
            "host-gw"
        } else {
            "vxlan"
        };
        (Ipv4Addr::from(c.public_ip), backend)
    });
    Ok(Reading {
        node,
        traffic: traffic::read(pin_root)?,
        counters: pinned::read_pinned_counters(pin_root)?,
    })
}

/// Redraws the view on `out` every `interval` until the process is interrupted. A first read
/// that fails is the error (no datapath pinned there); later ones are shown in the frame and
/// retried (the agent may be restarting).
pub fn run(pin_root: &Path, interval: Duration, out: &mut impl Write) -> Result<(), StatusError> {
    let mut prev = Some(read(pin_root)?);
    let first = render(None, prev.as_ref().expect("just read"), interval);
    draw(out, &first)?;
    loop {
        std::thread::sleep(interval);
        let frame = match read(pin_root) {
            Ok(r) => {
                let f = render(prev.as_ref(), &r, interval);
                prev = Some(r);
                f
            }
            Err(e) => {
                prev = None;
                format!(
                    "overlay-agent status --watch ({}): {e}\nretrying every {}; Ctrl-C quits\n",
                    pin_root.display(),
                    traffic::fmt_duration(interval)
                )
            }
        };
        draw(out, &frame)?;
    }
}

fn draw(out: &mut impl Write, frame: &str) -> Result<(), StatusError> {
    out.write_all(CLEAR.as_bytes())
        .and_then(|()| out.write_all(frame.as_bytes()))
        .and_then(|()| out.flush())
        .map_err(StatusError::Terminal)
}

/// Per second over `secs`; `None` when there is no earlier value or the counter went back (the
/// member was removed and added again meanwhile).
fn rate(prev: Option<u64>, cur: u64, secs: f64) -> Option<f64> {
    let d = cur.checked_sub(prev?)?;
    (secs > 0.0).then(|| d as f64 / secs)
}

/// One frame (without [`CLEAR`]): rates between `prev` and `cur` (`-` on the first frame and
/// for a peer new since `prev`).
pub fn render(prev: Option<&Reading>, cur: &Reading, interval: Duration) -> String {
    let mut s = String::new();
    let node = cur
        .node
        .map_or("not configured yet".to_string(), |(ip, backend)| {
            format!("node {ip} ({backend})")
        });
    s.push_str(&format!(
        "overlay-agent status --watch: {node}, every {}, Ctrl-C quits\n",
        traffic::fmt_duration(interval)
    ));
    let now = cur.traffic.now_ns;
    let secs = prev.map_or(0.0, |p| now.saturating_sub(p.traffic.now_ns) as f64 / 1e9);
    let Some(peers) = &cur.traffic.peers else {
        s.push_str("\nno per-peer counts: the pinned datapath predates them (restart the agent)\n");
        return s;
    };
    let empty = BTreeMap::new();
    let before: &BTreeMap<IpAddr, _> = prev.and_then(|p| p.traffic.peers.as_ref()).unwrap_or(&empty);
    let unanswered = peers
        .values()
        .filter(|t| Unanswered::of(t, now).is_some())
        .count();
    let title = match unanswered {
        0 => format!("peers ({})", peers.len()),
        n => format!("peers ({}, {n} not answering)", peers.len()),
    };
    s.push_str(&format!(
        "\n{title}\n{:<26} {:-^31} {:-^31} {:>7}\n",
        "", " sent ", " heard ", "drops"
    ));
    s.push_str(&format!(
        "  {:<24} {:>8} {:>12} {:>9} {:>8} {:>12} {:>9} {:>7}\n",
        "PublicIP", "pkt/s", "bit/s", "last", "pkt/s", "bit/s", "last", "new"
    ));
    for (ip, t) in peers {
        let b = before.get(ip);
        let pps = |f: fn(&overlay_common::PeerStats) -> u64| {
            rate(b.map(f), f(t), secs).map_or("-".to_string(), |r| format!("{}", r.round() as u64))
        };
        let bps = |f: fn(&overlay_common::PeerStats) -> u64| {
            rate(b.map(f), f(t), secs).map_or("-".to_string(), |r| fmt_bits_per_sec(r * 8.0))
        };
        let last = |ns| fmt_ago(traffic::ago(ns, now)).replace(" ago", "");
        let drops = |t: &overlay_common::PeerStats| t.tx_drops + t.rx_drops;
        let new_drops = b
            .and_then(|b| drops(t).checked_sub(drops(b)))
            .map_or("-".to_string(), |d| d.to_string());
        s.push_str(&format!(
            "  {:<24} {:>8} {:>12} {:>9} {:>8} {:>12} {:>9} {:>7}\n",
            ip.to_string(),
            pps(|t| t.tx_packets),
            bps(|t| t.tx_bytes),
            last(t.tx_last_ns),
            pps(|t| t.rx_packets),
            bps(|t| t.rx_bytes),
            last(t.rx_last_ns),
            new_drops
        ));
        if let Some(u) = Unanswered::of(t, now) {
            s.push_str(&format!("    ! {}\n", u.note()));
        }
    }
    // The datapath's drop counters that moved since the last frame.
    let moved: Vec<String> = match prev {
        None => Vec::new(),
        Some(p) => Counter::ALL
            .into_iter()
            .filter(|c| c.is_drop())
            .filter_map(|c| {
                let d = cur.counters.get(c).checked_sub(p.counters.get(c))?;
                (d > 0).then(|| format!("{} +{d} ({})", c.name(), cur.counters.get(c)))
            })
            .collect(),
    };
    let since = if prev.is_some() {
        format!("in the last {secs:.1}s")
    } else {
        "(from the next frame on)".to_string()
    };
    s.push_str(&format!("\ndatapath drops {since}:"));
    if moved.is_empty() {
        s.push_str(if prev.is_some() { " none\n" } else { " -\n" });
    } else {
        s.push('\n');
        for m in moved {
            s.push_str(&format!("  {m}\n"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use overlay_common::PeerStats;

    use super::*;

    const S: u64 = 1_000_000_000;

    fn reading(now_s: u64, peers: &[(&str, PeerStats)], drops: u64) -> Reading {
        let mut counters = Counters(vec![0; Counter::ALL.len()]);
        counters.0[Counter::DropTooBig as usize] = drops;
        Reading {
            node: Some((Ipv4Addr::new(198, 18, 0, 11), "vxlan")),
            traffic: traffic::Sample {
                now_ns: now_s * S,
                peers: Some(peers.iter().map(|(ip, s)| (ip.parse().unwrap(), *s)).collect()),
            },
            counters,
        }
    }

    fn stats(tx: u64, tx_bytes: u64, tx_last_s: u64, rx: u64, rx_bytes: u64, rx_last_s: u64) -> PeerStats {
        PeerStats {
            tx_packets: tx,
            tx_bytes,
            rx_packets: rx,
            rx_bytes,
            tx_last_ns: tx_last_s * S,
            rx_last_ns: rx_last_s * S,
            tx_drops: 0,
            rx_drops: 0,
        }
    }

    /// The row of `ip`, split on whitespace.
    fn row(frame: &str, ip: &str) -> Vec<String> {
        frame
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{ip} ")))
            .unwrap_or_else(|| panic!("no row for {ip}:\n{frame}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn rates_come_from_two_reads() {
        let a = reading(
            100,
            &[
                ("198.18.0.12", stats(1_000, 148_000, 100, 1_000, 98_000, 100)),
                ("fd00:198:18::12", stats(5, 500, 90, 5, 500, 90)),
            ],
            7,
        );
        let b = reading(
            102,
            &[
                ("198.18.0.12", stats(3_000, 448_000, 102, 1_000, 98_000, 100)),
                ("fd00:198:18::12", stats(5, 500, 90, 5, 500, 90)),
                ("198.18.0.13", stats(1, 100, 102, 0, 0, 0)),
            ],
            10,
        );
        let first = render(None, &a, Duration::from_secs(2));
        assert_eq!(
            row(&first, "198.18.0.12"),
            ["198.18.0.12", "-", "-", "0s", "-", "-", "0s", "-"],
            "{first}"
        );
        let f = render(Some(&a), &b, Duration::from_secs(2));
        // 2,000 packets and 300,000 bytes in 2 s: 1000 pkt/s, 1.2 Mbit/s; nothing back.
        assert_eq!(
            row(&f, "198.18.0.12"),
            [
                "198.18.0.12",
                "1000",
                "1.20",
                "Mbit/s",
                "0s",
                "0",
                "0",
                "bit/s",
                "2s",
                "0"
            ],
            "{f}"
        );
        assert_eq!(
            row(&f, "fd00:198:18::12"),
            [
                "fd00:198:18::12",
                "0",
                "0",
                "bit/s",
                "12s",
                "0",
                "0",
                "bit/s",
                "12s",
                "0"
            ],
            "{f}"
        );
        // New since the last read: no rate yet; sending and never heard back stands out.
        assert_eq!(
            row(&f, "198.18.0.13"),
            ["198.18.0.13", "-", "-", "0s", "-", "-", "never", "-"],
            "{f}"
        );
        assert!(f.contains("! sending, never heard back"), "{f}");
        assert!(f.contains("peers (3, 1 not answering)"), "{f}");
        assert!(
            f.contains("datapath drops in the last 2.0s:\n  drop_too_big +3 (10)\n"),
            "{f}"
        );
        for line in f.lines() {
            assert!(line.len() <= 100, "wider than 100 columns: {line:?}");
        }
        let quiet = render(Some(&b), &b, Duration::from_secs(2));
        assert!(quiet.contains("datapath drops in the last 0.0s: none"), "{quiet}");
        assert_eq!(row(&quiet, "198.18.0.12")[1], "-", "no time passed: no rate");
    }

    #[test]
    fn a_reset_counter_has_no_rate_and_an_old_datapath_says_so() {
        let a = reading(10, &[("198.18.0.12", stats(50, 5_000, 10, 50, 5_000, 10))], 0);
        let b = reading(11, &[("198.18.0.12", stats(3, 300, 11, 3, 300, 11))], 0);
        assert_eq!(
            row(&render(Some(&a), &b, Duration::from_secs(1)), "198.18.0.12")[1],
            "-"
        );
        let mut old = b.clone();
        old.traffic.peers = None;
        assert!(render(Some(&a), &old, Duration::from_secs(1)).contains("no per-peer counts"));
    }
}
