//! Where transactions come from: the UCS translog overlay's queue file, or stock OpenLDAP's
//! `cn=accesslog`.

use std::io;
use std::path::{Path, PathBuf};

pub mod accesslog;
pub mod queue_file;

/// A file operation that failed, with what was being done and to which path.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct FileError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// `map_err` adapter: `.map_err(file_err("reading", &path))?`.
pub fn file_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FileError {
    let path = path.to_owned();
    move |source| FileError {
        action,
        path,
        source,
    }
}
