//! Syslog messages (RFC 5424 and RFC 3164) located in place: one pass over
//! a record's bytes finds where its fields lie, as byte ranges of the
//! record; nothing is copied or allocated, and the work is linear in the
//! record's length (every byte is looked at a bounded number of times).
//!
//! Both forms start with `<PRI>` (facility × 8 + severity, 0..=191). Then:
//! - RFC 5424: `VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP
//!   MSGID SP STRUCTURED-DATA [SP MSG]`, `-` for a value that is absent; the
//!   timestamp is RFC 3339 (`2026-12-03T12:00:00.123456+01:00`, or `Z`).
//! - RFC 3164 (BSD, what many devices and `logger --rfc3164` send):
//!   `Mmm dd hh:mm:ss HOSTNAME TAG[PID]: MSG`, the timestamp without a year
//!   or zone (taken as UTC, in the year of the receive time; a date more than
//!   a day ahead of it is taken as last year's). A message without the
//!   timestamp and host after its PRI is accepted with only its PRI and MSG.
//!
//! A record that does not start with a PRI is not syslog: an error, which
//! the source counts and passes on raw or drops (`on_error`).

/// A byte range of the record (`start..start + len`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub start: u32,
    pub len: u32,
}

impl Span {
    fn new(start: usize, end: usize) -> Span {
        Span {
            start: start as u32,
            len: (end - start) as u32,
        }
    }

    /// The bytes of `record` it covers.
    pub fn of<'a>(&self, record: &'a [u8]) -> &'a [u8] {
        let s = self.start as usize;
        record.get(s..s + self.len as usize).unwrap_or(&[])
    }
}

/// Where a syslog message's fields lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Syslog {
    pub facility: u8,
    pub severity: u8,
    /// 5424 (1) or 3164 (0).
    pub version: u8,
    pub timestamp: Option<Span>,
    /// The timestamp in ns since the Unix epoch, UTC.
    pub ts_ns: Option<u64>,
    pub host: Option<Span>,
    pub app: Option<Span>,
    pub procid: Option<Span>,
    pub msgid: Option<Span>,
    pub structured_data: Option<Span>,
    pub msg: Span,
}

impl Syslog {
    /// Its spans in the order the field index keeps them: timestamp, host,
    /// app, procid, msgid, structured data, msg.
    pub fn spans(&self) -> [Option<Span>; 7] {
        [
            self.timestamp,
            self.host,
            self.app,
            self.procid,
            self.msgid,
            self.structured_data,
            Some(self.msg),
        ]
    }
}

/// Why a record is not syslog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// It does not start with `<PRI>`.
    NoPri,
    /// A 5424 header that breaks off or holds a bad timestamp.
    BadHeader,
    /// 5424 structured data that is not closed.
    BadStructuredData,
}

impl Error {
    pub fn reason(self) -> &'static str {
        match self {
            Error::NoPri => "not syslog: no <PRI> at the start",
            Error::BadHeader => "not syslog: a bad RFC 5424 header",
            Error::BadStructuredData => "not syslog: unclosed RFC 5424 structured data",
        }
    }
}

/// Locates the fields of `record`; `now_ns` (the receive time) gives an RFC
/// 3164 timestamp its year.
pub fn parse(record: &[u8], now_ns: u64) -> Result<Syslog, Error> {
    let (pri, mut at) = pri(record).ok_or(Error::NoPri)?;
    let mut m = Syslog {
        facility: pri / 8,
        severity: pri % 8,
        ..Syslog::default()
    };
    // RFC 5424: a version digit (1..=99) then a space.
    let digits = record[at..]
        .iter()
        .take(3)
        .take_while(|c| c.is_ascii_digit())
        .count();
    if digits > 0 && digits < 3 && record.get(at + digits) == Some(&b' ') && record[at] != b'0' {
        m.version = 1;
        at += digits + 1;
        let ts = token(record, &mut at).ok_or(Error::BadHeader)?;
        if ts.of(record) != b"-" {
            m.ts_ns = Some(rfc3339(ts.of(record)).ok_or(Error::BadHeader)?);
            m.timestamp = Some(ts);
        }
        m.host = nil(record, token(record, &mut at).ok_or(Error::BadHeader)?);
        m.app = nil(record, token(record, &mut at).ok_or(Error::BadHeader)?);
        m.procid = nil(record, token(record, &mut at).ok_or(Error::BadHeader)?);
        m.msgid = nil(record, token(record, &mut at).ok_or(Error::BadHeader)?);
        let sd_start = at;
        if record.get(at) == Some(&b'-') {
            at += 1;
        } else if record.get(at) == Some(&b'[') {
            at = structured_data(record, at).ok_or(Error::BadStructuredData)?;
            m.structured_data = Some(Span::new(sd_start, at));
        } else {
            return Err(Error::BadHeader);
        }
        if record.get(at) == Some(&b' ') {
            at += 1;
        }
        m.msg = Span::new(at.min(record.len()), record.len());
        return Ok(m);
    }
    // RFC 3164, its timestamp as BSD wrote it or (rsyslog's forwarding
    // formats) RFC 3339.
    let stamp = bsd_timestamp(record, at, now_ns).or_else(|| {
        let t = record.get(at..at + 5)?;
        if !(t[..4].iter().all(u8::is_ascii_digit) && t[4] == b'-') {
            return None;
        }
        let end = memchr::memchr(b' ', &record[at..]).map_or(record.len(), |i| at + i);
        Some((rfc3339(&record[at..end])?, end))
    });
    if let Some((ts_ns, end)) = stamp {
        m.timestamp = Some(Span::new(at, end));
        m.ts_ns = Some(ts_ns);
        at = end;
        while record.get(at) == Some(&b' ') {
            at += 1;
        }
        // HOSTNAME, unless what follows is already the tag (`app: ...`).
        let word_end = memchr::memchr(b' ', &record[at..]).map_or(record.len(), |i| at + i);
        let word = &record[at..word_end];
        if !word.is_empty() && !word.ends_with(b":") && !word.contains(&b'[') {
            m.host = Some(Span::new(at, word_end));
            at = word_end;
            while record.get(at) == Some(&b' ') {
                at += 1;
            }
        }
    }
    // TAG: up to `[`, `:` or a space (at most 48 bytes, RFC 3164 says 32).
    let tag_len = record[at..]
        .iter()
        .take(48)
        .take_while(|&&c| c != b'[' && c != b':' && c != b' ')
        .count();
    let after = record.get(at + tag_len).copied();
    if tag_len > 0 && matches!(after, Some(b'[') | Some(b':')) {
        m.app = Some(Span::new(at, at + tag_len));
        at += tag_len;
        if after == Some(b'[') {
            let pid_len = record[at + 1..]
                .iter()
                .take(32)
                .take_while(|&&c| c != b']')
                .count();
            if record.get(at + 1 + pid_len) == Some(&b']') {
                m.procid = Some(Span::new(at + 1, at + 1 + pid_len));
                at += pid_len + 2;
            }
        }
        if record.get(at) == Some(&b':') {
            at += 1;
        }
        if record.get(at) == Some(&b' ') {
            at += 1;
        }
    }
    m.msg = Span::new(at.min(record.len()), record.len());
    Ok(m)
}

/// `<PRI>`: the value and where the rest starts.
fn pri(r: &[u8]) -> Option<(u8, usize)> {
    if r.first() != Some(&b'<') {
        return None;
    }
    let n = r[1..]
        .iter()
        .take(4)
        .take_while(|c| c.is_ascii_digit())
        .count();
    if n == 0 || n > 3 || r.get(1 + n) != Some(&b'>') || (n > 1 && r[1] == b'0') {
        return None;
    }
    let v = r[1..1 + n]
        .iter()
        .fold(0u32, |v, &c| v * 10 + u32::from(c - b'0'));
    (v <= 191).then_some((v as u8, n + 2))
}

/// The next space-terminated token at `*at` (moving past its space).
#[inline]
fn token(r: &[u8], at: &mut usize) -> Option<Span> {
    let start = *at;
    let rest = r.get(start..)?;
    // Header tokens are short (a timestamp is 20 to 32 bytes): a plain
    // scan finds their end before memchr's setup would pay off.
    let n = match rest.iter().take(40).position(|&c| c == b' ') {
        Some(n) => n,
        None => 40 + memchr::memchr(b' ', rest.get(40..)?)?,
    };
    if n == 0 {
        return None;
    }
    *at = start + n + 1;
    Some(Span::new(start, start + n))
}

fn nil(r: &[u8], s: Span) -> Option<Span> {
    (s.of(r) != b"-").then_some(s)
}

/// The end of 5424 structured data starting with `[` at `at`: elements
/// `[id param="value" ...]` back to back; `\"`, `\]` and `\\` are escapes
/// inside values.
fn structured_data(r: &[u8], mut at: usize) -> Option<usize> {
    while r.get(at) == Some(&b'[') {
        at += 1;
        let mut quoted = false;
        loop {
            let rest = r.get(at..)?;
            let i = memchr::memchr3(b'\\', b'"', b']', rest)?;
            match rest[i] {
                b'\\' if quoted => at += i + 2,
                b'"' => {
                    quoted = !quoted;
                    at += i + 1;
                }
                b']' if !quoted => {
                    at += i + 1;
                    break;
                }
                _ => at += i + 1,
            }
        }
    }
    Some(at)
}

/// Days from 1970-01-01 to `y-m-d` (proleptic Gregorian).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil year of a Unix time in ns.
fn year_of(ns: u64) -> i64 {
    let days = (ns / 1_000_000_000 / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    yoe + era * 400 + i64::from(m <= 2)
}

/// A run of 1 to 9 decimal digits (timestamps: every field is short).
#[inline]
fn num(b: &[u8]) -> Option<u32> {
    if b.is_empty() || b.len() > 9 {
        return None;
    }
    let mut v = 0u32;
    for &c in b {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        v = v * 10 + u32::from(d);
    }
    Some(v)
}

fn unix_ns(y: i64, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> Option<i64> {
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let secs = days_from_civil(y, mo, d) * 86_400 + i64::from(h * 3600 + mi * 60 + s);
    secs.checked_mul(1_000_000_000)
}

/// An RFC 3339 timestamp, in ns since the epoch (UTC).
pub fn rfc3339(t: &[u8]) -> Option<u64> {
    if t.len() < 20
        || t[4] != b'-'
        || t[7] != b'-'
        || !matches!(t[10], b'T' | b't')
        || t[13] != b':'
        || t[16] != b':'
    {
        return None;
    }
    let y = i64::from(num(&t[0..4])?);
    let ns = unix_ns(
        y,
        num(&t[5..7])?,
        num(&t[8..10])?,
        num(&t[11..13])?,
        num(&t[14..16])?,
        num(&t[17..19])?,
    )?;
    let mut at = 19;
    let mut frac = 0i64;
    if t[at] == b'.' {
        let n = t[at + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if n == 0 || n > 9 {
            return None;
        }
        const SCALE: [i64; 10] = [
            1_000_000_000,
            100_000_000,
            10_000_000,
            1_000_000,
            100_000,
            10_000,
            1_000,
            100,
            10,
            1,
        ];
        let digits = num(&t[at + 1..at + 1 + n])? as i64;
        frac = digits * SCALE[n];
        at += 1 + n;
    }
    let offset_s = match t.get(at..)? {
        b"Z" | b"z" => 0i64,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let h = i64::from(num(&[*h1, *h2])?);
            let m = i64::from(num(&[*m1, *m2])?);
            if h > 23 || m > 59 {
                return None;
            }
            let o = h * 3600 + m * 60;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    let v = ns + frac - offset_s * 1_000_000_000;
    u64::try_from(v).ok()
}

const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

/// `Mmm dd hh:mm:ss` (day space-padded) at `at`: the time and its end.
fn bsd_timestamp(r: &[u8], at: usize, now_ns: u64) -> Option<(u64, usize)> {
    let t = r.get(at..at + 15)?;
    let mo = MONTHS.iter().position(|m| &t[..3] == *m)? as u32 + 1;
    if t[3] != b' ' || t[6] != b' ' || t[9] != b':' || t[12] != b':' {
        return None;
    }
    let day = if t[4] == b' ' {
        num(&t[5..6])?
    } else {
        num(&t[4..6])?
    };
    let (h, mi, s) = (num(&t[7..9])?, num(&t[10..12])?, num(&t[13..15])?);
    let year = year_of(now_ns);
    let mut ns = unix_ns(year, mo, day, h, mi, s)?;
    // Dec 31 seen on Jan 1: last year's.
    if ns > now_ns as i64 + 86_400 * 1_000_000_000 {
        ns = unix_ns(year - 1, mo, day, h, mi, s)?;
    }
    Some((u64::try_from(ns).ok()?, at + 15))
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-12-03T12:00:00Z
    const NOW: u64 = 1_796_299_200_000_000_000;

    fn s(r: &[u8], span: Option<Span>) -> &str {
        std::str::from_utf8(span.map_or(&b""[..], |x| x.of(r))).unwrap()
    }

    #[test]
    fn rfc5424_with_structured_data() {
        let r = br#"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog 1234 ID47 [exampleSDID@32473 iut="3" eventSource="App\]lication"] An application event"#;
        let m = parse(r, NOW).unwrap();
        assert_eq!((m.facility, m.severity, m.version), (20, 5, 1));
        assert_eq!(s(r, m.host), "mymachine.example.com");
        assert_eq!(s(r, m.app), "evntslog");
        assert_eq!(s(r, m.procid), "1234");
        assert_eq!(s(r, m.msgid), "ID47");
        assert_eq!(s(r, Some(m.msg)), "An application event");
        assert_eq!(m.ts_ns, Some(1_065_910_455_003_000_000));
        assert!(s(r, m.structured_data).ends_with("lication\"]"));
    }

    #[test]
    fn rfc5424_nil_values_offsets_and_no_message() {
        let r = b"<34>1 2026-12-03T13:00:00+01:00 - - - - -";
        let m = parse(r, NOW).unwrap();
        assert_eq!(m.ts_ns, Some(NOW));
        assert_eq!((m.host, m.app, m.procid, m.msgid), (None, None, None, None));
        assert_eq!(m.msg.len, 0);
        // util-linux logger's form.
        let r = b"<13>1 2026-12-03T12:00:00.123456+00:00 gw7 sensor - - [timeQuality tzKnown=\"1\" isSynced=\"0\"] reading 42";
        let m = parse(r, NOW).unwrap();
        assert_eq!(m.ts_ns, Some(NOW + 123_456_000));
        assert_eq!(s(r, m.host), "gw7");
        assert_eq!(s(r, Some(m.msg)), "reading 42");
    }

    #[test]
    fn rfc3164_forms() {
        let r = b"<34>Oct 11 22:14:15 mymachine su: 'su root' failed for lonvick on /dev/pts/8";
        let m = parse(r, NOW).unwrap();
        assert_eq!((m.facility, m.severity, m.version), (4, 2, 0));
        assert_eq!(s(r, m.host), "mymachine");
        assert_eq!(s(r, m.app), "su");
        assert_eq!(
            s(r, Some(m.msg)),
            "'su root' failed for lonvick on /dev/pts/8"
        );
        // Oct 11 of the receive year, UTC.
        assert_eq!(m.ts_ns, Some(1_791_756_855_000_000_000));
        let r = b"<13>Dec  3 12:00:00 gw7 sensor[4242]: reading 42";
        let m = parse(r, NOW).unwrap();
        assert_eq!(m.ts_ns, Some(NOW));
        assert_eq!(s(r, m.app), "sensor");
        assert_eq!(s(r, m.procid), "4242");
        assert_eq!(s(r, Some(m.msg)), "reading 42");
        // No host (a local sender), and no timestamp at all.
        let r = b"<13>Dec  3 12:00:00 sensor: hi";
        let m = parse(r, NOW).unwrap();
        assert_eq!((m.host, s(r, m.app)), (None, "sensor"));
        let r = b"<191>just a message";
        let m = parse(r, NOW).unwrap();
        assert_eq!(
            (m.severity, m.timestamp, s(r, Some(m.msg))),
            (7, None, "just a message")
        );
        // rsyslog's RSYSLOG_ForwardFormat: BSD with an RFC 3339 timestamp.
        let r = b"<155>2026-12-04T18:44:20.294313+00:00 vm app5[77] hello";
        let m = parse(r, NOW).unwrap();
        assert_eq!(m.ts_ns, Some(1_796_409_860_294_313_000));
        assert_eq!(s(r, m.timestamp), "2026-12-04T18:44:20.294313+00:00");
        assert_eq!(
            (s(r, m.host), s(r, m.app), s(r, m.procid)),
            ("vm", "app5", "77")
        );
        assert_eq!(s(r, Some(m.msg)), "hello");
        // Digits that are not a timestamp are the message.
        let r = b"<13>2026-99 x";
        assert_eq!(s(r, Some(parse(r, NOW).unwrap().msg)), "2026-99 x");
        // Dec 31 received on Jan 1: last year's.
        let jan1 = 1_798_761_600_000_000_000; // 2027-01-01T00:00:00Z
        let m = parse(b"<13>Dec 31 23:59:59 h a: x", jan1).unwrap();
        assert_eq!(m.ts_ns, Some(jan1 - 1_000_000_000));
    }

    #[test]
    fn not_syslog_is_an_error() {
        for r in [&b"hello"[..], b"<>x", b"<192>x", b"<01>x", b"<1234>x", b""] {
            assert_eq!(parse(r, NOW), Err(Error::NoPri), "{r:?}");
        }
        assert_eq!(
            parse(b"<13>1 2026-13-03T12:00:00Z h a p m - x", NOW),
            Err(Error::BadHeader)
        );
        assert_eq!(
            parse(b"<13>1 2026-12-03T12:00:00Z h a p m [x a=\"b", NOW),
            Err(Error::BadStructuredData)
        );
    }

    /// Randomized: mutated and random records never panic, and every span
    /// lies inside the record.
    #[test]
    fn randomized_records_never_panic_and_spans_stay_inside() {
        let seeds: [&[u8]; 3] = [
            br#"<165>1 2003-10-11T22:14:15.003Z host app 12 ID [a b="c\]"] msg"#,
            b"<13>Dec  3 12:00:00 gw7 sensor[4242]: reading 42",
            b"<34>Oct 11 22:14:15 mymachine su: x",
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        for round in 0..50_000 {
            let mut r = seeds[round % 3].to_vec();
            match round % 3 {
                0 => {
                    for _ in 0..rng.usize(1..6) {
                        let i = rng.usize(..r.len());
                        r[i] = rng.u8(..);
                    }
                }
                1 => r.truncate(rng.usize(..r.len())),
                _ => {
                    r = (0..rng.usize(..80)).map(|_| rng.u8(..)).collect();
                    if rng.bool() {
                        r.splice(0..0, b"<13>".iter().copied());
                    }
                }
            }
            if let Ok(m) = parse(&r, NOW) {
                for sp in m.spans().into_iter().flatten() {
                    assert!((sp.start + sp.len) as usize <= r.len(), "{r:?} {m:?}");
                }
            }
        }
    }
}
