//! The stored format: keys and versioned values.
//!
//! Keys (one LMDB table, so one transaction covers all of them):
//! - `e:` + [`crate::dn_key`] → entry record,
//! - `u:`: entryUUID index records of earlier versions, removed at open,
//! - `m` → master record,
//! - `n` → number of entries (derived data, kept so that opening needs no scan),
//! - `s` → sequence number of the last commit (see [`crate::wal`]).
//!
//! Every value is one format version byte ([`FORMAT_VERSION`]) followed by the bincode 2
//! encoding (serde API, `config::standard()`: varint lengths and integers) of a private
//! record struct. The version byte lets a later build convert old records or refuse them
//! instead of misreading them, and lets the engine be swapped by export/import.
//!
//! Decoding borrows from the stored bytes instead of using bincode's owned decoder: the
//! owned decoder allocates a buffer of whatever length a (possibly corrupt) record claims
//! before checking that the bytes exist, while the borrowed one checks the length against
//! the record first. A corrupt record therefore costs an error, never a huge allocation.

use serde::ser::{Serialize, Serializer};
use serde::{Deserialize, Serialize as DeriveSerialize};

use crate::CacheError;
use crate::entry::{CacheEntry, MasterRecord};

/// The version byte every stored value starts with.
pub(crate) const FORMAT_VERSION: u8 = 1;

pub(crate) const ENTRY_PREFIX: &[u8] = b"e:";
/// Retired: see [`crate::store`]'s open.
pub(crate) const UUID_PREFIX: &[u8] = b"u:";
pub(crate) const MASTER_KEY: &[u8] = b"m";
pub(crate) const COUNT_KEY: &[u8] = b"n";
pub(crate) const SEQ_KEY: &[u8] = b"s";

pub(crate) fn entry_key(dn_key: &str) -> Vec<u8> {
    prefixed(ENTRY_PREFIX, dn_key)
}

fn prefixed(prefix: &[u8], rest: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + rest.len());
    key.extend_from_slice(prefix);
    key.extend_from_slice(rest.as_bytes());
    key
}

/// A key as text for error messages.
pub(crate) fn key_text(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

// ---- entry record -------------------------------------------------------------------------

/// Encoding side of the entry record: borrows the entry, so storing copies nothing twice.
#[derive(DeriveSerialize)]
struct EntryRecordOut<'a> {
    dn: &'a str,
    attributes: AttributesOut<'a>,
    modules: &'a [String],
}

/// Decoding side of the same record, borrowing from the stored value.
#[derive(Deserialize)]
struct EntryRecordIn<'a> {
    #[serde(borrow)]
    dn: &'a str,
    #[serde(borrow)]
    attributes: Vec<(&'a str, Vec<&'a [u8]>)>,
    #[serde(borrow)]
    modules: Vec<&'a str>,
}

struct AttributesOut<'a>(&'a [(String, Vec<Vec<u8>>)]);

impl Serialize for AttributesOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            self.0
                .iter()
                .map(|(name, values)| (name.as_str(), ValuesOut(values))),
        )
    }
}

struct ValuesOut<'a>(&'a [Vec<u8>]);

impl Serialize for ValuesOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|v| BytesOut(v)))
    }
}

/// A value as serde bytes (length + raw bytes) rather than a sequence of `u8` elements; in
/// bincode both are the same bytes on disk, but this one is written and read in one piece.
struct BytesOut<'a>(&'a [u8]);

impl Serialize for BytesOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

pub(crate) fn encode_entry(entry: &CacheEntry) -> Result<Vec<u8>, String> {
    encode_with_capacity(
        &EntryRecordOut {
            dn: &entry.dn,
            attributes: AttributesOut(&entry.attributes),
            modules: &entry.modules,
        },
        entry_capacity(entry),
    )
}

/// The exact length of `entry`'s record, allocated up front: grown piece by piece, the
/// buffer was reallocated about seven times per user entry, and a loose bound (9 bytes per
/// length) held ~8 MB too much across the 20,000 records of a big subtree move.
fn entry_capacity(entry: &CacheEntry) -> usize {
    let bytes = |len: usize| varint_len(len) + len;
    let attributes: usize = entry
        .attributes
        .iter()
        .map(|(name, values)| {
            bytes(name.len())
                + varint_len(values.len())
                + values.iter().map(|v| bytes(v.len())).sum::<usize>()
        })
        .sum();
    let modules: usize = entry.modules.iter().map(|m| bytes(m.len())).sum();
    1 + bytes(entry.dn.len())
        + varint_len(entry.attributes.len())
        + attributes
        + varint_len(entry.modules.len())
        + modules
}

/// Bytes of a length in bincode's standard (variable-length) integer encoding.
fn varint_len(n: usize) -> usize {
    match n {
        0..=250 => 1,
        251..=0xFFFF => 3,
        0x1_0000..=0xFFFF_FFFF => 5,
        _ => 9,
    }
}

pub(crate) fn decode_entry(key: &[u8], value: &[u8]) -> Result<CacheEntry, CacheError> {
    let record: EntryRecordIn<'_> = decode(key, value)?;
    Ok(CacheEntry {
        dn: record.dn.to_owned(),
        attributes: record
            .attributes
            .into_iter()
            .map(|(name, values)| {
                (
                    name.to_owned(),
                    values.into_iter().map(<[u8]>::to_vec).collect(),
                )
            })
            .collect(),
        modules: record.modules.into_iter().map(str::to_owned).collect(),
    })
}

// ---- master record ------------------------------------------------------------------------

#[derive(DeriveSerialize, Deserialize)]
struct MasterRecordV1 {
    notifier_id: u64,
    schema_id: u64,
}

pub(crate) fn encode_master(master: MasterRecord) -> Result<Vec<u8>, String> {
    encode(&MasterRecordV1 {
        notifier_id: master.notifier_id,
        schema_id: master.schema_id,
    })
}

pub(crate) fn decode_master(value: &[u8]) -> Result<MasterRecord, CacheError> {
    let record: MasterRecordV1 = decode(MASTER_KEY, value)?;
    Ok(MasterRecord {
        notifier_id: record.notifier_id,
        schema_id: record.schema_id,
    })
}

// ---- entry count --------------------------------------------------------------------------

#[derive(DeriveSerialize, Deserialize)]
struct CountRecordV1 {
    entries: u64,
}

/// The commit sequence number: the version byte, then 8 bytes little-endian.
pub(crate) fn encode_seq(seq: u64) -> Vec<u8> {
    let mut value = vec![FORMAT_VERSION];
    value.extend_from_slice(&seq.to_le_bytes());
    value
}

pub(crate) fn decode_seq(value: &[u8]) -> Result<u64, CacheError> {
    match value.split_first() {
        Some((&FORMAT_VERSION, bytes)) => {
            bytes
                .try_into()
                .map(u64::from_le_bytes)
                .map_err(|_| CacheError::Corrupt {
                    key: key_text(SEQ_KEY),
                    reason: format!("{} bytes instead of 8", bytes.len()),
                })
        }
        Some((&version, _)) => Err(CacheError::UnsupportedVersion {
            key: key_text(SEQ_KEY),
            version,
        }),
        None => Err(CacheError::Corrupt {
            key: key_text(SEQ_KEY),
            reason: "empty".into(),
        }),
    }
}

pub(crate) fn encode_count(entries: u64) -> Result<Vec<u8>, String> {
    encode(&CountRecordV1 { entries })
}

pub(crate) fn decode_count(value: &[u8]) -> Result<u64, CacheError> {
    let record: CountRecordV1 = decode(COUNT_KEY, value)?;
    Ok(record.entries)
}

// ---- framing ------------------------------------------------------------------------------

fn encode<T: Serialize>(record: &T) -> Result<Vec<u8>, String> {
    encode_with_capacity(record, 16)
}

fn encode_with_capacity<T: Serialize>(record: &T, capacity: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(capacity);
    out.push(FORMAT_VERSION);
    bincode::serde::encode_into_std_write(record, &mut out, config()).map_err(|e| e.to_string())?;
    Ok(out)
}

fn decode<'de, T: Deserialize<'de>>(key: &[u8], value: &'de [u8]) -> Result<T, CacheError> {
    let corrupt = |reason: String| CacheError::Corrupt {
        key: key_text(key),
        reason,
    };
    let Some((&version, body)) = value.split_first() else {
        return Err(corrupt("empty record".into()));
    };
    if version != FORMAT_VERSION {
        return Err(CacheError::UnsupportedVersion {
            key: key_text(key),
            version,
        });
    }
    let (record, used) = bincode::serde::borrow_decode_from_slice(body, config())
        .map_err(|e| corrupt(e.to_string()))?;
    if used != body.len() {
        return Err(corrupt(format!(
            "{} unexpected bytes after the record",
            body.len() - used
        )));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CacheEntry {
        CacheEntry {
            dn: "CN=Bär,DC=example".into(),
            attributes: vec![
                ("cn".into(), vec!["Bär".as_bytes().to_vec()]),
                ("jpegPhoto".into(), vec![vec![0, 0xff, b'\n', 0]]),
                ("empty".into(), vec![vec![]]),
                ("none".into(), vec![]),
            ],
            modules: vec!["b".into(), "a".into()],
        }
    }

    #[test]
    fn entry_round_trips() {
        let e = sample();
        let bytes = encode_entry(&e).unwrap();
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode_entry(b"e:x", &bytes).unwrap(), e);
    }

    #[test]
    fn the_record_fits_the_capacity_allocated_for_it() {
        let mut big = sample();
        big.attributes
            .push(("jpegPhoto".into(), vec![vec![7; 70_000]; 3]));
        big.attributes
            .push(("description".into(), vec![vec![b'x'; 300]; 251]));
        big.modules = (0..300).map(|i| format!("module{i}")).collect();
        for e in [sample(), big, CacheEntry::default()] {
            let bytes = encode_entry(&e).unwrap();
            assert_eq!(bytes.len(), entry_capacity(&e), "length foreseen");
            assert_eq!(bytes.capacity(), entry_capacity(&e), "reallocated");
        }
    }

    #[test]
    fn values_are_encoded_as_length_and_raw_bytes() {
        // The documented layout: version, then varint lengths and raw bytes.
        let e = CacheEntry {
            dn: "cn=a".into(),
            attributes: vec![("cn".into(), vec![b"a".to_vec()])],
            modules: vec!["m".into()],
        };
        let bytes = encode_entry(&e).unwrap();
        let expected: &[u8] = &[
            1, // version
            4, b'c', b'n', b'=', b'a', // dn
            1,    // one attribute
            2, b'c', b'n', 1, 1, b'a', // "cn": ["a"]
            1, 1, b'm', // modules: ["m"]
        ];
        assert_eq!(bytes, expected);
    }

    #[test]
    fn master_and_count_round_trip() {
        let m = MasterRecord {
            notifier_id: u64::MAX,
            schema_id: 7,
        };
        assert_eq!(decode_master(&encode_master(m).unwrap()).unwrap(), m);
        assert_eq!(
            decode_count(&encode_count(100_000).unwrap()).unwrap(),
            100_000
        );
    }

    #[test]
    fn garbage_is_corrupt() {
        for garbage in [
            &b""[..],
            &[1],
            &[1, 0xff, 0xff, 0xff],
            // A length prefix claiming ~2^64 bytes must not allocate anything.
            &[1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            &[
                1, 4, b'c', b'n', b'=', b'a', 0xfd, 0, 0, 0, 0, 0, 0, 0, 0x40,
            ],
            // Invalid UTF-8 in the DN.
            &[1, 2, 0xc3, 0x28, 0, 0],
        ] {
            let err = decode_entry(b"e:cn=a", garbage).unwrap_err();
            assert!(
                matches!(&err, CacheError::Corrupt { key, .. } if key == "e:cn=a"),
                "{garbage:?}: {err}"
            );
        }
    }

    #[test]
    fn trailing_bytes_are_corrupt() {
        let mut bytes = encode_entry(&sample()).unwrap();
        bytes.push(0);
        let err = decode_entry(b"e:x", &bytes).unwrap_err();
        assert!(err.to_string().contains("1 unexpected bytes"), "{err}");
    }

    #[test]
    fn unknown_version_is_reported_as_such() {
        let mut bytes = encode_entry(&sample()).unwrap();
        bytes[0] = 2;
        let err = decode_entry(b"e:x", &bytes).unwrap_err();
        assert!(
            matches!(err, CacheError::UnsupportedVersion { ref key, version: 2 } if key == "e:x"),
            "{err}"
        );
        let err = decode_master(&[0, 1, 2]).unwrap_err();
        assert!(matches!(
            err,
            CacheError::UnsupportedVersion { version: 0, .. }
        ));
    }

    #[test]
    fn entry_keys_are_prefixed() {
        assert_eq!(entry_key("cn=a"), b"e:cn=a");
    }
}
