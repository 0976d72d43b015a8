//! The control plane loop: config -> lease -> subnet.env -> peer events, forever.
//!
//! Unlike flanneld, losing our own lease (deleted, expired, taken over) is not fatal: we take a
//! lease again (the same subnet when still free), rewrite subnet.env if it changed, and go on.

use std::{collections::HashMap, net::Ipv4Addr, path::PathBuf, time::Duration};

use ipnet::Ipv4Net;
use tokio::{sync::mpsc, time::Instant};

use crate::{
    cli::{AgentArgs, CliError},
    config::{ConfigError, NetworkConfig},
    lease::{parse_subnet_key, Lease, LeaseAttrs},
    subnet::{
        etcd::{EtcdConnectError, EtcdRegistry},
        OwnLease, Registry, RegistryError, RegistryWatch, SubnetError, SubnetManager, WatchEvent,
    },
    subnet_env::{read_previous_subnet, SubnetEnv, SubnetEnvError},
};

/// Who this node is on the underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeIdentity {
    pub public_ip: Ipv4Addr,
    pub vtep_mac: [u8; 6],
    pub iface_mtu: u32,
}

impl NodeIdentity {
    /// Identity with the VTEP MAC derived from /etc/machine-id and the public IP.
    pub fn new(public_ip: Ipv4Addr, iface_mtu: u32) -> Self {
        NodeIdentity {
            public_ip,
            vtep_mac: crate::iface::default_vtep_mac(public_ip),
            iface_mtu,
        }
    }
}

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
    #[error(transparent)]
    Args(#[from] CliError),
    #[error("network config at {key}: {source}")]
    Config { key: String, source: ConfigError },
    #[error(transparent)]
    Connect(#[from] EtcdConnectError),
    #[error(transparent)]
    SubnetEnv(#[from] SubnetEnvError),
}

/// What [`run_with_registry`] needs beyond the registry.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub subnet_file: PathBuf,
    pub ip_masq: bool,
    pub renew_margin: Duration,
}

impl From<&AgentArgs> for RunOptions {
    fn from(a: &AgentArgs) -> Self {
        RunOptions {
            subnet_file: a.subnet_file.clone(),
            ip_masq: a.ip_masq,
            renew_margin: a.renew_margin(),
        }
    }
}

/// Connects, waits for config, acquires the lease, writes subnet.env, sends `Event::Config` then
/// `Event::OwnLease`, then `Resync` + `PeerUpsert`/`PeerRemove` forever; renews and re-acquires.
/// Returns only on a fatal error (or `Ok` when the event receiver is dropped).
pub async fn run(
    args: &AgentArgs,
    node: NodeIdentity,
    events: mpsc::Sender<Event>,
) -> Result<(), ControlError> {
    args.validate()?;
    let mut backoff = Backoff::new();
    let reg = loop {
        match EtcdRegistry::connect(&args.etcd_options()).await {
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
    run_with_registry(reg, &RunOptions::from(args), node, events).await
}

/// Exponential backoff, 100 ms doubling to 10 s.
struct Backoff(Duration);

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);
    fn new() -> Self {
        Backoff(Self::MIN)
    }
    async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
    /// The delay to wait now; doubles the next one.
    fn next_delay(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        d
    }
    fn reset(&mut self) {
        self.0 = Self::MIN;
    }
}

/// The receiver is gone: shut down quietly.
struct Closed;

async fn send(events: &mpsc::Sender<Event>, ev: Event) -> Result<(), Closed> {
    events.send(ev).await.map_err(|_| Closed)
}

/// [`run`] on any registry (the in-memory one in unit tests).
pub async fn run_with_registry<R: Registry>(
    reg: R,
    opts: &RunOptions,
    node: NodeIdentity,
    events: mpsc::Sender<Event>,
) -> Result<(), ControlError> {
    match run_inner(reg, opts, node, &events).await {
        Ok(Ok(())) | Err(Closed) => Ok(()),
        Ok(Err(e)) => Err(e),
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

/// How long an agent waits before trying again when every subnet of the pool is leased.
pub const EXHAUSTED_RETRY: Duration = Duration::from_secs(10);

/// Acquires a lease, retrying until one is granted: lost races and etcd errors with backoff,
/// an exhausted pool every [`EXHAUSTED_RETRY`] (a lease may be freed by another node).
async fn acquire<R: Registry>(
    mgr: &mut SubnetManager<R>,
    events: &mpsc::Sender<Event>,
) -> Result<OwnLease, Closed> {
    let mut backoff = Backoff::new();
    loop {
        let wait = match mgr.acquire().await {
            Ok(l) => return Ok(l),
            Err(e @ SubnetError::Exhausted { .. }) => {
                crate::ops::metrics::pool_exhausted();
                tracing::error!(error = %e, retry_in = ?EXHAUSTED_RETRY,
                    "cannot lease a subnet: the pool is exhausted; waiting for a lease to be freed");
                // A little jitter so many waiting nodes do not all retry in the same instant.
                EXHAUSTED_RETRY + Duration::from_millis(rand::random::<u64>() % 500)
            }
            Err(e) => {
                tracing::warn!(error = %e, "failed to acquire a subnet lease; retrying");
                backoff.next_delay()
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = events.closed() => return Err(Closed),
        }
    }
}

fn write_env(
    opts: &RunOptions,
    config: &NetworkConfig,
    node: &NodeIdentity,
    sn: Ipv4Net,
) -> Result<(), ControlError> {
    SubnetEnv {
        network: config.network,
        subnet: sn,
        mtu: config.mtu(node.iface_mtu),
        ip_masq: opts.ip_masq,
    }
    .write(&opts.subnet_file)?;
    Ok(())
}

async fn run_inner<R: Registry>(
    reg: R,
    opts: &RunOptions,
    node: NodeIdentity,
    events: &mpsc::Sender<Event>,
) -> Result<Result<(), ControlError>, Closed> {
    let config = match wait_for_config(&reg).await {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    tracing::info!(network = %config.network, subnet_len = config.subnet_len, vni = config.backend.vni,
        port = config.backend.port, "network config loaded");
    send(events, Event::Config(config.clone())).await?;

    let previous = match read_previous_subnet(&opts.subnet_file) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring unreadable subnet file");
            None
        }
    };
    let attrs = LeaseAttrs::vxlan(node.public_ip, config.backend.vni, node.vtep_mac);
    let mut mgr = SubnetManager::new(reg, config.clone(), attrs, previous, opts.renew_margin);

    let mut own = acquire(&mut mgr, events).await?;
    if let Err(e) = write_env(opts, &config, &node, own.lease.subnet) {
        return Ok(Err(e));
    }
    send(events, Event::OwnLease(own.lease.clone())).await?;

    let mut backoff = Backoff::new();
    // Set when our lease is found gone; handled at the top of the loop.
    let mut lost = false;
    // After a broken watch: the revision to watch from again instead of listing everything.
    let mut resume: Option<i64> = None;
    let mut peers: HashMap<Ipv4Net, Lease> = HashMap::new();
    'relist: loop {
        if lost {
            lost = false;
            resume = None;
            let old = own.lease.subnet;
            mgr.set_previous(old);
            own = acquire(&mut mgr, events).await?;
            if own.lease.subnet != old {
                tracing::warn!(old = %old, new = %own.lease.subnet, "re-acquired a DIFFERENT subnet; pods on the old one lose connectivity");
                if let Err(e) = write_env(opts, &config, &node, own.lease.subnet) {
                    return Ok(Err(e));
                }
            } else {
                tracing::warn!(subnet = %old, "re-acquired our subnet lease");
            }
            send(events, Event::OwnLease(own.lease.clone())).await?;
        }

        let mut watch = if let Some(from) = resume {
            // Resume where the broken watch stopped: every change since arrives as events.
            // A compacted history shows up as `Compacted` (here or as the watch's first answer).
            match mgr.registry.watch_subnets(from).await {
                Ok(w) => {
                    tracing::info!(revision = from, "subnet watch resumed");
                    resume = None;
                    w
                }
                Err(RegistryError::Compacted(r)) => {
                    tracing::info!(
                        revision = r,
                        "watch history compacted while disconnected; listing leases again"
                    );
                    resume = None;
                    continue 'relist;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "resuming the subnet watch failed; retrying");
                    crate::ops::metrics::etcd_reconnect();
                    tokio::select! {
                        _ = backoff.wait() => {}
                        _ = events.closed() => return Err(Closed),
                    }
                    continue 'relist;
                }
            }
        } else {
            let (kvs, rev) = match mgr.registry.list_subnets().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "listing subnet leases failed; retrying");
                    crate::ops::metrics::etcd_reconnect();
                    tokio::select! {
                        _ = backoff.wait() => {}
                        _ = events.closed() => return Err(Closed),
                    }
                    continue 'relist;
                }
            };
            if !mgr.still_ours(&kvs, own.lease.subnet) {
                tracing::warn!(subnet = %own.lease.subnet, "our subnet lease is gone from etcd; acquiring a lease again");
                lost = true;
                continue 'relist;
            }
            peers = mgr.peers_from(&kvs, own.lease.subnet);
            let mut all: Vec<Lease> = peers.values().cloned().collect();
            all.sort_by_key(|l| l.subnet);
            send(events, Event::Resync(all)).await?;

            match mgr.registry.watch_subnets(rev + 1).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "watching subnet leases failed; retrying");
                    crate::ops::metrics::etcd_reconnect();
                    // Nothing was missed yet: watch from right after the listing.
                    if !matches!(e, RegistryError::Compacted(_)) {
                        resume = Some(rev + 1);
                    }
                    tokio::select! {
                        _ = backoff.wait() => {}
                        _ = events.closed() => return Err(Closed),
                    }
                    continue 'relist;
                }
            }
        };
        backoff.reset();
        let mut renew_at = mgr.renew_at(&own);
        // Consecutive failed renewals: the retry waits 1, 2, 4, 8, then 10 s.
        let mut renew_failures: u32 = 0;

        loop {
            let renew_sleep = async {
                match renew_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                batch = watch.next() => match batch {
                    Ok(evs) => {
                        for ev in evs {
                            if handle_event(&mut mgr, &own, &mut peers, ev, events).await? {
                                lost = true;
                            }
                        }
                        if lost {
                            tracing::warn!(subnet = %own.lease.subnet, "our subnet lease was deleted or taken over; acquiring a lease again");
                            continue 'relist;
                        }
                    }
                    Err(RegistryError::Compacted(r)) => {
                        tracing::info!(revision = r, "watch history compacted; listing leases again");
                        continue 'relist;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "subnet watch failed; reconnecting");
                        crate::ops::metrics::etcd_reconnect();
                        resume = Some(watch.revision() + 1);
                        tokio::select! {
                            _ = backoff.wait() => {}
                            _ = events.closed() => return Err(Closed),
                        }
                        continue 'relist;
                    }
                },
                _ = renew_sleep => {
                    match mgr.renew(&mut own).await {
                        Ok(()) => {
                            crate::ops::metrics::lease_renewed(own.lease.expiration);
                            renew_at = mgr.renew_at(&own);
                            renew_failures = 0;
                        }
                        Err(SubnetError::Registry(RegistryError::LeaseNotFound(_))) => {
                            tracing::warn!(subnet = %own.lease.subnet, "our etcd lease expired before renewal; acquiring a lease again");
                            lost = true;
                            continue 'relist;
                        }
                        Err(e) => {
                            // Quick at first: the next attempt usually reaches a live member.
                            let retry = Duration::from_secs(1 << renew_failures.min(3)).min(Duration::from_secs(10));
                            renew_failures += 1;
                            tracing::warn!(error = %e, ?retry, "renewing the subnet lease failed; retrying");
                            renew_at = Some(Instant::now() + retry);
                        }
                    }
                }
                _ = events.closed() => return Err(Closed),
            }
        }
    }
}

/// Applies one watch event; returns `true` when it means our own lease is lost.
async fn handle_event<R: Registry>(
    mgr: &mut SubnetManager<R>,
    own: &OwnLease,
    peers: &mut HashMap<Ipv4Net, Lease>,
    ev: WatchEvent,
    events: &mpsc::Sender<Event>,
) -> Result<bool, Closed> {
    let own_sn = own.lease.subnet;
    match ev {
        WatchEvent::Put(kv) => {
            let sn = parse_subnet_key(&kv.key).ok();
            if sn == Some(own_sn) {
                // Our own renewals/updates echo back; anything else on our key is a takeover.
                return Ok(crate::subnet::probe_public_ip(&kv.value) != Some(mgr.public_ip()));
            }
            match mgr.peer_from(&kv) {
                Some(l) => {
                    if peers.get(&l.subnet).map(|p| &p.attrs) != Some(&l.attrs) {
                        peers.insert(l.subnet, l.clone());
                        tracing::info!(subnet = %l.subnet, public_ip = %l.attrs.public_ip, "peer lease added or changed");
                        send(events, Event::PeerUpsert(l)).await?;
                    }
                }
                None => {
                    // Became foreign/malformed: whatever we had for it is gone.
                    if let Some(old) = sn.and_then(|sn| peers.remove(&sn)) {
                        send(events, Event::PeerRemove(old)).await?;
                    }
                }
            }
        }
        WatchEvent::Delete { key } => {
            mgr.forget(&key);
            let Ok(sn) = parse_subnet_key(&key) else {
                return Ok(false);
            };
            if sn == own_sn {
                return Ok(true);
            }
            if let Some(old) = peers.remove(&sn) {
                tracing::info!(subnet = %sn, public_ip = %old.attrs.public_ip, "peer lease removed");
                send(events, Event::PeerRemove(old)).await?;
            }
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subnet::{MemRegistry, SUBNET_TTL};

    const CONFIG: &str = r#"{"Network":"10.9.0.0/16","Backend":{"Type":"vxlan","VNI":7}}"#;

    fn node(last: u8) -> NodeIdentity {
        NodeIdentity {
            public_ip: Ipv4Addr::new(198, 18, 0, last),
            vtep_mac: [2, 0, 0, 0, 0, last],
            iface_mtu: 1500,
        }
    }

    fn opts(name: &str) -> RunOptions {
        let dir = std::env::temp_dir().join(format!("control-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        RunOptions {
            subnet_file: dir.join("subnet.env"),
            ip_masq: false,
            renew_margin: Duration::from_secs(3600),
        }
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
        let o = opts("env");
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
        let first = Ipv4Addr::from(u32::from(l.subnet.network()) + 1);
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

    #[tokio::test(start_paused = true)]
    async fn bad_config_is_fatal_with_field() {
        let reg = MemRegistry::default();
        reg.set_network_config(r#"{"Network":"10.9.0.0/16","Backend":{"Type":"host-gw"}}"#);
        let (tx, _rx) = mpsc::channel(64);
        let err = run_with_registry(reg, &opts("bad"), node(1), tx)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("Backend.Type"), "{err}");
        assert!(err.to_string().contains("only the vxlan backend"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn peers_flow_and_own_loss_reacquires_same_subnet() {
        let reg = MemRegistry::default();
        reg.set_network_config(CONFIG);
        let o = opts("loss");
        let (mut rx, h, l) = start(&reg, &o, node(1)).await;
        assert_eq!(next(&mut rx).await, Event::Resync(vec![]));

        // A peer appears, changes, and disappears; foreign and malformed leases are skipped.
        let psn: Ipv4Net = "10.9.200.0/24".parse().unwrap();
        let pattrs = LeaseAttrs::vxlan(Ipv4Addr::new(198, 18, 0, 2), 7, [2, 0, 0, 0, 0, 2]);
        reg.put_raw(
            "10.9.201.0/24".parse().unwrap(),
            r#"{"PublicIP":"198.18.0.3","BackendType":"host-gw"}"#,
            None,
        );
        reg.put_raw_key("not-a-subnet", "{}");
        reg.put_raw(psn, &pattrs.to_json(), Some(SUBNET_TTL));
        let Event::PeerUpsert(p) = next(&mut rx).await else {
            panic!("expected PeerUpsert")
        };
        assert_eq!((p.subnet, &p.attrs), (psn, &pattrs));
        reg.delete_raw(psn);
        let Event::PeerRemove(p) = next(&mut rx).await else {
            panic!("expected PeerRemove")
        };
        assert_eq!(p.subnet, psn);

        // Our key is deleted: same subnet again, announced again, subnet.env unchanged.
        let env_before = std::fs::read_to_string(&o.subnet_file).unwrap();
        reg.delete_raw(l.subnet);
        let Event::OwnLease(l2) = next(&mut rx).await else {
            panic!("expected OwnLease after loss")
        };
        assert_eq!(l2.subnet, l.subnet);
        assert!(reg.get_raw(l.subnet).is_some());
        assert_eq!(std::fs::read_to_string(&o.subnet_file).unwrap(), env_before);
        assert!(matches!(next(&mut rx).await, Event::Resync(_)));

        // Our key is taken over by another node: a new subnet, subnet.env rewritten.
        reg.delete_raw(l.subnet);
        reg.put_raw(l.subnet, &pattrs.to_json(), None);
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
                Ipv4Addr::from(u32::from(l3.subnet.network()) + 1)
            )));
        assert!(!h.is_finished());
        h.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn renews_before_expiry_and_survives_expiry() {
        let reg = MemRegistry::default();
        reg.set_network_config(CONFIG);
        let o = opts("renew");
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
        assert!(reg.get_raw(l.subnet).is_some());

        // An outage longer than the remaining TTL: the key expires; the agent comes back with it.
        reg.set_offline(true);
        tokio::time::sleep(Duration::from_secs(25 * 3600)).await;
        reg.set_offline(false);
        assert!(
            reg.get_raw(l.subnet).is_none(),
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
        assert!(reg.get_raw(l.subnet).is_some());
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
        let (r2, o) = (reg.clone(), opts("exhausted"));
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
        assert_eq!(l.subnet, held[1]);
        assert!(Instant::now() - t0 <= EXHAUSTED_RETRY + Duration::from_secs(1));
        h.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn broken_watch_resumes_and_compaction_relists() {
        let reg = MemRegistry::default();
        reg.set_network_config(CONFIG);
        let o = opts("resume");
        let (mut rx, h, _l) = start(&reg, &o, node(1)).await;
        assert_eq!(next(&mut rx).await, Event::Resync(vec![]));
        let peer = |last: u8| LeaseAttrs::vxlan(Ipv4Addr::new(198, 18, 0, last), 7, [2, 0, 0, 0, 0, last]);
        let sn = |s: &str| -> Ipv4Net { s.parse().unwrap() };
        reg.put_raw(sn("10.9.50.0/24"), &peer(50).to_json(), Some(SUBNET_TTL));
        assert!(matches!(next(&mut rx).await, Event::PeerUpsert(l) if l.subnet == sn("10.9.50.0/24")));

        // Watch broken, history kept: the resumed watch delivers what happened meanwhile as
        // events, without a full re-list.
        reg.set_offline(true);
        tokio::time::sleep(Duration::from_secs(1)).await;
        reg.put_raw(sn("10.9.51.0/24"), &peer(51).to_json(), Some(SUBNET_TTL));
        tokio::time::sleep(Duration::from_secs(1)).await;
        reg.set_offline(false);
        match next_long(&mut rx).await {
            Event::PeerUpsert(l) => assert_eq!(l.subnet, sn("10.9.51.0/24")),
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
        match next_long(&mut rx).await {
            Event::Resync(ls) => {
                let got: Vec<Ipv4Net> = ls.iter().map(|l| l.subnet).collect();
                assert_eq!(got, vec![sn("10.9.51.0/24"), sn("10.9.52.0/24")]);
            }
            ev => panic!("expected a Resync after compaction, got {ev:?}"),
        }
        // And the new watch works.
        reg.delete_raw(sn("10.9.51.0/24"));
        assert!(matches!(next(&mut rx).await, Event::PeerRemove(l) if l.subnet == sn("10.9.51.0/24")));
        assert!(!h.is_finished());
        h.abort();
    }
}
