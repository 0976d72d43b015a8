//! flannel's network config (`<prefix>/config`), parsed and validated the way flanneld v0.28 does
//! (pkg/subnet/config.go): IPv4, IPv6 or both (`EnableIPv4`, `EnableIPv6`), vxlan only.
//!
//! Keys match case-insensitively, as Go's `encoding/json` does.

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{Map, Value};

use crate::family::{Family, SubnetPool, V4, V6};

use overlay_common::{DEFAULT_VNI, DEFAULT_VXLAN_PORT as DEFAULT_PORT};

use super::backend::BackendKind;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("network config is not valid JSON: {0}")]
    Json(String),
    #[error("network config must be a JSON object, e.g. {{\"Network\": \"10.244.0.0/16\", \"Backend\": {{\"Type\": \"vxlan\"}}}}")]
    NotObject,
    #[error("config field {field}: {problem}")]
    Field { field: &'static str, problem: String },
}

fn field(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        problem: problem.into(),
    }
}

/// The `Backend` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// `Backend.Type`.
    pub kind: BackendKind,
    pub vni: u32,
    pub port: u16,
    /// `Backend.MTU`: the underlay MTU the tunnel is sized for, as flanneld reads it (its
    /// `flannel.1` gets this minus 50, and so does subnet.env); unset: the interface's MTU.
    pub mtu: Option<u32>,
    pub direct_routing: bool,
}

/// A validated network config with flannel's defaults filled in. At least one family is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// `Network`, `SubnetLen`, `SubnetMin`, `SubnetMax`; `None` when `EnableIPv4` is false.
    pub ipv4: Option<SubnetPool<V4>>,
    /// `IPv6Network`, `IPv6SubnetLen`, `IPv6SubnetMin`, `IPv6SubnetMax`; `None` unless
    /// `EnableIPv6` is true.
    pub ipv6: Option<SubnetPool<V6>>,
    pub backend: BackendConfig,
}

/// The config field names of one family's pool, and what to say when its network is missing.
struct PoolFields {
    network: &'static str,
    subnet_len: &'static str,
    min: &'static str,
    max: &'static str,
    missing: &'static str,
}

const V4_FIELDS: PoolFields = PoolFields {
    network: "Network",
    subnet_len: "SubnetLen",
    min: "SubnetMin",
    max: "SubnetMax",
    missing: "is missing; set it to the cluster CIDR, e.g. \"10.244.0.0/16\"",
};

const V6_FIELDS: PoolFields = PoolFields {
    network: "IPv6Network",
    subnet_len: "IPv6SubnetLen",
    min: "IPv6SubnetMin",
    max: "IPv6SubnetMax",
    missing: "is missing but EnableIPv6 is true; set it to the cluster's IPv6 CIDR, e.g. \
              \"fd00:10:244::/56\", or set EnableIPv6 to false",
};

/// IPv6 ranges a pod network must not overlap, and why.
const V6_RESERVED: [(&str, &str); 4] = [
    ("::1/128", "the loopback address"),
    (
        "::ffff:0:0/96",
        "the IPv4-mapped addresses (IPv4 written as IPv6; they overlap the IPv4 network space)",
    ),
    ("fe80::/10", "the link-local addresses every interface carries"),
    ("ff00::/8", "the multicast addresses"),
];

fn flag(obj: &Map<String, Value>, name: &'static str, default: bool) -> Result<bool, ConfigError> {
    match get(obj, name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(field(name, "must be true or false")),
    }
}

impl NetworkConfig {
    /// Parses and validates the JSON stored at `<prefix>/config` as flanneld's
    /// `ParseConfig` + `CheckNetworkConfig` do, with an error naming the field and the fix.
    pub fn parse(json: &str) -> Result<Self, ConfigError> {
        let v: Value = serde_json::from_str(json).map_err(|e| ConfigError::Json(e.to_string()))?;
        let obj = v.as_object().ok_or(ConfigError::NotObject)?;

        let enable_ipv4 = flag(obj, "EnableIPv4", true)?;
        let enable_ipv6 = flag(obj, "EnableIPv6", false)?;
        if !enable_ipv4 && !enable_ipv6 {
            return Err(field(
                "EnableIPv4",
                "is false and EnableIPv6 is not true, so no address family is enabled; remove \
                 EnableIPv4 (IPv4 is on by default) or set EnableIPv6 to true with an IPv6Network",
            ));
        }
        let ipv4 = match enable_ipv4 {
            true => Some(parse_pool::<V4>(obj, &V4_FIELDS)?),
            false => None,
        };
        let ipv6 = match enable_ipv6 {
            true => {
                let pool = parse_pool::<V6>(obj, &V6_FIELDS)?;
                let net = pool.network;
                for (range, what) in V6_RESERVED {
                    let r: Ipv6Net = range.parse().expect("valid reserved range");
                    if net.contains(&r.network()) || r.contains(&net.network()) {
                        return Err(field(
                            "IPv6Network",
                            format!(
                                "{net} overlaps {range}, {what}; use a unique local (fd00::/8) or \
                                 global prefix such as \"{}\"",
                                V6::EXAMPLE_NET
                            ),
                        ));
                    }
                }
                Some(pool)
            }
            false => None,
        };

        let backend = parse_backend(get(obj, "Backend"))?;
        Ok(NetworkConfig { ipv4, ipv6, backend })
    }

    /// The IPv4 `Network`, when IPv4 is enabled.
    pub fn network(&self) -> Option<Ipv4Net> {
        self.ipv4.map(|p| p.network)
    }

    /// The `IPv6Network`, when IPv6 is enabled.
    pub fn ipv6_network(&self) -> Option<Ipv6Net> {
        self.ipv6.map(|p| p.network)
    }

    /// The pod MTU flanneld writes to subnet.env for either family: the underlay MTU
    /// ([`NetworkConfig::underlay_mtu`]) minus [`VXLAN_OVERHEAD`]. flanneld uses the same value
    /// for IPv6, whose outer header (over `PublicIPv6`) is [`overlay_common::wire::VXLAN6_OVERHEAD`] bytes.
    pub fn mtu(&self, iface_mtu: u32) -> u32 {
        self.underlay_mtu(iface_mtu)
            .saturating_sub(self.backend.kind.overhead())
    }

    /// The largest inner packet over an IPv6 underlay (the IPv6 host route's MTU).
    pub fn mtu6(&self, iface_mtu: u32) -> u32 {
        self.underlay_mtu(iface_mtu)
            .saturating_sub(self.backend.kind.overhead6())
    }

    /// The underlay MTU the tunnel is sized for: `Backend.MTU` if set (flanneld's
    /// `parseVXLANConfig` default is the interface's MTU), else `iface_mtu`. host-gw always
    /// uses the interface's (flanneld's host-gw reads no `Backend.MTU`).
    pub fn underlay_mtu(&self, iface_mtu: u32) -> u32 {
        match self.backend.kind {
            BackendKind::Vxlan => self.backend.mtu.unwrap_or(iface_mtu),
            BackendKind::HostGw => iface_mtu,
        }
    }
}

/// One family's pool from its four fields, with flannel's defaults and checks
/// (pkg/subnet/config.go `CheckNetworkConfig`, which does the same for both families).
fn parse_pool<F: Family>(obj: &Map<String, Value>, names: &PoolFields) -> Result<SubnetPool<F>, ConfigError> {
    let network = match get(obj, names.network) {
        None | Some(Value::Null) => return Err(field(names.network, names.missing)),
        Some(Value::String(s)) => s.parse::<F::Net>().map_err(|_| {
            field(
                names.network,
                format!(
                    "{s:?} is not an {} CIDR; use e.g. \"{}\"",
                    F::NAME,
                    F::EXAMPLE_NET
                ),
            )
        })?,
        Some(_) => {
            return Err(field(
                names.network,
                format!("must be a string CIDR such as \"{}\"", F::EXAMPLE_NET),
            ))
        }
    };
    let plen = F::net_len(&network);
    // Go's ParseCIDR masks the address; so do we.
    let network = F::net(F::net_addr(&network), plen);

    let subnet_len = match get(obj, names.subnet_len) {
        None | Some(Value::Null) => 0,
        Some(v) => v.as_u64().filter(|n| *n <= u64::from(F::BITS)).ok_or_else(|| {
            field(
                names.subnet_len,
                format!(
                    "must be a prefix length between 0 and {}, e.g. {}",
                    F::BITS,
                    F::DEFAULT_SUBNET_LEN
                ),
            )
        })? as u8,
    };
    let subnet_len = if subnet_len > 0 {
        if subnet_len > F::MAX_SUBNET_LEN {
            return Err(field(
                names.subnet_len,
                format!(
                    "is /{subnet_len}; it must be /{} or shorter (less than /{})",
                    F::MAX_SUBNET_LEN,
                    F::MAX_SUBNET_LEN + 1
                ),
            ));
        }
        if subnet_len < plen + 2 {
            return Err(field(
                names.subnet_len,
                format!(
                    "is /{subnet_len} but {} {network} must accommodate at least four subnets; \
                     use /{} or longer",
                    names.network,
                    plen + 2
                ),
            ));
        }
        subnet_len
    } else if plen > F::MIN_USEFUL_PREFIX {
        return Err(field(
            names.network,
            format!(
                "{network} is too small; the minimum useful network prefix is /{}",
                F::MIN_USEFUL_PREFIX
            ),
        ));
    } else if plen <= F::DEFAULT_SUBNET_LEN - 2 {
        F::DEFAULT_SUBNET_LEN
    } else {
        plen + 2
    };

    let size = 1u128 << (F::BITS - subnet_len);
    let net_start = F::bits(F::net_addr(&network));
    let host_bits = u32::from(F::BITS - plen);
    // The last address of the network (its "Next" minus one, without overflowing).
    let net_last = net_start + (1u128.checked_shl(host_bits).unwrap_or(0).wrapping_sub(1));
    let addr = |name: &'static str| -> Result<Option<F::Addr>, ConfigError> {
        match get(obj, name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => s.parse::<F::Addr>().map(Some).map_err(|_| {
                field(
                    name,
                    format!(
                        "{s:?} is not an {} address; use e.g. \"{}\"",
                        F::NAME,
                        F::EXAMPLE_ADDR
                    ),
                )
            }),
            Some(_) => Err(field(
                name,
                format!(
                    "must be a string {} address such as \"{}\"",
                    F::NAME,
                    F::EXAMPLE_ADDR
                ),
            )),
        }
    };
    let in_net = |a: F::Addr| F::net(a, plen) == network;
    let pick = |name: &'static str, default: u128| -> Result<F::Addr, ConfigError> {
        match addr(name)? {
            None => Ok(F::addr(default)),
            Some(a) if F::bits(a) == 0 => Ok(F::addr(default)),
            Some(a) if !in_net(a) => Err(field(
                name,
                format!("{a} is not in the range of the {} {network}", names.network),
            )),
            Some(a) => Ok(a),
        }
    };
    let subnet_min = pick(names.min, net_start + size)?;
    let subnet_max = pick(names.max, net_last - (size - 1))?;
    let on_boundary = |a: F::Addr| F::bits(a) & (size - 1) == 0;
    if !on_boundary(subnet_min) {
        return Err(field(
            names.min,
            format!(
                "{subnet_min} is not on a {} (/{subnet_len}) boundary",
                names.subnet_len
            ),
        ));
    }
    if !on_boundary(subnet_max) {
        return Err(field(
            names.max,
            format!(
                "{subnet_max} is not on a {} (/{subnet_len}) boundary",
                names.subnet_len
            ),
        ));
    }
    if subnet_min > subnet_max {
        return Err(field(
            names.min,
            format!("{subnet_min} is above {} {subnet_max}", names.max),
        ));
    }
    Ok(SubnetPool {
        network,
        subnet_len,
        subnet_min,
        subnet_max,
    })
}

/// Case-insensitive lookup (exact match preferred), as Go's encoding/json.
fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

fn parse_backend(v: Option<&Value>) -> Result<BackendConfig, ConfigError> {
    let empty = Map::new();
    let obj = match v {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(o)) => o,
        Some(_) => return Err(field("Backend", "must be an object, e.g. {\"Type\": \"vxlan\"}")),
    };
    let kind = match get(obj, "Type") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) if BackendKind::from_type(t).is_some() => BackendKind::from_type(t),
        Some(Value::String(t)) => {
            return Err(field(
                "Backend.Type",
                format!("is {t:?} but this agent implements only the vxlan and host-gw backends; set Backend.Type to \"vxlan\" or \"host-gw\", or run flanneld for {t:?}"),
            ))
        }
        Some(_) => return Err(field("Backend.Type", "must be the string \"vxlan\" or \"host-gw\"")),
    };
    let uint = |name: &'static str, max: u64, hint: &str| -> Result<Option<u64>, ConfigError> {
        match get(obj, name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|n| *n <= max)
                .map(Some)
                .ok_or_else(|| field(name_of(name), format!("must be an integer from 0 to {max}{hint}"))),
        }
    };
    let vni = match uint("VNI", (1 << 24) - 1, " (24-bit VXLAN network identifier)")? {
        None | Some(0) => DEFAULT_VNI,
        Some(n) => n as u32,
    };
    let port = match uint("Port", 65535, " (UDP port; 0 means 8472)")? {
        None | Some(0) => DEFAULT_PORT,
        Some(n) => n as u16,
    };
    let mtu = match uint("MTU", 65535, "")? {
        None | Some(0) => None,
        Some(n) if n < 576 => {
            return Err(field(
                "Backend.MTU",
                format!("{n} is too small; use at least 576 or leave it unset"),
            ))
        }
        Some(n) => Some(n as u32),
    };
    let direct_routing = match get(obj, "DirectRouting") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(field("Backend.DirectRouting", "must be true or false")),
    };
    // Checked last, so a config with other Backend mistakes names those first.
    let Some(kind) = kind else {
        let problem = if matches!(v, None | Some(Value::Null)) {
            // flanneld: no Backend means its udp backend.
            "is missing: without a Backend flanneld uses its udp backend, which this agent does not \
             implement; add \"Backend\": {\"Type\": \"vxlan\"} to the network config"
        } else {
            "is missing (flanneld would refuse the config too); set it: \"Backend\": {\"Type\": \"vxlan\"}"
        };
        return Err(field("Backend.Type", problem));
    };
    Ok(BackendConfig {
        kind,
        vni,
        port,
        mtu,
        direct_routing,
    })
}

fn name_of(n: &'static str) -> &'static str {
    match n {
        "VNI" => "Backend.VNI",
        "Port" => "Backend.Port",
        "MTU" => "Backend.MTU",
        _ => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> std::net::Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults() {
        // (json, network, subnet_len, min, max)
        let cases = [
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
                "10.244.0.0/16",
                24,
                "10.244.1.0",
                "10.244.255.0",
            ),
            (
                r#"{"network":"10.244.0.0/16","backend":{"type":"vxlan"}}"#,
                "10.244.0.0/16",
                24,
                "10.244.1.0",
                "10.244.255.0",
            ),
            (
                r#"{"Network":"10.0.0.0/22","Backend":{"Type":"vxlan"}}"#,
                "10.0.0.0/22",
                24,
                "10.0.1.0",
                "10.0.3.0",
            ),
            (
                r#"{"Network":"10.0.0.0/23","Backend":{"Type":"vxlan"}}"#,
                "10.0.0.0/23",
                25,
                "10.0.0.128",
                "10.0.1.128",
            ),
            (
                r#"{"Network":"10.0.0.0/28","Backend":{"Type":"vxlan"}}"#,
                "10.0.0.0/28",
                30,
                "10.0.0.4",
                "10.0.0.12",
            ),
            (
                r#"{"Network":"10.244.3.7/16","Backend":{"Type":"vxlan"}}"#,
                "10.244.0.0/16",
                24,
                "10.244.1.0",
                "10.244.255.0",
            ),
            (
                r#"{"Network":"10.244.0.0/16","SubnetLen":26,"SubnetMin":"10.244.8.0","SubnetMax":"10.244.9.192","Backend":{"Type":"vxlan"}}"#,
                "10.244.0.0/16",
                26,
                "10.244.8.0",
                "10.244.9.192",
            ),
            (
                r#"{"Network":"10.244.0.0/16","SubnetMin":"0.0.0.0","Backend":{"Type":"vxlan"}}"#,
                "10.244.0.0/16",
                24,
                "10.244.1.0",
                "10.244.255.0",
            ),
        ];
        for (json, net, len, min, max) in cases {
            let c = NetworkConfig::parse(json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(c.ipv6, None, "{json}");
            let c = c.ipv4.expect("IPv4 is on by default");
            assert_eq!(c.network, net.parse::<Ipv4Net>().unwrap(), "{json}");
            assert_eq!(c.subnet_len, len, "{json}");
            assert_eq!(c.subnet_min, ip(min), "{json}");
            assert_eq!(c.subnet_max, ip(max), "{json}");
        }
        let c = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(
            c.backend,
            BackendConfig {
                kind: BackendKind::Vxlan,
                vni: 1,
                port: 8472,
                mtu: None,
                direct_routing: false
            }
        );
        assert_eq!(c.mtu(1500), 1450);
        let c = NetworkConfig::parse(
            r#"{"NETWORK":"10.244.0.0/16","Backend":{"Type":"VXLAN","vni":42,"PORT":4789,"Mtu":1400,"directrouting":true,"GBP":false}}"#,
        )
        .unwrap();
        assert_eq!(
            c.backend,
            BackendConfig {
                kind: BackendKind::Vxlan,
                vni: 42,
                port: 4789,
                mtu: Some(1400),
                direct_routing: true
            }
        );
        // Backend.MTU is the underlay's, as flanneld reads it: pods get 50 less.
        assert_eq!(c.mtu(9000), 1350);
        // The setup guides' host-gw config: pods get the interface MTU, Backend.MTU or not.
        let c =
            NetworkConfig::parse(r#"{"Network": "172.7.0.0/16", "Backend": {"Type": "host-gw"}}"#).unwrap();
        assert_eq!(c.backend.kind, BackendKind::HostGw);
        assert_eq!((c.mtu(1500), c.mtu6(1500), c.mtu(9001)), (1500, 1500, 9001));
        let c =
            NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","backend":{"type":"HOST-GW","MTU":1400}}"#)
                .unwrap();
        assert_eq!((c.backend.kind, c.mtu(1460)), (BackendKind::HostGw, 1460));
        assert_eq!(c.ipv4.unwrap().subnets().count(), 255);
    }

    #[test]
    fn validation_errors() {
        let cases = [
            ("not json", "network config is not valid JSON: expected ident at line 1 column 2"),
            ("[1]", "network config must be a JSON object, e.g. {\"Network\": \"10.244.0.0/16\", \"Backend\": {\"Type\": \"vxlan\"}}"),
            ("{}", "config field Network: is missing; set it to the cluster CIDR, e.g. \"10.244.0.0/16\""),
            (r#"{"Network":"10.244.0.0"}"#, "config field Network: \"10.244.0.0\" is not an IPv4 CIDR; use e.g. \"10.244.0.0/16\""),
            (r#"{"Network":"fd00::/48"}"#, "config field Network: \"fd00::/48\" is not an IPv4 CIDR; use e.g. \"10.244.0.0/16\""),
            (r#"{"Network":16}"#, "config field Network: must be a string CIDR such as \"10.244.0.0/16\""),
            (r#"{"Network":"10.0.0.0/29"}"#, "config field Network: 10.0.0.0/29 is too small; the minimum useful network prefix is /28"),
            (r#"{"Network":"10.0.0.0/16","SubnetLen":31}"#, "config field SubnetLen: is /31; it must be /30 or shorter (less than /31)"),
            (r#"{"Network":"10.0.0.0/16","SubnetLen":17}"#, "config field SubnetLen: is /17 but Network 10.0.0.0/16 must accommodate at least four subnets; use /18 or longer"),
            (r#"{"Network":"10.0.0.0/16","SubnetLen":"24"}"#, "config field SubnetLen: must be a prefix length between 0 and 32, e.g. 24"),
            (r#"{"Network":"10.0.0.0/16","SubnetMin":"10.1.0.0"}"#, "config field SubnetMin: 10.1.0.0 is not in the range of the Network 10.0.0.0/16"),
            (r#"{"Network":"10.0.0.0/16","SubnetMax":"11.0.0.0"}"#, "config field SubnetMax: 11.0.0.0 is not in the range of the Network 10.0.0.0/16"),
            (r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.1.1"}"#, "config field SubnetMin: 10.0.1.1 is not on a SubnetLen (/24) boundary"),
            (r#"{"Network":"10.0.0.0/16","SubnetMax":"10.0.9.128"}"#, "config field SubnetMax: 10.0.9.128 is not on a SubnetLen (/24) boundary"),
            (r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.9.0","SubnetMax":"10.0.8.0"}"#, "config field SubnetMin: 10.0.9.0 is above SubnetMax 10.0.8.0"),
            (r#"{"Network":"10.0.0.0/16","SubnetMin":"x"}"#, "config field SubnetMin: \"x\" is not an IPv4 address; use e.g. \"10.244.1.0\""),
            (r#"{"Network":"10.0.0.0/16","EnableIPv4":false}"#, "config field EnableIPv4: is false and EnableIPv6 is not true, so no address family is enabled; remove EnableIPv4 (IPv4 is on by default) or set EnableIPv6 to true with an IPv6Network"),
            (r#"{"Network":"10.0.0.0/16","EnableIPv4":"no"}"#, "config field EnableIPv4: must be true or false"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"Type":"udp"}}"#, "config field Backend.Type: is \"udp\" but this agent implements only the vxlan and host-gw backends; set Backend.Type to \"vxlan\" or \"host-gw\", or run flanneld for \"udp\""),
            (r#"{"Network":"10.0.0.0/16","Backend":"vxlan"}"#, "config field Backend: must be an object, e.g. {\"Type\": \"vxlan\"}"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"VNI":16777216}}"#, "config field Backend.VNI: must be an integer from 0 to 16777215 (24-bit VXLAN network identifier)"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"Port":-1}}"#, "config field Backend.Port: must be an integer from 0 to 65535 (UDP port; 0 means 8472)"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"MTU":100}}"#, "config field Backend.MTU: 100 is too small; use at least 576 or leave it unset"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"DirectRouting":"yes"}}"#, "config field Backend.DirectRouting: must be true or false"),
            (r#"{"Network":"10.0.0.0/16"}"#, "config field Backend.Type: is missing: without a Backend flanneld uses its udp backend, which this agent does not implement; add \"Backend\": {\"Type\": \"vxlan\"} to the network config"),
            (r#"{"Network":"10.0.0.0/16","Backend":null}"#, "config field Backend.Type: is missing: without a Backend flanneld uses its udp backend, which this agent does not implement; add \"Backend\": {\"Type\": \"vxlan\"} to the network config"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"VNI":1}}"#, "config field Backend.Type: is missing (flanneld would refuse the config too); set it: \"Backend\": {\"Type\": \"vxlan\"}"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"Type":null}}"#, "config field Backend.Type: is missing (flanneld would refuse the config too); set it: \"Backend\": {\"Type\": \"vxlan\"}"),
        ];
        for (json, want) in cases {
            match NetworkConfig::parse(json) {
                Ok(c) => panic!("{json}: expected error {want:?}, got {c:?}"),
                Err(e) => assert_eq!(e.to_string(), want, "{json}"),
            }
        }
    }

    #[test]
    fn compatibility() {
        let c = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.5.0","SubnetMax":"10.244.9.0","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap()
        .ipv4
        .unwrap();
        let yes = ["10.244.5.0/24", "10.244.9.0/24", "10.244.7.0/24"];
        let no = [
            "10.244.4.0/24",
            "10.244.10.0/24",
            "10.244.7.0/25",
            "10.244.7.1/24",
            "10.245.7.0/24",
        ];
        for s in yes {
            assert!(c.is_compatible(s.parse().unwrap()), "{s}");
        }
        for s in no {
            assert!(!c.is_compatible(s.parse().unwrap()), "{s}");
        }
        assert_eq!(c.subnets().count(), 5);
    }

    /// IPv6 defaults as flannel's `CheckNetworkConfig` computes them (same rules as IPv4 with
    /// /64, /124, /126), dual-stack and IPv6-only.
    #[test]
    fn ipv6_defaults() {
        let v6 = |s: &str| -> std::net::Ipv6Addr { s.parse().unwrap() };
        // (json, network, subnet_len, min, max)
        let cases = [
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#,
                "fd00:10:244::/56",
                64,
                "fd00:10:244:1::",
                "fd00:10:244:ff::",
            ),
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"2001:db8:0:0:7::/80","Backend":{"Type":"vxlan"}}"#,
                "2001:db8:0:0:7::/80",
                82,
                "2001:db8::7:4000:0:0",
                "2001:db8::7:c000:0:0",
            ),
            (
                r#"{"enableipv4":false,"enableipv6":true,"ipv6network":"fd00::1:2:3/62","Backend":{"Type":"vxlan"}}"#,
                "fd00::/62",
                64,
                "fd00:0:0:1::",
                "fd00:0:0:3::",
            ),
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/124","Backend":{"Type":"vxlan"}}"#,
                "fd00::/124",
                126,
                "fd00::4",
                "fd00::c",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","IPv6SubnetLen":80,"IPv6SubnetMin":"fd00:10:244:7::","IPv6SubnetMax":"fd00:10:244:7:ffff::","Backend":{"Type":"vxlan"}}"#,
                "fd00:10:244::/48",
                80,
                "fd00:10:244:7::",
                "fd00:10:244:7:ffff::",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","IPv6SubnetMin":"::","IPv6SubnetMax":"","Backend":{"Type":"vxlan"}}"#,
                "fd00:10:244::/56",
                64,
                "fd00:10:244:1::",
                "fd00:10:244:ff::",
            ),
        ];
        for (json, net, len, min, max) in cases {
            let c = NetworkConfig::parse(json).unwrap_or_else(|e| panic!("{json}: {e}"));
            let p = c.ipv6.expect("IPv6 enabled");
            assert_eq!(p.network.to_string(), net, "{json}");
            assert_eq!(p.subnet_len, len, "{json}");
            assert_eq!(p.subnet_min, v6(min), "{json}");
            assert_eq!(p.subnet_max, v6(max), "{json}");
        }
        let dual = NetworkConfig::parse(cases[0].0).unwrap();
        assert_eq!(dual.network(), Some("10.244.0.0/16".parse().unwrap()));
        assert_eq!(dual.ipv6.unwrap().count(), 255);
        // IPv6-only: the IPv4 Network is ignored as flanneld ignores it (even when invalid).
        let only = NetworkConfig::parse(
            r#"{"EnableIPv4":false,"Network":"garbage","EnableIPv6":true,"IPv6Network":"fd00::/48","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert_eq!(
            (only.ipv4, only.ipv6_network()),
            (None, Some("fd00::/48".parse().unwrap()))
        );
        // IPv6 fields without EnableIPv6 are ignored, as flanneld does.
        let off = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","IPv6Network":"not even a CIDR","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert_eq!(off.ipv6, None);
        // One MTU for both families, as flanneld writes it.
        assert_eq!(dual.mtu(1500), 1450);
    }

    /// Each bad IPv6 config names its field and the fix.
    #[test]
    fn ipv6_validation_errors() {
        let base = |extra: &str| {
            format!(r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,{extra}"Backend":{{"Type":"vxlan"}}}}"#)
        };
        let cases = [
            (base(""), "config field IPv6Network: is missing but EnableIPv6 is true; set it to the cluster's IPv6 CIDR, e.g. \"fd00:10:244::/56\", or set EnableIPv6 to false"),
            (base(r#""IPv6Network":null,"#), "config field IPv6Network: is missing but EnableIPv6 is true; set it to the cluster's IPv6 CIDR, e.g. \"fd00:10:244::/56\", or set EnableIPv6 to false"),
            (base(r#""IPv6Network":"10.245.0.0/16","#), "config field IPv6Network: \"10.245.0.0/16\" is not an IPv6 CIDR; use e.g. \"fd00:10:244::/56\""),
            (base(r#""IPv6Network":"fd00::","#), "config field IPv6Network: \"fd00::\" is not an IPv6 CIDR; use e.g. \"fd00:10:244::/56\""),
            (base(r#""IPv6Network":56,"#), "config field IPv6Network: must be a string CIDR such as \"fd00:10:244::/56\""),
            (base(r#""IPv6Network":"fd00::/125","#), "config field IPv6Network: fd00::/125 is too small; the minimum useful network prefix is /124"),
            (base(r#""IPv6Network":"fd00::/56","IPv6SubnetLen":127,"#), "config field IPv6SubnetLen: is /127; it must be /126 or shorter (less than /127)"),
            (base(r#""IPv6Network":"fd00::/56","IPv6SubnetLen":57,"#), "config field IPv6SubnetLen: is /57 but IPv6Network fd00::/56 must accommodate at least four subnets; use /58 or longer"),
            (base(r#""IPv6Network":"fd00::/56","IPv6SubnetLen":129,"#), "config field IPv6SubnetLen: must be a prefix length between 0 and 128, e.g. 64"),
            (base(r#""IPv6Network":"fd00::/56","IPv6SubnetLen":"64","#), "config field IPv6SubnetLen: must be a prefix length between 0 and 128, e.g. 64"),
            (base(r#""IPv6Network":"fd00::/56","IPv6SubnetMin":"fd01::","#), "config field IPv6SubnetMin: fd01:: is not in the range of the IPv6Network fd00::/56"),
            (base(r#""IPv6Network":"fd00::/56","IPv6SubnetMax":"fd00:0:0:100::","#), "config field IPv6SubnetMax: fd00:0:0:100:: is not in the range of the IPv6Network fd00::/56"),
            (base(r#""IPv6Network":"fd00::/56","IPv6SubnetMin":"fd00:0:0:1::1","#), "config field IPv6SubnetMin: fd00:0:0:1::1 is not on a IPv6SubnetLen (/64) boundary"),
            (base(r#""IPv6Network":"fd00::/56","IPv6SubnetMax":"fd00:0:0:9:8000::","#), "config field IPv6SubnetMax: fd00:0:0:9:8000:: is not on a IPv6SubnetLen (/64) boundary"),
            (base(r#""IPv6Network":"fd00::/56","IPv6SubnetMin":"fd00:0:0:9::","IPv6SubnetMax":"fd00:0:0:8::","#), "config field IPv6SubnetMin: fd00:0:0:9:: is above IPv6SubnetMax fd00:0:0:8::"),
            (base(r#""IPv6Network":"fd00::/56","IPv6SubnetMin":"10.244.1.0","#), "config field IPv6SubnetMin: \"10.244.1.0\" is not an IPv6 address; use e.g. \"fd00:10:244:1::\""),
            (base(r#""IPv6Network":"fd00::/56","IPv6SubnetMax":7,"#), "config field IPv6SubnetMax: must be a string IPv6 address such as \"fd00:10:244:1::\""),
            // Overlaps with address space a pod network cannot have.
            (base(r#""IPv6Network":"::ffff:10.244.0.0/112","#), "config field IPv6Network: ::ffff:10.244.0.0/112 overlaps ::ffff:0:0/96, the IPv4-mapped addresses (IPv4 written as IPv6; they overlap the IPv4 network space); use a unique local (fd00::/8) or global prefix such as \"fd00:10:244::/56\""),
            (base(r#""IPv6Network":"fe80::/64","#), "config field IPv6Network: fe80::/64 overlaps fe80::/10, the link-local addresses every interface carries; use a unique local (fd00::/8) or global prefix such as \"fd00:10:244::/56\""),
            (base(r#""IPv6Network":"ff02::/16","#), "config field IPv6Network: ff02::/16 overlaps ff00::/8, the multicast addresses; use a unique local (fd00::/8) or global prefix such as \"fd00:10:244::/56\""),
            (base(r#""IPv6Network":"::/0","#), "config field IPv6Network: ::/0 overlaps ::1/128, the loopback address; use a unique local (fd00::/8) or global prefix such as \"fd00:10:244::/56\""),
            (base(r#""IPv6Network":"fd00::/56","EnableIPv6":"yes","#), "config field EnableIPv6: must be true or false"),
            (r#"{"EnableIPv4":false,"EnableIPv6":false,"IPv6Network":"fd00::/56"}"#.to_string(), "config field EnableIPv4: is false and EnableIPv6 is not true, so no address family is enabled; remove EnableIPv4 (IPv4 is on by default) or set EnableIPv6 to true with an IPv6Network"),
            // IPv6-only still needs the backend right.
            (r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"ipip"}}"#.to_string(), "config field Backend.Type: is \"ipip\" but this agent implements only the vxlan and host-gw backends; set Backend.Type to \"vxlan\" or \"host-gw\", or run flanneld for \"ipip\""),
            // IPv4 is checked first, as flanneld does.
            (r#"{"Network":"10.0.0.0/29","EnableIPv6":true}"#.to_string(), "config field Network: 10.0.0.0/29 is too small; the minimum useful network prefix is /28"),
        ];
        for (json, want) in cases {
            match NetworkConfig::parse(&json) {
                Ok(c) => panic!("{json}: expected error {want:?}, got {c:?}"),
                Err(e) => assert_eq!(e.to_string(), want, "{json}"),
            }
        }
    }
}
