//! Certificate credentials: a JWT client assertion (RFC 7523) signed with the app's private key,
//! sent as `client_assertion` instead of `client_secret` (exchange-online.md).

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use sha2::{Digest as _, Sha256};

/// `client_assertion_type` for a JWT bearer assertion.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long an assertion is valid (`exp - nbf`).
const ASSERTION_LIFETIME_SECS: u64 = 10 * 60;

/// A certificate (DER) and its RSA private key, ready to sign assertions. `Debug` shows the
/// thumbprint only, never key material.
#[derive(Clone)]
pub struct CertificateCredential {
    cert_der: Vec<u8>,
    key: EncodingKey,
    /// base64url (no padding) SHA-256 of the DER: the `x5t#S256` header.
    x5t_s256: String,
    /// base64url (no padding) SHA-1 of the DER: the `x5t` header.
    x5t: String,
    /// The certificate's notAfter, seconds since the Unix epoch (`None` if unreadable).
    not_after: Option<i64>,
}

impl std::fmt::Debug for CertificateCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateCredential")
            .field("x5t#S256", &self.x5t_s256)
            .field("key", &"[redacted]")
            .finish()
    }
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    aud: &'a str,
    iss: &'a str,
    sub: &'a str,
    jti: String,
    nbf: u64,
    iat: u64,
    exp: u64,
}

impl CertificateCredential {
    /// Loads the first certificate of `cert_pem` and an RSA private key (`RSA PRIVATE KEY` =
    /// PKCS#1 or `PRIVATE KEY` = PKCS#8) from `key_pem`. The key is tried once here, so an
    /// unusable key fails at load time, not at the first token request. Error texts never quote
    /// the input.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertificateCredential, String> {
        let cert = CertificateDer::from_pem_slice(cert_pem)
            .map_err(|_| "the certificate file holds no PEM CERTIFICATE".to_string())?;
        let key = EncodingKey::from_rsa_pem(key_pem).map_err(|_| {
            "the private key file holds no RSA private key in PEM form \
             (BEGIN RSA PRIVATE KEY or BEGIN PRIVATE KEY, unencrypted)"
                .to_string()
        })?;
        let probe = jsonwebtoken::crypto::sign(b"probe", &key, Algorithm::PS256).map_err(|_| {
            "the private key cannot sign with PS256 (not an RSA key of at least 2048 bits?)"
                .to_string()
        })?;
        // The key must belong to the certificate, or Entra answers AADSTS700027 at every
        // token request: check the probe signature with the certificate's public key.
        let signature = URL_SAFE_NO_PAD
            .decode(probe.trim_end_matches('='))
            .map_err(|_| "signing with the private key failed".to_string())?;
        let end_entity = webpki::EndEntityCert::try_from(&cert)
            .map_err(|_| "the certificate file holds no valid X.509 certificate".to_string())?;
        end_entity
            .verify_signature(
                webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
                b"probe",
                &signature,
            )
            .map_err(|_| {
                "the private key does not belong to the certificate (their public keys differ): \
                 use the key file made together with this certificate"
                    .to_string()
            })?;
        Ok(CertificateCredential::new(cert.as_ref().to_vec(), key))
    }

    fn new(cert_der: Vec<u8>, key: EncodingKey) -> CertificateCredential {
        let x5t_s256 = URL_SAFE_NO_PAD.encode(Sha256::digest(&cert_der));
        let sha1 =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, &cert_der);
        let x5t = URL_SAFE_NO_PAD.encode(sha1.as_ref());
        let not_after = x509_parser::parse_x509_certificate(&cert_der)
            .ok()
            .map(|(_, c)| c.validity().not_after.timestamp());
        CertificateCredential {
            cert_der,
            key,
            x5t_s256,
            x5t,
            not_after,
        }
    }

    /// When the certificate expires (seconds since the Unix epoch), if it could be read.
    pub fn not_after(&self) -> Option<i64> {
        self.not_after
    }

    /// A warning when the certificate has expired or expires within 30 days: Entra then
    /// refuses every token request (AADSTS700027) and mail stops. `None` when all is well.
    pub fn expiry_warning(&self, now_unix: i64) -> Option<String> {
        let not_after = self.not_after?;
        let days = (not_after - now_unix).div_euclid(86_400);
        let when = httpdate::fmt_http_date(
            UNIX_EPOCH + std::time::Duration::from_secs(not_after.max(0) as u64),
        );
        let renew = "make a new certificate and key, upload the certificate in Entra admin center > App registrations > your app > Certificates & secrets > Certificates, then point `certificate` at the new files and restart mailbridge";
        if not_after <= now_unix {
            Some(format!(
                "the app certificate (x5t#S256 {}) expired on {when}: {renew}",
                self.x5t_s256
            ))
        } else if days < 30 {
            let in_days = match days {
                0 => "today".to_string(),
                1 => "in 1 day".to_string(),
                n => format!("in {n} days"),
            };
            Some(format!(
                "the app certificate (x5t#S256 {}) expires on {when}, {in_days}: {renew}",
                self.x5t_s256
            ))
        } else {
            None
        }
    }

    /// The certificate, DER-encoded.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The `x5t#S256` thumbprint (base64url SHA-256 of the DER).
    pub fn thumbprint_sha256(&self) -> &str {
        &self.x5t_s256
    }

    /// The `x5t` thumbprint (base64url SHA-1 of the DER).
    pub fn thumbprint_sha1(&self) -> &str {
        &self.x5t
    }

    /// A fresh PS256 assertion for `token_url` and `client_id`, valid from now for 10 minutes.
    pub fn assertion(&self, token_url: &str, client_id: &str) -> Result<String, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| "the system clock is before 1970".to_string())?
            .as_secs();
        let mut header = Header::new(Algorithm::PS256);
        header.typ = Some("JWT".into());
        header.x5t = Some(self.x5t.clone());
        header.x5t_s256 = Some(self.x5t_s256.clone());
        let claims = Claims {
            aud: token_url,
            iss: client_id,
            sub: client_id,
            jti: uuid::Uuid::now_v7().to_string(),
            nbf: now,
            iat: now,
            exp: now + ASSERTION_LIFETIME_SECS,
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| format!("signing the client assertion failed: {:?}", e.kind()))
    }
}
