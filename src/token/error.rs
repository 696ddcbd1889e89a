//! Token endpoint errors, the AADSTS codes in them and what to do about each.

use std::time::{Duration, SystemTime};

use super::{ClientCredentials, ClientSecret};

/// The longest error description kept (Entra's carry a trace and correlation id at the end).
const MAX_DESCRIPTION: usize = 600;

/// A failed token request. No variant holds the secret or a token: texts come from the HTTP
/// status, Entra's `error` / `error_description` (with any echo of the secret removed) and our
/// own words.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The endpoint answered with an error status.
    #[error("token endpoint answered HTTP {status}{}{}", fmt_error(.error), fmt_description(.description))]
    Endpoint {
        status: u16,
        /// Entra's `error`, e.g. `invalid_client`.
        error: Option<String>,
        /// Entra's `error_description`, e.g. `AADSTS7000215: Invalid client secret provided...`.
        description: Option<String>,
        /// The number after `AADSTS` (or the first of `error_codes`).
        aadsts: Option<u32>,
        /// From a `Retry-After` header (seconds or HTTP date).
        retry_after: Option<Duration>,
    },
    /// The endpoint could not be reached or the response could not be read.
    #[error("token endpoint unreachable: {0}")]
    Transport(#[source] reqwest::Error),
    /// A success status with a body that is not a usable token response.
    #[error("token endpoint answered HTTP {status} but {reason}")]
    BadResponse { status: u16, reason: &'static str },
    /// The client assertion (certificate credentials) could not be built; nothing was sent.
    #[error("could not build the client assertion: {0}")]
    Assertion(String),
}

fn fmt_error(error: &Option<String>) -> String {
    error
        .as_deref()
        .map(|e| format!(" ({e})"))
        .unwrap_or_default()
}

fn fmt_description(description: &Option<String>) -> String {
    description
        .as_deref()
        .map(|d| format!(": {d}"))
        .unwrap_or_default()
}

impl TokenError {
    /// The AADSTS code, when the endpoint sent one.
    pub fn aadsts(&self) -> Option<u32> {
        match self {
            TokenError::Endpoint { aadsts, .. } => *aadsts,
            _ => None,
        }
    }

    /// The HTTP status, when there was a response.
    pub fn status(&self) -> Option<u16> {
        match self {
            TokenError::Endpoint { status, .. } | TokenError::BadResponse { status, .. } => {
                Some(*status)
            }
            TokenError::Transport(e) => e.status().map(|s| s.as_u16()),
            TokenError::Assertion(_) => None,
        }
    }

    /// How long the endpoint asked us to wait (`Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TokenError::Endpoint { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether trying again later can help without anyone changing anything: network errors,
    /// 408, 429 and 5xx. Configuration errors (400/401 with an AADSTS code) are retried too, but
    /// slowly, and they need an administrator.
    pub fn is_temporary(&self) -> bool {
        match self {
            TokenError::Transport(_) => true,
            TokenError::Assertion(_) => false,
            TokenError::Endpoint { status, .. } | TokenError::BadResponse { status, .. } => {
                *status == 408 || *status == 429 || *status >= 500
            }
        }
    }

    /// A short meaning of the AADSTS code or status, for logs and alerts.
    pub fn meaning(&self) -> &'static str {
        match self.aadsts() {
            Some(7000215) => "invalid client secret",
            Some(7000222) => "the client secret has expired",
            Some(700016) => "application not found in the tenant",
            Some(90002) => "tenant not found",
            Some(700027) => "client assertion rejected (certificate not uploaded or bad signature)",
            _ => match self {
                TokenError::Transport(_) => "the token endpoint could not be reached",
                TokenError::Assertion(_) => "the client assertion could not be signed",
                TokenError::BadResponse { .. } => "the token endpoint sent an unusable response",
                TokenError::Endpoint { status: 429, .. } => "throttled by the token endpoint",
                TokenError::Endpoint { status, .. } if *status >= 500 => {
                    "the token endpoint had a temporary failure"
                }
                TokenError::Endpoint { .. } => "the token endpoint refused the request",
            },
        }
    }

    /// What the administrator should do about it.
    pub fn remedy(&self) -> &'static str {
        match self.aadsts() {
            Some(7000215) => {
                "the client secret is wrong: copy the secret's Value (not its Secret ID) from \
                 Entra ID > App registrations > (the app) > Certificates & secrets into \
                 client_secret / client_secret_file"
            }
            Some(7000222) => {
                "the client secret has expired: create a new one in Entra ID > App registrations > \
                 (the app) > Certificates & secrets and put its Value into client_secret / \
                 client_secret_file"
            }
            Some(700016) => {
                "the application is not known in this tenant: client_id or tenant_id is wrong \
                 (this is not a consent problem). client_id must be the Application (client) ID, \
                 not an Object ID or a secret's ID, and tenant_id the Directory (tenant) ID of the \
                 tenant where the app is registered (Entra ID > App registrations > the app > \
                 Overview)"
            }
            Some(90002) => {
                "the tenant does not exist: check tenant_id (the Directory (tenant) ID or a \
                 verified domain) and the token_url's cloud"
            }
            Some(700027) => {
                "the client assertion was rejected: upload the certificate (public part) in Entra \
                 ID > App registrations > (the app) > Certificates & secrets, and check that the \
                 configured private key belongs to it and the system clock is right"
            }
            _ => match self {
                TokenError::Transport(_) => {
                    "temporary, retried automatically; if it persists check DNS, proxy and \
                     firewall for HTTPS to the token_url host (login.microsoftonline.com)"
                }
                TokenError::Assertion(_) => {
                    "check the configured certificate and private key (an unencrypted RSA key of \
                     at least 2048 bits, PEM) and the system clock"
                }
                e if e.is_temporary() => {
                    "temporary (throttling or an outage at the token endpoint): retried \
                     automatically with back-off"
                }
                TokenError::BadResponse { .. } => {
                    "check that token_url points to the Entra v2.0 token endpoint \
                     (https://login.microsoftonline.com/{tenant_id}/oauth2/v2.0/token) and that no \
                     proxy rewrites the response"
                }
                TokenError::Endpoint { .. } => {
                    "check tenant_id, client_id, the client secret and scope; look the AADSTS code \
                     up at https://login.microsoftonline.com/error"
                }
            },
        }
    }
}

/// Builds the error for a non-success response: Entra's JSON `error`, `error_description`
/// (AADSTS code) and `error_codes`, any occurrence of the secret removed.
pub(super) fn from_error_response(
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
    creds: &ClientCredentials,
) -> TokenError {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        json.as_ref()
            .and_then(|j| j.get(name))
            .and_then(|v| v.as_str())
            .map(|s| scrub(s, creds))
    };
    let error = field("error");
    let description = field("error_description");
    let aadsts = description.as_deref().and_then(aadsts_code).or_else(|| {
        json.as_ref()
            .and_then(|j| j.get("error_codes"))
            .and_then(|c| c.get(0))
            .and_then(|c| c.as_u64())
            .and_then(|c| u32::try_from(c).ok())
    });
    TokenError::Endpoint {
        status,
        error,
        description,
        aadsts,
        retry_after,
    }
}

/// Removes the secret from text the endpoint sent back (as is, and form-encoded as the
/// request body carried it), and any JWT (an echoed client assertion or token), shortens it,
/// and keeps it on one line.
fn scrub(text: &str, creds: &ClientCredentials) -> String {
    let mut text = text.replace(['\r', '\n'], " ");
    match &creds.secret {
        ClientSecret::Secret(secret) if !secret.expose().is_empty() => {
            let raw = secret.expose();
            text = replace_ignoring_case_if(&text, raw, false, "[redacted]");
            text = replace_ignoring_case_if(&text, &form_encode(raw), true, "[redacted]");
        }
        ClientSecret::Secret(_) | ClientSecret::Certificate(_) => {}
    }
    text = redact_jwts(&text);
    if text.len() > MAX_DESCRIPTION {
        let mut end = MAX_DESCRIPTION;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// `application/x-www-form-urlencoded` as the request body encodes a value.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            b => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Replaces `needle` in `text`; with `fold`, ASCII case is ignored (percent escapes may come
/// back in either case).
fn replace_ignoring_case_if(text: &str, needle: &str, fold: bool, with: &str) -> String {
    if !fold {
        return text.replace(needle, with);
    }
    let (lower, n) = (text.to_ascii_lowercase(), needle.to_ascii_lowercase());
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while let Some(i) = lower[at..].find(&n) {
        out.push_str(&text[at..at + i]);
        out.push_str(with);
        at += i + n.len();
    }
    out.push_str(&text[at..]);
    out
}

/// Replaces every JWT-shaped word (`eyJ...` with two dots, base64url) with `[redacted]`.
fn redact_jwts(text: &str) -> String {
    let is_b64 = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("eyJ") {
        out.push_str(&rest[..i]);
        let word_len = rest[i..].find(|c| !is_b64(c)).unwrap_or(rest.len() - i);
        let word = &rest[i..i + word_len];
        if word.matches('.').count() >= 2 {
            out.push_str("[redacted]");
        } else {
            out.push_str(word);
        }
        rest = &rest[i + word_len..];
    }
    out.push_str(rest);
    out
}

/// `AADSTS7000215: Invalid client secret...` → 7000215.
pub(super) fn aadsts_code(description: &str) -> Option<u32> {
    let start = description.find("AADSTS")? + "AADSTS".len();
    let digits: String = description[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// `Retry-After: 120` or `Retry-After: <HTTP date>`.
pub(super) fn parse_retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    // Untrusted: capped at a day, so no caller can overflow `Instant + retry_after`.
    const MAX: Duration = Duration::from_secs(24 * 3600);
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(MAX),
    )
}
