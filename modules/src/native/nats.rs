//! `nats`: publishes every change to a NATS JetStream stream, exactly once and in
//! transaction order.
//!
//! One message per handler call, subject `<subject_prefix>.<command>` (`a`, `m`, `d`, `r`,
//! `n`: the module API's command codes, so a consumer filters e.g. `udl.d`), payload the
//! JSON of [`payload`]. Exactly once rests on these:
//!
//! - the message id (`Nats-Msg-Id`) is `<identity>:<transaction>:<number>` ([`Call::number`]
//!   is the same on every attempt of a transaction), so the stream drops a repeat within its
//!   duplicate window: after a lost acknowledgement, a timeout or a crash of the listener;
//! - the outbox ([`super::outbox`]): the handler appends the message to a file in
//!   `state_dir` and hands it to the publisher task, which publishes without waiting and
//!   collects the acknowledgements (PubAcks) in order; acknowledged messages leave the
//!   outbox. So the handler returns before the acknowledgement and publishes overlap, but a
//!   message the listener has passed is in the outbox or in the stream. At start and after
//!   a failed publish the outbox is published again, in order, before anything new;
//! - each message names the one published before it (`Nats-Expected-Last-Msg-Id`) unless
//!   that was acknowledged already: the stream refuses a message whose predecessor was lost,
//!   so a lost publish cannot be overtaken and the stream stays in transaction order;
//! - before publishing the outbox again, the module looks at the stream's last message:
//!   the outbox messages up to it are stored (in order, see above) and are not sent again,
//!   and neither are later calls of a transaction whose last message is there, which also
//!   covers a repeat after the duplicate window (one publisher per stream, see README);
//! - while NATS cannot be reached, acknowledgements stall or the outbox is full
//!   (`outbox_limit`), the handler fails *transiently*: the listener waits at the
//!   transaction and repeats the call with backoff, so its id never passes an event that
//!   is neither stored nor in the outbox.
//!
//! Config keys besides the common ones (`nats=@FILE` only): `servers` (required,
//! comma-separated URLs), `stream` (default `univention-directory`), `subject_prefix`
//! (default `univention.directory`), `identity` (default: the LDAP base from `setdata`),
//! `user` and `password_file`, `tls_ca`, `tls_cert` and `tls_key`, `create_stream`
//! (default yes) and the settings of a created stream: `replicas` (1), `retention`
//! (`limits`, `interest` or `workqueue`), `max_age` (seconds, 0 = unlimited),
//! `duplicate_window` (seconds, default 3600); `ack_timeout` (seconds, default 10, at most a day),
//! `connect_timeout` (seconds, default 5, at most a day), `state_dir` (the outbox `<name>.outbox`;
//! default `/var/lib/univention-directory-listener/nats`) and `outbox_limit` (messages
//! not yet acknowledged before the listener waits, default 1000).

use std::collections::VecDeque;
use std::future::{Future, IntoFuture as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, stream};
use async_nats::{ConnectOptions, ServerAddr};
use serde::Serialize;

use super::json::AttributeMap;
use super::outbox::{Message, Outbox, OutboxError};
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
const DEFAULT_STATE_DIR: &str = "/var/lib/univention-directory-listener/nats";
/// Enough to keep publishes overlapping and to ride out a short hiccup of NATS; small
/// enough that a replay after an outage is quick.
const DEFAULT_OUTBOX_LIMIT: usize = 1000;

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
    state_dir: PathBuf,
    outbox_limit: usize,
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
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            outbox_limit: DEFAULT_OUTBOX_LIMIT,
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
                "ack_timeout" => s.ack_timeout = parse_timeout(value)?,
                "connect_timeout" => s.connect_timeout = parse_timeout(value)?,
                "state_dir" => s.state_dir = PathBuf::from(value),
                "outbox_limit" => {
                    s.outbox_limit = value
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| format!("{value:?} is not a positive message count"))?;
                }
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

/// Longest `ack_timeout` / `connect_timeout`: the publisher waits multiples of them, which
/// must not overflow, and a day is already no timeout an operator wants.
const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

fn parse_timeout(value: &str) -> Result<Duration, String> {
    let timeout = parse_seconds(value, false)?;
    if timeout > MAX_TIMEOUT {
        return Err(format!(
            "{value:?} seconds is longer than the longest timeout, {} seconds",
            MAX_TIMEOUT.as_secs()
        ));
    }
    Ok(timeout)
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
    /// The largest message (headers and payload) the server and the stream accept.
    max_message: usize,
}

/// Room for the headers of a message besides its two ids and the stream name
/// (`NATS/1.0`, the header names, line ends).
const HEADER_ROOM: usize = 128;

/// What the publisher task reports back to the handler.
#[derive(Debug, Default)]
struct Progress {
    /// Messages acknowledged by the stream (or found stored) so far, in publish order.
    acknowledged: usize,
    /// Why publishing stopped, until the next acknowledgement: the task publishes the
    /// unacknowledged messages again after a backoff, and the handler takes no new ones.
    failing: Option<String>,
}

/// The publisher task's reports and a condition to wait for the next one.
#[derive(Default)]
struct Shared {
    progress: Mutex<Progress>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn acknowledged(&self, count: usize) {
        let mut progress = self.lock();
        progress.acknowledged += count;
        progress.failing = None;
        drop(progress);
        self.changed.notify_all();
    }

    fn failing(&self, error: String) {
        self.lock().failing = Some(error);
        self.changed.notify_all();
    }
}

/// Work for the publisher task.
enum Job {
    /// The outbox as the last run left it: checked against the stream, then published.
    Resume(Vec<Message>),
    /// A new message, after everything handed over before.
    Publish(Message),
}

type AckFuture =
    Pin<Box<dyn Future<Output = Result<jetstream::publish::PublishAck, PublishError>> + Send>>;

/// A message not yet acknowledged, with its acknowledgement to come (none while it has
/// to be sent again).
struct Entry {
    message: Message,
    ack: Option<AckFuture>,
}

/// First and longest wait before the unacknowledged messages are published again.
const REPUBLISH_FIRST: Duration = Duration::from_millis(250);
const REPUBLISH_MAX: Duration = Duration::from_secs(5);

/// Publishes messages in order without waiting for acknowledgements and collects those in
/// order. When a publish fails, every unacknowledged message is published again after a
/// backoff: first those the stream already has (its last message is one of them) are
/// counted as acknowledged, then the rest go out again, chained, in order.
struct Publisher {
    connection: Connection,
    stream: String,
    shared: Arc<Shared>,
    queue: VecDeque<Entry>,
    /// `ack_timeout`: the longest wait for any one step (a publish, an acknowledgement, a
    /// request), so that a connection that died under a step cannot stall the publisher.
    timeout: Duration,
    /// Set while publishing is broken: when to try again and the wait after that.
    retry: Option<tokio::time::Instant>,
    /// The wait after the next failure: doubles with every failure, back to the first
    /// once an acknowledgement comes (failing acknowledgements back off too, so rounds of
    /// timed-out publishes do not pile up).
    backoff: Duration,
    /// The last sign of progress (an acknowledgement, or a send to an idle publisher):
    /// when the oldest message has no answer for twice `ack_timeout` after it, the
    /// publisher fails and recovers whatever the reason (a lost answer, a stuck step).
    progress_at: tokio::time::Instant,
}

impl Publisher {
    async fn run(mut self, mut jobs: tokio::sync::mpsc::UnboundedReceiver<Job>) {
        loop {
            let retry_at = self.retry;
            let stall_at = (self.retry.is_none() && !self.queue.is_empty())
                .then(|| self.progress_at + self.timeout * 2);
            tokio::select! {
                biased;
                job = jobs.recv() => match job {
                    None => return,
                    Some(Job::Resume(messages)) => {
                        self.queue.extend(messages.into_iter().map(|message| Entry { message, ack: None }));
                        // Check the stream before anything goes out.
                        self.retry = Some(tokio::time::Instant::now());
                    }
                    Some(Job::Publish(message)) => {
                        if self.queue.is_empty() {
                            self.progress_at = tokio::time::Instant::now();
                        }
                        self.queue.push_back(Entry { message, ack: None });
                        if self.retry.is_none() {
                            self.send(self.queue.len() - 1).await;
                        }
                    }
                },
                (id, result) = next_ack(&mut self.queue), if self.retry.is_none() => match result {
                    Ok(ack) => {
                        if ack.duplicate {
                            tracing::info!("nats: {id} was stored before (duplicate dropped by NATS)");
                        }
                        self.backoff = REPUBLISH_FIRST;
                        self.progress_at = tokio::time::Instant::now();
                        self.shared.acknowledged(1);
                    }
                    Err(e) => self.fail(format!("no acknowledgement for {id}: {e}")),
                },
                () = sleep_until(retry_at) => self.republish().await,
                () = sleep_until(stall_at) => {
                    let id = self.queue.front().map(|e| e.message.id.clone()).unwrap_or_default();
                    self.fail(format!("no answer for {id} within {:?}", self.timeout * 2));
                }
            }
        }
    }

    /// Publishes entry `index`, naming the one before it (unacknowledged) as the stream's
    /// expected last message.
    async fn send(&mut self, index: usize) {
        let after = index
            .checked_sub(1)
            .and_then(|i| self.queue.get(i))
            .map(|e| e.message.id.clone());
        let Some(entry) = self.queue.get(index) else {
            return;
        };
        let id = entry.message.id.clone();
        let mut message = jetstream::message::PublishMessage::build()
            .payload(entry.message.payload.clone())
            .message_id(&id)
            .expected_stream(&self.stream);
        if let Some(after) = &after {
            message = message.expected_last_message_id(after);
        }
        let subject = entry.message.subject.clone();
        // Bounded as a whole: waiting for a publish permit is not.
        let sent = tokio::time::timeout(
            self.timeout,
            self.connection.jetstream.send_publish(subject, message),
        )
        .await;
        match sent {
            Ok(Ok(ack)) => {
                if let Some(entry) = self.queue.get_mut(index) {
                    let ack = ack.into_future();
                    let timeout = self.timeout;
                    // The client bounds the wait as well; this makes sure nothing hangs.
                    entry.ack = Some(Box::pin(async move {
                        tokio::time::timeout(timeout, ack)
                            .await
                            .unwrap_or_else(|_| Err(PublishError::new(PublishErrorKind::TimedOut)))
                    }));
                }
            }
            Ok(Err(e)) => self.fail(format!("cannot publish {id}: {e}")),
            Err(_) => self.fail(format!(
                "cannot publish {id}: no room to send within {:?}",
                self.timeout
            )),
        }
    }

    /// Publishing broke: nothing sent is waited for any more; all of it goes out again
    /// after the backoff. Every failure comes here, logged with its reason.
    fn fail(&mut self, error: String) {
        if self.retry.is_some() {
            return;
        }
        let wait = self.backoff;
        self.backoff = (wait * 2).min(REPUBLISH_MAX);
        tracing::warn!("nats: {error}; publishing the unacknowledged messages again in {wait:?}");
        for entry in &mut self.queue {
            entry.ack = None;
        }
        self.shared.failing(error);
        self.retry = Some(tokio::time::Instant::now() + wait);
    }

    async fn republish(&mut self) {
        if self.retry.take().is_none() {
            return;
        }
        let lookup = last_message_id(self.connection.clone(), self.stream.clone());
        // Three requests, each bounded by the client; the whole bounded here.
        let last = match tokio::time::timeout(self.timeout * 3, lookup).await {
            Ok(Ok(last)) => last,
            Ok(Err(e)) => return self.fail(e),
            Err(_) => {
                return self.fail(format!(
                    "no answer within {:?} for the stream's last message",
                    self.timeout * 3
                ));
            }
        };
        // The stream stores these messages in order: if its last message is one of them,
        // so are the ones before it.
        let stored = last
            .as_ref()
            .and_then(|last| self.queue.iter().position(|e| &e.message.id == last));
        if let Some(at) = stored {
            self.queue.drain(..=at);
            self.backoff = REPUBLISH_FIRST;
            self.shared.acknowledged(at + 1);
        }
        if self.queue.is_empty() {
            self.shared.acknowledged(0);
            return;
        }
        tracing::info!(
            "nats: publishing {} unacknowledged message(s) again",
            self.queue.len()
        );
        self.progress_at = tokio::time::Instant::now();
        for index in 0..self.queue.len() {
            self.send(index).await;
            if self.retry.is_some() {
                // `send` failed and scheduled the next round.
                return;
            }
        }
    }
}

/// The oldest publish's acknowledgement with its message id (never ready while nothing is
/// in flight). Only an acknowledged message leaves the queue: a failed one stays first, to
/// be found in the stream or published again.
async fn next_ack(
    queue: &mut VecDeque<Entry>,
) -> (String, Result<jetstream::publish::PublishAck, PublishError>) {
    let Some(entry) = queue.front_mut() else {
        return std::future::pending().await;
    };
    let Some(ack) = entry.ack.as_mut() else {
        return std::future::pending().await;
    };
    let result = ack.as_mut().await;
    entry.ack = None;
    let id = entry.message.id.clone();
    if result.is_ok() {
        queue.pop_front();
    }
    (id, result)
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

pub(super) struct Nats {
    settings: Arc<Settings>,
    /// The module's own runtime (one worker): the handler runs on the listener's main loop
    /// (blocking work) and waits for its futures here, whatever runtime it is called from.
    runtime: Option<tokio::runtime::Runtime>,
    /// Messages published and not yet acknowledged, on disk.
    outbox: Outbox,
    /// The publisher task's queue (there once connected).
    jobs: Option<tokio::sync::mpsc::UnboundedSender<Job>>,
    shared: Arc<Shared>,
    /// How many of the publisher's acknowledgements the outbox has dropped.
    applied: usize,
    /// Whether the outbox left by the last run was handed to the publisher.
    resumed: bool,
    /// The last message id known to be stored or in the outbox at start, while the calls
    /// of its transaction are repeated (a crash cut it short): every call up to it is
    /// there already.
    stored_last: Option<String>,
    /// The LDAP base from `setdata`, the default identity.
    basedn: Option<String>,
    /// Start of the current initialisation pass (unix nanoseconds), part of the ids of its
    /// `n` messages: every pass is a new snapshot.
    init_pass: u128,
    /// Why the connection is down, from the client's events, for the error messages.
    last_event: Arc<Mutex<Option<String>>>,
    /// [`Connection::max_message`], once connected.
    max_message: Option<usize>,
}

impl Nats {
    pub(super) fn new(settings: Settings) -> Result<Nats, NativeError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("nats")
            .enable_all()
            .build()
            .map_err(|source| NativeError::Runtime { source })?;
        let state_error = |message: String| NativeError::Argument {
            kind: "nats",
            message,
        };
        daemon::fs::create_private_dir(&settings.state_dir).map_err(|e| {
            state_error(format!(
                "cannot create the state directory {}: {e}",
                settings.state_dir.display()
            ))
        })?;
        let path = settings
            .state_dir
            .join(format!("{}.outbox", settings.info.name));
        let outbox = Outbox::open(&path).map_err(|e| state_error(e.to_string()))?;
        if outbox.len() > 0 {
            tracing::info!(
                "nats: {} message(s) in the outbox {} are published again first",
                outbox.len(),
                path.display()
            );
        }
        Ok(Nats {
            settings: Arc::new(settings),
            runtime: Some(runtime),
            outbox,
            jobs: None,
            shared: Arc::default(),
            applied: 0,
            resumed: false,
            stored_last: None,
            basedn: None,
            init_pass: 0,
            last_event: Arc::new(Mutex::new(None)),
            max_message: None,
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
        let outbox = match self.outbox.len() {
            0 => String::new(),
            n => format!("; {n} message(s) wait in the outbox"),
        };
        match event {
            Some(event) => ModuleError::transient(format!(
                "NATS {servers} (stream {}): {what} (connection: {event}){outbox}",
                self.settings.stream
            )),
            None => ModuleError::transient(format!(
                "NATS {servers} (stream {}): {what}{outbox}",
                self.settings.stream
            )),
        }
    }

    fn outbox_error(&self, error: OutboxError) -> ModuleError {
        // The disk may come back (space freed): retried like an unreachable server, and
        // nothing passes a message that is not on disk.
        ModuleError::transient(error.to_string())
    }

    /// The publisher's queue, once connected (the stream checked or created) and the
    /// outbox of the last run handed over.
    fn publisher(&mut self) -> Result<tokio::sync::mpsc::UnboundedSender<Job>, ModuleError> {
        if let Some(jobs) = &self.jobs {
            return Ok(jobs.clone());
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
        self.max_message = Some(connection.max_message);
        let stream = self.settings.stream.clone();
        if !self.resumed {
            // A call repeated after a crash is in the outbox (its tail) or in the stream.
            self.stored_last = match self.outbox.last_id() {
                Some(last) => Some(last.to_owned()),
                None => self
                    .wait(last_message_id(connection.clone(), stream.clone()))?
                    .map_err(|e| self.unavailable(e))?,
            };
        }
        let Some(runtime) = &self.runtime else {
            return Err(ModuleError::transient("the module's runtime is gone"));
        };
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let publisher = Publisher {
            connection,
            stream,
            shared: Arc::clone(&self.shared),
            queue: VecDeque::new(),
            timeout: self.settings.ack_timeout,
            retry: None,
            backoff: REPUBLISH_FIRST,
            progress_at: tokio::time::Instant::now(),
        };
        runtime.spawn(publisher.run(receiver));
        if !self.resumed && self.outbox.len() > 0 {
            // Subjects as configured now: a changed `subject_prefix` applies to what the
            // last run left too (the command is the subject's last token).
            let prefix = &self.settings.prefix;
            let messages = self
                .outbox
                .pending()
                .map(|message| {
                    let command = message.subject.rsplit('.').next().unwrap_or_default();
                    Message {
                        subject: format!("{prefix}.{command}"),
                        ..message.clone()
                    }
                })
                .collect();
            sender
                .send(Job::Resume(messages))
                .map_err(|_| ModuleError::transient("the module's publisher stopped"))?;
        }
        self.resumed = true;
        self.jobs = Some(sender.clone());
        Ok(sender)
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

    /// Drops what the stream acknowledged from the outbox; why publishing is failing, if
    /// it is.
    fn collect(&mut self) -> Result<Option<String>, ModuleError> {
        let (acknowledged, failing) = {
            let progress = self.shared.lock();
            (progress.acknowledged, progress.failing.clone())
        };
        if acknowledged > self.applied {
            // Counted before the file shrinks: a shrink that fails is retried at the next
            // call, and must not make the next call forget more messages.
            self.outbox.acknowledge(acknowledged - self.applied);
            self.applied = acknowledged;
        }
        self.outbox.shrink().map_err(|e| self.outbox_error(e))?;
        Ok(failing)
    }

    /// Waits until the outbox holds fewer than `most` messages; fails while publishing
    /// fails or when no acknowledgement comes for `ack_timeout` (acks stall).
    fn wait_acknowledged(&mut self, most: usize) -> Result<(), ModuleError> {
        loop {
            if let Some(failing) = self.collect()? {
                return Err(self.unavailable(failing));
            }
            if self.outbox.len() < most {
                return Ok(());
            }
            let progress = self.shared.lock();
            if progress.acknowledged == self.applied && progress.failing.is_none() {
                let (progress, timeout) = self
                    .shared
                    .changed
                    .wait_timeout(progress, self.settings.ack_timeout)
                    .unwrap_or_else(PoisonError::into_inner);
                if timeout.timed_out() && progress.acknowledged == self.applied {
                    drop(progress);
                    return Err(self.unavailable(format!(
                        "no acknowledgement within {:?} (outbox full)",
                        self.settings.ack_timeout
                    )));
                }
            }
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
        // are repeated from the outbox.
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
    // 0: the server's INFO not seen (it comes with the handshake); no limit assumed.
    let server_max = match client.server_info().max_payload {
        0 => usize::MAX,
        max => max,
    };
    // Acknowledgements dropped after a failure hold a publish permit until they come or
    // time out: bounded by `ack_timeout` too (the default, 30 s, could use up the permits
    // over a few republish rounds and block the next publish for that long).
    let jetstream = jetstream::ContextBuilder::new()
        .timeout(settings.ack_timeout)
        .ack_timeout(settings.ack_timeout)
        .build(client);
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
    // -1: no limit of the stream's own.
    let max_message = match usize::try_from(stream.cached_info().config.max_message_size) {
        Ok(stream_max) if stream_max > 0 => stream_max.min(server_max),
        _ => server_max,
    };
    Ok(Connection {
        jetstream,
        max_message,
    })
}

/// The message id of the stream's last message (`None`: the stream is empty, its last
/// message has no id, or it is gone).
async fn last_message_id(connection: Connection, stream: String) -> Result<Option<String>, String> {
    let mut stream = connection
        .jetstream
        .get_stream(&stream)
        .await
        .map_err(|e| format!("cannot look up the stream: {e}"))?;
    let info = stream
        .info()
        .await
        .map_err(|e| format!("cannot read the stream's state: {e}"))?;
    let (messages, last) = (info.state.messages, info.state.last_sequence);
    if messages == 0 || last == 0 {
        return Ok(None);
    }
    // The last sequence stays after its message is removed (work-queue or interest
    // retention, max_age, a purge): its id is then unknown, and the pending messages are
    // published again (the stream's de-duplication drops those it holds).
    let message = match stream.get_raw_message(last).await {
        Ok(message) => message,
        Err(e) if matches!(e.kind(), RawMessageErrorKind::NoMessageFound) => return Ok(None),
        Err(e) => return Err(format!("cannot read the stream's last message: {e}")),
    };
    Ok(message
        .headers
        .get(async_nats::header::NATS_MESSAGE_ID)
        .map(|id| id.as_str().to_owned()))
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

impl Module for Nats {
    fn info(&self) -> &ModuleInfo {
        &self.settings.info
    }

    fn handler(&mut self, call: &Call<'_>) -> Result<(), ModuleError> {
        let identity = self.identity()?;
        let id = self.message_id(&identity, call);
        let payload = payload(call, SystemTime::now())
            .map_err(|e| ModuleError::new(format!("cannot encode {id}: {e}")))?;
        let jobs = self.publisher()?;
        // A message the server or the stream refuses by its size would be published again
        // for ever, and the listener would wait at it: it fails this call instead, like any
        // module error (logged, the object not marked as handled by this module).
        let size = payload.len() + 2 * id.len() + self.settings.stream.len() + HEADER_ROOM;
        if let Some(max) = self.max_message.filter(|max| size > *max) {
            return Err(ModuleError::new(format!(
                "{id}: the message of {size} bytes is larger than NATS accepts ({max} bytes: \
                 the server's max_payload or the stream's max_msg_size); the change of {} is \
                 not exported",
                call.dn
            )));
        }
        if let Some(stored) = &self.stored_last {
            if already_stored(stored, &id) {
                tracing::info!("nats: {id} is already in the stream or outbox (last: {stored})");
                return Ok(());
            }
            self.stored_last = None;
        }
        // While publishing fails, or the outbox is full and acknowledgements stall, the
        // listener waits here (transiently failing) and nothing new is taken.
        self.wait_acknowledged(self.settings.outbox_limit)?;
        let message = Message {
            id,
            subject: self.settings.subject(call.command),
            payload: payload.into(),
        };
        self.outbox
            .append(message.clone())
            .map_err(|e| self.outbox_error(e))?;
        jobs.send(Job::Publish(message)).map_err(|_| {
            // On disk: published with the outbox after a restart of the listener.
            ModuleError::transient("the module's publisher stopped")
        })
    }

    fn setdata(&mut self, key: &str, value: &str) -> Result<(), ModuleError> {
        if key == "basedn" {
            self.basedn = Some(value.to_owned());
            // At load: what a crash left in the outbox goes out now, not at the next
            // change (which may be far off). If NATS is not there, the next call retries.
            if !self.resumed && self.outbox.len() > 0 {
                match self.publisher() {
                    Ok(_) => tracing::info!("nats: the outbox is being published"),
                    Err(e) => tracing::warn!("nats: the outbox waits for the next change: {e}"),
                }
            }
        }
        Ok(())
    }

    fn initialize(&mut self) -> Result<(), ModuleError> {
        self.init_pass = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Ok(())
    }

    fn postrun(&mut self) -> Result<(), ModuleError> {
        // Idle or stopping: let the acknowledgements in, so a clean stop leaves an empty
        // outbox. A failure is only logged; the next call publishes the outbox again.
        if self.jobs.is_some() {
            self.wait_acknowledged(1)?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), ModuleError> {
        // Before the listener makes its commits durable: a transaction that survives a
        // power loss has its messages in the outbox (or in the stream).
        let _ = self.collect();
        self.outbox
            .sync()
            .map_err(|e| ModuleError::new(e.to_string()))
    }

    fn control(&mut self, command: &[&str]) -> Result<String, ModuleError> {
        match command {
            ["outbox"] => {
                let _ = self.collect();
                Ok(format!(
                    "{} message(s) not yet acknowledged by the stream in {}{}",
                    self.outbox.len(),
                    self.outbox.path().display(),
                    match self.outbox.pending().next() {
                        Some(first) => format!(" (oldest {})", first.id),
                        None => String::new(),
                    }
                ))
            }
            _ => Err(ModuleError::new(format!(
                "module {}: unknown command {:?} (known: outbox)",
                self.settings.info.name,
                command.join(" ")
            ))),
        }
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
            (
                "servers = nats://x\nack_timeout = 1e19",
                "longer than the longest timeout",
            ),
        ];
        for (text, needle) in cases {
            std::fs::write(&conf, text).unwrap();
            let error = Settings::from_config(&conf).unwrap_err().to_string();
            assert!(error.contains(needle), "{text:?}: {error}");
        }
    }

    /// A failed acknowledgement must leave its message first in the queue (it is looked
    /// up in the stream and published again); an acknowledged one leaves the queue.
    #[test]
    fn only_an_acknowledged_message_leaves_the_queue() {
        let entry = |id: &str, ack: AckFuture| Entry {
            message: Message {
                id: id.to_owned(),
                subject: "p.a".to_owned(),
                payload: bytes::Bytes::new(),
            },
            ack: Some(ack),
        };
        let failed: AckFuture =
            Box::pin(async { Err(PublishError::new(PublishErrorKind::TimedOut)) });
        let stored: AckFuture =
            Box::pin(async { Ok(serde_json::from_str(r#"{"stream":"s","seq":1}"#).unwrap()) });
        let mut queue = VecDeque::from([entry("x:1:1", failed), entry("x:1:2", stored)]);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (id, result) = runtime.block_on(next_ack(&mut queue));
        assert_eq!(id, "x:1:1");
        assert!(result.is_err());
        assert_eq!(queue.len(), 2, "the failed message stays queued");
        assert!(queue[0].ack.is_none(), "and waits to be published again");
        queue.pop_front();
        let (id, result) = runtime.block_on(next_ack(&mut queue));
        assert_eq!((id.as_str(), result.is_ok()), ("x:1:2", true));
        assert!(queue.is_empty());
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
        let dir = tempfile::tempdir().unwrap();
        settings.state_dir = dir.path().to_owned();
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
