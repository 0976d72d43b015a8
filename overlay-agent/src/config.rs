//! flannel's network config (`<prefix>/config`), parsed and validated the way flanneld v0.28 does
//! (pkg/subnet/config.go), restricted to IPv4 + vxlan.
//!
//! Keys match case-insensitively, as Go's `encoding/json` does.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde_json::{Map, Value};

pub const DEFAULT_VNI: u32 = 1;
pub const DEFAULT_PORT: u16 = 8472;
/// Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;

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

/// The `Backend` object, vxlan only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub vni: u32,
    pub port: u16,
    /// `Backend.MTU`; when unset the MTU is the underlay's minus [`VXLAN_OVERHEAD`].
    pub mtu: Option<u32>,
    pub direct_routing: bool,
}

/// A validated network config with flannel's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub network: Ipv4Net,
    pub subnet_len: u8,
    /// First subnet that may be leased (network address of a `subnet_len` subnet).
    pub subnet_min: Ipv4Addr,
    /// Last subnet that may be leased.
    pub subnet_max: Ipv4Addr,
    pub backend: BackendConfig,
}

impl NetworkConfig {
    /// Parses and validates the JSON stored at `<prefix>/config`.
    pub fn parse(json: &str) -> Result<Self, ConfigError> {
        let v: Value = serde_json::from_str(json).map_err(|e| ConfigError::Json(e.to_string()))?;
        let obj = v.as_object().ok_or(ConfigError::NotObject)?;

        let enable_ipv4 = match get(obj, "EnableIPv4") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(field("EnableIPv4", "must be true or false")),
        };
        if !enable_ipv4 {
            return Err(field(
                "EnableIPv4",
                "is false, but this agent supports IPv4 only; remove EnableIPv4 or set it to true",
            ));
        }
        if matches!(get(obj, "EnableIPv6"), Some(Value::Bool(true))) {
            tracing::warn!("network config has EnableIPv6=true; this agent ignores IPv6");
        }

        let network = match get(obj, "Network") {
            None | Some(Value::Null) => {
                return Err(field(
                    "Network",
                    "is missing; set it to the cluster CIDR, e.g. \"10.244.0.0/16\"",
                ))
            }
            Some(Value::String(s)) => s.parse::<Ipv4Net>().map_err(|_| {
                field(
                    "Network",
                    format!("{s:?} is not an IPv4 CIDR; use e.g. \"10.244.0.0/16\""),
                )
            })?,
            Some(_) => {
                return Err(field(
                    "Network",
                    "must be a string CIDR such as \"10.244.0.0/16\"",
                ))
            }
        };
        // Go's ParseCIDR masks the address; so do we.
        let network = network.trunc();
        let plen = network.prefix_len();

        let subnet_len = match get(obj, "SubnetLen") {
            None | Some(Value::Null) => 0,
            Some(v) => v
                .as_u64()
                .filter(|n| *n <= 32)
                .ok_or_else(|| field("SubnetLen", "must be a prefix length between 0 and 32, e.g. 24"))?
                as u8,
        };
        let subnet_len = if subnet_len > 0 {
            if subnet_len > 30 {
                return Err(field(
                    "SubnetLen",
                    format!("is /{subnet_len}; it must be /30 or shorter (less than /31)"),
                ));
            }
            if subnet_len < plen + 2 {
                return Err(field(
                    "SubnetLen",
                    format!(
                        "is /{subnet_len} but Network {network} must accommodate at least four subnets; \
                         use /{} or longer",
                        plen + 2
                    ),
                ));
            }
            subnet_len
        } else if plen > 28 {
            return Err(field(
                "Network",
                format!("{network} is too small; the minimum useful network prefix is /28"),
            ));
        } else if plen <= 22 {
            24
        } else {
            plen + 2
        };

        let size = 1u64 << (32 - subnet_len);
        let net_start = u32::from(network.network()) as u64;
        let net_end = net_start + (1u64 << (32 - plen)); // one past the last address
        let addr = |name: &'static str| -> Result<Option<Ipv4Addr>, ConfigError> {
            match get(obj, name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) => s.parse::<Ipv4Addr>().map(Some).map_err(|_| {
                    field(
                        name,
                        format!("{s:?} is not an IPv4 address; use e.g. \"10.244.1.0\""),
                    )
                }),
                Some(_) => Err(field(
                    name,
                    "must be a string IPv4 address such as \"10.244.1.0\"",
                )),
            }
        };
        let in_net = |a: Ipv4Addr| network.contains(&a);
        let subnet_min = match addr("SubnetMin")? {
            None | Some(Ipv4Addr::UNSPECIFIED) => Ipv4Addr::from((net_start + size) as u32),
            Some(a) if !in_net(a) => {
                return Err(field(
                    "SubnetMin",
                    format!("{a} is not in the range of the Network {network}"),
                ))
            }
            Some(a) => a,
        };
        let subnet_max = match addr("SubnetMax")? {
            None | Some(Ipv4Addr::UNSPECIFIED) => Ipv4Addr::from((net_end - size) as u32),
            Some(a) if !in_net(a) => {
                return Err(field(
                    "SubnetMax",
                    format!("{a} is not in the range of the Network {network}"),
                ))
            }
            Some(a) => a,
        };
        let mask = u32::MAX << (32 - subnet_len);
        if u32::from(subnet_min) & !mask != 0 {
            return Err(field(
                "SubnetMin",
                format!("{subnet_min} is not on a SubnetLen (/{subnet_len}) boundary"),
            ));
        }
        if u32::from(subnet_max) & !mask != 0 {
            return Err(field(
                "SubnetMax",
                format!("{subnet_max} is not on a SubnetLen (/{subnet_len}) boundary"),
            ));
        }
        if subnet_min > subnet_max {
            return Err(field(
                "SubnetMin",
                format!("{subnet_min} is above SubnetMax {subnet_max}"),
            ));
        }

        let backend = parse_backend(get(obj, "Backend"))?;
        Ok(NetworkConfig {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            backend,
        })
    }

    /// Whether `sn` may be leased under this config (flannel's `isSubnetConfigCompat`).
    pub fn is_compatible(&self, sn: Ipv4Net) -> bool {
        sn.prefix_len() == self.subnet_len
            && sn.network() == sn.addr()
            && sn.network() >= self.subnet_min
            && sn.network() <= self.subnet_max
    }

    /// Every leasable subnet, in order.
    pub fn subnets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        let size = 1u64 << (32 - self.subnet_len);
        let (lo, hi) = (
            u32::from(self.subnet_min) as u64,
            u32::from(self.subnet_max) as u64,
        );
        (lo..=hi)
            .step_by(size as usize)
            .map(move |a| Ipv4Net::new(Ipv4Addr::from(a as u32), self.subnet_len).expect("valid prefix"))
    }

    /// The pod MTU: `Backend.MTU` if set, else the underlay MTU minus VXLAN overhead.
    pub fn mtu(&self, iface_mtu: u32) -> u32 {
        self.backend
            .mtu
            .unwrap_or(iface_mtu.saturating_sub(VXLAN_OVERHEAD))
    }
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
    let has_type = match get(obj, "Type") {
        None | Some(Value::Null) => false,
        Some(Value::String(t)) if t.eq_ignore_ascii_case("vxlan") => true,
        Some(Value::String(t)) => {
            return Err(field(
                "Backend.Type",
                format!("is {t:?} but this agent implements only the vxlan backend; set Backend.Type to \"vxlan\" or run flanneld for {t:?}"),
            ))
        }
        Some(_) => return Err(field("Backend.Type", "must be the string \"vxlan\"")),
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
    if !has_type {
        let problem = if matches!(v, None | Some(Value::Null)) {
            // flanneld: no Backend means its udp backend.
            "is missing: without a Backend flanneld uses its udp backend, which this agent does not \
             implement; add \"Backend\": {\"Type\": \"vxlan\"} to the network config"
        } else {
            "is missing (flanneld would refuse the config too); set it: \"Backend\": {\"Type\": \"vxlan\"}"
        };
        return Err(field("Backend.Type", problem));
    }
    Ok(BackendConfig {
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

    fn ip(s: &str) -> Ipv4Addr {
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
            assert_eq!(c.network, net.parse::<Ipv4Net>().unwrap(), "{json}");
            assert_eq!(c.subnet_len, len, "{json}");
            assert_eq!(c.subnet_min, ip(min), "{json}");
            assert_eq!(c.subnet_max, ip(max), "{json}");
        }
        let c = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(
            c.backend,
            BackendConfig {
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
                vni: 42,
                port: 4789,
                mtu: Some(1400),
                direct_routing: true
            }
        );
        assert_eq!(c.mtu(9000), 1400);
        assert_eq!(c.subnets().count(), 255);
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
            (r#"{"Network":"10.0.0.0/16","EnableIPv4":false}"#, "config field EnableIPv4: is false, but this agent supports IPv4 only; remove EnableIPv4 or set it to true"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"Type":"host-gw"}}"#, "config field Backend.Type: is \"host-gw\" but this agent implements only the vxlan backend; set Backend.Type to \"vxlan\" or run flanneld for \"host-gw\""),
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
}
