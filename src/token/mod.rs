//! OAuth 2.0 client-credentials tokens for Exchange Online (SASL XOAUTH2).
//!
//! - [`fetch`]: one token request (form POST, client secret in the body, never HTTP Basic; or,
//!   for a certificate, a fresh PS256-signed JWT client assertion, see [`CertificateCredential`]).
//! - [`TokenError`]: what the token endpoint or the network said, with the AADSTS code and a remedy.
//! - [`refresh_at`]: when a token of a given lifetime is renewed (exchange-online.md).
//! - [`TokenHandle`]: the shared, lock-free view of the current token, plus a single-flight forced
//!   refresh (a `535` on AUTH from N workers causes one token request).
//! - [`Refresher`]: the background task that keeps a handle's token fresh.
//!
//! Neither a client secret, a private key nor a token ever reaches a `Debug`, `Display` or log
//! line: secrets and tokens are [`Secret`]s, a key is held inside [`CertificateCredential`], and
//! error texts are built from the status, the Entra error fields and our own words.

mod assertion;
pub mod claims;
mod error;
mod handle;

#[cfg(test)]
mod tests;

use std::time::Duration;

use tokio::time::Instant;

use crate::secret::Secret;

pub use assertion::{ASSERTION_TYPE, CertificateCredential};
pub use error::TokenError;
pub use handle::{RefreshPolicy, Refresher, TokenFacts, TokenHandle};

/// The largest token response body read; Entra's are about 2-3 KiB.
const MAX_BODY: usize = 256 * 1024;
/// The longest token lifetime believed (seconds): the endpoint's number is not trusted.
const MAX_LIFETIME_SECS: u64 = 24 * 3600;

/// What identifies the application to the token endpoint.
#[derive(Clone, Debug)]
pub struct ClientCredentials {
    /// `https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token` for the public cloud.
    pub token_url: String,
    /// The Application (client) ID of the Entra app registration.
    pub client_id: String,
    /// `https://outlook.office365.com/.default` for SMTP client submission.
    pub scope: String,
    pub secret: ClientSecret,
}

/// How the application proves its identity. [`fetch`] builds the form per variant, nothing else
/// depends on the kind of credential. `Debug` never shows a secret or key material.
#[derive(Clone, Debug)]
pub enum ClientSecret {
    /// A client secret's *value* (not its Secret ID), sent as `client_secret` in the form body.
    Secret(Secret),
    /// A certificate and its private key: each request carries a fresh PS256-signed JWT as
    /// `client_assertion` (with `client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`)
    /// instead of `client_secret`. Built by [`ClientSecret::certificate_from_pem`].
    Certificate(CertificateCredential),
}

impl ClientSecret {
    /// Certificate credentials from PEM: the certificate (`BEGIN CERTIFICATE`, the first one is
    /// used) and its RSA private key (`BEGIN RSA PRIVATE KEY` or `BEGIN PRIVATE KEY`,
    /// unencrypted). The error text never quotes the input.
    pub fn certificate_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<ClientSecret, String> {
        CertificateCredential::from_pem(cert_pem, key_pem).map(ClientSecret::Certificate)
    }
}

/// An access token. `Debug` shows how long it is still valid, never its value.
#[derive(Clone)]
pub struct Token {
    /// The bearer token for `AUTH XOAUTH2`.
    pub value: Secret,
    /// When it stops being valid (measured from when the request was sent, so slightly early).
    pub expires_at: Instant,
    /// `expires_in` as the endpoint sent it, at most 24 h.
    pub lifetime: Duration,
    /// Set by the [`TokenHandle`] that stores the token (0 = not stored); tells apart two tokens
    /// for the single-flight refresh.
    generation: u64,
}

impl Token {
    /// Time left until expiry (zero once expired).
    pub fn expires_in(&self) -> Duration {
        self.expires_at.saturating_duration_since(Instant::now())
    }

    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.expires_at
    }

    /// When the token was requested.
    fn issued_at(&self) -> Instant {
        self.expires_at
            .checked_sub(self.lifetime)
            .unwrap_or(self.expires_at)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("value", &"[redacted]")
            .field("expires_in", &self.expires_in())
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

/// When to renew a token that lives `lifetime`, counted from when it was issued
/// (exchange-online.md): at 80 % of the lifetime, moved earlier so that at least 10 minutes
/// remain, but never before half the lifetime has passed.
///
/// 60 min → 48 min; 75 min → 60 min (15 min remain); 30 min → 20 min; 12 s → 6 s.
pub fn refresh_at(lifetime: Duration) -> Duration {
    const MARGIN: Duration = Duration::from_secs(10 * 60);
    let at_80 = lifetime.mul_f64(0.8);
    let with_margin = lifetime.saturating_sub(MARGIN);
    at_80.min(with_margin).max(lifetime / 2)
}

/// Requests one token: `POST token_url` with the form
/// `grant_type=client_credentials&client_id=..&client_secret=..&scope=..`, or with
/// `client_assertion_type=..&client_assertion=<JWT>` instead of `client_secret` for a certificate.
///
/// The client should not follow redirects (see [`http_client`]): a 307/308 would resend the
/// form, secret included, to wherever it points.
pub async fn fetch(http: &reqwest::Client, creds: &ClientCredentials) -> Result<Token, TokenError> {
    let sent_at = Instant::now();
    let mut form: Vec<(&str, &str)> = vec![
        ("grant_type", "client_credentials"),
        ("client_id", &creds.client_id),
        ("scope", &creds.scope),
    ];
    let assertion;
    match &creds.secret {
        ClientSecret::Secret(secret) => form.push(("client_secret", secret.expose())),
        ClientSecret::Certificate(cert) => {
            assertion = cert
                .assertion(&creds.token_url, &creds.client_id)
                .map_err(TokenError::Assertion)?;
            form.push(("client_assertion_type", ASSERTION_TYPE));
            form.push(("client_assertion", &assertion));
        }
    }
    let mut response = http
        .post(&creds.token_url)
        .header(reqwest::header::ACCEPT, "application/json")
        .form(&form)
        .send()
        .await
        .map_err(TokenError::Transport)?;
    let status = response.status();
    let retry_after = error::parse_retry_after(response.headers());
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(TokenError::Transport)? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(TokenError::BadResponse {
                status: status.as_u16(),
                reason: "the response body is larger than 256 KiB",
            });
        }
        body.extend_from_slice(&chunk);
    }
    if !status.is_success() {
        return Err(error::from_error_response(
            status.as_u16(),
            retry_after,
            &body,
            creds,
        ));
    }
    parse_token(status.as_u16(), &body, sent_at)
}

/// Parses `{"access_token": "..", "expires_in": 3599, "token_type": "Bearer"}`. Error texts are
/// our own words: a serde message could quote a field's value.
fn parse_token(status: u16, body: &[u8], sent_at: Instant) -> Result<Token, TokenError> {
    let bad = |reason| TokenError::BadResponse { status, reason };
    let json: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| bad("the response is not JSON"))?;
    let access_token = json
        .get("access_token")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("the response has no `access_token` string"))?;
    // The v2.0 endpoint sends a number; the v1.0 endpoint sent a string. A number too large
    // for u64 (serde_json keeps it as a float) counts as "very long" and is clamped below.
    let expires_in = match json.get("expires_in") {
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 1.0).map(|_| u64::MAX)),
        Some(serde_json::Value::String(s)) => s.trim().parse::<u64>().ok(),
        _ => None,
    }
    .filter(|&secs| secs > 0)
    .ok_or_else(|| bad("the response has no positive `expires_in`"))?;
    match json.get("token_type").and_then(|v| v.as_str()) {
        Some(t) if t.eq_ignore_ascii_case("bearer") => {}
        _ => return Err(bad("the response's `token_type` is not Bearer")),
    }
    // Untrusted: `18446744073709551615` would overflow `Instant + lifetime` and panic. Entra
    // issues 60-90 minutes; more than 24 h is taken as 24 h. A short lifetime is believed as
    // is (raising it would present tokens Exchange already considers expired); the refresher
    // never renews sooner than half the lifetime.
    let lifetime = Duration::from_secs(expires_in.min(MAX_LIFETIME_SECS));
    Ok(Token {
        value: Secret::new(access_token),
        expires_at: sent_at + lifetime,
        lifetime,
        generation: 0,
    })
}

/// An HTTP client for the token endpoint: rustls with the aws-lc-rs provider (the only one in
/// the graph), no redirects (the form carries the secret), bounded timeouts.
pub fn http_client() -> reqwest::Result<reqwest::Client> {
    builder().build()
}

/// [`http_client`] that also trusts the certificates in `ca_pem` (an upstream's `ca_file`:
/// the CA of a TLS-inspecting proxy applies to the token endpoint as much as to SMTP).
pub fn http_client_with_roots(ca_pem: Option<&[u8]>) -> Result<reqwest::Client, String> {
    let mut b = builder();
    if let Some(pem) = ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| format!("ca_file: not PEM certificates: {e}"))?;
        b = b.tls_certs_merge(certs);
    }
    b.build()
        .map_err(|e| format!("cannot set up the HTTPS client: {e}"))
}

fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .user_agent(concat!("mailbridge/", env!("CARGO_PKG_VERSION")))
}
