//! Log output that can never take the collector down, and log lines that
//! cannot flood it.
//!
//! - [`init`] installs the tracing subscriber with a stderr writer that
//!   ignores write errors: with stderr a pipe whose reader went away (a
//!   closed terminal, a log shipper that died), a log line is lost, never a
//!   panic (the standard `eprintln!` and tracing-subscriber's own error
//!   report both panic on `EPIPE`).
//! - [`say`] is the binaries' `eprintln!` without the panic.
//! - [`LogEvery`] lets a per-event line (a refused connection, a bad
//!   datagram) through at most once per interval, counting the rest.
//! - [`watch_panics`] counts a panic on any thread (a task that died) so
//!   that `/ready` and a metric show it.
//!
//! Nothing here allocates per record or blocks a shard beyond one `write(2)`
//! to stderr.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Writes to stderr and forgets failures.
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A closed or full pipe loses the line; the caller must not notice.
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Installs the tracing subscriber (`UPDRAFT_LOG` is the filter; `info`
/// without it).
pub fn init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UPDRAFT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(|| Stderr)
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Prints one line to stderr; a closed stderr loses it silently.
pub fn say(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(Stderr, "{line}");
}

/// Prints one line to stdout; a closed stdout loses it silently.
pub fn print(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Panics seen on any thread since start.
static PANICS: AtomicU64 = AtomicU64::new(0);

/// Counts every panic (and logs it through tracing, which cannot panic on a
/// closed stderr), then runs the default hook's report through the same
/// safe writer. Tasks run on the shards' runtimes; a panicking task ends
/// alone, so counting is how its death gets noticed (`/ready`, metrics).
pub fn watch_panics() {
    std::panic::set_hook(Box::new(|info| {
        PANICS.fetch_add(1, Ordering::Relaxed);
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        tracing::error!(
            thread = name,
            "a task died: {info}; the collector is not ready any more (restart it)"
        );
    }));
}

/// Panics seen so far (tasks that died).
pub fn panics() -> u64 {
    PANICS.load(Ordering::Relaxed)
}

/// Lets a log line through at most once per interval, counting the rest.
#[derive(Debug)]
pub struct LogEvery {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogEvery {
    pub fn new(interval: Duration) -> LogEvery {
        LogEvery {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// The interval every per-event log line uses.
    pub fn ten_seconds() -> LogEvery {
        LogEvery::new(Duration::from_secs(10))
    }

    /// `Some(n)` when a line may be logged now (`n` lines were held back
    /// since the last one), `None` otherwise.
    pub fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}
