//! Dead letters: batches a sink's far end refused for good, kept on disk
//! for a person to look at (and replay), never retried.
//!
//! Under `data_dir/dlq/<sink>/`, one pair of files per batch:
//! `<stem>.body`, the bytes as they were sent, and `<stem>.json`, a note
//! the sink fills (why it was refused, what the far end said, how to
//! replay). The directory is capped per shard ([`DEAD_LETTER_BYTES_MAX`]);
//! past the cap, or when a file cannot be written, the batch is dropped and
//! counted (`updraft_sink_buffer_dropped_records_total`). Every outcome is
//! counted and logged, naming the sink and the shard.

use crate::pipeline::SinkCtx;
use std::cell::Cell;
use std::path::PathBuf;

/// The most one sink writes to its dead-letter directory per shard and run.
pub const DEAD_LETTER_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// One sink's dead letters on one shard.
pub struct DeadLetters {
    sink: usize,
    dir: PathBuf,
    written: Cell<u64>,
}

/// A refused batch, as the sink describes it.
pub struct Letter<'a> {
    /// The bytes as they were sent.
    pub body: &'a [u8],
    pub records: usize,
    /// Part of the file names: the batch's idempotency key or id.
    pub key: &'a str,
    /// Why the far end refused it, for the log line.
    pub reason: &'a str,
    /// The note written beside the body (the sink's own fields).
    pub note: serde_json::Value,
}

impl DeadLetters {
    /// For sink `sink` of a plan whose data directory is `data_dir`.
    pub fn new(cx: &SinkCtx, sink: usize) -> DeadLetters {
        let name = &cx.plan.sinks[sink].name;
        DeadLetters {
            sink,
            dir: cx.plan.data_dir.join("dlq").join(name),
            written: Cell::new(0),
        }
    }

    /// Keeps a refused batch, or drops and counts it (cap reached, or the
    /// files cannot be written).
    pub async fn put(&self, cx: &SinkCtx, letter: Letter<'_>) {
        let counters = &cx.metrics.sinks[self.sink];
        let name = cx.plan.sinks[self.sink].name.as_str();
        let (records, reason) = (letter.records, letter.reason);
        if self.written.get() + letter.body.len() as u64 > DEAD_LETTER_BYTES_MAX {
            counters.buffer_dropped.add(records as u64);
            tracing::error!(sink = name, shard = cx.id, reason, records,
                "the far end refused a batch for good and the dead-letter directory reached its cap; the batch is dropped (counted in updraft_sink_buffer_dropped_records_total)");
            return;
        }
        let stem = format!(
            "{}-shard{}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
            cx.id,
            letter.key
        );
        let body_file = self.dir.join(format!("{stem}.body"));
        let mut note = letter.note;
        if let Some(m) = note.as_object_mut() {
            m.insert("records".into(), records.into());
            m.insert("body_file".into(), format!("{stem}.body").into());
        }
        let mut note = note.to_string();
        note.push('\n');
        let written = async {
            // Creating the directory is rare (once per run); the files are
            // written through io_uring.
            std::fs::create_dir_all(&self.dir)?;
            write_file(&body_file, letter.body.to_vec()).await?;
            write_file(&self.dir.join(format!("{stem}.json")), note.into_bytes()).await
        }
        .await;
        match written {
            Ok(()) => {
                self.written
                    .set(self.written.get() + letter.body.len() as u64);
                counters.dead_letter_batches.add(1);
                counters.dead_letter_records.add(records as u64);
                tracing::warn!(sink = name, shard = cx.id, reason, records, file = %body_file.display(),
                    "the far end refused a batch for good; it went to the dead-letter directory");
            }
            Err(e) => {
                counters.buffer_dropped.add(records as u64);
                tracing::error!(sink = name, shard = cx.id, reason, records, error = %e, dir = %self.dir.display(),
                    "the far end refused a batch and it cannot be written to the dead-letter directory; dropped (counted)");
            }
        }
    }
}

async fn write_file(path: &std::path::Path, data: Vec<u8>) -> std::io::Result<()> {
    let f = crate::io::File::create(path).await?;
    let (res, _) = f.write_all_at(data, 0).await;
    res?;
    f.close().await
}
