//! A bound LDAP connection with the handful of operations tests need.
//!
//! Values are bytes throughout so tests can write and compare binary attributes exactly.

use std::collections::{BTreeMap, HashSet};

use ldap3::{LdapConn, Mod, Scope, SearchEntry};

use crate::{Result, ldap_context};

/// LDAP result code for "no such object".
const NO_SUCH_OBJECT: u32 = 32;

/// An entry as read back: attribute names as the server spells them, values as bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub dn: String,
    pub attrs: BTreeMap<String, Vec<Vec<u8>>>,
}

impl Entry {
    fn from_search_entry(entry: SearchEntry) -> Entry {
        let mut attrs: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        for (name, values) in entry.attrs {
            attrs
                .entry(name)
                .or_default()
                .extend(values.into_iter().map(String::into_bytes));
        }
        for (name, values) in entry.bin_attrs {
            attrs.entry(name).or_default().extend(values);
        }
        Entry {
            dn: entry.dn,
            attrs,
        }
    }

    /// The first value of `attr` as text, if present and valid UTF-8.
    pub fn first(&self, attr: &str) -> Option<&str> {
        self.attrs
            .get(attr)
            .and_then(|values| values.first())
            .and_then(|value| std::str::from_utf8(value).ok())
    }

    /// All values of `attr` as text (invalid UTF-8 is replaced).
    pub fn texts(&self, attr: &str) -> Vec<String> {
        texts(self.attrs.get(attr))
    }
}

/// Attribute values as text (invalid UTF-8 is replaced); no values for `None`.
pub fn texts(values: Option<&Vec<Vec<u8>>>) -> Vec<String> {
    values
        .map(|values| {
            values
                .iter()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A connection to one of the harness's slapd instances.
pub struct Directory {
    conn: LdapConn,
}

fn value_set(values: &[&[u8]]) -> HashSet<Vec<u8>> {
    values.iter().map(|v| v.to_vec()).collect()
}

fn text_set(values: &[&str]) -> HashSet<Vec<u8>> {
    values.iter().map(|v| v.as_bytes().to_vec()).collect()
}

impl Directory {
    /// Wraps a connection made (and bound) elsewhere, e.g. to a test's own slapd.
    pub fn new(conn: LdapConn) -> Directory {
        Directory { conn }
    }

    /// Adds an entry with text values.
    pub fn add(&mut self, dn: &str, attrs: &[(&str, &[&str])]) -> Result<()> {
        let attrs = attrs
            .iter()
            .map(|(name, values)| (name.as_bytes().to_vec(), text_set(values)))
            .collect();
        self.add_raw(dn, attrs)
    }

    /// Adds a minimal `organizationalRole` entry `cn=<cn>,…`: the cheapest object to write
    /// when a test only needs some change to happen.
    pub fn add_role(&mut self, dn: &str, cn: &str) -> Result<()> {
        self.add(
            dn,
            &[("objectClass", &["organizationalRole"]), ("cn", &[cn])],
        )
    }

    /// Adds an entry whose values may be binary.
    pub fn add_bytes(&mut self, dn: &str, attrs: &[(&str, &[&[u8]])]) -> Result<()> {
        let attrs = attrs
            .iter()
            .map(|(name, values)| (name.as_bytes().to_vec(), value_set(values)))
            .collect();
        self.add_raw(dn, attrs)
    }

    fn add_raw(&mut self, dn: &str, attrs: Vec<(Vec<u8>, HashSet<Vec<u8>>)>) -> Result<()> {
        self.conn
            .add(dn, attrs)
            .and_then(|r| r.success())
            .map_err(ldap_context(format!("adding {dn}")))?;
        Ok(())
    }

    /// Applies arbitrary modifications.
    pub fn modify(&mut self, dn: &str, mods: Vec<Mod<Vec<u8>>>) -> Result<()> {
        self.conn
            .modify(dn, mods)
            .and_then(|r| r.success())
            .map_err(ldap_context(format!("modifying {dn}")))?;
        Ok(())
    }

    /// Replaces all values of `attr` (no values deletes the attribute).
    pub fn replace(&mut self, dn: &str, attr: &str, values: &[&str]) -> Result<()> {
        self.modify(
            dn,
            vec![Mod::Replace(attr.as_bytes().to_vec(), text_set(values))],
        )
    }

    /// Replaces all values of `attr` with binary values.
    pub fn replace_bytes(&mut self, dn: &str, attr: &str, values: &[&[u8]]) -> Result<()> {
        self.modify(
            dn,
            vec![Mod::Replace(attr.as_bytes().to_vec(), value_set(values))],
        )
    }

    /// Adds values to `attr`.
    pub fn add_values(&mut self, dn: &str, attr: &str, values: &[&str]) -> Result<()> {
        self.modify(
            dn,
            vec![Mod::Add(attr.as_bytes().to_vec(), text_set(values))],
        )
    }

    /// Deletes the given values of `attr` (no values deletes the attribute).
    pub fn delete_values(&mut self, dn: &str, attr: &str, values: &[&str]) -> Result<()> {
        self.modify(
            dn,
            vec![Mod::Delete(attr.as_bytes().to_vec(), text_set(values))],
        )
    }

    /// Renames and/or moves an entry (LDAP modrdn / modDN).
    pub fn modrdn(
        &mut self,
        dn: &str,
        new_rdn: &str,
        delete_old_rdn: bool,
        new_superior: Option<&str>,
    ) -> Result<()> {
        self.conn
            .modifydn(dn, new_rdn, delete_old_rdn, new_superior)
            .and_then(|r| r.success())
            .map_err(ldap_context(format!("renaming {dn} to {new_rdn}")))?;
        Ok(())
    }

    pub fn delete(&mut self, dn: &str) -> Result<()> {
        self.conn
            .delete(dn)
            .and_then(|r| r.success())
            .map_err(ldap_context(format!("deleting {dn}")))?;
        Ok(())
    }

    /// Reads one entry with all user and operational attributes; `None` when it does not
    /// exist or the bound identity cannot see it.
    pub fn get(&mut self, dn: &str) -> Result<Option<Entry>> {
        let mut entries = self.search_inner(dn, Scope::Base, "(objectClass=*)", &["*", "+"])?;
        Ok(entries.pop())
    }

    /// Subtree/one-level/base search; a missing base yields no entries.
    pub fn search(
        &mut self,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: &[&str],
    ) -> Result<Vec<Entry>> {
        self.search_inner(base, scope, filter, attrs)
    }

    fn search_inner(
        &mut self,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: &[&str],
    ) -> Result<Vec<Entry>> {
        let result = self
            .conn
            .search(base, scope, filter, attrs.to_vec())
            .map_err(ldap_context(format!("searching {base}")))?;
        if result.1.rc == NO_SUCH_OBJECT {
            return Ok(Vec::new());
        }
        let (entries, _) = result
            .success()
            .map_err(ldap_context(format!("searching {base}")))?;
        Ok(entries
            .into_iter()
            .map(|e| Entry::from_search_entry(SearchEntry::construct(e)))
            .collect())
    }

    /// The raw connection, for operations this wrapper does not cover.
    pub fn conn(&mut self) -> &mut LdapConn {
        &mut self.conn
    }

    pub fn unbind(mut self) -> Result<()> {
        self.conn.unbind().map_err(ldap_context("unbinding"))
    }
}
