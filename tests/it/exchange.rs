//! The Exchange Online upstream end to end: the real `mailbridge` binary relays into the fake
//! Exchange (STARTTLS with its own CA, XOAUTH2 checked against the tokens the fake token
//! endpoint issued). Assertions are on what reached the fake, the files in the spool and the
//! log lines.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::daemon::{LONG, Relay, RelayConfig, SHORT, Smtp};
use crate::fake_exchange::{FakeExchange, Rule, Stage};
use crate::fake_token::{Failure, FakeToken};

const MAILBOX: &str = "relay@contoso.com";
const CLIENT_ID: &str = "11111111-1111-1111-1111-111111111111";

struct Setup {
    dir: tempfile::TempDir,
    token: FakeToken,
    ex: FakeExchange,
}

impl Setup {
    async fn new(lifetime: Duration) -> Setup {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let token = FakeToken::start(lifetime).await;
        let ex = FakeExchange::start(token.issued(), MAILBOX).await;
        ex.write_ca(dir.path());
        Setup { dir, token, ex }
    }

    fn secret_file(&self) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.dir.path().join("client.secret");
        std::fs::write(&p, "fake-secret-value\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    /// One `exchange-online` upstream list item pointing at the fakes.
    fn upstream(&self, name: &str, ex: &FakeExchange, extra: &str) -> String {
        format!(
            "  - name: {name}\n    type: exchange-online\n    mailbox: {}\n    tenant_id: contoso.com\n    client_id: {CLIENT_ID}\n    client_secret_file: {:?}\n    host: localhost\n    port: {}\n    token_url: {:?}\n    ca_file: {:?}\n{extra}",
            ex.mailbox(),
            self.secret_file().display().to_string(),
            ex.addr().port(),
            self.token.url(),
            self.dir.path().join("ca.pem").display().to_string(),
        )
    }

    fn relay(&self, limits: &str, more: &str) -> RelayConfig {
        let mut rc = RelayConfig::new(self.dir.path());
        rc.upstreams = Some(self.upstream("contoso", &self.ex, &format!("{limits}{more}")));
        rc.retry = "[1s, 2s]";
        rc.queue_extra = "  postmaster: postmaster@contoso.com\n".into();
        rc.workers = 8;
        rc
    }
}

fn limits(conns: u32, per_minute: u32) -> String {
    format!("    limits:\n      connections: {conns}\n      messages_per_minute: {per_minute}\n")
}

fn message(from: &str, subject: &str) -> Vec<u8> {
    format!("From: <{from}>\r\nTo: <someone@fabrikam.com>\r\nSubject: {subject}\r\nDate: Sat, 28 Nov 2026 01:00:00 +0000\r\nMessage-ID: <{subject}@test>\r\n\r\nhello\r\n.leading dot\r\nbye\r\n").into_bytes()
}

/// Sends one message through the relay (blocking client on a blocking thread).
async fn send(addr: std::net::SocketAddr, from: &str, rcpts: &[&str], content: Vec<u8>) -> u16 {
    let from = from.to_string();
    let rcpts: Vec<String> = rcpts.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let mut c = Smtp::greet_ehlo(addr).unwrap();
        let r: Vec<&str> = rcpts.iter().map(String::as_str).collect();
        let reply = c.send_message(&from, &r, &content).unwrap();
        let _ = c.cmd("QUIT");
        reply.code
    })
    .await
    .unwrap()
}

/// One message from scanner@contoso.com to a@fabrikam.com; the relay must answer 250.
async fn send_scan(relay: &Relay, subject: &str) {
    let from = "scanner@contoso.com";
    let code = send(
        relay.addr(),
        from,
        &["a@fabrikam.com"],
        message(from, subject),
    )
    .await;
    assert_eq!(code, 250, "{}", relay.transcript());
}

/// `n` messages like [`send_scan`] at once (subjects `{prefix}0`, `{prefix}1`, ...).
async fn send_scans(relay: &Relay, n: usize, prefix: &str) {
    let from = "scanner@contoso.com";
    let sends: Vec<_> = (0..n)
        .map(|i| {
            tokio::spawn(send(
                relay.addr(),
                from,
                &["a@fabrikam.com"],
                message(from, &format!("{prefix}{i}")),
            ))
        })
        .collect();
    for h in sends {
        assert_eq!(h.await.unwrap(), 250, "{}", relay.transcript());
    }
}

async fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".msg"))
                .count()
        })
        .unwrap_or(0)
}

/// "delivery deferred" log lines whose error contains `needle`.
fn deferrals(relay: &Relay, needle: &str) -> usize {
    relay
        .logs()
        .iter()
        .filter(|v| {
            v["message"] == "delivery deferred"
                && v["error"].as_str().is_some_and(|e| e.contains(needle))
        })
        .count()
}

fn log_has(relay: &Relay, needle: &str) -> bool {
    relay.logs().iter().any(|v| v.to_string().contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_byte_exact_with_starttls_and_two_step_xoauth2() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    let relay = s.relay(&limits(3, 600), "").start();
    let content = message("scanner@contoso.com", "first");
    assert_eq!(
        send(
            relay.addr(),
            "scanner@contoso.com",
            &["a@fabrikam.com", "b@fabrikam.com"],
            content.clone()
        )
        .await,
        250
    );
    assert!(
        s.ex.wait_for_received(1, LONG).await,
        "{}",
        relay.transcript()
    );
    let got = &s.ex.received()[0];
    assert_eq!(got.mail_from, "scanner@contoso.com");
    assert_eq!(got.rcpt_to, vec!["a@fabrikam.com", "b@fabrikam.com"]);
    assert_eq!(got.auth_user, MAILBOX);
    // Our Received header first, then the message exactly as sent.
    assert!(
        got.data.starts_with(b"Received: "),
        "{}",
        String::from_utf8_lossy(&got.data)
    );
    assert!(
        got.data.ends_with(&content),
        "{}",
        String::from_utf8_lossy(&got.data)
    );
    assert!(!s.ex.bare_lf_seen());
    let auths = s.ex.auths();
    assert_eq!(auths.len(), 1);
    assert!(auths[0].accepted && !auths[0].inline, "{auths:?}");
    // The secret went in the form body; the spool is empty again.
    assert!(
        s.token
            .last_form()
            .iter()
            .any(|(k, v)| k == "client_secret" && v == "fake-secret-value")
    );
    assert!(wait_until(SHORT, || count_files(&relay.queue_dir()) == 0).await);
    // Nothing secret in the log.
    let logs = relay.transcript();
    assert!(!logs.contains("fake-secret-value"));
    for t in s.token.issued().0.lock().unwrap().keys() {
        assert!(!logs.contains(t.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_tokens_under_load_never_expired_at_auth_and_at_most_three_connections() {
    // Tokens live 4 s; the refresher renews at half-life. 40 messages over ~10 s.
    let s = Setup::new(Duration::from_secs(4)).await;
    let relay = s.relay(&limits(3, 6000), "").start();
    let addr = relay.addr();
    for i in 0..40 {
        let c = message("scanner@contoso.com", &format!("m{i}"));
        assert_eq!(
            send(addr, "scanner@contoso.com", &["a@fabrikam.com"], c).await,
            250
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        s.ex.wait_for_received(40, LONG).await,
        "{}",
        relay.transcript()
    );
    let auths = s.ex.auths();
    assert!(auths.iter().all(|a| !a.expired && a.accepted), "{auths:?}");
    assert!(
        auths.len() >= 2,
        "connections are re-authenticated as tokens age: {auths:?}"
    );
    assert!(
        s.ex.max_concurrent() <= 3,
        "max concurrent {}",
        s.ex.max_concurrent()
    );
    assert_eq!(s.ex.rejected_connections(), 0);
    assert!(s.token.requests() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_is_paced_and_capped_at_three_connections() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    // 120 per minute = one every 0.5 s.
    let relay = s.relay(&limits(3, 120), "").start();
    let start = Instant::now();
    send_scans(&relay, 8, "b").await;
    assert!(s.ex.wait_for_received(8, LONG).await);
    let took = start.elapsed();
    // From the first send: 8 messages at 0.5 s spacing need at least 3.5 s; none was
    // refused for throttling.
    assert!(took >= Duration::from_millis(3400), "took {took:?}");
    assert!(s.ex.max_concurrent() <= 3);
    assert_eq!(s.ex.rejected_connections(), 0);
    // Authenticated connections were reused (RSET between messages), not opened per message.
    assert!(
        s.ex.connections_total() <= 3,
        "{} connections for 8 messages",
        s.ex.connections_total()
    );
    assert_eq!(s.ex.auths().len(), s.ex.connections_total());
    let _ = relay;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_535s_cause_one_token_request_then_delivery() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    let relay = s.relay(&limits(3, 6000), "").start();
    // Warm up: one token, one delivery.
    send_scan(&relay, "warm").await;
    assert!(s.ex.wait_for_received(1, LONG).await);
    assert_eq!(s.token.requests(), 1);
    // Exchange now refuses the current token everywhere (as after a revocation).
    s.token.issued().revoke_all();
    // The idle authenticated connection is dropped when reused (at its RSET), so new
    // sessions must authenticate with the revoked token.
    s.ex.add_rule(Rule::drop_at(Stage::Rset));
    send_scans(&relay, 6, "c").await;
    assert!(
        s.ex.wait_for_received(7, LONG).await,
        "{}",
        relay.transcript()
    );
    assert_eq!(s.token.requests(), 2, "one forced refresh for all the 535s");
    let refused = s.ex.auths().iter().filter(|a| !a.accepted).count();
    assert!(refused >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_535_pauses_with_remedy_then_resumes_by_itself() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    s.ex.add_rule(Rule::reply(
        Stage::Auth,
        "535 5.7.3 Authentication unsuccessful [SN4PR]",
    ));
    let relay = s.relay(&limits(3, 6000), "").start();
    send_scan(&relay, "p1").await;
    assert!(
        relay.wait_log("upstream paused", LONG).is_some(),
        "{}",
        relay.transcript()
    );
    let paused = relay.wait_log("upstream paused", SHORT).unwrap();
    assert_eq!(paused["problem"], "auth_rejected");
    assert!(
        paused["remedy"]
            .as_str()
            .unwrap()
            .contains("Add-MailboxPermission -Identity relay@contoso.com")
    );
    // Never bounced: the message is still queued next to the alert (queued on its own
    // time, so waited for), nothing in failed/, no DSN.
    assert!(
        wait_until(SHORT, || queued_to(&relay, "postmaster@contoso.com") == 1).await,
        "{}",
        relay.transcript()
    );
    assert_eq!(queued_to(&relay, "a@fabrikam.com"), 1);
    assert_eq!(count_files(&relay.queue_dir()), 2);
    assert_eq!(count_files(&relay.spool.join("failed")), 0);
    // Fixed upstream: a probe finds out and everything goes out, the alert included.
    s.ex.clear_rules();
    assert!(
        s.ex.wait_for_received(2, LONG).await,
        "{}",
        relay.transcript()
    );
    assert!(
        relay
            .wait_log("upstream works again; delivery resumed", LONG)
            .is_some()
    );
    let got = s.ex.received();
    assert!(got.iter().any(|m| m.rcpt_to == vec!["a@fabrikam.com"]));
    let alert = got
        .iter()
        .find(|m| m.rcpt_to == vec!["postmaster@contoso.com"])
        .expect("postmaster alert");
    let text = String::from_utf8_lossy(&alert.data);
    assert!(
        text.contains("Subject: mailbridge: upstream contoso paused: auth_rejected"),
        "{text}"
    );
    assert!(text.contains("Add-MailboxPermission"), "{text}");
    // One "paused" line for the whole episode, however many attempts it took.
    let n = relay
        .logs()
        .iter()
        .filter(|v| v["message"] == "upstream paused")
        .count();
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_as_denied_fails_that_message_with_a_dsn_and_other_mail_flows() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    s.ex.set_send_as(Some(vec![]));
    let relay = s.relay(&limits(3, 6000), "").start();
    // From someone the mailbox may not send as.
    send_scan(&relay, "denied").await;
    // From the mailbox itself.
    assert_eq!(
        send(
            relay.addr(),
            MAILBOX,
            &["b@fabrikam.com"],
            message(MAILBOX, "allowed")
        )
        .await,
        250
    );
    // The allowed message and the DSN to scanner@ (sent as the mailbox) arrive.
    assert!(
        s.ex.wait_for_received(2, LONG).await,
        "{}",
        relay.transcript()
    );
    let got = s.ex.received();
    assert!(got.iter().any(|m| m.rcpt_to == vec!["b@fabrikam.com"]));
    let dsn = got
        .iter()
        .find(|m| m.rcpt_to == vec!["scanner@contoso.com"])
        .expect("DSN to the sender");
    assert_eq!(dsn.mail_from, MAILBOX);
    let text = String::from_utf8_lossy(&dsn.data);
    assert!(
        text.contains("multipart/report; report-type=delivery-status"),
        "{text}"
    );
    assert!(
        text.contains("Final-Recipient: rfc822; a@fabrikam.com"),
        "{text}"
    );
    assert!(text.contains("Action: failed"), "{text}");
    assert!(text.contains("Status: 5.7.60"), "{text}");
    assert!(text.contains("Diagnostic-Code: smtp; 550 5.7.60"), "{text}");
    assert!(
        text.contains("Subject: denied"),
        "original headers are included: {text}"
    );
    assert!(text.contains("Add-RecipientPermission"), "{text}");
    // The failed message stays in failed/ with its reason.
    assert!(wait_until(SHORT, || count_files(&relay.spool.join("failed")) == 1).await);
    assert!(wait_until(SHORT, || count_files(&relay.queue_dir()) == 0).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_rewrite_sends_as_the_mailbox_with_reply_to() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    s.ex.set_send_as(Some(vec![]));
    let relay = s
        .relay(&limits(3, 6000), "    sender_rewrite: mailbox\n")
        .start();
    send_scan(&relay, "rw").await;
    assert!(
        s.ex.wait_for_received(1, LONG).await,
        "{}",
        relay.transcript()
    );
    let m = &s.ex.received()[0];
    assert_eq!(m.mail_from, MAILBOX);
    let text = String::from_utf8_lossy(&m.data);
    assert!(text.contains("\r\nFrom: <relay@contoso.com>\r\n"), "{text}");
    assert!(
        text.contains("\r\nReply-To: <scanner@contoso.com>\r\n"),
        "{text}"
    );
    assert!(
        text.ends_with("\r\n\r\nhello\r\n.leading dot\r\nbye\r\n"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_recipient_refused_the_others_delivered_and_reported() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    s.ex.add_rule(
        Rule::reply(
            Stage::Rcpt,
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found",
        )
        .when("nobody@"),
    );
    let relay = s.relay(&limits(3, 6000), "").start();
    assert_eq!(
        send(
            relay.addr(),
            "scanner@contoso.com",
            &["a@fabrikam.com", "nobody@fabrikam.com", "c@fabrikam.com"],
            message("scanner@contoso.com", "partial")
        )
        .await,
        250
    );
    assert!(
        s.ex.wait_for_received(2, LONG).await,
        "{}",
        relay.transcript()
    );
    let got = s.ex.received();
    assert_eq!(got[0].rcpt_to, vec!["a@fabrikam.com", "c@fabrikam.com"]);
    let dsn = String::from_utf8_lossy(&got[1].data).into_owned();
    assert_eq!(got[1].rcpt_to, vec!["scanner@contoso.com"]);
    assert!(
        dsn.contains("Final-Recipient: rfc822; nobody@fabrikam.com"),
        "{dsn}"
    );
    assert!(
        !dsn.contains("Final-Recipient: rfc822; a@fabrikam.com"),
        "{dsn}"
    );
    assert!(dsn.contains("Status: 5.1.10"), "{dsn}");
}

/// The delivery log (issue 9 §2): one "delivery" line per recipient outcome, with the
/// queue id, client, sender, recipient, upstream, verdict, reply, attempt and delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_log_has_one_line_per_recipient_outcome() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    s.ex.add_rule(
        Rule::reply(
            Stage::Rcpt,
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found",
        )
        .when("nobody@"),
    );
    s.ex.add_rule(Rule::reply(Stage::Rcpt, "451 4.4.3 Try again later").when("later@"));
    let relay = s.relay(&limits(3, 6000), "").start();
    assert_eq!(
        send(
            relay.addr(),
            "scanner@contoso.com",
            &[
                "a@fabrikam.com",
                "nobody@fabrikam.com",
                "later@fabrikam.com"
            ],
            message("scanner@contoso.com", "log")
        )
        .await,
        250
    );
    let lines = |rcpt: &str| -> Vec<serde_json::Value> {
        relay
            .logs()
            .into_iter()
            .filter(|v| v["message"] == "delivery" && v["recipient"] == rcpt)
            .collect()
    };
    assert!(
        wait_until(LONG, || ["a@", "nobody@", "later@"]
            .iter()
            .all(|r| !lines(&format!("{r}fabrikam.com")).is_empty()))
        .await,
        "{}",
        relay.transcript()
    );
    let a = &lines("a@fabrikam.com")[0];
    let queue_id = a["queue_id"].as_str().unwrap().to_string();
    assert_eq!(queue_id.len(), 32, "{a}");
    assert_eq!(a["verdict"], "delivered", "{a}");
    assert_eq!(a["client"], "127.0.0.1", "{a}");
    assert_eq!(a["sender"], "scanner@contoso.com", "{a}");
    assert_eq!(a["upstream"], "contoso", "{a}");
    assert_eq!(a["code"], 250, "{a}");
    assert_eq!(a["attempt"], 1, "{a}");
    assert!(a["delay_s"].as_f64().is_some_and(|d| d >= 0.0), "{a}");
    let nobody = &lines("nobody@fabrikam.com")[0];
    assert_eq!(nobody["queue_id"], queue_id.as_str(), "{nobody}");
    assert_eq!(nobody["verdict"], "bounced", "{nobody}");
    assert_eq!(nobody["step"], "RCPT TO", "{nobody}");
    assert_eq!(nobody["code"], 550, "{nobody}");
    assert_eq!(nobody["enhanced"], "5.1.10", "{nobody}");
    assert!(
        nobody["reply"]
            .as_str()
            .is_some_and(|t| t.contains("RecipientNotFound")),
        "{nobody}"
    );
    let later = &lines("later@fabrikam.com")[0];
    assert_eq!(later["verdict"], "deferred", "{later}");
    assert_eq!(later["code"], 451, "{later}");
    assert_eq!(later["enhanced"], "4.4.3", "{later}");
    assert!(
        later["next_attempt"]
            .as_str()
            .is_some_and(|t| t.ends_with("GMT")),
        "{later}"
    );
    // Final outcomes are logged once; the deferred recipient once per attempt (queue.retry
    // is 1 s here, so there may be more by now), each with its attempt number.
    for r in ["a@fabrikam.com", "nobody@fabrikam.com"] {
        assert_eq!(lines(r).len(), 1, "{r}: {}", relay.transcript());
    }
    let attempts: Vec<u64> = lines("later@fabrikam.com")
        .iter()
        .map(|v| v["attempt"].as_u64().unwrap())
        .collect();
    assert_eq!(attempts, (1..=attempts.len() as u64).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_pick_the_upstream_by_sender() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    let fab = FakeExchange::start(s.token.issued(), "relay@fabrikam.com").await;
    // Both fakes use certificates from their own CA: write the second one next to the first.
    let ca2 = s.dir.path().join("ca2");
    std::fs::create_dir_all(&ca2).unwrap();
    fab.write_ca(&ca2);
    let mut rc = s.relay(&limits(3, 6000), "");
    let second = s.upstream("fabrikam", &fab, &limits(3, 6000)).replace(
        &s.dir.path().join("ca.pem").display().to_string(),
        &ca2.join("ca.pem").display().to_string(),
    );
    rc.upstreams = Some(format!("{}{second}", rc.upstreams.unwrap()));
    rc.extra = "routes:\n  - sender: \"*@fabrikam.com\"\n    upstream: fabrikam\n".into();
    let relay = rc.start();
    assert_eq!(
        send(
            relay.addr(),
            "printer@fabrikam.com",
            &["x@example.org"],
            message("printer@fabrikam.com", "f")
        )
        .await,
        250
    );
    assert_eq!(
        send(
            relay.addr(),
            "printer@contoso.com",
            &["y@example.org"],
            message("printer@contoso.com", "c")
        )
        .await,
        250
    );
    assert!(
        fab.wait_for_received(1, LONG).await,
        "{}",
        relay.transcript()
    );
    assert!(
        s.ex.wait_for_received(1, LONG).await,
        "{}",
        relay.transcript()
    );
    assert_eq!(fab.received()[0].rcpt_to, vec!["x@example.org"]);
    assert_eq!(fab.received()[0].auth_user, "relay@fabrikam.com");
    assert_eq!(s.ex.received()[0].rcpt_to, vec!["y@example.org"]);
    // One refresher for the shared (token URL, client id, scope).
    assert_eq!(s.token.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_connections_lowers_concurrency_and_everything_arrives() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    s.ex.set_max_connections(1);
    let relay = s.relay(&limits(3, 6000), "").start();
    send_scans(&relay, 6, "t").await;
    assert!(
        s.ex.wait_for_received(6, LONG).await,
        "{}",
        relay.transcript()
    );
    assert!(wait_until(SHORT, || count_files(&relay.queue_dir()) == 0).await);
    assert_eq!(count_files(&relay.spool.join("failed")), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_exceeded_defers_and_holds_instead_of_bouncing() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    s.ex.add_rule(Rule::reply(Stage::Dot, "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message").times(1));
    let relay = s.relay(&limits(3, 6000), "").start();
    send_scan(&relay, "q").await;
    let held = relay.wait_log("upstream held", LONG).expect("held");
    assert_eq!(held["problem"], "recipient_quota_exceeded", "{held}");
    assert!(
        held["remedy"]
            .as_str()
            .unwrap()
            .contains("recipients_per_day"),
        "{held}"
    );
    // Held ~1 h: the next attempts (every 2 s, the longest queue.retry) are deferred by the
    // hold without reaching Exchange. Shown by those deferrals, not by waiting.
    let conns = s.ex.connections_total();
    assert!(
        wait_until(LONG, || deferrals(&relay, "the mailbox reached") >= 2).await,
        "{}",
        relay.transcript()
    );
    assert_eq!(
        s.ex.connections_total(),
        conns,
        "no new connection while held"
    );
    assert_eq!(count_files(&relay.queue_dir()), 1);
    assert_eq!(count_files(&relay.spool.join("failed")), 0);
    assert_eq!(s.ex.received_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_lost_after_the_dot_is_retried_as_a_possible_duplicate() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    s.ex.add_rule(Rule::drop_at(Stage::Dot).times(1));
    let relay = s.relay(&limits(3, 6000), "").start();
    send_scan(&relay, "dup").await;
    assert!(
        s.ex.wait_for_received(2, LONG).await,
        "{}",
        relay.transcript()
    );
    // The log is read from the daemon's stdout by another thread: wait for the line.
    assert!(wait_until(SHORT, || log_has(&relay, "possible duplicate")).await);
    let got = s.ex.received();
    assert_eq!(got[0].data, got[1].data);
    assert!(wait_until(SHORT, || count_files(&relay.queue_dir()) == 0).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_wide_smtp_auth_disabled_pauses_and_explains() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    s.ex.add_rule(Rule::reply(Stage::Auth, "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant."));
    let relay = s.relay(&limits(3, 6000), "").start();
    send_scan(&relay, "t").await;
    let v = relay.wait_log("upstream paused", LONG).expect("paused");
    assert_eq!(v["problem"], "smtp_auth_disabled");
    let remedy = v["remedy"].as_str().unwrap();
    assert!(
        remedy.contains(
            "Set-CASMailbox -Identity relay@contoso.com -SmtpClientAuthenticationDisabled $false"
        ),
        "{remedy}"
    );
    assert!(!remedy.contains("Set-TransportConfig"), "{remedy}");
    // No forced token refresh for this one: it is not a token problem.
    assert!(
        !log_has(
            &relay,
            "token refused; fetching a new one and retrying once"
        ),
        "{}",
        relay.transcript()
    );
    // Still queued (next to the postmaster alert, queued on its own time: waited for).
    assert!(
        wait_until(SHORT, || queued_to(&relay, "postmaster@contoso.com") == 1).await,
        "{}",
        relay.transcript()
    );
    assert_eq!(queued_to(&relay, "a@fabrikam.com"), 1);
    assert_eq!(count_files(&relay.spool.join("failed")), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_client_secret_is_explained_and_mail_waits() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    s.token.fail_always(Some(Failure::invalid_secret()));
    let relay = s.relay(&limits(3, 6000), "").start();
    send_scan(&relay, "t").await;
    assert!(
        relay.wait_log("upstream paused", LONG).is_some(),
        "{}",
        relay.transcript()
    );
    assert!(log_has(&relay, "7000215"), "{}", relay.transcript());
    assert!(
        wait_until(SHORT, || queued_to(&relay, "postmaster@contoso.com") == 1).await,
        "{}",
        relay.transcript()
    );
    assert_eq!(queued_to(&relay, "a@fabrikam.com"), 1);
    assert!(!relay.transcript().contains("fake-secret-value"));
    s.token.fail_always(None);
    assert!(
        s.ex.wait_for_received(1, LONG).await,
        "{}",
        relay.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_credential_sends_a_client_assertion_the_endpoint_verifies() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    let dir = s.dir.path();
    let ok = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=mailbridge-test",
        ])
        .arg("-keyout")
        .arg(dir.join("app.key"))
        .arg("-out")
        .arg(dir.join("app.crt"))
        .output()
        .expect("openssl");
    assert!(ok.status.success());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("app.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    s.token
        .expect_certificate(&std::fs::read_to_string(dir.join("app.crt")).unwrap());
    let mut rc = s.relay(&limits(3, 6000), "");
    let up = rc.upstreams.take().unwrap();
    let secret_line = up
        .lines()
        .find(|l| l.contains("client_secret_file"))
        .unwrap()
        .to_string();
    rc.upstreams = Some(up.replace(
        &secret_line,
        &format!(
            "    certificate: {{cert_file: {:?}, key_file: {:?}}}",
            dir.join("app.crt").display().to_string(),
            dir.join("app.key").display().to_string()
        ),
    ));
    let relay = rc.start();
    send_scan(&relay, "cert").await;
    assert!(
        s.ex.wait_for_received(1, LONG).await,
        "{}",
        relay.transcript()
    );
    let form = s.token.last_form();
    assert!(form.iter().any(|(k, _)| k == "client_assertion"));
    // The certificate made with `-days 2` is flagged at start.
    let warned = relay
        .logs()
        .into_iter()
        .find(|v| v["problem"] == "certificate_expires_soon")
        .expect("expiry warning");
    assert!(
        warned["message"].as_str().unwrap().contains("in 1 day:")
            || warned["message"].as_str().unwrap().contains("in 2 days"),
        "{warned}"
    );
    assert!(!form.iter().any(|(k, _)| k == "client_secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_envelopes_are_split_and_the_daily_recipient_cap_holds_mail() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    let lim = "    limits:\n      recipients_per_message: 2\n      recipients_per_day: 6\n      messages_per_minute: 6000\n";
    let relay = s.relay(lim, "").start();
    let rcpts = [
        "r1@fabrikam.com",
        "r2@fabrikam.com",
        "r3@fabrikam.com",
        "r4@fabrikam.com",
        "r5@fabrikam.com",
    ];
    assert_eq!(
        send(
            relay.addr(),
            "scanner@contoso.com",
            &rcpts,
            message("scanner@contoso.com", "split")
        )
        .await,
        250
    );
    assert!(
        s.ex.wait_for_received(3, LONG).await,
        "{}",
        relay.transcript()
    );
    let got = s.ex.received();
    let sizes: Vec<usize> = got.iter().map(|m| m.rcpt_to.len()).collect();
    assert_eq!(sizes, vec![2, 2, 1]);
    assert!(got.iter().all(|m| m.data == got[0].data));
    // 5 of 6 used: a message for 2 more recipients is held, not sent into a 554.
    assert_eq!(
        send(
            relay.addr(),
            "scanner@contoso.com",
            &["r6@fabrikam.com", "r7@fabrikam.com"],
            message("scanner@contoso.com", "over")
        )
        .await,
        250
    );
    let held = relay.wait_log("upstream held", LONG).expect("held");
    assert!(
        held["reason"]
            .as_str()
            .unwrap()
            .contains("recipients_per_day"),
        "{held}"
    );
    // Its next attempts are deferred by the hold (the reason starts with the key): shown by
    // those deferrals, not by waiting.
    assert!(
        wait_until(LONG, || deferrals(&relay, "limits.recipients_per_day") >= 2).await,
        "{}",
        relay.transcript()
    );
    assert_eq!(s.ex.received_count(), 3);
    assert_eq!(count_files(&relay.queue_dir()), 1);
    // The count survives a restart (the file under state_dir).
    let counter = s.dir.path().join("state/upstreams/contoso.recipients.json");
    assert!(
        wait_until(SHORT, || std::fs::read_to_string(&counter)
            .is_ok_and(|t| t.contains('5')))
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_command_shows_claims_never_the_token() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    let rc = s.relay(&limits(3, 30), "");
    std::fs::write(rc.path(), rc.yaml()).unwrap();
    let path = rc.path();
    let out = tokio::task::spawn_blocking(move || {
        crate::daemon::mailbridge_cmd()
            .args(["token", "-c"])
            .arg(&path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("SMTP.SendAsApp"), "{stdout}");
    assert!(stdout.contains("https://outlook.office365.com"), "{stdout}");
    assert!(stdout.contains(CLIENT_ID), "{stdout}");
    assert!(stdout.contains("result:    ok"), "{stdout}");
    for t in s.token.issued().0.lock().unwrap().keys() {
        assert!(!stdout.contains(t.as_str()));
        // Not even the signature part.
        assert!(!stdout.contains(t.rsplit('.').next().unwrap()));
    }
    assert!(!stdout.contains("fake-secret-value"));

    // Without the role: exit 1 and the portal step.
    s.token.set_roles(vec![]);
    let path = rc.path();
    let out = tokio::task::spawn_blocking(move || {
        crate::daemon::mailbridge_cmd()
            .args(["token", "-c"])
            .arg(&path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("API permissions"), "{stdout}");

    // A refused secret: the AADSTS code and its remedy, exit 1.
    s.token.fail_always(Some(Failure::invalid_secret()));
    let path = rc.path();
    let out = tokio::task::spawn_blocking(move || {
        crate::daemon::mailbridge_cmd()
            .args(["token", "-c"])
            .arg(&path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("AADSTS7000215"), "{all}");
    assert!(!all.contains("fake-secret-value"));
}

/// A session opened with the library API straight against the fake, with short timeouts.
async fn direct_session(
    s: &Setup,
    timeouts: mailbridge::upstream::exchange::conn::Timeouts,
) -> mailbridge::upstream::exchange::conn::Session {
    use mailbridge::upstream::exchange::conn::{Endpoint, open};
    let ep = Endpoint {
        host: "localhost".into(),
        port: s.ex.addr().port(),
        helo: "relay.test".into(),
        tls: Endpoint::tls_parameters("localhost", Some(&s.dir.path().join("ca.pem"))).unwrap(),
        timeouts,
    };
    let creds = mailbridge::token::ClientCredentials {
        token_url: s.token.url(),
        client_id: CLIENT_ID.into(),
        scope: "https://outlook.office365.com/.default".into(),
        secret: mailbridge::token::ClientSecret::Secret(mailbridge::secret::Secret::new(
            "fake-secret-value",
        )),
    };
    let http = mailbridge::token::http_client().unwrap();
    let token = mailbridge::token::fetch(&http, &creds).await.unwrap();
    let mut session = open(&ep).await.unwrap();
    session.auth_xoauth2(MAILBOX, &token.value).await.unwrap();
    session
}

/// Fails after handing out `ok` bytes.
struct FailingReader {
    data: Vec<u8>,
    pos: usize,
    ok: usize,
}

impl std::io::Read for FailingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.ok {
            return Err(std::io::Error::other("EIO (simulated)"));
        }
        let n = buf
            .len()
            .min(self.ok - self.pos)
            .min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_read_error_mid_message_never_sends_the_final_dot() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    let mut session = direct_session(&s, Default::default()).await;
    session
        .mail("scanner@contoso.com", None, false)
        .await
        .unwrap();
    session.rcpt("a@fabrikam.com").await.unwrap();
    let mut data = b"Subject: big\r\n\r\n".to_vec();
    while data.len() < 300_000 {
        data.extend_from_slice(
            b"0123456789012345678901234567890123456789012345678901234567890123456789\r\n",
        );
    }
    let len = data.len() as u64;
    let reader = FailingReader {
        data,
        pos: 0,
        ok: 200_000,
    };
    let r = session.data(Vec::new(), len, reader).await;
    assert!(r.is_err(), "{r:?}");
    drop(session);
    // The fake ends the session when the relay closes it; only then is it certain that
    // nothing more arrives.
    assert!(wait_until(SHORT, || s.ex.open_connections() == 0).await);
    assert_eq!(
        s.ex.received_count(),
        0,
        "a truncated message must never be accepted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_after_the_dot_times_out() {
    use mailbridge::upstream::exchange::classify::Step;
    use mailbridge::upstream::exchange::conn::{StepError, Timeouts};
    let s = Setup::new(Duration::from_secs(3600)).await;
    s.ex.add_rule(Rule::hang_at(Stage::Dot));
    let t = Timeouts {
        data_term: Duration::from_secs(1),
        data_block: Duration::from_secs(1),
        ..Timeouts::default()
    };
    let mut session = direct_session(&s, t).await;
    session
        .mail("scanner@contoso.com", None, false)
        .await
        .unwrap();
    session.rcpt("a@fabrikam.com").await.unwrap();
    let started = Instant::now();
    let data = b"Subject: hang\r\n\r\nx\r\n".to_vec();
    let len = data.len() as u64;
    let r = session
        .data(Vec::new(), len, std::io::Cursor::new(data))
        .await;
    match r {
        Err(StepError::Broken {
            step: Step::Dot,
            what,
            ..
        }) => assert!(what.contains("timeout"), "{what}"),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));

    // MAIL that never gets a reply times out too.
    s.ex.clear_rules();
    s.ex.add_rule(Rule::hang_at(Stage::Mail));
    let t = Timeouts {
        mail: Duration::from_secs(1),
        ..Timeouts::default()
    };
    let mut session = direct_session(&s, t).await;
    match session.mail("scanner@contoso.com", None, false).await {
        Err(StepError::Broken {
            step: Step::Mail, ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_accepts_the_upstream_and_rejects_a_bad_ca_file() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    let rc = s.relay(&limits(3, 30), "");
    std::fs::write(rc.path(), rc.yaml()).unwrap();
    let check = |path: PathBuf| {
        crate::daemon::mailbridge_cmd()
            .args(["check-config", "-c"])
            .arg(path)
            .output()
            .unwrap()
    };
    let out = check(rc.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        s.dir.path().join("ca.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let out = check(rc.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("upstreams[0].ca_file"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_for_send_slots_and_keeps_the_mail() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    // Two per minute: after the first message the next slot is 30 s away.
    let mut relay = s.relay(&limits(3, 2), "").start();
    for i in 0..3 {
        let c = message("scanner@contoso.com", &format!("s{i}"));
        assert_eq!(
            send(relay.addr(), "scanner@contoso.com", &["a@fabrikam.com"], c).await,
            250
        );
    }
    assert!(s.ex.wait_for_received(1, LONG).await);
    // The others take a connection (the pooled one, or a new one with AUTH) before they
    // wait for their send slots (30 s and 60 s away): wait until a second connection has
    // authenticated, so SIGTERM finds at least one of them waiting.
    assert!(
        wait_until(SHORT, || s.ex.auths().len() >= 2).await,
        "{:?}",
        s.ex.auths()
    );
    relay.sigterm();
    // Well before the 25 s grace: nobody waits for a slot 30 s away.
    let status = tokio::task::spawn_blocking(move || {
        let st = relay.wait_exit(Duration::from_secs(15));
        (st, relay)
    })
    .await
    .unwrap();
    let (st, relay) = status;
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", relay.transcript());
    assert_eq!(s.ex.received_count(), 1);
    assert_eq!(
        count_files(&relay.queue_dir()),
        2,
        "the other two stay queued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_sending_as_the_same_mailbox_share_its_three_connections() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    let mut rc = s.relay(&limits(3, 6000), "");
    let second = s.upstream(
        "contoso-rewrite",
        &s.ex,
        &format!("{}    sender_rewrite: mailbox\n", limits(3, 6000)),
    );
    rc.upstreams = Some(format!("{}{second}", rc.upstreams.unwrap()));
    rc.extra =
        "routes:\n  - sender: \"*@printers.contoso.com\"\n    upstream: contoso-rewrite\n".into();
    let relay = rc.start();
    let addr = relay.addr();
    let mut sends = Vec::new();
    for i in 0..12 {
        let from = if i % 2 == 0 {
            "scan@contoso.com"
        } else {
            "mfp@printers.contoso.com"
        };
        sends.push(tokio::spawn(send(
            addr,
            from,
            &["a@fabrikam.com"],
            message(from, &format!("m{i}")),
        )));
    }
    for h in sends {
        assert_eq!(h.await.unwrap(), 250);
    }
    assert!(
        s.ex.wait_for_received(12, LONG).await,
        "{}",
        relay.transcript()
    );
    assert!(
        s.ex.max_concurrent() <= 3,
        "max concurrent {}",
        s.ex.max_concurrent()
    );
    assert_eq!(s.ex.rejected_connections(), 0);
    // The second upstream rewrote its senders, the first did not.
    let got = s.ex.received();
    assert_eq!(got.iter().filter(|m| m.mail_from == MAILBOX).count(), 6);
    assert_eq!(
        got.iter()
            .filter(|m| m.mail_from == "scan@contoso.com")
            .count(),
        6
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_that_fails_after_auth_keeps_the_upstream_paused() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    // Authentication works, but the mailbox cannot be opened at the end of data.
    s.ex.add_rule(Rule::reply(
        Stage::Dot,
        "430 4.2.0 STOREDRV; mailbox logon failure",
    ));
    let relay = s.relay(&limits(3, 6000), "").start();
    send_scan(&relay, "logon").await;
    let v = relay.wait_log("upstream paused", LONG).expect("paused");
    assert_eq!(v["problem"], "mailbox_logon_failure");
    assert!(
        v["remedy"]
            .as_str()
            .unwrap()
            .contains("Add-MailboxPermission -Identity relay@contoso.com")
    );
    // Probes (after 1 s, then 2 s) reach Exchange and fail the same way: still paused.
    assert!(
        relay.wait_log("upstream still paused", LONG).is_some(),
        "{}",
        relay.transcript()
    );
    assert!(
        !log_has(&relay, "upstream works again"),
        "{}",
        relay.transcript()
    );
    assert!(
        wait_until(SHORT, || count_files(&relay.queue_dir()) == 2).await,
        "the message and the alert wait"
    );
    assert_eq!(s.ex.received_count(), 0);
}

/// Messages in `queue/` addressed to `rcpt` (the spool's envelope files name recipients).
fn queued_to(relay: &Relay, rcpt: &str) -> usize {
    std::fs::read_dir(relay.queue_dir())
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".msg"))
                .filter(|e| {
                    std::fs::read(e.path())
                        .map(|b| String::from_utf8_lossy(&b).contains(rcpt))
                        .unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0)
}

/// A sender or tenant block (`reply` at `stage`): the upstream pauses with the remedy, the
/// message is never bounced, probes come at the longest `queue.retry` interval (15 min by
/// default), and once Exchange lifts the block everything goes out by itself.
async fn sender_block_pauses_then_resumes(stage: Stage, reply: &str, problem: &str) {
    let s = Setup::new(Duration::from_secs(3600)).await;
    s.ex.add_rule(Rule::reply(stage, reply));
    let relay = s.relay(&limits(3, 6000), "").start();
    send_scan(&relay, "blocked").await;
    let v = relay.wait_log("upstream paused", LONG).expect("paused");
    assert_eq!(v["problem"], problem, "{v}");
    let remedy = v["remedy"].as_str().unwrap();
    for want in [
        "Restricted entities",
        "probes every 15 minutes and resumes by itself",
    ] {
        assert!(remedy.contains(want), "{want}: {remedy}");
    }
    // Not along queue.retry's back-off (1 s first): at its longest interval.
    assert_eq!(v["next_probe"], "2s", "{v}");
    // A probe fails the same way: still paused, nothing bounced, no second alert.
    assert!(
        relay.wait_log("upstream still paused", LONG).is_some(),
        "{}",
        relay.transcript()
    );
    assert_eq!(count_files(&relay.spool.join("failed")), 0);
    assert_eq!(s.ex.received_count(), 0);
    assert!(
        wait_until(SHORT, || queued_to(&relay, "postmaster@contoso.com") == 1).await,
        "the alert waits too"
    );
    // Microsoft lifts the block: the next probe goes through and the upstream resumes.
    s.ex.clear_rules();
    assert!(
        relay
            .wait_log("upstream works again; delivery resumed", LONG)
            .is_some(),
        "{}",
        relay.transcript()
    );
    assert!(
        s.ex.wait_for_received(3, LONG).await,
        "{}",
        relay.transcript()
    );
    assert!(wait_until(SHORT, || count_files(&relay.queue_dir()) == 0).await);
    assert_eq!(count_files(&relay.spool.join("failed")), 0);
    let got = s.ex.received();
    assert!(got.iter().any(|m| m.rcpt_to == vec!["a@fabrikam.com"]));
    // Alerts: "paused" and "works again", to the postmaster; no DSN to the sender.
    let alerts: Vec<String> = got
        .iter()
        .filter(|m| m.rcpt_to == vec!["postmaster@contoso.com"])
        .map(|m| String::from_utf8_lossy(&m.data).into_owned())
        .collect();
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert!(
        alerts
            .iter()
            .any(|a| a.contains(&format!("paused: {problem}")) && a.contains("Restricted entities")),
        "{alerts:?}"
    );
    assert!(!got.iter().any(|m| m.rcpt_to == vec!["scanner@contoso.com"]));
    let n = relay
        .logs()
        .iter()
        .filter(|v| v["message"] == "upstream paused")
        .count();
    assert_eq!(n, 1, "one pause for the whole episode");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_outbound_sender_5_1_8_pauses_never_bounces_and_resumes_by_itself() {
    use crate::fake_exchange::REPLY_BAD_OUTBOUND_SENDER;
    sender_block_pauses_then_resumes(Stage::Mail, REPLY_BAD_OUTBOUND_SENDER, "sender_restricted")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_threshold_5_7_705_pauses_never_bounces_and_resumes_by_itself() {
    use crate::fake_exchange::REPLY_TENANT_THRESHOLD;
    sender_block_pauses_then_resumes(Stage::Dot, REPLY_TENANT_THRESHOLD, "tenant_blocked").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregistered_domain_5_7_750_bounces_only_that_domain() {
    use crate::fake_exchange::REPLY_UNREGISTERED_DOMAIN;
    let s = Setup::new(Duration::from_secs(3600)).await;
    s.ex.add_rule(
        Rule::reply(Stage::Mail, REPLY_UNREGISTERED_DOMAIN).when("@unregistered.example"),
    );
    let relay = s.relay(&limits(3, 6000), "").start();
    let stray = "scanner@unregistered.example";
    assert_eq!(
        send(
            relay.addr(),
            stray,
            &["a@fabrikam.com"],
            message(stray, "stray")
        )
        .await,
        250
    );
    send_scan(&relay, "fine").await;
    // The message from the registered domain and the DSN to the stray sender arrive.
    assert!(
        s.ex.wait_for_received(2, LONG).await,
        "{}",
        relay.transcript()
    );
    let got = s.ex.received();
    assert!(
        got.iter()
            .any(|m| m.mail_from == "scanner@contoso.com" && m.rcpt_to == vec!["a@fabrikam.com"])
    );
    let dsn = got
        .iter()
        .find(|m| m.rcpt_to == vec![stray])
        .expect("DSN to the sender");
    let text = String::from_utf8_lossy(&dsn.data);
    assert!(text.contains("Status: 5.7.750"), "{text}");
    // The explanation is wrapped: compare with single spaces.
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        flat.contains("verify it in the Microsoft 365 admin center > Settings > Domains"),
        "{text}"
    );
    assert!(wait_until(SHORT, || count_files(&relay.spool.join("failed")) == 1).await);
    assert!(wait_until(SHORT, || count_files(&relay.queue_dir()) == 0).await);
    assert!(
        !log_has(&relay, "upstream paused"),
        "{}",
        relay.transcript()
    );
}

/// What a man in the middle sends after the 220 to STARTTLS so that the relay, reading it
/// after the upgrade, sees the EHLO reply and then `rest` as Exchange's answers.
fn injected(rest: &str) -> String {
    format!(
        "250-fake.outlook.office365.com Hello\r\n250-AUTH LOGIN XOAUTH2\r\n250 SMTPUTF8\r\n{rest}"
    )
}

/// Injected replies after the 220 to STARTTLS are never believed: the connection is closed
/// as tampered with, the message stays queued (no bounce, no hold, no alert) and goes out
/// later over a clean connection, exactly once.
async fn starttls_injection_is_refused(rest: &str) {
    let s = Setup::new(Duration::from_secs(3600)).await;
    s.ex.inject_after_starttls(&injected(rest), 1);
    let relay = s.relay(&limits(3, 6000), "").start();
    send_scan(&relay, "inj").await;
    let v = relay.wait_log("upstream paused", LONG).expect("paused");
    assert_eq!(v["problem"], "starttls_injection", "{v}");
    assert!(
        v["remedy"].as_str().unwrap().contains("SMTP inspection"),
        "{v}"
    );
    let injected = s.ex.injected_connections();
    assert_eq!(injected.len(), 1);
    // The relay never finished the handshake on that connection.
    assert!(
        wait_until(SHORT, || s.ex.tls_failed_connections() == injected).await,
        "{:?} {:?}",
        s.ex.tls_failed_connections(),
        injected
    );
    // Later, over a clean connection, the message goes out once.
    assert!(
        s.ex.wait_for_received(1, LONG).await,
        "{}",
        relay.transcript()
    );
    assert!(wait_until(SHORT, || count_files(&relay.queue_dir()) == 0).await);
    let got = s.ex.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].rcpt_to, vec!["a@fabrikam.com"]);
    assert!(!injected.contains(&got[0].conn));
    assert!(s.ex.auths().iter().all(|a| !injected.contains(&a.conn)));
    assert_eq!(count_files(&relay.spool.join("failed")), 0);
    assert!(!log_has(&relay, "upstream held"), "{}", relay.transcript());
    assert!(!log_has(&relay, "delivery failed permanently"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_injection_of_a_fake_235_is_refused() {
    starttls_injection_is_refused("334 \r\n235 2.7.0 Authentication successful\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_injection_of_a_fake_250_to_the_dot_is_refused() {
    starttls_injection_is_refused(
        "334 \r\n235 2.7.0 Authentication successful\r\n250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n354 Start mail input; end with <CRLF>.<CRLF>\r\n250 2.6.0 <fake@x> [InternalId=1] Queued mail for delivery\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_injection_of_a_fake_550_is_refused() {
    starttls_injection_is_refused(
        "334 \r\n235 2.7.0 Authentication successful\r\n250 2.1.0 Sender OK\r\n550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_injection_of_a_quota_reply_is_refused() {
    starttls_injection_is_refused(
        "334 \r\n235 2.7.0 Authentication successful\r\n250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n354 Start mail input; end with <CRLF>.<CRLF>\r\n554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_claiming_an_endless_lifetime_panics_nothing() {
    let s = Setup::new(Duration::from_secs(3600)).await;
    // 2^64-1 seconds: `now + expires_in` would overflow.
    s.token.claim_expires_in(Some(u64::MAX));
    let relay = s.relay(&limits(3, 6000), "").start();
    send_scan(&relay, "endless").await;
    assert!(
        s.ex.wait_for_received(1, LONG).await,
        "{}",
        relay.transcript()
    );
    assert!(wait_until(SHORT, || count_files(&relay.queue_dir()) == 0).await);
    let fetched = relay
        .wait_log("token fetched", SHORT)
        .expect("token fetched");
    assert_eq!(fetched["expires_in"], 86400, "capped at a day: {fetched}");
    assert!(!log_has(&relay, "crashed"), "{}", relay.transcript());
    assert!(
        !relay.transcript().contains("panicked"),
        "{}",
        relay.transcript()
    );
}

/// The typed outcomes (`recipients[].outcome` in `<dir>/<id>.state`) of the message to `rcpt`.
fn stored_outcomes(dir: &Path, rcpt: &str) -> Vec<mailbridge::outcome::Outcome> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".msg") else {
            continue;
        };
        let Ok(msg) = std::fs::read(e.path()) else {
            continue;
        };
        let Ok((env, _)) = mailbridge::spool::format::decode_queue_file(&msg) else {
            continue;
        };
        let Some(i) = env.recipients.iter().position(|r| r.address == rcpt) else {
            continue;
        };
        let Ok(st) = std::fs::read(dir.join(format!("{id}.state"))) else {
            continue;
        };
        if let Ok(st) = mailbridge::spool::format::decode_state(&st, env.recipients.len())
            && let Some(o) = st.outcome_of(i).cloned()
        {
            out.push(o);
        }
    }
    out
}

/// What the Exchange classifier decided is stored, typed, with the message: a pause at AUTH
/// (5.7.139) and a bounce after the dot (5.7.60), each with its step, reply fields and the
/// problem's key, meaning and remedy for this mailbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_classified_outcome_is_stored_with_the_message() {
    use mailbridge::outcome::{Step, Verdict};
    let s = Setup::new(Duration::from_secs(3600)).await;
    s.ex.add_rule(Rule::reply(
        Stage::Auth,
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
    ));
    let relay = s.relay(&limits(3, 6000), "").start();
    send_scan(&relay, "t").await;
    let mut found = Vec::new();
    assert!(
        wait_until(LONG, || {
            found = stored_outcomes(&relay.queue_dir(), "a@fabrikam.com");
            !found.is_empty()
        })
        .await,
        "{}",
        relay.transcript()
    );
    let o = &found[0];
    assert!(
        matches!(o.verdict, Verdict::Paused { until_ms } if until_ms > 0),
        "{o:?}"
    );
    assert_eq!(o.step, Some(Step::Auth));
    assert_eq!(o.reply.code, Some(535));
    assert_eq!(o.reply.enhanced.as_deref(), Some("5.7.139"));
    assert!(
        o.reply.text.starts_with("Authentication unsuccessful"),
        "{o:?}"
    );
    let p = o.problem.as_ref().expect("diagnosed");
    assert_eq!(p.key, "smtp_auth_disabled");
    assert!(p.meaning.contains("SMTP AUTH"), "{p:?}");
    assert!(
        p.remedy.contains(
            "Set-CASMailbox -Identity relay@contoso.com -SmtpClientAuthenticationDisabled $false"
        ),
        "{p:?}"
    );
    assert_eq!(o.upstream, "contoso");
    assert!(o.attempt >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounce_is_stored_with_its_step_and_problem_in_failed() {
    use mailbridge::outcome::{Step, Verdict};
    let s = Setup::new(Duration::from_secs(3600)).await;
    s.ex.set_send_as(Some(vec![]));
    let relay = s.relay(&limits(3, 6000), "").start();
    send_scan(&relay, "denied").await;
    let failed = relay.spool.join("failed");
    let mut found = Vec::new();
    assert!(
        wait_until(LONG, || {
            found = stored_outcomes(&failed, "a@fabrikam.com");
            !found.is_empty()
        })
        .await,
        "{}",
        relay.transcript()
    );
    let o = &found[0];
    assert_eq!(o.verdict, Verdict::Bounced);
    assert_eq!(o.step, Some(Step::Dot));
    assert_eq!(o.reply.code, Some(550));
    assert_eq!(o.reply.enhanced.as_deref(), Some("5.7.60"));
    assert_eq!(
        o.problem.as_ref().map(|p| p.key.as_str()),
        Some("send_as_denied")
    );
}
