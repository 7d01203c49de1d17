//! A real `univention-directory-notifier` under test, with its own `--ldap-dir`, port,
//! PID and log files, plus a raw-bytes protocol client.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::net::{free_port, is_listening};
use crate::process::Process;
use crate::slapd::Slapd;
use crate::{HarnessError, Result, io_context};

pub const NOTIFIER: &str = "univention-directory-notifier";
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How the notifier gets its transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    QueueFile,
    Accesslog,
}

pub struct Notifier {
    dir: Option<TempDir>,
    path: PathBuf,
    port: u16,
    args: Vec<String>,
    process: Option<Process>,
}

impl Notifier {
    /// Starts a notifier against `slapd` (translog over its ldapi socket).
    pub fn start(slapd: &Slapd, intake: Intake, extra: &[&str]) -> Result<Notifier> {
        Notifier::start_with(slapd, intake, extra, |_| Ok(()))
    }

    /// Starts a notifier following slapd's accesslog and waits until its first start has
    /// fixed its position (after the newest accesslog entry): only later writes become
    /// transactions.
    pub fn following_accesslog(
        slapd: &Slapd,
        extra: &[&str],
        timeout: Duration,
    ) -> Result<Notifier> {
        let notifier = Notifier::start(slapd, Intake::Accesslog, extra)?;
        let position = notifier.ldap_dir().join("notify/accesslog.position");
        crate::wait_until("the notifier's stored accesslog position", timeout, || {
            Ok(position.exists().then_some(()))
        })?;
        Ok(notifier)
    }

    /// Like [`Notifier::start`], after `prepare` has populated the `--ldap-dir` (e.g. with
    /// a crafted transaction log).
    pub fn start_with(
        slapd: &Slapd,
        intake: Intake,
        extra: &[&str],
        prepare: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<Notifier> {
        Notifier::start_full(slapd, intake, Some(crate::slapd::BASE), extra, prepare)
    }

    /// Like [`Notifier::start`] without `--ldap-base`: the notifier finds the base itself.
    pub fn start_without_base(slapd: &Slapd, intake: Intake, extra: &[&str]) -> Result<Notifier> {
        Notifier::start_full(slapd, intake, None, extra, |_| Ok(()))
    }

    fn start_full(
        slapd: &Slapd,
        intake: Intake,
        ldap_base: Option<&str>,
        extra: &[&str],
        prepare: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<Notifier> {
        let dir = tempfile::Builder::new()
            .prefix("notifier-")
            .tempdir_in("/tmp")
            .map_err(io_context("creating the notifier directory"))?;
        let path = dir.path().to_path_buf();
        let ldap_dir = path.join("ldap");
        for sub in ["listener", "notify", "schema/id"] {
            std::fs::create_dir_all(ldap_dir.join(sub))
                .map_err(io_context(format!("creating {sub}")))?;
        }
        prepare(&ldap_dir).map_err(io_context("preparing the notifier directory"))?;
        let mut args: Vec<String> = vec![
            "-F".into(),
            "-d".into(),
            "3".into(),
            "--ldap-dir".into(),
            ldap_dir.display().to_string(),
            "--pid-file".into(),
            path.join("notifier.pid").display().to_string(),
            "--ucr-file".into(),
            path.join("base.conf").display().to_string(),
            "--translog-uri".into(),
            slapd.ldapi_url(),
            "--poll-interval".into(),
            "0.5".into(),
            "--listen".into(),
            "127.0.0.1".into(),
        ];
        if let Some(base) = ldap_base {
            args.extend(["--ldap-base".into(), base.into()]);
        }
        if intake == Intake::Accesslog {
            args.extend([
                "--intake".into(),
                "accesslog".into(),
                "--accesslog-uri".into(),
                slapd.ldapi_url(),
            ]);
        }
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let mut notifier = Notifier {
            dir: Some(dir),
            path,
            port: 0,
            args,
            process: None,
        };
        notifier.spawn_on_free_port()?;
        Ok(notifier)
    }

    fn spawn_on_free_port(&mut self) -> Result<()> {
        let mut last = None;
        for _ in 0..5 {
            let port = free_port()?;
            match self.spawn(port) {
                Ok(()) => return Ok(()),
                Err(err) if self.log().contains("cannot listen on port") => last = Some(err),
                Err(err) => return Err(err),
            }
        }
        Err(last.unwrap_or_else(|| HarnessError::SlapdStart("no free port".into())))
    }

    fn spawn(&mut self, port: u16) -> Result<()> {
        let mut args = self.args.clone();
        args.extend(["--port".into(), port.to_string()]);
        let mut process = Process::spawn(NOTIFIER, &args, &self.path.join("notifier.log"))?;
        let start = Instant::now();
        while !is_listening(port) {
            if let Some(status) = process.try_status() {
                return Err(HarnessError::SlapdStart(format!(
                    "notifier exited with {status}:\n{}",
                    process.log()
                )));
            }
            if start.elapsed() > START_TIMEOUT {
                return Err(HarnessError::Timeout {
                    what: format!("the notifier to listen on port {port}"),
                    seconds: START_TIMEOUT.as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.port = port;
        self.process = Some(process);
        Ok(())
    }

    /// Starts the notifier again on the same port and directories.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn(self.port) {
                Ok(()) => return Ok(()),
                Err(err) if Instant::now() > deadline => return Err(err),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Adds `extra` to the command line for every later (re)start.
    pub fn add_args(&mut self, extra: &[&str]) {
        self.args.extend(extra.iter().map(|a| (*a).to_owned()));
    }

    /// Its UCR file (`--ucr-file`).
    pub fn ucr_file(&self) -> PathBuf {
        self.path.join("base.conf")
    }

    /// SIGTERM and wait for a clean exit; a notifier that already exited is only reaped.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut process) = self.process.take()
            && process.try_status().is_none()
        {
            process.terminate(Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// SIGKILL.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut process) = self.process.take() {
            process.kill()?;
        }
        Ok(())
    }

    pub fn process(&mut self) -> Option<&mut Process> {
        self.process.as_mut()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        &self.path
    }

    pub fn ldap_dir(&self) -> PathBuf {
        self.path.join("ldap")
    }

    pub fn queue_file(&self) -> PathBuf {
        self.ldap_dir().join("listener").join("listener")
    }

    pub fn transaction_file(&self) -> PathBuf {
        self.ldap_dir().join("notify").join("transaction")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path.join("notifier.log")).unwrap_or_default()
    }

    /// Appends lines to the queue file, as slapd's translog overlay does.
    pub fn queue(&self, lines: &str) -> Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.queue_file())
            .map_err(io_context("opening the queue file"))?;
        file.write_all(lines.as_bytes())
            .map_err(io_context("writing the queue file"))
    }

    /// The committed log as text.
    pub fn transactions(&self) -> String {
        std::fs::read_to_string(self.transaction_file()).unwrap_or_default()
    }

    pub fn client(&self) -> Result<Client> {
        Client::connect(self.port)
    }

    /// The notifier's last transaction id, asked with protocol 3 `GET_ID`.
    pub fn last_id(&self) -> Result<u64> {
        let mut client = self.client()?;
        client.handshake(3)?;
        let answer = client.request(1, "GET_ID")?;
        answer
            .lines()
            .nth(1)
            .and_then(|line| line.trim().parse().ok())
            .ok_or_else(|| HarnessError::Io {
                context: format!("reading the answer to GET_ID: {answer:?}"),
                source: std::io::Error::from(std::io::ErrorKind::InvalidData),
            })
    }

    /// The id of the newest logged transaction `<id> <dn> <command>`, waiting up to
    /// `timeout` for it to appear.
    pub fn wait_transaction(&self, dn: &str, command: char, timeout: Duration) -> Result<u64> {
        let suffix = format!(" {dn} {command}");
        crate::wait_until(
            &format!("transaction `{dn} {command}` at the notifier"),
            timeout,
            || {
                Ok(self.transactions().lines().rev().find_map(|line| {
                    line.strip_suffix(suffix.as_str())
                        .and_then(|id| id.parse().ok())
                }))
            },
        )
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
        }
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!("test failed: notifier directory kept at {}", kept.display());
            eprintln!("--- notifier log ---\n{}", self.log());
        }
    }
}

/// A protocol client that sends raw bytes and reads raw answers, for exact-byte tests.
pub struct Client {
    stream: TcpStream,
    pending: Vec<u8>,
}

impl Client {
    pub fn connect(port: u16) -> Result<Client> {
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .map_err(io_context(format!("connecting to port {port}")))?;
        Client::from_stream(stream)
    }

    /// A client on a connection the test opened itself (e.g. from another source address).
    pub fn from_stream(stream: TcpStream) -> Result<Client> {
        Ok(Client {
            stream,
            pending: Vec::new(),
        })
    }

    pub fn send(&mut self, bytes: &str) -> Result<()> {
        self.stream
            .write_all(bytes.as_bytes())
            .map_err(io_context("sending to the notifier"))
    }

    /// Handshake with `version`; returns the server's reply block.
    pub fn handshake(&mut self, version: u32) -> Result<String> {
        self.send(&format!("Version: {version}\nCapabilities: \n\n"))?;
        self.block(Duration::from_secs(10))
    }

    /// Sends one request and returns its answer block (`MSGID: k\n…\n\n`).
    pub fn request(&mut self, msgid: u32, command: &str) -> Result<String> {
        self.send(&format!("MSGID: {msgid}\n{command}\n\n"))?;
        self.block(Duration::from_secs(10))
    }

    /// The next block ending in a blank line, exactly as received.
    pub fn block(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(end) = find_blank_line(&self.pending) {
                let block: Vec<u8> = self.pending.drain(..end).collect();
                return Ok(String::from_utf8_lossy(&block).into_owned());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HarnessError::Timeout {
                    what: format!(
                        "an answer block (have {:?})",
                        String::from_utf8_lossy(&self.pending)
                    ),
                    seconds: timeout.as_secs_f64(),
                });
            }
            if let Arrived::Closed = self.read_within(left)? {
                return Err(HarnessError::Io {
                    context: "reading an answer: connection closed".into(),
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
        }
    }

    /// True when nothing arrives within `wait` and the connection is still open.
    pub fn is_silent(&mut self, wait: Duration) -> Result<bool> {
        Ok(matches!(self.read_within(wait)?, Arrived::Nothing) && self.pending.is_empty())
    }

    /// True when the server closed the connection within `wait`.
    pub fn is_closed(&mut self, wait: Duration) -> Result<bool> {
        Ok(matches!(self.read_within(wait)?, Arrived::Closed))
    }

    /// One read of whatever arrives within `wait`, appended to the pending bytes.
    fn read_within(&mut self, wait: Duration) -> Result<Arrived> {
        self.stream
            .set_read_timeout(Some(wait))
            .map_err(io_context("setting a read timeout"))?;
        let mut buf = [0u8; 4096];
        match self.stream.read(&mut buf) {
            Ok(0) => Ok(Arrived::Closed),
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                Ok(Arrived::Data)
            }
            Err(err) => match err.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    Ok(Arrived::Nothing)
                }
                std::io::ErrorKind::ConnectionReset => Ok(Arrived::Closed),
                _ => Err(io_context("reading from the notifier")(err)),
            },
        }
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

/// What one read within a deadline brought.
enum Arrived {
    Data,
    Nothing,
    Closed,
}

fn find_blank_line(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|w| w == b"\n\n").map(|i| i + 2)
}
