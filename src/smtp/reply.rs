//! Every reply the server sends, by name (RFC 5321 §4.2 codes with RFC 3463 enhanced codes).
//! Server code never writes a bare number: it picks one of these or builds one with `Reply::new`.

use std::borrow::Cow;

/// One SMTP reply: code, enhanced status code and text. Multi-line replies (EHLO) are built
/// with [`Reply::multiline`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: &'static str,
    pub text: Cow<'static, str>,
}

impl Reply {
    pub const fn fixed(code: u16, enhanced: &'static str, text: &'static str) -> Reply {
        Reply {
            code,
            enhanced,
            text: Cow::Borrowed(text),
        }
    }

    pub fn new(code: u16, enhanced: &'static str, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            enhanced,
            text: text.into(),
        }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// Appends the wire form (`250 2.0.0 text\r\n`) to `out`. Control characters in the text
    /// are replaced so a reply can never span lines it did not mean to.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.code.to_string().as_bytes());
        out.push(b' ');
        if !self.enhanced.is_empty() {
            out.extend_from_slice(self.enhanced.as_bytes());
            out.push(b' ');
        }
        push_clean(out, &self.text);
        out.extend_from_slice(b"\r\n");
    }

    /// A multi-line reply (RFC 5321 §4.2.1): `code-line` for all but the last line.
    /// Used for EHLO, whose lines carry no enhanced code (RFC 2034 §3).
    pub fn multiline(code: u16, lines: &[String], out: &mut Vec<u8>) {
        for (i, line) in lines.iter().enumerate() {
            out.extend_from_slice(code.to_string().as_bytes());
            out.push(if i + 1 == lines.len() { b' ' } else { b'-' });
            push_clean(out, line);
            out.extend_from_slice(b"\r\n");
        }
    }
}

fn push_clean(out: &mut Vec<u8>, text: &str) {
    for b in text.bytes() {
        out.push(if b < 0x20 || b == 0x7f { b' ' } else { b });
    }
}

// 2xx
pub const OK: Reply = Reply::fixed(250, "2.0.0", "Ok");
pub const MAIL_OK: Reply = Reply::fixed(250, "2.1.0", "Sender ok");
pub const RCPT_OK: Reply = Reply::fixed(250, "2.1.5", "Recipient ok");
pub const RESET_OK: Reply = Reply::fixed(250, "2.0.0", "Reset");
pub const NOOP_OK: Reply = Reply::fixed(250, "2.0.0", "Ok");
pub const BYE: Reply = Reply::fixed(221, "2.0.0", "Bye");
pub const VRFY_CANNOT: Reply = Reply::fixed(
    252,
    "2.5.0",
    "Cannot VRFY user, but will accept message and attempt delivery",
);
pub const HELP: Reply = Reply::fixed(
    214,
    "2.0.0",
    "mailbridge: EHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT",
);
pub const READY_FOR_TLS: Reply = Reply::fixed(220, "2.0.0", "Ready to start TLS");
// 3xx
pub const START_DATA: Reply = Reply::fixed(354, "", "End data with <CR><LF>.<CR><LF>");
// 4xx
pub const SHUTTING_DOWN: Reply =
    Reply::fixed(421, "4.3.2", "Service shutting down, try again later");
pub const TOO_MANY_CONNECTIONS: Reply =
    Reply::fixed(421, "4.7.0", "Too many connections, try again later");
pub const TOO_MANY_FROM_IP: Reply = Reply::fixed(
    421,
    "4.7.0",
    "Too many connections from your address, try again later",
);
pub const TOO_MANY_ERRORS: Reply =
    Reply::fixed(421, "4.7.0", "Too many errors, closing connection");
pub const TIMEOUT: Reply = Reply::fixed(421, "4.4.2", "Timeout exceeded, closing connection");
/// `limits.max_session_age` reached (issue 8 §3.3).
pub const SESSION_TOO_OLD: Reply = Reply::fixed(
    421,
    "4.7.0",
    "Session time limit reached, closing connection",
);
/// `limits.max_junk_commands` reached: EHLO/NOOP/RSET/VRFY/HELP without a message.
pub const TOO_MANY_JUNK_COMMANDS: Reply = Reply::fixed(
    421,
    "4.7.0",
    "Too many commands without mail, closing connection",
);
pub const STORAGE_FULL: Reply =
    Reply::fixed(452, "4.3.1", "Insufficient system storage, try again later");
pub const TOO_MANY_RECIPIENTS: Reply = Reply::fixed(452, "4.5.3", "Too many recipients");
pub const LOCAL_ERROR: Reply =
    Reply::fixed(451, "4.3.0", "Local error in processing, try again later");
// 5xx
pub const LINE_TOO_LONG: Reply = Reply::fixed(500, "5.5.2", "Line too long");
pub const UNRECOGNIZED: Reply = Reply::fixed(500, "5.5.2", "Command unrecognized");
pub const NUL_IN_COMMAND: Reply = Reply::fixed(500, "5.5.2", "NUL character in command");
pub const NOT_IMPLEMENTED: Reply = Reply::fixed(502, "5.5.1", "Command not implemented");
pub const TLS_ALREADY_ACTIVE: Reply = Reply::fixed(503, "5.5.1", "TLS already active");
pub const BAD_SEQUENCE_HELO: Reply = Reply::fixed(503, "5.5.1", "Send HELO/EHLO first");
pub const BAD_SEQUENCE_MAIL: Reply = Reply::fixed(503, "5.5.1", "Send MAIL first");
pub const BAD_SEQUENCE_NESTED_MAIL: Reply = Reply::fixed(503, "5.5.1", "Sender already specified");
pub const BAD_SEQUENCE_RCPT: Reply = Reply::fixed(503, "5.5.1", "Send RCPT first");
pub const NO_VALID_RECIPIENTS: Reply = Reply::fixed(554, "5.5.1", "No valid recipients");
pub const IMPROPER_PIPELINING: Reply =
    Reply::fixed(554, "5.5.0", "Improper use of SMTP command pipelining");
pub const BAD_SENDER_SYNTAX: Reply = Reply::fixed(501, "5.1.7", "Bad sender address syntax");
pub const BAD_RECIPIENT_SYNTAX: Reply = Reply::fixed(501, "5.1.3", "Bad recipient address syntax");
pub const QUOTED_LOCAL_PART: Reply = Reply::fixed(
    553,
    "5.1.3",
    "Quoted local parts are not supported by this relay",
);
pub const RECIPIENT_NEEDS_DOMAIN: Reply = Reply::fixed(
    550,
    "5.1.1",
    "Recipient needs a domain: this relay has no local mailboxes",
);
pub const ADDRESS_NOT_UTF8: Reply = Reply::fixed(
    501,
    "5.5.4",
    "Address is not valid UTF-8 (RFC 6531 section 3.3)",
);
pub const UTF8_NEEDS_SMTPUTF8: Reply = Reply::fixed(
    553,
    "5.6.7",
    "Non-ASCII address requires the SMTPUTF8 parameter",
);
pub const SIZE_EXCEEDED: Reply = Reply::fixed(
    552,
    "5.3.4",
    "Message size exceeds the fixed maximum message size",
);
pub const LINE_OVER_998: Reply = Reply::fixed(
    554,
    "5.6.0",
    "Message has a line longer than 998 octets (RFC 5322 section 2.1.1): re-encode it",
);
pub const NUL_IN_DATA: Reply = Reply::fixed(
    554,
    "5.6.0",
    "Message contains NUL characters: send it with a MIME encoding",
);
pub const BARE_LF: Reply = Reply::fixed(
    550,
    "5.5.2",
    "Error: bare <LF> received; lines must end with <CR><LF>",
);
pub const AUTH_REQUIRED: Reply = Reply::fixed(530, "5.7.0", "Authentication required");
pub const SENDER_NOT_ALLOWED: Reply = Reply::fixed(
    553,
    "5.7.1",
    "Sender address not allowed for this client or user",
);
pub const HEADER_FROM_NOT_ALLOWED: Reply = Reply::fixed(
    550,
    "5.7.1",
    "Header From address not allowed for this client or user",
);
/// Issue 8 §3.2: RFC 5322 §3.6 allows one From field.
pub const SEVERAL_HEADER_FROM: Reply =
    Reply::fixed(550, "5.7.1", "Message has more than one From header field");
pub const HEADER_FROM_NOT_MAILBOXES: Reply = Reply::fixed(
    550,
    "5.7.1",
    "Header From does not parse into mailboxes (expected e.g. Name <user@example.com>)",
);
pub const RELAY_DENIED: Reply = Reply::fixed(
    554,
    "5.7.1",
    "Access denied: your address may not relay through this server",
);

// Replies that carry a value.

/// The greeting (RFC 5321 §4.3.1); no enhanced code before EHLO.
pub fn greeting(hostname: &str) -> Reply {
    Reply::new(220, "", format!("{hostname} ESMTP mailbridge ready"))
}

/// HELO's reply: no enhanced code (RFC 2034 applies to EHLO sessions).
pub fn helo_ok(hostname: &str) -> Reply {
    Reply::new(250, "", hostname.to_string())
}

/// EHLO's multi-line reply: the first line names us, the others list extensions.
pub fn ehlo(lines: &[String], out: &mut Vec<u8>) {
    Reply::multiline(250, lines, out);
}

/// `limits.max_header_size` exceeded (issue 8 §3.2). The header section is everything up
/// to the first empty line, so a message without one counts whole.
pub fn header_too_big(max: usize) -> Reply {
    Reply::new(
        550,
        "5.7.1",
        format!("Header section exceeds {max} bytes, or no empty line ends it"),
    )
}

/// The reply that acknowledges a durable message.
pub fn queued(id: &str) -> Reply {
    Reply::new(250, "2.0.0", format!("Ok: queued as {id}"))
}

pub fn syntax(syntax: &str) -> Reply {
    Reply::new(501, "5.5.4", format!("Syntax: {syntax}"))
}

pub fn invalid_parameter(param: &str) -> Reply {
    Reply::new(501, "5.5.4", format!("Invalid {param} parameter"))
}

/// `param` comes from the client: the caller cleans it.
pub fn unsupported_parameter(param: &str) -> Reply {
    Reply::new(555, "5.5.4", format!("Unsupported parameter {param}"))
}

pub const SYNTAX_ERROR: Reply = Reply::fixed(501, "5.5.4", "Syntax error");
pub const BINARYMIME_UNSUPPORTED: Reply =
    Reply::fixed(555, "5.5.4", "BODY=BINARYMIME is not supported");

// AUTH (RFC 4954 §4 and §6).
pub const AUTH_OK: Reply = Reply::fixed(235, "2.7.0", "Authentication successful");
pub const AUTH_FAILED: Reply = Reply::fixed(535, "5.7.8", "Authentication credentials invalid");
pub const AUTH_CANCELLED: Reply = Reply::fixed(501, "5.0.0", "Authentication cancelled");
pub const AUTH_BAD_BASE64: Reply = Reply::fixed(501, "5.5.2", "Cannot decode the base64 response");
/// Decodes, but is not what the mechanism expects (RFC 4616 §2), or is not UTF-8.
pub const AUTH_MALFORMED: Reply = Reply::fixed(501, "5.5.2", "Malformed authentication response");
pub const AUTH_LINE_TOO_LONG: Reply =
    Reply::fixed(500, "5.5.6", "Authentication exchange line is too long");
pub const AUTH_MECH_UNKNOWN: Reply = Reply::fixed(504, "5.5.4", "Unrecognized authentication type");
pub const AUTH_TOO_MANY_FAILURES: Reply = Reply::fixed(
    421,
    "4.7.0",
    "Too many authentication failures, try again later",
);
/// RFC 4954 §6: no password check could be run in time (every argon2 slot stayed busy).
pub const AUTH_BUSY: Reply = Reply::fixed(
    454,
    "4.7.0",
    "Temporary authentication failure, try again later",
);
pub const AUTH_ALREADY: Reply = Reply::fixed(503, "5.5.1", "Already authenticated");
pub const AUTH_IN_TRANSACTION: Reply =
    Reply::fixed(503, "5.5.1", "AUTH not permitted during a mail transaction");
pub const AUTH_NEEDS_TLS: Reply = Reply::fixed(530, "5.7.0", "Must issue a STARTTLS command first");

/// A SASL challenge, `334 <base64>` (RFC 4954 §4); no enhanced code on 334.
pub const fn auth_challenge(base64: &'static str) -> Reply {
    Reply::fixed(334, "", base64)
}
