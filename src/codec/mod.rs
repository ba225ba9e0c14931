//! Sans-I/O framing: bytes in, records out.
//!
//! A [`Decoder`] is fed the unread part of a connection's buffer and answers
//! with one [`Decoded`] step: a record (a slice of the input, never a copy), a
//! request for more bytes, or a counted problem. It owns no buffer and never
//! allocates; the caller owns the bytes and drops `consumed` of them.
//!
//! Framings:
//! - `newline`: records end at `\n`. A line longer than `max_record_bytes` is
//!   counted once and skipped up to the next `\n` (the stream resynchronises).
//! - `octet_counting` (RFC 6587 §3.4.1): `MSG-LEN SP MSG`, as
//!   `logger --octet-count` and rsyslog send it; line feeds between frames are
//!   tolerated, and one that ends a frame (rsyslog counts it) is not part of
//!   the record. A bad or oversized length is fatal for the connection: the
//!   framing is lost.
//! - `length_prefixed`: a u32 big-endian length, then that many bytes. An
//!   oversized length is fatal for the connection.
//!
//! One record per datagram needs no decoder: see [`datagram_record`].
//!
//! Decodings locate a framed record's fields in place, without copying or
//! allocating: [`syslog`] (RFC 5424 and 3164), [`influx`] (line protocol)
//! and [`json`] (one object per record).

pub mod index;
pub mod influx;
pub mod json;
pub mod syslog;

use crate::config::Framing;

/// One step of decoding.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole record; drop `consumed` bytes of input after using it.
    Record { record: &'a [u8], consumed: usize },
    /// No whole frame yet; drop `consumed` bytes (skipped) and read more.
    NeedMore { consumed: usize },
    /// A frame longer than the limit. With `fatal`, the framing is lost and
    /// the connection must be closed; otherwise the bytes were skipped.
    Oversize { consumed: usize, fatal: bool },
    /// Bytes that are not a frame of this framing; the connection must close.
    Invalid { reason: &'static str },
}

/// What is left when a stream ends.
#[derive(Debug, PartialEq, Eq)]
pub enum End<'a> {
    /// Nothing: the stream ended between frames.
    Clean,
    /// The unterminated last line of a newline stream: a record.
    Record(&'a [u8]),
    /// A frame cut short: its bytes are lost (counted as `truncated`).
    Truncated,
}

/// Cuts a byte stream into records.
#[derive(Debug, Clone)]
pub struct Decoder {
    framing: Framing,
    max_record_bytes: usize,
    /// `newline` only: inside an oversized line, skipping to its end.
    skipping: bool,
}

/// Longest decimal length octet counting accepts (10 digits fit a u32 frame
/// bigger than any record limit).
const OCTET_LEN_DIGITS_MAX: usize = 10;

impl Decoder {
    pub fn new(framing: Framing, max_record_bytes: usize) -> Decoder {
        debug_assert!(framing != Framing::Datagram, "datagrams need no decoder");
        Decoder {
            framing,
            max_record_bytes,
            skipping: false,
        }
    }

    /// The most bytes a caller must hold to see one whole frame.
    pub fn frame_bytes_max(&self) -> usize {
        self.max_record_bytes + OCTET_LEN_DIGITS_MAX + 2
    }

    /// Decodes the next step from `buf`, the unread input.
    #[inline]
    pub fn decode<'a>(&mut self, buf: &'a [u8]) -> Decoded<'a> {
        match self.framing {
            Framing::Newline | Framing::Datagram => self.newline(buf),
            Framing::OctetCounting => self.octet_counting(buf),
            Framing::LengthPrefixed => self.length_prefixed(buf),
        }
    }

    /// At end of stream: the unterminated rest of a newline stream is a last
    /// record; a partial counted frame is [`End::Truncated`].
    pub fn finish<'a>(&mut self, buf: &'a [u8]) -> End<'a> {
        match self.framing {
            Framing::Newline | Framing::Datagram => {
                if self.skipping || buf.is_empty() {
                    // An oversized line was counted when it began.
                    End::Clean
                } else {
                    // Longer than the limit, decode would be skipping it.
                    debug_assert!(buf.len() <= self.max_record_bytes);
                    End::Record(buf)
                }
            }
            Framing::OctetCounting if buf.iter().all(|&b| b == b'\n' || b == b'\r') => End::Clean,
            Framing::OctetCounting | Framing::LengthPrefixed if !buf.is_empty() => End::Truncated,
            Framing::OctetCounting | Framing::LengthPrefixed => End::Clean,
        }
    }

    #[inline]
    fn newline<'a>(&mut self, buf: &'a [u8]) -> Decoded<'a> {
        match memchr::memchr(b'\n', buf) {
            Some(i) if self.skipping => {
                // The oversized line ends here; go on with what follows it.
                self.skipping = false;
                let skipped = i + 1;
                match self.newline(&buf[skipped..]) {
                    Decoded::Record { record, consumed } => Decoded::Record {
                        record,
                        consumed: skipped + consumed,
                    },
                    Decoded::NeedMore { consumed } => Decoded::NeedMore {
                        consumed: skipped + consumed,
                    },
                    Decoded::Oversize { consumed, fatal } => Decoded::Oversize {
                        consumed: skipped + consumed,
                        fatal,
                    },
                    invalid @ Decoded::Invalid { .. } => invalid,
                }
            }
            Some(i) if i > self.max_record_bytes => Decoded::Oversize {
                consumed: i + 1,
                fatal: false,
            },
            Some(i) => Decoded::Record {
                record: &buf[..i],
                consumed: i + 1,
            },
            None if self.skipping => Decoded::NeedMore {
                consumed: buf.len(),
            },
            None if buf.len() > self.max_record_bytes => {
                self.skipping = true;
                Decoded::Oversize {
                    consumed: buf.len(),
                    fatal: false,
                }
            }
            None => Decoded::NeedMore { consumed: 0 },
        }
    }

    #[inline]
    fn octet_counting<'a>(&mut self, buf: &'a [u8]) -> Decoded<'a> {
        // Line feeds (and CRs) between frames are tolerated.
        let start = buf
            .iter()
            .position(|&b| b != b'\n' && b != b'\r')
            .unwrap_or(buf.len());
        let rest = &buf[start..];
        let mut len: usize = 0;
        let mut digits = 0;
        for &b in rest.iter() {
            match b {
                b'0'..=b'9' => {
                    if digits == 0 && b == b'0' {
                        return Decoded::Invalid {
                            reason: "octet count with a leading zero",
                        };
                    }
                    len = len * 10 + (b - b'0') as usize;
                    digits += 1;
                    if digits > OCTET_LEN_DIGITS_MAX {
                        return Decoded::Invalid {
                            reason: "octet count too long",
                        };
                    }
                }
                b' ' if digits > 0 => {
                    if len > self.max_record_bytes {
                        return Decoded::Oversize {
                            consumed: buf.len(),
                            fatal: true,
                        };
                    }
                    let body = start + digits + 1;
                    if buf.len() < body + len {
                        return Decoded::NeedMore { consumed: start };
                    }
                    // rsyslog counts the line feed it ends a message with:
                    // it is not part of the record.
                    let record = &buf[body..body + len];
                    let record = record.strip_suffix(b"\n").unwrap_or(record);
                    let record = record.strip_suffix(b"\r").unwrap_or(record);
                    return Decoded::Record {
                        record,
                        consumed: body + len,
                    };
                }
                _ => {
                    return Decoded::Invalid {
                        reason: "expected an octet count (digits, then a space)",
                    }
                }
            }
        }
        Decoded::NeedMore { consumed: start }
    }

    #[inline]
    fn length_prefixed<'a>(&mut self, buf: &'a [u8]) -> Decoded<'a> {
        let Some(head) = buf.get(..4) else {
            return Decoded::NeedMore { consumed: 0 };
        };
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len > self.max_record_bytes {
            return Decoded::Oversize {
                consumed: buf.len(),
                fatal: true,
            };
        }
        if buf.len() < 4 + len {
            return Decoded::NeedMore { consumed: 0 };
        }
        Decoded::Record {
            record: &buf[4..4 + len],
            consumed: 4 + len,
        }
    }
}

/// The record a datagram carries: the datagram less one trailing newline.
#[inline]
pub fn datagram_record(datagram: &[u8]) -> &[u8] {
    match datagram.last() {
        Some(b'\n') => &datagram[..datagram.len() - 1],
        _ => datagram,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes, as reads would, and collects
    /// the records and the problems.
    fn run(framing: Framing, max: usize, input: &[u8], step: usize) -> (Vec<Vec<u8>>, usize, bool) {
        let mut d = Decoder::new(framing, max);
        let mut buf = Vec::new();
        let mut records = Vec::new();
        let mut oversize = 0;
        for chunk in input.chunks(step) {
            buf.extend_from_slice(chunk);
            loop {
                match d.decode(&buf) {
                    Decoded::Record { record, consumed } => {
                        records.push(record.to_vec());
                        buf.drain(..consumed);
                    }
                    Decoded::NeedMore { consumed } => {
                        buf.drain(..consumed);
                        break;
                    }
                    Decoded::Oversize { consumed, fatal } => {
                        oversize += 1;
                        buf.drain(..consumed);
                        if fatal {
                            return (records, oversize, true);
                        }
                    }
                    Decoded::Invalid { .. } => return (records, oversize, true),
                }
            }
        }
        if let End::Record(r) = d.finish(&buf) {
            records.push(r.to_vec());
        }
        (records, oversize, false)
    }

    #[test]
    fn a_counted_frame_cut_short_at_the_end_is_truncated() {
        let mut d = Decoder::new(Framing::OctetCounting, 100);
        assert_eq!(d.finish(b"10 abc"), End::Truncated);
        assert_eq!(d.finish(b"\n"), End::Clean);
        let mut d = Decoder::new(Framing::LengthPrefixed, 100);
        assert_eq!(d.finish(&[0, 0]), End::Truncated);
        assert_eq!(d.finish(b""), End::Clean);
        let mut d = Decoder::new(Framing::Newline, 100);
        assert_eq!(d.finish(b"last"), End::Record(b"last"));
    }

    #[test]
    fn newline_whole_and_split_reads() {
        for step in [1, 3, 64] {
            let (r, o, closed) = run(Framing::Newline, 100, b"a\nbb\n\nccc", step);
            assert_eq!(
                r,
                vec![b"a".to_vec(), b"bb".to_vec(), b"".to_vec(), b"ccc".to_vec()]
            );
            assert_eq!((o, closed), (0, false));
        }
    }

    #[test]
    fn newline_oversize_is_counted_once_and_resyncs() {
        let mut input = vec![b'x'; 50];
        input.extend_from_slice(b"\nok\n");
        for step in [1, 7, 100] {
            let (r, o, closed) = run(Framing::Newline, 10, &input, step);
            assert_eq!(r, vec![b"ok".to_vec()], "step {step}");
            assert_eq!((o, closed), (1, false), "step {step}");
        }
    }

    #[test]
    fn octet_counting_as_logger_sends_it() {
        // rsyslog's omfwd counts a line feed at the end of each message.
        let input = b"11 hello world5 a\nb c\n3 xyz4 end\n6 crlf\r\n";
        for step in [1, 4, 100] {
            let (r, o, closed) = run(Framing::OctetCounting, 100, input, step);
            assert_eq!(
                r,
                vec![
                    b"hello world".to_vec(),
                    b"a\nb c".to_vec(),
                    b"xyz".to_vec(),
                    b"end".to_vec(),
                    b"crlf".to_vec()
                ]
            );
            assert_eq!((o, closed), (0, false));
        }
    }

    #[test]
    fn octet_counting_garbage_and_oversize_close() {
        let (r, _, closed) = run(Framing::OctetCounting, 100, b"3 abcgarbage", 100);
        assert_eq!(r, vec![b"abc".to_vec()]);
        assert!(closed);
        let (r, o, closed) = run(Framing::OctetCounting, 10, b"500 aaaa", 100);
        assert!(r.is_empty());
        assert_eq!((o, closed), (1, true));
    }

    #[test]
    fn length_prefixed() {
        let mut input = Vec::new();
        for rec in [&b"one"[..], b"", b"three"] {
            input.extend_from_slice(&(rec.len() as u32).to_be_bytes());
            input.extend_from_slice(rec);
        }
        for step in [1, 5, 100] {
            let (r, o, closed) = run(Framing::LengthPrefixed, 10, &input, step);
            assert_eq!(r, vec![b"one".to_vec(), b"".to_vec(), b"three".to_vec()]);
            assert_eq!((o, closed), (0, false));
        }
        let (_, o, closed) = run(Framing::LengthPrefixed, 10, &[0, 0, 1, 0, b'x'], 100);
        assert_eq!((o, closed), (1, true));
    }

    /// Random bytes in random pieces: every framing makes progress or asks
    /// for more, never panics, and never hands out a record over the limit.
    #[test]
    fn arbitrary_input_never_panics_or_overflows_the_limit() {
        let mut rng = fastrand::Rng::with_seed(6587);
        for framing in [
            Framing::Newline,
            Framing::OctetCounting,
            Framing::LengthPrefixed,
        ] {
            for _ in 0..300 {
                let len = rng.usize(0..2048);
                // Mostly digits, spaces and newlines, so frames do occur.
                let input: Vec<u8> = (0..len)
                    .map(|_| match rng.u8(0..6) {
                        0 => b' ',
                        1 => b'\n',
                        2 => rng.u8(..),
                        _ => b'0' + rng.u8(0..10),
                    })
                    .collect();
                let mut d = Decoder::new(framing, 64);
                let mut buf = Vec::new();
                for chunk in input.chunks(rng.usize(1..64)) {
                    buf.extend_from_slice(chunk);
                    loop {
                        match d.decode(&buf) {
                            Decoded::Record { record, consumed } => {
                                assert!(record.len() <= 64);
                                assert!(consumed > 0 && consumed <= buf.len());
                                buf.drain(..consumed);
                            }
                            Decoded::NeedMore { consumed } => {
                                buf.drain(..consumed);
                                break;
                            }
                            Decoded::Oversize { consumed, fatal } => {
                                buf.drain(..consumed);
                                if fatal {
                                    buf.clear();
                                    d = Decoder::new(framing, 64);
                                    break;
                                }
                            }
                            Decoded::Invalid { .. } => {
                                buf.clear();
                                d = Decoder::new(framing, 64);
                                break;
                            }
                        }
                    }
                    // What waits for more is bounded by one frame.
                    assert!(
                        buf.len() <= d.frame_bytes_max() + 64,
                        "{framing:?} holds {}",
                        buf.len()
                    );
                }
            }
        }
    }

    #[test]
    fn datagram_strips_one_newline() {
        assert_eq!(datagram_record(b"a\n"), b"a");
        assert_eq!(datagram_record(b"a\n\n"), b"a\n");
        assert_eq!(datagram_record(b""), b"");
    }
}
