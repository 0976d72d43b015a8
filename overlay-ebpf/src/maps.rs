//! Every map of the datapath, in one place. Names, key and value layouts are the agent's too
//! (`overlay_common::maps`): the agent pins these maps and adopts them across upgrades, so a
//! renamed or reshaped map breaks a running node's upgrade.
//!
//! | map            | type          | key                    | value             | written by |
//! |----------------|---------------|------------------------|-------------------|------------|
//! | `OVL_CONFIG`   | array[1]      | 0                      | `DataplaneConfig` | agent      |
//! | `OVL_PEERS`    | LPM trie      | remote pod subnet      | `Peer`            | agent      |
//! | `OVL_VTEPS`    | hash          | peer PublicIP          | `Vtep`            | agent      |
//! | `OVL_ENDPOINTS`| hash          | local pod IPv4         | `Endpoint`        | agent      |
//! | `OVL_ENDPOINT_DEVS` | devmap hash | local pod IPv4   | veth ifindex      | agent; kernel removes gone devices |
//! | `OVL_COUNTERS` | per-CPU array | `Counter` index        | `u64`             | programs   |
//! | `OVL_CONFIG6`  | array[1]      | 0                      | `DataplaneConfig6`| agent      |
//! | `OVL_PEERS6`   | LPM trie      | remote IPv6 pod subnet | `Peer6`           | agent      |
//! | `OVL_VTEPS6`   | hash          | peer PublicIPv6        | `Vtep6`           | agent      |
//! | `OVL_SCRATCH`  | per-CPU array[1] | 0                   | 512 bytes         | programs (scratch) |
//! | `OVL_ENDPOINTS6` | hash        | local pod IPv6         | `Endpoint`        | agent      |
//! | `OVL_ENDPOINT_DEVS6` | devmap hash | veth ifindex       | veth ifindex      | agent; kernel removes gone devices |
//! | `OVL_STACK_FLOWS` | LRU hash   | a reply's 5-tuple      | first seen (ns)   | encap on `overlay0`'s egress |
//! | `OVL_STACK_FLOWS6` | LRU hash  | a reply's IPv6 5-tuple | first seen (ns)   | encap on `overlay0`'s egress |
//! | `OVL_PEER_STATS` | per-CPU hash | member PublicIP      | `PeerStats`       | agent adds/removes entries; programs count |
//! | `OVL_PEER_STATS6` | per-CPU hash | member PublicIPv6   | `PeerStats`       | agent adds/removes entries; programs count |
//! | `OVL_MONITOR`  | array[1]      | 0                      | `MonitorConfig`   | `overlay-agent monitor` |
//! | `OVL_MONITOR_STATE` | per-CPU array[1] | 0              | `RateState`       | programs (rate limit) |
//! | `OVL_EVENTS`   | ring buffer   | —                      | `DropEvent`       | programs (drops, while a monitor runs) |
//!
//! Who reads them: encap (`encap.rs`) the config, peers and stack flows; decap (`decap.rs`) the
//! config and VTEPs; delivery (`deliver.rs`) the endpoints and their device maps; the conntrack
//! rules (`conntrack.rs`) the stack flows; the IPv6 outer checksum (`csum6.rs`) the scratch;
//! the per-peer counts and drop reports (`observe.rs`) the peer stats and the monitor's maps.

use aya_ebpf::{
    btf_maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    macros::btf_map,
};
use overlay_common::{
    counters::COUNTER_SLOTS,
    maps::{StackFlow, StackFlow6, MAX_ENDPOINTS, MAX_PEERS, MAX_STACK_FLOWS},
    monitor::{DropEvent, MonitorConfig, RateState, RING_BYTES},
    DataplaneConfig, DataplaneConfig6, Endpoint, Peer, Peer6, PeerStats, Vtep, Vtep6,
};

/// `BPF_F_NO_PREALLOC`: a per-CPU value is allocated when the agent adds a member, not
/// `MAX_PEERS` × CPUs of them up front.
const NO_PREALLOC: usize = 1;

#[btf_map]
pub(crate) static OVL_CONFIG: Array<DataplaneConfig, 1> = Array::new();
#[btf_map]
pub(crate) static OVL_PEERS: LpmTrie<[u8; 4], Peer, { MAX_PEERS as usize }> = LpmTrie::new();
#[btf_map]
pub(crate) static OVL_VTEPS: HashMap<[u8; 4], Vtep, { MAX_PEERS as usize }> = HashMap::new();
#[btf_map]
pub(crate) static OVL_ENDPOINTS: HashMap<[u8; 4], Endpoint, { MAX_ENDPOINTS as usize }> = HashMap::new();
#[btf_map]
pub(crate) static OVL_ENDPOINT_DEVS: DevMapHash<{ MAX_ENDPOINTS as usize }> = DevMapHash::new();
#[btf_map]
pub(crate) static OVL_COUNTERS: PerCpuArray<u64, { COUNTER_SLOTS as usize }> = PerCpuArray::new();
#[btf_map]
pub(crate) static OVL_CONFIG6: Array<DataplaneConfig6, 1> = Array::new();
#[btf_map]
pub(crate) static OVL_PEERS6: LpmTrie<[u8; 16], Peer6, { MAX_PEERS as usize }> = LpmTrie::new();
#[btf_map]
pub(crate) static OVL_VTEPS6: HashMap<[u8; 16], Vtep6, { MAX_PEERS as usize }> = HashMap::new();
/// Per-CPU scratch memory for what does not fit on the 512-byte BPF stack (IPv6 encap sums packet
/// bytes through it).
#[btf_map]
pub(crate) static OVL_SCRATCH: PerCpuArray<[u32; SCRATCH_BYTES / 4], 1> = PerCpuArray::new();
pub(crate) const SCRATCH_BYTES: usize = 512;
#[btf_map]
pub(crate) static OVL_ENDPOINTS6: HashMap<[u8; 16], Endpoint, { MAX_ENDPOINTS as usize }> = HashMap::new();
/// Keyed by the veth's ifindex (`endpoint6_dev_key`): one entry per pod, whatever its addresses.
#[btf_map]
pub(crate) static OVL_ENDPOINT_DEVS6: DevMapHash<{ MAX_ENDPOINTS as usize }> = DevMapHash::new();
/// Replies of flows the stack routed out through `overlay0` (see `conntrack.rs`).
#[btf_map]
pub(crate) static OVL_STACK_FLOWS: LruHashMap<StackFlow, u64, { MAX_STACK_FLOWS as usize }> =
    LruHashMap::new();
#[btf_map]
pub(crate) static OVL_STACK_FLOWS6: LruHashMap<StackFlow6, u64, { MAX_STACK_FLOWS as usize }> =
    LruHashMap::new();
/// Traffic per member (see `observe.rs`); entries exist exactly for the members.
#[btf_map]
pub(crate) static OVL_PEER_STATS: PerCpuHashMap<[u8; 4], PeerStats, { MAX_PEERS as usize }, NO_PREALLOC> =
    PerCpuHashMap::new();
#[btf_map]
pub(crate) static OVL_PEER_STATS6: PerCpuHashMap<[u8; 16], PeerStats, { MAX_PEERS as usize }, NO_PREALLOC> =
    PerCpuHashMap::new();
/// What an attached monitor wants reported (read on the drop path only).
#[btf_map]
pub(crate) static OVL_MONITOR: Array<MonitorConfig, 1> = Array::new();
#[btf_map]
pub(crate) static OVL_MONITOR_STATE: PerCpuArray<RateState, 1> = PerCpuArray::new();
#[btf_map]
pub(crate) static OVL_EVENTS: RingBuf<DropEvent, { RING_BYTES as usize }> = RingBuf::new();
