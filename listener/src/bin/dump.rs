//! `univention-directory-listener-dump`: the listener cache as LDIF (spec listener.md §6.4),
//! safe to run while the listener runs (it reads a snapshot the listener writes).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use cache::{Cache, CacheError};
use clap::{CommandFactory, Parser};
use listener::config::DEFAULT_CACHE_DIR;
use listener::tools;

const AFTER_HELP: &str = "\
Output: one LDIF record (RFC 2849) per cached object, in cache key order:
  dn: <dn>
  <attribute>: <value>          one line per value; \"<attribute>:: <base64>\" when
                                RFC 2849 requires it (non-ASCII, binary, leading space, ...)
  listenerModule: <module>      one line per module that handled the object
  <blank line>
Lines are folded at 76 columns. A record that cannot be decoded is shown as
  # broken record <key>: <reason>
With -i only \"<notifier_id> <schema_id>\" is printed.

While the listener runs, the dump shows a consistent snapshot the listener writes on
request (control socket); otherwise the cache is read directly while the tool holds
cache.lock.

Exit status: 0 success, 1 broken records found, 2 error.";

/// Prints the Univention Directory Listener cache as LDIF.
#[derive(Debug, Parser)]
#[command(name = "univention-directory-listener-dump", version, after_help = AFTER_HELP)]
struct Cli {
    /// Debug level (accepted for compatibility; errors always go to stderr).
    #[arg(short = 'd', value_name = "LEVEL")]
    debug: Option<u8>,
    /// Cache directory.
    #[arg(short = 'c', value_name = "DIR", env = "UDL_CACHE_DIR", default_value = DEFAULT_CACHE_DIR)]
    cache_dir: PathBuf,
    /// Write to FILE (created with mode 0600) instead of standard output; - is stdout.
    #[arg(short = 'O', value_name = "FILE", default_value = "-")]
    output: String,
    /// Only the broken (undecodable) records.
    #[arg(short = 'r')]
    broken_only: bool,
    /// Only the ids: "<notifier_id> <schema_id>".
    #[arg(short = 'i')]
    ids_only: bool,
}

fn main() -> ExitCode {
    cache::bound_heap();
    if let Some(code) = daemon::man::print_if_requested(Cli::command, daemon::man::SECTION_TOOL) {
        return code;
    }
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "univention-directory-listener-dump: {}",
                daemon::report::chain(&*e)
            );
            ExitCode::from(2)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let access = tools::open_state(&cli.cache_dir)?;
    let cache = Cache::open(access.dir()).context("opening the cache")?;
    let mut out: Box<dyn Write> = if cli.output == "-" {
        Box::new(BufWriter::new(io::stdout().lock()))
    } else {
        Box::new(BufWriter::new(create_private(Path::new(&cli.output))?))
    };
    if cli.ids_only {
        let master = cache.master().context("reading the master record")?;
        let (id, schema) = match master {
            Some(m) => (m.notifier_id, m.schema_id),
            None => (cache::read_legacy_notifier_id(access.dir()).unwrap_or(0), 0),
        };
        writeln!(out, "{id} {schema}")?;
        out.flush()?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut broken = 0usize;
    let mut text = String::new();
    for item in cache.iter() {
        text.clear();
        match item {
            Ok(entry) if !cli.broken_only => cache::ldif::write_entry(&mut text, &entry),
            Ok(_) => continue,
            Err(CacheError::Corrupt { key, reason }) => {
                broken += 1;
                text = format!("# broken record {key}: {}\n\n", reason.replace('\n', " "));
            }
            Err(CacheError::UnsupportedVersion { key, version }) => {
                broken += 1;
                text = format!("# broken record {key}: unsupported format version {version}\n\n");
            }
            Err(e) => return Err(e).context("reading the cache"),
        }
        out.write_all(text.as_bytes())?;
    }
    out.flush()?;
    if broken > 0 {
        eprintln!("univention-directory-listener-dump: {broken} broken record(s)");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// The dump holds password hashes: readable by the owner only.
fn create_private(path: &Path) -> anyhow::Result<File> {
    File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}
