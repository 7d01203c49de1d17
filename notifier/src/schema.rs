//! The schema id: a decimal counter in `<ldap-dir>/schema/id/id`, bumped by slapd's start
//! script when the schema changes, served by `GET_SCHEMA_ID` (spec/notifier.md §4).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use inotify::{Inotify, WatchMask};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

pub struct SchemaWatcher {
    file: PathBuf,
    current: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    poll_interval: Duration,
}

impl SchemaWatcher {
    pub fn new(ldap_dir: &Path, metrics: Arc<Metrics>, poll_interval: Duration) -> SchemaWatcher {
        let file = ldap_dir.join(daemon::paths::SCHEMA_ID_FILE);
        let current = Arc::new(AtomicU64::new(0));
        let watcher = SchemaWatcher {
            file,
            current,
            metrics,
            poll_interval,
        };
        watcher.reload();
        watcher
    }

    pub fn shared(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.current)
    }

    fn reload(&self) {
        // A missing, empty or garbled file keeps the old value, like UCS.
        if let Some(id) = daemon::fs::read_decimal(&self.file) {
            let old = self.current.swap(id, Ordering::Relaxed);
            if old != id {
                tracing::info!("schema id is now {id}");
            }
            self.metrics.set_schema_id(id);
        }
    }

    /// Re-reads the id whenever its directory changes (and on a slow poll, in case the
    /// directory did not exist yet or an event was missed).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut events = self.watch().ok();
        loop {
            let event = async {
                match events.as_mut() {
                    Some(stream) => {
                        stream.next().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = event => {}
                _ = tokio::time::sleep(self.poll_interval) => {
                    if events.is_none() {
                        events = self.watch().ok();
                    }
                }
            }
            self.reload();
        }
    }

    fn watch(&self) -> std::io::Result<inotify::EventStream<[u8; 1024]>> {
        let dir = self.file.parent().unwrap_or(Path::new("."));
        let inotify = Inotify::init()?;
        inotify.watches().add(
            dir,
            WatchMask::CLOSE_WRITE | WatchMask::MODIFY | WatchMask::MOVED_TO | WatchMask::CREATE,
        )?;
        inotify.into_event_stream([0u8; 1024])
    }
}
