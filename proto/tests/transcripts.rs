//! The transcripts of notifier.md §2.6 and the framing rules of §2.1/§9, at the codec level.

// Test helpers outside #[test] fns are not covered by clippy.toml's test exemptions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::BytesMut;
use proto::ProtocolError;
use proto::codec::{ClientCodec, ServerCodec};
use proto::frame::{
    ClientFrame, ClientMessage, MAX_FRAME_LEN, Request, ServerMessage, clamp_version,
};
use proto::line::{Command, Transaction, TransactionId, parse_get_dn_body};
use proto::{Capabilities, MAX_VERSION};
use tokio_util::codec::{Decoder, Encoder};

fn req(msgid: u32, request: Request) -> ClientMessage {
    ClientMessage::Request {
        msgid: Some(msgid),
        request,
    }
}

fn req_none(request: Request) -> ClientMessage {
    ClientMessage::Request {
        msgid: None,
        request,
    }
}

fn no_caps() -> ClientMessage {
    ClientMessage::Capabilities(Capabilities::new())
}

/// Feeds `input` in one read and decodes until the codec wants more.
fn server_decode(input: &[u8]) -> Vec<ClientMessage> {
    server_decode_with(&mut ServerCodec::new(), input)
}

fn server_decode_with(codec: &mut ServerCodec, input: &[u8]) -> Vec<ClientMessage> {
    let mut buf = BytesMut::from(input);
    let mut out = Vec::new();
    while let Some(m) = codec.decode(&mut buf).expect("decode") {
        out.push(m);
    }
    out
}

/// Feeds `input` one byte per read.
fn server_decode_bytewise(input: &[u8]) -> Vec<ClientMessage> {
    let mut codec = ServerCodec::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for b in input {
        buf.extend_from_slice(&[*b]);
        while let Some(m) = codec.decode(&mut buf).expect("decode") {
            out.push(m);
        }
    }
    out
}

/// Feeds `input` in two reads split at `at`, into one receive buffer.
fn server_decode_split(input: &[u8], at: usize) -> Vec<ClientMessage> {
    let mut codec = ServerCodec::new();
    let mut buf = BytesMut::from(&input[..at]);
    let mut out = Vec::new();
    while let Some(m) = codec.decode(&mut buf).expect("decode") {
        out.push(m);
    }
    buf.extend_from_slice(&input[at..]);
    while let Some(m) = codec.decode(&mut buf).expect("decode") {
        out.push(m);
    }
    out
}

fn server_encode(msgs: &[ServerMessage]) -> Vec<u8> {
    let mut codec = ServerCodec::new();
    let mut buf = BytesMut::new();
    for m in msgs {
        codec.encode(m, &mut buf).expect("encode");
    }
    buf.to_vec()
}

fn client_encode(frames: &[ClientFrame]) -> Vec<u8> {
    let mut codec = ClientCodec::new();
    let mut buf = BytesMut::new();
    for f in frames {
        codec.encode(f, &mut buf).expect("encode");
    }
    buf.to_vec()
}

fn client_decode(input: &[u8]) -> Vec<ServerMessage> {
    let mut codec = ClientCodec::new();
    let mut buf = BytesMut::from(input);
    let mut out = Vec::new();
    while let Some(m) = codec.decode(&mut buf).expect("decode") {
        out.push(m);
    }
    assert!(buf.is_empty(), "left over: {buf:?}");
    out
}

fn client_decode_bytewise(input: &[u8]) -> Vec<ServerMessage> {
    let mut codec = ClientCodec::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for b in input {
        buf.extend_from_slice(&[*b]);
        while let Some(m) = codec.decode(&mut buf).expect("decode") {
            out.push(m);
        }
    }
    out
}

const P3_CLIENT: &[u8] = b"Version: 3\nCapabilities: \n\n\
    MSGID: 1\nGET_ID\n\n\
    MSGID: 2\nWAIT_ID 43\n\n\
    MSGID: 3\nWAIT_ID 40\n\n\
    MSGID: 4\nGET_SCHEMA_ID\n\n\
    MSGID: 5\nALIVE\n\n\
    MSGID: 6\nGET_DN 40\n\n";

const P3_SERVER: &[u8] = b"Version: 3\nCapabilities: \n\n\
    MSGID: 1\n42\n\n\
    MSGID: 2\n43\n\n\
    MSGID: 3\n43\n\n\
    MSGID: 4\n7\n\n\
    MSGID: 5\nOKAY\n\n";

fn p3_client_messages() -> Vec<ClientMessage> {
    vec![
        ClientMessage::Version(3),
        no_caps(),
        req(1, Request::GetId),
        req(2, Request::WaitId(TransactionId(43))),
        req(3, Request::WaitId(TransactionId(40))),
        req(4, Request::GetSchemaId),
        req(5, Request::Alive),
        // Decodes fine; refusing GET_DN to a v3 client is the server's job.
        req(6, Request::GetDn(TransactionId(40))),
    ]
}

fn p3_server_messages() -> Vec<ServerMessage> {
    vec![
        ServerMessage::handshake_reply(3),
        ServerMessage::response(1, "42"),
        ServerMessage::response(2, "43"),
        ServerMessage::response(3, "43"),
        ServerMessage::response(4, "7"),
        ServerMessage::response(5, "OKAY"),
    ]
}

#[test]
fn protocol3_server_decodes_client() {
    assert_eq!(server_decode(P3_CLIENT), p3_client_messages());
}

#[test]
fn protocol3_server_encodes_replies() {
    assert_eq!(server_encode(&p3_server_messages()), P3_SERVER);
}

#[test]
fn protocol3_client_encodes_requests() {
    let frames = [
        ClientFrame::handshake(3),
        ClientFrame::request(1, Request::GetId),
        ClientFrame::request(2, Request::WaitId(TransactionId(43))),
        ClientFrame::request(3, Request::WaitId(TransactionId(40))),
        ClientFrame::request(4, Request::GetSchemaId),
        ClientFrame::request(5, Request::Alive),
        ClientFrame::request(6, Request::GetDn(TransactionId(40))),
    ];
    assert_eq!(client_encode(&frames), P3_CLIENT);
}

#[test]
fn protocol3_client_decodes_replies() {
    assert_eq!(client_decode(P3_SERVER), p3_server_messages());
    assert_eq!(client_decode_bytewise(P3_SERVER), p3_server_messages());
}

const P2_CLIENT: &[u8] = b"Version: 2\nCapabilities: \n\n\
    MSGID: 1\nGET_DN 40\n\
    MSGID: 2\nGET_DN 44\n";

const P2_SERVER: &[u8] = b"Version: 2\nCapabilities: \n\n\
    MSGID: 1\n40 uid=alice,cn=users,dc=example,dc=com m\n\n\
    MSGID: 2\n44 cn=x,dc=example,dc=com a\n\n";

fn p2_transactions() -> [Transaction; 2] {
    [
        Transaction::new(
            TransactionId(40),
            "uid=alice,cn=users,dc=example,dc=com",
            Command::Modify,
        ),
        Transaction::new(TransactionId(44), "cn=x,dc=example,dc=com", Command::Add),
    ]
}

#[test]
fn protocol2_session_without_blank_lines() {
    assert_eq!(
        server_decode(P2_CLIENT),
        [
            ClientMessage::Version(2),
            no_caps(),
            req(1, Request::GetDn(TransactionId(40))),
            req(2, Request::GetDn(TransactionId(44))),
        ]
    );
    let [t40, t44] = p2_transactions();
    let replies = [
        ServerMessage::handshake_reply(2),
        ServerMessage::response(1, t40.to_string()),
        ServerMessage::response(2, t44.to_string()),
    ];
    assert_eq!(server_encode(&replies), P2_SERVER);
}

#[test]
fn protocol2_client_side() {
    // The C listener's requests: no blank line after GET_DN is also accepted, but ours send it.
    assert_eq!(
        client_encode(&[
            ClientFrame::handshake(2),
            ClientFrame::request(1, Request::GetDn(TransactionId(40))),
        ]),
        b"Version: 2\nCapabilities: \n\nMSGID: 1\nGET_DN 40\n\n"
    );
    let got = client_decode(P2_SERVER);
    assert_eq!(got.len(), 3);
    assert_eq!(got[0], ServerMessage::handshake_reply(2));
    let bodies: Vec<Transaction> = got[1..]
        .iter()
        .map(|m| match m {
            ServerMessage::Response { body, .. } => parse_get_dn_body(body).unwrap(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(bodies, p2_transactions());
}

#[test]
fn handshake_reply_bytes_exact() {
    assert_eq!(
        server_encode(&[ServerMessage::handshake_reply(3)]),
        b"Version: 3\nCapabilities: \n\n"
    );
    assert_eq!(
        server_encode(&[ServerMessage::Handshake {
            version: 3,
            capabilities: Capabilities::new(),
        }]),
        b"Version: 3\nCapabilities: \n\n"
    );
}

#[test]
fn version_9_is_decoded_unclamped_and_answered_with_3() {
    let got = server_decode(b"Version: 9\nCapabilities: \n\n");
    assert_eq!(got, [ClientMessage::Version(9), no_caps()]);
    assert_eq!(clamp_version(9), MAX_VERSION);
    assert_eq!(
        server_encode(&[ServerMessage::handshake_reply(9)]),
        b"Version: 3\nCapabilities: \n\n"
    );
}

#[test]
fn version_below_minimum_still_decodes() {
    // Rejecting version 2 on a `-v 3` server is the server's decision.
    assert_eq!(
        server_decode(b"Version: 2\nCapabilities: \n\n"),
        [ClientMessage::Version(2), no_caps()]
    );
}

#[test]
fn version_3x_is_an_error() {
    let mut buf = BytesMut::from(&b"Version: 3x\nCapabilities: \n\n"[..]);
    match ServerCodec::new().decode(&mut buf) {
        Err(ProtocolError::BadVersion(v)) => assert_eq!(v, "3x"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn commands_before_version_decode_normally() {
    assert_eq!(
        server_decode(b"MSGID: 1\nGET_ID\n\nVersion: 3\nCapabilities: \n\n"),
        [req(1, Request::GetId), ClientMessage::Version(3), no_caps()]
    );
    // Capabilities before Version too.
    assert_eq!(
        server_decode(b"Capabilities: \nVersion: 3\n"),
        [no_caps(), ClientMessage::Version(3)]
    );
}

#[test]
fn missing_msgid_gives_none() {
    assert_eq!(
        server_decode(b"GET_ID\n\nMSGID: 1\nGET_ID\nGET_ID\n"),
        [
            req_none(Request::GetId),
            req(1, Request::GetId),
            req_none(Request::GetId)
        ]
    );
}

#[test]
fn msgid_sentinel_gives_none() {
    assert_eq!(
        server_decode(b"MSGID: 4294967295\nGET_ID\n\n"),
        [req_none(Request::GetId)]
    );
}

#[test]
fn byte_by_byte_equals_one_read() {
    assert_eq!(server_decode_bytewise(P3_CLIENT), p3_client_messages());
    assert_eq!(server_decode_bytewise(P2_CLIENT), server_decode(P2_CLIENT));
}

#[test]
fn every_split_point_equals_one_read() {
    let want = p3_client_messages();
    for at in 0..=P3_CLIENT.len() {
        assert_eq!(server_decode_split(P3_CLIENT, at), want, "split at {at}");
    }
    let want = client_decode(P3_SERVER);
    for at in 0..=P3_SERVER.len() {
        let mut codec = ClientCodec::new();
        let mut buf = BytesMut::from(&P3_SERVER[..at]);
        let mut got = Vec::new();
        while let Some(m) = codec.decode(&mut buf).unwrap() {
            got.push(m);
        }
        buf.extend_from_slice(&P3_SERVER[at..]);
        while let Some(m) = codec.decode(&mut buf).unwrap() {
            got.push(m);
        }
        assert_eq!(got, want, "split at {at}");
    }
}

#[test]
fn two_requests_in_one_read() {
    assert_eq!(
        server_decode(b"MSGID: 1\nGET_ID\n\nMSGID: 2\nALIVE\n\n"),
        [req(1, Request::GetId), req(2, Request::Alive)]
    );
}

#[test]
fn oversize_line_is_rejected() {
    // A line of MAX_FRAME_LEN bytes (before its newline) is too large.
    let line = format!("MSGID: 1\n{}\n", "A".repeat(MAX_FRAME_LEN));
    let mut codec = ServerCodec::new();
    let mut buf = BytesMut::from(line.as_bytes());
    assert!(matches!(
        codec.decode(&mut buf),
        Err(ProtocolError::FrameTooLarge { max: MAX_FRAME_LEN })
    ));

    // MAX_FRAME_LEN - 1 bytes without a newline: still waiting for more.
    let mut codec = ServerCodec::new();
    let mut buf = BytesMut::from("A".repeat(MAX_FRAME_LEN - 1).as_bytes());
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    // ... and the newline completes an acceptable line.
    buf.extend_from_slice(b"\n");
    assert_eq!(
        codec.decode(&mut buf).unwrap(),
        Some(req_none(Request::Unknown("A".repeat(MAX_FRAME_LEN - 1))))
    );

    // Reaching MAX_FRAME_LEN bytes without a newline: error right away.
    let mut codec = ServerCodec::new();
    let mut buf = BytesMut::from("A".repeat(MAX_FRAME_LEN - 1).as_bytes());
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    buf.extend_from_slice(b"A");
    assert!(matches!(
        codec.decode(&mut buf),
        Err(ProtocolError::FrameTooLarge { max: MAX_FRAME_LEN })
    ));
}

#[test]
fn crlf_is_tolerated() {
    assert_eq!(
        server_decode(b"Version: 3\r\nCapabilities: \r\n\r\nMSGID: 1\r\nWAIT_ID 43\r\n\r\n"),
        [
            ClientMessage::Version(3),
            no_caps(),
            req(1, Request::WaitId(TransactionId(43)))
        ]
    );
}

#[test]
fn non_utf8_line_is_an_error() {
    let mut buf = BytesMut::from(&b"Version: 3\nCapabilities: \xc3\x28\n"[..]);
    let mut codec = ServerCodec::new();
    assert_eq!(
        codec.decode(&mut buf).unwrap(),
        Some(ClientMessage::Version(3))
    );
    assert!(matches!(
        codec.decode(&mut buf),
        Err(ProtocolError::InvalidUtf8)
    ));
}

#[test]
fn one_shot_client_reads_line_index_1() {
    // get_notifier_id.py and friends: handshake, then one request, take line 1 of the reply.
    let sent = client_encode(&[
        ClientFrame::handshake(3),
        ClientFrame::request(1, Request::GetId),
    ]);
    assert_eq!(sent, b"Version: 3\nCapabilities: \n\nMSGID: 1\nGET_ID\n\n");
    let reply = server_encode(&[ServerMessage::response(1, "42")]);
    let text = String::from_utf8(reply).unwrap();
    assert_eq!(text.split('\n').nth(1).unwrap().parse::<u64>().unwrap(), 42);
}

#[test]
fn client_two_responses_in_one_read() {
    assert_eq!(
        client_decode(b"MSGID: 1\n42\n\nMSGID: 2\nOKAY\n\n"),
        [
            ServerMessage::response(1, "42"),
            ServerMessage::response(2, "OKAY")
        ]
    );
}

#[test]
fn client_responses_split_across_reads() {
    let mut codec = ClientCodec::new();
    let mut buf = BytesMut::from(&b"MSGID: 1\n4"[..]);
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    buf.extend_from_slice(b"2\n");
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    buf.extend_from_slice(b"\nMSGID: 2\nOK");
    assert_eq!(
        codec.decode(&mut buf).unwrap(),
        Some(ServerMessage::response(1, "42"))
    );
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    buf.extend_from_slice(b"AY\n\n");
    assert_eq!(
        codec.decode(&mut buf).unwrap(),
        Some(ServerMessage::response(2, "OKAY"))
    );
    assert!(buf.is_empty());
}

#[test]
fn client_handshake_block() {
    assert_eq!(
        client_decode(b"Version: 3\nCapabilities: \n\n"),
        [ServerMessage::Handshake {
            version: 3,
            capabilities: Capabilities::new()
        }]
    );
}

#[test]
fn client_oversize_block() {
    let mut codec = ClientCodec::new();
    let body = "x".repeat(proto::codec::DEFAULT_MAX_BLOCK_LEN);
    let mut buf = BytesMut::from(format!("MSGID: 1\n{body}\n\n").as_bytes());
    assert!(matches!(
        codec.decode(&mut buf),
        Err(ProtocolError::FrameTooLarge {
            max: proto::codec::DEFAULT_MAX_BLOCK_LEN
        })
    ));
    // A long DN well above the server's 8 KiB request limit is fine in a response.
    let dn = format!("cn={},dc=x", "y".repeat(20_000));
    let body = format!("40 {dn} a");
    let got = client_decode(format!("MSGID: 1\n{body}\n\n").as_bytes());
    assert_eq!(got, [ServerMessage::response(1, body)]);
}
