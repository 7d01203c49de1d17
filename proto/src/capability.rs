//! Capabilities exchanged in the handshake (`Capabilities: <list>`).
//!
//! UCS documents `STARTTLS` only as an example and never implements or advertises anything.
//! This notifier offers `STARTTLS` when it has a certificate ([`crate::tls`]). Negotiation is
//! an intersection: nothing is sent unless the peer asked for it, so a UCS client, which asks
//! for nothing, still gets the empty list.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;

/// One capability token.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Capability {
    /// `STARTTLS` (exact spelling on the wire).
    StartTls,
    /// Any other token, kept verbatim.
    Other(String),
}

impl Capability {
    /// Wire spelling of [`Capability::StartTls`].
    pub const STARTTLS: &'static str = "STARTTLS";

    /// The capability for a token, mapping the known spelling to its variant so that
    /// `Other("STARTTLS")` never coexists with `StartTls`.
    pub fn from_token(token: &str) -> Capability {
        if token == Self::STARTTLS {
            Capability::StartTls
        } else {
            Capability::Other(token.to_owned())
        }
    }

    /// The wire spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Capability::StartTls => Self::STARTTLS,
            Capability::Other(s) => s,
        }
    }

    fn normalized(self) -> Capability {
        match self {
            Capability::Other(s) if s == Self::STARTTLS => Capability::StartTls,
            other => other,
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Tokens are separated by ASCII whitespace or commas.
fn is_separator(c: char) -> bool {
    c.is_ascii_whitespace() || c == ','
}

/// A set of capabilities, kept sorted and free of duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Capabilities(BTreeSet<Capability>);

impl Capabilities {
    /// The empty set, which is what a UCS server offers.
    pub fn new() -> Capabilities {
        Capabilities(BTreeSet::new())
    }

    /// Parses a list of space- or comma-separated tokens; an empty or blank list means none.
    pub fn parse(list: &str) -> Capabilities {
        list.split(is_separator)
            .filter(|t| !t.is_empty())
            .map(Capability::from_token)
            .collect()
    }

    /// Adds a capability. Returns `false` (and adds nothing) when it was already present or
    /// when its token is empty or contains a separator, since it could not survive a trip
    /// over the wire as one token.
    pub fn insert(&mut self, cap: Capability) -> bool {
        let cap = cap.normalized();
        let token = cap.as_str();
        if token.is_empty() || token.contains(is_separator) {
            return false;
        }
        self.0.insert(cap)
    }

    /// Whether no capability is present.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of capabilities.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether `cap` is present.
    pub fn contains(&self, cap: &Capability) -> bool {
        match cap {
            Capability::Other(s) if s == Capability::STARTTLS => {
                self.0.contains(&Capability::StartTls)
            }
            _ => self.0.contains(cap),
        }
    }

    /// The capabilities in sorted order.
    pub fn iter(&self) -> impl Iterator<Item = &Capability> {
        self.0.iter()
    }

    /// What to answer a peer that asked for `self` when we support `offered_by_server`: the
    /// intersection, so nothing is ever sent that the peer did not ask for.
    pub fn negotiate(&self, offered_by_server: &Capabilities) -> Capabilities {
        Capabilities(self.0.intersection(&offered_by_server.0).cloned().collect())
    }
}

impl FromIterator<Capability> for Capabilities {
    fn from_iter<I: IntoIterator<Item = Capability>>(iter: I) -> Self {
        let mut caps = Capabilities::new();
        for cap in iter {
            caps.insert(cap);
        }
        caps
    }
}

impl FromStr for Capabilities {
    type Err = Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Capabilities::parse(s))
    }
}

impl fmt::Display for Capabilities {
    /// Space-separated tokens; the empty string when there are none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, cap) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(cap.as_str())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_list() {
        for s in ["", " ", " , ", "\t"] {
            let caps = Capabilities::parse(s);
            assert!(caps.is_empty(), "{s:?}");
            assert_eq!(caps.to_string(), "");
        }
    }

    #[test]
    fn parses_spaces_and_commas_sorted_deduped() {
        let caps = Capabilities::parse("ZLIB,STARTTLS  FOO, ZLIB");
        assert_eq!(caps.len(), 3);
        assert!(caps.contains(&Capability::StartTls));
        assert!(caps.contains(&Capability::Other("STARTTLS".into())));
        assert!(caps.contains(&Capability::Other("FOO".into())));
        assert!(!caps.contains(&Capability::Other("starttls".into())));
        assert_eq!(caps.to_string(), "STARTTLS FOO ZLIB");
        assert_eq!(Capabilities::parse(&caps.to_string()), caps);
    }

    #[test]
    fn starttls_is_case_sensitive() {
        let caps = Capabilities::parse("starttls");
        assert!(!caps.contains(&Capability::StartTls));
        assert_eq!(caps.to_string(), "starttls");
    }

    #[test]
    fn negotiate_is_intersection() {
        let asked = Capabilities::parse("STARTTLS FOO");
        assert!(asked.negotiate(&Capabilities::new()).is_empty());
        let offered = Capabilities::parse("STARTTLS BAR");
        assert_eq!(asked.negotiate(&offered).to_string(), "STARTTLS");
        assert!(Capabilities::new().negotiate(&offered).is_empty());
    }

    #[test]
    fn insert_normalises_and_rejects_unsendable_tokens() {
        let mut caps = Capabilities::new();
        assert!(caps.insert(Capability::Other("STARTTLS".into())));
        assert!(!caps.insert(Capability::StartTls));
        assert!(!caps.insert(Capability::Other(String::new())));
        assert!(!caps.insert(Capability::Other("A B".into())));
        assert!(!caps.insert(Capability::Other("A,B".into())));
        assert!(!caps.insert(Capability::Other("A\nB".into())));
        assert_eq!(caps.iter().collect::<Vec<_>>(), [&Capability::StartTls]);
        assert_eq!("STARTTLS".parse::<Capabilities>(), Ok(caps));
    }
}
