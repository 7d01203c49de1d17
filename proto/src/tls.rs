//! STARTTLS on 6669: the byte stream of a connection before and after the upgrade, and the
//! client's TLS settings.
//!
//! The upgrade rides on the handshake's capability list: a client that wants TLS sends
//! `Capabilities: STARTTLS`; a server that can offer it answers with `STARTTLS` in its own
//! list (the intersection) and then both sides run the TLS handshake on the same socket
//! before any request. A UCS notifier never offers anything, and a UCS client never asks,
//! so either side stays compatible with the originals in plain text.
//!
//! OpenSSL is the stack because ldap3 already links it (through native-tls); `openssl` is
//! used directly because native-tls cannot verify client certificates on the server side.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use openssl::error::ErrorStack;
use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode, SslVersion};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

/// A notifier connection's byte stream: plain TCP, or TLS after STARTTLS.
#[derive(Debug)]
pub enum Transport {
    /// Clear text, as every UCS peer speaks.
    Plain(TcpStream),
    /// After a successful STARTTLS (boxed: the TLS state is large and rare in UCS domains).
    Tls(Box<SslStream<TcpStream>>),
}

impl Transport {
    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Whether a client asks for STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// Never: the UCS handshake, byte for byte.
    #[default]
    Off,
    /// Ask; continue in plain text only when the notifier does not offer STARTTLS. A
    /// failed TLS handshake is an error, never a reason to fall back.
    Try,
    /// Ask, and give up when the notifier does not offer STARTTLS.
    Required,
}

impl TlsMode {
    /// The spellings accepted by [`TlsMode::from_str`].
    pub const NAMES: [&'static str; 3] = ["off", "try", "required"];
}

impl FromStr for TlsMode {
    type Err = String;

    fn from_str(s: &str) -> Result<TlsMode, String> {
        match s.trim() {
            "off" => Ok(TlsMode::Off),
            "try" => Ok(TlsMode::Try),
            "required" => Ok(TlsMode::Required),
            other => Err(format!(
                "unknown TLS mode {other:?}: expected one of {}",
                TlsMode::NAMES.join(", ")
            )),
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::Off => "off",
            TlsMode::Try => "try",
            TlsMode::Required => "required",
        })
    }
}

/// A TLS file that cannot be used, or an OpenSSL set-up failure. Texts name the file and
/// OpenSSL's reason, never the file's contents.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A certificate, key or CA file that OpenSSL cannot load.
    #[error("cannot load the TLS {what} {path}: {source}")]
    File {
        /// "certificate", "private key", "CA file".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// OpenSSL's reason.
        #[source]
        source: ErrorStack,
    },
    /// The private key does not belong to the certificate.
    #[error("the TLS private key {key} does not match the certificate {certificate}: {source}")]
    KeyMismatch {
        /// The certificate file.
        certificate: PathBuf,
        /// The key file.
        key: PathBuf,
        /// OpenSSL's reason.
        #[source]
        source: ErrorStack,
    },
    /// A client certificate without its key, or the other way round.
    #[error("a TLS client certificate needs its private key and the other way round")]
    HalfIdentity,
    /// OpenSSL could not set up a context.
    #[error("cannot set up TLS: {0}")]
    Setup(#[source] ErrorStack),
}

/// Loads `certificate` (a PEM chain) and its `key` into a context builder.
pub fn load_identity(
    builder: &mut openssl::ssl::SslContextBuilder,
    certificate: &Path,
    key: &Path,
) -> Result<(), TlsError> {
    builder
        .set_certificate_chain_file(certificate)
        .map_err(|source| TlsError::File {
            what: "certificate",
            path: certificate.to_owned(),
            source,
        })?;
    builder
        .set_private_key_file(key, SslFiletype::PEM)
        .map_err(|source| TlsError::File {
            what: "private key",
            path: key.to_owned(),
            source,
        })?;
    builder
        .check_private_key()
        .map_err(|source| TlsError::KeyMismatch {
            certificate: certificate.to_owned(),
            key: key.to_owned(),
            source,
        })
}

/// Files of a TLS client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// CA certificates (PEM) the notifier's certificate must chain to.
    pub ca: PathBuf,
    /// Client certificate and key, for a notifier that requires one.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Name the notifier's certificate must carry; default: the host connected to.
    pub server_name: Option<String>,
}

/// A client's TLS settings, loaded once (so a daemon that later drops privileges keeps its
/// key) and shared by every connection.
#[derive(Clone, Default)]
pub struct ClientTls {
    mode: TlsMode,
    connector: Option<SslConnector>,
    server_name: Option<String>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("mode", &self.mode)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Plain text, like every UCS client.
    pub fn off() -> ClientTls {
        ClientTls::default()
    }

    /// Settings for `mode`; the files are loaded now unless `mode` is off.
    pub fn new(mode: TlsMode, files: &ClientTlsFiles) -> Result<ClientTls, TlsError> {
        if mode == TlsMode::Off {
            return Ok(ClientTls::off());
        }
        let mut builder =
            SslConnector::builder(SslMethod::tls_client()).map_err(TlsError::Setup)?;
        builder
            .set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(TlsError::Setup)?;
        builder
            .set_ca_file(&files.ca)
            .map_err(|source| TlsError::File {
                what: "CA file",
                path: files.ca.clone(),
                source,
            })?;
        builder.set_verify(SslVerifyMode::PEER);
        if let Some((certificate, key)) = &files.identity {
            load_identity(&mut builder, certificate, key)?;
        }
        Ok(ClientTls {
            mode,
            connector: Some(builder.build()),
            server_name: files.server_name.clone(),
        })
    }

    /// Settings that ask for STARTTLS in `mode` without any files, for handshake tests that
    /// never get as far as TLS.
    #[cfg(test)]
    pub(crate) fn without_files(mode: TlsMode) -> ClientTls {
        ClientTls {
            mode,
            connector: None,
            server_name: None,
        }
    }

    /// Whether STARTTLS is asked for.
    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// The TLS handshake as a client on `tcp`, checking the certificate against the CA and
    /// against the server name (or `host`).
    pub(crate) async fn connect(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> Result<SslStream<TcpStream>, TlsFailure> {
        let Some(connector) = &self.connector else {
            return Err(TlsFailure::Setup(ErrorStack::get()));
        };
        let name = self
            .server_name
            .as_deref()
            .unwrap_or_else(|| host.trim_start_matches('[').trim_end_matches(']'));
        let ssl = connector
            .configure()
            .and_then(|c| c.into_ssl(name))
            .map_err(TlsFailure::Setup)?;
        let mut stream = SslStream::new(ssl, tcp).map_err(TlsFailure::Setup)?;
        match Pin::new(&mut stream).connect().await {
            Ok(()) => Ok(stream),
            Err(e) => {
                let verify = stream.ssl().verify_result();
                let reason = if verify == openssl::x509::X509VerifyResult::OK {
                    e.to_string()
                } else {
                    format!(
                        "the notifier's certificate is not accepted: {verify} (expected name {name})"
                    )
                };
                Err(TlsFailure::Handshake(reason))
            }
        }
    }
}

/// Why a client's TLS upgrade failed.
#[derive(Debug, Error)]
pub(crate) enum TlsFailure {
    #[error("cannot set up TLS: {0}")]
    Setup(ErrorStack),
    #[error("{0}")]
    Handshake(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for name in TlsMode::NAMES {
            assert_eq!(name.parse::<TlsMode>().unwrap().to_string(), name);
        }
        assert!(
            "yes"
                .parse::<TlsMode>()
                .unwrap_err()
                .contains("off, try, required")
        );
    }

    #[test]
    fn missing_files_are_named() {
        let files = ClientTlsFiles {
            ca: PathBuf::from("/nonexistent/ca.pem"),
            ..ClientTlsFiles::default()
        };
        let err = ClientTls::new(TlsMode::Try, &files).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot load the TLS CA file /nonexistent/ca.pem: "),
            "{err}"
        );
        assert_eq!(
            ClientTls::new(TlsMode::Off, &files).unwrap().mode(),
            TlsMode::Off
        );
    }
}
