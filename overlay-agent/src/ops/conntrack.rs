//! The node's conntrack and the fast path: nftables table `inet overlay-agent`, installed on
//! every start (whatever `--ip-masq` says) and replaced in one `nft -f -` transaction.
//!
//! - `prerouting` (after DNAT): packets of connections the node's netfilter destination-NATed
//!   (a Service's ClusterIP or NodePort, Docker's published ports) get
//!   [`overlay_common::maps::NAT_MARK`]. With br_netfilter the nat hook runs on the bridge port,
//!   before encap on the bridge; encap leaves marked packets to the stack, which confirms the
//!   connection and routes them through `overlay0` (where encap records the flow, so decap hands
//!   its replies to the stack to be un-NATed). Without br_netfilter such packets reach the
//!   stack anyway (encap only takes packets for remote pod subnets) and the mark is unused.
//! - `postrouting` (before iptables' nat chains): a pod's packet the stack routes to a remote
//!   pod through `overlay0` (a Service's DNAT, `--deliver stack`) keeps its source: an identity
//!   `snat` is the first NAT decision of its connection, so no later rule (Docker's
//!   `-s <subnet> ! -o docker0 -j MASQUERADE`) rewrites it, as none can on the fast path;
//!   kube-proxy's masquerade mark (0x4000) is left to kube-proxy. Packets with a source outside
//!   the cluster network (the node's underlay address after an `OUTPUT` DNAT of its own
//!   connection to a ClusterIP, when kube-proxy does not masquerade it) are masqueraded to
//!   `overlay0`'s address: a peer accepts only inner sources inside the sender's subnet, where
//!   `flannel.1`'s peer would accept any.

use ipnet::{Ipv4Net, Ipv6Net};

use overlay_common::maps::NAT_MARK;

use super::netfilter::{nft, nft_table_exists, NftFailure};
use crate::node::hostdev::HOST_DEVICE;

/// The table's name (family `inet`; `--ip-masq`'s tables are `ip`/`ip6` of the same name).
pub const TABLE: &str = "overlay-agent";
const FAMILY: &str = "inet";

#[derive(Debug, thiserror::Error)]
pub enum ConntrackRulesError {
    #[error(
        "running nft (is the nftables package installed?): {0}; without the table, pods cannot \
         reach a Kubernetes Service whose backend is on another node when br_netfilter is on"
    )]
    Spawn(std::io::Error),
    #[error(
        "nft -f - rejected the conntrack ruleset ({status}): {stderr}; the kernel needs nf_tables \
         with conntrack and NAT (nft_ct, nft_chain_nat, nft_masq)"
    )]
    Nft {
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// kube-proxy's default masquerade mark (`--iptables-masquerade-bit` 14): packets it wants
/// masqueraded keep their way to its `KUBE-POSTROUTING` rule.
const KUBE_MASQ_MARK: u32 = 0x4000;

/// The transaction installing (or replacing) the table for the configured networks.
pub fn render(network: Option<Ipv4Net>, network6: Option<Ipv6Net>) -> String {
    let mut post = String::new();
    let nets =
        (network.map(|n| ("ip", n.to_string())).into_iter()).chain(network6.map(|n| ("ip6", n.to_string())));
    for (ip, n) in nets {
        post.push_str(&format!(
            "\t\toifname \"{HOST_DEVICE}\" {ip} saddr {n} {ip} daddr {n} meta mark & {KUBE_MASQ_MARK:#010x} == 0 \
             snat {ip} to {ip} saddr comment \"pod to remote pod keeps its source\"\n\
             \t\toifname \"{HOST_DEVICE}\" {ip} saddr != {n} masquerade comment \"host to remote pods from outside the network\"\n"
        ));
    }
    format!(
        "add table {FAMILY} {TABLE}\n\
         delete table {FAMILY} {TABLE}\n\
         table {FAMILY} {TABLE} {{\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority dstnat + 10; policy accept;\n\
         \t\tct status dnat meta mark set meta mark or {NAT_MARK:#010x} comment \"NATed: encap leaves it to the stack\"\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat - 10; policy accept;\n\
         {post}\
         \t}}\n\
         }}\n"
    )
}

fn nft_err(e: NftFailure) -> ConntrackRulesError {
    match e {
        NftFailure::Spawn(e) => ConntrackRulesError::Spawn(e),
        NftFailure::Rejected { status, stderr } => ConntrackRulesError::Nft { status, stderr },
    }
}

/// Installs or replaces the table, atomically.
pub fn install(network: Option<Ipv4Net>, network6: Option<Ipv6Net>) -> Result<(), ConntrackRulesError> {
    nft(&render(network, network6)).map_err(nft_err)
}

/// True when the table exists.
pub fn present() -> bool {
    nft_table_exists(FAMILY, TABLE)
}

/// Removes the table (idempotent).
pub fn remove() -> Result<(), ConntrackRulesError> {
    if !present() {
        return Ok(());
    }
    nft(&format!("delete table {FAMILY} {TABLE}\n")).map_err(nft_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_mark_after_dnat_and_the_masquerade_per_family() {
        let t = render(
            Some("10.244.0.0/16".parse().unwrap()),
            Some("fd00:10:244::/56".parse().unwrap()),
        );
        assert!(
            t.starts_with("add table inet overlay-agent\ndelete table inet overlay-agent\n"),
            "{t}"
        );
        assert!(
            t.contains("type filter hook prerouting priority dstnat + 10;"),
            "{t}"
        );
        assert!(
            t.contains("ct status dnat meta mark set meta mark or 0x00002000"),
            "{t}"
        );
        assert!(
            t.contains("type nat hook postrouting priority srcnat - 10;"),
            "{t}"
        );
        assert!(
            t.contains(
                "oifname \"overlay0\" ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 meta mark & 0x00004000 == 0 \
                 snat ip to ip saddr"
            ),
            "{t}"
        );
        assert!(
            t.contains("oifname \"overlay0\" ip saddr != 10.244.0.0/16 masquerade"),
            "{t}"
        );
        assert!(
            t.contains("oifname \"overlay0\" ip6 saddr != fd00:10:244::/56 masquerade"),
            "{t}"
        );
        let v4 = render(Some("10.244.0.0/16".parse().unwrap()), None);
        assert!(!v4.contains("ip6 saddr"), "{v4}");
    }
}
