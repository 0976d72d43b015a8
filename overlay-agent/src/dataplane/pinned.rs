//! Read-only views of the pinned maps and links, for `status`, `cleanup`, `/metrics` and
//! tests: they work whether the agent runs or not, and never write.

use std::{net::IpAddr, path::Path};

use aya::{
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap},
    programs::{
        links::{FdLink, LinkType, PinnedLink},
        tc, SchedClassifier, TcAttachType,
    },
};
use overlay_common::{counters::COUNTER_COUNT, maps, DataplaneConfig, DataplaneConfig6, Endpoint, PeerStats};

use super::{Counters, DataplaneError, LocalEndpoint, MapFamily, PeerEntry};
use crate::family::{V4, V6};

/// A pinned map, or [`DataplaneError::NotPinned`] when there is none.
pub(super) fn open(pin_root: &Path, name: &'static str) -> Result<MapData, DataplaneError> {
    let path = pin_root.join(name);
    if !path.exists() {
        return Err(DataplaneError::NotPinned {
            path,
            pin_root: pin_root.to_path_buf(),
        });
    }
    MapData::from_pin(&path).map_err(|source| DataplaneError::Map { name, source })
}

/// Whether a map is pinned (a datapath pinned by an older release lacks the newer ones).
pub fn is_pinned(pin_root: &Path, name: &str) -> bool {
    pin_root.join(name).exists()
}

/// The node's settings (`OVL_CONFIG`).
pub fn read_config(pin_root: &Path) -> Result<DataplaneConfig, DataplaneError> {
    read_single(pin_root, maps::CONFIG)
}

/// The node's IPv6 settings (`OVL_CONFIG6`).
pub fn read_config6(pin_root: &Path) -> Result<DataplaneConfig6, DataplaneError> {
    read_single(pin_root, maps::CONFIG6)
}

/// The one entry of a pinned single-slot array map.
fn read_single<T: aya::Pod>(pin_root: &Path, name: &'static str) -> Result<T, DataplaneError> {
    let err = |source| DataplaneError::Map { name, source };
    let arr = Array::<MapData, T>::try_from(Map::Array(open(pin_root, name)?)).map_err(err)?;
    arr.get(&0, 0).map_err(err)
}

/// The remote subnets of family `F` in the pinned peer map.
pub fn read_peers<F: MapFamily>(pin_root: &Path) -> Result<Vec<PeerEntry<F>>, DataplaneError> {
    let trie = LpmTrie::<MapData, F::Key, F::Peer>::try_from(Map::LpmTrie(open(pin_root, F::PEERS)?))
        .map_err(|source| DataplaneError::Map {
            name: F::PEERS,
            source,
        })?;
    peer_entries(&trie)
}

/// Every remote subnet in a peer map, sorted by subnet. An entry removed between listing and
/// reading (the agent writes while `status` reads) is simply gone.
pub fn peer_entries<F: MapFamily, T: std::borrow::Borrow<MapData>>(
    trie: &LpmTrie<T, F::Key, F::Peer>,
) -> Result<Vec<PeerEntry<F>>, DataplaneError> {
    let mut out = Vec::new();
    for key in trie.keys() {
        let key = key.map_err(|source| DataplaneError::Map {
            name: F::PEERS,
            source,
        })?;
        let Ok(p) = trie.get(&key, 0) else { continue };
        let Ok(len) = u8::try_from(key.prefix_len()) else {
            continue;
        };
        if len > F::BITS {
            continue;
        }
        out.push(PeerEntry::from_value(F::net(F::from_key(key.data()), len), &p));
    }
    out.sort_by_key(|p| p.subnet);
    Ok(out)
}

/// Every local pod in an endpoint map, sorted by address. Entries removed while reading are gone.
pub fn endpoint_entries<F: MapFamily, T: std::borrow::Borrow<MapData>>(
    map: &HashMap<T, F::Key, Endpoint>,
) -> Vec<LocalEndpoint<F>> {
    let mut out: Vec<LocalEndpoint<F>> = map
        .iter()
        .flatten()
        .map(|(ip, e)| LocalEndpoint {
            ip: F::from_key(ip),
            ifindex: e.ifindex,
            mac: e.mac,
            gw_mac: e.gw_mac,
        })
        .collect();
    out.sort_by_key(|e| e.ip);
    out
}

/// Local pods of family `F` from a pinned endpoint map (works whether the agent runs or not).
pub fn read_pinned_endpoints<F: MapFamily>(pin_root: &Path) -> Result<Vec<LocalEndpoint<F>>, DataplaneError> {
    let err = |source| DataplaneError::Map {
        name: F::ENDPOINTS,
        source,
    };
    let data = MapData::from_pin(pin_root.join(F::ENDPOINTS)).map_err(err)?;
    let map = Map::HashMap(data);
    let eps: HashMap<&MapData, F::Key, Endpoint> = HashMap::try_from(&map).map_err(err)?;
    Ok(endpoint_entries(&eps))
}

/// Counters from a pinned map (works whether the agent runs or not).
pub fn read_pinned_counters(pin_root: &Path) -> Result<Counters, DataplaneError> {
    read_counters(&Map::PerCpuArray(open(pin_root, maps::COUNTERS)?))
}

pub(super) fn read_counters(map: &Map) -> Result<Counters, DataplaneError> {
    let arr: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(map).map_err(|source| DataplaneError::Map {
            name: maps::COUNTERS,
            source,
        })?;
    let mut out = Vec::with_capacity(COUNTER_COUNT as usize);
    // A map pinned by an older release may have fewer slots: its missing counters read 0.
    let slots = arr.len().min(COUNTER_COUNT);
    for i in 0..slots {
        let v = arr.get(&i, 0).map_err(|source| DataplaneError::Map {
            name: maps::COUNTERS,
            source,
        })?;
        out.push(v.iter().sum());
    }
    out.resize(COUNTER_COUNT as usize, 0);
    Ok(Counters(out))
}

/// Removes every pin under `pin_root` and the directory itself. Missing is fine.
pub fn remove_pins(pin_root: &Path) -> Result<(), DataplaneError> {
    match std::fs::remove_dir_all(pin_root) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DataplaneError::Unpin {
            path: pin_root.display().to_string(),
            source,
        }),
    }
}

/// What a pinned link is (the ids are `None` when it cannot be read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// `xdp`, `tcx`, another link type in lower case, or `unknown`.
    pub hook: String,
    pub link_id: Option<u32>,
    pub program_id: Option<u32>,
}

/// What the link pinned at `path` is.
pub fn link_info(path: &Path) -> LinkInfo {
    let info = PinnedLink::from_pin(path)
        .ok()
        .and_then(|l| FdLink::from(l).info().ok());
    let hook = match info.as_ref().map(|i| i.link_type()) {
        Some(Ok(LinkType::Xdp)) => "xdp".to_string(),
        Some(Ok(LinkType::Tcx)) => "tcx".to_string(),
        Some(Ok(other)) => format!("{other:?}").to_lowercase(),
        Some(Err(_)) | None => "unknown".to_string(),
    };
    LinkInfo {
        hook,
        link_id: info.as_ref().map(|i| i.id()),
        program_id: info.as_ref().map(|i| i.program_id()),
    }
}

/// The kernel's name for program `id` (empty if it is gone).
pub fn program_name(id: u32) -> String {
    aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The TCX programs on `iface`'s ingress (or egress): (program id, name); empty when the hook
/// cannot be queried.
pub fn tcx_programs(iface: &str, ingress: bool) -> Vec<(u32, String)> {
    let at = if ingress {
        TcAttachType::Ingress
    } else {
        TcAttachType::Egress
    };
    SchedClassifier::query_tcx(iface, at)
        .map(|(_, progs)| {
            progs
                .iter()
                .map(|p| (p.id(), p.name_as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Detaches the netlink TC filter named `name` from `iface`'s ingress (or egress): `Ok(true)`
/// when one was there, `Ok(false)` when not (no clsact qdisc, or no such filter).
pub fn detach_tc_filter(iface: &str, ingress: bool, name: &str) -> Result<bool, tc::TcError> {
    let at = if ingress {
        TcAttachType::Ingress
    } else {
        TcAttachType::Egress
    };
    match tc::qdisc_detach_program(iface, at, name) {
        Ok(()) => Ok(true),
        Err(tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        // No clsact qdisc: nothing of ours there.
        Err(tc::TcError::NetlinkError(e))
            if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// The sender table of family `F` from its pinned map (`OVL_VTEPS`, `OVL_VTEPS6`): each member
/// PublicIP and the subnet decap accepts inner sources from, sorted. Works whether the agent
/// runs or not; an entry removed while reading is gone.
pub fn read_senders<F: MapFamily>(pin_root: &Path) -> Result<Vec<super::SenderEntry<F>>, DataplaneError> {
    let err = |source| DataplaneError::Map {
        name: F::VTEPS,
        source,
    };
    let map = Map::HashMap(open(pin_root, F::VTEPS)?);
    let vteps: HashMap<&MapData, F::Key, F::Vtep> = HashMap::try_from(&map).map_err(err)?;
    let mut out = Vec::new();
    for (ip, v) in vteps.iter().flatten() {
        let (net, len) = F::vtep_fields(&v);
        if len <= F::BITS {
            out.push((F::from_key(ip), F::net(F::from_key(net), len)));
        }
    }
    out.sort();
    Ok(out)
}

/// The ifindex the pinned device map of family `F` (`OVL_ENDPOINT_DEVS`, `OVL_ENDPOINT_DEVS6`)
/// holds for the endpoint `ip` on veth `ifindex` (the key decap looks up), `None` when it has
/// no entry (the kernel deletes entries of removed devices) or the map cannot be read.
pub fn endpoint_device<F: MapFamily>(pin_root: &Path, ip: F::Addr, ifindex: u32) -> Option<u32> {
    let map = Map::DevMapHash(open(pin_root, F::ENDPOINT_DEVS).ok()?);
    let devs: aya::maps::DevMapHash<&MapData> = aya::maps::DevMapHash::try_from(&map).ok()?;
    devs.get(F::dev_key(ip, ifindex), 0).ok().map(|v| v.if_index)
}

/// Members' traffic counts: (PublicIP, the counts summed over CPUs).
pub type MemberStats<A> = Vec<(A, PeerStats)>;

/// Each member's traffic counts in family `F`'s pinned `OVL_PEER_STATS` table, the per-CPU
/// values summed ([`sum_per_cpu`]), sorted by PublicIP. `None` when the table is not pinned
/// (a datapath pinned by a release before per-peer counts): no stats, not an error. An entry
/// removed between listing and reading (the agent removes a member) is simply gone.
pub fn read_peer_stats<F: MapFamily>(
    pin_root: &Path,
) -> Result<Option<MemberStats<F::Addr>>, DataplaneError> {
    if !is_pinned(pin_root, F::PEER_STATS) {
        return Ok(None);
    }
    let err = |source| DataplaneError::Map {
        name: F::PEER_STATS,
        source,
    };
    let map = Map::PerCpuHashMap(open(pin_root, F::PEER_STATS)?);
    let stats: PerCpuHashMap<&MapData, F::Key, PeerStats> = PerCpuHashMap::try_from(&map).map_err(err)?;
    let mut out = Vec::new();
    for key in stats.keys() {
        let key = key.map_err(err)?;
        let Ok(per_cpu) = stats.get(&key, 0) else { continue };
        out.push((F::from_key(key), sum_per_cpu(per_cpu.iter())));
    }
    out.sort_by_key(|(ip, _)| *ip);
    Ok(Some(out))
}

/// Every member's summed counts, IPv4 PublicIPs then IPv6 ones; `None` when neither table is
/// pinned (see [`read_peer_stats`]).
pub fn read_member_stats(pin_root: &Path) -> Result<Option<MemberStats<IpAddr>>, DataplaneError> {
    let v4 = read_peer_stats::<V4>(pin_root)?;
    let v6 = read_peer_stats::<V6>(pin_root)?;
    if v4.is_none() && v6.is_none() {
        return Ok(None);
    }
    let v4 = v4.into_iter().flatten().map(|(ip, s)| (IpAddr::V4(ip), s));
    let v6 = v6.into_iter().flatten().map(|(ip, s)| (IpAddr::V6(ip), s));
    Ok(Some(v4.chain(v6).collect()))
}

/// One member's counts from its per-CPU values: counts add up, a last-seen time is the latest
/// any CPU recorded (0, never, only when every CPU says never).
pub fn sum_per_cpu<'a>(values: impl IntoIterator<Item = &'a PeerStats>) -> PeerStats {
    values.into_iter().fold(PeerStats::default(), |a, v| PeerStats {
        tx_packets: a.tx_packets.wrapping_add(v.tx_packets),
        tx_bytes: a.tx_bytes.wrapping_add(v.tx_bytes),
        rx_packets: a.rx_packets.wrapping_add(v.rx_packets),
        rx_bytes: a.rx_bytes.wrapping_add(v.rx_bytes),
        tx_last_ns: a.tx_last_ns.max(v.tx_last_ns),
        rx_last_ns: a.rx_last_ns.max(v.rx_last_ns),
        tx_drops: a.tx_drops.wrapping_add(v.tx_drops),
        rx_drops: a.rx_drops.wrapping_add(v.rx_drops),
    })
}

/// Now on the clock the programs stamp `PeerStats::tx_last_ns`/`rx_last_ns` with
/// (`bpf_ktime_get_coarse_ns`: CLOCK_MONOTONIC_COARSE), in ns.
pub fn coarse_now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

/// Now on CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns` (drop events, the monitor's lease).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// `clock`'s time in ns.
fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; both clocks exist on every Linux the agent
    // runs on (2.6.32+), so the call cannot fail.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_cpu_counts_add_up_and_last_seen_is_the_latest() {
        let cpu0 = PeerStats {
            tx_packets: 3,
            tx_bytes: 300,
            rx_packets: 0,
            rx_bytes: 0,
            tx_last_ns: 5_000,
            rx_last_ns: 0,
            tx_drops: 1,
            rx_drops: 0,
        };
        let cpu1 = PeerStats {
            tx_packets: 4,
            tx_bytes: 410,
            rx_packets: 2,
            rx_bytes: 196,
            tx_last_ns: 4_000,
            rx_last_ns: 7_000,
            tx_drops: 0,
            rx_drops: 5,
        };
        let sum = sum_per_cpu([&cpu0, &cpu1, &PeerStats::default()]);
        assert_eq!(
            sum,
            PeerStats {
                tx_packets: 7,
                tx_bytes: 710,
                rx_packets: 2,
                rx_bytes: 196,
                tx_last_ns: 5_000,
                rx_last_ns: 7_000,
                tx_drops: 1,
                rx_drops: 5,
            }
        );
        assert_eq!(sum_per_cpu([]), PeerStats::default(), "no CPU: never, nothing");
    }

    #[test]
    fn the_coarse_clock_is_monotonic_and_near_the_fine_one() {
        let fine = std::time::Instant::now();
        let a = coarse_now_ns();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let b = coarse_now_ns();
        let around = fine.elapsed().as_nanos() as u64;
        assert!(a > 0 && b > a, "coarse clock {a} then {b}");
        // At least the 30 ms slept between the reads, at most what passed around them, give or
        // take one tick of the coarse clock (a jiffy: at most 10 ms at HZ=100).
        const TICK: u64 = 10_000_000;
        assert!(
            b - a + TICK >= 30_000_000 && b - a <= around + TICK,
            "coarse clock moved {} ns over a 30 ms sleep ({around} ns around it)",
            b - a
        );
    }

    #[test]
    fn a_datapath_without_the_table_has_no_stats() {
        let dir = std::env::temp_dir().join(format!("ovl-nostats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let got = read_peer_stats::<V4>(&dir);
        let all = read_member_stats(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(got, Ok(None)), "{got:?}");
        assert!(matches!(all, Ok(None)), "{all:?}");
    }
}
