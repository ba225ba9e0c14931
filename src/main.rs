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
    /// A live view of a running collector, read from its metrics endpoint:
    /// per source and sink, records/s, bytes/s, drops, queues, retries,
    /// requests in flight and the disk buffer.
    Top {
        /// The collector's metrics address (default: `metrics.address` of
        /// --config, else 127.0.0.1:9598).
        #[arg(long, short)]
        metrics: Option<std::net::SocketAddr>,
        /// The collector's config file, to find its metrics address.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the table once (rates over one interval) and exit.
        #[arg(long)]
        once: bool,
        /// Refresh interval in milliseconds (100..=60000).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60000))]
        interval_ms: u64,
    },
}

fn load(config: Option<&PathBuf>) -> Result<Plan, String> {
    match config {
        Some(path) => Plan::from_path(path).map_err(|e| format!("{}: {e}", path.display())),
        None => Plan::from_toml(QUICKSTART).map_err(|e| format!("embedded quickstart: {e}")),
    }
}

/// Signals that stop the collector (flushing what is batched).
const STOP_SIGNALS: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT];
/// Signals a service may be sent that would otherwise kill it on the spot
/// (their default action is to terminate): logged and ignored. (SIGHUP
/// reloads the config.)
const IGNORED_SIGNALS: [i32; 8] = [
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGIO,
    libc::SIGPWR,
    libc::SIGXFSZ,
];

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGALRM => "SIGALRM",
        libc::SIGVTALRM => "SIGVTALRM",
        libc::SIGPROF => "SIGPROF",
        libc::SIGIO => "SIGIO",
        libc::SIGPWR => "SIGPWR",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => "a signal",
    }
}

fn main() -> ExitCode {
    updraft::logging::init();
    updraft::logging::watch_panics();
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config } => match load(Some(&config)) {
            Ok(plan) => {
                updraft::logging::print(format_args!(
                    "{}: ok ({} shards, {} sources, {} sinks)",
                    config.display(),
                    plan.shards,
                    plan.sources.len(),
                    plan.sinks.len()
                ));
                ExitCode::SUCCESS
            }
            Err(e) => {
                updraft::logging::say(format_args!("error: {e}"));
                ExitCode::from(1)
            }
        },
        Command::Run { config } => run(config.as_ref()),
        Command::Top {
            metrics,
            config,
            once,
            interval_ms,
        } => top(metrics, config.as_ref(), once, interval_ms),
    }
}

/// `updraft top`. Exit 1 when the address cannot be known, 2 when the
/// collector cannot be read.
fn top(
    metrics: Option<std::net::SocketAddr>,
    config: Option<&PathBuf>,
    once: bool,
    interval_ms: u64,
) -> ExitCode {
    let address = match (metrics, config) {
        (Some(a), _) => a,
        (None, Some(_)) => match load(config) {
            Ok(plan) => match plan.metrics_address {
                Some(a) => a,
                None => {
                    updraft::logging::say(format_args!(
                        "error: {} has no metrics.address; give --metrics",
                        config.expect("given").display()
                    ));
                    return ExitCode::from(1);
                }
            },
            Err(e) => {
                updraft::logging::say(format_args!("error: {e}"));
                return ExitCode::from(1);
            }
        },
        (None, None) => std::net::SocketAddr::from(([127, 0, 0, 1], 9598)),
    };
    let interval = std::time::Duration::from_millis(interval_ms);
    let result = if once {
        updraft::top::once(address, interval).map(|text| print!("{text}"))
    } else {
        updraft::top::tui::run(address, interval)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            updraft::logging::say(format_args!(
                "error: cannot read http://{address}/metrics: {e}"
            ));
            ExitCode::from(2)
        }
    }
}

/// SIGHUP: reads the config file again and, when it is valid and changes
/// only sources and sinks, applies it (`config::reload`); otherwise says
/// why, naming the key, and the running config stays.
fn reload(
    running: &mut updraft::runtime::Running,
    path: Option<&PathBuf>,
    running_config: &mut Option<toml::Table>,
) {
    let Some(path) = path else {
        tracing::warn!("SIGHUP: nothing to reload (started on the embedded quickstart config, without --config)");
        return;
    };
    let file = path.display();
    let refused = |why: &dyn std::fmt::Display| {
        tracing::error!("config reload refused: {file}: {why}; the running config stays");
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return refused(&format_args!("cannot read it: {e}")),
    };
    let plan = match Plan::from_toml(&text) {
        Ok(p) => p,
        Err(e) => return refused(&e),
    };
    let (Ok(table), Some(old)) = (text.parse::<toml::Table>(), running_config.as_ref()) else {
        return refused(&"the running config could not be read back to compare with");
    };
    if *old == table {
        // logrotate's postrotate, say: nothing to do (and no plan kept).
        tracing::info!("config reloaded from {file}: nothing changed");
        return;
    }
    let change = match updraft::config::reload::merge(running.plan(), old, plan, &table) {
        Ok(c) => c,
        Err(e) => return refused(&e),
    };
    let (src_added, src_changed, src_removed) = change.sources();
    let (sink_added, sink_changed, sink_removed) = change.sinks();
    let summary = format!(
        "sources added {src_added:?}, changed {src_changed:?}, removed {src_removed:?}; sinks added {sink_added:?}, changed {sink_changed:?}, removed {sink_removed:?}"
    );
    match running.reload(change) {
        Ok(()) => {
            *running_config = Some(table);
            tracing::info!("config reloaded from {file}: {summary}");
        }
        Err(updraft::runtime::ReloadError::Refused(e)) => refused(&e),
        Err(updraft::runtime::ReloadError::Late(e)) => {
            // Handed to the shards: it is the running config now.
            *running_config = Some(table);
            tracing::error!("config reload from {file} ({summary}): {e}");
        }
    }
}

fn run(config: Option<&PathBuf>) -> ExitCode {
    // Read once: the plan and what later reloads are compared with
    // (`config::reload`) come from the same text.
    let text = match config {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => Some(t),
            Err(e) => {
                let e = updraft::config::ConfigError::Read {
                    path: path.clone(),
                    source: e,
                };
                updraft::logging::say(format_args!("error: {}: {e}", path.display()));
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    let plan = match (&text, config) {
        (Some(t), Some(path)) => Plan::from_toml(t).map_err(|e| format!("{}: {e}", path.display())),
        _ => load(None),
    };
    let plan = match plan {
        Ok(p) => p,
        Err(e) => {
            updraft::logging::say(format_args!("error: {e}"));
            return ExitCode::from(1);
        }
    };
    // Installed before any thread starts, so no signal finds its default
    // action (terminate) in place once the collector holds records.
    let mut signals = match signal_hook::iterator::Signals::new(
        STOP_SIGNALS
            .iter()
            .chain(IGNORED_SIGNALS.iter())
            .chain([libc::SIGHUP].iter())
            .copied(),
    ) {
        Ok(s) => s,
        Err(e) => {
            updraft::logging::say(format_args!("error: cannot install signal handlers: {e}"));
            return ExitCode::from(2);
        }
    };
    let shards = plan.shards;
    let mut running_config = text.and_then(|t| t.parse::<toml::Table>().ok());
    let mut running = match updraft::runtime::start(plan) {
        Ok(r) => r,
        Err(e) => {
            updraft::logging::say(format_args!("error: {e}"));
            return ExitCode::from(2);
        }
    };
    tracing::info!(
        shards,
        version = env!("CARGO_PKG_VERSION"),
        "updraft running"
    );
    let mut log_ignored = updraft::logging::LogEvery::ten_seconds();
    let signal = loop {
        let Some(signal) = signals.forever().next() else {
            break 0;
        };
        if STOP_SIGNALS.contains(&signal) {
            break signal;
        }
        if signal == libc::SIGHUP {
            reload(&mut running, config, &mut running_config);
            continue;
        }
        if let Some(held) = log_ignored.ready() {
            tracing::info!(
                signal = signal_name(signal),
                suppressed = held,
                "signal received and ignored (SIGTERM, SIGINT or SIGQUIT stop the collector)"
            );
        }
    };
    tracing::info!(
        signal = signal_name(signal),
        "stopping: flushing what is batched"
    );
    if running.stop() {
        tracing::info!("stopped");
        ExitCode::SUCCESS
    } else {
        tracing::error!("shards did not drain within shutdown_timeout_ms, or a task had died; records still held in memory are lost");
        ExitCode::from(3)
    }
}
