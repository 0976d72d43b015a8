use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use overlay_agent::{agent, cli::AgentArgs, dataplane};
use overlay_common::{Counter, DEFAULT_PIN_ROOT};

/// flannel-compatible VXLAN overlay agent with an eBPF datapath. Without a subcommand it runs
/// the agent, taking flanneld's flags.
#[derive(Parser)]
#[command(name = "overlay-agent", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    args: AgentArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the datapath counters from the pinned maps (works whether the agent runs or not).
    Status {
        #[arg(long, env = "FLANNELD_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Status { pin_root }) => status(&pin_root),
        None => {
            init_logging(cli.args.log_level());
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(agent::run(cli.args))
        }
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("overlay_agent={level},warn")));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).init();
}

fn status(pin_root: &std::path::Path) -> Result<()> {
    let counters = dataplane::read_pinned_counters(pin_root)?;
    for c in Counter::ALL {
        println!("{:<22} {}", c.name(), counters.get(c));
    }
    Ok(())
}
