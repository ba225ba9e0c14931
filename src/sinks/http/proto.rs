//! HTTP/1.1 for the sink, sans I/O: request heads in, responses out.
//!
//! A request is `POST` with `Content-Length` and a body that is one batch.
//! Its head is written into room left in front of the body (see
//! [`RequestHead`]), so head and body leave in one write.
//!
//! A response is read into a buffer and [`parse_response`] is asked after
//! each read whether it is complete: it answers with the status, a
//! `Retry-After` in milliseconds, whether the connection must close, and
//! where the body (or its first bytes, for the dead-letter file) lies. Bodies
//! are framed by `Content-Length`, `chunked`, or the end of the connection.
//! A response larger than [`RESPONSE_BYTES_MAX`] is cut: its status is kept
//! and the connection is closed. Uses `httparse` for the head.

use super::encode::Encoder;
use super::config::{HttpTarget, RETRY_AFTER_MAX_MS};

/// Bytes of a response kept before it is cut (and the connection closed).
pub const RESPONSE_BYTES_MAX: usize = 64 * 1024;
/// Headers a response may have.
const RESPONSE_HEADERS_MAX: usize = 64;

/// Room for an idempotency key's value in a head.
const KEY_ROOM: usize = 128;

const CONTENT_LENGTH: &[u8] = b"\r\nContent-Length: ";

/// The fixed part of every request's head, built once per sink.
pub struct RequestHead {
    fixed: Vec<u8>,
    idempotency: Option<Vec<u8>>,
}

impl RequestHead {
    pub fn new(t: &HttpTarget, enc: &Encoder) -> RequestHead {
        let mut fixed = Vec::new();
        fixed.extend_from_slice(b"POST ");
        if t.path_template.is_none() {
            fixed.extend_from_slice(t.path.as_bytes());
        }
        fixed.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        fixed.extend_from_slice(t.host.as_bytes());
        fixed.extend_from_slice(b"\r\nUser-Agent: updraft/");
        fixed.extend_from_slice(env!("CARGO_PKG_VERSION").as_bytes());
        fixed.extend_from_slice(b"\r\nContent-Type: ");
        fixed.extend_from_slice(enc.content_type().as_bytes());
        if let Some(ce) = enc.content_encoding() {
            fixed.extend_from_slice(b"\r\nContent-Encoding: ");
            fixed.extend_from_slice(ce.as_bytes());
        }
        for (name, value) in &t.headers {
            fixed.extend_from_slice(b"\r\n");
            fixed.extend_from_slice(name.as_bytes());
            fixed.extend_from_slice(b": ");
            fixed.extend_from_slice(value.0.as_bytes());
        }
        RequestHead {
            fixed,
            idempotency: t
                .idempotency_header
                .as_ref()
                .map(|h| format!("\r\n{h}: ").into_bytes()),
        }
    }

    /// Room to leave in front of a body for the head, with `dest` bytes of
    /// a rendered destination (path and headers; 0 when fixed).
    pub fn room(&self, dest: usize) -> usize {
        self.fixed.len()
            + dest
            + CONTENT_LENGTH.len()
            + 20
            + self.idempotency.as_ref().map_or(0, |i| i.len() + KEY_ROOM)
            + 4
    }

    /// Writes the head so that it ends where the body starts (`buf[room..]`
    /// is the body); returns where the request starts. `dest` is a
    /// rendered destination: the path (percent-encoded) and a block of
    /// `\r\nName: value` headers, for a sink whose uri or headers name
    /// fields.
    pub fn write(
        &self,
        buf: &mut [u8],
        room: usize,
        key: Option<&[u8]>,
        dest: Option<(&[u8], &[u8])>,
    ) -> usize {
        let body_len = buf.len() - room;
        let mut len_digits = [0u8; 20];
        let digits = super::encode::decimal(body_len as u64, &mut len_digits);
        let (path, headers) = dest.unwrap_or((b"", b""));
        // The path goes right after `POST ` (a fixed one is in `fixed`).
        let (post, rest) = self.fixed.split_at(5);
        let mut parts: [&[u8]; 9] = [
            post,
            path,
            rest,
            headers,
            CONTENT_LENGTH,
            digits,
            b"",
            b"",
            b"\r\n\r\n",
        ];
        if let (Some(h), Some(k)) = (&self.idempotency, key) {
            parts[6] = h;
            parts[7] = &k[..k.len().min(KEY_ROOM)];
        }
        let head_len: usize = parts.iter().map(|p| p.len()).sum();
        assert!(head_len <= room, "room() covers every head");
        let start = room - head_len;
        let mut at = start;
        for p in parts {
            buf[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        debug_assert_eq!(at, room);
        start
    }
}

/// A complete response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub retry_after_ms: Option<u64>,
    /// The connection cannot carry another request.
    pub close: bool,
    /// Where the body's first bytes lie in the buffer (chunked: the first
    /// chunk), for the dead-letter file.
    pub body: std::ops::Range<usize>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
}

/// Whether `buf` holds a whole response; `eof` says the peer closed.
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<Response>, ProtoError> {
    let mut headers = [httparse::EMPTY_HEADER; RESPONSE_HEADERS_MAX];
    let mut r = httparse::Response::new(&mut headers);
    let head_len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if eof => {
            return Err(ProtoError::Malformed(
                "connection closed before the response head ended".into(),
            ))
        }
        Ok(httparse::Status::Partial) if buf.len() >= RESPONSE_BYTES_MAX => {
            return Err(ProtoError::Malformed("response head too large".into()))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ProtoError::Malformed(e.to_string())),
    };
    let status = r.code.unwrap_or(0);
    if status == 101 {
        return Err(ProtoError::Malformed(
            "the endpoint switched protocols (101)".into(),
        ));
    }
    if (100..200).contains(&status) {
        // An interim answer (100 Continue, 103 Early Hints): the real one
        // follows it.
        return parse_response(&buf[head_len..], eof).map(|found| {
            found.map(|mut r| {
                r.body = r.body.start + head_len..r.body.end + head_len;
                r
            })
        });
    }
    let mut content_length = None;
    let mut chunked = false;
    let mut close = r.version == Some(0);
    let mut retry_after_ms = None;
    for h in r.headers.iter() {
        let v = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                v.parse::<usize>()
                    .map_err(|_| ProtoError::Malformed(format!("bad Content-Length {v:?}")))?,
            );
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.to_ascii_lowercase().ends_with("chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = v.to_ascii_lowercase();
            if v.contains("close") {
                close = true;
            } else if v.contains("keep-alive") {
                close = false;
            }
        } else if h.name.eq_ignore_ascii_case("retry-after") {
            // Seconds; an HTTP date is not honoured (the backoff applies).
            retry_after_ms = v
                .parse::<u64>()
                .ok()
                .map(|s| s.saturating_mul(1000).min(RETRY_AFTER_MAX_MS));
        }
    }
    let rest = &buf[head_len..];
    let no_body = status == 204 || status == 304;
    if no_body {
        return Ok(Some(Response {
            status,
            retry_after_ms,
            close,
            body: head_len..head_len,
        }));
    }
    if chunked {
        let mut at = 0;
        let mut first: Option<std::ops::Range<usize>> = None;
        loop {
            match httparse::parse_chunk_size(&rest[at..]) {
                Ok(httparse::Status::Complete((n, size))) => {
                    // A chunk past the response cap is cut like a long body
                    // (and no sum below can overflow).
                    let size = usize::try_from(size)
                        .unwrap_or(usize::MAX)
                        .min(RESPONSE_BYTES_MAX);
                    let data = at + n;
                    if size == 0 {
                        // Trailers (rare) end with an empty line.
                        let tail = &rest[data..];
                        let end = if tail.starts_with(b"\r\n") {
                            Some(2)
                        } else {
                            memchr::memmem::find(tail, b"\r\n\r\n").map(|i| i + 4)
                        };
                        return match end {
                            Some(_) => Ok(Some(Response {
                                status,
                                retry_after_ms,
                                close,
                                body: first.unwrap_or(head_len..head_len),
                            })),
                            None => incomplete(buf, eof, status, retry_after_ms, head_len),
                        };
                    }
                    if rest.len() < data + size + 2 {
                        return incomplete(buf, eof, status, retry_after_ms, head_len);
                    }
                    first.get_or_insert(head_len + data..head_len + data + size);
                    at = data + size + 2;
                }
                Ok(httparse::Status::Partial) => {
                    return incomplete(buf, eof, status, retry_after_ms, head_len)
                }
                Err(_) => return Err(ProtoError::Malformed("bad chunk size".into())),
            }
        }
    }
    match content_length {
        Some(n) if rest.len() >= n => Ok(Some(Response {
            status,
            retry_after_ms,
            close,
            body: head_len..head_len + n,
        })),
        Some(_) => incomplete(buf, eof, status, retry_after_ms, head_len),
        // No length: the body runs to the end of the connection.
        None if eof => Ok(Some(Response {
            status,
            retry_after_ms,
            close: true,
            body: head_len..buf.len(),
        })),
        None => incomplete(buf, false, status, retry_after_ms, head_len),
    }
}

/// Not all there yet: wait for more, unless the peer closed (an error) or
/// the response grew too large (cut it: keep the status, close).
fn incomplete(
    buf: &[u8],
    eof: bool,
    status: u16,
    retry_after_ms: Option<u64>,
    head_len: usize,
) -> Result<Option<Response>, ProtoError> {
    if eof {
        return Err(ProtoError::Malformed(
            "connection closed inside the response body".into(),
        ));
    }
    if buf.len() >= RESPONSE_BYTES_MAX {
        return Ok(Some(Response {
            status,
            retry_after_ms,
            close: true,
            body: head_len..buf.len(),
        }));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_keep_alive_and_retry_after() {
        let r =
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nContent-Length: 4\r\n\r\nslow";
        for cut in 0..r.len() {
            assert_eq!(parse_response(&r[..cut], false), Ok(None), "cut at {cut}");
        }
        let got = parse_response(r, false).unwrap().unwrap();
        assert_eq!(got.status, 429);
        assert_eq!(got.retry_after_ms, Some(3000));
        assert!(!got.close);
        assert_eq!(&r[got.body], b"slow");
    }

    #[test]
    fn chunked_and_close_delimited_bodies() {
        let r = b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nbad l\r\n3\r\nine\r\n0\r\n\r\n";
        assert_eq!(parse_response(&r[..r.len() - 2], false), Ok(None));
        let got = parse_response(r, false).unwrap().unwrap();
        assert_eq!((got.status, &r[got.body.clone()]), (400, &b"bad l"[..]));
        let r = b"HTTP/1.0 200 OK\r\n\r\nhello";
        assert_eq!(parse_response(r, false), Ok(None));
        let got = parse_response(r, true).unwrap().unwrap();
        assert!(got.close);
        assert_eq!(&r[got.body], b"hello");
    }

    #[test]
    fn interim_answers_are_skipped_and_huge_chunks_are_cut() {
        let r = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok";
        let got = parse_response(r, false).unwrap().unwrap();
        assert_eq!((got.status, &r[got.body]), (201, &b"ok"[..]));
        let mut r =
            b"HTTP/1.1 500 x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nX0\r\n\r\n"
                .to_vec();
        assert_eq!(parse_response(&r, false), Ok(None));
        r.resize(RESPONSE_BYTES_MAX, b'x');
        let got = parse_response(&r, false).unwrap().unwrap();
        assert!(got.close && got.status == 500 && got.body.start <= got.body.end);
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        assert!(parse_response(b"SMTP ready\r\n\r\n", false).is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc", true).is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false).is_err());
        let mut big = b"HTTP/1.1 500 Oops\r\nContent-Length: 999999\r\n\r\n".to_vec();
        big.resize(RESPONSE_BYTES_MAX, b'x');
        let got = parse_response(&big, false).unwrap().unwrap();
        assert!(got.close && got.status == 500);
        for _ in 0..2000 {
            let junk: Vec<u8> = (0..fastrand::usize(0..200))
                .map(|_| fastrand::u8(..))
                .collect();
            let _ = parse_response(&junk, fastrand::bool());
        }
    }
}
