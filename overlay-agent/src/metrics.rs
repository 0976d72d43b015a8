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

use std::{
    path::{Path, PathBuf},
    sync::{Arc, LazyLock, Mutex},
    time::Duration,
};

use overlay_common::Counter as BpfCounter;
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
        Ok(())
    }
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
}
