//! Sources: sockets in, records out to [`Ingest::offer`](crate::pipeline::ingest::Ingest::offer).
//!
//! Every shard binds its own socket per source with `SO_REUSEPORT`, so the
//! kernel spreads peers over shards with no hand-off between threads.
//! Sockets are bound by [`bind`] on the main thread before the shards start
//! (a taken port fails the start with the source named) and handed to the
//! shard, which drives them through io_uring ([`tcp`], [`udp`]).

pub mod file;
pub mod mqtt;
pub mod tcp;
pub mod udp;
pub mod updraft;

use crate::config::{SourceKind, SourcePlan};
use crate::pipeline::ingest::Ingest;
use socket2::{Domain, Protocol, Socket, Type};
use std::rc::Rc;

/// UDP receive buffer asked for when a source does not set one: enough to
/// ride out a burst while a shard is busy (the kernel default is ~200 KiB).
pub const UDP_RECEIVE_BUFFER_BYTES_DEFAULT: usize = 8 * 1024 * 1024;
/// Pending connections the kernel queues per TCP listener.
pub const TCP_BACKLOG: i32 = 1024;

/// A socket bound for one source on one shard.
#[derive(Debug)]
pub enum BoundSocket {
    Tcp {
        source: usize,
        listener: std::net::TcpListener,
    },
    Udp {
        source: usize,
        socket: std::net::UdpSocket,
    },
    /// An mqtt source's session (on one shard; no socket bound up front).
    Mqtt { source: usize },
    /// A file source's tailer (on one shard).
    File { source: usize },
}

/// Binds one shard's socket for `source`.
pub fn bind(source: usize, plan: &SourcePlan) -> std::io::Result<BoundSocket> {
    let domain = Domain::for_address(plan.address);
    match plan.kind {
        SourceKind::Mqtt => Ok(BoundSocket::Mqtt { source }),
        SourceKind::File => Ok(BoundSocket::File { source }),
        SourceKind::Tcp | SourceKind::Updraft => {
            let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            if let Some(b) = plan.receive_buffer_bytes {
                s.set_recv_buffer_size(b)?;
            }
            s.bind(&plan.address.into())?;
            s.listen(TCP_BACKLOG)?;
            Ok(BoundSocket::Tcp {
                source,
                listener: s.into(),
            })
        }
        SourceKind::Udp => {
            let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
            s.set_reuse_port(true)?;
            let want = plan
                .receive_buffer_bytes
                .unwrap_or(UDP_RECEIVE_BUFFER_BYTES_DEFAULT);
            set_receive_buffer(&s, want);
            let got = s.recv_buffer_size().unwrap_or(0);
            // Linux reports twice what was set (it counts its own overhead).
            if got < want {
                tracing::warn!(source = %plan.name, asked = want, got,
                    "the UDP receive buffer is smaller than asked: raise net.core.rmem_max or run with CAP_NET_ADMIN");
            }
            s.bind(&plan.address.into())?;
            Ok(BoundSocket::Udp {
                source,
                socket: s.into(),
            })
        }
    }
}

/// Sets SO_RCVBUF, past net.core.rmem_max where the process may
/// (SO_RCVBUFFORCE needs CAP_NET_ADMIN).
fn set_receive_buffer(s: &Socket, bytes: usize) {
    use std::os::fd::AsRawFd;
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: setsockopt with a pointer to a c_int that outlives the call.
    let forced = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if forced != 0 {
        let _ = s.set_recv_buffer_size(bytes);
    }
}

/// Starts the source tasks of one shard.
pub fn start(shard: &Rc<Ingest>, sockets: Vec<BoundSocket>) {
    for s in sockets {
        match s {
            BoundSocket::Tcp { source, listener } => {
                let listener = match crate::io::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let name = &shard.plan.sources[source].name;
                        tracing::error!(source = %name, error = %e, "cannot serve the listening socket; the source is off on this shard");
                        continue;
                    }
                };
                if shard.plan.sources[source].kind == SourceKind::Updraft {
                    shard.spawn_source(tcp::accept_loop(
                        shard.clone(),
                        source,
                        listener,
                        updraft::serve,
                    ));
                } else {
                    shard.spawn_source(tcp::accept_loop(
                        shard.clone(),
                        source,
                        listener,
                        tcp::serve,
                    ));
                }
            }
            BoundSocket::Udp { source, socket } => {
                shard.spawn_source(udp::receive_loop(shard.clone(), source, socket));
            }
            BoundSocket::Mqtt { source } => {
                shard.spawn_source(mqtt::run(shard.clone(), source));
            }
            BoundSocket::File { source } => {
                shard.spawn_source(file::run(shard.clone(), source));
            }
        }
    }
}
