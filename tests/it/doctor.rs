//! `mailbridge doctor`: the real binary against the fake token endpoint and the fake Exchange,
//! one test per failure it diagnoses. Assertions are on the exit code, the step marks
//! (✓ ✗ -) and the explanation lines (the remedy's command names), and on what reached the
//! fakes.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::daemon::{Finished, RelayConfig, mailbridge_cmd, run_with_timeout};
use crate::fake_exchange::{FakeExchange, REPLY_AUTH_FAILED, REPLY_SEND_AS_DENIED, Rule, Stage};
use crate::fake_token::FakeToken;

const MAILBOX: &str = "relay@contoso.com";
const CLIENT_ID: &str = "11111111-1111-1111-1111-111111111111";
const SECRET: &str = "fake-secret-value";

struct Setup {
    dir: tempfile::TempDir,
    token: FakeToken,
    ex: FakeExchange,
}

/// How the upstream in the config differs from the working one.
#[derive(Default)]
struct Upstream {
    host: Option<String>,
    port: Option<u16>,
    no_ca_file: bool,
}

impl Setup {
    async fn new() -> Setup {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let token = FakeToken::start(Duration::from_secs(3600)).await;
        token.set_secret(Some(SECRET));
        token.set_client_id(Some(CLIENT_ID));
        let ex = FakeExchange::start(token.issued(), MAILBOX).await;
        ex.write_ca(dir.path());
        Setup { dir, token, ex }
    }

    fn secret_file(&self, secret: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.dir.path().join("client.secret");
        std::fs::write(&p, format!("{secret}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    fn admin_socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    /// A configuration with one exchange-online upstream pointing at the fakes; `client_id`
    /// and `secret` as given.
    fn config_with(&self, u: Upstream, client_id: &str, secret: &str) -> RelayConfig {
        let mut rc = RelayConfig::new(self.dir.path());
        let ca = if u.no_ca_file {
            String::new()
        } else {
            format!(
                "    ca_file: {:?}\n",
                self.dir.path().join("ca.pem").display().to_string()
            )
        };
        rc.upstreams = Some(format!(
            "  - name: contoso\n    type: exchange-online\n    mailbox: {MAILBOX}\n    tenant_id: contoso.com\n    client_id: {client_id}\n    client_secret_file: {:?}\n    host: {}\n    port: {}\n    token_url: {:?}\n{ca}",
            self.secret_file(secret).display().to_string(),
            u.host.unwrap_or_else(|| "localhost".into()),
            u.port.unwrap_or(self.ex.addr().port()),
            self.token.url(),
        ));
        rc.extra = format!(
            "admin:\n  socket: {:?}\n",
            self.admin_socket().display().to_string()
        );
        rc
    }

    fn config(&self, u: Upstream) -> RelayConfig {
        self.config_with(u, CLIENT_ID, SECRET)
    }

    /// Writes `rc` and runs `mailbridge doctor -c <file> ARGS`.
    async fn doctor(&self, rc: &RelayConfig, args: &[&str]) -> Finished {
        rc.write();
        let path = rc.path();
        let dir = self.dir.path().to_path_buf();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let out = tokio::task::spawn_blocking(move || {
            let mut cmd = mailbridge_cmd();
            cmd.arg("doctor").arg("-c").arg(&path).args(&args);
            run_with_timeout(&mut cmd, &dir, "doctor", Duration::from_secs(120))
        })
        .await
        .unwrap();
        // Whatever it printed, never the secret or a token.
        let all = format!("{}{}", out.stdout, out.stderr);
        assert!(!all.contains(SECRET), "{all}");
        for t in self.token.issued().0.lock().unwrap().keys() {
            assert!(!all.contains(t.as_str()), "a token was printed:\n{all}");
        }
        out
    }
}

fn code(out: &Finished) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn show(out: &Finished) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status, out.stdout, out.stderr
    )
}

/// The line of `step` marked `mark` (✓ ✗ -), if there is one.
fn step<'a>(out: &'a Finished, mark: &str, name: &str) -> Option<&'a str> {
    let prefix = format!("{mark} {name}");
    out.stdout
        .lines()
        .find(|l| l.trim_start().starts_with(&prefix))
}

#[track_caller]
fn assert_step(out: &Finished, mark: &str, name: &str) {
    assert!(
        step(out, mark, name).is_some(),
        "no line `{mark} {name}`\n{}",
        show(out)
    );
}

#[track_caller]
fn assert_said(out: &Finished, text: &str) {
    assert!(out.stdout.contains(text), "{text:?} not in:\n{}", show(out));
}

/// Exit 1, the step crossed, and every step marked before it passed.
#[track_caller]
fn assert_fails_at(out: &Finished, name: &str) {
    assert_eq!(code(out), 1, "{}", show(out));
    assert_step(out, "✗", name);
    assert_said(out, "result: NOT OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_pass() {
    let s = Setup::new().await;
    let out = s.doctor(&s.config(Upstream::default()), &[]).await;
    assert_eq!(code(&out), 0, "{}", show(&out));
    for name in [
        "config",
        "spool",
        "token",
        "claims",
        "DNS",
        "TCP",
        "STARTTLS",
        "EHLO",
        "AUTH XOAUTH2",
    ] {
        assert_step(&out, "✓", name);
    }
    assert!(!out.stdout.contains('✗'), "{}", show(&out));
    assert_step(&out, "-", "send test");
    assert_said(&out, "TLS 1.3");
    assert_said(&out, "roles SMTP.SendAsApp");
    assert_said(&out, "no daemon answers on");
    assert_said(&out, "result: all checks passed");
    // One AUTH with a token the fake issued, nothing sent, and the probe file is gone.
    let auths = s.ex.auths();
    assert_eq!(auths.len(), 1);
    assert!(auths[0].accepted && !auths[0].inline);
    assert_eq!(s.ex.received_count(), 0);
    let spool_tmp = s.dir.path().join("spool");
    assert!(
        std::fs::read_dir(&spool_tmp).is_err()
            || std::fs::read_dir(&spool_tmp).unwrap().next().is_none(),
        "doctor left files in the spool or created it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config() {
    let s = Setup::new().await;
    let rc = s.config_with(Upstream::default(), "not-a-guid", SECRET);
    let out = s.doctor(&rc, &[]).await;
    assert_fails_at(&out, "config");
    assert_said(&out, "client_id");
    assert_said(&out, "is not a GUID");
    // Nothing else was tried.
    assert!(step(&out, "✓", "spool").is_none(), "{}", show(&out));
    assert_eq!(s.token.requests(), 0);
    assert_eq!(s.ex.connections_total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_not_writable() {
    let s = Setup::new().await;
    let mut rc = s.config(Upstream::default());
    // As root, permissions do not stop writes: a file where the spool directory should be.
    let file = s.dir.path().join("spool-is-a-file");
    std::fs::write(&file, b"x").unwrap();
    rc.spool = file;
    let out = s.doctor(&rc, &[]).await;
    assert_fails_at(&out, "spool");
    assert_said(&out, "is not a directory");
    assert_said(&out, "remedy:");
    // The rest is still checked.
    assert_step(&out, "✓", "AUTH XOAUTH2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_probe_in_tmp() {
    let s = Setup::new().await;
    let rc = s.config(Upstream::default());
    let tmp = s.dir.path().join("spool/tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("incoming.msg"), b"a message being received").unwrap();
    let out = s.doctor(&rc, &[]).await;
    assert_eq!(code(&out), 0, "{}", show(&out));
    let line = step(&out, "✓", "spool").unwrap();
    assert!(line.contains("spool/tmp"), "{line}");
    // The daemon's file is untouched, the probe removed.
    assert_eq!(crate::daemon::files(&tmp), vec!["incoming.msg".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_client_secret() {
    let s = Setup::new().await;
    let rc = s.config_with(Upstream::default(), CLIENT_ID, "a-wrong-secret");
    let out = s.doctor(&rc, &[]).await;
    assert_fails_at(&out, "token");
    assert_said(&out, "AADSTS7000215");
    assert_said(&out, "invalid client secret");
    assert_said(&out, "Certificates & secrets");
    assert!(!out.stdout.contains("a-wrong-secret"), "{}", show(&out));
    assert_step(&out, "-", "claims");
    // The network steps still run; AUTH cannot.
    assert_step(&out, "✓", "EHLO");
    assert_step(&out, "-", "AUTH XOAUTH2");
    assert!(s.ex.auths().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_application() {
    let s = Setup::new().await;
    let rc = s.config_with(
        Upstream::default(),
        "22222222-2222-2222-2222-222222222222",
        SECRET,
    );
    let out = s.doctor(&rc, &[]).await;
    assert_fails_at(&out, "token");
    assert_said(&out, "AADSTS700016");
    assert_said(&out, "client_id or tenant_id is wrong");
    assert_said(&out, "not a consent problem");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_send_as_app_role() {
    let s = Setup::new().await;
    s.token.set_roles(vec!["Mail.Send".into()]);
    let out = s.doctor(&s.config(Upstream::default()), &[]).await;
    assert_fails_at(&out, "claims");
    assert_said(&out, "SMTP.SendAsApp missing");
    assert_said(&out, "Grant admin consent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_audience() {
    let s = Setup::new().await;
    s.token.set_audience("https://graph.microsoft.com");
    let out = s.doctor(&s.config(Upstream::default()), &[]).await;
    assert_fails_at(&out, "claims");
    assert_said(&out, "https://graph.microsoft.com  (not Exchange Online)");
    assert_said(&out, "scope: https://outlook.office365.com/.default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_failure() {
    // A label longer than 63 octets: the resolver refuses the name itself, without asking
    // any DNS server (no network needed).
    let s = Setup::new().await;
    let host = format!("{}.example", "a".repeat(70));
    let rc = s.config(Upstream {
        host: Some(host.clone()),
        ..Upstream::default()
    });
    let out = s.doctor(&rc, &[]).await;
    assert_fails_at(&out, "DNS");
    assert_said(&out, &format!("{host} does not resolve"));
    assert_said(&out, "smtp.office365.com");
    assert_step(&out, "-", "TCP");
    assert_step(&out, "-", "AUTH XOAUTH2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_refused() {
    let s = Setup::new().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let rc = s.config(Upstream {
        host: Some("127.0.0.1".into()),
        port: Some(closed),
        ..Upstream::default()
    });
    let out = s.doctor(&rc, &[]).await;
    assert_fails_at(&out, "TCP");
    assert_said(
        &out,
        &format!("port {closed} blocked by a firewall or ISP; allow outbound TCP {closed}"),
    );
    assert_step(&out, "✓", "DNS");
    assert_step(&out, "-", "STARTTLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_not_trusted_is_explained_as_inspection() {
    let s = Setup::new().await;
    let rc = s.config(Upstream {
        no_ca_file: true,
        ..Upstream::default()
    });
    let out = s.doctor(&rc, &[]).await;
    assert_fails_at(&out, "STARTTLS");
    assert_said(&out, "TLS inspection");
    assert_said(&out, "exempt localhost from TLS inspection");
    assert_said(&out, "ca_file");
    assert_step(&out, "✓", "TCP");
    assert_step(&out, "-", "AUTH XOAUTH2");
    assert!(s.ex.auths().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_starttls_offered() {
    let s = Setup::new().await;
    s.ex.set_offer_starttls(false);
    let out = s.doctor(&s.config(Upstream::default()), &[]).await;
    assert_fails_at(&out, "STARTTLS");
    assert_said(&out, "does not offer STARTTLS");
    assert_said(&out, "smtp.office365.com port 587");
    assert_step(&out, "-", "AUTH XOAUTH2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_xoauth2_offered() {
    let s = Setup::new().await;
    s.ex.set_auth_offer("AUTH LOGIN");
    let out = s.doctor(&s.config(Upstream::default()), &[]).await;
    assert_fails_at(&out, "EHLO");
    assert_said(&out, "AUTH XOAUTH2 is not offered after STARTTLS");
    assert_said(&out, "does not offer AUTH XOAUTH2");
    assert_step(&out, "✓", "STARTTLS");
    assert_step(&out, "-", "AUTH XOAUTH2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_535_5_7_3_gives_the_checklist() {
    let s = Setup::new().await;
    s.ex.add_rule(Rule::reply(Stage::Auth, REPLY_AUTH_FAILED));
    let out = s.doctor(&s.config(Upstream::default()), &[]).await;
    assert_fails_at(&out, "AUTH XOAUTH2");
    assert_said(&out, "535 5.7.3");
    assert_said(&out, "admin consent");
    assert_said(&out, &format!("New-ServicePrincipal -AppId {CLIENT_ID}"));
    assert_said(
        &out,
        &format!(
            "Add-MailboxPermission -Identity {MAILBOX} -User <service principal id> -AccessRights FullAccess"
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_535_5_7_139_gives_set_casmailbox() {
    let s = Setup::new().await;
    s.ex.add_rule(Rule::reply(
        Stage::Auth,
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
    ));
    let out = s.doctor(&s.config(Upstream::default()), &[]).await;
    assert_fails_at(&out, "AUTH XOAUTH2");
    assert_said(
        &out,
        &format!("Set-CASMailbox -Identity {MAILBOX} -SmtpClientAuthenticationDisabled $false"),
    );
    assert_said(&out, "up to an hour");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_550_5_7_60_names_add_recipientpermission() {
    let s = Setup::new().await;
    s.ex.add_rule(Rule::reply(Stage::Dot, REPLY_SEND_AS_DENIED));
    let out = s
        .doctor(
            &s.config(Upstream::default()),
            &["--send-test", "someone@fabrikam.com"],
        )
        .await;
    assert_fails_at(&out, "send test");
    assert_said(&out, "550 5.7.60");
    assert_said(&out, "Add-RecipientPermission");
    assert_said(&out, "-AccessRights SendAs");
    assert_step(&out, "✓", "AUTH XOAUTH2");
    assert_eq!(s.ex.received_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_reaches_the_upstream() {
    let s = Setup::new().await;
    let out = s
        .doctor(
            &s.config(Upstream::default()),
            &["--send-test", "someone@fabrikam.com"],
        )
        .await;
    assert_eq!(code(&out), 0, "{}", show(&out));
    let line = step(&out, "✓", "send test").unwrap_or_else(|| panic!("{}", show(&out)));
    assert!(line.contains("someone@fabrikam.com: 250"), "{line}");
    let got = s.ex.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].mail_from, MAILBOX);
    assert_eq!(got[0].rcpt_to, vec!["someone@fabrikam.com".to_string()]);
    assert_eq!(got[0].auth_user, MAILBOX);
    let data = String::from_utf8_lossy(&got[0].data);
    assert!(data.contains(&format!("From: <{MAILBOX}>\r\n")), "{data}");
    assert!(
        data.contains("Subject: mailbridge doctor test\r\n"),
        "{data}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2() {
    let s = Setup::new().await;
    let rc = s.config(Upstream::default());
    let out = s.doctor(&rc, &["--upstream", "nope"]).await;
    assert_eq!(code(&out), 2, "{}", show(&out));
    assert!(out.stderr.contains("contoso"), "{}", show(&out));
    let out = s.doctor(&rc, &["--send-test", "not an address"]).await;
    assert_eq!(code(&out), 2, "{}", show(&out));
    let out = s.doctor(&rc, &["--no-such-flag"]).await;
    assert_eq!(code(&out), 2, "{}", show(&out));
    assert_eq!(s.ex.connections_total(), 0);
}

/// A stand-in for the daemon's admin socket: answers `status` with the upstream's connections
/// in use, `busy_answers` times "3 of 3", then "1 of 3".
fn fake_daemon(path: &Path, busy_answers: usize) -> Arc<AtomicUsize> {
    use std::io::{BufRead, BufReader, Write};
    let listener = UnixListener::bind(path).unwrap();
    let asked = Arc::new(AtomicUsize::new(0));
    let count = asked.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut line = String::new();
            if BufReader::new(&stream).read_line(&mut line).is_err() {
                continue;
            }
            assert!(line.contains("\"status\""), "{line}");
            let n = count.fetch_add(1, Ordering::SeqCst);
            let used = if n < busy_answers { 3 } else { 1 };
            let status = mailbridge::ops::model::StatusReport {
                upstreams: vec![mailbridge::ops::model::UpstreamStatus {
                    name: "contoso".into(),
                    kind: "exchange-online".into(),
                    state: "ok".into(),
                    connections_in_use: Some(used),
                    connections_max: Some(3),
                    ..Default::default()
                }],
                ..Default::default()
            };
            let report = mailbridge::admin::proto::Response::ok(status);
            let report = serde_json::to_string(&report).unwrap();
            let _ = stream.write_all(format!("{report}\n").as_bytes());
        }
    });
    asked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_connection_taken_while_the_daemon_uses_all() {
    let s = Setup::new().await;
    let asked = fake_daemon(&s.admin_socket(), usize::MAX);
    let out = s
        .doctor(&s.config(Upstream::default()), &["--slot-wait", "1s"])
        .await;
    assert_fails_at(&out, "AUTH XOAUTH2");
    assert_said(&out, "uses all 3 connections of this mailbox");
    assert!(asked.load(Ordering::SeqCst) >= 1);
    // Token and DNS were checked; no connection was opened to the upstream.
    assert_step(&out, "✓", "token");
    assert_step(&out, "-", "TCP");
    assert_eq!(s.ex.connections_total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_the_daemon_to_free_a_connection() {
    let s = Setup::new().await;
    let asked = fake_daemon(&s.admin_socket(), 1);
    let out = s.doctor(&s.config(Upstream::default()), &[]).await;
    assert_eq!(code(&out), 0, "{}", show(&out));
    assert_said(&out, "the daemon uses 1 of 3 connections");
    assert_eq!(asked.load(Ordering::SeqCst), 2);
    assert_eq!(s.ex.auths().len(), 1);
}

/// A read-only tmpfs mounted for the life of the value.
struct ReadOnlyMount(PathBuf);

impl ReadOnlyMount {
    /// `None` (the test is skipped) where mounting is not permitted, except in CI.
    fn at(dir: &Path) -> Option<ReadOnlyMount> {
        let options = std::ffi::CString::new("size=1m,mode=0755").unwrap();
        match rustix::mount::mount(
            "tmpfs",
            dir,
            "tmpfs",
            rustix::mount::MountFlags::RDONLY,
            options.as_c_str(),
        ) {
            Ok(()) => Some(ReadOnlyMount(dir.to_path_buf())),
            Err(e) if crate::daemon::in_ci() => panic!("cannot mount a tmpfs: {e}"),
            Err(e) => {
                eprintln!(
                    "skipping: cannot mount a read-only tmpfs here ({e}); run as root with CAP_SYS_ADMIN"
                );
                None
            }
        }
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        use rustix::mount::{UnmountFlags, unmount};
        if unmount(&self.0, UnmountFlags::empty()).is_err() {
            let _ = unmount(&self.0, UnmountFlags::DETACH);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_on_a_read_only_mount() {
    let s = Setup::new().await;
    let spool = s.dir.path().join("ro-spool");
    std::fs::create_dir(&spool).unwrap();
    let Some(_mount) = ReadOnlyMount::at(&spool) else {
        return;
    };
    let mut rc = s.config(Upstream::default());
    rc.spool = spool;
    let out = s.doctor(&rc, &[]).await;
    assert_fails_at(&out, "spool");
    assert_said(&out, "creating a file failed");
    assert_said(&out, "the file system is mounted read-only");
    assert_said(&out, "ReadWritePaths=");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greeting_432_when_the_mailbox_has_no_connection_left() {
    // Other programs (not the daemon) use the mailbox's connections: Exchange refuses at once.
    let s = Setup::new().await;
    s.ex.set_max_connections(0);
    let out = s.doctor(&s.config(Upstream::default()), &[]).await;
    assert_fails_at(&out, "greeting");
    assert_said(&out, "432 4.3.2");
    assert_said(&out, "limits.connections");
    assert_step(&out, "✓", "TCP");
    assert_step(&out, "-", "AUTH XOAUTH2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beside_a_running_daemon() {
    use crate::daemon::{LONG, Smtp};
    let s = Setup::new().await;
    let mut rc = s.config(Upstream::default());
    rc.queue_extra = "  postmaster: postmaster@contoso.com\n".into();
    let relay = rc.start();
    let addr = relay.addr();
    let send = move |subject: &'static str| {
        tokio::task::spawn_blocking(move || {
            let mut c = Smtp::greet_ehlo(addr).unwrap();
            let content = format!(
                "From: <scanner@contoso.com>\r\nTo: <a@fabrikam.com>\r\nSubject: {subject}\r\n\r\nscan\r\n"
            );
            let reply = c
                .send_message(
                    "scanner@contoso.com",
                    &["a@fabrikam.com"],
                    content.as_bytes(),
                )
                .unwrap();
            let _ = c.cmd("QUIT");
            reply.code
        })
    };
    assert_eq!(send("before").await.unwrap(), 250);
    assert!(
        s.ex.wait_for_received(1, LONG).await,
        "{}",
        relay.transcript()
    );
    // The daemon's spool exists now: the probe goes into its tmp/ and leaves nothing.
    let out = s
        .doctor(&rc, &["--send-test", "postmaster@contoso.com"])
        .await;
    assert_eq!(code(&out), 0, "{}\n{}", show(&out), relay.transcript());
    let line = step(&out, "✓", "spool").unwrap();
    assert!(line.contains("spool/tmp"), "{line}");
    // The daemon goes on delivering, and nothing of doctor's is left in its spool.
    assert_eq!(send("after").await.unwrap(), 250);
    assert!(
        s.ex.wait_for_received(3, LONG).await,
        "{}",
        relay.transcript()
    );
    let subjects: Vec<String> =
        s.ex.received()
            .iter()
            .map(|m| {
                let d = String::from_utf8_lossy(&m.data).into_owned();
                d.lines()
                    .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
                    .unwrap_or_default()
            })
            .collect();
    assert_eq!(subjects, ["before", "mailbridge doctor test", "after"]);
    assert!(crate::daemon::files(&s.dir.path().join("spool/tmp")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_lan_certificate() {
    let s = Setup::new().await;
    let mut rc = s.config(Upstream::default());
    let cert = s.dir.path().join("lan.pem");
    let key = s.dir.path().join("lan.key");
    std::fs::write(&cert, "not a certificate\n").unwrap();
    std::fs::write(&key, "not a key\n").unwrap();
    rc.extra.push_str(&format!(
        "tls:\n  cert_file: {:?}\n  key_file: {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    ));
    let out = s.doctor(&rc, &[]).await;
    assert_fails_at(&out, "config");
    assert_said(&out, "tls.cert_file");
    // The rest is still checked.
    assert_step(&out, "✓", "AUTH XOAUTH2");
}
