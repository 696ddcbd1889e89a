//! Live reload (issue 9 §5) of the real binary: SIGHUP to `mailbridge serve -c` re-reads the
//! file. New connections and deliveries see the new configuration, running sessions finish
//! on theirs, an invalid file changes nothing and every error is logged, a listener address
//! change is logged as needing a restart, and reloads under load lose nothing. One
//! in-process test checks what the reload hook (`mailbridge reload`) returns.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::daemon::{LONG, Relay, RelayConfig, SHORT, Smtp, wait_until};

/// The PLAIN message `\0user\0password`, base64-encoded.
fn plain(user: &str, password: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

fn hash(pw: &str) -> String {
    mailbridge::inbound::auth::hash_password(&mailbridge::secret::Secret::new(pw)).unwrap()
}

/// Log lines whose message is `message`.
fn count(relay: &Relay, message: &str) -> usize {
    relay
        .logs()
        .iter()
        .filter(|v| v["message"] == message)
        .count()
}

/// Sends SIGHUP and waits for the reload's outcome (success or failure); returns the log
/// lines that the reload wrote.
fn reload(relay: &Relay) -> Vec<Value> {
    let before = relay.logs().len();
    let done = |v: &Value| {
        v["message"] == "configuration reloaded"
            || v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("reload failed"))
    };
    relay.sighup();
    assert!(
        wait_until(SHORT, || relay.logs()[before.min(relay.logs().len())..]
            .iter()
            .any(done)),
        "no reload outcome logged\n{}",
        relay.transcript()
    );
    relay.logs()[before..].to_vec()
}

fn message(subject: &str) -> Vec<u8> {
    format!("From: <scanner@contoso.com>\r\nTo: <a@fabrikam.com>\r\nSubject: {subject}\r\nMessage-ID: <{subject}@test>\r\n\r\nbody\r\n").into_bytes()
}

/// A session that has said EHLO.
fn session(addr: SocketAddr) -> Smtp {
    Smtp::greet_ehlo(addr).expect("greeting and EHLO")
}

/// A plaintext listener that offers AUTH (legacy devices), through `listener_tls`.
const PLAIN_AUTH_LISTENER: &str = "none\n    allow_plaintext_auth: true";

/// Users, access and a listener: one reload adds a user and moves loopback from
/// `allow_networks` to `auth_networks`; a second one removes loopback altogether.
#[test]
fn reload_adds_a_user_changes_access_and_running_sessions_keep_theirs() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path());
    cfg.listener_tls = vec![PLAIN_AUTH_LISTENER];
    let users_a = format!(
        "users:\n  - username: alice\n    password_hash: {:?}\n    allowed_senders: [\"*\"]\n",
        hash("alice-pw")
    );
    cfg.extra = format!("access:\n  allow_networks: [\"127.0.0.0/8\"]\n{users_a}");
    let relay = cfg.start();

    // Before: bob does not exist; open a session that will outlive the reload.
    let mut c = session(relay.addr());
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", plain("bob", "bob-pw")))
            .unwrap()
            .code,
        535
    );
    let mut old = session(relay.addr());

    cfg.extra = format!(
        "access:\n  allow_networks: [\"10.0.0.0/8\"]\n  auth_networks: [\"127.0.0.0/8\"]\n{users_a}  - username: bob\n    password_hash: {:?}\n    allowed_senders: [\"*\"]\n",
        hash("bob-pw")
    );
    cfg.write();
    let lines = reload(&relay);
    let done = lines
        .iter()
        .find(|v| v["message"] == "configuration reloaded")
        .unwrap_or_else(|| panic!("reload failed\n{}", relay.transcript()));
    let changes = done["changes"].as_str().unwrap();
    assert!(changes.contains("user bob added"), "{changes}");
    assert!(changes.contains("access changed"), "{changes}");
    // No secret in what the reload logged.
    for l in &lines {
        assert!(!l.to_string().contains("$argon2id$"), "{l}");
    }

    // A new connection: loopback is only in auth_networks now, so it must AUTH; bob can.
    let mut c = session(relay.addr());
    let r = c.cmd("MAIL FROM:<scanner@contoso.com>").unwrap();
    assert_eq!(r.code, 530, "{:?}", r.lines);
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", plain("bob", "bob-pw")))
            .unwrap()
            .code,
        235
    );
    let r = c
        .send_message("scanner@contoso.com", &["a@fabrikam.com"], &message("bob"))
        .unwrap();
    assert_eq!(r.code, 250, "{:?}", r.lines);
    relay.wait_delivered(&r.queue_id().unwrap());

    // The session opened before the reload still has loopback in allow_networks.
    let r = old
        .send_message("scanner@contoso.com", &["a@fabrikam.com"], &message("old"))
        .unwrap();
    assert_eq!(r.code, 250, "{:?}", r.lines);
    relay.wait_delivered(&r.queue_id().unwrap());

    // Loopback removed from both lists: new connections are refused, the old one goes on.
    cfg.extra = format!(
        "access:\n  allow_networks: [\"10.0.0.0/8\"]\n  auth_networks: [\"10.0.0.0/8\"]\n{users_a}"
    );
    cfg.write();
    assert_eq!(count_ok(&reload(&relay)), 1, "{}", relay.transcript());
    let mut refused = Smtp::connect(relay.addr()).unwrap();
    let r = refused.read_reply().unwrap();
    assert!(r.last().starts_with("554 5.7.1"), "{:?}", r.lines);
    let r = old
        .send_message("scanner@contoso.com", &["a@fabrikam.com"], &message("old2"))
        .unwrap();
    assert_eq!(r.code, 250, "{:?}", r.lines);
}

fn count_ok(lines: &[Value]) -> usize {
    lines
        .iter()
        .filter(|v| v["message"] == "configuration reloaded")
        .count()
}

/// A self-signed certificate for localhost: (cert PEM, key PEM, SHA-256 of the DER).
fn certificate(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    use sha2::Digest;
    use std::os::unix::fs::PermissionsExt;
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (cert, key, sha2::Sha256::digest(c.cert.der()).to_vec())
}

/// An implicit-TLS connection that has read the greeting: (the stream, the SHA-256 of the
/// certificate the server showed).
fn tls_connect(addr: SocketAddr) -> (openssl::ssl::SslStream<std::net::TcpStream>, Vec<u8>) {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    let tcp = std::net::TcpStream::connect_timeout(&addr, SHORT).unwrap();
    tcp.set_read_timeout(Some(SHORT)).unwrap();
    let mut s = b.build().connect("localhost", tcp).expect("TLS handshake");
    let fp = s
        .ssl()
        .peer_certificate()
        .unwrap()
        .digest(openssl::hash::MessageDigest::sha256())
        .unwrap()
        .to_vec();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"220 "), "{:?}", &buf[..n]);
    (s, fp)
}

fn tls_cmd(s: &mut openssl::ssl::SslStream<std::net::TcpStream>, line: &str) -> String {
    s.write_all(format!("{line}\r\n").as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed");
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if text
            .lines()
            .last()
            .is_some_and(|l| l.len() >= 4 && l.as_bytes()[3] == b' ')
        {
            return text.into_owned();
        }
    }
}

#[test]
fn reload_swaps_the_lan_certificate_for_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (c1, k1, fp1) = certificate(dir.path(), "one");
    let (c2, k2, fp2) = certificate(dir.path(), "two");
    let tls = |c: &Path, k: &Path| {
        format!(
            "access:\n  allow_networks: [\"127.0.0.0/8\"]\ntls:\n  cert_file: {:?}\n  key_file: {:?}\n",
            c.display().to_string(),
            k.display().to_string()
        )
    };
    let mut cfg = RelayConfig::new(dir.path());
    cfg.listener_tls = vec!["implicit"];
    cfg.extra = tls(&c1, &k1);
    let relay = cfg.start();
    let (mut old, seen) = tls_connect(relay.addr());
    assert_eq!(seen, fp1);

    cfg.extra = tls(&c2, &k2);
    cfg.write();
    let lines = reload(&relay);
    let done = lines
        .iter()
        .find(|v| v["message"] == "configuration reloaded")
        .unwrap_or_else(|| panic!("reload failed\n{}", relay.transcript()));
    assert!(
        done["changes"]
            .as_str()
            .unwrap()
            .contains("LAN certificate replaced"),
        "{done}"
    );
    let (_new, seen) = tls_connect(relay.addr());
    assert_eq!(seen, fp2, "a new connection sees the new certificate");
    // The session from before goes on over its TLS connection.
    assert!(tls_cmd(&mut old, "EHLO client.test").starts_with("250"));

    // Replacing the files themselves (same paths) is seen too.
    let (c3, k3, fp3) = certificate(dir.path(), "three");
    std::fs::rename(&c3, &c2).unwrap();
    std::fs::rename(&k3, &k2).unwrap();
    assert_eq!(count_ok(&reload(&relay)), 1, "{}", relay.transcript());
    assert_eq!(tls_connect(relay.addr()).1, fp3);
}

/// Invalid files: bad YAML, an unknown key, and two invalid values. Each reload fails with
/// every error logged; the relay keeps working on the configuration it had.
#[test]
fn invalid_reload_keeps_the_old_configuration_and_logs_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path());
    cfg.extra = "access:\n  allow_networks: [\"127.0.0.0/8\"]\n".into();
    let relay = cfg.start();

    let cases: [(&str, &[&str]); 3] = [
        ("access: [unclosed\n", &["relay.yaml"]),
        (
            "access:\n  allow_networks: [\"127.0.0.0/8\"]\n  allow_netwroks: []\n",
            &["allow_netwroks"],
        ),
        (
            "access:\n  allow_networks: [\"127.0.0.0/8\"]\nlimits:\n  max_connections: 0\n  max_message_size: lots\n",
            &["max_connections", "max_message_size"],
        ),
    ];
    for (extra, needles) in cases {
        cfg.extra = extra.into();
        cfg.write();
        let lines = reload(&relay);
        let failed = lines
            .iter()
            .find(|v| v["message"].as_str().unwrap().starts_with("reload failed"))
            .unwrap_or_else(|| panic!("{extra}: reload did not fail\n{}", relay.transcript()));
        let n = needles.len();
        assert_eq!(
            failed["message"],
            format!("reload failed: {n} errors, keeping the previous configuration"),
            "{extra}"
        );
        // Each error follows on its own line (wait for them: same reload).
        assert!(
            wait_until(SHORT, || {
                let errs: Vec<String> = relay
                    .logs()
                    .iter()
                    .filter(|v| v["message"] == "reload error")
                    .map(|v| v["error"].to_string())
                    .collect();
                needles.iter().all(|k| errs.iter().any(|e| e.contains(k)))
            }),
            "{extra}: errors not logged\n{}",
            relay.transcript()
        );
        // Still the old configuration: loopback may send.
        let mut c = session(relay.addr());
        let r = c
            .send_message(
                "scanner@contoso.com",
                &["a@fabrikam.com"],
                &message("still"),
            )
            .unwrap();
        assert_eq!(r.code, 250, "{:?}", r.lines);
    }
    assert_eq!(count(&relay, "configuration reloaded"), 0);
}

#[test]
fn listener_address_change_is_logged_as_needing_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path());
    cfg.extra = "access:\n  allow_networks: [\"127.0.0.0/8\"]\n".into();
    let relay = cfg.start();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other = free.local_addr().unwrap();
    drop(free);
    cfg.listeners = vec![other.to_string()];
    cfg.extra =
        "access:\n  allow_networks: [\"127.0.0.0/8\"]\nlimits:\n  max_recipients: 7\n".into();
    cfg.write();
    let lines = reload(&relay);
    assert_eq!(count_ok(&lines), 1, "{}", relay.transcript());
    assert!(
        wait_until(SHORT, || relay.logs().iter().any(|v| v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("listeners[0].address: ")
                && m.contains(&other.to_string())
                && m.contains("needs a restart")))),
        "{}",
        relay.transcript()
    );
    // The old address still serves; the other one was not opened; the rest applied.
    let mut c = session(relay.addr());
    let r = c
        .send_message("scanner@contoso.com", &["a@fabrikam.com"], &message("x"))
        .unwrap();
    assert_eq!(r.code, 250);
    assert!(std::net::TcpStream::connect(other).is_err());
    let done = lines
        .iter()
        .find(|v| v["message"] == "configuration reloaded")
        .unwrap();
    assert_eq!(done["needs_restart"], 1, "{done}");
    assert!(done["changes"].as_str().unwrap().contains("limits changed"));
}

/// Several clients send without pause while the file is reloaded several times (the
/// upstream renamed back and forth, so each reload replaces it): every message that got a
/// 250 is delivered exactly once.
#[test]
fn reload_under_load_loses_nothing_and_delivers_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path());
    cfg.extra = "access:\n  allow_networks: [\"127.0.0.0/8\"]\n".into();
    let upstream = |name: &str| {
        format!(
            "  - name: {name}\n    type: outbox\n    path: {:?}\n",
            dir.path().join("outbox").display().to_string()
        )
    };
    cfg.upstreams = Some(upstream("first"));
    let relay = cfg.start();
    let addr = relay.addr();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|k| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    // A few messages per session, then a new connection.
                    let mut c = Smtp::greet_ehlo(addr).expect("connect");
                    for _ in 0..3 {
                        n += 1;
                        let r = c
                            .send_message(
                                "scanner@contoso.com",
                                &["a@fabrikam.com"],
                                &message(&format!("c{k}m{n}")),
                            )
                            .expect("send");
                        assert_eq!(r.code, 250, "{:?}", r.lines);
                        acked.push(r.queue_id().expect("a queue id"));
                    }
                    let _ = c.cmd("QUIT");
                }
                acked
            })
        })
        .collect();

    for i in 0..6 {
        // Let some mail flow between reloads.
        let seen = relay.logs().len();
        assert!(wait_until(SHORT, || relay.logs().len() > seen + 10));
        cfg.upstreams = Some(upstream(if i % 2 == 0 { "second" } else { "first" }));
        cfg.extra = format!(
            "access:\n  allow_networks: [\"127.0.0.0/8\"]\nlimits:\n  max_recipients: {}\n",
            50 + i
        );
        cfg.write();
        assert_eq!(count_ok(&reload(&relay)), 1, "{}", relay.transcript());
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let acked: Vec<String> = clients
        .into_iter()
        .flat_map(|h| h.join().expect("client thread"))
        .collect();
    assert!(acked.len() > 20, "only {} messages", acked.len());

    let outbox = dir.path().join("outbox");
    let delivered_files = || {
        std::fs::read_dir(&outbox)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".eml"))
                    .count()
            })
            .unwrap_or(0)
    };
    assert!(
        wait_until(LONG, || delivered_files() >= acked.len()),
        "{} of {} delivered\n{}",
        delivered_files(),
        acked.len(),
        relay.transcript()
    );
    for id in &acked {
        assert!(outbox.join(format!("{id}.eml")).exists(), "{id} missing");
    }
    assert_eq!(delivered_files(), acked.len(), "nothing else in the outbox");
    // Exactly once: one "delivered" log line per queue id.
    let deadline = Instant::now() + SHORT;
    loop {
        let mut per_id: HashMap<String, usize> = HashMap::new();
        for v in relay.logs() {
            if v["message"] == "delivered" {
                *per_id
                    .entry(v["queue_id"].as_str().unwrap_or("").to_string())
                    .or_default() += 1;
            }
        }
        if acked.iter().all(|id| per_id.get(id) == Some(&1)) {
            assert_eq!(per_id.len(), acked.len(), "delivered lines for other ids");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not each message delivered exactly once: {:?}",
            acked
                .iter()
                .filter(|id| per_id.get(*id) != Some(&1))
                .map(|id| (id, per_id.get(id)))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The replaced upstream objects were stopped once idle.
    assert!(count(&relay, "configuration reloaded") == 6);
}

/// What `mailbridge reload` gets back through `Control::reload`: the changes, or every
/// error; an in-process daemon started from a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_hook_returns_the_changes_or_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path());
    cfg.extra = "access:\n  allow_networks: [\"127.0.0.0/8\"]\n".into();
    cfg.write();
    let config = mailbridge::config::load(&cfg.path()).unwrap();
    let daemon = mailbridge::daemon::Daemon::start(config).await.unwrap();
    // Not enabled yet: refused with a reason.
    let e = daemon.control().reload().await.unwrap_err();
    assert!(e[0].contains("cannot reload"), "{e:?}");
    daemon.enable_reload(cfg.path());

    cfg.extra = "access:\n  allow_networks: [\"127.0.0.0/8\"]\nlimits:\n  max_connections: 0\n  max_message_size: lots\n".into();
    cfg.write();
    let errors = daemon.control().reload().await.unwrap_err();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("max_connections")));
    assert!(errors.iter().any(|e| e.contains("max_message_size")));
    assert_ne!(
        daemon.reloader().config().await.limits.max_connections,
        0,
        "the old configuration stays"
    );

    cfg.extra =
        "access:\n  allow_networks: [\"127.0.0.0/8\"]\nlimits:\n  max_recipients: 3\n".into();
    cfg.queue_extra = String::new();
    cfg.workers = 9;
    cfg.write();
    let changes = daemon.control().reload().await.unwrap();
    assert!(
        changes.contains(&"limits changed".to_string()),
        "{changes:?}"
    );
    assert!(
        changes
            .iter()
            .any(|c| c.contains("queue.workers: 4 -> 9 needs a restart")),
        "{changes:?}"
    );
    let now = daemon.reloader().config().await;
    assert_eq!(now.limits.max_recipients, 3);
    assert_eq!(now.queue.workers, 4, "workers keep their running value");
    daemon.shutdown().await;
}

/// Upstream credentials: a reload that leaves the upstream alone keeps its object (no new
/// token request); a new client id and secret rebuild it, and the next token request
/// carries them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_new_upstream_credentials_and_keeps_an_unchanged_upstream() {
    use crate::fake_exchange::FakeExchange;
    use crate::fake_token::FakeToken;
    use std::os::unix::fs::PermissionsExt;
    const OLD_ID: &str = "11111111-1111-1111-1111-111111111111";
    const NEW_ID: &str = "22222222-2222-2222-2222-222222222222";
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let token = FakeToken::start(Duration::from_secs(3600)).await;
    let ex = FakeExchange::start(token.issued(), "relay@contoso.com").await;
    ex.write_ca(dir.path());
    let secret = dir.path().join("client.secret");
    let write_secret = |v: &str| {
        std::fs::write(&secret, format!("{v}\n")).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    let upstream = |client_id: &str| {
        format!(
            "  - name: contoso\n    type: exchange-online\n    mailbox: relay@contoso.com\n    tenant_id: contoso.com\n    client_id: {client_id}\n    client_secret_file: {:?}\n    host: localhost\n    port: {}\n    token_url: {:?}\n    ca_file: {:?}\n",
            secret.display().to_string(),
            ex.addr().port(),
            token.url(),
            dir.path().join("ca.pem").display().to_string(),
        )
    };
    write_secret("old-secret-value");
    token.set_secret(Some("old-secret-value"));
    token.set_client_id(Some(OLD_ID));
    let mut cfg = RelayConfig::new(dir.path());
    cfg.extra = "access:\n  allow_networks: [\"127.0.0.0/8\"]\n".into();
    cfg.upstreams = Some(upstream(OLD_ID));
    let relay = tokio::task::block_in_place(|| cfg.start());
    let send = |subject: &'static str| {
        let addr = relay.addr();
        tokio::task::spawn_blocking(move || {
            let mut c = session(addr);
            c.send_message(
                "scanner@contoso.com",
                &["a@fabrikam.com"],
                &message(subject),
            )
            .unwrap()
            .code
        })
    };
    assert_eq!(send("one").await.unwrap(), 250);
    assert!(
        ex.wait_for_received(1, LONG).await,
        "{}",
        relay.transcript()
    );
    let requests = token.requests();
    assert!(requests >= 1);

    // Reload with the upstream unchanged: same object, same token.
    cfg.extra =
        "access:\n  allow_networks: [\"127.0.0.0/8\"]\nlimits:\n  max_recipients: 9\n".into();
    cfg.write();
    let lines = tokio::task::block_in_place(|| reload(&relay));
    assert_eq!(count_ok(&lines), 1, "{}", relay.transcript());
    assert_eq!(send("two").await.unwrap(), 250);
    assert!(
        ex.wait_for_received(2, LONG).await,
        "{}",
        relay.transcript()
    );
    assert_eq!(
        token.requests(),
        requests,
        "unchanged upstream: no new token"
    );

    // Rotate: the endpoint now knows only the new client id and secret.
    write_secret("new-secret-value");
    token.set_secret(Some("new-secret-value"));
    token.set_client_id(Some(NEW_ID));
    cfg.upstreams = Some(upstream(NEW_ID));
    cfg.write();
    let lines = tokio::task::block_in_place(|| reload(&relay));
    let done = lines
        .iter()
        .find(|v| v["message"] == "configuration reloaded")
        .unwrap_or_else(|| panic!("{}", relay.transcript()));
    assert!(
        done["changes"]
            .as_str()
            .unwrap()
            .contains("upstream contoso changed"),
        "{done}"
    );
    assert_eq!(send("three").await.unwrap(), 250);
    assert!(
        ex.wait_for_received(3, LONG).await,
        "{}",
        relay.transcript()
    );
    // The first token request after the reload carries the new client id and secret (the
    // rebuilt upstream's refresher asks at once; a pooled connection may carry message three).
    assert!(
        wait_until(SHORT, || token.forms().len() > requests),
        "no token request after the reload"
    );
    let form = token.forms()[requests].clone();
    assert!(
        form.iter().any(|(k, v)| k == "client_id" && v == NEW_ID),
        "{form:?}"
    );
    assert!(
        form.iter()
            .any(|(k, v)| k == "client_secret" && v == "new-secret-value"),
        "the next token request carries the new secret"
    );
    // The secrets never reach the log.
    let log = relay.transcript();
    assert!(!log.contains("new-secret-value") && !log.contains("old-secret-value"));
}

/// `status` shows the listener settings in force: a reload that changes a listener's TLS
/// profile is seen there at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_listener_settings_after_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path());
    cfg.listener_tls = vec!["starttls"];
    cfg.extra =
        "access:\n  allow_networks: [\"127.0.0.0/8\"]\ntls:\n  tls_profile: compatible\n".into();
    cfg.write();
    let config = mailbridge::config::load(&cfg.path()).unwrap();
    let daemon = mailbridge::daemon::Daemon::start(config).await.unwrap();
    daemon.enable_reload(cfg.path());
    let before = daemon.control().status().await;
    assert_eq!(
        before.listeners[0].tls_profile.as_deref(),
        Some("compatible")
    );

    cfg.extra =
        "access:\n  allow_networks: [\"127.0.0.0/8\"]\ntls:\n  tls_profile: modern\n".into();
    cfg.write();
    daemon.control().reload().await.unwrap();
    let after = daemon.control().status().await;
    assert_eq!(after.listeners[0].tls_profile.as_deref(), Some("modern"));
    assert_eq!(after.listeners[0].address, before.listeners[0].address);
    daemon.shutdown().await;
}
