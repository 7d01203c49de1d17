//! The listener's control socket, `<cache_dir>/control.sock`: how the operator tools talk to
//! a running daemon.
//!
//! The cache is locked for one process, so while the listener runs no tool can open the
//! cache. Instead a tool connects here (a unix stream socket, mode 0600: root and the
//! listener user only), sends one request line and reads one reply line, then the
//! connection closes:
//!
//! ```text
//! STATUS\n              → OK {"pid":…,"state":…,"processed_id":…,…}\n   (a [`Status`])
//! SNAPSHOT <dir>\n      → OK {"dir":…,"notifier_id":…,…}\n            (a [`SnapshotInfo`])
//! MODULE <name> <command…>\n → OK <the module's answer>\n
//! anything else         → ERROR <reason>\n
//! ```
//!
//! `SNAPSHOT` writes a consistent copy of the listener state into the existing, empty,
//! absolute directory `<dir>`: `cache.lmdb/` ([`cache::Cache::export_to`]: the state after
//! one commit, while commits go on), `handlers/<name>` (the module state files) and
//! `notifier_id` (the id of the copied master record). Afterwards `<dir>` is a cache
//! directory the tools open like the real one. The copy runs on a blocking thread of this
//! server, not the main loop, so it also works during a module initialisation that keeps
//! the main loop busy for hours, and replication does not wait for it.

use std::collections::BTreeMap;
use std::io::{self, BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cache::Cache;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use modules::python::PythonHost;

use crate::dispatch::{
    ActiveCall, LastError, ModuleStat, READY, STATE_DIR, read_states, write_state,
};
use crate::metrics::Metrics;

/// Name of the socket inside the cache directory.
pub(crate) const SOCKET_FILE: &str = "control.sock";
/// Longest request line accepted, newline included.
const MAX_REQUEST: u64 = 4096;
/// How long a client may take to send its request (short in tests, which wait it out).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(if cfg!(test) { 1 } else { 10 });
/// How long a tool waits for a `STATUS` reply.
pub(crate) const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a tool waits for a `MODULE` command: the main loop runs it after the
/// transaction in progress, and a retry may write many changes.
pub(crate) const MODULE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a tool waits for a `SNAPSHOT`: copying a large cache takes a while.
pub(crate) const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(1800);

pub(crate) fn socket_path(cache_dir: &Path) -> PathBuf {
    cache_dir.join(SOCKET_FILE)
}

/// The daemon's answer to `STATUS`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub version: String,
    /// "starting", "initialising modules", "running", "waiting", "paused: <reason>",
    /// "retrying transaction <id>: <error>", "stopping".
    pub state: String,
    /// Last transaction fully processed (and committed).
    pub processed_id: u64,
    /// Highest id the notifier reported to the daemon.
    pub notifier_id: u64,
    pub lag: u64,
    /// Unix time of the last change of `processed_id`.
    pub last_progress: Option<u64>,
    pub cache_entries: usize,
    pub failed_ldif: FailedLdif,
    /// Every module found: loaded ones in call order, then those that failed to load.
    pub modules: Vec<ModuleStatus>,
    /// The module call running now, if any.
    #[serde(default)]
    pub current_call: Option<CurrentCall>,
    /// Seconds after which a call that has not returned counts as blocked (the daemon's
    /// `--blocked-after`).
    #[serde(default)]
    pub blocked_after: f64,
    /// Transactions held back from the local notifier (`-o`) because a module's quarantine
    /// is not empty: the local LDAP lacks a change.
    #[serde(default)]
    pub cascade_held: Option<CascadeHeld>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CascadeHeld {
    pub transactions: u64,
    pub from_id: u64,
}

/// A module call in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurrentCall {
    pub module: String,
    /// "handler", "initialize", "prerun", ….
    pub function: String,
    /// The object of a handler call.
    pub dn: Option<String>,
    /// How long it has been running.
    pub seconds: f64,
    /// Running for `blocked_after` or longer: the listener is stuck in this module.
    pub blocked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedLdif {
    pub path: PathBuf,
    pub present: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleStatus {
    pub name: String,
    pub source: String,
    pub state: u32,
    pub ready: bool,
    pub calls: u64,
    pub failures: u64,
    pub seconds: f64,
    /// "ready", "failing", "unavailable", "not ready", "initialising",
    /// "initialisation failed" or "failed to load" ([`crate::dispatch::Condition`]); only "ready" is healthy.
    #[serde(default)]
    pub condition: String,
    /// Handler calls that failed since the last successful one.
    #[serde(default)]
    pub consecutive_failures: u64,
    /// Handler calls repeated after a transient failure.
    #[serde(default)]
    pub retries: u64,
    #[serde(default)]
    pub last_error: Option<ModuleError>,
    /// Failed initialisations since the last successful one.
    #[serde(default)]
    pub init_failures: u32,
    /// Unix time of the next initialisation attempt, after a failed one.
    #[serde(default)]
    pub next_init: Option<u64>,
    /// Changes held in the module's quarantine (refused by its target).
    #[serde(default)]
    pub quarantined: usize,
    /// The lasting problem the module reports.
    #[serde(default)]
    pub problem: Option<String>,
}

/// A module's most recent failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleError {
    /// What failed: "handler <dn>", "initialisation", "load", "postrun", ….
    pub call: String,
    pub message: String,
    /// Unix time.
    pub at: u64,
}

impl ModuleError {
    fn from_last(error: &LastError) -> ModuleError {
        ModuleError {
            call: error.call.clone(),
            message: error.message.clone(),
            at: daemon::time::unix_seconds(error.at),
        }
    }
}

impl ModuleStatus {
    fn from_stat(m: ModuleStat) -> ModuleStatus {
        ModuleStatus {
            ready: m.state & READY != 0,
            calls: m.stats.calls,
            failures: m.stats.failures,
            seconds: m.stats.busy.as_secs_f64(),
            condition: m.condition.as_str().to_owned(),
            consecutive_failures: m.stats.consecutive_failures,
            retries: m.stats.retries,
            last_error: m.stats.last_error.as_ref().map(ModuleError::from_last),
            init_failures: m.init_failures,
            next_init: m.next_init.map(daemon::time::unix_seconds),
            quarantined: m.quarantined,
            problem: m.problem,
            name: m.name,
            source: m.source,
            state: m.state,
        }
    }
}

/// The answer to `SNAPSHOT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub dir: PathBuf,
    pub notifier_id: u64,
    pub schema_id: u64,
    pub entries: usize,
    /// Module states copied, by name.
    pub modules: BTreeMap<String, u32>,
}

/// What the server reads to answer.
#[derive(Debug, Clone)]
pub struct Context {
    /// Where `MODULE` requests go: the main loop runs them between transactions.
    pub signals: Option<Arc<crate::signals::Signals>>,
    pub cache: Arc<Cache>,
    pub metrics: Arc<Metrics>,
    pub cache_dir: PathBuf,
    pub failed_ldif: PathBuf,
    /// A module call running this long is reported as blocked.
    pub blocked_after: Duration,
}

/// The bound socket; the file is removed when this is dropped (at exit).
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    listener: UnixListener,
    context: Arc<Context>,
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ControlServer {
    /// Binds `<cache_dir>/control.sock` (replacing a stale one: the caller holds
    /// `cache.lock`, so no other listener serves it), mode 0600.
    pub fn bind(context: Context) -> io::Result<ControlServer> {
        use std::os::unix::fs::PermissionsExt as _;
        let path = socket_path(&context.cache_dir);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(&path)?;
        let server = ControlServer {
            path,
            listener,
            context: Arc::new(context),
        };
        std::fs::set_permissions(&server.path, std::fs::Permissions::from_mode(0o600))?;
        Ok(server)
    }

    /// Serves requests until `shutdown`, then waits for the requests in progress.
    pub async fn serve(self, shutdown: CancellationToken) {
        let clients = TaskTracker::new();
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!("control socket: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let context = Arc::clone(&self.context);
            clients.spawn(async move {
                if let Err(e) = serve(stream, &context).await {
                    tracing::debug!("control socket client: {e}");
                }
            });
        }
        clients.close();
        clients.wait().await;
    }
}

async fn serve(stream: UnixStream, context: &Arc<Context>) -> io::Result<()> {
    // The socket's mode already keeps others out; the peer's uid guards the snapshot (a
    // copy of every cached object, password hashes included) even where the mode of the
    // socket or its directory was loosened.
    let peer_uid = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    let reply = match read_request(read).await? {
        Ok(request) => answer(request.trim_end_matches(['\n', '\r']), peer_uid, context).await,
        Err(reason) => Err(reason),
    };
    let reply = match reply {
        Ok(json) => format!("OK {json}\n"),
        Err(reason) => format!("ERROR {}\n", reason.replace('\n', " ")),
    };
    write.write_all(reply.as_bytes()).await?;
    write.shutdown().await
}

/// The request line, or the reason there is none to carry out: a cut-off request must
/// not run as if it were a shorter one.
async fn read_request(read: OwnedReadHalf) -> io::Result<Result<String, String>> {
    let mut line = Vec::new();
    let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST));
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Ok(result) => result?,
        Err(_) => {
            return Ok(Err(format!(
                "no request within {} s",
                REQUEST_TIMEOUT.as_secs()
            )));
        }
    };
    if !line.ends_with(b"\n") && line.len() as u64 >= MAX_REQUEST {
        return Ok(Err(format!("request longer than {MAX_REQUEST} bytes")));
    }
    Ok(String::from_utf8(line).map_err(|_| "request is not UTF-8".to_owned()))
}

async fn answer(request: &str, peer_uid: u32, context: &Arc<Context>) -> Result<String, String> {
    let (command, argument) = request.split_once(' ').unwrap_or((request, ""));
    match command {
        "STATUS" => to_json(&status(context)),
        "SNAPSHOT" if !may_snapshot(peer_uid) => {
            tracing::warn!("control socket: SNAPSHOT refused to uid {peer_uid}");
            Err(format!(
                "SNAPSHOT refused: uid {peer_uid} is neither root nor the listener's user"
            ))
        }
        "MODULE" if !may_snapshot(peer_uid) => Err(format!(
            "MODULE refused: uid {peer_uid} is neither root nor the listener's user"
        )),
        "MODULE" => {
            let mut words = argument.split_whitespace().map(str::to_owned);
            let Some(module) = words.next() else {
                return Err("MODULE needs a module name and a command".into());
            };
            let Some(signals) = &context.signals else {
                return Err("this listener takes no module commands".into());
            };
            // The answer is text of the module's choosing: one line on the wire.
            signals
                .ask_module(module, words.collect())
                .await
                .map(|text| text.replace('\n', " "))
        }
        "SNAPSHOT" => {
            let dir = PathBuf::from(argument);
            let context = Arc::clone(context);
            let info = tokio::task::spawn_blocking(move || snapshot(&context, &dir))
                .await
                .map_err(|e| format!("snapshot task failed: {e}"))??;
            to_json(&info)
        }
        _ => Err(format!(
            "unknown request {command:?}; known: STATUS, SNAPSHOT <dir>, MODULE <name> <command>"
        )),
    }
}

/// Root, or the user the daemon runs as.
fn may_snapshot(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

fn to_json<T: Serialize>(value: &T) -> Result<String, String> {
    serde_json::to_string(value).map_err(|e| e.to_string())
}

fn status(context: &Context) -> Status {
    let metrics = &context.metrics;
    Status {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        state: metrics.state(),
        processed_id: metrics.processed(),
        notifier_id: metrics.notifier_id().max(metrics.processed()),
        lag: metrics.lag(),
        last_progress: metrics.last_progress(),
        cache_entries: context.cache.len(),
        failed_ldif: FailedLdif {
            path: context.failed_ldif.clone(),
            present: context.failed_ldif.exists(),
        },
        modules: metrics
            .modules()
            .into_iter()
            .map(ModuleStatus::from_stat)
            .collect(),
        current_call: current_call(metrics).map(|call| {
            let running = call.started.elapsed();
            CurrentCall {
                module: call.module,
                function: call.function.to_owned(),
                dn: call.dn,
                seconds: running.as_secs_f64(),
                blocked: running >= context.blocked_after,
            }
        }),
        blocked_after: context.blocked_after.as_secs_f64(),
        cascade_held: metrics
            .cascade_held()
            .map(|(transactions, from_id)| CascadeHeld {
                transactions,
                from_id,
            }),
    }
}

/// The module call in progress: one through the handlers, else the import of a module
/// file (loading happens outside the handlers, at start and on SIGHUP, and a module can
/// hang there just as well).
fn current_call(metrics: &Metrics) -> Option<ActiveCall> {
    metrics.call_tracker().current().or_else(|| {
        PythonHost::current_call()
            .filter(|call| call.function == "import")
            .map(|call| ActiveCall {
                module: call.module.to_string(),
                function: call.function,
                dn: None,
                started: call.started,
            })
    })
}

fn snapshot(context: &Context, dir: &Path) -> Result<SnapshotInfo, String> {
    if !dir.is_absolute() {
        return Err(format!("SNAPSHOT needs an absolute directory, not {dir:?}"));
    }
    let exported = context
        .cache
        .export_to(dir)
        .map_err(|e| format!("cannot copy the cache: {e}"))?;
    let master = exported.master.unwrap_or_default();
    cache::write_legacy_notifier_id(dir, master.notifier_id)
        .map_err(|e| format!("cannot write {}/notifier_id: {e}", dir.display()))?;
    let modules = copy_states(&context.cache_dir.join(STATE_DIR), &dir.join(STATE_DIR))
        .map_err(|e| format!("cannot copy the module states: {e}"))?;
    tracing::info!(
        "snapshot of the cache at transaction {} written to {}",
        master.notifier_id,
        dir.display()
    );
    Ok(SnapshotInfo {
        dir: dir.to_owned(),
        notifier_id: master.notifier_id,
        schema_id: master.schema_id,
        entries: exported.entries,
        modules,
    })
}

/// Copies every readable module state file of `from` into `to` (created).
fn copy_states(from: &Path, to: &Path) -> io::Result<BTreeMap<String, u32>> {
    daemon::fs::create_private_dir(to)?;
    let states = read_states(from)?;
    for (name, state) in &states {
        write_state(to, name, *state)?;
    }
    Ok(states)
}

// ---- client side, for the tools ------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot connect to the listener's control socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the listener refused {request}: {reason}")]
    Refused { request: String, reason: String },
    #[error("unexpected reply from the listener to {request}: {reply:?}")]
    BadReply { request: String, reply: String },
}

/// Sends `request` (one line) to the listener serving `cache_dir` and returns the JSON of
/// its `OK` reply.
pub fn request(cache_dir: &Path, request: &str, timeout: Duration) -> Result<String, ControlError> {
    let path = socket_path(cache_dir);
    let io_error = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    let mut stream =
        std::os::unix::net::UnixStream::connect(&path).map_err(|source| ControlError::Connect {
            path: path.clone(),
            source,
        })?;
    stream.set_read_timeout(Some(timeout)).map_err(io_error)?;
    stream
        .set_write_timeout(Some(REQUEST_TIMEOUT))
        .map_err(io_error)?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(io_error)?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(io_error)?;
    let reply = reply.trim_end();
    if let Some(json) = reply.strip_prefix("OK ") {
        Ok(json.to_owned())
    } else if let Some(reason) = reply.strip_prefix("ERROR ") {
        Err(ControlError::Refused {
            request: request.to_owned(),
            reason: reason.to_owned(),
        })
    } else {
        Err(ControlError::BadReply {
            request: request.to_owned(),
            reply: reply.to_owned(),
        })
    }
}

fn parse<T: for<'de> Deserialize<'de>>(request: &str, json: &str) -> Result<T, ControlError> {
    serde_json::from_str(json).map_err(|e| ControlError::BadReply {
        request: request.to_owned(),
        reply: format!("{json} ({e})"),
    })
}

/// `STATUS` of the listener serving `cache_dir`.
pub fn status_of(cache_dir: &Path) -> Result<Status, ControlError> {
    let json = request(cache_dir, "STATUS", STATUS_TIMEOUT)?;
    parse("STATUS", &json)
}

/// `MODULE <name> <command…>` to the listener serving `cache_dir`: the module's answer.
pub fn module_command(
    cache_dir: &Path,
    module: &str,
    command: &[String],
) -> Result<String, ControlError> {
    let request_line = format!("MODULE {module} {}", command.join(" "));
    request(cache_dir, &request_line, MODULE_TIMEOUT)
}

/// `SNAPSHOT <dir>` of the listener serving `cache_dir`.
pub(crate) fn snapshot_of(cache_dir: &Path, dir: &Path) -> Result<SnapshotInfo, ControlError> {
    let request_line = format!("SNAPSHOT {}", dir.display());
    let json = request(cache_dir, &request_line, SNAPSHOT_TIMEOUT)?;
    parse(&request_line, &json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cache::{CacheEntry, MasterRecord};

    fn context(dir: &Path) -> Context {
        let cache_dir = dir.join("cache");
        let cache = Arc::new(Cache::open(&cache_dir).unwrap());
        let mut batch = cache.batch();
        batch.put(&CacheEntry {
            dn: "cn=a,dc=x".into(),
            attributes: vec![("cn".into(), vec![b"a".to_vec()])],
            modules: vec!["m".into()],
        });
        batch.set_master(MasterRecord {
            notifier_id: 9,
            schema_id: 2,
        });
        cache.commit(batch, true).unwrap();
        std::fs::create_dir_all(cache_dir.join(STATE_DIR)).unwrap();
        std::fs::write(cache_dir.join(STATE_DIR).join("m"), "3").unwrap();
        std::fs::write(cache_dir.join(STATE_DIR).join(".m.tmp"), "1").unwrap();
        let metrics = Arc::new(Metrics::default());
        metrics.set_processed(9);
        metrics.set_notifier_id(12);
        metrics.set_state("waiting");
        Context {
            signals: None,
            cache,
            metrics,
            cache_dir,
            failed_ldif: dir.join("failed.ldif"),
            blocked_after: Duration::from_secs(60),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn status_snapshot_and_errors_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let cache_dir = ctx.cache_dir.clone();
        // A stale socket file from a killed daemon is replaced.
        std::fs::write(socket_path(&cache_dir), "").unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(ControlServer::bind(ctx).unwrap().serve(shutdown.clone()));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(socket_path(&cache_dir))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let (status, snap_dir) = {
            let cache_dir = cache_dir.clone();
            let target = dir.path().join("snap");
            std::fs::create_dir(&target).unwrap();
            tokio::task::spawn_blocking(move || {
                let status = status_of(&cache_dir).unwrap();
                let info = snapshot_of(&cache_dir, &target).unwrap();
                assert_eq!(info.notifier_id, 9);
                assert_eq!(info.schema_id, 2);
                assert_eq!(info.entries, 1);
                assert_eq!(info.modules, BTreeMap::from([("m".to_owned(), 3)]));
                // Not empty any more, relative, unknown: refused with a reason.
                for bad in ["SNAPSHOT relative", "FROB"] {
                    let err = request(&cache_dir, bad, STATUS_TIMEOUT).unwrap_err();
                    assert!(matches!(err, ControlError::Refused { .. }), "{err}");
                }
                let err = snapshot_of(&cache_dir, &target).unwrap_err();
                assert!(err.to_string().contains("not empty"), "{err}");
                (status, target)
            })
            .await
            .unwrap()
        };
        assert_eq!(status.pid, std::process::id());
        assert_eq!(status.processed_id, 9);
        assert_eq!(status.notifier_id, 12);
        assert_eq!(status.lag, 3);
        assert_eq!(status.state, "waiting");
        assert_eq!(status.cache_entries, 1);
        assert!(!status.failed_ldif.present);
        assert!(status.last_progress.is_some());

        let copy = Cache::open(&snap_dir).unwrap();
        assert_eq!(copy.get("CN=A,DC=X").unwrap().unwrap().modules, ["m"]);
        assert_eq!(cache::read_legacy_notifier_id(&snap_dir), Some(9));
        assert_eq!(
            read_states(&snap_dir.join(STATE_DIR)).unwrap(),
            BTreeMap::from([("m".to_owned(), 3)])
        );

        shutdown.cancel();
        server.await.unwrap();
        assert!(!socket_path(&cache_dir).exists());
    }

    /// Sends `bytes` as they are (no newline added) and returns the whole reply.
    fn raw_request(cache_dir: &Path, bytes: &[u8]) -> String {
        use std::io::Read as _;
        let mut stream = std::os::unix::net::UnixStream::connect(socket_path(cache_dir)).unwrap();
        stream.set_read_timeout(Some(STATUS_TIMEOUT)).unwrap();
        stream.write_all(bytes).unwrap();
        let mut reply = String::new();
        // The server may reset the connection after its reply; what arrived counts.
        let _ = stream.read_to_string(&mut reply);
        reply
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_requests_are_refused_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let cache_dir = ctx.cache_dir.clone();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(ControlServer::bind(ctx).unwrap().serve(shutdown.clone()));
        tokio::task::spawn_blocking(move || {
            let limit = usize::try_from(MAX_REQUEST).unwrap();
            // As long as the limit without a newline: refused, not run cut off.
            let long = format!("STATUS{}", " ".repeat(limit - 6));
            assert_eq!(
                raw_request(&cache_dir, long.as_bytes()),
                format!("ERROR request longer than {MAX_REQUEST} bytes\n")
            );
            // One byte less leaves room for the newline: carried out.
            let fits = format!("STATUS{}\n", " ".repeat(limit - 7));
            assert!(raw_request(&cache_dir, fits.as_bytes()).starts_with("OK {"));
            assert_eq!(
                raw_request(&cache_dir, b"STATUS\xff\n"),
                "ERROR request is not UTF-8\n"
            );
            // A request that never ends waits out the timeout.
            assert_eq!(
                raw_request(&cache_dir, b"STAT"),
                format!("ERROR no request within {} s\n", REQUEST_TIMEOUT.as_secs())
            );
        })
        .await
        .unwrap();
        shutdown.cancel();
        server.await.unwrap();
    }

    #[test]
    fn a_call_running_past_the_threshold_is_blocked() {
        use std::time::Instant;

        let dir = tempfile::tempdir().unwrap();
        let mut ctx = context(dir.path());
        assert_eq!(status(&ctx).current_call, None);
        let tracker = ctx.metrics.call_tracker();
        tracker.set(Some(ActiveCall {
            module: "slow".into(),
            function: "handler",
            dn: Some("cn=x,dc=y".into()),
            started: Instant::now(),
        }));
        let call = status(&ctx).current_call.unwrap();
        assert_eq!(
            (
                call.module.as_str(),
                call.function.as_str(),
                call.dn.as_deref()
            ),
            ("slow", "handler", Some("cn=x,dc=y"))
        );
        assert!(!call.blocked, "{call:?}");
        ctx.blocked_after = Duration::ZERO;
        let status = status(&ctx);
        assert!(status.current_call.unwrap().blocked);
        assert_eq!(status.blocked_after, 0.0);
        tracker.set(None);
    }

    #[test]
    fn no_daemon_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            status_of(dir.path()),
            Err(ControlError::Connect { .. })
        ));
    }
}
