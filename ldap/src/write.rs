//! Writes: add, modify, delete and modrdn with exact byte values, each under a deadline,
//! and the LDIF change records (RFC 2849) that describe them to an operator.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ldap3::controls::{Assertion, MakeCritical as _};
use ldap3::{Ldap, LdapError, Mod, ldap_escape, parse_filter};

use crate::error::{LdapFailure, failure, timed};

/// Attributes as exact bytes: name → values.
pub type Attrs = [(String, Vec<Vec<u8>>)];

/// One part of a modify request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Add(String, Vec<Vec<u8>>),
    /// No values: the whole attribute.
    Delete(String, Vec<Vec<u8>>),
    Replace(String, Vec<Vec<u8>>),
}

impl Change {
    fn to_mod(&self) -> Mod<Vec<u8>> {
        let set = |values: &[Vec<u8>]| values.iter().cloned().collect::<HashSet<_>>();
        match self {
            Change::Add(name, values) => Mod::Add(name.clone().into_bytes(), set(values)),
            Change::Delete(name, values) => Mod::Delete(name.clone().into_bytes(), set(values)),
            Change::Replace(name, values) => Mod::Replace(name.clone().into_bytes(), set(values)),
        }
    }
}

pub async fn add(
    ldap: &mut Ldap,
    dn: &str,
    attrs: &Attrs,
    timeout: Duration,
) -> Result<(), LdapFailure> {
    let what = format!("add {dn}");
    let attrs: Vec<(Vec<u8>, HashSet<Vec<u8>>)> = attrs
        .iter()
        .map(|(name, values)| (name.clone().into_bytes(), values.iter().cloned().collect()))
        .collect();
    timed(&what, timeout, async {
        ldap.add(dn, attrs)
            .await
            .and_then(|r| r.success())
            .map(drop)
            .map_err(|e| failure(&what, e))
    })
    .await
}

pub async fn modify(
    ldap: &mut Ldap,
    dn: &str,
    changes: &[Change],
    timeout: Duration,
) -> Result<(), LdapFailure> {
    let what = format!("modify {dn}");
    let mods: Vec<Mod<Vec<u8>>> = changes.iter().map(Change::to_mod).collect();
    timed(&what, timeout, async {
        ldap.modify(dn, mods)
            .await
            .and_then(|r| r.success())
            .map(drop)
            .map_err(|e| failure(&what, e))
    })
    .await
}

/// A modify that the server applies only while the object's `attr` holds `value` (RFC 4528
/// assertion control with the filter `(attr=value)`, sent critical so a server without the
/// control refuses rather than ignores it). A mismatch is [`rc::ASSERTION_FAILED`].
///
/// [`rc::ASSERTION_FAILED`]: crate::rc::ASSERTION_FAILED
pub async fn modify_if_equal(
    ldap: &mut Ldap,
    dn: &str,
    changes: &[Change],
    (attr, value): (&str, &str),
    timeout: Duration,
) -> Result<(), LdapFailure> {
    let what = format!("modify {dn}");
    let filter = format!("({attr}={})", ldap_escape(value));
    // ldap3 encodes the control's filter with a panic on bad syntax: check it first.
    if parse_filter(&filter).is_err() {
        return Err(failure(&what, LdapError::FilterParsing));
    }
    let mods: Vec<Mod<Vec<u8>>> = changes.iter().map(Change::to_mod).collect();
    timed(&what, timeout, async {
        ldap.with_controls(Assertion { filter }.critical())
            .modify(dn, mods)
            .await
            .and_then(|r| r.success())
            .map(drop)
            .map_err(|e| failure(&what, e))
    })
    .await
}

/// Whether the object `dn` holds `value` in `attr` (an LDAP compare): `Ok(false)` when it
/// does not (or has no such attribute), [`rc::NO_SUCH_OBJECT`] when there is no object.
///
/// [`rc::NO_SUCH_OBJECT`]: crate::rc::NO_SUCH_OBJECT
pub async fn holds(
    ldap: &mut Ldap,
    dn: &str,
    (attr, value): (&str, &str),
    timeout: Duration,
) -> Result<bool, LdapFailure> {
    let what = format!("compare {dn}");
    timed(&what, timeout, async {
        ldap.compare(dn, attr, value)
            .await
            .and_then(|r| r.equal())
            .map_err(|e| failure(&what, e))
    })
    .await
}

pub async fn delete(ldap: &mut Ldap, dn: &str, timeout: Duration) -> Result<(), LdapFailure> {
    let what = format!("delete {dn}");
    timed(&what, timeout, async {
        ldap.delete(dn)
            .await
            .and_then(|r| r.success())
            .map(drop)
            .map_err(|e| failure(&what, e))
    })
    .await
}

/// modrdn: `dn` gets the RDN `new_rdn`, below `new_superior` if given.
pub async fn rename(
    ldap: &mut Ldap,
    dn: &str,
    new_rdn: &str,
    delete_old: bool,
    new_superior: Option<&str>,
    timeout: Duration,
) -> Result<(), LdapFailure> {
    let what = format!("modrdn {dn}");
    timed(&what, timeout, async {
        ldap.modifydn(dn, new_rdn, delete_old, new_superior)
            .await
            .and_then(|r| r.success())
            .map(drop)
            .map_err(|e| failure(&what, e))
    })
    .await
}

/// LDIF change records, as `ldapmodify` reads them.
pub mod ldif {
    use super::*;

    /// A content record (no `changetype`), as `slapadd` and `slapcat` use, ending in the
    /// blank line that separates records.
    pub fn entry(dn: &str, attrs: &Attrs) -> String {
        let mut out = String::new();
        line(&mut out, "dn", dn.as_bytes());
        for (name, values) in attrs {
            for value in values {
                line(&mut out, name, value);
            }
        }
        out.push('\n');
        out
    }

    pub fn add(dn: &str, attrs: &Attrs) -> String {
        let mut out = header(dn, "add");
        for (name, values) in attrs {
            for value in values {
                line(&mut out, name, value);
            }
        }
        out
    }

    pub fn modify(dn: &str, changes: &[Change]) -> String {
        let mut out = header(dn, "modify");
        for change in changes {
            let (op, name, values) = match change {
                Change::Add(n, v) => ("add", n, v),
                Change::Delete(n, v) => ("delete", n, v),
                Change::Replace(n, v) => ("replace", n, v),
            };
            line(&mut out, op, name.as_bytes());
            for value in values {
                line(&mut out, name, value);
            }
            out.push_str("-\n");
        }
        out
    }

    pub fn delete(dn: &str) -> String {
        header(dn, "delete")
    }

    pub fn rename(dn: &str, new_rdn: &str, delete_old: bool, new_superior: Option<&str>) -> String {
        let mut out = header(dn, "modrdn");
        line(&mut out, "newrdn", new_rdn.as_bytes());
        let _ = writeln!(out, "deleteoldrdn: {}", u8::from(delete_old));
        if let Some(sup) = new_superior {
            line(&mut out, "newsuperior", sup.as_bytes());
        }
        out
    }

    fn header(dn: &str, changetype: &str) -> String {
        let mut out = String::new();
        line(&mut out, "dn", dn.as_bytes());
        let _ = writeln!(out, "changetype: {changetype}");
        out
    }

    /// `name: value`, or `name:: base64` where RFC 2849 does not allow the value as a
    /// SAFE-STRING (also for non-ASCII, so the record survives any transport).
    fn line(out: &mut String, name: &str, value: &[u8]) {
        let safe = match (value.first(), value.last()) {
            (None, _) => true,
            (Some(b' ' | b':' | b'<'), _) | (_, Some(b' ')) => false,
            _ => value
                .iter()
                .all(|&b| b != 0 && b != b'\r' && b != b'\n' && b < 0x80),
        };
        if safe {
            let _ = writeln!(out, "{name}: {}", String::from_utf8_lossy(value));
        } else {
            let _ = writeln!(out, "{name}:: {}", STANDARD.encode(value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldif_records() {
        let attrs = vec![
            (
                "cn".to_owned(),
                vec![b"J\xc3\xbcrgen".to_vec(), b"plain".to_vec()],
            ),
            ("description".to_owned(), vec![b" lead".to_vec()]),
        ];
        assert_eq!(
            ldif::add("cn=x,dc=y", &attrs),
            "dn: cn=x,dc=y\nchangetype: add\ncn:: SsO8cmdlbg==\ncn: plain\ndescription:: IGxlYWQ=\n"
        );
        let changes = vec![
            Change::Replace("mail".into(), vec![b"a@b".to_vec()]),
            Change::Delete("uniqueMember".into(), vec![b"cn=u,dc=y".to_vec()]),
            Change::Delete("sn".into(), vec![]),
        ];
        assert_eq!(
            ldif::modify("cn=x,dc=y", &changes),
            "dn: cn=x,dc=y\nchangetype: modify\nreplace: mail\nmail: a@b\n-\ndelete: uniqueMember\n\
             uniqueMember: cn=u,dc=y\n-\ndelete: sn\n-\n"
        );
        assert_eq!(
            ldif::rename("cn=x,dc=y", "cn=z", true, Some("ou=o,dc=y")),
            "dn: cn=x,dc=y\nchangetype: modrdn\nnewrdn: cn=z\ndeleteoldrdn: 1\nnewsuperior: ou=o,dc=y\n"
        );
        assert_eq!(ldif::delete("cn=x"), "dn: cn=x\nchangetype: delete\n");
        assert_eq!(
            ldif::entry("cn=J\u{fc}rgen,dc=y", &attrs),
            "dn:: Y249SsO8cmdlbixkYz15\ncn:: SsO8cmdlbg==\ncn: plain\ndescription:: IGxlYWQ=\n\n"
        );
    }
}
