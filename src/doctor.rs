//! `mailbridge doctor`: walks the whole path a message takes and says, step by step, what
//! works (✓), what does not (✗, with the cause and the remedy) and what was not tried (-).
//!
//! The steps: the configuration; the spool (a probe file in `tmp/`: create, write, fsync,
//! fsync the directory, remove); then for each `exchange-online` upstream the token request,
//! the token's claims, DNS, TCP, STARTTLS (TLS version, certificate), EHLO (is AUTH XOAUTH2
//! offered), AUTH XOAUTH2, and with `--send-test` one real message.
//!
//! The remedies are the ones the daemon logs: [`crate::token::TokenError::remedy`] for the
//! token endpoint, [`Problem::remedy`] for the upstream's replies.
//!
//! It runs beside a running daemon: its own connections, and it opens one to the upstream only
//! when the daemon's status (admin socket) shows a free connection for the mailbox (Exchange
//! Online allows 3 per mailbox). No token or secret is ever printed.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use crate::config::exchange::ExchangeConfig;
use crate::config::{self, Config, UpstreamKind};
use crate::token::Token;
use crate::upstream::exchange::classify::{Problem, Verdict, classify};
use crate::upstream::exchange::conn::{self, Endpoint, Session, StepError, Timeouts};

/// What `mailbridge doctor` was asked.
#[derive(Debug, Clone)]
pub struct Options {
    pub config: Option<PathBuf>,
    /// Send one real message to this address through each checked upstream.
    pub send_test: Option<String>,
    /// Check only this upstream (default: every `exchange-online` one).
    pub upstream: Option<String>,
    /// How long to wait for the daemon to free a connection of the mailbox.
    pub slot_wait: Duration,
}

/// DNS and TCP connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the daemon is asked again while all its connections are in use.
const SLOT_POLL: Duration = Duration::from_secs(2);

/// The step lines, and whether any failed.
struct Report {
    failed: bool,
    indent: &'static str,
}

impl Report {
    fn line(&self, mark: &str, step: &str, detail: impl Display) {
        println!("{}{mark} {step:<13} {detail}", self.indent);
    }

    fn pass(&mut self, step: &str, detail: impl Display) {
        self.line("✓", step, detail);
    }

    fn skip(&mut self, step: &str, why: impl Display) {
        self.line("-", step, why);
    }

    /// A failed step: what happened, then `cause:` and `remedy:` lines when known.
    fn fail(&mut self, step: &str, what: impl Display, cause: Option<&str>, remedy: Option<&str>) {
        self.failed = true;
        self.line("✗", step, what);
        let pad = format!("{}{:16}", self.indent, "");
        if let Some(c) = cause {
            println!("{pad}cause:  {c}");
        }
        if let Some(r) = remedy {
            println!("{pad}remedy: {r}");
        }
    }

    /// A failed step with a diagnosed problem of the upstream.
    fn fail_problem(&mut self, step: &str, what: impl Display, p: &Problem, x: &ExchangeConfig) {
        self.fail(
            step,
            what,
            Some(&p.meaning()),
            Some(&p.remedy(&x.mailbox, &x.credentials.client_id)),
        );
    }

    /// A failed SMTP step: the reply (or what broke), classified as the daemon would.
    fn fail_step(&mut self, step: &str, e: &StepError, x: &ExchangeConfig) {
        let problem = match e {
            // The token was fetched just now: a 535 is not a stale token.
            StepError::Reply { step, code, text } => match classify(*step, *code, text, true) {
                Verdict::Defer { problem, .. } | Verdict::Fail { problem } => problem,
                Verdict::Ok | Verdict::RefreshAndRetry => None,
            },
            StepError::Broken { problem, .. } => problem.clone(),
        };
        match problem {
            Some(p) => self.fail_problem(step, e, &p, x),
            None => self.fail(step, e, None, None),
        }
    }
}

pub fn run(opts: Options) -> ExitCode {
    let path = config::resolve_path(opts.config.as_deref());
    let mut r = Report {
        failed: false,
        indent: "",
    };
    let cfg = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            r.fail(
                "config",
                format!("{} has errors:", path.display()),
                None,
                None,
            );
            for line in e.to_string().lines() {
                println!("    {line}");
            }
            println!("result: NOT OK (fix the configuration first; nothing else was checked)");
            return ExitCode::from(1);
        }
    };
    let exchange: Vec<(&str, &ExchangeConfig)> = cfg
        .upstreams
        .iter()
        .filter_map(|u| match &u.kind {
            UpstreamKind::ExchangeOnline(x) => Some((u.name.as_str(), &**x)),
            UpstreamKind::Outbox { .. } => None,
        })
        .collect();
    let chosen: Vec<(&str, &ExchangeConfig)> = match &opts.upstream {
        Some(name) => {
            let found: Vec<_> = exchange
                .iter()
                .filter(|(n, _)| n == name)
                .copied()
                .collect();
            if found.is_empty() {
                eprintln!(
                    "no exchange-online upstream is named {name:?} in {} (there: {})",
                    path.display(),
                    exchange
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                return ExitCode::from(2);
            }
            found
        }
        None => exchange.clone(),
    };
    if let Some(to) = &opts.send_test {
        if !config::exchange::is_plain_address(to) {
            eprintln!("--send-test: {to:?} is not an address like someone@example.com");
            return ExitCode::from(2);
        }
        if chosen.is_empty() {
            eprintln!(
                "--send-test: {} has no exchange-online upstream to send through",
                path.display()
            );
            return ExitCode::from(2);
        }
    }
    // The LAN certificate is loaded as `check-config` loads it (a generated self-signed one is
    // the daemon's business: not made here).
    let lan_tls = match (&cfg.tls.cert_file, &cfg.tls.key_file) {
        (Some(_), Some(_)) => crate::inbound::tls::acceptor(&cfg).err(),
        _ => None,
    };
    match lan_tls {
        None => r.pass("config", format!("{} is valid", path.display())),
        Some(e) => r.fail(
            "config",
            format!("{}: {e}", path.display()),
            Some("the LAN certificate or key (tls.cert_file, tls.key_file) cannot be used; the daemon would not start"),
            Some("point tls.cert_file and tls.key_file at a readable PEM certificate chain and its private key"),
        ),
    }
    check_spool(&mut r, &cfg.spool.path);

    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    if chosen.is_empty() {
        println!("(no exchange-online upstream: nothing more to check)");
    }
    for (name, x) in chosen {
        println!(
            "upstream {name} (exchange-online, mailbox {}, {}:{})",
            x.mailbox, x.host, x.port
        );
        r.indent = "  ";
        rt.block_on(check_upstream(&mut r, &cfg, name, x, &opts));
        r.indent = "";
    }
    if r.failed {
        println!("result: NOT OK (see the ✗ lines above)");
        ExitCode::from(1)
    } else {
        println!("result: all checks passed");
        ExitCode::SUCCESS
    }
}

/// The spool takes files and makes them durable: a probe file in `tmp/` (where the daemon
/// writes incoming mail; nothing there is ever delivered) is created, written, fsynced, its
/// directory fsynced, and removed. No directory is created: the daemon creates the spool
/// with its own user, and one made here (perhaps as root) could lock it out.
fn check_spool(r: &mut Report, root: &Path) {
    let tmp = root.join("tmp");
    let (dir, note) = if tmp.is_dir() {
        (tmp, String::new())
    } else if root.is_dir() {
        (
            root.to_path_buf(),
            " (tmp/ does not exist yet: mailbridge creates it at start)".to_string(),
        )
    } else if root.exists() {
        r.fail(
            "spool",
            format!("{} is not a directory", root.display()),
            Some("spool.path must name a directory (mailbridge keeps tmp/, queue/ and failed/ in it)"),
            Some("point spool.path at a directory on a local disk, e.g. /var/spool/mailbridge, or remove the file that is in the way"),
        );
        return;
    } else {
        // Not created yet: the daemon will create it, if it can write to the nearest parent.
        let mut parent = root.parent();
        while let Some(p) = parent {
            if p.is_dir() {
                break;
            }
            parent = p.parent();
        }
        match parent {
            Some(p) => (
                p.to_path_buf(),
                format!(
                    " ({} does not exist yet: mailbridge creates it at start)",
                    root.display()
                ),
            ),
            None => {
                r.fail(
                    "spool",
                    format!("{} does not exist", root.display()),
                    None,
                    Some("set spool.path to a directory on a local disk"),
                );
                return;
            }
        }
    };
    match probe(&dir) {
        Ok(uid) => {
            // Writable for us does not mean writable for the daemon's user (root writes
            // anywhere): say so when the directory belongs to someone else.
            use std::os::unix::fs::MetadataExt;
            let owner = std::fs::metadata(&dir).map(|m| m.uid()).unwrap_or(uid);
            let whose = if owner != uid {
                format!(
                    "; tested as uid {uid}, the directory belongs to uid {owner}: run `sudo -u <that user> mailbridge doctor` to test the daemon's own access"
                )
            } else {
                String::new()
            };
            r.pass(
                "spool",
                format!(
                    "{}: a probe file was created, written, fsynced and removed{note}{whose}",
                    dir.display()
                ),
            )
        }
        Err((what, e)) => {
            let (cause, remedy) = match e.kind() {
                std::io::ErrorKind::PermissionDenied => (
                    "mailbridge cannot write to its spool".to_string(),
                    format!(
                        "the spool must belong to the user mailbridge runs as: `chown -R mailbridge:mailbridge {}` and `chmod 750 {}`",
                        root.display(),
                        root.display()
                    ),
                ),
                std::io::ErrorKind::ReadOnlyFilesystem => (
                    "the file system is mounted read-only".to_string(),
                    format!(
                        "remount it read-write, or move spool.path to a writable local disk (systemd: check ReadWritePaths= covers {})",
                        root.display()
                    ),
                ),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => (
                    "the disk (or the quota) is full: new mail would be refused with 452".to_string(),
                    "free space on that file system; mail already accepted is kept".to_string(),
                ),
                _ if what.starts_with("fsync") => (
                    "the file system does not make writes durable; mailbridge answers 250 only after fsync".to_string(),
                    "put spool.path on a local disk (not a network or FUSE mount)".to_string(),
                ),
                _ => (
                    "the spool cannot take new mail".to_string(),
                    "check spool.path, its permissions and the file system".to_string(),
                ),
            };
            r.fail(
                "spool",
                format!("{}: {what} failed: {e}", dir.display()),
                Some(&cause),
                Some(&remedy),
            );
        }
    }
}

/// Create, write, fsync, fsync the directory, remove (and fsync the directory again).
/// Returns the owner of the probe file: the user doctor runs as.
fn probe(dir: &Path) -> Result<u32, (&'static str, std::io::Error)> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let path = dir.join(format!(".doctor-{}-{nanos}.probe", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| ("creating a file", e))?;
    let res = (|| {
        let uid = f
            .metadata()
            .map_err(|e| ("reading the file's owner", e))?
            .uid();
        f.write_all(&[b'x'; 4096]).map_err(|e| ("writing", e))?;
        f.sync_all().map_err(|e| ("fsync of the file", e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| ("fsync of the directory", e))?;
        Ok(uid)
    })();
    drop(f);
    let removed = std::fs::remove_file(&path).map_err(|e| ("removing the probe file", e));
    let uid = res?;
    removed?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ("fsync of the directory", e))?;
    Ok(uid)
}

async fn check_upstream(
    r: &mut Report,
    cfg: &Config,
    name: &str,
    x: &ExchangeConfig,
    opts: &Options,
) {
    let token = check_token(r, x).await;

    // DNS: resolved here, so that a name that does not resolve is told apart from a port
    // that does not answer.
    let resolved = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::lookup_host((x.host.as_str(), x.port)),
    )
    .await;
    let addrs: Vec<std::net::SocketAddr> = match resolved {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(e)) => {
            dns_failed(r, x, &e.to_string());
            return skip_rest(r, "DNS failed", opts, 0);
        }
        Err(_) => {
            dns_failed(r, x, "no answer within 10 s");
            return skip_rest(r, "DNS failed", opts, 0);
        }
    };
    if addrs.is_empty() {
        dns_failed(r, x, "no address");
        return skip_rest(r, "DNS failed", opts, 0);
    }
    let mut shown: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    shown.dedup();
    r.pass("DNS", format!("{} -> {}", x.host, shown.join(", ")));

    // A connection of the mailbox's few, only when the daemon leaves one free.
    let slot = match wait_for_slot(cfg.admin.socket.as_deref(), name, opts.slot_wait).await {
        Ok(note) => note,
        Err(why) => {
            r.skip("TCP", format!("not run: {why}"));
            r.skip("STARTTLS", "not run");
            r.skip("EHLO", "not run");
            r.failed = true;
            r.line("✗", "AUTH XOAUTH2", format!("not run: {why}"));
            if opts.send_test.is_some() {
                r.skip("send test", "not run");
            }
            return;
        }
    };

    let tls = match Endpoint::tls_parameters(&x.host, x.ca_file.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            r.fail("TCP", format!("not run: {e}"), None, Some("fix ca_file"));
            return skip_rest(r, "TLS set-up failed", opts, 1);
        }
    };
    let ep = Endpoint {
        host: x.host.clone(),
        port: x.port,
        helo: x.helo_name.clone(),
        tls,
        timeouts: Timeouts {
            connect: CONNECT_TIMEOUT,
            greeting: Duration::from_secs(30),
            command: Duration::from_secs(30),
            mail: Duration::from_secs(60),
            rcpt: Duration::from_secs(60),
            data_init: Duration::from_secs(60),
            data_block: Duration::from_secs(60),
            data_term: Duration::from_secs(120),
        },
    };
    let mut session = match conn::open(&ep).await {
        Ok(s) => s,
        Err(e) => return open_failed(r, x, &e, &slot, opts),
    };
    r.pass(
        "TCP",
        format!("connected to {}:{} ({slot})", x.host, x.port),
    );
    let tls_shown = match session.tls_info() {
        Some(t) => format!("{} ({})", t.version, t.cipher),
        None => "TLS".to_string(),
    };
    r.pass(
        "STARTTLS",
        format!("{tls_shown}, certificate verified for {}", x.host),
    );
    if !session.offers_xoauth2() {
        let p = Problem::NoXoauth2;
        r.fail_problem(
            "EHLO",
            format!(
                "AUTH XOAUTH2 is not offered after STARTTLS (EHLO: {})",
                session.server_info()
            ),
            &p,
            x,
        );
        r.skip("AUTH XOAUTH2", "not run: not offered");
        skip_send(r, opts, "not run");
        session.quit().await;
        return;
    }
    r.pass(
        "EHLO",
        format!(
            "{} offers AUTH XOAUTH2 after STARTTLS",
            session.server_info().name()
        ),
    );
    let Some(token) = token else {
        r.skip("AUTH XOAUTH2", "not run: no token (see the token step)");
        skip_send(r, opts, "not run");
        session.quit().await;
        return;
    };
    match session.auth_xoauth2(&x.mailbox, &token.value).await {
        Ok(()) => r.pass("AUTH XOAUTH2", format!("accepted for {} (235)", x.mailbox)),
        Err(e) => {
            r.fail_step("AUTH XOAUTH2", &e, x);
            skip_send(r, opts, "not run: not authenticated");
            session.quit().await;
            return;
        }
    }
    match &opts.send_test {
        Some(to) => send_test(r, &mut session, x, cfg, name, to).await,
        None => r.skip(
            "send test",
            "not requested (--send-test ADDRESS sends a real message)",
        ),
    }
    session.quit().await;
}

/// The token request and its claims. The token is returned for AUTH, never shown.
async fn check_token(r: &mut Report, x: &ExchangeConfig) -> Option<Token> {
    let ca = match &x.ca_file {
        Some(f) => match std::fs::read(f) {
            Ok(pem) => Some(pem),
            Err(e) => {
                r.fail(
                    "token",
                    format!("cannot read ca_file {}: {e}", f.display()),
                    None,
                    None,
                );
                r.skip("claims", "not run: no token");
                return None;
            }
        },
        None => None,
    };
    let http = match crate::token::http_client_with_roots(ca.as_deref()) {
        Ok(h) => h,
        Err(e) => {
            r.fail("token", e, None, None);
            r.skip("claims", "not run: no token");
            return None;
        }
    };
    let token = match crate::token::fetch(&http, &x.credentials).await {
        Ok(t) => t,
        Err(e) => {
            r.fail("token", &e, Some(e.meaning()), Some(e.remedy()));
            r.skip("claims", "not run: no token");
            return None;
        }
    };
    r.pass(
        "token",
        format!(
            "issued by {} for client_id {} ({}), expires in {} s (the token is not shown)",
            x.credentials.token_url,
            x.credentials.client_id,
            x.credential_source,
            token.lifetime.as_secs()
        ),
    );
    // A certificate close to expiry works today and fails on its date.
    if let crate::token::ClientSecret::Certificate(c) = &x.credentials.secret {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if let Some(w) = c.expiry_warning(now) {
            println!("{}{:16}warning: {w}", r.indent, "");
        }
    }
    match crate::token::claims::decode(token.value.expose()) {
        Ok(c) => {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let check = crate::token::claims::check(&c, now);
            if check.ok {
                r.pass(
                    "claims",
                    format!(
                        "aud {}, roles {}",
                        c.aud.as_deref().unwrap_or(""),
                        c.roles.join(", ")
                    ),
                );
            } else {
                r.fail(
                    "claims",
                    "the token does not allow SMTP client submission:",
                    None,
                    None,
                );
                for line in &check.lines {
                    println!("{}{:16}{line}", r.indent, "");
                }
            }
        }
        // Not a JWT (opaque or encrypted): nothing to check here; AUTH will tell.
        Err(e) => r.skip("claims", format!("cannot be read: {e}")),
    }
    Some(token)
}

fn dns_failed(r: &mut Report, x: &ExchangeConfig, why: &str) {
    let what = format!("{} does not resolve: {why}", x.host);
    let p = Problem::Unreachable(what.clone());
    r.fail(
        "DNS",
        &what,
        Some(&format!(
            "the host name cannot be resolved (a typo in `host`, or no working DNS server in /etc/resolv.conf); Exchange Online is {}",
            crate::config::exchange::DEFAULT_HOST
        )),
        Some(&p.remedy(&x.mailbox, &x.credentials.client_id)),
    );
}

/// Marks the network steps after `done` (0: after DNS, 1: after TCP) as not run.
fn skip_rest(r: &mut Report, why: &str, opts: &Options, done: usize) {
    let steps = ["TCP", "STARTTLS", "EHLO", "AUTH XOAUTH2"];
    for s in &steps[done..] {
        r.skip(s, format!("not run: {why}"));
    }
    skip_send(r, opts, &format!("not run: {why}"));
}

fn skip_send(r: &mut Report, opts: &Options, why: &str) {
    if opts.send_test.is_some() {
        r.skip("send test", why);
    }
}

/// `conn::open` failed: at TCP, at the greeting or first EHLO, or at STARTTLS.
fn open_failed(r: &mut Report, x: &ExchangeConfig, e: &StepError, slot: &str, opts: &Options) {
    use crate::upstream::exchange::classify::Step;
    let step = e.step();
    if step == Step::Connect {
        let port = x.port;
        r.fail(
            "TCP",
            e,
            Some(&format!(
                "nothing answers on {}:{port}: port {port} blocked by a firewall or ISP; allow outbound TCP {port} to {}",
                x.host, x.host
            )),
            Some(&Problem::Unreachable(String::new()).remedy(&x.mailbox, &x.credentials.client_id)),
        );
        return skip_rest(r, "no connection", opts, 1);
    }
    r.pass(
        "TCP",
        format!("connected to {}:{} ({slot})", x.host, x.port),
    );
    match (step, e) {
        (Step::StartTls, StepError::Broken { what, problem, .. }) => {
            match (problem, certificate_problem(what, &x.host)) {
                (Some(Problem::Tls(_)), Some((cause, remedy))) => {
                    r.fail("STARTTLS", e, Some(&cause), Some(&remedy));
                }
                _ => r.fail_step("STARTTLS", e, x),
            }
            r.skip("EHLO", "not run: no TLS");
            r.skip(
                "AUTH XOAUTH2",
                "not run: no TLS (mailbridge never sends a token in plaintext)",
            );
        }
        _ => {
            r.fail_step(step.name(), e, x);
            r.skip("STARTTLS", "not run");
            r.skip("EHLO", "not run");
            r.skip("AUTH XOAUTH2", "not run");
        }
    }
    skip_send(r, opts, "not run");
}

/// The cause and remedy of a server certificate that does not verify (`what`: the TLS
/// error), or `None` when the TLS error is about something else.
fn certificate_problem(what: &str, host: &str) -> Option<(String, String)> {
    let lower = what.to_ascii_lowercase();
    if !lower.contains("certificate") {
        return None;
    }
    Some(if lower.contains("notvalidforname") {
        (
            format!(
                "the certificate presented is not valid for the name {host}: `host` is wrong, or something else answers on that address"
            ),
            format!(
                "set `host` to the name Exchange Online answers as ({}), not an IP address or an alias",
                crate::config::exchange::DEFAULT_HOST
            ),
        )
    } else if lower.contains("expired") || lower.contains("notvalidyet") {
        (
            "the certificate presented is expired or not yet valid: the system clock is wrong, or a proxy in between serves an outdated certificate".to_string(),
            "check the system clock (timedatectl; NTP), then look for a TLS-inspecting proxy or firewall on the path".to_string(),
        )
    } else {
        (
            format!(
                "the certificate {host} presented does not verify: most likely TLS inspection (a proxy or firewall re-signing the traffic with its own CA)"
            ),
            format!(
                "exempt {host} from TLS inspection on the proxy or firewall, or set `ca_file` on the upstream to the inspecting proxy's CA certificate (PEM)"
            ),
        )
    })
}

/// Asks the daemon (admin socket) whether the upstream has a connection free; waits up to
/// `wait` for one. `Ok(note)`: go ahead (also when no daemon answers); `Err(why)`: every
/// connection stayed in use.
async fn wait_for_slot(
    socket: Option<&Path>,
    upstream: &str,
    wait: Duration,
) -> Result<String, String> {
    let Some(socket) = socket else {
        return Ok("admin socket off: the daemon was not asked".into());
    };
    let start = Instant::now();
    loop {
        let path = socket.to_path_buf();
        let asked = tokio::task::spawn_blocking(move || {
            crate::admin::client::call(
                &path,
                &crate::admin::proto::Request::Status,
                Duration::from_secs(5),
            )
        })
        .await;
        let data = match asked {
            Ok(Ok(d)) => d,
            Ok(Err(crate::admin::client::ClientError::Connect { .. })) => {
                return Ok(format!(
                    "no daemon answers on {}: no connections to share",
                    socket.display()
                ));
            }
            Ok(Err(e)) => return Ok(format!("the daemon did not answer ({e}); going ahead")),
            Err(_) => return Ok("the daemon was not asked".into()),
        };
        let Ok(status) = serde_json::from_value::<crate::ops::model::StatusReport>(data) else {
            return Ok("the daemon's status could not be read".into());
        };
        let Some(u) = status.upstreams.iter().find(|u| u.name == upstream) else {
            return Ok("the daemon does not run this upstream".into());
        };
        let (Some(used), Some(max)) = (u.connections_in_use, u.connections_max) else {
            return Ok("the daemon does not count this upstream's connections".into());
        };
        if used < max {
            return Ok(format!("the daemon uses {used} of {max} connections"));
        }
        if start.elapsed() + SLOT_POLL > wait {
            return Err(format!(
                "the running daemon uses all {max} connections of this mailbox (waited up to {}); one more could be refused by Exchange Online (432 4.3.2) and slow the daemon down: try again later, or with a longer --slot-wait",
                humantime::format_duration(wait)
            ));
        }
        tokio::time::sleep(SLOT_POLL).await;
    }
}

/// One small real message from the mailbox to `to`.
async fn send_test(
    r: &mut Report,
    s: &mut Session,
    x: &ExchangeConfig,
    cfg: &Config,
    name: &str,
    to: &str,
) {
    const STEP: &str = "send test";
    if let Err(e) = s.mail(&x.mailbox, None, false).await {
        return r.fail_step(STEP, &e, x);
    }
    if let Err(e) = s.rcpt(to).await {
        return r.fail_step(STEP, &e, x);
    }
    let now = SystemTime::now();
    let id = uuid::Uuid::now_v7();
    let message = format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: mailbridge doctor test\r\nDate: {date}\r\n\
         Message-ID: <{id}@{host}>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\r\n\
         This message was sent by `mailbridge doctor --send-test` on {host}\r\n\
         through the upstream {name}, as {from}. No action is needed.\r\n",
        from = x.mailbox,
        date = crate::smtp::headers::rfc5322_date(now),
        host = cfg.hostname,
    )
    .into_bytes();
    let len = message.len() as u64;
    match s.data(message, len, std::io::empty()).await {
        Ok(reply) => r.pass(STEP, format!("{to}: {reply}")),
        Err(e) => r.fail_step(STEP, &e, x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_errors_are_told_apart() {
        let h = "smtp.office365.com";
        let cause = |what: &str| certificate_problem(what, h).map(|(c, _)| c);
        assert!(
            cause("invalid peer certificate: UnknownIssuer")
                .unwrap()
                .contains("TLS inspection")
        );
        assert!(
            cause("invalid peer certificate: NotValidForName")
                .unwrap()
                .contains("not valid for the name")
        );
        assert!(
            cause("invalid peer certificate: Expired")
                .unwrap()
                .contains("system clock")
        );
        assert_eq!(cause("received fatal alert: ProtocolVersion"), None);
    }

    #[test]
    fn the_probe_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let uid = probe(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(uid, std::fs::metadata(dir.path()).unwrap().uid());
        let missing = dir.path().join("missing");
        assert_eq!(probe(&missing).unwrap_err().0, "creating a file");
    }
}
