//! The status page (`/` of `admin.http_address`): one server-rendered HTML document with
//! inline CSS, no external assets and no script. It reloads itself every 10 seconds.
//!
//! A big banner first (green: all is well; amber: something to watch; red: mail is not
//! flowing or a part of the daemon stopped), then the upstreams, the queue and its oldest
//! messages, the last delivery outcomes and the sender inventory.
//!
//! Every string from outside (envelope addresses, HELO names, upstream replies) goes through
//! [`esc`]. The page shows facts only: never a secret, a token or message content.
//!
//! Stable hooks for tests and scrapers: `id="health"` with `data-health` (`ok`, `warn`,
//! `bad`); `id="upstreams"` rows with `data-upstream` and `data-state`, the remedy in
//! `.remedy`; `id="queue"` with `data-messages`; `id="oldest"` rows with `data-id`;
//! `id="recent"` rows with `data-verdict`; `id="senders"` rows with `data-tls` (`plaintext`,
//! `legacy` or `ok`).

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use crate::ops::model::{DeliveryRecord, QueueEntry, SenderRecord, StatusReport};

/// How many queued messages the page lists.
pub const OLDEST_MAX: usize = 20;

/// A queue whose oldest message is older than this turns the banner amber.
const OLD_QUEUE_S: u64 = 15 * 60;

/// Everything the page shows, gathered by the HTTP handler (or built by a test).
#[derive(Debug, Clone)]
pub struct PageModel {
    pub now_ms: u64,
    pub status: StatusReport,
    /// The listeners, scheduler and spool check (`/healthz`).
    pub health: Result<(), String>,
    /// The oldest queued messages (at most [`OLDEST_MAX`] are shown), or why the list is
    /// not available.
    pub oldest: Result<Vec<QueueEntry>, String>,
    pub recent: Vec<DeliveryRecord>,
    pub senders: Vec<SenderRecord>,
}

impl Default for PageModel {
    /// An empty, healthy daemon.
    fn default() -> PageModel {
        PageModel {
            now_ms: 0,
            status: StatusReport::default(),
            health: Ok(()),
            oldest: Ok(Vec::new()),
            recent: Vec::new(),
            senders: Vec::new(),
        }
    }
}

/// HTML-escapes `s` for text and (double-quoted) attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters have no business on the page (a HELO could carry them).
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// `3d 4h`, `2h 5m`, `4m 10s`, `12s`.
pub fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

/// `2026-12-02 03:04:05Z`.
fn when(ms: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace('T', " ")
}

/// `in 4m 10s` / `5m ago`.
fn relative(ms: u64, now_ms: u64) -> String {
    if ms >= now_ms {
        format!("in {}", age(Duration::from_millis(ms - now_ms)))
    } else {
        format!("{} ago", age(Duration::from_millis(now_ms - ms)))
    }
}

/// Whether a client's TLS is none or a version retired by RFC 8996.
fn tls_class(s: &SenderRecord) -> &'static str {
    match s.tls_version.as_deref() {
        None => "plaintext",
        Some("TLSv1" | "TLSv1.0" | "TLSv1.1" | "SSLv3") => "legacy",
        Some(_) => "ok",
    }
}

/// The banner: (`ok`|`warn`|`bad`, headline, reasons).
fn verdict(m: &PageModel) -> (&'static str, String, Vec<String>) {
    let mut bad = Vec::new();
    let mut warn = Vec::new();
    if let Err(e) = &m.health {
        bad.push(e.clone());
    }
    for u in &m.status.upstreams {
        match u.state.as_str() {
            "ok" => {}
            "paused" => bad.push(format!(
                "upstream {} is paused: {}",
                u.name,
                u.meaning.as_deref().unwrap_or("see below")
            )),
            other => warn.push(format!(
                "upstream {} is {other}: {}",
                u.name,
                u.meaning.as_deref().unwrap_or("see below")
            )),
        }
        // A paused upstream's line says it already.
        if u.state == "ok"
            && let Some(t) = &u.token
            && let Some(e) = &t.last_error
        {
            warn.push(format!("upstream {}: token refresh failed: {e}", u.name));
        }
    }
    let q = &m.status.queue;
    if let Some(age_s) = q.oldest_age_s
        && age_s > OLD_QUEUE_S
    {
        warn.push(format!(
            "the oldest queued message waits for {}",
            age(Duration::from_secs(age_s))
        ));
    }
    if q.failed > 0 {
        warn.push(format!(
            "{} message(s) failed for good (mailbridge queue failed)",
            q.failed
        ));
    }
    if let Err(e) = &m.oldest {
        warn.push(format!("the queue cannot be listed: {e}"));
    }
    if !bad.is_empty() {
        bad.extend(warn);
        ("bad", "Mail is stuck: action needed".into(), bad)
    } else if !warn.is_empty() {
        ("warn", "Needs attention".into(), warn)
    } else {
        ("ok", "All is well".into(), Vec::new())
    }
}

const STYLE: &str = r#"
:root{--ok:#1b7f3b;--warn:#b26a00;--bad:#b3261e;--muted:#5f6368;--line:#e0e0e0}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#202124;background:#f6f7f9}
header{display:flex;justify-content:space-between;align-items:baseline;padding:12px 24px;background:#202124;color:#fff}
header h1{margin:0;font-size:18px;font-weight:600}
header .meta{color:#bdc1c6;font-size:13px}
main{padding:16px 24px;max-width:1400px}
#health{border-radius:8px;padding:18px 24px;color:#fff;margin-bottom:18px}
#health h2{margin:0;font-size:28px}
#health ul{margin:8px 0 0;padding-left:20px;font-size:15px}
#health.ok{background:var(--ok)} #health.warn{background:var(--warn)} #health.bad{background:var(--bad)}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:12px 16px;margin-bottom:16px}
section h2{margin:0 0 8px;font-size:16px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th,td.mono,.badge,.nowrap{white-space:nowrap}
td.reply{white-space:normal;overflow-wrap:anywhere;min-width:18em}
th{font-weight:600;color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.03em}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
code,.mono{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12.5px}
.badge{display:inline-block;border-radius:10px;padding:1px 9px;font-size:12px;font-weight:600;color:#fff}
.b-ok{background:var(--ok)} .b-warn{background:var(--warn)} .b-bad{background:var(--bad)} .b-muted{background:var(--muted)}
.remedy{margin-top:4px;padding:6px 8px;background:#fff4e5;border-left:3px solid var(--warn);white-space:pre-wrap}
.muted{color:var(--muted)}
.summary{display:flex;gap:28px;margin-bottom:8px}
.summary div b{display:block;font-size:22px}
tr.insecure td{background:#fdecea}
.empty{color:var(--muted);font-style:italic}
"#;

fn state_badge(state: &str) -> String {
    let class = match state {
        "ok" | "delivered" => "b-ok",
        "paused" | "bounced" | "failed" => "b-bad",
        "held" | "deferred" => "b-warn",
        _ => "b-muted",
    };
    format!("<span class=\"badge {class}\">{}</span>", esc(state))
}

/// `s` cut to about `max` characters, with an ellipsis.
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn opt_num(n: Option<u64>) -> String {
    n.map_or_else(|| "–".into(), |n| n.to_string())
}

/// Renders the whole page.
pub fn render(m: &PageModel) -> String {
    let mut h = String::with_capacity(32 * 1024);
    let (health, headline, reasons) = verdict(m);
    let s = &m.status;
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"refresh\" content=\"10\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{title} mailbridge</title><style>{STYLE}</style></head><body>\
<header><h1>mailbridge</h1><span class=\"meta\">version {ver} · up {up} · {now} UTC · refreshes every 10 s</span></header><main>",
        title = match health {
            "ok" => "✔",
            "warn" => "⚠",
            _ => "✖",
        },
        ver = esc(&s.version),
        up = age(Duration::from_secs(s.uptime_s)),
        now = when(m.now_ms),
    );

    // Banner.
    let _ = write!(
        h,
        "<div id=\"health\" class=\"{health}\" data-health=\"{health}\"><h2>{}</h2>",
        esc(&headline)
    );
    if !reasons.is_empty() {
        h.push_str("<ul>");
        for r in &reasons {
            let _ = write!(h, "<li>{}</li>", esc(r));
        }
        h.push_str("</ul>");
    }
    h.push_str("</div>");

    // Upstreams.
    h.push_str("<section id=\"upstreams\"><h2>Upstreams</h2><table><thead><tr><th>Name</th><th>State</th><th>Problem and remedy</th><th>Token expires</th><th>Connections</th><th>Messages / min</th><th>Recipients / day</th></tr></thead><tbody>");
    if s.upstreams.is_empty() {
        h.push_str("<tr><td colspan=\"7\" class=\"empty\">no upstreams</td></tr>");
    }
    for u in &s.upstreams {
        let _ = write!(
            h,
            "<tr data-upstream=\"{name}\" data-state=\"{state}\"><td><b>{name}</b><br><span class=\"muted\">{kind}</span></td><td>{badge}",
            name = esc(&u.name),
            state = esc(&u.state),
            kind = esc(&u.kind),
            badge = state_badge(&u.state),
        );
        if let Some(since) = u.since_ms {
            let _ = write!(
                h,
                "<br><span class=\"muted\">since {}</span>",
                relative(since, m.now_ms)
            );
        }
        if let Some(next) = u.next_probe_ms {
            let _ = write!(
                h,
                "<br><span class=\"muted\">next try {}</span>",
                relative(next, m.now_ms)
            );
        }
        h.push_str("</td><td>");
        if let Some(p) = &u.problem {
            let _ = write!(h, "<code class=\"problem\">{}</code>", esc(p));
        }
        if let Some(meaning) = &u.meaning {
            let _ = write!(h, "<div class=\"meaning\">{}</div>", esc(meaning));
        }
        // The upstream's SMTP reply (a local error is the meaning already).
        if let Some(reply) = u
            .reply
            .as_deref()
            .filter(|r| r.len() >= 3 && r.as_bytes()[..3].iter().all(u8::is_ascii_digit))
        {
            let _ = write!(
                h,
                "<div class=\"mono muted\">{}</div>",
                esc(&clip(reply, 200))
            );
        }
        if let Some(remedy) = &u.remedy {
            let _ = write!(h, "<div class=\"remedy\">{}</div>", esc(remedy));
        }
        if u.problem.is_none() && u.meaning.is_none() {
            h.push_str("<span class=\"muted\">–</span>");
        }
        h.push_str("</td><td class=\"token\">");
        match &u.token {
            Some(t) => {
                match t.expires_ms {
                    Some(e) if e > m.now_ms => {
                        let _ = write!(h, "{}", relative(e, m.now_ms));
                    }
                    Some(_) => h.push_str("<span class=\"badge b-bad\">expired</span>"),
                    None => h.push_str("<span class=\"muted\">no token yet</span>"),
                }
                if let Some(e) = &t.last_error {
                    let _ = write!(
                        h,
                        "<div class=\"muted\">last refresh failed{}: {}</div>",
                        t.last_error_ms
                            .map(|at| format!(" {}", relative(at, m.now_ms)))
                            .unwrap_or_default(),
                        esc(&clip(e, 120))
                    );
                }
            }
            None => h.push_str("<span class=\"muted\">–</span>"),
        }
        let _ = write!(
            h,
            "</td><td class=\"num\">{} / {}</td><td class=\"num\">{} / {}</td><td class=\"num\">{} / {}</td></tr>",
            opt_num(u.connections_in_use),
            opt_num(u.connections_max),
            opt_num(u.messages_this_minute),
            opt_num(u.messages_per_minute),
            opt_num(u.recipients_day),
            opt_num(u.recipients_per_day),
        );
    }
    h.push_str("</tbody></table></section>");

    // Queue.
    let q = &s.queue;
    let _ = write!(
        h,
        "<section id=\"queue\" data-messages=\"{}\"><h2>Queue</h2><div class=\"summary\">\
<div><b>{}</b>queued</div><div><b>{}</b>deferred</div><div><b>{}</b>held</div><div><b>{}</b>failed</div><div><b>{}</b>oldest</div></div>",
        q.messages,
        q.messages,
        q.deferred,
        q.held,
        q.failed,
        q.oldest_age_s
            .map_or_else(|| "–".into(), |a| age(Duration::from_secs(a))),
    );
    h.push_str("<table id=\"oldest\"><thead><tr><th>Queue id</th><th>Age</th><th>Size</th><th>Sender</th><th>Recipients</th><th>State</th><th>Attempts</th><th>Next attempt</th><th>Last problem</th></tr></thead><tbody>");
    match &m.oldest {
        Err(e) => {
            let _ = write!(
                h,
                "<tr><td colspan=\"9\" class=\"empty\">cannot list the queue: {}</td></tr>",
                esc(e)
            );
        }
        Ok(list) if list.is_empty() => {
            h.push_str("<tr><td colspan=\"9\" class=\"empty\">the queue is empty</td></tr>")
        }
        Ok(list) => {
            for e in list.iter().take(OLDEST_MAX) {
                let _ = write!(
                    h,
                    "<tr data-id=\"{id}\" data-state=\"{state}\"><td class=\"mono\">{id}</td><td>{age}</td><td class=\"num\">{size}</td><td class=\"mono\">{sender}</td><td class=\"num\">{pending} / {total}</td><td>{badge}</td><td class=\"num\">{attempts}</td><td>{next}</td><td><code>{problem}</code></td></tr>",
                    id = esc(&e.id),
                    state = esc(&e.state),
                    age = age(Duration::from_millis(m.now_ms.saturating_sub(e.arrival_ms))),
                    size = e.size,
                    sender = if e.sender.is_empty() {
                        "&lt;&gt;".into()
                    } else {
                        esc(&e.sender)
                    },
                    pending = e.recipients_pending,
                    total = e.recipients_total,
                    badge = state_badge(&e.state),
                    attempts = e.attempts,
                    next = e
                        .next_attempt_ms
                        .map_or_else(|| "–".into(), |n| relative(n, m.now_ms)),
                    problem = esc(e.last_problem.as_deref().unwrap_or("")),
                );
            }
        }
    }
    h.push_str("</tbody></table></section>");

    // Recent outcomes.
    h.push_str("<section id=\"recent\"><h2>Last delivery outcomes</h2><table><thead><tr><th>When</th><th>Queue id</th><th>Recipient and sender</th><th>Upstream</th><th>Verdict</th><th>Reply</th><th>Try</th></tr></thead><tbody>");
    if m.recent.is_empty() {
        h.push_str("<tr><td colspan=\"7\" class=\"empty\">no deliveries since the start</td></tr>");
    }
    for r in m.recent.iter().take(crate::ops::RECENT_MAX) {
        let reply = match (r.code, &r.enhanced) {
            (Some(c), Some(e)) => format!("{c} {e} {}", r.reply),
            (Some(c), None) => format!("{c} {}", r.reply),
            _ => r.reply.clone(),
        };
        let _ = write!(
            h,
            "<tr data-verdict=\"{verdict}\"><td class=\"nowrap\">{when}</td><td class=\"mono\">{id}</td><td class=\"mono\">{rcpt}<br><span class=\"muted\">from {sender}</span></td><td>{up}</td><td>{badge}</td><td class=\"mono reply\">{reply}</td><td class=\"num\">{attempt}</td></tr>",
            verdict = esc(&r.verdict),
            when = relative(r.at_ms, m.now_ms),
            id = esc(&r.queue_id),
            sender = if r.sender.is_empty() {
                "&lt;&gt;".into()
            } else {
                esc(&r.sender)
            },
            rcpt = esc(&r.recipient),
            up = esc(&r.upstream),
            badge = state_badge(&r.verdict),
            reply = esc(&clip(&reply, 160)),
            attempt = r.attempt,
        );
    }
    h.push_str("</tbody></table></section>");

    // Senders.
    let insecure = m.senders.iter().filter(|s| tls_class(s) != "ok").count();
    let _ = write!(
        h,
        "<section id=\"senders\"><h2>Senders</h2><p class=\"muted\">Every client that sent through mailbridge. {insecure} of {} send without TLS or with TLS 1.0/1.1 (marked): move them to TLS 1.2 before old protocols are switched off.</p>\
<table><thead><tr><th>Client</th><th>HELO</th><th>AUTH user</th><th>TLS</th><th>Envelope senders</th><th>Messages</th><th>First seen</th><th>Last seen</th></tr></thead><tbody>",
        m.senders.len()
    );
    if m.senders.is_empty() {
        h.push_str("<tr><td colspan=\"8\" class=\"empty\">no clients yet</td></tr>");
    }
    for c in &m.senders {
        let class = tls_class(c);
        let tls = match class {
            "plaintext" => "<span class=\"badge b-bad\">plaintext</span>".to_string(),
            "legacy" => format!(
                "<span class=\"badge b-warn\">legacy {}</span>",
                esc(c.tls_version.as_deref().unwrap_or(""))
            ),
            _ => format!(
                "{}<br><span class=\"muted mono\">{}</span>",
                esc(c.tls_version.as_deref().unwrap_or("")),
                esc(c.tls_cipher.as_deref().unwrap_or(""))
            ),
        };
        let auth = match (&c.auth_user, &c.auth_mechanism) {
            (Some(u), Some(m)) => format!("{} <span class=\"muted\">({})</span>", esc(u), esc(m)),
            (Some(u), None) => esc(u),
            _ => "<span class=\"muted\">–</span>".into(),
        };
        let senders: Vec<String> = c
            .senders
            .iter()
            .map(|s| {
                if s.is_empty() {
                    "&lt;&gt;".into()
                } else {
                    esc(s)
                }
            })
            .collect();
        let _ = write!(
            h,
            "<tr data-tls=\"{class}\" class=\"{row}\"><td class=\"mono\">{ip}</td><td class=\"mono\">{helo}</td><td>{auth}</td><td>{tls}</td><td class=\"mono\">{senders}</td><td class=\"num\">{n}</td><td>{first}</td><td>{last}</td></tr>",
            row = if class == "ok" { "" } else { "insecure" },
            ip = esc(&c.ip),
            helo = esc(&c.helo),
            senders = senders.join("<br>"),
            n = c.messages,
            first = when(c.first_seen_ms),
            last = relative(c.last_seen_ms, m.now_ms),
        );
    }
    h.push_str("</tbody></table></section>");

    // Listeners.
    h.push_str("<section id=\"listeners\"><h2>Listeners</h2><table><thead><tr><th>Address</th><th>TLS</th><th>Profile</th><th>AUTH required</th></tr></thead><tbody>");
    for l in &s.listeners {
        let _ = write!(
            h,
            "<tr><td class=\"mono\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&l.address),
            esc(&l.tls),
            esc(l.tls_profile.as_deref().unwrap_or("–")),
            if l.require_auth { "yes" } else { "no" }
        );
    }
    h.push_str("</tbody></table></section></main></body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::model::UpstreamStatus;

    #[test]
    fn escapes_everything_from_outside() {
        assert_eq!(
            esc("<script>alert('x')</script>&\"\u{7}"),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;\u{FFFD}"
        );
        let model = PageModel {
            health: Ok(()),
            oldest: Ok(vec![QueueEntry {
                id: "q1".into(),
                sender: "<img src=x onerror=alert(1)>@evil".into(),
                state: "queued".into(),
                ..Default::default()
            }]),
            senders: vec![SenderRecord {
                ip: "192.0.2.7".into(),
                helo: "\"><script>x</script>".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let html = render(&model);
        assert!(!html.contains("<img"), "{html}");
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("data-tls=\"plaintext\""));
    }

    #[test]
    fn the_null_sender_is_escaped_in_the_inventory() {
        let model = PageModel {
            senders: vec![SenderRecord {
                ip: "192.0.2.7".into(),
                senders: vec![String::new()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let html = render(&model);
        assert!(!html.contains("<>"), "{html}");
        assert!(html.contains("&lt;&gt;"), "{html}");
    }

    #[test]
    fn banner_is_red_for_a_paused_upstream_and_green_when_all_is_well() {
        let mut model = PageModel {
            health: Ok(()),
            oldest: Ok(vec![]),
            ..Default::default()
        };
        assert_eq!(verdict(&model).0, "ok");
        model.status.upstreams.push(UpstreamStatus {
            name: "contoso".into(),
            state: "paused".into(),
            ..Default::default()
        });
        assert_eq!(verdict(&model).0, "bad");
        model.status.upstreams[0].state = "held".into();
        assert_eq!(verdict(&model).0, "warn");
        model.health = Err("a listener stopped accepting connections".into());
        assert_eq!(verdict(&model).0, "bad");
    }
}
