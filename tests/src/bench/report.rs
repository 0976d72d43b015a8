//! Medians, ratios, the terminal table, the JSON record and a hand-written SVG bar chart.

use std::{collections::BTreeMap, fmt::Write as _};

use crate::{
    beds::{Case, Flavour},
    control::ControlResults,
    traffic::{median, percentile},
};

/// (key, label, unit, higher is better)
pub const METRICS: &[(&str, &str, &str, bool)] = &[
    ("tcp1_gbps", "TCP 1 flow", "Gbit/s", true),
    ("tcp4_gbps", "TCP 4 flows", "Gbit/s", true),
    ("svc_tcp1_gbps", "TCP 1 flow via a ClusterIP", "Gbit/s", true),
    ("udp64_kpps", "UDP 64 B received", "kpps", true),
    ("rr_mean_us", "TCP RR mean", "µs", false),
    ("rr_p99_us", "TCP RR p99", "µs", false),
    ("cpu1_s_per_gbit", "CPU/Gbit, 1 flow", "sys+softirq s", false),
    ("cpu4_s_per_gbit", "CPU/Gbit, 4 flows", "sys+softirq s", false),
    ("retr1", "retransmits, 1 flow", "segs", false),
    ("retr4", "retransmits, 4 flows", "segs", false),
];

/// Every sample: (flavour, case, metric) → one value per round (NaN = that run failed).
#[derive(Default)]
pub struct Samples(pub BTreeMap<(&'static str, &'static str, &'static str), Vec<f64>>);

impl Samples {
    pub fn push(&mut self, f: Flavour, c: Case, metric: &'static str, v: f64) {
        self.0.entry((f.name(), c.name(), metric)).or_default().push(v);
    }

    pub fn median(&self, f: Flavour, c: Case, metric: &str) -> f64 {
        self.0
            .iter()
            .find(|((ff, cc, m), _)| *ff == f.name() && *cc == c.name() && *m == metric)
            .map(|(_, v)| median(v))
            .unwrap_or(f64::NAN)
    }

    /// Whether case `c` was measured at all in this run (`--cases` may leave it out).
    pub fn ran(&self, c: Case) -> bool {
        self.0.keys().any(|(_, cc, _)| *cc == c.name())
    }

    fn failures(&self, f: Flavour, c: Case, metric: &str) -> usize {
        self.0
            .iter()
            .find(|((ff, cc, m), _)| *ff == f.name() && *cc == c.name() && *m == metric)
            .map(|(_, v)| v.iter().filter(|x| !x.is_finite()).count())
            .unwrap_or(0)
    }
}

fn fmt_v(v: f64) -> String {
    if !v.is_finite() {
        "FAIL".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn ratio(v: f64, base: f64) -> f64 {
    if base.is_finite() && base != 0.0 {
        v / base
    } else {
        f64::NAN
    }
}

fn fmt_r(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}")
    } else {
        "-".into()
    }
}

/// " 2✗" when `n` of a cell's rounds failed.
fn fail_mark(n: usize) -> String {
    if n > 0 {
        format!(" {n}✗")
    } else {
        String::new()
    }
}

/// The terminal table: medians per flavour, with ratios to (a) host-gw and (b) kernel VXLAN for
/// the IPv4 cases, to (b6) the kernel's IPv6 VXLAN for the IPv6 ones. A case left out of the run
/// shows "-", a value that could not be computed "FAIL".
pub fn table(s: &Samples, rounds: u32, cp: Option<&ControlResults>, cold_ms: &[f64]) -> String {
    let mut out = String::new();
    let v4 = Case::ALL.iter().any(|&c| !c.ipv6() && s.ran(c));
    let v6 = Case::ALL.iter().any(|&c| c.ipv6() && s.ran(c));
    // A case that did not run: "-" instead of FAIL.
    let val = |f: Flavour, c: Case, key: &str| {
        if s.ran(c) {
            fmt_v(s.median(f, c, key))
        } else {
            "-".to_string()
        }
    };
    for f in Flavour::ALL.into_iter().filter(|_| v4) {
        let _ = writeln!(
            out,
            "\n{} underlay — medians of {rounds} round(s); (×a ×b) = ratio to host-gw / kernel VXLAN",
            f.name()
        );
        let mut head = format!("{:<34}{:>12}{:>22}", "metric", "host-gw (a)", "kernel-vxlan (b)");
        for c in Case::BPF {
            let _ = write!(head, "{:>26}", c.name());
        }
        let _ = writeln!(out, "{head}");
        for (key, label, unit, _) in METRICS {
            let a = s.median(f, Case::HostGw, key);
            let b = s.median(f, Case::KernelVxlan, key);
            let mut row = format!("{:<34}", format!("{label} [{unit}]"));
            let _ = write!(row, "{:>12}", val(f, Case::HostGw, key));
            let _ = write!(
                row,
                "{:>22}",
                format!("{} (×a {})", val(f, Case::KernelVxlan, key), fmt_r(ratio(b, a)))
            );
            for c in Case::BPF {
                let v = s.median(f, c, key);
                let mark = fail_mark(s.failures(f, c, key));
                let cell = if s.ran(c) {
                    format!(
                        "{} ({} {}){mark}",
                        fmt_v(v),
                        fmt_r(ratio(v, a)),
                        fmt_r(ratio(v, b))
                    )
                } else {
                    "-".to_string()
                };
                let _ = write!(row, "{cell:>26}");
            }
            let _ = writeln!(out, "{row}");
        }
    }
    for f in Flavour::ALL.into_iter().filter(|_| v6) {
        let _ = writeln!(
            out,
            "\n{} underlay, IPv6 pods over an IPv6 underlay — medians of {rounds} round(s); (×b6) = ratio to kernel VXLAN over IPv6",
            f.name()
        );
        let mut head = format!("{:<34}{:>22}", "metric", "kernel-vxlan6 (b6)");
        for c in Case::BPF6 {
            let _ = write!(head, "{:>26}", c.name());
        }
        let _ = writeln!(out, "{head}");
        for (key, label, unit, _) in METRICS {
            let b6 = s.median(f, Case::KernelVxlan6, key);
            let mut row = format!("{:<34}", format!("{label} [{unit}]"));
            let mark = fail_mark(s.failures(f, Case::KernelVxlan6, key));
            let _ = write!(
                row,
                "{:>22}",
                format!("{}{mark}", val(f, Case::KernelVxlan6, key))
            );
            for c in Case::BPF6 {
                let v = s.median(f, c, key);
                let mark = fail_mark(s.failures(f, c, key));
                let cell = if s.ran(c) {
                    format!("{} (×b6 {}){mark}", fmt_v(v), fmt_r(ratio(v, b6)))
                } else {
                    "-".to_string()
                };
                let _ = write!(row, "{cell:>26}");
            }
            let _ = writeln!(out, "{row}");
        }
    }
    if let Some(cp) = cp {
        control_table(&mut out, cp);
    }
    if !cold_ms.is_empty() {
        let _ = writeln!(
            out,
            "  cold start → first forwarded ping (xdp)  {:>8.0} ms median of {}",
            median(cold_ms),
            cold_ms.len()
        );
    }
    // The targets are the IPv4 cases' (and the control plane's).
    if !v4 && cp.is_none() {
        return out;
    }
    let mut head = format!("\ntargets{:>40}", "");
    for c in Case::BPF {
        let _ = write!(head, "{:>16}", c.name());
    }
    let _ = writeln!(out, "{head}");
    let goal = |out: &mut String, name: &str, vals: [f64; Case::BPF.len()], ok: &dyn Fn(f64) -> bool| {
        let fmt = |v: f64| {
            if v.is_finite() {
                format!("{v:.3} {}", if ok(v) { "ok" } else { "MISS" })
            } else {
                "-".into()
            }
        };
        let mut row = format!("  {name:<44}");
        for v in vals {
            let _ = write!(row, " {:>15}", fmt(v));
        }
        let _ = writeln!(out, "{row}");
    };
    // A target of the agent as a whole: one value, in the first column.
    let one = |v: f64| {
        let mut vals = [f64::NAN; Case::BPF.len()];
        vals[0] = v;
        vals
    };
    let vs =
        |f: Flavour, m: &str, base: Case| Case::BPF.map(|c| ratio(s.median(f, c, m), s.median(f, base, m)));
    let a = |f: Flavour, m: &str| vs(f, m, Case::HostGw);
    for (name, f, m, ok) in [
        (
            "veth TCP 1 flow ≥ 0.95×a",
            Flavour::Veth,
            "tcp1_gbps",
            (|v| v >= 0.95) as fn(f64) -> bool,
        ),
        ("veth TCP 4 flows ≥ 0.95×a", Flavour::Veth, "tcp4_gbps", |v| {
            v >= 0.95
        }),
        ("veth UDP 64 B ≥ 0.95×a", Flavour::Veth, "udp64_kpps", |v| {
            v >= 0.95
        }),
        ("veth RR mean ≤ 1.05×a", Flavour::Veth, "rr_mean_us", |v| {
            v <= 1.05
        }),
        (
            "veth CPU per Gbit (1 flow) ≤ 1.1×a",
            Flavour::Veth,
            "cpu1_s_per_gbit",
            |v| v <= 1.1,
        ),
        (
            "NIC-emulation TCP 1 flow ≥ 0.85×a (aim)",
            Flavour::Nic,
            "tcp1_gbps",
            |v| v >= 0.85,
        ),
        (
            "NIC-emulation UDP 64 B ≥ 0.95×a",
            Flavour::Nic,
            "udp64_kpps",
            |v| v >= 0.95,
        ),
        (
            "NIC-emulation RR mean ≤ 1.05×a",
            Flavour::Nic,
            "rr_mean_us",
            |v| v <= 1.05,
        ),
    ]
    .into_iter()
    .filter(|_| v4)
    {
        goal(&mut out, name, a(f, m), &ok);
    }
    if v4 {
        goal(
            &mut out,
            "NIC-emulation TCP 1 flow ≥ 1.0×b",
            vs(Flavour::Nic, "tcp1_gbps", Case::KernelVxlan),
            &|v| v >= 1.0,
        );
    }
    if let Some(cp) = cp {
        let n = thousands(cp.peers);
        goal(
            &mut out,
            &format!("{n} peers in the map ≤ 2 s after start [s]"),
            one(cp.start_ms / 1e3),
            &|v| v <= 2.0,
        );
        let p99 = percentile(&cp.lease_to_map_ms, 99.0);
        goal(
            &mut out,
            &format!("lease → map p99 at {n} peers ≤ 50 ms"),
            one(p99),
            &|v| v <= 50.0,
        );
        let rss = cp
            .churn
            .as_ref()
            .map_or(cp.rss_kb_peers, |ch| ch.rss_kb.max(cp.rss_kb_peers))
            .max(cp.rss_kb_started);
        goal(
            &mut out,
            &format!("RSS with {n} peers ≤ 40 MB"),
            one(rss / 1024.0),
            &|v| v <= 40.0,
        );
    }
    out
}

/// 5000 → "5,000".
fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// The control plane's lines of the table.
fn control_table(out: &mut String, cp: &ControlResults) {
    let n = thousands(cp.peers);
    let _ = writeln!(out, "\ncontrol plane (real agent, etcd 3.4 on the underlay)");
    let row = |out: &mut String, label: String, value: String| {
        let _ = writeln!(out, "  {label:<54}{value}");
    };
    row(
        out,
        format!("{n} leases written ({} txns)", cp.peers.div_ceil(100)),
        format!("{:.0} ms", cp.write_ms),
    );
    row(
        out,
        format!("{n} peers in the BPF map after"),
        format!("{:.0} ms (from the first write, agent running)", cp.sync_ms),
    );
    row(
        out,
        format!("one lease → map, p50 / p99 (n={})", cp.lease_to_map_ms.len()),
        format!(
            "{:.1} / {:.1} ms (includes the etcd write)",
            percentile(&cp.lease_to_map_ms, 50.0),
            percentile(&cp.lease_to_map_ms, 99.0)
        ),
    );
    if let Some(ch) = &cp.churn {
        let st = &ch.stats;
        row(
            out,
            "churn: changes written / seconds".into(),
            format!(
                "{} / {:.1} s ({:.0}/s; a move, a delete, an add in turn; compaction + defrag half-way)",
                st.changes,
                st.secs,
                f64::from(st.changes) / st.secs
            ),
        );
        let p50_99 = |v: &[f64], note: &str| {
            format!(
                "{:.1} / {:.1} ms (n={}{note})",
                percentile(v, 50.0),
                percentile(v, 99.0),
                v.len()
            )
        };
        row(
            out,
            "churn: put → map, p50 / p99".into(),
            p50_99(&st.put_ms, "; from etcd's answer"),
        );
        row(
            out,
            "churn: delete → gone, p50 / p99".into(),
            p50_99(
                &st.delete_ms,
                "; from etcd's answer, includes the 500 ms hold-down",
            ),
        );
        row(
            out,
            "churn: never seen in the map (30 s)".into(),
            st.unseen.len().to_string(),
        );
        row(
            out,
            "churn: agent CPU / log lines".into(),
            format!("{:.2} s / {}", ch.cpu_s, ch.log_lines),
        );
        row(
            out,
            "churn: map = etcd afterwards".into(),
            match ch.converged_ms {
                Some(ms) => format!("yes, {ms:.0} ms after the last change"),
                None => format!("NO: {} entries differ after 20 s", ch.differences),
            },
        );
    }
    row(
        out,
        format!(
            "agent started over {} leases → all in the map",
            thousands(cp.started_peers)
        ),
        format!("{:.0} ms (nothing pinned before)", cp.start_ms),
    );
    row(
        out,
        format!("agent RSS idle / {n} peers / after churn / started"),
        format!(
            "{:.1} / {:.1} / {} / {:.1} MB",
            cp.rss_kb_idle / 1024.0,
            cp.rss_kb_peers / 1024.0,
            cp.churn
                .as_ref()
                .map_or("-".into(), |ch| format!("{:.1}", ch.rss_kb / 1024.0)),
            cp.rss_kb_started / 1024.0
        ),
    );
}

/// The whole run as JSON: raw samples, medians, ratios, control plane, errors, machine.
pub fn json(
    s: &Samples,
    cp: Option<&ControlResults>,
    cold_ms: &[f64],
    errors: &[String],
    meta: serde_json::Value,
) -> serde_json::Value {
    let mut samples = serde_json::Map::new();
    let mut medians = serde_json::Map::new();
    for ((f, c, m), v) in &s.0 {
        let vals: Vec<serde_json::Value> = v
            .iter()
            .map(|x| {
                if x.is_finite() {
                    (*x).into()
                } else {
                    serde_json::Value::Null
                }
            })
            .collect();
        let key = format!("{f}/{c}/{m}");
        samples.insert(key.clone(), vals.into());
        let md = median(v);
        medians.insert(
            key,
            if md.is_finite() {
                md.into()
            } else {
                serde_json::Value::Null
            },
        );
    }
    let ratios = ratios_json(s);
    let control = cp.map(|cp| {
        let churn = cp.churn.as_ref().map(|ch| {
            serde_json::json!({
                "changes": ch.stats.changes,
                "secs": ch.stats.secs,
                "put_to_map_p50_ms": percentile(&ch.stats.put_ms, 50.0),
                "put_to_map_p99_ms": percentile(&ch.stats.put_ms, 99.0),
                "delete_to_gone_p50_ms": percentile(&ch.stats.delete_ms, 50.0),
                "delete_to_gone_p99_ms": percentile(&ch.stats.delete_ms, 99.0),
                "unseen": ch.stats.unseen,
                "agent_cpu_s": ch.cpu_s,
                "agent_log_lines": ch.log_lines,
                "converged_ms": ch.converged_ms,
                "differences": ch.differences,
                "rss_kb": ch.rss_kb,
            })
        });
        serde_json::json!({
            "peers": cp.peers,
            "write_ms": cp.write_ms,
            "sync_ms": cp.sync_ms,
            "lease_to_map_ms": cp.lease_to_map_ms,
            "lease_to_map_p50_ms": percentile(&cp.lease_to_map_ms, 50.0),
            "lease_to_map_p99_ms": percentile(&cp.lease_to_map_ms, 99.0),
            "churn": churn,
            "start_ms": cp.start_ms,
            "started_peers": cp.started_peers,
            "rss_kb_idle": cp.rss_kb_idle,
            "rss_kb_peers": cp.rss_kb_peers,
            "rss_kb_started": cp.rss_kb_started,
        })
    });
    serde_json::json!({
        "meta": meta,
        "samples": samples,
        "medians": medians,
        "ratios": ratios,
        "control_plane": control,
        "cold_start_ms": cold_ms,
        "errors": errors,
    })
}

/// The ratios the table shows, keyed like the medians ("veth/bpf-tc/tcp1_gbps"): each IPv4 case
/// to host-gw and kernel-vxlan, each IPv6 agent case to kernel-vxlan6; null when a median is
/// missing.
fn ratios_json(s: &Samples) -> serde_json::Value {
    let num = |r: f64| {
        if r.is_finite() {
            r.into()
        } else {
            serde_json::Value::Null
        }
    };
    let mut out = serde_json::Map::new();
    for f in Flavour::ALL {
        for (key, ..) in METRICS {
            let mut add = |c: Case, bases: &[Case]| {
                if !s.ran(c) {
                    return;
                }
                let v = s.median(f, c, key);
                let by_base: serde_json::Map<String, serde_json::Value> = bases
                    .iter()
                    .map(|&b| (b.name().to_string(), num(ratio(v, s.median(f, b, key)))))
                    .collect();
                out.insert(format!("{}/{}/{key}", f.name(), c.name()), by_base.into());
            };
            add(Case::KernelVxlan, &[Case::HostGw]);
            for c in Case::BPF {
                add(c, &[Case::HostGw, Case::KernelVxlan]);
            }
            for c in Case::BPF6 {
                add(c, &[Case::KernelVxlan6]);
            }
        }
    }
    out.into()
}

/// One panel of the SVG: one flavour's bars as ratios to `base`.
struct Panel<'a> {
    flavour: Flavour,
    heading: String,
    base: Case,
    /// (case, colour)
    bars: &'a [(Case, &'a str)],
}

/// Bar charts of the ratios, two panels per underlay flavour: the IPv4 cases to host-gw, the
/// IPv6 agent cases to kernel-vxlan6 (a panel only when one of its cases ran).
pub fn svg(s: &Samples, title: &str) -> String {
    let metrics: Vec<_> = METRICS.iter().filter(|m| !m.0.starts_with("retr")).collect();
    let cases4: &[(Case, &str)] = &[
        (Case::KernelVxlan, "#9e9e9e"),
        (Case::BpfXdp, "#1f77b4"),
        (Case::BpfTc, "#ff7f0e"),
        (Case::BpfTcVeth, "#2ca02c"),
        (Case::BpfHostGw, "#9467bd"),
    ];
    let cases6: &[(Case, &str)] = &[(Case::BpfXdp6, "#9ecae1"), (Case::BpfTc6, "#fdae6b")];
    let mut panels: Vec<Panel> = Vec::new();
    for f in Flavour::ALL {
        if Case::ALL.iter().any(|&c| !c.ipv6() && s.ran(c)) {
            panels.push(Panel {
                flavour: f,
                heading: format!("{} underlay (ratio to host-gw)", f.name()),
                base: Case::HostGw,
                bars: cases4,
            });
        }
        if Case::ALL.iter().any(|&c| c.ipv6() && s.ran(c)) {
            panels.push(Panel {
                flavour: f,
                heading: format!("{} underlay, IPv6 (ratio to kernel-vxlan6)", f.name()),
                base: Case::KernelVxlan6,
                bars: cases6,
            });
        }
    }
    let legend: Vec<(Case, &str)> =
        panels
            .iter()
            .flat_map(|p| p.bars.iter().copied())
            .fold(Vec::new(), |mut v, c| {
                if !v.contains(&c) {
                    v.push(c);
                }
                v
            });
    let (w, panel_h, top, left) = (980.0, 300.0, 60.0, 60.0);
    let h = top + panel_h * panels.len() as f64 + 40.0;
    let max_r = 2.0f64;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{left}" y="22" font-size="16" font-weight="bold">{title}</text>"#
    );
    let _ = writeln!(
        o,
        r#"<text x="{left}" y="42">IPv4: ratio to host-gw (a); IPv6: ratio to kernel-vxlan6 (b6); medians. Throughput/pps: higher is better; latency/CPU: lower is better. Bars past {max_r} are clipped.</text>"#
    );
    let group_w = (w - left - 20.0) / metrics.len() as f64;
    let bar_w = group_w / (cases4.len() as f64 + 1.0);
    for (pi, p) in panels.iter().enumerate() {
        let (f, heading, base, cases) = (&p.flavour, &p.heading, &p.base, p.bars);
        let y0 = top + panel_h * pi as f64 + 30.0;
        let ph = panel_h - 80.0;
        let y = |r: f64| y0 + ph - (r.min(max_r) / max_r) * ph;
        let _ = writeln!(
            o,
            r#"<text x="{left}" y="{}" font-weight="bold">{heading}</text>"#,
            y0 - 8.0
        );
        for t in [0.0, 0.5, 1.0, 1.5, 2.0] {
            let color = if t == 1.0 { "#000" } else { "#ddd" };
            let (x2, yt, xl, yl) = (w - 20.0, y(t), left - 6.0, y(t) + 4.0);
            let _ = writeln!(
                o,
                r#"<line x1="{left}" x2="{x2}" y1="{yt}" y2="{yt}" stroke="{color}"/><text x="{xl}" y="{yl}" text-anchor="end">{t:.1}</text>"#
            );
        }
        for (mi, (key, label, _, _)) in metrics.iter().enumerate() {
            let gx = left + group_w * mi as f64;
            let a = s.median(*f, *base, key);
            for (ci, (c, color)) in cases.iter().enumerate() {
                let r = ratio(s.median(*f, *c, key), a);
                let x = gx + bar_w * (ci as f64 + 0.5);
                if r.is_finite() {
                    let _ = writeln!(
                        o,
                        r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{} {}: {r:.3}</title></rect>"#,
                        y(r),
                        bar_w * 0.9,
                        y(0.0) - y(r),
                        c.name(),
                        label
                    );
                    let _ = writeln!(
                        o,
                        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{r:.2}</text>"#,
                        x + bar_w * 0.45,
                        y(r) - 3.0
                    );
                } else {
                    let what = if s.ran(*c) && s.ran(*base) { "fail" } else { "-" };
                    let _ = writeln!(
                        o,
                        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10" fill="red">{what}</text>"#,
                        x + bar_w * 0.45,
                        y(0.0) - 3.0
                    );
                }
            }
            let _ = writeln!(
                o,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
                gx + group_w / 2.0,
                y(0.0) + 16.0
            );
        }
    }
    let ly = h - 16.0;
    for (i, (c, color)) in legend.iter().enumerate() {
        let x = left + 150.0 * i as f64;
        let _ = writeln!(
            o,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{color}"/><text x="{}" y="{ly}">{}</text>"#,
            ly - 10.0,
            x + 16.0,
            c.name()
        );
    }
    o.push_str("</svg>\n");
    o
}
