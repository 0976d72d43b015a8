//! Operations: systemd notifications, `/healthz` `/readyz` `/metrics`, `--ip-masq`, and the
//! `status`, `cleanup` and `docker-opts` subcommands. The agent loop calls [`Ops`] around each
//! control-plane event; nothing here touches etcd, and BPF only through pinned maps.

pub mod cleanup;
pub mod docker;
pub mod http;
pub mod masq;
pub mod metrics;
pub mod notify;
pub mod status;

use std::net::SocketAddr;

use ipnet::Ipv4Net;
use tokio::time::Instant;
use tracing::{error, info};

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
}

/// Taken when an event arrives, handed back once it has been applied to the maps.
pub struct Received {
    at: Instant,
    own: Option<(Ipv4Net, Option<Instant>)>,
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
        })
    }

    pub fn received(&mut self, ev: &Event) -> Received {
        let own = match ev {
            Event::Config(cfg) => {
                self.network = Some(cfg.network);
                None
            }
            Event::OwnLease(l) => Some((l.subnet, l.expiration)),
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
        let Some((subnet, expiration)) = r.own else { return };
        METRICS.update(|s| {
            s.subnet = Some(subnet);
            s.expiration = expiration;
        });
        if self.ip_masq {
            self.install_masq(subnet);
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

    /// SIGTERM/SIGINT.
    pub fn stopping(&self) {
        notify::stopping();
    }
}
