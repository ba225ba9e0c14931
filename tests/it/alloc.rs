//! The hot path allocates nothing per record: the real pipeline (TCP in, TCP
//! out) built with the counting allocator (`--features count-alloc`), which
//! counts allocations on the shard threads. A count, not a timing.

use crate::harness::*;
use std::time::Duration;

const SHARD_ALLOCATIONS: &str = "updraft_shard_allocations_total";
const SENT: &str = r#"updraft_sink_sent_records_total{sink="up",type="tcp"}"#;

#[test]
#[cfg_attr(not(feature = "count-alloc"), ignore = "needs --features count-alloc")]
fn steady_state_allocates_under_one_hundredth_per_record() {
    let (src, sink) = (free_addr(), free_addr());
    let u_ = Updraft::start(&tcp_to_tcp(src, sink, 2, ""));
    let rx = Receiver::start(sink, 200_000, 60, &[]);
    // Warm-up: pools fill, connections and tasks start.
    send(
        src,
        &["--connections", "4", "--count", "100000", "--size", "256"],
    );
    u_.wait_metric(SENT, 100_000.0, Duration::from_secs(30));
    let before = u_.metric(SHARD_ALLOCATIONS);
    send(
        src,
        &[
            "--connections",
            "4",
            "--count",
            "100000",
            "--size",
            "256",
            "--stream-base",
            "4",
        ],
    );
    u_.wait_metric(SENT, 200_000.0, Duration::from_secs(30));
    let after = u_.metric(SHARD_ALLOCATIONS);
    let (r, ok) = rx.finish();
    assert!(ok, "{r}");
    let per_record = (after - before) / 100_000.0;
    eprintln!(
        "steady state: {} allocations for 100000 records ({per_record:.5} per record)",
        after - before
    );
    assert!(per_record < 0.01, "{per_record} allocations per record");
}
