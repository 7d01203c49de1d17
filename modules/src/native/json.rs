//! The JSON object both native modules emit for one handler call:
//!
//! ```json
//! {"time":"2026-11-21T10:00:00.123456Z","id":7,"module":"jsonl","command":"a","dn":"…",
//!  "old":{},"new":{"cn":["x"],"jpegPhoto":[{"base64":"/9j/"}]}}
//! ```
//!
//! Keys come in exactly this order and attributes in server order, so the output is
//! byte-for-byte reproducible. A value is a JSON string when it is valid UTF-8 and
//! `{"base64":"…"}` (standard alphabet, padded) otherwise; a missing side is `{}`.

use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;
use serde::ser::{SerializeMap, SerializeSeq, Serializer};

use crate::module::{Attributes, Call};

/// The change as one JSON object, without a trailing newline.
pub(crate) fn change_json(
    module: &str,
    call: &Call<'_>,
    time: SystemTime,
) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::new();
    write_change_json(&mut out, module, call, time)?;
    Ok(out)
}

/// [`change_json`] appended to `out`, for a caller that reuses its buffer.
pub(crate) fn write_change_json(
    out: &mut Vec<u8>,
    module: &str,
    call: &Call<'_>,
    time: SystemTime,
) -> Result<(), serde_json::Error> {
    serde_json::to_writer(
        out,
        &Change {
            time: daemon::time::rfc3339_micros(time),
            id: call.id,
            module,
            command: call.command.as_char(),
            dn: call.dn,
            old: AttributeMap(call.old),
            new: AttributeMap(call.new),
        },
    )
}

// Field order is the JSON key order.
#[derive(Serialize)]
struct Change<'a> {
    time: String,
    id: u64,
    module: &'a str,
    command: char,
    dn: &'a str,
    old: AttributeMap<'a>,
    new: AttributeMap<'a>,
}

pub(crate) struct AttributeMap<'a>(pub(crate) &'a Attributes);

impl Serialize for AttributeMap<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, values) in self.0 {
            map.serialize_entry(name, &Values(values))?;
        }
        map.end()
    }
}

struct Values<'a>(&'a [Vec<u8>]);

impl Serialize for Values<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for value in self.0 {
            seq.serialize_element(&Value(value))?;
        }
        seq.end()
    }
}

struct Value<'a>(&'a [u8]);

impl Serialize for Value<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(self.0) {
            Ok(text) => serializer.serialize_str(text),
            Err(_) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("base64", &STANDARD.encode(self.0))?;
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::module::Command;
    use std::time::{Duration, UNIX_EPOCH};

    /// 2026-11-21T10:00:00.123456Z
    fn fixed_time() -> SystemTime {
        UNIX_EPOCH + Duration::new(1_795_255_200, 123_456_789)
    }

    fn attrs(items: &[(&str, &[&[u8]])]) -> Vec<(String, Vec<Vec<u8>>)> {
        items
            .iter()
            .map(|(name, values)| {
                (
                    name.to_string(),
                    values.iter().map(|v| v.to_vec()).collect(),
                )
            })
            .collect()
    }

    fn json(call: &Call<'_>) -> String {
        String::from_utf8(change_json("jsonl", call, fixed_time()).unwrap()).unwrap()
    }

    #[test]
    fn add_with_utf8_binary_and_attribute_order() {
        let new = attrs(&[
            ("objectClass", &[b"top", b"person"]),
            ("sn", &["Müller".as_bytes()]),
            ("jpegPhoto", &[b"\xff\xd8\xff\x00"]),
            ("description", &[b"tab\there \"quoted\" \\ \x01"]),
            ("cn", &[b"J, M\xc3\xbcller"]),
            ("empty", &[]),
        ]);
        let call = Call {
            id: 42,
            dn: r"cn=J\2C Müller,dc=x",
            command: Command::Add,
            new: &new,
            old: &[],
            transaction: 42,
            number: 1,
        };
        assert_eq!(
            json(&call),
            concat!(
                r#"{"time":"2026-11-21T10:00:00.123456Z","id":42,"module":"jsonl","command":"a","#,
                r#""dn":"cn=J\\2C Müller,dc=x","old":{},"new":{"objectClass":["top","person"],"#,
                r#""sn":["Müller"],"jpegPhoto":[{"base64":"/9j/AA=="}],"#,
                r#""description":["tab\there \"quoted\" \\ \u0001"],"cn":["J, Müller"],"empty":[]}}"#
            )
        );
    }

    #[test]
    fn delete_has_empty_new_and_keeps_old() {
        let old = attrs(&[("uid", &[b"a"]), ("cn", &[b"b", b"\x80"])]);
        let call = Call {
            id: u64::MAX,
            dn: "uid=a,dc=x",
            command: Command::Delete,
            new: &[],
            old: &old,
            transaction: u64::MAX,
            number: 1,
        };
        assert_eq!(
            json(&call),
            concat!(
                r#"{"time":"2026-11-21T10:00:00.123456Z","id":18446744073709551615,"#,
                r#""module":"jsonl","command":"d","dn":"uid=a,dc=x","#,
                r#""old":{"uid":["a"],"cn":["b",{"base64":"gA=="}]},"new":{}}"#
            )
        );
    }
}
