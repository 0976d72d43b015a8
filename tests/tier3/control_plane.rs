//! The control plane against a real etcd (root: each etcd lives in its own network namespace).
//!
//! Run: `cargo test -p overlay-tests --test control_plane -- --test-threads=1`

use std::{collections::HashSet, net::Ipv4Addr, path::PathBuf, time::Duration};

use overlay_agent::{
    cli::AgentArgs,
    control::{
        lease::{Lease, LeaseAttrs},
        run, run_with_registry,
        subnet::{
            etcd::{EtcdOptions, EtcdRegistry},
            SUBNET_TTL,
        },
        ControlError, Event, NodeIdentity, RunOptions,
    },
    metrics::METRICS,
};
use overlay_tests::{
    etcd::{Etcd, EtcdCluster},
    netns::require_root,
};
use tokio::{sync::mpsc, task::JoinHandle, time::timeout};

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":1}}"#;

fn key(subnet: &str) -> String {
    format!("{PREFIX}/subnets/{}", subnet.replace('/', "-"))
}

fn node(last: u8) -> NodeIdentity {
    NodeIdentity {
        public_ip: Some(Ipv4Addr::new(198, 18, 0, last)),
        public_ipv6: None,
        vtep_mac: [0x0e, 0, 0, 0, 0, last],
        iface_mtu: 1500,
        iface_addrs: Vec::new(),
    }
}

/// A temp dir removed on drop.
struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("cp-{tag}-{}", overlay_tests::netns::unique_name("t")));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Agent {
    rx: mpsc::Receiver<Event>,
    task: JoinHandle<Result<(), ControlError>>,
    own: Lease,
    subnet_file: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn args(etcd: &Etcd, subnet_file: &std::path::Path) -> AgentArgs {
    AgentArgs::try_parse_from([
        "overlay-agent",
        "--etcd-endpoints",
        &etcd.endpoint(),
        "--etcd-prefix",
        PREFIX,
        "--subnet-file",
        &subnet_file.to_string_lossy(),
    ])
    .unwrap()
}

fn spawn(
    etcd: &Etcd,
    subnet_file: PathBuf,
    n: NodeIdentity,
) -> (mpsc::Receiver<Event>, JoinHandle<Result<(), ControlError>>) {
    spawn_args(args(etcd, &subnet_file), n)
}

fn spawn_args(
    a: AgentArgs,
    n: NodeIdentity,
) -> (mpsc::Receiver<Event>, JoinHandle<Result<(), ControlError>>) {
    let (tx, rx) = mpsc::channel(256);
    let task = tokio::spawn(async move { run(&a.control_options(), n, tx).await });
    (rx, task)
}

async fn recv(rx: &mut mpsc::Receiver<Event>, within: Duration, what: &str) -> Event {
    match timeout(within, rx.recv()).await {
        Ok(Some(e)) => e,
        Ok(None) => panic!("event channel closed while waiting for {what}"),
        Err(_) => panic!("no event within {within:?} while waiting for {what}"),
    }
}

/// Waits for Config then OwnLease.
async fn start(etcd: &Etcd, subnet_file: PathBuf, n: NodeIdentity) -> Agent {
    let (rx, task) = spawn(etcd, subnet_file.clone(), n);
    started(rx, task, subnet_file).await
}

async fn started(
    mut rx: mpsc::Receiver<Event>,
    task: JoinHandle<Result<(), ControlError>>,
    subnet_file: PathBuf,
) -> Agent {
    let ev = recv(&mut rx, Duration::from_secs(10), "Config").await;
    assert!(
        matches!(ev, Event::Config(_)),
        "expected Config first, got {ev:?}"
    );
    let own = match recv(&mut rx, Duration::from_secs(10), "OwnLease").await {
        Event::OwnLease(l) => l,
        ev => panic!("expected OwnLease second, got {ev:?}"),
    };
    Agent {
        rx,
        task,
        own,
        subnet_file,
    }
}

/// Skips events until `pred` matches one; panics after `within`.
async fn wait_for(
    rx: &mut mpsc::Receiver<Event>,
    within: Duration,
    what: &str,
    pred: impl Fn(&Event) -> bool,
) -> Event {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ev = recv(rx, left, what).await;
        if pred(&ev) {
            return ev;
        }
    }
}

fn etcd_with_config() -> Etcd {
    let etcd = Etcd::start_new().expect("starting etcd");
    etcd.put(&format!("{PREFIX}/config"), CONFIG).unwrap();
    etcd
}

fn first_host(l: &Lease) -> String {
    format!(
        "{}/{}",
        Ipv4Addr::from(u32::from(l.subnet.unwrap().network()) + 1),
        l.subnet.unwrap().prefix_len()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn two_agents_take_distinct_subnets() {
    require_root();
    let etcd = etcd_with_config();
    let tmp = TempDir::new("two");
    let mut a = start(&etcd, tmp.0.join("a.env"), node(1)).await;
    let mut b = start(&etcd, tmp.0.join("b.env"), node(2)).await;
    assert_ne!(a.own.subnet, b.own.subnet, "two nodes got the same subnet");

    // etcd holds flannel's exact JSON on a 24 h lease.
    let (value, lease) = etcd
        .get(&key(&a.own.subnet.unwrap().to_string()))
        .unwrap()
        .expect("A's key missing");
    assert_eq!(
        value,
        r#"{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}}"#
    );
    assert_ne!(lease, 0, "dynamic lease must be attached to an etcd lease");
    let ttl = etcd.lease_ttl(lease).unwrap();
    assert!(
        (86_000..=86_400).contains(&ttl),
        "lease TTL {ttl}, expected ~24 h"
    );

    // subnet.env in flannel's format.
    let env = std::fs::read_to_string(&a.subnet_file).unwrap();
    assert_eq!(
        env,
        format!(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={}\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
            first_host(&a.own)
        )
    );

    // Each sees the other.
    let b_sub = b.own.subnet;
    wait_for(&mut a.rx, Duration::from_secs(5), "A sees B", |e| match e {
        Event::PeerUpsert(l) => l.subnet == b_sub,
        Event::Resync(ls) => ls.iter().any(|l| l.subnet == b_sub),
        _ => false,
    })
    .await;
    let ev = wait_for(&mut b.rx, Duration::from_secs(5), "B's resync", |e| {
        matches!(e, Event::Resync(_))
    })
    .await;
    let Event::Resync(ls) = ev else { unreachable!() };
    assert_eq!(ls.len(), 1, "B should see exactly A: {ls:?}");
    assert_eq!(ls[0].subnet, a.own.subnet);
    assert_eq!(
        ls[0].attrs,
        LeaseAttrs::vxlan(Ipv4Addr::new(198, 18, 0, 1), 1, node(1).vtep_mac)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reservation_is_honoured_and_stays_without_ttl() {
    require_root();
    let etcd = etcd_with_config();
    let tmp = TempDir::new("resv");
    let k = key("10.244.42.0/24");
    etcd.put(&k, r#"{"PublicIP":"198.18.0.5","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:99"}}"#)
        .unwrap();
    let a = start(&etcd, tmp.0.join("a.env"), node(5)).await;
    assert_eq!(a.own.subnet.unwrap().to_string(), "10.244.42.0/24");
    assert_eq!(a.own.expiration, None, "a reservation never expires");
    let (value, lease) = etcd.get(&k).unwrap().expect("reservation key vanished");
    assert_eq!(lease, 0, "reservation was turned into an expiring lease");
    assert!(
        value.contains(r#""VtepMAC":"0e:00:00:00:00:05""#),
        "attrs not updated: {value}"
    );
    // Another node never gets the reserved subnet.
    let b = start(&etcd, tmp.0.join("b.env"), node(6)).await;
    assert_ne!(b.own.subnet, a.own.subnet);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(etcd.get(&k).unwrap().map(|(_, l)| l), Some(0));
}

/// `Backend.MTU` is the underlay MTU the tunnel is sized for, as flanneld reads it: a jumbo
/// underlay's 9000 gives pods 8950 in subnet.env, as flanneld writes it.
#[tokio::test(flavor = "multi_thread")]
async fn backend_mtu_is_the_underlay_s_and_pods_get_50_less() {
    require_root();
    let etcd = Etcd::start_new().expect("starting etcd");
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","MTU":9000}}"#,
    )
    .unwrap();
    let tmp = TempDir::new("mtu");
    let a = start(&etcd, tmp.0.join("a.env"), node(1)).await;
    let env = std::fs::read_to_string(&a.subnet_file).unwrap();
    assert!(env.contains("FLANNEL_MTU=8950\n"), "{env}");
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_reuses_subnet() {
    require_root();
    let etcd = etcd_with_config();
    let tmp = TempDir::new("restart");
    let file = tmp.0.join("a.env");
    let first = start(&etcd, file.clone(), node(7)).await;
    let sn = first.own.subnet.unwrap();
    drop(first);

    // Same node: found by PublicIP.
    let again = start(&etcd, file.clone(), node(7)).await;
    assert_eq!(
        again.own.subnet,
        Some(sn),
        "restart with the same PublicIP must reuse the lease"
    );
    drop(again);

    // Lease gone and PublicIP changed: subnet.env's subnet is taken when free.
    etcd.del(&key(&sn.to_string())).unwrap();
    let moved = start(&etcd, file.clone(), node(8)).await;
    assert_eq!(moved.own.subnet, Some(sn), "subnet from subnet.env not reused");
    let (value, _) = etcd.get(&key(&sn.to_string())).unwrap().unwrap();
    assert!(value.contains("198.18.0.8"), "{value}");
}

#[tokio::test(flavor = "multi_thread")]
async fn deleted_key_is_reacquired() {
    require_root();
    let etcd = etcd_with_config();
    let tmp = TempDir::new("del");
    let mut a = start(&etcd, tmp.0.join("a.env"), node(9)).await;
    let k = key(&a.own.subnet.unwrap().to_string());
    let env_before = std::fs::read_to_string(&a.subnet_file).unwrap();
    etcd.del(&k).unwrap();
    let ev = wait_for(&mut a.rx, Duration::from_secs(5), "OwnLease after delete", |e| {
        matches!(e, Event::OwnLease(_))
    })
    .await;
    let Event::OwnLease(l) = ev else { unreachable!() };
    assert_eq!(l.subnet, a.own.subnet, "should take the same subnet back");
    let (_, lease) = etcd.get(&k).unwrap().expect("key not recreated");
    assert_ne!(lease, 0);
    assert_eq!(std::fs::read_to_string(&a.subnet_file).unwrap(), env_before);
    assert!(!a.task.is_finished(), "agent exited after losing its lease");
}

#[tokio::test(flavor = "multi_thread")]
async fn peer_events_arrive_within_a_second() {
    require_root();
    let etcd = etcd_with_config();
    let tmp = TempDir::new("peer");
    let mut a = start(&etcd, tmp.0.join("a.env"), node(10)).await;
    let ev = recv(&mut a.rx, Duration::from_secs(5), "initial Resync").await;
    assert_eq!(ev, Event::Resync(vec![]));

    // Skipped without a crash: other backend, malformed key, malformed value.
    etcd.put(
        &key("10.244.201.0/24"),
        r#"{"PublicIP":"198.18.0.201","BackendType":"host-gw","BackendData":null}"#,
    )
    .unwrap();
    etcd.put(&format!("{PREFIX}/subnets/garbage"), "{}").unwrap();
    etcd.put(&key("10.244.202.0/24"), "not json").unwrap();

    let peer = r#"{"PublicIP":"198.18.0.77","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:4d"}}"#;
    etcd.put_with_ttl(&key("10.244.177.0/24"), peer, 600).unwrap();
    match recv(&mut a.rx, Duration::from_secs(1), "PeerUpsert").await {
        Event::PeerUpsert(l) => {
            assert_eq!(l.subnet.unwrap().to_string(), "10.244.177.0/24");
            assert_eq!(l.attrs.public_ip, Ipv4Addr::new(198, 18, 0, 77));
            assert_eq!(l.attrs.to_json(), peer);
        }
        ev => panic!("expected PeerUpsert for 10.244.177.0/24, got {ev:?}"),
    }
    etcd.del(&key("10.244.177.0/24")).unwrap();
    match recv(&mut a.rx, Duration::from_secs(1), "PeerRemove").await {
        Event::PeerRemove(l) => assert_eq!(l.subnet.unwrap().to_string(), "10.244.177.0/24"),
        ev => panic!("expected PeerRemove for 10.244.177.0/24, got {ev:?}"),
    }
    assert!(!a.task.is_finished());
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_restart_is_survived() {
    require_root();
    let mut etcd = etcd_with_config();
    let tmp = TempDir::new("etcdrestart");
    let mut a = start(&etcd, tmp.0.join("a.env"), node(11)).await;
    let _ = recv(&mut a.rx, Duration::from_secs(5), "initial Resync").await;

    etcd.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!a.task.is_finished(), "agent exited while etcd was down");
    etcd.start().unwrap();

    let peer = r#"{"PublicIP":"198.18.0.88","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:58"}}"#;
    etcd.put(&key("10.244.188.0/24"), peer).unwrap();
    let ev = wait_for(
        &mut a.rx,
        Duration::from_secs(20),
        "peer after etcd restart",
        |e| match e {
            Event::PeerUpsert(l) => l.subnet.unwrap().to_string() == "10.244.188.0/24",
            Event::Resync(ls) => ls
                .iter()
                .any(|l| l.subnet.unwrap().to_string() == "10.244.188.0/24"),
            _ => false,
        },
    )
    .await;
    // The event carries the lease as written, not just its key.
    let leases = match ev {
        Event::PeerUpsert(l) => vec![l],
        Event::Resync(ls) => ls,
        other => unreachable!("wait_for matched {other:?}"),
    };
    let got = leases
        .iter()
        .find(|l| l.subnet.unwrap().to_string() == "10.244.188.0/24")
        .expect("the peer is in the matched event");
    assert_eq!(got.attrs.public_ip.to_string(), "198.18.0.88");
    assert_eq!(
        got.attrs.backend_data.as_ref().map(|d| d.vtep_mac.to_string()),
        Some("0e:00:00:00:00:58".to_string())
    );
    assert!(
        !a.task.is_finished(),
        "agent exited after etcd restart: {:?}",
        etcd.log_tail()
    );
    assert!(
        etcd.get(&key(&a.own.subnet.unwrap().to_string()))
            .unwrap()
            .is_some(),
        "own lease lost across etcd restart"
    );

    // And events keep flowing after.
    etcd.del(&key("10.244.188.0/24")).unwrap();
    wait_for(
        &mut a.rx,
        Duration::from_secs(2),
        "PeerRemove after restart",
        |e| matches!(e, Event::PeerRemove(l) if l.subnet.unwrap().to_string() == "10.244.188.0/24"),
    )
    .await;
}

fn vxlan_value(last: u8) -> String {
    LeaseAttrs::vxlan(Ipv4Addr::new(198, 18, 1, last), 1, [0x0e, 0, 0, 0, 1, last]).to_json()
}

fn is_upsert(e: &Event, subnet: &str) -> bool {
    match e {
        Event::PeerUpsert(l) => l.subnet.unwrap().to_string() == subnet,
        Event::Resync(ls) => ls.iter().any(|l| l.subnet.unwrap().to_string() == subnet),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_exhausted_64_agents_no_duplicates_and_waiters_take_a_freed_lease() {
    require_root();
    let etcd = Etcd::start_new().expect("starting etcd");
    // Exactly 16 leasable /28s.
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.250.0.0/23","SubnetLen":28,"SubnetMin":"10.250.0.16","SubnetMax":"10.250.1.0","Backend":{"Type":"vxlan"}}"#,
    )
    .unwrap();
    let tmp = TempDir::new("pool");
    let exhausted_before = METRICS.pool_exhausted.get();
    type Agent = (mpsc::Receiver<Event>, JoinHandle<Result<(), ControlError>>);
    let mut agents: Vec<Agent> = (0..64u8)
        .map(|i| spawn(&etcd, tmp.0.join(format!("{i}.env")), node(100 + i)))
        .collect();
    // Which agent holds which subnet; every OwnLease ever announced.
    let mut holder: Vec<Option<String>> = vec![None; 64];
    let mut announced: Vec<(usize, String)> = Vec::new();
    let drain = |agents: &mut Vec<(mpsc::Receiver<Event>, JoinHandle<_>)>,
                 holder: &mut Vec<Option<String>>,
                 announced: &mut Vec<(usize, String)>| {
        for (i, (rx, _)) in agents.iter_mut().enumerate() {
            while let Ok(ev) = rx.try_recv() {
                if let Event::OwnLease(l) = ev {
                    holder[i] = Some(l.subnet.unwrap().to_string());
                    announced.push((i, l.subnet.unwrap().to_string()));
                }
            }
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        drain(&mut agents, &mut holder, &mut announced);
        let held = holder.iter().flatten().count();
        let exhausted = METRICS.pool_exhausted.get() - exhausted_before;
        if held == 16 && exhausted >= 48 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after 40 s: {held} agents hold a lease (want 16), {exhausted} exhausted reports (want ≥ 48); {announced:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    drain(&mut agents, &mut holder, &mut announced);
    let subnets: HashSet<&String> = holder.iter().flatten().collect();
    assert_eq!(subnets.len(), 16, "a subnet was handed out twice: {holder:?}");
    assert_eq!(
        announced.len(),
        16,
        "leases announced beyond the pool: {announced:?}"
    );
    for (i, (_, task)) in agents.iter().enumerate() {
        assert!(
            !task.is_finished(),
            "agent {i} stopped; an exhausted pool must be waited out"
        );
    }
    assert_eq!(etcd.keys(&format!("{PREFIX}/subnets/")).unwrap().len(), 16);

    // One holder goes away for good and its lease is deleted: exactly one waiter takes it.
    let gone = holder.iter().position(Option::is_some).unwrap();
    let freed = holder[gone].take().unwrap();
    agents[gone].1.abort();
    etcd.del(&key(&freed)).unwrap();
    let t0 = std::time::Instant::now();
    let taker = loop {
        drain(&mut agents, &mut holder, &mut announced);
        if announced.len() > 16 {
            break announced[16].clone();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "nobody took the freed {freed} within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        taker.1, freed,
        "the waiter took another subnet than the freed one"
    );
    assert_ne!(taker.0, gone);
    tokio::time::sleep(Duration::from_secs(1)).await;
    drain(&mut agents, &mut holder, &mut announced);
    assert_eq!(
        announced.len(),
        17,
        "more than one waiter got a lease: {:?}",
        &announced[16..]
    );
    let subnets: HashSet<&String> = holder.iter().flatten().collect();
    assert_eq!(
        subnets.len(),
        16,
        "duplicate after the freed lease was taken: {holder:?}"
    );
    for (_, task) in &agents {
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_member_etcd_one_killed_at_a_time_agent_keeps_watching_and_renewing() {
    require_root();
    let mut cluster = EtcdCluster::start_new().expect("starting a 3-member etcd cluster");
    cluster
        .etcdctl(&["put", &format!("{PREFIX}/config"), CONFIG])
        .unwrap();
    let tmp = TempDir::new("members");
    let reg = EtcdRegistry::connect(&EtcdOptions {
        endpoints: cluster.endpoints(),
        prefix: PREFIX.to_string(),
        ..Default::default()
    })
    .await
    .unwrap();
    // Renew every 2 s instead of after 23 h, so renewal is exercised across the failovers.
    let opts = RunOptions {
        subnet_file: tmp.0.join("a.env"),
        ip_masq: false,
        renew_margin: SUBNET_TTL - Duration::from_secs(2),
    };
    let (tx, rx) = mpsc::channel(256);
    let task = tokio::spawn(async move { run_with_registry(reg, &opts, node(20), tx).await });
    let mut a = started(rx, task, tmp.0.join("a.env")).await;
    let own_key = key(&a.own.subnet.unwrap().to_string());
    let lease_ttl = |c: &EtcdCluster| -> i64 {
        let v: serde_json::Value =
            serde_json::from_str(&c.etcdctl_retry(&["get", &own_key, "-w", "json"]).unwrap()).unwrap();
        let id = v["kvs"][0]["lease"]
            .as_i64()
            .expect("own key or its lease missing");
        let t: serde_json::Value = serde_json::from_str(
            &c.etcdctl_retry(&["lease", "timetolive", &format!("{id:x}"), "-w", "json"])
                .unwrap(),
        )
        .unwrap();
        t["ttl"].as_i64().unwrap_or(-1)
    };
    // Kill each member in turn (one of them carries the agent's watch), with the other two
    // keeping quorum.
    for m in 0..3 {
        let talking = cluster.members_with_client_connections().unwrap_or_default();
        cluster.kill_member(m);
        let sn = format!("10.244.{}.0/24", 200 + m);
        cluster
            .etcdctl_retry(&["put", &key(&sn), &vxlan_value(m as u8)])
            .unwrap();
        wait_for(
            &mut a.rx,
            Duration::from_secs(15),
            &format!("peer {sn} with member m{m} down"),
            |e| is_upsert(e, &sn),
        )
        .await;
        // Renewals go on through the other members: a renewal that hit the dead member is
        // retried after 1, 2, 4... s, so within 15 s the TTL is back within 3 s of 24 h.
        let t0 = std::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let ttl = lease_ttl(&cluster);
            if ttl >= 86_400 - 3 && t0.elapsed() >= Duration::from_secs(4) {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "own lease not renewed for 15 s with m{m} down (agent was connected to {talking:?}): TTL {ttl}"
            );
        }
        cluster.etcdctl_retry(&["del", &key(&sn)]).unwrap();
        wait_for(
            &mut a.rx,
            Duration::from_secs(15),
            &format!("removal of {sn}"),
            |e| match e {
                Event::PeerRemove(l) => l.subnet.unwrap().to_string() == sn,
                Event::Resync(ls) => !ls.iter().any(|l| l.subnet.unwrap().to_string() == sn),
                _ => false,
            },
        )
        .await;
        assert!(!a.task.is_finished(), "agent stopped with m{m} down");
        cluster.restart_member(m).unwrap();
    }
    // Never lost its lease on the way.
    let v = cluster.etcdctl(&["get", &own_key, "--print-value-only"]).unwrap();
    assert!(v.contains("198.18.0.20"), "own lease changed hands: {v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn compaction_while_disconnected_relists_and_converges() {
    require_root();
    let mut etcd = etcd_with_config();
    let tmp = TempDir::new("compact");
    let mut a = start(&etcd, tmp.0.join("a.env"), node(30)).await;
    let _ = recv(&mut a.rx, Duration::from_secs(5), "initial Resync").await;
    let (p1, p2, p3, p4) = (
        "10.244.131.0/24",
        "10.244.132.0/24",
        "10.244.133.0/24",
        "10.244.134.0/24",
    );
    etcd.put_with_ttl(&key(p1), &vxlan_value(131), 600).unwrap();
    etcd.put(&key(p2), &vxlan_value(132)).unwrap();
    wait_for(&mut a.rx, Duration::from_secs(5), "p2", |e| is_upsert(e, p2)).await;

    // Cut the agent off and restart etcd, so its watch breaks now and cannot come back.
    let reconnects = METRICS.etcd_reconnects.get();
    etcd.block_host(true).unwrap();
    etcd.stop();
    etcd.start().unwrap();
    // Meanwhile: p1 goes, p3 comes, many revisions, and the history is compacted.
    etcd.etcdctl_local(&["del", &key(p1)]).unwrap();
    etcd.etcdctl_local(&["put", &key(p3), &vxlan_value(133)]).unwrap();
    for i in 0..30 {
        etcd.etcdctl_local(&["put", &format!("{PREFIX}/noise"), &i.to_string()])
            .unwrap();
    }
    let v: serde_json::Value = serde_json::from_str(
        &etcd
            .etcdctl_local(&["get", &format!("{PREFIX}/noise"), "-w", "json"])
            .unwrap(),
    )
    .unwrap();
    let rev = v["header"]["revision"].as_i64().unwrap();
    etcd.etcdctl_local(&["compact", &rev.to_string()]).unwrap();
    assert!(
        METRICS.etcd_reconnects.get() > reconnects,
        "the agent did not notice its watch broke"
    );
    assert!(!a.task.is_finished());
    etcd.block_host(false).unwrap();

    // First thing after reconnecting: a full Resync (the resumed watch was compacted) that
    // no longer has p1 and has p3.
    let ev = wait_for(
        &mut a.rx,
        Duration::from_secs(20),
        "Resync after compaction",
        |e| !matches!(e, Event::Resync(ls) if ls.is_empty()),
    )
    .await;
    match ev {
        Event::Resync(ls) => {
            let got: Vec<String> = ls.iter().map(|l| l.subnet.unwrap().to_string()).collect();
            assert_eq!(
                got,
                vec![p2.to_string(), p3.to_string()],
                "Resync after compaction"
            );
        }
        ev => panic!("expected a Resync after compaction, got {ev:?}"),
    }
    // Events written after the compaction arrive.
    etcd.put(&key(p4), &vxlan_value(134)).unwrap();
    match recv(&mut a.rx, Duration::from_secs(2), "p4").await {
        Event::PeerUpsert(l) => assert_eq!(l.subnet.unwrap().to_string(), p4),
        ev => panic!("expected PeerUpsert {p4}, got {ev:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_leases_are_skipped_counted_once_per_key() {
    require_root();
    let etcd = etcd_with_config();
    let tmp = TempDir::new("malformed");
    let mut a = start(&etcd, tmp.0.join("a.env"), node(40)).await;
    let _ = recv(&mut a.rx, Duration::from_secs(5), "initial Resync").await;
    let before = METRICS.malformed_leases.get();
    let bad = [
        (format!("{PREFIX}/subnets/garbage"), vxlan_value(1)),
        (format!("{PREFIX}/subnets/10.244.300.0-24"), vxlan_value(2)),
        (format!("{PREFIX}/subnets/10.244.141.0-99"), vxlan_value(3)),
        (key("10.244.142.0/24"), "not json".to_string()),
        (
            key("10.244.143.0/24"),
            r#"{"PublicIP":"fd00::1","BackendType":"vxlan"}"#.to_string(),
        ),
        (
            key("10.244.144.0/24"),
            r#"{"PublicIP":"198.18.1.144","BackendType":"vxlan","BackendData":{"VNI":"x"}}"#.to_string(),
        ),
        (key("10.244.145.0/24"), "x".repeat(100_000)),
    ];
    for (k, v) in &bad {
        etcd.put(k, v).unwrap();
    }
    // Same keys again with other bad values: skipped, but neither warned nor counted twice.
    for (k, _) in &bad {
        etcd.put(k, "{}").unwrap();
    }
    // A foreign backend is skipped but is not malformed.
    etcd.put(
        &key("10.244.146.0/24"),
        r#"{"PublicIP":"198.18.1.146","BackendType":"host-gw"}"#,
    )
    .unwrap();
    let good = "10.244.147.0/24";
    etcd.put(&key(good), &vxlan_value(147)).unwrap();
    let ev = recv(
        &mut a.rx,
        Duration::from_secs(3),
        "the good peer after the bad ones",
    )
    .await;
    assert!(
        is_upsert(&ev, good),
        "expected only PeerUpsert {good}, got {ev:?}"
    );
    assert_eq!(
        METRICS.malformed_leases.get() - before,
        bad.len() as u64,
        "malformed count"
    );
    assert!(!a.task.is_finished());
}

fn tls_args(
    etcd: &Etcd,
    subnet_file: &std::path::Path,
    ca: &std::path::Path,
    key: &std::path::Path,
) -> AgentArgs {
    let p = etcd.pki().unwrap();
    AgentArgs::try_parse_from([
        "overlay-agent".to_string(),
        format!("--etcd-endpoints={}", etcd.endpoint()),
        format!("--etcd-cafile={}", ca.display()),
        format!("--etcd-certfile={}", p.client_cert.display()),
        format!("--etcd-keyfile={}", key.display()),
        format!("--subnet-file={}", subnet_file.display()),
    ])
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_with_client_certificates_and_clear_tls_errors() {
    require_root();
    let etcd = Etcd::start_new_tls().expect("starting etcd with TLS");
    etcd.put(&format!("{PREFIX}/config"), CONFIG).unwrap();
    let tmp = TempDir::new("tls");
    let p = etcd.pki().unwrap();

    // Right CA, client certificate: the agent works as without TLS.
    let (rx, task) = spawn_args(
        tls_args(&etcd, &tmp.0.join("a.env"), &p.ca, &p.client_key),
        node(50),
    );
    let mut a = started(rx, task, tmp.0.join("a.env")).await;
    etcd.put(&key("10.244.150.0/24"), &vxlan_value(150)).unwrap();
    wait_for(&mut a.rx, Duration::from_secs(5), "peer over TLS", |e| {
        is_upsert(e, "10.244.150.0/24")
    })
    .await;

    // A key file that does not exist: fatal at once, naming the flag and the file.
    let missing = tmp.0.join("no-such-client.key");
    let (_rx, task) = spawn_args(tls_args(&etcd, &tmp.0.join("b.env"), &p.ca, &missing), node(51));
    let err = timeout(Duration::from_secs(5), task)
        .await
        .expect("agent with a missing key file kept running")
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--etcd-keyfile") && err.contains(&missing.display().to_string()),
        "{err}"
    );

    // The wrong CA: the server's certificate cannot be verified; the error says so and names
    // --etcd-cafile and the file.
    let (_rx, task) = spawn_args(
        tls_args(&etcd, &tmp.0.join("c.env"), &p.other_ca, &p.client_key),
        node(52),
    );
    let err = timeout(Duration::from_secs(15), task)
        .await
        .expect("agent with a wrong CA kept running")
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--etcd-cafile") && err.contains(&p.other_ca.display().to_string()),
        "{err}"
    );
    assert!(err.contains("certificate"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_username_and_password() {
    require_root();
    let mut etcd = etcd_with_config();
    etcd.enable_auth("s3cret").unwrap();
    let tmp = TempDir::new("auth");
    let with = |pw: &str, file: &str| {
        AgentArgs::try_parse_from([
            "overlay-agent".to_string(),
            format!("--etcd-endpoints={}", etcd.endpoint()),
            "--etcd-username=root".to_string(),
            format!("--etcd-password={pw}"),
            format!("--subnet-file={}", tmp.0.join(file).display()),
        ])
        .unwrap()
    };
    let (rx, task) = spawn_args(with("s3cret", "a.env"), node(60));
    let a = started(rx, task, tmp.0.join("a.env")).await;
    assert!(etcd
        .get(&key(&a.own.subnet.unwrap().to_string()))
        .unwrap()
        .is_some());
    // A wrong password is reported as such (the agent keeps retrying: it may be fixed in etcd).
    let err = EtcdRegistry::connect(&with("wrong", "b.env").etcd_options())
        .await
        .err()
        .expect("wrong password accepted")
        .to_string();
    assert!(
        err.contains("authentication failed") && err.contains("--etcd-username"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Dual-stack and IPv6-only, in flannel's etcd schema.

const DUAL_CONFIG: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan","VNI":1}}"#;
const V6_ONLY_CONFIG: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan","VNI":1}}"#;

fn v6_addr(last: u8) -> std::net::Ipv6Addr {
    format!("fd00:198:18::{last:x}").parse().unwrap()
}

/// A node with both public addresses (an IPv6-only config must publish only the IPv6 one).
fn node_dual(last: u8) -> NodeIdentity {
    NodeIdentity {
        public_ipv6: Some(v6_addr(last)),
        ..node(last)
    }
}

/// Starts an agent on `config`'s etcd whose lease is renewed every ~2 s (renew margin TTL - 2 s).
async fn start_renewing(etcd: &Etcd, subnet_file: PathBuf, n: NodeIdentity) -> Agent {
    let reg = EtcdRegistry::connect(&EtcdOptions {
        endpoints: vec![etcd.endpoint()],
        prefix: PREFIX.to_string(),
        ..Default::default()
    })
    .await
    .unwrap();
    let opts = RunOptions {
        subnet_file: subnet_file.clone(),
        ip_masq: false,
        renew_margin: SUBNET_TTL - Duration::from_secs(2),
    };
    let (tx, rx) = mpsc::channel(256);
    let task = tokio::spawn(async move { run_with_registry(reg, &opts, n, tx).await });
    started(rx, task, subnet_file).await
}

/// The etcd key flannel's `MakeSubnetKey` gives a lease.
fn lease_key(l: &Lease) -> String {
    format!("{PREFIX}/subnets/{}", l.key())
}

/// Stops `agent` and starts it again as `same`: it must take its lease back (found by its
/// public address). Then, that lease deleted, starts it as `moved` (other addresses): it must
/// take the same subnets again, from subnet.env. `what` names the lease in messages.
async fn restart_then_move(etcd: &Etcd, agent: Agent, same: NodeIdentity, moved: NodeIdentity, what: &str) {
    let (own, file) = (agent.own.clone(), agent.subnet_file.clone());
    drop(agent);
    let again = start(etcd, file.clone(), same).await;
    assert_eq!(again.own.key(), own.key(), "restart must reuse the {what} lease");
    drop(again);
    etcd.del(&lease_key(&own)).unwrap();
    let moved = start(etcd, file, moved).await;
    assert_eq!(
        moved.own.key(),
        own.key(),
        "{what}: subnet.env's subnets not reused"
    );
}

/// Every lease another agent sees in `rx` until it has seen `want` (by key); returns it.
async fn peer_seen(rx: &mut mpsc::Receiver<Event>, want: &Lease, what: &str) -> Lease {
    let k = want.key();
    let ev = wait_for(rx, Duration::from_secs(5), what, |e| match e {
        Event::PeerUpsert(l) => l.key() == k,
        Event::Resync(ls) => ls.iter().any(|l| l.key() == k),
        _ => false,
    })
    .await;
    match ev {
        Event::PeerUpsert(l) => l,
        Event::Resync(ls) => ls.into_iter().find(|l| l.key() == k).unwrap(),
        other => unreachable!("{other:?}"),
    }
}

/// Waits until the etcd lease behind `key` has been renewed back to within 3 s of 24 h.
async fn assert_renewed(etcd: &Etcd, key: &str) {
    let t0 = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    loop {
        let (_, lease) = etcd.get(key).unwrap().expect("own key vanished");
        let ttl = etcd.lease_ttl(lease).unwrap();
        if ttl >= 86_400 - 3 {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{key}: lease not renewed (TTL {ttl})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dual_stack_agents_take_flannel_keys_renew_restart_and_see_each_other() {
    require_root();
    let etcd = Etcd::start_new().expect("starting etcd");
    etcd.put(&format!("{PREFIX}/config"), DUAL_CONFIG).unwrap();
    let tmp = TempDir::new("dual");
    let mut a = start_renewing(&etcd, tmp.0.join("a.env"), node_dual(1)).await;
    let mut b = start_renewing(&etcd, tmp.0.join("b.env"), node_dual(2)).await;

    // Keys and values exactly as a dual-stack flanneld writes them.
    for (agent, last) in [(&a, 1u8), (&b, 2)] {
        let (sn4, sn6) = (agent.own.subnet.unwrap(), agent.own.ipv6_subnet.unwrap());
        assert_eq!(sn4.prefix_len(), 24);
        assert_eq!(sn6.prefix_len(), 64);
        assert!(
            "fd00:10:244::/56"
                .parse::<ipnet::Ipv6Net>()
                .unwrap()
                .contains(&sn6)
                && sn6.network().segments()[3] != 0,
            "{sn6} outside [IPv6SubnetMin, IPv6SubnetMax]"
        );
        let key = format!("{PREFIX}/subnets/{}-24&{}-64", sn4.network(), sn6.network());
        let (value, lease) = etcd
            .get(&key)
            .unwrap()
            .unwrap_or_else(|| panic!("no key {key}; keys: {:?}", etcd.keys(PREFIX)));
        assert_eq!(
            value,
            format!(
                r#"{{"PublicIP":"198.18.0.{last}","PublicIPv6":"fd00:198:18::{last}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0e:00:00:00:00:0{last}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"0e:00:00:00:00:0{last}"}}}}"#
            )
        );
        assert_ne!(lease, 0);
        // subnet.env as flanneld's WriteSubnetFile.
        assert_eq!(
            std::fs::read_to_string(&agent.subnet_file).unwrap(),
            format!(
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={}\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET={}1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
                first_host(&agent.own),
                sn6.network()
            )
        );
    }
    assert_ne!(a.own.subnet, b.own.subnet);
    assert_ne!(a.own.ipv6_subnet, b.own.ipv6_subnet);

    // Each sees the other with both families.
    let b_seen = peer_seen(&mut a.rx, &b.own, "A sees B").await;
    let a_seen = peer_seen(&mut b.rx, &a.own, "B sees A").await;
    for (seen, own, last) in [(&b_seen, &b.own, 2u8), (&a_seen, &a.own, 1)] {
        let v4 = seen.v4().expect("IPv4 side");
        assert_eq!(
            (Some(v4.subnet), v4.public_ip),
            (own.subnet, Ipv4Addr::new(198, 18, 0, last))
        );
        let v6 = seen.v6().expect("IPv6 side");
        assert_eq!(
            (
                Some(v6.subnet),
                v6.public_ip,
                v6.vtep.unwrap().vni,
                v6.vtep.unwrap().vtep_mac.0
            ),
            (own.ipv6_subnet, v6_addr(last), 1, [0x0e, 0, 0, 0, 0, last])
        );
    }

    // Renewed (the margin makes it every ~2 s here).
    assert_renewed(&etcd, &lease_key(&a.own)).await;

    // A dual-stack flanneld's lease, written by hand as it writes it: a peer in both families.
    // Its subnets lie past the first 100 free ones the agents pick from (10.244.1-100,
    // fd00:10:244:1-64::), so neither agent can hold them (10.244.99.0/24 could: then that side
    // was refused as an overlap, once in a few dozen runs).
    let flanneld = r#"{"PublicIP":"198.18.0.99","PublicIPv6":"fd00:198:18::99","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"be:0c:3e:5f:61:d2"},"BackendV6Data":{"VNI":1,"VtepMAC":"56:8a:c4:1e:7b:90"}}"#;
    let fkey = format!("{PREFIX}/subnets/10.244.199.0-24&fd00:10:244:c7::-64");
    etcd.put_with_ttl(&fkey, flanneld, 600).unwrap();
    let ev = wait_for(&mut a.rx, Duration::from_secs(5), "the flanneld lease", |e| {
        matches!(e, Event::PeerUpsert(l) if l.subnet.map(|s| s.to_string()).as_deref() == Some("10.244.199.0/24"))
    })
    .await;
    let Event::PeerUpsert(f) = ev else { unreachable!() };
    assert_eq!(
        f.attrs.to_json(),
        flanneld,
        "the flanneld value must round-trip byte for byte"
    );
    let (v4, v6) = (f.v4().unwrap(), f.v6().unwrap());
    assert_eq!(
        (
            v4.subnet.to_string(),
            v4.public_ip.to_string(),
            v4.vtep.unwrap().vtep_mac.to_string()
        ),
        (
            "10.244.199.0/24".into(),
            "198.18.0.99".into(),
            "be:0c:3e:5f:61:d2".into()
        )
    );
    assert_eq!(
        (
            v6.subnet.to_string(),
            v6.public_ip.to_string(),
            v6.vtep.unwrap().vni,
            v6.vtep.unwrap().vtep_mac.to_string()
        ),
        (
            "fd00:10:244:c7::/64".into(),
            "fd00:198:18::99".into(),
            1,
            "56:8a:c4:1e:7b:90".into()
        )
    );
    etcd.del(&fkey).unwrap();
    wait_for(
        &mut a.rx,
        Duration::from_secs(5),
        "the flanneld lease removed",
        |e| matches!(e, Event::PeerRemove(l) if l.key() == f.key()),
    )
    .await;

    // Restart with the same PublicIP: the same key (found by PublicIP); then, the lease gone and
    // the PublicIPs changed, both subnets come back from subnet.env.
    let own_a = a.own.clone();
    restart_then_move(&etcd, a, node_dual(1), node_dual(8), "dual-stack").await;
    let (value, _) = etcd.get(&lease_key(&own_a)).unwrap().unwrap();
    assert!(value.contains(r#""PublicIPv6":"fd00:198:18::8""#), "{value}");
    assert!(!b.task.is_finished());
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_only_agents_take_flannel_keys_renew_restart_and_see_each_other() {
    require_root();
    let etcd = Etcd::start_new().expect("starting etcd");
    etcd.put(&format!("{PREFIX}/config"), V6_ONLY_CONFIG).unwrap();
    let tmp = TempDir::new("v6only");
    // The nodes have IPv4 addresses too; an IPv6-only network publishes none of them.
    let mut a = start_renewing(&etcd, tmp.0.join("a.env"), node_dual(0x21)).await;
    let mut b = start_renewing(&etcd, tmp.0.join("b.env"), node_dual(0x22)).await;
    for (agent, last) in [(&a, 0x21u8), (&b, 0x22)] {
        assert_eq!(agent.own.subnet, None);
        let sn6 = agent.own.ipv6_subnet.unwrap();
        let key = format!("{PREFIX}/subnets/0.0.0.0-0&{}-64", sn6.network());
        let (value, lease) = etcd
            .get(&key)
            .unwrap()
            .unwrap_or_else(|| panic!("no key {key}; keys: {:?}", etcd.keys(PREFIX)));
        assert_eq!(
            value,
            format!(
                r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::{last:x}","BackendType":"vxlan","BackendV6Data":{{"VNI":1,"VtepMAC":"0e:00:00:00:00:{last:02x}"}}}}"#
            )
        );
        assert_ne!(lease, 0);
        assert_eq!(
            std::fs::read_to_string(&agent.subnet_file).unwrap(),
            format!(
                "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET={}1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
                sn6.network()
            )
        );
    }
    // Two IPv6-only nodes (both PublicIP 0.0.0.0 in etcd) never share a lease.
    assert_ne!(a.own.key(), b.own.key());
    let b_seen = peer_seen(&mut a.rx, &b.own, "A sees B").await;
    assert_eq!(b_seen.v4(), None);
    let v6 = b_seen.v6().expect("IPv6 side");
    assert_eq!(
        (Some(v6.subnet), v6.public_ip, v6.vtep.unwrap().vtep_mac.0),
        (b.own.ipv6_subnet, v6_addr(0x22), [0x0e, 0, 0, 0, 0, 0x22])
    );
    let a_seen = peer_seen(&mut b.rx, &a.own, "B sees A").await;
    assert_eq!(a_seen.v6().unwrap().public_ip, v6_addr(0x21));

    assert_renewed(&etcd, &lease_key(&b.own)).await;

    // Our key deleted: the same IPv6 subnet is taken back.
    let k = lease_key(&a.own);
    etcd.del(&k).unwrap();
    let ev = wait_for(&mut a.rx, Duration::from_secs(5), "OwnLease after delete", |e| {
        matches!(e, Event::OwnLease(_))
    })
    .await;
    let Event::OwnLease(l) = ev else { unreachable!() };
    assert_eq!(l.key(), a.own.key());
    assert!(etcd.get(&k).unwrap().is_some(), "key not recreated");

    // Restart: found again by PublicIPv6; then, the key gone and another address, subnet.env's
    // IPv6 subnet is reused.
    restart_then_move(&etcd, b, node_dual(0x22), node_dual(0x28), "IPv6-only").await;
    assert!(!a.task.is_finished());
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_enabled_without_an_ipv6_address_is_refused() {
    require_root();
    let etcd = Etcd::start_new().expect("starting etcd");
    etcd.put(&format!("{PREFIX}/config"), DUAL_CONFIG).unwrap();
    let tmp = TempDir::new("nov6");
    let (mut rx, task) = spawn(&etcd, tmp.0.join("a.env"), node(3));
    assert!(matches!(
        recv(&mut rx, Duration::from_secs(10), "Config").await,
        Event::Config(_)
    ));
    let err = timeout(Duration::from_secs(5), task)
        .await
        .expect("agent without an IPv6 address kept running")
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("enables IPv6") && err.contains("--public-ipv6"),
        "{err}"
    );
    assert!(etcd.keys(&format!("{PREFIX}/subnets/")).unwrap().is_empty());
}
