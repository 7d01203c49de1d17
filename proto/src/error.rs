//! The error of a notifier connection, shared by the frames that detect it and the codecs
//! and client that report it.

use std::io;

use thiserror::Error;

/// Protocol violations and I/O failures on a notifier connection.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// The underlying socket failed (also: EOF in the middle of a server message).
    #[error("I/O error on notifier connection: {0}")]
    Io(#[from] io::Error),
    /// A line or block did not end within the size limit.
    #[error("message too large: no end of message within {max} bytes")]
    FrameTooLarge {
        /// The limit in bytes.
        max: usize,
    },
    /// The `Version:` value is not an unsigned decimal number that fits 32 bits.
    #[error("invalid protocol version {0:?}: expected an unsigned decimal number")]
    BadVersion(String),
    /// `GET_DN`/`WAIT_ID` without a valid transaction ID argument.
    #[error(
        "invalid argument {argument:?} for {command}: expected an unsigned decimal transaction ID"
    )]
    BadArgument {
        /// The command word.
        command: String,
        /// The argument text as received.
        argument: String,
    },
    /// A server response whose `MSGID:` value is not an unsigned 32-bit decimal number.
    #[error("invalid MSGID {0:?} in server response: expected an unsigned decimal number")]
    BadMsgId(String),
    /// A line or block is not valid UTF-8.
    #[error("received data that is not valid UTF-8")]
    InvalidUtf8,
    /// A server block that starts with neither `Version:` nor `MSGID:`.
    #[error(
        "unexpected message from server starting with {0:?}: expected a Version or MSGID block"
    )]
    UnexpectedBlock(String),
    /// A message that cannot be put on the wire without breaking the framing.
    #[error("cannot encode message: {0}")]
    Unencodable(String),
}
