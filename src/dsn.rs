//! Delivery status notifications (RFC 3464): the `multipart/report` message that tells a sender
//! its mail failed or is delayed.
//!
//! Pure code: [`build`] turns a [`Dsn`] into the bytes of a complete message (CRLF line endings,
//! no line over 998 octets), [`status_code`] derives the RFC 3463 status from a typed reply
//! ([`crate::outcome::UpstreamReply`], parsed once where it was received), and
//! [`read_header_section`] reads the original message's header section for the third part.
//!
//! Everything that comes from outside (addresses, upstream replies, the original headers) is
//! untrusted: CR, LF and other control characters never reach a header or field line, long
//! values are folded, and the `message/delivery-status` part stays 7-bit (non-ASCII addresses use
//! the RFC 6533 `utf-8` address type in its `\x{HEX}` form).

use std::io::{self, Read};
use std::time::{Duration, UNIX_EPOCH};

use crate::outcome::{UpstreamReply, split_lines};
use crate::smtp::headers::rfc5322_date;

/// What happened to a recipient (RFC 3464 §2.3.3; `delivered`, `relayed` and `expanded` are never
/// reported by the relay).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delayed,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
        }
    }
}

/// One recipient of the report.
#[derive(Clone, Debug)]
pub struct DsnRecipient {
    /// The final recipient (`Final-Recipient: rfc822; addr`).
    pub address: String,
    pub action: Action,
    /// The upstream reply (`550 5.7.60 SMTP; Client does not have permissions ...`) or our own
    /// reason without a reply code (`4.4.7 delivery time expired ...`), from the recipient's
    /// typed outcome.
    pub reply: UpstreamReply,
    /// The upstream host that gave the reply, e.g. `smtp.office365.com`.
    pub remote_mta: Option<String>,
}

/// Everything a report says. Times are milliseconds since the Unix epoch.
#[derive(Clone, Debug)]
pub struct Dsn<'a> {
    /// Our hostname (`Reporting-MTA: dns; host`).
    pub reporting_mta: &'a str,
    /// The report's header From address, shown as `Mail Delivery System <addr>`.
    pub from: &'a str,
    /// Who gets the report (the original envelope sender, or the postmaster).
    pub to: &'a str,
    /// The original message's queue id (`X-Mailbridge-Queue-ID`; there is no ENVID).
    pub queue_id: &'a str,
    /// The original envelope sender, `""` for the null sender.
    pub original_sender: &'a str,
    pub arrival_ms: u64,
    pub now_ms: u64,
    /// Until when a delayed message is retried (`Will-Retry-Until`, delayed recipients only).
    pub will_retry_until_ms: Option<u64>,
    pub recipients: Vec<DsnRecipient>,
    /// Human text: cause and remedy (may be multi-line).
    pub explanation: &'a str,
    /// The original message's header section (the `text/rfc822-headers` part; omitted if empty).
    pub original_headers: &'a [u8],
    /// The report's own `Message-ID`, e.g. `<id@hostname>`.
    pub message_id: &'a str,
}

/// Where soft wrapping starts (header fields and text lines).
const SOFT_WIDTH: usize = 76;
/// The longest unbreakable piece put on one line; with prefixes, lines stay far below 998.
const HARD_PIECE: usize = 900;
/// RFC 5322 §2.1.1: at most 998 octets per line, excluding CRLF.
const MAX_LINE: usize = 998;

/// The whole report message, CRLF line endings, every line at most 998 octets.
pub fn build(d: &Dsn) -> Vec<u8> {
    let any_failed = d.recipients.iter().any(|r| r.action == Action::Failed);
    let text = text_part(d, any_failed);
    let status = status_part(d);
    let headers = original_headers_part(d.original_headers);

    let boundary = loop {
        let b = make_boundary(d.queue_id);
        let taken = [text.as_bytes(), status.as_bytes(), headers.as_slice()]
            .iter()
            .any(|part| contains(part, b.as_bytes()));
        if !taken {
            break b;
        }
    };
    let eight_bit = !text.is_ascii() || !headers.is_ascii();

    let mut out = String::new();
    let from = clean_addr(d.from);
    let to = clean_addr(d.to);
    push_field(&mut out, "From", &format!("Mail Delivery System <{from}>"));
    push_field(&mut out, "To", &format!("<{to}>"));
    let subject = if any_failed {
        "Undelivered Mail Returned to Sender"
    } else {
        "Delayed Mail (still being retried)"
    };
    push_field(&mut out, "Subject", subject);
    push_field(&mut out, "Date", &date(d.now_ms));
    let mut mid = clean_line(d.message_id).replace(' ', "");
    if !mid.starts_with('<') {
        mid = format!("<{mid}>");
    }
    push_field(&mut out, "Message-ID", &mid);
    push_field(&mut out, "Auto-Submitted", "auto-replied");
    push_field(&mut out, "MIME-Version", "1.0");
    // One line on purpose (well under 998): simple parsers look for the whole value.
    out.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status; boundary=\"{boundary}\"\r\n"
    ));
    let cte = if eight_bit { "8bit" } else { "7bit" };
    push_field(&mut out, "Content-Transfer-Encoding", cte);
    out.push_str("\r\nThis is a MIME-encapsulated message.\r\n\r\n");

    out.push_str(&format!("--{boundary}\r\n"));
    out.push_str("Content-Type: text/plain; charset=utf-8\r\n");
    let text_cte = if text.is_ascii() { "7bit" } else { "8bit" };
    out.push_str(&format!("Content-Transfer-Encoding: {text_cte}\r\n"));
    out.push_str("Content-Description: Notification\r\n\r\n");
    out.push_str(&text);
    out.push_str("\r\n"); // each part ends with an empty line, as Postfix's reports do

    out.push_str(&format!("--{boundary}\r\n"));
    out.push_str("Content-Type: message/delivery-status\r\n");
    out.push_str("Content-Description: Delivery report\r\n\r\n");
    out.push_str(&status);
    out.push_str("\r\n");

    let mut bytes = out.into_bytes();
    if !headers.is_empty() {
        bytes.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        bytes.extend_from_slice(b"Content-Type: text/rfc822-headers\r\n");
        let cte = if headers.is_ascii() { "7bit" } else { "8bit" };
        bytes.extend_from_slice(format!("Content-Transfer-Encoding: {cte}\r\n").as_bytes());
        let desc = if any_failed {
            "Undelivered Message Headers"
        } else {
            "Delayed Message Headers"
        };
        bytes.extend_from_slice(format!("Content-Description: {desc}\r\n\r\n").as_bytes());
        bytes.extend_from_slice(&headers);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    bytes
}

/// The RFC 3463 enhanced status for a reply: `550 5.7.60 ...` -> `5.7.60`, `4.4.7 delivery
/// time expired` -> `4.4.7`; without an enhanced code the class of the reply code (`550 x` ->
/// `5.0.0`, `451 x` -> `4.0.0`), without either the action's (`failed` -> `5.0.0`, `delayed` ->
/// `4.0.0`). A delayed recipient is never reported with a permanent (5.x.x) status: its class
/// becomes 4 (e.g. the `554 5.2.0` quota reply that the relay treats as a deferral).
pub fn status_code(reply: &UpstreamReply, action: Action) -> String {
    let code = match (&reply.enhanced, reply.code.map(|c| c / 100)) {
        (Some(e), _) => e.clone(),
        (None, Some(c @ (4 | 5))) => format!("{c}.0.0"),
        _ => match action {
            Action::Failed => "5.0.0".to_string(),
            Action::Delayed => "4.0.0".to_string(),
        },
    };
    match (action, code.strip_prefix("5.")) {
        (Action::Delayed, Some(rest)) => format!("4.{rest}"),
        _ => code,
    }
}

/// Reads the header section of a message: the bytes up to and including the first empty line
/// (CRLF CRLF; a bare-LF empty line is accepted too). A message without a body gives everything
/// up to the end. At most `limit` bytes are returned: a longer section is cut after the last
/// complete line that fits (an empty result if not even one line fits). The reader may be
/// consumed beyond the section (it is read in blocks, at most `limit` bytes in all).
pub fn read_header_section(r: &mut impl Read, limit: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(limit.min(16 * 1024));
    let mut line_start = 0; // start of the first line not yet known to be complete
    let mut chunk = [0u8; 8192];
    loop {
        // Look at every complete line that arrived.
        while let Some(rel) = buf[line_start..].iter().position(|&b| b == b'\n') {
            let line = &buf[line_start..line_start + rel];
            let end = line_start + rel + 1;
            if line.is_empty() || line == b"\r" {
                buf.truncate(end);
                return Ok(buf);
            }
            line_start = end;
        }
        if buf.len() >= limit {
            buf.truncate(line_start);
            return Ok(buf);
        }
        let want = (limit - buf.len()).min(chunk.len());
        let n = match r.read(&mut chunk[..want]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(buf); // no body: the whole message is the header section
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

// ---------------------------------------------------------------------------------------------
// The three parts.

fn text_part(d: &Dsn, any_failed: bool) -> String {
    let mut lines: Vec<String> = Vec::new();
    let host = clean_line(d.reporting_mta);
    lines.push(format!("This is the mail relay at host {host}."));
    lines.push(String::new());
    let failed: Vec<&DsnRecipient> = d
        .recipients
        .iter()
        .filter(|r| r.action == Action::Failed)
        .collect();
    let delayed: Vec<&DsnRecipient> = d
        .recipients
        .iter()
        .filter(|r| r.action == Action::Delayed)
        .collect();
    if any_failed {
        wrap_into(
            &mut lines,
            "Your message could not be delivered to one or more recipients. It has been \
             returned to you; the relay will not try again for these recipients.",
            "",
            "",
        );
        lines.push(String::new());
        recipient_lines(&mut lines, &failed);
    }
    if !delayed.is_empty() {
        if any_failed {
            lines.push(String::new());
        }
        let until = match d.will_retry_until_ms {
            Some(ms) => format!(" The relay will keep trying until {}.", date(ms)),
            None => " The relay will keep trying.".to_string(),
        };
        wrap_into(
            &mut lines,
            &format!(
                "Your message has not yet been delivered to the recipients below.{until} \
                 You do not need to send it again."
            ),
            "",
            "",
        );
        lines.push(String::new());
        recipient_lines(&mut lines, &delayed);
    }
    let explanation = d.explanation.trim_matches(['\r', '\n']);
    if !explanation.trim().is_empty() {
        lines.push(String::new());
        lines.push("What happened and what to do:".to_string());
        lines.push(String::new());
        for line in split_lines(explanation) {
            let line = clean_text_line(line);
            let indent: String = line.chars().take_while(|&c| c == ' ').take(8).collect();
            wrap_into(&mut lines, line.trim_start(), &indent, &indent);
        }
    }
    lines.push(String::new());
    let sender = if d.original_sender.is_empty() {
        "<> (the null sender)".to_string()
    } else {
        format!("<{}>", clean_addr(d.original_sender))
    };
    let queue_id = clean_line(d.queue_id);
    let indent = "                 ";
    wrap_into(&mut lines, &queue_id, "Queue ID:        ", indent);
    wrap_into(&mut lines, &sender, "Original sender: ", indent);
    lines.push(format!("Arrival date:    {}", date(d.arrival_ms)));
    lines.push(String::new());
    wrap_into(
        &mut lines,
        &format!(
            "When you ask the relay's administrator about this message, quote the queue ID \
             {queue_id}: the relay's log lines for the message carry it. The headers of the \
             original message are attached."
        ),
        "",
        "",
    );
    let mut out = String::new();
    for line in lines {
        out.push_str(&line);
        out.push_str("\r\n");
    }
    out
}

fn recipient_lines(lines: &mut Vec<String>, recipients: &[&DsnRecipient]) {
    for r in recipients {
        let addr = clean_addr(&r.address);
        lines.push(format!("  <{addr}>"));
        let reply = clean_text_line(&r.reply.to_string()).trim().to_string();
        let reply = match &r.remote_mta {
            Some(mta) => format!("{} said: {reply}", clean_line(mta)),
            None => reply,
        };
        wrap_into(lines, &reply, "    ", "      ");
    }
}

fn status_part(d: &Dsn) -> String {
    let mut out = String::new();
    push_field(
        &mut out,
        "Reporting-MTA",
        &format!("dns; {}", ascii_only(d.reporting_mta)),
    );
    push_field(&mut out, "X-Mailbridge-Queue-ID", &ascii_only(d.queue_id));
    push_field(&mut out, "Arrival-Date", &date(d.arrival_ms));
    for r in &d.recipients {
        out.push_str("\r\n");
        let addr = clean_addr(&r.address);
        let final_recipient = if addr.is_ascii() {
            format!("rfc822; {addr}")
        } else {
            format!("utf-8; {}", utf8_addr_xtext(&addr))
        };
        push_field(&mut out, "Final-Recipient", &final_recipient);
        push_field(&mut out, "Action", r.action.as_str());
        push_field(&mut out, "Status", &status_code(&r.reply, r.action));
        if let Some(mta) = &r.remote_mta {
            push_field(&mut out, "Remote-MTA", &format!("dns; {}", ascii_only(mta)));
        }
        let text = ascii_only(&r.reply.to_string());
        let reply = text.trim();
        let diagnostic = if r.reply.code.is_some() {
            format!("smtp; {reply}")
        } else {
            format!("X-Mailbridge; {reply}")
        };
        push_field(&mut out, "Diagnostic-Code", &diagnostic);
        push_field(&mut out, "Last-Attempt-Date", &date(d.now_ms));
        if let (Action::Delayed, Some(until)) = (r.action, d.will_retry_until_ms) {
            push_field(&mut out, "Will-Retry-Until", &date(until));
        }
    }
    out
}

/// The original header section, normalised: CRLF line ends, no bare CR or NUL, nothing after
/// the first empty line, lines over 998 octets folded, and no trailing empty line.
fn original_headers_part(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + 64);
    for line in raw.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break; // end of the header section (or of the input)
        }
        let line: Vec<u8> = line
            .iter()
            .map(|&b| if b == b'\r' || b == 0 { b' ' } else { b })
            .collect();
        let mut rest: &[u8] = &line;
        let mut first = true;
        while !rest.is_empty() {
            let room = if first { MAX_LINE } else { MAX_LINE - 1 };
            let cut = if rest.len() <= room {
                rest.len()
            } else {
                byte_cut(rest, room)
            };
            if !first && rest[0] != b' ' && rest[0] != b'\t' {
                out.push(b' '); // a continuation line starts with a blank
            }
            out.extend_from_slice(&rest[..cut]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[cut..];
            first = false;
        }
    }
    out
}

/// Where to cut a too-long byte line at most `room` bytes in: before the last blank (so the
/// blank starts the continuation line), else at a UTF-8 character boundary.
fn byte_cut(line: &[u8], room: usize) -> usize {
    if let Some(p) = line[1..room].iter().rposition(|&b| b == b' ' || b == b'\t') {
        return p + 1;
    }
    let mut cut = room;
    while cut > 1 && (line[cut] & 0xC0) == 0x80 {
        cut -= 1;
    }
    if cut <= 1 { room } else { cut }
}

// ---------------------------------------------------------------------------------------------
// Values and lines.

/// One header-safe line: every control character (CR and LF included) becomes a space.
fn clean_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A text line: tabs become spaces, other control characters are dropped to spaces too.
fn clean_text_line(s: &str) -> String {
    clean_line(&s.replace('\t', "    "))
}

/// An address for a header or field: one line, no blanks at the ends, no angle brackets.
fn clean_addr(s: &str) -> String {
    let s = clean_line(s);
    let s = s.trim();
    let s = s.strip_prefix('<').unwrap_or(s);
    let s = s.strip_suffix('>').unwrap_or(s);
    s.replace(['<', '>'], "").trim().to_string()
}

/// For the 7-bit `message/delivery-status` part: one line, non-ASCII as `?`.
fn ascii_only(s: &str) -> String {
    clean_line(s)
        .chars()
        .map(|c| if c.is_ascii() { c } else { '?' })
        .collect()
}

/// RFC 6533 `utf-8-addr-xtext`: printable ASCII except `+`, `=` and `\` as is, everything else
/// as `\x{HEX}`.
fn utf8_addr_xtext(addr: &str) -> String {
    let mut out = String::new();
    for c in addr.chars() {
        if c.is_ascii_graphic() && !matches!(c, '+' | '=' | '\\') {
            out.push(c);
        } else {
            out.push_str(&format!("\\x{{{:02X}}}", c as u32));
        }
    }
    out
}

/// An RFC 5322 date for a time in ms since the epoch (clamped to what the formatter handles).
fn date(ms: u64) -> String {
    const MAX_SECS: u64 = 253_402_300_799; // 9999-12-31 23:59:59
    let secs = (ms / 1000).min(MAX_SECS);
    rfc5322_date(UNIX_EPOCH + Duration::from_secs(secs))
}

/// A boundary that is valid (RFC 2046 bchars, at most 70) and unlikely anywhere else: `=_` does
/// not occur in quoted-printable or base64 output, and the UUID is fresh each call.
fn make_boundary(queue_id: &str) -> String {
    let id: String = queue_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(30)
        .collect();
    format!("=_mb_{id}_{}", uuid::Uuid::now_v7().simple())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Appends `Name: value` folded at blanks near [`SOFT_WIDTH`]; pieces without a blank longer
/// than [`HARD_PIECE`] are split (a continuation line always starts with a space).
fn push_field(out: &mut String, name: &str, value: &str) {
    let value = clean_line(value);
    let mut lines = Vec::new();
    wrap_into(&mut lines, &format!("{name}: {}", value.trim()), "", " ");
    for line in lines {
        out.push_str(&line);
        out.push_str("\r\n");
    }
}

/// Wraps one line of text into `lines`: words joined by single spaces, a new line when the
/// next word would pass [`SOFT_WIDTH`], words longer than [`HARD_PIECE`] bytes split at
/// character boundaries. An empty text gives one empty line.
fn wrap_into(lines: &mut Vec<String>, text: &str, first_prefix: &str, cont_prefix: &str) {
    let mut line = first_prefix.to_string();
    let mut has_word = false;
    for word in text.split_whitespace() {
        for piece in hard_pieces(word) {
            if has_word && line.len() + 1 + piece.len() > SOFT_WIDTH {
                lines.push(std::mem::replace(&mut line, cont_prefix.to_string()));
                has_word = false;
            }
            if has_word {
                line.push(' ');
            }
            line.push_str(piece);
            has_word = true;
        }
    }
    debug_assert!(line.len() <= MAX_LINE);
    lines.push(line);
}

/// `word` in pieces of at most [`HARD_PIECE`] bytes, cut at character boundaries.
fn hard_pieces(word: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = word;
    while rest.len() > HARD_PIECE {
        let mut cut = HARD_PIECE;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out.push(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADERS: &[u8] = b"Received: from printer (10.0.0.5)\r\n\tby relay; Sat, 28 Nov 2026 01:02:03 +0000\r\nFrom: scanner@contoso.com\r\nTo: a@example.com, b@example.com\r\nSubject: Scan\r\n\r\n";

    fn sample(recipients: Vec<DsnRecipient>) -> Dsn<'static> {
        Dsn {
            reporting_mta: "relay.contoso.local",
            from: "relay@contoso.com",
            to: "scanner@contoso.com",
            queue_id: "0190f3a2-7b1c-7e0a-9d3e-1234567890ab",
            original_sender: "scanner@contoso.com",
            arrival_ms: 1_795_827_723_000, // Sat, 28 Nov 2026 01:02:03 +0000
            now_ms: 1_795_831_323_000,     // one hour later
            will_retry_until_ms: Some(1_796_259_723_000),
            recipients,
            explanation: "The mailbox relay@contoso.com may not send as scanner@contoso.com.\nRemedy: Add-RecipientPermission -Identity scanner@contoso.com -Trustee <SP id> -AccessRights SendAs",
            original_headers: HEADERS,
            message_id: "<dsn.1@relay.contoso.local>",
        }
    }

    fn failed(addr: &str, reply: &str) -> DsnRecipient {
        DsnRecipient {
            address: addr.to_string(),
            action: Action::Failed,
            reply: reply.into(),
            remote_mta: Some("smtp.office365.com".to_string()),
        }
    }

    /// (top-level header section, parts as (header section, body)).
    fn parse(msg: &[u8]) -> (String, Vec<(String, String)>) {
        let s = std::str::from_utf8(msg).unwrap();
        let (head, body) = s.split_once("\r\n\r\n").unwrap();
        let b = head
            .split("boundary=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let delim = format!("\r\n--{b}");
        let body = format!("\r\n{body}");
        let end = body
            .find(&format!("{delim}--\r\n"))
            .expect("close delimiter");
        assert!(body.ends_with(&format!("{delim}--\r\n")));
        let parts = body[..end]
            .split(&delim)
            .skip(1) // preamble
            .map(|p| {
                let p = p.strip_prefix("\r\n").unwrap();
                let (h, b) = p.split_once("\r\n\r\n").unwrap();
                (h.to_string(), b.to_string())
            })
            .collect();
        (head.to_string(), parts)
    }

    fn assert_clean_lines(msg: &[u8]) {
        for (i, &b) in msg.iter().enumerate() {
            if b == b'\n' {
                assert!(i > 0 && msg[i - 1] == b'\r', "bare LF at {i}");
            }
            if b == b'\r' {
                assert_eq!(msg.get(i + 1), Some(&b'\n'), "bare CR at {i}");
            }
        }
        for line in msg.split(|&b| b == b'\n') {
            assert!(line.len() <= MAX_LINE + 1, "line of {} octets", line.len());
        }
        assert!(msg.ends_with(b"\r\n"));
    }

    #[test]
    fn structure() {
        let d = sample(vec![
            failed(
                "a@example.com",
                "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
            ),
            failed("b@example.com", "550 5.7.60 SMTP; same"),
        ]);
        let msg = build(&d);
        assert_clean_lines(&msg);
        let (head, parts) = parse(&msg);
        assert!(head.starts_with("From: Mail Delivery System <relay@contoso.com>\r\n"));
        assert!(head.contains("\r\nTo: <scanner@contoso.com>\r\n"));
        assert!(head.contains("\r\nSubject: Undelivered Mail Returned to Sender\r\n"));
        assert!(head.contains("\r\nDate: Sat, 28 Nov 2026 02:02:03 +0000\r\n"));
        assert!(head.contains("\r\nMessage-ID: <dsn.1@relay.contoso.local>\r\n"));
        assert!(head.contains("\r\nAuto-Submitted: auto-replied\r\n"));
        assert!(head.contains("\r\nMIME-Version: 1.0\r\n"));
        assert!(head.contains(
            "\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"=_mb_"
        ));
        assert_eq!(parts.len(), 3);

        let (h, text) = &parts[0];
        assert!(h.starts_with("Content-Type: text/plain; charset=utf-8\r\n"));
        assert!(text.contains("<a@example.com>"));
        assert!(text.contains("<b@example.com>"));
        assert!(text.contains("smtp.office365.com said: 550 5.7.60 SMTP; Client does not"));
        assert!(text.contains("Add-RecipientPermission"));
        assert!(text.contains("0190f3a2-7b1c-7e0a-9d3e-1234567890ab"));
        assert!(text.contains("Arrival date:    Sat, 28 Nov 2026 01:02:03 +0000"));

        let (h, status) = &parts[1];
        assert_eq!(
            h,
            "Content-Type: message/delivery-status\r\nContent-Description: Delivery report"
        );
        assert!(status.is_ascii());
        let blocks: Vec<&str> = status.trim_end().split("\r\n\r\n").collect();
        assert_eq!(blocks.len(), 3, "{status}");
        assert_eq!(
            blocks[0],
            "Reporting-MTA: dns; relay.contoso.local\r\n\
             X-Mailbridge-Queue-ID: 0190f3a2-7b1c-7e0a-9d3e-1234567890ab\r\n\
             Arrival-Date: Sat, 28 Nov 2026 01:02:03 +0000"
        );
        assert_eq!(
            blocks[1],
            "Final-Recipient: rfc822; a@example.com\r\n\
             Action: failed\r\n\
             Status: 5.7.60\r\n\
             Remote-MTA: dns; smtp.office365.com\r\n\
             Diagnostic-Code: smtp; 550 5.7.60 SMTP; Client does not have permissions to\r\n \
             send as this sender\r\n\
             Last-Attempt-Date: Sat, 28 Nov 2026 02:02:03 +0000"
        );
        assert!(blocks[2].starts_with("Final-Recipient: rfc822; b@example.com\r\n"));
        assert!(!status.contains("Will-Retry-Until"));

        let (h, orig) = &parts[2];
        assert!(h.starts_with("Content-Type: text/rfc822-headers\r\n"));
        assert_eq!(orig.as_bytes(), &HEADERS[..HEADERS.len() - 2]);
    }

    #[test]
    fn delayed_and_own_reason() {
        let mut d = sample(vec![DsnRecipient {
            address: "a@example.com".into(),
            action: Action::Delayed,
            reply: "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded".into(),
            remote_mta: Some("smtp.office365.com".into()),
        }]);
        let msg = build(&d);
        let (head, parts) = parse(&msg);
        assert!(head.contains("\r\nSubject: Delayed Mail (still being retried)\r\n"));
        let status = &parts[1].1;
        assert!(status.contains("\r\nAction: delayed\r\nStatus: 4.3.2\r\n"));
        assert!(status.contains("\r\nWill-Retry-Until: Thu, 03 Dec 2026 01:02:03 +0000\r\n"));
        assert!(parts[0].1.contains("until Thu, 03 Dec 2026 01:02:03 +0000"));

        d.recipients = vec![DsnRecipient {
            address: "a@example.com".into(),
            action: Action::Failed,
            reply: "4.4.7 delivery time expired after 5 days".into(),
            remote_mta: None,
        }];
        d.original_headers = b"";
        let msg = build(&d);
        assert_clean_lines(&msg);
        let (_, parts) = parse(&msg);
        assert_eq!(parts.len(), 2, "no headers part without headers");
        let status = &parts[1].1;
        assert!(status.contains(
            "\r\nStatus: 4.4.7\r\nDiagnostic-Code: X-Mailbridge; 4.4.7 delivery time expired after 5 days\r\n"
        ));
        assert!(!status.contains("Remote-MTA"));
        assert!(!status.contains("Will-Retry-Until"));
    }

    /// Status and Diagnostic-Code come from the typed reply's fields, not from re-reading a
    /// string: an enhanced status the upstream gave, or none.
    #[test]
    fn status_fields_come_from_the_typed_reply() {
        let typed = |code, enhanced: Option<&str>, text: &str| UpstreamReply {
            code,
            enhanced: enhanced.map(str::to_string),
            text: text.to_string(),
        };
        let msg = build(&sample(vec![
            DsnRecipient {
                address: "a@example.com".into(),
                action: Action::Failed,
                reply: typed(Some(554), Some("5.2.252"), "SendAsDenied; not allowed"),
                remote_mta: None,
            },
            DsnRecipient {
                address: "b@example.com".into(),
                action: Action::Failed,
                // Text that looks like a status is not one: the field is empty.
                reply: typed(Some(550), None, "5.7.60 looks like a status"),
                remote_mta: None,
            },
            DsnRecipient {
                address: "c@example.com".into(),
                action: Action::Failed,
                reply: typed(None, Some("4.4.7"), "delivery time expired"),
                remote_mta: None,
            },
        ]));
        let s = String::from_utf8(msg).unwrap();
        let (_, parts) = parse(s.as_bytes());
        let status = &parts[1].1;
        for want in [
            "Status: 5.2.252\r\nDiagnostic-Code: smtp; 554 5.2.252 SendAsDenied; not allowed",
            "Status: 5.0.0\r\nDiagnostic-Code: smtp; 550 5.7.60 looks like a status",
            "Status: 4.4.7\r\nDiagnostic-Code: X-Mailbridge; 4.4.7 delivery time expired",
        ] {
            assert!(status.contains(want), "{want}: {status}");
        }
    }

    #[test]
    fn status_codes() {
        use Action::*;
        let table = [
            (
                "550 5.7.60 SMTP; Client does not have permissions",
                Failed,
                "5.7.60",
            ),
            ("4.4.7 delivery time expired", Failed, "4.4.7"),
            ("550 no enhanced", Failed, "5.0.0"),
            ("451 x", Failed, "4.0.0"),
            ("451 x", Delayed, "4.0.0"),
            ("garbage", Failed, "5.0.0"),
            ("garbage", Delayed, "4.0.0"),
            ("", Failed, "5.0.0"),
            ("554 5.2.0 STOREDRV.Submission.Exception", Delayed, "4.2.0"),
            (
                "535-5.7.3 Authentication\r\n535 5.7.3 unsuccessful",
                Failed,
                "5.7.3",
            ),
            ("550", Failed, "5.0.0"),
            ("550 5.7.1234 too long detail", Failed, "5.0.0"),
            ("5.1.1 unknown", Failed, "5.1.1"),
            ("1.2.3 nonsense", Delayed, "4.0.0"),
            ("250 2.0.0 ok", Failed, "2.0.0"),
        ];
        for (reply, action, want) in table {
            assert_eq!(
                status_code(&UpstreamReply::parse(reply), action),
                want,
                "{reply:?} {action:?}"
            );
        }
    }

    #[test]
    fn multiline_reply_is_joined() {
        let join_reply = |s: &str| UpstreamReply::parse(s).to_string();
        assert_eq!(
            join_reply("550-5.7.60 first\r\n550-5.7.60 second\n550 5.7.60 third"),
            "550 5.7.60 first second third"
        );
        assert_eq!(join_reply("550-a\n550 b"), "550 a b");
        assert_eq!(
            join_reply("reason one\nreason two"),
            "reason one reason two"
        );
    }

    #[test]
    fn long_diagnostic_is_folded() {
        let long_words = format!("550 5.7.1 {}", "word ".repeat(600));
        let one_token = format!("550 5.7.1 {}", "x".repeat(5000));
        let utf8_token = format!("550 5.7.1 {}", "é".repeat(3000));
        let mut d = sample(vec![
            failed("a@example.com", &long_words),
            failed("b@example.com", &one_token),
            failed("c@example.com", &utf8_token),
        ]);
        let explanation = format!("{}\n{}\n\n{}", "why ".repeat(500), "y".repeat(3000), "end");
        d.explanation = &explanation;
        let long_header = format!(
            "Subject: {}\r\nX-Long: {}\nBare-LF: yes\r\n\r\n",
            "s ".repeat(1000),
            "z".repeat(3000)
        );
        d.original_headers = long_header.as_bytes();
        let msg = build(&d);
        assert_clean_lines(&msg);
        let (_, parts) = parse(&msg);
        // Unfolding gives the reply back (a space where an unbreakable token was cut).
        let status = parts[1].1.replace("\r\n ", " ");
        assert!(status.contains(&format!("Diagnostic-Code: smtp; {}", long_words.trim())));
        assert!(status.contains("Diagnostic-Code: smtp; 550 5.7.1 xxx"));
        let headers = &parts[2].1;
        assert!(headers.contains("\r\nBare-LF: yes\r\n"));
        assert_eq!(headers.replace("\r\n ", "").matches('z').count(), 3000);
        assert!(parts[0].1.contains("\r\nend\r\n"));
    }

    #[test]
    fn injection_is_neutralised() {
        let mut d = sample(vec![
            DsnRecipient {
                address: "a@example.com\r\nBcc: victim@example.net".into(),
                action: Action::Failed,
                reply: "550 5.1.1 no\r\n\r\nFinal-Recipient: rfc822; x@evil\rAction: delivered\n"
                    .into(),
                remote_mta: Some("mx\r\nX-Evil: 1".into()),
            },
            DsnRecipient {
                address: "müller@例え.jp".into(),
                action: Action::Failed,
                reply: "550 5.1.1 unknown\u{0}user".into(),
                remote_mta: None,
            },
        ]);
        d.to = "scanner@contoso.com>\r\nBcc: victim@example.net";
        d.from = "relay@contoso.com\nX-Injected: 1";
        d.message_id = "<x@y>\r\nX-Injected: 2";
        d.queue_id = "q1\r\nX-Injected: 3";
        let msg = build(&d);
        assert_clean_lines(&msg);
        let s = String::from_utf8(msg).unwrap();
        for line in s.split("\r\n") {
            assert!(!line.starts_with("Bcc:"), "{line}");
            assert!(!line.starts_with("X-Injected:"), "{line}");
            assert!(!line.starts_with("X-Evil:"), "{line}");
            assert!(!line.starts_with("Action: delivered"), "{line}");
            assert!(!line.contains('\0'));
        }
        let (head, parts) = parse(s.as_bytes());
        assert!(head.contains("\r\nTo: <scanner@contoso.com Bcc: victim@example.net>\r\n"));
        let status = &parts[1].1;
        assert_eq!(
            status
                .split("\r\n")
                .filter(|l| l.starts_with("Final-Recipient:"))
                .count(),
            2
        );
        assert!(status.contains("Final-Recipient: utf-8; m\\x{FC}ller@\\x{4F8B}\\x{3048}.jp\r\n"));
        assert!(parts[0].1.contains("<müller@例え.jp>"));
    }

    #[test]
    fn header_section_crlf() {
        let msg = b"From: a@b\r\nSubject: x\r\n\r\nbody line\r\n\r\nmore\r\n";
        let got = read_header_section(&mut &msg[..], 1024).unwrap();
        assert_eq!(got, b"From: a@b\r\nSubject: x\r\n\r\n");
        // A bare-LF empty line ends the section too; a body right away gives just the blank line.
        let got = read_header_section(&mut &b"A: 1\n\nbody"[..], 1024).unwrap();
        assert_eq!(got, b"A: 1\n\n");
        let got = read_header_section(&mut &b"\r\nbody"[..], 1024).unwrap();
        assert_eq!(got, b"\r\n");
    }

    #[test]
    fn header_section_limit() {
        let msg = b"From: a@b\r\nSubject: xxxxxxxxxx\r\nTo: c@d\r\n\r\nbody\r\n";
        let got = read_header_section(&mut &msg[..], 30).unwrap();
        assert_eq!(got, b"From: a@b\r\n");
        let got = read_header_section(&mut &msg[..], 33).unwrap();
        assert_eq!(got, b"From: a@b\r\nSubject: xxxxxxxxxx\r\n");
        let got = read_header_section(&mut &msg[..], 5).unwrap();
        assert!(got.is_empty());
        let got = read_header_section(&mut &msg[..], 43).unwrap();
        assert_eq!(got, &msg[..43]);
        // A slow reader (one byte per read) gives the same result.
        struct OneByte<'a>(&'a [u8]);
        impl Read for OneByte<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() || buf.is_empty() {
                    return Ok(0);
                }
                buf[0] = self.0[0];
                self.0 = &self.0[1..];
                Ok(1)
            }
        }
        let got = read_header_section(&mut OneByte(msg), 1024).unwrap();
        assert_eq!(got, &msg[..43]);
        // Large sections across several blocks.
        let big = format!("{}\r\nbody", "X-H: 0123456789\r\n".repeat(2000));
        let got = read_header_section(&mut big.as_bytes(), 1 << 20).unwrap();
        assert_eq!(got.len(), 2000 * 17 + 2);
        let got = read_header_section(&mut big.as_bytes(), 10_000).unwrap();
        assert_eq!(got.len(), 10_000 / 17 * 17);
    }

    #[test]
    fn header_section_without_body() {
        let msg = b"From: a@b\r\nSubject: x\r\n";
        assert_eq!(read_header_section(&mut &msg[..], 1024).unwrap(), msg);
        let msg = b"From: a@b\r\nSubject: no newline";
        assert_eq!(read_header_section(&mut &msg[..], 1024).unwrap(), msg);
        assert!(read_header_section(&mut &b""[..], 1024).unwrap().is_empty());
    }

    #[test]
    fn null_sender_and_boundary_uniqueness() {
        let mut d = sample(vec![failed("a@example.com", "550 5.1.1 unknown")]);
        d.original_sender = "";
        let a = build(&d);
        let b = build(&d);
        let (ha, pa) = parse(&a);
        let (hb, _) = parse(&b);
        assert_ne!(ha, hb, "a fresh boundary each time");
        assert!(pa[0].1.contains("Original sender: <> (the null sender)"));
    }

    #[test]
    fn dates() {
        assert_eq!(date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(date(1_795_827_723_999), "Sat, 28 Nov 2026 01:02:03 +0000");
        assert_eq!(date(u64::MAX), "Fri, 31 Dec 9999 23:59:59 +0000");
    }
}
