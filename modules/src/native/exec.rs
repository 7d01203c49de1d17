//! `exec`: runs a program for every change, the change as JSON (plus `\n`) on its standard
//! input.
//!
//! The program runs without a shell, with the listener's environment plus `LISTENER_MODULE`,
//! `LISTENER_COMMAND` (`a`, `m`, `d`, `r` or `n`), `LISTENER_DN`, `LISTENER_ID` and, once the
//! listener has passed them, `LISTENER_BASEDN`, `LISTENER_BINDDN` and `LISTENER_LDAPSERVER`
//! (never the bind password). Its output is logged line by line. The call fails if the
//! program exits non-zero, is killed by a signal or runs longer than the timeout (it is
//! then killed).
//!
//! Config keys besides the common ones: `command` (required, split on whitespace) and
//! `timeout` (seconds, default 30).

use std::collections::BTreeMap;
use std::io::{self, BufRead as _, BufReader, Read, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use super::{NativeError, config, default_info, json};
use crate::module::{Call, Module, ModuleError, ModuleInfo};

pub(super) const DESCRIPTION: &str =
    "Runs a program for every change, with the change as JSON on its standard input";

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How much of the end of stderr a failure message quotes.
const STDERR_TAIL: usize = 500;

/// Longest output line logged as one event; longer ones are split, so a program writing
/// without newlines cannot make the listener buffer without bound.
const MAX_LINE: u64 = 64 * 1024;

/// Upper bound of the pause between checks whether the program has exited. Pauses start at
/// 1 ms and double, so short-lived programs cost little latency and long ones little CPU.
const MAX_PAUSE: Duration = Duration::from_millis(50);

pub(super) struct Settings {
    info: ModuleInfo,
    command: Vec<String>,
    timeout: Duration,
}

impl Settings {
    /// `exec=PROGRAM ARG…`.
    pub(super) fn from_arg(command: &str) -> Settings {
        Settings {
            info: default_info("exec", DESCRIPTION, false),
            command: split_command(command),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// `exec=@CONFIG`.
    pub(super) fn from_config(path: &Path) -> Result<Settings, NativeError> {
        let mut info = default_info("exec", DESCRIPTION, false);
        let mut command = None;
        let mut timeout = DEFAULT_TIMEOUT;
        config::read(path, &mut info, |key, value| {
            match key {
                "command" => command = Some(split_command(value)),
                "timeout" => timeout = parse_timeout(value)?,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        let command = command.ok_or_else(|| NativeError::MissingKey {
            path: path.to_owned(),
            key: "command",
        })?;
        Ok(Settings {
            info,
            command,
            timeout,
        })
    }
}

fn split_command(command: &str) -> Vec<String> {
    command.split_whitespace().map(str::to_owned).collect()
}

fn parse_timeout(value: &str) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|seconds| *seconds > 0.0)
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
        .ok_or_else(|| format!("{value:?} is not a positive number of seconds"))
}

pub(super) struct Exec {
    info: ModuleInfo,
    program: PathBuf,
    args: Vec<String>,
    timeout: Duration,
    /// Environment variable → value, from `setdata`.
    connection: BTreeMap<&'static str, String>,
}

impl Exec {
    /// Resolves the program now, so a typo fails at load rather than at every change.
    pub(super) fn new(settings: Settings) -> Result<Exec, NativeError> {
        let Some((program, args)) = settings.command.split_first() else {
            return Err(NativeError::Program {
                program: String::new(),
                problem: "is empty".to_owned(),
            });
        };
        Ok(Exec {
            program: resolve(program)?,
            args: args.to_vec(),
            info: settings.info,
            timeout: settings.timeout,
            connection: BTreeMap::new(),
        })
    }

    fn failure(&self, message: impl std::fmt::Display) -> ModuleError {
        ModuleError::new(format!("{}: {message}", self.program.display()))
    }

    /// Starts the program with its input written by a helper thread and its output logged
    /// by two more, so no pipe can fill up and block either side.
    fn start(&self, call: &Call<'_>, input: Vec<u8>) -> io::Result<Running> {
        let mut child = std::process::Command::new(&self.program)
            .args(&self.args)
            .envs(&self.connection)
            .env("LISTENER_MODULE", &self.info.name)
            .env("LISTENER_COMMAND", call.command.as_char().to_string())
            .env("LISTENER_DN", call.dn)
            .env("LISTENER_ID", call.id.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let (stdin, stdout, stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        // From here on an early return drops `running`, which kills and reaps the child.
        let mut running = Running {
            child,
            stdout: None,
            stderr: None,
        };
        if let Some(stdin) = stdin {
            // A program may exit without reading its input; that is its business, so the
            // result (typically EPIPE) is deliberately not looked at.
            thread::Builder::new()
                .name("exec-stdin".to_owned())
                .spawn(move || write_input(stdin, &input))?;
        }
        if let Some(stdout) = stdout {
            running.stdout = Some(log_output(stdout, &self.info.name, "stdout")?);
        }
        if let Some(stderr) = stderr {
            running.stderr = Some(log_output(stderr, &self.info.name, "stderr")?);
        }
        Ok(running)
    }
}

/// The program as it will be run: a name without `/` is looked up in `PATH` like the shell
/// does. Only the execute bits are checked, which is what matters for a root daemon.
fn resolve(program: &str) -> Result<PathBuf, NativeError> {
    let error = |problem: String| NativeError::Program {
        program: program.to_owned(),
        problem,
    };
    if program.contains('/') {
        let path = PathBuf::from(program);
        return check_executable(&path).map(|()| path).map_err(error);
    }
    let search = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&search)
        .map(|dir| dir.join(program))
        .find(|candidate| check_executable(candidate).is_ok())
        .ok_or_else(|| error("was not found in PATH".to_owned()))
}

fn check_executable(path: &Path) -> Result<(), String> {
    let metadata = std::fs::metadata(path).map_err(|error| format!("cannot be used: {error}"))?;
    if !metadata.is_file() {
        return Err("is not a regular file".to_owned());
    }
    if metadata.permissions().mode() & 0o111 == 0 {
        return Err("is not executable".to_owned());
    }
    Ok(())
}

fn write_input(mut stdin: ChildStdin, input: &[u8]) -> io::Result<()> {
    stdin.write_all(input)
    // Dropping `stdin` closes it: the program sees end of input.
}

/// Logs every line of `stream` and returns its last [`STDERR_TAIL`] bytes.
fn log_output(
    stream: impl Read + Send + 'static,
    module: &str,
    name: &'static str,
) -> io::Result<JoinHandle<Vec<u8>>> {
    let module = module.to_owned();
    thread::Builder::new()
        .name(format!("exec-{name}"))
        .spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            let mut tail = Vec::new();
            loop {
                line.clear();
                match reader.by_ref().take(MAX_LINE).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let text = String::from_utf8_lossy(&line);
                tracing::info!(module = %module, stream = name, "{}", text.trim_end());
                tail.extend_from_slice(&line);
                let excess = tail.len().saturating_sub(STDERR_TAIL);
                tail.drain(..excess);
            }
            tail
        })
}

/// A started program. Dropping it kills and reaps the program if it still runs, so no
/// early return leaves a process or a zombie behind.
struct Running {
    child: Child,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl Running {
    /// Waits until the program has exited and its output is logged, at most until
    /// `deadline`; `None` if the program still runs then. Output still open at the deadline
    /// (a background process of the program holds it) is left to its threads.
    fn wait(&mut self, deadline: Instant) -> io::Result<Option<ExitStatus>> {
        let mut status = None;
        let mut pause = Duration::from_millis(1);
        loop {
            if status.is_none() {
                status = self.child.try_wait()?;
            }
            let output_done = [&self.stdout, &self.stderr]
                .into_iter()
                .flatten()
                .all(|thread| thread.is_finished());
            if status.is_some() && output_done {
                return Ok(status);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(status);
            }
            thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// The end of stderr, if its thread is done.
    fn stderr_tail(&mut self) -> String {
        let tail = match self.stderr.take() {
            Some(thread) if thread.is_finished() => thread.join().unwrap_or_default(),
            _ => Vec::new(),
        };
        String::from_utf8_lossy(&tail).trim().to_owned()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Nothing more can be done about errors here: the process is gone or not ours.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Module for Exec {
    fn info(&self) -> &ModuleInfo {
        &self.info
    }

    fn handler(&mut self, call: &Call<'_>) -> Result<(), ModuleError> {
        let mut input = json::change_json(&self.info.name, call, SystemTime::now())
            .map_err(|error| self.failure(format!("cannot encode change: {error}")))?;
        input.push(b'\n');
        let deadline = Instant::now() + self.timeout;
        let mut running = self
            .start(call, input)
            .map_err(|error| self.failure(format!("cannot start: {error}")))?;
        let status = running
            .wait(deadline)
            .map_err(|error| self.failure(format!("cannot wait: {error}")))?;
        match status {
            Some(status) if status.success() => Ok(()),
            Some(status) => Err(self.failure(format!(
                "failed with {status}; stderr: {:?}",
                running.stderr_tail()
            ))),
            // Dropping `running` kills and reaps the program.
            None => Err(self.failure(format!("timed out after {}s", self.timeout.as_secs_f64()))),
        }
    }

    fn setdata(&mut self, key: &str, value: &str) -> Result<(), ModuleError> {
        // `bindpw` is ignored on purpose: the environment of a process is readable by
        // anyone who can inspect it, and the program can bind with its own credentials.
        let variable = match key {
            "basedn" => "LISTENER_BASEDN",
            "binddn" => "LISTENER_BINDDN",
            "ldapserver" => "LISTENER_LDAPSERVER",
            _ => return Ok(()),
        };
        self.connection.insert(variable, value.to_owned());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::module::Command;

    /// Writing a script while another test forks can leave a write descriptor of the script
    /// open in that child, and exec then fails with ETXTBSY. Tests that write and run
    /// scripts hold this lock so none of their forks overlap a write.
    static SCRIPTS: Mutex<()> = Mutex::new(());

    fn lock() -> std::sync::MutexGuard<'static, ()> {
        SCRIPTS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn exec(command: &str) -> Exec {
        Exec::new(Settings::from_arg(command)).unwrap()
    }

    fn call<'a>(new: &'a crate::Attributes) -> Call<'a> {
        Call {
            id: 5,
            dn: r"cn=J\2C Müller,dc=x",
            command: Command::Add,
            new,
            old: &[],
        }
    }

    fn handler_error(module: &mut Exec, call: &Call<'_>) -> String {
        match module.handler(call) {
            Ok(()) => panic!("handler succeeded"),
            Err(error) => error.message().to_owned(),
        }
    }

    #[test]
    fn program_gets_json_on_stdin_and_environment() {
        let _lock = lock();
        let dir = tempfile::tempdir().unwrap();
        let copy = script(
            dir.path(),
            "copy",
            r#"cat > "$1"
printf '%s\n' "$LISTENER_MODULE" "$LISTENER_COMMAND" "$LISTENER_DN" "$LISTENER_ID" \
    "$LISTENER_BASEDN" "$LISTENER_BINDDN" "$LISTENER_LDAPSERVER" > "$2"
env > "$3"
echo to stdout
echo to stderr >&2
"#,
        );
        let (input, vars, env) = (
            dir.path().join("input"),
            dir.path().join("vars"),
            dir.path().join("env"),
        );
        let mut module = exec(&format!(
            "{} {} {} {}",
            copy.display(),
            input.display(),
            vars.display(),
            env.display()
        ));
        for (key, value) in [
            ("basedn", "dc=x"),
            ("binddn", "cn=admin,dc=x"),
            ("bindpw", "s3cret"),
            ("ldapserver", "ldap.x"),
        ] {
            module.setdata(key, value).unwrap();
        }
        let new = vec![(
            "cn".to_owned(),
            vec!["J, Müller".as_bytes().to_vec(), b"\xff".to_vec()],
        )];
        module.handler(&call(&new)).unwrap();

        let input = std::fs::read_to_string(input).unwrap();
        let (time, rest) = input
            .strip_prefix(r#"{"time":""#)
            .unwrap()
            .split_once('"')
            .unwrap();
        assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
        assert_eq!(
            rest,
            concat!(
                r#","id":5,"module":"exec","command":"a","dn":"cn=J\\2C Müller,dc=x","#,
                r#""old":{},"new":{"cn":["J, Müller",{"base64":"/w=="}]}}"#,
                "\n"
            )
        );
        assert_eq!(
            std::fs::read_to_string(vars).unwrap(),
            "exec\na\ncn=J\\2C Müller,dc=x\n5\ndc=x\ncn=admin,dc=x\nldap.x\n"
        );
        assert!(!std::fs::read_to_string(env).unwrap().contains("s3cret"));
    }

    #[test]
    fn nonzero_exit_fails_with_status_and_stderr_tail() {
        let _lock = lock();
        let dir = tempfile::tempdir().unwrap();
        let fail = script(
            dir.path(),
            "fail",
            "echo first >&2\necho boom >&2\nexit 3\n",
        );
        let message = handler_error(&mut exec(fail.to_str().unwrap()), &call(&[]));
        assert_eq!(
            message,
            format!(
                "{}: failed with exit status: 3; stderr: \"first\\nboom\"",
                fail.display()
            )
        );

        let chatty = script(
            dir.path(),
            "chatty",
            "i=0\nwhile [ $i -lt 100 ]; do echo \"line $i of noise\" >&2; i=$((i+1)); done\nexit 1\n",
        );
        let message = handler_error(&mut exec(chatty.to_str().unwrap()), &call(&[]));
        assert!(message.contains("exit status: 1"), "{message}");
        assert!(message.ends_with("line 99 of noise\""), "{message}");
        assert!(!message.contains("line 9 of"), "{message}");
        assert!(message.len() < STDERR_TAIL + 200, "{message}");
    }

    #[test]
    fn signal_fails() {
        let _lock = lock();
        let dir = tempfile::tempdir().unwrap();
        let killed = script(dir.path(), "killed", "kill -9 $$\n");
        let message = handler_error(&mut exec(killed.to_str().unwrap()), &call(&[]));
        assert!(message.contains("signal: 9"), "{message}");
    }

    #[test]
    fn timeout_kills_and_reaps() {
        let _lock = lock();
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let slow = script(dir.path(), "slow", "echo $$ > \"$1\"\nexec sleep 30\n");
        let conf = dir.path().join("slow.conf");
        std::fs::write(
            &conf,
            format!(
                "name = slow\ncommand = {} {}\ntimeout = 1\n",
                slow.display(),
                pid_file.display()
            ),
        )
        .unwrap();
        let mut module = Exec::new(Settings::from_config(&conf).unwrap()).unwrap();
        assert_eq!(module.info().name, "slow");

        let started = Instant::now();
        let message = handler_error(&mut module, &call(&[]));
        assert_eq!(message, format!("{}: timed out after 1s", slow.display()));
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
        // Reaped: not even a zombie is left.
        let pid = std::fs::read_to_string(pid_file).unwrap();
        assert!(!Path::new(&format!("/proc/{}", pid.trim())).exists());
    }

    #[test]
    fn bad_programs_fail_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        let cases = [
            (
                "/nonexistent/program --flag".to_owned(),
                "native module exec: program \"/nonexistent/program\" cannot be used: \
                 No such file or directory (os error 2)"
                    .to_owned(),
            ),
            (
                "no-such-program-anywhere x".to_owned(),
                "native module exec: program \"no-such-program-anywhere\" \
                 was not found in PATH"
                    .to_owned(),
            ),
            (
                plain.display().to_string(),
                format!(
                    "native module exec: program {:?} is not executable",
                    plain.display().to_string()
                ),
            ),
            (
                dir.path().display().to_string(),
                format!(
                    "native module exec: program {:?} is not a regular file",
                    dir.path().display().to_string()
                ),
            ),
        ];
        for (command, expected) in cases {
            match Exec::new(Settings::from_arg(&command)) {
                Ok(_) => panic!("{command:?} loaded"),
                Err(error) => assert_eq!(error.to_string(), expected),
            }
        }
        // Bare names are resolved through PATH.
        assert!(exec("true --flag").program.is_absolute());
    }

    #[test]
    fn config_keys() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("x.conf");
        std::fs::write(
            &conf,
            "command = /bin/true  a\tb\ntimeout = 2.5\npriority = 3\nattributes = uid\n",
        )
        .unwrap();
        let settings = Settings::from_config(&conf).unwrap();
        assert_eq!(settings.command, ["/bin/true", "a", "b"]);
        assert_eq!(settings.timeout, Duration::from_millis(2500));
        assert_eq!(settings.info.priority, 3.0);
        assert_eq!(settings.info.attributes, ["uid"]);

        for (text, needle) in [
            (
                "timeout = 0",
                ":1: timeout: \"0\" is not a positive number of seconds",
            ),
            ("timeout = -1", "not a positive number"),
            ("timeout = 1e300", "not a positive number"),
            ("command = x\nenv = A=b", ":2: unknown key \"env\""),
            ("timeout = 5", ": missing required key \"command\""),
        ] {
            std::fs::write(&conf, text).unwrap();
            match Settings::from_config(&conf) {
                Ok(_) => panic!("{text:?} accepted"),
                Err(error) => {
                    let message = error.to_string();
                    assert!(message.starts_with(conf.to_str().unwrap()), "{message}");
                    assert!(message.contains(needle), "{text:?}: {message}");
                }
            }
        }
    }
}
