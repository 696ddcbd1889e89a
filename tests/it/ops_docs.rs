//! The operations docs agree with the program (issue 9 §6): docs/troubleshooting.md covers
//! every problem key the classifier can report, with the PowerShell commands its remedy names,
//! and every AADSTS code the token client explains; links between the docs resolve. Reads
//! repository files only; starts nothing.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use mailbridge::token::TokenError;
use mailbridge::upstream::exchange::classify::Problem;

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every problem the classifier knows. The match has no wildcard: a new variant does not
/// compile until it is listed here, and then this test asks for its section in the docs.
fn all_problems() -> Vec<Problem> {
    let all = vec![
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
        Problem::Token {
            meaning: "m".into(),
            remedy: "r".into(),
            temporary: false,
        },
    ];
    for p in &all {
        match p {
            Problem::AuthRejected
            | Problem::SmtpAuthDisabled
            | Problem::BasicAuthRejected
            | Problem::MailboxLogonFailure
            | Problem::SendAsDenied
            | Problem::QuotaExceeded
            | Problem::TooManyConnections
            | Problem::NotAuthenticated
            | Problem::SenderRestricted
            | Problem::TenantBlocked
            | Problem::UnregisteredDomain
            | Problem::XoauthInvalid
            | Problem::NoStartTls
            | Problem::NoXoauth2
            | Problem::Tls(_)
            | Problem::StartTlsInjection(_)
            | Problem::Unreachable(_)
            | Problem::Token { .. } => {}
        }
    }
    all
}

/// The Exchange Online PowerShell cmdlets a remedy names (`Set-CASMailbox`, ...).
fn cmdlets(remedy: &str) -> HashSet<String> {
    remedy
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| {
            ["Add-", "Get-", "New-", "Remove-", "Set-"]
                .iter()
                .any(|verb| w.starts_with(verb) && w.len() > verb.len())
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn troubleshooting_covers_every_problem_key_and_its_remedy_commands() {
    let doc = read(&repo_file("docs/troubleshooting.md"));
    for p in all_problems() {
        let key = p.key();
        assert!(
            doc.contains(&format!("`{key}`")),
            "docs/troubleshooting.md does not mention the problem key `{key}`"
        );
        for cmd in cmdlets(&p.remedy("relay@contoso.com", "11111111-app")) {
            assert!(
                doc.contains(&cmd),
                "the remedy for `{key}` names {cmd}, docs/troubleshooting.md does not"
            );
        }
    }
}

#[test]
fn troubleshooting_explains_every_aadsts_code_as_the_program_does() {
    let doc = read(&repo_file("docs/troubleshooting.md"));
    let generic = |code: Option<u32>| TokenError::Endpoint {
        status: 400,
        error: Some("invalid_client".into()),
        description: None,
        aadsts: code,
        retry_after: None,
    };
    let fallback = generic(None).meaning();
    // The codes of exchange-online.md's token table.
    for code in [7000215u32, 7000222, 700016, 90002, 700027] {
        let e = generic(Some(code));
        assert_ne!(
            e.meaning(),
            fallback,
            "src/token/error.rs has no meaning for AADSTS{code}"
        );
        assert!(
            doc.contains(&format!("AADSTS{code}")),
            "docs/troubleshooting.md does not explain AADSTS{code}"
        );
        assert!(
            doc.contains(e.meaning()),
            "docs/troubleshooting.md does not give AADSTS{code}'s meaning as logged: {:?}",
            e.meaning()
        );
    }
}

/// GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens, `-1`, `-2`
/// for repeats. Headings inside code blocks do not count.
fn anchors(markdown: &str) -> HashSet<String> {
    let mut seen = std::collections::HashMap::<String, usize>::new();
    let mut out = HashSet::new();
    let mut in_code = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        let Some(title) = line.strip_prefix('#') else {
            continue;
        };
        if in_code {
            continue;
        }
        let title = title.trim_start_matches('#');
        if !title.starts_with(' ') {
            continue;
        }
        let slug: String = title
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let n = seen.entry(slug.clone()).or_insert(0);
        out.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    out
}

/// Every link from the README and docs/*.md to a Markdown file in the repository points to a
/// file that exists, and to a heading that exists in it.
#[test]
fn links_between_the_docs_resolve() {
    let mut files = vec![repo_file("README.md")];
    for entry in std::fs::read_dir(repo_file("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    let mut broken = Vec::new();
    for file in &files {
        let text = read(file);
        let dir = file.parent().unwrap();
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let link = &rest[..end];
            if link.contains("://") || link.starts_with("mailto:") || link.contains(' ') {
                continue;
            }
            let (target, anchor) = link.split_once('#').unwrap_or((link, ""));
            let path = if target.is_empty() {
                file.clone()
            } else {
                dir.join(target)
            };
            if path.extension().is_none_or(|e| e != "md") {
                continue;
            }
            if !path.exists() {
                broken.push(format!("{}: {link} (no such file)", file.display()));
                continue;
            }
            if !anchor.is_empty() && !anchors(&read(&path)).contains(anchor) {
                broken.push(format!("{}: {link} (no such heading)", file.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// Every metric family the daemon registers, with the names a scrape shows: counters with
/// their `_total`. Read from a real encoding of [`Metrics::new`], so a metric added in
/// src/ops/metrics.rs shows up here without a list to keep in step.
///
/// [`Metrics::new`]: mailbridge::ops::metrics::Metrics::new
fn registered_metrics() -> Vec<String> {
    use mailbridge::ops::metrics::Metrics;
    use mailbridge::ops::model::{StatusReport, TokenStatus, UpstreamStatus};
    use mailbridge::outcome::{Outcome, UpstreamReply};

    let metrics = Metrics::new();
    // A labelled family without a series is not encoded at all: give each one a series.
    let _ = metrics.token_request_counters("contoso");
    let mut delivered = Outcome::delivered(UpstreamReply::default());
    delivered.upstream = "contoso".into();
    metrics.delivery(&delivered);
    let status = StatusReport {
        upstreams: vec![UpstreamStatus {
            name: "contoso".into(),
            state: "ok".into(),
            recipients_day: Some(1),
            token: Some(TokenStatus {
                expires_ms: Some(3_600_000),
                ..TokenStatus::default()
            }),
            ..UpstreamStatus::default()
        }],
        ..StatusReport::default()
    };
    let text = metrics.render(&status, 0);
    let mut names = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            panic!("malformed TYPE line: {line}");
        };
        names.push(if kind == "counter" && !name.ends_with("_total") {
            format!("{name}_total")
        } else {
            name.to_string()
        });
    }
    names
}

/// docs/operations.md names every metric a scrape shows and every `reason` of
/// `mailbridge_messages_rejected_total`, so that the page cannot fall behind the code.
#[test]
fn operations_doc_names_every_metric_and_reject_reason() {
    let doc = read(&repo_file("docs/operations.md"));
    let names = registered_metrics();
    // The encoding was read right: the issue's metrics are among them.
    for expected in [
        "mailbridge_sessions_total",
        "mailbridge_messages_accepted_total",
        "mailbridge_messages_rejected_total",
        "mailbridge_deliveries_total",
        "mailbridge_token_requests_total",
        "mailbridge_queue_messages",
        "mailbridge_queue_oldest_age_seconds",
        "mailbridge_token_expiry_seconds",
        "mailbridge_upstream_paused",
        "mailbridge_upstream_recipients_day",
        "mailbridge_accept_duration_seconds",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not found in the encoding: {names:?}"
        );
    }
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !doc.contains(&format!("`{n}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md does not name these metrics (in backticks): {missing:?}"
    );

    let reasons = mailbridge::ops::metrics::REJECT_REASONS;
    assert!(!reasons.is_empty());
    let missing: Vec<&&str> = reasons
        .iter()
        .filter(|r| !doc.contains(&format!("`{r}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md does not name these rejection reasons of mailbridge_messages_rejected_total (in backticks): {missing:?}"
    );
}
