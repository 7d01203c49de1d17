//! `get_notifier_id`: the notifier's current transaction id, for scripts that call UCS's
//! `get_notifier_id.py` by name (`[-m HOST | HOST] [-s]`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use daemon::ucr::Ucr;

/// Prints the Univention Directory Notifier's last transaction id (or, with -s, its
/// schema id). Exit status: 0 success, 1 the notifier cannot be asked.
#[derive(Debug, Parser)]
#[command(name = "get_notifier_id", version)]
struct Cli {
    /// Notifier host (default: UCR notifier/server, else ldap/master).
    #[arg(short = 'm', long = "master", value_name = "HOST")]
    master: Option<String>,
    /// Notifier host, as a positional argument.
    #[arg(value_name = "HOST", conflicts_with = "master")]
    host: Option<String>,
    /// Ask for the schema id.
    #[arg(short = 's', long = "schema")]
    schema: bool,
    /// Notifier port (default: UCR notifier/server/port, else 6669).
    #[arg(short = 'p', long = "port", value_name = "PORT")]
    port: Option<u16>,
    /// Seconds to wait for the notifier.
    #[arg(
        short = 't',
        long = "timeout",
        value_name = "SECS",
        default_value_t = 10
    )]
    timeout: u64,
    #[command(flatten)]
    tls: listener::config::NotifierTlsArgs,
    /// UCR file to read defaults from.
    #[arg(long, value_name = "FILE", default_value = daemon::ucr::BASE_CONF)]
    ucr_file: PathBuf,
}

fn main() -> ExitCode {
    if let Some(code) = daemon::man::print_if_requested(Cli::command, daemon::man::SECTION_TOOL) {
        return code;
    }
    let cli = Cli::parse();
    let ucr = Ucr::load(&cli.ucr_file);
    let host = cli
        .master
        .or(cli.host)
        .unwrap_or_else(|| listener::config::default_notifier_host(&ucr));
    let port = listener::config::notifier_port(cli.port, &ucr);
    let timeout = Duration::from_secs(cli.timeout.max(1));
    let result = cli
        .tls
        .resolve(&ucr)
        .map_err(|e| e.to_string())
        .and_then(|tls| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime
                .block_on(listener::tools::query_notifier(
                    &host, port, cli.schema, timeout, &tls,
                ))
                .map_err(|e| e.to_string())
        });
    match result {
        Ok(id) => {
            println!("{id}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("get_notifier_id: {e}");
            ExitCode::from(1)
        }
    }
}
