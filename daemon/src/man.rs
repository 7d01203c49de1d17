//! Man pages rendered from the clap definitions.
//!
//! Every binary prints its own page when started as `BIN --print-man-page` (the only
//! argument), and `scripts/package.sh` installs what the release binaries print. The page
//! therefore always describes exactly the shipped binary, and the clap definitions stay
//! private to their binaries. The flag is checked before clap parses anything, so a
//! required subcommand or UCS's `-h` for the host does not get in the way, and it is not
//! part of `--help`.

use std::ffi::OsString;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

/// The argument that makes a binary print its man page (roff) on stdout and exit.
pub(crate) const PRINT_MAN_PAGE: &str = "--print-man-page";
/// Section of the daemons' pages.
pub const SECTION_DAEMON: &str = "8";
/// Section of the tools' pages.
pub const SECTION_TOOL: &str = "1";

/// Renders the man page of `command` (as built by `clap::CommandFactory::command`).
pub fn render(command: clap::Command, section: &str) -> std::io::Result<Vec<u8>> {
    let mut page = Vec::new();
    // The package, not the (long) binary name: the footer also holds date and page name.
    let source = format!(
        "univention-directory-rs {}",
        command.get_version().unwrap_or_default()
    );
    clap_mangen::Man::new(command)
        .section(section)
        .source(source.trim_end())
        // Without a date the .TH fields shift and man shows the source as the date.
        .date(page_date(
            std::env::var("SOURCE_DATE_EPOCH").ok().as_deref(),
        ))
        // Short: man centres it between two copies of the (long) page name.
        .manual("UCS replication")
        .render(&mut page)?;
    Ok(page)
}

/// `YYYY-MM-DD` of `SOURCE_DATE_EPOCH` (the reproducible-builds convention, which
/// `scripts/package.sh` sets to the last commit), else of today.
fn page_date(source_date_epoch: Option<&str>) -> String {
    let time = source_date_epoch
        .and_then(|epoch| epoch.trim().parse::<u64>().ok())
        .map(|seconds| SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
        .unwrap_or_else(SystemTime::now);
    crate::time::rfc3339(time).chars().take(10).collect()
}

/// Whether the process arguments ask for the man page: exactly `--print-man-page`.
pub fn requested(args: impl IntoIterator<Item = OsString>) -> bool {
    let mut args = args.into_iter().skip(1);
    matches!((args.next(), args.next()), (Some(arg), None) if arg == PRINT_MAN_PAGE)
}

/// Call first in `main`: when the page was asked for, prints it and returns the exit code;
/// otherwise returns `None` without building the command.
pub fn print_if_requested(
    command: impl FnOnce() -> clap::Command,
    section: &str,
) -> Option<ExitCode> {
    if !requested(std::env::args_os()) {
        return None;
    }
    let written = render(command(), section).and_then(|page| {
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(&page)?;
        stdout.flush()
    });
    Some(match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cannot write the man page: {e}");
            ExitCode::FAILURE
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn only_the_sole_argument_asks_for_the_page() {
        assert!(requested(args(&["bin", "--print-man-page"])));
        assert!(!requested(args(&["bin"])));
        assert!(!requested(args(&["bin", "--print-man-page", "-F"])));
        assert!(!requested(args(&["bin", "-F", "--print-man-page"])));
    }

    #[test]
    fn date_comes_from_source_date_epoch() {
        assert_eq!(page_date(Some("1733443200")), "2024-12-06");
        assert_eq!(page_date(Some("garbage")).len(), "YYYY-MM-DD".len());
        assert_eq!(page_date(None).len(), "YYYY-MM-DD".len());
    }

    #[test]
    fn page_names_the_command_and_its_environment() {
        let command = clap::Command::new("univention-example")
            .version("1.2.3")
            .about("Does an example.")
            .arg(
                clap::Arg::new("cache")
                    .short('c')
                    .env("UDL_CACHE_DIR")
                    .help("Cache directory."),
            );
        let page = String::from_utf8(render(command, SECTION_TOOL).unwrap()).unwrap();
        assert!(page.contains(".TH univention-example 1"), "{page}");
        assert!(page.contains("UDL_CACHE_DIR"), "{page}");
        assert!(page.contains("1.2.3"), "{page}");
    }
}
