//! `blackhole`: takes every batch and writes it nowhere (a ceiling for
//! benchmarks, and a sink for sources under test).

use super::{Kind, PlanCx};
use crate::config::ConfigError;
use crate::pipeline::{Ack, BatchId, Deliver, SinkCtx};
use crate::record::BatchView;
use serde::Deserialize;
use std::rc::Rc;

pub struct Sink;

/// A blackhole takes no keys of its own.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {}

impl Kind for Sink {
    const NAME: &'static str = "blackhole";
    type Config = Config;
    type Target = ();
    type Output = Blackhole;

    fn plan(_c: Config, _cx: &PlanCx<'_>) -> Result<(), ConfigError> {
        Ok(())
    }

    fn output(_cx: &Rc<SinkCtx>, _sink: usize, _t: &(), _ack: Option<Ack>) -> Blackhole {
        Blackhole
    }
}

pub struct Blackhole;

impl Deliver for Blackhole {
    fn takes_batches(&self) -> bool {
        false
    }

    async fn deliver<B: crate::io::Buf>(
        &mut self,
        _cx: &SinkCtx,
        buf: B,
        _give_up: Option<tokio::time::Instant>,
    ) -> Result<B, B> {
        Ok(buf)
    }

    async fn submit(&mut self, _batch: BatchView<'_>, _id: BatchId) {
        unreachable!("a blackhole takes payloads through deliver")
    }

    async fn close(&mut self, _cx: &SinkCtx) {}
}
