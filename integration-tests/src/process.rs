//! The project's real binaries as child processes, with their output in a log file.

use std::fs::{self, File};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{HarnessError, Result, io_context};

/// Environment variable naming the directory the project's binaries are taken from.
pub const BIN_DIR_ENV: &str = "UDR_BIN_DIR";

/// Path of a workspace binary in the cargo target directory (e.g. `target/debug`).
///
/// Test executables live in `target/debug/deps`, so the binaries are one level up; a
/// workspace binary that starts others (the demo runner) lives in `target/debug` itself.
/// The executable's own directory is tried first, then its parent. `scripts/test.sh`
/// builds all binaries before the tests run.
///
/// With [`BIN_DIR_ENV`] set, the binaries come from that directory instead (e.g.
/// `/usr/sbin`, to run the tests or the demo against an installed package).
pub fn binary(name: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        let path = PathBuf::from(dir).join(name);
        if path.is_file() {
            return Ok(path);
        }
        return Err(HarnessError::Io {
            context: format!("finding {name} in {BIN_DIR_ENV}={}", path.display()),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    let exe = std::env::current_exe().map_err(io_context("locating the running executable"))?;
    let own_dir = exe.parent().ok_or_else(|| {
        HarnessError::SlapdStart("the running executable has no directory".into())
    })?;
    let candidates: Vec<PathBuf> = [Some(own_dir), own_dir.parent()]
        .into_iter()
        .flatten()
        .map(|dir| dir.join(name))
        .collect();
    if let Some(path) = candidates.iter().find(|path| path.is_file()) {
        return Ok(path.clone());
    }
    let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    Err(HarnessError::Io {
        context: format!(
            "finding {name} (tried {}; build it first: cargo build --workspace --bins)",
            tried.join(", ")
        ),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })
}

/// The pseudo environment variable naming a network namespace to start a binary in.
pub const NETNS_ENV: &str = "UDR_TEST_NETNS";

/// Whether children started from now on get a process group of their own.
static OWN_PROCESS_GROUPS: AtomicBool = AtomicBool::new(false);

/// Starts later children (binaries and slapd) in process groups of their own, so a Ctrl-C
/// in the terminal reaches only this process, which can then stop them in order (the demo
/// runner). Off by default: a test run interrupted with Ctrl-C should take its children
/// down with it rather than leave them running.
pub fn use_own_process_groups(on: bool) {
    OWN_PROCESS_GROUPS.store(on, Ordering::Relaxed);
}

/// Applies [`use_own_process_groups`] to a command about to be spawned.
pub(crate) fn apply_process_group(command: &mut Command) -> &mut Command {
    if OWN_PROCESS_GROUPS.load(Ordering::Relaxed) {
        command.process_group(0);
    }
    command
}

/// A running binary; killed on drop.
pub struct Process {
    name: String,
    child: Option<Child>,
    log_path: PathBuf,
}

/// `log_path` opened for appending, twice: for the child's stdout and stderr.
fn log_files(log_path: &Path) -> Result<(File, File)> {
    let log = File::options()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(io_context(format!("opening {}", log_path.display())))?;
    let log_err = log
        .try_clone()
        .map_err(io_context("duplicating the log file"))?;
    Ok((log, log_err))
}

impl Process {
    /// Starts `name` with `args`, appending stdout and stderr to `log_path`.
    pub fn spawn(name: &str, args: &[String], log_path: &Path) -> Result<Process> {
        Process::spawn_with_env(name, args, &[], log_path)
    }

    /// Like [`Process::spawn`], with environment changes on top of the inherited
    /// environment: `(key, Some(value))` sets a variable, `(key, None)` removes it.
    /// [`NETNS_ENV`] among them runs the binary inside that network namespace instead (`ip
    /// netns exec` replaces itself with the binary, so the pid is the daemon's).
    pub fn spawn_with_env(
        name: &str,
        args: &[String],
        env: &[(String, Option<String>)],
        log_path: &Path,
    ) -> Result<Process> {
        let (log, log_err) = log_files(log_path)?;
        let netns = env
            .iter()
            .find(|(key, _)| key == NETNS_ENV)
            .and_then(|(_, value)| value.clone());
        let program = binary(name)?;
        let mut command = match netns {
            Some(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", &ns]).arg(program);
                command
            }
            None => Command::new(program),
        };
        apply_process_group(&mut command)
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET");
        for (key, value) in env.iter().filter(|(key, _)| key != NETNS_ENV) {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(io_context(format!("starting {name}")))?;
        Ok(Process {
            name: name.to_owned(),
            child: Some(child),
            log_path: log_path.to_owned(),
        })
    }

    /// Starts a program that is not one of the project's binaries (e.g. `nats-server`,
    /// found in `PATH`), appending its output to `log_path`.
    pub fn spawn_program(program: &str, args: &[String], log_path: &Path) -> Result<Process> {
        let (log, log_err) = log_files(log_path)?;
        let child = apply_process_group(&mut Command::new(program))
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(io_context(format!("starting {program}")))?;
        Ok(Process {
            name: program.to_owned(),
            child: Some(child),
            log_path: log_path.to_owned(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_status().is_none()
    }

    /// Everything the process wrote so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`).
    pub fn signal(&self, signal: i32) -> Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| HarnessError::SlapdStart(format!("{} is not running", self.name)))?;
        let pid = libc::pid_t::try_from(pid).map_err(|_| HarnessError::SlapdStart("pid".into()))?;
        // SAFETY: kill(2) with a pid of our own child; no memory is involved.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(HarnessError::Io {
                context: format!("signalling {}", self.name),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// SIGTERM, then waits up to `timeout` for a clean exit (SIGKILL after that).
    pub fn terminate(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        if self.child.is_none() {
            return Ok(None);
        }
        self.signal(libc::SIGTERM)?;
        let status = self.wait_exit(timeout)?;
        if status.is_none() {
            self.kill()?;
        }
        Ok(status)
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_status() {
                self.child = None;
                return Ok(Some(status));
            }
            if start.elapsed() > timeout {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL: a crash at an arbitrary point.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child
                .wait()
                .map_err(io_context(format!("waiting for {}", self.name)))?;
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- {} log ({}) ---\n{}",
                self.name,
                self.log_path.display(),
                self.log()
            );
        }
    }
}
