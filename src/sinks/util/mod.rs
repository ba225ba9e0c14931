//! What every sink shares: retry timing (rate-limited logging is
//! [`crate::logging::LogEvery`]).

mod backoff;
pub use backoff::Backoff;
