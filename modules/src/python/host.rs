//! The interpreter and the loaded modules. CPython is initialised on the thread that starts
//! the host, which becomes Python's main thread; in the listener that is the main loop's
//! thread (the runtime's `block_on` thread, never a worker), which makes every module call
//! itself, as UCS's listener does. A call takes the host's lock, then the GIL, and gives
//! both back when it returns, so threads a module started run between calls; no hand-over
//! to another thread, no copy of the call data.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use pyo3::exceptions::PySystemExit;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyModule, PyString};

use super::builtins::{self, CurrentCall, SHARED, Shared};
use super::{HostOptions, PythonError};
use crate::module::DEFAULT_PRIORITY;
use crate::module::{Call, ModuleError, ModuleInfo, ModuleSource, REPLICATION};

/// `new`/`old` as UCS hands them over: `dict[str, list[bytes]]`.
fn to_dict<'py>(
    py: Python<'py>,
    attrs: &crate::Attributes,
    names: &mut NameCache,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (name, values) in attrs {
        let list = PyList::new(py, values.iter().map(|v| PyBytes::new(py, v)))?;
        dict.set_item(names.get(py, name), list)?;
    }
    Ok(dict)
}

/// Attribute names as Python strings, made once: the schema bounds how many there are, and
/// a reused string also keeps its hash for the dict insertions.
#[derive(Default)]
struct NameCache(HashMap<Box<str>, Py<PyString>>);

impl NameCache {
    /// More distinct names than any schema has means something else is going on.
    const LIMIT: usize = 10_000;

    fn get<'py>(&mut self, py: Python<'py>, name: &str) -> Bound<'py, PyString> {
        if let Some(cached) = self.0.get(name) {
            return cached.bind(py).clone();
        }
        if self.0.len() >= Self::LIMIT {
            self.0.clear();
        }
        let string = PyString::new(py, name);
        self.0.insert(name.into(), string.clone().unbind());
        string
    }
}

/// One lifecycle call.
pub(crate) enum Work<'a> {
    Handler(&'a Call<'a>),
    Prerun,
    Postrun,
    Clean,
    Initialize,
    Setdata { key: &'a str, value: &'a str },
}

impl Work<'_> {
    fn function(&self) -> &'static str {
        match self {
            Work::Handler(_) => "handler",
            Work::Prerun => "prerun",
            Work::Postrun => "postrun",
            Work::Clean => "clean",
            Work::Initialize => "initialize",
            Work::Setdata { .. } => "setdata",
        }
    }
}

/// The loaded modules, by slot, and what their calls reuse.
#[derive(Default)]
struct State {
    slots: Vec<Option<Loaded>>,
    names: NameCache,
}

/// Handle to the interpreter; cheap to clone.
#[derive(Clone)]
pub struct PythonHost {
    state: Arc<Mutex<State>>,
}

static HOST: OnceLock<Result<PythonHost, PythonError>> = OnceLock::new();

impl PythonHost {
    /// Starts the interpreter on the calling thread, once per process; later calls return
    /// the same host (their options are ignored: the identity and UCR file do not change at
    /// run time).
    pub fn start(options: HostOptions) -> Result<PythonHost, PythonError> {
        HOST.get_or_init(|| start_here(options)).clone()
    }

    /// Runs `f` with the modules and the GIL. The lock is always taken before the GIL: a
    /// thread waiting for the lock holds no GIL, so a call that releases the GIL (a module
    /// sleeping, a module's own threads) cannot deadlock with it. A call made from a thread
    /// other than the one that started the host works too (the GIL serialises it), with a
    /// Python thread state of its own; the listener makes none.
    fn with_state<T>(&self, f: impl FnOnce(Python<'_>, &mut State) -> T) -> T {
        // A panic inside a call leaves the slots as they were: still usable.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        Python::attach(|py| f(py, &mut state))
    }

    /// Imports one module file and reads its declarations (spec §4.1–4.2).
    pub(crate) fn load(&self, path: &Path) -> Result<(usize, ModuleInfo), PythonError> {
        self.with_state(|py, state| {
            let loaded = load(py, path)?;
            let info = loaded.info.clone();
            let slot = match state.slots.iter().position(Option::is_none) {
                Some(free) => {
                    state.slots[free] = Some(loaded);
                    free
                }
                None => {
                    state.slots.push(Some(loaded));
                    state.slots.len() - 1
                }
            };
            Ok((slot, info))
        })
    }

    pub(crate) fn call(&self, slot: usize, work: Work<'_>) -> Result<(), ModuleError> {
        self.with_state(|py, state| {
            let State { slots, names } = state;
            match slots.get(slot).and_then(Option::as_ref) {
                Some(loaded) => run(py, loaded, work, names),
                None => Err(ModuleError::new("module was unloaded")),
            }
        })
    }

    pub(crate) fn unload(&self, slot: usize) {
        self.with_state(|py, state| {
            if let Some(loaded) = state.slots.get_mut(slot).and_then(Option::take) {
                unload(py, &loaded);
            }
        });
    }

    /// The module call running right now, if any (for status reports and for the log line
    /// when a module keeps the daemon from stopping).
    pub fn current_call() -> Option<CurrentCall> {
        SHARED.get()?.current.lock().ok()?.clone()
    }
}

fn start_here(options: HostOptions) -> Result<PythonHost, PythonError> {
    let _ = SHARED.set(Shared {
        daemon_uid: options.daemon_uid,
        ucr_file: options.ucr_file,
        module_files: Mutex::new(HashSet::new()),
        current: Mutex::new(None),
    });
    initialize_interpreter().map_err(PythonError::Start)?;
    Python::attach(|py| {
        builtins::install(py).map_err(|e| PythonError::Start(format_exception(py, &e)))
    })?;
    Ok(PythonHost {
        state: Arc::new(Mutex::new(State::default())),
    })
}

/// Starts CPython the way the listener needs it: no Python signal handlers (the daemon owns
/// SIGTERM/SIGHUP/SIGUSR*), and `-O` like the UCS listener (assert statements disabled).
fn initialize_interpreter() -> Result<(), String> {
    use pyo3::ffi;
    // SAFETY: runs once per process (guarded by HOST), before any other Python use; the
    // config struct is initialised by PyConfig_InitPythonConfig before it is read, and
    // cleared after use.
    unsafe {
        if ffi::Py_IsInitialized() != 0 {
            return Err("a Python interpreter is already running in this process".into());
        }
        let mut config = std::mem::MaybeUninit::<ffi::PyConfig>::uninit();
        ffi::PyConfig_InitPythonConfig(config.as_mut_ptr());
        let mut config = config.assume_init();
        config.install_signal_handlers = 0;
        config.optimization_level = 1;
        config.parse_argv = 0;
        let status = ffi::Py_InitializeFromConfig(&config);
        ffi::PyConfig_Clear(&mut config);
        if ffi::PyStatus_Exception(status) != 0 {
            let message = if status.err_msg.is_null() {
                "unknown error".to_owned()
            } else {
                std::ffi::CStr::from_ptr(status.err_msg)
                    .to_string_lossy()
                    .into_owned()
            };
            return Err(format!("cannot initialise Python: {message}"));
        }
        // Initialisation leaves the GIL held by this thread; Python::attach takes it again.
        ffi::PyEval_SaveThread();
    }
    Ok(())
}

/// A module as imported, with the functions UCS looks up once at import time.
struct Loaded {
    info: ModuleInfo,
    /// `info.name`, shared with the current-call record.
    name: Arc<str>,
    sys_name: String,
    /// The module object: a reload imports the same file again before the old one is
    /// unloaded, and unloading the old one must not remove the new one.
    module: Py<PyModule>,
    handler: Py<PyAny>,
    modrdn: bool,
    prerun: Option<Py<PyAny>>,
    postrun: Option<Py<PyAny>>,
    clean: Option<Py<PyAny>>,
    initialize: Option<Py<PyAny>>,
    setdata: Option<Py<PyAny>>,
}

fn import_error(path: &Path, message: impl Into<String>) -> PythonError {
    PythonError::Import {
        file: path.to_owned(),
        message: message.into(),
    }
}

fn load(py: Python<'_>, path: &Path) -> Result<Loaded, PythonError> {
    // The file path is the module name, as in UCS: unique, and globals never collide.
    let sys_name = path.to_string_lossy().into_owned();
    let failed = |e: PyErr| import_error(path, format_exception(py, &e));
    let module = import_file(py, path, &sys_name).map_err(failed)?;
    let result = declarations(py, path, &module);
    if result.is_err() {
        forget(py, &sys_name);
    }
    let (info, modrdn) = result?;
    let function = |name: &str| -> Result<Option<Py<PyAny>>, PythonError> {
        match module.getattr_opt(name).map_err(failed)? {
            Some(f) if f.is_callable() => Ok(Some(f.unbind())),
            Some(_) => Err(import_error(path, format!("`{name}` is not callable"))),
            None => Ok(None),
        }
    };
    let loaded = (|| {
        Ok(Loaded {
            handler: function("handler")?
                .ok_or_else(|| import_error(path, "module has no `handler` function"))?,
            prerun: function("prerun")?,
            postrun: function("postrun")?,
            clean: function("clean")?,
            initialize: function("initialize")?,
            setdata: function("setdata")?,
            name: info.name.as_str().into(),
            info,
            sys_name: sys_name.clone(),
            module: module.clone().unbind(),
            modrdn,
        })
    })();
    if loaded.is_err() {
        forget(py, &sys_name);
    }
    loaded
}

fn import_file<'py>(
    py: Python<'py>,
    path: &Path,
    sys_name: &str,
) -> PyResult<Bound<'py, PyModule>> {
    let machinery = py.import("importlib.machinery")?;
    let util = py.import("importlib.util")?;
    // An explicit source loader also accepts a single module file without `.py`.
    let loader = machinery
        .getattr("SourceFileLoader")?
        .call1((sys_name, sys_name))?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("loader", &loader)?;
    let spec = util
        .getattr("spec_from_file_location")?
        .call((sys_name, sys_name), Some(&kwargs))?;
    let module = util.call_method1("module_from_spec", (&spec,))?;
    py.import("sys")?
        .getattr("modules")?
        .set_item(sys_name, &module)?;
    if let Some(shared) = SHARED.get()
        && let Ok(mut files) = shared.module_files.lock()
    {
        files.insert(sys_name.to_owned());
    }
    set_current(Some(CurrentCall {
        module: path
            .file_stem()
            .map(|s| s.to_string_lossy().into())
            .unwrap_or_else(|| "".into()),
        function: "import",
        dn: None,
        started: Instant::now(),
    }));
    let executed = loader.call_method1("exec_module", (&module,));
    set_current(None);
    if let Err(e) = executed {
        forget(py, sys_name);
        return Err(e);
    }
    Ok(module.cast_into::<PyModule>()?)
}

/// Reads the legacy module attributes (spec §4.2); returns the info and whether `modrdn`
/// is present.
fn declarations(
    py: Python<'_>,
    path: &Path,
    module: &Bound<'_, PyModule>,
) -> Result<(ModuleInfo, bool), PythonError> {
    let failed = |e: PyErr| import_error(path, format_exception(py, &e));
    let text = |name: &str| -> Result<Option<String>, PythonError> {
        match module.getattr_opt(name).map_err(failed)? {
            None => Ok(None),
            Some(value) if value.is_none() => Ok(None),
            Some(value) => value
                .extract::<String>()
                .map(Some)
                .map_err(|_| import_error(path, format!("`{name}` must be a string"))),
        }
    };
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = text("name")?.unwrap_or(stem);
    crate::module::check_module_name(&name).map_err(|reason| import_error(path, reason))?;
    let description =
        text("description")?.ok_or_else(|| import_error(path, "module has no `description`"))?;
    let filter = text("filter")?;
    // Only a list restricts (a tuple is ignored, as in UCS).
    let attributes = match module.getattr_opt("attributes").map_err(failed)? {
        Some(value) if value.is_instance_of::<PyList>() => value
            .extract::<Vec<String>>()
            .map_err(|_| import_error(path, "`attributes` must be a list of strings"))?,
        Some(value) if !value.is_none() => {
            tracing::warn!(
                "module {name} ({}): `attributes` is not a list; ignored",
                path.display()
            );
            Vec::new()
        }
        _ => Vec::new(),
    };
    let handle_every_delete = match module.getattr_opt("handle_every_delete").map_err(failed)? {
        Some(value) => value.is_truthy().map_err(failed)?,
        None => false,
    };
    // Off unless asked for: UCS modules do not expect calls without transactions.
    let handle_subtree_moves = match module.getattr_opt("handle_subtree_moves").map_err(failed)? {
        Some(value) => value.is_truthy().map_err(failed)?,
        None => false,
    };
    let default_priority = if name == REPLICATION {
        0.0
    } else {
        DEFAULT_PRIORITY
    };
    let priority = match module.getattr_opt("priority").map_err(failed)? {
        Some(value) if !value.is_none() => value.extract::<f64>().unwrap_or_else(|_| {
            tracing::warn!(
                "module {name} ({}): `priority` is not a number; using {default_priority}",
                path.display()
            );
            default_priority
        }),
        _ => default_priority,
    };
    let modrdn = module.hasattr("modrdn").map_err(failed)?;
    Ok((
        ModuleInfo {
            name,
            description,
            filter,
            attributes,
            handle_every_delete,
            handle_subtree_moves,
            priority,
            source: ModuleSource::File(path.to_owned()),
        },
        modrdn,
    ))
}

/// Forgets an unloaded module's name, unless a newer import of its file took it over.
fn unload(py: Python<'_>, loaded: &Loaded) {
    let current = py
        .import("sys")
        .and_then(|sys| sys.getattr("modules"))
        .and_then(|modules| modules.get_item(&loaded.sys_name));
    if current.is_ok_and(|current| current.is(loaded.module.bind(py))) {
        forget(py, &loaded.sys_name);
    }
}

fn forget(py: Python<'_>, sys_name: &str) {
    if let Ok(modules) = py.import("sys").and_then(|sys| sys.getattr("modules")) {
        let _ = modules.del_item(sys_name);
    }
    if let Some(shared) = SHARED.get()
        && let Ok(mut files) = shared.module_files.lock()
    {
        files.remove(sys_name);
    }
}

fn set_current(call: Option<CurrentCall>) {
    if let Some(shared) = SHARED.get()
        && let Ok(mut current) = shared.current.lock()
    {
        *current = call;
    }
}

/// Runs one call. Success only when the function returns `None` (spec §4.3).
fn run(
    py: Python<'_>,
    loaded: &Loaded,
    work: Work<'_>,
    names: &mut NameCache,
) -> Result<(), ModuleError> {
    let function = match &work {
        Work::Handler(_) => Some(&loaded.handler),
        Work::Prerun => loaded.prerun.as_ref(),
        Work::Postrun => loaded.postrun.as_ref(),
        Work::Clean => loaded.clean.as_ref(),
        Work::Initialize => loaded.initialize.as_ref(),
        Work::Setdata { .. } => loaded.setdata.as_ref(),
    };
    let Some(function) = function else {
        return Ok(());
    };
    set_current(Some(CurrentCall {
        module: Arc::clone(&loaded.name),
        function: work.function(),
        dn: match &work {
            Work::Handler(call) => Some(call.dn.into()),
            _ => None,
        },
        started: Instant::now(),
    }));
    let result = match work {
        Work::Handler(call) => to_dict(py, call.new, names)
            .and_then(|new| Ok((new, to_dict(py, call.old, names)?)))
            .and_then(|(new, old)| {
                if loaded.modrdn {
                    let command = call.command.as_char().to_string();
                    function.call1(py, (call.dn, new, old, command))
                } else {
                    function.call1(py, (call.dn, new, old))
                }
            }),
        Work::Setdata { key, value } => function.call1(py, (key, value)),
        _ => function.call0(py),
    };
    set_current(None);
    match result {
        Ok(value) if value.is_none(py) => Ok(()),
        Ok(value) => {
            let shown = value
                .bind(py)
                .repr()
                .map(|r| r.to_string())
                .unwrap_or_else(|_| "?".into());
            Err(ModuleError::new(format!(
                "returned {shown} instead of None"
            )))
        }
        Err(e) if e.is_instance_of::<PySystemExit>(py) => Err(system_exit(py, &e)),
        Err(e) => Err(ModuleError::new(format_exception(py, &e))),
    }
}

/// `sys.exit()` in a module: a request to stop the listener, not a failed call. The status
/// follows Python's own rules: `None` is 0, an integer is itself, anything else (a message)
/// is 1.
fn system_exit(py: Python<'_>, error: &PyErr) -> ModuleError {
    let code = error.value(py).getattr("code").ok();
    let (status, shown) = match &code {
        None => (1, "?".to_owned()),
        Some(code) if code.is_none() => (0, "None".to_owned()),
        Some(code) => match code.extract::<i64>() {
            Ok(n) => (i32::try_from(n).unwrap_or(1), n.to_string()),
            Err(_) => (
                1,
                code.repr().map_or_else(|_| "?".into(), |r| r.to_string()),
            ),
        },
    };
    // Where it was raised: the innermost frame of the traceback.
    let place = error
        .traceback(py)
        .and_then(|tb| {
            let frames = py
                .import("traceback")
                .and_then(|m| m.call_method1("extract_tb", (tb,)))
                .ok()?;
            let last = frames.get_item(-1).ok()?;
            let file: String = last.getattr("filename").ok()?.extract().ok()?;
            let line: u64 = last.getattr("lineno").ok()?.extract().ok()?;
            Some(format!(" at {file}:{line}"))
        })
        .unwrap_or_default();
    ModuleError::exit_requested(status, format!("SystemExit({shown}){place}"))
}

/// The full traceback of `error`, as Python prints it.
fn format_exception(py: Python<'_>, error: &PyErr) -> String {
    let formatted = py
        .import("traceback")
        .and_then(|tb| {
            tb.call_method1(
                "format_exception",
                (error.get_type(py), error.value(py), error.traceback(py)),
            )
        })
        .and_then(|lines| lines.extract::<Vec<String>>());
    match formatted {
        Ok(lines) => lines.concat().trim_end().to_owned(),
        Err(_) => error.to_string(),
    }
}
