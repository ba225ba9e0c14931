//! Limiters: how much a sink sends at once, how much a source takes.
//!
//! - [`adaptive::AdaptiveLimit`]: requests in flight per sink and shard,
//!   adapted to the endpoint's response times and push-back;
//! - [`rate::IngressRate`]: records per second per source and shard, a
//!   sliding-window counter;
//! - [`bytes::ByteRate`]: bytes per second a sink writes, all shards
//!   together (a GCRA on one atomic).
//!
//! All are pure logic with the clock passed in (nanoseconds), unit-tested
//! with simulated time; the sinks and sources own the I/O around them.

pub mod adaptive;
pub mod bytes;
pub mod rate;

pub use adaptive::{AdaptiveLimit, AdaptiveParams, Outcome};
pub use bytes::ByteRate;
pub use rate::IngressRate;
