//! The interpreter thread: it initialises CPython, imports the module files and runs every
//! call; the rest of the listener talks to it through a bounded channel and waits for the
//! answer of each call, so calls keep their order and module state never changes threads.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use pyo3::exceptions::PySystemExit;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyModule, PyString};

use super::builtins::{self, CurrentCall, SHARED, Shared};
use super::{HostOptions, PythonError};
use crate::Command;
use crate::module::DEFAULT_PRIORITY;
use crate::module::{Call, ModuleError, ModuleInfo, ModuleSource, REPLICATION};

/// Requests waiting for the interpreter; the caller blocks on each answer anyway, so a
/// short queue is enough.
const QUEUE: usize = 16;
/// How long the caller polls for an answer before it sleeps: a hand-over through a sleeping
/// thread costs microseconds of wake-up each way, more than most handler calls.
const ANSWER_SPIN: Duration = Duration::from_micros(50);
/// How long the interpreter thread polls for the next request: long enough for the next
/// call of the same transaction, short enough not to burn CPU between transactions.
const REQUEST_SPIN: Duration = Duration::from_micros(10);

/// Attributes copied into one buffer for the trip to the interpreter thread: a handful of
/// allocations instead of one per name and value (freeing on another thread is what makes
/// many small allocations expensive).
#[derive(Default)]
pub(crate) struct FlatAttrs {
    data: Vec<u8>,
    /// Per attribute: its name in `data`, and its values as a range of `values`.
    attrs: Vec<(Range<usize>, Range<usize>)>,
    values: Vec<Range<usize>>,
}

impl FlatAttrs {
    fn new(attrs: &crate::Attributes) -> FlatAttrs {
        let size = attrs
            .iter()
            .map(|(name, values)| name.len() + values.iter().map(Vec::len).sum::<usize>())
            .sum();
        let mut flat = FlatAttrs {
            data: Vec::with_capacity(size),
            attrs: Vec::with_capacity(attrs.len()),
            values: Vec::with_capacity(attrs.iter().map(|(_, v)| v.len()).sum()),
        };
        for (name, values) in attrs {
            let name_start = flat.data.len();
            flat.data.extend_from_slice(name.as_bytes());
            let first_value = flat.values.len();
            for value in values {
                let start = flat.data.len();
                flat.data.extend_from_slice(value);
                flat.values.push(start..flat.data.len());
            }
            flat.attrs.push((
                name_start..name_start + name.len(),
                first_value..flat.values.len(),
            ));
        }
        flat
    }

    fn to_dict<'py>(&self, py: Python<'py>, names: &mut NameCache) -> PyResult<Bound<'py, PyDict>> {
        let bytes = |range: &Range<usize>| self.data.get(range.clone()).unwrap_or_default();
        let dict = PyDict::new(py);
        for (name, values) in &self.attrs {
            let name = names.get(py, bytes(name));
            let values = self.values.get(values.clone()).unwrap_or_default();
            let list = PyList::new(py, values.iter().map(|v| PyBytes::new(py, bytes(v))))?;
            dict.set_item(name, list)?;
        }
        Ok(dict)
    }
}

/// Attribute names as Python strings, made once: the schema bounds how many there are, and
/// a reused string also keeps its hash for the dict insertions.
#[derive(Default)]
struct NameCache(HashMap<Box<[u8]>, Py<PyString>>);

impl NameCache {
    /// More distinct names than any schema has means something else is going on.
    const LIMIT: usize = 10_000;

    fn get<'py>(&mut self, py: Python<'py>, name: &[u8]) -> Bound<'py, PyString> {
        if let Some(cached) = self.0.get(name) {
            return cached.bind(py).clone();
        }
        if self.0.len() >= Self::LIMIT {
            self.0.clear();
        }
        let string = PyString::new(py, &String::from_utf8_lossy(name));
        self.0.insert(name.into(), string.clone().unbind());
        string
    }
}

/// One lifecycle call, with the data copied so it can cross to the interpreter thread.
pub(crate) enum Work {
    Handler {
        // Shared with the current-call record, so naming the call costs no copy.
        dn: Arc<str>,
        command: Command,
        new: FlatAttrs,
        old: FlatAttrs,
    },
    Prerun,
    Postrun,
    Clean,
    Initialize,
    Setdata {
        key: String,
        value: String,
    },
}

impl Work {
    pub(crate) fn from_call(call: &Call<'_>) -> Work {
        Work::Handler {
            dn: call.dn.into(),
            command: call.command,
            new: FlatAttrs::new(call.new),
            old: FlatAttrs::new(call.old),
        }
    }

    fn function(&self) -> &'static str {
        match self {
            Work::Handler { .. } => "handler",
            Work::Prerun => "prerun",
            Work::Postrun => "postrun",
            Work::Clean => "clean",
            Work::Initialize => "initialize",
            Work::Setdata { .. } => "setdata",
        }
    }
}

enum Request {
    Load { path: PathBuf },
    Call { slot: usize, work: Work },
    Unload { slot: usize },
}

/// Answers to `Load` and `Call`, in request order (`Unload` has none).
enum Reply {
    Loaded(Result<(usize, ModuleInfo), PythonError>),
    Called(Result<(), ModuleError>),
}

/// The two directions; locked for a whole request and its answer, so answers always
/// belong to the request just sent.
struct Channel {
    requests: SyncSender<Request>,
    replies: Receiver<Reply>,
}

impl Channel {
    fn ask(&self, request: Request) -> Option<Reply> {
        self.requests.send(request).ok()?;
        receive(&self.replies, ANSWER_SPIN)
    }
}

/// Handle to the interpreter thread; cheap to clone.
#[derive(Clone)]
pub struct PythonHost {
    channel: Arc<Mutex<Channel>>,
}

/// Waits for the next message, polling briefly before sleeping; `None` once the other side
/// is gone.
fn receive<T>(receiver: &Receiver<T>, spin: Duration) -> Option<T> {
    let deadline = Instant::now() + spin;
    loop {
        match receiver.try_recv() {
            Ok(message) => return Some(message),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) if Instant::now() >= deadline => {
                return receiver.recv().ok();
            }
            Err(TryRecvError::Empty) => std::thread::yield_now(),
        }
    }
}

static HOST: OnceLock<Result<PythonHost, PythonError>> = OnceLock::new();

impl PythonHost {
    /// Starts the interpreter thread, once per process; later calls return the same host
    /// (their options are ignored: the identity and UCR file do not change at run time).
    pub fn start(options: HostOptions) -> Result<PythonHost, PythonError> {
        HOST.get_or_init(|| spawn(options)).clone()
    }

    /// Imports one module file and reads its declarations (spec §4.1–4.2).
    fn ask(&self, request: Request) -> Option<Reply> {
        self.channel.lock().ok()?.ask(request)
    }

    pub(crate) fn load(&self, path: &Path) -> Result<(usize, ModuleInfo), PythonError> {
        match self.ask(Request::Load {
            path: path.to_owned(),
        }) {
            Some(Reply::Loaded(result)) => result,
            _ => Err(PythonError::Stopped),
        }
    }

    pub(crate) fn call(&self, slot: usize, work: Work) -> Result<(), ModuleError> {
        match self.ask(Request::Call { slot, work }) {
            Some(Reply::Called(result)) => result,
            _ => Err(ModuleError::new(
                "the Python interpreter thread has stopped",
            )),
        }
    }

    pub(crate) fn unload(&self, slot: usize) {
        // Best effort: a stopped interpreter has nothing left to unload.
        if let Ok(channel) = self.channel.lock() {
            let _ = channel.requests.send(Request::Unload { slot });
        }
    }

    /// The module call running right now, if any (for status reports and for the log line
    /// when a module keeps the daemon from stopping).
    pub fn current_call() -> Option<CurrentCall> {
        SHARED.get()?.current.lock().ok()?.clone()
    }
}

fn spawn(options: HostOptions) -> Result<PythonHost, PythonError> {
    let (requests, receiver) = sync_channel(QUEUE);
    let (reply, replies) = sync_channel(QUEUE);
    let (ready, started) = sync_channel(1);
    std::thread::Builder::new()
        .name("python".into())
        .spawn(move || interpreter_thread(options, receiver, reply, ready))
        .map_err(|e| PythonError::Start(format!("cannot start the interpreter thread: {e}")))?;
    started
        .recv()
        .map_err(|_| PythonError::Start("the interpreter thread ended during start-up".into()))??;
    Ok(PythonHost {
        channel: Arc::new(Mutex::new(Channel { requests, replies })),
    })
}

fn interpreter_thread(
    options: HostOptions,
    requests: Receiver<Request>,
    reply: SyncSender<Reply>,
    ready: SyncSender<Result<(), PythonError>>,
) {
    let _ = SHARED.set(Shared {
        daemon_uid: options.daemon_uid,
        ucr_file: options.ucr_file,
        module_files: Mutex::new(HashSet::new()),
        current: Mutex::new(None),
    });
    if let Err(message) = initialize_interpreter() {
        let _ = ready.send(Err(PythonError::Start(message)));
        return;
    }
    Python::attach(|py| {
        if let Err(e) = builtins::install(py) {
            let message = format_exception(py, &e);
            let _ = ready.send(Err(PythonError::Start(message)));
            return;
        }
        let _ = ready.send(Ok(()));
        let mut slots: Vec<Option<Loaded>> = Vec::new();
        let mut names = NameCache::default();
        // Release the GIL while waiting, so threads a module started keep running. (The
        // mutex only makes the receiver shareable with the detached closure.)
        let requests = Mutex::new(requests);
        let next = || requests.lock().ok().and_then(|r| receive(&r, REQUEST_SPIN));
        while let Some(request) = py.detach(next) {
            match request {
                Request::Load { path } => {
                    let result = load(py, &path).map(|loaded| {
                        let info = loaded.info.clone();
                        let slot = match slots.iter().position(Option::is_none) {
                            Some(free) => {
                                slots[free] = Some(loaded);
                                free
                            }
                            None => {
                                slots.push(Some(loaded));
                                slots.len() - 1
                            }
                        };
                        (slot, info)
                    });
                    let _ = reply.send(Reply::Loaded(result));
                }
                Request::Call { slot, work } => {
                    let result = match slots.get(slot).and_then(Option::as_ref) {
                        Some(loaded) => run(py, loaded, work, &mut names),
                        None => Err(ModuleError::new("module was unloaded")),
                    };
                    let _ = reply.send(Reply::Called(result));
                }
                Request::Unload { slot } => {
                    if let Some(loaded) = slots.get_mut(slot).and_then(Option::take) {
                        unload(py, &loaded);
                    }
                }
            }
        }
    });
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
    work: Work,
    names: &mut NameCache,
) -> Result<(), ModuleError> {
    let function = match &work {
        Work::Handler { .. } => Some(&loaded.handler),
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
            Work::Handler { dn, .. } => Some(Arc::clone(dn)),
            _ => None,
        },
        started: Instant::now(),
    }));
    let result = match work {
        Work::Handler {
            dn,
            command,
            new,
            old,
        } => new
            .to_dict(py, names)
            .and_then(|new| Ok((new, old.to_dict(py, names)?)))
            .and_then(|(new, old)| {
                if loaded.modrdn {
                    let command = command.as_char().to_string();
                    function.call1(py, (&*dn, new, old, command))
                } else {
                    function.call1(py, (&*dn, new, old))
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
