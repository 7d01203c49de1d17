//! Property tests: round trips between the two codecs and robustness against arbitrary input.

// Test helpers outside #[test] fns are not covered by clippy.toml's test exemptions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::BytesMut;
use proptest::prelude::*;
use proto::codec::{ClientCodec, ServerCodec};
use proto::frame::{ClientFrame, ClientMessage, Request, ServerMessage};
use proto::line::{Command, Transaction, TransactionId, parse_get_dn_body};
use proto::{Capabilities, Capability};
use tokio_util::codec::{Decoder, Encoder};

fn capability() -> impl Strategy<Value = Capability> {
    prop_oneof![
        Just(Capability::StartTls),
        "[A-Za-z0-9_.=-]{1,12}".prop_map(|s| Capability::from_token(&s)),
    ]
}

fn capabilities() -> impl Strategy<Value = Capabilities> {
    prop::collection::vec(capability(), 0..4).prop_map(|v| v.into_iter().collect())
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        any::<u64>().prop_map(|n| Request::GetDn(TransactionId(n))),
        any::<u64>().prop_map(|n| Request::WaitId(TransactionId(n))),
        Just(Request::GetId),
        Just(Request::GetSchemaId),
        Just(Request::Alive),
        // A lowercase first letter can never collide with a keyword or header; the rest may
        // be anything that keeps the text on one line.
        "[a-z][^\n\r]{0,40}".prop_map(Request::Unknown),
    ]
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        (any::<u32>(), capabilities()).prop_map(|(version, capabilities)| {
            ClientFrame::Handshake {
                version,
                capabilities,
            }
        }),
        (0..u32::MAX, request())
            .prop_map(|(msgid, request)| ClientFrame::Request { msgid, request }),
    ]
}

/// What the server decodes from one client frame.
fn expected_messages(frame: &ClientFrame) -> Vec<ClientMessage> {
    match frame {
        ClientFrame::Handshake {
            version,
            capabilities,
        } => vec![
            ClientMessage::Version(*version),
            ClientMessage::Capabilities(capabilities.clone()),
        ],
        ClientFrame::Request { msgid, request } => vec![ClientMessage::Request {
            msgid: Some(*msgid),
            request: request.clone(),
        }],
    }
}

fn body() -> impl Strategy<Value = String> {
    prop::collection::vec("[^\n\r]{1,30}", 0..4).prop_map(|lines| lines.join("\n"))
}

fn server_message() -> impl Strategy<Value = ServerMessage> {
    prop_oneof![
        (any::<u32>(), capabilities()).prop_map(|(version, capabilities)| {
            ServerMessage::Handshake {
                version,
                capabilities,
            }
        }),
        (any::<u32>(), body()).prop_map(|(msgid, body)| ServerMessage::Response { msgid, body }),
    ]
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        Just(Command::Add),
        Just(Command::Modify),
        Just(Command::Delete),
        Just(Command::ModRdn),
        Just(Command::Init),
    ]
}

fn transaction() -> impl Strategy<Value = Transaction> {
    (1..=u64::MAX, "[^\n\r\x00]{1,60}", command())
        .prop_map(|(id, dn, command)| Transaction::new(TransactionId(id), dn, command))
}

/// Bytes that are mostly protocol fragments, so decoders get deep into their states.
fn protocolish_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        prop::collection::vec(any::<u8>(), 1..8),
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\n\n".to_vec()),
        Just(b"MSGID: ".to_vec()),
        Just(b"Version: ".to_vec()),
        Just(b"Capabilities: ".to_vec()),
        Just(b"GET_DN ".to_vec()),
        Just(b"WAIT_ID ".to_vec()),
        Just(b"GET_ID".to_vec()),
        Just(b"4294967295".to_vec()),
        Just(b"42".to_vec()),
        Just(b" ".to_vec()),
    ];
    prop::collection::vec(piece, 0..60).prop_map(|v| v.concat())
}

/// Feeds `data` in the given chunk sizes and decodes until each chunk is exhausted, then
/// signals EOF; stops at the first error like a real connection would.
fn drive<D: Decoder>(mut codec: D, data: &[u8], chunk: usize) -> Vec<D::Item> {
    let mut out = Vec::new();
    let mut buf = BytesMut::new();
    for piece in data.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(_) => return out,
            }
        }
    }
    while let Ok(Some(m)) = codec.decode_eof(&mut buf) {
        out.push(m);
    }
    out
}

proptest! {
    #[test]
    fn client_frames_round_trip(frames in prop::collection::vec(client_frame(), 1..8),
                                chunk in 1usize..64) {
        let mut enc = ClientCodec::new();
        let mut wire = BytesMut::new();
        for f in &frames {
            enc.encode(f, &mut wire).unwrap();
        }
        let want: Vec<ClientMessage> = frames.iter().flat_map(expected_messages).collect();
        // One read, and arbitrary chunking: same result.
        let mut dec = ServerCodec::new();
        let mut buf = wire.clone();
        let mut got = Vec::new();
        while let Some(m) = dec.decode(&mut buf).unwrap() {
            got.push(m);
        }
        prop_assert_eq!(&got, &want);
        prop_assert!(buf.is_empty());
        prop_assert_eq!(drive(ServerCodec::new(), &wire, chunk), want);
    }

    #[test]
    fn server_messages_round_trip(msgs in prop::collection::vec(server_message(), 1..8),
                                  chunk in 1usize..64) {
        let mut enc = ServerCodec::new();
        let mut wire = BytesMut::new();
        for m in &msgs {
            enc.encode(m, &mut wire).unwrap();
        }
        let mut dec = ClientCodec::new();
        let mut buf = wire.clone();
        let mut got = Vec::new();
        while let Some(m) = dec.decode(&mut buf).unwrap() {
            got.push(m);
        }
        prop_assert_eq!(&got, &msgs);
        prop_assert!(buf.is_empty());
        prop_assert_eq!(drive(ClientCodec::new(), &wire, chunk), msgs);
    }

    #[test]
    fn any_response_body_is_refused_or_round_trips(msgid in any::<u32>(), body in any::<String>()) {
        let msg = ServerMessage::Response { msgid, body };
        let mut wire = BytesMut::new();
        if ServerCodec::new().encode(&msg, &mut wire).is_ok() {
            let mut dec = ClientCodec::new();
            prop_assert_eq!(dec.decode(&mut wire).unwrap(), Some(msg));
            // An empty body leaves its third newline behind; it is skipped as a blank line.
            prop_assert_eq!(dec.decode(&mut wire).unwrap(), None);
            prop_assert!(wire.is_empty());
        } else {
            prop_assert!(wire.is_empty());
        }
    }

    #[test]
    fn transactions_round_trip(t in transaction()) {
        prop_assert_eq!(t.validate(), Ok(()));
        let line = t.to_line();
        prop_assert_eq!(Transaction::parse(line.as_bytes()), Ok(t.clone()));
        let mut buf = Vec::new();
        t.write_line(&mut buf);
        prop_assert_eq!(buf, line.as_bytes());
        // The lenient client parser agrees on everything the server writes.
        prop_assert_eq!(parse_get_dn_body(&t.to_string()), Ok(t.clone()));
        let queued = Transaction::parse_queue_line(line.as_bytes());
        prop_assert_eq!(queued.is_ok(), t.command != Command::Init);
    }

    #[test]
    fn server_decoder_never_panics(data in protocolish_bytes(), chunk in 1usize..32,
                                   max in 1usize..64) {
        drive(ServerCodec::new(), &data, chunk);
        drive(ServerCodec::with_max_frame_len(max), &data, chunk);
    }

    #[test]
    fn client_decoder_never_panics(data in protocolish_bytes(), chunk in 1usize..32,
                                   max in 1usize..64) {
        drive(ClientCodec::new(), &data, chunk);
        drive(ClientCodec::with_max_block_len(max), &data, chunk);
    }

    #[test]
    fn decoders_never_panic_on_random_bytes(data in prop::collection::vec(any::<u8>(), 0..512),
                                            chunk in 1usize..32) {
        drive(ServerCodec::new(), &data, chunk);
        drive(ClientCodec::new(), &data, chunk);
    }

    #[test]
    fn line_parsers_never_panic(data in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = Transaction::parse(&data);
        let _ = Transaction::parse_queue_line(&data);
        let _ = parse_get_dn_body(&String::from_utf8_lossy(&data));
        let _ = Request::parse(&String::from_utf8_lossy(&data));
    }

    #[test]
    fn line_parsers_never_panic_on_near_lines(s in "[0-9 ]{0,6}[^\n]{0,20}[ amdrnx\r\n]{0,4}") {
        let _ = Transaction::parse(s.as_bytes());
        let _ = parse_get_dn_body(&s);
    }

    #[test]
    fn capabilities_display_parse_round_trip(s in any::<String>()) {
        let caps = Capabilities::parse(&s);
        prop_assert_eq!(Capabilities::parse(&caps.to_string()), caps);
    }
}
