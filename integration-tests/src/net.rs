//! Loopback ports for servers under test.

use std::net::{Ipv4Addr, TcpListener, TcpStream};

use crate::{Result, io_context};

/// A port that was free a moment ago. Another process may take it before the server binds
/// it, so callers that start servers retry with a new port when the bind fails.
pub fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io_context("binding port 0"))?;
    let port = listener
        .local_addr()
        .map_err(io_context("reading the bound address"))?
        .port();
    Ok(port)
}

/// True when something accepts TCP connections on `127.0.0.1:port`.
pub fn is_listening(port: u16) -> bool {
    TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok()
}
