//! The control plane against a real etcd (root: each etcd lives in its own network namespace).
//!
//! Run: `cargo test -p overlay-tests --test control_plane -- --test-threads=1`

use std::{collections::HashSet, net::Ipv4Addr, path::PathBuf, time::Duration};

use overlay_agent::{
    cli::AgentArgs,
    control::{run, ControlError, Event, NodeIdentity},
    lease::{Lease, LeaseAttrs},
};
use overlay_tests::{etcd::Etcd, netns::require_root};
use tokio::{sync::mpsc, task::JoinHandle, time::timeout};

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":1}}"#;

fn key(subnet: &str) -> String {
    format!("{PREFIX}/subnets/{}", subnet.replace('/', "-"))
}

fn node(last: u8) -> NodeIdentity {
    NodeIdentity {
        public_ip: Ipv4Addr::new(198, 18, 0, last),
        vtep_mac: [0x0e, 0, 0, 0, 0, last],
        iface_mtu: 1500,
    }
}

/// A temp dir removed on drop.
struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "cp-{tag}-{}",
            overlay_tests::netns::unique_name("t")
        ));
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
    let a = args(etcd, &subnet_file);
    let (tx, rx) = mpsc::channel(256);
    let task = tokio::spawn(async move { run(&a, n, tx).await });
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
    let (mut rx, task) = spawn(etcd, subnet_file.clone(), n);
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
        Ipv4Addr::from(u32::from(l.subnet.network()) + 1),
        l.subnet.prefix_len()
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
        .get(&key(&a.own.subnet.to_string()))
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
        format!("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={}\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n", first_host(&a.own))
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
    let Event::Resync(ls) = ev else {
        unreachable!()
    };
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
    assert_eq!(a.own.subnet.to_string(), "10.244.42.0/24");
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

#[tokio::test(flavor = "multi_thread")]
async fn restart_reuses_subnet() {
    require_root();
    let etcd = etcd_with_config();
    let tmp = TempDir::new("restart");
    let file = tmp.0.join("a.env");
    let first = start(&etcd, file.clone(), node(7)).await;
    let sn = first.own.subnet;
    drop(first);

    // Same node: found by PublicIP.
    let again = start(&etcd, file.clone(), node(7)).await;
    assert_eq!(
        again.own.subnet, sn,
        "restart with the same PublicIP must reuse the lease"
    );
    drop(again);

    // Lease gone and PublicIP changed: subnet.env's subnet is taken when free.
    etcd.del(&key(&sn.to_string())).unwrap();
    let moved = start(&etcd, file.clone(), node(8)).await;
    assert_eq!(moved.own.subnet, sn, "subnet from subnet.env not reused");
    let (value, _) = etcd.get(&key(&sn.to_string())).unwrap().unwrap();
    assert!(value.contains("198.18.0.8"), "{value}");
}

#[tokio::test(flavor = "multi_thread")]
async fn deleted_key_is_reacquired() {
    require_root();
    let etcd = etcd_with_config();
    let tmp = TempDir::new("del");
    let mut a = start(&etcd, tmp.0.join("a.env"), node(9)).await;
    let k = key(&a.own.subnet.to_string());
    let env_before = std::fs::read_to_string(&a.subnet_file).unwrap();
    etcd.del(&k).unwrap();
    let ev = wait_for(
        &mut a.rx,
        Duration::from_secs(5),
        "OwnLease after delete",
        |e| matches!(e, Event::OwnLease(_)),
    )
    .await;
    let Event::OwnLease(l) = ev else {
        unreachable!()
    };
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
    etcd.put(&format!("{PREFIX}/subnets/garbage"), "{}")
        .unwrap();
    etcd.put(&key("10.244.202.0/24"), "not json").unwrap();

    let peer = r#"{"PublicIP":"198.18.0.77","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:4d"}}"#;
    etcd.put_with_ttl(&key("10.244.77.0/24"), peer, 600)
        .unwrap();
    match recv(&mut a.rx, Duration::from_secs(1), "PeerUpsert").await {
        Event::PeerUpsert(l) => {
            assert_eq!(l.subnet.to_string(), "10.244.77.0/24");
            assert_eq!(l.attrs.public_ip, Ipv4Addr::new(198, 18, 0, 77));
            assert_eq!(l.attrs.to_json(), peer);
        }
        ev => panic!("expected PeerUpsert for 10.244.77.0/24, got {ev:?}"),
    }
    etcd.del(&key("10.244.77.0/24")).unwrap();
    match recv(&mut a.rx, Duration::from_secs(1), "PeerRemove").await {
        Event::PeerRemove(l) => assert_eq!(l.subnet.to_string(), "10.244.77.0/24"),
        ev => panic!("expected PeerRemove for 10.244.77.0/24, got {ev:?}"),
    }
    assert!(!a.task.is_finished());
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_acquirers_never_duplicate() {
    require_root();
    let etcd = Etcd::start_new().expect("starting etcd");
    // 16 /28s, the first skipped: 15 leasable.
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.250.0.0/24","SubnetLen":28}"#,
    )
    .unwrap();
    let tmp = TempDir::new("race");
    let mut tasks = Vec::new();
    for i in 0..32u8 {
        let (mut rx, task) = spawn(&etcd, tmp.0.join(format!("{i}.env")), node(100 + i));
        tasks.push(tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                if let Event::OwnLease(l) = ev {
                    task.abort();
                    return Ok(l.subnet.to_string());
                }
            }
            match task.await {
                Ok(Err(e)) => Err(e.to_string()),
                other => Err(format!("agent ended without a lease or error: {other:?}")),
            }
        }));
    }
    let mut won = HashSet::new();
    let mut lost = Vec::new();
    for t in tasks {
        match timeout(Duration::from_secs(60), t)
            .await
            .expect("acquirer hung")
            .unwrap()
        {
            Ok(sn) => assert!(won.insert(sn.clone()), "subnet {sn} handed out twice"),
            Err(e) => lost.push(e),
        }
    }
    assert_eq!(
        won.len(),
        15,
        "expected all 15 subnets leased, got {won:?}; errors {lost:?}"
    );
    assert_eq!(lost.len(), 17);
    for e in &lost {
        assert!(e.contains("pool exhausted"), "unexpected error: {e}");
    }
    let keys = etcd.keys(&format!("{PREFIX}/subnets/")).unwrap();
    assert_eq!(keys.len(), 15, "{keys:?}");
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
    etcd.put(&key("10.244.88.0/24"), peer).unwrap();
    let ev = wait_for(
        &mut a.rx,
        Duration::from_secs(20),
        "peer after etcd restart",
        |e| match e {
            Event::PeerUpsert(l) => l.subnet.to_string() == "10.244.88.0/24",
            Event::Resync(ls) => ls.iter().any(|l| l.subnet.to_string() == "10.244.88.0/24"),
            _ => false,
        },
    )
    .await;
    assert!(!matches!(ev, Event::OwnLease(_)));
    assert!(
        !a.task.is_finished(),
        "agent exited after etcd restart: {:?}",
        etcd.log_tail()
    );
    assert!(
        etcd.get(&key(&a.own.subnet.to_string())).unwrap().is_some(),
        "own lease lost across etcd restart"
    );

    // And events keep flowing after.
    etcd.del(&key("10.244.88.0/24")).unwrap();
    wait_for(
        &mut a.rx,
        Duration::from_secs(2),
        "PeerRemove after restart",
        |e| matches!(e, Event::PeerRemove(l) if l.subnet.to_string() == "10.244.88.0/24"),
    )
    .await;
}
