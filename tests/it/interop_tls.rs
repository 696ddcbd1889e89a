//! Real TLS clients against the real binary on 127.0.0.1, with a certificate made by rcgen
//! here: swaks (`--tls`, `--tls-on-connect`), curl (`--ssl-reqd`, `smtps://`), Python smtplib
//! (`starttls()`, `SMTP_SSL`), and `openssl s_client` offering only TLS 1.1 (refused,
//! behaviour.md C37) next to TLS 1.2 (accepted, so the refusal test can fail).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::daemon::{LONG, Relay, RelayConfig, SHORT, run_with_timeout, wait_until};
use crate::interop::require;

struct TlsRelay {
    relay: Relay,
    cert: PathBuf,
    dir: tempfile::TempDir,
}

impl TlsRelay {
    fn starttls_port(&self) -> u16 {
        self.relay.addrs[0].port()
    }
    fn implicit_port(&self) -> u16 {
        self.relay.addrs[1].port()
    }
    fn delivered(&self) -> usize {
        std::fs::read_dir(&self.relay.outbox)
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "eml"))
                })
                .count()
            })
            .unwrap_or(0)
    }
    fn wait_delivered(&self, n: usize) {
        assert!(
            wait_until(LONG, || self.delivered() >= n),
            "expected {n} delivered, have {}\n{}",
            self.delivered(),
            self.relay.transcript()
        );
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A relay with a STARTTLS listener and an implicit-TLS listener, and its certificate.
fn tls_relay() -> TlsRelay {
    let dir = tempfile::tempdir().unwrap();
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    // mailbridge refuses a private key that group or others can read.
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut cfg = RelayConfig::new(dir.path());
    cfg.listeners = vec!["127.0.0.1:0".into(), "127.0.0.1:0".into()];
    cfg.listener_tls = vec!["starttls", "implicit"];
    cfg.extra = format!(
        "tls:\n  cert_file: {:?}\n  key_file: {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    let relay = cfg.start();
    TlsRelay { relay, cert, dir }
}

fn message_file(t: &TlsRelay, subject: &str) -> PathBuf {
    let p = t.path(&format!("{subject}.eml"));
    std::fs::write(
        &p,
        format!("From: printer@lan.example\r\nTo: b@ext.example\r\nSubject: {subject}\r\n\r\nscan attached\r\n"),
    )
    .unwrap();
    p
}

fn ok(f: &crate::daemon::Finished, what: &str, t: &TlsRelay) {
    assert!(
        f.status.success(),
        "{what} failed ({:?}):\n{}\n{}\n{}",
        f.status,
        f.stdout,
        f.stderr,
        t.relay.transcript()
    );
}

#[test]
fn swaks_starttls_and_tls_on_connect() {
    let Some(swaks) = require("swaks", "swaks") else {
        return;
    };
    let t = tls_relay();
    let base = t.delivered();
    for (flag, port, name) in [
        ("--tls", t.starttls_port(), "swaks-starttls"),
        (
            "--tls-on-connect",
            t.implicit_port(),
            "swaks-tls-on-connect",
        ),
    ] {
        let f = run_with_timeout(
            Command::new(&swaks).args([
                "--server",
                &format!("127.0.0.1:{port}"),
                flag,
                "--from",
                "printer@lan.example",
                "--to",
                "b@ext.example",
                "--data",
                message_file(&t, name).to_str().unwrap(),
            ]),
            t.dir.path(),
            name,
            SHORT,
        );
        ok(&f, name, &t);
        assert!(f.stdout.contains("250 2.0.0 Ok: queued as"), "{}", f.stdout);
    }
    t.wait_delivered(base + 2);
}

#[test]
fn curl_ssl_reqd_and_smtps_verify_the_certificate() {
    let Some(curl) = require("curl", "curl") else {
        return;
    };
    let t = tls_relay();
    for (url, name) in [
        (
            format!("smtp://127.0.0.1:{}", t.starttls_port()),
            "curl-starttls",
        ),
        (
            format!("smtps://127.0.0.1:{}", t.implicit_port()),
            "curl-smtps",
        ),
    ] {
        let file = message_file(&t, name);
        let f = run_with_timeout(
            Command::new(&curl)
                .args(["-sS", "--ssl-reqd", "--cacert"])
                .arg(&t.cert)
                .args([
                    &url,
                    "--mail-from",
                    "printer@lan.example",
                    "--mail-rcpt",
                    "b@ext.example",
                    "-T",
                ])
                .arg(&file),
            t.dir.path(),
            name,
            SHORT,
        );
        ok(&f, name, &t);
    }
    t.wait_delivered(2);
}

#[test]
fn python_smtplib_starttls_and_smtp_ssl() {
    let Some(python) = require("python3", "python3") else {
        return;
    };
    let t = tls_relay();
    let script = r#"
import smtplib, ssl, sys
cafile, p1, p2 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ctx = ssl.create_default_context(cafile=cafile)
msg = b"From: a@lan.example\r\nSubject: py\r\n\r\nhello\r\n"
s = smtplib.SMTP("localhost", p1, timeout=20)
s.starttls(context=ctx)
s.ehlo()
assert s.sock.version() in ("TLSv1.2", "TLSv1.3"), s.sock.version()
s.sendmail("a@lan.example", ["b@ext.example"], msg)
s.quit()
s = smtplib.SMTP_SSL("localhost", p2, context=ctx, timeout=20)
s.sendmail("a@lan.example", ["c@ext.example"], msg)
s.quit()
print("ok")
"#;
    let f = run_with_timeout(
        Command::new(&python)
            .arg("-c")
            .arg(script)
            .arg(&t.cert)
            .arg(t.starttls_port().to_string())
            .arg(t.implicit_port().to_string()),
        t.dir.path(),
        "python-tls",
        SHORT,
    );
    ok(&f, "python smtplib", &t);
    assert!(f.stdout.contains("ok"));
    t.wait_delivered(2);
}

fn s_client(t: &TlsRelay, openssl: &Path, version: &str) -> crate::daemon::Finished {
    let mut cmd = Command::new(openssl);
    cmd.args([
        "s_client",
        "-connect",
        &format!("127.0.0.1:{}", t.starttls_port()),
        "-starttls",
        "smtp",
        version,
        // Let the client really offer old versions (OpenSSL 3 refuses them by itself at
        // the default security level, which would make this test pass for the wrong reason).
        "-cipher",
        "DEFAULT@SECLEVEL=0",
    ])
    .stdin(std::process::Stdio::null());
    run_with_timeout(&mut cmd, t.dir.path(), &format!("openssl{version}"), SHORT)
}

#[test]
fn openssl_tls11_is_refused_tls12_accepted_c37() {
    let Some(openssl) = require("openssl", "openssl") else {
        return;
    };
    let t = tls_relay();
    let old = s_client(&t, &openssl, "-tls1_1");
    let text = format!("{}{}", old.stdout, old.stderr);
    assert!(
        !old.status.success() || text.contains("Cipher is (NONE)"),
        "TLS 1.1 handshake succeeded:\n{text}"
    );
    // s_client reports the protocol it tried even when no cipher was agreed.
    assert!(text.contains("Cipher is (NONE)"), "{text}");
    let good = s_client(&t, &openssl, "-tls1_2");
    let text = format!("{}{}", good.stdout, good.stderr);
    assert!(
        text.contains("Protocol  : TLSv1.2") && !text.contains("Cipher is (NONE)"),
        "TLS 1.2 must work:\n{text}"
    );
}

/// `tls.key_file` may hold a PKCS#8, PKCS#1 (RSA) or SEC1 (EC) key: made by openssl here and
/// loaded by `check-config`, which builds the same TLS configuration as `serve`.
#[test]
fn key_files_in_pkcs8_pkcs1_and_sec1_are_accepted() {
    let Some(openssl) = require("openssl", "openssl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], name: &str| {
        let f = run_with_timeout(
            Command::new(&openssl).args(args).current_dir(dir.path()),
            dir.path(),
            name,
            SHORT,
        );
        assert!(f.status.success(), "openssl {args:?}: {}", f.stderr);
    };
    run(
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "sec1.pem",
        ],
        "ec",
    );
    run(
        &["genrsa", "-traditional", "-out", "pkcs1.pem", "2048"],
        "rsa",
    );
    run(
        &[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            "sec1.pem",
            "-out",
            "pkcs8.pem",
        ],
        "p8",
    );
    for (key, marker) in [
        ("sec1.pem", "BEGIN EC PRIVATE KEY"),
        ("pkcs1.pem", "BEGIN RSA PRIVATE KEY"),
        ("pkcs8.pem", "BEGIN PRIVATE KEY"),
    ] {
        let text = std::fs::read_to_string(dir.path().join(key)).unwrap();
        assert!(text.contains(marker), "{key} is not in the expected form");
        let cert = format!("{key}.crt");
        run(
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                key,
                "-subj",
                "/CN=relay.test",
                "-days",
                "2",
                "-out",
                &cert,
            ],
            &format!("{key}-req"),
        );
        std::fs::set_permissions(
            dir.path().join(key),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let yaml = dir.path().join(format!("{key}.yaml"));
        std::fs::write(
            &yaml,
            format!(
                "upstreams: [{{name: o, type: outbox, path: {d}/o}}]\nlisteners:\n  - address: \"127.0.0.1:0\"\n    tls: starttls\ntls:\n  cert_file: {d}/{cert}\n  key_file: {d}/{key}\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let f = run_with_timeout(
            crate::daemon::mailbridge_cmd()
                .arg("check-config")
                .arg("-c")
                .arg(&yaml),
            dir.path(),
            &format!("{key}-check"),
            SHORT,
        );
        assert!(
            f.status.success() && f.stdout.trim() == "ok",
            "{key}: {} {}",
            f.stdout,
            f.stderr
        );
    }
}
