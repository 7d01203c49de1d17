//! The LDAP side: `ldap`, `import`, `stat`'s Ldap lines and `prune`'s cleanup of
//! cn=translog. Requests are pipelined over one connection (ldap3 multiplexes a cloned
//! handle), so bulk imports and deletes do not pay a round trip each.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use daemon::time::generalized_time;
use ldap::dn::first_rdn_avas;
use ldap::search::search_one;
use ldap::translog::{base_attrs, entry_attrs, session_dn};
use ldap::{Auth, Endpoint, Ldap, Lookup, PagedSearch, Password, Scope, StartTls, rc};
use ldap3::{LdapError, LdapResult};
use notifier::journal::scan::{is_blank, parse_line};
use proto::line::Transaction;
use tokio::task::JoinSet;

use crate::Exit;
use crate::files::{Translog, open_index};
use crate::log::{debug, error, info, warning};

/// Requests kept in flight on the connection.
const IN_FLIGHT: usize = 32;
const PAGE_SIZE: i32 = 1000;
const TIMEOUT: Duration = Duration::from_secs(30);
/// How often the progress line is redrawn.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct ConnOptions {
    pub url: String,
    pub base: String,
    pub bind_dn: Option<String>,
    pub bind_pw: Option<String>,
    pub lenient: bool,
    pub dry_run: bool,
    pub datetime: Option<String>,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn connect(opts: &ConnOptions) -> Result<Ldap> {
    let password = opts.bind_pw.clone().map(Password::Literal);
    let endpoint = Endpoint {
        uri: opts.url.clone(),
        auth: Auth::for_tool(&opts.url, opts.bind_dn.clone(), password),
        starttls: StartTls::Off,
        timeout: TIMEOUT,
    };
    debug!("ldap_initialize({}) with {:?}", opts.url, endpoint.auth);
    ldap::connect(&endpoint)
        .await
        .with_context(|| format!("cannot connect to {}", opts.url))
}

/// `ldap TID…`
pub fn lookup(opts: &ConnOptions, ids: &[u64]) -> Result<Exit> {
    runtime()?.block_on(async {
        let mut ldap = connect(opts).await?;
        let mut exit = Exit::Ok;
        for &id in ids {
            let dn = session_dn(id, &opts.base);
            let found = search_one(
                &mut ldap,
                &dn,
                Scope::Base,
                "(objectClass=*)",
                &["reqSession", "reqDN", "reqType"],
                TIMEOUT,
            )
            .await
            .with_context(|| format!("ldap_search({dn})"))?;
            let Lookup::Found(entry) = found else {
                if opts.lenient {
                    warning!("ldap_search({dn}): No such object");
                } else {
                    error!("ldap_search({dn}): No such object");
                    exit = Exit::Problem;
                }
                continue;
            };
            let value = |attr| entry.first_str(attr).unwrap_or_default();
            println!(
                "tid={} dn={} command={}",
                value("reqSession"),
                value("reqDN"),
                value("reqType")
            );
        }
        let _ = ldap.unbind().await;
        Ok(exit)
    })
}

async fn exists(ldap: &mut Ldap, dn: &str) -> Result<bool> {
    let found = search_one(ldap, dn, Scope::Base, "(objectClass=*)", &["1.1"], TIMEOUT)
        .await
        .with_context(|| format!("ldap_search({dn})"))?;
    Ok(matches!(found, Lookup::Found(_)))
}

/// Every `reqSession` under the base (one-level, paged); empty if the base is missing.
async fn session_ids(ldap: &mut Ldap, base: &str) -> Result<Vec<u64>> {
    let context = || format!("ldap_search({base})");
    let mut search = PagedSearch::start(
        ldap,
        base,
        Scope::OneLevel,
        "(reqSession=*)",
        &["reqSession"],
        PAGE_SIZE,
        TIMEOUT,
    )
    .await
    .with_context(context)?;
    let mut ids = Vec::new();
    while let Some(entry) = search.next().await.with_context(context)? {
        let id = entry
            .first_str("reqSession")
            .and_then(|value| value.trim().parse::<u64>().ok())
            .or_else(|| {
                // Fall back to the RDN value if the attribute is not readable.
                let rdn = first_rdn_avas(&entry.dn)?;
                let ava = rdn.first()?;
                ava.attr
                    .eq_ignore_ascii_case("reqSession")
                    .then(|| std::str::from_utf8(&ava.value).ok()?.trim().parse().ok())?
            });
        match id {
            Some(id) => ids.push(id),
            None => debug!("ignoring {}", entry.dn),
        }
    }
    search.finish().await.with_context(context)?;
    Ok(ids)
}

/// The newest ID in `[first, last]` that has an entry, 0 if none: the last ID is probed
/// directly (the usual case), otherwise all entries are listed.
pub fn last_present(opts: &ConnOptions, first: u64, last: u64) -> Result<u64> {
    runtime()?.block_on(async {
        let mut ldap = connect(opts).await?;
        if last == 0 {
            return Ok(0);
        }
        if exists(&mut ldap, &session_dn(last, &opts.base)).await? {
            return Ok(last);
        }
        let ids = session_ids(&mut ldap, &opts.base).await?;
        let _ = ldap.unbind().await;
        Ok(ids
            .into_iter()
            .filter(|id| (first..=last).contains(id))
            .max()
            .unwrap_or(0))
    })
}

/// Deletes entries with `reqSession < keep_from`; returns how many deletes failed.
pub fn prune(opts: &ConnOptions, keep_from: u64) -> Result<u64> {
    runtime()?.block_on(async {
        let mut ldap = connect(opts).await?;
        let mut ids: Vec<u64> = session_ids(&mut ldap, &opts.base)
            .await?
            .into_iter()
            .filter(|&id| id < keep_from)
            .collect();
        ids.sort_unstable();
        info!(
            "Deleting {} entries below {keep_from} from {}",
            ids.len(),
            opts.base
        );
        let mut failed = 0;
        let mut set: JoinSet<(String, ldap3::result::Result<LdapResult>)> = JoinSet::new();
        let mut check =
            |joined: Option<Result<(String, ldap3::result::Result<LdapResult>), _>>| match joined {
                Some(Ok((dn, Ok(res)))) if res.rc == 0 || res.rc == rc::NO_SUCH_OBJECT => {
                    debug!("Deleted {dn}");
                }
                Some(Ok((dn, Ok(res)))) => {
                    error!("ldap_delete({dn}): {res}");
                    failed += 1;
                }
                Some(Ok((dn, Err(e)))) => {
                    error!("ldap_delete({dn}): {e}");
                    failed += 1;
                }
                Some(Err(e)) => {
                    error!("ldap_delete: {e}");
                    failed += 1;
                }
                None => {}
            };
        for id in ids {
            let dn = session_dn(id, &opts.base);
            if opts.dry_run {
                info!("(dry run) would delete {dn}");
                continue;
            }
            while set.len() >= IN_FLIGHT {
                check(set.join_next().await);
            }
            let mut handle = ldap.clone();
            set.spawn(async move {
                let res = handle.delete(&dn).await;
                (dn, res)
            });
        }
        while !set.is_empty() {
            check(set.join_next().await);
        }
        let _ = ldap.unbind().await;
        Ok(failed)
    })
}

/// Creates the translog base entry if it is missing.
async fn ensure_base(ldap: &mut Ldap, opts: &ConnOptions) -> Result<()> {
    if exists(ldap, &opts.base).await? {
        return Ok(());
    }
    let Some(attrs) = base_attrs(&opts.base) else {
        bail!("cannot create {}: not a DN", opts.base);
    };
    info!("Creating {}", opts.base);
    if opts.dry_run {
        return Ok(());
    }
    ldap.add(&opts.base, attrs)
        .await
        .and_then(LdapResult::success)
        .with_context(|| format!("ldap_add({})", opts.base))?;
    Ok(())
}

struct Progress {
    tty: bool,
    begin: Instant,
    last: Instant,
    total: u64,
}

impl Progress {
    fn new(total: u64) -> Progress {
        let now = Instant::now();
        Progress {
            tty: std::io::stderr().is_terminal(),
            begin: now,
            last: now,
            total,
        }
    }

    fn update(&mut self, done: u64) {
        if !self.tty || self.last.elapsed() < PROGRESS_EVERY || self.total == 0 {
            return;
        }
        self.last = Instant::now();
        let used = self.begin.elapsed().as_secs_f64();
        let part = done as f64 / self.total as f64;
        let eta = if part > 0.0 { used / part - used } else { 0.0 };
        eprint!(
            "\rprocessed {done} of {} [{:.1}%] in {used:.1}s, {} remaining in {eta:.1}s  \r",
            self.total,
            part * 100.0,
            self.total.saturating_sub(done)
        );
    }

    fn finish(&self) {
        if self.tty && self.begin.elapsed() >= PROGRESS_EVERY {
            eprintln!();
        }
    }
}

#[derive(Default)]
struct ImportStats {
    added: u64,
    existed: u64,
    fatal: Option<String>,
}

type AddResult = (Transaction, Result<LdapResult, LdapError>);

fn account(
    stats: &mut ImportStats,
    opts: &ConnOptions,
    joined: Option<Result<AddResult, tokio::task::JoinError>>,
) {
    match joined {
        Some(Ok((_, Ok(res)))) if res.rc == 0 => stats.added += 1,
        Some(Ok((tx, Ok(res))))
            if res.rc == rc::ALREADY_EXISTS || res.rc == rc::INVALID_ATTRIBUTE_SYNTAX =>
        {
            if opts.lenient {
                debug!("ldap_add({tx}): {res}");
            } else {
                error!("ldap_add({tx}): {res}");
                stats.existed += 1;
            }
        }
        Some(Ok((tx, Ok(res)))) => {
            stats.fatal.get_or_insert(format!("ldap_add({tx}): {res}"));
        }
        Some(Ok((tx, Err(e)))) => {
            stats.fatal.get_or_insert(format!("ldap_add({tx}): {e}"));
        }
        Some(Err(e)) => {
            stats.fatal.get_or_insert(format!("ldap_add: {e}"));
        }
        None => {}
    }
}

/// `import [--count N] [--min ID] [--max ID]`
pub fn import(
    path: &Path,
    opts: &ConnOptions,
    count: u64,
    min: Option<u64>,
    max: Option<u64>,
) -> Result<Exit> {
    info!("Reading transactions from file '{}'...", path.display());
    let translog = Translog::open(path)?;
    if translog.last == 0 {
        info!("File is empty; no transactions to process.");
        return Ok(Exit::Ok);
    }
    let by_count = translog.last.saturating_sub(count).saturating_add(1);
    let start = by_count.max(translog.first).max(min.unwrap_or(1)).max(1);
    let end = max.unwrap_or(translog.last).min(translog.last);
    if start > end {
        info!("Nothing to import in {start}..{end}");
        return Ok(Exit::Ok);
    }
    info!("Processing transactions {start} .. {end}");
    let index = open_index(path);
    let mut scanner = translog.scanner_from(index.as_ref(), start)?;
    let req_start = opts
        .datetime
        .clone()
        .unwrap_or_else(|| generalized_time(SystemTime::now()));

    let stats = runtime()?.block_on(async {
        let mut ldap = connect(opts).await?;
        ensure_base(&mut ldap, opts).await?;
        let mut stats = ImportStats::default();
        let mut progress = Progress::new(end - start + 1);
        let mut set: JoinSet<AddResult> = JoinSet::new();
        let mut buf = Vec::new();
        let mut seen: u64 = 0;
        while let Some(line) = scanner.read_line(&mut buf)? {
            if stats.fatal.is_some() {
                break;
            }
            if !line.complete || is_blank(&buf) {
                continue;
            }
            let tx = match parse_line(&buf) {
                Ok(tx) => tx,
                Err(e) => {
                    warning!(
                        "{} at offset {}: skipping: {e}",
                        path.display(),
                        line.offset
                    );
                    continue;
                }
            };
            let id = tx.id.get();
            if id < start {
                continue;
            }
            if id > end {
                break;
            }
            seen += 1;
            progress.update(seen);
            let dn = session_dn(id, &opts.base);
            if opts.dry_run {
                debug!("(dry run) ldap_add({dn})");
                continue;
            }
            while set.len() >= IN_FLIGHT {
                account(&mut stats, opts, set.join_next().await);
            }
            let attrs = entry_attrs(&tx, &req_start);
            let mut handle = ldap.clone();
            set.spawn(async move {
                let res = handle.add(&dn, attrs).await;
                (tx, res)
            });
        }
        while !set.is_empty() {
            account(&mut stats, opts, set.join_next().await);
        }
        progress.finish();
        let _ = ldap.unbind().await;
        anyhow::Ok(stats)
    })?;
    if let Some(fatal) = stats.fatal {
        bail!("{fatal}");
    }
    info!("Added {} entries to {}", stats.added, opts.base);
    if stats.existed > 0 {
        error!(
            "{} transactions already existed in {} (use --lenient to ignore)",
            stats.existed, opts.base
        );
        return Ok(Exit::Problem);
    }
    Ok(Exit::Ok)
}
