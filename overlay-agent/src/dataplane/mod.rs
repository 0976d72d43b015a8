//! The only place that touches BPF: load the embedded object with its maps pinned under the pin
//! root, attach the programs, and translate peers into map entries. It never sees etcd.

use std::{
    fmt::Debug,
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::{
    maps::{
        lpm_trie::Key, Array, DevMapHash, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues,
    },
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        xdp::XdpLink,
        SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use ipnet::IpNet;
use overlay_common::{maps, programs, Counter, DataplaneConfig, DataplaneConfig6, Endpoint, PeerStats};

pub mod bpffs;
pub mod events;
mod family;
pub mod object;
pub mod pinned;

pub use family::{LocalEndpoint, MapFamily, PeerEntry, SenderEntry};
use pinned::{endpoint_entries, peer_entries, read_counters};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(transparent)]
    Object(#[from] object::ObjectError),
    #[error(transparent)]
    Bpffs(#[from] bpffs::BpffsError),
    #[error("loading the eBPF object (maps pinned under {pin_root}): {source}")]
    Load {
        pin_root: String,
        source: Box<aya::EbpfError>,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("local endpoint {ip}: its veth (ifindex {ifindex}) cannot go into the device map: {source}")]
    EndpointDevice {
        ip: IpAddr,
        ifindex: u32,
        source: aya::maps::xdp::XdpMapError,
    },
    #[error("sizing a per-CPU map value (the number of possible CPUs): {0}")]
    PerCpu(std::io::Error),
    #[error(
        "kernel {kernel} lacks {lacks}; the oldest kernel tested is 6.1 (Debian 12): upgrade the \
         kernel (the README lists the tested ones)"
    )]
    KernelTooOld { kernel: String, lacks: &'static str },
    #[error("adding the clsact qdisc to {iface}: {source}")]
    Clsact { iface: String, source: tc::TcError },
    #[error("removing pins under {path}: {source}")]
    Unpin { path: String, source: std::io::Error },
    #[error("pinning {path}: {reason}")]
    Pin { path: String, reason: String },
    #[error(
        "no pinned map {path}: the agent has not run on this node with --pin-root {pin_root} \
         (or `overlay-agent cleanup` removed it)"
    )]
    NotPinned { path: PathBuf, pin_root: PathBuf },
    #[error(
        "the peer map is full ({max} subnets); {subnet} was not added. Raise MAX_PEERS or use a \
         larger SubnetLen"
    )]
    PeersFull { max: u32, subnet: IpNet },
}

/// The ifindex [`Dataplane::endpoints`] reports for an endpoint whose veth is gone.
pub const STALE_IFINDEX: u32 = 0;

/// Directory under the pin root holding the program links: `<prog>@<iface>@<ifindex>`.
pub const LINKS_DIR: &str = "links";
/// The name encap's second link on the host device (its ingress) is pinned under.
pub const RESEG_LINK: &str = "overlay_encap_reseg";

/// The `clsact` filter priority of our TC programs on kernels without TCX (one program of ours
/// per hook), and its handle ("OV"): fixed, so a restarted agent replaces its own filter.
pub const TC_PRIORITY: u16 = 1;
pub const TC_HANDLE: u16 = 0x4f56;

/// Where decap runs on the underlay NIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapMode {
    Xdp,
    Tc,
}

impl DecapMode {
    /// `xdp` or `tc`: how `status` and `/metrics` name a decap mode.
    pub fn label(self) -> &'static str {
        match self {
            DecapMode::Xdp => "xdp",
            DecapMode::Tc => "tc",
        }
    }
}

/// The node's IPv6 datapath settings (see [`DataplaneConfig6`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config6 {
    /// Our PublicIPv6: the outer source address, and where decap accepts IPv6 VXLAN.
    pub public_ip: Ipv6Addr,
    /// The VtepMAC we publish in `BackendV6Data`.
    pub vtep_mac: [u8; 6],
    /// Largest inner IPv6 packet: the underlay MTU − 70 ([`overlay_common::wire::VXLAN6_OVERHEAD`]
    /// + 14 of outer Ethernet are not part of the MTU).
    pub inner_mtu: u32,
    /// The host device pair that segments IPv6 GSO packets with a short last segment before
    /// encap; `None`: such packets are encapsulated whole, and the last segment's outer UDP
    /// checksum is wrong wherever they are segmented after encap
    /// ([`overlay_common::DataplaneConfig6::reseg_ifindex`]).
    pub reseg: Option<Reseg>,
}

/// The pair of [`Config6::reseg`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reseg {
    /// `overlay0p` (TSO off): where such packets are sent.
    pub ifindex: u32,
    /// `overlay0`: where their segments come back.
    pub return_ifindex: u32,
    /// UDP segmentation is off on `overlay0p` too: a pod's UDP GSO packets are segmented as
    /// well, not only TCP ones.
    pub udp: bool,
}

/// Summed per-CPU counters, indexed by [`Counter`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub Vec<u64>);

impl Counters {
    pub fn get(&self, c: Counter) -> u64 {
        self.0.get(c as usize).copied().unwrap_or(0)
    }
}

/// What this kernel offers that the datapath uses when it can, detected once at load; where a
/// feature is missing the datapath takes the older way, never a refused program or a failing
/// helper call per packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelFeatures {
    /// TCX (6.6+): TC programs attach as bpf links, pinned across restarts. Without it they
    /// attach as `clsact` filters at our own priority and handle ([`TC_PRIORITY`]).
    pub tcx: bool,
    /// `bpf_skb_adjust_room` takes `BPF_F_ADJ_ROOM_DECAP_L4_UDP` (probed by test-running
    /// `overlay_probe`): decap then clears a GSO packet's UDP-tunnel state.
    pub decap_l4_udp: bool,
    /// XDP programs may call `bpf_xdp_adjust_meta` (probed before load; some kernel builds
    /// refuse it): XDP decap marks what it stripped so the TC program after GRO delivers it
    /// straight to the pod. Without it XDP decap still strips, and the stack delivers.
    pub xdp_meta: bool,
}

impl KernelFeatures {
    /// The features as `status` and the start-up log name them: (name, present, what the
    /// datapath does without it).
    pub fn describe(&self) -> [(&'static str, bool, &'static str); 3] {
        [
            (
                "tcx",
                self.tcx,
                "TC programs attach as clsact filters (not pinned; replaced in place on restart)",
            ),
            (
                "adjust_room DECAP_L4_UDP",
                self.decap_l4_udp,
                "GSO packets keep their UDP-tunnel state after decap (delivered straight to pods)",
            ),
            (
                "xdp_adjust_meta",
                self.xdp_meta,
                "XDP decap leaves what it stripped to the stack (routed to the pod, not delivered straight)",
            ),
        ]
    }
}

/// The running kernel's release (`uname -r`), for messages.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// TCX came with 6.6.
pub fn kernel_has_tcx() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
}

/// The loaded datapath. Dropping it detaches the programs; the pinned maps stay.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_root: PathBuf,
    max_peers: u32,
    features: KernelFeatures,
    /// XDP decap is attached (its TC program after GRO then takes what XDP stripped).
    xdp_decap: bool,
}

impl Dataplane {
    /// Mounts bpffs if needed, loads the embedded object with every map pinned under `pin_root`
    /// (reusing maps already pinned there) and loads all programs into the kernel.
    pub fn load(pin_root: &Path) -> Result<Self, DataplaneError> {
        Self::load_with_capacity(pin_root, maps::MAX_PEERS)
    }

    /// [`Dataplane::load`] with peer tables of `max_peers` entries (tests fill them up).
    pub fn load_with_capacity(pin_root: &Path, max_peers: u32) -> Result<Self, DataplaneError> {
        let bytes = object::object()?;
        bpffs::prepare_pin_root(pin_root)?;
        let carried = retire_incompatible_pins(bytes, pin_root, max_peers);
        let pins: Vec<(&'static str, PathBuf)> = maps::ALL.iter().map(|m| (*m, pin_root.join(m))).collect();
        let xdp_meta = xdp_meta_supported();
        let xdp_meta_global = u32::from(xdp_meta);
        let mut loader = EbpfLoader::new();
        loader.override_global(overlay_common::globals::XDP_META, &xdp_meta_global, true);
        for name in maps::PEER_TABLES {
            loader.map_max_entries(name, max_peers);
        }
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(bytes).map_err(|source| DataplaneError::Load {
            pin_root: pin_root.display().to_string(),
            source: Box::new(source),
        })?;
        for name in [
            programs::ENCAP,
            programs::DECAP_TC,
            programs::GRO_SINK,
            programs::RECORD,
        ] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        let xdp: &mut Xdp = program(&mut ebpf, programs::DECAP_XDP)?;
        xdp.load().map_err(|source| DataplaneError::Program {
            name: programs::DECAP_XDP,
            source,
        })?;
        let found = probe_adjust_room(&mut ebpf)?;
        if found & overlay_common::probe::ENCAP_L2_ETH == 0 {
            return Err(DataplaneError::KernelTooOld {
                kernel: kernel_release(),
                lacks: "bpf_skb_adjust_room's BPF_F_ADJ_ROOM_ENCAP_L2_ETH (Linux 5.11), which encap \
                        needs to put VXLAN in front of a pod's frame",
            });
        }
        let features = KernelFeatures {
            tcx: kernel_has_tcx(),
            decap_l4_udp: found & overlay_common::probe::DECAP_L4_UDP != 0,
            xdp_meta,
        };
        let mut dp = Dataplane {
            ebpf,
            pin_root: pin_root.to_path_buf(),
            max_peers,
            features,
            xdp_decap: false,
        };
        if let Some(old) = carried {
            dp.carry_counters(&old)?;
        }
        Ok(dp)
    }

    /// What this kernel offers, as detected at load.
    pub fn features(&self) -> KernelFeatures {
        self.features
    }

    /// Writes the per-CPU counts of a retired counters map into ours, slot by slot.
    fn carry_counters(&mut self, old: &[Vec<u64>]) -> Result<(), DataplaneError> {
        let mut arr: PerCpuArray<&mut MapData, u64> = map_mut(&mut self.ebpf, maps::COUNTERS)?;
        let err = |source| DataplaneError::Map {
            name: maps::COUNTERS,
            source,
        };
        for (i, per_cpu) in (0..arr.len()).zip(old) {
            let values = per_cpu_values(|cpu| per_cpu.get(cpu).copied().unwrap_or(0))?;
            arr.set(i, values, 0).map_err(err)?;
        }
        tracing::info!(
            slots = old.len(),
            "carried the counts over from the retired counters map"
        );
        Ok(())
    }

    pub fn pin_root(&self) -> &Path {
        &self.pin_root
    }

    /// Attaches encap to the ingress of the pod bridge.
    pub fn attach_encap(&mut self, bridge: &str) -> Result<(), DataplaneError> {
        self.attach_tc(programs::ENCAP, bridge, TcAttachType::Ingress)
    }

    /// Attaches encap to the egress of the host device that routes the cluster network, so
    /// traffic the node itself sends to remote pods is encapsulated too.
    pub fn attach_host_encap(&mut self, dev: &str) -> Result<(), DataplaneError> {
        self.attach_tc(programs::ENCAP, dev, TcAttachType::Egress)
    }

    /// Attaches encap to the ingress of the host device too, where the IPv6 GSO packets encap
    /// sent to be segmented come back as segments (see [`Config6::reseg`]).
    pub fn attach_host_reseg(&mut self, dev: &str) -> Result<(), DataplaneError> {
        self.attach_tc_as(programs::ENCAP, RESEG_LINK, dev, TcAttachType::Ingress)
    }

    /// Attaches the sink to the ingress of the receive-GRO device (`crate::node::grodev`), which
    /// drops (and counts) whatever the kernel's VXLAN socket would deliver through it.
    pub fn attach_gro_sink(&mut self, dev: &str) -> Result<(), DataplaneError> {
        self.attach_tc(programs::GRO_SINK, dev, TcAttachType::Ingress)
    }

    /// host-gw: attaches the recorder to the egress of the underlay NIC, where the node's stack
    /// routes pod traffic to peers (its flows' replies must take the stack).
    pub fn attach_recorder(&mut self, iface: &str) -> Result<(), DataplaneError> {
        self.attach_tc(programs::RECORD, iface, TcAttachType::Egress)
    }

    /// Detaches the recorder an earlier host-gw run left on the underlay NIC (this node runs
    /// vxlan now).
    pub fn detach_recorder(&mut self, iface: &str) -> Result<(), DataplaneError> {
        if self.features.tcx {
            return self.retire_link(programs::RECORD, iface);
        }
        pinned::detach_tc_filter(iface, false, programs::RECORD)
            .map(drop)
            .map_err(|e| DataplaneError::Clsact {
                iface: iface.to_string(),
                source: e,
            })
    }

    /// Attaches decap to the ingress of the underlay NIC.
    ///
    /// TC: the TC program strips and delivers; an XDP decap an earlier agent left there (a
    /// changed `--decap`, or an upgrade that changed the default) is detached afterwards. The
    /// new hook is in place before the old one goes: while both run, XDP strips first and TC
    /// sees only inner frames, which it passes or delivers, so no packet is stripped twice and
    /// none meets a NIC without decap.
    ///
    /// XDP: XDP strips (before GRO) and the TC program, after GRO, delivers what XDP stripped
    /// straight to local pods. `native_only` refuses generic (skb-mode) XDP.
    pub fn attach_decap(
        &mut self,
        iface: &str,
        mode: DecapMode,
        native_only: bool,
    ) -> Result<(), DataplaneError> {
        match mode {
            DecapMode::Tc => {
                // Before XDP goes: TC stops taking frames by XDP's source-MAC mark first.
                self.set_xdp_decap(false)?;
                self.attach_tc(programs::DECAP_TC, iface, TcAttachType::Ingress)?;
                self.retire_link(programs::DECAP_XDP, iface)
            }
            DecapMode::Xdp => {
                let name = programs::DECAP_XDP;
                let path = self.link_pin(name, iface)?;
                let xdp: &mut Xdp = program(&mut self.ebpf, name)?;
                let err = |source| DataplaneError::Program { name, source };
                // Adopt the link a previous agent pinned: the program is swapped in place, so
                // not a packet meets a detached interface.
                let id = match adopt::<XdpLink>(&path).map(|l| xdp.attach_to_link(l)) {
                    Some(Ok(id)) => id,
                    _ => {
                        let _ = std::fs::remove_file(&path);
                        let mode = if native_only {
                            XdpMode::Driver
                        } else {
                            XdpMode::Default
                        };
                        xdp.attach(iface, mode).map_err(err)?
                    }
                };
                let link = xdp.take_link(id).map_err(err)?;
                pin_link(FdLink::try_from(link), &path)?;
                self.set_xdp_decap(true)?;
                // The TC program after GRO delivers the frames XDP stripped straight to local
                // pods (it recognises them by XDP metadata and leaves everything else alone).
                self.attach_tc(programs::DECAP_TC, iface, TcAttachType::Ingress)
            }
        }
    }

    /// Removes the pins of every link of ours on `iface`: a device the agent deleted (its links
    /// went with it; the pins would stay behind as `gone` attachments).
    pub fn forget_links_on(&self, iface: &str) -> Result<(), DataplaneError> {
        for prog in programs::ALL.into_iter().chain([RESEG_LINK]) {
            self.retire_link(prog, iface)?;
        }
        Ok(())
    }

    /// Removes the pinned link of `prog` on `iface`, detaching the program unless another
    /// process holds the link open.
    fn retire_link(&self, prog: &str, iface: &str) -> Result<(), DataplaneError> {
        let dir = self.pin_root.join(LINKS_DIR);
        let stem = link_stem(prog, iface);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&stem) {
                tracing::info!(link = %entry.path().display(), "detaching a program no longer in use");
                std::fs::remove_file(entry.path()).map_err(|source| DataplaneError::Unpin {
                    path: entry.path().display().to_string(),
                    source,
                })?;
            }
        }
        Ok(())
    }

    fn attach_tc(&mut self, name: &'static str, iface: &str, at: TcAttachType) -> Result<(), DataplaneError> {
        self.attach_tc_as(name, name, iface, at)
    }

    /// [`Dataplane::attach_tc`] with the link pinned as `pin_as` instead of the program's name
    /// (a program attached twice to one device, in both directions).
    fn attach_tc_as(
        &mut self,
        name: &'static str,
        pin_as: &str,
        iface: &str,
        at: TcAttachType,
    ) -> Result<(), DataplaneError> {
        if !self.features.tcx {
            return self.attach_tc_netlink(name, iface, at);
        }
        let path = self.link_pin(pin_as, iface)?;
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let err = |source| DataplaneError::Program { name, source };
        let id = match adopt::<SchedClassifierLink>(&path).map(|l| prog.attach_to_link(l)) {
            Some(Ok(id)) => id,
            _ => {
                // No pinned link, or one whose interface is gone (a recreated bridge).
                let _ = std::fs::remove_file(&path);
                prog.attach(iface, at).map_err(err)?
            }
        };
        let link = prog.take_link(id).map_err(err)?;
        pin_link(FdLink::try_from(link), &path)
    }

    /// Kernels before 6.6 (no TCX): a `clsact` filter at our own fixed priority and handle
    /// ([`TC_PRIORITY`], [`TC_HANDLE`]), so a restarted agent finds the filter its predecessor
    /// left and swaps the program in place (one netlink replace: not a packet meets the hook
    /// empty, and no second filter piles up in front of it). Such filters are not bpf links:
    /// nothing is pinned, they stay attached after the agent exits (as pinned links do), and
    /// `cleanup` removes them by program name.
    fn attach_tc_netlink(
        &mut self,
        name: &'static str,
        iface: &str,
        at: TcAttachType,
    ) -> Result<(), DataplaneError> {
        // Adding a qdisc to a live device stops its transmit queues for a moment and drops what
        // is in flight (seen as lost packets during upgrades), so only when it is missing.
        if let Err(e) = tc::qdisc_add_clsact(iface) {
            let exists = matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST));
            if !exists {
                return Err(DataplaneError::Clsact {
                    iface: iface.to_string(),
                    source: e,
                });
            }
        }
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let err = |source| DataplaneError::Program { name, source };
        let handle = TcHandle::new(0, TC_HANDLE);
        let existing = SchedClassifierLink::attached(iface, at, TC_PRIORITY, handle, None)
            .map_err(|e| err(tc::TcError::IoError(e).into()))?;
        let id = match prog.attach_to_link(existing) {
            Ok(id) => id,
            // No filter of ours there yet (ENOENT): create it.
            Err(_) => prog
                .attach_with_options(
                    iface,
                    at,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: TC_PRIORITY,
                        handle,
                        ..Default::default()
                    }),
                )
                .map_err(err)?,
        };
        // Dropping the link would detach the filter: keep it attached past this process.
        let link = prog.take_link(id).map_err(err)?;
        std::mem::forget(link);
        Ok(())
    }

    /// Where the link of `prog` on `iface` is pinned: `<pin_root>/links/<prog>@<iface>@<ifindex>`
    /// (bpffs refuses dots in names, so a VLAN's `eth0.100` becomes `eth0_100`). The ifindex makes
    /// a link on a since-deleted device (a recreated bridge) never look adoptable; pins of such
    /// devices are removed here.
    fn link_pin(&self, prog: &str, iface: &str) -> Result<PathBuf, DataplaneError> {
        let dir = self.pin_root.join(LINKS_DIR);
        let pin_err = |e: std::io::Error| DataplaneError::Pin {
            path: dir.display().to_string(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(&dir).map_err(pin_err)?;
        let ifindex = nix::net::if_::if_nametoindex(iface).map_err(|e| pin_err(e.into()))?;
        let stem = link_stem(prog, iface);
        let name = format!("{stem}{ifindex}");
        for entry in std::fs::read_dir(&dir).map_err(pin_err)?.flatten() {
            let other = entry.file_name().to_string_lossy().into_owned();
            if other.starts_with(&stem) && other != name {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(dir.join(name))
    }

    /// Writes the node-wide settings (marks them ready).
    pub fn set_config(&mut self, cfg: &DataplaneConfig) -> Result<(), DataplaneError> {
        let mut cfg = *cfg;
        cfg.flags |= maps::CONFIG_READY;
        self.write_config(cfg)
    }

    /// Records whether XDP decap is attached and, once the config is written, says so in it.
    fn set_xdp_decap(&mut self, on: bool) -> Result<(), DataplaneError> {
        self.xdp_decap = on;
        let arr: Array<&MapData, DataplaneConfig> = map_ref(&self.ebpf, maps::CONFIG)?;
        let current = arr.get(&0, 0);
        match current {
            Ok(cfg) if cfg.flags & maps::CONFIG_READY != 0 => self.write_config(cfg),
            _ => Ok(()),
        }
    }

    /// Writes `cfg` with the flags the datapath itself owns: the kernel's features and the
    /// decap hook in use.
    fn write_config(&mut self, mut cfg: DataplaneConfig) -> Result<(), DataplaneError> {
        let own = maps::CONFIG_DECAP_L4_UDP | maps::CONFIG_XDP_META | maps::CONFIG_XDP_MAC_MARK;
        cfg.flags &= !own;
        if self.features.decap_l4_udp {
            cfg.flags |= maps::CONFIG_DECAP_L4_UDP;
        }
        if self.features.xdp_meta {
            cfg.flags |= maps::CONFIG_XDP_META;
        } else if self.xdp_decap {
            cfg.flags |= maps::CONFIG_XDP_MAC_MARK;
        }
        let mut arr: Array<&mut MapData, DataplaneConfig> = map_mut(&mut self.ebpf, maps::CONFIG)?;
        arr.set(0, cfg, 0).map_err(|source| DataplaneError::Map {
            name: maps::CONFIG,
            source,
        })
    }

    /// Adds or replaces one remote subnet: one LPM upsert plus its sender entry (all or nothing).
    /// The sender entry goes in first (decap must know the sender before encap sends to it),
    /// then the subnet; when the subnet does not go in, the sender entry is put back as it was
    /// (another subnet of the same PublicIP may rely on it).
    pub fn upsert_peer<F: MapFamily>(&mut self, p: &PeerEntry<F>) -> Result<(), DataplaneError> {
        let (net, len) = (F::key(F::net_addr(&p.subnet)), F::net_len(&p.subnet));
        let key = Key::new(u32::from(len), net);
        let (value, sender, vtep) = (p.value(), F::key(p.public_ip), F::vtep_value(net, len));
        let subnet: IpNet = p.subnet.into();
        let t = (F::PEERS, F::VTEPS);
        let max = self.max_peers;
        let previous = {
            let mut vteps: HashMap<&mut MapData, F::Key, F::Vtep> = map_mut(&mut self.ebpf, t.1)?;
            let previous = vteps.get(&sender, 0).ok();
            vteps
                .insert(sender, vtep, 0)
                .map_err(|e| full_or(e, t.1, subnet, max))?;
            previous
        };
        let mut peers: LpmTrie<&mut MapData, F::Key, F::Peer> = map_mut(&mut self.ebpf, t.0)?;
        if let Err(e) = peers.insert(&key, value, 0) {
            // Keep the two tables in step: put the sender entry back as it was.
            let mut vteps: HashMap<&mut MapData, F::Key, F::Vtep> = map_mut(&mut self.ebpf, t.1)?;
            let _ = match previous {
                Some(v) => vteps.insert(sender, v, 0),
                None => vteps.remove(&sender),
            };
            return Err(full_or(e, t.0, subnet, max));
        }
        self.add_peer_stats::<F>(sender)
    }

    /// Adds or replaces one local pod: its device entry first (decap delivers only when both
    /// agree on the ifindex), then its endpoint. A device entry the endpoint no longer uses (a
    /// pod on a new veth) is released.
    pub fn upsert_endpoint<F: MapFamily>(&mut self, e: &LocalEndpoint<F>) -> Result<(), DataplaneError> {
        let previous = {
            let eps: HashMap<&MapData, F::Key, Endpoint> = map_ref(&self.ebpf, F::ENDPOINTS)?;
            eps.get(&F::key(e.ip), 0).ok()
        };
        let dev_key = F::dev_key(e.ip, e.ifindex);
        {
            let mut devs: DevMapHash<&mut MapData> = map_mut(&mut self.ebpf, F::ENDPOINT_DEVS)?;
            devs.insert(dev_key, e.ifindex, None, 0)
                .map_err(|source| DataplaneError::EndpointDevice {
                    ip: e.ip.into(),
                    ifindex: e.ifindex,
                    source,
                })?;
        }
        let mut eps: HashMap<&mut MapData, F::Key, Endpoint> = map_mut(&mut self.ebpf, F::ENDPOINTS)?;
        let value = Endpoint {
            ifindex: e.ifindex,
            mac: e.mac,
            gw_mac: e.gw_mac,
        };
        eps.insert(F::key(e.ip), value, 0)
            .map_err(|source| DataplaneError::Map {
                name: F::ENDPOINTS,
                source,
            })?;
        match previous.map(|p| F::dev_key(e.ip, p.ifindex)) {
            Some(old) if old != dev_key => self.release_endpoint_dev::<F>(old),
            _ => Ok(()),
        }
    }

    /// Removes one local pod, and its device entry unless another endpoint uses it. Absent is
    /// not an error.
    pub fn remove_endpoint<F: MapFamily>(&mut self, ip: F::Addr) -> Result<(), DataplaneError> {
        let mut eps: HashMap<&mut MapData, F::Key, Endpoint> = map_mut(&mut self.ebpf, F::ENDPOINTS)?;
        let previous = eps.get(&F::key(ip), 0).ok();
        ignore_missing(eps.remove(&F::key(ip)), F::ENDPOINTS)?;
        match previous {
            Some(p) => self.release_endpoint_dev::<F>(F::dev_key(ip, p.ifindex)),
            None => Ok(()),
        }
    }

    /// Deletes the device entry `dev_key` of family `F` unless an endpoint still uses it.
    fn release_endpoint_dev<F: MapFamily>(&mut self, dev_key: u32) -> Result<(), DataplaneError> {
        let used = F::SHARED_DEV && {
            let eps: HashMap<&MapData, F::Key, Endpoint> = map_ref(&self.ebpf, F::ENDPOINTS)?;
            eps.iter()
                .flatten()
                .any(|(k, v)| F::dev_key(F::from_key(k), v.ifindex) == dev_key)
        };
        if used {
            return Ok(());
        }
        let mut devs: DevMapHash<&mut MapData> = map_mut(&mut self.ebpf, F::ENDPOINT_DEVS)?;
        ignore_missing(devs.remove(dev_key), F::ENDPOINT_DEVS)
    }

    /// The local pods of family `F` in the (possibly adopted) endpoint map. One whose device
    /// entry no longer names the same veth (the veth went away, possibly while no agent ran) is
    /// reported with ifindex [`STALE_IFINDEX`]: decap does not deliver to it, and it differs from
    /// anything discovered, so a resync removes or replaces it.
    pub fn endpoints<F: MapFamily>(&self) -> Result<Vec<LocalEndpoint<F>>, DataplaneError> {
        let eps: HashMap<&MapData, F::Key, Endpoint> = map_ref(&self.ebpf, F::ENDPOINTS)?;
        let devs: DevMapHash<&MapData> = map_ref(&self.ebpf, F::ENDPOINT_DEVS)?;
        Ok(endpoint_entries(&eps)
            .into_iter()
            .map(|mut e: LocalEndpoint<F>| {
                let live = devs
                    .get(F::dev_key(e.ip, e.ifindex), 0)
                    .is_ok_and(|v| v.if_index == e.ifindex);
                if !live {
                    e.ifindex = STALE_IFINDEX;
                }
                e
            })
            .collect())
    }

    /// Adds or replaces one remote subnet alone: its PublicIP's sender entry exists and names
    /// another subnet of that address, which keeps it.
    pub fn upsert_subnet<F: MapFamily>(&mut self, p: &PeerEntry<F>) -> Result<(), DataplaneError> {
        let key = lpm_key::<F>(&p.subnet);
        let max = self.max_peers;
        let mut peers: LpmTrie<&mut MapData, F::Key, F::Peer> = map_mut(&mut self.ebpf, F::PEERS)?;
        peers
            .insert(&key, p.value(), 0)
            .map_err(|e| full_or(e, F::PEERS, p.subnet.into(), max))
    }

    /// Removes one remote subnet, leaving the sender entry of its PublicIP (another subnet of
    /// that address still uses it). Absent is not an error.
    pub fn remove_subnet<F: MapFamily>(&mut self, subnet: F::Net) -> Result<(), DataplaneError> {
        let key = lpm_key::<F>(&subnet);
        let mut peers: LpmTrie<&mut MapData, F::Key, F::Peer> = map_mut(&mut self.ebpf, F::PEERS)?;
        ignore_missing(peers.remove(&key), F::PEERS)
    }

    /// Points the sender entry of `public_ip` at `subnet`: decap accepts VXLAN from that address
    /// whose inner source lies in that subnet.
    pub fn set_sender<F: MapFamily>(
        &mut self,
        public_ip: F::Addr,
        subnet: F::Net,
    ) -> Result<(), DataplaneError> {
        let vtep = F::vtep_value(F::key(F::net_addr(&subnet)), F::net_len(&subnet));
        let mut vteps: HashMap<&mut MapData, F::Key, F::Vtep> = map_mut(&mut self.ebpf, F::VTEPS)?;
        vteps
            .insert(F::key(public_ip), vtep, 0)
            .map_err(|e| full_or(e, F::VTEPS, subnet.into(), self.max_peers))?;
        self.add_peer_stats::<F>(F::key(public_ip))
    }

    /// Removes the sender entry of `public_ip`, and its traffic counts. Absent is not an error.
    pub fn remove_sender<F: MapFamily>(&mut self, public_ip: F::Addr) -> Result<(), DataplaneError> {
        let mut vteps: HashMap<&mut MapData, F::Key, F::Vtep> = map_mut(&mut self.ebpf, F::VTEPS)?;
        ignore_missing(vteps.remove(&F::key(public_ip)), F::VTEPS)?;
        self.remove_peer_stats::<F>(F::key(public_ip))
    }

    /// Zeroed traffic counts for a member (`OVL_PEER_STATS`), unless it has some already: the
    /// programs count only into entries that exist, so the table holds exactly the members.
    fn add_peer_stats<F: MapFamily>(&mut self, public_ip: F::Key) -> Result<(), DataplaneError> {
        let max = self.max_peers;
        let mut stats: PerCpuHashMap<&mut MapData, F::Key, PeerStats> =
            map_mut(&mut self.ebpf, F::PEER_STATS)?;
        if stats.get(&public_ip, 0).is_ok() {
            return Ok(());
        }
        let zero = per_cpu_values(|_| PeerStats::default())?;
        let ip: IpAddr = F::from_key(public_ip).into();
        stats
            .insert(public_ip, zero, 0)
            .map_err(|e| full_or(e, F::PEER_STATS, IpNet::from(ip), max))
    }

    fn remove_peer_stats<F: MapFamily>(&mut self, public_ip: F::Key) -> Result<(), DataplaneError> {
        let mut stats: PerCpuHashMap<&mut MapData, F::Key, PeerStats> =
            map_mut(&mut self.ebpf, F::PEER_STATS)?;
        ignore_missing(stats.remove(&public_ip), F::PEER_STATS)
    }

    /// Makes the traffic-count table's members the sender table's: entries of addresses no
    /// longer members removed, missing ones added (a datapath pinned by a release without the
    /// table, or an agent stopped between the two writes).
    pub fn sync_peer_stats<F: MapFamily>(&mut self) -> Result<(), DataplaneError> {
        let members: std::collections::BTreeSet<F::Addr> =
            self.senders::<F>()?.into_iter().map(|(ip, _)| ip).collect();
        let counted: Vec<F::Addr> = {
            let stats: PerCpuHashMap<&MapData, F::Key, PeerStats> = map_ref(&self.ebpf, F::PEER_STATS)?;
            stats.keys().filter_map(Result::ok).map(F::from_key).collect()
        };
        for ip in counted {
            if !members.contains(&ip) {
                self.remove_peer_stats::<F>(F::key(ip))?;
            }
        }
        for ip in members {
            self.add_peer_stats::<F>(F::key(ip))?;
        }
        Ok(())
    }

    /// The sender table of family `F` as the (possibly adopted) map holds it: each PublicIP and
    /// the subnet decap accepts inner sources from. An entry removed while reading is gone.
    pub fn senders<F: MapFamily>(&self) -> Result<Vec<SenderEntry<F>>, DataplaneError> {
        let vteps: HashMap<&MapData, F::Key, F::Vtep> = map_ref(&self.ebpf, F::VTEPS)?;
        let mut out = Vec::new();
        for entry in vteps.iter() {
            let (ip, v) = entry.map_err(|source| DataplaneError::Map {
                name: F::VTEPS,
                source,
            })?;
            let (net, len) = F::vtep_fields(&v);
            if len <= F::BITS {
                out.push((F::from_key(ip), F::net(F::from_key(net), len)));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes one remote subnet and its sender entry (the last subnet of its PublicIP). Absent
    /// entries are not an error.
    pub fn remove_peer<F: MapFamily>(
        &mut self,
        subnet: F::Net,
        public_ip: F::Addr,
    ) -> Result<(), DataplaneError> {
        self.remove_subnet::<F>(subnet)?;
        self.remove_sender::<F>(public_ip)
    }

    /// The remote subnets in the (possibly adopted) peer map of family `F`, so a restarted agent
    /// can remove the ones whose leases went away while it was down.
    pub fn peers<F: MapFamily>(&self) -> Result<Vec<PeerEntry<F>>, DataplaneError> {
        let peers: LpmTrie<&MapData, F::Key, F::Peer> = map_ref(&self.ebpf, F::PEERS)?;
        peer_entries(&peers)
    }

    /// Writes the node's IPv6 settings and marks them ready; from then on encap takes IPv6 pod
    /// traffic for `OVL_PEERS6` subnets and decap IPv6 VXLAN to `public_ip`. Both also use the
    /// settings of [`Dataplane::set_config`] (VNI, port, underlay NIC), which must be written too.
    pub fn set_config6(&mut self, cfg: &Config6) -> Result<(), DataplaneError> {
        let value = DataplaneConfig6 {
            public_ip: cfg.public_ip.octets(),
            vtep_mac: cfg.vtep_mac,
            flags: maps::CONFIG6_READY
                | if cfg.reseg.is_some_and(|r| r.udp) {
                    maps::CONFIG6_RESEG_UDP
                } else {
                    0
                },
            inner_mtu: cfg.inner_mtu,
            reseg_ifindex: cfg.reseg.map_or(0, |r| r.ifindex),
            reseg_return_ifindex: cfg.reseg.map_or(0, |r| r.return_ifindex),
            _reserved: 0,
        };
        let mut arr: Array<&mut MapData, DataplaneConfig6> = map_mut(&mut self.ebpf, maps::CONFIG6)?;
        arr.set(0, value, 0).map_err(|source| DataplaneError::Map {
            name: maps::CONFIG6,
            source,
        })
    }

    /// Turns the IPv6 datapath off (an IPv6 lease given up): IPv6 traffic is left to the stack.
    pub fn clear_config6(&mut self) -> Result<(), DataplaneError> {
        let mut arr: Array<&mut MapData, DataplaneConfig6> = map_mut(&mut self.ebpf, maps::CONFIG6)?;
        arr.set(0, DataplaneConfig6::default(), 0)
            .map_err(|source| DataplaneError::Map {
                name: maps::CONFIG6,
                source,
            })
    }

    /// Counters summed over CPUs.
    pub fn counters(&self) -> Result<Counters, DataplaneError> {
        read_counters(
            self.ebpf
                .map(maps::COUNTERS)
                .ok_or(DataplaneError::MissingMap(maps::COUNTERS))?,
        )
    }

    /// The loaded object, for tests that drive programs with BPF_PROG_TEST_RUN.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

/// A pinned map left by an agent whose map layout differs from ours (an upgrade that changed a
/// key, value or size) cannot be adopted: unpin it so a fresh one is created. The agent refills
/// the peer tables from etcd and the endpoints from the node; the old programs keep the old map
/// until their links are swapped. The counters are carried over: their per-CPU values (index →
/// one value per CPU) are returned for [`Dataplane::carry_counters`].
fn retire_incompatible_pins(object: &[u8], pin_root: &Path, max_peers: u32) -> Option<Vec<Vec<u64>>> {
    let Ok(obj) = aya_obj::Object::parse(object) else {
        return None;
    };
    let mut carried = None;
    for name in maps::ALL {
        let path = pin_root.join(name);
        let (Some(want), Ok(pinned)) = (obj.maps.get(name), MapData::from_pin(&path)) else {
            continue;
        };
        let Ok(info) = pinned.info() else { continue };
        // The peer tables are created with the loader's capacity, not the object's.
        let max_entries = if maps::PEER_TABLES.contains(&name) {
            max_peers
        } else {
            want.max_entries()
        };
        let same = info.key_size() == want.key_size()
            && info.value_size() == want.value_size()
            && info.max_entries() == max_entries;
        if !same {
            tracing::warn!(
                map = name,
                pinned = ?(info.key_size(), info.value_size(), info.max_entries()),
                ours = ?(want.key_size(), want.value_size(), max_entries),
                "pinned map has another layout; replacing it"
            );
            if name == maps::COUNTERS && info.value_size() == 8 && info.key_size() == 4 {
                carried = per_cpu_counts(pinned);
            }
            let _ = std::fs::remove_file(&path);
        }
    }
    carried
}

/// One value per possible CPU, `f(cpu)` each: what a per-CPU map's update takes.
fn per_cpu_values<T: aya::Pod>(f: impl FnMut(usize) -> T) -> Result<PerCpuValues<T>, DataplaneError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::PerCpu(e))?;
    PerCpuValues::try_from((0..cpus).map(f).collect::<Vec<_>>()).map_err(DataplaneError::PerCpu)
}

/// Every slot of a per-CPU `u64` array, one value per CPU.
fn per_cpu_counts(data: MapData) -> Option<Vec<Vec<u64>>> {
    let map = aya::maps::Map::PerCpuArray(data);
    let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(&map).ok()?;
    (0..arr.len())
        .map(|i| arr.get(&i, 0).ok().map(|v| v.iter().copied().collect()))
        .collect()
}

/// The name of a link pin up to its ifindex: `<prog>@<iface>@` (bpffs refuses dots in names).
fn link_stem(prog: &str, iface: &str) -> String {
    format!("{prog}@{}@", iface.replace('.', "_"))
}

/// Loads `overlay_probe` and runs it once on a plain IPv4/UDP frame: which `bpf_skb_adjust_room`
/// flags this kernel takes ([`overlay_common::probe`] bits). A kernel that cannot run the probe
/// at all (no BPF_PROG_TEST_RUN for TC programs) answers with encap's flags only: every kernel
/// the programs load on has had the test run.
fn probe_adjust_room(ebpf: &mut Ebpf) -> Result<i32, DataplaneError> {
    let name = programs::PROBE;
    let prog: &mut SchedClassifier = program(ebpf, name)?;
    prog.load()
        .map_err(|source| DataplaneError::Program { name, source })?;
    const FRAME: usize = 128;
    let mut frame = [0u8; FRAME];
    use overlay_common::wire::{ETH_LEN, ETH_P_IP, IPPROTO_UDP};
    frame[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    frame[ETH_LEN] = 0x45;
    frame[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&((FRAME - ETH_LEN) as u16).to_be_bytes());
    frame[ETH_LEN + 8] = 64;
    frame[ETH_LEN + 9] = IPPROTO_UDP;
    let mut out = [0u8; FRAME + 256];
    use aya::programs::TestRun as _;
    let opts = aya::programs::TestRunOptions {
        data_in: Some(&frame),
        data_out: Some(&mut out),
        ..aya::programs::TestRunOptions::new()
    };
    Ok(match prog.test_run(opts) {
        Ok(r) => r.return_value as i32,
        Err(e) => {
            tracing::warn!(error = %e, "the adjust_room probe could not run; assuming encap's flags only");
            overlay_common::probe::ENCAP_L2_ETH
        }
    })
}

/// Whether XDP programs may call `bpf_xdp_adjust_meta` here (a two-instruction probe program,
/// as libbpf probes helpers). A probe that cannot run says yes: the object then loads as before.
fn xdp_meta_supported() -> bool {
    use aya::{programs::ProgramType, sys::BpfHelper};
    match aya::sys::is_helper_supported(ProgramType::Xdp, BpfHelper::BPF_FUNC_xdp_adjust_meta) {
        Ok(yes) => yes,
        Err(e) => {
            tracing::warn!(error = %e, "the bpf_xdp_adjust_meta probe could not run; assuming XDP has it");
            true
        }
    }
}

/// A link pinned by an earlier agent, if there is one of the right kind.
fn adopt<L: TryFrom<FdLink, Error = LinkError>>(path: &Path) -> Option<L> {
    let pinned = PinnedLink::from_pin(path).ok()?;
    L::try_from(FdLink::from(pinned)).ok()
}

/// Pins a link so the program stays attached while the agent is down (hitless restart).
/// Links that are not bpf_link based (netlink TC on kernels before 6.6) cannot be pinned;
/// they stay attached as long as the agent runs.
fn pin_link(link: Result<FdLink, LinkError>, path: &Path) -> Result<(), DataplaneError> {
    let link = match link {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "link cannot be pinned; it detaches when the agent exits");
            return Ok(());
        }
    };
    let _ = std::fs::remove_file(path);
    link.pin(path).map(drop).map_err(|e| DataplaneError::Pin {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DataplaneError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?;
    p.try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

fn map_ref<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
    T::try_from(m).map_err(|source| DataplaneError::Map { name, source })
}

fn map_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
    T::try_from(m).map_err(|source| DataplaneError::Map { name, source })
}

/// The peer trie's key of `subnet`.
fn lpm_key<F: MapFamily>(subnet: &F::Net) -> Key<F::Key> {
    Key::new(u32::from(F::net_len(subnet)), F::key(F::net_addr(subnet)))
}

fn full_or(e: aya::maps::MapError, name: &'static str, subnet: IpNet, max: u32) -> DataplaneError {
    let full = matches!(&e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG) || s.io_error.raw_os_error() == Some(libc::ENOSPC));
    if full {
        DataplaneError::PeersFull { max, subnet }
    } else {
        DataplaneError::Map { name, source: e }
    }
}

fn ignore_missing(r: Result<(), aya::maps::MapError>, name: &'static str) -> Result<(), DataplaneError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        Err(source) => Err(DataplaneError::Map { name, source }),
        Ok(()) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/metrics` labels the decap modes without seeing this type: its list must be ours.
    #[test]
    fn the_metrics_decap_labels_are_the_modes_labels() {
        assert_eq!(
            [DecapMode::Xdp.label(), DecapMode::Tc.label()],
            crate::metrics::DECAP_MODES
        );
    }
}
