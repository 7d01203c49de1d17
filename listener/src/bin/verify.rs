//! `univention-directory-listener-verify`: compares the listener cache with LDAP in both
//! directions (spec listener.md §6.5), without UCS's false positives.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use cache::{Cache, CacheEntry};
use clap::{ArgAction, CommandFactory, Parser};
use daemon::ucr::Ucr;
use ldap::dn::dn_key;
use ldap::search::read_entry;
use ldap::{ALL_ATTRS, Auth, Endpoint, Lookup, PagedSearch, Password, Scope, StartTls, connect};
use listener::config::DEFAULT_CACHE_DIR;
use listener::tools;
use modules::filter::CacheFilter;

const AFTER_HELP: &str = "\
Output, one line per finding (UCS format):
  E: <dn> only in LDAP          an LDAP object below the base the cache does not hold
  W: <dn> only in cache         a cached object LDAP does not show (deleted, or invisible
                                to the bind DN)
  E: <dn>:                      an object whose attributes differ, then per attribute
  E:     <attr> differs
  E:         CACHE = [v1, v2]
  E:         LDAP = [v1, v2]
Values that are not printable UTF-8 are shown as base64:<...>.

Differences from UCS: DNs are compared with the cache's own normalisation (no mixed-case
false positives); values are compared as sets (order does not matter); objects that
listener/cache/filter keeps out of the cache are not reported as only in LDAP; the
attributes slapd changes without a write to the object itself (hasSubordinates,
numSubordinates, contextCSN) are not compared. Bind as the listener does (its bind DN
sees what the listener sees), so objects hidden from it by selective replication are
neither in the search nor in the cache.

While the listener runs, the cache is read from a consistent snapshot the listener writes
on request; changes it processes meanwhile can show up as differences.

Exit status: 0 cache and LDAP agree, 1 differences found, 2 error.";

/// Attributes slapd maintains without a modification of the object itself.
const IGNORED: &[&str] = &["hasSubordinates", "numSubordinates", "contextCSN"];

/// Compares the Univention Directory Listener cache with the LDAP directory.
#[derive(Debug, Parser)]
#[command(name = "univention-directory-listener-verify", version, after_help = AFTER_HELP)]
struct Cli {
    /// Debug level (accepted for compatibility).
    #[arg(short = 'd', value_name = "LEVEL")]
    debug: Option<u8>,
    /// Cache directory.
    #[arg(short = 'c', value_name = "DIR", env = "UDL_CACHE_DIR", default_value = DEFAULT_CACHE_DIR)]
    cache_dir: PathBuf,
    /// LDAP base (default: UCR ldap/base).
    #[arg(short = 'b', value_name = "BASE")]
    base: Option<String>,
    /// Bind DN for a simple bind (without it: SASL EXTERNAL over ldapi, else anonymous).
    #[arg(short = 'D', value_name = "DN")]
    bind_dn: Option<String>,
    /// Bind password.
    #[arg(short = 'w', value_name = "PASSWORD")]
    password: Option<String>,
    /// Read the bind password from the first line of FILE.
    #[arg(short = 'y', value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// LDAP URI.
    #[arg(
        short = 'H',
        value_name = "URI",
        env = "UDL_LDAP_URI",
        default_value = "ldapi:///"
    )]
    uri: String,
    /// StartTLS; twice (-ZZ) to require it.
    #[arg(short = 'Z', action = ArgAction::Count)]
    starttls: u8,
    /// Seconds allowed per LDAP operation.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    timeout: u64,
    /// UCR file to read defaults from.
    #[arg(long, value_name = "FILE", default_value = daemon::ucr::BASE_CONF)]
    ucr_file: PathBuf,
}

fn main() -> ExitCode {
    cache::bound_heap();
    if let Some(code) = daemon::man::print_if_requested(Cli::command, daemon::man::SECTION_TOOL) {
        return code;
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("univention-directory-listener-verify: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!(
                "univention-directory-listener-verify: {}",
                daemon::report::chain(&*e)
            );
            ExitCode::from(2)
        }
    }
}

struct Settings {
    filter: Option<CacheFilter>,
    memberuid_skip: bool,
    uniquemember_skip: bool,
}

/// `Ok(true)` when the cache and LDAP agree.
async fn run(cli: Cli) -> anyhow::Result<bool> {
    let ucr = Ucr::load(&cli.ucr_file);
    let Some(base) = cli
        .base
        .clone()
        .or_else(|| ucr.get("ldap/base").map(str::to_owned))
    else {
        bail!("no LDAP base: give -b BASE or set UCR ldap/base");
    };
    let settings = Settings {
        filter: ucr
            .get("listener/cache/filter")
            .map(|f| CacheFilter::new(f, &base)),
        memberuid_skip: ucr.is_true("listener/memberuid/skip"),
        uniquemember_skip: ucr.is_true("listener/uniquemember/skip"),
    };
    let password = match (&cli.password_file, &cli.password) {
        (Some(path), _) => {
            Some(Password::from_file(path).with_context(|| format!("reading {}", path.display()))?)
        }
        (None, Some(pw)) => Some(Password::Literal(pw.clone())),
        (None, None) => None,
    };
    let timeout = Duration::from_secs(cli.timeout.max(1));
    let endpoint = Endpoint {
        uri: cli.uri.clone(),
        auth: Auth::for_tool(&cli.uri, cli.bind_dn.clone(), password),
        starttls: StartTls::from_z_count(cli.starttls),
        timeout,
    };
    let mut ldap = connect(&endpoint).await?;

    let access = tools::open_state(&cli.cache_dir)?;
    let cache = Cache::open(access.dir()).context("opening the cache")?;
    let base_key = dn_key(&base);
    let mut clean = true;
    let mut seen: HashSet<String> = HashSet::new();

    let mut search = PagedSearch::start(
        &mut ldap,
        &base,
        Scope::Subtree,
        "(objectClass=*)",
        &ALL_ATTRS,
        1000,
        timeout,
    )
    .await
    .context("E: ldapsearch failed")?;
    while let Some(ldap_entry) = search.next().await.context("E: ldapsearch failed")? {
        let key = dn_key(&ldap_entry.dn);
        match cache.get(&ldap_entry.dn).context("reading the cache")? {
            Some(cached) => {
                seen.insert(key);
                clean &= compare(&cached, &ldap_entry.attrs, &settings);
            }
            None => {
                let excluded = settings
                    .filter
                    .as_ref()
                    .is_some_and(|f| f.excludes(&ldap_entry.dn, ldap_entry.attrs.as_slice()));
                if !excluded {
                    println!("E: {} only in LDAP", ldap_entry.dn);
                    clean = false;
                }
            }
        }
    }
    search.finish().await.context("E: ldapsearch failed")?;

    for item in cache.iter() {
        let cached = match item {
            Ok(entry) => entry,
            Err(e) => {
                println!("E: {e}");
                clean = false;
                continue;
            }
        };
        let key = dn_key(&cached.dn);
        // cn=Subschema and anything else outside the base is not part of the comparison.
        if seen.contains(&key) || !is_below(&key, &base_key) {
            continue;
        }
        match read_entry(&mut ldap, &cached.dn, timeout).await {
            Ok(Lookup::Missing) => {
                println!("W: {} only in cache", cached.dn);
                clean = false;
            }
            Ok(Lookup::Found(entry)) => clean &= compare(&cached, &entry.attrs, &settings),
            Err(e) => {
                println!("E: could not receive {} from LDAP: {e}", cached.dn);
                clean = false;
            }
        }
    }
    Ok(clean)
}

fn is_below(key: &str, base_key: &str) -> bool {
    key == base_key
        || key
            .strip_suffix(base_key)
            .is_some_and(|rest| rest.ends_with(','))
}

/// Prints the UCS difference block for `cached` against the LDAP attributes; true if equal.
fn compare(cached: &CacheEntry, ldap: &[(String, Vec<Vec<u8>>)], settings: &Settings) -> bool {
    let mut names: Vec<&str> = Vec::new();
    for (name, _) in cached.attributes.iter().chain(ldap) {
        if !names.iter().any(|n| n.eq_ignore_ascii_case(name))
            && !IGNORED.iter().any(|i| i.eq_ignore_ascii_case(name))
        {
            names.push(name);
        }
    }
    let mut header = false;
    for name in names {
        let cache_values = cached.values(name).unwrap_or_default();
        let ldap_values = ldap
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .unwrap_or_default();
        let dedup = (settings.memberuid_skip && name.eq_ignore_ascii_case("memberUid"))
            || (settings.uniquemember_skip && name.eq_ignore_ascii_case("uniqueMember"));
        if normalised(cache_values, dedup) == normalised(ldap_values, dedup) {
            continue;
        }
        if !header {
            println!("E: {}:", cached.dn);
            header = true;
        }
        println!("E:     {name} differs");
        println!("E:         CACHE = [{}]", shown(cache_values));
        println!("E:         LDAP = [{}]", shown(ldap_values));
    }
    !header
}

fn normalised(values: &[Vec<u8>], dedup: bool) -> Vec<&[u8]> {
    let mut values: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
    values.sort_unstable();
    if dedup {
        values.dedup();
    }
    values
}

fn shown(values: &[Vec<u8>]) -> String {
    values
        .iter()
        .map(|v| match std::str::from_utf8(v) {
            Ok(text) if !text.chars().any(char::is_control) => text.to_owned(),
            _ => format!(
                "base64:{}",
                base64::engine::general_purpose::STANDARD.encode(v)
            ),
        })
        .collect::<Vec<_>>()
        .join(", ")
}
