//! Built-in handler modules, selected with `--native-module KIND=ARG`:
//!
//! - `jsonl=/path/file.jsonl`: appends every change as one JSON line to the file;
//! - `exec=/path/program arg…`: runs the program for every change with the change as JSON
//!   on its standard input (split on whitespace, no shell);
//! - `nats=nats://host:4222[,…]`: publishes every change to NATS JetStream, exactly once
//!   (see `nats.rs` for its config keys and the README for the message format);
//! - `jsonl=@/path/x.conf`, `exec=@/path/y.conf`, `nats=@/path/z.conf`: the same, set up by
//!   a config file;
//! - `replication` or `replication=@/path/r.conf`: writes every change into this host's
//!   own LDAP server, like UCS's `replication.py` (settings from UCR, then the file; see
//!   [`replication`]).
//!
//! A config file has `key = value` lines (`#` starts a comment line). Keys of both kinds:
//! `name` (ASCII letters, digits and `,.-_`), `description`, `filter`, `attributes`
//! (space-separated), `priority`, `handle_every_delete` and `handle_subtree_moves` (yes/no,
//! true/false, 1/0; the latter defaults to yes for `jsonl`, which exports every change, and
//! to no for `exec`, whose programs may not expect calls without a transaction);
//! `jsonl` adds `file` (required) and `fsync` (`fdatasync` at postrun, default no), `exec`
//! adds `command` (required) and `timeout` (seconds, default 30). Unknown keys are errors.
//!
//! Without a config file both see every object (`(objectClass=*)`) and every delete. The
//! change is one JSON object, keys in this order, attributes in server order:
//! `{"time":"2026-11-21T10:00:00.123456Z","id":7,"module":"jsonl","command":"a","dn":"…",
//! "old":{},"new":{"cn":["x"],"jpegPhoto":[{"base64":"/9j/"}]}}`: a value is a string if it
//! is UTF-8, else `{"base64":…}`.

mod config;
mod exec;
mod json;
mod jsonl;
mod nats;
mod outbox;
mod quarantine;
pub mod replication;
mod schema;

/// How many changes the replication quarantine in `state_dir` holds (read-only).
pub fn quarantined_changes(state_dir: &std::path::Path) -> Result<usize, String> {
    quarantine::Quarantine::count(state_dir)
}

use std::io;
use std::path::PathBuf;

use daemon::ucr::Ucr;

use crate::module::{DEFAULT_PRIORITY, Module, ModuleInfo, ModuleSource};

/// The kinds [`load`] knows, for `--help`.
pub(crate) const KINDS: &[&str] = &["jsonl", "exec", "nats", "replication"];

/// Why a native module could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("native module {spec:?}: unknown kind {kind:?} (known: {})", KINDS.join(", "))]
    UnknownKind { spec: String, kind: String },
    #[error("native module {spec:?}: missing argument, expected {kind}=ARG or {kind}=@CONFIG")]
    MissingArgument { spec: String, kind: String },
    #[error("cannot read native module config {}: {source}", path.display())]
    ReadConfig { path: PathBuf, source: io::Error },
    #[error("{}:{line}: {message}", path.display())]
    Config {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}: missing required key {key:?}", path.display())]
    MissingKey { path: PathBuf, key: &'static str },
    #[error("native module jsonl: cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("native module exec: program {program:?} {problem}")]
    Program { program: String, problem: String },
    #[error("native module {kind}: {message}")]
    Argument { kind: &'static str, message: String },
    #[error("native module nats: cannot start its runtime: {source}")]
    Runtime { source: io::Error },
}

/// Loads the native module described by `spec`, the argument of `--native-module`; `ucr`
/// gives the defaults of modules that follow UCS settings (`replication`).
pub fn load(spec: &str, ucr: &Ucr) -> Result<Box<dyn Module>, NativeError> {
    let (kind, arg) = spec.split_once('=').unwrap_or((spec, ""));
    if !KINDS.contains(&kind) {
        return Err(NativeError::UnknownKind {
            spec: spec.to_owned(),
            kind: kind.to_owned(),
        });
    }
    let config = arg.strip_prefix('@');
    if kind == "replication" {
        let settings = match config {
            None if arg.trim().is_empty() => replication::Settings::from_ucr(ucr),
            Some(path) if !path.trim().is_empty() => {
                replication::Settings::from_config(path.as_ref(), ucr)?
            }
            _ => {
                return Err(NativeError::MissingArgument {
                    spec: spec.to_owned(),
                    kind: kind.to_owned(),
                });
            }
        };
        return Ok(Box::new(replication::Replication::new(settings)?));
    }
    if config.unwrap_or(arg).trim().is_empty() {
        return Err(NativeError::MissingArgument {
            spec: spec.to_owned(),
            kind: kind.to_owned(),
        });
    }
    Ok(match (kind, config) {
        ("jsonl", None) => Box::new(jsonl::Jsonl::open(jsonl::Settings::from_arg(arg))?),
        ("jsonl", Some(path)) => Box::new(jsonl::Jsonl::open(jsonl::Settings::from_config(
            path.as_ref(),
        )?)?),
        ("nats", None) => Box::new(nats::Nats::new(nats::Settings::from_arg(arg)?)?),
        ("nats", Some(path)) => Box::new(nats::Nats::new(nats::Settings::from_config(
            path.as_ref(),
        )?)?),
        (_, None) => Box::new(exec::Exec::new(exec::Settings::from_arg(arg))?),
        (_, Some(path)) => Box::new(exec::Exec::new(exec::Settings::from_config(
            path.as_ref(),
        )?)?),
    })
}

/// The module info of `kind` before any config file: sees every object and every delete.
fn default_info(kind: &str, description: &str, handle_subtree_moves: bool) -> ModuleInfo {
    ModuleInfo {
        name: kind.to_owned(),
        description: description.to_owned(),
        filter: Some("(objectClass=*)".to_owned()),
        attributes: Vec::new(),
        handle_every_delete: true,
        handle_subtree_moves,
        priority: DEFAULT_PRIORITY,
        source: ModuleSource::Native(kind.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_error(spec: &str) -> String {
        match load(spec, &Ucr::default()) {
            Ok(module) => panic!("{spec:?} loaded as {:?}", module.info()),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn bad_specs() {
        assert_eq!(
            load_error("csv=/tmp/x"),
            "native module \"csv=/tmp/x\": unknown kind \"csv\" (known: jsonl, exec, nats, replication)"
        );
        assert_eq!(
            load_error("jsonl"),
            "native module \"jsonl\": missing argument, expected jsonl=ARG or jsonl=@CONFIG"
        );
        for spec in ["jsonl=", "exec=  ", "exec=@"] {
            assert!(load_error(spec).contains("missing argument"), "{spec}");
        }
        assert!(load_error("jsonl=@/nonexistent/x.conf").contains("/nonexistent/x.conf"));
    }

    #[test]
    fn loads_both_kinds_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.jsonl");
        let jsonl = load(&format!("jsonl={}", file.display()), &Ucr::default()).unwrap();
        assert_eq!(
            jsonl.info(),
            &default_info("jsonl", jsonl::DESCRIPTION, true)
        );
        let exec = load("exec=true --flag x", &Ucr::default()).unwrap();
        assert_eq!(exec.info(), &default_info("exec", exec::DESCRIPTION, false));
    }
}
