//! `mailbridge hash-password` as a process, fed through a pipe: the printed argon2id PHC
//! string verifies with the password and no other, and the configuration accepts it
//! (behaviour.md C36). The terminal path (no echo, asked twice) needs a pty and is not here.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use argon2::{Argon2, Params, PasswordHash, PasswordVerifier};

fn hash_password(stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailbridge"))
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mailbridge");
    let mut pipe = child.stdin.take().unwrap();
    // The command may stop reading early (after the first line, or past the length limit).
    let _ = pipe.write_all(stdin);
    drop(pipe);
    child.wait_with_output().unwrap()
}

/// The one line of stdout, after checking the run succeeded.
fn printed_hash(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let hash = stdout.strip_suffix('\n').expect("ends with a newline");
    assert!(!hash.contains('\n'), "one line: {stdout:?}");
    hash.to_string()
}

fn verifies(hash: &str, password: &[u8]) -> bool {
    let parsed = PasswordHash::new(hash).unwrap();
    Argon2::default().verify_password(password, &parsed).is_ok()
}

#[test]
fn hash_password_prints_an_argon2id_hash_of_the_first_line() {
    let password = "correct horse battery staple";
    let out = hash_password(format!("{password}\n").as_bytes());
    let hash = printed_hash(&out);
    let parsed = PasswordHash::new(&hash).expect("a PHC string");
    assert_eq!(parsed.algorithm.as_str(), "argon2id");
    assert_eq!(parsed.version, Some(19));
    let params = Params::try_from(&parsed).unwrap();
    assert_eq!(
        (params.m_cost(), params.t_cost(), params.p_cost()),
        (19456, 2, 1)
    );
    assert!(verifies(&hash, password.as_bytes()));
    assert!(!verifies(&hash, b"correct horse battery stapl"));
    assert!(!verifies(&hash, format!("{password}\n").as_bytes()));
    assert!(!verifies(&hash, b"hunter2"));
    // Nothing about the password on stderr (no echo, no prompt without a terminal).
    assert!(!String::from_utf8_lossy(&out.stderr).contains(password));

    // The configuration takes it as users[].password_hash.
    let yaml = format!(
        r#"
upstreams: [{{name: o, type: outbox, path: /tmp/o}}]
users:
  - username: scanner01
    password_hash: "{hash}"
    allowed_senders: ["*"]
"#
    );
    let config = mailbridge::config::from_yaml_str(&yaml).expect("accepted");
    assert_eq!(config.users[0].password_hash.expose(), hash);
}

#[test]
fn hash_password_salts_every_hash() {
    let a = printed_hash(&hash_password(b"same\n"));
    let b = printed_hash(&hash_password(b"same"));
    assert_ne!(a, b);
    assert!(verifies(&a, b"same") && verifies(&b, b"same"));
}

#[test]
fn hash_password_takes_only_the_first_line_without_its_line_end() {
    let hash = printed_hash(&hash_password(b"first\r\nsecond\n"));
    assert!(verifies(&hash, b"first"));
    assert!(!verifies(&hash, b"first\r"));
    assert!(!verifies(&hash, b"second"));
    // Inner and trailing blanks are part of the password.
    let hash = printed_hash(&hash_password(b" p w \n"));
    assert!(verifies(&hash, b" p w "));
    assert!(!verifies(&hash, b"p w"));
}

#[test]
fn hash_password_refuses_what_cannot_be_a_password() {
    for (input, why) in [
        (&b""[..], "the password is empty"),
        (b"\n", "the password is empty"),
        (b"\r\nsecond\n", "the password is empty"),
        (b"a\xffb\n", "not valid UTF-8"),
        (b"a\0b\n", "NUL"),
    ] {
        let out = hash_password(input);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{input:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{input:?}");
        assert!(stderr.contains(why), "{input:?}: {stderr}");
    }
    let long = vec![b'x'; 100_000];
    let out = hash_password(&long);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("longer than 4096 bytes"));
}
