//! TLS material for the OTLP connection: a custom CA and a client certificate (mTLS). Read
//! and checked at start-up so that a bad file is reported before anything is loaded into the
//! kernel.

use std::path::PathBuf;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate { what: String, path: PathBuf },
    #[error("{what} {path} is not a PEM private key: {reason}")]
    BadKey {
        what: String,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "a client certificate needs its key, and a key its certificate: give both --otlp-client-cert and --otlp-client-key"
    )]
    HalfIdentity,
    #[error("TLS files were given but the endpoint {0} is not https://; use an https:// endpoint")]
    NotHttps(String),
}

/// Where each file came from, for messages: the flag or the variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TlsFile {
    pub(crate) what: String,
    pub(crate) path: PathBuf,
}

#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct TlsMaterial {
    /// PEM of the CA bundle that signs the collector's certificate.
    pub(crate) ca: Option<Vec<u8>>,
    /// PEM certificate chain and key of this client.
    pub(crate) identity: Option<(Vec<u8>, Vec<u8>)>,
}

fn read(file: &TlsFile) -> Result<Vec<u8>, TlsError> {
    std::fs::read(&file.path).map_err(|source| TlsError::Read {
        what: file.what.clone(),
        path: file.path.clone(),
        source,
    })
}

fn certificates(file: &TlsFile) -> Result<Vec<u8>, TlsError> {
    let pem = read(file)?;
    let count = CertificateDer::pem_slice_iter(&pem).filter(Result::is_ok).count();
    if count == 0 {
        return Err(TlsError::NoCertificate {
            what: file.what.clone(),
            path: file.path.clone(),
        });
    }
    Ok(pem)
}

fn key(file: &TlsFile) -> Result<Vec<u8>, TlsError> {
    let pem = read(file)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::BadKey {
        what: file.what.clone(),
        path: file.path.clone(),
        reason: e.to_string(),
    })?;
    Ok(pem)
}

impl TlsMaterial {
    pub(crate) fn load(
        ca: Option<&TlsFile>,
        cert: Option<&TlsFile>,
        key_file: Option<&TlsFile>,
    ) -> Result<Self, TlsError> {
        let identity = match (cert, key_file) {
            (Some(c), Some(k)) => Some((certificates(c)?, key(k)?)),
            (None, None) => None,
            _ => return Err(TlsError::HalfIdentity),
        };
        Ok(Self {
            ca: ca.map(certificates).transpose()?,
            identity,
        })
    }
}

/// Never the key itself in a log.
impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca", &self.ca.as_ref().map(|pem| pem.len()))
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn file(dir: &Path, name: &str, text: &str) -> TlsFile {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        TlsFile {
            what: "--test".into(),
            path,
        }
    }

    #[test]
    fn rejects_what_is_not_pem() {
        let dir = std::env::temp_dir().join(format!("synspan-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = file(&dir, "junk.pem", "not a certificate\n");
        let err = TlsMaterial::load(Some(&junk), None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let missing = TlsFile {
            what: "--otlp-ca-file".into(),
            path: dir.join("nope.pem"),
        };
        let err = TlsMaterial::load(Some(&missing), None, None)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("cannot read --otlp-ca-file"), "{err}");
        let err = TlsMaterial::load(None, Some(&junk), None).unwrap_err();
        assert!(matches!(err, TlsError::HalfIdentity));
        let _ = std::fs::remove_dir_all(dir);
    }
}
