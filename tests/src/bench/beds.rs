//! The four cases, each on its own underlay segment so they can stay up side by side and be
//! measured alternately: (a) host-gw routing, (b) flanneld's kernel VXLAN device, (c) the agent
//! with XDP decap, with TC decap delivering by bpf_redirect_peer, and by bpf_redirect to the veth.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result};
use ipnet::Ipv4Net;
use overlay_tests::{
    cluster::{Cluster, UNDERLAY_MTU},
    netns::Netns,
    topology::{ethtool_k, flannel_vxlan, host_gw, Node, Underlay},
};

/// Network config for the agent clusters (flannel's default SubnetLen 24).
pub const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    HostGw,
    KernelVxlan,
    BpfXdp,
    BpfTc,
    BpfTcVeth,
}

impl Case {
    pub const ALL: [Case; 5] = [
        Case::HostGw,
        Case::KernelVxlan,
        Case::BpfXdp,
        Case::BpfTc,
        Case::BpfTcVeth,
    ];
    /// The agent's cases, in table order.
    pub const BPF: [Case; 3] = [Case::BpfXdp, Case::BpfTc, Case::BpfTcVeth];

    pub fn name(self) -> &'static str {
        match self {
            Case::HostGw => "host-gw",
            Case::KernelVxlan => "kernel-vxlan",
            Case::BpfXdp => "bpf-xdp",
            Case::BpfTc => "bpf-tc",
            Case::BpfTcVeth => "bpf-tc-veth",
        }
    }

    pub fn by_name(name: &str) -> Option<Case> {
        Case::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The agent's flags for this case.
    fn agent_flags(self) -> &'static [&'static str] {
        match self {
            Case::BpfXdp => &["--decap", "xdp"],
            Case::BpfTc => &["--decap", "tc", "--deliver", "peer"],
            Case::BpfTcVeth => &["--decap", "tc", "--deliver", "veth"],
            Case::HostGw | Case::KernelVxlan => &[],
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
    Plain { nodes: Vec<Node>, underlay: Underlay },
    Agents(Cluster),
}

/// One case's testbed: two nodes, one pod each; traffic goes pod on node1 → pod on node2.
pub struct Bed {
    pub case: Case,
    kind: Kind,
    pub server_ip: Ipv4Addr,
}

impl Bed {
    pub fn new(case: Case) -> Result<Self> {
        match case {
            Case::HostGw | Case::KernelVxlan => Self::plain(case),
            Case::BpfXdp | Case::BpfTc | Case::BpfTcVeth => Self::agents(case),
        }
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
            _ => {
                // Devices first (to learn the MACs), then the peers: flanneld's order too.
                let m1 = flannel_vxlan(&nodes[0], subnet(1), &[])?;
                let m2 = flannel_vxlan(&nodes[1], subnet(2), &[])?;
                flannel_vxlan(&nodes[0], subnet(1), &[(subnet(2), Node::underlay_ip(2), m2)])?;
                flannel_vxlan(&nodes[1], subnet(2), &[(subnet(1), Node::underlay_ip(1), m1)])?;
            }
        }
        let server_ip = nodes[1].pods[0].ip;
        Ok(Bed {
            case,
            kind: Kind::Plain { nodes, underlay },
            server_ip,
        })
    }

    fn agents(case: Case) -> Result<Self> {
        let mut c = Cluster::new(2, CONFIG)?;
        for i in 0..2 {
            c.nodes[i]
                .extra_args
                .extend(case.agent_flags().iter().map(|a| a.to_string()));
            c.start_agent(i)?;
        }
        let mut ips = Vec::new();
        for i in 0..2 {
            ips.push(c.add_pods(i, 1)?[0]);
        }
        let bed = Bed {
            case,
            kind: Kind::Agents(c),
            server_ip: ips[1],
        };
        bed.wait_ping(Duration::from_secs(10))
            .with_context(|| format!("{}: pods cannot reach each other", case.name()))?;
        Ok(bed)
    }

    pub fn client(&self) -> &Netns {
        match &self.kind {
            Kind::Plain { nodes, .. } => &nodes[0].pods[0].ns,
            Kind::Agents(c) => &c.nodes[0].node.pods[0].ns,
        }
    }

    /// (client pod, server pod): the server side needs `&mut` to spawn processes.
    pub fn pods(&mut self) -> (&Netns, &mut Netns) {
        let nodes: Vec<&mut Node> = match &mut self.kind {
            Kind::Plain { nodes, .. } => nodes.iter_mut().collect(),
            Kind::Agents(c) => c.nodes.iter_mut().map(|n| &mut n.node).collect(),
        };
        let mut it = nodes.into_iter();
        let a = it.next().expect("node1");
        let b = it.next().expect("node2");
        (&a.pods[0].ns, &mut b.pods[0].ns)
    }

    pub fn cluster(&mut self) -> Option<&mut Cluster> {
        match &mut self.kind {
            Kind::Agents(c) => Some(c),
            Kind::Plain { .. } => None,
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
        let (node_feats, port_feats): (&[&str], &[&str]) = match flavour {
            // veth's defaults.
            Flavour::Veth => (
                &["tso", "on", "gso", "on", "gro", "off"],
                &["tso", "on", "gso", "on", "gro", "off"],
            ),
            // Nodes segment on transmit and coalesce on receive; the switch does neither.
            Flavour::Nic => (
                &["tso", "off", "gso", "off", "gro", "on"],
                &["tso", "off", "gso", "off", "gro", "off"],
            ),
        };
        let (nodes, underlay): (Vec<&Node>, &Underlay) = match &self.kind {
            Kind::Plain { nodes, underlay } => (nodes.iter().collect(), underlay),
            Kind::Agents(c) => (c.nodes.iter().map(|n| &n.node).collect(), &c.underlay),
        };
        for n in nodes {
            ethtool_k(&n.ns, "eth0", node_feats)?;
            ethtool_k(&underlay.ns, &format!("p{}", n.index), port_feats)?;
        }
        Ok(())
    }
}
