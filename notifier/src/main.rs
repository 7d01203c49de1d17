//! `univention-directory-notifier`: see `--help`.

use std::process::ExitCode;
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use clap::Parser;
use notifier::committer::Committer;
use notifier::config::{Cli, Config, IntakeKind};
use notifier::intake::accesslog::{AccesslogConfig, AccesslogIntake};
use notifier::intake::queue_file::{QueueFileConfig, QueueFileIntake};
use notifier::journal::{Journal, JournalOptions};
use notifier::ldap::Bind;
use notifier::logging::Logging;
use notifier::metrics::{self, Metrics};
use notifier::schema::SchemaWatcher;
use notifier::server::{self, ServerConfig, ServerState};
use notifier::translog::TranslogWriter;
use notifier::ucr::Ucr;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
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
            tracing::error!("{err:#}");
            let _ =
                sd_notify::notify(&[sd_notify::NotifyState::Status(&format!("failed: {err:#}"))]);
            ExitCode::from(1)
        }
    }
}

async fn run(config: Config, logging: Arc<Logging>) -> Result<()> {
    let pid_file = PidFile::create(&config.pid_file)?;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone(), Arc::clone(&logging))?;

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
    });
    let server_config = ServerConfig {
        min_version: config.min_version,
        max_connections: config.max_connections,
        write_timeout: config.client_write_timeout,
        ..ServerConfig::default()
    };
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(server::serve(
        listener,
        state,
        server_config,
        shutdown.clone(),
    ));
    tasks.spawn(schema.run(shutdown.clone()));
    if let Some(addr) = config.metrics {
        let metrics = Arc::clone(&metrics);
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(err) = metrics::serve(addr, metrics, shutdown).await {
                tracing::error!("metrics endpoint on {addr}: {err}");
            }
        });
    }
    spawn_status_reporter(
        &mut tasks,
        Arc::clone(&metrics),
        published.subscribe(),
        shutdown.clone(),
    );

    let translog = config
        .translog
        .as_ref()
        .map(|(uri, base)| TranslogWriter::new(uri.clone(), Bind::SaslExternal, base.clone()));
    let mut committer = Committer::new(
        Arc::clone(&journal),
        translog,
        published,
        config.ldap_base.clone(),
        Arc::clone(&metrics),
    );
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("last id {last_id}")),
    ]);

    let result = match config.intake {
        IntakeKind::File => {
            let intake = QueueFileIntake::new(
                QueueFileConfig {
                    dir: config.listener_dir(),
                    lock_attempts: config.lock_attempts,
                    lock_delay: config.lock_delay,
                    poll_interval: config.poll_interval,
                    max_gap: config.max_gap,
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
                    uri: config.accesslog_uri.clone(),
                    bind: config.accesslog_bind.clone(),
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
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    drop(pid_file);
    tracing::info!("stopped at last id {}", committer.last_id());
    result.context("intake failed")
}

/// SIGTERM/SIGINT: finish the current commit and stop; SIGHUP: reopen the log file;
/// SIGUSR1/SIGUSR2: debug level up/down.
fn spawn_signal_handler(shutdown: CancellationToken, logging: Arc<Logging>) -> Result<()> {
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
                }
                _ = usr1.recv() => logging.raise(),
                _ = usr2.recv() => logging.lower(),
            }
        }
    });
    Ok(())
}

/// Keeps systemd's STATUS current and feeds the watchdog when it is enabled.
fn spawn_status_reporter(
    tasks: &mut tokio::task::JoinSet<()>,
    metrics: Arc<Metrics>,
    mut last_id: watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    let watchdog = sd_notify::watchdog_enabled();
    let period = watchdog
        .map(|interval| interval / 2)
        .unwrap_or(std::time::Duration::from_secs(5));
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            let status = format!(
                "last id {}, {} listeners connected",
                *last_id.borrow_and_update(),
                metrics.clients()
            );
            let mut states = vec![sd_notify::NotifyState::Status(&status)];
            if watchdog.is_some() {
                states.push(sd_notify::NotifyState::Watchdog);
            }
            let _ = sd_notify::notify(&states);
        }
    });
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

/// The PID file, removed on drop.
struct PidFile(std::path::PathBuf);

impl PidFile {
    fn create(path: &std::path::Path) -> Result<PidFile> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).ok();
        }
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write the PID file {}", path.display()))?;
        Ok(PidFile(path.to_owned()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
