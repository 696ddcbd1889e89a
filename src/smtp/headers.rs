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
    fn date_is_rfc5322() {
        let d = rfc5322_date(SystemTime::UNIX_EPOCH);
        assert_eq!(d, "Thu, 01 Jan 1970 00:00:00 +0000");
    }
}
