//! Thousands of fake nodes for the scale test and the control-plane bench: their leases written
//! to etcd through its v3 JSON gateway (transactions of 100 puts, plain HTTP, no extra crates),
//! the agent's pinned maps read back in-process through `/proc/<agent>/root/<pin root>` (which
//! resolves inside the agent's own mount namespace), and a steady churn of lease changes with
//! the time each one takes to reach the map.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::maps::{lpm_trie::Key, HashMap as BpfHashMap, LpmTrie, Map, MapData};
use ipnet::Ipv4Net;
use overlay_common::{maps::Vtep, Peer};

use crate::{
    cluster::{ETCD_IP, NETWORK_PREFIX},
    netns::{parse_mac, Netns},
};

/// 10.244.0.0/16 in /29s: 8,192 subnets, room for 5,000 peers, the latency probes, the churn's
/// fresh subnets and the agent's own lease (and inside the project's pod range).
pub const CONFIG: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":29,"Backend":{"Type":"vxlan"}}"#;
const NETWORK: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 0);
const SUBNET_LEN: u8 = 29;
/// Slots on the grid: every /29 but the first, which is below flanneld's default SubnetMin.
pub const SLOTS: u32 = (1 << (SUBNET_LEN - 16)) - 1;

/// What the map says about one remote subnet (and what etcd says it should): PublicIP, VtepMAC.
pub type PeerView = (Ipv4Addr, [u8; 6]);

/// Fake node `slot`'s subnet: the (slot+1)-th /29 of 10.244.0.0/16.
pub fn subnet(slot: u32) -> Ipv4Net {
    assert!(slot < SLOTS, "slot {slot} is past the grid");
    let addr = Ipv4Addr::from(u32::from(NETWORK) + ((slot + 1) << (32 - SUBNET_LEN)));
    Ipv4Net::new(addr, SUBNET_LEN).expect("a /29")
}

/// `n` slots from `from` on, leaving out the one whose subnet is the agent's own.
pub fn slots(from: u32, n: usize, own: Option<Ipv4Net>) -> Vec<u32> {
    (from..SLOTS)
        .filter(|&s| Some(subnet(s)) != own)
        .take(n)
        .collect()
}

/// Fake node `slot`'s lease in its `generation` (a node that moved gets a new PublicIP and
/// VtepMAC): PublicIPs are distinct across all slots and generations 0..15, inside
/// 198.18.0.0/15 and above 198.18.0.0/24 (where the test's real nodes and etcd are).
pub fn peer(slot: u32, generation: u32) -> FakePeer {
    let k = slot + 8192 * (generation % 15);
    let ip = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (1 + k / 250) * 256 + 1 + k % 250;
    FakePeer {
        subnet: subnet(slot),
        public_ip: Ipv4Addr::from(ip),
        vtep_mac: [
            0x0e,
            0,
            (generation % 15) as u8,
            (slot >> 16) as u8,
            (slot >> 8) as u8,
            slot as u8,
        ],
    }
}

/// One fake node's vxlan lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FakePeer {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    pub vtep_mac: [u8; 6],
}

impl FakePeer {
    pub fn key(&self) -> String {
        subnet_key(self.subnet)
    }

    /// flannel's LeaseAttrs JSON.
    pub fn value(&self) -> String {
        let m = self.vtep_mac;
        format!(
            r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}"}}}}"#,
            self.public_ip, m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }

    pub fn view(&self) -> PeerView {
        (self.public_ip, self.vtep_mac)
    }
}

pub fn subnet_key(subnet: Ipv4Net) -> String {
    format!(
        "{NETWORK_PREFIX}/subnets/{}-{}",
        subnet.network(),
        subnet.prefix_len()
    )
}

/// Minimal base64 (standard alphabet, padded) for the etcd JSON gateway.
fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unb64(s: &str) -> Result<Vec<u8>> {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = A.iter().position(|&a| a == c).context("not base64")? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

/// An HTTP/1.1 chunked body, joined.
fn dechunk(mut s: &str) -> Result<String> {
    let mut out = String::with_capacity(s.len());
    loop {
        let (size, rest) = s.split_once("\r\n").context("chunk size line")?;
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("chunk size {size:?}"))?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..n).context("chunk shorter than its size")?);
        s = rest.get(n + 2..).context("chunk without its line end")?;
    }
}

/// etcd's v3 JSON gateway, reached from inside the underlay namespace (a fresh connection per
/// request, made there; the calling thread stays where it is).
pub struct Gateway<'a> {
    pub ns: &'a Netns,
}

impl Gateway<'_> {
    pub fn post(&self, path: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
        let mut s = {
            let _in = self.ns.enter()?;
            TcpStream::connect((ETCD_IP, 2379)).context("connecting to etcd")?
        };
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let body = body.to_string();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: {ETCD_IP}:2379\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let (head, payload) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        if !head.starts_with("HTTP/1.1 200") {
            bail!("etcd {path}: {}", resp.chars().take(300).collect::<String>());
        }
        // Large answers (a range over thousands of leases) come chunked.
        let chunked = head
            .lines()
            .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding: chunked"));
        let body = if chunked {
            dechunk(payload)?
        } else {
            payload.to_string()
        };
        serde_json::from_str(body.trim()).with_context(|| format!("etcd {path}: not JSON: {:.300}", body))
    }

    fn put_op(p: &FakePeer) -> serde_json::Value {
        serde_json::json!({"requestPut": {"key": b64(p.key().as_bytes()), "value": b64(p.value().as_bytes())}})
    }

    /// Writes every lease, 100 to a transaction (etcd allows 128 operations in one).
    pub fn put_all(&self, peers: &[FakePeer]) -> Result<()> {
        for chunk in peers.chunks(100) {
            let ops: Vec<serde_json::Value> = chunk.iter().map(Self::put_op).collect();
            self.post("/v3/kv/txn", &serde_json::json!({ "success": ops }))?;
        }
        Ok(())
    }

    pub fn put(&self, p: &FakePeer) -> Result<()> {
        self.post("/v3/kv/put", &Self::put_op(p)["requestPut"])
            .map(|_| ())
    }

    pub fn delete(&self, subnet: Ipv4Net) -> Result<()> {
        let key = b64(subnet_key(subnet).as_bytes());
        self.post("/v3/kv/deleterange", &serde_json::json!({ "key": key }))
            .map(|_| ())
    }

    /// etcd's current revision.
    pub fn revision(&self) -> Result<i64> {
        let key = b64(format!("{NETWORK_PREFIX}/config").as_bytes());
        let r = self.post("/v3/kv/range", &serde_json::json!({ "key": key }))?;
        r["header"]["revision"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .context("no revision in etcd's answer")
    }

    /// Every vxlan lease in etcd but `own`'s, as the map should hold it.
    pub fn leases(&self, own: Option<Ipv4Net>) -> Result<BTreeMap<Ipv4Net, PeerView>> {
        let prefix = format!("{NETWORK_PREFIX}/subnets/");
        let mut end = prefix.clone().into_bytes();
        *end.last_mut().expect("non-empty") += 1;
        let r = self.post(
            "/v3/kv/range",
            &serde_json::json!({ "key": b64(prefix.as_bytes()), "range_end": b64(&end) }),
        )?;
        let mut out = BTreeMap::new();
        for kv in r["kvs"].as_array().into_iter().flatten() {
            let key = String::from_utf8(unb64(kv["key"].as_str().unwrap_or_default())?)?;
            let value: serde_json::Value =
                serde_json::from_slice(&unb64(kv["value"].as_str().unwrap_or_default())?)?;
            let subnet: Ipv4Net = key
                .strip_prefix(&prefix)
                .context("key outside the prefix")?
                .replace('-', "/")
                .parse()
                .with_context(|| format!("lease key {key}"))?;
            if Some(subnet) == own {
                continue;
            }
            let ip = value["PublicIP"].as_str().context("PublicIP")?.parse()?;
            let mac = parse_mac(value["BackendData"]["VtepMAC"].as_str().context("VtepMAC")?)?;
            out.insert(subnet, (ip, mac));
        }
        Ok(out)
    }
}

/// An agent's pinned IPv4 peer map and sender table.
pub struct PinnedPeers {
    peers: LpmTrie<MapData, [u8; 4], Peer>,
    senders: BpfHashMap<MapData, [u8; 4], Vtep>,
}

impl PinnedPeers {
    /// Opens the maps the agent `pid` pinned under `pin_root`, waiting up to `within` for them.
    pub fn open(pid: u32, pin_root: &str, within: Duration) -> Result<Self> {
        let deadline = Instant::now() + crate::slow(within);
        let open = |name: &str| {
            let path = format!("/proc/{pid}/root{pin_root}/{name}");
            MapData::from_pin(&path).with_context(|| format!("opening {path}"))
        };
        loop {
            match (
                open(overlay_common::maps::PEERS),
                open(overlay_common::maps::VTEPS),
            ) {
                (Ok(p), Ok(s)) => {
                    return Ok(PinnedPeers {
                        peers: LpmTrie::try_from(Map::LpmTrie(p))?,
                        senders: BpfHashMap::try_from(Map::HashMap(s))?,
                    })
                }
                (Err(e), _) | (_, Err(e)) if Instant::now() > deadline => return Err(e),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    pub fn len(&self) -> usize {
        self.peers.keys().filter(|k| k.is_ok()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, subnet: Ipv4Net) -> Option<PeerView> {
        let key = Key::new(u32::from(subnet.prefix_len()), subnet.network().octets());
        self.peers
            .get(&key, 0)
            .ok()
            .map(|p| (Ipv4Addr::from(p.public_ip), p.vtep_mac))
    }

    /// Every entry of the peer map.
    pub fn all(&self) -> BTreeMap<Ipv4Net, PeerView> {
        self.peers
            .iter()
            .filter_map(|e| e.ok())
            .filter_map(|(k, p)| {
                let net = Ipv4Net::new(Ipv4Addr::from(k.data()), k.prefix_len() as u8).ok()?;
                Some((net, (Ipv4Addr::from(p.public_ip), p.vtep_mac)))
            })
            .collect()
    }

    /// The PublicIPs in the sender table.
    pub fn senders(&self) -> BTreeSet<Ipv4Addr> {
        self.senders
            .keys()
            .filter_map(|k| k.ok())
            .map(Ipv4Addr::from)
            .collect()
    }

    /// What differs between the maps and `want` (subnet → PublicIP, VtepMAC): missing, stale
    /// and wrong peer entries, and sender entries not matching the PublicIPs; empty when equal.
    pub fn diff(&self, want: &BTreeMap<Ipv4Net, PeerView>) -> Vec<String> {
        let have = self.all();
        let mut out = Vec::new();
        for (s, v) in want {
            match have.get(s) {
                None => out.push(format!("missing {s}")),
                Some(h) if h != v => out.push(format!("{s}: map {h:?}, etcd {v:?}")),
                _ => {}
            }
        }
        out.extend(
            have.keys()
                .filter(|s| !want.contains_key(s))
                .map(|s| format!("stale {s}")),
        );
        let ips: BTreeSet<Ipv4Addr> = want.values().map(|v| v.0).collect();
        let senders = self.senders();
        out.extend(senders.difference(&ips).map(|ip| format!("stale sender {ip}")));
        out.extend(ips.difference(&senders).map(|ip| format!("missing sender {ip}")));
        out
    }
}

/// utime + stime of process `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = &text[text.rfind(')').context("no comm in stat")? + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

/// Resident memory of `pid`, in kB.
pub fn rss_kb(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

/// How long after a change the map is given before the change counts as never seen.
pub const UNSEEN_AFTER: Duration = Duration::from_secs(30);

/// What a churn measured: how many changes were written and how long each took to show in the
/// map (puts: the entry with the new PublicIP and VtepMAC; deletes: the entry gone, which
/// includes the agent's 500 ms hold-down), and the changes never seen within
/// [`UNSEEN_AFTER`].
#[derive(Debug, Default)]
pub struct ChurnStats {
    pub changes: u32,
    pub secs: f64,
    pub put_ms: Vec<f64>,
    pub delete_ms: Vec<f64>,
    pub unseen: Vec<String>,
}

/// Lease changes in turn: a live peer moves (new PublicIP and VtepMAC), a live peer's lease is
/// deleted, a new peer comes (a slot never used, or one deleted long ago).
pub struct Churn {
    /// Live slots and their generation.
    live: BTreeMap<u32, u32>,
    /// Slots free to come (the oldest deleted first).
    free: VecDeque<u32>,
    turn: u64,
}

/// A change written and not yet seen in the map.
struct Pending {
    subnet: Ipv4Net,
    want: Option<PeerView>,
    at: Instant,
}

impl Churn {
    /// Over the `live` slots (each in generation 0), with the `free` slots to add.
    pub fn new(live: &[u32], free: &[u32]) -> Self {
        Churn {
            live: live.iter().map(|&s| (s, 0)).collect(),
            free: free.iter().copied().collect(),
            turn: 0,
        }
    }

    /// The leases the churn left (what etcd should hold besides the agent's own).
    pub fn expected(&self) -> BTreeMap<Ipv4Net, PeerView> {
        self.live
            .iter()
            .map(|(&s, &g)| {
                let p = peer(s, g);
                (p.subnet, p.view())
            })
            .collect()
    }

    /// The next change: written to etcd, and what the map must then say about its subnet.
    fn step(&mut self, gw: &Gateway) -> Result<(Ipv4Net, Option<PeerView>)> {
        self.turn += 1;
        // Spread over the live slots: a slot is touched again only thousands of changes later.
        let pick = |live: &BTreeMap<u32, u32>, turn: u64| {
            let n = live.len() as u64;
            *live
                .keys()
                .nth(((turn * 2_654_435_761) % n) as usize)
                .expect("live slots")
        };
        match self.turn % 3 {
            0 => {
                let slot = pick(&self.live, self.turn);
                let g = self.live[&slot] + 1;
                let p = peer(slot, g);
                gw.put(&p)?;
                self.live.insert(slot, g);
                Ok((p.subnet, Some(p.view())))
            }
            1 => {
                let slot = pick(&self.live, self.turn);
                let subnet = subnet(slot);
                gw.delete(subnet)?;
                self.live.remove(&slot);
                self.free.push_back(slot);
                Ok((subnet, None))
            }
            _ => {
                let slot = self.free.pop_front().context("no free slot")?;
                let p = peer(slot, 0);
                gw.put(&p)?;
                self.live.insert(slot, 0);
                Ok((p.subnet, Some(p.view())))
            }
        }
    }

    /// `rate` changes a second for `secs`, each followed in `map` until it shows (or
    /// [`UNSEEN_AFTER`] passes); then waits for the last ones.
    pub fn run(&mut self, gw: &Gateway, map: &PinnedPeers, rate: u32, secs: f64) -> Result<ChurnStats> {
        let mut st = ChurnStats::default();
        let mut pending: Vec<Pending> = Vec::new();
        let tick = Duration::from_secs_f64(1.0 / f64::from(rate));
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs_f64(secs);
        let mut next = t0;
        let sweep = |pending: &mut Vec<Pending>, st: &mut ChurnStats| {
            pending.retain(|p| {
                if map.get(p.subnet) == p.want {
                    let ms = p.at.elapsed().as_secs_f64() * 1e3;
                    if p.want.is_some() {
                        &mut st.put_ms
                    } else {
                        &mut st.delete_ms
                    }
                    .push(ms);
                    return false;
                }
                if p.at.elapsed() > UNSEEN_AFTER {
                    st.unseen.push(format!("{} → {:?}", p.subnet, p.want));
                    return false;
                }
                true
            });
        };
        while Instant::now() < end {
            let now = Instant::now();
            if now >= next {
                let (subnet, want) = self.step(gw)?;
                pending.retain(|p| p.subnet != subnet);
                pending.push(Pending {
                    subnet,
                    want,
                    at: Instant::now(),
                });
                st.changes += 1;
                next += tick;
            }
            sweep(&mut pending, &mut st);
            std::thread::sleep(Duration::from_micros(500));
        }
        st.secs = t0.elapsed().as_secs_f64();
        while !pending.is_empty() {
            sweep(&mut pending, &mut st);
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(st)
    }
}

/// Waits up to `within` until the maps hold exactly `want`; the time it took, or what still
/// differed at the deadline.
pub fn wait_equal(
    map: &PinnedPeers,
    want: &BTreeMap<Ipv4Net, PeerView>,
    within: Duration,
) -> std::result::Result<Duration, Vec<String>> {
    let t0 = Instant::now();
    let deadline = t0 + crate::slow(within);
    loop {
        // The count first: a cheap test while thousands of entries are still on their way.
        if map.len() == want.len() {
            let d = map.diff(want);
            if d.is_empty() {
                return Ok(t0.elapsed());
            }
            if Instant::now() > deadline {
                return Err(d);
            }
        } else if Instant::now() > deadline {
            return Err(map.diff(want));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// An agent's log lines since a mark.
#[derive(Debug)]
pub struct LogSummary {
    pub lines: usize,
    /// Lines about one peer (with a `subnet=` or `public_ip=` field): a lease added, changed
    /// or removed, its map and sender entries. The rest is about the agent as a whole (the
    /// watch breaking, resuming, listing again…).
    pub per_peer: usize,
    /// Lines per message (the text after the level, without the fields), most frequent first:
    /// what a flood of log lines consists of.
    pub by_message: Vec<(String, usize)>,
}

impl LogSummary {
    /// The lines of `log` from byte `mark` on.
    pub fn of(log: &str, mark: usize) -> Self {
        let fresh = log.get(mark..).unwrap_or_default();
        let mut by: HashMap<String, usize> = HashMap::new();
        let (mut lines, mut per_peer) = (0, 0);
        for l in fresh.lines() {
            lines += 1;
            if l.contains(" subnet=") || l.contains(" public_ip=") {
                per_peer += 1;
            }
            let msg: String = l
                .split_whitespace()
                .skip(2)
                .take_while(|w| !w.contains('='))
                .collect::<Vec<_>>()
                .join(" ");
            *by.entry(msg).or_default() += 1;
        }
        let mut by_message: Vec<(String, usize)> = by.into_iter().collect();
        by_message.sort_by_key(|e| std::cmp::Reverse(e.1));
        by_message.truncate(6);
        LogSummary {
            lines,
            per_peer,
            by_message,
        }
    }
}

/// The `p`-th percentile of the finite values of `v` (nearest rank); NaN when there are none.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let idx = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[idx.clamp(1, v.len()) - 1]
}
