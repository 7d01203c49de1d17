//! `nats`: publishes every change to a NATS JetStream stream, exactly once and in
//! transaction order.
//!
//! One message per handler call, subject `<subject_prefix>.<command>` (`a`, `m`, `d`, `r`,
//! `n`: the module API's command codes, so a consumer filters e.g. `udl.d`), payload the
//! JSON of [`payload`]. Exactly once rests on three things:
//!
//! - the message id (`Nats-Msg-Id`) is `<identity>:<transaction>:<number>` ([`Call::number`]
//!   is the same on every attempt of a transaction), so the stream drops a repeat within its
//!   duplicate window: after a lost acknowledgement, a timeout or a crash of the listener;
//! - before repeating a message, the module looks at the stream's last message: if that is
//!   this one (or a later call of the same transaction), it was stored and is not sent
//!   again, which also covers a repeat after the duplicate window (one publisher per
//!   stream, see README);
//! - the handler returns only after the stream's acknowledgement (PubAck), and while NATS
//!   cannot be reached it fails *transiently*: the listener waits at the transaction and
//!   repeats the call with backoff, so its id never passes an event that is not stored.
//!
//! The module API hands over one call at a time and the listener commits each transaction
//! after its calls, so publishes are not pipelined: each waits for its acknowledgement,
//! which is also what keeps the stream in transaction order when a publish fails.
//!
//! Config keys besides the common ones (`nats=@FILE` only): `servers` (required,
//! comma-separated URLs), `stream` (default `univention-directory`), `subject_prefix`
//! (default `univention.directory`), `identity` (default: the LDAP base from `setdata`),
//! `user` and `password_file`, `tls_ca`, `tls_cert` and `tls_key`, `create_stream`
//! (default yes) and the settings of a created stream: `replicas` (1), `retention`
//! (`limits`, `interest` or `workqueue`), `max_age` (seconds, 0 = unlimited),
//! `duplicate_window` (seconds, default 3600); `ack_timeout` (seconds, default 10) and
//! `connect_timeout` (seconds, default 5).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, stream};
use async_nats::{ConnectOptions, ServerAddr};
use serde::Serialize;

use super::json::AttributeMap;
use super::{NativeError, config, default_info};
use crate::module::{Call, Command, Module, ModuleError, ModuleInfo, changed_attributes};

pub(super) const DESCRIPTION: &str = "Publishes every change to a NATS JetStream stream";

const DEFAULT_STREAM: &str = "univention-directory";
const DEFAULT_PREFIX: &str = "univention.directory";
const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Long enough to cover a listener restart and an ordinary NATS outage; the check of the
/// stream's last message covers longer ones.
const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub(super) struct Settings {
    info: ModuleInfo,
    servers: Vec<ServerAddr>,
    /// The servers as configured, for messages.
    servers_text: String,
    stream: String,
    prefix: String,
    identity: Option<String>,
    user: Option<String>,
    password_file: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    create_stream: bool,
    replicas: usize,
    retention: stream::RetentionPolicy,
    max_age: Duration,
    duplicate_window: Duration,
    ack_timeout: Duration,
    connect_timeout: Duration,
}

impl Settings {
    /// `nats=URL[,URL…]`: every default.
    pub(super) fn from_arg(servers: &str) -> Result<Settings, NativeError> {
        let mut settings = Settings::defaults();
        settings.servers = parse_servers(servers).map_err(|message| NativeError::Argument {
            kind: "nats",
            message,
        })?;
        servers.clone_into(&mut settings.servers_text);
        Ok(settings)
    }

    fn defaults() -> Settings {
        Settings {
            info: default_info("nats", DESCRIPTION, true),
            servers: Vec::new(),
            servers_text: String::new(),
            stream: DEFAULT_STREAM.to_owned(),
            prefix: DEFAULT_PREFIX.to_owned(),
            identity: None,
            user: None,
            password_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            create_stream: true,
            replicas: 1,
            retention: stream::RetentionPolicy::Limits,
            max_age: Duration::ZERO,
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            ack_timeout: DEFAULT_ACK_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// `nats=@CONFIG`.
    pub(super) fn from_config(path: &Path) -> Result<Settings, NativeError> {
        let mut s = Settings::defaults();
        config::read(path, &mut s.info, |key, value| {
            match key {
                "servers" => {
                    s.servers = parse_servers(value)?;
                    value.clone_into(&mut s.servers_text);
                }
                "stream" => s.stream = parse_name(value, &['.', '*', '>', '/', '\\', ' '])?,
                "subject_prefix" => s.prefix = parse_name(value, &['*', '>', ' '])?,
                "identity" => s.identity = Some(value.to_owned()),
                "user" => s.user = Some(value.to_owned()),
                "password_file" => s.password_file = Some(PathBuf::from(value)),
                "tls_ca" => s.tls_ca = Some(PathBuf::from(value)),
                "tls_cert" => s.tls_cert = Some(PathBuf::from(value)),
                "tls_key" => s.tls_key = Some(PathBuf::from(value)),
                "create_stream" => s.create_stream = config::parse_bool(value)?,
                "replicas" => {
                    s.replicas = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=5).contains(n))
                        .ok_or_else(|| format!("{value:?} is not a replica count (1 to 5)"))?;
                }
                "retention" => {
                    s.retention = match value {
                        "limits" => stream::RetentionPolicy::Limits,
                        "interest" => stream::RetentionPolicy::Interest,
                        "workqueue" => stream::RetentionPolicy::WorkQueue,
                        _ => {
                            return Err(format!(
                                "{value:?} is not a retention (limits, interest, workqueue)"
                            ));
                        }
                    };
                }
                "max_age" => s.max_age = parse_seconds(value, true)?,
                "duplicate_window" => s.duplicate_window = parse_seconds(value, false)?,
                "ack_timeout" => s.ack_timeout = parse_seconds(value, false)?,
                "connect_timeout" => s.connect_timeout = parse_seconds(value, false)?,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        let missing = |key| NativeError::MissingKey {
            path: path.to_owned(),
            key,
        };
        if s.servers.is_empty() {
            return Err(missing("servers"));
        }
        if s.user.is_some() != s.password_file.is_some() {
            return Err(missing(if s.user.is_some() {
                "password_file"
            } else {
                "user"
            }));
        }
        if s.tls_cert.is_some() != s.tls_key.is_some() {
            return Err(missing(if s.tls_cert.is_some() {
                "tls_key"
            } else {
                "tls_cert"
            }));
        }
        if !s.max_age.is_zero() && s.duplicate_window > s.max_age {
            // JetStream refuses a window longer than the messages live.
            s.duplicate_window = s.max_age;
        }
        Ok(s)
    }

    fn subject(&self, command: Command) -> String {
        format!("{}.{}", self.prefix, command.as_char())
    }

    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            subjects: vec![format!("{}.>", self.prefix)],
            retention: self.retention,
            max_age: self.max_age,
            num_replicas: self.replicas,
            duplicate_window: self.duplicate_window,
            storage: stream::StorageType::File,
            ..stream::Config::default()
        }
    }
}

fn parse_servers(value: &str) -> Result<Vec<ServerAddr>, String> {
    let servers = value
        .split([',', ' '])
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<ServerAddr>()
                .map_err(|e| format!("{s:?} is not a NATS server URL: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if servers.is_empty() {
        return Err("no server given".to_owned());
    }
    Ok(servers)
}

fn parse_name(value: &str, forbidden: &[char]) -> Result<String, String> {
    if value.contains(forbidden) || value.starts_with('.') || value.ends_with('.') {
        return Err(format!("{value:?} may not contain any of {forbidden:?}"));
    }
    Ok(value.to_owned())
}

fn parse_seconds(value: &str, zero_allowed: bool) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0 || (zero_allowed && *s == 0.0))
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| format!("{value:?} is not a positive number of seconds"))
}

/// The JSON payload of one message, keys in this order; `entryUUID` and
/// `univentionObjectIdentifier` only when the object has them (new state, else old).
#[derive(Serialize)]
struct Payload<'a> {
    /// The change's transaction (for the `r` of a move: the `r`'s).
    id: u64,
    /// The transaction being processed, and the call's number in it: the message id.
    transaction: u64,
    number: u32,
    time: String,
    command: char,
    dn: &'a str,
    #[serde(rename = "entryUUID", skip_serializing_if = "Option::is_none")]
    entry_uuid: Option<&'a str>,
    #[serde(
        rename = "univentionObjectIdentifier",
        skip_serializing_if = "Option::is_none"
    )]
    object_identifier: Option<&'a str>,
    changed: Vec<&'a str>,
    old: AttributeMap<'a>,
    new: AttributeMap<'a>,
}

/// The message body for `call`.
pub(crate) fn payload(call: &Call<'_>, time: SystemTime) -> Result<Vec<u8>, serde_json::Error> {
    let first = |name: &str| {
        [call.new, call.old].into_iter().find_map(|attributes| {
            attributes
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .and_then(|(_, values)| values.first())
                .and_then(|value| std::str::from_utf8(value).ok())
        })
    };
    serde_json::to_vec(&Payload {
        id: call.id,
        transaction: call.transaction,
        number: call.number,
        time: daemon::time::rfc3339_micros(time),
        command: call.command.as_char(),
        dn: call.dn,
        entry_uuid: first("entryUUID"),
        object_identifier: first("univentionObjectIdentifier"),
        changed: changed_attributes(call.new, call.old),
        old: AttributeMap(call.old),
        new: AttributeMap(call.new),
    })
}

/// A connection's JetStream context; the client under it reconnects by itself.
#[derive(Clone)]
struct Connection {
    jetstream: jetstream::Context,
}

pub(super) struct Nats {
    settings: Arc<Settings>,
    /// The module's own runtime (one worker): the handler runs on the listener's main loop
    /// (blocking work) and waits for its futures here, whatever runtime it is called from.
    runtime: Option<tokio::runtime::Runtime>,
    connection: Option<Connection>,
    /// The LDAP base from `setdata`, the default identity.
    basedn: Option<String>,
    /// The message whose last publish failed: before it is sent again, the stream is asked
    /// whether it got it. At start every first message is such a repeat (a crash may have
    /// cut the transaction short after some of its messages were stored).
    unsure: Option<String>,
    started: bool,
    /// The stream's last message id as read at the last check, while the calls of its
    /// transaction go on: every call up to it is in the stream already.
    stored_last: Option<String>,
    /// Start of the current initialisation pass (unix nanoseconds), part of the ids of its
    /// `n` messages: every pass is a new snapshot.
    init_pass: u128,
    /// Why the connection is down, from the client's events, for the error messages.
    last_event: Arc<Mutex<Option<String>>>,
}

impl Nats {
    pub(super) fn new(settings: Settings) -> Result<Nats, NativeError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("nats")
            .enable_all()
            .build()
            .map_err(|source| NativeError::Runtime { source })?;
        Ok(Nats {
            settings: Arc::new(settings),
            runtime: Some(runtime),
            connection: None,
            basedn: None,
            unsure: None,
            started: false,
            stored_last: None,
            init_pass: 0,
            last_event: Arc::new(Mutex::new(None)),
        })
    }

    /// Runs `future` on the module's runtime and waits for it (blocking). A runtime that
    /// shut down is reported like an unreachable server: the call is retried.
    fn wait<T: Send + 'static>(
        &self,
        future: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, ModuleError> {
        let Some(runtime) = &self.runtime else {
            return Err(ModuleError::transient("the module's runtime is gone"));
        };
        let (sender, receiver) = mpsc::sync_channel(1);
        runtime.spawn(async move {
            // The receiver waits for this; it is gone only if the module was dropped.
            let _ = sender.send(future.await);
        });
        receiver
            .recv()
            .map_err(|_| ModuleError::transient("the module's runtime stopped"))
    }

    fn identity(&self) -> Result<String, ModuleError> {
        self.settings
            .identity
            .clone()
            .or_else(|| self.basedn.clone())
            .ok_or_else(|| {
                // Not skippable: the listener waits until this is fixed and reloaded.
                ModuleError::transient(
                    "no identity for the message ids: set `identity` in the config file",
                )
            })
    }

    fn unavailable(&self, what: impl std::fmt::Display) -> ModuleError {
        let event = self
            .last_event
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let servers = &self.settings.servers_text;
        match event {
            Some(event) => ModuleError::transient(format!(
                "NATS {servers} (stream {}): {what} (connection: {event})",
                self.settings.stream
            )),
            None => ModuleError::transient(format!(
                "NATS {servers} (stream {}): {what}",
                self.settings.stream
            )),
        }
    }

    /// The connection, made (and the stream checked or created) if there is none.
    fn connection(&mut self) -> Result<Connection, ModuleError> {
        if let Some(connection) = &self.connection {
            return Ok(connection.clone());
        }
        let settings = Arc::clone(&self.settings);
        let events = Arc::clone(&self.last_event);
        let connection = self
            .wait(connect(settings, events))?
            .map_err(|e| self.unavailable(e))?;
        tracing::info!(
            "nats: connected, publishing to stream {} as {}.<command>",
            self.settings.stream,
            self.settings.prefix
        );
        self.connection = Some(connection.clone());
        Ok(connection)
    }

    fn message_id(&self, identity: &str, call: &Call<'_>) -> String {
        if call.command == Command::Init {
            format!(
                "{identity}:init-{}:{}:{}",
                self.init_pass, call.transaction, call.number
            )
        } else {
            format!("{identity}:{}:{}", call.transaction, call.number)
        }
    }
}

/// Connects and makes sure the stream exists (creating it if allowed).
async fn connect(
    settings: Arc<Settings>,
    events: Arc<Mutex<Option<String>>>,
) -> Result<Connection, String> {
    let mut options = ConnectOptions::new()
        .name("univention-directory-listener")
        .connection_timeout(settings.connect_timeout)
        .request_timeout(Some(settings.ack_timeout))
        // Once connected the client reconnects for ever; publishes meanwhile time out and
        // are repeated by the listener.
        .max_reconnects(None)
        .event_callback(move |event| {
            let events = Arc::clone(&events);
            async move {
                let text = match &event {
                    async_nats::Event::Connected => None,
                    other => Some(other.to_string()),
                };
                match &text {
                    Some(text) => tracing::warn!("nats: {text}"),
                    None => tracing::info!("nats: connected"),
                }
                *events.lock().unwrap_or_else(PoisonError::into_inner) = text;
            }
        });
    if let (Some(user), Some(file)) = (&settings.user, &settings.password_file) {
        let password = tokio::fs::read_to_string(file)
            .await
            .map_err(|e| format!("cannot read the password file {}: {e}", file.display()))?;
        options = options.user_and_password(user.clone(), password.trim_end().to_owned());
    }
    if let Some(ca) = &settings.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&settings.tls_cert, &settings.tls_key) {
        options = options
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    let client = options
        .connect(settings.servers.as_slice())
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut jetstream = jetstream::new(client);
    jetstream.set_timeout(settings.ack_timeout);
    let stream = if settings.create_stream {
        jetstream
            .get_or_create_stream(settings.stream_config())
            .await
            .map_err(|e| format!("cannot create the stream: {e}"))?
    } else {
        jetstream
            .get_stream(&settings.stream)
            .await
            .map_err(|e| format!("cannot find the stream (create_stream = no): {e}"))?
    };
    let window = stream.cached_info().config.duplicate_window;
    if window < settings.duplicate_window {
        tracing::warn!(
            "nats: stream {} has a duplicate window of {window:?}, less than the configured \
             {:?}",
            settings.stream,
            settings.duplicate_window
        );
    }
    Ok(Connection { jetstream })
}

/// The message id of the stream's last message, if it can be read.
async fn last_message_id(connection: Connection, stream: String) -> Option<String> {
    let mut stream = connection.jetstream.get_stream(&stream).await.ok()?;
    let last = stream.info().await.ok()?.state.last_sequence;
    if last == 0 {
        return None;
    }
    let message = stream.get_raw_message(last).await.ok()?;
    message
        .headers
        .get(async_nats::header::NATS_MESSAGE_ID)
        .map(|id| id.as_str().to_owned())
}

/// Whether `stored` (the stream's last message id) shows that `id` was stored: the same
/// message, or a later call of the same transaction (published only after this one).
fn already_stored(stored: &str, id: &str) -> bool {
    let split = |id: &str| {
        let (rest, number) = id.rsplit_once(':')?;
        Some((rest.to_owned(), number.parse::<u32>().ok()?))
    };
    match (split(stored), split(id)) {
        (Some((stored_tx, stored_n)), Some((tx, n))) => stored_tx == tx && stored_n >= n,
        _ => false,
    }
}

/// Publishes one message and waits for the stream's acknowledgement.
async fn publish(
    connection: Connection,
    stream: String,
    subject: String,
    id: String,
    payload: Vec<u8>,
) -> Result<bool, String> {
    let message = jetstream::message::PublishMessage::build()
        .payload(payload.into())
        .message_id(&id)
        .expected_stream(&stream);
    let ack = connection
        .jetstream
        .send_publish(subject, message)
        .await
        .map_err(|e| format!("cannot publish {id}: {e}"))?
        .await
        .map_err(|e| format!("no acknowledgement for {id}: {e}"))?;
    Ok(ack.duplicate)
}

impl Module for Nats {
    fn info(&self) -> &ModuleInfo {
        &self.settings.info
    }

    fn handler(&mut self, call: &Call<'_>) -> Result<(), ModuleError> {
        let identity = self.identity()?;
        let id = self.message_id(&identity, call);
        let payload = payload(call, SystemTime::now())
            .map_err(|e| ModuleError::new(format!("cannot encode {id}: {e}")))?;
        let connection = self.connection()?;
        if !self.started || self.unsure.as_deref() == Some(id.as_str()) {
            let stream = self.settings.stream.clone();
            self.stored_last = self.wait(last_message_id(connection.clone(), stream))?;
            self.started = true;
        }
        if let Some(stored) = &self.stored_last {
            if already_stored(stored, &id) {
                tracing::info!("nats: {id} is already in the stream (last there: {stored})");
                self.unsure = None;
                return Ok(());
            }
            self.stored_last = None;
        }
        let subject = self.settings.subject(call.command);
        let stream = self.settings.stream.clone();
        match self.wait(publish(connection, stream, subject, id.clone(), payload))? {
            Ok(duplicate) => {
                if duplicate {
                    tracing::info!("nats: {id} was stored before (duplicate dropped by NATS)");
                }
                self.unsure = None;
                Ok(())
            }
            Err(e) => {
                self.unsure = Some(id);
                Err(self.unavailable(e))
            }
        }
    }

    fn setdata(&mut self, key: &str, value: &str) -> Result<(), ModuleError> {
        if key == "basedn" {
            self.basedn = Some(value.to_owned());
        }
        Ok(())
    }

    fn initialize(&mut self) -> Result<(), ModuleError> {
        self.init_pass = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Ok(())
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        // Dropped on the listener's runtime (a reload): a blocking shutdown would panic.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(items: &[(&str, &[&str])]) -> Vec<(String, Vec<Vec<u8>>)> {
        items
            .iter()
            .map(|(n, vs)| {
                (
                    n.to_string(),
                    vs.iter().map(|v| v.as_bytes().to_vec()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn payload_has_identifiers_and_changed_attributes() {
        let old = attrs(&[("entryUUID", &["u-1"]), ("cn", &["a"]), ("mail", &["m"])]);
        let new = attrs(&[
            ("entryUUID", &["u-1"]),
            ("univentionObjectIdentifier", &["o-1"]),
            ("cn", &["b"]),
        ]);
        let call = Call {
            id: 6,
            dn: "cn=b,dc=x",
            command: Command::Modify,
            new: &new,
            old: &old,
            transaction: 7,
            number: 2,
        };
        let time = UNIX_EPOCH + Duration::new(1_795_255_200, 123_456_789);
        let json = String::from_utf8(payload(&call, time).unwrap()).unwrap();
        assert_eq!(
            json,
            concat!(
                r#"{"id":6,"transaction":7,"number":2,"time":"2026-11-21T10:00:00.123456Z","#,
                r#""command":"m","dn":"cn=b,dc=x","entryUUID":"u-1","#,
                r#""univentionObjectIdentifier":"o-1","changed":["univentionObjectIdentifier","cn","mail"],"#,
                r#""old":{"entryUUID":["u-1"],"cn":["a"],"mail":["m"]},"#,
                r#""new":{"entryUUID":["u-1"],"univentionObjectIdentifier":["o-1"],"cn":["b"]}}"#
            )
        );
        let delete = Call {
            command: Command::Delete,
            new: &[],
            old: &old,
            ..call
        };
        let json: serde_json::Value =
            serde_json::from_slice(&payload(&delete, time).unwrap()).unwrap();
        assert_eq!(json["entryUUID"], "u-1");
        assert!(json.get("univentionObjectIdentifier").is_none());
    }

    #[test]
    fn stored_means_same_transaction_same_or_later_call() {
        assert!(already_stored("dc=x:7:1", "dc=x:7:1"));
        assert!(already_stored("dc=x:7:3", "dc=x:7:2"));
        assert!(!already_stored("dc=x:7:1", "dc=x:7:2"));
        assert!(!already_stored("dc=x:6:9", "dc=x:7:1"));
        assert!(
            !already_stored("dc=x:8:1", "dc=x:7:1"),
            "never across transactions"
        );
        assert!(!already_stored("dc=y:7:1", "dc=x:7:1"));
        assert!(!already_stored("dc=x:init-5:7:1", "dc=x:7:1"));
        assert!(!already_stored("junk", "dc=x:7:1"));
    }

    #[test]
    fn config_file() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("nats.conf");
        std::fs::write(
            &conf,
            "name = export\nservers = nats://127.0.0.1:4222, nats://127.0.0.1:4223\n\
             stream = directory\nsubject_prefix = ucs.ldap\nreplicas = 3\n\
             retention = interest\nmax_age = 60\nduplicate_window = 600\nfilter = (uid=*)\n",
        )
        .unwrap();
        let settings = Settings::from_config(&conf).unwrap();
        assert_eq!(settings.info.name, "export");
        assert_eq!(settings.servers.len(), 2);
        assert_eq!(settings.subject(Command::Delete), "ucs.ldap.d");
        let stream = settings.stream_config();
        assert_eq!(stream.subjects, ["ucs.ldap.>"]);
        assert_eq!(stream.num_replicas, 3);
        assert_eq!(stream.retention, stream::RetentionPolicy::Interest);
        // Never longer than the messages live.
        assert_eq!(stream.duplicate_window, Duration::from_secs(60));

        let cases = [
            ("stream = a.b\nservers = nats://x", "may not contain"),
            ("servers = nats://x\nreplicas = 9", "not a replica count"),
            ("servers = nats://x\nretention = forever", "not a retention"),
            (
                "servers = nats://x\nuser = u",
                "missing required key \"password_file\"",
            ),
            ("name = x", "missing required key \"servers\""),
        ];
        for (text, needle) in cases {
            std::fs::write(&conf, text).unwrap();
            let error = Settings::from_config(&conf).unwrap_err().to_string();
            assert!(error.contains(needle), "{text:?}: {error}");
        }
    }

    #[test]
    fn unreachable_server_is_a_transient_failure() {
        // A port nobody listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut settings = Settings::from_arg(&format!("nats://127.0.0.1:{port}")).unwrap();
        settings.connect_timeout = Duration::from_secs(1);
        let mut module = Nats::new(settings).unwrap();
        module.setdata("basedn", "dc=x").unwrap();
        let call = Call {
            id: 1,
            dn: "cn=a,dc=x",
            command: Command::Add,
            new: &[],
            old: &[],
            transaction: 1,
            number: 1,
        };
        let error = module.handler(&call).unwrap_err();
        assert!(error.is_transient(), "{error}");
        assert!(error.message().contains("cannot connect"), "{error}");
    }
}
