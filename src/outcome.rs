//! The typed outcome of one delivery attempt for one recipient: the upstream's reply (code,
//! enhanced status, text), the step it answered, the verdict, and the diagnosed problem with
//! its meaning and remedy. Upstreams produce it, the spool stores it (state journal), and
//! DSNs, logs and the admin views read its fields; nothing re-parses a stored reply string.
//!
//! Trust boundary: the reply text comes from the upstream (or from whatever sits on the
//! network path) and is untrusted. [`UpstreamReply::parse`] is the one parser for it; it
//! reads an enhanced status code only at the start of the text (RFC 3463 §2, RFC 2034 §4), so
//! an echoed address such as `<5.7.139@x.example>` never becomes a status. Consumers still
//! clean the text for the place they put it (a header, a log field).
//!
//! The generic parts (reply, step, verdict) know no upstream type: Exchange's phrases stay in
//! `upstream::exchange::classify`, which fills [`Diagnosis`]. An upstream whose "reply" is
//! not SMTP (an HTTP API) leaves `code` empty and puts its own status in `text`.

use serde::{Deserialize, Serialize};

/// Upstream reply codes the relay acts on, by name (RFC 5321 §4.2.2, RFC 4954 §6). Upstream
/// specific codes (Exchange's 430, 432) are named next to their classifier.
pub mod code {
    /// `250`: requested action completed.
    pub const OK: u16 = 250;
    /// `334`: AUTH continuation (RFC 4954 §4).
    pub const AUTH_CONTINUE: u16 = 334;
    /// `501`: syntax error in parameters or arguments.
    pub const SYNTAX_ERROR_PARAMS: u16 = 501;
    /// `530`: authentication required (RFC 4954 §6).
    pub const AUTH_REQUIRED: u16 = 530;
    /// `534`: authentication mechanism is too weak (RFC 4954 §6).
    pub const AUTH_TOO_WEAK: u16 = 534;
    /// `535`: authentication credentials invalid (RFC 4954 §6).
    pub const AUTH_INVALID: u16 = 535;
}

/// Where in the session a reply (or error) happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Connect,
    Greeting,
    Ehlo,
    #[serde(rename = "tls")]
    StartTls,
    Auth,
    Mail,
    Rcpt,
    Data,
    /// The reply to the final dot.
    Dot,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Connect => "connect",
            Step::Greeting => "greeting",
            Step::Ehlo => "EHLO",
            Step::StartTls => "STARTTLS",
            Step::Auth => "AUTH",
            Step::Mail => "MAIL FROM",
            Step::Rcpt => "RCPT TO",
            Step::Data => "DATA",
            Step::Dot => "end of data",
        }
    }
}

/// A reply as parsed: `550 5.7.60 SMTP; Client does not ...` gives code 550, enhanced
/// `5.7.60` and the text after it. Our own reasons (`4.4.7 delivery time expired`) have no
/// code; connection errors may have neither.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    /// RFC 3463 `class.subject.detail`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enhanced: Option<String>,
    #[serde(default)]
    pub text: String,
}

/// The 3-digit reply code at the start of `s` (`550 x`, `550-x`, `550`), if any.
fn basic_code(s: &str) -> Option<u16> {
    let b = s.as_bytes();
    if b.len() >= 3
        && (b'2'..=b'5').contains(&b[0])
        && b[1].is_ascii_digit()
        && b[2].is_ascii_digit()
        && (b.len() == 3 || b[3] == b' ' || b[3] == b'-')
    {
        s[..3].parse().ok()
    } else {
        None
    }
}

/// `class.subject.detail` with class 2, 4 or 5 and 1-3 digits each (RFC 3463 §2).
fn is_enhanced(t: &str) -> bool {
    let mut parts = t.split('.');
    let (Some(c), Some(s), Some(d), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let digits = |x: &str| (1..=3).contains(&x.len()) && x.bytes().all(|b| b.is_ascii_digit());
    matches!(c, "2" | "4" | "5") && digits(s) && digits(d)
}

/// Splits an enhanced status code off the start of `text` (the reply without its code).
fn split_enhanced(text: &str) -> (Option<&str>, &str) {
    let t = text.trim_start();
    let first = t.split_whitespace().next().unwrap_or("");
    if is_enhanced(first) {
        (Some(first), t[first.len()..].trim_start())
    } else {
        (None, t)
    }
}

/// Lines split at CRLF, LF or a lone CR.
pub(crate) fn split_lines(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(p) = rest.find(['\r', '\n']) {
        out.push(&rest[..p]);
        let skip = if rest[p..].starts_with("\r\n") { 2 } else { 1 };
        rest = &rest[p + skip..];
    }
    out.push(rest);
    out
}

impl UpstreamReply {
    /// The one reply parser. Accepts a whole reply (`550 5.7.1 text`), a multi-line reply
    /// (`550-5.7.1 a\r\n550 5.7.1 b`, joined into one text: continuation lines lose the code
    /// and enhanced code when they repeat the first line's, RFC 5321 §4.2.1), or our own
    /// reason without a code (`4.4.7 delivery time expired`).
    pub fn parse(reply: &str) -> UpstreamReply {
        let mut lines = split_lines(reply.trim_matches(['\r', '\n'])).into_iter();
        let first = lines.next().unwrap_or("");
        let code = basic_code(first);
        let rest = match code {
            Some(_) => first[3..].trim_start_matches(['-', ' ']),
            None => first,
        };
        let (enhanced, text) = split_enhanced(rest);
        let mut text = text.trim_end().to_string();
        for line in lines {
            let mut rest = line;
            if let Some(c) = code
                && basic_code(line) == Some(c)
            {
                rest = line[3..].trim_start_matches(['-', ' ']);
                if let Some(e) = enhanced
                    && let Some(after) = rest.strip_prefix(e)
                    && (after.is_empty() || after.starts_with(' '))
                {
                    rest = after;
                }
            }
            let rest = rest.trim();
            if !rest.is_empty() {
                if !text.is_empty() {
                    text.push(' ');
                }
                text.push_str(rest);
            }
        }
        UpstreamReply {
            code,
            enhanced: enhanced.map(str::to_string),
            text,
        }
    }

    /// A reply whose code was read separately: `text` is what followed the code.
    pub fn from_parts(code: u16, text: &str) -> UpstreamReply {
        let (enhanced, text) = split_enhanced(text);
        UpstreamReply {
            code: Some(code),
            enhanced: enhanced.map(str::to_string),
            text: text.trim_end().to_string(),
        }
    }

    /// The reply class digit (2, 4, 5): from the code, else from the enhanced status.
    pub fn class(&self) -> Option<u8> {
        match (self.code, &self.enhanced) {
            (Some(c), _) => Some((c / 100) as u8),
            (None, Some(e)) => e.as_bytes().first().map(|b| b - b'0'),
            (None, None) => None,
        }
    }

    /// 2xx/3xx: the step succeeded.
    pub fn is_positive(&self) -> bool {
        self.code.is_some_and(|c| (200..400).contains(&c))
    }

    /// The text after the enhanced status, as the upstream wrote it.
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Display for UpstreamReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut sep = "";
        if let Some(c) = self.code {
            write!(f, "{c}")?;
            sep = " ";
        }
        if let Some(e) = &self.enhanced {
            write!(f, "{sep}{e}")?;
            sep = " ";
        }
        if !self.text.is_empty() {
            write!(f, "{sep}{}", self.text)?;
        }
        Ok(())
    }
}

impl From<&str> for UpstreamReply {
    fn from(s: &str) -> UpstreamReply {
        UpstreamReply::parse(s)
    }
}

impl From<String> for UpstreamReply {
    fn from(s: String) -> UpstreamReply {
        UpstreamReply::parse(&s)
    }
}

/// What the attempt decided for the recipient. Times are milliseconds since the Unix epoch;
/// an upstream leaves them 0 and the delivery worker fills in when the next attempt is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Verdict {
    Delivered,
    /// Try again at `until_ms` (a 4xx, a connection or local error).
    Deferred {
        #[serde(default)]
        until_ms: u64,
    },
    /// Permanent failure: no more attempts, a DSN goes to the sender.
    Bounced,
    /// The upstream is paused (a configuration problem every message would hit) until a
    /// probe succeeds; the next probe is due at `until_ms`.
    Paused {
        #[serde(default)]
        until_ms: u64,
    },
    /// The upstream is held (a quota, a limit) until `until_ms`.
    Held {
        #[serde(default)]
        until_ms: u64,
    },
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Delivered => "delivered",
            Verdict::Deferred { .. } => "deferred",
            Verdict::Bounced => "bounced",
            Verdict::Paused { .. } => "paused",
            Verdict::Held { .. } => "held",
        }
    }

    /// Deferred, paused or held: the recipient stays queued.
    pub fn is_deferral(self) -> bool {
        matches!(
            self,
            Verdict::Deferred { .. } | Verdict::Paused { .. } | Verdict::Held { .. }
        )
    }

    /// The same verdict with its due time set (deferrals only).
    pub fn until(self, ms: u64) -> Verdict {
        match self {
            Verdict::Deferred { .. } => Verdict::Deferred { until_ms: ms },
            Verdict::Paused { .. } => Verdict::Paused { until_ms: ms },
            Verdict::Held { .. } => Verdict::Held { until_ms: ms },
            v => v,
        }
    }
}

/// A diagnosed condition: a stable key (for logs, metrics, "state changed" checks), what it
/// means, and what the admin should do. Filled in by the upstream that knows the phrases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnosis {
    pub key: String,
    pub meaning: String,
    pub remedy: String,
}

/// One recipient's outcome of one attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub verdict: Verdict,
    /// The step that answered; `None` for a local reason (pacing, expiry, a spool error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<Step>,
    #[serde(default)]
    pub reply: UpstreamReply,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<Diagnosis>,
    /// Which upstream gave it (filled in by the delivery worker).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub upstream: String,
    /// When the attempt ended, ms since the Unix epoch (filled in by the delivery worker).
    #[serde(default)]
    pub at_ms: u64,
    /// The attempt number (1 for the first).
    #[serde(default)]
    pub attempt: u32,
}

impl Outcome {
    pub fn new(verdict: Verdict, reply: UpstreamReply) -> Outcome {
        Outcome {
            verdict,
            step: None,
            reply,
            problem: None,
            upstream: String::new(),
            at_ms: 0,
            attempt: 0,
        }
    }

    pub fn delivered(reply: UpstreamReply) -> Outcome {
        Outcome::new(Verdict::Delivered, reply)
    }

    pub fn deferred(reply: UpstreamReply) -> Outcome {
        Outcome::new(Verdict::Deferred { until_ms: 0 }, reply)
    }

    pub fn bounced(reply: UpstreamReply) -> Outcome {
        Outcome::new(Verdict::Bounced, reply)
    }

    pub fn at(mut self, step: Step) -> Outcome {
        self.step = Some(step);
        self
    }

    pub fn with_problem(mut self, problem: Option<Diagnosis>) -> Outcome {
        self.problem = problem;
        self
    }

    /// The problem key, or `""`.
    pub fn problem_key(&self) -> &str {
        self.problem.as_ref().map_or("", |p| p.key.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(code: Option<u16>, enhanced: Option<&str>, text: &str) -> UpstreamReply {
        UpstreamReply {
            code,
            enhanced: enhanced.map(str::to_string),
            text: text.to_string(),
        }
    }

    #[test]
    fn the_reply_parser() {
        let table = [
            (
                "550 5.7.60 SMTP; Client does not have permissions",
                r(
                    Some(550),
                    Some("5.7.60"),
                    "SMTP; Client does not have permissions",
                ),
            ),
            (
                "535 5.7.139 Authentication unsuccessful",
                r(Some(535), Some("5.7.139"), "Authentication unsuccessful"),
            ),
            (
                "4.4.7 delivery time expired",
                r(None, Some("4.4.7"), "delivery time expired"),
            ),
            ("550 no enhanced", r(Some(550), None, "no enhanced")),
            ("550", r(Some(550), None, "")),
            ("", r(None, None, "")),
            ("garbage", r(None, None, "garbage")),
            ("250 ok", r(Some(250), None, "ok")),
            // Enhanced only at the start of the text, 1-3 digits per part, class 2/4/5.
            (
                "550 5.7.1234 too long detail",
                r(Some(550), None, "5.7.1234 too long detail"),
            ),
            (
                "550 <5.7.139@x.example>: Recipient not found",
                r(Some(550), None, "<5.7.139@x.example>: Recipient not found"),
            ),
            (
                "550 5.7.139@x.example: Recipient not found",
                r(Some(550), None, "5.7.139@x.example: Recipient not found"),
            ),
            (
                "550 Recipient 5.7.139 not found",
                r(Some(550), None, "Recipient 5.7.139 not found"),
            ),
            ("1.2.3 nonsense", r(None, None, "1.2.3 nonsense")),
            ("3.1.1 x", r(None, None, "3.1.1 x")),
            ("5500 x", r(None, None, "5500 x")),
            ("650 x", r(None, None, "650 x")),
            // Multi-line: repeated code and enhanced code dropped, lines joined.
            (
                "535-5.7.3 Authentication\r\n535 5.7.3 unsuccessful",
                r(Some(535), Some("5.7.3"), "Authentication unsuccessful"),
            ),
            (
                "550-5.7.60 first\r\n550-5.7.60 second\n550 5.7.60 third",
                r(Some(550), Some("5.7.60"), "first second third"),
            ),
            ("550-a\n550 b", r(Some(550), None, "a b")),
            (
                "reason one\nreason two",
                r(None, None, "reason one reason two"),
            ),
            ("550 5.1.1 a\n551 b", r(Some(550), Some("5.1.1"), "a 551 b")),
            ("€€€", r(None, None, "€€€")),
            ("5é0 x", r(None, None, "5é0 x")),
        ];
        for (input, want) in table {
            assert_eq!(UpstreamReply::parse(input), want, "{input:?}");
        }
        assert_eq!(
            UpstreamReply::from_parts(535, "5.7.3 Authentication unsuccessful [X]"),
            r(Some(535), Some("5.7.3"), "Authentication unsuccessful [X]")
        );
        assert_eq!(
            UpstreamReply::from_parts(432, "4.3.2 STOREDRV.ClientSubmit; sender thread limit"),
            r(
                Some(432),
                Some("4.3.2"),
                "STOREDRV.ClientSubmit; sender thread limit"
            )
        );
    }

    #[test]
    fn display_gives_the_reply_back_on_one_line() {
        for s in [
            "550 5.7.60 SMTP; Client does not have permissions",
            "4.4.7 delivery time expired",
            "550 no enhanced",
            "550",
            "garbage",
            "",
        ] {
            assert_eq!(UpstreamReply::parse(s).to_string(), s);
        }
        assert_eq!(
            UpstreamReply::parse("550-5.7.1 a\r\n550 5.7.1 b").to_string(),
            "550 5.7.1 a b"
        );
    }

    #[test]
    fn classes() {
        assert_eq!(UpstreamReply::parse("451 x").class(), Some(4));
        assert_eq!(UpstreamReply::parse("4.4.7 x").class(), Some(4));
        assert_eq!(UpstreamReply::parse("x").class(), None);
        assert!(UpstreamReply::parse("250 ok").is_positive());
        assert!(!UpstreamReply::parse("2.0.0 ok").is_positive());
    }

    #[test]
    fn outcome_serde_round_trip() {
        let o = Outcome::bounced("550 5.7.60 SMTP; no".into())
            .at(Step::Dot)
            .with_problem(Some(Diagnosis {
                key: "send_as_denied".into(),
                meaning: "m".into(),
                remedy: "r".into(),
            }));
        let json = serde_json::to_string(&o).unwrap();
        assert!(json.contains("\"kind\":\"bounced\""), "{json}");
        assert!(json.contains("\"step\":\"dot\""), "{json}");
        assert_eq!(serde_json::from_str::<Outcome>(&json).unwrap(), o);
        let d = Outcome::deferred("451 4.3.0 x".into());
        let v = d.verdict.until(7);
        assert_eq!(v, Verdict::Deferred { until_ms: 7 });
        assert!(v.is_deferral());
    }
}
