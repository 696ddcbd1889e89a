//! Real clients authenticating against the real binary on 127.0.0.1: swaks (`--auth PLAIN`
//! and `--auth LOGIN` over STARTTLS, `--auth LOGIN` with `--tls-on-connect`), curl
//! (`--ssl-reqd --user` over STARTTLS, and `smtps://`), Python smtplib (`starttls()` +
//! `login()`, `SMTP_SSL` + `login()`). The certificate is made by rcgen here, the user's
//! argon2id hash by `mailbridge::inbound::auth::hash_password`.
//!
//! The relay accepts authenticated mail only (`allow_networks: []`, loopback in
//! `auth_networks`), so every message that reaches the outbox went through AUTH; each must
//! carry `(Authenticated sender: printer01)` in our Received header. A wrong password gets
//! `535 5.7.8` and nothing is queued, and no AUTH at all gets `530 5.7.0`; a sender outside
//! the user's `allowed_senders` gets `553 5.7.1`, a header From outside it `550 5.7.1`
//! (behaviour.md C30, C33, C34). The daemon logs at trace level, and its output must never
//! hold the password, nor any base64 form of it, nor the hash (C35).

use std::path::PathBuf;
use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use crate::daemon::{Finished, Relay, RelayConfig, SHORT, files, parse_eml, run_with_timeout};
use crate::interop::require;

const USER: &str = "printer01";
/// Distinctive, so that finding it in the logs cannot be a coincidence.
const PASSWORD: &str = "Scan2Mail-pw-8c41f0";
const FROM: &str = "printer@lan.example";
const TO: &str = "b@ext.example";

struct AuthRelay {
    relay: Relay,
    cert: PathBuf,
    dir: tempfile::TempDir,
}

impl AuthRelay {
    fn starttls_port(&self) -> u16 {
        self.relay.addrs[0].port()
    }
    fn implicit_port(&self) -> u16 {
        self.relay.addrs[1].port()
    }
    fn server(&self, port: u16) -> String {
        format!("127.0.0.1:{port}")
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Waits for `id` in the outbox and checks it went through AUTH as USER, over TLS.
    fn check_delivered(&self, id: &str, what: &str) {
        let eml = self.relay.wait_delivered(id);
        let e = parse_eml(&eml, true, true)
            .unwrap_or_else(|e| panic!("{what}: {e}\n{}", String::from_utf8_lossy(&eml)));
        assert_eq!(e.return_path, FROM, "{what}");
        assert!(
            e.received
                .contains(&format!("\n\t(Authenticated sender: {USER})")),
            "{what}: no authenticated sender in {:?}",
            e.received
        );
        assert!(
            e.received.contains(" with ESMTPSA id "),
            "{what}: not ESMTPSA: {:?}",
            e.received
        );
    }

    /// The `.eml` files in the outbox.
    fn outbox(&self) -> Vec<String> {
        files(&self.relay.outbox)
            .into_iter()
            .filter(|f| f.ends_with(".eml"))
            .collect()
    }

    /// Messages in the spool's queue.
    fn queued(&self) -> Vec<String> {
        files(&self.relay.queue_dir())
    }

    /// The daemon's output holds neither the password nor a base64 form of it, nor the hash;
    /// and it did log the AUTH events (so the check looked at a real trace). `mechanisms`:
    /// those of the successful AUTHs in order, or `None` where the client picks.
    fn assert_logs_clean(&self, successes: usize, mechanisms: Option<&[&str]>, failures: usize) {
        let text = self.relay.transcript();
        for needle in secret_forms() {
            assert!(
                !text.contains(&needle),
                "the daemon's output contains {needle:?}:\n{text}"
            );
        }
        assert!(!text.contains("$argon2id$"), "a hash was logged:\n{text}");
        let logs = self.relay.logs();
        let count = |message: &str| {
            logs.iter()
                .filter(|v| v["message"] == message && v["user"] == USER)
                .count()
        };
        assert_eq!(count("authenticated"), successes, "{text}");
        if let Some(want) = mechanisms {
            let used: Vec<&str> = logs
                .iter()
                .filter(|v| v["message"] == "authenticated")
                .filter_map(|v| v["mechanism"].as_str())
                .collect();
            assert_eq!(used, want, "{text}");
        }
        assert_eq!(
            count("authentication failed (unknown user or wrong password)"),
            failures,
            "{text}"
        );
    }
}

/// The password as it could appear: plain, and base64 at each of the three alignments it
/// can have inside a longer response (the SASL PLAIN `\0user\0password` among them), with
/// the characters that depend on the surrounding bytes cut off.
fn secret_forms() -> Vec<String> {
    let mut v = vec![PASSWORD.to_string()];
    for full in [
        PASSWORD.to_string(),
        format!("\0{USER}\0{PASSWORD}"),
        format!("{USER}\0{USER}\0{PASSWORD}"),
    ] {
        let encoded = B64.encode(full.as_bytes());
        v.push(encoded.trim_end_matches('=').to_string());
        v.push(encoded);
    }
    for offset in 0..3 {
        let mut bytes = vec![0u8; offset];
        bytes.extend_from_slice(PASSWORD.as_bytes());
        let encoded = B64.encode(&bytes);
        let start = if offset == 0 { 0 } else { 4 };
        let core = &encoded[start..encoded.len() - 4];
        assert!(core.len() >= 12, "{core}");
        v.push(core.to_string());
    }
    v
}

/// A relay that takes authenticated mail only: a STARTTLS listener and an implicit-TLS
/// listener, rcgen's certificate, one user allowed to send as FROM.
fn auth_relay() -> AuthRelay {
    let dir = tempfile::tempdir().unwrap();
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    // mailbridge refuses a private key that group or others can read.
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let hash = mailbridge::inbound::auth::hash_password(&mailbridge::secret::Secret::new(PASSWORD))
        .unwrap();
    let mut cfg = RelayConfig::new(dir.path());
    cfg.listeners = vec!["127.0.0.1:0".into(), "127.0.0.1:0".into()];
    cfg.listener_tls = vec!["starttls", "implicit"];
    // The strictest level: nothing the session logs may show the password (C35).
    cfg.log_level = "trace";
    cfg.extra = format!(
        "tls:\n  cert_file: {:?}\n  key_file: {:?}\n\
         access:\n  allow_networks: []\n  auth_networks: [\"127.0.0.0/8\"]\n\
         users:\n  - username: {USER}\n    password_hash: {hash:?}\n    allowed_senders: [{FROM:?}]\n\
         received_auth_user: true\n",
        cert.display().to_string(),
        key.display().to_string(),
    );
    let relay = cfg.start();
    AuthRelay { relay, cert, dir }
}

/// A message file with Date and Message-ID, so the relay adds only its Received header.
fn message_file(t: &AuthRelay, name: &str, header_from: &str) -> PathBuf {
    let p = t.path(&format!("{name}.eml"));
    std::fs::write(
        &p,
        format!(
            "From: {header_from}\r\nTo: {TO}\r\nSubject: {name}\r\n\
             Date: Thu, 27 Nov 2025 10:00:00 +0000\r\nMessage-ID: <{name}@lan.example>\r\n\
             \r\nscan attached\r\n"
        ),
    )
    .unwrap();
    p
}

fn ok(f: &Finished, what: &str, t: &AuthRelay) {
    assert!(
        f.status.success(),
        "{what} failed ({:?}):\n{}\n{}\n{}",
        f.status,
        f.stdout,
        f.stderr,
        t.relay.transcript()
    );
}

/// The queue id from a `250 2.0.0 Ok: queued as <id>` somewhere in a client's output.
fn queue_id(output: &str, what: &str) -> String {
    let marker = "250 2.0.0 Ok: queued as ";
    let start = output
        .find(marker)
        .unwrap_or_else(|| panic!("{what}: no queue id in:\n{output}"))
        + marker.len();
    let id: String = output[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    assert!(!id.is_empty(), "{what}: empty queue id in:\n{output}");
    id
}

/// One swaks run with `--auth`.
struct SwaksAuth<'a> {
    name: &'a str,
    port: u16,
    /// TLS and mechanism options.
    args: [&'a str; 3],
    password: &'a str,
    from: &'a str,
    header_from: &'a str,
}

impl SwaksAuth<'_> {
    fn run(&self, t: &AuthRelay, swaks: &std::path::Path) -> Finished {
        let data = message_file(t, self.name, self.header_from);
        run_with_timeout(
            Command::new(swaks)
                .args(["--server", &t.server(self.port)])
                .args(self.args)
                .args(["--auth-user", USER, "--auth-password", self.password])
                .args(["--from", self.from, "--to", TO, "--data"])
                .arg(&data),
            t.dir.path(),
            self.name,
            SHORT,
        )
    }
}

#[test]
fn swaks_auth_plain_and_login_over_starttls_and_tls_on_connect() {
    let Some(swaks) = require("swaks", "swaks") else {
        return;
    };
    let t = auth_relay();
    let runs = [
        (
            "swaks-starttls-plain",
            t.starttls_port(),
            ["--tls", "--auth", "PLAIN"],
        ),
        (
            "swaks-starttls-login",
            t.starttls_port(),
            ["--tls", "--auth", "LOGIN"],
        ),
        (
            "swaks-tls-on-connect-login",
            t.implicit_port(),
            ["--tls-on-connect", "--auth", "LOGIN"],
        ),
    ];
    let mut ids = Vec::new();
    for (name, port, args) in runs {
        let f = SwaksAuth {
            name,
            port,
            args,
            password: PASSWORD,
            from: FROM,
            header_from: FROM,
        }
        .run(&t, &swaks);
        ok(&f, name, &t);
        assert!(
            f.stdout.contains("235 2.7.0 Authentication successful"),
            "{name}:\n{}",
            f.stdout
        );
        ids.push((queue_id(&f.stdout, name), name));
    }
    for (id, name) in &ids {
        t.check_delivered(id, name);
    }
    t.assert_logs_clean(3, Some(&["PLAIN", "LOGIN", "LOGIN"]), 0);
}

#[test]
fn curl_ssl_reqd_user_over_starttls_and_smtps() {
    let Some(curl) = require("curl", "curl") else {
        return;
    };
    let t = auth_relay();
    let mut ids = Vec::new();
    for (url, name) in [
        (
            format!("smtp://{}", t.server(t.starttls_port())),
            "curl-starttls-auth",
        ),
        (
            format!("smtps://{}", t.server(t.implicit_port())),
            "curl-smtps-auth",
        ),
    ] {
        let file = message_file(&t, name, FROM);
        // -v: curl prints the server's replies (and so the queue id) on stderr.
        let f = run_with_timeout(
            Command::new(&curl)
                .args(["-sS", "-v", "--ssl-reqd", "--cacert"])
                .arg(&t.cert)
                .args(["--user", &format!("{USER}:{PASSWORD}")])
                .args([&url, "--mail-from", FROM, "--mail-rcpt", TO, "-T"])
                .arg(&file),
            t.dir.path(),
            name,
            SHORT,
        );
        ok(&f, name, &t);
        assert!(f.stderr.contains("< 235 2.7.0"), "{name}:\n{}", f.stderr);
        ids.push((queue_id(&f.stderr, name), name));
    }
    for (id, name) in &ids {
        t.check_delivered(id, name);
    }
    t.assert_logs_clean(2, None, 0);
}

#[test]
fn python_smtplib_starttls_login_and_smtp_ssl_login() {
    let Some(python) = require("python3", "python3") else {
        return;
    };
    let t = auth_relay();
    let script = r#"
import smtplib, ssl, sys
cafile, p1, p2, user, password, sender, rcpt = sys.argv[1:8]
ctx = ssl.create_default_context(cafile=cafile)
msg = ("From: %s\r\nTo: %s\r\nSubject: py\r\nDate: Thu, 27 Nov 2025 10:00:00 +0000\r\n"
       "Message-ID: <py@lan.example>\r\n\r\nhello\r\n" % (sender, rcpt)).encode()

def send(s, label):
    code, resp = s.login(user, password)
    assert code == 235, (code, resp)
    assert s.sock.version() in ("TLSv1.2", "TLSv1.3"), s.sock.version()
    assert s.mail(sender)[0] == 250
    assert s.rcpt(rcpt)[0] == 250
    code, resp = s.data(msg)
    assert code == 250, (code, resp)
    print(label, "250", resp.decode())
    s.quit()

s = smtplib.SMTP("localhost", int(p1), timeout=20)
s.starttls(context=ctx)
send(s, "starttls")
send(smtplib.SMTP_SSL("localhost", int(p2), context=ctx, timeout=20), "smtp_ssl")
"#;
    let f = run_with_timeout(
        Command::new(&python)
            .arg("-c")
            .arg(script)
            .arg(&t.cert)
            .arg(t.starttls_port().to_string())
            .arg(t.implicit_port().to_string())
            .args([USER, PASSWORD, FROM, TO]),
        t.dir.path(),
        "python-auth",
        SHORT,
    );
    ok(&f, "python smtplib", &t);
    for label in ["starttls", "smtp_ssl"] {
        let line = f
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("{label} ")))
            .unwrap_or_else(|| panic!("no {label} line in:\n{}", f.stdout));
        let id = queue_id(line, label);
        t.check_delivered(&id, label);
    }
    t.assert_logs_clean(2, None, 0);
}

#[test]
fn swaks_wrong_password_gets_535_and_nothing_is_queued() {
    let Some(swaks) = require("swaks", "swaks") else {
        return;
    };
    let t = auth_relay();
    let f = SwaksAuth {
        name: "swaks-wrong-password",
        port: t.starttls_port(),
        args: ["--tls", "--auth", "LOGIN"],
        password: "not-the-password",
        from: FROM,
        header_from: FROM,
    }
    .run(&t, &swaks);
    assert!(
        !f.status.success(),
        "swaks succeeded with a wrong password:\n{}",
        f.stdout
    );
    assert!(
        f.stdout
            .contains("535 5.7.8 Authentication credentials invalid"),
        "{}",
        f.stdout
    );
    assert!(!f.stdout.contains("queued as"), "{}", f.stdout);
    // swaks has quit; nothing it sent can still be on its way into the spool.
    assert_eq!(t.queued(), Vec::<String>::new());
    assert_eq!(t.outbox(), Vec::<String>::new());

    // Without AUTH the relay takes nothing either (no client network is allowlisted).
    let f = run_with_timeout(
        Command::new(&swaks)
            .args(["--server", &t.server(t.starttls_port()), "--tls"])
            .args(["--from", FROM, "--to", TO, "--data"])
            .arg(message_file(&t, "swaks-no-auth", FROM)),
        t.dir.path(),
        "swaks-no-auth",
        SHORT,
    );
    assert!(!f.status.success(), "{}", f.stdout);
    assert!(
        f.stdout.contains("530 5.7.0 Authentication required"),
        "{}",
        f.stdout
    );

    // The right password from the same address still works, and it is the only message
    // the outbox ever gets.
    let f = SwaksAuth {
        name: "swaks-right-password",
        port: t.starttls_port(),
        args: ["--tls", "--auth", "LOGIN"],
        password: PASSWORD,
        from: FROM,
        header_from: FROM,
    }
    .run(&t, &swaks);
    ok(&f, "swaks with the right password", &t);
    let id = queue_id(&f.stdout, "swaks-right-password");
    t.check_delivered(&id, "swaks-right-password");
    assert_eq!(t.outbox(), vec![format!("{id}.eml")]);
    t.assert_logs_clean(1, Some(&["LOGIN"]), 1);
}

#[test]
fn sender_outside_allowed_senders_gets_553_and_header_from_550() {
    let Some(swaks) = require("swaks", "swaks") else {
        return;
    };
    let t = auth_relay();
    let f = SwaksAuth {
        name: "swaks-envelope-ceo",
        port: t.starttls_port(),
        args: ["--tls", "--auth", "PLAIN"],
        password: PASSWORD,
        from: "ceo@lan.example",
        header_from: FROM,
    }
    .run(&t, &swaks);
    assert!(!f.status.success(), "{}", f.stdout);
    assert!(f.stdout.contains("235 2.7.0"), "{}", f.stdout);
    assert!(
        f.stdout
            .contains("553 5.7.1 Sender address not allowed for this client or user"),
        "{}",
        f.stdout
    );

    // The envelope is allowed but the header From is not: refused after the final dot,
    // before anything is queued (C34).
    let f = SwaksAuth {
        name: "swaks-header-ceo",
        port: t.implicit_port(),
        args: ["--tls-on-connect", "--auth", "LOGIN"],
        password: PASSWORD,
        from: FROM,
        header_from: "ceo@lan.example",
    }
    .run(&t, &swaks);
    assert!(!f.status.success(), "{}", f.stdout);
    assert!(
        f.stdout
            .contains("550 5.7.1 Header From address not allowed for this client or user"),
        "{}",
        f.stdout
    );
    assert!(!f.stdout.contains("queued as"), "{}", f.stdout);
    assert_eq!(t.queued(), Vec::<String>::new());

    // The same user with its own address goes through; it is the only delivery.
    let f = SwaksAuth {
        name: "swaks-own-address",
        port: t.starttls_port(),
        args: ["--tls", "--auth", "PLAIN"],
        password: PASSWORD,
        from: FROM,
        header_from: FROM,
    }
    .run(&t, &swaks);
    ok(&f, "swaks with the user's own address", &t);
    let id = queue_id(&f.stdout, "swaks-own-address");
    t.check_delivered(&id, "swaks-own-address");
    assert_eq!(t.outbox(), vec![format!("{id}.eml")]);
    t.assert_logs_clean(3, Some(&["PLAIN", "LOGIN", "PLAIN"]), 0);
}
