//! Fallible decoding of the LDAP messages our daemons consume through ldap3.
//!
//! ldap3's own helpers (`SearchEntry::construct`, the content-sync control parsers,
//! `parse_syncinfo`) panic on malformed server data and split values into UTF-8 and binary
//! maps. These functions walk the BER structure themselves, return errors instead of
//! panicking, and keep every value as the exact bytes the server sent.

use ldap3::asn1::{PL, StructureTag, TagClass, parse_tag};
use ldap3::{ResultEntry, controls::RawControl};

/// OID of the Sync State response control (RFC 4533).
pub(crate) const SYNC_STATE_OID: &str = "1.3.6.1.4.1.4203.1.9.1.2";
/// OID of the Sync Info intermediate message (RFC 4533).
pub(crate) const SYNC_INFO_OID: &str = "1.3.6.1.4.1.4203.1.9.1.4";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed LDAP data from the server: {0}")]
pub struct BerError(pub String);

fn err(what: &str) -> BerError {
    BerError(what.to_owned())
}

/// Attributes in server order, values as exact bytes (binary-safe).
pub type Attributes = Vec<(String, Vec<Vec<u8>>)>;

/// The values of `name` in `attrs`; attribute descriptions compare ASCII-case-insensitively,
/// as in LDAP.
pub fn values_of<'a>(attrs: &'a [(String, Vec<Vec<u8>>)], name: &str) -> Option<&'a [Vec<u8>]> {
    attrs
        .iter()
        .find(|(attr, _)| attr.eq_ignore_ascii_case(name))
        .map(|(_, values)| values.as_slice())
}

/// An entry with its attributes in server order and values as exact bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RawEntry {
    pub dn: String,
    pub attrs: Attributes,
}

impl RawEntry {
    /// Values of `name` ([`values_of`]).
    pub fn values(&self, name: &str) -> Option<&[Vec<u8>]> {
        values_of(&self.attrs, name)
    }

    /// The first value of `name` as text.
    pub fn first_str(&self, name: &str) -> Option<&str> {
        self.values(name)
            .and_then(|values| values.first())
            .and_then(|value| std::str::from_utf8(value).ok())
    }
}

fn primitive(tag: StructureTag, what: &str) -> Result<Vec<u8>, BerError> {
    match tag.payload {
        PL::P(bytes) => Ok(bytes),
        PL::C(_) => Err(err(what)),
    }
}

fn constructed(tag: StructureTag, what: &str) -> Result<Vec<StructureTag>, BerError> {
    match tag.payload {
        PL::C(tags) => Ok(tags),
        PL::P(_) => Err(err(what)),
    }
}

fn utf8(bytes: Vec<u8>, what: &str) -> Result<String, BerError> {
    String::from_utf8(bytes).map_err(|_| err(what))
}

/// Decodes a SearchResultEntry (`[APPLICATION 4]`), moving the values out of the parsed
/// message instead of copying them.
pub fn parse_entry(entry: ResultEntry) -> Result<RawEntry, BerError> {
    let tag = entry.0;
    if tag.class != TagClass::Application || tag.id != 4 {
        return Err(err("expected a search result entry"));
    }
    let mut parts = constructed(tag, "entry is not a sequence")?.into_iter();
    let dn = utf8(
        primitive(
            parts.next().ok_or_else(|| err("entry without DN"))?,
            "DN not a string",
        )?,
        "DN is not UTF-8",
    )?;
    let list = parts
        .next()
        .map_or(Ok(Vec::new()), |t| constructed(t, "attribute list"))?;
    let mut attrs = Vec::with_capacity(list.len());
    for attr in list {
        let mut fields = constructed(attr, "attribute is not a sequence")?.into_iter();
        let name = utf8(
            primitive(
                fields.next().ok_or_else(|| err("attribute without type"))?,
                "type",
            )?,
            "attribute type is not UTF-8",
        )?;
        let set = fields
            .next()
            .map_or(Ok(Vec::new()), |t| constructed(t, "value set"))?;
        let values = set
            .into_iter()
            .map(|v| primitive(v, "value is not a string"))
            .collect::<Result<Vec<_>, _>>()?;
        attrs.push((name, values));
    }
    Ok(RawEntry { dn, attrs })
}

/// State of an entry in a syncrepl stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncEntryState {
    Present,
    Add,
    Modify,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncStateControl {
    pub state: SyncEntryState,
    pub entry_uuid: Vec<u8>,
    pub cookie: Option<Vec<u8>>,
}

fn parse_value(bytes: &[u8], what: &str) -> Result<StructureTag, BerError> {
    match parse_tag(bytes) {
        Ok((_, tag)) => Ok(tag),
        Err(_) => Err(err(what)),
    }
}

fn small_uint(bytes: &[u8], what: &str) -> Result<u64, BerError> {
    if bytes.is_empty() || bytes.len() > 8 {
        return Err(err(what));
    }
    Ok(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
}

/// The Sync State control of an entry, if it carries one.
pub fn sync_state(entry: &ResultEntry) -> Result<Option<SyncStateControl>, BerError> {
    let Some(control) = entry
        .1
        .iter()
        .map(|c| &c.1)
        .find(|c| c.ctype == SYNC_STATE_OID)
    else {
        return Ok(None);
    };
    parse_sync_state(control).map(Some)
}

fn parse_sync_state(control: &RawControl) -> Result<SyncStateControl, BerError> {
    let value = control
        .val
        .as_deref()
        .ok_or_else(|| err("sync state without value"))?;
    let mut fields = constructed(parse_value(value, "sync state")?, "sync state")?.into_iter();
    let state = match small_uint(
        &primitive(
            fields.next().ok_or_else(|| err("sync state: no state"))?,
            "state",
        )?,
        "sync state: state",
    )? {
        0 => SyncEntryState::Present,
        1 => SyncEntryState::Add,
        2 => SyncEntryState::Modify,
        3 => SyncEntryState::Delete,
        other => return Err(BerError(format!("sync state: unknown state {other}"))),
    };
    let entry_uuid = primitive(
        fields.next().ok_or_else(|| err("sync state: no UUID"))?,
        "uuid",
    )?;
    let cookie = fields
        .next()
        .map(|t| primitive(t, "sync state: cookie"))
        .transpose()?;
    Ok(SyncStateControl {
        state,
        entry_uuid,
        cookie,
    })
}

/// What a Sync Info intermediate message says, as far as a follower cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncInfo {
    pub cookie: Option<Vec<u8>>,
    /// The refresh phase is over; what follows is live (persist) data.
    pub refresh_done: bool,
}

/// Decodes an intermediate response if it is a Sync Info message; `Ok(None)` for other
/// intermediates.
pub fn parse_sync_info(entry: &ResultEntry) -> Result<Option<SyncInfo>, BerError> {
    if entry.0.id != 25 {
        return Ok(None);
    }
    let mut oid = None;
    let mut value = None;
    for tag in constructed(entry.0.clone(), "intermediate response")? {
        match tag.id {
            0 => oid = Some(utf8(primitive(tag, "intermediate OID")?, "OID")?),
            1 => value = Some(primitive(tag, "intermediate value")?),
            _ => {}
        }
    }
    if oid.as_deref() != Some(SYNC_INFO_OID) {
        return Ok(None);
    }
    let value = value.ok_or_else(|| err("sync info without value"))?;
    let info = parse_value(&value, "sync info")?;
    if info.class != TagClass::Context {
        return Err(err("sync info: unexpected tag class"));
    }
    match (info.id, info.payload) {
        (0, PL::P(cookie)) => Ok(Some(SyncInfo {
            cookie: Some(cookie),
            refresh_done: false,
        })),
        (1..=3, PL::C(fields)) => {
            let mut cookie = None;
            // refreshDone defaults to TRUE for refreshDelete/refreshPresent (RFC 4533).
            let mut refresh_done = info.id != 3;
            for field in fields {
                match (field.class, field.id, field.payload) {
                    (TagClass::Universal, 4, PL::P(bytes)) => cookie = Some(bytes),
                    (TagClass::Universal, 1, PL::P(bytes)) if info.id != 3 => {
                        refresh_done = bytes.first().is_some_and(|b| *b != 0);
                    }
                    _ => {}
                }
            }
            Ok(Some(SyncInfo {
                cookie,
                refresh_done,
            }))
        }
        _ => Err(err("sync info: unexpected choice")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldap3::asn1::{ASNTag, Enumerated, OctetString, Sequence, Set, Tag, write};
    use ldap3::controls::Control;

    fn octet(bytes: &[u8]) -> Tag {
        Tag::OctetString(OctetString {
            inner: bytes.to_vec(),
            ..Default::default()
        })
    }

    fn result_entry(tag: StructureTag, controls: Vec<Control>) -> ResultEntry {
        let mut entry = ResultEntry::new(tag);
        entry.1 = controls;
        entry
    }

    fn encode(tag: Tag) -> Vec<u8> {
        let mut buf = bytes::BytesMut::new();
        write::encode_into(&mut buf, tag.into_structure()).unwrap();
        buf.to_vec()
    }

    fn entry_tag(dn: &str, attrs: &[(&str, &[&[u8]])]) -> StructureTag {
        Tag::Sequence(Sequence {
            class: TagClass::Application,
            id: 4,
            inner: vec![
                octet(dn.as_bytes()),
                Tag::Sequence(Sequence {
                    inner: attrs
                        .iter()
                        .map(|(name, values)| {
                            Tag::Sequence(Sequence {
                                inner: vec![
                                    octet(name.as_bytes()),
                                    Tag::Set(Set {
                                        inner: values.iter().map(|v| octet(v)).collect(),
                                        ..Default::default()
                                    }),
                                ],
                                ..Default::default()
                            })
                        })
                        .collect(),
                    ..Default::default()
                }),
            ],
        })
        .into_structure()
    }

    #[test]
    fn entry_values_keep_exact_bytes() {
        let photo: &[u8] = &[0, 0xff, b'\n'];
        let entry = result_entry(
            entry_tag(
                "uid=a,dc=x",
                &[("cn", &[b"A", "Ä".as_bytes()]), ("jpegPhoto", &[photo])],
            ),
            vec![],
        );
        let parsed = parse_entry(entry).unwrap();
        assert_eq!(parsed.dn, "uid=a,dc=x");
        assert_eq!(
            parsed.values("CN").unwrap(),
            &[b"A".to_vec(), "Ä".as_bytes().to_vec()]
        );
        assert_eq!(parsed.values("jpegPhoto").unwrap(), &[photo.to_vec()]);
        assert_eq!(parsed.first_str("cn"), Some("A"));
    }

    #[test]
    fn malformed_entries_are_errors_not_panics() {
        let not_entry = result_entry(octet(b"x").into_structure(), vec![]);
        assert!(parse_entry(not_entry).is_err());
        let empty = result_entry(
            Tag::Sequence(Sequence {
                class: TagClass::Application,
                id: 4,
                inner: vec![],
            })
            .into_structure(),
            vec![],
        );
        assert!(parse_entry(empty).is_err());
    }

    fn state_control(value: Option<Vec<u8>>) -> ResultEntry {
        result_entry(
            entry_tag("dc=x", &[]),
            vec![Control(
                None,
                RawControl {
                    ctype: SYNC_STATE_OID.into(),
                    crit: false,
                    val: value,
                },
            )],
        )
    }

    #[test]
    fn sync_state_decodes_and_rejects_garbage() {
        let value = encode(Tag::Sequence(Sequence {
            inner: vec![
                Tag::Enumerated(Enumerated {
                    inner: 1,
                    ..Default::default()
                }),
                octet(&[1; 16]),
                octet(b"rid=000,csn=1"),
            ],
            ..Default::default()
        }));
        let state = sync_state(&state_control(Some(value))).unwrap().unwrap();
        assert_eq!(state.state, SyncEntryState::Add);
        assert_eq!(state.cookie.as_deref(), Some(&b"rid=000,csn=1"[..]));
        assert!(sync_state(&state_control(None)).is_err());
        assert!(sync_state(&state_control(Some(vec![0x30, 0x05, 1]))).is_err());
        let bad_state = encode(Tag::Sequence(Sequence {
            inner: vec![
                Tag::Enumerated(Enumerated {
                    inner: 9,
                    ..Default::default()
                }),
                octet(b"u"),
            ],
            ..Default::default()
        }));
        assert!(sync_state(&state_control(Some(bad_state))).is_err());
        assert_eq!(
            sync_state(&result_entry(entry_tag("dc=x", &[]), vec![])).unwrap(),
            None
        );
    }

    #[test]
    fn arbitrary_control_bytes_never_panic() {
        for len in 0..64u8 {
            let bytes: Vec<u8> = (0..len)
                .map(|i| i.wrapping_mul(37).wrapping_add(len))
                .collect();
            let _ = sync_state(&state_control(Some(bytes.clone())));
            let mut with_header = vec![0x30, len];
            with_header.extend(bytes);
            let _ = sync_state(&state_control(Some(with_header)));
        }
    }
}
