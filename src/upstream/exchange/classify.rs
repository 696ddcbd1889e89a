//! The one place that decides what an upstream reply means (exchange-online.md, "Replies and
//! what they mean"). Every result of every step goes through [`classify`]; the caller applies
//! the verdict to one recipient (RCPT) or to the whole transaction (every other step).
//!
//! Each [`Problem`] carries its meaning and the remedy for the admin (PowerShell command,
//! portal step or config key). They are logged once per state change by the upstream.

use std::time::Duration;

pub use crate::outcome::Step;
use crate::outcome::{Diagnosis, UpstreamReply, code};

/// Exchange's own reply codes (not in RFC 5321): `430 4.2.0 STOREDRV; mailbox logon failure`.
pub const MAILBOX_LOGON_FAILURE: u16 = 430;
/// Exchange's `432 4.3.2` throttling (concurrent connections, sender thread limit).
pub const THROTTLED: u16 = 432;

/// A diagnosed condition with a known cause and remedy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// `535 5.7.3` even with a freshly issued token.
    AuthRejected,
    /// `535 5.7.139`: SMTP AUTH not enabled for the mailbox (tenant default off).
    SmtpAuthDisabled,
    /// `550 5.7.30`: a password was used instead of a token.
    BasicAuthRejected,
    /// `430 4.2.0 STOREDRV; mailbox logon failure`.
    MailboxLogonFailure,
    /// `550 5.7.60`, `5.2.252 SendAsDenied`, `SendAsDeniedException`.
    SendAsDenied,
    /// `554 5.2.0 ... SubmissionQuotaExceededException`.
    QuotaExceeded,
    /// `432 4.3.2`: too many concurrent connections.
    TooManyConnections,
    /// `530 5.7.57`: MAIL before AUTH.
    NotAuthenticated,
    /// `550 5.1.8 Access denied, bad outbound sender`: the mailbox is restricted for
    /// outbound spam (Defender "Restricted entities").
    SenderRestricted,
    /// `550 5.7.705 Access denied, tenant has exceeded threshold`: the whole tenant is
    /// blocked from sending.
    TenantBlocked,
    /// `550 5.7.750 ... Client blocked from sending from unregistered domain`: the sender's
    /// domain is not an accepted domain of the tenant.
    UnregisteredDomain,
    /// `501 5.5.124` / `5.5.127`: the XOAUTH2 string was refused.
    XoauthInvalid,
    /// The server does not offer STARTTLS (or AUTH XOAUTH2 after it).
    NoStartTls,
    NoXoauth2,
    /// The TLS handshake failed or timed out.
    Tls(String),
    /// Bytes followed the `220` reply to STARTTLS (before the TLS handshake): someone on the
    /// path tried to inject replies that would be read as if they came over TLS.
    StartTlsInjection(String),
    /// TCP connect failed (refused, unreachable, DNS).
    Unreachable(String),
    /// The token endpoint refused or failed; the text has its own meaning and remedy.
    Token {
        meaning: String,
        remedy: String,
        temporary: bool,
    },
}

impl Problem {
    /// A short stable key (for logs, metrics and "state changed" checks).
    pub fn key(&self) -> &'static str {
        match self {
            Problem::AuthRejected => "auth_rejected",
            Problem::SmtpAuthDisabled => "smtp_auth_disabled",
            Problem::BasicAuthRejected => "basic_auth_rejected",
            Problem::MailboxLogonFailure => "mailbox_logon_failure",
            Problem::SendAsDenied => "send_as_denied",
            Problem::QuotaExceeded => "recipient_quota_exceeded",
            Problem::TooManyConnections => "too_many_connections",
            Problem::NotAuthenticated => "not_authenticated",
            Problem::SenderRestricted => "sender_restricted",
            Problem::TenantBlocked => "tenant_blocked",
            Problem::UnregisteredDomain => "unregistered_domain",
            Problem::XoauthInvalid => "xoauth2_invalid",
            Problem::NoStartTls => "no_starttls",
            Problem::NoXoauth2 => "no_xoauth2",
            Problem::Tls(_) => "tls_failed",
            Problem::StartTlsInjection(_) => "starttls_injection",
            Problem::Unreachable(_) => "unreachable",
            Problem::Token { .. } => "token",
        }
    }

    /// Network trouble that usually passes by itself: logged, but no postmaster alert (it
    /// could not be delivered through the same upstream anyway).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Problem::Unreachable(_)
                | Problem::StartTlsInjection(_)
                | Problem::Token {
                    temporary: true,
                    ..
                }
        )
    }

    /// A fixed, slow probe interval for blocks that Microsoft lifts on its own schedule
    /// (instead of `queue.retry`): probing more often would only add rejected attempts to
    /// a restricted account.
    pub fn probe_every(&self) -> Option<Duration> {
        match self {
            Problem::SenderRestricted | Problem::TenantBlocked => Some(SENDER_BLOCK_PROBE),
            _ => None,
        }
    }

    /// The typed diagnosis stored with an outcome: key, meaning and the remedy with this
    /// upstream's `mailbox` and `client_id` filled in.
    pub fn diagnose(&self, mailbox: &str, client_id: &str) -> Diagnosis {
        Diagnosis {
            key: self.key().to_string(),
            meaning: self.meaning(),
            remedy: self.remedy(mailbox, client_id),
        }
    }

    pub fn meaning(&self) -> String {
        match self {
            Problem::AuthRejected => "Exchange Online refused the OAuth token (535 5.7.3) even right after a new one was fetched: the app is not allowed to send as this mailbox".into(),
            Problem::SmtpAuthDisabled => "SMTP AUTH (client submission) is not enabled for this mailbox: it is off for the tenant and not turned on for the mailbox, or the change is still propagating (535 5.7.139)".into(),
            Problem::BasicAuthRejected => "Exchange Online saw a password instead of an OAuth token (5.7.30)".into(),
            Problem::MailboxLogonFailure => "the app cannot open the sending mailbox (430 4.2.0 mailbox logon failure): it lacks the mailbox permission".into(),
            Problem::SendAsDenied => "the mailbox may not send as this message's sender (5.7.60 / SendAsDenied): the header From is not the authenticated mailbox and no SendAs right exists".into(),
            Problem::QuotaExceeded => "the mailbox reached Exchange Online's limit of recipients per rolling 24 hours (554 5.2.0 SubmissionQuotaExceeded)".into(),
            Problem::TooManyConnections => "Exchange Online refused another concurrent connection for this mailbox (432 4.3.2)".into(),
            Problem::NotAuthenticated => "Exchange Online says the session is not authenticated (530 5.7.57); this is a bug in mailbridge or a proxy in between".into(),
            Problem::SenderRestricted => "Exchange Online blocked the mailbox from sending (550 5.1.8 Access denied, bad outbound sender): it exceeded its outbound spam policy limits or looks compromised, and is listed under Restricted entities".into(),
            Problem::TenantBlocked => "Exchange Online blocked the whole tenant from sending (550 5.7.705 Access denied, tenant has exceeded threshold): too much outbound spam from the tenant, or a lapsed subscription".into(),
            Problem::UnregisteredDomain => "Exchange Online refuses mail from this sender's domain (5.7.750 Client blocked from sending from unregistered domain): the domain is not an accepted domain of the tenant".into(),
            Problem::XoauthInvalid => "Exchange Online refused the XOAUTH2 string (501 5.5.124/5.5.127): malformed or the token was about to expire".into(),
            Problem::NoStartTls => "the upstream server does not offer STARTTLS; mailbridge never sends mail or tokens in plaintext".into(),
            Problem::NoXoauth2 => "the upstream server does not offer AUTH XOAUTH2 after STARTTLS".into(),
            Problem::Tls(e) => format!("the TLS handshake with the upstream failed: {e}"),
            Problem::StartTlsInjection(e) => format!("the connection to the upstream was tampered with before TLS ({e}): something on the path sent data behind the server's go-ahead for STARTTLS, which would have been read as replies from Exchange; mailbridge closed the connection without trusting any of it"),
            Problem::Unreachable(e) => format!("cannot connect to the upstream: {e}"),
            Problem::Token { meaning, .. } => meaning.clone(),
        }
    }

    /// What the admin should do. `mailbox` and `client_id` make the commands copy-pasteable.
    pub fn remedy(&self, mailbox: &str, client_id: &str) -> String {
        match self {
            Problem::AuthRejected => format!(
                "check, in this order: 1) Entra admin center > App registrations > app {client_id} > API permissions: Office 365 Exchange Online > SMTP.SendAsApp (Application) with admin consent granted (`mailbridge token` shows the token's roles); \
                 2) Exchange Online PowerShell: `New-ServicePrincipal -AppId {client_id} -ObjectId <Enterprise applications > app > Object ID>`; \
                 3) `Add-MailboxPermission -Identity {mailbox} -User <service principal id> -AccessRights FullAccess`; \
                 4) `Set-CASMailbox -Identity {mailbox} -SmtpClientAuthenticationDisabled $false`. Changes can take up to an hour to apply; mailbridge retries by itself"
            ),
            Problem::SmtpAuthDisabled => format!(
                "turn SMTP AUTH on for this mailbox only: `Set-CASMailbox -Identity {mailbox} -SmtpClientAuthenticationDisabled $false` (Exchange Online PowerShell); the per-mailbox setting overrides the tenant's, which can stay off for everyone else. A 5.7.139 soon after that change is propagation: it can take up to an hour, and mailbridge retries by itself. Security defaults block Basic authentication, not OAuth SMTP AUTH: leave them on"
            ),
            Problem::BasicAuthRejected => "check that the upstream's `type` is `exchange-online` and that nothing between mailbridge and Exchange (a proxy) rewrites AUTH".into(),
            Problem::MailboxLogonFailure => format!(
                "`Add-MailboxPermission -Identity {mailbox} -User <service principal id of app {client_id}> -AccessRights FullAccess` (Exchange Online PowerShell)"
            ),
            Problem::SendAsDenied => format!(
                "either grant the right: `Add-RecipientPermission -Identity <sender address> -Trustee <service principal id of app {client_id}> -AccessRights SendAs`, or set `sender_rewrite: mailbox` on the upstream so mail is sent as {mailbox} (the original From goes to Reply-To)"
            ),
            Problem::QuotaExceeded => "mailbridge holds this upstream's mail for about an hour and retries; lower `limits.recipients_per_day` if it happens again, or spread mail over several mailboxes (routes)".into(),
            Problem::TooManyConnections => "mailbridge lowers its concurrency by itself; lower `limits.connections` if other programs use the same mailbox".into(),
            Problem::NotAuthenticated => "check for a TLS-inspecting proxy between mailbridge and Exchange; otherwise report a bug with the log lines around this one".into(),
            Problem::SenderRestricted => format!(
                "Microsoft Defender portal > Email & collaboration > Review > Restricted entities: find {mailbox}; check it for compromise (sign-ins, inbox rules, forwarding, and what the devices behind mailbridge sent), then unblock it there or in Exchange Online PowerShell with `Get-BlockedSenderAddress -SenderAddress {mailbox}` and `Remove-BlockedSenderAddress -SenderAddress {mailbox}`. A `RecipientLimitPerDay` in the outbound spam policy lower than mailbridge's `limits.recipients_per_day` is another cause (`Get-HostedOutboundSpamFilterPolicy | Format-List Name,RecipientLimitPerDay,ActionWhenThresholdReached`): lower `limits.recipients_per_day` to match. mailbridge keeps the mail queued, probes every 15 minutes and resumes by itself"
            ),
            Problem::TenantBlocked => format!(
                "Microsoft Defender portal > Email & collaboration > Review > Restricted entities: find the mailboxes that sent the spam (is {mailbox} among them?), secure them and check the subscription in the Microsoft 365 admin center; the tenant-wide block is then lifted by Microsoft support (Microsoft 365 admin center > Support > New service request). mailbridge keeps the mail queued, probes every 15 minutes and resumes by itself"
            ),
            Problem::UnregisteredDomain => "add the sender's domain (the domain of the From address in the bounced message) and verify it in the Microsoft 365 admin center > Settings > Domains, or set `sender_rewrite: mailbox` on the upstream so mail is sent as the mailbox's own address; mail from other domains is not affected".into(),
            Problem::XoauthInvalid => format!("check that `mailbox` ({mailbox}) is the mailbox's primary address (UPN); run `mailbridge token` to inspect the token"),
            Problem::NoStartTls | Problem::NoXoauth2 => "check `host` and `port` of the upstream: Exchange Online is smtp.office365.com port 587".into(),
            Problem::Tls(_) => "allow outgoing TLS 1.2/1.3 to the upstream on port 587, exclude it from TLS inspection, or add the inspecting proxy's CA with `ca_file`".into(),
            Problem::StartTlsInjection(_) => "look for a firewall, proxy or \"SMTP inspection\" (fixup) feature between mailbridge and the upstream that rewrites SMTP on port 587, and turn it off for this traffic; if there is none, treat it as an attack on the network path. Mail stays queued and is retried by itself; nothing was sent".into(),
            Problem::Unreachable(_) => "check DNS and that outgoing TCP port 587 to the upstream is open (firewall, proxy); `host` and `port` set the address".into(),
            Problem::Token { remedy, .. } => remedy.clone(),
        }
    }
}

/// What to do with a step's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// `535 5.7.3` on AUTH: drop the token, fetch a new one (single-flight), retry once.
    RefreshAndRetry,
    /// Try later. `pause`: stop using the upstream until a probe succeeds (configuration
    /// problems: every message would fail the same way). `hold`: do not send through this
    /// upstream for that long. `fewer_connections`: lower the concurrency cap.
    Defer {
        problem: Option<Problem>,
        pause: bool,
        hold: Option<Duration>,
        fewer_connections: bool,
    },
    /// Permanent for this recipient or message (a DSN goes to the sender).
    Fail {
        problem: Option<Problem>,
    },
}

impl Verdict {
    fn defer() -> Verdict {
        Verdict::Defer {
            problem: None,
            pause: false,
            hold: None,
            fewer_connections: false,
        }
    }
    fn pause(p: Problem) -> Verdict {
        Verdict::Defer {
            problem: Some(p),
            pause: true,
            hold: None,
            fewer_connections: false,
        }
    }
}

/// How long a `SubmissionQuotaExceeded` holds the upstream.
pub const QUOTA_HOLD: Duration = Duration::from_secs(3600);
/// How often a sender or tenant block (5.1.8, 5.7.705) is probed.
pub const SENDER_BLOCK_PROBE: Duration = Duration::from_secs(15 * 60);

/// The reply's own words: the text after the enhanced code, cut where Exchange starts to
/// echo what the client sent (an address in angle brackets, a quoted string, any word with
/// an `@`). Phrases are looked for only here, so a recipient such as
/// `<SubmissionQuotaExceeded@x.example>` in `550 5.1.1 <...>: Recipient not found` cannot
/// make the reply mean something else.
fn own_words(reply: &UpstreamReply) -> String {
    let after = reply.text();
    let mut cut = after.find(['<', '"']).unwrap_or(after.len());
    let mut pos = 0;
    for word in after.split_inclusive(char::is_whitespace) {
        if pos >= cut {
            break;
        }
        if word.contains('@') {
            cut = cut.min(pos);
            break;
        }
        pos += word.len();
    }
    after[..cut].to_ascii_lowercase()
}

/// Whether the text after the enhanced code starts with `prefix` (ASCII case-insensitive):
/// Exchange's own exception names come first, e.g. `554 5.2.0
/// STOREDRV.Submission.Exception:SubmissionQuotaExceededException; ...`.
fn starts_with_ci(reply: &UpstreamReply, prefix: &str) -> bool {
    let after = reply.text().as_bytes();
    after.len() >= prefix.len() && after[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// Classifies a reply `code` with `text` (the reply without its code) at `step`.
/// `retried_auth`: a fresh token was already tried on this attempt.
///
/// Enhanced status codes count only at the start of the text (RFC 3463 §2, RFC 2034 §4) and
/// Exchange's phrases only where Exchange puts them ([`own_words`], [`starts_with_ci`]): a
/// reply that echoes an address or other client data never triggers a pause or a hold.
pub fn classify(step: Step, code: u16, text: &str, retried_auth: bool) -> Verdict {
    classify_reply(step, &UpstreamReply::from_parts(code, text), retried_auth)
}

/// [`classify`] for a parsed reply (the one parser: [`UpstreamReply::parse`]).
pub fn classify_reply(step: Step, reply: &UpstreamReply, retried_auth: bool) -> Verdict {
    let code = reply.code.unwrap_or(0);
    if reply.is_positive() {
        return Verdict::Ok;
    }
    let own = own_words(reply);
    let esc = reply.enhanced.as_deref().unwrap_or("");
    let has = |s: &str| own.contains(&s.to_ascii_lowercase());
    let in_transaction = matches!(step, Step::Mail | Step::Rcpt | Step::Data | Step::Dot);

    // Rows that mean the same wherever they appear.
    if esc == "5.7.139"
        || (step == Step::Auth
            && (has("smtpclientauthentication is disabled") || has("security defaults")))
    {
        return Verdict::pause(Problem::SmtpAuthDisabled);
    }
    if esc == "5.7.30" || has("basic authentication is not supported") {
        return Verdict::pause(Problem::BasicAuthRejected);
    }
    if starts_with_ci(
        reply,
        "STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
    ) {
        return Verdict::Defer {
            problem: Some(Problem::QuotaExceeded),
            pause: false,
            hold: Some(QUOTA_HOLD),
            fewer_connections: false,
        };
    }
    // Exchange's sender blocks: never a bounce, they stop every message of the mailbox
    // (5.1.8) or of the tenant (5.7.705) until lifted.
    if esc == "5.1.8" && (has("bad outbound sender") || has("access denied")) {
        return Verdict::pause(Problem::SenderRestricted);
    }
    if esc == "5.7.705" {
        return Verdict::pause(Problem::TenantBlocked);
    }
    // Concerns only the sender's domain: bounce this message, other mail flows.
    if esc == "5.7.750" && in_transaction {
        return Verdict::Fail {
            problem: Some(Problem::UnregisteredDomain),
        };
    }
    if esc == "5.7.60"
        || esc == "5.2.252"
        || starts_with_ci(reply, "SendAsDenied")
        || starts_with_ci(reply, "STOREDRV.Submission.Exception:SendAsDeniedException")
    {
        return Verdict::Fail {
            problem: Some(Problem::SendAsDenied),
        };
    }
    if code == MAILBOX_LOGON_FAILURE
        || (esc == "4.2.0" && has("logon failure"))
        || has("mailbox logon failure")
    {
        return Verdict::pause(Problem::MailboxLogonFailure);
    }
    if code == THROTTLED || (esc == "4.3.2" && (has("concurrent") || has("thread limit"))) {
        return Verdict::Defer {
            problem: Some(Problem::TooManyConnections),
            pause: false,
            hold: None,
            fewer_connections: true,
        };
    }
    if code == code::AUTH_REQUIRED
        && (esc == "5.7.57" || step != Step::Auth)
        && step != Step::Greeting
    {
        return Verdict::Defer {
            problem: Some(Problem::NotAuthenticated),
            pause: false,
            hold: None,
            fewer_connections: false,
        };
    }

    match step {
        Step::Auth => {
            if esc == "5.5.127" && !retried_auth {
                return Verdict::RefreshAndRetry;
            }
            if esc == "5.5.124" || esc == "5.5.127" {
                return Verdict::pause(Problem::XoauthInvalid);
            }
            if code == code::AUTH_INVALID || code == code::AUTH_TOO_WEAK {
                return if retried_auth {
                    Verdict::pause(Problem::AuthRejected)
                } else {
                    Verdict::RefreshAndRetry
                };
            }
            if reply.class() == Some(5) {
                // Never bounce mail because of an authentication problem.
                return Verdict::pause(Problem::AuthRejected);
            }
            Verdict::defer()
        }
        // Before a transaction nothing is permanent for a message: a 5xx greeting or EHLO
        // reply says the server (or something in between) is not what we expect.
        Step::Connect | Step::Greeting | Step::Ehlo | Step::StartTls => Verdict::defer(),
        Step::Mail | Step::Rcpt | Step::Data | Step::Dot => {
            if reply.class() == Some(4) {
                Verdict::defer()
            } else {
                Verdict::Fail { problem: None }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pause_of(v: &Verdict) -> Option<&Problem> {
        match v {
            Verdict::Defer {
                problem: Some(p),
                pause: true,
                ..
            } => Some(p),
            _ => None,
        }
    }

    #[test]
    fn the_exchange_table() {
        // 535 5.7.3: one fresh token, then pause (never bounce).
        assert_eq!(
            classify(
                Step::Auth,
                535,
                "5.7.3 Authentication unsuccessful [X]",
                false
            ),
            Verdict::RefreshAndRetry
        );
        assert_eq!(
            pause_of(&classify(
                Step::Auth,
                535,
                "5.7.3 Authentication unsuccessful",
                true
            )),
            Some(&Problem::AuthRejected)
        );
        assert_eq!(
            pause_of(&classify(
                Step::Auth,
                535,
                "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
                false
            )),
            Some(&Problem::SmtpAuthDisabled)
        );
        assert_eq!(
            pause_of(&classify(
                Step::Auth,
                550,
                "5.7.30 Basic authentication is not supported for Client Submission",
                false
            )),
            Some(&Problem::BasicAuthRejected)
        );
        assert_eq!(
            pause_of(&classify(
                Step::Dot,
                430,
                "4.2.0 STOREDRV; mailbox logon failure",
                false
            )),
            Some(&Problem::MailboxLogonFailure)
        );
        for (step, code, text) in [
            (
                Step::Dot,
                550,
                "5.7.60 SMTP; Client does not have permissions to send as this sender",
            ),
            (
                Step::Dot,
                554,
                "5.2.252 SendAsDenied; relay@contoso.com not allowed to send as x@y",
            ),
            (
                Step::Dot,
                554,
                "5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
            ),
            (
                Step::Mail,
                550,
                "5.7.60 SMTP; Client does not have permissions to send as this sender",
            ),
        ] {
            assert_eq!(
                classify(step, code, text, false),
                Verdict::Fail {
                    problem: Some(Problem::SendAsDenied)
                },
                "{code} {text}"
            );
        }
        match classify(
            Step::Dot,
            554,
            "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message",
            false,
        ) {
            Verdict::Defer {
                problem: Some(Problem::QuotaExceeded),
                hold: Some(h),
                pause: false,
                ..
            } => {
                assert_eq!(h, QUOTA_HOLD)
            }
            v => panic!("{v:?}"),
        }
        for text in [
            "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
            "4.3.2 Concurrent connections limit exceeded",
        ] {
            for step in [Step::Greeting, Step::Mail, Step::Dot] {
                assert!(matches!(
                    classify(step, 432, text, false),
                    Verdict::Defer {
                        fewer_connections: true,
                        pause: false,
                        ..
                    }
                ));
            }
        }
        assert!(matches!(
            classify(
                Step::Mail,
                530,
                "5.7.57 Client not authenticated to send mail",
                false
            ),
            Verdict::Defer {
                problem: Some(Problem::NotAuthenticated),
                ..
            }
        ));
        assert_eq!(
            classify(
                Step::Auth,
                501,
                "5.5.127 Invalid XOAUTH2 auth data - Token will expire soon",
                false
            ),
            Verdict::RefreshAndRetry
        );
        assert_eq!(
            pause_of(&classify(
                Step::Auth,
                501,
                "5.5.124 Invalid XOAUTH2 auth data",
                false
            )),
            Some(&Problem::XoauthInvalid)
        );
    }

    /// A reply that echoes an address (or other client data) means what its code and
    /// Exchange's own words say, never what the echoed text contains.
    #[test]
    fn echoed_addresses_cannot_trigger_a_pause_or_hold() {
        let bounce = Verdict::Fail { problem: None };
        for (step, code, text) in [
            (
                Step::Rcpt,
                550,
                "5.1.1 <SubmissionQuotaExceeded@x.example>: Recipient not found",
            ),
            (
                Step::Rcpt,
                550,
                "5.1.1 <STOREDRV.Submission.Exception:SubmissionQuotaExceededException@x.example>: Recipient not found",
            ),
            (
                Step::Rcpt,
                550,
                "5.1.1 <5.7.139@x.example>: Recipient not found",
            ),
            (
                Step::Rcpt,
                550,
                "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient SendAsDenied@x.example not found by SMTP address lookup",
            ),
            (
                Step::Rcpt,
                550,
                "5.1.1 <\"security defaults\"@x.example>: Recipient not found",
            ),
            (
                Step::Rcpt,
                550,
                "5.1.1 <\"SmtpClientAuthentication is disabled\"@x.example>: Recipient not found",
            ),
            (
                Step::Rcpt,
                550,
                "5.1.1 \"mailbox logon failure\"@x.example: Recipient not found",
            ),
            (
                Step::Rcpt,
                550,
                "5.1.1 <\"basic authentication is not supported\"@x.example>: unknown",
            ),
            (
                Step::Mail,
                550,
                "5.1.0 Sender <SendAsDenied@x.example> rejected",
            ),
            (
                Step::Dot,
                554,
                "5.6.0 Message from <SubmissionQuotaExceededException@x.example> refused",
            ),
            (
                Step::Rcpt,
                550,
                "5.1.1 <5.7.705@x.example>: Recipient not found",
            ),
            (
                Step::Rcpt,
                550,
                "5.1.1 <5.1.8@x.example> bad outbound sender",
            ),
            (Step::Rcpt, 550, "<5.7.139@x.example>: Recipient not found"),
            (Step::Rcpt, 550, "5.7.139@x.example: Recipient not found"),
        ] {
            assert_eq!(classify(step, code, text, false), bounce, "{code} {text}");
        }
        // The same phrases where Exchange puts them still count.
        assert_eq!(
            pause_of(&classify(
                Step::Auth,
                535,
                "Authentication unsuccessful, user is locked by your organization's security defaults policy",
                false
            )),
            Some(&Problem::SmtpAuthDisabled)
        );
        assert!(matches!(
            classify(
                Step::Dot,
                554,
                "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due to a permanent exception",
                false
            ),
            Verdict::Defer {
                problem: Some(Problem::QuotaExceeded),
                ..
            }
        ));
    }

    #[test]
    fn exchange_sender_blocks() {
        // 5.1.8 and 5.7.705 pause the upstream wherever they come, never bounce, and are
        // probed every 15 minutes.
        for step in [Step::Mail, Step::Rcpt, Step::Data, Step::Dot] {
            let v = classify(step, 550, "5.1.8 Access denied, bad outbound sender", false);
            assert_eq!(pause_of(&v), Some(&Problem::SenderRestricted), "{step:?}");
            let v = classify(
                step,
                550,
                "5.7.705 Access denied, tenant has exceeded threshold",
                false,
            );
            assert_eq!(pause_of(&v), Some(&Problem::TenantBlocked), "{step:?}");
            // 5.7.750 concerns one sender domain: that message bounces, nothing pauses.
            assert_eq!(
                classify(
                    step,
                    550,
                    "5.7.750 Service unavailable. Client blocked from sending from unregistered domains",
                    false
                ),
                Verdict::Fail {
                    problem: Some(Problem::UnregisteredDomain)
                },
                "{step:?}"
            );
        }
        assert_eq!(
            Problem::SenderRestricted.probe_every(),
            Some(Duration::from_secs(900))
        );
        assert_eq!(
            Problem::TenantBlocked.probe_every(),
            Some(Duration::from_secs(900))
        );
        assert_eq!(Problem::AuthRejected.probe_every(), None);
        // Another server's 5.1.8 (RFC 3463: bad sender's system address) is about one
        // message.
        assert_eq!(
            classify(Step::Mail, 550, "5.1.8 Bad sender's system address", false),
            Verdict::Fail { problem: None }
        );
        let r = Problem::SenderRestricted.remedy("relay@contoso.com", "app");
        for want in [
            "Restricted entities",
            "Get-BlockedSenderAddress -SenderAddress relay@contoso.com",
            "Remove-BlockedSenderAddress -SenderAddress relay@contoso.com",
            "RecipientLimitPerDay",
            "compromise",
        ] {
            assert!(r.contains(want), "{want}: {r}");
        }
        assert!(
            Problem::UnregisteredDomain
                .remedy("m", "a")
                .contains("verify it in the Microsoft 365 admin center")
        );
    }

    #[test]
    fn generic_codes() {
        assert_eq!(
            classify(Step::Rcpt, 250, "2.1.5 Recipient OK", false),
            Verdict::Ok
        );
        assert_eq!(
            classify(
                Step::Rcpt,
                550,
                "5.1.10 RESOLVER.ADR.RecipientNotFound",
                false
            ),
            Verdict::Fail { problem: None }
        );
        assert!(matches!(
            classify(Step::Rcpt, 451, "4.4.0 try later", false),
            Verdict::Defer { pause: false, .. }
        ));
        assert_eq!(
            classify(
                Step::Dot,
                552,
                "5.3.4 Message size exceeds fixed maximum message size",
                false
            ),
            Verdict::Fail { problem: None }
        );
        // A 5xx before the transaction never bounces a message.
        assert!(matches!(
            classify(Step::Greeting, 554, "5.7.1 go away", false),
            Verdict::Defer { .. }
        ));
        assert!(matches!(
            classify(Step::Ehlo, 500, "what", false),
            Verdict::Defer { .. }
        ));
        // Any other AUTH failure pauses, never fails the message.
        assert!(
            pause_of(&classify(
                Step::Auth,
                504,
                "5.7.4 Unrecognized authentication type",
                true
            ))
            .is_some()
        );
        assert!(matches!(
            classify(Step::Auth, 454, "4.7.0 temporary", false),
            Verdict::Defer { pause: false, .. }
        ));
    }

    #[test]
    fn enhanced_codes() {
        // The classifier reads the enhanced code from the one parser.
        let e = |t: &str| UpstreamReply::from_parts(535, t).enhanced;
        assert_eq!(
            e("5.7.3 Authentication unsuccessful").as_deref(),
            Some("5.7.3")
        );
        assert_eq!(e("5.7.139 x").as_deref(), Some("5.7.139"));
        assert_eq!(e("Authentication unsuccessful"), None);
        assert_eq!(e("3.1.1 x"), None);
        assert_eq!(e(""), None);
    }

    #[test]
    fn every_problem_has_a_remedy_naming_the_mailbox_where_useful() {
        let all = [
            Problem::AuthRejected,
            Problem::SmtpAuthDisabled,
            Problem::BasicAuthRejected,
            Problem::MailboxLogonFailure,
            Problem::SendAsDenied,
            Problem::QuotaExceeded,
            Problem::TooManyConnections,
            Problem::NotAuthenticated,
            Problem::SenderRestricted,
            Problem::TenantBlocked,
            Problem::UnregisteredDomain,
            Problem::XoauthInvalid,
            Problem::NoStartTls,
            Problem::NoXoauth2,
            Problem::Tls("handshake".into()),
            Problem::StartTlsInjection("12 bytes".into()),
            Problem::Unreachable("refused".into()),
        ];
        for p in &all {
            assert!(!p.meaning().is_empty());
            assert!(p.remedy("relay@contoso.com", "app-id").len() > 20, "{p:?}");
        }
        assert!(
            Problem::AuthRejected
                .remedy("relay@contoso.com", "app-id")
                .contains("Add-MailboxPermission -Identity relay@contoso.com")
        );
        // Per mailbox, never tenant-wide; security defaults do not block OAuth SMTP AUTH.
        let r = Problem::SmtpAuthDisabled.remedy("m", "a");
        assert!(
            r.contains("Set-CASMailbox -Identity m -SmtpClientAuthenticationDisabled $false"),
            "{r}"
        );
        assert!(r.contains("up to an hour"), "{r}");
        assert!(!r.contains("Set-TransportConfig"), "{r}");
        assert!(!r.contains("turn them off"), "{r}");
        assert!(
            Problem::SendAsDenied
                .remedy("m", "a")
                .contains("Add-RecipientPermission")
        );
        assert!(
            Problem::SendAsDenied
                .remedy("m", "a")
                .contains("sender_rewrite: mailbox")
        );
    }
}
