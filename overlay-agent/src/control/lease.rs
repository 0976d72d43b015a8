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

use super::backend::BackendKind;
use crate::family::{Family, V4, V6};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    #[error("subnet key {key:?} is not of the form <prefix>/subnets/A.B.C.D-LEN[&IPV6-LEN] (e.g. 10.244.7.0-24, 10.244.7.0-24&fd00:10:244:7::-64)")]
    BadKey { key: String },
    #[error("lease value at {key:?} is not flannel LeaseAttrs JSON: {reason}")]
    BadValue { key: String, reason: String },
    #[error("lease at {key:?} has BackendType {backend_type:?}, not {ours:?}")]
    OtherBackend {
        key: String,
        backend_type: String,
        ours: &'static str,
    },
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

/// flannel's `lease.LeaseAttrs` (pkg/lease), restricted to what a vxlan or host-gw node
/// publishes (host-gw: no backend data).
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
            backend_type: BackendKind::Vxlan.name().to_string(),
            backend_data: public_ip.map(|_| data),
            backend_v6_data: public_ipv6.map(|_| data),
        }
    }

    /// The attributes a host-gw node publishes, as flanneld's host-gw `RegisterNetwork`: its
    /// public addresses and `"BackendType":"host-gw"`, no backend data.
    pub fn host_gw(public_ip: Option<Ipv4Addr>, public_ipv6: Option<Ipv6Addr>) -> Self {
        LeaseAttrs {
            public_ip: public_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            public_ipv6,
            backend_type: BackendKind::HostGw.name().to_string(),
            backend_data: None,
            backend_v6_data: None,
        }
    }

    /// The backend the lease's `BackendType` names (exactly, as flanneld compares it).
    pub fn backend(&self) -> Option<BackendKind> {
        BackendKind::ALL
            .into_iter()
            .find(|k| k.name() == self.backend_type)
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

/// One family of a peer's lease, as the datapath needs it: the subnet, where its owner is
/// reached, and its VTEP (VNI, MAC) on a vxlan lease (`None` on a host-gw one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer<F: Family> {
    pub subnet: F::Net,
    pub public_ip: F::Addr,
    pub vtep: Option<VxlanBackendData>,
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

    /// What a family of the lease needs besides its subnet and public address: the VTEP
    /// (`Some(Some(data))`) on a vxlan lease that has it, nothing (`Some(None)`) on a host-gw
    /// lease, `None` when the lease is unusable in the family.
    fn vtep(&self, data: Option<VxlanBackendData>) -> Option<Option<VxlanBackendData>> {
        match self.attrs.backend()? {
            BackendKind::Vxlan => Some(Some(data?)),
            BackendKind::HostGw => Some(None),
        }
    }

    /// The IPv4 side: subnet, PublicIP (and BackendData on a vxlan lease), when it has them.
    pub fn v4(&self) -> Option<Peer<V4>> {
        Some(Peer {
            vtep: self.vtep(self.attrs.backend_data)?,
            subnet: self.subnet?,
            public_ip: self.attrs.public_ipv4()?,
        })
    }

    /// The IPv6 side: IPv6 subnet, PublicIPv6 (and BackendV6Data on a vxlan lease).
    pub fn v6(&self) -> Option<Peer<V6>> {
        Some(Peer {
            vtep: self.vtep(self.attrs.backend_v6_data)?,
            subnet: self.ipv6_subnet?,
            public_ip: self.attrs.public_ipv6?,
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

/// Parses a lease value; only leases of our backend (`ours`) that are usable in at least one
/// family (a subnet, its public address and, for vxlan, its backend data) are accepted. A lease
/// of another backend is [`LeaseError::OtherBackend`] (flanneld: "Ignoring non-host-gw subnet").
pub fn parse_lease(key: &str, value: &[u8], ours: BackendKind) -> Result<Lease, LeaseError> {
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
    if probe.backend_type != ours.name() {
        return Err(LeaseError::OtherBackend {
            key: key.to_string(),
            backend_type: probe.backend_type,
            ours: ours.name(),
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
            (true, false) if ours == BackendKind::HostGw => "host-gw lease without PublicIP",
            (true, false) => "vxlan lease without BackendData (VNI, VtepMAC) or PublicIP",
            (false, true) if ours == BackendKind::HostGw => "IPv6-only host-gw lease without PublicIPv6",
            (false, true) => "IPv6-only vxlan lease without BackendV6Data (VNI, VtepMAC) or PublicIPv6",
            _ if ours == BackendKind::HostGw => {
                "dual-stack host-gw lease usable in neither family: it needs PublicIP or PublicIPv6"
            }
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
        let l = parse_lease(
            "/coreos.com/network/subnets/10.244.7.0-24",
            FLANNEL_EXAMPLE.as_bytes(),
            BackendKind::Vxlan,
        )
        .unwrap();
        assert_eq!(l.subnet, Some("10.244.7.0/24".parse::<Ipv4Net>().unwrap()));
        assert_eq!(l.ipv6_subnet, None);
        assert_eq!(l.v6(), None);
        assert_eq!(l.attrs.public_ip, Ipv4Addr::new(198, 18, 0, 11));
        assert_eq!(
            l.v4().unwrap().vtep,
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
        let l = parse_lease(
            "/coreos.com/network/subnets/10.244.7.0-24&fd00:10:244:7::-64",
            DUAL.as_bytes(),
            BackendKind::Vxlan,
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
                v6.vtep.unwrap().vni,
                v6.vtep.unwrap().vtep_mac.to_string()
            ),
            (
                "fd00:10:244:7::/64".into(),
                "fd00:198:18::11".into(),
                1,
                "6a:01:77:c3:0d:10".into()
            )
        );

        let l = parse_lease(
            "/coreos.com/network/subnets/0.0.0.0-0&fd00:10:244:8::-64",
            V6_ONLY.as_bytes(),
            BackendKind::Vxlan,
        )
        .unwrap();
        assert_eq!((l.subnet, l.v4()), (None, None));
        assert_eq!(l.attrs.public_ipv4(), None);
        assert_eq!(l.attrs.backend_data, None);
        assert_eq!(l.v6().unwrap().vtep.unwrap().vni, 4096);
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
            parse_lease(
                "10.5.1.0-24&fc00::-64",
                br#"{"PublicIP":"192.168.0.1","PublicIPv6":"fc00::1"}"#,
                BackendKind::Vxlan
            ),
            Err(LeaseError::OtherBackend { .. })
        ));
    }

    /// flanneld's host-gw leases (`RegisterNetwork`: PublicIP, PublicIPv6, BackendType, no
    /// data), both ways, and a host-gw node skipping vxlan leases as flanneld does.
    #[test]
    fn host_gw_leases_as_flanneld_writes_them() {
        const V4: &str = r#"{"PublicIP":"10.4.7.21","PublicIPv6":null,"BackendType":"host-gw"}"#;
        const DUAL: &str =
            r#"{"PublicIP":"198.18.0.11","PublicIPv6":"fd00:198:18::11","BackendType":"host-gw"}"#;
        let hg = BackendKind::HostGw;
        assert_eq!(
            LeaseAttrs::host_gw(Some(Ipv4Addr::new(10, 4, 7, 21)), None).to_json(),
            V4
        );
        let l = parse_lease("/coreos.com/network/subnets/172.7.21.0-24", V4.as_bytes(), hg).unwrap();
        let p = l.v4().unwrap();
        assert_eq!(
            (p.subnet.to_string(), p.public_ip.to_string(), p.vtep),
            ("172.7.21.0/24".into(), "10.4.7.21".into(), None)
        );
        assert_eq!((l.v6(), l.attrs.to_json()), (None, V4.to_string()));
        let l = parse_lease("/p/subnets/10.244.7.0-24&fd00:10:244:7::-64", DUAL.as_bytes(), hg).unwrap();
        assert_eq!(l.v6().unwrap().public_ip.to_string(), "fd00:198:18::11");
        assert_eq!(
            LeaseAttrs::host_gw(
                Some(Ipv4Addr::new(198, 18, 0, 11)),
                Some("fd00:198:18::11".parse().unwrap())
            )
            .to_json(),
            DUAL
        );
        // Each backend skips the other's leases (flanneld compares BackendType exactly).
        assert_eq!(
            parse_lease("/p/subnets/172.7.21.0-24", FLANNEL_EXAMPLE.as_bytes(), hg),
            Err(LeaseError::OtherBackend {
                key: "/p/subnets/172.7.21.0-24".into(),
                backend_type: "vxlan".into(),
                ours: "host-gw"
            })
        );
        for v in [V4, r#"{"PublicIP":"10.4.7.21","BackendType":"Host-GW"}"#] {
            assert!(matches!(
                parse_lease("/p/subnets/172.7.21.0-24", v.as_bytes(), BackendKind::Vxlan),
                Err(LeaseError::OtherBackend { .. })
            ));
        }
        assert_eq!(
            parse_lease(
                "/p/subnets/172.7.21.0-24",
                br#"{"PublicIP":"0.0.0.0","BackendType":"host-gw"}"#,
                hg
            ),
            Err(LeaseError::BadValue {
                key: "/p/subnets/172.7.21.0-24".into(),
                reason: "host-gw lease without PublicIP".into()
            })
        );
    }

    #[test]
    fn foreign_and_malformed_values() {
        let k = "/p/subnets/10.1.2.0-24";
        assert!(matches!(
            parse_lease(k, br#"{"PublicIP":"1.2.3.4","BackendType":"host-gw"}"#, BackendKind::Vxlan),
            Err(LeaseError::OtherBackend { backend_type, .. }) if backend_type == "host-gw"
        ));
        assert!(matches!(
            parse_lease(k, b"{not json", BackendKind::Vxlan),
            Err(LeaseError::BadValue { .. })
        ));
        assert!(matches!(
            parse_lease(
                k,
                br#"{"PublicIP":"1.2.3.4","BackendType":"vxlan"}"#,
                BackendKind::Vxlan
            ),
            Err(LeaseError::BadValue { .. })
        ));
        assert!(matches!(
            parse_lease(
                k,
                br#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz"}}"#,
                BackendKind::Vxlan
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
                    parse_lease(k6, v.as_bytes(), BackendKind::Vxlan),
                    Err(LeaseError::BadValue { .. })
                ),
                "{v}"
            );
        }
        assert!(matches!(
            parse_lease(
                "/p/subnets/0.0.0.0-0&fd00:1:2::-64",
                br#"{"PublicIP":"0.0.0.0","PublicIPv6":null,"BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}}"#, BackendKind::Vxlan
            ),
            Err(LeaseError::BadValue { .. })
        ));
        // A dual-stack key whose value carries only the IPv4 side is usable in IPv4.
        let l = parse_lease(
            k6,
            br#"{"PublicIP":"1.2.3.4","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}}"#, BackendKind::Vxlan
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
