//! Which peer leases are programmed: the one place the watch's events and the listings go
//! through ([`super::peer_watch`]). A family's side of a lease (its subnet and PublicIP, or
//! IPv6 subnet and PublicIPv6) is programmed only when
//! - the key is canonical: `<prefix>/subnets/` and the subnets exactly as flannel writes them
//!   (`10.244.7.0-24`, `10.244.7.0-24&fd00:10:244:7::-64`, `0.0.0.0-0&fd00:10:244:7::-64`;
//!   IPv6 as Go's `net.IP.String()` prints it), so no other spelling aliases a real peer's key;
//! - the subnet lies in the configured `Network` (`IPv6Network`) with exactly `SubnetLen`
//!   (`IPv6SubnetLen`);
//! - it is not our own subnet, and no lease with a lower key holds the same subnet (keys compare
//!   by their IPv4 subnet, then their IPv6 subnet, none first: the rule gives every node the
//!   same answer whatever order it saw the leases in; with the configured `SubnetLen` two
//!   subnets overlap only when they are equal);
//! - its PublicIP is a plausible unicast address of another node ([`LeaseFamily::implausible`],
//!   not ours).
//!
//! A side that fails is left out (its public address cleared, so [`Lease::v4`]/[`Lease::v6`]
//! give nothing), logged once per key and counted in `overlay_leases_rejected_total{reason}`;
//! a lease with no side left is not a peer. A family the config does not enable is ignored,
//! as flanneld ignores it.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{
    config::NetworkConfig,
    lease::{parse_subnet_key, subnet_key, Lease, LeaseAttrs, Peer, SubnetKey},
};
use crate::family::{Family, SubnetPool, V4, V6};

/// Why a lease (or one family's side of it) is not programmed: the label of
/// `overlay_leases_rejected_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The key is not the canonical spelling of its subnets.
    Key,
    /// The subnet is outside the configured network.
    OutsideNetwork,
    /// The subnet's length is not the configured SubnetLen.
    SubnetLen,
    /// The PublicIP is not a plausible unicast address of another node.
    PublicIp,
    /// The subnet is ours, or a lease with a lower key holds it.
    Overlap,
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Reason::Key,
        Reason::OutsideNetwork,
        Reason::SubnetLen,
        Reason::PublicIp,
        Reason::Overlap,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::Key => "key",
            Reason::OutsideNetwork => "outside_network",
            Reason::SubnetLen => "subnet_len",
            Reason::PublicIp => "public_ip",
            Reason::Overlap => "overlap",
        }
    }
}

/// One rejected side of a lease: the reason, the lease field it is about, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reason,
    pub field: &'static str,
    pub why: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.why)
    }
}

fn reject(reason: Reason, field: &'static str, why: impl Into<String>) -> Rejection {
    Rejection {
        reason,
        field,
        why: why.into(),
    }
}

/// The subnets of a key that is canonical under `prefix`; `None` for any other key (malformed,
/// or another spelling of a subnet).
pub fn canonical_key(prefix: &str, key: &str) -> Option<SubnetKey> {
    let k = parse_subnet_key(key).ok()?;
    (subnet_key(prefix, k) == key).then_some(k)
}

/// What a node checks a peer's lease against: the etcd prefix, the network config, and our own
/// lease (subnets and public addresses).
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    pub prefix: &'a str,
    pub config: &'a NetworkConfig,
    pub own: SubnetKey,
    pub own_attrs: &'a LeaseAttrs,
}

/// The family vocabulary of the lease checks: where a family's side sits in a lease and the
/// config, and which public addresses cannot be another node's.
pub trait LeaseFamily: Family {
    const NETWORK_FIELD: &'static str;
    const SUBNET_LEN_FIELD: &'static str;
    const PUBLIC_IP_FIELD: &'static str;
    fn pool(c: &NetworkConfig) -> Option<SubnetPool<Self>>;
    fn subnet(k: &SubnetKey) -> Option<Self::Net>;
    /// The lease's usable side in this family ([`Lease::v4`], [`Lease::v6`]).
    fn peer(l: &Lease) -> Option<Peer<Self>>;
    /// Our public address in this family.
    fn public_ip(a: &LeaseAttrs) -> Option<Self::Addr>;
    /// Takes the side out of a lease.
    fn drop_side(a: &mut LeaseAttrs);
    /// Why `ip` cannot be a node's underlay address, if it cannot.
    fn implausible(ip: Self::Addr) -> Option<&'static str>;
}

impl LeaseFamily for V4 {
    const NETWORK_FIELD: &'static str = "Network";
    const SUBNET_LEN_FIELD: &'static str = "SubnetLen";
    const PUBLIC_IP_FIELD: &'static str = "PublicIP";
    fn pool(c: &NetworkConfig) -> Option<SubnetPool<V4>> {
        c.ipv4
    }
    fn subnet(k: &SubnetKey) -> Option<Ipv4Net> {
        k.ipv4
    }
    fn peer(l: &Lease) -> Option<Peer<V4>> {
        l.v4()
    }
    fn public_ip(a: &LeaseAttrs) -> Option<Ipv4Addr> {
        a.public_ipv4()
    }
    fn drop_side(a: &mut LeaseAttrs) {
        a.public_ip = Ipv4Addr::UNSPECIFIED;
    }
    fn implausible(ip: Ipv4Addr) -> Option<&'static str> {
        let [first, ..] = ip.octets();
        Some(if ip.is_broadcast() {
            "the broadcast address"
        } else if first == 0 {
            "an address of \"this network\" (0.0.0.0/8)"
        } else if ip.is_loopback() {
            "a loopback address"
        } else if ip.is_link_local() {
            "a link-local address"
        } else if ip.is_multicast() {
            "a multicast address"
        } else if first >= 240 {
            "a reserved address (240.0.0.0/4)"
        } else {
            return None;
        })
    }
}

impl LeaseFamily for V6 {
    const NETWORK_FIELD: &'static str = "IPv6Network";
    const SUBNET_LEN_FIELD: &'static str = "IPv6SubnetLen";
    const PUBLIC_IP_FIELD: &'static str = "PublicIPv6";
    fn pool(c: &NetworkConfig) -> Option<SubnetPool<V6>> {
        c.ipv6
    }
    fn subnet(k: &SubnetKey) -> Option<Ipv6Net> {
        k.ipv6
    }
    fn peer(l: &Lease) -> Option<Peer<V6>> {
        l.v6()
    }
    fn public_ip(a: &LeaseAttrs) -> Option<Ipv6Addr> {
        a.public_ipv6
    }
    fn drop_side(a: &mut LeaseAttrs) {
        a.public_ipv6 = None;
    }
    fn implausible(ip: Ipv6Addr) -> Option<&'static str> {
        let first = ip.segments()[0];
        Some(if ip.is_unspecified() {
            "the unspecified address"
        } else if ip.is_loopback() {
            "the loopback address"
        } else if ip.is_multicast() {
            "a multicast address"
        } else if first & 0xffc0 == 0xfe80 {
            "a link-local address (it needs an interface, which a lease does not name)"
        } else if ip.to_ipv4_mapped().is_some() {
            "an IPv4-mapped address"
        } else {
            return None;
        })
    }
}

/// Checks one family's side of a lease against the config and our own lease.
fn check_side<F: LeaseFamily>(rules: &Rules, lease: &Lease) -> Option<Rejection> {
    let Peer {
        subnet,
        public_ip: ip,
        ..
    } = F::peer(lease)?;
    let pool = F::pool(rules.config)?;
    let net: IpNet = pool.network.into();
    if !net.contains(&subnet.into()) {
        let why = format!("{subnet} lies outside the {} {}", F::NETWORK_FIELD, pool.network);
        return Some(reject(Reason::OutsideNetwork, F::NETWORK_FIELD, why));
    }
    if F::net_len(&subnet) != pool.subnet_len {
        let why = format!("{subnet} is not a /{} subnet", pool.subnet_len);
        return Some(reject(Reason::SubnetLen, F::SUBNET_LEN_FIELD, why));
    }
    if F::subnet(&rules.own) == Some(subnet) {
        return Some(reject(
            Reason::Overlap,
            F::NETWORK_FIELD,
            format!("{subnet} is our own subnet"),
        ));
    }
    let field = F::PUBLIC_IP_FIELD;
    if let Some(what) = F::implausible(ip) {
        return Some(reject(Reason::PublicIp, field, format!("{ip} is {what}")));
    }
    if net.contains(&ip.into()) {
        let why = format!("{ip} lies inside the pod network {}", pool.network);
        return Some(reject(Reason::PublicIp, field, why));
    }
    if F::public_ip(rules.own_attrs) == Some(ip) {
        let why = format!("{ip} is our own {field} (a lease of ours under another key?)");
        return Some(reject(Reason::PublicIp, field, why));
    }
    None
}

/// Takes out a side of a lease that the config does not enable, or that fails its checks.
fn admit_side<F: LeaseFamily>(rules: &Rules, lease: &mut Lease, out: &mut Vec<Rejection>) {
    if F::pool(rules.config).is_none() {
        F::drop_side(&mut lease.attrs);
    } else if let Some(r) = check_side::<F>(rules, lease) {
        F::drop_side(&mut lease.attrs);
        out.push(r);
    }
}

/// The checks of one lease on its own (all but the overlap with other peers' leases): the lease
/// with the sides that failed taken out (`None` when no usable side is left) and why each failed.
pub fn check_peer(rules: &Rules, key: &str, mut lease: Lease) -> (Option<Lease>, Vec<Rejection>) {
    if canonical_key(rules.prefix, key) != Some(lease.key()) {
        let canonical = subnet_key(rules.prefix, lease.key());
        let why = format!("not the canonical spelling {canonical:?} of its subnets");
        return (None, vec![reject(Reason::Key, "key", why)]);
    }
    let mut out = Vec::new();
    admit_side::<V4>(rules, &mut lease, &mut out);
    admit_side::<V6>(rules, &mut lease, &mut out);
    let usable = lease.v4().is_some() || lease.v6().is_some();
    (usable.then_some(lease), out)
}

/// Which lease holds each subnet, per family: the lowest key among the leases that claim it.
#[derive(Debug, Default)]
pub struct Claims {
    v4: HashMap<Ipv4Net, BTreeSet<SubnetKey>>,
    v6: HashMap<Ipv6Net, BTreeSet<SubnetKey>>,
}

/// [`Claims`]' table of one family.
trait ClaimFamily: LeaseFamily {
    fn table(c: &mut Claims) -> &mut HashMap<Self::Net, BTreeSet<SubnetKey>>;
    fn table_ref(c: &Claims) -> &HashMap<Self::Net, BTreeSet<SubnetKey>>;
}

impl ClaimFamily for V4 {
    fn table(c: &mut Claims) -> &mut HashMap<Ipv4Net, BTreeSet<SubnetKey>> {
        &mut c.v4
    }
    fn table_ref(c: &Claims) -> &HashMap<Ipv4Net, BTreeSet<SubnetKey>> {
        &c.v4
    }
}

impl ClaimFamily for V6 {
    fn table(c: &mut Claims) -> &mut HashMap<Ipv6Net, BTreeSet<SubnetKey>> {
        &mut c.v6
    }
    fn table_ref(c: &Claims) -> &HashMap<Ipv6Net, BTreeSet<SubnetKey>> {
        &c.v6
    }
}

/// The subnet of a lease's usable side of family `F`.
fn side<F: LeaseFamily>(l: &Lease) -> Option<F::Net> {
    F::peer(l).map(|p| p.subnet)
}

impl Claims {
    /// `lease` (its usable sides) claims its subnets.
    pub fn insert(&mut self, lease: &Lease) {
        self.claim::<V4>(lease);
        self.claim::<V6>(lease);
    }

    fn claim<F: ClaimFamily>(&mut self, lease: &Lease) {
        if let Some(sn) = side::<F>(lease) {
            F::table(self).entry(sn).or_default().insert(lease.key());
        }
    }

    /// `lease` no longer claims its subnets.
    pub fn remove(&mut self, lease: &Lease) {
        self.unclaim::<V4>(lease);
        self.unclaim::<V6>(lease);
    }

    fn unclaim<F: ClaimFamily>(&mut self, lease: &Lease) {
        let Some(sn) = side::<F>(lease) else { return };
        let t = F::table(self);
        if let Some(keys) = t.get_mut(&sn) {
            keys.remove(&lease.key());
            if keys.is_empty() {
                t.remove(&sn);
            }
        }
    }

    /// Every key that claims one of `lease`'s subnets (`lease`'s own included).
    pub fn rivals(&self, lease: &Lease) -> BTreeSet<SubnetKey> {
        let mut out = self.rivals_in::<V4>(lease);
        out.extend(self.rivals_in::<V6>(lease));
        out
    }

    fn rivals_in<F: ClaimFamily>(&self, lease: &Lease) -> BTreeSet<SubnetKey> {
        side::<F>(lease)
            .and_then(|sn| F::table_ref(self).get(&sn).cloned())
            .unwrap_or_default()
    }

    /// `lease` with the sides a lower key holds taken out (`None` when none is left), and the
    /// rejections that says.
    pub fn winning(&self, lease: &Lease) -> (Option<Lease>, Vec<Rejection>) {
        let mut out = lease.clone();
        let mut why = Vec::new();
        self.lose::<V4>(&mut out, &mut why);
        self.lose::<V6>(&mut out, &mut why);
        let usable = out.v4().is_some() || out.v6().is_some();
        (usable.then_some(out), why)
    }

    fn lose<F: ClaimFamily>(&self, lease: &mut Lease, why: &mut Vec<Rejection>) {
        let Some(sn) = side::<F>(lease) else { return };
        let first = F::table_ref(self).get(&sn).and_then(|k| k.first());
        if let Some(winner) = first.filter(|k| **k != lease.key()) {
            F::drop_side(&mut lease.attrs);
            let why_ = format!(
                "{sn} is held by the lease {winner} (of two leases for one subnet the lower key wins)"
            );
            why.push(reject(Reason::Overlap, F::NETWORK_FIELD, why_));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::control::{backend::BackendKind, lease::parse_lease};

    const PREFIX: &str = "/coreos.com/network";
    const DUAL: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;

    fn value(ip: &str, ip6: Option<&str>) -> String {
        let ip6 = ip6.map_or("null".to_string(), |a| format!("{a:?}"));
        format!(
            r#"{{"PublicIP":"{ip}","PublicIPv6":{ip6},"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0e:00:00:00:00:02"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"0e:00:00:00:01:02"}}}}"#
        )
    }

    /// A node's side of the checks: its config, lease and public addresses.
    pub(crate) struct Fixture {
        config: NetworkConfig,
        own_attrs: LeaseAttrs,
        own: SubnetKey,
    }

    impl Fixture {
        fn new(config: &str) -> Self {
            let attrs = LeaseAttrs::vxlan_dual(
                Some("198.18.0.11".parse().unwrap()),
                Some("fd00:198:18::11".parse().unwrap()),
                1,
                [0x0e, 0, 0, 0, 0, 0x11],
            );
            Self::with_own(config, "10.244.1.0-24&fd00:10:244:1::-64", attrs)
        }

        /// A node with `config` holding the lease `own` (a key's last element) with `attrs`.
        pub(crate) fn with_own(config: &str, own: &str, own_attrs: LeaseAttrs) -> Self {
            Fixture {
                config: NetworkConfig::parse(config).unwrap(),
                own_attrs,
                own: parse_subnet_key(own).unwrap(),
            }
        }

        pub(crate) fn rules(&self) -> Rules<'_> {
            Rules {
                prefix: PREFIX,
                config: &self.config,
                own: self.own,
                own_attrs: &self.own_attrs,
            }
        }

        /// (IPv4 side programmed, IPv6 side programmed, rejection reasons) for a lease.
        fn check(&self, key: &str, value: &str) -> (bool, bool, Vec<Reason>) {
            let key = format!("{PREFIX}/subnets/{key}");
            let lease = parse_lease(&key, value.as_bytes(), BackendKind::Vxlan).unwrap();
            let (l, why) = check_peer(&self.rules(), &key, lease);
            let reasons = why.iter().map(|r| r.reason).collect();
            match l {
                Some(l) => (l.v4().is_some(), l.v6().is_some(), reasons),
                None => (false, false, reasons),
            }
        }
    }

    /// `/metrics` exports every reason from the start without seeing this type: its list must be ours.
    #[test]
    fn the_metrics_reasons_are_the_reasons() {
        assert_eq!(
            Reason::ALL.map(Reason::label),
            crate::metrics::LEASE_REJECT_REASONS
        );
    }

    #[test]
    fn the_rules_of_a_peer_lease() {
        let fx = Fixture::new(DUAL);
        let v4 = value("198.18.0.12", None);
        let dual = value("198.18.0.12", Some("fd00:198:18::12"));
        use Reason::*;
        // flannel's own spellings pass, in both families.
        assert_eq!(fx.check("10.244.7.0-24", &v4), (true, false, vec![]));
        assert_eq!(
            fx.check("10.244.7.0-24&fd00:10:244:7::-64", &dual),
            (true, true, vec![])
        );
        let v6only = value("0.0.0.0", Some("fd00:198:18::12"));
        assert_eq!(
            fx.check("0.0.0.0-0&fd00:10:244:7::-64", &v6only),
            (false, true, vec![])
        );
        for (key, reasons) in [
            ("0.0.0.0-1", vec![OutsideNetwork]),
            ("128.0.0.0-1", vec![OutsideNetwork]),
            ("10.245.7.0-24", vec![OutsideNetwork]),
            ("10.244.0.0-16", vec![SubnetLen]),
            ("10.244.7.0-25", vec![SubnetLen]),
            ("10.244.7.0-024", vec![Key]),
            ("10.244.1.0-24", vec![Overlap]),
        ] {
            assert_eq!(fx.check(key, &v4), (false, false, reasons.clone()), "{key}");
        }
        // Keys that parse to a real peer's subnets but are spelt otherwise alias its key.
        for key in [
            "junk/10.244.7.0-24",
            "10.244.7.0-24&fd00:10:244:7:0:0:0:0-64",
            "10.244.7.0-24&fd00:010:244:7::-64",
            "10.244.7.0-24&fd00:10:244:7::-064",
        ] {
            assert_eq!(fx.check(key, &dual).2, vec![Key], "{key}");
        }
        // One family's side fails, the other is programmed.
        assert_eq!(
            fx.check("10.244.7.0-24&fd00:10:245:7::-64", &dual),
            (true, false, vec![OutsideNetwork])
        );
        assert_eq!(
            fx.check("10.244.1.0-24&fd00:10:244:7::-64", &dual),
            (false, true, vec![Overlap])
        );
        // Public addresses that cannot be another node's underlay address.
        for ip in [
            "255.255.255.255",
            "0.1.2.3",
            "127.0.0.1",
            "169.254.1.1",
            "224.0.0.5",
            "240.0.0.1",
            "10.244.9.1",
            "198.18.0.11",
        ] {
            assert_eq!(
                fx.check("10.244.7.0-24", &value(ip, None)),
                (false, false, vec![PublicIp]),
                "{ip}"
            );
        }
        for ip6 in [
            "::",
            "::1",
            "ff02::1",
            "fe80::1",
            "::ffff:198.18.0.12",
            "fd00:10:244:9::1",
            "fd00:198:18::11",
        ] {
            assert_eq!(
                fx.check(
                    "10.244.7.0-24&fd00:10:244:7::-64",
                    &value("198.18.0.12", Some(ip6))
                ),
                (true, false, vec![PublicIp]),
                "{ip6}"
            );
        }
        // An IPv4-only config ignores the IPv6 side (as flanneld does), without a rejection.
        let v4_cfg = Fixture::new(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#);
        assert_eq!(
            v4_cfg.check("10.244.7.0-24&fd00:10:245:7::-64", &dual),
            (true, false, vec![])
        );
        assert_eq!(
            v4_cfg.check("0.0.0.0-0&fd00:10:244:7::-64", &v6only),
            (false, false, vec![])
        );
    }

    /// Go's `net.IP.String()` and Rust's `Ipv6Addr` display agree on the spellings flannel
    /// writes (RFC 5952: the longest run of two or more zero groups compressed, the first of
    /// equal runs, lower case), so the canonical key is flannel's.
    #[test]
    fn canonical_ipv6_text_is_gos() {
        for (addr, go) in [
            ("fd00:10:244:7:0:0:0:0", "fd00:10:244:7::"),
            ("fd00:0:1:2:3:4:5:6", "fd00:0:1:2:3:4:5:6"),
            ("fd00:0:0:1:0:0:0:0", "fd00:0:0:1::"),
            ("fd00:0:0:1:0:0:1:0", "fd00::1:0:0:1:0"),
            ("FD00:10:244:7::", "fd00:10:244:7::"),
        ] {
            assert_eq!(addr.parse::<Ipv6Addr>().unwrap().to_string(), go, "{addr}");
        }
        let k = format!("{PREFIX}/subnets/10.244.7.0-24&fd00:10:244:7::-64");
        assert_eq!(canonical_key(PREFIX, &k), parse_subnet_key(&k).ok());
        assert_eq!(canonical_key("/other/prefix", &k), None);
    }

    #[test]
    fn the_lower_key_holds_a_subnet() {
        let cfg = DUAL;
        let fx = Fixture::new(cfg);
        let lease = |k: &str, v: &str| {
            let key = format!("{PREFIX}/subnets/{k}");
            check_peer(
                &fx.rules(),
                &key,
                parse_lease(&key, v.as_bytes(), BackendKind::Vxlan).unwrap(),
            )
            .0
            .unwrap()
        };
        let dual = lease(
            "10.244.7.0-24&fd00:10:244:7::-64",
            &value("198.18.0.12", Some("fd00:198:18::12")),
        );
        let v4 = lease("10.244.7.0-24", &value("198.18.0.13", None));
        let other6 = lease(
            "10.244.8.0-24&fd00:10:244:7::-64",
            &value("198.18.0.14", Some("fd00:198:18::14")),
        );
        let mut c = Claims::default();
        for l in [&dual, &v4, &other6] {
            c.insert(l);
        }
        // 10.244.7.0-24 < 10.244.7.0-24&… < 10.244.8.0-24&…
        let (w, why) = c.winning(&v4);
        assert!(w.unwrap().v4().is_some() && why.is_empty());
        let (w, why) = c.winning(&dual);
        let w = w.unwrap();
        assert!(w.v4().is_none() && w.v6().is_some(), "{w:?}");
        assert_eq!(why.len(), 1);
        assert!(why[0].why.contains("10.244.7.0-24"), "{}", why[0]);
        let (w, why) = c.winning(&other6);
        let w = w.unwrap();
        assert!(w.v4().is_some() && w.v6().is_none(), "{w:?} {why:?}");
        assert_eq!(
            c.rivals(&dual),
            [v4.key(), dual.key(), other6.key()].into_iter().collect()
        );
        // The holder goes: the next key takes the subnet.
        c.remove(&v4);
        let (w, why) = c.winning(&dual);
        assert!(w.unwrap().v4().is_some() && why.is_empty());
    }
}
