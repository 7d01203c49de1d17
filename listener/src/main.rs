//! `univention-directory-listener`: the startup sequence of spec listener.md §1.2, then the
//! main loop ([`listener::daemon`]).
//!
//! Exit status: 0 after a signal (everything committed) or a finished `-i`/`-P`; 1 on a
//! configuration error, a second listener on the same cache, or a failed `-i`/`-P`; 3 when
//! the cache is marked bad (as UCS); a module's `sys.exit(n)` exits with `n` (1 for 0).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use cache::{Cache, CacheError, MasterRecord};
use clap::{CommandFactory, Parser};
use daemon::backoff::Backoff;
use daemon::logging::Logging;
use daemon::paths::{QueueFiles, SCHEMA_ID_FILE};
use daemon::privileges::Privileges;
use daemon::systemd::{self, Heartbeat};
use daemon::tasks::TaskSet;
use ldap::{Connection, Endpoint, Lookup, StartTls};
use listener::config::{Cli, Config, LdapTarget, RunMode, Server};
use listener::daemon::{
    Daemon, EXIT_REQUEST_FILE, Exit, read_exit_request, record_exit_request, setdata_values,
};
use listener::dispatch::{ExitRequest, Handlers, STATE_DIR};
use listener::engine::{Engine, EngineSettings};
use listener::metrics::Metrics;
use listener::signals::Signals;
use listener::tools::{self, CACHE_LOCK};
use listener::{loader, signals};
use proto::client::NotifierClient;

const EXIT_BAD_CACHE: u8 = 3;
/// Time allowed for each task (control socket, metrics, watchdog) to stop at exit.
const TASK_GRACE: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    cache::bound_heap();
    if let Some(code) = daemon::man::print_if_requested(Cli::command, daemon::man::SECTION_DAEMON) {
        return code;
    }
    let config = match Config::from_cli(Cli::parse()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("univention-directory-listener: {e}");
            return ExitCode::from(1);
        }
    };
    let logging = match Logging::init(config.debug, config.log_file.as_deref()) {
        Ok(logging) => Arc::new(logging),
        Err(e) => {
            eprintln!("univention-directory-listener: cannot open the log: {e}");
            return ExitCode::from(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(config, logging)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{}", daemon::report::chain(&*e));
            ExitCode::from(1)
        }
    }
}

async fn run(config: Config, logging: Arc<Logging>) -> anyhow::Result<ExitCode> {
    // Before anything else: a configuration error, not something to retry or run without.
    loader::check_module_paths(&config.module_paths)?;
    let cache_dir = config.cache_dir.clone();
    if cache::is_marked_bad(&cache_dir) {
        tracing::error!(
            "Corrupt cache: {} exists. Re-initialize the listener (stop it, then run \
             univention-directory-listener -i with the usual options) or restore a backup; \
             the marker says: {}",
            cache_dir.join(cache::BAD_CACHE_FILE).display(),
            std::fs::read_to_string(cache_dir.join(cache::BAD_CACHE_FILE)).unwrap_or_default()
        );
        return Ok(ExitCode::from(EXIT_BAD_CACHE));
    }
    create_private_dir(&cache_dir)?;
    let Some(_lock) = tools::lock_cache(&cache_dir)? else {
        bail!(
            "{} is locked: is another listener process running on {}?",
            cache_dir.join(CACHE_LOCK).display(),
            cache_dir.display()
        );
    };
    let signals = signals::install(Arc::clone(&logging), config.stop_timeout)
        .context("installing signal handlers")?;
    let mut tasks = TaskSet::new(tokio_util::sync::CancellationToken::new());
    let heartbeat = Heartbeat::new();
    if let Some(watchdog) = systemd::spawn_watchdog(heartbeat.clone(), "main loop", tasks.token()) {
        tasks.adopt("watchdog", watchdog);
    }
    let code = run_locked(config, &signals, &heartbeat, &mut tasks, &cache_dir).await;
    tasks.shutdown(TASK_GRACE).await;
    code
}

/// Everything after `cache.lock` is taken; `tasks` are shut down by the caller.
async fn run_locked(
    config: Config,
    signals: &Arc<Signals>,
    heartbeat: &Heartbeat,
    tasks: &mut TaskSet,
    cache_dir: &Path,
) -> anyhow::Result<ExitCode> {
    let cascade_dir = QueueFiles::in_ldap_dir(&config.ldap_dir);
    let mut owned: Vec<&Path> = vec![cache_dir];
    if config.cascade {
        owned.push(cascade_dir.dir());
    }
    let privileges = Privileges::drop_to(&config.user, &owned)
        .with_context(|| format!("switching to user {}", config.user))?;

    if config.purge {
        purge(cache_dir)?;
    }
    create_private_dir(&cache_dir.join(STATE_DIR))?;
    if let Some(previous) = read_exit_request(cache_dir) {
        tracing::info!("the last run ended because {previous}");
        let _ = std::fs::remove_file(cache_dir.join(EXIT_REQUEST_FILE));
    }

    let Some((server, ldap, mut notifier)) = connect(&config, signals, heartbeat).await? else {
        return Ok(ExitCode::SUCCESS);
    };

    let cache = match Cache::open(cache_dir) {
        Ok(cache) => Arc::new(cache),
        Err(e) => return Ok(cache_failure(cache_dir, e)),
    };
    if let Some(entries) = cache.migrated() {
        tracing::info!(
            "imported {entries} entries from {} of an earlier version into {}",
            cache::SLED_DIR,
            cache::DB_DIR
        );
    }
    if cache.recovered() > 0 {
        tracing::info!(
            "replayed {} cache commits from the commit log after an unclean stop",
            cache.recovered()
        );
    }
    let metrics = Arc::new(Metrics::default());
    metrics.set_state("starting");
    // Served from here on, so tools see a starting or initialising listener too.
    let control = listener::control::Context {
        signals: Some(Arc::clone(signals)),
        cache: Arc::clone(&cache),
        metrics: Arc::clone(&metrics),
        cache_dir: cache_dir.to_owned(),
        failed_ldif: config.failed_ldif.clone(),
        blocked_after: config.blocked_after,
    };
    match listener::control::ControlServer::bind(control) {
        Ok(server) => tasks.spawn("control socket", server.serve(tasks.token())),
        Err(e) => tracing::error!(
            "cannot serve the control socket (the tools will not reach this listener): {e}"
        ),
    }
    let loaded = loader::load_modules(&config, &privileges);
    let mut handlers = Handlers::new(loaded.modules, cache_dir, privileges, heartbeat.clone());
    handlers.add_load_failures(loaded.failures);
    handlers.set_init_retry(config.init_retry);
    handlers.track_calls(metrics.call_tracker());
    let sink = Arc::clone(&metrics);
    handlers.publish_to(Arc::new(move |stats| sink.set_modules(stats)));
    let stop = Arc::clone(signals);
    handlers.stop_when(Arc::new(move || stop.stop_requested()));
    handlers.set_init_only(config.mode == RunMode::InitOnly);
    handlers.setdata(&setdata_values(&config, &server));
    if let Some(request) = handlers.exit_requested() {
        return Ok(module_exit(cache_dir, request));
    }

    let timeout = config.notifier_timeout;
    let master = match cache.master() {
        Ok(Some(master)) => master,
        Ok(None) => {
            let notifier_id = match cache::read_legacy_notifier_id(cache_dir) {
                Some(id) => id,
                None => notifier.get_id(timeout).await.context("GET_ID")?,
            };
            let schema_id =
                daemon::fs::read_decimal(&config.ldap_dir.join(SCHEMA_ID_FILE)).unwrap_or(0);
            MasterRecord {
                notifier_id,
                schema_id,
            }
        }
        Err(e) => return Ok(cache_failure(cache_dir, e)),
    };
    tracing::info!(
        "starting at transaction {} (schema id {})",
        master.notifier_id,
        master.schema_id
    );

    let local = config.checks_parents().then(|| {
        Connection::new(
            Endpoint {
                uri: config.local_ldap.clone(),
                auth: config.auth.clone(),
                starttls: StartTls::Off,
                timeout: config.ldap_timeout,
            },
            config.ldap_retries,
        )
    });
    let settings = EngineSettings {
        base: config.base.clone(),
        cache_filter: config.cache_filter.clone(),
        memberuid_skip: config.memberuid_skip,
        uniquemember_skip: config.uniquemember_skip,
        checks_parents: config.checks_parents(),
        schema_updates: !config.is_master(),
        schema_id_file: config.ldap_dir.join(SCHEMA_ID_FILE),
    };
    let mut engine = Engine::new(settings, Arc::clone(&cache), handlers, ldap, local, master);
    if let Err(e) = engine.commit_staged(true) {
        return Ok(engine_failure(cache_dir, e));
    }
    if let Err(e) = cache::write_legacy_notifier_id(cache_dir, master.notifier_id) {
        tracing::warn!("cannot write the notifier_id file: {e}");
    }

    if !config.is_master() {
        let schema_id = notifier
            .get_schema_id(timeout)
            .await
            .context("GET_SCHEMA_ID")?;
        engine.set_notifier_schema_id(schema_id);
        if let Err(e) = engine.update_schema().await {
            tracing::error!("schema update failed: {e}");
        }
        if let Some(request) = engine.handlers().exit_requested() {
            return Ok(module_exit(cache_dir, request));
        }
    }

    metrics.start_at(engine.master().notifier_id);
    metrics.set_modules(engine.handlers().module_stats());
    metrics.set_state("initialising modules");
    let init = engine
        .initialize_pending(config.scan_timeout, signals)
        .await;
    if let Some(request) = engine.handlers().exit_requested() {
        engine.handlers().write_states();
        return Ok(module_exit(cache_dir, request));
    }
    if config.mode == RunMode::InitOnly {
        engine.handlers_mut().postrun();
        engine.handlers().write_states();
        if let Err(e) = engine.commit_staged(true) {
            return Ok(engine_failure(cache_dir, e));
        }
        cache::write_legacy_notifier_id(cache_dir, engine.master().notifier_id)
            .context("writing notifier_id")?;
        return match init {
            Ok(()) => {
                tracing::info!("initialization done");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => bail!("initialization failed: {e}"),
        };
    }
    if let Err(e) = init {
        tracing::error!(
            "module initialization failed: {e}; those modules stay not ready and are tried \
             again with backoff"
        );
    }

    // Stamps progress only if initialising the modules moved the id.
    metrics.set_processed(engine.master().notifier_id);
    metrics.set_modules(engine.handlers().module_stats());
    if let Some(addr) = config.metrics {
        let render = Arc::clone(&metrics);
        let token = tasks.token();
        tasks.spawn("metrics endpoint", async move {
            if let Err(e) = daemon::metrics::serve(addr, move || render.render(), token).await {
                tracing::error!("metrics endpoint {addr}: {e}");
            }
        });
    }
    systemd::ready("running");
    tracing::info!(
        "listening to the notifier at {}:{} (protocol {}), LDAP {}",
        server.notifier_host,
        server.notifier_port,
        config.protocol,
        server.uri
    );
    let daemon = Daemon::new(
        config,
        server,
        engine,
        privileges,
        Arc::clone(signals),
        metrics,
        Some(notifier),
    )
    .context("cascade output")?;
    let exit = daemon.run().await;
    Ok(match exit {
        Exit::Stopped => ExitCode::SUCCESS,
        Exit::BadCache(_) => ExitCode::from(EXIT_BAD_CACHE),
        Exit::CacheUnwritable(_) => ExitCode::from(1),
        Exit::ModuleRequested(request) => module_exit(cache_dir, &request),
    })
}

/// Connects LDAP and the notifier, choosing the server again after every failure (spec
/// §1.2 step 12); `-i`/`-P` give up at the first failure. `None` on a stop signal.
async fn connect(
    config: &Config,
    signals: &Signals,
    heartbeat: &Heartbeat,
) -> anyhow::Result<Option<(Server, Connection, NotifierClient)>> {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let seed = u64::from(std::process::id()) ^ now_nanos();
    let mut attempt: u64 = 0;
    loop {
        attempt += 1;
        let server = match &config.ldap {
            LdapTarget::Fixed(server) => server.clone(),
            LdapTarget::Select(candidates) => match candidates.pick(seed.wrapping_add(attempt)) {
                Some(server) => server,
                None => bail!("no LDAP server candidates"),
            },
        };
        let delay = match try_connect(config, &server).await {
            Ok((ldap, notifier)) => return Ok(Some((server, ldap, notifier))),
            Err(e) if config.mode == RunMode::InitOnly => return Err(e),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::error!("{}; retrying in {delay:?}", daemon::report::chain(&*e));
                delay
            }
        };
        tokio::select! {
            _ = heartbeat.waiting(tokio::time::sleep(delay)) => {}
            _ = signals.woken() => {}
        }
        if signals.stop_requested() {
            return Ok(None);
        }
    }
}

async fn try_connect(
    config: &Config,
    server: &Server,
) -> anyhow::Result<(Connection, NotifierClient)> {
    let mut ldap = Connection::new(
        Endpoint {
            uri: server.uri.clone(),
            auth: config.auth.clone(),
            starttls: config.starttls,
            timeout: config.ldap_timeout,
        },
        0,
    );
    match ldap.read_entry(&config.base).await {
        Ok(Lookup::Found(_)) => {}
        Ok(Lookup::Missing) => bail!("LDAP base {} not found at {}", config.base, server.uri),
        Err(e) => return Err(e).with_context(|| format!("LDAP server {}", server.uri)),
    }
    let mut ldap = Connection::new(ldap.endpoint().clone(), config.ldap_retries);
    ldap.handle().await?;
    let mut notifier = NotifierClient::connect_with(
        &server.notifier_host,
        server.notifier_port,
        config.protocol,
        config.notifier_timeout,
        &config.notifier_tls,
    )
    .await?;
    listener::daemon::log_connected(&notifier, &config.notifier_tls);
    notifier
        .get_id(config.notifier_timeout)
        .await
        .context("GET_ID")?;
    Ok((ldap, notifier))
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos().into())
}

/// `-g`/`-i`: the cache, the legacy id and every module state go; the lock stays.
fn purge(cache_dir: &Path) -> anyhow::Result<()> {
    tracing::info!("purging {}", cache_dir.display());
    for entry in std::fs::read_dir(cache_dir).context("reading the cache directory")? {
        let path = entry?.path();
        if path.file_name().is_some_and(|n| n == CACHE_LOCK) {
            continue;
        }
        let result = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        result.with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    daemon::fs::create_private_dir(dir).with_context(|| format!("creating {}", dir.display()))
}

fn cache_failure(cache_dir: &Path, e: CacheError) -> ExitCode {
    if matches!(
        e,
        CacheError::Corrupt { .. } | CacheError::UnsupportedVersion { .. }
    ) && let Err(io) = cache::mark_bad(cache_dir, &e.to_string())
    {
        tracing::error!("cannot write the bad_cache marker: {io}");
    }
    tracing::error!(
        "cache {}: {e}; re-initialize with univention-directory-listener -i",
        cache_dir.display()
    );
    ExitCode::from(EXIT_BAD_CACHE)
}

/// The exit status for a module's `sys.exit(n)`: `n` when it is a failure status, else 1
/// (the transaction in progress was not committed, so this is never a clean stop).
fn module_exit(cache_dir: &Path, request: &ExitRequest) -> ExitCode {
    if let Err(e) = record_exit_request(cache_dir, request) {
        tracing::error!("cannot record the exit request for ctrl status: {e}");
    }
    tracing::error!(
        "exiting as module {} requested in {} ({}); uncommitted work is redone at the next \
         start",
        request.module,
        request.call,
        request.message
    );
    ExitCode::from(
        u8::try_from(request.status)
            .ok()
            .filter(|&s| s != 0)
            .unwrap_or(1),
    )
}

fn engine_failure(cache_dir: &Path, e: listener::engine::EngineError) -> ExitCode {
    match e {
        listener::engine::EngineError::Cache(e) => cache_failure(cache_dir, e),
        other => {
            tracing::error!("{other}");
            ExitCode::from(1)
        }
    }
}
