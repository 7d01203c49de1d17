//! DN handling, once for every binary: the cache key of a DN (UCS's lower-casing), `same_dn`,
//! the parent DN, the first RDN as (attribute, value bytes) pairs for the RDN replacement of
//! moves (spec listener.md §3.3.1), and a lenient syntax check. Like UCS, DNs are compared
//! by lower-casing, not by schema rules: escaping, spacing and attribute type aliases stay
//! as LDAP spelled them.

/// The cache key of `dn`: each code point replaced by its simple (one code point) lower-case
/// mapping, as ICU's `u_tolower` does, and nothing else.
///
/// Rust's `char::to_lowercase` implements the *full* mapping, which differs from the simple
/// one only where it expands to several code points. The Unicode data has exactly one such
/// lower-case expansion: U+0130 (`İ`) → `i` + U+0307. Its simple mapping, and so `u_tolower`'s
/// answer, is plain `i`. Any other multi-char result (none today, but a future Unicode version
/// could add one) keeps the original code point, which is what a simple mapping without an
/// entry does.
pub fn dn_key(dn: &str) -> String {
    // DNs are ASCII almost always; this path avoids per-char Unicode table lookups.
    if dn.is_ascii() {
        return dn.to_ascii_lowercase();
    }
    dn.chars().map(simple_lowercase).collect()
}

fn simple_lowercase(c: char) -> char {
    if c.is_ascii() {
        return c.to_ascii_lowercase();
    }
    if c == '\u{130}' {
        // UnicodeData.txt's simple lowercase mapping for U+0130; see dn_key.
        return 'i';
    }
    let mut lower = c.to_lowercase();
    match (lower.next(), lower.next()) {
        (Some(one), None) => one,
        _ => c,
    }
}

/// UCS's `same_dn`: both lower-cased (the cache's key normalisation), then compared.
pub fn same_dn(a: &str, b: &str) -> bool {
    a == b || dn_key(a) == dn_key(b)
}

/// Byte offset of the first unescaped `,` (the end of the first RDN).
fn first_rdn_end(dn: &str) -> Option<usize> {
    let bytes = dn.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b',' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// The DN without its first RDN; `None` for a single-RDN DN.
pub fn parent(dn: &str) -> Option<&str> {
    first_rdn_end(dn).map(|end| dn[end + 1..].trim_start())
}

/// The first RDN as written.
pub fn first_rdn(dn: &str) -> &str {
    first_rdn_end(dn).map_or(dn, |end| &dn[..end])
}

/// Number of RDNs of `dn` (0 for the empty DN): sorting by it puts every entry of a
/// subtree after its parent.
pub fn depth(dn: &str) -> usize {
    if dn.is_empty() {
        return 0;
    }
    let mut rest = dn;
    let mut count = 1;
    while let Some(end) = first_rdn_end(rest) {
        rest = &rest[end + 1..];
        count += 1;
    }
    count
}

/// Whether `dn` lies strictly below `base` (compared like [`same_dn`]).
pub fn is_below(dn: &str, base: &str) -> bool {
    let (dn, base) = (dn_key(dn), dn_key(base));
    if dn.len() <= base.len() + 1 || !dn.ends_with(&base) {
        return false;
    }
    let comma = dn.len() - base.len() - 1;
    // The comma must separate RDNs: not escaped by an odd run of backslashes.
    let backslashes = dn.as_bytes()[..comma]
        .iter()
        .rev()
        .take_while(|&&c| c == b'\\')
        .count();
    dn.as_bytes()[comma] == b',' && backslashes % 2 == 0
}

/// `dn` with its ancestor `old_base` replaced by `new_base`: the RDNs below the base keep
/// their spelling, the base is spelled as `new_base`. `None` if `dn` is not below
/// `old_base`.
pub fn rebase(dn: &str, old_base: &str, new_base: &str) -> Option<String> {
    if !is_below(dn, old_base) {
        return None;
    }
    // Counted in RDNs rather than bytes: lower-casing may change the byte length.
    let keep = depth(dn) - depth(old_base);
    let mut end = 0;
    for _ in 0..keep {
        end += first_rdn_end(&dn[end..])? + 1;
    }
    Some(format!("{}{new_base}", &dn[..end]))
}

/// One attribute-value assertion of an RDN, the value unescaped to its bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ava {
    pub attr: String,
    pub value: Vec<u8>,
}

/// The AVAs of the first RDN (several for a multi-valued `cn=a+uid=b`), or `None` if it is
/// not of the form `attr=value[+attr=value…]`.
pub fn first_rdn_avas(dn: &str) -> Option<Vec<Ava>> {
    let rdn = first_rdn(dn);
    let mut avas = Vec::new();
    for part in split_unescaped(rdn, b'+') {
        let (attr, value) = part.split_once('=')?;
        let attr = attr.trim();
        if attr.is_empty() {
            return None;
        }
        avas.push(Ava {
            attr: attr.to_owned(),
            value: unescape_value(value)?,
        });
    }
    Some(avas)
}

/// Whether the first RDNs differ: attribute types and value bytes exactly, the order of a
/// multi-valued RDN ignored (spec §3.3.1 step 2).
pub fn rdn_differs(a: &[Ava], b: &[Ava]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort();
    b.sort();
    a != b
}

fn split_unescaped(s: &str, sep: u8) -> Vec<&str> {
    let bytes = s.as_bytes();
    let mut parts = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            c if c == sep => {
                parts.push(&s[start..i]);
                start = i + 1;
                i += 1;
            }
            _ => i += 1,
        }
    }
    parts.push(&s[start.min(s.len())..]);
    parts
}

/// RFC 4514 value unescaping: `\XX` hex pairs and `\<char>`; `None` on a dangling escape.
fn unescape_value(value: &str) -> Option<Vec<u8>> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(*bytes.get(i + 1)?);
                i += 2;
            }
        }
    }
    Some(out)
}

/// Whether `dn` is a syntactically valid DN (RFC 4514, plus the `;` separators and quoted
/// values of the older string form that OpenLDAP's `ldap_str2dn` still accepts); the empty
/// DN is valid. A lenient check for reports, not a parser.
pub fn is_dn(dn: &str) -> bool {
    let b = dn.as_bytes();
    if b.iter().all(|&c| c == b' ') {
        return b.is_empty();
    }
    let mut i = 0;
    loop {
        let Some(next) = ava(b, i) else {
            return false;
        };
        i = skip_spaces(b, next);
        match b.get(i) {
            None => return true,
            Some(b',' | b';' | b'+') => i += 1,
            Some(_) => return false,
        }
    }
}

fn skip_spaces(b: &[u8], mut i: usize) -> usize {
    while b.get(i) == Some(&b' ') {
        i += 1;
    }
    i
}

/// Parses `type=value` at `i`; returns the index after the value.
fn ava(b: &[u8], i: usize) -> Option<usize> {
    let mut i = skip_spaces(b, i);
    let start = i;
    match b.get(i) {
        Some(c) if c.is_ascii_alphabetic() => {
            while b
                .get(i)
                .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'-')
            {
                i += 1;
            }
        }
        Some(c) if c.is_ascii_digit() => {
            // numericoid: digits separated by single dots
            while let Some(c) = b.get(i) {
                let dot_then_digit = *c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit);
                if !(c.is_ascii_digit() || dot_then_digit) {
                    break;
                }
                i += 1;
            }
        }
        _ => return None,
    }
    if i == start {
        return None;
    }
    i = skip_spaces(b, i);
    if b.get(i) != Some(&b'=') {
        return None;
    }
    i = skip_spaces(b, i + 1);
    value(b, i)
}

fn is_hex(c: Option<&u8>) -> bool {
    c.is_some_and(u8::is_ascii_hexdigit)
}

fn value(b: &[u8], mut i: usize) -> Option<usize> {
    match b.get(i) {
        Some(b'#') => {
            i += 1;
            let start = i;
            while is_hex(b.get(i)) && is_hex(b.get(i + 1)) {
                i += 2;
            }
            (i > start && !is_hex(b.get(i))).then_some(i)
        }
        Some(b'"') => {
            i += 1;
            loop {
                match b.get(i)? {
                    b'"' => return Some(i + 1),
                    b'\\' => i += 2,
                    0 => return None,
                    _ => i += 1,
                }
            }
        }
        _ => {
            while let Some(&c) = b.get(i) {
                match c {
                    b',' | b';' | b'+' => break,
                    b'\\' => {
                        let next = b.get(i + 1)?;
                        if is_hex(Some(next)) && is_hex(b.get(i + 2)) {
                            i += 3;
                        } else if b" \"#+,;<=>\\".contains(next) {
                            i += 2;
                        } else {
                            return None;
                        }
                    }
                    b'"' | b'<' | b'>' | 0 => return None,
                    _ => i += 1,
                }
            }
            Some(i)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_is_lower_cased() {
        assert_eq!(
            dn_key("CN=Admin,CN=Users,DC=Example,DC=COM"),
            "cn=admin,cn=users,dc=example,dc=com"
        );
        assert_eq!(dn_key(""), "");
    }

    #[test]
    fn non_ascii_letters_use_the_simple_mapping() {
        assert_eq!(dn_key("uid=Ärger,ou=Bücher"), "uid=ärger,ou=bücher");
        assert_eq!(dn_key("cn=ΣΟΦΙΑ"), "cn=σοφια");
        // Cyrillic and full-width Latin have one-char mappings too.
        assert_eq!(dn_key("cn=ЖУК"), "cn=жук");
        assert_eq!(dn_key("cn=ＡＢ"), "cn=ａｂ");
    }

    #[test]
    fn sharp_s_and_lower_case_letters_stay() {
        // ß is already lower case; its upper-case expansion "SS" is irrelevant here.
        assert_eq!(dn_key("cn=Straße"), "cn=straße");
        // Capital sharp s (U+1E9E) has the one-char lower case ß.
        assert_eq!(dn_key("cn=STRAẞE"), "cn=straße");
    }

    #[test]
    fn dotted_capital_i_becomes_plain_i_like_u_tolower() {
        // Full lower-casing would give "i\u{307}" (two code points); u_tolower gives 'i'.
        assert_eq!("İ".to_lowercase(), "i\u{307}");
        assert_eq!(dn_key("cn=İstanbul"), "cn=istanbul");
        // The dotless ı and the plain I are unaffected by Turkish rules: no locale tailoring.
        assert_eq!(dn_key("cn=IıI"), "cn=iıi");
    }

    #[test]
    fn title_case_digraphs_map_to_one_char() {
        // U+01C5 (Dž) lower-cases to the single code point U+01C6 (dž).
        assert_eq!(dn_key("cn=\u{1C5}"), "cn=\u{1C6}");
    }

    #[test]
    fn escaping_is_not_normalised() {
        // Only the case changes: escapes stay escapes, hex stays hex, spaces stay.
        assert_eq!(
            dn_key(r"CN=Foo\,Bar+UID=X\2CY, OU=A\ B\0D,DC=De"),
            r"cn=foo\,bar+uid=x\2cy, ou=a\ b\0d,dc=de"
        );
        assert_ne!(dn_key(r"cn=a\,b"), dn_key(r"cn=a\2cb"));
    }

    #[test]
    fn key_is_idempotent() {
        for dn in ["CN=İ,DC=Ä", "cn=ǅ", "uid=ẞ", "cn=Σ"] {
            let once = dn_key(dn);
            assert_eq!(dn_key(&once), once, "{dn}");
        }
    }

    #[test]
    fn parents_respect_escaped_commas() {
        assert_eq!(parent("cn=a,dc=x"), Some("dc=x"));
        assert_eq!(parent("cn=J\\, Doe,ou=p,dc=x"), Some("ou=p,dc=x"));
        assert_eq!(parent("cn=J\\2C Doe,dc=x"), Some("dc=x"));
        assert_eq!(parent("dc=x"), None);
        assert_eq!(first_rdn("cn=J\\, Doe,ou=p"), "cn=J\\, Doe");
    }

    #[test]
    fn rdn_values_are_unescaped_bytes() {
        let avas = first_rdn_avas("cn=J\\2C M\\C3\\BCller+uid=jm,dc=x").unwrap();
        assert_eq!(
            avas,
            [
                Ava {
                    attr: "cn".into(),
                    value: "J, Müller".as_bytes().to_vec()
                },
                Ava {
                    attr: "uid".into(),
                    value: b"jm".to_vec()
                }
            ]
        );
        assert_eq!(
            first_rdn_avas("cn=Jürgen\\+x,dc=x").unwrap()[0].value,
            "Jürgen+x".as_bytes()
        );
        assert_eq!(first_rdn_avas("garbage,dc=x"), None);
        assert_eq!(first_rdn_avas("cn=trailing\\"), None);
    }

    #[test]
    fn rdn_comparison_ignores_order_but_not_case() {
        let a = first_rdn_avas("cn=a+uid=b,dc=x").unwrap();
        let b = first_rdn_avas("uid=b+cn=a,dc=y").unwrap();
        let c = first_rdn_avas("cn=A+uid=b,dc=x").unwrap();
        assert!(!rdn_differs(&a, &b));
        assert!(rdn_differs(&a, &c));
    }

    #[test]
    fn same_dn_lower_cases_unicode() {
        assert!(same_dn("CN=Ärger,DC=X", "cn=ärger,dc=x"));
        assert!(!same_dn("cn=a,dc=x", "cn=b,dc=x"));
    }

    #[test]
    fn valid() {
        for dn in [
            "",
            "dc=example,dc=com",
            "uid=alice,cn=users,dc=example,dc=com",
            "cn=John Smith,ou=Sales Team,dc=x",
            "cn=a+sn=b,dc=x",
            "cn=a\\,b,dc=x",
            "cn=\\23x,dc=x",
            "cn=Jürgen Müller,dc=x",
            "2.5.4.3=x,dc=y",
            "cn=#0403414243,dc=x",
            "cn=a, dc=x",
            "cn=a;dc=x",
            "cn=\"a,b\",dc=x",
            "cn=,dc=x",
            "cn=a=b,dc=x",
        ] {
            assert!(is_dn(dn), "{dn}");
        }
    }

    #[test]
    fn invalid() {
        for dn in [
            "dc=example,",
            "example",
            "=x",
            "dc=x,,dc=y",
            "cn=a\\q",
            "cn=a<b",
            "1cn=x",
            "cn=#zz",
            "cn=\"open",
            " ",
            "cn=a\0",
        ] {
            assert!(!is_dn(dn), "{dn:?}");
        }
    }

    #[test]
    fn rebase_replaces_the_ancestor_and_keeps_the_relative_part() {
        assert_eq!(depth(""), 0);
        assert_eq!(depth("cn=a\\,b,ou=x,dc=y"), 3);
        assert!(is_below("uid=k,OU=C1,dc=x", "ou=c1,dc=x"));
        assert!(!is_below("ou=c1,dc=x", "ou=c1,dc=x"));
        assert!(!is_below("uid=k,xou=c1,dc=x", "ou=c1,dc=x"));
        // An escaped comma is no RDN boundary.
        assert!(!is_below("uid=k\\,ou=c1,dc=x", "ou=c1,dc=x"));
        assert!(!is_below("a=1,b=2\\,ou=c1,dc=x", "ou=c1,dc=x"));
        assert!(is_below("a=1,b=2\\\\,ou=c1,dc=x", "ou=c1,dc=x"));
        assert_eq!(
            rebase("cn=A\\,b,uid=K,OU=C1,dc=x", "ou=c1,dc=x", "ou=C2,ou=p,dc=x").as_deref(),
            Some("cn=A\\,b,uid=K,ou=C2,ou=p,dc=x")
        );
        assert_eq!(rebase("uid=k,ou=c9,dc=x", "ou=c1,dc=x", "ou=c2,dc=x"), None);
    }
}
