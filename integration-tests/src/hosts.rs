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

/// `univention-directory-backup2master` for `backup`, the old Primary at `old_ldap_port`
/// and `old_notifier_port` on 127.0.0.1, with state and log below `log_dir`; `extra` adds
/// options (`--execute`, `--force`, `--intake file`; accesslog by default), `kill_after` the test hook that SIGKILLs the run after
/// a step. Exit status (`None`: killed by a signal) and output.
pub fn backup2master(
    backup: &Backup,
    old_ldap_port: u16,
    old_notifier_port: u16,
    log_dir: &Path,
    extra: &[&str],
    kill_after: Option<&str>,
) -> Result<(Option<i32>, String)> {
    let listener = &backup.host.listener;
    let mut args: Vec<String> = vec!["--no-restart".into()];
    if !extra.contains(&"--intake") {
        args.extend(["--intake".into(), "accesslog".into()]);
    }
    args.extend([
        "--accesslog-uri".into(),
        backup.host.slapd.ldapi_url(),
        "--ucr-file".into(),
        backup.notifier.ucr_file().display().to_string(),
        "-c".into(),
        listener.cache_dir().display().to_string(),
        "--ldap-dir".into(),
        backup.notifier.ldap_dir().display().to_string(),
        "--replication-state".into(),
        backup.host.module_state().display().to_string(),
        "--failed-ldif".into(),
        listener.failed_ldif_path().display().to_string(),
        "--log-dir".into(),
        log_dir.display().to_string(),
        "--old-primary".into(),
        "127.0.0.1".into(),
        "--old-ldap-port".into(),
        old_ldap_port.to_string(),
        "--old-notifier-port".into(),
        old_notifier_port.to_string(),
        "--notifier-port".into(),
        backup.notifier.port().to_string(),
        "--fqdn".into(),
        "127.0.0.1".into(),
    ]);
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let mut command = std::process::Command::new(crate::process::binary(
        "univention-directory-backup2master",
    )?);
    command.args(&args);
    match kill_after {
        Some(step) => command.env("UDR_BACKUP2MASTER_KILL_AFTER", step),
        None => command.env_remove("UDR_BACKUP2MASTER_KILL_AFTER"),
    };
    let out = command
        .output()
        .map_err(io_context("running univention-directory-backup2master"))?;
    Ok((
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// What an administrator does after `backup2master --no-restart` on this Backup: slapd
/// restarted as a Primary (its templates no longer make it a shadow of the old Primary) and
/// the notifier restarted with the intake the promotion set in UCR.
pub fn restart_as_primary(backup: &mut Backup) -> Result<()> {
    backup.host.slapd.reconfigure(|c| c.replica_of = None)?;
    let uri = backup.host.slapd.ldapi_url();
    backup.notifier.add_args(&["--accesslog-uri", &uri]);
    backup.notifier.restart()
}

/// What differs between a Primary and the hosts that copy it, by nature.
pub fn host_comparison() -> crate::compare::Comparison {
    crate::compare::Comparison::new()
        .exclude("contextCSN")
        .exclude("auditContext")
        .exclude("entryDN")
        .exclude("subschemaSubentry")
        .exclude("hasSubordinates")
}

/// A Primary: slapd with accesslog and a notifier following it.
pub fn start_primary(wait: Duration) -> Result<(Slapd, Notifier)> {
    let primary = Slapd::start(SlapdConfig::provider().dbnosync(true))?;
    let notifier = Notifier::following_accesslog(&primary, &[], wait)?;
    Ok((primary, notifier))
}

/// Adds, modifies, a rename, a move across containers and deletes below `ou=<tag>`, with
/// `pace` called after every write; returns the last DN, written with `d`.
pub fn mixed_writes(
    admin: &mut crate::Directory,
    tag: &str,
    n: usize,
    pace: &mut dyn FnMut(),
) -> Result<String> {
    let ou = format!("ou={tag},{BASE}");
    admin.add(
        &ou,
        &[("objectClass", &["organizationalUnit"]), ("ou", &[tag])],
    )?;
    pace();
    for i in 0..n {
        let dn = format!("cn=r{i},{ou}");
        admin.add_role(&dn, &format!("r{i}"))?;
        pace();
        admin.modify(
            &dn,
            vec![ldap3::Mod::Replace(
                b"description".to_vec(),
                [format!("{tag} {i} Ü").into_bytes()].into(),
            )],
        )?;
        pace();
    }
    admin.modrdn(
        &format!("cn=r0,{ou}"),
        &format!("cn={tag}-renamed"),
        true,
        None,
    )?;
    pace();
    admin.modrdn(
        &format!("cn=r1,{ou}"),
        &format!("cn={tag}-moved"),
        true,
        Some(BASE),
    )?;
    pace();
    admin.delete(&format!("cn={tag}-moved,{BASE}"))?;
    pace();
    let last = format!("cn=r2,{ou}");
    admin.delete(&last)?;
    pace();
    Ok(last)
}

/// Waits until `notifier` (a Backup's) has logged exactly the transactions `upstream` has, and
/// serves the last of them.
pub fn wait_same_transactions(
    upstream: &Notifier,
    notifier: &Notifier,
    wait: Duration,
) -> Result<()> {
    crate::wait_until(
        "the Backup's notifier to log the Primary's transactions",
        wait,
        || {
            let want = upstream.transactions();
            if want.is_empty() || notifier.transactions() != want {
                return Ok(None);
            }
            // Logged is not yet served: the notifier announces an id after its sync.
            let last: Option<u64> = want
                .lines()
                .last()
                .and_then(|line| line.split(' ').next())
                .and_then(|id| id.parse().ok());
            Ok((Some(notifier.last_id()?) == last).then_some(()))
        },
    )
}
