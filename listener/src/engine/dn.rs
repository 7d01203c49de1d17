//! The little DN handling the change rules need: `same_dn`, the parent DN, and the first
//! RDN as (attribute, value bytes) pairs for the RDN replacement of moves (spec listener.md
//! §3.3.1). Like UCS, DNs are compared by lower-casing, not by schema rules.

use cache::dn_key;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
