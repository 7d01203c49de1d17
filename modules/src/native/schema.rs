//! Schema replication for the `replication` module: the Primary's `cn=Subschema` becomes
//! the Replica's schema file, as UCS's `update_schema` does (spec replication.md §A 1.5),
//! but validated before it goes live (§B 5).
//!
//! - attribute types, then object classes, each after its superiors, in slapd.conf syntax
//!   (`attributetype ( … )`, `objectclass ( … )`); definitions whose OID slapd defines
//!   itself (built in or from a module) are left out, or slapd refuses the duplicate;
//! - lines longer than 2,000 characters are wrapped at a space (slapd's line limit, UCS
//!   Bug #46743);
//! - the text goes to `<file>.new`; `slaptest -u` checks a copy of the local slapd.conf
//!   whose include of the schema file names the new file instead. Only a schema slapd
//!   accepts replaces the live file (atomically) and is followed by the restart command
//!   (UCS: `/etc/init.d/slapd restart`). A refused schema stays in `<file>.rejected`, the
//!   live file is untouched, and the module reports the problem until a later schema
//!   passes.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// slapd reads config lines up to this length; longer definitions are wrapped (Bug #46743).
const WRAP_AT: usize = 2000;

/// The built-in OID list used when no `oid_skip` file is configured and UCS's is absent:
/// generated for Debian's OpenLDAP 2.5 with every module of `/usr/lib/ldap` by
/// `kit/openldap/oid-skip.sh` (same format as UCS's `oid_skip`).
const BUILTIN_OIDS: &str = include_str!("oid_skip.txt");

/// UCS's list of OIDs slapd defines itself.
const UCS_OID_SKIP: &str = "/usr/share/univention-ldap/oid_skip";

#[derive(Debug, Clone)]
pub(super) struct SchemaSettings {
    /// The replicated schema file slapd.conf includes (UCS:
    /// `/var/lib/univention-ldap/schema.conf`).
    pub file: PathBuf,
    /// OIDs never written; `None`: UCS's file if present, else [`BUILTIN_OIDS`].
    pub oid_skip: Option<PathBuf>,
    /// The local slapd's configuration file, copied for the check.
    pub slapd_conf: PathBuf,
    pub slaptest: PathBuf,
    /// Run through `sh -c` after a new schema went live.
    pub restart: String,
}

impl Default for SchemaSettings {
    fn default() -> SchemaSettings {
        SchemaSettings {
            file: PathBuf::from("/var/lib/univention-ldap/schema.conf"),
            oid_skip: None,
            slapd_conf: PathBuf::from("/etc/ldap/slapd.conf"),
            slaptest: PathBuf::from("/usr/sbin/slaptest"),
            restart: "/etc/init.d/slapd restart".to_owned(),
        }
    }
}

/// What became of a schema update.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The live file already holds this schema.
    Unchanged,
    /// Validated and installed; slapd must be restarted.
    Installed,
    /// slaptest refused it: the reason; nothing was installed.
    Refused(String),
}

/// The OIDs of an `oid_skip` file: per line whitespace-separated OIDs, `#` starts a comment.
pub(super) fn parse_oid_skip(text: &str) -> HashSet<String> {
    text.lines()
        .flat_map(|line| {
            line.split('#')
                .next()
                .unwrap_or_default()
                .split_whitespace()
        })
        .map(str::to_owned)
        .collect()
}

impl SchemaSettings {
    fn skipped(&self) -> Result<HashSet<String>, String> {
        let path = match &self.oid_skip {
            Some(path) => path.clone(),
            None if Path::new(UCS_OID_SKIP).exists() => PathBuf::from(UCS_OID_SKIP),
            None => return Ok(parse_oid_skip(BUILTIN_OIDS)),
        };
        std::fs::read_to_string(&path)
            .map(|text| parse_oid_skip(&text))
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    fn sibling(&self, suffix: &str) -> PathBuf {
        let mut name = self.file.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    }

    /// Writes the schema of `subschema` (the attributes of `cn=Subschema`) to the file,
    /// if slapd accepts it. `Err` for failures of this host (unreadable files, slaptest
    /// not runnable), which a retry may get past.
    pub(super) fn update(
        &self,
        subschema: &[(String, Vec<Vec<u8>>)],
        scratch: &Path,
    ) -> Result<Outcome, String> {
        let text = render(subschema, &self.skipped()?)?;
        if std::fs::read(&self.file).is_ok_and(|live| live == text.as_bytes()) {
            return Ok(Outcome::Unchanged);
        }
        let candidate = self.sibling(".new");
        daemon::fs::write_atomic(&candidate, text.as_bytes(), 0o644)
            .map_err(|e| format!("cannot write {}: {e}", candidate.display()))?;
        if let Err(reason) = self.check(&candidate, scratch)? {
            let rejected = self.sibling(".rejected");
            // Kept for the operator; the live file stays as it is.
            if let Err(e) = std::fs::rename(&candidate, &rejected) {
                tracing::warn!("cannot move {} aside: {e}", candidate.display());
            }
            return Ok(Outcome::Refused(format!(
                "{reason} (kept in {})",
                rejected.display()
            )));
        }
        std::fs::rename(&candidate, &self.file)
            .and_then(|()| sync_dir(&self.file))
            .map_err(|e| format!("cannot install {}: {e}", self.file.display()))?;
        Ok(Outcome::Installed)
    }

    /// `slaptest -u` on a copy of slapd.conf that includes `candidate` instead of the live
    /// schema file: `Ok(Err(output))` when slapd would not start with it.
    fn check(&self, candidate: &Path, scratch: &Path) -> Result<Result<(), String>, String> {
        let conf = std::fs::read_to_string(&self.slapd_conf)
            .map_err(|e| format!("cannot read {}: {e}", self.slapd_conf.display()))?;
        let copy = redirect_include(&conf, &self.file, candidate).ok_or_else(|| {
            format!(
                "{} does not include {}: the schema cannot be checked",
                self.slapd_conf.display(),
                self.file.display()
            )
        })?;
        daemon::fs::create_private_dir(scratch)
            .map_err(|e| format!("cannot create {}: {e}", scratch.display()))?;
        let copy_path = scratch.join("slapd.conf");
        daemon::fs::write_atomic(&copy_path, copy.as_bytes(), 0o600)
            .map_err(|e| format!("cannot write {}: {e}", copy_path.display()))?;
        let output = Command::new(&self.slaptest)
            .arg("-u")
            .arg("-f")
            .arg(&copy_path)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.slaptest.display()))?;
        if output.status.success() {
            return Ok(Ok(()));
        }
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let said: Vec<&str> = said
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        Ok(Err(format!(
            "slaptest refused the new schema ({}): {}",
            output.status,
            said.join(" | ")
        )))
    }

    /// Runs the restart command; `Err` with its output when it fails.
    pub(super) fn restart_slapd(&self) -> Result<(), String> {
        let output = Command::new("/bin/sh")
            .arg("-c")
            .arg(&self.restart)
            .output()
            .map_err(|e| format!("cannot run {:?}: {e}", self.restart))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{:?} exited with {}: {}{}",
                self.restart,
                output.status,
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }
}

fn sync_dir(file: &Path) -> std::io::Result<()> {
    match file.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// `conf` with every `include <live>` line naming `candidate` instead; `None` when no line
/// includes `live`.
fn redirect_include(conf: &str, live: &Path, candidate: &Path) -> Option<String> {
    let live = live.to_string_lossy();
    let mut found = false;
    let mut out = String::with_capacity(conf.len());
    for line in conf.lines() {
        let mut words = line.split_whitespace();
        let is_live = words
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case("include"))
            && words.next().map(|w| w.trim_matches('"')) == Some(live.as_ref())
            && words.next().is_none();
        if is_live {
            found = true;
            out.push_str(&format!("include \"{}\"", candidate.display()));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    found.then_some(out)
}

/// One schema definition: its OID, names and superiors.
struct Definition<'a> {
    text: &'a str,
    oid: String,
    names: Vec<String>,
    sups: Vec<String>,
}

/// The tokens of an RFC 4512 definition: `(`, `)`, `$`, quoted strings (with their
/// quotes) and bare words.
fn tokens(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'(' | b')' | b'$' => {
                out.push(&text[i..i + 1]);
                i += 1;
            }
            b'\'' => {
                let end = text[i + 1..]
                    .find('\'')
                    .map_or(text.len(), |e| i + 1 + e + 1);
                out.push(&text[i..end]);
                i = end;
            }
            _ => {
                let end = text[i..]
                    .find([' ', '\t', '\n', '\r', '(', ')', '$', '\''])
                    .map_or(text.len(), |e| i + e);
                out.push(&text[i..end]);
                i = end;
            }
        }
    }
    out
}

/// The words after `keyword`: one, or a parenthesised list.
fn values_after(tokens: &[&str], keyword: &str) -> Vec<String> {
    let Some(at) = tokens.iter().position(|t| t.eq_ignore_ascii_case(keyword)) else {
        return Vec::new();
    };
    let unquote = |t: &str| t.trim_matches('\'').to_ascii_lowercase();
    match tokens.get(at + 1) {
        Some(&"(") => tokens[at + 2..]
            .iter()
            .take_while(|t| **t != ")")
            .filter(|t| **t != "$")
            .map(|t| unquote(t))
            .collect(),
        Some(t) => vec![unquote(t)],
        None => Vec::new(),
    }
}

fn parse(text: &str) -> Result<Definition<'_>, String> {
    let toks = tokens(text);
    if toks.first() != Some(&"(") || toks.last() != Some(&")") {
        return Err(format!("not a schema definition: {text:?}"));
    }
    let oid = toks
        .get(1)
        .filter(|t| **t != ")")
        .ok_or_else(|| format!("no OID in {text:?}"))?
        .to_ascii_lowercase();
    Ok(Definition {
        text,
        oid,
        names: values_after(&toks, "NAME"),
        sups: values_after(&toks, "SUP"),
    })
}

/// Every definition after its superiors (by name or OID), otherwise in the given order.
fn superiors_first<'a>(defs: &'a [Definition<'a>]) -> Vec<&'a Definition<'a>> {
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, def) in defs.iter().enumerate() {
        index.insert(def.oid.as_str(), i);
        for name in &def.names {
            index.insert(name.as_str(), i);
        }
    }
    let mut placed = vec![false; defs.len()];
    let mut order = Vec::with_capacity(defs.len());
    // Iterative depth-first walk; a cycle (invalid schema) is broken where it closes and
    // left for slaptest to refuse.
    for start in 0..defs.len() {
        let mut stack = vec![(start, 0usize)];
        let mut on_path = HashSet::from([start]);
        while let Some((at, next)) = stack.pop() {
            if placed[at] {
                on_path.remove(&at);
                continue;
            }
            let sup = defs[at]
                .sups
                .get(next)
                .and_then(|s| index.get(s.as_str()))
                .copied();
            if next < defs[at].sups.len() {
                stack.push((at, next + 1));
                if let Some(sup) = sup.filter(|s| !placed[*s] && !on_path.contains(s)) {
                    on_path.insert(sup);
                    stack.push((sup, 0));
                }
                continue;
            }
            placed[at] = true;
            on_path.remove(&at);
            order.push(&defs[at]);
        }
    }
    order
}

/// `line` cut into lines of at most [`WRAP_AT`] characters at spaces; each continuation
/// starts with the space it was cut at, which slapd reads as "continued".
fn wrap(line: &str) -> String {
    let mut out = String::with_capacity(line.len() + 8);
    let mut rest = line;
    while rest.len() > WRAP_AT {
        // A space is one byte, so cutting before it is always on a character boundary.
        let cut = rest.as_bytes()[1..WRAP_AT]
            .iter()
            .rposition(|b| *b == b' ')
            .map(|c| c + 1);
        let Some(cut) = cut else { break };
        out.push_str(&rest[..cut]);
        out.push('\n');
        rest = &rest[cut..];
    }
    out.push_str(rest);
    out
}

/// The schema file for the attributes of `cn=Subschema`: every attribute type, then every
/// object class, superiors first, without the OIDs in `skip`.
pub(super) fn render(
    subschema: &[(String, Vec<Vec<u8>>)],
    skip: &HashSet<String>,
) -> Result<String, String> {
    let values = |name: &str| -> Result<Vec<String>, String> {
        subschema
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v)
            .map(|v| {
                String::from_utf8(v.clone()).map_err(|_| format!("{name}: a value is not UTF-8"))
            })
            .collect()
    };
    let mut out = String::from(
        "# This file is generated: automatically replicated from the Primary Directory \
         Node.\n# Changes here are overwritten by the next schema update.\n",
    );
    let skip: HashSet<String> = skip.iter().map(|o| o.to_ascii_lowercase()).collect();
    for (attribute, keyword) in [
        ("attributeTypes", "attributetype"),
        ("objectClasses", "objectclass"),
    ] {
        let texts = values(attribute)?;
        let defs = texts
            .iter()
            .map(|t| parse(t))
            .collect::<Result<Vec<_>, _>>()?;
        for def in superiors_first(&defs) {
            if skip.contains(&def.oid) {
                continue;
            }
            out.push_str(&wrap(&format!("{keyword} {}", def.text.trim())));
            out.push('\n');
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::native::quarantine::Attrs;

    fn subschema(attrs: &[&str], classes: &[&str]) -> Attrs {
        vec![
            (
                "attributeTypes".into(),
                attrs.iter().map(|a| a.as_bytes().to_vec()).collect(),
            ),
            (
                "objectClasses".into(),
                classes.iter().map(|a| a.as_bytes().to_vec()).collect(),
            ),
        ]
    }

    #[test]
    fn superiors_first_builtins_skipped_long_lines_wrapped() {
        // Multi-byte characters around the cut: cut at a space, never inside a character.
        let long_desc = "wörd ü ".repeat(300);
        let attrs = [
            "( 1.1.2 NAME 'child' SUP parent )",
            "( 1.1.1 NAME ( 'parent' 'alias' ) SUP name )",
            "( 2.5.4.41 NAME 'name' SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )",
        ];
        let long = format!("( 1.2.9 NAME 'long' DESC '{long_desc}' SUP top AUXILIARY )");
        let classes = [
            "( 1.2.2 NAME 'lower' SUP ( upper $ top ) MAY child )",
            "( 1.2.1 NAME 'upper' SUP top AUXILIARY MAY alias )",
            long.as_str(),
        ];
        let skip = parse_oid_skip("2.5.4.41   # attributeType.name\n# 1.2.1 commented\n");
        let text = render(&subschema(&attrs, &classes), &skip).unwrap();
        let defs: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with(' '))
            .collect();
        assert_eq!(
            defs[..4],
            [
                "attributetype ( 1.1.1 NAME ( 'parent' 'alias' ) SUP name )",
                "attributetype ( 1.1.2 NAME 'child' SUP parent )",
                "objectclass ( 1.2.1 NAME 'upper' SUP top AUXILIARY MAY alias )",
                "objectclass ( 1.2.2 NAME 'lower' SUP ( upper $ top ) MAY child )",
            ]
        );
        assert!(!text.contains("'name'"), "{text}");
        assert!(text.lines().all(|l| l.len() <= WRAP_AT), "a line too long");
        // Unwrapped the way slapd reads continuation lines, the definition is intact.
        assert!(text.replace("\n ", " ").contains(&long), "{text}");
    }

    #[test]
    fn the_include_of_the_live_file_is_redirected() {
        let conf = "include /etc/ldap/schema/core.schema\ninclude \"/var/s.conf\"\ndatabase mdb\n";
        let copy =
            redirect_include(conf, Path::new("/var/s.conf"), Path::new("/tmp/x.new")).unwrap();
        assert_eq!(
            copy,
            "include /etc/ldap/schema/core.schema\ninclude \"/tmp/x.new\"\ndatabase mdb\n"
        );
        assert!(redirect_include(conf, Path::new("/var/other"), Path::new("/x")).is_none());
    }

    #[test]
    fn the_builtin_list_knows_slapd_s_own_and_module_oids() {
        let skip = parse_oid_skip(BUILTIN_OIDS);
        // entryUUID (slapd), reqStart (accesslog), pwdAttribute (ppolicy)
        for oid in [
            "1.3.6.1.1.16.4",
            "1.3.6.1.4.1.4203.666.11.5.1.2",
            "1.3.6.1.4.1.42.2.27.8.1.1",
        ] {
            assert!(skip.contains(oid), "{oid}");
        }
        // sn comes from core.schema (cn is built into slapd 2.5).
        assert!(skip.contains("2.5.4.3"));
        assert!(!skip.contains("2.5.4.4"));
    }
}
