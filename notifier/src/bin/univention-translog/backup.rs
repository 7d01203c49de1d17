//! `backup create|verify|restore`: the notifier's state as one archive; the format and the
//! consistency rules live in `notifier::backup`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Subcommand;
use notifier::backup::{self, BackupError, CreateOptions, Manifest};

use crate::Exit;
use crate::files::parent_dir;
use crate::log::{error, info};

#[derive(Subcommand, Debug)]
pub enum BackupCmd {
    /// Write the transaction log, its index and the accesslog position to FILE (safe while
    /// the notifier runs)
    Create {
        /// Archive to write (a tar file)
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Replace FILE if it exists
        #[arg(long)]
        force: bool,
    },
    /// Check FILE: format version, checksums, log syntax and ids, index against log
    Verify {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Replace the notifier's state with FILE's (the notifier must be stopped); replaced
    /// files are kept as <name>.before-restore
    Restore {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

pub const AFTER_HELP: &str = "\
backup: the archive is a tar file: MANIFEST (format version, tool version, creation time,
host, first/last transaction id, sha256 of every file), transaction, transaction.index and,
with the accesslog intake, accesslog.position. `create` copies the log up to its last
complete line and generates the index from that copy, so it is consistent while the
notifier runs. While no notifier runs, `create` holds transaction.lock, so a notifier
started meanwhile exits (systemd restarts it). `restore` verifies the whole archive before
it changes anything and keeps replaced files as <name>.before-restore (it refuses while
those of an earlier restore exist); with --dry-run it only verifies.

Exit status of backup: 0 success, 1 the archive is damaged or not a backup, 2 usage or I/O
error, 3 refused because the notifier is running, 4 the archive has an unknown or newer
format version.";

pub fn run(cmd: BackupCmd, translog: &Path, dry_run: bool) -> Result<Exit> {
    let notify_dir = parent_dir(translog);
    let result = match cmd {
        BackupCmd::Create { file, force } => create(&notify_dir, &file, force),
        BackupCmd::Verify { file } => backup::verify(&file).map(|manifest| {
            println!("{}: OK", file.display());
            describe(&manifest);
        }),
        BackupCmd::Restore { file } if dry_run => backup::verify(&file).map(|manifest| {
            println!(
                "{}: OK; would restore it into {} (dry run)",
                file.display(),
                notify_dir.display()
            );
            describe(&manifest);
        }),
        BackupCmd::Restore { file } => restore(&notify_dir, &file),
    };
    match result {
        Ok(()) => Ok(Exit::Ok),
        Err(err) => {
            error!("{err}");
            Ok(match err {
                BackupError::NotABackup { .. } | BackupError::Invalid { .. } => Exit::Problem,
                BackupError::NotifierRunning { .. } => Exit::Running,
                BackupError::UnsupportedFormat { .. } => Exit::Format,
                _ => Exit::Error,
            })
        }
    }
}

fn create(notify_dir: &Path, file: &Path, force: bool) -> Result<(), BackupError> {
    let opts = CreateOptions {
        force,
        tool_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let manifest = backup::create(notify_dir, file, &opts)?;
    println!(
        "Backup of {} written to {}",
        notify_dir.display(),
        file.display()
    );
    describe(&manifest);
    Ok(())
}

fn restore(notify_dir: &Path, file: &Path) -> Result<(), BackupError> {
    let restored = backup::restore(notify_dir, file)?;
    println!("Restored {} into {}", file.display(), notify_dir.display());
    describe(&restored.manifest);
    for kept in &restored.kept {
        info!("the previous file is kept as {}", kept.display());
    }
    if !restored.kept.is_empty() {
        println!(
            "  previous files kept as *{} (remove them when the notifier runs well)",
            backup::BEFORE_RESTORE
        );
    }
    Ok(())
}

fn describe(manifest: &Manifest) {
    let ids = if manifest.last_id == 0 {
        "none".to_owned()
    } else {
        format!("{}..{}", manifest.first_id, manifest.last_id)
    };
    println!("  format:       {}", manifest.format_version);
    println!(
        "  created:      {} on {} by univention-translog {}",
        manifest.created, manifest.hostname, manifest.tool_version
    );
    println!(
        "  notifier:     {}",
        if manifest.notifier_running {
            "was running"
        } else {
            "was stopped"
        }
    );
    println!("  transactions: {ids}");
    if let Some(id) = manifest.position_id {
        println!("  accesslog position at transaction {id}");
    }
    for file in &manifest.files {
        println!("  {} {} bytes sha256 {}", file.name, file.size, file.sha256);
    }
}
