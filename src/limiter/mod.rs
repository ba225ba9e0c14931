//! Limiters: how much a sink sends at once, how much a source takes.
//!
//! - [`adaptive::AdaptiveLimit`]: requests in flight per sink and shard,
//!   adapted to the endpoint's response times and push-back;
//! - [`rate::IngressRate`]: records per second per source and shard, a
//!   sliding-window counter.
//!
//! Both are pure logic with the clock passed in (nanoseconds), unit-tested
//! with simulated time; the sinks and sources own the I/O around them.

pub mod adaptive;
pub mod rate;

pub use adaptive::{AdaptiveLimit, AdaptiveParams, Outcome};
pub use rate::IngressRate;
