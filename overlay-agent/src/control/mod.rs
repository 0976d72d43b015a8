//! The control plane: config -> lease -> subnet.env -> peer events, forever, for IPv4, IPv6 or
//! both as the network config says. Lease keeping (acquire, renew, re-acquire, subnet.env) lives
//! in [`lease_keeper`], the etcd watch that turns leases into peer events in [`peer_watch`];
//! [`run`] strings them together.
//!
//! Unlike flanneld, losing our own lease (deleted, expired, taken over) is not fatal: we take a
//! lease again (the same subnets when still free), rewrite subnet.env if it changed, and go on.

pub mod backend;
pub mod config;
mod identity;
pub mod lease;
mod lease_keeper;
pub mod peer_check;
mod peer_watch;
pub mod subnet;
pub mod subnet_env;

use std::{path::PathBuf, time::Duration};

use tokio::sync::mpsc;

pub use identity::{derive_vtep_mac, NodeIdentity};
pub use lease_keeper::EXHAUSTED_RETRY;
use lease_keeper::{LeaseKeeper, Renewal};
use peer_watch::{Next, Opened, PeerWatch};

use config::{ConfigError, NetworkConfig};
use lease::Lease;
use subnet::{
    etcd::{EtcdConnectError, EtcdOptions, EtcdRegistry},
    Registry, RegistryWatch, SubnetManager,
};
use subnet_env::{read_previous_subnets, SubnetEnvError};

/// What the control plane tells the dataplane side. Leases carry both families: `subnet`
/// and `attrs.public_ip`/`backend_data` for IPv4, `ipv6_subnet` and
/// `attrs.public_ipv6`/`backend_v6_data` for IPv6 (see [`Lease::v4`], [`Lease::v6`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The validated network config; sent once, before the first `OwnLease`.
    Config(NetworkConfig),
    /// Our lease (first acquisition, and again whenever it is re-acquired).
    OwnLease(Lease),
    PeerUpsert(Lease),
    PeerRemove(Lease),
    /// The full set of remote vxlan leases after a (re)list; anything not in it is gone.
    Resync(Vec<Lease>),
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("network config at {key}: {source}")]
    Config { key: String, source: ConfigError },
    #[error(
        "the network config enables {family} but this node has no {family} address to publish: \
         give the underlay interface one, or set it with {flag}"
    )]
    NoPublicAddress {
        family: &'static str,
        flag: &'static str,
    },
    #[error(
        "your PublicIP {public} differs from the interface's addresses, meaning that probably \
         you're on a NAT, which is not supported by the host-gw backend (as flanneld's): set \
         --public-ip to an address of --iface, or use the vxlan backend"
    )]
    PublicIpNotOnInterface { public: std::net::IpAddr },
    #[error(transparent)]
    Connect(#[from] EtcdConnectError),
    #[error(transparent)]
    SubnetEnv(#[from] SubnetEnvError),
}

/// What lease keeping needs beyond the registry.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub subnet_file: PathBuf,
    pub ip_masq: bool,
    pub renew_margin: Duration,
}

/// Everything the control plane needs, built from the command line at the top (agent).
#[derive(Debug, Clone)]
pub struct ControlOptions {
    pub etcd: EtcdOptions,
    pub run: RunOptions,
}

/// Connects, waits for config, acquires the lease, writes subnet.env, sends `Event::Config` then
/// `Event::OwnLease`, then `Resync` + `PeerUpsert`/`PeerRemove` forever; renews and re-acquires.
/// Returns only on a fatal error (or `Ok` when the event receiver is dropped).
pub async fn run(
    opts: &ControlOptions,
    node: NodeIdentity,
    events: mpsc::Sender<Event>,
) -> Result<(), ControlError> {
    let mut backoff = Backoff::new();
    let reg = loop {
        match EtcdRegistry::connect(&opts.etcd).await {
            Ok(r) => break r,
            Err(e @ (EtcdConnectError::ReadFile { .. } | EtcdConnectError::Tls { .. })) => {
                return Err(e.into())
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot connect to etcd yet; retrying");
                tokio::select! {
                    _ = backoff.wait() => {}
                    _ = events.closed() => return Ok(()),
                }
            }
        }
    };
    run_with_registry(reg, &opts.run, node, events).await
}

/// Exponential backoff, 100 ms doubling to 10 s.
pub(crate) struct Backoff(Duration);

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);
    pub(crate) fn new() -> Self {
        Backoff(Self::MIN)
    }
    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
    /// The delay to wait now; doubles the next one.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        d
    }
    pub(crate) fn reset(&mut self) {
        self.0 = Self::MIN;
    }
}

/// Why the control loop stops.
pub(crate) enum Stop {
    /// The receiver is gone: shut down quietly.
    Closed,
    Fatal(ControlError),
}

impl From<ControlError> for Stop {
    fn from(e: ControlError) -> Self {
        Stop::Fatal(e)
    }
}

pub(crate) async fn send(events: &mpsc::Sender<Event>, ev: Event) -> Result<(), Stop> {
    events.send(ev).await.map_err(|_| Stop::Closed)
}

/// [`run`] on any registry (the in-memory one in unit tests).
pub async fn run_with_registry<R: Registry>(
    reg: R,
    opts: &RunOptions,
    node: NodeIdentity,
    events: mpsc::Sender<Event>,
) -> Result<(), ControlError> {
    match run_inner(reg, opts, node, &events).await {
        Ok(()) | Err(Stop::Closed) => Ok(()),
        Err(Stop::Fatal(e)) => Err(e),
    }
}

async fn wait_for_config<R: Registry>(reg: &R) -> Result<NetworkConfig, ControlError> {
    let key = reg.config_key();
    let mut logged_missing = false;
    let mut backoff = Backoff::new();
    loop {
        match reg.get_network_config().await {
            Ok(Some(json)) => {
                return NetworkConfig::parse(&json).map_err(|source| ControlError::Config { key, source });
            }
            Ok(None) => {
                if !logged_missing {
                    tracing::warn!(%key, "network config does not exist yet; waiting for it");
                    logged_missing = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                tracing::warn!(%key, error = %e, "cannot read network config from etcd; retrying");
                backoff.wait().await;
            }
        }
    }
}

/// Config, our lease, then the peer watch with renewals, re-opened after every break and
/// preceded by a re-acquisition whenever our lease is lost.
async fn run_inner<R: Registry>(
    reg: R,
    opts: &RunOptions,
    node: NodeIdentity,
    events: &mpsc::Sender<Event>,
) -> Result<(), Stop> {
    let config = wait_for_config(&reg).await?;
    tracing::info!(network = ?config.network(), ipv6_network = ?config.ipv6_network(),
        vni = config.backend.vni, port = config.backend.port, "network config loaded");
    send(events, Event::Config(config.clone())).await?;
    let attrs = node.lease_attrs(&config)?;

    let previous = read_previous_subnets(&opts.subnet_file).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "ignoring unreadable subnet file");
        Default::default()
    });
    let mgr = SubnetManager::new(reg, config, attrs, previous, opts.renew_margin);
    let mut keeper = LeaseKeeper::start(mgr, opts, node.iface_mtu, events).await?;
    let mut watch = PeerWatch::new();
    let mut lost = false;
    loop {
        if lost {
            watch.forget_position();
            keeper.reacquire(events).await?;
        }
        let mut stream = match watch.open(&keeper, events).await? {
            Opened::Watching(w) => w,
            Opened::Retry => {
                lost = false;
                continue;
            }
            Opened::Lost => {
                lost = true;
                continue;
            }
        };
        keeper.schedule_renewal();
        lost = follow(&mut keeper, &mut watch, &mut stream, events).await?;
    }
}

/// Follows the watch and renews the lease until the watch must be reopened; `true` when our
/// lease is lost.
async fn follow<R: Registry>(
    keeper: &mut LeaseKeeper<R>,
    watch: &mut PeerWatch,
    stream: &mut R::Watch,
    events: &mpsc::Sender<Event>,
) -> Result<bool, Stop> {
    loop {
        tokio::select! {
            batch = stream.next() => {
                match watch.on_batch(keeper, batch, stream.revision(), events).await? {
                    Next::Continue => {}
                    Next::Reopen => return Ok(false),
                    Next::Lost => return Ok(true),
                }
            }
            _ = keeper.renewal_due() => {
                if let Renewal::Lost = keeper.renew().await {
                    return Ok(true);
                }
            }
            _ = events.closed() => return Err(Stop::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use ipnet::Ipv4Net;
    use lease::LeaseAttrs;
    use tokio::time::Instant;

    use super::*;
    use crate::control::subnet::{MemRegistry, SUBNET_TTL};

    const CONFIG: &str = r#"{"Network":"10.9.0.0/16","Backend":{"Type":"vxlan","VNI":7}}"#;

    fn node(last: u8) -> NodeIdentity {
        NodeIdentity {
            public_ip: Some(Ipv4Addr::new(198, 18, 0, last)),
            public_ipv6: None,
            vtep_mac: [2, 0, 0, 0, 0, last],
            iface_mtu: 1500,
            iface_addrs: Vec::new(),
        }
    }

    /// Options writing subnet.env into a directory the agent creates (as /run/flannel) inside a
    /// fresh one, removed when the returned guard drops.
    fn opts(name: &str) -> (RunOptions, tempfile::TempDir) {
        let dir = tempfile::Builder::new()
            .prefix(&format!("control-test-{name}-"))
            .tempdir()
            .unwrap();
        let o = RunOptions {
            subnet_file: dir.path().join("flannel/subnet.env"),
            ip_masq: false,
            renew_margin: Duration::from_secs(3600),
        };
        (o, dir)
    }

    async fn next(rx: &mut mpsc::Receiver<Event>) -> Event {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no event within 5 s")
            .expect("channel closed")
    }

    async fn start(
        reg: &MemRegistry,
        o: &RunOptions,
        n: NodeIdentity,
    ) -> (
        mpsc::Receiver<Event>,
        tokio::task::JoinHandle<Result<(), ControlError>>,
        Lease,
    ) {
        let (tx, mut rx) = mpsc::channel(64);
        let (reg, o) = (reg.clone(), o.clone());
        let h = tokio::spawn(async move { run_with_registry(reg, &o, n, tx).await });
        let Event::Config(c) = next(&mut rx).await else {
            panic!("first event must be Config")
        };
        assert_eq!(c.backend.vni, 7);
        let Event::OwnLease(l) = next(&mut rx).await else {
            panic!("second event must be OwnLease")
        };
        (rx, h, l)
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_config_then_leases_and_writes_env() {
        let reg = MemRegistry::default();
        let (o, _dir) = opts("env");
        let r2 = reg.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            r2.set_network_config(CONFIG);
        });
        let (tx, mut rx) = mpsc::channel(64);
        let o2 = o.clone();
        let h = tokio::spawn(async move { run_with_registry(reg.clone(), &o2, node(1), tx).await });
        let t0 = Instant::now();
        let Event::Config(_) = next_long(&mut rx).await else {
            panic!("expected Config")
        };
        assert!(Instant::now() - t0 >= Duration::from_secs(30));
        let Event::OwnLease(l) = next(&mut rx).await else {
            panic!("expected OwnLease")
        };
        assert_eq!(l.attrs.backend_data.unwrap().vni, 7);
        let env = std::fs::read_to_string(&o.subnet_file).unwrap();
        let first = Ipv4Addr::from(u32::from(l.subnet.unwrap().network()) + 1);
        assert_eq!(env, format!("FLANNEL_NETWORK=10.9.0.0/16\nFLANNEL_SUBNET={first}/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"));
        assert_eq!(next(&mut rx).await, Event::Resync(vec![]));
        h.abort();
    }

    async fn next_long(rx: &mut mpsc::Receiver<Event>) -> Event {
        tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await
            .unwrap()
            .unwrap()
    }

    /// The next event about peers: our own lease may be announced again in between (after a
    /// re-list the keeper confirms it; when depends on task order), which is not what the
    /// watch tests look at.
    async fn next_peer_event(rx: &mut mpsc::Receiver<Event>) -> Event {
        loop {
            match next_long(rx).await {
                Event::OwnLease(_) => continue,
                ev => return ev,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bad_config_is_fatal_with_field() {
        let reg = MemRegistry::default();
        reg.set_network_config(r#"{"Network":"10.9.0.0/16","Backend":{"Type":"udp"}}"#);
        let (tx, _rx) = mpsc::channel(64);
        let err = run_with_registry(reg, &opts("bad").0, node(1), tx)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("Backend.Type"), "{err}");
        assert!(
            err.to_string().contains("only the vxlan and host-gw backends"),
            "{err}"
        );
    }

    /// host-gw publishes flanneld's host-gw lease, and refuses a PublicIP that is not the
    /// interface's (behind NAT) as flanneld's host-gw does, before taking a lease.
    #[tokio::test(start_paused = true)]
    async fn host_gw_lease_and_the_nat_refusal() {
        const HOST_GW: &str = r#"{"Network":"10.9.0.0/16","Backend":{"Type":"host-gw"}}"#;
        let reg = MemRegistry::default();
        reg.set_network_config(HOST_GW);
        let (tx, _rx) = mpsc::channel(64);
        let err = run_with_registry(reg.clone(), &opts("nat").0, node(1), tx)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "your PublicIP 198.18.0.1 differs from the interface's addresses, meaning that probably \
             you're on a NAT, which is not supported by the host-gw backend (as flanneld's): set \
             --public-ip to an address of --iface, or use the vxlan backend"
        );
        let mut n = node(1);
        n.iface_addrs = vec![std::net::IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1))];
        let (tx, mut rx) = mpsc::channel(64);
        let (o, _dir) = opts("hostgw");
        let env_file = o.subnet_file.clone();
        let h = tokio::spawn(async move { run_with_registry(reg, &o, n, tx).await });
        let lease = loop {
            if let Event::OwnLease(l) = next(&mut rx).await {
                break l;
            }
        };
        let env = std::fs::read_to_string(env_file).unwrap();
        assert!(env.contains("FLANNEL_MTU=1500\n"), "{env}");
        assert_eq!(
            lease.attrs.to_json(),
            r#"{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"host-gw"}"#
        );
        h.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn peers_flow_and_own_loss_reacquires_same_subnet() {
        let reg = MemRegistry::default();
        reg.set_network_config(CONFIG);
        let (o, _dir) = opts("loss");
        let (mut rx, h, l) = start(&reg, &o, node(1)).await;
        assert_eq!(next(&mut rx).await, Event::Resync(vec![]));

        // A peer appears, changes, and disappears; foreign and malformed leases are skipped.
        let psn: Ipv4Net = "10.9.200.0/24".parse().unwrap();
        let pattrs = LeaseAttrs::vxlan(Ipv4Addr::new(198, 18, 0, 2), 7, [2, 0, 0, 0, 0, 2]);
        reg.put_raw(
            "10.9.201.0/24".parse::<Ipv4Net>().unwrap(),
            r#"{"PublicIP":"198.18.0.3","BackendType":"host-gw"}"#,
            None,
        );
        reg.put_raw_key("not-a-subnet", "{}");
        reg.put_raw(psn, &pattrs.to_json(), Some(SUBNET_TTL));
        let Event::PeerUpsert(p) = next(&mut rx).await else {
            panic!("expected PeerUpsert")
        };
        assert_eq!((p.subnet, &p.attrs), (Some(psn), &pattrs));
        reg.delete_raw(psn);
        let Event::PeerRemove(p) = next(&mut rx).await else {
            panic!("expected PeerRemove")
        };
        assert_eq!(p.subnet, Some(psn));

        // Our key is deleted: same subnet again, announced again, subnet.env unchanged.
        let env_before = std::fs::read_to_string(&o.subnet_file).unwrap();
        let own = l.subnet.unwrap();
        reg.delete_raw(own);
        let Event::OwnLease(l2) = next(&mut rx).await else {
            panic!("expected OwnLease after loss")
        };
        assert_eq!(l2.subnet, l.subnet);
        assert!(reg.get_raw(own).is_some());
        assert_eq!(std::fs::read_to_string(&o.subnet_file).unwrap(), env_before);
        assert!(matches!(next(&mut rx).await, Event::Resync(_)));

        // Our key is taken over by another node: a new subnet, subnet.env rewritten.
        reg.delete_raw(own);
        reg.put_raw(own, &pattrs.to_json(), None);
        let mut got = None;
        for _ in 0..4 {
            if let Event::OwnLease(l3) = next(&mut rx).await {
                got = Some(l3);
                break;
            }
        }
        let l3 = got.expect("no OwnLease after takeover");
        assert_ne!(l3.subnet, l.subnet);
        assert!(std::fs::read_to_string(&o.subnet_file)
            .unwrap()
            .contains(&format!(
                "FLANNEL_SUBNET={}/24",
                Ipv4Addr::from(u32::from(l3.subnet.unwrap().network()) + 1)
            )));
        assert!(!h.is_finished());
        h.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn renews_before_expiry_and_survives_expiry() {
        let reg = MemRegistry::default();
        reg.set_network_config(CONFIG);
        let (o, _dir) = opts("renew");
        let (mut rx, h, l) = start(&reg, &o, node(1)).await;
        let t0 = Instant::now();
        assert_eq!(next(&mut rx).await, Event::Resync(vec![]));
        // Renewal at expiry - 60 min, i.e. 23 h in, and not before.
        tokio::time::sleep(Duration::from_secs(23 * 3600 - 60)).await;
        assert!(reg.renewals().is_empty(), "renewed too early");
        tokio::time::sleep(Duration::from_secs(120)).await;
        let r = reg.renewals();
        assert_eq!(r.len(), 1, "expected one renewal by 23h01m");
        assert_eq!(r[0].1 - t0, Duration::from_secs(23 * 3600));
        // Still renewing a day later; the key never expired.
        tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
        assert_eq!(reg.renewals().len(), 2);
        let own = l.subnet.unwrap();
        assert!(reg.get_raw(own).is_some());

        // An outage longer than the remaining TTL: the key expires; the agent comes back with it.
        reg.set_offline(true);
        tokio::time::sleep(Duration::from_secs(25 * 3600)).await;
        reg.set_offline(false);
        assert!(
            reg.get_raw(own).is_none(),
            "key should have expired during the outage"
        );
        let mut again = None;
        for _ in 0..4 {
            if let Event::OwnLease(l2) = next_long(&mut rx).await {
                again = Some(l2);
                break;
            }
        }
        assert_eq!(again.expect("no OwnLease after expiry").subnet, l.subnet);
        assert!(reg.get_raw(own).is_some());
        assert!(!h.is_finished());
        h.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn exhausted_pool_waits_and_takes_a_freed_subnet() {
        let reg = MemRegistry::default();
        // 3 leasable /26s (the first is skipped), all held by other nodes.
        reg.set_network_config(
            r#"{"Network":"10.9.0.0/24","SubnetLen":26,"Backend":{"Type":"vxlan","VNI":7}}"#,
        );
        let held: Vec<Ipv4Net> = ["10.9.0.64/26", "10.9.0.128/26", "10.9.0.192/26"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        for (i, sn) in held.iter().enumerate() {
            let a = LeaseAttrs::vxlan(Ipv4Addr::new(198, 18, 0, 100 + i as u8), 7, [2, 0, 0, 0, 0, 9]);
            reg.put_raw(*sn, &a.to_json(), Some(SUBNET_TTL));
        }
        let (tx, mut rx) = mpsc::channel(64);
        let (o, _dir) = opts("exhausted");
        let r2 = reg.clone();
        let h = tokio::spawn(async move { run_with_registry(r2, &o, node(1), tx).await });
        assert!(matches!(next(&mut rx).await, Event::Config(_)));
        // Waiting, not dead: no lease for a minute, the task still runs.
        let quiet = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await;
        assert!(
            quiet.is_err(),
            "expected no event while the pool is full, got {quiet:?}"
        );
        assert!(
            !h.is_finished(),
            "an exhausted pool must not stop the agent: {:?}",
            h.await
        );
        // A lease is freed: taken within one retry period.
        reg.delete_raw(held[1]);
        let t0 = Instant::now();
        let Event::OwnLease(l) = next_long(&mut rx).await else {
            panic!("expected OwnLease once a subnet was freed")
        };
        assert_eq!(l.subnet, Some(held[1]));
        assert!(Instant::now() - t0 <= EXHAUSTED_RETRY + Duration::from_secs(1));
        h.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn broken_watch_resumes_and_compaction_relists() {
        let reg = MemRegistry::default();
        reg.set_network_config(CONFIG);
        let (o, _dir) = opts("resume");
        let (mut rx, h, _l) = start(&reg, &o, node(1)).await;
        assert_eq!(next(&mut rx).await, Event::Resync(vec![]));
        let peer = |last: u8| LeaseAttrs::vxlan(Ipv4Addr::new(198, 18, 0, last), 7, [2, 0, 0, 0, 0, last]);
        let sn = |s: &str| -> Ipv4Net { s.parse().unwrap() };
        reg.put_raw(sn("10.9.50.0/24"), &peer(50).to_json(), Some(SUBNET_TTL));
        let ev = next_peer_event(&mut rx).await;
        assert!(
            matches!(&ev, Event::PeerUpsert(l) if l.subnet == Some(sn("10.9.50.0/24"))),
            "{ev:?}"
        );

        // Watch broken, history kept: the resumed watch delivers what happened meanwhile as
        // events, without a full re-list.
        reg.set_offline(true);
        tokio::time::sleep(Duration::from_secs(1)).await;
        reg.put_raw(sn("10.9.51.0/24"), &peer(51).to_json(), Some(SUBNET_TTL));
        tokio::time::sleep(Duration::from_secs(1)).await;
        reg.set_offline(false);
        match next_peer_event(&mut rx).await {
            Event::PeerUpsert(l) => assert_eq!(l.subnet, Some(sn("10.9.51.0/24"))),
            ev => panic!("expected the missed PeerUpsert from the resumed watch, got {ev:?}"),
        }

        // Watch broken and history compacted meanwhile: re-list, and the Resync drops the
        // lease deleted during the gap and holds the one added.
        reg.set_offline(true);
        tokio::time::sleep(Duration::from_secs(1)).await;
        reg.delete_raw(sn("10.9.50.0/24"));
        reg.put_raw(sn("10.9.52.0/24"), &peer(52).to_json(), Some(SUBNET_TTL));
        reg.compact();
        tokio::time::sleep(Duration::from_secs(1)).await;
        reg.set_offline(false);
        match next_peer_event(&mut rx).await {
            Event::Resync(ls) => {
                let got: Vec<Ipv4Net> = ls.iter().filter_map(|l| l.subnet).collect();
                assert_eq!(got, vec![sn("10.9.51.0/24"), sn("10.9.52.0/24")]);
            }
            ev => panic!("expected a Resync after compaction, got {ev:?}"),
        }
        // And the new watch works.
        reg.delete_raw(sn("10.9.51.0/24"));
        assert!(
            matches!(next_peer_event(&mut rx).await, Event::PeerRemove(l) if l.subnet == Some(sn("10.9.51.0/24")))
        );
        assert!(!h.is_finished());
        h.abort();
    }
}
