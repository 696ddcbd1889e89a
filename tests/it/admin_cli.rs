//! The operator commands (`mailbridge queue ...`, `status`) as a sysadmin runs them: the real
//! binary against a running daemon's admin socket, with the spool's state checked afterwards
//! (files in queue/ and failed/, the held flag, what reached the outbox, and how often).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::daemon::{
    Finished, LONG, Relay, RelayConfig, SHORT, Smtp, files, mailbridge_cmd, run_with_timeout,
    wait_until,
};

/// A relay with its admin socket in the test's directory; retries far apart, so a deferred
/// message stays put until a command moves it.
pub fn admin_config(dir: &Path) -> RelayConfig {
    let mut rc = RelayConfig::new(dir);
    rc.retry = "[1h]";
    rc.extra = format!(
        "admin:\n  socket: {:?}\n",
        socket(dir).display().to_string()
    );
    rc
}

pub fn socket(dir: &Path) -> PathBuf {
    dir.join("admin.sock")
}

/// Starts the relay and waits for its admin socket.
pub fn start(rc: &RelayConfig) -> Relay {
    let relay = rc.start();
    assert!(
        relay.wait_log("admin socket ready", SHORT).is_some(),
        "{}",
        relay.transcript()
    );
    relay
}

/// Runs `mailbridge <args> --socket <dir>/admin.sock`.
pub fn cli(dir: &Path, args: &[&str]) -> Finished {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    run_with_timeout(
        mailbridge_cmd().args(args).arg("--socket").arg(socket(dir)),
        dir,
        &format!("cli-{n}"),
        LONG,
    )
}

/// The command's exit code.
pub fn code(f: &Finished) -> i32 {
    f.status.code().unwrap_or(-1)
}

/// Runs a command with `--json`; it must succeed and print JSON.
pub fn json(dir: &Path, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let f = cli(dir, &a);
    assert_eq!(code(&f), 0, "{args:?}: {}\n{}", f.stdout, f.stderr);
    serde_json::from_str(&f.stdout)
        .unwrap_or_else(|e| panic!("{args:?} --json printed no JSON ({e}):\n{}", f.stdout))
}

/// Sends one message; returns its queue id.
pub fn send(relay: &Relay, from: &str, to: &[&str], subject: &str) -> String {
    let mut c = Smtp::greet_ehlo(relay.addr()).unwrap();
    let content = format!(
        "From: <{from}>\r\nTo: <{}>\r\nSubject: {subject}\r\nDate: Thu, 27 Nov 2025 10:00:00 +0000\r\nMessage-ID: <{subject}@lan.test>\r\n\r\nscan {subject}\r\n",
        to[0]
    );
    let reply = c.send_message(from, to, content.as_bytes()).unwrap();
    let _ = c.cmd("QUIT");
    reply
        .queue_id()
        .unwrap_or_else(|| panic!("no 250: {:?}\n{}", reply.lines, relay.transcript()))
}

/// The queue as `queue list --json` shows it: id -> entry.
fn listed(dir: &Path) -> std::collections::HashMap<String, Value> {
    json(dir, &["queue", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["id"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}

/// How many times `id` was delivered, from the delivery log (one line per recipient).
fn deliveries(relay: &Relay, id: &str) -> usize {
    relay
        .logs()
        .iter()
        .filter(|v| {
            v["message"] == "delivery" && v["queue_id"] == id && v["verdict"] == "delivered"
        })
        .count()
}

/// Makes the outbox unwritable (a file where its directory was): attempts are deferred.
fn break_outbox(outbox: &Path) {
    std::fs::remove_dir_all(outbox).unwrap();
    std::fs::write(outbox, b"not a directory").unwrap();
}

fn repair_outbox(outbox: &Path) {
    std::fs::remove_file(outbox).unwrap();
    std::fs::create_dir(outbox).unwrap();
}

fn msg_files(dir: &Path) -> Vec<String> {
    files(dir)
        .into_iter()
        .filter(|f| f.ends_with(".msg"))
        .collect()
}

#[test]
fn queue_commands_list_show_hold_delete_retry_release_against_the_spool() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let rc = admin_config(dir);
    let mut relay = start(&rc);
    break_outbox(&rc.outbox);

    let ids: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|s| send(&relay, "printer@lan.test", &["x@ext.test", "y@ext.test"], s))
        .collect();
    let (a, b, c, d) = (&ids[0], &ids[1], &ids[2], &ids[3]);
    // Each is tried once and deferred for an hour.
    assert!(
        wait_until(LONG, || {
            let l = listed(dir);
            l.len() == 4 && l.values().all(|e| e["state"] == "deferred")
        }),
        "{:?}\n{}",
        listed(dir),
        relay.transcript()
    );
    let l = listed(dir);
    assert_eq!(l[a]["attempts"], 1);
    assert_eq!(l[a]["recipients_pending"], 2);
    assert_eq!(l[a]["recipients_total"], 2);
    assert_eq!(l[a]["sender"], "printer@lan.test");
    assert_eq!(l[a]["upstream"], "local");
    assert!(l[a]["next_attempt_ms"].as_u64().unwrap() > 0);

    // Human output: one aligned line per message, oldest first, and a total.
    let f = cli(dir, &["queue", "list"]);
    assert_eq!(code(&f), 0, "{}", f.stderr);
    let lines: Vec<&str> = f.stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{}", f.stdout);
    assert!(lines[0].starts_with("ID "), "{}", f.stdout);
    for (line, id) in lines[1..5].iter().zip(&ids) {
        assert!(line.starts_with(id.as_str()), "{}", f.stdout);
        assert!(line.contains("deferred") && line.contains("2/2"), "{line}");
    }
    let col = |l: &str| l.find("deferred").unwrap();
    assert!(
        lines[1..5].iter().all(|l| col(l) == col(lines[1])),
        "{}",
        f.stdout
    );
    assert!(
        lines[5].starts_with("-- 4 messages,") && lines[5].contains("8 recipients pending"),
        "{}",
        f.stdout
    );

    // show: envelope, recipients, attempts, and the diagnosis with its fix.
    let f = cli(dir, &["queue", "show", a]);
    assert_eq!(code(&f), 0, "{}", f.stderr);
    let out = &f.stdout;
    assert!(out.starts_with(&format!("Message {a}\n")), "{out}");
    assert!(
        out.contains("x@ext.test") && out.contains("y@ext.test"),
        "{out}"
    );
    assert!(
        out.contains("#1 ") && out.contains("via local: deferred"),
        "{out}"
    );
    let tail: Vec<&str> = out.lines().rev().take(2).collect();
    assert!(tail[0].starts_with("Fix: "), "{out}");
    assert!(tail[1].starts_with("Diagnosis: "), "{out}");
    let shown = json(dir, &["queue", "show", a]);
    assert_eq!(shown["entry"]["id"], a.as_str());
    assert_eq!(shown["recipients"].as_array().unwrap().len(), 2);
    assert_eq!(shown["recipients"][0]["status"], "pending");
    assert_eq!(shown["attempts"].as_array().unwrap().len(), 1);
    assert!(shown["diagnosis"]["remedy"].is_string(), "{shown}");
    let f = cli(dir, &["queue", "show", "0123456789abcdef"]);
    assert_eq!(code(&f), 1);
    assert!(
        f.stderr.contains("no message 0123456789abcdef"),
        "{}",
        f.stderr
    );
    let f = cli(dir, &["queue", "show", "../../etc/passwd"]);
    assert_eq!(code(&f), 1);
    assert!(f.stderr.contains("not a queue id"), "{}", f.stderr);

    // hold: persisted in the state file, shown as held, survives a restart.
    let f = cli(dir, &["queue", "hold", b]);
    assert_eq!(code(&f), 0, "{}", f.stderr);
    let state = std::fs::read_to_string(relay.queue_dir().join(format!("{b}.state"))).unwrap();
    assert!(state.contains("\"held\":true"), "{state}");
    assert_eq!(listed(dir)[b]["state"], "held");

    // delete: needs --yes without a terminal (exit 2), then removes both files, no bounce.
    let f = cli(dir, &["queue", "delete", c]);
    assert_eq!(code(&f), 2, "{}", f.stderr);
    assert!(f.stderr.contains("--yes"), "{}", f.stderr);
    assert!(relay.queue_dir().join(format!("{c}.msg")).exists());
    let f = cli(dir, &["queue", "delete", c, "--yes"]);
    assert_eq!(code(&f), 0, "{}", f.stderr);
    assert!(f.stdout.contains("no bounce"), "{}", f.stdout);
    let q = files(&relay.queue_dir());
    assert!(!q.iter().any(|f| f.starts_with(c.as_str())), "{q:?}");
    assert_eq!(msg_files(&relay.queue_dir()).len(), 3, "no report queued");
    assert!(msg_files(&rc.spool.join("failed")).is_empty());
    let f = cli(dir, &["queue", "delete", c, "--yes"]);
    assert_eq!(code(&f), 1);
    assert!(
        f.stderr.contains(&format!("no message {c}")),
        "{}",
        f.stderr
    );

    // Restart: the hold is kept. (The outbox must be a directory to start; the messages
    // are due in an hour, so nothing is sent meanwhile.)
    repair_outbox(&rc.outbox);
    relay.sigterm();
    assert!(relay.wait_exit(LONG).is_some_and(|s| s.success()));
    assert!(!socket(dir).exists(), "socket removed at shutdown");
    relay = start(&rc);
    let l = listed(dir);
    assert_eq!(l.len(), 3, "{l:?}");
    assert_eq!(l[b]["state"], "held");
    assert_eq!(l[a]["state"], "deferred");

    // retry one: delivered now; the others stay.
    let f = cli(dir, &["queue", "retry", a]);
    assert_eq!(code(&f), 0, "{}", f.stderr);
    relay.wait_delivered(a);
    assert!(wait_until(SHORT, || !relay
        .queue_dir()
        .join(format!("{a}.msg"))
        .exists()));
    // A held message is not retried: retry says how to release it.
    let f = cli(dir, &["queue", "retry", b]);
    assert_eq!(code(&f), 1);
    assert!(
        f.stderr.contains(&format!("mailbridge queue release {b}")),
        "{}",
        f.stderr
    );
    // retry --all: every message but the held one.
    let all = json(dir, &["queue", "retry", "--all"]);
    assert_eq!(all["retried"], 1, "{all}");
    relay.wait_delivered(d);
    assert!(wait_until(SHORT, || msg_files(&relay.queue_dir()).len() == 1));
    assert!(
        !rc.outbox.join(format!("{b}.eml")).exists(),
        "held: not sent"
    );
    assert_eq!(listed(dir)[b]["state"], "held");

    // release: sent now, and the queue is empty.
    let f = cli(dir, &["queue", "release", b]);
    assert_eq!(code(&f), 0, "{}", f.stderr);
    relay.wait_delivered(b);
    assert!(wait_until(SHORT, || msg_files(&relay.queue_dir()).is_empty()));
    let f = cli(dir, &["queue", "list"]);
    assert_eq!(f.stdout, "Mail queue is empty\n");
    // Each one reached the outbox once (both recipients in one delivery), the deleted never.
    for id in [a, b, d] {
        assert_eq!(deliveries(&relay, id), 2, "{id}\n{}", relay.transcript());
    }
    assert!(!rc.outbox.join(format!("{c}.eml")).exists());
    assert!(msg_files(&rc.spool.join("failed")).is_empty());
}

#[test]
fn failed_lists_dead_letters_and_requeue_delivers_them_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rc = admin_config(dir);
    rc.retry = "[1s]";
    // Short enough to make dead letters quickly; a requeued message gets a new max_age
    // from the requeue, which must leave it time to be delivered on a loaded machine.
    rc.queue_extra = "  max_age: 6s\n  bounce: false\n".into();
    let relay = start(&rc);
    break_outbox(&rc.outbox);
    let id = send(&relay, "printer@lan.test", &["x@ext.test"], "dead");
    let other = send(&relay, "printer@lan.test", &["x@ext.test"], "dead2");
    let failed = rc.spool.join("failed");
    assert!(
        wait_until(LONG, || msg_files(&failed).len() == 2),
        "{}",
        relay.transcript()
    );
    assert!(wait_until(SHORT, || msg_files(&relay.queue_dir()).is_empty()));

    let list = json(dir, &["queue", "failed"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["state"], "failed");
    assert_eq!(list[0]["recipients_pending"], 0);
    let f = cli(dir, &["queue", "failed"]);
    assert!(
        f.stdout.lines().nth(1).unwrap().starts_with(&id),
        "{}",
        f.stdout
    );
    assert!(f.stdout.contains("queue requeue ID"), "{}", f.stdout);
    let shown = json(dir, &["queue", "show", &id]);
    assert_eq!(shown["entry"]["state"], "failed");
    assert_eq!(shown["recipients"][0]["status"], "failed");
    // Dead letters need a human: status says so and exits 1.
    let f = cli(dir, &["status"]);
    assert_eq!(code(&f), 1, "{}", f.stdout);
    assert!(f.stdout.contains("2 messages in failed/"), "{}", f.stdout);
    assert!(f.stdout.contains(", 2 failed"), "{}", f.stdout);

    // A dead letter can be deleted for good.
    let f = cli(dir, &["queue", "delete", &other, "--yes"]);
    assert_eq!(code(&f), 0, "{}", f.stderr);
    assert_eq!(msg_files(&failed), vec![format!("{id}.msg")]);
    assert!(!failed.join(format!("{other}.state")).exists());

    // Requeue: back in queue/ (failed/ empty), delivered once.
    repair_outbox(&rc.outbox);
    let f = cli(dir, &["queue", "requeue", &id]);
    assert_eq!(code(&f), 0, "{}\n{}", f.stderr, relay.transcript());
    assert!(msg_files(&failed).is_empty());
    assert!(!failed.join(format!("{id}.state")).exists());
    relay.wait_delivered(&id);
    assert!(wait_until(SHORT, || msg_files(&relay.queue_dir()).is_empty()));
    assert_eq!(deliveries(&relay, &id), 1, "{}", relay.transcript());
    let f = cli(dir, &["queue", "requeue", &id]);
    assert_eq!(code(&f), 1);
    assert!(f.stderr.contains("no message"), "{}", f.stderr);
    assert!(
        json(dir, &["queue", "failed"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(code(&cli(dir, &["status"])), 0);
    assert!(!rc.outbox.join(format!("{other}.eml")).exists());
}

#[test]
fn status_is_ok_with_exit_0_and_commands_explain_an_unreachable_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let rc = admin_config(dir);
    let mut relay = start(&rc);
    let f = cli(dir, &["status"]);
    assert_eq!(code(&f), 0, "{}\n{}", f.stdout, f.stderr);
    let out = &f.stdout;
    assert!(out.starts_with("mailbridge "), "{out}");
    assert!(out.contains(&relay.addr().to_string()), "{out}");
    assert!(out.contains("local (outbox): ok"), "{out}");
    assert!(out.contains("Queue: 0 messages"), "{out}");
    assert!(out.contains("All is well."), "{out}");
    let s = json(dir, &["status"]);
    assert_eq!(s["attention"], serde_json::json!([]));
    assert_eq!(s["upstreams"][0]["state"], "ok");
    assert_eq!(s["listeners"][0]["address"], relay.addr().to_string());
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));

    relay.sigterm();
    assert!(relay.wait_exit(LONG).is_some());
    let f = cli(dir, &["status"]);
    assert_eq!(code(&f), 1);
    assert!(
        f.stderr.contains("cannot reach the mailbridge daemon") && f.stderr.contains("running"),
        "{}",
        f.stderr
    );
    // Usage errors exit 2.
    let f = cli(dir, &["queue", "retry"]);
    assert_eq!(code(&f), 2, "{}", f.stderr);
}

#[test]
fn the_socket_is_found_through_the_configuration_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let rc = admin_config(dir);
    let _relay = start(&rc);
    let f = run_with_timeout(
        mailbridge_cmd()
            .args(["queue", "list", "-c"])
            .arg(rc.path()),
        dir,
        "by-config",
        LONG,
    );
    assert_eq!(code(&f), 0, "{}", f.stderr);
    assert_eq!(f.stdout, "Mail queue is empty\n");
    let f = run_with_timeout(
        mailbridge_cmd()
            .args(["senders", "--json"])
            .env("MAILBRIDGE_ADMIN_SOCKET", socket(dir)),
        dir,
        "by-env",
        LONG,
    );
    assert_eq!(code(&f), 0, "{}", f.stderr);
    assert_eq!(f.stdout.trim(), "[]");
}

mod with_exchange {
    use super::*;
    use crate::fake_exchange::{FakeExchange, Rule, Stage};
    use crate::fake_token::FakeToken;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn status_exits_1_and_explains_a_paused_upstream() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let token = FakeToken::start(Duration::from_secs(3600)).await;
        let ex = FakeExchange::start(token.issued(), "relay@contoso.com").await;
        ex.write_ca(&dir);
        ex.add_rule(Rule::reply(
            Stage::Auth,
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
        ));
        let rc = exchange_config(&dir, &ex, &token);
        let (relay, id) = tokio::task::spawn_blocking(move || {
            let relay = start(&rc);
            let id = send(&relay, "scanner@contoso.com", &["a@fabrikam.com"], "t");
            assert!(
                relay.wait_log("upstream paused", LONG).is_some(),
                "{}",
                relay.transcript()
            );
            (relay, id)
        })
        .await
        .unwrap();
        let d = dir.clone();
        let (f, s, l) = tokio::task::spawn_blocking(move || {
            (
                cli(&d, &["status"]),
                json_any(&d, &["status"]),
                json(&d, &["queue", "list"]),
            )
        })
        .await
        .unwrap();
        assert_eq!(code(&f), 1, "{}\n{}", f.stdout, relay.transcript());
        assert!(
            f.stdout.contains("contoso (exchange-online): PAUSED"),
            "{}",
            f.stdout
        );
        assert!(f.stdout.contains("Set-CASMailbox"), "{}", f.stdout);
        assert!(f.stdout.contains("Needs attention:"), "{}", f.stdout);
        assert!(!f.stdout.contains("fake-secret-value"));
        assert_eq!(s["upstreams"][0]["state"], "paused");
        assert_eq!(s["upstreams"][0]["problem"], "smtp_auth_disabled");
        assert!(!s["attention"].as_array().unwrap().is_empty());
        let u = &s["upstreams"][0];
        assert!(u["since_ms"].as_u64().is_some(), "{u}");
        assert!(u["reply"].as_str().unwrap().contains("5.7.139"), "{u}");
        assert!(u["next_probe_ms"].as_u64().is_some(), "{u}");
        assert!(
            u["token"]["expires_ms"].as_u64().unwrap() > u["since_ms"].as_u64().unwrap(),
            "{u}"
        );
        assert_eq!(u["token"]["last_error"], Value::Null, "{u}");
        assert!(
            u["connections_in_use"].is_u64() && u["connections_max"].is_u64(),
            "{u}"
        );
        assert!(u["messages_this_minute"].is_u64(), "{u}");
        assert!(
            u["recipients_day"].is_u64() && u["recipients_per_day"].is_u64(),
            "{u}"
        );
        assert!(f.stdout.contains("reply: 535 5.7.139"), "{}", f.stdout);
        assert!(f.stdout.contains("next probe "), "{}", f.stdout);
        assert!(f.stdout.contains("token: expires in "), "{}", f.stdout);
        assert!(f.stdout.contains("recipients in 24h "), "{}", f.stdout);
        let entry = l
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == id.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("{id} not listed: {l}"));
        assert_eq!(entry["state"], "paused", "{entry}");
        assert_eq!(entry["last_problem"], "smtp_auth_disabled", "{entry}");
        drop(relay);
    }

    /// A relay with its admin socket and one Exchange upstream pointing at the fakes.
    fn exchange_config(dir: &Path, ex: &FakeExchange, token: &FakeToken) -> RelayConfig {
        let secret = dir.join("client.secret");
        std::fs::write(&secret, "fake-secret-value\n").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let mut rc = admin_config(dir);
        rc.upstreams = Some(format!(
            "  - name: contoso\n    type: exchange-online\n    mailbox: relay@contoso.com\n    tenant_id: contoso.com\n    client_id: 11111111-1111-1111-1111-111111111111\n    client_secret_file: {:?}\n    host: localhost\n    port: {}\n    token_url: {:?}\n    ca_file: {:?}\n",
            secret.display().to_string(),
            ex.addr().port(),
            token.url(),
            dir.join("ca.pem").display().to_string(),
        ));
        rc
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delete_is_refused_while_an_attempt_runs() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let token = FakeToken::start(Duration::from_secs(3600)).await;
        let ex = FakeExchange::start(token.issued(), "relay@contoso.com").await;
        ex.write_ca(&dir);
        // The upstream never answers MAIL FROM: the attempt stays in flight.
        ex.add_rule(Rule::hang_at(Stage::Mail));
        let rc = exchange_config(&dir, &ex, &token);
        tokio::task::spawn_blocking(move || {
            let relay = start(&rc);
            let id = send(&relay, "scanner@contoso.com", &["a@fabrikam.com"], "t");
            assert!(
                wait_until(LONG, || listed(&dir)
                    .get(&id)
                    .is_some_and(|e| e["state"] == "sending")),
                "{:?}\n{}",
                listed(&dir),
                relay.transcript()
            );
            let f = cli(&dir, &["queue", "delete", &id, "--yes"]);
            assert_eq!(code(&f), 1, "{}", f.stdout);
            assert!(
                f.stderr
                    .contains(&format!("a delivery attempt for {id} is running now")),
                "{}",
                f.stderr
            );
            assert!(relay.queue_dir().join(format!("{id}.msg")).exists());
            let f = cli(&dir, &["queue", "retry", &id]);
            assert_eq!(code(&f), 1);
            assert!(f.stderr.contains("running now"), "{}", f.stderr);
            let s = json(&dir, &["status"]);
            assert_eq!(s["upstreams"][0]["connections_in_use"], 1, "{s}");
            assert_eq!(s["upstreams"][0]["state"], "ok", "{s}");
        })
        .await
        .unwrap();
    }

    /// `--json` output whatever the exit code.
    fn json_any(dir: &Path, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let f = cli(dir, &a);
        serde_json::from_str(&f.stdout)
            .unwrap_or_else(|e| panic!("{args:?} --json printed no JSON ({e}):\n{}", f.stdout))
    }
}

#[test]
fn a_stale_socket_is_replaced_and_a_missing_directory_only_warns() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let rc = admin_config(dir);
    // kill -9 leaves the socket file behind; the next start replaces it.
    let mut relay = start(&rc);
    relay.kill9();
    assert!(socket(dir).exists());
    let relay = start(&rc);
    let f = cli(dir, &["status"]);
    assert_eq!(code(&f), 0, "{}\n{}", f.stderr, relay.transcript());
    drop(relay);

    // No directory for the socket (run by hand, no /run/mailbridge): one warning with the
    // remedy, and the relay works on.
    let tmp2 = tempfile::tempdir().unwrap();
    let mut rc2 = RelayConfig::new(tmp2.path());
    let missing = tmp2.path().join("missing/admin.sock");
    rc2.extra = format!("admin:\n  socket: {:?}\n", missing.display().to_string());
    let relay = rc2.start();
    let warned = |relay: &Relay| {
        relay
            .logs()
            .into_iter()
            .filter(|v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("cannot open the admin socket"))
            })
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(SHORT, || !warned(&relay).is_empty()),
        "{}",
        relay.transcript()
    );
    let w = &warned(&relay)[0];
    assert_eq!(w["level"], "WARN");
    let m = w["message"].as_str().unwrap();
    assert!(
        m.contains("set admin.socket") && m.contains("RuntimeDirectory"),
        "{m}"
    );
    let id = send(&relay, "printer@lan.test", &["x@ext.test"], "still-works");
    relay.wait_delivered(&id);
    assert_eq!(warned(&relay).len(), 1);
    let f = run_with_timeout(
        mailbridge_cmd().args(["status", "-c"]).arg(rc2.path()),
        tmp2.path(),
        "unreachable",
        LONG,
    );
    assert_eq!(code(&f), 1);
    assert!(f.stderr.contains("no such socket"), "{}", f.stderr);
}

#[test]
fn the_admin_socket_refuses_junk_overlong_requests_and_too_many_clients() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let rc = admin_config(dir);
    let _relay = start(&rc);
    let mode = std::fs::metadata(socket(dir)).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660);
    let ask = |bytes: &[u8]| -> Value {
        let mut s = UnixStream::connect(socket(dir)).unwrap();
        s.set_read_timeout(Some(SHORT)).unwrap();
        // The daemon may answer and close before it has read everything (a request over
        // the limit, or no free slot): the write then fails with EPIPE, and the answer is
        // still there to read.
        let _ = s.write_all(bytes);
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    };
    let r = ask(b"not json\n");
    assert_eq!(r["ok"], false);
    assert!(
        r["error"].as_str().unwrap().contains("unknown request"),
        "{r}"
    );
    let r = ask(b"{\"cmd\":\"format_disk\"}\n");
    assert_eq!(r["ok"], false);
    let mut long = vec![b'x'; 70 * 1024];
    long.push(b'\n');
    let r = ask(&long);
    assert_eq!(r["error"], "request too long");
    let r = ask(b"{\"cmd\":\"queue_list\"}\n");
    assert_eq!(r, serde_json::json!({"ok": true, "data": []}));

    // Four silent clients take every slot: the fifth is told to try again.
    let idle: Vec<UnixStream> = (0..4)
        .map(|_| UnixStream::connect(socket(dir)).unwrap())
        .collect();
    let r = ask(b"{\"cmd\":\"status\"}\n");
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("busy"), "{r}");
    drop(idle);
    assert!(wait_until(SHORT, || ask(b"{\"cmd\":\"status\"}\n")["ok"] == true));
}

/// `mailbridge reload` through the admin socket: a valid change is applied and listed (exit
/// 0); an invalid file is refused with every error on stderr (exit 1) and the running
/// configuration stays.
#[test]
fn reload_command_applies_a_change_and_lists_every_error_of_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut rc = admin_config(dir.path());
    rc.write();
    let relay = start(&rc);

    rc.extra = format!(
        "{}limits:\n  max_recipients: 3\n",
        admin_config(dir.path()).extra
    );
    rc.write();
    let f = cli(dir.path(), &["reload"]);
    assert_eq!(code(&f), 0, "{}\n{}", f.stdout, f.stderr);
    assert!(f.stdout.contains("configuration reloaded"), "{}", f.stdout);
    assert!(f.stdout.contains("limits changed"), "{}", f.stdout);
    // The new limit is in force for a new session: the 4th recipient gets 452.
    fourth_recipient_refused(&relay);

    rc.extra = format!(
        "{}limits:\n  max_recipients: 0\n  max_message_size: lots\n",
        admin_config(dir.path()).extra
    );
    rc.write();
    let f = cli(dir.path(), &["reload"]);
    assert_eq!(code(&f), 1, "{}\n{}", f.stdout, f.stderr);
    assert!(f.stderr.contains("limits.max_recipients"), "{}", f.stderr);
    assert!(f.stderr.contains("limits.max_message_size"), "{}", f.stderr);
    // Still the reloaded limit of 3, not the bad file's.
    fourth_recipient_refused(&relay);
}

/// A new session to `relay` can name three recipients, and the fourth gets 452.
fn fourth_recipient_refused(relay: &Relay) {
    let mut s = Smtp::greet_ehlo(relay.addr()).unwrap();
    s.expect("MAIL FROM:<a@example.com>", 250).unwrap();
    for to in ["x@example.com", "y@example.com", "z@example.com"] {
        s.expect(&format!("RCPT TO:<{to}>"), 250).unwrap();
    }
    s.expect("RCPT TO:<w@example.com>", 452).unwrap();
}
