//! The write-ahead log: per sink and per shard, so that a batch written and
//! synced survives `kill -9` until its sink has delivered it.
//!
//! - [`format`]: the on-disk layout, documented as a spec, and the scanner
//!   that reads it back (torn tails, flipped bits, lost framing).
//! - [`machine`]: the sans-I/O state machine: appends, group commit, out-of-
//!   order acknowledgements, checkpoint, deletion, the size cap, recovery.
//! - [`driver`]: the thin io_uring driver (writer, syncer, keeper and sender
//!   tasks).
//! - [`recovery`]: opening the log at start (before the shards run) and
//!   mending what a crash left.

pub mod driver;
pub mod format;
pub mod machine;
pub mod recovery;
