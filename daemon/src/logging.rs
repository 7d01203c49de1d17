//! Logging: journald when started by systemd with its journal on stdout/stderr
//! (`JOURNAL_STREAM`), else a log file (reopened on SIGHUP, for logrotate) or stderr. The
//! level follows UCS debug levels and moves at runtime with SIGUSR1/SIGUSR2.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Registry, reload};

/// UCS levels 0 ERROR, 1 WARN, 2 PROCESS, 3 INFO, 4 ALL.
fn level_filter(level: u8) -> LevelFilter {
    match level {
        0 => LevelFilter::ERROR,
        1 => LevelFilter::WARN,
        2 => LevelFilter::INFO,
        3 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    }
}

/// The same level for the `log` facade: ldap3 logs every request and response through it,
/// and `try_init` leaves its max level at the subscriber's widest hint (TRACE, from the
/// per-target filter), so each such call went through the log→tracing bridge to be dropped
/// there. Capped here, a filtered `log` call is one atomic load.
fn log_level(level: u8) -> log::LevelFilter {
    match level {
        0 => log::LevelFilter::Error,
        1 => log::LevelFilter::Warn,
        2 => log::LevelFilter::Info,
        3 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

/// The level in force, process-wide: `univention.debug.get_level()` in Python modules
/// reads it (one logging setup per process, like the global subscriber).
static CURRENT: AtomicU8 = AtomicU8::new(DEFAULT_LEVEL);

/// The level before [`Logging::init`] ran: UCS's default for every debug category (WARN).
pub const DEFAULT_LEVEL: u8 = 1;

/// The UCS debug level (0 ERROR … 4 ALL) in force now: `-d` moved by SIGUSR1/SIGUSR2.
pub fn current_level() -> u8 {
    CURRENT.load(Ordering::Relaxed)
}

pub struct Logging {
    handle: reload::Handle<LevelFilter, Registry>,
    file: Option<Arc<ReopenableFile>>,
}

impl Logging {
    /// Installs the global subscriber.
    pub fn init(level: u8, log_file: Option<&Path>) -> io::Result<Logging> {
        let (filter, handle) = reload::Layer::new(level_filter(level));
        let journald =
            std::env::var_os("JOURNAL_STREAM").and_then(|_| tracing_journald::layer().ok());
        let file = match (&journald, log_file) {
            (None, Some(path)) => Some(Arc::new(ReopenableFile::open(path)?)),
            _ => None,
        };
        let fmt_layer = match (&journald, &file) {
            (Some(_), _) => None,
            (None, Some(file)) => Some(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(SharedFile(Arc::clone(file)))
                    .boxed(),
            ),
            (None, None) => Some(
                tracing_subscriber::fmt::layer()
                    .with_ansi(io::stderr().is_terminal())
                    .with_writer(io::stderr)
                    .boxed(),
            ),
        };
        // sled logs every page write at debug level through `log`; besides flooding the log
        // at -d 4, such a record emitted while a runtime thread exits reaches the formatter
        // after its thread-local buffer is gone, which aborts the process.
        // async-nats (the nats module) traces every protocol operation at debug/trace; the
        // module logs what an operator needs itself.
        let quiet_storage = Targets::new()
            .with_target("sled", LevelFilter::WARN)
            .with_target("async_nats", LevelFilter::INFO)
            .with_default(LevelFilter::TRACE);
        tracing_subscriber::registry()
            .with(filter)
            .with(quiet_storage)
            .with(journald)
            .with(fmt_layer)
            .try_init()
            .map_err(io::Error::other)?;
        log::set_max_level(log_level(level));
        CURRENT.store(level.min(4), Ordering::Relaxed);
        Ok(Logging { handle, file })
    }

    /// SIGUSR1: one level more verbose.
    pub fn raise(&self) {
        self.set(current_level().saturating_add(1).min(4));
    }

    /// SIGUSR2: one level less verbose.
    pub fn lower(&self) {
        self.set(current_level().saturating_sub(1));
    }

    fn set(&self, level: u8) {
        CURRENT.store(level, Ordering::Relaxed);
        let result = self.handle.modify(|filter| *filter = level_filter(level));
        // After the reload, which sets `log`'s level from the subscriber's widest hint.
        log::set_max_level(log_level(level));
        if let Err(err) = result {
            tracing::warn!("cannot change the log level: {err}");
        } else {
            tracing::warn!("debug level is now {level}");
        }
    }

    /// SIGHUP: reopen the log file after rotation.
    pub fn reopen(&self) -> io::Result<()> {
        match &self.file {
            Some(file) => file.reopen(),
            None => Ok(()),
        }
    }
}

struct ReopenableFile {
    path: PathBuf,
    file: Mutex<File>,
}

impl ReopenableFile {
    fn open(path: &Path) -> io::Result<ReopenableFile> {
        Ok(ReopenableFile {
            path: path.to_owned(),
            file: Mutex::new(open_append(path)?),
        })
    }

    fn reopen(&self) -> io::Result<()> {
        let fresh = open_append(&self.path)?;
        let mut file = self
            .file
            .lock()
            .map_err(|_| io::Error::other("log file lock poisoned"))?;
        *file = fresh;
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The subscriber's handle on the log file; each event locks it for one write.
#[derive(Clone)]
struct SharedFile(Arc<ReopenableFile>);

struct FileWriter(Arc<ReopenableFile>);

impl Write for FileWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut file = self
            .0
            .file
            .lock()
            .map_err(|_| io::Error::other("log file lock poisoned"))?;
        file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for SharedFile {
    type Writer = FileWriter;

    fn make_writer(&'a self) -> FileWriter {
        FileWriter(Arc::clone(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `log` records (ldap3's) follow `-d` and SIGUSR1/2 like tracing's own: cut off at
    /// the facade below the level, written at and above it.
    #[test]
    fn log_records_follow_the_level() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let logging = Logging::init(1, Some(&path)).expect("init");
        assert_eq!(log::max_level(), log::LevelFilter::Warn);
        log::debug!(target: "ldap3::conn", "filtered at level 1");
        log::warn!(target: "ldap3::conn", "shown at level 1");
        for _ in 0..3 {
            logging.raise();
        }
        assert_eq!(log::max_level(), log::LevelFilter::Trace);
        log::debug!(target: "ldap3::conn", "shown at level 4");
        logging.lower();
        assert_eq!(log::max_level(), log::LevelFilter::Debug);
        let text = std::fs::read_to_string(&path).expect("read log");
        assert!(!text.contains("filtered at level 1"), "{text}");
        assert!(text.contains("shown at level 1"), "{text}");
        assert!(text.contains("shown at level 4"), "{text}");
    }
}
