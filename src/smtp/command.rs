//! Pre-parse leniency for command lines from old senders, applied before smtp-proto sees the
//! (untrusted) line. Only one habit is forgiven: a MAIL/RCPT path without angle brackets
//! (`MAIL FROM:user@domain`), which RFC 5321 §4.1.2 does not allow but Postfix accepts by
//! default (`strict_rfc821_envelopes = no`) and some embedded SMTP stacks send. Everything
//! else is left for the parser to accept or refuse.

/// Characters that never appear in a bare path we are willing to bracket: delimiters of
/// RFC 5322 syntax (quotes, comments, lists, routes) and of the path itself. With any of
/// them the line is left as it is, and the parser refuses it as before.
const REFUSED: &[u8] = b"<>\"(),;:\\[]";

/// Returns the line with a bare MAIL/RCPT path put in angle brackets, or `None` when the
/// line is not such a command (then the caller parses it unchanged). `line` is one command
/// line including its line end.
///
/// The bare path must be one word with a non-empty local part and domain around one `@`,
/// of printable characters (UTF-8 allowed for SMTPUTF8), followed by nothing or by a space
/// and ESMTP parameters: `MAIL FROM:user@domain SIZE=100` becomes
/// `MAIL FROM:<user@domain> SIZE=100`.
pub fn bracket_bare_path(line: &[u8]) -> Option<Vec<u8>> {
    let prefix_len = if starts_with_ci(line, b"MAIL FROM:") {
        10
    } else if starts_with_ci(line, b"RCPT TO:") {
        8
    } else {
        return None;
    };
    let rest = &line[prefix_len..];
    // Spaces after the colon are a habit smtp-proto already forgives; keep them.
    let spaces = rest.iter().take_while(|&&c| c == b' ').count();
    let rest = &rest[spaces..];
    let end = rest
        .iter()
        .position(|&c| c == b' ' || c == b'\r' || c == b'\n')
        .unwrap_or(rest.len());
    let path = &rest[..end];
    if !is_bare_mailbox(path) {
        return None;
    }
    let mut out = Vec::with_capacity(line.len() + 2);
    out.extend_from_slice(&line[..prefix_len + spaces]);
    out.push(b'<');
    out.extend_from_slice(path);
    out.push(b'>');
    out.extend_from_slice(&rest[end..]);
    Some(out)
}

fn starts_with_ci(line: &[u8], prefix: &[u8]) -> bool {
    line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// `local@domain`, both parts non-empty, exactly one `@`, no delimiters, no controls.
fn is_bare_mailbox(path: &[u8]) -> bool {
    if path
        .iter()
        .any(|&c| c <= b' ' || c == 0x7f || REFUSED.contains(&c))
    {
        return false;
    }
    let mut parts = path.split(|&c| c == b'@');
    matches!(
        (parts.next(), parts.next(), parts.next()),
        (Some(local), Some(domain), None) if !local.is_empty() && !domain.is_empty()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(line: &str) -> Option<String> {
        bracket_bare_path(line.as_bytes()).map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn bare_paths_are_bracketed_with_parameters_kept() {
        assert_eq!(
            norm("MAIL FROM:a@lan.example\r\n").as_deref(),
            Some("MAIL FROM:<a@lan.example>\r\n")
        );
        assert_eq!(
            norm("mail from:a@lan.example SIZE=100 BODY=8BITMIME\r\n").as_deref(),
            Some("mail from:<a@lan.example> SIZE=100 BODY=8BITMIME\r\n")
        );
        assert_eq!(
            norm("RCPT TO: b@ext.example\n").as_deref(),
            Some("RCPT TO: <b@ext.example>\n")
        );
        assert_eq!(
            norm("rcpt to:jösé@ext.example\r\n").as_deref(),
            Some("rcpt to:<jösé@ext.example>\r\n")
        );
    }

    #[test]
    fn everything_else_is_left_to_the_parser() {
        for line in [
            "MAIL FROM:<a@lan.example>\r\n",
            "MAIL FROM: <a@lan.example>\r\n",
            "MAIL FROM:\r\n",
            "MAIL FROM:a\r\n",
            "MAIL FROM:@lan.example\r\n",
            "MAIL FROM:a@\r\n",
            "MAIL FROM:a@b@c\r\n",
            "MAIL FROM:\"a b\"@lan.example\r\n",
            "MAIL FROM:a@lan.example>\r\n",
            "MAIL FROM:a(x)@lan.example\r\n",
            "MAIL FROM:@relay:a@lan.example\r\n",
            "MAIL FROM:a,b@lan.example\r\n",
            "MAIL FROM:a@[127.0.0.1]\r\n",
            "MAIL FROM:a\x01@lan.example\r\n",
            "RCPT TO:postmaster\r\n",
            "MAIL TO:a@lan.example\r\n",
            "EHLO a@lan.example\r\n",
            "DATA\r\n",
        ] {
            assert_eq!(norm(line), None, "{line:?}");
        }
    }
}
