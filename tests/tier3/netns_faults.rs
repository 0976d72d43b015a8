//! Tier 3 (root): faults under traffic: etcd going away must never disturb the datapath.

use std::time::Duration;

use overlay_tests::{
    cluster::{Cluster, UdpFlow},
    netns::require_root,
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

#[test]
fn etcd_outage_of_a_minute_loses_no_packet_and_the_agents_recover() {
    require_root();
    let (mut c, pods) = Cluster::running(2, CONFIG).unwrap();
    let report = c.dir().join("outage.json");
    let (first, rest) = c.nodes.split_at_mut(1);
    let flow = UdpFlow::start(
        &mut rest[0].node.pods[0].ns,
        pods[1],
        &mut first[0].node.pods[0].ns,
        66,
        report,
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    c.stop_etcd();
    std::thread::sleep(Duration::from_secs(60));
    for i in 0..2 {
        // try_wait, not /proc/<pid>: an exited, unreaped agent is a zombie that /proc still lists.
        assert!(
            c.agent_running(i),
            "agent {} exited during the etcd outage; log:\n{}",
            i + 1,
            c.agent_log(i)
        );
    }
    c.start_etcd().unwrap();
    let (packets, lost) = flow
        .finish(&mut c.nodes[1].node.pods[0].ns, Duration::from_secs(20))
        .unwrap();
    assert!(packets >= 60_000, "only {packets} packets in the flow");
    assert_eq!(
        lost, 0,
        "{lost} of {packets} packets lost during a 60 s etcd outage"
    );
    // The agents reconnect: a lease written after the outage reaches their maps.
    c.etcdctl(&[
        "put",
        "/coreos.com/network/subnets/10.244.250.0-24",
        r#"{"PublicIP":"198.18.0.99","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:99"}}"#,
    ])
    .unwrap();
    for i in 0..2 {
        let seen = Cluster::wait_for(Duration::from_secs(15), || {
            c.agent_peers(i)
                .unwrap_or_default()
                .iter()
                .any(|n| n.to_string() == "10.244.250.0/24")
        });
        assert!(
            seen.is_some(),
            "agent {} did not resume watching after the outage; log:\n{}",
            i + 1,
            c.agent_log(i)
        );
    }
}
