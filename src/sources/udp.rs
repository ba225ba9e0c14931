//! `udp` source: one record per datagram, never a silent drop.
//!
//! UDP cannot push back, so a datagram whose destination is full is counted
//! (`sink_full`) and dropped. Datagrams the kernel dropped because the socket
//! buffer was full are counted too: a timer reads the socket's drop counter
//! (`SO_MEMINFO`'s `SK_MEMINFO_DROPS`, the same `sk_drops` that `SO_RXQ_OVFL`
//! reports per message, read here without a control buffer because
//! tokio-uring's `recv_from` carries none) and publishes it as
//! `receive_buffer` drops. The receive buffer is enlarged at bind time
//! (`receive_buffer_bytes`).

use crate::codec::datagram_record;
use crate::logging::LogEvery;
use crate::metrics::DropReason;
use crate::pipeline::ingest::{Ingest, Routed};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

/// How often the kernel's drop counter is read.
pub const KERNEL_DROPS_INTERVAL: Duration = Duration::from_secs(1);

/// Entries of the SO_MEMINFO array (include/uapi/linux/sock_diag.h).
const SK_MEMINFO_VARS: usize = 9;

/// The kernel's count of datagrams dropped on this socket.
fn kernel_drops(fd: RawFd) -> Option<u32> {
    let mut info = [0u32; SK_MEMINFO_VARS];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0 && len as usize > libc::SK_MEMINFO_DROPS as usize * 4)
        .then(|| info[libc::SK_MEMINFO_DROPS as usize])
}

/// Datagrams taken per `recvmmsg` call once the socket is readable.
pub const DRAIN_DATAGRAMS: usize = 32;

/// A batch of datagram slots for `recvmmsg(MSG_DONTWAIT)`: after io_uring has
/// handed over one datagram, the rest of the queue is taken a batch per
/// system call instead of one io_uring operation (and one allocation inside
/// tokio-uring) per datagram. Non-blocking: it never waits on the shard.
struct Drain {
    buf: Vec<u8>,
    slot_bytes: usize,
    iov: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_storage>,
    msgs: Vec<libc::mmsghdr>,
}

impl Drain {
    fn new(slot_bytes: usize) -> Drain {
        // SAFETY: all-zero sockaddr_storage and mmsghdr are valid values.
        let zero_name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let zero_msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
        Drain {
            buf: vec![0u8; slot_bytes * DRAIN_DATAGRAMS],
            slot_bytes,
            iov: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                DRAIN_DATAGRAMS
            ],
            names: vec![zero_name; DRAIN_DATAGRAMS],
            msgs: vec![zero_msg; DRAIN_DATAGRAMS],
        }
    }

    /// Takes up to [`DRAIN_DATAGRAMS`] queued datagrams; `None` when none is.
    fn receive(&mut self, fd: RawFd) -> Option<usize> {
        for i in 0..DRAIN_DATAGRAMS {
            self.iov[i] = libc::iovec {
                iov_base: self.buf[i * self.slot_bytes..].as_mut_ptr() as *mut libc::c_void,
                iov_len: self.slot_bytes,
            };
            let m = &mut self.msgs[i];
            m.msg_hdr.msg_iov = &mut self.iov[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_name = &mut self.names[i] as *mut _ as *mut libc::c_void;
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            m.msg_hdr.msg_flags = 0;
            m.msg_len = 0;
        }
        // SAFETY: every mmsghdr points at an iovec into `buf` and a name
        // slot, all owned by self and alive for the call; MSG_DONTWAIT makes
        // it return at once when nothing is queued.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.msgs.as_mut_ptr(),
                DRAIN_DATAGRAMS as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        (n > 0).then_some(n as usize)
    }

    /// Datagram `i` of the last receive: its bytes, whether it was cut
    /// short, and its sender.
    fn get(&self, i: usize) -> (&[u8], bool, SocketAddr) {
        let m = &self.msgs[i];
        let len = (m.msg_len as usize).min(self.slot_bytes);
        let truncated = m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || len == self.slot_bytes;
        // SAFETY: the kernel wrote a sockaddr of msg_namelen bytes into names[i].
        let addr = unsafe {
            socket2::SockAddr::new(
                std::mem::transmute::<libc::sockaddr_storage, socket2::SockAddrStorage>(
                    self.names[i],
                ),
                m.msg_hdr.msg_namelen,
            )
        };
        let peer = addr
            .as_socket()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        (
            &self.buf[i * self.slot_bytes..i * self.slot_bytes + len],
            truncated,
            peer,
        )
    }
}

/// What a source does with each datagram.
struct Take<'a> {
    shard: &'a Rc<Ingest>,
    source: usize,
    log_bad: LogEvery,
    log_full: LogEvery,
    /// A record's meta (its field index), reused.
    meta: Vec<u8>,
}

impl Take<'_> {
    #[inline]
    fn datagram(&mut self, datagram: &[u8], truncated: bool, peer: SocketAddr) {
        let shard = self.shard;
        let plan = &shard.plan.sources[self.source];
        let counters = &shard.metrics.sources[self.source];
        counters.bytes.add(datagram.len() as u64);
        let record = datagram_record(datagram);
        let reason = if !record.is_empty() && (truncated || record.len() > plan.max_record_bytes) {
            Some(DropReason::Oversize)
        } else {
            shard.refuse(self.source, record)
        };
        if let Some(reason) = reason {
            counters.drop(reason, 1);
            if reason != DropReason::Empty {
                if let Some(held) = self.log_bad.ready() {
                    tracing::warn!(source = %plan.name, %peer, reason = reason.label(), suppressed = held,
                        "datagram dropped");
                }
            }
            return;
        }
        let ts = shard.now_ns();
        self.meta.clear();
        let ((key, dest), skip) = match shard.route(
            self.source,
            record,
            ts,
            shard.owner(self.source, &peer),
            &mut self.meta,
        ) {
            Routed::To(r, None, skip) => (r, skip),
            Routed::To(r, Some(why), skip) => {
                if let Some(held) = self.log_bad.ready() {
                    tracing::warn!(source = %plan.name, %peer, suppressed = held, "{why}; passed on as it came");
                }
                (r, skip)
            }
            Routed::Dropped(why) => {
                if let Some(held) = self.log_bad.ready() {
                    tracing::warn!(source = %plan.name, %peer, suppressed = held, "{why}; dropped (counted as decode)");
                }
                return;
            }
        };
        if plan.rate_limit.is_some() && !shard.rate_admit(self.source) {
            // A datagram cannot wait: over the rate it is dropped, whatever
            // `when_exceeded` says.
            counters.drop(DropReason::RateLimit, 1);
            if let Some(held) = self.log_full.ready() {
                tracing::warn!(source = %plan.name, suppressed = held,
                    "over the source's rate_limit: datagrams are dropped (counted as rate_limit)");
            }
            return;
        }
        match shard.try_offer(self.source, dest, ts, key, record, &self.meta, skip) {
            Ok(()) => counters.records.add(1),
            Err(_) => {
                counters.drop(DropReason::SinkFull, 1);
                if let Some(held) = self.log_full.ready() {
                    tracing::warn!(source = %plan.name, suppressed = held,
                        "sink buffer full: datagrams are being dropped (counted as sink_full)");
                }
            }
        }
    }
}

pub async fn receive_loop(shard: Rc<Ingest>, source: usize, socket: std::net::UdpSocket) {
    let plan = &shard.plan.sources[source];
    let socket = match crate::io::UdpSocket::from_std(socket) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(source = %plan.name, error = %e, "cannot serve the udp socket; the source is off on this shard");
            return;
        }
    };
    let fd = socket.as_raw_fd();
    let counters = &shard.metrics.sources[source];

    // The drop counter is read off the receive path, once a second.
    let watcher = {
        let shard = shard.clone();
        crate::io::spawn(async move {
            let counters = &shard.metrics.sources[source];
            loop {
                if let Some(d) = kernel_drops(fd) {
                    counters.kernel_drops.set(d as i64);
                }
                tokio::time::sleep(KERNEL_DROPS_INTERVAL).await;
            }
        })
    };

    let mut take = Take {
        shard: &shard,
        source,
        log_bad: LogEvery::new(Duration::from_secs(10)),
        log_full: LogEvery::new(Duration::from_secs(10)),
        meta: Vec::new(),
    };
    let slot_bytes = plan.max_record_bytes + 2;
    let mut drain = Drain::new(slot_bytes);
    let mut buf = vec![0u8; slot_bytes];
    // Stopping drops the receive in flight (tokio-uring cannot complete a
    // datagram receive that a shutdown(2) ended). A datagram that arrives in
    // that instant stays in the kernel buffer and dies with the socket.
    let stop_signal = shard.stop_signal(source);
    let stop = stop_signal.notified();
    tokio::pin!(stop);
    stop.as_mut().enable();
    loop {
        if shard.source_stopping(source) {
            break;
        }
        // Wait for a datagram through io_uring...
        let (res, b) = tokio::select! {
            biased;
            _ = &mut stop => break,
            r = socket.recv_from(buf) => r,
        };
        buf = b;
        match res {
            Ok((n, peer)) => take.datagram(&buf[..n], n > plan.max_record_bytes + 1, peer),
            Err(e) => {
                if shard.source_stopping(source) {
                    break;
                }
                tracing::warn!(source = %plan.name, error = %e, "receive failed");
                continue;
            }
        }
        // ...then take what else is queued, a batch per call, without waiting.
        while let Some(n) = drain.receive(fd) {
            for i in 0..n {
                let (datagram, truncated, peer) = drain.get(i);
                take.datagram(datagram, truncated, peer);
            }
            if n < DRAIN_DATAGRAMS {
                break;
            }
        }
    }
    if let Some(d) = kernel_drops(fd) {
        counters.kernel_drops.set(d as i64);
    }
    watcher.abort();
}
