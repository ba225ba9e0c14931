//! A JSON object per record, located in place: one pass checks the
//! record's structure (an object; strings closed; brackets balanced, at most
//! [`DEPTH_MAX`] deep; a loose check: control bytes in strings and
//! mismatched bracket kinds inside a nested value are let through) and finds where top-level keys' values lie. Nothing
//! is copied or allocated; numbers and literals are not interpreted.

pub use super::syslog::Span;

/// Nesting deeper than this is refused (bounded work, no recursion).
pub const DEPTH_MAX: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    NotAnObject,
    Unclosed,
    TooDeep,
    Malformed,
}

impl Error {
    pub fn reason(self) -> &'static str {
        match self {
            Error::NotAnObject => "not a JSON object",
            Error::Unclosed => "JSON: a string, object or array is not closed",
            Error::TooDeep => "JSON: nested deeper than 64",
            Error::Malformed => "JSON: malformed",
        }
    }
}

fn ws(r: &[u8], mut at: usize) -> usize {
    while at < r.len() && matches!(r[at], b' ' | b'\t' | b'\r' | b'\n') {
        at += 1;
    }
    at
}

/// The end (past the closing quote) of the string whose quote is at `at`
/// (found with memchr; control bytes inside are let through).
fn string_end(r: &[u8], mut at: usize) -> Result<usize, Error> {
    at += 1;
    while at < r.len() {
        match memchr::memchr2(b'\\', b'"', &r[at..]) {
            None => break,
            Some(i) if r[at + i] == b'"' => return Ok(at + i + 1),
            Some(i) => at += i + 2,
        }
    }
    Err(Error::Unclosed)
}

/// The end of the value at `at` (an object or array skipped whole).
fn value_end(r: &[u8], at: usize) -> Result<usize, Error> {
    match r.get(at) {
        None => Err(Error::Unclosed),
        Some(b'"') => string_end(r, at),
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            let mut i = at;
            while i < r.len() {
                match r[i] {
                    b'"' => {
                        i = string_end(r, i)?;
                        continue;
                    }
                    b'{' | b'[' => {
                        depth += 1;
                        if depth > DEPTH_MAX {
                            return Err(Error::TooDeep);
                        }
                    }
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Ok(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            Err(Error::Unclosed)
        }
        Some(_) => {
            let n = r[at..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
                .count();
            if n == 0 {
                Err(Error::Malformed)
            } else {
                Ok(at + n)
            }
        }
    }
}

/// Checks that `r` is one JSON object and finds top-level `key`'s value: a
/// string's contents without its quotes (escapes as written), any other
/// value as written.
pub fn parse(r: &[u8], key: Option<&[u8]>) -> Result<Option<Span>, Error> {
    let mut at = ws(r, 0);
    if r.get(at) != Some(&b'{') {
        return Err(Error::NotAnObject);
    }
    at = ws(r, at + 1);
    let mut found = None;
    if r.get(at) == Some(&b'}') {
        at += 1;
    } else {
        loop {
            if r.get(at) != Some(&b'"') {
                return Err(if at >= r.len() {
                    Error::Unclosed
                } else {
                    Error::Malformed
                });
            }
            let k_end = string_end(r, at)?;
            let k = &r[at + 1..k_end - 1];
            at = ws(r, k_end);
            if r.get(at) != Some(&b':') {
                return Err(Error::Malformed);
            }
            at = ws(r, at + 1);
            let v_end = value_end(r, at)?;
            if found.is_none() && key == Some(k) {
                let (s, e) = if r[at] == b'"' {
                    (at + 1, v_end - 1)
                } else {
                    (at, v_end)
                };
                found = Some(Span {
                    start: s as u32,
                    len: (e - s) as u32,
                });
            }
            at = ws(r, v_end);
            match r.get(at) {
                Some(b',') => at = ws(r, at + 1),
                Some(b'}') => {
                    at += 1;
                    break;
                }
                None => return Err(Error::Unclosed),
                Some(_) => return Err(Error::Malformed),
            }
        }
    }
    if ws(r, at) != r.len() {
        return Err(Error::Malformed);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_and_their_keys() {
        let r = br#" {"device": "d-17", "n": 42, "nested": {"device": "no", "a": [1, {"b": "]"}]}, "ok": true} "#;
        let v = parse(r, Some(b"device")).unwrap().unwrap();
        assert_eq!(v.of(r), b"d-17");
        assert_eq!(parse(r, Some(b"n")).unwrap().unwrap().of(r), b"42");
        assert_eq!(parse(r, Some(b"ok")).unwrap().unwrap().of(r), b"true");
        assert_eq!(parse(r, Some(b"a")).unwrap(), None, "only top-level keys");
        assert_eq!(parse(b"{}", Some(b"x")), Ok(None));
        let e = br#"{"msg": "say \"hi\""}"#;
        assert_eq!(
            parse(e, Some(b"msg")).unwrap().unwrap().of(e),
            br#"say \"hi\""#
        );
    }

    #[test]
    fn what_is_not_an_object() {
        assert_eq!(parse(b"[1]", None), Err(Error::NotAnObject));
        assert_eq!(parse(b"plain text", None), Err(Error::NotAnObject));
        assert_eq!(parse(br#"{"a": "open"#, None), Err(Error::Unclosed));
        assert_eq!(parse(br#"{"a": [1, 2}"#, None), Err(Error::Unclosed));
        assert_eq!(parse(br#"{"a" 1}"#, None), Err(Error::Malformed));
        assert_eq!(parse(br#"{"a": 1} x"#, None), Err(Error::Malformed));
        let deep = format!("{{\"a\": {}{}}}", "[".repeat(100), "]".repeat(100));
        assert_eq!(parse(deep.as_bytes(), None), Err(Error::TooDeep));
    }

    #[test]
    fn randomized_records_never_panic() {
        let seed = br#"{"device":"d1","v":[1,{"x":"y\"z"}],"n":-1.5e3}"#.to_vec();
        let mut rng = fastrand::Rng::with_seed(11);
        for round in 0..50_000 {
            let mut r = seed.clone();
            match round % 3 {
                0 => {
                    for _ in 0..rng.usize(1..5) {
                        let i = rng.usize(..r.len());
                        r[i] = *rng.choice(b"{}[]\",:\\ ax1".iter()).unwrap();
                    }
                }
                1 => r.truncate(rng.usize(..r.len())),
                _ => r = (0..rng.usize(..60)).map(|_| rng.u8(..)).collect(),
            }
            if let Ok(Some(s)) = parse(&r, Some(b"device")) {
                assert!((s.start + s.len) as usize <= r.len(), "{r:?}");
            }
        }
    }
}
