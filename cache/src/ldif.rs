//! LDIF (RFC 2849) export of cache entries, for `univention-directory-listener-dump`.
//!
//! One record per entry:
//!
//! ```text
//! dn: <dn>
//! <attr>: <value>            one line per value, in stored order
//! listenerModule: <module>   one line per module, in stored order
//! <blank line>
//! ```
//!
//! A value is written as `attr:: <base64>` exactly when RFC 2849 does not allow it as a
//! SAFE-STRING: it starts with a space, `:` or `<`, ends with a space, or contains NUL, CR,
//! LF or any byte >= 0x80 (so non-ASCII UTF-8 is base64 too). The same rule applies to the
//! DN (`dn:: `) and module names.
//!
//! Differences from UCS's dump, by choice: UCS base64-encodes every value with a byte that is
//! not `isgraph()` (so any value containing a space) and truncates values at an embedded NUL;
//! this writer follows RFC 2849 and never loses bytes. Like UCS, an empty value is written as
//! `attr: ` with a trailing space (RFC 2849 also allows `attr:`); both parse the same.
//!
//! Lines are folded so that no physical line exceeds [`LINE_WIDTH`] bytes (OpenLDAP's
//! `LDIF_LINE_WIDTH`); continuation lines start with one space.

use std::io::{self, BufRead};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::entry::CacheEntry;

/// The attribute name under which [`write_entry`] lists the modules of an entry.
pub(crate) const MODULE_ATTRIBUTE: &str = "listenerModule";

/// Maximum length of a physical line in bytes, without the newline.
pub(crate) const LINE_WIDTH: usize = 76;

/// Longest physical line [`Reader`] accepts, line end excluded: far above any real value,
/// low enough that a file without line ends (junk, a wrong file) cannot exhaust memory.
pub const MAX_LINE: u64 = 16 << 20;

/// Appends the LDIF record of `entry`, including its terminating blank line, to `out`.
pub fn write_entry(out: &mut String, entry: &CacheEntry) {
    write_line(out, "dn", entry.dn.as_bytes());
    for (name, values) in &entry.attributes {
        for value in values {
            write_line(out, name, value);
        }
    }
    for module in &entry.modules {
        write_line(out, MODULE_ATTRIBUTE, module.as_bytes());
    }
    out.push('\n');
}

/// Whether RFC 2849 lets `value` stand as a SAFE-STRING after `attr: `.
pub(crate) fn is_safe_string(value: &[u8]) -> bool {
    match (value.first(), value.last()) {
        (None, _) => true,
        (Some(b' ' | b':' | b'<'), _) | (_, Some(b' ')) => false,
        _ => value
            .iter()
            .all(|&b| b != 0 && b != b'\n' && b != b'\r' && b < 0x80),
    }
}

fn write_line(out: &mut String, name: &str, value: &[u8]) {
    let mut line = String::with_capacity(name.len() + 3 + value.len() * 4 / 3 + 4);
    line.push_str(name);
    if is_safe_string(value) {
        line.push_str(": ");
        // A safe string is ASCII, so each byte is one char.
        line.extend(value.iter().map(|&b| char::from(b)));
    } else {
        line.push_str(":: ");
        STANDARD.encode_string(value, &mut line);
    }
    fold_into(out, &line);
}

/// Appends `line` folded at [`LINE_WIDTH`] bytes plus a newline. Splits only at char
/// boundaries, which matters only for non-ASCII attribute names (values are ASCII here).
fn fold_into(out: &mut String, line: &str) {
    let mut rest = line;
    let mut width = LINE_WIDTH;
    loop {
        if rest.len() <= width {
            out.push_str(rest);
            out.push('\n');
            return;
        }
        let mut cut = width;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (head, tail) = rest.split_at(cut);
        out.push_str(head);
        out.push_str("\n ");
        rest = tail;
        // The leading space of a continuation line counts towards its width.
        width = LINE_WIDTH - 1;
    }
}

/// What [`Reader`] yields: a record, or a comment line between records (`# ` removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Comment(String),
    Entry(CacheEntry),
}

#[derive(Debug, thiserror::Error)]
pub enum LdifError {
    #[error("LDIF line {line}: {reason}")]
    Syntax { line: u64, reason: String },
    #[error("cannot read the LDIF: {0}")]
    Io(#[from] io::Error),
}

/// Reads back what [`write_entry`] writes (any RFC 2849 content records without `:<` URLs
/// or change records): unfolds lines, decodes base64, turns `listenerModule` lines into the
/// module list. Consecutive values of one attribute form one attribute.
///
/// It also keeps a CRC-32 of every physical line that is not part of a comment, newline
/// included ([`Reader::checksum`]), so a file that carries the CRC of its records in a
/// trailing comment (a listener backup) can be checked while it is read.
pub struct Reader<R> {
    input: R,
    line: u64,
    /// A physical line read ahead to see whether it continues the previous one.
    ahead: Option<String>,
    crc: crc32fast::Hasher,
}

impl<R: BufRead> Reader<R> {
    pub fn new(input: R) -> Reader<R> {
        Reader {
            input,
            line: 0,
            ahead: None,
            crc: crc32fast::Hasher::new(),
        }
    }

    /// CRC-32 of the non-comment lines read so far.
    pub fn checksum(&self) -> u32 {
        self.crc.clone().finalize()
    }

    /// The next comment or record; `None` at the end of the input.
    pub fn next_item(&mut self) -> Result<Option<Item>, LdifError> {
        let mut entry: Option<CacheEntry> = None;
        loop {
            let Some((logical, raw)) = self.logical_line()? else {
                return Ok(entry.map(Item::Entry));
            };
            if let Some(comment) = logical.strip_prefix('#') {
                if entry.is_none() {
                    let text = comment.strip_prefix(' ').unwrap_or(comment);
                    return Ok(Some(Item::Comment(text.to_owned())));
                }
                continue;
            }
            self.crc.update(raw.as_bytes());
            if logical.is_empty() {
                match entry {
                    Some(entry) => return Ok(Some(Item::Entry(entry))),
                    None => continue,
                }
            }
            let (name, value) = self.attribute(&logical)?;
            match entry.as_mut() {
                None if name.eq_ignore_ascii_case("dn") => {
                    let dn =
                        String::from_utf8(value).map_err(|_| self.error("the DN is not UTF-8"))?;
                    entry = Some(CacheEntry {
                        dn,
                        ..CacheEntry::default()
                    });
                }
                None => return Err(self.error(&format!("record starts with {name:?}, not dn"))),
                Some(entry) if name == MODULE_ATTRIBUTE => {
                    let module = String::from_utf8(value)
                        .map_err(|_| self.error("a module name is not UTF-8"))?;
                    entry.modules.push(module);
                }
                Some(entry) => match entry.attributes.last_mut() {
                    Some((last, values)) if *last == name => values.push(value),
                    _ => entry.attributes.push((name, vec![value])),
                },
            }
        }
    }

    fn error(&self, reason: &str) -> LdifError {
        LdifError::Syntax {
            line: self.line,
            reason: reason.to_owned(),
        }
    }

    /// Splits `name: value`, `name:: base64`; `name:< url` is refused.
    fn attribute(&self, line: &str) -> Result<(String, Vec<u8>), LdifError> {
        let Some((name, rest)) = line.split_once(':') else {
            return Err(self.error("no colon in the line"));
        };
        if name.is_empty() {
            return Err(self.error("empty attribute name"));
        }
        let value = if let Some(encoded) = rest.strip_prefix(':') {
            STANDARD
                .decode(encoded.trim_start_matches(' '))
                .map_err(|e| self.error(&format!("bad base64 value of {name}: {e}")))?
        } else if rest.starts_with('<') {
            return Err(self.error("URL values (:<) are not supported"));
        } else {
            rest.trim_start_matches(' ').as_bytes().to_vec()
        };
        Ok((name.to_owned(), value))
    }

    /// One physical line without its line end; `None` at the end.
    fn physical_line(&mut self) -> Result<Option<String>, LdifError> {
        if let Some(line) = self.ahead.take() {
            return Ok(Some(line));
        }
        let mut bytes = Vec::new();
        // One byte more than the limit: a line end after it is still accepted.
        if io::Read::take(&mut self.input, MAX_LINE + 1).read_until(b'\n', &mut bytes)? == 0 {
            return Ok(None);
        }
        self.line += 1;
        if bytes.last() != Some(&b'\n') && bytes.len() as u64 > MAX_LINE {
            return Err(self.error(&format!("the line is longer than {} MiB", MAX_LINE >> 20)));
        }
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| self.error("the line is not UTF-8"))
    }

    /// A line with its continuation lines joined, and its physical lines as read (each with
    /// a newline) for the checksum.
    fn logical_line(&mut self) -> Result<Option<(String, String)>, LdifError> {
        let Some(mut logical) = self.physical_line()? else {
            return Ok(None);
        };
        let mut raw = format!("{logical}\n");
        if logical.is_empty() {
            return Ok(Some((logical, raw)));
        }
        while let Some(next) = self.physical_line()? {
            match next.strip_prefix(' ') {
                Some(continued) => {
                    logical.push_str(continued);
                    raw.push_str(&next);
                    raw.push('\n');
                }
                None => {
                    self.ahead = Some(next);
                    break;
                }
            }
        }
        Ok(Some((logical, raw)))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_endless_line_is_an_error_not_an_allocation_without_bound() {
        let endless = io::BufReader::new(io::repeat(b'x'));
        let err = Reader::new(endless).next_item().unwrap_err();
        assert!(err.to_string().contains("longer than 16 MiB"), "{err}");
        // A line of exactly the limit is read.
        let limit = usize::try_from(MAX_LINE).unwrap();
        let mut text = format!("dn: {}\n", "x".repeat(limit - 4)).into_bytes();
        text.extend_from_slice(b"\n");
        let Some(Item::Entry(entry)) = Reader::new(&text[..]).next_item().unwrap() else {
            panic!("no entry");
        };
        assert_eq!(entry.dn.len(), limit - 4);
    }

    fn entry(attributes: Vec<(&str, Vec<&[u8]>)>, modules: &[&str]) -> CacheEntry {
        CacheEntry {
            dn: "cn=test,dc=example,dc=org".into(),
            attributes: attributes
                .into_iter()
                .map(|(n, vs)| (n.to_owned(), vs.into_iter().map(<[u8]>::to_vec).collect()))
                .collect(),
            modules: modules.iter().map(|m| (*m).to_owned()).collect(),
        }
    }

    fn ldif(e: &CacheEntry) -> String {
        let mut out = String::new();
        write_entry(&mut out, e);
        out
    }

    /// Reads one record back with [`Reader`], so the tests check that nothing is lost.
    pub(crate) fn parse(text: &str) -> CacheEntry {
        let mut reader = Reader::new(text.as_bytes());
        match reader.next_item().unwrap() {
            Some(Item::Entry(e)) => e,
            other => panic!("one entry expected, got {other:?}"),
        }
    }

    #[test]
    fn plain_values_and_modules() {
        let e = entry(
            vec![
                ("objectClass", vec![b"top", b"person"]),
                ("cn", vec![b"test"]),
                ("description", vec![b"a b  c"]),
            ],
            &["replication", "nfs-shares"],
        );
        assert_eq!(
            ldif(&e),
            "dn: cn=test,dc=example,dc=org\n\
             objectClass: top\n\
             objectClass: person\n\
             cn: test\n\
             description: a b  c\n\
             listenerModule: replication\n\
             listenerModule: nfs-shares\n\
             \n"
        );
    }

    #[test]
    fn empty_value_has_a_trailing_space() {
        let e = entry(vec![("description", vec![b""])], &[]);
        assert_eq!(ldif(&e), "dn: cn=test,dc=example,dc=org\ndescription: \n\n");
    }

    #[test]
    fn unsafe_starts_and_ends_are_base64() {
        let e = entry(
            vec![
                ("a", vec![b" lead"]),
                ("b", vec![b"trail "]),
                ("c", vec![b":colon"]),
                ("d", vec![b"<less"]),
                // Only the first byte is restricted: these are safe.
                ("e", vec![b"in:side<", b"x y"]),
            ],
            &[],
        );
        assert_eq!(
            ldif(&e),
            "dn: cn=test,dc=example,dc=org\n\
             a:: IGxlYWQ=\n\
             b:: dHJhaWwg\n\
             c:: OmNvbG9u\n\
             d:: PGxlc3M=\n\
             e: in:side<\n\
             e: x y\n\
             \n"
        );
    }

    #[test]
    fn non_ascii_and_binary_are_base64() {
        let e = entry(
            vec![
                ("sn", vec!["Bär".as_bytes()]),
                ("nul", vec![b"a\0b"]),
                ("lf", vec![b"a\nb"]),
                ("cr", vec![b"a\rb"]),
                ("bin", vec![&[0xff, 0x00, 0x0a]]),
                // DEL and other controls below 0x80 (except NUL, LF, CR) are safe.
                ("ctl", vec![b"a\x7f\x01\tb"]),
            ],
            &[],
        );
        assert_eq!(
            ldif(&e),
            "dn: cn=test,dc=example,dc=org\n\
             sn:: QsOkcg==\n\
             nul:: YQBi\n\
             lf:: YQpi\n\
             cr:: YQ1i\n\
             bin:: /wAK\n\
             ctl: a\x7f\x01\tb\n\
             \n"
        );
    }

    #[test]
    fn non_ascii_dn_is_base64() {
        let mut e = entry(vec![], &[]);
        e.dn = "cn=Bär".into();
        assert_eq!(ldif(&e), "dn:: Y249QsOkcg==\n\n");
    }

    #[test]
    fn long_values_fold_at_76_columns() {
        let value = "x".repeat(200);
        let e = entry(vec![("description", vec![value.as_bytes()])], &[]);
        let text = ldif(&e);
        let lines: Vec<&str> = text.lines().collect();
        // "description: " is 13 bytes, so the first line carries 63 value bytes, the
        // continuation lines 75 each: 63 + 75 + 62 = 200.
        assert_eq!(lines[1], format!("description: {}", "x".repeat(63)));
        assert_eq!(lines[2], format!(" {}", "x".repeat(75)));
        assert_eq!(lines[3], format!(" {}", "x".repeat(62)));
        assert_eq!(lines[4], "");
        assert_eq!(lines.len(), 5);
        assert!(text.lines().all(|l| l.len() <= LINE_WIDTH));
        assert_eq!(lines[1].len(), 76);
        assert_eq!(lines[2].len(), 76);
        assert_eq!(parse(&text), e);
    }

    #[test]
    fn exactly_76_bytes_is_not_folded() {
        let value = "y".repeat(LINE_WIDTH - "cn: ".len());
        let e = entry(vec![("cn", vec![value.as_bytes()])], &[]);
        let text = ldif(&e);
        assert_eq!(text.lines().nth(1).unwrap().len(), 76);
        assert_eq!(text.lines().count(), 3);
        let value = "y".repeat(LINE_WIDTH - "cn: ".len() + 1);
        let e = entry(vec![("cn", vec![value.as_bytes()])], &[]);
        assert_eq!(ldif(&e).lines().nth(2).unwrap(), " y");
    }

    #[test]
    fn long_base64_folds_too() {
        let value = vec![0xffu8; 120];
        let e = entry(vec![("jpegPhoto", vec![&value])], &[]);
        let text = ldif(&e);
        assert!(text.lines().all(|l| l.len() <= LINE_WIDTH), "{text}");
        assert!(text.lines().nth(2).unwrap().starts_with(' '));
        assert_eq!(parse(&text), e);
    }

    #[test]
    fn folding_never_splits_a_character_in_a_name() {
        let name = "ä".repeat(50);
        let e = entry(vec![(name.as_str(), vec![b"v"])], &[]);
        let text = ldif(&e);
        assert!(text.lines().all(|l| l.len() <= LINE_WIDTH));
        assert_eq!(parse(&text), e);
    }

    #[test]
    fn attribute_without_values_writes_nothing() {
        let e = entry(vec![("gone", vec![])], &["m"]);
        assert_eq!(
            ldif(&e),
            "dn: cn=test,dc=example,dc=org\nlistenerModule: m\n\n"
        );
    }

    #[test]
    fn safe_string_rule() {
        assert!(is_safe_string(b""));
        assert!(is_safe_string(b"abc def"));
        assert!(is_safe_string(b"a:b<c"));
        assert!(!is_safe_string(b" "));
        assert!(!is_safe_string(b":"));
        assert!(!is_safe_string(b"<"));
        assert!(!is_safe_string(b"a "));
        assert!(!is_safe_string(b"\0"));
        assert!(!is_safe_string("é".as_bytes()));
        assert!(!is_safe_string(&[0x80]));
    }

    #[test]
    fn reader_yields_comments_and_entries_and_checksums_only_records() {
        let mut text = String::from("# header\n# {\"a\": 1}\n");
        let first = entry(vec![("cn", vec![b"x"])], &["m"]);
        let mut second = entry(vec![("jpegPhoto", vec![&[0xff; 90]])], &[]);
        second.dn = "cn=Bär,dc=example,dc=org".into();
        let mut records = String::new();
        write_entry(&mut records, &first);
        write_entry(&mut records, &second);
        text.push_str(&records);
        text.push_str("# end\n");
        let mut reader = Reader::new(text.as_bytes());
        assert_eq!(
            reader.next_item().unwrap(),
            Some(Item::Comment("header".into()))
        );
        assert_eq!(
            reader.next_item().unwrap(),
            Some(Item::Comment("{\"a\": 1}".into()))
        );
        assert_eq!(reader.next_item().unwrap(), Some(Item::Entry(first)));
        assert_eq!(reader.next_item().unwrap(), Some(Item::Entry(second)));
        assert_eq!(reader.checksum(), crc32fast::hash(records.as_bytes()));
        assert_eq!(
            reader.next_item().unwrap(),
            Some(Item::Comment("end".into()))
        );
        assert_eq!(reader.next_item().unwrap(), None);
    }

    #[test]
    fn reader_accepts_a_last_record_without_blank_line_and_crlf() {
        let text = "dn: cn=a\r\ncn:  a\r\n b\r\nlistenerModule: m";
        let mut reader = Reader::new(text.as_bytes());
        let Some(Item::Entry(e)) = reader.next_item().unwrap() else {
            panic!()
        };
        assert_eq!(e.dn, "cn=a");
        assert_eq!(e.attributes, [("cn".to_owned(), vec![b"ab".to_vec()])]);
        assert_eq!(e.modules, ["m"]);
        assert_eq!(reader.next_item().unwrap(), None);
    }

    #[test]
    fn reader_reports_bad_lines_with_their_number() {
        for (text, line) in [
            ("cn: x\n", 1),
            ("dn: cn=a\nno colon\n", 2),
            ("dn: cn=a\ncn:: !!!\n", 2),
            ("dn: cn=a\ncn:< file:///etc/passwd\n", 2),
        ] {
            let err = Reader::new(text.as_bytes()).next_item().unwrap_err();
            assert!(
                matches!(err, LdifError::Syntax { line: l, .. } if l == line),
                "{text:?}: {err}"
            );
        }
    }

    fn attr_name() -> impl Strategy<Value = String> {
        // Real attribute names: a letter, then letters, digits and hyphens.
        "[a-zA-Z][a-zA-Z0-9-]{0,30}"
    }

    proptest! {
        #[test]
        fn lines_never_exceed_76_bytes_and_round_trip(
            dn in ".{0,200}",
            attributes in proptest::collection::vec(
                (attr_name(), proptest::collection::vec(
                    proptest::collection::vec(any::<u8>(), 0..300), 1..4)),
                0..6,
            ),
            modules in proptest::collection::vec("[ -~]{0,100}", 0..4),
        ) {
            // Consecutive equal names would merge in the reader; the writer keeps them apart
            // only through the entry's structure, so give every attribute its own name.
            let attributes: Vec<_> = attributes
                .into_iter()
                .enumerate()
                .map(|(i, (n, v))| (format!("{n}{i}"), v))
                .collect();
            let e = CacheEntry { dn, attributes, modules };
            let text = ldif(&e);
            for line in text.lines() {
                prop_assert!(line.len() <= LINE_WIDTH, "{line:?}");
            }
            prop_assert!(text.ends_with("\n\n"));
            prop_assert_eq!(parse(&text), e);
        }
    }
}
