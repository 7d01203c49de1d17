//! A real `univention-directory-listener` under test: its own cache dir, `--ldap-dir`,
//! password file, UCR file and log, following a harness [`Notifier`] and reading a harness
//! [`Slapd`], plus a reader for the handler calls the native `jsonl` module records.
//!
//! The `jsonl` module appends one JSON object per handler call:
//! `{"time":"…","id":N,"module":"jsonl","command":"a","dn":"…","old":{…},"new":{…}}` with
//! every attribute mapped to a list of values, each a JSON string when it is UTF-8 and
//! `{"base64":"…"}` otherwise; a missing side is `{}`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;
use tempfile::TempDir;

use crate::directory::texts;
use crate::notifier::Notifier;
use crate::process::Process;
use crate::slapd::{ADMIN_DN, ADMIN_PW, BASE, HOST_DN, HOST_PW, Slapd};
use crate::wait::wait_until;
use crate::{HarnessError, Result, io_context};

pub const LISTENER: &str = "univention-directory-listener";
/// The name the default native module records its handler calls under.
pub const JSONL_MODULE: &str = "jsonl";
/// The handler state (`<cache>/handlers/<module>`) of an initialised module.
pub const HANDLER_READY: u32 = 3;
/// How long a SIGTERM'd listener may take to run postrun and exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Log lines quoted in error messages: enough for the last few transactions.
const LOG_TAIL_LINES: usize = 40;

/// The identity the listener binds to LDAP with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BindAs {
    /// The machine account, as on a UCS replica ([`HOST_DN`]); it cannot see the
    /// restricted subtree.
    #[default]
    Host,
    /// The rootdn of the main database ([`ADMIN_DN`]).
    Admin,
}

/// A directory for `-m` holding the Python module `file` with `source`; readable by a
/// listener that runs with another effective uid.
pub fn module_dir(file: &str, source: &str) -> Result<TempDir> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().map_err(io_context("creating a module directory"))?;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777))
        .map_err(io_context("opening the module directory to the listener"))?;
    fs::write(dir.path().join(file), source).map_err(io_context("writing a module"))?;
    Ok(dir)
}

/// How a listener is started; every setter consumes and returns the options.
#[derive(Debug, Clone)]
pub struct ListenerOptions {
    bind: BindAs,
    protocol: u32,
    jsonl: bool,
    native_modules: Vec<String>,
    module_dirs: Vec<PathBuf>,
    extra_args: Vec<String>,
    ucr: String,
    postrun_delay: Duration,
    /// Environment changes for the daemon: `(key, Some(value))` sets, `(key, None)` removes.
    env: Vec<(String, Option<String>)>,
    /// SASL EXTERNAL over ldapi instead of a simple bind (see
    /// [`ListenerOptions::sasl_external_ldapi`]).
    sasl_external_ldapi: bool,
    /// `-l` elsewhere than the listener's own directory (a notifier's, for `-o`).
    ldap_dir: Option<PathBuf>,
}

impl Default for ListenerOptions {
    fn default() -> ListenerOptions {
        ListenerOptions {
            bind: BindAs::Host,
            protocol: 3,
            jsonl: true,
            native_modules: Vec::new(),
            module_dirs: Vec::new(),
            extra_args: Vec::new(),
            ucr: format!("ldap/base: {BASE}\n"),
            // Short, so tests see postrun soon; the daemon default (15 s) would dominate.
            postrun_delay: Duration::from_secs(1),
            env: Vec::new(),
            sasl_external_ldapi: false,
            ldap_dir: None,
        }
    }
}

impl ListenerOptions {
    /// Host account, protocol 3, the `jsonl` module writing into the listener directory.
    pub fn new() -> ListenerOptions {
        ListenerOptions::default()
    }

    pub fn bind_as(mut self, bind: BindAs) -> ListenerOptions {
        self.bind = bind;
        self
    }

    /// Binds as the rootdn instead of the host account.
    pub fn bind_admin(self) -> ListenerOptions {
        self.bind_as(BindAs::Admin)
    }

    /// Notifier protocol version (`--protocol`, 2 or 3).
    pub fn protocol(mut self, version: u32) -> ListenerOptions {
        self.protocol = version;
        self
    }

    /// Whether the default `--native-module jsonl=<dir>/changes.jsonl` is passed.
    pub fn jsonl(mut self, on: bool) -> ListenerOptions {
        self.jsonl = on;
        self
    }

    /// Another `--native-module` spec, e.g. `exec=/path/cmd`, after the jsonl one.
    pub fn native_module(mut self, spec: impl Into<String>) -> ListenerOptions {
        self.native_modules.push(spec.into());
        self
    }

    /// A Python module directory (`-m`); may be given several times.
    pub fn module_dir(mut self, dir: impl Into<PathBuf>) -> ListenerOptions {
        self.module_dirs.push(dir.into());
        self
    }

    /// An argument appended after all others.
    pub fn arg(mut self, arg: impl Into<String>) -> ListenerOptions {
        self.extra_args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> ListenerOptions
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The whole text of the UCR file (`--ucr-file`, `key: value` lines as in
    /// `base.conf`).
    pub fn ucr(mut self, text: impl Into<String>) -> ListenerOptions {
        self.ucr = text.into();
        self
    }

    /// `--postrun-delay`; whole seconds are passed as an integer.
    /// Cascade output (`-o`) into `notifier`'s queue file: `-l` is its `--ldap-dir`, as on
    /// a UCS Backup where both use `/var/lib/univention-ldap`.
    pub fn cascade_into(mut self, notifier: &Notifier) -> ListenerOptions {
        self.ldap_dir = Some(notifier.ldap_dir());
        self.extra_args.push("-o".into());
        self
    }

    pub fn postrun_delay(mut self, delay: Duration) -> ListenerOptions {
        self.postrun_delay = delay;
        self
    }
}

/// A listener with its own directory: `cache/`, `ldap/` (with `listener/` and
/// `schema/id/`), `bind.secret`, `base.conf`, `failed.ldif`, `changes.jsonl` and
/// `listener.log`. Killed on drop; the directory is removed unless the test panicked.
pub struct Listener {
    dir: Option<TempDir>,
    path: PathBuf,
    ldap_dir: PathBuf,
    args: Vec<String>,
    jsonl: bool,
    /// Environment changes applied to every process started (see [`ListenerOptions::env`]).
    env: Vec<(String, Option<String>)>,
    process: Option<Process>,
    /// Numbers the logs of [`Listener::run_once`] runs.
    runs: u32,
}

impl Listener {
    /// Prepares the directories and starts the listener as a daemon (`-F`).
    pub fn start(slapd: &Slapd, notifier: &Notifier, options: ListenerOptions) -> Result<Listener> {
        let mut listener = Listener::prepare(slapd, notifier, options)?;
        listener.spawn()?;
        Ok(listener)
    }

    /// Prepares the directories and the command line without starting anything, for tests
    /// that first run [`Listener::run_once`] (`-i`, `-P`) or seed the cache.
    pub fn prepare(
        slapd: &Slapd,
        notifier: &Notifier,
        options: ListenerOptions,
    ) -> Result<Listener> {
        let dir = tempfile::Builder::new()
            .prefix("listener-")
            .tempdir_in("/tmp")
            .map_err(io_context("creating the listener directory"))?;
        let path = dir.path().to_path_buf();
        let ldap_dir = options
            .ldap_dir
            .clone()
            .unwrap_or_else(|| path.join("ldap"));
        for sub in [
            path.join("cache"),
            ldap_dir.join("listener"),
            ldap_dir.join("schema/id"),
        ] {
            fs::create_dir_all(&sub).map_err(io_context(format!("creating {}", sub.display())))?;
        }
        let (bind_dn, password) = match options.bind {
            BindAs::Host => (HOST_DN, HOST_PW),
            BindAs::Admin => (ADMIN_DN, ADMIN_PW),
        };
        let password_file = path.join("bind.secret");
        // Like /etc/machine.secret: private to the owner, no trailing newline.
        fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&password_file)
            .and_then(|mut file| file.write_all(password.as_bytes()))
            .map_err(io_context("writing the password file"))?;
        let ucr_file = path.join("base.conf");
        fs::write(&ucr_file, &options.ucr).map_err(io_context("writing the UCR file"))?;

        let mut args: Vec<String> = vec![
            "-F".into(),
            "-d".into(),
            "4".into(),
            "-x".into(),
            "-H".into(),
            slapd.ldap_url(),
            "-h".into(),
            "127.0.0.1".into(),
            "--notifier-port".into(),
            notifier.port().to_string(),
            "-b".into(),
            BASE.into(),
            "-D".into(),
            bind_dn.into(),
            "-y".into(),
            password_file.display().to_string(),
            "-c".into(),
            path.join("cache").display().to_string(),
            "-l".into(),
            ldap_dir.display().to_string(),
            "--ucr-file".into(),
            ucr_file.display().to_string(),
            "--failed-ldif".into(),
            path.join("failed.ldif").display().to_string(),
            "--postrun-delay".into(),
            seconds_arg(options.postrun_delay),
            "--protocol".into(),
            options.protocol.to_string(),
        ];
        if options.jsonl {
            args.extend([
                "--native-module".into(),
                format!("{JSONL_MODULE}={}", path.join("changes.jsonl").display()),
            ]);
        }
        for spec in options.native_modules {
            args.extend(["--native-module".into(), spec]);
        }
        for dir in &options.module_dirs {
            args.extend(["-m".into(), dir.display().to_string()]);
        }
        if options.sasl_external_ldapi {
            use_sasl_external_ldapi(&mut args, &slapd.ldapi_url());
        }
        args.extend(options.extra_args);
        Ok(Listener {
            dir: Some(dir),
            path,
            ldap_dir,
            args,
            jsonl: options.jsonl,
            env: options.env,
            process: None,
            runs: 0,
        })
    }

    fn spawn(&mut self) -> Result<()> {
        let process = Process::spawn_with_env(LISTENER, &self.args, &self.env, &self.log_path())?;
        self.process = Some(process);
        Ok(())
    }

    /// Runs a second process with the daemon's arguments plus `extra` (e.g. `-i`, `-P`,
    /// `-g`) until it exits, and returns its status and its own log. Meant for while the
    /// daemon is stopped; with the daemon running the two contend for `cache.lock`, which
    /// is itself worth testing. Killed after `timeout`.
    pub fn run_once(&mut self, extra: &[&str], timeout: Duration) -> Result<(ExitStatus, String)> {
        self.runs += 1;
        let log_path = self.path.join(format!("run-{}.log", self.runs));
        let mut args = self.args.clone();
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let mut process = Process::spawn_with_env(LISTENER, &args, &self.env, &log_path)?;
        match process.wait_exit(timeout)? {
            Some(status) => Ok((status, process.log())),
            None => {
                process.kill()?;
                Err(HarnessError::Timeout {
                    what: format!(
                        "`{LISTENER} {}` to exit; its log ({}) ends:\n{}",
                        extra.join(" "),
                        log_path.display(),
                        tail(&process.log(), LOG_TAIL_LINES)
                    ),
                    seconds: timeout.as_secs_f64(),
                })
            }
        }
    }

    /// SIGTERM and waits for the exit (the listener runs postrun first). A listener that
    /// already exited by itself just reports its status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let mut process = self
            .process
            .take()
            .ok_or_else(|| HarnessError::Listener("stop: the listener is not running".into()))?;
        if let Some(status) = process.try_status() {
            return Ok(status);
        }
        match process.terminate(STOP_TIMEOUT)? {
            Some(status) => Ok(status),
            None => Err(HarnessError::Timeout {
                what: format!(
                    "the listener to exit after SIGTERM (it was killed); log ends:\n{}",
                    self.log_tail(LOG_TAIL_LINES)
                ),
                seconds: STOP_TIMEOUT.as_secs_f64(),
            }),
        }
    }

    /// SIGKILL: a crash at an arbitrary point.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut process) = self.process.take() {
            process.kill()?;
        }
        Ok(())
    }

    /// Points the listener at another LDAP server and notifier (a promoted Backup), as the
    /// UCR variables `ldap/master` and `notifier/server` would: the next (re)start uses
    /// them; the cache and module states stay.
    pub fn repoint(&mut self, slapd: &Slapd, notifier: &Notifier) {
        let mut args = self.args.iter_mut();
        while let Some(arg) = args.next() {
            let value = match arg.as_str() {
                "-H" => slapd.ldap_url(),
                "--notifier-port" => notifier.port().to_string(),
                _ => continue,
            };
            if let Some(next) = args.next() {
                *next = value;
            }
        }
    }

    /// Starts the daemon again with the same arguments and directories; a running one is
    /// stopped first.
    pub fn restart(&mut self) -> Result<()> {
        if self.is_running() {
            self.stop()?;
        }
        // An exited process is only reaped and forgotten.
        self.process = None;
        self.spawn()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(Process::is_running)
    }

    /// Waits for the daemon to exit by itself (e.g. because a module asked it to) and
    /// returns its status; [`Listener::restart`] starts it again.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let process = self.process.as_mut().ok_or_else(|| {
            HarnessError::Listener("wait_exit: the listener is not running".into())
        })?;
        match process.wait_exit(timeout)? {
            Some(status) => {
                self.process = None;
                Ok(status)
            }
            None => Err(HarnessError::Timeout {
                what: format!(
                    "the listener to exit by itself; log ends:\n{}",
                    self.log_tail(LOG_TAIL_LINES)
                ),
                seconds: timeout.as_secs_f64(),
            }),
        }
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the daemon.
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.process
            .as_ref()
            .ok_or_else(|| HarnessError::Listener("signal: the listener is not running".into()))?
            .signal(signal)
    }

    pub fn process(&mut self) -> Option<&mut Process> {
        self.process.as_mut()
    }

    /// The daemon's command line (without the binary).
    pub fn args(&self) -> &[String] {
        &self.args
    }

    pub fn dir(&self) -> &Path {
        &self.path
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.path.join("cache")
    }

    pub fn ldap_dir(&self) -> PathBuf {
        self.ldap_dir.clone()
    }

    pub fn ucr_file(&self) -> PathBuf {
        self.path.join("base.conf")
    }

    pub fn password_file(&self) -> PathBuf {
        self.path.join("bind.secret")
    }

    pub fn failed_ldif_path(&self) -> PathBuf {
        self.path.join("failed.ldif")
    }

    /// Where the default `jsonl` module writes (even when it is disabled).
    pub fn jsonl_path(&self) -> PathBuf {
        self.path.join("changes.jsonl")
    }

    /// The daemon's log (all starts appended); [`Listener::run_once`] runs log elsewhere.
    pub fn log_path(&self) -> PathBuf {
        self.path.join("listener.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last `lines` lines of the daemon's log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log(), lines)
    }

    /// Fails the test, showing the log's end, if the daemon ever logged `text`.
    pub fn assert_log_lacks(&self, text: &str) {
        assert!(
            !self.log().contains(text),
            "logged {text:?}:\n{}",
            self.log_tail(40)
        );
    }

    /// The last processed transaction (`<cache>/notifier_id`); `None` when the file is
    /// missing or does not hold a number.
    pub fn notifier_id(&self) -> Option<u64> {
        read_number(&self.cache_dir().join("notifier_id"))
    }

    /// A module's state (`<cache>/handlers/<name>`); [`HANDLER_READY`] when initialised.
    pub fn handler_state(&self, name: &str) -> Option<u32> {
        read_number(&self.cache_dir().join("handlers").join(name))
    }

    /// Every module's state from `<cache>/handlers/`, by module name; files that do not
    /// hold a number are left out.
    pub fn handler_states(&self) -> BTreeMap<String, u32> {
        let Ok(entries) = fs::read_dir(self.cache_dir().join("handlers")) else {
            return BTreeMap::new();
        };
        entries
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                read_number(&entry.path()).map(|state| (name, state))
            })
            .collect()
    }

    /// Waits until the listener has processed transaction `id`; returns the id it is at.
    /// Fails at once if the daemon exits.
    pub fn wait_for_id(&mut self, id: u64, timeout: Duration) -> Result<u64> {
        let what = format!("the listener to process transaction {id}");
        self.wait_for(&what, timeout, |listener| {
            Ok(listener.notifier_id().filter(|&at| at >= id))
        })
    }

    /// Waits for the end of the initial sync: `notifier_id` written and, with the default
    /// jsonl module, that module's handler state [`HANDLER_READY`].
    pub fn wait_initialized(&mut self, timeout: Duration) -> Result<u64> {
        let jsonl = self.jsonl;
        self.wait_for("the listener's initial sync", timeout, |listener| {
            let ready = !jsonl || listener.handler_state(JSONL_MODULE) == Some(HANDLER_READY);
            Ok(listener.notifier_id().filter(|_| ready))
        })
    }

    /// Waits until every module in `names` has finished its initialisation pass (state
    /// file at READY). `wait_initialized` looks at the jsonl module only; modules after it
    /// in call order run their passes later, and writes made in between would land in
    /// their passes instead of as changes. Fails at once if the daemon exits.
    pub fn wait_modules_ready(&mut self, names: &[&str], timeout: Duration) -> Result<()> {
        let what = format!("modules {} initialised", names.join(", "));
        self.wait_for(&what, timeout, |listener| {
            Ok(names
                .iter()
                .all(|name| listener.handler_state(name) == Some(HANDLER_READY))
                .then_some(()))
        })
    }

    /// Every handler call recorded by the `jsonl` module so far.
    pub fn changes(&self) -> Result<Vec<Change>> {
        match fs::read(self.jsonl_path()) {
            Ok(bytes) => parse_changes(&bytes),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(err) => Err(io_context("reading the jsonl file")(err)),
        }
    }

    /// Waits until at least `count` handler calls are recorded and returns all of them.
    /// Fails at once if the daemon exits.
    pub fn wait_for_changes(&mut self, count: usize, timeout: Duration) -> Result<Vec<Change>> {
        let what = format!("{count} handler calls in the jsonl file");
        self.wait_for(&what, timeout, |listener| {
            let changes = listener.changes()?;
            Ok((changes.len() >= count).then_some(changes))
        })
    }

    /// A reader that returns each handler call in the jsonl file once, from the file's
    /// start on.
    pub fn tail(&self) -> JsonlTail {
        JsonlTail::new(self.jsonl_path())
    }

    /// Keeps the directory after the listener is dropped (for diagnosis outside a panic)
    /// and returns where it is.
    pub fn keep_dir(&mut self) -> PathBuf {
        if let Some(dir) = self.dir.take() {
            let _ = dir.keep();
        }
        self.path.clone()
    }

    /// [`wait_until`] that also fails when the daemon is gone, and quotes the log tail on
    /// timeout: a listener that died or is stuck is diagnosed from its log.
    fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Listener) -> Result<Option<T>>,
    ) -> Result<T> {
        let result = wait_until(what, timeout, || {
            if let Some(value) = check(self)? {
                return Ok(Some(value));
            }
            let exited = match self.process.as_mut() {
                Some(process) => process.try_status(),
                None => None,
            };
            match exited {
                Some(status) => Err(HarnessError::Listener(format!(
                    "exited with {status} while waiting for {what}; log ends:\n{}",
                    self.log_tail(LOG_TAIL_LINES)
                ))),
                None => Ok(None),
            }
        });
        result.map_err(|err| match err {
            HarnessError::Timeout { what, seconds } => HarnessError::Timeout {
                what: format!(
                    "{what} (last processed id {}); listener log ({}) ends:\n{}",
                    self.notifier_id()
                        .map_or_else(|| "none".to_owned(), |id| id.to_string()),
                    self.log_path().display(),
                    self.log_tail(LOG_TAIL_LINES)
                ),
                seconds,
            },
            other => other,
        })
    }

    /// Public form of the daemon-aware wait: polls `check` until it yields a value, fails
    /// at once if the daemon exits and quotes the log tail on timeout.
    pub fn wait_until<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        check: impl FnMut(&Listener) -> Result<Option<T>>,
    ) -> Result<T> {
        self.wait_for(what, timeout, check)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
        }
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!(
                "test failed: listener directory kept at {} (cache/, listener.log, changes.jsonl)",
                kept.display()
            );
        }
    }
}

/// Prepares a fresh listener directory, runs the listener until it exits and returns its
/// status and log; the directory is removed afterwards. The mode comes with the options,
/// e.g. `ListenerOptions::new().arg("-i")`. To look at the cache afterwards use
/// [`Listener::prepare`] and [`Listener::run_once`] instead.
pub fn run_to_exit(
    slapd: &Slapd,
    notifier: &Notifier,
    options: ListenerOptions,
    timeout: Duration,
) -> Result<(ExitStatus, String)> {
    Listener::prepare(slapd, notifier, options)?.run_once(&[], timeout)
}

/// One handler call as recorded by the `jsonl` module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub time: String,
    /// The transaction (notifier id) the call belongs to.
    pub id: u64,
    pub module: String,
    /// `a`, `m`, `d`, `r`, … as passed to the handler.
    pub command: char,
    pub dn: String,
    pub old: BTreeMap<String, Vec<Vec<u8>>>,
    pub new: BTreeMap<String, Vec<Vec<u8>>>,
}

/// A line as written; values are decoded into [`Change`] afterwards.
#[derive(Deserialize)]
struct RawChange {
    #[serde(default)]
    time: String,
    id: u64,
    module: String,
    command: String,
    dn: String,
    #[serde(default)]
    old: Option<BTreeMap<String, Vec<RawValue>>>,
    #[serde(default)]
    new: Option<BTreeMap<String, Vec<RawValue>>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawValue {
    Text(String),
    Binary { base64: String },
}

fn decode_side(
    side: Option<BTreeMap<String, Vec<RawValue>>>,
) -> Result<BTreeMap<String, Vec<Vec<u8>>>, String> {
    side.unwrap_or_default()
        .into_iter()
        .map(|(attr, values)| {
            let values = values
                .into_iter()
                .map(|value| match value {
                    RawValue::Text(text) => Ok(text.into_bytes()),
                    RawValue::Binary { base64 } => BASE64
                        .decode(base64.as_bytes())
                        .map_err(|err| format!("bad base64 value of {attr}: {err}")),
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok((attr, values))
        })
        .collect()
}

/// The values of `attr`, by exact name or else ignoring ASCII case (LDAP attribute names
/// are case-insensitive, and servers spell them as defined in the schema).
fn lookup<'a>(side: &'a BTreeMap<String, Vec<Vec<u8>>>, attr: &str) -> Option<&'a Vec<Vec<u8>>> {
    side.get(attr).or_else(|| {
        side.iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(attr))
            .map(|(_, values)| values)
    })
}

impl Change {
    /// Parses one line of the jsonl file.
    pub fn from_json_line(line: &str) -> Result<Change> {
        let bad = |why: String| HarnessError::Listener(format!("bad jsonl line {line:?}: {why}"));
        let raw: RawChange = serde_json::from_str(line).map_err(|err| bad(err.to_string()))?;
        let mut chars = raw.command.chars();
        let command = match (chars.next(), chars.next()) {
            (Some(command), None) => command,
            _ => return Err(bad(format!("command {:?} is not one letter", raw.command))),
        };
        Ok(Change {
            time: raw.time,
            id: raw.id,
            module: raw.module,
            command,
            dn: raw.dn,
            old: decode_side(raw.old).map_err(bad)?,
            new: decode_side(raw.new).map_err(bad)?,
        })
    }

    /// The first new value of `attr` as text (invalid UTF-8 replaced).
    pub fn new_first(&self, attr: &str) -> Option<String> {
        self.new_values(attr).into_iter().next()
    }

    /// The first old value of `attr` as text (invalid UTF-8 replaced).
    pub fn old_first(&self, attr: &str) -> Option<String> {
        self.old_values(attr).into_iter().next()
    }

    /// All new values of `attr` as text (invalid UTF-8 replaced).
    pub fn new_values(&self, attr: &str) -> Vec<String> {
        texts(lookup(&self.new, attr))
    }

    /// All old values of `attr` as text (invalid UTF-8 replaced).
    pub fn old_values(&self, attr: &str) -> Vec<String> {
        texts(lookup(&self.old, attr))
    }

    /// The new values of `attr` as bytes.
    pub fn new_bytes(&self, attr: &str) -> Option<&Vec<Vec<u8>>> {
        lookup(&self.new, attr)
    }

    /// The old values of `attr` as bytes.
    pub fn old_bytes(&self, attr: &str) -> Option<&Vec<Vec<u8>>> {
        lookup(&self.old, attr)
    }

    /// Attributes whose values differ between old and new (added, removed or changed),
    /// sorted by name.
    pub fn changed_attributes(&self) -> Vec<String> {
        let mut names: Vec<&String> = self.old.keys().chain(self.new.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter(|name| self.old.get(*name) != self.new.get(*name))
            .cloned()
            .collect()
    }

    /// `"<command> <dn>"`, e.g. `"a cn=x,dc=example,dc=com"`, for compact assertions.
    pub fn summary(&self) -> String {
        format!("{} {}", self.command, self.dn)
    }
}

/// Parses the jsonl file's contents. An unterminated last line is what a reader sees
/// while the module is still writing it: it is used if it parses and ignored otherwise.
/// Every terminated line must parse.
pub fn parse_changes(bytes: &[u8]) -> Result<Vec<Change>> {
    let (complete, partial) = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(end) => bytes.split_at(end + 1),
        None => (&[][..], bytes),
    };
    let mut changes = parse_complete_lines(complete)?;
    if let Ok(line) = std::str::from_utf8(partial)
        && !line.trim().is_empty()
        && let Ok(change) = Change::from_json_line(line)
    {
        changes.push(change);
    }
    Ok(changes)
}

/// Parses newline-terminated lines, skipping blank ones.
fn parse_complete_lines(bytes: &[u8]) -> Result<Vec<Change>> {
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.trim_ascii().is_empty())
        .map(|(index, line)| {
            let line = std::str::from_utf8(line).map_err(|err| {
                HarnessError::Listener(format!("jsonl line {} is not UTF-8: {err}", index + 1))
            })?;
            Change::from_json_line(line)
        })
        .collect()
}

/// Follows a jsonl file: each [`JsonlTail::poll`] returns the handler calls on lines
/// completed since the previous one.
#[derive(Debug, Clone)]
pub struct JsonlTail {
    path: PathBuf,
    offset: u64,
}

impl JsonlTail {
    pub fn new(path: impl Into<PathBuf>) -> JsonlTail {
        JsonlTail {
            path: path.into(),
            offset: 0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The newly completed lines, parsed; a line still being written waits for the next
    /// poll. A file that shrank (recreated by a reinitialisation) is read from its start.
    pub fn poll(&mut self) -> Result<Vec<Change>> {
        let mut file = match File::open(&self.path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(io_context("opening the jsonl file")(err)),
        };
        let len = file
            .metadata()
            .map_err(io_context("reading the jsonl file's size"))?
            .len();
        if len < self.offset {
            self.offset = 0;
        }
        file.seek(SeekFrom::Start(self.offset))
            .map_err(io_context("seeking in the jsonl file"))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(io_context("reading the jsonl file"))?;
        let Some(end) = bytes.iter().rposition(|&b| b == b'\n') else {
            return Ok(Vec::new());
        };
        let changes = parse_complete_lines(&bytes[..=end])?;
        self.offset += u64::try_from(end + 1)
            .map_err(|_| HarnessError::Listener("jsonl file offset overflow".into()))?;
        Ok(changes)
    }
}

fn read_number<T: std::str::FromStr>(path: &Path) -> Option<T> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn seconds_arg(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        duration.as_secs().to_string()
    } else {
        duration.as_secs_f64().to_string()
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// LDAP connection options of the listener under test.
impl ListenerOptions {
    /// Sets `key` to `value` in the daemon's environment (e.g. `SSL_CERT_FILE`, which
    /// OpenSSL reads for its default trust store); also for [`Listener::run_once`] runs.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> ListenerOptions {
        self.env.push((key.into(), Some(value.into())));
        self
    }

    /// Removes `key` from the daemon's environment (which otherwise inherits the test's).
    pub fn env_remove(mut self, key: impl Into<String>) -> ListenerOptions {
        self.env.push((key.into(), None));
        self
    }

    /// SASL EXTERNAL over the slapd's ldapi socket, the mechanism the listener uses without
    /// `-x`: `-H <ldapi URL> --notifier-host 127.0.0.1` replace `-x -H <ldap URL> -h
    /// 127.0.0.1 -D <dn> -y <file>` (an ldapi URI names no host for the notifier). slapd
    /// maps the identity to the process's uid: root sees everything. `bind_as` is ignored;
    /// the password file is still written.
    pub fn sasl_external_ldapi(mut self) -> ListenerOptions {
        self.sasl_external_ldapi = true;
        self
    }
}

/// Rewrites the harness's simple-bind command line for SASL EXTERNAL over `ldapi_url`.
fn use_sasl_external_ldapi(args: &mut Vec<String>, ldapi_url: &str) {
    let mut rewritten = Vec::with_capacity(args.len());
    let mut iter = std::mem::take(args).into_iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "-x" => {}
            "-D" | "-y" => {
                iter.next();
            }
            "-H" => {
                iter.next();
                rewritten.extend(["-H".to_owned(), ldapi_url.to_owned()]);
            }
            "-h" => {
                let host = iter.next().unwrap_or_default();
                rewritten.extend(["--notifier-host".to_owned(), host]);
            }
            _ => rewritten.push(arg),
        }
    }
    *args = rewritten;
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADD: &str = r#"{"time":"2024-05-01T10:00:00Z","id":7,"module":"jsonl","command":"a","dn":"cn=x,dc=example,dc=com","old":{},"new":{"cn":["x"],"objectClass":["top","organizationalRole"],"jpegPhoto":[{"base64":"/9j/AA=="}]}}"#;
    const MODIFY: &str = r#"{"time":"2024-05-01T10:00:01Z","id":8,"module":"jsonl","command":"m","dn":"cn=x,dc=example,dc=com","old":{"cn":["x"],"description":["old"]},"new":{"cn":["x"],"description":["new"],"mail":["x@example.com"]}}"#;

    #[test]
    fn parses_lines_with_text_and_base64_values() {
        let text = format!("{ADD}\n{MODIFY}\n");
        let changes = parse_changes(text.as_bytes()).unwrap();
        assert_eq!(changes.len(), 2);
        let add = &changes[0];
        assert_eq!(add.id, 7);
        assert_eq!(add.module, "jsonl");
        assert_eq!(add.command, 'a');
        assert_eq!(add.summary(), "a cn=x,dc=example,dc=com");
        assert!(add.old.is_empty());
        assert_eq!(add.new_first("cn").as_deref(), Some("x"));
        assert_eq!(add.new_values("objectclass"), ["top", "organizationalRole"]);
        assert_eq!(
            add.new_bytes("jpegPhoto").unwrap(),
            &vec![vec![0xff, 0xd8, 0xff, 0x00]]
        );
        let modify = &changes[1];
        assert_eq!(modify.old_first("description").as_deref(), Some("old"));
        assert_eq!(modify.new_first("description").as_deref(), Some("new"));
        assert_eq!(modify.old_first("mail"), None);
        assert_eq!(modify.changed_attributes(), ["description", "mail"]);
    }

    #[test]
    fn ignores_a_truncated_last_line() {
        let text = format!("{ADD}\n{}", &MODIFY[..MODIFY.len() / 2]);
        let changes = parse_changes(text.as_bytes()).unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].id, 7);
    }

    #[test]
    fn truncation_inside_a_multibyte_character_is_ignored_too() {
        let line = r#"{"time":"","id":1,"module":"jsonl","command":"a","dn":"cn=Jürgen,dc=example,dc=com","old":{},"new":{}}"#;
        let cut = line.find('ü').unwrap() + 1;
        let mut bytes = format!("{ADD}\n").into_bytes();
        bytes.extend_from_slice(&line.as_bytes()[..cut]);
        assert_eq!(parse_changes(&bytes).unwrap().len(), 1);
    }

    #[test]
    fn an_unterminated_but_complete_last_line_counts() {
        let text = format!("{ADD}\n{MODIFY}");
        assert_eq!(parse_changes(text.as_bytes()).unwrap().len(), 2);
    }

    #[test]
    fn a_bad_terminated_line_is_an_error() {
        let text = format!("{{\"id\":\n{ADD}\n");
        assert!(parse_changes(text.as_bytes()).is_err());
        let bad_base64 = ADD.replace("/9j/AA==", "%%%");
        assert!(parse_changes(format!("{bad_base64}\n").as_bytes()).is_err());
        let long_command = ADD.replace(r#""command":"a""#, r#""command":"add""#);
        assert!(parse_changes(format!("{long_command}\n").as_bytes()).is_err());
    }

    #[test]
    fn missing_or_null_sides_are_empty() {
        let line = r#"{"id":3,"module":"jsonl","command":"d","dn":"cn=y,dc=example,dc=com","old":{"cn":["y"]},"new":null}"#;
        let change = Change::from_json_line(line).unwrap();
        assert!(change.new.is_empty());
        assert_eq!(change.old_first("CN").as_deref(), Some("y"));
        assert_eq!(change.time, "");
    }

    #[test]
    fn tail_returns_only_completed_lines_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("changes.jsonl");
        let mut tail = JsonlTail::new(&path);
        assert!(tail.poll().unwrap().is_empty(), "missing file");
        fs::write(&path, format!("{ADD}\n{}", &MODIFY[..10])).unwrap();
        let first = tail.poll().unwrap();
        assert_eq!(first.len(), 1);
        assert!(tail.poll().unwrap().is_empty());
        fs::write(&path, format!("{ADD}\n{MODIFY}\n")).unwrap();
        let second = tail.poll().unwrap();
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].command, 'm');
        // Truncated (a reinitialisation recreating it): read again from the start.
        fs::write(&path, "").unwrap();
        assert!(tail.poll().unwrap().is_empty());
        fs::write(&path, format!("{MODIFY}\n")).unwrap();
        assert_eq!(tail.poll().unwrap().len(), 1);
    }

    #[test]
    fn whole_seconds_are_passed_as_integers() {
        assert_eq!(seconds_arg(Duration::from_secs(1)), "1");
        assert_eq!(seconds_arg(Duration::from_millis(500)), "0.5");
    }
}
