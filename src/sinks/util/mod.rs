//! What the sinks share: the stream outputs' retry loop ([`stream`]),
//! dead letters for batches refused for good ([`dead_letter`]),
//! retry timing ([`Backoff`], shared with the disk buffer, lives in
//! [`crate::pipeline`]; rate-limited logging is [`crate::logging::LogEvery`]).

pub mod dead_letter;
pub mod publisher;
pub mod stream;
pub mod template;

pub use crate::pipeline::Backoff;

/// Sleeps for a retry's `delay`, but not past `give_up` (shutdown).
pub async fn pause(delay: std::time::Duration, give_up: Option<tokio::time::Instant>) {
    match give_up {
        Some(t) => tokio::time::sleep_until(t.min(tokio::time::Instant::now() + delay)).await,
        None => tokio::time::sleep(delay).await,
    }
}
