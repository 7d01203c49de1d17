//! The codecs inside `tokio_util::codec::Framed` over an in-memory duplex stream, the way the
//! notifier and listener use them.

// Test helpers outside #[test] fns are not covered by clippy.toml's test exemptions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use futures::{SinkExt, StreamExt};
use proto::ProtocolError;
use proto::codec::{ClientCodec, ServerCodec};
use proto::frame::{ClientFrame, ClientMessage, Request, ServerMessage};
use proto::line::TransactionId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{Framed, FramedRead};

#[tokio::test]
async fn client_and_server_talk() {
    let (c, s) = tokio::io::duplex(64);
    let mut client = Framed::new(c, ClientCodec::new());
    let mut server = Framed::new(s, ServerCodec::new());

    let server_task = tokio::spawn(async move {
        let mut version = None;
        while let Some(msg) = server.next().await {
            match msg.unwrap() {
                ClientMessage::Version(v) => version = Some(v),
                ClientMessage::Capabilities(_) => {
                    let v = version.unwrap();
                    server
                        .send(ServerMessage::handshake_reply(v))
                        .await
                        .unwrap();
                }
                ClientMessage::Request {
                    msgid: Some(k),
                    request,
                } => {
                    let body = match request {
                        Request::GetId => "42".to_owned(),
                        Request::WaitId(id) => id.max(TransactionId(42)).to_string(),
                        Request::Alive => "OKAY".to_owned(),
                        _ => continue,
                    };
                    server.send(ServerMessage::response(k, body)).await.unwrap();
                }
                ClientMessage::Request { msgid: None, .. } => {}
            }
        }
    });

    client.send(ClientFrame::handshake(9)).await.unwrap();
    assert_eq!(
        client.next().await.unwrap().unwrap(),
        ServerMessage::handshake_reply(3)
    );
    client
        .send(ClientFrame::request(1, Request::GetId))
        .await
        .unwrap();
    client
        .send(ClientFrame::request(2, Request::WaitId(TransactionId(43))))
        .await
        .unwrap();
    client
        .send(ClientFrame::request(3, Request::Alive))
        .await
        .unwrap();
    assert_eq!(
        client.next().await.unwrap().unwrap(),
        ServerMessage::response(1, "42")
    );
    assert_eq!(
        client.next().await.unwrap().unwrap(),
        ServerMessage::response(2, "43")
    );
    assert_eq!(
        client.next().await.unwrap().unwrap(),
        ServerMessage::response(3, "OKAY")
    );
    drop(client);
    server_task.await.unwrap();
}

#[tokio::test]
async fn request_trickling_in_is_reassembled() {
    let (mut c, s) = tokio::io::duplex(8);
    let mut server = FramedRead::new(s, ServerCodec::new());
    let writer = tokio::spawn(async move {
        for b in b"MSGID: 7\nWAIT_ID 43\n\nGET_" {
            c.write_all(&[*b]).await.unwrap();
            c.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        // Closing with a partial line: discarded, not an error.
    });
    assert_eq!(
        server.next().await.unwrap().unwrap(),
        ClientMessage::Request {
            msgid: Some(7),
            request: Request::WaitId(TransactionId(43)),
        }
    );
    assert!(server.next().await.is_none());
    writer.await.unwrap();
}

#[tokio::test]
async fn oversize_request_ends_the_stream_with_an_error() {
    let (mut c, s) = tokio::io::duplex(1 << 16);
    let mut server = FramedRead::new(s, ServerCodec::new());
    c.write_all(&vec![b'A'; 10_000]).await.unwrap();
    assert!(matches!(
        server.next().await,
        Some(Err(ProtocolError::FrameTooLarge { max: 8192 }))
    ));
    // After an error the stream is finished; the server closes the connection.
    assert!(server.next().await.is_none());
}

#[tokio::test]
async fn client_reports_eof_inside_a_response() {
    let (c, mut s) = tokio::io::duplex(64);
    let mut client = FramedRead::new(c, ClientCodec::new());
    s.write_all(b"MSGID: 1\n4").await.unwrap();
    drop(s);
    match client.next().await {
        Some(Err(ProtocolError::Io(e))) => {
            assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn handshake_bytes_on_the_wire() {
    let (c, mut s) = tokio::io::duplex(64);
    let mut client = Framed::new(c, ClientCodec::new());
    client.send(ClientFrame::handshake(3)).await.unwrap();
    let mut got = [0u8; 27];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"Version: 3\nCapabilities: \n\n");
}
