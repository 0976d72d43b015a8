//! Flannel's lease model: a subnet, the attributes its owner published, and when it expires.
//!
//! The JSON written to etcd is flannel's `LeaseAttrs` byte for byte (field names, order,
//! `"PublicIPv6":null`, `BackendV6Data`), and keys are flannel's (`10.244.7.0-24`,
//! `10.244.7.0-24&fd00:10:244:7::-64`, `0.0.0.0-0&fd00:10:244:7::-64`), so flanneld nodes
//! (IPv4, dual-stack, IPv6-only) and this agent can share one etcd prefix.

use std::{
    collections::HashMap,
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::family::{Family, V4, V6};

/// The only backend this agent speaks.
pub const BACKEND_VXLAN: &str = "vxlan";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    #[error("subnet key {key:?} is not of the form <prefix>/subnets/A.B.C.D-LEN[&IPV6-LEN] (e.g. 10.244.7.0-24, 10.244.7.0-24&fd00:10:244:7::-64)")]
    BadKey { key: String },
    #[error("lease value at {key:?} is not flannel LeaseAttrs JSON: {reason}")]
    BadValue { key: String, reason: String },
    #[error("lease at {key:?} has BackendType {backend_type:?}, not \"vxlan\"")]
    NotVxlan { key: String, backend_type: String },
}

/// A MAC address, serialized the way Go's `net.HardwareAddr` is: `"0e:5c:2a:11:90:3f"`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut mac = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for b in &mut mac {
            let p = parts.next().ok_or_else(|| format!("not a MAC address: {s:?}"))?;
            if p.len() != 2 {
                return Err(format!("not a MAC address: {s:?}"));
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| format!("not a MAC address: {s:?}"))?;
        }
        if parts.next().is_some() {
            return Err(format!("not a MAC address: {s:?}"));
        }
        Ok(MacAddr(mac))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// flannel's `vxlanLeaseAttrs`: `{"VNI":1,"VtepMAC":"0e:5c:2a:11:90:3f"}`, the shape of both
/// `BackendData` (IPv4) and `BackendV6Data` (IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanBackendData {
    #[serde(rename = "VNI", default)]
    pub vni: u32,
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: MacAddr,
}

fn unspecified() -> Ipv4Addr {
    Ipv4Addr::UNSPECIFIED
}

/// flannel's `lease.LeaseAttrs` (pkg/lease), restricted to what a vxlan node publishes.
///
/// Field order and encoding are flanneld's: `PublicIP` always (`"0.0.0.0"` on an IPv6-only
/// node), `PublicIPv6` always (`null` without IPv6), then `BackendType`, `BackendData` and
/// `BackendV6Data` when set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP", default = "unspecified")]
    pub public_ip: Ipv4Addr,
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<Ipv6Addr>,
    #[serde(rename = "BackendType", default, skip_serializing_if = "String::is_empty")]
    pub backend_type: String,
    /// The IPv4 VTEP (flanneld's `flannel.<VNI>`).
    #[serde(rename = "BackendData", default, skip_serializing_if = "Option::is_none")]
    pub backend_data: Option<VxlanBackendData>,
    /// The IPv6 VTEP (flanneld's `flannel-v6.<VNI>`), reached over `PublicIPv6`.
    #[serde(rename = "BackendV6Data", default, skip_serializing_if = "Option::is_none")]
    pub backend_v6_data: Option<VxlanBackendData>,
}

impl LeaseAttrs {
    /// The attributes an IPv4-only node publishes.
    pub fn vxlan(public_ip: Ipv4Addr, vni: u32, vtep_mac: [u8; 6]) -> Self {
        Self::vxlan_dual(Some(public_ip), None, vni, vtep_mac)
    }

    /// The attributes a node publishes for the families it has a public address in, as
    /// flanneld's vxlan `newSubnetAttrs` builds them (the same VNI for both families).
    pub fn vxlan_dual(
        public_ip: Option<Ipv4Addr>,
        public_ipv6: Option<Ipv6Addr>,
        vni: u32,
        vtep_mac: [u8; 6],
    ) -> Self {
        let data = VxlanBackendData {
            vni,
            vtep_mac: MacAddr(vtep_mac),
        };
        LeaseAttrs {
            public_ip: public_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            public_ipv6,
            backend_type: BACKEND_VXLAN.to_string(),
            backend_data: public_ip.map(|_| data),
            backend_v6_data: public_ipv6.map(|_| data),
        }
    }

    /// `PublicIP`, unless it is flanneld's "none" (`0.0.0.0`, an IPv6-only node).
    pub fn public_ipv4(&self) -> Option<Ipv4Addr> {
        Some(self.public_ip).filter(|ip| !ip.is_unspecified())
    }

    /// flannel's exact JSON encoding.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("LeaseAttrs always serializes")
    }
}

/// The subnets one lease key names: an IPv4 subnet, an IPv6 subnet, or both (flannel's
/// `MakeSubnetKey`/`ParseSubnetKey`). Written as `10.244.7.0-24`, `10.244.7.0-24&fd00:10:244:7::-64`
/// or, for an IPv6-only lease, `0.0.0.0-0&fd00:10:244:7::-64`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubnetKey {
    pub ipv4: Option<Ipv4Net>,
    pub ipv6: Option<Ipv6Net>,
}

impl From<Ipv4Net> for SubnetKey {
    fn from(sn: Ipv4Net) -> Self {
        SubnetKey {
            ipv4: Some(sn),
            ipv6: None,
        }
    }
}

impl fmt::Display for SubnetKey {
    /// The last element of the etcd key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ipv4 {
            Some(sn) => write!(f, "{}-{}", sn.network(), sn.prefix_len())?,
            // flannel's empty IP4Net.
            None => f.write_str("0.0.0.0-0")?,
        }
        if let Some(sn) = self.ipv6 {
            write!(f, "&{}-{}", sn.network(), sn.prefix_len())?;
        }
        Ok(())
    }
}

/// One family of a vxlan lease, as the datapath needs it: the subnet, where its owner is
/// reached, and its VTEP (VNI, MAC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanPeer<F: Family> {
    pub subnet: F::Net,
    pub public_ip: F::Addr,
    pub vni: u32,
    pub vtep_mac: MacAddr,
}

/// One subnet lease, ours or a peer's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The IPv4 subnet (`None` on an IPv6-only lease).
    pub subnet: Option<Ipv4Net>,
    /// The IPv6 subnet (`None` unless the lease is dual-stack or IPv6-only).
    pub ipv6_subnet: Option<Ipv6Net>,
    pub attrs: LeaseAttrs,
    /// When the etcd lease runs out; `None` for a reservation (a key with no etcd lease)
    /// and for peers' leases, whose expiry is not ours to track.
    pub expiration: Option<tokio::time::Instant>,
}

impl Lease {
    /// The subnets this lease holds (its etcd key).
    pub fn key(&self) -> SubnetKey {
        SubnetKey {
            ipv4: self.subnet,
            ipv6: self.ipv6_subnet,
        }
    }

    fn is_vxlan(&self) -> bool {
        self.attrs.backend_type == BACKEND_VXLAN
    }

    /// The peer's IPv4 VXLAN data; `None` unless this is a vxlan lease with BackendData.
    pub fn vxlan(&self) -> Option<VxlanBackendData> {
        self.attrs.backend_data.filter(|_| self.is_vxlan())
    }

    /// The IPv4 side: subnet, PublicIP and BackendData, when the lease has all three.
    pub fn v4(&self) -> Option<VxlanPeer<V4>> {
        let d = self.vxlan()?;
        Some(VxlanPeer {
            subnet: self.subnet?,
            public_ip: self.attrs.public_ipv4()?,
            vni: d.vni,
            vtep_mac: d.vtep_mac,
        })
    }

    /// The IPv6 side: IPv6 subnet, PublicIPv6 and BackendV6Data, when the lease has all three.
    pub fn v6(&self) -> Option<VxlanPeer<V6>> {
        let d = self.attrs.backend_v6_data.filter(|_| self.is_vxlan())?;
        Some(VxlanPeer {
            subnet: self.ipv6_subnet?,
            public_ip: self.attrs.public_ipv6?,
            vni: d.vni,
            vtep_mac: d.vtep_mac,
        })
    }

    /// `PublicIP` for logs: the IPv4 one, else the IPv6 one.
    pub fn public_addr(&self) -> String {
        match (self.attrs.public_ipv4(), self.attrs.public_ipv6) {
            (Some(ip), _) => ip.to_string(),
            (None, Some(ip)) => ip.to_string(),
            (None, None) => "none".into(),
        }
    }
}

/// `<prefix>/subnets/10.244.7.0-24` (or `…-24&fd00:10:244:7::-64`) for a lease's subnets.
pub fn subnet_key(prefix: &str, key: impl Into<SubnetKey>) -> String {
    format!("{}/subnets/{}", prefix.trim_end_matches('/'), key.into())
}

/// One `ADDR-LEN` part of a key: the address must be the network address of the subnet.
fn parse_part<F: Family>(part: &str, max_len: u8) -> Option<(F::Addr, u8)> {
    let (addr, len) = part.split_once('-')?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: u8 = len.parse().ok().filter(|l| *l <= max_len)?;
    let addr: F::Addr = addr.parse().ok()?;
    (F::net_addr(&F::net(addr, len)) == addr).then_some((addr, len))
}

/// Parses the last path element of a subnet key (`10.244.7.0-24`,
/// `10.244.7.0-24&fd00:10:244:7::-64`, `0.0.0.0-0&fd00:10:244:7::-64`), as flannel's
/// `ParseSubnetKey` (`(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$`), and stricter: each
/// address must be the network address of its subnet, and a key names at least one subnet.
pub fn parse_subnet_key(key: &str) -> Result<SubnetKey, LeaseError> {
    let bad = || LeaseError::BadKey { key: key.to_string() };
    let last = key.rsplit('/').next().unwrap_or(key);
    let (v4, v6) = match last.split_once('&') {
        Some((v4, v6)) => (v4, Some(v6)),
        None => (last, None),
    };
    let (a4, l4) = parse_part::<V4>(v4, 32).ok_or_else(bad)?;
    let ipv4 = (l4 != 0 || !a4.is_unspecified()).then(|| V4::net(a4, l4));
    let ipv6 = match v6 {
        None => None,
        Some(p) => {
            // flannel's pattern: lowercase hex digits and colons only.
            let addr = p.split_once('-').map_or("", |(a, _)| a);
            if addr.is_empty()
                || !addr
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b':')
            {
                return Err(bad());
            }
            let (a6, l6) = parse_part::<V6>(p, 128).ok_or_else(bad)?;
            Some(V6::net(a6, l6))
        }
    };
    if ipv4.is_none() && ipv6.is_none() {
        return Err(bad());
    }
    Ok(SubnetKey { ipv4, ipv6 })
}

/// Parses a lease value; only vxlan leases that are usable in at least one family (a subnet,
/// its public address and its backend data) are accepted.
pub fn parse_vxlan_lease(key: &str, value: &[u8]) -> Result<Lease, LeaseError> {
    let subnets = parse_subnet_key(key)?;
    // Look at BackendType first so a foreign backend's data shape is never an error.
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "BackendType", default)]
        backend_type: String,
    }
    let probe: Probe = serde_json::from_slice(value).map_err(|e| LeaseError::BadValue {
        key: key.to_string(),
        reason: e.to_string(),
    })?;
    if probe.backend_type != BACKEND_VXLAN {
        return Err(LeaseError::NotVxlan {
            key: key.to_string(),
            backend_type: probe.backend_type,
        });
    }
    let attrs: LeaseAttrs = serde_json::from_slice(value).map_err(|e| LeaseError::BadValue {
        key: key.to_string(),
        reason: e.to_string(),
    })?;
    let lease = Lease {
        subnet: subnets.ipv4,
        ipv6_subnet: subnets.ipv6,
        attrs,
        expiration: None,
    };
    if lease.v4().is_none() && lease.v6().is_none() {
        let reason = match (lease.subnet.is_some(), lease.ipv6_subnet.is_some()) {
            (true, false) => "vxlan lease without BackendData (VNI, VtepMAC) or PublicIP",
            (false, true) => "IPv6-only vxlan lease without BackendV6Data (VNI, VtepMAC) or PublicIPv6",
            _ => {
                "dual-stack vxlan lease usable in neither family: it needs PublicIP with BackendData, \
                  or PublicIPv6 with BackendV6Data"
            }
        };
        return Err(LeaseError::BadValue {
            key: key.to_string(),
            reason: reason.into(),
        });
    }
    Ok(lease)
}

/// What the dataplane must do to go from `old` to `new` peer sets.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PeerDiff {
    pub upsert: Vec<Lease>,
    pub remove: Vec<Lease>,
}

/// Pure diff between two peer sets keyed by their subnets; unchanged leases produce nothing.
pub fn diff_peers(old: &HashMap<SubnetKey, Lease>, new: &HashMap<SubnetKey, Lease>) -> PeerDiff {
    let mut d = PeerDiff::default();
    for (k, l) in new {
        if old.get(k).map(|o| &o.attrs) != Some(&l.attrs) {
            d.upsert.push(l.clone());
        }
    }
    for (k, l) in old {
        if !new.contains_key(k) {
            d.remove.push(l.clone());
        }
    }
    d.upsert.sort_by_key(Lease::key);
    d.remove.sort_by_key(Lease::key);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value flannel documents for a vxlan node.
    const FLANNEL_EXAMPLE: &str = r#"{"PublicIP":"198.18.0.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:5c:2a:11:90:3f"}}"#;

    #[test]
    fn flannel_json_round_trips_byte_identical() {
        let l = parse_vxlan_lease(
            "/coreos.com/network/subnets/10.244.7.0-24",
            FLANNEL_EXAMPLE.as_bytes(),
        )
        .unwrap();
        assert_eq!(l.subnet, Some("10.244.7.0/24".parse::<Ipv4Net>().unwrap()));
        assert_eq!(l.ipv6_subnet, None);
        assert_eq!(l.v6(), None);
        assert_eq!(l.attrs.public_ip, Ipv4Addr::new(198, 18, 0, 11));
        assert_eq!(
            l.vxlan(),
            Some(VxlanBackendData {
                vni: 1,
                vtep_mac: MacAddr([0x0e, 0x5c, 0x2a, 0x11, 0x90, 0x3f])
            })
        );
        assert_eq!(l.attrs.to_json(), FLANNEL_EXAMPLE);
        let ours = LeaseAttrs::vxlan(
            Ipv4Addr::new(198, 18, 0, 11),
            1,
            [0x0e, 0x5c, 0x2a, 0x11, 0x90, 0x3f],
        );
        assert_eq!(ours.to_json(), FLANNEL_EXAMPLE);
    }

    #[test]
    fn subnet_keys() {
        let sk = |v4: Option<&str>, v6: Option<&str>| SubnetKey {
            ipv4: v4.map(|s| s.parse().unwrap()),
            ipv6: v6.map(|s| s.parse().unwrap()),
        };
        let ok = [
            (
                "/coreos.com/network/subnets/10.244.7.0-24",
                sk(Some("10.244.7.0/24"), None),
            ),
            ("10.244.7.0-24", sk(Some("10.244.7.0/24"), None)),
            ("/x/subnets/10.0.0.0-8", sk(Some("10.0.0.0/8"), None)),
            ("/x/subnets/10.244.7.128-25", sk(Some("10.244.7.128/25"), None)),
            // flannel's own test keys (pkg/subnet/subnet_test.go, pkg/subnet/etcd/fuzz_test.go).
            ("10.12.13.0-24", sk(Some("10.12.13.0/24"), None)),
            (
                "10.12.13.0-24&fd00:12:13::-56",
                sk(Some("10.12.13.0/24"), Some("fd00:12:13::/56")),
            ),
            (
                "/coreos.com/network/subnets/10.5.1.0-24&fc00::-64",
                sk(Some("10.5.1.0/24"), Some("fc00::/64")),
            ),
            // An IPv6-only lease: flanneld's empty IPv4 subnet.
            (
                "/x/subnets/0.0.0.0-0&fd00:10:244:7::-64",
                sk(None, Some("fd00:10:244:7::/64")),
            ),
        ];
        for (k, want) in ok {
            assert_eq!(parse_subnet_key(k), Ok(want), "key {k}");
            // And written back exactly as flannel's MakeSubnetKey writes it.
            assert_eq!(want.to_string(), k.rsplit('/').next().unwrap(), "key {k}");
        }
        let bad = [
            "/x/subnets/10.244.7.1-24", // not the network address
            "/x/subnets/10.244.7.0",
            "/x/subnets/10.244.7.0-",
            "/x/subnets/10.244.7.0-33",
            "/x/subnets/10.244.7.0-+4",
            "/x/subnets/10.244.7-24",
            "/x/subnets/fd00::-64",
            "/x/subnets/garbage",
            "/x/subnets/0.0.0.0-0",                // names no subnet
            "/x/subnets/10.244.7.0-24&fd00::1-64", // not the network address
            "/x/subnets/10.244.7.0-24&FD00::-64",  // flannel's pattern is lowercase
            "/x/subnets/10.244.7.0-24&fd00::-129",
            "/x/subnets/10.244.7.0-24&::ffff:10.0.0.0-104",
            // flannel's own invalid keys (pkg/subnet/subnet_test.go TestSubnetNodeInvalid).
            "10",
            "10.12.13.0",
            "10.12.13-24",
            "10.12.13.300-24",
            "10.12.13.0-24hi",
            "&2001::-56",
            "10.12.13.0-24&:12:13:-56",
            "10.12.13.0-24&20011::-56",
            "10.12.13.0-24&2001-56",
            "10.12.13.0-24&2001::",
            "10.12.13.0-24&2001::-56hi",
        ];
        for k in bad {
            assert_eq!(
                parse_subnet_key(k),
                Err(LeaseError::BadKey { key: k.into() }),
                "key {k}"
            );
        }
        let sn: Ipv4Net = "10.244.7.0/24".parse().unwrap();
        assert_eq!(
            subnet_key("/coreos.com/network/", sn),
            "/coreos.com/network/subnets/10.244.7.0-24"
        );
        assert_eq!(parse_subnet_key(&subnet_key("/p", sn)), Ok(sn.into()));
        let dual = sk(Some("10.244.7.0/24"), Some("fd00:10:244:7::/64"));
        assert_eq!(
            subnet_key("/coreos.com/network", dual),
            "/coreos.com/network/subnets/10.244.7.0-24&fd00:10:244:7::-64"
        );
    }

    /// Dual-stack and IPv6-only values as flanneld's vxlan backend writes them (`newSubnetAttrs`
    /// + `json.Marshal(LeaseAttrs)`), compared field by field and byte for byte.
    #[test]
    fn dual_stack_and_ipv6_only_json_as_flanneld_writes_it() {
        const DUAL: &str = r#"{"PublicIP":"198.18.0.11","PublicIPv6":"fd00:198:18::11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:5c:2a:11:90:3f"},"BackendV6Data":{"VNI":1,"VtepMAC":"6a:01:77:c3:0d:10"}}"#;
        const V6_ONLY: &str = r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::12","BackendType":"vxlan","BackendV6Data":{"VNI":4096,"VtepMAC":"6a:01:77:c3:0d:12"}}"#;
        let l = parse_vxlan_lease(
            "/coreos.com/network/subnets/10.244.7.0-24&fd00:10:244:7::-64",
            DUAL.as_bytes(),
        )
        .unwrap();
        let a = &l.attrs;
        assert_eq!(a.public_ip, Ipv4Addr::new(198, 18, 0, 11));
        assert_eq!(a.public_ipv6, Some("fd00:198:18::11".parse().unwrap()));
        assert_eq!(a.backend_type, "vxlan");
        assert_eq!(
            a.backend_data,
            Some(VxlanBackendData {
                vni: 1,
                vtep_mac: "0e:5c:2a:11:90:3f".parse().unwrap()
            })
        );
        assert_eq!(
            a.backend_v6_data,
            Some(VxlanBackendData {
                vni: 1,
                vtep_mac: "6a:01:77:c3:0d:10".parse().unwrap()
            })
        );
        assert_eq!(a.to_json(), DUAL);
        let v4 = l.v4().unwrap();
        assert_eq!(
            (v4.subnet.to_string(), v4.public_ip.to_string()),
            ("10.244.7.0/24".into(), "198.18.0.11".into())
        );
        let v6 = l.v6().unwrap();
        assert_eq!(
            (
                v6.subnet.to_string(),
                v6.public_ip.to_string(),
                v6.vni,
                v6.vtep_mac.to_string()
            ),
            (
                "fd00:10:244:7::/64".into(),
                "fd00:198:18::11".into(),
                1,
                "6a:01:77:c3:0d:10".into()
            )
        );

        let l = parse_vxlan_lease(
            "/coreos.com/network/subnets/0.0.0.0-0&fd00:10:244:8::-64",
            V6_ONLY.as_bytes(),
        )
        .unwrap();
        assert_eq!((l.subnet, l.v4()), (None, None));
        assert_eq!(l.attrs.public_ipv4(), None);
        assert_eq!(l.attrs.backend_data, None);
        assert_eq!(l.v6().unwrap().vni, 4096);
        assert_eq!(l.attrs.to_json(), V6_ONLY);

        // What we write ourselves, for each stack.
        let mac = [0x0e, 0x5c, 0x2a, 0x11, 0x90, 0x3f];
        assert_eq!(
            LeaseAttrs::vxlan_dual(
                Some(Ipv4Addr::new(198, 18, 0, 11)),
                Some("fd00:198:18::11".parse().unwrap()),
                1,
                mac
            )
            .to_json(),
            r#"{"PublicIP":"198.18.0.11","PublicIPv6":"fd00:198:18::11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:5c:2a:11:90:3f"},"BackendV6Data":{"VNI":1,"VtepMAC":"0e:5c:2a:11:90:3f"}}"#
        );
        assert_eq!(
            LeaseAttrs::vxlan_dual(None, Some("fd00:198:18::12".parse().unwrap()), 4096, mac).to_json(),
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::12","BackendType":"vxlan","BackendV6Data":{"VNI":4096,"VtepMAC":"0e:5c:2a:11:90:3f"}}"#
        );
        assert_eq!(
            LeaseAttrs::vxlan_dual(Some(Ipv4Addr::new(198, 18, 0, 11)), None, 1, mac),
            LeaseAttrs::vxlan(Ipv4Addr::new(198, 18, 0, 11), 1, mac)
        );
        // flannel's fuzz seed (no BackendType) is not a vxlan lease.
        assert!(matches!(
            parse_vxlan_lease(
                "10.5.1.0-24&fc00::-64",
                br#"{"PublicIP":"192.168.0.1","PublicIPv6":"fc00::1"}"#
            ),
            Err(LeaseError::NotVxlan { .. })
        ));
    }

    #[test]
    fn foreign_and_malformed_values() {
        let k = "/p/subnets/10.1.2.0-24";
        assert!(matches!(
            parse_vxlan_lease(k, br#"{"PublicIP":"1.2.3.4","BackendType":"host-gw"}"#),
            Err(LeaseError::NotVxlan { backend_type, .. }) if backend_type == "host-gw"
        ));
        assert!(matches!(
            parse_vxlan_lease(k, b"{not json"),
            Err(LeaseError::BadValue { .. })
        ));
        assert!(matches!(
            parse_vxlan_lease(k, br#"{"PublicIP":"1.2.3.4","BackendType":"vxlan"}"#),
            Err(LeaseError::BadValue { .. })
        ));
        assert!(matches!(
            parse_vxlan_lease(
                k,
                br#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz"}}"#
            ),
            Err(LeaseError::BadValue { .. })
        ));
        // IPv6 data that does not parse, or a family without its data or public address.
        let k6 = "/p/subnets/10.1.2.0-24&fd00:1:2::-64";
        for v in [
            r#"{"PublicIP":"1.2.3.4","PublicIPv6":"fd00::1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"},"BackendV6Data":{"VNI":1,"VtepMAC":"zz"}}"#,
            r#"{"PublicIP":"1.2.3.4","PublicIPv6":"not-v6","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}}"#,
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00::1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}}"#,
        ] {
            assert!(
                matches!(
                    parse_vxlan_lease(k6, v.as_bytes()),
                    Err(LeaseError::BadValue { .. })
                ),
                "{v}"
            );
        }
        assert!(matches!(
            parse_vxlan_lease(
                "/p/subnets/0.0.0.0-0&fd00:1:2::-64",
                br#"{"PublicIP":"0.0.0.0","PublicIPv6":null,"BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}}"#
            ),
            Err(LeaseError::BadValue { .. })
        ));
        // A dual-stack key whose value carries only the IPv4 side is usable in IPv4.
        let l = parse_vxlan_lease(
            k6,
            br#"{"PublicIP":"1.2.3.4","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}}"#,
        )
        .unwrap();
        assert!(l.v4().is_some() && l.v6().is_none());
    }

    #[test]
    fn diff() {
        let mk = |sn: &str, ip: u8| Lease {
            subnet: Some(sn.parse().unwrap()),
            ipv6_subnet: None,
            attrs: LeaseAttrs::vxlan(Ipv4Addr::new(198, 18, 0, ip), 1, [2, 0, 0, 0, 0, ip]),
            expiration: None,
        };
        let old: HashMap<_, _> = [mk("10.0.1.0/24", 1), mk("10.0.2.0/24", 2)]
            .into_iter()
            .map(|l| (l.key(), l))
            .collect();
        let new: HashMap<_, _> = [mk("10.0.2.0/24", 2), mk("10.0.3.0/24", 3)]
            .into_iter()
            .map(|l| (l.key(), l))
            .collect();
        let d = diff_peers(&old, &new);
        assert_eq!(d.upsert, vec![mk("10.0.3.0/24", 3)]);
        assert_eq!(d.remove, vec![mk("10.0.1.0/24", 1)]);
    }
}
