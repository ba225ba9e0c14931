//! `file` source: tail the files `include` matches, one record per line.
//!
//! One tailer per source, on the first shard. It finds files by scanning
//! the `include` globs (on a blocking thread: `glob` and `stat` may wait for
//! the disk), woken by inotify on the directories the globs name or matched
//! files live in (a thread of its own blocks in `read` of the inotify
//! descriptor and wakes the tailer: the shard never polls), with a slow
//! rescan ([`RESCAN`]) as a safety net. Files are read through the shard's
//! I/O backend in blocks of [`READ_BYTES`].
//!
//! **Identity.** A file is its device and inode, so a file renamed by
//! logrotate is the same file under its new name, and is read on to its
//! end; a file renamed out of what `include` matches (or deleted) is let go
//! once it has been read to its end and has not grown for [`LET_GO_AFTER`].
//! A checksum of its first [`HEAD_BYTES`] bytes (once it has that many)
//! tells a reused inode, or a file rewritten in place, from the file that
//! was there: such a file is read again from its start. A file shorter than
//! where the tailer was (`copytruncate`) is read again from its start too.
//! Compressed rotated files (`.gz`, `.zst`, `.xz`, `.bz2`, `.lz4`) are
//! never read.
//!
//! **Lines.** Newline-framed; a line longer than `max_record_bytes` is
//! skipped to its end and counted (`oversize`), so memory stays bounded by
//! one read block plus one record. The last line of a file is taken once
//! its newline is written.
//!
//! **Checkpoints** (file identity → offset of the next line) are kept in
//! `data_dir/file_source/<source>.json`, written atomically (a temporary
//! file, `fsync`, `rename`, `fsync` of the directory) at most once per
//! [`CHECKPOINT_EVERY`] and at stop. An offset is checkpointed only once the
//! lines before it are durable in every disk buffer the source feeds (or,
//! with memory buffers only, queued), so a `kill -9` repeats at most what was
//! read since the last checkpoint and loses nothing a disk buffer held.
//!
//! **Backpressure and bounds.** An offer waits while the sink is full, and
//! so does the next read. At most [`MAX_OPEN_FILES`] files are open; the
//! rest wait for one to be let go.

use crate::config::{Decoding, FileSourcePlan, ReadFrom, WhenExceeded, COMPRESSED_SUFFIXES};
use crate::io::{BoundedBuf, File, OpenOptions};
use crate::logging::LogEvery;
use crate::metrics::{DropReason, SourceCounters};
use crate::pipeline::ingest::{Ingest, Routed};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Bytes read from a file at once (beyond room for one whole record).
pub const READ_BYTES: usize = 256 * 1024;
/// Bytes at the start of a file whose checksum tells it from another file
/// that had its inode before.
pub const HEAD_BYTES: usize = 256;
/// How often the globs are scanned again without an inotify event.
pub const RESCAN: Duration = Duration::from_secs(5);
/// How long a file no longer matched (renamed away, deleted) is kept open
/// after its last growth, at its end.
pub const LET_GO_AFTER: Duration = Duration::from_secs(2);
/// How often checkpoints are written (when they moved).
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Files one source keeps open at most.
pub const MAX_OPEN_FILES: usize = 256;
/// How long a checkpoint of a file no scan finds any more is kept.
pub const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);
/// How long a stopping source waits for its last lines to settle before it
/// writes its last checkpoint.
const STOP_SETTLE_WAIT: Duration = Duration::from_secs(1);

/// Device and inode.
type Key = (u64, u64);

/// A file a scan found.
struct Found {
    path: PathBuf,
    key: Key,
    head: Option<u32>,
    /// Not matched by `include`: a checkpointed file renamed away while
    /// the collector was down, to be read to its end and let go.
    renamed: bool,
}

/// A file being tailed.
struct Tailed {
    path: PathBuf,
    file: File,
    key: Key,
    head: Option<u32>,
    /// Where the next line begins.
    pos: u64,
    /// Inside a line too long to take: where to look for its end.
    skip: Option<u64>,
    /// Seen by the latest scan.
    matched: bool,
    /// At its end since (no growth).
    idle_since: Option<Instant>,
}

/// One file's checkpoint: the offset made safe, and the offsets read whose
/// lines wait to settle (with the marks they must reach).
struct Mark {
    path: PathBuf,
    head: Option<u32>,
    safe: u64,
    waiting: VecDeque<(u64, Vec<(usize, u64)>)>,
    /// Neither tailed nor found by a scan since then. A checkpoint is
    /// forgotten when its path holds another file, or after FORGET_AFTER
    /// unseen (a directory mounted late must not make a file read twice).
    unseen_since: Option<Instant>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    version: u32,
    files: Vec<StoredFile>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
    head: Option<u32>,
    offset: u64,
}

/// What the tailer and its checkpoint writer share.
struct Shared {
    marks: RefCell<HashMap<Key, Mark>>,
    /// Checkpoints moved since the last write.
    dirty: std::cell::Cell<bool>,
    /// The tailer has stopped: the checkpointer ends (after a write in
    /// progress, so that the last write comes after it).
    stop: std::cell::Cell<bool>,
    stopped: Notify,
}

pub async fn run(ing: Rc<Ingest>, source: usize) {
    let plan = &ing.plan.sources[source];
    let f = plan.file.clone().expect("a file source has its plan");
    let busy = || TAILERS.with_borrow(|t| t.iter().any(|(_, p)| *p == f.checkpoints));
    while busy() {
        if ing.source_stopping(source) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if ing.source_stopping(source) {
        return;
    }
    TAILERS.with_borrow_mut(|t| t.push((source, f.checkpoints.clone())));
    let (name, at) = (plan.name.clone(), f.checkpoints.clone());
    let loaded = tokio::task::spawn_blocking(move || load_checkpoints(&name, &at)).await;
    // No checkpoint file at all: the first start (read_from applies).
    let (marks, fresh) = loaded.unwrap_or_else(|_| (HashMap::new(), false));
    let shared = Rc::new(Shared {
        marks: RefCell::new(marks),
        dirty: std::cell::Cell::new(false),
        stop: std::cell::Cell::new(false),
        stopped: Notify::new(),
    });
    let events = Arc::new(Events {
        wake: Notify::new(),
        rescan: AtomicBool::new(false),
        closed: AtomicBool::new(false),
    });
    let inotify = start_inotify(&plan.name, events.clone());
    let writer = crate::io::spawn(checkpointer(ing.clone(), source, shared.clone()));
    tail(&ing, source, &f, &shared, &events, inotify, fresh).await;
    // Stopping: give the last lines a moment to settle, then write down
    // where every file stands.
    let deadline = Instant::now() + STOP_SETTLE_WAIT;
    loop {
        settle(&ing, &shared);
        let waiting = shared
            .marks
            .borrow()
            .values()
            .any(|m| !m.waiting.is_empty());
        if !waiting || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shared.stop.set(true);
    shared.stopped.notify_one();
    let _ = writer.await;
    write_checkpoints(&ing, source, &f, &shared).await;
    events.closed.store(true, Ordering::Release);
    TAILERS.with_borrow_mut(|t| t.retain(|(s, _)| *s != source));
}

/// Moves each file's safe offset over the reads whose lines settled.
fn settle(ing: &Ingest, shared: &Shared) {
    for m in shared.marks.borrow_mut().values_mut() {
        while let Some((pos, marks)) = m.waiting.front() {
            if ing.unsettled(marks).is_some() {
                break;
            }
            m.safe = *pos;
            m.waiting.pop_front();
            shared.dirty.set(true);
        }
    }
}

async fn checkpointer(ing: Rc<Ingest>, source: usize, shared: Rc<Shared>) {
    let f = ing.plan.sources[source]
        .file
        .clone()
        .expect("a file source");
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECKPOINT_EVERY) => {}
            _ = shared.stopped.notified() => {}
        }
        if shared.stop.get() {
            return;
        }
        settle(&ing, &shared);
        if shared.dirty.get() {
            write_checkpoints(&ing, source, &f, &shared).await;
        }
    }
}

/// The checkpoints kept (blocking), and whether there were none at all.
fn load_checkpoints(name: &str, path: &Path) -> (HashMap<Key, Mark>, bool) {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (HashMap::new(), true),
        Err(e) => {
            tracing::warn!(source = %name, path = %path.display(), error = %e,
                "cannot read the file checkpoints; files are read from their start");
            return (HashMap::new(), false);
        }
    };
    let marks = match serde_json::from_slice::<Stored>(&text) {
        Ok(s) => s
            .files
            .into_iter()
            .map(|f| {
                (
                    (f.dev, f.ino),
                    Mark {
                        path: f.path,
                        head: f.head,
                        safe: f.offset,
                        waiting: VecDeque::new(),
                        unseen_since: None,
                    },
                )
            })
            .collect(),
        Err(e) => {
            tracing::warn!(source = %name, path = %path.display(), error = %e,
                "the file checkpoints are damaged; files are read from their start");
            HashMap::new()
        }
    };
    (marks, false)
}

/// Writes the checkpoints of the files still tailed or found, atomically.
async fn write_checkpoints(ing: &Ingest, source: usize, f: &FileSourcePlan, shared: &Shared) {
    shared.dirty.set(false);
    let stored = {
        let marks = shared.marks.borrow();
        Stored {
            version: 1,
            files: marks
                .iter()
                .map(|(&(dev, ino), m)| StoredFile {
                    path: m.path.clone(),
                    dev,
                    ino,
                    head: m.head,
                    offset: m.safe,
                })
                .collect(),
        }
    };
    let text = serde_json::to_vec(&stored).expect("checkpoints serialize");
    let path = f.checkpoints.clone();
    let written = tokio::task::spawn_blocking(move || write_atomically(&path, &text)).await;
    let error = match written {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    shared.dirty.set(true);
    let name = &ing.plan.sources[source].name;
    tracing::warn!(source = %name, path = %f.checkpoints.display(), error = %error,
        "cannot write the file checkpoints; retrying (a restart would read again from older ones)");
}

fn write_atomically(path: &Path, text: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    let mut out = std::fs::File::create(&tmp)?;
    out.write_all(text)?;
    out.sync_data()?;
    drop(out);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// What the inotify thread tells the tailer.
struct Events {
    wake: Notify,
    /// A file was created, moved or deleted (not only written): scan again.
    rescan: AtomicBool,
    /// The source has ended: the inotify thread ends too (within a second).
    closed: AtomicBool,
}

/// How often the inotify thread looks whether its source has ended.
const INOTIFY_CLOSED_CHECK_MS: i32 = 1000;

thread_local! {
    /// The file sources tailing on this thread (their ids and checkpoint
    /// files): a source a reload changed starts once its old self has
    /// written its checkpoints and ended, never beside it.
    static TAILERS: RefCell<Vec<(usize, PathBuf)>> = const { RefCell::new(Vec::new()) };
}

/// The inotify descriptor, and a thread that wakes the tailer on its events.
fn start_inotify(name: &str, events: Arc<Events>) -> Option<Arc<OwnedFd>> {
    // SAFETY: inotify_init1 takes flags only.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    if fd < 0 {
        tracing::warn!(source = %name, error = %std::io::Error::last_os_error(),
            "inotify is not available: files are looked for every 5 s only");
        return None;
    }
    // SAFETY: a descriptor just opened, owned from here on.
    let fd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
    let reader = fd.clone();
    let spawned = std::thread::Builder::new()
        .name("updraft-inotify".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                if events.closed.load(Ordering::Acquire) {
                    return;
                }
                let mut pfd = libc::pollfd {
                    fd: reader.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: poll(2) on one pollfd this frame owns.
                if unsafe { libc::poll(&mut pfd, 1, INOTIFY_CLOSED_CHECK_MS) } <= 0 {
                    continue;
                }
                // SAFETY: read into a buffer this frame owns.
                let n =
                    unsafe { libc::read(reader.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0
                    && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                {
                    continue;
                }
                if n <= 0 {
                    return;
                }
                // Each event: wd (4), mask (4), cookie (4), len (4), name.
                let (mut at, n) = (0usize, n as usize);
                while at + 16 <= n {
                    let mask = u32::from_ne_bytes(buf[at + 4..at + 8].try_into().expect("4 bytes"));
                    let len =
                        u32::from_ne_bytes(buf[at + 12..at + 16].try_into().expect("4 bytes"));
                    if mask & !libc::IN_MODIFY != 0 {
                        events.rescan.store(true, Ordering::Release);
                    }
                    at += 16 + len as usize;
                }
                events.wake.notify_one();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(source = %name, error = %e,
            "cannot start the inotify thread: files are looked for every 5 s only");
        return None;
    }
    Some(fd)
}

/// Finds files renamed while the collector was not running, by inode, in
/// the directories their checkpoints name (blocking): a file rotated away
/// while updraft was down is read to its end too.
fn find_renamed(wanted: &[(Key, PathBuf)], found: &mut Vec<Found>) {
    use std::os::unix::fs::MetadataExt;
    let mut dirs: Vec<&Path> = wanted.iter().filter_map(|(_, p)| p.parent()).collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        let Ok(entries) = std::fs::read_dir(d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            let key = (meta.dev(), meta.ino());
            if meta.is_file()
                && wanted.iter().any(|(k, _)| *k == key)
                && !found.iter().any(|x| x.key == key)
            {
                let path = e.path();
                let head = (meta.len() >= HEAD_BYTES as u64)
                    .then(|| head_checksum(&path))
                    .flatten();
                found.push(Found {
                    path,
                    key,
                    head,
                    renamed: true,
                });
            }
        }
    }
}

/// Finds the files `include` matches (blocking), and watches their
/// directories and the directories the globs name.
fn scan(f: &FileSourcePlan, inotify: Option<&OwnedFd>) -> (Vec<Found>, Vec<String>) {
    use std::os::unix::fs::MetadataExt;
    let mut found = Vec::new();
    let mut errors = Vec::new();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for pattern in &f.include {
        // The deepest directory of the glob without a wildcard in it.
        let fixed: PathBuf = Path::new(pattern)
            .components()
            .take_while(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '[']))
            .collect();
        if let Some(d) = fixed.parent() {
            dirs.push(if fixed.is_dir() {
                fixed.clone()
            } else {
                d.to_owned()
            });
        }
        let paths = match glob::glob(pattern) {
            Ok(p) => p,
            Err(e) => {
                errors.push(format!("{pattern}: {e}"));
                continue;
            }
        };
        for entry in paths {
            let path = match entry {
                Ok(p) => p,
                Err(e) => {
                    errors.push(e.to_string());
                    continue;
                }
            };
            let name = path.to_string_lossy();
            if COMPRESSED_SUFFIXES.iter().any(|s| name.ends_with(s))
                || f.exclude.iter().any(|x| x.matches_path(&path))
            {
                continue;
            }
            let Ok(meta) = std::fs::metadata(&path) else {
                continue; // gone since the glob saw it
            };
            if !meta.is_file() {
                continue;
            }
            if let Some(d) = path.parent() {
                dirs.push(d.to_owned());
            }
            let head = (meta.len() >= HEAD_BYTES as u64)
                .then(|| head_checksum(&path))
                .flatten();
            found.push(Found {
                path,
                key: (meta.dev(), meta.ino()),
                head,
                renamed: false,
            });
        }
    }
    if let Some(fd) = inotify {
        dirs.sort();
        dirs.dedup();
        for d in dirs {
            let Ok(c) = std::ffi::CString::new(d.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            let mask = libc::IN_CREATE
                | libc::IN_MODIFY
                | libc::IN_MOVED_TO
                | libc::IN_MOVED_FROM
                | libc::IN_DELETE
                | libc::IN_ATTRIB;
            // SAFETY: a valid descriptor and a NUL-terminated path. A watch
            // added again for the same directory is the same watch.
            unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) };
        }
    }
    (found, errors)
}

/// The checksum of a file's first HEAD_BYTES bytes (blocking).
fn head_checksum(path: &Path) -> Option<u32> {
    use std::io::Read;
    let mut head = [0u8; HEAD_BYTES];
    let mut file = std::fs::File::open(path).ok()?;
    file.read_exact(&mut head).ok()?;
    Some(crate::record::crc32c(&head))
}

/// Size, link count, device and inode of an open file.
fn fstat(file: &File) -> Option<(u64, u64, Key)> {
    // SAFETY: fstat on a descriptor the File owns, into a zeroed struct.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::fstat(file.as_raw_fd(), &mut st) == 0).then_some((
            st.st_size as u64,
            st.st_nlink as u64,
            (st.st_dev, st.st_ino),
        ))
    }
}

async fn tail(
    ing: &Rc<Ingest>,
    source: usize,
    f: &FileSourcePlan,
    shared: &Rc<Shared>,
    events: &Events,
    inotify: Option<Arc<OwnedFd>>,
    fresh: bool,
) {
    let plan = &ing.plan.sources[source];
    let counters = &ing.metrics.sources[source];
    // Looked up again after a reload.
    let mut disk_sinks = ing.disk_sinks(source);
    let mut plan_seen = ing.plan.generation();
    let mut tailed: Vec<Tailed> = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut meta = Vec::new();
    let mut log_bad = LogEvery::ten_seconds();
    let mut log_files = LogEvery::ten_seconds();
    let mut first_scan = true;
    let mut last_scan: Option<Instant> = None;
    while !ing.source_stopping(source) {
        if plan_seen != ing.plan.generation() {
            plan_seen = ing.plan.generation();
            disk_sinks = ing.disk_sinks(source);
        }
        // Look for files: at start, after an inotify event, and every RESCAN.
        let scan_due = last_scan.is_none_or(|t| t.elapsed() >= RESCAN)
            || events.rescan.swap(false, Ordering::AcqRel);
        if scan_due {
            last_scan = Some(Instant::now());
            let (fp, fd) = (f.clone(), inotify.clone());
            // At start: where the checkpointed files were.
            let wanted: Vec<(Key, PathBuf)> = if first_scan {
                shared
                    .marks
                    .borrow()
                    .iter()
                    .map(|(k, m)| (*k, m.path.clone()))
                    .collect()
            } else {
                Vec::new()
            };
            let scanned = tokio::task::spawn_blocking(move || {
                let (mut found, errors) = scan(&fp, fd.as_deref());
                if !wanted.is_empty() {
                    let missing: Vec<(Key, PathBuf)> = wanted
                        .into_iter()
                        .filter(|(k, _)| !found.iter().any(|x| x.key == *k))
                        .collect();
                    find_renamed(&missing, &mut found);
                }
                (found, errors)
            })
            .await;
            let (found, errors) = scanned.unwrap_or_default();
            if !errors.is_empty() {
                if let Some(held) = log_files.ready() {
                    tracing::warn!(source = %plan.name, errors = ?errors, suppressed = held, "some paths could not be read");
                }
            }
            take_found(
                ing,
                source,
                f,
                shared,
                &mut tailed,
                found,
                first_scan,
                fresh,
                &mut log_files,
            )
            .await;
            first_scan = false;
        }
        counters.connections_open.set(tailed.len() as i64);

        // Read every file to its end.
        let mut grew = false;
        let mut i = 0;
        while i < tailed.len() && !ing.source_stopping(source) {
            let t = &mut tailed[i];
            let Some((size, links, _)) = fstat(&t.file) else {
                i += 1;
                continue;
            };
            if size < t.skip.unwrap_or(t.pos) {
                tracing::info!(source = %plan.name, path = %t.path.display(), size, offset = t.pos,
                    "the file is shorter than where it was read to (truncated): reading it again from its start");
                restart(counters, shared, t, None);
            }
            let before = (t.pos, t.skip);
            read_file(
                ing,
                source,
                t,
                &mut buf,
                &mut meta,
                &disk_sinks,
                shared,
                &mut log_bad,
            )
            .await;
            if (t.pos, t.skip) != before {
                grew = true;
                t.idle_since = None;
            } else {
                t.idle_since.get_or_insert_with(Instant::now);
            }
            // Let go of a file no longer matched (renamed away) or deleted,
            // once read to its end and quiet.
            let quiet = t.idle_since.is_some_and(|s| s.elapsed() >= LET_GO_AFTER);
            if (!t.matched || links == 0) && quiet {
                let t = tailed.swap_remove(i);
                tracing::debug!(source = %plan.name, path = %t.path.display(), "let go of a file read to its end");
                continue;
            }
            i += 1;
        }
        if grew {
            // More may have come while reading: look again before waiting.
            tokio::task::yield_now().await;
            continue;
        }
        if buf.capacity() > READ_BYTES * 4 {
            buf = Vec::new();
        }
        // Wait for an event, the rescan, or a file to let go.
        let pending_let_go = tailed.iter().any(|t| !t.matched);
        let wait = if pending_let_go {
            Duration::from_millis(500)
        } else {
            RESCAN
        };
        let stop_signal = ing.stop_signal(source);
        let stop = stop_signal.notified();
        tokio::pin!(stop);
        stop.as_mut().enable();
        if ing.source_stopping(source) {
            break;
        }
        tokio::select! {
            _ = events.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop => break,
        }
    }
    counters.connections_open.set(0);
}

/// Reads `t` again from its start (its first bytes now `head`), counted:
/// its checkpoint starts there too, and what waited to settle of its old
/// contents no longer counts.
fn restart(counters: &SourceCounters, shared: &Shared, t: &mut Tailed, head: Option<u32>) {
    t.pos = 0;
    t.skip = None;
    t.head = head;
    counters.files_restarted.add(1);
    if let Some(m) = shared.marks.borrow_mut().get_mut(&t.key) {
        m.safe = 0;
        m.waiting.clear();
        m.head = head;
        shared.dirty.set(true);
    }
}

/// Starts tailing what a scan found and is not tailed yet; marks what it
/// did not find.
#[allow(clippy::too_many_arguments)]
async fn take_found(
    ing: &Rc<Ingest>,
    source: usize,
    f: &FileSourcePlan,
    shared: &Rc<Shared>,
    tailed: &mut Vec<Tailed>,
    found: Vec<Found>,
    first_scan: bool,
    fresh: bool,
    log: &mut LogEvery,
) {
    let plan = &ing.plan.sources[source];
    for t in tailed.iter_mut() {
        t.matched = false;
    }
    {
        let mut marks = shared.marks.borrow_mut();
        let before = marks.len();
        marks.retain(|k, m| {
            if found.iter().any(|x| x.key == *k) || tailed.iter().any(|t| t.key == *k) {
                m.unseen_since = None;
                return true;
            }
            let since = *m.unseen_since.get_or_insert_with(Instant::now);
            // Its path holds another file now (rotated away, deleted and
            // created again): forgotten once its lines settled.
            let replaced = found.iter().any(|x| x.path == m.path && x.key != *k);
            !m.waiting.is_empty() || !(replaced || since.elapsed() >= FORGET_AFTER)
        });
        if marks.len() != before {
            shared.dirty.set(true);
        }
    }
    for x in found {
        if let Some(t) = tailed.iter_mut().find(|t| t.key == x.key) {
            t.matched = !x.renamed;
            t.path = x.path;
            // The same inode, rewritten from its start (its head changed):
            // a new file.
            if let (Some(old), Some(new)) = (t.head, x.head) {
                if old != new {
                    tracing::info!(source = %plan.name, path = %t.path.display(),
                        "the file's first bytes changed (rewritten): reading it again from its start");
                    restart(&ing.metrics.sources[source], shared, t, x.head);
                }
            }
            if x.head.is_some() {
                t.head = x.head;
                if let Some(m) = shared.marks.borrow_mut().get_mut(&x.key) {
                    m.head = x.head;
                    m.path = t.path.clone();
                }
            }
            continue;
        }
        if tailed.len() >= MAX_OPEN_FILES {
            if let Some(held) = log.ready() {
                tracing::warn!(source = %plan.name, path = %x.path.display(), open = MAX_OPEN_FILES, suppressed = held,
                    "too many files open: this one waits until another is let go");
            }
            continue;
        }
        let file = match OpenOptions::new().read(true).open(&x.path).await {
            Ok(file) => file,
            Err(e) => {
                if let Some(held) = log.ready() {
                    tracing::warn!(source = %plan.name, path = %x.path.display(), error = %e, suppressed = held,
                        "cannot open the file; trying again at the next scan");
                }
                continue;
            }
        };
        let Some((size, _, key)) = fstat(&file) else {
            continue;
        };
        if key != x.key {
            // Replaced between the scan and the open: the next scan finds it.
            let _ = file.close().await;
            continue;
        }
        let mut marks = shared.marks.borrow_mut();
        if x.renamed && !marks.contains_key(&key) {
            continue;
        }
        let known = marks.get(&key).filter(|m| match (m.head, x.head) {
            (Some(a), Some(b)) => a == b,
            _ => m.safe <= size,
        });
        let pos = match known {
            Some(m) if m.safe <= size => m.safe,
            Some(_) => 0,
            // "end" is for the files found at the very first start; later
            // (and after a restart) a file without a checkpoint is new.
            None if first_scan && fresh && f.read_from == ReadFrom::End => size,
            None => 0,
        };
        tracing::debug!(source = %plan.name, path = %x.path.display(), offset = pos, "tailing");
        marks.insert(
            key,
            Mark {
                path: x.path.clone(),
                head: x.head,
                safe: pos,
                waiting: VecDeque::new(),
                unseen_since: None,
            },
        );
        shared.dirty.set(true);
        tailed.push(Tailed {
            path: x.path,
            file,
            key,
            head: x.head,
            pos,
            skip: None,
            matched: !x.renamed,
            idle_since: None,
        });
    }
}

/// Reads `t` from where it stands to its end, offering every whole line.
#[allow(clippy::too_many_arguments)]
async fn read_file(
    ing: &Rc<Ingest>,
    source: usize,
    t: &mut Tailed,
    buf: &mut Vec<u8>,
    meta: &mut Vec<u8>,
    disk_sinks: &[usize],
    shared: &Shared,
    log_bad: &mut LogEvery,
) {
    let plan = &ing.plan.sources[source];
    let counters = &ing.metrics.sources[source];
    let max = plan.max_record_bytes;
    let block = READ_BYTES + max + 1;
    while !ing.source_stopping(source) {
        let at = t.skip.unwrap_or(t.pos);
        let mut b = std::mem::take(buf);
        b.clear();
        b.reserve(block);
        let (res, slice) = t.file.read_at(b.slice(0..block), at).await;
        *buf = slice.into_inner();
        let n = match res {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                if let Some(held) = log_bad.ready() {
                    tracing::warn!(source = %plan.name, path = %t.path.display(), error = %e, suppressed = held,
                        "cannot read the file; trying again later");
                }
                return;
            }
        };
        counters.bytes.add(n as u64);
        let data = &buf[..n];
        if t.skip.is_some() {
            // Inside a line too long to take: look for its end.
            match memchr::memchr(b'\n', data) {
                Some(i) => {
                    t.pos = at + i as u64 + 1;
                    t.skip = None;
                }
                None => t.skip = Some(at + n as u64),
            }
            continue;
        }
        let mut start = 0;
        let mut records = 0u64;
        // One time for the lines of one read, as a tcp source does.
        let ts = ing.now_ns();
        while let Some(i) = memchr::memchr(b'\n', &data[start..]) {
            let line = &data[start..start + i];
            start += i + 1;
            if offer_line(ing, source, line, ts, meta, log_bad, &t.path).await {
                records += 1;
            }
        }
        counters.records.add(records);
        t.pos = at + start as u64;
        if start == 0 && n > max {
            counters.drop(DropReason::Oversize, 1);
            if let Some(held) = log_bad.ready() {
                tracing::warn!(source = %plan.name, path = %t.path.display(), offset = at, max_record_bytes = max,
                    suppressed = held, "a line longer than max_record_bytes: skipped (counted)");
            }
            t.skip = Some(at + n as u64);
        }
        if start > 0 {
            let mut marks = shared.marks.borrow_mut();
            if let Some(m) = marks.get_mut(&t.key) {
                if disk_sinks.is_empty() {
                    m.safe = t.pos;
                    shared.dirty.set(true);
                } else {
                    m.waiting.push_back((t.pos, ing.marks(disk_sinks)));
                }
            }
        }
        if n < block {
            return; // at the end for now
        }
    }
}

/// Offers one line; whether it was taken (not dropped).
async fn offer_line(
    ing: &Rc<Ingest>,
    source: usize,
    line: &[u8],
    ts: u64,
    meta: &mut Vec<u8>,
    log_bad: &mut LogEvery,
    path: &Path,
) -> bool {
    let plan = &ing.plan.sources[source];
    let counters = &ing.metrics.sources[source];
    let reason = if line.len() > plan.max_record_bytes {
        Some(DropReason::Oversize)
    } else {
        ing.refuse(source, line)
    };
    if let Some(reason) = reason {
        counters.drop(reason, 1);
        if reason != DropReason::Empty {
            if let Some(held) = log_bad.ready() {
                tracing::warn!(source = %plan.name, path = %path.display(), reason = reason.label(),
                    suppressed = held, "line dropped");
            }
        }
        return false;
    }
    if let Some(rl) = plan.rate_limit {
        if !ing.rate_admit(source) {
            if rl.when_exceeded == WhenExceeded::Drop {
                counters.drop(DropReason::RateLimit, 1);
                return false;
            }
            ing.rate_wait(source).await;
        }
    }
    meta.clear();
    // A file source keeps its records on its shard (partition_by is
    // refused): only `where` and the index.
    let skip = match plan.decoding {
        Decoding::Raw => 0,
        _ => match ing.route(source, line, ts, (0, ing.id), meta) {
            Routed::To(_, why, skip) => {
                if let Some(why) = why {
                    if let Some(held) = log_bad.ready() {
                        tracing::warn!(source = %plan.name, path = %path.display(), suppressed = held,
                            "{why}; passed on as it came");
                    }
                }
                skip
            }
            Routed::Dropped(why) => {
                if let Some(held) = log_bad.ready() {
                    tracing::warn!(source = %plan.name, path = %path.display(), suppressed = held,
                        "{why}; dropped (counted as decode)");
                }
                return false;
            }
        },
    };
    ing.offer(source, ing.id, ts, 0, line, meta, skip).await;
    true
}
