//! The two address families as netfilter's tools name them, so that `--ip-masq` (nftables) and
//! `--iptables-forward-rules` (iptables, ip6tables) are written once for both: flanneld installs
//! the same rules for IPv6 (`MasqIP6Rules`, `forwardRules(IPv6Network)`) with ip6tables.

use ipnet::IpNet;

use crate::family::{Family as _, V4, V6};

/// An address family of netfilter's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NfFamily {
    V4,
    V6,
}

impl NfFamily {
    pub const ALL: [NfFamily; 2] = [NfFamily::V4, NfFamily::V6];

    /// The family of `net`.
    pub fn of(net: &IpNet) -> NfFamily {
        match net {
            IpNet::V4(_) => NfFamily::V4,
            IpNet::V6(_) => NfFamily::V6,
        }
    }

    /// `IPv4` / `IPv6`, for logs and messages.
    pub fn label(self) -> &'static str {
        match self {
            NfFamily::V4 => V4::NAME,
            NfFamily::V6 => V6::NAME,
        }
    }

    /// The nftables family, which is also the keyword of its address match: `ip`, `ip6`.
    pub fn nft(self) -> &'static str {
        match self {
            NfFamily::V4 => "ip",
            NfFamily::V6 => "ip6",
        }
    }

    /// Multicast, which flannel never masquerades.
    pub fn multicast(self) -> &'static str {
        match self {
            NfFamily::V4 => "224.0.0.0/4",
            NfFamily::V6 => "ff00::/8",
        }
    }

    /// The family's iptables command, whose `--version` names its default backend.
    pub fn iptables(self) -> &'static str {
        match self {
            NfFamily::V4 => "iptables",
            NfFamily::V6 => "ip6tables",
        }
    }

    /// The kernel's list of the family's legacy (x_tables) tables.
    pub fn legacy_tables(self) -> &'static str {
        match self {
            NfFamily::V4 => "/proc/net/ip_tables_names",
            NfFamily::V6 => "/proc/net/ip6_tables_names",
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
