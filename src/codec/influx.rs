//! InfluxDB line protocol located in place: where a line's measurement, tag
//! set, field set and timestamp lie, and a named tag's value, as byte
//! ranges of the record. One pass, nothing copied or allocated, no field
//! value parsed (only the timestamp, to nanoseconds).
//!
//! `measurement[,tag=value...] field=value[,field=value...] [timestamp]`:
//! a backslash escapes the next byte in the measurement, tag keys and values
//! and field keys; a string field value is in double quotes (`\"` and `\\`
//! inside). The timestamp is in nanoseconds (the protocol's default).

pub use super::syslog::Span;

/// Where a line's parts lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Line {
    pub measurement: Span,
    /// The tags, without the comma before them (`a=1,b=2`).
    pub tags: Option<Span>,
    pub fields: Span,
    pub timestamp: Option<Span>,
    pub ts_ns: Option<u64>,
}

/// Why a record is not a line of line protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    NoMeasurement,
    NoFields,
    BadTag,
    UnclosedString,
    BadTimestamp,
}

impl Error {
    pub fn reason(self) -> &'static str {
        match self {
            Error::NoMeasurement => "not line protocol: no measurement",
            Error::NoFields => "not line protocol: no field set",
            Error::BadTag => "not line protocol: a tag without key=value",
            Error::UnclosedString => "not line protocol: an unclosed string field",
            Error::BadTimestamp => "not line protocol: a bad timestamp",
        }
    }
}

/// The end of a run at `at` that stops at an unescaped byte in `stops`
/// (one or two bytes), found with memchr.
fn run(r: &[u8], mut at: usize, stops: &[u8]) -> usize {
    while at < r.len() {
        let rest = &r[at..];
        let hit = match *stops {
            [a] => memchr::memchr2(b'\\', a, rest),
            [a, b] => memchr::memchr3(b'\\', a, b, rest),
            _ => unreachable!("one or two stop bytes"),
        };
        match hit {
            None => return r.len(),
            Some(i) if rest[i] == b'\\' => at += i + 2,
            Some(i) => return at + i,
        }
    }
    r.len()
}

pub fn parse(r: &[u8]) -> Result<Line, Error> {
    let m_end = run(r, 0, b", ");
    if m_end == 0 || r[0] == b'#' {
        return Err(Error::NoMeasurement);
    }
    let mut line = Line {
        measurement: Span {
            start: 0,
            len: m_end as u32,
        },
        ..Line::default()
    };
    let mut at = m_end;
    if r.get(at) == Some(&b',') {
        let t_end = run(r, at + 1, b" ");
        let tags = Span {
            start: (at + 1) as u32,
            len: (t_end - at - 1) as u32,
        };
        // Every tag is key=value.
        let mut t = at + 1;
        while t < t_end {
            let kv_end = run(r, t, b", ").min(t_end);
            let eq = run(r, t, b"=").min(kv_end);
            if eq == t || eq + 1 >= kv_end {
                return Err(Error::BadTag);
            }
            t = kv_end + 1;
        }
        line.tags = Some(tags);
        at = t_end;
    }
    if r.get(at) != Some(&b' ') {
        return Err(Error::NoFields);
    }
    while r.get(at) == Some(&b' ') {
        at += 1;
    }
    // Fields: up to an unescaped space outside a string.
    let f_start = at;
    let mut quoted = false;
    loop {
        let rest = &r[at.min(r.len())..];
        let hit = if quoted {
            memchr::memchr2(b'\\', b'"', rest)
        } else {
            memchr::memchr3(b'\\', b'"', b' ', rest)
        };
        let Some(i) = hit else {
            at = r.len();
            break;
        };
        match rest[i] {
            b'\\' => at += i + 2,
            b'"' => {
                quoted = !quoted;
                at += i + 1;
            }
            _ => {
                at += i;
                break;
            }
        }
    }
    if quoted {
        return Err(Error::UnclosedString);
    }
    let f_end = at.min(r.len());
    if f_end == f_start || !r[f_start..f_end].contains(&b'=') {
        return Err(Error::NoFields);
    }
    line.fields = Span {
        start: f_start as u32,
        len: (f_end - f_start) as u32,
    };
    while r.get(at) == Some(&b' ') {
        at += 1;
    }
    let ts_end = r.len()
        - r.iter()
            .rev()
            .take_while(|&&c| c == b' ' || c == b'\r')
            .count();
    if at < ts_end {
        let t = &r[at..ts_end];
        let digits = t.strip_prefix(b"-").unwrap_or(t);
        if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
            return Err(Error::BadTimestamp);
        }
        line.timestamp = Some(Span {
            start: at as u32,
            len: (ts_end - at) as u32,
        });
        if t[0] != b'-' {
            line.ts_ns = digits.iter().try_fold(0u64, |v, &c| {
                v.checked_mul(10)?.checked_add(u64::from(c - b'0'))
            });
        }
    }
    Ok(line)
}

/// The value of tag `key` (as written, escapes and all) in `line`.
pub fn tag(r: &[u8], line: &Line, key: &[u8]) -> Option<Span> {
    let tags = line.tags?;
    // Never past the record, even for spans read back from a peer's index.
    let mut t = tags.start as usize;
    let end = (t + tags.len as usize).min(r.len());
    while t < end {
        let kv_end = run(r, t, b",").min(end);
        let eq = run(r, t, b"=").min(kv_end);
        if eq < kv_end && &r[t..eq] == key {
            return Some(Span {
                start: (eq + 1) as u32,
                len: (kv_end - eq - 1) as u32,
            });
        }
        t = kv_end + 1;
    }
    None
}

/// Calls `f` with each `key=value` of a tag set or (`fields`) a field set,
/// as written (escapes and a string's quotes kept); a pair without `=` is
/// skipped. Works on any bytes (a section read back from a peer's index).
pub fn pairs(section: &[u8], fields: bool, mut f: impl FnMut(&[u8], &[u8])) {
    let (mut start, mut eq, mut quoted, mut i) = (0, None, false, 0);
    while i <= section.len() {
        match section.get(i) {
            Some(b'\\') => i += 1,
            Some(b'"') if fields && eq.is_some() => quoted = !quoted,
            Some(b'=') if eq.is_none() && !quoted => eq = Some(i),
            Some(b',') | None if !quoted || i == section.len() => {
                if let Some(e) = eq {
                    f(&section[start..e], &section[e + 1..i.min(section.len())]);
                }
                (start, eq) = (i + 1, None);
            }
            _ => {}
        }
        i += 1;
    }
}

/// Appends `bytes` without line protocol's escaping backslashes (`\,`,
/// `\=`, `\ ` in keys and tags; `\"` and `\\` in strings).
pub fn unescape(bytes: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && matches!(bytes.get(i + 1), Some(b',' | b'=' | b' ' | b'"' | b'\\'))
        {
            i += 1;
        }
        out.push(bytes[i]);
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_of_tags_and_fields_and_their_escapes() {
        let mut got = Vec::new();
        pairs(b"device=d\\,1,site=north\\ yard", false, |k, v| {
            got.push((k.to_vec(), v.to_vec()))
        });
        assert_eq!(
            got,
            vec![
                (b"device".to_vec(), b"d\\,1".to_vec()),
                (b"site".to_vec(), b"north\\ yard".to_vec())
            ]
        );
        got.clear();
        pairs(b"t=21.5,s=\"a,b=\\\"c\",n=3i,bad", true, |k, v| {
            got.push((k.to_vec(), v.to_vec()))
        });
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[1], (b"s".to_vec(), b"\"a,b=\\\"c\"".to_vec()));
        let mut u = Vec::new();
        unescape(b"a\\,b\\ c\\x", &mut u);
        assert_eq!(u, b"a,b c\\x");
        for junk in [&b"=,=,\\"[..], b"\"", b",,,", b"\\"] {
            pairs(junk, true, |_, _| ());
        }
    }

    #[test]
    fn a_line_and_its_tags() {
        let r = b"weather,device=d-17,site=north\\ yard temp=21.5,label=\"a b\\\" c\" 1796299200000000000";
        let l = parse(r).unwrap();
        assert_eq!(l.measurement.of(r), b"weather");
        assert_eq!(l.tags.unwrap().of(r), b"device=d-17,site=north\\ yard");
        assert_eq!(l.fields.of(r), b"temp=21.5,label=\"a b\\\" c\"");
        assert_eq!(l.ts_ns, Some(1_796_299_200_000_000_000));
        assert_eq!(tag(r, &l, b"device").unwrap().of(r), b"d-17");
        assert_eq!(tag(r, &l, b"site").unwrap().of(r), b"north\\ yard");
        assert_eq!(tag(r, &l, b"nope"), None);
        let r = b"cpu usage=1i";
        let l = parse(r).unwrap();
        assert_eq!((l.tags, l.timestamp), (None, None));
        assert_eq!(tag(r, &l, b"device"), None);
    }

    #[test]
    fn what_is_not_line_protocol() {
        assert_eq!(parse(b""), Err(Error::NoMeasurement));
        assert_eq!(parse(b"# a comment"), Err(Error::NoMeasurement));
        assert_eq!(parse(b"cpu"), Err(Error::NoFields));
        assert_eq!(parse(b"cpu,host=a"), Err(Error::NoFields));
        assert_eq!(parse(b"cpu,host usage=1"), Err(Error::BadTag));
        assert_eq!(parse(b"cpu s=\"open"), Err(Error::UnclosedString));
        assert_eq!(parse(b"cpu u=1 12x"), Err(Error::BadTimestamp));
        assert_eq!(parse(b"cpu novalue"), Err(Error::NoFields));
    }

    #[test]
    fn randomized_lines_never_panic_and_spans_stay_inside() {
        let seed = b"m,device=d1,b=2 f=1i,s=\"x\\\"y\" 123".to_vec();
        let mut rng = fastrand::Rng::with_seed(3);
        for round in 0..50_000 {
            let mut r = seed.clone();
            match round % 3 {
                0 => {
                    for _ in 0..rng.usize(1..5) {
                        let i = rng.usize(..r.len());
                        r[i] = *rng.choice(b"\\\", =xyz019-#".iter()).unwrap();
                    }
                }
                1 => r.truncate(rng.usize(..r.len())),
                _ => r = (0..rng.usize(..60)).map(|_| rng.u8(..)).collect(),
            }
            if let Ok(l) = parse(&r) {
                for sp in [Some(l.measurement), l.tags, Some(l.fields), l.timestamp]
                    .into_iter()
                    .flatten()
                {
                    assert!((sp.start + sp.len) as usize <= r.len(), "{r:?}");
                }
                if let Some(t) = tag(&r, &l, b"device") {
                    assert!((t.start + t.len) as usize <= r.len(), "{r:?}");
                }
            }
        }
    }
}
