//! Adaptive concurrency: how many requests a sink may have in flight.
//!
//! [`AdaptiveLimit`] is fed one [`Outcome`] per finished request and the
//! number of requests in flight when it started; it answers [`permits`]
//! (the current limit, an integer in `[1, max]`). Time comes in as an
//! argument (nanoseconds on any monotonic clock), so tests drive it with
//! simulated time.
//!
//! The rule, per window of `window_ms` (a window ends at the first response
//! after its duration has passed):
//!
//! - **push-back** (429/503, a timeout, a connection error) anywhere in the
//!   window: the limit is multiplied by `decrease` at once, and the window
//!   restarts, so a burst of rejections from one overload costs one decrease;
//! - **latency inflation** (the window's mean response time above `tolerance`
//!   × the baseline): the limit is multiplied by `decrease`;
//! - otherwise, if the window was **saturated** (some request found every
//!   permit taken, so more concurrency could have been used): the limit grows
//!   by one — or, until the first push-back or inflation, doubles (a slow
//!   start, so a fresh sink reaches a large endpoint's capacity in a few
//!   windows). Near the level of the last push-back it grows by a quarter per
//!   window instead, so the limit dwells just under an endpoint's capacity
//!   rather than bouncing off it.
//!
//! The baseline is the lowest window mean seen: the endpoint's own latency,
//! measured while it was not queueing our requests. It drops to a lower
//! mean at once. It rises only in a window run at a limit of one request,
//! where any queueing is not ours: an endpoint whose normal latency grew
//! makes the limit fall to one, the baseline is re-measured there, and the
//! limit grows again from it. (A baseline that crept up with every window
//! would follow a queue as it builds, and the limit would ratchet up.)
//!
//! Never allocates; no I/O.

/// Parameters (config `request.adaptive`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveParams {
    /// The limit never goes above this.
    pub max: u32,
    /// The limit at start.
    pub initial: u32,
    /// Length of a window, milliseconds.
    pub window_ms: u64,
    /// A window whose mean exceeds `tolerance` × baseline is inflation.
    pub tolerance: f64,
    /// Factor applied to the limit on push-back or inflation.
    pub decrease: f64,
}

impl Default for AdaptiveParams {
    fn default() -> Self {
        AdaptiveParams {
            max: 64,
            initial: 2,
            window_ms: 100,
            tolerance: 1.5,
            decrease: 0.8,
        }
    }
}

/// How a request ended, for the limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered (2xx, or a 4xx/5xx that is not push-back): a latency sample.
    Answered,
    /// 429, 503, a timeout or a connection error: the endpoint pushes back.
    PushBack,
}

/// The adaptive limit of one sink on one shard.
#[derive(Debug, Clone)]
pub struct AdaptiveLimit {
    p: AdaptiveParams,
    limit: f64,
    /// Mean response time the endpoint has when not overloaded, ns.
    baseline_ns: Option<f64>,
    /// The limit just before the last push-back.
    last_pushback_limit: Option<f64>,
    /// Doubling until the endpoint first pushes back or slows down.
    slow_start: bool,
    window_start_ns: u64,
    samples: u32,
    sum_ns: u64,
    saturated: bool,
}

impl AdaptiveLimit {
    pub fn new(p: AdaptiveParams, now_ns: u64) -> AdaptiveLimit {
        let max = p.max.max(1);
        AdaptiveLimit {
            p: AdaptiveParams { max, ..p },
            limit: f64::from(p.initial.clamp(1, max)),
            baseline_ns: None,
            last_pushback_limit: None,
            slow_start: true,
            window_start_ns: now_ns,
            samples: 0,
            sum_ns: 0,
            saturated: false,
        }
    }

    /// Requests that may be in flight now.
    #[inline]
    pub fn permits(&self) -> u32 {
        (self.limit as u32).clamp(1, self.p.max)
    }

    /// The baseline response time, if one was measured.
    pub fn baseline_ns(&self) -> Option<u64> {
        self.baseline_ns.map(|b| b as u64)
    }

    /// A request is about to start with `in_flight` others running: if that
    /// takes the last permit, demand reached the limit in this window.
    #[inline]
    pub fn on_start(&mut self, in_flight: u32) {
        if in_flight + 1 >= self.permits() {
            self.saturated = true;
        }
    }

    /// A request finished after `rtt_ns`.
    pub fn on_done(&mut self, outcome: Outcome, rtt_ns: u64, now_ns: u64) {
        match outcome {
            Outcome::PushBack => {
                // Only one decrease per window: rejections of requests sent
                // before the decrease say nothing new.
                if self.samples > 0
                    || now_ns.saturating_sub(self.window_start_ns) >= self.window_ns()
                    || self.last_pushback_limit.is_none()
                {
                    self.last_pushback_limit = Some(self.limit);
                    self.shrink();
                    self.restart_window(now_ns);
                }
            }
            Outcome::Answered => {
                self.samples += 1;
                self.sum_ns += rtt_ns;
                if now_ns.saturating_sub(self.window_start_ns) >= self.window_ns() {
                    self.end_window(now_ns);
                }
            }
        }
    }

    fn window_ns(&self) -> u64 {
        self.p.window_ms.max(1) * 1_000_000
    }

    fn shrink(&mut self) {
        self.slow_start = false;
        self.limit = (self.limit * self.p.decrease).max(1.0);
    }

    fn restart_window(&mut self, now_ns: u64) {
        self.window_start_ns = now_ns;
        self.samples = 0;
        self.sum_ns = 0;
        self.saturated = false;
    }

    fn end_window(&mut self, now_ns: u64) {
        let mean = self.sum_ns as f64 / f64::from(self.samples.max(1));
        let baseline = match self.baseline_ns {
            None => mean,
            Some(b) if mean < b || self.permits() == 1 => mean,
            Some(b) => b,
        };
        let inflated = self
            .baseline_ns
            .is_some_and(|b| mean > b * self.p.tolerance);
        self.baseline_ns = Some(baseline);
        if inflated {
            self.shrink();
        } else if self.saturated {
            let near_ceiling = self
                .last_pushback_limit
                .is_some_and(|l| self.limit + 1.0 >= l);
            self.limit += if self.slow_start {
                self.limit
            } else if near_ceiling {
                0.25
            } else {
                1.0
            };
            self.limit = self.limit.min(f64::from(self.p.max));
        }
        self.restart_window(now_ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// An endpoint that serves `capacity` requests at once in `latency`;
    /// beyond that it answers 429 at once (`reject`) or queues (each request
    /// waits for a free server).
    struct Endpoint {
        capacity: u32,
        latency_ns: u64,
        reject: bool,
    }

    struct Sim {
        now: u64,
        /// Finish times (and whether answered) of requests in flight.
        flight: Vec<(u64, u64, Outcome)>,
        /// When each server is next free (queueing endpoints).
        servers: Vec<u64>,
        served: u64,
        rejected: u64,
    }

    impl Sim {
        fn new() -> Sim {
            Sim {
                now: 0,
                flight: Vec::new(),
                servers: Vec::new(),
                served: 0,
                rejected: 0,
            }
        }

        /// Runs a saturated client (always as many requests as permitted)
        /// against `ep` for `duration_ns`; returns the permits seen at each
        /// millisecond.
        fn run(&mut self, lim: &mut AdaptiveLimit, ep: &Endpoint, duration_ns: u64) -> Vec<u32> {
            let end = self.now + duration_ns;
            let mut trace = Vec::new();
            self.servers.resize(ep.capacity as usize, 0);
            while self.now < end {
                // Start requests up to the limit.
                while (self.flight.len() as u32) < lim.permits() {
                    lim.on_start(self.flight.len() as u32);
                    let active = self
                        .flight
                        .iter()
                        .filter(|f| f.2 == Outcome::Answered)
                        .count();
                    if ep.reject && active as u32 >= ep.capacity {
                        self.flight
                            .push((self.now, self.now + MS / 2, Outcome::PushBack));
                    } else if ep.reject {
                        self.flight
                            .push((self.now, self.now + ep.latency_ns, Outcome::Answered));
                    } else {
                        let s = self.servers.iter_mut().min().expect("capacity > 0");
                        let start = (*s).max(self.now);
                        *s = start + ep.latency_ns;
                        self.flight.push((self.now, *s, Outcome::Answered));
                    }
                }
                self.now += MS / 10;
                let now = self.now;
                let mut i = 0;
                while i < self.flight.len() {
                    let (sent, done, outcome) = self.flight[i];
                    if done <= now {
                        self.flight.swap_remove(i);
                        match outcome {
                            Outcome::Answered => self.served += 1,
                            Outcome::PushBack => self.rejected += 1,
                        }
                        lim.on_done(outcome, done - sent, now);
                    } else {
                        i += 1;
                    }
                }
                if now.is_multiple_of(MS) {
                    trace.push(lim.permits());
                }
            }
            trace
        }
    }

    fn mean(xs: &[u32]) -> f64 {
        xs.iter().map(|&x| f64::from(x)).sum::<f64>() / xs.len() as f64
    }

    #[test]
    fn converges_to_a_rejecting_endpoints_capacity_and_stays_near_it() {
        let ep = Endpoint {
            capacity: 8,
            latency_ns: 20 * MS,
            reject: true,
        };
        let mut lim = AdaptiveLimit::new(AdaptiveParams::default(), 0);
        let mut sim = Sim::new();
        // Slow start: 2 → 4 → 8 in two saturated windows of 100 ms (a
        // window ends at its first answer after 100 ms: 120 ms here).
        let warmup = sim.run(&mut lim, &ep, 400 * MS);
        assert!(
            warmup.iter().any(|&p| p >= 8),
            "never reached capacity: {warmup:?}"
        );
        let (served0, rejected0) = (sim.served, sim.rejected);
        let steady = sim.run(&mut lim, &ep, 20_000 * MS);
        let m = mean(&steady);
        assert!((7.0..=9.0).contains(&m), "mean permits {m}");
        let served = (sim.served - served0) as f64;
        let best = 20_000.0 / 20.0 * 8.0; // capacity / latency over 20 s
        assert!(served >= 0.9 * best, "served {served} of {best}");
        let rejected = (sim.rejected - rejected0) as f64;
        assert!(
            rejected < 0.02 * served,
            "429s {rejected} for {served} served"
        );
    }

    #[test]
    fn backs_off_on_push_back_and_recovers_after() {
        let mut lim = AdaptiveLimit::new(
            AdaptiveParams {
                initial: 40,
                ..AdaptiveParams::default()
            },
            0,
        );
        let mut sim = Sim::new();
        let small = Endpoint {
            capacity: 4,
            latency_ns: 10 * MS,
            reject: true,
        };
        sim.run(&mut lim, &small, 3_000 * MS);
        assert!(lim.permits() <= 5, "limit {} after overload", lim.permits());
        // Capacity comes back: the limit follows it up.
        let big = Endpoint {
            capacity: 32,
            latency_ns: 10 * MS,
            reject: true,
        };
        let trace = sim.run(&mut lim, &big, 10_000 * MS);
        assert!(
            trace[trace.len() - 1000..].iter().all(|&p| p >= 24),
            "did not recover: {:?}",
            &trace[trace.len() - 10..]
        );
    }

    #[test]
    fn backs_off_on_latency_inflation_of_a_queueing_endpoint() {
        // No 429s: requests past capacity wait, so latency grows with the
        // limit. The limiter must not run the queue up to `max`.
        let ep = Endpoint {
            capacity: 6,
            latency_ns: 20 * MS,
            reject: false,
        };
        let mut lim = AdaptiveLimit::new(AdaptiveParams::default(), 0);
        let mut sim = Sim::new();
        let trace = sim.run(&mut lim, &ep, 30_000 * MS);
        let late = &trace[trace.len() - 10_000..];
        let m = mean(late);
        assert!((5.0..=13.0).contains(&m), "mean permits {m} for capacity 6");
        assert!(late.iter().all(|&p| p < 64));
    }

    #[test]
    fn follows_an_endpoint_whose_own_latency_grows() {
        let mut lim = AdaptiveLimit::new(AdaptiveParams::default(), 0);
        let mut sim = Sim::new();
        let fast = Endpoint {
            capacity: 8,
            latency_ns: 10 * MS,
            reject: true,
        };
        sim.run(&mut lim, &fast, 3_000 * MS);
        // Five times slower for good, same capacity: the limit dips while
        // the baseline is re-measured, then climbs back to the capacity.
        let slow = Endpoint {
            latency_ns: 50 * MS,
            ..fast
        };
        let trace = sim.run(&mut lim, &slow, 30_000 * MS);
        let m = mean(&trace[trace.len() - 10_000..]);
        assert!(m >= 6.5, "mean permits {m} after the endpoint slowed");
    }

    #[test]
    fn stays_within_one_and_max() {
        let p = AdaptiveParams {
            max: 3,
            ..AdaptiveParams::default()
        };
        let mut lim = AdaptiveLimit::new(p, 0);
        for i in 0..1000u64 {
            lim.on_start(10);
            lim.on_done(Outcome::Answered, MS, i * 200 * MS);
        }
        assert_eq!(lim.permits(), 3);
        for i in 0..1000u64 {
            lim.on_done(Outcome::PushBack, MS, (1000 + i) * 200 * MS);
        }
        assert_eq!(lim.permits(), 1);
    }

    #[test]
    fn does_not_grow_without_demand() {
        let mut lim = AdaptiveLimit::new(AdaptiveParams::default(), 0);
        for i in 0..100u64 {
            lim.on_start(0); // one request at a time: never saturated at 2
            lim.on_done(Outcome::Answered, MS, i * 200 * MS);
        }
        assert_eq!(lim.permits(), 2);
    }
}
