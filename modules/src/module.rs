//! The interface between the change engine and a handler module, native or Python.
//!
//! The engine owns the UCS rules (which module is called when, spec listener.md §3.4–3.5,
//! §4.3–4.4); a module only says what it is ([`ModuleInfo`]) and does its work in the
//! lifecycle calls of [`Module`]. Every call reports success or failure: a failed handler
//! call leaves the module off the object's module list, exactly like a Python handler that
//! raised or returned something other than `None`.

use std::fmt;
use std::path::PathBuf;

pub use proto::Command;

/// Attributes as handed to modules: name → values (exact LDAP bytes), in server order.
/// A missing side (`old` of an add, `new` of a delete) is an empty slice.
pub type Attributes = [(String, Vec<Vec<u8>>)];

/// Priority of modules that set none (UCS 5: every module but `replication`).
pub(crate) const DEFAULT_PRIORITY: f64 = 50.0;

/// The name UCS treats specially: always first, never "up to date", always called on
/// deletes (spec listener.md §3.4, §3.5).
pub const REPLICATION: &str = "replication";

/// What a module declares about itself; read once when it is loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleInfo {
    /// Unique name: state file `<cache>/handlers/<name>`, entry in the cached module lists.
    pub name: String,
    pub description: String,
    /// The restricted UCS filter (spec §5). `None`: the module never matches on updates (it
    /// still receives deletes of objects it handled, and all of them with
    /// `handle_every_delete`).
    pub filter: Option<String>,
    /// Attributes whose change makes an object not "up to date" for this module; empty means
    /// any change does (spec §3.4).
    pub attributes: Vec<String>,
    pub handle_every_delete: bool,
    /// The module hears about the descendants of a moved container (LDAP moves a subtree
    /// in one operation, the notifier numbers only the container): each as an `r` + `a`
    /// pair, parents first, in the container's transaction. Without it the cache follows
    /// silently.
    pub handle_subtree_moves: bool,
    /// Ordering key (lower first, then by name); `replication` defaults to 0.
    pub priority: f64,
    /// Where the module comes from, for logs and tools: a file path or `native:<kind>`.
    pub source: ModuleSource,
}

/// Checks a module name: it names the state file `<cache>/handlers/<name>` and is written
/// into cached module lists and `listenerModule:` lines of dumps, so it must be a plain file
/// name (not empty, no `/`, not hidden) without control characters.
pub(crate) fn check_module_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.starts_with('.')
        || name.contains('/')
        || name.chars().any(char::is_control)
    {
        return Err(format!(
            "{name:?} is not a valid module name (it names the state file: no `/`, no leading \
             `.`, no control characters)"
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSource {
    File(PathBuf),
    Native(String),
}

impl fmt::Display for ModuleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModuleSource::File(path) => write!(f, "{}", path.display()),
            ModuleSource::Native(kind) => write!(f, "native:{kind}"),
        }
    }
}

/// One handler call.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// The notifier id being processed; during module initialisation the id the listener
    /// stands at.
    pub id: u64,
    /// The DN string the module must see (spec §3.3: LDAP's spelling for updates and final
    /// moves, the notifier's for deletes, `r` and non-final moves).
    pub dn: &'a str,
    pub command: Command,
    pub new: &'a Attributes,
    pub old: &'a Attributes,
}

/// Why a module call failed; logged with the module name, never fatal to the listener.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModuleError {
    /// The call failed for good: the module is not recorded on the object (UCS's rule for
    /// a handler that raised).
    #[error("{0}")]
    Failed(String),
    /// The call could not be done now (its server is down, busy or unreachable) and may
    /// succeed later: the listener rolls the whole transaction back and retries it with
    /// backoff, without advancing its id. Only a handler call may return it; elsewhere it
    /// counts as a failure.
    #[error("{0}")]
    Transient(String),
}

impl ModuleError {
    pub fn new(message: impl Into<String>) -> ModuleError {
        ModuleError::Failed(message.into())
    }

    /// "Retry this transaction later" (see [`ModuleError::Transient`]).
    pub fn transient(message: impl Into<String>) -> ModuleError {
        ModuleError::Transient(message.into())
    }

    pub fn is_transient(&self) -> bool {
        matches!(self, ModuleError::Transient(_))
    }

    pub fn message(&self) -> &str {
        match self {
            ModuleError::Failed(message) | ModuleError::Transient(message) => message,
        }
    }
}

/// A handler module. Calls come from one thread at a time, in the UCS lifecycle order:
/// `setdata`… first, then for an uninitialised module `clean`, `initialize` and `n` calls,
/// and per change a lazy `prerun` before the first `handler` after start or `postrun`.
pub trait Module: Send {
    fn info(&self) -> &ModuleInfo;

    /// Handles one change. `Err` means failure: the module is not recorded on the object.
    fn handler(&mut self, call: &Call<'_>) -> Result<(), ModuleError>;

    /// Called before the first handler call of a batch. A module without work here is
    /// "prepared" right away.
    fn prerun(&mut self) -> Result<(), ModuleError> {
        Ok(())
    }

    /// Called after the listener has been idle for the postrun delay, and at exit.
    fn postrun(&mut self) -> Result<(), ModuleError> {
        Ok(())
    }

    /// First half of (re)initialisation: forget everything derived from earlier objects.
    fn clean(&mut self) -> Result<(), ModuleError> {
        Ok(())
    }

    /// Second half of (re)initialisation, before the `n` calls for every matching object.
    fn initialize(&mut self) -> Result<(), ModuleError> {
        Ok(())
    }

    /// Connection data: keys `basedn`, `binddn`, `bindpw`, `ldapserver`, in that order.
    fn setdata(&mut self, _key: &str, _value: &str) -> Result<(), ModuleError> {
        Ok(())
    }

    /// Changes the module holds back because their target refused them (a quarantine):
    /// while there are any the module is unhealthy, whatever its calls return.
    fn quarantined(&self) -> usize {
        0
    }

    /// An operator command (`univention-directory-listener-ctrl module NAME COMMAND…`),
    /// run by the main loop between transactions; the reply is shown to the operator.
    fn control(&mut self, command: &[&str]) -> Result<String, ModuleError> {
        Err(ModuleError::new(format!(
            "module {} has no operator commands (got {:?})",
            self.info().name,
            command.join(" ")
        )))
    }
}
