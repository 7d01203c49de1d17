//! Foreign lock holders: a Python child calling `fcntl.lockf`, the same call UCS's C code
//! (slapd's translog overlay, the C notifier) makes, to check our record locks against.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::{HarnessError, Result, io_context};

/// Tries `lockf(LOCK_EX|LOCK_NB)` on `path` in a child process. Returns the child and its
/// answer, `"locked"` or `"busy"`; with `hold` a successful lock is kept until the child is
/// killed, otherwise the child exits at once.
pub fn python_lockf(path: &Path, hold: bool) -> Result<(Child, String)> {
    let path = path
        .to_str()
        .ok_or_else(|| HarnessError::SlapdStart("lock path is not UTF-8".into()))?;
    let script = format!(
        "import fcntl,sys,time\nf=open({path:?},'a')\ntry:\n  fcntl.lockf(f,fcntl.LOCK_EX|fcntl.LOCK_NB)\n  print('locked',flush=True)\nexcept OSError:\n  print('busy',flush=True)\n  sys.exit(0)\nif {}: time.sleep(60)",
        if hold { "True" } else { "False" }
    );
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(io_context("starting python3 for lockf"))?;
    let mut line = String::new();
    if let Some(stdout) = child.stdout.as_mut() {
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(io_context("reading the lockf answer"))?;
    }
    Ok((child, line.trim().to_owned()))
}

/// Holds a lock on `path` from a child until it is killed; fails if it is busy.
pub fn hold_lockf(path: &Path) -> Result<Child> {
    let (mut child, answer) = python_lockf(path, true)?;
    if answer != "locked" {
        let _ = child.kill();
        let _ = child.wait();
        return Err(HarnessError::SlapdStart(format!(
            "expected to lock {}, got {answer:?}",
            path.display()
        )));
    }
    Ok(child)
}
