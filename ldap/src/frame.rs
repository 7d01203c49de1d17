//! Zero-copy decoding of the LDAP messages a search returns: framing of the byte stream
//! into LDAPMessages and a BER walker over [`Bytes`], so attribute values are slices of the
//! received frame, not copies.
//!
//! ldap3's codec parses every message into a tree of owned tags and then copies it before
//! its caller sees it: ~2.5 allocations per attribute value. Here decoding an entry
//! allocates nothing: it is checked in one pass and read from the frame when used.
//!
//! The walker only reads the fixed shapes of RFC 4511 and never recurses, so nesting depth
//! is bounded by the protocol's own; lengths are definite, at most [`MAX_FRAME`] and never
//! past their enclosing element. Bad input is an error, never a panic.

use bytes::Bytes;

/// Largest LDAPMessage accepted (a group with ~10^6 members fits).
pub const MAX_FRAME: usize = 256 << 20;

/// What is wrong with a message from the server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("truncated BER element in {0}")]
    Truncated(&'static str),
    #[error("indefinite BER length in {0} (LDAP uses definite lengths only)")]
    Indefinite(&'static str),
    #[error("BER length in {what} exceeds {limit} bytes")]
    TooLong { what: &'static str, limit: usize },
    #[error("unexpected BER tag {found:#04x} for {what}")]
    Tag { what: &'static str, found: u8 },
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
}

// Identifier octets used by LDAP (RFC 4511 §4).
const BOOLEAN: u8 = 0x01;
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const ENUMERATED: u8 = 0x0a;
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const BIND_RESPONSE: u8 = 0x61;
const SEARCH_RESULT_ENTRY: u8 = 0x64;
const SEARCH_RESULT_DONE: u8 = 0x65;
const SEARCH_RESULT_REFERENCE: u8 = 0x73;
const EXTENDED_RESPONSE: u8 = 0x78;
const INTERMEDIATE_RESPONSE: u8 = 0x79;
const CONTROLS: u8 = 0xa0;
const REFERRAL: u8 = 0xa3;
const SASL_CREDS: u8 = 0x87;
const RESPONSE_NAME: u8 = 0x8a;
const RESPONSE_VALUE: u8 = 0x8b;
const INTERMEDIATE_NAME: u8 = 0x80;
const INTERMEDIATE_VALUE: u8 = 0x81;

/// OID of the simple paged results control (RFC 2696).
pub const PAGED_RESULTS_OID: &str = "1.2.840.113556.1.4.319";

/// The identifier octet, header length and content length of the element at the start of
/// `buf`; `None` if `buf` does not hold the whole header yet.
fn header(buf: &[u8], what: &'static str) -> Result<Option<(u8, usize, usize)>, FrameError> {
    let (Some(&tag), Some(&first)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    if tag & 0x1f == 0x1f {
        // High tag numbers: LDAP never uses them.
        return Err(FrameError::Malformed(what));
    }
    if first < 0x80 {
        return Ok(Some((tag, 2, usize::from(first))));
    }
    let n = usize::from(first & 0x7f);
    if n == 0 {
        return Err(FrameError::Indefinite(what));
    }
    if n > 4 {
        return Err(FrameError::TooLong {
            what,
            limit: MAX_FRAME,
        });
    }
    let Some(octets) = buf.get(2..2 + n) else {
        return Ok(None);
    };
    let len = octets
        .iter()
        .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
    if len > MAX_FRAME {
        return Err(FrameError::TooLong {
            what,
            limit: MAX_FRAME,
        });
    }
    Ok(Some((tag, 2 + n, len)))
}

/// Length of the LDAPMessage at the start of `buf` (header and content), once its header is
/// complete; `buf` may not hold all of it yet. Anything but a SEQUENCE is an error: the
/// stream is out of step.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    match header(buf, "LDAPMessage")? {
        None => Ok(None),
        Some((SEQUENCE, head, len)) => Ok(Some(head + len)),
        Some((found, ..)) => Err(FrameError::Tag {
            what: "LDAPMessage",
            found,
        }),
    }
}

/// A cursor over the elements inside one constructed element.
#[derive(Debug, Clone)]
pub struct Ber {
    data: Bytes,
    pos: usize,
}

impl Ber {
    pub fn new(data: Bytes) -> Ber {
        Ber { data, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    /// The identifier octet of the next element.
    pub fn peek(&self) -> Option<u8> {
        self.data.get(self.pos).copied()
    }

    /// The next element's identifier octet and the range of its content.
    fn next_range(&mut self, what: &'static str) -> Result<(u8, usize, usize), FrameError> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let (tag, head, len) = header(rest, what)?.ok_or(FrameError::Truncated(what))?;
        let start = self.pos + head;
        let end = start.checked_add(len).ok_or(FrameError::Truncated(what))?;
        if end > self.data.len() {
            return Err(FrameError::Truncated(what));
        }
        self.pos = end;
        Ok((tag, start, end))
    }

    /// The next element: its identifier octet and its content (a slice, no copy).
    pub fn next(&mut self, what: &'static str) -> Result<(u8, Bytes), FrameError> {
        let (tag, start, end) = self.next_range(what)?;
        Ok((tag, self.data.slice(start..end)))
    }

    /// The next element, which must carry `tag`.
    pub fn expect(&mut self, tag: u8, what: &'static str) -> Result<Bytes, FrameError> {
        let (found, content) = self.next(what)?;
        if found != tag {
            return Err(FrameError::Tag { what, found });
        }
        Ok(content)
    }

    /// The next element if it carries `tag`.
    pub fn optional(&mut self, tag: u8, what: &'static str) -> Result<Option<Bytes>, FrameError> {
        if self.peek() == Some(tag) {
            self.expect(tag, what).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Skips the next element if it carries `tag`; true if it did.
    fn skip(&mut self, tag: u8, what: &'static str) -> Result<bool, FrameError> {
        if self.peek() == Some(tag) {
            self.next_range(what)?;
            Ok(true)
        } else {
            Ok(false)
        }
    }
}

/// [`Ber`] over a borrowed slice: checking a frame's shape this way costs no reference-count
/// updates on the shared frame (two per element with `Bytes` slices).
struct BerSlice<'a> {
    rest: &'a [u8],
}

impl<'a> BerSlice<'a> {
    fn new(data: &'a [u8]) -> BerSlice<'a> {
        BerSlice { rest: data }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn next(&mut self, what: &'static str) -> Result<(u8, &'a [u8]), FrameError> {
        let (tag, head, len) = header(self.rest, what)?.ok_or(FrameError::Truncated(what))?;
        let end = head.checked_add(len).ok_or(FrameError::Truncated(what))?;
        let content = self
            .rest
            .get(head..end)
            .ok_or(FrameError::Truncated(what))?;
        self.rest = self.rest.get(end..).unwrap_or_default();
        Ok((tag, content))
    }

    fn expect(&mut self, tag: u8, what: &'static str) -> Result<&'a [u8], FrameError> {
        let (found, content) = self.next(what)?;
        if found != tag {
            return Err(FrameError::Tag { what, found });
        }
        Ok(content)
    }
}

/// The contents of the elements inside an element already checked to be well-formed (an
/// entry's attribute list, attribute or value set); an error, which cannot occur, ends it.
fn elements(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = data;
    std::iter::from_fn(move || {
        let (_, head, len) = header(rest, "element").ok()??;
        let content = rest.get(head..head.checked_add(len)?)?;
        rest = rest.get(head + len..)?;
        Some(content)
    })
}

fn utf8(bytes: &[u8], what: &'static str) -> Result<String, FrameError> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| FrameError::NotUtf8(what))
}

/// A two's-complement INTEGER or ENUMERATED content of at most 8 octets.
pub fn integer(bytes: &[u8], what: &'static str) -> Result<i64, FrameError> {
    let Some(&first) = bytes.first() else {
        return Err(FrameError::Malformed(what));
    };
    if bytes.len() > 8 {
        return Err(FrameError::Malformed(what));
    }
    let init = if first & 0x80 != 0 { -1i64 } else { 0 };
    Ok(bytes.iter().fold(init, |acc, &b| (acc << 8) | i64::from(b)))
}

/// A search result entry: its DN and attribute list are slices of the received frame,
/// checked when decoded and walked again when read, so decoding allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SearchEntry {
    /// Checked UTF-8.
    dn: Bytes,
    /// Content of the attribute list, checked to be well-formed.
    list: Bytes,
    values: usize,
}

/// One attribute of a [`SearchEntry`].
#[derive(Debug, Clone)]
pub struct Attribute {
    /// Checked UTF-8.
    name: Bytes,
    set: Bytes,
}

impl Attribute {
    pub fn name(&self) -> &str {
        // Checked when the entry was decoded.
        std::str::from_utf8(&self.name).unwrap_or_default()
    }

    /// The values, slices of the frame.
    pub fn values(&self) -> impl Iterator<Item = Bytes> + use<> {
        let mut set = Ber::new(self.set.clone());
        // The entry was checked when decoded: errors cannot occur, and would end the list.
        std::iter::from_fn(move || {
            if set.is_empty() {
                None
            } else {
                set.next("attribute value").ok().map(|(_, value)| value)
            }
        })
    }
}

impl SearchEntry {
    pub fn dn(&self) -> &str {
        // Checked when decoded.
        std::str::from_utf8(&self.dn).unwrap_or_default()
    }

    /// Attributes in server order.
    pub fn attrs(&self) -> impl Iterator<Item = Attribute> + use<> {
        let mut list = Ber::new(self.list.clone());
        std::iter::from_fn(move || {
            if list.is_empty() {
                return None;
            }
            let mut attr = Ber::new(list.next("attribute").ok()?.1);
            let name = attr.next("attribute type").ok()?.1;
            let set = attr.next("attribute values").ok()?.1;
            Some(Attribute { name, set })
        })
    }

    /// Number of attribute values.
    pub fn value_count(&self) -> usize {
        self.values
    }

    /// The entry in the owned form the rest of the listener uses (values copied once).
    ///
    /// Walks the list as plain slices: a `Bytes` slice per value would cost two atomic
    /// reference-count updates on the shared frame per value, a tenth of `-i`'s CPU.
    pub fn into_raw(self) -> crate::RawEntry {
        let attrs = elements(&self.list)
            .map(|attr| {
                let mut parts = elements(attr);
                let name = parts.next().unwrap_or_default();
                let set = parts.next().unwrap_or_default();
                (
                    // Checked when the entry was decoded.
                    std::str::from_utf8(name).unwrap_or_default().to_owned(),
                    elements(set).map(<[u8]>::to_vec).collect::<Vec<_>>(),
                )
            })
            .collect();
        crate::RawEntry {
            dn: self.dn().to_owned(),
            attrs,
        }
    }
}

/// Decodes the content of a SearchResultEntry: `objectName`, then `attributes`, a sequence
/// of (type, set of values). One pass checks the shape (and UTF-8 names); the values stay
/// in the frame.
pub fn parse_search_entry(content: Bytes) -> Result<SearchEntry, FrameError> {
    let mut entry = Ber::new(content);
    let dn = entry.expect(OCTET_STRING, "entry DN")?;
    if std::str::from_utf8(&dn).is_err() {
        return Err(FrameError::NotUtf8("entry DN"));
    }
    let list = if entry.is_empty() {
        Bytes::new()
    } else {
        entry.expect(SEQUENCE, "attribute list")?
    };
    if !entry.is_empty() {
        return Err(FrameError::Malformed("search result entry"));
    }
    let mut values = 0usize;
    let mut attrs = BerSlice::new(&list);
    while !attrs.is_empty() {
        let mut attr = BerSlice::new(attrs.expect(SEQUENCE, "attribute")?);
        let name = attr.expect(OCTET_STRING, "attribute type")?;
        if std::str::from_utf8(name).is_err() {
            return Err(FrameError::NotUtf8("attribute type"));
        }
        let mut set = BerSlice::new(attr.expect(SET, "attribute values")?);
        if !attr.is_empty() {
            return Err(FrameError::Malformed("attribute"));
        }
        while !set.is_empty() {
            let (tag, _) = set.next("attribute value")?;
            if tag != OCTET_STRING {
                return Err(FrameError::Tag {
                    what: "attribute value",
                    found: tag,
                });
            }
            values += 1;
        }
    }
    Ok(SearchEntry { dn, list, values })
}

/// An LDAPResult (RFC 4511 §4.1.9).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LdapResult {
    pub rc: u32,
    pub matched: String,
    pub message: String,
    pub referrals: Vec<String>,
}

fn parse_result(ber: &mut Ber, what: &'static str) -> Result<LdapResult, FrameError> {
    let rc = integer(&ber.expect(ENUMERATED, what)?, what)?;
    let rc = u32::try_from(rc).map_err(|_| FrameError::Malformed(what))?;
    let matched = utf8(&ber.expect(OCTET_STRING, what)?, "matched DN")?;
    let message = utf8(&ber.expect(OCTET_STRING, what)?, "diagnostic message")?;
    let mut referrals = Vec::new();
    if let Some(list) = ber.optional(REFERRAL, "referral")? {
        let mut list = Ber::new(list);
        while !list.is_empty() {
            referrals.push(utf8(&list.expect(OCTET_STRING, "referral")?, "referral")?);
        }
    }
    Ok(LdapResult {
        rc,
        matched,
        message,
        referrals,
    })
}

/// A control attached to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    pub oid: String,
    pub critical: bool,
    pub value: Option<Bytes>,
}

fn parse_controls(content: Bytes) -> Result<Vec<Control>, FrameError> {
    let mut list = Ber::new(content);
    let mut out = Vec::new();
    while !list.is_empty() {
        let mut control = Ber::new(list.expect(SEQUENCE, "control")?);
        let oid = utf8(
            &control.expect(OCTET_STRING, "control type")?,
            "control type",
        )?;
        let critical = match control.optional(BOOLEAN, "control criticality")? {
            Some(b) if b.len() == 1 => b[0] != 0,
            Some(_) => return Err(FrameError::Malformed("control criticality")),
            None => false,
        };
        let value = control.optional(OCTET_STRING, "control value")?;
        if !control.is_empty() {
            return Err(FrameError::Malformed("control"));
        }
        out.push(Control {
            oid,
            critical,
            value,
        });
    }
    Ok(out)
}

/// The cookie of a paged results response control: empty when the search is complete.
pub fn paged_cookie(controls: &[Control]) -> Result<Option<Bytes>, FrameError> {
    let Some(control) = controls.iter().find(|c| c.oid == PAGED_RESULTS_OID) else {
        return Ok(None);
    };
    let value = control
        .value
        .clone()
        .ok_or(FrameError::Malformed("paged results control"))?;
    let mut outer = Ber::new(value);
    let mut seq = Ber::new(outer.expect(SEQUENCE, "paged results control")?);
    integer(
        &seq.expect(INTEGER, "paged results size")?,
        "paged results size",
    )?;
    let cookie = seq.expect(OCTET_STRING, "paged results cookie")?;
    Ok(Some(cookie))
}

/// The protocol operation of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Entry(SearchEntry),
    /// Continuation references (URIs).
    Reference(Vec<String>),
    Done(LdapResult),
    Bind(LdapResult),
    Extended {
        result: LdapResult,
        name: Option<String>,
        value: Option<Bytes>,
    },
    Intermediate {
        name: Option<String>,
        value: Option<Bytes>,
    },
}

/// One LDAPMessage from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: i32,
    pub op: Response,
    pub controls: Vec<Control>,
}

/// Decodes one whole LDAPMessage (as [`frame_len`] delimited it).
pub fn parse_message(frame: Bytes) -> Result<Message, FrameError> {
    let mut outer = Ber::new(frame);
    let content = outer.expect(SEQUENCE, "LDAPMessage")?;
    if !outer.is_empty() {
        return Err(FrameError::Malformed("LDAPMessage (trailing data)"));
    }
    let mut msg = Ber::new(content);
    let id = integer(&msg.expect(INTEGER, "message ID")?, "message ID")?;
    let id = i32::try_from(id).map_err(|_| FrameError::Malformed("message ID"))?;
    let (tag, body) = msg.next("protocol operation")?;
    let op = match tag {
        SEARCH_RESULT_ENTRY => Response::Entry(parse_search_entry(body)?),
        SEARCH_RESULT_REFERENCE => {
            let mut uris = Ber::new(body);
            let mut out = Vec::new();
            while !uris.is_empty() {
                out.push(utf8(
                    &uris.expect(OCTET_STRING, "search reference")?,
                    "search reference",
                )?);
            }
            Response::Reference(out)
        }
        SEARCH_RESULT_DONE => {
            let mut ber = Ber::new(body);
            let result = parse_result(&mut ber, "search result done")?;
            Response::Done(result)
        }
        BIND_RESPONSE => {
            let mut ber = Ber::new(body);
            let result = parse_result(&mut ber, "bind response")?;
            ber.skip(SASL_CREDS, "server SASL credentials")?;
            Response::Bind(result)
        }
        EXTENDED_RESPONSE => {
            let mut ber = Ber::new(body);
            let result = parse_result(&mut ber, "extended response")?;
            let name = match ber.optional(RESPONSE_NAME, "response name")? {
                Some(name) => Some(utf8(&name, "response name")?),
                None => None,
            };
            let value = ber.optional(RESPONSE_VALUE, "response value")?;
            Response::Extended {
                result,
                name,
                value,
            }
        }
        INTERMEDIATE_RESPONSE => {
            let mut ber = Ber::new(body);
            let name = match ber.optional(INTERMEDIATE_NAME, "intermediate name")? {
                Some(name) => Some(utf8(&name, "intermediate name")?),
                None => None,
            };
            let value = ber.optional(INTERMEDIATE_VALUE, "intermediate value")?;
            Response::Intermediate { name, value }
        }
        found => {
            return Err(FrameError::Tag {
                what: "response operation",
                found,
            });
        }
    };
    let controls = match msg.optional(CONTROLS, "controls")? {
        Some(list) => parse_controls(list)?,
        None => Vec::new(),
    };
    if !msg.is_empty() {
        return Err(FrameError::Malformed("LDAPMessage (trailing element)"));
    }
    Ok(Message { id, op, controls })
}

/// BER encoding of the few requests the search connection sends.
pub(crate) mod encode {
    use bytes::{BufMut, BytesMut};

    /// Appends an element with identifier `tag` whose content `body` writes.
    pub fn element(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
        buf.put_u8(tag);
        // Reserve the longest length form LDAP needs, then move the content if shorter.
        let len_at = buf.len();
        buf.put_slice(&[0; 5]);
        let start = buf.len();
        body(buf);
        let len = buf.len() - start;
        let mut head = [0u8; 5];
        let used = if len < 0x80 {
            head[0] = len as u8;
            1
        } else {
            let bytes = (len as u32).to_be_bytes();
            let skip = bytes.iter().take_while(|&&b| b == 0).count();
            let n = 4 - skip;
            head[0] = 0x80 | n as u8;
            head[1..=n].copy_from_slice(&bytes[skip..]);
            n + 1
        };
        buf[len_at..len_at + used].copy_from_slice(&head[..used]);
        if used < 5 {
            buf.copy_within(start.., len_at + used);
            buf.truncate(buf.len() - (5 - used));
        }
    }

    pub fn octets(buf: &mut BytesMut, tag: u8, bytes: &[u8]) {
        element(buf, tag, |b| b.put_slice(bytes));
    }

    pub fn integer(buf: &mut BytesMut, tag: u8, value: i64) {
        let bytes = value.to_be_bytes();
        // Minimal two's complement: drop leading octets that only repeat the sign.
        let mut skip = 0;
        while skip < 7 {
            let (b, next) = (bytes[skip], bytes[skip + 1]);
            if (b == 0 && next & 0x80 == 0) || (b == 0xff && next & 0x80 != 0) {
                skip += 1;
            } else {
                break;
            }
        }
        octets(buf, tag, &bytes[skip..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn frame(f: impl FnOnce(&mut BytesMut)) -> Bytes {
        let mut buf = BytesMut::new();
        f(&mut buf);
        buf.freeze()
    }

    #[test]
    fn integers_round_trip_through_the_encoder() {
        for v in [
            0i64,
            1,
            127,
            128,
            255,
            256,
            -1,
            -128,
            -129,
            i32::MAX.into(),
            1 << 40,
        ] {
            let b = frame(|b| encode::integer(b, INTEGER, v));
            let mut ber = Ber::new(b);
            assert_eq!(integer(&ber.expect(INTEGER, "i").unwrap(), "i").unwrap(), v);
        }
    }

    #[test]
    fn long_lengths_are_encoded_and_read() {
        for len in [0usize, 127, 128, 255, 256, 70_000] {
            let value = vec![7u8; len];
            let b = frame(|b| encode::octets(b, OCTET_STRING, &value));
            assert_eq!(
                frame_len(&b),
                Err(FrameError::Tag {
                    what: "LDAPMessage",
                    found: OCTET_STRING
                })
            );
            let mut ber = Ber::new(b);
            assert_eq!(ber.expect(OCTET_STRING, "v").unwrap(), value);
            assert!(ber.is_empty());
        }
    }

    #[test]
    fn entry_round_trip_with_empty_and_binary_values() {
        let msg = frame(|b| {
            encode::element(b, SEQUENCE, |b| {
                encode::integer(b, INTEGER, 7);
                encode::element(b, SEARCH_RESULT_ENTRY, |b| {
                    encode::octets(b, OCTET_STRING, "cn=ä,dc=x".as_bytes());
                    encode::element(b, SEQUENCE, |b| {
                        for (name, values) in [
                            ("cn", vec![&b"\xc3\xa4"[..]]),
                            ("empty", vec![]),
                            ("bin", vec![&b""[..], &b"\xff\x00"[..]]),
                        ] {
                            encode::element(b, SEQUENCE, |b| {
                                encode::octets(b, OCTET_STRING, name.as_bytes());
                                encode::element(b, SET, |b| {
                                    for v in values {
                                        encode::octets(b, OCTET_STRING, v);
                                    }
                                });
                            });
                        }
                    });
                });
            });
        });
        assert_eq!(frame_len(&msg), Ok(Some(msg.len())));
        let Message { id, op, controls } = parse_message(msg).unwrap();
        assert_eq!((id, controls.len()), (7, 0));
        let Response::Entry(entry) = op else {
            panic!("not an entry")
        };
        let raw = entry.into_raw();
        assert_eq!(raw.dn, "cn=ä,dc=x");
        assert_eq!(
            raw.attrs,
            vec![
                ("cn".to_owned(), vec![b"\xc3\xa4".to_vec()]),
                ("empty".to_owned(), vec![]),
                ("bin".to_owned(), vec![vec![], vec![0xff, 0]]),
            ]
        );
    }

    #[test]
    fn bad_headers_are_errors() {
        assert_eq!(frame_len(&[0x30]), Ok(None));
        assert_eq!(frame_len(&[0x30, 0x84, 0]), Ok(None));
        assert!(matches!(
            frame_len(&[0x30, 0x80]),
            Err(FrameError::Indefinite(_))
        ));
        assert!(matches!(
            frame_len(&[0x30, 0x85, 1, 0, 0, 0, 0]),
            Err(FrameError::TooLong { .. })
        ));
        assert!(matches!(
            frame_len(&[0x30, 0x84, 0x7f, 0xff, 0xff, 0xff]),
            Err(FrameError::TooLong { .. })
        ));
        assert!(matches!(
            parse_message(Bytes::from_static(&[
                0x30, 0x05, 0x02, 0x01, 0x01, 0x64, 0x10
            ])),
            Err(FrameError::Truncated(_))
        ));
        assert!(matches!(
            parse_message(Bytes::from_static(&[0x30, 0x03, 0x1f, 0x01, 0x01])),
            Err(FrameError::Malformed(_))
        ));
    }
}
