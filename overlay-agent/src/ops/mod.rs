//! Operations: systemd notifications, `/healthz` `/readyz` `/metrics`, `--ip-masq` and
//! `--iptables-forward-rules` (each for IPv4 and IPv6, as flanneld), and the
//! `status`, `cleanup` and `docker-opts` subcommands. The agent loop calls [`Ops`] around each
//! control-plane event; nothing here touches etcd, and BPF only through pinned maps.

pub mod conntrack;
pub mod forward;
pub mod http;
pub mod masq;
pub mod netfilter;
pub mod notify;

use std::net::SocketAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::metrics::{CounterSource, PeerCounts, METRICS};
use crate::{
    control::Event,
    dataplane::{self, DecapMode},
};
use netfilter::IpFamily;

/// What the operations side runs with.
#[derive(Debug, Clone)]
pub struct OpsOptions {
    /// Where the datapath counters are read for `/metrics`.
    pub pin_root: std::path::PathBuf,
    /// `--healthz-ip`:`--healthz-port` (`None`: port 0, off).
    pub healthz: Option<SocketAddr>,
    pub ip_masq: bool,
    /// `--iptables-forward-rules`.
    pub forward_rules: bool,
}

/// The agent's operations side: started once decap is attached.
pub struct Ops {
    ip_masq: bool,
    /// The config's IPv4 `Network` and `IPv6Network` (either may be off).
    network: Option<Ipv4Net>,
    network6: Option<Ipv6Net>,
    ready_sent: bool,
    /// What the masquerade tables were last installed for.
    masq_for: Option<masq::MasqNets>,
    forward_rules: bool,
    /// Per family (IPv4, IPv6): the network the FORWARD rules were last found or written for.
    forward_for: [Option<IpNet>; 2],
    /// The networks the conntrack table was last installed for.
    conntrack_for: Option<(Option<Ipv4Net>, Option<Ipv6Net>)>,
}

/// Taken when an event arrives, handed back once it has been applied to the maps.
pub struct Received {
    at: Instant,
    own: Option<OwnLease>,
}

/// Our lease as [`Ops::applied`] needs it.
struct OwnLease {
    subnet: Option<Ipv4Net>,
    subnet6: Option<Ipv6Net>,
    /// The subnet that names the lease: IPv4, else IPv6.
    named: IpNet,
    expiration: Option<Instant>,
}

impl Ops {
    /// Marks the programs attached with `decap` on the underlay, starts the HTTP endpoint (port
    /// 0: off) and, without `--ip-masq`, removes a masquerade table a previous run with it left
    /// behind.
    pub async fn start(args: &OpsOptions, decap: DecapMode) -> Result<Ops, http::HttpError> {
        METRICS.update(|s| {
            s.attached = true;
            s.decap = Some(decap.label());
            s.datapath = Some(CounterSource {
                pin_root: args.pin_root.clone(),
                read: |p| dataplane::pinned::read_pinned_counters(p).ok().map(|c| c.0),
                read_peers: read_peer_counts,
            });
        });
        if let Some(addr) = args.healthz {
            http::spawn(addr).await?;
        }
        if !args.ip_masq {
            if let Err(e) = masq::remove() {
                error!(error = %e, "removing a stale ip-masq table");
            }
        }
        Ok(Ops {
            ip_masq: args.ip_masq,
            network: None,
            network6: None,
            ready_sent: false,
            masq_for: None,
            forward_rules: args.forward_rules,
            forward_for: [None; 2],
            conntrack_for: None,
        })
    }

    pub fn received(&mut self, ev: &Event) -> Received {
        let own = match ev {
            Event::Config(cfg) => {
                self.network = cfg.network();
                self.network6 = cfg.ipv6_network();
                self.ensure_conntrack();
                self.ensure_forward();
                None
            }
            Event::OwnLease(l) => l
                .subnet
                .map(IpNet::V4)
                .or(l.ipv6_subnet.map(IpNet::V6))
                .map(|named| OwnLease {
                    subnet: l.subnet,
                    subnet6: l.ipv6_subnet,
                    named,
                    expiration: l.expiration,
                }),
            _ => None,
        };
        Received {
            at: Instant::now(),
            own,
        }
    }

    /// After the event is in the maps: latency, peer count, lease state; on our lease the
    /// masquerade rules and (the first time) READY=1.
    pub fn applied(&mut self, r: Received, peers: usize) {
        METRICS.observe_sync(r.at.elapsed());
        METRICS.peers.set(peers as i64);
        let Some(own) = r.own else {
            return;
        };
        let subnet = own.named;
        METRICS.update(|s| {
            s.subnet = Some(subnet);
            s.expiration = own.expiration;
        });
        if self.ip_masq {
            self.install_masq(own.subnet, own.subnet6);
        }
        if !self.ready_sent {
            self.ready_sent = true;
            notify::ready(subnet);
            info!(%subnet, "ready");
        }
    }

    /// The masquerade tables for each family whose network is configured and in which our
    /// lease has a subnet (an IPv6-only network gets only the IPv6 table).
    fn install_masq(&mut self, subnet: Option<Ipv4Net>, subnet6: Option<Ipv6Net>) {
        let nets = masq::MasqNets {
            v4: self.network.zip(subnet),
            v6: self.network6.zip(subnet6),
        };
        if nets.is_empty() {
            error!("no network config before our lease: cannot set up ip-masq");
            return;
        }
        if self.masq_for == Some(nets) {
            return;
        }
        match masq::install(&nets) {
            Ok(()) => {
                info!(rules = %nets, table = masq::TABLE, "ip-masq rules installed");
                self.masq_for = Some(nets);
            }
            Err(e) => error!(error = %e, "installing ip-masq rules"),
        }
    }

    /// The `inet overlay-agent` table for the configured networks ([`conntrack`]), when they
    /// changed. A node without nftables keeps running: its Services work unless br_netfilter
    /// is on, and the error says so.
    fn ensure_conntrack(&mut self) {
        let nets = (self.network, self.network6);
        if self.conntrack_for == Some(nets) {
            return;
        }
        match conntrack::install(nets.0, nets.1) {
            Ok(()) => {
                info!(
                    table = conntrack::TABLE,
                    family = "inet",
                    "conntrack rules installed"
                );
                self.conntrack_for = Some(nets);
            }
            Err(e) => error!(error = %e, "installing the conntrack rules"),
        }
    }

    /// `--iptables-forward-rules`: puts the FORWARD rules for each configured network (IPv4 with
    /// iptables, IPv6 with ip6tables) in place, at once when the config arrives, then every
    /// `--iptables-resync`, rewriting them when someone removed them. They stay when the agent
    /// stops; `cleanup` removes them.
    pub fn ensure_forward(&mut self) {
        if !self.forward_rules {
            return;
        }
        let networks = [self.network.map(IpNet::V4), self.network6.map(IpNet::V6)];
        for (last, network) in self.forward_for.iter_mut().zip(networks) {
            if let Some(network) = network {
                ensure_forward_family(network, last);
            }
        }
    }

    /// SIGTERM/SIGINT.
    pub fn stopping(&self) {
        notify::stopping();
    }
}

/// [`Ops::ensure_forward`] for one family's `network`; `last` is the network its rules were
/// last found or written for.
fn ensure_forward_family(network: IpNet, last: &mut Option<IpNet>) {
    let fam = IpFamily::of(&network);
    let family = fam.name();
    let backends = match forward::backends(fam) {
        Ok(b) => b,
        Err(e) => {
            error!(error = %e, family, "iptables-forward-rules: cannot tell the iptables backend");
            return;
        }
    };
    for b in backends {
        match forward::ensure(b, network) {
            Ok(forward::Ensured::AlreadyThere) => {}
            Ok(forward::Ensured::Written) if *last == Some(network) => {
                warn!(%network, family, backend = b.label(), chain = forward::CHAIN, "FORWARD rules were missing; rewritten")
            }
            Ok(forward::Ensured::Written) => {
                info!(%network, family, backend = b.label(), chain = forward::CHAIN, "FORWARD accept rules installed")
            }
            Err(e) => error!(error = %e, family, backend = b.label(), "installing the FORWARD accept rules"),
        }
    }
    *last = Some(network);
}

/// Every member's traffic counts for `/metrics` (a datapath pinned by an older release has no
/// members); `None` once the pins are gone.
fn read_peer_counts(pin_root: &std::path::Path) -> Option<PeerCounts> {
    let peers = dataplane::pinned::read_member_stats(pin_root)
        .ok()?
        .unwrap_or_default();
    Some(PeerCounts {
        now_ns: dataplane::pinned::coarse_now_ns(),
        peers,
    })
}
