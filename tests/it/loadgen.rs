//! The yardstick itself: the load generator straight into its receiver.

use crate::harness::*;

#[test]
fn loadgen_tcp_at_full_speed_loses_nothing() {
    let addr = free_addr();
    let rx = Receiver::start(addr, 2_000_000, 60, &[]);
    let s = send(
        addr,
        &["--connections", "4", "--count", "2000000", "--size", "256"],
    );
    assert_eq!(u(&s, "sent"), 2_000_000);
    let (r, ok) = rx.finish();
    assert!(ok, "{r}");
    assert_eq!(u(&r, "lost"), 0, "{r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
    assert_eq!(u(&r, "reordered"), 0, "{r}");
    assert!(r["latency_us"]["p99"].as_f64().unwrap() > 0.0);
}

#[test]
fn receive_exits_non_zero_when_expect_is_not_met() {
    let addr = free_addr();
    let rx = Receiver::start(addr, 1000, 2, &[]);
    send(addr, &["--count", "10", "--size", "64"]);
    let (r, ok) = rx.finish();
    assert!(!ok);
    assert_eq!(u(&r, "unique"), 10);
    assert_eq!(u(&r, "lost"), 990);
}
