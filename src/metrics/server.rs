//! The metrics endpoint's HTTP/1.x server: one thread, `poll(2)` over a
//! bounded set of connections, nothing spawned per connection.
//!
//! Bounds, each one a constant here:
//! - at most [`CONNECTIONS_MAX`] connections; a new one past that closes the
//!   oldest (a scraper always gets in; idle or slow clients cannot hold the
//!   endpoint);
//! - a request head of at most [`HEAD_BYTES_MAX`] bytes (past it: `431`);
//!   a body is never read, only drained after the answer;
//! - [`REQUEST_MS`] from accept to the end of the answer; a connection that
//!   is still not done then is closed.
//!
//! Every answer closes its connection (`Connection: close`): scrapes are
//! seconds apart, and keep-alive would only let clients hold slots.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Connections served at once.
pub const CONNECTIONS_MAX: usize = 64;
/// Bytes of a request head (request line and headers).
pub const HEAD_BYTES_MAX: usize = 8 * 1024;
/// Time from accept until the answer is written.
pub const REQUEST_MS: u64 = 5_000;
/// After the answer: how long unread request bytes are drained before the
/// close (closing with unread bytes would reset the answer away).
const DRAIN_MS: u64 = 1_000;

enum State {
    /// Reading the request head into `head`.
    Reading,
    /// Writing the answer from `out[written..]`.
    Writing { out: Vec<u8>, written: usize },
    /// Answered and shut down for writing; discarding what the client sends.
    Draining,
}

struct Conn {
    stream: TcpStream,
    head: Vec<u8>,
    state: State,
    deadline: Instant,
}

/// The answer to one request head, as the full response bytes.
fn respond(head: &[u8], answer: &impl Fn(&str) -> (u16, &'static str, String)) -> Vec<u8> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or(b"");
    let line = std::str::from_utf8(line).unwrap_or("").trim_end();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match method {
        "GET" | "HEAD" => answer(path),
        _ => (405, "text/plain", "only GET and HEAD\n".to_string()),
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

fn too_large() -> Vec<u8> {
    let body = "request head too large\n";
    format!(
        "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Where a request head ends, if it has.
fn head_end(head: &[u8]) -> Option<usize> {
    memchr::memmem::find(head, b"\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| memchr::memmem::find(head, b"\n\n").map(|i| i + 2))
}

impl Conn {
    /// Makes progress on a ready connection; false when it is finished.
    fn advance(&mut self, answer: &impl Fn(&str) -> (u16, &'static str, String)) -> bool {
        loop {
            match &mut self.state {
                State::Reading => {
                    let mut chunk = [0u8; 2048];
                    let room = HEAD_BYTES_MAX - self.head.len();
                    let want = room.min(chunk.len());
                    match self.stream.read(&mut chunk[..want]) {
                        Ok(0) => return false,
                        Ok(n) => self.head.extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => return false,
                    }
                    let out = if head_end(&self.head).is_some() {
                        respond(&self.head, answer)
                    } else if self.head.len() >= HEAD_BYTES_MAX {
                        too_large()
                    } else {
                        continue;
                    };
                    self.state = State::Writing { out, written: 0 };
                }
                State::Writing { out, written } => match self.stream.write(&out[*written..]) {
                    Ok(n) => {
                        *written += n;
                        if *written == out.len() {
                            let _ = self.stream.shutdown(std::net::Shutdown::Write);
                            self.state = State::Draining;
                            self.deadline = self
                                .deadline
                                .min(Instant::now() + Duration::from_millis(DRAIN_MS));
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => return false,
                },
                State::Draining => {
                    let mut sink = [0u8; 4096];
                    match self.stream.read(&mut sink) {
                        Ok(0) => return false,
                        Ok(_) => continue,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => return false,
                    }
                }
            }
        }
    }

    fn events(&self) -> libc::c_short {
        match self.state {
            State::Writing { .. } => libc::POLLOUT,
            State::Reading | State::Draining => libc::POLLIN,
        }
    }
}

/// Serves `listener` for the life of the process. `answer` maps a path to
/// status, content type and body.
pub fn run(listener: TcpListener, answer: impl Fn(&str) -> (u16, &'static str, String)) {
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::error!(error = %e, "metrics endpoint: cannot make the listener non-blocking; not serving");
        return;
    }
    let mut conns: Vec<Conn> = Vec::with_capacity(CONNECTIONS_MAX);
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(CONNECTIONS_MAX + 1);
    let mut log_accept = crate::logging::LogEvery::ten_seconds();
    loop {
        let now = Instant::now();
        conns.retain(|c| c.deadline > now);
        fds.clear();
        fds.push(libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        fds.extend(conns.iter().map(|c| libc::pollfd {
            fd: c.stream.as_raw_fd(),
            events: c.events(),
            revents: 0,
        }));
        let wait = conns
            .iter()
            .map(|c| c.deadline.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        let timeout = (wait.as_millis() as libc::c_int).max(1);
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                tracing::warn!(error = %e, "metrics endpoint: poll failed");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        // Connections first (their indices match `fds[1..]`), then accepts.
        let mut i = 0;
        conns.retain_mut(|c| {
            i += 1;
            let revents = fds[i].revents;
            if revents == 0 {
                return true;
            }
            c.advance(&answer)
        });
        if fds[0].revents & libc::POLLIN != 0 {
            loop {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if stream.set_nonblocking(true).is_err() {
                            continue;
                        }
                        if conns.len() >= CONNECTIONS_MAX {
                            // The oldest goes: it has had the longest to finish.
                            conns.remove(0);
                        }
                        conns.push(Conn {
                            stream,
                            head: Vec::with_capacity(1024),
                            state: State::Reading,
                            deadline: Instant::now() + Duration::from_millis(REQUEST_MS),
                        });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // EMFILE and friends: the backlog waits.
                        if let Some(held) = log_accept.ready() {
                            tracing::warn!(error = %e, suppressed = held, "metrics endpoint: accept failed");
                        }
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(path: &str) -> (u16, &'static str, String) {
        match path {
            "/x" => (200, "text/plain", "hi\n".into()),
            _ => (404, "text/plain", "no\n".into()),
        }
    }

    #[test]
    fn a_head_is_answered_by_path_and_method() {
        let ok =
            String::from_utf8(respond(b"GET /x?a=1 HTTP/1.1\r\nHost: h\r\n\r\n", &answer)).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nhi\n"), "{ok}");
        let head = String::from_utf8(respond(b"HEAD /x HTTP/1.0\r\n\r\n", &answer)).unwrap();
        assert!(
            head.ends_with("Content-Length: 3\r\nConnection: close\r\n\r\n"),
            "{head}"
        );
        let post = String::from_utf8(respond(b"POST /x HTTP/1.1\r\n\r\n", &answer)).unwrap();
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n\r\nbody"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.0\r\nHost"), None);
    }
}
