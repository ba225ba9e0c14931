//! A record's meta: what its source knew about it beside its bytes (an MQTT
//! message's topic, a decoded record's field index), kept in the batch's
//! `meta` buffer and written to the log with it, so that a sink can name a
//! destination from it (`{topic}`, `{host}`) or encode its fields.
//!
//! A record's meta is a run of items, each:
//!
//! ```text
//! size field
//!    1 kind   what the item is (`TOPIC`, ...)
//!    2 len    bytes of value, little-endian
//!  len value
//! ```
//!
//! A record's meta is at most [`MAX_BYTES`]; a reader skips kinds it does
//! not know and stops at an item that runs past the end (never panics).

/// The topic an MQTT message arrived on.
pub const TOPIC: u8 = 1;

/// The most meta one record carries (its length is an entry's `u16`).
pub const MAX_BYTES: usize = u16::MAX as usize;

/// A decoded record's field index (see [`crate::codec::index`]).
pub const FIELDS: u8 = 2;

/// What a sink can name a destination by: the MQTT topic a record came on,
/// or a field its source's decoding found (`host`, `tag.device`, a JSON
/// key), read from its index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Topic,
    Named(Box<str>),
}

impl Field {
    /// The name in a template (`{topic}`, `{host}`).
    pub fn name(&self) -> &str {
        match self {
            Field::Topic => "topic",
            Field::Named(n) => n,
        }
    }
}

/// Appends one item whose value `value` writes; false (and `out`
/// unchanged) when it would pass [`MAX_BYTES`].
pub fn put_with(out: &mut Vec<u8>, kind: u8, value: impl FnOnce(&mut Vec<u8>)) -> bool {
    let start = out.len();
    out.push(kind);
    out.extend_from_slice(&[0, 0]);
    value(out);
    let len = out.len() - start - 3;
    if out.len() > MAX_BYTES {
        out.truncate(start);
        return false;
    }
    out[start + 1..start + 3].copy_from_slice(&(len as u16).to_le_bytes());
    true
}

/// Appends one item to a record's meta being built in `out`; false (and
/// `out` unchanged) when it would pass [`MAX_BYTES`].
pub fn put(out: &mut Vec<u8>, kind: u8, value: &[u8]) -> bool {
    if out.len() + 3 + value.len() > MAX_BYTES {
        return false;
    }
    out.push(kind);
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(value);
    true
}

/// The value of the first item of `kind` in a record's meta.
pub fn find(meta: &[u8], kind: u8) -> Option<&[u8]> {
    let mut at = 0usize;
    while at + 3 <= meta.len() {
        let len = u16::from_le_bytes([meta[at + 1], meta[at + 2]]) as usize;
        let value = meta.get(at + 3..at + 3 + len)?;
        if meta[at] == kind {
            return Some(value);
        }
        at += 3 + len;
    }
    None
}

/// The next record's meta of `len` bytes from a batch's meta buffer at
/// `*at`, which moves past it; empty when the buffer is shorter (a damaged
/// archive).
#[inline]
pub fn slice<'a>(all: &'a [u8], at: &mut usize, len: u16) -> &'a [u8] {
    let start = *at;
    *at += len as usize;
    all.get(start..*at).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_found_by_kind_and_unknown_kinds_skipped() {
        let mut m = Vec::new();
        assert!(put(&mut m, 9, b"other"));
        assert!(put(&mut m, TOPIC, b"sensors/7"));
        assert_eq!(find(&m, TOPIC), Some(&b"sensors/7"[..]));
        assert_eq!(find(&m, 2), None);
        assert_eq!(find(&[], TOPIC), None);
    }

    #[test]
    fn a_damaged_meta_gives_nothing_and_no_panic() {
        let mut m = Vec::new();
        put(&mut m, TOPIC, b"abc");
        for cut in 0..m.len() {
            assert_eq!(find(&m[..cut], TOPIC), None);
        }
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes = x.to_le_bytes();
            let _ = find(&bytes[..(x % 9) as usize], (x >> 60) as u8);
        }
    }

    #[test]
    fn meta_past_the_limit_is_refused() {
        let mut m = Vec::new();
        assert!(!put(&mut m, TOPIC, &vec![b'a'; MAX_BYTES - 2]));
        assert!(m.is_empty());
        assert!(put(&mut m, TOPIC, &vec![b'a'; MAX_BYTES - 3]));
        assert_eq!(m.len(), MAX_BYTES);
    }

    #[test]
    fn an_item_written_in_place_reads_back_and_one_too_long_is_refused() {
        let mut m = Vec::new();
        assert!(put_with(&mut m, FIELDS, |o| o.extend_from_slice(b"idx")));
        assert!(put(&mut m, TOPIC, b"t"));
        assert_eq!(find(&m, FIELDS), Some(&b"idx"[..]));
        assert_eq!(find(&m, TOPIC), Some(&b"t"[..]));
        let before = m.clone();
        assert!(!put_with(&mut m, FIELDS, |o| o.resize(o.len() + MAX_BYTES, 0)));
        assert_eq!(m, before);
    }

    #[test]
    fn slices_walk_the_buffer_and_stop_at_its_end() {
        let all = b"aabbb";
        let mut at = 0;
        assert_eq!(slice(all, &mut at, 2), b"aa");
        assert_eq!(slice(all, &mut at, 3), b"bbb");
        assert_eq!(slice(all, &mut at, 1), b"");
    }
}
