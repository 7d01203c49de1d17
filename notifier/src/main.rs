//! `univention-directory-notifier`: see `--help`.

use std::process::ExitCode;
use std::sync::{Arc, RwLock};

use std::time::Duration;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};
use daemon::logging::Logging;
use daemon::pidfile::PidFile;
use daemon::systemd::{self, Heartbeat};
use daemon::tasks::TaskSet;
use daemon::ucr::Ucr;
use ldap::{Auth, Endpoint, StartTls};
use notifier::committer::Committer;
use notifier::config::{Cli, Config, IntakeKind};
use notifier::intake::accesslog::{AccesslogConfig, AccesslogIntake};
use notifier::intake::queue_file::{QueueFileConfig, QueueFileIntake};
use notifier::journal::{Journal, JournalOptions};
use notifier::metrics::Metrics;
use notifier::schema::SchemaWatcher;
use notifier::server::tls::ServerTls;
use notifier::server::{self, ServerConfig, ServerState};
use notifier::translog::TranslogWriter;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Time allowed for each task (server, schema watcher, metrics) to stop at shutdown.
const TASK_GRACE: Duration = Duration::from_secs(10);
/// How long an LDAP connection attempt of the intake or translog writer may take.
const LDAP_TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    if let Some(code) = daemon::man::print_if_requested(Cli::command, daemon::man::SECTION_DAEMON) {
        return code;
    }
    let cli = Cli::parse();
    let ucr = Ucr::load(&cli.ucr_file);
    let config = match Config::resolve(cli, &ucr) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("univention-directory-notifier: {err}");
            return ExitCode::from(1);
        }
    };
    if !config.foreground {
        // SAFETY: called before any thread exists (the runtime is built afterwards);
        // daemon(3) only forks, setsid()s and redirects stdio.
        if unsafe { libc::daemon(1, 1) } != 0 {
            eprintln!(
                "univention-directory-notifier: cannot daemonize: {}",
                std::io::Error::last_os_error()
            );
            return ExitCode::from(1);
        }
    }
    let logging = match Logging::init(config.debug_level, config.log_file.as_deref()) {
        Ok(logging) => Arc::new(logging),
        Err(err) => {
            eprintln!("univention-directory-notifier: cannot set up logging: {err}");
            return ExitCode::from(1);
        }
    };
    for option in &config.ignored_options {
        tracing::warn!("Ignoring deprecated option {option}");
    }
    raise_open_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!("cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(config, logging)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let err = daemon::report::chain(&*err);
            tracing::error!("{err}");
            systemd::status(&format!("failed: {err}"));
            ExitCode::from(1)
        }
    }
}

async fn run(config: Config, logging: Arc<Logging>) -> Result<()> {
    let pid_file = PidFile::create(&config.pid_file)?;
    let shutdown = CancellationToken::new();
    let heartbeat = Heartbeat::new();
    let tls = match &config.tls {
        Some(files) => {
            let loaded = ServerTls::load(files.clone(), config.tls_policy)
                .context("cannot set up STARTTLS")?;
            tracing::info!(
                "offering STARTTLS with {} (policy {:?})",
                files.certificate.display(),
                config.tls_policy
            );
            Some(Arc::new(loaded))
        }
        None => {
            tracing::info!("no TLS certificate configured: STARTTLS is not offered");
            None
        }
    };
    spawn_signal_handler(shutdown.clone(), Arc::clone(&logging), tls.clone())?;

    let notify_dir = config.notify_dir();
    std::fs::create_dir_all(&notify_dir)
        .with_context(|| format!("creating {}", notify_dir.display()))?;
    let options = JournalOptions {
        ring_size: config.cache_size,
        lock_attempts: config.lock_attempts,
        lock_delay: config.lock_delay,
    };
    let journal = tokio::task::spawn_blocking(move || Journal::open(&notify_dir, &options))
        .await?
        .context("opening the transaction log")?;
    for repair in journal.repairs() {
        tracing::warn!("transaction log repaired at startup: {repair}");
    }
    let last_id = journal.last_id();
    tracing::info!("transaction log loaded: last id {last_id}");
    let journal = Arc::new(RwLock::new(journal));

    let metrics = Metrics::new();
    metrics.set_last_id(last_id);
    let schema = SchemaWatcher::new(&config.ldap_dir, Arc::clone(&metrics), config.poll_interval);
    let (published, last_id_rx) = watch::channel(last_id);

    let listener = server::bind(config.listen, config.port)
        .with_context(|| format!("cannot listen on port {}", config.port))?;
    tracing::info!("listening on {}", listener.local_addr()?);
    let state = Arc::new(ServerState {
        last_id: last_id_rx,
        schema_id: schema.shared(),
        journal: Arc::clone(&journal),
        metrics: Arc::clone(&metrics),
        tls,
        refusals: Default::default(),
    });
    let server_config = ServerConfig {
        min_version: config.min_version,
        max_connections: config.max_connections,
        max_per_address: config.max_connections_per_address,
        write_timeout: config.client_write_timeout,
        handshake_timeout: config.handshake_timeout,
        idle_timeout: config.idle_timeout,
        tls_policy: config.tls_policy,
        allow: config.allow.clone(),
        ..ServerConfig::default()
    };
    let mut tasks = TaskSet::new(shutdown.clone());
    tasks.spawn(
        "client server",
        server::serve(listener, state, server_config, shutdown.clone()),
    );
    tasks.spawn("schema watcher", schema.run(shutdown.clone()));
    if let Some(addr) = config.metrics {
        let metrics = Arc::clone(&metrics);
        let shutdown = shutdown.clone();
        tasks.spawn("metrics endpoint", async move {
            if let Err(err) = daemon::metrics::serve(addr, move || metrics.render(), shutdown).await
            {
                tracing::error!("metrics endpoint on {addr}: {err}");
            }
        });
    }
    tasks.spawn(
        "status reporter",
        report_status(
            Arc::clone(&metrics),
            published.subscribe(),
            shutdown.clone(),
        ),
    );
    if let Some(watchdog) =
        systemd::spawn_watchdog(heartbeat.clone(), "committer", shutdown.clone())
    {
        tasks.adopt("watchdog", watchdog);
    }

    let translog = config.translog.as_ref().map(|(uri, base)| {
        let endpoint = Endpoint {
            uri: uri.clone(),
            auth: Auth::SaslExternal,
            starttls: StartTls::Off,
            timeout: LDAP_TIMEOUT,
        };
        TranslogWriter::new(endpoint, base.clone())
    });
    let mut committer = Committer::new(
        Arc::clone(&journal),
        translog,
        published,
        config.ldap_base.clone(),
        Arc::clone(&metrics),
        heartbeat,
    );
    systemd::ready(&format!("last id {last_id}"));

    let result = match config.intake {
        IntakeKind::File => {
            let intake = QueueFileIntake::new(
                QueueFileConfig {
                    dir: config.listener_dir(),
                    lock_attempts: config.lock_attempts,
                    lock_delay: config.lock_delay,
                    poll_interval: config.poll_interval,
                    max_gap: config.max_gap,
                    idle_report: config.idle_report,
                },
                Arc::clone(&metrics),
            );
            intake
                .run(&mut committer, shutdown.clone())
                .await
                .map_err(anyhow::Error::from)
        }
        IntakeKind::Accesslog => {
            let intake = AccesslogIntake::new(
                AccesslogConfig {
                    endpoint: Endpoint {
                        uri: config.accesslog_uri.clone(),
                        auth: config.accesslog_auth.clone(),
                        starttls: StartTls::Off,
                        timeout: LDAP_TIMEOUT,
                    },
                    base: config.accesslog_base.clone(),
                    replay: config.accesslog_replay,
                    position_file: config
                        .notify_dir()
                        .join(notifier::intake::accesslog::POSITION_FILE),
                },
                Arc::clone(&metrics),
            );
            intake
                .run(&mut committer, shutdown.clone())
                .await
                .map_err(anyhow::Error::from)
        }
    };
    systemd::stopping();
    tasks.shutdown(TASK_GRACE).await;
    drop(pid_file);
    tracing::info!("stopped at last id {}", committer.last_id());
    result.context("intake failed")
}

/// SIGTERM/SIGINT: finish the current commit and stop; SIGHUP: reopen the log file and
/// reload the TLS certificate, key and CA (connections keep the ones they started with);
/// SIGUSR1/SIGUSR2: debug level up/down.
fn spawn_signal_handler(
    shutdown: CancellationToken,
    logging: Arc<Logging>,
    tls: Option<Arc<ServerTls>>,
) -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); shutdown.cancel(); }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); shutdown.cancel(); }
                _ = hup.recv() => {
                    if let Err(err) = logging.reopen() {
                        tracing::error!("SIGHUP: cannot reopen the log file: {err}");
                    }
                    if let Some(tls) = &tls {
                        match tls.reload() {
                            Ok(()) => tracing::info!(
                                "SIGHUP: reloaded the TLS certificate {}",
                                tls.files().certificate.display()
                            ),
                            Err(err) => tracing::error!(
                                "SIGHUP: keeping the previous TLS certificate: {err}"
                            ),
                        }
                    }
                }
                _ = usr1.recv() => logging.raise(),
                _ = usr2.recv() => logging.lower(),
            }
        }
    });
    Ok(())
}

/// Keeps systemd's STATUS current.
async fn report_status(
    metrics: Arc<Metrics>,
    mut last_id: watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        systemd::status(&format!(
            "last id {}, {} listeners connected",
            *last_id.borrow_and_update(),
            metrics.clients()
        ));
    }
}

/// Hundreds of listeners need more descriptors than the usual soft limit of 1024 (UCS's
/// select() loop stopped at FD_SETSIZE); raise the soft limit to the hard one.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!(
                    "cannot raise the open file limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}
