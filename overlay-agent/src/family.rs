//! The two address families the control plane leases subnets in, written once: a small
//! [`Family`] trait over IPv4 and IPv6, and a [`SubnetPool`] (flannel's Network, SubnetLen,
//! SubnetMin, SubnetMax, or their IPv6 counterparts) with the allocation arithmetic on `u128`.

use std::{
    fmt::{Debug, Display},
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// One address family: its address and network types and the numbers flannel's config check
/// (pkg/subnet/config.go `CheckNetworkConfig`) uses for it.
pub trait Family: Copy + Eq + Hash + Debug + Send + Sync + 'static {
    type Addr: Copy + Eq + Ord + Hash + Debug + Display + FromStr + Into<IpAddr> + Send + Sync + 'static;
    type Net: Copy + Eq + Ord + Hash + Debug + Display + FromStr + Into<IpNet> + Send + Sync + 'static;

    /// "IPv4" / "IPv6", for messages.
    const NAME: &'static str;
    const BITS: u8;
    /// Longest SubnetLen flannel accepts (/30, /126: room for a tunnel and a bridge address).
    const MAX_SUBNET_LEN: u8;
    /// Longest Network prefix flannel accepts without an explicit SubnetLen (/28, /124).
    const MIN_USEFUL_PREFIX: u8;
    /// The default SubnetLen when the network is big enough (/24, /64).
    const DEFAULT_SUBNET_LEN: u8;
    /// Examples for error messages.
    const EXAMPLE_NET: &'static str;
    const EXAMPLE_ADDR: &'static str;

    /// The address if it is of this family.
    fn from_ip(ip: IpAddr) -> Option<Self::Addr>;
    fn bits(a: Self::Addr) -> u128;
    fn addr(bits: u128) -> Self::Addr;
    /// The network of `len` bits that holds `a`. `len` must be at most `BITS`.
    fn net(a: Self::Addr, len: u8) -> Self::Net;
    /// The network's address (its first address when it is truncated).
    fn net_addr(n: &Self::Net) -> Self::Addr;
    fn net_len(n: &Self::Net) -> u8;
}

/// IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct V4;
/// IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct V6;

impl Family for V4 {
    type Addr = Ipv4Addr;
    type Net = Ipv4Net;
    const NAME: &'static str = "IPv4";
    const BITS: u8 = 32;
    const MAX_SUBNET_LEN: u8 = 30;
    const MIN_USEFUL_PREFIX: u8 = 28;
    const DEFAULT_SUBNET_LEN: u8 = 24;
    const EXAMPLE_NET: &'static str = "10.244.0.0/16";
    const EXAMPLE_ADDR: &'static str = "10.244.1.0";

    fn from_ip(ip: IpAddr) -> Option<Ipv4Addr> {
        match ip {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        }
    }
    fn bits(a: Ipv4Addr) -> u128 {
        u128::from(u32::from(a))
    }
    fn addr(bits: u128) -> Ipv4Addr {
        Ipv4Addr::from(bits as u32)
    }
    fn net(a: Ipv4Addr, len: u8) -> Ipv4Net {
        Ipv4Net::new(a, len).expect("prefix length within 32").trunc()
    }
    fn net_addr(n: &Ipv4Net) -> Ipv4Addr {
        n.addr()
    }
    fn net_len(n: &Ipv4Net) -> u8 {
        n.prefix_len()
    }
}

impl Family for V6 {
    type Addr = Ipv6Addr;
    type Net = Ipv6Net;
    const NAME: &'static str = "IPv6";
    const BITS: u8 = 128;
    const MAX_SUBNET_LEN: u8 = 126;
    const MIN_USEFUL_PREFIX: u8 = 124;
    const DEFAULT_SUBNET_LEN: u8 = 64;
    const EXAMPLE_NET: &'static str = "fd00:10:244::/56";
    const EXAMPLE_ADDR: &'static str = "fd00:10:244:1::";

    fn from_ip(ip: IpAddr) -> Option<Ipv6Addr> {
        match ip {
            IpAddr::V6(ip) => Some(ip),
            IpAddr::V4(_) => None,
        }
    }
    fn bits(a: Ipv6Addr) -> u128 {
        u128::from(a)
    }
    fn addr(bits: u128) -> Ipv6Addr {
        Ipv6Addr::from(bits)
    }
    fn net(a: Ipv6Addr, len: u8) -> Ipv6Net {
        Ipv6Net::new(a, len).expect("prefix length within 128").trunc()
    }
    fn net_addr(n: &Ipv6Net) -> Ipv6Addr {
        n.addr()
    }
    fn net_len(n: &Ipv6Net) -> u8 {
        n.prefix_len()
    }
}

/// A family known only at run time (a network of either family, a loop over both): the same
/// two, for the wings that dispatch on a value rather than a type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub const ALL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    /// The family of `net`.
    pub fn of(net: &IpNet) -> IpFamily {
        match net {
            IpNet::V4(_) => IpFamily::V4,
            IpNet::V6(_) => IpFamily::V6,
        }
    }

    /// `IPv4` / `IPv6`, for logs and messages ([`Family::NAME`]).
    pub fn name(self) -> &'static str {
        match self {
            IpFamily::V4 => V4::NAME,
            IpFamily::V6 => V6::NAME,
        }
    }
}

/// Number of addresses in a prefix of `len` bits of family `F` (saturating at `u128::MAX`).
fn size<F: Family>(len: u8) -> u128 {
    let host_bits = u32::from(F::BITS - len);
    1u128.checked_shl(host_bits).unwrap_or(u128::MAX)
}

/// The first host address of a subnet (what subnet.env records: `10.244.7.1/24`,
/// `fd00:10:244:7::1/64`), kept as a network with the subnet's prefix length.
pub fn first_host<F: Family>(sn: &F::Net) -> (F::Addr, u8) {
    (F::addr(F::bits(F::net_addr(sn)).wrapping_add(1)), F::net_len(sn))
}

/// The subnets a family may lease: flannel's `Network`/`SubnetLen`/`SubnetMin`/`SubnetMax`
/// (or `IPv6Network`/`IPv6SubnetLen`/`IPv6SubnetMin`/`IPv6SubnetMax`), defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetPool<F: Family> {
    pub network: F::Net,
    pub subnet_len: u8,
    /// First subnet that may be leased (network address of a `subnet_len` subnet).
    pub subnet_min: F::Addr,
    /// Last subnet that may be leased.
    pub subnet_max: F::Addr,
}

impl<F: Family> SubnetPool<F> {
    /// Whether `sn` may be leased (flannel's `isSubnetConfigCompat` / `isIPv6SubnetConfigCompat`).
    pub fn is_compatible(&self, sn: F::Net) -> bool {
        let a = F::net_addr(&sn);
        F::net_len(&sn) == self.subnet_len
            && F::net(a, self.subnet_len) == sn
            && a >= self.subnet_min
            && a <= self.subnet_max
    }

    /// How many subnets the pool holds (saturating).
    pub fn count(&self) -> u128 {
        let (lo, hi) = (F::bits(self.subnet_min), F::bits(self.subnet_max));
        if hi < lo {
            return 0;
        }
        // subnet_len ≥ 2 (flannel needs four subnets), so the quotient never overflows.
        ((hi - lo) >> (F::BITS - self.subnet_len)).saturating_add(1)
    }

    /// Every leasable subnet, in order, lazily (an IPv6 pool can hold 2^60 of them).
    pub fn subnets(&self) -> impl Iterator<Item = F::Net> + '_ {
        let step = size::<F>(self.subnet_len);
        let (lo, hi) = (F::bits(self.subnet_min), F::bits(self.subnet_max));
        let mut next = Some(lo).filter(|l| *l <= hi);
        std::iter::from_fn(move || {
            let cur = next?;
            next = cur.checked_add(step).filter(|n| *n <= hi);
            Some(F::net(F::addr(cur), self.subnet_len))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_in_both_families() {
        let p4 = SubnetPool::<V4> {
            network: "10.9.0.0/24".parse().unwrap(),
            subnet_len: 26,
            subnet_min: "10.9.0.64".parse().unwrap(),
            subnet_max: "10.9.0.192".parse().unwrap(),
        };
        let all: Vec<String> = p4.subnets().map(|s| s.to_string()).collect();
        assert_eq!(all, ["10.9.0.64/26", "10.9.0.128/26", "10.9.0.192/26"]);
        assert_eq!(p4.count(), 3);

        let p6 = SubnetPool::<V6> {
            network: "fd00:10:244::/56".parse().unwrap(),
            subnet_len: 64,
            subnet_min: "fd00:10:244:1::".parse().unwrap(),
            subnet_max: "fd00:10:244:ff::".parse().unwrap(),
        };
        assert_eq!(p6.count(), 255);
        let first: Vec<String> = p6.subnets().take(3).map(|s| s.to_string()).collect();
        assert_eq!(
            first,
            ["fd00:10:244:1::/64", "fd00:10:244:2::/64", "fd00:10:244:3::/64"]
        );
        assert_eq!(p6.subnets().last().unwrap().to_string(), "fd00:10:244:ff::/64");
        assert!(p6.is_compatible("fd00:10:244:7::/64".parse().unwrap()));
        for no in [
            "fd00:10:244::/64",     // below SubnetMin
            "fd00:10:245::/64",     // outside
            "fd00:10:244:7::/65",   // wrong length
            "fd00:10:244:7::1/64",  // not a network address
            "fd00:10:244:100::/64", // above SubnetMax
        ] {
            assert!(!p6.is_compatible(no.parse().unwrap()), "{no}");
        }
        // The whole of a huge pool is counted without overflow and iterated lazily.
        let huge = SubnetPool::<V6> {
            network: "fc00::/7".parse().unwrap(),
            subnet_len: 126,
            subnet_min: "fc00::4".parse().unwrap(),
            subnet_max: "fdff:ffff:ffff:ffff:ffff:ffff:ffff:fffc".parse().unwrap(),
        };
        assert_eq!(huge.count(), (1u128 << 119) - 1);
        assert_eq!(huge.subnets().nth(1).unwrap().to_string(), "fc00::8/126");
        assert_eq!(
            first_host::<V6>(&"fd00:10:244:7::/64".parse().unwrap()),
            ("fd00:10:244:7::1".parse().unwrap(), 64)
        );
        assert_eq!(
            first_host::<V4>(&"10.244.7.0/24".parse().unwrap()),
            ("10.244.7.1".parse().unwrap(), 24)
        );
    }
}
