//! Flannel's lease model: a subnet, the attributes its owner published, and when it expires.
//!
//! The JSON written to etcd is flannel's `LeaseAttrs` byte for byte (field names, order,
//! `"PublicIPv6":null`), so flanneld nodes and this agent can share one etcd prefix.

use std::{
    collections::HashMap,
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The only backend this agent speaks.
pub const BACKEND_VXLAN: &str = "vxlan";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    #[error("subnet key {key:?} is not of the form <prefix>/subnets/A.B.C.D-LEN (e.g. 10.244.7.0-24)")]
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

/// flannel's `vxlanLeaseAttrs`: `{"VNI":1,"VtepMAC":"0e:5c:2a:11:90:3f"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanBackendData {
    #[serde(rename = "VNI", default)]
    pub vni: u32,
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: MacAddr,
}

/// flannel's `lease.LeaseAttrs` (pkg/lease), restricted to what a vxlan node publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<Ipv6Addr>,
    #[serde(rename = "BackendType", default, skip_serializing_if = "String::is_empty")]
    pub backend_type: String,
    #[serde(rename = "BackendData", default, skip_serializing_if = "Option::is_none")]
    pub backend_data: Option<VxlanBackendData>,
    /// Carried through untouched for dual-stack flannel nodes; never written by us.
    #[serde(rename = "BackendV6Data", default, skip_serializing_if = "Option::is_none")]
    pub backend_v6_data: Option<serde_json::Value>,
}

impl LeaseAttrs {
    /// The attributes this node publishes.
    pub fn vxlan(public_ip: Ipv4Addr, vni: u32, vtep_mac: [u8; 6]) -> Self {
        LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: BACKEND_VXLAN.to_string(),
            backend_data: Some(VxlanBackendData {
                vni,
                vtep_mac: MacAddr(vtep_mac),
            }),
            backend_v6_data: None,
        }
    }

    /// flannel's exact JSON encoding.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("LeaseAttrs always serializes")
    }
}

/// One subnet lease, ours or a peer's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub subnet: Ipv4Net,
    pub attrs: LeaseAttrs,
    /// When the etcd lease runs out; `None` for a reservation (a key with no etcd lease)
    /// and for peers' leases, whose expiry is not ours to track.
    pub expiration: Option<tokio::time::Instant>,
}

impl Lease {
    /// The peer's VXLAN data; `None` unless this is a vxlan lease with BackendData.
    pub fn vxlan(&self) -> Option<VxlanBackendData> {
        if self.attrs.backend_type == BACKEND_VXLAN {
            self.attrs.backend_data
        } else {
            None
        }
    }
}

/// `10.244.7.0/24` -> `10.244.7.0-24` (flannel's `MakeSubnetKey`).
pub fn subnet_key_suffix(subnet: Ipv4Net) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix_len())
}

/// `<prefix>/subnets/10.244.7.0-24` for a subnet.
pub fn subnet_key(prefix: &str, subnet: Ipv4Net) -> String {
    format!(
        "{}/subnets/{}",
        prefix.trim_end_matches('/'),
        subnet_key_suffix(subnet)
    )
}

/// Parses the last path element of a subnet key (`10.244.7.0-24`), as flannel's
/// `ParseSubnetKey`: the address must be the network address of the subnet.
pub fn parse_subnet_key(key: &str) -> Result<Ipv4Net, LeaseError> {
    let bad = || LeaseError::BadKey { key: key.to_string() };
    let last = key.rsplit('/').next().unwrap_or(key);
    let (addr, len) = last.split_once('-').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    if len.is_empty() || len.len() > 2 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let len: u8 = len.parse().map_err(|_| bad())?;
    let net = Ipv4Net::new(addr, len).map_err(|_| bad())?;
    if net.network() != addr {
        return Err(bad());
    }
    Ok(net)
}

/// Parses a lease value; only vxlan leases with BackendData are accepted.
pub fn parse_vxlan_lease(key: &str, value: &[u8]) -> Result<Lease, LeaseError> {
    let subnet = parse_subnet_key(key)?;
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
    if attrs.backend_data.is_none() {
        return Err(LeaseError::BadValue {
            key: key.to_string(),
            reason: "vxlan lease without BackendData (VNI, VtepMAC)".into(),
        });
    }
    Ok(Lease {
        subnet,
        attrs,
        expiration: None,
    })
}

/// What the dataplane must do to go from `old` to `new` peer sets.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PeerDiff {
    pub upsert: Vec<Lease>,
    pub remove: Vec<Lease>,
}

/// Pure diff between two peer sets keyed by subnet; unchanged leases produce nothing.
pub fn diff_peers(old: &HashMap<Ipv4Net, Lease>, new: &HashMap<Ipv4Net, Lease>) -> PeerDiff {
    let mut d = PeerDiff::default();
    for (sn, l) in new {
        if old.get(sn).map(|o| &o.attrs) != Some(&l.attrs) {
            d.upsert.push(l.clone());
        }
    }
    for (sn, l) in old {
        if !new.contains_key(sn) {
            d.remove.push(l.clone());
        }
    }
    d.upsert.sort_by_key(|l| l.subnet);
    d.remove.sort_by_key(|l| l.subnet);
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
        assert_eq!(l.subnet, "10.244.7.0/24".parse::<Ipv4Net>().unwrap());
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
        let ok = [
            ("/coreos.com/network/subnets/10.244.7.0-24", "10.244.7.0/24"),
            ("10.244.7.0-24", "10.244.7.0/24"),
            ("/x/subnets/10.0.0.0-8", "10.0.0.0/8"),
            ("/x/subnets/10.244.7.128-25", "10.244.7.128/25"),
        ];
        for (k, want) in ok {
            assert_eq!(parse_subnet_key(k), Ok(want.parse().unwrap()), "key {k}");
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
        assert_eq!(parse_subnet_key(&subnet_key("/p", sn)), Ok(sn));
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
    }

    #[test]
    fn diff() {
        let mk = |sn: &str, ip: u8| Lease {
            subnet: sn.parse().unwrap(),
            attrs: LeaseAttrs::vxlan(Ipv4Addr::new(198, 18, 0, ip), 1, [2, 0, 0, 0, 0, ip]),
            expiration: None,
        };
        let old: HashMap<_, _> = [mk("10.0.1.0/24", 1), mk("10.0.2.0/24", 2)]
            .into_iter()
            .map(|l| (l.subnet, l))
            .collect();
        let new: HashMap<_, _> = [mk("10.0.2.0/24", 2), mk("10.0.3.0/24", 3)]
            .into_iter()
            .map(|l| (l.subnet, l))
            .collect();
        let d = diff_peers(&old, &new);
        assert_eq!(d.upsert, vec![mk("10.0.3.0/24", 3)]);
        assert_eq!(d.remove, vec![mk("10.0.1.0/24", 1)]);
    }
}
