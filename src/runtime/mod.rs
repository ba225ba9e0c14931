//! Shards: threads, CPU pinning, the choice of I/O backend, start and stop.
//!
//! This is the only module that starts threads. [`start`] chooses the I/O
//! backend (`io`: io_uring where it can be set up, saying exactly what to
//! check when it cannot; see [`crate::io`]),
//! locks `data_dir` (one collector per directory: [`lock_data_dir`]),
//! refuses a source port another process listens on, binds every source's
//! sockets up front (so a taken port fails the start, not a shard), recovers
//! every disk buffer (a log that cannot be read fails the start with its
//! path), builds the ring mesh and starts one pinned thread per shard, each
//! running its own runtime of that backend; `/ready` turns true only then. [`Running::stop`] tells every shard to
//! stop and waits, up to `shutdown_timeout_ms`, for them to drain.

pub mod shard;

use crate::config::{Plan, SourceKind};
use crate::metrics::Metrics;
use crate::route::Mesh;
use crate::sources::BoundSocket;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Why the collector could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("io_uring is not available: {reason}. {hint}; or set io = \"epoll\" (or \"auto\")")]
    Uring { reason: String, hint: &'static str },
    #[error("sources.{source_name}.address: cannot bind {address}: {error}")]
    Bind {
        source_name: String,
        address: std::net::SocketAddr,
        error: std::io::Error,
    },
    #[error("metrics.address: cannot serve on {address}: {error}")]
    Metrics {
        address: std::net::SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot start shard thread {shard}: {error}")]
    Thread { shard: usize, error: std::io::Error },
    #[error("data_dir {path}: another updraft uses it{holder} (lock file {lock}); give each collector its own data_dir")]
    Locked {
        path: std::path::PathBuf,
        lock: std::path::PathBuf,
        /// ` (pid N)` when the lock file names the holder.
        holder: String,
    },
    #[error("data_dir {path}: {error}")]
    DataDir {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("sources.{source_name}.address: {address} ({kind}) is already in use by another process; two collectors must not share a port")]
    PortTaken {
        source_name: String,
        address: std::net::SocketAddr,
        kind: &'static str,
    },
    #[error("sinks.{sink}: cannot open the disk buffer: {error}")]
    Recovery { sink: String, error: std::io::Error },
}

/// The lock file in `data_dir` that one collector holds for its life.
pub const LOCK_FILE: &str = "updraft.lock";

/// Takes an exclusive `flock` on `data_dir/updraft.lock` (creating
/// `data_dir`), and writes this process's PID in it. The lock lasts as long
/// as the returned file is open, that is, the process's life; the kernel
/// drops it when the process dies, however it dies.
pub fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, StartError> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    let data_dir_error = |error| StartError::DataDir {
        path: dir.to_owned(),
        error,
    };
    std::fs::create_dir_all(dir).map_err(data_dir_error)?;
    let lock = dir.join(LOCK_FILE);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock)
        .map_err(data_dir_error)?;
    // SAFETY: flock on a descriptor this File owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(data_dir_error(e));
        }
        let mut text = String::new();
        let _ = f.read_to_string(&mut text);
        let holder = match text.trim().parse::<u32>() {
            Ok(pid) => format!(" (pid {pid})"),
            Err(_) => String::new(),
        };
        return Err(StartError::Locked {
            path: dir.to_owned(),
            lock,
            holder,
        });
    }
    let written = f
        .set_len(0)
        .and_then(|_| f.rewind())
        .and_then(|_| writeln!(f, "{}", std::process::id()));
    written.map_err(data_dir_error)?;
    Ok(f)
}

/// Fails when another process already has `src`'s port: a socket bound
/// without `SO_REUSEPORT` cannot share the port, so this bind fails where
/// another collector (or anything else) listens on it. Closed at once; the
/// shards' sockets are bound with `SO_REUSEPORT` after it.
fn check_port_free(src: &crate::config::SourcePlan) -> Result<(), StartError> {
    use socket2::{Domain, Protocol, Socket, Type};
    if src.address.port() == 0 {
        return Ok(());
    }
    let (ty, proto, kind) = match src.kind {
        SourceKind::Tcp | SourceKind::Updraft => (Type::STREAM, Protocol::TCP, "tcp"),
        SourceKind::Udp => (Type::DGRAM, Protocol::UDP, "udp"),
        SourceKind::Mqtt | SourceKind::File => return Ok(()),
    };
    let bind_error = |error| StartError::Bind {
        source_name: src.name.clone(),
        address: src.address,
        error,
    };
    let s = Socket::new(Domain::for_address(src.address), ty, Some(proto)).map_err(bind_error)?;
    if ty == Type::STREAM {
        // TIME_WAIT leftovers of an earlier run are no conflict; a listener is.
        s.set_reuse_address(true).map_err(bind_error)?;
    }
    // A collector that just died (kill -9, a crash, a restart) can hold its
    // listeners for a moment after it is gone: io_uring tears its ring (and
    // the accepts in flight that reference them) down asynchronously. So a
    // taken port is tried again for a while before it is an error.
    let deadline = Instant::now() + PORT_RELEASE_WAIT;
    loop {
        match s.bind(&src.address.into()) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
                if Instant::now() >= deadline {
                    return Err(StartError::PortTaken {
                        source_name: src.name.clone(),
                        address: src.address,
                        kind,
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(bind_error(e)),
        }
    }
}

/// How long a taken source port is tried again before the start fails.
pub const PORT_RELEASE_WAIT: Duration = Duration::from_secs(3);

/// What the shards share to stop in order.
#[derive(Debug)]
pub struct Lifecycle {
    pub stopping: AtomicBool,
    /// One wake-up per shard.
    pub stop: Vec<Notify>,
    /// Shards whose sources have finished and whose lanes have crossed.
    pub sources_done: AtomicUsize,
    /// A reload each shard is to apply (woken through `stop`).
    pub reload: Vec<std::sync::Mutex<Option<shard::ShardReload>>>,
}

/// Raises the open-file limit to its hard limit: every connection, segment
/// and socket is a descriptor, and the usual soft limit (1024) is below
/// what `max_connections` allows.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                tracing::debug!("could not raise the open-file limit");
            }
        }
    }
}

/// The CPUs this process may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::debug!(cpu, "could not pin shard thread");
        }
    }
}

/// A started collector.
pub struct Running {
    life: Arc<Lifecycle>,
    done: mpsc::Receiver<usize>,
    shards: usize,
    timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// The plan run now (with every reload's ids).
    plan: Arc<Plan>,
    /// Told each shard's id as it takes the last reload.
    reload_taken: mpsc::Receiver<usize>,
    /// The `data_dir` lock, held until the process exits.
    lock: Option<std::fs::File>,
}

/// Why a reload did not apply, or not yet.
#[derive(Debug)]
pub enum ReloadError {
    /// Nothing changed (a port taken, a path not writable, ...).
    Refused(String),
    /// Handed to the shards, but one did not take it in time.
    Late(String),
}

/// How long a reload waits for every shard to take it.
const RELOAD_WAIT: Duration = Duration::from_secs(10);

/// Starts the collector described by `plan`.
pub fn start(plan: Plan) -> Result<Running, StartError> {
    let backend = crate::io::choose(plan.io).map_err(|r| StartError::Uring {
        reason: r.reason,
        hint: r.hint,
    })?;
    crate::io::set_backend(backend);
    raise_fd_limit();
    let lock = if plan.uses_data_dir() {
        Some(lock_data_dir(&plan.data_dir)?)
    } else {
        None
    };
    let plan = Arc::new(plan);
    let n = plan.shards;
    for src in &plan.sources {
        check_port_free(src)?;
    }

    // Bind everything before any thread starts: errors name the source.
    let mut sockets: Vec<Vec<BoundSocket>> = (0..n).map(|_| Vec::new()).collect();
    for (id, src) in plan.sources.iter().enumerate() {
        if let Some(m) = &src.mqtt {
            // One session, on the first shard: it subscribes, nothing binds.
            sockets[0].push(BoundSocket::Mqtt { source: id });
            tracing::info!(source = %src.name, broker = %m.url, topics = ?m.topics, "subscribing (mqtt)");
            continue;
        }
        if let Some(f) = &src.file {
            // One tailer, on the first shard.
            sockets[0].push(BoundSocket::File { source: id });
            tracing::info!(source = %src.name, include = ?f.include, "tailing (file)");
            continue;
        }
        for shard_sockets in sockets.iter_mut() {
            let bound = crate::sources::bind(id, src).map_err(|error| StartError::Bind {
                source_name: src.name.clone(),
                address: src.address,
                error,
            })?;
            shard_sockets.push(bound);
        }
        if src.kind == SourceKind::Udp {
            tracing::info!(source = %src.name, address = %src.address, shards = n, "listening (udp)");
        } else if src.kind == SourceKind::Updraft {
            let tls = src.native.as_ref().is_some_and(|n| n.tls.is_some());
            tracing::info!(source = %src.name, address = %src.address, shards = n, tls, "listening (updraft protocol)");
        } else {
            tracing::info!(source = %src.name, address = %src.address, shards = n, framing = ?src.framing, "listening (tcp)");
        }
    }

    // Every disk buffer's log, read and mended before anything is served.
    let recovered = crate::wal::driver::recover_all(&plan)
        .map_err(|(sink, error)| StartError::Recovery { sink, error })?;

    let metrics = Arc::new(Metrics::new(
        plan.sources.iter().map(|s| s.name.clone()).collect(),
        plan.sinks
            .iter()
            .map(|s| (s.name.clone(), s.target.kind()))
            .collect(),
        n,
    ));
    if let Some(address) = plan.metrics_address {
        crate::metrics::serve(address, metrics.clone())
            .map_err(|error| StartError::Metrics { address, error })?;
        tracing::info!(%address, "metrics at /metrics, health at /health");
    }

    let life = Arc::new(Lifecycle {
        stopping: AtomicBool::new(false),
        stop: (0..n).map(|_| Notify::new()).collect(),
        sources_done: AtomicUsize::new(0),
        reload: (0..n).map(|_| std::sync::Mutex::new(None)).collect(),
    });
    // One slot per source id a reload may give (`config::SOURCE_SLOTS_MAX`).
    let connections: Arc<Vec<AtomicUsize>> = Arc::new(
        (0..crate::config::SOURCE_SLOTS_MAX.max(plan.sources.len()))
            .map(|_| AtomicUsize::new(0))
            .collect(),
    );
    let cpus = allowed_cpus();
    let (done_tx, done) = mpsc::channel();
    let ends = Mesh::build(n);
    for ((ends, shard_sockets), recovered) in ends.into_iter().zip(sockets).zip(recovered) {
        let k = ends.shard;
        let plan = plan.clone();
        let shard_metrics = metrics.shards[k].clone();
        let life = life.clone();
        let connections = connections.clone();
        let done_tx = done_tx.clone();
        let cpu = (!cpus.is_empty()).then(|| cpus[k % cpus.len()]);
        std::thread::Builder::new()
            .name(format!("updraft-shard-{k}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    pin_to(cpu);
                }
                #[cfg(feature = "count-alloc")]
                crate::alloc_count::count_this_thread();
                let ran = crate::io::run_shard(async move {
                    let shard =
                        shard::Shard::new(plan, ends, shard_metrics, life, connections, recovered);
                    shard
                        .run(move |s| crate::sources::start(s, shard_sockets))
                        .await;
                });
                if let Err(e) = ran {
                    tracing::error!(shard = k, error = %e, "cannot start the shard's runtime");
                }
                let _ = done_tx.send(k);
            })
            .map_err(|error| StartError::Thread { shard: k, error })?;
    }
    metrics.ready.store(true, Ordering::Release);
    Ok(Running {
        life,
        done,
        shards: n,
        timeout: Duration::from_millis(plan.shutdown_timeout_ms),
        metrics,
        plan,
        reload_taken: mpsc::channel().1,
        lock,
    })
}

impl Running {
    /// The plan run now.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Applies a reload ([`crate::config::reload`]) prepared against
    /// [`Running::plan`]: binds the added sources' sockets (a port taken
    /// refuses the reload before anything changes), takes the `data_dir`
    /// lock if the collector did not hold it yet, shows the new names in
    /// the metrics, and hands each shard its part; returns once every shard
    /// runs the new plan.
    pub fn reload(&mut self, r: crate::config::reload::Reload) -> Result<(), ReloadError> {
        self.prepare(r).map_err(ReloadError::Refused)?;
        let deadline = Instant::now() + RELOAD_WAIT;
        for _ in 0..self.shards {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.reload_taken.recv_timeout(left).is_err() {
                return Err(ReloadError::Late(format!(
                    "a shard did not take the new config within {} s; it applies it when it can",
                    RELOAD_WAIT.as_secs()
                )));
            }
        }
        Ok(())
    }

    /// Everything a reload does up to handing it to the shards; an error
    /// leaves the collector as it was.
    fn prepare(&mut self, r: crate::config::reload::Reload) -> Result<(), String> {
        if self
            .life
            .reload
            .iter()
            .any(|m| m.lock().unwrap_or_else(|e| e.into_inner()).is_some())
        {
            return Err(
                "a shard has not taken the last reload yet; send SIGHUP again later".into(),
            );
        }
        // The new config's paths were checked when it was read.
        let plan = Arc::new(r.plan);
        let n = self.shards;
        // Every check first, then the lock, then the binds: a refusal
        // leaves no new socket in a port's group, where it would take
        // connections only to reset them.
        let stream = |k: SourceKind| matches!(k, SourceKind::Tcp | SourceKind::Updraft);
        for &id in &r.added_sources {
            let src = &plan.sources[id];
            // A changed source's new sockets share its port with the old
            // ones (SO_REUSEPORT) until those close.
            let held = r.removed_sources.iter().any(|&o| {
                let old = &plan.sources[o];
                old.address == src.address && stream(old.kind) == stream(src.kind)
            });
            if !held {
                check_port_free(src).map_err(|e| e.to_string())?;
            }
        }
        if self.lock.is_none() && plan.uses_data_dir() {
            self.lock = Some(lock_data_dir(&plan.data_dir).map_err(|e| e.to_string())?);
        }
        let mut sockets: Vec<Vec<BoundSocket>> = (0..n).map(|_| Vec::new()).collect();
        for &id in &r.added_sources {
            let src = &plan.sources[id];
            match src.kind {
                SourceKind::Mqtt => sockets[0].push(BoundSocket::Mqtt { source: id }),
                SourceKind::File => sockets[0].push(BoundSocket::File { source: id }),
                _ => {
                    for shard_sockets in sockets.iter_mut() {
                        let bound = crate::sources::bind(id, src).map_err(|error| {
                            StartError::Bind {
                                source_name: src.name.clone(),
                                address: src.address,
                                error,
                            }
                            .to_string()
                        })?;
                        shard_sockets.push(bound);
                    }
                }
            }
        }
        self.metrics.set_names(crate::metrics::Names {
            sources: plan
                .sources
                .iter()
                .map(|s| (!s.removed).then(|| s.name.clone()))
                .collect(),
            sinks: plan
                .sinks
                .iter()
                .map(|s| (!s.removed).then(|| (s.name.clone(), s.target.kind())))
                .collect(),
        });
        let (done, taken) = mpsc::channel();
        self.reload_taken = taken;
        for (k, sockets) in sockets.into_iter().enumerate() {
            *self.life.reload[k]
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(shard::ShardReload {
                plan: plan.clone(),
                added_sinks: r.added_sinks.clone(),
                removed_sinks: r.removed_sinks.clone(),
                sockets,
                done: done.clone(),
            });
            self.life.stop[k].notify_one();
        }
        self.plan = plan;
        Ok(())
    }

    /// Tells every shard to stop and waits for them to drain. Returns false
    /// when the timeout passed first, or when a task had died (what it held
    /// is lost).
    pub fn stop(self) -> bool {
        self.life.stopping.store(true, Ordering::Release);
        for n in &self.life.stop {
            n.notify_one();
        }
        let deadline = Instant::now() + self.timeout;
        let mut stopped = 0;
        while stopped < self.shards {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.done.recv_timeout(left) {
                Ok(_) => stopped += 1,
                Err(_) => return false,
            }
        }
        crate::logging::panics() == 0
    }
}
