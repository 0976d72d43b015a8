//! `overlay-agent monitor`: the datapath's drops, live, as the programs report them into the
//! pinned ring buffer (`OVL_EVENTS`) while a monitor is attached (see
//! `overlay_common::monitor`): time, hook, interface, reason, the outer and inner 5-tuples and
//! the VNI, one line per drop (`--json`: one object per line). What the kernel's rate limit or a
//! full ring kept back is said, never silently lost.

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::IpAddr,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant, SystemTime},
};

use etherparse::{LaxNetSlice, LaxSlicedPacket, TransportSlice};
use overlay_common::{
    monitor::{DropEvent, Hook},
    Counter,
};
use serde::Serialize;

use crate::dataplane::{
    events::{EventRing, EventsError},
    pinned::{self, monotonic_ns},
    DataplaneError,
};

/// What to report, from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub pin_root: PathBuf,
    pub json: bool,
    /// Drop reasons (counter names); empty: all.
    pub reasons: Vec<String>,
    /// Only drops whose outer (or, for a pod's packet, own) addresses include one of these.
    pub peers: Vec<IpAddr>,
    /// Only drops whose inner (or, for a pod's packet, own) addresses include one of these.
    pub pods: Vec<IpAddr>,
    /// Events per second per CPU the kernel may report.
    pub rate: u32,
    pub burst: u32,
    /// Stop after this many reported drops.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(transparent)]
    Events(#[from] EventsError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(
        "--reason {0:?} is not a drop reason; use one of: {list}",
        list = drop_reason_names().join(", ")
    )]
    UnknownReason(String),
    #[error("--rate and --burst must be at least 1 (events per second per CPU, and at once)")]
    ZeroRate,
    #[error("writing to stdout: {0}")]
    Output(#[source] std::io::Error),
}

/// The drop reasons whose bits `mask` has.
fn reason_names(mask: u64) -> Vec<&'static str> {
    Counter::drops()
        .filter(|c| mask & (1 << (*c as u32)) != 0)
        .map(Counter::name)
        .collect()
}

fn drop_reason_names() -> Vec<&'static str> {
    reason_names(u64::MAX)
}

/// The reasons' bits for `MonitorConfig::reasons`: all drop reasons when none is named.
pub fn reason_mask(names: &[String]) -> Result<u64, MonitorError> {
    if names.is_empty() {
        return Ok(Counter::drops().fold(0, |m, c| m | 1 << (c as u32)));
    }
    names.iter().try_fold(0u64, |m, n| {
        let c = Counter::drop_named(n.trim()).ok_or_else(|| MonitorError::UnknownReason(n.clone()))?;
        Ok(m | 1 << (c as u32))
    })
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Runs the monitor until Ctrl-C / SIGTERM, `--count` or `--duration`.
pub fn run(o: &Options, out: &mut impl std::io::Write) -> Result<(), MonitorError> {
    if o.rate == 0 || o.burst == 0 {
        return Err(MonitorError::ZeroRate);
    }
    let reasons = reason_mask(&o.reasons)?;
    let port = pinned::read_config(&o.pin_root)?.port;
    for sig in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        let action = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::Handler(on_signal),
            nix::sys::signal::SaFlags::empty(),
            nix::sys::signal::SigSet::empty(),
        );
        // SAFETY: the handler only stores to an atomic.
        let _ = unsafe { nix::sys::signal::sigaction(sig, &action) };
    }
    let mut ring = EventRing::attach(&o.pin_root, reasons, o.rate, o.burst)?;
    let (mut suppressed0, mut lost0) = ring.kept_back();
    let emit = |out: &mut dyn std::io::Write, line: &str| -> Result<(), MonitorError> {
        writeln!(out, "{line}")
            .and_then(|_| out.flush())
            .map_err(MonitorError::Output)
    };
    let said = if o.json {
        serde_json::json!({"type": "attached", "pin_root": o.pin_root.display().to_string(),
            "reasons": reason_names(reasons), "rate": o.rate, "burst": o.burst})
        .to_string()
    } else {
        format!(
            "# attached to {}: reporting {} at most {}/s per CPU (bursts of {}); Ctrl-C to stop",
            o.pin_root.display(),
            if o.reasons.is_empty() {
                "every drop reason".to_string()
            } else {
                reason_names(reasons).join(", ")
            },
            o.rate,
            o.burst
        )
    };
    emit(out, &said)?;
    let started = Instant::now();
    let mut renewed = Instant::now();
    let mut names = IfNames::default();
    let mut reported = 0u64;
    let filter = Filter {
        peers: &o.peers,
        pods: &o.pods,
    };
    // What the kernel kept back since the last word on it, said when anything was.
    let mut kept_back_since = |ring: &EventRing, out: &mut dyn std::io::Write, since: Duration| {
        let (suppressed, lost) = ring.kept_back();
        let (ds, dl) = (suppressed - suppressed0.min(suppressed), lost - lost0.min(lost));
        (suppressed0, lost0) = (suppressed, lost);
        if ds + dl == 0 {
            return Ok(());
        }
        let line = if o.json {
            serde_json::json!({"type": "kept_back", "suppressed": ds, "lost": dl,
                "seconds": since.as_secs_f64()})
            .to_string()
        } else {
            format!(
                "# {} drops not shown in the last {:.1} s: {ds} over the rate limit \
                 (--rate {}/s per CPU), {dl} lost (ring buffer full)",
                ds + dl,
                since.as_secs_f64(),
                o.rate
            )
        };
        emit(out, &line)
    };
    // Shows what waits in the ring: true once `--count` drops were shown.
    let mut show = |ring: &mut EventRing, out: &mut dyn std::io::Write| -> Result<bool, MonitorError> {
        let mut r = Ok(false);
        ring.drain(|raw| {
            let Some(ev) = DropView::parse(raw, port) else {
                return true;
            };
            if !filter.keeps(&ev) {
                return true;
            }
            if let Err(e) = emit(out, &ev.render(o.json, &mut names)) {
                r = Err(e);
                return false;
            }
            reported += 1;
            if o.count.is_some_and(|n| reported >= n) {
                r = Ok(true);
                return false;
            }
            true
        });
        r
    };
    loop {
        let mut pfd = libc::pollfd {
            fd: ring.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 200) };
        let done = show(&mut ring, &mut *out)?;
        if done || STOP.load(Ordering::SeqCst) || o.duration.is_some_and(|d| started.elapsed() >= d) {
            // Reports off first, then what is still in the ring and what was kept back since
            // the last word on it: the end says everything too.
            ring.detach();
            if !done {
                show(&mut ring, &mut *out)?;
            }
            return kept_back_since(&ring, &mut *out, renewed.elapsed());
        }
        if renewed.elapsed() >= Duration::from_secs(1) {
            ring.renew()?;
            let since = renewed.elapsed();
            renewed = Instant::now();
            kept_back_since(&ring, &mut *out, since)?;
        }
    }
}

#[derive(Default)]
struct IfNames(HashMap<u32, String>);

impl IfNames {
    fn name(&mut self, ifindex: u32) -> String {
        self.0
            .entry(ifindex)
            .or_insert_with(|| {
                let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
                // SAFETY: buf has IF_NAMESIZE bytes, as the call requires.
                let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
                if p.is_null() {
                    format!("if{ifindex}")
                } else {
                    // SAFETY: the call wrote a NUL-terminated name into buf.
                    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
                        .to_string_lossy()
                        .into_owned()
                }
            })
            .clone()
    }
}

/// An IP packet's addresses and ports, as far as the capture shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// `tcp`, `udp`, `icmp`, `icmpv6` or the protocol number.
    pub proto: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
}

impl Tuple {
    fn of(p: &LaxSlicedPacket) -> Option<Tuple> {
        let (src, dst, proto): (IpAddr, IpAddr, u8) = match p.net.as_ref()? {
            LaxNetSlice::Ipv4(ip) => {
                let h = ip.header();
                (
                    h.source_addr().into(),
                    h.destination_addr().into(),
                    h.protocol().0,
                )
            }
            LaxNetSlice::Ipv6(ip) => {
                let h = ip.header();
                (
                    h.source_addr().into(),
                    h.destination_addr().into(),
                    ip.payload().ip_number.0,
                )
            }
            LaxNetSlice::Arp(_) => return None,
        };
        let (name, sport, dport) = match &p.transport {
            Some(TransportSlice::Udp(u)) => (
                "udp".to_string(),
                Some(u.source_port()),
                Some(u.destination_port()),
            ),
            Some(TransportSlice::Tcp(t)) => (
                "tcp".to_string(),
                Some(t.source_port()),
                Some(t.destination_port()),
            ),
            Some(TransportSlice::Icmpv4(_)) => ("icmp".to_string(), None, None),
            Some(TransportSlice::Icmpv6(_)) => ("icmpv6".to_string(), None, None),
            _ => (
                match proto {
                    6 => "tcp".into(),
                    17 => "udp".into(),
                    1 => "icmp".into(),
                    58 => "icmpv6".into(),
                    n => n.to_string(),
                },
                None,
                None,
            ),
        };
        Some(Tuple {
            src,
            dst,
            proto: name,
            sport,
            dport,
        })
    }

    fn show(&self) -> String {
        let end = |ip: &IpAddr, port: Option<u16>| match (ip, port) {
            (IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
            (a, Some(p)) => format!("{a}:{p}"),
            (a, None) => a.to_string(),
        };
        format!(
            "{} > {} {}",
            end(&self.src, self.sport),
            end(&self.dst, self.dport),
            self.proto
        )
    }

    fn has(&self, ip: &IpAddr) -> bool {
        self.src == *ip || self.dst == *ip
    }
}

/// A drop event, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DropView {
    /// CLOCK_MONOTONIC ns when the program dropped it.
    pub mono_ns: u64,
    pub hook: &'static str,
    pub ifindex: u32,
    pub reason: &'static str,
    pub len: u32,
    /// The VXLAN datagram's outer header (the packet itself for a pod's packet that was never
    /// encapsulated is `inner`).
    pub outer: Option<Tuple>,
    pub vni: Option<u32>,
    pub inner: Option<Tuple>,
}

impl DropView {
    /// Decodes one ring buffer record (`port`: the node's VXLAN port).
    pub fn parse(raw: &[u8], port: u16) -> Option<DropView> {
        if raw.len() < std::mem::size_of::<DropEvent>() {
            return None;
        }
        // SAFETY: length checked; DropEvent is plain old data, read unaligned.
        let e: DropEvent = unsafe { std::ptr::read_unaligned(raw.as_ptr() as *const DropEvent) };
        let reason = Counter::from_index(u32::from(e.reason))?.name();
        let hook = Hook::from_u8(e.hook).map_or("?", Hook::name);
        let data = &e.data[..usize::from(e.captured).min(e.data.len())];
        let (outer, vni, inner) = decode(data, port);
        Some(DropView {
            mono_ns: e.ts_ns,
            hook,
            ifindex: e.ifindex,
            reason,
            len: e.len,
            outer,
            vni,
            inner,
        })
    }

    fn render(&self, json: bool, names: &mut IfNames) -> String {
        let iface = names.name(self.ifindex);
        let wall = wall_clock(self.mono_ns);
        if json {
            let mut v = serde_json::to_value(self).expect("serializable");
            v["type"] = "drop".into();
            v["iface"] = iface.into();
            v["time"] = wall.into();
            return v.to_string();
        }
        let mut s = format!(
            "{wall} {:<11} {:<9} {:<20} len {}",
            self.hook, iface, self.reason, self.len
        );
        if let Some(o) = &self.outer {
            let _ = write!(s, " outer {}", o.show());
        }
        if let Some(v) = self.vni {
            let _ = write!(s, " vni {v}");
        }
        if let Some(i) = &self.inner {
            let _ = write!(s, " inner {}", i.show());
        }
        s
    }
}

/// What the capture shows: the outer header and VNI of VXLAN to `port`, and the inner packet
/// (or the packet itself when it is not VXLAN).
fn decode(data: &[u8], port: u16) -> (Option<Tuple>, Option<u32>, Option<Tuple>) {
    let Ok(p) = LaxSlicedPacket::from_ethernet(data) else {
        return (None, None, None);
    };
    let me = Tuple::of(&p);
    if let Some(TransportSlice::Udp(u)) = &p.transport {
        let vxlan = u.payload();
        if u.destination_port() == port && vxlan.len() >= 8 {
            let vni = u32::from_be_bytes([0, vxlan[4], vxlan[5], vxlan[6]]);
            let inner = LaxSlicedPacket::from_ethernet(&vxlan[8..])
                .ok()
                .and_then(|i| Tuple::of(&i));
            return (me, Some(vni), inner);
        }
    }
    (None, None, me)
}

/// `mono_ns` as UTC wall-clock time (the clocks' offset now).
fn wall_clock(mono_ns: u64) -> String {
    let ago = Duration::from_nanos(monotonic_ns().saturating_sub(mono_ns));
    let t = SystemTime::now() - ago;
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:06}", d.subsec_micros())
}

struct Filter<'a> {
    peers: &'a [IpAddr],
    pods: &'a [IpAddr],
}

impl Filter<'_> {
    fn keeps(&self, ev: &DropView) -> bool {
        let outer_or_own = ev.outer.as_ref().or(ev.inner.as_ref());
        let peer_ok =
            self.peers.is_empty() || self.peers.iter().any(|p| outer_or_own.is_some_and(|t| t.has(p)));
        let pod_ok = self.pods.is_empty()
            || self
                .pods
                .iter()
                .any(|p| ev.inner.as_ref().is_some_and(|t| t.has(p)));
        peer_ok && pod_ok
    }
}

#[cfg(test)]
mod tests {
    use etherparse::PacketBuilder;

    use super::*;

    fn pod_packet(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(src, dst, 64)
            .udp(sport, dport)
            .write(&mut v, &[0u8; 32])
            .unwrap();
        v
    }

    fn event(reason: Counter, hook: Hook, pkt: &[u8]) -> Vec<u8> {
        let mut e = DropEvent {
            ts_ns: 5,
            ifindex: 1,
            len: pkt.len() as u32,
            reason: reason as u16,
            hook: hook as u8,
            captured: pkt.len().min(overlay_common::monitor::CAPTURE) as u8,
            _pad: 0,
            data: [0; overlay_common::monitor::CAPTURE],
        };
        let n = usize::from(e.captured);
        e.data[..n].copy_from_slice(&pkt[..n]);
        // SAFETY: plain old data viewed as its bytes.
        unsafe {
            std::slice::from_raw_parts(
                &e as *const DropEvent as *const u8,
                std::mem::size_of::<DropEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn a_vxlan_drop_shows_outer_vni_and_inner_even_truncated() {
        let inner = pod_packet([10, 244, 2, 5], [10, 244, 1, 3], 5353, 53);
        let mut vxlan = vec![0x08, 0, 0, 0, 0, 0, 7, 0];
        vxlan.extend_from_slice(&inner);
        let mut outer = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 3], [2, 0, 0, 0, 0, 4])
            .ipv4([198, 18, 0, 12], [198, 18, 0, 11], 64)
            .udp(40000, 8472)
            .write(&mut outer, &vxlan)
            .unwrap();
        assert!(outer.len() > overlay_common::monitor::CAPTURE - 40);
        let ev = DropView::parse(&event(Counter::DropWrongVni, Hook::DecapXdp, &outer), 8472).unwrap();
        assert_eq!(ev.reason, "drop_wrong_vni");
        assert_eq!(ev.hook, "xdp/decap");
        assert_eq!(ev.vni, Some(7));
        let o = ev.outer.clone().unwrap();
        assert_eq!((o.src.to_string().as_str(), o.dport), ("198.18.0.12", Some(8472)));
        let i = ev.inner.clone().unwrap();
        assert_eq!(i.show(), "10.244.2.5:5353 > 10.244.1.3:53 udp");
        let peer: IpAddr = "198.18.0.12".parse().unwrap();
        let pod: IpAddr = "10.244.1.3".parse().unwrap();
        let other: IpAddr = "10.244.9.9".parse().unwrap();
        assert!(Filter {
            peers: &[peer],
            pods: &[pod]
        }
        .keeps(&ev));
        assert!(!Filter {
            peers: &[],
            pods: &[other]
        }
        .keeps(&ev));
        assert!(!Filter {
            peers: &[pod],
            pods: &[]
        }
        .keeps(&ev));
    }

    #[test]
    fn a_pod_packet_dropped_at_encap_is_its_own_inner_tuple() {
        let p = pod_packet([10, 244, 1, 3], [198, 18, 0, 12], 1234, 8472);
        let ev = DropView::parse(&event(Counter::DropPodVxlan, Hook::Encap, &p), 9999).unwrap();
        assert_eq!(ev.outer, None);
        assert_eq!(ev.vni, None);
        assert_eq!(ev.inner.unwrap().show(), "10.244.1.3:1234 > 198.18.0.12:8472 udp");
    }

    #[test]
    fn reasons_are_checked_by_name() {
        assert_eq!(
            reason_mask(&["drop_wrong_vni".into()]).unwrap(),
            1 << (Counter::DropWrongVni as u32)
        );
        let all = reason_mask(&[]).unwrap();
        assert!(all & (1 << Counter::DropInnerMac as u32) != 0);
        assert!(all & (1 << Counter::PassTtl as u32) == 0);
        let e = reason_mask(&["pass_ttl".into()]).unwrap_err().to_string();
        assert!(
            e.contains("not a drop reason") && e.contains("drop_wrong_vni"),
            "{e}"
        );
    }
}
