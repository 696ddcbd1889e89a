//! Trace and missing headers: the `Received:` line we prepend (RFC 5321 §4.4), and `Date:` /
//! `Message-ID:` for devices that leave them out (RFC 5322 §3.6 requires Date; many printers
//! omit both). Inputs here (HELO names, header bytes) are untrusted and are cleaned.

use std::time::SystemTime;

/// How much of the header section we look at for an existing Date/Message-ID.
pub const MAX_SCAN: usize = 64 * 1024;

/// Makes an untrusted name (HELO argument, AUTH identity) safe inside a `Received:` comment:
/// printable ASCII only, no comment/literal delimiters, at most 64 characters.
pub fn clean_token(raw: &str) -> String {
    let mut s: String = raw
        .chars()
        .take(64)
        .map(|c| match c {
            '(' | ')' | '[' | ']' | '\\' | ';' | '"' | '<' | '>' => '_',
            c if c.is_ascii_graphic() => c,
            _ => '?',
        })
        .collect();
    if raw.chars().count() > 64 {
        s.push_str("...");
    }
    if s.is_empty() {
        s.push_str("unknown");
    }
    s
}

/// RFC 5322 §3.3 date-time in UTC, e.g. `Fri, 27 Nov 2026 22:22:43 +0000`.
pub fn rfc5322_date(t: SystemTime) -> String {
    let http = httpdate::fmt_http_date(t); // "Fri, 27 Nov 2026 22:22:43 GMT"
    match http.strip_suffix(" GMT") {
        Some(base) => format!("{base} +0000"),
        None => http,
    }
}

/// What the scan of the header section found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Present {
    pub date: bool,
    pub message_id: bool,
}

/// Looks at the start of the content (CRLF-clean, as the DATA decoder produces it) and says
/// whether `Date:` and `Message-ID:` are there. Returns `None` while the header section has
/// not ended and fewer than [`MAX_SCAN`] bytes were seen. When the section is longer than that,
/// both count as present: adding a second Date would make the message invalid.
pub fn scan(content: &[u8], complete: bool) -> Option<Present> {
    let mut present = Present::default();
    let mut pos = 0;
    loop {
        let Some(rel) = content[pos..].windows(2).position(|w| w == b"\r\n") else {
            if complete {
                check_line(&content[pos..], &mut present);
                return Some(present);
            }
            if content.len() >= MAX_SCAN {
                return Some(Present {
                    date: true,
                    message_id: true,
                });
            }
            return None;
        };
        let line = &content[pos..pos + rel];
        if line.is_empty() {
            return Some(present); // end of the header section
        }
        if !check_line(line, &mut present) {
            return Some(present); // not a header field: the header section is over
        }
        pos += rel + 2;
        if pos >= MAX_SCAN {
            return Some(Present {
                date: true,
                message_id: true,
            });
        }
    }
}

/// Returns false if the line is neither a header field nor a continuation line.
fn check_line(line: &[u8], present: &mut Present) -> bool {
    if line.first().is_some_and(|&c| c == b' ' || c == b'\t') {
        return true;
    }
    let Some(colon) = line.iter().position(|&c| c == b':') else {
        return false;
    };
    let name = &line[..colon];
    let name = name.strip_suffix(b" ").unwrap_or(name);
    if name.is_empty() || !name.iter().all(|&c| (33..=126).contains(&c)) {
        return false;
    }
    if name.eq_ignore_ascii_case(b"date") {
        present.date = true;
    } else if name.eq_ignore_ascii_case(b"message-id") {
        present.message_id = true;
    }
    true
}

/// The addresses in the `From:` header field(s) of a header section (CRLF-clean, as the
/// DATA decoder produces it), for the sender policy (behaviour.md C34). Handles folding,
/// display names, quoted strings, comments and lists; returns them lowercased. An empty
/// result means there is no From (or nothing address-like in it).
pub fn from_addresses(head: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(head);
    let mut value: Option<String> = None;
    let mut values = Vec::new();
    for line in text.split("\r\n") {
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(v) = value.as_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if let Some(v) = value.take() {
            values.push(v);
        }
        if let Some((name, rest)) = line.split_once(':')
            && name.trim_end().eq_ignore_ascii_case("from")
        {
            value = Some(rest.trim().to_string());
        }
    }
    values.extend(value);
    let mut out = Vec::new();
    for v in values {
        for item in split_outside_quotes(&v) {
            let item = strip_comments(&item);
            let addr = match (item.rfind('<'), item.rfind('>')) {
                (Some(a), Some(b)) if a < b => item[a + 1..b].trim().to_string(),
                _ => item.trim().trim_matches('"').to_string(),
            };
            // A group "name: a, b;" leaves the group name in front of the first address.
            let addr = addr
                .rsplit(':')
                .next()
                .unwrap_or("")
                .trim()
                .trim_end_matches(';');
            if addr.contains('@') {
                out.push(addr.to_lowercase());
            }
        }
    }
    out
}

fn split_outside_quotes(v: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted, mut angle) = (Vec::new(), String::new(), false, 0i32);
    let mut escape = false;
    for c in v.chars() {
        if escape {
            cur.push(c);
            escape = false;
            continue;
        }
        match c {
            '\\' if quoted => escape = true,
            '"' => quoted = !quoted,
            '<' if !quoted => angle += 1,
            '>' if !quoted => angle -= 1,
            ',' if !quoted && angle <= 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        if c != '"' {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

fn strip_comments(s: &str) -> String {
    let mut depth = 0;
    s.chars()
        .filter(|&c| match c {
            '(' => {
                depth += 1;
                false
            }
            ')' if depth > 0 => {
                depth -= 1;
                false
            }
            _ => depth == 0,
        })
        .collect()
}

/// Facts for the `Received:` header.
pub struct TraceInfo<'a> {
    pub helo: &'a str,
    pub client_ip: std::net::IpAddr,
    pub hostname: &'a str,
    pub protocol: &'a str,
    pub queue_id: &'a str,
    pub auth_user: Option<&'a str>,
    pub single_rcpt: Option<&'a str>,
    pub now: SystemTime,
}

/// The headers mailbridge puts in front of the content: `Received:`, then `Date:` and
/// `Message-ID:` when the scan found them missing.
pub fn added_headers(t: &TraceInfo<'_>, present: Present) -> Vec<u8> {
    let date = rfc5322_date(t.now);
    let mut h = format!(
        "Received: from {} ([{}])\r\n\tby {} (mailbridge) with {} id {}",
        clean_token(t.helo),
        t.client_ip,
        clean_token(t.hostname),
        t.protocol,
        t.queue_id
    );
    if let Some(user) = t.auth_user {
        h.push_str(&format!(
            "\r\n\t(Authenticated sender: {})",
            clean_token(user)
        ));
    }
    if let Some(rcpt) = t.single_rcpt
        && rcpt.is_ascii()
        && rcpt.len() <= 256
        && !rcpt.contains(['\r', '\n', '>'])
    {
        h.push_str(&format!("\r\n\tfor <{rcpt}>"));
    }
    h.push_str(&format!("; {date}\r\n"));
    if !present.date {
        h.push_str(&format!("Date: {date}\r\n"));
    }
    if !present.message_id {
        h.push_str(&format!(
            "Message-ID: <{}@{}>\r\n",
            t.queue_id,
            clean_token(t.hostname)
        ));
    }
    h.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_headers_case_insensitively() {
        let p = scan(
            b"Subject: a\r\nDATE: x\r\nmessage-id: <a@b>\r\n\r\nbody",
            false,
        );
        assert_eq!(
            p,
            Some(Present {
                date: true,
                message_id: true
            })
        );
        let p = scan(b"Subject: a\r\n\r\nDate: in body\r\n", false).unwrap();
        assert!(!p.date);
        assert_eq!(scan(b"Subject: a\r\nDa", false), None);
        assert_eq!(scan(b"Subject: a", true), Some(Present::default()));
    }

    #[test]
    fn clean_token_strips_controls_and_limits_length() {
        assert_eq!(clean_token("printer\r\nX-Evil: 1"), "printer??X-Evil:?1");
        assert!(clean_token(&"a".repeat(10_000)).len() <= 67);
        assert_eq!(clean_token("héllo(x)"), "h?llo_x_");
    }

    #[test]
    fn from_addresses_of_common_shapes() {
        let f = |h: &str| from_addresses(h.as_bytes());
        assert_eq!(
            f("From: scanner@contoso.com\r\n\r\n"),
            ["scanner@contoso.com"]
        );
        assert_eq!(
            f("Subject: x\r\nFrom: \"Scanner, 3rd floor\" <Scan@Contoso.com>\r\n\r\n"),
            ["scan@contoso.com"]
        );
        assert_eq!(
            f("From: a@x.example (Printer), B <b@y.example>\r\n\r\n"),
            ["a@x.example", "b@y.example"]
        );
        assert_eq!(
            f("From: =?UTF-8?Q?St=C3=A9phane?=\r\n <s@x.example>\r\n\r\n"),
            ["s@x.example"]
        );
        assert_eq!(
            f("Subject: none\r\n\r\nFrom: body@x\r\n"),
            Vec::<String>::new()
        );
        assert_eq!(
            f("From: ceo@corp.example\r\nFrom: scanner@contoso.com\r\n\r\n"),
            ["ceo@corp.example", "scanner@contoso.com"]
        );
    }

    #[test]
    fn date_is_rfc5322() {
        let d = rfc5322_date(SystemTime::UNIX_EPOCH);
        assert_eq!(d, "Thu, 01 Jan 1970 00:00:00 +0000");
    }
}
