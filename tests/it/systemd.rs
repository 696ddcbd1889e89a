//! systemd integration of the real binary (issue 9 §5): `Type=notify` messages through a
//! notify socket the test binds (READY=1, STOPPING=1, WATCHDOG=1), and secrets read through
//! `${CREDENTIALS_DIRECTORY}` as `LoadCredential=` provides them. Loopback and temp dirs only.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::daemon::{RelayConfig, SHORT, Smtp, mailbridge_cmd};

/// A notify socket as systemd provides it: a datagram socket whose path is `NOTIFY_SOCKET`.
struct NotifySocket {
    sock: UnixDatagram,
    path: std::path::PathBuf,
    /// Every datagram so far, in order.
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        NotifySocket {
            sock,
            path,
            seen: Vec::new(),
        }
    }

    /// The next datagram that holds `line` as one of its lines, waiting up to `timeout`.
    /// Panics (with everything received so far) if none comes.
    fn wait_for(&mut self, line: &str, timeout: Duration, child: &mut Child) -> String {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        loop {
            let now = Instant::now();
            if now >= deadline {
                panic!("no {line} within {timeout:?}; received: {:?}", self.seen);
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "mailbridge exited ({status}) before {line}; received: {:?}",
                    self.seen
                );
            }
            // Short reads so that an exited daemon is noticed.
            let wait = (deadline - now).min(Duration::from_millis(200));
            self.sock.set_read_timeout(Some(wait)).unwrap();
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.seen.push(msg.clone());
                    if msg.lines().any(|l| l == line) {
                        return msg;
                    }
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("notify socket: {e}"),
            }
        }
    }
}

/// Starts `mailbridge serve` for `cfg` with `env` set, output into files in the config's
/// directory (read them on failure).
fn spawn(cfg: &RelayConfig, env: &[(&str, &std::ffi::OsStr)]) -> Child {
    cfg.write();
    let mut cmd = mailbridge_cmd();
    cmd.arg("serve")
        .arg("-c")
        .arg(cfg.path())
        .stdout(std::fs::File::create(cfg.dir.join("serve.stdout")).unwrap())
        .stderr(std::fs::File::create(cfg.dir.join("serve.stderr")).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("start mailbridge")
}

/// Kills the child when the test ends, whatever happened.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigterm(child: &Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("a child pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("kill -TERM");
}

/// READY=1 comes once the spool is recovered (a partial file left in tmp/ by a crash is gone)
/// and the listener answers; its STATUS names the address. SIGTERM gives STOPPING=1, and
/// the daemon still exits 0.
#[test]
fn notify_ready_after_recovery_and_listeners_then_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = RelayConfig::new(dir.path());
    let leftover = cfg.spool.join("tmp").join("crashed-mid-data.msg");
    std::fs::create_dir_all(leftover.parent().unwrap()).unwrap();
    std::fs::write(&leftover, b"partial message from a crash").unwrap();
    let mut notify = NotifySocket::bind(dir.path());

    let mut child = Reap(spawn(&cfg, &[("NOTIFY_SOCKET", notify.path.as_os_str())]));
    let ready = notify.wait_for("READY=1", SHORT, &mut child.0);

    // Checked right at READY=1: recovery is done and the listener accepts.
    assert!(
        !leftover.exists(),
        "READY=1 before the spool was recovered (tmp/ still holds the partial file)"
    );
    let addr = ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS=listening on "))
        .unwrap_or_else(|| panic!("READY=1 without the listening STATUS: {ready:?}"));
    let addr: std::net::SocketAddr = addr.parse().expect("one listener address");
    assert!(addr.ip().is_loopback());
    let mut smtp = Smtp::connect(addr).expect("connect right after READY=1");
    let greeting = smtp.read_reply().expect("a greeting");
    assert_eq!(greeting.code, 220, "{greeting:?}");
    drop(smtp);

    sigterm(&child.0);
    notify.wait_for("STOPPING=1", SHORT, &mut child.0);
    let deadline = Instant::now() + SHORT;
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit after SIGTERM: {status}");
    // STOPPING=1 came after READY=1, and nothing reported readiness twice.
    assert_eq!(
        notify.seen.iter().filter(|m| m.contains("READY=1")).count(),
        1,
        "{:?}",
        notify.seen
    );
}

/// With `WatchdogSec=` systemd sets WATCHDOG_USEC; the daemon then sends WATCHDOG=1 at half
/// that interval, after READY=1.
#[test]
fn notify_watchdog_pings_when_watchdog_usec_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = RelayConfig::new(dir.path());
    let mut notify = NotifySocket::bind(dir.path());
    let usec = std::ffi::OsString::from("400000");
    let mut child = Reap(spawn(
        &cfg,
        &[
            ("NOTIFY_SOCKET", notify.path.as_os_str()),
            ("WATCHDOG_USEC", usec.as_os_str()),
        ],
    ));
    notify.wait_for("READY=1", SHORT, &mut child.0);
    let t0 = Instant::now();
    notify.wait_for("WATCHDOG=1", SHORT, &mut child.0);
    notify.wait_for("WATCHDOG=1", SHORT, &mut child.0);
    // Two pings at 200 ms: well inside one 400 ms watchdog period plus scheduling slack.
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "two pings took {:?}",
        t0.elapsed()
    );
    sigterm(&child.0);
    notify.wait_for("STOPPING=1", SHORT, &mut child.0);
}

fn sighup(child: &Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("a child pid");
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).expect("kill -HUP");
}

/// SIGHUP (what `ExecReload=` sends) gives RELOADING=1 with MONOTONIC_USEC (as
/// `Type=notify-reload` requires), then READY=1 once the new configuration is live, and
/// READY=1 also when the file is invalid and the old configuration stays. The daemon keeps
/// serving throughout.
#[test]
fn notify_reloading_then_ready_around_a_sighup_reload() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path());
    let mut notify = NotifySocket::bind(dir.path());
    let mut child = Reap(spawn(&cfg, &[("NOTIFY_SOCKET", notify.path.as_os_str())]));
    notify.wait_for("READY=1", SHORT, &mut child.0);

    for valid in [true, false] {
        cfg.extra = if valid {
            "limits:\n  max_recipients: 5\n".into()
        } else {
            "limits:\n  max_recipients: many\n".into()
        };
        cfg.write();
        sighup(&child.0);
        let reloading = notify.wait_for("RELOADING=1", SHORT, &mut child.0);
        let usec: u64 = reloading
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {reloading:?}"))
            .parse()
            .expect("MONOTONIC_USEC is a number");
        assert!(usec > 0);
        let ready = notify.wait_for("READY=1", SHORT, &mut child.0);
        assert!(
            ready.lines().any(|l| l.starts_with("STATUS=listening on ")),
            "{ready:?}"
        );
    }
    let stdout = std::fs::read_to_string(dir.path().join("serve.stdout")).unwrap();
    assert!(stdout.contains("configuration reloaded"), "{stdout}");
    assert!(stdout.contains("reload failed: 1 errors"), "{stdout}");

    sigterm(&child.0);
    notify.wait_for("STOPPING=1", SHORT, &mut child.0);
}

/// A credentials directory as `LoadCredential=` makes it: files mode 0440 (systemd with ACLs:
/// root-owned, the group bits showing the ACL mask) or 0400 (owned by the service user).
fn credentials_dir(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let creds = dir.join("credentials");
    std::fs::create_dir(&creds).unwrap();
    let hash =
        mailbridge::inbound::auth::hash_password(&mailbridge::secret::Secret::new("scanner-pw"))
            .unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["relay.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    // Entra app certificates are RSA.
    let entra_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let entra_cert = rcgen::CertificateParams::new(vec!["mailbridge".to_string()])
        .unwrap()
        .self_signed(&entra_key)
        .unwrap();
    for (name, data, mode) in [
        ("scanner.hash", format!("{hash}\n"), 0o440),
        ("lan.key", key.serialize_pem(), 0o440),
        ("lan.pem", cert.pem(), 0o444),
        ("entra.key", entra_key.serialize_pem(), 0o440),
        ("entra.pem", entra_cert.pem(), 0o444),
        ("entra.secret", "s3cret-value\n".to_string(), 0o400),
    ] {
        let p = creds.join(name);
        std::fs::write(&p, data).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o500)).unwrap();
    creds
}

const CREDENTIAL_KEYS: &str = r#"tls:
  cert_file: "${CREDENTIALS_DIRECTORY}/lan.pem"
  key_file: "${CREDENTIALS_DIRECTORY}/lan.key"
users:
  - username: scanner01
    password_hash_file: "${CREDENTIALS_DIRECTORY}/scanner.hash"
    allowed_senders: ["*"]
"#;

/// `LoadCredential=`: `password_hash_file` and the LAN `tls.key_file` name files in
/// `${CREDENTIALS_DIRECTORY}`, with systemd's modes (0440/0400). The daemon starts, uses the
/// certificate from there, and AUTH PLAIN checks against the hash from there.
#[test]
fn credentials_directory_in_file_paths_is_expanded_and_its_modes_pass() {
    let dir = tempfile::tempdir().unwrap();
    let creds = credentials_dir(dir.path());
    let mut cfg = RelayConfig::new(dir.path());
    cfg.listener_tls = vec!["starttls"];
    cfg.extra = CREDENTIAL_KEYS.to_string();
    let mut notify = NotifySocket::bind(dir.path());
    // allow_plaintext_auth for the test's plain TCP client (its own listener option).
    cfg.write();
    let yaml = std::fs::read_to_string(cfg.path()).unwrap().replace(
        "    tls: starttls\n",
        "    tls: starttls\n    allow_plaintext_auth: true\n",
    );
    std::fs::write(cfg.path(), yaml).unwrap();
    let mut cmd = mailbridge_cmd();
    cmd.arg("serve")
        .arg("-c")
        .arg(cfg.path())
        .env("CREDENTIALS_DIRECTORY", &creds)
        .env("NOTIFY_SOCKET", &notify.path)
        .stdout(std::fs::File::create(dir.path().join("serve.stdout")).unwrap())
        .stderr(std::fs::File::create(dir.path().join("serve.stderr")).unwrap());
    let mut child = Reap(cmd.spawn().expect("start mailbridge"));
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        notify.wait_for("READY=1", SHORT, &mut child.0)
    }));
    let output = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
    let ready = match started {
        Ok(r) => r,
        Err(_) => panic!(
            "did not start:\n{}\n{}",
            output("serve.stdout"),
            output("serve.stderr")
        ),
    };
    let addr: std::net::SocketAddr = ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS=listening on "))
        .unwrap()
        .parse()
        .unwrap();
    let logs = output("serve.stdout");
    let cert = creds.join("lan.pem").display().to_string();
    assert!(
        logs.lines()
            .any(|l| l.contains("TLS certificate loaded") && l.contains(&cert)),
        "certificate not loaded from {cert}:\n{logs}"
    );

    let plain = |user: &str, pw: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pw}"))
    };
    let mut smtp = Smtp::connect(addr).unwrap();
    smtp.expect_reply(220).unwrap();
    smtp.expect("EHLO client.test", 250).unwrap();
    let wrong = smtp
        .cmd(&format!("AUTH PLAIN {}", plain("scanner01", "wrong")))
        .unwrap();
    assert_eq!(wrong.code, 535, "{wrong:?}");
    let ok = smtp
        .cmd(&format!("AUTH PLAIN {}", plain("scanner01", "scanner-pw")))
        .unwrap();
    assert_eq!(ok.code, 235, "{ok:?}");
    // Writable again, so that the temp dir can be removed when not running as root.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o700)).unwrap();
}

/// `check-config` as systemd runs it (ExecStartPre, with CREDENTIALS_DIRECTORY set): the
/// Exchange `client_secret_file` and `certificate.key_file` may be credentials too. Without
/// the variable, every key that uses it is an error that names the key and the fix; a
/// credential file others may read is still refused.
#[test]
fn credentials_directory_check_config_and_errors() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let creds = credentials_dir(dir.path());
    let mut cfg = RelayConfig::new(dir.path());
    cfg.listener_tls = vec!["starttls"];
    cfg.extra = CREDENTIAL_KEYS.to_string();
    cfg.upstreams = Some(
        "  - name: contoso\n    type: exchange-online\n    mailbox: relay@contoso.com\n    tenant_id: contoso.com\n    client_id: 11111111-1111-1111-1111-111111111111\n    client_secret_file: \"${CREDENTIALS_DIRECTORY}/entra.secret\"\n  - name: fabrikam\n    type: exchange-online\n    mailbox: relay@fabrikam.com\n    tenant_id: fabrikam.com\n    client_id: 22222222-2222-2222-2222-222222222222\n    certificate:\n      cert_file: \"${CREDENTIALS_DIRECTORY}/entra.pem\"\n      key_file: \"${CREDENTIALS_DIRECTORY}/entra.key\"\n"
            .to_string(),
    );
    cfg.write();
    let check = |name: &str, creds: Option<&Path>| {
        let mut cmd = mailbridge_cmd();
        cmd.arg("check-config").arg("-c").arg(cfg.path());
        if let Some(c) = creds {
            cmd.env("CREDENTIALS_DIRECTORY", c);
        }
        let out = crate::daemon::run_with_timeout(&mut cmd, dir.path(), name, SHORT);
        (out.status.code(), format!("{}{}", out.stdout, out.stderr))
    };

    let (code, out) = check("with", Some(&creds));
    assert_eq!(code, Some(0), "{out}");

    let (code, out) = check("unset", None);
    assert_eq!(code, Some(1), "{out}");
    for key in [
        "tls.cert_file:",
        "tls.key_file:",
        "users[0].password_hash_file:",
        "upstreams[0].client_secret_file:",
        "upstreams[1].certificate.cert_file:",
        "upstreams[1].certificate.key_file:",
    ] {
        assert!(
            out.lines()
                .any(|l| l.contains(key) && l.contains("CREDENTIALS_DIRECTORY is not set")),
            "no {key} error about the unset variable in:\n{out}"
        );
    }
    assert!(!out.contains("s3cret-value"), "{out}");

    // Others may read it: refused even in the credentials directory.
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o700)).unwrap();
    let secret = creds.join("entra.secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o444)).unwrap();
    let (code, out) = check("world-readable", Some(&creds));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("upstreams[0].client_secret_file:") && out.contains("mode 444"),
        "{out}"
    );
    assert!(!out.contains("s3cret-value"), "{out}");
}
