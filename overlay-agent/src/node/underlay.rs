//! The underlay interface, chosen as flanneld chooses it (`--iface`, then `--iface-regex`, then
//! `--iface-can-reach`, else the interface of the default IPv4 route), and the node's stable
//! VTEP MAC. A host without IPv4 (an IPv6-only network, `"EnableIPv4": false`) gets the same
//! search by IPv6 addresses and the default IPv6 route, as flanneld's IPv6 stack does it.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::{
    ethtool::{self, EthtoolError},
    netlink::{self, V6Addr},
};

#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    #[error("interface {0:?} not found")]
    NotFound(String),
    #[error(
        "no interface matches {}; interfaces here: {available}",
        tried.join("; ")
    )]
    NoMatch {
        /// One entry per option tried, with why it did not match.
        tried: Vec<String>,
        /// `name [addresses]` of every interface.
        available: String,
    },
    #[error("no default IPv4 route in /proc/net/route; pass --iface NAME, --iface ADDRESS, --iface-regex or --iface-can-reach")]
    NoDefaultRoute,
    #[error("no default IPv6 route in /proc/net/ipv6_route")]
    NoDefaultRoute6,
    #[error("{v4}; and by IPv6 (a host without IPv4): {v6}")]
    NeitherFamily {
        v4: Box<IfaceError>,
        v6: Box<IfaceError>,
    },
    #[error("interface {0} has no IPv4 address; give it one or pick another with --iface")]
    NoIpv4(String),
    #[error("interface {0} has no global IPv6 address")]
    NoIpv6(String),
    #[error("looking up the route to {dst} (--iface-can-reach): {reason}")]
    Route { dst: Ipv4Addr, reason: String },
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: unexpected content {content:?}")]
    Parse { path: String, content: String },
    #[error("listing interface addresses: {0}")]
    Getifaddrs(#[from] nix::Error),
    #[error(transparent)]
    Ioctl(#[from] EthtoolError),
}

/// Which interface carries inter-host traffic, in flanneld's order of precedence: each
/// `--iface` in turn, then each `--iface-regex`, then `--iface-can-reach`; with none of them,
/// the interface of the default route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Interface names or IPv4 addresses.
    pub iface: Vec<String>,
    /// Regular expressions over addresses, then names.
    pub iface_regex: Vec<String>,
    pub iface_can_reach: Option<Ipv4Addr>,
}

impl Selection {
    /// True when nothing was selected: the default route's interface is used.
    pub fn is_default(&self) -> bool {
        self.iface.is_empty() && self.iface_regex.is_empty() && self.iface_can_reach.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub name: String,
    pub ifindex: u32,
    /// `PublicIP` unless `--public-ip` says otherwise; none on a host without IPv4.
    pub ipv4: Option<Ipv4Addr>,
    /// The interface's preferred IPv6 address as flanneld picks it (see [`preferred_ipv6`]);
    /// `PublicIPv6` unless `--public-ipv6` says otherwise.
    pub ipv6: Option<Ipv6Addr>,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Every address the interface has (host-gw requires the PublicIP to be one of them).
    pub addrs: Vec<IpAddr>,
}

/// One interface as selection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub ifindex: u32,
    /// Its IPv4 addresses, in the kernel's order (the first is the one a name match uses).
    pub ipv4: Vec<Ipv4Addr>,
    /// Its global IPv6 addresses, in the kernel's order (searched only on a host where no
    /// interface is found by IPv4).
    pub ipv6: Vec<Ipv6Addr>,
}

/// The interface selection picked, the address to use on it, and which option picked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub name: String,
    /// IPv4, or IPv6 when nothing was found by IPv4.
    pub addr: IpAddr,
    pub by: String,
}

/// The routing lookups selection needs, apart from the interface list (tests answer them).
pub trait Routes {
    /// The interface of the default IPv4 route.
    fn default_iface(&self) -> Result<String, IfaceError>;
    /// The interface of the default IPv6 route.
    fn default_iface6(&self) -> Result<String, IfaceError>;
    /// `ip route get dst`: the output interface's index and the preferred source, if any.
    fn route_to(&self, dst: Ipv4Addr) -> Result<(u32, Option<Ipv4Addr>), IfaceError>;
}

/// The address family a selection pass searches by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    V4,
    V6,
}

impl Pass {
    fn label(self) -> &'static str {
        match self {
            Pass::V4 => "IPv4",
            Pass::V6 => "IPv6",
        }
    }

    fn addrs(self, l: &Link) -> Vec<IpAddr> {
        match self {
            Pass::V4 => l.ipv4.iter().copied().map(IpAddr::V4).collect(),
            Pass::V6 => l.ipv6.iter().copied().map(IpAddr::V6).collect(),
        }
    }

    /// `want` as an address of this family, if it is one.
    fn parse(self, want: &str) -> Option<IpAddr> {
        match self {
            Pass::V4 => want.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
            Pass::V6 => want.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
        }
    }
}

/// Picks the underlay as flanneld's `LookupExtIface` does: every `--iface` in order, then every
/// `--iface-regex` in order, then `--iface-can-reach` (see [`by_iface`], [`by_regex`],
/// [`by_route`]); the first that finds an interface with an IPv4 address wins. With none of these
/// options: the default route's interface. Interfaces are searched in index order.
///
/// Only when that finds nothing and some interface has a global IPv6 address (a host without
/// IPv4, for an IPv6-only network) is the same search made by IPv6 addresses and the default
/// IPv6 route (`--iface-can-reach` takes an IPv4 destination and is skipped).
pub fn choose(sel: &Selection, links: &[Link], routes: &impl Routes) -> Result<Choice, IfaceError> {
    let v4 = match choose_by(Pass::V4, sel, links, routes) {
        Ok(c) => return Ok(c),
        Err(e) => e,
    };
    if links.iter().all(|l| l.ipv6.is_empty()) {
        return Err(v4);
    }
    choose_by(Pass::V6, sel, links, routes).map_err(|v6| IfaceError::NeitherFamily {
        v4: Box::new(v4),
        v6: Box::new(v6),
    })
}

/// One search of [`choose`], by the addresses of `pass`'s family.
fn choose_by(
    pass: Pass,
    sel: &Selection,
    links: &[Link],
    routes: &impl Routes,
) -> Result<Choice, IfaceError> {
    // Interfaces in index order, as Go's net.Interfaces lists them.
    let mut by_index: Vec<&Link> = links.iter().collect();
    by_index.sort_by_key(|l| l.ifindex);
    let choice = |(l, addr): (&Link, IpAddr), by: String| Choice {
        name: l.name.clone(),
        addr,
        by,
    };
    if sel.is_default() {
        let name = match pass {
            Pass::V4 => routes.default_iface()?,
            Pass::V6 => routes.default_iface6()?,
        };
        let l = by_index
            .iter()
            .find(|l| l.name == name)
            .ok_or_else(|| IfaceError::NotFound(name.clone()))?;
        let found = first_addr(pass, l).map_err(|_| match pass {
            Pass::V4 => IfaceError::NoIpv4(name),
            Pass::V6 => IfaceError::NoIpv6(name),
        })?;
        return Ok(choice(found, "the default route".into()));
    }
    // Lazily, in flanneld's order: the first that matches ends the search.
    let attempts = sel
        .iface
        .iter()
        .map(|w| (format!("--iface {w}"), by_iface(pass, w, &by_index)))
        .chain(
            sel.iface_regex
                .iter()
                .map(|p| (format!("--iface-regex {p}"), by_regex(pass, p, &by_index))),
        )
        .chain(sel.iface_can_reach.into_iter().map(|d| {
            (
                format!("--iface-can-reach {d}"),
                by_route(pass, d, &by_index, routes),
            )
        }));
    let mut tried = Vec::new();
    for (by, result) in attempts {
        match result {
            Ok(found) => return Ok(choice(found, by)),
            Err(why) => tried.push(format!("{by}: {why}")),
        }
    }
    let available = by_index
        .iter()
        .map(|l| {
            let addrs: Vec<String> = pass.addrs(l).iter().map(IpAddr::to_string).collect();
            format!("{} [{}]", l.name, addrs.join(" "))
        })
        .collect::<Vec<_>>()
        .join(", ");
    Err(IfaceError::NoMatch { tried, available })
}

/// The interface's first address of the family (what a match by name uses).
fn first_addr(pass: Pass, l: &Link) -> Result<(&Link, IpAddr), String> {
    match pass.addrs(l).first() {
        Some(ip) => Ok((l, *ip)),
        None => Err(format!("{} has no {} address", l.name, pass.label())),
    }
}

/// `--iface`: an address picks the interface holding it, with that address; a name picks that
/// interface with its first address.
fn by_iface<'a>(pass: Pass, want: &str, links: &[&'a Link]) -> Result<(&'a Link, IpAddr), String> {
    if let Some(ip) = pass.parse(want) {
        let l = links
            .iter()
            .find(|l| pass.addrs(l).contains(&ip))
            .ok_or_else(|| format!("no interface has that {} address", pass.label()))?;
        return Ok((l, ip));
    }
    first_addr(
        pass,
        links
            .iter()
            .find(|l| l.name == want)
            .ok_or("no interface has that name")?,
    )
}

/// `--iface-regex`: every interface's addresses first (the matching address is used), then the
/// first interface whose name matches, with its first address.
fn by_regex<'a>(pass: Pass, pattern: &str, links: &[&'a Link]) -> Result<(&'a Link, IpAddr), String> {
    let re = regex::Regex::new(pattern).map_err(|e| format!("not a valid regular expression: {e}"))?;
    for l in links {
        if let Some(ip) = pass.addrs(l).into_iter().find(|ip| re.is_match(&ip.to_string())) {
            return Ok((l, ip));
        }
    }
    first_addr(
        pass,
        links
            .iter()
            .find(|l| re.is_match(&l.name))
            .ok_or("matches no interface address or name")?,
    )
}

/// `--iface-can-reach`: the route's output interface, with its preferred source address (else
/// the interface's first address). An IPv4 destination: no answer in the IPv6 search.
fn by_route<'a>(
    pass: Pass,
    dst: Ipv4Addr,
    links: &[&'a Link],
    routes: &impl Routes,
) -> Result<(&'a Link, IpAddr), String> {
    if pass == Pass::V6 {
        return Err("an IPv4 destination, not looked up by IPv6".into());
    }
    let (oif, src) = routes.route_to(dst).map_err(|e| e.to_string())?;
    let l = links
        .iter()
        .find(|l| l.ifindex == oif)
        .ok_or_else(|| format!("the route leaves through interface index {oif}, which is not listed"))?;
    match src {
        Some(ip) => Ok((l, IpAddr::V4(ip))),
        None => first_addr(pass, l),
    }
}

/// This system's routing table, through `/proc/net/route` and an `RTM_GETROUTE` request.
struct SystemRoutes;

impl Routes for SystemRoutes {
    fn default_iface(&self) -> Result<String, IfaceError> {
        default_route_iface(&read("/proc/net/route")?).ok_or(IfaceError::NoDefaultRoute)
    }

    fn default_iface6(&self) -> Result<String, IfaceError> {
        default_route6_iface(&read("/proc/net/ipv6_route")?).ok_or(IfaceError::NoDefaultRoute6)
    }

    fn route_to(&self, dst: Ipv4Addr) -> Result<(u32, Option<Ipv4Addr>), IfaceError> {
        netlink::route_get(dst).map_err(|reason| IfaceError::Route { dst, reason })
    }
}

/// Resolves the underlay from the interface options (all empty = the default route).
pub fn resolve(sel: &Selection) -> Result<Underlay, IfaceError> {
    let links = links()?;
    let c = choose(sel, &links, &SystemRoutes)?;
    tracing::info!(iface = %c.name, address = %c.addr, by = %c.by, "underlay interface chosen");
    let (ipv4, ipv6) = match c.addr {
        IpAddr::V4(a) => (Some(a), None),
        // Found by IPv6: an IPv4 address it may still have is PublicIP's default.
        IpAddr::V6(a) => (
            links
                .iter()
                .find(|l| l.name == c.name)
                .and_then(|l| l.ipv4.first().copied()),
            Some(a),
        ),
    };
    underlay(&c.name, ipv4, ipv6)
}

/// Every interface with its index and IPv4 addresses (netlink-backed: this network namespace).
fn links() -> Result<Vec<Link>, IfaceError> {
    let mut links: Vec<Link> = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs()? {
        let i = match links.iter().position(|l| l.name == ifa.interface_name) {
            Some(i) => i,
            None => {
                links.push(Link {
                    name: ifa.interface_name.clone(),
                    ifindex: 0,
                    ipv4: Vec::new(),
                    ipv6: Vec::new(),
                });
                links.len() - 1
            }
        };
        if let Some(a) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            links[i].ipv4.push(a.ip());
        }
        if let Some(a) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in6()) {
            if is_global6(&a.ip()) {
                links[i].ipv6.push(a.ip());
            }
        }
        if let Some(ll) = ifa.address.as_ref().and_then(|a| a.as_link_addr()) {
            links[i].ifindex = ll.ifindex() as u32;
        }
    }
    for l in links.iter_mut().filter(|l| l.ifindex == 0) {
        l.ifindex = nix::net::if_::if_nametoindex(l.name.as_str()).unwrap_or(0);
    }
    Ok(links)
}

/// The interface's details; `ipv6` is the address it was found by, else its preferred one.
fn underlay(name: &str, ipv4: Option<Ipv4Addr>, ipv6: Option<Ipv6Addr>) -> Result<Underlay, IfaceError> {
    // Netlink-backed calls only (no sysfs): they answer for the caller's network namespace
    // even when /sys belongs to another one.
    let ifindex = nix::net::if_::if_nametoindex(name).map_err(|_| IfaceError::NotFound(name.into()))?;
    let ifaddrs: Vec<_> = nix::ifaddrs::getifaddrs()?
        .filter(|a| a.interface_name == name)
        .filter_map(|a| a.address)
        .collect();
    let mac = ifaddrs
        .iter()
        .find_map(|a| a.as_link_addr()?.addr())
        .ok_or_else(|| IfaceError::Parse {
            path: format!("{name} link address"),
            content: String::new(),
        })?;
    let addrs = ifaddrs
        .iter()
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|a| IpAddr::V4(a.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|a| IpAddr::V6(a.ip())))
        })
        .collect();
    let mtu = ethtool::link_mtu(name)?;
    let ipv6 = ipv6.or_else(|| match netlink::ipv6_addrs(ifindex) {
        Ok(a) => preferred_ipv6(a).first().copied(),
        Err(e) => {
            tracing::warn!(iface = name, error = %e, "cannot list the interface's IPv6 addresses");
            None
        }
    });
    Ok(Underlay {
        name: name.to_string(),
        ifindex,
        ipv4,
        ipv6,
        mac,
        mtu,
        addrs,
    })
}

fn read(path: &str) -> Result<String, IfaceError> {
    fs::read_to_string(path).map_err(|source| IfaceError::Read {
        path: path.into(),
        source,
    })
}

const IFA_F_TEMPORARY: u32 = 0x01;
const IFA_F_DEPRECATED: u32 = 0x20;
const IFA_F_PERMANENT: u32 = 0x80;

/// The usable IPv6 addresses of an interface in the order flanneld prefers them
/// (pkg/ip/iface.go `GetInterfaceIP6Addrs`): global unicast (unique local included) or
/// link-local, not deprecated; global before link-local, then manually assigned before
/// autoconfigured, then non-temporary before temporary; otherwise as the kernel lists them.
/// flanneld's `ExtV6Addr` (our `PublicIPv6`) defaults to the first.
pub fn preferred_ipv6(mut addrs: Vec<V6Addr>) -> Vec<Ipv6Addr> {
    let link_local = |a: &Ipv6Addr| (a.segments()[0] & 0xffc0) == 0xfe80;
    let global =
        |a: &Ipv6Addr| !a.is_unspecified() && !a.is_loopback() && !a.is_multicast() && !link_local(a);
    addrs.retain(|a| (global(&a.addr) || link_local(&a.addr)) && a.flags & IFA_F_DEPRECATED == 0);
    addrs.sort_by_key(|a| {
        (
            link_local(&a.addr),
            a.flags & IFA_F_PERMANENT == 0,
            a.flags & IFA_F_TEMPORARY != 0,
        )
    });
    addrs.into_iter().map(|a| a.addr).collect()
}

/// The interface of the lowest-metric default route in `/proc/net/route` text.
pub fn default_route_iface(route_table: &str) -> Option<String> {
    route_table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            if f.len() < 8 || f[1] != "00000000" || f[7] != "00000000" {
                return None;
            }
            let flags = u32::from_str_radix(f[3], 16).ok()?;
            if flags & 0x1 == 0 {
                return None; // RTF_UP
            }
            Some((f[6].parse::<u32>().ok()?, f[0].to_string()))
        })
        .min()
        .map(|(_, n)| n)
}

/// The interface of the lowest-metric default route in `/proc/net/ipv6_route` text (`::/0`, up,
/// not a reject route: the kernel lists an unreachable `::/0` on `lo`).
pub fn default_route6_iface(route_table: &str) -> Option<String> {
    const RTF_UP: u32 = 0x1;
    const RTF_REJECT: u32 = 0x200;
    route_table
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // dst dst_len src src_len next_hop metric refcnt use flags iface
            if f.len() < 10 || f[0] != "00000000000000000000000000000000" || f[1] != "00" {
                return None;
            }
            let flags = u32::from_str_radix(f[8], 16).ok()?;
            if flags & RTF_UP == 0 || flags & RTF_REJECT != 0 || f[9] == "lo" {
                return None;
            }
            Some((u32::from_str_radix(f[5], 16).ok()?, f[9].to_string()))
        })
        .min()
        .map(|(_, n)| n)
}

/// A global unicast IPv6 address (not link-local, loopback, multicast or unspecified).
fn is_global6(a: &Ipv6Addr) -> bool {
    !a.is_unspecified() && !a.is_loopback() && !a.is_multicast() && !a.is_unicast_link_local()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route() {
        let t = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth0\t00000000\t0100A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                 eth1\t00000000\t0101A8C0\t0003\t0\t0\t50\t00000000\t0\t0\t0\n\
                 eth2\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_route_iface(t).as_deref(), Some("eth1"));
        assert_eq!(default_route_iface("Iface\tDestination\n"), None);
    }

    #[test]
    fn ipv6_address_preference_as_flanneld() {
        let a = |s: &str, flags: u32| V6Addr {
            addr: s.parse().unwrap(),
            flags,
        };
        // As the kernel might list them (flags: 0x80 permanent, 0x01 temporary, 0x20 deprecated).
        let listed = vec![
            a("fe80::1", 0x80),
            a("2001:db8::dead", 0x01),        // temporary (privacy) address
            a("2001:db8::5", 0),              // SLAAC (not permanent)
            a("fd00:198:18::9", 0x80 | 0x20), // deprecated
            a("::1", 0x80),
            a("fd00:198:18::1", 0x80),
            a("ff02::1", 0x80),
        ];
        let got: Vec<String> = preferred_ipv6(listed).iter().map(|a| a.to_string()).collect();
        assert_eq!(
            got,
            ["fd00:198:18::1", "2001:db8::5", "2001:db8::dead", "fe80::1"]
        );
        assert_eq!(
            preferred_ipv6(vec![a("fe80::1", 0x80)]),
            vec!["fe80::1".parse::<Ipv6Addr>().unwrap()]
        );
        assert!(preferred_ipv6(vec![a("::1", 0x80)]).is_empty());
    }

    #[test]
    fn loopback_by_name_address_and_route() {
        let lo = resolve(&opts("--iface lo")).unwrap();
        assert_eq!(lo.ipv4, Some(Ipv4Addr::LOCALHOST));
        assert_eq!(lo.mac, [0; 6]);
        assert!(lo.ifindex > 0 && lo.mtu > 0);
        let by_ip = resolve(&opts("--iface no-such-if0 --iface 127.0.0.1")).unwrap();
        assert_eq!(by_ip.name, "lo");
        let by_re = resolve(&opts(r"--iface no-such-if0 --iface-regex ^127\.0\.0\.1$")).unwrap();
        assert_eq!(
            (by_re.name.as_str(), by_re.ipv4),
            ("lo", Some(Ipv4Addr::LOCALHOST))
        );
        // A real RTM_GETROUTE: 127.0.0.9 is reached through lo, from 127.0.0.1.
        let by_route = resolve(&opts("--iface-can-reach 127.0.0.9")).unwrap();
        assert_eq!(
            (by_route.name.as_str(), by_route.ipv4),
            ("lo", Some(Ipv4Addr::LOCALHOST))
        );
        let err = resolve(&opts("--iface no-such-if0")).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "no interface matches --iface no-such-if0: no interface has that name; interfaces here: "
            ),
            "{err}"
        );
        assert!(err.contains("lo [127.0.0.1]"), "{err}");
    }

    /// A canned routing table: the default route's interface and `ip route get` answers.
    struct Table {
        default: Option<&'static str>,
        default6: Option<&'static str>,
        routes: Vec<(Ipv4Addr, u32, Option<Ipv4Addr>)>,
    }

    impl Routes for Table {
        fn default_iface(&self) -> Result<String, IfaceError> {
            self.default.map(str::to_string).ok_or(IfaceError::NoDefaultRoute)
        }
        fn default_iface6(&self) -> Result<String, IfaceError> {
            self.default6
                .map(str::to_string)
                .ok_or(IfaceError::NoDefaultRoute6)
        }
        fn route_to(&self, dst: Ipv4Addr) -> Result<(u32, Option<Ipv4Addr>), IfaceError> {
            self.routes
                .iter()
                .find(|r| r.0 == dst)
                .map(|r| (r.1, r.2))
                .ok_or(IfaceError::Route {
                    dst,
                    reason: "Network is unreachable (os error 101)".into(),
                })
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// Listed out of index order on purpose: selection goes by index, as flanneld does.
    fn links() -> Vec<Link> {
        let l = |name: &str, ifindex, addrs: &[&str]| Link {
            name: name.into(),
            ifindex,
            ipv4: addrs.iter().map(|a| ip(a)).collect(),
            ipv6: Vec::new(),
        };
        vec![
            l("bond0", 5, &["192.168.5.5"]),
            l("lo", 1, &["127.0.0.1"]),
            l("eth1", 3, &["10.1.2.3"]),
            l("eth0", 2, &["198.18.0.11", "198.18.0.99"]),
            l("wg0", 4, &[]),
        ]
    }

    fn table() -> Table {
        Table {
            default: Some("eth0"),
            default6: None,
            routes: vec![
                (ip("10.9.9.9"), 3, Some(ip("10.1.2.3"))),
                (ip("10.8.8.8"), 3, None),
                // A route through eth1 whose preferred source lives on bond0.
                (ip("10.7.7.7"), 3, Some(ip("192.168.5.5"))),
                (ip("10.6.6.6"), 4, None),
            ],
        }
    }

    /// The options from a command-line-like string: `--iface eth0 --iface-regex ^10\.`.
    fn opts(line: &str) -> Selection {
        let words: Vec<&str> = line.split_whitespace().collect();
        let mut s = Selection::default();
        for pair in words.chunks(2) {
            match pair {
                ["--iface", v] => s.iface.push(v.to_string()),
                ["--iface-regex", v] => s.iface_regex.push(v.to_string()),
                ["--iface-can-reach", v] => s.iface_can_reach = Some(ip(v)),
                other => panic!("bad test options {other:?}"),
            }
        }
        s
    }

    #[test]
    fn flannel_precedence_and_matching() {
        // (options, "interface address chosen-by")
        let cases = [
            ("", "eth0 198.18.0.11 the default route"),
            ("--iface eth1", "eth1 10.1.2.3 --iface eth1"),
            // An address picks its interface and that address, not the interface's first.
            ("--iface 198.18.0.99", "eth0 198.18.0.99 --iface 198.18.0.99"),
            // In order; one that does not exist or has no IPv4 address is skipped.
            (
                "--iface nosuch0 --iface wg0 --iface 10.1.2.3 --iface eth0",
                "eth1 10.1.2.3 --iface 10.1.2.3",
            ),
            // --iface before --iface-regex before --iface-can-reach.
            (
                "--iface eth1 --iface-regex ^198 --iface-can-reach 10.7.7.7",
                "eth1 10.1.2.3 --iface eth1",
            ),
            (
                "--iface nosuch0 --iface-regex ^198 --iface-can-reach 10.9.9.9",
                "eth0 198.18.0.11 --iface-regex ^198",
            ),
            (
                r"--iface nosuch0 --iface-regex ^172\. --iface-can-reach 10.9.9.9",
                "eth1 10.1.2.3 --iface-can-reach 10.9.9.9",
            ),
            // A regex is searched for in addresses (unanchored) and the matching one is used.
            (r"--iface-regex \.99$", r"eth0 198.18.0.99 --iface-regex \.99$"),
            (r"--iface-regex 18\.0", r"eth0 198.18.0.11 --iface-regex 18\.0"),
            // Interfaces in index order: eth0 (2) before eth1 (3) and bond0 (5).
            (
                r"--iface-regex ^(198|10|192)\.",
                r"eth0 198.18.0.11 --iface-regex ^(198|10|192)\.",
            ),
            // Every address is tried before any name: bond0's address beats eth1's name.
            (
                r"--iface-regex ^eth1$|^192\.",
                r"bond0 192.168.5.5 --iface-regex ^eth1$|^192\.",
            ),
            // Then names, the first match with its first address.
            ("--iface-regex ^bond", "bond0 192.168.5.5 --iface-regex ^bond"),
            ("--iface-regex eth", "eth0 198.18.0.11 --iface-regex eth"),
            // The first name match has no IPv4 address: that regex fails, the next is tried.
            (
                "--iface-regex ^wg --iface-regex ^eth1$",
                "eth1 10.1.2.3 --iface-regex ^eth1$",
            ),
            // The route's interface and preferred source, else the interface's first address.
            (
                "--iface-can-reach 10.9.9.9",
                "eth1 10.1.2.3 --iface-can-reach 10.9.9.9",
            ),
            (
                "--iface-can-reach 10.8.8.8",
                "eth1 10.1.2.3 --iface-can-reach 10.8.8.8",
            ),
            (
                "--iface-can-reach 10.7.7.7",
                "eth1 192.168.5.5 --iface-can-reach 10.7.7.7",
            ),
        ];
        for (line, want) in cases {
            let c = choose(&opts(line), &links(), &table()).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(format!("{} {} {}", c.name, c.addr, c.by), want, "{line}");
        }
    }

    #[test]
    fn nothing_matches_names_every_attempt() {
        // With any option given, the default route is no fallback (flanneld exits too).
        let s = opts(
            "--iface nosuch0 --iface wg0 --iface 203.0.113.1 --iface-regex ^172\\. --iface-regex ^wg \
             --iface-can-reach 10.6.6.6",
        );
        let err = choose(&s, &links(), &table()).unwrap_err().to_string();
        assert_eq!(
            err,
            "no interface matches --iface nosuch0: no interface has that name; \
             --iface wg0: wg0 has no IPv4 address; \
             --iface 203.0.113.1: no interface has that IPv4 address; \
             --iface-regex ^172\\.: matches no interface address or name; \
             --iface-regex ^wg: wg0 has no IPv4 address; \
             --iface-can-reach 10.6.6.6: wg0 has no IPv4 address; \
             interfaces here: lo [127.0.0.1], eth0 [198.18.0.11 198.18.0.99], eth1 [10.1.2.3], \
             wg0 [], bond0 [192.168.5.5]"
        );
        let err = choose(&opts("--iface-can-reach 10.5.5.5"), &links(), &table())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "no interface matches --iface-can-reach 10.5.5.5: looking up the route to 10.5.5.5 \
                 (--iface-can-reach): Network is unreachable (os error 101); interfaces here:"
            ),
            "{err}"
        );
        let no_default = Table {
            default: None,
            default6: None,
            routes: Vec::new(),
        };
        assert!(matches!(
            choose(&Selection::default(), &links(), &no_default),
            Err(IfaceError::NoDefaultRoute)
        ));
        let wg_default = Table {
            default: Some("wg0"),
            default6: None,
            routes: Vec::new(),
        };
        assert!(matches!(
            choose(&Selection::default(), &links(), &wg_default),
            Err(IfaceError::NoIpv4(n)) if n == "wg0"
        ));
    }

    /// A host without IPv4 on its uplinks: lo still has 127.0.0.1, eth0 and eth1 only IPv6.
    fn v6_links() -> Vec<Link> {
        let l = |name: &str, ifindex, v4: &[&str], v6: &[&str]| Link {
            name: name.into(),
            ifindex,
            ipv4: v4.iter().map(|a| ip(a)).collect(),
            ipv6: v6.iter().map(|a| a.parse().unwrap()).collect(),
        };
        vec![
            l("lo", 1, &["127.0.0.1"], &[]),
            l("eth1", 3, &[], &["fd00:198:18:1::3"]),
            l("eth0", 2, &[], &["fd00:198:18::11", "2001:db8::11"]),
        ]
    }

    #[test]
    fn a_host_without_ipv4_is_searched_by_ipv6() {
        let t = Table {
            default: None,
            default6: Some("eth0"),
            routes: Vec::new(),
        };
        let cases = [
            ("", "eth0 fd00:198:18::11 the default route"),
            ("--iface eth1", "eth1 fd00:198:18:1::3 --iface eth1"),
            ("--iface 2001:db8::11", "eth0 2001:db8::11 --iface 2001:db8::11"),
            (
                "--iface nosuch0 --iface eth1",
                "eth1 fd00:198:18:1::3 --iface eth1",
            ),
            (r"--iface-regex ^2001:", "eth0 2001:db8::11 --iface-regex ^2001:"),
            (
                r"--iface-regex ^eth1$",
                "eth1 fd00:198:18:1::3 --iface-regex ^eth1$",
            ),
            // The IPv4 search runs first and wins wherever it finds something: lo by name.
            ("--iface lo --iface eth0", "lo 127.0.0.1 --iface lo"),
        ];
        for (line, want) in cases {
            let c = choose(&opts(line), &v6_links(), &t).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(format!("{} {} {}", c.name, c.addr, c.by), want, "{line}");
        }
        // Found by neither: both searches say why.
        let err = choose(&opts("--iface nosuch0"), &v6_links(), &t)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("no interface matches --iface nosuch0: no interface has that name; interfaces here: lo [127.0.0.1]"), "{err}");
        assert!(
            err.contains("; and by IPv6 (a host without IPv4): no interface matches --iface nosuch0"),
            "{err}"
        );
        assert!(err.contains("eth0 [fd00:198:18::11 2001:db8::11]"), "{err}");
        let none = Table {
            default: None,
            default6: None,
            routes: Vec::new(),
        };
        assert_eq!(
            choose(&Selection::default(), &v6_links(), &none)
                .unwrap_err()
                .to_string(),
            "no default IPv4 route in /proc/net/route; pass --iface NAME, --iface ADDRESS, \
             --iface-regex or --iface-can-reach; and by IPv6 (a host without IPv4): no default \
             IPv6 route in /proc/net/ipv6_route"
        );
    }

    #[test]
    fn default_ipv6_route_skips_reject_and_loopback_routes() {
        // As /proc/net/ipv6_route lists them: a link-local route, the unreachable ::/0 on lo,
        // two default routes (metric 0x400 via eth1 beats 0x800 via eth0).
        let table = "\
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000800 00000001 00000000 00450003     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000002 00000400 00000001 00000000 00450003     eth1
";
        assert_eq!(default_route6_iface(table).as_deref(), Some("eth1"));
        let only_reject = table.lines().take(2).collect::<Vec<_>>().join("\n");
        assert_eq!(default_route6_iface(&only_reject), None);
    }
}
