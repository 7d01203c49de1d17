//! Typed protocol messages and their wire text.
//!
//! Directions and points of view are kept apart on purpose: the server decodes
//! [`ClientMessage`]s (one per line, because UCS servers are line based) while the client
//! encodes [`ClientFrame`]s (whole blocks); both sides agree on [`ServerMessage`].

use std::fmt;

use bytes::BytesMut;

use crate::capability::Capabilities;
use crate::error::ProtocolError;
use crate::line::{TransactionId, parse_u64};

/// UCS closes a connection once 8192 or more request bytes are pending.
pub const MAX_FRAME_LEN: usize = 8192;

/// Highest protocol version spoken; higher client versions are clamped to it.
pub const MAX_VERSION: u32 = 3;

/// The MSGID value UCS uses as "unset"; a request carrying it is treated as having none.
pub(crate) const MSGID_UNSET: u32 = u32::MAX;

/// The version the server answers for a client that asked for `v`: `min(v, MAX_VERSION)`.
pub const fn clamp_version(v: u32) -> u32 {
    if v > MAX_VERSION { MAX_VERSION } else { v }
}

/// A request command line.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Request {
    /// `GET_DN <id>` (protocol 1 and 2): the transaction line for `id`, blocking until it
    /// exists.
    GetDn(TransactionId),
    /// `WAIT_ID <id>` (protocol 3): the last ID once it is at least `id`.
    WaitId(TransactionId),
    /// `GET_ID`: the current last ID.
    GetId,
    /// `GET_SCHEMA_ID`: the current schema ID.
    GetSchemaId,
    /// `ALIVE`: keep-alive, answered with `OKAY`.
    Alive,
    /// Any other line, verbatim. The server drops these silently.
    Unknown(String),
}

impl Request {
    /// Wire name of `GET_DN`.
    pub const GET_DN: &'static str = "GET_DN";
    /// Wire name of `WAIT_ID`.
    pub const WAIT_ID: &'static str = "WAIT_ID";
    /// Wire name of `GET_ID`.
    pub const GET_ID: &'static str = "GET_ID";
    /// Wire name of `GET_SCHEMA_ID`.
    pub const GET_SCHEMA_ID: &'static str = "GET_SCHEMA_ID";
    /// Wire name of `ALIVE`.
    pub const ALIVE: &'static str = "ALIVE";

    /// Parses one command line (without its line terminator).
    ///
    /// Commands match exactly after trailing whitespace is trimmed (UCS matched by prefix,
    /// which made `GET_IDX` a `GET_ID`). `GET_DN`/`WAIT_ID` need one argument of decimal
    /// digits that fits 64 bits; anything else there is a [`ProtocolError::BadArgument`],
    /// which the server answers by closing, like the UCS `WAIT_ID` check. Unrecognised lines
    /// become [`Request::Unknown`] with the line unchanged.
    pub fn parse(line: &str) -> Result<Request, ProtocolError> {
        let trimmed = line.trim_end();
        match trimmed {
            Self::GET_ID => return Ok(Request::GetId),
            Self::GET_SCHEMA_ID => return Ok(Request::GetSchemaId),
            Self::ALIVE => return Ok(Request::Alive),
            _ => {}
        }
        let (word, arg) = trimmed.split_once(' ').unwrap_or((trimmed, ""));
        let make: fn(TransactionId) -> Request = match word {
            Self::GET_DN => Request::GetDn,
            Self::WAIT_ID => Request::WaitId,
            _ => return Ok(Request::Unknown(line.to_owned())),
        };
        let arg = arg.trim_start_matches(' ');
        parse_u64(arg)
            .map(|v| make(TransactionId(v)))
            .ok_or_else(|| ProtocolError::BadArgument {
                command: word.to_owned(),
                argument: arg.to_owned(),
            })
    }

    /// Checks that the request can be sent as one line the server reads back unchanged.
    fn check_encodable(&self) -> Result<(), ProtocolError> {
        if let Request::Unknown(s) = self {
            if s.is_empty() {
                // An empty line is skipped by the server and would leave the MSGID pending
                // for whatever command comes next.
                return Err(ProtocolError::Unencodable("empty request line".to_owned()));
            }
            if s.contains(['\n', '\r']) {
                return Err(ProtocolError::Unencodable(
                    "request text contains a line break".to_owned(),
                ));
            }
        }
        Ok(())
    }
}

impl fmt::Display for Request {
    /// The command line without its newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::GetDn(id) => write!(f, "{} {id}", Self::GET_DN),
            Request::WaitId(id) => write!(f, "{} {id}", Self::WAIT_ID),
            Request::GetId => f.write_str(Self::GET_ID),
            Request::GetSchemaId => f.write_str(Self::GET_SCHEMA_ID),
            Request::Alive => f.write_str(Self::ALIVE),
            Request::Unknown(s) => f.write_str(s),
        }
    }
}

/// Client to server, as the server decodes it (one item per meaningful line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientMessage {
    /// `Version: <v>`, not clamped: the server applies its minimum and clamps.
    Version(u32),
    /// `Capabilities: <list>`; the server replies to the handshake on this line.
    Capabilities(Capabilities),
    /// A command line. `msgid` is `None` when no usable `MSGID:` preceded it; the server must
    /// then ignore the request.
    Request {
        /// The pending MSGID, consumed by this request.
        msgid: Option<u32>,
        /// The command.
        request: Request,
    },
}

/// Server to client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerMessage {
    /// `Version: <v>\nCapabilities: <list>\n\n`.
    Handshake {
        /// Negotiated (clamped) version.
        version: u32,
        /// Negotiated capabilities: empty, or `STARTTLS` when both sides want TLS.
        capabilities: Capabilities,
    },
    /// `MSGID: <k>\n<body>\n\n`.
    Response {
        /// The MSGID of the request being answered.
        msgid: u32,
        /// The answer without a trailing newline; several lines are joined by `\n`.
        body: String,
    },
}

impl ServerMessage {
    /// The handshake answer for a client that sent `Version: client_version`: the clamped
    /// version and no capabilities, exactly like UCS.
    pub fn handshake_reply(client_version: u32) -> ServerMessage {
        ServerMessage::Handshake {
            version: clamp_version(client_version),
            capabilities: Capabilities::new(),
        }
    }

    /// A response block.
    pub fn response(msgid: u32, body: impl Into<String>) -> ServerMessage {
        ServerMessage::Response {
            msgid,
            body: body.into(),
        }
    }

    /// Appends the wire bytes to `dst`.
    ///
    /// Fails with [`ProtocolError::Unencodable`] for a body containing an empty line (or a
    /// line ending in `\r`), which the client would take as the end of the block.
    pub fn encode_into(&self, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        match self {
            ServerMessage::Handshake {
                version,
                capabilities,
            } => put_handshake(dst, *version, capabilities),
            ServerMessage::Response { msgid, body } => {
                check_body(body)?;
                put_block(dst, *msgid, body);
            }
        }
        Ok(())
    }
}

/// Client to server, as the client encodes it (whole blocks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientFrame {
    /// `Version: <v>\nCapabilities: <list>\n\n`.
    Handshake {
        /// Requested version.
        version: u32,
        /// Requested capabilities.
        capabilities: Capabilities,
    },
    /// `MSGID: <k>\n<command>\n\n`.
    Request {
        /// Per-connection request number; must not be [`MSGID_UNSET`].
        msgid: u32,
        /// The command.
        request: Request,
    },
}

impl ClientFrame {
    /// A handshake asking for `version` and no capabilities, like every UCS client.
    pub fn handshake(version: u32) -> ClientFrame {
        ClientFrame::Handshake {
            version,
            capabilities: Capabilities::new(),
        }
    }

    /// A request block.
    pub fn request(msgid: u32, request: Request) -> ClientFrame {
        ClientFrame::Request { msgid, request }
    }

    /// Appends the wire bytes to `dst`.
    ///
    /// Fails with [`ProtocolError::Unencodable`] for MSGID 4294967295 (the server would
    /// silently drop the request) and for an [`Request::Unknown`] text that is empty or
    /// contains a line break.
    pub fn encode_into(&self, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        match self {
            ClientFrame::Handshake {
                version,
                capabilities,
            } => put_handshake(dst, *version, capabilities),
            ClientFrame::Request { msgid, request } => {
                if *msgid == MSGID_UNSET {
                    return Err(ProtocolError::Unencodable(format!(
                        "MSGID {MSGID_UNSET} means \"unset\" to the server, which would drop \
                         the request"
                    )));
                }
                request.check_encodable()?;
                put_block(dst, *msgid, &request.to_string());
            }
        }
        Ok(())
    }
}

/// A body must not contain a line the client would read as the terminating blank line.
fn check_body(body: &str) -> Result<(), ProtocolError> {
    if body.is_empty() {
        return Ok(());
    }
    if body.split('\n').any(|l| l.is_empty() || l.ends_with('\r')) {
        return Err(ProtocolError::Unencodable(
            "response body contains an empty line or a line ending in a carriage return, \
             which would end the message early or be altered"
                .to_owned(),
        ));
    }
    Ok(())
}

fn put_handshake(dst: &mut BytesMut, version: u32, caps: &Capabilities) {
    // The space after "Capabilities:" is sent even for an empty list, as UCS does.
    let text = format!("Version: {version}\nCapabilities: {caps}\n\n");
    dst.extend_from_slice(text.as_bytes());
}

fn put_block(dst: &mut BytesMut, msgid: u32, body: &str) {
    let head = format!("MSGID: {msgid}\n");
    dst.reserve(head.len().saturating_add(body.len()).saturating_add(2));
    dst.extend_from_slice(head.as_bytes());
    dst.extend_from_slice(body.as_bytes());
    dst.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_bytes(m: &ServerMessage) -> Vec<u8> {
        let mut b = BytesMut::new();
        m.encode_into(&mut b).unwrap();
        b.to_vec()
    }

    fn client_bytes(m: &ClientFrame) -> Vec<u8> {
        let mut b = BytesMut::new();
        m.encode_into(&mut b).unwrap();
        b.to_vec()
    }

    #[test]
    fn clamp() {
        assert_eq!(clamp_version(0), 0);
        assert_eq!(clamp_version(2), 2);
        assert_eq!(clamp_version(3), 3);
        assert_eq!(clamp_version(4), 3);
        assert_eq!(clamp_version(9), 3);
        assert_eq!(clamp_version(u32::MAX), 3);
    }

    #[test]
    fn handshake_reply_bytes() {
        assert_eq!(
            server_bytes(&ServerMessage::handshake_reply(9)),
            b"Version: 3\nCapabilities: \n\n"
        );
        assert_eq!(
            server_bytes(&ServerMessage::handshake_reply(2)),
            b"Version: 2\nCapabilities: \n\n"
        );
    }

    #[test]
    fn response_bytes() {
        assert_eq!(
            server_bytes(&ServerMessage::response(1, "42")),
            b"MSGID: 1\n42\n\n"
        );
        assert_eq!(
            server_bytes(&ServerMessage::response(7, "")),
            b"MSGID: 7\n\n\n"
        );
        assert_eq!(
            server_bytes(&ServerMessage::response(7, "a\nb")),
            b"MSGID: 7\na\nb\n\n"
        );
    }

    #[test]
    fn response_body_that_breaks_framing_is_refused() {
        for body in ["a\n\nb", "\na", "a\n", "a\r", "a\r\nb", "\r"] {
            let mut b = BytesMut::new();
            let err = ServerMessage::response(1, body).encode_into(&mut b);
            assert!(
                matches!(err, Err(ProtocolError::Unencodable(_))),
                "{body:?}"
            );
            assert!(b.is_empty());
        }
    }

    #[test]
    fn request_bytes() {
        let cases = [
            (
                Request::GetDn(TransactionId(40)),
                &b"MSGID: 1\nGET_DN 40\n\n"[..],
            ),
            (
                Request::WaitId(TransactionId(43)),
                b"MSGID: 1\nWAIT_ID 43\n\n",
            ),
            (Request::GetId, b"MSGID: 1\nGET_ID\n\n"),
            (Request::GetSchemaId, b"MSGID: 1\nGET_SCHEMA_ID\n\n"),
            (Request::Alive, b"MSGID: 1\nALIVE\n\n"),
            (
                Request::Unknown("GET_SCHEMA_DN 6".into()),
                b"MSGID: 1\nGET_SCHEMA_DN 6\n\n",
            ),
        ];
        for (req, want) in cases {
            assert_eq!(client_bytes(&ClientFrame::request(1, req)), want);
        }
        assert_eq!(
            client_bytes(&ClientFrame::handshake(3)),
            b"Version: 3\nCapabilities: \n\n"
        );
        assert_eq!(
            client_bytes(&ClientFrame::Handshake {
                version: 3,
                capabilities: Capabilities::parse("STARTTLS"),
            }),
            b"Version: 3\nCapabilities: STARTTLS\n\n"
        );
    }

    #[test]
    fn unencodable_requests() {
        for frame in [
            ClientFrame::request(MSGID_UNSET, Request::GetId),
            ClientFrame::request(1, Request::Unknown(String::new())),
            ClientFrame::request(1, Request::Unknown("A\nB".into())),
            ClientFrame::request(1, Request::Unknown("A\r".into())),
        ] {
            let mut b = BytesMut::new();
            assert!(
                matches!(
                    frame.encode_into(&mut b),
                    Err(ProtocolError::Unencodable(_))
                ),
                "{frame:?}"
            );
            assert!(b.is_empty());
        }
    }

    #[test]
    fn request_parse() {
        assert_eq!(Request::parse("GET_ID").unwrap(), Request::GetId);
        assert_eq!(Request::parse("GET_ID \t").unwrap(), Request::GetId);
        assert_eq!(
            Request::parse("GET_SCHEMA_ID").unwrap(),
            Request::GetSchemaId
        );
        assert_eq!(Request::parse("ALIVE").unwrap(), Request::Alive);
        assert_eq!(
            Request::parse("GET_DN 40").unwrap(),
            Request::GetDn(TransactionId(40))
        );
        assert_eq!(
            Request::parse("WAIT_ID  43 ").unwrap(),
            Request::WaitId(TransactionId(43))
        );
        assert_eq!(
            Request::parse("WAIT_ID 0").unwrap(),
            Request::WaitId(TransactionId(0))
        );
        assert_eq!(
            Request::parse("GET_IDX").unwrap(),
            Request::Unknown("GET_IDX".into())
        );
        assert_eq!(
            Request::parse("GET_ID 5").unwrap(),
            Request::Unknown("GET_ID 5".into())
        );
        assert_eq!(
            Request::parse(" ALIVE").unwrap(),
            Request::Unknown(" ALIVE".into())
        );
        assert_eq!(
            Request::parse("alive").unwrap(),
            Request::Unknown("alive".into())
        );
    }

    #[test]
    fn request_parse_bad_arguments() {
        for (line, command, argument) in [
            ("GET_DN", "GET_DN", ""),
            ("GET_DN ", "GET_DN", ""),
            ("GET_DN x", "GET_DN", "x"),
            ("GET_DN -1", "GET_DN", "-1"),
            ("GET_DN 40 41", "GET_DN", "40 41"),
            ("WAIT_ID 43x", "WAIT_ID", "43x"),
            (
                "WAIT_ID 18446744073709551616",
                "WAIT_ID",
                "18446744073709551616",
            ),
        ] {
            match Request::parse(line) {
                Err(ProtocolError::BadArgument {
                    command: c,
                    argument: a,
                }) => {
                    assert_eq!((c.as_str(), a.as_str()), (command, argument), "{line:?}");
                }
                other => panic!("{line:?}: {other:?}"),
            }
        }
    }
}
