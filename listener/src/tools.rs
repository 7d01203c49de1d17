//! What the operator tools (`-dump`, `-verify`, `-ctrl`, `get_notifier_id`) share: reading
//! the listener state whether or not the daemon runs, asking the notifier for its ids, and
//! finding the modules.
//!
//! The state is read from a consistent copy: while the listener runs (it holds
//! `cache.lock`) the tool asks it for a `SNAPSHOT` over the control socket into a private
//! directory inside the cache directory; while it does not, the tool takes `cache.lock`
//! itself, so no listener starts in the middle, and reads the cache directory directly.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use daemon::lock::{FileLock, LockError};
use proto::client::{ClientError, NotifierClient};
use serde::Serialize;

use crate::control::{self, ControlError, ModuleStatus, SnapshotInfo};
use crate::dispatch::READY;

/// The process lock of the listener inside the cache directory.
pub const CACHE_LOCK: &str = "cache.lock";
/// The module directory of a UCS system.
pub const DEFAULT_MODULE_DIR: &str = "/usr/lib/univention-directory-listener/system";

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{0} is not a listener cache directory (it does not exist)")]
    NoCacheDir(PathBuf),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(
        "the listener holds {lock} but does not answer on its control socket ({source}); it \
         may still be starting, or be older than these tools"
    )]
    NoControl {
        lock: PathBuf,
        #[source]
        source: ControlError,
    },
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Read access to the listener state; the lock or the snapshot lives as long as this.
#[derive(Debug)]
pub enum StateAccess {
    /// The listener is stopped and this process holds `cache.lock`.
    Direct { dir: PathBuf, _lock: FileLock },
    /// A copy written by the running listener; removed when dropped.
    Snapshot {
        dir: tempfile::TempDir,
        info: SnapshotInfo,
    },
}

impl StateAccess {
    /// The directory to read: `cache.lmdb/`, `handlers/`, `notifier_id`.
    pub fn dir(&self) -> &Path {
        match self {
            StateAccess::Direct { dir, .. } => dir,
            StateAccess::Snapshot { dir, .. } => dir.path(),
        }
    }

    pub fn is_snapshot(&self) -> bool {
        matches!(self, StateAccess::Snapshot { .. })
    }
}

/// Takes `cache.lock` of `cache_dir` once, without waiting: `None` while another process
/// holds it. The daemon holds it for its lifetime, the tools while they open the cache.
pub fn lock_cache(cache_dir: &Path) -> Result<Option<FileLock>, LockError> {
    match daemon::lock::lock_path(&cache_dir.join(CACHE_LOCK), 1, Duration::ZERO) {
        Ok(lock) => Ok(Some(lock)),
        Err(LockError::Busy { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// [`lock_cache`] for the tools, which refuse a missing cache directory.
pub fn try_lock(cache_dir: &Path) -> Result<Option<FileLock>, ToolError> {
    if !cache_dir.is_dir() {
        return Err(ToolError::NoCacheDir(cache_dir.to_owned()));
    }
    Ok(lock_cache(cache_dir)?)
}

/// Whether a listener holds `cache.lock` of `cache_dir` (false if the directory or the
/// lock file does not exist); asks without taking the lock ([`daemon::lock::holder`]).
pub fn listener_running(cache_dir: &Path) -> bool {
    daemon::lock::holder(&cache_dir.join(CACHE_LOCK)).is_ok_and(|pid| pid.is_some())
}

/// A consistent view of the listener state in `cache_dir`; see the module comment.
pub fn open_state(cache_dir: &Path) -> Result<StateAccess, ToolError> {
    if let Some(lock) = try_lock(cache_dir)? {
        return Ok(StateAccess::Direct {
            dir: cache_dir.to_owned(),
            _lock: lock,
        });
    }
    // Inside the cache directory: on the same file system as the cache (a copy of a large
    // cache may not fit into /tmp) and as private as the cache itself.
    let dir = tempfile::Builder::new()
        .prefix(".snapshot-")
        .tempdir_in(cache_dir)
        .map_err(|source| ToolError::Io {
            what: "create a snapshot directory in",
            path: cache_dir.to_owned(),
            source,
        })?;
    give_to_owner_of(dir.path(), cache_dir)?;
    match control::snapshot_of(cache_dir, dir.path()) {
        Ok(info) => Ok(StateAccess::Snapshot { dir, info }),
        Err(source @ ControlError::Connect { .. }) => Err(ToolError::NoControl {
            lock: cache_dir.join(CACHE_LOCK),
            source,
        }),
        Err(e) => Err(e.into()),
    }
}

/// Hands `path` to the owner of `like` when running as root: the listener runs as its own
/// user and must be able to write the snapshot.
pub fn give_to_owner_of(path: &Path, like: &Path) -> Result<(), ToolError> {
    daemon::fs::give_to_owner_of(path, like).map_err(|e| ToolError::Io {
        what: e.op,
        path: e.path,
        source: e.source,
    })
}

/// The notifier's last transaction id (`GET_ID`) or, with `schema`, its schema id
/// (`GET_SCHEMA_ID`), over protocol 3.
pub async fn query_notifier(
    host: &str,
    port: u16,
    schema: bool,
    timeout: Duration,
    tls: &proto::ClientTls,
) -> Result<u64, ClientError> {
    let mut client = NotifierClient::connect_with(host, port, 3, timeout, tls).await?;
    if schema {
        client.get_schema_id(timeout).await
    } else {
        client.get_id(timeout).await
    }
}

/// A module as the tools list it; also a module of `ctrl status --json`, hence the field
/// order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModuleEntry {
    pub name: String,
    /// The module file, `native:<kind>`, or `-` when only a state file is known.
    pub file: String,
    /// State-file value; `None` without a state file.
    pub state: Option<u32>,
    /// Derived from `state`, for readers of the JSON.
    pub ready: bool,
    /// Calls and failed calls since the daemon started; only a running listener knows them.
    pub calls: Option<u64>,
    pub failures: Option<u64>,
    /// "ready", "failing", "not ready", "initialising", "initialisation failed", "failed
    /// to load" (from a running listener); without one "ready" or "not ready" from the
    /// state file.
    pub condition: String,
    /// Whether this module lets the status be healthy: only a ready module that is not
    /// failing does.
    pub healthy: bool,
    /// Handler calls that failed since the last successful one (running listener only).
    pub consecutive_failures: Option<u64>,
    /// Handler calls repeated after a transient failure (running listener only).
    pub retries: Option<u64>,
    pub last_error: Option<control::ModuleError>,
    /// Unix time of the next initialisation attempt, after a failed one.
    pub next_init: Option<u64>,
    /// The lasting problem a module reports (running listener only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl ModuleEntry {
    fn new(name: String, file: String, state: Option<u32>) -> ModuleEntry {
        let ready = state.is_some_and(|s| s & READY != 0);
        ModuleEntry {
            ready,
            name,
            file,
            state,
            calls: None,
            failures: None,
            condition: if ready { "ready" } else { "not ready" }.to_owned(),
            healthy: ready,
            consecutive_failures: None,
            retries: None,
            last_error: None,
            next_init: None,
            problem: None,
        }
    }

    fn live(m: &ModuleStatus) -> ModuleEntry {
        let base = ModuleEntry::new(m.name.clone(), m.source.clone(), Some(m.state));
        // A daemon that does not report conditions yet: its ready bit is all there is.
        let condition = if m.condition.is_empty() {
            base.condition.clone()
        } else {
            m.condition.clone()
        };
        // A module that did not load was never called: no counters rather than zeros.
        let loaded = condition != "failed to load";
        ModuleEntry {
            calls: Some(m.calls).filter(|_| loaded),
            failures: Some(m.failures).filter(|_| loaded),
            healthy: condition == "ready",
            condition,
            consecutive_failures: Some(m.consecutive_failures),
            retries: Some(m.retries),
            last_error: m.last_error.clone(),
            next_init: m.next_init,
            problem: m.problem.clone(),
            ..base
        }
    }
}

/// The modules of the running listener (`live`, from its `STATUS`) or else of the module
/// files in `dirs` ([`scan_modules`]), then state files no module accounts for.
pub fn list_modules(
    live: Option<&[ModuleStatus]>,
    dirs: &[PathBuf],
    states: &BTreeMap<String, u32>,
) -> Vec<ModuleEntry> {
    let Some(live) = live else {
        return scan_modules(dirs, states);
    };
    let mut modules = live.iter().map(ModuleEntry::live).collect();
    add_state_only(&mut modules, states);
    modules
}

/// The modules of a stopped listener: the module files of `dirs` in the daemon's load order
/// ([`crate::loader::module_files`]; the name from a top-level `name = '…'` line, else the
/// file name without `.py`, as UCS 5) with their states, then state files no file accounts
/// for (native modules, removed files).
pub(crate) fn scan_modules(dirs: &[PathBuf], states: &BTreeMap<String, u32>) -> Vec<ModuleEntry> {
    let mut modules: Vec<ModuleEntry> = Vec::new();
    for dir in dirs {
        // The daemon's own file list and order; an unreadable or missing path lists none.
        let files = crate::loader::module_files(dir)
            .unwrap_or_default()
            .into_iter()
            .filter(|file| file.is_file());
        for file in files {
            let name = module_name_of_file(&file);
            let state = states.get(&name).copied();
            modules.push(ModuleEntry::new(name, file.display().to_string(), state));
        }
    }
    add_state_only(&mut modules, states);
    modules
}

/// The name of the module in `file` without importing it: its top-level `name = '…'`
/// line, else the file name without `.py` (as UCS 5).
pub(crate) fn module_name_of_file(file: &Path) -> String {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| module_name(&text))
        .or_else(|| file.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default()
}

/// Appends the modules that only have a state file.
fn add_state_only(modules: &mut Vec<ModuleEntry>, states: &BTreeMap<String, u32>) {
    for (name, state) in states {
        if !modules.iter().any(|m| &m.name == name) {
            modules.push(ModuleEntry::new(name.clone(), "-".into(), Some(*state)));
        }
    }
}

/// The value of a top-level `name = '…'` / `name = "…"` assignment.
fn module_name(source: &str) -> Option<String> {
    source.lines().find_map(|line| {
        let rest = line.strip_prefix("name")?.trim_start();
        let value = rest.strip_prefix('=')?.trim();
        let quote = value.chars().next().filter(|c| *c == '\'' || *c == '"')?;
        let inner = value.get(1..)?;
        let end = inner.find(quote)?;
        Some(inner[..end].to_owned())
    })
}

/// Whether standard output is a terminal (colours only then, and not with `NO_COLOR`).
pub fn colour_stdout() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    let tty = unsafe { libc::isatty(1) } == 1;
    tty && std::env::var_os("NO_COLOR").is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_modules_then_state_only_ones_as_status_json_shows_them() {
        let live = [ModuleStatus {
            name: "a".into(),
            source: "native:jsonl".into(),
            state: 3,
            ready: true,
            calls: 5,
            failures: 1,
            seconds: 0.5,
            condition: "failing".into(),
            consecutive_failures: 1,
            retries: 2,
            last_error: Some(control::ModuleError {
                call: "handler cn=x".into(),
                message: "boom".into(),
                at: 7,
            }),
            init_failures: 0,
            next_init: None,
            quarantined: 0,
            problem: None,
        }];
        let states = BTreeMap::from([("a".to_owned(), 3), ("b".to_owned(), 1)]);
        let modules = list_modules(Some(&live), &[], &states);
        assert_eq!(
            serde_json::to_string(&modules).unwrap(),
            r#"[{"name":"a","file":"native:jsonl","state":3,"ready":true,"calls":5,"failures":1,"condition":"failing","healthy":false,"consecutive_failures":1,"retries":2,"last_error":{"call":"handler cn=x","message":"boom","at":7},"next_init":null},{"name":"b","file":"-","state":1,"ready":false,"calls":null,"failures":null,"condition":"not ready","healthy":false,"consecutive_failures":null,"retries":null,"last_error":null,"next_init":null}]"#
        );
    }

    #[test]
    fn module_names_from_python_sources() {
        assert_eq!(
            module_name("# x\nname = 'replication'\ndescription = 'x'\n").as_deref(),
            Some("replication")
        );
        assert_eq!(module_name("name=\"nfs\"\n").as_deref(), Some("nfs"));
        // Indented (inside a class: the OO API) or other names do not count.
        assert_eq!(module_name("class C:\n    name = 'inner'\n"), None);
        assert_eq!(module_name("names = 'x'\n"), None);
        assert_eq!(module_name("name = get_name()\n"), None);
    }

    #[test]
    fn scan_lists_files_then_state_only_modules() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.py"), "name = 'beta'\n").unwrap();
        std::fs::write(dir.path().join("a.py"), "class X: pass\n").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "name = 'no'\n").unwrap();
        let states = BTreeMap::from([("beta".to_owned(), 3), ("jsonl".to_owned(), 1)]);
        let modules = scan_modules(&[dir.path().to_owned()], &states);
        let summary: Vec<_> = modules
            .iter()
            .map(|m| (m.name.as_str(), m.state, m.file.rsplit('/').next().unwrap()))
            .collect();
        assert_eq!(
            summary,
            [
                ("a", None, "a.py"),
                ("beta", Some(3), "b.py"),
                ("jsonl", Some(1), "-")
            ]
        );
    }

    #[test]
    fn lock_tells_whether_a_listener_runs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!listener_running(dir.path()));
        assert!(matches!(
            try_lock(&dir.path().join("missing")),
            Err(ToolError::NoCacheDir(_))
        ));
        let lock = try_lock(dir.path()).unwrap();
        assert!(lock.is_some());
        // Record locks never conflict within one process, so a second try succeeds here;
        // the conflict with another process is covered by the end-to-end tests.
        drop(lock);
        let access = open_state(dir.path()).unwrap();
        assert!(!access.is_snapshot());
        assert_eq!(access.dir(), dir.path());
    }
}
