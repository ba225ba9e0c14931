//! The write-ahead log: per sink and per shard, so that a batch written and
//! synced survives `kill -9` until its sink has delivered it.
//!
//! - [`format`]: the on-disk layout, documented as a spec, and the scanner
//!   that reads it back (torn tails, flipped bits, lost framing).
//! - [`machine`]: the sans-I/O state machine: appends, group commit, out-of-
//!   order acknowledgements, checkpoint, deletion, the size cap, recovery.
//!
//! The io_uring driver that connects them to sinks is not written yet: today
//! sinks buffer in memory only (see the README's "Delivery today").

pub mod format;
pub mod machine;
