//! `file`: newline-delimited records appended to `path` through io_uring.
//!
//! The file is opened with `O_APPEND`, so every shard's sender appends whole
//! batches to the same file without interleaving inside a write. A failed
//! open or write (a missing directory, a full disk) is retried with backoff
//! by [`StreamOutput`]; the batch is kept until it is written, and a failed
//! write reopens the file (it may have been rotated or removed).

use super::util::stream::{StreamOutput, Transport};
use super::{Kind, PlanCx};
use crate::config::{invalid, may_write, ConfigError};
use crate::pipeline::{Ack, SinkCtx};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use crate::io::{File, OpenOptions};

pub struct Sink;

/// The keys of a file sink.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Target {
    pub path: PathBuf,
}

impl Kind for Sink {
    const NAME: &'static str = "file";
    type Config = Config;
    type Target = Target;
    type Output = StreamOutput<Appender>;

    fn plan(c: Config, cx: &PlanCx<'_>) -> Result<Target, ConfigError> {
        let path = c
            .path
            .ok_or_else(|| invalid(cx.key("path"), "a file sink needs a path"))?;
        Ok(Target { path })
    }

    fn output(
        cx: &Rc<SinkCtx>,
        sink: usize,
        t: &Target,
        _ack: Option<Ack>,
    ) -> StreamOutput<Appender> {
        StreamOutput::new(
            cx,
            sink,
            Appender {
                path: t.path.clone(),
                far_end: t.path.display().to_string(),
            },
        )
    }

    /// The path is a writable file, or can be created in a writable
    /// directory; a directory that does not exist yet is allowed (the sink
    /// retries until it appears, and says so).
    fn check(t: &Target, cx: &PlanCx<'_>) -> Result<(), ConfigError> {
        let (path, key) = (&t.path, cx.key("path"));
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => Err(invalid(
                key,
                format!("{} is a directory, not a file", path.display()),
            )),
            Ok(_) => may_write(&key, path),
            Err(_) => {
                let parent = match path.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
                match std::fs::metadata(parent) {
                    Ok(m) if m.is_dir() => may_write(&key, parent),
                    Ok(_) => Err(invalid(
                        key,
                        format!("{} is not a directory", parent.display()),
                    )),
                    Err(_) => {
                        tracing::warn!(sink = cx.name, path = %path.display(),
                            "the file sink's directory does not exist (yet): batches wait until it does");
                        Ok(())
                    }
                }
            }
        }
    }
}

/// The file sink's way to its file.
pub struct Appender {
    path: PathBuf,
    far_end: String,
}

impl Transport for Appender {
    type Conn = File;

    fn far_end(&self) -> &str {
        &self.far_end
    }

    async fn open(&self) -> std::io::Result<File> {
        OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)
            .await
    }

    async fn write<B: crate::io::Buf>(&self, f: &File, buf: B) -> (std::io::Result<()>, B) {
        // O_APPEND: the kernel writes at the end whatever the offset.
        f.write_all_at(buf, 0).await
    }

    async fn close(&self, f: File, _graceful: bool) {
        let _ = f.close().await;
    }
}
