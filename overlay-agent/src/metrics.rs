//! Prometheus metrics: process-wide, filled by the agent loop and the control plane's hooks,
//! the datapath counters read from the pinned `OVL_COUNTERS` map at scrape time.
//!
//! | family                                   | type      | labels   | from                      |
//! |------------------------------------------|-----------|----------|---------------------------|
//! | `overlay_lease_held`                     | gauge     | `subnet` | agent (Event::OwnLease)   |
//! | `overlay_lease_expiry_seconds`           | gauge     |          | agent + control (renewal) |
//! | `overlay_programs_attached`              | gauge     |          | agent                     |
//! | `overlay_decap_mode`                     | gauge     | `mode`   | agent (`xdp`/`tc`: 1 for the one attached) |
//! | `overlay_peers`                          | gauge     |          | agent (peer map size)     |
//! | `overlay_local_endpoints`                | gauge     |          | agent (both endpoint maps) |
//! | `overlay_etcd_reconnects_total`          | counter   |          | control (watch/list fail) |
//! | `overlay_malformed_leases_total`         | counter   |          | subnet (skipped key, once per key and value) |
//! | `overlay_leases_rejected_total`          | counter   | `reason` | control (a peer lease or one family's side of it not programmed, once per key: `key`, `outside_network`, `subnet_len`, `public_ip`, `overlap`) |
//! | `overlay_lease_pool_exhausted_total`     | counter   |          | control (acquire found no free subnet) |
//! | `overlay_peer_map_errors_total`          | counter   | `reason` | agent (upsert refused: `full`, `other`; host-gw peer not on-link: `refused`) |
//! | `overlay_map_sync_duration_seconds`      | histogram |          | agent (event → map done)  |
//! | `overlay_datapath_packets_total`         | counter   | `path`   | BPF counters              |
//! | `overlay_datapath_bytes_total`           | counter   | `path`   | BPF counters              |
//! | `overlay_datapath_drops_total`           | counter   | `reason` | BPF counters (`is_drop`)  |
//! | `overlay_peer_tx_packets_total`, `_tx_bytes_total`, `_rx_packets_total`, `_rx_bytes_total`, `_tx_drops_total`, `_rx_drops_total` | counter | `peer` | BPF per-peer counts (`OVL_PEER_STATS`/`6`), one label set per member |
//! | `overlay_peer_tx_last_seen_seconds`, `overlay_peer_rx_last_seen_seconds` | gauge | `peer` | seconds since the last packet sent to / accepted from it (since boot when never) |

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, LazyLock, Mutex},
    time::Duration,
};

use overlay_common::{Counter as BpfCounter, PeerStats};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::Registry,
};
use tokio::time::Instant;

/// What the agent knows about itself, read at scrape time.
#[derive(Debug, Default, Clone)]
pub struct AgentState {
    /// Our lease, once held.
    /// Our lease, named by its IPv4 subnet (its IPv6 one on an IPv6-only node).
    pub subnet: Option<ipnet::IpNet>,
    /// When our etcd lease runs out (`None` for reservations).
    pub expiration: Option<Instant>,
    /// Decap attached to the underlay NIC.
    pub attached: bool,
    /// How: XDP (with TC delivering) or TC alone, by its label (one of [`DECAP_MODES`]).
    pub decap: Option<&'static str>,
    /// Where the datapath counters are read from.
    pub datapath: Option<CounterSource>,
}

/// The labels of `overlay_decap_mode` (the dataplane's `DecapMode::label`s).
pub const DECAP_MODES: [&str; 2] = ["xdp", "tc"];

/// The datapath's counters at scrape time: the agent's pin root and the dataplane's reader,
/// which sums the per-CPU values into one per [`BpfCounter`] (`None` once the pins are gone).
#[derive(Debug, Clone)]
pub struct CounterSource {
    pub pin_root: PathBuf,
    pub read: fn(&Path) -> Option<Vec<u64>>,
    /// The per-peer counts, summed over CPUs, of every member (both families), with the
    /// clock their last-seen stamps are on (`None` when the pins are gone).
    pub read_peers: fn(&Path) -> Option<PeerCounts>,
}

/// Every member's traffic at one read: (PublicIP, counts), and CLOCK_MONOTONIC_COARSE's now
/// in ns (the clock of `tx_last_ns`/`rx_last_ns`).
#[derive(Debug, Clone, Default)]
pub struct PeerCounts {
    pub now_ns: u64,
    pub peers: Vec<(IpAddr, PeerStats)>,
}

impl AgentState {
    /// `/readyz`: the lease is held and the programs are attached.
    pub fn ready(&self) -> bool {
        self.subnet.is_some() && self.attached
    }
}

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    pub etcd_reconnects: Counter,
    pub malformed_leases: Counter,
    pub leases_rejected: Family<Vec<(String, String)>, Counter>,
    pub pool_exhausted: Counter,
    pub peer_map_errors: Family<Vec<(String, String)>, Counter>,
    pub sync_latency: Histogram,
    pub peers: Gauge,
    pub local_endpoints: Gauge,
    state: Arc<Mutex<AgentState>>,
}

/// The process-wide metrics (the control plane bumps them without being handed anything).
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Hook for the control plane: the etcd connection/watch was lost and is being re-established.
pub fn etcd_reconnect() {
    METRICS.etcd_reconnects.inc();
}

/// Hook for the subnet manager: a malformed lease key or value was skipped.
pub fn malformed_lease() {
    METRICS.malformed_leases.inc();
}

/// The labels of `overlay_leases_rejected_total` (the control plane's `peer_check::Reason`s),
/// each exported from the start.
pub const LEASE_REJECT_REASONS: [&str; 5] = ["key", "outside_network", "subnet_len", "public_ip", "overlap"];

fn reason(reason: &str) -> Vec<(String, String)> {
    vec![("reason".to_string(), reason.to_string())]
}

/// Hook for the control plane: a peer's lease (or one family's side of it) is not programmed.
pub fn lease_rejected(why: &str) {
    METRICS.leases_rejected.get_or_create(&reason(why)).inc();
}

/// How many leases were rejected for `why` (tests).
pub fn leases_rejected(why: &str) -> u64 {
    METRICS.leases_rejected.get_or_create(&reason(why)).get()
}

/// Hook for the control plane: acquiring a lease found every subnet of the pool taken.
pub fn pool_exhausted() {
    METRICS.pool_exhausted.inc();
}

/// Hook for the agent: a peer could not be written to the BPF maps (`full` or `other`), or the
/// backend refused it (`refused`: a host-gw peer that is not on-link).
pub fn peer_map_error(reason: &str) {
    METRICS.peer_map_errors.get_or_create(&self::reason(reason)).inc();
}

/// Hook for the control plane: our lease was renewed and now runs out at `expiration`.
pub fn lease_renewed(expiration: Option<Instant>) {
    METRICS.update(|s| s.expiration = expiration);
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let etcd_reconnects = Counter::default();
        registry.register(
            "overlay_etcd_reconnects",
            "Times the etcd watch or list failed and the agent reconnected",
            etcd_reconnects.clone(),
        );
        let malformed_leases = Counter::default();
        registry.register(
            "overlay_malformed_leases",
            "Subnet keys or lease values in etcd that could not be parsed and were skipped",
            malformed_leases.clone(),
        );
        let leases_rejected = Family::<Vec<(String, String)>, Counter>::default();
        for why in LEASE_REJECT_REASONS {
            let _ = leases_rejected.get_or_create(&reason(why));
        }
        registry.register(
            "overlay_leases_rejected",
            "Peer leases (or one family's side of one) not programmed, once per key, by reason \
             (key: not flannel's spelling; outside_network, subnet_len: not a subnet of the config; \
             public_ip: not another node's plausible address; overlap: our subnet, or one a lower key holds)",
            leases_rejected.clone(),
        );
        let pool_exhausted = Counter::default();
        registry.register(
            "overlay_lease_pool_exhausted",
            "Lease acquisitions that found no free subnet in the pool (retried every 10 s)",
            pool_exhausted.clone(),
        );
        let peer_map_errors = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "overlay_peer_map_errors",
            "Peers that could not be written to the BPF maps, by reason (full: the peer map is at capacity)",
            peer_map_errors.clone(),
        );
        // 50 µs .. ~1.6 s.
        let sync_latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "overlay_map_sync_duration_seconds",
            "Time from receiving a lease event to the BPF map update finishing",
            sync_latency.clone(),
        );
        let peers = Gauge::default();
        registry.register("overlay_peers", "Remote subnets in the peer map", peers.clone());
        let local_endpoints = Gauge::default();
        registry.register(
            "overlay_local_endpoints",
            "Pod addresses (IPv4 and IPv6) on this node in the endpoint maps (decap delivers to their veth directly)",
            local_endpoints.clone(),
        );
        let state = Arc::new(Mutex::new(AgentState::default()));
        registry.register_collector(Box::new(Dynamic(state.clone())));
        Metrics {
            registry,
            etcd_reconnects,
            malformed_leases,
            leases_rejected,
            pool_exhausted,
            peer_map_errors,
            sync_latency,
            peers,
            local_endpoints,
            state,
        }
    }

    /// Changes the agent state under the lock.
    pub fn update(&self, f: impl FnOnce(&mut AgentState)) {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn state(&self) -> AgentState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn observe_sync(&self, took: Duration) {
        self.sync_latency.observe(took.as_secs_f64());
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Families computed at scrape time: lease state and the BPF counters.
#[derive(Debug)]
struct Dynamic(Arc<Mutex<AgentState>>);

impl Collector for Dynamic {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();

        let mut held = enc.encode_descriptor(
            "overlay_lease_held",
            "1 while this node holds its subnet lease (the subnet is a label)",
            None,
            MetricType::Gauge,
        )?;
        match s.subnet {
            Some(sn) => {
                let labels = [("subnet", sn.to_string())];
                ConstGauge::new(1i64).encode(held.encode_family(&labels)?)?;
            }
            None => ConstGauge::new(0i64).encode(held)?,
        }
        if let Some(exp) = s.expiration {
            let left = exp.saturating_duration_since(Instant::now()).as_secs_f64();
            let m = enc.encode_descriptor(
                "overlay_lease_expiry_seconds",
                "Seconds until our subnet lease expires in etcd unless renewed",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(left).encode(m)?;
        }
        let m = enc.encode_descriptor(
            "overlay_programs_attached",
            "1 once the decap program is attached to the underlay NIC",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(s.attached)).encode(m)?;
        if let Some(mode) = s.decap {
            let mut m = enc.encode_descriptor(
                "overlay_decap_mode",
                "The decap mode on the underlay NIC: 1 for the one in use (xdp: XDP strips, TC delivers)",
                None,
                MetricType::Gauge,
            )?;
            for each in DECAP_MODES {
                let labels = [("mode", each)];
                ConstGauge::new(i64::from(each == mode)).encode(m.encode_family(&labels)?)?;
            }
        }

        let Some(source) = &s.datapath else {
            return Ok(());
        };
        // The agent's pins may be gone (cleanup); a scrape then just lacks these families.
        if let Some(c) = (source.read)(&source.pin_root) {
            encode_datapath(&mut enc, &c)?;
        }
        if let Some(p) = (source.read_peers)(&source.pin_root) {
            encode_peers(&mut enc, &p)?;
        }
        Ok(())
    }
}

/// The per-peer counter families: (name, help, the count).
/// A per-peer family: its name, help, and what of a member's counts it exports.
type PeerFamily = (&'static str, &'static str, fn(&PeerStats) -> u64);

const PEER_COUNTERS: [PeerFamily; 6] = [
    (
        "overlay_peer_tx_packets",
        "Packets sent to a member node (VXLAN, or bare to a direct or host-gw peer), by its PublicIP",
        |s| s.tx_packets,
    ),
    (
        "overlay_peer_tx_bytes",
        "Bytes sent to a member node as they left on the underlay, by its PublicIP",
        |s| s.tx_bytes,
    ),
    (
        "overlay_peer_rx_packets",
        "Packets accepted from a member node (VXLAN stripped, or bare host-gw packets delivered), by its PublicIP",
        |s| s.rx_packets,
    ),
    (
        "overlay_peer_rx_bytes",
        "Bytes accepted from a member node once stripped, by its PublicIP",
        |s| s.rx_bytes,
    ),
    (
        "overlay_peer_tx_drops",
        "Packets for a member node dropped on the way out, by its PublicIP",
        |s| s.tx_drops,
    ),
    (
        "overlay_peer_rx_drops",
        "VXLAN from a member node dropped on the way in, by its PublicIP",
        |s| s.rx_drops,
    ),
];

/// The per-peer last-seen gauges: (name, help, the stamp).
const PEER_LAST_SEEN: [PeerFamily; 2] = [
    (
        "overlay_peer_tx_last_seen_seconds",
        "Seconds since the last packet was sent to a member node, by its PublicIP (never: seconds since boot)",
        |s| s.tx_last_ns,
    ),
    (
        "overlay_peer_rx_last_seen_seconds",
        "Seconds since the last packet was accepted from a member node, by its PublicIP (never: seconds since boot)",
        |s| s.rx_last_ns,
    ),
];

/// One label set per member in the table: a member that leaves is gone from the next scrape.
fn encode_peers(enc: &mut DescriptorEncoder, p: &PeerCounts) -> Result<(), std::fmt::Error> {
    for (name, help, count) in PEER_COUNTERS {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (ip, s) in &p.peers {
            let labels = [("peer", ip.to_string())];
            ConstCounter::new(count(s)).encode(m.encode_family(&labels)?)?;
        }
    }
    for (name, help, stamp) in PEER_LAST_SEEN {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (ip, s) in &p.peers {
            let labels = [("peer", ip.to_string())];
            // Never (0): as long ago as the clock goes, so `> N` alerts fire for it too.
            let ago_ns = p.now_ns.saturating_sub(stamp(s));
            ConstGauge::new(ago_ns as f64 / 1e9).encode(m.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// Which family (0 packets, 1 bytes, 2 drops) and label value a BPF counter goes to.
fn family(c: BpfCounter) -> (usize, &'static str) {
    let name = c.name();
    if c.is_drop() {
        (2, name.strip_prefix("drop_").unwrap_or(name))
    } else if let Some(path) = name.strip_suffix("_bytes") {
        (1, path)
    } else {
        (0, name.strip_suffix("_packets").unwrap_or(name))
    }
}

const DATAPATH_FAMILIES: [(&str, &str, &str); 3] = [
    (
        "overlay_datapath_packets",
        "Packets handled by the datapath, by path",
        "path",
    ),
    (
        "overlay_datapath_bytes",
        "Bytes handled by the datapath, by path",
        "path",
    ),
    (
        "overlay_datapath_drops",
        "Packets dropped by the datapath, by reason",
        "reason",
    ),
];

fn encode_datapath(enc: &mut DescriptorEncoder, c: &[u64]) -> Result<(), std::fmt::Error> {
    for (i, (name, help, label)) in DATAPATH_FAMILIES.into_iter().enumerate() {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        for bc in BpfCounter::ALL {
            let (fam, value) = family(bc);
            if fam == i {
                let labels = [(label, value)];
                ConstCounter::new(c.get(bc as usize).copied().unwrap_or(0))
                    .encode(m.encode_family(&labels)?)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_every_family() {
        let m = Metrics::new();
        m.update(|s| {
            s.subnet = Some("10.244.7.0/24".parse().unwrap());
            s.attached = true;
            s.decap = Some("tc");
            s.expiration = Some(Instant::now() + Duration::from_secs(3600));
        });
        m.etcd_reconnects.inc();
        m.malformed_leases.inc();
        m.peer_map_errors
            .get_or_create(&vec![("reason".to_string(), "full".to_string())])
            .inc();
        m.peers.set(3);
        m.local_endpoints.set(2);
        m.observe_sync(Duration::from_micros(120));
        let mut text = m.render();
        let mut enc_out = String::new();
        // The datapath families, from a fake counter set.
        let counters: Vec<u64> = (0..BpfCounter::ALL.len() as u64).collect();
        {
            let mut reg = Registry::default();
            #[derive(Debug)]
            struct Fake(Vec<u64>);
            impl Collector for Fake {
                fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
                    encode_datapath(&mut enc, &self.0)
                }
            }
            reg.register_collector(Box::new(Fake(counters)));
            prometheus_client::encoding::text::encode(&mut enc_out, &reg).unwrap();
        }
        text.push_str(&enc_out);
        for want in [
            "overlay_lease_held{subnet=\"10.244.7.0/24\"} 1",
            "overlay_programs_attached 1",
            "overlay_decap_mode{mode=\"tc\"} 1",
            "overlay_decap_mode{mode=\"xdp\"} 0",
            "# TYPE overlay_decap_mode gauge",
            "overlay_peers 3",
            "overlay_local_endpoints 2",
            "overlay_etcd_reconnects_total 1",
            "overlay_malformed_leases_total 1",
            "overlay_lease_pool_exhausted_total 0",
            "overlay_leases_rejected_total{reason=\"overlap\"} 0",
            "overlay_leases_rejected_total{reason=\"key\"} 0",
            "overlay_peer_map_errors_total{reason=\"full\"} 1",
            "overlay_map_sync_duration_seconds_count 1",
            "overlay_map_sync_duration_seconds_bucket{le=\"0.0001\"} 0",
            "overlay_datapath_packets_total{path=\"encap\"} 0",
            "overlay_datapath_bytes_total{path=\"encap\"} 1",
            "overlay_datapath_packets_total{path=\"decap\"} 2",
            "overlay_datapath_packets_total{path=\"pass_encap\"} 6",
            "overlay_datapath_drops_total{reason=\"no_config\"} 8",
            "overlay_datapath_drops_total{reason=\"too_big\"} 16",
            "# TYPE overlay_datapath_drops counter",
        ] {
            assert!(text.contains(want), "metrics text lacks {want:?}:\n{text}");
        }
        let exp: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("overlay_lease_expiry_seconds "))
            .expect("no overlay_lease_expiry_seconds")
            .parse()
            .unwrap();
        assert!((3590.0..=3600.0).contains(&exp), "expiry {exp}");
    }

    fn encoded(p: &PeerCounts) -> String {
        #[derive(Debug)]
        struct Fake(PeerCounts);
        impl Collector for Fake {
            fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
                encode_peers(&mut enc, &self.0)
            }
        }
        let mut reg = Registry::default();
        reg.register_collector(Box::new(Fake(p.clone())));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        out
    }

    #[test]
    fn per_peer_families_one_label_set_per_member() {
        const S: u64 = 1_000_000_000;
        let s12 = PeerStats {
            tx_packets: 50,
            tx_bytes: 7_400,
            rx_packets: 0,
            rx_bytes: 0,
            tx_last_ns: 998 * S,
            rx_last_ns: 0,
            tx_drops: 2,
            rx_drops: 3,
        };
        let s6 = PeerStats {
            rx_packets: 9,
            rx_bytes: 900,
            rx_last_ns: 990 * S + S / 2,
            ..PeerStats::default()
        };
        let p = PeerCounts {
            now_ns: 1_000 * S,
            peers: vec![
                ("198.18.0.12".parse().unwrap(), s12),
                ("fd00:198:18::13".parse().unwrap(), s6),
            ],
        };
        let text = encoded(&p);
        for want in [
            "# TYPE overlay_peer_tx_packets counter",
            "overlay_peer_tx_packets_total{peer=\"198.18.0.12\"} 50",
            "overlay_peer_tx_bytes_total{peer=\"198.18.0.12\"} 7400",
            "overlay_peer_rx_packets_total{peer=\"198.18.0.12\"} 0",
            "overlay_peer_rx_bytes_total{peer=\"fd00:198:18::13\"} 900",
            "overlay_peer_rx_packets_total{peer=\"fd00:198:18::13\"} 9",
            "overlay_peer_tx_drops_total{peer=\"198.18.0.12\"} 2",
            "overlay_peer_rx_drops_total{peer=\"198.18.0.12\"} 3",
            "# TYPE overlay_peer_rx_last_seen_seconds gauge",
            "overlay_peer_tx_last_seen_seconds{peer=\"198.18.0.12\"} 2.0",
            "overlay_peer_rx_last_seen_seconds{peer=\"fd00:198:18::13\"} 9.5",
            // Never heard: as long ago as the clock goes.
            "overlay_peer_rx_last_seen_seconds{peer=\"198.18.0.12\"} 1000.0",
        ] {
            assert!(text.contains(want), "per-peer metrics lack {want:?}:\n{text}");
        }
        assert_eq!(text.matches("peer=\"198.18.0.12\"").count(), 8, "{text}");
        // A member that left is gone from the next scrape.
        let gone = encoded(&PeerCounts {
            peers: p.peers[1..].to_vec(),
            ..p.clone()
        });
        assert!(!gone.contains("198.18.0.12"), "{gone}");
        assert!(gone.contains("fd00:198:18::13"), "{gone}");
    }
}
