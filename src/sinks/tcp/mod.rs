//! `tcp`: newline-delimited records to `address`, one connection per shard.
//!
//! A batch's payload is already newline-delimited, so a batch is one
//! `write_all` through io_uring, retried by [`StreamOutput`] until written
//! (a broken connection can repeat a batch but never loses one while the
//! collector runs; meanwhile the queue fills and TCP sources stop reading).
//!
//! A watcher reads the connection: when the peer closes its side (a graceful
//! restart of the upstream), the connection is stale: the sender closes its
//! side after the write in progress and reconnects for the next batch. What
//! the peer had not read when it *crashed* is lost with it: plain TCP carries
//! no acknowledgement (the write-ahead log and acknowledged sinks address
//! that).

use super::util::stream::{StreamOutput, Transport};
use super::{Kind, PlanCx};
use crate::config::{invalid, parse_addr, ConfigError};
use crate::pipeline::{Ack, SinkCtx};
use serde::Deserialize;
use std::cell::Cell;
use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;
use crate::io::TcpStream;

pub struct Sink;

/// The keys of a tcp sink.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub address: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Target {
    pub address: SocketAddr,
}

impl Kind for Sink {
    const NAME: &'static str = "tcp";
    type Config = Config;
    type Target = Target;
    type Output = StreamOutput<Tcp>;

    fn plan(c: Config, cx: &PlanCx<'_>) -> Result<Target, ConfigError> {
        let key = cx.key("address");
        let a = c
            .address
            .ok_or_else(|| invalid(&key, "a tcp sink needs an address (IP:PORT)"))?;
        Ok(Target {
            address: parse_addr(&key, &a)?,
        })
    }

    fn output(cx: &Rc<SinkCtx>, sink: usize, t: &Target, _ack: Option<Ack>) -> StreamOutput<Tcp> {
        StreamOutput::new(
            cx,
            sink,
            Tcp {
                address: t.address,
                far_end: t.address.to_string(),
            },
        )
    }
}

/// One connection and whether its peer has closed it.
pub struct Conn {
    stream: Rc<TcpStream>,
    peer_closed: Rc<Cell<bool>>,
}

impl Conn {
    fn new(stream: TcpStream) -> Conn {
        let stream = Rc::new(stream);
        let peer_closed = Rc::new(Cell::new(false));
        let (s, closed) = (stream.clone(), peer_closed.clone());
        crate::io::spawn(async move {
            let mut buf = vec![0u8; 512];
            loop {
                let (res, b) = s.read(buf).await;
                buf = b;
                match res {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue, // the peer has nothing to say; ignore it
                }
            }
            closed.set(true);
        });
        Conn {
            stream,
            peer_closed,
        }
    }
}

/// The tcp sink's way to its peer.
pub struct Tcp {
    address: SocketAddr,
    far_end: String,
}

impl Transport for Tcp {
    type Conn = Conn;

    fn far_end(&self) -> &str {
        &self.far_end
    }

    async fn open(&self) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(self.address).await?;
        let _ = stream.set_nodelay(true);
        Ok(Conn::new(stream))
    }

    async fn write<B: crate::io::Buf>(&self, c: &Conn, buf: B) -> (std::io::Result<()>, B) {
        c.stream.write_all(buf).await
    }

    fn stale(&self, c: &Conn) -> Option<&'static str> {
        c.peer_closed
            .get()
            .then_some("the peer closed the connection")
    }

    async fn close(&self, c: Conn, graceful: bool) {
        let how = if graceful && !c.peer_closed.get() {
            Shutdown::Write
        } else {
            Shutdown::Both
        };
        let _ = c.stream.shutdown(how);
        if c.peer_closed.get() {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
    }
}
