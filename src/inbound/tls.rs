//! LAN-side TLS: builds the rustls server configuration from `tls.cert_file`/`tls.key_file`,
//! or from a self-signed certificate generated once into `state_dir`. TLS 1.2 and 1.3 only
//! (rustls has nothing older), aws-lc-rs provider only. Reads key material from disk; never
//! logs it (the certificate's SHA-256 fingerprint is public and is logged for pinning).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert_file {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("tls.key_file {path}: {reason} (PEM with a PKCS#8, PKCS#1 or SEC1 private key)")]
    Key { path: PathBuf, reason: String },
    #[error("certificate and key do not belong together, or the key type is not supported: {0}")]
    Config(String),
    #[error("cannot create the self-signed certificate in {path}: {reason}")]
    SelfSigned { path: PathBuf, reason: String },
}

/// The protocol versions offered: TLS 1.2 and 1.3 (behaviour.md C37).
pub fn protocol_versions() -> &'static [&'static rustls::SupportedProtocolVersion] {
    static VERSIONS: [&rustls::SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    &VERSIONS
}

/// Builds the acceptor for listeners that speak TLS. Blocking (file I/O, key generation).
pub fn acceptor(config: &Config) -> Result<TlsAcceptor, TlsError> {
    let (cert_path, key_path) = match (&config.tls.cert_file, &config.tls.key_file) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => self_signed(&config.state_dir, &config.hostname)?,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert_path,
            reason: "no certificate found (expected PEM \"BEGIN CERTIFICATE\")".into(),
        });
    }
    // A private key is a secret: refuse one that group or others may read (C36).
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_path)
            .map_err(|e| TlsError::Key {
                path: key_path.clone(),
                reason: e.to_string(),
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(TlsError::Key {
                path: key_path.clone(),
                reason: format!(
                    "readable by group or others (mode {:o}); run: chmod 600 {}",
                    mode & 0o777,
                    key_path.display()
                ),
            });
        }
    }
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::Key {
        path: key_path.clone(),
        reason: match e {
            rustls_pki_types::pem::Error::NoItemsFound => "no private key found".into(),
            other => other.to_string(),
        },
    })?;
    tracing::info!(
        cert = %cert_path.display(),
        sha256 = %fingerprint(&certs[0]),
        "TLS certificate loaded"
    );
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(protocol_versions())
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// SHA-256 of a certificate's DER, as colon-separated hex (what `openssl x509 -fingerprint
/// -sha256` prints), for admins who pin it.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Returns the paths of the generated certificate and key in `state_dir/tls/`, creating them
/// the first time (printers rarely verify certificates; the fingerprint is logged).
fn self_signed(state_dir: &Path, hostname: &str) -> Result<(PathBuf, PathBuf), TlsError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = state_dir.join("tls");
    let cert = dir.join("selfsigned-cert.pem");
    let key = dir.join("selfsigned-key.pem");
    if cert.is_file() && key.is_file() {
        return Ok((cert, key));
    }
    let err = |reason: String| TlsError::SelfSigned {
        path: dir.clone(),
        reason,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| err(e.to_string()))?;
    let names = vec![hostname.to_string(), "localhost".to_string()];
    let generated = rcgen::generate_simple_self_signed(names).map_err(|e| err(e.to_string()))?;
    let write = |path: &Path, data: &str, mode: u32| -> std::io::Result<()> {
        use std::io::Write;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write(&key, &generated.signing_key.serialize_pem(), 0o600).map_err(|e| err(e.to_string()))?;
    write(&cert, &generated.cert.pem(), 0o644).map_err(|e| err(e.to_string()))?;
    tracing::warn!(
        cert = %cert.display(),
        sha256 = %fingerprint(generated.cert.der()),
        "no tls.cert_file configured: generated a self-signed certificate (devices that verify certificates need tls.cert_file, or pin this fingerprint)"
    );
    Ok((cert, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_is_generated_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1) = self_signed(dir.path(), "relay.test").unwrap();
        let first = std::fs::read(&c1).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&k1).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (c2, _) = self_signed(dir.path(), "relay.test").unwrap();
        assert_eq!(std::fs::read(c2).unwrap(), first, "not regenerated");
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "upstreams: [{{name: o, type: outbox, path: /tmp/o}}]\ntls:\n  cert_file: {d}/c.pem\n  key_file: {d}/k.pem\n",
            d = dir.path().display()
        );
        let cfg = crate::config::from_yaml_str(&yaml).unwrap();
        std::fs::write(dir.path().join("c.pem"), "not pem").unwrap();
        std::fs::write(dir.path().join("k.pem"), "not pem").unwrap();
        let e = acceptor(&cfg).err().unwrap().to_string();
        assert!(
            e.contains("tls.cert_file") && e.contains("no certificate found"),
            "{e}"
        );
    }
}
