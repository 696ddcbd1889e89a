//! Commands and exit codes: 0 success, 1 configuration or start-up error, 2 usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config;
use crate::secret::Secret;

#[derive(Parser, Debug)]
#[command(
    name = "mailbridge",
    version,
    about = "SMTP relay for legacy senders to Microsoft 365"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the relay daemon.
    Serve {
        /// Configuration file (default: $MAILBRIDGE_CONFIG, else /etc/mailbridge/relay.yaml).
        #[arg(short, long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Run without a configuration file: listen on 127.0.0.1:2525, spool and deliver
        /// under ./mailbridge-demo/.
        #[arg(long, conflicts_with = "config")]
        demo: bool,
    },
    /// Validate a configuration file: prints "ok" or every error, exits 0 or 1.
    CheckConfig {
        #[arg(short, long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Print an argon2id hash of a password, for `users[].password_hash`. On a terminal it
    /// asks twice, without echo; otherwise it reads the first line of standard input.
    HashPassword,
    /// Fetch an OAuth token for an Exchange Online upstream and show what it allows: its
    /// claims (aud, tid, appid, roles, exp) and whether Exchange will accept it for SMTP.
    /// The token itself is never printed. Exit 0 if it looks right, 1 otherwise.
    Token {
        #[arg(short, long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Which upstream (default: the first `exchange-online` one).
        #[arg(long, value_name = "NAME")]
        upstream: Option<String>,
    },
    /// Check the whole path step by step: configuration, spool, and for each Exchange Online
    /// upstream the token, its claims, DNS, TCP, STARTTLS, EHLO and AUTH XOAUTH2, each with a
    /// tick or a cross, the cause and the remedy. Safe beside a running daemon. Exit 0 only if
    /// every step passed.
    Doctor {
        /// Configuration file (default: $MAILBRIDGE_CONFIG, else /etc/mailbridge/relay.yaml).
        #[arg(short, long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Also send one real message from the mailbox to ADDRESS.
        #[arg(long, value_name = "ADDRESS")]
        send_test: Option<String>,
        /// Check only this upstream (default: every `exchange-online` one).
        #[arg(long, value_name = "NAME")]
        upstream: Option<String>,
        /// How long to wait for the running daemon to leave a connection of the mailbox free.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
        slot_wait: std::time::Duration,
    },
    /// List, inspect and steer the running daemon's queue (through its admin socket).
    Queue {
        #[command(flatten)]
        admin: crate::admin::cli::AdminArgs,
        #[command(subcommand)]
        cmd: crate::admin::cli::QueueCmd,
    },
    /// The running daemon's listeners, upstreams, queue, version and uptime. Exit 0 if all
    /// is well, 1 if something needs attention.
    Status {
        #[command(flatten)]
        admin: crate::admin::cli::AdminArgs,
    },
    /// Every client that sent through mailbridge: IP, AUTH user, HELO, TLS or plaintext,
    /// the envelope senders used, message count, first and last seen.
    Senders {
        #[command(flatten)]
        admin: crate::admin::cli::AdminArgs,
    },
    /// Make the running daemon re-read its configuration and certificates.
    Reload {
        #[command(flatten)]
        admin: crate::admin::cli::AdminArgs,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Queue { admin, cmd } => crate::admin::cli::queue(&admin, &cmd),
        Command::Status { admin } => crate::admin::cli::status(&admin),
        Command::Senders { admin } => crate::admin::cli::senders(&admin),
        Command::Reload { admin } => crate::admin::cli::reload(&admin),
        Command::HashPassword => match hash_password() {
            Ok(hash) => {
                println!("{hash}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mailbridge: {e}");
                ExitCode::from(1)
            }
        },
        Command::CheckConfig { config: path } => {
            let path = config::resolve_path(path.as_deref());
            // Configured certificate files are loaded too, so a bad key shows up here rather
            // than at start. (A missing self-signed certificate is not generated here.)
            let checked = config::load(&path)
                .map_err(|e| e.to_string())
                .and_then(|cfg| match cfg.tls.cert_file {
                    Some(_) => crate::inbound::tls::acceptor(&cfg)
                        .map(|_| cfg)
                        .map_err(|e| e.to_string()),
                    None => Ok(cfg),
                })
                .and_then(|cfg| {
                    // Upstream TLS settings (ca_file) are built the way the daemon builds them.
                    for (i, u) in cfg.upstreams.iter().enumerate() {
                        if let config::UpstreamKind::ExchangeOnline(x) = &u.kind {
                            crate::upstream::exchange::conn::Endpoint::tls_parameters(
                                &x.host,
                                x.ca_file.as_deref(),
                            )
                            .map_err(|e| format!("upstreams[{i}].ca_file: {e}"))?;
                        }
                    }
                    Ok(())
                });
            match checked {
                Ok(()) => {
                    println!("ok");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Token {
            config: path,
            upstream,
        } => token_command(path, upstream),
        Command::Doctor {
            config,
            send_test,
            upstream,
            slot_wait,
        } => crate::doctor::run(crate::doctor::Options {
            config,
            send_test,
            upstream,
            slot_wait,
        }),
        Command::Serve { config: path, demo } => {
            let mut source = None;
            let cfg = if demo {
                config::demo(std::path::Path::new("mailbridge-demo"))
            } else {
                let path = config::resolve_path(path.as_deref());
                source = Some(path.clone());
                match config::load(&path) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("configuration errors in {}:\n{e}", path.display());
                        return ExitCode::from(1);
                    }
                }
            };
            crate::logging::init(&cfg.log);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            let res = rt.block_on(crate::daemon::serve(cfg, demo, source));
            // Blocking file operations still running (a hung file system) must not keep the
            // process alive past the ordered shutdown.
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
            match res {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("mailbridge: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn token_command(path: Option<PathBuf>, upstream: Option<String>) -> ExitCode {
    let path = config::resolve_path(path.as_deref());
    let cfg = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("configuration errors in {}:\n{e}", path.display());
            return ExitCode::from(1);
        }
    };
    let exchange: Vec<(&str, &config::exchange::ExchangeConfig)> = cfg
        .upstreams
        .iter()
        .filter_map(|u| match &u.kind {
            config::UpstreamKind::ExchangeOnline(x) => Some((u.name.as_str(), &**x)),
            _ => None,
        })
        .collect();
    let chosen = match &upstream {
        Some(name) => exchange.iter().find(|(n, _)| n == name),
        None => exchange.first(),
    };
    let Some((name, x)) = chosen else {
        match upstream {
            Some(n) => eprintln!(
                "no exchange-online upstream is named {n:?} in {} (there: {})",
                path.display(),
                exchange
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => eprintln!("{} has no exchange-online upstream", path.display()),
        }
        return ExitCode::from(2);
    };
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
    println!("upstream:  {name}");
    println!("endpoint:  {}", x.credentials.token_url);
    println!("client_id: {}", x.credentials.client_id);
    println!("scope:     {}", x.credentials.scope);
    println!("credential: {}", x.credential_source);
    if let crate::token::ClientSecret::Certificate(c) = &x.credentials.secret {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if let Some(t) = c.not_after() {
            println!(
                "certificate: x5t#S256 {}, expires {} (in {} days)",
                c.thumbprint_sha256(),
                httpdate::fmt_http_date(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64)
                ),
                (t - now).div_euclid(86_400)
            );
        }
        if let Some(w) = c.expiry_warning(now) {
            println!("warning:   {w}");
        }
    }
    let fetched = rt.block_on(async {
        let ca = match &x.ca_file {
            Some(f) => Some(
                std::fs::read(f)
                    .map_err(|e| format!("cannot read ca_file {}: {e}", f.display()))?,
            ),
            None => None,
        };
        let http = crate::token::http_client_with_roots(ca.as_deref())?;
        crate::token::fetch(&http, &x.credentials)
            .await
            .map_err(|e| format!("{e}\nremedy: {}", e.remedy()))
    });
    let token = match fetched {
        Ok(t) => t,
        Err(e) => {
            println!("token:     FAILED");
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    println!(
        "token:     issued, expires_in {} s (the token itself is not shown)",
        token.lifetime.as_secs()
    );
    let claims = match crate::token::claims::decode(token.value.expose()) {
        Ok(c) => c,
        Err(e) => {
            println!("claims:    cannot decode ({e})");
            return ExitCode::from(1);
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let check = crate::token::claims::check(&claims, now);
    for line in &check.lines {
        println!("{line}");
    }
    println!("mailbox:   {} (sent as XOAUTH2 user=)", x.mailbox);
    if check.ok {
        println!("result:    ok");
        ExitCode::SUCCESS
    } else {
        println!("result:    NOT OK (see above)");
        ExitCode::from(1)
    }
}

/// The longest password `hash-password` takes: far more than a device sends, and a bound
/// when standard input is an endless stream.
const MAX_PASSWORD_LEN: usize = 4096;

fn hash_password() -> Result<String, String> {
    let password = if rustix::termios::isatty(std::io::stdin()) {
        read_password_from_terminal()?
    } else {
        read_password_line(&mut std::io::stdin().lock())?
    };
    if password.expose().is_empty() {
        return Err("the password is empty".into());
    }
    // RFC 4616 §2: PLAIN separates its fields with NUL, so no client could send this one.
    if password.expose().contains('\0') {
        return Err("the password contains a NUL character".into());
    }
    crate::inbound::auth::hash_password(&password)
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// The first line, without its `\n` or `\r\n`. Errors never contain the input.
fn read_password_line(input: &mut impl std::io::BufRead) -> Result<Secret, String> {
    use std::io::{BufRead, Read};
    let mut line = Vec::new();
    input
        .take(MAX_PASSWORD_LEN as u64 + 2)
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("cannot read the password: {e}"))?;
    let line = line.strip_suffix(b"\n").unwrap_or(&line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > MAX_PASSWORD_LEN {
        return Err(format!(
            "the password is longer than {MAX_PASSWORD_LEN} bytes"
        ));
    }
    match std::str::from_utf8(line) {
        Ok(p) => Ok(Secret::new(p)),
        Err(_) => Err("the password is not valid UTF-8".into()),
    }
}

/// Asks twice with echo off. The terminal settings are restored however this ends: an
/// error, a panic (the guard's `Drop`), or Ctrl-C, SIGTERM or SIGHUP (caught here for that
/// reason).
fn read_password_from_terminal() -> Result<Secret, String> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let res = rt.block_on(async {
        let listen = |kind| signal(kind).map_err(|e| format!("cannot handle signals: {e}"));
        let mut interrupt = listen(SignalKind::interrupt())?;
        let mut terminate = listen(SignalKind::terminate())?;
        let mut hangup = listen(SignalKind::hangup())?;
        let _echo_off = EchoOff::new()?;
        let read = tokio::task::spawn_blocking(|| {
            let first = prompt("Password: ")?;
            if first.expose().is_empty() {
                return Err("the password is empty".to_string());
            }
            let second = prompt("Repeat the password: ")?;
            if first != second {
                return Err("the passwords do not match".to_string());
            }
            Ok(first)
        });
        let stopped = |what: &str| {
            eprintln!();
            Err(format!("{what}: no password hashed"))
        };
        tokio::select! {
            r = read => r.map_err(|e| format!("cannot read the password: {e}"))?,
            _ = interrupt.recv() => stopped("interrupted"),
            _ = terminate.recv() => stopped("terminated"),
            _ = hangup.recv() => stopped("hung up"),
        }
    });
    // After a signal the reading thread is still blocked on the terminal: do not wait for it.
    rt.shutdown_background();
    res
}

fn prompt(text: &str) -> Result<Secret, String> {
    use std::io::Write;
    let mut err = std::io::stderr();
    let _ = err.write_all(text.as_bytes());
    let _ = err.flush();
    read_password_line(&mut std::io::stdin().lock())
}

/// Terminal echo off on standard input (newlines still echoed) until dropped.
struct EchoOff {
    saved: rustix::termios::Termios,
}

impl EchoOff {
    fn new() -> Result<EchoOff, String> {
        use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved =
            tcgetattr(&stdin).map_err(|e| format!("cannot read the terminal settings: {e}"))?;
        let mut quiet = saved.clone();
        quiet.local_modes.remove(LocalModes::ECHO);
        quiet.local_modes.insert(LocalModes::ECHONL);
        // TCSAFLUSH, as getpass(3): type-ahead, which was echoed, is discarded.
        tcsetattr(&stdin, OptionalActions::Flush, &quiet)
            .map_err(|e| format!("cannot turn off the terminal echo: {e}"))?;
        Ok(EchoOff { saved })
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}
