//! A lenient syntax check for distinguished names (RFC 4514, plus the `;` separators and
//! quoted values of the older string form that OpenLDAP's `ldap_str2dn` still accepts).
//! Only used for the non-fatal "Invalid dn" report of `check`.

/// Whether `dn` is a syntactically valid DN; the empty DN is valid.
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
    use super::is_dn;

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
}
