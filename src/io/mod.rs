//! The shards' sockets and files, on one of two backends chosen once at
//! start (`io = "auto" | "uring" | "epoll"`, see [`choose`]):
//!
//! - **uring**: tokio-uring. Reads, writes, accepts, receives and file
//!   operations are submitted to the shard's io_uring and complete there.
//! - **epoll**: tokio's current-thread runtime. A socket waits for readiness
//!   (epoll), then reads or writes without blocking. File operations, which
//!   epoll cannot make asynchronous, run on the runtime's blocking threads
//!   (at most [`BLOCKING_THREADS`] per shard), so a shard never waits on a
//!   disk itself.
//!
//! Both take a buffer and give it back with the result (`(result, buffer)`,
//! tokio-uring's shape), so the code above is the same for either; a buffer
//! is never touched while an operation holds it. Each type here is an enum
//! of the two: one match per operation (a read, a batch's write), never per
//! record. The backend is process-wide, set once by the runtime before any
//! shard starts ([`set_backend`]); only constructors read it.
//!
//! Never blocks the calling thread; owns no buffer.

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

pub use tokio_uring::buf::{BoundedBuf, BoundedBufMut, IoBuf, IoBufMut};

/// A buffer an operation may hold: owned, and movable to a blocking thread
/// (the epoll backend's file operations run there).
pub trait Buf: BoundedBuf + Send {}
impl<T: BoundedBuf + Send> Buf for T {}

/// A buffer an operation may fill.
pub trait BufMut: BoundedBufMut + Send {}
impl<T: BoundedBufMut + Send> BufMut for T {}

/// What an operation gives back: its result and the buffer it held.
pub type BufResult<T, B> = (io::Result<T>, B);

/// Submission queue entries per shard ring (uring).
pub const URING_ENTRIES: u32 = 1024;

/// Threads per shard for file operations (epoll): the disk buffer's
/// writer, syncer, keeper and sender of a few sinks at once.
pub const BLOCKING_THREADS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Uring,
    Epoll,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Uring => "uring",
            Backend::Epoll => "epoll",
        }
    }
}

static BACKEND: AtomicU8 = AtomicU8::new(0);

/// Sets the backend every shard runs (once, before they start).
pub fn set_backend(b: Backend) {
    BACKEND.store(b as u8, Ordering::Relaxed);
}

pub fn backend() -> Backend {
    if BACKEND.load(Ordering::Relaxed) == Backend::Epoll as u8 {
        Backend::Epoll
    } else {
        Backend::Uring
    }
}

/// What `io` in the config asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Choice {
    /// io_uring where it can be set up, else epoll.
    #[default]
    Auto,
    Uring,
    Epoll,
}

/// Why io_uring cannot be used, and what to change.
#[derive(Debug, Clone)]
pub struct Refused {
    pub reason: String,
    pub hint: &'static str,
}

/// io_uring operations the shards use that came last to the kernel (5.11:
/// rename and unlink; the rest are older).
const NEEDED_OPS: [(u8, &str); 8] = [
    (io_uring::opcode::Writev::CODE, "writev"),
    (io_uring::opcode::Fsync::CODE, "fsync"),
    (io_uring::opcode::RecvMsg::CODE, "recvmsg"),
    (io_uring::opcode::Accept::CODE, "accept"),
    (io_uring::opcode::Connect::CODE, "connect"),
    (io_uring::opcode::OpenAt::CODE, "openat"),
    (io_uring::opcode::RenameAt::CODE, "renameat"),
    (io_uring::opcode::UnlinkAt::CODE, "unlinkat"),
];

/// Sets up a ring as large as a shard's to see whether io_uring is allowed
/// here, and whether the kernel has every operation the shards use.
pub fn probe_uring() -> Result<(), Refused> {
    match io_uring::IoUring::new(URING_ENTRIES) {
        Ok(ring) => {
            let mut probe = io_uring::Probe::new();
            if ring.submitter().register_probe(&mut probe).is_err() {
                return Err(Refused {
                    reason: "the kernel cannot list its io_uring operations (before 5.6)".into(),
                    hint: "the kernel is too old for updraft's io_uring backend (it needs Linux 5.11 or later)",
                });
            }
            let missing: Vec<&str> = NEEDED_OPS
                .iter()
                .filter(|(code, _)| !probe.is_supported(*code))
                .map(|(_, name)| *name)
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(Refused {
                    reason: format!("the kernel's io_uring lacks {}", missing.join(", ")),
                    hint: "the kernel is too old for updraft's io_uring backend (it needs Linux 5.11 or later)",
                })
            }
        }
        Err(e) => {
            let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .unwrap_or(0);
            let hint = match e.raw_os_error() {
                Some(libc::ENOSYS) => "the kernel lacks io_uring (it needs Linux 5.11 or later, built with CONFIG_IO_URING)",
                Some(libc::EPERM) if disabled > 0 => "sysctl kernel.io_uring_disabled is set; set it to 0 (or to 1 and run updraft in the group kernel.io_uring_group names)",
                Some(libc::EPERM) => "a seccomp profile refuses io_uring_setup; container runtimes (Docker 25+, containerd) do by default: run with a profile that allows io_uring_setup, io_uring_enter and io_uring_register (deploy/seccomp-io-uring.json)",
                Some(libc::ENOMEM) => "the locked-memory limit is too low for the ring; raise `ulimit -l` (LimitMEMLOCK= under systemd)",
                _ => "check kernel.io_uring_disabled, the container's seccomp profile and the kernel version (5.11 or later)",
            };
            Err(Refused {
                reason: e.to_string(),
                hint,
            })
        }
    }
}

/// The backend for `choice`: `Auto` takes io_uring when it can be set up,
/// else epoll, and says why in one line.
pub fn choose(choice: Choice) -> Result<Backend, Refused> {
    match choice {
        Choice::Epoll => Ok(Backend::Epoll),
        Choice::Uring => probe_uring().map(|()| Backend::Uring),
        Choice::Auto => match probe_uring() {
            Ok(()) => Ok(Backend::Uring),
            Err(r) => {
                tracing::warn!(
                    "io_uring is not available ({}): running on epoll, which costs more CPU per record. To use io_uring: {}",
                    r.reason,
                    r.hint
                );
                Ok(Backend::Epoll)
            }
        },
    }
}

/// Runs a shard's future to its end on the chosen backend's runtime, on
/// this thread.
pub fn run_shard<F: Future>(f: F) -> io::Result<F::Output> {
    match backend() {
        Backend::Uring => {
            let rt = tokio_uring::Runtime::new(tokio_uring::builder().entries(URING_ENTRIES))?;
            Ok(rt.block_on(f))
        }
        Backend::Epoll => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(BLOCKING_THREADS)
                .thread_name("updraft-file-io")
                .build()?;
            Ok(tokio::task::LocalSet::new().block_on(&rt, f))
        }
    }
}

/// Starts a task on this shard.
pub fn spawn<F>(f: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    tokio::task::spawn_local(f)
}

/// A syscall's return value as a result.
fn cvt(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Runs `f` (a file operation) on a blocking thread of the shard's runtime.
pub(crate) async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Cancelled: only while the runtime shuts down, when nothing
            // waits for this any more.
            Err(_) => std::future::pending().await,
        },
    }
}

// ---------------------------------------------------------------------------
// TCP

pub enum TcpStream {
    Uring(tokio_uring::net::TcpStream),
    Epoll(tokio::net::TcpStream),
}

impl TcpStream {
    pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
        Ok(match backend() {
            Backend::Uring => TcpStream::Uring(tokio_uring::net::TcpStream::connect(addr).await?),
            Backend::Epoll => TcpStream::Epoll(tokio::net::TcpStream::connect(addr).await?),
        })
    }

    pub fn from_std(s: std::net::TcpStream) -> io::Result<TcpStream> {
        Ok(match backend() {
            Backend::Uring => TcpStream::Uring(tokio_uring::net::TcpStream::from_std(s)),
            Backend::Epoll => {
                s.set_nonblocking(true)?;
                TcpStream::Epoll(tokio::net::TcpStream::from_std(s)?)
            }
        })
    }

    /// Reads what is there (at least a byte, or 0 at the end) into `buf`.
    pub async fn read<T: BufMut>(&self, mut buf: T) -> BufResult<usize, T> {
        let s = match self {
            TcpStream::Uring(s) => return s.read(buf).await,
            TcpStream::Epoll(s) => s,
        };
        let (ptr, len) = (buf.stable_mut_ptr(), buf.bytes_total());
        let fd = s.as_raw_fd();
        loop {
            if let Err(e) = s.readable().await {
                return (Err(e), buf);
            }
            // SAFETY: the kernel writes at most `len` bytes at `ptr`, the
            // buffer's writable region, which this call owns.
            let res = s.try_io(tokio::io::Interest::READABLE, || {
                cvt(unsafe { libc::read(fd, ptr.cast(), len) })
            });
            match res {
                Ok(n) => {
                    // SAFETY: n bytes were written.
                    unsafe { buf.set_init(n) };
                    return (Ok(n), buf);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return (Err(e), buf),
            }
        }
    }

    /// Writes all of `buf`.
    pub async fn write_all<T: Buf>(&self, buf: T) -> BufResult<(), T> {
        let s = match self {
            TcpStream::Uring(s) => return s.write_all(buf).await,
            TcpStream::Epoll(s) => s,
        };
        // SAFETY: the initialised bytes of a buffer this call owns.
        let bytes = unsafe { std::slice::from_raw_parts(buf.stable_ptr(), buf.bytes_init()) };
        let mut at = 0;
        while at < bytes.len() {
            if let Err(e) = s.writable().await {
                return (Err(e), buf);
            }
            match s.try_write(&bytes[at..]) {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match self {
            TcpStream::Uring(s) => s.set_nodelay(on),
            TcpStream::Epoll(s) => s.set_nodelay(on),
        }
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            TcpStream::Uring(s) => s.shutdown(how),
            TcpStream::Epoll(s) => socket2::SockRef::from(s).shutdown(how),
        }
    }
}

impl AsRawFd for TcpStream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            TcpStream::Uring(s) => s.as_raw_fd(),
            TcpStream::Epoll(s) => s.as_raw_fd(),
        }
    }
}

pub enum TcpListener {
    Uring(tokio_uring::net::TcpListener),
    Epoll(tokio::net::TcpListener),
}

impl TcpListener {
    pub fn from_std(l: std::net::TcpListener) -> io::Result<TcpListener> {
        Ok(match backend() {
            Backend::Uring => TcpListener::Uring(tokio_uring::net::TcpListener::from_std(l)),
            Backend::Epoll => {
                l.set_nonblocking(true)?;
                TcpListener::Epoll(tokio::net::TcpListener::from_std(l)?)
            }
        })
    }

    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        match self {
            TcpListener::Uring(l) => {
                let (s, peer) = l.accept().await?;
                Ok((TcpStream::Uring(s), peer))
            }
            TcpListener::Epoll(l) => {
                let (s, peer) = l.accept().await?;
                Ok((TcpStream::Epoll(s), peer))
            }
        }
    }
}

impl AsRawFd for TcpListener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            TcpListener::Uring(l) => l.as_raw_fd(),
            TcpListener::Epoll(l) => l.as_raw_fd(),
        }
    }
}

// ---------------------------------------------------------------------------
// UDP

pub enum UdpSocket {
    Uring(tokio_uring::net::UdpSocket),
    Epoll(tokio::net::UdpSocket),
}

impl UdpSocket {
    pub fn from_std(s: std::net::UdpSocket) -> io::Result<UdpSocket> {
        Ok(match backend() {
            Backend::Uring => UdpSocket::Uring(tokio_uring::net::UdpSocket::from_std(s)),
            Backend::Epoll => {
                s.set_nonblocking(true)?;
                UdpSocket::Epoll(tokio::net::UdpSocket::from_std(s)?)
            }
        })
    }

    /// Receives one datagram into `buf`.
    pub async fn recv_from<T: BufMut>(&self, mut buf: T) -> BufResult<(usize, SocketAddr), T> {
        let s = match self {
            UdpSocket::Uring(s) => return s.recv_from(buf).await,
            UdpSocket::Epoll(s) => s,
        };
        // SAFETY: the buffer's writable region, owned by this call; the
        // kernel fills a prefix and ReadBuf tracks how much.
        let room = unsafe {
            std::slice::from_raw_parts_mut(
                buf.stable_mut_ptr().cast::<std::mem::MaybeUninit<u8>>(),
                buf.bytes_total(),
            )
        };
        let mut rb = tokio::io::ReadBuf::uninit(room);
        let res = std::future::poll_fn(|cx| s.poll_recv_from(cx, &mut rb)).await;
        let n = rb.filled().len();
        match res {
            Ok(peer) => {
                // SAFETY: n bytes were written.
                unsafe { buf.set_init(n) };
                (Ok((n, peer)), buf)
            }
            Err(e) => (Err(e), buf),
        }
    }
}

impl AsRawFd for UdpSocket {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            UdpSocket::Uring(s) => s.as_raw_fd(),
            UdpSocket::Epoll(s) => s.as_raw_fd(),
        }
    }
}

// ---------------------------------------------------------------------------
// Files

pub enum File {
    Uring(tokio_uring::fs::File),
    Epoll(EpollFile),
}

/// A file of the epoll backend, shared with the blocking threads working
/// on it. The last owner on a shard closes it on a blocking thread: a close
/// may flush (NFS, FUSE, ext4 after a truncate).
pub struct EpollFile(Option<Arc<std::fs::File>>);

impl EpollFile {
    fn get(&self) -> &Arc<std::fs::File> {
        self.0.as_ref().expect("open until dropped")
    }
}

impl Drop for EpollFile {
    fn drop(&mut self) {
        let Some(f) = self.0.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if Arc::strong_count(&f) == 1 => {
                rt.spawn_blocking(move || drop(f));
            }
            _ => drop(f),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    read: bool,
    write: bool,
    append: bool,
    create: bool,
    truncate: bool,
}

impl OpenOptions {
    pub fn new() -> OpenOptions {
        OpenOptions::default()
    }
    pub fn read(&mut self, on: bool) -> &mut OpenOptions {
        self.read = on;
        self
    }
    pub fn write(&mut self, on: bool) -> &mut OpenOptions {
        self.write = on;
        self
    }
    pub fn append(&mut self, on: bool) -> &mut OpenOptions {
        self.append = on;
        self
    }
    pub fn create(&mut self, on: bool) -> &mut OpenOptions {
        self.create = on;
        self
    }
    pub fn truncate(&mut self, on: bool) -> &mut OpenOptions {
        self.truncate = on;
        self
    }

    pub async fn open(&self, path: impl AsRef<Path>) -> io::Result<File> {
        match backend() {
            Backend::Uring => tokio_uring::fs::OpenOptions::new()
                .read(self.read)
                .write(self.write)
                .append(self.append)
                .create(self.create)
                .truncate(self.truncate)
                .open(path)
                .await
                .map(File::Uring),
            Backend::Epoll => {
                let (o, path) = (self.clone(), path.as_ref().to_owned());
                let f = blocking(move || {
                    std::fs::OpenOptions::new()
                        .read(o.read)
                        .write(o.write)
                        .append(o.append)
                        .create(o.create)
                        .truncate(o.truncate)
                        .open(path)
                })
                .await?;
                Ok(File::Epoll(EpollFile(Some(Arc::new(f)))))
            }
        }
    }
}

impl File {
    /// Creates (or truncates) a file for writing.
    pub async fn create(path: impl AsRef<Path>) -> io::Result<File> {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .await
    }

    /// Writes all of `buf` at `pos` (with `O_APPEND`, at the end).
    pub async fn write_all_at<T: Buf>(&self, buf: T, pos: u64) -> BufResult<(), T> {
        let f = match self {
            File::Uring(f) => return f.write_all_at(buf, pos).await,
            File::Epoll(f) => f.get().clone(),
        };
        blocking(move || {
            use std::os::unix::fs::FileExt;
            // SAFETY: the initialised bytes of a buffer this call owns.
            let bytes = unsafe { std::slice::from_raw_parts(buf.stable_ptr(), buf.bytes_init()) };
            (f.write_all_at(bytes, pos), buf)
        })
        .await
    }

    /// Reads what there is from `pos` into `buf`, at most its length: the
    /// bytes read (0 at the end of the file).
    pub async fn read_at<T: BufMut>(&self, mut buf: T, pos: u64) -> BufResult<usize, T> {
        let f = match self {
            File::Uring(f) => return f.read_at(buf, pos).await,
            File::Epoll(f) => f.get().clone(),
        };
        blocking(move || {
            let (ptr, len) = (buf.stable_mut_ptr(), buf.bytes_total());
            loop {
                // SAFETY: the kernel writes within the buffer's writable
                // region, which this call owns.
                let n =
                    cvt(unsafe { libc::pread(f.as_raw_fd(), ptr.cast(), len, pos as libc::off_t) });
                match n {
                    Ok(n) => {
                        // SAFETY: n bytes were written.
                        unsafe { buf.set_init(n) };
                        return (Ok(n), buf);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return (Err(e), buf),
                }
            }
        })
        .await
    }

    /// Fills all of `buf` from `pos`; an early end of file is an error.
    pub async fn read_exact_at<T: BufMut>(&self, mut buf: T, pos: u64) -> BufResult<(), T> {
        let f = match self {
            File::Uring(f) => return f.read_exact_at(buf, pos).await,
            File::Epoll(f) => f.get().clone(),
        };
        blocking(move || {
            let (ptr, len) = (buf.stable_mut_ptr(), buf.bytes_total());
            let mut at = 0;
            while at < len {
                // SAFETY: the kernel writes within the buffer's writable
                // region, which this call owns.
                let n = cvt(unsafe {
                    libc::pread(
                        f.as_raw_fd(),
                        ptr.add(at).cast(),
                        len - at,
                        (pos + at as u64) as libc::off_t,
                    )
                });
                match n {
                    Ok(0) => return (Err(io::ErrorKind::UnexpectedEof.into()), buf),
                    Ok(n) => at += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return (Err(e), buf),
                }
            }
            // SAFETY: len bytes were written.
            unsafe { buf.set_init(len) };
            (Ok(()), buf)
        })
        .await
    }

    /// Writes `bufs` one after another from `pos` with one call; returns the
    /// bytes written (possibly fewer than all).
    pub async fn writev_at<T: Buf>(&self, bufs: Vec<T>, pos: u64) -> BufResult<usize, Vec<T>> {
        let f = match self {
            File::Uring(f) => {
                // One writev takes at most IOV_MAX buffers (the kernel
                // refuses more): the rest is left for the caller, as a
                // short write.
                let mut bufs = bufs;
                let tail = bufs.split_off(bufs.len().min(IOV_MAX));
                let (res, mut bufs) = f.writev_at(bufs, pos).await;
                bufs.extend(tail);
                return (res, bufs);
            }
            File::Epoll(f) => f.get().clone(),
        };
        blocking(move || {
            let iov: Vec<libc::iovec> = bufs
                .iter()
                .take(IOV_MAX)
                .map(|b| libc::iovec {
                    iov_base: b.stable_ptr() as *mut libc::c_void,
                    iov_len: b.bytes_init(),
                })
                .collect();
            loop {
                // SAFETY: every iovec points into a buffer this call owns.
                let n = cvt(unsafe {
                    libc::pwritev(
                        f.as_raw_fd(),
                        iov.as_ptr(),
                        iov.len() as libc::c_int,
                        pos as libc::off_t,
                    )
                });
                match n {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    n => return (n, bufs),
                }
            }
        })
        .await
    }

    pub async fn sync_data(&self) -> io::Result<()> {
        match self {
            File::Uring(f) => f.sync_data().await,
            File::Epoll(f) => {
                let f = f.get().clone();
                blocking(move || f.sync_data()).await
            }
        }
    }

    pub async fn sync_all(&self) -> io::Result<()> {
        match self {
            File::Uring(f) => f.sync_all().await,
            File::Epoll(f) => {
                let f = f.get().clone();
                blocking(move || f.sync_all()).await
            }
        }
    }

    pub async fn close(self) -> io::Result<()> {
        match self {
            File::Uring(f) => f.close().await,
            // Closed on a blocking thread once the last operation holding
            // it is done.
            File::Epoll(f) => {
                drop(f);
                Ok(())
            }
        }
    }
}

/// The most buffers one `pwritev` takes (Linux's `IOV_MAX`); past them a
/// write is short and the caller writes the rest.
const IOV_MAX: usize = 1024;

impl AsRawFd for File {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            File::Uring(f) => f.as_raw_fd(),
            File::Epoll(f) => f.get().as_raw_fd(),
        }
    }
}

pub async fn rename(from: impl AsRef<Path>, to: impl AsRef<Path>) -> io::Result<()> {
    match backend() {
        Backend::Uring => tokio_uring::fs::rename(from, to).await,
        Backend::Epoll => {
            let (from, to) = (from.as_ref().to_owned(), to.as_ref().to_owned());
            blocking(move || std::fs::rename(from, to)).await
        }
    }
}

pub async fn remove_file(path: impl AsRef<Path>) -> io::Result<()> {
    match backend() {
        Backend::Uring => tokio_uring::fs::remove_file(path).await,
        Backend::Epoll => {
            let path = path.as_ref().to_owned();
            blocking(move || std::fs::remove_file(path)).await
        }
    }
}
