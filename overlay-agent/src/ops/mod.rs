//! Operations: systemd notifications, `/healthz` `/readyz` `/metrics`, `--ip-masq`,
//! `--iptables-forward-rules`, and the
//! `status`, `cleanup` and `docker-opts` subcommands. The agent loop calls [`Ops`] around each
//! control-plane event; nothing here touches etcd, and BPF only through pinned maps.

pub mod cleanup;
pub mod docker;
pub mod forward;
pub mod http;
pub mod masq;
pub mod metrics;
pub mod notify;
pub mod status;

use std::net::SocketAddr;

use ipnet::{IpNet, Ipv4Net};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::{cli::AgentArgs, control::Event, dataplane::DecapMode};
use metrics::METRICS;

/// `xdp` or `tc`: how `status` and `/metrics` name a decap mode.
pub fn decap_label(mode: DecapMode) -> &'static str {
    match mode {
        DecapMode::Xdp => "xdp",
        DecapMode::Tc => "tc",
    }
}

/// The agent's operations side: started once decap is attached.
pub struct Ops {
    ip_masq: bool,
    network: Option<Ipv4Net>,
    ready_sent: bool,
    /// (network, subnet) the masquerade table was last installed for.
    masq_for: Option<(Ipv4Net, Ipv4Net)>,
    forward_rules: bool,
    /// The network the FORWARD rules were last found or written for.
    forward_for: Option<Ipv4Net>,
}

/// Taken when an event arrives, handed back once it has been applied to the maps.
pub struct Received {
    at: Instant,
    /// Our lease: its IPv4 subnet, the subnet that names it (IPv4, else IPv6), its expiry.
    own: Option<(Option<Ipv4Net>, IpNet, Option<Instant>)>,
}

impl Ops {
    /// Marks the programs attached with `decap` on the underlay, starts the HTTP endpoint (port
    /// 0: off) and, without `--ip-masq`, removes a masquerade table a previous run with it left
    /// behind.
    pub async fn start(args: &AgentArgs, decap: DecapMode) -> Result<Ops, http::HttpError> {
        METRICS.update(|s| {
            s.attached = true;
            s.decap = Some(decap);
            s.pin_root = Some(args.pin_root.clone());
        });
        if args.healthz_port != 0 {
            http::spawn(SocketAddr::new(args.healthz_ip, args.healthz_port)).await?;
        }
        if !args.ip_masq {
            if let Err(e) = masq::remove() {
                error!(error = %e, "removing a stale ip-masq table");
            }
        }
        Ok(Ops {
            ip_masq: args.ip_masq,
            network: None,
            ready_sent: false,
            masq_for: None,
            forward_rules: args.iptables_forward_rules,
            forward_for: None,
        })
    }

    pub fn received(&mut self, ev: &Event) -> Received {
        let own = match ev {
            Event::Config(cfg) => {
                self.network = cfg.network();
                self.ensure_forward();
                None
            }
            Event::OwnLease(l) => l
                .subnet
                .map(IpNet::V4)
                .or(l.ipv6_subnet.map(IpNet::V6))
                .map(|named| (l.subnet, named, l.expiration)),
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
        let Some((subnet_v4, subnet, expiration)) = r.own else {
            return;
        };
        METRICS.update(|s| {
            s.subnet = Some(subnet);
            s.expiration = expiration;
        });
        if let (true, Some(sn)) = (self.ip_masq, subnet_v4) {
            self.install_masq(sn);
        }
        if !self.ready_sent {
            self.ready_sent = true;
            notify::ready(subnet);
            info!(%subnet, "ready");
        }
    }

    fn install_masq(&mut self, subnet: Ipv4Net) {
        let Some(network) = self.network else {
            error!("no network config before our lease: cannot set up ip-masq");
            return;
        };
        if self.masq_for == Some((network, subnet)) {
            return;
        }
        match masq::install(network, subnet) {
            Ok(()) => {
                info!(%network, %subnet, table = masq::TABLE, "ip-masq rules installed");
                self.masq_for = Some((network, subnet));
            }
            Err(e) => error!(error = %e, "installing ip-masq rules"),
        }
    }

    /// `--iptables-forward-rules`: puts the FORWARD rules for the network in place (at once when
    /// the config arrives, then every `--iptables-resync`), rewriting them when someone removed
    /// them. They stay when the agent stops; `cleanup` removes them.
    pub fn ensure_forward(&mut self) {
        let (true, Some(network)) = (self.forward_rules, self.network) else {
            return;
        };
        let backends = match forward::backends() {
            Ok(b) => b,
            Err(e) => {
                error!(error = %e, "iptables-forward-rules: cannot tell the iptables backend");
                return;
            }
        };
        for b in backends {
            match forward::ensure(b, network) {
                Ok(forward::Ensured::AlreadyThere) => {}
                Ok(forward::Ensured::Written) if self.forward_for == Some(network) => {
                    warn!(%network, backend = b.label(), chain = forward::CHAIN, "FORWARD rules were missing; rewritten")
                }
                Ok(forward::Ensured::Written) => {
                    info!(%network, backend = b.label(), chain = forward::CHAIN, "FORWARD accept rules installed")
                }
                Err(e) => error!(error = %e, backend = b.label(), "installing the FORWARD accept rules"),
            }
        }
        self.forward_for = Some(network);
    }

    /// SIGTERM/SIGINT.
    pub fn stopping(&self) {
        notify::stopping();
    }
}
