//! `--ip-masq`: flannel's masquerade rules as nftables tables of our own, `ip overlay-agent` for
//! IPv4 and `ip6 overlay-agent` for IPv6.
//!
//! Both tables are replaced in one `nft -f -` transaction (`add table` + `delete table` + the
//! table, per family), so a restart never duplicates rules and there is no window without them;
//! a family without a network and a subnet of ours whose table exists (left from an earlier
//! config) gets only the `add` + `delete`, which removes it. A family that has no table and
//! none configured is not named at all: a host booted with IPv6 disabled never sees an `ip6`
//! statement that could fail the IPv4 rules' transaction. Semantics are flannel's `MasqRules` and `MasqIP6Rules`
//! (pkg/trafficmngr/iptables): pod ↔ pod anywhere in the cluster Network is left alone, pod →
//! outside is masqueraded (except multicast: 224.0.0.0/4, ff00::/8), outside → our pods is left
//! alone, and the host → remote pods is masqueraded so replies come back to us.

use std::fmt;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::netfilter::{IpFamily, NfFamily as _, NftFailure};

/// The nftables table (families `ip` and `ip6`).
pub const TABLE: &str = "overlay-agent";
/// kube-proxy's masquerade mark: such packets are kube-proxy's to NAT (avoids double NAT).
const KUBE_PROXY_MARK: &str = "0x00004000";

#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    #[error("running nft (is the nftables package installed?): {0}")]
    Spawn(std::io::Error),
    #[error(
        "nft -f - rejected the ip-masq ruleset ({status}): {stderr}; the kernel needs nf_tables \
         NAT (nft_chain_nat, nft_masq) for each family in use, else run without --ip-masq"
    )]
    Nft {
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// What the rules are for, per family: (the cluster network, our lease's subnet). A family
/// without both gets no table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MasqNets {
    pub v4: Option<(Ipv4Net, Ipv4Net)>,
    pub v6: Option<(Ipv6Net, Ipv6Net)>,
}

impl MasqNets {
    /// Each family with its (network, subnet), IPv4 first.
    fn families(&self) -> [(IpFamily, Option<(IpNet, IpNet)>); 2] {
        [
            (IpFamily::V4, self.v4.map(|(n, s)| (n.into(), s.into()))),
            (IpFamily::V6, self.v6.map(|(n, s)| (n.into(), s.into()))),
        ]
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_none() && self.v6.is_none()
    }
}

/// `ip 10.244.0.0/16 (our 10.244.7.0/24), ip6 fd00:10:244::/56 (our fd00:10:244:7::/64)`.
impl fmt::Display for MasqNets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        for (fam, nets) in self.families() {
            if let Some((network, subnet)) = nets {
                write!(f, "{sep}{} {network} (our {subnet})", fam.nft())?;
                sep = ", ";
            }
        }
        Ok(())
    }
}

/// The transaction that installs (or replaces) the tables for `nets` and removes the table of a
/// family `nets` leaves out when that family's table is `present`.
pub fn render(nets: &MasqNets, present: &[IpFamily]) -> String {
    nets.families()
        .into_iter()
        .map(|(fam, nets)| match nets {
            Some((network, subnet)) => table(fam, network, subnet),
            None if present.contains(&fam) => remove_table(fam),
            None => String::new(),
        })
        .collect()
}

/// One family's table for `network` with our lease `subnet` (both of family `fam`), replacing
/// any earlier one.
fn table(fam: IpFamily, network: IpNet, subnet: IpNet) -> String {
    let (ip, multicast) = (fam.nft(), fam.multicast());
    format!(
        "add table {ip} {TABLE}\n\
         delete table {ip} {TABLE}\n\
         table {ip} {TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tmeta mark & {KUBE_PROXY_MARK} == {KUBE_PROXY_MARK} return comment \"kube-proxy NATs these\"\n\
         \t\t{ip} saddr {network} {ip} daddr {network} return comment \"pod to pod: keep the source\"\n\
         \t\t{ip} saddr != {network} {ip} daddr {subnet} return comment \"outside to our pods: keep the source\"\n\
         \t\t{ip} saddr {network} {ip} daddr != {multicast} masquerade fully-random comment \"pod to outside\"\n\
         \t\t{ip} saddr != {network} {ip} daddr {network} masquerade fully-random comment \"host to remote pods\"\n\
         \t}}\n\
         }}\n"
    )
}

/// Removes one family's table; succeeds whether it exists or not.
fn remove_table(fam: IpFamily) -> String {
    let ip = fam.nft();
    format!("add table {ip} {TABLE}\ndelete table {ip} {TABLE}\n")
}

/// Installs or replaces the rules, atomically.
pub fn install(nets: &MasqNets) -> Result<(), MasqError> {
    nft(&render(nets, &tables_present()))
}

/// Removes both tables (idempotent; nothing to do when neither exists).
pub fn remove() -> Result<(), MasqError> {
    let present = tables_present();
    if present.is_empty() {
        return Ok(());
    }
    nft(&render(&MasqNets::default(), &present))
}

/// The families whose table exists now (looked up without creating one).
pub fn tables_present() -> Vec<IpFamily> {
    IpFamily::ALL
        .into_iter()
        .filter(|fam| super::netfilter::nft_table_exists(fam.nft(), TABLE))
        .collect()
}

fn nft(script: &str) -> Result<(), MasqError> {
    super::netfilter::nft(script).map_err(|e| match e {
        NftFailure::Spawn(e) => MasqError::Spawn(e),
        NftFailure::Rejected { status, stderr } => MasqError::Nft { status, stderr },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4() -> (Ipv4Net, Ipv4Net) {
        ("10.244.0.0/16".parse().unwrap(), "10.244.7.0/24".parse().unwrap())
    }

    fn v6() -> (Ipv6Net, Ipv6Net) {
        (
            "fd00:10:244::/56".parse().unwrap(),
            "fd00:10:244:7::/64".parse().unwrap(),
        )
    }

    /// The IPv4 table exactly as the agent rendered it before IPv6 was added.
    const V4_TABLE: &str = "add table ip overlay-agent\n\
        delete table ip overlay-agent\n\
        table ip overlay-agent {\n\
        \tchain postrouting {\n\
        \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
        \t\tmeta mark & 0x00004000 == 0x00004000 return comment \"kube-proxy NATs these\"\n\
        \t\tip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return comment \"pod to pod: keep the source\"\n\
        \t\tip saddr != 10.244.0.0/16 ip daddr 10.244.7.0/24 return comment \"outside to our pods: keep the source\"\n\
        \t\tip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random comment \"pod to outside\"\n\
        \t\tip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random comment \"host to remote pods\"\n\
        \t}\n\
        }\n";

    const V6_REMOVE: &str = "add table ip6 overlay-agent\ndelete table ip6 overlay-agent\n";
    const V4_REMOVE: &str = "add table ip overlay-agent\ndelete table ip overlay-agent\n";

    #[test]
    fn ruleset_is_one_replacing_transaction_with_flannel_semantics() {
        let (network, subnet) = v4();
        let s = table(IpFamily::V4, network.into(), subnet.into());
        assert_eq!(s, V4_TABLE);
        let lines: Vec<&str> = s.lines().map(str::trim).collect();
        // Replace, never append: the table is created, deleted and defined in one transaction.
        assert_eq!(
            &lines[..3],
            [
                "add table ip overlay-agent",
                "delete table ip overlay-agent",
                "table ip overlay-agent {"
            ]
        );
        assert!(
            lines.contains(&"type nat hook postrouting priority srcnat; policy accept;"),
            "{s}"
        );
        let rules: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.contains(" return") || l.contains("masquerade"))
            .collect();
        assert_eq!(rules.len(), 5, "{s}");
        assert!(
            rules[1].starts_with("ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return"),
            "{s}"
        );
        assert!(
            rules[2].starts_with("ip saddr != 10.244.0.0/16 ip daddr 10.244.7.0/24 return"),
            "{s}"
        );
        assert!(
            rules[3].starts_with("ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random"),
            "{s}"
        );
        assert!(
            rules[4].starts_with("ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade"),
            "{s}"
        );
        // Pod-to-pod exemptions come before any masquerade.
        assert_eq!(rules.iter().position(|r| r.contains("masquerade")), Some(3));
        assert_eq!(
            render(&MasqNets::default(), &IpFamily::ALL),
            format!("{V4_REMOVE}{V6_REMOVE}")
        );
    }

    /// flanneld's `MasqIP6Rules` (with --random-fully), rule for rule: the kube-proxy mark
    /// returns; pod ↔ pod returns; outside → our subnet returns; cluster → not ff00::/8 is
    /// masqueraded; not cluster → cluster is masqueraded.
    #[test]
    fn ipv6_table_is_flannel_s_ip6tables_rules() {
        let (network, subnet) = v6();
        assert_eq!(
            table(IpFamily::V6, network.into(), subnet.into()),
            "add table ip6 overlay-agent\n\
             delete table ip6 overlay-agent\n\
             table ip6 overlay-agent {\n\
             \tchain postrouting {\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tmeta mark & 0x00004000 == 0x00004000 return comment \"kube-proxy NATs these\"\n\
             \t\tip6 saddr fd00:10:244::/56 ip6 daddr fd00:10:244::/56 return comment \"pod to pod: keep the source\"\n\
             \t\tip6 saddr != fd00:10:244::/56 ip6 daddr fd00:10:244:7::/64 return comment \"outside to our pods: keep the source\"\n\
             \t\tip6 saddr fd00:10:244::/56 ip6 daddr != ff00::/8 masquerade fully-random comment \"pod to outside\"\n\
             \t\tip6 saddr != fd00:10:244::/56 ip6 daddr fd00:10:244::/56 masquerade fully-random comment \"host to remote pods\"\n\
             \t}\n\
             }\n"
        );
    }

    #[test]
    fn one_transaction_for_both_families_removes_an_unconfigured_one() {
        let (n6, s6) = v6();
        let ipv4_only = MasqNets {
            v4: Some(v4()),
            v6: None,
        };
        // IPv4 only: the IPv4 table byte for byte as before, and a stale IPv6 table removed;
        // with no IPv6 table there, nothing of IPv6 is said (a host with IPv6 disabled).
        assert_eq!(
            render(&ipv4_only, &IpFamily::ALL),
            format!("{V4_TABLE}{V6_REMOVE}")
        );
        assert_eq!(render(&ipv4_only, &[IpFamily::V4]), V4_TABLE);
        let ipv6_only = MasqNets {
            v4: None,
            v6: Some(v6()),
        };
        assert_eq!(
            render(&ipv6_only, &IpFamily::ALL),
            format!("{V4_REMOVE}{}", table(IpFamily::V6, n6.into(), s6.into()))
        );
        let dual = MasqNets {
            v4: Some(v4()),
            v6: Some(v6()),
        };
        let s = render(&dual, &[]);
        assert!(s.starts_with(V4_TABLE), "{s}");
        assert!(s.ends_with(&table(IpFamily::V6, n6.into(), s6.into())), "{s}");
        assert_eq!(
            dual.to_string(),
            "ip 10.244.0.0/16 (our 10.244.7.0/24), ip6 fd00:10:244::/56 (our fd00:10:244:7::/64)"
        );
        assert!(MasqNets::default().is_empty());
    }
}
