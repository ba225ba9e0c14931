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
use crate::config::{PartitionBy, Utf8Policy};
use crate::metrics::DropReason;
use crate::route::{owner, peer_key};
use crate::runtime::shard::Shard;
use crate::sinks::util::LogEvery;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

/// The largest UDP payload, so no datagram is ever truncated.
pub const DATAGRAM_BYTES_MAX: usize = 65_536;
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

pub async fn receive_loop(shard: Rc<Shard>, source: usize, socket: std::net::UdpSocket) {
    let socket = tokio_uring::net::UdpSocket::from_std(socket);
    let fd = socket.as_raw_fd();
    let plan = &shard.plan.sources[source];
    let counters = &shard.metrics.sources[source];

    // The drop counter is read off the receive path, once a second.
    let watcher = {
        let shard = shard.clone();
        tokio_uring::spawn(async move {
            let counters = &shard.metrics.sources[source];
            loop {
                if let Some(d) = kernel_drops(fd) {
                    counters.kernel_drops.set(d as i64);
                }
                tokio::time::sleep(KERNEL_DROPS_INTERVAL).await;
            }
        })
    };

    let check_utf8 = plan.utf8 == Utf8Policy::Drop;
    let mut log_bad = LogEvery::new(Duration::from_secs(10));
    let mut log_full = LogEvery::new(Duration::from_secs(10));
    let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
    // Stopping drops the receive in flight (tokio-uring cannot complete a
    // datagram receive that a shutdown(2) ended). A datagram that arrives in
    // that instant stays in the kernel buffer and dies with the socket.
    let stop = shard.stop_sources.notified();
    tokio::pin!(stop);
    stop.as_mut().enable();
    loop {
        if shard.stopping.get() {
            break;
        }
        let (res, b) = tokio::select! {
            biased;
            _ = &mut stop => break,
            r = socket.recv_from(buf) => r,
        };
        buf = b;
        let (n, peer) = match res {
            Ok(x) => x,
            Err(e) => {
                if shard.stopping.get() {
                    break;
                }
                tracing::warn!(source = %plan.name, error = %e, "receive failed");
                continue;
            }
        };
        counters.bytes.add(n as u64);
        let record = datagram_record(&buf[..n]);
        let reason = if record.is_empty() {
            Some(DropReason::Empty)
        } else if record.len() > plan.max_record_bytes {
            Some(DropReason::Oversize)
        } else if check_utf8 && std::str::from_utf8(record).is_err() {
            Some(DropReason::InvalidUtf8)
        } else if plan.sinks.is_empty() {
            Some(DropReason::NoSink)
        } else {
            None
        };
        if let Some(reason) = reason {
            counters.drop(reason, 1);
            if reason != DropReason::Empty {
                if let Some(held) = log_bad.ready() {
                    tracing::warn!(source = %plan.name, %peer, reason = reason.label(), suppressed = held,
                        "datagram dropped");
                }
            }
            continue;
        }
        let (key, dest) = match plan.partition_by {
            PartitionBy::None => (0, shard.id),
            PartitionBy::Peer => {
                let k = peer_key(&peer);
                (k, owner(k, shard.shards))
            }
        };
        let ts = shard.now_ns();
        match shard.try_offer(source, dest, ts, key, record) {
            Ok(()) => counters.records.add(1),
            Err(_) => {
                counters.drop(DropReason::SinkFull, 1);
                if let Some(held) = log_full.ready() {
                    tracing::warn!(source = %plan.name, suppressed = held,
                        "sink buffer full: datagrams are being dropped (counted as sink_full)");
                }
            }
        }
    }
    if let Some(d) = kernel_drops(fd) {
        counters.kernel_drops.set(d as i64);
    }
    watcher.abort();
}
