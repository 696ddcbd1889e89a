//! The operator's commands: `mailbridge queue ...`, `status`, `senders`, `reload`. Each one
//! sends one request over the admin socket to the running daemon and prints its answer, for
//! people (aligned columns, ages like 5m/2h/3d) or, with `--json`, as JSON. They never touch
//! spool files.
//!
//! Exit codes: 0 ok; 1 an error, an unreachable daemon, or `status` found something that
//! needs attention; 2 a usage error.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::client::{ClientError, call};
use super::proto::Request;
use crate::ops::model::{QueueDetail, QueueEntry, SenderRecord, StatusReport, UpstreamStatus};
use crate::spool::now_ms;

/// Options every admin command takes.
#[derive(Args, Debug, Clone, Default)]
pub struct AdminArgs {
    /// The daemon's admin socket (default: $MAILBRIDGE_ADMIN_SOCKET, else admin.socket from
    /// the configuration file, else /run/mailbridge/admin.sock).
    #[arg(long, value_name = "PATH", global = true)]
    pub socket: Option<PathBuf>,
    /// The configuration file to read admin.socket from (default: $MAILBRIDGE_CONFIG, else
    /// /etc/mailbridge/relay.yaml).
    #[arg(short, long, value_name = "PATH", global = true)]
    pub config: Option<PathBuf>,
    /// Print the daemon's answer as JSON.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug, Clone)]
pub enum QueueCmd {
    /// One line per queued message, oldest first (like mailq).
    List,
    /// A message's envelope, recipients and attempts; what is wrong and how to fix it.
    Show { id: String },
    /// Try a message (or with --all every queued message that is not held) now.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["id", "all"])))]
    Retry {
        id: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// Hold a message: it is not attempted until released (also across restarts).
    Hold { id: String },
    /// Release a held message: it is attempted now.
    Release { id: String },
    /// Delete a queued message (or a dead letter in failed/) for good. No bounce is sent.
    /// Asks first on a terminal.
    Delete {
        id: String,
        /// Do not ask (needed when not on a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// The dead letters: messages in failed/ (permanent failure or too old).
    Failed,
    /// Move a message from failed/ back into the queue; its failed recipients are tried
    /// again now.
    Requeue { id: String },
}

/// Where the daemon listens: `--socket`, $MAILBRIDGE_ADMIN_SOCKET, the configuration's
/// `admin.socket`, the default.
pub fn socket_path(args: &AdminArgs) -> Result<PathBuf, String> {
    if let Some(p) = &args.socket {
        return Ok(p.clone());
    }
    if let Some(p) = std::env::var_os("MAILBRIDGE_ADMIN_SOCKET").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let path = crate::config::resolve_path(args.config.as_deref());
    if path.is_file() {
        let built = config::Config::builder()
            .add_source(config::File::from(path.as_path()).format(config::FileFormat::Yaml))
            .add_source(
                config::Environment::with_prefix("MAILBRIDGE")
                    .prefix_separator("__")
                    .separator("__"),
            )
            .build();
        if let Ok(c) = built
            && let Ok(s) = c.get_string("admin.socket")
        {
            if s.is_empty() {
                return Err(format!(
                    "the admin socket is turned off in {} (admin.socket: \"\"); set admin.socket and restart mailbridge, or pass --socket PATH",
                    path.display()
                ));
            }
            return Ok(PathBuf::from(s));
        }
    } else if args.config.is_some() {
        return Err(format!(
            "cannot read the configuration file {} (to find admin.socket); pass --socket PATH instead",
            path.display()
        ));
    }
    Ok(PathBuf::from(crate::config::DEFAULT_ADMIN_SOCKET))
}

/// Sends one request; on failure prints what to do and returns the exit code.
fn request(
    args: &AdminArgs,
    req: &Request,
    timeout: Duration,
) -> Result<serde_json::Value, ExitCode> {
    let socket = socket_path(args).map_err(|e| {
        eprintln!("mailbridge: {e}");
        ExitCode::from(1)
    })?;
    call(&socket, req, timeout).map_err(|e| {
        match &e {
            ClientError::Connect { .. } => eprintln!(
                "mailbridge: {e}\n(start it with `systemctl start mailbridge`, or point to its socket with --socket PATH or -c CONFIG)"
            ),
            _ => eprintln!("mailbridge: {e}"),
        }
        ExitCode::from(1)
    })
}

fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, ExitCode> {
    serde_json::from_value(v).map_err(|e| {
        eprintln!(
            "mailbridge: unexpected answer from the daemon ({e}); is it the same version as this command?"
        );
        ExitCode::from(1)
    })
}

fn print_json(v: &serde_json::Value) {
    let v = if v.is_null() {
        &serde_json::json!({ "ok": true })
    } else {
        v
    };
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| "null".into())
    );
}

const TIMEOUT: Duration = Duration::from_secs(30);
/// `hold` and `release` may wait for an attempt that runs to end.
const TIMEOUT_CLAIM: Duration = Duration::from_secs(75);

fn run(f: impl FnOnce() -> Result<ExitCode, ExitCode>) -> ExitCode {
    f().unwrap_or_else(|c| c)
}

/// `mailbridge queue ...`
pub fn queue(args: &AdminArgs, cmd: &QueueCmd) -> ExitCode {
    run(|| match cmd {
        QueueCmd::List => {
            let data = request(args, &Request::QueueList, TIMEOUT)?;
            if args.json {
                print_json(&data);
            } else {
                let list: Vec<QueueEntry> = parse(data)?;
                print!("{}", format_queue(&list, now_ms(), "Mail queue is empty"));
            }
            Ok(ExitCode::SUCCESS)
        }
        QueueCmd::Failed => {
            let data = request(args, &Request::QueueFailed, TIMEOUT)?;
            if args.json {
                print_json(&data);
            } else {
                let list: Vec<QueueEntry> = parse(data)?;
                print!("{}", format_queue(&list, now_ms(), "No failed messages"));
                if !list.is_empty() {
                    println!(
                        "(see why with `mailbridge queue show ID`; put one back with `mailbridge queue requeue ID`)"
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        QueueCmd::Show { id } => {
            let data = request(args, &Request::QueueShow { id: id.clone() }, TIMEOUT)?;
            if args.json {
                print_json(&data);
            } else {
                let d: QueueDetail = parse(data)?;
                print!("{}", format_detail(&d, now_ms()));
            }
            Ok(ExitCode::SUCCESS)
        }
        QueueCmd::Retry { id, all } => {
            let req = Request::QueueRetry {
                id: if *all { None } else { id.clone() },
            };
            let data = request(args, &req, TIMEOUT)?;
            if args.json {
                print_json(&data);
            } else {
                let n = data.get("retried").and_then(|v| v.as_u64()).unwrap_or(0);
                match id {
                    Some(id) if !*all => println!("{id}: will be tried now"),
                    _ => println!("{n} message(s) will be tried now"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        QueueCmd::Hold { id } => simple(
            args,
            Request::QueueHold { id: id.clone() },
            TIMEOUT_CLAIM,
            &format!("{id}: held (release it with `mailbridge queue release {id}`)"),
        ),
        QueueCmd::Release { id } => simple(
            args,
            Request::QueueRelease { id: id.clone() },
            TIMEOUT_CLAIM,
            &format!("{id}: released, will be tried now"),
        ),
        QueueCmd::Requeue { id } => simple(
            args,
            Request::QueueRequeue { id: id.clone() },
            TIMEOUT,
            &format!("{id}: back in the queue, will be tried now"),
        ),
        QueueCmd::Delete { id, yes } => {
            if !*yes {
                if !rustix::termios::isatty(std::io::stdin()) {
                    eprintln!(
                        "mailbridge: not deleting {id}: confirm with --yes (no terminal to ask on)"
                    );
                    return Err(ExitCode::from(2));
                }
                eprint!("Delete message {id} (no bounce will be sent)? [y/N] ");
                let _ = std::io::stderr().flush();
                let mut answer = String::new();
                let _ = std::io::stdin().read_line(&mut answer);
                if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
                    eprintln!("not deleted");
                    return Err(ExitCode::from(1));
                }
            }
            simple(
                args,
                Request::QueueDelete { id: id.clone() },
                TIMEOUT,
                &format!("{id}: deleted (no bounce sent)"),
            )
        }
    })
}

fn simple(
    args: &AdminArgs,
    req: Request,
    timeout: Duration,
    done: &str,
) -> Result<ExitCode, ExitCode> {
    let data = request(args, &req, timeout)?;
    if args.json {
        print_json(&data);
    } else {
        println!("{done}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `mailbridge status`: exit 1 when something needs attention.
pub fn status(args: &AdminArgs) -> ExitCode {
    run(|| {
        let data = request(args, &Request::Status, TIMEOUT)?;
        let report: StatusReport = parse(data.clone())?;
        if args.json {
            print_json(&data);
        } else {
            print!("{}", format_status(&report, now_ms()));
        }
        Ok(if report.attention.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    })
}

/// `mailbridge senders`
pub fn senders(args: &AdminArgs) -> ExitCode {
    run(|| {
        let data = request(args, &Request::Senders, TIMEOUT)?;
        if args.json {
            print_json(&data);
        } else {
            let list: Vec<SenderRecord> = parse(data)?;
            print!("{}", format_senders(&list, now_ms()));
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `mailbridge reload`
pub fn reload(args: &AdminArgs) -> ExitCode {
    run(|| {
        let data = request(args, &Request::Reload, Duration::from_secs(60))?;
        if args.json {
            print_json(&data);
        } else {
            println!("configuration reloaded");
            if let Some(list) = data.get("applied").and_then(|v| v.as_array()) {
                for line in list.iter().filter_map(|v| v.as_str()) {
                    println!("  {line}");
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

// ---- formatting (pure, unit-tested) ----

/// `5s`, `5m`, `2h`, `3d`.
pub fn age(ms: u64) -> String {
    let s = ms / 1000;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m", s / 60)
    } else if s < 86_400 {
        format!("{}h", s / 3600)
    } else {
        format!("{}d", s / 86_400)
    }
}

/// `now`, `in 5m`, or `5m ago`.
fn when(at_ms: u64, now: u64) -> String {
    if at_ms > now + 999 {
        format!("in {}", age(at_ms - now))
    } else if now > at_ms + 999 && now - at_ms > 60_000 {
        format!("{} ago", age(now - at_ms))
    } else {
        "now".into()
    }
}

fn date(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn size(bytes: u64) -> String {
    if bytes < 1024 {
        format!("{bytes}")
    } else if bytes < 1024 * 1024 {
        format!("{:.1}K", bytes as f64 / 1024.0)
    } else {
        format!("{:.1}M", bytes as f64 / (1024.0 * 1024.0))
    }
}

fn sender(s: &str) -> String {
    if s.is_empty() { "<>".into() } else { s.into() }
}

/// Rows under a header, each column as wide as its widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, c) in cells.enumerate() {
            if i + 1 == width.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(&mut header.iter().copied());
    for r in rows {
        out.push_str(&line(&mut r.iter().map(String::as_str)));
    }
    out
}

/// `out` with every control character but the newline replaced by U+FFFD: HELO names,
/// envelope addresses and upstream replies come from outside, and an escape sequence in
/// them must not reach the admin's terminal.
fn terminal_safe(out: String) -> String {
    if !out.chars().any(|c| c.is_control() && c != '\n') {
        return out;
    }
    out.chars()
        .map(|c| {
            if c.is_control() && c != '\n' {
                '\u{FFFD}'
            } else {
                c
            }
        })
        .collect()
}

pub fn format_queue(list: &[QueueEntry], now: u64, empty: &str) -> String {
    terminal_safe(format_queue_raw(list, now, empty))
}

pub fn format_detail(d: &QueueDetail, now: u64) -> String {
    terminal_safe(format_detail_raw(d, now))
}

pub fn format_status(r: &StatusReport, now: u64) -> String {
    terminal_safe(format_status_raw(r, now))
}

pub fn format_senders(list: &[SenderRecord], now: u64) -> String {
    terminal_safe(format_senders_raw(list, now))
}

fn format_queue_raw(list: &[QueueEntry], now: u64, empty: &str) -> String {
    if list.is_empty() {
        return format!("{empty}\n");
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|e| {
            vec![
                e.id.clone(),
                age(now.saturating_sub(e.arrival_ms)),
                size(e.size),
                sender(&e.sender),
                format!("{}/{}", e.recipients_pending, e.recipients_total),
                e.state.clone(),
                e.attempts.to_string(),
                e.next_attempt_ms
                    .map(|n| when(n, now))
                    .unwrap_or_else(|| "-".into()),
                e.upstream.clone().unwrap_or_else(|| "-".into()),
                e.last_problem.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "ID", "AGE", "SIZE", "SENDER", "RCPTS", "STATE", "TRIES", "NEXT", "UPSTREAM", "PROBLEM",
        ],
        &rows,
    );
    let total: u64 = list.iter().map(|e| e.size).sum();
    let rcpts: u64 = list.iter().map(|e| e.recipients_pending).sum();
    out.push_str(&format!(
        "-- {} message{}, {} bytes, {} recipient{} pending\n",
        list.len(),
        if list.len() == 1 { "" } else { "s" },
        size(total),
        rcpts,
        if rcpts == 1 { "" } else { "s" },
    ));
    out
}

fn format_detail_raw(d: &QueueDetail, now: u64) -> String {
    let e = &d.entry;
    let mut out = format!("Message {}\n", e.id);
    let next = match (e.state.as_str(), e.next_attempt_ms) {
        ("held", _) => "; not attempted until released".to_string(),
        ("failed", _) => String::new(),
        (_, Some(n)) => format!("; next attempt {}", when(n, now)),
        _ => String::new(),
    };
    out.push_str(&format!(
        "  State:     {} ({} attempt{}{next})\n",
        e.state,
        e.attempts,
        if e.attempts == 1 { "" } else { "s" }
    ));
    out.push_str(&format!(
        "  Arrived:   {} ({} ago)\n",
        date(e.arrival_ms),
        age(now.saturating_sub(e.arrival_ms))
    ));
    out.push_str(&format!("  Size:      {} bytes\n", e.size));
    out.push_str(&format!("  Sender:    {}\n", sender(&e.sender)));
    out.push_str(&format!(
        "  Client:    {} (HELO {}){}\n",
        d.client_ip,
        d.helo,
        d.auth_user
            .as_ref()
            .map(|u| format!(", AUTH user {u}"))
            .unwrap_or_default()
    ));
    if let Some(u) = &e.upstream {
        out.push_str(&format!("  Upstream:  {u}\n"));
    }
    out.push_str(&format!(
        "Recipients ({} of {} pending):\n",
        e.recipients_pending, e.recipients_total
    ));
    for r in &d.recipients {
        let what = r
            .outcome
            .as_ref()
            .map(|o| format!("  {} {}", o.verdict.name(), o.reply))
            .unwrap_or_default();
        out.push_str(&format!("  {:<9} {}{what}\n", r.status, r.address));
    }
    if d.attempts.is_empty() {
        out.push_str("Attempts: none yet\n");
    } else {
        out.push_str("Attempts:\n");
        for o in &d.attempts {
            out.push_str(&format!(
                "  #{} {} via {}: {}{} {}{}\n",
                o.attempt,
                date(o.at_ms),
                if o.upstream.is_empty() {
                    "-"
                } else {
                    &o.upstream
                },
                o.verdict.name(),
                o.step
                    .map(|s| format!(" at {}", s.name()))
                    .unwrap_or_default(),
                o.reply,
                o.problem
                    .as_ref()
                    .map(|p| format!(" [{}]", p.key))
                    .unwrap_or_default(),
            ));
        }
    }
    match &d.diagnosis {
        Some(p) => {
            if p.key == "unknown" {
                out.push_str(&format!("Diagnosis: {}\n", p.meaning));
            } else {
                out.push_str(&format!("Diagnosis: {} ({})\n", p.meaning, p.key));
            }
            out.push_str(&format!("Fix: {}\n", p.remedy));
        }
        None if e.state == "held" => {
            out.push_str("Diagnosis: held by an operator; nothing has failed\n");
            out.push_str(&format!(
                "Fix: release it with `mailbridge queue release {}`\n",
                e.id
            ));
        }
        None => {
            out.push_str("Diagnosis: no attempt has failed\n");
            out.push_str("Fix: nothing to do\n");
        }
    }
    out
}

fn upstream_lines(u: &UpstreamStatus, now: u64) -> String {
    let mut out = format!("  {} ({}): ", u.name, u.kind);
    match u.state.as_str() {
        "ok" => out.push_str("ok"),
        s => {
            out.push_str(&s.to_uppercase());
            if let Some(since) = u.since_ms {
                out.push_str(&format!(
                    " for {} (since {})",
                    age(now.saturating_sub(since)),
                    date(since)
                ));
            }
            if let Some(m) = &u.meaning {
                out.push_str(&format!(": {m}"));
            }
        }
    }
    out.push('\n');
    if let Some(r) = &u.reply {
        out.push_str(&format!("      reply: {r}\n"));
    }
    if let Some(n) = u.next_probe_ms {
        let what = if u.state == "held" {
            "sending resumes"
        } else {
            "next probe"
        };
        out.push_str(&format!("      {what} {}\n", when(n, now)));
    }
    if u.state != "ok"
        && let Some(r) = &u.remedy
    {
        out.push_str(&format!("      fix: {r}\n"));
    }
    if let Some(t) = &u.token {
        let exp = match t.expires_ms {
            Some(e) if e > now => format!("expires {}", when(e, now)),
            Some(_) => "expired".into(),
            None => "none yet".into(),
        };
        out.push_str(&format!("      token: {exp}\n"));
        if let Some(err) = &t.last_error {
            out.push_str(&format!(
                "      last token error{}: {err}\n",
                t.last_error_ms
                    .map(|m| format!(" ({})", when(m, now)))
                    .unwrap_or_default()
            ));
        }
    }
    let pair = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => Some(format!("{a}/{b}")),
        (Some(a), None) => Some(a.to_string()),
        _ => None,
    };
    let counters: Vec<String> = [
        pair(u.connections_in_use, u.connections_max).map(|c| format!("connections {c}")),
        pair(u.messages_this_minute, u.messages_per_minute)
            .map(|c| format!("messages this minute {c}")),
        pair(u.recipients_day, u.recipients_per_day).map(|c| format!("recipients in 24h {c}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !counters.is_empty() {
        out.push_str(&format!("      {}\n", counters.join(", ")));
    }
    out
}

fn format_status_raw(r: &StatusReport, now: u64) -> String {
    let mut out = format!(
        "mailbridge {}, up {} (since {})\n",
        r.version,
        age(r.uptime_s * 1000),
        date(r.started_ms)
    );
    out.push_str("Listeners:\n");
    for l in &r.listeners {
        out.push_str(&format!(
            "  {}  tls {}{}{}\n",
            l.address,
            l.tls,
            l.tls_profile
                .as_ref()
                .map(|p| format!(" ({p})"))
                .unwrap_or_default(),
            if l.require_auth {
                ", AUTH required"
            } else {
                ""
            }
        ));
    }
    out.push_str("Upstreams:\n");
    for u in &r.upstreams {
        out.push_str(&upstream_lines(u, now));
    }
    let q = &r.queue;
    out.push_str(&format!(
        "Queue: {} message{} ({} deferred, {} held), {} failed{}\n",
        q.messages,
        if q.messages == 1 { "" } else { "s" },
        q.deferred,
        q.held,
        q.failed,
        q.oldest_age_s
            .map(|s| format!(", oldest {}", age(s * 1000)))
            .unwrap_or_default()
    ));
    if r.attention.is_empty() {
        out.push_str("All is well.\n");
    } else {
        out.push_str("Needs attention:\n");
        for a in &r.attention {
            out.push_str(&format!("  - {a}\n"));
        }
    }
    out
}

fn format_senders_raw(list: &[SenderRecord], now: u64) -> String {
    if list.is_empty() {
        return "No client has sent a message yet\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.ip.clone(),
                s.helo.clone(),
                s.auth_user.clone().unwrap_or_else(|| "-".into()),
                s.auth_mechanism.clone().unwrap_or_else(|| "-".into()),
                match (&s.tls_version, &s.tls_cipher) {
                    (Some(v), Some(c)) if !c.is_empty() => format!("{v} {c}"),
                    (Some(v), _) => v.clone(),
                    (None, _) => "PLAINTEXT".into(),
                },
                s.messages.to_string(),
                when(s.first_seen_ms, now),
                when(s.last_seen_ms, now),
                s.senders
                    .iter()
                    .map(|x| sender(x))
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "IP",
            "HELO",
            "AUTH USER",
            "MECH",
            "TLS",
            "MESSAGES",
            "FIRST",
            "LAST",
            "SENDERS",
        ],
        &rows,
    );
    let plain = list.iter().filter(|s| s.tls_version.is_none()).count();
    out.push_str(&format!(
        "-- {} client{}, {} without TLS\n",
        list.len(),
        if list.len() == 1 { "" } else { "s" },
        plain
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_short() {
        assert_eq!(age(5_000), "5s");
        assert_eq!(age(5 * 60_000), "5m");
        assert_eq!(age(2 * 3_600_000 + 5), "2h");
        assert_eq!(age(3 * 86_400_000), "3d");
        assert_eq!(when(10_000 + 300_000, 10_000), "in 5m");
        assert_eq!(when(10_000, 10_000), "now");
    }

    #[test]
    fn outside_strings_cannot_drive_the_terminal() {
        // A LAN client's EHLO and envelope sender, or an upstream's reply, reach the admin's
        // terminal: escape sequences (ESC, 8-bit CSI, BEL) must not.
        let evil = "a\u{1b}]0;owned\u{7}\u{1b}[2J\u{9b}31mb";
        let senders = format_senders(
            &[SenderRecord {
                ip: "192.0.2.7".into(),
                helo: evil.into(),
                senders: vec![format!("\"{evil}\"@example.com")],
                ..Default::default()
            }],
            0,
        );
        let status = format_status(
            &StatusReport {
                upstreams: vec![UpstreamStatus {
                    name: "exo".into(),
                    state: "paused".into(),
                    reply: Some(format!("550 5.7.1 {evil}")),
                    ..Default::default()
                }],
                attention: vec![evil.into()],
                ..Default::default()
            },
            0,
        );
        let queue = format_queue(
            &[QueueEntry {
                id: "q1".into(),
                sender: evil.into(),
                last_problem: Some(evil.into()),
                ..Default::default()
            }],
            0,
            "empty",
        );
        for out in [senders, status, queue] {
            assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
            assert!(out.contains("owned"), "{out:?}");
        }
    }

    #[test]
    fn queue_list_is_aligned_with_a_total() {
        let e = |id: &str, sender: &str| QueueEntry {
            id: id.into(),
            arrival_ms: 0,
            size: 2048,
            sender: sender.into(),
            recipients_total: 2,
            recipients_pending: 1,
            state: "deferred".into(),
            attempts: 3,
            next_attempt_ms: Some(3_600_000 + 600_000),
            upstream: Some("exo".into()),
            last_problem: Some("quota".into()),
        };
        let out = format_queue(
            &[e("aaaa", "printer@example.com"), e("bbbbbbbb", "")],
            3_600_000,
            "empty",
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        let col = |l: &str| l.find("deferred").unwrap();
        assert_eq!(col(lines[1]), col(lines[2]), "{out}");
        assert!(lines[2].contains("<>"));
        assert!(
            lines[1].contains("1h") && lines[1].contains("in 10m"),
            "{out}"
        );
        assert_eq!(lines[3], "-- 2 messages, 4.0K bytes, 2 recipients pending");
        assert_eq!(
            format_queue(&[], 0, "Mail queue is empty"),
            "Mail queue is empty\n"
        );
    }
}
