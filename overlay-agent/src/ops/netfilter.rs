//! The two address families as netfilter's tools name them, so that `--ip-masq` (nftables) and
//! `--iptables-forward-rules` (iptables, ip6tables) are written once for both: flanneld installs
//! the same rules for IPv6 (`MasqIP6Rules`, `forwardRules(IPv6Network)`) with ip6tables.

pub use crate::family::IpFamily;

/// What netfilter's tools call each family ([`IpFamily`] extended).
pub trait NfFamily: Copy {
    /// The nftables family, which is also the keyword of its address match: `ip`, `ip6`.
    fn nft(self) -> &'static str;
    /// Multicast, which flannel never masquerades.
    fn multicast(self) -> &'static str;
    /// The family's iptables command, whose `--version` names its default backend.
    fn iptables(self) -> &'static str;
    /// The kernel's list of the family's legacy (x_tables) tables.
    fn legacy_tables(self) -> &'static str;
}

impl NfFamily for IpFamily {
    fn nft(self) -> &'static str {
        match self {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        }
    }

    fn multicast(self) -> &'static str {
        match self {
            IpFamily::V4 => "224.0.0.0/4",
            IpFamily::V6 => "ff00::/8",
        }
    }

    fn iptables(self) -> &'static str {
        match self {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        }
    }

    fn legacy_tables(self) -> &'static str {
        match self {
            IpFamily::V4 => "/proc/net/ip_tables_names",
            IpFamily::V6 => "/proc/net/ip6_tables_names",
        }
    }
}

/// Why `nft -f -` did not apply a script.
#[derive(Debug)]
pub enum NftFailure {
    /// `nft` could not be run (not installed).
    Spawn(std::io::Error),
    /// `nft` refused the script (nothing of it applied: one transaction).
    Rejected {
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Applies `script` with `nft -f -`, in one transaction.
pub fn nft(script: &str) -> Result<(), NftFailure> {
    use std::{
        io::Write as _,
        process::{Command, Stdio},
    };
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftFailure::Spawn)?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .map_err(NftFailure::Spawn)?;
    let out = child.wait_with_output().map_err(NftFailure::Spawn)?;
    if !out.status.success() {
        return Err(NftFailure::Rejected {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// True when nftables table `family name` exists (looked up without creating it).
pub fn nft_table_exists(family: &str, name: &str) -> bool {
    std::process::Command::new("nft")
        .args(["list", "table", family, name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
