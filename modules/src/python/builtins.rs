//! What the host puts into the interpreter before any module is imported: the private
//! `_udl_host` module (logging, identities, which files are module files), the
//! `univention.*` compatibility sources, and the built-in `listener` module.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyModule};

/// Python sources of the compatibility packages, served by the bootstrap's import hook
/// only when `sys.path` has no real UCS package of that name.
const COMPAT_SOURCES: &[(&str, bool, &str)] = &[
    (
        "univention",
        true,
        include_str!("../python-lib/univention/__init__.py"),
    ),
    (
        "univention.debug",
        false,
        include_str!("../python-lib/univention/debug.py"),
    ),
    (
        "univention.config_registry",
        true,
        include_str!("../python-lib/univention/config_registry/__init__.py"),
    ),
    (
        "univention.listener",
        true,
        include_str!("../python-lib/univention/listener/__init__.py"),
    ),
    (
        "univention.listener.api_adapter",
        false,
        include_str!("../python-lib/univention/listener/api_adapter.py"),
    ),
    (
        "univention.listener.exceptions",
        false,
        include_str!("../python-lib/univention/listener/exceptions.py"),
    ),
    (
        "univention.listener.handler",
        false,
        include_str!("../python-lib/univention/listener/handler.py"),
    ),
    (
        "univention.listener.handler_configuration",
        false,
        include_str!("../python-lib/univention/listener/handler_configuration.py"),
    ),
    (
        "univention.listener.handler_logging",
        false,
        include_str!("../python-lib/univention/listener/handler_logging.py"),
    ),
];

const BOOTSTRAP: &std::ffi::CStr = pyo3::ffi::c_str!(include_str!("bootstrap.py"));
const LISTENER: &std::ffi::CStr = pyo3::ffi::c_str!(include_str!("listener.py"));

/// The call a module is in right now, for log lines from Python and for the daemon's
/// reports about a module that does not return.
#[derive(Debug, Clone)]
pub struct CurrentCall {
    pub module: Arc<str>,
    pub function: &'static str,
    pub dn: Option<Arc<str>>,
    pub started: Instant,
}

/// Process-wide state the `_udl_host` functions read; Python runs only once per process.
pub(crate) struct Shared {
    pub daemon_uid: u32,
    pub ucr_file: Option<PathBuf>,
    pub module_files: Mutex<HashSet<String>>,
    pub current: Mutex<Option<CurrentCall>>,
}

pub(crate) static SHARED: OnceLock<Shared> = OnceLock::new();

fn shared() -> PyResult<&'static Shared> {
    SHARED
        .get()
        .ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("listener host not initialised"))
}

/// `_udl_host.log(level, message)`: UCS levels 0 (error) … 4 (all), tagged with the module
/// that is running.
#[pyfunction]
fn log(level: i64, message: &str) -> PyResult<()> {
    let current = shared()?
        .current
        .lock()
        .ok()
        .and_then(|c| c.as_ref().map(|c| Arc::clone(&c.module)));
    let module = current.as_deref().unwrap_or("python");
    match level {
        i64::MIN..=0 => tracing::error!(target: "python", "{module}: {message}"),
        1 => tracing::warn!(target: "python", "{module}: {message}"),
        2 => tracing::info!(target: "python", "{module}: {message}"),
        3 => tracing::debug!(target: "python", "{module}: {message}"),
        _ => tracing::trace!(target: "python", "{module}: {message}"),
    }
    Ok(())
}

/// The daemon's UCS debug level now (`-d`, moved by SIGUSR1/SIGUSR2): the level of the
/// LISTENER and LDAP categories in `univention.debug`.
#[pyfunction]
fn debug_level() -> u8 {
    daemon::logging::current_level()
}

/// The effective uid `listener.unsetuid()` returns to.
#[pyfunction]
fn daemon_uid() -> PyResult<u32> {
    Ok(shared()?.daemon_uid)
}

/// The UCR file the daemon was told to use, when it is not UCS's default layering.
#[pyfunction]
fn ucr_file() -> PyResult<Option<String>> {
    Ok(shared()?
        .ucr_file
        .as_ref()
        .map(|p| p.to_string_lossy().into_owned()))
}

/// Whether `path` is a module file the listener loaded (the object-oriented API activates
/// only there, spec §4.8).
#[pyfunction]
fn is_module_file(path: &str) -> PyResult<bool> {
    Ok(shared()?
        .module_files
        .lock()
        .map(|files| files.contains(path))
        .unwrap_or(false))
}

/// `{name: (is_package, source, origin)}` for the bootstrap's import hook.
#[pyfunction]
fn compat_sources(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let sources = PyDict::new(py);
    for (name, is_package, source) in COMPAT_SOURCES {
        let file = if *is_package {
            format!("{}/__init__.py", name.replace('.', "/"))
        } else {
            format!("{}.py", name.replace('.', "/"))
        };
        let origin = format!("<univention-directory-listener>/{file}");
        sources.set_item(name, (is_package, source, origin))?;
    }
    Ok(sources)
}

/// Installs `_udl_host`, runs the bootstrap and creates the built-in `listener` module.
pub(crate) fn install(py: Python<'_>) -> PyResult<()> {
    let sys_modules = py.import("sys")?.getattr("modules")?;

    let host = PyModule::new(py, "_udl_host")?;
    host.add_function(wrap_pyfunction!(log, &host)?)?;
    host.add_function(wrap_pyfunction!(daemon_uid, &host)?)?;
    host.add_function(wrap_pyfunction!(debug_level, &host)?)?;
    host.add_function(wrap_pyfunction!(ucr_file, &host)?)?;
    host.add_function(wrap_pyfunction!(is_module_file, &host)?)?;
    host.add_function(wrap_pyfunction!(compat_sources, &host)?)?;
    sys_modules.set_item("_udl_host", &host)?;

    let bootstrap = PyModule::new(py, "_udl_bootstrap")?;
    py.run(BOOTSTRAP, Some(&bootstrap.dict()), None)?;

    // Built in: it wins over any `listener.py` on sys.path, so `unsetuid` always returns to
    // this daemon's identity.
    let listener = PyModule::new(py, "listener")?;
    sys_modules.set_item("listener", &listener)?;
    if let Err(e) = py.run(LISTENER, Some(&listener.dict()), None) {
        sys_modules.del_item("listener")?;
        return Err(e);
    }
    Ok(())
}
