//! Hosts of a UCS domain on loopback, built from the real parts: a Backup Directory Node
//! (replica slapd with accesslog and `cn=translog`, a listener replicating into it with the
//! native `replication` module and writing the cascade output, its own notifier reading
//! that cascade) and Replica listeners (jsonl plus replication into their own slapd).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use crate::listener::{Listener, ListenerOptions};
use crate::notifier::{Intake, Notifier};
use crate::slapd::{BASE, Slapd, SlapdConfig};
use crate::{Result, io_context};

/// The `replication=@FILE` settings for a listener writing `target` (bound as its update
/// DN with its `rootpw.conf`), module state below `state`.
pub fn replication_module(target: &Slapd, state: &Path) -> Result<String> {
    fs::create_dir_all(state).map_err(io_context("creating the replication state dir"))?;
    let file = state.join("replication.conf");
    let text = format!(
        "uri = {}\nbase = {BASE}\nrootpw_file = {}\nstate_dir = {}\nbackup_dir = {}\n\
         timeout = 10\n# The primary's accesslog overlay.\nexclude = auditContext\n",
        target.ldap_url(),
        target.rootpw_conf_path().display(),
        state.join("state").display(),
        state.join("backup").display()
    );
    fs::write(&file, text).map_err(io_context("writing replication.conf"))?;
    Ok(format!("replication=@{}", file.display()))
}

/// A host whose listener replicates into its own slapd.
pub struct ReplicatingHost {
    pub slapd: Slapd,
    pub listener: Listener,
    state: TempDir,
}

impl ReplicatingHost {
    /// Where the replication module keeps its state (`state/quarantine.json`).
    pub fn module_state(&self) -> PathBuf {
        self.state.path().join("state")
    }

    /// The replication module's quarantine file.
    pub fn quarantine_file(&self) -> PathBuf {
        self.module_state().join("quarantine.json")
    }
}

/// A DC Backup: its slapd ([`SlapdConfig::backup_of`]), its notifier (queue-file intake
/// from the cascade), its listener following `upstream`.
pub struct Backup {
    pub host: ReplicatingHost,
    pub notifier: Notifier,
}

impl Backup {
    /// Starts a Backup of `primary` following `upstream`; `slapd` changes the server's
    /// configuration first (e.g. fewer schema files), `options` the listener's. Waits
    /// until the replication module is ready.
    pub fn start(
        primary: &Slapd,
        upstream: &Notifier,
        slapd: impl FnOnce(SlapdConfig) -> SlapdConfig,
        options: ListenerOptions,
        timeout: Duration,
    ) -> Result<Backup> {
        let server = Slapd::start(slapd(SlapdConfig::backup_of(primary)))?;
        let notifier = Notifier::start(&server, Intake::QueueFile, &[])?;
        let state = tempfile::Builder::new()
            .prefix("backup-state-")
            .tempdir_in("/tmp")
            .map_err(io_context("creating the backup's module state dir"))?;
        let module = replication_module(&server, state.path())?;
        let mut listener = Listener::start(
            primary,
            upstream,
            options.native_module(module).cascade_into(&notifier),
        )?;
        listener.wait_modules_ready(&["replication"], timeout)?;
        Ok(Backup {
            host: ReplicatingHost {
                slapd: server,
                listener,
                state,
            },
            notifier,
        })
    }

    pub fn slapd(&self) -> &Slapd {
        &self.host.slapd
    }

    pub fn listener(&mut self) -> &mut Listener {
        &mut self.host.listener
    }
}

/// A Replica Directory Node: a UCS-like replica slapd of `primary` and a listener with the
/// jsonl and replication modules following `notifier`, reading from `ldap` (the server
/// that notifier numbers: the Primary's, or a Backup's).
pub fn start_replica(
    primary: &Slapd,
    ldap: &Slapd,
    notifier: &Notifier,
    options: ListenerOptions,
    timeout: Duration,
) -> Result<ReplicatingHost> {
    let server = Slapd::start_replica_of(primary)?;
    let state = tempfile::Builder::new()
        .prefix("replica-state-")
        .tempdir_in("/tmp")
        .map_err(io_context("creating the replica's module state dir"))?;
    let module = replication_module(&server, state.path())?;
    let mut listener = Listener::start(ldap, notifier, options.native_module(module))?;
    listener.wait_modules_ready(&["replication"], timeout)?;
    listener.wait_initialized(timeout)?;
    Ok(ReplicatingHost {
        slapd: server,
        listener,
        state,
    })
}

/// Runs `univention-directory-listener-ctrl ARGS` against `listener` (its cache, UCR file
/// and failed.ldif) with `notifier` as the notifier to compare with: success and output.
pub fn ctrl(listener: &Listener, notifier: &Notifier, args: &[&str]) -> Result<(bool, String)> {
    let mut all = vec![
        "-c".to_owned(),
        listener.cache_dir().display().to_string(),
        "--ucr-file".to_owned(),
        listener.ucr_file().display().to_string(),
        "--failed-ldif".to_owned(),
        listener.failed_ldif_path().display().to_string(),
        "--notifier-host".to_owned(),
        "127.0.0.1".to_owned(),
        "--notifier-port".to_owned(),
        notifier.port().to_string(),
    ];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let out = std::process::Command::new(crate::process::binary(
        "univention-directory-listener-ctrl",
    )?)
    .args(&all)
    .env("NO_COLOR", "1")
    .output()
    .map_err(io_context("running univention-directory-listener-ctrl"))?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}
