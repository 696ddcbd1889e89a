//! What old and new TLS clients get from each `tls_profile` (issue 8 §1, docs/tls.md): the real
//! binary on 127.0.0.1 with its generated certificate, and `openssl s_client` offering one
//! suite or one protocol version at a time, over STARTTLS and implicit TLS; Python `ssl`
//! limited to TLS 1.0; the handshake-failure log line; an ECDSA certificate kept from before.
//! The clients run with `@SECLEVEL=0` so that they really offer what they are told to (Debian's
//! OpenSSL refuses TLS 1.0/1.1 and SHA-1 by itself): the server alone decides.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::daemon::{Relay, RelayConfig, SHORT, run_with_timeout};
use crate::interop::require;

const PROFILES: [&str; 3] = ["modern", "compatible", "legacy"];

/// One relay with a STARTTLS and an implicit-TLS listener per profile (in `PROFILES` order),
/// and the generated (default: RSA) certificate.
fn relay(dir: &Path, extra: &str) -> Relay {
    let mut cfg = RelayConfig::new(dir);
    cfg.listeners = vec!["127.0.0.1:0".into(); 6];
    cfg.listener_tls = vec![
        "starttls\n    tls_profile: modern",
        "implicit\n    tls_profile: modern",
        "starttls\n    tls_profile: compatible",
        "implicit\n    tls_profile: compatible",
        "starttls\n    tls_profile: legacy",
        "implicit\n    tls_profile: legacy",
    ];
    cfg.extra = extra.to_string();
    cfg.start()
}

/// Runs `openssl s_client` against a port; returns the protocol and suite agreed, if any.
fn s_client(
    openssl: &Path,
    dir: &Path,
    port: u16,
    starttls: bool,
    args: &[&str],
    name: &str,
) -> Option<(String, String)> {
    let mut cmd = Command::new(openssl);
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")]);
    if starttls {
        cmd.args(["-starttls", "smtp"]);
    }
    cmd.args(args).stdin(std::process::Stdio::null());
    let f = run_with_timeout(&mut cmd, dir, name, SHORT);
    // "New, TLSv1.2, Cipher is AES128-SHA" ("(NONE)" when nothing was agreed). Its version is
    // the suite's; the one in use is in the SSL-Session block ("Protocol  : TLSv1.1"), which a
    // TLS 1.3 client may not print before it quits.
    let new = f.stdout.lines().find(|l| l.starts_with("New, "))?;
    let mut parts = new.trim_start_matches("New, ").split(", Cipher is ");
    let (suite_version, cipher) = (parts.next()?.to_string(), parts.next()?.trim().to_string());
    let proto = f
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Protocol  : "))
        .map(str::to_string)
        .unwrap_or(suite_version);
    (f.status.success() && cipher != "(NONE)").then_some((proto, cipher))
}

struct Case {
    /// The client's options besides `-cipher`.
    args: &'static [&'static str],
    /// OpenSSL cipher string the client offers (TLS 1.2 and lower).
    cipher: &'static str,
    /// Accepted by modern, compatible, legacy.
    accepted: [bool; 3],
}

const CASES: &[Case] = &[
    Case {
        args: &["-tls1_3"],
        cipher: "DEFAULT",
        accepted: [true, true, true],
    },
    Case {
        args: &["-tls1_2"],
        cipher: "ECDHE-RSA-AES128-GCM-SHA256",
        accepted: [true, true, true],
    },
    Case {
        args: &["-tls1_2"],
        cipher: "ECDHE-RSA-AES128-SHA",
        accepted: [false, true, true],
    },
    Case {
        args: &["-tls1_2"],
        cipher: "ECDHE-RSA-AES128-SHA256",
        accepted: [false, true, true],
    },
    Case {
        args: &["-tls1_2"],
        cipher: "AES128-SHA",
        accepted: [false, true, true],
    },
    Case {
        args: &["-tls1_2"],
        cipher: "AES128-SHA256",
        accepted: [false, true, true],
    },
    Case {
        args: &["-tls1_2"],
        cipher: "AES256-GCM-SHA384",
        accepted: [false, true, true],
    },
    Case {
        args: &["-tls1_2"],
        cipher: "DHE-RSA-AES128-GCM-SHA256",
        accepted: [false, true, true],
    },
    // NULL encryption (the client's OpenSSL 3 has no RC4, 3DES or export suites left to
    // offer; tests/it/tls.rs sends those in a hand-made ClientHello).
    Case {
        args: &["-tls1_2"],
        cipher: "NULL-SHA256:ECDHE-RSA-NULL-SHA",
        accepted: [false, false, false],
    },
    Case {
        args: &["-tls1_1"],
        cipher: "DEFAULT",
        accepted: [false, false, true],
    },
    Case {
        args: &["-tls1"],
        cipher: "DEFAULT",
        accepted: [false, false, true],
    },
    Case {
        args: &["-tls1"],
        cipher: "AES128-SHA",
        accepted: [false, false, true],
    },
];

/// Every case against every profile, over STARTTLS and implicit TLS; prints the matrix.
#[test]
fn openssl_s_client_matrix_per_profile() {
    let Some(openssl) = require("openssl", "openssl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let r = relay(dir.path(), "");
    let mut failures = Vec::new();
    let mut table = String::new();
    for (n, case) in CASES.iter().enumerate() {
        let cipher = format!("{}@SECLEVEL=0", case.cipher);
        let mut args: Vec<&str> = case.args.to_vec();
        args.extend(["-cipher", &cipher]);
        let mut row = format!("{:<8} {:<34}", case.args.join(" "), case.cipher);
        for (p, profile) in PROFILES.iter().enumerate() {
            for (m, starttls) in [(0, true), (1, false)] {
                let port = r.addrs[p * 2 + m].port();
                let got = s_client(
                    &openssl,
                    dir.path(),
                    port,
                    starttls,
                    &args,
                    &format!("case{n}-{profile}-{m}"),
                );
                let mode = if starttls { "starttls" } else { "implicit" };
                row.push_str(&format!(
                    " {profile}/{mode}={}",
                    got.as_ref()
                        .map(|(p, c)| format!("{p}:{c}"))
                        .unwrap_or_else(|| "refused".into())
                ));
                if got.is_some() != case.accepted[p] {
                    failures.push(format!(
                        "{} -cipher {} against {profile} ({mode}): expected {}, got {got:?}",
                        case.args.join(" "),
                        case.cipher,
                        if case.accepted[p] {
                            "accepted"
                        } else {
                            "refused"
                        }
                    ));
                }
                let wanted = match case.args[0] {
                    "-tls1" => "TLSv1",
                    "-tls1_1" => "TLSv1.1",
                    "-tls1_2" => "TLSv1.2",
                    _ => "TLSv1.3",
                };
                if let Some((p, _)) = &got {
                    assert_eq!(p, wanted, "{row}");
                }
                // A suite named alone is the one agreed.
                if let Some((_, c)) = &got
                    && !case.cipher.contains(':')
                    && case.cipher != "DEFAULT"
                {
                    assert_eq!(c, case.cipher, "{row}");
                }
            }
        }
        table.push_str(&row);
        table.push('\n');
    }
    println!("{table}");
    assert!(
        failures.is_empty(),
        "{}\n\n{table}\n{}",
        failures.join("\n"),
        r.transcript()
    );
}

/// The default certificate is RSA: a client with RSA suites only (as many printers) connects.
/// An ECDSA certificate kept from an earlier version is not replaced, with a warning that says
/// how; against it the same client fails, and the log says why.
#[test]
fn rsa_certificate_by_default_and_an_earlier_ecdsa_one_is_kept() {
    let Some(openssl) = require("openssl", "openssl") else {
        return;
    };
    let rsa_only = [
        "-tls1_2",
        "-cipher",
        "ECDHE-RSA-AES128-GCM-SHA256:AES128-SHA",
    ];
    let ecdsa_only = ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"];

    let dir = tempfile::tempdir().unwrap();
    let r = relay(dir.path(), "");
    let port = r.addrs[2].port();
    assert!(
        s_client(&openssl, dir.path(), port, true, &rsa_only, "rsa-default").is_some(),
        "{}",
        r.transcript()
    );
    let cert = dir.path().join("state/tls/selfsigned-cert.pem");
    let text = run_with_timeout(
        Command::new(&openssl)
            .args(["x509", "-noout", "-text", "-in"])
            .arg(&cert),
        dir.path(),
        "x509",
        SHORT,
    );
    assert!(
        text.stdout.contains("rsaEncryption") && text.stdout.contains("(2048 bit)"),
        "{}",
        text.stdout
    );
    drop(r);

    // An ECDSA certificate generated by an earlier version.
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("state/tls");
    std::fs::create_dir_all(&tls).unwrap();
    let made = run_with_timeout(
        Command::new(&openssl)
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                "/CN=relay.test",
                "-days",
                "2",
                "-keyout",
            ])
            .arg(tls.join("selfsigned-key.pem"))
            .arg("-out")
            .arg(tls.join("selfsigned-cert.pem")),
        dir.path(),
        "req",
        SHORT,
    );
    assert!(made.status.success(), "{}", made.stderr);
    std::fs::set_permissions(
        tls.join("selfsigned-key.pem"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let before = std::fs::read(tls.join("selfsigned-cert.pem")).unwrap();
    let r = relay(dir.path(), "");
    let port = r.addrs[2].port();
    assert!(s_client(&openssl, dir.path(), port, true, &ecdsa_only, "ecdsa").is_some());
    assert!(s_client(&openssl, dir.path(), port, true, &rsa_only, "rsa-vs-ecdsa").is_none());
    assert_eq!(
        std::fs::read(tls.join("selfsigned-cert.pem")).unwrap(),
        before,
        "kept"
    );
    let warned = r.logs().into_iter().any(|v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("ECDSA key") && m.contains("delete both files"))
    });
    assert!(warned, "{}", r.transcript());
    let line = wait_failure_log(&r);
    assert!(line.contains("ECDSA certificate"), "{line}");
}

/// The first "TLS handshake failed" log line, waiting for it.
fn wait_failure_log(r: &Relay) -> String {
    let found = crate::daemon::wait_until(SHORT, || r.logs().into_iter().any(|v| is_failure(&v)));
    assert!(found, "no handshake failure logged\n{}", r.transcript());
    let v = r.logs().into_iter().find(is_failure).unwrap();
    format!("{} client={}", v["message"].as_str().unwrap(), v["client"])
}

fn is_failure(v: &Value) -> bool {
    v["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("TLS handshake failed"))
}

/// "Why can't my printer connect?": one log line names the client, what it offered, and the
/// profile that would accept it.
#[test]
fn handshake_failure_log_says_what_was_offered_and_which_profile_accepts_it() {
    let Some(openssl) = require("openssl", "openssl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let r = relay(dir.path(), "");
    let port = r.addrs[2].port(); // compatible, STARTTLS
    let args = [
        "-tls1",
        "-cipher",
        "AES128-SHA:ECDHE-RSA-AES128-SHA@SECLEVEL=0",
    ];
    assert!(s_client(&openssl, dir.path(), port, true, &args, "tls1-printer").is_none());
    let line = wait_failure_log(&r);
    for part in [
        "client offered TLS1.0 only with AES128-SHA, ECDHE-RSA-AES128-SHA",
        "profile compatible refuses it",
        "tls_profile: legacy would accept it",
        "client=\"127.0.0.1\"",
    ] {
        assert!(line.contains(part), "missing {part:?} in: {line}");
    }
}

/// A TLS 1.2 client whose signature algorithms all use SHA-1 fails on `compatible` (OpenSSL 3
/// allows SHA-1 signatures at security level 0 only), works on `legacy`, and the log says
/// so rather than leaving the admin with suites that look acceptable.
#[test]
fn tls12_client_with_sha1_signatures_only_needs_legacy_and_the_log_says_why() {
    let Some(openssl) = require("openssl", "openssl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let r = relay(dir.path(), "");
    let args = [
        "-tls1_2",
        "-sigalgs",
        "RSA+SHA1",
        "-cipher",
        "ECDHE-RSA-AES128-SHA:AES128-SHA@SECLEVEL=0",
    ];
    let legacy = r.addrs[4].port();
    assert!(s_client(&openssl, dir.path(), legacy, true, &args, "sha1-legacy").is_some());
    let compatible = r.addrs[2].port();
    assert!(s_client(&openssl, dir.path(), compatible, true, &args, "sha1-compat").is_none());
    let line = wait_failure_log(&r);
    for part in [
        "client offered TLS1.2 at most with ECDHE-RSA-AES128-SHA, AES128-SHA and SHA-1 signatures only",
        "profile compatible refuses it; tls_profile: legacy would accept it",
    ] {
        assert!(line.contains(part), "missing {part:?} in: {line}");
    }
}

/// Python's `ssl` limited to TLS 1.0 sends mail through `legacy` (STARTTLS and implicit),
/// and is refused by `compatible`.
#[test]
fn python_tls10_client_on_legacy_only() {
    let Some(python) = require("python3", "python3") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let r = relay(dir.path(), "");
    let script = r#"
import smtplib, ssl, sys
cafile = sys.argv[1]
legacy_starttls, legacy_implicit, compatible = (int(p) for p in sys.argv[2:5])
def ctx():
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c.load_verify_locations(cafile)
    c.minimum_version = ssl.TLSVersion.TLSv1
    c.maximum_version = ssl.TLSVersion.TLSv1
    c.set_ciphers("DEFAULT@SECLEVEL=0")
    return c
msg = b"From: a@lan.example\r\nSubject: tls1\r\n\r\nold printer\r\n"
s = smtplib.SMTP("localhost", legacy_starttls, timeout=20)
s.starttls(context=ctx())
assert s.sock.version() == "TLSv1", s.sock.version()
s.sendmail("a@lan.example", ["b@ext.example"], msg)
s.quit()
s = smtplib.SMTP_SSL("localhost", legacy_implicit, context=ctx(), timeout=20)
assert s.sock.version() == "TLSv1", s.sock.version()
s.sendmail("a@lan.example", ["c@ext.example"], msg)
s.quit()
s = smtplib.SMTP("localhost", compatible, timeout=20)
try:
    s.starttls(context=ctx())
    print("compatible accepted TLS 1.0")
    sys.exit(1)
except ssl.SSLError as e:
    print("refused:", e)
print("ok")
"#;
    let f = run_with_timeout(
        Command::new(&python)
            .arg("-c")
            .arg(script)
            .arg(dir.path().join("state/tls/selfsigned-cert.pem"))
            .arg(r.addrs[4].port().to_string())
            .arg(r.addrs[5].port().to_string())
            .arg(r.addrs[2].port().to_string()),
        dir.path(),
        "python-tls1",
        SHORT,
    );
    assert!(
        f.status.success() && f.stdout.contains("ok"),
        "{}\n{}\n{}",
        f.stdout,
        f.stderr,
        r.transcript()
    );
    let delivered = || {
        std::fs::read_dir(dir.path().join("outbox"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    assert!(
        crate::daemon::wait_until(crate::daemon::LONG, || delivered() >= 2),
        "{}",
        r.transcript()
    );
}

/// Each start warns about every `legacy` listener, by address.
#[test]
fn legacy_listener_is_warned_about_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let r = relay(dir.path(), "");
    let legacy: Vec<String> = r.addrs[4..6].iter().map(|a| a.to_string()).collect();
    let warned: Vec<String> = r
        .logs()
        .into_iter()
        .filter(|v| v["level"] == "WARN")
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("tls_profile: legacy"))
        })
        .filter_map(|v| v["address"].as_str().map(str::to_string))
        .collect();
    assert_eq!(warned, legacy, "{}", r.transcript());
}
