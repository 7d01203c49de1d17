//! A UCS-like Replica slapd run as a daemon, the way systemd runs one, with a service script
//! (`<dir>/slapd-service start|stop`) that another process (the listener's `replication`
//! module, for its offline initialisation) can use to stop and start it, like
//! `systemctl stop|start slapd`. Configured as [`crate::Slapd::start_replica_of`]'s replica:
//! the primary's schema (or a chosen list), the main database [`BASE`] with rootdn and
//! updatedn [`UPDATE_DN`] (password in `rootpw.conf`), `updateref` to the primary, the
//! same ACLs (the host account cannot see [`crate::slapd::RESTRICTED_DN`]), empty at start.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ldap3::LdapConn;
use tempfile::TempDir;

use crate::directory::Directory;
use crate::net::{free_port, is_listening};
use crate::slapd::{
    ADMIN_DN, ADMIN_PW, BASE, HOST_DN, RESTRICTED_DN, SCHEMA_FILES, Slapd, UPDATE_DN, UPDATE_PW,
};
use crate::{HarnessError, Result, io_context, ldap_context, wait_until};

const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Set (to anything): every replica runs with `dbnosync` (for benchmarks that look at
/// where the time of a write goes).
pub const NOSYNC_ENV: &str = "BENCH_REPL_NOSYNC";

/// A daemonised replica slapd; stopped (by its pid file) on drop.
pub struct ServiceReplica {
    dir: Option<TempDir>,
    path: PathBuf,
    port: u16,
    primary_url: String,
    /// A `syncrepl` consumer's line for the main database.
    database_extra: String,
    /// `dbnosync` on the main database.
    nosync: bool,
}

impl ServiceReplica {
    /// A running, empty replica of `primary` with the harness's schema files.
    pub fn start(primary: &Slapd) -> Result<ServiceReplica> {
        let schema: Vec<PathBuf> = SCHEMA_FILES.iter().map(PathBuf::from).collect();
        ServiceReplica::start_with_schema(primary, &schema)
    }

    /// A running, empty replica of `primary` that loads `schema`.
    pub fn start_with_schema(primary: &Slapd, schema: &[PathBuf]) -> Result<ServiceReplica> {
        ServiceReplica::start_with(primary, schema, String::new())
    }

    /// The reference a replica is measured against: the same replica, but an OpenLDAP
    /// syncrepl consumer (plain refreshAndPersist, bound as [`ADMIN_DN`]) of `primary`,
    /// which must run syncprov on its main database (the harness provider does).
    pub fn start_syncrepl_consumer(primary: &Slapd) -> Result<ServiceReplica> {
        let schema: Vec<PathBuf> = SCHEMA_FILES.iter().map(PathBuf::from).collect();
        let syncrepl = format!(
            "syncrepl rid=001 provider={} bindmethod=simple binddn=\"{ADMIN_DN}\" \
             credentials={ADMIN_PW} searchbase=\"{BASE}\" type=refreshAndPersist \
             retry=\"1 +\" timeout=3\n",
            primary.ldap_url()
        );
        ServiceReplica::start_with(primary, &schema, syncrepl)
    }

    fn start_with(
        primary: &Slapd,
        schema: &[PathBuf],
        database_extra: String,
    ) -> Result<ServiceReplica> {
        let dir = tempfile::Builder::new()
            .prefix("replica-service-")
            .tempdir_in("/tmp")
            .map_err(io_context("creating the replica directory"))?;
        let path = dir.path().to_path_buf();
        fs::create_dir(path.join("data")).map_err(io_context("creating data"))?;
        fs::write(
            path.join("rootpw.conf"),
            format!("rootpw \"{UPDATE_PW}\"\n"),
        )
        .map_err(io_context("writing rootpw.conf"))?;
        let replica = ServiceReplica {
            dir: Some(dir),
            path,
            port: free_port()?,
            primary_url: primary.ldap_url(),
            database_extra,
            nosync: std::env::var_os(NOSYNC_ENV).is_some(),
        };
        replica.write_config(schema)?;
        replica.write_script()?;
        replica.service("start")?;
        Ok(replica)
    }

    /// Rewrites `slapd.conf` to load `schema`; slapd reads it at its next start.
    pub fn write_config(&self, schema: &[PathBuf]) -> Result<()> {
        let d = self.path.display();
        // What makes the database a shadow that accepts `updateref`: a syncrepl consumer
        // writes its copy itself (and may not have an `updatedn` as well).
        let shadow = if self.database_extra.is_empty() {
            format!("updatedn \"{UPDATE_DN}\"\n")
        } else {
            self.database_extra.clone()
        };
        let nosync = if self.nosync { "dbnosync\n" } else { "" };
        let mut conf: String = schema
            .iter()
            .map(|file| format!("include {}\n", file.display()))
            .collect();
        conf.push_str(&format!(
            "pidfile {d}/slapd.pid
argsfile {d}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
sizelimit unlimited
database mdb
suffix \"{BASE}\"
rootdn \"{UPDATE_DN}\"
include {d}/rootpw.conf
{shadow}updateref \"{}\"
directory {d}/data
{nosync}maxsize 4294967296
index objectClass eq
index entryCSN,entryUUID eq
index uid,cn eq
access to dn.subtree=\"{RESTRICTED_DN}\" by dn.exact=\"{HOST_DN}\" none by users read by * none
access to attrs=userPassword by self write by anonymous auth by * none
access to * by users read by * none
",
            self.primary_url
        ));
        fs::write(self.conf_path(), conf).map_err(io_context("writing slapd.conf"))
    }

    fn write_script(&self) -> Result<()> {
        let d = self.path.display();
        let port = self.port;
        // slapd daemonises once it listens (OpenLDAP 2.5 waits for the child's start-up).
        let script = format!(
            "#!/bin/sh
# start|stop the replica slapd in {d}, as `systemctl start|stop slapd` would.
set -e
case \"$1\" in
start)
    /usr/sbin/slapd -f {d}/slapd.conf -h ldap://127.0.0.1:{port}/ ;;
stop)
    [ -f {d}/slapd.pid ] || exit 0
    pid=$(cat {d}/slapd.pid)
    if kill \"$pid\" 2>/dev/null; then
        i=0
        while kill -0 \"$pid\" 2>/dev/null; do
            i=$((i + 1))
            if [ $i -gt 600 ]; then kill -9 \"$pid\" 2>/dev/null || true; fi
            sleep 0.05
        done
    fi
    rm -f {d}/slapd.pid ;;
*)
    echo \"usage: $0 start|stop\" >&2
    exit 2 ;;
esac
"
        );
        let file = self.script_path();
        fs::write(&file, script).map_err(io_context("writing slapd-service"))?;
        fs::set_permissions(&file, fs::Permissions::from_mode(0o755))
            .map_err(io_context("making slapd-service executable"))
    }

    /// Runs `slapd-service start|stop`; a start waits until slapd listens.
    pub fn service(&self, action: &str) -> Result<()> {
        let output = Command::new(self.script_path())
            .arg(action)
            .output()
            .map_err(io_context(format!("running slapd-service {action}")))?;
        if !output.status.success() {
            return Err(HarnessError::SlapdStart(format!(
                "slapd-service {action} exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        if action == "start" {
            let port = self.port;
            wait_until("the replica slapd listening", START_TIMEOUT, || {
                Ok(is_listening(port).then_some(()))
            })?;
        }
        Ok(())
    }

    pub fn script_path(&self) -> PathBuf {
        self.path.join("slapd-service")
    }

    /// The command that stops this slapd (waits until it has exited).
    pub fn stop_command(&self) -> String {
        format!("{} stop", self.script_path().display())
    }

    /// The command that starts this slapd.
    pub fn start_command(&self) -> String {
        format!("{} start", self.script_path().display())
    }

    pub fn dir(&self) -> &Path {
        &self.path
    }

    pub fn conf_path(&self) -> PathBuf {
        self.path.join("slapd.conf")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.path.join("data")
    }

    pub fn rootpw_conf_path(&self) -> PathBuf {
        self.path.join("rootpw.conf")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `contextCSN` of the base entry (a syncrepl consumer's progress), if any.
    pub fn context_csn(&self) -> Option<String> {
        let mut admin = self.admin().ok()?;
        let entry = admin.get(BASE).ok()??;
        entry.first("contextCSN").map(str::to_owned)
    }

    pub fn ldap_url(&self) -> String {
        format!("ldap://127.0.0.1:{}/", self.port)
    }

    /// Bound as the update DN.
    pub fn admin(&self) -> Result<Directory> {
        let url = self.ldap_url();
        let mut conn = LdapConn::new(&url).map_err(ldap_context(format!("connecting to {url}")))?;
        conn.simple_bind(UPDATE_DN, UPDATE_PW)
            .and_then(|r| r.success())
            .map_err(ldap_context(format!("binding as {UPDATE_DN}")))?;
        Ok(Directory::new(conn))
    }

    /// The `replication` module's config for this replica: local URI, base, `rootpw.conf`,
    /// state and backup below `state`, the offline initialisation's commands and paths, the
    /// primary at `primary_url`, then `extra` lines. Returns the file.
    pub fn module_config(&self, state: &Path, primary_url: &str, extra: &str) -> Result<PathBuf> {
        fs::create_dir_all(state).map_err(io_context("creating the module state dir"))?;
        let file = state.join("replication.conf");
        let text = format!(
            "uri = {}
base = {BASE}
rootpw_file = {}
state_dir = {}
backup_dir = {}
timeout = 30
# The primary's accesslog overlay: unknown to a replica.
exclude = auditContext
slapd_stop = {}
slapd_start = {}
slapd_config = {}
database_dir = {}
primary_uri = {primary_url}
{extra}
",
            self.ldap_url(),
            self.rootpw_conf_path().display(),
            state.join("state").display(),
            state.join("backup").display(),
            self.stop_command(),
            self.start_command(),
            self.conf_path().display(),
            self.data_dir().display(),
        );
        fs::write(&file, text).map_err(io_context("writing the module config"))?;
        Ok(file)
    }
}

impl Drop for ServiceReplica {
    fn drop(&mut self) {
        let _ = self.service("stop");
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!(
                "test failed: replica directory kept for diagnosis at {}",
                kept.display()
            );
        }
    }
}

/// A sample directory below [`BASE`] as LDIF for `slapadd` (parents first): `ou=people`
/// with `users` inetOrgPersons (non-ASCII names, a binary `jpegPhoto`, some descriptions
/// with emoji), `ou=groups` with a groupOfUniqueNames per 100 users and a posixGroup (so a
/// replica without nis.schema refuses it).
pub fn sample_directory_ldif(users: usize) -> String {
    use base64::Engine as _;
    let b64 = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
    let mut out = String::with_capacity(users * 400);
    for ou in ["people", "groups"] {
        out.push_str(&format!(
            "dn: ou={ou},{BASE}\nobjectClass: organizationalUnit\nou: {ou}\n\n"
        ));
    }
    for i in 0..users {
        let photo: Vec<u8> = (0..64u32)
            .map(|b| ((b * 7 + i as u32) % 256) as u8)
            .collect();
        out.push_str(&format!(
            "dn: uid=user{i},ou=people,{BASE}\nobjectClass: inetOrgPerson\nuid: user{i}\n\
             cn:: {}\nsn:: {}\nmail: user{i}@example.com\njpegPhoto:: {}\n",
            b64(format!("Jürgen Müller {i} ✓").as_bytes()),
            b64("Müller".as_bytes()),
            b64(&photo),
        ));
        if i % 3 == 0 {
            out.push_str(&format!(
                "description:: {}\n",
                b64(format!("Grüße {i}, 日本, \u{1F600}").as_bytes())
            ));
        }
        out.push('\n');
    }
    for g in 0..users.div_ceil(100) {
        out.push_str(&format!(
            "dn: cn=group{g},ou=groups,{BASE}\nobjectClass: groupOfUniqueNames\ncn: group{g}\n"
        ));
        for i in (g * 100)..((g + 1) * 100).min(users) {
            out.push_str(&format!("uniqueMember: uid=user{i},ou=people,{BASE}\n"));
        }
        out.push('\n');
    }
    out.push_str(&format!(
        "dn: cn=posix,ou=groups,{BASE}\nobjectClass: posixGroup\ncn: posix\ngidNumber: 5000\n\
         memberUid: user0\nmemberUid: user1\n\n"
    ));
    out
}
