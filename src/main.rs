//! `updraft`: arguments → validated plan → shards → wait for a signal → drain.
//!
//! Exit codes: 0 after a clean stop, 1 for a bad config, 2 when the collector
//! cannot start (io_uring refused, a port taken), 3 when the shards did not
//! drain within `shutdown_timeout_ms`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use updraft::config::Plan;

#[cfg(not(feature = "count-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(feature = "count-alloc")]
#[global_allocator]
static GLOBAL: updraft::alloc_count::Counting = updraft::alloc_count::Counting;

/// The configuration `updraft run` uses when given none.
const QUICKSTART: &str = include_str!("../examples/quickstart.toml");

#[derive(Parser)]
#[command(
    name = "updraft",
    version,
    about = "A Linux-native edge collector: UDP/TCP in, batches out, nothing dropped silently"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the collector.
    Run {
        /// Config file (TOML). Without it, the embedded quickstart config.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check a config file and print the plan; exit non-zero if it is bad.
    Validate {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn load(config: Option<&PathBuf>) -> Result<Plan, String> {
    match config {
        Some(path) => Plan::from_path(path).map_err(|e| format!("{}: {e}", path.display())),
        None => Plan::from_toml(QUICKSTART).map_err(|e| format!("embedded quickstart: {e}")),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UPDRAFT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config } => match load(Some(&config)) {
            Ok(plan) => {
                println!(
                    "{}: ok ({} shards, {} sources, {} sinks)",
                    config.display(),
                    plan.shards,
                    plan.sources.len(),
                    plan.sinks.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        },
        Command::Run { config } => run(config.as_ref()),
    }
}

fn run(config: Option<&PathBuf>) -> ExitCode {
    let plan = match load(config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let mut signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::from(2);
        }
    };
    let shards = plan.shards;
    let running = match updraft::runtime::start(plan) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(
        shards,
        version = env!("CARGO_PKG_VERSION"),
        "updraft running"
    );
    let signal = signals.forever().next().unwrap_or(0);
    tracing::info!(signal, "stopping: flushing what is batched");
    if running.stop() {
        tracing::info!("stopped");
        ExitCode::SUCCESS
    } else {
        tracing::error!("shards did not drain within shutdown_timeout_ms; records still held in memory are lost");
        ExitCode::from(3)
    }
}
