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
    /// The transaction being processed when the call is made: `id` itself, except for the
    /// `r` of a move, which is handed over while its `a` is processed.
    pub transaction: u64,
    /// This module's calls for `transaction` so far, this one included (1 for the first).
    /// The same on every attempt of the transaction, so a module can name its output
    /// deterministically (the `nats` module's message ids).
    pub number: u32,
}

/// Why a module call did not succeed: a failure (logged with the module name, never fatal
/// to the listener), or the module asking the listener to exit (Python `SystemExit`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ModuleError {
    message: String,
    kind: ErrorKind,
}

/// What the listener does after a [`ModuleError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorKind {
    /// The module is not recorded on the object and the listener goes on.
    Failed,
    /// The module cannot work right now (its service is unreachable) and the same call may
    /// succeed later: the listener retries the handler call with backoff instead of going
    /// on without the module, and does not pass the transaction until it succeeds.
    Transient,
    /// The module asked the listener to stop with this status.
    Exit(i32),
}

impl ModuleError {
    /// A failed call: the module is not recorded on the object and the listener goes on.
    pub fn new(message: impl Into<String>) -> ModuleError {
        ModuleError {
            message: message.into(),
            kind: ErrorKind::Failed,
        }
    }

    /// The module asked the listener to stop with `status` (UCS modules call `sys.exit(1)`
    /// to ask for a restart): the transaction in progress must not be committed, so it is
    /// processed again after the restart.
    pub fn exit_requested(status: i32, message: impl Into<String>) -> ModuleError {
        ModuleError {
            message: message.into(),
            kind: ErrorKind::Exit(status),
        }
    }

    /// The status the module asked the listener to exit with, if this is an exit request.
    pub fn requested_exit(&self) -> Option<i32> {
        match self.kind {
            ErrorKind::Exit(status) => Some(status),
            _ => None,
        }
    }

    /// Whether retrying the same call may succeed ([`ModuleError::transient`]).
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// A failure that retrying may fix (see [`ModuleError::transient`]); only meaningful
    /// for `handler`.
    pub fn transient(message: impl Into<String>) -> ModuleError {
        ModuleError {
            message: message.into(),
            kind: ErrorKind::Transient,
        }
    }
}

/// The attribute names whose value lists differ between `new` and `old` (names compared
/// exactly, values positionally), plus names only in `old` (spec listener.md §3.4 step 1).
pub fn changed_attributes<'a>(new: &'a Attributes, old: &'a Attributes) -> Vec<&'a str> {
    let mut changes: Vec<&str> = new
        .iter()
        .filter(|(name, values)| {
            old.iter()
                .find(|(n, _)| n == name)
                .is_none_or(|(_, v)| v != values)
        })
        .map(|(name, _)| name.as_str())
        .collect();
    changes.extend(
        old.iter()
            .filter(|(name, _)| !new.iter().any(|(n, _)| n == name))
            .map(|(name, _)| name.as_str()),
    );
    changes
}

/// A handler module. Calls come from one thread at a time, in the UCS lifecycle order:
/// `setdata`… first, then for an uninitialised module `clean`, `initialize` and `n` calls,
/// and per change a lazy `prerun` before the first `handler` after start or `postrun`.
pub trait Module: Send {
    fn info(&self) -> &ModuleInfo;

    /// Handles one change. `Err` means failure: the module is not recorded on the object;
    /// a [transient](ModuleError::transient) `Err` makes the listener call again, with the
    /// same `Call`, after a backoff.
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

    /// Called before the listener makes its commits durable (fsync): a module that keeps
    /// output for a committed transaction in a file of its own (the `nats` outbox) syncs it
    /// here, so no commit survives a power loss without it. An error stops the listener
    /// like a failed flush of its own.
    fn sync(&mut self) -> Result<(), ModuleError> {
        Ok(())
    }

    /// Waits until the module's target confirmed every change handed over so far (a
    /// module that leaves writes in flight after its handler returned, the native
    /// `replication`); returns how many remain unconfirmed (the target is unreachable:
    /// they stay the module's to deliver). Called before a Backup's cascade line.
    fn confirm(&mut self) -> usize {
        0
    }

    /// Changes handed over whose application the target has not confirmed yet.
    fn unconfirmed(&self) -> usize {
        0
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

    /// A lasting problem the module reports (e.g. a replicated schema its target refused):
    /// while there is one the module is unhealthy ("degraded"), whatever its calls return.
    fn problem(&self) -> Option<String> {
        None
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
