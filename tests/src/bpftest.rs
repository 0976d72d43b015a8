//! What tier 2 (BPF_PROG_TEST_RUN, `tests/tier2/prog_test_run/`) shares between its IPv4 and IPv6
//! halves: the node a datapath is loaded into ([`Node`]), the kernel's verdict values, counter
//! arithmetic, and the fuzz loop ([`fuzz`]) that drives the programs against a half's own
//! reference model ([`FuzzModel`]). Nothing here knows what a program should answer: every
//! expectation stays in the half that writes it.

use std::collections::BTreeMap;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use overlay_agent::{
    dataplane::{Counters, Dataplane, LocalEndpoint},
    family::Family,
};
use overlay_common::{programs, Counter};

use crate::netns::{require_root, Netns, PinRoot};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// How much counter `c` grew between two readings.
pub fn delta(before: &Counters, after: &Counters, c: Counter) -> u64 {
    after.get(c) - before.get(c)
}

/// Every counter that moved between two readings, and by how much.
pub fn moved(before: &Counters, after: &Counters) -> Vec<(&'static str, u64)> {
    Counter::ALL
        .iter()
        .filter(|c| after.get(**c) != before.get(**c))
        .map(|c| (c.name(), after.get(*c) - before.get(*c)))
        .collect()
}

/// xorshift64*: deterministic, seedable, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `0..n` for picking mutations.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Pads `frame` to the header its ethertype promises (Ethernet + IPv4 or IPv6), which
/// BPF_PROG_TEST_RUN requires of a TC program's skb (XDP takes runts as they are). True when it
/// padded.
pub fn pad_for_skb_test_run(frame: &mut Vec<u8>) -> bool {
    let min = match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => 34,
        0x86dd => 54,
        _ => 14,
    };
    if frame.len() >= min {
        return false;
    }
    frame.resize(min, 0);
    true
}

/// Every (program, verdict class) in `wanted` came up at least `min` times in a fuzz run's `hits`:
/// a generator change that sends nearly everything to one verdict (PASS, say) fails here instead
/// of passing thousands of trivial runs.
pub fn assert_every_class_hit(hits: &BTreeMap<(&str, &str), u32>, wanted: &[(&str, Counter)], min: u32) {
    let thin: Vec<_> = wanted
        .iter()
        .map(|(prog, c)| {
            (
                *prog,
                c.name(),
                hits.get(&(*prog, c.name())).copied().unwrap_or(0),
            )
        })
        .filter(|(_, _, n)| *n < min)
        .collect();
    assert!(
        thin.is_empty(),
        "verdict classes hit fewer than {min} times: {thin:?}; all: {hits:?}"
    );
}

/// A node namespace with the underlay veth `eth0` (peer `eth0p`, MAC 02:00:00:00:00:11,
/// 198.18.0.11/24) and the datapath loaded into it, pinned under a pin root of its own.
pub struct Node {
    pub dp: Dataplane,
    pub ns: Netns,
    _pins: PinRoot,
}

impl Node {
    /// The namespace (`prefix`) with `sysctl` set and the underlay up; `setup` adds what the
    /// caller's family needs (addresses, permanent neighbours) before the datapath, with peer
    /// tables of `max_peers`, is loaded.
    pub fn new(prefix: &str, sysctl: &str, max_peers: u32, setup: impl FnOnce(&Netns)) -> Self {
        require_root();
        let ns = Netns::new(prefix).unwrap();
        ns.sysctl(sysctl).unwrap();
        ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"])
            .unwrap();
        // A fixed MAC, so tests can write the outer source MAC literally.
        ns.ip(&["link", "set", "eth0", "address", "02:00:00:00:00:11"])
            .unwrap();
        ns.ip(&["link", "set", "eth0", "up"]).unwrap();
        ns.ip(&["link", "set", "eth0p", "up"]).unwrap();
        ns.ip(&["addr", "add", "198.18.0.11/24", "dev", "eth0"]).unwrap();
        setup(&ns);
        let pins = PinRoot::new();
        let dp = Dataplane::load_with_capacity(&pins.0, max_peers).expect("loading the datapath");
        Node { dp, ns, _pins: pins }
    }

    /// `f` on the datapath from inside the node namespace: the device map resolves an ifindex in
    /// the writer's namespace, as the agent's is the node's (written from the root namespace it
    /// named whatever device had that index there: a guest with only `lo` refused it).
    pub fn inside<T>(&mut self, f: impl FnOnce(&mut Dataplane) -> T) -> T {
        let _inside = self.ns.enter().unwrap();
        f(&mut self.dp)
    }

    pub fn counters(&self) -> Counters {
        self.dp.counters().unwrap()
    }

    /// Whether this kernel lets XDP write metadata (how XDP decap marks what it stripped).
    pub fn xdp_meta(&self) -> bool {
        self.dp.features().xdp_meta
    }

    pub fn run(&mut self, prog: &'static str, input: &[u8]) -> (u32, Vec<u8>) {
        self.run_ctx(prog, input, None)
    }

    /// Runs `prog` on `input` inside the node namespace, with an `__sk_buff` context when given
    /// (TC only); returns (verdict, output bytes).
    pub fn run_ctx(&mut self, prog: &'static str, input: &[u8], ctx: Option<&[u8]>) -> (u32, Vec<u8>) {
        let _inside = self.ns.enter().unwrap();
        let mut out = vec![0u8; input.len() + 256];
        let p = self.dp.ebpf_mut().program_mut(prog).unwrap();
        let opts = TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: ctx,
            ..TestRunOptions::new()
        };
        let r = if prog == programs::DECAP_XDP {
            let x: &mut Xdp = p.try_into().unwrap();
            x.test_run(opts)
        } else {
            let c: &mut SchedClassifier = p.try_into().unwrap();
            c.test_run(opts)
        }
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {prog} failed: {e}"));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }
}

/// The 4 bytes of XDP metadata that mark a frame XDP decap stripped: "OVL1" in host order.
pub const XDP_MARK: [u8; 4] = 0x4f56_4c31u32.to_ne_bytes();

/// What XDP decap hands on (to the stack and the TC program after GRO) for `inner`, the inner
/// frame from its Ethernet header on: addressed to the NIC (`underlay_mac`) and marked as the
/// kernel allows — with XDP metadata (`xdp_meta`), [`XDP_MARK`] in front and the sender's
/// VtepMAC kept as the source; without, the NIC's own MAC as the source too.
pub fn xdp_stripped(xdp_meta: bool, underlay_mac: [u8; 6], inner: &[u8]) -> Vec<u8> {
    let mut out = if xdp_meta { XDP_MARK.to_vec() } else { Vec::new() };
    out.extend_from_slice(&underlay_mac);
    out.extend_from_slice(if xdp_meta { &inner[6..12] } else { &underlay_mac });
    out.extend_from_slice(&inner[12..]);
    out
}

/// The MACs of the pod every tier-2 node has as a local endpoint, and of its bridge.
pub const POD_MAC: [u8; 6] = [0x0a, 0x58, 0, 0, 0, 0x02];
pub const BRIDGE_MAC: [u8; 6] = [0x0a, 0x58, 0, 0, 0, 0x01];

/// A pod at `ip` behind the veth `ifindex`, with [`POD_MAC`] behind [`BRIDGE_MAC`].
pub fn pod_endpoint<F: Family>(ip: F::Addr, ifindex: u32) -> LocalEndpoint<F> {
    LocalEndpoint {
        ip,
        ifindex,
        mac: POD_MAC,
        gw_mac: BRIDGE_MAC,
    }
}

/// A permanent neighbour on the node's `eth0` (the family follows the address).
pub fn permanent_neighbour(ns: &Netns, ip: &str, mac: &str) {
    ns.ip(&[
        "neigh",
        "replace",
        ip,
        "lladdr",
        mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])
    .unwrap();
}

/// The drop reasons of the decap rules, the same for both families.
pub const DECAP_DROPS: [Counter; 6] = [
    Counter::DropFragment,
    Counter::DropMalformed,
    Counter::DropUnknownPeer,
    Counter::DropWrongVni,
    Counter::DropSpoofedSource,
    Counter::DropInnerMac,
];

/// A frame for decap and what it must get: (name, frame, dropped?, the counter it moves).
pub type DecapCase = (&'static str, Vec<u8>, bool, Counter);

/// Every case through both decap programs, XDP and TC (`for_tc` makes a frame what the TC test
/// run takes): each must get its verdict, move its counter by exactly one, and pass unchanged
/// when not dropped.
pub fn assert_decap_cases(node: &mut Node, cases: &[DecapCase], for_tc: impl Fn(&[u8]) -> Vec<u8>) {
    for (prog, pass, drop) in [
        (programs::DECAP_XDP, XDP_PASS, XDP_DROP),
        (programs::DECAP_TC, TC_ACT_OK, TC_ACT_SHOT),
    ] {
        for (name, frame, dropped, counter) in cases {
            let frame = if prog == programs::DECAP_TC {
                for_tc(frame)
            } else {
                frame.clone()
            };
            let before = node.counters();
            let (verdict, out) = node.run(prog, &frame);
            let after = node.counters();
            assert_eq!(
                verdict,
                if *dropped { drop } else { pass },
                "{prog}/{name}: verdict; moved {:?}",
                moved(&before, &after)
            );
            if !dropped {
                assert_eq!(out, frame, "{prog}/{name}: passed frames must be unchanged");
            }
            assert_eq!(
                delta(&before, &after, *counter),
                1,
                "{prog}/{name}: {}; moved {:?}",
                counter.name(),
                moved(&before, &after)
            );
        }
    }
}

/// What a reference model says a program does with a frame.
pub struct Expect {
    /// Dropped (`XDP_DROP`, `TC_ACT_SHOT`)?
    pub drop: bool,
    /// The one counter the run must move by exactly 1.
    pub counter: Counter,
    /// Redirected (`TC_ACT_REDIRECT`)? `None`: the model does not say.
    pub redirect: Option<bool>,
    /// The bytes the program must output; `None`: the model does not say (a drop, whose bytes
    /// nobody reads, or headers another check covers).
    pub output: Option<Vec<u8>>,
}

/// One half's fuzz run: its frames, its independent model of the rules, its own extra checks.
pub trait FuzzModel {
    /// The program run `i` drives and its frame (random or mutated).
    fn frame(&mut self, rng: &mut Rng, i: usize) -> (&'static str, Vec<u8>);
    /// What the rules say of `frame` (already padded for TC programs).
    fn expect(&mut self, prog: &'static str, frame: &[u8]) -> Expect;
    /// Checks of its own after the verdict and output held; true when it compared output bytes.
    fn check(&mut self, _i: usize, _frame: &[u8], _out: &[u8], _expect: &Expect, _moved: Moved) -> bool {
        false
    }
    /// Every (program, counter) the model can return, each of which must come up.
    fn classes(&self) -> Vec<(&'static str, Counter)>;
}

/// The counters before and after one run.
pub struct Moved<'a> {
    pub before: &'a Counters,
    pub after: &'a Counters,
}

/// How often each class had to come up in a fuzz run.
pub const MIN_HITS: u32 = 50;

/// `runs` frames from `model` (random source seeded with `seed`) through the real programs of
/// `node`: each must get exactly the model's verdict, move exactly its counter, and output its
/// bytes; afterwards every class the model names must have come up [`MIN_HITS`] times.
pub fn fuzz(node: &mut Node, model: &mut impl FuzzModel, seed: u64, runs: usize) {
    let mut rng = Rng(seed);
    // How often each program was expected (and, by the assertion below, seen) to reach each
    // verdict class, and how many of those runs had their output compared byte for byte.
    let mut hits: BTreeMap<(&str, &str), u32> = Default::default();
    let mut compared: BTreeMap<(&str, &str), u32> = Default::default();
    for i in 0..runs {
        let (prog, mut frame) = model.frame(&mut rng, i);
        let xdp = prog == programs::DECAP_XDP;
        if !xdp {
            pad_for_skb_test_run(&mut frame);
        }
        let expect = model.expect(prog, &frame);
        let before = node.counters();
        let (verdict, out) = node.run(prog, &frame);
        let after = node.counters();
        let dropped = verdict == if xdp { XDP_DROP } else { TC_ACT_SHOT };
        let redirected = !xdp && verdict == TC_ACT_REDIRECT;
        let name = expect.counter.name();
        assert!(
            dropped == expect.drop
                && delta(&before, &after, expect.counter) == 1
                && expect.redirect.is_none_or(|r| r == redirected),
            "run {i}: {prog} gave verdict {verdict} moving {:?}; the model says {} via {name}\nframe: {frame:02x?}",
            moved(&before, &after),
            if expect.drop { "drop" } else { "no drop" },
        );
        if let Some(want) = &expect.output {
            assert!(
                out == *want,
                "run {i}: {prog} ({name}) output differs from the model\nframe: {frame:02x?}\n\
                 got:  {out:02x?}\nwant: {want:02x?}",
            );
            *compared.entry((prog, name)).or_default() += 1;
        }
        let moved = Moved {
            before: &before,
            after: &after,
        };
        if model.check(i, &frame, &out, &expect, moved) {
            *compared.entry((prog, name)).or_default() += 1;
        }
        *hits.entry((prog, name)).or_default() += 1;
    }
    println!("outputs compared byte for byte: {compared:?}");
    println!("verdict classes over {runs} runs: {hits:?}");
    assert_every_class_hit(&hits, &model.classes(), MIN_HITS);
}
