//! Tier 3 (root): the operations side of the real agent binary in a netns cluster: systemd
//! notifications, /healthz /readyz /metrics, `status --json` (maps, decap mode, attachments),
//! `--ip-masq`, `cleanup`; and the shipped systemd unit checked by `systemd-analyze verify`.
//!
//! Run: `cargo build -p overlay-agent && cargo test -p overlay-tests --test netns_ops -- --test-threads=1`

use std::{
    net::Ipv4Addr,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use ipnet::Ipv4Net;
use nix::sys::signal::Signal;
use overlay_tests::{
    cluster::{agent_bin, output, Cluster},
    netns::{require_root, seen_source, unique_name, Netns},
    topology::{ping, Node},
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const HEALTHZ_PORT: u16 = 9471;

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// A temp directory removed on drop.
struct TempDir(PathBuf);
impl TempDir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(unique_name("ovlops"));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A bpffs instance mounted on a temp directory in the root mount namespace. Agents started
/// with `ip netns exec` still see it, so pins under it outlive the agent as on a real node.
struct BpffsMount(TempDir);
impl BpffsMount {
    fn new() -> Self {
        let d = TempDir::new();
        nix::mount::mount(
            Some("bpf"),
            &d.0,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mounting a bpffs instance for the test");
        BpffsMount(d)
    }
}
impl Drop for BpffsMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0 .0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// `systemd-analyze verify` on `unit`: (success, everything it printed).
fn verify_unit(unit: &Path) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(unit)
        .output()
        .expect("running systemd-analyze (Debian package `systemd`; `cargo xtask test` installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text.trim().to_string())
}

#[test]
fn systemd_unit_verifies() {
    let unit =
        std::fs::read_to_string(repo_file("dist/overlay-agent.service")).expect("dist/overlay-agent.service");
    for want in [
        "Type=notify",
        "Restart=on-failure",
        "EnvironmentFile=-/etc/default/overlay-agent",
        "Before=docker.service",
        "After=network-online.target etcd.service",
        "Wants=network-online.target",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_BPF CAP_PERFMON CAP_SYS_ADMIN\n",
        "ExecStart=/usr/local/bin/overlay-agent\n",
    ] {
        assert!(unit.contains(want), "the unit lacks {want:?}:\n{unit}");
    }
    // verify insists that ExecStart exists: point it at the binary under test, change nothing else.
    let dir = TempDir::new();
    let bin = agent_bin()
        .canonicalize()
        .expect("build the agent first: cargo build -p overlay-agent");
    let copy = dir.0.join("overlay-agent.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/overlay-agent", bin.to_str().unwrap()),
    )
    .unwrap();
    let (ok, text) = verify_unit(&copy);
    assert!(
        ok && text.is_empty(),
        "systemd-analyze verify failed (ok={ok}):\n{text}"
    );

    // The check must be able to fail: verify reports a broken unit (it prints and may exit 0).
    let broken = dir.0.join("broken.service");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&copy)
            .unwrap()
            .replace("Type=notify", "Type=notifyy"),
    )
    .unwrap();
    let (ok, text) = verify_unit(&broken);
    assert!(
        !ok || text.contains("notifyy"),
        "systemd-analyze did not notice a bad Type=; the check is blind"
    );
}

/// `curl` inside `ns`: (status code, body).
fn http_get(ns: &Netns, path: &str) -> (u16, String) {
    let url = format!("http://127.0.0.1:{HEALTHZ_PORT}{path}");
    let out = ns
        .command("curl")
        .args(["-s", "--max-time", "5", "-w", "\n%{http_code}", &url])
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Next datagram on the notify socket, or `None` after `within`.
fn notification(sock: &UnixDatagram, within: Duration) -> Option<String> {
    sock.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(_) => None,
    }
}

/// The value of `name{labels}` (or `name`) in Prometheus text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Our attachments in `status --json` as (program, interface, "hook mode-or-direction"), sorted,
/// after checking each one against the node: its interface exists in `ns` with the ifindex
/// the pin names, and its link and program ids are nonzero and are a live link of that
/// program per `bpftool link show` (an independent reader).
fn our_attachments(st: &serde_json::Value, ns: &Netns) -> Vec<(String, String, String)> {
    let out = Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()
        .expect("running bpftool");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool -j link show");
    let links = links.as_array().expect("bpftool link list");
    let mut seen = Vec::new();
    for a in st["attachments"]
        .as_array()
        .expect("status has no attachments list")
    {
        assert_eq!(a["ours"], true, "an attachment that is not ours: {a}\n{st}");
        let s = |k: &str| {
            a[k].as_str()
                .unwrap_or_else(|| panic!("attachment without {k}: {a}"))
        };
        let (program, iface, hook) = (s("program"), s("iface"), s("hook"));
        let ifindex = a["ifindex"].as_u64().unwrap_or(0);
        assert!(
            a["iface_present"] == true && u64::from(ns.ifindex(iface).unwrap_or(0)) == ifindex,
            "{program} on {iface} ({ifindex}): the interface should exist with that ifindex in the node: {a}"
        );
        let (link, prog) = (
            a["link_id"].as_u64().unwrap_or(0),
            a["prog_id"].as_u64().unwrap_or(0),
        );
        if hook == "clsact" {
            // Kernels without TCX: a clsact filter, no link and no pin; the program id is the
            // one tc reports for our filter on that hook.
            let dir = a["direction"].as_str().unwrap_or("?");
            let tc = output(ns, "tc", &["-j", "filter", "show", "dev", iface, dir]).unwrap();
            assert!(
                prog > 0
                    && overlay_agent::cli::status::parse_clsact_filters(tc.as_bytes())
                        .contains(&(program.to_string(), Some(prog as u32))),
                "{program} on {iface} {dir}: tc shows no filter of ours with program {prog}: {tc}\n{a}"
            );
            assert!(
                a["pin"].is_null() && a["link_id"].is_null(),
                "a clsact filter has no pin: {a}"
            );
        } else {
            assert!(
                link > 0 && prog > 0,
                "{program} on {iface}: link id {link}, program id {prog}: {a}"
            );
            assert!(
                links
                    .iter()
                    .any(|l| l["id"].as_u64() == Some(link) && l["prog_id"].as_u64() == Some(prog)),
                "{program} on {iface}: bpftool knows no link {link} of program {prog}:\n{links:#?}"
            );
            assert!(
                s("pin").ends_with(&format!("/links/{program}@{iface}@{ifindex}")),
                "pin of {program} on {iface}: {a}"
            );
        }
        let how = a["xdp_mode"].as_str().or(a["direction"].as_str()).unwrap_or("?");
        seen.push((program.to_string(), iface.to_string(), format!("{hook} {how}")));
    }
    seen.sort();
    seen
}

/// The expected attachments, in the form [`our_attachments`] returns.
fn attachments(want: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    let mut v: Vec<_> = want
        .iter()
        .map(|(p, i, h)| (p.to_string(), i.to_string(), h.to_string()))
        .collect();
    v.sort();
    v
}

/// (subnet, PublicIP, VtepMAC as text) per lease in etcd.
fn etcd_leases(c: &Cluster) -> Vec<(Ipv4Net, Ipv4Addr, String)> {
    c.lease_list()
        .unwrap()
        .into_iter()
        .map(|(sn, ip, mac)| (sn, ip, overlay_tests::topology::fmt_mac(&mac)))
        .collect()
}

#[test]
fn notify_health_metrics_and_status() {
    require_root();
    // No network config yet: the agent runs but cannot hold a lease.
    let mut c = Cluster::new(2, "").expect("building the cluster");
    let dir = TempDir::new();
    let sock_path = dir.0.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    c.nodes[0]
        .extra_env
        .push(("NOTIFY_SOCKET".into(), sock_path.to_string_lossy().into_owned()));
    c.nodes[0]
        .extra_args
        .extend(["--healthz-port".into(), HEALTHZ_PORT.to_string()]);
    // Node 1 (a veth underlay) picks TC decap on its own; node 2 is told to run XDP.
    c.nodes[1].extra_args.extend([
        "--healthz-port".into(),
        HEALTHZ_PORT.to_string(),
        "--decap".into(),
        "xdp".into(),
    ]);
    c.start_agent(0).unwrap();

    // Alive but not ready, and no READY=1 while there is no lease.
    let ns0 = &c.nodes[0].node.ns;
    let alive = Cluster::wait_for(Duration::from_secs(10), || http_get(ns0, "/healthz").0 == 200);
    assert!(
        alive.is_some(),
        "/healthz never answered 200; log:\n{}",
        c.agent_log(0)
    );
    let (code, body) = http_get(ns0, "/readyz");
    assert_eq!(code, 503, "/readyz without a lease: {body}");
    assert!(body.contains("no lease"), "/readyz body: {body}");
    assert_eq!(
        notification(&sock, Duration::from_secs(2)),
        None,
        "READY=1 before any lease"
    );

    // The config appears: lease, subnet.env, then READY=1.
    c.etcdctl(&["put", "/coreos.com/network/config", CONFIG]).unwrap();
    let msg = notification(&sock, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no READY=1 within 20 s of the config; log:\n{}", c.agent_log(0)));
    assert!(msg.lines().any(|l| l == "READY=1"), "first notification: {msg:?}");
    let (subnet, _) = c.nodes[0]
        .subnet_env()
        .expect("READY=1 arrived before subnet.env was written");
    let subnet = subnet.trunc();
    assert!(msg.contains(&format!("STATUS=holding {subnet}")), "{msg:?}");
    let (code, body) = http_get(&c.nodes[0].node.ns, "/readyz");
    assert_eq!((code, body.trim()), (200, "ok"), "/readyz once READY=1 was sent");

    // A second node and traffic between pods, so peers and counters move.
    c.start_agent(1).unwrap();
    let pod0 = c.add_pods(0, 1).unwrap()[0];
    let pod1 = c.add_pods(1, 1).unwrap()[0];
    for i in 0..2 {
        let learned = Cluster::wait_for(Duration::from_secs(10), || {
            c.agent_peers(i).map(|p| p.len() == 1).unwrap_or(false)
        });
        assert!(
            learned.is_some(),
            "node {} did not learn the other; log:\n{}",
            i + 1,
            c.agent_log(i)
        );
        c.wait_encap_attached(i);
    }
    assert!(
        ping(&c.nodes[0].node.pods[0].ns, pod1, 3, None),
        "pod {pod0} → pod {pod1}: no reply"
    );

    let (code, text) = http_get(&c.nodes[0].node.ns, "/metrics");
    assert_eq!(code, 200, "/metrics");
    assert_eq!(
        metric(&text, &format!("overlay_lease_held{{subnet=\"{subnet}\"}}")),
        Some(1.0),
        "{text}"
    );
    let exp = metric(&text, "overlay_lease_expiry_seconds").expect("no overlay_lease_expiry_seconds");
    assert!(
        exp > 23.0 * 3600.0 && exp <= 24.0 * 3600.0,
        "lease expiry {exp} s, expected about 24 h"
    );
    assert_eq!(metric(&text, "overlay_peers"), Some(1.0), "{text}");
    assert_eq!(metric(&text, "overlay_programs_attached"), Some(1.0), "{text}");
    assert_eq!(
        (
            metric(&text, "overlay_decap_mode{mode=\"tc\"}"),
            metric(&text, "overlay_decap_mode{mode=\"xdp\"}")
        ),
        (Some(1.0), Some(0.0)),
        "node 1 runs TC decap (auto on a veth):\n{text}"
    );
    let (code, text1) = http_get(&c.nodes[1].node.ns, "/metrics");
    assert_eq!(code, 200, "/metrics of node 2");
    assert_eq!(
        (
            metric(&text1, "overlay_decap_mode{mode=\"xdp\"}"),
            metric(&text1, "overlay_decap_mode{mode=\"tc\"}")
        ),
        (Some(1.0), Some(0.0)),
        "node 2 runs XDP decap (--decap xdp):\n{text1}"
    );
    assert_eq!(
        metric(&text, "overlay_etcd_reconnects_total"),
        Some(0.0),
        "{text}"
    );
    let syncs = metric(&text, "overlay_map_sync_duration_seconds_count").expect("no sync histogram");
    assert!(
        syncs >= 3.0,
        "expected ≥ 3 map syncs (config, own lease, resync/peer), saw {syncs}"
    );
    let encap = metric(&text, "overlay_datapath_packets_total{path=\"encap\"}").expect("no encap packets");
    let decap = metric(&text, "overlay_datapath_packets_total{path=\"decap\"}").expect("no decap packets");
    // Every request is encapsulated; a reply may reach the pod without being counted as decap
    // (e.g. handed to the stack while a neighbour is resolved), so only ask that decap moved.
    assert!(
        encap >= 3.0 && decap >= 1.0,
        "encap {encap}, decap {decap} after 3 pings:\n{text}"
    );
    assert!(
        metric(&text, "overlay_datapath_bytes_total{path=\"encap\"}").unwrap_or(0.0) > 0.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "overlay_datapath_drops_total{reason=\"unknown_peer\"}"),
        Some(0.0),
        "{text}"
    );

    // status --json, in the agent's own mount namespace (its bpffs), against etcd's leases.
    let pid = c.nodes[0].agent_pid.unwrap();
    let out = Command::new("nsenter")
        .args(["--target", &pid.to_string(), "--mount", "--net"])
        .arg(agent_bin())
        .args(["status", "--json", "--pin-root", &c.nodes[0].pin_root])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    let leases = etcd_leases(&c);
    assert_eq!(leases.len(), 2, "{leases:?}");
    let me = leases.iter().find(|l| l.0 == subnet).expect("our lease in etcd");
    let peer = leases.iter().find(|l| l.0 != subnet).unwrap();
    assert_eq!(st["node"]["ready"], true, "{st}");
    assert_eq!(st["node"]["backend"], "vxlan", "{st}");
    assert_eq!(st["node"]["public_ip"], me.1.to_string(), "{st}");
    assert_eq!(st["node"]["public_ip"], Node::underlay_ip(1).to_string(), "{st}");
    assert_eq!(st["node"]["vtep_mac"], me.2, "{st}");
    assert_eq!(
        (st["node"]["vni"].as_u64(), st["node"]["port"].as_u64()),
        (Some(1), Some(8472)),
        "{st}"
    );
    let peers = st["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 1, "{st}");
    assert_eq!(peers[0]["subnet"], peer.0.to_string(), "{st}");
    assert_eq!(peers[0]["public_ip"], peer.1.to_string(), "{st}");
    assert_eq!(peers[0]["vtep_mac"], peer.2, "{st}");
    assert_eq!(peers[0]["mode"], "encap", "{st}");
    assert!(st["counters"]["encap_packets"].as_u64().unwrap() >= 3, "{st}");

    // Decap mode and attachments: every link we pinned, on the interface the pin names.
    assert_eq!(st["decap"], "tc", "node 1 (auto on a veth underlay): {st}");
    // TC programs are TCX links from 6.6 on, clsact filters before.
    let tc = |dir: &str| {
        let hook = if overlay_agent::dataplane::kernel_has_tcx() {
            "tcx"
        } else {
            "clsact"
        };
        format!("{hook} {dir}")
    };
    let (tc_in, tc_out) = (tc("ingress"), tc("egress"));
    assert_eq!(
        our_attachments(&st, &c.nodes[0].node.ns),
        attachments(&[
            ("overlay_decap_tc", "eth0", &tc_in),
            ("overlay_encap", "cni0", &tc_in),
            ("overlay_encap", "overlay0", &tc_out),
            // Receive GRO's sink (TC decap only: node 2's XDP has none).
            ("overlay_gro_sink", "overlay-gro", &tc_in),
        ]),
        "node 1's attachments: {st}"
    );
    let st1 = c.status_json(1).expect("status of node 2");
    assert_eq!(st1["decap"], "xdp", "node 2 (--decap xdp): {st1}");
    // veth runs XDP in its driver; TC beside it delivers what XDP stripped.
    assert_eq!(
        our_attachments(&st1, &c.nodes[1].node.ns),
        attachments(&[
            ("overlay_decap_xdp", "eth0", "xdp driver"),
            ("overlay_decap_tc", "eth0", &tc_in),
            ("overlay_encap", "cni0", &tc_in),
            ("overlay_encap", "overlay0", &tc_out),
        ]),
        "node 2's attachments: {st1}"
    );
    let xdp = output(
        &c.nodes[1].node.ns,
        "ip",
        &["-j", "-d", "link", "show", "dev", "eth0"],
    )
    .unwrap();
    let xdp: serde_json::Value = serde_json::from_str(&xdp).unwrap();
    let xdp_prog = st1["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["program"] == "overlay_decap_xdp")
        .map(|a| a["prog_id"].clone());
    assert_eq!(
        (
            xdp[0]["xdp"]["mode"].as_u64(),
            Some(xdp[0]["xdp"]["prog"]["id"].clone())
        ),
        (Some(1), xdp_prog),
        "node 2's eth0 per ip link should have our XDP program in the driver (mode 1):\n{xdp:#}"
    );

    // SIGTERM: STOPPING=1.
    c.stop_agent(0, Signal::SIGTERM);
    let msg = notification(&sock, Duration::from_secs(5)).expect("no notification after SIGTERM");
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "after SIGTERM: {msg:?}");
}

/// The rules of `--ip-masq`'s nftables table (`ip overlay-agent`; the conntrack table of the
/// same name is `inet`) in `ns` (`nft -j`), as their JSON expressions.
fn masq_rules(ns: &Netns) -> Vec<String> {
    let out = ns
        .command("nft")
        .args(["-j", "list", "ruleset"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nft list ruleset: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("rule"))
        .filter(|r| r["table"] == "overlay-agent" && r["family"] == "ip")
        .map(|r| r["expr"].to_string())
        .collect()
}

#[test]
fn ip_masq_snat_restart_and_cleanup() {
    require_root();
    let bpffs = BpffsMount::new();
    let mut c = Cluster::new(2, CONFIG).expect("building the cluster");
    let pin_root = bpffs.0 .0.join("node1").to_string_lossy().into_owned();
    c.nodes[0].pin_root = pin_root.clone();
    for i in 0..2 {
        c.nodes[i].extra_args.push("--ip-masq".into());
        c.start_agent(i).unwrap();
    }
    let pod0 = c.add_pods(0, 1).unwrap()[0];
    let pod1 = c.add_pods(1, 1).unwrap()[0];
    let learned = Cluster::wait_for(Duration::from_secs(10), || {
        c.agent_peers(0).map(|p| p.len() == 1).unwrap_or(false)
    });
    assert!(
        learned.is_some(),
        "node 1 did not learn node 2; log:\n{}",
        c.agent_log(0)
    );

    // "The outside": a host on the underlay segment that knows no pod routes.
    let outside_ip = Ipv4Addr::new(198, 18, 0, 200);
    let outside = c.outside_host(outside_ip.into()).unwrap();

    let check_traffic = |c: &Cluster, when: &str| {
        let pod_ns = &c.nodes[0].node.pods[0].ns;
        let seen = seen_source(pod_ns, &outside, outside_ip.into());
        assert_eq!(
            seen,
            Some(Node::underlay_ip(1).into()),
            "{when}: pod {pod0} → outside must be SNATed to node 1's address"
        );
        let seen = seen_source(pod_ns, &c.nodes[1].node.pods[0].ns, pod1.into());
        assert_eq!(
            seen,
            Some(pod0.into()),
            "{when}: pod {pod0} → pod {pod1} must keep its source address"
        );
    };
    check_traffic(&c, "first start");
    let rules = masq_rules(&c.nodes[0].node.ns);
    assert_eq!(
        rules.len(),
        5,
        "expected the 5 rules of table ip overlay-agent, got {rules:#?}"
    );
    assert_eq!(
        rules.iter().filter(|r| r.contains("masquerade")).count(),
        2,
        "{rules:#?}"
    );

    // Restart: the table is replaced, never appended to.
    c.stop_agent(0, Signal::SIGTERM);
    c.start_agent(0).unwrap();
    let reinstalled = Cluster::wait_for(Duration::from_secs(20), || {
        c.agent_log(0).matches("ip-masq rules installed").count() == 2
    });
    assert!(
        reinstalled.is_some(),
        "the restarted agent did not reinstall ip-masq; log:\n{}",
        c.agent_log(0)
    );
    let after = masq_rules(&c.nodes[0].node.ns);
    assert_eq!(
        after, rules,
        "after a restart the table must hold exactly one copy of the rules"
    );
    let tables = output(&c.nodes[0].node.ns, "nft", &["list", "tables"]).unwrap();
    assert_eq!(tables.matches("table ip overlay-agent").count(), 1, "{tables}");
    assert_eq!(tables.matches("table inet overlay-agent").count(), 1, "{tables}");
    check_traffic(&c, "after restart");

    // cleanup after the agent stopped: pins, masquerade table, host device, qdiscs — twice.
    c.stop_agent(0, Signal::SIGTERM);
    assert!(
        Path::new(&pin_root).join("OVL_PEERS").exists(),
        "pins should outlive the agent under {pin_root}"
    );
    let cleanup = |c: &Cluster| {
        let out = c.nodes[0]
            .node
            .ns
            .command(agent_bin().to_str().unwrap())
            .args(["cleanup", "--pin-root", &pin_root, "--iface", "eth0"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "cleanup failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let first = cleanup(&c);
    assert!(
        first.contains("removed pins") && first.contains("removed nftables table"),
        "{first}"
    );
    assert!(!Path::new(&pin_root).exists(), "pins left under {pin_root}");
    assert!(
        masq_rules(&c.nodes[0].node.ns).is_empty(),
        "masquerade rules left"
    );
    let tables = output(&c.nodes[0].node.ns, "nft", &["list", "tables"]).unwrap();
    assert!(!tables.contains("overlay-agent"), "{tables}");
    let links = output(&c.nodes[0].node.ns, "ip", &["-d", "link", "show"]).unwrap();
    assert!(
        !links.contains("overlay0") && !links.contains("overlay-gro") && !links.contains("prog/xdp"),
        "left on the links:\n{links}"
    );
    for dev in ["eth0", "cni0"] {
        let q = output(&c.nodes[0].node.ns, "tc", &["qdisc", "show", "dev", dev]).unwrap();
        assert!(!q.contains("clsact"), "clsact left on {dev}: {q}");
    }
    let second = cleanup(&c);
    assert_eq!(second.trim(), "nothing to clean up", "cleanup is not idempotent");
}
