//! The configuration as written in the YAML file: serde structs close to the file, with
//! `deny_unknown_fields` so a typo is an error, not a silently ignored key. Values that need
//! checking stay strings here; `super::validate` turns them into typed values and reports every
//! problem with its key path.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Name used in the greeting, EHLO reply and Received headers (default: the host name).
    pub hostname: Option<String>,
    pub listeners: Option<Vec<RawListener>>,
    #[serde(default)]
    pub access: RawAccess,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub spool: RawSpool,
    #[serde(default)]
    pub upstreams: Vec<RawUpstream>,
    #[serde(default)]
    pub queue: RawQueue,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub tls: RawTls,
    /// Where mailbridge keeps state that is not mail (the generated TLS certificate).
    pub state_dir: Option<String>,
    #[serde(default)]
    pub users: Vec<RawUser>,
    /// Sender pattern -> upstream; first match wins.
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    /// Name the AUTH user in our `Received:` header (Postfix's
    /// `smtpd_sasl_authenticated_header`; default false).
    pub received_auth_user: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub sender: String,
    pub upstream: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    /// Default for listeners without their own: `modern`, `compatible` or `legacy`.
    pub tls_profile: Option<String>,
    /// Key of the generated self-signed certificate: `rsa` or `ecdsa`.
    pub key_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUser {
    pub username: String,
    pub password_hash: Option<String>,
    pub password_hash_file: Option<String>,
    #[serde(default)]
    pub allowed_senders: Vec<String>,
    /// The upstream this user's mail goes through when no route matches.
    pub upstream: Option<String>,
}

impl std::fmt::Debug for RawUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawUser")
            .field("username", &self.username)
            .field(
                "password_hash",
                &self.password_hash.as_ref().map(|_| "[redacted]"),
            )
            .field("password_hash_file", &self.password_hash_file)
            .field("allowed_senders", &self.allowed_senders)
            .field("upstream", &self.upstream)
            .finish()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub address: String,
    pub tls: Option<String>,
    /// `normalize` (default): bare LF becomes CRLF. `reject`: 550 5.5.2 like Postfix.
    pub bare_lf: Option<String>,
    /// MAIL needs AUTH on this listener, even from `allow_networks`.
    pub require_auth: Option<bool>,
    /// AUTH before TLS (legacy devices only).
    pub allow_plaintext_auth: Option<bool>,
    /// Which TLS versions and cipher suites this listener accepts (default: `tls.tls_profile`).
    pub tls_profile: Option<String>,
    /// Also advertise `AUTH=PLAIN LOGIN` in EHLO (Postfix's name; default true).
    pub broken_sasl_auth_clients: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccess {
    pub allow_networks: Option<Vec<String>>,
    /// Clients that end lines with a bare LF only; for them `<LF>.<LF>` ends DATA.
    pub lf_only_networks: Option<Vec<String>>,
    /// Networks that may connect and authenticate (others get 554 5.7.1).
    pub auth_networks: Option<Vec<String>>,
    /// Envelope/header senders allowed to unauthenticated clients from `allow_networks`.
    pub allowed_senders: Option<Vec<String>>,
}

/// A size: plain bytes (`36700160`) or with a unit (`35MiB`, `25MB`, `512k`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_message_size: Option<RawSize>,
    pub max_recipients: Option<u64>,
    pub max_connections: Option<u64>,
    pub max_connections_per_ip: Option<u64>,
    /// Slots only `allow_networks` clients may take (default: a quarter of max_connections).
    pub reserved_connections: Option<u64>,
    pub command_timeout: Option<String>,
    pub data_timeout: Option<String>,
    /// A session is closed (421 4.7.0) once it is this old (default 30m).
    pub max_session_age: Option<String>,
    /// Commands without progress (EHLO, NOOP, RSET, ...) before 421 4.7.0 (default 30).
    pub max_junk_commands: Option<u64>,
    /// Longest header section accepted (default 256 KiB, Exchange Online's limit).
    pub max_header_size: Option<RawSize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpool {
    pub path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum RawUpstream {
    Outbox(RawOutbox),
    ExchangeOnline(Box<RawExchange>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExchange {
    pub name: String,
    pub mailbox: Option<String>,
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub client_secret_file: Option<String>,
    pub certificate: Option<RawCertificate>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub token_url: Option<String>,
    pub scope: Option<String>,
    pub ca_file: Option<String>,
    pub helo_name: Option<String>,
    pub sender_rewrite: Option<String>,
    #[serde(default)]
    pub limits: RawExchangeLimits,
}

impl std::fmt::Debug for RawExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawExchange")
            .field("name", &self.name)
            .field("mailbox", &self.mailbox)
            .field("tenant_id", &self.tenant_id)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("client_secret_file", &self.client_secret_file)
            .field("certificate", &self.certificate)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("token_url", &self.token_url)
            .field("scope", &self.scope)
            .field("ca_file", &self.ca_file)
            .field("helo_name", &self.helo_name)
            .field("sender_rewrite", &self.sender_rewrite)
            .field("limits", &self.limits)
            .finish()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert_file: String,
    pub key_file: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExchangeLimits {
    pub connections: Option<u64>,
    pub messages_per_minute: Option<u64>,
    pub recipients_per_day: Option<u64>,
    pub recipients_per_message: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutbox {
    pub name: String,
    pub path: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueue {
    pub retry: Option<Vec<String>>,
    pub max_age: Option<String>,
    pub workers: Option<u64>,
    /// DSN to the envelope sender on permanent failure (default true).
    pub bounce: Option<bool>,
    /// Gets failures of null-sender mail and token/tenant alerts.
    pub postmaster: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    pub format: Option<String>,
}

/// `admin:`: the admin socket (CLI commands) and the optional HTTP endpoint (metrics, health,
/// status page).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// Unix socket for `mailbridge queue|status|senders|reload` (default
    /// /run/mailbridge/admin.sock; an empty string turns it off).
    pub socket: Option<String>,
    /// `host:port` for /metrics, /healthz and the status page (default: off).
    pub http_address: Option<String>,
    /// Who may read it besides loopback; required for a non-loopback `http_address`.
    #[serde(default)]
    pub http_allow_networks: Vec<String>,
}
