//! Validation of `type: exchange-online` upstreams: defaults from exchange-online.md, the
//! client credential (secret, secret file or certificate) loaded and checked here so that
//! `check-config` reports a bad key file before the daemon starts.

use std::path::{Path, PathBuf};

use super::raw::RawExchange;
use super::{credentials, read_secret_file};
use crate::secret::Secret;
use crate::token::{ClientCredentials, ClientSecret};

pub const DEFAULT_HOST: &str = "smtp.office365.com";
pub const DEFAULT_PORT: u16 = 587;
pub const DEFAULT_TOKEN_URL: &str =
    "https://login.microsoftonline.com/{tenant_id}/oauth2/v2.0/token";
pub const DEFAULT_SCOPE: &str = "https://outlook.office365.com/.default";

/// What to do with the sender before submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderRewrite {
    /// Send as the client sent it (needs SendAs rights for addresses other than `mailbox`).
    None,
    /// Envelope and header From become `mailbox`; the original From moves to Reply-To.
    Mailbox,
}

#[derive(Debug, Clone)]
pub struct ExchangeLimits {
    pub connections: usize,
    pub messages_per_minute: u32,
    pub recipients_per_day: u64,
    pub recipients_per_message: usize,
}

#[derive(Debug, Clone)]
pub struct ExchangeConfig {
    pub mailbox: String,
    pub tenant_id: String,
    pub host: String,
    pub port: u16,
    pub ca_file: Option<PathBuf>,
    /// EHLO name (default: `hostname`).
    pub helo_name: String,
    pub sender_rewrite: SenderRewrite,
    pub limits: ExchangeLimits,
    /// Token URL (with the tenant filled in), client id, scope and the secret or certificate.
    /// `Debug` shows no secret.
    pub credentials: ClientCredentials,
    /// Which credential key was used, for messages (`client_secret_file`, `certificate`, ...).
    pub credential_source: String,
}

fn is_guid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
}

fn is_domain(s: &str) -> bool {
    s.contains('.')
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// A plain address `local@domain` (what Exchange accepts as `user=` and as a sender).
pub fn is_plain_address(s: &str) -> bool {
    match s.rsplit_once('@') {
        Some((l, d)) => {
            !l.is_empty()
                && !s
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || "<>\"".contains(c))
                && is_domain(d)
        }
        None => false,
    }
}

/// Loopback token endpoints may use plain http (tests, local proxies); anything else must be
/// https, because the form carries the client secret. The URL is parsed (WHATWG URL, the
/// `url` crate through reqwest) rather than matched by prefix: `http://127.0.0.1@evil.example/`
/// has the host `evil.example` (the rest is userinfo, RFC 3986 §3.2.1) and
/// `http://127.0.0.1.evil.example/` is a DNS name, not a loopback address.
fn token_url_ok(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    match u.scheme() {
        "https" => u.host().is_some(),
        // An IP literal comes back normalised (`http://2130706433/` is 127.0.0.1), IPv6 in
        // brackets; anything that does not parse as an address is a DNS name.
        "http" => u.host_str().is_some_and(|h| {
            let literal = h
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(h);
            match literal.parse::<std::net::IpAddr>() {
                Ok(ip) => ip.is_loopback(),
                Err(_) => h.eq_ignore_ascii_case("localhost"),
            }
        }),
        _ => false,
    }
}

pub(super) fn validate(
    errs: &mut Vec<String>,
    key: &str,
    raw: RawExchange,
    hostname: &str,
    creds: Option<&Path>,
) -> ExchangeConfig {
    let mut required = |field: &str, v: Option<String>, example: &str| -> String {
        match v {
            Some(s) if !s.trim().is_empty() => s.trim().to_string(),
            _ => {
                errs.push(format!("{key}.{field}: required ({example})"));
                String::new()
            }
        }
    };
    let mailbox = required(
        "mailbox",
        raw.mailbox,
        "the licensed mailbox mail is sent as, e.g. relay@contoso.com",
    );
    let tenant_id = required(
        "tenant_id",
        raw.tenant_id,
        "Entra admin center > Overview > Tenant ID, or a verified domain such as contoso.com",
    );
    let client_id = required(
        "client_id",
        raw.client_id,
        "Entra admin center > App registrations > your app > Application (client) ID",
    );
    if !mailbox.is_empty() && !is_plain_address(&mailbox) {
        errs.push(format!(
            "{key}.mailbox: {mailbox:?} is not an address like relay@contoso.com"
        ));
    }
    if !tenant_id.is_empty() && !is_guid(&tenant_id) && !is_domain(&tenant_id) {
        errs.push(format!(
            "{key}.tenant_id: {tenant_id:?} is neither a GUID nor a domain name"
        ));
    }
    if !client_id.is_empty() && !is_guid(&client_id) {
        errs.push(format!(
            "{key}.client_id: {client_id:?} is not a GUID (the Application (client) ID, not the secret ID or the object ID)"
        ));
    }

    let secret = match (raw.client_secret, raw.client_secret_file, raw.certificate) {
        (Some(s), None, None) => {
            if s.trim().is_empty() {
                errs.push(format!("{key}.client_secret: must not be empty"));
            }
            Some((
                ClientSecret::Secret(Secret::new(s.trim().to_string())),
                "client_secret".to_string(),
            ))
        }
        (None, Some(f), None) => {
            let file_key = format!("{key}.client_secret_file");
            match credentials::expand(&file_key, &f, creds).and_then(|p| {
                read_secret_file(&p, creds)
                    .map(|s| (p, s))
                    .map_err(|e| format!("{file_key}: {e}"))
            }) {
                Ok((p, s)) if s.trim().is_empty() => {
                    errs.push(format!("{file_key}: {} is empty", p.display()));
                    None
                }
                Ok((p, s)) => Some((
                    ClientSecret::Secret(Secret::new(s.trim().to_string())),
                    format!("client_secret_file {}", p.display()),
                )),
                Err(e) => {
                    errs.push(e);
                    None
                }
            }
        }
        (None, None, Some(c)) => {
            let cert_key = format!("{key}.certificate.cert_file");
            let cert_path = credentials::expand(&cert_key, &c.cert_file, creds);
            let cert = cert_path
                .clone()
                .and_then(|p| {
                    std::fs::read(&p)
                        .map_err(|e| format!("{cert_key}: cannot read {}: {e}", p.display()))
                })
                .map_err(|e| errs.push(e));
            let key_key = format!("{key}.certificate.key_file");
            let k = credentials::expand(&key_key, &c.key_file, creds)
                .and_then(|p| read_secret_file(&p, creds).map_err(|e| format!("{key_key}: {e}")))
                .map_err(|e| errs.push(e));
            match (cert, k, cert_path) {
                (Ok(cert), Ok(k), Ok(cert_path)) => {
                    match ClientSecret::certificate_from_pem(&cert, k.as_bytes()) {
                        Ok(cs) => Some((cs, format!("certificate {}", cert_path.display()))),
                        Err(e) => {
                            errs.push(format!("{key}.certificate: {e}"));
                            None
                        }
                    }
                }
                _ => None,
            }
        }
        (None, None, None) => {
            errs.push(format!(
                "{key}: a client credential is required: client_secret_file (recommended: a file with mode 600), client_secret, or certificate {{cert_file, key_file}}"
            ));
            None
        }
        _ => {
            errs.push(format!(
                "{key}: set only one of client_secret, client_secret_file and certificate"
            ));
            None
        }
    };

    let host = raw.host.unwrap_or_else(|| DEFAULT_HOST.into());
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        errs.push(format!("{key}.host: invalid host name {host:?}"));
    }
    let port = raw.port.unwrap_or(DEFAULT_PORT);
    if port == 0 {
        errs.push(format!("{key}.port: must be 1-65535"));
    }
    let token_url = raw
        .token_url
        .unwrap_or_else(|| DEFAULT_TOKEN_URL.into())
        .replace("{tenant_id}", &tenant_id);
    if !token_url_ok(&token_url) {
        errs.push(format!(
            "{key}.token_url: {token_url:?} must be an https:// URL; plain http:// is allowed only to a loopback host (127.0.0.0/8, [::1] or localhost), since the request carries the client secret"
        ));
    }
    let scope = raw.scope.unwrap_or_else(|| DEFAULT_SCOPE.into());
    if scope.trim().is_empty() {
        errs.push(format!("{key}.scope: must not be empty"));
    }
    let ca_file = raw.ca_file.and_then(|f| {
        credentials::expand(&format!("{key}.ca_file"), &f, creds)
            .map_err(|e| errs.push(e))
            .ok()
    });
    if let Some(f) = &ca_file
        && let Err(e) = std::fs::metadata(f)
    {
        errs.push(format!("{key}.ca_file: cannot read {}: {e}", f.display()));
    }
    let helo_name = raw.helo_name.unwrap_or_else(|| hostname.to_string());
    if helo_name.is_empty()
        || !helo_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
    {
        errs.push(format!(
            "{key}.helo_name: invalid host name {helo_name:?} (letters, digits, '.' and '-' only)"
        ));
    }
    let sender_rewrite = match raw.sender_rewrite.as_deref().unwrap_or("none") {
        "none" => SenderRewrite::None,
        "mailbox" => SenderRewrite::Mailbox,
        other => {
            errs.push(format!(
                "{key}.sender_rewrite: unknown value {other:?} (expected none or mailbox)"
            ));
            SenderRewrite::None
        }
    };
    let l = &raw.limits;
    let mut positive = |field: &str, v: Option<u64>, default: u64, max: u64| -> u64 {
        match v {
            None => default,
            Some(n) if n >= 1 && n <= max => n,
            Some(_) => {
                errs.push(format!("{key}.limits.{field}: must be 1-{max}"));
                default
            }
        }
    };
    let limits = ExchangeLimits {
        connections: positive("connections", l.connections, 3, 64) as usize,
        messages_per_minute: positive("messages_per_minute", l.messages_per_minute, 30, 1_000_000)
            as u32,
        recipients_per_day: positive(
            "recipients_per_day",
            l.recipients_per_day,
            10_000,
            1_000_000_000,
        ),
        recipients_per_message: positive(
            "recipients_per_message",
            l.recipients_per_message,
            500,
            100_000,
        ) as usize,
    };

    let (secret, credential_source) = secret.unwrap_or((
        ClientSecret::Secret(Secret::new(String::new())),
        String::new(),
    ));
    ExchangeConfig {
        mailbox,
        tenant_id,
        host,
        port,
        ca_file,
        helo_name,
        sender_rewrite,
        limits,
        credentials: ClientCredentials {
            token_url,
            client_id,
            scope,
            secret,
        },
        credential_source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_url_plain_http_only_to_a_loopback_host() {
        for ok in [
            "https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token",
            "http://127.0.0.1:8080/token",
            "http://127.0.0.1/token",
            "http://127.8.9.10/t",
            "http://localhost:1234/t",
            "http://LOCALHOST/t",
            "http://[::1]:99/t",
        ] {
            assert!(token_url_ok(ok), "{ok}");
        }
        for bad in [
            // userinfo: the host is evil.example
            "http://127.0.0.1@evil.example/",
            "http://127.0.0.1:80@evil.example/",
            "http://localhost@evil.example/t",
            // a host name that merely starts like a loopback address
            "http://127.0.0.1.evil.example/",
            "http://localhost.evil.example/",
            "http://127.evil.example/",
            "http://[::1].evil.example/",
            "http://evil.example/?x=http://127.0.0.1/",
            "http://evil.example#@127.0.0.1/",
            "http://10.0.0.1/t",
            "ftp://127.0.0.1/t",
            "https://",
            "not a url",
            "",
        ] {
            assert!(!token_url_ok(bad), "{bad}");
        }
    }

    #[test]
    fn a_token_url_to_another_host_is_a_config_error_naming_the_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cr3t-value\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        for url in [
            "http://127.0.0.1@evil.example/",
            "http://127.0.0.1.evil.example/",
        ] {
            let yaml = format!(
                "upstreams:\n  - name: contoso\n    type: exchange-online\n    mailbox: relay@contoso.com\n    tenant_id: contoso.com\n    client_id: 11111111-1111-1111-1111-111111111111\n    client_secret_file: {}\n    token_url: {url:?}\n",
                secret.display()
            );
            let e = crate::config::from_yaml_str(&yaml).unwrap_err().to_string();
            assert!(e.contains("upstreams[0].token_url:"), "{e}");
            assert!(e.contains("loopback"), "{e}");
            assert!(!e.contains("s3cr3t"), "{e}");
        }
    }
}
