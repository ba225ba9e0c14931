//! A sink's byte budget (`rate_limit = { bytes_per_sec, burst_bytes }`):
//! what the sink puts on the wire, all shards together, in bytes per second.
//!
//! The generic cell rate algorithm on one atomic: the budget keeps a
//! "theoretical arrival time" (TAT), the moment by which everything charged
//! so far would have gone out at exactly the rate. A write may start when
//! the TAT is at most `burst` ahead of now; it then moves the TAT on by its
//! own length's worth of time (from now, when the TAT lies in the past: an
//! idle sink saves up no more than the burst). So over any span of T
//! seconds a sink writes at most `bytes_per_sec × T + burst_bytes` plus one
//! write (a write is never cut: a request body longer than the burst goes
//! whole, and the next one waits for it to be paid off). Two shards that
//! pass at the same moment both charge: the overshoot is one write each,
//! paid off by the waits that follow.
//!
//! Shared by the shards (one per sink): an `AtomicU64`, no lock; the wait
//! is a timer on the shard that waits, never a blocking call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct ByteRate {
    bytes_per_sec: u64,
    burst_ns: u64,
    /// The TAT, in ns since `epoch`.
    tat: AtomicU64,
    epoch: Instant,
}

impl ByteRate {
    pub fn new(bytes_per_sec: u64, burst_bytes: u64) -> ByteRate {
        let bytes_per_sec = bytes_per_sec.max(1);
        ByteRate {
            bytes_per_sec,
            burst_ns: cost_ns(burst_bytes, bytes_per_sec),
            tat: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// How long a write must wait at `now_ns` (0: it may go).
    pub fn wait_ns(&self, now_ns: u64) -> u64 {
        self.tat
            .load(Ordering::Relaxed)
            .saturating_sub(now_ns + self.burst_ns)
    }

    /// Charges `bytes` written at `now_ns`.
    pub fn charge(&self, bytes: u64, now_ns: u64) {
        let cost = cost_ns(bytes, self.bytes_per_sec);
        let _ = self
            .tat
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
                Some(tat.max(now_ns).saturating_add(cost))
            });
    }

    /// Waits until a write may go; returns how long it waited.
    pub async fn wait(&self) -> Duration {
        let start = Instant::now();
        loop {
            let wait = self.wait_ns(self.now_ns());
            if wait == 0 {
                return start.elapsed();
            }
            tokio::time::sleep(Duration::from_nanos(wait)).await;
        }
    }

    /// Charges `bytes` written now.
    pub fn charge_now(&self, bytes: u64) {
        self.charge(bytes, self.now_ns());
    }
}

/// The time `bytes` take at `per_sec`.
fn cost_ns(bytes: u64, per_sec: u64) -> u64 {
    (u128::from(bytes) * 1_000_000_000 / u128::from(per_sec)).min(u128::from(u64::MAX)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes of `size` bytes as soon as the budget lets them, over `span`
    /// ns of a simulated clock: the bytes written.
    fn simulate(r: &ByteRate, size: u64, span: u64) -> u64 {
        let (mut now, mut written) = (0u64, 0u64);
        loop {
            now += r.wait_ns(now);
            if now >= span {
                return written;
            }
            r.charge(size, now);
            written += size;
        }
    }

    #[test]
    fn writes_stay_within_the_rate_plus_the_burst_and_one_write() {
        for (rate, burst, size) in [
            (1 << 20, 64 << 10, 16 << 10),
            (1 << 20, 64 << 10, 300 << 10),
            (1000, 0, 1),
            (10 << 20, 1 << 20, 1500),
        ] {
            let r = ByteRate::new(rate, burst);
            let span = 20_000_000_000u64;
            let written = simulate(&r, size, span);
            let most = rate * 20 + burst + size;
            assert!(
                written <= most,
                "{written} > {most} ({rate}, {burst}, {size})"
            );
            // And the budget is used: within one write and the burst of it.
            assert!(
                written + size + burst >= rate * 20,
                "{written} ({rate}, {burst}, {size})"
            );
        }
    }

    #[test]
    fn an_idle_sink_saves_up_no_more_than_the_burst() {
        let r = ByteRate::new(1000, 500);
        r.charge(1000, 0);
        // A minute idle: then at most the burst goes at once.
        let t = 60_000_000_000;
        let mut n = 0;
        while r.wait_ns(t) == 0 {
            r.charge(100, t);
            n += 100;
        }
        assert!(n <= 600, "{n}");
    }
}
