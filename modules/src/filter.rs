//! The UCS listener filter matcher: decides, per object, whether a module is called
//! (spec listener.md §3.4, against `new` only) and which objects `listener/cache/filter` keeps
//! out of the cache (§6.3).
//!
//! This is **not** an RFC 4515 matcher. Existing listener modules were written against the C
//! matcher of the UCS listener (must-match item 8), so this one reproduces its behaviour,
//! quirks included (§5). The tables below are the complete semantics; `(…)` is the span
//! being evaluated, results are C's `0` ([`Tri::False`]), `1` ([`Tri::True`]) and `−1`
//! ([`Tri::Error`]).
//!
//! | input | result |
//! |---|---|
//! | the filter text | is read as a C string: everything from the first NUL on is ignored |
//! | empty text | −1 |
//! | span not starting with `(` or not ending with `)` (also leading/trailing whitespace) | −1 |
//! | sub-filter nested deeper than [`MAX_DEPTH`] levels (the whole filter is level 1) | −1, without looking at it (UCS has no bound; this keeps the stack bounded) |
//! | `(&…)`, `(\|…)`, `(!…)` whose operator is not followed by `(`, or whose last sub-filter does not end right before the closing `)` (`(&)`, `(&x)`, `(& (a=b))`) | −1 |
//! | sub-filters of `&`, `\|`, `!` | found by counting `(` and `)` between the operator and the closing `)`, no escape handling: a sub-filter is the text from a `(` at depth 0 to the `)` that brings the depth back to 0. Text at depth 0 between sub-filters is ignored; a surplus `)` drives the depth negative (a following `(` then only brings it back to 0 and does not start a sub-filter); a sub-filter that is still open at the end is dropped |
//! | `&` | 0 at the first sub-filter that is 0 (later ones are not evaluated); otherwise 1 (−1 counts as true; no sub-filters found ⇒ 1) |
//! | `\|` | 1 at the first sub-filter that is not 0 (−1 counts as true); otherwise 0 (no sub-filters found ⇒ 0) |
//! | `!` | only the **first** sub-filter: 1 if it is 0, else 0 (so −1 ⇒ 0); no complete sub-filter found ⇒ −1 (our decision; the spec is silent) |
//! | simple item | splits at the first `=` from the second character after `(` on (an `=` directly after `(` never splits): `attr` is the text between `(` and that `=`, `value` the text after it up to the final `)`. No such `=` (`(abc)`, `()`, `(=x)`) ⇒ −1 (our reading of the spec: `(=x)` has no `=` that may split). `(==x)` is attribute `=` with value `x` |
//! | `~=`, `>=`, `<=` (the character before the splitting `=`) | −1 (also for `(~=x)`) |
//! | attribute lookup | exact, case-sensitive name comparison with the names as stored; absent ⇒ 0. No options or schema: `cn;lang-de`, `cn:dn:` and ` cn` are names like any other |
//! | value `*` alone | presence: 1 if the attribute is stored (even with no values) |
//! | any other value | 1 if at least one stored value matches, else 0 (an attribute with no values ⇒ 0) |
//!
//! A stored value matches a filter value `v` (both as C strings: a stored value is compared
//! only up to its first NUL byte; a filter value cannot contain NUL, see above) if
//! - it equals `v` byte for byte (case-sensitive, no escape processing: `\2a` is the three
//!   characters `\`, `2`, `a`; no matching rules), or
//! - `v` has a leading and/or trailing `*` (with `v` ≠ `*`): let `core` be `v` without them
//!   (inner `*` are literal characters) and `p` the **first** occurrence of `core` in the
//!   stored value (`strstr`; an empty core occurs at 0; no occurrence ⇒ no match). It matches
//!   iff (leading `*` or `p` = 0) and (trailing `*` or the stored value from `p` on equals
//!   `core`). So `ab*` is a prefix and `*ab*` a substring match, but `*ab` matches only if
//!   the first occurrence of `ab` is at the end: `*ab` does not match `abab`.
//!
//! At top level an object matches unless the result is 0: a malformed or unsupported filter
//! (−1) matches **every** object. [`Filter::warnings`] lists such problems for a warning at
//! module load; evaluation never depends on them.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::BuildHasher;

/// Deepest nesting level that is evaluated; the whole filter is level 1, each `&`, `|`, `!`
/// adds one. A sub-filter below level `MAX_DEPTH` evaluates to −1 without being parsed, so
/// no input can exhaust the stack. Real module filters nest a handful of levels.
pub(crate) const MAX_DEPTH: usize = 256;

/// What a filter is evaluated against: attribute name → values (exact bytes), as the cache or
/// LDAP gave them.
///
/// Implementations must compare attribute names exactly and case-sensitively: the UCS matcher
/// compares names as stored (`objectClass` is not `objectclass`), unlike the
/// case-insensitive lookup elsewhere in the listener.
pub trait AttributeSource {
    /// The values of the attribute named exactly `attr`, or `None` if there is none.
    fn values(&self, attr: &str) -> Option<&[Vec<u8>]>;
}

/// Attributes in server order (the cache's representation). With duplicate names the first
/// one wins.
impl AttributeSource for [(String, Vec<Vec<u8>>)] {
    fn values(&self, attr: &str) -> Option<&[Vec<u8>]> {
        self.iter()
            .find(|(name, _)| name == attr)
            .map(|(_, values)| values.as_slice())
    }
}

impl AttributeSource for Vec<(String, Vec<Vec<u8>>)> {
    fn values(&self, attr: &str) -> Option<&[Vec<u8>]> {
        self.as_slice().values(attr)
    }
}

impl AttributeSource for BTreeMap<String, Vec<Vec<u8>>> {
    fn values(&self, attr: &str) -> Option<&[Vec<u8>]> {
        self.get(attr).map(Vec::as_slice)
    }
}

impl<S: BuildHasher> AttributeSource for HashMap<String, Vec<Vec<u8>>, S> {
    fn values(&self, attr: &str) -> Option<&[Vec<u8>]> {
        self.get(attr).map(Vec::as_slice)
    }
}

impl<T: AttributeSource + ?Sized> AttributeSource for &T {
    fn values(&self, attr: &str) -> Option<&[Vec<u8>]> {
        (**self).values(attr)
    }
}

/// The three results of the C matcher: `0`, `1` and `−1` (malformed or unsupported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tri {
    False,
    True,
    Error,
}

impl Tri {
    /// The C return value: 0, 1 or −1.
    pub(crate) fn as_c(self) -> i32 {
        match self {
            Tri::False => 0,
            Tri::True => 1,
            Tri::Error => -1,
        }
    }

    /// The top-level decision: anything but 0 is a match (−1 included).
    pub(crate) fn is_match(self) -> bool {
        self != Tri::False
    }

    fn from_bool(b: bool) -> Tri {
        if b { Tri::True } else { Tri::False }
    }
}

impl fmt::Display for Tri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_c())
    }
}

/// A module filter (or the filter part of `listener/cache/filter`), parsed once and evaluated
/// per object with the exact UCS semantics described in the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// The text as given (including anything after a NUL, which evaluation ignores).
    text: String,
    root: Node,
    warnings: Vec<String>,
}

impl Filter {
    /// Parses `text`. Never fails: a malformed filter is kept and evaluates as in UCS (−1,
    /// i.e. a match at top level); [`Filter::warnings`] says what is wrong with it.
    pub fn new(text: &str) -> Filter {
        let c_text = c_str(text);
        let mut compiler = Compiler {
            text: c_text,
            warnings: Vec::new(),
        };
        if c_text.len() != text.len() {
            compiler.warn(format!(
                "filter {} contains a NUL character; UCS ignores everything from it on",
                shorten(text)
            ));
        }
        let root = match c_text.len().checked_sub(1) {
            Some(last) => compiler.compile(0, last, 1),
            None => {
                compiler.warn(
                    "the filter is empty; it evaluates to -1, which matches every object"
                        .to_owned(),
                );
                Node::Error
            }
        };
        Filter {
            text: text.to_owned(),
            root,
            warnings: compiler.warnings,
        }
    }

    /// Whether the module is called for (or the cache skips) an object with these attributes:
    /// the result is not 0, so −1 (malformed or unsupported) counts as a match.
    pub fn matches(&self, entry: &(impl AttributeSource + ?Sized)) -> bool {
        self.evaluate(entry).is_match()
    }

    /// The C matcher's result: 0, 1 or −1.
    pub(crate) fn evaluate(&self, entry: &(impl AttributeSource + ?Sized)) -> Tri {
        self.root.evaluate(entry)
    }

    /// The filter text as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Problems an operator should hear about (malformed parts, unsupported operators,
    /// wildcards and escapes that UCS takes literally, `!` with several sub-filters, …).
    /// Evaluation still follows UCS; this is for a warning when the module is loaded. Empty
    /// for the usual well-formed equality/presence filters.
    pub fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `listener/cache/filter`: objects below `ldap/base` (subtree) that match the filter are not
/// written to the cache (spec listener.md §6.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheFilter {
    filter: Filter,
    /// `ldap/base` as a C string (up to the first NUL).
    base: String,
}

impl CacheFilter {
    pub fn new(filter: &str, base: &str) -> CacheFilter {
        CacheFilter {
            filter: Filter::new(filter),
            base: c_str(base).to_owned(),
        }
    }

    /// Whether the object must be kept out of the cache: its DN ends with the base
    /// (byte-exact and case-sensitive, as UCS compares it, so `DC=example` is not below
    /// `dc=example`; no check for a `,` before the suffix) and the filter matches. A
    /// malformed filter (−1) therefore excludes every object below the base, as in UCS.
    pub fn excludes(&self, dn: &str, entry: &(impl AttributeSource + ?Sized)) -> bool {
        self.in_scope(dn) && self.filter.matches(entry)
    }

    /// The base/subtree part alone: `dn` (as a C string) ends with the base.
    pub(crate) fn in_scope(&self, dn: &str) -> bool {
        c_str(dn).ends_with(self.base.as_str())
    }

    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    pub fn base(&self) -> &str {
        &self.base
    }
}

/// The parsed filter. Parsing is a pure function of the text, so evaluating this tree gives
/// the same results as the C code, which re-scans the text on every call.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    /// −1: malformed, unsupported or too deep.
    Error,
    And(Vec<Node>),
    Or(Vec<Node>),
    /// The first sub-filter only.
    Not(Box<Node>),
    /// `(attr=*)`.
    Present(String),
    Value(ValuePattern),
}

impl Node {
    fn evaluate<S: AttributeSource + ?Sized>(&self, entry: &S) -> Tri {
        match self {
            Node::Error => Tri::Error,
            Node::And(children) => {
                // −1 counts as true: only a definite 0 makes the conjunction false.
                let any_false = children.iter().any(|c| c.evaluate(entry) == Tri::False);
                Tri::from_bool(!any_false)
            }
            Node::Or(children) => {
                let any_true = children.iter().any(|c| c.evaluate(entry) != Tri::False);
                Tri::from_bool(any_true)
            }
            Node::Not(child) => Tri::from_bool(child.evaluate(entry) == Tri::False),
            Node::Present(attr) => Tri::from_bool(entry.values(attr).is_some()),
            Node::Value(pattern) => match entry.values(&pattern.attr) {
                Some(values) => Tri::from_bool(values.iter().any(|v| pattern.matches(v))),
                None => Tri::False,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ValuePattern {
    attr: String,
    /// The whole filter value, for the exact comparison.
    value: Vec<u8>,
    /// `value` without its leading/trailing `*`; only used if one of them is set.
    core: Vec<u8>,
    leading: bool,
    trailing: bool,
}

impl ValuePattern {
    fn new(attr: &str, value: &str) -> ValuePattern {
        let bytes = value.as_bytes();
        // Callers handle the lone `*` (presence), so a set flag implies len >= 2 and the two
        // stars are different characters.
        let leading = bytes.len() >= 2 && bytes.first() == Some(&b'*');
        let trailing = bytes.len() >= 2 && bytes.last() == Some(&b'*');
        let start = usize::from(leading);
        let end = bytes.len() - usize::from(trailing);
        ValuePattern {
            attr: attr.to_owned(),
            value: bytes.to_vec(),
            core: bytes.get(start..end).unwrap_or_default().to_vec(),
            leading,
            trailing,
        }
    }

    /// One stored value against the pattern, with C string semantics (`strcmp`, `strstr`).
    fn matches(&self, stored: &[u8]) -> bool {
        let stored = c_bytes(stored);
        if stored == self.value.as_slice() {
            return true;
        }
        if !self.leading && !self.trailing {
            return false;
        }
        let Some(pos) = find(stored, &self.core) else {
            return false;
        };
        (self.leading || pos == 0)
            && (self.trailing || stored.get(pos..) == Some(self.core.as_slice()))
    }
}

/// `strstr`: the first occurrence of `needle`; an empty needle occurs at 0.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// What C sees of a string: the part before the first NUL.
fn c_str(s: &str) -> &str {
    s.split('\0').next().unwrap_or_default()
}

fn c_bytes(b: &[u8]) -> &[u8] {
    b.split(|&c| c == 0).next().unwrap_or_default()
}

/// A span for a warning message, quoted and cut to a readable length.
fn shorten(s: &str) -> String {
    const MAX_CHARS: usize = 80;
    if s.chars().count() <= MAX_CHARS {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX_CHARS).collect();
        format!("{head:?}…")
    }
}

/// Sub-filters of a composite, found as UCS finds them (see the module docs).
struct Scan {
    /// Inclusive spans `(first, last)`.
    children: Vec<(usize, usize)>,
    /// Text at depth <= 0 outside any sub-filter (ignored by UCS).
    stray: bool,
    /// The depth went negative or did not return to 0.
    unbalanced: bool,
}

fn scan_children(bytes: &[u8], from: usize, to: usize) -> Scan {
    let mut scan = Scan {
        children: Vec::new(),
        stray: false,
        unbalanced: false,
    };
    let Some(range) = bytes.get(from..=to) else {
        return scan;
    };
    let mut depth: i64 = 0;
    let mut start = from;
    for (offset, &c) in range.iter().enumerate() {
        let i = from + offset;
        match c {
            b'(' => {
                if depth == 0 {
                    start = i;
                }
                depth += 1;
            }
            b')' => {
                depth -= 1;
                if depth == 0 {
                    scan.children.push((start, i));
                } else if depth < 0 {
                    scan.unbalanced = true;
                }
            }
            _ if depth <= 0 => scan.stray = true,
            _ => {}
        }
    }
    if depth != 0 {
        scan.unbalanced = true;
    }
    scan
}

struct Compiler<'a> {
    /// The filter as C sees it (up to the first NUL).
    text: &'a str,
    warnings: Vec<String>,
}

impl Compiler<'_> {
    fn at(&self, i: usize) -> Option<u8> {
        self.text.as_bytes().get(i).copied()
    }

    fn span(&self, first: usize, last: usize) -> String {
        shorten(self.text.get(first..=last).unwrap_or(self.text))
    }

    /// Records a warning once; a pathological filter cannot produce an unbounded list (the
    /// duplicate check is linear, and operators read the list at module load).
    fn warn(&mut self, message: String) {
        const MAX_WARNINGS: usize = 32;
        if self.warnings.len() > MAX_WARNINGS || self.warnings.contains(&message) {
            return;
        }
        if self.warnings.len() == MAX_WARNINGS {
            self.warnings
                .push("further problems in this filter are not listed".to_owned());
        } else {
            self.warnings.push(message);
        }
    }

    /// The span `first..=last` at nesting `level` (1 = the whole filter).
    fn compile(&mut self, first: usize, last: usize, level: usize) -> Node {
        if level > MAX_DEPTH {
            let span = self.span(first, last);
            self.warn(format!(
                "{span} is nested deeper than {MAX_DEPTH} levels; it evaluates to -1 \
                 (UCS would evaluate it, this implementation bounds the recursion)"
            ));
            return Node::Error;
        }
        if last <= first || self.at(first) != Some(b'(') || self.at(last) != Some(b')') {
            let span = self.span(first, last);
            let hint = if level == 1 && self.text.trim() != self.text {
                " (whitespace around the filter is not allowed)"
            } else {
                ""
            };
            self.warn(format!(
                "{span} does not start with '(' and end with ')'{hint}; it evaluates to -1, \
                 which counts as a match at top level and inside '&'/'|', and as false under '!'"
            ));
            return Node::Error;
        }
        match self.at(first + 1) {
            Some(op @ (b'&' | b'|' | b'!')) => self.compile_composite(op, first, last, level),
            _ => self.compile_item(first, last),
        }
    }

    fn compile_composite(&mut self, op: u8, first: usize, last: usize, level: usize) -> Node {
        let op_char = char::from(op);
        // `last > first + 1` here (the character after `(` is the operator, not `)`).
        if self.at(first + 2) != Some(b'(') || self.at(last - 1) != Some(b')') {
            let span = self.span(first, last);
            self.warn(format!(
                "{span}: '{op_char}' must be followed directly by '(' and its last sub-filter \
                 must end directly before the closing ')'; it evaluates to -1"
            ));
            return Node::Error;
        }
        let scan = scan_children(self.text.as_bytes(), first + 2, last - 1);
        if scan.unbalanced {
            let span = self.span(first, last);
            self.warn(format!(
                "{span} has unbalanced parentheses inside '{op_char}' (UCS counts parentheses \
                 without escape handling, so '(' or ')' in a value breaks the filter)"
            ));
        }
        if scan.stray {
            let span = self.span(first, last);
            self.warn(format!(
                "{span} has text between the sub-filters of '{op_char}'; UCS ignores it"
            ));
        }
        match op {
            b'!' => {
                if scan.children.len() > 1 {
                    let span = self.span(first, last);
                    self.warn(format!(
                        "{span}: '!' has {} sub-filters; UCS evaluates only the first",
                        scan.children.len()
                    ));
                }
                match scan.children.first() {
                    Some(&(a, b)) => Node::Not(Box::new(self.compile(a, b, level + 1))),
                    None => {
                        let span = self.span(first, last);
                        self.warn(format!(
                            "{span}: '!' has no complete sub-filter; it evaluates to -1"
                        ));
                        Node::Error
                    }
                }
            }
            _ => {
                if scan.children.is_empty() {
                    let span = self.span(first, last);
                    self.warn(format!("{span}: '{op_char}' has no complete sub-filter"));
                }
                let children = scan
                    .children
                    .iter()
                    .map(|&(a, b)| self.compile(a, b, level + 1))
                    .collect();
                if op == b'&' {
                    Node::And(children)
                } else {
                    Node::Or(children)
                }
            }
        }
    }

    /// `(attr=value)`, `first` and `last` being the parentheses.
    fn compile_item(&mut self, first: usize, last: usize) -> Node {
        let eq = self
            .text
            .as_bytes()
            .get(first + 2..last)
            .and_then(|s| s.iter().position(|&c| c == b'='))
            .map(|p| p + first + 2);
        let Some(eq) = eq else {
            let span = self.span(first, last);
            self.warn(format!(
                "{span} has no '=' after the attribute name; it evaluates to -1"
            ));
            return Node::Error;
        };
        // eq >= first + 2, so the character before it is inside the parentheses.
        if let Some(c @ (b'~' | b'>' | b'<')) = self.at(eq - 1) {
            let span = self.span(first, last);
            let op = char::from(c);
            self.warn(format!(
                "{span}: the operator '{op}=' is not supported by UCS; it evaluates to -1, \
                 which counts as a match at top level and inside '&'/'|', and as false under '!'"
            ));
            return Node::Error;
        }
        // The bounds are ASCII characters, hence char boundaries: `get` cannot fail.
        let (Some(attr), Some(value)) = (self.text.get(first + 1..eq), self.text.get(eq + 1..last))
        else {
            return Node::Error;
        };
        let span = self.span(first, last);
        if !attr
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b';' | b'.'))
        {
            self.warn(format!(
                "{span}: attribute name {attr:?} is not a plain attribute description; UCS \
                 compares it literally (whitespace, ':' extensible matches and other special \
                 characters included), so it matches no ordinary attribute"
            ));
        }
        if value == "*" {
            return Node::Present(attr.to_owned());
        }
        let pattern = ValuePattern::new(attr, value);
        if pattern.core.contains(&b'*') {
            self.warn(format!(
                "{span}: '*' inside the value is a literal character for UCS; only a leading \
                 or trailing '*' is a wildcard"
            ));
        }
        if value.contains('\\') {
            self.warn(format!(
                "{span}: UCS does not process escapes; '\\' and the characters after it are \
                 compared literally"
            ));
        }
        if value.contains(['(', ')']) {
            self.warn(format!(
                "{span}: the value contains a parenthesis, which UCS compares literally but \
                 which breaks sub-filter detection inside '&', '|' and '!'"
            ));
        }
        Node::Value(pattern)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Entry = Vec<(String, Vec<Vec<u8>>)>;

    fn entry(pairs: &[(&str, &[&[u8]])]) -> Entry {
        pairs
            .iter()
            .map(|(name, values)| {
                (
                    (*name).to_owned(),
                    values.iter().map(|v| v.to_vec()).collect(),
                )
            })
            .collect()
    }

    /// A user object with the oddities the table below needs.
    fn user() -> Entry {
        entry(&[
            (
                "objectClass",
                &[b"top", b"person", b"posixAccount", b"shadowAccount"],
            ),
            ("uid", &[b"alice"]),
            ("cn", &[b"Alice Doe"]),
            ("uidNumber", &[b"1000"]),
            ("description", &[br"a\2ab"]),
            ("star", &[b"a*b"]),
            ("abab", &[b"abab"]),
            ("host", &[b"pc$x$"]),
            ("nul", &[b"ab\0cd"]),
            ("empty", &[b""]),
            ("novalues", &[]),
            ("paren", &[b"a(b)"]),
            ("paren2", &[b"a)"]),
            ("jpegPhoto", &[b"\xff\xd8JF\xfe"]),
            ("cert", &[b"\x30\x82\x00\x10"]),
            ("multi", &[b"one", b"two", b"three"]),
            ("=", &[b"eq"]),
        ])
    }

    use Tri::{Error as E, False as F, True as T};

    const TABLE: &[(&str, Tri)] = &[
        // presence
        ("(uid=*)", T),
        ("(gid=*)", F),
        ("(UID=*)", F),
        ("(novalues=*)", T),
        ("(empty=*)", T),
        // equality, case sensitivity of names and values
        ("(uid=alice)", T),
        ("(uid=Alice)", F),
        ("(uid=alic)", F),
        ("(uid=alicex)", F),
        ("(objectClass=posixAccount)", T),
        ("(objectclass=posixAccount)", F),
        ("(objectClass=posixaccount)", F),
        ("(cn=Alice Doe)", T),
        ("(cn=Alice  Doe)", F),
        ("(multi=three)", T),
        ("(novalues=x)", F),
        ("(empty=)", T),
        ("(uid=)", F),
        // wildcards
        ("(uid=al*)", T),
        ("(uid=*ice)", T),
        ("(uid=*lic*)", T),
        ("(uid=*x*)", F),
        ("(uid=x*)", F),
        ("(uid=*alice)", T),
        ("(uid=alice*)", T),
        ("(uid=*alice*)", T),
        ("(uid=**)", T),
        ("(empty=**)", T),
        ("(novalues=**)", F),
        ("(gid=**)", F),
        ("(multi=*re*)", T),
        ("(multi=t*)", T),
        // the first-occurrence quirk of a leading '*'
        ("(abab=*ab)", F),
        ("(abab=*b)", F),
        ("(abab=*bab)", T),
        ("(abab=*abab)", T),
        ("(abab=ab*)", T),
        ("(abab=*ab*)", T),
        ("(abab=*ba*)", T),
        ("(abab=abab)", T),
        ("(host=*$)", F),
        ("(host=*x$)", T),
        // inner '*' is literal
        ("(star=a*b)", T),
        ("(uid=a*e)", F),
        ("(star=*a*b)", T),
        ("(star=a*b*)", T),
        ("(star=*a*b*)", T),
        ("(star=**b)", T),
        ("(abab=a*b)", F),
        // escapes are literal
        (r"(description=a\2ab)", T),
        (r"(star=a\2ab)", F),
        (r"(uid=\61lice)", F),
        // unsupported operators and odd splits
        ("(uidNumber>=1)", E),
        ("(uidNumber<=1)", E),
        ("(cn~=alice)", E),
        ("(~=x)", E),
        ("(>=x)", E),
        ("(cn:dn:=alice)", F),
        ("(==eq)", T),
        ("(=x)", E),
        ("(=)", E),
        ("(uid=al=ice)", F),
        // embedded NUL in stored values: compared up to the NUL
        ("(nul=ab)", T),
        ("(nul=ab*)", T),
        ("(nul=*b)", T),
        ("(nul=*cd)", F),
        ("(nul=*cd*)", F),
        ("(nul=*)", T),
        // NUL in the filter: the rest is ignored
        ("(uid=alice)\0garbage", T),
        ("(uid=bob)\0(uid=alice)", F),
        ("(nul=ab\0cd)", E),
        // binary values: bytes, not characters
        ("(jpegPhoto=*)", T),
        ("(jpegPhoto=*JF*)", T),
        ("(jpegPhoto=*JF)", F),
        ("(jpegPhoto=\u{ff}\u{d8}JF\u{fe})", F),
        ("(cert=0*)", T),
        ("(cert=*\u{10})", F),
        // parentheses in values
        ("(paren=a(b))", T),
        ("(paren2=a))", T),
        ("(&(paren=a(b)))", T),
        ("(|(paren2=a))(uid=alice))", F),
        // '&'
        ("(&(objectClass=posixAccount)(uid=*))", T),
        ("(&(objectClass=posixAccount)(uid=bob))", F),
        ("(&(uid=bob)(objectClass=posixAccount))", F),
        ("(&(objectClass=posixAccount)(uidNumber>=1))", T),
        ("(&(uidNumber>=1)(cn~=x))", T),
        ("(&(uidNumber>=1)(uid=bob))", F),
        ("(&(uid=alice))", T),
        ("(&())", T),
        ("(&(uid=alice)junk(cn=Alice Doe))", T),
        ("(&(uid=alice)junk(cn=Bob))", F),
        // '|'
        ("(|(uid=bob)(uid=alice))", T),
        ("(|(uid=bob)(uid=carol))", F),
        ("(|(uid=bob)(uidNumber>=1))", T),
        ("(|(uidNumber>=1))", T),
        ("(|())", T),
        // '!': logical not of the first child only; -1 becomes 0
        ("(!(uid=bob))", T),
        ("(!(uid=alice))", F),
        ("(!(uidNumber>=1))", F),
        ("(!())", F),
        ("(!(uid=bob)(uid=alice))", T),
        ("(!(uid=alice)(uid=bob))", F),
        ("(!(!(uid=alice)))", T),
        ("(&(uid=alice)(!(uidNumber>=1)))", F),
        // malformed
        ("", E),
        ("uid=alice", E),
        ("(uid=alice", E),
        ("uid=alice)", E),
        (" (uid=alice)", E),
        ("(uid=alice)\n", E),
        ("(uid)", E),
        ("()", E),
        ("(", E),
        (")", E),
        ("(&)", E),
        ("(|)", E),
        ("(!)", E),
        ("(&x)", E),
        ("(& (uid=alice))", E),
        ("(&(uid=alice) )", E),
        ("(&(uid=alice)", E),
        ("(|(uid=bob)(uid=alice)", E),
        ("(!((uid=alice))", E),
        // unbalanced but accepted by depth counting
        ("(&((uid=bob))", T),
        ("(|((uid=alice))", F),
        ("(&(uid=bob)))", F),
        ("(&(uid=alice)))", T),
        ("(&(uid=alice)))(uid=bob))", T),
        // a simple item swallows everything up to the final ')'
        ("(uid=alice)(cn=x)", F),
        ("((uid=alice))", F),
    ];

    #[test]
    fn semantics_table() {
        let user = user();
        let mut failures = Vec::new();
        for &(text, expected) in TABLE {
            let got = Filter::new(text).evaluate(&user);
            if got != expected {
                failures.push(format!("{text:?}: expected {expected}, got {got}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn sources_agree_and_compare_names_case_sensitively() {
        let vec = user();
        let map: BTreeMap<String, Vec<Vec<u8>>> = vec.iter().cloned().collect();
        let hash: HashMap<String, Vec<Vec<u8>>> = vec.iter().cloned().collect();
        for &(text, expected) in TABLE {
            let f = Filter::new(text);
            assert_eq!(f.evaluate(vec.as_slice()), expected, "{text:?} slice");
            assert_eq!(f.evaluate(&map), expected, "{text:?} btree");
            assert_eq!(f.evaluate(&hash), expected, "{text:?} hash");
            assert_eq!(f.evaluate(&&vec), expected, "{text:?} ref");
        }
        assert!(vec.values("objectclass").is_none());
        assert!(AttributeSource::values(&map, "OBJECTCLASS").is_none());
        assert!(AttributeSource::values(&hash, "objectClass").is_some());
        assert!(vec.values("objectClass").is_some());
    }

    #[test]
    fn top_level_match_counts_minus_one() {
        let user = user();
        assert!(Filter::new("(uid=alice)").matches(&user));
        assert!(!Filter::new("(uid=bob)").matches(&user));
        assert!(Filter::new("garbage").matches(&user));
        assert!(Filter::new("(uidNumber>=5000)").matches(&user));
        assert!(!Filter::new("(!(uidNumber>=5000))").matches(&user));
        assert!(Filter::new("").matches(&Entry::new()));
        assert_eq!(Tri::Error.as_c(), -1);
        assert_eq!(Tri::False.as_c(), 0);
        assert_eq!(Tri::True.as_c(), 1);
    }

    #[test]
    fn typical_ucs_module_filters() {
        let user = user();
        let group = entry(&[
            ("objectClass", &[b"top", b"posixGroup", b"univentionGroup"]),
            ("cn", &[b"Domain Users"]),
        ]);
        let share = |host: &[u8]| {
            entry(&[
                ("objectClass", &[b"top", b"univentionShare"]),
                ("univentionShareHost", &[host]),
            ])
        };
        let users = Filter::new("(&(objectClass=posixAccount)(uid=*))");
        let groups = Filter::new("(|(objectClass=univentionGroup)(objectClass=posixGroup))");
        let shares = Filter::new("(&(objectClass=univentionShare)(!(univentionShareHost=x)))");
        assert_eq!(users.evaluate(&user), T);
        assert_eq!(users.evaluate(&group), F);
        assert_eq!(groups.evaluate(&group), T);
        assert_eq!(groups.evaluate(&user), F);
        assert_eq!(shares.evaluate(&share(b"y")), T);
        assert_eq!(shares.evaluate(&share(b"x")), F);
        assert_eq!(shares.evaluate(&share(b"X")), T);
        assert_eq!(shares.evaluate(&user), F);
        for f in [&users, &groups, &shares] {
            assert!(f.warnings().is_empty(), "{f}: {:?}", f.warnings());
        }

        // The developer reference's example, whitespace stripped as the module does.
        let printusers: String = "(&
	(|
		(&
			(objectClass=posixAccount)
			(objectClass=shadowAccount)
		)
		(objectClass=univentionMail)
		(objectClass=sambaSamAccount)
		(objectClass=simpleSecurityObject)
		(objectClass=inetOrgPerson)
	)
	(!(objectClass=univentionHost))
	(!(uidNumber=0))
	(!(uid=*$))
)"
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
        .collect();
        let printusers = Filter::new(&printusers);
        assert!(
            printusers.warnings().is_empty(),
            "{:?}",
            printusers.warnings()
        );
        assert_eq!(printusers.evaluate(&user), T);
        let machine = entry(&[
            ("objectClass", &[b"posixAccount", b"shadowAccount"]),
            ("uid", &[b"pc1$"]),
            ("uidNumber", &[b"2000"]),
        ]);
        assert_eq!(printusers.evaluate(&machine), F);
        let root = entry(&[
            ("objectClass", &[b"posixAccount", b"shadowAccount"]),
            ("uid", &[b"root"]),
            ("uidNumber", &[b"0"]),
        ]);
        assert_eq!(printusers.evaluate(&root), F);
        // Unstripped, the whitespace after '(&' makes the whole filter -1: a match.
        let raw = Filter::new("(&\n\t(uid=bob)\n)");
        assert_eq!(raw.evaluate(&user), E);
        assert!(!raw.warnings().is_empty());
    }

    fn nested(op: &str, levels: usize, inner: &str) -> String {
        format!("{}{inner}{}", op.repeat(levels), ")".repeat(levels))
    }

    #[test]
    fn depth_bound() {
        let user = user();
        // 255 '!' levels + the item at level 256: evaluated, 255 negations of 0.
        let f = Filter::new(&nested("(!", MAX_DEPTH - 1, "(uid=bob)"));
        assert_eq!(f.evaluate(&user), T);
        assert!(f.warnings().is_empty());
        // One level more: the item is at level 257 and evaluates to -1; the innermost '!'
        // turns that into 0, and 255 more negations give 1 (unbounded C would give 0).
        let f = Filter::new(&nested("(!", MAX_DEPTH, "(uid=bob)"));
        assert_eq!(f.evaluate(&user), T);
        assert!(f.warnings().iter().any(|w| w.contains("deeper")));
        // Very deep input neither overflows the stack nor takes long.
        let f = Filter::new(&nested("(&", 20_000, "(uid=bob)"));
        assert_eq!(f.evaluate(&user), T);
        let f = Filter::new(&nested("(|", 20_000, "(uid=bob)"));
        assert_eq!(f.evaluate(&user), T);
        let f = Filter::new(&"(".repeat(100_000));
        assert_eq!(f.evaluate(&user), E);
        let f = Filter::new(&format!("{})", "(&".repeat(100_000)));
        assert_eq!(f.evaluate(&user), E);
    }

    fn warns(text: &str, needle: &str) {
        let w = Filter::new(text).warnings();
        assert!(
            w.iter().any(|m| m.contains(needle)),
            "{text:?}: no warning containing {needle:?} in {w:?}"
        );
    }

    #[test]
    fn warnings() {
        warns("", "empty");
        warns("uid=alice", "does not start with '('");
        warns(" (uid=alice)", "whitespace");
        warns("(&)", "must be followed directly by '('");
        warns("(&x)", "must be followed directly by '('");
        warns("(uidNumber>=1)", "'>=' is not supported");
        warns("(uidNumber<=1)", "'<=' is not supported");
        warns("(cn~=x)", "'~=' is not supported");
        warns("(uid=a*e)", "inside the value");
        warns(r"(cn=a\2ab)", "escapes");
        warns("(!(a=b)(c=d))", "evaluates only the first");
        warns("(!((a=b))", "unbalanced");
        warns("(&((a=b))", "no complete sub-filter");
        warns("(&(a=b)x(c=d))", "text between");
        warns("(uid)", "no '='");
        warns("(=x)", "no '='");
        warns("(cn:dn:=x)", "not a plain attribute");
        warns("( cn=x)", "not a plain attribute");
        warns("(cn=a(b))", "parenthesis");
        warns("(uid=a)\0x", "NUL");
        // The list is bounded.
        let many: String = (0..1000).map(|i| format!("(a{i}>=1)")).collect();
        let w = Filter::new(&format!("(&{many})")).warnings();
        assert_eq!(w.len(), 33);
        assert!(w.iter().any(|m| m.contains("not listed")));
        // Nested problems are reported too, once each.
        let w = Filter::new("(&(a>=1)(|(b>=1)(a>=1)))").warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        for ok in [
            "(uid=*)",
            "(uid=al*)",
            "(uid=*$)",
            "(uid=*x*)",
            "(userCertificate;binary=*)",
            "(cn=Domain Users)",
            "(!(a=b))",
        ] {
            assert!(Filter::new(ok).warnings().is_empty(), "{ok:?}");
        }
    }

    #[test]
    fn as_str_and_display_keep_the_text() {
        for text in ["(uid=alice)", "garbage", "", "(a=b)\0rest"] {
            let f = Filter::new(text);
            assert_eq!(f.as_str(), text);
            assert_eq!(f.to_string(), text);
        }
    }

    #[test]
    fn cache_filter_base_restriction() {
        let base = "dc=example,dc=com";
        let cf = CacheFilter::new("(objectClass=person)", base);
        let person = entry(&[("objectClass", &[b"top", b"person"])]);
        let other = entry(&[("objectClass", &[b"top", b"organizationalRole"])]);
        assert!(cf.excludes("uid=a,cn=users,dc=example,dc=com", &person));
        assert!(!cf.excludes("uid=a,cn=users,dc=example,dc=com", &other));
        assert!(cf.excludes("dc=example,dc=com", &person));
        // Byte-exact, case-sensitive suffix.
        assert!(!cf.excludes("uid=a,cn=users,DC=example,dc=com", &person));
        assert!(!cf.excludes("uid=a,cn=users,dc=example,dc=com ", &person));
        assert!(!cf.excludes("uid=a,dc=other,dc=org", &person));
        assert!(!cf.excludes("dc=com", &person));
        // Plain suffix: no ',' boundary is required.
        assert!(cf.excludes("xdc=example,dc=com", &person));
        // Names are case-sensitive here too.
        let lower = entry(&[("objectclass", &[b"person"])]);
        assert!(!cf.excludes("cn=x,dc=example,dc=com", &lower));
        // A malformed cache filter keeps everything below the base out of the cache.
        let bad = CacheFilter::new("objectClass=person", base);
        assert!(bad.excludes("cn=x,dc=example,dc=com", &other));
        assert!(!bad.excludes("cn=x,dc=other", &other));
        assert!(!bad.filter().warnings().is_empty());
        // An empty base is a suffix of every DN.
        let all = CacheFilter::new("(objectClass=person)", "");
        assert!(all.excludes("cn=x", &person));
        assert_eq!(cf.base(), base);
        assert_eq!(cf.filter().as_str(), "(objectClass=person)");
        assert!(cf.in_scope("cn=x,dc=example,dc=com"));
    }

    // ---- property tests ----

    /// Strings built from the characters that matter to the parser.
    fn filterish() -> impl Strategy<Value = String> {
        let chars = vec![
            '(', ')', '&', '|', '!', '=', '*', '~', '<', '>', ':', 'a', 'b', ' ', '\\', '\0', 'é',
        ];
        prop::collection::vec(prop::sample::select(chars), 0..48)
            .prop_map(|cs| cs.into_iter().collect())
    }

    fn attr_name() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["cn", "CN", "uid", "mail"]).prop_map(str::to_owned)
    }

    fn random_entry() -> impl Strategy<Value = Entry> {
        let value = prop::collection::vec(prop::sample::select(vec![b'a', b'b', b'*', 0]), 0..5);
        prop::collection::btree_map(attr_name(), prop::collection::vec(value, 0..3), 0..4)
            .prop_map(|m| m.into_iter().collect())
    }

    /// Filter values: `*`-free cores with optional leading/trailing `*`, or a lone `*`.
    fn filter_value() -> impl Strategy<Value = String> {
        ("[ab=]{0,3}", any::<bool>(), any::<bool>(), 0..8u8).prop_map(|(core, l, t, star)| {
            if star == 0 {
                "*".to_owned()
            } else {
                format!(
                    "{}{core}{}",
                    if l { "*" } else { "" },
                    if t { "*" } else { "" }
                )
            }
        })
    }

    /// Reference semantics, phrased differently from the implementation.
    fn reference_item(entry: &Entry, attr: &str, value: &str) -> bool {
        let Some((_, values)) = entry.iter().find(|(n, _)| n == attr) else {
            return false;
        };
        if value == "*" {
            return true;
        }
        values.iter().any(|v| {
            let s = match v.iter().position(|&c| c == 0) {
                Some(n) => &v[..n],
                None => &v[..],
            };
            let p = value.as_bytes();
            if s == p {
                return true;
            }
            let lead = p.len() >= 2 && p[0] == b'*';
            let trail = p.len() >= 2 && p[p.len() - 1] == b'*';
            let core = &p[usize::from(lead)..p.len() - usize::from(trail)];
            let contains = |h: &[u8]| core.is_empty() || h.windows(core.len()).any(|w| w == core);
            match (lead, trail) {
                (false, false) => false,
                (false, true) => s.starts_with(core),
                (true, true) => contains(s),
                // The first occurrence is the one at the end: no occurrence starts earlier.
                (true, false) => s.ends_with(core) && !contains(&s[..s.len() - 1]),
            }
        })
    }

    #[derive(Debug, Clone)]
    enum Tree {
        Item(String, String),
        And(Vec<Tree>),
        Or(Vec<Tree>),
        Not(Box<Tree>),
    }

    impl Tree {
        fn text(&self) -> String {
            match self {
                Tree::Item(a, v) => format!("({a}={v})"),
                Tree::And(c) => format!("(&{})", c.iter().map(Tree::text).collect::<String>()),
                Tree::Or(c) => format!("(|{})", c.iter().map(Tree::text).collect::<String>()),
                Tree::Not(c) => format!("(!{})", c.text()),
            }
        }

        fn reference(&self, e: &Entry) -> bool {
            match self {
                Tree::Item(a, v) => reference_item(e, a, v),
                Tree::And(c) => c.iter().all(|t| t.reference(e)),
                Tree::Or(c) => c.iter().any(|t| t.reference(e)),
                Tree::Not(c) => !c.reference(e),
            }
        }
    }

    fn tree() -> impl Strategy<Value = Tree> {
        let leaf = (attr_name(), filter_value()).prop_map(|(a, v)| Tree::Item(a, v));
        leaf.prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 1..4).prop_map(Tree::And),
                prop::collection::vec(inner.clone(), 1..4).prop_map(Tree::Or),
                inner.prop_map(|t| Tree::Not(Box::new(t))),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_text_never_panics(text in any::<String>(), e in random_entry()) {
            let f = Filter::new(&text);
            let r = f.evaluate(&e);
            prop_assert_eq!(f.matches(&e), r != Tri::False);
            let _ = f.warnings();
            prop_assert_eq!(f.as_str(), text.as_str());
            let _ = CacheFilter::new(&text, &text).excludes(&text, &e);
        }

        #[test]
        fn filterish_text_never_panics(text in filterish(), e in random_entry()) {
            let f = Filter::new(&text);
            let r = f.evaluate(&e);
            prop_assert_eq!(f.matches(&e), r != Tri::False);
            let _ = f.warnings();
        }

        #[test]
        fn conjunctions_agree_with_reference(
            items in prop::collection::vec((attr_name(), filter_value()), 1..5),
            e in random_entry(),
        ) {
            let body: String = items.iter().map(|(a, v)| format!("({a}={v})")).collect();
            let text = if items.len() == 1 { body } else { format!("(&{body})") };
            let expected = items.iter().all(|(a, v)| reference_item(&e, a, v));
            let f = Filter::new(&text);
            prop_assert_eq!(f.evaluate(&e), Tri::from_bool(expected), "{}", text);
            prop_assert!(f.warnings().is_empty(), "{}: {:?}", text, f.warnings());
            let map: BTreeMap<String, Vec<Vec<u8>>> = e.iter().cloned().collect();
            prop_assert_eq!(f.evaluate(&map), Tri::from_bool(expected));
        }

        #[test]
        fn single_values_agree_with_reference(
            stored in prop::collection::vec(prop::sample::select(vec![b'a', b'b', b'*', 0]), 0..7),
            value in filter_value(),
        ) {
            let e: Entry = vec![("cn".to_owned(), vec![stored])];
            let text = format!("(cn={value})");
            prop_assert_eq!(
                Filter::new(&text).evaluate(&e),
                Tri::from_bool(reference_item(&e, "cn", &value)),
                "{} against {:?}",
                text,
                e
            );
        }

        #[test]
        fn well_formed_trees_agree_with_reference(t in tree(), e in random_entry()) {
            let text = t.text();
            prop_assert_eq!(
                Filter::new(&text).evaluate(&e),
                Tri::from_bool(t.reference(&e)),
                "{}",
                text
            );
        }
    }
}
