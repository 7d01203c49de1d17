//! The cache key of a DN.
//!
//! UCS lower-cases DNs code point by code point with ICU's `u_tolower` (spec listener.md
//! §3.1, §6.2) and does no schema-aware normalisation: escaping, spacing and attribute
//! type aliases stay as LDAP spelled them. Two DNs are "the same" (`same_dn`) exactly when
//! their keys are equal, so the listener can compare keys instead of re-implementing this.

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
}
