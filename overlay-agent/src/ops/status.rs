//! `overlay-agent status`: what the pinned maps say, whether the agent runs or not.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::maps::{Array, LpmTrie, Map, MapData};
use ipnet::Ipv4Net;
use overlay_common::{
    maps::{self, CONFIG_READY},
    Counter, DataplaneConfig, Peer,
};
use serde::Serialize;

use crate::{dataplane, lease::MacAddr};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "no pinned map {path}: the agent has not run on this node with --pin-root {pin_root} \
         (or `overlay-agent cleanup` removed it)"
    )]
    NotPinned { path: PathBuf, pin_root: PathBuf },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    Counters(#[from] dataplane::DataplaneError),
}

/// This node's settings as the datapath sees them (`OVL_CONFIG`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeView {
    /// False until the agent has written the config.
    pub ready: bool,
    pub public_ip: Ipv4Addr,
    pub vni: u32,
    pub port: u16,
    pub vtep_mac: String,
    pub underlay_ifindex: u32,
    pub inner_mtu: u32,
}

/// One remote subnet (`OVL_PEERS`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerView {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    pub vtep_mac: String,
    /// `encap` (VXLAN) or `direct` (DirectRouting, same L2 segment).
    pub mode: &'static str,
}

/// One pod on this node (`OVL_ENDPOINTS`): decap delivers its packets to `ifindex` directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointView {
    pub ip: Ipv4Addr,
    /// The pod's host-side veth.
    pub ifindex: u32,
    /// Its name, when it exists in the namespace `status` runs in.
    pub iface: Option<String>,
    /// The pod's MAC.
    pub mac: String,
    /// The bridge's MAC (the source of delivered frames).
    pub gw_mac: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub pin_root: PathBuf,
    pub node: NodeView,
    pub peers: Vec<PeerView>,
    /// Local pods (empty when the pinned datapath has no endpoint map).
    pub endpoints: Vec<EndpointView>,
    /// Counter name → value summed over CPUs.
    pub counters: BTreeMap<&'static str, u64>,
}

fn open(pin_root: &Path, name: &'static str) -> Result<MapData, StatusError> {
    let path = pin_root.join(name);
    if !path.exists() {
        return Err(StatusError::NotPinned {
            path,
            pin_root: pin_root.to_path_buf(),
        });
    }
    MapData::from_pin(&path).map_err(|source| StatusError::Map { name, source })
}

/// Reads `OVL_CONFIG`, `OVL_PEERS`, `OVL_ENDPOINTS` and `OVL_COUNTERS` under `pin_root`.
pub fn read(pin_root: &Path) -> Result<Status, StatusError> {
    let err = |name| move |source| StatusError::Map { name, source };

    let config = Array::<MapData, DataplaneConfig>::try_from(Map::Array(open(pin_root, maps::CONFIG)?))
        .map_err(err(maps::CONFIG))?;
    let c = config.get(&0, 0).map_err(err(maps::CONFIG))?;
    let node = NodeView {
        ready: c.flags & CONFIG_READY != 0,
        public_ip: c.public_ip.into(),
        vni: c.vni,
        port: c.port,
        vtep_mac: MacAddr(c.vtep_mac).to_string(),
        underlay_ifindex: c.underlay_ifindex,
        inner_mtu: c.inner_mtu,
    };

    let trie = LpmTrie::<MapData, [u8; 4], Peer>::try_from(Map::LpmTrie(open(pin_root, maps::PEERS)?))
        .map_err(err(maps::PEERS))?;
    let peers = dataplane::peer_entries(&trie)?
        .into_iter()
        .map(|p| PeerView {
            subnet: p.subnet,
            public_ip: p.public_ip,
            vtep_mac: MacAddr(p.vtep_mac).to_string(),
            mode: if p.direct { "direct" } else { "encap" },
        })
        .collect();

    // A datapath pinned by an older release has no endpoint map.
    let endpoints = if pin_root.join(maps::ENDPOINTS).exists() {
        dataplane::read_pinned_endpoints(pin_root)?
            .into_iter()
            .map(|e| EndpointView {
                ip: e.ip,
                ifindex: e.ifindex,
                iface: nix::net::if_::if_indextoname(e.ifindex)
                    .ok()
                    .map(|n| n.to_string_lossy().into_owned()),
                mac: MacAddr(e.mac).to_string(),
                gw_mac: MacAddr(e.gw_mac).to_string(),
            })
            .collect()
    } else {
        Vec::new()
    };

    if !pin_root.join(maps::COUNTERS).exists() {
        return Err(StatusError::NotPinned {
            path: pin_root.join(maps::COUNTERS),
            pin_root: pin_root.to_path_buf(),
        });
    }
    let counters = dataplane::read_pinned_counters(pin_root)?;
    let counters = Counter::ALL
        .iter()
        .map(|c| (c.name(), counters.get(*c)))
        .collect();
    Ok(Status {
        pin_root: pin_root.to_path_buf(),
        node,
        peers,
        endpoints,
        counters,
    })
}

impl Status {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("Status always serializes")
    }

    /// Human-readable form.
    pub fn render(&self) -> String {
        let n = &self.node;
        let mut s = String::new();
        let _ = writeln!(s, "pin root    {}", self.pin_root.display());
        if n.ready {
            let _ = writeln!(
                s,
                "node        PublicIP {}  VNI {}  port {}  VtepMAC {}  inner MTU {}",
                n.public_ip, n.vni, n.port, n.vtep_mac, n.inner_mtu
            );
        } else {
            let _ = writeln!(
                s,
                "node        not configured yet (the agent has not written OVL_CONFIG)"
            );
        }
        let _ = writeln!(s, "\npeers ({})", self.peers.len());
        if !self.peers.is_empty() {
            let _ = writeln!(s, "  {:<20} {:<16} {:<18} mode", "subnet", "PublicIP", "VtepMAC");
        }
        for p in &self.peers {
            let _ = writeln!(
                s,
                "  {:<20} {:<16} {:<18} {}",
                p.subnet.to_string(),
                p.public_ip.to_string(),
                p.vtep_mac,
                p.mode
            );
        }
        let _ = writeln!(s, "\nlocal endpoints ({})", self.endpoints.len());
        if !self.endpoints.is_empty() {
            let _ = writeln!(s, "  {:<16} {:<24} mac", "ip", "veth");
        }
        for e in &self.endpoints {
            let veth = match &e.iface {
                Some(name) => format!("{name} ({})", e.ifindex),
                None => e.ifindex.to_string(),
            };
            let _ = writeln!(s, "  {:<16} {:<24} {}", e.ip.to_string(), veth, e.mac);
        }
        let _ = writeln!(s, "\ncounters");
        for c in Counter::ALL {
            let v = self.counters.get(c.name()).copied().unwrap_or(0);
            let _ = writeln!(s, "  {:<22} {v}", c.name());
        }
        s
    }
}
