//! STARTTLS on the server side: the policy, the certificate that is offered, and its reload
//! on SIGHUP.

use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};

use openssl::ssl::{SslAcceptor, SslMethod, SslVerifyMode, SslVersion};
use openssl::x509::X509Name;
use proto::TlsError;
use proto::tls::load_identity;

/// What the notifier demands of its clients' transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TlsPolicy {
    /// STARTTLS offered (when a certificate is configured); plain clients are served too.
    #[default]
    Optional,
    /// Clients must upgrade with STARTTLS before any request.
    Required,
    /// Clients must upgrade and present a certificate issued by the CA.
    ClientCert,
}

impl TlsPolicy {
    pub fn requires_tls(self) -> bool {
        self != TlsPolicy::Optional
    }
}

/// The files the acceptor is built from; read again on every reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub certificate: PathBuf,
    pub key: PathBuf,
    /// Required for [`TlsPolicy::ClientCert`]; client certificates must chain to it.
    pub ca: Option<PathBuf>,
}

/// The current TLS context. A connection takes the context at its upgrade and keeps it, so
/// a reload changes what new clients get without touching established ones.
pub struct ServerTls {
    files: TlsFiles,
    policy: TlsPolicy,
    acceptor: RwLock<Arc<SslAcceptor>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    pub fn load(files: TlsFiles, policy: TlsPolicy) -> Result<ServerTls, TlsError> {
        let acceptor = build(&files, policy)?;
        Ok(ServerTls {
            files,
            policy,
            acceptor: RwLock::new(Arc::new(acceptor)),
        })
    }

    /// Reads the certificate, key and CA again; on failure the old context stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let acceptor = Arc::new(build(&self.files, self.policy)?);
        *self
            .acceptor
            .write()
            .unwrap_or_else(PoisonError::into_inner) = acceptor;
        Ok(())
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    pub(super) fn acceptor(&self) -> Arc<SslAcceptor> {
        Arc::clone(&self.acceptor.read().unwrap_or_else(PoisonError::into_inner))
    }
}

fn build(files: &TlsFiles, policy: TlsPolicy) -> Result<SslAcceptor, TlsError> {
    // Mozilla's "intermediate" profile: TLS 1.2 and 1.3 with forward-secret ciphers only.
    let mut builder =
        SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).map_err(TlsError::Setup)?;
    builder
        .set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(TlsError::Setup)?;
    load_identity(&mut builder, &files.certificate, &files.key)?;
    if let Some(ca) = &files.ca {
        let ca_error = |source| TlsError::File {
            what: "CA file",
            path: ca.clone(),
            source,
        };
        builder.set_ca_file(ca).map_err(ca_error)?;
        if policy == TlsPolicy::ClientCert {
            // Tells clients which issuer to pick their certificate for.
            builder.set_client_ca_list(X509Name::load_client_ca_file(ca).map_err(ca_error)?);
        }
    }
    if policy == TlsPolicy::ClientCert {
        builder.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    }
    Ok(builder.build())
}
