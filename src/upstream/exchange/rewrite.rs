//! `sender_rewrite: mailbox`: the header From becomes the sending mailbox and the original
//! From moves to Reply-To (unless the message already has one), so Exchange accepts mail
//! from devices whose sender address the mailbox has no SendAs right for (5.7.60).

/// The header section of `head` (up to and including the empty line) with From rewritten.
/// Folded header lines are kept together; a `Sender:` header is dropped (it would name
/// someone else than the mailbox). Bytes that are not in From/Sender are kept as they are.
pub fn rewrite_from(head: &[u8], mailbox: &str) -> Vec<u8> {
    // Split into fields (a field is a line plus its continuation lines).
    let mut fields: Vec<&[u8]> = Vec::new();
    let mut rest = head;
    let mut end: &[u8] = b"";
    while !rest.is_empty() {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|i| i + 2)
            .unwrap_or(rest.len());
        let line = &rest[..line_end];
        if line == b"\r\n" {
            end = rest;
            break;
        }
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if continuation && let Some(last) = fields.last_mut() {
            // Extend the previous field over this line: both are slices of `head`.
            let start = last.as_ptr() as usize - head.as_ptr() as usize;
            let new_end = (line.as_ptr() as usize - head.as_ptr() as usize) + line.len();
            *last = &head[start..new_end];
        } else {
            fields.push(line);
        }
        rest = &rest[line_end..];
    }
    let name_is = |f: &[u8], n: &str| {
        f.len() > n.len() && f[..n.len()].eq_ignore_ascii_case(n.as_bytes()) && f[n.len()] == b':'
    };
    let has_reply_to = fields.iter().any(|f| name_is(f, "Reply-To"));
    let mut out = Vec::with_capacity(head.len() + 64);
    let mut replaced = false;
    for f in &fields {
        if name_is(f, "From") {
            if !replaced {
                out.extend_from_slice(format!("From: <{mailbox}>\r\n").as_bytes());
                replaced = true;
            }
            if !has_reply_to {
                out.extend_from_slice(b"Reply-To:");
                out.extend_from_slice(&f[5..]);
            }
        } else if name_is(f, "Sender") {
            continue;
        } else {
            out.extend_from_slice(f);
        }
    }
    if !replaced {
        out.extend_from_slice(format!("From: <{mailbox}>\r\n").as_bytes());
    }
    out.extend_from_slice(end);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_moves_to_reply_to() {
        let h = b"Received: x\r\nFrom: Scanner 3rd floor\r\n <scan@printers.local>\r\nSender: x@y\r\nSubject: s\r\n\r\n";
        let out = rewrite_from(h, "relay@contoso.com");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Received: x\r\nFrom: <relay@contoso.com>\r\nReply-To: Scanner 3rd floor\r\n <scan@printers.local>\r\nSubject: s\r\n\r\n"
        );
    }

    #[test]
    fn existing_reply_to_is_kept() {
        let h = b"From: a@b\r\nReply-To: c@d\r\n\r\n";
        assert_eq!(
            rewrite_from(h, "m@x.com"),
            b"From: <m@x.com>\r\nReply-To: c@d\r\n\r\n".to_vec()
        );
    }

    #[test]
    fn missing_from_is_added() {
        assert_eq!(
            rewrite_from(b"Subject: s\r\n\r\n", "m@x.com"),
            b"Subject: s\r\nFrom: <m@x.com>\r\n\r\n".to_vec()
        );
        // No blank line (headers only, cut by a limit): still well formed up to there.
        assert_eq!(
            rewrite_from(b"From: a@b\r\n", "m@x.com"),
            b"From: <m@x.com>\r\nReply-To: a@b\r\n".to_vec()
        );
    }
}
