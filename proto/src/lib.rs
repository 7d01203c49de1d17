//! Wire protocol of the Univention Directory Notifier (TCP port 6669), shared by the notifier,
//! the listener and one-shot tools.
//!
//! The protocol is ASCII text in `\n`-terminated lines. A client opens with
//! `Version: <v>\nCapabilities: <list>\n\n`; the server answers
//! `Version: <min(v,3)>\nCapabilities: \n\n` once the Capabilities line arrives (with
//! `STARTTLS` in the list when both sides asked for it: then TLS starts on the socket). Each request
//! is `MSGID: <k>\n<COMMAND>[ <arg>]\n`, optionally followed by a blank line; commands are
//! `GET_DN <id>` (protocol 1/2), `WAIT_ID <id>` (protocol 3), `GET_ID`, `GET_SCHEMA_ID` and
//! `ALIVE`. Every answer is `MSGID: <k>\n<body>\n\n`. There are no error replies: the server
//! either ignores a bad request or closes the connection.
//!
//! Modules:
//! * [`line`](mod@line): the transaction line `ID DN CMD` of the notifier's files and `GET_DN` answers;
//! * [`capability`]: the handshake's capability list;
//! * [`frame`]: typed messages for each direction;
//! * [`codec`]: `tokio-util` codecs for the server ([`ServerCodec`]) and client
//!   ([`ClientCodec`]) ends;
//! * [`tls`]: STARTTLS (the stream before and after the upgrade, the client's settings);
//! * [`client`]: an async client ([`NotifierClient`]) doing the handshake, MSGID bookkeeping
//!   and time limits for the listener and one-shot tools.
//!
//! Deviations from UCS, all strict supersets of what UCS accepts from well-behaved peers:
//! * UCS parsed each `read()` on its own, so a request had to arrive in one TCP segment and a
//!   trailing fragment was dropped. [`ServerCodec`] keeps a per-connection receive buffer:
//!   partial lines wait for more data, and a pending `MSGID:` is kept across reads until the
//!   next command line consumes it.
//! * The 8192-byte limit applies per line instead of per read, so several requests may arrive
//!   together in one large segment.
//! * Commands match exactly (after trimming trailing whitespace) instead of by prefix, and a
//!   `GET_DN` argument must be numeric, as UCS already required for `WAIT_ID`.
//!
//! Version gating, the configured minimum version and the handling of requests without a
//! MSGID are decisions of the server built on top of this crate.

pub mod capability;
pub mod client;
pub mod codec;
pub mod error;
pub mod frame;
pub mod line;
pub mod tls;

pub use capability::{Capabilities, Capability};
pub use client::{ClientError, NotifierClient, parse_get_dn_reply, parse_id_reply};
pub use codec::{ClientCodec, ServerCodec};
pub use error::ProtocolError;
pub use frame::{
    ClientFrame, ClientMessage, MAX_FRAME_LEN, MAX_VERSION, Request, ServerMessage, clamp_version,
};
pub use line::{Command, LineError, MAX_LINE_LEN, Transaction, TransactionId, parse_get_dn_body};
pub use tls::{ClientTls, ClientTlsFiles, TlsError, TlsMode, Transport};
