//! Two directories compared entry by entry: every entry below a base with all user and
//! operational attributes (`*` and `+`, entryUUID included), attribute names compared
//! case-insensitively, values as sets of exact bytes. Attributes that legitimately differ
//! between a primary and its replica are left out ([`DEFAULT_EXCLUDED`]); so are subtrees
//! the replica must not hold (selective replication).
//!
//! ```no_run
//! # use integration_tests::{Slapd, compare::Comparison};
//! # fn main() -> integration_tests::Result<()> {
//! let primary = Slapd::provider()?;
//! let replica = Slapd::start_replica_of(&primary)?;
//! // … replicate …
//! Comparison::new()
//!     .skip_subtree(integration_tests::slapd::RESTRICTED_DN)
//!     .check(&primary, &replica)?; // Err(HarnessError::Mismatch(diff)) when they differ
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use ldap3::Scope;

use crate::directory::{Directory, Entry};
use crate::slapd::{BASE, Slapd};
use crate::{HarnessError, Result};

/// Attributes that differ between a primary and its replica by design: the CSNs and the
/// last modifier and time (the replica's own writes set them, spec replication.md), and
/// `auditContext`, which the primary's accesslog overlay puts on the base entry.
pub const DEFAULT_EXCLUDED: &[&str] = &[
    "entryCSN",
    "contextCSN",
    "modifiersName",
    "modifyTimestamp",
    "auditContext",
];

/// How many differences a report lists before it only counts the rest.
const REPORT_LIMIT: usize = 50;

/// What to compare; build with the setters, run with [`Comparison::check`] or
/// [`Comparison::diff`].
#[derive(Debug, Clone)]
pub struct Comparison {
    base: String,
    /// Lower-cased attribute names.
    excluded: BTreeSet<String>,
    /// Lower-cased DNs whose subtrees are left out on both sides.
    skipped: Vec<String>,
    /// Only entries of the left side that match this LDAP filter are compared.
    left_filter: Option<String>,
}

impl Default for Comparison {
    fn default() -> Comparison {
        Comparison {
            base: BASE.to_owned(),
            excluded: DEFAULT_EXCLUDED.iter().map(|a| a.to_lowercase()).collect(),
            skipped: Vec::new(),
            left_filter: None,
        }
    }
}

impl Comparison {
    /// Everything below [`BASE`], without [`DEFAULT_EXCLUDED`].
    pub fn new() -> Comparison {
        Comparison::default()
    }

    /// Compares below `base` instead of [`BASE`].
    pub fn base(mut self, base: impl Into<String>) -> Comparison {
        self.base = base.into();
        self
    }

    /// Leaves `attr` out too.
    pub fn exclude(mut self, attr: &str) -> Comparison {
        self.excluded.insert(attr.to_lowercase());
        self
    }

    /// Compares `attr` although it is excluded by default.
    pub fn include(mut self, attr: &str) -> Comparison {
        self.excluded.remove(&attr.to_lowercase());
        self
    }

    /// Leaves the entry `dn` and everything below it out, on both sides.
    pub fn skip_subtree(mut self, dn: &str) -> Comparison {
        self.skipped.push(dn.to_lowercase());
        self
    }

    /// Compares only the entries of the left side that match `filter` (selective
    /// replication, `ldap/slave/filter`: the replica on the right must hold exactly those);
    /// the right side is read whole, so an entry the filter hides is reported there.
    pub fn filter_left(mut self, filter: &str) -> Comparison {
        self.left_filter = Some(filter.to_owned());
        self
    }

    /// Compares the main databases of `left` and `right`, each read as root over ldapi
    /// (no ACL hides anything). `Err(HarnessError::Mismatch)` carries the report.
    pub fn check(&self, left: &Slapd, right: &Slapd) -> Result<()> {
        match self.diff(&mut left.root()?, &mut right.root()?)? {
            None => Ok(()),
            Some(report) => Err(HarnessError::Mismatch(report)),
        }
    }

    /// The differences between what `left` and `right` show below the base, as a report
    /// (`None`: identical). Both connections must be allowed to read everything compared.
    pub fn diff(&self, left: &mut Directory, right: &mut Directory) -> Result<Option<String>> {
        let left = self.read(left, self.left_filter.as_deref())?;
        let right = self.read(right, None)?;
        let mut findings: Vec<String> = Vec::new();
        for (key, l) in &left {
            match right.get(key) {
                None => findings.push(format!("only in left:  {}", l.dn)),
                Some(r) => self.compare_entry(l, r, &mut findings),
            }
        }
        for (key, r) in &right {
            if !left.contains_key(key) {
                findings.push(format!("only in right: {}", r.dn));
            }
        }
        if findings.is_empty() {
            return Ok(None);
        }
        let mut report = format!(
            "{} difference(s) below {} (left {} entries, right {}; not compared: {}):\n",
            findings.len(),
            self.base,
            left.len(),
            right.len(),
            self.excluded.iter().cloned().collect::<Vec<_>>().join(", ")
        );
        for finding in findings.iter().take(REPORT_LIMIT) {
            let _ = writeln!(report, "  {finding}");
        }
        if findings.len() > REPORT_LIMIT {
            let _ = writeln!(report, "  … and {} more", findings.len() - REPORT_LIMIT);
        }
        Ok(Some(report))
    }

    /// Every compared entry, by lower-cased DN.
    fn read(
        &self,
        directory: &mut Directory,
        filter: Option<&str>,
    ) -> Result<BTreeMap<String, Entry>> {
        let filter = filter.unwrap_or("(objectClass=*)");
        let entries = directory.search(&self.base, Scope::Subtree, filter, &["*", "+"])?;
        Ok(entries
            .into_iter()
            .map(|entry| (entry.dn.to_lowercase(), entry))
            .filter(|(key, _)| !self.is_skipped(key))
            .collect())
    }

    fn is_skipped(&self, key: &str) -> bool {
        self.skipped
            .iter()
            .any(|skip| key == skip || key.ends_with(&format!(",{skip}")))
    }

    fn compare_entry(&self, left: &Entry, right: &Entry, findings: &mut Vec<String>) {
        if left.dn != right.dn {
            findings.push(format!(
                "DN spelled {:?} left, {:?} right",
                left.dn, right.dn
            ));
        }
        let l = self.attributes(left);
        let r = self.attributes(right);
        for name in l.keys().chain(r.keys()).collect::<BTreeSet<_>>() {
            let (lv, rv) = (l.get(name), r.get(name));
            if lv != rv {
                findings.push(format!(
                    "{}: {name}: left {}, right {}",
                    left.dn,
                    show(lv),
                    show(rv)
                ));
            }
        }
    }

    /// Compared attributes: lower-cased names, values as sets.
    fn attributes<'a>(&self, entry: &'a Entry) -> BTreeMap<String, BTreeSet<&'a [u8]>> {
        let mut attrs: BTreeMap<String, BTreeSet<&[u8]>> = BTreeMap::new();
        for (name, values) in &entry.attrs {
            let name = name.to_lowercase();
            if self.excluded.contains(&name) {
                continue;
            }
            attrs
                .entry(name)
                .or_default()
                .extend(values.iter().map(Vec::as_slice));
        }
        attrs
    }
}

/// Values for a report: text where printable, else base64.
fn show(values: Option<&BTreeSet<&[u8]>>) -> String {
    use base64::Engine as _;
    let Some(values) = values else {
        return "absent".into();
    };
    let shown: Vec<String> = values
        .iter()
        .map(|v| match std::str::from_utf8(v) {
            Ok(text) if !text.chars().any(char::is_control) => format!("{text:?}"),
            _ => format!(
                "base64:{}",
                base64::engine::general_purpose::STANDARD.encode(v)
            ),
        })
        .collect();
    format!("[{}]", shown.join(", "))
}
