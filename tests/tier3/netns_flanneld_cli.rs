//! Tier 3 (root): the real agent binary started with command lines written for flanneld: Go-style
//! single-dash flags (`-etcd-endpoints=…`, `-iface eth0`, `-ip-masq`, `-v=1`) and flannel's
//! interface selection (`--iface`, then `--iface-regex`, then `--iface-can-reach`, as flags or
//! `FLANNELD_*` variables), against a real etcd in network namespaces.
//!
//! Run: `cargo build -p overlay-agent && cargo test -p overlay-tests --test netns_flanneld_cli -- --test-threads=1`

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use overlay_tests::{
    cluster::{agent_bin, Cluster},
    netns::require_root,
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

/// Node `index`'s address on its second interface, `uplink1` (198.19.0.0/24).
fn uplink_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, 10 + index)
}

/// Gives node `i` (index into `nodes`) a second interface `uplink1` with [`uplink_ip`] and a
/// default route through `eth0`, so that the default-route fallback would pick `eth0` and a
/// lease with the uplink address proves the selection options were used.
fn add_uplink(c: &Cluster, i: usize) {
    let n = &c.nodes[i].node;
    let ns = &n.ns;
    // A veth pair with both ends here: an interface with an address, like a second NIC.
    ns.ip(&[
        "link", "add", "uplink1", "type", "veth", "peer", "name", "uplink1p",
    ])
    .unwrap();
    ns.ip(&["link", "set", "uplink1p", "up"]).unwrap();
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/24", uplink_ip(n.index)),
        "dev",
        "uplink1",
    ])
    .unwrap();
    ns.ip(&["link", "set", "uplink1", "up"]).unwrap();
    ns.ip(&["route", "add", "default", "via", "198.18.0.1", "dev", "eth0"])
        .unwrap();
}

/// Starts node `i`'s agent with exactly `argv` (none of the harness's own flags) and `env`.
fn start_as_written(c: &mut Cluster, i: usize, argv: &[String], env: &[(&str, &str)]) {
    let n = &mut c.nodes[i];
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&n.log_file)
        .unwrap();
    let mut cmd = n.node.ns.command_net_only(agent_bin().to_str().unwrap());
    cmd.args(argv)
        .envs(env.iter().copied())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    n.agent_pid = Some(n.node.ns.spawn(cmd).unwrap());
}

fn subnet_env_text(c: &Cluster, i: usize) -> String {
    std::fs::read_to_string(&c.nodes[i].subnet_file).unwrap_or_default()
}

#[test]
fn flanneld_command_lines_with_single_dash_flags_and_iface_selection_take_their_leases() {
    require_root();
    let mut c = Cluster::new(3, CONFIG).unwrap();
    for i in 0..3 {
        add_uplink(&c, i);
    }
    let ep = c.etcd_endpoint();
    let s = |v: &str| v.to_string();
    let file = |c: &Cluster, i: usize| c.nodes[i].subnet_file.to_str().unwrap().to_string();
    let pins = |c: &Cluster, i: usize| c.nodes[i].pin_root.clone();

    // Node 1: a flanneld unit's ExecStart as written: `=` and space forms, a bare boolean,
    // `-v=1`; an --iface that does not exist, a regex that matches nothing, then one that
    // matches uplink1's address.
    let argv1 = vec![
        format!("-etcd-endpoints={ep}"),
        s("-etcd-prefix=/coreos.com/network"),
        s("-iface"),
        s("nosuch0"),
        s("-iface-regex"),
        s(r"^10\.99\."),
        s(r"-iface-regex=^198\.19\."),
        s("-subnet-file"),
        file(&c, 0),
        format!("-pin-root={}", pins(&c, 0)),
        s("-ip-masq"),
        s("-subnet-lease-renew-margin"),
        s("30"),
        s("-v=1"),
    ];
    start_as_written(&mut c, 0, &argv1, &[]);
    // Node 2: FLANNELD_IFACE_CAN_REACH picks the interface of the route to 198.19.0.99;
    // `-ip-masq=false` in Go's form.
    let argv2 = vec![
        s("-etcd-endpoints"),
        ep.clone(),
        format!("-subnet-file={}", file(&c, 1)),
        s("-pin-root"),
        pins(&c, 1),
        s("-ip-masq=false"),
    ];
    start_as_written(&mut c, 1, &argv2, &[("FLANNELD_IFACE_CAN_REACH", "198.19.0.99")]);
    // Node 3: FLANNELD_IFACE_REGEX matching an interface *name*; it comes before
    // --iface-can-reach, which would pick eth0. (Anchored: as in flanneld, only the first
    // interface whose name matches is tried, and `^uplink` may meet the address-less
    // `uplink1p` first.)
    let argv3 = vec![
        format!("--etcd-endpoints={ep}"),
        format!("-subnet-file={}", file(&c, 2)),
        format!("-pin-root={}", pins(&c, 2)),
        s("-iface-can-reach=198.18.0.1"),
        s("-ip-masq=1"),
    ];
    start_as_written(&mut c, 2, &argv3, &[("FLANNELD_IFACE_REGEX", "^uplink1$")]);

    for i in 0..3 {
        c.wait_lease(i, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("node {} took no lease: {e:#}", i + 1));
    }
    let leases = c.lease_list().unwrap();
    let mut public: Vec<Ipv4Addr> = leases.iter().map(|l| l.1).collect();
    public.sort();
    assert_eq!(
        public,
        [uplink_ip(1), uplink_ip(2), uplink_ip(3)],
        "every node should advertise its uplink1 address (eth0's would mean the options were \
         ignored); leases: {leases:?}"
    );
    for (i, by, masq) in [
        (0, r"--iface-regex ^198\.19\.", "true"),
        (1, "--iface-can-reach 198.19.0.99", "false"),
        (2, "--iface-regex ^uplink1$", "true"),
    ] {
        let log = c.agent_log(i);
        let want = format!("iface=uplink1 address={} by={by}", uplink_ip(i as u8 + 1));
        assert!(
            log.contains(&want),
            "node {}: expected {want:?} in the log:\n{log}",
            i + 1
        );
        let env = subnet_env_text(&c, i);
        assert!(
            env.contains(&format!("FLANNEL_IPMASQ={masq}\n")),
            "node {}: expected FLANNEL_IPMASQ={masq} in subnet.env:\n{env}",
            i + 1
        );
    }
}

#[test]
fn unmatched_interface_options_and_unknown_flags_stop_the_agent_with_a_clear_error() {
    require_root();
    let mut c = Cluster::new(1, CONFIG).unwrap();
    add_uplink(&c, 0);
    let ep = c.etcd_endpoint();
    // Runs the agent in node 1's namespace with the common flags and `args`; its exit status
    // (`None`: still running after 15 s, then killed) and its log.
    let run = |c: &Cluster, args: &[&str]| {
        let n = &c.nodes[0];
        let mut cmd = n.node.ns.command_net_only(agent_bin().to_str().unwrap());
        cmd.arg(format!("-etcd-endpoints={ep}"))
            .arg(format!("-pin-root={}", n.pin_root))
            .arg(format!("-subnet-file={}", n.subnet_file.display()))
            .args(args);
        let log = std::fs::File::create(&n.log_file).unwrap();
        cmd.stdout(log.try_clone().unwrap()).stderr(log);
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        (status, c.agent_log(0))
    };
    // Nothing matches: no fallback to the default route (flanneld exits too), and every
    // attempt is named.
    let (status, err) = run(&c, &["-iface=nosuch0", r"-iface-regex=^10\.99\."]);
    let status = status.unwrap_or_else(|| {
        panic!("agent still running 15 s after start although no interface matches:\n{err}")
    });
    assert!(
        !status.success(),
        "agent exited 0 although no interface matches:\n{err}"
    );
    for want in [
        r"no interface matches --iface nosuch0: no interface has that name; --iface-regex ^10\.99\.: matches no interface address or name; interfaces here:",
        "eth0 [198.18.0.11]",
        "uplink1 [198.19.0.11]",
    ] {
        assert!(err.contains(want), "expected {want:?} in:\n{err}");
    }
    assert!(
        c.nodes[0].subnet_env().is_none(),
        "subnet.env written although no interface matched"
    );
    // A flanneld flag this agent does not take, and a misspelt one: named, exit status 2.
    for (flag, want) in [
        ("-kube-api-url=https://x", "unexpected argument '--kube-api-url'"),
        ("-ifac=eth0", "unexpected argument '--ifac'"),
        ("-iface-regex=eth(", r#""eth(" is not a valid regular expression"#),
    ] {
        let (status, err) = run(&c, &[flag]);
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(2),
            "{flag}: expected a usage error, got {status:?}:\n{err}"
        );
        assert!(err.contains(want), "{flag}: expected {want:?} in:\n{err}");
    }
    // The same command line without the bad flag starts (the control: the failures above come
    // from the flags, not from the setup).
    let bin = agent_bin();
    let mut cmd = c.nodes[0].node.ns.command_net_only(bin.to_str().unwrap());
    cmd.args([
        format!("-etcd-endpoints={ep}"),
        format!("-pin-root={}", c.nodes[0].pin_root),
        format!("-subnet-file={}", c.nodes[0].subnet_file.display()),
        "-iface=nosuch0".into(),
        r"-iface-regex=^198\.19\.".into(),
    ]);
    let log = std::fs::File::create(&c.nodes[0].log_file).unwrap();
    cmd.stdout(log.try_clone().unwrap()).stderr(log);
    c.nodes[0].agent_pid = Some(c.nodes[0].node.ns.spawn(cmd).unwrap());
    let (subnet, _) = c.wait_lease(0, Duration::from_secs(20)).unwrap();
    let leases = c.lease_list().unwrap();
    assert_eq!(
        leases.iter().map(|l| (l.0, l.1)).collect::<Vec<_>>(),
        [(subnet.trunc(), uplink_ip(1))],
        "leases: {leases:?}"
    );
}
