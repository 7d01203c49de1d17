//! Finding and loading the handler modules: built-in native modules from
//! `--native-module`, and the module files of every `-m` path (spec listener.md §4.1).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use daemon::ucr::BASE_CONF;
use modules::Module;
use modules::python::{HostOptions, PythonHost, PythonModule};

use crate::config::Config;
use crate::dispatch::LoadFailure;
use daemon::privileges::Privileges;

/// What [`load_modules`] found: the modules that loaded and those that did not.
#[derive(Default)]
pub struct Loaded {
    pub modules: Vec<Box<dyn Module>>,
    pub failures: Vec<LoadFailure>,
}

/// A `-m` path that cannot be used at all.
#[derive(Debug, thiserror::Error)]
pub enum ModulePathError {
    #[error("module directory {} does not exist (-m)", .0.display())]
    Missing(PathBuf),
    #[error("cannot check the module directory {} (-m): {source}", .path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Checks at start that every `-m` path exists: a mistyped path would otherwise reach the
/// Python importer as a module file and end in a traceback, while the listener ran on
/// without the modules the operator asked for.
pub fn check_module_paths(paths: &[PathBuf]) -> Result<(), ModulePathError> {
    for path in paths {
        match path.try_exists() {
            Ok(true) => {}
            Ok(false) => return Err(ModulePathError::Missing(path.clone())),
            Err(source) => {
                return Err(ModulePathError::Unreadable {
                    path: path.clone(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Module files of one `-m` path: the file itself, or the `*.py` files of a directory with
/// `replication.py` first and the others by name (UCS used readdir order; sorted is stable).
/// A path that vanished since the start (a reload) is an error, not a module file.
pub fn module_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !path.try_exists()? {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "does not exist",
        ));
    }
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "py") && p.is_file())
        .collect();
    files.sort_by_key(|p| (p.file_stem().is_none_or(|s| s != "replication"), p.clone()));
    Ok(files)
}

/// Loads every configured module. A module that fails to load is reported with its source,
/// skipped and returned among the failures (the status lists it); the others run (spec
/// §4.1). Module files are imported with the daemon's effective identity, which is taken
/// back after each import (a module may switch at import time).
pub fn load_modules(config: &Config, privileges: &Privileges) -> Loaded {
    let mut loaded = Loaded::default();
    for spec in &native_specs(config) {
        match modules::native::load(spec, &config.ucr) {
            Ok(module) => {
                tracing::info!(
                    "loaded native module {} ({})",
                    module.info().name,
                    module.info().source
                );
                loaded.modules.push(module);
            }
            Err(e) => {
                tracing::error!("{e}; module skipped");
                let kind = spec.split_once('=').map_or(spec.as_str(), |(kind, _)| kind);
                loaded.failures.push(LoadFailure {
                    name: kind.to_owned(),
                    source: format!("native:{kind}"),
                    error: e.to_string(),
                    at: SystemTime::now(),
                });
            }
        }
    }
    let native_replication = loaded
        .modules
        .iter()
        .any(|m| m.info().name == modules::REPLICATION);
    let mut files = Vec::new();
    for path in &config.module_paths {
        match module_files(path) {
            Ok(found) => files.extend(found.into_iter().filter(|file| {
                // One writer of the local LDAP: the native module replaces UCS's.
                let skip = native_replication && is_replication_file(file);
                if skip {
                    tracing::info!(
                        "{} not loaded: the native replication module runs instead",
                        file.display()
                    );
                }
                !skip
            })),
            Err(e) => {
                tracing::error!("cannot read module directory {}: {e}", path.display());
                loaded.failures.push(LoadFailure {
                    name: path.display().to_string(),
                    source: path.display().to_string(),
                    error: format!("cannot read the module directory: {e}"),
                    at: SystemTime::now(),
                });
            }
        }
    }
    if files.is_empty() {
        return loaded;
    }
    let host = match PythonHost::start(host_options(config)) {
        Ok(host) => host,
        Err(e) => {
            tracing::error!("{e}; {} Python module(s) skipped", files.len());
            for file in &files {
                loaded.failures.push(failure(file, &e.to_string()));
            }
            return loaded;
        }
    };
    for file in files {
        let result = PythonModule::load(&host, &file);
        privileges.restore();
        match result {
            Ok(module) => {
                tracing::info!("loaded module {} ({})", module.info().name, file.display());
                loaded.modules.push(Box::new(module));
            }
            Err(e) => {
                tracing::error!("{e}\nmodule skipped");
                loaded.failures.push(failure(&file, &e.to_string()));
            }
        }
    }
    loaded
}

/// The `--native-module` specs, plus `replication` on a UCS Backup or Replica
/// (`ldap/server/type=slave`) unless one is given or UCR `listener/replication/native` is
/// false (UCS's `replication.py` then runs in the Python host instead).
pub(crate) fn native_specs(config: &Config) -> Vec<String> {
    let mut specs = config.native_modules.clone();
    let given = specs
        .iter()
        .any(|s| s.split_once('=').map_or(s.as_str(), |(kind, _)| kind) == "replication");
    let wanted = config.ucr.get("ldap/server/type") == Some("slave")
        && !config.ucr.is_false("listener/replication/native");
    if wanted && !given {
        specs.push("replication".to_owned());
    }
    specs
}

fn is_replication_file(file: &Path) -> bool {
    file.file_name().is_some_and(|n| n == "replication.py")
}

/// A module file that did not load, named as the tools name it without importing: its
/// top-level `name = '…'` line, else the file name without `.py`.
fn failure(file: &Path, error: &str) -> LoadFailure {
    LoadFailure {
        name: crate::tools::module_name_of_file(file),
        source: file.display().to_string(),
        error: error.to_owned(),
        at: SystemTime::now(),
    }
}

fn host_options(config: &Config) -> HostOptions {
    HostOptions {
        // SAFETY: geteuid cannot fail; modules are loaded after the switch to the daemon's
        // identity, so this is the uid `listener.unsetuid()` must return to.
        daemon_uid: unsafe { libc::geteuid() },
        ucr_file: (config.ucr_file != Path::new(BASE_CONF)).then(|| config.ucr_file.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_comes_first_then_names() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["zz.py", "replication.py", "aa.py", "notes.txt"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        std::fs::create_dir(dir.path().join("sub.py")).unwrap();
        let names: Vec<_> = module_files(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["replication.py", "aa.py", "zz.py"]);
        let single = dir.path().join("zz.py");
        assert_eq!(module_files(&single).unwrap(), [single]);
        let missing = dir.path().join("nosuch");
        assert!(module_files(&missing).is_err());
    }

    #[test]
    fn replication_is_native_on_backup_and_replica_unless_given_or_disabled() {
        let config = |ucr: &str, native: &[&str]| {
            let mut args: Vec<String> = [
                "univention-directory-listener",
                "-H",
                "ldap://h/",
                "-h",
                "h",
            ]
            .map(str::to_owned)
            .into();
            for spec in native {
                args.extend(["--native-module".to_owned(), (*spec).to_owned()]);
            }
            let cli = <crate::config::Cli as clap::Parser>::parse_from(args);
            Config::resolve(cli, daemon::ucr::Ucr::parse(ucr)).unwrap()
        };
        let slave = "ldap/base: dc=x\nldap/server/type: slave\n";
        assert_eq!(
            native_specs(&config(slave, &["jsonl=/x"])),
            ["jsonl=/x", "replication"]
        );
        assert_eq!(
            native_specs(&config(slave, &["replication=@/r.conf"])),
            ["replication=@/r.conf"]
        );
        let off = format!("{slave}listener/replication/native: no\n");
        assert!(native_specs(&config(&off, &[])).is_empty());
        let master = "ldap/base: dc=x\nldap/server/type: master\n";
        assert!(native_specs(&config(master, &[])).is_empty());
        assert!(is_replication_file(Path::new("/m/replication.py")));
        assert!(!is_replication_file(Path::new("/m/other.py")));
    }

    #[test]
    fn a_missing_module_path_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nosuch");
        let err = check_module_paths(&[dir.path().to_owned(), missing.clone()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("module directory {} does not exist (-m)", missing.display())
        );
        check_module_paths(&[dir.path().to_owned()]).unwrap();
    }
}
