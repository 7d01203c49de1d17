//! `prune TID`: drops transactions below TID from the transaction file (atomic rewrite,
//! index removed) and their entries from cn=translog.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};
use daemon::fs::TempFile;
use notifier::journal::scan::{LineScanner, is_blank, parse_line, trim_line};

use crate::Exit;
use crate::check::{BACKUP, PRIMARY};
use crate::files::{BAK_SUFFIX, LockOutcome, NEW_SUFFIX, Translog, lock_translog, remove_index};
use crate::ldap::{self, ConnOptions};
use crate::log::{debug, error, info, warning};

/// The oldest ID to keep: `id` itself, or for a negative `id` the last `|id|` transactions.
fn keep_from(id: i64, last: u64) -> u64 {
    if id >= 0 {
        id.unsigned_abs()
    } else {
        last.saturating_add(1).saturating_sub(id.unsigned_abs())
    }
}

pub fn run(path: &Path, id: i64, role: Option<&str>, conn: &ConnOptions) -> Result<Exit> {
    if !matches!(role, Some(PRIMARY | BACKUP)) {
        println!("This command is only for UCS Primary and Backup Nodes.");
        return Ok(Exit::Ok);
    }
    let _lock = if conn.dry_run {
        None
    } else {
        match lock_translog(path)? {
            LockOutcome::Held(lock) => Some(lock),
            LockOutcome::Refused(why) => {
                eprintln!("univention-translog: {why}");
                return Ok(Exit::Problem);
            }
        }
    };
    let translog = Translog::open(path)?;
    let (first, last) = (translog.first, translog.last);
    if id < 0 {
        info!(
            "Keeping last {} transactions before {last}",
            id.unsigned_abs()
        );
    }
    let trans = keep_from(id, last);
    info!("Purging/keeping {first}..{trans}..{last}");
    if trans <= first {
        error!("Already purged.");
        return Ok(Exit::Problem);
    }
    if trans >= last {
        error!("Nothing to purge.");
        return Ok(Exit::Problem);
    }

    let new = TempFile::replacing(path, NEW_SUFFIX)?;
    let mut out = BufWriter::new(new.file());
    let mut dropped: u64 = 0;
    for line in
        LineScanner::open(path).with_context(|| format!("cannot open {}", path.display()))?
    {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if !line.complete {
            error!(
                "{}:{}: the last line is incomplete; run `univention-translog check` first",
                path.display(),
                line.line_no
            );
            return Ok(Exit::Problem);
        }
        if is_blank(&line.bytes) {
            continue;
        }
        let tx = match parse_line(&line.bytes) {
            Ok(tx) => tx,
            Err(e) => {
                error!(
                    "{}:{}: {e}; run `univention-translog check` first",
                    path.display(),
                    line.line_no
                );
                return Ok(Exit::Problem);
            }
        };
        if tx.id.get() < trans {
            debug!("Dropping {}", tx.id);
            dropped += 1;
            continue;
        }
        out.write_all(trim_line(&line.bytes))
            .and_then(|()| out.write_all(b"\n"))
            .with_context(|| format!("cannot write {}", new.path().display()))?;
    }
    out.flush()
        .with_context(|| format!("cannot write {}", new.path().display()))?;
    drop(out);
    if conn.dry_run {
        info!(
            "(dry run) would drop {dropped} transactions from {}",
            path.display()
        );
        drop(new);
    } else {
        new.commit(Some(BAK_SUFFIX))?;
        remove_index(path, false)?;
        info!("Dropped {dropped} transactions from {}", path.display());
    }

    match ldap::prune(conn, trans) {
        Ok(0) => Ok(Exit::Ok),
        Ok(failed) => {
            error!("{failed} entries could not be deleted from {}", conn.base);
            Ok(Exit::Problem)
        }
        Err(e) => {
            warning!(
                "skipping the cleanup of {}: {}",
                conn.base,
                daemon::report::chain(&*e)
            );
            Ok(Exit::Ok)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::keep_from;

    #[test]
    fn negative_keeps_the_tail() {
        assert_eq!(keep_from(5, 10), 5);
        assert_eq!(keep_from(-3, 10), 8);
        assert_eq!(keep_from(-20, 10), 0);
        assert_eq!(keep_from(i64::MIN, 10), 0);
    }
}
