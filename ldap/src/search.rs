//! The reads both daemons and the tools make: one object by DN or entryUUID (every user
//! and operational attribute, decoded by [`crate::decode::parse_entry`], so values are the
//! exact bytes the server sent), and paged subtree searches.

use std::time::Duration;

use ldap3::adapters::{Adapter, EntriesOnly, PagedResults};
use ldap3::{Ldap, Scope, SearchStream, ldap_escape};

use crate::decode::{RawEntry, parse_entry};
use crate::error::{LdapFailure, failure, rc, rc_name, timed};

/// Attributes requested for every object: all user and all operational ones.
pub const ALL_ATTRS: [&str; 2] = ["*", "+"];

/// The answer to a read: the object, or nothing visible (absent or hidden by ACLs, which the
/// listener must treat alike: spec §3.2 step 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(RawEntry),
    Missing,
}

/// Base-scope read of `dn` with all attributes.
pub async fn read_entry(
    ldap: &mut Ldap,
    dn: &str,
    timeout: Duration,
) -> Result<Lookup, LdapFailure> {
    search_one(
        ldap,
        dn,
        Scope::Base,
        "(objectClass=*)",
        &ALL_ATTRS,
        timeout,
    )
    .await
}

/// The object with this entryUUID anywhere below `base`.
pub async fn find_by_uuid(
    ldap: &mut Ldap,
    base: &str,
    uuid: &str,
    timeout: Duration,
) -> Result<Lookup, LdapFailure> {
    let filter = format!("(entryUUID={})", ldap_escape(uuid));
    search_one(ldap, base, Scope::Subtree, &filter, &ALL_ATTRS, timeout).await
}

/// The first entry a search finds; `Missing` for none, no such object or an invalid DN.
pub async fn search_one(
    ldap: &mut Ldap,
    base: &str,
    scope: Scope,
    filter: &str,
    attrs: &[&str],
    timeout: Duration,
) -> Result<Lookup, LdapFailure> {
    let what = format!("search {base}");
    timed(&what, timeout, async {
        let result = ldap
            .search(base, scope, filter, attrs.to_vec())
            .await
            .map_err(|e| failure(&what, e))?;
        let ldap3::SearchResult(entries, status) = result;
        match status.rc {
            0 => {}
            rc::NO_SUCH_OBJECT | rc::INVALID_DN_SYNTAX => return Ok(Lookup::Missing),
            rc => {
                return Err(LdapFailure::Result {
                    what: what.clone(),
                    rc,
                    message: if status.text.is_empty() {
                        rc_name(rc).to_owned()
                    } else {
                        status.text
                    },
                });
            }
        }
        match entries.into_iter().next() {
            None => Ok(Lookup::Missing),
            Some(entry) => parse_entry(entry)
                .map(Lookup::Found)
                .map_err(|e| LdapFailure::Decode {
                    what: what.clone(),
                    reason: e.to_string(),
                }),
        }
    })
    .await
}

/// DNs of every object below `base` matching `filter`, read page by page (module
/// initialisation, spec §3.9 step 4).
pub async fn subtree_dns(
    ldap: &mut Ldap,
    base: &str,
    filter: &str,
    timeout: Duration,
) -> Result<Vec<String>, LdapFailure> {
    let what = format!("search {filter} below {base}");
    timed(&what, timeout, async {
        let adapters: Vec<Box<dyn Adapter<'_, &str, Vec<&str>>>> = vec![
            Box::new(EntriesOnly::new()),
            Box::new(PagedResults::new(1000)),
        ];
        let mut stream = ldap
            .streaming_search_with(adapters, base, Scope::Subtree, filter, vec!["1.1"])
            .await
            .map_err(|e| failure(&what, e))?;
        let mut dns = Vec::new();
        while let Some(entry) = stream.next().await.map_err(|e| failure(&what, e))? {
            let entry = parse_entry(entry).map_err(|e| LdapFailure::Decode {
                what: what.clone(),
                reason: e.to_string(),
            })?;
            dns.push(entry.dn);
        }
        let status = stream.finish().await;
        match status.rc {
            0 | rc::NO_SUCH_OBJECT => Ok(dns),
            rc => Err(LdapFailure::Result {
                what: what.clone(),
                rc,
                message: status.text,
            }),
        }
    })
    .await
}

/// A paged search (pages of `page_size`) streaming decoded entries.
pub struct PagedSearch {
    stream: SearchStream<'static, String, Vec<String>>,
    what: String,
    timeout: Duration,
}

impl PagedSearch {
    /// Starts the search; each later step may take up to `timeout`.
    pub async fn start(
        ldap: &mut Ldap,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: &[&str],
        page_size: i32,
        timeout: Duration,
    ) -> Result<PagedSearch, LdapFailure> {
        let what = format!("search {filter} below {base}");
        let adapters: Vec<Box<dyn Adapter<'static, String, Vec<String>>>> = vec![
            Box::new(EntriesOnly::new()),
            Box::new(PagedResults::new(page_size)),
        ];
        let attrs: Vec<String> = attrs.iter().map(|a| (*a).to_owned()).collect();
        let stream = timed(&what, timeout, async {
            ldap.streaming_search_with(adapters, base, scope, filter, attrs)
                .await
                .map_err(|e| failure(&what, e))
        })
        .await?;
        Ok(PagedSearch {
            stream,
            what,
            timeout,
        })
    }

    /// The next entry; `None` at the end.
    pub async fn next(&mut self) -> Result<Option<RawEntry>, LdapFailure> {
        let what = &self.what;
        let entry = timed(what, self.timeout, async {
            self.stream.next().await.map_err(|e| failure(what, e))
        })
        .await?;
        entry
            .map(|entry| {
                parse_entry(entry).map_err(|e| LdapFailure::Decode {
                    what: what.clone(),
                    reason: e.to_string(),
                })
            })
            .transpose()
    }

    /// The search's result: success, or no such base (an empty result).
    pub async fn finish(mut self) -> Result<(), LdapFailure> {
        let status = self.stream.finish().await;
        match status.rc {
            rc::SUCCESS | rc::NO_SUCH_OBJECT => Ok(()),
            code => Err(LdapFailure::Result {
                what: self.what,
                rc: code,
                message: if status.text.is_empty() {
                    rc_name(code).to_owned()
                } else {
                    status.text
                },
            }),
        }
    }
}
