//! The cases, each on its own underlay segment so they can stay up side by side and be
//! measured alternately. IPv4: (a) host-gw routing, (b) flanneld's kernel VXLAN device, the agent
//! with XDP decap, with TC decap delivering by bpf_redirect_peer, and by bpf_redirect to the veth.
//! IPv6 (pods and underlay): (b6) flanneld's `flannel-v6.1`, the agent on a dual-stack network
//! with XDP and with TC decap.

use std::{
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use anyhow::{Context as _, Result};
use ipnet::{Ipv4Net, Ipv6Net};
use overlay_tests::{
    cluster::{Cluster, UNDERLAY_MTU},
    dualstack::{
        add_bridge_ipv6, add_pod_ipv6, nth6, try_bridge_and_pod, try_cluster_with, try_wait_peers, DUAL,
    },
    netns::Netns,
    topology::{
        ethtool_k, flannel_vxlan, flannel_vxlan6, host_gw, Node, Underlay, NIC_NODE_OFFLOADS,
        NIC_PORT_OFFLOADS, VETH_OFFLOADS,
    },
};

/// Network config for the agent clusters (flannel's default SubnetLen 24).
pub const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
/// The agent's host-gw case.
pub const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    HostGw,
    KernelVxlan,
    BpfXdp,
    BpfTc,
    BpfTcVeth,
    /// The agent on the host-gw backend (its baseline is plain routing, host-gw (a)).
    BpfHostGw,
    /// `bpf-tc` run by another build of the agent (`$OVERLAY_BASELINE_AGENT_BIN`, e.g. the last
    /// release), side by side with this one in the same run. Only when asked for (`--cases`).
    BpfTcBaseline,
    KernelVxlan6,
    BpfXdp6,
    BpfTc6,
}

impl Case {
    pub const ALL: [Case; 10] = [
        Case::HostGw,
        Case::KernelVxlan,
        Case::BpfXdp,
        Case::BpfTc,
        Case::BpfTcVeth,
        Case::BpfHostGw,
        Case::BpfTcBaseline,
        Case::KernelVxlan6,
        Case::BpfXdp6,
        Case::BpfTc6,
    ];
    /// The agent's IPv4 cases, in table order.
    pub const BPF: [Case; 5] = [
        Case::BpfXdp,
        Case::BpfTc,
        Case::BpfTcVeth,
        Case::BpfHostGw,
        Case::BpfTcBaseline,
    ];
    /// What runs without `--cases`: every case but the baseline build's.
    pub fn default_cases() -> Vec<Case> {
        Case::ALL
            .into_iter()
            .filter(|c| *c != Case::BpfTcBaseline)
            .collect()
    }
    /// The agent's IPv6 cases, in table order; their baseline is [`Case::KernelVxlan6`].
    pub const BPF6: [Case; 2] = [Case::BpfXdp6, Case::BpfTc6];

    pub fn name(self) -> &'static str {
        match self {
            Case::HostGw => "host-gw",
            Case::KernelVxlan => "kernel-vxlan",
            Case::BpfXdp => "bpf-xdp",
            Case::BpfTc => "bpf-tc",
            Case::BpfTcVeth => "bpf-tc-veth",
            Case::BpfHostGw => "bpf-hostgw",
            Case::BpfTcBaseline => "bpf-tc-baseline",
            Case::KernelVxlan6 => "kernel-vxlan6",
            Case::BpfXdp6 => "bpf-xdp6",
            Case::BpfTc6 => "bpf-tc6",
        }
    }

    /// Pods talk IPv6 over an IPv6 underlay.
    pub fn ipv6(self) -> bool {
        matches!(self, Case::KernelVxlan6 | Case::BpfXdp6 | Case::BpfTc6)
    }

    pub fn by_name(name: &str) -> Option<Case> {
        Case::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The agent's flags for this case.
    fn agent_flags(self) -> &'static [&'static str] {
        match self {
            Case::BpfXdp | Case::BpfXdp6 => &["--decap", "xdp"],
            Case::BpfTc | Case::BpfTc6 | Case::BpfTcBaseline => &["--decap", "tc", "--deliver", "peer"],
            Case::BpfTcVeth => &["--decap", "tc", "--deliver", "veth"],
            Case::BpfHostGw => &["--decap", "tc"],
            Case::HostGw | Case::KernelVxlan | Case::KernelVxlan6 => &[],
        }
    }
}

/// Underlay behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// veth defaults: TSO/GSO on, so 64 KB segments cross the "wire" whole.
    Veth,
    /// Like a real NIC: senders segment to the MTU (tso/gso off), receivers coalesce (gro on).
    Nic,
}

impl Flavour {
    pub const ALL: [Flavour; 2] = [Flavour::Veth, Flavour::Nic];

    pub fn name(self) -> &'static str {
        match self {
            Flavour::Veth => "veth",
            Flavour::Nic => "nic-emulation",
        }
    }
}

enum Kind {
    // Field order is drop order: nodes (and their pods) before the underlay.
    Plain {
        nodes: Vec<Node>,
        underlay: Underlay,
    },
    Agents(Cluster),
    /// The dual-stack cluster and its two pods (IPv4 and IPv6 addresses), pods first.
    Agents6 {
        pods: Vec<Netns>,
        cluster: Cluster,
    },
}

/// The variable naming the build `bpf-tc-baseline` runs.
pub const BASELINE_ENV: &str = "OVERLAY_BASELINE_AGENT_BIN";

fn baseline_agent() -> Result<std::path::PathBuf> {
    let p = std::env::var_os(BASELINE_ENV).map(std::path::PathBuf::from).with_context(|| {
        format!("bpf-tc-baseline runs the build named by ${BASELINE_ENV} (e.g. the last release's target/release/overlay-agent); it is not set")
    })?;
    anyhow::ensure!(p.is_file(), "${BASELINE_ENV}={}: no such file", p.display());
    Ok(p)
}

/// One case's testbed: two nodes, one pod each; traffic goes pod on node1 → pod on node2.
pub struct Bed {
    pub case: Case,
    kind: Kind,
    pub client_ip: IpAddr,
    pub server_ip: IpAddr,
}

/// The IPv6 pod subnet of plain node `index`, inside [`DUAL`]'s IPv6 Network.
fn subnet6(index: u8) -> Ipv6Net {
    Ipv6Net::new(
        Ipv6Addr::new(0xfd00, 0x10, 0x244, u16::from(index), 0, 0, 0, 0),
        64,
    )
    .expect("a /64")
}

impl Bed {
    pub fn new(case: Case) -> Result<Self> {
        let bed = match case {
            Case::HostGw | Case::KernelVxlan | Case::KernelVxlan6 => Self::plain(case)?,
            Case::BpfXdp | Case::BpfTc | Case::BpfTcVeth | Case::BpfHostGw | Case::BpfTcBaseline => {
                Self::agents(case)?
            }
            Case::BpfXdp6 | Case::BpfTc6 => Self::agents6(case)?,
        };
        if case.ipv6() {
            bed.wait_ping(Duration::from_secs(10))
                .with_context(|| format!("{}: pods cannot reach each other", case.name()))?;
            bed.learn_path_mtu();
        }
        Ok(bed)
    }

    fn plain(case: Case) -> Result<Self> {
        let underlay = Underlay::new()?;
        let pod_mtu = if case == Case::HostGw {
            UNDERLAY_MTU
        } else {
            UNDERLAY_MTU - 50
        };
        let mut nodes = Vec::new();
        for i in 1..=2u8 {
            let mut n = Node::new(&underlay, i, UNDERLAY_MTU)?;
            n.add_bridge(pod_mtu)?;
            n.add_pod(1, pod_mtu)?;
            nodes.push(n);
        }
        let subnet = |i: u8| -> Ipv4Net { Node::subnet(i).parse().expect("subnet") };
        match case {
            Case::HostGw => {
                host_gw(&nodes[0], &[(subnet(2), Node::underlay_ip(2))])?;
                host_gw(&nodes[1], &[(subnet(1), Node::underlay_ip(1))])?;
            }
            Case::KernelVxlan => {
                // Devices first (to learn the MACs), then the peers: flanneld's order too.
                let m1 = flannel_vxlan(&nodes[0], subnet(1), &[])?;
                let m2 = flannel_vxlan(&nodes[1], subnet(2), &[])?;
                flannel_vxlan(&nodes[0], subnet(1), &[(subnet(2), Node::underlay_ip(2), m2)])?;
                flannel_vxlan(&nodes[1], subnet(2), &[(subnet(1), Node::underlay_ip(1), m1)])?;
            }
            _ => {
                // The IPv6 side of a dual-stack node: underlay address, cni0's ::1, the pod's ::2
                // (the pods keep their IPv4 addresses too, as in a dual-stack cluster).
                for n in &nodes {
                    n.add_underlay6()?;
                    let sn = subnet6(n.index);
                    add_bridge_ipv6(&n.ns, sn)?;
                    add_pod_ipv6(&n.pods[0].ns, nth6(sn, 2), sn)?;
                }
                let m1 = flannel_vxlan6(&nodes[0], subnet6(1), &[])?;
                let m2 = flannel_vxlan6(&nodes[1], subnet6(2), &[])?;
                flannel_vxlan6(&nodes[0], subnet6(1), &[(subnet6(2), Node::underlay_ip6(2), m2)])?;
                flannel_vxlan6(&nodes[1], subnet6(2), &[(subnet6(1), Node::underlay_ip6(1), m1)])?;
            }
        }
        let (client_ip, server_ip) = if case.ipv6() {
            (nth6(subnet6(1), 2).into(), nth6(subnet6(2), 2).into())
        } else {
            (nodes[0].pods[0].ip.into(), nodes[1].pods[0].ip.into())
        };
        Ok(Bed {
            case,
            kind: Kind::Plain { nodes, underlay },
            client_ip,
            server_ip,
        })
    }

    fn agents(case: Case) -> Result<Self> {
        let config = if case == Case::BpfHostGw { HOST_GW } else { CONFIG };
        let mut c = Cluster::new(2, config)?;
        let bin = match case {
            Case::BpfTcBaseline => Some(baseline_agent()?),
            _ => None,
        };
        for i in 0..2 {
            c.nodes[i]
                .extra_args
                .extend(case.agent_flags().iter().map(|a| a.to_string()));
            c.nodes[i].agent_bin = bin.clone();
            c.start_agent(i)?;
        }
        let mut ips = Vec::new();
        for i in 0..2 {
            ips.push(c.add_pods(i, 1)?[0]);
        }
        let bed = Bed {
            case,
            kind: Kind::Agents(c),
            client_ip: ips[0].into(),
            server_ip: ips[1].into(),
        };
        bed.wait_ping(Duration::from_secs(10))
            .with_context(|| format!("{}: pods cannot reach each other", case.name()))?;
        Ok(bed)
    }

    /// The agent on a dual-stack network ([`DUAL`]) with IPv6 on the underlay; the pods have
    /// both families, the traffic is IPv6.
    fn agents6(case: Case) -> Result<Self> {
        let (mut cluster, subnets) = try_cluster_with(2, DUAL, |n| {
            n.extra_args
                .extend(case.agent_flags().iter().map(|a| a.to_string()))
        })?;
        let mut pods = Vec::new();
        for (i, sn) in subnets.iter().enumerate() {
            pods.push(try_bridge_and_pod(&mut cluster, i, *sn, true)?);
        }
        try_wait_peers(&cluster)?;
        Ok(Bed {
            case,
            kind: Kind::Agents6 { pods, cluster },
            client_ip: nth6(subnets[0], 2).into(),
            server_ip: nth6(subnets[1], 2).into(),
        })
    }

    pub fn client(&self) -> &Netns {
        match &self.kind {
            Kind::Plain { nodes, .. } => &nodes[0].pods[0].ns,
            Kind::Agents(c) => &c.nodes[0].node.pods[0].ns,
            Kind::Agents6 { pods, .. } => &pods[0],
        }
    }

    /// (client pod, server pod): the server side needs `&mut` to spawn processes.
    pub fn pods(&mut self) -> (&Netns, &mut Netns) {
        let nodes: Vec<&mut Node> = match &mut self.kind {
            Kind::Plain { nodes, .. } => nodes.iter_mut().collect(),
            Kind::Agents(c) => c.nodes.iter_mut().map(|n| &mut n.node).collect(),
            Kind::Agents6 { pods, .. } => {
                let (a, b) = pods.split_at_mut(1);
                return (&a[0], &mut b[0]);
            }
        };
        let mut it = nodes.into_iter();
        let a = it.next().expect("node1");
        let b = it.next().expect("node2");
        (&a.pods[0].ns, &mut b.pods[0].ns)
    }

    /// A Service as kube-proxy's iptables mode writes it, on the client's node: ClusterIP
    /// 10.96.0.10 (fd00:96::10 for IPv6 cases) port 5201 DNATed to the server pod. Returns the
    /// ClusterIP.
    pub fn add_service(&self) -> Result<IpAddr> {
        let node = match &self.kind {
            Kind::Plain { nodes, .. } => &nodes[0].ns,
            Kind::Agents(c) | Kind::Agents6 { cluster: c, .. } => &c.nodes[0].node.ns,
        };
        let (tool, vip, backend): (&str, IpAddr, String) = match self.server_ip {
            IpAddr::V4(a) => ("iptables", "10.96.0.10".parse()?, format!("{a}:5201")),
            IpAddr::V6(a) => ("ip6tables", "fd00:96::10".parse()?, format!("[{a}]:5201")),
        };
        let jump = [
            "-t",
            "nat",
            "-C",
            "PREROUTING",
            "-m",
            "comment",
            "--comment",
            "kubernetes service portals",
            "-j",
            "KUBE-SERVICES",
        ];
        if node.exec(tool, &jump).is_ok() {
            // In place since an earlier round.
            return Ok(vip);
        }
        let rules = format!(
            "*nat\n\
             :KUBE-SERVICES - [0:0]\n\
             :KUBE-SVC-BENCH - [0:0]\n\
             :KUBE-SEP-BENCH - [0:0]\n\
             -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A KUBE-SERVICES -d {vip}/{len} -p tcp -m comment --comment \"bench/iperf cluster IP\" -m tcp --dport 5201 -j KUBE-SVC-BENCH\n\
             -A KUBE-SVC-BENCH -m comment --comment \"bench/iperf -> {backend}\" -j KUBE-SEP-BENCH\n\
             -A KUBE-SEP-BENCH -p tcp -m comment --comment bench/iperf -m tcp -j DNAT --to-destination {backend}\n\
             COMMIT\n",
            len = if vip.is_ipv4() { 32 } else { 128 },
        );
        let mut child = node
            .command(&format!("{tool}-restore"))
            .arg("--noflush")
            .stdin(std::process::Stdio::piped())
            .spawn()?;
        std::io::Write::write_all(child.stdin.as_mut().context("stdin")?, rules.as_bytes())?;
        let st = child.wait()?;
        anyhow::ensure!(st.success(), "{tool}-restore of the bench Service failed ({st})");
        Ok(vip)
    }

    pub fn cluster(&mut self) -> Option<&mut Cluster> {
        match &mut self.kind {
            Kind::Agents(c) | Kind::Agents6 { cluster: c, .. } => Some(c),
            Kind::Plain { .. } => None,
        }
    }

    /// The pods' MTU is the IPv4 tunnel's (1450, what flanneld writes to subnet.env on a
    /// dual-stack node); over the IPv6 underlay the tunnel carries 1430 (VXLAN over IPv6 costs 20
    /// bytes more), so a full-size packet gets Packet Too Big, with the kernel's VXLAN and with
    /// the agent alike. A few oversize pings both ways let each pod learn the path MTU before
    /// the first measurement, so no case pays for it inside a transfer.
    fn learn_path_mtu(&self) {
        let (client, server) = match &self.kind {
            Kind::Plain { nodes, .. } => (&nodes[0].pods[0].ns, &nodes[1].pods[0].ns),
            Kind::Agents6 { pods, .. } => (&pods[0], &pods[1]),
            Kind::Agents(_) => return,
        };
        for (from, to) in [(client, self.server_ip), (server, self.client_ip)] {
            // Replies may be lost until both sides know (that is the point): no check here,
            // the measurements judge.
            let _ = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &from.name,
                    "ping",
                    "-c",
                    "3",
                    "-i",
                    "0.2",
                    "-W",
                    "1",
                    "-s",
                    "1400",
                    "-q",
                    &to.to_string(),
                ])
                .output();
        }
    }

    /// Pings node2's pod from node1's until it answers.
    pub fn wait_ping(&self, timeout: Duration) -> Result<()> {
        let w = timeout.as_secs().max(1).to_string();
        self.client().exec(
            "ping",
            &[
                "-c",
                "1",
                "-i",
                "0.01",
                "-w",
                &w,
                "-q",
                &self.server_ip.to_string(),
            ],
        )?;
        Ok(())
    }

    /// Sets the underlay offloads for `flavour` on both nodes' eth0 and the switch ports.
    pub fn set_flavour(&self, flavour: Flavour) -> Result<()> {
        let (node_feats, port_feats) = match flavour {
            Flavour::Veth => (VETH_OFFLOADS, VETH_OFFLOADS),
            // Nodes segment on transmit and coalesce on receive; the switch does neither
            // (tests/plain-bench.sh sets up the same by hand).
            Flavour::Nic => (NIC_NODE_OFFLOADS, NIC_PORT_OFFLOADS),
        };
        let (nodes, underlay): (Vec<&Node>, &Underlay) = match &self.kind {
            Kind::Plain { nodes, underlay } => (nodes.iter().collect(), underlay),
            Kind::Agents(c) | Kind::Agents6 { cluster: c, .. } => {
                (c.nodes.iter().map(|n| &n.node).collect(), &c.underlay)
            }
        };
        for n in nodes {
            ethtool_k(&n.ns, "eth0", node_feats)?;
            ethtool_k(&underlay.ns, &format!("p{}", n.index), port_feats)?;
        }
        Ok(())
    }
}
