//! `tokio-util` codecs for both ends of a notifier connection.
//!
//! * [`ServerCodec`] (notifier side) decodes the client's byte stream line by line into
//!   [`ClientMessage`]s and encodes [`ServerMessage`]s.
//! * [`ClientCodec`] (listener and one-shot tools) decodes blank-line terminated blocks into
//!   [`ServerMessage`]s and encodes [`ClientFrame`]s.
//!
//! Errors are fatal for the connection: after any `Err` the caller should close it (which is
//! what UCS does on every protocol violation it detects).

use std::io;

use bytes::{Buf, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::capability::Capabilities;
use crate::error::ProtocolError;
use crate::frame::{
    ClientFrame, ClientMessage, MAX_FRAME_LEN, MSGID_UNSET, Request, ServerMessage,
};
use crate::line::parse_u32;

/// Default block limit of [`ClientCodec`]: responses carry DNs, which may be long.
pub const DEFAULT_MAX_BLOCK_LEN: usize = 64 * 1024;

/// Longest prefix of an offending line quoted in an error, so errors stay log-friendly.
const QUOTE_LIMIT: usize = 100;

/// The first `QUOTE_LIMIT` characters of `s`.
fn quote(s: &str) -> String {
    s.chars().take(QUOTE_LIMIT).collect()
}

/// Removes one trailing `\r`.
fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Position of the first `\n` in `src` at or after `from`.
fn find_newline(src: &[u8], from: usize) -> Option<usize> {
    src.get(from..)?
        .iter()
        .position(|&b| b == b'\n')
        .map(|p| p.saturating_add(from))
}

/// Server side of the protocol: decodes client lines, encodes server messages.
///
/// Unlike UCS, which parsed each `read()` on its own and required a request to arrive in one
/// TCP segment, this codec keeps a receive buffer: partial lines wait for more data, and a
/// `MSGID:` line stays pending until the next command line even across reads.
///
/// Size limit: a line may hold at most `max_frame_len - 1` bytes before its `\n` (any `\r`
/// counts). As soon as `max_frame_len` bytes are buffered without a newline, or a complete
/// line is longer, decoding fails with [`ProtocolError::FrameTooLarge`].
#[derive(Debug, Clone)]
pub struct ServerCodec {
    max_frame_len: usize,
    /// MSGID waiting for the next command line; `None` is UCS's "unset".
    pending_msgid: Option<u32>,
    /// Bytes at the front of the buffer already known to contain no `\n`, so feeding one
    /// byte at a time stays linear. Assumes the codec always sees the same buffer, as
    /// `Framed` guarantees; a different buffer can only delay a line, never cause a panic.
    scanned: usize,
}

impl Default for ServerCodec {
    fn default() -> Self {
        ServerCodec::new()
    }
}

impl ServerCodec {
    /// A codec with the UCS limit [`MAX_FRAME_LEN`].
    pub fn new() -> ServerCodec {
        ServerCodec::with_max_frame_len(MAX_FRAME_LEN)
    }

    /// A codec with a custom line limit (at least 1).
    pub fn with_max_frame_len(max_frame_len: usize) -> ServerCodec {
        ServerCodec {
            max_frame_len: max_frame_len.max(1),
            pending_msgid: None,
            scanned: 0,
        }
    }

    fn too_large(&mut self, src: &mut BytesMut) -> ProtocolError {
        // Drop what cannot be used so a caller that ignores the error cannot spin on it.
        src.clear();
        self.scanned = 0;
        ProtocolError::FrameTooLarge {
            max: self.max_frame_len,
        }
    }

    /// Interprets one complete line (terminator removed); `None` for lines that only change
    /// state or are empty.
    fn decode_line(&mut self, line: &[u8]) -> Result<Option<ClientMessage>, ProtocolError> {
        let line = strip_cr(line);
        if line.is_empty() {
            return Ok(None);
        }
        let text = std::str::from_utf8(line).map_err(|_| ProtocolError::InvalidUtf8)?;
        if let Some(rest) = text.strip_prefix("Version:") {
            let value = rest.trim_start_matches(' ');
            let v = parse_u32(value).ok_or_else(|| ProtocolError::BadVersion(quote(value)))?;
            // UCS resets the MSGID whenever a version is accepted.
            self.pending_msgid = None;
            return Ok(Some(ClientMessage::Version(v)));
        }
        if let Some(rest) = text.strip_prefix("Capabilities:") {
            return Ok(Some(ClientMessage::Capabilities(Capabilities::parse(rest))));
        }
        if let Some(rest) = text.strip_prefix("MSGID:") {
            // Unparsable values and the sentinel both mean "unset", so the next command is
            // dropped by the server just as UCS would drop it.
            self.pending_msgid =
                parse_u32(rest.trim_matches([' ', '\t'])).filter(|&k| k != MSGID_UNSET);
            return Ok(None);
        }
        let msgid = self.pending_msgid.take();
        let request = Request::parse(text)?;
        Ok(Some(ClientMessage::Request { msgid, request }))
    }
}

impl Decoder for ServerCodec {
    type Item = ClientMessage;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ClientMessage>, ProtocolError> {
        loop {
            let Some(nl) = find_newline(src, self.scanned) else {
                if src.len() >= self.max_frame_len {
                    return Err(self.too_large(src));
                }
                self.scanned = src.len();
                return Ok(None);
            };
            self.scanned = 0;
            if nl >= self.max_frame_len {
                return Err(self.too_large(src));
            }
            // `nl` is an index into `src`, so `nl + 1 <= src.len()`.
            let line = src.split_to(nl.saturating_add(1));
            let content = line.strip_suffix(b"\n").unwrap_or(&line);
            if let Some(msg) = self.decode_line(content)? {
                return Ok(Some(msg));
            }
        }
    }

    /// A partial line left at EOF is discarded, like UCS discarded unterminated fragments.
    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<ClientMessage>, ProtocolError> {
        match self.decode(src)? {
            Some(msg) => Ok(Some(msg)),
            None => {
                src.clear();
                self.scanned = 0;
                Ok(None)
            }
        }
    }
}

impl Encoder<ServerMessage> for ServerCodec {
    type Error = ProtocolError;

    fn encode(&mut self, item: ServerMessage, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        item.encode_into(dst)
    }
}

impl Encoder<&ServerMessage> for ServerCodec {
    type Error = ProtocolError;

    fn encode(&mut self, item: &ServerMessage, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        item.encode_into(dst)
    }
}

/// Client side of the protocol: decodes server blocks, encodes client frames.
///
/// A block ends with a blank line (`\n\n`; `\r\n` line ends are tolerated); blank lines
/// between blocks are skipped. A block may be at most `max_block_len` bytes including its
/// terminating blank line; once that many bytes are buffered without a complete block,
/// decoding fails with [`ProtocolError::FrameTooLarge`].
#[derive(Debug, Clone)]
pub struct ClientCodec {
    max_block_len: usize,
    /// Start of the first line not yet examined; all lines before it are non-blank.
    scanned: usize,
}

impl Default for ClientCodec {
    fn default() -> Self {
        ClientCodec::new()
    }
}

impl ClientCodec {
    /// A codec with the default limit [`DEFAULT_MAX_BLOCK_LEN`].
    pub fn new() -> ClientCodec {
        ClientCodec::with_max_block_len(DEFAULT_MAX_BLOCK_LEN)
    }

    /// A codec with a custom block limit (at least 1).
    pub fn with_max_block_len(max_block_len: usize) -> ClientCodec {
        ClientCodec {
            max_block_len: max_block_len.max(1),
            scanned: 0,
        }
    }

    fn too_large(&mut self, src: &mut BytesMut) -> ProtocolError {
        src.clear();
        self.scanned = 0;
        ProtocolError::FrameTooLarge {
            max: self.max_block_len,
        }
    }
}

/// Drops complete blank lines at the front of `src`.
fn skip_blank_lines(src: &mut BytesMut) {
    loop {
        if src.starts_with(b"\n") {
            src.advance(1);
        } else if src.starts_with(b"\r\n") {
            src.advance(2);
        } else {
            return;
        }
    }
}

/// Parses one block (terminating blank line removed).
fn parse_block(block: &[u8]) -> Result<ServerMessage, ProtocolError> {
    let text = std::str::from_utf8(block).map_err(|_| ProtocolError::InvalidUtf8)?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let first = lines.next().unwrap_or_default();

    if let Some(rest) = first.strip_prefix("Version:") {
        let value = rest.trim();
        let version = parse_u32(value).ok_or_else(|| ProtocolError::BadVersion(quote(value)))?;
        // Further `Name: value` headers; only Capabilities is known, others are ignored so a
        // future server may add some.
        let mut capabilities = Capabilities::new();
        for line in lines {
            if let Some(("Capabilities", value)) = line.split_once(':') {
                capabilities = Capabilities::parse(value);
            }
        }
        return Ok(ServerMessage::Handshake {
            version,
            capabilities,
        });
    }
    if let Some(rest) = first.strip_prefix("MSGID:") {
        let value = rest.trim();
        let msgid = parse_u32(value).ok_or_else(|| ProtocolError::BadMsgId(quote(value)))?;
        let body = lines.collect::<Vec<_>>().join("\n");
        return Ok(ServerMessage::Response { msgid, body });
    }
    Err(ProtocolError::UnexpectedBlock(quote(first)))
}

impl Decoder for ClientCodec {
    type Item = ServerMessage;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ServerMessage>, ProtocolError> {
        if self.scanned == 0 {
            skip_blank_lines(src);
        }
        let mut line_start = self.scanned.min(src.len());
        while let Some(nl) = find_newline(src, line_start) {
            let line = src.get(line_start..nl).unwrap_or_default();
            if strip_cr(line).is_empty() {
                // Blank line: the block is everything before it.
                let consumed = nl.saturating_add(1);
                if consumed > self.max_block_len {
                    return Err(self.too_large(src));
                }
                self.scanned = 0;
                let block = src.split_to(consumed);
                let content = block.get(..line_start).unwrap_or_default();
                return parse_block(content).map(Some);
            }
            line_start = nl.saturating_add(1);
        }
        if src.len() >= self.max_block_len {
            return Err(self.too_large(src));
        }
        self.scanned = line_start;
        Ok(None)
    }

    /// EOF between blocks is a clean end; EOF inside a block is an
    /// [`io::ErrorKind::UnexpectedEof`] error, since a truncated answer (say, half a
    /// transaction ID) must not be trusted.
    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<ServerMessage>, ProtocolError> {
        if let Some(msg) = self.decode(src)? {
            return Ok(Some(msg));
        }
        let leftover = src.len();
        let only_blank = src.iter().all(|&b| b == b'\n' || b == b'\r');
        src.clear();
        self.scanned = 0;
        if only_blank {
            Ok(None)
        } else {
            Err(ProtocolError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed in the middle of a message ({leftover} bytes unparsed)"),
            )))
        }
    }
}

impl Encoder<ClientFrame> for ClientCodec {
    type Error = ProtocolError;

    fn encode(&mut self, item: ClientFrame, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        item.encode_into(dst)
    }
}

impl Encoder<&ClientFrame> for ClientCodec {
    type Error = ProtocolError;

    fn encode(&mut self, item: &ClientFrame, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        item.encode_into(dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::line::TransactionId;

    /// Decodes everything decodable from `input` in one go.
    fn server_decode(codec: &mut ServerCodec, input: &[u8]) -> Vec<ClientMessage> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(m) = codec.decode(&mut buf).unwrap() {
            out.push(m);
        }
        out
    }

    fn req(msgid: Option<u32>, request: Request) -> ClientMessage {
        ClientMessage::Request { msgid, request }
    }

    #[test]
    fn server_version_forms() {
        let mut c = ServerCodec::new();
        assert_eq!(
            server_decode(&mut c, b"Version: 3\nVersion:2\nVersion:   0\n"),
            [
                ClientMessage::Version(3),
                ClientMessage::Version(2),
                ClientMessage::Version(0)
            ]
        );
        for bad in [
            &b"Version: 3x\n"[..],
            b"Version: \n",
            b"Version: -1\n",
            b"Version: +3\n",
            b"Version: 3 \n",
            b"Version: 4294967296\n",
        ] {
            let mut buf = BytesMut::from(bad);
            let r = ServerCodec::new().decode(&mut buf);
            assert!(matches!(r, Err(ProtocolError::BadVersion(_))), "{bad:?}");
        }
        let mut buf = BytesMut::from(&b"Version: 4294967295\n"[..]);
        assert_eq!(
            ServerCodec::new().decode(&mut buf).unwrap(),
            Some(ClientMessage::Version(u32::MAX))
        );
    }

    #[test]
    fn server_version_resets_pending_msgid() {
        let mut c = ServerCodec::new();
        assert_eq!(
            server_decode(&mut c, b"MSGID: 5\nVersion: 3\nGET_ID\n"),
            [ClientMessage::Version(3), req(None, Request::GetId)]
        );
    }

    #[test]
    fn server_capabilities_forms() {
        let mut c = ServerCodec::new();
        assert_eq!(
            server_decode(
                &mut c,
                b"Capabilities: \nCapabilities:\nCapabilities: STARTTLS,X\n"
            ),
            [
                ClientMessage::Capabilities(Capabilities::new()),
                ClientMessage::Capabilities(Capabilities::new()),
                ClientMessage::Capabilities(Capabilities::parse("STARTTLS X")),
            ]
        );
    }

    #[test]
    fn server_msgid_forms() {
        let mut c = ServerCodec::new();
        let got = server_decode(
            &mut c,
            b"MSGID: 1\nALIVE\nMSGID:2\nALIVE\nMSGID: 3 \nALIVE\nMSGID: x\nALIVE\n\
              MSGID: 4294967296\nALIVE\nMSGID: 4294967294\nALIVE\nMSGID: 0\nALIVE\n",
        );
        assert_eq!(
            got,
            [
                req(Some(1), Request::Alive),
                req(Some(2), Request::Alive),
                req(Some(3), Request::Alive),
                req(None, Request::Alive),
                req(None, Request::Alive),
                req(Some(4294967294), Request::Alive),
                req(Some(0), Request::Alive),
            ]
        );
    }

    #[test]
    fn server_second_msgid_replaces_first() {
        let mut c = ServerCodec::new();
        assert_eq!(
            server_decode(&mut c, b"MSGID: 1\nMSGID: 2\nGET_ID\nGET_ID\n"),
            [req(Some(2), Request::GetId), req(None, Request::GetId)]
        );
        // An unusable MSGID also replaces (clears) the pending one.
        assert_eq!(
            server_decode(&mut c, b"MSGID: 1\nMSGID: 4294967295\nGET_ID\n"),
            [req(None, Request::GetId)]
        );
    }

    #[test]
    fn server_msgid_survives_reads() {
        let mut c = ServerCodec::new();
        assert!(server_decode(&mut c, b"MSGID: 9\n").is_empty());
        assert_eq!(c.pending_msgid, Some(9));
        assert_eq!(
            server_decode(&mut c, b"WAIT_ID 7\n"),
            [req(Some(9), Request::WaitId(TransactionId(7)))]
        );
        assert_eq!(c.pending_msgid, None);
    }

    #[test]
    fn server_bad_argument_closes() {
        let mut buf = BytesMut::from(&b"MSGID: 1\nWAIT_ID abc\n"[..]);
        match ServerCodec::new().decode(&mut buf) {
            Err(ProtocolError::BadArgument { command, argument }) => {
                assert_eq!(command, "WAIT_ID");
                assert_eq!(argument, "abc");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn server_line_limit_boundary() {
        let max = 16;
        // 15 bytes of content plus the newline: accepted.
        let ok = format!("{}\n", "x".repeat(max - 1));
        let mut c = ServerCodec::with_max_frame_len(max);
        assert_eq!(
            server_decode(&mut c, ok.as_bytes()),
            [req(None, Request::Unknown("x".repeat(max - 1)))]
        );
        // 16 bytes of content: too large, whether or not the newline has arrived.
        for input in [format!("{}\n", "x".repeat(max)), "x".repeat(max)] {
            let mut buf = BytesMut::from(input.as_bytes());
            let r = ServerCodec::with_max_frame_len(max).decode(&mut buf);
            assert!(
                matches!(r, Err(ProtocolError::FrameTooLarge { max: 16 })),
                "{input:?}"
            );
            assert!(buf.is_empty());
        }
        // 15 bytes without newline: still waiting.
        let mut buf = BytesMut::from("x".repeat(max - 1).as_bytes());
        let mut c = ServerCodec::with_max_frame_len(max);
        assert_eq!(c.decode(&mut buf).unwrap(), None);
        assert_eq!(buf.len(), max - 1);
        // The limit is per line, not per read.
        let many = "MSGID: 1\nGET_ID\n".repeat(10);
        assert_eq!(
            server_decode(&mut ServerCodec::with_max_frame_len(max), many.as_bytes()).len(),
            10
        );
    }

    #[test]
    fn server_zero_limit_is_one() {
        let mut c = ServerCodec::with_max_frame_len(0);
        assert_eq!(c.max_frame_len, 1);
        let mut buf = BytesMut::from(&b"\n\n"[..]);
        assert_eq!(c.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn server_invalid_utf8() {
        let mut buf = BytesMut::from(&b"MSGID: 1\nGET_\xffID\n"[..]);
        assert!(matches!(
            ServerCodec::new().decode(&mut buf),
            Err(ProtocolError::InvalidUtf8)
        ));
    }

    #[test]
    fn server_eof_discards_partial_line() {
        let mut c = ServerCodec::new();
        let mut buf = BytesMut::from(&b"MSGID: 1\nGET_ID\nMSGID: 2\nGET_"[..]);
        assert_eq!(
            c.decode_eof(&mut buf).unwrap(),
            Some(req(Some(1), Request::GetId))
        );
        assert_eq!(c.decode_eof(&mut buf).unwrap(), None);
        assert!(buf.is_empty());
    }

    #[test]
    fn server_whitespace_only_line_is_a_command() {
        let mut c = ServerCodec::new();
        assert_eq!(
            server_decode(&mut c, b"MSGID: 1\n  \n"),
            [req(Some(1), Request::Unknown("  ".into()))]
        );
    }

    fn client_decode(codec: &mut ClientCodec, input: &[u8]) -> Vec<ServerMessage> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(m) = codec.decode(&mut buf).unwrap() {
            out.push(m);
        }
        out
    }

    #[test]
    fn client_handshake_headers() {
        let mut c = ClientCodec::new();
        assert_eq!(
            client_decode(
                &mut c,
                b"Version: 2\nX-Future: 1\nCapabilities: STARTTLS\nnoise\n\n"
            ),
            [ServerMessage::Handshake {
                version: 2,
                capabilities: Capabilities::parse("STARTTLS"),
            }]
        );
        assert_eq!(
            client_decode(&mut c, b"Version: 3\n\n"),
            [ServerMessage::handshake_reply(3)]
        );
        let mut buf = BytesMut::from(&b"Version: x\nCapabilities: \n\n"[..]);
        assert!(matches!(
            c.decode(&mut buf),
            Err(ProtocolError::BadVersion(v)) if v == "x"
        ));
    }

    #[test]
    fn client_response_forms() {
        let mut c = ClientCodec::new();
        assert_eq!(
            client_decode(&mut c, b"MSGID: 1\n42\n\nMSGID: 2\n\n\nMSGID: 3\na\nb\n\n"),
            [
                ServerMessage::response(1, "42"),
                ServerMessage::response(2, ""),
                ServerMessage::response(3, "a\nb"),
            ]
        );
    }

    #[test]
    fn client_crlf() {
        let mut c = ClientCodec::new();
        assert_eq!(
            client_decode(
                &mut c,
                b"Version: 3\r\nCapabilities: \r\n\r\nMSGID: 1\r\n42\r\n\r\n"
            ),
            [
                ServerMessage::handshake_reply(3),
                ServerMessage::response(1, "42")
            ]
        );
    }

    #[test]
    fn client_errors() {
        for (input, check) in [
            (
                &b"MSGID: x\n1\n\n"[..],
                (|e: &ProtocolError| matches!(e, ProtocolError::BadMsgId(v) if v == "x"))
                    as fn(&ProtocolError) -> bool,
            ),
            (b"MSGID: 4294967296\n1\n\n", |e| {
                matches!(e, ProtocolError::BadMsgId(_))
            }),
            (
                b"HELLO\n\n",
                |e| matches!(e, ProtocolError::UnexpectedBlock(v) if v == "HELLO"),
            ),
            (b"MSGID: 1\n\xff\n\n", |e| {
                matches!(e, ProtocolError::InvalidUtf8)
            }),
        ] {
            let mut buf = BytesMut::from(input);
            let err = ClientCodec::new().decode(&mut buf).unwrap_err();
            assert!(check(&err), "{input:?}: {err:?}");
        }
    }

    #[test]
    fn client_block_limit_boundary() {
        // A 12-byte block is exactly at a 12-byte limit.
        let block = b"MSGID: 1\nx\n\n";
        let max = block.len();
        let mut c = ClientCodec::with_max_block_len(max);
        assert_eq!(
            client_decode(&mut c, block),
            [ServerMessage::response(1, "x")]
        );
        let mut buf = BytesMut::from(&b"MSGID: 1\nxy\n\n"[..]);
        assert!(matches!(
            ClientCodec::with_max_block_len(max).decode(&mut buf),
            Err(ProtocolError::FrameTooLarge { max: m }) if m == max
        ));
        // max - 1 bytes without an end: waiting; max bytes: error.
        let mut buf = BytesMut::from(&block[..max - 1]);
        let mut c = ClientCodec::with_max_block_len(max);
        assert_eq!(c.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"z");
        assert!(matches!(
            c.decode(&mut buf),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn client_eof() {
        let mut c = ClientCodec::new();
        let mut buf = BytesMut::from(&b"MSGID: 1\n42\n\n\n"[..]);
        assert_eq!(
            c.decode_eof(&mut buf).unwrap(),
            Some(ServerMessage::response(1, "42"))
        );
        assert_eq!(c.decode_eof(&mut buf).unwrap(), None);

        let mut buf = BytesMut::from(&b"MSGID: 2\n4"[..]);
        match c.decode_eof(&mut buf) {
            Err(ProtocolError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("{other:?}"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            ProtocolError::FrameTooLarge { max: 8192 }.to_string(),
            "message too large: no end of message within 8192 bytes"
        );
        assert_eq!(
            ProtocolError::BadVersion("3x".into()).to_string(),
            "invalid protocol version \"3x\": expected an unsigned decimal number"
        );
        assert_eq!(
            ProtocolError::BadArgument {
                command: "WAIT_ID".into(),
                argument: "x".into()
            }
            .to_string(),
            "invalid argument \"x\" for WAIT_ID: expected an unsigned decimal transaction ID"
        );
        let long = "y".repeat(500);
        let mut buf = BytesMut::from(format!("{long}\n\n").as_bytes());
        match ClientCodec::new().decode(&mut buf) {
            Err(ProtocolError::UnexpectedBlock(q)) => assert_eq!(q.len(), QUOTE_LIMIT),
            other => panic!("{other:?}"),
        }
    }
}
