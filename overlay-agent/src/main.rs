use std::{io::IsTerminal as _, path::PathBuf};

use anyhow::{bail, Result};
use clap::{CommandFactory as _, Parser, Subcommand};
use overlay_agent::{
    cli::{
        self, cleanup, docker_opts as docker, explain, monitor, status, watch, AgentArgs, DEFAULT_SUBNET_FILE,
    },
    daemon,
};
use overlay_common::DEFAULT_PIN_ROOT;

/// flannel-compatible VXLAN overlay agent with an eBPF datapath. Without a subcommand it runs
/// the agent, taking flanneld's flags (`--flag`, or `-flag` as flanneld's Go flag parser reads them).
#[derive(Parser)]
#[command(
    name = "overlay-agent",
    version,
    args_conflicts_with_subcommands = true,
    // Go's flag package: a flag given twice takes its last value.
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    args: AgentArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show this node's datapath config, peers, local endpoints and counters from the pinned maps
    /// (works whether the agent runs or not).
    Status {
        #[arg(long, env = "FLANNELD_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
        /// Machine-readable output.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Redraw a view of the per-peer traffic (packets and bits per second each way, last
        /// sent / heard, drops) every --interval seconds, until Ctrl-C.
        #[arg(long)]
        watch: bool,
        /// Seconds between two frames of --watch.
        #[arg(
            long,
            value_name = "SECS",
            requires = "watch",
            default_value_t = 1,
            value_parser = clap::value_parser!(u64).range(1..=3600)
        )]
        interval: u64,
    },
    /// Show the datapath's drops live (time, hook, interface, reason, outer and inner
    /// addresses and ports, VNI) as the programs report them while this runs; what the
    /// kernel's rate limit or a full buffer kept back is said. Ctrl-C to stop.
    Monitor {
        #[arg(long, env = "FLANNELD_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Only these drop reasons (as `status` names them, e.g. drop_wrong_vni); repeatable
        /// or comma-separated. Default: all.
        #[arg(long, value_delimiter = ',')]
        reason: Vec<String>,
        /// Only drops to or from this node address (a peer's PublicIP); repeatable.
        #[arg(long, value_delimiter = ',')]
        peer: Vec<std::net::IpAddr>,
        /// Only drops whose inner packet is to or from this pod address; repeatable.
        #[arg(long, value_delimiter = ',')]
        pod: Vec<std::net::IpAddr>,
        /// Drops each CPU may report per second (the rest are counted, and said).
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Drops a CPU may report at once.
        #[arg(long, default_value_t = 200)]
        burst: u32,
        /// Stop after this many drops shown.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
    },
    /// Explain what this node's datapath does with a packet from SRC to DST (pod or node
    /// addresses, one family), hop by hop: which hook sees it, the peer entry and outer header
    /// encap uses or why it goes to the stack, the MTU, what the receiver checks, where it is
    /// delivered. Reads the pinned maps and links, the routes and subnet.env (works whether the
    /// agent runs or not).
    Explain {
        /// Source address (a pod or node IP).
        src: String,
        /// Destination address, of the same family.
        dst: String,
        #[arg(long, env = "FLANNELD_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
        /// The agent's subnet.env: the cluster networks, our lease, FLANNEL_IPMASQ.
        #[arg(long, env = "FLANNELD_SUBNET_FILE", default_value = DEFAULT_SUBNET_FILE)]
        subnet_file: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Remove everything the agent put on this node: leftover XDP/TC attachments, the host
    /// device, the pinned maps and the ip-masq nftables table. Stop the agent first. Idempotent.
    Cleanup {
        #[arg(long, env = "FLANNELD_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
        /// Underlay interface(s) the agent used (default: the interface of the default route).
        #[arg(long, env = "FLANNELD_IFACE", value_delimiter = ',')]
        iface: Vec<String>,
        /// Pod bridge the agent attached to.
        #[arg(long, env = "FLANNELD_BRIDGE", default_value = "cni0")]
        bridge: String,
        /// The agent's subnet.env: its networks tell host-gw's routes to peers' subnets.
        #[arg(long, env = "FLANNELD_SUBNET_FILE", default_value = DEFAULT_SUBNET_FILE)]
        subnet_file: PathBuf,
    },
    /// Write Docker options from subnet.env, as flannel's mk-docker-opts.sh does (its flags):
    /// `DOCKER_OPT_BIP`, `DOCKER_OPT_IPMASQ`, `DOCKER_OPT_MTU` and
    /// `DOCKER_OPTS=" --bip=… --ip-masq=… --mtu=…"`.
    DockerOpts {
        /// subnet.env to read.
        #[arg(long, short = 'f', env = "FLANNELD_SUBNET_FILE", default_value = DEFAULT_SUBNET_FILE)]
        subnet_file: PathBuf,
        /// File to write.
        #[arg(short = 'd', default_value = docker::DEFAULT_OUT)]
        out: PathBuf,
        /// Name of the combined variable.
        #[arg(short = 'k', default_value = docker::DEFAULT_KEY)]
        key: String,
        /// Write each option as its own variable (DOCKER_OPT_MTU=…).
        #[arg(short = 'i')]
        individual: bool,
        /// Write the combined variable (neither -i nor -c: both).
        #[arg(short = 'c')]
        combined: bool,
        /// Leave --ip-masq out (older Docker versions).
        #[arg(short = 'm')]
        no_ip_masq: bool,
    },
}

fn main() -> Result<()> {
    // Whatever the agent creates without naming a mode (pin directories, files of the tools it
    // runs) is private to root; the files meant to be read by others (subnet.env, docker-opts'
    // output) get 0644 explicitly.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    // flanneld unit files write `-etcd-endpoints=…`, `-iface eth0`, `-ip-masq`: read them as
    // flanneld (Go's flag package) does.
    let argv = cli::go_style_argv(std::env::args_os(), &cli::flag_table(&Cli::command()));
    let cli = Cli::parse_from(argv);
    match cli.cmd {
        Some(Cmd::Status {
            pin_root,
            watch: true,
            interval,
            ..
        }) => Ok(watch::run(
            &pin_root,
            std::time::Duration::from_secs(interval),
            &mut std::io::stdout().lock(),
        )?),
        Some(Cmd::Status { pin_root, json, .. }) => {
            let s = status::read(&pin_root)?;
            print!("{}", if json { s.to_json() + "\n" } else { s.render() });
            Ok(())
        }
        Some(Cmd::Monitor {
            pin_root,
            json,
            reason,
            peer,
            pod,
            rate,
            burst,
            count,
            duration,
        }) => {
            let o = monitor::Options {
                pin_root,
                json,
                reasons: reason,
                peers: peer,
                pods: pod,
                rate,
                burst,
                count,
                duration: duration.map(std::time::Duration::from_secs),
            };
            Ok(monitor::run(&o, &mut std::io::stdout().lock())?)
        }
        Some(Cmd::Explain {
            src,
            dst,
            pin_root,
            subnet_file,
            json,
        }) => {
            let (src, dst) = explain::parse_addrs(&src, &dst)?;
            let facts = explain::gather(&pin_root, &subnet_file, src, dst)?;
            let e = explain::explain(&facts, src, dst);
            print!("{}", if json { e.to_json() + "\n" } else { e.render() });
            Ok(())
        }
        Some(Cmd::Cleanup {
            pin_root,
            iface,
            bridge,
            subnet_file,
        }) => {
            init_logging("info");
            let mut ifaces = iface;
            if ifaces.is_empty() {
                if let Ok(u) = overlay_agent::node::underlay::resolve(&Default::default()) {
                    ifaces.push(u.name);
                }
            }
            ifaces.push(bridge);
            let mut r = cleanup::run(&pin_root, &ifaces);
            cleanup::remove_peer_routes(&subnet_file, &ifaces, &mut r);
            if r.removed.is_empty() && r.failed.is_empty() {
                println!("nothing to clean up");
            }
            for what in &r.removed {
                println!("removed {what}");
            }
            if !r.failed.is_empty() {
                bail!("could not remove:\n  {}", r.failed.join("\n  "));
            }
            Ok(())
        }
        Some(Cmd::DockerOpts {
            subnet_file,
            out,
            key,
            individual,
            combined,
            no_ip_masq,
        }) => {
            let shape = docker::Shape::new(&key, individual, combined, no_ip_masq);
            Ok(docker::write(&subnet_file, &out, &shape)?)
        }
        None => {
            init_logging(cli.args.log_level());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let options = cli.args.daemon_options()?;
            rt.block_on(daemon::run(options))
        }
    }
}

/// Logs to stderr; plain (no ANSI colours) under journald or when stderr is not a terminal.
fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("overlay_agent={level},warn")));
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = !journald && std::io::stderr().is_terminal();
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // journald stamps every line itself.
    if journald {
        fmt.without_time().init();
    } else {
        fmt.init();
    }
}
