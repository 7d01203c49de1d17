//! `jsonl`: appends every change as one JSON line to a file.
//!
//! Config keys besides the common ones: `file` (required) and `fsync` (boolean, default no:
//! `fdatasync` the file at postrun).

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{NativeError, config, default_info, json};
use crate::module::{Call, Module, ModuleError, ModuleInfo};

pub(super) const DESCRIPTION: &str = "Appends every change as a JSON line to a file";

pub(super) struct Settings {
    info: ModuleInfo,
    file: PathBuf,
    fsync: bool,
}

impl Settings {
    /// `jsonl=FILE`.
    pub(super) fn from_arg(file: &str) -> Settings {
        Settings {
            info: default_info("jsonl", DESCRIPTION, true),
            file: PathBuf::from(file),
            fsync: false,
        }
    }

    /// `jsonl=@CONFIG`.
    pub(super) fn from_config(path: &Path) -> Result<Settings, NativeError> {
        let mut info = default_info("jsonl", DESCRIPTION, true);
        let mut file = None;
        let mut fsync = false;
        config::read(path, &mut info, |key, value| {
            match key {
                "file" => file = Some(PathBuf::from(value)),
                "fsync" => fsync = config::parse_bool(value)?,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        let file = file.ok_or_else(|| NativeError::MissingKey {
            path: path.to_owned(),
            key: "file",
        })?;
        Ok(Settings { info, file, fsync })
    }
}

pub(super) struct Jsonl {
    info: ModuleInfo,
    path: PathBuf,
    file: File,
    fsync: bool,
    /// The line buffer, reused: one allocation less per call.
    line: Vec<u8>,
}

/// Largest line buffer kept between calls.
const LINE_KEEP: usize = 1 << 20;

impl Jsonl {
    /// Opens the file now, so a bad path fails at load rather than at the first change.
    pub(super) fn open(settings: Settings) -> Result<Jsonl, NativeError> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(&settings.file)
            .map_err(|source| NativeError::Open {
                path: settings.file.clone(),
                source,
            })?;
        Ok(Jsonl {
            info: settings.info,
            path: settings.file,
            file,
            fsync: settings.fsync,
            line: Vec::new(),
        })
    }

    fn error(&self, what: &str, error: impl std::fmt::Display) -> ModuleError {
        ModuleError::new(format!("{what} {}: {error}", self.path.display()))
    }
}

impl Module for Jsonl {
    fn info(&self) -> &ModuleInfo {
        &self.info
    }

    fn handler(&mut self, call: &Call<'_>) -> Result<(), ModuleError> {
        let mut line = std::mem::take(&mut self.line);
        line.clear();
        let result = json::write_change_json(&mut line, &self.info.name, call, SystemTime::now())
            .map_err(|error| self.error("cannot encode change for", error))
            .and_then(|()| {
                line.push(b'\n');
                // One unbuffered write of the whole line into an O_APPEND file: a reader
                // tailing the file sees each change at once and never half a line.
                self.file
                    .write_all(&line)
                    .map_err(|error| self.error("cannot write", error))
            });
        // Kept for the next call unless one huge entry made it big.
        if line.capacity() <= LINE_KEEP {
            self.line = line;
        }
        result
    }

    fn postrun(&mut self) -> Result<(), ModuleError> {
        if self.fsync {
            self.file
                .sync_data()
                .map_err(|error| self.error("cannot sync", error))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::module::Command;

    fn call<'a>(id: u64, dn: &'a str, new: &'a crate::Attributes) -> Call<'a> {
        Call {
            id,
            dn,
            command: Command::Modify,
            new,
            old: &[],
            transaction: id,
            number: 1,
        }
    }

    #[test]
    fn one_line_per_call_and_stays_appendable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("changes.jsonl");
        let new = vec![("cn".to_owned(), vec![b"x".to_vec()])];

        let mut module = Jsonl::open(Settings::from_arg(path.to_str().unwrap())).unwrap();
        module.handler(&call(1, "cn=x,dc=x", &new)).unwrap();
        // Visible without postrun or drop: nothing is buffered.
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        module.handler(&call(2, "cn=y,dc=x", &new)).unwrap();
        module.postrun().unwrap();
        drop(module);

        let mut again = Jsonl::open(Settings::from_arg(path.to_str().unwrap())).unwrap();
        again.handler(&call(3, "cn=z,dc=x", &[])).unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n'));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        for (line, (id, dn)) in
            lines
                .iter()
                .zip([(1, "cn=x,dc=x"), (2, "cn=y,dc=x"), (3, "cn=z,dc=x")])
        {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(value["id"], id);
            assert_eq!(value["dn"], dn);
            assert_eq!(value["module"], "jsonl");
            assert_eq!(value["command"], "m");
        }
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o137, 0, "mode {mode:o} is wider than 0640");
    }

    #[test]
    fn bad_path_fails_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("x.jsonl");
        let Err(error) = Jsonl::open(Settings::from_arg(path.to_str().unwrap())) else {
            panic!("opened a file in a missing directory");
        };
        let message = error.to_string();
        assert!(message.contains(path.to_str().unwrap()), "{message}");
        assert!(message.contains("No such file or directory"), "{message}");
    }

    #[test]
    fn config_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("out.jsonl");
        let conf = dir.path().join("x.conf");
        std::fs::write(
            &conf,
            format!("name = audit\nfile = {}\nfsync = yes\n", file.display()),
        )
        .unwrap();
        let mut module = crate::native::load(
            &format!("jsonl=@{}", conf.display()),
            &daemon::ucr::Ucr::default(),
        )
        .unwrap();
        assert_eq!(module.info().name, "audit");
        module.handler(&call(7, "cn=x", &[])).unwrap();
        module.postrun().unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains(r#""id":7,"module":"audit","#), "{text}");

        std::fs::write(&conf, "name = audit\nfsync = maybe\n").unwrap();
        let Err(error) = Settings::from_config(&conf) else {
            panic!("accepted a bad boolean");
        };
        assert_eq!(
            error.to_string(),
            format!(
                "{}:2: fsync: \"maybe\" is not a boolean (yes/no, true/false, 1/0)",
                conf.display()
            )
        );

        std::fs::write(&conf, "name = audit\n").unwrap();
        let Err(error) = Settings::from_config(&conf) else {
            panic!("accepted a config without file");
        };
        assert_eq!(
            error.to_string(),
            format!("{}: missing required key \"file\"", conf.display())
        );
    }
}
