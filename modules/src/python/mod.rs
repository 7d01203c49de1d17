//! Python handler modules (spec listener.md §4, must-match items 1–4, 9, 10): module files
//! imported by an embedded CPython, with the UCS legacy API, the built-in `listener`
//! module and the `univention.*` compatibility packages.
//!
//! One interpreter per process ([`PythonHost`]), started on the listener's main loop thread,
//! which then runs every module call itself, like UCS's listener; a [`PythonModule`] is the
//! engine's handle to one loaded module. A call that never returns blocks the engine (as in
//! UCS) but not the daemon's signal handling, control socket or watchdog, which run on other
//! threads: the listener logs [`PythonHost::current_call`] and exits after its stop grace
//! period, leaving the transaction to be processed again at the next start.

mod builtins;
mod host;

use std::path::{Path, PathBuf};

pub use builtins::CurrentCall;
pub use host::PythonHost;
use host::Work;

use crate::module::{Call, Module, ModuleError, ModuleInfo};

/// How the host starts the interpreter.
#[derive(Debug, Clone, Default)]
pub struct HostOptions {
    /// The effective uid `listener.unsetuid()` returns to (the daemon's own).
    pub daemon_uid: u32,
    /// A UCR file other than UCS's layered `/etc/univention/base*.conf`, used by
    /// `listener.configRegistry` and the compatibility `ConfigRegistry`.
    pub ucr_file: Option<PathBuf>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PythonError {
    #[error("cannot start the Python interpreter: {0}")]
    Start(String),
    #[error("import of filename={} failed: {message}", file.display())]
    Import { file: PathBuf, message: String },
}

/// A module file loaded into the interpreter.
pub struct PythonModule {
    info: ModuleInfo,
    slot: usize,
    host: PythonHost,
}

impl PythonModule {
    /// Imports `path` and reads its declarations. Errors name the file and carry Python's
    /// traceback; the listener skips such a module and runs the others.
    pub fn load(host: &PythonHost, path: &Path) -> Result<PythonModule, PythonError> {
        let (slot, info) = host.load(path)?;
        Ok(PythonModule {
            info,
            slot,
            host: host.clone(),
        })
    }
}

impl Drop for PythonModule {
    fn drop(&mut self) {
        self.host.unload(self.slot);
    }
}

impl Module for PythonModule {
    fn info(&self) -> &ModuleInfo {
        &self.info
    }

    fn handler(&mut self, call: &Call<'_>) -> Result<(), ModuleError> {
        self.host.call(self.slot, Work::Handler(call))
    }

    fn prerun(&mut self) -> Result<(), ModuleError> {
        self.host.call(self.slot, Work::Prerun)
    }

    fn postrun(&mut self) -> Result<(), ModuleError> {
        self.host.call(self.slot, Work::Postrun)
    }

    fn clean(&mut self) -> Result<(), ModuleError> {
        self.host.call(self.slot, Work::Clean)
    }

    fn initialize(&mut self) -> Result<(), ModuleError> {
        self.host.call(self.slot, Work::Initialize)
    }

    fn setdata(&mut self, key: &str, value: &str) -> Result<(), ModuleError> {
        self.host.call(self.slot, Work::Setdata { key, value })
    }
}
