//! The client's header section and the headers we add: an incremental scan that finds the
//! end of the header section, `Date:`, `Message-ID:` and the `From:` fields; the `From:`
//! mailboxes for the sender policy (RFC 5322 parsing by mail-parser); the `Received:` line
//! we prepend (RFC 5321 §4.4), and `Date:` / `Message-ID:` for devices that leave them out
//! (RFC 5322 §3.6 requires Date; many printers omit both). Inputs here (HELO names, header
//! bytes) are untrusted: they are bounded, parsed without panics, and cleaned.

use std::time::SystemTime;

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

/// Where the header section ends, found as DATA content arrives (issue 8 §3.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadState {
    /// The header section has not ended yet: feed more content.
    Pending,
    /// The header section is `content[..end]`.
    Done { end: usize, present: Present },
    /// The header section is longer than the limit.
    TooBig,
}

/// Scans the header section (RFC 5322 §2.1: header fields up to the first empty line) as
/// the DATA content arrives. The position is kept between calls, so a client that trickles
/// its header one byte at a time costs linear work, not quadratic (issue 8 §3.7).
///
/// Lines that are neither a field nor a continuation do not end the section: lenient
/// parsers (mail-parser, and likely the upstream's) skip them and read on, so a `From:`
/// after one must be seen here too. A message without an empty line is all header section.
#[derive(Debug)]
pub struct HeaderScan {
    max: usize,
    /// Start of the first line not yet scanned.
    line_start: usize,
    /// Where the search for the end of that line goes on.
    searched: usize,
    present: Present,
    from_fields: usize,
    /// Content bytes looked at, in total (tests check that this grows linearly).
    work: usize,
}

impl HeaderScan {
    /// `max`: the longest header section accepted (`limits.max_header_size`).
    pub fn new(max: usize) -> HeaderScan {
        HeaderScan {
            max,
            line_start: 0,
            searched: 0,
            present: Present::default(),
            from_fields: 0,
            work: 0,
        }
    }

    /// Bytes looked at so far.
    pub fn work(&self) -> usize {
        self.work
    }

    /// `From:` fields seen so far (several are refused, RFC 5322 §3.6).
    pub fn from_fields(&self) -> usize {
        self.from_fields
    }

    /// `content` is everything received so far (CRLF-clean, as the DATA decoder produces
    /// it; it only grows between calls), `complete` says the data has ended.
    pub fn feed(&mut self, content: &[u8], complete: bool) -> HeadState {
        loop {
            let rest = &content[self.searched..];
            let Some(rel) = rest.iter().position(|&c| c == b'\n') else {
                self.work += rest.len();
                self.searched = content.len();
                if content.len() > self.max {
                    return HeadState::TooBig;
                }
                if complete {
                    let last = &content[self.line_start..];
                    self.work += last.len();
                    self.line(last);
                    return HeadState::Done {
                        end: content.len(),
                        present: self.present,
                    };
                }
                return HeadState::Pending;
            };
            self.work += rel + 1;
            let lf = self.searched + rel;
            let line = &content[self.line_start..lf];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                return HeadState::Done {
                    end: lf + 1,
                    present: self.present,
                };
            }
            self.work += line.len().min(MAX_NAME);
            self.line(line);
            self.line_start = lf + 1;
            self.searched = lf + 1;
            if self.line_start > self.max {
                return HeadState::TooBig;
            }
        }
    }

    fn line(&mut self, line: &[u8]) {
        if let Some(name) = field_name(line) {
            if name.eq_ignore_ascii_case(b"date") {
                self.present.date = true;
            } else if name.eq_ignore_ascii_case(b"message-id") {
                self.present.message_id = true;
            } else if name.eq_ignore_ascii_case(b"from") {
                self.from_fields += 1;
            }
        }
    }
}

/// Field names longer than this are not looked at (the longest registered name is 44).
const MAX_NAME: usize = 80;

/// The name of a header field line (`Name:` or `Name :`), or `None` for a continuation
/// line or a line that is not a field.
fn field_name(line: &[u8]) -> Option<&[u8]> {
    if line.first().is_some_and(|&c| c == b' ' || c == b'\t') {
        return None;
    }
    let colon = line.iter().take(MAX_NAME).position(|&c| c == b':')?;
    let name = line[..colon].trim_ascii_end();
    (!name.is_empty() && name.iter().all(|&c| (33..=126).contains(&c))).then_some(name)
}

/// Why a header `From:` cannot be checked against the sender patterns (issue 8 §3.2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FromProblem {
    /// RFC 5322 §3.6 allows one `From:`; a rewrite or a check of the first would miss the
    /// others.
    #[error("{0} From header fields (RFC 5322 allows one)")]
    Several(usize),
    /// The field is not a list of mailboxes with an addr-spec each (`From: Scanner`,
    /// `From: <>`, an empty group), or the parser and the line scan disagree about it.
    #[error("the From header field does not parse into mailboxes")]
    NotMailboxes,
}

/// The addr-specs of the `From:` field in a header section (`head` as [`HeaderScan`]
/// delimited it; `from_fields` is its count of `From:` lines), parsed with mail-parser's
/// RFC 5322 address parser: display names, quoted strings, comments (with `"` or `<` in
/// them), groups and encoded words are handled there, and only the clean addr-spec is
/// returned. No `From:` at all gives an empty list.
pub fn header_from(head: &[u8], from_fields: usize) -> Result<Vec<String>, FromProblem> {
    use mail_parser::{HeaderName, HeaderValue, MessageParser};
    // mail-parser wants the empty line that ends the section; a message without one ends
    // with its last header line.
    let owned;
    let input: &[u8] = if head.ends_with(b"\r\n\r\n") || head == b"\r\n" {
        head
    } else {
        let mut v = head.to_vec();
        if !v.ends_with(b"\r\n") {
            v.extend_from_slice(b"\r\n");
        }
        v.extend_from_slice(b"\r\n");
        owned = v;
        &owned
    };
    let parsed = MessageParser::new().parse_headers(input);
    let values: Vec<&HeaderValue<'_>> = parsed
        .as_ref()
        .map(|m| m.header_values(HeaderName::From).collect())
        .unwrap_or_default();
    // Both views count: a field one of them misses is not checked by it.
    let fields = values.len().max(from_fields);
    if fields > 1 {
        return Err(FromProblem::Several(fields));
    }
    if fields == 0 {
        return Ok(Vec::new());
    }
    let [HeaderValue::Address(address)] = values.as_slice() else {
        return Err(FromProblem::NotMailboxes);
    };
    let mut out = Vec::new();
    for addr in address.iter() {
        let spec = addr.address.as_deref().unwrap_or("").trim();
        let ok = spec
            .rsplit_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty())
            && !spec
                .contains(|c: char| c.is_whitespace() || c.is_control() || "<>\"()".contains(c));
        if !ok {
            return Err(FromProblem::NotMailboxes);
        }
        out.push(spec.to_string());
    }
    if out.is_empty() {
        return Err(FromProblem::NotMailboxes);
    }
    Ok(out)
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

    fn scan_all(content: &[u8], complete: bool) -> (HeadState, usize) {
        let mut scan = HeaderScan::new(256 * 1024);
        let state = scan.feed(content, complete);
        (state, scan.from_fields())
    }

    #[test]
    fn scan_finds_headers_case_insensitively() {
        let both = Present {
            date: true,
            message_id: true,
        };
        let msg = b"Subject: a\r\nDATE: x\r\nmessage-id: <a@b>\r\n\r\nbody";
        assert_eq!(
            scan_all(msg, false).0,
            HeadState::Done {
                end: msg.len() - 4,
                present: both
            }
        );
        let (state, _) = scan_all(b"Subject: a\r\n\r\nDate: in body\r\n", false);
        assert!(matches!(state, HeadState::Done { end: 14, present } if !present.date));
        assert_eq!(scan_all(b"Subject: a\r\nDa", false).0, HeadState::Pending);
        assert_eq!(
            scan_all(b"Subject: a\r\n", true).0,
            HeadState::Done {
                end: 12,
                present: Present::default()
            }
        );
        // A line that is not a field does not end the section.
        let (state, froms) = scan_all(b"junk line\r\nFrom: a@b.example\r\nDate: x\r\n\r\n", false);
        assert!(matches!(state, HeadState::Done { present, .. } if present.date));
        assert_eq!(froms, 1);
    }

    #[test]
    fn scan_refuses_a_header_section_over_the_limit() {
        let mut scan = HeaderScan::new(100);
        let mut msg = b"X-A: ".to_vec();
        msg.extend_from_slice(&[b'a'; 90]);
        msg.extend_from_slice(b"\r\n");
        assert_eq!(scan.feed(&msg, false), HeadState::Pending);
        msg.extend_from_slice(b"X-B: b\r\n");
        assert_eq!(scan.feed(&msg, false), HeadState::TooBig);
        // Without any line end too.
        assert_eq!(
            HeaderScan::new(100).feed(&[b'x'; 101], false),
            HeadState::TooBig
        );
        // Exactly at the limit is fine.
        let mut ok = vec![b'X', b':'];
        ok.extend_from_slice(&[b'a'; 96]);
        ok.extend_from_slice(b"\r\n\r\n");
        assert!(matches!(
            HeaderScan::new(100).feed(&ok, false),
            HeadState::Done { end: 102, .. }
        ));
    }

    #[test]
    fn clean_token_strips_controls_and_limits_length() {
        assert_eq!(clean_token("printer\r\nX-Evil: 1"), "printer??X-Evil:?1");
        assert!(clean_token(&"a".repeat(10_000)).len() <= 67);
        assert_eq!(clean_token("héllo(x)"), "h?llo_x_");
    }

    fn from(h: &str) -> Result<Vec<String>, FromProblem> {
        let mut scan = HeaderScan::new(256 * 1024);
        match scan.feed(h.as_bytes(), true) {
            HeadState::Done { end, .. } => header_from(&h.as_bytes()[..end], scan.from_fields()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn header_from_of_common_shapes() {
        assert_eq!(
            from("From: scanner@contoso.com\r\n\r\n").unwrap(),
            ["scanner@contoso.com"]
        );
        assert_eq!(
            from("Subject: x\r\nFrom: \"Scanner, 3rd floor\" <Scan@Contoso.com>\r\n\r\n").unwrap(),
            ["Scan@Contoso.com"]
        );
        assert_eq!(
            from("From: a@x.example (Printer), B <b@y.example>\r\n\r\n").unwrap(),
            ["a@x.example", "b@y.example"]
        );
        assert_eq!(
            from("From: =?UTF-8?Q?St=C3=A9phane?=\r\n <s@x.example>\r\n\r\n").unwrap(),
            ["s@x.example"]
        );
        assert_eq!(
            from("Subject: none\r\n\r\nFrom: body@x\r\n").unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            from("Subject: no blank line\r\nFrom: a@x.example\r\n").unwrap(),
            ["a@x.example"]
        );
    }

    #[test]
    fn header_from_of_the_security_review_inputs() {
        // Issue 8 §3.2: each must yield ceo@corp.example (or be refused), never only
        // the harmless address.
        assert_eq!(
            from("From: ceo@corp.example (\"), x@printers.corp.example\r\n\r\n").unwrap(),
            ["ceo@corp.example", "x@printers.corp.example"]
        );
        assert_eq!(
            from("From: (<) ceo@corp.example, x@printers.corp.example\r\n\r\n").unwrap(),
            ["ceo@corp.example", "x@printers.corp.example"]
        );
        assert_eq!(
            from("From: <ceo@corp.example> \"<scanner@ok.example>\"\r\n\r\n").unwrap(),
            ["ceo@corp.example"]
        );
        let r = from("From: ceo@corp.example <>\r\n\r\n");
        assert!(
            r.as_ref().is_err_and(|e| *e == FromProblem::NotMailboxes)
                || r.as_ref()
                    .is_ok_and(|a| a.iter().any(|a| a == "ceo@corp.example")),
            "{r:?}"
        );
        assert_eq!(
            from("From: ceo@corp.example\r\nFrom: scanner@contoso.com\r\n\r\n"),
            Err(FromProblem::Several(2))
        );
        assert_eq!(
            from("From: ceo@corp.example\r\nfrom : scanner@contoso.com\r\n\r\n"),
            Err(FromProblem::Several(2))
        );
        for bad in [
            "From: Scanner\r\n\r\n",
            "From: <>\r\n\r\n",
            "From: undisclosed-recipients:;\r\n\r\n",
            "From:\r\n\r\n",
        ] {
            assert_eq!(from(bad), Err(FromProblem::NotMailboxes), "{bad:?}");
        }
    }

    #[test]
    fn header_scan_is_linear_for_a_byte_trickling_client() {
        // 2,000 header lines (about 80 KiB), then the body: fed one byte at a time, as a
        // client trickling bytes makes the session feed it.
        let mut msg = Vec::new();
        for i in 0..2_000 {
            msg.extend_from_slice(format!("X-Filler-{i:04}: {}\r\n", "y".repeat(24)).as_bytes());
        }
        msg.extend_from_slice(b"Date: x\r\n\r\nbody\r\n");
        let mut scan = HeaderScan::new(256 * 1024);
        let mut state = HeadState::Pending;
        for n in 1..=msg.len() {
            state = scan.feed(&msg[..n], false);
            if state != HeadState::Pending {
                break;
            }
        }
        // Each byte is looked at a small constant number of times, not once per feed.
        assert!(
            scan.work() <= 3 * msg.len(),
            "{} bytes looked at for {} bytes of content",
            scan.work(),
            msg.len()
        );
        let end = msg.len() - b"body\r\n".len();
        assert_eq!(
            state,
            HeadState::Done {
                end,
                present: Present {
                    date: true,
                    message_id: false
                }
            }
        );
    }

    #[test]
    fn date_is_rfc5322() {
        let d = rfc5322_date(SystemTime::UNIX_EPOCH);
        assert_eq!(d, "Thu, 01 Jan 1970 00:00:00 +0000");
    }
}
