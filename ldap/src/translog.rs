//! `cn=translog` entries (`reqSession=<id>,<base>` with `reqDN` and `reqType`): the
//! notifier writes one per transaction, protocol-3 listeners and the tools read them.

use std::collections::HashSet;
use std::time::Duration;

use ldap3::{Ldap, Scope};
use proto::{Command, Transaction, TransactionId};

use crate::error::LdapFailure;
use crate::search::{Lookup, search_one};

/// The DN of transaction `id`'s entry below `base`.
pub fn session_dn(id: u64, base: &str) -> String {
    format!("reqSession={id},{base}")
}

/// Attributes as ldap3's `add` takes them.
pub type AddAttrs = Vec<(String, HashSet<String>)>;

/// The attributes of transaction `tx`'s entry, written at `req_start` (generalized time).
pub fn entry_attrs(tx: &Transaction, req_start: &str) -> AddAttrs {
    let one = |v: String| HashSet::from([v]);
    vec![
        ("objectClass".to_owned(), one("auditObject".to_owned())),
        ("reqStart".to_owned(), one(req_start.to_owned())),
        ("reqSession".to_owned(), one(tx.id.to_string())),
        ("reqDN".to_owned(), one(tx.dn.clone())),
        ("reqType".to_owned(), one(tx.command.to_string())),
    ]
}

/// The attributes of the base entry itself: an `auditContainer` named by its first RDN;
/// `None` when `base` has no `attr=value` RDN.
pub fn base_attrs(base: &str) -> Option<AddAttrs> {
    let rdn = crate::dn::first_rdn_avas(base)?;
    let mut attrs = vec![(
        "objectClass".to_owned(),
        HashSet::from(["auditContainer".to_owned()]),
    )];
    for ava in rdn {
        let value = String::from_utf8(ava.value).ok()?;
        attrs.push((ava.attr, HashSet::from([value])));
    }
    Some(attrs)
}

/// DN and command of transaction `id` from `reqSession=<id>,<translog base>`.
/// `Ok(None)` when the entry does not exist (yet).
pub async fn read_translog(
    ldap: &mut Ldap,
    translog_base: &str,
    id: TransactionId,
    timeout: Duration,
) -> Result<Option<TranslogEntry>, LdapFailure> {
    let dn = session_dn(id.get(), translog_base);
    let lookup = search_one(
        ldap,
        &dn,
        Scope::Base,
        "(objectClass=*)",
        &["reqDN", "reqType", "reqSession"],
        timeout,
    )
    .await?;
    let Lookup::Found(entry) = lookup else {
        return Ok(None);
    };
    let what = || format!("translog entry {dn}");
    let req_dn = entry
        .first_str("reqDN")
        .ok_or_else(|| LdapFailure::Decode {
            what: what(),
            reason: "no reqDN".into(),
        })?;
    let req_type = entry.first_str("reqType").unwrap_or_default();
    Ok(Some(TranslogEntry {
        id,
        dn: req_dn.to_owned(),
        req_type: req_type.to_owned(),
    }))
}

/// A `cn=translog` entry as stored; `req_type` is kept verbatim so an unknown type can be
/// reported and skipped like UCS does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranslogEntry {
    pub id: TransactionId,
    pub dn: String,
    pub req_type: String,
}

impl TranslogEntry {
    pub fn command(&self) -> Option<Command> {
        let mut chars = self.req_type.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) => Command::from_char(c),
            _ => None,
        }
    }

    pub fn transaction(&self) -> Option<Transaction> {
        self.command()
            .map(|command| Transaction::new(self.id, self.dn.clone(), command))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translog_types_map_to_commands() {
        let entry = |t: &str| TranslogEntry {
            id: TransactionId(5),
            dn: "cn=x".into(),
            req_type: t.into(),
        };
        assert_eq!(entry("a").command(), Some(Command::Add));
        assert_eq!(entry("r").command(), Some(Command::ModRdn));
        assert_eq!(entry("x").command(), None);
        assert_eq!(entry("ab").command(), None);
        assert_eq!(entry("").transaction(), None);
        assert_eq!(entry("d").transaction().unwrap().to_line(), "5 cn=x d\n");
        assert_eq!(session_dn(7, "cn=translog"), "reqSession=7,cn=translog");
    }

    #[test]
    fn entry_and_base_attributes() {
        let tx = Transaction::new(TransactionId(9), "cn=a,dc=x", Command::Modify);
        let attrs = entry_attrs(&tx, "20240131120000Z");
        let get = |name: &str| attrs.iter().find(|(n, _)| n == name).unwrap().1.clone();
        assert_eq!(get("reqSession"), HashSet::from(["9".to_owned()]));
        assert_eq!(get("reqType"), HashSet::from(["m".to_owned()]));
        assert_eq!(get("reqDN"), HashSet::from(["cn=a,dc=x".to_owned()]));
        let base = base_attrs("cn=translog").unwrap();
        assert_eq!(
            base[1],
            ("cn".to_owned(), HashSet::from(["translog".to_owned()]))
        );
        assert!(base_attrs("garbage").is_none());
    }
}
