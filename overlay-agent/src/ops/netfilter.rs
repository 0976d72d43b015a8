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
