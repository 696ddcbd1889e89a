//! `mailbridge senders`: the sender inventory after a mixed load (plaintext, STARTTLS,
//! STARTTLS with AUTH) from real clients, and again after the daemon restarted.

use std::process::Command;

use serde_json::Value;

use crate::admin_cli::{admin_config, cli, code, json, send, start};
use crate::daemon::{LONG, SHORT, files, run_with_timeout, wait_until};
use crate::interop::require;

const USER: &str = "scanner01";
const PASSWORD: &str = "Inventory-pw-5d21a9";

/// Python's smtplib over STARTTLS (certificate not checked: the daemon's self-signed one),
/// with AUTH when `auth` is set.
const SCRIPT: &str = r#"
import smtplib, ssl, sys
port, helo, sender, auth = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
s = smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=20)
s.starttls(context=ssl._create_unverified_context())
s.ehlo(helo)
if auth:
    s.login(sys.argv[5], sys.argv[6])
msg = "From: <%s>\r\nTo: <x@ext.test>\r\nSubject: inv\r\nDate: Thu, 27 Nov 2025 10:00:00 +0000\r\nMessage-ID: <%s@lan.test>\r\n\r\nhi\r\n" % (sender, helo)
s.sendmail(sender, ["x@ext.test"], msg)
s.quit()
"#;

fn by_ip_helo(list: &Value, helo: &str) -> Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|r| r["helo"] == helo)
        .cloned()
        .unwrap_or_else(|| panic!("no entry with HELO {helo}: {list}"))
}

#[test]
fn senders_lists_plaintext_tls_and_auth_clients_and_survives_a_restart() {
    let Some(python) = require("python3", "python3") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let hash = mailbridge::inbound::auth::hash_password(&mailbridge::secret::Secret::new(PASSWORD))
        .unwrap();
    let mut rc = admin_config(dir);
    rc.listeners = vec!["127.0.0.1:0".into(), "127.0.0.1:0".into()];
    rc.listener_tls = vec!["none", "starttls"];
    rc.extra.push_str(&format!(
        "users:\n  - username: {USER}\n    password_hash: {hash:?}\n    allowed_senders: [\"*@lan.test\"]\n"
    ));
    let mut relay = start(&rc);
    assert_eq!(json(dir, &["senders"]), serde_json::json!([]));

    send(&relay, "printer@lan.test", &["x@ext.test"], "p1");
    send(&relay, "other@lan.test", &["x@ext.test"], "p2");
    let script = dir.join("send.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let port = relay.addrs[1].port().to_string();
    for (name, helo, sender, auth) in [
        ("tls", "mfp-tls", "mfp@lan.test", "0"),
        ("auth", "erp-auth", "erp@lan.test", "1"),
    ] {
        let f = run_with_timeout(
            Command::new(&python)
                .arg(&script)
                .args([&port, helo, sender, auth, USER, PASSWORD]),
            dir,
            name,
            SHORT,
        );
        assert!(
            f.status.success(),
            "{name}: {}\n{}\n{}",
            f.stdout,
            f.stderr,
            relay.transcript()
        );
    }
    assert!(
        wait_until(LONG, || files(&rc.outbox).len() == 4),
        "{:?}\n{}",
        files(&rc.outbox),
        relay.transcript()
    );

    let check = |list: &Value| {
        assert_eq!(list.as_array().unwrap().len(), 3, "{list}");
        let plain = by_ip_helo(list, "client.test");
        assert_eq!(plain["ip"], "127.0.0.1");
        assert_eq!(plain["tls_version"], Value::Null);
        assert_eq!(plain["auth_user"], Value::Null);
        assert_eq!(plain["messages"], 2);
        assert_eq!(
            plain["senders"],
            serde_json::json!(["printer@lan.test", "other@lan.test"])
        );
        assert!(
            plain["first_seen_ms"].as_u64().unwrap() <= plain["last_seen_ms"].as_u64().unwrap()
        );
        let tls = by_ip_helo(list, "mfp-tls");
        assert!(
            tls["tls_version"].as_str().unwrap().starts_with("TLSv1."),
            "{tls}"
        );
        assert!(!tls["tls_cipher"].as_str().unwrap().is_empty(), "{tls}");
        assert_eq!(tls["auth_user"], Value::Null);
        assert_eq!(tls["senders"], serde_json::json!(["mfp@lan.test"]));
        let auth = by_ip_helo(list, "erp-auth");
        assert_eq!(auth["auth_user"], USER);
        assert!(
            matches!(auth["auth_mechanism"].as_str(), Some("PLAIN" | "LOGIN")),
            "{auth}"
        );
        assert!(auth["tls_version"].is_string(), "{auth}");
        assert_eq!(auth["messages"], 1);
    };
    let list = json(dir, &["senders"]);
    check(&list);
    let f = cli(dir, &["senders"]);
    assert_eq!(code(&f), 0, "{}", f.stderr);
    let plain_line = f
        .stdout
        .lines()
        .find(|l| l.contains("client.test"))
        .unwrap();
    assert!(plain_line.contains("PLAINTEXT"), "{}", f.stdout);
    assert!(f.stdout.contains(USER), "{}", f.stdout);
    assert!(
        f.stdout.trim_end().ends_with("-- 3 clients, 1 without TLS"),
        "{}",
        f.stdout
    );
    assert!(!f.stdout.contains(PASSWORD));

    // Kept across a restart (written at shutdown).
    relay.sigterm();
    assert!(relay.wait_exit(LONG).is_some_and(|s| s.success()));
    assert!(dir.join("state/senders.json").exists());
    let _relay = start(&rc);
    let again = json(dir, &["senders"]);
    check(&again);
    assert_eq!(again, list);
}
