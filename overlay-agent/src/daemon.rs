//! The composition root: resolves the underlay, loads and attaches the datapath, starts the
//! control plane and the operations side, and runs the select loop that hands each event to
//! the wing it is for. No policy lives here.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::sync::mpsc;
use tracing::info;

use crate::{
    control::{self, ControlOptions, NodeIdentity},
    dataplane::{object, Dataplane},
    node::{
        sysctl,
        underlay::{self, Selection},
    },
    ops::{self, OpsOptions},
    reconcile::{
        decap::{self, DecapChoice, DeliverChoice},
        encap_hook::BridgeWatch,
        endpoints, Reconciler,
    },
};

/// How often the agent looks for the pod bridge (Docker creates docker0 after us).
const BRIDGE_POLL: Duration = Duration::from_millis(500);

/// How often held-down peers are checked for removal.
const REAP_TICK: Duration = Duration::from_millis(100);

/// What the agent runs with (the command line's, checked).
#[derive(Debug, Clone)]
pub struct Options {
    pub underlay: Selection,
    /// `--public-ip`, `--public-ipv6` (default: the underlay's addresses).
    pub public_ip: Option<Ipv4Addr>,
    pub public_ipv6: Option<Ipv6Addr>,
    pub pin_root: PathBuf,
    pub bridge: String,
    pub decap: DecapChoice,
    pub deliver: DeliverChoice,
    pub receive_gro: bool,
    /// How often the FORWARD rules and the host device are checked.
    pub resync: Duration,
    pub control: ControlOptions,
    pub ops: OpsOptions,
}

/// Runs the agent until SIGTERM/SIGINT or a fatal error.
pub async fn run(o: Options) -> Result<()> {
    object::object()?;
    let underlay = underlay::resolve(&o.underlay).context("finding the underlay interface (--iface)")?;
    // None on a host without IPv4: fine for an IPv6-only network; a config that enables IPv4
    // is then refused, naming --public-ip (NodeIdentity::lease_attrs).
    let public_ip = o.public_ip.or(underlay.ipv4);
    // flanneld: --public-ipv6, else the interface's preferred IPv6 address; used only when the
    // network config enables IPv6.
    let public_ipv6 = o.public_ipv6.or(underlay.ipv6);
    let node = NodeIdentity::new(public_ip, public_ipv6, underlay.mtu, underlay.addrs.clone());
    let vtep_mac = node.vtep_mac;
    info!(
        iface = %underlay.name,
        public_ip = %public_ip.map_or("none".to_string(), |a| a.to_string()),
        public_ipv6 = %public_ipv6.map_or("none".to_string(), |a| a.to_string()),
        vtep_mac = %crate::control::lease::MacAddr(node.vtep_mac),
        "starting overlay-agent"
    );
    sysctl::enable_ip_forward()?;

    let mut dp = Dataplane::load(&o.pin_root)?;
    log_kernel_features(&dp);
    let decap = decap::attach(&mut dp, &underlay.name, o.decap)
        .with_context(|| format!("attaching decap to {}", underlay.name))?;
    info!(iface = %underlay.name, mode = ?decap.mode, pin_root = %o.pin_root.display(), "decap attached");
    let mut ops = ops::Ops::start(&o.ops, decap.mode).await?;

    let (tx, mut rx) = mpsc::channel(4096);
    let control_opts = o.control.clone();
    let mut control = tokio::spawn(async move { control::run(&control_opts, node, tx).await });

    let mut state = Reconciler::start(
        &dp,
        underlay,
        public_ip,
        public_ipv6,
        vtep_mac,
        decap::datapath_flags(o.deliver, decap.hardware),
        decap.receive_gro(o.receive_gro),
    )
    .await;
    let mut bridge = BridgeWatch::new(&o.bridge);
    let (mut local, mut local_watch) = endpoints::start(&dp, &o.bridge);
    let mut poll = tokio::time::interval(BRIDGE_POLL);
    let mut reap = tokio::time::interval(REAP_TICK);
    let mut resync = tokio::time::interval(o.resync);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => {
                    let seen = ops.received(&ev);
                    state.apply(&mut dp, ev).await;
                    local.own_subnets(&mut dp, state.own_subnets());
                    ops.applied(seen, state.peers());
                }
                // The control plane ended (dropping its sender): its result says why. Without
                // this a fatal error (a bad network config) could end the agent with status 0.
                None => return control_result((&mut control).await),
            },
            _ = poll.tick() => bridge.check(&mut dp),
            d = local_watch.next() => local.discovered(&mut dp, d),
            _ = reap.tick() => state.reap(&mut dp).await,
            _ = resync.tick() => {
                ops.ensure_forward();
                state.resync(&mut dp).await;
            }
            r = &mut control => return control_result(r),
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: exiting, pinned maps stay"); ops.stopping(); break; }
            _ = term.recv() => { info!("SIGTERM: exiting, pinned maps stay"); ops.stopping(); break; }
        }
    }
    Ok(())
}

fn control_result(r: Result<Result<(), control::ControlError>, tokio::task::JoinError>) -> Result<()> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e).context("control plane stopped"),
        Err(e) => Err(e).context("control plane task"),
    }
}

/// One line per kernel feature the datapath can use: what it does where one is missing.
fn log_kernel_features(dp: &Dataplane) {
    let kernel = crate::dataplane::kernel_release();
    for (name, present, without) in dp.features().describe() {
        if present {
            info!(%kernel, feature = name, "kernel feature in use");
        } else {
            info!(%kernel, feature = name, fallback = without, "kernel feature missing");
        }
    }
}
