//! Private NATS servers with JetStream (Debian's `nats-server`): one server, or a cluster
//! of three on loopback ports, each with its own store directory, and a reader that
//! follows a stream with a consumer, for the tests of the `nats` listener module.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt as _;
use tempfile::TempDir;

use crate::net::free_port;
use crate::{HarnessError, Process, Result, io_context, wait_until};

/// How long a server may take to be ready (JetStream recovers its store at start).
const START: Duration = Duration::from_secs(60);

/// One `nats-server -js`; killed on drop. Its ports and store stay the same across
/// [`NatsServer::restart`], so a restarted server has its streams back.
pub struct NatsServer {
    name: String,
    port: u16,
    monitor_port: u16,
    /// Cluster port and the cluster's routes, for a member of a cluster.
    cluster: Option<(u16, Vec<u16>)>,
    store: PathBuf,
    log: PathBuf,
    process: Option<Process>,
}

impl NatsServer {
    /// A single server with its store below `dir`.
    pub fn start(dir: &Path) -> Result<NatsServer> {
        on_free_ports(|| {
            let mut server = NatsServer::unstarted(dir)?;
            server.restart()?;
            Ok(server)
        })
    }

    /// A single server with its ports and store chosen, not started yet
    /// ([`NatsServer::restart`] starts it): for a client that starts before its server.
    pub fn unstarted(dir: &Path) -> Result<NatsServer> {
        NatsServer::new("n1", dir, None)
    }

    fn new(name: &str, dir: &Path, cluster: Option<(u16, Vec<u16>)>) -> Result<NatsServer> {
        let store = dir.join(format!("{name}-store"));
        std::fs::create_dir_all(&store)
            .map_err(io_context(format!("creating {}", store.display())))?;
        Ok(NatsServer {
            name: name.to_owned(),
            port: free_port()?,
            monitor_port: free_port()?,
            cluster,
            store,
            log: dir.join(format!("{name}.log")),
            process: None,
        })
    }

    fn launch(&mut self) -> Result<()> {
        let mut args: Vec<String> = [
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-m",
            &self.monitor_port.to_string(),
            "-n",
            &self.name,
            "-sd",
            &self.store.display().to_string(),
        ]
        .map(str::to_owned)
        .to_vec();
        if let Some((port, routes)) = &self.cluster {
            let routes: Vec<String> = routes
                .iter()
                .map(|p| format!("nats-route://127.0.0.1:{p}"))
                .collect();
            args.extend([
                "--cluster_name".to_owned(),
                "udl".to_owned(),
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{port}"),
                "--routes".to_owned(),
                routes.join(","),
            ]);
        }
        self.process = Some(Process::spawn_program("nats-server", &args, &self.log)?);
        Ok(())
    }

    /// Waits until the server answers its health check (JetStream included; in a
    /// cluster: a meta leader is known).
    pub fn wait_ready(&mut self) -> Result<()> {
        let port = self.monitor_port;
        wait_until(
            &format!("nats-server {} to be healthy", self.name),
            START,
            || {
                if let Some(process) = &mut self.process
                    && let Some(status) = process.try_status()
                {
                    return Err(HarnessError::Listener(format!(
                        "nats-server {} exited ({status}):\n{}",
                        self.name,
                        process.log()
                    )));
                }
                Ok(healthz(port).then_some(()))
            },
        )
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(Process::is_running)
    }

    /// SIGKILL: the server is gone at once, its store as it was on disk.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut process) = self.process.take() {
            process.kill()?;
        }
        Ok(())
    }

    /// Starts the server again (after [`NatsServer::kill`] or [`NatsServer::stop`]) with
    /// the same ports and store.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.launch()?;
        self.wait_ready()
    }

    /// SIGTERM and wait: a clean shutdown.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut process) = self.process.take() {
            process.terminate(Duration::from_secs(10))?;
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// True when the monitoring endpoint answers `/healthz` with 200.
fn healthz(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = "GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200")
}

/// Three servers clustered on loopback ports (JetStream clustered: streams can have 3
/// replicas). Own temp directory; killed on drop.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
    _dir: TempDir,
}

/// Attempts at starting on free ports: a port [`free_port`] found free can be taken by
/// another test before the server binds it.
const PORT_ATTEMPTS: usize = 5;

/// Runs `start` again (it picks new ports) while a server fails because a port was taken.
fn on_free_ports<T>(mut start: impl FnMut() -> Result<T>) -> Result<T> {
    let mut attempt = 1;
    loop {
        match start() {
            Err(e)
                if attempt < PORT_ATTEMPTS && e.to_string().contains("address already in use") =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}

impl NatsCluster {
    pub fn start() -> Result<NatsCluster> {
        on_free_ports(NatsCluster::start_once)
    }

    fn start_once() -> Result<NatsCluster> {
        let dir = tempfile::Builder::new()
            .prefix("udl-nats-cluster-")
            .tempdir()
            .map_err(io_context("creating the cluster directory"))?;
        let cluster_ports = [free_port()?, free_port()?, free_port()?];
        let mut servers = Vec::new();
        for (i, port) in cluster_ports.iter().enumerate() {
            let routes: Vec<u16> = cluster_ports
                .iter()
                .copied()
                .filter(|p| p != port)
                .collect();
            servers.push(NatsServer::new(
                &format!("n{}", i + 1),
                dir.path(),
                Some((*port, routes)),
            )?);
        }
        for server in &mut servers {
            server.launch()?;
        }
        for server in &mut servers {
            server.wait_ready()?;
        }
        Ok(NatsCluster { servers, _dir: dir })
    }

    /// Every server's URL, comma-separated (the module's `servers`).
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// One message of the stream as a consumer received it.
#[derive(Debug, Clone)]
pub struct StreamMessage {
    pub sequence: u64,
    pub subject: String,
    /// The `Nats-Msg-Id` header.
    pub message_id: String,
    pub payload: serde_json::Value,
}

/// Reads every message of `stream` in stream order with an ordered consumer (the stream is
/// left as it is). `servers`: comma-separated URLs.
pub fn read_stream(servers: &str, stream: &str) -> Result<Vec<StreamMessage>> {
    with_jetstream(servers, |jetstream| read_stream_async(jetstream, stream))
}

/// How many messages `stream` holds.
pub fn stream_message_count(servers: &str, stream: &str) -> Result<u64> {
    with_stream(servers, stream, |mut handle| async move {
        Ok(handle
            .info()
            .await
            .map_err(|e| e.to_string())
            .map_err(nats_error("reading the stream info"))?
            .state
            .messages)
    })
}

/// Removes every message of `stream` (its last sequence number stays).
pub fn purge_stream(servers: &str, stream: &str) -> Result<()> {
    with_stream(servers, stream, |handle| async move {
        handle
            .purge()
            .await
            .map_err(|e| e.to_string())
            .map_err(nats_error("purging the stream"))?;
        Ok(())
    })
}

/// Creates `stream` for `subjects`, refusing messages over `max_message_size` bytes.
pub fn create_stream(
    servers: &str,
    stream: &str,
    subjects: &str,
    max_message_size: i32,
) -> Result<()> {
    with_jetstream(servers, |jetstream| async move {
        jetstream
            .create_stream(async_nats::jetstream::stream::Config {
                name: stream.to_owned(),
                subjects: vec![subjects.to_owned()],
                max_message_size,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())
            .map_err(nats_error("creating the stream"))?;
        Ok(())
    })
}

/// Runs `work` on the handle of `stream` (`servers`: comma-separated URLs).
fn with_stream<T, F>(
    servers: &str,
    stream: &str,
    work: impl FnOnce(async_nats::jetstream::stream::Stream) -> F,
) -> Result<T>
where
    F: std::future::Future<Output = Result<T>>,
{
    with_jetstream(servers, |jetstream| async move {
        let handle = jetstream
            .get_stream(stream)
            .await
            .map_err(|e| e.to_string())
            .map_err(nats_error("finding the stream"))?;
        work(handle).await
    })
}

/// Runs `work` with a JetStream context on a runtime of its own (`servers`:
/// comma-separated URLs).
fn with_jetstream<T, F>(
    servers: &str,
    work: impl FnOnce(async_nats::jetstream::Context) -> F,
) -> Result<T>
where
    F: std::future::Future<Output = Result<T>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_context("starting a runtime"))?;
    runtime.block_on(async {
        let servers: Vec<&str> = servers.split(',').collect();
        let client = async_nats::connect(servers.as_slice())
            .await
            .map_err(|e| e.to_string())
            .map_err(nats_error("connecting"))?;
        work(async_nats::jetstream::new(client)).await
    })
}

fn nats_error(what: &str) -> impl FnOnce(String) -> HarnessError + '_ {
    move |e| HarnessError::Listener(format!("NATS: {what}: {e}"))
}

async fn read_stream_async(
    jetstream: async_nats::jetstream::Context,
    stream: &str,
) -> Result<Vec<StreamMessage>> {
    let mut handle = jetstream
        .get_stream(stream)
        .await
        .map_err(|e| e.to_string())
        .map_err(nats_error("finding the stream"))?;
    let count = handle
        .info()
        .await
        .map_err(|e| e.to_string())
        .map_err(nats_error("reading the stream info"))?
        .state
        .messages;
    let consumer = handle
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .map_err(|e| e.to_string())
        .map_err(nats_error("creating a consumer"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| e.to_string())
        .map_err(nats_error("following the stream"))?;
    let mut read = Vec::new();
    while (read.len() as u64) < count {
        let next = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .map_err(|_| HarnessError::Timeout {
                what: format!("message {} of {count} from stream {stream}", read.len() + 1),
                seconds: 30.0,
            })?;
        let Some(message) = next else { break };
        let message = message
            .map_err(|e| e.to_string())
            .map_err(nats_error("reading a message"))?;
        let info = message
            .info()
            .map_err(|e| e.to_string())
            .map_err(nats_error("reading message metadata"))?;
        let sequence = info.stream_sequence;
        let message_id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        let payload = serde_json::from_slice(&message.payload)
            .map_err(|e| HarnessError::Listener(format!("message {sequence}: bad JSON: {e}")))?;
        read.push(StreamMessage {
            sequence,
            subject: message.subject.to_string(),
            message_id,
            payload,
        });
    }
    Ok(read)
}
