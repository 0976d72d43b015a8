//! `--ip-masq`: flannel's masquerade rules as an nftables table of our own, `ip overlay-agent`.
//!
//! The whole table is replaced in one `nft -f -` transaction (`add table` + `delete table` +
//! the table), so a restart never duplicates rules and there is no window without them.
//! Semantics are flannel's `MasqRules` (pkg/ip/iptables): pod ↔ pod anywhere in the cluster
//! Network is left alone, pod → outside is masqueraded (except multicast), outside → our pods
//! is left alone, and the host → remote pods is masqueraded so replies come back to us.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use ipnet::Ipv4Net;

/// The nftables table (family `ip`).
pub const TABLE: &str = "overlay-agent";
/// kube-proxy's masquerade mark: such packets are kube-proxy's to NAT (avoids double NAT).
const KUBE_PROXY_MARK: &str = "0x00004000";

#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    #[error("running nft (is the nftables package installed?): {0}")]
    Spawn(std::io::Error),
    #[error("nft -f - rejected the ruleset ({status}): {stderr}")]
    Nft {
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// The transaction that installs (or replaces) the table for `network` with our lease `subnet`.
pub fn render(network: Ipv4Net, subnet: Ipv4Net) -> String {
    format!(
        "add table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tmeta mark & {KUBE_PROXY_MARK} == {KUBE_PROXY_MARK} return comment \"kube-proxy NATs these\"\n\
         \t\tip saddr {network} ip daddr {network} return comment \"pod to pod: keep the source\"\n\
         \t\tip saddr != {network} ip daddr {subnet} return comment \"outside to our pods: keep the source\"\n\
         \t\tip saddr {network} ip daddr != 224.0.0.0/4 masquerade fully-random comment \"pod to outside\"\n\
         \t\tip saddr != {network} ip daddr {network} masquerade fully-random comment \"host to remote pods\"\n\
         \t}}\n\
         }}\n"
    )
}

/// The transaction that removes the table; succeeds whether it exists or not.
pub fn render_remove() -> String {
    format!("add table ip {TABLE}\ndelete table ip {TABLE}\n")
}

/// Installs or replaces the rules, atomically.
pub fn install(network: Ipv4Net, subnet: Ipv4Net) -> Result<(), MasqError> {
    nft(&render(network, subnet))
}

/// Removes the table (idempotent).
pub fn remove() -> Result<(), MasqError> {
    nft(&render_remove())
}

fn nft(script: &str) -> Result<(), MasqError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(MasqError::Spawn)?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .map_err(MasqError::Spawn)?;
    let out = child.wait_with_output().map_err(MasqError::Spawn)?;
    if !out.status.success() {
        return Err(MasqError::Nft {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_is_one_replacing_transaction_with_flannel_semantics() {
        let s = render("10.244.0.0/16".parse().unwrap(), "10.244.7.0/24".parse().unwrap());
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
            render_remove(),
            "add table ip overlay-agent\ndelete table ip overlay-agent\n"
        );
    }
}
