//! Ingress rate: records a source may take per second on one shard.
//!
//! A sliding-window counter: the count of the current one-second window
//! plus the previous window's count weighted by how much of it still lies
//! within the last second. A record is admitted while that estimate is
//! below the rate. This costs two integers per source and shard and a
//! multiply per record, and it smooths the burst at a window's edge that a
//! fixed window lets through.
//!
//! Time comes in as an argument (nanoseconds on any monotonic clock). Never
//! allocates; no I/O.

const WINDOW_NS: u64 = 1_000_000_000;

/// One source's rate on one shard.
#[derive(Debug, Clone)]
pub struct IngressRate {
    per_sec: u64,
    window_start_ns: u64,
    current: u64,
    previous: u64,
}

impl IngressRate {
    pub fn new(per_sec: u64, now_ns: u64) -> IngressRate {
        IngressRate {
            per_sec: per_sec.max(1),
            window_start_ns: now_ns,
            current: 0,
            previous: 0,
        }
    }

    fn roll(&mut self, now_ns: u64) {
        let elapsed = now_ns.saturating_sub(self.window_start_ns);
        if elapsed >= WINDOW_NS {
            let windows = elapsed / WINDOW_NS;
            self.previous = if windows == 1 { self.current } else { 0 };
            self.current = 0;
            self.window_start_ns += windows * WINDOW_NS;
        }
    }

    fn estimate(&self, now_ns: u64) -> u64 {
        let into = now_ns.saturating_sub(self.window_start_ns).min(WINDOW_NS);
        let prev_share = self.previous * (WINDOW_NS - into) / WINDOW_NS;
        prev_share + self.current
    }

    /// Takes one record if the rate allows it now.
    #[inline]
    pub fn try_take(&mut self, now_ns: u64) -> bool {
        self.roll(now_ns);
        if self.estimate(now_ns) < self.per_sec {
            self.current += 1;
            true
        } else {
            false
        }
    }

    /// How long until a record would be admitted (for `when_exceeded =
    /// "block"`): an estimate, the caller tries again after it.
    pub fn wait_ns(&mut self, now_ns: u64) -> u64 {
        self.roll(now_ns);
        if self.estimate(now_ns) < self.per_sec {
            return 0;
        }
        let into = now_ns.saturating_sub(self.window_start_ns).min(WINDOW_NS);
        if self.previous == 0 {
            return WINDOW_NS - into;
        }
        // The previous window's share falls by previous/WINDOW per ns.
        let excess = self.estimate(now_ns) + 1 - self.per_sec;
        let until_next_window = (WINDOW_NS - into).max(1);
        (excess.saturating_mul(WINDOW_NS) / self.previous).clamp(1, until_next_window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn admits_the_rate_and_no_more_over_any_second() {
        let mut r = IngressRate::new(1000, 0);
        // Offered 10× the rate, one record every 0.1 ms, for 10 s.
        let mut admitted = Vec::new();
        for i in 0..100_000u64 {
            let t = i * MS / 10;
            if r.try_take(t) {
                admitted.push(t);
            }
        }
        let total = admitted.len() as f64;
        assert!(
            (9_000.0..=10_500.0).contains(&total),
            "admitted {total} in 10 s"
        );
        // Any sliding second holds at most the rate plus a small overshoot.
        for (i, &t) in admitted.iter().enumerate() {
            let in_second = admitted[i..]
                .iter()
                .take_while(|&&u| u < t + 1000 * MS)
                .count();
            assert!(
                in_second <= 1_100,
                "{in_second} records in the second after {t}"
            );
        }
    }

    #[test]
    fn below_the_rate_everything_passes() {
        let mut r = IngressRate::new(1000, 0);
        for i in 0..5_000u64 {
            assert!(r.try_take(i * 2 * MS), "record {i} refused at 500/s");
        }
    }

    #[test]
    fn idle_time_resets_the_window_and_wait_is_bounded() {
        let mut r = IngressRate::new(10, 0);
        for _ in 0..10 {
            assert!(r.try_take(0));
        }
        assert!(!r.try_take(1));
        let w = r.wait_ns(1);
        assert!(w > 0 && w <= 1000 * MS, "wait {w}");
        assert!(
            r.try_take(1 + w + 5 * 1000 * MS),
            "after idle seconds it admits again"
        );
    }

    #[test]
    fn wait_is_positive_and_within_the_window_at_every_instant() {
        let mut r = IngressRate::new(100, 0);
        for t in (0..3_000 * MS).step_by(37_000) {
            r.try_take(t);
            let w = r.wait_ns(t);
            assert!(w <= 1000 * MS, "wait {w} at {t}");
            if !r.try_take(t) {
                assert!(w > 0, "refused at {t} but told to wait 0");
            }
        }
    }
}
