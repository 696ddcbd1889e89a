//! What an access token says about itself, for `mailbridge token`: the claims Entra put in it
//! and whether they fit SMTP client submission to Exchange Online.
//!
//! No signature is verified: the relay never trusts these claims, it only shows them to the
//! admin. Error texts never contain the token or any part of it.

use base64::Engine;
use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::{Deserialize, Deserializer};

/// The application permission SMTP client submission needs.
const SEND_AS_APP: &str = "SMTP.SendAsApp";
/// The scope that gets a token for Exchange Online.
const SCOPE: &str = "https://outlook.office365.com/.default";
/// The Office 365 Exchange Online application id (a possible `aud`).
const EXCHANGE_APP_ID: &str = "00000002-0000-0ff1-ce00-000000000000";

/// The claims of an Entra access token that matter here. Missing claims are `None` (or empty).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Claims {
    /// Audience; a JSON array (allowed by RFC 7519) gives its first element.
    #[serde(default, deserialize_with = "string_or_first")]
    pub aud: Option<String>,
    pub tid: Option<String>,
    pub appid: Option<String>,
    pub app_displayname: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    pub exp: Option<i64>,
    pub iat: Option<i64>,
    pub oid: Option<String>,
    pub iss: Option<String>,
}

/// The claims of a JWT (`header.payload.signature`, base64url with or without padding). A
/// leading `Bearer ` and surrounding blanks are ignored. The error never quotes the input.
pub fn decode(token: &str) -> Result<Claims, String> {
    let token = token.trim();
    let token = token
        .strip_prefix("Bearer ")
        .or_else(|| token.strip_prefix("bearer "))
        .unwrap_or(token)
        .trim();
    if token.is_empty() {
        return Err("the token is empty".to_string());
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(format!(
            "not a JWT: expected 3 dot-separated parts, found {} (an encrypted or opaque token \
             cannot be inspected)",
            parts.len()
        ));
    }
    let engine = GeneralPurpose::new(
        &URL_SAFE,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let payload = engine
        .decode(parts[1])
        .map_err(|_| "the token's payload (second part) is not base64url".to_string())?;
    serde_json::from_slice::<Claims>(&payload).map_err(|e| {
        // serde_json's message can quote a claim's value: only its category and place are shown.
        let what = match e.classify() {
            serde_json::error::Category::Data => "a claim has an unexpected type",
            serde_json::error::Category::Eof => "it ends too early",
            _ => "it is not valid JSON",
        };
        format!(
            "the token's payload is not a claims object: {what} (line {}, column {})",
            e.line(),
            e.column()
        )
    })
}

/// The human report of [`check`].
#[derive(Debug, Clone)]
pub struct Check {
    /// The token fits: audience Exchange Online, `SMTP.SendAsApp` granted, not expired.
    pub ok: bool,
    pub lines: Vec<String>,
}

/// Checks the claims for SMTP client submission at `now_unix` (seconds since the epoch) and
/// describes them, one line per claim, then a remedy line per problem, then a note on what a
/// token cannot show.
pub fn check(c: &Claims, now_unix: i64) -> Check {
    let mut lines = Vec::new();
    let mut fixes = Vec::new();

    let aud_ok = c.aud.as_deref().is_some_and(is_exchange_audience);
    match c.aud.as_deref() {
        Some(aud) if aud_ok => lines.push(format!("aud:    {aud}  (Exchange Online: ok)")),
        Some(aud) => {
            lines.push(format!("aud:    {aud}  (not Exchange Online)"));
            fixes.push(format!(
                "fix:    the token is for another API: set `scope: {SCOPE}` on the upstream"
            ));
        }
        None => {
            lines.push("aud:    (missing)".to_string());
            fixes.push(format!("fix:    set `scope: {SCOPE}` on the upstream"));
        }
    }
    lines.push(format!("iss:    {}", show(&c.iss)));
    lines.push(format!("tid:    {}", show(&c.tid)));
    match (&c.appid, &c.app_displayname) {
        (Some(id), Some(name)) => lines.push(format!("appid:  {id}  ({name})")),
        _ => lines.push(format!("appid:  {}", show(&c.appid))),
    }
    lines.push(format!(
        "oid:    {}  (object id of the app's service principal)",
        show(&c.oid)
    ));

    let roles_ok = c
        .roles
        .iter()
        .any(|r| r.trim().eq_ignore_ascii_case(SEND_AS_APP));
    let entra_path = format!(
        "Entra admin center > App registrations > {} > API permissions > Add a permission > \
         APIs my organization uses > Office 365 Exchange Online > Application permissions > \
         {SEND_AS_APP}, then Grant admin consent",
        c.app_displayname.as_deref().unwrap_or("<app>")
    );
    if c.roles.is_empty() {
        lines.push(format!("roles:  (none)  ({SEND_AS_APP} missing)"));
        fixes.push(
            "fix:    the token carries no application roles: it is a delegated (user) token, \
             or admin consent is missing for the app's application permissions"
                .to_string(),
        );
        fixes.push(format!("fix:    {entra_path}"));
    } else if roles_ok {
        lines.push(format!("roles:  {}  (ok)", c.roles.join(", ")));
    } else {
        lines.push(format!(
            "roles:  {}  ({SEND_AS_APP} missing)",
            c.roles.join(", ")
        ));
        fixes.push(format!("fix:    {entra_path}"));
    }

    if let Some(iat) = c.iat {
        lines.push(format!(
            "iat:    {} ({})",
            utc(iat),
            relative(iat.saturating_sub(now_unix))
        ));
    }
    let exp_ok = match c.exp {
        Some(exp) => {
            let left = exp.saturating_sub(now_unix);
            if left > 0 {
                lines.push(format!("exp:    {} ({})", utc(exp), relative(left)));
                true
            } else {
                lines.push(format!("exp:    {} (expired {})", utc(exp), relative(left)));
                fixes.push(
                    "fix:    the token has expired: request a new one (the daemon renews tokens \
                     by itself; a stale token points to a stopped refresher or a wrong clock)"
                        .to_string(),
                );
                false
            }
        }
        None => {
            lines.push("exp:    (missing)".to_string());
            false
        }
    };

    let ok = aud_ok && roles_ok && exp_ok;
    lines.push(if ok {
        "result: ok for SMTP client submission as far as the token can tell".to_string()
    } else {
        "result: NOT usable for SMTP client submission".to_string()
    });
    lines.extend(fixes);
    let appid = c.appid.as_deref().unwrap_or("<appid>");
    let oid = c.oid.as_deref().unwrap_or("<enterprise app object id>");
    lines.push(format!(
        "note:   a token cannot show Exchange's side, which also needs (Exchange Online \
         PowerShell): New-ServicePrincipal -AppId {appid} -ObjectId {oid}, and \
         Add-MailboxPermission -Identity <mailbox> -User <service principal id> -AccessRights \
         FullAccess (the service principal id is the Identity or ObjectId New-ServicePrincipal \
         shows)"
    ));
    Check { ok, lines }
}

/// `https://outlook.office365.com`, `https://outlook.office.com`, the Exchange Online app id,
/// national clouds (`https://outlook.office365.us`, ...): any `https://outlook.` audience.
fn is_exchange_audience(aud: &str) -> bool {
    let aud = aud.trim().trim_end_matches('/').to_ascii_lowercase();
    aud == EXCHANGE_APP_ID || aud.starts_with("https://outlook.")
}

fn show(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("(missing)")
}

/// `2026-11-28 02:03:04 UTC`; a time out of range is shown as its number.
fn utc(secs: i64) -> String {
    const MAX: i64 = 253_402_300_799; // 9999-12-31 23:59:59
    if !(0..=MAX).contains(&secs) {
        return format!("{secs} (Unix time)");
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64);
    let s = humantime::format_rfc3339_seconds(t).to_string(); // 2026-11-28T02:03:04Z
    format!("{} UTC", s.trim_end_matches('Z').replacen('T', " ", 1))
}

/// `in 59 min`, `3 min ago`, `in 30 s`, `2 h 5 min ago`.
fn relative(delta: i64) -> String {
    let abs = delta.unsigned_abs();
    let span = if abs < 60 {
        format!("{abs} s")
    } else if abs < 2 * 3600 {
        format!("{} min", abs / 60)
    } else if abs < 2 * 86_400 {
        format!("{} h {} min", abs / 3600, abs % 3600 / 60)
    } else {
        format!("{} days", abs / 86_400)
    };
    if delta >= 0 {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

/// `"aud": "x"` or `"aud": ["x", ...]` (first element), or `null`.
fn string_or_first<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        Some(OneOrMany::One(s)) => Some(s),
        Some(OneOrMany::Many(v)) => v.into_iter().next(),
        None => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};

    const NOW: i64 = 1_795_827_723; // 2026-11-28 01:02:03 UTC

    fn jwt(payload: &serde_json::Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"RS256","x5t":"abc"}"#);
        let body = URL_SAFE_NO_PAD.encode(payload.to_string());
        format!("{header}.{body}.c2lnbmF0dXJl")
    }

    fn good() -> serde_json::Value {
        serde_json::json!({
            "aud": "https://outlook.office365.com",
            "iss": "https://sts.windows.net/11111111-2222-3333-4444-555555555555/",
            "iat": NOW - 60,
            "nbf": NOW - 60,
            "exp": NOW + 59 * 60 + 30,
            "app_displayname": "mailbridge",
            "appid": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
            "oid": "99999999-8888-7777-6666-555555555555",
            "roles": ["SMTP.SendAsApp"],
            "tid": "11111111-2222-3333-4444-555555555555",
            "ver": "1.0"
        })
    }

    #[test]
    fn extreme_times_in_a_token_do_not_overflow() {
        for (iat, exp) in [(i64::MIN, i64::MAX), (i64::MAX, i64::MIN), (0, 0)] {
            let mut p = good();
            p["iat"] = iat.into();
            p["exp"] = exp.into();
            let c = decode(&jwt(&p)).unwrap();
            for now in [NOW, i64::MIN, i64::MAX] {
                let r = check(&c, now);
                assert!(
                    r.lines.iter().any(|l| l.starts_with("exp:")),
                    "{:#?}",
                    r.lines
                );
            }
        }
    }

    #[test]
    fn good_token() {
        let c = decode(&jwt(&good())).unwrap();
        assert_eq!(c.aud.as_deref(), Some("https://outlook.office365.com"));
        assert_eq!(c.roles, vec!["SMTP.SendAsApp"]);
        assert_eq!(c.exp, Some(NOW + 59 * 60 + 30));
        let r = check(&c, NOW);
        assert!(r.ok, "{:#?}", r.lines);
        assert!(
            r.lines
                .contains(&"aud:    https://outlook.office365.com  (Exchange Online: ok)".into())
        );
        assert!(r.lines.contains(&"roles:  SMTP.SendAsApp  (ok)".into()));
        assert!(
            r.lines
                .contains(&"exp:    2026-11-28 02:01:33 UTC (in 59 min)".into()),
            "{:#?}",
            r.lines
        );
        assert!(
            r.lines
                .contains(&"appid:  aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee  (mailbridge)".into())
        );
        assert!(!r.lines.iter().any(|l| l.starts_with("fix:")));
        let last = r.lines.last().unwrap();
        assert!(last.contains(
            "New-ServicePrincipal -AppId aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee -ObjectId 99999999-8888-7777-6666-555555555555"
        ));
        assert!(last.contains("Add-MailboxPermission -Identity <mailbox>"));
        assert!(last.contains("-AccessRights FullAccess"));
    }

    #[test]
    fn other_exchange_audiences() {
        for aud in [
            "https://outlook.office365.com/",
            "https://outlook.office.com",
            "00000002-0000-0ff1-ce00-000000000000",
            "https://outlook.office365.us",
            "HTTPS://OUTLOOK.OFFICE365.COM",
        ] {
            let mut p = good();
            p["aud"] = aud.into();
            assert!(check(&decode(&jwt(&p)).unwrap(), NOW).ok, "{aud}");
        }
        let mut p = good();
        p["aud"] = serde_json::json!(["https://outlook.office.com", "other"]);
        assert!(check(&decode(&jwt(&p)).unwrap(), NOW).ok);
    }

    #[test]
    fn wrong_audience() {
        let mut p = good();
        p["aud"] = "https://graph.microsoft.com".into();
        let r = check(&decode(&jwt(&p)).unwrap(), NOW);
        assert!(!r.ok);
        assert!(r.lines.iter().any(|l| l.contains("(not Exchange Online)")));
        assert!(r.lines.iter().any(|l| l.starts_with("fix:")
            && l.contains("`scope: https://outlook.office365.com/.default`")));

        p.as_object_mut().unwrap().remove("aud");
        let r = check(&decode(&jwt(&p)).unwrap(), NOW);
        assert!(!r.ok);
        assert!(r.lines.contains(&"aud:    (missing)".into()));
    }

    #[test]
    fn missing_role() {
        let mut p = good();
        p["roles"] = serde_json::json!(["Mail.Send"]);
        let r = check(&decode(&jwt(&p)).unwrap(), NOW);
        assert!(!r.ok);
        assert!(
            r.lines
                .contains(&"roles:  Mail.Send  (SMTP.SendAsApp missing)".into())
        );
        let fix = r.lines.iter().find(|l| l.starts_with("fix:")).unwrap();
        assert!(fix.contains("App registrations > mailbridge > API permissions"));
        assert!(fix.contains("Office 365 Exchange Online > Application permissions > SMTP.SendAsApp, then Grant admin consent"));
    }

    #[test]
    fn no_roles_is_delegated_or_unconsented() {
        let mut p = good();
        p.as_object_mut().unwrap().remove("roles");
        p["scp"] = "SMTP.Send".into();
        let c = decode(&jwt(&p)).unwrap();
        assert!(c.roles.is_empty());
        let r = check(&c, NOW);
        assert!(!r.ok);
        assert!(
            r.lines
                .iter()
                .any(|l| l.contains("delegated") && l.contains("consent"))
        );
        assert!(r.lines.iter().any(|l| l.contains("Grant admin consent")));
    }

    #[test]
    fn expired() {
        let mut p = good();
        p["exp"] = (NOW - 180).into();
        let r = check(&decode(&jwt(&p)).unwrap(), NOW);
        assert!(!r.ok);
        assert!(
            r.lines
                .contains(&"exp:    2026-11-28 00:59:03 UTC (expired 3 min ago)".into()),
            "{:#?}",
            r.lines
        );
        assert!(
            r.lines
                .iter()
                .any(|l| l.starts_with("fix:") && l.contains("expired"))
        );

        p.as_object_mut().unwrap().remove("exp");
        assert!(!check(&decode(&jwt(&p)).unwrap(), NOW).ok);
    }

    #[test]
    fn padding_and_bearer_tolerated() {
        let header = URL_SAFE.encode(br#"{"alg":"none"}"#);
        let mut json = good().to_string();
        while json.len().is_multiple_of(3) {
            json.push(' ');
        }
        let body = URL_SAFE.encode(json.as_bytes());
        assert!(body.ends_with('='));
        let c = decode(&format!(" Bearer {header}.{body}.\n")).unwrap();
        assert!(check(&c, NOW).ok);
    }

    #[test]
    fn errors_do_not_echo_the_token() {
        let secretish = "eyJzZWNyZXQiOiJodW50ZXIyIn0";
        let bad_b64 = format!("{secretish}.!!!{secretish}!!!.sig");
        let not_json = format!(
            "{secretish}.{}.sig",
            URL_SAFE_NO_PAD.encode("hunter2-not-json")
        );
        let wrong_type = format!(
            "{secretish}.{}.sig",
            URL_SAFE_NO_PAD.encode(r#"{"aud": 1, "roles": "hunter2"}"#)
        );
        let wrong_type2 = format!(
            "{secretish}.{}.sig",
            URL_SAFE_NO_PAD.encode(r#"{"exp": "hunter2"}"#)
        );
        let cases = [
            String::new(),
            secretish.to_string(),
            format!("{secretish}.{secretish}"),
            bad_b64,
            not_json,
            wrong_type,
            wrong_type2,
            format!("{secretish}.{secretish}.{secretish}.{secretish}.{secretish}"),
        ];
        for token in cases {
            let err = decode(&token).unwrap_err();
            assert!(!err.contains(secretish), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
            assert!(!err.contains("!!!"), "{err}");
        }
    }

    #[test]
    fn time_formatting() {
        assert_eq!(utc(NOW), "2026-11-28 01:02:03 UTC");
        assert_eq!(utc(-5), "-5 (Unix time)");
        assert_eq!(relative(30), "in 30 s");
        assert_eq!(relative(-7200 - 300), "2 h 5 min ago");
        assert_eq!(relative(3 * 86_400), "in 3 days");
    }
}
