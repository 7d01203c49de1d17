//! Shared by the decoder's tests and benchmark: LDAP message frames as slapd sends them,
//! turned into what ldap3's codec hands to our decoders, and the comparison with ldap3's own
//! entry decoding.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use ldap::RawEntry;
use ldap3::ResultEntry;
use ldap3::asn1::{PL, StructureTag, TagClass, parse_tag};
use ldap3::controls::{Control, RawControl};

/// The committed corpus: frames captured from slapd (`slapd-*.ber`) and malformed cases.
pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

/// Every file of the corpus, sorted by name.
pub fn corpus() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

/// Length of the first BER element of `buf`, if `buf` holds all of it.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    let first = *buf.get(1)?;
    let (header, len) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let len = buf
            .get(2..2 + n)?
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (2 + n, len)
    };
    let total = header.checked_add(len)?;
    (buf.len() >= total).then_some(total)
}

/// An LDAPMessage frame as ldap3's codec hands it on: the protocol operation with the
/// message's controls. `None` where the codec would refuse the frame.
pub fn message(frame: &[u8]) -> Option<ResultEntry> {
    let (_, tag) = parse_tag(frame).ok()?;
    let PL::C(mut parts) = tag.payload else {
        return None;
    };
    if parts.len() < 2 {
        return None;
    }
    let controls = if parts.len() > 2 {
        let last = parts.pop()?;
        match (last.class, last.id, last.payload) {
            (TagClass::Context, 0, PL::C(list)) => list.into_iter().filter_map(control).collect(),
            _ => return None,
        }
    } else {
        Vec::new()
    };
    let op = parts.pop()?;
    let mut entry = ResultEntry::new(op);
    entry.1 = controls;
    Some(entry)
}

fn control(tag: StructureTag) -> Option<Control> {
    let PL::C(fields) = tag.payload else {
        return None;
    };
    let mut fields = fields.into_iter();
    let PL::P(oid) = fields.next()?.payload else {
        return None;
    };
    let mut raw = RawControl {
        ctype: String::from_utf8(oid).ok()?,
        crit: false,
        val: None,
    };
    for field in fields {
        match (field.id, field.payload) {
            (1, PL::P(b)) => raw.crit = b.first().is_some_and(|&b| b != 0),
            (4, PL::P(b)) => raw.val = Some(b),
            _ => {}
        }
    }
    Some(Control(None, raw))
}

/// Whether `raw` holds what ldap3's `SearchEntry::construct` makes of the same message.
/// ldap3 moves an attribute with any non-UTF-8 value to `bin_attrs` and puts its binary
/// values first; `raw` keeps the server's order, so those compare as multisets.
pub fn same_as_ldap3(raw: &RawEntry, ldap3: &ldap3::SearchEntry) -> bool {
    let matches = |name: &String, values: &Vec<Vec<u8>>| match ldap3.attrs.get(name) {
        Some(text) => values
            .iter()
            .map(Vec::as_slice)
            .eq(text.iter().map(String::as_bytes)),
        None => {
            let mut ours = values.clone();
            let mut theirs = ldap3.bin_attrs.get(name).cloned().unwrap_or_default();
            ours.sort();
            theirs.sort();
            ours == theirs
        }
    };
    raw.dn == ldap3.dn
        && raw.attrs.len() == ldap3.attrs.len() + ldap3.bin_attrs.len()
        && raw.attrs.iter().all(|(name, values)| matches(name, values))
}
