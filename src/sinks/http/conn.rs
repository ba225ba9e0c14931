//! One keep-alive connection to the endpoint, over the shard's io_uring.
//!
//! Plain TCP, or TLS by rustls driven over our own buffers: rustls takes
//! bytes read from the socket (`read_tls`) and hands out bytes to write
//! (`write_tls`); the socket belongs to this module and every read and write
//! is an io_uring operation on an owned buffer. Certificate errors come out
//! of the handshake as [`ConnError::Tls`], with rustls's reason.

use super::config::HttpTarget;
use std::io::{Read, Write};
use crate::io::BoundedBuf;
use crate::io::TcpStream;

/// Bytes asked of the socket per read.
const READ_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(rustls::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the endpoint closed the connection")]
    Closed,
}

pub struct Connection {
    stream: TcpStream,
    tls: Option<Box<rustls::ClientConnection>>,
    /// Encrypted bytes on their way out (TLS).
    tls_out: Vec<u8>,
    /// Socket reads land here.
    read_buf: Vec<u8>,
}

impl Connection {
    /// Connects and, for https, completes the handshake (verifying the
    /// certificate against the configured roots).
    pub async fn open(t: &HttpTarget) -> Result<Connection, ConnError> {
        let stream = TcpStream::connect(t.address)
            .await
            .map_err(ConnError::Connect)?;
        let _ = stream.set_nodelay(true);
        let tls = match &t.tls {
            Some((config, name)) => Some(Box::new(
                rustls::ClientConnection::new(config.clone(), name.clone())
                    .map_err(ConnError::Tls)?,
            )),
            None => None,
        };
        let mut c = Connection {
            stream,
            tls,
            tls_out: Vec::with_capacity(if t.tls.is_some() { READ_BYTES } else { 0 }),
            read_buf: Vec::with_capacity(READ_BYTES),
        };
        if c.tls.is_some() {
            while c.tls.as_ref().is_some_and(|t| t.is_handshaking()) {
                c.flush_tls().await?;
                let wants_read = c
                    .tls
                    .as_ref()
                    .is_some_and(|t| t.is_handshaking() && t.wants_read());
                if wants_read && c.fill_tls().await? == 0 {
                    return Err(ConnError::Closed);
                }
            }
            c.flush_tls().await?;
        }
        Ok(c)
    }

    /// Sends `buf[range]` whole; gives the buffer back.
    pub async fn send(
        &mut self,
        buf: Vec<u8>,
        range: std::ops::Range<usize>,
    ) -> (Result<(), ConnError>, Vec<u8>) {
        if self.tls.is_some() {
            // rustls buffers at most 64 KiB of plaintext: feed it in pieces
            // and write out the records in between.
            let mut at = range.start;
            while at < range.end {
                let tls = self.tls.as_mut().expect("checked");
                match tls.writer().write(&buf[at..range.end]) {
                    Ok(n) => at += n,
                    Err(e) => return (Err(e.into()), buf),
                }
                if let Err(e) = self.flush_tls().await {
                    return (Err(e), buf);
                }
            }
            return (Ok(()), buf);
        }
        let (res, slice) = self.stream.write_all(buf.slice(range)).await;
        (res.map_err(ConnError::from), slice.into_inner())
    }

    /// Shuts the socket down both ways: an operation in flight on it ends
    /// (with an error) so its buffer comes back.
    pub fn abort_handle(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.stream.as_raw_fd()
    }

    /// Appends what the endpoint sent next to `into`; 0 when it closed.
    pub async fn read(&mut self, into: &mut Vec<u8>) -> Result<usize, ConnError> {
        if self.tls.is_none() {
            let n = self.read_socket().await?;
            into.extend_from_slice(&self.read_buf[..n]);
            return Ok(n);
        }
        loop {
            let tls = self.tls.as_mut().expect("checked");
            let start = into.len();
            into.resize(start + READ_BYTES, 0);
            let got = tls.reader().read(&mut into[start..]);
            match got {
                Ok(n) => {
                    into.truncate(start + n);
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    into.truncate(start);
                    if self.fill_tls().await? == 0 {
                        return Ok(0);
                    }
                }
                Err(e) => {
                    into.truncate(start);
                    return Err(e.into());
                }
            }
        }
    }

    async fn read_socket(&mut self) -> Result<usize, ConnError> {
        let mut buf = std::mem::take(&mut self.read_buf);
        buf.clear();
        let (res, buf) = self.stream.read(buf).await;
        self.read_buf = buf;
        Ok(res?)
    }

    /// Reads from the socket into rustls; 0 when the peer closed.
    async fn fill_tls(&mut self) -> Result<usize, ConnError> {
        let n = self.read_socket().await?;
        let tls = self.tls.as_mut().expect("TLS connection");
        let mut data = &self.read_buf[..n];
        while !data.is_empty() {
            tls.read_tls(&mut data)?;
            if let Err(e) = tls.process_new_packets() {
                // Tell the peer why (an alert) before giving up.
                let _ = self.flush_tls().await;
                return Err(ConnError::Tls(e));
            }
        }
        if n == 0 {
            return Ok(0);
        }
        self.flush_tls().await?;
        Ok(n)
    }

    /// Writes what rustls has to send.
    async fn flush_tls(&mut self) -> Result<(), ConnError> {
        loop {
            let tls = self.tls.as_mut().expect("TLS connection");
            if !tls.wants_write() {
                return Ok(());
            }
            let mut out = std::mem::take(&mut self.tls_out);
            out.clear();
            while tls.wants_write() && out.len() < 256 * 1024 {
                tls.write_tls(&mut out)?;
            }
            let (res, out) = self.stream.write_all(out).await;
            self.tls_out = out;
            res?;
        }
    }
}
