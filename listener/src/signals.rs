//! Signals as flags the main loop polls between transactions, plus a wake-up for its waits.
//! SIGUSR1/SIGUSR2 change the log level right away; everything else is acted on by the main
//! loop at a safe point (never in the middle of a transaction).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use modules::python::PythonHost;

use daemon::logging::Logging;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, oneshot};

#[derive(Debug, Default)]
pub struct Signals {
    stop: AtomicBool,
    stop_timeout: Duration,
    reload: AtomicBool,
    wake: Notify,
    /// Operator commands for modules (control socket), run by the main loop between
    /// transactions: modules belong to it.
    module_requests: Mutex<VecDeque<ModuleRequest>>,
}

/// An operator command for one module, with where its answer goes.
#[derive(Debug)]
pub struct ModuleRequest {
    pub module: String,
    pub command: Vec<String>,
    pub reply: oneshot::Sender<Result<String, String>>,
}

impl Signals {
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub(crate) fn request_stop(&self) {
        if !self.stop.swap(true, Ordering::SeqCst) {
            spawn_stop_guard(self.stop_timeout);
        }
        self.wake.notify_waiters();
        self.wake.notify_one();
    }

    /// Queues an operator command for the main loop and waits for its answer.
    pub async fn ask_module(&self, module: String, command: Vec<String>) -> Result<String, String> {
        let (reply, answer) = oneshot::channel();
        self.module_requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(ModuleRequest {
                module,
                command,
                reply,
            });
        self.wake.notify_one();
        answer
            .await
            .unwrap_or_else(|_| Err("the listener stopped before it ran the command".into()))
    }

    /// The queued operator commands, oldest first.
    pub(crate) fn take_module_requests(&self) -> Vec<ModuleRequest> {
        self.module_requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect()
    }

    /// True once per SIGHUP.
    pub(crate) fn take_reload(&self) -> bool {
        self.reload.swap(false, Ordering::SeqCst)
    }

    /// Whether a SIGHUP waits to be taken ([`Signals::take_reload`]).
    pub(crate) fn reload_requested(&self) -> bool {
        self.reload.load(Ordering::SeqCst)
    }

    /// Resolves when a signal needs the main loop's attention.
    pub async fn woken(&self) {
        self.woken_with_reload(true).await;
    }

    /// [`Signals::woken`], where a pending reload counts only with `reload` (while it is
    /// postponed it must not wake the caller over and over; a new signal still does).
    pub(crate) async fn woken_with_reload(&self, reload: bool) {
        if self.stop_requested() || (reload && self.reload_requested()) {
            return;
        }
        self.wake.notified().await;
    }

    fn request_reload(&self) {
        self.reload.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

/// The main loop acts on a stop request between transactions; a module call that never
/// returns would keep it from ever getting there. After `timeout` the process exits anyway:
/// everything committed stays, and the unfinished transaction is processed again at the
/// next start (like after a crash, which the cache is built to survive).
fn spawn_stop_guard(timeout: Duration) {
    let guard = std::thread::Builder::new()
        .name("stop-guard".into())
        .spawn(move || {
            std::thread::sleep(timeout);
            match PythonHost::current_call() {
                Some(call) => tracing::error!(
                    "module {} has been in {}{} for {:.0?} and did not return within {:?} of \
                     the stop request; exiting without it (the transaction is processed \
                     again at the next start)",
                    call.module,
                    call.function,
                    call.dn.map(|dn| format!(" for {dn}")).unwrap_or_default(),
                    call.started.elapsed(),
                    timeout
                ),
                None => tracing::error!(
                    "not stopped within {timeout:?} of the stop request; exiting (uncommitted \
                     transactions are processed again at the next start)"
                ),
            }
            std::process::exit(1);
        });
    if let Err(e) = guard {
        tracing::warn!("cannot start the stop guard: {e}");
    }
}

/// Installs the handlers; signals arriving before this point have their default effect.
pub fn install(logging: Arc<Logging>, stop_timeout: Duration) -> std::io::Result<Arc<Signals>> {
    let signals = Arc::new(Signals {
        stop_timeout,
        ..Signals::default()
    });
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    // A vanished reader of a pipe must not kill the daemon; the write reports EPIPE instead.
    let mut pipe = signal(SignalKind::pipe())?;
    let flags = Arc::clone(&signals);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: stopping"); flags.request_stop() }
                _ = int.recv() => { tracing::info!("SIGINT: stopping"); flags.request_stop() }
                _ = quit.recv() => { tracing::info!("SIGQUIT: stopping"); flags.request_stop() }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading modules");
                    if let Err(e) = logging.reopen() {
                        tracing::error!("cannot reopen the log file: {e}");
                    }
                    flags.request_reload();
                }
                _ = usr1.recv() => logging.raise(),
                _ = usr2.recv() => logging.lower(),
                _ = pipe.recv() => {}
            }
        }
    });
    Ok(signals)
}
