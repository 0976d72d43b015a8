//! `overlay-agent cleanup`: removes what the agent put on the node. Idempotent.
//!
//! - The pin directory (maps, and the TC/XDP links the agent pins under `links/` so that
//!   programs stay attached across restarts: unpinning detaches them).
//! - XDP decap attached through netlink (a leftover on old kernels) on any interface. A link a
//!   running agent still holds is reported, not fought with: stop the service first.
//! - Legacy (clsact/netlink) TC filters named after our programs on any interface, and the
//!   `clsact` qdisc the agent added to the underlay NIC and the pod bridge once it carries no
//!   filters.
//! - The host device (`overlay0`, a veth pair) for host → remote pod traffic, and the
//!   receive-GRO device (`overlay-gro`).
//! - The `ip overlay-agent` and `ip6 overlay-agent` nftables tables (`--ip-masq`) and
//!   `inet overlay-agent` (conntrack, always).
//! - The `FLANNEL-FWD` chain and its FORWARD jump (`--iptables-forward-rules`), for IPv4
//!   (iptables) and IPv6 (ip6tables), in each backend that has them.
//! - host-gw's routes to the peers' subnets (`SUBNET via PEER dev IFACE`: routes through a
//!   gateway on the underlay into the networks subnet.env names), [`remove_peer_routes`].

use std::{path::Path, process::Command};

use overlay_common::programs;
use tracing::{info, warn};

use crate::{
    control::subnet_env,
    dataplane::pinned,
    node::{grodev, hostdev, routes::Routes},
    ops::{conntrack, forward, masq, netfilter::NfFamily as _},
};

/// Kernel program names are cut to 15 bytes (BPF_OBJ_NAME_LEN − 1).
const KERNEL_NAME_LEN: usize = 15;

/// What cleanup did and what it could not undo.
#[derive(Debug, Default)]
pub struct Report {
    pub removed: Vec<String>,
    pub failed: Vec<String>,
    /// The pin root was refused: nothing was removed, nothing else may be.
    pub refused: bool,
}

/// Removes everything; `ifaces` are where the agent added `clsact` (underlay NIC, bridge).
pub fn run(pin_root: &Path, ifaces: &[String]) -> Report {
    let mut r = Report::default();
    if let Some(refused) = refuse_pin_root(pin_root) {
        r.refused = true;
        r.failed.push(refused);
        warn!(what = %r.failed[0], "nothing removed");
        return r;
    }
    // First the pins: they include the agent's pinned TC/XDP links (`<pin_root>/links/`), and
    // unpinning the last reference detaches a program.
    if pin_root.exists() {
        match pinned::remove_pins(pin_root) {
            Ok(()) => r.removed.push(format!("pins under {}", pin_root.display())),
            Err(e) => r.failed.push(e.to_string()),
        }
    }
    let links = list_links();
    for (name, xdp_prog) in &links {
        if let Some(prog) = xdp_prog {
            detach_xdp(name, prog, &mut r);
        }
        for prog in [programs::ENCAP, programs::DECAP_TC, programs::RECORD] {
            for (ingress, at) in [(true, "Ingress"), (false, "Egress")] {
                for n in [prog, &prog[..prog.len().min(KERNEL_NAME_LEN)]] {
                    match pinned::detach_tc_filter(name, ingress, n) {
                        Ok(true) => r.removed.push(format!("TC filter {n} ({at}) on {name}")),
                        Ok(false) => {}
                        Err(e) => r.failed.push(format!("TC filter {n} on {name}: {e}")),
                    }
                }
            }
        }
    }
    for dev in [hostdev::HOST_DEVICE, grodev::GRO_DEVICE] {
        if links.iter().any(|(n, _)| n == dev) {
            match Command::new("ip").args(["link", "del", dev]).output() {
                Ok(o) if o.status.success() => r.removed.push(format!("device {dev}")),
                Ok(o) => r.failed.push(format!(
                    "device {dev}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => r.failed.push(format!("device {dev}: running ip: {e}")),
            }
        }
    }
    for iface in ifaces {
        if links.iter().any(|(n, _)| n == iface) {
            remove_empty_clsact(iface, &mut r);
        }
    }
    let had_conntrack = conntrack::present();
    match conntrack::remove() {
        Ok(()) if had_conntrack => r
            .removed
            .push(format!("nftables table inet {}", conntrack::TABLE)),
        Ok(()) => {}
        Err(e) => r.failed.push(e.to_string()),
    }
    let had_tables = masq::tables_present();
    match masq::remove() {
        Ok(()) => r.removed.extend(
            had_tables
                .iter()
                .map(|fam| format!("nftables table {} {}", fam.nft(), masq::TABLE)),
        ),
        Err(e) => r.failed.push(e.to_string()),
    }
    for (fam, backend, res) in forward::remove_everywhere() {
        match res {
            Ok(true) => r.removed.push(format!(
                "{} ({}) chain {} and its FORWARD jump",
                fam.iptables(),
                backend.label(),
                forward::CHAIN
            )),
            Ok(false) => {}
            Err(e) => r
                .failed
                .push(format!("{} FORWARD rules ({}): {e}", fam.name(), backend.label())),
        }
    }
    for what in &r.removed {
        info!(%what, "removed");
    }
    for what in &r.failed {
        warn!(%what, "could not remove");
    }
    r
}

/// Why cleanup must not touch `pin_root` at all (it is removed recursively): not a directory on
/// a bpffs below the bpffs's mount point. Checked first, so a mistyped `--pin-root` removes
/// nothing anywhere.
fn refuse_pin_root(pin_root: &Path) -> Option<String> {
    crate::dataplane::bpffs::check_cleanup_target(pin_root)
        .err()
        .map(|e| format!("{e} (nothing was removed)"))
}

/// Every interface, with the name of its XDP program when it is one of ours.
fn list_links() -> Vec<(String, Option<String>)> {
    let out = match Command::new("ip").args(["-j", "-d", "link", "show"]).output() {
        Ok(o) if o.status.success() => o.stdout,
        _ => return Vec::new(),
    };
    let Ok(serde_json::Value::Array(links)) = serde_json::from_slice(&out) else {
        return Vec::new();
    };
    links
        .iter()
        .filter_map(|l| {
            let name = l.get("ifname")?.as_str()?.to_string();
            let ours = l.get("xdp").and_then(|x| find_prog_name(x, "overlay_"));
            Some((name, ours))
        })
        .collect()
}

fn find_prog_name(v: &serde_json::Value, prefix: &str) -> Option<String> {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(n) = m
                .get("name")
                .and_then(|n| n.as_str())
                .filter(|n| n.starts_with(prefix))
            {
                return Some(n.to_string());
            }
            m.values().find_map(|v| find_prog_name(v, prefix))
        }
        serde_json::Value::Array(a) => a.iter().find_map(|v| find_prog_name(v, prefix)),
        _ => None,
    }
}

fn detach_xdp(iface: &str, prog: &str, r: &mut Report) {
    for mode in ["xdp", "xdpgeneric", "xdpdrv"] {
        let _ = Command::new("ip")
            .args(["link", "set", "dev", iface, mode, "off"])
            .output();
    }
    // A link released by unpinning goes away asynchronously: give it a moment.
    let mut still = true;
    for _ in 0..20 {
        still = list_links().into_iter().any(|(n, p)| n == iface && p.is_some());
        if !still {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if still {
        r.failed.push(format!(
            "XDP program {prog} on {iface} is held by a BPF link of a running agent; stop the agent \
             (systemctl stop overlay-agent) and run cleanup again"
        ));
    } else {
        r.removed.push(format!("XDP program {prog} on {iface}"));
    }
}

fn remove_empty_clsact(iface: &str, r: &mut Report) {
    let has_clsact = Command::new("tc")
        .args(["qdisc", "show", "dev", iface])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("qdisc clsact"))
        .unwrap_or(false);
    if !has_clsact {
        return;
    }
    for dir in ["ingress", "egress"] {
        let filters = Command::new("tc")
            .args(["filter", "show", "dev", iface, dir])
            .output();
        match filters {
            Ok(o) if o.status.success() && o.stdout.iter().all(u8::is_ascii_whitespace) => {}
            // Someone else's filters (or tc is missing): leave the qdisc alone.
            _ => return,
        }
    }
    match Command::new("tc")
        .args(["qdisc", "del", "dev", iface, "clsact"])
        .output()
    {
        Ok(o) if o.status.success() => r.removed.push(format!("clsact qdisc on {iface}")),
        Ok(o) => r.failed.push(format!(
            "clsact qdisc on {iface}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => r.failed.push(format!("clsact qdisc on {iface}: running tc: {e}")),
    }
}

/// Removes host-gw's routes to peers' subnets: in the main table, through a gateway on one of
/// `ifaces`, into the cluster networks of `subnet_file` (`FLANNEL_NETWORK`,
/// `FLANNEL_IPV6_NETWORK`). Without a subnet.env there is nothing to tell them by.
pub fn remove_peer_routes(subnet_file: &Path, ifaces: &[String], r: &mut Report) {
    if r.refused {
        return;
    }
    let Ok(text) = std::fs::read_to_string(subnet_file) else {
        return;
    };
    let networks = subnet_env::parse_networks(&text);
    if networks.is_empty() {
        return;
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return r.failed.push(format!("routes to peers' subnets: {e}")),
    };
    rt.block_on(async {
        for iface in ifaces {
            let Ok(ifindex) = nix::net::if_::if_nametoindex(iface.as_str()) else {
                continue;
            };
            let found = match Routes::open(ifindex) {
                Ok(routes) => routes.list(&networks).await.map(|l| (routes, l)),
                Err(e) => Err(e),
            };
            let (routes, list) = match found {
                Ok(f) => f,
                Err(e) => {
                    r.failed
                        .push(format!("routes to peers' subnets via {iface}: {e}"));
                    continue;
                }
            };
            for route in list {
                match routes.delete(route).await {
                    Ok(()) => r.removed.push(format!("route {route}")),
                    Err(e) => r.failed.push(format!("route {route}: {e}")),
                }
            }
        }
    });
    for what in r.removed.iter().filter(|w| w.starts_with("route ")) {
        info!(%what, "removed");
    }
}
