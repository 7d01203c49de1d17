//! Test certificates made with the `openssl` command-line tool in a temp directory: CAs and
//! the server and client certificates they issue, for the STARTTLS tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::{HarnessError, Result, io_context};

/// A directory of test CAs and certificates; removed when dropped.
pub struct Pki {
    dir: TempDir,
}

/// A CA's certificate and key.
#[derive(Debug, Clone)]
pub struct Ca {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// A certificate issued by a [`Ca`], with its private key (PEM, unencrypted).
#[derive(Debug, Clone)]
pub struct Identity {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

fn openssl(args: &[&str], dir: &Path) -> Result<()> {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(io_context("running openssl"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(HarnessError::Io {
            context: format!("openssl {}", args.join(" ")),
            source: std::io::Error::other(String::from_utf8_lossy(&output.stderr).into_owned()),
        })
    }
}

impl Pki {
    pub fn new() -> Result<Pki> {
        let dir = tempfile::Builder::new()
            .prefix("pki-")
            .tempdir_in("/tmp")
            .map_err(io_context("creating the certificate directory"))?;
        Ok(Pki { dir })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A self-signed CA called `name`.
    pub fn ca(&self, name: &str) -> Result<Ca> {
        let ca = Ca {
            certificate: self.dir().join(format!("{name}.pem")),
            key: self.dir().join(format!("{name}.key")),
        };
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "30",
                "-subj",
                &format!("/CN=Test CA {name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                &ca.key.display().to_string(),
                "-out",
                &ca.certificate.display().to_string(),
            ],
            self.dir(),
        )?;
        Ok(ca)
    }

    /// A certificate for `name` issued by `ca`, valid for servers and clients, with the
    /// subject alternative names `san` (e.g. `DNS:localhost,IP:127.0.0.1`).
    pub fn issue(&self, ca: &Ca, name: &str, san: &str) -> Result<Identity> {
        let identity = Identity {
            certificate: self.dir().join(format!("{name}.pem")),
            key: self.dir().join(format!("{name}.key")),
        };
        let csr = self.dir().join(format!("{name}.csr"));
        let ext = self.dir().join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            format!(
                "subjectAltName={san}\nbasicConstraints=CA:FALSE\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
            ),
        )
        .map_err(io_context("writing the certificate extensions"))?;
        openssl(
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &identity.key.display().to_string(),
                "-out",
                &csr.display().to_string(),
            ],
            self.dir(),
        )?;
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr.display().to_string(),
                "-CA",
                &ca.certificate.display().to_string(),
                "-CAkey",
                &ca.key.display().to_string(),
                "-CAcreateserial",
                "-days",
                "30",
                "-extfile",
                &ext.display().to_string(),
                "-out",
                &identity.certificate.display().to_string(),
            ],
            self.dir(),
        )?;
        Ok(identity)
    }
}

impl Identity {
    /// The base64 lines of the private key, to look for in logs.
    pub fn key_lines(&self) -> Result<Vec<String>> {
        let text = std::fs::read_to_string(&self.key).map_err(io_context("reading a key"))?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 16)
            .map(str::to_owned)
            .collect())
    }
}
