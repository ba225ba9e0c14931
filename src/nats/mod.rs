//! NATS on the wire: the client protocol's operations, sans-I/O (the caller
//! owns the socket and the buffers).
//!
//! The protocol is text lines ending in CRLF, some followed by a payload
//! whose length the line gives:
//!
//! ```text
//! server -> client                         client -> server
//! INFO {json}                              CONNECT {json}
//! MSG <subject> <sid> [reply] <n>          PUB <subject> [reply] <n>
//!   <n bytes>                                <n bytes>
//! HMSG <subject> <sid> [reply] <h> <n>     HPUB <subject> [reply] <h> <n>
//!   <h bytes of headers, n-h of payload>     <h bytes of headers, n-h of payload>
//! PING / PONG / +OK / -ERR '<why>'         SUB <subject> <sid> / PING / PONG
//! ```
//!
//! Headers are `NATS/1.0[ <status>[ <why>]]` then `Name: value` lines and
//! an empty line. JetStream answers a publish that names a reply subject with
//! a message on it: `{"stream":…,"seq":…[,"duplicate":true]}` when stored,
//! `{"error":{"code":…,"err_code":…,"description":…}}` when refused, or, when
//! no stream captures the subject, an empty message with status 503 ("no
//! responders", which the client asks for in CONNECT).
//!
//! [`next`] reads one operation from the front of a buffer as slices of it
//! (nothing is allocated); [`put_hpub`] and [`put_pub`] write a publish into
//! the caller's buffer. Both are bounded: a line longer than [`MAX_LINE`] or
//! a message longer than the server's `max_payload` is an error, never an
//! allocation.
//!
//! No well-kept sans-I/O codec exists to use instead: `nats-types` (last
//! release 2019) owns every message as `String`s and `Vec`s, and the official
//! `async-nats` client keeps its parser private, behind its own tokio I/O.

use serde::{Deserialize, Serialize};

/// The url schemes of a NATS server: `nats://HOST[:4222]` (TLS when the
/// server asks for it in INFO), `tls://HOST[:4222]` (TLS always).
pub const SCHEMES: crate::tls::Schemes = crate::tls::Schemes {
    plain: ("nats", 4222),
    tls: ("tls", 4222),
    peer: "server",
};

/// The longest protocol line accepted (an INFO with a long list of cluster
/// urls stays well under it).
pub const MAX_LINE: usize = 64 * 1024;

/// A protocol error from the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("a protocol line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("an unknown operation {0:?}")]
    Unknown(String),
    #[error("a malformed {0} line")]
    Malformed(&'static str),
    #[error("a message of {0} bytes, over the limit")]
    TooLarge(usize),
}

/// One operation from the server, borrowing the buffer it was read from.
#[derive(Debug, PartialEq, Eq)]
pub enum Op<'a> {
    /// The server's INFO object (JSON).
    Info(&'a [u8]),
    /// A message (MSG, or HMSG with `headers` not empty).
    Msg {
        subject: &'a [u8],
        sid: &'a [u8],
        reply: Option<&'a [u8]>,
        headers: &'a [u8],
        payload: &'a [u8],
    },
    Ping,
    Pong,
    Ok,
    /// `-ERR`, with the server's reason (quotes removed).
    Err(&'a [u8]),
}

/// Reads the operation at the front of `buf`: `Ok(None)` when more bytes
/// are needed, else the operation and the bytes it took. A message longer
/// than `max_payload` is an error. Never panics on any input.
pub fn next(buf: &[u8], max_payload: usize) -> Result<Option<(Op<'_>, usize)>, WireError> {
    let Some(eol) = memchr::memmem::find(buf, b"\r\n") else {
        return if buf.len() > MAX_LINE {
            Err(WireError::LineTooLong)
        } else {
            Ok(None)
        };
    };
    if eol > MAX_LINE {
        return Err(WireError::LineTooLong);
    }
    let line = &buf[..eol];
    let after = eol + 2;
    let (name, rest) = match memchr::memchr2(b' ', b'\t', line) {
        Some(i) => (&line[..i], trim(&line[i + 1..])),
        None => (line, &line[line.len()..]),
    };
    let op = if name.eq_ignore_ascii_case(b"MSG") {
        return message(buf, after, rest, false, max_payload);
    } else if name.eq_ignore_ascii_case(b"HMSG") {
        return message(buf, after, rest, true, max_payload);
    } else if name.eq_ignore_ascii_case(b"PING") {
        Op::Ping
    } else if name.eq_ignore_ascii_case(b"PONG") {
        Op::Pong
    } else if name.eq_ignore_ascii_case(b"+OK") {
        Op::Ok
    } else if name.eq_ignore_ascii_case(b"-ERR") {
        let why = rest.strip_prefix(b"'").unwrap_or(rest);
        Op::Err(why.strip_suffix(b"'").unwrap_or(why))
    } else if name.eq_ignore_ascii_case(b"INFO") {
        Op::Info(rest)
    } else {
        let shown = &name[..name.len().min(32)];
        return Err(WireError::Unknown(
            String::from_utf8_lossy(shown).into_owned(),
        ));
    };
    Ok(Some((op, after)))
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end.max(start)]
}

/// A MSG or HMSG whose line (its arguments in `args`) ends at `body`.
fn message<'a>(
    buf: &'a [u8],
    body: usize,
    args: &'a [u8],
    with_headers: bool,
    max_payload: usize,
) -> Result<Option<(Op<'a>, usize)>, WireError> {
    let what = if with_headers { "HMSG" } else { "MSG" };
    let mut a = [&b""[..]; 5];
    let mut n = 0;
    for part in args
        .split(|c| *c == b' ' || *c == b'\t')
        .filter(|p| !p.is_empty())
    {
        if n == a.len() {
            return Err(WireError::Malformed(what));
        }
        a[n] = part;
        n += 1;
    }
    // subject sid [reply] [hdr] total
    let fixed = if with_headers { 4 } else { 3 };
    if n != fixed && n != fixed + 1 {
        return Err(WireError::Malformed(what));
    }
    let reply = (n == fixed + 1).then_some(a[2]);
    let total = number(a[n - 1]).ok_or(WireError::Malformed(what))?;
    let hdr = if with_headers {
        number(a[n - 2]).ok_or(WireError::Malformed(what))?
    } else {
        0
    };
    if hdr > total {
        return Err(WireError::Malformed(what));
    }
    if total > max_payload.saturating_add(hdr) {
        return Err(WireError::TooLarge(total));
    }
    let end = body + total;
    if buf.len() < end + 2 {
        return Ok(None);
    }
    if &buf[end..end + 2] != b"\r\n" {
        return Err(WireError::Malformed(what));
    }
    Ok(Some((
        Op::Msg {
            subject: a[0],
            sid: a[1],
            reply,
            headers: &buf[body..body + hdr],
            payload: &buf[body + hdr..end],
        },
        end + 2,
    )))
}

/// A decimal number of at most 10 digits.
fn number(b: &[u8]) -> Option<usize> {
    if b.is_empty() || b.len() > 10 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        b.iter()
            .fold(0usize, |v, &c| v * 10 + usize::from(c - b'0')),
    )
}

fn put_decimal(out: &mut Vec<u8>, mut v: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

const HEADER_START: &[u8] = b"NATS/1.0\r\nNats-Msg-Id: ";
const HEADER_END: &[u8] = b"\r\n\r\n";

/// Appends an HPUB of `payload` to `subject` with the header
/// `Nats-Msg-Id: <msg_id>` (JetStream drops a second message with the same
/// id inside its duplicate window), answered on `reply`.
pub fn put_hpub(out: &mut Vec<u8>, subject: &[u8], reply: &[u8], msg_id: &[u8], payload: &[u8]) {
    let hdr = HEADER_START.len() + msg_id.len() + HEADER_END.len();
    out.extend_from_slice(b"HPUB ");
    out.extend_from_slice(subject);
    out.push(b' ');
    out.extend_from_slice(reply);
    out.push(b' ');
    put_decimal(out, hdr);
    out.push(b' ');
    put_decimal(out, hdr + payload.len());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(HEADER_START);
    out.extend_from_slice(msg_id);
    out.extend_from_slice(HEADER_END);
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// Appends a PUB of `payload` to `subject` (core NATS: no answer).
pub fn put_pub(out: &mut Vec<u8>, subject: &[u8], payload: &[u8]) {
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(subject);
    out.push(b' ');
    put_decimal(out, payload.len());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// `SUB <subject> <sid>`.
pub fn sub(subject: &str, sid: u32) -> Vec<u8> {
    format!("SUB {subject} {sid}\r\n").into_bytes()
}

pub const PING: &[u8] = b"PING\r\n";
pub const PONG: &[u8] = b"PONG\r\n";

/// What the server says of itself (the fields the client uses).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Info {
    pub server_id: String,
    pub version: String,
    pub max_payload: usize,
    pub headers: bool,
    pub auth_required: bool,
    pub tls_required: bool,
    pub tls_available: bool,
}

pub fn info(json: &[u8]) -> Result<Info, WireError> {
    serde_json::from_slice(json).map_err(|_| WireError::Malformed("INFO"))
}

/// How the client logs in.
#[derive(Debug, Clone)]
pub enum Auth {
    None,
    Token(String),
    User(String, String),
}

#[derive(Serialize)]
struct Connect<'a> {
    verbose: bool,
    pedantic: bool,
    tls_required: bool,
    name: &'a str,
    lang: &'static str,
    version: &'static str,
    protocol: u8,
    headers: bool,
    no_responders: bool,
    echo: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pass: Option<&'a str>,
}

/// `CONNECT {…}` followed by a PING (the PONG says the server took it; an
/// `-ERR` before it says why not).
pub fn connect(name: &str, tls: bool, auth: &Auth) -> Vec<u8> {
    let (token, user, pass) = match auth {
        Auth::None => (None, None, None),
        Auth::Token(t) => (Some(t.as_str()), None, None),
        Auth::User(u, p) => (None, Some(u.as_str()), Some(p.as_str())),
    };
    let c = Connect {
        verbose: false,
        pedantic: false,
        tls_required: tls,
        name,
        lang: "rust",
        version: env!("CARGO_PKG_VERSION"),
        protocol: 1,
        headers: true,
        no_responders: true,
        echo: false,
        auth_token: token,
        user,
        pass,
    };
    let mut out = b"CONNECT ".to_vec();
    serde_json::to_writer(&mut out, &c).expect("a CONNECT serialises");
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(PING);
    out
}

/// The status of a message's headers (`NATS/1.0 503` → 503), if any.
pub fn status(headers: &[u8]) -> Option<u16> {
    let line = headers.split(|c| *c == b'\r').next()?;
    let rest = line.strip_prefix(b"NATS/1.0")?;
    let code = trim(rest).split(|c| *c == b' ').next()?;
    number(code).and_then(|c| u16::try_from(c).ok())
}

/// JetStream's answer to a publish.
#[derive(Debug, PartialEq, Eq)]
pub enum PubAck {
    /// Stored (or, `duplicate`, already stored under the same message id).
    Stored { duplicate: bool },
    /// Refused, with the server's code and reason.
    Refused {
        code: u16,
        err_code: u32,
        description: String,
    },
}

#[derive(Deserialize)]
struct RawAck {
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    error: Option<RawError>,
}

#[derive(Deserialize)]
struct RawError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u32,
    #[serde(default)]
    description: String,
}

/// Reads JetStream's answer: a PubAck or an API error (allocates only for
/// an error's description).
pub fn pub_ack(payload: &[u8]) -> Result<PubAck, WireError> {
    let raw: RawAck =
        serde_json::from_slice(payload).map_err(|_| WireError::Malformed("PubAck"))?;
    match (raw.error, raw.seq) {
        (Some(e), _) => Ok(PubAck::Refused {
            code: e.code,
            err_code: e.err_code,
            description: e.description,
        }),
        (None, Some(_)) => Ok(PubAck::Stored {
            duplicate: raw.duplicate,
        }),
        (None, None) => Err(WireError::Malformed("PubAck")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_read_as_slices_of_the_buffer() {
        let buf = b"INFO {\"max_payload\":1048576,\"headers\":true}\r\nPING\r\nMSG a.b 7 _INBOX.x.5 3\r\nabc\r\nHMSG a 1 r 12 14\r\nNATS/1.0\r\n\r\nhi\r\n-ERR 'Authorization Violation'\r\n+OK\r\nPONG\r\n";
        let i = info(br#"{"max_payload":1048576,"headers":true,"other":[1]}"#).unwrap();
        assert_eq!((i.max_payload, i.headers), (1 << 20, true));
        let mut at = 0;
        let mut all = Vec::new();
        while let Some((op, n)) = next(&buf[at..], 1 << 20).unwrap() {
            all.push(op);
            at += n;
        }
        assert_eq!(at, buf.len());
        assert_eq!(all[1], Op::Ping);
        assert_eq!(
            all[2],
            Op::Msg {
                subject: b"a.b",
                sid: b"7",
                reply: Some(b"_INBOX.x.5"),
                headers: b"",
                payload: b"abc"
            }
        );
        assert_eq!(
            all[3],
            Op::Msg {
                subject: b"a",
                sid: b"1",
                reply: Some(b"r"),
                headers: b"NATS/1.0\r\n\r\n",
                payload: b"hi"
            }
        );
        assert_eq!(all[4], Op::Err(b"Authorization Violation"));
        assert_eq!((&all[5], &all[6]), (&Op::Ok, &Op::Pong));
    }

    #[test]
    fn a_partial_operation_waits_for_more() {
        let whole = b"MSG a 1 5\r\nhello\r\n";
        for cut in 0..whole.len() {
            assert_eq!(next(&whole[..cut], 100).unwrap(), None, "cut at {cut}");
        }
        assert!(next(whole, 100).unwrap().is_some());
    }

    #[test]
    fn hostile_input_is_an_error_not_a_panic() {
        assert_eq!(
            next(b"MSG a 1 5\r\nhelloXX", 100),
            Err(WireError::Malformed("MSG"))
        );
        assert_eq!(next(b"MSG a 1 101\r\n", 100), Err(WireError::TooLarge(101)));
        assert_eq!(
            next(b"MSG a 1 99999999999\r\n", 100),
            Err(WireError::Malformed("MSG"))
        );
        assert_eq!(
            next(b"HMSG a 1 9 5\r\n", 100),
            Err(WireError::Malformed("HMSG"))
        );
        assert_eq!(next(b"MSG a\r\n", 100), Err(WireError::Malformed("MSG")));
        assert!(matches!(
            next(b"BOGUS\r\n", 100),
            Err(WireError::Unknown(_))
        ));
        assert_eq!(
            next(&vec![b'x'; MAX_LINE + 1], 100),
            Err(WireError::LineTooLong)
        );
        // Random bytes: never a panic.
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..64);
            let mut b: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if rng.bool() {
                let head: &[u8] = [&b"MSG "[..], b"HMSG ", b"INFO ", b"-ERR "][rng.usize(0..4)];
                b.splice(0..0, head.iter().copied());
            }
            let _ = next(&b, 1000);
        }
    }

    #[test]
    fn a_publish_reads_back_as_the_server_would_deliver_it() {
        let mut out = Vec::new();
        put_hpub(
            &mut out,
            b"gw.sensors",
            b"_INBOX.u.1",
            b"up-0-7-4096-3",
            b"t=21.5",
        );
        // The server turns HPUB into HMSG with a sid: read it back that way.
        let msg = [
            b"HMSG gw.sensors 1".as_slice(),
            &out[b"HPUB gw.sensors".len()..],
        ]
        .concat();
        let (op, n) = next(&msg, 1000).unwrap().unwrap();
        assert_eq!(n, msg.len());
        let Op::Msg {
            headers,
            payload,
            reply,
            ..
        } = op
        else {
            panic!("{op:?}")
        };
        assert_eq!(payload, b"t=21.5");
        assert_eq!(reply, Some(&b"_INBOX.u.1"[..]));
        assert_eq!(headers, b"NATS/1.0\r\nNats-Msg-Id: up-0-7-4096-3\r\n\r\n");
        let mut out = Vec::new();
        put_pub(&mut out, b"x", b"");
        assert_eq!(out, b"PUB x 0\r\n\r\n");
    }

    #[test]
    fn answers_to_a_publish_are_told_apart() {
        assert_eq!(
            pub_ack(br#"{"stream":"S","seq":12}"#),
            Ok(PubAck::Stored { duplicate: false })
        );
        assert_eq!(
            pub_ack(br#"{"stream":"S","seq":12,"duplicate":true}"#),
            Ok(PubAck::Stored { duplicate: true })
        );
        assert_eq!(
            pub_ack(br#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#),
            Ok(PubAck::Refused {
                code: 503,
                err_code: 10077,
                description: "maximum messages exceeded".into()
            })
        );
        assert!(pub_ack(b"nonsense").is_err());
        assert_eq!(status(b"NATS/1.0 503\r\n\r\n"), Some(503));
        assert_eq!(status(b"NATS/1.0\r\nNats-Msg-Id: x\r\n\r\n"), None);
    }

    #[test]
    fn connect_names_the_login_but_only_in_its_own_fields() {
        let c = String::from_utf8(connect(
            "updraft-up-0",
            false,
            &Auth::Token("s3cret".into()),
        ))
        .unwrap();
        assert!(
            c.starts_with("CONNECT {") && c.ends_with("}\r\nPING\r\n"),
            "{c}"
        );
        assert!(c.contains(r#""auth_token":"s3cret""#) && c.contains(r#""headers":true"#));
        assert!(!c.contains("\"user\""));
    }
}
