//! Finding and loading the handler modules: built-in native modules from
//! `--native-module`, and the module files of every `-m` path (spec listener.md §4.1).

use std::path::{Path, PathBuf};

use modules::Module;

/// Module files of one `-m` path: the file itself, or the `*.py` files of a directory with
/// `replication.py` first and the others by name (UCS used readdir order; sorted is stable).
pub fn module_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
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

/// Loads every configured module. A module that fails to load is reported with its source
/// and skipped; the others run (spec §4.1).
pub fn load_modules(native_specs: &[String], module_paths: &[PathBuf]) -> Vec<Box<dyn Module>> {
    let mut loaded: Vec<Box<dyn Module>> = Vec::new();
    for spec in native_specs {
        match modules::native::load(spec) {
            Ok(module) => {
                tracing::info!(
                    "loaded native module {} ({})",
                    module.info().name,
                    module.info().source
                );
                loaded.push(module);
            }
            Err(e) => tracing::error!("{e}; module skipped"),
        }
    }
    for path in module_paths {
        let files = match module_files(path) {
            Ok(files) => files,
            Err(e) => {
                tracing::error!("cannot read module directory {}: {e}", path.display());
                continue;
            }
        };
        for file in files {
            tracing::error!(
                "import of filename={} failed: this build has no Python module host yet; \
                 module skipped",
                file.display()
            );
        }
    }
    loaded
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
    }
}
