//! Configuration: load the YAML file (plus `MAILBRIDGE__SECTION__KEY` environment overrides),
//! then validate it into a typed [`Config`]. Validation reports every error at once, each with
//! its key path, so `mailbridge check-config` shows the whole list in one run.

pub mod credentials;
pub mod diff;
pub mod exchange;
pub mod raw;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use raw::{RawConfig, RawSize, RawUpstream};

/// Where the configuration is read from when neither `-c` nor `MAILBRIDGE_CONFIG` says.
pub const DEFAULT_PATH: &str = "/etc/mailbridge/relay.yaml";

#[derive(Debug, Clone)]
pub struct Config {
    pub hostname: String,
    /// Where state that is not mail lives (the generated TLS certificate).
    pub state_dir: PathBuf,
    pub tls: TlsConfig,
    pub users: Vec<User>,
    pub listeners: Vec<Listener>,
    pub access: Access,
    pub limits: Limits,
    pub spool: SpoolConfig,
    pub upstreams: Vec<UpstreamConfig>,
    /// Sender pattern -> index into `upstreams`; first match wins.
    pub routes: Vec<Route>,
    pub queue: QueueConfig,
    pub log: LogConfig,
    /// `Received:` carries `(Authenticated sender: USER)` (off by default: the header goes to
    /// every recipient, and device account names are nobody's business outside).
    pub received_auth_user: bool,
    pub admin: AdminConfig,
}

/// The default `admin.socket` (systemd's `RuntimeDirectory=mailbridge`).
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/mailbridge/admin.sock";

/// `admin:`: where operators reach the running daemon.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// The admin socket; `None` when turned off (`admin.socket: ""`).
    pub socket: Option<PathBuf>,
    /// /metrics, /healthz and the status page; `None` = off (the default).
    pub http_address: Option<std::net::SocketAddr>,
    /// Networks that may use `http_address` besides loopback.
    pub http_allow_networks: Vec<IpNet>,
}

impl Default for AdminConfig {
    fn default() -> AdminConfig {
        AdminConfig {
            socket: Some(PathBuf::from(DEFAULT_ADMIN_SOCKET)),
            http_address: None,
            http_allow_networks: Vec::new(),
        }
    }
}

impl AdminConfig {
    /// Whether `ip` may use the HTTP endpoint: loopback always, else `http_allow_networks`.
    pub fn http_allows(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        ip.is_loopback() || self.http_allow_networks.iter().any(|n| n.contains(&ip))
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    pub sender: SenderPattern,
    pub upstream: usize,
}

impl Config {
    /// The upstream a message goes through: the first route whose pattern matches the sender,
    /// else the authenticated user's `upstream`, else the first upstream.
    pub fn route(&self, sender: &str, auth_user: Option<&str>) -> usize {
        if let Some(r) = self.routes.iter().find(|r| r.sender.matches(sender)) {
            return r.upstream;
        }
        auth_user
            .and_then(|u| self.users.iter().find(|x| x.username == u))
            .and_then(|u| u.upstream)
            .unwrap_or(0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain SMTP only.
    None,
    /// Plain SMTP with STARTTLS offered (RFC 3207), ports 25/587.
    StartTls,
    /// TLS from the first byte (RFC 8314), port 465.
    Implicit,
}

/// The LAN-side certificate. Without files, a self-signed one is generated in `state_dir`.
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The profile of listeners that do not name one (`tls.tls_profile`).
    pub tls_profile: TlsProfile,
    /// The key type of a generated self-signed certificate (`tls.key_type`).
    pub key_type: KeyType,
}

/// Which TLS versions and cipher suites a listener accepts (`tls_profile`; docs/tls.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsProfile {
    /// TLS 1.2 and 1.3, ECDHE with AEAD suites only.
    Modern,
    /// Modern, plus TLS 1.2 CBC suites with ECDHE or DHE, and RSA key exchange.
    #[default]
    Compatible,
    /// Compatible, plus TLS 1.0 and 1.1 (OpenSSL security level 0).
    Legacy,
}

impl TlsProfile {
    pub const ALL: [TlsProfile; 3] = [
        TlsProfile::Modern,
        TlsProfile::Compatible,
        TlsProfile::Legacy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TlsProfile::Modern => "modern",
            TlsProfile::Compatible => "compatible",
            TlsProfile::Legacy => "legacy",
        }
    }

    fn parse(s: &str) -> Option<TlsProfile> {
        TlsProfile::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// The key of the generated self-signed certificate (`tls.key_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyType {
    /// RSA 2048: what every TLS client can use (many printers know no ECDSA).
    #[default]
    Rsa,
    /// ECDSA P-256.
    Ecdsa,
}

/// A local user that may AUTH (PLAIN or LOGIN).
#[derive(Debug, Clone)]
pub struct User {
    pub username: String,
    /// argon2id PHC string.
    pub password_hash: crate::secret::Secret,
    pub allowed_senders: Vec<SenderPattern>,
    /// Index into `Config::upstreams` for this user's mail when no route matches.
    pub upstream: Option<usize>,
}

/// Who may be used as a sender: an exact address, any address of a domain, or anyone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderPattern {
    Any,
    Domain(String),
    Exact(String),
}

impl SenderPattern {
    pub fn parse(s: &str) -> Option<SenderPattern> {
        let s = s.trim();
        if s == "*" {
            return Some(SenderPattern::Any);
        }
        if let Some(domain) = s.strip_prefix("*@") {
            if domain.is_empty() || domain.contains('@') || domain.contains('*') {
                return None;
            }
            return Some(SenderPattern::Domain(domain.to_lowercase()));
        }
        let (local, domain) = s.rsplit_once('@')?;
        if local.is_empty() || domain.is_empty() || s.contains('*') {
            return None;
        }
        Some(SenderPattern::Exact(s.to_lowercase()))
    }

    /// Case-insensitive match of an address against this pattern.
    pub fn matches(&self, address: &str) -> bool {
        match self {
            SenderPattern::Any => true,
            SenderPattern::Domain(d) => address
                .rsplit_once('@')
                .is_some_and(|(l, ad)| !l.is_empty() && ad.eq_ignore_ascii_case(d)),
            SenderPattern::Exact(a) => address.eq_ignore_ascii_case(a),
        }
    }
}

/// True if any pattern allows `address`.
pub fn sender_allowed(patterns: &[SenderPattern], address: &str) -> bool {
    patterns.iter().any(|p| p.matches(address))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BareLf {
    Normalize,
    Reject,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub address: SocketAddr,
    pub tls: TlsMode,
    pub bare_lf: BareLf,
    /// MAIL needs AUTH here, even from `allow_networks`.
    pub require_auth: bool,
    /// AUTH may be used before TLS (legacy devices only).
    pub allow_plaintext_auth: bool,
    /// TLS versions and suites accepted (`listeners[].tls_profile`, else `tls.tls_profile`).
    pub tls_profile: TlsProfile,
    /// EHLO also lists `AUTH=PLAIN LOGIN` (Postfix's `broken_sasl_auth_clients`).
    pub broken_sasl_auth_clients: bool,
}

#[derive(Debug, Clone)]
pub struct Access {
    pub allow_networks: Vec<IpNet>,
    /// Clients whose `<LF>.<LF>` ends DATA (legacy LF-only senders; smuggling defence off).
    pub lf_only_networks: Vec<IpNet>,
    /// Clients that may connect and authenticate.
    pub auth_networks: Vec<IpNet>,
    /// Senders allowed to unauthenticated clients from `allow_networks`.
    pub allowed_senders: Vec<SenderPattern>,
}

impl Access {
    /// True when `ip` is inside `allow_networks`. An IPv4-mapped IPv6 address
    /// (`::ffff:192.0.2.1`, what a dual-stack socket reports for IPv4 clients) is matched as
    /// the IPv4 address it carries.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.allow_networks.iter().any(|n| n.contains(&ip))
    }

    /// True when `ip` may connect at all: in `allow_networks` or in `auth_networks`.
    pub fn may_connect(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.allow_networks
            .iter()
            .chain(&self.auth_networks)
            .any(|n| n.contains(&ip))
    }

    /// True when `ip` is inside `lf_only_networks`.
    pub fn lf_only(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.lf_only_networks.iter().any(|n| n.contains(&ip))
    }
}

/// `::ffff:a.b.c.d` becomes `a.b.c.d`; other addresses are returned as they are.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_connections: usize,
    /// Counted per address for IPv4, per /64 for IPv6.
    pub max_connections_per_ip: usize,
    /// Of `max_connections`, the slots that clients only in `auth_networks` may not take, so
    /// that they cannot crowd out the `allow_networks` printers (issue 8 §3.3).
    pub reserved_connections: usize,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    /// Oldest a session may get; checked at each command and while idle, never in DATA.
    pub max_session_age: Duration,
    /// Commands without progress a session may send (Postfix's smtpd_junk_command_limit).
    pub max_junk_commands: u32,
    /// Longest header section accepted (everything before the first empty line).
    pub max_header_size: usize,
}

#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub enum UpstreamKind {
    Outbox { path: PathBuf },
    ExchangeOnline(Box<exchange::ExchangeConfig>),
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub kind: UpstreamKind,
}

#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub retry: Vec<Duration>,
    pub max_age: Duration,
    pub workers: usize,
    /// Send a DSN to the envelope sender on permanent failure.
    pub bounce: bool,
    /// Gets DSNs for null-sender mail and alerts.
    pub postmaster: Option<String>,
}

impl QueueConfig {
    /// Delay before the next attempt after `attempts` attempts (1-based): `retry[attempts-1]`,
    /// then the last interval for ever after.
    pub fn retry_after(&self, attempts: u32) -> Duration {
        let i = (attempts.max(1) as usize - 1).min(self.retry.len() - 1);
        self.retry[i]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

/// Every problem found in a configuration, each with its key path.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Which file to read: `-c PATH`, else `MAILBRIDGE_CONFIG`, else [`DEFAULT_PATH`].
pub fn resolve_path(cli: Option<&Path>) -> PathBuf {
    if let Some(p) = cli {
        return p.to_path_buf();
    }
    match std::env::var_os("MAILBRIDGE_CONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_PATH),
    }
}

/// Reads the file at `path`, applies `MAILBRIDGE__SECTION__KEY` environment overrides, and
/// validates the result.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with_env(path, None)
}

/// Like [`load`], with the environment given as a map (`None`: the process environment).
pub fn load_with_env(
    path: &Path,
    env: Option<config::Map<String, String>>,
) -> Result<Config, ConfigErrors> {
    if !path.is_file() {
        return Err(ConfigErrors(vec![format!(
            "{}: cannot read the configuration file (does it exist? use -c PATH or MAILBRIDGE_CONFIG)",
            path.display()
        )]));
    }
    // `${CREDENTIALS_DIRECTORY}` in *_file paths: from the same environment.
    let creds = match &env {
        Some(map) => credentials::dir_from(map.get(credentials::VAR).map(Into::into)),
        None => credentials::dir_from_env(),
    };
    let built = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Yaml))
        .add_source(
            config::Environment::with_prefix("MAILBRIDGE")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(env),
        )
        .build()
        .map_err(|e| ConfigErrors(vec![format!("{}: {e}", path.display())]))?;
    let raw: RawConfig = built
        .try_deserialize()
        .map_err(|e| ConfigErrors(vec![format!("{}: {e}", path.display())]))?;
    let exposed = inline_secrets_readable_by_others(path);
    match validate_with(raw, creds.as_deref()) {
        Ok(c) if exposed.is_empty() => Ok(c),
        Ok(_) => Err(ConfigErrors(exposed)),
        Err(mut e) => {
            e.0.extend(exposed);
            Err(e)
        }
    }
}

/// One error per inline `client_secret` or `password_hash` in the file at `path` when any
/// local user may read that file (issue 8 §3.8; the `*_file` keys are held to mode 600 by
/// [`read_secret_file`]). Group read stays allowed: the installed file is `root:mailbridge`
/// mode 640, and the daemon reads it through its group. Only the file itself counts, not
/// environment overrides (those are not readable by others).
fn inline_secrets_readable_by_others(path: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(mode) = std::fs::metadata(path).map(|m| m.permissions().mode()) else {
        return Vec::new();
    };
    if mode & 0o004 == 0 {
        return Vec::new();
    }
    // The file alone, without the environment: which keys does it hold?
    let Ok(raw) = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Yaml))
        .build()
        .and_then(|c| c.try_deserialize::<RawConfig>())
    else {
        return Vec::new();
    };
    let keys = raw
        .upstreams
        .iter()
        .enumerate()
        .filter(|(_, u)| matches!(u, RawUpstream::ExchangeOnline(e) if e.client_secret.is_some()))
        .map(|(i, _)| {
            (
                format!("upstreams[{i}].client_secret"),
                "client_secret_file",
            )
        })
        .chain(
            raw.users
                .iter()
                .enumerate()
                .filter(|(_, u)| u.password_hash.is_some())
                .map(|(i, _)| (format!("users[{i}].password_hash"), "password_hash_file")),
        );
    let p = path.display();
    keys.map(|(key, file_key)| {
        format!(
            "{key}: {p} holds this secret inline and is readable by every local user (mode {:o}); run: chown root:mailbridge {p} && chmod 640 {p} (or chmod 600 if mailbridge owns it), or move the secret to {file_key} (a file with mode 600)",
            mode & 0o777
        )
    })
    .collect()
}

/// Parses a YAML string (no environment overrides); for tests and embedded configs.
pub fn from_yaml_str(yaml: &str) -> Result<Config, ConfigErrors> {
    let built = config::Config::builder()
        .add_source(config::File::from_str(yaml, config::FileFormat::Yaml))
        .build()
        .map_err(|e| ConfigErrors(vec![e.to_string()]))?;
    let raw: RawConfig = built
        .try_deserialize()
        .map_err(|e| ConfigErrors(vec![e.to_string()]))?;
    validate(raw)
}

/// The machine's host name, for the greeting and Received headers. Characters not allowed
/// in a host name (containers often have `_`) become `-`.
pub fn system_hostname() -> String {
    let raw = rustix::system::uname();
    let name: String = raw
        .nodename()
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// Turns the raw file into a typed configuration, collecting every error.
pub fn validate(raw: RawConfig) -> Result<Config, ConfigErrors> {
    validate_with(raw, credentials::dir_from_env().as_deref())
}

/// [`validate`] with `${CREDENTIALS_DIRECTORY}` in `*_file` paths standing for `creds`.
pub fn validate_with(raw: RawConfig, creds: Option<&Path>) -> Result<Config, ConfigErrors> {
    let mut errs = Vec::new();

    let hostname = raw.hostname.unwrap_or_else(system_hostname);
    if hostname.is_empty()
        || !hostname
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
    {
        errs.push(format!(
            "hostname: invalid host name {hostname:?} (letters, digits, '.' and '-' only)"
        ));
    }

    let raw_listeners = raw.listeners.unwrap_or_else(|| {
        vec![raw::RawListener {
            address: "0.0.0.0:2525".into(),
            tls: None,
            bare_lf: None,
            require_auth: None,
            allow_plaintext_auth: None,
            tls_profile: None,
            broken_sasl_auth_clients: None,
        }]
    });
    let default_profile = match raw.tls.tls_profile.as_deref() {
        None => TlsProfile::default(),
        Some(p) => TlsProfile::parse(p).unwrap_or_else(|| {
            errs.push(format!(
                "tls.tls_profile: unknown value {p:?} (expected modern, compatible or legacy)"
            ));
            TlsProfile::default()
        }),
    };
    if raw_listeners.is_empty() {
        errs.push("listeners: at least one listener is required".into());
    }
    let mut listeners = Vec::new();
    for (i, l) in raw_listeners.iter().enumerate() {
        let key = format!("listeners[{i}]");
        let address = match l.address.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                errs.push(format!(
                    "{key}.address: invalid socket address {:?} (expected IP:PORT, e.g. \"0.0.0.0:2525\" or \"[::]:2525\")",
                    l.address
                ));
                None
            }
        };
        let tls = match l.tls.as_deref().unwrap_or("none") {
            "none" => Some(TlsMode::None),
            "starttls" => Some(TlsMode::StartTls),
            "implicit" => Some(TlsMode::Implicit),
            other => {
                errs.push(format!(
                    "{key}.tls: unknown value {other:?} (expected none, starttls or implicit)"
                ));
                None
            }
        };
        let bare_lf = match l.bare_lf.as_deref().unwrap_or("normalize") {
            "normalize" => Some(BareLf::Normalize),
            "reject" => Some(BareLf::Reject),
            other => {
                errs.push(format!(
                    "{key}.bare_lf: unknown value {other:?} (expected normalize or reject)"
                ));
                None
            }
        };
        let tls_profile = match l.tls_profile.as_deref() {
            None => Some(default_profile),
            Some(p) => {
                let parsed = TlsProfile::parse(p);
                if parsed.is_none() {
                    errs.push(format!(
                        "{key}.tls_profile: unknown value {p:?} (expected modern, compatible or legacy)"
                    ));
                }
                parsed
            }
        };
        if let (Some(address), Some(tls), Some(bare_lf), Some(tls_profile)) =
            (address, tls, bare_lf, tls_profile)
        {
            listeners.push(Listener {
                address,
                tls,
                bare_lf,
                require_auth: l.require_auth.unwrap_or(false),
                allow_plaintext_auth: l.allow_plaintext_auth.unwrap_or(false),
                tls_profile,
                broken_sasl_auth_clients: l.broken_sasl_auth_clients.unwrap_or(true),
            });
        }
    }
    for (i, l) in listeners.iter().enumerate() {
        if l.require_auth && l.tls == TlsMode::None && !l.allow_plaintext_auth {
            errs.push(format!(
                "listeners[{i}].require_auth: clients could never authenticate here: set tls: starttls or implicit, or allow_plaintext_auth: true"
            ));
        }
    }
    for (i, a) in listeners.iter().enumerate() {
        // Port 0 (the system picks a free port) may appear several times.
        if a.address.port() != 0 && listeners[..i].iter().any(|b| b.address == a.address) {
            errs.push(format!(
                "listeners[{i}].address: {} is listed twice",
                a.address
            ));
        }
    }

    let nets = raw
        .access
        .allow_networks
        .unwrap_or_else(|| vec!["127.0.0.0/8".into(), "::1/128".into()]);
    let allow_networks = networks(&mut errs, "access.allow_networks", &nets);
    let lf_only_networks = networks(
        &mut errs,
        "access.lf_only_networks",
        &raw.access.lf_only_networks.unwrap_or_default(),
    );
    // Without users nobody can authenticate: admitting the private ranges would only let
    // every LAN host hold connection slots (issue 8 §3.3). So the default is empty then.
    let no_users = raw.users.is_empty();
    let auth_networks = networks(
        &mut errs,
        "access.auth_networks",
        &raw.access.auth_networks.unwrap_or_else(|| {
            if no_users {
                return Vec::new();
            }
            DEFAULT_AUTH_NETWORKS
                .iter()
                .map(|s| s.to_string())
                .collect()
        }),
    );
    let allowed_senders = sender_patterns(
        &mut errs,
        "access.allowed_senders",
        &raw.access
            .allowed_senders
            .unwrap_or_else(|| vec!["*".to_string()]),
    );
    let user_upstreams: Vec<Option<String>> =
        raw.users.iter().map(|u| u.upstream.clone()).collect();
    let users = users(&mut errs, raw.users, creds);
    let key_type = match raw.tls.key_type.as_deref() {
        None | Some("rsa") => KeyType::Rsa,
        Some("ecdsa") => KeyType::Ecdsa,
        Some(other) => {
            errs.push(format!(
                "tls.key_type: unknown value {other:?} (expected rsa or ecdsa)"
            ));
            KeyType::Rsa
        }
    };
    let mut tls = match (raw.tls.cert_file, raw.tls.key_file) {
        (Some(c), Some(k)) => {
            let c = credentials::expand("tls.cert_file", &c, creds).map_err(|e| errs.push(e));
            let k = credentials::expand("tls.key_file", &k, creds).map_err(|e| errs.push(e));
            TlsConfig {
                cert_file: c.ok(),
                key_file: k.ok(),
                ..TlsConfig::default()
            }
        }
        (None, None) => TlsConfig::default(),
        (Some(_), None) => {
            errs.push("tls.key_file: required with tls.cert_file".into());
            TlsConfig::default()
        }
        (None, Some(_)) => {
            errs.push("tls.cert_file: required with tls.key_file".into());
            TlsConfig::default()
        }
    };
    tls.tls_profile = default_profile;
    tls.key_type = key_type;
    let state_dir = PathBuf::from(
        raw.state_dir
            .unwrap_or_else(|| "/var/lib/mailbridge".into()),
    );

    let l = &raw.limits;
    let max_message_size = match &l.max_message_size {
        None => Some(35 * 1024 * 1024),
        Some(s) => match parse_size(s) {
            Some(0) | None => {
                errs.push(format!(
                    "limits.max_message_size: invalid size {} (expected bytes or a unit: 35MiB, 25MB, 512KiB)",
                    show_size(s)
                ));
                None
            }
            Some(n) => Some(n),
        },
    };
    // 256 KiB is Exchange Online's own header limit.
    let max_header_size = match &l.max_header_size {
        None => 256 * 1024,
        Some(s) => match parse_size(s) {
            Some(n) if (1024..=64 * 1024 * 1024).contains(&n) => n as usize,
            _ => {
                errs.push(format!(
                    "limits.max_header_size: invalid size {} (expected 1KiB to 64MiB, e.g. 256KiB)",
                    show_size(s)
                ));
                256 * 1024
            }
        },
    };
    let mut positive = |key: &str, v: Option<u64>, default: u64| -> usize {
        match v {
            None => default as usize,
            Some(0) => {
                errs.push(format!("{key}: must be at least 1"));
                default as usize
            }
            Some(n) => n as usize,
        }
    };
    let max_recipients = positive("limits.max_recipients", l.max_recipients, 500);
    let max_connections = positive("limits.max_connections", l.max_connections, 256);
    let max_connections_per_ip = positive(
        "limits.max_connections_per_ip",
        l.max_connections_per_ip,
        32,
    );
    let workers = positive("queue.workers", raw.queue.workers, 8);
    let max_junk_commands =
        positive("limits.max_junk_commands", l.max_junk_commands, 30).min(u32::MAX as usize) as u32;
    let reserved_connections = match l.reserved_connections {
        None => max_connections / 4,
        Some(n) if n as usize >= max_connections => {
            errs.push(format!(
                "limits.reserved_connections: must be less than limits.max_connections ({max_connections}); 0 turns the reserve off"
            ));
            0
        }
        Some(n) => n as usize,
    };
    let command_timeout = duration(
        &mut errs,
        "limits.command_timeout",
        l.command_timeout.as_deref(),
        "5m",
    );
    let data_timeout = duration(
        &mut errs,
        "limits.data_timeout",
        l.data_timeout.as_deref(),
        "10m",
    );
    let max_session_age = duration(
        &mut errs,
        "limits.max_session_age",
        l.max_session_age.as_deref(),
        "30m",
    );

    let spool_path = PathBuf::from(
        raw.spool
            .path
            .unwrap_or_else(|| "/var/spool/mailbridge".into()),
    );
    if spool_path.as_os_str().is_empty() {
        errs.push("spool.path: must not be empty".into());
    }

    let mut upstreams = Vec::new();
    if raw.upstreams.is_empty() {
        errs.push(
            "upstreams: at least one upstream is required (e.g. `- name: local, type: outbox, path: /var/lib/mailbridge/outbox`)"
                .into(),
        );
    }
    for (i, u) in raw.upstreams.into_iter().enumerate() {
        match u {
            RawUpstream::Outbox(o) => {
                if o.name.is_empty() {
                    errs.push(format!("upstreams[{i}].name: must not be empty"));
                }
                if o.path.is_empty() {
                    errs.push(format!("upstreams[{i}].path: must not be empty"));
                }
                upstreams.push(UpstreamConfig {
                    name: o.name,
                    kind: UpstreamKind::Outbox {
                        path: PathBuf::from(o.path),
                    },
                });
            }
            RawUpstream::ExchangeOnline(x) => {
                if x.name.is_empty() {
                    errs.push(format!("upstreams[{i}].name: must not be empty"));
                }
                let name = x.name.clone();
                let cfg =
                    exchange::validate(&mut errs, &format!("upstreams[{i}]"), *x, &hostname, creds);
                upstreams.push(UpstreamConfig {
                    name,
                    kind: UpstreamKind::ExchangeOnline(Box::new(cfg)),
                });
            }
        }
    }
    for (i, u) in upstreams.iter().enumerate() {
        if upstreams[..i].iter().any(|o| o.name == u.name) {
            errs.push(format!("upstreams[{i}].name: {:?} is used twice", u.name));
        }
    }
    let find_upstream = |errs: &mut Vec<String>, key: &str, name: &str| -> Option<usize> {
        let found = upstreams.iter().position(|u| u.name == name);
        if found.is_none() && !upstreams.is_empty() {
            let names: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
            errs.push(format!(
                "{key}: no upstream is named {name:?} (upstreams: {})",
                names.join(", ")
            ));
        }
        found
    };
    let mut routes = Vec::new();
    for (i, r) in raw.routes.iter().enumerate() {
        let key = format!("routes[{i}]");
        let pattern = SenderPattern::parse(&r.sender);
        if pattern.is_none() {
            errs.push(format!(
                "{key}.sender: invalid sender pattern {:?} (expected an address, \"*@domain\" or \"*\")",
                r.sender
            ));
        }
        let up = find_upstream(&mut errs, &format!("{key}.upstream"), &r.upstream);
        if let (Some(sender), Some(upstream)) = (pattern, up) {
            routes.push(Route { sender, upstream });
        }
    }
    let mut users = users;
    for (i, (u, name)) in users.iter_mut().zip(user_upstreams).enumerate() {
        if let Some(name) = name {
            u.upstream = find_upstream(&mut errs, &format!("users[{i}].upstream"), &name);
        }
    }

    let retry_raw = raw
        .queue
        .retry
        .unwrap_or_else(|| ["1m", "5m", "15m", "30m", "1h"].map(String::from).to_vec());
    if retry_raw.is_empty() {
        errs.push("queue.retry: needs at least one interval".into());
    }
    let retry: Vec<Duration> = retry_raw
        .iter()
        .enumerate()
        .map(|(i, r)| duration(&mut errs, &format!("queue.retry[{i}]"), Some(r), "1m"))
        .collect();
    let max_age = duration(
        &mut errs,
        "queue.max_age",
        raw.queue.max_age.as_deref(),
        "5d",
    );

    let postmaster = raw.queue.postmaster.clone();
    if let Some(p) = &postmaster
        && !exchange::is_plain_address(p)
    {
        errs.push(format!(
            "queue.postmaster: {p:?} is not an address like admin@contoso.com"
        ));
    }

    let level = raw.log.level.unwrap_or_else(|| "info".into());
    if !["error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
        errs.push(format!(
            "log.level: unknown level {level:?} (expected error, warn, info, debug or trace)"
        ));
    }
    let format = match raw.log.format.as_deref().unwrap_or("text") {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            errs.push(format!(
                "log.format: unknown format {other:?} (expected text or json)"
            ));
            LogFormat::Text
        }
    };

    let admin = {
        let a = &raw.admin;
        let socket = match a.socket.as_deref() {
            None => Some(PathBuf::from(DEFAULT_ADMIN_SOCKET)),
            Some("") => None,
            Some(p) => Some(PathBuf::from(p)),
        };
        let http_allow_networks = networks(
            &mut errs,
            "admin.http_allow_networks",
            &a.http_allow_networks,
        );
        let http_address = match a.http_address.as_deref() {
            None | Some("") => None,
            Some(s) => match s.parse::<std::net::SocketAddr>() {
                Ok(addr) => {
                    if !canonical_ip(addr.ip()).is_loopback() && http_allow_networks.is_empty() {
                        errs.push(format!(
                            "admin.http_address: {addr} is reachable from other hosts: list the networks that may read metrics and the status page in admin.http_allow_networks (loopback needs no entry), or bind 127.0.0.1"
                        ));
                    }
                    Some(addr)
                }
                Err(_) => {
                    errs.push(format!(
                        "admin.http_address: invalid address {s:?} (expected host:port, e.g. 127.0.0.1:9925)"
                    ));
                    None
                }
            },
        };
        AdminConfig {
            socket,
            http_address,
            http_allow_networks,
        }
    };

    if !errs.is_empty() {
        return Err(ConfigErrors(errs));
    }
    Ok(Config {
        hostname,
        state_dir,
        tls,
        users,
        listeners,
        access: Access {
            allow_networks,
            lf_only_networks,
            auth_networks,
            allowed_senders,
        },
        limits: Limits {
            max_message_size: max_message_size.unwrap_or_default(),
            max_recipients,
            max_connections,
            max_connections_per_ip,
            reserved_connections,
            command_timeout,
            data_timeout,
            max_session_age,
            max_junk_commands,
            max_header_size,
        },
        spool: SpoolConfig { path: spool_path },
        upstreams,
        queue: QueueConfig {
            retry,
            max_age,
            workers,
            bounce: raw.queue.bounce.unwrap_or(true),
            postmaster,
        },
        log: LogConfig { level, format },
        routes,
        received_auth_user: raw.received_auth_user.unwrap_or(false),
        admin,
    })
}

fn duration(errs: &mut Vec<String>, key: &str, v: Option<&str>, default: &str) -> Duration {
    let text = v.unwrap_or(default);
    match humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() => d,
        _ => {
            errs.push(format!(
                "{key}: invalid duration {text:?} (expected e.g. 30s, 5m, 1h, 5d)"
            ));
            humantime::parse_duration(default).unwrap_or(Duration::from_secs(60))
        }
    }
}

/// `access.auth_networks` when not set and `users` are configured: private ranges and
/// loopback. Without users the default is empty.
pub const DEFAULT_AUTH_NETWORKS: [&str; 6] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "127.0.0.0/8",
    "::1/128",
    "fc00::/7",
];

fn sender_patterns(errs: &mut Vec<String>, key: &str, list: &[String]) -> Vec<SenderPattern> {
    let mut out = Vec::new();
    for (i, p) in list.iter().enumerate() {
        match SenderPattern::parse(p) {
            Some(pat) => out.push(pat),
            None => errs.push(format!(
                "{key}[{i}]: invalid sender pattern {p:?} (expected an address, \"*@domain\" or \"*\")"
            )),
        }
    }
    out
}

fn users(errs: &mut Vec<String>, raw: Vec<raw::RawUser>, creds: Option<&Path>) -> Vec<User> {
    let mut out: Vec<User> = Vec::new();
    for (i, u) in raw.into_iter().enumerate() {
        let key = format!("users[{i}]");
        if u.username.is_empty() || u.username.chars().any(|c| c.is_control()) {
            errs.push(format!(
                "{key}.username: must be non-empty, without control characters"
            ));
        }
        if out.iter().any(|o| o.username == u.username) {
            errs.push(format!("{key}.username: {:?} is listed twice", u.username));
        }
        let hash = match (u.password_hash, u.password_hash_file) {
            (Some(h), None) => Some(h),
            (None, Some(f)) => {
                let file_key = format!("{key}.password_hash_file");
                match credentials::expand(&file_key, &f, creds) {
                    Ok(path) => match read_secret_file(&path, creds) {
                        Ok(h) => Some(h),
                        Err(e) => {
                            errs.push(format!("{file_key}: {e}"));
                            None
                        }
                    },
                    Err(e) => {
                        errs.push(e);
                        None
                    }
                }
            }
            (Some(_), Some(_)) => {
                errs.push(format!(
                    "{key}: set password_hash or password_hash_file, not both"
                ));
                None
            }
            (None, None) => {
                errs.push(format!(
                    "{key}.password_hash: required (make one with `mailbridge hash-password`)"
                ));
                None
            }
        };
        let hash = hash.map(|h| h.trim().to_string());
        if let Some(h) = &hash {
            match argon2::PasswordHash::new(h) {
                Ok(p) if p.algorithm.as_str() == "argon2id" => {}
                _ => errs.push(format!(
                    "{key}.password_hash: not an argon2id PHC string (\"$argon2id$v=19$...\"); make one with `mailbridge hash-password`"
                )),
            }
        }
        let senders = sender_patterns(errs, &format!("{key}.allowed_senders"), &u.allowed_senders);
        if u.allowed_senders.is_empty() {
            errs.push(format!(
                "{key}.allowed_senders: at least one pattern is required (an address, \"*@domain\", or \"*\" for any)"
            ));
        }
        out.push(User {
            username: u.username,
            password_hash: crate::secret::Secret::new(hash.unwrap_or_default()),
            allowed_senders: senders,
            upstream: None,
        });
    }
    out
}

/// Reads a file holding a secret, refusing one that group or others may read
/// (behaviour.md C36; group read is allowed inside the credentials directory `creds`, see
/// [`credentials::mode_allowed`]). The error never contains the file's content.
pub fn read_secret_file(path: &Path, creds: Option<&Path>) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mode = meta.permissions().mode();
    if !credentials::mode_allowed(path, mode, creds) {
        return Err(format!(
            "{} is readable by group or others (mode {:o}); run: chmod 600 {}",
            path.display(),
            mode & 0o777,
            path.display()
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn networks(errs: &mut Vec<String>, key: &str, list: &[String]) -> Vec<IpNet> {
    let mut out = Vec::new();
    for (i, n) in list.iter().enumerate() {
        match parse_net(n) {
            Some(net) => out.push(net),
            None => errs.push(format!(
                "{key}[{i}]: invalid network {n:?} (expected CIDR such as \"192.168.0.0/16\" or an address)"
            )),
        }
    }
    out
}

fn parse_net(s: &str) -> Option<IpNet> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Some(canonical_net(n));
    }
    s.parse::<IpAddr>()
        .ok()
        .map(|ip| canonical_net(IpNet::from(ip)))
}

/// A `::ffff:a.b.c.d/n` network (n >= 96) is stored as its IPv4 form, so it matches the
/// canonical IPv4 client addresses.
fn canonical_net(n: IpNet) -> IpNet {
    if let IpNet::V6(v6) = n
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
    {
        return ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
            .map(IpNet::V4)
            .unwrap_or(n);
    }
    n.trunc()
}

fn show_size(s: &RawSize) -> String {
    match s {
        RawSize::Bytes(n) => n.to_string(),
        RawSize::Text(t) => format!("{t:?}"),
    }
}

/// `35MiB`, `35 MiB`, `25MB`, `512k`, `1024` -> bytes. Decimal units are powers of 1000,
/// binary (`KiB`, `MiB`, `GiB`) and single letters (`k`, `m`, `g`) powers of 1024.
pub fn parse_size(s: &RawSize) -> Option<u64> {
    let text = match s {
        RawSize::Bytes(n) => return Some(*n),
        RawSize::Text(t) => t.trim(),
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000 * 1000,
        "gb" => 1000 * 1000 * 1000,
        "k" | "kib" => 1024,
        "m" | "mib" => 1024 * 1024,
        "g" | "gib" => 1024 * 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// The configuration `serve --demo` runs with: loopback only, spool and outbox under `dir`.
pub fn demo(dir: &Path) -> Config {
    let mut cfg = validate(RawConfig {
        listeners: Some(vec![raw::RawListener {
            address: "127.0.0.1:2525".into(),
            tls: None,
            bare_lf: None,
            require_auth: None,
            allow_plaintext_auth: None,
            tls_profile: None,
            broken_sasl_auth_clients: None,
        }]),
        upstreams: vec![RawUpstream::Outbox(raw::RawOutbox {
            name: "demo-outbox".into(),
            path: dir.join("outbox").to_string_lossy().into_owned(),
        })],
        ..RawConfig::default()
    })
    .expect("the built-in demo configuration is valid");
    cfg.spool.path = dir.join("spool");
    cfg.state_dir = dir.join("state");
    cfg.admin.socket = Some(dir.join("admin.sock"));
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listeners:
  - address: "127.0.0.1:2525"
    tls: none
access:
  allow_networks: ["127.0.0.0/8", "::1/128", "::ffff:10.0.0.0/104"]
  lf_only_networks: ["10.9.0.0/16"]
limits:
  max_message_size: 35MiB
  max_recipients: 100
  command_timeout: 5m
spool:
  path: /tmp/spool
upstreams:
  - name: local
    type: outbox
    path: /tmp/outbox
queue:
  retry: [1m, 5m]
  max_age: 5d
  workers: 4
log:
  level: debug
  format: json
"#;

    #[test]
    fn good_config_validates() {
        let c = from_yaml_str(GOOD).unwrap();
        assert_eq!(c.limits.max_message_size, 35 * 1024 * 1024);
        assert_eq!(c.limits.max_recipients, 100);
        assert_eq!(c.queue.retry_after(1), Duration::from_secs(60));
        assert_eq!(c.queue.retry_after(9), Duration::from_secs(300));
        assert!(c.access.allows("10.1.2.3".parse().unwrap()));
        assert!(c.access.allows("::ffff:127.0.0.1".parse().unwrap()));
        assert!(c.access.allows("::1".parse().unwrap()));
        assert!(!c.access.allows("192.168.1.1".parse().unwrap()));
        assert!(c.access.lf_only("::ffff:10.9.1.1".parse().unwrap()));
        assert!(!c.access.lf_only("10.1.2.3".parse().unwrap()));
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn all_errors_reported_with_key_paths() {
        let bad = r#"
listeners:
  - address: "0.0.0.0:99999"
  - address: "127.0.0.1:25"
    tls: bogus
access:
  allow_networks: ["10.0.0.0/33"]
limits:
  max_message_size: 12 parsecs
  data_timeout: soon
upstreams: []
log:
  level: loud
"#;
        let e = from_yaml_str(bad).unwrap_err().to_string();
        for want in [
            "listeners[0].address: invalid socket address \"0.0.0.0:99999\"",
            "listeners[1].tls: unknown value \"bogus\"",
            "access.allow_networks[0]: invalid network \"10.0.0.0/33\"",
            "limits.max_message_size: invalid size \"12 parsecs\"",
            "limits.data_timeout: invalid duration \"soon\"",
            "upstreams: at least one upstream is required",
            "log.level: unknown level \"loud\"",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
    }

    #[test]
    fn unknown_key_is_an_error() {
        let e = from_yaml_str("limits:\n  max_recipents: 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_recipents"), "{e}");
    }

    #[test]
    fn issue_8_session_and_header_keys() {
        const MIN: &str = "upstreams:\n  - name: local\n    type: outbox\n    path: /tmp/outbox\n";
        let c = from_yaml_str(MIN).unwrap();
        assert_eq!(c.limits.max_header_size, 256 * 1024);
        assert_eq!(c.limits.max_session_age, Duration::from_secs(30 * 60));
        assert_eq!(c.limits.max_junk_commands, 30);
        assert!(!c.received_auth_user);
        assert!(c.listeners[0].broken_sasl_auth_clients);
        let c = from_yaml_str(&format!(
            "{MIN}limits:\n  max_header_size: 1MiB\n  max_session_age: 2h\n  max_junk_commands: 5\nreceived_auth_user: true\nlisteners:\n  - address: \"127.0.0.1:25\"\n    broken_sasl_auth_clients: false\n"
        ))
        .unwrap();
        assert_eq!(c.limits.max_header_size, 1024 * 1024);
        assert_eq!(c.limits.max_session_age, Duration::from_secs(2 * 3600));
        assert_eq!(c.limits.max_junk_commands, 5);
        assert!(c.received_auth_user);
        assert!(!c.listeners[0].broken_sasl_auth_clients);
        let e = from_yaml_str(&format!(
            "{MIN}limits:\n  max_header_size: 100\n  max_session_age: never\n  max_junk_commands: 0\n"
        ))
        .unwrap_err()
        .to_string();
        for want in [
            "limits.max_header_size: invalid size 100 (expected 1KiB to 64MiB",
            "limits.max_session_age: invalid duration \"never\"",
            "limits.max_junk_commands: must be at least 1",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
    }

    #[test]
    fn environment_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let env: config::Map<String, String> = [
            ("MAILBRIDGE__LIMITS__MAX_RECIPIENTS", "42"),
            ("MAILBRIDGE__QUEUE__MAX_AGE", "2m"),
            ("MAILBRIDGE__LOG__LEVEL", "warn"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = load_with_env(&path, Some(env)).unwrap();
        assert_eq!(c.limits.max_recipients, 42);
        assert_eq!(c.queue.max_age, Duration::from_secs(120));
        assert_eq!(c.log.level, "warn");
        // Without overrides the file's values stand.
        let c = load_with_env(&path, Some(config::Map::new())).unwrap();
        assert_eq!(c.limits.max_recipients, 100);
    }

    #[test]
    fn reserved_connections_default_and_auth_networks_without_users() {
        let base = "upstreams: [{name: o, type: outbox, path: /tmp/o}]\n";
        let c = from_yaml_str(base).unwrap();
        assert_eq!(c.limits.max_connections, 256);
        assert_eq!(c.limits.reserved_connections, 64);
        // No users: nobody can authenticate, so nobody is admitted for it.
        assert!(c.access.auth_networks.is_empty());
        assert!(!c.access.may_connect("192.168.1.9".parse().unwrap()));
        let c = from_yaml_str(&format!("{base}limits: {{max_connections: 10}}\n")).unwrap();
        assert_eq!(c.limits.reserved_connections, 2);
        let c = from_yaml_str(&format!(
            "{base}limits: {{reserved_connections: 0}}\naccess: {{auth_networks: [10.0.0.0/8]}}\n"
        ))
        .unwrap();
        assert_eq!(c.limits.reserved_connections, 0);
        assert!(c.access.may_connect("10.1.2.3".parse().unwrap()));
        let e = from_yaml_str(&format!(
            "{base}limits: {{max_connections: 10, reserved_connections: 10}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(
                "limits.reserved_connections: must be less than limits.max_connections (10)"
            ),
            "{e}"
        );
    }

    #[test]
    fn inline_secrets_in_a_file_others_can_read_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.yaml");
        let hash = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$K8ZzTHKJfHnJh0eR1X3QP1DVa5kzfN3d2kTXFVJ4a8o";
        let yaml = format!(
            "upstreams:\n  - {{name: o, type: outbox, path: /tmp/o}}\n  - {{name: x, type: exchange-online, mailbox: a@b.com, tenant_id: contoso.com, client_id: 11111111-1111-1111-1111-111111111111, client_secret: Inline-S3cret}}\nusers:\n  - {{username: scanner01, password_hash: \"{hash}\", allowed_senders: [\"*\"]}}\n"
        );
        std::fs::write(&path, &yaml).unwrap();
        let set = |mode| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode));
        let no_env = || load_with_env(&path, Some(config::Map::new()));
        for mode in [0o600, 0o640, 0o660] {
            set(mode).unwrap();
            assert!(no_env().is_ok(), "mode {mode:o}: {:?}", no_env().err());
        }
        set(0o644).unwrap();
        let e = no_env().unwrap_err().to_string();
        let p = path.display();
        for key in [
            "upstreams[1].client_secret:",
            "users[0].password_hash:",
            "chmod 640",
            "client_secret_file",
            "password_hash_file",
        ] {
            assert!(e.contains(key), "{key} missing: {e}");
        }
        assert!(e.contains(&format!("{p} holds this secret inline")), "{e}");
        assert_eq!(e.lines().count(), 2, "{e}");
        for secret in ["Inline-S3cret", "c29tZXNhbHQ", "$argon2id"] {
            assert!(!e.contains(secret), "{secret} in {e}");
        }
        // Other errors are reported alongside.
        std::fs::write(&path, format!("{yaml}limits: {{max_connections: 0}}\n")).unwrap();
        set(0o604).unwrap();
        let e = no_env().unwrap_err().to_string();
        assert!(e.contains("limits.max_connections"), "{e}");
        assert!(e.contains("users[0].password_hash:"), "{e}");
        // Without inline secrets a readable file is fine (secrets in *_file or none at all).
        std::fs::write(&path, GOOD).unwrap();
        set(0o644).unwrap();
        assert!(no_env().is_ok());
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let e = load(Path::new("/nonexistent/relay.yaml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/relay.yaml: cannot read"), "{e}");
    }

    #[test]
    fn sender_patterns_match_case_insensitively() {
        let p = |s: &str| SenderPattern::parse(s).unwrap();
        assert!(p("*").matches("anyone@anywhere"));
        assert!(p("*@Contoso.com").matches("scanner@CONTOSO.COM"));
        assert!(!p("*@contoso.com").matches("x@sub.contoso.com"));
        assert!(!p("*@contoso.com").matches("@contoso.com"));
        assert!(p("Scanner@contoso.com").matches("scanner@Contoso.com"));
        assert!(!p("scanner@contoso.com").matches("scanner2@contoso.com"));
        for bad in ["", "nobody", "*@", "a*@b", "*@a@b", "@x"] {
            assert_eq!(SenderPattern::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn users_tls_and_access_keys() {
        let dir = tempfile::tempdir().unwrap();
        let hash = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$K8ZzTHKJfHnJh0eR1X3QP1DVa5kzfN3d2kTXFVJ4a8o";
        let hash_file = dir.path().join("h");
        std::fs::write(&hash_file, format!("{hash}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hash_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let yaml = format!(
            r#"
listeners:
  - address: "127.0.0.1:587"
    tls: starttls
    require_auth: true
  - address: "127.0.0.1:465"
    tls: implicit
upstreams: [{{name: o, type: outbox, path: /tmp/o}}]
users:
  - username: scanner01
    password_hash: "{hash}"
    allowed_senders: ["scanner@contoso.com", "*@scans.contoso.com"]
  - username: erp@contoso.com
    password_hash_file: {}
    allowed_senders: ["*"]
"#,
            hash_file.display()
        );
        let c = from_yaml_str(&yaml).unwrap();
        assert_eq!(c.listeners[0].tls, TlsMode::StartTls);
        assert!(c.listeners[0].require_auth);
        assert_eq!(c.listeners[1].tls, TlsMode::Implicit);
        assert_eq!(c.users.len(), 2);
        assert_eq!(c.users[1].password_hash.expose(), hash);
        assert!(
            !format!("{:?}", c.users).contains("argon2id"),
            "hashes never in Debug"
        );
        assert!(c.access.may_connect("192.168.1.9".parse().unwrap()));
        assert!(!c.access.allows("192.168.1.9".parse().unwrap()));
        assert!(!c.access.may_connect("8.8.8.8".parse().unwrap()));

        // A hash file others can read is refused (behaviour.md C36), without its content.
        std::fs::set_permissions(&hash_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = from_yaml_str(&yaml).unwrap_err().to_string();
        assert!(
            e.contains("users[1].password_hash_file:") && e.contains("chmod 600"),
            "{e}"
        );
        assert!(!e.contains("argon2id$v=19$m"), "{e}");

        let bad = r#"
upstreams: [{name: o, type: outbox, path: /tmp/o}]
tls: {cert_file: /x.pem}
access: {allowed_senders: ["nobody"]}
users:
  - username: a
    password_hash: "$2y$10$bcrypt"
    allowed_senders: []
"#;
        let e = from_yaml_str(bad).unwrap_err().to_string();
        for want in [
            "tls.key_file: required with tls.cert_file",
            "access.allowed_senders[0]: invalid sender pattern \"nobody\"",
            "users[0].password_hash: not an argon2id PHC string",
            "users[0].allowed_senders: at least one pattern is required",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
    }

    #[test]
    fn sizes() {
        let t = |s: &str| parse_size(&RawSize::Text(s.into()));
        assert_eq!(t("35MiB"), Some(36_700_160));
        assert_eq!(t("25MB"), Some(25_000_000));
        assert_eq!(t("1024"), Some(1024));
        assert_eq!(t("2 k"), Some(2048));
        assert_eq!(t("MiB"), None);
        assert_eq!(parse_size(&RawSize::Bytes(7)), Some(7));
    }

    #[test]
    fn demo_config_is_loopback_only() {
        let c = demo(Path::new("/tmp/x"));
        assert_eq!(c.listeners[0].address, "127.0.0.1:2525".parse().unwrap());
        assert!(!c.access.allows("192.168.0.1".parse().unwrap()));
    }
    fn exchange_yaml(dir: &Path, upstream_extra: &str, top_extra: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let secret = dir.join("secret");
        std::fs::write(&secret, "s3cr3t-value\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        format!(
            "hostname: relay.test\nupstreams:\n  - name: contoso\n    type: exchange-online\n    mailbox: relay@contoso.com\n    tenant_id: 00000000-0000-0000-0000-000000000000\n    client_id: 11111111-1111-1111-1111-111111111111\n    client_secret_file: {}\n{upstream_extra}{top_extra}",
            secret.display()
        )
    }

    #[test]
    fn exchange_online_defaults_and_secret_file() {
        let dir = tempfile::tempdir().unwrap();
        let c = from_yaml_str(&exchange_yaml(dir.path(), "", "")).unwrap();
        let UpstreamKind::ExchangeOnline(x) = &c.upstreams[0].kind else {
            panic!("not exchange")
        };
        assert_eq!(x.host, "smtp.office365.com");
        assert_eq!(x.port, 587);
        assert_eq!(
            x.credentials.token_url,
            "https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000/oauth2/v2.0/token"
        );
        assert_eq!(
            x.credentials.scope,
            "https://outlook.office365.com/.default"
        );
        assert_eq!(x.helo_name, "relay.test");
        assert_eq!(x.sender_rewrite, exchange::SenderRewrite::None);
        assert_eq!(x.limits.connections, 3);
        assert_eq!(x.limits.messages_per_minute, 30);
        assert_eq!(x.limits.recipients_per_day, 10_000);
        assert_eq!(x.limits.recipients_per_message, 500);
        assert!(c.queue.bounce);
        assert_eq!(c.queue.postmaster, None);
        // The secret never shows in Debug.
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cr3t-value"), "{dbg}");
        match &x.credentials.secret {
            crate::token::ClientSecret::Secret(s) => assert_eq!(s.expose(), "s3cr3t-value"),
            _ => panic!("secret expected"),
        }
    }

    #[test]
    fn exchange_online_errors_name_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = "upstreams:\n  - name: x\n    type: exchange-online\n    mailbox: not-an-address\n    tenant_id: \"bad tenant\"\n    client_id: secret-id-by-mistake\n    client_secret: a\n    client_secret_file: /nonexistent\n    token_url: http://login.example.com/t\n    sender_rewrite: always\n    limits: {connections: 0}\nroutes:\n  - sender: \"*@fabrikam.com\"\n    upstream: nowhere\nqueue:\n  postmaster: nobody\n";
        let e = from_yaml_str(yaml).unwrap_err().to_string();
        for want in [
            "upstreams[0].mailbox:",
            "upstreams[0].tenant_id:",
            "upstreams[0].client_id:",
            "upstreams[0]: set only one of client_secret, client_secret_file and certificate",
            "upstreams[0].token_url:",
            "upstreams[0].sender_rewrite:",
            "upstreams[0].limits.connections:",
            "routes[0].upstream: no upstream is named \"nowhere\"",
            "queue.postmaster:",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
        // A world-readable secret file is refused with the chmod to fix it.
        use std::os::unix::fs::PermissionsExt;
        let yaml = exchange_yaml(dir.path(), "", "");
        std::fs::set_permissions(
            dir.path().join("secret"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let e = from_yaml_str(&yaml).unwrap_err().to_string();
        assert!(
            e.contains("client_secret_file") && e.contains("chmod 600"),
            "{e}"
        );
        // No credential at all.
        let e = from_yaml_str("upstreams:\n  - {name: x, type: exchange-online, mailbox: a@b.com, tenant_id: contoso.com, client_id: 11111111-1111-1111-1111-111111111111}\n").unwrap_err().to_string();
        assert!(e.contains("a client credential is required"), "{e}");
        // A bad certificate key is reported by check-config, not at the first delivery.
        std::fs::write(dir.path().join("c.pem"), "not a certificate").unwrap();
        std::fs::write(dir.path().join("k.pem"), "not a key").unwrap();
        std::fs::set_permissions(
            dir.path().join("k.pem"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let yaml = format!(
            "upstreams:\n  - {{name: x, type: exchange-online, mailbox: a@b.com, tenant_id: contoso.com, client_id: 11111111-1111-1111-1111-111111111111, certificate: {{cert_file: {d}/c.pem, key_file: {d}/k.pem}}}}\n",
            d = dir.path().display()
        );
        let e = from_yaml_str(&yaml).unwrap_err().to_string();
        assert!(e.contains("upstreams[0].certificate:"), "{e}");
        assert!(!e.contains("not a key"), "{e}");
    }

    #[test]
    fn routes_then_user_upstream_then_first() {
        let dir = tempfile::tempdir().unwrap();
        let hash = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$K8ZzTHKJfHnJh0eR1X3QP1DVa5kzfN3d2kTXFVJ4a8o";
        let top = format!(
            "  - name: out\n    type: outbox\n    path: {d}/o\n  - name: fab\n    type: outbox\n    path: {d}/f\nroutes:\n  - sender: \"*@fabrikam.com\"\n    upstream: fab\nusers:\n  - username: erp\n    password_hash: \"{hash}\"\n    allowed_senders: [\"*\"]\n    upstream: out\nqueue:\n  bounce: false\n  postmaster: admin@contoso.com\n",
            d = dir.path().display()
        );
        let c = from_yaml_str(&exchange_yaml(dir.path(), "", &top)).unwrap();
        assert_eq!(c.route("scan@fabrikam.com", None), 2);
        assert_eq!(
            c.route("scan@fabrikam.com", Some("erp")),
            2,
            "routes come first"
        );
        assert_eq!(c.route("erp@contoso.com", Some("erp")), 1);
        assert_eq!(c.route("x@contoso.com", None), 0);
        assert_eq!(c.route("x@contoso.com", Some("unknown")), 0);
        assert!(!c.queue.bounce);
        assert_eq!(c.queue.postmaster.as_deref(), Some("admin@contoso.com"));
    }

    #[test]
    fn tls_profile_per_listener_with_a_default_and_key_type() {
        let yaml = r#"
listeners:
  - address: "127.0.0.1:587"
    tls: starttls
  - address: "127.0.0.1:2587"
    tls: starttls
    tls_profile: legacy
upstreams: [{name: o, type: outbox, path: /tmp/o}]
"#;
        let c = from_yaml_str(yaml).unwrap();
        assert_eq!(c.tls.tls_profile, TlsProfile::Compatible);
        assert_eq!(c.tls.key_type, KeyType::Rsa);
        assert_eq!(c.listeners[0].tls_profile, TlsProfile::Compatible);
        assert_eq!(c.listeners[1].tls_profile, TlsProfile::Legacy);

        let c = from_yaml_str(&format!(
            "{yaml}tls:\n  tls_profile: modern\n  key_type: ecdsa\n"
        ))
        .unwrap();
        assert_eq!(c.listeners[0].tls_profile, TlsProfile::Modern);
        assert_eq!(c.listeners[1].tls_profile, TlsProfile::Legacy);
        assert_eq!(c.tls.key_type, KeyType::Ecdsa);

        let e = from_yaml_str(
            "listeners:\n  - address: \"127.0.0.1:25\"\n    tls_profile: old\nupstreams: [{name: o, type: outbox, path: /tmp/o}]\ntls: {tls_profile: tls1, key_type: dsa}\n",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "listeners[0].tls_profile: unknown value \"old\" (expected modern, compatible or legacy)",
            "tls.tls_profile: unknown value \"tls1\"",
            "tls.key_type: unknown value \"dsa\" (expected rsa or ecdsa)",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
    }
}
